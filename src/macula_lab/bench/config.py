"""How big each case runs: full (the default), --quick (make bench), and the tests' tiny."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    bulk_bytes: int  # per bulk transfer, same for ours and aioquic
    bulk_chunk: int
    bulk_repeats: int  # transfers per side; the best of each is compared
    relay_loads: tuple[float, ...]  # offered datagrams/s; 0 = as fast as the sender goes
    relay_datagrams: int  # per offered load
    relay_size: int  # datagram payload bytes (a full QUIC packet)
    relay_limit_s: float  # longest a load may take
    ice_trials: int
    sim_trials: int  # per NAT preset pair
    sim_presets: tuple[str, ...] | None  # None: every preset
    population_nodes: int
    population_messages: int
    population_message_bytes: int
    capacity_levels: tuple[int, ...]
    cluster_levels: tuple[int, ...]  # nodes over a 3-gateway cluster
    capacity_idle_s: float
    core_relay_frames: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = BenchConfig(
    mode="full", bulk_bytes=32_000_000, bulk_chunk=65536, bulk_repeats=3,
    relay_loads=(10_000, 20_000, 40_000, 60_000, 0), relay_datagrams=100_000, relay_size=1200,
    relay_limit_s=20.0, ice_trials=30, sim_trials=5, sim_presets=None,
    population_nodes=120, population_messages=150, population_message_bytes=1000,
    capacity_levels=(100, 1000, 10_000), cluster_levels=(300, 3000), capacity_idle_s=15.0,
    core_relay_frames=200_000,
)

QUICK = BenchConfig(
    mode="quick", bulk_bytes=8_000_000, bulk_chunk=65536, bulk_repeats=2,
    relay_loads=(20_000, 40_000, 0), relay_datagrams=40_000, relay_size=1200, relay_limit_s=10.0,
    ice_trials=15, sim_trials=2, sim_presets=None,
    population_nodes=60, population_messages=100, population_message_bytes=1000,
    capacity_levels=(100, 1000), cluster_levels=(300,), capacity_idle_s=15.0,
    core_relay_frames=50_000,
)

# For tests of the machinery: every case runs, on sizes too small to mean anything.
TINY = BenchConfig(
    mode="tiny", bulk_bytes=300_000, bulk_chunk=65536, bulk_repeats=1,
    relay_loads=(0,), relay_datagrams=2000, relay_size=1200, relay_limit_s=5.0,
    ice_trials=2, sim_trials=1, sim_presets=("open", "port_restricted"),
    population_nodes=8, population_messages=10, population_message_bytes=200,
    capacity_levels=(5, 20), cluster_levels=(6,), capacity_idle_s=6.0, core_relay_frames=2000,
)

MODES = {"full": FULL, "quick": QUICK, "tiny": TINY}
