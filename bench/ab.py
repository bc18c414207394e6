"""A/B in pairs: two variants of bench/run.py's pipeline (source -> 3 pass-through stages ->
sink, one worker each), run back to back, many times, with the median of the pairs' ratios and
a confidence interval for it.

    # this checkout's runtime against another checkout's (say the commit before a change):
    git worktree add /tmp/base REV          # (from this checkout; then build its bridge:)
    (cd /tmp/base && PYO3_PYTHON=$OLDPWD/.venv/bin/python cargo build --release -p ipc_bridge \\
        && cp target/release/lib_ipc_bridge.so remotemedia/_ipc_bridge.cpython-311-x86_64-linux-gnu.so)
    python bench/ab.py --base /tmp/base --size 6220800 --pairs 10

    # media dicts against bare arrays, same runtime:
    python bench/ab.py --dict --size 4096 --pairs 15

Why pairs: this machine's speed moves by a third between runs seconds apart (other tenants,
steal time), more than most changes we measure. The two runs of a pair are seconds apart and
take turns going first, so the ratio within a pair is mostly the variants' difference; the
median of the ratios with its confidence interval (from the order statistics, no assumption
about their distribution) says whether a difference is there. A target is met when the
interval clears it, not the median alone.

Each run is one child process (`--child`) importing the runtime of its tree (PYTHONPATH, so
the workers it spawns do too) and the pipeline of *this* bench/run.py, so both variants run
the same nodes. A run measures latency paced (bench/run.py's pacing for the size) and the
rate back to back.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from stats import median_ci  # noqa: E402

#: What a run reports, and whether more is better.
KEYS = {"fps_thr": True, "hop_p50_us": False, "hop_p99_us": False}


def child(args: argparse.Namespace) -> None:
    # (first: bench/run.py puts this checkout first on sys.path)
    import remotemedia
    import supervisor

    tree = os.path.realpath(os.environ["RM_AB_TREE"])
    for package in (remotemedia, supervisor):
        if not os.path.realpath(package.__file__).startswith(tree + os.sep):
            raise SystemExit(f"ab child: {package.__name__} came from {package.__file__}, not from {tree}")
    import run as bench

    n_lat, interval, n_thr = bench.counts(args.size, False)
    got = bench.run_system("remotemedia_dict" if args.as_dict else "remotemedia", args.size, args.n_lat or n_lat, interval, args.n_thr or n_thr)
    if "error" in got:
        raise SystemExit(f"ab child: {got['error']}")
    print(json.dumps({k: got[k] for k in KEYS}))


def describe(tree: str, as_dict: bool) -> str:
    """A variant as the report names it: its checkout, commit and frames."""
    rev = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return f"{tree} at {rev or '?'}{' (modified)' if dirty else ''}, {'media dicts' if as_dict else 'bare arrays'}"


def one_run(tree: str, size: int, as_dict: bool, n_lat: Optional[int], n_thr: Optional[int]) -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=tree, RM_AB_TREE=tree)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size)]
    cmd += ["--dict"] if as_dict else []
    cmd += ["--n-lat", str(n_lat)] if n_lat else []
    cmd += ["--n-thr", str(n_thr)] if n_thr else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"run in {tree} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="the other checkout (built bridge in its remotemedia/): B is this checkout, A that one")
    ap.add_argument("--dict", dest="as_dict", action="store_true", help="B: media dicts, A: bare arrays (same tree; or with --base, dicts on both sides)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--n-lat", type=int, help="paced frames per run (default bench/run.py's for the size)")
    ap.add_argument("--n-thr", type=int, help="back-to-back frames per run (default bench/run.py's for the size)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="where <stamp>-ab-<size>.json and .md go (default bench/results)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.base and not args.as_dict:
        ap.error("nothing to compare: give --base DIR (another checkout) and/or --dict (dicts against bare arrays)")
    if args.base and not os.path.isdir(os.path.join(args.base, "remotemedia")):
        ap.error(f"--base {args.base}: no remotemedia/ package there (a checkout of this repository, bridge built)")
    if args.base and not glob.glob(os.path.join(args.base, "remotemedia", "_ipc_bridge*.so")):
        ap.error(f"--base {args.base}: its bridge is not built (no remotemedia/_ipc_bridge*.so): build it as this script's docstring shows")
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")
    a = (args.base or ROOT, args.as_dict and bool(args.base))
    b = (ROOT, args.as_dict)
    label = f"B = {describe(*b)}, A = {describe(*a)}"
    lines: List[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    say(f"{label}; {args.size} B frames, {args.pairs} pairs, ratios B/A")
    pairs: List[Dict[str, Any]] = []
    for i in range(args.pairs):
        order = [("A", a), ("B", b)] if i % 2 == 0 else [("B", b), ("A", a)]
        got = {name: one_run(tree, args.size, d, args.n_lat, args.n_thr) for name, (tree, d) in order}
        ratios = {k: got["B"][k] / got["A"][k] for k in KEYS if got["A"][k]}
        pairs.append({"A": got["A"], "B": got["B"], "ratio": ratios})
        say(f"  pair {i + 1:2d}: " + "  ".join(f"{k} {got['A'][k]:9.1f} -> {got['B'][k]:9.1f} ({ratios[k]:.2f})" for k in KEYS if k in ratios))
    summary = {}
    say("")
    say("B/A by pair (for fps_thr higher is better, for latency lower):")
    for k in KEYS:
        rs = [p["ratio"][k] for p in pairs if k in p["ratio"]]
        if not rs:
            continue
        med, lo, hi, cov = median_ci(rs)
        summary[k] = {"median": med, "low": lo, "high": hi, "coverage": cov, "min": min(rs), "max": max(rs)}
        say(f"  {k:11s} median {med:.3f}  [{lo:.3f}, {hi:.3f}] ({cov:.1%} interval)  range {min(rs):.2f}-{max(rs):.2f}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{time.strftime('%Y%m%d-%H%M%S')}-ab-{args.size}{'-dict' if args.as_dict else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"label": label, "base": args.base, "size": args.size, "pairs": pairs, "summary": summary}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"`python bench/ab.py {' '.join(sys.argv[1:])}`\n\n```\n" + "\n".join(lines) + "\n```\n")
    print(f"\n{stem}.json, .md")


if __name__ == "__main__":
    main()
