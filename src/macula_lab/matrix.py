"""The NAT pair matrix: every unordered pair of presets, N trials each, as a grid and JSON.

A row per pair counts trials by final path (direct, turn, relay) and sums what the
receivers counted (lost, duplicated), with medians of first byte, upgrade and ICE times.
The backend (simulator or kernel) only has to run one trial and return its figures.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

Trial = Callable[[str, str, int], dict[str, Any]]


def pairs(presets: Iterable[str]) -> list[tuple[str, str]]:
    """Unordered pairs, same-type pairs included: 6 presets give 21."""
    return list(itertools.combinations_with_replacement(list(presets), 2))


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def run_matrix(
    presets: list[str], trials: int, run_trial: Trial, *, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    started = time.monotonic()
    rows = []
    for a, b in pairs(presets):
        results = [run_trial(a, b, t) for t in range(trials)]
        rows.append(make_row(a, b, results))
        if progress is not None:
            progress(format_row(rows[-1]))
    return {"pairs": rows, "summary": summarise(rows, time.monotonic() - started)}


def make_row(a: str, b: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    paths = Counter(r["path"] for r in results if r.get("connected"))
    connected = sum(1 for r in results if r.get("connected"))
    return {
        "a": a,
        "b": b,
        "trials": len(results),
        "connected": connected,
        "direct": paths.get("direct", 0),
        "turn": paths.get("turn", 0),
        "relay": paths.get("relay", 0),
        # Trials whose final path runs over TCP (TLS) to the gateway or to TURN.
        "tcp": sum(1 for r in results if r.get("connected") and r.get("tcp")),
        # Direct trials whose path runs over IPv6 (the address is "[ip]:port").
        "direct_ipv6": sum(1 for r in results if r.get("connected") and r["path"] == "direct"
                           and (r.get("direct_address") or "").startswith("[")),
        "path": paths.most_common(1)[0][0] if paths else None,
        "first_byte_ms_p50": _p50([r["first_byte_ms"] for r in results if r.get("first_byte_ms") is not None]),
        "upgrade_ms_p50": _p50([r["upgrade_ms"] for r in results if r.get("upgrade_ms") is not None]),
        "ice_ms_p50": _p50([r["ice_ms"] for r in results if r.get("ice_ms") is not None]),
        "direct_ms_p50": _p50([r["direct_ms"] for r in results
                               if r.get("direct_ms") is not None]),
        "lost": sum(r.get("lost", 0) for r in results),
        "duplicated": sum(r.get("duplicated", 0) for r in results),
        "reordered": sum(r.get("reordered", 0) for r in results),
        "errors": [e for r in results for e in r.get("errors", [])][:5],
    }


def summarise(rows: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    trials = sum(r["trials"] for r in rows)
    connected = sum(r["connected"] for r in rows)
    direct = sum(r["direct"] for r in rows)
    ups = [r["upgrade_ms_p50"] for r in rows if r["upgrade_ms_p50"] is not None]
    return {
        "pairs": len(rows),
        "trials": trials,
        "connected": connected,
        "direct": direct,
        "direct_ipv6": sum(r.get("direct_ipv6", 0) for r in rows),
        "turn": sum(r["turn"] for r in rows),
        "relay": sum(r["relay"] for r in rows),
        "tcp": sum(r.get("tcp", 0) for r in rows),
        "connectivity": round(connected / trials, 4) if trials else None,
        "direct_share": round(direct / trials, 4) if trials else None,
        "lost": sum(r["lost"] for r in rows),
        "duplicated": sum(r["duplicated"] for r in rows),
        "reordered": sum(r["reordered"] for r in rows),
        "upgrade_ms_p50": _p50(ups),
        "elapsed_s": round(elapsed, 2),
        "machine": f"{platform.system()} {platform.machine()} python {platform.python_version()}",
    }


_LETTER = {"direct": "D", "turn": "T", "relay": "R", None: "-"}


def format_row(row: dict[str, Any]) -> str:
    up = f" upgrade {row['upgrade_ms_p50']} ms" if row["upgrade_ms_p50"] is not None else ""
    return (f"{row['a']:>15} x {row['b']:<15} {row['connected']}/{row['trials']} connected, "
            f"direct {row['direct']} turn {row['turn']} relay {row['relay']}"
            f"{' (tcp ' + str(row['tcp']) + ')' if row.get('tcp') else ''}, first byte {row['first_byte_ms_p50']} ms{up}, lost {row['lost']} dup {row['duplicated']}")


def format_grid(result: dict[str, Any], presets: list[str]) -> str:
    """Upper-triangle grid: cell = final path letter and connected/trials."""
    cells = {(r["a"], r["b"]): r for r in result["pairs"]}
    width = max(len(p) for p in presets) + 1
    lines = [" " * width + "".join(f"{p[:11]:>12}" for p in presets)]
    for i, a in enumerate(presets):
        line = f"{a:<{width}}"
        for j, b in enumerate(presets):
            row = cells.get((a, b)) or cells.get((b, a))
            if row is None or j < i:
                line += f"{'':>12}"
                continue
            line += f"{_LETTER[row['path']] + ' ' + str(row['connected']) + '/' + str(row['trials']):>12}"
        lines.append(line)
    s = result["summary"]
    lines.append(f"D=direct T=turn R=relay.  {s['connected']}/{s['trials']} connected, "
                 f"{s['direct']} direct, lost {s['lost']}, duplicated {s['duplicated']}, "
                 f"{s['elapsed_s']} s")
    return "\n".join(lines)


def draw_png(result: dict[str, Any], presets: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(presets)
    shade = {"direct": 1.0, "turn": 0.6, "relay": 0.3, None: 0.0}
    grid = [[float("nan")] * n for _ in range(n)]
    fig, ax = plt.subplots(figsize=(1.3 * n + 2, 1.1 * n + 1.5))
    for row in result["pairs"]:
        i, j = presets.index(row["a"]), presets.index(row["b"])
        for x, y in ((i, j), (j, i)):
            grid[x][y] = shade[row["path"]]
            label = f"{_LETTER[row['path']]} {row['connected']}/{row['trials']}"
            if row["upgrade_ms_p50"] is not None:
                label += f"\n{row['upgrade_ms_p50']:.0f} ms"
            ax.text(y, x, label, ha="center", va="center", fontsize=8)
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_xticks(range(n), presets, rotation=30, ha="right")
    ax.set_yticks(range(n), presets)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
