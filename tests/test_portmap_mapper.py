"""PortMapper over real loopback sockets against fake PCP / NAT-PMP / UPnP-IGD gateways.

Everything binds 127.0.0.1: the fake gateway's PCP/NAT-PMP port is an ephemeral one (the
mapper's `server_port`), and SSDP goes to a loopback responder, never to multicast.
"""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from macula.nat.portmap import (
    DiscoveryResult,
    PortMapper,
    PortMapping,
    UpnpClient,
    default_gateway,
    igd,
    local_ip_toward,
    natpmp,
    pcp,
    xmlsafe,
)
from macula.nat.portmap import mapper as mapper_module
from macula.nat.portmap.upnp_lease import next_step
from macula.net.endpoint import Address
from macula.net.udp import UdpEndpoint, open_udp_endpoint

LO = "127.0.0.1"
PUBLIC = "203.0.113.77"


class FakeGateway(asyncio.DatagramProtocol):
    """PCP + NAT-PMP on one UDP port, like miniupnpd. `mode`: both, natpmp, silent."""

    def __init__(self, mode: str = "both") -> None:
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None
        self.requests: list[Any] = []
        self.epoch = 1000

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if self.mode == "silent" or not data or self.transport is None:
            return
        if data[0] == pcp.VERSION:
            if self.mode == "natpmp":  # RFC 6887 9: NAT-PMP-only answer to PCP
                reply = natpmp.encode_response(natpmp.Response(1, natpmp.UNSUPPORTED_VERSION, self.epoch))
            else:
                request = pcp.decode_request(data)
                self.requests.append(request)
                assert request.map is not None
                body = pcp.MapData(request.map.nonce, 17, request.map.internal_port,
                                   request.map.internal_port + 1 if request.lifetime else 0, PUBLIC)
                reply = pcp.encode_response(pcp.Response(pcp.OP_MAP, 0, min(request.lifetime, 3600),
                                                         self.epoch, body))
        else:
            req = natpmp.decode_request(data)
            self.requests.append(req)
            if req.opcode == natpmp.OP_EXTERNAL_ADDRESS:
                reply = natpmp.encode_response(natpmp.Response(0, 0, self.epoch, external_ip=PUBLIC))
            else:
                reply = natpmp.encode_response(natpmp.Response(
                    1, 0, self.epoch, internal_port=req.internal_port,
                    external_port=req.internal_port + 2 if req.lifetime else 0,
                    lifetime=req.lifetime))
        self.transport.sendto(reply, addr)


async def start_gateway(mode: str) -> tuple[FakeGateway, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: FakeGateway(mode),
                                                           local_addr=(LO, 0))
    return proto, transport.get_extra_info("sockname")[1]


def descr(version: int) -> bytes:
    stype = igd.WANIP2 if version == 2 else igd.WANIP1
    return (f'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device>'
            f"<deviceList><device><serviceList><service><serviceType>{stype}</serviceType>"
            f"<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList>"
            f"</device></root>").encode()


def soap_ok(action: str, values: dict[str, str]) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in values.items())
    return (f'<?xml version="1.0"?><s:Envelope xmlns:s="{igd.SOAP_ENV}"><s:Body>'
            f'<u:{action}Response xmlns:u="x">{inner}</u:{action}Response></s:Body></s:Envelope>').encode()


def soap_fault(code: int) -> bytes:
    return (f'<?xml version="1.0"?><s:Envelope xmlns:s="{igd.SOAP_ENV}"><s:Body><s:Fault>'
            f'<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>{code}'
            f"</errorCode><errorDescription>nope</errorDescription></UPnPError></detail>"
            f"</s:Fault></s:Body></s:Envelope>").encode()


class FakeIgd:
    """A UPnP IGD on loopback: HTTP (description + SOAP) and an SSDP responder."""

    def __init__(self, version: int = 2, conflicts: int = 0) -> None:
        self.version = version
        self.conflicts = conflicts  # AddPortMapping answers 718 this many times first
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.mappings: dict[int, int] = {}
        self.broken = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, descr(fake.version))

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                action = self.headers["SOAPAction"].strip('"').split("#")[1]
                call = xmlsafe.parse(body)[0][0]
                args = {c.tag: (c.text or "") for c in call}
                fake.calls.append((action, args))
                status, reply = fake.answer(action, args)
                self._send(status, reply)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.http = ThreadingHTTPServer((LO, 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.ssdp_port = 0
        self._ssdp: asyncio.DatagramTransport | None = None

    def answer(self, action: str, args: dict[str, str]) -> tuple[int, bytes]:
        if self.broken:
            return 500, soap_fault(501)
        if action == "GetExternalIPAddress":
            return 200, soap_ok(action, {"NewExternalIPAddress": PUBLIC})
        if action == "AddAnyPortMapping":
            if self.version != 2:
                return 500, soap_fault(401)
            port = int(args["NewExternalPort"]) + 5
            self.mappings[port] = int(args["NewInternalPort"])
            return 200, soap_ok(action, {"NewReservedPort": str(port)})
        if action == "AddPortMapping":
            if self.conflicts:
                self.conflicts -= 1
                return 500, soap_fault(718)
            self.mappings[int(args["NewExternalPort"])] = int(args["NewInternalPort"])
            return 200, soap_ok(action, {})
        if action == "DeletePortMapping":
            if self.mappings.pop(int(args["NewExternalPort"]), None) is None:
                return 500, soap_fault(714)
            return 200, soap_ok(action, {})
        return 500, soap_fault(401)

    async def start_ssdp(self) -> None:
        loop = asyncio.get_running_loop()
        location = f"http://{LO}:{self.http.server_address[1]}/rootDesc.xml"
        fake = self

        class Ssdp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
                if data.startswith(b"M-SEARCH"):
                    fake.calls.append(("M-SEARCH", {}))
                    self.transport.sendto(  # type: ignore[attr-defined]
                        b"HTTP/1.1 200 OK\r\nST: " + igd.ST_IGD1.encode() +
                        b"\r\nLOCATION: " + location.encode() + b"\r\n\r\n", addr)

        transport, _ = await loop.create_datagram_endpoint(Ssdp, local_addr=(LO, 0))
        self._ssdp = transport  # type: ignore[assignment]
        self.ssdp_port = transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self._ssdp is not None:
            self._ssdp.close()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
async def node() -> Any:
    endpoint = await open_udp_endpoint(LO, 0)
    yield endpoint
    endpoint.close()


@pytest.fixture
async def fake_igd() -> Any:
    igd_server = FakeIgd()
    await igd_server.start_ssdp()
    yield igd_server
    igd_server.close()


def make_mapper(endpoint: UdpEndpoint, port: int, changes: list[PortMapping | None],
                **kwargs: Any) -> PortMapper:
    kwargs.setdefault("pcp_timeout", 0.5)
    kwargs.setdefault("natpmp_timeout", 0.5)
    mapper = PortMapper(endpoint, server_port=port, on_change=changes.append, **kwargs)
    mapper.install_receiver()
    return mapper


async def test_pcp_first_and_delete_on_close(node: UdpEndpoint) -> None:
    gateway, port = await start_gateway("both")
    changes: list[PortMapping | None] = []
    mapper = make_mapper(node, port, changes)
    result = await mapper.discover(LO)
    local_port = node.local_address[1]
    assert result.protocol == "pcp" and result.answered == ("pcp",) and result.errors == ()
    assert result.external == (PUBLIC, local_port + 1)
    assert result.mapping is not None and result.mapping.internal == (LO, local_port)
    assert mapper.mapping == result.mapping and changes == [result.mapping]
    await mapper.close()
    assert mapper.mapping is None and changes[-1] is None
    last = gateway.requests[-1]
    assert last.lifetime == 0 and last.map.nonce == gateway.requests[0].map.nonce
    gateway.transport.close()  # type: ignore[union-attr]


async def test_natpmp_only_gateway_falls_back_at_once(node: UdpEndpoint) -> None:
    gateway, port = await start_gateway("natpmp")
    changes: list[PortMapping | None] = []
    mapper = make_mapper(node, port, changes, pcp_timeout=5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await mapper.discover(LO)
    assert loop.time() - started < 2.0  # no waiting for PCP's retransmissions
    assert result.protocol == "natpmp" and result.answered == ("natpmp",)
    assert result.errors[0][0] == "pcp" and "NAT-PMP only" in result.errors[0][1]
    assert result.external == (PUBLIC, node.local_address[1] + 2)
    await mapper.close()
    assert gateway.requests[-1] == natpmp.Request(1, node.local_address[1], 0, 0)
    gateway.transport.close()  # type: ignore[union-attr]


async def test_upnp_when_5351_is_silent(node: UdpEndpoint, fake_igd: FakeIgd) -> None:
    gateway, port = await start_gateway("silent")
    changes: list[PortMapping | None] = []
    upnp = UpnpClient(search_target=(LO, fake_igd.ssdp_port))
    mapper = make_mapper(node, port, changes, upnp=upnp, pcp_timeout=0.3, natpmp_timeout=0.3)
    result = await mapper.discover(LO)
    local_port = node.local_address[1]
    assert result.protocol == "upnp" and result.answered == ("upnp",)
    assert [p for p, _ in result.errors] == ["pcp", "natpmp"]
    assert all("no answer" in why for _, why in result.errors)
    assert result.external == (PUBLIC, local_port + 5)  # the IGDv2 AddAnyPortMapping choice
    actions = [a for a, _ in fake_igd.calls]
    assert actions[-2:] == ["GetExternalIPAddress", "AddAnyPortMapping"]
    add = fake_igd.calls[-1][1]
    assert add["NewInternalClient"] == LO and add["NewInternalPort"] == str(local_port)
    assert add["NewProtocol"] == "UDP" and add["NewLeaseDuration"] == "3600"
    await mapper.close()
    assert fake_igd.calls[-1][0] == "DeletePortMapping" and fake_igd.mappings == {}
    assert changes == [result.mapping, None]
    gateway.transport.close()  # type: ignore[union-attr]


async def test_upnp_v1_conflict_retries_another_port(fake_igd: FakeIgd) -> None:
    fake_igd.version, fake_igd.conflicts = 1, 1
    client = UpnpClient(search_target=(LO, fake_igd.ssdp_port))
    control = await client.discover(timeout=1.0, gateway=LO)
    assert control.service.version == 1 and control.local_ip == LO
    port, lease = await client.add_mapping(control, internal_port=5000, external_port=5000, lease=60)
    assert port != 5000 and lease == 60 and fake_igd.mappings == {port: 5000}
    assert [a for a, _ in fake_igd.calls].count("AddPortMapping") == 2


def test_upnp_lease_schedule_on_a_fake_clock() -> None:
    """Renew at 1/2, 3/4, 7/8 of the lease after failures (never sooner than asked), and
    give up at expiry: times are numbers here, nothing sleeps."""
    lease = PortMapping("upnp", ("198.51.100.1", 40000), ("192.0.2.2", 5000), "192.0.2.1",
                        3600.0, 100.0)
    assert next_step(lease, 0, 100.0) == (1900.0, True)
    assert next_step(lease, 1, 1900.0 + 4.0) == (2800.0, True)
    assert next_step(lease, 2, 2804.0) == (3250.0, True)
    assert next_step(lease, 3, 3700.0) == (3700.0, False)  # no renewal fits any more
    assert next_step(lease, 0, 5000.0) == (3700.0, False)


async def test_upnp_lease_renews_then_expires(node: UdpEndpoint, fake_igd: FakeIgd) -> None:
    """The same, end to end over loopback HTTP against a fake IGD (a 2 s lease)."""
    changes: list[PortMapping | None] = []
    upnp = UpnpClient(search_target=(LO, fake_igd.ssdp_port))
    mapper = make_mapper(node, 9, changes, upnp=upnp, protocols=("upnp",), upnp_lease=2)
    result = await mapper.discover(LO)
    assert result.mapping is not None and result.mapping.lifetime == 2
    await asyncio.sleep(1.4)  # renewal at half the lease
    renewals = [args for action, args in fake_igd.calls if action == "AddPortMapping"]
    assert len(renewals) == 1 and renewals[0]["NewExternalPort"] == str(result.external[1])  # type: ignore[index]
    assert mapper.mapping is not None and mapper.mapping.obtained_at > result.mapping.obtained_at
    fake_igd.broken = True  # renewals fail from now on: the lease runs out
    await asyncio.sleep(2.0)
    assert mapper.mapping is None and changes[-1] is None
    await mapper.close()


async def test_demux_by_source(node: UdpEndpoint) -> None:
    gateway, port = await start_gateway("both")
    passed: list[tuple[bytes, Address]] = []
    mapper = PortMapper(node, server_port=port, protocols=("pcp",))
    mapper.install_receiver(lambda data, addr: passed.append((data, addr)))
    assert not mapper.owns((LO, port))  # no gateway yet
    await mapper.discover(LO)
    assert mapper.owns((LO, port)) and mapper.owns(("::ffff:127.0.0.1", port))
    assert not mapper.owns((LO, port + 1))
    stun_like = b"\x00\x01\x00\x00" + bytes(16)
    assert not mapper.receive(stun_like, (LO, 3478))
    assert mapper.receive(b"\x02junk", (LO, port))  # PCP-looking bytes from the gateway: ours
    other = await open_udp_endpoint(LO, 0)
    other.send(stun_like, node.local_address)
    for _ in range(50):
        if passed:
            break
        await asyncio.sleep(0.01)
    assert passed == [(stun_like, other.local_address)]
    other.close()
    await mapper.close()
    gateway.transport.close()  # type: ignore[union-attr]


async def test_no_gateway(node: UdpEndpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mapper_module, "default_gateway", lambda: None)
    result = await PortMapper(node).discover()
    assert result == DiscoveryResult(None, None, (), tuple(
        (p, "no gateway: none given and no default route") for p in ("pcp", "natpmp", "upnp")))
    with pytest.raises(ValueError):
        PortMapper(node, protocols=("stun",))  # type: ignore[arg-type]


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0100000A\t0003\t0\t0\t600\t00000000\t0\t0\t0
"""


def test_default_gateway_and_local_ip() -> None:
    assert default_gateway(ROUTES) == "192.168.1.1"
    assert default_gateway(ROUTES.splitlines()[0] + "\n") is None
    assert default_gateway("garbage\nx y z\n") is None
    assert local_ip_toward(LO) == LO
