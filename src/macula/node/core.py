"""A node as a sans-IO state machine: its gateway control connection and its sessions.

All of it rides one socket. QUIC packets for end-to-end sessions leave through a *path*
(today the gateway relay); QUIC itself only ever sees one stable virtual address per
remote node, so changing the path underneath never disturbs a live session.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any

from aioquic.quic import events as qe
from aioquic.quic.packet import PACKET_TYPE_INITIAL

from ..gateway.core import PROTOCOL_VERSION, format_address
from ..identity import Identity, NodeId
from ..net.endpoint import Address
from ..session import events as ev
from ..session.errors import PeerKeyMismatch, PeerOffline, SessionClosedError
from ..session.mux import QuicHeaderError, QuicMux, parse_header
from ..session.quic import (
    ALPN_CONTROL,
    ALPN_SESSION,
    PinnedQuicConnection,
    make_configuration,
)
from ..session.session import Session
from ..wire import control
from ..wire.demux import RELAY_FROM_GATEWAY, Kind, classify
from ..wire.relay import FROM_GATEWAY_HEADER, encode_to_gateway

log = logging.getLogger(__name__)

_MIN_INITIAL = 1200
_RECONNECT_MIN = 0.25
_RECONNECT_MAX = 5.0
_MISSED_KEEPALIVES = 3  # gateway declared dead after this many intervals without an ack


def parse_address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port))


def virtual_address(peer: NodeId) -> Address:
    """What aioquic sees as the peer's address: stable whatever path carries the packets."""
    return (f"macula:{peer.text}", 0)


class NodeCore:
    def __init__(
        self,
        identity: Identity,
        gateway: Address,
        *,
        max_message_size: int = 1 << 20,
        keepalive_interval: float = 5.0,
        session_idle_timeout: float = 60.0,
        nat_traversal: bool = True,
        local_addresses: tuple[str, ...] = (),
    ) -> None:
        self.identity = identity
        self.node_id = identity.node_id
        self.gateway = gateway
        self.max_message_size = max_message_size
        self.keepalive_interval = keepalive_interval
        self.nat_traversal = nat_traversal
        self.local_addresses = local_addresses
        self._ctl_config = make_configuration(
            identity, is_client=True, alpn=ALPN_CONTROL,
            idle_timeout=keepalive_interval * (_MISSED_KEEPALIVES + 1),
        )
        self._client_config = make_configuration(
            identity, is_client=True, alpn=ALPN_SESSION, idle_timeout=session_idle_timeout
        )
        self._server_config = make_configuration(
            identity, is_client=False, alpn=ALPN_SESSION, idle_timeout=session_idle_timeout
        )
        self._mux = QuicMux()
        self._events: deque[object] = deque()
        self._out: list[tuple[bytes, Address]] = []
        # gateway control connection
        self._control: PinnedQuicConnection | None = None
        self._ctl_stream: int | None = None
        self._ctl_decoder = control.ControlDecoder()
        self.registered = False
        self.relay_token: bytes | None = None
        self.observed: Address | None = None
        self.gateway_id: NodeId | None = None
        self._keepalive_seq = 0
        self._next_keepalive: float | None = None
        self._last_ack = 0.0
        self._reconnect_at: float | None = None
        self._reconnect_delay = _RECONNECT_MIN
        self._closing = False
        self._lookups: dict[int, NodeId] = {}
        self._next_req = 1
        # sessions, one per remote node
        self.sessions: dict[NodeId, Session] = {}
        self._by_conn: dict[PinnedQuicConnection, Session] = {}
        # figures
        self.malformed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.gateway_reconnects = 0

    # ================================================================ lifecycle
    def start(self, now: float) -> None:
        self._connect_gateway(now)

    def close(self, now: float) -> None:
        self._closing = True
        for session in list(self.sessions.values()):
            session.close("node shutting down")
            self._mux.mark(session.conn)
        if self._control is not None:
            self._control.close(error_code=0, reason_phrase="node shutting down")
            self._mux.mark(self._control)

    def _connect_gateway(self, now: float) -> None:
        conn = PinnedQuicConnection(configuration=self._ctl_config)
        conn.connect(self.gateway, now)
        self._control = conn
        self._ctl_stream = None
        self._ctl_decoder = control.ControlDecoder()
        self._reconnect_at = None
        self._mux.add(conn)

    def _gateway_lost(self, reason: str, now: float) -> None:
        was_registered = self.registered
        self.registered = False
        self.relay_token = None
        self._next_keepalive = None
        if self._control is not None:
            self._mux.remove(self._control)
            self._control = None
        if self._closing:
            return
        if was_registered:
            self._reconnect_delay = _RECONNECT_MIN
            self._events.append(ev.GatewayLost(reason))
        self._reconnect_at = now + self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, _RECONNECT_MAX)

    # ================================================================ sessions (API)
    def connect(self, peer: NodeId, now: float) -> Session:
        """Open (or return) the end-to-end session with `peer`; it starts on the relay."""
        if peer == self.node_id:
            raise ValueError("a node cannot open a session with itself")
        existing = self.sessions.get(peer)
        if existing is not None and not existing.closed:
            return existing
        conn = PinnedQuicConnection(configuration=self._client_config, expected_peer=peer)
        conn.connect(virtual_address(peer), now)
        session = Session(conn, peer, initiator=True,
                          max_message_size=self.max_message_size, now=now)
        self._add_session(session)
        return session

    def lookup(self, peer: NodeId) -> int:
        """Ask the gateway whether `peer` is online; the answer comes as an event."""
        req = self._next_req
        self._next_req += 1
        self._lookups[req] = peer
        self._send_control({"type": "lookup", "req": req, "node_id": peer.text})
        return req

    def send_message(self, peer: NodeId, data: bytes) -> None:
        session = self.sessions.get(peer)
        if session is None or session.closed:
            raise SessionClosedError(f"no open session with {peer}")
        session.send_message(data)
        self._mux.mark(session.conn)

    def touch(self, session: Session) -> None:
        """The application wrote to `session`: flush it on the next pass."""
        self._mux.mark(session.conn)

    def _add_session(self, session: Session) -> None:
        self.sessions[session.peer] = session
        self._by_conn[session.conn] = session
        self._mux.add(session.conn)

    def _remove_session(self, session: Session) -> None:
        self._by_conn.pop(session.conn, None)
        self._mux.remove(session.conn)
        if self.sessions.get(session.peer) is session:
            del self.sessions[session.peer]

    # ================================================================ datagrams in
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if addr == self.gateway:
            if data and data[0] == RELAY_FROM_GATEWAY:
                self._receive_relayed(data, now)
                return
            kind = classify(data)
            if kind is Kind.QUIC:
                self._receive_control(data, addr, now)
                return
            self.malformed[kind.value] += 1
            return
        # Nothing else talks to us directly until hole punching exists.
        self.malformed["unexpected_source"] += 1

    def _receive_control(self, data: bytes, addr: Address, now: float) -> None:
        conn = self._control
        if conn is None:
            self.dropped["no_control_connection"] += 1
            return
        try:
            header = parse_header(data)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return
        if self._mux.lookup(header.destination_cid) is not conn:
            self.dropped["unknown_connection"] += 1
            return
        conn.receive_datagram(data, addr, now)
        self._mux.mark(conn)
        self._process(conn, now)

    def _receive_relayed(self, data: bytes, now: float) -> None:
        if len(data) <= FROM_GATEWAY_HEADER:
            self.malformed["relay"] += 1
            return
        src = data[1:FROM_GATEWAY_HEADER]
        payload = data[FROM_GATEWAY_HEADER:]
        try:
            header = parse_header(payload)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return
        conn = self._mux.lookup(header.destination_cid)
        session = self._by_conn.get(conn) if conn is not None else None
        if conn is not None and (session is None or session.peer.raw != src):
            self.dropped["wrong_source"] += 1
            return
        if session is None:
            session = self._accept(src, header, len(payload), now)
            if session is None:
                return
        session.stats.count("relay", received=len(payload))
        session.conn.receive_datagram(payload, virtual_address(session.peer), now)
        self._mux.mark(session.conn)
        self._process(session.conn, now)

    def _accept(self, src: bytes, header, size: int, now: float) -> Session | None:
        if header.packet_type != PACKET_TYPE_INITIAL or size < _MIN_INITIAL:
            self.dropped["unknown_connection"] += 1
            return None
        if header.version not in self._server_config.supported_versions:
            self.dropped["unsupported_version"] += 1
            return None
        peer = NodeId(src)
        conn = PinnedQuicConnection(
            configuration=self._server_config,
            expected_peer=peer,
            original_destination_connection_id=header.destination_cid,
        )
        existing = self.sessions.get(peer)
        if existing is not None and not existing.closed and not existing.established:
            if existing.initiator and self.node_id.raw < peer.raw:
                # Both dialled at once: the lower id's dial wins; the peer will take ours.
                self.dropped["simultaneous_open_lost"] += 1
                return None
            # Our own dial (or an older half-open attempt) yields: keep the Session (and
            # anything the application already queued on it), swap the connection.
            self._by_conn.pop(existing.conn, None)
            self._mux.remove(existing.conn)
            existing.replace_connection(conn, initiator=False)
            self._by_conn[conn] = existing
            self._mux.add(conn, header.destination_cid)
            return existing
        if existing is not None and not existing.closed:
            # The peer lost its state (restart) and dials afresh: the old session is dead.
            existing.close("peer restarted")
            self._remove_session(existing)
            self._events.append(ev.SessionClosed(peer, "peer restarted"))
        session = Session(conn, peer, initiator=False,
                          max_message_size=self.max_message_size, now=now)
        self.sessions[peer] = session
        self._by_conn[conn] = session
        self._mux.add(conn, header.destination_cid)
        return session

    # ================================================================ QUIC events
    def _process(self, conn: PinnedQuicConnection, now: float) -> None:
        if conn is self._control:
            self._process_control(conn, now)
            return
        session = self._by_conn.get(conn)
        while (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if session is None:
                continue
            self._events.extend(session.handle_quic_event(event, now))
            if isinstance(event, qe.ConnectionTerminated):
                self._session_terminated(session, conn, event)
                return

    def _session_terminated(self, session: Session, conn, event: qe.ConnectionTerminated) -> None:
        self._by_conn.pop(conn, None)
        self._mux.remove(conn)
        if session.conn is not conn:
            return  # an abandoned half of a simultaneous open
        if self.sessions.get(session.peer) is session:
            del self.sessions[session.peer]
        reason = event.reason_phrase or f"error {event.error_code}"
        if session.established:
            self._events.append(ev.SessionClosed(session.peer, reason))
        elif conn.rejection:
            self._events.append(ev.SessionFailed(session.peer, PeerKeyMismatch(
                f"session with {session.peer} refused: {conn.rejection}")))
        else:
            self._events.append(ev.SessionFailed(session.peer, SessionClosedError(
                f"session with {session.peer} failed: {reason}")))

    def _process_control(self, conn: PinnedQuicConnection, now: float) -> None:
        while (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if isinstance(event, qe.HandshakeCompleted):
                self.gateway_id = conn.peer_node_id
                self._ctl_stream = conn.get_next_available_stream_id()
                self._send_control({
                    "type": "hello", "version": PROTOCOL_VERSION, "node_id": self.node_id.text,
                    "nat_traversal": self.nat_traversal,
                    "local_addresses": list(self.local_addresses),
                })
            elif isinstance(event, qe.StreamDataReceived):
                try:
                    for message in self._ctl_decoder.feed(event.data):
                        self._on_control_message(message, now)
                except control.ControlStreamError:
                    self.malformed["control"] += 1
                    conn.close(error_code=0x1, reason_phrase="control framing error")
                self.malformed["control"] += self._ctl_decoder.malformed
                self._ctl_decoder.malformed = 0
            elif isinstance(event, qe.ConnectionTerminated):
                self._gateway_lost(event.reason_phrase or f"error {event.error_code}", now)
                return

    def _on_control_message(self, msg: dict[str, Any], now: float) -> None:
        kind = msg["type"]
        try:
            if kind == "welcome":
                self.relay_token = bytes.fromhex(msg["relay_token"])
                self.observed = parse_address(msg["observed"])
                self.registered = True
                self._reconnect_delay = _RECONNECT_MIN
                self._last_ack = now
                self._next_keepalive = now + self.keepalive_interval
                self._events.append(ev.Registered(self.observed))
            elif kind == "keepalive_ack":
                self._last_ack = now
                self.observed = parse_address(msg["observed"])
            elif kind == "peer_offline":
                peer = NodeId.parse(msg["node_id"])
                session = self.sessions.get(peer)
                if session is not None and not session.established:
                    session.closed = True
                    session.close_reason = "peer offline"
                    self._remove_session(session)
                    self._events.append(ev.SessionFailed(peer, PeerOffline(peer.text)))
            elif kind == "lookup_result":
                peer = self._lookups.pop(msg["req"], None)
                if peer is not None:
                    self._events.append(ev.LookupResult(peer, msg["online"],
                        parse_address(msg["observed"]) if msg.get("observed") else None))
            elif kind == "error":
                log.warning("gateway error %s: %s", msg["code"], msg["message"])
                self._events.append(ev.GatewayError(msg["code"], msg["message"]))
            else:
                self.malformed["control"] += 1
        except ValueError:
            self.malformed["control"] += 1

    def _send_control(self, message: dict[str, Any]) -> None:
        if self._control is None or self._ctl_stream is None:
            return
        self._control.send_stream_data(self._ctl_stream, control.encode(message))
        self._mux.mark(self._control)

    # ================================================================ output, timers
    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._out = self._out, []
        for conn in self._mux.take_dirty():
            datagrams = conn.datagrams_to_send(now)
            if conn is self._control:
                out.extend(datagrams)
            else:
                session = self._by_conn.get(conn)
                if session is not None:
                    for data, _vaddr in datagrams:
                        frame = self._via_path(session, data)
                        if frame is not None:
                            out.append(frame)
            self._process(conn, now)
            self._mux.reschedule(conn)
        return out

    def _via_path(self, session: Session, data: bytes) -> tuple[bytes, Address] | None:
        if not self.registered or self.relay_token is None:
            self.dropped["no_path"] += 1  # QUIC retransmits once the relay is back
            return None
        session.stats.count("relay", sent=len(data))
        return encode_to_gateway(self.relay_token, session.peer.raw, data), self.gateway

    def get_timer(self) -> float | None:
        times = [t for t in (self._mux.next_timer(), self._next_keepalive, self._reconnect_at)
                 if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for conn in self._mux.fire_timers(now):
            self._process(conn, now)
        if self._reconnect_at is not None and now >= self._reconnect_at and not self._closing:
            self.gateway_reconnects += 1
            self._connect_gateway(now)
        if self._next_keepalive is not None and now >= self._next_keepalive:
            if now - self._last_ack > self.keepalive_interval * _MISSED_KEEPALIVES:
                self._gateway_lost("gateway stopped answering keepalives", now)
            else:
                self._keepalive_seq += 1
                self._send_control({"type": "keepalive", "seq": self._keepalive_seq})
                self._next_keepalive = now + self.keepalive_interval

    def next_event(self) -> object | None:
        return self._events.popleft() if self._events else None

    @property
    def observed_text(self) -> str | None:
        return format_address(self.observed) if self.observed else None

