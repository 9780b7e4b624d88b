"""A gateway cluster on a real Redis (a redis-server of our own per test), on loopback:
nodes homed on different gateways reach each other, a killed home is replaced, draining
moves nodes, the directory can go and come back, and strangers stay out of the mesh."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from helpers import wait_until

from macula.gateway.server import Gateway
from macula.identity import Identity
from macula.node.node import Node
from macula.session.quic import ALPN_MESH, PinnedQuicConnection, make_configuration
from macula.wire.mesh import encode_mesh_relay
from macula_lab.redis_server import RedisServer, redis_available

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def redis_url():
    ok, why = redis_available()
    if not ok:
        pytest.skip(why)
    with RedisServer() as server:
        yield server.url


class Cluster:
    def __init__(self, url: str) -> None:
        self.url = url
        self.gateways: list[Gateway] = []
        self.nodes: list[Node] = []

    async def gateway(self, **kwargs) -> Gateway:
        gateway = await Gateway.start(listen=("127.0.0.1", 0), cluster_redis=self.url, **kwargs)
        self.gateways.append(gateway)
        return gateway

    async def meshed(self, count: int) -> list[Gateway]:
        gateways = [await self.gateway() for _ in range(count)]
        await wait_until(lambda: all(g.core.mesh.links_up == count - 1 for g in gateways), 10)
        return gateways

    async def node(self, *homes: Gateway, **kwargs) -> Node:
        kwargs.setdefault("listen", ("127.0.0.1", 0))
        gateways = [(g.address, g.node_id) for g in homes]
        node = await Node.start(Identity.generate(), gateways=gateways, **kwargs)
        self.nodes.append(node)
        await node.wait_registered(5)
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
        for gateway in self.gateways:
            await gateway.close()


@pytest.fixture
async def cluster(redis_url):
    c = Cluster(redis_url)
    try:
        yield c
    finally:
        await c.close()


def home_of(node: Node, gateways: list[Gateway]) -> int:
    return [g.address for g in gateways].index(node.core.gateway)


async def stream(a: Node, b: Node, count: int, interval: float = 0.01,
                 during=None) -> list[int]:
    """`count` numbered messages a -> b; `during` runs after the first third. The longest
    wait between two arrivals is in `stream.max_gap`."""
    loop = asyncio.get_running_loop()
    session = await a.connect(b.node_id, timeout=5)
    accepted = await b.accept(timeout=5)
    got: list[int] = []
    arrivals: list[float] = []

    async def receive() -> None:
        while len(set(got)) < count:
            got.append(int(await accepted.recv()))
            arrivals.append(loop.time())

    receiver = asyncio.ensure_future(receive())
    for seq in range(count):
        session.send(str(seq).encode())
        if seq == count // 3 and during is not None:
            await during()
        await asyncio.sleep(interval)
    await asyncio.wait_for(receiver, 15)
    stream.max_gap = max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    return got


async def test_nodes_homed_on_different_gateways_relay_through_the_mesh(cluster):
    g0, g1 = await cluster.meshed(2)
    a = await cluster.node(g0, strategy="always_relay")
    b = await cluster.node(g1, strategy="always_relay")
    got = await stream(a, b, 50)
    assert sorted(got) == list(range(50))
    # The frames went a -> g0 -> (one hop) g1 -> b: g1 delivered what g0 forwarded.
    assert g0.core.mesh.relayed_bytes > 0
    assert g1.core.relayed_bytes_by_transport["mesh"] > 0


async def test_a_lookup_finds_a_node_homed_elsewhere_and_a_punch_goes_direct(cluster):
    g0, g1 = await cluster.meshed(2)
    a, b = await cluster.node(g0), await cluster.node(g1)
    assert await a.is_online(b.node_id)
    session = await a.connect(b.node_id, timeout=5)
    await wait_until(lambda: session.connection_type == "direct", 5)
    assert g0.core.punches_coordinated + g1.core.punches_coordinated == 1


async def test_a_node_of_a_killed_gateway_rehomes_within_three_seconds_losing_nothing(cluster):
    gateways = await cluster.meshed(3)
    a = await cluster.node(*gateways, strategy="always_relay")
    b_gateways = [g for g in gateways if g.address != a.core.gateway]
    b = await cluster.node(*b_gateways, strategy="always_relay")
    victim = gateways[home_of(a, gateways)]
    killed_at: list[float] = []

    async def kill() -> None:
        killed_at.append(asyncio.get_running_loop().time())
        victim.abort()  # no goodbye: the node finds out from unanswered keepalives

    got = await stream(a, b, 300, during=kill)
    assert sorted(set(got)) == list(range(300)) and len(got) == 300  # nothing lost or twice
    assert a.core.gateway != victim.address and a.core.registered
    assert a.core.homes.moves == 1


async def test_failover_time_from_the_home_going_silent(cluster):
    gateways = await cluster.meshed(2)
    node = await cluster.node(*gateways)
    loop = asyncio.get_running_loop()
    victim = gateways[home_of(node, gateways)]
    victim.abort()
    began = loop.time()
    await wait_until(lambda: node.core.registered and node.core.gateway != victim.address, 5)
    # By design 0.6-2.6 s (next keepalive within 2 s, two unanswered 0.3 s apart) plus a
    # registration; the margin is for a loaded test machine.
    assert loop.time() - began < 3.5


async def test_draining_moves_every_node_and_no_message_waits_a_second(cluster):
    gateways = await cluster.meshed(3)
    a = await cluster.node(*gateways, strategy="always_relay")
    b = await cluster.node(*[g for g in gateways if g.address != a.core.gateway],
                           strategy="always_relay")
    victim = gateways[home_of(a, gateways)]
    drained: list[dict] = []

    async def drain() -> None:
        drained.append(await victim.drain())

    got = await stream(a, b, 200, during=drain)
    assert sorted(got) == list(range(200))
    assert drained[0]["moved"] == drained[0]["asked"] == 1 and drained[0]["left"] == 0
    assert drained[0]["elapsed_ms"] < 1000
    assert victim.core.nodes_online == 0 and a.core.gateway != victim.address
    assert stream.max_gap < 1.0


async def test_a_gateway_whose_redis_is_down_at_start_serves_alone_then_joins(redis_url):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    url = f"redis://127.0.0.1:{free}/0"
    lonely = await Gateway.start(listen=("127.0.0.1", 0), cluster_redis=url)
    nodes = []
    try:
        assert not lonely.core.cluster.directory_ok and lonely.cluster.outages == 1
        # Its own nodes work all along.
        a = await Node.start(Identity.generate(), gateway=lonely.address, listen=("127.0.0.1", 0))
        b = await Node.start(Identity.generate(), gateway=lonely.address, listen=("127.0.0.1", 0))
        nodes += [a, b]
        session = await a.connect(b.node_id, timeout=5)
        session.send(b"alone")
        assert await (await b.accept(timeout=5)).recv(timeout=5) == b"alone"
        # A lookup for a node it does not know says why it cannot answer.
        stranger = Identity.generate().node_id
        with pytest.raises(Exception, match="directory"):
            await a.is_online(stranger)
        with RedisServer(port=free):
            other = await Gateway.start(listen=("127.0.0.1", 0), cluster_redis=url)
            try:
                await wait_until(lambda: lonely.core.cluster.directory_ok, 10)
                await wait_until(lambda: lonely.core.mesh.links_up == 1, 10)
                # It wrote its nodes when the directory came: the other member knows them.
                await wait_until(lambda: a.node_id.raw in other.core.cluster.remote, 5)
            finally:
                await other.close()
    finally:
        for node in nodes:
            await node.close()
        await lonely.close()


async def test_a_key_that_is_not_a_member_cannot_open_a_mesh_link(cluster):
    (gateway,) = await cluster.meshed(1)
    stranger = Identity.generate()
    conn = PinnedQuicConnection(
        configuration=make_configuration(stranger, is_client=True, alpn=ALPN_MESH),
        expected_peer=gateway.node_id)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        conn.connect(gateway.address, loop.time())
        for _ in range(50):
            for data, addr in conn.datagrams_to_send(loop.time()):
                sock.sendto(data, addr)
            await asyncio.sleep(0.02)
            try:
                while True:
                    data, addr = sock.recvfrom(2048)
                    conn.receive_datagram(data, addr, loop.time())
            except BlockingIOError:
                pass
            if gateway.core.dropped["mesh_not_member"]:
                break
        assert gateway.core.dropped["mesh_not_member"] >= 1
        assert gateway.core.mesh.links_up == 0
    finally:
        sock.close()


async def test_forged_mesh_relay_frames_are_dropped_and_counted(cluster):
    g0, g1 = await cluster.meshed(2)
    b = await cluster.node(g1, strategy="always_relay")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        someone = Identity.generate().node_id.raw
        # Claiming to be member g0, signed with a key g1 never handed out.
        forged = encode_mesh_relay(os.urandom(32), g0.node_id.raw, someone, b.node_id.raw,
                                   b"\x40" + os.urandom(100))
        stranger = encode_mesh_relay(os.urandom(32), someone, someone, b.node_id.raw, b"x" * 40)
        for frame in (forged, stranger, b"\x32" + b"\x00" * 10):
            sock.sendto(frame, g1.address)
        await wait_until(lambda: g1.core.dropped["mesh_forged"] >= 2
                         and g1.core.dropped["mesh_not_member"] >= 1, 5)
        assert g1.handler_errors == 0 and b.core.registered
        assert g1.core.relayed_bytes_by_transport["mesh"] == 0
    finally:
        sock.close()


async def test_a_config_with_a_wildcard_listen_needs_cluster_advertise(redis_url):
    from macula.config import ConfigError

    with pytest.raises(ConfigError, match="gateway.cluster.advertise"):
        await Gateway.start(listen=("0.0.0.0", 0), cluster_redis=redis_url)


def test_macula_gateway_drain_moves_the_nodes_then_the_gateway_exits(redis_url, procs):
    """Two `macula gateway --redis` processes and an `up` node homed on the first:
    `macula gateway drain` moves the node to the second, then the first exits."""
    keys = {name: procs.key(name) for name in ("gw1", "gw2", "node")}
    gateways = []
    for name in ("gw1", "gw2"):
        proc, line = procs.start("gateway", "--listen", "127.0.0.1:0", "--key-file",
                                 keys[name][0], "--redis", redis_url, ready="nodes pin it as")
        gateways.append((proc, line.strip().split()[-1]))
    first, second = gateways
    procs.env["MACULA_NODE_GATEWAYS"] = f"{first[1]},{second[1]}"  # home: the first
    up, _ = procs.start("up", "--key-file", keys["node"][0], ready="macula up:")
    del procs.env["MACULA_NODE_GATEWAYS"]
    drained = procs.run("gateway", "drain", "--key-file", keys["gw1"][0], timeout=40)
    assert drained.returncode == 0, drained.stderr
    assert "drained: 1 of 1 node(s) moved" in drained.stdout, drained.stdout
    first[0].wait(timeout=20)
    assert first[0].returncode == 0
    # A gateway that is not in a cluster says so instead of pretending.
    alone_key = procs.key("alone")[0]
    procs.start("gateway", "--listen", "127.0.0.1:0", "--key-file", alone_key,
                ready="nodes pin it as")
    refused = procs.run("gateway", "drain", "--key-file", alone_key)
    assert refused.returncode == 1 and "not in a cluster" in refused.stderr
    procs.stop(up)
    procs.stop(second[0])


async def test_a_node_the_feed_has_not_brought_yet_is_asked_of_the_directory(cluster):
    """A member that missed a node's registration (the change feed is not instant, or a
    message was lost) asks the store before calling it offline: relay frames, lookups and
    punch requests for it all wait for the answer instead of failing."""
    g0, g1 = await cluster.meshed(2)
    a, b = await cluster.node(g0), await cluster.node(g1)
    await wait_until(lambda: b.node_id.raw in g0.core.cluster.remote, 5)
    del g0.core.cluster.remote[b.node_id.raw]  # as if the feed had not brought it
    session = await a.connect(b.node_id, timeout=5)
    await wait_until(lambda: session.connection_type == "direct", 5)
    assert g0.core.punch_refusals["peer_offline"] == 0
    assert g0.core.dropped["destination_offline"] == 0
