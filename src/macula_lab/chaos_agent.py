"""Lab agents for chaos and soak runs, one node each, inside a kernel-lab namespace.

    python -m macula_lab.chaos_agent stream --gateway IP:PORT --key-file K --peer ID --dial
    python -m macula_lab.chaos_agent member --gateway IP:PORT --key-file K --slot 3 ...

`stream` runs one side of a chaos session (lab.timed_stream) and prints a {"streaming"}
line once the session is up (the parent times its fault from it). `member` is one soak
participant (lab.soak_member): it reads JSON commands on stdin, {"peer": SLOT, "id": ID}
when a neighbour's node changes and {"leave": true} to end its conversations and exit.
Both follow lab.agent's rules: JSON lines on stdout, the LAST one the result (also on
failure), bounded by --max-seconds, SIGTERM and the parent's death.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from macula.config import parse_host_port
from macula_lab.agent import (
    CLOSE_TIMEOUT,
    DEFAULT_MAX_SECONDS,
    Stopped,
    _wait_online,
    emit,
    main_logged,
    until_stopped,
)
from macula_lab.errorlog import ErrorLog
from macula_lab.faults import CHAOS_HARD_NAT


def _turn_specs(args: argparse.Namespace) -> dict[str, Any]:
    if not args.turn:
        return {}
    from macula.node.turn_relays import TurnServerSpec

    user, _, password = args.turn_auth.partition(":")
    return {"turn_servers": [TurnServerSpec(parse_host_port(args.turn), user, password)]}


async def _start_node(args: argparse.Namespace) -> Any:
    from macula.identity import Identity
    from macula.node.node import Node

    tcp: dict[str, Any] = ({"gateway_tls": parse_host_port(args.gateway_tls)}
                           if args.gateway_tls else {})
    return await Node.start(Identity.load_or_create(args.key_file),
                            gateway=args.gateway, **tcp,
                            listen=parse_host_port(args.listen), strategy=args.strategy,
                            register_timeout=args.register_timeout, hard_nat=CHAOS_HARD_NAT,
                            **_turn_specs(args))


async def _close(node: Any) -> None:
    try:
        await asyncio.wait_for(node.close(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError):
        pass


# --- stream ---------------------------------------------------------------------------------

async def run_stream(args: argparse.Namespace, log: ErrorLog) -> int:
    from macula.identity import NodeId
    from macula_lab.peer import _accept_from
    from macula_lab.timed_stream import StreamPlan, run_timed_stream

    plan = StreamPlan(messages=args.messages, interval=args.interval,
                      pauses=((args.pause_at, args.pause_for),) if args.pause_for else ())
    peer = NodeId.parse(args.peer)
    nodes: list[Any] = []
    result: dict[str, Any] = {"dial": args.dial}

    async def work() -> dict[str, Any]:
        node = await _start_node(args)
        nodes.append(node)
        result["node"] = node.node_id.text
        emit({"registered": True, "node": node.node_id.text})
        if args.dial:
            await _wait_online(node, peer, args.connect_timeout)
            session = await node.connect(peer, timeout=args.connect_timeout)
        else:
            session = await _accept_from(node, peer, args.connect_timeout)
        emit({"streaming": True, "at": asyncio.get_running_loop().time()})
        return {"connected": True, **await run_timed_stream(session, plan)}

    try:
        result.update(await until_stopped(work(), args.max_seconds))
    except Stopped as exc:
        result.update({"connected": False, "error": f"stream agent {exc}"})
    except Exception as exc:  # reported as the result: a failed side is a data point
        result.update({"connected": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        for node in nodes:
            result["handler_errors"] = node.handler_errors
            await _close(node)
    result["logged_errors"], result["logged"] = log.count, log.records[:5]
    emit(result)
    return 0 if result.get("connected") and not result.get("error") else 1


# --- member ---------------------------------------------------------------------------------

async def run_member(args: argparse.Namespace, log: ErrorLog) -> int:
    from macula.identity import NodeId
    from macula_lab.soak_member import Slot, SoakMember

    slots = {j: Slot(j) for j in args.neighbour}
    nodes: list[Any] = []
    result: dict[str, Any] = {"slot": args.slot}
    loop = asyncio.get_running_loop()

    async def commands(member: SoakMember) -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("leave"):
                member.leaving.set()
                return
            if command.get("peer") in slots:
                text = command.get("id")
                slots[command["peer"]].set(NodeId.parse(text) if text else None)
        member.leaving.set()  # stdin closed: the parent is gone or done with us

    async def work() -> None:
        node = await _start_node(args)
        nodes.append(node)
        result["node"] = node.node_id.text
        emit({"registered": True, "node": node.node_id.text})
        member = SoakMember(node, args.slot, list(slots.values()), interval=args.interval)
        result["member"] = member
        reader = asyncio.create_task(commands(member))
        try:
            await member.run()
        finally:
            reader.cancel()

    try:
        await until_stopped(work(), args.max_seconds)
    except Stopped as exc:
        result["error"] = f"member agent {exc}"
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for node in nodes:
            result["handler_errors"] = node.handler_errors
            await _close(node)
    member = result.pop("member", None)
    if member is not None:
        result["records"] = member.records()
        result["failures"] = member.failures
    result["logged_errors"], result["logged"] = log.count, log.records[:5]
    emit(result)
    return 0 if not result.get("error") else 1


# --- command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.chaos_agent",
                                     description="macula chaos/soak agent (inside a namespace)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", required=True, metavar="[ID@]IP:PORT")
        p.add_argument("--gateway-tls", metavar="IP:PORT",
                       help="the gateway's TLS path, used when UDP does not get through")
        p.add_argument("--key-file", required=True, metavar="FILE")
        p.add_argument("--listen", default="0.0.0.0:0", metavar="IP:PORT")
        p.add_argument("--strategy", default="opportunistic",
                       choices=["always_relay", "opportunistic", "direct_only"])
        p.add_argument("--turn", metavar="IP:PORT", help="a TURN server for the node")
        p.add_argument("--turn-auth", default="macula:chaos-secret", metavar="USER:PASSWORD")
        p.add_argument("--register-timeout", type=float, default=15.0)
        p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS)

    s = sub.add_parser("stream", help="one side of a chaos session (timed stream)")
    common(s)
    s.add_argument("--peer", required=True, metavar="NODE_ID")
    side = s.add_mutually_exclusive_group(required=True)
    side.add_argument("--dial", action="store_true")
    side.add_argument("--accept", action="store_true")
    s.add_argument("--messages", type=int, default=1000)
    s.add_argument("--interval", type=float, default=0.02)
    s.add_argument("--pause-at", type=int, default=0, metavar="SEQ")
    s.add_argument("--pause-for", type=float, default=0.0, metavar="SECONDS")
    s.add_argument("--connect-timeout", type=float, default=20.0)
    s.set_defaults(func=run_stream)

    m = sub.add_parser("member", help="one soak participant (commands on stdin)")
    common(m)
    m.add_argument("--slot", type=int, required=True)
    m.add_argument("--neighbour", type=int, action="append", default=[], metavar="SLOT")
    m.add_argument("--interval", type=float, default=0.25)
    m.set_defaults(func=run_member)
    return parser


def main(argv: list[str] | None = None) -> int:
    return main_logged(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
