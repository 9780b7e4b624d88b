"""One contract for the cluster directory's stores: the in-process one the simulator uses
and real Redis (a redis-server of our own on a unix socket) behave the same."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.gateway.directory import (
    MemberRecord,
    MemoryStore,
    NodeRecord,
    RecordError,
    StoreUnavailable,
)
from macula.gateway.redis_store import RedisStore
from macula.identity import Identity, NodeId
from macula_lab.redis_server import RedisServer, redis_available

GW_A, GW_B = Identity.generate().node_id, Identity.generate().node_id


def record(home: NodeId, port: int = 4000, node: NodeId | None = None) -> NodeRecord:
    return NodeRecord(node or Identity.generate().node_id, home, ("198.51.100.7", port),
                      nat_type="port_restricted", port_allocation="preserving",
                      hard_nat=True, local_addresses=("192.168.1.2:4000",), rtt=0.021)


@pytest.fixture(scope="module")
def redis_server():
    ok, why = redis_available()
    if not ok:
        pytest.skip(why)
    with RedisServer(unix_socket=True) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    server = request.getfixturevalue("redis_server")
    redis = RedisStore(server.url, prefix=f"t{id(request)}")
    yield redis
    await redis.close()


async def parsed(store) -> tuple[dict[bytes, NodeRecord], dict[bytes, MemberRecord]]:
    snap = await store.snapshot()
    nodes = {r.node_id.raw: r for r in map(NodeRecord.decode, snap.nodes)}
    members = {m.gateway_id.raw: m for m in map(MemberRecord.decode, snap.members)}
    return nodes, members


async def test_published_records_come_back_whole_in_a_snapshot(store):
    records = [record(GW_A, 4000 + k) for k in range(1200)]  # more than one pipeline batch
    await store.publish(records, ttl=30)
    await store.announce(MemberRecord(GW_A, ("203.0.113.10", 9443), nodes=1200), ttl=30)
    nodes, members = await parsed(store)
    assert len(nodes) == 1200 and nodes[records[7].node_id.raw] == records[7]
    assert members[GW_A.raw].nodes == 1200 and members[GW_A.raw].mesh == ("203.0.113.10", 9443)


async def test_a_withdrawal_only_removes_what_that_gateway_still_holds(store):
    moved, gone = record(GW_A), record(GW_A)
    await store.publish([moved, gone], ttl=30)
    await store.publish([record(GW_B, node=moved.node_id)], ttl=30)  # it re-homed on B
    await store.withdraw(GW_A, [moved.node_id, gone.node_id])  # A's late cleanup
    nodes, _ = await parsed(store)
    assert set(nodes) == {moved.node_id.raw} and nodes[moved.node_id.raw].home == GW_B


async def test_records_expire_unless_refreshed(store):
    kept, dropped = record(GW_A), record(GW_A)
    await store.publish([kept, dropped], ttl=0.3)
    await store.announce(MemberRecord(GW_B, ("203.0.113.20", 9443)), ttl=0.3)
    for _ in range(3):
        await asyncio.sleep(0.15)
        await store.refresh([kept.node_id], ttl=0.3)
    nodes, members = await parsed(store)
    assert set(nodes) == {kept.node_id.raw} and not members


async def test_the_change_feed_carries_additions_and_withdrawals(store):
    feed = store.changes()
    first = asyncio.ensure_future(feed.__anext__())
    await asyncio.sleep(0.1)  # subscribed
    rec = record(GW_A)
    await store.publish([rec], ttl=30)
    assert NodeRecord.decode((await asyncio.wait_for(first, 3))[1:]) == rec
    await store.withdraw(GW_A, [rec.node_id])
    removed = await asyncio.wait_for(feed.__anext__(), 3)
    assert removed == b"-" + f"{GW_A.text} {rec.node_id.text}".encode()
    await feed.aclose()


async def test_a_member_that_leaves_is_gone(store):
    await store.announce(MemberRecord(GW_A, ("203.0.113.10", 9443)), ttl=30)
    await store.leave(GW_A)
    assert not (await parsed(store))[1]


async def test_a_record_another_version_wrote_is_returned_for_the_reader_to_refuse(store):
    await store.put_raw_node(b"\x01" * 16, json.dumps({"v": 99, "node": "x"}).encode())
    snap = await store.snapshot()
    assert len(snap.nodes) == 1
    with pytest.raises(RecordError, match="version"):
        NodeRecord.decode(snap.nodes[0])


async def test_an_unreachable_store_fails_every_call_with_store_unavailable():
    memory = MemoryStore()
    memory.set_available(False)
    redis = RedisStore("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        for store in (memory, redis):
            with pytest.raises(StoreUnavailable):
                await store.publish([record(GW_A)], ttl=30)
            with pytest.raises(StoreUnavailable):
                await store.snapshot()
            with pytest.raises(StoreUnavailable):
                await store.changes().__anext__()
    finally:
        await redis.close()


async def test_a_redis_that_goes_away_ends_the_change_feed(redis_server):
    with RedisServer(unix_socket=True) as server:
        store = RedisStore(server.url)
        feed = store.changes()
        pending = asyncio.ensure_future(feed.__anext__())
        await asyncio.sleep(0.1)
        server.stop()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(pending, 5)
        await store.close()


@given(st.binary(max_size=300))
def test_garbage_records_raise_record_error_only(data):
    for kind in (NodeRecord, MemberRecord):
        try:
            kind.decode(data)
        except RecordError:
            pass


@given(st.dictionaries(st.sampled_from(["v", "node", "home", "address", "nat_type", "rtt_ms",
                                        "port_allocation", "hard_nat", "nat_traversal",
                                        "local", "gateway", "mesh", "nodes", "draining"]),
                       st.one_of(st.integers(), st.text(max_size=60), st.booleans(),
                                 st.none(), st.floats(), st.lists(st.text(max_size=5)))))
def test_records_with_wrong_fields_raise_record_error_only(fields):
    data = json.dumps({**fields, "v": fields.get("v", 1)}).encode()
    for kind in (NodeRecord, MemberRecord):
        try:
            kind.decode(data)
        except RecordError:
            pass


def test_bad_store_urls_name_the_url():
    with pytest.raises(ValueError, match="redis://"):
        RedisStore("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="service"):
        RedisStore("redis+sentinel://127.0.0.1:26379")


def test_a_sentinel_url_finds_the_master_and_the_store_works_through_it(tmp_path):
    """redis+sentinel://: a real Sentinel (redis-server --sentinel) watching our master."""
    import socket
    import subprocess
    import time

    from macula_lab.redis_server import REDIS_BINARY

    ok, why = redis_available()
    if not ok:
        pytest.skip(why)

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    async def exercise(url: str) -> None:
        store = RedisStore(url)
        try:
            rec = record(GW_A)
            await store.publish([rec], ttl=30)
            nodes, _ = await parsed(store)
            assert nodes[rec.node_id.raw] == rec
        finally:
            await store.close()

    with RedisServer() as master:
        port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor macula 127.0.0.1 {master.port} 1\n")
        sentinel = subprocess.Popen([REDIS_BINARY, str(conf), "--sentinel"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            asyncio.run(exercise(f"redis+sentinel://127.0.0.1:{port}/macula"))
        finally:
            sentinel.kill()
            sentinel.wait(timeout=10)
