"""Everything a node is told, in one frozen object built once and passed down unchanged.

As aioquic's QuicConfiguration and pion's AgentConfig: the config file (or the caller)
decides once, and every part of the node reads the field it needs from the same object.
Times are seconds here; the config file counts milliseconds, and `from_config` is the one
place that converts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ..config import (
    STRATEGIES,
    Config,
    Strategy,
    parse_host_port,
    resolve_address,
    split_gateway,
)
from ..errors import InvalidValue
from ..ice.candidate import CANDIDATE_TYPES
from ..identity import NodeId
from ..nat.binding_lifetime import SCHEDULE as LIFETIME_SCHEDULE
from ..nat.hard_nat import HardNatConfig
from ..net.endpoint import Address
from ..wire.stun import STUN_DEFAULT_PORT
from .turn_relays import TurnServerSpec


@dataclass(frozen=True)
class IceOptions:
    """How ICE runs for each punch attempt ([ice] in the config file)."""

    # After this long, the candidates still being gathered (TURN allocations) are given
    # up on for this attempt: the peer hears "end of candidates" and can fail early.
    gather_timeout: float = 5.0
    # The agent gives up on its checks after this long, or after the attempt's
    # hole_punch_timeout, whichever comes first.
    check_timeout: float = 10.0
    candidate_types: tuple[str, ...] = CANDIDATE_TYPES
    # Send candidates found after the punch order as they come (RFC 8838), or all at once
    # when gathering ends.
    trickle: bool = True

    def __post_init__(self) -> None:
        if self.gather_timeout < 0 or self.check_timeout <= 0:
            raise InvalidValue("ice: gather_timeout must be >= 0 and check_timeout > 0")
        unknown = set(self.candidate_types) - set(CANDIDATE_TYPES)
        if unknown or not self.candidate_types:
            raise InvalidValue(f"ice.candidate_types: one or more of {', '.join(CANDIDATE_TYPES)}")


@dataclass(frozen=True)
class NodeOptions:
    """A node's settings. `NodeOptions.from_config(config)` reads them from a config file;
    `dataclasses.replace` (or `with_changes`) derives variants."""

    gateway: Address = ("127.0.0.1", 9443)
    # The gateway's node id: its key must hash to it, or the node refuses that gateway.
    gateway_id: NodeId | None = None
    # Trust on first use when `gateway_id` is None: where the first key seen at each
    # gateway address is remembered (the CLI keeps it beside the node key). None: off.
    known_gateways: str | None = None
    listen: Address = ("0.0.0.0", 0)
    strategy: Strategy = "opportunistic"
    # Sessions from other nodes are refused at their handshake; None: any node.
    accept_from: frozenset[NodeId] | None = None
    # A CA network (macula.membership): this node's membership file, the CA's public key
    # file (peers without a valid membership are refused), the ACL and revocation files.
    membership: str | None = None
    ca: str | None = None
    acl: str | None = None
    revoked: str | None = None
    max_message_size: int = 1 << 20
    keepalive_interval: float = 5.0
    session_idle_timeout: float = 60.0
    # Phase 2: hole punching. Off means a relay-only node (always_relay implies it).
    nat_traversal: bool = True
    hole_punch_timeout: float = 5.0
    prefer_direct: bool = True
    fallback_to_relay: bool = True
    port_mapping: bool = False
    nat_discovery: bool = True
    stun_servers: tuple[Address, ...] = ()
    turn_servers: tuple[TurnServerSpec, ...] = ()
    ice: IceOptions = field(default_factory=IceOptions)
    hard_nat: HardNatConfig = field(default_factory=HardNatConfig)
    # The gateway's TLS (WebSocket) port, for networks that drop UDP (None: UDP only), and
    # the HTTP CONNECT proxy that link goes through ("http://[user:pass@]host:port").
    gateway_tls: Address | None = None
    https_proxy: str | None = None
    # The members of a gateway cluster to home on (node/home_choice.py), each with its id
    # when pinned; `gateway`/`gateway_id` are then the first. Empty: `gateway` alone.
    gateways: tuple[GatewaySpec, ...] = ()
    # The idle times (seconds) the binding-lifetime test tries in turn (API only: a lab
    # or a test shortens them; nat/binding_lifetime.py).
    lifetime_schedule: tuple[float, ...] = LIFETIME_SCHEDULE

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidValue(f"connection_strategy must be one of {', '.join(STRATEGIES)}")
        if self.keepalive_interval <= 0 or self.session_idle_timeout <= 0:
            raise InvalidValue("keepalive_interval and session_idle_timeout must be > 0")
        if self.hole_punch_timeout <= 0:
            raise InvalidValue("hole_punch_timeout must be > 0")
        if self.max_message_size < 1:
            raise InvalidValue("max_message_size must be >= 1")

    # ------------------------------------------------------------------ derived
    @property
    def punches(self) -> bool:
        """Whether this node takes part in hole punching at all (always_relay never does,
        and says so to the gateway like a Phase 1 node)."""
        return self.nat_traversal and self.strategy != "always_relay"

    @property
    def attempt_check_timeout(self) -> float:
        """How long one attempt's ICE checks may run: the tighter of the two settings."""
        return min(self.hole_punch_timeout, self.ice.check_timeout)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> NodeOptions:
        """The node's options from a validated Config: milliseconds become seconds here and
        nowhere else. Host names stay names until `resolved()`. Without node.https_proxy,
        the HTTPS_PROXY / NO_PROXY variables of `env` (default os.environ) decide."""
        traversal, ice = config.nat_traversal, config.ice
        gateways = tuple(_gateway_spec(text) for text in config.node.gateways)
        gateway_id, gateway = split_gateway(config.node.gateways[0] if gateways
                                            else config.node.gateway)
        gateway_tls = (parse_host_port(config.node.gateway_tls)
                       if config.node.gateway_tls else None)
        return cls(
            gateways=gateways,
            gateway=parse_host_port(gateway),
            gateway_id=NodeId.parse(gateway_id) if gateway_id is not None else None,
            listen=parse_host_port(config.node.listen),
            strategy=cast(Strategy, config.connection_strategy),  # validated by load_config
            accept_from=(frozenset(NodeId.parse(text) for text in config.node.accept_from)
                         if config.node.accept_from else None),
            membership=config.node.membership or None,
            ca=config.node.ca or None,
            acl=config.node.acl or None,
            revoked=config.node.revoked or None,
            max_message_size=config.node.max_message_size,
            keepalive_interval=config.node.keepalive_interval / 1000,
            nat_traversal=traversal.enabled,
            hole_punch_timeout=traversal.hole_punch_timeout / 1000,
            prefer_direct=traversal.prefer_direct,
            fallback_to_relay=traversal.fallback_to_relay,
            port_mapping=traversal.port_mapping,
            stun_servers=tuple(parse_host_port(s, default_port=STUN_DEFAULT_PORT)
                               for s in config.stun_servers),
            turn_servers=tuple(
                TurnServerSpec(parse_host_port(t.server, default_port=STUN_DEFAULT_PORT),
                               t.username, t.credential, t.transport)
                for t in config.turn_servers),
            ice=IceOptions(gather_timeout=ice.gather_timeout / 1000,
                           check_timeout=ice.check_timeout / 1000,
                           candidate_types=tuple(ice.candidate_types),
                           trickle=ice.enable_trickling),
            hard_nat=HardNatConfig(enabled=traversal.hard_nat, rate=traversal.hard_nat_rate,
                                   sockets=traversal.hard_nat_sockets,
                                   probes=traversal.hard_nat_probes),
            gateway_tls=gateway_tls,
            https_proxy=config.node.https_proxy or (
                environment_proxy(gateway_tls[0], os.environ if env is None else env)
                if gateway_tls else None),
        )

    def with_changes(self, **changes: Any) -> NodeOptions:
        """A copy with `changes`, accepting the API's shorthands: `hard_nat=True`,
        `candidate_types=[...]` (into ice), and lists where tuples are kept."""
        if "candidate_types" in changes:
            types = changes.pop("candidate_types")
            if types:
                changes["ice"] = dataclasses.replace(changes.get("ice", self.ice),
                                                     candidate_types=tuple(types))
        if isinstance(changes.get("gateway_id"), str):
            changes["gateway_id"] = NodeId.parse(changes["gateway_id"])
        if isinstance(changes.get("gateway_tls"), str):
            changes["gateway_tls"] = parse_host_port(changes["gateway_tls"])
        if isinstance(changes.get("gateway"), str):  # "NODE_ID@host:port" or "host:port"
            gateway_id, address = split_gateway(changes["gateway"])
            changes["gateway"] = parse_host_port(address)
            if gateway_id is not None:
                changes["gateway_id"] = NodeId.parse(gateway_id)
        if "gateways" in changes:  # "ID@host:port" text, (host, port) or (address, id)
            specs = tuple(_gateway_spec(g) if isinstance(g, str)
                          else ((g[0], g[1]), None) if isinstance(g[0], str)
                          else ((g[0][0], g[0][1]), g[1]) for g in changes["gateways"])
            changes["gateways"] = specs
            if specs:
                changes["gateway"], changes["gateway_id"] = specs[0]
        accept = changes.get("accept_from")
        if accept is not None and not isinstance(accept, frozenset):  # ids or their text
            changes["accept_from"] = frozenset(
                NodeId.parse(peer) if isinstance(peer, str) else peer for peer in accept)
        hard = changes.get("hard_nat")
        if isinstance(hard, bool):
            changes["hard_nat"] = HardNatConfig(enabled=hard)
        for name in ("stun_servers", "turn_servers"):
            if name in changes:
                changes[name] = tuple(changes[name])
        return dataclasses.replace(self, **changes)

    async def resolved(self) -> NodeOptions:
        """A copy whose gateway, STUN and TURN addresses are numeric: the node recognises
        those servers by the source address of what they send."""
        gateway = await resolve_address(self.gateway, "node.gateway")
        stun = tuple([await resolve_address(s, "stun_servers") for s in self.stun_servers])
        turn = tuple([dataclasses.replace(t, server=await resolve_address(t.server, "turn_servers"))
                      for t in self.turn_servers])
        gateways = tuple([(await resolve_address(address, "node.gateways"), pinned)
                          for address, pinned in self.gateways])
        return dataclasses.replace(self, gateway=gateway, stun_servers=stun, turn_servers=turn,
                                   gateways=gateways)


GatewaySpec = tuple[Address, "NodeId | None"]


def _gateway_spec(text: str) -> GatewaySpec:
    """"NODE_ID@host:port" or "host:port" -> (address, pinned id or None)."""
    ident, address = split_gateway(text)
    return parse_host_port(address), NodeId.parse(ident) if ident is not None else None


def environment_proxy(host: str, env: Mapping[str, str]) -> str | None:
    """HTTPS_PROXY (or https_proxy) for `host`, unless NO_PROXY (or no_proxy) exempts it."""
    from ..net.wslink import proxy_bypassed

    proxy = env.get("HTTPS_PROXY") or env.get("https_proxy")
    if not proxy:
        return None
    if proxy_bypassed(host, env.get("NO_PROXY") or env.get("no_proxy") or ""):
        return None
    return proxy
