"""The extra sockets hard-NAT guessing asks the I/O layer for (sans-IO bookkeeping).

Each is named by its `via` ("aux:PORT"), belongs to the peer it guesses towards, and
becomes an ICE host base only once something arrives on it (256 idle bases would swamp
the check list). What leaves through them waits here until the I/O layer takes it.
"""

from __future__ import annotations

from ..identity import NodeId
from ..net.endpoint import Address


class ExtraSockets:
    def __init__(self) -> None:
        self._owner: dict[str, tuple[NodeId, Address]] = {}  # via -> (peer, local address)
        self._offered: set[str] = set()  # offered to the peer's agent as a host base
        self._out: list[tuple[bytes, Address, str]] = []

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, via: str) -> bool:
        return via in self._owner

    def adopt(self, peer: NodeId, sockets: list[tuple[str, Address]]) -> None:
        for via, local in sockets:
            self._owner[via] = (peer, local)

    def owner(self, via: str) -> tuple[NodeId, Address] | None:
        return self._owner.get(via)

    def first_use(self, via: str) -> bool:
        """True the first time `via` carries something: it becomes a host base now."""
        if via in self._offered:
            return False
        self._offered.add(via)
        return True

    def send(self, data: bytes, addr: Address, via: str) -> None:
        self._out.append((data, addr, via))

    def take(self) -> list[tuple[bytes, Address, str]]:
        """What leaves through the extra sockets: (data, destination, via)."""
        out, self._out = self._out, []
        return out

    def release(self, peer: NodeId | None, keep: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """Forget a peer's sockets (every peer's with None), except `keep`; returns the
        vias the I/O layer must close."""
        vias = tuple(v for v, (p, _) in self._owner.items()
                     if (peer is None or p == peer) and v not in keep)
        for via in vias:
            del self._owner[via]
            self._offered.discard(via)
        return vias
