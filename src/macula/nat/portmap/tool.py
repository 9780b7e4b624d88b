"""A small command-line runner: map this socket's port, then hold, echo and report.

    python -m macula.nat.portmap [--bind IP:PORT] [--gateway IP] [--protocols pcp,natpmp,upnp]
        [--lifetime S] [--upnp-lease S] [--ssdp-target IP:PORT] [--max-seconds S]
        [--parent-pid PID]

It prints JSON lines: {"event": "discovered", ...} with the DiscoveryResult, "change" when
the mapping changes, and "received" for every other datagram, which it echoes back (so a
peer can check the mapping lets it in). It reads commands from stdin: "close" deletes the
mapping (printing "closed"), "quit" or end of input deletes and exits. The kernel lab tests
run it inside a namespace; `--max-seconds` and `--parent-pid` bound its life.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from macula.net.endpoint import Address, format_address
from macula.net.udp import open_udp_endpoint

from .mapper import PortMapper
from .mapping import PROTOCOLS, DiscoveryResult, PortMapping
from .upnp_client import UpnpClient


def _addr(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _fmt(addr: Address | None) -> str | None:
    return format_address(addr) if addr is not None else None


def mapping_json(mapping: PortMapping | None) -> dict[str, Any] | None:
    if mapping is None:
        return None
    return {"protocol": mapping.protocol, "external": _fmt(mapping.external),
            "internal": _fmt(mapping.internal), "gateway": mapping.gateway,
            "lifetime": mapping.lifetime if mapping.lifetime != float("inf") else None}


def result_json(result: DiscoveryResult) -> dict[str, Any]:
    return {"gateway": result.gateway, "mapping": mapping_json(result.mapping),
            "answered": list(result.answered), "errors": [list(e) for e in result.errors]}


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    host, port = _addr(args.bind)
    endpoint = await open_udp_endpoint(host, port)
    upnp = UpnpClient(search_target=_addr(args.ssdp_target)) if args.ssdp_target else None
    mapper = PortMapper(endpoint, lifetime=args.lifetime, upnp_lease=args.upnp_lease,
                        protocols=args.protocols, upnp=upnp,
                        on_change=lambda m: emit({"event": "change", "mapping": mapping_json(m)}))

    def echo(data: bytes, addr: Address) -> None:
        emit({"event": "received", "from": _fmt(addr), "data": data[:200].decode("latin-1")})
        endpoint.send(data, addr)

    mapper.install_receiver(echo)
    commands: asyncio.Queue[str] = asyncio.Queue()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        commands.put_nowait(line.strip() if line else "quit")

    try:
        loop.add_reader(sys.stdin.fileno(), on_stdin)
        reading = True
    except (OSError, ValueError):
        reading = False  # stdin is a regular file or closed: run until --max-seconds
    try:
        result = await mapper.discover(args.gateway)
        emit({"event": "discovered", "local": _fmt(endpoint.local_address), **result_json(result)})
        deadline = loop.time() + args.max_seconds
        while (left := deadline - loop.time()) > 0:
            if args.parent_pid and os.getppid() != args.parent_pid:
                break
            try:
                command = await asyncio.wait_for(commands.get(), min(left, 0.5))
            except TimeoutError:
                continue
            if command == "close":
                await mapper.close()
                emit({"event": "closed"})
            elif command == "quit":
                break
    finally:
        if reading:
            loop.remove_reader(sys.stdin.fileno())
        await mapper.close()
        endpoint.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula.nat.portmap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default="0.0.0.0:0", help="the node socket (IP:PORT)")
    parser.add_argument("--gateway", default=None, help="router IP (default: default route)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        type=lambda s: tuple(p for p in s.split(",") if p))
    parser.add_argument("--lifetime", type=int, default=7200)
    parser.add_argument("--upnp-lease", type=int, default=3600)
    parser.add_argument("--ssdp-target", default=None, help="SSDP destination IP:PORT")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    return asyncio.run(run(args))
