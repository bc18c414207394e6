"""Benchmark suite: remotemedia against its baselines, in one run on one machine.

    python bench/run.py                 # full run, 3 rounds, ~25 min on 2 cores
    python bench/run.py --quick --rounds 1   # fewer frames, one round, ~3 min
    python bench/run.py --sizes 64,4096 --systems remotemedia,mp_queue

Every system runs the same pipeline, one process per stage:

    source -> stage 1 -> stage 2 -> stage 3 -> sink        (4 hops)

Systems:
    remotemedia         this runtime; stages return their input (one copy per hop into the
                        next shared-memory chunk; receiving is zero-copy)
    remotemedia_dict    this runtime; frames are media frames as media code writes them,
                        {"t": ts, "rate": 16000, "data": array} (compared with bare arrays)
    remotemedia_loaned  this runtime; source and stages write their output in place with
                        Node.allocate() (no copy at all: the transport floor)
    mp_queue            multiprocessing.Queue, numpy frames pickled
    iox_raw             hand-written loop over the iceoryx2 Python bindings: receive, loan,
                        memcpy, send, notify; blocking Listener wait
    shm_pipe            multiprocessing.shared_memory ring per edge, os.pipe notifications
    dora                dora-rs (pip install 'remotemedia[bench]'): Python nodes over zenoh
                        shared memory, run by `dora run` (its daemon) in a private network
                        namespace with only loopback; input queues of 8 frames, which drop
                        their oldest frame when full; shared-memory pool sized for 10 frames.
                        Skipped, with the reason, when dora-rs is not installed.

Payloads: 64 B, 4 KiB (audio chunk), 6,220,800 B (1080p RGB), 64 MiB (tensor).

Measured (each system R times per payload, interleaved, --rounds, media dicts next to bare
arrays; a row shows the medians, and each ratio its spread round by round, as this machine's
load drifts during a run):
    latency     frames paced so the pipeline is empty between them; source timestamp (in the
                first 8 bytes of the payload, CLOCK_MONOTONIC) to sink; per hop = end to end / 4
    throughput  frames sent back to back; frames/s and GB/s at the sink (delivered frames)
    lost        frames sent but never received, paced and back to back (only dora drops)
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
sys.path.insert(1, os.path.join(ROOT, "bench"))  # (bench/stats.py, when imported from elsewhere)

from remotemedia import Group, Node, Source, Supervisor  # noqa: E402
from remotemedia.nodes import MapNode  # noqa: E402
from remotemedia.serialization import serialize_node  # noqa: E402
from stats import paired_summary  # noqa: E402  (bench/stats.py)

SIZES = [64, 4096, 1080 * 1920 * 3, 64 << 20]
SYSTEMS = ["remotemedia", "remotemedia_loaned", "remotemedia_dict", "mp_queue", "iox_raw", "shm_pipe", "dora"]
BASELINES = ["mp_queue", "iox_raw", "shm_pipe", "dora"]
HOPS = 4
#: Frames in flight on each edge, the same for every system (remotemedia's queue_depth,
#: mp.Queue's maxsize, the iceoryx2 subscriber buffer, the shm ring, dora's queue_size). From
#: the environment so that the baselines' spawned processes see --queue too.
QUEUE = int(os.environ.get("RM_BENCH_QUEUE", "8"))
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
        # (50,000 back to back: at 40k frames/s a shorter stream is mostly its first frames,
        # before every edge has learned its encoding and every wait its spin budget)
        c = (1000, 0.002, 50000)
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
    def __init__(self, n: int, size: int, interval: float, loaned: bool, idle: float, as_dict: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self.n, self.size, self.interval, self.loaned, self.idle = n, size, interval, loaned, idle
        self.as_dict = as_dict

    def generate(self):
        time.sleep(self.idle)
        frame = np.random.default_rng(1).integers(0, 255, self.size, dtype=np.uint8)
        for _ in range(self.n):
            if self.interval:
                time.sleep(self.interval)
            out = self.allocate(self.size, np.uint8) if self.loaned else frame
            if self.loaned:
                out[8:64] = 1  # produced in place: touch a little, like a decoder would
            t = now()
            out[:8] = stamp_bytes(t)
            # a media frame as media code writes it: the samples next to a little metadata
            yield {"t": t, "rate": 16000, "data": out} if self.as_dict else out


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
        s = read_stamp(data["data"] if type(data) is dict else data)
        self.lat.append(t - s)
        if self.first is None:
            self.first = s
        self.last = t
        return None

    def flush(self):
        return {"lat": self.lat, "first": self.first, "last": self.last}


def copy_pipeline(n: int, size: int, as_dict: bool, idle: float) -> List[Any]:
    """The nodes of the pipeline the benches share: a source of ``n`` frames back to back
    (after ``idle`` s), three pass-through stages copying each frame on, a sink."""
    nodes: List[Any] = [BenchSource(n, size, 0.0, False, idle, as_dict, name="source")]
    return nodes + [CopyStage(name=f"s{i}") for i in range(1, 4)] + [BenchSink(name="sink")]


def run_remotemedia(
    size: int, n: int, interval: float, loaned: bool, measure_idle: bool, grouped: bool = False, as_dict: bool = False
) -> Dict[str, Any]:
    stage = LoanStage if loaned else CopyStage
    nodes: List[Any] = [BenchSource(n, size, interval, loaned, IDLE_S if measure_idle else 0.2, as_dict, name="source")]
    stages = [stage(name=f"s{i}") for i in range(1, 4)]
    if grouped:  # the three stages in one worker: source -> [s1 s2 s3] -> sink, two hops
        nodes.append(Group(stages, name="s1"))
    else:
        nodes += stages
    nodes += [BenchSink(name="sink")]
    sup = Supervisor(nodes, queue_depth=QUEUE, control=False)
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
    qs = [ctx.Queue(maxsize=QUEUE) for _ in range(4)]
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
        .subscriber_max_buffer_size(QUEUE)
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


SLOTS = QUEUE


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


# ============================================================================ dora-rs

# dora-rs (https://dora-rs.ai): Python nodes publishing to each other through zenoh shared
# memory, started and watched by a daemon. `dora run` runs one dataflow with the daemon inside
# the CLI process (no coordinator) and exits when the dataflow is done.
DORA_NODE = os.path.join(ROOT, "bench", "dora_node.py")
# Each input queue holds 8 frames, the window the other systems get. dora has no blocking
# backpressure: a full queue drops its oldest frame ("drop_oldest", the default; "backpressure"
# only buffers 10x more before dropping too), so the sink counts what arrived.
DORA_QUEUE = QUEUE
# A node's zenoh shared-memory pool (8 MiB by default) must hold the frames in flight on its
# output: a frame that finds the pool full goes through the heap and the daemon instead.
DORA_POOL_FRAMES = DORA_QUEUE + 2
DORA_POOL_MIN = 8 << 20
DORA_STAGES = ("s1", "s2", "s3")


def dora_missing() -> Optional[str]:
    """Why the `dora` system cannot run here, or None. The node API (PyPI `dora-rs`) and the CLI
    that runs the daemon (`dora-rs-cli`) must be installed, of one release."""
    from importlib import metadata

    try:
        versions = {d: metadata.version(d) for d in ("dora-rs", "dora-rs-cli")}
    except metadata.PackageNotFoundError as e:
        return f"{e.name} is not installed (pip install 'remotemedia[bench]', or pip install dora-rs dora-rs-cli)"
    if len(set(versions.values())) > 1:
        return f"dora-rs {versions['dora-rs']} and dora-rs-cli {versions['dora-rs-cli']} differ: install one release of both"
    if not _dora_cli():
        return "dora-rs-cli is installed but its `dora` command is not next to this Python nor on PATH"
    return None


def dora_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("dora-rs")
    except metadata.PackageNotFoundError:
        return None


def _dora_cli() -> Optional[str]:
    import shutil

    here = os.path.join(os.path.dirname(sys.executable), "dora")
    return here if os.access(here, os.X_OK) else shutil.which("dora")


def dora_pool_size(size: int) -> int:
    """Bytes of a node's shared-memory pool for frames of `size` bytes."""
    return max(DORA_POOL_MIN, DORA_POOL_FRAMES * size)


def _dora_netns() -> List[str]:
    """The command prefix that puts dora into a private network namespace with only loopback.

    zenoh (dora's data plane) listens on and scouts every interface it finds; with only `lo`
    it stays on this machine. Already in such a namespace (as under `unshare -n`): nothing."""
    ifaces = set(os.listdir("/sys/class/net"))
    if ifaces <= {"lo"}:
        with open("/sys/class/net/lo/flags") as f:
            if int(f.read(), 16) & 1:  # IFF_UP
                return []
    userns = [] if os.geteuid() == 0 else ["-r"]  # unprivileged: a user namespace owns the new one
    return ["unshare", "-n", *userns, "sh", "-c", 'ip link set lo up && exec "$@"', "dora-netns"]


def _dora_yaml(outdir: str, n: int, size: int, interval: float, idle: float) -> str:
    py, pool = sys.executable, dora_pool_size(size)
    for path in (py, DORA_NODE, outdir):
        if any(c.isspace() for c in path):  # dora splits a node's `args` at spaces
            raise ValueError(f"the dora baseline cannot pass the path {path!r} (it has a space) to its nodes: move it")
    q = json.dumps  # a JSON string is a YAML scalar, whatever the path holds

    def args(*a: Any) -> str:
        return q(" ".join(map(str, a)))

    nodes = [
        f"  - id: source\n    path: {q(py)}\n    args: {args(DORA_NODE, 'source', outdir, n, size, repr(interval), repr(idle))}\n"
        f"    shared_memory_pool_size: {pool}\n    outputs: [out]\n"
    ]
    prev = "source"
    for name in (*DORA_STAGES, "sink"):
        nodes.append(
            f"  - id: {name}\n    path: {q(py)}\n    args: {args(DORA_NODE, name, outdir)}\n"
            f"    shared_memory_pool_size: {pool}\n"
            f"    inputs:\n      in: {{source: {prev}/out, queue_size: {DORA_QUEUE}}}\n"
            + ("    outputs: [out]\n" if name != "sink" else "")
        )
        prev = name
    return "nodes:\n" + "".join(nodes)


def run_dora(size, n, interval, measure_idle):
    import shutil
    import signal
    import subprocess
    import tempfile

    cli = _dora_cli()
    outdir = tempfile.mkdtemp(prefix="bench-dora-")
    flow = os.path.join(outdir, "dataflow.yml")
    try:
        with open(flow, "w") as f:
            f.write(_dora_yaml(outdir, n, size, interval, IDLE_S if measure_idle else 0.2))
    except BaseException:
        shutil.rmtree(outdir, ignore_errors=True)
        raise
    env = {**os.environ, "DORA_ZENOH_MULTICAST": "off"}  # zenoh: no multicast scouting
    log = open(os.path.join(outdir, "dora.log"), "wb")
    pids: Dict[str, int] = {}
    proc: Optional[subprocess.Popen] = None

    def read(name: str) -> Any:
        try:
            with open(os.path.join(outdir, name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def failed(why: str) -> RuntimeError:
        import re

        log.flush()
        with open(os.path.join(outdir, "dora.log"), "rb") as f:
            text = re.sub(r"\x1b\[[0-9;]*m", "", f.read().decode(errors="replace"))
        # dora ends a failed run with "Dataflow failed:", the node and its stderr, then its own
        # stack backtrace: keep the node's part
        lines = [ln.strip() for ln in text.partition("Dataflow failed:")[2].split("Location:")[0].splitlines()]
        said = [ln for ln in lines if ln and not ln.startswith("---")] or text.strip().splitlines()[-8:]
        return RuntimeError(f"dora run {why}: " + " | ".join(said[:1] + said[-1:] if len(said) > 2 else said))

    try:
        # its own session: the daemon and its nodes, and nothing else, are in its process group
        proc = subprocess.Popen(
            [*_dora_netns(), cli, "run", flow, "--log-level", "warn"],
            cwd=outdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while len(pids) < 5:  # every node connected (it writes its pid after Node())
            for name in ("source", *DORA_STAGES, "sink"):
                pid = read(f"{name}.pid")
                if pid is not None:
                    pids[name] = pid
            if proc.poll() is not None or time.monotonic() > deadline:
                raise failed(f"exited with {proc.returncode}" if proc.returncode is not None else "did not start its nodes in 120 s")
            time.sleep(0.05)
        cpu = CpuProbe([pids[s] for s in DORA_STAGES])
        if measure_idle:
            time.sleep(0.4)
            cpu.mark()
            time.sleep(IDLE_S - 1.0)
            cpu.idle_done()
        cpu.mark()
        try:
            proc.wait(900)
        except subprocess.TimeoutExpired:
            raise failed("did not finish in 900 s") from None
        cpu.loaded_done()
        out = read("sink.json")
        if proc.returncode != 0 or out is None:
            raise failed(f"exited with {proc.returncode}" + ("" if out else ", no result from the sink"))
        hops = [(read(f"{s}.json") or {}).get("received") for s in DORA_STAGES]
        res = {**summarize(out["lat"], out["first"], out["last"], size), **cpu.result()}
        res["dora"] = {"pool_bytes": dora_pool_size(size), "queue_size": DORA_QUEUE, "received_per_stage": [*hops, out["received"]]}
        return res
    finally:
        # nothing of this run may outlive it: the dora process group, then any node that left it
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # dora's Ctrl-C: stops the dataflow gracefully
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in pids.values():  # a node still there is ours only if it runs with our outdir
            try:
                p = psutil.Process(pid)
                if outdir in p.cmdline():
                    p.kill()
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(outdir, ignore_errors=True)


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
    "remotemedia_dict": lambda s, n, i, idle: run_remotemedia(s, n, i, False, idle, as_dict=True),
    "mp_queue": run_mp_queue,
    "iox_raw": run_iox_raw,
    "shm_pipe": run_shm_pipe,
    "dora": run_dora,
}

#: What a row reports as the median of its rounds.
MEDIAN_KEYS = ("hop_p50_us", "hop_p99_us", "e2e_p50_us", "e2e_p99_us", "fps_thr", "gbps_thr")


def run_system(system: str, size: int, n_lat: int, interval: float, n_thr: int) -> Dict[str, Any]:
    """One round of one system: the paced run (latency, idle CPU) and the back-to-back run
    (throughput, loaded CPU)."""
    try:
        lat = RUNNERS[system](size, n_lat, interval, True)
        thr = RUNNERS[system](size, n_thr, 0.0, False)
    except Exception as e:  # one broken baseline must not lose the rest of the run
        return {"error": f"{type(e).__name__}: {e}"}
    lat["fps_thr"], lat["gbps_thr"], lat["cpu_loaded"] = thr["fps"], thr["gbps"], thr["cpu_loaded"]
    lat["sent"], lat["lost"] = n_lat, n_lat - lat["n"]
    lat["sent_thr"], lat["lost_thr"] = n_thr, n_thr - thr["n"]
    if "dora" in thr:
        lat["dora_thr"] = thr["dora"]
    return lat


def combine(rounds: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A system's row from its rounds: the median of each of MEDIAN_KEYS and of each stage's
    CPU, frames lost summed over the rounds, and the rounds themselves (``rounds``, for the
    ratios round by round). An error when no round ran."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[-1]["error"] if rounds else "not run"}
    out = dict(ok[0])
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in ok if r.get(k) == r.get(k)]  # (NaN: not measured)
        out[k] = statistics.median(vals) if vals else float("nan")
    for k in ("cpu_idle", "cpu_loaded"):
        if all(r.get(k) for r in ok):
            out[k] = [statistics.median(c) for c in zip(*(r[k] for r in ok))]
    for k in ("sent", "lost", "sent_thr", "lost_thr"):
        out[k] = sum(r[k] for r in ok)
    out["rounds"] = [{k: r.get(k) for k in ("hop_p50_us", "hop_p99_us", "fps_thr")} if "error" not in r else r for r in rounds]
    out["failed_rounds"] = len(rounds) - len(ok)
    return out


def round_ratios(r: Dict[str, Any], b: Dict[str, Any], key: str) -> List[float]:
    """``r[key] / b[key]`` of each round both ran (the systems of a round ran minutes apart
    at most, so the machine's load drifts less between them than across the run)."""
    return [x[key] / y[key] for x, y in zip(r.get("rounds", []), b.get("rounds", [])) if "error" not in x and "error" not in y and y[key]]


def ratio_cell(r: Dict[str, Any], b: Dict[str, Any], key: str, paired: bool = False) -> str:
    """The ratio of the medians, and the spread of the ratios round by round; ``paired``
    (systems run back to back every round, see PAIRED): also the median of those ratios,
    each from two runs seconds apart, with its confidence interval (bench/stats.py)."""
    cell = ratio(r[key], b[key])
    rs = round_ratios(r, b, key)
    if len(rs) < 2:
        return cell
    if paired:
        return f"{cell} ({paired_summary(rs)})"
    return f"{cell} ({min(rs):.2f}–{max(rs):.2f})"


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
    lines.append(
        f"Pipeline: source -> 3 stages -> sink, one process each; latency per hop = end to end / 4; "
        f"{results.get('queue', 8)} frames in flight per edge, every system; each row the median of "
        f"{results.get('rounds', 1)} rounds, the systems of a payload interleaved round by round."
    )
    lines.append("")
    lines.append("| payload | system | hop p50 µs | hop p99 µs | frames/s | GB/s | lost (paced, back to back) | CPU idle % | CPU loaded % |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for size_s, per in results["runs"].items():
        for system, r in per.items():
            if "error" in r:
                lines.append(f"| {fmt_size(int(size_s))} | {system} | error: {r['error']} | | | | | | |")
                continue
            idle = "/".join(f"{c:.1f}" for c in r["cpu_idle"]) if r.get("cpu_idle") else "-"
            loaded = "/".join(f"{c:.0f}" for c in r["cpu_loaded"]) if r.get("cpu_loaded") else "-"
            lost = f"{r['lost']}/{r['sent']}, {r['lost_thr']}/{r['sent_thr']}" if "lost" in r else "-"
            lines.append(
                f"| {fmt_size(int(size_s))} | {system} | {r['hop_p50_us']:.1f} | {r['hop_p99_us']:.1f} | "
                f"{r['fps_thr']:.0f} | {r['gbps_thr']:.3f} | {lost} | {idle} | {loaded} |"
            )
    lines.append("")
    lines.append(
        "Ratios (remotemedia / baseline; < 1 is better for latency, > 1 better for throughput): of the medians, "
        "and in brackets the lowest and highest of the same ratio round by round:"
    )
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
                    f"| {fmt_size(int(size_s))} | {system} | {base} | {ratio_cell(r, b, 'hop_p50_us')} | "
                    f"{ratio_cell(r, b, 'hop_p99_us')} | {ratio_cell(r, b, 'fps_thr')} |"
                )
    lines.append("")
    pairs = [(k, per) for k, per in results["runs"].items() if "error" not in per.get("remotemedia_dict", {"error": 1})]
    if pairs:
        paired = bool(results.get("paired"))  # (runs before the pairing: the rounds' order only rotated)
        lines.append(
            "Media frames (`{\"t\", \"rate\", \"data\": array}` dicts) against bare arrays of the same size"
            + (
                ", run back to back every round: the ratio of the medians, and in brackets the median of the ratios of "
                "each round's pair with its confidence interval (bench/stats.py) and their range:"
                if paired
                else ":"
            )
        )
        lines.append("")
        lines.append("| payload | hop p50 ratio | throughput ratio |")
        lines.append("|---|---|---|")
        for size_s, per in pairs:
            d, b = per["remotemedia_dict"], per.get("remotemedia")
            if b and "error" not in b:
                lines.append(f"| {fmt_size(int(size_s))} | {ratio_cell(d, b, 'hop_p50_us', paired)} | {ratio_cell(d, b, 'fps_thr', paired)} |")
        lines.append("")
    dora = results.get("dora")
    if dora:
        lines.append(
            f"dora: dora-rs {dora['version']} under `dora run` (its daemon, no coordinator) in a private network "
            f"namespace with only loopback, DORA_ZENOH_MULTICAST=off; input queues of {dora['queue_size']} frames "
            f"(drop_oldest: dora has no blocking backpressure, its frames/s are the delivered ones); each node's "
            f"shared-memory pool max({dora['pool_min_bytes'] >> 20} MiB, {dora['pool_frames']} frames)."
        )
    for system, why in results.get("skipped", {}).items():
        lines.append(f"{system}: skipped: {why}")
    if dora or results.get("skipped"):
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


#: Systems run back to back in every round, their order alternating: the ratio of each pair
#: compares runs seconds apart, not a round's length apart (this VM's speed moves by a third
#: between runs of a few seconds).
PAIRED = [("remotemedia", "remotemedia_dict")]


def round_order(systems: List[str], r: int) -> List[str]:
    """Round ``r``'s order: rotated every round (no system always runs first, or after the
    same one), each PAIRED second system moved next to its first, before it in odd rounds."""
    order = systems[r % len(systems):] + systems[: r % len(systems)]
    for first, second in PAIRED:
        if first in order and second in order:
            order.remove(second)
            i = order.index(first)
            order.insert(i if r % 2 else i + 1, second)
    return order


def main() -> None:
    global QUEUE, SLOTS, DORA_QUEUE, DORA_POOL_FRAMES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--queue", type=int, default=QUEUE, help="frames in flight per edge, every system (default 8)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--no-group", action="store_true", help="skip the Group comparison")
    ap.add_argument("--rounds", type=int, default=3, help="runs of every system per payload, interleaved (default 3): the table shows their medians")
    args = ap.parse_args()
    QUEUE = SLOTS = DORA_QUEUE = args.queue
    DORA_POOL_FRAMES = DORA_QUEUE + 2
    os.environ["RM_BENCH_QUEUE"] = str(args.queue)  # (for the spawned baseline processes)
    sizes = [int(s) for s in args.sizes.split(",")]
    systems = args.systems.split(",")
    results: Dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        "queue": args.queue,
        "rounds": args.rounds,
        "paired": PAIRED,
        "runs": {},
        "skipped": {},
    }
    if "dora" in systems:
        why = dora_missing()
        if why:
            print(f"dora skipped: {why}", flush=True)
            results["skipped"]["dora"] = why
            systems.remove("dora")
        else:
            results["dora"] = {"version": dora_version(), "queue_size": DORA_QUEUE, "pool_frames": DORA_POOL_FRAMES,
                               "pool_min_bytes": DORA_POOL_MIN}
    for size in sizes:
        n_lat, interval, n_thr = counts(size, args.quick)
        rounds: Dict[str, List[Dict[str, Any]]] = {system: [] for system in systems}
        for r in range(args.rounds):
            for system in round_order(systems, r):
                print(f"{fmt_size(size):>9} {system:<20} round {r + 1}/{args.rounds}", end=" ", flush=True)
                got = run_system(system, size, n_lat, interval, n_thr)
                rounds[system].append(got)
                if "error" in got:
                    print(f"error: {got['error']}", flush=True)
                    continue
                lost = f"  lost {got['lost']}/{n_lat} paced, {got['lost_thr']}/{n_thr} back to back" if got["lost"] or got["lost_thr"] else ""
                print(f"hop p50 {got['hop_p50_us']:9.1f} us  p99 {got['hop_p99_us']:9.1f} us  {got['fps_thr']:9.0f} frames/s{lost}", flush=True)
        results["runs"][str(size)] = {system: combine(rounds[system]) for system in systems}
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
