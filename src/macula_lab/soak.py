"""`macula lab soak`: many nodes behind mixed NATs talking for minutes, with churn.

By default the soak runs in the simulator, in virtual minutes: that is the only place
without root where nodes sit behind every kind of NAT (open, cones, symmetric, CGNAT), and
a virtual minute of traffic costs seconds, so `make test` can afford one. The traffic is
real node and gateway code at real rates (each flow a message every 0.25 s), and every
timer (keepalives, expiries, QUIC) runs as it would in real time. The gateway then lives
in the soak's process, so the RSS figure is that process's, which also holds the nodes and
the simulator: an upper bound on the gateway's growth. `gateway_retained_kb_*` is the
gateway's own object graph, measured directly. With --kernel every node is its own
process in a namespace behind a real NAT and the gateway runs in the server namespace, in
real minutes; the RSS is then the gateway process's own (/proc/PID/status VmRSS); see
lab.kernel_soak.

Warm-up: the measured minutes follow a warm-up (WARMUP_SIM virtual seconds, one session
idle timeout: by then imports, first allocations and every cache with a time horizon -
QUIC timer heaps, closed connections awaiting their last timer, NAT tables - have reached
their steady size) that already saw registrations, punches, relayed and direct sessions
and churn. The RSS baseline is read after a full garbage collection at its end, the final
figure likewise at the end of the run. Messages, loss and errors count the whole run.

Shape: N slots in a ring, each talking to the slots 1 and 3 away (4 sessions per node
once N >= 7). Every CHURN_EVERY seconds one slot's node leaves in order (its conversations
end with FINs both ways) and a node with a new identity joins on the same host a second
later. Lost and duplicated come from merging every sender's count with every receiver's.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from macula.identity import NodeId
from macula.node.node import Node
from macula_lab.chaos import seeded_identity, start_sim_gateway
from macula_lab.errorlog import ErrorLog
from macula_lab.kernel_soak import run_kernel_soak
from macula_lab.sim import SimHost, SimNetwork, build_site, run_simulation
from macula_lab.sim.presets import PRESETS, SERVER_IPS
from macula_lab.sim_trial import GATEWAY_PORT
from macula_lab.soak_member import Slot, SoakMember
from macula_lab.soak_plan import (
    CHURN_EVERY,
    ITERATIONS_PER_MINUTE,
    LATENCY_MS,
    LEAVE_TIMEOUT,
    REJOIN_AFTER,
    WARMUP_SIM,
    merge_records,
    neighbours,
    retained_kb,
    rss_kb,
)


def run_soak(*, minutes: float, nodes: int, kernel: bool = False, seed: int = 1,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if kernel:
        return run_kernel_soak(minutes=minutes, nodes=nodes, seed=seed, progress=progress)
    started = time.monotonic()
    duration = minutes * 60.0
    with ErrorLog() as log:
        soak = _SimSoak(nodes, duration, seed, progress)
        result = run_simulation(soak.main, seed=seed, time_limit=WARMUP_SIM + duration + 600.0,
                                max_iterations=int(ITERATIONS_PER_MINUTE
                                                   * (WARMUP_SIM / 60 + max(1.0, minutes))))
    result["errors"] += log.count
    if log.records:
        result["logged"] = log.records[:10]
    result.update({"backend": "simulator", "minutes": minutes, "nodes": nodes, "seed": seed,
                   "rss_of": "soak process (gateway, nodes and simulator)",
                   "elapsed_s": round(time.monotonic() - started, 2)})
    return result


@dataclass
class _Lifetime:
    node: Node
    member: SoakMember
    task: asyncio.Task[None]


@dataclass
class _SimSoak:
    n: int
    duration: float
    seed: int
    progress: Callable[[str], None] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    handler_errors: int = 0
    started: int = 0
    churned: int = 0
    current: dict[int, NodeId | None] = field(default_factory=dict)
    lives: dict[int, _Lifetime] = field(default_factory=dict)
    views: dict[int, dict[int, Slot]] = field(default_factory=dict)  # member -> its slots

    async def main(self) -> dict[str, Any]:
        net = SimNetwork(seed=self.seed)
        server = net.add_host("server", net.internet, SERVER_IPS, seed=self.seed)
        hosts = [build_site(net, f"n{k}", PRESETS[k % len(PRESETS)], latency_ms=LATENCY_MS,
                            seed=self.seed).host for k in range(self.n)]
        gateway = await start_sim_gateway(server, seeded_identity(self.seed, "soak-gateway"))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        warm_at, end_at = t0 + WARMUP_SIM, t0 + WARMUP_SIM + self.duration
        warm: tuple[int, int] | None = None
        try:
            for k in range(self.n):
                await self._join(k, hosts[k])
            tick = 0
            while loop.time() + CHURN_EVERY < end_at:
                await asyncio.sleep(CHURN_EVERY)
                slot = tick % self.n
                tick += 1
                await self._leave(slot)
                await asyncio.sleep(REJOIN_AFTER)
                await self._join(slot, hosts[slot])
                self.churned += 1
                if warm is None and loop.time() >= warm_at:
                    warm = (_settled_rss(), retained_kb(gateway.core))
                if self.progress is not None:
                    self.progress(f"t={loop.time() - t0:6.1f}s churned slot {slot}; "
                                  f"{gateway.core.nodes_online} online, "
                                  f"{gateway.core.relayed_packets} relayed")
            await asyncio.sleep(max(0.0, end_at - loop.time()))
            paths = Counter(s.path for life in self.lives.values()
                            for s in life.node.core.sessions.values())
            rss_end = _settled_rss()
            if warm is None:
                warm = (rss_end, retained_kb(gateway.core))
            rss_warm, retained_warm = warm
            figures = {"gateway_retained_kb_warm": retained_warm,
                       "gateway_retained_kb_end": retained_kb(gateway.core),
                       "gateway_nodes_online": gateway.core.nodes_online,
                       "gateway_relayed_packets": gateway.core.relayed_packets,
                       "gateway_registrations": gateway.core.registrations,
                       "gateway_dropped": dict(gateway.core.dropped)}
            await asyncio.gather(*(self._leave(k) for k in list(self.lives)))
            self.handler_errors += gateway.handler_errors
        finally:
            for life in self.lives.values():
                await life.node.close()
            await gateway.close()
        merged = merge_records(self.records)
        return {**merged, "errors": self.handler_errors, "failures": self.failures,
                "nodes_started": self.started, "churn": self.churned,
                "rss_kb_warm": rss_warm, "rss_kb_end": rss_end,
                "rss_growth": round(rss_end / rss_warm - 1, 4) if rss_warm else None,
                "paths": dict(paths), "warmup_s": WARMUP_SIM,
                "virtual_s": round(loop.time() - t0, 3), **figures}

    async def _join(self, slot: int, host: SimHost) -> None:
        self.started += 1
        identity = seeded_identity(self.seed, f"soak/{slot}/{self.started}")
        try:
            node = await Node.start(identity, gateway=(SERVER_IPS[0], GATEWAY_PORT),
                                    endpoint=host.open_endpoint(),
                                    register_timeout=30.0)
        except Exception as exc:
            self.failures.append(f"slot {slot} could not join: {type(exc).__name__}: {exc}")
            return
        view = {j: Slot(j, self.current.get(j)) for j in neighbours(slot, self.n)}
        self.views[slot] = view
        member = SoakMember(node, slot, list(view.values()))
        self.lives[slot] = _Lifetime(node, member, asyncio.create_task(member.run()))
        self._announce(slot, node.node_id)

    async def _leave(self, slot: int) -> None:
        life = self.lives.pop(slot, None)
        if life is None:
            return
        self._announce(slot, None)
        self.views.pop(slot, None)
        life.member.leaving.set()
        try:
            await asyncio.wait_for(life.task, LEAVE_TIMEOUT)
        except TimeoutError:
            self.failures.append(f"slot {slot}: conversations did not end in {LEAVE_TIMEOUT} s")
        self.records += life.member.records()
        self.failures += life.member.failures
        self.handler_errors += life.node.handler_errors
        await life.node.close()

    def _announce(self, slot: int, node_id: NodeId | None) -> None:
        self.current[slot] = node_id
        for view in self.views.values():
            if slot in view:
                view[slot].set(node_id)


def _settled_rss() -> int:
    gc.collect()
    return rss_kb()
