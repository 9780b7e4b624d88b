"""Case: datagram relaying, our gateway vs coturn, same datagrams and offered load.

Four processes per relay: the relay itself, a sender, a receiver, and this one conducting.
Each offered load (datagrams/s; 0 = as fast as the sender can) is sent once through each
relay; the receiver counts what came out. delivered/s = received / (last arrival - first
send). Paced loads are the comparison (both senders offer the same); the unpaced row shows
where each relay gives up, but the two senders do not offer the same there. The gateway's CPU comes from its own process clock, coturn's from /proc (all its
threads), so per-core figures compare the relays' work, not the machine's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from macula_lab.bench.coturn import PASSWORD, USER, Coturn
from macula_lab.bench.procs import Worker, cpu_seconds, stop_all

_SETTLE = 0.3  # seconds for the last datagrams to drain out of the relay after a load


def _delivered(sent: dict[str, Any], got: dict[str, Any], size: int) -> dict[str, Any]:
    received = got["received"]
    end = max(got["last_at"] or sent["end_at"], sent["end_at"])
    elapsed = end - sent["start_at"]
    offered_elapsed = sent["end_at"] - sent["start_at"]
    return {
        "sent": sent["sent"], "received": received,
        "delivered_share": round(received / sent["sent"], 4) if sent["sent"] else None,
        "offered_pps": round(sent["sent"] / offered_elapsed, 1) if offered_elapsed > 0 else None,
        "delivered_pps": round(received / elapsed, 1) if elapsed > 0 else 0.0,
        "delivered_mbytes_per_s": round(received * size / elapsed / 1e6, 3) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 4),
    }


async def _drive(send: Worker, recv: Worker, *, count: int, rate: float,
                 limit: float) -> tuple[dict[str, Any], dict[str, Any]]:
    send.send({"cmd": "go", "count": count, "rate": rate, "limit": limit})
    sent = (await send.read(limit + 30))["sent"]
    await asyncio.sleep(_SETTLE)
    recv.send({"cmd": "report"})
    got = (await recv.read(15))["report"]
    return sent, got


async def _receiver(workers: list[Worker], gateway: Any) -> tuple[Worker, str]:
    """A relay_recv worker registered at `gateway`, and its node id."""
    recv = await Worker.start({"role": "relay_recv", "gateway": gateway, "deadline": 300})
    workers.append(recv)
    return recv, (await recv.read(30))["node_id"]


async def _sender(workers: list[Worker], gateway: Any, peer: str, size: int) -> Worker:
    """A relay_send worker registered at `gateway`, ready to send to `peer`."""
    send = await Worker.start({"role": "relay_send", "gateway": gateway, "peer": peer,
                               "size": size, "deadline": 300})
    workers.append(send)
    await send.read(30)
    return send


async def gateway_relay(loads: list[float], *, count: int, size: int, limit: float,
                        profile: str | None = None) -> dict[str, Any]:
    workers: list[Worker] = []
    try:
        gw = await Worker.start({"role": "gateway", "profile": profile, "deadline": 300})
        workers.append(gw)
        address = (await gw.read(30))["address"]
        recv, node_id = await _receiver(workers, address)
        send = await _sender(workers, address, node_id, size)
        rows = []
        for rate in loads:
            before = await _mark(gw)
            if profile and rate == 0:
                gw.send({"cmd": "profile_start"})
            sent, got = await _drive(send, recv, count=count, rate=rate, limit=limit)
            if profile and rate == 0:
                gw.send({"cmd": "profile_stop"})
                await gw.read(30)
            after = await _mark(gw)
            row = _delivered(sent, got, size)
            cpu = after["cpu_s"] - before["cpu_s"]
            relayed = after["relayed_packets"] - before["relayed_packets"]
            row.update({"offered": rate or "max", "relay_cpu_s": round(cpu, 4),
                        "relayed_packets": relayed,
                        "relay_pps_per_core": round(relayed / cpu, 1) if cpu > 0 else None,
                        "dropped": after["dropped"]})
            rows.append(row)
        return {"relay": "macula gateway", "loads": rows}
    finally:
        await stop_all(workers)


async def mesh_relay(loads: list[float], *, count: int, size: int, limit: float) -> dict[str, Any]:
    """The same loads through two cluster members: the sender's home forwards each frame
    one hop over the mesh to the receiver's home (a real redis-server is the directory)."""
    from macula_lab.redis_server import RedisServer, redis_available

    ok, why = redis_available()
    if not ok:
        raise RuntimeError(why)
    workers: list[Worker] = []
    with RedisServer() as redis:
        try:
            homes = []
            for _ in range(2):
                gw = await Worker.start({"role": "gateway", "redis": redis.url, "deadline": 300})
                workers.append(gw)
                homes.append((gw, (await gw.read(30))["address"]))
            (gw_send, send_at), (gw_recv, recv_at) = homes
            recv, node_id = await _receiver(workers, recv_at)
            for _ in range(100):  # the mesh is up and the sender's home knows the receiver
                mark = await _mark(gw_send)
                if mark["mesh_links"] and mark["remote_nodes"]:
                    break
                await asyncio.sleep(0.1)
            send = await _sender(workers, send_at, node_id, size)
            rows = []
            for rate in loads:
                before = [await _mark(gw) for gw in (gw_send, gw_recv)]
                sent, got = await _drive(send, recv, count=count, rate=rate, limit=limit)
                after = [await _mark(gw) for gw in (gw_send, gw_recv)]
                row = _delivered(sent, got, size)
                cpu = sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True))
                row.update({"offered": rate or "max", "relay_cpu_s": round(cpu, 4),
                            "both_gateways_cpu_per_packet_us": round(
                                cpu / got["received"] * 1e6, 2) if got["received"] else None,
                            "dropped": [a["dropped"] for a in after]})
                rows.append(row)
            return {"relay": "two macula gateways, one mesh hop", "loads": rows}
        finally:
            await stop_all(workers)


async def _mark(gateway: Worker) -> dict[str, Any]:
    gateway.send({"cmd": "mark"})
    mark: dict[str, Any] = (await gateway.read(10))["mark"]
    return mark


async def coturn_relay(loads: list[float], *, count: int, size: int, limit: float) -> dict[str, Any]:
    coturn = await Coturn.start()
    workers: list[Worker] = []
    try:
        base = {"server": list(coturn.address), "username": USER, "password": PASSWORD,
                "size": size, "deadline": 300}
        recv = await Worker.start({"role": "turn_recv", **base})
        workers.append(recv)
        recv_relayed = (await recv.read(30))["relayed"]
        send = await Worker.start({"role": "turn_send", **base})
        workers.append(send)
        send_relayed = (await send.read(30))["relayed"]
        recv.send({"peer": send_relayed})  # the receiver permits the sender's relay address
        await recv.read(30)
        send.send({"peer": recv_relayed})
        await send.read(30)
        rows = []
        for rate in loads:
            before = cpu_seconds(coturn.pid)
            sent, got = await _drive(send, recv, count=count, rate=rate, limit=limit)
            after = cpu_seconds(coturn.pid)
            row = _delivered(sent, got, size)
            cpu = (after - before) if before is not None and after is not None else None
            row.update({"offered": rate or "max", "relay_cpu_s": round(cpu, 4) if cpu else cpu,
                        # coturn keeps no counter we can read; what came out is what it relayed
                        "relayed_packets": got["received"],
                        "relay_pps_per_core": round(got["received"] / cpu, 1) if cpu else None})
            rows.append(row)
        return {"relay": f"coturn (pid {coturn.pid}, unprivileged, 127.0.0.1)", "loads": rows}
    finally:
        await stop_all(workers)
        await coturn.stop()


async def run(loads: list[float], *, count: int, size: int, limit: float,
              profile: str | None = None) -> dict[str, Any]:
    ours = await gateway_relay(loads, count=count, size=size, limit=limit, profile=profile)
    try:
        theirs: dict[str, Any] | None = await coturn_relay(loads, count=count, size=size,
                                                           limit=limit)
        error = None
    except Exception as exc:  # no coturn here: the ratio is missing, the rest still counts
        theirs, error = None, f"{type(exc).__name__}: {exc}"
    try:
        mesh: dict[str, Any] | None = await mesh_relay(loads, count=count, size=size,
                                                       limit=limit)
        mesh_error = None
    except Exception as exc:  # no redis-server here: the single-gateway figures stand
        mesh, mesh_error = None, f"{type(exc).__name__}: {exc}"
    return {"datagram_bytes": size, "datagrams_per_load": count,
            "gateway": ours, "coturn": theirs, "coturn_error": error,
            "mesh": mesh, "mesh_error": mesh_error}
