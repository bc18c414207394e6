"""A producer waiting for room in a full window is woken by its consumer's acks: the time
claims of tests/test_flow.py's window tests, kept here because a busy host can break them.

    python bench/windows.py            # ~5 s on 2 cores; exit 1 when a claim fails

* 6000 frames through a 2-frame window (``queue_depth=2``): ~1.5 s with the wake-ups, ~20 s
  when the producer notices room only by chance (a commit's wake-up, its 50 ms poll). Claim:
  under 6 s.
* 4000 frames of 512 KiB through a 1 MiB window (``queue_bytes``, a 2-frame window of 32
  allowed frames): ~3 s when the consumer sizes the window from the frames it takes, ~11 s
  when it assumes ``queue_depth``. Claim: under 7 s.

Run it on an otherwise idle machine: the figures are wall-clock times.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Node, Source, Supervisor  # noqa: E402
from remotemedia.nodes import PassThroughNode, RangeSource  # noqa: E402


class BigFrames(Source):
    def __init__(self, n: int, size: int, **kw: object) -> None:
        super().__init__(**kw)
        self.n, self.size = n, size

    def generate(self):  # type: ignore[no-untyped-def]
        frame = np.zeros(self.size, np.uint8)
        for i in range(self.n):
            yield (i, frame)


class Index2(Node):
    def process(self, pair):  # type: ignore[no-untyped-def]
        return pair[0]


def main() -> int:
    failed = 0
    t0 = time.monotonic()
    report = Supervisor([RangeSource(6000, name="src"), PassThroughNode(name="sink", options={"queue_depth": 2})]).run()
    elapsed = time.monotonic() - t0
    ok = report.outputs == list(range(6000)) and elapsed < 6
    failed += not ok
    print(f"6000 frames through a 2-frame window: {elapsed:.2f} s (claim: < 6 s) {'ok' if ok else 'FAILED'}")

    t0 = time.monotonic()
    report = Supervisor(
        [BigFrames(4000, 512 << 10, name="src"), Index2(name="sink", options={"queue_bytes": 1 << 20})],
        spin_us=0,  # a spinning producer would see the acks without being woken
    ).run()
    elapsed = time.monotonic() - t0
    ok = report.outputs == list(range(4000)) and elapsed < 7
    failed += not ok
    print(f"4000 frames of 512 KiB through a 1 MiB window: {elapsed:.2f} s (claim: < 7 s) {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
