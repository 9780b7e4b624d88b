"""Real UDP: the asyncio implementation of DatagramEndpoint.

We read the socket ourselves rather than through asyncio's datagram transport: that
transport wakes the loop once per datagram, while a busy relay or bulk session has many
datagrams waiting at each wake-up. We drain up to a batch per readiness callback and then
tell the owner the batch is over, so the core behind it flushes once per batch instead of
once per packet. Sends go straight to sendto: UDP has no backpressure to honour, and a full
socket buffer is a dropped datagram (counted) exactly as on the wire.

An IPv6 socket is dual-stack (IPV6_V6ONLY off): bound to "::" it serves IPv4 peers too. The
rest of the code never sees the kernel's IPv4-mapped form: '::ffff:192.0.2.1' comes up as
('192.0.2.1', port), and ('192.0.2.1', port) is sent as '::ffff:192.0.2.1'. Addresses are
always (host, port) 2-tuples, whatever the family.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from .endpoint import Address, Receiver

log = logging.getLogger(__name__)

# Big socket buffers: a relay forwards bursts from many nodes at once.
_SOCKET_BUFFER = 4 * 1024 * 1024
# Datagrams read per wake-up: enough to amortise the flush, small enough to stay fair to
# the loop's other work.
_BATCH = 64
_MAX_DATAGRAM = 65535
_MAPPED = "::ffff:"  # IPv4-mapped IPv6 prefix (RFC 4291 2.5.5.2), as the kernel writes it


class UdpEndpoint:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        self._receiver: Receiver | None = None
        self._batch_end: Callable[[], None] | None = None
        sockname = sock.getsockname()
        self._v6 = sock.family == socket.AF_INET6
        self._local = (_unmap(sockname[0]) if self._v6 else sockname[0], sockname[1])
        self.send_errors = 0
        self.receive_errors = 0
        self._closed = False
        loop.add_reader(sock.fileno(), self._read_ready)

    @property
    def local_address(self) -> Address:
        return self._local

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def set_batch_end(self, callback: Callable[[], None]) -> None:
        """Called after each batch of datagrams handed to the receiver."""
        self._batch_end = callback

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        v6 = self._v6
        delivered = 0
        for _ in range(_BATCH):
            try:
                data, addr = recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An ICMP error queued on the socket: counted, never fatal.
                self.receive_errors += 1
                continue
            if self._receiver is not None:
                self._receiver(data, (_unmap(addr[0]) if v6 else addr[0], addr[1]))
                delivered += 1
        if delivered and self._batch_end is not None:
            self._batch_end()

    def send(self, data: bytes, addr: Address) -> None:
        if self._closed:
            self.send_errors += 1
            return
        if self._v6 and ":" not in addr[0]:
            addr = (_MAPPED + addr[0], addr[1])
        try:
            self._sock.sendto(data, addr)
        except OSError:  # buffer full, unreachable, bad address: a lost datagram
            self.send_errors += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._sock.fileno())
        except (ValueError, RuntimeError):  # loop already closed
            pass
        self._sock.close()


def _unmap(host: str) -> str:
    return host[7:] if host.startswith(_MAPPED) and "." in host else host


async def open_udp_endpoint(host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
    """Bind one UDP socket on host:port (port 0 picks a free one). An IPv6 host gives a
    dual-stack socket: "::" receives and sends IPv4 as well."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:  # pragma: no cover - a platform without dual-stack sockets
            pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
    except OSError:  # pragma: no cover - platform limits
        pass
    sock.setblocking(False)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return UdpEndpoint(sock, loop)
