"""IceAgent end to end: two agents back to back through a tiny in-test network, fake clock.

The network delivers each datagram after a fixed one-way delay. A host may sit behind a
NAT (endpoint-independent mapping; with `filtering`, only peers it has sent to get in) and
may own TURN allocations (datagrams sent via the allocation leave from its relayed
address; datagrams to that address arrive with that via). `block(src, dst)` drops at will.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aioice.stun import Class, Message, Method

from macula.ice import (
    Candidate,
    ConsentLost,
    Failed,
    IceAgent,
    PairHeard,
    PairSucceeded,
    SelectedPair,
    turn_via,
)
from macula.wire.stun import parse_message

Address = tuple[str, int]
PWD_A, PWD_B = "A" * 22 + "pa", "B" * 22 + "pb"


@dataclass
class Host:
    name: str
    agent: IceAgent
    address: Address
    public: Address | None = None
    filtering: bool = False
    permits: set[Address] = field(default_factory=set)
    relays: dict[str, Address] = field(default_factory=dict)
    events: list[tuple[float, object]] = field(default_factory=list)

    def of(self, kind: type) -> list[tuple[float, object]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind)]


class Net:
    def __init__(self, delay: float = 0.01) -> None:
        self.now = 0.0
        self.delay = delay
        self.hosts: list[Host] = []
        self.queue: list[tuple[float, int, Address, Address, bytes]] = []
        self.seq = itertools.count()
        self.block: Callable[[Address, Address], bool] = lambda src, dst: False
        self.sent: list[tuple[float, Address, Address, bytes, str]] = []  # incl. dropped

    def add(self, host: Host) -> Host:
        self.hosts.append(host)
        return host

    def _route_out(self, host: Host, data: bytes, dest: Address, via: str) -> None:
        if via == "socket":
            src = host.public or host.address
            if host.public is not None:
                host.permits.add(dest)
        else:
            src = host.relays[via]
        self.sent.append((self.now, src, dest, data, host.name))
        if not self.block(src, dest):
            heapq.heappush(self.queue, (self.now + self.delay, next(self.seq), src, dest, data))

    def _deliver(self, src: Address, dest: Address, data: bytes) -> None:
        for host in self.hosts:
            if host.public is None and host.address == dest or host.public == dest and (not host.filtering or src in host.permits):
                host.agent.receive(data, src, self.now, "socket")
            for via, relayed in host.relays.items():
                if relayed == dest:
                    host.agent.receive(data, src, self.now, via)

    def _collect(self) -> None:
        for host in self.hosts:
            for data, dest, via in host.agent.datagrams_to_send():
                assert via != "gateway"
                self._route_out(host, data, dest, via)
            while (event := host.agent.next_event()) is not None:
                host.events.append((self.now, event))

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> None:
        for _ in range(200_000):
            self._collect()
            if stop is not None and stop():
                return
            times = [t for h in self.hosts if (t := h.agent.get_timer()) is not None]
            if self.queue:
                times.append(self.queue[0][0])
            if not times or min(times) > until:
                self.now = until
                return
            self.now = max(self.now, min(times))
            while self.queue and self.queue[0][0] <= self.now:
                _, _, src, dest, data = heapq.heappop(self.queue)
                self._deliver(src, dest, data)
            for host in self.hosts:
                timer = host.agent.get_timer()
                if timer is not None and timer <= self.now:
                    host.agent.handle_timer(self.now)
        raise AssertionError("the simulation did not settle")

    def requests(self, sender: str) -> list[tuple[float, Message]]:
        out = []
        for t, _, _, data, name in self.sent:
            message = parse_message(data)
            if name == sender and message.message_class == Class.REQUEST:
                out.append((t, message))
        return out

    def errors(self, code: int) -> int:
        return sum(1 for *_, data, _ in self.sent
                   if (m := parse_message(data)).message_class == Class.ERROR
                   and m.error_code == code)


def agents(controlling_a: bool = True, controlling_b: bool = False, tie_a: int = 5,
           tie_b: int = 9, **kwargs) -> tuple[IceAgent, IceAgent]:
    # Seeded jitter: every run of a test is the same run.
    a = IceAgent("ufA1", PWD_A, controlling=controlling_a, tie_breaker=tie_a, now=0.0,
                 **{"rng": random.Random(1), **kwargs})
    b = IceAgent("ufB1", PWD_B, controlling=controlling_b, tie_breaker=tie_b, now=0.0,
                 **{"rng": random.Random(2), **kwargs})
    return a, b


def credentials(a: IceAgent, b: IceAgent) -> None:
    a.set_remote_credentials(b.local_ufrag, b.local_pwd)
    b.set_remote_credentials(a.local_ufrag, a.local_pwd)


def exchange(a: IceAgent, b: IceAgent, *, end: bool = True) -> None:
    """Non-trickle signalling: credentials and every candidate, then end-of-candidates."""
    credentials(a, b)
    for c in a.local_candidates:
        b.add_remote_candidate(c)
    for c in b.local_candidates:
        a.add_remote_candidate(c)
    if end:
        for agent in (a, b):
            agent.end_of_local_candidates()
            agent.end_of_remote_candidates()


def both_selected(*hosts: Host) -> Callable[[], bool]:
    return lambda: all(h.of(SelectedPair) for h in hosts)


def lan_pair(**kwargs) -> tuple[Net, Host, Host]:
    net = Net(delay=0.01)
    a, b = agents(**kwargs)
    ha = net.add(Host("A", a, ("10.0.0.1", 1000)))
    hb = net.add(Host("B", b, ("10.0.0.2", 2000)))
    a.add_local_candidate(Candidate.host(*ha.address))
    b.add_local_candidate(Candidate.host(*hb.address))
    return net, ha, hb


def assert_same_path(ha: Host, hb: Host) -> None:
    pa, pb = ha.agent.selected_pair, hb.agent.selected_pair
    assert pa is not None and pb is not None
    assert pa.nominated and pb.nominated


# ---------------------------------------------------------------------- happy paths
def test_host_pair_selected_on_both_sides_with_aggressive_nomination():
    net, ha, hb = lan_pair()
    exchange(ha.agent, hb.agent)
    net.run(1.0, stop=both_selected(ha, hb))
    (ta, sa), = ha.of(SelectedPair)
    (tb, sb), = hb.of(SelectedPair)
    # One round trip (2 x 10 ms) each: the check that succeeds already carried USE-CANDIDATE.
    assert ta == pytest.approx(0.02) and tb == pytest.approx(0.02)
    assert sa.pair.local.addr == ("10.0.0.1", 1000) and sa.pair.remote.addr == ("10.0.0.2", 2000)
    assert sb.pair.local.addr == ("10.0.0.2", 2000) and sb.pair.remote.addr == ("10.0.0.1", 1000)
    assert ha.of(PairSucceeded) and hb.of(PairSucceeded)
    assert ha.agent.state == hb.agent.state == "completed"
    assert_same_path(ha, hb)
    first = net.requests("A")[0][1]
    assert first.attributes["USERNAME"] == "ufB1:ufA1"
    assert "USE-CANDIDATE" in first.attributes and first.attributes["ICE-CONTROLLING"] == 5
    assert first.check_message_integrity(PWD_B.encode())


def test_the_peers_first_check_is_reported_half_a_round_trip_before_selection():
    """PairHeard: the node copies relayed packets onto that pair until one is selected."""
    net, ha, hb = lan_pair()
    exchange(ha.agent, hb.agent)
    net.run(1.0, stop=both_selected(ha, hb))
    for host, peer in ((ha, hb), (hb, ha)):
        (t_heard, heard), = host.of(PairHeard)  # once per generation, not per check
        (t_selected, _), = host.of(SelectedPair)
        assert heard.pair.remote.addr == peer.address
        assert t_heard == pytest.approx(0.01) and t_selected == pytest.approx(0.02)
    # An ICE restart is a new generation: its first check is reported again, once.
    hb.agent.restart("ufB2", "B" * 20 + "b2", now=net.now)
    ha.agent.restart("ufA2", "A" * 20 + "a2", now=net.now)
    exchange(ha.agent, hb.agent)
    net.run(net.now + 1.0, stop=lambda: len(ha.of(SelectedPair)) == 2)
    assert len(ha.of(PairHeard)) == len(hb.of(PairHeard)) == 2


def test_regular_nomination_takes_one_more_round_trip():
    net, ha, hb = lan_pair(aggressive_nomination=False)
    exchange(ha.agent, hb.agent)
    net.run(1.0, stop=both_selected(ha, hb))
    (ta, _), = ha.of(SelectedPair)
    (tb, _), = hb.of(SelectedPair)
    # check + answer (20 ms), then the nominating check reaches B (30 ms), answer (40 ms).
    assert tb == pytest.approx(0.03) and ta == pytest.approx(0.04)
    with_use = [m for _, m in net.requests("A") if "USE-CANDIDATE" in m.attributes]
    assert len(with_use) == 1
    assert_same_path(ha, hb)


def test_the_first_checks_go_together_then_ta_paces_them():
    from macula.ice.agent import INITIAL_BURST

    net = Net(delay=0.01)
    a, b = agents(ta=0.005)
    ha = net.add(Host("A", a, ("10.0.0.1", 1000)))
    net.add(Host("B", b, ("10.0.0.2", 2000)))
    a.add_local_candidate(Candidate.host(*ha.address))
    for i in range(6):  # six addresses for B, only the first one is real
        b.add_local_candidate(Candidate.host(f"10.0.0.{2 + i}", 2000, local_preference=100 - i))
    exchange(a, b)
    net.run(0.009)
    times = [t for t, _ in net.requests("A")]
    # The pair that works across NATs often sorts behind ones that only work on a LAN:
    # the first INITIAL_BURST checks leave at once, the rest Ta apart.
    assert times == pytest.approx([0.0] * INITIAL_BURST + [0.005])


def test_best_reachable_pair_wins_among_several():
    net = Net(delay=0.01)
    a, b = agents()
    ha = net.add(Host("A", a, ("10.0.0.1", 1000)))
    hb = net.add(Host("B", b, ("10.0.0.2", 2000)))
    a.add_local_candidate(Candidate.host(*ha.address))
    # B's best-ranked address is on a network A cannot reach.
    b.add_local_candidate(Candidate.host("192.168.99.2", 2000, local_preference=65535))
    b.add_local_candidate(Candidate.host(*hb.address, local_preference=100))
    net.block = lambda src, dst: dst[0] == "192.168.99.2"
    exchange(a, b)
    net.run(5.0, stop=both_selected(ha, hb))
    assert a.selected_pair.remote.addr == hb.address
    assert b.selected_pair.local.addr == hb.address


# ---------------------------------------------------------------------- trickle
def test_trickle_remote_candidate_arrives_late():
    net, ha, hb = lan_pair()
    a, b = ha.agent, hb.agent
    credentials(a, b)
    b.add_remote_candidate(a.local_candidates[0])  # A learns of B's candidate only later
    net.run(0.3, stop=both_selected(ha, hb))
    # B's check taught A a peer-reflexive candidate; both selected before the signal came.
    assert ha.of(SelectedPair) and hb.of(SelectedPair)
    assert a.selected_pair.remote.type == "prflx"
    assert a.add_remote_candidate(b.local_candidates[0])  # replaces the prflx in place
    assert a.selected_pair.remote.type == "host"
    assert [c.type for c in a.remote_candidates] == ["host"]


def test_trickle_credentials_arrive_late():
    net, ha, hb = lan_pair()
    a, b = ha.agent, hb.agent
    b.set_remote_credentials(a.local_ufrag, a.local_pwd)
    b.add_remote_candidate(a.local_candidates[0])
    net.run(0.1)
    # A answered B's checks without knowing B's credentials, but could not check back.
    assert not net.requests("A") and hb.of(PairSucceeded) and not ha.of(SelectedPair)
    a.set_remote_credentials(b.local_ufrag, b.local_pwd)
    a.add_remote_candidate(b.local_candidates[0])
    net.run(1.0, stop=both_selected(ha, hb))
    assert ha.of(SelectedPair)[0][0] == pytest.approx(0.12)
    assert hb.of(SelectedPair)[0][0] == pytest.approx(0.11)  # A's first check: USE-CANDIDATE


# ---------------------------------------------------------------------- NATs
def nat_pair(offer_srflx: bool, **kwargs) -> tuple[Net, Host, Host]:
    net = Net(delay=0.01)
    a, b = agents(**kwargs)
    ha = net.add(Host("A", a, ("198.51.100.1", 1000)))
    hb = net.add(Host("B", b, ("192.168.1.2", 2000), public=("203.0.113.2", 62000),
                      filtering=True))
    a.add_local_candidate(Candidate.host(*ha.address))
    b.add_local_candidate(Candidate.host(*hb.address))
    if offer_srflx:
        b.add_local_candidate(Candidate.server_reflexive(
            *hb.public, base=hb.address, server="192.0.2.53"))
    exchange(a, b)
    return net, ha, hb


def test_server_reflexive_through_a_filtering_nat():
    net, ha, hb = nat_pair(offer_srflx=True)
    net.run(5.0, stop=both_selected(ha, hb))
    a, b = ha.agent, hb.agent
    assert a.selected_pair.remote.type == "srflx" and a.selected_pair.remote.addr == hb.public
    # B's valid pair names the candidate A saw (its srflx), but leaves from the socket.
    assert b.selected_pair.local.type == "srflx" and b.selected_pair.via == "socket"
    assert ha.of(SelectedPair)[0][0] < 0.1


def test_peer_reflexive_discovery_both_ways():
    net, ha, hb = nat_pair(offer_srflx=False)
    net.run(5.0, stop=both_selected(ha, hb))
    a, b = ha.agent, hb.agent
    # A learned B's mapped address from B's request (7.3.1.3) ...
    assert a.selected_pair.remote.type == "prflx" and a.selected_pair.remote.addr == hb.public
    # ... and B learned it from A's answer (7.2.5.3.1): a local prflx based on B's host.
    local = b.selected_pair.local
    assert local.type == "prflx" and local.addr == hb.public and local.base == hb.address
    assert local.priority == net.requests("B")[0][1].attributes["PRIORITY"]


def test_turn_relay_candidate_checks_go_via_the_allocation():
    net = Net(delay=0.01)
    a, b = agents()
    ha = net.add(Host("A", a, ("10.0.0.1", 1000)))
    hb = net.add(Host("B", b, ("10.9.0.2", 2000)))
    relay = Candidate.turn_relay("198.51.100.50", 40000, server="198.51.100.50",
                                 mapped=("10.0.0.1", 1000))
    ha.relays[turn_via(relay)] = relay.addr
    a.add_local_candidate(Candidate.host(*ha.address))
    assert a.add_local_candidate(relay)
    b.add_local_candidate(Candidate.host(*hb.address))
    # Direct traffic between the hosts is blocked: only the relay gets through.
    net.block = lambda src, dst: {src[0], dst[0]} == {"10.0.0.1", "10.9.0.2"}
    exchange(a, b)
    net.run(5.0, stop=both_selected(ha, hb))
    assert a.selected_pair.local == relay and a.selected_pair.via == "turn:198.51.100.50:40000"
    assert b.selected_pair.remote.addr == relay.addr


def test_candidate_types_config_filters_gathered_candidates():
    a = IceAgent("ufA1", PWD_A, controlling=True, tie_breaker=1, now=0.0,
                 candidate_types=["local", "stun"])
    relay = Candidate.turn_relay("198.51.100.50", 40000, server="198.51.100.50")
    assert not a.add_local_candidate(relay)
    assert not a.add_local_candidate(Candidate.gateway_relay("192.0.2.1", 9443))
    assert a.add_local_candidate(Candidate.host("10.0.0.1", 1))
    assert not a.add_local_candidate(Candidate.host("10.0.0.1", 1))  # duplicate


# ---------------------------------------------------------------------- roles
def test_role_conflict_both_controlling_resolved_by_487():
    net, ha, hb = lan_pair(controlling_a=True, controlling_b=True, tie_a=5, tie_b=9)
    exchange(ha.agent, hb.agent)
    net.run(5.0, stop=both_selected(ha, hb))
    assert net.errors(487) >= 1
    assert hb.agent.controlling and not ha.agent.controlling  # the larger tie-breaker wins
    assert ha.agent.selected_pair.remote.addr == hb.address
    assert hb.agent.selected_pair.remote.addr == ha.address
    assert_same_path(ha, hb)


def test_role_conflict_both_controlled():
    net, ha, hb = lan_pair(controlling_a=False, controlling_b=False, tie_a=5, tie_b=9)
    exchange(ha.agent, hb.agent)
    net.run(5.0, stop=both_selected(ha, hb))
    assert hb.agent.controlling and not ha.agent.controlling
    assert_same_path(ha, hb)


# ---------------------------------------------------------------------- failures
def test_retransmissions_then_timeout():
    net, ha, hb = lan_pair(check_timeout=1.0)
    net.block = lambda src, dst: True
    ha.agent.add_local_candidate(Candidate.gateway_relay("192.0.2.1", 9443))
    hb.agent.add_local_candidate(Candidate.gateway_relay("192.0.2.1", 9443))
    exchange(ha.agent, hb.agent, end=False)
    net.run(2.0)
    # RTO 50 ms doubling: sends at 0, 50, 150, 350, 750 ms, then the 1 s deadline.
    times = [t for t, _ in net.requests("A")]
    assert times == pytest.approx([0.0, 0.05, 0.15, 0.35, 0.75])
    assert len({m.transaction_id for _, m in net.requests("A")}) == 1
    (t, failed), = ha.of(Failed)
    assert t == pytest.approx(1.0) and failed.reason == "timeout"
    assert failed.fallback is not None and failed.fallback.via == "gateway"
    assert failed.fallback.local.kind == failed.fallback.remote.kind == "gateway"
    assert ha.agent.state == "failed" and ha.agent.get_timer() is None


def test_all_checks_failed_ends_early_after_end_of_candidates():
    net, ha, hb = lan_pair(check_timeout=10.0)
    net.block = lambda src, dst: True
    exchange(ha.agent, hb.agent, end=True)
    net.run(12.0)
    (t, failed), = ha.of(Failed)
    # 7 requests over 3.15 s, then 16 x RTO: the transaction times out at 3.95 s.
    assert failed.reason == "failed" and t == pytest.approx(3.95)
    assert failed.fallback is None
    assert len(net.requests("A")) == 7


def test_lost_checks_are_retransmitted():
    net, ha, hb = lan_pair()
    dropped = []

    def lossy(src, dst):
        if len(dropped) < 4:
            dropped.append((src, dst))
            return True
        return False

    net.block = lossy
    exchange(ha.agent, hb.agent)
    net.run(5.0, stop=both_selected(ha, hb))
    assert ha.of(SelectedPair)[0][0] < 0.3


# ---------------------------------------------------------------------- consent
def test_consent_keeps_the_pair_while_answers_come():
    net, ha, hb = lan_pair(consent_interval=0.5, consent_timeout=2.0)
    exchange(ha.agent, hb.agent)
    net.run(10.0)
    assert not ha.of(ConsentLost) and not hb.of(ConsentLost)
    consent_checks = [t for t, _ in net.requests("A") if t > 0.1]
    assert 14 <= len(consent_checks) <= 26  # ~every 0.5 s (randomised 0.4-0.6 s)
    assert ha.agent.state == "completed"


def test_consent_lost_when_the_path_dies():
    net, ha, hb = lan_pair(consent_interval=0.5, consent_timeout=2.0)
    exchange(ha.agent, hb.agent)
    net.run(1.0)
    net.block = lambda src, dst: True
    net.run(10.0)
    (t, lost), = ha.of(ConsentLost)
    # Lost consent_timeout (2 s) after the last answer; an answer to a check sent just
    # before the block (at 1.0) can still land up to one round trip later.
    assert 2.0 < t <= 3.0 + 0.05
    assert lost.pair is ha.of(SelectedPair)[0][1].pair
    assert ha.agent.selected_pair is None and ha.agent.state == "disconnected"
    assert hb.of(ConsentLost)


def test_urgent_consent_finds_a_dead_path_within_its_window():
    """The node saw its traffic go unanswered: consent is checked at once and every
    interval, and lost when the window passes without an answer (not after the 2 s)."""
    net, ha, hb = lan_pair(consent_interval=0.5, consent_timeout=2.0)
    exchange(ha.agent, hb.agent)
    net.run(1.0)
    net.block = lambda src, dst: True
    sent_before = len(net.requests("A"))
    ha.agent.verify_consent_now(net.now, window=0.3, interval=0.1)
    net.run(net.now + 1.0)
    (t, _lost), = ha.of(ConsentLost)
    assert 1.0 + 0.3 - 1e-6 <= t <= 1.0 + 0.3 + 0.01
    assert len(net.requests("A")) - sent_before >= 3  # at once, then every 0.1 s


def test_urgent_consent_answered_keeps_the_pair_and_the_normal_pace():
    net, ha, hb = lan_pair(consent_interval=0.5, consent_timeout=2.0)
    exchange(ha.agent, hb.agent)
    net.run(1.0)
    ha.agent.verify_consent_now(net.now, window=0.3, interval=0.1)
    net.run(6.0)
    assert not ha.of(ConsentLost) and ha.agent.state == "completed"
    checks = [t for t, _ in net.requests("A") if t > 1.5]
    assert len(checks) <= 12  # back to ~every 0.5 s once answered


# ---------------------------------------------------------------------- restart
def test_restart_keeps_the_old_pair_until_a_new_one_is_selected():
    net, ha, hb = lan_pair(consent_interval=0.2, consent_timeout=1.0)
    a, b = ha.agent, hb.agent
    exchange(a, b)
    net.run(0.5)
    old_a, old_b = a.selected_pair, b.selected_pair
    assert old_a is not None and old_b is not None
    a.restart("ufA2", "C" * 22 + "pa", now=net.now)
    b.restart("ufB2", "D" * 22 + "pb", now=net.now)
    assert a.state == "new"
    # The new credentials and candidates take 1.5 s to arrive: longer than consent_timeout,
    # so the old pair survives only because its consent checks go on.
    net.run(2.0)
    assert a.selected_pair is old_a and b.selected_pair is old_b
    assert not ha.of(ConsentLost) and not hb.of(ConsentLost)
    exchange(a, b)
    net.run(4.0, stop=lambda: len(ha.of(SelectedPair)) == 2 and len(hb.of(SelectedPair)) == 2)
    assert a.selected_pair is not old_a and b.selected_pair is not old_b
    assert a.selected_pair.remote.addr == hb.address
    # An old-generation consent check may still have left just before the new pair was
    # selected; after a consent round on the new pair, only the new credentials are used.
    net.run(1.0)
    assert net.requests("A")[-1][1].attributes["USERNAME"] == "ufB2:ufA2"
    # The old credentials are no longer answered.
    stale = Message(Method.BINDING, Class.REQUEST, attributes={
        "USERNAME": "ufA1:ufB1", "PRIORITY": 1, "ICE-CONTROLLED": 9})
    stale.add_message_integrity(PWD_A.encode())
    assert not a.receive(bytes(stale), hb.address, net.now)
    net.run(6.0)
    assert not ha.of(ConsentLost) and not hb.of(ConsentLost)


def test_remote_credentials_cannot_change_without_restart():
    a, _ = agents()
    a.set_remote_credentials("ufB1", PWD_B)
    a.set_remote_credentials("ufB1", PWD_B)  # idempotent
    with pytest.raises(ValueError):
        a.set_remote_credentials("ufB9", PWD_B)
    with pytest.raises(ValueError):
        IceAgent("ab", PWD_A, controlling=True, tie_breaker=1, now=0.0)


def test_gateway_relay_candidates_are_never_checked():
    net, ha, hb = lan_pair()
    a, b = ha.agent, hb.agent
    gw = Candidate.gateway_relay("192.0.2.1", 9443)
    assert a.add_local_candidate(gw) and b.add_local_candidate(gw)
    exchange(a, b)
    assert a.gateway_pair is not None and a.gateway_pair.via == "gateway"
    assert all(p.local.kind != "gateway" for p in a.checklist.pairs)
    net.run(1.0, stop=both_selected(ha, hb))
    assert all(dst != gw.addr for _, _, dst, _, _ in net.sent)


def relay_race(**kwargs) -> tuple[Net, Host, Host]:
    """A has host + TURN relay; the first packet each way between the hosts is lost, so the
    (lower-priority) relay pair works first and the host pair a retransmission later."""
    net = Net(delay=0.01)
    a, b = agents(**kwargs)
    ha = net.add(Host("A", a, ("10.0.0.1", 1000)))
    hb = net.add(Host("B", b, ("10.0.0.2", 2000)))
    relay = Candidate.turn_relay("198.51.100.50", 40000, server="198.51.100.50")
    ha.relays[turn_via(relay)] = relay.addr
    a.add_local_candidate(Candidate.host(*ha.address))
    a.add_local_candidate(relay)
    b.add_local_candidate(Candidate.host(*hb.address))
    lost: set[tuple[Address, Address]] = set()

    def first_direct_packets_lost(src: Address, dst: Address) -> bool:
        if {src[0], dst[0]} == {"10.0.0.1", "10.0.0.2"} and (src, dst) not in lost:
            lost.add((src, dst))
            return True
        return False

    net.block = first_direct_packets_lost
    exchange(a, b)
    return net, ha, hb


def test_aggressive_nomination_upgrades_to_a_better_pair_that_works_later():
    net, ha, hb = relay_race()
    net.run(1.0)
    for host in (ha, hb):
        selected = host.of(SelectedPair)
        kinds = [({e.pair.local.kind, e.pair.remote.kind}) for _, e in selected]
        assert kinds == [{"host", "turn"}, {"host"}]
        prios = [e.pair.priority(host.agent.controlling) for _, e in selected]
        assert prios[0] < prios[1]
        assert host.agent.selected_pair is selected[-1][1].pair
    # Both checks left at once (the initial burst): the relay pair's answer is back at 20 ms.
    assert ha.of(SelectedPair)[0][0] == pytest.approx(0.02)


def test_regular_nomination_waits_for_the_better_pair():
    net, ha, hb = relay_race(aggressive_nomination=False, nomination_wait=0.2)
    net.run(1.0)
    (ta, sa), = ha.of(SelectedPair)
    (tb, sb), = hb.of(SelectedPair)
    assert sa.pair.local.kind == "host" and sb.pair.remote.kind == "host"
    # The relay pair was valid at 25 ms; the host pair at 70 ms beat the 225 ms deadline.
    assert len(ha.of(PairSucceeded)) == 2
    assert ta == pytest.approx(0.09) and tb == pytest.approx(0.08)


def test_after_failure_checks_are_no_longer_answered():
    net, ha, hb = lan_pair(check_timeout=0.5)
    a, b = ha.agent, hb.agent
    credentials(a, b)
    a.add_remote_candidate(b.local_candidates[0])
    net.block = lambda src, dst: True
    net.run(1.0)
    assert ha.of(Failed)
    b.add_remote_candidate(a.local_candidates[0])
    net.block = lambda src, dst: False
    net.run(2.0)
    assert not hb.of(SelectedPair) and not hb.of(PairSucceeded)
    assert all(name == "B" for t, _, _, _, name in net.sent if t > 1.0)


def test_a_pair_that_succeeds_while_queued_is_not_checked_again():
    a = IceAgent("ufA1", PWD_A, controlling=True, tie_breaker=5, now=0.0, ta=1.0,
                 initial_burst=1)
    a.add_local_candidate(Candidate.host("10.0.0.1", 1000))
    a.set_remote_credentials("ufB1", PWD_B)
    a.add_remote_candidate(Candidate.host("10.0.0.2", 2000))
    a.handle_timer(0.0)
    (check, dest, _), = a.datagrams_to_send()
    # The peer's own check arrives: our running check stops retransmitting and the pair
    # is queued for a triggered check, which Ta = 1 s holds back ...
    peer = Message(Method.BINDING, Class.REQUEST, attributes={
        "USERNAME": "ufA1:ufB1", "PRIORITY": 1, "ICE-CONTROLLED": 9})
    peer.add_message_integrity(PWD_A.encode())
    assert a.receive(bytes(peer), dest, 0.01)
    assert len(a.datagrams_to_send()) == 1  # just the answer
    # ... and the first check's answer still counts.
    answer = Message(Method.BINDING, Class.RESPONSE, parse_message(check).transaction_id,
                     {"XOR-MAPPED-ADDRESS": ("10.0.0.1", 1000)})
    answer.add_message_integrity(PWD_B.encode())
    assert a.receive(bytes(answer), dest, 0.02)
    pair = a.checklist.pairs[0]
    assert pair.state.value == "succeeded" and not a.checklist.triggered
    a.handle_timer(1.0)
    assert a.datagrams_to_send() == [] and pair.state.value == "succeeded"


def test_from_config_reads_the_ice_section():
    from macula.config import Ice

    agent = IceAgent.from_config(Ice(check_timeout=2500, candidate_types=("stun", "local")),
                                 "ufA1", PWD_A, controlling=True, tie_breaker=1, now=100.0)
    assert agent.get_timer() == pytest.approx(102.5)
    assert not agent.add_local_candidate(Candidate.gateway_relay("192.0.2.1", 9443))
