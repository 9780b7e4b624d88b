"""The gateway's TCP path: TLS on a TCP port, WebSocket upgrade, a datagram per message.

Each link gets a stand-in address (`stream_address`) and from then on is one more source
of datagrams for the gateway core, exactly like a UDP address: the same QUIC control
connection, relay frames, limits, admission and metrics. `StreamEndpoint` is the
DatagramEndpoint the core's driver runs on: UDP, plus the links by their stand-ins.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import tempfile
from collections import Counter

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..net import wslink
from ..net.endpoint import Address, DatagramEndpoint, EndpointLayer, stream_address

log = logging.getLogger(__name__)


class StreamEndpoint(EndpointLayer):
    """UDP and the TCP links as one DatagramEndpoint: a send to a link's stand-in address
    goes over that link, anything else over UDP."""

    def __init__(self, udp: DatagramEndpoint) -> None:
        super().__init__(udp)
        self.links: dict[Address, wslink.MessageLink] = {}

    def send(self, data: bytes, addr: Address) -> None:
        link = self.links.get(addr)
        if link is not None:
            link.send(data)
        else:
            self.inner.send(data, addr)

    def attach(self, addr: Address, link: wslink.MessageLink) -> None:
        """Carry datagrams for `addr` over `link` from now on (a link from the same
        address before it is closed), until the link ends."""
        old = self.links.pop(addr, None)
        if old is not None:
            old.close("replaced")
        self.links[addr] = link

        def closed(reason: str) -> None:
            if self.links.get(addr) is link:
                del self.links[addr]

        link.start(lambda data: self.deliver(data, addr), closed)

    def sweep(self, now: float, idle: float) -> int:
        """Close links that carried nothing for `idle` seconds (a node's keepalives keep
        its link busy; a link that never registers must not hold a slot). Returns how many."""
        stale = [link for link in self.links.values()
                 if now - getattr(link, "last_activity", now) > idle]
        for link in stale:
            link.close("idle")
        return len(stale)

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close("gateway closing")
        self.links.clear()
        self.inner.close()


def self_signed_pem(common_name: str = "macula-gateway") -> tuple[bytes, bytes]:
    """A certificate made now (P-256, one year) and its key, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def self_signed_context(common_name: str = "macula-gateway") -> ssl.SSLContext:
    """A server context with a certificate made now: nodes that pin the gateway id do not
    check it; the gateway's identity is proven inside QUIC."""
    cert_pem, key_pem = self_signed_pem(common_name)
    with tempfile.TemporaryDirectory(prefix="macula-tls-") as folder:
        cert_path, key_path = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        return server_context(cert_path, key_path)


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


class _HeldProtocol(asyncio.StreamReaderProtocol):
    """Reads nothing until TLS is in place: a ClientHello that arrived before start_tls
    would otherwise sit in the plain-text buffer, and the handshake would never finish."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        super().connection_made(transport)


class StreamListener:
    """Accepts TCP, runs TLS (unless `tls` is None: plain TCP, for tests) and the
    WebSocket upgrade, then attaches the link to `endpoint`. What fails is counted by step
    in `refused` (tls, upgrade, timeout, busy) and closed; nothing reaches the core."""

    def __init__(self, endpoint: StreamEndpoint, tls: ssl.SSLContext | None, *,
                 max_pending: int, max_links: int) -> None:
        self._endpoint = endpoint
        self._tls = tls
        self._max_pending = max_pending
        self._max_links = max_links
        self._pending = 0
        self._server: asyncio.Server | None = None
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.StreamReaderProtocol:
            return _HeldProtocol(asyncio.StreamReader(limit=wslink.READ_CHUNK), self._on_connection)

        self._server = await loop.create_server(protocol, host, port, reuse_address=True)

    @property
    def address(self) -> Address:
        assert self._server is not None
        sockname = self._server.sockets[0].getsockname()
        return (sockname[0], sockname[1])

    @property
    def links_open(self) -> int:
        return len(self._endpoint.links)

    @property
    def transport(self) -> str:
        return "tls" if self._tls is not None else "tcp"

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        if (self._pending >= self._max_pending
                or len(self._endpoint.links) >= self._max_links or not peername):
            self.refused["busy"] += 1
            writer.close()
            return
        peer: Address = (peername[0], peername[1])
        self._pending += 1
        if self._tls is None:
            writer.transport.resume_reading()  # type: ignore[attr-defined]
        try:
            link = await asyncio.wait_for(self._setup(reader, writer, peer), wslink.SETUP_TIMEOUT)
        except wslink.LinkSetupError as exc:
            self.refused[exc.step] += 1
            log.debug("TCP link from %s refused: %s", peer[0], exc)
            writer.close()
            return
        except (TimeoutError, ConnectionError, OSError):
            self.refused["timeout"] += 1
            writer.close()
            return
        finally:
            self._pending -= 1
        self._endpoint.attach(stream_address(peer), link)
        self.accepted += 1

    async def _setup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: Address) -> wslink.WebSocketLink:
        if self._tls is not None:
            try:
                await writer.start_tls(self._tls)
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                raise wslink.LinkSetupError("tls", str(exc)) from None
        return await wslink.accept(reader, writer, transport=self.transport, peer=peer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
