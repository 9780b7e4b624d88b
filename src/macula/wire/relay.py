"""Gateway relay frames: opaque end-to-end QUIC packets addressed by node id.

    to gateway:   0x30 | relay token (8) | destination node id (16) | payload
    from gateway: 0x31 | source node id (16) | payload

The token is handed to the node over its authenticated control connection; together with
the source address it proves the sender is a registered node, so nobody else can ride the
relay. The payload is an end-to-end encrypted QUIC packet: the gateway never sees plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidValue
from ..identity import NODE_ID_BYTES
from .demux import RELAY_FROM_GATEWAY, RELAY_TO_GATEWAY

TOKEN_BYTES = 8
TO_GATEWAY_HEADER = 1 + TOKEN_BYTES + NODE_ID_BYTES
FROM_GATEWAY_HEADER = 1 + NODE_ID_BYTES
# Largest payload we relay: a QUIC packet we sized for 1200 plus slack for larger paths.
MAX_PAYLOAD = 1452


class RelayFrameError(InvalidValue):
    pass


@dataclass(frozen=True, slots=True)
class ToGateway:
    token: bytes
    destination: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class FromGateway:
    source: bytes
    payload: bytes


def encode_to_gateway(token: bytes, destination: bytes, payload: bytes) -> bytes:
    if len(token) != TOKEN_BYTES or len(destination) != NODE_ID_BYTES:
        raise RelayFrameError("bad token or destination length")
    if len(payload) > MAX_PAYLOAD:
        raise RelayFrameError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return b"\x30" + token + destination + payload


def decode_to_gateway(data: bytes) -> ToGateway:
    if len(data) <= TO_GATEWAY_HEADER or data[0] != RELAY_TO_GATEWAY:
        raise RelayFrameError("not a relay frame to the gateway")
    if len(data) - TO_GATEWAY_HEADER > MAX_PAYLOAD:
        raise RelayFrameError("relay payload too large")
    return ToGateway(data[1:9], data[9:TO_GATEWAY_HEADER], data[TO_GATEWAY_HEADER:])


def encode_from_gateway(source: bytes, payload: bytes) -> bytes:
    if len(source) != NODE_ID_BYTES:
        raise RelayFrameError("bad source length")
    return b"\x31" + source + payload


def decode_from_gateway(data: bytes) -> FromGateway:
    if len(data) <= FROM_GATEWAY_HEADER or data[0] != RELAY_FROM_GATEWAY:
        raise RelayFrameError("not a relay frame from the gateway")
    if len(data) - FROM_GATEWAY_HEADER > MAX_PAYLOAD:
        raise RelayFrameError("relay payload too large")
    return FromGateway(data[1:FROM_GATEWAY_HEADER], data[FROM_GATEWAY_HEADER:])


def rewrite_for_destination(frame: bytes, source: bytes) -> bytes:
    """Gateway hot path: turn a validated to-gateway frame into the from-gateway frame."""
    return b"\x31" + source + frame[TO_GATEWAY_HEADER:]
