"""A small TURN server (RFC 8656, UDP) for the simulator, where coturn cannot run.

coturn is a real process on real sockets, so it cannot sit on the simulator's virtual
network; this server runs on any `DatagramEndpoint` instead: simulated hosts, or loopback
UDP. It serves what our client (`macula.nat.turn`) and the matrix need, the way coturn
answers it: Binding (so it doubles as a STUN server), Allocate with long-term credentials
(401 with REALM and NONCE, 438 on a stale nonce, MESSAGE-INTEGRITY + FINGERPRINT on every
authenticated answer), Refresh (LIFETIME 0 deletes), CreatePermission (300 s), ChannelBind
(0x4000-0x4FFF, 600 s), Send/Data indications and ChannelData both ways, with the
permission check on everything relayed. Not served: TCP allocations (442), EVEN-PORT,
RESERVATION-TOKEN, DONT-FRAGMENT and address-family selection (420, as RFC 8656 asks of a
server that does not implement them).

`TurnServerCore` is sans-IO: fed (data, source, socket, now), it queues datagrams as
(data, destination, socket) where a socket is `LISTENER` or the id of an allocation's relay
socket. Opening a relay socket is I/O, so the core asks for one (`relays_to_open`) and
answers the Allocate when the I/O layer reports it (`relay_opened` / `relay_failed`).
`TurnServer` is that I/O layer on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import ipaddress
import logging
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from macula.nat.turn import (
    CHANNEL_LIFETIME,
    CHANNEL_MAX,
    CHANNEL_MIN,
    PERMISSION_LIFETIME,
    decode_channel_data,
    encode_channel_data,
    long_term_key,
)
from macula.net.endpoint import Address, DatagramEndpoint
from macula.wire.stun import (
    DEFAULT_SOFTWARE,
    Class,
    Message,
    Method,
    StunError,
    StunUnknownAttributes,
    binding_error,
    binding_success,
    is_stun,
    parse_message,
)

__all__ = [
    "LISTENER",
    "TurnServer",
    "TurnServerCore",
    "TurnServerCounters",
]

log = logging.getLogger(__name__)

LISTENER = 0  # the socket id of the listening socket; relay sockets count up from 1
UDP_PROTOCOL = 17  # REQUESTED-TRANSPORT carries the IP protocol number in its first byte
# After a channel binding lapses, its number and peer stay reserved this long (RFC 8656
# section 12), so late ChannelData cannot be delivered to a different peer.
CHANNEL_QUARANTINE = 300.0
# Expired state is reclaimed by a sweep; validity is checked on every use, so the sweep
# only frees memory and sockets and may run a little late. Bounding its rate keeps many
# allocations with staggered deadlines from costing a full scan each.
SWEEP_INTERVAL = 1.0
_WILDCARDS = ("0.0.0.0", "::")

Transmit = tuple[bytes, Address, int]  # (data, destination, socket id it leaves from)


@dataclass
class TurnServerCounters:
    allocations: int = 0  # allocations created (relay socket open, success sent)
    deallocations: int = 0  # deleted by the client (Refresh with LIFETIME 0)
    expirations: int = 0  # deleted because nobody refreshed them
    refreshes: int = 0
    permissions: int = 0  # CreatePermission successes, installs and refreshes
    channel_binds: int = 0
    bindings: int = 0  # Binding requests answered
    bytes_to_peers: int = 0  # payload relayed client -> peer
    bytes_to_clients: int = 0  # payload relayed peer -> client
    packets_to_peers: int = 0
    packets_to_clients: int = 0
    challenges: int = 0  # 401s to requests that came without credentials
    auth_failures: int = 0  # wrong password, unknown user or realm, 441 wrong credentials
    stale_nonces: int = 0  # 438s
    quota_rejections: int = 0  # 486 and 508
    errors: int = 0  # every other error response
    malformed: int = 0  # neither STUN nor ChannelData, or failing the parser
    dropped: int = 0  # well formed but not relayable: no allocation, permission or channel
    internal_errors: int = 0  # bugs caught at the input boundary; tests keep this at 0


@dataclass(eq=False)
class _Channel:
    number: int
    peer: Address
    expires_at: float
    reserved_until: float


@dataclass(eq=False)
class _Allocation:
    client: Address
    username: str
    key: bytes
    socket: int
    transaction_id: bytes  # of the Allocate, to answer its retransmissions
    lifetime: int
    relayed: Address | None = None  # None while the relay socket is being opened
    expires_at: float = math.inf
    response: bytes | None = None
    permissions: dict[str, float] = field(default_factory=dict)  # peer IP -> expiry
    channels: dict[int, _Channel] = field(default_factory=dict)
    channel_by_peer: dict[Address, _Channel] = field(default_factory=dict)


class TurnServerCore:
    """The RFC 8656 server side for UDP, sans-IO.

    Inputs: `receive(data, source, socket, now)` for every datagram on the listening socket
    (`LISTENER`) or a relay socket; `relay_opened` / `relay_failed` for each id taken from
    `relays_to_open()`; `handle_timer(now)` at `get_timer()`. Outputs:
    `datagrams_to_send()`, `relays_to_open()`, `relays_to_close()`.

    Lifetimes follow RFC 8656 section 7: a requested LIFETIME is capped at `max_lifetime`
    and never below `default_lifetime`. Allocations are bounded in total (508) and per
    client IP (486); permissions and channels per allocation (508). `peer_filter(ip)`
    returning False refuses a peer (403); `blocked_peers` are never relayed to (the
    listening address, so a relay cannot loop back into the server as a client).
    """

    def __init__(
        self,
        realm: str,
        users: Mapping[str, str],
        *,
        default_lifetime: int = 600,
        max_lifetime: int = 3600,
        nonce_lifetime: float = 600.0,
        max_allocations: int = 1000,
        max_allocations_per_client: int = 10,
        max_permissions: int = 128,
        max_channels: int = 128,
        peer_filter: Callable[[str], bool] | None = None,
        blocked_peers: Iterable[Address] = (),
        software: str | None = DEFAULT_SOFTWARE,
        secret: bytes | None = None,
    ) -> None:
        if not realm or len(realm.encode("utf8")) > 763:
            raise ValueError("REALM must be 1-763 bytes")
        if not 0 < default_lifetime <= max_lifetime:
            raise ValueError("need 0 < default_lifetime <= max_lifetime")
        if nonce_lifetime <= 0:
            raise ValueError("nonce_lifetime must be positive")
        if min(max_allocations, max_allocations_per_client, max_permissions, max_channels) < 1:
            raise ValueError("quotas must be at least 1")
        if software is not None and len(software.encode("utf8")) > 763:
            raise ValueError("SOFTWARE must be at most 763 bytes")
        self.realm = realm
        self._keys = {user: long_term_key(user, realm, password) for user, password in users.items()}
        self.default_lifetime = default_lifetime
        self.max_lifetime = max_lifetime
        self.nonce_lifetime = nonce_lifetime
        self.max_allocations = max_allocations
        self.max_allocations_per_client = max_allocations_per_client
        self.max_permissions = max_permissions
        self.max_channels = max_channels
        self.peer_filter = peer_filter
        self.blocked_peers: set[Address] = {(a[0], a[1]) for a in blocked_peers}
        self.software = software
        # Nonces are stateless (expiry + MAC), so a flood of unauthenticated requests
        # costs no memory.
        self._secret = secret if secret is not None else os.urandom(32)
        self._allocations: dict[Address, _Allocation] = {}
        self._by_socket: dict[int, _Allocation] = {}
        self._per_client: dict[str, int] = {}
        self._next_socket = LISTENER + 1
        self._outbox: list[Transmit] = []
        self._to_open: list[int] = []
        self._to_close: list[int] = []
        self._next_deadline = math.inf
        self._last_sweep = -math.inf
        self.counters = TurnServerCounters()

    # -- outputs ----------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[Transmit]:
        out, self._outbox = self._outbox, []
        return out

    def relays_to_open(self) -> list[int]:
        """Relay socket ids to open; report each with `relay_opened` or `relay_failed`."""
        out, self._to_open = self._to_open, []
        return out

    def relays_to_close(self) -> list[int]:
        out, self._to_close = self._to_close, []
        return out

    def get_timer(self) -> float | None:
        if self._next_deadline == math.inf:
            return None
        return max(self._next_deadline, self._last_sweep + SWEEP_INTERVAL)

    # -- state ------------------------------------------------------------------------------

    @property
    def allocation_count(self) -> int:
        """Allocations held, those whose relay socket is still opening included."""
        return len(self._allocations)

    def allocation_of(self, client: Address) -> dict[str, Any] | None:
        """A snapshot of `client`'s allocation, for tests and diagnostics."""
        allocation = self._allocations.get((client[0], client[1]))
        if allocation is None:
            return None
        return {
            "relayed": allocation.relayed,
            "username": allocation.username,
            "expires_at": allocation.expires_at,
            "permissions": dict(allocation.permissions),
            "channels": {n: (ch.peer, ch.expires_at) for n, ch in allocation.channels.items()},
        }

    # -- inputs -----------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, socket: int, now: float) -> None:
        """One datagram that arrived on `socket` from `source`. Never raises."""
        try:
            source = (source[0], source[1])
            if socket == LISTENER:
                self._from_client(bytes(data), source, now)
                return
            allocation = self._by_socket.get(socket)
            if allocation is None:
                self.counters.dropped += 1  # a relay socket whose allocation just went
                return
            self._from_peer(allocation, bytes(data), source, now)
        except Exception:
            # Hostile input must not take the server down; a bug shows up in the counter.
            self.counters.internal_errors += 1
            log.debug("TURN server: error handling a datagram from %s", source, exc_info=True)

    def relay_opened(self, socket: int, relayed: Address, now: float) -> None:
        """The relay socket `socket` is bound at `relayed`: finish its Allocate."""
        allocation = self._by_socket.get(socket)
        if allocation is None:
            self._to_close.append(socket)  # nobody wants it any more
            return
        if allocation.relayed is not None:
            return
        allocation.relayed = (relayed[0], relayed[1])
        allocation.expires_at = now + allocation.lifetime
        self._deadline(allocation.expires_at)
        attributes: dict[str, Any] = {
            "XOR-RELAYED-ADDRESS": allocation.relayed,
            "LIFETIME": allocation.lifetime,
            "XOR-MAPPED-ADDRESS": allocation.client,
        }
        response = self._build(
            Method.ALLOCATE, Class.RESPONSE, allocation.transaction_id, attributes, allocation.key
        )
        allocation.response = response
        self.counters.allocations += 1
        self._send(response, allocation.client)

    def relay_failed(self, socket: int, now: float) -> None:
        """No relay socket could be opened: the Allocate fails with 508."""
        allocation = self._by_socket.get(socket)
        if allocation is None or allocation.relayed is not None:
            return
        self._forget(allocation)
        self.counters.quota_rejections += 1
        error = self._build(
            Method.ALLOCATE, Class.ERROR, allocation.transaction_id,
            {"ERROR-CODE": (508, "Insufficient Capacity")}, allocation.key,
        )
        self._send(error, allocation.client)

    def handle_timer(self, now: float) -> None:
        if now < self._next_deadline:
            return
        self._last_sweep = now
        deadline = math.inf
        for allocation in list(self._allocations.values()):
            if allocation.relayed is None:
                continue
            if allocation.expires_at <= now:
                self._delete(allocation)
                self.counters.expirations += 1
                continue
            deadline = min(deadline, allocation.expires_at)
            for ip, expires_at in list(allocation.permissions.items()):
                if expires_at <= now:
                    del allocation.permissions[ip]
                else:
                    deadline = min(deadline, expires_at)
            for channel in list(allocation.channels.values()):
                if channel.reserved_until <= now:
                    del allocation.channels[channel.number]
                    del allocation.channel_by_peer[channel.peer]
                else:
                    deadline = min(deadline, channel.reserved_until)
        self._next_deadline = deadline

    def close(self) -> None:
        """Drop every allocation; their relay sockets come out of `relays_to_close()`."""
        for allocation in list(self._allocations.values()):
            self._delete(allocation)
        self._next_deadline = math.inf

    # -- from clients -----------------------------------------------------------------------

    def _from_client(self, data: bytes, client: Address, now: float) -> None:
        if data and CHANNEL_MIN >> 8 <= data[0] <= CHANNEL_MAX >> 8:
            self._channel_data_from_client(data, client, now)
        elif is_stun(data):
            self._stun_from_client(data, client, now)
        else:
            self.counters.malformed += 1

    def _stun_from_client(self, data: bytes, client: Address, now: float) -> None:
        try:
            message = parse_message(data)
        except StunUnknownAttributes as exc:
            if exc.message.message_class == Class.REQUEST:
                self.counters.errors += 1
                self._send(binding_error(exc.message, 420, "Unknown Attribute", exc.attributes), client)
            else:
                self.counters.dropped += 1  # indications are discarded silently
            return
        except StunError:
            self.counters.malformed += 1
            return
        method, cls = message.message_method, message.message_class
        if cls == Class.INDICATION:
            if method == Method.SEND:
                self._send_indication(message, client, now)
            else:
                self.counters.dropped += 1  # Binding indications are keepalives
            return
        if cls != Class.REQUEST:
            self.counters.dropped += 1
            return
        if method == Method.BINDING:
            self.counters.bindings += 1
            self._send(binding_success(message, client, software=self.software), client)
            return
        handler = self._handlers.get(method)
        if handler is None:
            self._error(message, client, 400, "Bad Request", None)
            return
        credentials = self._authenticate(message, client, now)
        if credentials is not None:
            handler(self, message, client, credentials[0], credentials[1], now)

    def _authenticate(self, message: Message, client: Address, now: float) -> tuple[str, bytes] | None:
        """(username, key) of a request that passes the long-term credential checks of
        RFC 8489 section 9.2.4, in its order; otherwise the error is sent and None returned."""
        attributes = message.attributes
        if "MESSAGE-INTEGRITY" not in attributes:
            self.counters.challenges += 1
            self._challenge(message, client, 401, "Unauthorized", now)
            return None
        username = attributes.get("USERNAME")
        realm = attributes.get("REALM")
        nonce = attributes.get("NONCE")
        if username is None or realm is None or nonce is None:
            self._error(message, client, 400, "Bad Request", None)
            return None
        if not self._nonce_valid(nonce, client, now):
            self.counters.stale_nonces += 1
            self._challenge(message, client, 438, "Stale Nonce", now)
            return None
        key = self._keys.get(username)
        if key is None or realm != self.realm or not message.check_message_integrity(key):
            self.counters.auth_failures += 1
            self._challenge(message, client, 401, "Unauthorized", now)
            return None
        return username, key

    def _allocate(self, message: Message, client: Address, username: str, key: bytes, now: float) -> None:
        existing = self._allocations.get(client)
        if existing is not None and existing.relayed is not None and existing.expires_at <= now:
            self._delete(existing)
            self.counters.expirations += 1
            existing = None
        if existing is not None:
            if existing.transaction_id == message.transaction_id:
                # A retransmission: the same answer again (none yet while the socket opens).
                if existing.response is not None:
                    self._send(existing.response, client)
                return
            self._error(message, client, 437, "Allocation Mismatch", key)
            return
        transport = message.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            self._error(message, client, 400, "Bad Request", None)
            return
        if transport >> 24 != UDP_PROTOCOL:
            self._error(message, client, 442, "Unsupported Transport Protocol", key)
            return
        if len(self._allocations) >= self.max_allocations:
            self.counters.quota_rejections += 1
            self._error(message, client, 508, "Insufficient Capacity", key, count=False)
            return
        if self._per_client.get(client[0], 0) >= self.max_allocations_per_client:
            self.counters.quota_rejections += 1
            self._error(message, client, 486, "Allocation Quota Reached", key, count=False)
            return
        socket = self._next_socket
        self._next_socket += 1
        allocation = _Allocation(
            client, username, key, socket, message.transaction_id,
            self._lifetime(message.attributes.get("LIFETIME")),
        )
        self._allocations[client] = allocation
        self._by_socket[socket] = allocation
        self._per_client[client[0]] = self._per_client.get(client[0], 0) + 1
        self._to_open.append(socket)

    def _refresh(self, message: Message, client: Address, username: str, key: bytes, now: float) -> None:
        allocation = self._owned(message, client, username, key, now)
        if allocation is None:
            return
        requested = message.attributes.get("LIFETIME")
        if requested == 0:
            self._delete(allocation)
            self.counters.deallocations += 1
            self._success(message, client, key, {"LIFETIME": 0})
            return
        allocation.lifetime = self._lifetime(requested)
        allocation.expires_at = now + allocation.lifetime
        self._deadline(allocation.expires_at)
        self.counters.refreshes += 1
        self._success(message, client, key, {"LIFETIME": allocation.lifetime})

    def _create_permission(
        self, message: Message, client: Address, username: str, key: bytes, now: float
    ) -> None:
        allocation = self._owned(message, client, username, key, now)
        if allocation is None:
            return
        peer = self._peer(message, client, allocation, key)
        if peer is None:
            return
        if not self._make_room_for_permission(message, client, allocation, peer[0], key, now):
            return
        self._permit(allocation, peer[0], now)
        self.counters.permissions += 1
        self._success(message, client, key, {})

    def _channel_bind(
        self, message: Message, client: Address, username: str, key: bytes, now: float
    ) -> None:
        allocation = self._owned(message, client, username, key, now)
        if allocation is None:
            return
        number = message.attributes.get("CHANNEL-NUMBER")
        if number is None or "XOR-PEER-ADDRESS" not in message.attributes:
            self._error(message, client, 400, "Bad Request", key)
            return
        peer = self._peer(message, client, allocation, key)
        if peer is None:
            return
        if not CHANNEL_MIN <= number <= CHANNEL_MAX or peer[1] == 0:
            self._error(message, client, 400, "Bad Request", key)
            return
        channel = allocation.channels.get(number)
        other = allocation.channel_by_peer.get(peer)
        if (channel is not None and channel.peer != peer) or (other is not None and other.number != number):
            # A number or peer is bound to one partner for the binding's whole life.
            self._error(message, client, 400, "Bad Request", key)
            return
        if channel is None and len(allocation.channels) >= self.max_channels:
            self.counters.quota_rejections += 1
            self._error(message, client, 508, "Insufficient Capacity", key, count=False)
            return
        if not self._make_room_for_permission(message, client, allocation, peer[0], key, now):
            return
        expires_at = now + CHANNEL_LIFETIME
        if channel is None:
            channel = _Channel(number, peer, expires_at, expires_at + CHANNEL_QUARANTINE)
            allocation.channels[number] = channel
            allocation.channel_by_peer[peer] = channel
        channel.expires_at = expires_at
        channel.reserved_until = expires_at + CHANNEL_QUARANTINE
        self._deadline(channel.reserved_until)
        # A ChannelBind installs or refreshes the peer's permission too (RFC 8656 section 12).
        self._permit(allocation, peer[0], now)
        self.counters.channel_binds += 1
        self._success(message, client, key, {})

    _handlers: dict[Method, Callable[[TurnServerCore, Message, Address, str, bytes, float], None]] = {
        Method.ALLOCATE: _allocate,
        Method.REFRESH: _refresh,
        Method.CREATE_PERMISSION: _create_permission,
        Method.CHANNEL_BIND: _channel_bind,
    }

    def _send_indication(self, message: Message, client: Address, now: float) -> None:
        allocation = self._live(client, now)
        peer = message.attributes.get("XOR-PEER-ADDRESS")
        payload = message.attributes.get("DATA")
        if allocation is None or peer is None or payload is None:
            self.counters.dropped += 1
            return
        self._to_peer(allocation, (peer[0], peer[1]), payload, now)

    def _channel_data_from_client(self, data: bytes, client: Address, now: float) -> None:
        decoded = decode_channel_data(data)
        if decoded is None:
            self.counters.malformed += 1
            return
        allocation = self._live(client, now)
        channel = allocation.channels.get(decoded[0]) if allocation is not None else None
        if allocation is None or channel is None or channel.expires_at <= now:
            self.counters.dropped += 1
            return
        self._to_peer(allocation, channel.peer, decoded[1], now)

    def _to_peer(self, allocation: _Allocation, peer: Address, payload: bytes, now: float) -> None:
        if (
            peer[1] == 0
            or peer in self.blocked_peers
            or allocation.permissions.get(peer[0], -math.inf) <= now
        ):
            self.counters.dropped += 1
            return
        self.counters.bytes_to_peers += len(payload)
        self.counters.packets_to_peers += 1
        self._outbox.append((payload, peer, allocation.socket))

    # -- from peers -------------------------------------------------------------------------

    def _from_peer(self, allocation: _Allocation, data: bytes, peer: Address, now: float) -> None:
        if allocation.expires_at <= now or allocation.permissions.get(peer[0], -math.inf) <= now:
            self.counters.dropped += 1  # no permission: the relay filters like a NAT
            return
        channel = allocation.channel_by_peer.get(peer)
        if channel is not None and channel.expires_at > now and len(data) <= 0xFFFF:
            wire = encode_channel_data(channel.number, data)
        else:
            message = Message(
                Method.DATA, Class.INDICATION, os.urandom(12), {"XOR-PEER-ADDRESS": peer, "DATA": data}
            )
            message.add_fingerprint()
            wire = bytes(message)
        self.counters.bytes_to_clients += len(data)
        self.counters.packets_to_clients += 1
        self._send(wire, allocation.client)

    # -- helpers ----------------------------------------------------------------------------

    def _live(self, client: Address, now: float) -> _Allocation | None:
        allocation = self._allocations.get(client)
        if allocation is None or allocation.relayed is None:
            return None
        if allocation.expires_at <= now:
            self._delete(allocation)
            self.counters.expirations += 1
            return None
        return allocation

    def _owned(
        self, message: Message, client: Address, username: str, key: bytes, now: float
    ) -> _Allocation | None:
        """The client's live allocation, created under `username`; else 437 / 441 sent."""
        allocation = self._live(client, now)
        if allocation is None:
            self._error(message, client, 437, "Allocation Mismatch", key)
            return None
        if allocation.username != username:
            self.counters.auth_failures += 1
            self._error(message, client, 441, "Wrong Credentials", key, count=False)
            return None
        return allocation

    def _peer(
        self, message: Message, client: Address, allocation: _Allocation, key: bytes
    ) -> Address | None:
        """XOR-PEER-ADDRESS if it may be relayed to; else 400 / 443 / 403 sent."""
        value = message.attributes.get("XOR-PEER-ADDRESS")
        if value is None:
            self._error(message, client, 400, "Bad Request", key)
            return None
        peer: Address = (value[0], value[1])
        assert allocation.relayed is not None
        if ipaddress.ip_address(peer[0]).version != ipaddress.ip_address(allocation.relayed[0]).version:
            self._error(message, client, 443, "Peer Address Family Mismatch", key)
            return None
        if self.peer_filter is not None and not self.peer_filter(peer[0]):
            self._error(message, client, 403, "Forbidden", key)
            return None
        return peer

    def _make_room_for_permission(
        self, message: Message, client: Address, allocation: _Allocation, ip: str, key: bytes, now: float
    ) -> bool:
        if ip in allocation.permissions:
            return True
        if len(allocation.permissions) >= self.max_permissions:
            # Lapsed permissions wait for the sweep; they must not hold the quota.
            for other, expires_at in list(allocation.permissions.items()):
                if expires_at <= now:
                    del allocation.permissions[other]
        if len(allocation.permissions) >= self.max_permissions:
            self.counters.quota_rejections += 1
            self._error(message, client, 508, "Insufficient Capacity", key, count=False)
            return False
        return True

    def _permit(self, allocation: _Allocation, ip: str, now: float) -> None:
        allocation.permissions[ip] = now + PERMISSION_LIFETIME
        self._deadline(now + PERMISSION_LIFETIME)

    def _lifetime(self, requested: int | None) -> int:
        if requested is None:
            return self.default_lifetime
        return max(self.default_lifetime, min(requested, self.max_lifetime))

    def _deadline(self, when: float) -> None:
        self._next_deadline = min(self._next_deadline, when)

    def _forget(self, allocation: _Allocation) -> None:
        self._allocations.pop(allocation.client, None)
        self._by_socket.pop(allocation.socket, None)
        left = self._per_client.get(allocation.client[0], 0) - 1
        if left > 0:
            self._per_client[allocation.client[0]] = left
        else:
            self._per_client.pop(allocation.client[0], None)

    def _delete(self, allocation: _Allocation) -> None:
        self._forget(allocation)
        self._to_close.append(allocation.socket)

    # -- nonces -----------------------------------------------------------------------------

    def _nonce(self, client: Address, now: float) -> bytes:
        expiry = max(0, int(now + self.nonce_lifetime))
        return f"{expiry:x}.{self._mac(expiry, client)}".encode("ascii")

    def _nonce_valid(self, nonce: bytes, client: Address, now: float) -> bool:
        try:
            head, mac = nonce.decode("ascii").split(".", 1)
            expiry = int(head, 16)
        except (UnicodeDecodeError, ValueError):
            return False
        if head != f"{expiry:x}":  # int() also takes "+1f" and "1_f"
            return False
        return now < expiry and hmac.compare_digest(mac, self._mac(expiry, client))

    def _mac(self, expiry: int, client: Address) -> str:
        text = f"{expiry}|{client[0]}|{client[1]}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()[:32]

    # -- answers ----------------------------------------------------------------------------

    def _build(
        self, method: Method, cls: Class, tid: bytes, attributes: dict[str, Any], key: bytes | None
    ) -> bytes:
        if self.software:
            attributes["SOFTWARE"] = self.software
        message = Message(method, cls, tid, attributes)
        if key is not None:
            message.add_message_integrity(key)  # FINGERPRINT follows it
        else:
            message.add_fingerprint()
        return bytes(message)

    def _send(self, data: bytes, client: Address) -> None:
        self._outbox.append((data, client, LISTENER))

    def _reply(
        self, message: Message, client: Address, cls: Class, attributes: dict[str, Any], key: bytes | None
    ) -> None:
        data = self._build(message.message_method, cls, message.transaction_id, attributes, key)
        self._send(data, client)

    def _success(self, message: Message, client: Address, key: bytes, attributes: dict[str, Any]) -> None:
        self._reply(message, client, Class.RESPONSE, attributes, key)

    def _error(
        self,
        message: Message,
        client: Address,
        code: int,
        reason: str,
        key: bytes | None,
        *,
        count: bool = True,
    ) -> None:
        if count:
            self.counters.errors += 1
        # RFC 8489 section 9.2.4: a 400 cannot be authenticated even after the checks.
        signing_key = None if code == 400 else key
        attributes: dict[str, Any] = {"ERROR-CODE": (code, reason)}
        self._reply(message, client, Class.ERROR, attributes, signing_key)

    def _challenge(self, message: Message, client: Address, code: int, reason: str, now: float) -> None:
        attributes: dict[str, Any] = {
            "ERROR-CODE": (code, reason),
            "REALM": self.realm,
            "NONCE": self._nonce(client, now),
        }
        self._reply(message, client, Class.ERROR, attributes, None)


# -- asyncio ----------------------------------------------------------------------------------

RelayOpener = Callable[[], DatagramEndpoint | Awaitable[DatagramEndpoint]]


class TurnServer:
    """Runs a TurnServerCore on a listening endpoint, opening one relay endpoint per
    allocation with `open_relay_endpoint` (sync or async, bound to a concrete IP; for a
    wildcard bind give `external_ip`, the address peers reach the relay sockets at)."""

    def __init__(
        self,
        core: TurnServerCore,
        listen_endpoint: DatagramEndpoint,
        open_relay_endpoint: RelayOpener,
        external_ip: str | None,
    ) -> None:
        self.core = core
        self.endpoint = listen_endpoint
        self._open_relay_endpoint = open_relay_endpoint
        self._external_ip = external_ip
        self._loop = asyncio.get_running_loop()
        self._relays: dict[int, DatagramEndpoint] = {}
        self._opening: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closed = False
        self.relay_open_failures = 0

    @classmethod
    async def start(
        cls,
        listen_endpoint: DatagramEndpoint,
        open_relay_endpoint: RelayOpener,
        *,
        realm: str = "macula",
        users: Mapping[str, str],
        external_ip: str | None = None,
        **options: Any,
    ) -> TurnServer:
        """Serve TURN on `listen_endpoint`. `options` go to TurnServerCore (lifetimes,
        nonce_lifetime, quotas, peer_filter, software)."""
        blocked = {listen_endpoint.local_address, *options.pop("blocked_peers", ())}
        core = TurnServerCore(realm, users, blocked_peers=blocked, **options)
        server = cls(core, listen_endpoint, open_relay_endpoint, external_ip)
        listen_endpoint.set_receiver(server._on_listener)
        return server

    @property
    def address(self) -> Address:
        return self.endpoint.local_address

    @property
    def counters(self) -> TurnServerCounters:
        return self.core.counters

    @property
    def allocations(self) -> int:
        """Allocations held now (their total over time is `counters.allocations`)."""
        return self.core.allocation_count

    async def close(self) -> None:
        """Stop serving: every allocation and relay socket goes; the listening endpoint
        is closed too (the server took it over)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._opening):
            task.cancel()
        if self._opening:
            await asyncio.wait(self._opening, timeout=1.0)
        self.core.close()
        self.core.relays_to_close()
        for endpoint in self._relays.values():
            endpoint.close()
        self._relays.clear()
        self.endpoint.close()

    async def __aenter__(self) -> TurnServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _on_listener(self, data: bytes, addr: Address) -> None:
        if self._closed:
            return
        self.core.receive(data, addr, LISTENER, self._loop.time())
        self._pump()

    def _on_relay(self, socket: int, data: bytes, addr: Address) -> None:
        if self._closed:
            return
        self.core.receive(data, addr, socket, self._loop.time())
        self._pump()

    async def _open_relay(self, socket: int) -> None:
        try:
            result = self._open_relay_endpoint()
            endpoint = await result if inspect.isawaitable(result) else result
        except Exception as exc:  # no free port, address gone: the Allocate gets a 508
            self.relay_open_failures += 1
            log.warning("TURN server: cannot open a relay socket: %r", exc)
            self.core.relay_failed(socket, self._loop.time())
            self._pump()
            return
        if self._closed:
            endpoint.close()
            return
        self._relays[socket] = endpoint
        endpoint.set_receiver(lambda data, addr: self._on_relay(socket, data, addr))
        ip, port = endpoint.local_address[0], endpoint.local_address[1]
        if self._external_ip is not None:
            ip = self._external_ip
        elif ip in _WILDCARDS:
            ip = self.address[0]
        self.core.relay_opened(socket, (ip, port), self._loop.time())
        self._pump()

    def _pump(self) -> None:
        if self._closed:
            return
        for socket in self.core.relays_to_open():
            task = self._loop.create_task(self._open_relay(socket))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        for data, addr, socket in self.core.datagrams_to_send():
            endpoint = self.endpoint if socket == LISTENER else self._relays.get(socket)
            if endpoint is not None:
                endpoint.send(data, addr)
        for socket in self.core.relays_to_close():
            relay = self._relays.pop(socket, None)
            if relay is not None:
                relay.close()
        when = self.core.get_timer()
        if when != self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer, when) if when is not None else None
            self._timer_when = when

    def _on_timer(self, when: float) -> None:
        self._timer = self._timer_when = None
        # The loop may fire a hair early (clock resolution): never run the core behind.
        self.core.handle_timer(max(self._loop.time(), when))
        self._pump()
