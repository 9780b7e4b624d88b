"""What a library user notices of a session: ping, refusal by the receiver, a reader that
holds the writer back. Loopback gateway and nodes."""

import asyncio
import hashlib

import pytest
from helpers import wait_until

from macula.session.errors import SessionClosedError


async def test_ping_answers_over_the_relay_without_the_peer_application(mesh):
    a, b = await mesh.node(strategy="always_relay"), await mesh.node(strategy="always_relay")
    session = await a.connect(b.node_id)
    await b.accept(timeout=5)  # accepted, never read from: QUIC answers the PING
    rtts = [await session.ping(timeout=2) for _ in range(5)]
    assert all(0 < rtt < 1 for rtt in rtts)
    assert session.connection_type == "relay"


async def test_a_node_refuses_sessions_from_peers_outside_accept_from(mesh):
    friend, stranger = await mesh.node(), await mesh.node()
    b = await mesh.node(accept_from=[friend.node_id.text])
    refused = await stranger.connect(b.node_id, timeout=5)  # the handshake itself completes
    refused.send(b"let me in")
    with pytest.raises(SessionClosedError, match="not accepted"):
        await refused.drain(0)
    assert "not accepted" in refused.close_reason
    assert b.core.dropped["not_accepted"] == 1
    ok = await friend.connect(b.node_id, timeout=5)
    ok.send(b"hello")
    incoming = await b.accept(timeout=5)
    assert incoming.peer == friend.node_id and await incoming.recv(5) == b"hello"
    # Nothing of the stranger reached b's application.
    assert b._accepted.empty()


async def test_a_reader_that_stops_holds_the_writer_back(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    blob = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    out = await sa.open_stream()
    out.write(blob, end=True)
    incoming = await sb.accept_stream(timeout=5)
    window = 1 << 20

    def queued() -> int:
        return sum(len(c) for c in list(incoming._chunks._queue))  # type: ignore[attr-defined]

    # Nobody reads on b: at most one window arrives, the rest waits at the writer.
    await wait_until(lambda: queued() >= window * 3 // 4, timeout=10)
    await asyncio.sleep(0.3)
    assert queued() <= window
    assert sa._session.stream_buffered(out.stream_id) >= len(blob) - window - 65536
    received = await asyncio.wait_for(incoming.read_all(), 30)
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()


async def test_a_forward_whose_client_stops_reading_buffers_a_bounded_amount(mesh):
    """A TCP server pushes 32 MiB through a forward to a client that reads nothing: what
    waits in the two nodes stays within a few windows, and all of it arrives later."""
    from macula.forward import SEND_HIGH_WATER, Exposer, Forwarder

    blob = hashlib.sha256(b"push").digest() * (32 * 1024 * 1024 // 32)

    async def push(reader, writer):
        writer.write(blob)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(push, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    a, b = await mesh.node(), await mesh.node()
    exposer = Exposer(b, {port: ("127.0.0.1", port)}, allowed=[a.node_id])
    forwarder = Forwarder(a, b.node_id, port, ("127.0.0.1", 0))
    local = await forwarder.start()

    async def serve() -> None:
        exposer.serve_session(await b.accept(timeout=5))

    serving = asyncio.create_task(serve())
    reader, writer = await asyncio.open_connection(*local)
    try:
        await serving
        await wait_until(lambda: b.core.sessions and any(
            s.stream_buffered(sid) > 0 for s in b.core.sessions.values()
            for sid in list(s._known_streams)), timeout=10)
        await asyncio.sleep(0.5)  # let whatever can pile up pile up

        def waiting_in_nodes() -> int:
            queued = sum(len(c) for h in a._handles.values() for st in h._streams.values()
                         for c in list(st._chunks._queue))  # type: ignore[attr-defined]
            unacked = sum(s.stream_buffered(sid) for s in b.core.sessions.values()
                          for sid in list(s._known_streams))
            return queued + unacked

        # The exposer's socket read stops once the stream holds SEND_HIGH_WATER unacked;
        # the forward side holds at most one window plus the client's socket buffers.
        assert waiting_in_nodes() <= SEND_HIGH_WATER + (1 << 20) + 2 * 65536
        got = hashlib.sha256()
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
            got.update(chunk)
        assert got.digest() == hashlib.sha256(blob).digest()
    finally:
        writer.close()
        await forwarder.close()
        await exposer.close()
        server.close()


def test_removed_connections_do_not_stay_alive_in_the_timer_heap():
    """A flood of half-open connections evicted from the mux must not stay referenced by
    stale timer entries (the gateway's memory would follow the Initial rate otherwise)."""
    import gc
    import weakref

    from macula.identity import Identity
    from macula.session.mux import QuicMux
    from macula.session.quic import ALPN_CONTROL, PinnedQuicConnection, make_configuration

    config = make_configuration(Identity.generate(), is_client=True, alpn=ALPN_CONTROL)
    mux = QuicMux()
    refs = []
    for i in range(500):
        conn = PinnedQuicConnection(configuration=config)
        conn.connect(("192.0.2.1", 9443), now=float(i))
        mux.add(conn)
        conn.datagrams_to_send(now=float(i))
        mux.reschedule(conn)  # its loss timer joins the heap
        refs.append(weakref.ref(conn))
        mux.remove(conn)
        del conn
    gc.collect()
    assert len(mux._heap) <= 64 + 2
    assert sum(ref() is not None for ref in refs) <= 64 + 2


def test_late_handshake_packets_after_the_trim_are_dropped_and_the_connection_lives_on():
    """Once the handshake is over, the Initial/Handshake keys and crypto streams of every
    connection are one shared, torn-down set (memory per node at the gateway): a late or
    replayed handshake packet must still be dropped quietly, as aioquic drops it."""
    from aioquic import tls
    from aioquic.quic import events

    from macula.identity import Identity
    from macula.session.mux import parse_header
    from macula.session.quic import (
        ALPN_CONTROL,
        CONTROL_CONNECTION_ID_LIMIT,
        PinnedQuicConnection,
        make_configuration,
    )

    client_id, server_id = Identity.generate(), Identity.generate()
    server_config = make_configuration(server_id, is_client=False, alpn=ALPN_CONTROL)

    def pair(now: float) -> tuple[PinnedQuicConnection, PinnedQuicConnection, list[bytes]]:
        client = PinnedQuicConnection(
            configuration=make_configuration(client_id, is_client=True, alpn=ALPN_CONTROL),
            expected_peer=server_id.node_id, active_connection_id_limit=CONTROL_CONNECTION_ID_LIMIT)
        client.connect(("192.0.2.2", 9443), now=now)
        first = client.datagrams_to_send(now)
        server = PinnedQuicConnection(
            configuration=server_config,
            original_destination_connection_id=parse_header(first[0][0]).destination_cid)
        for data, _addr in first:
            server.receive_datagram(data, ("192.0.2.1", 4000), now)
        sent_by_client: list[bytes] = [data for data, _addr in first]
        for _ in range(10):  # a handful of round trips completes the handshake
            for data, _addr in client.datagrams_to_send(now):
                sent_by_client.append(data)
                server.receive_datagram(data, ("192.0.2.1", 4000), now)
            for data, _addr in server.datagrams_to_send(now):
                client.receive_datagram(data, ("192.0.2.2", 9443), now)
            now += 0.01
        return client, server, sent_by_client

    client, server, sent_by_client = pair(0.0)
    other_client, other_server, _ = pair(0.0)
    assert server.peer_node_id == client_id.node_id
    for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
        assert server._cryptos[epoch] is other_server._cryptos[epoch]
        assert not server._cryptos[epoch].recv.is_valid()
    assert len(server._host_cids) <= CONTROL_CONNECTION_ID_LIMIT
    while server.next_event() is not None:
        pass
    for late in sent_by_client[:3]:  # the client's Initial and Handshake flights again
        server.receive_datagram(late, ("192.0.2.1", 4000), 1.0)
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, b"still here", end_stream=True)
    for data, _addr in client.datagrams_to_send(1.0):
        server.receive_datagram(data, ("192.0.2.1", 4000), 1.0)
    got = []
    while (event := server.next_event()) is not None:
        if isinstance(event, events.StreamDataReceived):
            got.append(event.data)
        assert not isinstance(event, events.ConnectionTerminated)
    assert b"".join(got) == b"still here"
