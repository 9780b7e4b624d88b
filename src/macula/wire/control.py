"""The gateway control protocol: small JSON messages on a QUIC stream, length-prefixed.

Frame: 4-byte big-endian length, then one UTF-8 JSON object with a "type". JSON keeps the
protocol readable in captures and trivially extensible; every message is checked against a
schema so a hostile peer can only get its message dropped (and counted), never a crash.
Decoded messages are frozen dataclasses; unknown types and unknown fields are refused
here, once, so the rest of the code reads typed fields and never a raw dict.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import InvalidValue

# In every hello; the gateway refuses other versions. 2: nodes leave QUIC's padding off
# the relay (session/padding.py) and put it back on arrival, which a version-1 node would
# not do (it drops the short Initial): the two must not share a gateway.
PROTOCOL_VERSION = 2
MAX_MESSAGE = 64 * 1024
_LEN = struct.Struct("!I")
M = TypeVar("M")



# --------------------------------------------------------------------------- the messages
# One frozen dataclass per message type: what a field may hold is its annotation, a
# field without a default is required, and nothing else is accepted.


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    version: int
    node_id: str
    nat_traversal: bool = True
    local_addresses: list[str] = field(default_factory=list)
    hard_nat: bool = False


@dataclass(frozen=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    node_id: str
    observed: str
    relay_token: str
    keepalive_ms: int
    node_timeout_ms: int
    stun: list[str] = field(default_factory=list)
    # The address of a live connection with the same key that this registration replaced
    # (another process using this node's key), or "".
    replaced: str = ""


@dataclass(frozen=True)
class TurnCredentials:
    """Gateway -> node: time-limited credentials for the deployment's TURN servers (the
    TURN REST API scheme coturn's use-auth-secret checks), valid for `ttl_ms`."""

    TYPE: ClassVar[str] = "turn_credentials"
    servers: list[str]
    username: str
    credential: str
    ttl_ms: int


@dataclass(frozen=True)
class PeerDenied:
    """Gateway -> node: the CA network's ACL keeps this node from `node_id` (the gateway
    relays, coordinates and forwards nothing between them)."""

    TYPE: ClassVar[str] = "peer_denied"
    node_id: str
    message: str


@dataclass(frozen=True)
class MembersRevoked:
    """Gateway -> nodes of a CA network: these nodes' memberships stopped counting
    (revoked or expired); close sessions with them."""

    TYPE: ClassVar[str] = "members_revoked"
    node_ids: list[str]


@dataclass(frozen=True)
class TurnCredentialsRequest:
    """Node -> gateway: the credentials are half-way through their life; fresh ones."""

    TYPE: ClassVar[str] = "turn_credentials_request"


@dataclass(frozen=True)
class Keepalive:
    TYPE: ClassVar[str] = "keepalive"
    seq: int


@dataclass(frozen=True)
class KeepaliveAck:
    TYPE: ClassVar[str] = "keepalive_ack"
    seq: int
    observed: str


@dataclass(frozen=True)
class Lookup:
    TYPE: ClassVar[str] = "lookup"
    req: int
    node_id: str


@dataclass(frozen=True)
class LookupResult:
    TYPE: ClassVar[str] = "lookup_result"
    req: int
    node_id: str
    online: bool
    observed: str | None = None


@dataclass(frozen=True)
class PeerOffline:
    TYPE: ClassVar[str] = "peer_offline"
    node_id: str


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    req: int | None = None


@dataclass(frozen=True)
class NatInfo:
    """Phase 2: what NAT behaviour discovery found."""

    TYPE: ClassVar[str] = "nat_info"
    nat_type: str
    mapping: str = "unknown"
    filtering: str = "unknown"
    port_allocation: str = "unknown"
    public: str | None = None


@dataclass(frozen=True)
class PunchRequest:
    TYPE: ClassVar[str] = "punch_request"
    peer: str
    attempt: int


@dataclass(frozen=True)
class Punch:
    """The gateway's order: start ICE with `peer` now-ish, with these credentials."""

    TYPE: ClassVar[str] = "punch"
    peer: str
    attempt: int
    ufrag: str
    pwd: str
    remote_ufrag: str
    remote_pwd: str
    candidates: list[str]
    start_in_ms: float
    requester: bool
    peer_nat: str | None = None
    peer_allocation: str | None = None
    peer_hard_nat: bool = False


@dataclass(frozen=True)
class Candidates:
    """Trickle ICE: candidate lines (RFC 8839) gathered after the punch order."""

    TYPE: ClassVar[str] = "candidates"
    peer: str
    ufrag: str
    lines: list[str]
    end: bool


@dataclass(frozen=True)
class PunchRefused:
    TYPE: ClassVar[str] = "punch_refused"
    peer: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PunchResult:
    TYPE: ClassVar[str] = "punch_result"
    peer: str
    attempt: int
    outcome: str
    reason: str
    upgrade_ms: float | None = None


@dataclass(frozen=True)
class Draining:
    """Gateway -> node: this gateway is about to stop; a node that knows other members of
    its cluster (node.gateways) moves to one now."""

    TYPE: ClassVar[str] = "draining"
    reason: str


ControlMessage = (Hello | Welcome | Keepalive | KeepaliveAck | Lookup | LookupResult
                  | PeerOffline | Error | NatInfo | PunchRequest | Punch | Candidates
                  | PunchRefused | PunchResult | TurnCredentials | TurnCredentialsRequest
                  | MembersRevoked | PeerDenied | Draining)
MESSAGES: dict[str, type[ControlMessage]] = {cls.TYPE: cls for cls in (
    Hello, Welcome, Keepalive, KeepaliveAck, Lookup, LookupResult, PeerOffline, Error,
    NatInfo, PunchRequest, Punch, Candidates, PunchRefused, PunchResult, TurnCredentials,
    TurnCredentialsRequest, MembersRevoked, PeerDenied, Draining)}

# What each annotation admits on the wire (bool is an int subclass: kept apart below).
_ADMITS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
    "list[str]": (list,), "str | None": (str, type(None)), "int | None": (int, type(None)),
    "float | None": (int, float, type(None)),
}
# type -> {field: (allowed python types, required)}: the schema, read off the dataclasses.
SCHEMAS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    kind: {f.name: (_ADMITS[str(f.type)],
                    f.default is MISSING and f.default_factory is MISSING)
           for f in fields(cls)}
    for kind, cls in MESSAGES.items()
}
_LISTS_OF_STR = {(kind, f.name) for kind, cls in MESSAGES.items() for f in fields(cls)
                 if str(f.type) == "list[str]"}


class ControlError(InvalidValue):
    """A control message that is not well formed; the receiver drops and counts it."""


class ControlStreamError(ControlError):
    """The stream's framing itself is broken; the connection cannot continue."""


def encode(message: ControlMessage | dict[str, Any]) -> bytes:
    if not isinstance(message, dict):
        message = to_dict(message)
    validate(message)
    return frame(json.dumps(message, separators=(",", ":")).encode())


def decode_body(body: bytes) -> ControlMessage:
    return parse(json_object(body, "control message"))


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """One message body as a JSON object, or ControlError saying why it is not one."""
    try:
        message = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, over-long integers and NaN/Infinity.
        raise ControlError(f"{what} is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError(f"{what} must be a JSON object")
    return message


def _no_constants(name: str) -> Any:
    raise InvalidValue(f"{name} is not a JSON number")


def validate(message: Any) -> None:
    if not isinstance(message, dict):
        raise ControlError("control message must be a JSON object")
    kind = message.get("type")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ControlError(f"unknown control message type {kind!r}")
    unknown = sorted(set(message) - set(schema) - {"type"})
    if unknown:
        raise ControlError(f"{kind}: unknown field {unknown[0]!r}")
    for name, (types, required) in schema.items():
        if name not in message:
            if required:
                raise ControlError(f"{kind}: missing field {name!r}")
            continue
        value = message[name]
        # bool is an int subclass in Python; keep the types apart.
        if isinstance(value, bool) and bool not in types:
            raise ControlError(f"{kind}.{name}: expected {types[0].__name__}, got bool")
        if not isinstance(value, types):
            raise ControlError(f"{kind}.{name}: expected {types[0].__name__}, got {type(value).__name__}")
        if (kind, name) in _LISTS_OF_STR and isinstance(value, list) \
                and not all(isinstance(v, str) for v in value):
            raise ControlError(f"{kind}.{name}: expected a list of strings")


def parse(message: dict[str, Any]) -> ControlMessage:
    """The typed message a checked JSON object stands for (ControlError if it is not one)."""
    validate(message)
    cls = MESSAGES[message["type"]]
    return cls(**{k: v for k, v in message.items() if k != "type"})


def to_dict(message: ControlMessage) -> dict[str, Any]:
    """The JSON object a typed message is sent as."""
    return {"type": message.TYPE, **asdict(message)}


def frame(body: bytes) -> bytes:
    """One message body with its length prefix (the framing both protocols share)."""
    if len(body) > MAX_MESSAGE:
        raise ControlError(f"control message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


class FrameDecoder(Generic[M]):
    """Reassembles length-prefixed messages from stream data, in order; `decode` reads one
    body and raises ControlError for a bad one."""

    def __init__(self, decode: Callable[[bytes], M]) -> None:
        self._buffer = bytearray()
        self._decode = decode
        self.malformed = 0

    def feed(self, data: bytes) -> Iterator[M]:
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
                yield self._decode(body)
            except ControlError:
                self.malformed += 1


class ControlDecoder(FrameDecoder[ControlMessage]):
    """The node control protocol's messages from a stream."""

    def __init__(self) -> None:
        super().__init__(decode_body)
