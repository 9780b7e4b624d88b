"""Gateway + nodes on loopback: the Phase 1 always-relay mesh as a user sees it."""

import asyncio
import dataclasses
import socket

import pytest
from helpers import Mesh, wait_until

from macula.gateway.registry import NodeEntry
from macula.gateway.server import Gateway
from macula.identity import Identity
from macula.metrics import GatewayCollector, NodeCollector, registry_for, render
from macula.session.errors import (
    GatewayKeyMismatch,
    MessageTooLarge,
    NotRegistered,
    PeerKeyMismatch,
    PeerOffline,
)
from macula.wire import control
from macula.wire.relay import encode_to_gateway


async def test_nodes_register_and_gateway_observes_their_address(mesh):
    a = await mesh.node()
    assert a.registered
    assert a.discover_public_address() == a.local_address
    entry = mesh.gateway.core.registry.get(a.node_id.raw)
    assert entry is not None and entry.address == a.local_address
    assert mesh.gateway.core.get_peer_public_address(a.node_id) == a.local_address


async def test_messages_both_ways_in_order_exactly_once(mesh):
    a, b = await mesh.node(strategy="always_relay"), await mesh.node(strategy="always_relay")
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    assert sb.peer == a.node_id and sa.peer == b.node_id
    for i in range(300):
        sa.send(b"a%d" % i)
        sb.send(b"b%d" % i)
    got_b = [await sb.recv(5) for _ in range(300)]
    got_a = [await sa.recv(5) for _ in range(300)]
    assert got_b == [b"a%d" % i for i in range(300)]
    assert got_a == [b"b%d" % i for i in range(300)]
    stats = a.get_connection_stats(b.node_id)
    assert stats["connection_type"] == "relay"
    assert stats["latency_ms"] is not None and stats["latency_ms"] > 0
    assert stats["bytes_sent"] > 300 and stats["bytes_received"] > 300
    assert stats["path_history"][0]["path"] == "relay"


async def test_bulk_stream_carries_a_megabyte(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    blob = bytes(range(256)) * 4096  # 1 MiB
    stream = await sa.open_stream()
    for i in range(0, len(blob), 64 * 1024):
        stream.write(blob[i:i + 64 * 1024])
        await stream.drain()
    stream.write(b"", end=True)
    incoming = await sb.accept_stream(timeout=5)
    data = await asyncio.wait_for(incoming.read_all(), 20)
    assert data == blob


async def test_gateway_never_sees_plaintext(mesh):
    seen: list[bytes] = []
    endpoint = mesh.gateway._driver.endpoint
    original = endpoint._receiver
    endpoint.set_receiver(lambda data, addr: (seen.append(data), original(data, addr)))
    a, b = await mesh.node(strategy="always_relay"), await mesh.node(strategy="always_relay")
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    secret = b"the-secret-launch-code-7d3f9a"
    sa.send(secret)
    assert await sb.recv(5) == secret
    relayed = [d for d in seen if d[:1] == b"\x30"]
    assert relayed, "traffic must have crossed the gateway relay"
    assert all(secret not in d for d in seen)


async def test_connect_to_offline_node_fails_clearly(mesh):
    a = await mesh.node()
    ghost = Identity.generate().node_id
    with pytest.raises(PeerOffline, match=ghost.text):
        await a.connect(ghost, timeout=5)
    assert await a.is_online(ghost) is False


async def test_oversize_message_refused_with_limit_named(mesh):
    a = await mesh.node(max_message_size=1000)
    b = await mesh.node()
    sa = await a.connect(b.node_id)
    with pytest.raises(MessageTooLarge, match="1000"):
        sa.send(b"x" * 1001)
    sa.send(b"x" * 1000)  # the limit itself is fine
    sb = await b.accept(timeout=5)
    assert len(await sb.recv(5)) == 1000


class _Impostor:
    """A gateway registry that routes one node id to another node (a malicious gateway)."""

    def __init__(self, registry, victim, impostor):
        self._registry, self._victim, self._impostor = registry, victim, impostor

    def __getattr__(self, name):
        return getattr(self._registry, name)

    def get(self, raw):
        if raw == self._victim.raw:
            return self._registry.get(self._impostor.raw)
        return self._registry.get(raw)

    def by_address(self, addr):
        entry = self._registry.by_address(addr)
        if entry is not None and entry.node_id == self._impostor:
            # ...and stamps the impostor's packets with the victim's id.
            return NodeEntry(self._victim, entry.address, entry.token, 0, 0)
        return entry


async def test_wrong_key_is_refused_even_by_a_lying_gateway(mesh):
    a, b, c = await mesh.node(), await mesh.node(), await mesh.node()
    core = mesh.gateway.core
    core.registry = _Impostor(core.registry, victim=b.node_id, impostor=c.node_id)
    with pytest.raises(PeerKeyMismatch, match=c.node_id.text):
        await a.connect(b.node_id, timeout=8)
    assert c.session(a.node_id) is None


async def test_node_cannot_register_under_another_id(mesh):
    victim = await mesh.node()
    liar = Identity.generate()
    from macula.node import core as node_core
    original = node_core.NodeCore._send_control

    def lying_hello(self, message):
        if isinstance(message, control.Hello):
            message = dataclasses.replace(message, node_id=victim.node_id.text)
        return original(self, message)

    node_core.NodeCore._send_control = lying_hello
    try:
        with pytest.raises(NotRegistered):
            await mesh.node(liar, register_timeout=2)
    finally:
        node_core.NodeCore._send_control = original
    assert mesh.gateway.core.dropped["id_mismatch"] >= 1
    entry = mesh.gateway.core.registry.get(victim.node_id.raw)
    assert entry is not None and entry.address == victim.local_address


async def test_only_registered_nodes_can_relay(mesh):
    a, b = await mesh.node(), await mesh.node()
    before = mesh.gateway.core.relayed_packets
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        stolen = mesh.gateway.core.registry.get(a.node_id.raw).token
        for token in (b"\x00" * 8, stolen):  # a guessed token and a stolen one
            sock.sendto(encode_to_gateway(token, b.node_id.raw, b"\xc0" + b"x" * 100),
                        mesh.gateway.address)
        await wait_until(lambda: mesh.gateway.core.dropped["unauthorized"] >= 2)
    finally:
        sock.close()
    assert mesh.gateway.core.relayed_packets == before


async def test_malformed_datagrams_are_dropped_and_counted(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    junk = [b"", b"\x00", b"\x30", b"\x31" + b"z" * 20, b"\xc0garbage", b"\x40" * 30,
            b"\xff" * 1300, bytes(range(256)), b"\x99hello"]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        for target in (mesh.gateway.address, a.local_address):
            for data in junk:
                sock.sendto(data, target)
        gw = mesh.gateway
        await wait_until(lambda: sum(gw.core.malformed.values()) + sum(gw.core.dropped.values())
                         + gw.stun.malformed >= len(junk) - 1)
        await wait_until(lambda: sum(a.core.malformed.values())
                         + sum(a.core.dropped.values()) >= len(junk) - 1)
    finally:
        sock.close()
    assert mesh.gateway.handler_errors == 0 and a.handler_errors == 0
    sa.send(b"still alive")
    assert await sb.recv(5) == b"still alive"


async def test_gateway_restart_nodes_reconnect_and_session_survives():
    port_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    mesh = Mesh()
    await mesh.start_gateway(listen=("127.0.0.1", port))
    try:
        a = await mesh.node(keepalive_interval=0.2, strategy="always_relay")
        b = await mesh.node(keepalive_interval=0.2, strategy="always_relay")
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        sa.send(b"before")
        assert await sb.recv(5) == b"before"
        await mesh.gateway.close()
        await wait_until(lambda: not a.registered and not b.registered, timeout=5)
        sa.send(b"during")  # queued while no gateway exists: must not be lost
        mesh.gateway = await Gateway.start(listen=("127.0.0.1", port))
        await wait_until(lambda: a.registered and b.registered, timeout=10)
        assert await sb.recv(10) == b"during"
        sb.send(b"after")
        assert await sa.recv(5) == b"after"
        assert a.core.gateway_reconnects >= 1
    finally:
        await mesh.close()


async def test_simultaneous_connect_gives_one_session(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa, sb = await asyncio.gather(a.connect(b.node_id), b.connect(a.node_id))
    sa.send(b"from a")
    sb.send(b"from b")
    assert await sb.recv(5) == b"from a"
    assert await sa.recv(5) == b"from b"
    assert len(a.core.sessions) == 1 and len(b.core.sessions) == 1
    assert a.core.sessions[b.node_id].initiator != b.core.sessions[a.node_id].initiator


async def test_session_close_reaches_the_peer(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    await sa.close()
    await asyncio.wait_for(sb.closed.wait(), 5)
    assert "closed by application" in sb.close_reason


async def test_metrics_expose_nodes_relay_and_malformed(mesh):
    a, b = await mesh.node(strategy="always_relay"), await mesh.node(strategy="always_relay")
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    sa.send(b"hi")
    await sb.recv(5)
    text = render(registry_for(GatewayCollector(mesh.gateway.core)))
    assert "macula_gateway_nodes_online 2.0" in text
    assert "macula_gateway_relayed_packets_total" in text
    node_text = render(registry_for(NodeCollector(a.core)))
    assert 'macula_node_sessions{path="relay"} 1.0' in node_text


async def test_node_expiry_when_it_goes_silent():
    mesh = Mesh()
    await mesh.start_gateway(node_timeout=0.5)
    try:
        a = await mesh.node()
        assert mesh.gateway.core.nodes_online == 1
        a._driver.closed = True  # the node vanishes without a word
        a._driver.endpoint.close()
        await wait_until(lambda: mesh.gateway.core.nodes_online == 0, timeout=5)
    finally:
        await mesh.close()


async def test_metrics_show_punch_outcomes_and_ice_time(mesh):
    a, b = await mesh.node(), await mesh.node()
    sa = await a.connect(b.node_id)
    await b.accept(timeout=5)
    await wait_until(lambda: sa.connection_type == "direct", 5)
    await wait_until(lambda: mesh.gateway.core.punch_outcomes, 5)
    node_text = render(registry_for(NodeCollector(a.core)))
    assert 'macula_node_punch_outcomes_total{outcome="success"} 1.0' in node_text
    assert "macula_node_ice_negotiation_seconds_count 1.0" in node_text
    assert "macula_node_turn_servers_unreachable 0.0" in node_text
    gw_text = render(registry_for(GatewayCollector(mesh.gateway.core)))
    assert "macula_gateway_punches_coordinated_total 1.0" in gw_text
    assert 'outcome="success"' in gw_text


async def test_a_node_refuses_a_gateway_that_is_not_the_one_it_pins(mesh):
    """The gateway at the address must prove the pinned key; another is refused at once
    (not after the registration timeout), with both ids named."""
    impostor = Identity.generate().node_id
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(GatewayKeyMismatch) as info:
        await mesh.node(gateway_id=impostor, register_timeout=10)
    assert loop.time() - started < 2.0
    message = str(info.value)
    assert f"presents key {mesh.gateway.node_id}" in message and f"pins {impostor}" in message
    node = await mesh.node(gateway_id=mesh.gateway.node_id)  # the right one registers
    assert node.registered


async def test_allowlist_gateway_on_loopback(tmp_path):
    """admission = "allowlist": a node not listed hears why at once; a listed one joins;
    taking it off the list (the file changes) disconnects it within a housekeeping round."""
    from macula.config import ConfigError
    from macula.gateway import server as gateway_server
    from macula.session.errors import NotAdmitted

    member, stranger = Identity.generate(), Identity.generate()
    allow = tmp_path / "allowlist"
    allow.write_text(f"# our fleet\n{member.node_id.text} laptop\n")
    bad = tmp_path / "bad"
    bad.write_text("not-a-node-id\n")
    with pytest.raises(ConfigError, match=r"bad:1"):
        await Gateway.start(listen=("127.0.0.1", 0), admission="allowlist", allowlist=str(bad))
    gateway_server.HOUSEKEEPING_EVERY, old = 0.2, gateway_server.HOUSEKEEPING_EVERY
    mesh = Mesh()
    try:
        await mesh.start_gateway(admission="allowlist", allowlist=str(allow))
        with pytest.raises(NotAdmitted, match="not admitted"):
            await mesh.node(stranger, register_timeout=5)
        node = await mesh.node(member)
        assert node.registered
        allow.write_text("# nobody\n")
        await wait_until(lambda: mesh.gateway.core.registry.get(member.node_id.raw) is None,
                         timeout=5)
        assert mesh.gateway.core.dropped["not_admitted"] >= 1
    finally:
        gateway_server.HOUSEKEEPING_EVERY = old
        await mesh.close()
