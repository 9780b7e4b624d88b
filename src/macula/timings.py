"""Latency histograms the metrics endpoint exports: plain counts, observed by the cores."""

from __future__ import annotations

from dataclasses import dataclass, field

# Seconds: from a loopback connect (milliseconds) to a hard-NAT guess (seconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus style): counts[i] observations <= BUCKETS[i]."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs ending with +Inf, as Prometheus wants."""
        return [*((f"{bound:g}", n) for bound, n in zip(BUCKETS, self.counts)),
                ("+Inf", self.count)]
