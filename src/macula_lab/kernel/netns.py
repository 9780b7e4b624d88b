"""Thin helpers around `ip`, `nft` and `sysctl` for the kernel NAT lab.

Everything here acts inside named network namespaces that the lab created; nothing touches
the root namespace except `ip netns add/del` themselves. Every command runs with a timeout
and fails with an error that names the command and its stderr.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 15  # the kernel's interface name limit (16 bytes with the NUL)
CMD_TIMEOUT = 15.0
# Keys that only exist when br_netfilter is present; set to 0 so bridged frames skip nft.
BRIDGE_NF_KEYS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)

_seq = itertools.count()


class LabError(RuntimeError):
    """A lab command failed; the message carries the command line and its stderr."""


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise LabError with stderr when it fails."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {argv[0]} (running {' '.join(argv)})") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"command failed (exit {proc.returncode}): {' '.join(argv)}\n"
                       f"stderr: {proc.stderr.strip()}")
    return proc


def exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


def run_in(ns: str, argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
           **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion inside `ns` (text mode, output captured unless overridden)."""
    full = exec_argv(ns, argv)
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    try:
        proc = subprocess.run(full, timeout=timeout, check=False, **kwargs)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout}s: {' '.join(full)}") from exc
    if check and proc.returncode != 0:
        raise LabError(f"command failed (exit {proc.returncode}): {' '.join(full)}\n"
                       f"stderr: {(proc.stderr or '').strip()}")
    return proc


def popen_in(ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `argv` inside `ns` in the background; the caller owns (and must reap) it.

    `ip netns exec` execs the command, so the returned pid is the program itself and the
    program's parent is this process.
    """
    return subprocess.Popen(exec_argv(ns, argv), **kwargs)


def python_argv(module: str, *args: str) -> list[str]:
    """argv for `python -m module args` with this interpreter."""
    return [sys.executable, "-u", "-m", module, *args]


def python_env() -> dict[str, str]:
    """Environment for lab Python children: make sure they import this very macula tree."""
    import macula

    src = str(Path(macula.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --- namespaces -------------------------------------------------------------------------

def default_prefix() -> str:
    """A fresh prefix for one lab: pid (for leftover detection) plus a per-process counter."""
    return f"mlab{os.getpid()}-{next(_seq)}-"


def list_ns() -> list[str]:
    """Names of all named network namespaces."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_ns(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def ns_pids(name: str) -> list[int]:
    proc = run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_pids(pids: Iterable[int], grace: float = 1.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is left after `grace` seconds."""
    pending = set(pids)
    for pid in list(pending):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pending.discard(pid)
    deadline = time.monotonic() + grace
    while pending and time.monotonic() < deadline:
        pending = {p for p in pending if _alive(p)}
        if pending:
            time.sleep(0.02)
    for pid in pending:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def del_ns(name: str) -> None:
    """Kill what still runs inside `name` (lab processes only live there) and delete it."""
    if not (NETNS_DIR / name).exists():
        return
    kill_pids(ns_pids(name))
    run(["ip", "netns", "del", name], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_OWNER_RE = re.compile(r"^mlab(\d+)-")
_active_prefixes: set[str] = set()  # labs alive in this process: never leftovers


def claim_prefix(prefix: str) -> None:
    _active_prefixes.add(prefix)


def release_prefix(prefix: str) -> None:
    _active_prefixes.discard(prefix)


def cleanup_leftovers(prefix_glob: str = "mlab", *, force: bool = False,
                      keep: Iterable[str] = ()) -> list[str]:
    """Delete namespaces left by killed runs; returns the names removed.

    Matches `prefix_glob` (a glob; "*" is appended when it has none). A name that encodes a
    live pid other than ours belongs to a concurrent run and is kept unless `force`.
    Labs alive in this process and prefixes in `keep` are never touched.
    """
    pattern = prefix_glob if any(c in prefix_glob for c in "*?[") else prefix_glob + "*"
    keep = tuple(keep) + tuple(_active_prefixes)
    removed: list[str] = []
    for name in list_ns():
        if not fnmatch.fnmatchcase(name, pattern) or (keep and name.startswith(keep)):
            continue
        owner = _OWNER_RE.match(name)
        if not force and owner:
            pid = int(owner.group(1))
            if pid != os.getpid() and _alive(pid):
                continue
        del_ns(name)
        removed.append(name)
    return removed


# --- links, addresses, routes ----------------------------------------------------------

def _check_ifname(name: str) -> None:
    if not name or len(name) > IFNAMSIZ:
        raise LabError(f"interface name {name!r} must be 1..{IFNAMSIZ} characters")


def mac_for(tag: int, index: int) -> str:
    """A deterministic locally administered unicast MAC (02:...)."""
    return f"02:{(tag >> 8) & 0xFF:02x}:{tag & 0xFF:02x}:{(index >> 16) & 0xFF:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def add_veth(ns_a: str, if_a: str, ns_b: str, if_b: str, *, mac_a: str | None = None,
             mac_b: str | None = None) -> None:
    """A veth pair created directly between two lab namespaces (never in the root one)."""
    _check_ifname(if_a)
    _check_ifname(if_b)
    argv = ["ip", "-n", ns_a, "link", "add", if_a]
    if mac_a:
        argv += ["address", mac_a]
    argv += ["type", "veth", "peer", "name", if_b]
    if mac_b:
        argv += ["address", mac_b]
    argv += ["netns", ns_b]
    run(argv)


def add_bridge(ns: str, name: str, *, mac: str | None = None) -> None:
    """A bridge; a fixed MAC keeps it stable as ports join (permanent ARP entries need it)."""
    _check_ifname(name)
    argv = ["ip", "-n", ns, "link", "add", name]
    if mac:
        argv += ["address", mac]
    # STP off and no forward delay: ports forward as soon as they are up.
    argv += ["type", "bridge", "stp_state", "0", "forward_delay", "0"]
    run(argv)
    link_up(ns, name)


def set_master(ns: str, ifname: str, bridge: str) -> None:
    run(["ip", "-n", ns, "link", "set", ifname, "master", bridge])


def link_up(ns: str, ifname: str, *, promisc: bool = False) -> None:
    argv = ["ip", "-n", ns, "link", "set", ifname, "up"]
    if promisc:
        argv += ["promisc", "on"]
    run(argv)


def add_addr(ns: str, ifname: str, cidr: str) -> None:
    run(["ip", "-n", ns, "addr", "add", cidr, "dev", ifname])


def add_route(ns: str, dest: str, via: str, *, dev: str | None = None) -> None:
    argv = ["ip", "-n", ns, "route", "replace", dest, "via", via]
    if dev:
        argv += ["dev", dev]
    run(argv)


def add_neigh(ns: str, ifname: str, ip: str, mac: str) -> None:
    """A permanent ARP entry: no ARP resolution (and its lost first burst) on delayed links."""
    run(["ip", "-n", ns, "neigh", "replace", ip, "lladdr", mac, "dev", ifname, "nud",
         "permanent"])


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Several `ip` commands inside `ns` in one process (`ip -n NS -batch -`)."""
    if commands:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def set_sysctls(ns: str, values: Mapping[str, str | int]) -> None:
    """Set sysctls inside `ns` in one call. Bridge-netfilter keys are skipped when absent."""
    pairs = []
    for key, value in values.items():
        if key.startswith("net.bridge.") and not _sysctl_path(key).exists():
            continue
        pairs.append(f"{key}={value}")
    if pairs:
        run_in(ns, ["sysctl", "-q", "-w", *pairs])


def _sysctl_path(key: str) -> Path:
    # br_netfilter is global (built in or loaded), so its presence here means presence there.
    return Path("/proc/sys") / key.replace(".", "/")


def base_sysctls(*, router: bool) -> dict[str, str | int]:
    """Sysctls every lab namespace gets; routers also forward."""
    values: dict[str, str | int] = {key: 0 for key in BRIDGE_NF_KEYS}
    # IPv6 off: no DAD/RS/MLD chatter crossing delay lines or bridges.
    values["net.ipv6.conf.all.disable_ipv6"] = 1
    values["net.ipv6.conf.default.disable_ipv6"] = 1
    values["net.ipv4.ip_forward"] = 1 if router else 0
    return values


def nft_apply(ns: str, ruleset: str) -> None:
    """Load an nftables ruleset (text) into `ns` atomically."""
    run_in(ns, ["nft", "-f", "-"], input=ruleset)


# --- availability ------------------------------------------------------------------------

_available: tuple[bool, str] | None = None


def kernel_lab_available() -> tuple[bool, str]:
    """(True, "") when the kernel lab can run here, else (False, why) for a clear skip."""
    global _available
    if _available is None:
        _available = _probe_available()
    return _available


def _probe_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "kernel lab needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", "sysctl"):
        if shutil.which(tool) is None:
            hint = " (apt-get install nftables)" if tool == "nft" else ""
            return False, f"kernel lab needs the '{tool}' command{hint}"
    name = f"mlab{os.getpid()}-probe"
    try:
        run(["ip", "netns", "add", name])
    except LabError as exc:
        return False, f"'ip netns add' failed: {exc}"
    try:
        run(["ip", "-n", name, "link", "add", "va", "type", "veth", "peer", "name", "vb"])
        run(["ip", "-n", name, "link", "add", "b0", "type", "bridge"])
        run_in(name, ["nft", "add", "table", "ip", "probe"])
    except LabError as exc:
        return False, f"kernel lab prerequisites missing: {exc}"
    finally:
        run(["ip", "netns", "del", name], check=False)
    return True, ""
