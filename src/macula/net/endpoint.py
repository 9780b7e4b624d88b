"""The datagram endpoint: the one socket a node or gateway owns, as a tiny interface.

Two implementations exist: real asyncio UDP (`macula.net.udp`) and the in-process simulated
network (`macula.lab.sim`). Everything above this layer sees only this interface, so the
same gateway and node code runs on both unmodified.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Protocol

# ("203.0.113.10", 9443). Hosts are always numeric IP text, never names.
Address = tuple[str, int]
Receiver = Callable[[bytes, Address], object]  # what it returns is ignored


def same_family(target: Address, addresses: Iterable[Address]) -> Address | None:
    """The first of `addresses` in `target`'s IP family: a reflexive address's base, or
    our host address facing a peer."""
    v6 = ":" in target[0]
    return next((a for a in addresses if (":" in a[0]) == v6), None)


def is_numeric_host(host: str) -> bool:
    """Whether `host` is IP text (as addresses here always are) rather than a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def format_address(addr: Address) -> str:
    """ "host:port", with an IPv6 host in brackets (config.parse_host_port reads it back)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DatagramEndpoint(Protocol):
    """One bound UDP socket. Sending never blocks; delivery is best effort, as with UDP."""

    @property
    def local_address(self) -> Address: ...

    def send(self, data: bytes, addr: Address) -> None:
        """Queue one datagram to `addr`. Errors (unreachable, full buffers) are swallowed
        and counted: UDP senders must not crash because one peer went away."""

    def set_receiver(self, receiver: Receiver) -> None:
        """Every datagram that arrives is handed to `receiver(data, source_addr)`."""

    def close(self) -> None: ...


class EndpointLayer:
    """A DatagramEndpoint over another (`inner`: the UDP socket, or another layer) that
    carries some datagrams another way: subclasses override `send` and hand what arrives
    their way to `deliver`. Receiving from `inner`, batch ends and closing pass through."""

    def __init__(self, inner: DatagramEndpoint) -> None:
        self.inner = inner
        self._receiver: Receiver = _nowhere
        self._batch_end: Callable[[], None] | None = None
        if getattr(inner, "set_batch_end", None) is not None:
            # Only then: the driver flushes per batch when the endpoint says it batches.
            self.set_batch_end = self._set_batch_end

    @property
    def local_address(self) -> Address:
        return self.inner.local_address

    def _set_batch_end(self, callback: Callable[[], None]) -> None:
        self._batch_end = callback
        self.inner.set_batch_end(callback)  # type: ignore[attr-defined]

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver
        self.inner.set_receiver(receiver)

    def send(self, data: bytes, addr: Address) -> None:
        self.inner.send(data, addr)

    def deliver(self, data: bytes, addr: Address) -> None:
        """A datagram that came another way: handed on as if from `addr`, then a batch end
        (the driver flushes)."""
        self._receiver(data, addr)
        if self._batch_end is not None:
            self._batch_end()

    def close(self) -> None:
        self.inner.close()


def _nowhere(data: bytes, addr: Address) -> None:
    """The receiver before one is set."""


# A node on the gateway's TCP path has no UDP address: the gateway names it by a stand-in
# in 100::/64 (RFC 6666, discard-only), which no UDP packet can come from. The low 64 bits
# hold the node's IPv4 address (or the low half of its IPv6 one), so per-IP limits apply
# to the real source; the port is its TCP port.
_STREAM_PREFIX = "100::"


def stream_address(peer: Address) -> Address:
    """The stand-in address a gateway gives the TCP link from `peer`."""
    ip = ipaddress.ip_address(peer[0])
    low = int(ip) & ((1 << 64) - 1)
    return (str(ipaddress.IPv6Address((0x100 << 112) | low)), peer[1])


def is_stream_address(addr: Address) -> bool:
    """Whether `addr` is a stand-in for a TCP link (never a candidate for UDP)."""
    return addr[0].startswith(_STREAM_PREFIX)
