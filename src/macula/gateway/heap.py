"""Keeps Python's cyclic garbage collector off the gateway's long-lived heap.

A registered node is a few hundred long-lived objects (its QUIC connection, TLS state,
registry entry). The collector's oldest generation is scanned whenever enough new
long-lived objects have piled up, and each scan walks every one of them: with 10,000
nodes the gateway spent a growing share of each registration and each keepalive inside
those scans (measured: idle CPU per node 47 -> 70 us/s and registration 1.7 -> 2.9 ms from
100 to 10,000 nodes; with the collector off, flat within 1.2x).

So every housekeeping tick `gc.freeze()` moves what survived into the permanent
generation, which the collector never scans; young objects are collected as before.
Garbage among frozen objects (a departed node's connection, whose parts refer to each
other) waits for the next full pass: at most once a FULL_EVERY, and only after nodes came
and went, everything is unfrozen, collected and frozen again. The time spent here is
counted (`cpu_s`) so benchmarks charge it to the gateway.
"""

from __future__ import annotations

import gc
import time

FULL_EVERY = 60.0  # seconds between full passes while nodes come and go
FREEZE_AFTER = 256  # registrations: during a burst, freeze this often, not once a tick


class HeapKeeper:
    def __init__(self) -> None:
        self.cpu_s = 0.0
        self.full_passes = 0
        self._last_full: float | None = None
        self._churn_seen = 0
        self._frozen_at = 0

    def after_registrations(self, registrations: int) -> None:
        """Called as the gateway works: a burst of registrations (a restart brings every
        node back at once) is frozen every FREEZE_AFTER, before the collector's next
        full scan would walk it. gc.freeze() only splices lists: it costs nothing."""
        if registrations - self._frozen_at >= FREEZE_AFTER:
            self._frozen_at = registrations
            gc.freeze()

    def tick(self, now: float, churn: int) -> None:
        """`churn`: a count that grows whenever a connection ended (the gateway's)."""
        started = time.process_time()
        due = self._last_full is None or now - self._last_full >= FULL_EVERY
        if due and churn != self._churn_seen:
            gc.unfreeze()
            gc.collect()
            self.full_passes += 1
            self._last_full, self._churn_seen = now, churn
        elif self._last_full is None:
            self._last_full = now
        gc.freeze()
        self.cpu_s += time.process_time() - started

    @staticmethod
    def release() -> None:
        """The gateway stops: what it froze is the collector's again."""
        gc.unfreeze()
