"""A cluster member's view of the shared directory (sans-IO): the other gateways' nodes
and the members, as last read from the store, and which of our own nodes changed since
the last write.

The gateway core reads it on its hot paths (a relay frame or a lookup for a node homed
elsewhere) without ever waiting; gateway/cluster_sync.py feeds it from the store and
writes what changed, in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

from ..identity import NodeId
from ..net.endpoint import Address
from .directory import ADDED, REMOVED, MemberRecord, NodeRecord, RecordError, Snapshot
from .registry import NodeEntry

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class RemoteHome:
    """The `session` of a node homed at another member: which one, and its RTT there."""

    gateway: NodeId
    rtt: float


def remote_entry(record: NodeRecord) -> NodeEntry:
    return NodeEntry(node_id=record.node_id, address=record.address, token=b"",
                     registered_at=0.0, last_seen=0.0, nat_traversal=record.nat_traversal,
                     local_addresses=list(record.local_addresses), nat_type=record.nat_type,
                     port_allocation=record.port_allocation, hard_nat=record.hard_nat,
                     session=RemoteHome(record.home, record.rtt))


class ClusterView:
    def __init__(self, me: NodeId) -> None:
        self.me = me
        self.remote: dict[bytes, NodeEntry] = {}  # raw node id -> a node homed elsewhere
        self.members: dict[bytes, MemberRecord] = {}  # raw gateway id -> member, not us
        # Our own nodes to write (registered or changed) and to withdraw (gone).
        self.changed: set[bytes] = set()
        self.gone: set[bytes] = set()
        # Nodes of ours the store says registered at another member since: they moved.
        self.moved_away: set[bytes] = set()
        self.bad_records = 0
        # A mesh link came from a key not (yet) in our member list: read the list now.
        self.members_wanted = False
        # Node ids asked for that we do not know: the store is asked (newer than the feed).
        self.queries: set[bytes] = set()
        # False while the store cannot be reached: lookups we cannot answer say so.
        self.directory_ok = False

    # ------------------------------------------------------------------ our nodes
    def local_changed(self, raw: bytes) -> None:
        self.changed.add(raw)
        self.gone.discard(raw)

    def local_gone(self, raw: bytes) -> None:
        self.gone.add(raw)
        self.changed.discard(raw)

    def take_changes(self) -> tuple[set[bytes], set[bytes]]:
        changed, gone, self.changed, self.gone = self.changed, self.gone, set(), set()
        return changed, gone

    def put_back(self, changed: set[bytes], gone: set[bytes]) -> None:
        """A write failed: what it carried is written with the next one (newer news on
        the same nodes wins)."""
        self.changed |= changed - self.gone
        self.gone |= gone - self.changed

    # ------------------------------------------------------------------ from the store
    def apply_change(self, message: bytes) -> None:
        """One change-feed message (bad ones are counted and skipped)."""
        try:
            if message[:1] == ADDED:
                self._apply_record(NodeRecord.decode(message[1:]))
            elif message[:1] == REMOVED:
                home_text, _, node_text = message[1:].decode("ascii").partition(" ")
                home, node = NodeId.parse(home_text), NodeId.parse(node_text)
                held = self.remote.get(node.raw)
                if held is not None and isinstance(held.session, RemoteHome) \
                        and held.session.gateway == home:
                    del self.remote[node.raw]
            else:
                raise RecordError("unknown change message")
        except (RecordError, UnicodeDecodeError, ValueError):
            self.bad_records += 1

    def _decoded(self, decode: Callable[[bytes], R], data: bytes) -> R | None:
        """A stored record, or None (counted) when it does not parse."""
        try:
            return decode(data)
        except RecordError:
            self.bad_records += 1
            return None

    def apply_answer(self, data: bytes) -> NodeEntry | None:
        """A record the store returned for a query; the node's entry if it is elsewhere."""
        record = self._decoded(NodeRecord.decode, data)
        if record is None or record.home == self.me:
            return None
        entry = self.remote[record.node_id.raw] = remote_entry(record)
        return entry

    def _apply_record(self, record: NodeRecord) -> None:
        if record.home == self.me:
            return  # our own, written by us
        self.remote[record.node_id.raw] = remote_entry(record)
        self.moved_away.add(record.node_id.raw)

    def apply_snapshot(self, snapshot: Snapshot, alive: Collection[bytes] = ()) -> None:
        """Everything the store holds: replaces the view (a missed withdrawal is gone),
        except that members we still hold a live mesh link to (`alive`) stay members with
        all their nodes: a store that restarted empty has not heard from them yet."""
        self.apply_snapshot_members(snapshot.members, alive)
        remote: dict[bytes, NodeEntry] = {
            raw: entry for raw, entry in self.remote.items()
            if isinstance(entry.session, RemoteHome) and entry.session.gateway.raw in alive}
        for data in snapshot.nodes:
            record = self._decoded(NodeRecord.decode, data)
            if record is not None and record.home != self.me:
                remote[record.node_id.raw] = remote_entry(record)
        self.remote = remote

    def apply_snapshot_members(self, records: list[bytes],
                               alive: Collection[bytes] = ()) -> None:
        members: dict[bytes, MemberRecord] = {
            raw: member for raw, member in self.members.items() if raw in alive}
        for data in records:
            member = self._decoded(MemberRecord.decode, data)
            if member is not None and member.gateway_id != self.me:
                members[member.gateway_id.raw] = member
        self.members = members

    def mesh_addresses(self) -> dict[bytes, Address]:
        return {raw: member.mesh for raw, member in self.members.items()}
