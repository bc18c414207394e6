"""Small, allocation-free statistics for per-frame latencies."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["LATENCY_BUCKETS_S", "LatencyStats", "percentile"]

# Upper bounds (seconds) of the process() latency histogram: from a cheap pass-through stage
# (tens of microseconds) to a heavy model call (seconds). A fixed table, shared by the
# workers that count into it and the supervisor that exports it: Prometheus can only sum
# histograms (over nodes, over restarts) whose buckets are the same. Slower frames land in
# the implicit +Inf bucket.
LATENCY_BUCKETS_S: Tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: The same bounds in nanoseconds (the bridge's stage loop counts with them too).
BOUNDS_NS: Tuple[int, ...] = tuple(round(b * 1e9) for b in LATENCY_BUCKETS_S)
_BOUNDS_NS = BOUNDS_NS


def percentile(sorted_values: List[int], q: float) -> Optional[float]:
    """Nearest-rank percentile of an already sorted list (``q`` in 0..100)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return float(sorted_values[k])


class LatencyStats:
    """Count, total, a histogram over :data:`LATENCY_BUCKETS_S` and a ring of the last
    ``size`` samples (nanoseconds).

    p50/p99 are computed over the ring, i.e. over recent frames, which is what an operator
    watching a live pipeline wants; the histogram counts every frame since the process
    started, which is what Prometheus wants (it computes quantiles over any window itself).

    >>> s = LatencyStats()
    >>> s.add(30_000); s.add(2_000_000)          # 30 us and 2 ms
    >>> h = s.histogram()
    >>> h["counts"][0], h["counts"][5], h["sum_ns"]  # the <=50 us and <=2.5 ms buckets
    (1, 1, 2030000)
    """

    __slots__ = ("size", "ring", "pos", "count", "total_ns", "max_ns", "buckets")

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self.ring: List[int] = []
        self.pos = 0
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0
        # per bucket, not cumulative (one increment per frame); the last one is +Inf
        self.buckets: List[int] = [0] * (len(_BOUNDS_NS) + 1)

    def add(self, ns: int) -> None:
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        # bisect_left: a sample equal to a bound belongs to that bound's bucket (le = "<=")
        self.buckets[bisect_left(_BOUNDS_NS, ns)] += 1
        if len(self.ring) < self.size:
            self.ring.append(ns)
        else:
            self.ring[self.pos] = ns
            self.pos = (self.pos + 1) % self.size

    def merge(self, count: int, total_ns: int, max_ns: int, buckets: List[int], recent: List[int]) -> None:
        """:meth:`add` of a batch counted elsewhere (the bridge's stage loop counts with the
        same bounds, :data:`BOUNDS_NS`): its totals, its per-bucket counts and its samples in
        order (the newest of them go into the ring).

        >>> s = LatencyStats(size=2)
        >>> s.merge(3, 60_000, 30_000, [2, 1] + [0] * 16, [10_000, 20_000, 30_000])
        >>> s.count, s.ring, s.histogram()["counts"][:2]
        (3, [30000, 20000], [2, 1])
        """
        self.count += count
        self.total_ns += total_ns
        if max_ns > self.max_ns:
            self.max_ns = max_ns
        mine = self.buckets
        for i, n in enumerate(buckets):
            if n:
                mine[i] += n
        ring, size = self.ring, self.size
        room = size - len(ring)
        if room > 0:
            ring.extend(recent[:room])
            recent = recent[room:]
        pos = self.pos
        while recent:
            k = min(len(recent), size - pos)
            ring[pos : pos + k] = recent[:k]
            recent = recent[k:]
            pos = (pos + k) % size
        self.pos = pos

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

    def histogram(self) -> Dict[str, Any]:
        """Every sample since this object was made: ``counts`` per bucket of
        :data:`LATENCY_BUCKETS_S` (not cumulative; one more at the end for +Inf) and
        ``sum_ns``. Plain ints, so that it pickles small and sums exactly."""
        return {"counts": list(self.buckets), "sum_ns": self.total_ns}
