"""What a registered idle node costs a real gateway process, in RSS.

`python -m macula_lab.bench.node_memory --nodes 2000 [--json]` starts `macula gateway` on
loopback (its own key in a temporary directory, registration_rate off so the nodes arrive
as fast as this process can make them), registers the nodes from this process in batches,
lets a housekeeping round pass, and reads the gateway's VmRSS before and after. The
bench's capacity case walks Python objects instead (a floor: OpenSSL's and the
allocator's memory are not seen); this is the figure an operator's `ps` shows.
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
from typing import Any

TARGET_BYTES_PER_NODE = 40_000  # issue 18's goal
SETTLE_S = 12.0  # two housekeeping rounds: the allocator hands back what handshakes freed


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def measure(nodes: int, batch: int = 200, settle_s: float = SETTLE_S) -> dict[str, Any]:
    from macula import Identity, Node

    port = _free_udp_port()
    with tempfile.TemporaryDirectory(prefix="macula-node-memory-") as folder:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "macula.cli", "gateway", "--listen", f"127.0.0.1:{port}",
             "--key-file", os.path.join(folder, "gateway.key")],
            env=dict(os.environ, MACULA_GATEWAY_REGISTRATION_RATE="0",
                     MACULA_CONFIG_DIR=folder),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        members: list[Node] = []
        try:
            assert gateway.stdout is not None
            if "listening on" not in gateway.stdout.readline():
                raise RuntimeError("the gateway did not start")
            await asyncio.sleep(1.0)
            base = _rss(gateway.pid)
            while len(members) < nodes:
                members += await asyncio.gather(*[
                    Node.start(Identity.generate(), gateway=("127.0.0.1", port),
                               listen=("127.0.0.1", 0), nat_traversal=False,
                               register_timeout=60)
                    for _ in range(min(batch, nodes - len(members)))])
            await asyncio.sleep(settle_s)
            after = _rss(gateway.pid)
        finally:
            for member in members:
                member._driver.close()  # leaving politely would cost N close handshakes
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
    per_node = (after - base) / max(1, nodes)
    return {"nodes": nodes, "gateway_rss_base_mb": round(base / 1e6, 1),
            "gateway_rss_mb": round(after / 1e6, 1), "rss_bytes_per_node": round(per_node),
            "target_bytes_per_node": TARGET_BYTES_PER_NODE,
            "met": per_node <= TARGET_BYTES_PER_NODE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.bench.node_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="seconds idle first")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.nodes, settle_s=args.settle))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['nodes']} nodes: gateway RSS {result['gateway_rss_base_mb']} -> "
              f"{result['gateway_rss_mb']} MB, {result['rss_bytes_per_node']} B per node "
              f"(goal <= {TARGET_BYTES_PER_NODE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
