"""Per-node figures for status, metrics and systemd: frames/s, latency, RSS, CPU, queues.

The supervisor samples every worker about twice a second with psutil (RSS, CPU% and CPU
seconds) and its scoreboard (frame counters), and keeps the latest ``process()`` latency
summary and histogram each worker sends with its heartbeat. Counters are summed over a
node's restarts (:class:`WorkerSampler`). :func:`build_status` turns that into the dict
served by the control socket and printed by ``remotemedia-supervisor status``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import psutil

from .stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:  # pragma: no cover
    from .arbiter import Snapshot

__all__ = ["WorkerSampler", "build_status", "format_table"]


class WorkerSampler:
    """Rates and resource use of one worker process, and its counters summed over restarts.

    A restarted worker counts from 0 again (frames, CPU time, latency histogram, drops):
    what a dead incarnation had counted goes into a per-node base, so that the totals in
    ``status`` and the ``_total`` metrics never go down.
    """

    def __init__(self) -> None:
        self.proc: Optional[psutil.Process] = None
        self.pid: Optional[int] = None
        self.last_t = 0.0
        self.last_in = 0
        self.last_out = 0
        self.fps_in = 0.0
        self.fps_out = 0.0
        self.rss: Optional[int] = None
        self.cpu: Optional[float] = None
        self.total_in = 0  # counters carried over restarts
        self.total_out = 0
        self.cpu_seconds = 0.0
        self._base_in = 0
        self._base_out = 0
        self._base_cpu = 0.0
        # Heartbeat figures: (base latency counts, base sum_ns, base drops per edge, the
        # latest histogram, the latest drops per edge), base = the sum over the incarnations
        # before the one that reported last. One tuple, replaced whole: status is read from
        # other threads (metrics, control socket), and a reader that saw a new base next to
        # the old latest figures would count an incarnation twice.
        self._stats_of: Optional[int] = None
        self._heartbeat: Tuple[List[int], int, Dict[int, int], Dict[str, Any], Dict[int, int]] = (
            [0] * (len(LATENCY_BUCKETS_S) + 1),
            0,
            {},
            {},
            {},
        )

    def sample(self, pid: Optional[int], frames_in: int, frames_out: int) -> None:
        now = time.monotonic()
        if pid != self.pid:
            # a new process: its counters restart at 0
            self._base_in, self._base_out = self.total_in, self.total_out
            self._base_cpu = self.cpu_seconds
            self.last_in = self.last_out = 0
            self.pid = pid
            self.proc = None
            self.last_t = now
            if pid is not None:
                try:
                    self.proc = psutil.Process(pid)
                    self.proc.cpu_percent(None)
                except psutil.Error:
                    self.proc = None
        self.total_in = self._base_in + frames_in
        self.total_out = self._base_out + frames_out
        dt = now - self.last_t
        if dt >= 0.5:
            self.fps_in = max(0.0, (frames_in - self.last_in) / dt)
            self.fps_out = max(0.0, (frames_out - self.last_out) / dt)
            self.last_in, self.last_out, self.last_t = frames_in, frames_out, now
            if self.proc is not None:
                try:
                    with self.proc.oneshot():
                        self.rss = self.proc.memory_info().rss
                        self.cpu = self.proc.cpu_percent(None)
                        t = self.proc.cpu_times()
                    # (max: a reading must never take the counter back)
                    self.cpu_seconds = max(self.cpu_seconds, self._base_cpu + t.user + t.system)
                except psutil.Error:
                    self.rss = self.cpu = None
        if pid is None:
            self.fps_in = self.fps_out = 0.0
            self.rss = self.cpu = None

    def take_stats(self, incarnation: int, stats: Dict[str, Any]) -> None:
        """The stats a worker reported (Heartbeat, Done); ``incarnation`` tells its processes
        apart. The first report of a new process moves the last one of the previous process
        into the base: until then the old figures still count, so the sum never dips."""
        counts, sum_ns, dropped, cur_lat, cur_drop = self._heartbeat
        if incarnation != self._stats_of:
            counts = list(counts)
            for i, c in enumerate(cur_lat.get("counts") or ()):
                counts[i] += c
            sum_ns += cur_lat.get("sum_ns", 0)
            dropped = dict(dropped)
            for e, n in cur_drop.items():
                dropped[e] = dropped.get(e, 0) + n
            self._stats_of = incarnation
        latency = stats.get("latency_histogram") or {}
        drops = {int(e): s.get("dropped", 0) for e, s in (stats.get("edges_in") or {}).items()}
        self._heartbeat = (counts, sum_ns, dropped, latency, drops)

    def latency_histogram(self) -> Dict[str, Any]:
        """process() latency of every incarnation: ``le_s`` (the bucket bounds),
        ``cumulative`` (frames <= each bound), ``count`` (all frames, the +Inf bucket) and
        ``sum_s``. Plain JSON (no infinity), for the status dict."""
        base, sum_ns, _, cur, _ = self._heartbeat
        counts = list(base)
        for i, c in enumerate(cur.get("counts") or ()):
            counts[i] += c
        cumulative, run = [], 0
        for c in counts:
            run += c
            cumulative.append(run)
        return {
            "le_s": list(LATENCY_BUCKETS_S),
            "cumulative": cumulative[:-1],
            "count": run,
            "sum_s": (sum_ns + cur.get("sum_ns", 0)) / 1e9,
        }

    def dropped(self, edge: int) -> int:
        """Frames dropped on input edge ``edge`` by every incarnation of its consumer."""
        _, _, base, _, cur = self._heartbeat
        return base.get(edge, 0) + cur.get(edge, 0)


def build_status(sup: "Snapshot") -> Dict[str, Any]:
    """Everything ``status`` shows, as plain JSON-able data, from a snapshot of the run."""
    nodes: Dict[str, Any] = {}
    in_flight: Dict[int, int] = dict(sup.in_flight)
    for w in sup.workers.values():
        for e, s in (w.stats.get("edges_out") or {}).items():
            in_flight[int(e)] = s.get("in_flight", 0)
    for name, w in sup.workers.items():
        sm = w.sampler
        lat = w.stats.get("latency") or {}
        nodes[name] = {
            "state": w.state.value,
            "pid": w.pid if w.alive else None,
            "restarts": w.restarts,
            "replacements": w.replacements,
            "frames_in": sm.total_in,
            "frames_out": sm.total_out,
            "fps_in": round(sm.fps_in, 2),
            "fps_out": round(sm.fps_out, 2),
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
            "rss_bytes": sm.rss,
            "cpu_percent": sm.cpu,
            "cpu_seconds": round(sm.cpu_seconds, 3),
            "latency_histogram": sm.latency_histogram(),
            "dead_letters": w.dead_letters,
            "memory_kills": w.memory_kills,
            "hang_kills": w.hang_kills,
            "inputs": [
                {
                    "edge": e.index,
                    "from": e.src,
                    "policy": e.policy,
                    "depth": e.depth,
                    "queued": in_flight.get(e.index, 0),
                    "dropped": sm.dropped(e.index),
                }
                for e in w.spec.in_edges
            ],
        }
    return {
        "name": sup.name,
        "pid": _os_getpid(),
        "run_id": sup.run_id,
        "phase": sup.phase,
        "uptime_s": round(time.monotonic() - (sup.started_at or time.monotonic()), 3),
        "workers_up": sum(1 for w in sup.workers.values() if w.alive and w.state.value == "RUNNING"),
        "workers": len(sup.workers),
        "launcher": dict(sup.launcher),
        "nodes": nodes,
    }


def _os_getpid() -> int:
    import os

    return os.getpid()


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def format_table(status: Dict[str, Any]) -> str:
    """The human view of one status dict."""
    lines = [
        f"{status['name']}  (supervisor pid {status['pid']}, {status['phase']}, up {status['uptime_s']:.0f} s, "
        f"{status['workers_up']}/{status['workers']} workers up)"
    ]
    width = max([4, *(len(name) for name in status["nodes"])])  # whole names: they are how nodes are addressed
    # backend ray: a host column (each host's agent runs its nodes)
    hosts = "hosts" in status
    hw = max([4, *(len(str(n.get("host"))) for n in status["nodes"].values())]) if hosts else 0
    host_head = f"{'host':<{hw}} " if hosts else ""
    head = f"  {'node':<{width}} {host_head}{'state':<9} {'pid':>7} {'rst':>4} {'in':>9} {'out':>9} {'fps':>8} {'p50ms':>8} {'p99ms':>8} {'rss MiB':>8} {'cpu%':>6}  inputs (queued/depth drops)"
    lines.append(head)
    for name, n in status["nodes"].items():
        rss = None if n["rss_bytes"] is None else n["rss_bytes"] / 2**20
        inputs = ", ".join(f"{i['from']}:{i['queued']}/{i['depth']} {i['dropped']}" for i in n["inputs"])
        host_cell = f"{str(n.get('host')):<{hw}} " if hosts else ""
        lines.append(
            f"  {name:<{width}} {host_cell}{n['state']:<9} {_fmt(n['pid']):>7} {n['restarts']:>4} {n['frames_in']:>9} {n['frames_out']:>9} "
            f"{n['fps_out']:>8.1f} {_fmt(n['p50_ms'], '.3f'):>8} {_fmt(n['p99_ms'], '.3f'):>8} {_fmt(rss, '.1f'):>8} {_fmt(n['cpu_percent'], '.1f'):>6}  {inputs}"
        )
    return "\n".join(lines)
