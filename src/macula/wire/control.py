"""The gateway control protocol: small JSON messages on a QUIC stream, length-prefixed.

Frame: 4-byte big-endian length, then one UTF-8 JSON object with a "type". JSON keeps the
protocol readable in captures and trivially extensible; every message is checked against a
schema so a hostile peer can only get its message dropped (and counted), never a crash.
Unknown fields are ignored so newer nodes can talk to older gateways.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidValue

PROTOCOL_VERSION = 1  # in every hello; the gateway refuses other versions
MAX_MESSAGE = 64 * 1024
_LEN = struct.Struct("!I")

_STR, _INT, _BOOL, _LIST = (str,), (int,), (bool,), (list,)
_OPT_STR = (str, type(None))
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

# type -> {field: (allowed python types, required)}
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"version": (_INT, True), "node_id": (_STR, True),
              "nat_traversal": (_BOOL, False), "local_addresses": (_LIST, False),
              "hard_nat": (_BOOL, False)},
    "welcome": {"node_id": (_STR, True), "observed": (_STR, True), "relay_token": (_STR, True),
                "keepalive_ms": (_INT, True), "node_timeout_ms": (_INT, True),
                "stun": (_LIST, False)},
    "keepalive": {"seq": (_INT, True)},
    "keepalive_ack": {"seq": (_INT, True), "observed": (_STR, True)},
    "lookup": {"req": (_INT, True), "node_id": (_STR, True)},
    "lookup_result": {"req": (_INT, True), "node_id": (_STR, True), "online": (_BOOL, True),
                      "observed": (_OPT_STR, False)},
    "peer_offline": {"node_id": (_STR, True)},
    "error": {"code": (_STR, True), "message": (_STR, True), "req": ((int, type(None)), False)},
    # Phase 2: NAT discovery results and coordinated hole punching.
    "nat_info": {"nat_type": (_STR, True), "mapping": (_STR, False), "filtering": (_STR, False),
                 "port_allocation": (_STR, False), "public": (_OPT_STR, False)},
    "punch_request": {"peer": (_STR, True), "attempt": (_INT, True)},
    "punch": {"peer": (_STR, True), "attempt": (_INT, True), "ufrag": (_STR, True),
              "pwd": (_STR, True), "remote_ufrag": (_STR, True), "remote_pwd": (_STR, True),
              "candidates": (_LIST, True), "start_in_ms": (_NUM, True),
              "requester": (_BOOL, True), "peer_nat": (_OPT_STR, False),
              "peer_allocation": (_OPT_STR, False), "peer_hard_nat": (_BOOL, False)},
    # Trickle ICE: candidate lines (RFC 8839) gathered after the punch order.
    "candidates": {"peer": (_STR, True), "ufrag": (_STR, True), "lines": (_LIST, True),
                   "end": (_BOOL, True)},
    "punch_refused": {"peer": (_STR, True), "attempt": (_INT, True), "reason": (_STR, True)},
    "punch_result": {"peer": (_STR, True), "attempt": (_INT, True), "outcome": (_STR, True),
                     "reason": (_STR, True), "upgrade_ms": (_OPT_NUM, False)},
}


class ControlError(InvalidValue):
    """A control message that is not well formed; the receiver drops and counts it."""


class ControlStreamError(ControlError):
    """The stream's framing itself is broken; the connection cannot continue."""


def encode(message: dict[str, Any]) -> bytes:
    validate(message)
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ControlError(f"control message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, over-long integers and NaN/Infinity.
        raise ControlError(f"control message is not JSON: {exc}") from None
    validate(message)
    return message  # type: ignore[no-any-return]  # validate() proved it a dict


def _no_constants(name: str) -> Any:
    raise InvalidValue(f"{name} is not a JSON number")


def validate(message: Any) -> None:
    if not isinstance(message, dict):
        raise ControlError("control message must be a JSON object")
    kind = message.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ControlError(f"unknown control message type {kind!r}")
    for field, (types, required) in schema.items():
        if field not in message:
            if required:
                raise ControlError(f"{kind}: missing field {field!r}")
            continue
        value = message[field]
        # bool is an int subclass in Python; keep the types apart.
        if isinstance(value, bool) and bool not in types:
            raise ControlError(f"{kind}.{field}: expected {types[0].__name__}, got bool")
        if not isinstance(value, types):
            raise ControlError(f"{kind}.{field}: expected {types[0].__name__}, got {type(value).__name__}")


class ControlDecoder:
    """Reassembles length-prefixed messages from stream data, in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.malformed = 0

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        """Yield each complete, valid message. Bad messages are counted and skipped;
        a bad length prefix raises ControlStreamError (framing is lost)."""
        self._buffer += data
        while len(self._buffer) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buffer)
            if length > MAX_MESSAGE:
                raise ControlStreamError(f"control frame of {length} bytes exceeds {MAX_MESSAGE}")
            if len(self._buffer) < _LEN.size + length:
                return
            body = bytes(self._buffer[_LEN.size:_LEN.size + length])
            del self._buffer[:_LEN.size + length]
            try:
                yield decode_body(body)
            except ControlError:
                self.malformed += 1
