"""Log lines that input cannot blow up: echoed input is clipped, and a warning repeated
by a flood is written once per interval with the count of what was held back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

CLIP = 200  # characters of echoed input in one log line


def clip(value: object, limit: int = CLIP) -> str:
    """`value` as text, at most `limit` characters (and how many more there were)."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more)"


class Throttle:
    """At most one line per `key` every `interval` seconds; the next line that gets
    through says how many were held back. The clock is injected (tests pass a fake)."""

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, logger: logging.Logger, level: int, key: str, msg: str, *args: object,
            exc_info: bool = False) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) > 1024:  # keys come from input too: bounded
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += f" (and {held} more like it in the last {self._interval:g} s)"
        logger.log(level, msg, *args, exc_info=exc_info)
        return True
