"""One side of a lab trial: open (or accept) the session and run a numbered stream both ways.

Messages flow for the whole trial, spread over time, so that whatever happens to the path
underneath (relay first, then an upgrade or a fault) happens *while* data is moving, and the
receiver's counts prove nothing was lost, duplicated or reordered across it. The same code
runs in the simulator (both peers in one virtual-time process) and in the kernel lab (one
process per network namespace).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from macula.demo import ReceiverCount
from macula.identity import NodeId
from macula.node.node import Node, PeerSession

_DATA = struct.Struct("!BI")  # kind 0 = data, seq
_DONE = b"\x01done"


async def run_peer(
    node: Node,
    peer: NodeId,
    *,
    dial: bool,
    messages: int = 200,
    interval: float = 0.005,
    payload: int = 64,
    connect_timeout: float = 15.0,
    settle: float = 20.0,
    spread: float = 0.0,
) -> dict[str, Any]:
    """Returns this side's figures; timestamps are on the loop clock (comparable between
    processes on one machine, and virtual in the simulator). With `spread`, the second
    half of the messages is stretched over that many seconds: the stream then outlasts
    a slow upgrade (hard-NAT guessing) and the final path is the one it found."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    result: dict[str, Any] = {"node": node.node_id.text, "dial": dial, "connected": False,
                              "started_at": started}
    try:
        session = (await node.connect(peer, timeout=connect_timeout) if dial
                   else await _accept_from(node, peer, connect_timeout))
    except Exception as exc:  # reported, not raised: a trial that fails is a data point
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    result["connected"] = True
    result["connected_at"] = loop.time()
    count = ReceiverCount(messages)
    peer_done = asyncio.Event()
    filler = b"m" * max(0, payload - _DATA.size)

    half = messages // 2
    slow = max(interval, spread / max(1, messages - half))

    async def sender() -> None:
        for seq in range(messages):
            session.send(_DATA.pack(0, seq) + filler)
            await asyncio.sleep(interval if seq < half else slow)
        await session.drain(0)

    async def receiver() -> None:
        while not (count.complete and peer_done.is_set()):
            data = await session.recv()
            if data == _DONE:
                peer_done.set()
                continue
            _, seq = _DATA.unpack_from(data)
            count.record(seq, loop.time())

    recv_task = asyncio.create_task(receiver())
    try:
        await asyncio.wait_for(sender(), settle + messages * interval + spread)
        session.send(_DONE)  # tell the peer we are finished sending
        await asyncio.wait_for(asyncio.shield(recv_task), settle)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        recv_task.cancel()
    stats = session.stats()
    result.update({
        "expected": messages,
        "delivered": count.delivered,
        "duplicated": count.duplicated,
        "reordered": count.reordered,
        "lost": messages - count.delivered,
        "first_rx_at": count.first_at,
        "max_gap_ms": round(count.max_gap * 1000, 3),
        "path": stats["connection_type"],
        "transport": stats.get("transport"),
        "path_history": stats["path_history"],
        "latency_ms": stats["latency_ms"],
        "bytes_by_path": stats["bytes_by_path"],
        "upgrade": stats.get("upgrade"),
        "ice": stats.get("ice"),
        "finished_at": loop.time(),
    })
    return result


async def _accept_from(node: Node, peer: NodeId, timeout: float) -> PeerSession:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        session = await node.accept(timeout=max(0.0, deadline - loop.time()))
        if session.peer == peer:
            return session
        await session.close()


def failed_trial(error: str) -> dict[str, Any]:
    """A trial that could not even run: a data point of the matrix, not a crash."""
    return {"connected": False, "path": None, "first_byte_ms": None, "upgrade_ms": None,
            "ice_ms": None, "lost": 0, "duplicated": 0, "reordered": 0, "errors": [error],
            "gateway_relayed_bytes": None, "nat": {"a": None, "b": None},
            "direct_address": None}


def summarise_trial(dialer: dict[str, Any], acceptor: dict[str, Any]) -> dict[str, Any]:
    """Fold both sides of one trial into the matrix row's per-trial figures."""
    connected = dialer.get("connected", False) and acceptor.get("connected", False)
    out: dict[str, Any] = {"connected": connected, "path": None, "first_byte_ms": None,
                           "upgrade_ms": None, "ice_ms": None, "lost": 0, "duplicated": 0,
                           "reordered": 0, "errors": [e for e in (dialer.get("error"),
                                                                   acceptor.get("error")) if e],
                           "direct_address": None}
    if not connected:
        return out
    out["lost"] = dialer["lost"] + acceptor["lost"]
    out["duplicated"] = dialer["duplicated"] + acceptor["duplicated"]
    out["reordered"] = dialer["reordered"] + acceptor["reordered"]
    # Final path: both sides must agree for a path to count; otherwise the weaker one.
    paths = {dialer["path"], acceptor["path"]}
    out["path"] = dialer["path"] if len(paths) == 1 else _weakest(paths)
    # The final path runs over TCP (TLS) on either side: to the gateway or to TURN.
    out["transports"] = [dialer.get("transport"), acceptor.get("transport")]
    out["tcp"] = any(t in ("tcp", "tls") for t in out["transports"])
    firsts = [t for t in (dialer["first_rx_at"], acceptor["first_rx_at"]) if t is not None]
    if firsts:
        out["first_byte_ms"] = round((min(firsts) - dialer["started_at"]) * 1000, 3)
    # Upgrade and ICE times run from the dialer's own request (the start of the attempt as
    # the application sees it); the acceptor only joins later, so its clock reads less.
    out["upgrade_ms"] = (dialer.get("upgrade") or {}).get("upgrade_ms")
    out["ice_ms"] = (dialer.get("ice") or {}).get("ice_ms")
    # When the dialer's session first went direct: the figure for slow upgrades
    # (TURN first, then hard-NAT guessing), where upgrade_ms is the first one.
    went = next((h["at"] for h in dialer.get("path_history") or [] if h["path"] == "direct"),
                None)
    out["hard_nat"] = [side["upgrade"]["hard_nat"] for side in (dialer, acceptor)
                       if (side.get("upgrade") or {}).get("hard_nat")]
    out["direct_ms"] = round((went - dialer["started_at"]) * 1000, 3) if went is not None else None
    if out["path"] == "direct":
        # Where the dialer's direct path ends: shows the family (IPv6 or IPv4) it runs on.
        out["direct_address"] = (dialer.get("upgrade") or {}).get("direct_address")
    return out


_RANK = {"direct": 0, "turn": 1, "relay": 2}


def _weakest(paths: set[str]) -> str:
    return max(paths, key=lambda p: _RANK.get(p, 3))
