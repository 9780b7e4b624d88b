"""Port-mapping codecs: NAT-PMP, PCP, SSDP / device description / SOAP, safe XML.

Byte layouts come from RFC 6886 and RFC 6887; the SSDP answer, root description and SOAP
replies are shaped like what miniupnpd 2.3.1 (Debian 12) sent in the kernel lab.
Hypothesis checks that encoding round-trips and that no input makes a parser raise
anything but MalformedMessage.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.nat.portmap import MalformedMessage, igd, natpmp, pcp, xmlsafe

# -- NAT-PMP ---------------------------------------------------------------------------------


def test_natpmp_request_layouts() -> None:
    assert natpmp.external_address_request() == b"\x00\x00"
    # RFC 6886 3.3: version, opcode 1 (UDP), reserved, internal, suggested external, lifetime.
    assert natpmp.map_request(40000, 40001, 7200) == bytes.fromhex("0001 0000 9c40 9c41 00001c20")
    assert natpmp.map_request(40000, 0, 0) == bytes.fromhex("0001 0000 9c40 0000 00000000")
    assert natpmp.map_request(80, 80, 60, opcode=natpmp.OP_MAP_TCP)[1] == 2
    with pytest.raises(ValueError):
        natpmp.map_request(70000, 0, 10)
    with pytest.raises(ValueError):
        natpmp.encode_request(natpmp.Request(7))


def test_natpmp_response_layouts() -> None:
    # What miniupnpd answered in the lab: external address, then the UDP mapping.
    addr = natpmp.decode_response(bytes.fromhex("0080 0000 00000002 c633640b"))
    assert addr == natpmp.Response(0, natpmp.SUCCESS, 2, external_ip="198.51.100.11")
    mapped = natpmp.decode_response(bytes.fromhex("0081 0000 00000002 9c40 9c40 00000e10"))
    assert (mapped.internal_port, mapped.external_port, mapped.lifetime) == (40000, 40000, 3600)
    assert mapped.ok
    # Errors may stop after the 8-byte header (RFC 6886 3.5).
    refused = natpmp.decode_response(bytes.fromhex("0081 0002 00000010"))
    assert (refused.result, refused.epoch, refused.ok) == (natpmp.NOT_AUTHORIZED, 16, False)
    assert natpmp.result_name(refused.result) == "not authorized / refused"
    assert natpmp.encode_response(refused) == bytes.fromhex("0081 0002 00000010")


@pytest.mark.parametrize("data, why", [
    (b"", "shorter"), (b"\x00\x80\x00\x00\x00\x00\x00", "shorter"),
    (bytes.fromhex("0280 0000 00000000 00000000"), "version"),
    (bytes.fromhex("0001 0000 00000000 00000000"), "request"),
    (bytes.fromhex("0083 0000 00000000"), "opcode"),
    (bytes.fromhex("0080 0000 00000000"), "shorter than 12"),
    (bytes.fromhex("0081 0000 00000000 0000"), "shorter than 16"),
])
def test_natpmp_rejects(data: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        natpmp.decode_response(data)


ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))

natpmp_requests = st.one_of(
    st.just(natpmp.Request(natpmp.OP_EXTERNAL_ADDRESS)),
    st.builds(natpmp.Request, st.sampled_from([natpmp.OP_MAP_UDP, natpmp.OP_MAP_TCP]),
              ports, ports, u32))
natpmp_responses = st.one_of(
    st.builds(natpmp.Response, st.just(0), st.just(0), u32, external_ip=ipv4),
    st.builds(natpmp.Response, st.sampled_from([1, 2]), st.just(0), u32,
              internal_port=ports, external_port=ports, lifetime=u32),
    st.builds(natpmp.Response, st.sampled_from([0, 1, 2]), st.integers(1, 0xFFFF), u32))


@settings(max_examples=300, deadline=None)
@given(natpmp_requests, natpmp_responses)
def test_natpmp_round_trip(request: natpmp.Request, response: natpmp.Response) -> None:
    assert natpmp.decode_request(natpmp.encode_request(request)) == request
    assert natpmp.decode_response(natpmp.encode_response(response)) == response
    wire = natpmp.encode_response(response)
    assert natpmp.encode_response(natpmp.decode_response(wire)) == wire


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_natpmp_parsers_only_raise_malformed(data: bytes) -> None:
    for parse in (natpmp.decode_response, natpmp.decode_request):
        try:
            parse(data)
        except MalformedMessage:
            pass


# -- PCP ---------------------------------------------------------------------------------------

NONCE = bytes(range(1, 13))


def test_pcp_map_request_layout() -> None:
    wire = pcp.map_request(client_ip="192.168.1.2", nonce=NONCE, internal_port=40000,
                           lifetime=7200, external_port=40000)
    assert len(wire) == 60  # 24-byte header + 36 bytes of MAP data
    version, opcode, reserved, lifetime = struct.unpack_from("!BBHI", wire)
    assert (version, opcode, reserved, lifetime) == (2, 1, 0, 7200)
    assert wire[8:24] == bytes(10) + b"\xff\xff" + bytes([192, 168, 1, 2])  # IPv4-mapped
    assert wire[24:36] == NONCE
    assert wire[36] == 17 and wire[37:40] == bytes(3)  # UDP, reserved
    assert struct.unpack_from("!HH", wire, 40) == (40000, 40000)
    assert wire[44:60] == bytes(10) + b"\xff\xff" + bytes(4)  # "no address": ::ffff:0.0.0.0
    assert pcp.decode_request(wire) == pcp.Request(
        pcp.OP_MAP, 7200, "192.168.1.2",
        pcp.MapData(NONCE, 17, 40000, 40000, "0.0.0.0"))
    assert pcp.announce_request("10.0.0.2") == bytes.fromhex("02000000 00000000") + pcp.pack_address("10.0.0.2")


def test_pcp_map_response_and_errors() -> None:
    body = NONCE + struct.pack("!B3xHH", 17, 40000, 40001) + pcp.pack_address("198.51.100.11")
    head = struct.pack("!BBxBII12x", 2, 0x81, 0, 7200, 5)
    response = pcp.decode_response(head + body)
    assert response.ok and response.map == pcp.MapData(NONCE, 17, 40000, 40001, "198.51.100.11")
    assert (response.lifetime, response.epoch) == (7200, 5)
    # An error may carry only the header; then there is no MAP data.
    short = pcp.decode_response(struct.pack("!BBxBII12x", 2, 0x81, pcp.UNSUPP_VERSION, 1800, 5))
    assert short.map is None and short.result == pcp.UNSUPP_VERSION and not short.ok
    assert pcp.result_name(pcp.ADDRESS_MISMATCH) == "ADDRESS_MISMATCH"
    assert pcp.NETWORK_FAILURE in pcp.SHORT_LIVED and pcp.NOT_AUTHORIZED not in pcp.SHORT_LIVED
    announce = pcp.decode_response(struct.pack("!BBxBII12x", 2, 0x80, 0, 0, 3))
    assert announce.opcode == pcp.OP_ANNOUNCE and announce.map is None
    ipv6 = pcp.decode_response(head + body[:20] + ipaddress.IPv6Address("2001:db8::1").packed)
    assert ipv6.map is not None and ipv6.map.external_ip == "2001:db8::1"


@pytest.mark.parametrize("data, why", [
    (bytes(20), "shorter than 24"),
    (bytes(26), "multiple of 4"),
    (bytes(1104), "multiple of 4"),
    (struct.pack("!BBxBII12x", 1, 0x81, 0, 0, 0), "version 1"),
    (struct.pack("!BBxBII12x", 2, 0x01, 0, 0, 0), "a request"),
    (struct.pack("!BBxBII12x", 2, 0x82, 0, 0, 0), "opcode 2"),
    (struct.pack("!BBxBII12x", 2, 0x81, 0, 0, 0), "36 bytes"),
    (struct.pack("!BBxBII12x", 2, 0x80, 0, 0, 0) + struct.pack("!BxH", 1, 8), "longer"),
])
def test_pcp_rejects(data: bytes, why: str) -> None:
    with pytest.raises(MalformedMessage, match=why):
        pcp.decode_response(data)


def test_pcp_encoder_checks() -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        pcp.map_request(client_ip="10.0.0.2", nonce=b"short", internal_port=1, lifetime=1)
    with pytest.raises(ValueError, match="1100"):
        pcp.encode_request(pcp.Request(pcp.OP_ANNOUNCE, 0, "10.0.0.2",
                                       options=(pcp.Option(1, bytes(1100)),)))
    with pytest.raises(ValueError, match="MAP data"):
        pcp.encode_request(pcp.Request(pcp.OP_MAP, 0, "10.0.0.2"))


addresses = st.one_of(ipv4, st.integers(0, 2**128 - 1).map(
    lambda n: pcp.unpack_address(n.to_bytes(16, "big"))))
map_data = st.builds(pcp.MapData, st.binary(min_size=12, max_size=12), st.integers(0, 255),
                     ports, ports, addresses)
options = st.lists(st.builds(pcp.Option, st.integers(0, 255), st.binary(max_size=24)),
                   max_size=3).map(tuple)
pcp_requests = st.one_of(
    st.builds(pcp.Request, st.just(pcp.OP_MAP), u32, addresses, map_data, options),
    st.builds(pcp.Request, st.just(pcp.OP_ANNOUNCE), u32, addresses, st.none(), options))
pcp_responses = st.one_of(
    st.builds(pcp.Response, st.just(pcp.OP_MAP), st.integers(0, 255), u32, u32, map_data, options),
    st.builds(pcp.Response, st.just(pcp.OP_MAP), st.integers(1, 255), u32, u32, st.none()),
    st.builds(pcp.Response, st.just(pcp.OP_ANNOUNCE), st.integers(0, 255), u32, u32, st.none(),
              options))


@settings(max_examples=300, deadline=None)
@given(pcp_requests, pcp_responses)
def test_pcp_round_trip(request: pcp.Request, response: pcp.Response) -> None:
    wire = pcp.encode_request(request)
    assert len(wire) % 4 == 0
    assert pcp.decode_request(wire) == request
    assert pcp.encode_request(pcp.decode_request(wire)) == wire
    back = pcp.encode_response(response)
    assert pcp.decode_response(back) == response
    assert pcp.encode_response(pcp.decode_response(back)) == back


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=120),
                 st.binary(max_size=100).map(lambda b: b"\x02\x81\x00\x00" + b + bytes(-len(b) % 4))))
def test_pcp_parsers_only_raise_malformed(data: bytes) -> None:
    for parse in (pcp.decode_response, pcp.decode_request):
        try:
            parse(data)
        except MalformedMessage:
            pass


# -- UPnP-IGD ------------------------------------------------------------------------------------

SSDP_ANSWER = (
    b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:service:WANIPConnection:1\r\n"
    b"USN: uuid:888396ae-de16-4a5e-a522-04b29f3e840f::urn:schemas-upnp-org:service:WANIPConnection:1\r\n"
    b"EXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n"
    b"LOCATION: http://192.168.1.1:38829/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n01-NLS: 1795593012\r\n\r\n')

ROOT_DESC = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0" configId="1337"><specVersion><major>1</major>
<minor>1</minor></specVersion><device>
<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList><deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANDevice:2</deviceType><deviceList><device>
<deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:2</deviceType><serviceList>
<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL>
</service><service><serviceType>urn:schemas-upnp-org:service:WANIPv6FirewallControl:1</serviceType>
<controlURL>/ctl/IP6FCtl</controlURL></service></serviceList></device></deviceList></device>
</deviceList></device></root>"""

EXTIP_REPLY = (
    b'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
    b'<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:2">'
    b"<NewExternalIPAddress>198.51.100.11</NewExternalIPAddress>"
    b"</u:GetExternalIPAddressResponse></s:Body></s:Envelope>")

FAULT_REPLY = (
    b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
    b's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
    b"<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
    b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
    b"<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail>"
    b"</s:Fault></s:Body></s:Envelope>")


def test_msearch_and_ssdp_answer() -> None:
    request = igd.msearch(igd.ST_IGD1)
    assert request.startswith(b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert b'MAN: "ssdp:discover"\r\n' in request and request.endswith(b"\r\n\r\n")
    with pytest.raises(ValueError):
        igd.msearch("x\r\nEvil: 1")
    answer = igd.parse_ssdp_response(SSDP_ANSWER)
    assert answer.location == "http://192.168.1.1:38829/rootDesc.xml"
    assert answer.st == igd.WANIP1 and "MiniUPnPd" in answer.server
    with pytest.raises(MalformedMessage, match="LOCATION"):
        igd.parse_ssdp_response(b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n")
    with pytest.raises(MalformedMessage, match="search response"):
        igd.parse_ssdp_response(b"NOTIFY * HTTP/1.1\r\nLOCATION: http://1.2.3.4/\r\n\r\n")


def test_urls_must_point_back_at_the_device() -> None:
    assert igd.check_url("http://192.168.1.1:5000/x", "192.168.1.1")
    for url in ("http://192.168.1.9:5000/x", "https://192.168.1.1/x", "http://router.lan/x",
                "file:///etc/passwd", "http://192.168.1.1:99999/", "http://[::1]:80/"):
        with pytest.raises(MalformedMessage):
            igd.check_url(url, "192.168.1.1")


def test_device_description_finds_wanipconnection() -> None:
    services = igd.parse_device_description(ROOT_DESC, "http://192.168.1.1:38829/rootDesc.xml")
    assert services == [igd.IgdService(igd.WANIP2, "http://192.168.1.1:38829/ctl/IPConn")]
    assert services[0].version == 2
    v1 = ROOT_DESC.replace(b"WANIPConnection:2", b"WANIPConnection:1")
    based = v1.replace(b"<specVersion>", b"<URLBase>http://192.168.1.1:1234/</URLBase><specVersion>")
    assert igd.parse_device_description(based, "http://192.168.1.1:38829/rootDesc.xml") == [
        igd.IgdService(igd.WANIP1, "http://192.168.1.1:1234/ctl/IPConn")]
    with pytest.raises(MalformedMessage):
        igd.parse_device_description(b"<html/>", "http://192.168.1.1/")


def test_soap_request_and_replies() -> None:
    args = igd.add_port_mapping_args(external_port=40000, internal_port=40000,
                                     internal_client="192.168.1.2", lease=3600,
                                     description="a<b")
    body, headers = igd.soap_request(igd.WANIP2, "AddPortMapping", args)
    assert headers["SOAPAction"] == '"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"'
    root = xmlsafe.parse(body)
    call = root[0][0]
    assert call.tag == "AddPortMapping"
    assert xmlsafe.child_text(call, "NewPortMappingDescription") == "a<b"
    assert [c.tag for c in call][:3] == ["NewRemoteHost", "NewExternalPort", "NewProtocol"]
    reply = igd.parse_soap_reply(EXTIP_REPLY, "GetExternalIPAddress")
    assert reply.fault is None and igd.ip_value(reply.values, "NewExternalIPAddress") == "198.51.100.11"
    fault = igd.parse_soap_reply(FAULT_REPLY, "AddPortMapping")
    assert fault.fault == (718, "ConflictInMappingEntry") and fault.values == {}
    with pytest.raises(MalformedMessage, match="neither"):
        igd.parse_soap_reply(EXTIP_REPLY, "AddPortMapping")
    with pytest.raises(MalformedMessage):
        igd.port_value({"NewReservedPort": "\u00b2"}, "NewReservedPort")
    assert igd.port_value({"NewReservedPort": "40001"}, "NewReservedPort") == 40001


@pytest.mark.parametrize("doc", [
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><r>&b;</r>',
    b'<!DOCTYPE r SYSTEM "http://192.0.2.1/evil.dtd"><r/>',
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
    b"<r>&undefined;</r>",
    b"<r><unclosed></r>",
    b"",
    b"<r/>" + b" " * (xmlsafe.MAX_XML + 1),
])
def test_xml_refuses_dtds_entities_and_junk(doc: bytes) -> None:
    with pytest.raises(MalformedMessage):
        xmlsafe.parse(doc)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: f"<Envelope><Body>{t}</Body></Envelope>".encode()),
    st.text(max_size=200).map(lambda t: ("HTTP/1.1 200 OK\r\n" + t).encode("utf-8", "replace"))))
def test_upnp_parsers_only_raise_malformed(data: bytes) -> None:
    for parse in (igd.parse_ssdp_response,
                  lambda d: igd.parse_device_description(d, "http://192.168.1.1/"),
                  lambda d: igd.parse_soap_reply(d, "AddPortMapping"),
                  xmlsafe.parse):
        try:
            parse(data)
        except MalformedMessage:
            pass
