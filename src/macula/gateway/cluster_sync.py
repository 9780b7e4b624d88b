"""Keeps a member's cluster view and the directory store in step (the asyncio side).

Our nodes' registrations, moves and departures are written every WRITE_EVERY in one
pipelined batch, and their records renewed every NODE_TTL / 3; our member record is
announced every ANNOUNCE_EVERY with a TTL of MEMBER_TTL, and the member list read back as
often. The change feed keeps the view of other members' nodes current; a full snapshot
is read at start, after any outage, and every SNAPSHOT_EVERY as a backstop.

When the store goes away the gateway carries on from what it knows: its own nodes, the
cached ones, the mesh links it has. Every failure is logged once per outage and counted;
retries back off from RETRY_MIN to RETRY_MAX; on return everything of ours is written
again (a restarted Redis has nothing) and the view is read afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

from ..identity import NodeId
from ..logsafe import clip
from ..net.endpoint import Address
from .core import GatewayCore
from .directory import DirectoryStore, MemberRecord, StoreUnavailable

log = logging.getLogger(__name__)

WRITE_EVERY = 0.05
ANNOUNCE_EVERY = 1.0
MEMBER_TTL = 3.0
SNAPSHOT_EVERY = 30.0
RETRY_MIN, RETRY_MAX = 0.5, 5.0


class ClusterSync:
    def __init__(self, core: GatewayCore, store: DirectoryStore, advertise: Address,
                 flush: Callable[[], None], now: Callable[[], float]) -> None:
        assert core.cluster is not None
        self.core = core
        self.view = core.cluster
        self.store = store
        self.advertise = advertise  # where the other members reach us
        self._flush = flush  # send what the core queued (the driver's flush)
        self._now = now
        self.node_ttl = max(core.node_timeout, 3 * ANNOUNCE_EVERY)
        self.outages = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            try:
                await self._session()
            except StoreUnavailable as exc:
                self.failures += 1
                if self.view.directory_ok or self.failures == 1:
                    self.outages += 1
                    log.error("cluster directory unreachable, serving this gateway's own "
                              "nodes from what it knows: %s", clip(exc, 200))
                self.view.directory_ok = False
                self._connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX) if not self.view.directory_ok else RETRY_MIN

    async def _session(self) -> None:
        """One connected stretch: catch up, then follow the feed and write as we go, until
        the store fails."""
        feed = self.store.changes()
        first = asyncio.ensure_future(feed.__anext__())  # subscribe before the snapshot
        try:
            await asyncio.sleep(0)
            self.view.apply_snapshot(await self.store.snapshot(), self._alive())
            # Everything of ours again: the store may have lost it (a restart) or hold an
            # older address.
            self.view.changed |= {entry.node_id.raw for entry in self.core.registry}
            await self._write()
            await self.announce()
            if not self.view.directory_ok:
                # Back after an outage is news for the operator; the first time is not.
                log.log(logging.WARNING if self.outages else logging.INFO,
                        "cluster directory reachable: %d member(s), %d remote node(s)",
                        len(self.view.members), len(self.view.remote))
            self.view.directory_ok = True
            self._connected.set()
            self._synced(members=True)
            follower = asyncio.ensure_future(self._follow(feed, first))
            try:
                await self._keep_writing(follower)
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, StoreUnavailable):
                    await follower
        finally:
            if not first.done():
                first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreUnavailable,
                                     StopAsyncIteration):
                await first
            with contextlib.suppress(StoreUnavailable, RuntimeError):
                await feed.aclose()

    async def _follow(self, feed: AsyncGenerator[bytes, None],
                      first: asyncio.Future[bytes]) -> None:
        self.view.apply_change(await first)
        self._synced()
        async for message in feed:
            self.view.apply_change(message)
            self._synced()

    async def _keep_writing(self, follower: asyncio.Future[None]) -> None:
        next_announce = next_refresh = next_snapshot = self._now()
        next_announce += ANNOUNCE_EVERY
        next_refresh += self.node_ttl / 3
        next_snapshot += SNAPSHOT_EVERY
        while not follower.done():
            await asyncio.sleep(WRITE_EVERY)
            await self._write()
            await self._answer_queries()
            now = self._now()
            if now >= next_announce or self.view.members_wanted:
                self.view.members_wanted = False
                if now >= next_announce:
                    next_announce = now + ANNOUNCE_EVERY
                    await self.announce()
                self.view.apply_snapshot_members(await self.store.members(), self._alive())
                self._synced(members=True)
            if now >= next_refresh:
                next_refresh = now + self.node_ttl / 3
                await self.store.refresh([e.node_id for e in self.core.registry], self.node_ttl)
            if now >= next_snapshot:
                next_snapshot = now + SNAPSHOT_EVERY
                self.view.apply_snapshot(await self.store.snapshot(), self._alive())
                self._synced(members=True)
        follower.result()  # the feed ended: StoreUnavailable

    async def _answer_queries(self) -> None:
        raws = list(self.view.queries)
        if not raws:
            return
        self.view.queries.clear()
        found = await self.store.lookup([NodeId(raw) for raw in raws])
        self.core.directory_answers(dict(zip(raws, found, strict=True)), self._now())
        self._flush()

    async def _write(self) -> None:
        changed, gone = self.view.take_changes()
        if not changed and not gone:
            return
        try:
            records = self.core.cluster_records(changed)
            if records:
                await self.store.publish(records, self.node_ttl)
            if gone:
                await self.store.withdraw(self.core.identity.node_id,
                                          [NodeId(raw) for raw in gone])
        except StoreUnavailable:
            self.view.put_back(changed, gone)
            raise

    async def announce(self) -> None:
        await self.store.announce(MemberRecord(
            self.core.identity.node_id, self.advertise, self.core.nodes_online,
            self.core.draining), MEMBER_TTL)

    def _alive(self) -> set[bytes]:
        return self.core.mesh.live_members() if self.core.mesh is not None else set()

    def _synced(self, members: bool = False) -> None:
        """The view changed: nodes of ours that moved are let go, and after a read of the
        member list (not on every feed message) the mesh follows it."""
        now = self._now()
        if members:
            self.core.follow_members(now)
        self.core.let_go_of_moved(now)
        self._flush()

    async def leave(self) -> None:
        """Shutting down: our member record goes at once (best effort)."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.leave(self.core.identity.node_id)

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()
