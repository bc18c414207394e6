"""The caller's path: frames from the caller's thread through the pipeline and back.

    python bench/caller.py              # ~1 min on 2 cores
    python bench/caller.py --quick

The same chain, three pass-through stages, one process each, fed and drained by the caller:

    caller --send--> stage 1 -> stage 2 -> stage 3 --recv--> caller

Systems:
    remotemedia     Supervisor.send() / recv() (ping-pong) and Supervisor.run(inputs)
                    (streaming)
    mp_queue        the same chain over multiprocessing.Queue (queue per edge, one spawned
                    process per stage), fed and drained by the caller

Measured:
    pingpong    one 4 KiB frame at a time: send, recv, repeat; p50/p90 round trip
    stream      N small ints sent back to back from the caller's inputs, received as they
                come; frames/s from the first send to the last output

Ratios are remotemedia / mp_queue of the same run (these machines are shared and noisy: only
ratios within one run mean anything). Results go to bench/results/caller-<stamp>.json and
caller-latest.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Supervisor  # noqa: E402
from remotemedia.nodes import PassThroughNode  # noqa: E402

STAGES = 3


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------- remotemedia


def rm_pingpong(n: int, size: int) -> Dict[str, float]:
    frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    rtt: List[float] = []
    with Supervisor([PassThroughNode(name=f"s{i}") for i in range(STAGES)], control=False) as sup:
        for i in range(n + 20):
            t0 = time.perf_counter_ns()
            sup.send(frame)
            sup.recv(timeout=30)
            if i >= 20:
                rtt.append((time.perf_counter_ns() - t0) / 1e3)
        sup.close()
        for _ in sup:
            pass
    return {"p50_us": _pct(rtt, 0.5), "p90_us": _pct(rtt, 0.9)}


def rm_stream(n: int) -> Dict[str, float]:
    sup = Supervisor([PassThroughNode(name=f"s{i}") for i in range(STAGES)], control=False)
    sup.start()
    count = [0]
    last = [0.0]

    def on_output(value: Any, info: Any) -> None:
        count[0] += 1
        last[0] = time.perf_counter()

    t0 = time.perf_counter()
    sup.run(range(n), on_output=on_output)
    # (to the last output, as mp_stream: run() returns only once the workers have exited and
    # the run's shared memory is gone, a fixed cost that is not streaming)
    dt = last[0] - t0
    assert count[0] == n, count[0]
    return {"fps": n / dt}


# ---------------------------------------------------------------- multiprocessing.Queue


def _q_stage(qin: Any, qout: Any) -> None:
    while True:
        x = qin.get()
        qout.put(x)
        if x is None:
            return


def _q_chain(depth: int):
    ctx = mp.get_context("spawn")
    qs = [ctx.Queue(maxsize=depth) for _ in range(STAGES + 1)]
    procs = [ctx.Process(target=_q_stage, args=(qs[i], qs[i + 1]), daemon=True) for i in range(STAGES)]
    for p in procs:
        p.start()
    # warm up: every stage has imported and is waiting
    qs[0].put(0)
    qs[-1].get(timeout=60)
    return qs, procs


def _q_end(qs: Any, procs: Any) -> None:
    qs[0].put(None)
    qs[-1].get(timeout=60)
    for p in procs:
        p.join(10)


def mp_pingpong(n: int, size: int) -> Dict[str, float]:
    frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    qs, procs = _q_chain(32)
    rtt: List[float] = []
    for i in range(n + 20):
        t0 = time.perf_counter_ns()
        qs[0].put(frame)
        qs[-1].get(timeout=30)
        if i >= 20:
            rtt.append((time.perf_counter_ns() - t0) / 1e3)
    _q_end(qs, procs)
    return {"p50_us": _pct(rtt, 0.5), "p90_us": _pct(rtt, 0.9)}


def mp_stream(n: int) -> Dict[str, float]:
    qs, procs = _q_chain(32)

    def feed() -> None:
        for i in range(n):
            qs[0].put(i)

    t0 = time.perf_counter()
    t = threading.Thread(target=feed)
    t.start()
    for _ in range(n):
        qs[-1].get(timeout=60)
    dt = time.perf_counter() - t0
    t.join()
    _q_end(qs, procs)
    return {"fps": n / dt}


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per system")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    n_ping = 300 if args.quick else 1000
    n_stream = 5000 if args.quick else 20000
    rounds = 1 if args.quick else args.rounds
    runs: Dict[str, Dict[str, List[float]]] = {
        s: {"p50_us": [], "p90_us": [], "fps": []} for s in ("remotemedia", "mp_queue")
    }
    for r in range(rounds):
        for system, ping, stream in (("remotemedia", rm_pingpong, rm_stream), ("mp_queue", mp_pingpong, mp_stream)):
            p = ping(n_ping, 4096)
            s = stream(n_stream)
            runs[system]["p50_us"].append(p["p50_us"])
            runs[system]["p90_us"].append(p["p90_us"])
            runs[system]["fps"].append(s["fps"])
            print(f"round {r} {system:<12} pingpong 4 KiB p50 {p['p50_us']:7.1f} us  p90 {p['p90_us']:7.1f} us"
                  f"   stream ints {s['fps']:9.0f} frames/s", flush=True)
    med = {s: {k: statistics.median(v) for k, v in d.items()} for s, d in runs.items()}
    rm, mq = med["remotemedia"], med["mp_queue"]
    lines = [
        f"# The caller's path ({time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} cpus, medians of {rounds} rounds)",
        "",
        "| | remotemedia | mp_queue | ratio |",
        "|---|---|---|---|",
        f"| send→recv 4 KiB via 3 stages, p50 | {rm['p50_us']:.0f} µs | {mq['p50_us']:.0f} µs | {rm['p50_us'] / mq['p50_us']:.2f}× |",
        f"| send→recv 4 KiB via 3 stages, p90 | {rm['p90_us']:.0f} µs | {mq['p90_us']:.0f} µs | {rm['p90_us'] / mq['p90_us']:.2f}× |",
        f"| streaming ints via 3 stages | {rm['fps']:.0f} /s | {mq['fps']:.0f} /s | {rm['fps'] / mq['fps']:.2f}× |",
        "",
    ]
    md = "\n".join(lines)
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"caller-{stamp}.json"), "w") as f:
        json.dump({"runs": runs, "median": med}, f, indent=2)
    with open(os.path.join(args.out, "caller-latest.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
