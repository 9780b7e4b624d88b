"""Retransmission schedules for the two UDP protocols, as plain state (no clock of its own).

NAT-PMP (RFC 6886 3.1): first retry after 250 ms, the interval doubling, 9 sends in all.
PCP (RFC 6887 8.1.1): RT = (1 + RAND) * IRT, then (1 + RAND) * 2 * RTprev, capped at
(1 + RAND) * MRT, RAND uniform in [-0.1, +0.1]; IRT 3 s and MRT 1024 s by default, no
limit on the count (MRC 0) - the owner decides when to stop waiting.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NATPMP_FIRST = 0.25
NATPMP_MAX_INTERVAL = 64.0
NATPMP_MAX_SENDS = 9
PCP_IRT = 3.0
PCP_MRT = 1024.0

Backoff = Callable[[float | None], float]


def natpmp_backoff(first: float = NATPMP_FIRST, cap: float = NATPMP_MAX_INTERVAL) -> Backoff:
    def next_interval(prev: float | None) -> float:
        return first if prev is None else min(prev * 2, cap)

    return next_interval


def pcp_backoff(irt: float = PCP_IRT, mrt: float = PCP_MRT,
                rng: random.Random | None = None) -> Backoff:
    rand = rng or random.Random()

    def next_interval(prev: float | None) -> float:
        jitter = 1 + rand.uniform(-0.1, 0.1)
        rt = jitter * irt if prev is None else jitter * 2 * prev
        return (1 + rand.uniform(-0.1, 0.1)) * mrt if rt > mrt else rt

    return next_interval


class Retransmitter:
    """One request in flight: sent at once, then again whenever `next_send` passes."""

    def __init__(self, data: bytes, now: float, backoff: Backoff,
                 max_sends: int | None = None) -> None:
        self.data = data
        self.sends = 0
        self.max_sends = max_sends
        self.next_send = now
        self._backoff = backoff
        self._interval: float | None = None

    @property
    def exhausted(self) -> bool:
        """All sends made; `next_send` is then when waiting for the last one ends."""
        return self.max_sends is not None and self.sends >= self.max_sends

    def due(self, now: float) -> bool:
        return not self.exhausted and self.next_send <= now

    def mark_sent(self, now: float) -> None:
        self.sends += 1
        self._interval = self._backoff(self._interval)
        self.next_send = now + self._interval
