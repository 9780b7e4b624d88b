"""The datagram endpoint: the one socket a node or gateway owns, as a tiny interface.

Two implementations exist: real asyncio UDP (`macula.net.udp`) and the in-process simulated
network (`macula.lab.sim`). Everything above this layer sees only this interface, so the
same gateway and node code runs on both unmodified.
"""

from __future__ import annotations

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
