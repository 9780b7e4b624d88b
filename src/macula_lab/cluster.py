"""`macula lab cluster`: a gateway cluster under load and under faults.

N gateways share one directory (the simulator's in-process store; a real redis-server in
the kernel lab) and M nodes behind the NAT presets list every gateway, each in its own
order, so their homes spread over the cluster. Nodes pair up (0-1, 2-3, ...) so every
session crosses two gateways, and each pair streams numbered messages both ways for the
whole run. Halfway through, the chosen fault: `kill` K gateways (a crash: no goodbye),
`drain` K (the graceful exit), or take the directory away for `redis_down` seconds (a
Redis restart: it comes back empty) while a new session between two nodes of one gateway
must still open.

Figures: sessions connected, their final paths (direct, or relayed across the mesh / TURN),
messages lost and duplicated, the longest pause a receiver saw, and for the nodes of a
killed or drained gateway how long they took to register at another (failover_ms).
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from macula.gateway.directory import MemoryStore
from macula.gateway.server import Gateway
from macula.identity import Identity
from macula.net.endpoint import Address
from macula.node.node import Node
from macula_lab.peer import run_peer
from macula_lab.sim import SimNetwork, build_site, run_simulation

# The presets nodes sit behind, in turn: punchable pairs go direct, the others relay. The
# last pair is two symmetric NATs, which nothing but a relay joins (with hard-NAT guessing
# on, as shipped, a symmetric NAT against a port-restricted one goes direct), so every
# run has sessions relayed across the mesh.
CLUSTER_PRESETS = ("port_restricted", "open", "symmetric", "full_cone", "cgnat",
                   "restricted_cone", "symmetric", "symmetric")
GATEWAY_PORT = 9443


@dataclass(frozen=True)
class ClusterOptions:
    gateways: int = 3
    nodes: int = 24
    kill: int = 0
    drain: int = 0
    redis_down: float = 0.0
    latency_ms: float = 10.0
    duration: float = 12.0  # seconds each session streams
    interval: float = 0.02  # seconds between a side's messages
    seed: int = 7

    def __post_init__(self) -> None:
        if self.gateways < 1 or self.nodes < 2 or self.nodes % 2:
            raise ValueError("need at least one gateway and an even number (>= 2) of nodes")
        if self.kill + self.drain >= self.gateways and (self.kill or self.drain):
            raise ValueError("--kill and --drain must leave at least one gateway running")
        if sum(bool(x) for x in (self.kill, self.drain, self.redis_down)) > 1:
            raise ValueError("one fault per run: --kill, --drain or --redis-down")

    @property
    def fault(self) -> str | None:
        return ("kill" if self.kill else "drain" if self.drain
                else "redis_down" if self.redis_down else None)

    @property
    def messages(self) -> int:
        return max(1, int(self.duration / self.interval))


def gateway_ip(index: int) -> str:
    return f"203.0.113.{101 + index}"


def gateway_order(node: int, gateways: list[Address]) -> list[Address]:
    """Node i lists gateway i % N first: homes spread evenly when RTTs are equal."""
    start = node % len(gateways)
    return gateways[start:] + gateways[:start]


def run_sim_cluster(options: ClusterOptions) -> dict[str, Any]:
    return run_simulation(lambda: _sim_cluster(options), seed=options.seed, time_limit=900.0)


async def _sim_cluster(options: ClusterOptions) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    net = SimNetwork(seed=options.seed)
    store = MemoryStore()
    gateways: list[Gateway] = []
    nodes: list[Node] = []
    try:
        for index in range(options.gateways):
            host = net.add_host(f"gw{index}", net.internet, gateway_ip(index),
                                seed=options.seed)
            ip = gateway_ip(index)
            gateways.append(await Gateway.start(
                Identity.generate(), endpoint=host.open_endpoint(GATEWAY_PORT, ip),
                stun_endpoints=[host.open_endpoint(GATEWAY_PORT + 1, ip)], store=store,
                cluster_advertise=(ip, GATEWAY_PORT)))
        await asyncio.sleep(2.0)  # members announced, mesh links up
        addresses = [g.address for g in gateways]
        ids = {g.address: g.node_id for g in gateways}
        for index in range(options.nodes):
            preset = CLUSTER_PRESETS[index % len(CLUSTER_PRESETS)]
            site = build_site(net, f"n{index}", preset, latency_ms=options.latency_ms,
                              seed=options.seed + index)
            order = gateway_order(index, addresses)
            nodes.append(await Node.start(
                Identity.generate(), endpoint=site.host.open_endpoint(),
                gateways=[(address, ids[address]) for address in order],
                register_timeout=30.0, socket_opener=site.host.open_udp_endpoint))
        await asyncio.gather(*(node.wait_registered(30.0) for node in nodes))
        await asyncio.sleep(1.0)  # the directory has every node

        harness = _Harness(options, gateways, nodes, store, loop.time)
        return await harness.run(_sim_fault(options, gateways, store))
    finally:
        for node in nodes:
            await node.close()
        for gateway in gateways:
            await gateway.close()


def _sim_fault(options: ClusterOptions, gateways: list[Gateway],
               store: MemoryStore) -> Any:
    """The fault as a coroutine factory the harness runs halfway."""
    async def kill() -> list[int]:
        for gateway in gateways[:options.kill]:
            gateway.abort()  # kill -9: sockets and timers stop, nothing says goodbye
        return list(range(options.kill))

    async def drain() -> list[int]:
        for gateway in gateways[:options.drain]:
            asyncio.ensure_future(_drain_and_close(gateway))
        return list(range(options.drain))

    async def redis_down() -> list[int]:
        store.set_available(False)
        store.clear()  # a Redis restart without persistence: it comes back empty
        asyncio.get_running_loop().call_later(options.redis_down, store.set_available, True)
        return []

    return {"kill": kill, "drain": drain, "redis_down": redis_down}.get(options.fault or "")


async def _drain_and_close(gateway: Gateway) -> None:
    await gateway.drain()
    await gateway.close()


class _Harness:
    """Sessions, the fault at half time, and the figures."""

    def __init__(self, options: ClusterOptions, gateways: list[Gateway], nodes: list[Node],
                 store: MemoryStore | None, clock: Any) -> None:
        self.options = options
        self.gateways = gateways
        self.nodes = nodes
        self.store = store
        self.clock = clock

    def home(self, node: Node) -> int | None:
        for index, gateway in enumerate(self.gateways):
            if node.core.gateway == gateway.address:
                return index
        return None

    async def run(self, fault: Any) -> dict[str, Any]:
        options = self.options
        pairs = [(self.nodes[i], self.nodes[i + 1]) for i in range(0, len(self.nodes), 2)]
        homes_before = [self.home(node) for node in self.nodes]
        streams = [asyncio.gather(
            run_peer(a, b.node_id, dial=True, messages=options.messages,
                     interval=options.interval, settle=20.0),
            run_peer(b, a.node_id, dial=False, messages=options.messages,
                     interval=options.interval, settle=20.0)) for a, b in pairs]
        sessions = asyncio.ensure_future(asyncio.gather(*streams))
        await asyncio.sleep(options.duration / 2)
        fault_at = self.clock()
        affected_gateways: list[int] = await fault() if fault is not None else []
        failover = await self._failover(affected_gateways, homes_before, fault_at)
        outage = await self._outage_session(homes_before) if options.redis_down else None
        results = await sessions
        return cluster_figures(options, "sim", results, failover, outage, homes_before)

    async def _failover(self, gone: list[int], homes: list[int | None],
                        fault_at: float) -> list[float]:
        """How long each node of a gone gateway took to register at another one."""
        moving = {i for i, home in enumerate(homes) if home in gone}
        done: dict[int, float] = {}
        deadline = fault_at + 15.0
        while moving - done.keys() and self.clock() < deadline:
            for i in moving - done.keys():
                node = self.nodes[i]
                if node.core.registered and self.home(node) not in gone:
                    done[i] = (self.clock() - fault_at) * 1000
            await asyncio.sleep(0.005)
        return [done.get(i, float("inf")) for i in sorted(moving)]

    async def _outage_session(self, homes: list[int | None]) -> dict[str, Any]:
        """During the directory outage, two nodes of one gateway open a new session."""
        await asyncio.sleep(min(1.0, self.options.redis_down / 2))
        by_home: dict[int | None, list[int]] = {}
        for i, home in enumerate(homes):
            by_home.setdefault(home, []).append(i)
        pair = next((v[:2] for v in by_home.values() if len(v) >= 2), None)
        if pair is None:
            return {"tried": False, "connected": False, "error": "no two nodes share a gateway"}
        a, b = self.nodes[pair[0]], self.nodes[pair[1]]
        results = await asyncio.gather(
            run_peer(a, b.node_id, dial=True, messages=20, interval=0.01, settle=10.0),
            run_peer(b, a.node_id, dial=False, messages=20, interval=0.01, settle=10.0))
        return {"tried": True, "connected": all(r["connected"] for r in results),
                "lost": sum(r.get("lost", 0) for r in results),
                "error": next((r["error"] for r in results if r.get("error")), None)}


def cluster_figures(options: ClusterOptions, mode: str,
                    results: list[tuple[dict[str, Any], dict[str, Any]]],
                    failover: list[float], outage: dict[str, Any] | None,
                    homes: list[int | None]) -> dict[str, Any]:
    """The run's JSON: per session pair (dialer, acceptor) as lab.peer reports a side."""
    connected = [pair for pair in results if all(side["connected"] for side in pair)]
    paths = [_final_path(pair) for pair in connected]
    lost = sum(side.get("lost", 0) for pair in results for side in pair
               if side["connected"])
    duplicated = sum(side.get("duplicated", 0) for pair in results for side in pair)
    pauses = [side.get("max_gap_ms") or 0.0 for pair in connected for side in pair]
    finite = [f for f in failover if f != float("inf")]
    errors = sorted({side["error"][:160] for pair in results for side in pair
                     if side.get("error")})
    return {
        "mode": mode,
        "gateways": options.gateways,
        "nodes": options.nodes,
        "sessions": len(results),
        "connected": len(connected),
        "direct": paths.count("direct"),
        "relayed": len(paths) - paths.count("direct"),
        "turn": paths.count("turn"),
        "lost": lost,
        "duplicated": duplicated,
        "fault": options.fault,
        "failover_nodes": len(failover),
        "failover_moved": len(finite),
        # A node that never moved counts as slowest for the median; the max is over
        # those that moved (failover_moved < failover_nodes says some did not).
        "failover_ms_p50": _finite_or_none(statistics.median(failover)) if failover
        else None,
        "failover_ms_max": round(max(finite), 1) if finite else None,
        "max_pause_ms": round(max(pauses), 1) if pauses else None,
        "outage_session": outage,
        "homes": [sum(1 for h in homes if h == g) for g in range(options.gateways)],
        "cross_gateway_sessions": sum(1 for i in range(0, len(homes), 2)
                                      if homes[i] != homes[i + 1]),
        "pairs": [{"nat": [CLUSTER_PRESETS[i % len(CLUSTER_PRESETS)],
                           CLUSTER_PRESETS[(i + 1) % len(CLUSTER_PRESETS)]],
                   "homes": [homes[i], homes[i + 1]],
                   "path": _final_path(pair) if all(s["connected"] for s in pair)
                   else None,
                   "lost": sum(s.get("lost", 0) for s in pair),
                   # The dialer's path changes, in order (relay -> direct is the upgrade).
                   "path_history": [h["path"] for h in pair[0].get("path_history") or []],
                   "punches": [f"{o.get('outcome')}:{o.get('reason')}"
                               for o in (pair[0].get("upgrade") or {}).get("outcomes", [])],
                   "max_pause_ms": max(s.get("max_gap_ms") or 0.0 for s in pair)}
                  for i, pair in zip(range(0, len(homes), 2), results, strict=True)],
        "errors": errors[:10],
        "options": asdict(options),
    }


def _finite_or_none(value: float) -> float | None:
    return round(value, 1) if value != float("inf") else None


def _final_path(pair: tuple[dict[str, Any], dict[str, Any]]) -> str:
    paths = {side.get("path") for side in pair}
    if paths == {"direct"}:
        return "direct"
    return "turn" if "turn" in paths and "relay" not in paths else "relay"


def cluster_ok(result: dict[str, Any]) -> bool:
    """Every session connected, nothing lost or duplicated, every node re-homed within
    10 s, and a session opened during a directory outage."""
    outage = result.get("outage_session")
    return (result["connected"] == result["sessions"] and result["lost"] == 0
            and result["duplicated"] == 0
            and result["failover_moved"] == result["failover_nodes"]
            and (outage is None or bool(outage.get("connected"))))


def summary_line(result: dict[str, Any]) -> str:
    return (f"cluster ({result['mode']}): {result['gateways']} gateways, {result['nodes']} "
            f"nodes, {result['connected']}/{result['sessions']} sessions connected, "
            f"{result['direct']} direct, {result['relayed']} relayed; lost "
            f"{result['lost']}, duplicated {result['duplicated']}; fault "
            f"{result['fault'] or 'none'}; failover p50 {result['failover_ms_p50']} ms, "
            f"max {result['failover_ms_max']} ms; longest pause {result['max_pause_ms']} ms")
