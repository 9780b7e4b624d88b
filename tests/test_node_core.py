"""NodeCore and GatewayCore driven directly, on a fake clock, without an event loop."""

from __future__ import annotations

import gc
import weakref

from core_harness import GATEWAY, events, gateway_and_nodes, record_control

from macula.node.turn_relays import TurnServerSpec
from macula.session import events as ev

# A TURN server nobody answers at: its allocation stays pending, so candidate gathering
# for each punch attempt has something to wait for.
SILENT_TURN = TurnServerSpec(("192.0.2.99", 3478), "user", "secret")


def test_node_registers_and_the_gateway_sees_its_address() -> None:
    net, gateway, (node, _other) = gateway_and_nodes()
    net.run(0.5)
    assert node.registered and node.observed == ("198.51.100.1", 4000)
    assert any(isinstance(e, ev.Registered) for e in events(node))
    entry = gateway.registry.get(node.node_id.raw)
    assert entry is not None and entry.address == ("198.51.100.1", 4000)


def test_session_starts_on_the_relay_then_goes_direct_without_losing_a_message() -> None:
    net, _gateway, (a, b) = gateway_and_nodes()
    net.run(0.5)
    session = a.connect(b.node_id, net.now)
    for i in range(20):
        session.send_message(f"m{i}".encode())
    a.touch(session)
    net.run(0.2)
    assert session.established and session.path_history[0].path == "relay"
    net.run(3.0)
    got = [e.data for e in events(b) if isinstance(e, ev.MessageReceived)]
    assert got == [f"m{i}".encode() for i in range(20)]
    assert session.path == "direct"
    assert [r.path for r in session.path_history][:2] == ["relay", "direct"]


def test_the_gateway_forgets_a_pair_once_its_punch_has_run_its_course() -> None:
    """Churn must not grow the gateway: the punch bookkeeping of a pair goes once every
    window that reads it has passed, whether or not the nodes are still there."""
    net, gateway, (a, b) = gateway_and_nodes()
    net.run(0.5)
    a.connect(b.node_id, net.now)
    net.run(3.0)
    assert len(gateway._punches) == 1
    net.run(65.0)
    assert not gateway._punches and not gateway._blind and not gateway._offline_notice


def test_a_departed_node_frees_its_gateway_connection_without_the_cycle_collector() -> None:
    """aioquic connections are webs of cycles: unless the gateway breaks them, each node
    that leaves stays in memory until the collector's rare full pass, and a churning
    gateway's RSS climbs in between (the 25-minute kernel soak measured it)."""
    net, gateway, (a, _b) = gateway_and_nodes()
    net.run(0.5)
    (conn,) = [c for c in gateway._controls if c.peer_node_id == a.node_id]
    departed = weakref.ref(conn)
    del conn
    gc.collect()
    gc.disable()
    try:
        a.close(net.now)
        net.run(5.0)
        assert gateway.registry.get(a.node_id.raw) is None
        assert departed() is None
    finally:
        gc.enable()


def test_a_network_change_moves_sessions_to_the_relay_and_punches_again_at_once() -> None:
    """Issue 16: the kernel says our addresses changed (rtnetlink) -> the session leaves
    its direct path now, the gateway hears from us now and a new punch is asked for,
    instead of a second or more of consent checks failing first."""
    net, _gateway, (a, b) = gateway_and_nodes()
    addresses = [("eth0", "198.51.100.1")]
    a._interfaces = lambda: list(addresses)
    a._addresses_seen = a._addresses()
    net.run(0.5)
    session = a.connect(b.node_id, net.now)
    net.run(3.0)
    assert session.path == "direct"
    sent = record_control(a)
    keepalives = a.link._keepalive_seq
    assert not a.network_changed(net.now)  # a route elsewhere: our addresses are the same
    addresses.append(("docker0", "172.17.0.1"))  # a new interface takes no path away
    addresses.append(("veth1", "fe80::1"))
    assert not a.network_changed(net.now) and session.path == "direct"
    addresses[:] = [("wlan0", "192.0.2.50")]
    assert a.network_changed(net.now)
    assert session.path == "relay" and a.network_changes == 1
    net.run(0.05)
    assert a.link._keepalive_seq == keepalives + 1  # asked now, not at the next interval
    assert "punch_request" in [m["type"] for m in sent]
    net.run(3.0)
    assert a.paths[b.node_id].direct is not None  # this fake network did not really move
    session.send_message(b"after the move")
    a.touch(session)
    net.run(0.2)
    assert session.path == "direct"
    assert b"after the move" in [e.data for e in events(b) if isinstance(e, ev.MessageReceived)]


def test_always_relay_never_punches() -> None:
    net, _gateway, (a, b) = gateway_and_nodes(strategy="always_relay")
    net.run(0.5)
    sent = record_control(a)
    session = a.connect(b.node_id, net.now)
    net.run(3.0)
    assert session.established and session.path == "relay"
    assert not [m for m in sent if m["type"] == "punch_request"]


def test_a_silent_gateway_is_declared_lost_and_the_node_re_registers() -> None:
    net, _gateway, (node, _other) = gateway_and_nodes(keepalive_interval=1.0)
    net.run(0.5)
    events(node)
    blocked = True
    net.drop = lambda src, dst: blocked and GATEWAY in (src, dst)
    net.run(5.0)  # three keepalives unanswered
    assert not node.registered
    assert any(isinstance(e, ev.GatewayLost) for e in events(node))
    blocked = False
    net.run(6.0)
    assert node.registered and node.gateway_reconnects >= 1


def _punch_with_pending_turn(**changes: object) -> tuple[list[dict], float]:
    """A punch attempt whose TURN allocation never completes; what A tells the gateway."""
    net, _gateway, (a, b) = gateway_and_nodes(turn_servers=[SILENT_TURN], **changes)
    net.run(0.5)
    sent = record_control(a)
    started = net.now
    a.connect(b.node_id, net.now)
    net.run(8.0)
    return [m for m in sent if m["type"] == "candidates"], started


def test_with_trickling_the_end_of_candidates_waits_for_gather_timeout() -> None:
    candidates, _ = _punch_with_pending_turn(
        ice=__import__("macula").IceOptions(gather_timeout=1.0))
    assert candidates[0]["end"] is False  # sent at the order, TURN still allocating
    assert candidates[-1]["end"] is True  # and ended when gathering gave up on it
    assert len(candidates) == 2


def test_without_trickling_candidates_go_once_when_gathering_ends() -> None:
    from macula import IceOptions

    candidates, _ = _punch_with_pending_turn(ice=IceOptions(gather_timeout=1.0, trickle=False))
    assert len(candidates) == 1 and candidates[0]["end"] is True


def test_ice_check_timeout_ends_an_attempt_before_hole_punch_timeout() -> None:
    from macula import IceOptions

    def attempt_timeouts(**changes: object) -> list[float]:
        net, _gateway, (a, b) = gateway_and_nodes(**changes)
        net.run(0.5)
        sent = record_control(a)
        # Direct packets are lost both ways: only the relay gets through.
        net.drop = lambda src, dst: GATEWAY not in (src, dst)
        start = net.now
        a.connect(b.node_id, net.now)
        times = []
        for _ in range(60):
            net.run(0.1)
            for message in sent:
                if message["type"] == "punch_result" and message["outcome"] == "timeout":
                    times.append(round(net.now - start, 1))
                    sent.clear()
            if times:
                return times
        return times

    # By default the checks give up on their own (~4 s of retransmits, RFC 8445 RTO).
    (slow, *_) = attempt_timeouts()
    (fast, *_) = attempt_timeouts(ice=IceOptions(check_timeout=1.0))
    assert slow > 3.5 and fast < 1.5


def test_gateway_drops_and_counts_junk_without_a_connection() -> None:
    net, gateway, _nodes = gateway_and_nodes(count=0)
    gateway.receive_datagram(b"\xc0" + b"\x00" * 30, ("198.51.100.77", 5000), 0.0)
    gateway.receive_datagram(b"", ("198.51.100.77", 5000), 0.0)
    assert sum(gateway.dropped.values()) + sum(gateway.malformed.values()) >= 2
    assert len(gateway.registry) == 0


def test_the_socket_demux_routes_by_first_byte_and_source() -> None:
    from macula.node.demux import Route, route

    gw, peer = GATEWAY, ("198.51.100.9", 5000)

    def where(data: bytes, addr: tuple[str, int], **known: bool) -> Route:
        return route(data, addr, gateway=gw, stun_server_answer=known.get("stun", False),
                     turn_server=known.get("turn", False))[0]

    assert where(b"\x31" + b"x" * 20, gw) is Route.RELAYED
    assert where(b"\xc0quic", gw) is Route.CONTROL
    assert where(b"\x01\x01stun", gw) is Route.STUN  # the gateway's STUN sockets answer
    assert where(b"\x31relay", peer) is Route.MALFORMED  # relay frames only from the gateway
    assert where(b"\x01\x01", peer, stun=True) is Route.STUN_SERVER
    assert where(b"\x40chan", peer, turn=True) is Route.TURN
    assert where(b"\x00\x01", peer) is Route.STUN  # an ICE check
    assert where(b"\x40short", peer) is Route.DIRECT
    assert where(b"\x17dtls", peer) is Route.MALFORMED
    assert where(b"", gw) is Route.MALFORMED


def test_the_selection_rule() -> None:
    from macula.node.path_choice import Fallback, fallback, use_selected_pair

    assert use_selected_pair("opportunistic", has_selected=True)
    assert not use_selected_pair("always_relay", has_selected=True)
    assert not use_selected_pair("opportunistic", has_selected=False)
    assert fallback("direct_only", fallback_to_relay=True, been_direct=False) is Fallback.HOLD
    assert fallback("opportunistic", fallback_to_relay=True, been_direct=True) is Fallback.RELAY
    # fallback_to_relay off: once direct, a session never goes back to the relay...
    assert fallback("opportunistic", fallback_to_relay=False, been_direct=True) is Fallback.HOLD
    # ...but it starts there like any other.
    assert fallback("opportunistic", fallback_to_relay=False, been_direct=False) is Fallback.RELAY
