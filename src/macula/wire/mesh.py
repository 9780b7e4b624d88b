"""What gateways of one cluster say to each other.

Control rides a QUIC connection between the two gateways (ALPN "macula-mesh/1", both keys
pinned), in the framing of the node control protocol (wire/control.py): a `mesh_hello`
each way, then `mesh_deliver` messages carrying a node control message for a node homed at
the receiver.

Relay frames go gateway to gateway as plain datagrams, one hop, never through the store:

    0x32 | sending gateway id (16) | source node id (16) | destination node id (16)
         | payload | tag (16)

The tag is HMAC-SHA256 over everything before it, truncated to 16 bytes, under the key
the receiving gateway handed the sender in its hello (over the authenticated connection):
a node, or anyone else off the mesh, cannot make a gateway forward a frame. A replayed
frame only repeats an end-to-end QUIC packet, which the receiving node's QUIC drops.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from typing import Any, ClassVar

from ..errors import InvalidValue
from ..identity import NODE_ID_BYTES
from .control import ControlError, FrameDecoder, frame, json_object
from .relay import MAX_PAYLOAD

RELAY_MESH = 0x32  # gateway -> gateway: a relay frame for a node homed at the receiver
MESH_KEY_BYTES = 32
TAG_BYTES = 16
MESH_HEADER = 1 + 3 * NODE_ID_BYTES


class MeshFrameError(InvalidValue):
    """A mesh relay frame that is cut short, too large or not signed by the claimed peer."""


@dataclass(frozen=True, slots=True)
class MeshRelayFrame:
    gateway: bytes  # the sending gateway's raw id
    source: bytes  # raw node ids
    destination: bytes
    payload: bytes


def encode_mesh_relay(key: bytes, gateway: bytes, source: bytes, destination: bytes,
                      payload: bytes) -> bytes:
    if not (len(gateway) == len(source) == len(destination) == NODE_ID_BYTES):
        raise MeshFrameError("bad id length in a mesh relay frame")
    if not payload or len(payload) > MAX_PAYLOAD:
        raise MeshFrameError(f"payload of {len(payload)} bytes: 1 to {MAX_PAYLOAD} relayed")
    body = bytes((RELAY_MESH,)) + gateway + source + destination + payload
    return body + hmac.digest(key, body, sha256)[:TAG_BYTES]


def mesh_sender(data: bytes) -> bytes:
    """The claimed sending gateway's raw id (checked by `decode_mesh_relay` with its key)."""
    if len(data) <= MESH_HEADER + TAG_BYTES or data[0] != RELAY_MESH:
        raise MeshFrameError("not a mesh relay frame")
    return data[1:1 + NODE_ID_BYTES]


def decode_mesh_relay(key: bytes, data: bytes) -> MeshRelayFrame:
    gateway = mesh_sender(data)
    if len(data) - MESH_HEADER - TAG_BYTES > MAX_PAYLOAD:
        raise MeshFrameError("mesh relay payload too large")
    body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
    if not hmac.compare_digest(hmac.digest(key, body, sha256)[:TAG_BYTES], tag):
        raise MeshFrameError("mesh relay frame with a bad tag")
    ids = 1 + NODE_ID_BYTES
    return MeshRelayFrame(gateway, body[ids:ids + NODE_ID_BYTES],
                          body[ids + NODE_ID_BYTES:MESH_HEADER], body[MESH_HEADER:])


# --------------------------------------------------------------------------- control
@dataclass(frozen=True)
class MeshHello:
    """First message each way: who I am (the QUIC handshake proved the key) and the key
    you sign the relay frames you send me with."""

    TYPE: ClassVar[str] = "mesh_hello"
    version: int
    gateway_id: str
    relay_key: str  # hex, MESH_KEY_BYTES


@dataclass(frozen=True)
class MeshDeliver:
    """A node control message for `node`, homed at the receiver. A punch order carries
    `start_at_ms`: when, counted from its arrival, both nodes' checks are to start; the
    receiver subtracts half its own RTT to the node."""

    TYPE: ClassVar[str] = "mesh_deliver"
    node: str
    message: dict[str, Any] = field(default_factory=dict)
    start_at_ms: float | None = None
    # With a punch request: the requesting node's directory record as its home has it
    # now (the receiver's view of the directory may lag by a feed message).
    record: str | None = None


MESH_VERSION = 1
MeshMessage = MeshHello | MeshDeliver


def encode_mesh(message: MeshMessage) -> bytes:
    return frame(json.dumps({"type": message.TYPE, **asdict(message)},
                            separators=(",", ":")).encode())


def decode_mesh(body: bytes) -> MeshMessage:
    """One mesh message, every field checked (ControlError otherwise; the embedded node
    message is checked by wire/control.py when it is delivered)."""
    obj = json_object(body, "mesh message")
    kind = obj.pop("type", None)
    if kind == MeshHello.TYPE and set(obj) == {"version", "gateway_id", "relay_key"}:
        if (type(obj["version"]) is int and isinstance(obj["gateway_id"], str)
                and isinstance(obj["relay_key"], str)):
            return MeshHello(obj["version"], obj["gateway_id"], obj["relay_key"])
    elif kind == MeshDeliver.TYPE and {"node", "message"} <= set(obj) <= {
            "node", "message", "start_at_ms", "record"}:
        start, record = obj.get("start_at_ms"), obj.get("record")
        if (isinstance(obj["node"], str) and isinstance(obj["message"], dict)
                and (start is None or (type(start) in (int, float)))
                and (record is None or isinstance(record, str))):
            return MeshDeliver(obj["node"], obj["message"],
                               float(start) if start is not None else None, record)
    raise ControlError(f"not a mesh message: {str(kind)[:32]!r} with fields {sorted(obj)[:8]}")


class MeshDecoder(FrameDecoder[MeshMessage]):
    def __init__(self) -> None:
        super().__init__(decode_mesh)
