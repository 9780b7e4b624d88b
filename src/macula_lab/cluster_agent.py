"""Lab agents for `macula lab cluster --kernel`, one process each, inside a lab namespace.

    python -m macula_lab.cluster_agent gateway --listen IP:PORT --redis URL
    python -m macula_lab.cluster_agent node --gateways ID@IP:PORT,... --key-file K \\
        --peer ID --dial    (streams once {"go": true} arrives on stdin)

`gateway` is a cluster member; it reads {"drain": true} on stdin (drain, then exit). The
harness kills it with SIGKILL for the kill fault, so that one never reports. `node` homes
on one of the gateways and streams numbered messages with its partner (lab.peer); its
result has the stream's figures and every registration it made (time on the monotonic
clock, which the harness shares, and the gateway), from which failover times are read.
Both follow lab.agent's rules: JSON lines on stdout, the LAST one the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from macula.config import parse_host_port
from macula.net.endpoint import format_address
from macula_lab.agent import (
    CLOSE_TIMEOUT,
    DEFAULT_MAX_SECONDS,
    Stopped,
    emit,
    main_logged,
    until_stopped,
)
from macula_lab.errorlog import ErrorLog

REGISTRATION_POLL = 0.005  # seconds between looks at the node's registration


async def run_gateway(args: argparse.Namespace, log: ErrorLog) -> int:
    from macula.gateway.server import Gateway

    listen = parse_host_port(args.listen)
    gateway = await Gateway.start(listen=listen, cluster_redis=args.redis,
                                  cluster_advertise=listen, alternate_port=listen[1] + 1)
    emit({"ready": True, "node_id": gateway.node_id.text,
          "address": format_address(gateway.address)})
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {}

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if json.loads(line).get("drain"):
                result["drain"] = await gateway.drain()
                return
        await asyncio.Event().wait()  # stdin closed: wait for the signal

    code = 0
    try:
        await until_stopped(commands(), args.max_seconds)
    except Stopped as exc:
        result["stopped"] = str(exc)
        code = 0 if exc.by_signal else 1
    core = gateway.core
    result.update({"relayed_packets": core.relayed_packets,
                   "mesh_sent_bytes": core.mesh.relayed_bytes if core.mesh else 0,
                   "nodes_online": core.nodes_online, "registrations": core.registrations,
                   "dropped": dict(core.dropped), "malformed": dict(core.malformed),
                   "handler_errors": gateway.handler_errors,
                   "directory_outages": gateway.cluster.outages if gateway.cluster else 0,
                   "mesh_links": core.mesh.links_up if core.mesh else 0,
                   "members": len(core.cluster.members) if core.cluster else 0,
                   "remote_nodes": len(core.cluster.remote) if core.cluster else 0})
    try:
        await asyncio.wait_for(gateway.close(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError):
        pass
    result["logged_errors"], result["logged"] = log.count, log.records[:5]
    emit(result)
    return code


async def run_node(args: argparse.Namespace, log: ErrorLog) -> int:
    from macula.identity import Identity, NodeId
    from macula.node.node import Node
    from macula_lab.peer import run_peer

    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {"dial": args.dial}
    nodes: list[Node] = []
    registrations: list[tuple[float, str]] = []

    async def watch(node: Node) -> None:
        """Every registration, with when and where: failover times come from these."""
        seen: tuple[bool, Any] = (False, None)
        while True:
            now = (node.core.registered, node.core.gateway)
            if now != seen and now[0]:
                registrations.append((loop.time(), format_address(now[1])))
            seen = now
            await asyncio.sleep(REGISTRATION_POLL)

    async def work() -> dict[str, Any]:
        node = await Node.start(Identity.load_or_create(args.key_file),
                                gateways=args.gateways.split(","),
                                listen=parse_host_port(args.listen),
                                register_timeout=args.register_timeout)
        nodes.append(node)
        watcher = asyncio.ensure_future(watch(node))
        try:
            await node.wait_registered(args.register_timeout)
            emit({"registered": True, "node": node.node_id.text,
                  "home": format_address(node.core.gateway)})
            await _wait_for_go()  # every node is in: the harness starts all streams at once
            return await run_peer(node, NodeId.parse(args.peer), dial=args.dial,
                                  messages=args.messages, interval=args.interval,
                                  connect_timeout=20.0, settle=20.0)
        finally:
            watcher.cancel()

    try:
        result.update(await until_stopped(work(), args.max_seconds))
    except Stopped as exc:
        result.update({"connected": False, "error": f"node agent {exc}"})
    except Exception as exc:  # a failed side is a data point
        result.update({"connected": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for node in nodes:
            result["handler_errors"] = node.handler_errors
            try:
                await asyncio.wait_for(node.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError):
                pass
    result["registrations"] = registrations
    result["logged_errors"], result["logged"] = log.count, log.records[:5]
    emit(result)
    return 0 if result.get("connected") and not result.get("error") else 1


async def _wait_for_go() -> None:
    """Until {"go": true} on stdin (or stdin closes)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if json.loads(line).get("go"):
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.cluster_agent",
                                     description="macula cluster-lab agent (in a namespace)")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gateway", help="a cluster member ({\"drain\": true} on stdin)")
    g.add_argument("--listen", required=True, metavar="IP:PORT")
    g.add_argument("--redis", required=True, metavar="URL")
    g.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    g.set_defaults(func=run_gateway)
    n = sub.add_parser("node", help="one side of a session across the cluster")
    n.add_argument("--gateways", required=True, metavar="ID@IP:PORT,...")
    n.add_argument("--key-file", required=True)
    n.add_argument("--listen", default="0.0.0.0:0")
    n.add_argument("--peer", required=True, metavar="NODE_ID")
    side = n.add_mutually_exclusive_group(required=True)
    side.add_argument("--dial", action="store_true")
    side.add_argument("--accept", action="store_true")
    n.add_argument("--messages", type=int, default=600)
    n.add_argument("--interval", type=float, default=0.02)
    n.add_argument("--register-timeout", type=float, default=20.0)
    n.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)
    n.set_defaults(func=run_node)
    return parser


def main(argv: list[str] | None = None) -> int:
    return main_logged(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
