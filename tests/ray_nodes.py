"""Nodes of tests/test_ray.py, in a module of their own: the node workers import the module of
a node's class, and this one imports nothing heavy (the test module imports Ray and pytest)."""

from __future__ import annotations

import time
from typing import Any

from remotemedia import Node, Source


class Count(Node):
    """Pairs each frame with how many it has seen: a restore from a stale snapshot, a frame
    lost or processed twice shows in the counts."""

    def __init__(self, delay: float = 0.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.delay = delay
        self.n = 0

    def process(self, x: Any) -> Any:
        if self.delay:
            time.sleep(self.delay)
        self.n += 1
        return (x, self.n)

    def snapshot(self) -> int:
        return self.n

    def restore(self, state: int) -> None:
        self.n = state


class Tally(Count):
    """Count for arrays: the frame with how many it has seen appended (an int64 array)."""

    def process(self, x: Any) -> Any:
        import numpy as np

        x, n = super().process(x)
        return np.append(x, np.int64(n))


class Ticks(Source):
    """An endless paced stream 0, 1, 2, ..."""

    def generate(self):
        i = 0
        while True:
            time.sleep(0.005)
            yield i
            i += 1


class Fails(Node):
    """Raises on frame 3."""

    def process(self, x: Any) -> Any:
        if x == 3:
            raise ValueError(f"bad frame {x}")
        return x


class BadInit(Node):
    """Fails in initialize()."""

    def initialize(self) -> None:
        raise RuntimeError("no GPU here")

    def process(self, x: Any) -> Any:
        return x
