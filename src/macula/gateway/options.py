"""A gateway's settings, in one frozen object built once and passed down unchanged."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, parse_host_port
from ..errors import InvalidValue
from ..net.endpoint import Address
from .admission import AdmissionMode
from .limits import GatewayLimits


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
    max_nodes: int = 100_000
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    # Who may register: "open" (anyone) or "allowlist" (the node ids in `allowlist`).
    admission: AdmissionMode = "open"
    allowlist: str | None = None

    def __post_init__(self) -> None:
        if self.node_timeout <= 0 or self.keepalive_interval <= 0:
            raise InvalidValue("node_timeout and keepalive_interval must be > 0")
        if self.max_nodes < 1:
            raise InvalidValue("max_nodes must be >= 1")
        if self.admission not in ("open", "allowlist"):
            raise InvalidValue('admission must be "open" or "allowlist"')
        if self.admission == "allowlist" and not self.allowlist:
            raise InvalidValue('admission "allowlist" needs the allowlist file')

    @classmethod
    def from_config(cls, config: Config) -> GatewayOptions:
        section = config.gateway
        return cls(
            listen=parse_host_port(section.listen),
            node_timeout=section.node_timeout / 1000,
            max_nodes=section.max_nodes,
            admission="allowlist" if section.admission == "allowlist" else "open",
            allowlist=section.allowlist or None,
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
