"""TCP ports carried over sessions: `macula up --expose PORT` and `macula forward`.

Each TCP connection becomes one bidirectional stream of the session with the exposing
node. The stream opens with one request line, `MACULA-FORWARD 1 <port>\\n`, answered by
`OK\\n` or `ERR <reason>\\n`; after OK it carries the connection's bytes both ways, and the
end of either direction (FIN) is passed on. Backpressure is end to end: a stream's window
follows what its reader consumed (Stream.read), the TCP side is read only as fast as the
stream drains, and written only as fast as the socket accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from .errors import MaculaError
from .identity import NodeId
from .logsafe import clip
from .net.endpoint import Address, format_address
from .node.node import Node, PeerSession, Stream

log = logging.getLogger(__name__)

REQUEST = b"MACULA-FORWARD 1 "
MAX_LINE = 256
CHUNK = 64 * 1024
SEND_HIGH_WATER = 1 << 20  # bytes written to a stream and not yet acknowledged
CONNECT_TIMEOUT = 10.0


class ForwardRefused(MaculaError):
    """The exposing node refused the stream (port not exposed, peer not allowed, or nothing
    listening there); the message is its reason."""


class _LineReader:
    """Reads the one request/answer line off a stream, keeping what follows it."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.rest = b""

    async def line(self, timeout: float) -> bytes:
        buffer = b""
        async with asyncio.timeout(timeout):
            while b"\n" not in buffer:
                chunk = await self.stream.read()
                if not chunk:
                    raise ForwardRefused("stream ended before its first line")
                buffer += chunk
                if len(buffer) > MAX_LINE and b"\n" not in buffer[:MAX_LINE]:
                    raise ForwardRefused("first line too long")
        line, _, self.rest = buffer.partition(b"\n")
        return line


async def _stream_to_socket(reader: _LineReader, writer: asyncio.StreamWriter) -> None:
    if reader.rest:
        writer.write(reader.rest)
        await writer.drain()
    while chunk := await reader.stream.read():
        writer.write(chunk)
        await writer.drain()  # the socket's pace is the stream's pace
    if writer.can_write_eof():
        writer.write_eof()


async def _socket_to_stream(socket: asyncio.StreamReader, stream: Stream) -> None:
    while chunk := await socket.read(CHUNK):
        stream.write(chunk)
        await stream.drain(SEND_HIGH_WATER)
    stream.write(b"", end=True)


async def _pipe(reader: _LineReader, socket: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    """Both directions until both have ended (or one fails); closes the socket."""
    tasks = [asyncio.create_task(_stream_to_socket(reader, writer)),
             asyncio.create_task(_socket_to_stream(socket, reader.stream))]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                log.debug("forwarded connection ended: %s", task.exception())
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Exposer:
    """Serves `ports` of this host to peers in `allowed` (None: every peer the node accepts
    a session from). `ports` maps the exposed port number to the local address served."""

    def __init__(self, node: Node, ports: dict[int, Address],
                 allowed: Iterable[NodeId] | None = None) -> None:
        self.node = node
        self.ports = dict(ports)
        self.allowed = frozenset(allowed) if allowed is not None else None
        self.served = 0
        self.refused = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def serve_session(self, session: PeerSession) -> None:
        """Answer every stream `session` opens, in the background, until it closes."""
        self._spawn(self._accept_streams(session))

    async def _accept_streams(self, session: PeerSession) -> None:
        with contextlib.suppress(MaculaError):
            while True:
                stream = await session.accept_stream()
                self._spawn(self._serve_stream(session.peer, stream))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(self, peer: NodeId, stream: Stream) -> None:
        reader = _LineReader(stream)
        try:
            line = await reader.line(CONNECT_TIMEOUT)
        except (ForwardRefused, TimeoutError) as exc:
            self._refuse(stream, peer, f"bad request: {exc or 'timed out'}")
            return
        if not line.startswith(REQUEST) or not line[len(REQUEST):].isdigit():
            self._refuse(stream, peer, f"bad request line {clip(line, 64)!r}")
            return
        port = int(line[len(REQUEST):])
        if self.allowed is not None and peer not in self.allowed:
            self._refuse(stream, peer, f"node {peer} may not use exposed ports here")
            return
        target = self.ports.get(port)
        if target is None:
            self._refuse(stream, peer, f"port {port} is not exposed")
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                socket, writer = await asyncio.open_connection(*target)
        except (OSError, TimeoutError) as exc:
            self._refuse(stream, peer, f"nothing answers at {format_address(target)}: "
                                       f"{exc.strerror if isinstance(exc, OSError) else 'timed out'}")
            return
        stream.write(b"OK\n")
        self.served += 1
        log.info("forward from %s to %s opened", peer, format_address(target))
        await _pipe(reader, socket, writer)

    def _refuse(self, stream: Stream, peer: NodeId, reason: str) -> None:
        self.refused += 1
        log.warning("forward from %s refused: %s", peer, reason)
        with contextlib.suppress(MaculaError):
            stream.write(b"ERR " + reason.encode()[:200] + b"\n", end=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Forwarder:
    """A local TCP listener whose connections each become one stream to `peer`'s exposed
    `port`. `start()` binds; `close()` stops listening and ends the connections."""

    def __init__(self, node: Node, peer: NodeId, port: int, listen: Address,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.node = node
        self.peer = peer
        self.port = port
        self.listen = listen
        self.connect_timeout = connect_timeout
        self.connections = 0
        self.refusals: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._on_client, *self.listen)
        bound = self._server.sockets[0].getsockname()
        self.listen = (bound[0], bound[1])
        return self.listen

    async def open_stream(self) -> _LineReader:
        """One stream to the exposed port, past the exposing node's OK."""
        session = await self.node.connect(self.peer, timeout=self.connect_timeout)
        stream = await session.open_stream()
        stream.write(REQUEST + str(self.port).encode() + b"\n")
        reader = _LineReader(stream)
        try:
            answer = await reader.line(self.connect_timeout)
        except TimeoutError:
            raise ForwardRefused(f"no answer from {self.peer} within "
                                 f"{self.connect_timeout:g} s") from None
        except ForwardRefused:
            if session.closed.is_set():  # refused the whole session: say why
                raise ForwardRefused(f"session with {self.peer} closed: "
                                     f"{session.close_reason}") from None
            raise
        if answer != b"OK":
            reason = answer[4:].decode("utf-8", "replace") if answer.startswith(b"ERR ") \
                else f"unexpected answer {clip(answer, 64)!r}"
            raise ForwardRefused(f"{self.peer} refused port {self.port}: {reason}")
        return reader

    async def _on_client(self, socket: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections += 1
        try:
            try:
                reader = await self.open_stream()
            except (MaculaError, OSError) as exc:
                self.refusals.append(str(exc))
                log.warning("forward to %s:%d: %s", self.peer, self.port, exc)
                writer.close()  # the client sees the connection end, not a hang
                return
            await _pipe(reader, socket, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
