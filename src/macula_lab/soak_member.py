"""One soak participant: a node talking to its neighbours, whoever they currently are.

A soak is a ring of *slots*; each slot is held by one node at a time, and churn replaces
the node (new identity, same host). A member knows its neighbours' slots and follows
their current node ids (the controller announces every change), so the same code runs
in-process in the simulator and as an agent in a kernel namespace.

Per neighbour the lower slot dials. A conversation is two flows of numbered messages,
each ended by FIN(total sent); QUIC delivers in order, so once FIN arrived every earlier
message has too, and `total - delivered` is what was really lost. Either side stops on
leaving or on hearing the other's FIN, so a node leaves only after its neighbours have
received everything it sent (and it theirs). The records, merged by the controller per
(sender, receiver), give lost and duplicated across the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field
from typing import Any

from macula.identity import NodeId
from macula.node.node import Node, PeerSession
from macula.session.errors import MaculaError, SessionClosedError

_DATA = struct.Struct("!BI")  # kind 0, seq
_FIN = struct.Struct("!BI")  # kind 1, total sent
CONNECT_TIMEOUT = 10.0
FINISH_TIMEOUT = 15.0  # a conversation's orderly end: both FINs through
RETRY_PAUSE = 0.5


@dataclass
class Slot:
    """A neighbour position whose current node id changes with churn."""

    index: int
    node_id: NodeId | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, node_id: NodeId | None) -> None:
        self.node_id = node_id
        self.changed.set()


@dataclass
class Flow:
    """One direction of traffic between two node lifetimes (summed over conversations)."""

    sent: int = 0
    delivered: int = 0
    duplicated: int = 0
    reordered: int = 0
    fin_total: int = 0  # what the sender's FINs announced
    conversations: int = 0
    unfinished: int = 0  # conversations whose FIN never came


class _Counter:
    """Exactly-once and order check in O(gap) memory: the next sequence number expected
    plus the set of those that came early (empty while QUIC keeps order)."""

    def __init__(self) -> None:
        self.next = 0
        self.ahead: set[int] = set()

    def record(self, seq: int, flow: Flow) -> None:
        if seq < self.next or seq in self.ahead:
            flow.duplicated += 1
            return
        flow.delivered += 1
        if seq > self.next:
            flow.reordered += 1
            self.ahead.add(seq)
            return
        self.next += 1
        while self.next in self.ahead:
            self.ahead.discard(self.next)
            self.next += 1


class SoakMember:
    def __init__(self, node: Node, slot: int, neighbours: list[Slot], *,
                 interval: float = 0.25, payload: int = 64) -> None:
        self.node = node
        self.slot = slot
        self.neighbours = neighbours
        self.interval = interval
        self.filler = b"m" * max(0, payload - _DATA.size)
        self.leaving = asyncio.Event()
        self.sent: dict[NodeId, Flow] = {}
        self.received: dict[NodeId, Flow] = {}
        self.failures: list[str] = []
        self._incoming: dict[NodeId, asyncio.Queue[PeerSession]] = {}

    async def run(self) -> None:
        """Talk to every neighbour until `leaving` is set and the conversations ended."""
        accepter = asyncio.create_task(self._accept_loop())
        try:
            await asyncio.gather(*(self._link(s) for s in self.neighbours))
        finally:
            accepter.cancel()
            await asyncio.gather(accepter, return_exceptions=True)

    def records(self) -> list[dict[str, Any]]:
        """What this lifetime sent and received, per peer, for the controller's merge."""
        me = self.node.node_id.text
        out = [{"from": me, "to": p.text, "sent": f.sent, "conversations": f.conversations}
               for p, f in self.sent.items()]
        out += [{"from": p.text, "to": me, "delivered": f.delivered, "duplicated": f.duplicated,
                 "reordered": f.reordered, "fin_total": f.fin_total,
                 "unfinished": f.unfinished} for p, f in self.received.items()]
        return out

    # ------------------------------------------------------------------ per neighbour
    async def _link(self, slot: Slot) -> None:
        dial = self.slot < slot.index
        while not self.leaving.is_set():
            peer = slot.node_id
            if peer is None:
                await self._wait_change(slot)
                continue
            session = await (self._dial(peer) if dial else self._wait_incoming(peer, slot))
            if session is None:
                if slot.node_id == peer and not self.leaving.is_set():
                    await self._wait_change(slot, RETRY_PAUSE)
                continue
            if await self._converse(session, peer) and slot.node_id == peer:
                # The peer ended the conversation (it is leaving): wait for its successor.
                await self._wait_change(slot)

    async def _wait_change(self, slot: Slot, timeout: float | None = None) -> None:
        slot.changed.clear()
        leave = asyncio.create_task(self.leaving.wait())
        change = asyncio.create_task(slot.changed.wait())
        try:
            await asyncio.wait({leave, change}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (leave, change):
                task.cancel()

    async def _dial(self, peer: NodeId) -> PeerSession | None:
        try:
            return await self.node.connect(peer, timeout=CONNECT_TIMEOUT)
        except MaculaError:
            return None  # not registered yet (it is joining) or gone: try again later
        except TimeoutError:
            return None

    async def _wait_incoming(self, peer: NodeId, slot: Slot) -> PeerSession | None:
        queue = self._incoming.setdefault(peer, asyncio.Queue())
        slot.changed.clear()
        while True:
            get = asyncio.create_task(queue.get())
            leave = asyncio.create_task(self.leaving.wait())
            change = asyncio.create_task(slot.changed.wait())
            try:
                await asyncio.wait({get, leave, change}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (leave, change):
                    task.cancel()
            if not get.done():
                get.cancel()
                return None
            session = get.result()
            if not session.closed.is_set():  # an old session of this peer may linger
                return session

    async def _accept_loop(self) -> None:
        while True:
            session = await self.node.accept()
            self._incoming.setdefault(session.peer, asyncio.Queue()).put_nowait(session)

    # ------------------------------------------------------------------ a conversation
    async def _converse(self, session: PeerSession, peer: NodeId) -> bool:
        """One conversation; True when the peer ended it (it is leaving)."""
        out = self.sent.setdefault(peer, Flow())
        inbound = self.received.setdefault(peer, Flow())
        out.conversations += 1
        counter = _Counter()
        stop = asyncio.Event()
        fin = asyncio.Event()

        async def receive() -> None:
            try:
                while True:
                    kind, value = _DATA.unpack_from(await session.recv())
                    if kind == 1:
                        inbound.fin_total += value
                        fin.set()
                        return
                    counter.record(value, inbound)
            finally:
                stop.set()

        receiver = asyncio.create_task(receive())
        leave = asyncio.create_task(self.leaving.wait())
        leave.add_done_callback(lambda _: stop.set())
        seq = 0
        try:
            while not stop.is_set():
                session.send(_DATA.pack(0, seq) + self.filler)
                seq += 1
                out.sent += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
            if receiver.done() and not fin.is_set():
                receiver.result()  # the session died: raise why
            session.send(_FIN.pack(1, seq))
            await asyncio.wait_for(asyncio.shield(receiver), FINISH_TIMEOUT)
            # Leave only once the peer has acknowledged everything we sent. A peer that
            # closes first did so after reading our FIN, so that is no failure.
            with contextlib.suppress(SessionClosedError):
                await asyncio.wait_for(session.drain(0), FINISH_TIMEOUT)
        except (TimeoutError, MaculaError) as exc:
            self.failures.append(f"{self.node.node_id.text[:8]}<->{peer.text[:8]}: "
                                 f"{type(exc).__name__}: {exc}")
        finally:
            if not fin.is_set():
                inbound.unfinished += 1
            leave.cancel()
            receiver.cancel()
            await asyncio.gather(leave, receiver, return_exceptions=True)
        return fin.is_set() and not self.leaving.is_set()
