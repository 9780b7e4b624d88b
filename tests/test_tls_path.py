"""The gateway's TLS (WebSocket) path on loopback: nodes without UDP to the gateway, a real
HTTP CONNECT proxy (tinyproxy), and what the gateway does with clients that misbehave."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers import Mesh, wait_until

from macula.config import ConfigError, load_config
from macula.metrics import GatewayCollector, registry_for, render
from macula.net import wslink
from macula.net.endpoint import is_stream_address, stream_address
from macula.node.options import NodeOptions
from macula_lab.proxy import Tinyproxy, tinyproxy_available


def closed_udp_port() -> int:
    """A loopback UDP port nothing listens on: the gateway's UDP, as a firewall sees it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def tls_mesh() -> Mesh:
    mesh = Mesh()
    await mesh.start_gateway(tls_listen=("127.0.0.1", 0))
    return mesh


async def udp_blocked_node(mesh: Mesh, **kwargs):
    gateway = mesh.gateway
    assert gateway is not None
    return await mesh.node(gateway=("127.0.0.1", closed_udp_port()), gateway_id=gateway.node_id,
                           gateway_tls=gateway.tls_address, **kwargs)


async def exchange(a, b, count: int = 50) -> None:
    sa = await a.connect(b.node_id)
    sb = await b.accept(timeout=5)
    for i in range(count):
        sa.send(b"a%d" % i)
        sb.send(b"b%d" % i)
    assert [await sb.recv(5) for _ in range(count)] == [b"a%d" % i for i in range(count)]
    assert [await sa.recv(5) for _ in range(count)] == [b"b%d" % i for i in range(count)]
    return sa, sb


async def test_a_node_whose_udp_is_blocked_registers_over_tls_and_relays() -> None:
    mesh = await tls_mesh()
    try:
        a = await udp_blocked_node(mesh, strategy="always_relay")
        assert a.gateway_transport == "tls"
        b = await mesh.node()
        assert b.gateway_transport == "udp"
        sa, sb = await exchange(a, b)
        assert sa.stats()["transport"] == "tls" and sb.stats()["transport"] == "udp"
        core = mesh.gateway.core
        assert core.nodes_by_transport() == {"udp": 1, "tls": 1}
        assert core.relayed_bytes_by_transport["tls"] > 0
        assert core.relayed_bytes_by_transport["udp"] > 0
        # Peers are never handed the stand-in address as a UDP candidate.
        entry = core.registry.get(a.node_id.raw)
        assert entry is not None and is_stream_address(entry.address)
        text = render(registry_for(GatewayCollector(core, mesh.gateway.streams)))
        assert 'macula_gateway_nodes{transport="tls"} 1.0' in text
        assert "macula_gateway_tls_links 1.0" in text
        assert mesh.gateway.handler_errors == 0
    finally:
        await mesh.close()


async def test_nodes_with_udp_never_touch_the_link() -> None:
    mesh = await tls_mesh()
    try:
        a = await mesh.node(gateway_tls=mesh.gateway.tls_address)
        b = await mesh.node()
        await exchange(a, b, 5)
        await asyncio.sleep(0.5)  # past the race: registered over UDP, so no dial
        assert a.gateway_transport == "udp" and a._carrier.choice.counters.dials == 0
        assert mesh.gateway.streams.accepted == 0
    finally:
        await mesh.close()


ok_proxy, why_proxy = tinyproxy_available()
needs_proxy = pytest.mark.skipif(not ok_proxy, reason=why_proxy)


@needs_proxy
async def test_through_a_real_http_proxy_with_basic_auth() -> None:
    mesh = await tls_mesh()
    try:
        port = mesh.gateway.tls_address[1]
        with Tinyproxy(connect_ports=[port], user="macula", password="pw") as proxy:
            a = await udp_blocked_node(mesh, https_proxy=proxy.url, strategy="always_relay")
            b = await mesh.node()
            assert a.gateway_transport == "tls" and a._carrier.via_proxy
            await exchange(a, b, 20)
            bad = wslink.ProxySpec.parse(proxy.url.replace(":pw@", ":nope@"))
            with pytest.raises(wslink.LinkSetupError) as refused:
                await wslink.dial(mesh.gateway.tls_address, tls=wslink.client_tls_context(False),
                                  proxy=bad)
            assert refused.value.step == "proxy" and "401" in str(refused.value)
            # The proxy only CONNECTs to the ports it is told: another one is refused too.
            with pytest.raises(wslink.LinkSetupError) as forbidden:
                await wslink.dial(("127.0.0.1", closed_udp_port()),
                                  tls=wslink.client_tls_context(False),
                                  proxy=wslink.ProxySpec.parse(proxy.url))
            assert forbidden.value.step == "proxy"
    finally:
        await mesh.close()


async def test_setup_failures_name_their_step() -> None:
    mesh = await tls_mesh()
    try:
        target = mesh.gateway.tls_address
        with pytest.raises(wslink.LinkSetupError) as nobody:
            await wslink.dial(("127.0.0.1", closed_udp_port()), tls=None)
        assert nobody.value.step == "tcp_connect"
        with pytest.raises(wslink.LinkSetupError) as no_proxy:
            await wslink.dial(target, tls=None,
                              proxy=wslink.ProxySpec("127.0.0.1", closed_udp_port()))
        assert no_proxy.value.step == "tcp_connect" and "proxy" in no_proxy.value.detail
        # Unpinned, the self-signed certificate is checked and refused.
        with pytest.raises(wslink.LinkSetupError) as unverified:
            await wslink.dial(target, tls=wslink.client_tls_context(verify=True))
        assert unverified.value.step == "tls"
    finally:
        await mesh.close()


async def test_misbehaving_clients_are_counted_and_closed_and_the_gateway_carries_on() -> None:
    mesh = await tls_mesh()
    gateway = mesh.gateway
    try:
        host, port = gateway.tls_address
        # Not TLS at all.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 500)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # TLS, then an upgrade on the wrong path: 404, counted as "upgrade".
        reader, writer = await asyncio.open_connection(
            host, port, ssl=wslink.client_tls_context(False))
        writer.write(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 404")
        writer.close()
        await wait_until(lambda: gateway.streams.refused["tls"] >= 1
                         and gateway.streams.refused["upgrade"] >= 1, 5)
        # A real link: a text message is dropped (datagrams are binary), an oversized
        # message closes the link.
        link = await wslink.dial(gateway.tls_address, tls=wslink.client_tls_context(False))
        closed = asyncio.Event()
        link.start(lambda data: None, lambda reason: closed.set())
        link._writer.write(link._ws.send(wslink.TextMessage(data="hello")))
        await asyncio.sleep(0.1)
        assert not closed.is_set() and gateway.streams.links_open == 1
        link.send(b"\xff" * (wslink.MAX_MESSAGE + 1))
        await asyncio.wait_for(closed.wait(), 5)
        await wait_until(lambda: gateway.streams.links_open == 0, 5)
        # Through all of it, a node still registers over the link and nothing crashed.
        a = await udp_blocked_node(mesh)
        assert a.gateway_transport == "tls" and gateway.handler_errors == 0
    finally:
        await mesh.close()


async def test_idle_links_are_swept() -> None:
    mesh = await tls_mesh()
    try:
        link = await wslink.dial(mesh.gateway.tls_address, tls=wslink.client_tls_context(False))
        link.start(lambda data: None, lambda reason: None)
        endpoint = mesh.gateway._driver.endpoint
        await wait_until(lambda: mesh.gateway.streams.links_open == 1, 5)
        now = asyncio.get_running_loop().time()
        assert endpoint.sweep(now, idle=60.0) == 0
        assert endpoint.sweep(now + 61.0, idle=60.0) == 1
        await wait_until(lambda: link.closed, 5)
    finally:
        await mesh.close()


def test_stand_in_addresses_keep_the_source_ip_and_are_never_udp() -> None:
    addr = stream_address(("198.51.100.7", 40_000))
    assert addr == ("100::c633:6407", 40_000) and is_stream_address(addr)
    assert stream_address(("198.51.100.8", 40_000))[0] != addr[0]  # per-IP limits still bite
    assert not is_stream_address(("1000::1", 5)) and not is_stream_address(("10.0.0.1", 5))


def test_proxy_from_config_flag_or_environment() -> None:
    config = load_config(env={}, overrides={"node.gateway_tls": "gw.example:443"})
    env = {"HTTPS_PROXY": "http://u:p@proxy.example:3128"}
    assert NodeOptions.from_config(config, env=env).https_proxy == env["HTTPS_PROXY"]
    assert NodeOptions.from_config(
        config, env={**env, "NO_PROXY": "localhost,.example"}).https_proxy is None
    explicit = load_config(env={}, overrides={"node.gateway_tls": "gw.example:443",
                                              "node.https_proxy": "http://proxy2:8080"})
    assert NodeOptions.from_config(explicit, env=env).https_proxy == "http://proxy2:8080"
    # No TLS path configured: no proxy is looked up at all.
    assert NodeOptions.from_config(load_config(env={}), env=env).https_proxy is None
    with pytest.raises(ConfigError, match="node.https_proxy") as bad:
        load_config(env={"MACULA_NODE_HTTPS_PROXY": "socks5://proxy:1080"})
    assert bad.value.key == "node.https_proxy"
    with pytest.raises(ConfigError, match="gateway.tls_key"):
        load_config(env={"MACULA_GATEWAY_TLS_CERT": "/etc/macula/gw.crt"})


def test_proxy_spec_parsing() -> None:
    spec = wslink.ProxySpec.parse("http://us%40er:p%3Ass@[2001:db8::1]:3128/")
    assert (spec.host, spec.port, spec.username, spec.password) == ("2001:db8::1", 3128,
                                                                    "us@er", "p:ss")
    assert wslink.ProxySpec.parse("proxy:8080") == wslink.ProxySpec("proxy", 8080)
    for bad in ("https://proxy:443", "http://:80", "http://proxy:0", "http://proxy:x"):
        with pytest.raises(ValueError):
            wslink.ProxySpec.parse(bad)
    assert wslink.proxy_bypassed("gw.corp.example", "*.other, corp.example")
    assert not wslink.proxy_bypassed("gw.example", "corp.example")
    assert wslink.proxy_bypassed("anything", "*")


async def test_certificate_from_pem_files_and_a_bad_one_names_the_key(tmp_path) -> None:
    from macula.gateway.server import Gateway
    from macula.gateway.stream_listener import self_signed_pem
    from macula.status import gateway_status, node_status

    cert, key = self_signed_pem("gateway.test")
    (tmp_path / "gw.crt").write_bytes(cert)
    (tmp_path / "gw.pem").write_bytes(key)
    mesh = Mesh()
    await mesh.start_gateway(tls_listen=("127.0.0.1", 0), tls_cert=str(tmp_path / "gw.crt"),
                             tls_key=str(tmp_path / "gw.pem"))
    try:
        link = await wslink.dial(mesh.gateway.tls_address, tls=wslink.client_tls_context(False))
        assert link.transport == "tls"
        link.close()
        a = await udp_blocked_node(mesh)
        assert node_status(a)["gateway_transport"] == "tls"
        now = asyncio.get_running_loop().time()
        assert [n["transport"] for n in gateway_status(mesh.gateway, now)["nodes"]] == ["tls"]
    finally:
        await mesh.close()
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="gateway.tls_cert"):
        await Gateway.start(listen=("127.0.0.1", 0), tls_listen=("127.0.0.1", 0),
                            tls_cert=str(tmp_path / "gw.crt"), tls_key=str(tmp_path / "bad.pem"))
