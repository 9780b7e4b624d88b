"""Abuse limits at the gateway: what one node, or anyone at all, may cost it.

GatewayCore asks the Limiter before it relays a frame, acts on a control message, admits a
new QUIC connection or registers a node. The Limiter answers None (go ahead) or the
control messages to send back, so the node that hits a limit is told which one: an
"error" whose code names the limit (and, for a punch request, the punch_refused its punch
state machine expects). Refusals are counted in the core's `dropped` counter, so they
reach the metrics without new plumbing.

Per node (keyed by node id, dropped when its control connection goes):
  relay_rate    token bucket over relayed payload bytes (bytes/s, burst)
  max_relay_peers        distinct destinations relayed to in the last SESSION_IDLE s
  relay_session_max_*    per (sender, destination) session: duration and byte caps, the
                         way libp2p Circuit Relay v2 limits a circuit; a capped session
                         may start afresh once it has been idle SESSION_IDLE s
  control_rate, punch_rate   token buckets over control messages / punch requests
Global:
  bad Initials     a new connection only for an Initial that decrypts (RFC 9001 5.2)
  max_handshakes   QUIC connections not yet registered; beyond it the oldest is dropped,
                   because aioquic allocates ~90 KB for every Initial it accepts and
                   Initials can come from spoofed addresses
  max_nodes        registered nodes (the core's own setting); the next hello is refused
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeVar, cast

from aioquic._buffer import Buffer
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from ..errors import InvalidValue
from ..identity import NodeId
from ..session.mux import CID_LENGTH
from ..wire import control
from ..wire.relay import MAX_PAYLOAD
from .registry import Registry

log = logging.getLogger(__name__)
Conn = TypeVar("Conn")

# A relayed session (sender -> destination) ends once it has carried nothing this long;
# QUIC keeps a live session busier than that with its own keepalives and ACKs.
SESSION_IDLE = 30.0
# Message-rate buckets hold this many seconds' worth, so a node may open many sessions
# at start-up (a punch request and a punch result each) without being refused.
BURST_SECONDS = 4.0
# Without a peer cap, idle sessions are still swept once a node has this many.
_PRUNE_AT = 1024
# At most one "error" per limit per node this often: the answers to a flood must not be
# a flood themselves.
NOTICE_INTERVAL = 1.0

Message = control.ControlMessage


@dataclass(frozen=True)
class GatewayLimits:
    """The limits' settings. 0 means unlimited everywhere except the two noted below."""

    relay_rate_bytes: int = 4 * 1024 * 1024  # relayed payload per node, bytes/s
    relay_burst_bytes: int = 8 * 1024 * 1024  # >= one full relay frame (MAX_PAYLOAD)
    max_relay_peers: int = 128
    relay_session_max_duration: float = 0.0  # seconds
    relay_session_max_bytes: int = 0
    control_rate: float = 50.0  # control messages per node, per second
    punch_rate: float = 10.0  # punch requests per node, per second
    max_handshakes: int = 1024  # > 0: the memory bound under an Initial flood
    # Once this many handshakes are half-open, a new Initial must first prove its source
    # address with a QUIC Retry token (RFC 9000 section 8.1): a spoofed flood then costs
    # one small Retry per packet, not a TLS handshake. 0: always.
    retry_above: int = 64
    # Answers (STUN, Retry) to packets whose source is not proven, per source IP per
    # second (burst: 4 s worth): nobody can aim more than this at an address through us.
    answer_rate: float = 100.0
    # Registrations per source IP per second (its /24 or /64: 4x), burst 4 s worth: one
    # host cannot mint identities and fill the registry in minutes.
    registration_rate: float = 50.0

    def __post_init__(self) -> None:
        for name in ("relay_rate_bytes", "relay_burst_bytes", "max_relay_peers",
                     "relay_session_max_duration", "relay_session_max_bytes",
                     "control_rate", "punch_rate", "retry_above", "answer_rate",
                     "registration_rate"):
            if getattr(self, name) < 0:
                raise InvalidValue(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.relay_burst_bytes < MAX_PAYLOAD:
            # A bucket smaller than one frame would refuse every full-size packet.
            raise InvalidValue(f"relay_burst_bytes must be >= {MAX_PAYLOAD} (one full relay "
                             f"frame), got {self.relay_burst_bytes}")
        if self.max_handshakes < 1:
            raise InvalidValue(f"max_handshakes must be >= 1, got {self.max_handshakes}")


class TokenBucket:
    """`rate` units per second, at most `burst` saved up; starts full."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def take(self, amount: float, now: float) -> bool:
        if now > self.at:  # a clock that steps back refills nothing, and costs nothing
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class PerSourceLimiter:
    """A token bucket per source key (an IP, or its /24 or /64 prefix), counted under
    `reason` when empty. The table is bounded: past `MAX_SOURCES` the oldest go."""

    MAX_SOURCES = 65_536

    def __init__(self, rate: float, dropped: Counter[str], reason: str) -> None:
        self._rate = rate
        self._buckets: dict[str, TokenBucket] = {}
        self._dropped = dropped
        self._reason = reason

    def allow(self, key: str, now: float) -> bool:
        if self._rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_SOURCES:
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(self._rate, self._rate * BURST_SECONDS,
                                                      now)
        if bucket.take(1, now):
            return True
        self._dropped[self._reason] += 1
        return False

    def __len__(self) -> int:
        return len(self._buckets)


def source_prefix(ip: str) -> str:
    """The network a source sits in, for limits one host must not dodge by renumbering:
    its /24 (IPv4) or /64 (IPv6)."""
    net = ipaddress.ip_network(f"{ip}/{24 if ':' not in ip else 64}", strict=False)
    return str(net)


class RegistrationLimiter:
    """Registrations per source IP and per source prefix (4x the rate). Only hellos count:
    a node got there through a completed handshake, so its address is proven and nobody
    can spend another's budget by spoofing it."""

    PREFIX_FACTOR = 4

    def __init__(self, rate: float, dropped: Counter[str]) -> None:
        self._by_ip = PerSourceLimiter(rate, dropped, "registration_rate")
        self._by_prefix = PerSourceLimiter(rate * self.PREFIX_FACTOR, dropped,
                                           "registration_rate")

    def allow(self, ip: str, now: float) -> bool:
        return self._by_ip.allow(ip, now) and self._by_prefix.allow(source_prefix(ip), now)


@dataclass(slots=True)
class _Session:
    started: float
    last: float
    bytes: int = 0


@dataclass(slots=True)
class _NodeState:
    owner: object  # the control connection whose end ends this state
    relay: TokenBucket | None
    control: TokenBucket | None
    punch: TokenBucket | None
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    notices: dict[str, float] = field(default_factory=dict)


class Limiter:
    """The limits' state machine; GatewayCore calls it at the few points listed above."""

    def __init__(self, limits: GatewayLimits, dropped: Counter[str]) -> None:
        self.settings = limits
        self.dropped = dropped
        self._nodes: dict[bytes, _NodeState] = {}
        # Connections admitted but not yet registered, oldest first (dicts keep order).
        self._pending: dict[object, None] = {}

    # ------------------------------------------------------------ connections, nodes
    def admit_initial(self, data: bytes) -> bool:
        """May this Initial open a connection? Only if it decrypts (counted otherwise)."""
        if initial_decrypts(data):
            return True
        self.dropped["bad_initial"] += 1
        return False

    def on_connection(self, conn: Conn) -> list[Conn]:
        """A new QUIC connection; returns the half-open ones to drop to make room."""
        self._pending[conn] = None
        evicted: list[Conn] = []
        while len(self._pending) > self.settings.max_handshakes:
            oldest = next(iter(self._pending))
            del self._pending[oldest]
            evicted.append(cast(Conn, oldest))  # only connections of this one caller
        if evicted:
            self.dropped["handshake_evicted"] += len(evicted)
        return evicted

    def on_hello(self, conn: object, node_raw: bytes, registry: Registry,
                 max_nodes: int) -> list[Message] | None:
        """None to register the node; else the error to send (and it stays unregistered)."""
        if registry.get(node_raw) is None and len(registry) >= max_nodes:
            self.dropped["max_nodes"] += 1
            return [_error("max_nodes", f"gateway is full: gateway.max_nodes = {max_nodes} "
                                        "nodes are registered; try again later or elsewhere")]
        self._pending.pop(conn, None)
        return None

    def forget(self, conn: object, node_id: NodeId | None) -> None:
        """The connection is gone; so is its node's state, unless a newer connection of
        the same node took it over (a node replacing its connection keeps its buckets)."""
        self._pending.pop(conn, None)
        if node_id is None:
            return
        state = self._nodes.get(node_id.raw)
        if state is not None and state.owner is conn:
            del self._nodes[node_id.raw]

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def tracked_nodes(self) -> int:
        return len(self._nodes)

    # ------------------------------------------------------------ relay (hot path)
    def on_relay(self, src: bytes, dst: bytes, size: int, now: float) -> list[Message] | None:
        """May `src` relay `size` payload bytes to `dst` now? None if so."""
        state = self._nodes.get(src) or self._new_node(src, None, now)
        lim = self.settings
        session = state.sessions.get(dst)
        if session is not None and now - session.last > SESSION_IDLE:
            del state.sessions[dst]
            session = None
        if session is None:
            if len(state.sessions) >= (lim.max_relay_peers or _PRUNE_AT):
                _prune(state.sessions, now)
                if lim.max_relay_peers and len(state.sessions) >= lim.max_relay_peers:
                    return self._refuse(state, src, "max_relay_peers", now,
                        f"relaying to at most gateway.max_relay_peers = {lim.max_relay_peers} "
                        f"nodes at once (a peer counts for {SESSION_IDLE:g} s after its last "
                        f"relayed packet); packets to a new peer are dropped")
            session = state.sessions[dst] = _Session(now, now)
        else:
            if (lim.relay_session_max_duration
                    and now - session.started > lim.relay_session_max_duration):
                return self._refuse(state, src, "relay_session_max_duration", now,
                    f"relayed session to {NodeId(dst).text} exceeded "
                    f"gateway.relay_session_max_duration = "
                    f"{lim.relay_session_max_duration * 1000:g} ms; it may start again "
                    f"after {SESSION_IDLE:g} s without relayed packets")
            if lim.relay_session_max_bytes and session.bytes + size > lim.relay_session_max_bytes:
                return self._refuse(state, src, "relay_session_max_bytes", now,
                    f"relayed session to {NodeId(dst).text} exceeded "
                    f"gateway.relay_session_max_bytes = {lim.relay_session_max_bytes} bytes; "
                    f"it may start again after {SESSION_IDLE:g} s without relayed packets")
        if state.relay is not None and not state.relay.take(size, now):
            return self._refuse(state, src, "relay_rate", now,
                f"relay rate limit: gateway.relay_rate_bytes = {lim.relay_rate_bytes} bytes/s "
                f"(burst gateway.relay_burst_bytes = {lim.relay_burst_bytes}); "
                f"excess relay packets are dropped")
        session.bytes += size
        session.last = now
        return None

    # ------------------------------------------------------------ control messages
    def on_control(self, conn: object, node_raw: bytes, msg: Message,
                   now: float) -> list[Message] | None:
        """May this node's control message be acted on? None if so."""
        state = self._nodes.get(node_raw) or self._new_node(node_raw, conn, now)
        kind = msg.TYPE
        if isinstance(msg, control.Hello):
            state.owner = conn
        req = msg.req if isinstance(msg, control.Lookup) else None
        if state.control is not None and not state.control.take(1, now):
            return self._refuse(state, node_raw, "control_rate", now,
                f"control message rate limit: gateway.control_rate = "
                f"{self.settings.control_rate:g} messages/s; {kind} dropped", req)
        if isinstance(msg, control.PunchRequest) and state.punch is not None \
                and not state.punch.take(1, now):
            replies = self._refuse(state, node_raw, "punch_rate", now,
                f"punch request rate limit: gateway.punch_rate = "
                f"{self.settings.punch_rate:g} requests/s")
            # The node's punch state machine waits on an answer for this very attempt.
            replies.append(control.PunchRefused(msg.peer[:64], msg.attempt, "punch_rate"))
            return replies
        return None

    # ------------------------------------------------------------ helpers
    def _new_node(self, node_raw: bytes, owner: object, now: float) -> _NodeState:
        lim = self.settings
        state = _NodeState(
            owner=owner,
            relay=_bucket(lim.relay_rate_bytes, lim.relay_burst_bytes, now),
            control=_bucket(lim.control_rate, lim.control_rate * BURST_SECONDS, now),
            punch=_bucket(lim.punch_rate, lim.punch_rate * BURST_SECONDS, now),
        )
        self._nodes[node_raw] = state
        return state

    def _refuse(self, state: _NodeState, node_raw: bytes, code: str, now: float,
                text: str, req: int | None = None) -> list[Message]:
        self.dropped[code] += 1
        last = state.notices.get(code)
        if last is not None and now - last < NOTICE_INTERVAL:
            return []
        if last is None:  # logged once per limit per registration; counters do the rest
            log.info("node %s hit limit %s", NodeId(node_raw).text, code)
        state.notices[code] = now
        return [_error(code, text, req)]


def initial_decrypts(data: bytes) -> bool:
    """Whether the datagram's first packet is a QUIC Initial sealed under the keys its
    destination CID implies (RFC 9001 5.2). Any client can make one; random bytes cannot,
    so junk never gets as far as the ~90 KB aioquic allocates for a connection."""
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
        if header.packet_type != QuicPacketType.INITIAL or header.version is None:
            return False
        pair = CryptoPair()
        pair.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        pair.decrypt_packet(data[:header.packet_length], buf.tell(), 0)
    except Exception:  # a header, key or tag that does not check out: not an Initial
        return False
    return True


def _bucket(rate: float, burst: float, now: float) -> TokenBucket | None:
    return TokenBucket(rate, max(burst, 1.0), now) if rate > 0 else None


def _prune(sessions: dict[bytes, _Session], now: float) -> None:
    for dst in [d for d, s in sessions.items() if now - s.last > SESSION_IDLE]:
        del sessions[dst]


def _error(code: str, message: str, req: int | None = None) -> Message:
    return control.Error(code, message, req)
