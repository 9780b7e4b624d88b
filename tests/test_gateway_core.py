"""The gateway core's limits on a fake clock: no sockets, no sleeps; time is a number."""

from __future__ import annotations

from core_harness import GATEWAY, FakeNet, events, gateway_and_nodes

from macula.gateway.core import GatewayCore
from macula.gateway.limits import GatewayLimits
from macula.gateway.options import GatewayOptions
from macula.identity import Identity
from macula.node.core import NodeCore
from macula.node.options import NodeOptions
from macula.session import events as ev
from macula.wire.relay import FROM_GATEWAY_HEADER, encode_to_gateway


def limited(count: int, **limits: float) -> tuple[FakeNet, GatewayCore, list[NodeCore]]:
    net = FakeNet()
    gateway = GatewayCore(Identity.generate(), GatewayOptions(limits=GatewayLimits(**limits)))
    net.add(GATEWAY, gateway)
    nodes = []
    for i in range(count):
        addr = (f"198.51.100.{i + 1}", 4000 + i)
        node = NodeCore(Identity.generate(), NodeOptions(gateway=GATEWAY, strategy="always_relay"),
                        local_address=addr, interfaces=lambda: [])
        net.add(addr, node)
        node.start(net.now)
        nodes.append(node)
    net.run(0.5)
    assert all(n.registered for n in nodes)
    return net, gateway, nodes


def relay_from(gateway: GatewayCore, node: NodeCore, dst: NodeCore, size: int,
               now: float) -> int:
    """One relay frame from the node's registered address; payload bytes forwarded."""
    assert node.relay_token is not None and node.observed is not None
    frame = encode_to_gateway(node.relay_token, dst.node_id.raw, b"\xc0" + b"x" * (size - 1))
    gateway.receive_datagram(frame, node.observed, now)
    return sum(len(d) - FROM_GATEWAY_HEADER for d, _ in gateway.datagrams_to_send(now)
               if d[:1] == b"\x31")


def test_relay_budget_caps_a_burst_then_refills_at_the_rate() -> None:
    rate, burst = 20_000, 20_000
    net, gateway, (a, b) = limited(2, relay_rate_bytes=rate, relay_burst_bytes=burst)
    t = net.now
    sent = sum(relay_from(gateway, a, b, 1000, t) for _ in range(100))
    assert burst - 1000 <= sent <= burst
    assert gateway.dropped["relay_rate"] == 100 - sent // 1000
    # Half a second later the bucket holds rate/2 more: exactly that much gets through.
    again = sum(relay_from(gateway, a, b, 1000, t + 0.5) for _ in range(30))
    assert again == rate // 2


def test_a_noisy_node_spends_only_its_own_budget() -> None:
    net, gateway, (a, b, c, d) = limited(4, relay_rate_bytes=10_000, relay_burst_bytes=20_000)
    t = net.now
    for _ in range(200):
        relay_from(gateway, a, b, 1000, t)
    quiet = sum(relay_from(gateway, c, d, 1000, t) for _ in range(15))
    assert quiet == 15_000


def test_session_duration_cap_cuts_only_the_old_session() -> None:
    net, gateway, (a, b, c) = limited(3, relay_session_max_duration=0.3)
    t = net.now
    assert relay_from(gateway, a, b, 500, t) == 500
    assert relay_from(gateway, a, c, 500, t + 0.2) == 500  # a's second session starts later
    assert relay_from(gateway, a, b, 500, t + 0.31) == 0  # the first is past 0.3 s
    assert gateway.dropped["relay_session_max_duration"] == 1
    assert relay_from(gateway, a, c, 500, t + 0.45) == 500  # the second is not


def test_session_byte_cap() -> None:
    net, gateway, (a, b, c) = limited(3, relay_session_max_bytes=5_000)
    t = net.now
    sent = sum(relay_from(gateway, a, b, 1000, t) for _ in range(8))
    assert sent == 5_000 and gateway.dropped["relay_session_max_bytes"] == 3
    assert relay_from(gateway, a, c, 1000, t) == 1000


def test_control_rate_limit_answers_with_one_notice_per_second() -> None:
    net, gateway, (a, b) = limited(2, control_rate=5)
    for _ in range(40):
        a.lookup(b.node_id)
    net.run(0.5)
    assert gateway.dropped["control_rate"] > 0
    errors = [e for e in events(a) if isinstance(e, ev.GatewayError) and e.code == "control_rate"]
    assert len(errors) == 1


def test_plain_harness_has_no_limits_hit() -> None:
    net, gateway, (a, b) = gateway_and_nodes()
    net.run(1.0)
    assert not any(k in gateway.dropped for k in ("relay_rate", "control_rate", "punch_rate"))


def test_bad_node_ids_are_answered_and_counted_not_raised() -> None:
    """A flood-sized id in a lookup gets an error naming a short prefix of it; in a punch
    request it is counted as malformed. Neither raises out of the core."""
    from macula.wire import control

    net, gateway, (a, _b) = limited(2)
    sent = []
    original = gateway._send
    gateway._send = lambda ctl, msg: (sent.append(msg), original(ctl, msg))  # type: ignore[method-assign]
    a._send_control(control.Lookup(7, "x" * 20_000))
    a._send_control(control.PunchRequest("y" * 20_000, 1))
    net.run(0.2)
    (error,) = [m for m in sent if isinstance(m, control.Error)]
    assert error.code == "bad_node_id" and error.req == 7 and len(error.message) < 200
    assert gateway.malformed["control"] == 1


def _control_packet(node: NodeCore, now: float) -> bytes:
    """One of the node's own QUIC control packets (a keepalive), as it would send it."""
    from macula.wire import control

    node._send_control(control.Keepalive(99))
    (data,) = [d for d, addr in node.datagrams_to_send(now) if addr == GATEWAY]
    return data


def test_a_spoofed_source_cannot_take_another_nodes_relay_slot() -> None:
    """The relay hijack: M replays its own control packet with V's address as source.
    The gateway must not move M there (nor anywhere unvalidated): V keeps its slot and its
    relayed traffic; the address M forged receives no relay frame."""
    net, gateway, (victim, peer, attacker) = limited(3)
    v_addr, m_addr = victim.observed, attacker.observed
    assert v_addr is not None and m_addr is not None
    forged = _control_packet(attacker, net.now)
    gateway.receive_datagram(forged, v_addr, net.now)
    net.run(3.0)  # long enough for the gateway's path challenge to fail
    assert gateway.registry.get(attacker.node_id.raw).address == m_addr
    assert gateway.registry.get(victim.node_id.raw).address == v_addr
    assert gateway.registry.by_address(v_addr) is gateway.registry.get(victim.node_id.raw)
    assert gateway.dropped["migration_unvalidated"] >= 1
    # V's relay still works both ways, and frames for M still go to M's real address.
    assert relay_from(gateway, victim, peer, 500, net.now) == 500
    assert relay_from(gateway, peer, victim, 500, net.now) == 500
    frame = encode_to_gateway(peer.relay_token, attacker.node_id.raw, b"\xc0" + b"x" * 99)
    gateway.receive_datagram(frame, peer.observed, net.now)
    targets = {addr for d, addr in gateway.datagrams_to_send(net.now) if d[:1] == b"\x31"}
    assert targets == {m_addr}


def test_a_spoofed_third_party_address_receives_no_relay_frames() -> None:
    """Relay redirection: the forged source is a host that never registered."""
    net, gateway, (peer, attacker) = limited(2)
    third = ("192.0.2.77", 7777)
    gateway.receive_datagram(_control_packet(attacker, net.now), third, net.now)
    seen_at_third = []
    for _ in range(30):  # 3 s of fake time, frames for the attacker keep coming
        frame = encode_to_gateway(peer.relay_token, attacker.node_id.raw, b"\xc0" + b"y" * 99)
        gateway.receive_datagram(frame, peer.observed, net.now)
        seen_at_third += [d for d, addr in gateway.datagrams_to_send(net.now)
                          if addr == third and d[:1] == b"\x31"]
        net.run(0.1)
    assert seen_at_third == []
    assert gateway.registry.get(attacker.node_id.raw).address == attacker.observed


def test_a_real_move_is_followed_once_validated() -> None:
    """A genuine rebinding: the node answers the gateway's challenge from its new address,
    and only then does the registry move."""
    net, gateway, (node, _other) = limited(2)
    old = node.observed
    new = ("198.51.100.200", 6000)
    net.cores[new] = net.cores.pop(old)  # the node's packets now leave from `new`
    node.link._next_keepalive = net.now  # say something at once
    net.run(1.0)
    assert gateway.registry.get(node.node_id.raw).address == new
    assert node.observed == new  # told at once, not at the next keepalive


def _genuine_initials(count: int) -> list[bytes]:
    """First flights of real QUIC clients: anyone can make these, from any address."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from macula.session.quic import ALPN_CONTROL

    out = []
    for _ in range(count):
        conn = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN_CONTROL]))
        conn.connect(GATEWAY, now=0.0)
        out.append(conn.datagrams_to_send(now=0.0)[0][0])
    return out


def test_nodes_register_through_a_retry() -> None:
    """retry_above = 0: every handshake must answer a Retry first; nodes still get in."""
    net, gateway, nodes = limited(2, retry_above=0)
    assert all(n.registered for n in nodes) and gateway.retries_sent >= 2


def test_a_spoofed_initial_flood_costs_retries_not_handshakes() -> None:
    """500 genuine Initials from addresses that never answer: past `retry_above` each one
    gets a small Retry and no connection; a real node then registers at once."""
    net, gateway, _nodes = limited(1, retry_above=16)
    before = len(gateway._controls)
    flood = _genuine_initials(500)
    for i, initial in enumerate(flood):
        source = (f"203.0.113.{1 + i % 200}", 10_000 + i)
        gateway.receive_datagram(initial, source, net.now)
    out = gateway.datagrams_to_send(net.now)
    assert len(gateway._controls) - before <= 16  # half-open connections: bounded
    assert gateway.retries_sent >= 500 - 16
    # What the flood's sources got back: a handshake's first flight for the first 16
    # (QUIC's 3x anti-amplification bound), a small Retry for every other one.
    sent_per_source: dict = {}
    for data, addr in out:
        sent_per_source[addr] = sent_per_source.get(addr, 0) + len(data)
    small = sorted(sent_per_source.values())[:500 - 16]
    assert max(small) < 200 and max(sent_per_source.values()) <= 3 * 1252
    late = NodeCore(Identity.generate(), NodeOptions(gateway=GATEWAY, strategy="always_relay"),
                    local_address=("198.51.100.50", 5000), interfaces=lambda: [])
    net.add(("198.51.100.50", 5000), late)
    late.start(net.now)
    started = net.now
    net.run(1.0)
    assert late.registered
    assert late.link.reconnects == 0  # first try, through a Retry
    assert net.now - started <= 1.0


def test_a_retry_token_works_only_from_the_address_it_was_issued_to() -> None:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from macula.session.quic import ALPN_CONTROL

    net, gateway, _nodes = limited(1, retry_above=0)
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, alpn_protocols=[ALPN_CONTROL]))
    client.connect(GATEWAY, now=net.now)
    here, elsewhere = ("198.51.100.61", 1000), ("198.51.100.62", 1000)
    gateway.receive_datagram(client.datagrams_to_send(now=net.now)[0][0], here, net.now)
    (retry,) = [d for d, addr in gateway.datagrams_to_send(net.now) if addr == here]
    client.receive_datagram(retry, GATEWAY, now=net.now)
    with_token = client.datagrams_to_send(now=net.now)[0][0]
    gateway.receive_datagram(with_token, elsewhere, net.now)  # a stolen token
    assert gateway.dropped["retry_token_invalid"] == 1
    controls = len(gateway._controls)
    gateway.receive_datagram(with_token, here, net.now)  # its own: accepted
    assert len(gateway._controls) == controls + 1


def test_no_address_gets_more_answers_than_answer_rate() -> None:
    """A spoofed flood of Initials aimed (by source) at one victim: the victim receives at
    most `answer_rate` x 4 s of burst Retries, then a trickle at the rate."""
    net, gateway, _nodes = limited(1, retry_above=0, answer_rate=10)
    victim = ("192.0.2.99", 4242)
    flood = _genuine_initials(200)
    for initial in flood[:100]:
        gateway.receive_datagram(initial, victim, net.now)
    burst = [d for d, addr in gateway.datagrams_to_send(net.now) if addr == victim]
    assert len(burst) == 40 and gateway.dropped["answer_rate"] == 60
    later = net.now + 1.0
    for initial in flood[100:]:
        gateway.receive_datagram(initial, victim, later)
    trickle = [d for d, addr in gateway.datagrams_to_send(later) if addr == victim]
    assert len(trickle) == 10
    # Another address is not affected.
    gateway.receive_datagram(_genuine_initials(1)[0], ("192.0.2.100", 1), later)
    assert [a for _, a in gateway.datagrams_to_send(later)] == [("192.0.2.100", 1)]


def test_an_allowlist_keeps_strangers_out_and_drops_the_removed() -> None:
    from macula.gateway.admission import Admission
    from macula.session import events as ev

    net = FakeNet()
    gateway = GatewayCore(Identity.generate())
    net.add(GATEWAY, gateway)
    members = [Identity.generate() for _ in range(2)]
    stranger = Identity.generate()
    gateway.admission = Admission("allowlist", frozenset(i.node_id for i in members))
    nodes = []
    for i, identity in enumerate([*members, stranger]):
        addr = (f"198.51.100.{i + 1}", 4000 + i)
        node = NodeCore(identity, NodeOptions(gateway=GATEWAY), local_address=addr,
                        interfaces=lambda: [])
        net.add(addr, node)
        node.start(net.now)
        nodes.append(node)
    net.run(1.0)
    a, b, s = nodes
    assert a.registered and b.registered and not s.registered
    assert gateway.dropped["not_admitted"] >= 1
    refusals = [e for e in events(s) if isinstance(e, ev.GatewayError)]
    assert refusals and refusals[0].code == "not_admitted"
    # b is taken off the list: it is disconnected, a stays.
    assert gateway.set_allowlist(frozenset({a.node_id})) == 1
    assert gateway.registry.get(b.node_id.raw) is None
    net.run(2.0)
    assert a.registered and not b.registered


def test_registrations_per_source_address_are_rate_limited() -> None:
    """One host minting identities: the burst (rate x 4 s) registers, the rest hear
    `registration_rate` and stay out; a host elsewhere is not affected."""
    from macula.session import events as ev

    net = FakeNet()
    gateway = GatewayCore(Identity.generate(),
                          GatewayOptions(limits=GatewayLimits(registration_rate=5)))
    net.add(GATEWAY, gateway)
    sybils = []
    for i in range(30):
        addr = ("198.51.100.7", 5000 + i)
        node = NodeCore(Identity.generate(), NodeOptions(gateway=GATEWAY), local_address=addr,
                        interfaces=lambda: [])
        net.add(addr, node)
        node.start(net.now)
        sybils.append(node)
    other = NodeCore(Identity.generate(), NodeOptions(gateway=GATEWAY),
                     local_address=("192.0.2.80", 5000), interfaces=lambda: [])
    net.add(("192.0.2.80", 5000), other)
    other.start(net.now)
    net.run(0.5)
    assert sum(n.registered for n in sybils) == 20  # 5/s x 4 s of burst
    assert other.registered
    refused = [n for n in sybils if not n.registered]
    codes = {e.code for n in refused for e in events(n) if isinstance(e, ev.GatewayError)}
    assert codes == {"registration_rate"}
    assert gateway.dropped["registration_rate"] == 10


def test_quic_v1_only_a_v2_initial_is_dropped_and_counted_without_a_connection() -> None:
    """Nodes and gateways speak QUIC v1 alone, so no connection derives Initial keys for a
    version nobody uses, and a v2 Initial costs the gateway no state."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import QuicProtocolVersion

    from macula.session.quic import ALPN_CONTROL, make_configuration

    net, gateway, nodes = limited(1)
    assert list(gateway._config.supported_versions) == [QuicProtocolVersion.VERSION_1]
    assert len(nodes[0].link.conn._cryptos_initial) == 1
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN_CONTROL],
                               supported_versions=[QuicProtocolVersion.VERSION_2])
    client = QuicConnection(configuration=config)
    client.connect(GATEWAY, now=net.now)
    before = len(gateway._controls)
    gateway.receive_datagram(client.datagrams_to_send(now=net.now)[0][0],
                             ("198.51.100.70", 1000), net.now)
    assert gateway.dropped["unsupported_version"] == 1
    assert len(gateway._controls) == before
    assert make_configuration(Identity.generate(), is_client=True,
                              alpn=ALPN_CONTROL).supported_versions == [QuicProtocolVersion.VERSION_1]
