"""A gateway's settings, in one frozen object built once and passed down unchanged."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, cast

from ..config import Config, parse_host_port, resolve_address
from ..errors import InvalidValue
from ..net.endpoint import Address
from ..wire.stun import STUN_DEFAULT_PORT
from .admission import AdmissionMode
from .limits import GatewayLimits

# RSS a registered idle node costs a gateway, measured with real processes on loopback
# (python -m macula_lab.bench.node_memory: 2,000 nodes); docs/SECURITY.md has the figure.
BYTES_PER_NODE = 40_000
MAX_DERIVED_NODES = 1_000_000


def derived_max_nodes(memory_bytes: int | None = None) -> int:
    """How many nodes fit in half of this machine's memory (at least 1,000)."""
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # not a POSIX system that says
            memory_bytes = 8 << 30
    return max(1000, min(MAX_DERIVED_NODES, memory_bytes // 2 // BYTES_PER_NODE))


@dataclass(frozen=True)
class GatewayOptions:
    """`GatewayOptions.from_config(config)` reads them from a config file (milliseconds
    there, seconds here)."""

    listen: Address = ("0.0.0.0", 9443)
    # The STUN responder's second port (default: listen port + 1, or any free port when
    # listening on port 0) and second IP (RFC 5780 filtering tests need both).
    alternate_port: int | None = None
    second_ip: str | None = None
    node_timeout: float = 30.0
    keepalive_interval: float = 5.0
    max_nodes: int = 0  # 0: derived_max_nodes(), from the machine's memory
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    # Who may register: "open" (anyone) or "allowlist" (the node ids in `allowlist`).
    admission: AdmissionMode = "open"
    allowlist: str | None = None
    # A CA network (admission "ca"): the CA's public key file, the ACL file and the
    # revocation list (serials or node ids), all re-read when they change.
    ca: str | None = None
    acl: str | None = None
    revoked: str | None = None
    # TURN REST API (coturn use-auth-secret): with a secret, registered nodes are handed
    # time-limited credentials for `turn_servers`, renewed at half their lifetime.
    turn_secret: str | None = None
    turn_servers: tuple[Address, ...] = ()
    turn_credential_ttl: float = 86400.0
    # The TCP path for nodes whose network drops UDP: TLS, then WebSocket on /macula, on
    # this address (None: off). Certificate and key from PEM files, or made at start.
    tls_listen: Address | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # A cluster (gateway/cluster.py): the directory's Redis URL (None: alone, in memory),
    # where the other members reach this gateway (None: `listen`), and how long draining
    # may wait for the nodes to move.
    cluster_redis: str | None = None
    cluster_advertise: Address | None = None
    drain_timeout: float = 10.0
    # Keep the cyclic garbage collector off the long-lived heap (gateway/heap.py: gc.freeze
    # every housekeeping tick); an application embedding a gateway may turn it off.
    manage_heap: bool = True

    def __post_init__(self) -> None:
        if self.node_timeout <= 0 or self.keepalive_interval <= 0:
            raise InvalidValue("node_timeout and keepalive_interval must be > 0")
        if self.max_nodes < 0:
            raise InvalidValue("max_nodes must be >= 0 (0: derived from the memory)")
        if self.admission not in ("open", "allowlist", "ca"):
            raise InvalidValue('admission must be "open", "allowlist" or "ca"')
        if self.admission == "allowlist" and not self.allowlist:
            raise InvalidValue('admission "allowlist" needs the allowlist file')
        if self.admission == "ca" and not self.ca:
            raise InvalidValue('admission "ca" needs the CA public key file (ca.pub)')
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidValue("gateway.tls_cert and gateway.tls_key go together")
        if self.drain_timeout <= 0:
            raise InvalidValue("drain_timeout must be > 0")
        if self.turn_credential_ttl <= 0:
            raise InvalidValue("turn_credential_ttl must be > 0")

    @classmethod
    def from_config(cls, config: Config) -> GatewayOptions:
        section = config.gateway
        return cls(
            listen=parse_host_port(section.listen),
            node_timeout=section.node_timeout / 1000,
            max_nodes=section.max_nodes,
            admission=cast(AdmissionMode, section.admission),  # validated by load_config
            allowlist=section.allowlist or None,
            ca=section.ca or None,
            acl=section.acl or None,
            revoked=section.revoked or None,
            alternate_port=section.alternate_port or None,
            second_ip=section.second_ip or None,
            turn_secret=section.turn_secret or None,
            turn_servers=tuple(parse_host_port(server, default_port=STUN_DEFAULT_PORT)
                               for server in section.turn_servers),
            turn_credential_ttl=section.turn_credential_ttl / 1000,
            tls_listen=parse_host_port(section.tls_listen) if section.tls_listen else None,
            tls_cert=section.tls_cert or None,
            tls_key=section.tls_key or None,
            cluster_redis=section.cluster.redis or None,
            cluster_advertise=(parse_host_port(section.cluster.advertise)
                               if section.cluster.advertise else None),
            drain_timeout=section.cluster.drain_timeout / 1000,
            limits=GatewayLimits(
                relay_rate_bytes=section.relay_rate_bytes,
                relay_burst_bytes=section.relay_burst_bytes,
                max_relay_peers=section.max_relay_peers,
                relay_session_max_duration=section.relay_session_max_duration / 1000,
                relay_session_max_bytes=section.relay_session_max_bytes,
                control_rate=section.control_rate,
                punch_rate=section.punch_rate,
                max_handshakes=section.max_handshakes,
                retry_above=section.retry_above,
                answer_rate=section.answer_rate,
                registration_rate=section.registration_rate,
            ),
        )

    def with_changes(self, **changes: Any) -> GatewayOptions:
        return dataclasses.replace(self, **changes)

    async def resolved(self) -> GatewayOptions:
        """A copy whose TURN servers are numeric: nodes are handed these addresses."""
        turn = tuple([await resolve_address(server, "gateway.turn_servers")
                      for server in self.turn_servers])
        return dataclasses.replace(self, turn_servers=turn)
