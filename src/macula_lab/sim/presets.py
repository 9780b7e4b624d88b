"""Named NAT presets and the topologies tests build from them.

A preset is a chain of NAT configs, innermost first ("open" is the empty chain). The pair
topology mirrors the kernel lab in /work/shared/natlab.md: a server holding 203.0.113.10 and
203.0.113.20 on the internet, and peers A and B each behind their own chain, the outermost
NAT's WAN on 198.51.100.0/24, LANs on 192.168.i.0/24 and carrier LANs on 100.64.0.0/10.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from macula.nat.hard_nat import pair_needs_traversal
from macula_lab.sim.nat import Behavior, NatConfig, PortAllocation
from macula_lab.sim.network import (
    NAT_WAN_SUBNET,
    OPEN_HOST_SUBNET,
    GilbertElliott,
    Link,
    LinkConfig,
    NatBox,
    Segment,
    SimHost,
    SimNetwork,
)

EIM = Behavior.ENDPOINT_INDEPENDENT
ADM = Behavior.ADDRESS_DEPENDENT
APDM = Behavior.ADDRESS_AND_PORT_DEPENDENT

FULL_CONE = NatConfig(mapping=EIM, filtering=EIM, port_allocation=PortAllocation.PRESERVING)
RESTRICTED_CONE = NatConfig(mapping=EIM, filtering=ADM, port_allocation=PortAllocation.PRESERVING)
PORT_RESTRICTED = NatConfig(mapping=EIM, filtering=APDM, port_allocation=PortAllocation.PRESERVING)
SYMMETRIC = NatConfig(mapping=APDM, filtering=APDM, port_allocation=PortAllocation.RANDOM)
# The gentler symmetric NATs met in the field: the next port for each new mapping
# (many enterprise firewalls), or the local port for the first mapping and the next ones
# after it (Linux masquerade when the port is taken, many home routers).
SYMMETRIC_SEQUENTIAL = dataclasses.replace(SYMMETRIC, port_allocation=PortAllocation.SEQUENTIAL)
SYMMETRIC_PRESERVING = dataclasses.replace(SYMMETRIC, port_allocation=PortAllocation.PRESERVING)
# Networks that drop UDP: a firewall that lets TCP out, and one that lets out nothing but
# TCP to its HTTP proxy. Nodes there reach the gateway on its TLS path.
UDP_BLOCKED = dataclasses.replace(PORT_RESTRICTED, udp_blocked=True)
PROXY_ONLY = dataclasses.replace(PORT_RESTRICTED, udp_blocked=True, tcp="proxy")

PRESETS: tuple[str, ...] = (
    "open",
    "full_cone",
    "restricted_cone",
    "port_restricted",
    "symmetric",
    "cgnat",
)

# Innermost NAT first: cgnat is a home port-restricted NAT behind a carrier one.
PRESET_CHAINS: dict[str, tuple[NatConfig, ...]] = {
    "open": (),
    "full_cone": (FULL_CONE,),
    "restricted_cone": (RESTRICTED_CONE,),
    "port_restricted": (PORT_RESTRICTED,),
    "symmetric": (SYMMETRIC,),
    "cgnat": (PORT_RESTRICTED, PORT_RESTRICTED),
    "udp_blocked": (UDP_BLOCKED,),
    "proxy_only": (PROXY_ONLY,),
    "symmetric_sequential": (SYMMETRIC_SEQUENTIAL,),
    "symmetric_preserving": (SYMMETRIC_PRESERVING,),
}
# Not in the default matrix (whose cells stay comparable run to run): asked for by name.
TCP_PRESETS: tuple[str, ...] = ("udp_blocked", "proxy_only")
# The population bench's gentler symmetric NATs; simulator only (the kernel lab's
# symmetric preset is masquerade fully-random, the hardest kind).
SYMMETRIC_VARIANTS: tuple[str, ...] = ("symmetric_sequential", "symmetric_preserving")


# What NAT discovery reports behind the presets hard-NAT traversal concerns: (NAT type,
# port allocation). A CGNAT chain behaves, and is reported, as port-restricted.
_REPORTED: dict[str, tuple[str, str]] = {
    "port_restricted": ("port_restricted", "preserving"),
    "cgnat": ("port_restricted", "preserving"),
    "symmetric": ("symmetric", "random"),
    "symmetric_sequential": ("symmetric", "sequential"),
    "symmetric_preserving": ("symmetric", "preserving"),
}


def guessing_pair(a: str, b: str) -> bool:
    """Do presets `a` and `b` make a pair only port guessing (or prediction) takes direct:
    a symmetric NAT against one that filters by address and port, or two symmetric NATs
    that keep a fresh socket's port? The node's own rule decides
    (nat.hard_nat.pair_needs_traversal)."""
    reported_a, reported_b = _REPORTED.get(a), _REPORTED.get(b)
    return (reported_a is not None and reported_b is not None
            and pair_needs_traversal(reported_a, reported_b))

SERVER_IPS: tuple[str, str] = ("203.0.113.10", "203.0.113.20")

# A preset name, one NAT config, or a chain of them (innermost first).
ChainSpec = str | NatConfig | Sequence[NatConfig]


def preset_chain(spec: ChainSpec, **overrides: Any) -> tuple[NatConfig, ...]:
    """Resolve `spec` to a chain; `overrides` (e.g. hairpinning=True, mapping_timeout=5.0)
    are applied to every NAT in it."""
    if isinstance(spec, str):
        if spec not in PRESET_CHAINS:
            raise ValueError(f"unknown NAT preset {spec!r}; known: "
                             f"{', '.join(PRESETS + TCP_PRESETS + SYMMETRIC_VARIANTS)}")
        chain = PRESET_CHAINS[spec]
    elif isinstance(spec, NatConfig):
        chain = (spec,)
    else:
        chain = tuple(spec)
    return tuple(dataclasses.replace(cfg, **overrides) for cfg in chain) if overrides else chain


@dataclass
class Site:
    """Hosts behind one NAT chain. `nats` and `lans` are innermost first; `uplinks` are the
    shaped links (the outermost NAT's WAN, or each open host's own link)."""

    name: str
    hosts: list[SimHost]
    nats: list[NatBox]
    lans: list[Segment]
    uplinks: list[Link]

    @property
    def host(self) -> SimHost:
        return self.hosts[0]

    @property
    def outer_nat(self) -> NatBox | None:
        return self.nats[-1] if self.nats else None

    @property
    def public_ip(self) -> str:
        """The address the outside world sees packets from (first host's, if open)."""
        outer = self.outer_nat
        return outer.wan_ip if outer is not None else self.host.ip

    @property
    def lan(self) -> Segment | None:
        """The innermost LAN, where the hosts live (None for an open site)."""
        return self.lans[0] if self.lans else None


@dataclass
class PairTopology:
    """The NAT-pair test bed: a two-IP server and peers A and B behind their chains."""

    net: SimNetwork
    server: SimHost
    a: Site
    b: Site
    preset_a: str
    preset_b: str

    @property
    def server_ips(self) -> tuple[str, ...]:
        return self.server.ips

    @property
    def host_a(self) -> SimHost:
        return self.a.host

    @property
    def host_b(self) -> SimHost:
        return self.b.host


def _free_index(net: SimNetwork, levels: int, start: int) -> int:
    taken = {str(subnet) for segment in net.segments for subnet in segment.subnets}
    for index in range(max(1, start), 255):
        wanted = [_lan_subnet(depth, levels, index) for depth in range(levels)]
        if not any(subnet in taken for subnet in wanted):
            return index
    raise ValueError("no free site index left (192.168.1-254)")


def _lan_subnet(depth: int, levels: int, index: int) -> str:
    # depth 0 is the outermost NAT's LAN. Carrier LANs use the shared 100.64.0.0/10 space.
    if depth == levels - 1:
        return f"192.168.{index}.0/24"
    return f"100.{64 + depth}.{index}.0/24"


def build_site(
    net: SimNetwork,
    name: str,
    chain: ChainSpec,
    *,
    outside: Segment | None = None,
    hosts: int = 1,
    latency_ms: float = 0.0,
    jitter_ms: float = 0.0,
    loss: float = 0.0,
    burst: GilbertElliott | None = None,
    index: int | None = None,
    seed: int | None = None,
) -> Site:
    """Put `hosts` hosts behind `chain` (a preset name or NAT configs, innermost first),
    attached to `outside` (default: the internet). Latency, jitter and loss shape the
    uplink. Hosts are named `name` (or `name.1`, `name.2`, ... when several)."""
    configs = preset_chain(chain)
    outside = net.internet if outside is None else outside
    uplink = LinkConfig.ms(latency_ms, jitter_ms=jitter_ms, loss=loss, burst=burst)
    host_names = [name] if hosts == 1 else [f"{name}.{k}" for k in range(1, hosts + 1)]

    if not configs:
        subnet = OPEN_HOST_SUBNET if outside is net.internet else None
        open_hosts = [
            net.add_host(h, outside, outside.allocate(subnet), link=uplink, seed=seed)
            for h in host_names
        ]
        return Site(name, open_hosts, [], [], [host.link for host in open_hosts])

    levels = len(configs)
    index = _free_index(net, levels, 1) if index is None else index
    nats: list[NatBox] = []
    lans: list[Segment] = []
    upstream = outside
    # Build from the outside in, so each NAT's WAN address comes from the segment above it.
    for depth, config in enumerate(reversed(configs)):
        level = levels - 1 - depth
        lan = net.add_segment(f"{name}.lan{level}", _lan_subnet(depth, levels, index))
        wan_ip = upstream.allocate(NAT_WAN_SUBNET if upstream is net.internet else None)
        nat = net.add_nat(
            f"{name}.nat{level}",
            config,
            outside=upstream,
            inside=lan,
            wan_ip=wan_ip,
            uplink=uplink if depth == 0 else None,
            seed=seed,
        )
        nats.insert(0, nat)
        lans.insert(0, lan)
        upstream = lan
    site_hosts = [net.add_host(h, upstream, None, seed=seed) for h in host_names]
    return Site(name, site_hosts, nats, lans, [nats[-1].uplink])


def build_pair_topology(
    net: SimNetwork,
    preset_a: ChainSpec,
    preset_b: ChainSpec,
    *,
    latency_ms: float = 0.0,
    loss: float = 0.0,
    jitter_ms: float = 0.0,
    burst: GilbertElliott | None = None,
    seed: int | None = None,
) -> PairTopology:
    """Server "server" on 203.0.113.10 + .20; host "a" behind `preset_a`, "b" behind
    `preset_b`. `latency_ms` (one way) and `loss` shape each peer's uplink, so A->server
    takes latency_ms and A->B twice that. `seed` (default: the network's) seeds the
    topology's links and NATs."""
    server = net.add_host("server", net.internet, SERVER_IPS, seed=seed)
    sites = []
    for name, spec, first_index in (("a", preset_a, 1), ("b", preset_b, 2)):
        levels = len(preset_chain(spec))
        sites.append(
            build_site(
                net,
                name,
                spec,
                latency_ms=latency_ms,
                jitter_ms=jitter_ms,
                loss=loss,
                burst=burst,
                index=_free_index(net, levels, first_index),
                seed=seed,
            )
        )
    site_a, site_b = sites
    return PairTopology(
        net=net,
        server=server,
        a=site_a,
        b=site_b,
        preset_a=preset_a if isinstance(preset_a, str) else "custom",
        preset_b=preset_b if isinstance(preset_b, str) else "custom",
    )
