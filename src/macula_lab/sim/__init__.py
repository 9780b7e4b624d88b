"""In-process network simulator: RFC 4787 NATs, shaped links and a virtual-time event loop.

Typical use:

    from macula_lab.sim import SimNetwork, build_pair_topology, run_simulation

    async def main(net: SimNetwork) -> None:
        topo = build_pair_topology(net, "port_restricted", "symmetric", latency_ms=20)
        server_ep = topo.server.open_endpoint(3478, "203.0.113.10")
        a_ep = topo.host_a.open_endpoint()          # a DatagramEndpoint
        ...

    net = SimNetwork(seed=1)
    run_simulation(lambda: main(net), seed=1)
"""

from __future__ import annotations

from macula_lab.sim.clock import (
    SimulationError,
    SimulationLimitExceeded,
    SimulationStalled,
    VirtualTimeLoop,
    new_virtual_loop,
    run_simulation,
)
from macula_lab.sim.nat import Behavior, Mapping, Nat, NatConfig, PortAllocation
from macula_lab.sim.network import (
    Counters,
    GilbertElliott,
    Link,
    LinkConfig,
    NatBox,
    Segment,
    SimEndpoint,
    SimHost,
    SimNetwork,
    simulate,
)
from macula_lab.sim.presets import (
    PRESET_CHAINS,
    PRESETS,
    SERVER_IPS,
    PairTopology,
    Site,
    build_pair_topology,
    build_site,
    preset_chain,
)

__all__ = [
    "Behavior",
    "Counters",
    "GilbertElliott",
    "Link",
    "LinkConfig",
    "Mapping",
    "Nat",
    "NatBox",
    "NatConfig",
    "PRESETS",
    "PRESET_CHAINS",
    "PairTopology",
    "PortAllocation",
    "SERVER_IPS",
    "Segment",
    "SimEndpoint",
    "SimHost",
    "SimNetwork",
    "SimulationError",
    "SimulationLimitExceeded",
    "SimulationStalled",
    "Site",
    "VirtualTimeLoop",
    "build_pair_topology",
    "build_site",
    "new_virtual_loop",
    "preset_chain",
    "run_simulation",
    "simulate",
]
