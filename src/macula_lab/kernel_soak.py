"""`macula lab soak --kernel`: the soak in real time, each node a process behind a real NAT.

The ring, churn and accounting are lab.soak's; here every slot is a host namespace behind
its own NAT chain (presets in turn), each node a chaos_agent `member` process fed its
neighbours' ids on stdin, and the gateway the lab agent in the server namespace, so its
RSS is its own process's (/proc/PID/status VmRSS), read after the warm-up and at the end.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from macula.identity import Identity
from macula_lab.kernel import KernelLab, Peer, kernel_lab_available
from macula_lab.kernel.nat_rules import PRESETS
from macula_lab.kernel_chaos import GATEWAY_AGENT, LineAgent
from macula_lab.kernel_trial import AgentError, KernelLabUnavailable
from macula_lab.sim_trial import GATEWAY_PORT
from macula_lab.soak_plan import (
    CHURN_EVERY,
    LEAVE_TIMEOUT,
    REJOIN_AFTER,
    WARMUP_KERNEL,
    merge_records,
    neighbours,
    rss_kb,
)

START_TIMEOUT = 30.0


class _KernelSoak:
    def __init__(self, lab: KernelLab, workdir: Path, n: int, duration: float,
                 progress: Callable[[str], None] | None) -> None:
        self.lab = lab
        self.workdir = workdir
        self.n = n
        self.duration = duration
        self.progress = progress
        self.peers: list[Peer] = []
        self.members: dict[int, LineAgent] = {}
        self.ids: dict[int, str | None] = {}
        self.records: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.logged: list[str] = []
        self.errors = 0
        self.started = 0
        self.gateway: LineAgent | None = None
        self.gateway_address = f"{lab.server_ips[0]}:{GATEWAY_PORT}"

    def run(self) -> dict[str, Any]:
        budget = WARMUP_KERNEL + self.duration + 300.0
        self.gateway = LineAgent(
            self.lab, self.lab.server_ns,
            ["gateway", "--listen", self.gateway_address, "--second-ip", self.lab.server_ips[1],
             "--max-seconds", str(budget)], self.workdir, "gateway", module=GATEWAY_AGENT)
        ready = self.gateway.read_line(START_TIMEOUT)
        if not ready.get("ready"):
            raise AgentError(f"gateway agent did not start: {ready}")
        self.peers = [self.lab.add_peer(PRESETS[k % len(PRESETS)]) for k in range(self.n)]
        t0 = time.monotonic()
        for k in range(self.n):
            self._join(k, budget)
        warm_at, end_at = t0 + WARMUP_KERNEL, t0 + WARMUP_KERNEL + self.duration
        rss_warm = 0
        churned = tick = 0
        while time.monotonic() + CHURN_EVERY < end_at:
            time.sleep(CHURN_EVERY)
            slot = tick % self.n
            tick += 1
            self._leave(slot)
            time.sleep(REJOIN_AFTER)
            self._join(slot, budget)
            churned += 1
            if not rss_warm and time.monotonic() >= warm_at:
                rss_warm = rss_kb(self.gateway.proc.pid)
            if self.progress is not None:
                self.progress(f"t={time.monotonic() - t0:6.1f}s churned slot {slot}; gateway "
                              f"RSS {rss_kb(self.gateway.proc.pid)} kB")
        time.sleep(max(0.0, end_at - time.monotonic()))
        rss_warm = rss_warm or rss_kb(self.gateway.proc.pid)
        rss_end = rss_kb(self.gateway.proc.pid)
        for slot in list(self.members):
            self._announce(slot, None)
            self.members[slot].send({"leave": True})
        for slot in list(self.members):
            self._collect(slot)
        self.gateway.proc.terminate()
        figures = self._gateway_figures()
        merged = merge_records(self.records)
        return {**merged, "errors": self.errors, "failures": self.failures,
                "nodes_started": self.started, "churn": churned, "rss_kb_warm": rss_warm,
                "rss_kb_end": rss_end,
                "rss_growth": round(rss_end / rss_warm - 1, 4) if rss_warm else None,
                "warmup_s": WARMUP_KERNEL, **figures, **({"logged": self.logged[:10]} if self.logged else {})}

    def _join(self, slot: int, budget: float) -> None:
        self.started += 1
        key = self.workdir / f"slot{slot}-{self.started}.key"
        Identity.load_or_create(key)
        args = ["member", "--gateway", self.gateway_address, "--key-file", str(key),
                "--slot", str(slot), "--max-seconds", str(budget)]
        for j in neighbours(slot, self.n):
            args += ["--neighbour", str(j)]
        agent = LineAgent(self.lab, self.peers[slot].host_ns, args, self.workdir,
                          f"slot{slot}-{self.started}")
        try:
            line = agent.read_line(START_TIMEOUT)
        except AgentError as exc:
            self.failures.append(f"slot {slot} could not join: {exc}")
            return
        self.members[slot] = agent
        for j in neighbours(slot, self.n):
            if self.ids.get(j):
                agent.send({"peer": j, "id": self.ids[j]})
        self._announce(slot, line.get("node"))

    def _leave(self, slot: int) -> None:
        agent = self.members.get(slot)
        if agent is None:
            return
        self._announce(slot, None)
        agent.send({"leave": True})
        self._collect(slot)

    def _collect(self, slot: int) -> None:
        agent = self.members.pop(slot)
        try:
            result = agent.result(LEAVE_TIMEOUT + 10.0)
        except AgentError as exc:
            self.failures.append(f"slot {slot}: {exc}")
            return
        self.records += result.get("records", [])
        self.failures += result.get("failures", [])
        if result.get("error"):
            self.failures.append(f"slot {slot}: {result['error']}")
        self.errors += result.get("handler_errors", 0) + result.get("logged_errors", 0)
        self.logged += result.get("logged") or []

    def _announce(self, slot: int, node_id: str | None) -> None:
        self.ids[slot] = node_id
        for j in neighbours(slot, self.n):
            if j in self.members:
                self.members[j].send({"peer": slot, "id": node_id})

    def _gateway_figures(self) -> dict[str, Any]:
        assert self.gateway is not None
        try:
            final = self.gateway.result(15.0)
        except AgentError as exc:
            self.failures.append(f"gateway: {exc}")
            return {}
        self.errors += final.get("handler_errors", 0)
        return {"gateway_nodes_online": final.get("nodes_online"),
                "gateway_relayed_packets": final.get("relayed_packets"),
                "gateway_registrations": final.get("registrations"),
                "gateway_dropped": final.get("dropped")}


def run_kernel_soak(*, minutes: float, nodes: int, seed: int = 1,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    ok, reason = kernel_lab_available()
    if not ok:
        raise KernelLabUnavailable(f"the kernel NAT lab cannot run here: {reason}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="macula-kernel-soak-"))
    try:
        with KernelLab() as lab:
            soak = _KernelSoak(lab, workdir, nodes, minutes * 60.0, progress)
            try:
                result = soak.run()
            finally:
                for agent in [*soak.members.values(), soak.gateway]:
                    if agent is not None:
                        agent.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.update({"backend": "kernel", "minutes": minutes, "nodes": nodes, "seed": seed,
                   "rss_of": "gateway process",
                   "elapsed_s": round(time.monotonic() - started, 2)})
    return result
