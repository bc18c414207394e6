"""Where a small frame's hop goes: publish -> consumer's process(), split by whether the
consumer ran on its producer's core.

    python bench/wakeups.py            # 1000 frames of 4 KiB paced at 2 ms, ~5 s
    python bench/wakeups.py --frames 3000 --size 64
    python bench/wakeups.py --raw      # the same pipeline as a bare loop over the bridge

Pipeline: source -> s1 -> s2 -> s3 -> sink, one process each. Every stage records, per frame,
the producer's publish time (``current_frame.sent_ns``), when its ``process()`` starts, and
the core it runs on (``sched_getcpu()``). On a machine with fewer cores than stages, a consumer
woken on its producer's core and one woken on the other core differ by more than the whole
Python path of a stage: that split explains most of a small frame's hop latency (see the
README's performance section). ``--raw`` measures the floor: the same five processes as a
bare receive/send/notify loop over the bridge, with no runtime around it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from remotemedia import Node, Source, Supervisor  # noqa: E402


class Paced(Source):
    def __init__(self, n: int, size: int, interval: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.n, self.size, self.interval = n, size, interval

    def generate(self):
        frame = np.zeros(self.size, np.uint8)
        time.sleep(0.3)
        for _ in range(self.n):
            time.sleep(self.interval)
            yield frame


class Probe(Node):
    """Passes its input on (the sink returns nothing) and records, per frame,
    ``[seq, publish ns, process() start ns, cpu]``; writes them to ``<out>/<name>.json``."""

    def __init__(self, out: str, sink: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.out, self.sink = out, sink
        self.rec: List[List[int]] = []

    def initialize(self) -> None:
        import ctypes  # at run time: the node is pickled by value

        self.cpu = ctypes.CDLL(None).sched_getcpu
        self.rec = []

    def process(self, data):
        t = time.monotonic_ns()
        f = self.current_frame
        self.rec.append([f.seq, f.sent_ns, t, self.cpu()])
        return None if self.sink else data

    def cleanup(self) -> None:
        if self.rec:
            with open(os.path.join(self.out, f"{self.name}.json"), "w") as fh:
                json.dump(self.rec, fh)


def _raw_proc(prefix: str, root: str, i: int, n: int, size: int, interval: float, out: str, ready: Any) -> None:
    """Process ``i`` of the bare loop: 0 is the source, 4 the sink."""
    from remotemedia import _ipc_bridge as bridge

    node = bridge.Node(prefix, f"p{i}", root)
    opts = dict(max_subscribers=2, max_publishers=2, buffer_size=8, max_borrowed=4, safe_overflow=False)
    inbox = bridge.Listener(node, f"in{i}")
    sub = bridge.Subscriber(node, f"d{i - 1}", **opts) if i > 0 else None
    pub = bridge.Publisher(node, f"d{i}", **opts) if i < 4 else None
    notifier = bridge.Notifier(node, f"in{i + 1}") if i < 4 else None
    ready.wait()
    if pub is not None:
        pub.update_connections()
    if sub is None:
        frame = np.zeros(size, np.uint8)
        time.sleep(0.3)
        for k in range(n + 1):  # the last one says stop
            time.sleep(interval)
            pub.send(k, 0 if k < n else 1, b"", [frame])
            notifier.notify()
        time.sleep(0.5)
        return
    import ctypes

    cpu = ctypes.CDLL(None).sched_getcpu
    rec = []
    while True:
        s = sub.receive()
        if s is None:
            inbox.wait(0.1)
            continue
        rec.append([s.seq, s.sent_ns, time.monotonic_ns(), cpu()])
        stop = s.kind == 1
        if pub is not None:
            o, ln = s.buffers[0]
            pub.send(s.seq, s.kind, b"", [memoryview(s)[o : o + ln]])
            notifier.notify()
        del s
        if stop:
            break
    with open(os.path.join(out, f"{NAMES[i - 1]}.json"), "w") as fh:
        json.dump(rec[:-1], fh)
    time.sleep(0.3)


def run_raw(n: int, size: int, interval: float, out: str) -> None:
    import multiprocessing as mp

    from supervisor import resources

    ctx = mp.get_context("spawn")
    run = resources.new_run()
    ready = ctx.Barrier(5)
    procs = [ctx.Process(target=_raw_proc, args=(run.prefix, run.root, i, n, size, interval, out, ready)) for i in range(5)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(60 + n * interval * 2)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        resources.purge(run.root)


NAMES = ["s1", "s2", "s3", "sink"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--interval", type=float, default=0.002)
    ap.add_argument("--raw", action="store_true", help="a bare loop over the bridge instead of the runtime")
    args = ap.parse_args()
    names = NAMES
    with tempfile.TemporaryDirectory() as out:
        if args.raw:
            run_raw(args.frames, args.size, args.interval, out)
        else:
            probes = [Probe(out, sink=(n == "sink"), name=n) for n in names]
            Supervisor([Paced(args.frames, args.size, args.interval, name="source"), *probes]).run()
        recs: Dict[str, Dict[int, List[int]]] = {}
        for n in names:
            with open(os.path.join(out, f"{n}.json")) as fh:
                recs[n] = {r[0]: r for r in json.load(fh)}
    warm = args.frames // 20  # skip the start (first frames of each edge go through Python)
    print(f"{'bare bridge loop' if args.raw else 'remotemedia'}: {args.frames} frames of {args.size} B, "
          f"paced at {args.interval * 1000:g} ms; "
          "publish -> process() start, p50 µs:")
    for prev, cur in zip(names, names[1:]):
        same: List[int] = []
        cross: List[int] = []
        for seq, r in recs[cur].items():
            p = recs[prev].get(seq)
            if seq < warm or p is None:
                continue
            (same if p[3] == r[3] else cross).append(r[2] - r[1])
        fmt = lambda v: f"{len(v):5d} frames {statistics.median(v) / 1e3:7.1f}" if v else "    0 frames       -"  # noqa: E731
        print(f"  {prev:>4} -> {cur:<4}  same core: {fmt(same)}   other core: {fmt(cross)}")


if __name__ == "__main__":
    main()
