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
from typing import Any

# A plausible consumer mix (mobile carriers behind CGNAT, many home routers port
# restricted, some symmetric enterprise/mobile NATs). Weights, not exact counts.
MIX: dict[str, float] = {"open": 0.10, "full_cone": 0.10, "restricted_cone": 0.15,
                         "port_restricted": 0.35, "symmetric": 0.15, "cgnat": 0.15}
GATEWAY_IP, GATEWAY_IP2, GATEWAY_PORT = "203.0.113.10", "203.0.113.20", 9443


def _plan_sites(nodes: int, rng: random.Random) -> list[tuple[str, int]]:
    """(preset, hosts) per site until `nodes` hosts are placed."""
    names, weights = list(MIX), list(MIX.values())
    sites: list[tuple[str, int]] = []
    placed = 0
    while placed < nodes:
        preset = rng.choices(names, weights)[0]
        hosts = 1 if preset == "open" else min(nodes - placed, rng.choice((1, 1, 2, 3)))
        sites.append((preset, hosts))
        placed += hosts
    return sites


async def _population(nodes: int, peers: int, messages: int, interval: float, size: int,
                      latency_ms: float, seed: int, hard_nat: bool) -> dict[str, Any]:
    from macula.identity import Identity
    from macula.node.node import Node, PeerSession
    from macula_lab.bench.gateways import start_gateway
    from macula_lab.sim import SERVER_IPS, SimNetwork, build_site

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
    sessions: list[PeerSession] = []
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
                sessions.append(session)
                tasks.append(asyncio.create_task(drain(session)))

        async def talk(node: Node, peer_index: int) -> None:
            session = await node.connect(members[peer_index].node_id, timeout=30)
            sessions.append(session)
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
        seen: set[int] = set()
        for session in sessions:
            if id(session) in seen:
                continue
            seen.add(id(session))
            stats = session.stats()
            final_paths[stats["connection_type"]] += 1
            for path, counts in stats["bytes_by_path"].items():
                by_path[path] += counts["sent"]
        total = sum(by_path.values())
        relayed = total - by_path.get("direct", 0)
        return {
            "nodes": len(members), "sites": len(set(h.name.split(".")[0] for h in hosts)),
            "nat_mix": dict(Counter(presets_of)), "peers_per_node": peers,
            "hard_nat": hard_nat,
            "messages_per_session": messages, "message_bytes": size,
            "interval_s": interval, "latency_ms_per_uplink": latency_ms,
            "virtual_seconds": round(loop.time() - started, 3),
            "sessions": len(seen) // 2 or len(seen), "dials_failed": len(failed),
            "dial_errors": sorted({f"{type(e).__name__}: {e}" for e in failed})[:3],
            "final_paths_per_session_end": dict(final_paths),
            "bytes_by_path": dict(by_path), "total_bytes": total, "relayed_bytes": relayed,
            "gateway_relayed_bytes": gateway.core.relayed_bytes,
            "relayed_byte_share": round(relayed / total, 4) if total else None,
        }
    finally:
        for task in tasks:
            task.cancel()
        for node in members:
            await node.close(linger=0)
        await gateway.close()


def run(nodes: int, *, peers: int = 3, messages: int = 60, interval: float = 0.05,
        size: int = 200, latency_ms: float = 10.0, seed: int = 7,
        hard_nat: bool = False) -> dict[str, Any]:
    from macula_lab.sim import run_simulation

    return run_simulation(
        lambda: _population(nodes, peers, messages, interval, size, latency_ms, seed,
                            hard_nat),
        seed=seed, time_limit=3600.0, max_iterations=50_000_000)
