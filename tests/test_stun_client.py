"""STUN Binding client: the sans-IO core on a fake clock, and runs against a real coturn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.nat.aio import AsyncStunClient, discover_address
from macula.nat.stun_client import (
    RetransmitPolicy,
    StunAllFailed,
    StunBadResponse,
    StunCancelled,
    StunClient,
    StunErrorResponse,
    StunTimeout,
)
from macula.net.endpoint import Address
from macula.net.udp import open_udp_endpoint
from macula.wire.stun import (
    Class,
    Message,
    Method,
    binding_error,
    binding_request,
    binding_success,
    parse_message,
)
from macula_lab.coturn import Coturn, coturn_available

S1: Address = ("192.0.2.1", 3478)
S2: Address = ("192.0.2.2", 3478)
MAPPED: Address = ("198.51.100.7", 40000)


def answer_ok(request: bytes, mapped: Address = MAPPED) -> bytes:
    return binding_success(parse_message(request), mapped)


def sent_to(client: StunClient) -> dict[Address, bytes]:
    return {addr: data for data, addr in client.datagrams_to_send(0.0)}


def run_until_idle(client: StunClient, start: float, limit: float = 100.0) -> list[tuple[float, Address]]:
    """Fire timers in order until nothing is pending; (time, server) of every send."""
    sends: list[tuple[float, Address]] = []
    now = start
    for _ in range(1000):  # bounded: a transaction fires at most rc + 1 timers
        when = client.get_timer()
        if when is None or when > start + limit:
            break
        now = max(now, when)
        client.handle_timer(now)
        sends += [(now, addr) for _, addr in client.datagrams_to_send(0.0)]
    return sends


# -- retransmission ---------------------------------------------------------------------------


def test_policy_totals_match_rfc_8489() -> None:
    assert RetransmitPolicy().total_wait == pytest.approx(7.9)
    assert RetransmitPolicy(rto=0.5).total_wait == pytest.approx(39.5)  # the RFC's example
    for bad in ({"rto": 0}, {"rc": 0}, {"rm": 0}, {"rc": 17}):
        with pytest.raises(ValueError):
            RetransmitPolicy(**bad)  # type: ignore[arg-type]


def test_retransmission_schedule_and_timeout_error() -> None:
    client = StunClient()  # RTO 100 ms, Rc 7, Rm 16
    query = client.test_connectivity(S1, 10.0)
    assert list(sent_to(client)) == [S1]
    sends = run_until_idle(client, 10.0)
    times = [round(t - 10.0, 6) for t, _ in sends]
    assert times == [0.1, 0.3, 0.7, 1.5, 3.1, 6.3]  # doubling, 7 sends in all
    assert query.done and isinstance(query.error, StunTimeout)
    assert query.error.server == S1 and query.error.waited == pytest.approx(7.9)
    assert "192.0.2.1:3478" in str(query.error) and "7.90 s" in str(query.error)
    assert "7 requests" in str(query.error)
    result = query.connectivity()
    assert not result.ok and result.error is query.error
    assert client.unreachable_servers() == [S1]
    assert client.stats[S1].success_rate == 0.0


def test_configurable_schedule() -> None:
    client = StunClient(rto=0.05, rc=3, rm=2)
    query = client.test_connectivity(S1, 0.0)
    client.datagrams_to_send(0.0)
    sends = run_until_idle(client, 0.0)
    assert [round(t, 6) for t, _ in sends] == [0.05, 0.15]
    assert isinstance(query.error, StunTimeout) and query.error.waited == pytest.approx(0.25)
    assert query.error.requests == 3


# -- answers ------------------------------------------------------------------------------------


def test_first_good_answer_wins_and_later_answers_update_the_cache() -> None:
    client = StunClient()
    query = client.discover_address([S1, S2, S1], 0.0)  # duplicates collapse
    out = sent_to(client)
    assert set(out) == {S1, S2} and query.servers == (S1, S2)
    assert client.receive_datagram(answer_ok(out[S2], ("203.0.113.5", 1111)), S2, 0.04)
    assert query.done and query.address == ("203.0.113.5", 1111) and query.server == S2
    assert query.latency == pytest.approx(0.04)
    # S1 answers later with another mapping: the query keeps its winner, the cache learns.
    assert client.receive_datagram(answer_ok(out[S1], ("203.0.113.5", 2222)), S1, 0.06)
    assert query.address == ("203.0.113.5", 1111)
    assert client.stats[S1].last_mapped == ("203.0.113.5", 2222)
    assert client.stats[S1].last_latency == pytest.approx(0.06)
    assert client.pending == 0 and client.get_timer() is None
    assert client.stats[S1].success_rate == client.stats[S2].success_rate == 1.0


def test_dead_server_does_not_delay_the_answer_but_shows_in_stats() -> None:
    client = StunClient(rto=0.1, rc=2, rm=2)
    query = client.discover_address([S1, S2], 0.0)
    out = sent_to(client)
    client.receive_datagram(answer_ok(out[S1]), S1, 0.02)
    assert query.done and query.error is None
    assert client.unreachable_servers() == []
    run_until_idle(client, 0.02)
    assert client.unreachable_servers() == [S2]
    assert client.stats[S2].success_rate == 0.0 and isinstance(client.stats[S2].last_error, StunTimeout)
    # A later success takes it off the gauge.
    query = client.test_connectivity(S2, 5.0)
    client.receive_datagram(answer_ok(sent_to(client)[S2]), S2, 5.01)
    assert query.connectivity().ok and client.unreachable_servers() == []
    assert client.stats[S2].success_rate == 0.5


def test_all_servers_failing() -> None:
    client = StunClient(rto=0.1, rc=1, rm=1)
    query = client.discover_address([S1, S2], 0.0)
    out = sent_to(client)
    error = binding_error(parse_message(out[S1]), 500, "Server Error")
    assert client.receive_datagram(error, S1, 0.01)
    assert not query.done  # S2 may still answer
    run_until_idle(client, 0.01)
    assert query.done and isinstance(query.error, StunAllFailed)
    assert isinstance(query.error.errors[S1], StunErrorResponse)
    assert query.error.errors[S1].code == 500
    assert "500 Server Error" in str(query.error) and "192.0.2.2:3478" in str(query.error)
    # An error answer proves the server is there: only the silent one is unreachable.
    assert client.unreachable_servers() == [S2]


def test_error_response_names_code_and_reason() -> None:
    client = StunClient()
    query = client.test_connectivity(S1, 0.0)
    request = sent_to(client)[S1]
    assert client.receive_datagram(binding_error(parse_message(request), 420, "Unknown Attribute"), S1, 0.01)
    assert isinstance(query.error, StunErrorResponse)
    assert (query.error.code, query.error.reason) == (420, "Unknown Attribute")
    assert str(query.error) == "STUN server 192.0.2.1:3478 answered error 420 Unknown Attribute"


def test_success_without_mapped_address_is_a_bad_response() -> None:
    client = StunClient()
    query = client.test_connectivity(S1, 0.0)
    request = parse_message(sent_to(client)[S1])
    bare = Message(Method.BINDING, Class.RESPONSE, request.transaction_id, {})
    bare.add_fingerprint()
    assert client.receive_datagram(bytes(bare), S1, 0.01)
    assert isinstance(query.error, StunBadResponse)


def test_routing_by_transaction_id_and_source() -> None:
    client = StunClient()
    query = client.test_connectivity(S1, 0.0)
    request = sent_to(client)[S1]
    response = answer_ok(request)
    stranger = answer_ok(binding_request())  # someone else's transaction
    assert client.owns(response) and not client.owns(stranger) and not client.owns(b"\x40quic")
    assert not client.receive_datagram(stranger, S1, 0.01)
    # Our id from another address: swallowed, but the query waits for the real server.
    assert client.receive_datagram(response, S2, 0.01) and not query.done
    # Our id, mangled: counted, not fatal, retransmissions go on.
    assert client.receive_datagram(response[:-1] + bytes([response[-1] ^ 1]), S1, 0.02) and not query.done
    assert client.stats[S1].malformed == 1
    assert client.receive_datagram(response, S1, 0.03) and query.address == MAPPED
    assert not client.owns(response)  # finished: a late duplicate is not ours any more


def test_smoothed_latency_uses_only_unambiguous_samples() -> None:
    client = StunClient(smoothing=0.5)
    for rtt in (0.1, 0.3):
        start = client.server_stats(S1).requests * 10.0
        client.test_connectivity(S1, start)
        client.receive_datagram(answer_ok(sent_to(client)[S1]), S1, start + rtt)
    assert client.stats[S1].smoothed_latency == pytest.approx(0.2)
    # Answered after a retransmission (Karn): the last latency moves, the estimate does not.
    client.test_connectivity(S1, 100.0)
    request = sent_to(client)[S1]
    client.handle_timer(100.1)
    client.receive_datagram(answer_ok(request), S1, 100.15)
    assert client.stats[S1].last_latency == pytest.approx(0.15)
    assert client.stats[S1].smoothed_latency == pytest.approx(0.2)


def test_cancel_fails_pending_queries() -> None:
    client = StunClient()
    query = client.discover_address([S1, S2], 0.0)
    client.cancel(0.5)
    assert query.done and isinstance(query.error, StunAllFailed)
    assert all(isinstance(e, StunCancelled) for e in query.error.errors.values())
    assert client.get_timer() is None and client.unreachable_servers() == []
    with pytest.raises(ValueError):
        client.discover_address([], 0.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 40))
def test_receive_never_raises(junk: bytes, cut: int) -> None:
    client = StunClient()
    client.test_connectivity(S1, 0.0)
    request = sent_to(client)[S1]
    good = answer_ok(request)
    # Arbitrary bytes, and bytes wearing our header (transaction id included).
    for data in (junk, good[:20] + junk, good[: max(20, len(good) - cut)] + junk[:cut]):
        client.receive_datagram(data, S1, 0.01)
        client.owns(data)
    client.handle_timer(10.0)


# -- against a real coturn on loopback ------------------------------------------------------------


@pytest.fixture(scope="module")
def coturn() -> Iterator[Coturn]:
    ok, why = coturn_available()
    if not ok:
        pytest.skip(why)
    server = Coturn(tcp=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dead_server() -> Iterator[Address]:
    """A loopback port that swallows datagrams without answering (no ICMP either)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()
    finally:
        sock.close()


async def test_discover_address_via_coturn(coturn: Coturn) -> None:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    try:
        # On loopback there is no NAT: the server sees exactly our socket's address.
        assert await discover_address(endpoint, [coturn.address]) == endpoint.local_address
    finally:
        endpoint.close()


async def test_several_servers_one_dead(coturn: Coturn, dead_server: Address) -> None:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    others: list[tuple[bytes, Address]] = []
    runner = AsyncStunClient(endpoint, StunClient(rto=0.02, rc=3, rm=4), passthrough=lambda d, a: others.append((d, a)))
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        mapped = await runner.discover_address([dead_server, coturn.address])
        assert mapped == endpoint.local_address
        assert loop.time() - started < 0.1  # the dead server did not hold the answer back
        stats = runner.client.stats
        assert stats[coturn.address].success_rate == 1.0
        assert stats[coturn.address].last_latency is not None and stats[coturn.address].smoothed_latency is not None

        # The dead one's transaction runs on after the answer, and then shows up.
        dead = await runner.test_connectivity(dead_server)
        assert not dead.ok and isinstance(dead.error, StunTimeout)
        assert f"127.0.0.1:{dead_server[1]}" in str(dead.error) and "0.14 s" in str(dead.error)
        for _ in range(50):  # bounded: the first transaction ended by now or soon after
            if runner.client.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert stats[dead_server].success_rate == 0.0 and stats[dead_server].failures == 2
        assert runner.client.unreachable_servers() == [dead_server]

        live = await runner.test_connectivity(coturn.address)
        assert live.ok and live.mapped == endpoint.local_address and live.latency is not None
        assert others == []  # nothing else arrived on the socket
    finally:
        runner.close()
        endpoint.close()


async def test_timeout_error_against_silence(dead_server: Address) -> None:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    try:
        with pytest.raises(StunTimeout) as info:
            await discover_address(endpoint, [dead_server], rto=0.01, rc=2, rm=3)
        assert info.value.server == dead_server and info.value.requests == 2
        assert "after 0.04 s" in str(info.value)
    finally:
        endpoint.close()


async def test_passthrough_and_close(coturn: Coturn) -> None:
    endpoint = await open_udp_endpoint("127.0.0.1", 0)
    other = await open_udp_endpoint("127.0.0.1", 0)
    seen: asyncio.Queue[bytes] = asyncio.Queue()
    runner = AsyncStunClient(endpoint, passthrough=lambda d, a: seen.put_nowait(d))
    try:
        other.send(b"\x41not stun", endpoint.local_address)
        assert await asyncio.wait_for(seen.get(), 2.0) == b"\x41not stun"
        pending = asyncio.ensure_future(runner.test_connectivity(("127.0.0.1", 9)))  # discard port
        await asyncio.sleep(0)
        runner.close()
        result = await asyncio.wait_for(pending, 1.0)
        assert isinstance(result.error, StunCancelled)
        other.send(b"\x42after", endpoint.local_address)  # the receiver was handed back
        assert await asyncio.wait_for(seen.get(), 2.0) == b"\x42after"
    finally:
        runner.close()
        endpoint.close()
        other.close()
