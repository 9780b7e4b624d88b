"""TURN over TCP and TLS for the node: the connections under its TURN clients.

The TURN clients (nat.turn, sans-IO) send "datagrams" to their server's address as always;
for a server configured with transport tcp or tls this endpoint layer writes them to a
connection it holds instead of the UDP socket, and cuts what comes back into frames
(STUN messages, ChannelData: RFC 8656 section 3.1) handed on as datagrams from that
server. A connection that ends is reported (`on_lost`), which ends its allocation.

TLS here gets through firewalls; it is not where trust comes from: TURN authenticates
with its long-term credential and the session inside is end-to-end QUIC, so the server's
certificate is not verified.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from ..nat.turn import StreamFramer
from ..net.endpoint import Address, DatagramEndpoint, EndpointLayer, format_address

log = logging.getLogger(__name__)
PENDING_MAX = 64  # frames queued while the connection is being made
SEND_BUFFER = 4 << 20
CONNECT_TIMEOUT = 10.0


class _Connection:
    def __init__(self) -> None:
        self.writer: asyncio.StreamWriter | None = None
        self.pending: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.framer = StreamFramer()


class TurnStreams(EndpointLayer):
    """`inner` (the node's socket, or what wraps it) plus one connection per TCP/TLS TURN
    server, made at the first send to it."""

    def __init__(self, inner: DatagramEndpoint, servers: dict[Address, str],
                 on_lost: Callable[[Address], None]) -> None:
        super().__init__(inner)
        self.servers = dict(servers)
        self._on_lost = on_lost
        self._conns: dict[Address, _Connection] = {}
        self.dropped = 0
        self.closed = False

    def add_servers(self, servers: dict[Address, str]) -> None:
        self.servers.update(servers)

    def send(self, data: bytes, addr: Address) -> None:
        transport = self.servers.get(addr)
        if transport is None:
            self.inner.send(data, addr)
            return
        if self.closed:
            return
        conn = self._conns.get(addr)
        if conn is None:
            conn = self._conns[addr] = _Connection()
            conn.task = asyncio.ensure_future(self._run(addr, transport, conn))
        writer = conn.writer
        if writer is None:
            if len(conn.pending) < PENDING_MAX:
                conn.pending.append(data)
            else:
                self.dropped += 1
            return
        if writer.transport.get_write_buffer_size() > SEND_BUFFER:
            self.dropped += 1
            return
        writer.write(data)

    def close(self) -> None:
        self.closed = True
        for conn in self._conns.values():
            if conn.task is not None:
                conn.task.cancel()
            if conn.writer is not None:
                conn.writer.close()
        self._conns.clear()
        self.inner.close()

    async def _run(self, server: Address, transport: str, conn: _Connection) -> None:
        reason = "closed by the server"
        try:
            context = None
            if transport == "tls":
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server[0], server[1], ssl=context), CONNECT_TIMEOUT)
            conn.writer = writer
            for data in conn.pending:
                writer.write(data)
            conn.pending.clear()
            while True:
                chunk = await reader.read(65_536)
                if not chunk:
                    break
                for frame in conn.framer.feed(chunk):
                    self.deliver(frame, server)
                if conn.framer.error is not None:
                    reason = f"framing error: {conn.framer.error}"
                    break
        except asyncio.CancelledError:
            return
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            reason = str(exc) or type(exc).__name__
        if conn.writer is not None:
            conn.writer.close()
        if self._conns.get(server) is conn:
            del self._conns[server]
        if not self.closed:
            log.info("TURN %s connection to %s ended: %s", transport,
                     format_address(server), reason)
            self._on_lost(server)
