"""Case: bulk throughput of a macula session (direct, and over the relay) vs raw aioquic.

Each side of each transfer is its own process, so sender and receiver compete for the
machine's cores as real peers do. The gateway lives in the bench process: on the direct
path it only sees keepalives; for the relayed session it is the relay, as deployed.
Transfers alternate (ours, theirs, ours, ...) so drift on the machine hits both alike.
"""

from __future__ import annotations

import statistics
from typing import Any

from macula_lab.bench.gateways import start_gateway
from macula_lab.bench.procs import Worker, stop_all

_MB = 1e6


def _rate(sender: dict[str, Any], receiver: dict[str, Any]) -> dict[str, Any]:
    elapsed = receiver["eof_at"] - sender["start_at"]
    return {"bytes": receiver["bytes"], "elapsed_s": round(elapsed, 4),
            "mbytes_per_s": round(receiver["bytes"] / elapsed / _MB, 3) if elapsed > 0 else None}


async def macula_transfer(gateway: tuple[str, int], *, total: int, chunk: int, strategy: str,
                          profile: tuple[str, str] | None = None,
                          sender_tls: dict[str, Any] | None = None) -> dict[str, Any]:
    """One bulk transfer between two node processes; `strategy` "opportunistic" waits for
    the direct path first, "always_relay" keeps it on the gateway relay. With `sender_tls`
    ({"gateway_id", "gateway_tls"}) the sender reaches the gateway only over its TLS link."""
    workers: list[Worker] = []
    try:
        recv = await Worker.start({"role": "macula_bulk_recv", "gateway": list(gateway),
                                   "strategy": strategy,
                                   "profile": profile[1] if profile else None, "deadline": 120})
        workers.append(recv)
        ready = await recv.read(30)
        send = await Worker.start({
            "role": "macula_bulk_send", "gateway": list(gateway), "peer": ready["node_id"],
            **(sender_tls or {}),
            "strategy": strategy, "bytes": total, "chunk": chunk,
            "wait_direct": 5.0 if strategy != "always_relay" else 0,
            "profile": profile[0] if profile else None, "deadline": 120})
        workers.append(send)
        sent = (await send.finish(120))["result"]
        got = (await recv.finish(30))["result"]
        if got["bytes"] != total:
            raise RuntimeError(f"receiver counted {got['bytes']} of {total} bytes")
        return {**_rate(sent, got), "path": sent["path"], "path_before": sent["path_before"],
                "waited_for_direct_ms": sent["waited_for_direct_ms"],
                "bytes_by_path": sent["bytes_by_path"]}
    finally:
        await stop_all(workers)


async def quic_transfer(*, total: int, chunk: int, engine: str = "aioquic",
                        python: str | None = None,
                        profile: tuple[str, str] | None = None) -> dict[str, Any]:
    """One bulk transfer between two raw QUIC processes (aioquic, or qh3 for evaluation)."""
    workers: list[Worker] = []
    try:
        recv = await Worker.start({"role": "quic_bulk_recv", "engine": engine,
                                   "profile": profile[1] if profile else None, "deadline": 120},
                                  python=python)
        workers.append(recv)
        ready = await recv.read(30)
        send = await Worker.start({"role": "quic_bulk_send", "engine": engine,
                                   "port": ready["port"], "bytes": total, "chunk": chunk,
                                   "profile": profile[0] if profile else None, "deadline": 120},
                                  python=python)
        workers.append(send)
        sent = (await send.finish(120))["result"]
        recv.close_stdin()  # the receiver reports and leaves
        got = (await recv.finish(15))["result"]
        if got["bytes"] != total:
            raise RuntimeError(f"{engine} receiver did not count all {total} bytes: {got}")
        return _rate(sent, got)
    finally:
        await stop_all(workers)


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    # Best of N on each side: the least disturbed run of each stack is compared.
    rates = [r["mbytes_per_s"] for r in runs]
    best = max(runs, key=lambda r: r["mbytes_per_s"])
    return {"mbytes_per_s": best["mbytes_per_s"], "median_mbytes_per_s": round(statistics.median(rates), 3),
            "runs_mbytes_per_s": rates, "bytes": best["bytes"]}


async def run(*, total: int, chunk: int, repeats: int) -> dict[str, Any]:
    direct, relayed, over_tls, raw = [], [], [], []
    gw = await start_gateway(tls_listen=("127.0.0.1", 0))
    assert gw.tls_address is not None
    tls = {"gateway_id": gw.node_id.text, "gateway_tls": list(gw.tls_address)}
    try:
        for _ in range(repeats):
            direct.append(await macula_transfer(gw.address, total=total, chunk=chunk,
                                                strategy="opportunistic"))
            raw.append(await quic_transfer(total=total, chunk=chunk))
        relay_total = max(chunk, total // 2)  # the relayed session is slower: keep it short
        relayed.append(await macula_transfer(gw.address, total=relay_total, chunk=chunk,
                                             strategy="always_relay"))
        # The same relayed session from a node whose UDP is blocked: its half of the
        # relay runs over the gateway's TLS (WebSocket) link.
        over_tls.append(await macula_transfer(gw.address, total=relay_total, chunk=chunk,
                                              strategy="always_relay", sender_tls=tls))
    finally:
        await gw.close()
    ours, theirs = _best(direct), _best(raw)
    return {
        "payload_bytes": total, "chunk_bytes": chunk, "repeats": repeats,
        "macula_direct": {**ours, "paths": sorted({r["path"] for r in direct}),
                          "waited_for_direct_ms": [r["waited_for_direct_ms"] for r in direct]},
        "aioquic": theirs,
        "macula_relay_session": {**_best(relayed), "paths": sorted({r["path"] for r in relayed})},
        "macula_relay_tls_session": {**_best(over_tls),
                                     "paths": sorted({r["path"] for r in over_tls}),
                                     "transport": "tls (sender's half of the relay)"},
    }


async def profiled(directory: str, *, total: int, chunk: int) -> dict[str, str]:
    """One profiled transfer each of macula direct and raw aioquic; returns pstats paths."""
    paths = {name: f"{directory}/{name}.prof" for name in
             ("direct_send", "direct_recv", "aioquic_send", "aioquic_recv")}
    gw = await start_gateway()
    try:
        await macula_transfer(gw.address, total=total, chunk=chunk, strategy="opportunistic",
                              profile=(paths["direct_send"], paths["direct_recv"]))
    finally:
        await gw.close()
    await quic_transfer(total=total, chunk=chunk,
                        profile=(paths["aioquic_send"], paths["aioquic_recv"]))
    return paths


async def engines(python: str, *, total: int, chunk: int, repeats: int) -> dict[str, Any]:
    """qh3 (in the interpreter `python`) vs aioquic, same transfer, alternating."""
    qh3, aio = [], []
    for _ in range(repeats):
        qh3.append(await quic_transfer(total=total, chunk=chunk, engine="qh3", python=python))
        aio.append(await quic_transfer(total=total, chunk=chunk))
    a, b = _best(qh3), _best(aio)
    return {"qh3": a, "aioquic": b, "qh3_vs_aioquic": round(a["mbytes_per_s"] / b["mbytes_per_s"], 4)}
