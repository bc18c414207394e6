"""Small, allocation-free statistics for per-frame latencies."""

from __future__ import annotations

from typing import Dict, List, Optional

__all__ = ["LatencyStats", "percentile"]


def percentile(sorted_values: List[int], q: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list (``q`` in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return float(sorted_values[k])


class LatencyStats:
    """Count, total and a ring of the last ``size`` samples (nanoseconds).

    p50/p99 are computed over the ring, i.e. over recent frames, which is what an operator
    watching a live pipeline wants.
    """

    __slots__ = ("size", "ring", "pos", "count", "total_ns", "max_ns")

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self.ring: List[int] = []
        self.pos = 0
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        if len(self.ring) < self.size:
            self.ring.append(ns)
        else:
            self.ring[self.pos] = ns
            self.pos = (self.pos + 1) % self.size

    def summary(self) -> Dict[str, Optional[float]]:
        s = sorted(self.ring)
        to_ms = lambda v: None if v is None else v / 1e6  # noqa: E731
        return {
            "count": self.count,
            "mean_ms": (self.total_ns / self.count / 1e6) if self.count else None,
            "p50_ms": to_ms(percentile(s, 50)),
            "p99_ms": to_ms(percentile(s, 99)),
            "max_ms": self.max_ns / 1e6 if self.count else None,
        }
