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

from .mux import QuicHeaderError, parse_header

# RFC 9000 14.1's smallest datagram that may carry an Initial packet.
PADDED_SIZE = 1200
_LONG_HEADER = 0x80
_MAX_COALESCED = 4  # Initial, 0-RTT, Handshake, and one more: a datagram never holds more


def strip_padding(datagram: bytes) -> bytes:
    """The datagram without the zero bytes after its last long-header packet. Anything
    that does not parse as long-header packets followed by zeros is returned whole."""
    at = 0
    for _ in range(_MAX_COALESCED):
        if at >= len(datagram) or not datagram[at] & _LONG_HEADER:
            return datagram  # ends exactly, or a short-header packet fills the rest
        try:
            # A long header's Length field says where its packet ends (a Version
            # Negotiation packet, which has none, runs to the datagram's end).
            at += parse_header(datagram[at:]).packet_length
        except QuicHeaderError:  # a header cut short: not a datagram QUIC built
            return datagram
        if at < len(datagram) and datagram[at] == 0:
            return datagram[:at] if not datagram[at:].strip(b"\x00") else datagram
    return datagram


def restore_padding(datagram: bytes) -> bytes:
    """A relayed handshake datagram padded to PADDED_SIZE again with zeros (which QUIC
    skips after the last packet), so the receiving stack sees what the sender's built."""
    if len(datagram) >= PADDED_SIZE or not datagram or not datagram[0] & _LONG_HEADER:
        return datagram
    return datagram + bytes(PADDED_SIZE - len(datagram))
