"""What a node's sans-IO core tells the application layer, as aioquic's events do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..identity import NodeId
from ..nat.binding_lifetime import BindingLifetime
from ..net.endpoint import Address

# What carries a session's packets; "relay" is the gateway, always there underneath.
PathKind = Literal["relay", "direct", "turn"]


@dataclass(frozen=True, slots=True)
class Registered:
    """The gateway accepted us; it sees us at `observed`."""
    observed: Address


@dataclass(frozen=True, slots=True)
class GatewayLost:
    reason: str


@dataclass(frozen=True, slots=True)
class GatewayRefused:
    """The gateway's key is not the one pinned for its address: it presented `presented`,
    we expected `expected`. The node keeps retrying (with backoff) but never registers."""

    expected: NodeId
    presented: NodeId


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    peer: NodeId
    initiator: bool


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """A session could not be established (peer offline, wrong key, timeout)."""
    peer: NodeId
    error: Exception


@dataclass(frozen=True, slots=True)
class SessionClosed:
    peer: NodeId
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    peer: NodeId
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamOpened:
    peer: NodeId
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamData:
    peer: NodeId
    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class PingAnswered:
    """The peer acknowledged a QUIC PING sent with `Session.ping(uid)`."""

    peer: NodeId
    uid: int


@dataclass(frozen=True, slots=True)
class PathChanged:
    peer: NodeId
    path: PathKind


@dataclass(frozen=True, slots=True)
class LookupResult:
    peer: NodeId
    online: bool
    observed: Address | None
    # Why the gateway could not answer (e.g. "directory_unavailable: ..."), or None.
    error: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayError:
    code: str
    message: str


# Requests to the I/O layer: hard-NAT traversal needs sockets beside the node's own one.
@dataclass(frozen=True, slots=True)
class SocketsWanted:
    """Open `count` extra UDP sockets for port guessing towards `peer`, then hand them to
    NodeCore.sockets_opened()."""
    peer: NodeId
    count: int


@dataclass(frozen=True, slots=True)
class SocketsReleased:
    """These extra sockets (by via name) are no longer needed: close them."""
    vias: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BindingLifetimeFound:
    """How long the NAT of network `network` keeps state for an idle remote: the I/O layer
    remembers it (a later run on the same network need not measure again)."""
    network: str
    found: BindingLifetime
