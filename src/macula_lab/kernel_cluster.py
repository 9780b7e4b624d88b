"""`macula lab cluster --kernel`: the cluster run with real processes and real NATs.

The server namespace holds a real redis-server and N gateway processes (one port each on
the server's address); every node is a process in its own namespace behind a real NAT
chain (lab.cluster's presets in turn) with a delay line on its uplink. The harness starts
all streams at once ({"go"}), applies the fault halfway (SIGKILL to a gateway, {"drain"}
to it, or killing redis-server and starting it again empty after the outage) and folds the
agents' results into lab.cluster's figures. Failover times come from the nodes' own
registration logs, on the monotonic clock every process here shares.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from macula.identity import Identity
from macula_lab.cluster import (
    CLUSTER_PRESETS,
    GATEWAY_PORT,
    ClusterOptions,
    cluster_figures,
    gateway_order,
)
from macula_lab.kernel import KernelLab, kernel_lab_available
from macula_lab.kernel_chaos import LineAgent
from macula_lab.kernel_trial import AgentError, KernelLabUnavailable
from macula_lab.redis_server import RedisServer, redis_available

CLUSTER_AGENT = "macula_lab.cluster_agent"
START_TIMEOUT = 30.0
REDIS_PORT = 6379
MESH_SETTLE = 2.5  # seconds for members to find each other and link up
OUTAGE_NODES = ("port_restricted", "open")  # the pair that opens a session mid-outage


class _KernelCluster:
    def __init__(self, lab: KernelLab, workdir: Path, options: ClusterOptions,
                 progress: Callable[[str], None] | None) -> None:
        self.lab = lab
        self.workdir = workdir
        self.options = options
        self.progress = progress or (lambda line: None)
        self.ip = lab.server_ips[0]
        self.redis = RedisServer(
            listen_ip=self.ip, port=REDIS_PORT,
            popen=lambda argv, **kw: lab.popen(lab.server_ns, argv, **kw),
            ready_probe=lambda ip, port: lab.tcp_open(lab.server_ns, ip, port))
        self.gateways: list[LineAgent] = []
        self.gateway_ids: list[str] = []
        self.nodes: list[LineAgent] = []
        self.budget = options.duration + 120.0

    def address(self, index: int) -> str:
        return f"{self.ip}:{GATEWAY_PORT + 10 * index}"

    def run(self) -> dict[str, Any]:
        options = self.options
        self.redis.start()
        for index in range(options.gateways):
            agent = LineAgent(self.lab, self.lab.server_ns,
                              ["gateway", "--listen", self.address(index), "--redis",
                               self.redis.url, "--max-seconds", str(self.budget)],
                              self.workdir, f"gw{index}", module=CLUSTER_AGENT)
            self.gateways.append(agent)
            ready = agent.read_line(START_TIMEOUT)
            if not ready.get("ready"):
                raise AgentError(f"gateway {index} did not start: {ready}")
            self.gateway_ids.append(ready["node_id"])
        time.sleep(MESH_SETTLE)
        self.progress(f"{options.gateways} gateways up; starting {options.nodes} nodes")
        peers = [self.lab.add_peer(CLUSTER_PRESETS[i % len(CLUSTER_PRESETS)],
                                   latency_ms=options.latency_ms, seed=options.seed + i)
                 for i in range(options.nodes)]
        ids = []
        for i in range(options.nodes):
            key = self.workdir / f"node{i}.key"
            ids.append(Identity.load_or_create(key).node_id.text)
        for i, peer in enumerate(peers):
            partner = i + 1 if i % 2 == 0 else i - 1
            self.nodes.append(self._node(i, peer.host_ns, ids[partner], dial=i % 2 == 0,
                                         messages=options.messages))
        homes = [self._home(agent.read_line(START_TIMEOUT)) for agent in self.nodes]
        self.progress(f"nodes registered, homes {homes}; streaming")
        for agent in self.nodes:
            agent.send({"go": True})
        time.sleep(options.duration / 2)
        fault_at = time.monotonic()
        gone = self._fault()
        outage = self._outage_session() if options.redis_down else None
        results = [agent.result(options.duration + 60.0) for agent in self.nodes]
        pairs = [(results[i], results[i + 1]) for i in range(0, len(results), 2)]
        failover = self._failover(results, homes, gone, fault_at)
        gateway_results = self._stop_gateways(gone)
        figures = cluster_figures(options, "kernel", pairs, failover, outage, homes)
        figures["gateway_errors"] = sum(r.get("handler_errors", 0) + r.get("logged_errors", 0)
                                        for r in gateway_results)
        figures["node_errors"] = sum(r.get("handler_errors", 0) for r in results)
        figures["gateway_results"] = [{k: r.get(k) for k in (
            "mesh_links", "members", "remote_nodes", "relayed_packets", "mesh_sent_bytes",
            "dropped", "directory_outages", "drain", "error", "logged")}
            for r in gateway_results]
        return figures

    def _node(self, index: int, ns: str, peer: str, *, dial: bool, messages: int,
              interval: float | None = None, first: int | None = None) -> LineAgent:
        order = gateway_order(index if first is None else first,
                              list(range(self.options.gateways)))
        gateways = ",".join(f"{self.gateway_ids[g]}@{self.address(g)}" for g in order)
        return LineAgent(self.lab, ns, [
            "node", "--gateways", gateways, "--key-file", str(self.workdir / f"node{index}.key"),
            "--peer", peer, "--dial" if dial else "--accept", "--messages", str(messages),
            "--interval", str(interval or self.options.interval),
            "--max-seconds", str(self.budget)], self.workdir, f"node{index}",
            module=CLUSTER_AGENT)

    def _home(self, line: dict[str, Any]) -> int | None:
        if not line.get("registered"):
            raise AgentError(f"a node did not register: {line}")
        addresses = [self.address(g) for g in range(self.options.gateways)]
        return addresses.index(line["home"]) if line["home"] in addresses else None

    def _fault(self) -> list[int]:
        options = self.options
        if options.kill:
            for agent in self.gateways[:options.kill]:
                agent.proc.kill()  # SIGKILL: no goodbye to anyone
            return list(range(options.kill))
        if options.drain:
            for agent in self.gateways[:options.drain]:
                agent.send({"drain": True})
            return list(range(options.drain))
        if options.redis_down:
            self.redis.stop()  # everything it held is gone, as after a crash
            threading.Timer(options.redis_down, self.redis.start).start()
        return []

    def _outage_session(self) -> dict[str, Any]:
        """Two new nodes homed on one gateway open a session while the directory is down."""
        time.sleep(min(1.0, self.options.redis_down / 4))
        base = self.options.nodes
        peers = [self.lab.add_peer(preset, latency_ms=self.options.latency_ms)
                 for preset in OUTAGE_NODES]
        ids = [Identity.load_or_create(self.workdir / f"node{base + k}.key").node_id.text
               for k in range(2)]
        agents = [self._node(base + k, peers[k].host_ns, ids[1 - k], dial=k == 0,
                             messages=20, interval=0.01, first=0) for k in range(2)]
        try:
            for agent in agents:
                agent.read_line(START_TIMEOUT)
            for agent in agents:
                agent.send({"go": True})
            results = [agent.result(60.0) for agent in agents]
        except AgentError as exc:
            return {"tried": True, "connected": False, "error": str(exc)[:300]}
        return {"tried": True, "connected": all(r.get("connected") for r in results),
                "lost": sum(r.get("lost", 0) for r in results),
                "error": next((r["error"] for r in results if r.get("error")), None)}

    def _failover(self, results: list[dict[str, Any]], homes: list[int | None],
                  gone: list[int], fault_at: float) -> list[float]:
        """For each node of a gone gateway: when it first registered elsewhere (ms)."""
        gone_addresses = {self.address(g) for g in gone}
        times = []
        for result, home in zip(results, homes, strict=True):
            if home not in gone:
                continue
            moved = [at for at, where in result.get("registrations", [])
                     if at > fault_at and where not in gone_addresses]
            times.append((min(moved) - fault_at) * 1000 if moved else float("inf"))
        return times

    def _stop_gateways(self, gone: list[int]) -> list[dict[str, Any]]:
        out = []
        for index, agent in enumerate(self.gateways):
            if index in gone and self.options.kill:
                agent.stop()
                continue
            if agent.proc.poll() is None:
                agent.proc.terminate()
            try:
                out.append(agent.result(20.0))
            except AgentError as exc:
                out.append({"error": str(exc)})
        return out

    def close(self) -> None:
        for agent in [*self.nodes, *self.gateways]:
            agent.stop()
        self.redis.close()


def run_kernel_cluster(options: ClusterOptions,
                       progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    ok, reason = kernel_lab_available()
    if not ok:
        raise KernelLabUnavailable(f"the kernel NAT lab cannot run here: {reason}")
    ok, reason = redis_available()
    if not ok:
        raise KernelLabUnavailable(f"the kernel cluster lab needs redis-server: {reason}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="macula-kernel-cluster-"))
    try:
        with KernelLab() as lab:
            run = _KernelCluster(lab, workdir, options, progress)
            try:
                result = run.run()
            finally:
                run.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    return result
