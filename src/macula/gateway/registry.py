"""The registry of online nodes: who is here, where the gateway sees them, their relay token.

It is an interface so a cluster of gateways can later back it with a shared store; the
in-memory one is what a single gateway uses. Lookups are by raw node id and by observed
address, both on the relay hot path, so both are plain dict lookups.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..identity import NodeId
from ..net.endpoint import Address


@dataclass(slots=True)
class NodeEntry:
    node_id: NodeId
    address: Address
    token: bytes
    registered_at: float
    last_seen: float
    nat_traversal: bool = True
    local_addresses: list[str] = field(default_factory=list)
    # What the node's RFC 5780 probe found ("unknown" until it reports).
    nat_type: str = "unknown"
    port_allocation: str = "unknown"
    hard_nat: bool = False  # it guesses ports against hard NATs (birthday probing)
    # In a CA network: the membership (macula.membership.Membership) it registered with.
    membership: Any = None
    # Opaque handle of the gateway instance holding this node's control connection.
    session: object = None


class Registry(Protocol):
    def register(self, entry: NodeEntry) -> NodeEntry | None:
        """Add or replace; returns the replaced entry (same node re-registering)."""

    def unregister(self, node_id: NodeId, session: object = None) -> NodeEntry | None:
        """Remove the node; when `session` is given, only if the entry is still that one's."""

    def get(self, raw_id: bytes) -> NodeEntry | None: ...

    def by_address(self, address: Address) -> NodeEntry | None: ...

    def update_address(self, node_id: NodeId, address: Address) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[NodeEntry]: ...


class MemoryRegistry:
    def __init__(self) -> None:
        self._by_id: dict[bytes, NodeEntry] = {}
        self._by_addr: dict[Address, NodeEntry] = {}

    def register(self, entry: NodeEntry) -> NodeEntry | None:
        old = self._by_id.get(entry.node_id.raw)
        if old is not None and self._by_addr.get(old.address) is old:
            del self._by_addr[old.address]
        # Another node may have held this address before (NAT reused the port).
        stale = self._by_addr.get(entry.address)
        if stale is not None and stale is not old:
            del self._by_id[stale.node_id.raw]
        self._by_id[entry.node_id.raw] = entry
        self._by_addr[entry.address] = entry
        return old

    def unregister(self, node_id: NodeId, session: object = None) -> NodeEntry | None:
        entry = self._by_id.get(node_id.raw)
        if entry is None or (session is not None and entry.session is not session):
            return None
        del self._by_id[node_id.raw]
        if self._by_addr.get(entry.address) is entry:
            del self._by_addr[entry.address]
        return entry

    def get(self, raw_id: bytes) -> NodeEntry | None:
        return self._by_id.get(raw_id)

    def by_address(self, address: Address) -> NodeEntry | None:
        return self._by_addr.get(address)

    def update_address(self, node_id: NodeId, address: Address) -> None:
        entry = self._by_id.get(node_id.raw)
        if entry is None or entry.address == address:
            return
        if self._by_addr.get(entry.address) is entry:
            del self._by_addr[entry.address]
        entry.address = address
        self._by_addr[address] = entry

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[NodeEntry]:
        return iter(list(self._by_id.values()))
