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
