"""The simulator's TURN server (macula_lab.turn_server): the sans-IO core on a fake clock,
hostile input, and our own TurnClient against it on loopback UDP and inside the simulator
(clients behind symmetric NATs, relay to relay)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from macula.nat.aio import AsyncTurnClient, discover_address
from macula.nat.turn import (
    TurnAuthError,
    TurnError,
    decode_channel_data,
    encode_channel_data,
    long_term_key,
)
from macula.net.endpoint import Address, DatagramEndpoint, Receiver
from macula.net.udp import open_udp_endpoint
from macula.wire.stun import Class, Message, Method, parse_message
from macula_lab.sim import SimHost, SimNetwork, build_pair_topology, run_simulation
from macula_lab.turn_server import LISTENER, TurnServer, TurnServerCore

T = TypeVar("T")

REALM, USER, PASSWORD = "macula.test", "alice", "secret"
KEY = long_term_key(USER, REALM, PASSWORD)
USERS = {USER: PASSWORD, "bob": "hunter2"}
CLIENT: Address = ("198.51.100.7", 40000)
RELAY: Address = ("203.0.113.10", 50000)
PEER: Address = ("192.0.2.20", 6000)
UDP = 17 << 24

# -- the core on a fake clock ---------------------------------------------------------------------


class Harness:
    """Feeds hand-built requests to a TurnServerCore and reads its answers."""

    def __init__(self, **options: Any) -> None:
        self.core = TurnServerCore(REALM, USERS, **options)
        self.now = 0.0
        self.nonces: dict[Address, bytes] = {}

    def feed(self, data: bytes, source: Address = CLIENT, socket: int = LISTENER) -> list[tuple[bytes, Address, int]]:
        self.core.receive(data, source, socket, self.now)
        assert self.core.counters.internal_errors == 0
        return self.core.datagrams_to_send()

    def answer(self, data: bytes, source: Address = CLIENT) -> Message:
        out = self.feed(data, source)
        assert len(out) == 1, out
        answer, to, socket = out[0]
        assert to == source and socket == LISTENER
        return parse_message(answer)

    def nonce(self, client: Address = CLIENT) -> bytes:
        if client not in self.nonces:
            challenge = self.answer(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}), client)
            assert challenge.error_code == 401
            self.nonces[client] = challenge.attributes["NONCE"]
        return self.nonces[client]

    def call(self, method: Method, attrs: dict[str, Any] | None = None, *, client: Address = CLIENT,
             user: str = USER, key: bytes = KEY, tid: bytes | None = None) -> Message:
        data = request(method, attrs, user=user, realm=REALM, nonce=self.nonce(client), key=key, tid=tid)
        answer = self.answer(data, client)
        if answer.error_code == 438:  # as a client does: once more with the fresh nonce
            self.nonces[client] = answer.attributes["NONCE"]
            return self.call(method, attrs, client=client, user=user, key=key, tid=tid)
        return answer

    def allocate(self, client: Address = CLIENT, relayed: Address = RELAY, **attrs: Any) -> int:
        data = request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP, **attrs}, user=USER, realm=REALM,
                       nonce=self.nonce(client), key=KEY)
        assert self.feed(data, client) == []  # nothing until the relay socket is open
        (socket,) = self.core.relays_to_open()
        self.core.relay_opened(socket, relayed, self.now)
        (answer, to, _), = self.core.datagrams_to_send()
        message = parse_message(answer)
        assert to == client and message.message_class == Class.RESPONSE
        assert message.check_message_integrity(KEY)
        return socket


def request(method: Method, attrs: dict[str, Any] | None = None, *, user: str | None = None,
            realm: str | None = None, nonce: bytes | None = None, key: bytes | None = None,
            tid: bytes | None = None, cls: Class = Class.REQUEST) -> bytes:
    message = Message(method, cls, tid or os.urandom(12), dict(attrs or {}))
    if key is not None:
        message.attributes.update({"USERNAME": user, "REALM": realm, "NONCE": nonce})
        message.add_message_integrity(key)
    else:
        message.add_fingerprint()
    return bytes(message)


def send_indication(peer: Address, data: bytes) -> bytes:
    return request(Method.SEND, {"XOR-PEER-ADDRESS": peer, "DATA": data}, cls=Class.INDICATION)


def test_binding_answers_the_mapped_address() -> None:
    h = Harness()
    answer = h.answer(request(Method.BINDING))
    assert answer.message_class == Class.RESPONSE and answer.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert h.core.counters.bindings == 1


def test_allocate_is_challenged_then_answered_like_coturn() -> None:
    h = Harness(default_lifetime=600)
    challenge = h.answer(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}))
    assert challenge.error_code == 401 and challenge.attributes["REALM"] == REALM
    assert challenge.attributes["NONCE"] and "MESSAGE-INTEGRITY" not in challenge.attributes
    h.nonces[CLIENT] = challenge.attributes["NONCE"]
    tid = os.urandom(12)
    data = request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}, user=USER, realm=REALM,
                   nonce=challenge.attributes["NONCE"], key=KEY, tid=tid)
    assert h.feed(data) == []
    (socket,) = h.core.relays_to_open()
    assert h.feed(data) == []  # a retransmission while the socket opens: still nothing
    h.core.relay_opened(socket, RELAY, 0.0)
    (answer, _, _), = h.core.datagrams_to_send()
    message = parse_message(answer, integrity_key=KEY)
    assert message.attributes["XOR-RELAYED-ADDRESS"] == RELAY
    assert message.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert message.attributes["LIFETIME"] == 600 and "FINGERPRINT" in message.attributes
    assert h.feed(data) == [(answer, CLIENT, LISTENER)]  # retransmission: the same answer
    again = h.call(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP})
    assert again.error_code == 437 and again.check_message_integrity(KEY)
    assert h.core.counters.allocations == 1 and h.core.counters.challenges == 1


@pytest.mark.parametrize(
    ("attrs", "code"),
    [({"REQUESTED-TRANSPORT": 6 << 24}, 442), ({}, 400)],
)
def test_allocate_needs_udp_transport(attrs: dict[str, Any], code: int) -> None:
    h = Harness()
    assert h.call(Method.ALLOCATE, attrs).error_code == code
    assert h.core.relays_to_open() == []


def test_credentials_are_checked_in_rfc_order() -> None:
    h = Harness(nonce_lifetime=100)
    nonce = h.nonce()
    alloc = {"REQUESTED-TRANSPORT": UDP}
    wrong = request(Method.ALLOCATE, alloc, user=USER, realm=REALM, nonce=nonce, key=b"x" * 16)
    unknown = request(Method.ALLOCATE, alloc, user="mallory", realm=REALM, nonce=nonce, key=KEY)
    other_realm = request(Method.ALLOCATE, alloc, user=USER, realm="evil", nonce=nonce, key=KEY)
    for data in (wrong, unknown, other_realm):
        answer = h.answer(data)
        assert answer.error_code == 401 and answer.attributes["REALM"] == REALM
    assert h.core.counters.auth_failures == 3
    no_nonce = Message(Method.ALLOCATE, Class.REQUEST, os.urandom(12), {"REQUESTED-TRANSPORT": UDP, "USERNAME": USER})
    no_nonce.add_message_integrity(KEY)
    assert h.answer(bytes(no_nonce)).error_code == 400
    for bad in (b"ffffffff.0000", b"+1f." + nonce.split(b".")[1], b"\xff", b"no dot", b""):
        forged = request(Method.ALLOCATE, alloc, user=USER, realm=REALM, nonce=bad, key=KEY)
        assert h.answer(forged).error_code == 438
    elsewhere = request(Method.ALLOCATE, alloc, user=USER, realm=REALM, nonce=nonce, key=KEY)
    assert h.answer(elsewhere, ("198.51.100.8", 40000)).error_code == 438  # bound to the 5-tuple
    h.now = 101.0
    stale = h.answer(request(Method.ALLOCATE, alloc, user=USER, realm=REALM, nonce=nonce, key=KEY))
    assert stale.error_code == 438 and stale.attributes["NONCE"] != nonce
    assert h.core.counters.stale_nonces == 7 and h.core.relays_to_open() == []


def test_another_user_cannot_touch_the_allocation() -> None:
    h = Harness()
    h.allocate()
    bob = long_term_key("bob", REALM, "hunter2")
    answer = h.call(Method.REFRESH, {}, user="bob", key=bob)
    assert answer.error_code == 441 and answer.check_message_integrity(bob)


def test_lifetimes_are_clamped_refreshed_and_deleted() -> None:
    h = Harness(default_lifetime=60, max_lifetime=120)
    socket = h.allocate(LIFETIME=10)
    assert h.core.allocation_of(CLIENT)["expires_at"] == 60.0
    assert h.call(Method.REFRESH, {"LIFETIME": 100_000}).attributes["LIFETIME"] == 120
    assert h.call(Method.REFRESH).attributes["LIFETIME"] == 60
    gone = h.call(Method.REFRESH, {"LIFETIME": 0})
    assert gone.message_class == Class.RESPONSE and gone.attributes["LIFETIME"] == 0
    assert h.core.relays_to_close() == [socket] and h.core.allocation_count == 0
    assert h.call(Method.REFRESH).error_code == 437
    assert h.core.counters.deallocations == 1 and h.core.counters.refreshes == 2


def test_unrefreshed_allocation_expires_and_its_socket_closes() -> None:
    h = Harness(default_lifetime=60)
    socket = h.allocate()
    assert h.core.get_timer() == 60.0
    h.core.handle_timer(59.0)
    assert h.core.relays_to_close() == []
    h.core.handle_timer(60.0)
    assert h.core.relays_to_close() == [socket] and h.core.get_timer() is None
    assert h.core.counters.expirations == 1
    h.now = 61.0
    assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER}).error_code == 437


def test_permissions_gate_both_directions_and_lapse_after_300_s() -> None:
    h = Harness(default_lifetime=3600, max_lifetime=3600)
    socket = h.allocate(LIFETIME=3600)
    assert h.feed(send_indication(PEER, b"early")) == []
    assert h.feed(b"spoofed", PEER, socket) == []
    assert h.core.counters.dropped == 2
    assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (PEER[0], 0)}).message_class == Class.RESPONSE
    assert h.feed(send_indication(PEER, b"hello")) == [(b"hello", PEER, socket)]
    other_port = (PEER[0], 7000)  # permissions are per IP: any port of the peer may answer
    (data, to, out_socket), = h.feed(b"reply", other_port, socket)
    indication = parse_message(data)
    assert (to, out_socket) == (CLIENT, LISTENER)
    assert indication.message_method == Method.DATA and indication.message_class == Class.INDICATION
    assert indication.attributes["XOR-PEER-ADDRESS"] == other_port and indication.attributes["DATA"] == b"reply"
    assert h.feed(b"stranger", ("192.0.2.99", 6000), socket) == []
    h.now = 299.0
    assert len(h.feed(b"still", PEER, socket)) == 1
    h.now = 300.0
    assert h.feed(b"late", PEER, socket) == [] and h.feed(send_indication(PEER, b"late")) == []
    c = h.core.counters
    assert (c.bytes_to_peers, c.bytes_to_clients, c.packets_to_clients) == (5, 10, 2)


def test_channel_bind_relays_channel_data_both_ways() -> None:
    h = Harness(default_lifetime=3600, max_lifetime=3600)
    socket = h.allocate(LIFETIME=3600)
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER}).message_class == Class.RESPONSE
    assert PEER[0] in h.core.allocation_of(CLIENT)["permissions"]  # a bind permits the peer too
    assert h.feed(encode_channel_data(0x4001, b"ping")) == [(b"ping", PEER, socket)]
    (data, to, _), = h.feed(b"pong", PEER, socket)
    assert to == CLIENT and decode_channel_data(data) == (0x4001, b"pong")
    # Another port of the peer has no channel: it comes as a Data indication.
    (data, _, _), = h.feed(b"other", (PEER[0], 7000), socket)
    assert parse_message(data).message_method == Method.DATA
    assert h.feed(encode_channel_data(0x4002, b"unbound")) == []
    # Conflicts: a number belongs to one peer, a peer to one number.
    bind = {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": (PEER[0], 7000)}
    assert h.call(Method.CHANNEL_BIND, bind).error_code == 400
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": PEER}).error_code == 400
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x3FFF, "XOR-PEER-ADDRESS": PEER}).error_code == 400
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x5000, "XOR-PEER-ADDRESS": PEER}).error_code == 400
    # Kept alive by refreshing the permission only, the channel lapses at 600 s: data
    # falls back to Data indications, and the number stays reserved 5 minutes more.
    h.now = 310.0
    h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER})
    h.now = 600.0
    assert h.feed(encode_channel_data(0x4001, b"late")) == []
    (data, _, _), = h.feed(b"late", PEER, socket)
    assert parse_message(data).message_method == Method.DATA
    h.core.handle_timer(600.0)
    assert h.call(Method.CHANNEL_BIND, bind).error_code == 400
    h.core.handle_timer(900.0)
    h.now = 900.0
    assert h.call(Method.CHANNEL_BIND, bind).message_class == Class.RESPONSE


def test_peer_policy_family_and_loop_guard() -> None:
    h = Harness(peer_filter=lambda ip: not ip.startswith("10."), blocked_peers=[("203.0.113.10", 3478)])
    h.allocate()
    assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("10.0.0.1", 1)}).error_code == 403
    assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("2001:db8::1", 1)}).error_code == 443
    assert h.call(Method.CREATE_PERMISSION, {}).error_code == 400
    h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("203.0.113.10", 0)})
    # Relaying into the server's own listening socket would make the relay a client.
    assert h.feed(send_indication(("203.0.113.10", 3478), b"loop")) == []
    assert len(h.feed(send_indication(("203.0.113.10", 50001), b"relay to relay"))) == 1


def test_quotas() -> None:
    h = Harness(max_allocations=2, max_allocations_per_client=1, max_permissions=2, max_channels=1)
    h.allocate()
    second = ("198.51.100.7", 40001)
    answer = h.answer(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}, user=USER, realm=REALM,
                              nonce=h.nonce(second), key=KEY), second)
    assert answer.error_code == 486 and answer.check_message_integrity(KEY)
    h.allocate(("198.51.100.9", 40000), ("203.0.113.10", 50001))
    third = ("198.51.100.10", 40000)
    answer = h.answer(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}, user=USER, realm=REALM,
                              nonce=h.nonce(third), key=KEY), third)
    assert answer.error_code == 508
    for ip in ("192.0.2.1", "192.0.2.2"):
        assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 1)}).message_class == Class.RESPONSE
    assert h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("192.0.2.3", 1)}).error_code == 508
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("192.0.2.1", 1)}).message_class == Class.RESPONSE
    assert h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": ("192.0.2.2", 1)}).error_code == 508
    assert h.core.counters.quota_rejections == 4


def test_lapsed_permissions_do_not_hold_the_quota() -> None:
    h = Harness(max_permissions=1)
    h.allocate()
    h.call(Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("192.0.2.1", 1)})
    bind = {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": ("192.0.2.2", 1)}
    assert h.call(Method.CHANNEL_BIND, bind).error_code == 508  # its permission would not fit
    h.now = 300.0  # lapsed, not yet swept
    assert h.call(Method.CHANNEL_BIND, bind).message_class == Class.RESPONSE
    assert list(h.core.allocation_of(CLIENT)["permissions"]) == ["192.0.2.2"]


def test_failed_relay_socket_fails_the_allocate_and_frees_the_quota() -> None:
    h = Harness(max_allocations_per_client=1)
    h.feed(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}, user=USER, realm=REALM, nonce=h.nonce(), key=KEY))
    (socket,) = h.core.relays_to_open()
    h.core.relay_failed(socket, 0.0)
    (data, _, _), = h.core.datagrams_to_send()
    assert parse_message(data, integrity_key=KEY).error_code == 508
    h.allocate()
    h.core.relay_opened(socket, RELAY, 0.0)  # a late socket nobody wants is closed
    assert h.core.relays_to_close() == [socket]


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    h = Harness()
    raw = bytearray(request(Method.ALLOCATE, {"REQUESTED-TRANSPORT": UDP}))[:-8]  # drop FINGERPRINT
    raw += struct.pack("!HHI", 0x001A, 0, 0)[:4]  # DONT-FRAGMENT, which we do not implement
    raw[2:4] = struct.pack("!H", len(raw) - 20)
    answer = h.answer(bytes(raw))
    assert answer.error_code == 420 and answer.attributes["UNKNOWN-ATTRIBUTES"] == (0x001A,)


def test_junk_is_counted_not_answered() -> None:
    h = Harness()
    socket = h.allocate()
    for junk in (b"", b"\x00", b"\xff" * 40, b"\x40\x00\x00\x10abc", request(Method.BINDING)[:-1]):
        assert h.feed(junk) == []
    assert h.feed(request(Method.ALLOCATE, cls=Class.RESPONSE)) == []
    assert h.feed(request(Method.BINDING, cls=Class.INDICATION)) == []  # a keepalive
    assert h.feed(b"x", PEER, socket + 99) == []
    assert h.answer(request(Method.SEND)).error_code == 400  # Send is an indication only
    c = h.core.counters
    assert c.malformed == 5 and c.dropped == 3 and c.errors == 1 and c.internal_errors == 0


# -- hostile input ------------------------------------------------------------------------------

_TYPES = [0x0001, 0x0101, 0x0003, 0x0004, 0x0008, 0x0009, 0x0016, 0x0017, 0x0111, 0x4004]
_ATTRS = [0x0006, 0x0008, 0x0009, 0x000C, 0x000D, 0x0012, 0x0013, 0x0014, 0x0015, 0x0016,
          0x0019, 0x0020, 0x001A, 0x8022, 0x8028, 0x000A]


def _tlv(attr: tuple[int, bytes]) -> bytes:
    kind, value = attr
    return struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4)


stun_like = st.builds(
    lambda kind, tid, attrs: struct.pack("!HHI", kind, len(attrs), 0x2112A442) + tid + attrs,
    st.sampled_from(_TYPES) | st.integers(0, 0x3FFF),
    st.binary(min_size=12, max_size=12),
    st.lists(st.tuples(st.sampled_from(_ATTRS) | st.integers(0, 0xFFFF), st.binary(max_size=24)), max_size=6)
    .map(lambda attrs: b"".join(map(_tlv, attrs))),
)
channel_like = st.builds(lambda ch, body: struct.pack("!H", ch) + body, st.integers(0x4000, 0x4FFF), st.binary(max_size=40))
anything = st.binary(max_size=200) | stun_like | channel_like
ipv4 = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)).map(
    lambda t: ".".join(map(str, t)))
ip = ipv4 | st.sampled_from(["::1", "2001:db8::7"])
values = st.fixed_dictionaries({}, optional={
    "LIFETIME": st.integers(0, 2**32 - 1),
    "REQUESTED-TRANSPORT": st.integers(0, 2**32 - 1),
    "CHANNEL-NUMBER": st.integers(0, 0xFFFF),
    "XOR-PEER-ADDRESS": st.tuples(ip, st.integers(0, 0xFFFF)),
    "DATA": st.binary(max_size=64),
})
hypothesis_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ready() -> tuple[Harness, int]:
    h = Harness(default_lifetime=60)
    socket = h.allocate()
    h.call(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": PEER})
    return h, socket


@hypothesis_settings
@given(st.lists(st.tuples(anything, st.booleans(), st.booleans()), max_size=8))
def test_core_never_raises_on_arbitrary_bytes(datagrams: list[tuple[bytes, bool, bool]]) -> None:
    h, socket = _ready()
    for data, on_relay, from_client in datagrams:
        source = CLIENT if from_client else PEER
        h.feed(data, source, socket if on_relay else LISTENER)
    h.core.handle_timer(1000.0)
    assert h.core.counters.internal_errors == 0


methods = st.sampled_from([Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND])


@hypothesis_settings
@given(methods, values, st.sampled_from([CLIENT, ("198.51.100.8", 40000)]), st.floats(0, 1000))
def test_core_never_raises_on_authenticated_hostile_values(
    method: Method, attrs: dict[str, Any], client: Address, now: float
) -> None:
    h, _ = _ready()  # CLIENT holds an allocation, the other address none
    nonce = h.nonce(client)
    h.now = now
    out = h.feed(request(method, attrs, user=USER, realm=REALM, nonce=nonce, key=KEY), client)
    assert len(out) <= 1
    for opened in h.core.relays_to_open():
        h.core.relay_opened(opened, ("203.0.113.10", 50001), now)
    if "XOR-PEER-ADDRESS" in attrs and "DATA" in attrs:
        h.feed(send_indication(attrs["XOR-PEER-ADDRESS"], attrs["DATA"]), client)
    h.core.handle_timer(now + 1.0)
    assert h.core.counters.internal_errors == 0


@hypothesis_settings
@given(st.binary(min_size=1, max_size=120), st.integers(0, 200))
def test_core_never_raises_on_mangled_valid_requests(noise: bytes, where: int) -> None:
    h, _ = _ready()
    data = bytearray(request(Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER},
                             user=USER, realm=REALM, nonce=h.nonce(), key=KEY))
    start = where % len(data)
    data[start:start + len(noise)] = noise
    h.feed(bytes(data))
    assert h.core.counters.internal_errors == 0


# -- our client against the server on loopback UDP -----------------------------------------------


class Tap:
    """A DatagramEndpoint wrapper that remembers what went in and out."""

    def __init__(self, inner: DatagramEndpoint) -> None:
        self.inner = inner
        self.received: list[bytes] = []
        self.sent: list[bytes] = []

    @property
    def local_address(self) -> Address:
        return self.inner.local_address

    def send(self, data: bytes, addr: Address) -> None:
        self.sent.append(data)
        self.inner.send(data, addr)

    def set_receiver(self, receiver: Receiver) -> None:
        def tapped(data: bytes, addr: Address) -> None:
            self.received.append(data)
            receiver(data, addr)

        self.inner.set_receiver(tapped)

    def close(self) -> None:
        self.inner.close()


def collector(endpoint: DatagramEndpoint) -> asyncio.Queue[tuple[bytes, Address]]:
    queue: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
    endpoint.set_receiver(lambda data, addr: queue.put_nowait((data, addr)))
    return queue


def channel_data_count(frames: list[bytes]) -> int:
    return sum(1 for frame in frames if frame and 0x40 <= frame[0] <= 0x4F)


@pytest.fixture
async def loopback() -> Any:
    server = await TurnServer.start(
        await open_udp_endpoint("127.0.0.1", 0),
        lambda: open_udp_endpoint("127.0.0.1", 0),
        realm=REALM, users=USERS,
    )
    opened: list[DatagramEndpoint] = []

    async def endpoint() -> DatagramEndpoint:
        ep = await open_udp_endpoint("127.0.0.1", 0)
        opened.append(ep)
        return ep

    try:
        yield server, endpoint
    finally:
        await server.close()
        for ep in opened:
            ep.close()


async def test_loopback_allocate_send_data_and_channels(loopback: Any) -> None:
    server, endpoint = loopback
    tap = Tap(await endpoint())
    peer = await endpoint()
    inbox = collector(peer)
    assert await discover_address(tap, [server.address]) == tap.local_address  # it is a STUN server
    client = AsyncTurnClient.over_udp(tap, server.address, USER, PASSWORD)
    allocation = await client.allocate_relay()
    assert allocation.relayed[0] == "127.0.0.1" and allocation.relayed != server.address
    assert allocation.mapped == tap.local_address and allocation.lifetime == 600
    assert client.counters.auth_challenges == 1 and server.counters.challenges == 1

    client.send_via_relay(peer.local_address, b"unpermitted")
    await client.create_permission("127.0.0.1")
    client.send_via_relay(peer.local_address, b"hello")
    data, source = await asyncio.wait_for(inbox.get(), 2)
    assert (data, source) == (b"hello", allocation.relayed)  # the first one was dropped
    peer.send(b"back", allocation.relayed)
    assert await client.recv(2) == (peer.local_address, b"back")

    number = await client.bind_channel(peer.local_address)
    assert number == 0x4000
    client.send_via_relay(peer.local_address, b"over the channel")
    assert await asyncio.wait_for(inbox.get(), 2) == (b"over the channel", allocation.relayed)
    peer.send(b"channel back", allocation.relayed)
    assert await client.recv(2) == (peer.local_address, b"channel back")
    assert channel_data_count(tap.sent) == 1 and channel_data_count(tap.received) == 1

    refreshed = await client.refresh(lifetime=1200)
    assert refreshed.lifetime == 1200
    await client.close()
    assert client.client.state == "closed" and server.allocations == 0
    c = server.counters
    assert (c.allocations, c.deallocations, c.refreshes, c.permissions, c.channel_binds) == (1, 1, 1, 1, 1)
    assert c.bytes_to_peers == len(b"hello" + b"over the channel")
    assert c.bytes_to_clients == len(b"back" + b"channel back")
    assert c.dropped == 1 and c.internal_errors == 0


async def test_loopback_wrong_password_is_refused(loopback: Any) -> None:
    server, endpoint = loopback
    client = AsyncTurnClient.over_udp(await endpoint(), server.address, USER, "wrong")
    with pytest.raises(TurnAuthError):
        await client.allocate_relay()
    await client.close()
    assert server.counters.auth_failures == 1 and server.allocations == 0


async def test_loopback_wildcard_relay_sockets_advertise_the_listening_ip() -> None:
    server = await TurnServer.start(
        await open_udp_endpoint("127.0.0.1", 0), lambda: open_udp_endpoint("0.0.0.0", 0),
        realm=REALM, users=USERS,
    )
    ep = await open_udp_endpoint("127.0.0.1", 0)
    try:
        async with AsyncTurnClient.over_udp(ep, server.address, USER, PASSWORD) as client:
            allocation = await client.allocate_relay()
            assert allocation.relayed[0] == "127.0.0.1"
    finally:
        await server.close()
        ep.close()


async def test_loopback_relay_socket_failure_is_a_508() -> None:
    async def no_ports() -> DatagramEndpoint:
        raise OSError("no free port")

    server = await TurnServer.start(await open_udp_endpoint("127.0.0.1", 0), no_ports, realm=REALM, users=USERS)
    ep = await open_udp_endpoint("127.0.0.1", 0)
    try:
        client = AsyncTurnClient.over_udp(ep, server.address, USER, PASSWORD)
        with pytest.raises(TurnError) as caught:
            await client.allocate_relay()
        assert caught.value.code == 508 and server.relay_open_failures == 1
        await client.close()
    finally:
        await server.close()
        ep.close()


# -- inside the simulator ----------------------------------------------------------------------

SERVER_IP = "203.0.113.10"
TURN_PORT = 3478


def simulate(main: Callable[[SimNetwork], Awaitable[T]], seed: int = 1) -> T:
    net = SimNetwork(seed=seed)
    return run_simulation(lambda: main(net), seed=seed, time_limit=3600.0)


async def start_turn(server: SimHost, **options: Any) -> TurnServer:
    """The recipe the simulator matrix uses: next to the gateway on the server host."""
    return await TurnServer.start(
        server.open_endpoint(TURN_PORT, SERVER_IP),
        lambda: server.open_endpoint(0, SERVER_IP),
        realm=REALM, users=USERS, **options,
    )


def test_sim_symmetric_nats_talk_relay_to_relay() -> None:
    async def main(net: SimNetwork) -> dict[str, Any]:
        topo = build_pair_topology(net, "symmetric", "symmetric", latency_ms=15)
        turn = await start_turn(topo.server)
        direct: list[bytes] = []
        ep_a, ep_b = topo.host_a.open_endpoint(), topo.host_b.open_endpoint()
        a = AsyncTurnClient.over_udp(ep_a, turn.address, USER, PASSWORD)
        b = AsyncTurnClient.over_udp(ep_b, turn.address, USER, PASSWORD, passthrough=lambda d, _: direct.append(d))
        alloc_a, alloc_b = await asyncio.gather(a.allocate_relay(), b.allocate_relay())
        assert alloc_a.mapped[0] == topo.a.public_ip and alloc_b.mapped[0] == topo.b.public_ip
        # What a hole punch would try: straight to B's server-reflexive address. Its
        # symmetric NAT has no mapping towards A's new one, so nothing gets through.
        ep_a.send(b"direct?", alloc_b.mapped)
        await asyncio.sleep(1.0)
        assert direct == []

        await asyncio.gather(a.create_permission(alloc_b.relayed[0]), b.create_permission(alloc_a.relayed[0]))
        a.send_via_relay(alloc_b.relayed, b"A->B by Send indication")
        assert await b.recv(5) == (alloc_a.relayed, b"A->B by Send indication")
        b.send_via_relay(alloc_a.relayed, b"B->A by Send indication")
        assert await a.recv(5) == (alloc_b.relayed, b"B->A by Send indication")

        await asyncio.gather(a.bind_channel(alloc_b.relayed), b.bind_channel(alloc_a.relayed))
        for i in range(20):
            a.send_via_relay(alloc_b.relayed, b"a%d" % i)
            b.send_via_relay(alloc_a.relayed, b"b%d" % i)
        got_b = [(await b.recv(5))[1] for _ in range(20)]
        got_a = [(await a.recv(5))[1] for _ in range(20)]
        assert got_b == [b"a%d" % i for i in range(20)] and got_a == [b"b%d" % i for i in range(20)]
        await asyncio.gather(a.close(), b.close())
        counters = turn.counters
        await turn.close()
        return {"counters": counters, "allocations": turn.allocations}

    result = simulate(main)
    c = result["counters"]
    assert c.allocations == 2 and c.deallocations == 2 and result["allocations"] == 0
    assert c.packets_to_peers == c.packets_to_clients == 42  # each relayed once, each way
    assert c.internal_errors == 0 and c.malformed == 0


def test_sim_refresh_stale_nonce_expiry_and_socket_reclaim() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "symmetric", "port_restricted", latency_ms=10)
        peer_host = net.add_host("peer", net.internet)
        peer = peer_host.open_endpoint(5000)
        inbox = collector(peer)
        turn = await start_turn(topo.server, default_lifetime=60, max_lifetime=60, nonce_lifetime=100)
        ep = topo.host_a.open_endpoint()
        client = AsyncTurnClient.over_udp(ep, turn.address, USER, PASSWORD)
        allocation = await client.allocate_relay()
        assert allocation.lifetime == 60
        await client.create_permission(peer_host.ip)
        # Ten minutes with nothing but the client's own timers: refreshes every 48 s (each
        # keeping the symmetric NAT's mapping alive), new nonces after 438s, permission
        # refreshes every 240 s.
        await asyncio.sleep(600)
        assert client.client.state == "allocated" and client.errors == []
        assert turn.counters.refreshes >= 11 and turn.counters.stale_nonces >= 3
        assert client.counters.stale_nonces == turn.counters.stale_nonces
        peer.send(b"still there?", allocation.relayed)
        assert await client.recv(5) == (peer.local_address, b"still there?")
        client.send_via_relay(peer.local_address, b"yes")
        assert await asyncio.wait_for(inbox.get(), 5) == (b"yes", allocation.relayed)

        ep.close()  # the client dies without deallocating
        await asyncio.sleep(61 + 1)
        assert turn.counters.expirations == 1 and turn.allocations == 0
        before = topo.server.counters.dropped["no_listener"]
        peer.send(b"anyone?", allocation.relayed)
        await asyncio.sleep(1)
        assert topo.server.counters.dropped["no_listener"] == before + 1  # the relay port is gone
        await client.close(timeout=0.5)
        await turn.close()

    simulate(main, seed=7)


def test_sim_turn_and_stun_on_the_same_port_next_to_the_gateway() -> None:
    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "cgnat", "open")
        turn = await start_turn(topo.server)
        ep = topo.host_a.open_endpoint()
        mapped = await discover_address(ep, [turn.address])
        assert mapped[0] == topo.a.public_ip
        client = AsyncTurnClient.over_udp(ep, turn.address, USER, PASSWORD)
        allocation = await client.allocate_relay()
        assert allocation.mapped == mapped and allocation.relayed[0] == SERVER_IP
        await client.close()
        await turn.close()
        assert turn.counters.bindings == 1 and turn.counters.deallocations == 1

    simulate(main, seed=3)
