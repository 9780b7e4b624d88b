"""cProfile around a measured section, and a short table of where the time went.

Workers profile only their measured window (not start-up) and dump pstats files; the parent
turns each into rows (own time, cumulative time, calls) that the report and
docs/PERFORMANCE.md quote. Profiling slows the profiled process, so a profiled run is
separate from the timed one.
"""

from __future__ import annotations

import contextlib
import cProfile
import pstats
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Profiler:
    """cProfile that does nothing without a path; start/stop for windows that do not nest
    as a `with` block (a receiver profiles from its first byte to its last)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._profile = cProfile.Profile() if path else None
        self._running = False

    def start(self) -> None:
        if self._profile is not None and not self._running:
            self._running = True
            self._profile.enable()

    def stop(self) -> None:
        if self._profile is not None and self._running:
            self._profile.disable()
            self._running = False
            self._profile.dump_stats(self.path)


@contextlib.contextmanager
def maybe_profile(path: str | None) -> Iterator[None]:
    profiler = Profiler(path)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()


def _name(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin, e.g. <method 'sendto' of '_socket.socket' objects>
    parts = Path(filename).parts
    # Keep the package-relative path: "macula/gateway/core.py:95 _relay".
    for anchor in ("macula", "aioquic", "aioice", "qh3", "asyncio"):
        if anchor in parts:
            parts = parts[parts.index(anchor):]
            break
    else:
        parts = parts[-1:]
    return f"{'/'.join(parts)}:{line} {name}"


def summarise(path: str, top: int = 15, *, sort: str = "tottime") -> dict[str, Any]:
    """The top functions by own time (or cumulative), with their share of the total."""
    stats = pstats.Stats(path)
    total = stats.total_tt or 1e-9
    rows = []
    for func, (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": _name(func), "calls": nc, "tottime_s": round(tt, 4),
                     "cumtime_s": round(ct, 4), "tottime_share": round(tt / total, 4),
                     "cumtime_share": round(ct / total, 4)})
    key = "tottime_s" if sort == "tottime" else "cumtime_s"
    rows.sort(key=lambda r: r[key], reverse=True)
    return {"total_s": round(total, 4), "top": rows[:top]}


def cumulative_of(path: str, needles: list[str]) -> dict[str, dict[str, Any]]:
    """Cumulative time and calls of the named functions ("file.py:name" substrings)."""
    stats = pstats.Stats(path)
    total = stats.total_tt or 1e-9
    out: dict[str, dict[str, Any]] = {}
    for func, (_cc, nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = _name(func)
        for needle in needles:
            file_part, _, func_part = needle.partition(":")
            if file_part in name and name.endswith(" " + func_part):
                prev = out.get(needle)
                if prev is None or ct > prev["cumtime_s"]:
                    out[needle] = {"function": name, "calls": nc, "cumtime_s": round(ct, 4),
                                   "share": round(ct / total, 4),
                                   "per_call_us": round(ct / nc * 1e6, 2) if nc else None}
    return out
