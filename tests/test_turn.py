"""TURN client (RFC 8656): the sans-IO core against a scripted server on a fake clock, the
TCP framing codec, and the whole client against a real coturn on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from aioice import stun as aioice_stun
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.nat.aio import AsyncTurnClient
from macula.nat.turn import (
    CHANNEL_MAX,
    CHANNEL_MIN,
    MAX_AUTH_RETRIES,
    Allocation,
    FramingError,
    StreamFramer,
    TurnAuthError,
    TurnClient,
    TurnControl,
    TurnData,
    TurnError,
    TurnEvent,
    TurnTimeout,
    decode_channel_data,
    encode_channel_data,
    frame_length,
    long_term_key,
)
from macula.net.endpoint import Address
from macula.net.udp import UdpEndpoint, open_udp_endpoint
from macula.wire.stun import Class, Message, Method, parse_message
from macula_lab.coturn import Coturn, CoturnError, coturn_available

SERVER: Address = ("192.0.2.10", 3478)
RELAYED: Address = ("192.0.2.10", 50000)
MAPPED: Address = ("198.51.100.7", 40000)
PEER: Address = ("203.0.113.5", 6000)
USER, PASSWORD, REALM = "macula", "secret", "macula.test"
KEY = long_term_key(USER, REALM, PASSWORD)


# -- a scripted server --------------------------------------------------------------------------


def answer(request: bytes, cls: Class = Class.RESPONSE, attrs: dict[str, Any] | None = None,
           key: bytes | None = KEY) -> bytes:
    req = parse_message(request)
    message = Message(req.message_method, cls, req.transaction_id, dict(attrs or {}))
    if key is not None:
        message.add_message_integrity(key)
    else:
        message.add_fingerprint()
    return bytes(message)


def error(request: bytes, code: int, reason: str, **attrs: Any) -> bytes:
    extra = {k.replace("_", "-").upper(): v for k, v in attrs.items()}
    key = None if code in (401, 438) else KEY
    return answer(request, Class.ERROR, {"ERROR-CODE": (code, reason), **extra}, key=key)


def challenge(request: bytes, code: int = 401, nonce: bytes = b"nonce-1") -> bytes:
    reason = "Unauthorized" if code == 401 else "Stale Nonce"
    return error(request, code, reason, realm=REALM, nonce=nonce)


def success(request: bytes, lifetime: int = 600) -> bytes:
    method = parse_message(request).message_method
    attrs: dict[str, Any] = {}
    if method == Method.ALLOCATE:
        attrs = {"XOR-RELAYED-ADDRESS": RELAYED, "XOR-MAPPED-ADDRESS": MAPPED, "LIFETIME": lifetime}
    elif method == Method.REFRESH:
        attrs = {"LIFETIME": parse_message(request).attributes.get("LIFETIME", lifetime)}
    return answer(request, attrs=attrs)


def raw_response(request: Message, attrs: bytes, key: bytes) -> bytes:
    """A success response with hand-made attributes, then MESSAGE-INTEGRITY and FINGERPRINT."""
    header = struct.pack("!HHI12s", request.message_method | Class.RESPONSE, 0, 0x2112A442, request.transaction_id)
    raw = header + attrs
    raw = aioice_stun.set_body_length(raw + struct.pack("!HH", 0x0008, 20) + aioice_stun.message_integrity(raw, key), len(attrs) + 24)
    raw = aioice_stun.set_body_length(raw, len(attrs) + 32)
    return raw + struct.pack("!HHI", 0x8028, 4, aioice_stun.message_fingerprint(raw))


def receive(client: TurnClient, data: bytes, now: float) -> TurnEvent | None:
    """One datagram from the server; the first thing it caused (the core queues them)."""
    client.receive_datagram(data, client.server, now)
    events = drain(client)
    return events[0] if events else None


def drain(client: TurnClient) -> list[TurnEvent]:
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events


def fire(client: TurnClient, now: float) -> list[TurnEvent]:
    """The timer at `now`, and what it caused."""
    client.handle_timer(now)
    return drain(client)


def sent(client: TurnClient) -> list[bytes]:
    out = client.datagrams_to_send(0.0)
    assert all(addr == client.server for _, addr in out)
    return [data for data, _ in out]


def one(client: TurnClient) -> bytes:
    out = sent(client)
    assert len(out) == 1, out
    return out[0]


def allocated(transport: str = "udp", lifetime: int = 600, **options: Any) -> TurnClient:
    client = TurnClient(SERVER, USER, PASSWORD, transport=transport, **options)  # type: ignore[arg-type]
    client.allocate_relay(0.0)
    assert receive(client, challenge(one(client)), 0.0) is None
    event = receive(client, success(one(client), lifetime), 0.0)
    assert event is not None and event.kind == "allocated"
    return client


def auto_answer(client: TurnClient, until: float) -> list[tuple[float, Method, Any]]:
    """Fire timers up to `until`, answering every request with success at once."""
    log: list[tuple[float, Method, Any]] = []
    for _ in range(10_000):  # bounded: each pass fires one timer
        when = client.get_timer()
        if when is None or when > until:
            break
        client.handle_timer(when)
        for data in sent(client):
            msg = parse_message(data, integrity_key=KEY)
            log.append((when, msg.message_method, msg.attributes.get("XOR-PEER-ADDRESS")))
            receive(client, success(data), when)
    return log


# -- allocation and credentials ----------------------------------------------------------------


def test_allocate_answers_the_challenge_with_long_term_credentials() -> None:
    client = TurnClient(SERVER, USER, PASSWORD)
    client.allocate_relay(0.0, lifetime=1200)
    first = parse_message(one(client))
    assert first.message_method == Method.ALLOCATE and first.message_class == Class.REQUEST
    assert first.attributes["REQUESTED-TRANSPORT"] == 17 << 24 and first.attributes["LIFETIME"] == 1200
    assert "USERNAME" not in first.attributes and "MESSAGE-INTEGRITY" not in first.attributes
    assert receive(client, challenge(bytes(first)), 0.01) is None

    data = one(client)
    second = parse_message(data, integrity_key=long_term_key("macula", "macula.test", "secret"))
    assert second.transaction_id != first.transaction_id  # a new transaction
    assert (second.attributes["USERNAME"], second.attributes["REALM"]) == (USER, REALM)
    assert second.attributes["NONCE"] == b"nonce-1" and "FINGERPRINT" in second.attributes
    event = receive(client, success(data, 1200), 0.02)
    assert event == TurnControl("allocated", Allocation(RELAYED, MAPPED, 1200, 1200.02))
    assert client.state == "allocated" and client.allocation == event.value
    assert (client.counters.allocations, client.counters.auth_challenges) == (1, 1)


def test_wrong_password_is_a_clear_auth_error() -> None:
    client = TurnClient(SERVER, USER, "wrong")
    client.allocate_relay(0.0)
    receive(client, challenge(one(client)), 0.0)
    event = receive(client, challenge(one(client)), 0.01)  # credentials sent, still 401
    assert event is not None and isinstance(event, TurnControl) and event.kind == "error"
    exc = event.value
    assert isinstance(exc, TurnAuthError) and exc.code == 401 and exc.operation == "allocate"
    assert "rejected the credentials of user 'macula' in realm 'macula.test'" in str(exc)
    assert "192.0.2.10:3478" in str(exc)
    assert client.state == "failed" and client.counters.errors == 1 and sent(client) == []


def test_stale_nonce_is_retried_with_the_new_nonce() -> None:
    client = allocated()
    client.refresh(10.0)
    stale = one(client)
    assert parse_message(stale).attributes["NONCE"] == b"nonce-1"
    assert receive(client, challenge(stale, 438, b"nonce-2"), 10.01) is None
    retry = one(client)
    assert parse_message(retry, integrity_key=KEY).attributes["NONCE"] == b"nonce-2"
    event = receive(client, success(retry), 10.02)
    assert event is not None and event.kind == "refreshed" and client.counters.stale_nonces == 1
    # Later requests carry the new nonce straight away.
    client.create_permission(PEER[0], 11.0)
    assert parse_message(one(client)).attributes["NONCE"] == b"nonce-2"


def test_stale_nonce_retries_are_bounded() -> None:
    client = allocated()
    client.refresh(10.0)
    for i in range(MAX_AUTH_RETRIES):
        assert receive(client, challenge(one(client), 438, b"n%d" % i), 10.0) is None
    event = receive(client, challenge(one(client), 438, b"again"), 10.0)
    assert event is not None and isinstance(event.value, TurnError) and event.value.code == 438
    assert client.state == "allocated"  # the allocation itself is still there


def test_forged_success_is_ignored() -> None:
    client = TurnClient(SERVER, USER, PASSWORD)
    client.allocate_relay(0.0)
    receive(client, challenge(one(client)), 0.0)
    request = one(client)
    forged = answer(request, attrs={"XOR-RELAYED-ADDRESS": ("192.0.2.66", 1)}, key=b"not the key")
    assert receive(client, forged, 0.01) is None and client.state == "allocating"
    assert client.counters.dropped == 1
    event = receive(client, success(request), 0.02)
    assert event is not None and event.value.relayed == RELAYED


def test_allocation_errors() -> None:
    client = TurnClient(SERVER, USER, PASSWORD)
    client.allocate_relay(0.0)
    receive(client, challenge(one(client)), 0.0)
    event = receive(client, error(one(client), 437, "Allocation Mismatch"), 0.0)
    assert event is not None and "already exists for this 5-tuple" in str(event.value)
    client.allocate_relay(1.0)  # a failed client may try again
    event = receive(client, error(one(client), 486, "Allocation Quota Reached"), 1.0)
    assert event is not None and event.value.code == 486 and "486 Allocation Quota Reached" in str(event.value)
    with pytest.raises(TurnError):
        client.send_via_relay(PEER, b"x")


def test_unknown_comprehension_required_attribute_fails_the_transaction() -> None:
    client = allocated()
    client.refresh(5.0)
    request = parse_message(one(client))
    # A success carrying an unknown attribute (0x7FFE), authenticated like a real answer.
    attrs = struct.pack("!HHI", 0x000D, 4, 600) + b"\x7f\xfe\x00\x04abcd"
    assert receive(client, raw_response(request, attrs, b"wrong key"), 5.0) is None  # forged: ignored
    raw = raw_response(request, attrs, KEY)
    event = receive(client, raw, 5.01)
    assert event is not None and event.kind == "error" and "unknown comprehension-required" in str(event.value)


# -- timers ---------------------------------------------------------------------------------------


def test_udp_retransmission_schedule_and_timeout() -> None:
    client = TurnClient(SERVER, USER, PASSWORD)
    client.allocate_relay(0.0)
    sent(client)
    times, events = [], []
    for _ in range(20):
        when = client.get_timer()
        if when is None:
            break
        events += fire(client, when)
        times += [round(when, 6)] * len(sent(client))
    assert times == [0.1, 0.3, 0.7, 1.5, 3.1, 6.3]
    assert len(events) == 1 and isinstance(events[0].value, TurnTimeout)
    assert str(events[0].value) == "TURN allocate to 192.0.2.10:3478 got no answer after 7.90 s (7 requests sent)"
    assert client.state == "failed" and client.counters.retransmissions == 6


def test_tcp_sends_once_and_waits_ti() -> None:
    client = TurnClient(SERVER, USER, PASSWORD, transport="tcp", tcp_timeout=39.5)
    client.allocate_relay(0.0)
    assert len(sent(client)) == 1 and client.get_timer() == 39.5
    assert fire(client, 39.4) == [] and sent(client) == []
    events = fire(client, 39.5)
    assert "after 39.50 s over TCP" in str(events[0].value)


def test_refresh_at_80_percent_of_the_lifetime() -> None:
    client = allocated(lifetime=600)
    assert client.get_timer() == pytest.approx(480.0)
    assert fire(client, 479.9) == [] and sent(client) == []
    client.handle_timer(480.0)
    refresh = parse_message(one(client), integrity_key=KEY)
    assert refresh.message_method == Method.REFRESH and "LIFETIME" not in refresh.attributes
    assert client.get_timer() == pytest.approx(480.1)  # its retransmission
    event = receive(client, success(bytes(refresh), 900), 480.05)
    assert event is not None and event.kind == "refreshed"
    assert event.value.lifetime == 900 and event.value.expires_at == pytest.approx(1380.05)
    assert client.get_timer() == pytest.approx(480.05 + 720)
    assert client.counters.refreshes == 1


def test_permission_and_channel_refresh_schedules() -> None:
    client = allocated(lifetime=600)
    client.create_permission(PEER[0], 10.0)
    receive(client, success(one(client)), 10.0)
    assert client.permissions == {PEER[0]: True}
    number = client.bind_channel(PEER, 20.0)
    assert number == CHANNEL_MIN
    bind = parse_message(one(client))
    assert bind.attributes["CHANNEL-NUMBER"] == CHANNEL_MIN and bind.attributes["XOR-PEER-ADDRESS"] == PEER
    event = receive(client, success(bytes(bind)), 20.0)
    assert event == TurnControl("channel", (PEER, CHANNEL_MIN))
    assert client.channels == {PEER: (CHANNEL_MIN, True)}

    log = auto_answer(client, 1300.0)
    allocs = [t for t, m, _ in log if m == Method.REFRESH]
    channels = [t for t, m, _ in log if m == Method.CHANNEL_BIND]
    assert allocs == pytest.approx([480.0, 960.0])
    assert channels == pytest.approx([560.0, 1100.0])  # every 540 s, inside the 600 s lifetime
    # The permission is refreshed (CreatePermission, or a ChannelBind, which refreshes it
    # too) well inside its 300 s lifetime.
    touches = [20.0] + [t for t, m, peer in log if m in (Method.CREATE_PERMISSION, Method.CHANNEL_BIND)]
    assert max(b - a for a, b in zip(touches, touches[1:])) <= 240.0 + 1e-9
    assert client.state == "allocated" and client.counters.errors == 0


def test_refresh_timeout_is_retried_then_the_allocation_expires() -> None:
    client = allocated(lifetime=600, rto=1.0, rc=2, rm=2)  # a refresh gives up after 3 s
    events: list[Any] = []
    for _ in range(100):
        when = client.get_timer()
        if when is None:
            break
        events += fire(client, when)
        sent(client)  # the server never answers
    kinds = [(e.kind, getattr(e.value, "operation", None)) for e in events]
    assert kinds.count(("error", "refresh")) >= 3  # retried while time was left
    assert kinds[-1] == ("error", "allocation") and "expired" in str(events[-1].value)
    assert client.state == "failed" and client.get_timer() is None


def test_refresh_437_means_the_allocation_is_gone() -> None:
    client = allocated()
    client.refresh(1.0)
    event = receive(client, error(one(client), 437, "Allocation Mismatch"), 1.0)
    assert event is not None and event.value.code == 437 and client.state == "failed"


def test_forbidden_permission_is_reported_and_dropped() -> None:
    client = allocated()
    client.create_permission("203.0.113.9", 1.0)
    event = receive(client, error(one(client), 403, "Forbidden IP"), 1.0)
    assert event is not None and event.value.key == "203.0.113.9" and event.value.operation == "permission"
    assert "403 Forbidden IP" in str(event.value) and client.permissions == {}


# -- data ------------------------------------------------------------------------------------------


def test_send_indication_until_the_channel_is_bound() -> None:
    client = allocated()
    client.create_permission(PEER[0], 1.0)
    receive(client, success(one(client)), 1.0)
    wire = client.send_via_relay(PEER, b"hello")
    msg = parse_message(wire)
    assert (msg.message_method, msg.message_class) == (Method.SEND, Class.INDICATION)
    assert msg.attributes["XOR-PEER-ADDRESS"] == PEER and msg.attributes["DATA"] == b"hello"
    number = client.bind_channel(PEER, 2.0)
    bind = one(client)
    assert parse_message(client.send_via_relay(PEER, b"still")).message_method == Method.SEND  # not bound yet
    receive(client, success(bind), 2.0)
    assert client.send_via_relay(PEER, b"hello") == encode_channel_data(number, b"hello")
    assert client.bind_channel(PEER, 3.0) == number  # one channel per peer
    assert client.counters.bytes_to_relay == 15 and client.counters.packets_to_relay == 3


def test_tcp_channel_data_is_padded() -> None:
    client = allocated("tcp")
    number = client.bind_channel(PEER, 1.0)
    receive(client, success(one(client)), 1.0)
    wire = client.send_via_relay(PEER, b"abcde")
    assert wire == number.to_bytes(2, "big") + b"\x00\x05abcde\x00\x00\x00"


def test_receive_data_indication_and_channel_data() -> None:
    client = allocated()
    number = client.bind_channel(PEER, 1.0)
    receive(client, success(one(client)), 1.0)
    data = Message(Method.DATA, Class.INDICATION, bytes(12), {"XOR-PEER-ADDRESS": PEER, "DATA": b"hi"})
    assert receive(client, bytes(data), 2.0) == TurnData(PEER, b"hi")
    assert receive(client, encode_channel_data(number, b"chan", pad=True), 2.0) == TurnData(PEER, b"chan")
    assert client.is_channel_data(encode_channel_data(number, b""))
    assert receive(client, encode_channel_data(number + 1, b"??"), 2.0) is None  # not ours
    assert receive(client, b"\x40\x00\x00\x09short", 2.0) is None  # length overruns
    assert client.counters.packets_from_relay == 2 and client.counters.bytes_from_relay == 6
    assert client.counters.dropped == 2


def test_close_deallocates() -> None:
    client = allocated()
    client.create_permission(PEER[0], 1.0)
    sent(client)
    client.close(2.0)
    dealloc = parse_message(one(client), integrity_key=KEY)
    assert dealloc.message_method == Method.REFRESH and dealloc.attributes["LIFETIME"] == 0
    assert client.state == "closing"
    event = receive(client, success(bytes(dealloc)), 2.01)
    assert event == TurnControl("deallocated", None) and client.state == "closed"
    assert client.counters.deallocations == 1 and client.get_timer() is None
    # 437 to a deallocation: already gone, which is what we wanted.
    other = allocated()
    other.close(1.0)
    assert receive(other, error(one(other), 437, "Allocation Mismatch"), 1.0) == TurnControl("deallocated", None)


def test_tcp_connection_loss_ends_everything() -> None:
    client = allocated("tcp")
    client.create_permission(PEER[0], 1.0)
    client.connection_lost(2.0)
    events = drain(client)
    assert [(e.kind, e.value.operation) for e in events] == [("error", "permission"), ("error", "allocation")]
    assert "connection lost" in str(events[0].value) and client.state == "failed"
    assert client.get_timer() is None


def test_owns_routes_only_the_servers_stun_and_channel_data() -> None:
    client = allocated()
    stun = Message(Method.DATA, Class.INDICATION, bytes(12), {}).__bytes__()
    assert client.owns(stun, SERVER) and client.owns(b"\x40\x00\x00\x00", SERVER)
    assert not client.owns(stun, PEER)  # STUN from elsewhere: ICE checks, other servers
    assert not client.owns(b"\x51quic short header", SERVER) and not client.owns(b"", SERVER)


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        TurnClient(SERVER, USER, PASSWORD, permission_refresh=300.0)
    with pytest.raises(ValueError):
        TurnClient(SERVER, USER, PASSWORD, channel_refresh=600.0)
    with pytest.raises(ValueError):
        TurnClient(SERVER, USER, PASSWORD, transport="sctp")  # type: ignore[arg-type]
    client = allocated()
    with pytest.raises(ValueError):
        client.create_permission("not an ip", 1.0)
    with pytest.raises(ValueError):
        client.bind_channel(("203.0.113.5", 0), 1.0)


# -- codecs ------------------------------------------------------------------------------------------


def test_channel_data_codec() -> None:
    assert encode_channel_data(0x4001, b"abc") == b"\x40\x01\x00\x03abc"
    assert encode_channel_data(0x4001, b"abc", pad=True) == b"\x40\x01\x00\x03abc\x00"
    assert decode_channel_data(b"\x40\x01\x00\x03abc\x00") == (0x4001, b"abc")
    assert decode_channel_data(b"\x50\x00\x00\x00") is None  # reserved range
    for bad in (CHANNEL_MIN - 1, CHANNEL_MAX + 1):
        with pytest.raises(ValueError):
            encode_channel_data(bad, b"")
    with pytest.raises(ValueError):
        encode_channel_data(CHANNEL_MIN, bytes(0x10000))


def test_frame_length() -> None:
    stun = bytes(Message(Method.BINDING, Class.REQUEST, bytes(12), {"SOFTWARE": "x"}))
    assert frame_length(stun) == len(stun) and frame_length(stun[:7]) is None
    assert frame_length(b"\x40\x00\x00\x05") == 12 and frame_length(b"\x40\x00") is None
    assert frame_length(b"") is None
    for garbage in (b"\x17\x03\x03\x00", b"\x00\x01\x00\x04\x00\x00\x00\x00", b"\x00\x01\x00\x05\x21\x12\xa4\x42"):
        with pytest.raises(FramingError):
            frame_length(garbage)


stun_frames = st.builds(
    lambda tid, payload: bytes(Message(Method.DATA, Class.INDICATION, tid, {"DATA": payload})),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=64),
)
channel_frames = st.builds(
    lambda number, payload: encode_channel_data(number, payload, pad=True),
    st.integers(CHANNEL_MIN, CHANNEL_MAX),
    st.binary(max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(stun_frames, channel_frames), max_size=8), st.lists(st.integers(1, 40), max_size=30))
def test_stream_framer_reassembles_any_chunking(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    framer, out, pos = StreamFramer(), [], 0
    for size in cuts:
        out += framer.feed(stream[pos : pos + size])
        pos += size
    out += framer.feed(stream[pos:])
    assert out == frames and framer.buffered == 0 and framer.error is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 50))
def test_stream_framer_never_raises(junk: bytes, step: int) -> None:
    framer = StreamFramer()
    for i in range(0, len(junk), step):
        for frame in framer.feed(junk[i : i + step]):
            assert frame_length(frame) == len(frame)
    assert framer.error is None or framer.feed(b"\x00" * 20) == []


def _server_answers() -> list[bytes]:
    """A sample of what a server sends a client with requests in flight."""
    client = allocated()
    client.create_permission(PEER[0], 1.0)
    perm = one(client)
    client.bind_channel(PEER, 1.0)
    bind = one(client)
    data = Message(Method.DATA, Class.INDICATION, bytes(12), {"XOR-PEER-ADDRESS": PEER, "DATA": b"x"})
    return [success(perm), challenge(bind, 438), error(perm, 403, "Forbidden"), bytes(data),
            encode_channel_data(CHANNEL_MIN, b"payload")]


ANSWERS = _server_answers()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.sampled_from(ANSWERS), st.integers(0, 200), st.integers(0, 255))
def test_receive_never_raises(junk: bytes, template: bytes, index: int, value: int) -> None:
    client = allocated()
    client.create_permission(PEER[0], 1.0)
    client.bind_channel(PEER, 1.0)
    sent(client)
    # Random bytes, a real answer with one byte changed, and a real answer with junk after.
    mutated = bytearray(template)
    mutated[index % len(mutated)] = value
    for data in (junk, bytes(mutated), template[: index % len(template)] + junk, b"\x40\x00" + junk):
        event = receive(client, data, 2.0)
        assert event is None or isinstance(event, (TurnData, TurnControl))
    client.handle_timer(1000.0)


# -- against a real coturn on loopback ------------------------------------------------------------------


def _skip_without_coturn() -> None:
    ok, why = coturn_available()
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    _skip_without_coturn()
    with Coturn() as server:
        yield server


class Peer:
    """A plain UDP socket on loopback playing the remote peer."""

    def __init__(self, endpoint: UdpEndpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.local_address
        self.inbox: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        endpoint.set_receiver(lambda data, addr: self.inbox.put_nowait((data, addr)))

    async def next(self) -> tuple[bytes, Address]:
        return await asyncio.wait_for(self.inbox.get(), 2.0)


@pytest.fixture
async def peer() -> Any:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    try:
        yield Peer(endpoint)
    finally:
        endpoint.close()


@pytest.fixture
async def udp() -> Any:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    try:
        yield endpoint
    finally:
        endpoint.close()


async def exchange(turn: AsyncTurnClient, peer: Peer) -> None:
    """Permission + Send/Data indications, then a channel + ChannelData, both ways."""
    allocation = turn.allocation
    assert allocation is not None
    await turn.create_permission("127.0.0.1")
    turn.send_via_relay(peer.address, b"via send indication")
    assert await peer.next() == (b"via send indication", allocation.relayed)
    peer.endpoint.send(b"via data indication", allocation.relayed)
    assert await turn.recv(2.0) == (peer.address, b"via data indication")

    number = await turn.bind_channel(peer.address)
    assert CHANNEL_MIN <= number <= CHANNEL_MAX
    assert turn.client.send_via_relay(peer.address, b"")[:2] == number.to_bytes(2, "big")  # ChannelData now
    for size in (1, 5, 1200):  # odd sizes exercise the TCP padding
        turn.send_via_relay(peer.address, b"c" * size)
        assert await peer.next() == (b"c" * size, allocation.relayed)
        peer.endpoint.send(b"p" * size, allocation.relayed)
        assert await turn.recv(2.0) == (peer.address, b"p" * size)
    assert turn.counters.packets_from_relay == 4 and turn.counters.channel_binds == 1


async def test_allocate_challenge_then_success(coturn: Coturn, udp: UdpEndpoint) -> None:
    turn = AsyncTurnClient.over_udp(udp, coturn.address, "macula", "secret")
    try:
        allocation = await turn.allocate_relay()
        assert allocation.relayed[0] == "127.0.0.1" and allocation.relayed != coturn.address
        assert allocation.mapped == udp.local_address
        assert allocation.lifetime == 600
        assert turn.counters.auth_challenges == 1 and turn.counters.allocations == 1
        assert turn.client.realm == coturn.realm
    finally:
        await turn.close()


async def test_wrong_password(coturn: Coturn, udp: UdpEndpoint) -> None:
    turn = AsyncTurnClient.over_udp(udp, coturn.address, "macula", "not-the-password")
    try:
        with pytest.raises(TurnAuthError) as info:
            await turn.allocate_relay()
        assert "user 'macula' in realm 'macula.test'" in str(info.value) and info.value.code == 401
    finally:
        await turn.close()


async def test_refresh_permission_and_indications(coturn: Coturn, udp: UdpEndpoint, peer: Peer) -> None:
    turn = AsyncTurnClient.over_udp(udp, coturn.address, "macula", "secret")
    try:
        await turn.allocate_relay()
        refreshed = await turn.refresh(lifetime=900)
        assert refreshed.lifetime == 900 and turn.counters.refreshes == 1
        await exchange(turn, peer)
        assert turn.counters.errors == 0
    finally:
        await turn.close()


async def test_tcp_transport(coturn: Coturn, peer: Peer) -> None:
    turn = await AsyncTurnClient.over_tcp(coturn.address, "macula", "secret")
    try:
        allocation = await turn.allocate_relay()
        assert allocation.relayed[0] == "127.0.0.1"
        await exchange(turn, peer)
    finally:
        await turn.close()
    assert turn.client.state == "closed" and turn.counters.deallocations == 1


async def test_deallocate_on_close_frees_the_5_tuple(coturn: Coturn, udp: UdpEndpoint) -> None:
    first = AsyncTurnClient.over_udp(udp, coturn.address, "macula", "secret")
    await first.allocate_relay()
    await first.close()
    assert first.client.state == "closed" and first.counters.deallocations == 1

    # Without the deallocation, the same 5-tuple is refused (437) for the whole lifetime...
    other = await open_udp_endpoint("127.0.0.1", 0)
    try:
        leaky = AsyncTurnClient.over_udp(other, coturn.address, "macula", "secret")
        await leaky.allocate_relay()
        leaky.client.state = "closed"  # walk away without deallocating
        await leaky.close()
        again = AsyncTurnClient.over_udp(other, coturn.address, "macula", "secret")
        with pytest.raises(TurnError) as info:
            await again.allocate_relay()
        assert info.value.code == 437
        await again.close()
    finally:
        other.close()

    # ...while after ours it is free again once coturn has reaped the session (its timer
    # runs about once a second).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4.0
    while True:
        second = AsyncTurnClient.over_udp(udp, coturn.address, "macula", "secret")
        try:
            allocation = await second.allocate_relay()
            break
        except TurnError as exc:
            assert exc.code == 437 and loop.time() < deadline, exc
            await asyncio.sleep(0.1)
        finally:
            if second.client.state != "allocated":
                await second.close()
    assert allocation.mapped == udp.local_address
    await second.close()


async def test_stale_nonce_against_coturn(udp: UdpEndpoint) -> None:
    _skip_without_coturn()
    async with Coturn(stale_nonce=1) as server:  # nonces live one second
        turn = AsyncTurnClient.over_udp(udp, server.address, "macula", "secret")
        try:
            await turn.allocate_relay()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while turn.counters.stale_nonces == 0:
                assert loop.time() < deadline, "coturn never reported a stale nonce"
                await asyncio.sleep(0.25)
                await turn.refresh()  # each one succeeds, through a 438 once the nonce aged
            assert turn.counters.refreshes >= 1 and turn.counters.errors == 0
            await turn.create_permission("127.0.0.1")
        finally:
            await turn.close()
        assert turn.client.state == "closed"


# -- the coturn helper -------------------------------------------------------------------------------------


def test_coturn_helper_life_cycle() -> None:
    assert coturn_available("/nonexistent/turnserver")[0] is False
    with pytest.raises(CoturnError):
        Coturn(binary="/nonexistent/turnserver").start()
    _skip_without_coturn()
    # Through a prefix, as in a lab namespace ("ip netns exec NS" there; "env" here): the
    # readiness probe goes through the same prefix.
    with socket.socket() as probe:  # a free TCP port: a prefixed start does not pick one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Coturn(port=port, prefix=["env"], udp=False, min_port=41000, max_port=41100, users={"a": "b"})
    with server:
        proc = server.proc
        assert proc is not None and server.running
        conf = server.config_text()
        for option in ("allow-loopback-peers", "no-udp", "min-port=41000", "user=a:b", "no-cli"):
            assert option in conf.splitlines()
        status = subprocess.run(["ps", "-o", "user=", "-p", str(proc.pid)], capture_output=True, text=True)
        if os.geteuid() == 0:
            assert status.stdout.strip() in ("turnserver", "turnser+")  # privileges dropped
    assert proc.poll() is not None and not server.running
    assert "Coturn" in server.log()  # kept for post-mortems


# -- inside kernel-lab namespaces (root only) ------------------------------------------------------

_NS_CLIENT = """
import asyncio, sys
from macula.nat.aio import AsyncTurnClient, discover_address
from macula.net.udp import open_udp_endpoint

async def main() -> None:
    server = ("203.0.113.10", int(sys.argv[1]))
    endpoint = await open_udp_endpoint("203.0.113.20", 0)
    peer = await open_udp_endpoint("203.0.113.20", 0)
    inbox = asyncio.Queue()
    peer.set_receiver(lambda data, addr: inbox.put_nowait((data, addr)))
    assert await discover_address(endpoint, [server]) == endpoint.local_address
    turn = AsyncTurnClient.over_udp(endpoint, server, "macula", "secret")
    allocation = await turn.allocate_relay()
    await turn.create_permission("203.0.113.20")
    turn.send_via_relay(peer.local_address, b"out")
    assert await asyncio.wait_for(inbox.get(), 2) == (b"out", allocation.relayed)
    peer.send(b"in", allocation.relayed)
    assert await turn.recv(2) == (peer.local_address, b"in")
    await turn.close()
    print("ok", allocation.relayed[0])

asyncio.run(main())
"""


@pytest.mark.kernel
def test_coturn_in_lab_namespaces() -> None:
    from macula_lab.kernel import kernel_lab_available, netns

    ok, why = kernel_lab_available()
    if not ok:
        pytest.skip(why)
    _skip_without_coturn()
    prefix = netns.default_prefix()
    netns.claim_prefix(prefix)
    server_ns, client_ns = prefix + "ts", prefix + "tc"
    try:
        for ns in (server_ns, client_ns):
            netns.add_ns(ns)
        netns.add_veth(server_ns, "t0", client_ns, "t1")
        netns.add_addr(server_ns, "t0", "203.0.113.10/24")
        netns.add_addr(client_ns, "t1", "203.0.113.20/24")
        netns.link_up(server_ns, "t0")
        netns.link_up(client_ns, "t1")
        # Documentation-range peers need no allowed-peer-ip: only loopback is refused.
        with Coturn(listen_ip="203.0.113.10", prefix=netns.exec_argv(server_ns, []),
                    allow_loopback_peers=False) as server:
            result = netns.run_in(client_ns, [sys.executable, "-c", _NS_CLIENT, str(server.port)],
                                  env=netns.python_env(), timeout=20, check=False)
            assert result.returncode == 0, result.stderr
            assert result.stdout.split() == ["ok", "203.0.113.10"]
    finally:
        for ns in (client_ns, server_ns):
            netns.del_ns(ns)
        netns.release_prefix(prefix)
