"""RFC 5780 NAT behaviour discovery: the responder, the sans-IO probe, and a loopback run."""

from __future__ import annotations

import asyncio
import heapq
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.errors import MaculaError
from macula.nat import BehaviorProbe, NatBehavior, StunResponder, detect_nat_behavior, run_responder
from macula.nat.stun_responder import AMPLIFICATION_FLOOR
from macula.net.endpoint import Address
from macula.net.udp import UdpEndpoint, open_udp_endpoint
from macula.wire.stun import (
    Class,
    Message,
    Method,
    binding_error,
    binding_request,
    binding_success,
    parse_message,
)

SERVER4: list[Address] = [
    ("203.0.113.10", 3478),
    ("203.0.113.10", 3479),
    ("203.0.113.20", 3478),
    ("203.0.113.20", 3479),
]
SERVER2 = SERVER4[:2]
CLIENT: Address = ("198.51.100.7", 40000)


def raw_request(attrs: list[tuple[int, bytes]], msg_type: int = 0x0001) -> bytes:
    body = b"".join(struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4) for t, v in attrs)
    return struct.pack("!HHI12s", msg_type, len(body), 0x2112A442, bytes(12)) + body


# -- the responder ---------------------------------------------------------------------------


def answer(responder: StunResponder, data: bytes, index: int) -> tuple[Message, int]:
    out = responder.handle(data, CLIENT, index)
    assert out is not None
    return parse_message(out[0]), out[1]


def test_responder_plain_binding_four_sockets() -> None:
    responder = StunResponder(SERVER4)
    for index in range(4):
        msg, send_index = answer(responder, binding_request(), index)
        assert send_index == index
        assert msg.message_class == Class.RESPONSE
        assert msg.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
        assert msg.attributes["RESPONSE-ORIGIN"] == SERVER4[index]
        # OTHER-ADDRESS: the other IP and the other port, seen from the receiving socket.
        assert msg.attributes["OTHER-ADDRESS"] == SERVER4[3 - index]
    assert (responder.requests, responder.responses, responder.errors) == (4, 4, 0)


@pytest.mark.parametrize(
    "received, change_ip, change_port, expected",
    [
        (0, False, True, 1),
        (0, True, False, 2),
        (0, True, True, 3),
        (1, False, True, 0),
        (3, True, False, 1),
        (3, True, True, 0),
        (2, False, True, 3),
    ],
)
def test_responder_change_request(received: int, change_ip: bool, change_port: bool, expected: int) -> None:
    responder = StunResponder(SERVER4)
    request = binding_request(change_ip=change_ip, change_port=change_port)
    msg, send_index = answer(responder, request, received)
    assert send_index == expected
    assert msg.attributes["RESPONSE-ORIGIN"] == SERVER4[expected]
    assert msg.attributes["XOR-MAPPED-ADDRESS"] == CLIENT


def test_responder_two_sockets() -> None:
    responder = StunResponder(SERVER2)
    msg, index = answer(responder, binding_request(), 0)
    assert index == 0 and "OTHER-ADDRESS" not in msg.attributes  # no alternate IP: RFC 5780
    msg, index = answer(responder, binding_request(change_port=True), 0)
    assert index == 1 and msg.attributes["RESPONSE-ORIGIN"] == SERVER2[1]
    for flags in ({"change_ip": True}, {"change_ip": True, "change_port": True}):
        msg, index = answer(responder, binding_request(**flags), 1)
        assert index == 1 and msg.message_class == Class.ERROR and msg.error_code == 400
    assert (responder.requests, responder.responses, responder.errors) == (4, 4, 2)


def test_responder_unknown_attribute_gets_420() -> None:
    responder = StunResponder(SERVER4)
    msg, index = answer(responder, raw_request([(0x7F00, b"\x12\x34\x00\x00")]), 2)
    assert index == 2 and msg.error_code == 420
    assert msg.attributes["UNKNOWN-ATTRIBUTES"] == (0x7F00,)
    assert responder.errors == 1


def test_responder_answers_another_port_of_the_requesters_own_address() -> None:
    """RFC 5780 RESPONSE-PORT (the binding-lifetime test): same IP, the port asked for,
    from the socket CHANGE-REQUEST names; never to another address."""
    responder = StunResponder(SERVER4)
    out = responder.handle(binding_request(change_port=True, response_port=40000), CLIENT, 0)
    assert out is not None and out.socket == 1
    assert out.destination(CLIENT) == (CLIENT[0], 40000)
    plain = responder.handle(binding_request(), CLIENT, 0)
    assert plain is not None and plain.destination(CLIENT) == CLIENT
    bad = raw_request([(0x0027, b"\x00\x00")])  # two bytes, not four
    assert responder.handle(bad, CLIENT, 0) is None and responder.malformed == 1


def test_responder_ignores_what_needs_no_answer() -> None:
    responder = StunResponder(SERVER4)
    request = parse_message(binding_request())
    indication = raw_request([], msg_type=0x0011)
    stray_response = binding_success(request, CLIENT)
    stray_error = binding_error(request, 400, "no")
    for data in (indication, stray_response, stray_error):
        assert responder.handle(data, CLIENT, 0) is None
    assert responder.ignored == 3 and responder.responses == 0 and responder.malformed == 0
    # A well-formed request of another method: 400, not silence.
    msg, _ = answer(responder, raw_request([(0x0019, b"\x11\x00\x00\x00")], msg_type=0x0003), 0)
    assert msg.error_code == 400 and msg.message_method == Method.ALLOCATE


def test_responder_counts_malformed_and_never_raises() -> None:
    responder = StunResponder(SERVER4)
    good = binding_request()
    bad = [b"", b"\x00", b"\x40hello quic", good[:-1], good[:-1] + bytes([good[-1] ^ 1]), good + b"\x00" * 4]
    for data in bad:
        assert responder.handle(data, CLIENT, 1) is None
    assert responder.malformed == len(bad) and responder.requests == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 3))
def test_responder_fuzz(data: bytes, index: int) -> None:
    responder = StunResponder(SERVER4)
    # Raw bytes, and the same bytes behind a plausible header to get past the first checks.
    for candidate in (data, b"\x00\x01" + data[:2] + b"\x21\x12\xa4\x42" + data[2:]):
        out = responder.handle(candidate, CLIENT, index)
        assert out is None or 0 <= out[1] < 4
    assert responder.malformed + responder.requests + responder.ignored == 2


@settings(max_examples=200, deadline=None)
@given(
    client=st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
    flags=st.integers(0, 3),
    unknown=st.lists(st.integers(0x0026, 0x7FFF), max_size=5),  # all unknown to aioice
    index=st.integers(0, 3),
)
def test_responder_amplification_bound(client, flags, unknown, index) -> None:  # type: ignore[no-untyped-def]
    # The smallest requests that draw each kind of answer (IPv6 client = largest answer).
    responder = StunResponder(
        [("2001:db8::10", 3478), ("2001:db8::10", 3479), ("2001:db8::20", 3478), ("2001:db8::20", 3479)]
    )
    attrs = [(0x0003, struct.pack("!I", flags * 2))] if flags else []
    attrs += [(t, b"") for t in unknown]
    request = raw_request(attrs)
    out = responder.handle(request, client, index)
    if out is not None:
        assert len(out[0]) <= max(len(request), AMPLIFICATION_FLOOR)
        assert len(out[0]) <= 100  # XOR-MAPPED + RESPONSE-ORIGIN + OTHER-ADDRESS (IPv6) + FP


def test_responder_rejects_bad_layouts() -> None:
    with pytest.raises(ValueError):
        StunResponder(SERVER4[:1])
    with pytest.raises(ValueError):
        StunResponder([SERVER4[0], SERVER4[2]])  # "port 2" on another IP
    with pytest.raises(ValueError):
        StunResponder([SERVER4[0], SERVER4[1], ("203.0.113.20", 1), ("203.0.113.20", 2)])
    with pytest.raises(MaculaError):  # no such socket
        StunResponder(SERVER2).handle(binding_request(), CLIENT, 2)


# -- the probe, on a simulated network with a fake clock ------------------------------------

LAN: Address = ("192.168.1.2", 5000)
WAN_IP = "198.51.100.10"
OPEN_HOST: Address = ("198.51.100.99", 5000)


class FakeNat:
    """A NAT as RFC 4787 describes it: mapping, filtering, hairpinning, port allocation."""

    def __init__(self, mapping: str, filtering: str, *, hairpin: bool = False, allocation: str = "preserving") -> None:
        self.mapping, self.filtering, self.hairpin, self.allocation = mapping, filtering, hairpin, allocation
        self.ports: dict[tuple[Any, ...], int] = {}
        self.permissions: dict[int, set[Address]] = {}
        self.next_port = 50000
        self.rng = random.Random(7)

    def outbound(self, dst: Address) -> Address:
        key: tuple[Any, ...] = {"eim": (), "adm": (dst[0],), "apdm": dst}[self.mapping]
        if key not in self.ports:
            self.ports[key] = self._allocate()
        port = self.ports[key]
        self.permissions.setdefault(port, set()).add(dst)
        return (WAN_IP, port)

    def _allocate(self) -> int:
        used = set(self.ports.values())
        if self.allocation == "preserving" and LAN[1] not in used:
            return LAN[1]
        if self.allocation == "random":
            return self.rng.choice([p for p in range(20000, 60000, 7) if p not in used])
        self.next_port += 1
        return self.next_port

    def inbound_ok(self, src: Address, port: int) -> bool:
        allowed = self.permissions.get(port)
        if not allowed:
            return False
        if self.filtering == "eif":
            return True
        if self.filtering == "adf":
            return any(a[0] == src[0] for a in allowed)
        return src in allowed


Handler = Callable[[bytes, Address, int], "tuple[bytes, int] | None"]


class Sim:
    """One client probe, an optional NAT, and a STUN server, on a virtual clock."""

    def __init__(
        self,
        *,
        nat: FakeNat | None = None,
        server: list[Address] = SERVER4,
        latency: float = 0.005,
        blackhole: bool = False,
        drop_first: int = 0,
        handler: Handler | None = None,
        **probe_args: Any,
    ) -> None:
        self.now = 0.0
        self.nat, self.server, self.latency = nat, server, latency
        self.blackhole, self.drop_first = blackhole, drop_first
        self.responder = StunResponder(server)
        self.handler: Handler = handler or self.responder.handle
        self.local = LAN if nat else OPEN_HOST
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.sent: list[tuple[float, bytes, Address]] = []
        probe_args.setdefault("local_address", self.local)
        self.probe = BehaviorProbe(server[0], self.now, **probe_args)

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (self.now + delay, self.seq, fn))

    def flush(self) -> None:
        for data, dst in self.probe.datagrams_to_send(0.0):
            self.sent.append((self.now, data, dst))
            self.client_send(data, dst)

    def client_send(self, data: bytes, dst: Address) -> None:
        if self.blackhole:
            return
        src = self.nat.outbound(dst) if self.nat else self.local
        if dst in self.server:
            if self.drop_first > 0:
                self.drop_first -= 1
                return
            index = self.server.index(dst)
            self.at(self.latency, lambda: self.server_receive(data, src, index))
        elif self.nat and dst[0] == WAN_IP and self.nat.hairpin:
            self.at(0.001, lambda: self.client_receive(data, src, dst))

    def server_receive(self, data: bytes, src: Address, index: int) -> None:
        out = self.handler(data, src, index)
        if out is not None:
            origin = self.server[out[1]]
            self.at(self.latency, lambda: self.client_receive(out[0], origin, src))

    def client_receive(self, data: bytes, src: Address, dst: Address) -> None:
        if self.nat and not self.nat.inbound_ok(src, dst[1]):
            return
        self.probe.receive_datagram(data, src, self.now)

    def run(self) -> NatBehavior:
        self.flush()
        for _ in range(10_000):
            if self.probe.result is not None:
                return self.probe.result
            timer = self.probe.get_timer()
            assert timer is not None
            if self.events and self.events[0][0] <= timer:
                self.now, _, fn = heapq.heappop(self.events)
                fn()
            else:
                self.now = timer
                self.probe.handle_timer(self.now)
            self.flush()
        raise AssertionError("probe never finished")

    def send_times(self, dst: Address, **flags: bool) -> list[float]:
        out = []
        for t, data, d in self.sent:
            change = parse_message(data).attributes.get("CHANGE-REQUEST", 0)
            want = (4 if flags.get("change_ip") else 0) | (2 if flags.get("change_port") else 0)
            if d == dst and change == want:
                out.append(round(t, 6))
        return out


@pytest.mark.parametrize(
    "mapping, filtering, nat_type",
    [
        ("eim", "eif", "full_cone"),
        ("eim", "adf", "restricted_cone"),
        ("eim", "apdf", "port_restricted"),
        ("apdm", "apdf", "symmetric"),
        ("apdm", "eif", "symmetric"),
        ("adm", "adf", "symmetric"),
    ],
)
def test_probe_classifies_each_nat_type(mapping: str, filtering: str, nat_type: str) -> None:
    result = Sim(nat=FakeNat(mapping, filtering)).run()
    names = {"eim": "endpoint_independent", "adm": "address_dependent", "apdm": "address_and_port_dependent",
             "eif": "endpoint_independent", "adf": "address_dependent", "apdf": "address_and_port_dependent"}  # fmt: skip
    assert result.nat_type == nat_type
    assert result.mapping == names[mapping]
    assert result.filtering == names[filtering]
    assert result.public_address == (WAN_IP, LAN[1])
    assert result.server_has_second_ip
    assert result.hairpinning is False  # the fake NAT does not hairpin by default


def test_probe_open_internet() -> None:
    sim = Sim()
    result = sim.run()
    assert result.nat_type == "open"
    assert (result.mapping, result.filtering) == ("endpoint_independent", "endpoint_independent")
    assert result.public_address == OPEN_HOST and result.port_allocation == "preserving"
    assert result.hairpinning is None
    # No NAT, so no mapping tests: only the primary and the two filtering requests went out
    # (the port-only answer is awaited too: netcheck reports every socket that answered).
    assert len(sim.sent) == 3 and sim.now == pytest.approx(0.02)


def test_probe_hairpinning() -> None:
    assert Sim(nat=FakeNat("eim", "apdf", hairpin=True)).run().hairpinning is True
    assert Sim(nat=FakeNat("eim", "apdf", hairpin=False)).run().hairpinning is False
    assert Sim(nat=FakeNat("eim", "apdf", hairpin=True), test_hairpin=False).run().hairpinning is None


@pytest.mark.parametrize(
    "allocation, expected",
    [
        # Keeps port 5000 for the first mapping, then counts up: a fresh socket's port is
        # predictable (nat/hard_nat.py PREDICT), whatever the NAT does next.
        ("preserving", "preserving"),
        ("sequential", "sequential"),
        ("random", "random"),
    ],
)
def test_probe_port_allocation_symmetric(allocation: str, expected: str) -> None:
    result = Sim(nat=FakeNat("apdm", "apdf", allocation=allocation)).run()
    assert result.nat_type == "symmetric" and len(set(result.mapped_addresses)) == 3
    assert result.port_allocation == expected


def test_probe_port_allocation_eim() -> None:
    assert Sim(nat=FakeNat("eim", "eif")).run().port_allocation == "preserving"
    assert Sim(nat=FakeNat("eim", "eif", allocation="sequential")).run().port_allocation == "unknown"


def test_probe_retransmission_and_udp_blocked() -> None:
    sim = Sim(blackhole=True, timeout=3.0, rto=0.1)
    result = sim.run()
    assert result.nat_type == "udp_blocked" and result.public_address is None
    assert sim.now == pytest.approx(3.0)  # gives up exactly at the deadline
    # RFC 8489 schedule: RTO 100 ms, doubling, until the deadline.
    assert sim.send_times(SERVER4[0]) == [0.0, 0.1, 0.3, 0.7, 1.5]


def test_probe_rides_out_loss() -> None:
    sim = Sim(nat=FakeNat("eim", "adf"), drop_first=2)
    result = sim.run()
    assert result.nat_type == "restricted_cone"
    assert sim.send_times(SERVER4[0])[:3] == [0.0, 0.1, 0.3]


def test_probe_phase_timing() -> None:
    # Port-restricted: the ip+port and port-only answers never arrive, so the filtering
    # phase waits out its half of the remaining budget, retransmitting, then maps.
    sim = Sim(nat=FakeNat("eim", "apdf"), timeout=3.0, rto=0.1)
    result = sim.run()
    assert result.nat_type == "port_restricted"
    t1 = 0.01
    filter_end = t1 + (3.0 - t1) / 2
    times = sim.send_times(SERVER4[0], change_ip=True, change_port=True)
    assert times == [round(t1 + d, 6) for d in (0.0, 0.1, 0.3, 0.7)]
    assert sim.send_times(SERVER4[2]) == [round(filter_end, 6)]  # mapping starts after
    assert sim.now == pytest.approx(filter_end + 0.01)


def test_probe_filter_wait_bounds_the_silence_it_waits_out() -> None:
    """Issue 16: a node that knows its gateway's RTT waits for filtered answers about that
    long, not half the budget: a port-restricted NAT is classified in under half a second
    instead of 1.5 s, and loosely filtering ones are still seen (their answers come)."""
    sim = Sim(nat=FakeNat("eim", "apdf"), timeout=3.0, rto=0.1, filter_wait=0.4)
    result = sim.run()
    assert result.nat_type == "port_restricted"
    assert sim.now == pytest.approx(0.01 + 0.4 + 0.01)
    sim = Sim(nat=FakeNat("apdm", "apdf"), timeout=3.0, rto=0.1, filter_wait=0.4)
    assert sim.run().nat_type == "symmetric" and sim.now < 0.5
    assert Sim(nat=FakeNat("eim", "adf"), filter_wait=0.4).run().nat_type == "restricted_cone"
    with pytest.raises(ValueError):
        BehaviorProbe(SERVER4[0], 0.0, filter_wait=0.0)


def test_probe_two_socket_server_needs_the_second_port() -> None:
    # Without OTHER-ADDRESS and with filtering that hides the server's P2, mapping is untestable...
    result = Sim(nat=FakeNat("eim", "apdf"), server=SERVER2).run()
    assert not result.server_has_second_ip
    assert (result.mapping, result.filtering, result.nat_type) == (
        "unknown", "address_and_port_dependent", "unknown",
    )  # fmt: skip
    # ... unless the caller knows it: then EIM and APDM separate against IP1:P2.
    for mapping, expected in (("eim", "port_restricted"), ("apdm", "symmetric")):
        result = Sim(nat=FakeNat(mapping, "apdf"), server=SERVER2, alternate_port=SERVER2[1][1]).run()
        assert result.nat_type == expected
        assert any("second port only" in note for note in result.notes)


def test_probe_two_socket_server_learns_the_second_port() -> None:
    # Looser filtering lets the port-change answer through, which reveals P2.
    result = Sim(nat=FakeNat("eim", "eif"), server=SERVER2).run()
    assert result.mapping == "endpoint_independent"
    assert result.filtering == "unknown"  # EIF and ADF look alike without a second IP
    assert result.nat_type == "unknown"
    result = Sim(nat=FakeNat("apdm", "adf"), server=SERVER2).run()
    assert (result.mapping, result.nat_type) == ("address_and_port_dependent", "symmetric")


def test_probe_server_ignoring_change_request() -> None:
    # An RFC 3489-era server answers everything from the socket it was asked on.
    def legacy(data: bytes, src: Address, index: int) -> tuple[bytes, int]:
        request = parse_message(data)
        other = SERVER4[3 - index]
        return binding_success(request, src, other_address=other), index

    result = Sim(nat=FakeNat("eim", "eif"), handler=legacy).run()
    assert result.filtering == "unknown" and result.mapping == "endpoint_independent"
    assert result.nat_type == "unknown"
    assert any("ignored CHANGE-REQUEST" in note for note in result.notes)


def test_probe_server_error() -> None:
    def refuse(data: bytes, src: Address, index: int) -> tuple[bytes, int]:
        return binding_error(parse_message(data), 500, "Server Error"), index

    sim = Sim(nat=FakeNat("eim", "eif"), handler=refuse)
    result = sim.run()
    assert result.nat_type == "unknown" and result.public_address is None
    assert any("500" in note for note in result.notes)
    assert sim.now == pytest.approx(0.01)


def test_probe_receive_claims_only_its_own_datagrams() -> None:
    probe = BehaviorProbe(SERVER4[0], 0.0, local_address=LAN)
    ((request, _),) = probe.datagrams_to_send(0.0)
    tid = parse_message(request).transaction_id
    assert not probe.receive_datagram(b"\x40quic", SERVER4[0], 0.01)
    assert not probe.receive_datagram(binding_success(parse_message(binding_request()), LAN), SERVER4[0], 0.01)
    corrupt = bytearray(binding_success(parse_message(request), LAN))
    corrupt[-1] ^= 1
    assert probe.receive_datagram(bytes(corrupt), SERVER4[0], 0.01)  # ours, but unusable
    assert not probe.done and probe.get_timer() == pytest.approx(0.1)
    assert tid == bytes(corrupt[8:20])


# -- end to end over real loopback UDP ------------------------------------------------------


async def _open_server(count: int) -> list[UdpEndpoint]:
    """Sockets on 127.0.0.1:P1/P2 (and 127.0.0.2:P1/P2): all of 127/8 is loopback on Linux."""
    for _ in range(20):
        first = [await open_udp_endpoint("127.0.0.1", 0) for _ in range(2)]
        ports = [ep.local_address[1] for ep in first]
        try:
            second = [await open_udp_endpoint("127.0.0.2", p) for p in ports[: count - 2]]
        except OSError:  # a port taken on 127.0.0.2: try another pair
            for ep in first:
                ep.close()
            continue
        return first + second
    pytest.skip("no port pair free on both loopback addresses")


@pytest.mark.timeout(10)
async def test_end_to_end_loopback_open() -> None:
    server = await _open_server(4)
    client = await open_udp_endpoint("127.0.0.1", 0)
    try:
        responder = run_responder(server)
        seen: list[tuple[bytes, Address]] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Something that is not the probe's arrives meanwhile: it must be passed through.
        other = await open_udp_endpoint("127.0.0.1", 0)
        other.send(b"\x40not stun", client.local_address)
        result = await detect_nat_behavior(
            client, server[0].local_address, timeout=2.0, passthrough=lambda d, a: seen.append((d, a))
        )
        other.close()
        assert loop.time() - started < 1.0  # every answer arrives: no waiting out timeouts
        assert result.nat_type == "open"
        assert result.public_address == client.local_address
        assert (result.mapping, result.filtering) == ("endpoint_independent", "endpoint_independent")
        assert result.server_has_second_ip and result.port_allocation == "preserving"
        assert responder.requests >= 2 and responder.malformed == 0
        await asyncio.sleep(0.05)
        assert (b"\x40not stun", other.local_address) in seen
        # The previous receiver is back in place once the probe is done.
        seen.clear()
        late = await open_udp_endpoint("127.0.0.1", 0)
        late.send(b"\x41after", client.local_address)
        await asyncio.sleep(0.05)
        late.close()
        assert seen == [(b"\x41after", late.local_address)]
    finally:
        client.close()
        for ep in server:
            ep.close()


@pytest.mark.timeout(10)
async def test_end_to_end_loopback_unanswered_is_udp_blocked() -> None:
    # A port nobody answers on: the runner must give up at its deadline, on loop time.
    silent = await open_udp_endpoint("127.0.0.1", 0)
    client = await open_udp_endpoint("127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await detect_nat_behavior(client, silent.local_address, timeout=0.3)
        assert result.nat_type == "udp_blocked"
        assert 0.29 <= loop.time() - started < 1.0
    finally:
        client.close()
        silent.close()
