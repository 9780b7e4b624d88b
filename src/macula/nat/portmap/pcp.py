"""PCP (RFC 6887) messages as pure functions over bytes: the common header, MAP, ANNOUNCE.

Addresses travel as 128-bit fields; IPv4 addresses use the IPv4-mapped IPv6 form
(::ffff:a.b.c.d), and "no address" is ::ffff:0.0.0.0 for IPv4 (RFC 6887 section 5).
Decoding turns a mapped address back into dotted IPv4 text so callers never see the
wrapping. Every message is a multiple of 4 bytes and at most 1100 bytes long.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ...errors import InvalidValue
from .errors import MalformedMessage

VERSION = 2
SERVER_PORT = 5351
MAX_MESSAGE = 1100
HEADER_SIZE = 24
MAP_SIZE = 36
NONCE_SIZE = 12
RESPONSE_BIT = 0x80

OP_ANNOUNCE = 0
OP_MAP = 1

PROTO_UDP = 17
PROTO_TCP = 6

# Result codes (RFC 6887 section 7.4).
SUCCESS = 0
UNSUPP_VERSION = 1
NOT_AUTHORIZED = 2
MALFORMED_REQUEST = 3
UNSUPP_OPCODE = 4
UNSUPP_OPTION = 5
MALFORMED_OPTION = 6
NETWORK_FAILURE = 7
NO_RESOURCES = 8
UNSUPP_PROTOCOL = 9
USER_EX_QUOTA = 10
CANNOT_PROVIDE_EXTERNAL = 11
ADDRESS_MISMATCH = 12
EXCESSIVE_REMOTE_PEERS = 13
RESULT_NAMES = {
    SUCCESS: "SUCCESS",
    UNSUPP_VERSION: "UNSUPP_VERSION",
    NOT_AUTHORIZED: "NOT_AUTHORIZED",
    MALFORMED_REQUEST: "MALFORMED_REQUEST",
    UNSUPP_OPCODE: "UNSUPP_OPCODE",
    UNSUPP_OPTION: "UNSUPP_OPTION",
    MALFORMED_OPTION: "MALFORMED_OPTION",
    NETWORK_FAILURE: "NETWORK_FAILURE",
    NO_RESOURCES: "NO_RESOURCES",
    UNSUPP_PROTOCOL: "UNSUPP_PROTOCOL",
    USER_EX_QUOTA: "USER_EX_QUOTA",
    CANNOT_PROVIDE_EXTERNAL: "CANNOT_PROVIDE_EXTERNAL",
    ADDRESS_MISMATCH: "ADDRESS_MISMATCH",
    EXCESSIVE_REMOTE_PEERS: "EXCESSIVE_REMOTE_PEERS",
}
# Errors that go away by themselves; the response lifetime says when to retry (7.4).
SHORT_LIVED = frozenset({NETWORK_FAILURE, NO_RESOURCES, USER_EX_QUOTA, CANNOT_PROVIDE_EXTERNAL})

OPTION_THIRD_PARTY = 1
OPTION_PREFER_FAILURE = 2
OPTION_FILTER = 3

NO_ADDRESS_V4 = "0.0.0.0"  # encoded as ::ffff:0.0.0.0
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Option:
    code: int
    data: bytes = b""


@dataclass(frozen=True)
class MapData:
    """MAP opcode data: suggested values in a request, assigned values in a response."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_ip: str


@dataclass(frozen=True)
class Request:
    opcode: int
    lifetime: int
    client_ip: str
    map: MapData | None = None  # present exactly when opcode is MAP
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class Response:
    opcode: int
    result: int
    lifetime: int  # on errors: how long the error is expected to last
    epoch: int
    map: MapData | None = None  # None for ANNOUNCE and for errors that carry no MAP data
    options: tuple[Option, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


def result_name(code: int) -> str:
    return RESULT_NAMES.get(code, f"result code {code}")


def pack_address(text: str) -> bytes:
    """128-bit PCP address field: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def unpack_address(field: bytes) -> str:
    ip = ipaddress.IPv6Address(field)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def _check_u16(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFF:
        raise InvalidValue(f"{what} out of range: {value}")


def _encode_map(data: MapData) -> bytes:
    if len(data.nonce) != NONCE_SIZE:
        raise InvalidValue("a PCP nonce is 12 bytes")
    if not 0 <= data.protocol <= 0xFF:
        raise InvalidValue(f"protocol out of range: {data.protocol}")
    _check_u16(data.internal_port, "internal port")
    _check_u16(data.external_port, "external port")
    return (data.nonce + struct.pack("!B3xHH", data.protocol, data.internal_port,
                                     data.external_port) + pack_address(data.external_ip))


def _encode_options(options: tuple[Option, ...]) -> bytes:
    out = b""
    for opt in options:
        if not 0 <= opt.code <= 0xFF or len(opt.data) > 0xFFFF:
            raise InvalidValue("option code or length out of range")
        out += struct.pack("!BxH", opt.code, len(opt.data)) + opt.data + bytes(-len(opt.data) % 4)
    return out


def _finish(message: bytes) -> bytes:
    if len(message) > MAX_MESSAGE:
        raise InvalidValue(f"PCP message longer than {MAX_MESSAGE} bytes")
    return message


def _check_opcode_data(opcode: int, data: MapData | None) -> None:
    if opcode == OP_MAP and data is None:
        raise InvalidValue("a MAP message needs MAP data")
    if opcode != OP_MAP and data is not None:
        raise InvalidValue("only MAP messages carry MAP data")


def encode_request(request: Request) -> bytes:
    if not 0 <= request.opcode <= 0x7F:
        raise InvalidValue(f"opcode out of range: {request.opcode}")
    if not 0 <= request.lifetime <= _U32:
        raise InvalidValue(f"lifetime out of range: {request.lifetime}")
    _check_opcode_data(request.opcode, request.map)
    head = struct.pack("!BBHI", VERSION, request.opcode, 0, request.lifetime)
    body = _encode_map(request.map) if request.map is not None else b""
    return _finish(head + pack_address(request.client_ip) + body + _encode_options(request.options))


def encode_response(response: Response) -> bytes:
    if not 0 <= response.opcode <= 0x7F or not 0 <= response.result <= 0xFF:
        raise InvalidValue("opcode or result code out of range")
    if not 0 <= response.lifetime <= _U32 or not 0 <= response.epoch <= _U32:
        raise InvalidValue("lifetime or epoch out of range")
    if response.opcode == OP_ANNOUNCE and response.map is not None:
        raise InvalidValue("ANNOUNCE carries no MAP data")
    if response.opcode == OP_MAP and response.map is None and response.result == SUCCESS:
        raise InvalidValue("a successful MAP response needs MAP data")
    head = struct.pack("!BBxBII12x", VERSION, RESPONSE_BIT | response.opcode, response.result,
                       response.lifetime, response.epoch)
    body = _encode_map(response.map) if response.map is not None else b""
    return _finish(head + body + _encode_options(response.options))


def map_request(*, client_ip: str, nonce: bytes, internal_port: int, lifetime: int,
                external_port: int = 0, external_ip: str = NO_ADDRESS_V4,
                protocol: int = PROTO_UDP, options: tuple[Option, ...] = ()) -> bytes:
    """A MAP request; lifetime 0 with the same nonce deletes the mapping (RFC 6887 15)."""
    return encode_request(Request(
        OP_MAP, lifetime, client_ip,
        MapData(nonce, protocol, internal_port, external_port, external_ip), options))


def announce_request(client_ip: str) -> bytes:
    return encode_request(Request(OP_ANNOUNCE, 0, client_ip))


def _check_size(data: bytes) -> None:
    if len(data) < HEADER_SIZE:
        raise MalformedMessage("PCP message shorter than 24 bytes")
    if len(data) > MAX_MESSAGE or len(data) % 4:
        raise MalformedMessage("PCP message length not a multiple of 4 or over 1100 bytes")


def _decode_map(data: bytes, offset: int) -> MapData:
    nonce = bytes(data[offset:offset + NONCE_SIZE])
    protocol, internal, external = struct.unpack_from("!B3xHH", data, offset + NONCE_SIZE)
    ip = unpack_address(bytes(data[offset + 20:offset + 36]))
    return MapData(nonce, protocol, internal, external, ip)


def _decode_options(data: bytes, offset: int) -> tuple[Option, ...]:
    options: list[Option] = []
    while offset < len(data):
        if offset + 4 > len(data):
            raise MalformedMessage("truncated PCP option header")
        code, length = struct.unpack_from("!BxH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise MalformedMessage("PCP option longer than the message")
        options.append(Option(code, bytes(data[offset + 4:end])))
        offset = end + (-length % 4)
    return tuple(options)


def _decode_body(opcode: int, data: bytes, *, require_map: bool) -> tuple[MapData | None, tuple[Option, ...]]:
    if opcode == OP_ANNOUNCE:
        return None, _decode_options(data, HEADER_SIZE)
    if opcode != OP_MAP:
        raise MalformedMessage(f"unsupported PCP opcode {opcode}")
    if len(data) < HEADER_SIZE + MAP_SIZE:
        if require_map:
            raise MalformedMessage("MAP message without its 36 bytes of opcode data")
        return None, ()
    return _decode_map(data, HEADER_SIZE), _decode_options(data, HEADER_SIZE + MAP_SIZE)


def decode_response(data: bytes) -> Response:
    """Parse a PCP response. Raises MalformedMessage and nothing else.

    Error responses may omit the MAP data (then `map` is None); reserved bits are ignored.
    """
    data = bytes(data)
    _check_size(data)
    version, op, result, lifetime, epoch = struct.unpack_from("!BBxBII", data)
    if version != VERSION:
        raise MalformedMessage(f"PCP version {version}, expected 2")
    if not op & RESPONSE_BIT:
        raise MalformedMessage("a request, not a response")
    opcode = op & 0x7F
    body, options = _decode_body(opcode, data, require_map=result == SUCCESS)
    return Response(opcode, result, lifetime, epoch, body, options)


def decode_request(data: bytes) -> Request:
    """Parse a PCP request (the server side; used by test servers). Raises MalformedMessage."""
    data = bytes(data)
    _check_size(data)
    version, op, lifetime = struct.unpack_from("!BBxxI", data)
    if version != VERSION:
        raise MalformedMessage(f"PCP version {version}, expected 2")
    if op & RESPONSE_BIT:
        raise MalformedMessage("a response, not a request")
    client_ip = unpack_address(data[8:24])
    body, options = _decode_body(op, data, require_map=True)
    return Request(op, lifetime, client_ip, body, options)
