"""Case: what one gateway costs per node, and how that grows with registered nodes.

Scaling runs in the simulator: real nodes register with a real gateway over simulated
links (1 ms each way, so gateway and node work never share a call stack) in virtual time,
in one process. The gateway's share is measured, not guessed:
  CPU    CPU time spent inside the gateway core's handlers (receive_datagram, timers,
         datagrams_to_send), wrapped on the instance, plus the gateway's own garbage
         collector passes (gateway/heap.py); per registration, and per node per second
         while every node is idle and keeping its registration alive.
  memory bytes reachable from the gateway core (registry, control connections, limiter),
         walking gc referents and summing sys.getsizeof (plus the storage of aioquic's C
         buffers); module-level objects are not followed. OpenSSL's own contexts are not
         seen, so it is a floor (tracemalloc with full stacks, far too slow to run at
         10,000 nodes, found 97 KB per node at 50 nodes; this walk finds ~87 KB there);
         per node = growth between levels / nodes added.
Relay forwarding is timed without sockets too: relay frames fed straight to a GatewayCore
holding N registry entries, which is the ceiling of what one core can forward.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import types
from collections.abc import Callable
from typing import Any

_STOP = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
         types.CodeType, types.MethodType, types.FrameType)
GATEWAY_IP, GATEWAY_PORT = "203.0.113.10", 9443
_SETTLE = 5.0  # virtual seconds between the last registration and the idle window
_WARMUP = 20  # registrations before the first timed one
_IDLE_MAX = 150.0  # virtual seconds, the longest idle window (small levels)


def retained_bytes(root: object) -> int:
    """sys.getsizeof summed over everything reachable from `root` (each object once)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(obj, _STOP):
            continue
        total += sys.getsizeof(obj)
        if type(obj).__name__ == "Buffer" and isinstance(getattr(obj, "capacity", None), int):
            # aioquic's C Buffer: getsizeof sees its header only, not its storage (each
            # QUIC connection keeps three 16 KiB crypto buffers for its whole life).
            total += obj.capacity
        stack.extend(gc.get_referents(obj))
    return total


class HandlerClock:
    """Accumulates CPU time (this thread's clock: other processes on the machine do not
    count) spent in the wrapped methods of one object."""

    def __init__(self, obj: object, names: tuple[str, ...]) -> None:
        self.seconds = 0.0
        self.calls = 0
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, method: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.thread_time

        def timed(*args: Any) -> Any:
            t0 = clock()
            try:
                return method(*args)
            finally:
                self.seconds += clock() - t0
                self.calls += 1
        return timed

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


async def _scaling(levels: list[int], idle_s: float, batch: int,
                   gateways: int = 1) -> list[dict[str, Any]]:
    from macula.gateway.directory import MemoryStore
    from macula.identity import Identity
    from macula.node.node import Node
    from macula_lab.bench.gateways import start_gateway
    from macula_lab.sim import LinkConfig, SimNetwork

    net = SimNetwork(seed=11)
    link = LinkConfig.ms(1.0)
    hosts = [net.add_host(f"h{i}", net.internet, net.internet.allocate("192.0.2.0/24"), link=link)
             for i in range(max(1, (max(levels) + 1999) // 2000))]
    # A cluster shares the in-process store (Redis' work is not the gateways').
    store = MemoryStore() if gateways > 1 else None
    members = []
    clocks: list[HandlerClock] = []
    for g in range(gateways):
        ip = f"203.0.113.{10 + g}"
        server = net.add_host(f"server{g}", net.internet, (ip,), link=link)
        cluster: dict[str, Any] = ({"store": store, "cluster_advertise": (ip, GATEWAY_PORT)}
                                   if store is not None else {})
        gateway = await start_gateway(endpoint=server.open_endpoint(GATEWAY_PORT, ip),
                                      stun_endpoints=[server.open_endpoint(GATEWAY_PORT + 1, ip)],
                                      **cluster)
        members.append(gateway)
        clocks.append(HandlerClock(gateway.core, ("receive_datagram", "datagrams_to_send",
                                                  "handle_timer", "cluster_records",
                                                  "follow_members", "let_go_of_moved",
                                                  "directory_answers")))
        if gateway.core.cluster is not None:  # following the others' registrations
            clocks.append(HandlerClock(gateway.core.cluster, ("apply_change",)))
    if store is not None:
        await asyncio.sleep(3.0)  # members announced, mesh up
    loop = asyncio.get_running_loop()
    nodes: list[Node] = []
    rows = []

    def retained() -> int:
        return sum(retained_bytes(g.core) for g in members)

    def take() -> tuple[float, int]:
        spent = [c.take() for c in clocks]
        return sum(s for s, _ in spent), sum(n for _, n in spent)

    def heap_s() -> float:  # the gateways' own collector passes (gateway/heap.py)
        return sum(g.heap.cpu_s for g in members if g.heap is not None)

    base = retained()

    async def register(count: int) -> None:
        nonlocal nodes
        while count > 0:
            k = min(batch, count)
            nodes += await asyncio.gather(*[
                Node.start(Identity.generate(), gateway=members[(len(nodes) + i) % gateways].address,
                           endpoint=hosts[(len(nodes) + i) % len(hosts)].open_endpoint(),
                           nat_traversal=False, register_timeout=120)
                for i in range(k)])
            count -= k

    try:
        # First registrations pay for what every later one finds ready (imports, caches,
        # TLS contexts): they are not timed.
        await register(min(_WARMUP, max(0, levels[0] - 1)))
        for level in levels:
            take()
            heap0 = heap_s()
            real0 = time.process_time()
            added = max(0, level - len(nodes))
            await register(added)
            reg_s, _ = take()
            reg_s += heap_s() - heap0
            await asyncio.sleep(_SETTLE)  # handshake tails (acks, new CIDs) are not idling
            take()
            heap0 = heap_s()
            # Few nodes idle through a longer window (virtual time is free), so every
            # level averages over at least as many keepalives as 1,000 nodes in idle_s.
            window = min(_IDLE_MAX, max(idle_s, idle_s * 1000 / max(1, level)))
            await asyncio.sleep(window)
            idle_gw_s, idle_calls = take()
            idle_gw_s += heap_s() - heap0
            gc.collect()
            memory = retained()
            online = sum(g.core.nodes_online for g in members)
            rows.append({
                "registered": online,
                "gateways": gateways,
                "gateway_retained_bytes": memory,
                "gateway_bytes_per_node": round((memory - base) / max(1, online)),
                "registration_gateway_ms_per_node": round(reg_s / max(1, added) * 1000, 3),
                "registrations_per_cpu_s": round(added / reg_s) if reg_s > 0 else None,
                "idle_virtual_s": window,
                "idle_gateway_cpu_share": round(idle_gw_s / window, 5),
                "idle_gateway_us_per_node_per_s": round(idle_gw_s / window / level * 1e6, 3),
                "idle_handler_calls": idle_calls,
                "process_cpu_s": round(time.process_time() - real0, 2),
                "gateway_gc_passes": sum(g.heap.full_passes for g in members if g.heap),
                "gateway_gc_cpu_s": round(heap_s(), 3),
                "remote_nodes_known": [len(g.core.cluster.remote) for g in members
                                       if g.core.cluster is not None] or None,
                "virtual_now_s": round(loop.time(), 3),
            })
    finally:
        for node in nodes:
            node._driver.close()  # leaving politely costs 10k close handshakes; the run ends here
        for gateway in members:
            await gateway.close()
    return rows


def scaling(levels: list[int], *, idle_s: float = 15.0, batch: int = 250,
            gateways: int = 1) -> dict[str, Any]:
    """Per-node costs at each level; with `gateways` > 1, of a cluster of that many on one
    in-process directory (every cost summed over the members, per node of the cluster)."""
    from macula_lab.sim import run_simulation

    rows = run_simulation(lambda: _scaling(levels, idle_s, batch, gateways), seed=11,
                          time_limit=24 * 3600.0, max_iterations=200_000_000)
    first, last = rows[0], rows[-1]
    grown = last["registered"] - first["registered"]
    per_node = ((last["gateway_retained_bytes"] - first["gateway_retained_bytes"]) / grown
                if grown > 0 else None)

    def growth(key: str) -> float | None:
        a, b = first[key], last[key]
        return round(b / a, 3) if a and len(rows) > 1 else None

    return {"levels": rows, "bytes_per_idle_node": round(per_node) if per_node else None,
            "gateways": gateways,
            # The yardstick: the largest level against the smallest (goal <= 1.5).
            "idle_cpu_growth": growth("idle_gateway_us_per_node_per_s"),
            "registration_growth": growth("registration_gateway_ms_per_node"),
            "method": "simulator; gateway core handlers timed (and, in a cluster, applying "
                      "the directory's changes), plus the gateways' collector passes; "
                      "memory = bytes reachable from the gateway cores (Python objects; a "
                      "floor)"}


def relay_core_pps(registered: int, *, frames: int = 50_000, size: int = 1200,
                   profile: str | None = None) -> dict[str, Any]:
    """Relay frames fed straight into GatewayCore.receive_datagram: forwarding cost alone."""
    from macula.gateway.core import GatewayCore
    from macula.gateway.options import GatewayOptions
    from macula.gateway.registry import NodeEntry
    from macula.identity import Identity, NodeId
    from macula.wire.relay import TOKEN_BYTES, encode_to_gateway
    from macula_lab.bench.gateways import bench_limits
    from macula_lab.bench.profiling import maybe_profile

    limits, _ = bench_limits()
    options = GatewayOptions(limits=limits)
    core = GatewayCore(Identity.generate(), options)
    entries = []
    for i in range(max(2, registered)):
        # Documentation addresses (RFC 5737): nothing is ever sent, the core only returns.
        entry = NodeEntry(node_id=NodeId(os.urandom(16)),
                          address=(f"198.51.100.{1 + i % 250}", 20000 + i // 250),
                          token=os.urandom(TOKEN_BYTES), registered_at=0.0, last_seen=0.0)
        core.registry.register(entry)
        entries.append(entry)
    pairs = [(entries[i], entries[(i + 1) % len(entries)]) for i in range(min(64, len(entries)))]
    payload = b"\x40" + bytes(size - 1)
    work = [(encode_to_gateway(a.token, b.node_id.raw, payload), a.address) for a, b in pairs]
    receive, collect = core.receive_datagram, core.datagrams_to_send
    now = 1.0
    with maybe_profile(profile):
        t0 = time.process_time()
        for i in range(frames):
            data, addr = work[i % len(work)]
            receive(data, addr, now)
            if i % 32 == 31:
                collect(now)
                now += 0.001
        collect(now)
        cpu = time.process_time() - t0
    return {"registered": registered, "frames": frames, "relayed": core.relayed_packets,
            "cpu_s": round(cpu, 4),
            "pps_per_core": round(core.relayed_packets / cpu, 1) if cpu > 0 else None,
            "us_per_frame": round(cpu / frames * 1e6, 3)}
