"""Drive addrprobe inside a KernelLab: NAT behaviour table, RTT and plain UDP punching.

The expected values are natlab.md's probe table, so tests (and the CLI) can compare what a
lab NAT does with what its preset promises.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from types import TracebackType
from typing import Any

from macula_lab.kernel.netns import LabError
from macula_lab.kernel.topology import KernelLab, LabPair

PROBE_MODULE = "macula_lab.kernel.addrprobe"

# preset -> (mapping behaviour, unsolicited inbound allowed from IP1:P1, IP1:P2, IP2:P1, IP2:P2)
EXPECTED_BEHAVIOR: dict[str, tuple[str, tuple[bool, bool, bool, bool]]] = {
    "open": ("endpoint_independent", (True, True, True, True)),
    "full_cone": ("endpoint_independent", (True, True, True, True)),
    "restricted_cone": ("endpoint_independent", (True, True, False, False)),
    "port_restricted": ("endpoint_independent", (True, False, False, False)),
    "symmetric": ("address_and_port_dependent", (True, False, False, False)),
    "cgnat": ("endpoint_independent", (True, False, False, False)),
}
# Presets that filter on the remote port: a symmetric peer's fresh port never gets through.
_PORT_FILTERING = frozenset({"port_restricted", "symmetric", "cgnat"})


def expected_punch(preset_a: str, preset_b: str) -> bool:
    """natlab.md: plain punching fails only for symmetric against a port-filtering NAT."""
    if "symmetric" in (preset_a, preset_b):
        other = preset_b if preset_a == "symmetric" else preset_a
        return other not in _PORT_FILTERING
    return True


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    if proc.stdout is None:
        raise LabError("process has no stdout pipe")
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise LabError(f"no output within {timeout}s from {proc.args}")
    line = proc.stdout.readline()
    try:
        obj: dict[str, Any] = json.loads(line)
    except ValueError as exc:
        err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
        raise LabError(f"bad output {line!r} from {proc.args} {err}") from exc
    return obj


class ProbeServer:
    """The addrprobe responder on the server's four sockets (IP1:P1, IP1:P2, IP2:P1, IP2:P2)."""

    def __init__(self, lab: KernelLab, ports: tuple[int, int] = (3478, 3479)) -> None:
        self.lab = lab
        ip1, ip2 = lab.server_ips
        p1, p2 = ports
        self.addresses = (f"{ip1}:{p1}", f"{ip1}:{p2}", f"{ip2}:{p1}", f"{ip2}:{p2}")
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ProbeServer:
        args: list[str] = ["serve", "--max-seconds", str(self.lab.max_seconds),
                           "--parent-pid", str(os.getpid())]
        for addr in self.addresses:
            args += ["--bind", addr]
        self._proc = self.lab.popen_python(self.lab.server_ns, PROBE_MODULE, *args,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
        ready = _read_json_line(self._proc, 15.0)
        if "ready" not in ready:
            raise LabError(f"probe server did not start: {ready}")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)


def probe_nat(lab: KernelLab, host_ns: str, server: ProbeServer, window: float = 0.5,
              filter_delay: float = 0.0) -> dict[str, Any]:
    """Run `addrprobe probe` in `host_ns`: mapping (3 observations) and filtering (4 flags).

    With `filter_delay` the unsolicited datagrams come that long after the host's last
    send, which shows whether the mapping's filter state has timed out.
    """
    proc = lab.run_python(host_ns, PROBE_MODULE, "probe", "--server", *server.addresses,
                          "--window", str(window), "--filter-delay", str(filter_delay),
                          timeout=30.0 + filter_delay)
    result: dict[str, Any] = json.loads(proc.stdout)
    result["inbound"] = tuple(result["filtering"][a] for a in server.addresses)
    return result


def measure_rtt(lab: KernelLab, host_ns: str, target: str, count: int = 20,
                interval: float = 0.0, wait: float = 1.0) -> dict[str, Any]:
    """Sequential ping/pong round trips from `host_ns` to the responder at `target`.

    A ping without its pong within `wait` seconds counts as lost.
    """
    proc = lab.run_python(host_ns, PROBE_MODULE, "rtt", "--server", target, "--count",
                          str(count), "--interval", str(interval), "--wait", str(wait),
                          timeout=30.0 + count * (interval + wait))
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def punch(lab: KernelLab, pair: LabPair, server: ProbeServer,
          duration: float = 3.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Plain UDP hole punching between the pair's hosts, rendezvous via the probe server.

    Each side learns its mapping from IP1:P1, then both get the other's mapping at once and
    send to it (and to any source they hear the peer from) for up to `duration` seconds.
    """
    args = ("punch", "--server", server.addresses[0], "--duration", str(duration))
    procs = [lab.popen_python(ns, PROBE_MODULE, *args, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for ns in (pair.host_a_ns, pair.host_b_ns)]
    try:
        mapped = [_read_json_line(p, 15.0)["mapped"] for p in procs]
        if None in mapped:
            raise LabError(f"punch: a side got no mapping from the server: {mapped}")
        for proc, peer in zip(procs, reversed(mapped)):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"peer": peer}) + "\n")
            proc.stdin.flush()
        results = [_read_json_line(p, duration + 10.0) for p in procs]
    finally:
        deadline = time.monotonic() + 5.0
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
    return results[0], results[1]
