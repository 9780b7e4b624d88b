"""A node's link to its gateway (sans-IO): the QUIC control connection, registration,
keepalives and reconnecting with backoff.

The link owns the control connection and the state registration gives (relay token,
observed address, the gateway's STUN sockets). It handles `welcome` and `keepalive_ack`
itself and hands every other control message, and what happened to the link, to the node
core as typed events. It shares the node's QuicMux: one socket carries everything.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from aioquic.quic import events as qe

from ..config import parse_host_port
from ..identity import Identity, NodeId
from ..logsafe import Throttle, clip
from ..net.endpoint import Address
from ..session.mux import QuicHeaderError, QuicMux, parse_header
from ..session.quic import (
    ALPN_CONTROL,
    CONTROL_CONNECTION_ID_LIMIT,
    ERROR_REPLACED,
    PinnedQuicConnection,
    make_configuration,
)
from ..wire import control
from .options import NodeOptions

log = logging.getLogger(__name__)
_throttle = Throttle()

RECONNECT_MIN = 0.25
RECONNECT_MAX = 5.0
MISSED_KEEPALIVES = 3  # gateway declared dead after this many intervals without an ack
# While the relay carries session traffic, keepalives tell the gateway within a second
# when a NAT rebinding moved us (the relay checks the sender's address on every frame).
RELAY_KEEPALIVE = 1.0
RELAY_ACTIVE_FOR = 5.0
MAX_GATEWAY_STUN = 4
# With other gateways to move to (node.gateways), the home is checked every 2 s and a
# keepalive unanswered for FAILOVER_PROBE (or 4 RTTs) is followed by the next at once:
# two in a row unanswered and the node moves, 0.6-2.6 s after its home went. (Every
# second would halve that and cost each gateway 2.5 times the idle CPU per node.)
FAILOVER_KEEPALIVE = 2.0
MIN_FOLLOWED_KEEPALIVE = 1.0  # however short the NAT's state lives, no more than 1/s
FAILOVER_PROBE = 0.3
FAILOVER_MISSED = 2


@dataclass(frozen=True)
class LinkUp:
    """The control handshake completed: the node says hello now."""


@dataclass(frozen=True)
class LinkRegistered:
    """The gateway welcomed us (again, after a reconnect)."""

    observed: Address


@dataclass(frozen=True)
class LinkAddressMoved:
    """A keepalive answer shows our address as the gateway sees it changed."""

    observed: Address


@dataclass(frozen=True)
class LinkKeepaliveAnswered:
    """A keepalive was answered (our address did not move)."""


@dataclass(frozen=True)
class LinkLost:
    """The control connection ended; a reconnect is scheduled unless we are closing.
    `presented` is set when the handshake was refused because the gateway's key is not
    the pinned one: the id it presented."""

    reason: str
    was_registered: bool
    presented: NodeId | None = None
    replaced: bool = False  # our key registered again elsewhere: no reconnect


@dataclass(frozen=True)
class LinkMessage:
    """Any other control message from the gateway, already schema-checked."""

    message: control.ControlMessage


LinkEvent = LinkUp | LinkRegistered | LinkAddressMoved | LinkKeepaliveAnswered | LinkLost | LinkMessage


class GatewayLink:
    def __init__(self, identity: Identity, options: NodeOptions, mux: QuicMux, *,
                 malformed: Counter[str], dropped: Counter[str]) -> None:
        """`malformed` and `dropped` are the node's counters: what the link refuses is
        counted with everything else the node refuses."""
        self.gateway = options.gateway
        self.pinned_id = options.gateway_id
        self.gateway_id: NodeId | None = None  # the key the gateway proved, once it has
        self._keepalive_interval = options.keepalive_interval
        self._failover = len(options.gateways) > 1
        self._missed_limit = MISSED_KEEPALIVES
        if self._failover:
            self._keepalive_interval = min(self._keepalive_interval, FAILOVER_KEEPALIVE)
            self._missed_limit = FAILOVER_MISSED
        self._configured_keepalive = self._keepalive_interval
        self._config = make_configuration(
            identity, is_client=True, alpn=ALPN_CONTROL,
            idle_timeout=self._keepalive_interval * (self._missed_limit + 1),
        )
        self._mux = mux
        self.conn: PinnedQuicConnection | None = None
        self._stream: int | None = None
        self._decoder = control.ControlDecoder()
        self.registered = False
        self.relay_token: bytes | None = None
        self.observed: Address | None = None
        # The gateway's STUN sockets from its welcome: NAT behaviour discovery runs there.
        self.stun_sockets: list[Address] = []
        self._keepalive_seq = 0
        self._unacked_keepalives = 0
        self._next_keepalive: float | None = None
        self._relay_active_at = -1e9
        self._reconnect_at: float | None = None
        self._reconnect_delay = RECONNECT_MIN
        self._last_rtt: float | None = None
        self.closing = False
        self.reconnects = 0
        self.malformed = malformed
        self.dropped = dropped

    @property
    def rtt(self) -> float | None:
        """The control connection's smoothed RTT, or the last one known before it ended."""
        rtt = self.conn.smoothed_rtt if self.conn is not None else None
        return rtt if rtt is not None else self._last_rtt

    # ------------------------------------------------------------------ lifecycle
    def connect(self, now: float) -> None:
        conn = PinnedQuicConnection(configuration=self._config, expected_peer=self.pinned_id,
                                    active_connection_id_limit=CONTROL_CONNECTION_ID_LIMIT)
        conn.connect(self.gateway, now)
        self.conn = conn
        self._stream = None
        self._decoder = control.ControlDecoder()
        self._reconnect_at = None
        self._mux.add(conn)

    def close(self) -> None:
        self.closing = True
        if self.conn is not None:
            self.conn.close(error_code=0, reason_phrase="node shutting down")
            self._mux.mark(self.conn)

    def _lost(self, reason: str, now: float, presented: NodeId | None = None,
              replaced: bool = False) -> LinkLost:
        was_registered = self.registered
        self._forget_connection()
        if not self.closing:
            if was_registered:
                self._reconnect_delay = RECONNECT_MIN
            self._reconnect_at = now + self._reconnect_delay
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX)
        return LinkLost(reason, was_registered, presented, replaced)

    def _forget_connection(self) -> None:
        """The control connection is gone (or left): so is what registration gave us."""
        self._last_rtt = self.rtt  # the next registration's race against the link uses it
        self.registered = False
        self.relay_token = None
        self._next_keepalive = None
        if self.conn is not None:
            self._mux.remove(self.conn)
            self.conn = None

    # ------------------------------------------------------------------ datagrams
    def receive(self, data: bytes, addr: Address, now: float) -> bool:
        """A QUIC packet from the gateway's address (not a relay frame, not STUN); True if
        the control connection took it (then `process` says what it meant)."""
        conn = self.conn
        if conn is None:
            self.dropped["no_control_connection"] += 1
            return False
        try:
            header = parse_header(data)
        except QuicHeaderError:
            self.malformed["quic"] += 1
            return False
        if self._mux.lookup(header.destination_cid) is not conn:
            self.dropped["unknown_connection"] += 1
            return False
        conn.receive_datagram(data, addr, now)
        self._mux.mark(conn)
        return True

    def process(self, now: float) -> Iterator[LinkEvent]:
        """What the control connection's QUIC events mean, one at a time: the node acts
        on each before the next is read, as if it were handled inline."""
        conn = self.conn
        while conn is not None and (event := conn.next_event()) is not None:
            self._mux.track_cid_event(conn, event)
            if isinstance(event, qe.HandshakeCompleted):
                self._stream = conn.get_next_available_stream_id()
                self.gateway_id = conn.peer_node_id
                yield LinkUp()
            elif isinstance(event, qe.StreamDataReceived):
                try:
                    for message in self._decoder.feed(event.data):
                        yield from self._on_message(message, now)
                except control.ControlStreamError:
                    self.malformed["control"] += 1
                    conn.close(error_code=0x1, reason_phrase="control framing error")
                self.malformed["control"] += self._decoder.malformed
                self._decoder.malformed = 0
            elif isinstance(event, qe.ConnectionTerminated):
                reason = conn.rejection or event.reason_phrase or f"error {event.error_code}"
                replaced = event.error_code == ERROR_REPLACED
                # Another process registered with our key: reconnecting would take the
                # registration back and forth between the two for ever.
                self.closing = self.closing or replaced
                yield self._lost(reason, now, conn.presented_peer, replaced)
                return

    def _on_message(self, msg: control.ControlMessage, now: float) -> Iterator[LinkEvent]:
        try:
            if isinstance(msg, control.Welcome):
                self.relay_token = bytes.fromhex(msg.relay_token)
                self.observed = parse_host_port(msg.observed)
                self.registered = True
                self._reconnect_delay = RECONNECT_MIN
                self._unacked_keepalives = 0
                self._next_keepalive = now + self._keepalive_gap(now)
                self.stun_sockets = [parse_host_port(a) for a in msg.stun][:MAX_GATEWAY_STUN]
                if msg.replaced:
                    _throttle.log(log, logging.WARNING, "replaced", "gateway: a connection "
                                  "with this node's key from %s was open (another process "
                                  "with this key, or this node before a restart); it has "
                                  "been closed", clip(msg.replaced, 64))
                yield LinkRegistered(self.observed)
            elif isinstance(msg, control.KeepaliveAck):
                self._unacked_keepalives = 0
                observed = parse_host_port(msg.observed)
                moved = observed != self.observed
                self.observed = observed
                yield LinkAddressMoved(observed) if moved else LinkKeepaliveAnswered()
            else:
                yield LinkMessage(msg)
        except ValueError:  # InvalidValue too: an address or token that does not parse
            self.malformed["control"] += 1

    def send(self, message: control.ControlMessage) -> None:
        """A control message to the gateway; dropped while there is no link (the caller's
        state machines retry what matters)."""
        if self.conn is None or self._stream is None:
            return
        self.conn.send_stream_data(self._stream, control.encode(message))
        self._mux.mark(self.conn)

    # ------------------------------------------------------------------ time
    def get_timer(self) -> float | None:
        times = [t for t in (self._next_keepalive, self._reconnect_at) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[LinkEvent]:
        if self._reconnect_at is not None and now >= self._reconnect_at and not self.closing:
            self.reconnects += 1
            self.connect(now)
        if self._next_keepalive is not None and now >= self._next_keepalive:
            if self._unacked_keepalives >= self._missed_limit:
                return [self._lost("gateway stopped answering keepalives", now)]
            self._unacked_keepalives += 1
            self._keepalive_seq += 1
            self.send(control.Keepalive(self._keepalive_seq))
            self._next_keepalive = now + self._keepalive_gap(now)
        return []

    def restart_handshake(self, now: float) -> None:
        """The carrier under us changed before registration: start the handshake again now,
        so its first packet goes out on the new carrier at once instead of at the next
        retransmission, which QUIC has backed off to a second or more."""
        if self.registered or self.closing:
            return
        if self.conn is not None:
            self._mux.remove(self.conn)
            self.conn = None
        self.connect(now)

    def retarget(self, gateway: Address, pinned: NodeId | None, now: float) -> list[bytes]:
        """Home on another gateway of the cluster now: the current connection (if any)
        says goodbye (its CONNECTION_CLOSE is returned, for the old address) and a new
        one starts at `gateway`."""
        goodbye: list[bytes] = []
        if self.conn is not None:
            self.conn.close(error_code=0, reason_phrase="moving to another gateway")
            goodbye = [data for data, _addr in self.conn.datagrams_to_send(now)]
        self._forget_connection()
        self._unacked_keepalives = 0
        self._reconnect_delay = RECONNECT_MIN
        self.gateway, self.pinned_id, self.gateway_id = gateway, pinned, None
        self.connect(now)
        return goodbye

    def keepalive_now(self, now: float) -> None:
        """The network changed: ask the gateway at once instead of at the next interval
        (the packet also shows it our new address, which it validates and follows)."""
        if self._next_keepalive is not None:
            self._next_keepalive = now

    def note_relay_activity(self, now: float) -> None:
        """Session traffic rides the relay: keep the gateway's view of us fresh."""
        if now - self._relay_active_at > 1.0:
            self._relay_active_at = now
            if self._next_keepalive is not None:
                self._next_keepalive = min(self._next_keepalive, now + RELAY_KEEPALIVE)

    def follow_lifetime(self, keepalive_s: float | None) -> None:
        """The network's NAT drops idle state sooner than our keepalive interval: send
        them at most `keepalive_s` apart (None: the configured interval again). The
        connection's idle timeout only ever grows with the interval, so it stays."""
        interval = self._configured_keepalive
        if keepalive_s is not None:
            interval = min(interval, max(MIN_FOLLOWED_KEEPALIVE, keepalive_s))
        self._keepalive_interval = interval

    @property
    def keepalive_interval(self) -> float:
        return self._keepalive_interval

    def _keepalive_gap(self, now: float) -> float:
        if self._failover and self._unacked_keepalives:
            rtt = self.rtt
            return max(FAILOVER_PROBE, 4 * rtt if rtt is not None else 0.0)
        if now - self._relay_active_at < RELAY_ACTIVE_FOR:
            return min(self._keepalive_interval, RELAY_KEEPALIVE)
        return self._keepalive_interval
