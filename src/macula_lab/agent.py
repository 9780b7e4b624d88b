"""The lab agent: one gateway, one trial peer or one NAT probe, run inside a lab namespace.

    python -m macula_lab.agent gateway --listen 203.0.113.10:9443 --second-ip 203.0.113.20
    python -m macula_lab.agent peer --gateway 203.0.113.10:9443 --key-file k --peer ID --dial
    python -m macula_lab.agent nat-probe --server 203.0.113.10:9443

The parent (kernel_trial, tests) reads JSON lines from stdout; the LAST line is always the
result, also on failure ({"error": ...}), so the parent never has to guess. Every command
ends by --max-seconds, on SIGTERM/SIGINT, or when its parent dies, so no agent outlives
its lab.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from macula.config import parse_host_port
from macula.net.endpoint import Address, format_address

T = TypeVar("T")

DEFAULT_MAX_SECONDS = 120.0
PARENT_CHECK_INTERVAL = 0.5
CLOSE_TIMEOUT = 5.0  # closing a node or gateway must not eat the whole budget
ONLINE_POLL_INTERVAL = 0.05


class Stopped(Exception):
    """The agent was stopped (signal, --max-seconds, parent gone) before it finished.

    `by_signal` tells a parent's orderly SIGTERM from running into a cap.
    """

    def __init__(self, why: str, *, by_signal: bool) -> None:
        super().__init__(why)
        self.by_signal = by_signal


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once (the parent waits for it)."""
    print(json.dumps(obj, default=str), flush=True)


def _addr_text(addr: Address | None) -> str | None:
    return None if addr is None else format_address(addr)


async def until_stopped(work: Awaitable[T], max_seconds: float) -> T:
    """Await `work`, unless a signal, `max_seconds` or the parent's death comes first.

    Then `work` is cancelled and Stopped says why. The parent check matters because
    `ip netns exec` execs us: if the lab process dies we are reparented, never told.
    """
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[Stopped] = loop.create_future()

    def stop(why: str, by_signal: bool) -> None:
        if not stopped.done():
            stopped.set_result(Stopped(why, by_signal=by_signal))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, f"stopped by {sig.name}", True)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        stop("parent process exited", False)

    watcher = asyncio.create_task(watch_parent())
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task, stopped}, timeout=max_seconds,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if stopped.done():
            raise stopped.result()
        raise Stopped(f"--max-seconds {max_seconds:g} reached", by_signal=False)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# --- gateway ------------------------------------------------------------------------------

async def run_gateway(args: argparse.Namespace) -> int:
    from macula.gateway.server import Gateway

    gateway = await Gateway.start(
        listen=parse_host_port(args.listen), alternate_port=args.alternate_port,
        second_ip=args.second_ip,
        tls_listen=parse_host_port(args.tls_listen) if args.tls_listen else None)
    emit({"ready": True, "node_id": gateway.node_id.text,
          "address": _addr_text(gateway.address), "tls": _addr_text(gateway.tls_address),
          "stun": [_addr_text(a) for a in gateway.stun_addresses]})
    code, why = 0, ""
    try:
        await until_stopped(asyncio.Event().wait(), args.max_seconds)
    except Stopped as exc:
        why = str(exc)
        # Anything but the parent's SIGTERM means it lost track of us: an error.
        code = 0 if exc.by_signal else 1
    core = gateway.core
    figures: dict[str, Any] = {
        "stopped": why,
        "relayed_packets": core.relayed_packets,
        "relayed_bytes": core.relayed_bytes,
        "relayed_bytes_by_transport": dict(core.relayed_bytes_by_transport),
        "tls_refused": dict(gateway.streams.refused) if gateway.streams else {},
        "nodes_online": core.nodes_online,
        "registrations": core.registrations,
        "malformed": dict(core.malformed),
        "dropped": dict(core.dropped),
        "stun_dropped": dict(gateway.stun_dropped),
        "stun": {"requests": gateway.stun.requests, "responses": gateway.stun.responses,
                 "malformed": gateway.stun.malformed, "errors": gateway.stun.errors},
        "handler_errors": gateway.handler_errors,
    }
    if code:
        figures["error"] = f"gateway stopped: {why}"
    try:
        await asyncio.wait_for(gateway.close(), CLOSE_TIMEOUT)
    except TimeoutError:
        figures.setdefault("error", "gateway close timed out")
    emit(figures)
    return code


# --- peer -----------------------------------------------------------------------------------

async def run_peer_agent(args: argparse.Namespace) -> int:
    from macula.identity import Identity, NodeId
    from macula.node.node import Node
    from macula_lab.peer import run_peer

    identity = Identity.load_or_create(args.key_file)
    peer = NodeId.parse(args.peer)
    nodes: list[Node] = []
    info: dict[str, Any] = {"node": identity.node_id.text, "dial": args.dial}

    async def trial() -> dict[str, Any]:
        tcp: dict[str, Any] = {}
        if args.gateway_tls:
            tcp = {"gateway_tls": parse_host_port(args.gateway_tls),
                   "https_proxy": args.https_proxy or None}
        node = await Node.start(identity, gateway=args.gateway, **tcp,
                                listen=parse_host_port(args.listen), strategy=args.strategy,
                                register_timeout=args.register_timeout,
                                turn_servers=[_turn_spec(t) for t in args.turn],
                                port_mapping=args.port_mapping, hard_nat=args.hard_nat)
        nodes.append(node)
        info.update({"local": _addr_text(node.local_address),
                     "observed": _addr_text(node.discover_public_address()),
                     "gateway_transport": node.gateway_transport})
        emit({"registered": True, **info})
        if args.dial:
            # The two agents start together: dialing before the acceptor has registered
            # would fail with PeerOffline, so wait (bounded) until the gateway knows it.
            await _wait_online(node, peer, args.connect_timeout)
        result = await run_peer(node, peer, dial=args.dial, messages=args.messages,
                                interval=args.interval, connect_timeout=args.connect_timeout,
                                spread=args.spread)
        result.update(info)
        result["nat_type"] = _nat_type(node)
        return result

    try:
        result = await until_stopped(trial(), args.max_seconds)
    except Stopped as exc:
        result = {**info, "connected": False, "error": f"peer agent {exc}"}
    except Exception as exc:  # reported as the result: a failed trial is a data point
        result = {**info, "connected": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        for node in nodes:
            try:
                await asyncio.wait_for(node.close(), CLOSE_TIMEOUT)
            except (TimeoutError, OSError):
                pass
    emit(result)
    return 0 if result.get("connected") and "error" not in result else 1


def _turn_spec(text: str):
    from macula.node.turn_relays import TurnServerSpec

    creds, _, where = text.rpartition("@")
    user, _, password = creds.partition(":")
    server, slash, transport = where.partition("/")
    if not user or not server or (slash and transport not in ("udp", "tcp", "tls")):
        raise ValueError(f"--turn wants USER:PASS@IP:PORT[/tcp|/tls], got {text!r}")
    return TurnServerSpec(parse_host_port(server), user, password, transport or "udp")


async def _wait_online(node: Any, peer: Any, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if await node.is_online(peer, timeout=max(0.1, deadline - loop.time())):
                return
        except TimeoutError:
            break
        await asyncio.sleep(ONLINE_POLL_INTERVAL)
    raise TimeoutError(f"peer {peer} did not come online at the gateway within {timeout:g} s")


def _nat_type(node: Any) -> str | None:
    # The node's own NAT classification, once the node layer keeps one.
    nat = getattr(node.core, "nat", None)
    return getattr(nat, "nat_type", None)


# --- nat-probe ------------------------------------------------------------------------------

def source_ip_towards(server: Address) -> str:
    """The address the kernel would send from (connect() on UDP sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(server)
        ip: str = sock.getsockname()[0]
    return ip


async def run_nat_probe(args: argparse.Namespace) -> int:
    from macula.nat.aio import detect_nat_behavior
    from macula.net.udp import open_udp_endpoint

    server = parse_host_port(args.server)
    # Bind the real source address: a wildcard bind never equals the mapped one, so an
    # unNATed host would not be recognised as "open".
    endpoint = await open_udp_endpoint(source_ip_towards(server), 0)
    try:
        behavior = await until_stopped(
            detect_nat_behavior(endpoint, server, timeout=args.timeout,
                                alternate_port=args.alternate_port),
            args.max_seconds)
    except Stopped as exc:
        emit({"error": f"nat-probe {exc}"})
        return 1
    finally:
        endpoint.close()
    emit(dataclasses.asdict(behavior))
    return 0


# --- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.agent",
                                     description="macula lab agent (runs inside a namespace)")
    sub = parser.add_subparsers(dest="command", required=True)

    def bounded(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                       help="hard lifetime cap (default %(default)s)")

    g = sub.add_parser("gateway", help="a gateway with its STUN sockets")
    g.add_argument("--listen", required=True, metavar="IP:PORT")
    g.add_argument("--second-ip", metavar="IP", help="second IP for RFC 5780 (both ports)")
    g.add_argument("--alternate-port", type=int, metavar="P",
                   help="second STUN port (default: listen port + 1)")
    g.add_argument("--tls-listen", metavar="IP:PORT", help="the TLS (WebSocket) path")
    bounded(g)
    g.set_defaults(func=run_gateway)

    p = sub.add_parser("peer", help="one side of a lab trial (lab.peer.run_peer)")
    p.add_argument("--gateway", required=True, metavar="[ID@]IP:PORT")
    p.add_argument("--gateway-tls", metavar="IP:PORT",
                   help="the gateway's TLS path, used when UDP does not get through")
    p.add_argument("--https-proxy", metavar="URL", help="HTTP CONNECT proxy for that path")
    p.add_argument("--key-file", required=True, metavar="FILE")
    p.add_argument("--peer", required=True, metavar="NODE_ID")
    side = p.add_mutually_exclusive_group(required=True)
    side.add_argument("--dial", action="store_true")
    side.add_argument("--accept", action="store_true")
    p.add_argument("--listen", default="0.0.0.0:0", metavar="IP:PORT")
    p.add_argument("--messages", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--strategy", default="opportunistic",
                   choices=["always_relay", "opportunistic", "direct_only"])
    p.add_argument("--turn", action="append", default=[], metavar="USER:PASS@IP:PORT[/tls]",
                   help="a TURN server to allocate on (repeatable)")
    p.add_argument("--port-mapping", action="store_true",
                   help="ask the router for a mapping (PCP, NAT-PMP, UPnP-IGD)")
    p.add_argument("--hard-nat", action=argparse.BooleanOptionalAction, default=True,
                   help="guess ports against hard NATs (birthday probing, prediction); on "
                        "by default, as in the product")
    p.add_argument("--spread", type=float, default=0.0,
                   help="stretch the second half of the messages over this many seconds")
    p.add_argument("--connect-timeout", type=float, default=15.0)
    p.add_argument("--register-timeout", type=float, default=10.0)
    bounded(p)
    p.set_defaults(func=run_peer_agent)

    n = sub.add_parser("nat-probe", help="RFC 5780 NAT behaviour discovery, as JSON")
    n.add_argument("--server", required=True, metavar="IP:PORT")
    n.add_argument("--alternate-port", type=int, metavar="P")
    n.add_argument("--timeout", type=float, default=3.0, help="probe time budget in seconds")
    bounded(n)
    n.set_defaults(func=run_nat_probe)
    return parser


def main_logged(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """main() of the agents whose commands count logged errors (chaos_agent,
    cluster_agent): run the chosen command with an ErrorLog; a failure to set up is still
    one JSON result line."""
    from macula_lab.errorlog import ErrorLog

    args = parser.parse_args(argv)
    with ErrorLog() as log:
        try:
            code: int = asyncio.run(args.func(args, log))
        except Exception as exc:
            emit({"error": f"{args.command}: {type(exc).__name__}: {exc}"})
            return 1
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.max_seconds > 0:
        emit({"error": "--max-seconds must be positive"})
        return 2
    try:
        code: int = asyncio.run(args.func(args))
    except Exception as exc:  # setup failures (bind, key file): still one JSON result line
        emit({"error": f"{args.command}: {type(exc).__name__}: {exc}"})
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
