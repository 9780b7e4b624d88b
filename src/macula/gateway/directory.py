"""The cluster's shared directory: which node is online at which gateway, and which
gateways are members. Records, the store interface, and the in-process store.

A store holds two kinds of record, each with a time to live: a node's (its home gateway,
the address the home sees, NAT type and allocation, its RTT to the home) and a gateway's
(its id, mesh address, load, whether it is draining). Every change is also announced on
the store's change feed, so the other gateways' caches follow within a round trip to the
store; a snapshot (at start, after an outage, and now and then) catches up whatever the
feed missed. The gateways' hot paths never wait on the store: they read their own cache
(gateway/cluster.py), and the driver syncs it in batches (gateway/cluster_sync.py).

`MemoryStore` is the in-process store of the simulator and of tests; `RedisStore`
(gateway/redis_store.py) is the real one. One contract suite runs against both
(tests/test_directory_store.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import parse_host_port
from ..errors import InvalidValue, MaculaError
from ..identity import NodeId
from ..net.endpoint import Address, format_address

RECORD_VERSION = 1
# Change-feed messages: b"+" + a node record, or b"-" + "HOME NODE" (a node withdrawn by
# the gateway it was homed at).
ADDED, REMOVED = b"+", b"-"


class StoreUnavailable(MaculaError):
    """The store cannot be reached (or answered with an error): the caller keeps serving
    from what it knows and tries again later."""


class RecordError(InvalidValue):
    """A record in the store that does not parse (another version wrote it, or garbage):
    skipped and counted."""


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node_id: NodeId
    home: NodeId  # the gateway holding the node's control connection
    address: Address  # as the home gateway sees it
    nat_type: str = "unknown"
    port_allocation: str = "unknown"
    hard_nat: bool = False
    nat_traversal: bool = True
    local_addresses: tuple[str, ...] = ()
    rtt: float = 0.05  # seconds, the home's control-connection RTT to the node

    def encode(self) -> bytes:
        return json.dumps({
            "v": RECORD_VERSION, "node": self.node_id.text, "home": self.home.text,
            "address": format_address(self.address), "nat_type": self.nat_type,
            "port_allocation": self.port_allocation, "hard_nat": self.hard_nat,
            "nat_traversal": self.nat_traversal, "local": list(self.local_addresses),
            "rtt_ms": round(self.rtt * 1000, 3)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeRecord:
        obj = _object(data)
        try:
            local = obj.get("local", [])
            if not (isinstance(local, list) and all(isinstance(a, str) for a in local)):
                raise RecordError("local: expected a list of strings")
            return cls(
                node_id=NodeId.parse(_text(obj, "node")), home=NodeId.parse(_text(obj, "home")),
                address=parse_host_port(_text(obj, "address")),
                nat_type=_text(obj, "nat_type")[:32],
                port_allocation=_text(obj, "port_allocation")[:32],
                hard_nat=_flag(obj, "hard_nat"), nat_traversal=_flag(obj, "nat_traversal"),
                local_addresses=tuple(a[:64] for a in local[:16]),
                rtt=min(max(_number(obj, "rtt_ms"), 0.0), 10_000.0) / 1000)
        except ValueError as exc:  # a bad node id or address
            raise RecordError(f"node record: {exc}") from None


@dataclass(frozen=True, slots=True)
class MemberRecord:
    gateway_id: NodeId
    mesh: Address  # where the other members reach it (its main UDP socket)
    nodes: int = 0  # registered nodes: the load
    draining: bool = False

    def encode(self) -> bytes:
        return json.dumps({"v": RECORD_VERSION, "gateway": self.gateway_id.text,
                           "mesh": format_address(self.mesh), "nodes": self.nodes,
                           "draining": self.draining}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        obj = _object(data)
        try:
            return cls(NodeId.parse(_text(obj, "gateway")), parse_host_port(_text(obj, "mesh")),
                       int(_number(obj, "nodes")), _flag(obj, "draining"))
        except ValueError as exc:
            raise RecordError(f"member record: {exc}") from None


def _object(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RecordError(f"record is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError("record is not a JSON object")
    if obj.get("v") != RECORD_VERSION:
        raise RecordError(f"record version {str(obj.get('v'))[:16]!r}, "
                          f"this gateway reads {RECORD_VERSION}")
    return obj


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{key}: expected a string")
    return value


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key)
    if not isinstance(value, bool):
        raise RecordError(f"{key}: expected true or false")
    return value


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or abs(value) > 1e12:
        raise RecordError(f"{key}: expected a number")
    return float(value)


@dataclass
class Snapshot:
    """Everything in the store now, as stored (the reader parses and counts bad ones)."""

    nodes: list[bytes] = field(default_factory=list)
    members: list[bytes] = field(default_factory=list)


class DirectoryStore(Protocol):
    """What a gateway needs of the store. Every method raises StoreUnavailable when the
    store cannot be reached; none is ever called on a packet's path."""

    async def publish(self, records: Sequence[NodeRecord], ttl: float) -> None:
        """Write (or replace) these node records, each expiring after `ttl` seconds, and
        announce each on the change feed."""

    async def refresh(self, node_ids: Sequence[NodeId], ttl: float) -> None:
        """Push these records' expiry `ttl` seconds out (a home's periodic renewal)."""

    async def withdraw(self, home: NodeId, node_ids: Sequence[NodeId]) -> None:
        """Remove these nodes' records, each only if `home` still holds it (a node that
        moved to another gateway keeps its new record), and announce it."""

    async def announce(self, member: MemberRecord, ttl: float) -> None:
        """Write this gateway's member record, expiring after `ttl` seconds."""

    async def leave(self, gateway_id: NodeId) -> None:
        """Remove this gateway's member record (it is shutting down)."""

    async def snapshot(self) -> Snapshot: ...

    async def members(self) -> list[bytes]:
        """The member records alone (read every second; the node records are many)."""

    async def lookup(self, node_ids: Sequence[NodeId]) -> list[bytes | None]:
        """These nodes' records as stored (None: not online anywhere), in order."""

    def changes(self) -> AsyncGenerator[bytes, None]:
        """The change feed from now on; ends with StoreUnavailable when the store goes."""

    async def close(self) -> None: ...


class MemoryStore:
    """The store in one process, for the simulator and tests: the same semantics as Redis
    (expiry, compare-and-delete, a change feed), on an injected clock. `available = False`
    makes every call fail as an unreachable Redis does (the lab's redis-down fault)."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self._nodes: dict[bytes, tuple[bytes, NodeId, float]] = {}  # raw -> (record, home, expiry)
        self._members: dict[bytes, tuple[bytes, float]] = {}
        self._feeds: list[asyncio.Queue[bytes | None]] = []
        self.available = True

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("store unavailable (MemoryStore.available is False)")

    def set_available(self, available: bool) -> None:
        """The lab's outage switch: going away ends every change feed, as a dropped
        connection to Redis does."""
        self.available = available
        if not available:
            for feed in self._feeds:
                feed.put_nowait(None)
            self._feeds.clear()

    def clear(self) -> None:
        """Forget everything (the lab's Redis restart without persistence)."""
        self._nodes.clear()
        self._members.clear()

    def _announce(self, message: bytes) -> None:
        for feed in self._feeds:
            feed.put_nowait(message)

    async def publish(self, records: Sequence[NodeRecord], ttl: float) -> None:
        self._check()
        expiry = self._now() + ttl
        for record in records:
            data = record.encode()
            self._nodes[record.node_id.raw] = (data, record.home, expiry)
            self._announce(ADDED + data)

    async def refresh(self, node_ids: Sequence[NodeId], ttl: float) -> None:
        self._check()
        expiry = self._now() + ttl
        for node_id in node_ids:
            if (held := self._nodes.get(node_id.raw)) is not None:
                self._nodes[node_id.raw] = (held[0], held[1], expiry)

    async def withdraw(self, home: NodeId, node_ids: Sequence[NodeId]) -> None:
        self._check()
        for node_id in node_ids:
            held = self._nodes.get(node_id.raw)
            if held is not None and held[1] == home:
                del self._nodes[node_id.raw]
                self._announce(REMOVED + f"{home.text} {node_id.text}".encode())

    async def announce(self, member: MemberRecord, ttl: float) -> None:
        self._check()
        self._members[member.gateway_id.raw] = (member.encode(), self._now() + ttl)

    async def leave(self, gateway_id: NodeId) -> None:
        self._check()
        self._members.pop(gateway_id.raw, None)

    async def snapshot(self) -> Snapshot:
        self._check()
        now = self._now()
        self._nodes = {k: v for k, v in self._nodes.items() if v[2] > now}
        return Snapshot([v[0] for v in self._nodes.values()], await self.members())

    async def lookup(self, node_ids: Sequence[NodeId]) -> list[bytes | None]:
        self._check()
        now = self._now()
        held = [self._nodes.get(n.raw) for n in node_ids]
        return [h[0] if h is not None and h[2] > now else None for h in held]

    async def members(self) -> list[bytes]:
        self._check()
        now = self._now()
        self._members = {k: v for k, v in self._members.items() if v[1] > now}
        return [v[0] for v in self._members.values()]

    async def put_raw_node(self, key: bytes, data: bytes, ttl: float = 60.0) -> None:
        """Tests: a record another version (or garbage) wrote."""
        self._nodes[key] = (data, NodeId(bytes(16)), self._now() + ttl)

    async def changes(self) -> AsyncGenerator[bytes, None]:
        self._check()
        feed: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._feeds.append(feed)
        try:
            while (message := await feed.get()) is not None:
                yield message
            raise StoreUnavailable("store went away")
        finally:
            if feed in self._feeds:
                self._feeds.remove(feed)

    async def close(self) -> None:
        return None

