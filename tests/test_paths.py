"""Two nodes' PeerPaths back to back on a fake clock: ICE picks the path, consent watches it."""

import random

from macula.ice import Candidate, generate_pwd, generate_ufrag
from macula.identity import Identity
from macula.node.options import NodeOptions
from macula.node.paths import PathEvent, PeerPaths

OPTIONS = NodeOptions()

A, B = Identity.generate().node_id, Identity.generate().node_id
ADDR_A, ADDR_B = ("198.51.100.11", 4000), ("198.51.100.12", 5000)
ONE_WAY = 0.02


class Wire:
    """Delivers what each side sends to the other after ONE_WAY; can be cut."""

    def __init__(self, pa: PeerPaths, pb: PeerPaths) -> None:
        self.sides = {ADDR_A: pa, ADDR_B: pb}
        self.flight: list[tuple[float, bytes, tuple, tuple]] = []
        self.cut = False
        self.sent = {ADDR_A: 0, ADDR_B: 0}
        self.happened: dict[str, list[tuple[float, str]]] = {"a": [], "b": []}

    def collect(self, now: float) -> None:
        for src, paths in self.sides.items():
            for data, addr, _via in paths.datagrams_to_send():
                self.sent[src] += 1
                if not self.cut:
                    self.flight.append((now + ONE_WAY, data, src, addr))

    def run(self, until: float) -> None:
        now = 0.0
        while now <= until:
            timers = [p.get_timer() for p in self.sides.values()]
            times = [t for t in timers if t is not None] + [f[0] for f in self.flight]
            if not times:
                return
            now = min(times)
            if now > until:
                return
            for item in [f for f in self.flight if f[0] <= now]:
                self.flight.remove(item)
                _, data, src, dst = item
                paths = self.sides[dst]
                paths.receive(data, src, now, "socket")
                self._log(dst, paths.drain_events(now), now)
            for addr, paths in self.sides.items():
                t = paths.get_timer()
                if t is not None and t <= now:
                    self._log(addr, paths.handle_timer(now), now)
            self.collect(now)

    def _log(self, addr, happened, now):
        for what in happened:
            self.happened["a" if addr == ADDR_A else "b"].append((round(now, 3), what))


def pair(start_at=0.0):
    ua, pa_, ub, pb_ = generate_ufrag(), generate_pwd(), generate_ufrag(), generate_pwd()
    pa, pb = PeerPaths(A, B, OPTIONS, random.Random(1)), PeerPaths(B, A, OPTIONS, random.Random(2))
    common = dict(began_at=0.0, start_at=start_at, timeout=5.0)
    pa.begin(1, local_ufrag=ua, local_pwd=pa_, remote_ufrag=ub, remote_pwd=pb_, controlling=True,
             local_candidates=[(Candidate.host(*ADDR_A), "socket")],
             remote_candidates=[Candidate.host(*ADDR_B)], **common)
    pb.begin(1, local_ufrag=ub, local_pwd=pb_, remote_ufrag=ua, remote_pwd=pa_, controlling=False,
             local_candidates=[(Candidate.host(*ADDR_B), "socket")],
             remote_candidates=[Candidate.host(*ADDR_A)], **common)
    return pa, pb


def test_both_sides_select_the_direct_pair_within_one_round_trip():
    pa, pb = pair()
    wire = Wire(pa, pb)
    wire.run(1.0)
    assert pa.direct.addr == ADDR_B and pb.direct.addr == ADDR_A
    assert pa.direct.kind == "direct"
    assert pa.ice["ice_ms"] <= 2 * ONE_WAY * 1000 + 10  # aggressive nomination: one RTT
    assert pa.outcomes[-1]["outcome"] == "success"


def test_upgrade_time_waits_for_the_first_session_packet():
    pa, pb = pair()
    Wire(pa, pb).run(1.0)
    assert pa.upgrade["upgrade_ms"] is None  # ICE checks alone do not count
    pa.on_direct_rx(("203.0.113.1", 1), 1.0)  # not the selected path
    assert pa.upgrade["upgrade_ms"] is None
    pa.on_direct_rx(ADDR_B, 1.2)
    assert pa.upgrade["upgrade_ms"] == 1200.0


def test_active_path_that_stops_answering_is_dead_within_two_seconds():
    pa, pb = pair()
    wire = Wire(pa, pb)
    wire.run(1.0)
    pa.note_activity(1.0)
    wire.cut = True
    wire.run(4.0)
    dead = [t for t, what in wire.happened["a"] if what is PathEvent.DIRECT_DEAD]
    assert dead and dead[0] - 1.0 <= 2.0
    assert pa.direct is None and pa.fallbacks == 1


def test_idle_path_is_checked_rarely_and_stays_up_while_answered():
    pa, pb = pair()
    wire = Wire(pa, pb)
    wire.run(1.0)
    before = wire.sent[ADDR_A]
    wire.run(31.0)
    assert pa.direct is not None and pb.direct is not None
    # Idle consent: about one check per 2.5 s (each answered), not two per second.
    assert 8 <= wire.sent[ADDR_A] - before <= 30
    assert not any(what is PathEvent.DIRECT_DEAD for _, what in wire.happened["a"])


def test_checks_wait_for_the_synchronised_start():
    pa, pb = pair(start_at=0.5)
    assert pa.get_timer() >= 0.5 and pb.get_timer() >= 0.5
    Wire(pa, pb).run(2.0)
    assert pa.ice["selected_at"] >= 0.5 + 2 * ONE_WAY


def test_no_answer_ends_the_attempt_at_the_timeout():
    pa, pb = pair()
    wire = Wire(pa, pb)
    wire.cut = True
    wire.run(6.0)
    assert (5.0, PathEvent.ATTEMPT_TIMEOUT) in [(round(t), w) for t, w in wire.happened["a"]]
    assert pa.outcomes[-1]["outcome"] == "timeout"


def test_wildcard_socket_offers_usable_interface_addresses():
    from macula.node import core as node_core

    interfaces = [("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("eth0", "192.168.1.2")]
    node = node_core.NodeCore(Identity.generate(), NodeOptions(gateway=("203.0.113.10", 9443)),
                              local_address=("0.0.0.0", 4242), interfaces=lambda: interfaces)
    node.observed = ("198.51.100.11", 60000)
    kinds = [(c.type, c.address, c.port) for c, via in node._local_candidates()]
    assert kinds == [("host", "192.168.1.2", 4242), ("srflx", "198.51.100.11", 60000)]
