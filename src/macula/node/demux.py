"""Where a datagram on the node's one socket goes (RFC 7983 by first byte, then by source).

A pure decision: the node core acts on the answer. From the gateway come relay frames,
the control connection's QUIC and the answers of its STUN sockets; from a configured STUN
server its answers; from a TURN server whatever the allocation carries; from anyone else,
ICE checks (STUN) or session QUIC on a direct path.
"""

from __future__ import annotations

import enum

from ..net.endpoint import Address
from ..wire.demux import RELAY_FROM_GATEWAY, Kind, classify
from ..wire.relay import FROM_GATEWAY_HEADER


class Route(enum.Enum):
    RELAYED = "relayed"  # a peer's packet the gateway relayed
    CONTROL = "control"  # the gateway control connection
    STUN = "stun"  # ICE, or an answer from the gateway's STUN sockets
    STUN_SERVER = "stun_server"  # a configured STUN server's answer
    TURN = "turn"  # from one of our TURN servers
    DIRECT = "direct"  # session QUIC straight from a peer
    MALFORMED = "malformed"


def route(data: bytes, addr: Address, *, gateway: Address, stun_server_answer: bool,
          turn_server: bool) -> tuple[Route, Kind]:
    """The route, and the first-byte kind (counted under its name when malformed).
    `stun_server_answer` and `turn_server` say what the source and transaction ids show."""
    if addr == gateway:
        if data and data[0] == RELAY_FROM_GATEWAY:
            return Route.RELAYED, Kind.RELAY
        kind = classify(data)
        if kind is Kind.QUIC:
            return Route.CONTROL, kind
        return (Route.STUN if kind is Kind.STUN else Route.MALFORMED), kind
    if stun_server_answer:
        return Route.STUN_SERVER, Kind.STUN
    if turn_server:
        return Route.TURN, classify(data, from_turn_server=True)
    kind = classify(data)
    if kind is Kind.STUN:
        return Route.STUN, kind
    if kind is Kind.QUIC:
        return Route.DIRECT, kind
    return Route.MALFORMED, kind


def costly_datagram(data: bytes) -> bool:
    """A QUIC handshake packet, straight from a peer or relayed: a TLS flight to process,
    slow next to an ICE check or a session's data (Driver's `costly`)."""
    if data and data[0] == RELAY_FROM_GATEWAY:
        return len(data) > FROM_GATEWAY_HEADER and bool(data[FROM_GATEWAY_HEADER] & 0x80)
    return bool(data) and bool(data[0] & 0x80) and classify(data) is Kind.QUIC
