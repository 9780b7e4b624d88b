"""The gateway's TCP path: WebSocket over TLS, each binary message one datagram.

A node whose network drops UDP reaches its gateway here, and carries exactly what it would
have sent over UDP (the QUIC control connection, relay frames): a message is a datagram,
so everything above sees one more path, not a new protocol. Framing is wsproto's sans-IO
core; this module only moves its bytes over asyncio streams, through an HTTP CONNECT proxy
when one is configured. Setup failures say which step failed (`LinkSetupError.step`).

Sending never blocks: past `SEND_BUFFER` bytes queued in the socket a message is dropped
and counted, as a full UDP socket buffer would (QUIC above retransmits).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..errors import InvalidValue, MaculaError
from .endpoint import Address, format_address, is_numeric_host

log = logging.getLogger(__name__)

WS_PATH = "/macula"
# A message carries one UDP datagram: never more than an IPv4 UDP payload.
MAX_MESSAGE = 65_507
SEND_BUFFER = 4 << 20  # bytes queued in the socket before messages are dropped
SETUP_TIMEOUT = 10.0  # seconds for TCP, proxy, TLS and upgrade together
MAX_HEADER_BYTES = 16_384  # an HTTP head (proxy answer, upgrade) larger than this is refused
READ_CHUNK = 65_536

LinkReceiver = Callable[[bytes], object]
LinkClosed = Callable[[str], object]


class MessageLink(Protocol):
    """A reliable link carrying datagrams as messages: WebSocketLink here, or the
    simulator's stream model."""

    transport: str
    via_proxy: bool
    closed: bool

    def start(self, receiver: LinkReceiver, on_close: LinkClosed) -> None: ...
    def send(self, data: bytes) -> None: ...
    def close(self, reason: str = "closed") -> None: ...


class LinkSetupError(MaculaError, ConnectionError):
    """The TCP link could not be set up; `step` is tcp_connect, proxy, tls, upgrade or
    timeout."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True)
class ProxySpec:
    """An HTTP CONNECT proxy, from `http://[user:password@]host:port`."""

    host: str
    port: int
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, url: str) -> ProxySpec:
        text = url.strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "http", text
        if scheme.lower() != "http":
            raise InvalidValue(f"proxy {url!r}: only http:// proxies (HTTP CONNECT) are spoken")
        rest = rest.split("/", 1)[0]
        auth, at, hostport = rest.rpartition("@")
        if not at:
            auth, hostport = "", rest
        user, _, password = auth.partition(":")
        host, port = hostport, "80"
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else "80"
        elif ":" in hostport:
            host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidValue(f"proxy {url!r}: expected http://[user:password@]host:port")
        from urllib.parse import unquote
        return cls(host, int(port), unquote(user), unquote(password))

    def describe(self) -> str:
        return format_address((self.host, self.port))


def proxy_bypassed(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY (comma-separated hosts, domain suffixes, "*") exempts `host`."""
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.split(":", 1)[0] if entry.count(":") == 1 else entry
        name = host.lower()
        if name == entry.lstrip(".") or name.endswith("." + entry.lstrip(".")):
            return True
    return False


@dataclass
class LinkCounters:
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    dropped_full: int = 0  # sends refused because the socket buffer was full
    refused: int = 0  # text messages, oversized messages: not datagrams


class WebSocketLink:
    """One established WebSocket connection carrying datagrams, either side."""

    def __init__(self, ws: WSConnection, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, transport: str, via_proxy: bool,
                 peer: Address) -> None:
        self._ws = ws
        self._reader = reader
        self._writer = writer
        self.transport = transport  # "tls" (or "tcp" without TLS, tests only)
        self.via_proxy = via_proxy
        self.peer = peer  # the TCP peer: proxy or gateway (node side), node (gateway side)
        self.counters = LinkCounters()
        self.closed = False
        self.close_reason = ""
        self._receiver: LinkReceiver = lambda data: None
        self._on_close: LinkClosed = lambda reason: None
        self._partial = bytearray()
        self._task: asyncio.Task[None] | None = None
        self.last_activity = asyncio.get_running_loop().time()  # of the last message in

    def start(self, receiver: LinkReceiver, on_close: LinkClosed) -> None:
        """Begin reading: every binary message goes to `receiver`, and `on_close(reason)`
        runs once when the link ends (either side, or a protocol error)."""
        self._receiver, self._on_close = receiver, on_close
        self._task = asyncio.ensure_future(self._read_loop())

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        transport = self._writer.transport
        if transport.get_write_buffer_size() > SEND_BUFFER:
            self.counters.dropped_full += 1
            return
        try:
            self._writer.write(self._ws.send(BytesMessage(data=data)))
        except (LocalProtocolError, RuntimeError, OSError) as exc:
            self._finish(f"send failed: {exc}")
            return
        self.counters.messages_out += 1
        self.counters.bytes_out += len(data)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        try:
            self._writer.write(self._ws.send(CloseConnection(code=1000, reason=reason[:100])))
        except (LocalProtocolError, RuntimeError, OSError):
            pass
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        try:
            self._writer.close()
        except (RuntimeError, OSError):
            pass
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        try:
            self._on_close(reason)
        except Exception:
            log.exception("link close callback")

    async def _read_loop(self) -> None:
        reason = "connection closed by peer"
        try:
            # Frames that came in the same read as the upgrade wait in wsproto's buffer.
            if not self._feed(b""):
                return
            while not self.closed:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    self._ws.receive_data(None)
                    break
                if not self._feed(chunk):
                    return
        except asyncio.CancelledError:
            return
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            reason = f"connection error: {exc}"
        self._finish(reason)

    def _feed(self, chunk: bytes) -> bool:
        """Hand bytes to wsproto and act on its events; False once the link is over."""
        try:
            self._ws.receive_data(chunk)
            for event in self._ws.events():
                if isinstance(event, BytesMessage):
                    if len(self._partial) + len(event.data) > MAX_MESSAGE:
                        self.counters.refused += 1
                        self.close("message too large")
                        return False
                    self._partial += event.data
                    if event.message_finished:
                        self.last_activity = asyncio.get_running_loop().time()
                        data = bytes(self._partial)
                        self._partial.clear()
                        self.counters.messages_in += 1
                        self.counters.bytes_in += len(data)
                        self._receiver(data)
                        if self.closed:
                            return False
                elif isinstance(event, TextMessage):
                    self.counters.refused += 1  # datagrams are binary: drop, keep the link
                elif isinstance(event, Ping):
                    self._writer.write(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    try:
                        self._writer.write(self._ws.send(event.response()))
                    except LocalProtocolError:
                        pass
                    self._finish(f"closed by peer ({event.code} {event.reason})".strip())
                    return False
        except RemoteProtocolError as exc:
            self.counters.refused += 1
            self._finish(f"protocol error: {exc}")
            return False
        return True


async def _read_http_head(reader: asyncio.StreamReader, step: str) -> tuple[bytes, bytes]:
    """Bytes up to and including the blank line, and whatever came after it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await reader.read(4096)
        if not chunk:
            raise LinkSetupError(step, "connection closed before an answer")
        buffer += chunk
        if len(buffer) > MAX_HEADER_BYTES:
            raise LinkSetupError(step, "answer head larger than 16 KiB")
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


async def _proxy_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         target: Address, proxy: ProxySpec) -> None:
    authority = format_address(target)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username or proxy.password:
        token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        lines.append(f"Proxy-Authorization: Basic {token}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head, rest = await _read_http_head(reader, "proxy")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise LinkSetupError("proxy", f"not an HTTP answer: {status_line[:80]!r}")
    if parts[1] != "200":
        raise LinkSetupError("proxy", f"proxy {proxy.describe()} answered {status_line[:80]}")
    if rest:  # a proxy says nothing after 200 until the tunnel carries the server's bytes
        raise LinkSetupError("proxy", "proxy sent bytes before the tunnel opened")


def client_tls_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """Verify the gateway's certificate unless its identity is pinned inside QUIC."""
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def dial(target: Address, *, tls: ssl.SSLContext | None, proxy: ProxySpec | None = None,
               timeout: float = SETUP_TIMEOUT) -> WebSocketLink:
    """Open the link to a gateway's TLS (WebSocket) port; `tls=None` speaks plain TCP. A
    target given by name is that name for SNI and the certificate check.

    Raises LinkSetupError naming the step that failed."""
    try:
        return await asyncio.wait_for(_dial(target, tls, proxy), timeout)
    except TimeoutError:
        raise LinkSetupError("timeout", f"no link to {format_address(target)} within "
                                        f"{timeout:g} s") from None


async def _dial(target: Address, tls: ssl.SSLContext | None,
                proxy: ProxySpec | None) -> WebSocketLink:
    server_name = None if is_numeric_host(target[0]) else target[0]
    hop = (proxy.host, proxy.port) if proxy is not None else target
    try:
        reader, writer = await asyncio.open_connection(hop[0], hop[1])
    except OSError as exc:
        what = f"proxy {format_address(hop)}" if proxy else format_address(hop)
        raise LinkSetupError("tcp_connect", f"{what}: {exc.strerror or exc}") from None
    try:
        if proxy is not None:
            await _proxy_connect(reader, writer, target, proxy)
        if tls is not None:
            try:
                await writer.start_tls(tls, server_hostname=server_name)
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                raise LinkSetupError("tls", str(exc)) from None
        ws = WSConnection(ConnectionType.CLIENT)
        host = server_name or target[0]
        writer.write(ws.send(Request(host=format_address((host, target[1])), target=WS_PATH)))
        async for event in _upgrade_events(ws, reader, "answer"):
            if isinstance(event, AcceptConnection):
                break
            if isinstance(event, RejectConnection):
                raise LinkSetupError("upgrade", f"refused with HTTP {event.status_code}")
    except BaseException:
        writer.close()
        raise
    return WebSocketLink(ws, reader, writer, transport="tls" if tls else "tcp",
                         via_proxy=proxy is not None, peer=hop)


async def _upgrade_events(ws: WSConnection, reader: asyncio.StreamReader,
                          what: str) -> AsyncIterator[Event]:
    """wsproto's events while the upgrade `what` (request, answer) is read: at most 16 KiB
    of it; a closed connection or bytes that are not HTTP are LinkSetupError("upgrade")."""
    received = 0
    while True:
        try:
            chunk = await reader.read(4096)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            raise LinkSetupError("upgrade", f"connection error: {exc}") from None
        if not chunk:
            raise LinkSetupError("upgrade", f"connection closed before the upgrade {what}")
        received += len(chunk)
        if received > MAX_HEADER_BYTES:
            raise LinkSetupError("upgrade", f"upgrade {what} larger than 16 KiB")
        try:
            ws.receive_data(chunk)
            events = list(ws.events())
        except RemoteProtocolError as exc:
            raise LinkSetupError("upgrade", f"not a WebSocket upgrade {what}: {exc}") from None
        for event in events:
            yield event


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 transport: str, peer: Address) -> WebSocketLink:
    """Server side: read the upgrade request and accept it on `WS_PATH` (anything else
    gets 404 and LinkSetupError("upgrade"))."""
    ws = WSConnection(ConnectionType.SERVER)
    async for event in _upgrade_events(ws, reader, "request"):
        if isinstance(event, Request):
            if event.target.split("?", 1)[0] != WS_PATH:
                writer.write(ws.send(RejectConnection(status_code=404)))
                raise LinkSetupError("upgrade", f"wrong path {event.target[:64]!r}")
            writer.write(ws.send(AcceptConnection()))
            return WebSocketLink(ws, reader, writer, transport=transport, via_proxy=False,
                                 peer=peer)
    raise LinkSetupError("upgrade", "no upgrade request")  # the events end only by raising
