"""`macula lab chaos --kernel`: the same faults on real NATs, sockets, gateway and coturn.

One KernelLab for the run and fresh pairs per fault (conntrack outlives sockets). Per
fault: the gateway agent in the server namespace, a chaos_agent `stream` process per node
in its host namespace, and the fault injected from here with real tools: the gateway
process stopped and a new one started on the same address; the NAT's conntrack flushed
and its ports renumbered (KernelLab.rebind_nat); per-namespace conntrack timeouts of 10 s
(mapping_expiry); Gilbert-Elliott loss switched on in the uplink's delay line; coturn
stopped; the host's veth moved behind another NAT. Every process stamps time.monotonic(),
one clock for all namespaces, so lab.faults scores the run exactly as in the simulator.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from macula.identity import Identity
from macula_lab.faults import (
    LOSS_BURST,
    LOSS_RATE,
    TURN_PORT,
    TURN_USERS,
    FaultSpec,
    Marks,
    PairSpec,
    fault_seed,
    quiet_marks,
    score_fault,
    score_session,
    unsupported,
)
from macula_lab.kernel import KernelLab, LabPair, Peer, kernel_lab_available
from macula_lab.kernel_trial import (
    AgentError,
    KernelLabUnavailable,
    _last_json,
    _tail,
    stop_process,
)
from macula_lab.sim_trial import GATEWAY_PORT, GATEWAY_TLS_PORT

CHAOS_AGENT = "macula_lab.chaos_agent"
GATEWAY_AGENT = "macula_lab.agent"
LOSS_LATENCY_MS = 5.0  # loss_25 needs a delay line on the uplink to impair
START_TIMEOUT = 30.0  # registration + session up, per agent
SETTLE = 30.0  # after the last message: retransmissions, FIN


class LineAgent:
    """A chaos_agent process in a lab namespace, read line by line without Python's read
    buffer: select() on a pipe whose lines were read ahead into a buffer would wait for
    output that already arrived (kernel_trial.Agent only ever reads one line that way)."""

    def __init__(self, lab: KernelLab, ns: str, args: list[str], workdir: Path,
                 name: str, *, module: str = CHAOS_AGENT) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._buf = b""
        with open(self.stderr_path, "wb") as err:
            self.proc: subprocess.Popen[bytes] = lab.popen_python(
                ns, module, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err)

    def send(self, command: dict[str, Any]) -> None:
        """One JSON command line on the agent's stdin (soak members read them)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the agent is gone; its result (or its absence) says why

    def read_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line within `timeout` s; AgentError (agent stopped) otherwise."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                self.stop()
                raise AgentError(f"{self.name} agent gave no line within {timeout:g} s "
                                 f"(exit {self.proc.returncode}): {_tail(self.stderr_path)}")
        line, self._buf = self._buf.split(b"\n", 1)
        obj = _last_json(line.decode(errors="replace"))
        if obj is None:
            self.stop()
            raise AgentError(f"{self.name} agent said {line[:200]!r}")
        return obj

    def result(self, timeout: float) -> dict[str, Any]:
        """The last JSON line once the agent exits (killed after `timeout` s)."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self._fill(max(0.0, deadline - time.monotonic())):
            pass
        if self.proc.poll() is None:
            self.stop()
            raise AgentError(f"{self.name} agent still running after {timeout:.0f} s; killed: "
                             f"{_tail(self.stderr_path)}")
        obj = _last_json(self._buf.decode(errors="replace"))
        if obj is None:
            raise AgentError(f"{self.name} agent exited {self.proc.returncode} without a "
                             f"result: {_tail(self.stderr_path)}")
        return obj

    def _fill(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False at EOF or on timeout."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return False
        data = os.read(fd, 1 << 16)
        if not data:
            self.proc.wait()
            return False
        self._buf += data
        return True

    def stop(self) -> None:
        stop_process(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@dataclass
class _Run:
    """Everything one fault started, torn down in reverse."""

    lab: KernelLab
    workdir: Path
    pairs: list[tuple[PairSpec, LabPair, Peer | None]] = field(default_factory=list)
    gateway: LineAgent | None = None
    coturn: Any = None
    agents: list[tuple[LineAgent, ...]] = field(default_factory=list)
    gateways: int = 0
    gateway_id: str = ""

    @property
    def gateway_address(self) -> str:
        return f"{self.lab.server_ips[0]}:{GATEWAY_PORT}"

    @property
    def gateway_tls_address(self) -> str:
        return f"{self.lab.server_ips[0]}:{GATEWAY_TLS_PORT}"

    def start_gateway(self, max_seconds: float, *, tls: bool = False) -> None:
        """The lab's gateway agent on both server IPs (and with `tls` its TLS path); a
        restart reuses the address."""
        self.gateways += 1
        self.gateway = LineAgent(
            self.lab, self.lab.server_ns,
            ["gateway", "--listen", self.gateway_address, "--second-ip", self.lab.server_ips[1],
             *(["--tls-listen", self.gateway_tls_address] if tls else []),
             "--max-seconds", str(max_seconds)],
            self.workdir, f"gateway{self.gateways}", module=GATEWAY_AGENT)
        ready = self.gateway.read_line(START_TIMEOUT)
        if not ready.get("ready"):
            raise AgentError(f"gateway agent did not start: {ready}")
        self.gateway_id = str(ready.get("node_id"))

    def close(self) -> None:
        for pair in self.agents:
            for agent in pair:
                agent.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self.coturn is not None:
            self.coturn.stop()
        for _, pair, moved in self.pairs:
            self.lab.remove_pair(pair)
            if moved is not None:
                self.lab.remove_peer(moved)


class KernelChaos:
    """`with KernelChaos() as k: row = k.run_fault(FAULTS["nat_rebind"])`."""

    def __init__(self, *, seed: int = 1, prefix: str | None = None,
                 tail: float | None = None) -> None:
        self.seed = seed
        self.prefix = prefix
        self.tail = tail  # shorter streams for quick runs (tests)
        self.lab: KernelLab | None = None
        self._tmp: str | None = None

    def __enter__(self) -> KernelChaos:
        ok, reason = kernel_lab_available()
        if not ok:
            raise KernelLabUnavailable(f"the kernel NAT lab cannot run here: {reason}")
        self._tmp = tempfile.mkdtemp(prefix="macula-kernel-chaos-")
        self.lab = KernelLab(self.prefix)
        try:
            self.lab.start()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.lab is not None:
            self.lab.close()
            self.lab = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def run_fault(self, spec: FaultSpec) -> dict[str, Any]:
        """One fault; a run that cannot even start is a row with its error, not a raise."""
        assert self.lab is not None and self._tmp is not None
        if any(p.turn for p in spec.pairs):
            why = self._turn_missing()
            if why:
                return unsupported(spec, "kernel", why)
        run = _Run(self.lab, Path(tempfile.mkdtemp(prefix=f"{spec.name}-", dir=self._tmp)))
        try:
            return self._run(spec, run)
        except Exception as exc:
            return unsupported(spec, "kernel", f"{type(exc).__name__}: {exc}")
        finally:
            run.close()

    @staticmethod
    def _turn_missing() -> str | None:
        from macula_lab.coturn import coturn_available

        ok, why = coturn_available()
        return None if ok else f"coturn cannot run: {why}"

    # ------------------------------------------------------------------------------ one fault
    def _run(self, spec: FaultSpec, run: _Run) -> dict[str, Any]:
        lab = run.lab
        plan = spec.plan(tail=self.tail)
        budget = spec.warmup + spec.window + plan.duration + SETTLE + 60.0
        seed = fault_seed(self.seed, spec.name)
        for i, pair in enumerate(spec.pairs):
            built = lab.build_pair(pair.a, pair.b, seed=seed + i,
                                   latency_ms=LOSS_LATENCY_MS if spec.name == "loss_25" else 0.0,
                                   mapping_timeout=spec.mapping_timeout)
            moved = lab.add_peer(pair.move_to) if pair.move_to else None
            run.pairs.append((pair, built, moved))
            if spec.udp_blocked_from_start:
                lab.block_udp(built.a)
        run.start_gateway(budget, tls=spec.gateway_tls)
        assert run.gateway is not None
        turn_args: list[str] = []
        if any(p.turn for p in spec.pairs):
            turn_args = self._start_coturn(run)
        gateway = [f"{run.gateway_id}@{run.gateway_address}", "--gateway-tls",
                   run.gateway_tls_address] if spec.gateway_tls else [run.gateway_address]
        common = ["--gateway", *gateway, "--messages", str(plan.messages),
                  "--interval", str(plan.interval), "--max-seconds", str(budget)]
        for pause_at, pause_for in plan.pauses:
            common += ["--pause-at", str(pause_at), "--pause-for", str(pause_for)]
        for i, (pair, built, _) in enumerate(run.pairs):
            keys = [run.workdir / f"p{i}a.key", run.workdir / f"p{i}b.key"]
            ids = [Identity.load_or_create(k).node_id.text for k in keys]
            extra = ["--strategy", pair.strategy, *(turn_args if pair.turn else [])]
            sides = (("dialer", built.host_a_ns, keys[0], ids[1], "--dial"),
                     ("acceptor", built.host_b_ns, keys[1], ids[0], "--accept"))
            run.agents.append(tuple(
                LineAgent(lab, ns, ["stream", "--key-file", str(key), "--peer", peer, role,
                                    *common, *extra], run.workdir, f"p{i}-{name}")
                for name, ns, key, peer, role in sides))
        for pair_agents in run.agents:
            for agent in pair_agents:
                self._expect(agent, "registered")
        for pair_agents in run.agents:
            for agent in pair_agents:
                self._expect(agent, "streaming")
        time.sleep(spec.warmup)
        marks = _INJECT[spec.name](run, spec, budget)
        deadline = time.monotonic() + plan.duration + SETTLE + 30.0
        results = [tuple(self._result(a, deadline) for a in pair) for pair in run.agents]
        if spec.quiet:
            marks = quiet_marks([side for pair in results for side in pair])
        for _, built, _ in run.pairs:
            stats = lab.delay_stats(built.a)  # the streams are over: the line may stop
            if stats is not None:
                lost = stats["in_to_out"]["lost"] + stats["out_to_in"]["lost"]
                marks.notes.append(f"{lost} frames dropped on {built.a.preset}'s uplink")
        sessions = [score_session(p, d, a, marks) for (p, _, _), (d, a) in zip(run.pairs, results)]
        row = score_fault(spec, sessions, marks, backend="kernel")
        sides = [side for pair in results for side in pair]
        row["handler_errors"] = sum(s.get("handler_errors", 0) for s in sides)
        row["logged_errors"] = sum(s.get("logged_errors", 0) for s in sides)
        logged = [line for s in sides for line in s.get("logged") or []]
        if logged:
            row["logged"] = logged[:5]
        row["gateways_started"] = run.gateways
        return row

    def _start_coturn(self, run: _Run) -> list[str]:
        from macula_lab.coturn import Coturn

        ip = run.lab.server_ips[0]
        run.coturn = Coturn(listen_ip=ip, port=TURN_PORT, relay_ip=ip, users=TURN_USERS,
                            tcp=False, allow_loopback_peers=False,
                            allowed_peer_ips=["198.51.100.0-198.51.100.255"],
                            popen=lambda argv, **kw: run.lab.popen(run.lab.server_ns, argv, **kw))
        run.coturn.start()
        user, password = next(iter(TURN_USERS.items()))
        return ["--turn", f"{ip}:{TURN_PORT}", "--turn-auth", f"{user}:{password}"]

    @staticmethod
    def _expect(agent: LineAgent, key: str) -> dict[str, Any]:
        line = agent.read_line(START_TIMEOUT)
        if not line.get(key):
            raise AgentError(f"{agent.name}: expected {key!r}, got {line}")
        return line

    @staticmethod
    def _result(agent: LineAgent, deadline: float) -> dict[str, Any]:
        try:
            return agent.result(deadline - time.monotonic())
        except AgentError as exc:
            return {"connected": False, "error": str(exc)}


# ------------------------------------------------------------------------------ injectors
# Each returns the marks on time.monotonic(), the agents' clock.

def _gateway_restart(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    assert run.gateway is not None
    run.gateway.stop()  # SIGTERM: the gateway closes its connections, as a restart does
    time.sleep(spec.window)
    run.start_gateway(budget)
    return Marks(inject_at, time.monotonic(), [f"gateway down {time.monotonic() - inject_at:.2f} s"])


def _gateway_crash(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    assert run.gateway is not None
    run.gateway.proc.kill()  # SIGKILL: no goodbye to anyone
    run.gateway.stop()
    time.sleep(spec.window)
    run.start_gateway(budget)
    return Marks(inject_at, time.monotonic(), [f"gateway down {time.monotonic() - inject_at:.2f} s"])


def _nat_rebind(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    ports = [run.lab.rebind_nat(built.a) for _, built, _ in run.pairs]
    return Marks(inject_at, time.monotonic(), [f"new external ports {ports}"])


def _loss(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    for _, built, _ in run.pairs:
        run.lab.set_loss(built.a, LOSS_RATE, LOSS_BURST)
    time.sleep(spec.window)
    for _, built, _ in run.pairs:
        run.lab.set_loss(built.a, 0.0)
    return Marks(inject_at, time.monotonic())


def _turn_down(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    if run.coturn is not None:
        run.coturn.stop()
        run.coturn = None
    return Marks(inject_at, time.monotonic())


def _uplink_switch(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    for _, built, moved in run.pairs:
        assert moved is not None
        run.lab.move_host(built.a, moved)
    return Marks(inject_at, time.monotonic())


def _direct_outage(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    for _, built, _ in run.pairs:
        run.lab.block_between(built.a, built.b.public_ip)
    time.sleep(spec.window)
    for _, built, _ in run.pairs:
        run.lab.block_between(built.a, built.b.public_ip, blocked=False)
    return Marks(inject_at, time.monotonic())


def _udp_cut(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    for _, built, _ in run.pairs:
        run.lab.block_udp(built.a)
    return Marks(inject_at, time.monotonic())


def _udp_restore(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    inject_at = time.monotonic()
    for _, built, _ in run.pairs:
        run.lab.block_udp(built.a, blocked=False)
    return Marks(inject_at, time.monotonic())


def _nothing(run: _Run, spec: FaultSpec, budget: float) -> Marks:
    return Marks(float("nan"), float("nan"))


_INJECT: dict[str, Callable[[_Run, FaultSpec, float], Marks]] = {
    "gateway_restart": _gateway_restart,
    "gateway_crash": _gateway_crash,
    "nat_rebind": _nat_rebind,
    "mapping_expiry": _nothing,
    "loss_25": _loss,
    "turn_down": _turn_down,
    "uplink_switch": _uplink_switch,
    "direct_outage": _direct_outage,
    "udp_cut": _udp_cut,
    "udp_restore": _udp_restore,
}
