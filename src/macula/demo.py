"""`macula demo`: an embedded gateway and two nodes on this machine, talking both ways.

Every message carries its direction and sequence number; the receiver counts what it got,
so lost, duplicated and reordered are measured where they would hurt, not assumed.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from .gateway.server import Gateway
from .identity import Identity
from .node.node import Node, PeerSession

_HEADER = struct.Struct("!BI")  # direction, sequence


@dataclass
class ReceiverCount:
    """What one receiver saw of a numbered stream."""
    expected: int
    seen: set[int] = field(default_factory=set)
    delivered: int = 0
    duplicated: int = 0
    reordered: int = 0
    highest: int = -1
    first_at: float | None = None
    last_at: float | None = None
    max_gap: float = 0.0  # the longest wait between two arrivals: a pause the user saw

    def record(self, seq: int, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        if self.last_at is not None:
            self.max_gap = max(self.max_gap, now - self.last_at)
        self.last_at = now
        if seq in self.seen:
            self.duplicated += 1
            return
        self.seen.add(seq)
        self.delivered += 1
        if seq < self.highest:
            self.reordered += 1
        self.highest = max(self.highest, seq)

    @property
    def complete(self) -> bool:
        return self.delivered >= self.expected


async def exchange(
    a: PeerSession, b: PeerSession, messages: int, *, payload: int = 64, settle: float = 10.0
) -> dict[str, Any]:
    """Send `messages` numbered messages each way at once and count them at each receiver."""
    loop = asyncio.get_running_loop()
    counts = {0: ReceiverCount(messages), 1: ReceiverCount(messages)}
    filler = b"m" * max(0, payload - _HEADER.size)

    async def sender(session: PeerSession, direction: int) -> None:
        for seq in range(messages):
            session.send(_HEADER.pack(direction, seq) + filler)
            if seq % 64 == 63:
                await session.drain()

    async def receiver(session: PeerSession, direction: int) -> None:
        count = counts[direction]
        while not count.complete:
            data = await session.recv()
            d, seq = _HEADER.unpack_from(data)
            count.record(seq, loop.time())

    started = loop.time()
    senders = [asyncio.create_task(sender(a, 0)), asyncio.create_task(sender(b, 1))]
    receivers = [asyncio.create_task(receiver(b, 0)), asyncio.create_task(receiver(a, 1))]
    await asyncio.gather(*senders)
    done, pending = await asyncio.wait(receivers, timeout=settle)
    for task in pending:
        task.cancel()
    # Anything still in flight after the settle time is lost; let stragglers show as dups.
    elapsed = loop.time() - started
    sent = 2 * messages
    delivered = sum(c.delivered for c in counts.values())
    return {
        "sent": sent,
        "delivered": delivered,
        "lost": sent - delivered,
        "duplicated": sum(c.duplicated for c in counts.values()),
        "reordered": sum(c.reordered for c in counts.values()),
        "elapsed_s": round(elapsed, 3),
        "messages_per_s": round(delivered / elapsed, 1) if elapsed > 0 else None,
    }


async def run_demo(*, strategy: str = "opportunistic", messages: int = 1000) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    gateway = await Gateway.start(listen=("127.0.0.1", 0))
    alice = bob = None
    try:
        alice = await Node.start(Identity.generate(), gateway=gateway.address,
                                 listen=("127.0.0.1", 0), strategy=strategy)
        bob = await Node.start(Identity.generate(), gateway=gateway.address,
                               listen=("127.0.0.1", 0), strategy=strategy)
        # First byte: one message sent the moment connect() returns, timed to its arrival.
        t0 = loop.time()
        a_side = await alice.connect(bob.node_id)
        a_side.send(b"first")
        b_side = await bob.accept(timeout=10)
        assert await b_side.recv(timeout=10) == b"first"
        first_byte_ms = round((loop.time() - t0) * 1000, 3)
        result = await exchange(a_side, b_side, messages)
        # Opportunistic sessions are upgraded while the messages flow; report where the
        # session ended up once the punch has had its round trips.
        if strategy != "always_relay":
            for _ in range(100):
                if a_side.connection_type == "direct" and b_side.connection_type == "direct":
                    break
                await asyncio.sleep(0.01)
        stats = a_side.stats()
        return {
            "strategy": strategy,
            "gateway": f"{gateway.address[0]}:{gateway.address[1]}",
            "alice": alice.node_id.text,
            "bob": bob.node_id.text,
            **result,
            "path": a_side.connection_type,
            "first_byte_ms": first_byte_ms,
            "upgrade_ms": stats["upgrade"]["upgrade_ms"],
            "latency_ms": stats["latency_ms"],
            "bytes_sent": stats["bytes_sent"],
            "bytes_received": stats["bytes_received"],
            "gateway_relayed_packets": gateway.core.relayed_packets,
            "gateway_relayed_bytes": gateway.core.relayed_bytes,
            "wall_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        for node in (alice, bob):
            if node is not None:
                await node.close()
        await gateway.close()


def format_summary(result: dict[str, Any]) -> str:
    rows = [
        ("strategy", result["strategy"]),
        ("path", result["path"]),
        ("messages sent", result["sent"]),
        ("delivered", result["delivered"]),
        ("lost", result["lost"]),
        ("duplicated", result["duplicated"]),
        ("reordered", result["reordered"]),
        ("first byte", f"{result['first_byte_ms']} ms"),
        ("relay->direct", f"{result['upgrade_ms']} ms" if result["upgrade_ms"] is not None else "-"),
        ("path RTT", f"{result['latency_ms']} ms"),
        ("throughput", f"{result['messages_per_s']} msg/s"),
        ("gateway relayed", f"{result['gateway_relayed_packets']} packets, "
                            f"{result['gateway_relayed_bytes']} bytes"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"macula demo: gateway {result['gateway']}, alice {result['alice'][:8]}.., "
             f"bob {result['bob'][:8]}.."]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    ok = result["delivered"] == result["sent"] and not (
        result["lost"] or result["duplicated"] or result["reordered"])
    lines.append("  result" .ljust(width + 2) + ("  OK: every message arrived once, in order"
                                                 if ok else "  FAILED"))
    return "\n".join(lines)
