"""The statistics the benches share: ratios measured in pairs on a noisy machine.

This machine's speed moves by a third between runs seconds apart (other tenants, steal
time). A comparison is made of pairs run back to back (each pair's ratio is mostly the two
variants' difference), summarised by the median of the pairs' ratios and a confidence interval
for it. The interval comes from order statistics (no assumption about the ratios'
distribution): a target is met when the interval clears it, not when the median alone does.
"""

from __future__ import annotations

import math
from typing import List, Tuple


def median_ci(xs: List[float], level: float = 0.95) -> Tuple[float, float, float, float]:
    """``(median, low, high, coverage)``: the median of ``xs`` and the narrowest interval
    between order statistics ``x(k) .. x(n+1-k)`` that covers the true median with probability
    at least ``level`` (binomial, distribution-free); the whole range when there are too few
    values for ``level`` (``coverage`` then says what it covers: 2 values 50 %, 5 values 94 %).

    >>> median_ci([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    (5.5, 2.0, 9.0, 0.978515625)
    """
    s = sorted(xs)
    n = len(s)
    if not n:
        raise ValueError("median_ci of no values")
    mid = (s[(n - 1) // 2] + s[n // 2]) / 2

    def coverage(k: int) -> float:  # P(x(k) <= median <= x(n+1-k)) = 1 - 2 P(Bin(n, 1/2) < k)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return mid, s[k - 1], s[n - k], coverage(k)


def paired_summary(ratios: List[float]) -> str:
    """``median M [L, H] (C % interval), range A–B`` of the pairs' ratios ("" for none).

    >>> paired_summary([0.9, 1.0, 1.1, 1.2, 0.8, 1.0])
    'median 1.00 [0.80, 1.20] (97 % interval), range 0.80–1.20'
    """
    if not ratios:
        return ""
    mid, lo, hi, cov = median_ci(ratios)
    return f"median {mid:.2f} [{lo:.2f}, {hi:.2f}] ({cov * 100:.0f} % interval), range {min(ratios):.2f}–{max(ratios):.2f}"
