"""Real UDP: the asyncio implementation of DatagramEndpoint."""

from __future__ import annotations

import asyncio
import logging
import socket

from .endpoint import Address, Receiver

log = logging.getLogger(__name__)

# Big socket buffers: a relay forwards bursts from many nodes at once.
_SOCKET_BUFFER = 4 * 1024 * 1024


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: "UdpEndpoint | None") -> None:
        self._endpoint = endpoint

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        if self._endpoint is not None:
            self._endpoint._deliver(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: counted, never fatal.
        if self._endpoint is not None:
            self._endpoint.send_errors += 1


class UdpEndpoint:
    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self._transport = transport
        self._receiver: Receiver | None = None
        sockname = transport.get_extra_info("sockname")
        self._local = (sockname[0], sockname[1])
        self.send_errors = 0

    @property
    def local_address(self) -> Address:
        return self._local

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def _deliver(self, data: bytes, addr: Address) -> None:
        if self._receiver is not None:
            self._receiver(data, addr)

    def send(self, data: bytes, addr: Address) -> None:
        if self._transport.is_closing():
            self.send_errors += 1
            return
        try:
            self._transport.sendto(data, addr)
        except OSError:
            self.send_errors += 1

    def close(self) -> None:
        self._transport.close()


async def open_udp_endpoint(host: str = "0.0.0.0", port: int = 0) -> UdpEndpoint:
    """Bind one UDP socket on host:port (port 0 picks a free one)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
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
    protocol = _Protocol(None)  # type: ignore[arg-type]
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    endpoint = UdpEndpoint(transport)  # type: ignore[arg-type]
    protocol._endpoint = endpoint
    return endpoint
