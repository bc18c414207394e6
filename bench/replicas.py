"""Replicas: the throughput of a CPU-bound node (10 ms of CPU per frame) with 1 and with 2
replicas, in the same run, and whether the frames stay in order.

    python bench/replicas.py                 # ~30 s; exit 1 when a claim fails
    python bench/replicas.py --frames 600 --cpu-ms 10 --replicas 1,2,3

Pipeline: ``source -> work (replicas=N) -> sink``. ``work`` burns ``--cpu-ms`` of its own
CPU time per frame (``time.thread_time``: the time it runs, not the time it waits for a core);
source and sink do next to nothing, so on 2 cores 2 replicas can run side by side. The sink
returns the time each frame reached it (CLOCK_MONOTONIC, one clock for every process) and
the number of frames it has taken before it; throughput is measured at the sink over the
frames after the first 10% (the workers' start is not counted).

Claims (issue 16): 2 replicas >= 1.8x the frames/s of 1 replica on 2 cores; the sink takes
the frames in input order. Run it on an otherwise idle machine: they are wall-clock figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Node, Supervisor  # noqa: E402
from remotemedia.nodes import RangeSource  # noqa: E402


class Burn(Node):
    """Spends ``cpu_s`` of CPU time per frame, then passes the frame on."""

    def __init__(self, cpu_s: float, **kw: object) -> None:
        super().__init__(**kw)
        self.cpu_s = cpu_s

    def process(self, x):  # type: ignore[no-untyped-def]
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            pass
        return x


class Arrival(Node):
    """``(position taken, frame, time)`` of every frame."""

    def initialize(self) -> None:
        self.n = 0

    def process(self, x):  # type: ignore[no-untyped-def]
        self.n += 1
        return (self.n - 1, x, time.monotonic())


def run(frames: int, cpu_s: float, replicas: int) -> Dict[str, float]:
    report = Supervisor(
        [RangeSource(frames, name="source"), Burn(cpu_s, name="work", options={"replicas": replicas}), Arrival(name="sink")]
    ).run()
    out = sorted(report.outputs)  # (by the position the sink took them in)
    in_order = [x for _, x, _ in out] == list(range(frames))
    skip = frames // 10
    span = out[-1][2] - out[skip][2]
    return {"fps": (frames - 1 - skip) / span, "in_order": float(in_order)}


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--cpu-ms", type=float, default=10.0)
    ap.add_argument("--replicas", default="1,2", help="the replica counts to compare (the first is the baseline)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each count; the best throughput is kept")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    print(f"{args.frames} frames, {args.cpu_ms:g} ms of CPU per frame, {os.cpu_count()} cores")
    results: Dict[int, Dict[str, float]] = {}
    for _ in range(args.repeat):  # (alternating, so that a busy moment of the host hits both)
        for n in counts:
            r = run(args.frames, args.cpu_ms / 1000, n)
            best = results.setdefault(n, r)
            best["in_order"] = min(best["in_order"], r["in_order"])
            best["fps"] = max(best["fps"], r["fps"])
    base = results[counts[0]]["fps"]
    failed = 0
    for n, r in results.items():
        ok = bool(r["in_order"])
        failed += not ok
        print(f"replicas={n}: {r['fps']:7.1f} frames/s  {r['fps'] / base:4.2f}x  in order: {'yes' if ok else 'NO'}")
    if 1 in results and 2 in results:
        ratio = results[2]["fps"] / results[1]["fps"]
        ok = ratio >= 1.8
        failed += not ok
        print(f"2 replicas / 1 replica: {ratio:.2f}x (claim: >= 1.8x) {'ok' if ok else 'FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
