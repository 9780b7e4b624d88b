"""What a soak run is made of: its schedule, the neighbours each member talks to, and how
records are merged and judged. Shared by the simulated soak and the kernel soak."""

from __future__ import annotations

import asyncio
import gc
import sys
import types
from collections import Counter
from typing import Any

CHURN_EVERY = 5.0  # seconds between two nodes leaving
WARMUP_SIM = 60.0  # virtual seconds before the measured minutes (see the module doc)
WARMUP_KERNEL = 30.0  # real seconds: the gateway process alone (control idle timeout 30 s)
REJOIN_AFTER = 1.0
LEAVE_TIMEOUT = 30.0  # a leaving node's conversations must end within this
MAX_RSS_GROWTH = 0.10
LATENCY_MS = 10.0
# Loop turns a virtual minute may take (a 12-node minute needs far fewer):
# a spinning timer is stopped in seconds instead of hanging the run.
ITERATIONS_PER_MINUTE = 2_000_000


def neighbours(slot: int, n: int) -> list[int]:
    """The slots 1 and 3 away on the ring (fewer on small rings)."""
    near = {(slot + d) % n for d in (1, -1, 3, -3) if n >= 2 * abs(d) + 1 or abs(d) == 1}
    near.discard(slot)
    return sorted(near)


def retained_kb(root: object) -> int:
    """The size of everything reachable from `root` (modules, classes, functions and the
    event loop excluded): one component's own memory, where RSS mixes everything."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
            types.MethodType, asyncio.AbstractEventLoop)
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total // 1024


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size of a process in kB (VmRSS), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def merge_records(records: list[dict[str, Any]]) -> dict[str, int]:
    """Every sender's count against every receiver's, per (from, to)."""
    sent: Counter[tuple[str, str]] = Counter()
    got: dict[tuple[str, str], Counter[str]] = {}
    for r in records:
        key = (r["from"], r["to"])
        if "sent" in r:
            sent[key] += r["sent"]
        else:
            got.setdefault(key, Counter()).update(
                {k: r[k] for k in ("delivered", "duplicated", "reordered", "unfinished")})
    flows = set(sent) | set(got)
    delivered = sum(g["delivered"] for g in got.values())
    return {
        "flows": len(flows),
        "sent": sum(sent.values()),
        "messages": delivered,
        "lost": sum(max(0, sent[k] - got.get(k, Counter())["delivered"]) for k in flows),
        "duplicated": sum(g["duplicated"] for g in got.values()),
        "reordered": sum(g["reordered"] for g in got.values()),
        "unfinished": sum(g["unfinished"] for g in got.values()),
    }


def soak_ok(result: dict[str, Any]) -> bool:
    growth = result.get("rss_growth")
    return (not result.get("failures") and result.get("lost") == 0
            and result.get("duplicated") == 0 and result.get("errors") == 0
            and growth is not None and growth <= MAX_RSS_GROWTH)


def format_soak(r: dict[str, Any]) -> str:
    lines = [
        f"soak ({r['backend']}): {r['nodes']} slots, {r['minutes']} min, "
        f"{r['nodes_started']} nodes started ({r['churn']} churned), {r['flows']} flows",
        f"messages {r['messages']} of {r['sent']} sent, lost {r['lost']}, duplicated "
        f"{r['duplicated']}, reordered {r['reordered']}, errors {r['errors']}",
        f"RSS of the {r.get('rss_of', 'gateway')}: {r['rss_kb_warm']} kB after warm-up -> "
        f"{r['rss_kb_end']} kB at the end: growth {r['rss_growth']:+.3f} (limit {MAX_RSS_GROWTH})"
        if r.get("rss_growth") is not None else "RSS not measured",
        f"paths at the end: {r.get('paths', {})}; {r.get('elapsed_s')} s real",
    ]
    for failure in (r.get("failures") or [])[:10]:
        lines.append(f"  failure: {failure}")
    for logged in (r.get("logged") or [])[:5]:
        lines.append(f"  logged: {logged}")
    return "\n".join(lines)
