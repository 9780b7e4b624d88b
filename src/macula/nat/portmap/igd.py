"""UPnP-IGD as pure functions: SSDP search messages, the device description, SOAP.

Only what a control point needs to map one UDP port: find a WANIPConnection (v2 or v1, or
WANPPPConnection:1 on DSL boxes) in the description, and build / read the SOAP calls
AddPortMapping, AddAnyPortMapping (v2), DeletePortMapping and GetExternalIPAddress.
Everything read from the network goes through `xmlsafe` and raises MalformedMessage only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

from ...errors import InvalidValue
from . import xmlsafe
from .errors import MalformedMessage

SSDP_GROUP = "239.255.255.250"
SSDP_PORT = 1900
MAX_SSDP = 8192
ST_IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
# Search targets: a v2 device answers v1 searches too, so IGD:1 finds both generations.
SEARCH_TARGETS = (ST_IGD1, WANIP1)
SERVICE_PREFERENCE = (WANIP2, WANIP1, WANPPP1)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"

# UPnP error codes the mapper reacts to (WANIPConnection:2 section 2.4).
ERR_INVALID_ACTION = 401
ERR_NOT_IMPLEMENTED = 602
ERR_NO_SUCH_ENTRY = 714
ERR_CONFLICT = 718
ERR_SAME_PORT_VALUES_REQUIRED = 724
ERR_ONLY_PERMANENT_LEASES = 725
ERR_NO_PORT_MAPS_AVAILABLE = 728
ERR_CONFLICT_WITH_OTHER_MECHANISMS = 729


@dataclass(frozen=True)
class SsdpResponse:
    location: str
    st: str
    usn: str
    server: str


@dataclass(frozen=True)
class IgdService:
    """A port-mapping service of an IGD: its type and absolute control URL."""

    service_type: str
    control_url: str

    @property
    def version(self) -> int:
        return 2 if self.service_type == WANIP2 else 1


@dataclass(frozen=True)
class SoapReply:
    """A SOAP answer: the action's out-arguments, or the UPnPError the device raised."""

    values: dict[str, str]
    fault: tuple[int, str] | None = None


def msearch(st: str, mx: int = 2, host: str = SSDP_GROUP, port: int = SSDP_PORT) -> bytes:
    """An SSDP M-SEARCH request for search target `st` (UPnP Device Architecture 1.1)."""
    if any(c in st for c in "\r\n") or not 1 <= mx <= 5:
        raise InvalidValue("bad search target or MX")
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {host}:{port}\r\nMAN: \"ssdp:discover\"\r\n"
            f"MX: {mx}\r\nST: {st}\r\n\r\n").encode("ascii")


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """A unicast answer to M-SEARCH ("HTTP/1.1 200 OK" + headers). Raises MalformedMessage."""
    if len(data) > MAX_SSDP:
        raise MalformedMessage("SSDP message too large")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessage("SSDP message is not ASCII") from None
    lines = text.split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise MalformedMessage("not an SSDP search response")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep:
            raise MalformedMessage("SSDP header line without a colon")
        headers.setdefault(name.strip().upper(), value.strip())
    location = headers.get("LOCATION", "")
    if not location:
        raise MalformedMessage("SSDP response without LOCATION")
    return SsdpResponse(location, headers.get("ST", ""), headers.get("USN", ""),
                        headers.get("SERVER", ""))


def check_url(url: str, host: str) -> str:
    """`url` if it is plain http to the IP literal `host`, else MalformedMessage.

    The description and control URLs must point back at the device that answered on the
    LAN, so a hostile answer cannot steer our HTTP requests anywhere else.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
        url_host = ipaddress.ip_address(parts.hostname or "")
        want = ipaddress.ip_address(host)
    except ValueError:
        raise MalformedMessage(f"unusable URL {url!r}") from None
    if parts.scheme != "http" or url_host != want or port == 0:
        raise MalformedMessage(f"URL {url!r} does not point at the device at {host}")
    return url


def parse_device_description(data: bytes, location: str) -> list[IgdService]:
    """The port-mapping services in a root device description, preferred first."""
    root = xmlsafe.parse(data)
    if root.tag != "root":
        raise MalformedMessage("device description root element is not <root>")
    base = xmlsafe.child_text(root, "URLBase") or location
    found: list[IgdService] = []
    for service in root.iter("service"):
        stype = xmlsafe.child_text(service, "serviceType")
        control = xmlsafe.child_text(service, "controlURL")
        if stype in SERVICE_PREFERENCE and control:
            try:
                url = urljoin(base, control)
            except ValueError:
                raise MalformedMessage(f"unusable control URL {control!r}") from None
            found.append(IgdService(stype, url))
    found.sort(key=lambda s: SERVICE_PREFERENCE.index(s.service_type))
    return found


def soap_request(service_type: str, action: str,
                 args: list[tuple[str, str]]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one SOAP action call."""
    body = "".join(f"<{name}>{escape(value)}</{name}>" for name, value in args)
    envelope = (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="{SOAP_ENV}" '
                f's:encodingStyle="{SOAP_ENCODING}"><s:Body>'
                f'<u:{action} xmlns:u="{escape(service_type)}">{body}</u:{action}>'
                "</s:Body></s:Envelope>\r\n").encode()
    headers = {"Content-Type": 'text/xml; charset="utf-8"',
               "SOAPAction": f'"{service_type}#{action}"'}
    return envelope, headers


def parse_soap_reply(data: bytes, action: str) -> SoapReply:
    """Read `<actionResponse>` arguments, or the UPnPError of a SOAP fault."""
    root = xmlsafe.parse(data)
    body = next((el for el in root if el.tag == "Body"), None) if root.tag == "Envelope" else None
    if body is None:
        raise MalformedMessage("SOAP reply without Envelope/Body")
    for element in body:
        if element.tag == f"{action}Response":
            return SoapReply({child.tag: (child.text or "").strip() for child in element})
        if element.tag == "Fault":
            error = next(element.iter("UPnPError"), None)
            if error is None:
                raise MalformedMessage("SOAP fault without UPnPError detail")
            code_text = xmlsafe.child_text(error, "errorCode") or ""
            if not (code_text.isascii() and code_text.isdigit()) or len(code_text) > 6:
                raise MalformedMessage(f"bad UPnP errorCode {code_text!r}")
            return SoapReply({}, (int(code_text), xmlsafe.child_text(error, "errorDescription") or ""))
    raise MalformedMessage(f"SOAP reply has neither {action}Response nor Fault")


def add_port_mapping_args(*, external_port: int, internal_port: int, internal_client: str,
                          lease: int, description: str) -> list[tuple[str, str]]:
    """Arguments of AddPortMapping and AddAnyPortMapping (the same list, same order)."""
    return [
        ("NewRemoteHost", ""),
        ("NewExternalPort", str(external_port)),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", str(internal_port)),
        ("NewInternalClient", internal_client),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", description),
        ("NewLeaseDuration", str(lease)),
    ]


def delete_port_mapping_args(external_port: int) -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP")]


def port_value(values: dict[str, str], name: str) -> int:
    text = values.get(name, "")
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 0 < int(text) <= 0xFFFF:
        raise MalformedMessage(f"bad {name} {text!r}")
    return int(text)


def ip_value(values: dict[str, str], name: str) -> str:
    try:
        return str(ipaddress.IPv4Address(values.get(name, "")))
    except ValueError:
        raise MalformedMessage(f"bad {name} {values.get(name)!r}") from None
