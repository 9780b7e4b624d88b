"""TURN client (RFC 8656): a relayed address on a TURN server, over UDP or TCP.

`TurnClient` is sans-IO, like `macula.nat.stun_client.StunClient`: the caller moves the
bytes. Over UDP it shares the node's socket, so the caller routes to `receive()` every
datagram whose source is the TURN server (STUN first byte 0-3, ChannelData 64-79 per
RFC 7983). Over TCP, `StreamFramer` cuts the byte stream into messages first (RFC 8656
section 11.5: STUN messages and ChannelData, the latter padded to 4 bytes).

The client keeps the allocation alive by itself through its timers: Refresh at 80% of the
lifetime, CreatePermission before the 300 s permission lifetime runs out, ChannelBind
before the 600 s channel lifetime does. Long-term credentials (RFC 8489 section 9.2): the
first Allocate goes without them, the 401 brings REALM and NONCE, every later request
carries USERNAME, REALM, NONCE and MESSAGE-INTEGRITY keyed by MD5(user:realm:password);
a 438 (stale nonce) is retried with the nonce it carries.

`AsyncTurnClient` drives a TurnClient on the event loop clock, over a DatagramEndpoint or
over a TCP connection it owns.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Literal

from macula.nat.stun_client import Retransmission, RetransmitPolicy
from macula.net.endpoint import Address, format_address
from macula.wire.stun import (
    DEFAULT_SOFTWARE,
    MAGIC_COOKIE,
    Class,
    Message,
    Method,
    StunError,
    StunUnknownAttributes,
    is_stun,
    parse_message,
)

from ..errors import InvalidValue, MaculaError

__all__ = [
    "Allocation",
    "FramingError",
    "StreamFramer",
    "TurnAuthError",
    "TurnClient",
    "TurnCounters",
    "TurnError",
    "TurnTimeout",
    "decode_channel_data",
    "encode_channel_data",
    "frame_length",
    "long_term_key",
]

CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
PERMISSION_LIFETIME = 300.0  # RFC 8656 section 9, fixed by the spec
CHANNEL_LIFETIME = 600.0  # RFC 8656 section 12
DEFAULT_LIFETIME = 600  # what servers grant when we do not ask
TCP_TIMEOUT = 39.5  # RFC 8489 Ti: no retransmissions on a reliable transport
REQUESTED_TRANSPORT_UDP = 17 << 24  # protocol number in the first byte, RFFU after it
# A request is retried at most this many times for a challenge or a stale nonce, so a
# server that keeps answering 438 cannot keep us busy forever.
MAX_AUTH_RETRIES = 3
# A failed refresh is retried while the thing refreshed is still alive, but no sooner.
MIN_REFRESH_RETRY = 1.0

Operation = Literal["allocate", "refresh", "permission", "channel", "deallocate", "allocation"]
ControlKind = Literal["allocated", "refreshed", "permission", "channel", "deallocated",
                      "error"]


@dataclass(frozen=True)
class TurnData:
    """Data a peer sent to our relayed address."""

    peer: Address
    data: bytes


@dataclass(frozen=True)
class TurnControl:
    """What became of the allocation: `value` is the Allocation (allocated, refreshed), the
    peer IP (permission), (peer, channel number) (channel), the TurnError (error), or None
    (deallocated)."""

    kind: ControlKind
    value: Any


TurnEvent = TurnData | TurnControl


def _addr(addr: Address) -> Address:
    return (addr[0], addr[1])


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """RFC 8489 section 9.2.2: the MESSAGE-INTEGRITY key of the long-term mechanism."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


# -- errors --------------------------------------------------------------------------------


class TurnError(MaculaError):
    """A TURN operation failed. `operation` and `key` (peer IP, peer address or None) say
    which; `code`/`reason` come from the server's ERROR-CODE when it sent one."""

    def __init__(
        self,
        message: str,
        *,
        operation: Operation | None = None,
        key: Any = None,
        code: int | None = None,
        reason: str | None = None,
        server: Address | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.key = key
        self.code = code
        self.reason = reason
        self.server = server


class TurnAuthError(TurnError):
    """The server refused our credentials (401 after we sent them)."""


class TurnTimeout(TurnError):
    """No answer within the retransmission schedule (UDP) or Ti (TCP)."""


class FramingError(InvalidValue):
    """The TCP stream holds something that is neither STUN nor ChannelData."""


# -- codecs --------------------------------------------------------------------------------


def encode_channel_data(channel: int, payload: bytes, *, pad: bool = False) -> bytes:
    """A ChannelData message; `pad` to a multiple of 4 bytes (required over TCP)."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise InvalidValue(f"channel number 0x{channel:04x} outside 0x4000-0x4FFF")
    if len(payload) > 0xFFFF:
        raise InvalidValue("ChannelData payload longer than 65535 bytes")
    out = struct.pack("!HH", channel, len(payload)) + payload
    return out + bytes(-len(payload) % 4) if pad else out


def decode_channel_data(data: bytes) -> tuple[int, bytes] | None:
    """(channel, payload), or None if this is not a well-formed ChannelData message.

    Bytes after the announced length are padding (TCP) or slack (UDP) and are ignored."""
    if len(data) < 4:
        return None
    channel, length = struct.unpack_from("!HH", data)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX or 4 + length > len(data):
        return None
    return channel, bytes(data[4 : 4 + length])


def frame_length(data: bytes | bytearray | memoryview) -> int | None:
    """Bytes the frame at the start of `data` takes on a stream, padding included.

    None when more bytes are needed to tell; FramingError when the stream cannot be TURN
    (a stream has no resynchronisation point, so the connection must be dropped)."""
    if not data:
        return None
    first = data[0]
    if first < 4:
        if len(data) < 8:
            return None
        length, cookie = struct.unpack_from("!HI", data, 2)
        if cookie != MAGIC_COOKIE:
            raise FramingError("STUN message without the magic cookie on the stream")
        if length % 4:
            raise FramingError("STUN message length not a multiple of 4 on the stream")
        return 20 + int(length)
    if CHANNEL_MIN >> 8 <= first <= CHANNEL_MAX >> 8:
        if len(data) < 4:
            return None
        (length,) = struct.unpack_from("!H", data, 2)
        return 4 + int(length) + (-int(length) % 4)
    raise FramingError(f"byte 0x{first:02x} starts neither a STUN message nor ChannelData")


class StreamFramer:
    """Cuts a TURN-over-TCP byte stream into whole frames (STUN messages, ChannelData)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.error: FramingError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Frames completed by `data`. After a framing error, `error` is set and the
        frames before it are still returned; everything after is ignored."""
        if self.error is not None:
            return []
        self._buffer += data
        frames: list[bytes] = []
        pos = 0
        while True:  # every pass consumes at least 4 bytes or stops
            try:
                # A frame's size is in its first 8 bytes: look at no more than that.
                size = frame_length(bytes(self._buffer[pos : pos + 8]))
            except FramingError as exc:
                self.error = exc
                break
            if size is None or pos + size > len(self._buffer):
                break
            frames.append(bytes(self._buffer[pos : pos + size]))
            pos += size
        if self.error is not None:
            self._buffer.clear()
            return frames
        del self._buffer[:pos]
        return frames


# -- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    relayed: Address  # XOR-RELAYED-ADDRESS: where peers send to reach us
    mapped: Address | None  # XOR-MAPPED-ADDRESS: our address as the server sees it
    lifetime: int
    expires_at: float


@dataclass
class TurnCounters:
    bytes_to_relay: int = 0  # payload bytes handed to the server for peers
    bytes_from_relay: int = 0  # payload bytes peers sent us through the relay
    packets_to_relay: int = 0
    packets_from_relay: int = 0
    allocations: int = 0
    refreshes: int = 0
    permissions: int = 0
    channel_binds: int = 0
    deallocations: int = 0
    errors: int = 0  # operations that failed (error answers, timeouts, lost allocation)
    retransmissions: int = 0
    auth_challenges: int = 0  # 401s answered with credentials
    stale_nonces: int = 0  # 438s answered with the new nonce
    dropped: int = 0  # datagrams from the server we could not use


@dataclass(eq=False)
class _Request:
    tid: bytes
    operation: Operation
    key: Any
    params: dict[str, Any]
    data: bytes
    started: float
    schedule: Retransmission | None  # None over TCP
    deadline: float
    integrity_key: bytes | None
    retries: int = 0


@dataclass(eq=False)
class _Refreshable:
    """A permission or channel: alive until expires_at, refreshed from refresh_at."""

    expires_at: float = 0.0
    refresh_at: float = 0.0
    active: bool = False  # the server confirmed it at least once
    in_flight: bool = False


@dataclass(eq=False)
class _Channel(_Refreshable):
    number: int = 0
    peer: Address = ("", 0)


class TurnClient:
    """One TURN allocation, sans-IO.

    Inputs: `allocate_relay`, `refresh`, `create_permission`, `bind_channel`, `close`
    (each starts a transaction), `receive_datagram(data, addr, now)` for every datagram or
    frame from the server, `handle_timer(now)` at `get_timer()`, `connection_lost(now)`
    over TCP. Outputs: `datagrams_to_send(now)` (all to the server), and from
    `next_event()`: TurnData(peer, data) for relayed data and
    TurnControl(kind, value) with kind in allocated / refreshed / permission / channel /
    deallocated / error.
    """

    def __init__(
        self,
        server: Address,
        username: str,
        password: str,
        *,
        transport: Literal["udp", "tcp"] = "udp",
        rto: float = 0.1,
        rc: int = 7,
        rm: int = 16,
        tcp_timeout: float = TCP_TIMEOUT,
        refresh_fraction: float = 0.8,
        permission_refresh: float = 240.0,
        channel_refresh: float = 540.0,
        software: str | None = DEFAULT_SOFTWARE,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise InvalidValue("transport is 'udp' or 'tcp'")
        if not 0 < refresh_fraction < 1:
            raise InvalidValue("refresh_fraction must be in (0, 1)")
        if not 0 < permission_refresh < PERMISSION_LIFETIME:
            raise InvalidValue("permissions must be refreshed within their 300 s lifetime")
        if not 0 < channel_refresh < CHANNEL_LIFETIME:
            raise InvalidValue("channels must be refreshed within their 600 s lifetime")
        if tcp_timeout <= 0:
            raise InvalidValue("tcp_timeout must be positive")
        self.server: Address = _addr(server)
        self.username = username
        self._password = password
        self._next_credentials: tuple[str, str] | None = None
        self.transport = transport
        self.policy = RetransmitPolicy(rto, rc, rm)
        self.tcp_timeout = tcp_timeout
        self._refresh_fraction = refresh_fraction
        self._permission_refresh = permission_refresh
        self._channel_refresh = channel_refresh
        self._software = software
        self.state: Literal["idle", "allocating", "allocated", "closing", "closed", "failed"] = "idle"
        self.allocation: Allocation | None = None
        self.realm: str | None = None
        self._nonce: bytes | None = None
        self._key: bytes | None = None
        self._refresh_at: float | None = None
        self._refresh_in_flight = False
        self._requests: dict[bytes, _Request] = {}
        self._permissions: dict[str, _Refreshable] = {}
        self._channels: dict[Address, _Channel] = {}
        self._channel_peers: dict[int, _Channel] = {}
        self._next_channel = CHANNEL_MIN
        self._outbox: list[tuple[bytes, Address]] = []
        self._events: deque[TurnEvent] = deque()
        self.counters = TurnCounters()
        self.last_error: TurnError | None = None

    # -- the caller's operations --------------------------------------------------------------

    def allocate_relay(self, now: float, *, lifetime: int | None = None) -> None:
        """Start an Allocate; the result comes as TurnControl("allocated", Allocation)."""
        if self.state in ("allocating", "allocated", "closing"):
            raise TurnError(f"allocation already {self.state}", operation="allocate", server=self.server)
        if self._next_credentials is not None:
            self._use_credentials(*self._next_credentials)
        self.state = "allocating"
        self.allocation = None
        self._refresh_at = None
        self._refresh_in_flight = False
        self._permissions.clear()
        self._channels.clear()
        self._channel_peers.clear()
        self._next_channel = CHANNEL_MIN
        params: dict[str, Any] = {}
        if lifetime is not None:
            params["lifetime"] = _lifetime(lifetime)
        self._send_request("allocate", None, params, now)

    def refresh(self, now: float, *, lifetime: int | None = None) -> None:
        """Refresh the allocation now (the timer does it by itself at 80% of the lifetime)."""
        self._require_allocation("refresh")
        if self._refresh_in_flight:
            return
        params = {"lifetime": _lifetime(lifetime)} if lifetime is not None else {}
        self._start_refresh(now, params)

    def create_permission(self, peer_ip: str, now: float) -> None:
        """Let `peer_ip` (any port) send to our relayed address; kept fresh until dropped."""
        self._require_allocation("permission")
        ip = normalize_peer_ip(peer_ip)
        perm = self._permissions.setdefault(ip, _Refreshable())
        if not perm.in_flight:
            perm.in_flight = True
            self._send_request("permission", ip, {"peer": (ip, 0)}, now)

    def bind_channel(self, peer: Address, now: float) -> int:
        """Bind a channel to `peer` (ip, port); returns its number at once. Data to the peer
        goes as Send indications until TurnControl("channel", (peer, number)) arrives."""
        self._require_allocation("channel")
        peer = (normalize_peer_ip(peer[0]), _port(peer[1]))
        channel = self._channels.get(peer)
        if channel is None:
            number = self._free_channel()
            channel = _Channel(number=number, peer=peer)
            self._channels[peer] = channel
            self._channel_peers[number] = channel
        if not channel.in_flight:
            channel.in_flight = True
            self._send_request("channel", peer, {"peer": peer, "channel": channel.number}, now)
        return channel.number

    def drop_peer(self, peer_ip: str) -> None:
        """Stop refreshing the permission and channels of `peer_ip`; they lapse on the server."""
        ip = normalize_peer_ip(peer_ip)
        self._permissions.pop(ip, None)
        for peer in [p for p in self._channels if p[0] == ip]:
            channel = self._channels.pop(peer)
            # The number stays reserved: the server keeps the binding for its lifetime.
            channel.active = False

    def close(self, now: float) -> None:
        """Deallocate (Refresh with LIFETIME 0); TurnControl("deallocated", None) follows."""
        for tid, request in list(self._requests.items()):
            if request.operation != "deallocate":
                del self._requests[tid]
        self._permissions.clear()
        self._channels.clear()
        self._channel_peers.clear()
        if self.state == "allocated":
            self.state = "closing"
            self._refresh_in_flight = False
            self._send_request("deallocate", None, {"lifetime": 0}, now)
        elif self.state != "closing":
            self.state = "closed"

    def send_via_relay(self, peer: Address, data: bytes) -> bytes:
        """Wire bytes that deliver `data` to `peer` through the relay; send them to the
        server. ChannelData when the channel is bound, a Send indication otherwise (the
        server drops both unless the peer's IP has a permission)."""
        self._require_allocation("send")
        peer = _addr(peer)
        channel = self._channels.get(peer)
        if channel is not None and channel.active:
            wire = encode_channel_data(channel.number, data, pad=self.transport == "tcp")
        else:
            message = Message(
                Method.SEND,
                Class.INDICATION,
                os.urandom(12),
                {"XOR-PEER-ADDRESS": peer, "DATA": bytes(data)},
            )
            message.add_fingerprint()
            wire = bytes(message)
        self.counters.bytes_to_relay += len(data)
        self.counters.packets_to_relay += 1
        return wire

    # -- the sans-IO plumbing -------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Everything to send, always to `self.server` (over TCP: write it to the stream)."""
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        times: list[float] = []
        for request in self._requests.values():
            times.append(request.schedule.next_time() if request.schedule else request.deadline)
        if self.state == "allocated" and self.allocation is not None:
            times.append(self.allocation.expires_at)
            if self._refresh_at is not None and not self._refresh_in_flight:
                times.append(self._refresh_at)
            for item in [*self._permissions.values(), *self._channels.values()]:
                # While a refresh is in flight its answer (or timeout) decides, not the clock.
                if item.active and not item.in_flight:
                    times.append(item.refresh_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        self._events.extend(self._timers(now))

    def _timers(self, now: float) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        for request in list(self._requests.values()):
            if request.tid not in self._requests:
                continue
            if request.schedule is not None:
                if request.schedule.due(now):
                    self.counters.retransmissions += 1
                    self._outbox.append((request.data, self.server))
                    continue
                timed_out = request.schedule.expired(now)
                sends = request.schedule.sends
            else:
                timed_out, sends = now >= request.deadline, 1
            if timed_out:
                del self._requests[request.tid]
                waited = now - request.started
                how = f"({sends} request{'s' if sends != 1 else ''} sent)" if request.schedule else "over TCP"
                error: TurnError = TurnTimeout(
                    f"TURN {request.operation} to {format_address(self.server)} got no answer "
                    f"after {waited:.2f} s {how}",
                    operation=request.operation, key=request.key, server=self.server,
                )
                events.extend(self._failed(request, error, now))
        if self.state != "allocated" or self.allocation is None:
            return events
        if now >= self.allocation.expires_at:
            self.state = "failed"
            error = TurnError(
                f"TURN allocation on {format_address(self.server)} expired",
                operation="allocation", server=self.server,
            )
            return [*events, *self._report(error)]
        if self._refresh_at is not None and now >= self._refresh_at and not self._refresh_in_flight:
            self._start_refresh(now, {})
        for ip, perm in list(self._permissions.items()):
            if not perm.active or perm.in_flight:
                continue
            if now >= perm.expires_at:
                del self._permissions[ip]
            elif now >= perm.refresh_at:
                perm.in_flight = True
                self._send_request("permission", ip, {"peer": (ip, 0)}, now)
        for peer, channel in list(self._channels.items()):
            if not channel.active or channel.in_flight:
                continue
            if now >= channel.expires_at:
                self._forget_channel(channel)
            elif now >= channel.refresh_at:
                channel.in_flight = True
                params = {"peer": peer, "channel": channel.number}
                self._send_request("channel", peer, params, now)
        return events

    def connection_lost(self, now: float) -> None:
        """The TCP connection to the server is gone, and with it the allocation."""
        events: list[TurnEvent] = []
        for request in list(self._requests.values()):
            del self._requests[request.tid]
            if request.operation == "deallocate":
                self.state = "closed"
                events.append(TurnControl("deallocated", None))
                continue
            error = TurnError(
                f"TURN {request.operation} to {format_address(self.server)} failed: connection lost",
                operation=request.operation, key=request.key, server=self.server,
            )
            events.extend(self._failed(request, error, now))
        if self.state in ("allocated", "allocating", "closing"):
            self.state = "failed"
            error = TurnError(
                f"TURN connection to {format_address(self.server)} lost",
                operation="allocation", server=self.server,
            )
            events.extend(self._report(error))
        self._events.extend(events)

    def next_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """One datagram (UDP) or frame (TCP) from the server; what it meant comes out of
        `next_event()`. False for a datagram that is not this allocation's (another
        sender, or neither STUN nor ChannelData): a shared socket passes those on."""
        if self.transport == "udp" and not self.owns(data, addr):
            return False
        event = self._receive(data, now)
        if event is not None:
            self._events.append(event)
        return True

    def _receive(self, data: bytes, now: float) -> TurnEvent | None:
        """One datagram (UDP) or frame (TCP) from the server. Never raises on bad bytes."""
        data = bytes(data)
        if data and CHANNEL_MIN >> 8 <= data[0] <= CHANNEL_MAX >> 8:
            return self._receive_channel_data(data)
        if not is_stun(data):
            self.counters.dropped += 1
            return None
        request = self._requests.get(data[8:20])
        try:
            message = parse_message(data)
        except StunUnknownAttributes as exc:
            forged = request is not None and request.integrity_key is not None and (
                not exc.message.check_message_integrity(request.integrity_key)
            )
            if request is not None and not forged and exc.message.message_class in (Class.RESPONSE, Class.ERROR):
                del self._requests[request.tid]
                error = self._error(request, "the answer carries unknown comprehension-required attributes")
                return _first(self._failed(request, error, now))
            self.counters.dropped += 1
            return None
        except StunError:
            self.counters.dropped += 1  # a late retransmission will do
            return None
        if message.message_class == Class.INDICATION:
            return self._receive_indication(message)
        if request is None or message.message_class not in (Class.RESPONSE, Class.ERROR):
            self.counters.dropped += 1  # a late answer to a finished transaction
            return None
        if message.message_method != _METHODS[request.operation]:
            self.counters.dropped += 1
            return None
        if message.message_class == Class.RESPONSE:
            if request.integrity_key is not None and not message.check_message_integrity(
                request.integrity_key
            ):
                # Forged or corrupted: discard and let the retransmissions go on (RFC 8489 9.2.5).
                self.counters.dropped += 1
                return None
            del self._requests[request.tid]
            return _first(self._succeeded(request, message, now))
        code = message.error_code
        if (
            request.integrity_key is not None
            and code not in _UNAUTHENTICATED_ERRORS
            and "MESSAGE-INTEGRITY" in message.attributes
            and not message.check_message_integrity(request.integrity_key)
        ):
            # Other errors may be authenticated; a wrong one is forged or corrupted.
            self.counters.dropped += 1
            return None
        del self._requests[request.tid]
        return _first(self._error_response(request, message, now))

    def owns(self, data: bytes, addr: Address) -> bool:
        """Demux helper for the shared socket: from our server and STUN or ChannelData.

        Route STUN to the StunClient first when the same server also answers Bindings for
        it (its `owns()` matches by transaction id); everything else from the server is ours."""
        if _addr(addr) != self.server or not data:
            return False
        return data[0] < 4 or CHANNEL_MIN >> 8 <= data[0] <= CHANNEL_MAX >> 8

    def is_channel_data(self, data: bytes) -> bool:
        """Demux helper: ChannelData carrying one of our channel numbers."""
        decoded = decode_channel_data(data)
        return decoded is not None and decoded[0] in self._channel_peers

    @property
    def permissions(self) -> dict[str, bool]:
        """Peer IPs we hold permissions for -> confirmed by the server yet."""
        return {ip: perm.active for ip, perm in self._permissions.items()}

    @property
    def channels(self) -> dict[Address, tuple[int, bool]]:
        """Peer -> (channel number, bound yet)."""
        return {peer: (ch.number, ch.active) for peer, ch in self._channels.items()}

    # -- inbound data ------------------------------------------------------------------------------

    def _receive_channel_data(self, data: bytes) -> TurnEvent | None:
        decoded = decode_channel_data(data)
        channel = self._channel_peers.get(decoded[0]) if decoded is not None else None
        if decoded is None or channel is None:
            self.counters.dropped += 1
            return None
        return self._data(channel.peer, decoded[1])

    def _receive_indication(self, message: Message) -> TurnEvent | None:
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        payload = message.attributes.get("DATA")
        if message.message_method != Method.DATA or peer is None or payload is None:
            self.counters.dropped += 1
            return None
        return self._data(_addr(peer), payload)

    def _data(self, peer: Address, payload: bytes) -> TurnData | None:
        if self.state not in ("allocated", "closing"):
            self.counters.dropped += 1
            return None
        self.counters.bytes_from_relay += len(payload)
        self.counters.packets_from_relay += 1
        return TurnData(peer, payload)

    # -- requests ----------------------------------------------------------------------------------

    def _require_allocation(self, what: str) -> None:
        if self.state != "allocated":
            raise TurnError(
                f"cannot {what}: no TURN allocation (state {self.state})",
                operation="allocation", server=self.server,
            )

    def _start_refresh(self, now: float, params: dict[str, Any]) -> None:
        self._refresh_in_flight = True
        self._send_request("refresh", None, params, now)

    def _send_request(
        self,
        operation: Operation,
        key: Any,
        params: dict[str, Any],
        now: float,
        *,
        retries: int = 0,
    ) -> None:
        tid = os.urandom(12)
        attributes: dict[str, Any] = {}
        if operation == "allocate":
            attributes["REQUESTED-TRANSPORT"] = REQUESTED_TRANSPORT_UDP
        if "lifetime" in params:
            attributes["LIFETIME"] = params["lifetime"]
        if "channel" in params:
            attributes["CHANNEL-NUMBER"] = params["channel"]
        if "peer" in params:
            attributes["XOR-PEER-ADDRESS"] = params["peer"]
        if self._software:
            attributes["SOFTWARE"] = self._software
        message = Message(_METHODS[operation], Class.REQUEST, tid, attributes)
        key_used: bytes | None = None
        if self._key is not None and self.realm is not None and self._nonce is not None:
            message.attributes["USERNAME"] = self.username
            message.attributes["REALM"] = self.realm
            message.attributes["NONCE"] = self._nonce
            message.add_message_integrity(self._key)
            key_used = self._key
        else:
            message.add_fingerprint()
        data = bytes(message)
        schedule = Retransmission(self.policy, now) if self.transport == "udp" else None
        deadline = schedule.deadline if schedule is not None else now + self.tcp_timeout
        self._requests[tid] = _Request(
            tid, operation, key, params, data, now, schedule, deadline, key_used, retries
        )
        self._outbox.append((data, self.server))

    def _retry(self, request: _Request, now: float) -> None:
        self._send_request(request.operation, request.key, request.params, now, retries=request.retries + 1)

    def _error(self, request: _Request, why: str, code: int | None = None, reason: str | None = None) -> TurnError:
        return TurnError(
            f"TURN {request.operation} on {format_address(self.server)} failed: {why}",
            operation=request.operation, key=request.key, code=code, reason=reason, server=self.server,
        )

    # -- answers -----------------------------------------------------------------------------------

    def _succeeded(self, request: _Request, message: Message, now: float) -> list[TurnEvent]:
        op = request.operation
        if op == "allocate":
            relayed = message.attributes.get("XOR-RELAYED-ADDRESS")
            if relayed is None:
                return self._failed(request, self._error(request, "success without XOR-RELAYED-ADDRESS"), now)
            mapped = message.attributes.get("XOR-MAPPED-ADDRESS")
            lifetime = int(message.attributes.get("LIFETIME", request.params.get("lifetime", DEFAULT_LIFETIME)))
            self.allocation = Allocation(
                _addr(relayed), _addr(mapped) if mapped is not None else None, lifetime, now + lifetime
            )
            self.state = "allocated"
            self._refresh_at = now + lifetime * self._refresh_fraction
            self.counters.allocations += 1
            return [TurnControl("allocated", self.allocation)]
        if op == "refresh":
            self._refresh_in_flight = False
            if self.state != "allocated" or self.allocation is None:
                return []
            lifetime = int(message.attributes.get("LIFETIME", request.params.get("lifetime", DEFAULT_LIFETIME)))
            if lifetime == 0:
                self.state = "closed"
                self.counters.deallocations += 1
                return [TurnControl("deallocated", None)]
            self.allocation = replace(self.allocation, lifetime=lifetime, expires_at=now + lifetime)
            self._refresh_at = now + lifetime * self._refresh_fraction
            self.counters.refreshes += 1
            return [TurnControl("refreshed", self.allocation)]
        if op == "deallocate":
            self.state = "closed"
            self.allocation = None
            self.counters.deallocations += 1
            return [TurnControl("deallocated", None)]
        if op == "permission":
            perm = self._permissions.get(request.key)
            if perm is None:
                return []  # dropped meanwhile
            self._confirm(perm, now, PERMISSION_LIFETIME, self._permission_refresh)
            self.counters.permissions += 1
            return [TurnControl("permission", request.key)]
        # channel
        channel = self._channels.get(request.key)
        if channel is None:
            return []
        self._confirm(channel, now, CHANNEL_LIFETIME, self._channel_refresh)
        # A ChannelBind also installs or refreshes the peer's permission (RFC 8656 section
        # 12), which lapses sooner than the channel: keep it on the permission schedule.
        perm = self._permissions.setdefault(request.key[0], _Refreshable())
        if not perm.in_flight:
            self._confirm(perm, now, PERMISSION_LIFETIME, self._permission_refresh)
        self.counters.channel_binds += 1
        return [TurnControl("channel", (request.key, channel.number))]

    def _error_response(self, request: _Request, message: Message, now: float) -> list[TurnEvent]:
        code, reason = _error_code(message)
        realm = message.attributes.get("REALM")
        nonce = message.attributes.get("NONCE")
        if code == 401 and request.integrity_key is None and realm and nonce:
            # The expected challenge: answer it with credentials for this realm.
            if request.retries < MAX_AUTH_RETRIES:
                self._learn(realm, nonce)
                self.counters.auth_challenges += 1
                self._retry(request, now)
                return []
        if code == 438 and nonce and request.retries < MAX_AUTH_RETRIES:
            self._learn(realm or self.realm or "", nonce)
            self.counters.stale_nonces += 1
            self._retry(request, now)
            return []
        if code == 401:
            who = f"user {self.username!r} in realm {(realm or self.realm)!r}"
            error: TurnError = TurnAuthError(
                f"TURN server {format_address(self.server)} rejected the credentials of {who}: "
                f"{code} {reason}".rstrip(),
                operation=request.operation, key=request.key, code=code, reason=reason, server=self.server,
            )
        elif code == 437 and request.operation == "allocate":
            error = self._error(
                request, f"{code} {reason} (an allocation already exists for this 5-tuple)", code, reason
            )
        else:
            error = self._error(request, f"{code} {reason}".rstrip(), code, reason)
        if request.operation == "deallocate" and code == 437:
            # Nothing to delete any more: that is what we wanted.
            self.state = "closed"
            self.allocation = None
            return [TurnControl("deallocated", None)]
        if code == 437 and request.operation in ("refresh", "permission", "channel"):
            # 437 here means the server no longer has our allocation.
            events = self._failed(request, error, now)
            self.state = "failed"
            return events
        return self._failed(request, error, now)

    def set_credentials(self, username: str, password: str) -> None:
        """New long-term credentials (time-limited ones, renewed) for the next Allocate.
        A live allocation keeps the ones it was made with: RFC 8656 refuses requests on
        an allocation under other credentials (441). When those expire, its refresh
        fails and the allocation is made again with these."""
        if self.state in ("idle", "failed", "closed"):
            self._use_credentials(username, password)
        else:
            self._next_credentials = (username, password)

    def _use_credentials(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._next_credentials = None
        self._key = None  # derived again from the realm of the next challenge

    def _learn(self, realm: str, nonce: bytes) -> None:
        if realm != self.realm or self._key is None:
            self.realm = realm
            self._key = long_term_key(self.username, realm, self._password)
        self._nonce = nonce

    def _confirm(self, item: _Refreshable, now: float, lifetime: float, refresh_after: float) -> None:
        item.active = True
        item.in_flight = False
        item.expires_at = now + lifetime
        item.refresh_at = now + refresh_after

    def _failed(self, request: _Request, error: TurnError, now: float) -> list[TurnEvent]:
        op = request.operation
        if op == "allocate":
            self.state = "failed"
        elif op == "deallocate":
            self.state = "closed"
            self.allocation = None
        elif op == "refresh":
            self._refresh_in_flight = False
            if self.allocation is not None:
                # The allocation lives until it expires: try again while there is time
                # (never at once, so a server that keeps refusing is not hammered).
                left = self.allocation.expires_at - now
                self._refresh_at = now + max(MIN_REFRESH_RETRY, left / 2) if left > 2 * MIN_REFRESH_RETRY else None
        elif op == "permission":
            perm = self._permissions.get(request.key)
            if perm is not None:
                perm.in_flight = False
                if not self._retry_refresh(perm, error, now):
                    del self._permissions[request.key]
        elif op == "channel":
            channel = self._channels.get(request.key)
            if channel is not None:
                channel.in_flight = False
                if not self._retry_refresh(channel, error, now):
                    self._forget_channel(channel)
        return self._report(error)

    def _retry_refresh(self, item: _Refreshable, error: TurnError, now: float) -> bool:
        left = item.expires_at - now
        if item.active and isinstance(error, TurnTimeout) and left > 2 * MIN_REFRESH_RETRY:
            item.refresh_at = now + max(MIN_REFRESH_RETRY, left / 2)
            return True
        return False

    def _forget_channel(self, channel: _Channel) -> None:
        self._channels.pop(channel.peer, None)
        self._channel_peers.pop(channel.number, None)

    def _report(self, error: TurnError) -> list[TurnEvent]:
        self.counters.errors += 1
        self.last_error = error
        return [TurnControl("error", error)]

    def _free_channel(self) -> int:
        # Numbers are never reused within an allocation: the server keeps a binding up to
        # 10 minutes after its last refresh and refuses to move the number meanwhile.
        if self._next_channel > CHANNEL_MAX:
            raise TurnError("no free TURN channel numbers", operation="channel", server=self.server)
        number = self._next_channel
        self._next_channel += 1
        return number


_METHODS: dict[str, Method] = {
    "allocate": Method.ALLOCATE,
    "refresh": Method.REFRESH,
    "deallocate": Method.REFRESH,
    "permission": Method.CREATE_PERMISSION,
    "channel": Method.CHANNEL_BIND,
}


# RFC 8489 section 9.2.5: these error answers cannot carry a valid MESSAGE-INTEGRITY.
_UNAUTHENTICATED_ERRORS = (400, 401, 420, 438)


def _first(events: list[TurnEvent]) -> TurnEvent | None:
    return events[0] if events else None


def _error_code(message: Message) -> tuple[int, str]:
    value = message.attributes.get("ERROR-CODE")
    if not isinstance(value, tuple) or len(value) != 2:
        return 0, "(no ERROR-CODE)"
    return int(value[0]), str(value[1])


def _lifetime(value: int) -> int:
    if not 0 <= value <= 0xFFFFFFFF:
        raise InvalidValue("LIFETIME is a 32-bit number of seconds")
    return int(value)


def normalize_peer_ip(ip: str) -> str:
    return str(ipaddress.ip_address(ip))


def _port(port: int) -> int:
    if not 0 < port <= 0xFFFF:
        raise InvalidValue(f"port out of range: {port}")
    return port


# -- asyncio runner -----------------------------------------------------------------------------
