"""NAT-PMP (RFC 6886) messages as pure functions over bytes.

NAT-PMP is IPv4 only and tiny: every request is 2 or 12 bytes, every response 8, 12 or 16.
Responses carry the opcode plus 128, a result code and the gateway's "seconds since start of
epoch", which lets clients notice a gateway that rebooted and lost its mappings.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ...errors import InvalidValue
from .errors import MalformedMessage

VERSION = 0
SERVER_PORT = 5351

OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 128

# Result codes (RFC 6886 section 3.5).
SUCCESS = 0
UNSUPPORTED_VERSION = 1
NOT_AUTHORIZED = 2
NETWORK_FAILURE = 3
OUT_OF_RESOURCES = 4
UNSUPPORTED_OPCODE = 5
RESULT_NAMES = {
    SUCCESS: "success",
    UNSUPPORTED_VERSION: "unsupported version",
    NOT_AUTHORIZED: "not authorized / refused",
    NETWORK_FAILURE: "network failure",
    OUT_OF_RESOURCES: "out of resources",
    UNSUPPORTED_OPCODE: "unsupported opcode",
}

_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Request:
    """A client request: opcode 0 (external address) or 1/2 (map UDP/TCP)."""

    opcode: int
    internal_port: int = 0
    external_port: int = 0  # the suggested external port
    lifetime: int = 0  # requested lifetime in seconds; 0 deletes


@dataclass(frozen=True)
class Response:
    """A gateway response. Fields beyond `epoch` are only meaningful on success.

    `external_ip` belongs to opcode 0 answers; the ports and lifetime to opcode 1/2 answers.
    """

    opcode: int  # the request's opcode (without the 128 bit)
    result: int
    epoch: int
    external_ip: str | None = None
    internal_port: int = 0
    external_port: int = 0
    lifetime: int = 0

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


def result_name(code: int) -> str:
    return RESULT_NAMES.get(code, f"result code {code}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise InvalidValue(f"port out of range: {port}")


def encode_request(request: Request) -> bytes:
    if request.opcode == OP_EXTERNAL_ADDRESS:
        return bytes((VERSION, OP_EXTERNAL_ADDRESS))
    if request.opcode not in (OP_MAP_UDP, OP_MAP_TCP):
        raise InvalidValue(f"not a NAT-PMP request opcode: {request.opcode}")
    _check_port(request.internal_port)
    _check_port(request.external_port)
    if not 0 <= request.lifetime <= _U32:
        raise InvalidValue(f"lifetime out of range: {request.lifetime}")
    return struct.pack("!BBHHHI", VERSION, request.opcode, 0, request.internal_port,
                       request.external_port, request.lifetime)


def external_address_request() -> bytes:
    return encode_request(Request(OP_EXTERNAL_ADDRESS))


def map_request(internal_port: int, external_port: int, lifetime: int, *,
                opcode: int = OP_MAP_UDP) -> bytes:
    """A mapping request; lifetime 0 with external port 0 asks to delete (RFC 6886 3.4)."""
    return encode_request(Request(opcode, internal_port, external_port, lifetime))


def decode_request(data: bytes) -> Request:
    """Parse a request (the gateway side; used by test servers). Raises MalformedMessage."""
    if len(data) < 2 or data[0] != VERSION:
        raise MalformedMessage("not a NAT-PMP request")
    opcode = data[1]
    if opcode == OP_EXTERNAL_ADDRESS:
        if len(data) != 2:
            raise MalformedMessage("external address request must be 2 bytes")
        return Request(opcode)
    if opcode not in (OP_MAP_UDP, OP_MAP_TCP):
        raise MalformedMessage(f"unknown NAT-PMP opcode {opcode}")
    if len(data) != 12:
        raise MalformedMessage("map request must be 12 bytes")
    _, _, _, internal, external, lifetime = struct.unpack("!BBHHHI", data)
    return Request(opcode, internal, external, lifetime)


def encode_response(response: Response) -> bytes:
    """Serialise a response: 8 bytes for errors, 12 for opcode 0, 16 for maps."""
    if response.opcode not in (OP_EXTERNAL_ADDRESS, OP_MAP_UDP, OP_MAP_TCP):
        raise InvalidValue(f"not a NAT-PMP opcode: {response.opcode}")
    if not 0 <= response.result <= 0xFFFF or not 0 <= response.epoch <= _U32:
        raise InvalidValue("result code or epoch out of range")
    head = struct.pack("!BBHI", VERSION, RESPONSE_BIT | response.opcode, response.result,
                       response.epoch)
    if response.result != SUCCESS:
        return head
    if response.opcode == OP_EXTERNAL_ADDRESS:
        ip = ipaddress.IPv4Address(response.external_ip or "0.0.0.0")
        return head + ip.packed
    _check_port(response.internal_port)
    _check_port(response.external_port)
    if not 0 <= response.lifetime <= _U32:
        raise InvalidValue(f"lifetime out of range: {response.lifetime}")
    return head + struct.pack("!HHI", response.internal_port, response.external_port,
                              response.lifetime)


def decode_response(data: bytes) -> Response:
    """Parse a gateway response. Raises MalformedMessage and nothing else.

    Error answers may stop after the 8-byte header (RFC 6886 3.5); trailing bytes beyond a
    message's size are ignored, as the RFC asks receivers to be liberal.
    """
    if len(data) < 8:
        raise MalformedMessage("NAT-PMP response shorter than 8 bytes")
    version, op, result, epoch = struct.unpack_from("!BBHI", data)
    if version != VERSION:
        raise MalformedMessage(f"NAT-PMP version {version}, expected 0")
    if not op & RESPONSE_BIT:
        raise MalformedMessage("a request, not a response")
    opcode = op & ~RESPONSE_BIT
    if opcode not in (OP_EXTERNAL_ADDRESS, OP_MAP_UDP, OP_MAP_TCP):
        # Unsupported-opcode answers echo whatever we sent; we only ever send these three.
        raise MalformedMessage(f"unknown NAT-PMP response opcode {opcode}")
    if result != SUCCESS:
        return Response(opcode, result, epoch)
    if opcode == OP_EXTERNAL_ADDRESS:
        if len(data) < 12:
            raise MalformedMessage("external address response shorter than 12 bytes")
        return Response(opcode, result, epoch, external_ip=str(ipaddress.IPv4Address(data[8:12])))
    if len(data) < 16:
        raise MalformedMessage("map response shorter than 16 bytes")
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    return Response(opcode, result, epoch, internal_port=internal, external_port=external,
                    lifetime=lifetime)
