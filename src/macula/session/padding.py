"""Handshake padding stays off the gateway relay (sans-IO, pure functions).

QUIC pads every datagram that carries an Initial packet to 1,200 bytes (RFC 9000 14.1):
the padding keeps a server from amplifying a spoofed client's traffic, and shows that the
path takes full-size datagrams. aioquic pads with zero bytes after the datagram's last
long-header packet, outside any encryption. On the gateway relay neither purpose holds: a
relay frame reaches only the registered node it names (token and source address checked)
and the node <-> gateway path carries full-size relay frames anyway. So a node cuts the
zeros before a datagram goes on the relay, and the receiving node puts them back before
its QUIC stack sees the datagram: QUIC's rules hold end to end, and a session's handshake
costs the relay about 1,900 bytes less (docs/PERFORMANCE.md).
"""

from __future__ import annotations

# RFC 9000 14.1's smallest datagram that may carry an Initial packet.
PADDED_SIZE = 1200
_LONG_HEADER = 0x80
_MAX_COALESCED = 4  # Initial, 0-RTT, Handshake, and one more: a datagram never holds more


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, offset after it); IndexError past the end."""
    first = data[at]
    length = 1 << (first >> 6)
    value = first & 0x3F
    for i in range(1, length):
        value = (value << 8) | data[at + i]
    return value, at + length


def _long_packet_end(data: bytes, at: int) -> int | None:
    """Where the long-header packet starting at `at` ends (its Length field says); None
    for a Version Negotiation packet, which has no Length. IndexError if the header runs
    past the datagram."""
    version = int.from_bytes(data[at + 1:at + 5], "big")
    if version == 0:
        return None
    offset = at + 5  # first byte, version
    offset += 1 + data[offset]  # destination connection id
    offset += 1 + data[offset]  # source connection id
    packet_type = (data[at] >> 4) & 0x3
    # Initial is type 0 in QUIC v1, type 1 in v2 (RFC 9369): only it carries a token.
    if packet_type == (1 if version == 0x6B3343CF else 0):
        token_length, offset = _varint(data, offset)
        offset += token_length
    length, offset = _varint(data, offset)
    return offset + length


def strip_padding(datagram: bytes) -> bytes:
    """The datagram without the zero bytes after its last long-header packet. Anything
    that does not parse as long-header packets followed by zeros is returned whole."""
    at: int | None = 0
    try:
        for _ in range(_MAX_COALESCED):
            if at is None or at >= len(datagram) or not datagram[at] & _LONG_HEADER:
                return datagram  # ends exactly, or a short-header packet fills the rest
            at = _long_packet_end(datagram, at)
            if at is None or at >= len(datagram):
                return datagram
            if datagram[at] == 0:
                return datagram[:at] if not datagram[at:].strip(b"\x00") else datagram
    except IndexError:  # a header cut short: not a datagram QUIC built
        return datagram
    return datagram


def restore_padding(datagram: bytes) -> bytes:
    """A relayed handshake datagram padded to PADDED_SIZE again with zeros (which QUIC
    skips after the last packet), so the receiving stack sees what the sender's built."""
    if len(datagram) >= PADDED_SIZE or not datagram or not datagram[0] & _LONG_HEADER:
        return datagram
    return datagram + bytes(PADDED_SIZE - len(datagram))
