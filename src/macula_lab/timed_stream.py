"""A numbered, timestamped message stream both ways over one session, for faults and soaks.

Like lab.peer.run_peer, but every message carries the time it was sent, and the receiver
keeps (sent_at, received_at) for each first delivery: that is what lets a chaos run say
when the first message sent after a fault arrived. The sender can pause (a quiet period)
before given sequence numbers. Times are on the loop clock: virtual in the simulator,
time.monotonic() in the kernel lab, where one clock serves every namespace.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

from macula.demo import ReceiverCount
from macula.node.node import PeerSession

_MSG = struct.Struct("!BId")  # kind 0 = data, seq, sent_at
_DONE = b"\x01done"


@dataclass(frozen=True)
class StreamPlan:
    """`messages` each way, one every `interval` s; `pauses` = ((before_seq, seconds), ...)
    are quiet periods; `settle` bounds the wait for the rest after the last send."""

    messages: int
    interval: float = 0.02
    payload: int = 64
    pauses: tuple[tuple[int, float], ...] = ()
    settle: float = 30.0

    @property
    def duration(self) -> float:
        return self.messages * self.interval + sum(s for _, s in self.pauses)


@dataclass
class StreamSide:
    """What one side sent and received."""

    expected: int
    count: ReceiverCount = field(init=False)
    rx: list[tuple[float, float]] = field(default_factory=list)  # (sent_at, received_at)
    quiet: list[tuple[float, float]] = field(default_factory=list)  # our pauses (start, end)
    sent: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        self.count = ReceiverCount(self.expected)

    def figures(self) -> dict[str, Any]:
        c = self.count
        return {"expected": self.expected, "sent": self.sent, "delivered": c.delivered,
                "lost": self.expected - c.delivered, "duplicated": c.duplicated,
                "reordered": c.reordered, "rx": [[round(s, 6), round(r, 6)] for s, r in self.rx],
                "quiet": [list(q) for q in self.quiet], "error": self.error}


async def run_timed_stream(session: PeerSession, plan: StreamPlan) -> dict[str, Any]:
    """Send plan.messages and receive as many; returns this side's figures plus the
    session's path history. Failures are reported in "error", never raised."""
    loop = asyncio.get_running_loop()
    side = StreamSide(plan.messages)
    pauses = dict(plan.pauses)
    peer_done = asyncio.Event()
    filler = b"m" * max(0, plan.payload - _MSG.size)

    async def sender() -> None:
        for seq in range(plan.messages):
            if seq in pauses:
                start = loop.time()
                await asyncio.sleep(pauses[seq])
                side.quiet.append((start, loop.time()))
            session.send(_MSG.pack(0, seq, loop.time()) + filler)
            side.sent += 1
            await asyncio.sleep(plan.interval)
        await session.drain(0)

    async def receiver() -> None:
        while not (side.count.complete and peer_done.is_set()):
            data = await session.recv()
            if data == _DONE:
                peer_done.set()
                continue
            _, seq, sent_at = _MSG.unpack_from(data)
            now = loop.time()
            first = seq not in side.count.seen
            side.count.record(seq, now)
            if first:
                side.rx.append((sent_at, now))

    recv_task = asyncio.create_task(receiver())
    try:
        await asyncio.wait_for(sender(), plan.settle + plan.duration)
        session.send(_DONE)
        await asyncio.wait_for(asyncio.shield(recv_task), plan.settle)
    except Exception as exc:  # a failed stream is a data point, not a crash
        side.error = f"{type(exc).__name__}: {exc}"
    finally:
        recv_task.cancel()
        await asyncio.gather(recv_task, return_exceptions=True)
    stats = session.stats()
    return {**side.figures(), "path": stats["connection_type"],
            "path_history": [[h["path"], h["at"]] for h in stats["path_history"]],
            "finished_at": loop.time()}
