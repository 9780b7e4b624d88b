"""Errors a user of the node API can meet, each saying what went wrong."""

from __future__ import annotations

from ..errors import MaculaError

__all__ = ["MaculaError"]  # extended below


class PeerOffline(MaculaError):
    def __init__(self, peer: str) -> None:
        super().__init__(f"node {peer} is not online at the gateway")
        self.peer = peer


class LookupUnavailable(MaculaError):
    """The gateway could not say whether the node is online (its cluster directory is
    unreachable and the node is not homed there): try again shortly."""


class MessageTooLarge(MaculaError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes exceeds node.max_message_size = {limit} bytes; "
            f"use a stream for bulk data"
        )
        self.size, self.limit = size, limit


class SessionClosedError(MaculaError):
    pass


class PeerKeyMismatch(MaculaError):
    pass


class NotRegistered(MaculaError):
    pass


class ConnectTimeout(MaculaError):
    pass


class NoDirectPath(MaculaError):
    pass


class NotAdmitted(NotRegistered):
    """The gateway does not admit this node (its allowlist does not name it)."""


class NotAllowed(MaculaError):
    """A CA network's ACL keeps this node from the peer (the gateway said so, or the peer
    refused the session)."""


class NodeReplaced(NotRegistered):
    """Another process registered with this node's key, and the gateway closed this one's
    connection (two processes must not share a key)."""


class GatewayKeyMismatch(MaculaError):
    """The gateway at the configured address is not the gateway this node pins."""
