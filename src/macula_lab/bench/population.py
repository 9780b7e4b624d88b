"""Case: what share of a mixed population's payload bytes crosses a relay.

In the simulator: one gateway, sites behind a mix of NAT presets (1 to 3 hosts per site,
10 ms per uplink), one node per host. Every node dials a few peers chosen at random and
sends them a steady message stream for a while; everybody reads everything. The share is
counted from the sessions' own bytes_by_path (what each node sent, by the path it went
on): every path other than "direct" (gateway relay, TURN) counts as relayed. The gateway's
relayed-bytes counter is reported beside it as a cross-check.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import asdict
from typing import Any

from macula.nat.hard_nat import HardNatConfig

# A plausible consumer mix (mobile carriers behind CGNAT, many home routers port
# restricted, some symmetric enterprise/mobile NATs). Weights, not exact counts. A third
# of the symmetric NATs randomise ports (the hardest kind: only birthday guessing gets
# through, and two of them never do), a third hand them out in sequence, a third keep
# the local port for the first mapping and count up from there (docs/PERFORMANCE.md).
MIX: dict[str, float] = {"open": 0.10, "full_cone": 0.10, "restricted_cone": 0.15,
                         "port_restricted": 0.35, "symmetric": 0.05,
                         "symmetric_sequential": 0.05, "symmetric_preserving": 0.05,
                         "cgnat": 0.15}
GATEWAY_IP, GATEWAY_IP2, GATEWAY_PORT = "203.0.113.10", "203.0.113.20", 9443
# What the nodes run with. "shipped": the defaults a user gets. "off": no traversal extra
# (no hard-NAT guessing; port mapping is off in all three, as shipped: no simulated
# router answers PCP, NAT-PMP or UPnP). "on": guessing turned up to five times the
# shipped rate and twice the sockets.
SETTINGS: dict[str, HardNatConfig] = {
    "shipped": HardNatConfig(),
    "off": HardNatConfig(enabled=False),
    "on": HardNatConfig(enabled=True, rate=1000, sockets=512),
}


def _plan_sites(nodes: int, rng: random.Random) -> list[tuple[str, int]]:
    """(preset, hosts) per site: each preset gets its share of the `nodes` hosts (largest
    remainder, so a small population has the same mix as a large one), in sites of 1 to 3
    hosts (open hosts stand alone), in random order."""
    exact = {name: weight * nodes / sum(MIX.values()) for name, weight in MIX.items()}
    counts = {name: int(share) for name, share in exact.items()}
    by_remainder = sorted(MIX, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[:nodes - sum(counts.values())]:
        counts[name] += 1
    sites: list[tuple[str, int]] = []
    for preset, left in counts.items():
        while left > 0:
            hosts = 1 if preset == "open" else min(left, rng.choice((1, 1, 2, 3)))
            sites.append((preset, hosts))
            left -= hosts
    rng.shuffle(sites)
    return sites


async def _population(nodes: int, peers: int, messages: int, interval: float, size: int,
                      latency_ms: float, seed: int, settings: str) -> dict[str, Any]:
    from macula.identity import Identity, NodeId
    from macula.node.node import Node, PeerSession
    from macula_lab.bench.gateways import start_gateway
    from macula_lab.sim import SERVER_IPS, SimNetwork, build_site

    hard_nat = SETTINGS[settings]
    rng = random.Random(seed)
    net = SimNetwork(seed=seed)
    server = net.add_host("server", net.internet, SERVER_IPS, seed=seed)
    gateway = await start_gateway(
        endpoint=server.open_endpoint(GATEWAY_PORT, GATEWAY_IP),
        stun_endpoints=[server.open_endpoint(GATEWAY_PORT + 1, GATEWAY_IP),
                        server.open_endpoint(GATEWAY_PORT, GATEWAY_IP2),
                        server.open_endpoint(GATEWAY_PORT + 1, GATEWAY_IP2)])
    hosts, presets_of = [], []
    for i, (preset, count) in enumerate(_plan_sites(nodes, rng)):
        site = build_site(net, f"s{i}", preset, hosts=count, latency_ms=latency_ms, seed=seed + i)
        hosts += site.hosts
        presets_of += [preset] * count
    members: list[Node] = []
    sessions: list[tuple[PeerSession, NodeId]] = []  # with the node that holds it
    tasks: list[asyncio.Task[Any]] = []
    loop = asyncio.get_running_loop()
    try:
        members = list(await asyncio.gather(*[
            Node.start(Identity.generate(), gateway=(GATEWAY_IP, GATEWAY_PORT),
                       endpoint=host.open_endpoint(), register_timeout=60, hard_nat=hard_nat,
                       socket_opener=host.open_udp_endpoint) for host in hosts]))
        await asyncio.sleep(2.0)  # NAT discovery settles, as on nodes that have been up a while
        filler = b"x" * size

        async def drain(session: PeerSession) -> None:
            while True:
                await session.recv()

        async def accept_all(node: Node) -> None:
            while True:
                session = await node.accept()
                sessions.append((session, node.node_id))
                tasks.append(asyncio.create_task(drain(session)))

        async def talk(node: Node, peer_index: int) -> None:
            session = await node.connect(members[peer_index].node_id, timeout=30)
            sessions.append((session, node.node_id))
            tasks.append(asyncio.create_task(drain(session)))
            await asyncio.sleep(rng.random() * interval)  # senders out of phase
            for _ in range(messages):
                session.send(filler)
                await asyncio.sleep(interval)

        tasks += [asyncio.create_task(accept_all(n)) for n in members]
        dials = []
        for i, node in enumerate(members):
            others = [j for j in range(len(members)) if j != i]
            for j in rng.sample(others, min(peers, len(others))):
                dials.append(talk(node, j))
        started = loop.time()
        outcomes = await asyncio.gather(*dials, return_exceptions=True)
        await asyncio.sleep(1.0)  # last messages and their ACKs
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        by_path: Counter[str] = Counter()
        final_paths: Counter[str] = Counter()
        # Where the relayed bytes come from: per NAT pair, and the part sent before a
        # session that ended direct got there (the upgrade's cost, not the pair's).
        preset_of = {node.node_id: preset for node, preset in zip(members, presets_of)}
        pair_bytes: dict[str, Counter[str]] = {}
        before_upgrade = 0
        seen: set[int] = set()
        for session, owner in sessions:
            if id(session) in seen:
                continue
            seen.add(id(session))
            stats = session.stats()
            final_paths[stats["connection_type"]] += 1
            pair = "x".join(sorted((preset_of[owner], preset_of.get(session.peer, "?"))))
            counts_of_pair = pair_bytes.setdefault(pair, Counter())
            for path, counts in stats["bytes_by_path"].items():
                by_path[path] += counts["sent"]
                counts_of_pair["direct" if path == "direct" else "relayed"] += counts["sent"]
                if path != "direct" and stats["connection_type"] == "direct":
                    before_upgrade += counts["sent"]
        total = sum(by_path.values())
        relayed = total - by_path.get("direct", 0)
        return {
            "nodes": len(members), "sites": len(set(h.name.split(".")[0] for h in hosts)),
            "nat_mix": dict(Counter(presets_of)), "peers_per_node": peers,
            "settings": settings, "hard_nat": asdict(hard_nat),
            "messages_per_session": messages, "message_bytes": size,
            "interval_s": interval, "latency_ms_per_uplink": latency_ms,
            "virtual_seconds": round(loop.time() - started, 3),
            "sessions": len(seen) // 2 or len(seen), "dials_failed": len(failed),
            "dial_errors": sorted({f"{type(e).__name__}: {e}" for e in failed})[:3],
            "final_paths_per_session_end": dict(final_paths),
            "bytes_by_path": dict(by_path), "total_bytes": total, "relayed_bytes": relayed,
            "gateway_relayed_bytes": gateway.core.relayed_bytes,
            "relayed_byte_share": round(relayed / total, 4) if total else None,
            "relayed_before_upgrade_share": round(before_upgrade / total, 4) if total else None,
            "relayed_share_by_nat_pair": {
                pair: round(c["relayed"] / (c["relayed"] + c["direct"]), 3)
                for pair, c in sorted(pair_bytes.items()) if c["relayed"] + c["direct"]},
        }
    finally:
        for task in tasks:
            task.cancel()
        for node in members:
            await node.close(linger=0)
        await gateway.close()


def run(nodes: int, *, peers: int = 3, messages: int = 60, interval: float = 0.05,
        size: int = 200, latency_ms: float = 10.0, seed: int = 7,
        settings: str = "shipped") -> dict[str, Any]:
    from macula_lab.sim import run_simulation

    if settings not in SETTINGS:
        raise ValueError(f"settings is one of {', '.join(SETTINGS)}, not {settings!r}")
    return run_simulation(
        lambda: _population(nodes, peers, messages, interval, size, latency_ms, seed,
                            settings),
        seed=seed, time_limit=3600.0, max_iterations=50_000_000)
