"""Worker start-up per ``start_method``: ``Supervisor.start()`` until every worker is READY,
the private memory of the run's processes, and whether a watchdog killed anything, for
pipelines of 10 and 100 pass-through nodes; forkserver against spawn, in the same run.

    python bench/startup.py              # ~1 min on 2 cores
    python bench/startup.py --sizes 10 --repeat 5

For each size the methods take turns (spawn, forkserver, spawn, ...), each run:

* ``ready_s``: ``Supervisor.start()`` until every worker reported READY (the run is up);
* ``uss_mib``: the private memory (psutil USS: pages no other process maps) of every process
  the run started, workers and template, summed, right after READY;
* ``kills``: heartbeat and other watchdog kills and restarts, after one frame went through
  every node and the run ended.

The median of the repeats is reported, and forkserver / spawn ratios. Results go to
``bench/results/startup-<stamp>.json`` and ``.md`` (and ``startup-latest``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Supervisor  # noqa: E402
from remotemedia.nodes import PassThroughNode  # noqa: E402

METHODS = ("spawn", "forkserver")


def _uss(pids: List[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().uss
        except psutil.Error:
            pass
    return total


def one_run(n: int, method: str) -> Dict[str, Any]:
    """Start ``n`` pass-through nodes (a chain) with ``method``; READY time, memory, kills."""
    sup = Supervisor([PassThroughNode(name=f"p{i}") for i in range(n)], start_method=method, control=False)
    t0 = time.monotonic()
    sup.start()
    ready = time.monotonic() - t0
    procs = [p.pid for p in psutil.Process().children(recursive=True)]
    uss = _uss(procs)
    launcher = sup.status()["launcher"]
    sup.send(1)
    assert sup.recv(timeout=120) == 1  # one frame through every node
    sup.close()
    sup.join()
    nodes = sup.report().nodes.values()
    return {
        "ready_s": ready,
        "uss_mib": uss / 2**20,
        "processes": len(procs),
        "kills": sum(s.get("hang_kills", 0) + s.get("memory_kills", 0) for s in nodes),
        "restarts": sum(s.get("restarts", 0) for s in nodes),
        "forked": launcher.get("forked"),
    }


def bench(sizes: List[int], repeat: Dict[int, int]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for n in sizes:
        runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in METHODS}
        for _ in range(repeat[n]):
            for method in METHODS:
                r = one_run(n, method)
                runs[method].append(r)
                print(
                    f"{n:>4} nodes {method:<10} READY {r['ready_s']:6.2f} s  USS {r['uss_mib']:7.0f} MiB "
                    f"({r['processes']} processes)  watchdog kills {r['kills']}  restarts {r['restarts']}",
                    flush=True,
                )
        per = {}
        for method, rs in runs.items():
            per[method] = {
                "ready_s_median": statistics.median(r["ready_s"] for r in rs),
                "ready_s_min": min(r["ready_s"] for r in rs),
                "ready_s_max": max(r["ready_s"] for r in rs),
                "uss_mib_median": statistics.median(r["uss_mib"] for r in rs),
                "uss_mib_per_worker": statistics.median(r["uss_mib"] for r in rs) / n,
                "kills": sum(r["kills"] for r in rs),
                "restarts": sum(r["restarts"] for r in rs),
                "runs": rs,
            }
        per["ratio_ready"] = per["forkserver"]["ready_s_median"] / per["spawn"]["ready_s_median"]
        per["ratio_uss"] = per["forkserver"]["uss_mib_median"] / per["spawn"]["uss_mib_median"]
        out[str(n)] = per
    return out


def render(results: Dict[str, Any]) -> str:
    lines = [f"# Worker start-up ({results['when']}, {results['machine']})", ""]
    lines.append("| nodes | start_method | READY median s (min-max) | private memory (USS) MiB | per worker MiB | watchdog kills | restarts |")
    lines.append("|---|---|---|---|---|---|---|")
    for n, per in results["sizes"].items():
        for method in METHODS:
            r = per[method]
            lines.append(
                f"| {n} | {method} | {r['ready_s_median']:.2f} ({r['ready_s_min']:.2f}-{r['ready_s_max']:.2f}) | "
                f"{r['uss_mib_median']:.0f} | {r['uss_mib_per_worker']:.1f} | {r['kills']} | {r['restarts']} |"
            )
    lines.append("")
    for n, per in results["sizes"].items():
        lines.append(f"{n} nodes, forkserver / spawn: READY time {per['ratio_ready']:.3f}, private memory {per['ratio_uss']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--repeat", type=int, default=None, help="runs per method and size (default: 5 for 10 nodes, 2 for more)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    repeat = {n: args.repeat or (5 if n <= 10 else 2) for n in sizes}
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "sizes": bench(sizes, repeat),
    }
    md = render(results)
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"startup-{stamp}", "startup-latest"):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(md)
    print(f"written to {args.out}/startup-{stamp}.json and .md")


if __name__ == "__main__":
    main()
