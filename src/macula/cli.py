"""The `macula` command: gateway, node, id, demo, and the NAT lab.

Precedence everywhere: built-in defaults < --config FILE < MACULA_* environment < flags.
With --json, the LAST line printed is one JSON object (scripts read that line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import pathlib
import signal
import sys
from importlib.metadata import entry_points
from typing import Any

from .config import (
    Config,
    ConfigError,
    format_host_port,
    load_config,
    parse_host_port,
    split_gateway,
)
from .errors import MaculaError
from .gateway.options import GatewayOptions
from .gateway.server import Gateway
from .identity import Identity, NodeId
from .metrics import GatewayCollector, NodeCollector, registry_for, serve
from .node import known_gateways
from .node.node import Node, PeerSession
from .node.options import NodeOptions
from .version import __version__


def _config(args: argparse.Namespace, overrides: dict[str, Any]) -> Config:
    return load_config(getattr(args, "config", None),
                       overrides={k: v for k, v in overrides.items() if v is not None})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--key-file", metavar="FILE", help="private key file (created on first run)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    await stop.wait()


# ---------------------------------------------------------------- macula id
def cmd_id(args: argparse.Namespace) -> int:
    config = _config(args, {"node.key_file": args.key_file})
    identity = Identity.load_or_create(config.node.key_path())
    print(identity.node_id.text)
    return 0


# ---------------------------------------------------------------- macula gateway
def cmd_gateway(args: argparse.Namespace) -> int:
    config = _config(args, {"gateway.listen": args.listen, "gateway.key_file": args.key_file,
                            "metrics.listen": args.metrics})
    return asyncio.run(_run_gateway(config))


async def _run_gateway(config: Config) -> int:
    identity = Identity.load_or_create(config.gateway.key_path())
    gateway = await Gateway.start(identity, GatewayOptions.from_config(config))
    with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGHUP: re-read the allowlist
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, gateway.reload_allowlist)
    server = None
    if config.metrics.listen:
        server = serve(registry_for(GatewayCollector(gateway.core)),
                       *parse_host_port(config.metrics.listen))
    host, port = gateway.address
    where = format_host_port(host, port)
    print(f"macula gateway {identity.node_id} listening on {where}; nodes pin it as "
          f"{identity.node_id}@{where}", flush=True)
    try:
        await _wait_for_signal()
    finally:
        await gateway.close()
        if server is not None:
            server.shutdown()
    return 0


# ---------------------------------------------------------------- macula node
def cmd_node(args: argparse.Namespace) -> int:
    config = _config(args, {
        "node.gateway": args.gateway, "node.listen": args.listen,
        "node.key_file": args.key_file, "metrics.listen": args.metrics,
        "connection_strategy": args.strategy,
    })
    return asyncio.run(_run_node(config, args))


async def _run_node(config: Config, args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(config.node.key_path())
    for turn in config.turn_servers:
        if turn.transport != "udp":
            logging.getLogger("macula").warning(
                "turn server %s: transport %s is not used by nodes yet (UDP only); skipped",
                turn.server, turn.transport)
    options = NodeOptions.from_config(config)
    if options.gateway_id is None:  # trust on first use, remembered beside the key
        options = options.with_changes(known_gateways=str(known_gateways_path(config)))
    node = await Node.start(identity, options)
    server = None
    if config.metrics.listen:
        server = serve(registry_for(NodeCollector(node.core)), *parse_host_port(config.metrics.listen))
    observed = node.discover_public_address()
    _say(args, f"macula node {node.node_id} registered; gateway sees us at "
               f"{observed[0]}:{observed[1]}" if observed else "")
    try:
        if args.send:
            peer = NodeId.parse(args.send)
            session = await node.connect(peer, timeout=args.timeout)
            texts = args.message or [sys.stdin.read()]
            sent = 0
            for _ in range(args.count):
                for text in texts:
                    session.send(text.encode())
                    sent += 1
            await session.drain(0)
            stats = session.stats()
            _say(args, f"sent {sent} message(s) to {peer} via {stats['connection_type']}")
            if args.json:
                print(json.dumps({"sent": sent, **stats}))
            await session.close()
            return 0
        received = 0
        want = NodeId.parse(args.listen_for) if args.listen_for else None

        async def serve_session(session: PeerSession) -> None:
            nonlocal received
            while True:
                data = await session.recv()
                received += 1
                print(json.dumps({"from": session.peer.text, "message": data.decode("utf-8", "replace")})
                      if args.json else f"{session.peer} {data.decode('utf-8', 'replace')}", flush=True)
                if args.expect and received >= args.expect:
                    stop.set()

        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        async def accept_loop() -> None:
            while True:
                session = await node.accept()
                if want is not None and session.peer != want:
                    await session.close()
                    continue
                tasks.append(asyncio.create_task(serve_session(session)))

        tasks.append(asyncio.create_task(accept_loop()))
        waiter = asyncio.create_task(_wait_for_signal())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopper], timeout=args.timeout_listen,
                           return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, waiter, stopper]:
            task.cancel()
        return 0 if not args.expect or received >= args.expect else 1
    finally:
        await node.close()
        if server is not None:
            server.shutdown()


def _say(args: argparse.Namespace, text: str) -> None:
    if text:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def known_gateways_path(config: Config) -> pathlib.Path:
    return config.node.key_path().parent / "known_gateways"


# ---------------------------------------------------------------- macula trust-gateway
def cmd_trust_gateway(args: argparse.Namespace) -> int:
    """Pin (or re-pin, after an intended key change) a gateway for nodes of this key."""
    config = _config(args, {"node.key_file": args.key_file})
    gateway_id, address = split_gateway(args.gateway)
    if gateway_id is None:
        raise ConfigError("command line", f"trust-gateway: expected NODE_ID@host:port, got "
                          f"{args.gateway!r} (macula gateway prints it)")
    path = known_gateways_path(config)
    known_gateways.remember(path, parse_host_port(address), NodeId.parse(gateway_id))
    print(f"gateway {address} pinned as {gateway_id} in {path}")
    return 0


# ---------------------------------------------------------------- macula demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    config = _config(args, {"connection_strategy": args.strategy})
    result = asyncio.run(run_demo(strategy=config.connection_strategy, messages=args.messages))
    print(format_summary(result))
    if args.json:
        print(json.dumps(result))
    ok = result["delivered"] == result["sent"] and result["lost"] == 0 \
        and result["duplicated"] == 0 and result["reordered"] == 0
    return 0 if ok else 1


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macula",
        description="End-to-end encrypted node-to-node connectivity through any NAT.",
    )
    parser.add_argument("--version", action="version", version=f"macula {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("id", help="print this node's id (creates the key on first run)")
    _add_common(p)
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("gateway", help="run a gateway")
    _add_common(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="UDP address (default 0.0.0.0:9443)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("node", help="join a gateway; send to or listen for node ids")
    _add_common(p)
    p.add_argument("--gateway", metavar="[NODE_ID@]HOST:PORT",
                   help="gateway to join (default 127.0.0.1:9443); with its id, no other "
                        "key is accepted there")
    p.add_argument("--listen", metavar="HOST:PORT", help="local UDP socket (default 0.0.0.0:0)")
    p.add_argument("--strategy", choices=["always_relay", "opportunistic", "direct_only"])
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--send", metavar="NODE_ID", help="open a session to NODE_ID and send")
    p.add_argument("--message", action="append", help="message text (repeatable; default stdin)")
    p.add_argument("--count", type=int, default=1, help="send the messages this many times")
    p.add_argument("--listen-for", metavar="NODE_ID", help="only accept sessions from NODE_ID")
    p.add_argument("--expect", type=int, default=0, help="exit after receiving this many messages")
    p.add_argument("--timeout", type=float, default=10.0, help="connect timeout, seconds")
    p.add_argument("--timeout-listen", type=float, default=None,
                   help="stop listening after this many seconds")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("trust-gateway",
                       help="pin a gateway's key for this node (after an intended key change)")
    _add_common(p)
    p.add_argument("gateway", metavar="NODE_ID@HOST:PORT", help="as `macula gateway` prints it")
    p.set_defaults(func=cmd_trust_gateway)

    p = sub.add_parser("demo", help="embedded gateway + two nodes exchanging messages")
    _add_common(p)
    p.add_argument("--strategy", choices=["always_relay", "opportunistic", "direct_only"])
    p.add_argument("--messages", type=int, default=1000, help="messages each way (default 1000)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_demo)

    from .netcheck import add_netcheck_parser

    add_netcheck_parser(sub)

    # Commands from other installed distributions (the repository's macula-lab adds `lab`
    # and `bench`): the product never imports them, they register themselves.
    for entry in entry_points(group="macula.commands"):
        try:
            add_parser = entry.load()
        except ImportError as exc:  # a broken plugin must not take the product down
            logging.getLogger("macula").debug("command %s not loaded: %s", entry.name, exc)
            continue
        add_parser(sub, _add_common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.func(args)
        return code
    except MaculaError as exc:
        print(f"macula: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
