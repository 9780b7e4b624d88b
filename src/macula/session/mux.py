"""Many QUIC connections on one socket, routed by destination connection ID (sans-IO).

The node hosts its control connection to the gateway and every end-to-end session (as
client or server) on the same socket; the gateway hosts every node's control connection.
Only connections that received data, were written to, or whose timer fired are flushed, so
the cost of a packet does not grow with the number of connections.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

from aioquic._buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.packet import QuicHeader, pull_quic_header

from ..errors import InvalidValue
from .quic import PinnedQuicConnection

# aioquic's default host CID length; short headers carry no length so we must know it.
CID_LENGTH = 8


class QuicHeaderError(InvalidValue):
    pass


def parse_header(data: bytes) -> QuicHeader:
    try:
        return pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
    except (ValueError, BufferReadError) as exc:
        raise QuicHeaderError(str(exc)) from None


class QuicMux:
    def __init__(self) -> None:
        self._by_cid: dict[bytes, PinnedQuicConnection] = {}
        self._cids: dict[PinnedQuicConnection, set[bytes]] = {}
        # Insertion-ordered (a set iterates in memory-address order): the order datagrams
        # leave in must not vary between runs, or seeded simulations would not repeat.
        self._dirty: dict[PinnedQuicConnection, None] = {}
        self._timers: dict[PinnedQuicConnection, float] = {}
        self._heap: list[tuple[float, int, PinnedQuicConnection]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._cids)

    def connections(self) -> Iterable[PinnedQuicConnection]:
        return self._cids.keys()

    def add(self, conn: PinnedQuicConnection, *extra_cids: bytes) -> None:
        cids = self._cids.setdefault(conn, set())
        for cid in (conn.host_cid, *extra_cids):
            cids.add(cid)
            self._by_cid[cid] = conn
        self._dirty[conn] = None

    def remove(self, conn: PinnedQuicConnection) -> None:
        for cid in self._cids.pop(conn, ()):
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        self._dirty.pop(conn, None)
        self._timers.pop(conn, None)
        # Stale heap entries are skipped lazily, but they keep dead connections alive:
        # rebuild once they outnumber the live ones, so memory follows the live count.
        if len(self._heap) > 2 * len(self._timers) + 64:
            self._heap = [(when, next(self._seq), c) for c, when in self._timers.items()]
            heapq.heapify(self._heap)

    def lookup(self, cid: bytes) -> PinnedQuicConnection | None:
        return self._by_cid.get(cid)

    def track_cid_event(self, conn: PinnedQuicConnection, event: events.QuicEvent) -> None:
        """Keep the CID table current as aioquic issues and retires host CIDs."""
        if isinstance(event, events.ConnectionIdIssued):
            self._by_cid[event.connection_id] = conn
            self._cids.setdefault(conn, set()).add(event.connection_id)
        elif isinstance(event, events.ConnectionIdRetired):
            if self._by_cid.get(event.connection_id) is conn:
                del self._by_cid[event.connection_id]
            self._cids.get(conn, set()).discard(event.connection_id)

    def mark(self, conn: PinnedQuicConnection) -> None:
        """Something changed on conn (data in, API call): flush it on the next pass."""
        if conn in self._cids:
            self._dirty[conn] = None

    def fire_timers(self, now: float) -> list[PinnedQuicConnection]:
        fired = []
        while self._heap and self._heap[0][0] <= now:
            when, _, conn = heapq.heappop(self._heap)
            if self._timers.get(conn) != when:
                continue  # stale entry: the timer moved
            del self._timers[conn]
            conn.handle_timer(now)
            self._dirty[conn] = None
            fired.append(conn)
        return fired

    def take_dirty(self) -> list[PinnedQuicConnection]:
        dirty, self._dirty = self._dirty, {}
        return list(dirty)

    def reschedule(self, conn: PinnedQuicConnection) -> None:
        if conn not in self._cids:
            return
        when = conn.get_timer()
        if when is None:
            self._timers.pop(conn, None)
        elif self._timers.get(conn) != when:
            self._timers[conn] = when
            heapq.heappush(self._heap, (when, next(self._seq), conn))

    def get_timer(self) -> float | None:
        while self._heap:
            when, _, conn = self._heap[0]
            if self._timers.get(conn) == when:
                return when
            heapq.heappop(self._heap)
        return None
