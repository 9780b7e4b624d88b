"""A session's handshake crosses the gateway relay without QUIC's padding, and QUIC on the
far side still sees full-size Initial datagrams (session/padding.py)."""

from __future__ import annotations

from collections.abc import Callable

from core_harness import GATEWAY, events, gateway_and_nodes
from hypothesis import given
from hypothesis import strategies as st

from macula.identity import Identity
from macula.session import events as ev
from macula.session.mux import parse_header
from macula.session.padding import PADDED_SIZE, restore_padding, strip_padding
from macula.session.quic import (
    ALPN_SESSION,
    SESSION_CONNECTION_ID_LIMIT,
    PinnedQuicConnection,
    make_configuration,
)
from macula.wire.relay import TO_GATEWAY_HEADER

CLIENT, SERVER = ("192.0.2.1", 4000), ("192.0.2.2", 9443)


def _packets(datagram: bytes) -> list[str]:
    """The kinds of the packets coalesced in a datagram, padding shown as "zeros"."""
    kinds, at = [], 0
    while at < len(datagram):
        if datagram[at] == 0 and not datagram[at:].strip(b"\x00"):
            return [*kinds, "zeros"]
        if not datagram[at] & 0x80:
            return [*kinds, "short"]
        kinds.append(("initial", "0rtt", "handshake", "retry")[(datagram[at] >> 4) & 3])
        at += parse_header(datagram[at:]).packet_length
    return kinds


def _handshake(carry: Callable[[bytes], bytes] = bytes) -> tuple[
        PinnedQuicConnection, PinnedQuicConnection, list[bytes], list[bytes]]:
    """Two session connections to a completed handshake, every datagram passed through
    `carry` on its way; returns both ends and what each side sent."""
    client_id, server_id = Identity.generate(), Identity.generate()
    client = PinnedQuicConnection(
        configuration=make_configuration(client_id, is_client=True, alpn=ALPN_SESSION),
        expected_peer=server_id.node_id, active_connection_id_limit=SESSION_CONNECTION_ID_LIMIT)
    client.connect(SERVER, now=0.0)
    first = client.datagrams_to_send(0.0)
    server = PinnedQuicConnection(
        configuration=make_configuration(server_id, is_client=False, alpn=ALPN_SESSION),
        expected_peer=client_id.node_id,
        original_destination_connection_id=parse_header(first[0][0]).destination_cid,
        active_connection_id_limit=SESSION_CONNECTION_ID_LIMIT)
    from_client = [data for data, _ in first]
    from_server: list[bytes] = []
    for data in from_client:
        server.receive_datagram(carry(data), CLIENT, 0.0)
    now = 0.0
    for _ in range(10):
        for data, _ in server.datagrams_to_send(now):
            from_server.append(data)
            client.receive_datagram(carry(data), SERVER, now)
        for data, _ in client.datagrams_to_send(now):
            from_client.append(data)
            server.receive_datagram(carry(data), CLIENT, now)
        now += 0.01
    return client, server, from_client, from_server


@given(st.binary(max_size=1500))
def test_stripping_only_ever_cuts_trailing_zeros(data: bytes) -> None:
    stripped = strip_padding(data)
    assert data.startswith(stripped)
    assert not data[len(stripped):].strip(b"\x00")
    if data and not data[0] & 0x80:
        assert stripped == data  # a short-header packet runs to the datagram's end


@given(st.binary(max_size=1500))
def test_restoring_pads_long_header_datagrams_only_and_to_the_initial_minimum(data: bytes) -> None:
    restored = restore_padding(data)
    assert restored.startswith(data) and not restored[len(data):].strip(b"\x00")
    if data and data[0] & 0x80:
        assert len(restored) == max(len(data), PADDED_SIZE)
    else:
        assert restored == data


def test_a_handshake_through_strip_and_restore_completes_and_the_padding_never_travels() -> None:
    carried: list[int] = []

    def relay(data: bytes) -> bytes:
        stripped = strip_padding(data)
        carried.append(len(stripped))
        return restore_padding(stripped)

    client, server, from_client, from_server = _handshake(relay)
    assert client._handshake_complete and server._handshake_complete
    assert server.peer_node_id == server.expected_peer and client.peer_node_id == client.expected_peer
    padded = [d for d in from_client + from_server if _packets(d)[-1] == "zeros"]
    assert len(padded) >= 3  # the client's two flights with an Initial, the server's first
    assert sum(carried) < 1700 < sum(map(len, from_client + from_server)) - 1500
    # What QUIC sent is what QUIC received: the restored datagram is the padded one.
    assert all(restore_padding(strip_padding(d)) == d for d in padded)


def test_session_connections_take_one_spare_connection_id_each_way() -> None:
    client, server, _, _ = _handshake()
    assert len(server._host_cids) <= SESSION_CONNECTION_ID_LIMIT
    assert len(client._host_cids) <= SESSION_CONNECTION_ID_LIMIT


def test_a_sessions_handshake_costs_the_relay_under_1700_bytes_and_the_session_works() -> None:
    """It cost 3,857 bytes with the padding, aioquic's seven spare connection ids and its
    four key shares."""
    net, _gateway, (a, b) = gateway_and_nodes(prefer_direct=False)
    net.run(0.5)
    relayed: list[bytes] = []
    for core in (a, b):
        def spy(now: float, send=core.datagrams_to_send) -> list[tuple[bytes, tuple[str, int]]]:
            out = send(now)
            relayed.extend(d[TO_GATEWAY_HEADER:] for d, dst in out
                           if dst == GATEWAY and d[0] == 0x30)
            return out
        core.datagrams_to_send = spy  # type: ignore[method-assign]
    session = a.connect(b.node_id, net.now)
    session.send_message(b"hello")
    a.touch(session)
    net.run(1.0)
    assert session.established and session.path == "relay"
    assert [e.data for e in events(b) if isinstance(e, ev.MessageReceived)] == [b"hello"]
    # One key share (X25519) in the ClientHello, not aioquic's four: 254 bytes, was 506.
    assert _packets(relayed[0])[0] == "initial" and len(relayed[0]) < 300
    assert all(_packets(d)[-1] != "zeros" for d in relayed)
    # aioquic would put the dialer's first 1-RTT frames in its second flight and pad that
    # datagram inside the 1-RTT packet's encryption, where no relay can leave it out.
    assert not any({"initial", "short"} <= set(_packets(d)) for d in relayed)
    sent = session.stats.bytes_by_path["relay"]["sent"]
    peer = b.sessions[a.node_id].stats.bytes_by_path["relay"]
    assert peer["received"] == sent  # counted as carried, on both ends
    assert sent + peer["sent"] < 1700 + 100  # the handshake, "hello" and its ACKs


def test_a_node_of_the_version_before_the_padding_change_is_refused(monkeypatch) -> None:
    """A version-1 node would drop a stripped Initial; it is told so and never registers."""
    from macula.wire import control

    monkeypatch.setattr(control, "PROTOCOL_VERSION", 1)
    net, _gateway, (old, _new) = gateway_and_nodes()
    net.run(0.5)
    assert not old.registered
    refusals = [e for e in events(old) if isinstance(e, ev.GatewayError)]
    assert refusals and refusals[0].code == "unsupported_version"
    assert "version 2" in refusals[0].message
