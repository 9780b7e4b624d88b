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
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from typing import Any
from wsgiref.simple_server import WSGIServer

from . import logs
from .admin import AdminUnavailable, serving
from .admin import request as admin_request
from .config import (
    LOG_FORMATS,
    LOG_LEVELS,
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
from .logsafe import clip
from .metrics import GatewayCollector, NodeCollector, registry_for, serve
from .node import known_gateways
from .node.node import Node, PeerSession
from .node.options import NodeOptions
from .session.errors import ConnectTimeout
from .status import gateway_status, node_status, ping_probes
from .version import __version__

# The flag each config key can come from, so an error names what the user typed.
FLAGS = {
    "node.gateway": "--gateway", "node.listen": "--listen", "node.key_file": "--key-file",
    "gateway.key_file": "--key-file", "gateway.listen": "--listen", "metrics.listen": "--metrics",
    "connection_strategy": "--strategy", "node.accept_from": "--listen-for/--allow",
    "gateway.alternate_port": "--alternate-port", "gateway.second_ip": "--second-ip",
    "gateway.tls_listen": "--tls-listen", "node.gateway_tls": "--gateway-tls",
    "node.https_proxy": "--https-proxy",
    "log.level": "--log-level", "log.format": "--log-format",
}


def _config(args: argparse.Namespace, overrides: dict[str, Any]) -> Config:
    """The command's config: file, environment, then its flags; logging set up from it."""
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", None)
    overrides = {**overrides, "log.level": level, "log.format": getattr(args, "log_format", None)}
    config = load_config(getattr(args, "config", None),
                         overrides={k: v for k, v in overrides.items() if v is not None},
                         flags=FLAGS)
    logs.setup(config.log.level, config.log.format)
    return config


def _add_node_flags(p: argparse.ArgumentParser, listen: bool = True) -> None:
    p.add_argument("--gateway", metavar="[NODE_ID@]HOST:PORT",
                   help="gateway to join (default 127.0.0.1:9443); with its id, no other "
                        "key is accepted there")
    if listen:
        p.add_argument("--listen", metavar="HOST:PORT",
                       help="local UDP socket (default 0.0.0.0:0)")
    p.add_argument("--strategy", choices=["always_relay", "opportunistic", "direct_only"])
    p.add_argument("--gateway-tls", metavar="HOST:PORT",
                   help="the gateway's TLS (WebSocket) port, used when UDP does not get through")
    p.add_argument("--https-proxy", metavar="URL",
                   help="HTTP CONNECT proxy for that link (default: HTTPS_PROXY)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics and JSON /status here")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds for the whole run to register, connect and deliver "
                        "(default 10)")


def _add_admin_socket(p: argparse.ArgumentParser, what: str = "the status socket") -> None:
    p.add_argument("--admin-socket", metavar="PATH",
                   help=f"{what} (default: the key file's path + .sock)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--key-file", metavar="FILE", help="private key file (created on first run)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (--log-level debug)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS),
                   help="least important log lines shown (default warning; info: one line "
                        "per registration, NAT type, session and path change)")
    p.add_argument("--log-format", choices=list(LOG_FORMATS), help="text (default) or json lines")


async def _wait_for_signal(stop: asyncio.Event | None = None) -> str:
    """Until SIGINT or SIGTERM (or `stop` is set by someone else); returns which."""
    done = stop or asyncio.Event()
    got: list[str] = []

    def on_signal(name: str) -> None:
        got.append(name)
        done.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    await done.wait()
    return got[0] if got else "stop"


# ---------------------------------------------------------------- macula id
def cmd_id(args: argparse.Namespace) -> int:
    config = _config(args, {"node.key_file": args.key_file})
    identity = Identity.load_or_create(config.node.key_path())
    print(identity.node_id.text)
    return 0


# ---------------------------------------------------------------- macula gateway
def cmd_gateway(args: argparse.Namespace) -> int:
    if args.action == "drain":
        return asyncio.run(_drain_gateway(args))
    config = _config(args, {"gateway.listen": args.listen, "gateway.key_file": args.key_file,
                            "metrics.listen": args.metrics,
                            "gateway.alternate_port": args.alternate_port,
                            "gateway.second_ip": args.second_ip,
                            "gateway.tls_listen": args.tls_listen,
                            "gateway.cluster.redis": args.redis})
    return asyncio.run(_run_gateway(config, args))


async def _drain_gateway(args: argparse.Namespace) -> int:
    """`macula gateway drain`: the running gateway (found by its admin socket) asks its
    nodes to move to other members, waits until they have, and exits."""
    config = _config(args, {"gateway.key_file": args.key_file})
    path = _admin_path(args, config.gateway.key_path())
    try:
        async for answer in admin_request(path, {"command": "drain"},
                                          timeout=config.gateway.cluster.drain_timeout / 1000
                                          + 10):
            if answer.get("error"):
                print(f"macula: error: {answer['error']}", file=sys.stderr)
                return 1
            print(f"drained: {answer['moved']} of {answer['moved'] + answer['left']} node(s) "
                  f"moved in {answer['elapsed_ms']:.0f} ms"
                  + (f"; {answer['left']} still there" if answer["left"] else "")
                  + "; the gateway exits now")
    except AdminUnavailable as exc:
        print(f"macula: error: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_gateway(config: Config, args: argparse.Namespace) -> int:
    identity = Identity.load_or_create(config.gateway.key_path())
    admin_path = _admin_path(args, config.gateway.key_path())
    loop = asyncio.get_running_loop()
    gateways: list[Gateway] = []
    stop = asyncio.Event()

    async def handle(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if request.get("command") == "status" and gateways:
            yield {"done": True, **gateway_status(gateways[0], loop.time())}
        elif request.get("command") == "drain" and gateways:
            if gateways[0].cluster is None:
                yield {"done": True, "error": "this gateway is not in a cluster "
                       "(gateway.cluster.redis): its nodes have nowhere to move"}
                return
            yield {"done": True, **await gateways[0].drain()}
            stop.set()
        else:
            yield {"done": True, "error": f"unknown command {clip(request.get('command'), 40)!r}"}

    async with serving(admin_path, handle):
        gateway = await Gateway.start(identity, GatewayOptions.from_config(config))
        gateways.append(gateway)
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGHUP: re-read the allowlist
            loop.add_signal_handler(signal.SIGHUP, gateway.reload)
        server = None
        if config.metrics.listen:
            server = serve(registry_for(GatewayCollector(gateway.core, gateway.streams,
                                                         gateway.cluster)),
                           *parse_host_port(config.metrics.listen),
                           status=lambda: gateway_status(gateway, loop.time()))
        host, port = gateway.address
        where = format_host_port(host, port)
        print(f"macula gateway {identity.node_id} listening on {where}; nodes pin it as "
              f"{identity.node_id}@{where}", flush=True)
        if gateway.tls_address is not None:
            print(f"TLS (WebSocket) path for nodes without UDP on "
                  f"{format_host_port(*gateway.tls_address)}: node.gateway_tls", flush=True)
        if gateway.cluster is not None:
            print(f"cluster member on {format_host_port(*gateway.cluster.advertise)}; "
                  f"directory {'reachable' if gateway.core.cluster and gateway.core.cluster.directory_ok else 'NOT reachable yet (serving alone until it is)'}",
                  flush=True)
        try:
            why = await _wait_for_signal(stop)
            # SIGTERM in a cluster: the nodes move to other members before we go.
            if why == "SIGTERM" and gateway.cluster is not None and not gateway.core.draining:
                await gateway.drain()
        finally:
            await gateway.close()
            if server is not None:
                server.shutdown()
        return 0


# ---------------------------------------------------------------- macula node
def _node_config(args: argparse.Namespace, **extra: Any) -> Config:
    return _config(args, {
        "node.gateway": getattr(args, "gateway", None), "node.listen": getattr(args, "listen", None),
        "node.key_file": args.key_file, "metrics.listen": getattr(args, "metrics", None),
        "connection_strategy": getattr(args, "strategy", None),
        "node.gateway_tls": getattr(args, "gateway_tls", None),
        "node.https_proxy": getattr(args, "https_proxy", None), **extra,
    })


def cmd_node(args: argparse.Namespace) -> int:
    config = _node_config(args, **{"node.accept_from": [args.listen_for] if args.listen_for
                                   else None})
    return asyncio.run(_run_node(config, args))


async def _start_node(config: Config, timeout: float | None) -> Node:
    """The node of a CLI command, registered within `timeout` (trust on first use beside
    the key when the gateway id is not pinned)."""
    identity = Identity.load_or_create(config.node.key_path())
    options = NodeOptions.from_config(config)
    if options.gateway_id is None:  # trust on first use, remembered beside the key
        options = options.with_changes(known_gateways=str(known_gateways_path(config)))
    return await Node.start(identity, options, register_timeout=timeout)


def _serve_metrics(config: Config, node: Node) -> WSGIServer | None:
    if not config.metrics.listen:
        return None
    return serve(registry_for(NodeCollector(node.core)), *parse_host_port(config.metrics.listen),
                 status=lambda: node_status(node))


async def _run_node(config: Config, args: argparse.Namespace) -> int:
    # --timeout bounds the whole run of a sender: registration, session and delivery.
    deadline = asyncio.get_running_loop().time() + args.timeout
    node = await _start_node(config, args.timeout)
    server = _serve_metrics(config, node)
    observed = node.discover_public_address()
    _say(args, f"macula node {node.node_id} registered; gateway sees us at "
               f"{observed[0]}:{observed[1]}" if observed else "")
    try:
        if args.send:
            return await _send(node, args, deadline)
        return await _listen(node, args)
    finally:
        await node.close()
        if server is not None:
            server.shutdown()


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


async def _send(node: Node, args: argparse.Namespace, deadline: float) -> int:
    peer = NodeId.parse(args.send)
    session = await node.connect(peer, timeout=_left(deadline))
    if args.message:
        texts = [text.encode() for text in args.message]
    else:
        data = sys.stdin.buffer.read()
        texts = [line for line in data.splitlines()] if args.lines else [data]
    sent = 0
    for _ in range(args.count):
        for text in texts:
            session.send(text)
            sent += 1
    try:
        # Delivered means acknowledged by the peer's QUIC stack; a peer that refuses the
        # session closes it before acknowledging anything, and drain says so.
        async with asyncio.timeout(_left(deadline)):
            await session.drain(0)
    except TimeoutError:
        raise ConnectTimeout(f"{peer} did not acknowledge the messages within "
                             f"--timeout {args.timeout:g} s") from None
    stats = session.stats()
    _say(args, f"sent {sent} message(s) to {peer} via {stats['connection_type']}")
    if args.json:
        print(json.dumps({"sent": sent, **stats}))
    await session.close()
    return 0


async def _listen(node: Node, args: argparse.Namespace) -> int:
    received = 0
    stop = asyncio.Event()

    async def serve_session(session: PeerSession) -> None:
        nonlocal received
        while True:
            data = await session.recv()
            received += 1
            print(json.dumps({"from": session.peer.text, "message": data.decode("utf-8", "replace")})
                  if args.json else f"{session.peer} {data.decode('utf-8', 'replace')}", flush=True)
            if args.expect and received >= args.expect:
                stop.set()

    tasks: list[asyncio.Task[None]] = []

    async def accept_loop() -> None:
        while True:  # node.accept_from (--listen-for) already refused everyone else
            session = await node.accept()
            tasks.append(asyncio.create_task(serve_session(session)))

    tasks.append(asyncio.create_task(accept_loop()))
    ended = await _until_stopped(node, stop, args.timeout_listen)
    for task in tasks:
        task.cancel()
    if ended is not None:
        raise ended
    return 0 if not args.expect or received >= args.expect else 1


async def _until_stopped(node: Node, stop: asyncio.Event | None = None,
                         timeout: float | None = None) -> MaculaError | None:
    """Until a signal, `stop`, `timeout` or the gateway refusing us for good (returned)."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(_wait_for_signal()),
                                        asyncio.ensure_future(node.wait_refused())]
    if stop is not None:
        waits.append(asyncio.ensure_future(stop.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    refused = waits[1]
    return refused.result() if refused.done() and not refused.cancelled() else None


# ---------------------------------------------------------------- macula up
def _admin_path(args: argparse.Namespace, key_path: pathlib.Path) -> pathlib.Path:
    """--admin-socket, or the key file's path with ".sock" added: one running process per key."""
    given = getattr(args, "admin_socket", None)
    return pathlib.Path(given) if given else key_path.with_name(key_path.name + ".sock")


def _parse_expose(texts: list[str]) -> dict[int, tuple[str, int]]:
    ports: dict[int, tuple[str, int]] = {}
    for text in texts:
        port_text, _, target = text.partition("=")
        try:
            port = int(port_text)
            if not 0 < port < 65536:
                raise ValueError
            ports[port] = parse_host_port(target) if target else ("127.0.0.1", port)
        except (ValueError, ConfigError):
            raise ConfigError("--expose", f"expected PORT or PORT=HOST:PORT, got {text!r}") from None
    return ports


def cmd_up(args: argparse.Namespace) -> int:
    allowed = [] if not args.allow or "any" in args.allow else args.allow
    if args.expose and not args.allow:
        raise ConfigError("--expose", "name the nodes that may use exposed ports with --allow "
                          "NODE_ID (repeatable), or --allow any for every node the gateway "
                          "admits")
    config = _node_config(args, **{"node.accept_from": allowed or None})
    return asyncio.run(_run_up(config, args))


async def _run_up(config: Config, args: argparse.Namespace) -> int:
    from .forward import Exposer

    ports = _parse_expose(args.expose or [])
    admin_path = _admin_path(args, config.node.key_path()).resolve()
    node_box: list[Node] = []
    exposer_box: list[Exposer] = []

    async def handle(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        command = request.get("command")
        if not node_box:
            yield {"done": True, "error": "the node is still starting"}
        elif command == "status":
            exposer = exposer_box[0] if exposer_box else None
            yield {"done": True, **node_status(node_box[0], admin_socket=str(admin_path),
                                               exposed=sorted(ports),
                                               forwards_served=exposer.served if exposer else 0,
                                               forwards_refused=exposer.refused if exposer else 0)}
        elif command == "ping":
            try:
                peer = NodeId.parse(str(request.get("peer", "")))
                async for probe in ping_probes(node_box[0], peer, int(request.get("count", 4)),
                                               float(request.get("interval", 1.0)),
                                               float(request.get("timeout", 5.0))):
                    yield probe
                yield {"done": True}
            except (MaculaError, ValueError) as exc:
                yield {"done": True, "error": str(exc)}
        else:
            yield {"done": True, "error": f"unknown command {clip(command, 40)!r}"}

    # The admin socket first: a second `up` with this key stops here, before it registers
    # and takes the first one's place at the gateway.
    async with serving(admin_path, handle):
        node = await _start_node(config, args.timeout)
        node_box.append(node)
        exposer = Exposer(node, ports, allowed=node.options.accept_from)
        exposer_box.append(exposer)
        server = _serve_metrics(config, node)
        gateway_id = node.core.link.gateway_id
        print(f"macula up: node {node.node_id} registered with gateway "
              f"{gateway_id}@{format_host_port(*node.core.gateway)}"
              + (f"; exposing {', '.join(str(p) for p in sorted(ports))}" if ports else "")
              + f"; status: macula status --admin-socket {admin_path}", flush=True)

        async def accept_loop() -> None:
            while True:
                session = await node.accept()
                exposer.serve_session(session)

        acceptor = asyncio.create_task(accept_loop())
        try:
            ended = await _until_stopped(node)
        finally:
            acceptor.cancel()
            await exposer.close()
            await node.close()
            if server is not None:
                server.shutdown()
        if ended is not None:
            raise ended
        return 0


# ---------------------------------------------------------------- macula status
def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args, {"node.key_file": args.key_file, "gateway.key_file": args.key_file})
    key = config.gateway.key_path() if args.gateway else config.node.key_path()
    path = _admin_path(args, key)

    async def ask() -> dict[str, Any]:
        async for answer in admin_request(path, {"command": "status"}):
            return answer
        raise AdminUnavailable(f"{path} gave no answer")

    try:
        status = asyncio.run(ask())
    except AdminUnavailable:
        role = "gateway" if args.gateway else "node"
        start = "macula gateway" if args.gateway else "macula up"
        print(f"macula: no {role} is running here ({path} does not answer; start one with "
              f"`{start}`)", file=sys.stderr)
        return 2
    if status.get("error"):
        print(f"macula: error: {status['error']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(status))
    elif args.gateway:
        print(f"gateway {status['pin']}  nodes {len(status['nodes'])}/{status['max_nodes']}")
        for row in status["nodes"]:
            print(f"  {row['node_id']}  {row['address']:<24} nat {row['nat_type']:<16} "
                  f"registered {row['registered_s']:g} s ago")
    else:
        print(f"node {status['node_id']}  {'registered' if status['registered'] else 'NOT registered'}")
        print(f"  gateway {status['gateway_id']}@{status['gateway']}")
        print(f"  observed {status['observed']}  nat {status['nat_type']}  "
              f"exposing {', '.join(map(str, status.get('exposed', []))) or 'nothing'}")
        if not status["sessions"]:
            print("  no sessions")
        for row in status["sessions"]:
            latency = f"{row['latency_ms']:.1f} ms" if row["latency_ms"] is not None else "-"
            print(f"  {row['peer']}  {row['path']:<6} {row['transport']}  {latency:>10}  "
                  f"sent {row['bytes_sent']} B  received {row['bytes_received']} B")
    return 0


# ---------------------------------------------------------------- macula ping
def cmd_ping(args: argparse.Namespace) -> int:
    peer = NodeId.parse(args.peer)
    config = _node_config(args)
    return asyncio.run(_run_ping(config, args, peer))


def _probe_line(peer: NodeId, probe: dict[str, Any]) -> str:
    if probe.get("error"):
        return f"{probe['seq']}: session ended: {probe['error']}"
    if probe["rtt_ms"] is None:
        return f"{probe['seq']}: no answer via {probe['path']}"
    text = f"pong from {peer.text[:12]} via {probe['path']} {probe['rtt_ms']:.1f} ms"
    if "changed_from" in probe:
        text += f" (moved from {probe['changed_from']}"
        text += f", upgraded after {probe['upgrade_ms']:.0f} ms)" if "upgrade_ms" in probe else ")"
    return text


async def _run_ping(config: Config, args: argparse.Namespace, peer: NodeId) -> int:
    probes: list[dict[str, Any]] = []
    request = {"command": "ping", "peer": peer.text, "count": args.count,
               "interval": args.interval, "timeout": args.timeout}
    via = "own node"
    admin_path = _admin_path(args, config.node.key_path())
    try:
        # A node with this key is up: ping through it (a second registration with the
        # key would take its place at the gateway).
        async for answer in admin_request(admin_path, request, timeout=args.timeout + 5):
            if answer.get("done"):
                if answer.get("error"):
                    raise MaculaError(answer["error"])
                break
            probes.append(answer)
            _say(args, _probe_line(peer, answer))
        via = f"macula up at {admin_path}"
    except AdminUnavailable:
        node = await _start_node(config, args.timeout)
        try:
            async for probe in ping_probes(node, peer, args.count, args.interval, args.timeout):
                probes.append(probe)
                _say(args, _probe_line(peer, probe))
        finally:
            await node.close()
    answered = [p for p in probes if p["rtt_ms"] is not None]
    rtts = sorted(p["rtt_ms"] for p in answered)
    upgrades = [p["upgrade_ms"] for p in probes if "upgrade_ms" in p]
    summary = {
        "peer": peer.text, "via": via, "sent": len(probes), "answered": len(answered),
        "opened_via": probes[0].get("changed_from", probes[0]["path"]) if probes else None,
        "final_path": probes[-1]["path"] if probes else None,
        "rtt_ms_min": rtts[0] if rtts else None,
        "rtt_ms_median": rtts[len(rtts) // 2] if rtts else None,
        "upgrade_ms": upgrades[0] if upgrades else None,
        "probes": probes,
    }
    _say(args, f"{len(answered)}/{len(probes)} answered"
               + (f", last via {summary['final_path']}" if probes else ""))
    if args.json:
        print(json.dumps(summary))
    return 0 if answered else 1


# ---------------------------------------------------------------- macula forward
def cmd_forward(args: argparse.Namespace) -> int:
    peer_text, _, port_text = args.target.rpartition(":")
    try:
        peer, port = NodeId.parse(peer_text), int(port_text)
    except ValueError:
        raise ConfigError("command line", f"forward: expected NODE_ID:PORT, got "
                          f"{clip(args.target, 80)!r}") from None
    config = _node_config(args)
    return asyncio.run(_run_forward(config, args, peer, port))


async def _run_forward(config: Config, args: argparse.Namespace, peer: NodeId, port: int) -> int:
    from .forward import Forwarder

    node = await _start_node(config, args.timeout)
    forwarder = Forwarder(node, peer, port, parse_host_port(args.local),
                          connect_timeout=args.timeout)
    try:
        local = await forwarder.start()
        print(f"macula forward: {format_host_port(*local)} -> {peer}:{port}", flush=True)
        ended = await _until_stopped(node)
        if ended is not None:
            raise ended
        return 0
    finally:
        await forwarder.close()
        await node.close()


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


# ---------------------------------------------------------------- macula ca
def cmd_ca(args: argparse.Namespace) -> int:
    from .membership import CertificateAuthority

    _config(args, {})  # logging, and a bad config file is still reported
    folder = pathlib.Path(args.dir).expanduser()
    if args.ca_command == "init":
        ca = CertificateAuthority.init(folder)
        print(f"CA {ca.public.ca_id}: private key {folder / 'ca.key'} (keep it offline), "
              f"public key {folder / 'ca.pub'} (give it to gateways and nodes: gateway.ca, "
              "node.ca)")
        return 0
    ca = CertificateAuthority.load(folder / "ca.key")
    node = NodeId.parse(args.node_id)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    membership = ca.sign(node, name=args.name or node.text, groups=groups, days=args.days)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(f"{node.text}.membership")
    out.write_text(membership.pem())
    print(f"signed {out}: node {node} ({membership.name}), groups {', '.join(sorted(groups))}, "
          f"serial {membership.serial}, valid {args.days:g} days; the node uses it with "
          f"node.membership = \"{out}\"")
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

    p = sub.add_parser("gateway", help="run a gateway; `macula gateway drain` moves a running "
                                       "cluster member's nodes to the others, then stops it")
    p.add_argument("action", nargs="?", choices=["drain"],
                   help="drain: ask the running gateway with this key (its admin socket) to "
                        "move its nodes to other members and exit")
    _add_common(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="UDP address (default 0.0.0.0:9443)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics and JSON /status here")
    p.add_argument("--alternate-port", type=int, metavar="PORT",
                   help="STUN's second port (default: the listen port + 1)")
    p.add_argument("--second-ip", metavar="IP",
                   help="a second IP of this host: STUN answers there too and OTHER-ADDRESS "
                        "names it (RFC 5780 filtering tests)")
    p.add_argument("--tls-listen", metavar="HOST:PORT",
                   help="TCP address of the TLS (WebSocket) path for nodes without UDP")
    p.add_argument("--redis", metavar="URL",
                   help="join the cluster whose directory is this Redis "
                        "(gateway.cluster.redis: redis://host:port/db)")
    _add_admin_socket(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("node", help="join a gateway; send to or listen for node ids")
    _add_common(p)
    _add_node_flags(p)
    p.add_argument("--send", metavar="NODE_ID", help="open a session to NODE_ID and send")
    p.add_argument("--message", action="append", help="message text (repeatable; default stdin)")
    p.add_argument("--lines", action="store_true",
                   help="with stdin: each line is one message (default: all of stdin is one)")
    p.add_argument("--count", type=int, default=1, help="send the messages this many times")
    p.add_argument("--listen-for", metavar="NODE_ID",
                   help="only accept sessions from NODE_ID (others are refused at the handshake)")
    p.add_argument("--expect", type=int, default=0, help="exit after receiving this many messages")
    p.add_argument("--timeout-listen", type=float, default=None,
                   help="stop listening after this many seconds")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("up", help="run a node that stays up: accepts sessions, serves exposed "
                                  "TCP ports, answers `macula status`")
    _add_common(p)
    _add_node_flags(p)
    p.add_argument("--expose", action="append", metavar="PORT[=HOST:PORT]",
                   help="let allowed peers open TCP connections to localhost:PORT (or "
                        "HOST:PORT) through `macula forward` (repeatable)")
    p.add_argument("--allow", action="append", metavar="NODE_ID",
                   help="accept sessions only from NODE_ID (repeatable); `any`: every node "
                        "the gateway admits")
    _add_admin_socket(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", help="what a running `macula up` (or, with --gateway, "
                                      "`macula gateway`) is doing")
    _add_common(p)
    p.add_argument("--gateway", action="store_true", help="ask the gateway of this key file")
    _add_admin_socket(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ping", help="time round trips to a node and show the path they take")
    _add_common(p)
    _add_node_flags(p)
    p.add_argument("peer", metavar="NODE_ID")
    p.add_argument("-c", "--count", type=int, default=4, help="probes (default 4)")
    p.add_argument("-i", "--interval", type=float, default=1.0,
                   help="seconds between probes (default 1)")
    _add_admin_socket(p, "ping through the `macula up` serving this socket when one is up, "
                         "else with a node of its own")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("forward", help="a local TCP port whose connections reach a port "
                                       "another node exposes")
    _add_common(p)
    _add_node_flags(p, listen=False)
    p.add_argument("target", metavar="NODE_ID:PORT", help="the node and its exposed port")
    p.add_argument("--listen", dest="local", metavar="HOST:PORT", default="127.0.0.1:0",
                   help="local TCP address to accept connections on (default 127.0.0.1:0)")
    p.set_defaults(func=cmd_forward)

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

    p = sub.add_parser("ca", help="a private network's CA: init, sign memberships")
    ca_sub = p.add_subparsers(dest="ca_command", required=True)
    q = ca_sub.add_parser("init", help="make the CA key (ca.key) and its public key (ca.pub)")
    _add_common(q)
    q.add_argument("--dir", default=".", help="where to write ca.key and ca.pub (default .)")
    q.set_defaults(func=cmd_ca)
    q = ca_sub.add_parser("sign", help="sign a membership certificate for a node id")
    _add_common(q)
    q.add_argument("node_id", metavar="NODE_ID", help="the node's id (macula id prints it)")
    q.add_argument("--name", help="a human name for the node (default: its id)")
    q.add_argument("--groups", required=True, help="comma-separated groups, e.g. ops,servers")
    q.add_argument("--days", type=float, default=365.0, help="validity (default 365)")
    q.add_argument("--dir", default=".", help="the CA's directory (ca.key; default .)")
    q.add_argument("--out", metavar="FILE", help="default: NODE_ID.membership")
    q.set_defaults(func=cmd_ca)

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
    # Until the command's config is read (it may set log.level): flags, else warnings.
    logs.setup("debug" if getattr(args, "verbose", False)
               else getattr(args, "log_level", None) or "warning",
               getattr(args, "log_format", None) or "text")
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
