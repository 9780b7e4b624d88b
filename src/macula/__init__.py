"""Macula connectivity: one end-to-end QUIC session per node pair, over whatever path works.

    from macula import Node, NodeOptions, Identity

    node = await Node.start(Identity.load_or_create("node.key"),
                            NodeOptions(gateway=("192.0.2.10", 9443)))
    session = await node.connect("<peer node id>")
    session.send(b"hello")
"""

from .config import Config, ConfigError, load_config
from .errors import InvalidValue, MaculaError
from .gateway.options import GatewayOptions
from .gateway.server import Gateway
from .identity import Identity, IdentityError, NodeId
from .nat.hard_nat import HardNatConfig
from .node.node import Node, PeerSession, Stream
from .node.options import IceOptions, NodeOptions
from .node.turn_relays import TurnServerSpec
from .session.errors import (
    ConnectTimeout,
    GatewayKeyMismatch,
    LookupUnavailable,
    MessageTooLarge,
    NodeReplaced,
    NoDirectPath,
    NotAdmitted,
    NotAllowed,
    NotRegistered,
    PeerKeyMismatch,
    PeerOffline,
    SessionClosedError,
)
from .version import __version__

__all__ = [
    "Config",
    "ConfigError",
    "ConnectTimeout",
    "Gateway",
    "GatewayKeyMismatch",
    "GatewayOptions",
    "HardNatConfig",
    "IceOptions",
    "Identity",
    "IdentityError",
    "InvalidValue",
    "LookupUnavailable",
    "MaculaError",
    "MessageTooLarge",
    "NoDirectPath",
    "NodeReplaced",
    "Node",
    "NodeId",
    "NodeOptions",
    "NotAdmitted",
    "NotAllowed",
    "NotRegistered",
    "PeerKeyMismatch",
    "PeerOffline",
    "PeerSession",
    "SessionClosedError",
    "Stream",
    "TurnServerSpec",
    "__version__",
    "load_config",
]
