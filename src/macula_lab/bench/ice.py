"""Case: how long until two peers have a working direct path, ours vs aioice, on loopback.

Ours: two registered nodes (NAT discovery finished, as a node that has been up a while);
the clock runs from `connect()` until the session's path is "direct", read through the
public API only (connection_type, polled every millisecond while a message trickles so the
path switch shows), so it keeps measuring whatever negotiates the path underneath.
Theirs: two aioice agents in this process, host candidates on 127.0.0.1 only: gather,
exchange candidates and credentials in memory (free signalling), connect (checks and
nomination) until both agents report connected.
Both sides pay the same event loop and the same loopback.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from typing import Any

from macula_lab.bench.gateways import start_gateway

_POLL = 0.001


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return round(ordered[rank - 1], 3)


def distribution(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "mean": round(statistics.fmean(values), 3) if values else None,
            "samples": [round(v, 3) for v in values]}


async def _ours_once(gateway_addr: tuple[str, int]) -> dict[str, Any]:
    from macula.identity import Identity
    from macula.node.node import Node

    loop = asyncio.get_running_loop()
    nodes = []
    try:
        for _ in range(2):
            nodes.append(await Node.start(Identity.generate(), gateway=gateway_addr,
                                          listen=("127.0.0.1", 0)))
        for node in nodes:  # both have finished their NAT discovery, as long-lived nodes have
            deadline = loop.time() + 3.0
            while node.detect_nat_type() is None and loop.time() < deadline:
                await asyncio.sleep(0.005)
        a, b = nodes
        t0 = loop.time()
        session = await a.connect(b.node_id, timeout=10)
        connected_ms = (loop.time() - t0) * 1000
        deadline = t0 + 10.0
        while session.connection_type != "direct" and loop.time() < deadline:
            session.send(b".")
            await asyncio.sleep(_POLL)
        direct_ms = (loop.time() - t0) * 1000 if session.connection_type == "direct" else None
        stats = session.stats()
        ice = stats.get("ice") or {}
        return {"connect_ms": round(connected_ms, 3),
                "direct_ms": round(direct_ms, 3) if direct_ms is not None else None,
                "upgrade_ms": (stats.get("upgrade") or {}).get("upgrade_ms"),
                "ice_ms": ice.get("ice_ms") if isinstance(ice, dict) else None}
    finally:
        for node in nodes:
            await node.close(linger=0)


async def _aioice_once() -> dict[str, Any]:
    import aioice
    from aioice import ice as aioice_ice

    loop = asyncio.get_running_loop()
    # Host candidates on loopback only: the bench sends nowhere else.
    aioice_ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    a = aioice.Connection(ice_controlling=True, components=1, use_ipv6=False)
    b = aioice.Connection(ice_controlling=False, components=1, use_ipv6=False)
    try:
        t0 = loop.time()
        await asyncio.gather(a.gather_candidates(), b.gather_candidates())
        gathered = loop.time()
        for me, other in ((a, b), (b, a)):
            for candidate in other.local_candidates:
                await me.add_remote_candidate(candidate)
            await me.add_remote_candidate(None)
            me.remote_username = other.local_username
            me.remote_password = other.local_password
        t1 = loop.time()
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 10)
        done = loop.time()
        return {"gather_ms": round((gathered - t0) * 1000, 3),
                "connect_ms": round((done - t1) * 1000, 3),
                "total_ms": round((done - t0) * 1000, 3)}
    finally:
        await a.close()
        await b.close()


async def run(trials: int) -> dict[str, Any]:
    gateway = await start_gateway()
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    try:
        for _ in range(trials):  # interleaved, so machine noise hits both alike
            ours.append(await _ours_once(gateway.address))
            theirs.append(await _aioice_once())
    finally:
        await gateway.close()
    direct = [r["direct_ms"] for r in ours if r["direct_ms"] is not None]
    total = [r["total_ms"] for r in theirs]
    out: dict[str, Any] = {
        "trials": trials,
        "macula": {"connect_to_direct_ms": distribution(direct),
                   "connect_ms": distribution([r["connect_ms"] for r in ours]),
                   "upgrade_ms": distribution([r["upgrade_ms"] for r in ours
                                               if r["upgrade_ms"] is not None]),
                   "ice_ms": distribution([r["ice_ms"] for r in ours if r["ice_ms"] is not None]),
                   "direct_share": round(len(direct) / trials, 3)},
        "aioice": {"total_ms": distribution(total),
                   "gather_ms": distribution([r["gather_ms"] for r in theirs]),
                   "connect_ms": distribution([r["connect_ms"] for r in theirs])},
    }
    return out
