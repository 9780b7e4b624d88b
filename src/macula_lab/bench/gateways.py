"""How the bench starts a gateway: as deployed, except the per-node relay rate cap.

The gateway caps what one node may relay (relay_rate_bytes, default 4 MiB/s). coturn's
equivalent (max-bps) is unlimited by default, and a relay comparison must measure both
forwarding engines rather than one's policy, so the bench lifts that one cap and says so
in its output. Everything else (handshake bounds, control rates) stays as deployed.
"""

from __future__ import annotations

from typing import Any

from macula.gateway.limits import GatewayLimits
from macula.gateway.server import Gateway


def bench_limits() -> tuple[GatewayLimits, dict[str, Any]]:
    """The limits the bench gateway runs with, and a summary for the report: the per-node
    relay rate cap is lifted so the bench measures the relay itself, and the per-address
    registration rate so thousands of bench nodes on a few addresses register as fast as
    the gateway can take them (the capacity case measures that cost, not the limiter)."""
    limits = GatewayLimits(relay_rate_bytes=0, registration_rate=0)
    return limits, {"relay_rate_bytes": 0, "registration_rate": 0,
                    "note": "per-node relay rate and per-address registration rate caps "
                            "lifted for the bench"}


async def start_gateway(**kwargs: Any) -> Gateway:
    limits, _ = bench_limits()
    kwargs.setdefault("limits", limits)
    kwargs.setdefault("listen", ("127.0.0.1", 0))
    return await Gateway.start(**kwargs)
