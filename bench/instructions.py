"""Instructions per frame of one stage of bench/run.py's pipeline (source -> 3 pass-through
stages -> sink), counted by valgrind's callgrind: a measure this machine's noise does not move.

    python bench/instructions.py                       # 4 KiB bare arrays and media dicts, stage s2
    python bench/instructions.py --kinds dict --size 64 --frames 500,3000
    python bench/instructions.py --stage sink --keep /tmp/cg   # the sink; keep the outputs

Timings on these shared VMs swing by a third from run to run and they have no hardware
counters (`perf stat` cannot count instructions), so a change of a few hundred instructions
per frame is invisible to bench/run.py and bench/ab.py. Here one worker (``--stage``) runs
under callgrind while the others run normally; it is the slowest by far, so its input is
always waiting and it rarely spins. Each kind runs twice, with N1 and N2 frames, and
``(count(N2) - count(N1)) / (N2 - N1)`` is the count per frame (start-up cancels out).

Reported per frame: the stage's total (which still includes some waiting, and threads such as
OpenBLAS's idle pool: a few hundred instructions of noise), and the inclusive counts of taking
a frame (``Subscriber::take_frame``: receive, decode) and sending one
(``StageLoop::send_result``: encode, copy, retain, notify), which do not wait. Needs valgrind
(``apt-get install valgrind``); each run takes ~20 s. The measured worker goes without
``die_with_parent`` (valgrind refuses the prctl) and workers start with ``spawn``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(1, HERE)

#: What the report names, and the function (inclusive count) it stands for.
PARTS = {"take": "Subscriber::take_frame", "send": "StageLoop::send_result"}

WRAPPER = """#!/bin/bash
# (the workers' python: the one named {stage} runs under callgrind)
prev=""
for a in "$@"; do
  if [ "$prev" = "--name" ] && [ "$a" = "{stage}" ]; then
    export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}}
    exec valgrind --tool=callgrind --callgrind-out-file="$RM_CALLGRIND_OUT" {python} "$@" 2>>"$RM_CALLGRIND_OUT.log"
  fi
  prev=$a
done
exec {python} "$@"
"""

SITECUSTOMIZE = """# (valgrind refuses prctl(PR_SET_PDEATHSIG): the measured worker goes without it)
from remotemedia import _ipc_bridge
_ipc_bridge.die_with_parent = lambda *a: True
"""


def one_run(kind: str, size: int, frames: int, stage: str, out: str) -> None:
    """The pipeline with ``frames`` frames of ``kind``, ``stage`` counted into ``out``."""
    import run as bench

    from remotemedia import Supervisor

    os.environ["RM_CALLGRIND_OUT"] = out
    nodes = bench.copy_pipeline(frames, size, kind == "dict", 0.2)
    # (generous deadlines: the counted worker runs ~50x slower)
    sup = Supervisor(nodes, queue_depth=bench.QUEUE, control=False, start_method="spawn", init_timeout=600, heartbeat_timeout=600)
    report = sup.run()
    got = len(report.outputs[0]["lat"])
    if got != frames:
        raise SystemExit(f"instructions: {got} of {frames} frames arrived")
    if not os.path.exists(out):
        raise SystemExit(f"instructions: no callgrind output from {stage!r} (its log: {out}.log)")


def counts(path: str) -> Dict[str, int]:
    """The total and the inclusive count of each of PARTS in a callgrind output."""
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", path], capture_output=True, text=True, check=True
    ).stdout
    got: Dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if not m:
            continue
        n, what = int(m.group(1).replace(",", "")), m.group(2)
        if what.startswith("PROGRAM TOTALS"):
            got["total"] = n
        for part, fn in PARTS.items():
            if fn in what:
                got[part] = max(got.get(part, 0), n)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="bare,dict", help="bare (arrays) and/or dict (media dicts), comma-separated")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes (default 4096)")
    ap.add_argument("--frames", default="500,3000", help="N1,N2: frames of the two runs of each kind (default 500,3000)")
    ap.add_argument("--stage", default="s2", help="the worker counted (default s2, the middle stage)")
    ap.add_argument("--keep", metavar="DIR", help="keep the callgrind outputs in DIR (KIND-FRAMES.out), for callgrind_annotate")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "FRAMES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, frames, out = args.child
        sys.executable = os.environ["RM_WORKER_PYTHON"]  # (spawned workers start with it)
        one_run(kind, args.size, int(frames), args.stage, out)
        return 0
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ("bare", "dict") for k in kinds):
        ap.error(f"--kinds {args.kinds!r}: bare and/or dict")
    try:
        n1, n2 = (int(x) for x in args.frames.split(","))
    except ValueError:
        ap.error(f"--frames {args.frames!r}: two frame counts, N1,N2")
    if not 0 < n1 < n2:
        ap.error(f"--frames {args.frames!r}: 0 < N1 < N2")
    if args.stage not in ("source", "s1", "s2", "s3", "sink"):
        ap.error(f"--stage {args.stage!r}: one of source, s1, s2, s3, sink")
    missing = [tool for tool in ("valgrind", "callgrind_annotate") if shutil.which(tool) is None]
    if missing:
        print(f"instructions: {', '.join(missing)} not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="rm-instructions-") as tmp:
        site = os.path.join(tmp, "site")
        os.mkdir(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        wrapper = os.path.join(tmp, "python")
        with open(wrapper, "w") as f:
            f.write(WRAPPER.format(stage=args.stage, site=site, python=sys.executable))
        os.chmod(wrapper, 0o755)
        per: Dict[str, Dict[str, float]] = {}
        for kind in kinds:
            got: List[Dict[str, int]] = []
            for frames in (n1, n2):
                out = os.path.join(tmp, f"{kind}-{frames}.out")
                cmd = [sys.executable, os.path.abspath(__file__), "--size", str(args.size), "--stage", args.stage, "--child", kind, str(frames), out]
                subprocess.run(cmd, check=True, env=dict(os.environ, RM_WORKER_PYTHON=wrapper), timeout=1800)
                got.append(counts(out))
                if args.keep:
                    os.makedirs(args.keep, exist_ok=True)
                    shutil.copy(out, os.path.join(args.keep, f"{kind}-{frames}.out"))
            a, b = got
            per[kind] = {k: (b[k] - a.get(k, 0)) / (n2 - n1) for k in b}
            print(f"{kind:5s} {args.size} B, stage {args.stage}: " + "  ".join(f"{k} {v:7.0f}" for k, v in per[kind].items()) + "  instructions per frame", flush=True)
        if len(per) == 2:
            d, bare = per["dict"], per["bare"]
            print("dict - bare: " + "  ".join(f"{k} {d[k] - bare.get(k, 0):+7.0f}" for k in d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
