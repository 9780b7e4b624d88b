"""RFC 7983 / RFC 9443 demultiplexing: what kind of packet is this, by its first byte.

One socket carries STUN, TURN ChannelData, QUIC and our gateway relay frames. The relay
frames use 48-49, inside the range RFC 7983 gives DTLS (20-63), which we never speak.
"""

from __future__ import annotations

from enum import Enum


class Kind(Enum):
    STUN = "stun"
    CHANNEL_DATA = "channel_data"
    RELAY = "relay"
    QUIC = "quic"
    UNKNOWN = "unknown"


RELAY_TO_GATEWAY = 0x30  # node -> gateway: forward this to a node id
RELAY_FROM_GATEWAY = 0x31  # gateway -> node: this came from a node id


def classify(data: bytes, *, from_turn_server: bool = False) -> Kind:
    if not data:
        return Kind.UNKNOWN
    b = data[0]
    if b <= 3:
        return Kind.STUN
    if b in (RELAY_TO_GATEWAY, RELAY_FROM_GATEWAY):
        return Kind.RELAY
    # 64-79 is both ChannelData and a QUIC short header: only the source tells them apart.
    if 64 <= b <= 79 and from_turn_server:
        return Kind.CHANNEL_DATA
    if 64 <= b <= 127 or b >= 192:
        return Kind.QUIC
    return Kind.UNKNOWN
