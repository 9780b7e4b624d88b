"""`python -m macula_lab.bench.flood`: register a node while genuine QUIC Initials flood
the gateway, all on loopback.

The gateway runs as its own process (`macula gateway`), the flood comes from a second
process sending real clients' first flights (made beforehand, each with its own
connection id) at a fixed rate from sockets that never answer, as a spoofed flood would;
this process registers a fresh node every second and times it. Bounded: the flood stops
after `--seconds`, every process is stopped by its own pid. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from macula.identity import Identity
from macula.node.node import Node
from macula_lab.bench.procs import worker_env
from macula_lab.soak_plan import rss_kb


def make_initials(count: int) -> list[bytes]:
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    from macula.session.quic import ALPN_CONTROL

    out = []
    for _ in range(count):
        conn = QuicConnection(configuration=QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN_CONTROL]))
        conn.connect(("127.0.0.1", 9), now=0.0)
        out.append(conn.datagrams_to_send(now=0.0)[0][0])
    return out


def flood(port: int, rate: int, seconds: float, distinct: int) -> None:
    """Send `rate` Initials a second for `seconds` from 64 sockets on 64 loopback addresses
    (127.0.1.1-64), as spoofed sources would be: none of them is the registering node's
    127.0.0.1, whose own answer budget (per source IP) a real flood does not share."""
    initials = make_initials(distinct)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
    for i, s in enumerate(socks):
        s.bind((f"127.0.1.{i + 1}", 0))
        s.setblocking(False)
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            try:
                socks[sent % 64].sendto(initials[sent % distinct], ("127.0.0.1", port))
            except BlockingIOError:
                pass
            sent += 1
        time.sleep(0.001)
    for s in socks:
        s.close()
    print(json.dumps({"sent": sent}), flush=True)


async def measure(port: int, gateway_pid: int, rate: int, seconds: float,
                  distinct: int) -> dict[str, Any]:
    idle_rss = rss_kb(gateway_pid)
    flooder = subprocess.Popen(
        [sys.executable, "-m", "macula_lab.bench.flood", "--flood-only", "--port", str(port),
         "--rate", str(rate), "--seconds", str(seconds), "--distinct", str(distinct)],
        stdout=subprocess.PIPE, text=True, env=worker_env())
    try:
        await asyncio.sleep(3.0 + distinct / 4000)  # the flooder makes its Initials first
        times: list[float] = []
        peak_rss = idle_rss
        deadline = time.monotonic() + seconds - 2.0
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                node = await Node.start(Identity.generate(), gateway=("127.0.0.1", port),
                                        listen=("127.0.0.1", 0), register_timeout=5.0)
                times.append(time.monotonic() - began)
                await node.close()
            except Exception as exc:  # a failed registration is a result, not a crash
                times.append(float("inf"))
                print(f"registration failed: {exc}", file=sys.stderr)
            peak_rss = max(peak_rss, rss_kb(gateway_pid))
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
        out, _ = flooder.communicate(timeout=seconds + 60)
        sent = json.loads(out.strip().splitlines()[-1])["sent"] if out.strip() else 0
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait()
    finite = sorted(t for t in times if t != float("inf"))
    return {"rate": rate, "seconds": seconds, "initials_sent": sent,
            "registrations": len(times), "failed": len(times) - len(finite),
            "register_ms_max": round(max(finite) * 1000, 1) if finite else None,
            "register_ms_p50": round(finite[len(finite) // 2] * 1000, 1) if finite else None,
            "gateway_rss_kb_idle": idle_rss, "gateway_rss_kb_peak": peak_rss,
            "gateway_rss_growth_mb": round((peak_rss - idle_rss) / 1024, 1)}


async def run(rate: int, seconds: float, distinct: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "macula.cli", "gateway", "--listen", f"127.0.0.1:{port}",
             "--key-file", os.path.join(tmp, "gw.key")],
            stdout=subprocess.PIPE, text=True, env=worker_env())
        try:
            assert gateway.stdout is not None
            gateway.stdout.readline()  # listening
            await asyncio.sleep(0.5)
            return await measure(port, gateway.pid, rate, seconds, distinct)
        finally:
            gateway.terminate()
            try:
                gateway.wait(timeout=10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.bench.flood")
    parser.add_argument("--rate", type=int, default=2000, help="Initials per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--distinct", type=int, default=4000,
                        help="distinct first flights made beforehand (then reused)")
    parser.add_argument("--flood-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.rate <= 20_000 or not 1 <= args.seconds <= 120:
        parser.error("--rate 1..20000, --seconds 1..120")
    if args.flood_only:
        flood(args.port, args.rate, args.seconds, args.distinct)
        return 0
    print(json.dumps(asyncio.run(run(args.rate, args.seconds, args.distinct))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
