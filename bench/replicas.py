"""Replicas: the throughput of a CPU-bound node with 1 and with 2 replicas, and of 2 replicas
fed least-loaded (the runtime's dispatch) against round-robin when the frames' cost is uneven,
in the same run, and whether the frames stay in order.

    python bench/replicas.py                 # ~1 min; exit 1 when a claim fails
    python bench/replicas.py --frames 600 --cpu-ms 10 --replicas 1,2,3

Pipeline: ``source -> work (replicas=N) -> sink``. ``work`` burns the CPU time of each frame
(``time.thread_time``: the time it runs, not the time it waits for a core); source and sink
do next to nothing, so on 2 cores 2 replicas can run side by side. The sink returns the time
each frame reached it (CLOCK_MONOTONIC, one clock for every process) and the number of frames
it has taken before it; throughput is measured at the sink over the frames after the first
10% (the workers' start is not counted).

Cases:

* ``even``: every frame costs ``--cpu-ms``; 1, 2 (``--replicas``) replicas.
* ``alternating``: frames cost 2 and 18 ms in turn (10 ms on average), 2 replicas,
  least-loaded and round-robin (frame k to replica k mod 2: one replica gets every 18 ms
  frame). Round-robin is not an option of the runtime; the bench selects it through the
  workers' environment (``supervisor.worker.replicas.ROUND_ROBIN_ENV``).
* ``random``: each frame 2 or 18 ms at random (seed 16, 10 ms on average), the same two.

Claims (issue 16): 2 replicas >= 1.8x the frames/s of 1 replica on 2 cores (even case); the
sink takes the frames in input order in every run. Reported, not claimed: least-loaded /
round-robin on the uneven cases. Run it on an otherwise idle machine: they are wall-clock
figures (ratios of the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from typing import Any, Dict, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Node, Supervisor  # noqa: E402
from remotemedia.nodes import RangeSource  # noqa: E402


from supervisor.worker.replicas import ROUND_ROBIN_ENV  # noqa: E402


class Burn(Node):
    """Spends ``costs[x % len(costs)]`` seconds of CPU time on frame ``x``, then passes it on."""

    def __init__(self, costs: Sequence[float], **kw: object) -> None:
        super().__init__(**kw)
        self.costs = list(costs)

    def process(self, x):  # type: ignore[no-untyped-def]
        end = time.thread_time() + self.costs[x % len(self.costs)]
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


def run(frames: int, costs: Sequence[float], replicas: int, round_robin: bool = False) -> Dict[str, float]:
    report = Supervisor(
        [RangeSource(frames, name="source"), Burn(costs, name="work", options={"replicas": replicas}), Arrival(name="sink")],
        env={ROUND_ROBIN_ENV: "1"} if round_robin else None,
    ).run()
    out = sorted(report.outputs)  # (by the position the sink took them in)
    in_order = [x for _, x, _ in out] == list(range(frames))
    skip = frames // 10
    span = out[-1][2] - out[skip][2]
    taken = [report.nodes[f"work[{i}]"]["frames_in"] for i in range(replicas)] if replicas > 1 else [frames]
    return {"fps": (frames - 1 - skip) / span, "in_order": float(in_order), "frames_in": taken}


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--cpu-ms", type=float, default=10.0, help="the cost of a frame in the even case")
    ap.add_argument("--replicas", default="1,2", help="the replica counts to compare in the even case (the first is the baseline)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each configuration; the best throughput is kept")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="directory of the results (json, md)")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    rng = random.Random(16)
    cases: Dict[str, List[float]] = {
        "even": [args.cpu_ms / 1000],
        "alternating": [0.002, 0.018],
        "random": [rng.choice((0.002, 0.018)) for _ in range(args.frames)],
    }
    configs: List[Tuple[str, str, int, bool]] = [("even", f"replicas={n}", n, False) for n in counts]
    for case in ("alternating", "random"):
        configs += [(case, "least-loaded", 2, False), (case, "round-robin", 2, True)]
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"{args.frames} frames, {machine}")
    results: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for _ in range(args.repeat):  # (alternating, so that a busy moment of the host hits every configuration)
        for case, label, n, rr in configs:
            r = run(args.frames, cases[case], n, rr)
            best = results.setdefault((case, label), r)
            best["in_order"] = min(best["in_order"], r["in_order"])
            if r["fps"] > best["fps"]:
                best["fps"], best["frames_in"] = r["fps"], r["frames_in"]
    failed = 0
    lines = [
        f"# bench/replicas.py ({when}, {machine})",
        "",
        f"{args.frames} frames, source -> work (replicas) -> sink, best of {args.repeat} runs each.",
        "",
        "| case | dispatch | frames/s | ratio | frames per replica | in order |",
        "|---|---|---|---|---|---|",
    ]
    for case, label, n, rr in configs:
        r = results[(case, label)]
        base = results[(case, configs[[c[0] for c in configs].index(case)][1])]["fps"]
        ok = bool(r["in_order"])
        failed += not ok
        row = f"| {case} | {label} | {r['fps']:.1f} | {r['fps'] / base:.2f}x | {'/'.join(map(str, r['frames_in']))} | {'yes' if ok else 'NO'} |"
        lines.append(row)
    lines.append("")
    if "replicas=1" in [c[1] for c in configs] and "replicas=2" in [c[1] for c in configs]:
        ratio = results[("even", "replicas=2")]["fps"] / results[("even", "replicas=1")]["fps"]
        ok = ratio >= 1.8
        failed += not ok
        lines.append(f"even {args.cpu_ms:g} ms: 2 replicas / 1 replica: {ratio:.2f}x (claim: >= 1.8x) {'ok' if ok else 'FAILED'}")
    for case in ("alternating", "random"):
        ratio = results[(case, "least-loaded")]["fps"] / results[(case, "round-robin")]["fps"]
        lines.append(f"{case} 2/18 ms: least-loaded / round-robin: {ratio:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, time.strftime("%Y%m%d-%H%M%S") + "-replicas")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(
                {"when": when, "machine": machine, "frames": args.frames, "repeat": args.repeat,
                 "runs": [{"case": c, "dispatch": lbl, "replicas": n, **results[(c, lbl)]} for c, lbl, n, _ in configs]},
                f, indent=2,
            )  # fmt: skip
        print(f"results: {stem}.md, {stem}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
