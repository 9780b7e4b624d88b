"""`--png DIR`: the bench's figures as pictures (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(result: dict[str, Any], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cases = result["cases"]
    written = []
    title = (f"macula bench ({result['mode']}, {result['date'][:10]}) - "
             f"{result['machine']['cpu_model']}, {result['machine']['cores']} cores")

    # 1. Throughput per path: bulk streams (MB/s), and datagram relays (MB/s delivered).
    thr, rel = cases.get("throughput") or {}, cases.get("relay") or {}
    bars = []
    for label, tree, key in (("macula direct", thr, "macula_direct"), ("raw aioquic", thr, "aioquic"),
                             ("macula relayed\nsession", thr, "macula_relay_session")):
        if tree.get(key):
            bars.append((label, tree[key]["mbytes_per_s"], "C0" if "macula" in label else "C1"))
    qh3 = cases.get("qh3") or {}
    if qh3.get("qh3"):
        bars.append(("raw qh3", qh3["qh3"]["mbytes_per_s"], "C2"))
    for label, side in (("gateway relay\n(datagrams)", "gateway"), ("coturn relay\n(datagrams)", "coturn")):
        if rel.get(side):
            bars.append((label, rel[side]["loads"][-1]["delivered_mbytes_per_s"],
                         "C0" if side == "gateway" else "C1"))
    if bars:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        for i, b in enumerate(bars):
            ax.text(i, b[1], f"{b[1]:.1f}", ha="center", va="bottom", fontsize=9)
        ax.set_ylabel("MB/s delivered (loopback)")
        ax.set_title("Throughput per path (blue: ours, orange: reference)\n" + title, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "throughput.png", plt))

    # 2. Relay delivered vs offered load.
    if rel.get("gateway"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for side, color in (("gateway", "C0"), ("coturn", "C1")):
            if rel.get(side):
                rows = rel[side]["loads"]
                ax.plot([r["offered_pps"] for r in rows], [r["delivered_pps"] for r in rows],
                        "o-", color=color, label=rel[side]["relay"].split(" (")[0])
        ax.set_xlabel("offered datagrams/s")
        ax.set_ylabel("delivered datagrams/s")
        ax.legend()
        ax.set_title(f"Relay: {rel.get('datagram_bytes')}-byte datagrams\n" + title, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "relay_load.png", plt))

    # 3. Upgrade / ICE time distributions: loopback and simulator.
    ice, sim = cases.get("ice") or {}, cases.get("sim_timing") or {}
    series = []
    if ice:
        series.append(("loopback: macula\nconnect->direct", ice["macula"]["connect_to_direct_ms"]["samples"]))
        series.append(("loopback: aioice\ngather+connect", ice["aioice"]["total_ms"]["samples"]))
    if sim:
        for key, label in (("first_byte", "sim: first byte"), ("upgrade", "sim: upgrade"),
                           ("ice", "sim: ICE")):
            if sim.get(key, {}).get("samples"):
                series.append((f"{label}\n(floor {sim[key]['floor_ms']:.0f} ms)", sim[key]["samples"]))
    series = [(label, values) for label, values in series if values]
    if series:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        ax.boxplot([v for _, v in series])
        ax.set_xticks(range(1, len(series) + 1), [label for label, _ in series], fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"Time to a path (sim: {sim.get('latency_ms_per_uplink', '?')} ms per uplink)\n"
                     + title, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "path_times.png", plt))

    # 4. Gateway scaling: memory and idle CPU against registered nodes.
    levels = ((cases.get("capacity") or {}).get("scaling") or {}).get("levels") or []
    if levels:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
        xs = [r["registered"] for r in levels]
        a1.plot(xs, [r["gateway_retained_bytes"] / 1e6 for r in levels], "o-")
        a1.set_xscale("log")
        a1.set_yscale("log")
        a1.set_xlabel("registered idle nodes")
        a1.set_ylabel("gateway memory (MB)")
        a2.plot(xs, [r["idle_gateway_cpu_share"] * 100 for r in levels], "o-", label="idle (keepalives)")
        a2.set_xscale("log")
        a2.set_xlabel("registered idle nodes")
        a2.set_ylabel("gateway CPU, % of one core")
        a2.legend()
        fig.suptitle("Gateway scaling (simulator)\n" + title, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "gateway_scaling.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
