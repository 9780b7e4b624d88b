"""Gateway abuse limits, as the nodes that hit them (and the ones that don't) see them.

Behaviour tests run a real Gateway and Nodes on loopback and send relay frames from a
node's own socket, so the gateway sees exactly what it would from that node; state-machine
tests drive the Limiter with a fake clock.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import socket
import struct
import tracemalloc
from collections import Counter
from typing import Any

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from helpers import Mesh, wait_until

from macula.config import Config, load_config
from macula.gateway.core import GatewayCore
from macula.gateway.limits import SESSION_IDLE, GatewayLimits, Limiter, TokenBucket
from macula.gateway.options import GatewayOptions
from macula.gateway.server import Gateway
from macula.identity import Identity, NodeId
from macula.nat.stun_responder import AMPLIFICATION_FLOOR
from macula.node.node import Node
from macula.session.quic import ALPN_CONTROL
from macula.wire import control, stun
from macula.wire.relay import MAX_PAYLOAD, encode_to_gateway

NODE_LOG = "macula.node.core"


# ------------------------------------------------------------------ helpers
class RelayTap:
    """Counts the payload bytes the gateway forwards, per source node."""

    def __init__(self, gateway: Gateway) -> None:
        self.bytes: Counter[bytes] = Counter()
        endpoint = gateway._driver.endpoint
        original = endpoint.send

        def send(data: bytes, addr: Any) -> None:
            if data[:1] == b"\x31":
                self.bytes[data[1:17]] += len(data) - 17
            original(data, addr)

        endpoint.send = send  # type: ignore[method-assign]

    def of(self, node: Node) -> int:
        return self.bytes[node.node_id.raw]


def relay(node: Node, gateway: Gateway, dst: NodeId, payload: bytes) -> None:
    """A relay frame from the node's own socket: its registered address and token."""
    node._driver.endpoint.send(encode_to_gateway(node.core.relay_token, dst.raw, payload),
                               gateway.address)


async def mesh_with(**limits: Any) -> Mesh:
    mesh = Mesh()
    max_nodes = limits.pop("max_nodes", 100_000)
    await mesh.start_gateway(limits=GatewayLimits(**limits), max_nodes=max_nodes)
    return mesh


def client_initial() -> bytes:
    """A genuine first flight of a QUIC client (anyone can make one, from any address)."""
    conn = QuicConnection(configuration=QuicConfiguration(is_client=True,
                                                          alpn_protocols=[ALPN_CONTROL]))
    conn.connect(("127.0.0.1", 9), now=0.0)
    return conn.datagrams_to_send(now=0.0)[0][0]


def bogus_initial() -> bytes:
    """A QUIC v1 Initial that parses and passes the size and version checks, but is junk."""
    header = (b"\xc0" + struct.pack("!I", 1) + b"\x08" + os.urandom(8) + b"\x08"
              + os.urandom(8) + b"\x00")
    body = os.urandom(1200)
    return header + struct.pack("!H", 0x4000 | len(body)) + body


@pytest.fixture
def node_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger=NODE_LOG)
    return caplog


def codes(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    """Error codes the gateway sent to nodes (NodeCore logs each one it receives)."""
    return Counter(r.args[0] for r in caplog.records
                   if r.name == NODE_LOG and str(r.msg).startswith("gateway error"))


# ------------------------------------------------------------------ settings
def test_config_defaults_are_the_limiter_defaults() -> None:
    assert GatewayOptions.from_config(Config()).limits == GatewayLimits()
    config = load_config(env={"MACULA_GATEWAY_RELAY_SESSION_MAX_DURATION": "120000",
                              "MACULA_GATEWAY_CONTROL_RATE": "0"})
    limits = GatewayOptions.from_config(config).limits
    assert limits.relay_session_max_duration == 120.0 and limits.control_rate == 0


@pytest.mark.parametrize("bad", [
    {"relay_rate_bytes": -1}, {"relay_burst_bytes": MAX_PAYLOAD - 1}, {"max_handshakes": 0},
    {"punch_rate": -0.5},
])
def test_bad_settings_name_the_setting(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        GatewayLimits(**bad)


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    bucket = TokenBucket(rate=100, burst=300, now=0.0)
    assert bucket.take(300, 0.0) and not bucket.take(1, 0.0)
    assert bucket.take(100, 1.0) and not bucket.take(1, 1.0)
    assert bucket.take(300, 100.0) and not bucket.take(1, 100.0)  # never above burst
    assert not bucket.take(1, 50.0)  # a clock that steps back refills nothing


# ------------------------------------------------------------------ relay: who may
async def test_zero_bytes_relayed_for_anyone_but_registered_nodes() -> None:
    mesh = await mesh_with()
    try:
        gw = mesh.gateway
        a, b = await mesh.node(), await mesh.node()
        tap = RelayTap(gw)
        stolen = a.core.relay_token
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        try:
            for token in (b"\x00" * 8, stolen, os.urandom(8)):  # guessed, stolen, random
                for _ in range(20):
                    sock.sendto(encode_to_gateway(token, b.node_id.raw, b"\xc0" * 1000),
                                gw.address)
            await wait_until(lambda: gw.core.dropped["unauthorized"] >= 60)
        finally:
            sock.close()
        # A registered node with a wrong token (its address, not its token) gets nothing either.
        a._driver.endpoint.send(encode_to_gateway(os.urandom(8), b.node_id.raw, b"x" * 100),
                                gw.address)
        await wait_until(lambda: gw.core.dropped["unauthorized"] >= 61)
        assert sum(tap.bytes.values()) == 0 and gw.core.relayed_bytes == 0
        assert gw.handler_errors == 0
    finally:
        await mesh.close()


# ------------------------------------------------------------------ relay rate
async def test_relay_rate_caps_the_noisy_node_and_spares_the_others(node_log) -> None:
    rate, burst = 20_000, 20_000
    mesh = await mesh_with(relay_rate_bytes=rate, relay_burst_bytes=burst)
    try:
        gw = mesh.gateway
        a, b, c, d = [await mesh.node() for _ in range(4)]
        tap = RelayTap(gw)
        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(100):  # a: 100 kB at once, five times its burst
            relay(a, gw, b.node_id, bytes([0xc0]) + b"a" * 999)
            if i < 15:  # c: 15 kB, within its own budget
                relay(c, gw, d.node_id, bytes([0xc0]) + b"c" * 999)
        await wait_until(lambda: gw.core.relayed_packets + gw.core.dropped["relay_rate"] >= 115)
        elapsed = loop.time() - began
        assert tap.of(c) == 15_000  # c is untouched by a's flood
        assert burst - 1000 <= tap.of(a) <= burst + rate * elapsed + 1000
        assert gw.core.dropped["relay_rate"] == 100 - tap.of(a) // 1000
        await wait_until(lambda: codes(node_log)["relay_rate"] >= 1)
        # One notice (a second only after a second), not one per dropped packet.
        assert codes(node_log)["relay_rate"] <= 1 + int(elapsed)
        # (How the budget refills is timed on a fake clock: test_gateway_core.py.)
    finally:
        await mesh.close()


async def test_a_rate_limited_session_is_slower_but_intact(node_log) -> None:
    rate, burst, size = 150_000, 30_000, 200_000
    mesh = await mesh_with(relay_rate_bytes=rate, relay_burst_bytes=burst)
    try:
        a = await mesh.node(strategy="always_relay")
        b = await mesh.node(strategy="always_relay")
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        await asyncio.sleep(burst / rate)  # let the handshake's spend refill
        loop = asyncio.get_running_loop()
        began = loop.time()
        blob = os.urandom(size)
        stream = await sa.open_stream()
        stream.write(blob, end=True)
        incoming = await sb.accept_stream(timeout=5)
        assert await asyncio.wait_for(incoming.read_all(), 15) == blob
        took = loop.time() - began
        assert took >= (size - burst) / rate * 0.9, took  # the cap held
        assert codes(node_log)["relay_rate"] >= 1  # and the sender was told why
    finally:
        await mesh.close()


# ------------------------------------------------------------------ relay sessions
async def test_max_relay_peers_refuses_a_new_peer_not_the_current_ones(node_log) -> None:
    mesh = await mesh_with(max_relay_peers=2)
    try:
        gw = mesh.gateway
        a, b, c, d = [await mesh.node() for _ in range(4)]
        tap = RelayTap(gw)
        for peer in (b, c, d, b, c):
            relay(a, gw, peer.node_id, b"\xc0" + b"x" * 99)
        await wait_until(lambda: gw.core.relayed_packets + gw.core.dropped["max_relay_peers"] >= 5)
        assert gw.core.dropped["max_relay_peers"] == 1 and tap.of(a) == 400
        await wait_until(lambda: codes(node_log)["max_relay_peers"] == 1)
        relay(d, gw, b.node_id, b"\xc0" + b"x" * 99)  # d's own budget is its own
        await wait_until(lambda: tap.of(d) == 100)
    finally:
        await mesh.close()


async def test_relay_session_cap_cuts_one_session_and_says_why(node_log) -> None:
    # The duration cap is timed on a fake clock in test_gateway_core.py.
    mesh = await mesh_with(relay_session_max_bytes=5_000)
    try:
        gw = mesh.gateway
        a, b, c = [await mesh.node() for _ in range(3)]
        tap = RelayTap(gw)
        for _ in range(8):
            relay(a, gw, b.node_id, b"\xc0" + b"x" * 999)
        await wait_until(lambda: gw.core.dropped["relay_session_max_bytes"] == 3)
        assert tap.of(a) == 5_000
        relay(a, gw, c.node_id, b"\xc0" + b"x" * 999)  # another session of a's is fresh
        await wait_until(lambda: tap.of(a) == 6_000)
        await wait_until(lambda: "relay_session_max_bytes" in codes(node_log))
    finally:
        await mesh.close()


def test_limiter_sessions_expire_when_idle_and_may_start_again() -> None:
    dropped: Counter[str] = Counter()
    lim = Limiter(GatewayLimits(max_relay_peers=2, relay_session_max_bytes=1000), dropped)
    a, b, c, d = (bytes([i]) * 16 for i in range(4))
    assert lim.on_relay(a, b, 600, 0.0) is None and lim.on_relay(a, c, 600, 0.0) is None
    assert lim.on_relay(a, d, 10, 1.0)[0].code == "max_relay_peers"
    assert lim.on_relay(a, b, 600, 1.0)[0].code == "relay_session_max_bytes"
    assert lim.on_relay(a, b, 600, 1.5) == []  # refused again, but no second notice yet
    # b's session went idle: it ends, frees a peer slot, and may start afresh.
    assert lim.on_relay(a, c, 10, SESSION_IDLE) is None
    assert lim.on_relay(a, d, 10, SESSION_IDLE + 0.5) is None
    assert lim.on_relay(a, b, 600, SESSION_IDLE + 1.0)[0].code == "max_relay_peers"
    assert lim.on_relay(a, b, 600, 2 * SESSION_IDLE + 2) is None
    assert dropped == {"max_relay_peers": 2, "relay_session_max_bytes": 2}


# ------------------------------------------------------------------ control messages
async def test_control_rate_drops_the_chatty_node_only(node_log) -> None:
    mesh = await mesh_with(control_rate=5)  # burst: 20 messages
    try:
        gw = mesh.gateway
        a, b = await mesh.node(), await mesh.node()
        ghost = Identity.generate().node_id
        for req in range(60):
            a.core._send_control(control.Lookup(10_000 + req, ghost.text))
        a._driver.flush()
        await wait_until(lambda: gw.core.dropped["control_rate"] >= 30)
        # The burst (20, less what hello and nat_info took) went through, the rest did not.
        assert gw.core.dropped["control_rate"] <= 60 - 15
        await wait_until(lambda: codes(node_log)["control_rate"] >= 1)
        assert await b.is_online(a.node_id, timeout=2) is True  # b is served as usual
    finally:
        await mesh.close()


async def test_punch_rate_refuses_with_a_reason_the_node_acts_on(node_log) -> None:
    mesh = await mesh_with(punch_rate=1)  # burst: 4 requests
    try:
        gw = mesh.gateway
        a, b = await mesh.node(), await mesh.node()
        for attempt in range(1, 11):
            a.core._send_control(control.PunchRequest(b.node_id.text, attempt))
        a._driver.flush()
        await wait_until(lambda: a.core.punch_outcomes["punch_rate"] >= 6)
        assert gw.core.dropped["punch_rate"] == 6
        assert gw.core.punches_coordinated == 1  # the other passed ones joined the first
        await wait_until(lambda: codes(node_log)["punch_rate"] == 1)
    finally:
        await mesh.close()


# ------------------------------------------------------------------ registration
async def test_the_node_over_max_nodes_hears_why(node_log) -> None:
    mesh = await mesh_with(max_nodes=2)
    try:
        gw = mesh.gateway
        await mesh.node(), await mesh.node()
        third = await mesh.node(register_timeout=None)
        await wait_until(lambda: codes(node_log)["max_nodes"] >= 1)
        assert not third.registered and len(gw.core.registry) == 2
        assert gw.core.dropped["max_nodes"] >= 1
        message = next(r.args[1] for r in node_log.records if r.args and r.args[0] == "max_nodes")
        assert "gateway.max_nodes = 2" in message
    finally:
        await mesh.close()


async def test_handshake_flood_is_bounded_and_nodes_still_get_in() -> None:
    mesh = await mesh_with(max_handshakes=32)
    try:
        gw = mesh.gateway
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        try:
            for _ in range(300):  # junk shaped like Initials: no connection at all
                sock.sendto(bogus_initial(), gw.address)
            await wait_until(lambda: gw.core.dropped["bad_initial"] >= 300)
            assert len(gw.core._controls) == 0
            for _ in range(150):  # genuine Initials that never finish: the oldest go
                sock.sendto(client_initial(), gw.address)
                await asyncio.sleep(0)
            await wait_until(lambda: gw.core.dropped["handshake_evicted"] >= 150 - 32)
        finally:
            sock.close()
        assert len(gw.core._controls) <= 32 and gw.core.limits.pending <= 32
        a, b = await mesh.node(), await mesh.node()  # evicting the oldest lets them in
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        sa.send(b"after the flood")
        assert await sb.recv(5) == b"after the flood"
        assert gw.handler_errors == 0
    finally:
        await mesh.close()


# ------------------------------------------------------------------ STUN amplification
async def test_stun_answers_through_the_gateway_never_amplify() -> None:
    mesh = await mesh_with()
    try:
        gw = mesh.gateway
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        tid = os.urandom(12)
        header_only = struct.pack("!HHI", 0x0001, 0, stun.MAGIC_COOKIE) + tid
        unknown = b"".join(struct.pack("!HH", t, 0) for t in range(0x7000, 0x7000 + 100))
        requests = [
            header_only,  # the smallest request there is
            stun.binding_request(),
            stun.binding_request(change_port=True),
            stun.binding_request(software="x" * 700),
            # 100 unknown comprehension-required attributes: a 420 that echoes them all.
            struct.pack("!HHI", 0x0001, len(unknown), stun.MAGIC_COOKIE) + tid + unknown,
            struct.pack("!HHI", 0x0002, 0, stun.MAGIC_COOKIE) + tid,  # not Binding: 400
        ]
        answered = 0
        for request in requests:
            for target in gw.stun_addresses[:2]:
                sock.sendto(request, target)
                try:
                    response, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 4096), 2)
                except TimeoutError:
                    continue
                answered += 1
                assert len(response) <= max(len(request), AMPLIFICATION_FLOOR)
                stun.parse_message(response)
        assert answered == 2 * len(requests) and gw.stun.malformed == 0
    finally:
        sock.close()
        await mesh.close()


# ------------------------------------------------------------------ memory under a flood
FLOOD = 200_000
TRACED = 40_000
SPOOFED = 10_000


async def test_flood_of_bogus_packets_keeps_memory_bounded() -> None:
    """200k random datagrams from 10k spoofed addresses (with junk Initials among them, and
    a registered node relaying to node ids nobody holds): every table stays bounded, memory
    stops growing once they are full, every datagram is counted and nothing raises."""
    mesh = await mesh_with(max_handshakes=64)
    try:
        gw = mesh.gateway
        core: GatewayCore = gw.core
        a = await mesh.node()
        rng = random.Random(7)
        # Loopback addresses, so any answer the gateway might send goes nowhere harmful.
        spoofed = [(f"127.{rng.randrange(1, 256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    rng.randrange(1024, 65536)) for _ in range(SPOOFED)]
        junk = [rng.randbytes(rng.randrange(0, 1500)) for _ in range(4096)]
        junk += [bogus_initial() for _ in range(64)]
        loop = asyncio.get_running_loop()

        async def flood(start: int, stop: int) -> None:
            for i in range(start, stop):
                if i % 16 == 0:  # a registered node relaying to random node ids (12.5k)
                    data = encode_to_gateway(a.core.relay_token, rng.randbytes(16), b"\xc0" * 50)
                    core.receive_datagram(data, a.local_address, loop.time())
                else:
                    core.receive_datagram(junk[i % len(junk)], spoofed[i % SPOOFED],
                                          loop.time())
                if i % 512 == 0:
                    gw._driver.flush()  # what the driver does after every datagram
                    await asyncio.sleep(0)  # and the node keeps up with its notices
            gw._driver.flush()

        await flood(0, FLOOD - TRACED)  # the tables fill up to their bounds
        gc.collect()
        tracemalloc.start()  # only for the tail: tracing slows every allocation fivefold
        try:
            base = tracemalloc.get_traced_memory()[0]
            await flood(FLOOD - TRACED, FLOOD)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        # 40k datagrams in 2 MB is ~50 bytes each: less than any per-packet state would
        # take (a dict entry alone is more); what there is, is the offline-notice table
        # refilling (it holds at most 10k entries) and QUIC buffers in flight.
        assert grown < 2 * 1024 * 1024, f"memory grew by {grown / 1e6:.1f} MB"
        assert len(core.registry) == 1 and core.limits.tracked_nodes <= 1
        assert len(core._controls) == 1 and len(core._mux) == 1  # no junk connection
        assert len(core._offline_notice) <= 10_001 and len(core._punches) <= 10_001
        counted = sum(core.dropped.values()) + sum(core.malformed.values())
        assert counted >= FLOOD  # every datagram is accounted for
        assert core.dropped["bad_initial"] >= 64 and core.relayed_packets == 0
        assert gw.handler_errors == 0 and a.registered
    finally:
        await mesh.close()


async def test_stun_answers_to_one_address_are_rate_limited() -> None:
    """A flood of Binding requests with one (spoofable) source: the address gets the
    burst (answer_rate x 4 s) and then the rate, not one answer per request."""
    mesh = await mesh_with(answer_rate=10)
    try:
        gw = mesh.gateway
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        for _ in range(200):
            sock.sendto(stun.binding_request(), gw.stun_addresses[0])
        await wait_until(lambda: gw.core.dropped["answer_rate"] >= 150)
        answers = 0
        while True:
            try:
                sock.recv(2048)
                answers += 1
            except BlockingIOError:
                break
        assert 40 <= answers <= 45  # the 4 s burst, plus what refilled meanwhile
        sock.close()
    finally:
        await mesh.close()
