"""Where a stream's CPU goes, process by process: bench/run.py's pipeline (source -> 3
pass-through stages -> sink, one worker each) through the Supervisor, with each worker's CPU
time and context switches per frame, read from /proc while it runs.

    python bench/stage_cpu.py                          # 4 KiB, 100,000 frames back to back
    python bench/stage_cpu.py --size 6220800 -n 600    # 1080p RGB frames
    python bench/stage_cpu.py --dict --rounds 5        # media dicts, five runs
    python bench/stage_cpu.py --perf s2.data           # and a `perf record` of stage s2
    python bench/stage_cpu.py --spin-us 50             # workers that give up spinning sooner

Per frame, a worker's CPU time is its own work plus its waiting: a stage that waits for its
input spins (yielding the core) before it sleeps, so when one stage slows the whole pipeline
every worker's CPU per frame rises. Compare runs alternately (the machine's load moves), and
read a `perf` profile (``--perf``; ``perf report -i FILE --no-children --sort dso,sym``) to
see what a stage does with its time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from typing import Dict, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import run as bench  # noqa: E402  (bench/run.py: the nodes)

from remotemedia import Supervisor  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def switches(pid: int) -> Tuple[int, int]:
    """(voluntary, involuntary) context switches so far."""
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                got[key] = int(value)
    return got.get("voluntary_ctxt_switches", 0), got.get("nonvoluntary_ctxt_switches", 0)


class Sampler:
    """The CPU time and switches of each worker, sampled every 20 ms: the last sample before
    a worker exits stands for its total."""

    def __init__(self, pids: Dict[str, int]) -> None:
        self.pids = pids
        self.first = {k: (cpu_seconds(p), switches(p)) for k, p in pids.items()}
        self.last = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for k, p in self.pids.items():
                try:
                    self.last[k] = (cpu_seconds(p), switches(p))
                except OSError:
                    pass  # (exited: its last sample stays)

    def per_frame(self, frames: int) -> Dict[str, Tuple[float, float, float]]:
        """worker -> (CPU µs, voluntary, involuntary switches) per frame."""
        self._stop.set()
        self._thread.join()
        out = {}
        for k in self.pids:
            (c0, (v0, n0)), (c1, (v1, n1)) = self.first[k], self.last[k]
            out[k] = ((c1 - c0) / frames * 1e6, (v1 - v0) / frames, (n1 - n0) / frames)
        return out


def one_run(size: int, n: int, as_dict: bool, queue: int, perf: Optional[str], perf_who: str, spin_us: Optional[int] = None) -> None:
    nodes = bench.copy_pipeline(n, size, as_dict, 0.5)
    spin = {} if spin_us is None else {"spin_us": spin_us}
    sup = Supervisor(nodes, queue_depth=queue, control=False, **spin)
    sup.start()
    pids = sup.worker_pids()
    time.sleep(0.25)  # (the source waits 0.5 s before its first frame)
    sampler = Sampler(pids)
    recorder = None
    if perf:
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", str(pids[perf_who]), "-o", perf]
        recorder = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    report = sup.run()
    if recorder is not None:
        recorder.wait()
    (res,) = report.outputs
    lat = sorted(res["lat"])
    frames = len(lat)
    rate = (frames - 1) / ((res["last"] - res["first"]) / 1e9)
    per = sampler.per_frame(frames)
    cpu = "  ".join(f"{k} {c:6.1f}" for k, (c, _, _) in per.items())
    ctx = "  ".join(f"{k} {v:.2f}/{i:.2f}" for k, (_, v, i) in per.items())
    print(f"{rate:9.0f} frames/s  p50 {lat[frames // 2] / 1e3:8.1f} µs end to end")
    print(f"    CPU µs per frame:        {cpu}")
    print(f"    switches per frame (voluntary/involuntary): {ctx}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="payload bytes (default 4096)")
    ap.add_argument("-n", type=int, default=100_000, help="frames (default 100,000)")
    ap.add_argument("--dict", action="store_true", help='frames as {"t", "rate", "data": array} dicts')
    ap.add_argument("--queue", type=int, default=bench.QUEUE, help="frames in flight per edge (default 8, as bench/run.py)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--perf", metavar="FILE", help="`perf record` one worker into FILE (needs perf)")
    ap.add_argument("--perf-who", default="s2", help="the worker --perf records (default s2)")
    ap.add_argument("--spin-us", type=int, help="the Supervisor's spin_us (default: the runtime's)")
    args = ap.parse_args()
    if args.perf and args.rounds > 1:
        ap.error("--perf records one round")
    for _ in range(args.rounds):
        one_run(args.size, args.n, args.dict, args.queue, args.perf, args.perf_who, args.spin_us)


if __name__ == "__main__":
    main()
