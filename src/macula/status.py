"""What `macula status` shows: snapshots of a running node or gateway, and ping probes.

Plain dicts of JSON types, the same whether read over the admin socket, the HTTP /status
endpoint or from Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .gateway.server import Gateway
from .identity import NodeId
from .net.endpoint import format_address, is_stream_address
from .node.node import Node
from .session.errors import ConnectTimeout, SessionClosedError
from .version import __version__


def session_row(stats: dict[str, Any]) -> dict[str, Any]:
    """One session as `macula status` lists it (`stats`: PeerSession.stats())."""
    return {
        "peer": stats["peer"],
        "path": stats["connection_type"],
        "transport": stats.get("transport", "udp"),
        "latency_ms": stats["latency_ms"],
        "bytes_sent": stats["bytes_sent"],
        "bytes_received": stats["bytes_received"],
        "upgrade_ms": stats["upgrade"]["upgrade_ms"],
    }


def node_status(node: Node, **extra: Any) -> dict[str, Any]:
    """The node, its gateway and its open sessions."""
    nat = node.detect_nat_type()
    observed = node.discover_public_address()
    gateway_id = node.core.link.gateway_id
    sessions = []
    for _peer, session in sorted(node.core.sessions.items(), key=lambda kv: kv[0].text):
        if session.established and not session.closed:
            stats = session.connection_stats()
            stats["transport"] = node._transport_of(session)
            sessions.append(session_row(stats))
    return {
        "version": __version__,
        "node_id": node.node_id.text,
        "gateway": format_address(node.core.gateway),
        "gateway_id": gateway_id.text if gateway_id is not None else None,
        "registered": node.registered,
        "gateway_transport": node.gateway_transport,
        "observed": format_address(observed) if observed else None,
        "local": format_address(node.local_address),
        "nat_type": nat.nat_type if nat is not None else "unknown",
        "binding_lifetime": (node.binding_lifetime.to_json()
                             if node.binding_lifetime is not None else None),
        "gateway_keepalive_s": node.core.link.keepalive_interval,
        "strategy": node.strategy,
        "sessions": sessions,
        **extra,
    }


def gateway_status(gateway: Gateway, now: float) -> dict[str, Any]:
    """The gateway and every node registered on it (`now`: the gateway's clock)."""
    core = gateway.core
    nodes = [{
        "node_id": entry.node_id.text,
        "address": format_address(entry.address),
        "transport": "tls" if is_stream_address(entry.address) else "udp",
        "nat_type": entry.nat_type,
        "nat_traversal": entry.nat_traversal,
        "registered_s": round(now - entry.registered_at, 1),
        "idle_s": round(now - entry.last_seen, 1),
    } for entry in sorted(core.registry, key=lambda e: e.node_id.text)]
    return {
        "version": __version__,
        "gateway_id": gateway.node_id.text,
        "listen": format_address(gateway.address),
        "pin": f"{gateway.node_id.text}@{format_address(gateway.address)}",
        "tls_listen": format_address(gateway.tls_address) if gateway.tls_address else None,
        "max_nodes": core.max_nodes,
        "registrations": core.registrations,
        "cluster": _cluster_status(gateway),
        "nodes": nodes,
    }


def _cluster_status(gateway: Gateway) -> dict[str, Any] | None:
    """A cluster member's view of the cluster; None for a gateway running alone."""
    sync, view, mesh = gateway.cluster, gateway.core.cluster, gateway.core.mesh
    if sync is None or view is None or mesh is None:
        return None
    return {
        "advertise": format_address(sync.advertise),
        "directory_up": view.directory_ok,
        "directory_outages": sync.outages,
        "draining": gateway.core.draining,
        "remote_nodes": len(view.remote),
        "members": [{
            "gateway_id": member.gateway_id.text,
            "mesh": format_address(member.mesh),
            "nodes": member.nodes,
            "draining": member.draining,
            "link_up": raw in mesh.live_members(),
            "rtt_ms": round(mesh.rtt(member.gateway_id) * 1000, 2),
        } for raw, member in sorted(view.members.items())],
    }


async def ping_probes(node: Node, peer: NodeId, count: int, interval: float,
                      timeout: float) -> AsyncIterator[dict[str, Any]]:
    """Open (or reuse) the session with `peer` and time `count` QUIC PINGs over whatever
    path it is on; one dict per probe: seq, path (the session's path when the probe left),
    rtt_ms (None if unanswered), and on the probe where the path changed, changed_from and
    upgrade_ms (how long after the session opened it left the relay)."""
    loop = asyncio.get_running_loop()
    session = await node.connect(peer, timeout=timeout)
    # The session's first path: a move that happened before the first probe (the direct
    # path can win during the handshake) is reported on that probe.
    last_path = session.stats()["path_history"][0]["path"]
    for seq in range(1, count + 1):
        started = loop.time()
        path = session.connection_type
        try:
            rtt: float | None = await session.ping(timeout=timeout)
        except ConnectTimeout:
            rtt = None
        except SessionClosedError as exc:
            yield {"seq": seq, "path": path, "rtt_ms": None, "error": str(exc)}
            return
        probe: dict[str, Any] = {"seq": seq, "path": path,
                                 "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None}
        if path != last_path:
            probe["changed_from"] = last_path
            upgrade = session.stats()["upgrade"]["upgrade_ms"]
            if path != "relay" and upgrade is not None:
                probe["upgrade_ms"] = upgrade
        last_path = path
        yield probe
        if seq < count:
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))
