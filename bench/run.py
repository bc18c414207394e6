"""Benchmark suite: remotemedia against its baselines, in one run on one machine.

    python bench/run.py                 # full run, ~10 min on 2 cores
    python bench/run.py --quick         # fewer frames, ~3 min
    python bench/run.py --sizes 64,4096 --systems remotemedia,mp_queue

Every system runs the same pipeline, one process per stage:

    source -> stage 1 -> stage 2 -> stage 3 -> sink        (4 hops)

Systems:
    remotemedia         this runtime; stages return their input (one copy per hop into the
                        next shared-memory chunk; receiving is zero-copy)
    remotemedia_loaned  this runtime; source and stages write their output in place with
                        Node.allocate() (no copy at all: the transport floor)
    mp_queue            multiprocessing.Queue, numpy frames pickled
    iox_raw             hand-written loop over the iceoryx2 Python bindings: receive, loan,
                        memcpy, send, notify; blocking Listener wait
    shm_pipe            multiprocessing.shared_memory ring per edge, os.pipe notifications

Payloads: 64 B, 4 KiB (audio chunk), 6,220,800 B (1080p RGB), 64 MiB (tensor).

Measured:
    latency     frames paced so the pipeline is empty between them; source timestamp (in the
                first 8 bytes of the payload, CLOCK_MONOTONIC) to sink; per hop = end to end / 4
    throughput  frames sent back to back; frames/s and GB/s at the sink
    cpu         CPU% of each stage process while idle (2 s, no frames) and while loaded
    flatness    remotemedia_loaned at 4 KiB, 6.2 MB and 64 MiB, all paced at 20 ms (the main
                table paces each size differently, which confounds size with idleness)
    group       the 3 stages as one Group (one worker, 2 hops) against one worker each
    ready       Supervisor start() to every worker READY, 10 pass-through nodes, per start_method
                (bench/startup.py: 10 and 100 nodes, with memory and watchdog kills)
    serialize   serialize_node() time for a typical node (config + lambda) and a 10 MB model

Results: a table with ratios against each baseline on stdout, and bench/results/<stamp>.json,
.md and latency.png (latency vs payload size).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import platform
import statistics
import struct
import sys
import time
from multiprocessing import shared_memory
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from remotemedia import Group, Node, Source, Supervisor  # noqa: E402
from remotemedia.nodes import MapNode, PassThroughNode  # noqa: E402
from remotemedia.serialization import serialize_node  # noqa: E402

SIZES = [64, 4096, 1080 * 1920 * 3, 64 << 20]
SYSTEMS = ["remotemedia", "remotemedia_loaned", "mp_queue", "iox_raw", "shm_pipe"]
BASELINES = ["mp_queue", "iox_raw", "shm_pipe"]
HOPS = 4
STAMP = struct.Struct("<q")


def stamp_bytes(t: int) -> np.ndarray:
    # (no module-level Struct in node code: the nodes are cloudpickled by value from __main__)
    return np.frombuffer(int(t).to_bytes(8, "little", signed=True), np.uint8)


def read_stamp(a: Any) -> int:
    return int.from_bytes(bytes(a[:8]), "little", signed=True)
IDLE_S = 2.0


def counts(size: int, quick: bool) -> Tuple[int, float, int]:
    """(latency frames, pacing interval s, throughput frames) for a payload size."""
    if size <= 4096:
        c = (1000, 0.002, 20000)
    elif size <= 8 << 20:
        c = (150, 0.02, 300)
    else:
        c = (30, 0.25, 40)
    if quick:
        c = (max(20, c[0] // 4), c[1], max(20, c[2] // 4))
    return c


def now() -> int:
    return time.monotonic_ns()


# ============================================================================ remotemedia


class BenchSource(Source):
    def __init__(self, n: int, size: int, interval: float, loaned: bool, idle: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.n, self.size, self.interval, self.loaned, self.idle = n, size, interval, loaned, idle

    def generate(self):
        time.sleep(self.idle)
        frame = np.random.default_rng(1).integers(0, 255, self.size, dtype=np.uint8)
        for _ in range(self.n):
            if self.interval:
                time.sleep(self.interval)
            out = self.allocate(self.size, np.uint8) if self.loaned else frame
            if self.loaned:
                out[8:64] = 1  # produced in place: touch a little, like a decoder would
            out[:8] = stamp_bytes(now())
            yield out


class CopyStage(Node):
    def process(self, data):
        return data  # one copy into the next edge's chunk


class LoanStage(Node):
    def process(self, data):
        out = self.allocate(data.shape, data.dtype)
        out[:64] = data[:64]  # stamp and a cache line; the rest is produced in place
        return out


class BenchSink(Node):
    def initialize(self):
        self.lat: List[int] = []
        self.first: Optional[int] = None
        self.last = 0

    def process(self, data):
        t = now()
        s = read_stamp(data)
        self.lat.append(t - s)
        if self.first is None:
            self.first = s
        self.last = t
        return None

    def flush(self):
        return {"lat": self.lat, "first": self.first, "last": self.last}


def run_remotemedia(
    size: int, n: int, interval: float, loaned: bool, measure_idle: bool, grouped: bool = False
) -> Dict[str, Any]:
    stage = LoanStage if loaned else CopyStage
    nodes: List[Any] = [BenchSource(n, size, interval, loaned, IDLE_S if measure_idle else 0.2, name="source")]
    stages = [stage(name=f"s{i}") for i in range(1, 4)]
    if grouped:  # the three stages in one worker: source -> [s1 s2 s3] -> sink, two hops
        nodes.append(Group(stages, name="s1"))
    else:
        nodes += stages
    nodes += [BenchSink(name="sink")]
    sup = Supervisor(nodes, queue_depth=8, control=False)
    sup.start()
    pids = {k: v for k, v in sup.worker_pids().items()}
    cpu = CpuProbe([pids[k] for k in ("s1", "s2", "s3") if k in pids])
    if measure_idle:
        time.sleep(0.4)
        cpu.mark()
        time.sleep(IDLE_S - 0.8)
        cpu.idle_done()
    cpu.mark()
    report = sup.run()
    cpu.loaded_done()
    (res,) = report.outputs
    return {**summarize(res["lat"], res["first"], res["last"], size), **cpu.result()}


# ============================================================================ baselines (spawned processes)


def _q_source(q, n, size, interval, idle):
    time.sleep(idle)
    frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    for _ in range(n):
        if interval:
            time.sleep(interval)
        frame[:8] = np.frombuffer(STAMP.pack(now()), np.uint8)
        q.put(frame)
    q.put(None)


def _q_stage(qin, qout):
    while True:
        x = qin.get()
        qout.put(x)
        if x is None:
            return


def _q_sink(q, res):
    lat, first, last = [], None, 0
    while True:
        x = q.get()
        if x is None:
            break
        t = now()
        s = STAMP.unpack(x[:8].tobytes())[0]
        lat.append(t - s)
        first = s if first is None else first
        last = t
    res.put({"lat": lat, "first": first, "last": last})


def run_mp_queue(size, n, interval, measure_idle):
    ctx = mp.get_context("spawn")
    qs = [ctx.Queue(maxsize=8) for _ in range(4)]
    res = ctx.Queue()
    idle = IDLE_S if measure_idle else 0.2
    procs = [ctx.Process(target=_q_source, args=(qs[0], n, size, interval, idle))]
    procs += [ctx.Process(target=_q_stage, args=(qs[i], qs[i + 1])) for i in range(3)]
    procs += [ctx.Process(target=_q_sink, args=(qs[3], res))]
    return _run_procs(procs, res, size, measure_idle, stage_slice=slice(1, 4))


def _iox_names(run: str, i: int) -> str:
    return f"bench/{run}/e{i}"


def _iox_open(run: str, size: int):
    import iceoryx2 as iox2

    iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
    cfg = iox2.config.default()
    cfg.global_cfg.prefix = iox2.FileName.new(f"bx{run}_")
    node = iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)
    return iox2, node


def _iox_pubsub(iox2, node, name):
    return (
        node.service_builder(iox2.ServiceName.new(name))
        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
        .max_publishers(1)
        .max_subscribers(1)
        .subscriber_max_buffer_size(8)
        .subscriber_max_borrowed_samples(2)
        .enable_safe_overflow(False)
        .open_or_create()
    )


def _iox_out(iox2, node, name, size):
    svc = _iox_pubsub(iox2, node, name)
    pub = (
        svc.publisher_builder()
        .initial_max_slice_len(max(size, 8))
        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        .create()
    )
    ev = node.service_builder(iox2.ServiceName.new(name)).event().open_or_create()
    return svc, pub, ev.notifier_builder().create()


def _iox_in(iox2, node, name):
    svc = _iox_pubsub(iox2, node, name)
    sub = svc.subscriber_builder().create()
    sub.has_samples()  # attach now: samples sent before the first check would be lost
    ev = node.service_builder(iox2.ServiceName.new(name)).event().open_or_create()
    return svc, sub, ev.listener_builder().create()


def _iox_send(pub, notifier, src_ptr, n):
    s = pub.loan_slice_uninit(n)
    ctypes.memmove(s.payload_ptr, src_ptr, n)
    s.assume_init().send()
    notifier.notify()


def _iox_wait(iox2, sub, listener):
    while True:
        s = sub.receive()
        if s is not None:
            return s
        listener.timed_wait(iox2.Duration.from_millis(100))


def _iox_source(run, n, size, interval, idle, ready):
    iox2, node = _iox_open(run, size)
    keep = _iox_out(iox2, node, _iox_names(run, 0), size)
    _, pub, notifier = keep
    ready.wait()
    pub.update_connections()
    time.sleep(idle)
    frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    for _ in range(n):
        if interval:
            time.sleep(interval)
        frame[:8] = np.frombuffer(STAMP.pack(now()), np.uint8)
        _iox_send(pub, notifier, frame.ctypes.data, size)
    frame[:8] = np.frombuffer(STAMP.pack(-1), np.uint8)
    _iox_send(pub, notifier, frame.ctypes.data, size)
    time.sleep(0.5)


def _iox_stage(run, i, size, ready):
    iox2, node = _iox_open(run, size)
    keep_in = _iox_in(iox2, node, _iox_names(run, i - 1))
    keep_out = _iox_out(iox2, node, _iox_names(run, i), size)
    _, sub, listener = keep_in
    _, pub, notifier = keep_out
    ready.wait()
    pub.update_connections()
    while True:
        s = _iox_wait(iox2, sub, listener)
        n = s.header.number_of_elements
        stop = STAMP.unpack(ctypes.string_at(s.payload_ptr, 8))[0] == -1
        _iox_send(pub, notifier, s.payload_ptr, n)  # the copy of this hop
        s.delete()
        if stop:
            time.sleep(0.5)
            return


def _iox_sink(run, res, ready):
    iox2, node = _iox_open(run, 0)
    keep = _iox_in(iox2, node, _iox_names(run, 3))
    _, sub, listener = keep
    ready.wait()
    lat, first, last = [], None, 0
    while True:
        s = _iox_wait(iox2, sub, listener)
        t = now()
        stamp = STAMP.unpack(ctypes.string_at(s.payload_ptr, 8))[0]
        s.delete()
        if stamp == -1:
            break
        lat.append(t - stamp)
        first = stamp if first is None else first
        last = t
    res.put({"lat": lat, "first": first, "last": last})


def run_iox_raw(size, n, interval, measure_idle):
    ctx = mp.get_context("spawn")
    run = f"{os.getpid()}{int(time.time() * 1000) % 100000}"
    res = ctx.Queue()
    ready = ctx.Barrier(5)
    idle = IDLE_S if measure_idle else 0.2
    procs = [ctx.Process(target=_iox_source, args=(run, n, size, interval, idle, ready))]
    procs += [ctx.Process(target=_iox_stage, args=(run, i, size, ready)) for i in range(1, 4)]
    procs += [ctx.Process(target=_iox_sink, args=(run, res, ready))]
    try:
        return _run_procs(procs, res, size, measure_idle, stage_slice=slice(1, 4))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        _purge_iox_baseline(f"bx{run}_")


def _purge_iox_baseline(prefix: str) -> None:
    """The raw iceoryx2 baseline runs with iceoryx2's defaults (POSIX shared memory in /dev/shm,
    service files under /tmp/iceoryx2), unlike the runtime: remove its files of this run."""
    for d, recursive in (("/dev/shm", False), ("/tmp/iceoryx2", True)):
        for dirpath, _dirs, files in os.walk(d):
            for f in files:
                if f.startswith(prefix):
                    try:
                        os.unlink(os.path.join(dirpath, f))
                    except OSError:
                        pass
            if not recursive:
                break


SLOTS = 8


def _slot(buf, i, size):
    return np.ndarray((size,), np.uint8, buffer=buf, offset=i * max(size, 8))


def _shm_edge(ctx, size):
    """A ring of SLOTS slots plus two pipes: slot indices forward, freed slots back."""
    shm = shared_memory.SharedMemory(create=True, size=max(size, 8) * SLOTS)
    fwd_r, fwd_w = ctx.Pipe(duplex=False)
    back_r, back_w = ctx.Pipe(duplex=False)
    for i in range(SLOTS):
        back_w.send_bytes(bytes([i]))
    return shm, (shm.name, fwd_r, fwd_w, back_r, back_w)


def _shm_source(e, n, size, interval, idle):
    shm = shared_memory.SharedMemory(name=e[0])
    frame = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    time.sleep(idle)
    for k in range(n + 1):
        if interval and k < n:
            time.sleep(interval)
        frame[:8] = np.frombuffer(STAMP.pack(now() if k < n else -1), np.uint8)
        i = e[3].recv_bytes()[0]  # a free slot
        np.copyto(_slot(shm.buf, i, size), frame)
        e[2].send_bytes(bytes([i]))
    shm.close()


def _shm_stage(ein, eout, size):
    sin, sout = shared_memory.SharedMemory(name=ein[0]), shared_memory.SharedMemory(name=eout[0])
    while True:
        i = ein[1].recv_bytes()[0]
        src = _slot(sin.buf, i, size)
        stop = STAMP.unpack(bytes(src[:8]))[0] == -1
        j = eout[3].recv_bytes()[0]
        np.copyto(_slot(sout.buf, j, size), src)  # the copy of this hop
        del src
        ein[4].send_bytes(bytes([i]))
        eout[2].send_bytes(bytes([j]))
        if stop:
            break
    sin.close()
    sout.close()


def _shm_sink(e, res, size):
    shm = shared_memory.SharedMemory(name=e[0])
    lat, first, last = [], None, 0
    while True:
        i = e[1].recv_bytes()[0]
        t = now()
        stamp = STAMP.unpack(bytes(_slot(shm.buf, i, size)[:8]))[0]
        e[4].send_bytes(bytes([i]))
        if stamp == -1:
            break
        lat.append(t - stamp)
        first = stamp if first is None else first
        last = t
    shm.close()
    res.put({"lat": lat, "first": first, "last": last})


def run_shm_pipe(size, n, interval, measure_idle):
    ctx = mp.get_context("spawn")
    edges = [_shm_edge(ctx, size) for _ in range(4)]
    specs = [spec for _, spec in edges]
    res = ctx.Queue()
    idle = IDLE_S if measure_idle else 0.2
    procs = [ctx.Process(target=_shm_source, args=(specs[0], n, size, interval, idle))]
    procs += [ctx.Process(target=_shm_stage, args=(specs[i], specs[i + 1], size)) for i in range(3)]
    procs += [ctx.Process(target=_shm_sink, args=(specs[3], res, size))]
    try:
        return _run_procs(procs, res, size, measure_idle, stage_slice=slice(1, 4))
    finally:
        for shm, _ in edges:
            shm.close()
            shm.unlink()


def _run_procs(procs, res, size, measure_idle, stage_slice):
    for p in procs:
        p.start()
    cpu = CpuProbe([p.pid for p in procs[stage_slice]])
    if measure_idle:
        time.sleep(0.6)
        cpu.mark()
        time.sleep(IDLE_S - 1.0)
        cpu.idle_done()
    cpu.mark()
    deadline = time.monotonic() + 900
    while True:
        try:
            out = res.get(timeout=0.5)
            break
        except Exception:
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    if p.is_alive():
                        p.kill()
                raise RuntimeError(f"baseline process failed: {[(p.name, p.exitcode) for p in failed] or 'timeout'}")
    cpu.loaded_done()
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return {**summarize(out["lat"], out["first"], out["last"], size), **cpu.result()}


# ============================================================================ measuring


class CpuProbe:
    """CPU% of a set of processes over marked windows. A sampler thread keeps the last known
    CPU times, so a window can end after the processes have exited."""

    def __init__(self, pids: List[int]) -> None:
        import threading

        self.procs = [psutil.Process(p) for p in pids]
        self.last = [0.0] * len(self.procs)
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = 0.0
        self.c0: List[float] = []
        self.idle: Optional[List[float]] = None
        self.loaded: Optional[List[float]] = None

    def _sample(self) -> None:
        for i, p in enumerate(self.procs):
            try:
                t = p.cpu_times()
                self.last[i] = t.user + t.system
            except psutil.Error:
                pass  # exited: keep its last value

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def _cpu(self) -> List[float]:
        self._sample()
        return list(self.last)

    def mark(self) -> None:
        self.t0, self.c0 = time.monotonic(), self._cpu()

    def _since(self) -> List[float]:
        dt = time.monotonic() - self.t0
        return [100.0 * (c - c0) / dt for c, c0 in zip(self._cpu(), self.c0)]

    def idle_done(self) -> None:
        self.idle = self._since()

    def loaded_done(self) -> None:
        self.loaded = self._since()
        self._stop.set()

    def result(self) -> Dict[str, Any]:
        return {"cpu_idle": self.idle, "cpu_loaded": self.loaded}


def summarize(lat_ns: List[int], first: Optional[int], last: int, size: int) -> Dict[str, Any]:
    lat = sorted(lat_ns)
    n = len(lat)
    if not n:
        return {"n": 0}
    pct = lambda q: lat[min(n - 1, int(q * (n - 1)))] / 1e3  # noqa: E731  (us)
    dur = (last - first) / 1e9 if first is not None and last > first else float("nan")
    return {
        "n": n,
        "e2e_p50_us": pct(0.5),
        "e2e_p99_us": pct(0.99),
        "hop_p50_us": pct(0.5) / HOPS,
        "hop_p99_us": pct(0.99) / HOPS,
        "fps": n / dur if dur == dur and dur > 0 else float("nan"),
        "gbps": n * size / dur / 1e9 if dur == dur and dur > 0 else float("nan"),
    }


RUNNERS = {
    "remotemedia": lambda s, n, i, idle: run_remotemedia(s, n, i, False, idle),
    "remotemedia_loaned": lambda s, n, i, idle: run_remotemedia(s, n, i, True, idle),
    "mp_queue": run_mp_queue,
    "iox_raw": run_iox_raw,
    "shm_pipe": run_shm_pipe,
}


FLAT_INTERVAL = 0.02


def bench_flatness(quick: bool) -> Dict[str, Any]:
    """Loaned-output latency against payload size with the *same* pacing for every size.

    The main table paces big payloads more slowly than small ones (it has to, for the
    baselines that copy), and a stage woken after 250 ms of idleness is slower than one woken
    after 2 ms (cold caches, idle vCPUs) whatever the payload: comparing those rows measures
    the pacing, not the payload. Runs alternate between sizes so drift hits both alike."""
    n = 30 if quick else 100
    sizes = [4096, 1080 * 1920 * 3, 64 << 20]
    hops: Dict[int, List[float]] = {size: [] for size in sizes}
    for _ in range(2):
        for size in sizes:
            hops[size].append(run_remotemedia(size, n, FLAT_INTERVAL, True, False)["hop_p50_us"])
    p50 = {str(size): sorted(v)[len(v) // 2] for size, v in hops.items()}
    return {"interval_s": FLAT_INTERVAL, "frames": n, "hop_p50_us": p50, "ratio_64MiB_4KiB": p50[str(64 << 20)] / p50["4096"]}


def bench_group(quick: bool) -> Dict[str, Any]:
    """The 3 pass-through stages of the main pipeline as one Group (one worker) against one
    worker each, 4 KiB paced at 2 ms, runs alternating. Latency is end to end (source to
    sink), since the grouped pipeline has two hops instead of four."""
    n = 250 if quick else 1000
    e2e: Dict[str, List[float]] = {"separate": [], "group": []}
    fps: Dict[str, List[float]] = {"separate": [], "group": []}
    # latency runs first, alternating, then throughput runs: a back-to-back run's tear-down
    # must not overlap the next paced run
    for _ in range(3):
        for label in e2e:
            e2e[label].append(run_remotemedia(4096, n, 0.002, False, False, label == "group")["e2e_p50_us"])
    for _ in range(2):
        for label in fps:
            fps[label].append(run_remotemedia(4096, n * 10, 0.0, False, False, label == "group")["fps"])
    p50 = {k: statistics.median(v) for k, v in e2e.items()}
    thr = {k: statistics.median(v) for k, v in fps.items()}
    return {"e2e_p50_us": p50, "fps": thr, "latency_ratio": p50["group"] / p50["separate"],
            "throughput_ratio": thr["group"] / thr["separate"]}


def bench_ready(n_nodes: int = 10, repeat: int = 3) -> Dict[str, Any]:
    """Supervisor start() -> every worker READY per start_method (bench/startup.py has more)."""
    from startup import METHODS, one_run

    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    for _ in range(repeat):
        for method in METHODS:
            times[method].append(one_run(n_nodes, method)["ready_s"])
    out: Dict[str, Any] = {"ready_nodes": n_nodes}
    for method, ts in times.items():
        out[f"ready_s_median_{method}"] = statistics.median(ts)
        out[f"ready_s_min_{method}"] = min(ts)
    return out


def bench_serialize() -> Dict[str, float]:
    table = {i: f"w{i}" for i in range(1000)}
    typical = MapNode(lambda x: table.get(x, x), name="typical")
    model = MapNode(lambda x: x, name="model")
    model.weights = np.random.default_rng(0).standard_normal(10 * 2**20 // 8)
    out = {}
    for label, node in (("typical", typical), ("model_10MB", model)):
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            serialize_node(node)
            ts.append(time.perf_counter() - t0)
        out[f"serialize_{label}_ms"] = statistics.median(ts) * 1e3
    return out


# ============================================================================ report


def fmt_size(n: int) -> str:
    for unit, div in (("MiB", 2**20), ("KiB", 1024)):
        if n >= div:
            v = n / div
            return f"{v:.1f} {unit}" if v != int(v) else f"{int(v)} {unit}"
    return f"{n} B"


def ratio(a: float, b: float) -> str:
    if not (a == a and b == b) or b == 0:
        return "-"
    return f"{a / b:.3f}"


def render(results: Dict[str, Any]) -> str:
    lines = [f"# remotemedia benchmark ({results['when']}, {results['machine']})", ""]
    lines.append("Pipeline: source -> 3 stages -> sink, one process each; latency per hop = end to end / 4.")
    lines.append("")
    lines.append("| payload | system | hop p50 µs | hop p99 µs | frames/s | GB/s | CPU idle % | CPU loaded % |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for size_s, per in results["runs"].items():
        for system, r in per.items():
            if "error" in r:
                lines.append(f"| {fmt_size(int(size_s))} | {system} | error: {r['error']} | | | | | |")
                continue
            idle = "/".join(f"{c:.1f}" for c in r["cpu_idle"]) if r.get("cpu_idle") else "-"
            loaded = "/".join(f"{c:.0f}" for c in r["cpu_loaded"]) if r.get("cpu_loaded") else "-"
            lines.append(
                f"| {fmt_size(int(size_s))} | {system} | {r['hop_p50_us']:.1f} | {r['hop_p99_us']:.1f} | "
                f"{r['fps_thr']:.0f} | {r['gbps_thr']:.3f} | {idle} | {loaded} |"
            )
    lines.append("")
    lines.append("Ratios (remotemedia / baseline; < 1 is better for latency, > 1 better for throughput):")
    lines.append("")
    lines.append("| payload | system | vs | hop p50 ratio | hop p99 ratio | throughput ratio |")
    lines.append("|---|---|---|---|---|---|")
    for size_s, per in results["runs"].items():
        for system in ("remotemedia", "remotemedia_loaned"):
            r = per.get(system)
            if not r or "error" in r:
                continue
            for base in BASELINES:
                b = per.get(base)
                if not b or "error" in b:
                    continue
                lines.append(
                    f"| {fmt_size(int(size_s))} | {system} | {base} | {ratio(r['hop_p50_us'], b['hop_p50_us'])} | "
                    f"{ratio(r['hop_p99_us'], b['hop_p99_us'])} | {ratio(r['fps_thr'], b['fps_thr'])} |"
                )
    lines.append("")
    ex = results["extra"]
    ready = ", ".join(
        f"{m} {ex[f'ready_s_median_{m}']:.3f} s (min {ex[f'ready_s_min_{m}']:.3f} s)" for m in ("spawn", "forkserver")
    )
    lines.append(
        f"Supervisor start -> READY, {ex['ready_nodes']} nodes: {ready}; forkserver / spawn "
        f"{ratio(ex['ready_s_median_forkserver'], ex['ready_s_median_spawn'])}"
    )
    lines.append(f"serialize_node: typical node {ex['serialize_typical_ms']:.2f} ms, node with a 10 MB model {ex['serialize_model_10MB_ms']:.1f} ms")
    flat = ex.get("flat")
    if flat:
        sizes = ", ".join(f"{fmt_size(int(k))} {v:.1f} µs" for k, v in flat["hop_p50_us"].items())
        lines.append(
            f"Loaned outputs, every size paced at {flat['interval_s'] * 1000:.0f} ms: hop p50 {sizes}; "
            f"64 MiB / 4 KiB = {flat['ratio_64MiB_4KiB']:.2f}"
        )
    grp = ex.get("group")
    if grp:
        lines.append(
            f"3 stages as one Group vs one worker each (4 KiB, paced 2 ms): end to end p50 "
            f"{grp['e2e_p50_us']['group']:.0f} µs vs {grp['e2e_p50_us']['separate']:.0f} µs "
            f"(ratio {grp['latency_ratio']:.2f}); throughput {grp['fps']['group']:.0f} vs "
            f"{grp['fps']['separate']:.0f} frames/s (ratio {grp['throughput_ratio']:.2f})"
        )
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # (an optional extra: the tables are the results)
        print("matplotlib is not installed: no latency.png")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    systems = sorted({s for per in results["runs"].values() for s in per})
    for system in systems:
        xs, ys = [], []
        for size_s, per in results["runs"].items():
            r = per.get(system)
            if r and "error" not in r:
                xs.append(int(size_s))
                ys.append(r["hop_p50_us"])
        if xs:
            ax.plot(xs, ys, marker="o", label=system)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("payload (bytes)")
    ax.set_ylabel("per-hop latency p50 (µs)")
    ax.set_title(f"latency vs payload ({results['machine']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--no-group", action="store_true", help="skip the Group comparison")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    systems = args.systems.split(",")
    results: Dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "runs": {},
    }
    for size in sizes:
        n_lat, interval, n_thr = counts(size, args.quick)
        per: Dict[str, Any] = {}
        for system in systems:
            print(f"{fmt_size(size):>9} {system:<20}", end=" ", flush=True)
            try:
                lat = RUNNERS[system](size, n_lat, interval, True)
                thr = RUNNERS[system](size, n_thr, 0.0, False)
                lat["fps_thr"], lat["gbps_thr"], lat["cpu_loaded"] = thr["fps"], thr["gbps"], thr["cpu_loaded"]
                per[system] = lat
                print(f"hop p50 {lat['hop_p50_us']:9.1f} us  p99 {lat['hop_p99_us']:9.1f} us  {thr['fps']:9.0f} frames/s", flush=True)
            except Exception as e:  # one broken baseline must not lose the rest of the run
                per[system] = {"error": f"{type(e).__name__}: {e}"}
                print(f"error: {e}", flush=True)
        results["runs"][str(size)] = per
    results["extra"] = {**bench_ready(), **bench_serialize()}
    if "remotemedia" in systems and not args.no_group:
        results["extra"]["group"] = bench_group(args.quick)
    if "remotemedia_loaned" in systems:
        results["extra"]["flat"] = bench_flatness(args.quick)
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = render(results)
    print()
    print(md)
    for name in (stamp, "latest"):
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(md)
    plot(results, os.path.join(args.out, "latency.png"))
    print(f"written to {args.out}/{stamp}.json, .md and latency.png")


if __name__ == "__main__":
    main()
