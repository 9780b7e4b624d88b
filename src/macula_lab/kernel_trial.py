"""A matrix trial in the kernel lab: real sockets, real NATs, one agent process per role.

The kernel twin of sim_trial: per trial a fresh pair of NAT'd hosts (conntrack outlives
sockets, so namespaces are never reused between trials), a gateway agent in the server
namespace and one peer agent in each host namespace (lab/agent.py). The agents' results
use time.monotonic(), one clock for every namespace on the machine, so the parent folds
both sides with the same summarise_trial the simulator uses.
"""

from __future__ import annotations

import json
import select
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from macula.identity import Identity
from macula.session.errors import MaculaError
from macula_lab.coturn import Coturn
from macula_lab.kernel import KernelLab, LabError, LabPair, kernel_lab_available
from macula_lab.kernel.nat_rules import IPV6_PRESETS, LAB_PROXY, PORTMAP_PRESETS, TCP_PRESETS
from macula_lab.kernel.topology import MAX_PEERS
from macula_lab.peer import failed_trial, summarise_trial
from macula_lab.proxy import Tinyproxy
from macula_lab.sim_trial import GATEWAY_PORT, TrialOptions, trial_seed

AGENT_MODULE = "macula_lab.agent"
READY_TIMEOUT = 15.0  # a gateway agent imports, binds and prints one line
STOP_GRACE = 3.0


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM a lab agent, SIGKILL it if it lingers past STOP_GRACE, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE)
STDERR_TAIL = 400  # characters of an agent's stderr quoted in a trial's errors


TURN_PORT, TURN_USER, TURN_PASSWORD = 3478, "macula", "macula-lab"
TURN_TLS_PORT = 5349
GATEWAY_TLS_PORT = 443
PROXY_USER, PROXY_PASSWORD = "macula", "lab-proxy"


class KernelLabUnavailable(LabError, MaculaError):
    """This machine cannot run the kernel lab (MaculaError: the CLI prints it and exits)."""


class AgentError(LabError):
    """An agent process did not start or did not answer as expected."""


def _last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj: dict[str, Any] = json.loads(line)
                return obj
            except ValueError:
                return None
    return None


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return text[-STDERR_TAIL:]


class Agent:
    """One agent process in a lab namespace; stderr goes to a file (a pipe could fill)."""

    def __init__(self, lab: KernelLab, ns: str, args: list[str], workdir: Path,
                 name: str) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc: subprocess.Popen[str] = lab.popen_python(
                ns, AGENT_MODULE, *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=err, text=True)

    def read_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout, within `timeout` seconds."""
        assert self.proc.stdout is not None
        line = ""
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            line = self.proc.stdout.readline()
        obj = _last_json(line)
        if obj is None:
            self.stop()
            raise AgentError(f"{self.name} agent gave {line!r} within {timeout:g} s "
                             f"(exit {self.proc.returncode}): {_tail(self.stderr_path)}")
        return obj

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the agent to exit (killing it after `timeout`) and return its last line."""
        try:
            out, _ = self.proc.communicate(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AgentError(f"{self.name} agent still running after {timeout:.0f} s; "
                             f"killed: {_tail(self.stderr_path)}") from None
        obj = _last_json(out or "")
        if obj is None:
            raise AgentError(f"{self.name} agent exited {self.proc.returncode} without a "
                             f"result: {_tail(self.stderr_path)}")
        return obj

    def stop(self) -> dict[str, Any] | None:
        """SIGTERM (then SIGKILL), reap, and return the final JSON line if there was one."""
        stop_process(self.proc)
        try:
            out = self.proc.stdout.read() if self.proc.stdout else ""
        except (OSError, ValueError):
            out = ""
        return _last_json(out or "")


class GatewayAgent:
    """The gateway agent in the lab's server namespace, on both server IPs and two ports.

    `with GatewayAgent(lab, workdir) as gw: ...`; `gw.figures` holds its final counters.
    """

    def __init__(self, lab: KernelLab, workdir: Path, *, port: int = GATEWAY_PORT,
                 max_seconds: float = 600.0, second_ip: bool = True) -> None:
        self.lab = lab
        self.workdir = workdir
        self.address = f"{lab.server_ips[0]}:{port}"
        self.tls_address = f"{lab.server_ips[0]}:{GATEWAY_TLS_PORT}"
        self.max_seconds = max_seconds
        self.second_ip = second_ip
        self.ready: dict[str, Any] = {}
        self.figures: dict[str, Any] | None = None
        self._agent: Agent | None = None

    def __enter__(self) -> GatewayAgent:
        self._agent = Agent(self.lab, self.lab.server_ns,
                            ["gateway", "--listen", self.address,
                             *(["--second-ip", self.lab.server_ips[1]] if self.second_ip else []),
                             "--tls-listen", self.tls_address,
                             "--max-seconds", str(self.max_seconds)],
                            self.workdir, "gateway")
        self.ready = self._agent.read_line(READY_TIMEOUT)
        if not self.ready.get("ready"):
            self._agent.stop()
            raise AgentError(f"gateway agent did not start: {self.ready}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> dict[str, Any] | None:
        agent, self._agent = self._agent, None
        if agent is not None:
            self.figures = agent.stop()
        return self.figures


def probe_nat_behaviors(lab: KernelLab, host_namespaces: Sequence[str], server: str, *,
                        timeout: float = 3.0) -> list[dict[str, Any]]:
    """RFC 5780 discovery (the nat-probe agent) from each namespace at once, against the
    STUN server at `server`; one NatBehavior dict (or {"error": ...}) per namespace."""
    with tempfile.TemporaryDirectory(prefix="macula-nat-probe-") as tmp:
        agents = [Agent(lab, ns, ["nat-probe", "--server", server, "--timeout", str(timeout),
                                  "--max-seconds", str(timeout + 20.0)], Path(tmp), f"probe{i}")
                  for i, ns in enumerate(host_namespaces)]
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout + 30.0
        try:
            for agent in agents:
                try:
                    results.append(agent.result(deadline - time.monotonic()))
                except AgentError as exc:
                    results.append({"error": str(exc)})
        finally:
            for agent in agents:
                agent.stop()
    return results


class KernelMatrix:
    """The kernel backend of `macula lab matrix`: `run_trial(a, b, trial) -> dict`.

    Holds one KernelLab (one internet + server namespace) for the whole matrix and builds
    a fresh pair per trial. Raises KernelLabUnavailable on entry when the machine cannot
    run the lab, with the reason.
    """

    def __init__(self, options: TrialOptions | None = None, *, seed: int = 1,
                 prefix: str | None = None, trial_timeout: float | None = None) -> None:
        self.options = options or TrialOptions()
        self.seed = seed
        self.prefix = prefix
        o = self.options
        # run_peer's own worst case: connect (15 s) + sending + two settle windows.
        self.trial_timeout = trial_timeout or 60.0 + 2 * o.messages * o.interval + o.spread
        self.lab: KernelLab | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._peers_used = 0
        self._coturn: Coturn | None = None
        self._proxy: Tinyproxy | None = None

    def __enter__(self) -> KernelMatrix:
        ok, reason = kernel_lab_available()
        if not ok:
            raise KernelLabUnavailable(f"the kernel NAT lab cannot run here: {reason}")
        self._tmp = tempfile.TemporaryDirectory(prefix="macula-kernel-matrix-")
        try:
            self._open_lab()
        except BaseException:
            self._tmp.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        coturn, self._coturn = self._coturn, None
        if coturn is not None:
            coturn.stop()
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.stop()
        lab, self.lab = self.lab, None
        try:
            if lab is not None:
                lab.close()
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def _open_lab(self) -> None:
        self.lab = KernelLab(self.prefix)
        self.lab.start()
        self._peers_used = 0
        if self.options.turn:
            # A real coturn in the server namespace, next to the gateway host's first IP.
            # TURN over TLS too, for nodes whose network drops UDP.
            self._coturn = Coturn(listen_ip=self.lab.server_ips[0], port=TURN_PORT,
                                  users={TURN_USER: TURN_PASSWORD}, allow_loopback_peers=False,
                                  prefix=["ip", "netns", "exec", self.lab.server_ns],
                                  tls_port=TURN_TLS_PORT)
            self._coturn.start()

    def _proxy_url(self) -> str:
        """The lab's HTTP proxy (tinyproxy in the server namespace), started on first use."""
        if self._proxy is None:
            assert self.lab is not None
            lab = self.lab
            self._proxy = Tinyproxy(
                listen_ip=LAB_PROXY[0], port=LAB_PROXY[1], connect_ports=[GATEWAY_TLS_PORT],
                user=PROXY_USER, password=PROXY_PASSWORD,
                popen=lambda argv, **kw: lab.popen(lab.server_ns, argv, **kw),
                ready_probe=lambda ip, port: lab.tcp_open(lab.server_ns, ip, port))
            self._proxy.start()
        return self._proxy.url

    def close_lab_only(self) -> None:
        if self._coturn is not None:
            self._coturn.stop()
            self._coturn = None
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self.lab is not None:
            self.lab.close()

    def _lab_for_pair(self) -> KernelLab:
        if self.lab is None:
            raise LabError("KernelMatrix is not open: use it as a context manager")
        # A lab hands out MAX_PEERS peer subnets; long matrices continue in a fresh lab.
        if self._peers_used + 2 > MAX_PEERS:
            self.close_lab_only()
            self._open_lab()
        assert self.lab is not None
        self._peers_used += 2
        return self.lab

    def run_trial(self, a: str, b: str, trial: int) -> dict[str, Any]:
        """One trial of the pair (a, b): the dict run_sim_trial returns, never raises
        for a trial that fails (a failed trial is a data point)."""
        lab = self._lab_for_pair()
        assert self._tmp is not None
        workdir = Path(tempfile.mkdtemp(prefix=f"{a}-{b}-{trial}-", dir=self._tmp.name))
        o = self.options
        pair: LabPair | None = None
        try:
            pair = lab.build_pair(a, b, latency_ms=o.latency_ms, loss=o.loss,
                                  seed=trial_seed(self.seed, a, b, trial))
            return self._run_pair(lab, pair, workdir)
        except Exception as exc:  # a trial that cannot even start is a failed trial
            return failed_trial(f"{type(exc).__name__}: {exc}")
        finally:
            if pair is not None:
                lab.remove_pair(pair)

    def _run_pair(self, lab: KernelLab, pair: LabPair, workdir: Path) -> dict[str, Any]:
        o = self.options
        keys = [workdir / "a.key", workdir / "b.key"]
        ids = [Identity.load_or_create(k).node_id.text for k in keys]
        with GatewayAgent(lab, workdir, max_seconds=self.trial_timeout + 60.0,
                          second_ip=not o.one_ip) as gateway:
            # Every node knows the gateway's TLS path (and pins its id, so the link's
            # self-signed certificate needs no other trust).
            common = ["--gateway", f"{gateway.ready['node_id']}@{gateway.address}",
                      "--gateway-tls", gateway.tls_address, "--messages", str(o.messages),
                      "--interval", str(o.interval), "--strategy", o.strategy,
                      "--max-seconds", str(self.trial_timeout)]
            spread = o.spread_for(pair.preset_a, pair.preset_b)
            common += ["--hard-nat", "--spread", str(spread)] if o.hard_nat else ["--no-hard-nat"]
            if o.turn:
                common += ["--turn", f"{TURN_USER}:{TURN_PASSWORD}@{lab.server_ips[0]}:{TURN_PORT}"]
            # A host behind a router that maps ports (miniupnpd) asks it for a mapping.
            mapping = [["--port-mapping"] if preset in PORTMAP_PRESETS else []
                       for preset in (pair.preset_a, pair.preset_b)]
            # A host with global IPv6 binds a dual-stack socket: IPv4 to the gateway,
            # IPv6 host candidates to the peer.
            for extra, preset in zip(mapping, (pair.preset_a, pair.preset_b)):
                if preset in IPV6_PRESETS:
                    extra += ["--listen", "[::]:0"]
                if preset == "proxy_only":
                    extra += ["--https-proxy", self._proxy_url()]
                if preset in TCP_PRESETS and o.turn:  # TURN over TLS where UDP is blocked
                    extra += ["--turn", f"{TURN_USER}:{TURN_PASSWORD}@{lab.server_ips[0]}:"
                                        f"{TURN_TLS_PORT}/tls"]
            # Dialer = host A, as in the simulator.
            agents = [
                Agent(lab, pair.host_a_ns, ["peer", "--key-file", str(keys[0]), "--peer", ids[1],
                                            "--dial", *common, *mapping[0]], workdir, "dialer"),
                Agent(lab, pair.host_b_ns, ["peer", "--key-file", str(keys[1]), "--peer", ids[0],
                                            "--accept", *common, *mapping[1]], workdir, "acceptor"),
            ]
            sides: list[dict[str, Any]] = []
            agent_errors: list[str] = []
            deadline = time.monotonic() + self.trial_timeout + 10.0
            try:
                for agent in agents:
                    try:
                        sides.append(agent.result(deadline - time.monotonic()))
                    except AgentError as exc:
                        agent_errors.append(str(exc))
                        sides.append({"connected": False})
            finally:
                for agent in agents:
                    agent.stop()
            figures = gateway.stop() or {}
        result = summarise_trial(sides[0], sides[1])
        result["errors"] = list(result["errors"]) + agent_errors
        if figures.get("error"):
            result["errors"].append(f"gateway: {figures['error']}")
        result["gateway_relayed_bytes"] = figures.get("relayed_bytes")
        result["nat"] = {"a": sides[0].get("nat_type"), "b": sides[1].get("nat_type")}
        return result
