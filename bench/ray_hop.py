"""The cross-host hop of backend ray, next to a plain Ray actor chain, in the same run.

    python bench/ray_hop.py            # ~2 min on 2 cores; as root it enters a private
    python bench/ray_hop.py --quick    # network namespace itself (unshare -n), see below

A 2-node Ray cluster on this machine (``ray.cluster_utils.Cluster``; nodes labelled
``remotemedia.host=head`` and ``remotemedia.host=gpu``), and the same shape twice:

    remotemedia   driver --> a (head) --> b (gpu) --> driver     send+recv, backend="ray":
                  a and b are pass-through nodes in worker processes, a under the driver's
                  own part (iceoryx2 from the caller), b under the gpu host's HostAgent;
                  a -> b and b -> the caller are cut edges (a push, a pull: Ray calls)
    ray           driver --> A (head) --> B (gpu) --> driver     B.f.remote(A.f.remote(x)),
                  two pass-through actors placed by the same labels

Both are alive for the whole run and measured in alternating rounds (the host's load moves:
each round weighs on both alike), at 4 KiB and 6.2 MB (a 1080p RGB frame):
    latency     one frame at a time: send, receive, repeat; p50 and p99 round trip (600
                frames of 4 KiB, 240 of 6.2 MB per chain)
    throughput  N frames streamed (ray: at most 16 chains in flight); frames/s and MB/s
    parts       where a lone frame's time goes: one Ray actor call to each host's actor and
                back, and one local-backend hop (caller -> pass-through worker -> caller,
                iceoryx2), each alone, in alternating rounds with both chains again

Ratios are remotemedia / ray of the same run (these machines are shared and noisy: only
ratios within one run mean anything). Ray talks on 127.0.0.1 only: the bench runs inside a
private network namespace whose only interface is loopback (as root it makes one with
``unshare -n``). Results go to bench/results/ray-<stamp>.json and ray-latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "bench"))

from stats import paired_summary  # noqa: E402  (bench/stats.py)

LABEL = "remotemedia.host"
SIZES = {"4 KiB": 4096, "6.2 MB": 1920 * 1080 * 3}
#: Chains the plain Ray baseline keeps in flight when streaming.
IN_FLIGHT = 16


def _private_network() -> bool:
    try:
        with open("/proc/net/dev") as f:
            return [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]
    except OSError:
        return False


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _frame(size: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)


class _Running:
    """A started Supervisor (``self.sup``, made by ``__enter__``): closed on exit; ``one()``
    is a frame's round trip through it."""

    sup: Any

    def __exit__(self, *exc: Any) -> None:
        self.sup.close()
        self.sup.join(60)

    def one(self, frame: np.ndarray) -> None:
        self.sup.send(frame)
        self.sup.recv(timeout=120)


class _Ours(_Running):
    """Backend ray: ``a`` in a worker of the driver's host's part, ``b`` under the gpu
    host's agent; a -> b and b -> the caller are cut edges (Ray calls)."""

    name = "remotemedia"

    def __enter__(self) -> "_Ours":
        from remotemedia import Pipeline, Supervisor
        from remotemedia.nodes import PassThroughNode

        p = Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b", options={"host": "gpu"})], name="hop")
        self.sup = Supervisor(p, backend="ray", control=False).start()
        return self

    def stream(self, frame: np.ndarray, n: int) -> None:
        def feed() -> None:
            for _ in range(n):
                self.sup.send(frame)

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        for _ in range(n):
            self.sup.recv(timeout=120)
        t.join()


class _Plain:
    """Two pass-through Ray actors placed by the same labels: ``B.f.remote(A.f.remote(x))``."""

    name = "ray"

    def __enter__(self) -> "_Plain":
        import ray

        @ray.remote(num_cpus=0)
        class Stage:
            def f(self, x: Any) -> Any:
                return x

        self.a = Stage.options(label_selector={LABEL: "head"}).remote()
        self.b = Stage.options(label_selector={LABEL: "gpu"}).remote()
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        ray.kill(self.a)
        ray.kill(self.b)

    def one(self, frame: np.ndarray) -> None:
        import ray

        ray.get(self.b.f.remote(self.a.f.remote(frame)))

    def stream(self, frame: np.ndarray, n: int) -> None:
        import ray

        pending: List[Any] = []
        for _ in range(n):
            if len(pending) >= IN_FLIGHT:
                ray.get(pending.pop(0))
            pending.append(self.b.f.remote(self.a.f.remote(frame)))
        ray.get(pending)


class _RayCall:
    """A part: one Ray actor call from the driver to the plain chain's actor on ``host``
    and back (``X.f.remote(x)``, waited for): two Ray messages and the call's overhead."""

    def __init__(self, plain: _Plain, host: str) -> None:
        self.name = f"ray call to {host}"
        self.actor = plain.a if host == "head" else plain.b

    def one(self, frame: np.ndarray) -> None:
        import ray

        ray.get(self.actor.f.remote(frame))


class _LocalHop(_Running):
    """A part: one pass-through node on the local backend (caller -> worker -> caller over
    iceoryx2), the hop each host's part adds around a Ray message."""

    name = "local iceoryx2 hop"

    def __enter__(self) -> "_LocalHop":
        from remotemedia import Pipeline, Supervisor
        from remotemedia.nodes import PassThroughNode

        self.sup = Supervisor(Pipeline([PassThroughNode(name="p")], name="hop-local"), control=False).start()
        return self


def measure(systems: List[Any], size: int, n_ping: int, n_stream: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Latency and throughput of each system at ``size``, in ``rounds`` alternating rounds
    (so that the host's load, which moves, weighs on every system alike)."""
    frame = _frame(size)
    rtt: Dict[str, List[float]] = {s.name: [] for s in systems}
    busy: Dict[str, float] = {s.name: 0.0 for s in systems}
    # (each round's p50 and rate too: the ratios' spread across rounds shows the noise)
    round_p50: Dict[str, List[float]] = {s.name: [] for s in systems}
    round_fps: Dict[str, List[float]] = {s.name: [] for s in systems}
    per_round = max(1, n_stream // rounds)  # (frames each system streams per round)
    for s in systems:
        for _ in range(5):
            s.one(frame)
    for r in range(rounds):
        order = systems if r % 2 == 0 else systems[::-1]
        for s in order:
            this: List[float] = []
            for _ in range(max(1, n_ping // rounds)):
                t0 = time.perf_counter()
                s.one(frame)
                this.append(time.perf_counter() - t0)
            rtt[s.name] += this
            round_p50[s.name].append(_pct(this, 0.5) * 1e3)
        for s in order:
            if n_stream and hasattr(s, "stream"):
                t0 = time.perf_counter()
                s.stream(frame, per_round)
                took = time.perf_counter() - t0
                busy[s.name] += took
                round_fps[s.name].append(per_round / took)
    out: Dict[str, Dict[str, float]] = {}
    for s in systems:
        xs, n = rtt[s.name], per_round * rounds
        out[s.name] = {
            "p50_ms": _pct(xs, 0.5) * 1e3,
            "p99_ms": _pct(xs, 0.99) * 1e3,
            "frames_latency": len(xs),
            "round_p50_ms": round_p50[s.name],
            "round_fps": round_fps[s.name],
        }
        if busy[s.name]:
            out[s.name].update(fps=n / busy[s.name], MBps=n * size / busy[s.name] / 1e6, frames_stream=n)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer frames (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only, write no results file")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6; the frames are split among them)")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"frames to measure, of: {', '.join(SIZES)} (default all)")
    ap.add_argument("--no-parts", action="store_true", help="skip the parts of a lone frame's time")
    args = ap.parse_args()
    sizes = {label.strip(): SIZES.get(label.strip()) for label in args.sizes.split(",")}
    unknown = [label for label, size in sizes.items() if size is None]
    if unknown:
        ap.error(f"--sizes: unknown {', '.join(map(repr, unknown))}; choose among {', '.join(map(repr, SIZES))}")
    if args.rounds < 2:
        ap.error("--rounds: at least 2 (the chains take turns going first)")
    if not _private_network():
        if os.geteuid() != 0:
            print("run inside a private network namespace (as root: this script enters one itself)", file=sys.stderr)
            return 2
        cmd = "ip link set lo up && exec " + shlex.join([sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
        return subprocess.call(["unshare", "-n", "--", "bash", "-c", cmd])

    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    common = dict(num_cpus=1, object_store_memory=400 << 20, node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(common, labels={LABEL: "head"}, include_dashboard=False))
    cluster.add_node(**common, labels={LABEL: "gpu"})
    ray.init(address=cluster.address, log_to_driver=False)
    results: Dict[str, Any] = {"stamp": time.strftime("%Y%m%d-%H%M%S"), "ray": ray.__version__, "cpus": os.cpu_count(), "sizes": {}, "parts": {}}
    try:
        with _Ours() as ours, _Plain() as plain:
            for label, size in sizes.items():
                big = size > 1 << 20
                # (p99 of 60 lone frames was their slowest one: one stall of the shared
                # machine, which hits either chain at random, decided it; of 240, the third)
                n_ping = (10 if big else 60) if args.quick else (240 if big else 600)
                n_stream = (20 if big else 300) if args.quick else (120 if big else 3000)
                got = measure([ours, plain], size, n_ping, n_stream, rounds=2 if args.quick else args.rounds)
                results["sizes"][label] = {"bytes": size, **got}
                for name, r in got.items():
                    print(f"{label:7s} {name:12s} {r}", flush=True)
            # Where a lone frame's time goes: the parts, measured alone, alternating with the
            # two chains again (p50s; latency only)
            with _LocalHop() as hop:
                parts = [ours, plain, _RayCall(plain, "head"), _RayCall(plain, "gpu"), hop]
                for label, size in ({} if args.no_parts else sizes).items():
                    big = size > 1 << 20
                    n_ping = (10 if big else 60) if args.quick else (40 if big else 300)
                    got = measure(parts, size, n_ping, 0, rounds=2 if args.quick else 4)
                    results["parts"][label] = {name: r["p50_ms"] for name, r in got.items()}
                    print(f"{label:7s} parts (p50 ms) {results['parts'][label]}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    lines = [
        f"# The cross-host hop (backend ray) next to a plain Ray actor chain, {results['stamp']}",
        "",
        f"`python bench/ray_hop.py`: Ray {results['ray']}, a 2-node cluster on one {results['cpus']}-core machine "
        "(both \"hosts\" share the cores), driver -> a (head) -> b (gpu) -> driver in both systems. "
        "Ratio: remotemedia / ray (latency: lower is better; throughput: higher is better).",
        "",
        "| frame | measure | remotemedia | plain Ray actor chain | ratio | ratios round by round: median [confidence interval], range |",
        "|---|---|---|---|---|---|",
    ]

    def spread(a: List[float], b: List[float]) -> str:
        return paired_summary([x / y for x, y in zip(a, b) if y])

    for label, r in results["sizes"].items():
        rm, rr = r["remotemedia"], r["ray"]
        p50s, fpss = spread(rm["round_p50_ms"], rr["round_p50_ms"]), spread(rm["round_fps"], rr["round_fps"])
        lines.append(f"| {label} | latency p50 | {rm['p50_ms']:.2f} ms | {rr['p50_ms']:.2f} ms | {rm['p50_ms'] / rr['p50_ms']:.2f} | {p50s} |")
        lines.append(f"| {label} | latency p99 | {rm['p99_ms']:.2f} ms | {rr['p99_ms']:.2f} ms | {rm['p99_ms'] / rr['p99_ms']:.2f} | |")
        lines.append(
            f"| {label} | throughput | {rm['fps']:.0f} frames/s ({rm['MBps']:.0f} MB/s) | {rr['fps']:.0f} frames/s "
            f"({rr['MBps']:.0f} MB/s) | {rm['fps'] / rr['fps']:.2f} | {fpss} |"
        )
    lines += [
        "",
        "Where a lone frame's time goes (p50 in ms of each part measured alone, in alternating rounds with both chains "
        "again; remotemedia's rest: its hop minus one Ray call to gpu and two local hops, i.e. its threads' hand-offs "
        "and the Ray call made from them):",
        "",
        "| frame | remotemedia | plain chain | Ray call to head | Ray call to gpu | local iceoryx2 hop | remotemedia's rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, p in results["parts"].items():
        rest = p["remotemedia"] - p["ray call to gpu"] - 2 * p["local iceoryx2 hop"]
        lines.append(
            f"| {label} | {p['remotemedia']:.2f} | {p['ray']:.2f} | {p['ray call to head']:.2f} | {p['ray call to gpu']:.2f} "
            f"| {p['local iceoryx2 hop']:.2f} | {rest:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        out_dir = os.path.join(ROOT, "bench", "results")
        with open(os.path.join(out_dir, f"ray-{results['stamp']}.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(out_dir, "ray-latest.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
