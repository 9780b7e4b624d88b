"""The cluster directory on Redis, through redis-py's asyncio client.

Layout (prefix "macula"):
    macula:node:<node id>  hash {home: <gateway id>, rec: <NodeRecord JSON>}, expiring
    macula:gw:<gateway id> string <MemberRecord JSON>, expiring
    macula:changes         the change feed (PUBLISH): b"+" record, or b"-HOME NODE"

Writes are pipelined in batches; a withdrawal is a compare-and-delete in one Lua script,
so a gateway never removes a node that has since registered elsewhere. Calls fail fast
(short timeouts, no client-side retries) with StoreUnavailable: the cluster sync retries
on its own schedule and the gateway keeps serving from its cache meanwhile.

`redis://host:port/db` (or `rediss://`, `unix:///path`) connects directly;
`redis+sentinel://host:port[,host:port...]/service[/db]` asks the Sentinels for the
service's master and follows it when they fail over.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import parse_host_port
from ..errors import InvalidValue
from ..identity import NodeId
from .directory import ADDED, REMOVED, MemberRecord, NodeRecord, Snapshot, StoreUnavailable

PREFIX = "macula"
BATCH = 500  # commands per pipeline round trip
TIMEOUT = 2.0  # seconds for any one call
_WITHDRAW = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'home') == ARGV[1] then
    redis.call('DEL', key)
    redis.call('PUBLISH', ARGV[2], ARGV[i + 2])
    n = n + 1
  end
end
return n
"""


def _connect(url: str) -> Redis:
    """A client for `url` (InvalidValue naming the URL if it cannot be one)."""
    options: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT,
                               "retry": Retry(NoBackoff(), 0)}
    if url.startswith("redis+sentinel://"):
        parts = urlsplit(url)
        path = [p for p in parts.path.split("/") if p]
        if not parts.netloc or not path:
            raise InvalidValue(f"{url}: expected redis+sentinel://host:port[,host:port]/"
                               "service[/db]")
        try:
            sentinels = [parse_host_port(h, default_port=26379)
                         for h in parts.netloc.split("@")[-1].split(",")]
            db = int(path[1]) if len(path) > 1 else 0
        except ValueError as exc:
            raise InvalidValue(f"{url}: {exc}") from None
        sentinel = Sentinel(sentinels,  # type: ignore[no-untyped-call]
                            sentinel_kwargs={"socket_timeout": TIMEOUT}, **options)
        return cast(Redis, sentinel.master_for(path[0], db=db))
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidValue(f"{url}: expected redis://, rediss://, unix:// or "
                           "redis+sentinel://")
    try:
        return cast(Redis, Redis.from_url(url, **options))
    except ValueError as exc:
        raise InvalidValue(f"{url}: {exc}") from None


class RedisStore:
    def __init__(self, url: str, prefix: str = PREFIX) -> None:
        self.url = url
        self._redis = _connect(url)
        self._node_key = f"{prefix}:node:"
        self._member_key = f"{prefix}:gw:"
        self._channel = f"{prefix}:changes"
        self._withdraw = self._redis.register_script(_WITHDRAW)

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            return await coro
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"Redis at {self.url}: {what} failed: "
                                   f"{type(exc).__name__}: {exc}") from None

    async def publish(self, records: Sequence[NodeRecord], ttl: float) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        for start in range(0, len(records), BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for record in records[start:start + BATCH]:
                data = record.encode()
                key = self._node_key + record.node_id.text
                pipe.hset(key, mapping={"home": record.home.text, "rec": data})
                pipe.pexpire(key, ttl_ms)
                pipe.publish(self._channel, ADDED + data)
            await self._call("publish", pipe.execute())

    async def refresh(self, node_ids: Sequence[NodeId], ttl: float) -> None:
        ttl_ms = max(1, int(ttl * 1000))
        for start in range(0, len(node_ids), BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for node_id in node_ids[start:start + BATCH]:
                pipe.pexpire(self._node_key + node_id.text, ttl_ms)
            await self._call("refresh", pipe.execute())

    async def withdraw(self, home: NodeId, node_ids: Sequence[NodeId]) -> None:
        for start in range(0, len(node_ids), BATCH):
            chunk = node_ids[start:start + BATCH]
            await self._call("withdraw", self._withdraw(
                keys=[self._node_key + n.text for n in chunk],
                args=[home.text, self._channel,
                      *[REMOVED + f"{home.text} {n.text}".encode() for n in chunk]]))

    async def announce(self, member: MemberRecord, ttl: float) -> None:
        await self._call("announce", self._redis.set(
            self._member_key + member.gateway_id.text, member.encode(),
            px=max(1, int(ttl * 1000))))

    async def leave(self, gateway_id: NodeId) -> None:
        await self._call("leave", self._redis.delete(self._member_key + gateway_id.text))

    async def _scan(self, pattern: str) -> list[bytes]:
        keys: list[bytes] = []
        cursor = 0
        while True:  # SCAN ends when the cursor comes back to 0
            cursor, batch = await self._call("scan", self._redis.scan(
                cursor, match=pattern, count=1000))
            keys.extend(batch)
            if cursor == 0:
                return keys

    async def snapshot(self) -> Snapshot:
        snap = Snapshot()
        node_keys = await self._scan(self._node_key + "*")
        for start in range(0, len(node_keys), BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for key in node_keys[start:start + BATCH]:
                pipe.hget(key.decode(), "rec")
            snap.nodes.extend(v for v in await self._call("snapshot", pipe.execute())
                              if isinstance(v, bytes))
        snap.members = await self.members()
        return snap

    async def lookup(self, node_ids: Sequence[NodeId]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for start in range(0, len(node_ids), BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for node_id in node_ids[start:start + BATCH]:
                pipe.hget(self._node_key + node_id.text, "rec")
            found.extend(v if isinstance(v, bytes) else None
                         for v in await self._call("lookup", pipe.execute()))
        return found

    async def members(self) -> list[bytes]:
        member_keys = await self._scan(self._member_key + "*")
        if not member_keys:
            return []
        values = await self._call("members", self._redis.mget(member_keys))
        return [v for v in values if isinstance(v, bytes)]

    async def changes(self) -> AsyncGenerator[bytes, None]:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call("subscribe", pubsub.subscribe(self._channel))
            while True:  # ends with StoreUnavailable when the connection goes
                message = await self._call("listen", pubsub.get_message(timeout=1.0))
                if message is not None and isinstance(message.get("data"), bytes):
                    yield message["data"]
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError):
                pass

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError):
            pass

    async def put_raw_node(self, key: bytes, data: bytes, ttl: float = 60.0) -> None:
        """Tests: a record another version (or garbage) wrote."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(self._node_key + key.hex(), mapping={"home": "x", "rec": data})
        pipe.pexpire(self._node_key + key.hex(), int(ttl * 1000))
        await self._call("put", pipe.execute())
