"""One end-to-end session with a remote node: messages, streams and stats over QUIC.

Messages travel on one unidirectional QUIC stream per direction, so they arrive in order
and exactly once whatever the path underneath does. Bulk data uses bidirectional streams.
The session buffers what the application sends before the handshake completes, so the
connection underneath can still be swapped (simultaneous-open race) without losing it.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aioquic.quic import events as qe

from ..identity import NodeId
from . import events as ev
from .errors import MessageTooLarge, SessionClosedError
from .quic import PinnedQuicConnection

if TYPE_CHECKING:  # the node's path state; session must not import the node layer
    from ..node.paths import PeerPaths

_LEN = struct.Struct("!I")


@dataclass
class PathRecord:
    path: ev.PathKind
    at: float  # loop clock (monotonic, or virtual in the simulator): for measuring
    since: float  # wall-clock seconds (time.time): for humans reading stats


@dataclass
class Stats:
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_by_path: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, path: ev.PathKind, sent: int = 0, received: int = 0) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        per = self.bytes_by_path.setdefault(path, {"sent": 0, "received": 0})
        per["sent"] += sent
        per["received"] += received


class Session:
    def __init__(
        self,
        conn: PinnedQuicConnection,
        peer: NodeId,
        *,
        initiator: bool,
        max_message_size: int,
        now: float,
        path: ev.PathKind = "relay",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock` stamps path changes for people reading stats (injected: the
        core's own `now` is a monotonic clock)."""
        self.conn = conn
        self.peer = peer
        self.initiator = initiator
        # We asked for this session (initiator can flip in a simultaneous open; this not).
        self.dialled = initiator
        self.max_message_size = max_message_size
        self.established = False
        self.closed = False
        self.close_reason = ""
        self.started_at = now
        self.established_at: float | None = None
        self.stats = Stats()
        self.path: ev.PathKind = path
        self._wall_clock = wall_clock
        self.path_history: list[PathRecord] = [PathRecord(path, now, wall_clock())]
        self._pending: list[tuple[str, Any]] = []  # app writes before the handshake
        self._send_stream: int | None = None
        self._recv_stream: int | None = None
        self._recv_buffer = bytearray()
        self._known_streams: set[int] = set()
        # The node's PeerPaths for this peer (direct path, punch outcomes), when it has one.
        self.paths: PeerPaths | None = None  # set by the node core: this peer's paths

    # ---- application side ----
    def send_message(self, data: bytes) -> None:
        if len(data) > self.max_message_size:
            raise MessageTooLarge(len(data), self.max_message_size)
        if self.closed:
            raise SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        frame = _LEN.pack(len(data)) + bytes(data)
        if not self.established:
            self._pending.append(("msg", frame))
            return
        self._write_message_frame(frame)

    def open_stream(self) -> int:
        if self.closed:
            raise SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        if not self.established:
            raise SessionClosedError("session not established yet")
        stream_id = self.conn.get_next_available_stream_id()
        self._known_streams.add(stream_id)
        return stream_id

    def write_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if self.closed:
            raise SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        self.conn.send_stream_data(stream_id, data, end_stream=end)

    def stream_buffered(self, stream_id: int) -> int:
        """Bytes written but not yet acknowledged: the application's backpressure signal."""
        stream = self.conn._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def stream_consumed(self, stream_id: int, count: int, *, finished: bool = False) -> bool:
        """The application read `count` bytes; True when a window update should go out."""
        if finished:
            self.conn.forget_stream(stream_id)
            return False
        return self.conn.consume_stream(stream_id, count)

    def ping(self, uid: int) -> None:
        """Send a QUIC PING on the current path; PingAnswered(uid) follows its ACK."""
        if self.closed:
            raise SessionClosedError(f"session with {self.peer} is closed: {self.close_reason}")
        self.conn.send_ping(uid)

    def messages_buffered(self) -> int:
        if self._send_stream is None:
            return sum(len(f) for k, f in self._pending if k == "msg")
        return self.stream_buffered(self._send_stream)

    def close(self, reason: str = "closed by application") -> None:
        if not self.closed:
            self.conn.close(error_code=0, reason_phrase=reason)

    # ---- fed by the node core ----
    def replace_connection(self, conn: PinnedQuicConnection, *, initiator: bool) -> None:
        assert not self.established
        self.conn = conn
        self.initiator = initiator

    def set_path(self, path: ev.PathKind, now: float) -> bool:
        if path == self.path:
            return False
        self.path = path
        self.path_history.append(PathRecord(path, now, self._wall_clock()))
        return True

    def handle_quic_event(self, event: qe.QuicEvent, now: float) -> list[object]:
        out: list[object] = []
        if isinstance(event, qe.HandshakeCompleted):
            self.established = True
            self.established_at = now
            out.append(ev.SessionEstablished(self.peer, self.initiator))
            for _kind, frame in self._pending:
                self._write_message_frame(frame)
            self._pending.clear()
        elif isinstance(event, qe.StreamDataReceived):
            out.extend(self._on_stream_data(event))
        elif isinstance(event, qe.PingAcknowledged):
            out.append(ev.PingAnswered(self.peer, event.uid))
        elif isinstance(event, qe.ConnectionTerminated):
            self.closed = True
            self.close_reason = event.reason_phrase or f"error {event.error_code}"
        return out

    def _write_message_frame(self, frame: bytes) -> None:
        if self._send_stream is None:
            self._send_stream = self.conn.get_next_available_stream_id(is_unidirectional=True)
        self.conn.send_stream_data(self._send_stream, frame)

    def _on_stream_data(self, event: qe.StreamDataReceived) -> list[object]:
        sid = event.stream_id
        is_uni = bool(sid & 0x2)
        if is_uni:
            if self._recv_stream is None:
                self._recv_stream = sid
            if sid != self._recv_stream:
                return []  # a second message stream is not part of the protocol
            self._recv_buffer += event.data
            return list(self._parse_messages())
        out: list[object] = []
        if sid not in self._known_streams:
            self._known_streams.add(sid)
            out.append(ev.StreamOpened(self.peer, sid))
        out.append(ev.StreamData(self.peer, sid, event.data, event.end_stream))
        return out

    def _parse_messages(self) -> Iterator[ev.MessageReceived]:
        buf = self._recv_buffer
        while len(buf) >= 4:
            (length,) = _LEN.unpack_from(buf)
            if length > self.max_message_size:
                # The peer broke our limit: this is a protocol violation, not a message.
                self.conn.close(error_code=0x1, reason_phrase="message exceeds max_message_size")
                buf.clear()
                return
            if len(buf) < 4 + length:
                return
            data = bytes(buf[4:4 + length])
            del buf[:4 + length]
            yield ev.MessageReceived(self.peer, data)

    # ---- stats, as the seed's get_connection_stats ----
    def connection_stats(self) -> dict[str, Any]:
        rtt = self.conn.smoothed_rtt
        paths: dict[str, Any] = self.paths.stats() if self.paths is not None else {}
        if self.path == "direct" and paths.get("direct_rtt_ms") is not None:
            rtt = paths["direct_rtt_ms"] / 1000  # the live path's RTT, not QUIC's history
        return {
            "peer": self.peer.text,
            "connection_type": self.path,
            "latency_ms": round(rtt * 1000, 3) if rtt is not None else None,
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
            "bytes_by_path": {k: dict(v) for k, v in self.stats.bytes_by_path.items()},
            "established": self.established,
            "established_ms": (
                round((self.established_at - self.started_at) * 1000, 3)
                if self.established_at is not None else None
            ),
            "path_history": [{"path": r.path, "at": r.at, "since": r.since} for r in self.path_history],
            "closed": self.closed,
            "upgrade": {
                "upgrade_ms": paths.get("upgrade_ms"),
                "attempts": paths.get("attempts", 0),
                "outcomes": paths.get("outcomes", []),
                "upgrades": paths.get("upgrades", 0),
                "fallbacks": paths.get("fallbacks", 0),
                # Relayed packets also copied onto the pair the peer's check came on.
                "early_copies": paths.get("early_copies", 0),
                "direct_address": paths.get("direct_address"),
                "hard_nat": paths.get("hard_nat"),  # the last port-guessing run, if any
            },
            "ice": {"ice_ms": paths.get("ice_ms"), "state": paths.get("ice_state"),
                    "selected": paths.get("selected_kind")},
        }
