"""bench/run.py's round order: every system once a round, the rotation moving the first
system, and each paired system (media dicts) right next to its partner, on alternating sides,
so that the pair's ratio compares runs seconds apart."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import run as bench  # noqa: E402


def test_every_round_runs_each_system_once_and_the_pairs_side_by_side():
    firsts = set()
    for r in range(2 * len(bench.SYSTEMS)):
        order = bench.round_order(list(bench.SYSTEMS), r)
        assert sorted(order) == sorted(bench.SYSTEMS), order
        firsts.add(order[0])
        for first, second in bench.PAIRED:
            i, j = order.index(first), order.index(second)
            assert j == (i - 1 if r % 2 else i + 1), (r, order)
    assert len(firsts) > 1  # (the rotation still moves who runs first)


def test_a_pair_with_a_system_left_out_changes_nothing():
    systems = ["remotemedia", "mp_queue", "iox_raw"]
    assert bench.round_order(systems, 1) == ["mp_queue", "iox_raw", "remotemedia"]
