"""The router side of the `symmetric_upnp` preset: miniupnpd (UPnP-IGD, NAT-PMP, PCP).

The NAT namespace keeps the `symmetric` ruleset (masquerade fully-random) and runs the
Debian miniupnpd-nftables daemon on its lan. Mappings become DNAT rules in miniupnpd's own
`inet miniupnpd` table, which we create (the package's nft_init.sh is not used); natlab's
forward chain already accepts `ct status dnat`, so mapped inbound traffic reaches the host.

miniupnpd refuses to map while its wan address is "reserved", and the lab's addresses are
all documentation ranges (RFC 5737). Its own way out is a STUN test (`ext_perform_stun`):
four Binding requests with CHANGE-REQUEST must all be answered with the socket's own port.
So the lab runs our RFC 5780 responder (`python -m macula_lab.kernel.miniupnpd stun`) in
the server namespace on STUN_PORTS, and the router namespace gets two extra natlab rules:
its own packets skip the fully-random masquerade (their port must stay), and the
responder's answers from its other address/port may reach the router itself.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macula_lab.kernel.netns import LabError

MINIUPNPD = "/usr/sbin/miniupnpd"
UPNP_PRESETS: tuple[str, ...] = ("symmetric_upnp",)
STUN_PORTS = (34780, 34781)  # not 3478/3479: tests run their own probe server there
TABLE = "miniupnpd"
FORWARD_CHAIN = "forward_miniupnpd"
PREROUTING_CHAIN = "prerouting_miniupnpd"
POSTROUTING_CHAIN = "postrouting_miniupnpd"
READY_TIMEOUT = 10.0
_READY = "Listening for NAT-PMP/PCP traffic on port"
_ENABLED = "Port forwarding is now enabled"
_REFUSED = ("Port forwarding is impossible", "restrictive", "does not support port forwarding")


def miniupnpd_available(binary: str = MINIUPNPD) -> tuple[bool, str]:
    """(True, "") when the nftables build of miniupnpd is installed, else (False, why)."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return False, f"{binary} not found (apt-get install miniupnpd-nftables)"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{binary} --version failed: {exc}"
    text = out.stdout + out.stderr
    if "nftables" not in text:
        return False, f"{binary} is not the nftables build: {text.strip()!r}"
    return True, ""


def router_rules(*, wan_ip: str, stun_ips: Sequence[str],
                 stun_ports: Sequence[int] = STUN_PORTS) -> str:
    """nft script: the two natlab additions and miniupnpd's table with its chains."""
    ips = ", ".join(stun_ips)
    ports = ", ".join(str(p) for p in stun_ports)
    return "\n".join([
        # miniupnpd's STUN test checks that its sockets keep their ports.
        f'insert rule ip natlab snat_out oifname "wan" ip saddr {wan_ip} accept',
        # The responder answers some requests from its other IP/port: not "established".
        f'insert rule ip natlab input iifname "wan" ip saddr {{ {ips} }} '
        f"udp sport {{ {ports} }} accept",
        f"table inet {TABLE} {{",
        f"  chain {FORWARD_CHAIN} {{ }}",
        f"  chain {PREROUTING_CHAIN} {{ }}",
        f"  chain {POSTROUTING_CHAIN} {{ }}",
        # Policy accept: natlab's forward chain (policy drop) still has the final word.
        "  chain forward { type filter hook forward priority filter - 1; policy accept; "
        f"jump {FORWARD_CHAIN}; }}",
        "  chain prerouting { type nat hook prerouting priority dstnat - 1; policy accept; "
        f"jump {PREROUTING_CHAIN}; }}",
        "  chain postrouting { type nat hook postrouting priority srcnat - 1; policy accept; "
        f"jump {POSTROUTING_CHAIN}; }}",
        "}",
    ]) + "\n"


def config(*, lan_net: str, stun: tuple[str, int], uuid_text: str) -> str:
    """miniupnpd.conf: UPnP-IGD + NAT-PMP/PCP on "lan", mapping only for `lan_net`."""
    return "\n".join([
        "ext_ifname=wan",
        "listening_ip=lan",
        "http_port=0",
        "enable_upnp=yes",
        "enable_natpmp=yes",  # NAT-PMP and PCP share this switch and port 5351
        "secure_mode=yes",  # a client may only map ports to itself
        "system_uptime=no",
        "notify_interval=60",
        "min_lifetime=120",
        "max_lifetime=86400",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun[0]}",
        f"ext_stun_port={stun[1]}",
        f"uuid={uuid_text}",
        "friendly_name=macula lab IGD",
        f"upnp_table_name={TABLE}",
        f"upnp_nat_table_name={TABLE}",
        f"upnp_forward_chain={FORWARD_CHAIN}",
        f"upnp_nat_chain={PREROUTING_CHAIN}",
        f"upnp_nat_postrouting_chain={POSTROUTING_CHAIN}",
        f"allow 1024-65535 {lan_net} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]) + "\n"


@dataclass
class IgdDaemon:
    """A running miniupnpd: its process and scratch directory (config, pid file, log)."""

    ns: str
    proc: subprocess.Popen[Any]
    workdir: Path

    @property
    def log_path(self) -> Path:
        return self.workdir / "miniupnpd.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (miniupnpd removes its rules), SIGKILL after `grace`; drop the directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_daemon(popen: Callable[..., subprocess.Popen[Any]], ns: str, *, lan_net: str,
                 stun: tuple[str, int], binary: str = MINIUPNPD,
                 timeout: float = READY_TIMEOUT) -> IgdDaemon:
    """Start miniupnpd in `ns` via `popen(ns, argv, **kw)` and wait until it maps."""
    workdir = Path(tempfile.mkdtemp(prefix="macula-miniupnpd-"))
    conf = workdir / "miniupnpd.conf"
    conf.write_text(config(lan_net=lan_net, stun=stun, uuid_text=str(uuid.uuid4())))
    with open(workdir / "miniupnpd.log", "wb") as log:
        # -d: stay in the foreground (so the pid is ours to kill) and log to stderr;
        # -4: the lab has no IPv6; -P: our own pid file, one per namespace.
        proc = popen(ns, [binary, "-f", str(conf), "-d", "-4", "-P", str(workdir / "pid")],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    daemon = IgdDaemon(ns, proc, workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = daemon.log()
        if _READY in text and _ENABLED in text:
            return daemon
        if proc.poll() is not None or any(word in text for word in _REFUSED):
            break
        time.sleep(0.05)
    tail = daemon.log()[-2000:]
    daemon.stop()
    raise LabError(f"miniupnpd in {ns} did not become ready to map ports:\n{tail}")


# --- the STUN responder miniupnpd's test talks to (server namespace) -----------------------

def stun_argv(binds: Sequence[tuple[str, int]], max_seconds: float, parent_pid: int) -> list[str]:
    args = ["stun", "--max-seconds", str(max_seconds), "--parent-pid", str(parent_pid)]
    for ip, port in binds:
        args += ["--bind", f"{ip}:{port}"]
    return args


def stun_binds(server_ips: Sequence[str], ports: Sequence[int] = STUN_PORTS) -> list[tuple[str, int]]:
    """StunResponder's socket order: (ip1, p1), (ip1, p2), (ip2, p1), (ip2, p2)."""
    return [(ip, port) for ip in server_ips[:2] for port in ports[:2]]


def serve_stun(binds: Sequence[tuple[str, int]], max_seconds: float, parent_pid: int | None) -> None:
    from macula.nat.stun_responder import StunResponder

    socks = []
    for ip, port in binds:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, port))
        socks.append(sock)
    responder = StunResponder([s.getsockname() for s in socks])
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    print(json.dumps({"ready": [f"{ip}:{port}" for ip, port in binds]}), flush=True)
    deadline = time.monotonic() + max_seconds
    while not stop[0] and time.monotonic() < deadline:
        if parent_pid and os.getppid() != parent_pid:
            break
        try:
            readable = select.select(socks, [], [], 0.2)[0]
        except InterruptedError:
            continue
        for sock in readable:
            try:
                data, src = sock.recvfrom(2048)
            except OSError:
                continue
            answer = responder.handle(data, (src[0], src[1]), socks.index(sock))
            if answer is not None:
                try:
                    socks[answer.socket].sendto(answer.data, answer.destination(src))
                except OSError:
                    pass
    for sock in socks:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.kernel.miniupnpd")
    sub = parser.add_subparsers(dest="command", required=True)
    p_stun = sub.add_parser("stun", help="RFC 5780 STUN responder for miniupnpd's STUN test")
    p_stun.add_argument("--bind", action="append", required=True,
                        type=lambda s: (s.rpartition(":")[0], int(s.rpartition(":")[2])))
    p_stun.add_argument("--max-seconds", type=float, default=3600.0)
    p_stun.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    serve_stun(args.bind, args.max_seconds, args.parent_pid or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
