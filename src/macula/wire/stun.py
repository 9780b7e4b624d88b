"""STUN messages: aioice.stun underneath, hardened for bytes from strangers.

aioice's parser trusts its input: it skips the header checks RFC 8489 requires, lets the
last of duplicated attributes win, and its attribute decoders raise struct.error,
UnicodeDecodeError and friends on hostile values. `parse_message` puts the structural
checks in front of it, converts every failure into `StunError`, and reports unknown
comprehension-required attributes so a server can answer 420. The builders cover what the
NAT behaviour discovery (RFC 5780) client and server exchange.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Iterable
from typing import Any

from aioice import stun as _aioice
from aioice.stun import Class, Message, Method

from macula.net.endpoint import Address

from ..errors import InvalidValue
from ..version import __version__

# The STUN and TURN port servers use when an address names none (RFC 8489).
STUN_DEFAULT_PORT = 3478

__all__ = [
    "CHANGE_IP",
    "CHANGE_PORT",
    "Class",
    "Message",
    "Method",
    "StunError",
    "StunIntegrityError",
    "StunUnknownAttributes",
    "binding_error",
    "binding_request",
    "binding_success",
    "is_stun",
    "mapped_address",
    "parse_message",
]

MAGIC_COOKIE = _aioice.COOKIE
HEADER_LENGTH = _aioice.HEADER_LENGTH
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)

# CHANGE-REQUEST flags (RFC 5780 section 7.2).
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

_RESPONSE_PORT = 0x0027  # RFC 5780 section 7.5
_MESSAGE_INTEGRITY = 0x0008
_FINGERPRINT = 0x8028
_UNKNOWN_ATTRIBUTES = 0x000A
_ERROR_CODE = 0x0009
_SOFTWARE_MAX = 763  # RFC 8489 section 14.14: fewer than 128 characters, at most 763 bytes
_REASON_MAX = 763  # RFC 8489 section 14.8, same bound

DEFAULT_SOFTWARE = f"macula {__version__}"


class StunError(InvalidValue):
    """The datagram is not a well-formed STUN message (or failed its checks)."""


class StunIntegrityError(StunError):
    """MESSAGE-INTEGRITY is missing or wrong for the key we were given (a server answers 401)."""


class StunUnknownAttributes(StunError):
    """Comprehension-required attributes we do not understand (a server answers 420).

    `message` is the rest of the message, parsed, so the 420 can echo its transaction id.
    """

    def __init__(self, attributes: list[int], message: Message) -> None:
        super().__init__(
            "unknown comprehension-required attributes: "
            + ", ".join(f"0x{t:04x}" for t in attributes)
        )
        self.attributes = attributes
        self.message = message


def _pack_unknown_attributes(value: Iterable[int]) -> bytes:
    return b"".join(struct.pack("!H", t) for t in value)


def _unpack_unknown_attributes(data: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise InvalidValue("STUN UNKNOWN-ATTRIBUTES length is odd")
    return tuple(t for (t,) in struct.iter_unpack("!H", data))


# aioice 0.13 knows CHANGE-REQUEST, RESPONSE-ORIGIN and OTHER-ADDRESS but not
# UNKNOWN-ATTRIBUTES. Registering it in aioice's own tables (rather than forking the
# encoder) keeps Message objects serialisable with bytes(); aioice's own users only gain a
# decoder that raises ValueError, which they already catch.
if _UNKNOWN_ATTRIBUTES not in _aioice.ATTRIBUTES_BY_TYPE:
    _entry: _aioice.AttributeEntry = (
        _UNKNOWN_ATTRIBUTES,
        "UNKNOWN-ATTRIBUTES",
        _pack_unknown_attributes,
        _unpack_unknown_attributes,
    )
    _aioice.ATTRIBUTES.append(_entry)
    _aioice.ATTRIBUTES_BY_TYPE[_UNKNOWN_ATTRIBUTES] = _entry
    _aioice.ATTRIBUTES_BY_NAME["UNKNOWN-ATTRIBUTES"] = _entry


def _pack_response_port(port: int) -> bytes:
    return struct.pack("!HH", port, 0)


def _unpack_response_port(data: bytes) -> int:
    if len(data) != 4:
        raise InvalidValue("STUN RESPONSE-PORT is 4 bytes")
    port: int = struct.unpack("!HH", data)[0]
    return port


# RESPONSE-PORT (RFC 5780): the binding-lifetime test asks for the answer at another port
# of its own address. Registered the same way.
if _RESPONSE_PORT not in _aioice.ATTRIBUTES_BY_TYPE:
    _port_entry: _aioice.AttributeEntry = (
        _RESPONSE_PORT, "RESPONSE-PORT", _pack_response_port, _unpack_response_port)
    _aioice.ATTRIBUTES.append(_port_entry)
    _aioice.ATTRIBUTES_BY_TYPE[_RESPONSE_PORT] = _port_entry
    _aioice.ATTRIBUTES_BY_NAME["RESPONSE-PORT"] = _port_entry


def is_stun(data: bytes) -> bool:
    """Cheap demux test: first two bits zero (RFC 7983: first byte 0-3) and the magic cookie."""
    return len(data) >= HEADER_LENGTH and data[0] < 4 and data[4:8] == _COOKIE_BYTES


def parse_message(data: bytes, *, integrity_key: bytes | None = None) -> Message:
    """Parse one STUN datagram or raise `StunError` (never anything else).

    With `integrity_key`, MESSAGE-INTEGRITY must be present and valid
    (`StunIntegrityError` otherwise). Checks run in RFC 8489 order: structure and
    FINGERPRINT, then integrity, then unknown comprehension-required attributes.
    """
    try:
        return _parse(bytes(data), integrity_key)
    except StunError:
        raise
    except Exception as exc:  # aioice's decoders raise whatever their input provokes
        raise StunError(f"malformed STUN message: {exc!r}") from exc


def _parse(data: bytes, integrity_key: bytes | None) -> Message:
    if len(data) < HEADER_LENGTH:
        raise StunError("shorter than a STUN header")
    message_type, length, cookie = struct.unpack("!HHI", data[0:8])
    if message_type & 0xC000:
        raise StunError("first two bits are not zero")
    if cookie != MAGIC_COOKIE:
        raise StunError("wrong magic cookie")
    if length % 4:
        raise StunError("length is not a multiple of 4")
    if len(data) != HEADER_LENGTH + length:
        raise StunError("length does not match the datagram")

    # Walk the attributes ourselves: aioice tolerates truncated values and trailing junk.
    unknown: list[int] = []
    first_seen: dict[int, bytes] = {}
    duplicated: set[int] = set()
    after_integrity = False
    pos = HEADER_LENGTH
    while pos < len(data):
        if pos + 4 > len(data):
            raise StunError("truncated attribute header")
        attr_type, attr_len = struct.unpack("!HH", data[pos : pos + 4])
        end = pos + 4 + attr_len
        if end + _aioice.padding_length(attr_len) > len(data):
            raise StunError(f"attribute 0x{attr_type:04x} overruns the message")
        value = data[pos + 4 : end]
        if attr_type == _FINGERPRINT:
            if attr_len != 4:
                raise StunError("FINGERPRINT has the wrong length")
            if end != len(data):
                raise StunError("FINGERPRINT is not the last attribute")
        elif attr_type == _MESSAGE_INTEGRITY and not after_integrity:
            if attr_len != 20:
                raise StunError("MESSAGE-INTEGRITY has the wrong length")
            after_integrity = True
        elif not after_integrity:
            # Attributes after MESSAGE-INTEGRITY are ignored (RFC 8489 section 14.5).
            if attr_type == _ERROR_CODE and attr_type not in first_seen:
                # aioice would fold a number >= 100 into the class: 4 + 255 -> "655".
                if attr_len < 4 or not 3 <= value[2] <= 6 or value[3] > 99:
                    raise StunError("ERROR-CODE out of range")
            if attr_type in first_seen:
                duplicated.add(attr_type)
            elif attr_type in _aioice.ATTRIBUTES_BY_TYPE:
                first_seen[attr_type] = value
            elif attr_type < 0x8000 and attr_type not in unknown:
                unknown.append(attr_type)
        pos = end + _aioice.padding_length(attr_len)

    message = _aioice.parse_message(data)  # also verifies FINGERPRINT

    # Only the first occurrence of an attribute counts (RFC 8489 section 14); aioice keeps
    # the last one.
    for attr_type in duplicated:
        if attr_type in first_seen:
            _, name, _, unpack = _aioice.ATTRIBUTES_BY_TYPE[attr_type]
            if unpack is _aioice.unpack_xor_address:
                message.attributes[name] = unpack(first_seen[attr_type], message.transaction_id)
            else:
                message.attributes[name] = unpack(first_seen[attr_type])

    if integrity_key is not None and not message.check_message_integrity(integrity_key):
        raise StunIntegrityError("MESSAGE-INTEGRITY missing or wrong")
    if unknown:
        raise StunUnknownAttributes(unknown, message)
    return message


def mapped_address(message: Message) -> Address | None:
    """XOR-MAPPED-ADDRESS, or the legacy MAPPED-ADDRESS from RFC 3489-era servers."""
    value: Any = message.attributes.get("XOR-MAPPED-ADDRESS") or message.attributes.get(
        "MAPPED-ADDRESS"
    )
    return (value[0], value[1]) if value is not None else None


def _finish(message: Message) -> bytes:
    message.add_fingerprint()
    return bytes(message)


def binding_request(
    transaction_id: bytes | None = None,
    *,
    change_ip: bool = False,
    change_port: bool = False,
    response_port: int | None = None,
    software: str | None = DEFAULT_SOFTWARE,
) -> bytes:
    """A Binding request with FINGERPRINT, and CHANGE-REQUEST and RESPONSE-PORT (RFC 5780)
    when asked."""
    if transaction_id is None:
        transaction_id = os.urandom(12)
    if len(transaction_id) != 12:
        raise InvalidValue("a STUN transaction id is 12 bytes")
    attributes: dict[str, Any] = {}
    if software:
        attributes["SOFTWARE"] = _check_text(software, _SOFTWARE_MAX)
    if change_ip or change_port:
        attributes["CHANGE-REQUEST"] = (CHANGE_IP if change_ip else 0) | (
            CHANGE_PORT if change_port else 0
        )
    if response_port is not None:
        if not 1 <= response_port <= 65535:
            raise InvalidValue("RESPONSE-PORT is 1..65535")
        attributes["RESPONSE-PORT"] = response_port
    return _finish(Message(Method.BINDING, Class.REQUEST, transaction_id, attributes))


def binding_success(
    request: Message,
    mapped: Address,
    *,
    response_origin: Address | None = None,
    other_address: Address | None = None,
    software: str | None = None,
) -> bytes:
    """A Binding success response: XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS."""
    attributes: dict[str, Any] = {"XOR-MAPPED-ADDRESS": _check_address(mapped)}
    if response_origin is not None:
        attributes["RESPONSE-ORIGIN"] = _check_address(response_origin)
    if other_address is not None:
        attributes["OTHER-ADDRESS"] = _check_address(other_address)
    if software:
        attributes["SOFTWARE"] = _check_text(software, _SOFTWARE_MAX)
    return _finish(
        Message(request.message_method, Class.RESPONSE, request.transaction_id, attributes)
    )


def binding_error(
    request: Message, code: int, reason: str, unknown: Iterable[int] = ()
) -> bytes:
    """An error response to `request` (same method), with UNKNOWN-ATTRIBUTES for a 420."""
    if not 300 <= code <= 699:
        raise InvalidValue("STUN error codes are 300-699")
    attributes: dict[str, Any] = {"ERROR-CODE": (code, _check_text(reason, _REASON_MAX))}
    unknown = tuple(unknown)
    if unknown:
        attributes["UNKNOWN-ATTRIBUTES"] = unknown
    return _finish(Message(request.message_method, Class.ERROR, request.transaction_id, attributes))


def _check_address(addr: Address) -> Address:
    # Fail at the builder with a clear error instead of deep inside aioice's packer.
    ipaddress.ip_address(addr[0])
    if not 0 <= addr[1] <= 0xFFFF:
        raise InvalidValue(f"port out of range: {addr[1]}")
    return (addr[0], addr[1])


def _check_text(text: str, limit: int) -> str:
    if len(text.encode("utf8")) > limit:
        raise InvalidValue("STUN text attribute too long")
    return text
