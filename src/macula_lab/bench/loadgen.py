"""Datagram relay roles: our gateway, its load generator and sink, and the same over TURN.

The load is the relay's own unit: one datagram in, one datagram out. Our sender is a
registered node whose socket writes gateway relay frames (0x30 | token | destination |
payload); the TURN sender writes ChannelData (channel | length | payload) to coturn. Both
use the same asyncio transport call, the same pacing loop, the same payload and size, and
both sinks count on the raw socket callback before any parsing, so what differs is the relay.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from macula_lab.bench.profiling import Profiler
from macula_lab.bench.worker_io import Commands, emit

MAGIC = b"MBNC"
_BATCH = 32
_SOCKET_BUFFER = 4 * 1024 * 1024  # what our nodes ask for; given to TURN clients too


def bench_payload(size: int) -> bytes:
    return MAGIC + bytes(max(0, size - len(MAGIC)))


async def pace(send: Callable[[], None], count: int, rate: float, limit: float) -> dict[str, Any]:
    """Call `send` `count` times at `rate` per second (0: as fast as we can), in batches,
    yielding to the loop between batches; stops at `limit` seconds whatever happens."""
    start = time.monotonic()
    sent = 0
    while sent < count:
        n = min(_BATCH, count - sent)
        for _ in range(n):
            send()
        sent += n
        now = time.monotonic()
        if now - start > limit:
            break
        delay = (start + sent / rate - now) if rate > 0 else 0.0
        await asyncio.sleep(max(0.0, delay))
    return {"sent": sent, "start_at": start, "end_at": time.monotonic()}


class Sink:
    """Counts bench datagrams as they come off the socket."""

    def __init__(self, offset: int) -> None:
        self.offset = offset  # where MAGIC sits in the datagram
        self.received = 0
        self.bytes = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def take(self, data: bytes) -> bool:
        if data[self.offset:self.offset + 4] != MAGIC:
            return False
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.received += 1
        self.bytes += len(data) - self.offset
        return True

    def report(self) -> dict[str, Any]:
        """What arrived since the last report; counting starts afresh."""
        out = {"received": self.received, "payload_bytes": self.bytes,
               "first_at": self.first_at, "last_at": self.last_at}
        self.received = self.bytes = 0
        self.first_at = self.last_at = None
        return out


async def _serve_reports(sink: Sink, commands: Commands, limit: float) -> dict[str, Any]:
    """Answer "report" commands until the parent closes our stdin."""
    reports = 0
    while (cmd := await commands.next(limit)) is not None:
        if cmd["cmd"] == "report":
            emit({"report": sink.report()})
            reports += 1
    return {"reports": reports}


async def _serve_loads(send: Callable[[], None], commands: Commands) -> dict[str, Any]:
    """Run each "go" (count, rate, limit) the parent sends, until it closes our stdin."""
    loads = 0
    while (cmd := await commands.next(60)) is not None:
        if cmd["cmd"] == "go":
            emit({"sent": await pace(send, cmd["count"], cmd["rate"], cmd.get("limit", 30.0))})
            loads += 1
    return {"loads": loads}


# ---------------------------------------------------------------- our gateway
async def gateway(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    from macula_lab.bench.gateways import start_gateway

    # With "redis": a member of that cluster (the mesh relay case).
    gw = await (start_gateway(cluster_redis=spec["redis"]) if spec.get("redis")
                else start_gateway())
    profiler = Profiler(spec.get("profile"))
    core = gw.core

    def figures() -> dict[str, Any]:
        return {"cpu_s": time.process_time(), "at": time.monotonic(),
                "relayed_packets": core.relayed_packets, "relayed_bytes": core.relayed_bytes,
                "dropped": dict(core.dropped), "nodes": core.nodes_online,
                "mesh_links": core.mesh.links_up if core.mesh else 0,
                "remote_nodes": len(core.cluster.remote) if core.cluster else 0}

    try:
        emit({"ready": True, "address": list(gw.address)})
        while (cmd := await commands.next(spec.get("deadline", 120.0))) is not None:
            if cmd["cmd"] == "mark":
                emit({"mark": figures()})
            elif cmd["cmd"] == "profile_start":
                profiler.start()
            elif cmd["cmd"] == "profile_stop":
                profiler.stop()
                emit({"profiled": spec.get("profile")})
        return figures()
    finally:
        profiler.stop()
        await gw.close()


async def _relay_node(spec: dict[str, Any]):
    from macula.identity import Identity
    from macula.node.node import Node

    return await Node.start(Identity.generate(), gateway=tuple(spec["gateway"]),
                            listen=("127.0.0.1", 0), strategy="always_relay", nat_traversal=False)


def _grow_buffer(sock: Any) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        except OSError:
            pass


async def relay_recv(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    from macula.wire.relay import FROM_GATEWAY_HEADER

    node = await _relay_node(spec)
    try:
        sink = Sink(FROM_GATEWAY_HEADER)
        driver = node._driver
        # Bench frames stop here; everything else (control QUIC) goes on to the node.
        driver.endpoint.set_receiver(
            lambda data, addr: sink.take(data) or driver.on_datagram(data, addr))
        emit({"ready": True, "node_id": node.node_id.text})
        return await _serve_reports(sink, commands, spec.get("deadline", 120.0))
    finally:
        await node.close(linger=0)


async def relay_send(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    from macula.identity import NodeId
    from macula.wire.relay import encode_to_gateway

    node = await _relay_node(spec)
    try:
        token = node.core.relay_token
        assert token is not None
        frame = encode_to_gateway(token, NodeId.parse(spec["peer"]).raw,
                                  bench_payload(spec["size"]))
        endpoint, gateway_addr = node._driver.endpoint, tuple(spec["gateway"])
        emit({"ready": True})
        return await _serve_loads(lambda: endpoint.send(frame, gateway_addr), commands)
    finally:
        await node.close(linger=0)


# ---------------------------------------------------------------- TURN (coturn)
async def _allocation(spec: dict[str, Any]):
    from aioice.turn import create_turn_endpoint

    transport, _ = await create_turn_endpoint(
        asyncio.DatagramProtocol, tuple(spec["server"]), spec["username"], spec["password"])
    inner = transport._TurnTransport__inner_protocol  # the client protocol on the socket
    _grow_buffer(inner.transport.get_extra_info("socket"))
    return transport, inner


async def turn_recv(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    transport, inner = await _allocation(spec)
    try:
        sink = Sink(4)  # after the ChannelData header
        original = inner.datagram_received
        inner.datagram_received = lambda data, addr: sink.take(data) or original(data, addr)
        emit({"ready": True, "relayed": list(transport.get_extra_info("sockname"))})
        cmd = await commands.next(30)  # the sender's relayed address: permit it
        assert cmd is not None
        await inner.send_data(b"permit", tuple(cmd["peer"]))
        emit({"permitted": True})
        return await _serve_reports(sink, commands, spec.get("deadline", 120.0))
    finally:
        await inner.delete()


async def turn_send(spec: dict[str, Any], commands: Commands) -> dict[str, Any]:
    transport, inner = await _allocation(spec)
    try:
        emit({"ready": True, "relayed": list(transport.get_extra_info("sockname"))})
        cmd = await commands.next(30)  # the receiver's relayed address
        assert cmd is not None
        peer = tuple(cmd["peer"])
        await inner.send_data(b"bind", peer)  # ChannelBind, as aioice does on first send
        channel = inner.peer_to_channel[peer]
        payload = bench_payload(spec["size"])
        frame = struct.pack("!HH", channel, len(payload)) + payload
        sock_transport, server = inner.transport, tuple(spec["server"])
        emit({"bound": True, "channel": channel})
        return await _serve_loads(lambda: sock_transport.sendto(frame, server), commands)
    finally:
        await inner.delete()
