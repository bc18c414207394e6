"""bench/stats.py: the confidence interval of the median of paired ratios, which decides
whether a bench target is met (the interval must clear it)."""

from __future__ import annotations

import math
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from stats import median_ci, paired_summary  # noqa: E402


def test_the_interval_is_the_narrowest_pair_of_order_statistics_with_the_coverage():
    xs = [float(i) for i in range(1, 16)]  # 15 pairs: x(4) .. x(12) cover 96.5 %
    random.Random(1).shuffle(xs)
    mid, lo, hi, cov = median_ci(xs)
    assert (mid, lo, hi) == (8.0, 4.0, 12.0)
    assert cov == pytest.approx(1 - 2 * sum(math.comb(15, i) for i in range(4)) / 2**15)
    assert cov >= 0.95
    # one step narrower would cover less than 95 %
    assert 1 - 2 * sum(math.comb(15, i) for i in range(5)) / 2**15 < 0.95


def test_too_few_values_give_the_whole_range_and_say_what_it_covers():
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, 1.0, 5.0, 1 - 2 / 32)
    assert median_ci([2.0, 1.0]) == (1.5, 1.0, 2.0, 0.5)
    assert median_ci([7.0]) == (7.0, 7.0, 7.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        median_ci([])


def test_the_summary_names_median_interval_and_range():
    assert paired_summary([]) == ""
    s = paired_summary([0.8, 0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 0.85, 1.15, 1.0])
    assert s == "median 1.00 [0.85, 1.15] (98 % interval), range 0.80–1.20"
