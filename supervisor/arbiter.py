"""The supervisor: spawns one worker per node, moves the caller's frames in and out, watches
the workers, and shuts everything down cleanly.

::

    caller thread                     arbiter thread (owns every iceoryx2 port)
    -------------                     -----------------------------------------
    Supervisor(nodes)                 spawn workers (subprocess, memfd node blob)
    start() ........ waits READY .... Setup -> Ready from every worker -> Start sources
    send(x) -> input queue --wake-->  encode once -> __input__ edges (iceoryx2)
    recv()  <- output queue <-------  __output__ edges -> decode -> ack
    close() / stop() / signals ---->  EOS on inputs / Drain sources / Abort + SIGKILL
                                      reap_workers()   Popen.poll() of each child
                                      murder_workers() deadlines: init, stop, abort
                                      manage_workers() restarts (policy, backoff)
    run() returns the RunReport  <--  every output edge ended, every worker exited:
                                      close ports, purge the run's shared memory

The arbiter thread has a single wait point: ``Listener.wait()`` on its iceoryx2 inbox plus
the control sockets of its workers and a wake-up pipe for the caller's commands. Signal
handlers (installed by :meth:`Supervisor.run` in the main thread) only enqueue a command.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import cloudpickle
import psutil

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import (
    EndOfStream,
    FrameSerializationError,
    NodeError,
    NodeFatalError,
    NodeInitError,
    NodeTypeError,
    RemoteMediaError,
    SharedMemoryFullError,
    SupervisorError,
    WorkerStartTimeout,
)
from remotemedia.frames import FrameInfo, Kind, decode, encode
from remotemedia.node import Node, Source
from remotemedia.options import DEFAULTS as _D, check_supervisor, node_defaults, resolve_node
from remotemedia.pipeline import INPUT, OUTPUT, Pipeline
from remotemedia.serialization import find_unpicklable, serialize_node

from . import resources
from .channels import InPort, OutPort, split_frame
from .protocol import (
    EXIT_LOAD_ERROR,
    EXIT_OK,
    Abort,
    Acked,
    ChannelClosed,
    Commit,
    ControlChannel,
    DeadLetter,
    Done,
    Drain,
    EdgeSpec,
    Gap,
    Heartbeat,
    Hello,
    InitFailed,
    NodeFailed,
    Ready,
    Replay,
    RestoreState,
    Setup,
    Start,
    WorkerSpec,
    socketpair,
)
from .control import ControlServer
from .logs import LineBuffer, LogSink, parse_worker_line
from .monitor import WorkerSampler, build_status
from .scoreboard import ORDER_CAPACITY, Scoreboard
from .systemd import SystemdNotifier
from .states import ProcessState, StateMachine

__all__ = ["Supervisor", "RunReport", "as_pipeline", "describe_exit"]

log = logging.getLogger("remotemedia.supervisor")

_LIVE: "weakref.WeakSet[Supervisor]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # a program that exits without stopping its supervisors
    for sup in list(_LIVE):
        try:
            sup.kill()
            sup.join(5.0)
        except Exception:
            pass


def as_pipeline(obj: Any, name: Optional[str] = None, trust_instances: bool = False) -> Pipeline:
    """A Pipeline from a Pipeline, a list of nodes / manifest entries, a manifest dict or a
    JSON string (``trust_instances``: see :class:`~remotemedia.Pipeline`)."""
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, (list, tuple, dict, str, bytes)):
        return Pipeline(obj if not isinstance(obj, tuple) else list(obj), name=name, trust_instances=trust_instances)
    if isinstance(obj, Node):
        return Pipeline([obj], name=name)
    raise NodeTypeError(
        f"expected a Pipeline, a list of Node instances / manifest dicts, a manifest dict or a JSON "
        f"string, got {type(obj).__name__}"
    )


def _private_rss(pid: Optional[int]) -> Optional[int]:
    """Resident memory that is the worker's own (anonymous pages): shared-memory frames the
    worker merely maps do not count against its limit."""
    if pid is None:
        return None
    try:
        mi = psutil.Process(pid).memory_info()
    except psutil.Error:
        return None
    return max(0, mi.rss - getattr(mi, "shared", 0))


def _encode_input(value: Any, what: str) -> Tuple[bytes, List[Any], int]:
    """``(meta, buffers, stream id)`` of one input frame; FrameSerializationError naming
    ``what`` and the part that does not pickle."""
    value, stream_id = split_frame(value)
    try:
        meta, bufs = encode(value)
    except Exception as e:
        try:
            path, err = find_unpicklable(value)
        except Exception:  # (it pickles after all, or the search failed: report the first error)
            path, err = "", e
        raise FrameSerializationError(what, f"{type(err).__name__}: {err}", path.lstrip(".") or None) from e
    return meta, bufs, stream_id or 0


_GENERATOR_FLAGS = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _forget_locals(err: Optional[BaseException]) -> None:
    """Clear the local variables of the finished frames an error of the arbiter thread holds:
    those of its traceback and of its causes, and their callers. The lines stay for the
    report; the locals (the Supervisor, ports, received frames) would otherwise live as long
    as the error does, in a reference cycle through the Supervisor that only the garbage
    collector frees."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
        tb = e.__traceback__
        while tb is not None:
            frame: Any = tb.tb_frame
            # (a generator's frame is not cleared: that would close the generator)
            while frame is not None and not frame.f_code.co_flags & _GENERATOR_FLAGS:
                try:
                    frame.clear()
                except RuntimeError:
                    pass  # still executing (the arbiter's own frame): freed when it returns
                frame = frame.f_back
            tb = tb.tb_next


class _Outputs(queue.Queue):  # type: ignore[type-arg]
    """The caller's queue of ``(kind, value, info)``. An output decoded zero-copy is a view
    on its received chunk: :meth:`lend` keeps its Sample beside it until the caller takes
    it, and :meth:`settle`, at the end of the run, turns the outputs nobody took into private
    copies, so that outputs waiting in a finished Supervisor never hold the run's shared
    memory."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._lent: Dict[int, Any] = {}

    def _get(self) -> Any:
        item = super()._get()
        self._lent.pop(id(item), None)  # (under the queue's lock, as settle)
        return item

    def lend(self, item: Tuple[str, Any, Any], sample: Any) -> None:
        self._lent[id(item)] = sample
        self.put(item)

    def settle(self) -> None:
        with self.mutex:
            for i in range(len(self.queue)):
                item = self.queue[i]
                sample = self._lent.pop(id(item), None)
                if sample is None:
                    continue
                try:
                    self.queue[i] = (item[0], decode(sample, copy=True), item[2])
                except Exception:  # (it decoded once; should it not again, the view stays)
                    log.exception("could not copy an output out of shared memory")
            self._lent.clear()


def describe_exit(code: Optional[int]) -> str:
    """``"exit code 3"`` / ``"signal SIGKILL"``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass
class RunReport:
    """What :meth:`Supervisor.run` returns.

    Attributes:
        outputs: the terminal nodes' outputs, ordered by the input they derive from.
        duration: seconds from start() to the end of the run.
        nodes: per node: frames_in, frames_out, errors, restarts, latency summary, pid(s).
        stopped: True when the run ended early on stop() or a signal.
        killed: True when the workers were SIGKILLed on request (a second signal): frames
            in flight were lost.
        aborted: why the run stopped without draining (``"drain timeout ..."``, ``"second
            signal"``, ``"kill requested"``): frames in flight were lost. None when the run
            completed or drained.
        killed_nodes: nodes whose worker had to be SIGKILLed while the run stopped.
        unprocessed_inputs: inputs the pipeline accepted (``send()``, ``run()``'s inputs) that
            it had not finished processing when it stopped (items an inputs iterator had not
            yet yielded are not counted).
        unprocessed_source_frames: items the Source nodes generated that the pipeline had not
            finished processing when it stopped.
    """

    pipeline: str
    duration: float
    outputs: List[Any] = field(default_factory=list)
    nodes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    stopped: bool = False
    killed: bool = False
    output_count: int = 0
    aborted: Optional[str] = None
    killed_nodes: List[str] = field(default_factory=list)
    unprocessed_inputs: int = 0
    unprocessed_source_frames: int = 0

    @property
    def frames(self) -> Dict[str, int]:
        """Frames each node emitted."""
        return {n: s.get("frames_out", 0) for n, s in self.nodes.items()}

    def loss_summary(self) -> Optional[str]:
        """One sentence saying what the run lost by stopping without a drain, or None."""
        if self.aborted is None:
            return None
        parts = [f"pipeline {self.pipeline!r} did not drain ({self.aborted})"]
        if self.killed_nodes:
            parts.append(f"workers SIGKILLed: {', '.join(self.killed_nodes)}")
        if self.unprocessed_inputs:
            parts.append(f"{self.unprocessed_inputs} inputs were not fully processed")
        if self.unprocessed_source_frames:
            parts.append(f"{self.unprocessed_source_frames} frames of the sources were not fully processed")
        return "; ".join(parts) + "; frames in flight were lost"


#: Signals that drain the pipeline during run(), like stop(): whatever would end the
#: supervisor (SIGHUP: the terminal closed; SIGQUIT: Ctrl-\; SIGXCPU: RLIMIT_CPU) must not
#: leave workers, shared memory or the control socket behind. (SIGPIPE is ignored by Python:
#: writing to a closed stdout raises BrokenPipeError instead.)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGXCPU)
#: Signals an operator may send out of habit (log reopening elsewhere) whose default action
#: would kill the supervisor: logged and ignored, unless the program handles them itself.
_IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
#: Bytes of captured worker output read per worker and arbiter turn.
_OUTPUT_BUDGET = 1 << 20
#: Phases in which crashed workers are restarted (a pending restart matters only then).
_RESTART_PHASES = ("booting", "running", "draining")

class WorkerHandle:
    """The supervisor's view of one worker process."""

    def __init__(self, name: str, index: int, blob: bytes, spec: WorkerSpec, options: Dict[str, Any]) -> None:
        self.name = name
        self.index = index
        self.blob = blob
        self.spec = spec
        self.options = options
        self.sm = StateMachine(name)
        self.proc: Optional[subprocess.Popen] = None
        self.chan: Optional[ControlChannel] = None
        self.pid: Optional[int] = None
        self.spawned_at = 0.0
        self.ready_at: Optional[float] = None
        self.restore = RestoreState()
        self.stats: Dict[str, Any] = {}
        self.done = False
        self.starts = 0
        self.restarts = 0
        self.last_traceback: Optional[str] = None
        self.exit_status: Optional[int] = None
        self.kill_at: Optional[float] = None
        self.kill_reason: Optional[str] = None
        self.last_heartbeat = 0.0
        self.restart_at: Optional[float] = None
        self.restart_times: Deque[float] = deque()
        self.board: Optional[Scoreboard] = None
        self.out_fds: Dict[int, LineBuffer] = {}  # captured stdout/stderr pipe -> partial line
        self.out_streams: Dict[int, str] = {}
        self.sampler = WorkerSampler()
        self.tail: Deque[str] = deque(maxlen=60)  # last lines the worker wrote
        self.poison: Optional[Tuple[int, int]] = None  # frame being processed at the last crash
        # (edge, seq) in process() when the supervisor decided to kill the worker: a SIGTERM
        # unwinds process() and clears the status block's busy marker before the worker dies.
        self.kill_frame: Optional[Tuple[int, int]] = None
        # Commit(final=True) arrived: its end of stream is committed downstream, nothing of
        # its stream is left to do even if it dies before Done (in cleanup()).
        self.final_commit = False
        self.killed_at_stop = False  # SIGKILLed while the run was aborting
        self.source_start = 0  # a source: generate() position its current process started at
        self.generated = 0  # a source: items generated (absolute position), as of its last exit
        self.poison_count = 0
        self.dead_letters = 0
        self.memory_kills = 0
        self.hang_kills = 0
        self.last_recovery: Optional[float] = None  # seconds from crash to replacement READY
        self.crashed_at: Optional[float] = None
        self.next_mem_check = 0.0

    @property
    def state(self) -> ProcessState:
        return self.sm.state

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class _Cmd:
    CLOSE = "close"
    STOP = "stop"
    KILL = "kill"
    SIGKILL = "sigkill"
    ITER = "iter"


class Supervisor:
    """Runs a pipeline as supervised worker processes.

    Args:
        nodes_or_pipeline: a :class:`Pipeline`, a list of Node instances and/or manifest node
            dicts, a manifest dict or a JSON string.
        name: pipeline name (defaults to the pipeline's).
        init_timeout: seconds a worker may take to unpickle and ``initialize()``.
        stop_timeout: seconds a drain (stop(), SIGTERM) may take before workers are aborted.
        kill_timeout: seconds an aborted worker gets for ``cleanup()`` before SIGKILL.
        queue_depth: frames in flight per edge (consumer queue and producer window).
        queue_bytes: bytes in flight per edge before the producer waits (default 256 MiB),
            whatever ``queue_depth`` allows: it bounds the memory of big frames in flight.
        max_borrowed: received frames a consumer may hold zero-copy per edge; past that,
            frames are copied out of shared memory so a hoarding node never stalls the edge.
        max_node_size: refuse nodes whose pickle exceeds this many bytes (default 100 MiB).
        on_error: ``"raise"`` (a process() exception stops the pipeline with NodeError) or
            ``"skip"`` (log it, drop the frame, continue).
        restart_policy, max_restarts, restart_window, process_timeout, memory_limit,
        poison_threshold, snapshot_interval, backoff_base, backoff_max: supervision options
            (see the README).
        heartbeat_interval: seconds between worker heartbeats.
        heartbeat_timeout: a worker whose loop has not turned for this long (while not inside
            process()) is killed and restarted (default max(10 s, 5 heartbeats)).
        dead_letter_dir: directory where poison frames are written (raw payload + JSON header).
        env: extra environment variables for the workers.
        log_level: logging level of the workers.
        log_format: ``"text"`` or ``"json"`` for the workers' captured output and logs.
        control: serve the control socket (``remotemedia-supervisor status/stop``).
        metrics_port: serve Prometheus metrics on this port (needs prometheus-client).
        metrics_host: the address it listens on (default 127.0.0.1).
        spin_us: workers spin (GIL released, adaptive) up to this many microseconds for the
            next frame before blocking; 0 always blocks.
        trust_instances: accept manifest entries holding a pickled node instance (unpickling
            runs code: only for manifests you made yourself).

    The options, their defaults and the values they allow are one table,
    :data:`remotemedia.options.OPTIONS` (also the README's). The per-node ones
    (``NodeOptions.KEYS``: ``init_timeout``, ``queue_depth``, ``queue_bytes``, ``on_error``,
    the supervision options above, and ``queue_policy``, which is per node only) can also be
    set per node with ``Node(..., options={...})``. A bad value raises OptionValueError.

    Example::

        from remotemedia import Supervisor
        from remotemedia.nodes import MapNode

        with Supervisor([MapNode(lambda x: x * 2)]) as sup:
            sup.send(21)
            assert sup.recv(timeout=10) == 42
            sup.close()
    """

    def __init__(
        self,
        nodes_or_pipeline: Any,
        *,
        name: Optional[str] = _D.name,
        init_timeout: float = _D.init_timeout,
        stop_timeout: float = _D.stop_timeout,
        kill_timeout: float = _D.kill_timeout,
        queue_depth: int = _D.queue_depth,
        queue_bytes: int = _D.queue_bytes,
        max_borrowed: int = _D.max_borrowed,
        max_node_size: Optional[int] = _D.max_node_size,
        on_error: str = _D.on_error,
        restart_policy: str = _D.restart_policy,
        max_restarts: int = _D.max_restarts,
        restart_window: float = _D.restart_window,
        process_timeout: Optional[float] = _D.process_timeout,
        memory_limit: Optional[int] = _D.memory_limit,
        poison_threshold: int = _D.poison_threshold,
        snapshot_interval: Optional[float] = _D.snapshot_interval,
        backoff_base: float = _D.backoff_base,
        backoff_max: float = _D.backoff_max,
        heartbeat_interval: float = _D.heartbeat_interval,
        heartbeat_timeout: Optional[float] = _D.heartbeat_timeout,
        dead_letter_dir: Optional[str] = _D.dead_letter_dir,
        env: Optional[Dict[str, str]] = _D.env,
        log_level: int = _D.log_level,
        log_format: str = _D.log_format,
        control: bool = _D.control,
        metrics_port: Optional[int] = _D.metrics_port,
        metrics_host: str = _D.metrics_host,
        spin_us: int = _D.spin_us,
        trust_instances: bool = _D.trust_instances,
    ) -> None:
        self.pipeline = as_pipeline(nodes_or_pipeline, name, trust_instances)
        self.name = name or self.pipeline.name
        check_supervisor(locals())  # every keyword against the options table (remotemedia.options)
        self.defaults = node_defaults(locals())  # the Supervisor-wide values of the per-node options
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        self.max_borrowed = max_borrowed
        self.max_node_size = max_node_size
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout if heartbeat_timeout is not None else max(10.0, 5 * heartbeat_interval)
        self.dead_letter_dir = os.path.abspath(dead_letter_dir) if dead_letter_dir else None
        self.env = dict(env or {})
        self.log_level = log_level
        try:
            self.log_sink = LogSink(log_format)
        except ValueError as e:
            raise SupervisorError(str(e)) from None
        self.spin_us = spin_us
        self.control_enabled = control
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._control: Optional[ControlServer] = None
        self._metrics_server: Any = None
        self._notifier = SystemdNotifier()
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._next_sample = 0.0
        self.totals = self._source_totals()
        self.node_options = {n.name: self._node_options(n) for n in self.pipeline.nodes}

        self.run_id = resources.new_run_id()
        self.prefix = resources.PREFIX
        self.root = resources.run_root(self.run_id)  # the run's private directory, made by start()
        self.workers: Dict[str, WorkerHandle] = {}
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._error: Optional[BaseException] = None
        self._outq = _Outputs()
        # run() collects the outputs and returns them after the run: copies, not views on the
        # memory of a finished run
        self._copy_outputs = False
        self._inq: "queue.Queue[Any]" = queue.Queue(maxsize=max(2, 2 * queue_depth))
        self._cmds: "queue.SimpleQueue[Tuple[str, Any]]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed_by_user = False
        self._eos_delivered = False
        self._started_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._stopped = False
        self.killed = False  # workers were SIGKILLed on request (second signal)
        self._abort_reason: Optional[str] = None  # why the run stopped without a drain
        self._unprocessed_inputs = 0  # counted when the input ports close
        self._run_called = False
        self._phase = "new"  # new -> booting -> running -> draining/aborting -> finished

    # ================================================================== options

    def _node_options(self, node: Node) -> Dict[str, Any]:
        return resolve_node(node.name, self.defaults, node.options)

    # ================================================================== caller API

    def start(self) -> "Supervisor":
        """Serialize the nodes, spawn the workers and wait until every one is READY.

        Raises SerializationError (nothing was started), NodeInitError (a node failed to
        unpickle or initialize, or its worker died while loading; the traceback is the cause),
        WorkerStartTimeout.
        Everything started is stopped and cleaned up before the error is raised.
        """
        if self._thread is not None:
            raise SupervisorError(f"supervisor of {self.name!r} was already started")
        blobs = {n.name: serialize_node(n, self.max_node_size) for n in self.pipeline.nodes}
        self._build(blobs)
        resources.create_run_dir(self.root)
        self._started_at = time.monotonic()
        self._phase = "booting"
        _LIVE.add(self)
        self._thread = threading.Thread(target=self._thread_main, name=f"remotemedia-arbiter-{self.name}", daemon=True)
        self._thread.start()
        while not (self._ready.wait(0.1) or self._finished.is_set()):
            pass
        if not self._ready.is_set():
            self.join()
            if self._error is None and self._stopped:
                raise SupervisorError(f"pipeline {self.name!r} was stopped while starting")
            raise self._error or SupervisorError(f"pipeline {self.name!r} failed to start")
        return self

    def send(self, value: Any, timeout: Optional[float] = None) -> None:
        """Feed one input to the pipeline's input nodes. Blocks while the input queue is full
        (backpressure); raises TimeoutError after ``timeout`` seconds, and
        FrameSerializationError (nothing sent, the pipeline goes on) when ``value`` does not
        pickle."""
        self._check_running("send()")
        if self._closed_by_user:
            raise SupervisorError("send() after close(): the input stream is closed")
        if not self._input_edges:
            raise SupervisorError(f"pipeline {self.name!r} has no input nodes (every root is a Source); nothing to send to")
        frame = _encode_input(value, "the value given to send()")  # here, where an error belongs
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            try:
                self._inq.put(frame, timeout=0.1)
                break
            except queue.Full:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"send(): the input queue stayed full for {timeout} s") from None
                if self._finished.is_set():
                    self._raise_if_failed()  # (the failure, if that is why it stopped)
                    raise SupervisorError("send(): the pipeline has stopped")
        self._wake()

    def recv(self, timeout: Optional[float] = None) -> Any:
        """The next output of the terminal node(s).

        Raises the builtin TimeoutError when nothing arrives within ``timeout`` seconds,
        :class:`EndOfStream` once the stream is closed and every output was received, and
        the pipeline's error (NodeError, NodeFatalError, ...) if it failed.
        """
        return self.recv_frame(timeout)[0]

    def recv_frame(self, timeout: Optional[float] = None) -> Tuple[Any, FrameInfo]:
        """Like :meth:`recv`, with the frame header (``FrameInfo``: seq, origin, stream id,
        timestamps, source node)."""
        if self._thread is None:
            raise SupervisorError("recv() before start(): use `with Supervisor(...) as sup:` or call start()")
        if self._eos_delivered:
            raise EndOfStream(f"pipeline {self.name!r}: every output has been received")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            try:
                kind, value, info = self._outq.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"recv(): no output within {timeout} s") from None
                continue
            if kind == "data":
                return value, info
            if kind == "eos":
                self._eos_delivered = True
                self._outq.put(("eos", None, None))
                raise EndOfStream(f"pipeline {self.name!r}: every output has been received")
            if kind == "error":
                self._outq.put(("error", value, None))
                raise value

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the outputs until EndOfStream."""
        while True:
            try:
                yield self.recv()
            except EndOfStream:
                return

    def close(self) -> None:
        """End the input stream (end of stream travels through the pipeline once every
        queued input was sent)."""
        if not self._closed_by_user:
            self._closed_by_user = True
            self._command(_Cmd.CLOSE)

    def stop(self) -> None:
        """Graceful stop: sources stop, inputs end, frames in flight drain, every worker runs
        cleanup() and exits. Escalates to abort after ``stop_timeout`` seconds."""
        self._closed_by_user = True
        self._command(_Cmd.STOP)

    def kill(self) -> None:
        """Abort now: workers get Abort (cleanup() then exit), SIGKILL after kill_timeout."""
        self._closed_by_user = True
        self._command(_Cmd.KILL)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the run has ended and everything was cleaned up. True when it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def worker_pids(self) -> Dict[str, Optional[int]]:
        """Node name -> pid of its current worker process (None while not running)."""
        return {n: (w.pid if w.alive else None) for n, w in self.workers.items()}

    def states(self) -> Dict[str, str]:
        """Node name -> worker state (STARTING, RUNNING, EXITED, ...)."""
        return {n: w.state.value for n, w in self.workers.items()}

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    def run(
        self,
        inputs: Optional[Iterable[Any]] = None,
        on_output: Optional[Callable[[Any, FrameInfo], None]] = None,
    ) -> RunReport:
        """Run until the sources are exhausted (and ``inputs``, if given, are all processed)
        and every frame is drained, or until SIGINT/SIGTERM (then drain and stop cleanly; a
        second signal aborts). Returns a :class:`RunReport` with the outputs.

        ``inputs`` may be any iterable, also an endless generator: it is consumed as the
        pipeline accepts frames. With ``on_output``, each output is handed to
        ``on_output(value, frame_info)`` as it arrives instead of being collected (for
        long-running services).

        Raises the pipeline's error (NodeError, NodeInitError, NodeFatalError, ...) after
        everything was stopped and cleaned up. An exception raised by ``on_output`` aborts the
        pipeline, then propagates. run() works once per Supervisor (SupervisorError after).
        """
        if self._run_called or self._finished.is_set():
            raise SupervisorError(
                f"run() works once per Supervisor, and the supervisor of {self.name!r} has already run "
                "(its workers have exited and its shared memory is gone); create a new Supervisor "
                "for another run (Pipeline.run() does that on every call)"
            )
        self._run_called = True
        self._copy_outputs = on_output is None
        restore = self._install_signal_handlers()
        try:
            if self._thread is None:
                try:
                    self.start()
                except SupervisorError:
                    if self._error is not None or not self._stopped:
                        raise
                    # stopped (a signal) while starting: a graceful stop of a run that had not begun
            if inputs is not None:
                if not self._input_edges:
                    raise SupervisorError(
                        f"pipeline {self.name!r} has no input nodes (every root is a Source); run it without inputs"
                    )
                if isinstance(inputs, (str, bytes, dict)):
                    raise NodeTypeError(f"inputs must be an iterable of frames (e.g. a list), got {type(inputs).__name__}")
                self._command(_Cmd.ITER, iter(inputs))
            elif not self._closed_by_user:
                self.close()
            outputs: List[Tuple[int, int, Any]] = []
            n = 0
            while True:
                try:
                    kind, value, info = self._outq.get(timeout=0.1)
                except queue.Empty:
                    if self._finished.is_set() and self._outq.empty():
                        break
                    continue
                if kind == "data":
                    if on_output is not None:
                        on_output(value, info)
                    else:
                        outputs.append((info.origin, n, value))
                    n += 1
                elif kind == "error":
                    self.join()
                    raise value
            self.join()
            if self._error is not None:
                raise self._error
            outputs.sort(key=lambda t: (t[0], t[1]))
            report = self.report([v for _, _, v in outputs])
            report.output_count = n
            return report
        except BaseException:
            if self.running:  # on_output raised: nothing may outlive the call
                self.kill()
                self.join()
            raise
        finally:
            restore()

    def report(self, outputs: Optional[List[Any]] = None) -> RunReport:
        """Statistics of the run so far."""
        end = self._ended_at or time.monotonic()
        nodes = {}
        for name, w in self.workers.items():
            s = dict(w.stats)
            s.update(
                state=w.state.value,
                pid=w.pid,
                restarts=w.restarts,
                exit_status=w.exit_status,
                last_recovery_s=w.last_recovery,
                hang_kills=w.hang_kills,
                memory_kills=w.memory_kills,
                dead_letters=w.dead_letters,
            )
            nodes[name] = s
        return RunReport(
            self.name,
            end - (self._started_at or end),
            outputs or [],
            nodes,
            self._stopped,
            killed=self.killed,
            aborted=self._abort_reason,
            killed_nodes=[n for n, w in self.workers.items() if w.killed_at_stop],
            unprocessed_inputs=self._unprocessed_inputs if self._abort_reason is not None else 0,
            unprocessed_source_frames=(
                sum(max(0, w.generated - w.restore.source_position) for w in self.workers.values() if w.spec.is_source)
                if self._abort_reason is not None
                else 0
            ),
        )

    def __enter__(self) -> "Supervisor":
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.kill()
            self.join()
            return
        self.close()
        # Outputs nobody asked for are dropped; the stream still drains to a clean end.
        deadline = time.monotonic() + self.stop_timeout
        while not self._finished.is_set():
            if time.monotonic() > deadline:
                self.stop()
                deadline = float("inf")
            self._finished.wait(0.1)
        self.join()
        if self._error is not None:
            raise self._error

    # ================================================================== plumbing for the caller

    def _check_running(self, what: str) -> None:
        if self._thread is None:
            raise SupervisorError(f"{what} before start(): use `with Supervisor(...) as sup:` or call start()")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _wake(self) -> None:
        fd = self._wake_w
        if fd < 0:  # the run is over; closed descriptors may have been reused
            return
        try:
            os.write(fd, b"x")
        except (BlockingIOError, OSError):
            pass

    def _command(self, cmd: str, arg: Any = None) -> None:
        self._cmds.put((cmd, arg))
        self._wake()

    def _install_signal_handlers(self) -> Callable[[], None]:
        """While run() runs: every signal that would end the process drains the pipeline
        instead (a second one kills the workers), so that nothing is left behind; see
        _STOP_SIGNALS and _IGNORED_SIGNALS."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        count = [0]

        def handler(signum: int, frame: Any) -> None:
            # Only enqueue: the arbiter thread acts on it.
            count[0] += 1
            self._stopped = True
            if count[0] == 1:
                log.warning("%s: %s received, draining (send it again to kill)", self.name, signal.Signals(signum).name)
                self._command(_Cmd.STOP)
            else:
                self._command(_Cmd.SIGKILL)

        def ignore(signum: int, frame: Any) -> None:
            log.warning("%s: %s ignored (it has no meaning for the supervisor)", self.name, signal.Signals(signum).name)

        old = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
        for s in _IGNORED_SIGNALS:
            if signal.getsignal(s) is signal.SIG_DFL:  # a handler of the program's own stays
                old[s] = signal.signal(s, ignore)

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore

    # ================================================================== graph -> specs

    def _build(self, blobs: Dict[str, bytes]) -> None:
        p = self.pipeline
        index_of = {n.name: i for i, n in enumerate(p.nodes)}
        inbox = lambda name: "in/sup" if name in (INPUT, OUTPUT) else f"in/w{index_of[name]}"  # noqa: E731
        edges: List[EdgeSpec] = []
        for i, (src, dst) in enumerate(p.edges()):
            consumer_opts = self.node_options.get(dst, self.defaults)
            edges.append(
                EdgeSpec(
                    index=i,
                    src=src,
                    dst=dst,
                    data_service=f"e{i}/data",
                    ack_service=f"e{i}/ack",
                    src_inbox=inbox(src),
                    dst_inbox=inbox(dst),
                    depth=consumer_opts["queue_depth"],
                    max_borrowed=self.max_borrowed,
                    policy=consumer_opts["queue_policy"],
                    max_bytes=consumer_opts["queue_bytes"],
                )
            )
        self.edges = edges
        self._input_edges = [e for e in edges if e.src == INPUT]
        self._output_edges = [e for e in edges if e.dst == OUTPUT]
        for node in p.nodes:
            i = index_of[node.name]
            opts = self.node_options[node.name]
            spec = WorkerSpec(
                name=node.name,
                index=i,
                run_id=self.run_id,
                prefix=self.prefix,
                root=self.root,
                inbox=inbox(node.name),
                in_edges=tuple(e for e in edges if e.dst == node.name),
                out_edges=tuple(e for e in edges if e.src == node.name),
                is_source=isinstance(node, Source),
                on_error=opts["on_error"],
                heartbeat_interval=self.heartbeat_interval,
                log_level=self.log_level,
                snapshot_interval=opts["snapshot_interval"],
                dead_letter_dir=self.dead_letter_dir,
                spin_us=self.spin_us,
            )
            self.workers[node.name] = WorkerHandle(node.name, i, blobs[node.name], spec, opts)

    # ================================================================== arbiter thread

    def _thread_main(self) -> None:
        # Every iceoryx2 object is kept here from its creation on, so that _shutdown closes
        # it whatever fails (see _release_ports).
        self._iox: Any = None
        self._inbox: Any = None
        self._in_ports: List[OutPort] = []
        self._out_ports: List[InPort] = []
        try:
            resources.cleanup_stale_runs()
            resources.check_shm_space(f"starting pipeline {self.name!r}")
            self._iox = bridge.Node(self.prefix, "supervisor", self.root)
            self._inbox = bridge.Listener(self._iox, "in/sup")
            for e in self._input_edges:
                self._in_ports.append(OutPort(self._iox, e))
            for e in self._output_edges:
                self._out_ports.append(InPort(self._iox, e))
            self._input_iter: Optional[Iterator[Any]] = None
            self._iter_position = 0  # items taken from run()'s inputs (for error messages)
            self._inputs_closed = False
            self._input_count = 0
            self._stop_deadline: Optional[float] = None
            if self.control_enabled:
                self._control = ControlServer(self.name, self._on_control)
            if self.metrics_port is not None:
                from .metrics import serve_metrics

                self._metrics_server = serve_metrics(self, self.metrics_port, self.metrics_host)
            for w in self.workers.values():
                self.spawn_worker(w)
            while self._phase != "finished":
                self._tick()
        except BaseException as e:  # noqa: BLE001 - the caller must see every failure
            if isinstance(e, SharedMemoryFullError):
                self._explain_shm_full(e)  # (before it is logged)
            log.exception("supervisor %s failed", self.name)
            self._fail(e if isinstance(e, RemoteMediaError) else SupervisorError(f"supervisor failed: {e!r}"))
            _forget_locals(e)  # (kept by log records too, also when the error raised is a wrapper)
        finally:
            self._shutdown()

    def _tick(self) -> None:
        fds = [self._wake_r]
        for w in self.workers.values():
            if w.chan is not None and not w.chan.closed:
                fds.append(w.chan.fileno())
            fds.extend(w.out_fds)
        if self._control is not None:
            fds.extend(self._control.fds())
        self._inbox.wait(self._next_timeout(), fds)
        self._drain_wake()
        self._handle_commands()
        if self._control is not None:
            self._control.poll()
        for w in list(self.workers.values()):
            self._read_output(w)
            self._read_control(w)
        self._collect_outputs()
        self._feed_inputs()
        self.reap_workers()
        self.murder_workers()
        self.manage_workers()
        self._service_tick()
        self._check_done()

    def _next_timeout(self) -> float:
        t = 0.5
        if any(w.chan is not None and w.chan.closed and w.alive for w in self.workers.values()):
            t = 0.01  # a channel hung up: reap the process promptly
        if self._phase in ("draining", "aborting"):
            t = min(t, 0.05)
        now = time.monotonic()
        restarting = self._phase in _RESTART_PHASES  # else a pending restart is no deadline
        for w in self.workers.values():
            for deadline in (w.restart_at if restarting else None, w.kill_at):
                if deadline is not None:
                    t = min(t, max(0.0, deadline - now))
            if w.alive and (w.options["process_timeout"] or w.options["memory_limit"]):
                t = min(t, 0.1)
        for p in self._in_ports:
            r = p.next_retry
            if r is not None:
                t = min(t, max(0.0, r - time.monotonic()))
        if self._input_iter is not None or not self._inq.empty():
            if all(p.can_send() for p in self._in_ports):
                t = 0.0
        return t

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd == _Cmd.CLOSE:
                self._inputs_closed = True
            elif cmd == _Cmd.ITER:
                self._input_iter = arg
            elif cmd == _Cmd.STOP:
                self._begin_drain("stop requested")
            elif cmd == _Cmd.KILL:
                self._begin_abort("kill requested")
            elif cmd == _Cmd.SIGKILL:
                self._begin_abort("second signal", hard=True)

    # ------------------------------------------------------------------ control messages

    def _read_control(self, w: WorkerHandle) -> None:
        if w.chan is None or w.chan.closed:
            return
        try:
            msgs = w.chan.receive()
        except ChannelClosed:
            return
        for msg in msgs:
            self._on_message(w, msg)

    def _on_message(self, w: WorkerHandle, msg: Any) -> None:
        if isinstance(msg, Hello):
            w.pid = msg.pid
        elif isinstance(msg, Ready):
            w.ready_at = time.monotonic()
            w.last_heartbeat = w.ready_at
            if w.state is ProcessState.STARTING:
                w.sm.change(ProcessState.RUNNING, f"ready after {msg.init_seconds:.2f}s")
            if w.crashed_at is not None:
                w.last_recovery = w.ready_at - w.crashed_at
                w.crashed_at = None
                log.warning("node %s recovered in %.3f s (pid %s)", w.name, w.last_recovery, w.pid)
            self._on_worker_ready(w)
        elif isinstance(msg, InitFailed):
            w.last_traceback = msg.traceback
            if w.starts > 1:
                return  # a restart that failed to load: exit code 3 makes it FATAL in _on_exit
            err = NodeInitError(
                w.name,
                f"{msg.stage} failed: {msg.message}",
                pid=w.pid,
                exc_type=msg.exc_type,
                traceback=msg.traceback,
            )
            self._fail(err)
        elif isinstance(msg, NodeFailed):
            w.last_traceback = msg.traceback
            original = None
            if msg.exc_blob is not None:
                try:
                    original = cloudpickle.loads(msg.exc_blob)
                except Exception:
                    original = None
            message = msg.message
            if isinstance(original, SharedMemoryFullError):
                self._explain_shm_full(original)
                message = str(original)
            if msg.fatal:
                self._fail(
                    NodeError(
                        w.name,
                        message,
                        pid=w.pid,
                        seq=msg.seq,
                        exc_type=msg.exc_type,
                        original=original,
                        traceback=msg.traceback,
                    )
                )
            else:
                log.warning("node %s (pid %s) skipped frame %s: %s: %s", w.name, w.pid, msg.seq, msg.exc_type, msg.message)
        elif isinstance(msg, Commit):
            w.restore.in_seqs.update(msg.in_seqs)
            w.restore.out_next.update(msg.out_next)
            if msg.source_position is not None:
                w.restore.source_position = msg.source_position
            if msg.snapshot is not None:
                w.restore.snapshot = msg.snapshot
            if msg.final:
                w.final_commit = True
                for edge, seq in msg.in_seqs.items():
                    self._relay_ack(edge, seq + 1, seq + 1)
        elif isinstance(msg, DeadLetter):
            w.dead_letters += 1
        elif isinstance(msg, Gap):
            self._replay_to(msg.edge, msg.expected - 1)
        elif isinstance(msg, Heartbeat):
            w.stats = msg.stats
            w.last_heartbeat = time.monotonic()
        elif isinstance(msg, Done):
            w.stats = msg.stats
            w.done = True

    def _on_worker_ready(self, w: WorkerHandle) -> None:
        # Producers resend whatever this worker has not committed (nothing on a first start).
        for e in w.spec.in_edges:
            self._replay_to(e.index, w.restore.in_seqs.get(e.index, -1))
        if self._phase == "booting":
            if all(x.state is ProcessState.RUNNING for x in self.workers.values()):
                self._phase = "running"
                for x in self.workers.values():
                    if x.spec.is_source:
                        self._send(x, Start())
                self._ready.set()
                log.info("pipeline %s: %d workers ready", self.name, len(self.workers))
                self._notifier.notify("READY=1", f"STATUS={self.status_line()}")
        elif w.spec.is_source:
            self._send(w, Start())
            if self._phase == "draining":
                self._send(w, Drain())

    # ------------------------------------------------------------------ service: status, systemd

    def _service_tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + 0.5
            for w in self.workers.values():
                b = w.board.read() if w.board is not None and w.alive else None
                w.sampler.sample(w.pid if w.alive else None, b["frames_in"] if b else 0, b["frames_out"] if b else 0)
        if not self._notifier.enabled or self._phase not in ("running", "draining"):
            return
        if now >= self._next_status:
            self._next_status = now + 2.0
            self._notifier.notify(f"STATUS={self.status_line()}")
        wd = self._notifier.watchdog_interval
        if wd and now >= self._next_watchdog:
            sick = self.unhealthy_workers()
            if not sick:
                self._notifier.notify("WATCHDOG=1")
                self._next_watchdog = now + wd
            else:
                self._next_watchdog = now + min(wd, 0.5)
                log.warning("watchdog withheld: %s", "; ".join(sick))

    def unhealthy_workers(self) -> List[str]:
        """Running workers whose loop has not turned within heartbeat_timeout (hung in
        process() or deadlocked). Restarting ones are not counted: the supervisor is handling
        them."""
        now_ns = time.monotonic_ns()
        out = []
        for w in self.workers.values():
            if w.state is not ProcessState.RUNNING or not w.alive or w.board is None:
                continue
            beat = w.board.get("heartbeat_ns")
            if beat and (now_ns - beat) / 1e9 > self.heartbeat_timeout:
                out.append(f"{w.name} (pid {w.pid}) silent for {(now_ns - beat) / 1e9:.1f} s")
        return out

    def status_line(self) -> str:
        up = sum(1 for w in self.workers.values() if w.alive and w.state is ProcessState.RUNNING)
        fps = sum(w.sampler.fps_out for w in self.workers.values() if w.spec.out_edges and any(e.dst == OUTPUT for e in w.spec.out_edges))
        return f"{up}/{len(self.workers)} workers up, {fps:.1f} frames/s out, phase {self._phase}"

    def status(self) -> Dict[str, Any]:
        """Per-node figures (state, pid, restarts, frames, frames/s, latency, RSS, CPU, queues),
        the data behind ``remotemedia-supervisor status``."""
        return build_status(self)

    def progress(self) -> Optional[Tuple[int, int]]:
        """``(items generated, total)`` when every source knows its length, else None."""
        if self.totals is None:
            return None
        done = sum(self.workers[name].sampler.total_in for name in self.totals)
        return min(done, sum(self.totals.values())), sum(self.totals.values())

    def _source_totals(self) -> Optional[Dict[str, int]]:
        totals = {}
        for n in self.pipeline.sources:
            try:
                totals[n.name] = len(n)  # type: ignore[arg-type]
            except TypeError:
                return None
        return totals or None

    def _on_control(self, req: Dict[str, Any]) -> Dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stop":
            self._begin_drain("stop requested over the control socket")
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}; use 'status' or 'stop'"}

    def _replay_to(self, edge_index: int, after: int) -> None:
        e = self.edges[edge_index]
        if e.src == INPUT:
            for p in self._in_ports:
                if p.spec.index == edge_index:
                    p.replay(after)
        else:
            producer = self.workers[e.src]
            if producer.state is ProcessState.RUNNING:
                self._send(producer, Replay(edge_index, after))

    def _relay_ack(self, edge_index: int, processed: int, committed: int) -> None:
        e = self.edges[edge_index]
        if e.src == INPUT:
            for p in self._in_ports:
                if p.spec.index == edge_index:
                    p.apply_ack(processed, committed)
        else:
            self._send(self.workers[e.src], Acked(edge_index, processed, committed))

    def _send(self, w: WorkerHandle, msg: Any) -> None:
        if w.chan is None or w.chan.closed:
            return
        try:
            w.chan.send(msg)
        except ChannelClosed:
            pass

    # ------------------------------------------------------------------ frames in and out

    def _feed_inputs(self) -> None:
        for p in self._in_ports:
            p.poll_acks()
            p.resend_due()
        if not self._in_ports or self._phase not in ("running", "draining"):
            return
        while all(p.can_send() for p in self._in_ports):
            frame = self._next_input()
            if frame is None:
                break
            meta, bufs, stream_id = frame
            now = time.monotonic_ns()
            for p in self._in_ports:
                p.send(Kind.DATA, meta, bufs, self._input_count, stream_id, now)
            self._input_count += 1
        if (
            self._inputs_closed
            and self._input_iter is None
            and self._inq.empty()
            and not any(p.eos_sent for p in self._in_ports)
        ):
            for p in self._in_ports:
                if p.can_send():
                    p.send(Kind.EOS, b"", [], self._input_count, 0, 0)

    def _next_input(self) -> Optional[Tuple[bytes, List[Any], int]]:
        """The next input, encoded: from send() (encoded by the caller), else from run()'s
        inputs iterator (encoded here: an item that does not pickle fails the run)."""
        try:
            return self._inq.get_nowait()
        except queue.Empty:
            pass
        if self._input_iter is not None:
            try:
                value = next(self._input_iter)
            except StopIteration:
                self._input_iter = None
                self._inputs_closed = True
                return None
            except Exception as e:
                self._input_iter = None
                self._fail(SupervisorError(f"the inputs iterator raised {type(e).__name__}: {e}"))
                return None
            position = self._iter_position
            self._iter_position += 1
            try:
                return _encode_input(value, f"item {position} of run()'s inputs")
            except FrameSerializationError as e:
                self._input_iter = None
                self._fail(e)
        return None

    def _collect_outputs(self) -> None:
        for p in self._out_ports:
            last = None
            while True:
                s = p.receive()
                if s is None:
                    break
                last = s.seq
                if s.kind == Kind.EOS:
                    continue
                info = FrameInfo(s.seq, s.origin, s.stream_id, s.created_ns, s.sent_ns, p.spec.src)
                views = bool(s.buffers)  # (a value unpickled from the meta alone holds no view)
                copy = p.should_copy() or (views and self._copy_outputs)
                value = decode(s, copy=copy)
                if copy or not views:
                    self._outq.put(("data", value, info))
                else:
                    self._outq.lend(("data", value, info), s)
                del s
            if last is not None or p.dup_pending:
                n = p.expected  # the caller's queue is the end of the line: received = committed
                p.ack(n, n)
        if self._out_ports and all(p.eos for p in self._out_ports) and not getattr(self, "_eos_queued", False):
            self._eos_queued = True
            self._outq.put(("eos", None, None))

    # ------------------------------------------------------------------ processes

    def spawn_worker(self, w: WorkerHandle) -> None:
        """Start (or restart) the worker of one node."""
        parent_sock, child_sock = socketpair()
        blob_fd = os.memfd_create(f"remotemedia-{w.name}", 0)
        try:
            view = memoryview(w.blob)
            while view:
                n = os.write(blob_fd, view)
                view = view[n:]
            env = dict(os.environ)
            env.update(self.env)
            env["PYTHONPATH"] = os.pathsep.join(
                [os.path.abspath(p or os.getcwd()) for p in sys.path if p is not None]
                + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            )
            env.setdefault("PYTHONUNBUFFERED", "1")
            env.setdefault("PYTHONFAULTHANDLER", "1")  # a segfault still leaves a traceback
            cmd = [
                sys.executable,
                "-m",
                "supervisor.worker",
                "--fd",
                str(child_sock.fileno()),
                "--blob-fd",
                str(blob_fd),
                "--ppid",
                str(os.getpid()),
                "--name",
                w.name,
            ]
            if w.board is None:
                w.board = Scoreboard.create(
                    commit_slots=len(w.spec.in_edges) + len(w.spec.out_edges),
                    order_slots=ORDER_CAPACITY if w.spec.records_order else 0,
                )
            w.board.reset()
            if w.restore.order:
                # Before the worker exists: the order outlives it if it dies before replaying it.
                position = {e.index: i for i, e in enumerate(w.spec.in_edges)}
                w.board.write_order(w.restore.consumed(w.spec.in_edges), [position[e] for e in w.restore.order])
            w.sm.change(ProcessState.STARTING, "spawn" if w.starts == 0 else "restart")
            w.proc = subprocess.Popen(
                cmd,
                pass_fds=(child_sock.fileno(), blob_fd, w.board.fd),
                process_group=0,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                close_fds=True,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
            os.close(blob_fd)
        w.pid = w.proc.pid
        w.chan = ControlChannel(parent_sock)
        w.out_fds = {}
        for pipe, stream in ((w.proc.stdout, "stdout"), (w.proc.stderr, "stderr")):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            w.out_fds[pipe.fileno()] = LineBuffer()
            w.out_streams[pipe.fileno()] = stream
        w.spawned_at = time.monotonic()
        w.kill_reason = None
        w.kill_frame = None
        w.final_commit = False
        w.source_start = w.restore.source_position
        w.restart_at = None
        w.ready_at = None
        w.done = False
        w.exit_status = None
        w.kill_at = None
        w.starts += 1
        restore = None
        if w.starts > 1:
            restore = w.restore
            restore.out_committed = {e.index: self._committed_count(e) for e in w.spec.out_edges}
            restore.out_finished = {e.index: self._consumer_finished(e) for e in w.spec.out_edges}
        spec = w.spec
        if w.board is not None:
            spec = dataclasses.replace(spec, scoreboard_fd=w.board.fd)
        self._send(w, Setup(spec, restore))
        log.info("spawned worker for node %s (pid %d)", w.name, w.pid)

    def _read_output(self, w: WorkerHandle, final: bool = False) -> None:
        """Forward what the worker wrote to stdout/stderr, one prefixed line at a time, and
        keep the last lines (the traceback of a crash is usually there).

        At most _OUTPUT_BUDGET bytes per worker and call, lines cut at MAX_LINE bytes: a
        worker flooding its output neither stalls the arbiter nor grows its memory (the rest
        waits in the pipe for the next turn, which comes at once: the pipe is readable)."""
        budget = _OUTPUT_BUDGET
        for fd in list(w.out_fds):
            lines = w.out_fds[fd]
            stream = w.out_streams.get(fd, "stderr")
            ended = final
            while budget > 0:
                try:
                    chunk = os.read(fd, min(65536, budget))
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    ended = True
                    break
                budget -= len(chunk)
                self._emit_lines(w, stream, lines.feed(chunk))
            if ended:
                self._emit_lines(w, stream, lines.flush())

    def _emit_lines(self, w: WorkerHandle, stream: str, lines: List[str]) -> None:
        for line in lines:
            rec = parse_worker_line(line, stream)
            w.tail.append(rec["msg"] + ("\n" + rec["exc"] if rec.get("exc") else ""))
            self.log_sink.write(rec, w.name, w.pid)

    def _close_output(self, w: WorkerHandle) -> None:
        self._read_output(w, final=True)
        for pipe in (w.proc.stdout, w.proc.stderr) if w.proc is not None else ():
            if pipe is not None:
                pipe.close()
        w.out_fds = {}

    def _committed_count(self, e: EdgeSpec) -> int:
        """Frames of edge ``e`` its consumer has committed, as far as the supervisor knows."""
        if e.dst == OUTPUT:
            return next((p.expected for p in self._out_ports if p.spec.index == e.index), 0)
        w = self.workers[e.dst]
        self._sync_commit(w)
        return w.restore.in_seqs.get(e.index, -1) + 1

    def _sync_commit(self, w: WorkerHandle) -> None:
        """Take the worker's last commit point from its status block (where workers without
        snapshots report commits, see ``Runner.flush_commit``) into its restore state."""
        c = w.board.read_commit() if w.board is not None else None
        if c is None:
            return
        source, seqs = c
        n_in = len(w.spec.in_edges)
        for e, seq in zip(w.spec.in_edges, seqs):
            w.restore.in_seqs[e.index] = seq
        for e, nxt in zip(w.spec.out_edges, seqs[n_in:]):
            w.restore.out_next[e.index] = nxt
        if w.spec.is_source:
            w.restore.source_position = source

    def _sync_order(self, w: WorkerHandle) -> None:
        """Take the order in which an exited worker with several inputs consumed its input
        frames after its last commit (from its status block) into its restore state: its
        restart consumes the replayed frames in that order (see ``Runner.step_ordered``)."""
        if w.board is None or not w.board.order_capacity:
            return
        edges = [e.index for e in w.spec.in_edges]
        w.restore.order = [edges[i] for i in w.board.read_order(w.restore.consumed(w.spec.in_edges))]

    def _consumer_finished(self, e: EdgeSpec) -> bool:
        if e.dst == OUTPUT:
            return any(p.eos for p in self._out_ports if p.spec.index == e.index)
        w = self.workers[e.dst]
        # (its final commit arrives before Done: a producer restarted in between must not
        # wait for acks of an end of stream the finished consumer will never send)
        return w.done or w.final_commit

    def reap_workers(self) -> None:
        """Collect the exit status of every worker that exited (each child by its own
        Popen.poll())."""
        for w in self.workers.values():
            if w.proc is None or w.proc.returncode is not None:
                continue
            try:
                if os.waitid(os.P_PID, w.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                    continue
                # What the node started and left running (a helper that ignored SIGTERM, one
                # orphaned by a crash) dies with its worker. The worker leads its process
                # group and is not reaped yet, so its pid still names that group and no other.
                os.killpg(w.proc.pid, signal.SIGKILL)
            except (ChildProcessError, ProcessLookupError, PermissionError):
                pass  # (ChildProcessError: reaped elsewhere; poll() below has its status)
            rc = w.proc.poll()
            if rc is None:
                continue
            self._sync_commit(w)  # before its board is reset for a restart
            self._read_control(w)  # messages written just before exiting
            self._sync_order(w)  # after the last commit, wherever it was reported
            self._close_output(w)
            if w.board is not None:  # its last counters outlive it
                b = w.board.read()
                w.sampler.sample(w.pid, b["frames_in"], b["frames_out"])
                if w.spec.is_source:
                    w.generated = w.source_start + b["frames_in"]
            w.exit_status = rc
            w.kill_at = None
            if w.chan is not None:
                w.chan.close()
            try:
                # bounded: every iceoryx2 storage of the run is file based, and opening one that
                # is not (or no longer) initialized gives up after iceoryx2's creation_timeout
                _cleaned, failed = self._iox.cleanup_dead_nodes()
                if failed:
                    log.warning("could not clean up %d dead iceoryx2 node(s) of run %s (a corrupt file?)", failed, self.run_id)
            except Exception as e:  # pragma: no cover - cleanup must not kill the arbiter
                log.warning("dead-node cleanup failed: %s", e)
            self._on_exit(w, rc)

    def _crash_report(self, w: WorkerHandle) -> Optional[str]:
        """The best traceback we have: the structured one, else the worker's last output."""
        if w.last_traceback:
            return w.last_traceback
        tail = "\n".join(w.tail).strip()
        return tail or None

    def _on_exit(self, w: WorkerHandle, rc: int) -> None:
        state = w.state
        how = describe_exit(rc)
        if w.kill_reason:
            how = f"{w.kill_reason}; {how}"
        if w.done:
            # Its stream was complete (Done arrived); how it exited afterwards does not matter.
            if state in (ProcessState.RUNNING, ProcessState.STOPPING):
                w.sm.change(ProcessState.EXITED, "end of stream" if rc == EXIT_OK else f"end of stream, then {how}")
            return
        if state is ProcessState.STOPPING or self._phase in ("aborting", "finished"):
            w.sm.change(ProcessState.STOPPED if state is ProcessState.STOPPING else ProcessState.EXITED, how)
            return
        if w.final_commit:
            # It died after its end of stream was committed downstream (Runner.finish), before
            # Done: in cleanup(), or killed there. Its stream is complete; a restart would
            # wait for an end of stream that never comes again.
            w.done = True
            w.sm.change(ProcessState.EXITED, f"end of stream, then {how} before reporting done")
            report = self._crash_report(w)
            log.warning(
                "node %s (pid %s): %s after its end of stream was committed (in cleanup()?); its stream is "
                "complete, not restarted%s",
                w.name,
                w.pid,
                how,
                f"\n{report}" if report else "",
            )
            return
        if rc == EXIT_LOAD_ERROR and state is ProcessState.STARTING:
            # Reserved exit codes mean something only while the worker loads; after READY a
            # worker's exit code is whatever its node did (os._exit(3) is a crash like any other).
            w.sm.change(ProcessState.FATAL, "load error")
            if self._error is None:
                self._fail(NodeFatalError(w.name, f"could not load the node ({how})", w.pid, rc, self._crash_report(w)))
            return
        if state is ProcessState.STARTING and self._phase == "booting" and w.starts == 1:
            # The first start must work: fail fast with what we know.
            w.sm.change(ProcessState.FATAL, f"failed to start ({how})")
            if w.kill_reason and "init_timeout" in w.kill_reason:
                err: RemoteMediaError = WorkerStartTimeout(w.name, w.kill_reason, w.pid)
            else:
                err = NodeInitError(
                    w.name,
                    f"the worker died during unpickling/initialize() ({how}) before reporting READY",
                    pid=w.pid,
                    traceback=self._crash_report(w),
                )
            self._fail(err)
            return
        w.sm.change(ProcessState.EXITED, how)
        self._after_failure(w, rc, how)

    def _after_failure(self, w: WorkerHandle, rc: int, how: str) -> None:
        """Apply the restart policy to a worker that exited unexpectedly."""
        now = time.monotonic()
        policy = w.options["restart_policy"]
        w.crashed_at = w.crashed_at or now
        self._track_poison(w)
        if policy == "never" or (policy == "on-failure" and rc == 0):
            why = "restart_policy='never'" if policy == "never" else "it exited with code 0 before the end of its stream"
            self._go_fatal(w, rc, f"worker exited unexpectedly ({how}); not restarted: {why}")
            return
        window = w.options["restart_window"]
        while w.restart_times and now - w.restart_times[0] > window:
            w.restart_times.popleft()
        if len(w.restart_times) >= w.options["max_restarts"]:
            self._go_fatal(
                w,
                rc,
                f"restart limit reached: {len(w.restart_times)} restarts within {window:g} s "
                f"(max_restarts={w.options['max_restarts']}); last exit: {how}",
            )
            return
        delay = min(w.options["backoff_base"] * (2 ** len(w.restart_times)), w.options["backoff_max"])
        w.restart_times.append(now)
        w.sm.change(ProcessState.BACKOFF, f"{how}; restart in {delay:.2f} s")
        w.restart_at = now + delay
        log.warning("node %s (pid %s) %s; restarting in %.2f s", w.name, w.pid, how, delay)

    def _go_fatal(self, w: WorkerHandle, rc: int, message: str) -> None:
        w.sm.change(ProcessState.FATAL, message)
        self._fail(NodeFatalError(w.name, message, w.pid, rc, self._crash_report(w)))

    def _busy_frame(self, w: WorkerHandle) -> Optional[Tuple[int, int]]:
        """(edge, seq) of the input frame the worker's process() is in, per its status block."""
        if w.board is None:
            return None
        b = w.board.read()
        if not b["busy_since_ns"] or b["busy_edge"] < 0:
            return None
        return b["busy_edge"], b["busy_seq"]

    def _track_poison(self, w: WorkerHandle) -> None:
        """Count crashes (and hang / memory kills) on the same input frame; past the threshold,
        dead-letter it."""
        frame = w.kill_frame or self._busy_frame(w)
        if frame is None:
            w.poison, w.poison_count = None, 0
            return
        w.poison_count = w.poison_count + 1 if frame == w.poison else 1
        w.poison = frame
        if w.poison_count >= w.options["poison_threshold"]:
            edge, seq = frame
            log.error(
                "node %s crashed %d times in a row on frame %d from %s: dead-lettering it\n%s",
                w.name,
                w.poison_count,
                seq,
                self.edges[edge].src,
                self._crash_report(w) or "(no traceback)",
            )
            w.restore.skip.setdefault(edge, []).append(seq)
            w.poison, w.poison_count = None, 0

    def manage_workers(self) -> None:
        """Start the workers whose backoff delay has passed (also while booting: a worker that
        crashed after its READY while another one still initializes)."""
        if self._phase not in _RESTART_PHASES:
            return
        now = time.monotonic()
        for w in self.workers.values():
            if w.state is ProcessState.BACKOFF and w.restart_at is not None and now >= w.restart_at:
                w.restarts += 1
                self.spawn_worker(w)

    def murder_workers(self) -> None:
        """Enforce deadlines: init timeout, per-frame timeout, heartbeat, memory, kills."""
        now = time.monotonic()
        now_ns = time.monotonic_ns()
        for w in self.workers.values():
            if not w.alive:
                continue
            if w.kill_at is not None:
                if now >= w.kill_at:
                    log.warning("node %s (pid %s) did not exit after SIGTERM; SIGKILL", w.name, w.pid)
                    self._signal(w, signal.SIGKILL)
                    w.kill_at = None
                    if self._phase == "aborting":
                        w.killed_at_stop = True
                continue
            if w.kill_reason:
                continue
            opts = w.options
            if w.state is ProcessState.STARTING and now - w.spawned_at > opts["init_timeout"]:
                self._murder(w, f"initialize() did not finish within init_timeout={opts['init_timeout']:g} s", hard=True)
                continue
            if w.state is not ProcessState.RUNNING or w.board is None:
                continue
            busy = w.board.get("busy_since_ns")
            if busy and opts["process_timeout"] and (now_ns - busy) / 1e9 > opts["process_timeout"]:
                w.hang_kills += 1
                seq = w.board.get("busy_seq")
                self._murder(w, f"process() of frame {seq} exceeded process_timeout={opts['process_timeout']:g} s")
                continue
            beat = w.board.get("heartbeat_ns")
            stale = (now_ns - beat) / 1e9 if beat else 0.0
            if not busy and stale > self.heartbeat_timeout:
                w.hang_kills += 1
                self._murder(w, f"no heartbeat for {stale:.1f} s (worker loop stuck)")
                continue
            if opts["memory_limit"] and now >= w.next_mem_check:
                w.next_mem_check = now + 0.25
                rss = _private_rss(w.pid)
                if rss is not None and rss > opts["memory_limit"]:
                    w.memory_kills += 1
                    self._murder(w, f"memory limit exceeded: {rss / 2**20:.0f} MiB private RSS > {opts['memory_limit'] / 2**20:.0f} MiB")
        if self._phase == "draining" and self._stop_deadline is not None and now > self._stop_deadline:
            log.warning("pipeline %s did not drain within %.1f s; aborting", self.name, self.stop_timeout)
            self._begin_abort(f"drain timeout: not drained within stop_timeout={self.stop_timeout:g} s")

    def _murder(self, w: WorkerHandle, reason: str, hard: bool = False) -> None:
        """Kill a misbehaving worker (SIGTERM, SIGKILL after kill_timeout); its exit is then
        handled like a crash, under the restart policy."""
        log.error("node %s (pid %s): %s; killing it", w.name, w.pid, reason)
        w.kill_reason = reason
        w.kill_frame = self._busy_frame(w)
        if hard:
            self._signal(w, signal.SIGKILL)
        else:
            self._signal(w, signal.SIGTERM)
            w.kill_at = time.monotonic() + self.kill_timeout

    def _signal(self, w: WorkerHandle, sig: int) -> None:
        if not w.alive or w.proc is None:
            return
        try:
            # The worker leads its own process group: take its children with it.
            os.killpg(w.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            w.proc.send_signal(sig)

    # ------------------------------------------------------------------ stopping

    def _fail(self, err: BaseException) -> None:
        if isinstance(err, SharedMemoryFullError):
            self._explain_shm_full(err)
        if self._error is None:
            self._error = err
            self._outq.put(("error", err, None))
            log.info("pipeline %s failed: %s", self.name, err)
        self._begin_abort(str(err))

    def _explain_shm_full(self, err: SharedMemoryFullError) -> None:
        """Add to the error what the frame's edge, and every edge with frames of its size, may
        hold in shared memory: a consumer's queue (``queue_depth`` frames, fewer when
        ``queue_bytes`` fills first) and the frames it borrows."""
        if not err.frame_bytes or err.edge_frames:
            return

        def frames(e: EdgeSpec) -> int:
            return min(e.depth, max(1, -(-e.max_bytes // err.frame_bytes))) + e.max_borrowed

        edge = next((e for e in self.edges if e.data_service == err.service), None)
        if edge is not None:
            err.edge_frames = frames(edge)
            err.edges = len(self.edges)
            err.pipeline_need = sum(frames(e) for e in self.edges) * err.frame_bytes

    def _begin_drain(self, reason: str) -> None:
        if self._phase in ("draining", "aborting", "finished"):
            return
        if self._phase == "booting":
            # Nothing flows before every worker is READY: stopping now loses nothing.
            self._stopped = True
            self._begin_abort(reason)
            self._abort_reason = None
            return
        self._stopped = True
        self._phase = "draining"
        self._notifier.notify("STOPPING=1", f"STATUS=draining ({reason})")
        self._inputs_closed = True
        self._input_iter = None
        self._stop_deadline = time.monotonic() + self.stop_timeout
        for w in self.workers.values():
            if w.spec.is_source:
                self._send(w, Drain())
        log.info("pipeline %s: draining (%s)", self.name, reason)

    def _begin_abort(self, reason: str, hard: bool = False) -> None:
        if self._abort_reason is None and self._phase != "finished":
            self._abort_reason = reason
        self._cancel_restarts(reason)
        if hard:
            self.killed = True
            for w in self.workers.values():
                if w.alive:
                    if w.state in (ProcessState.STARTING, ProcessState.RUNNING):
                        w.sm.change(ProcessState.STOPPING, reason)
                    self._signal(w, signal.SIGKILL)
                    w.killed_at_stop = True
            self._phase = "aborting"
            log.warning("pipeline %s: SIGKILL to every worker (%s)", self.name, reason)
            return
        if self._phase in ("aborting", "finished"):
            return
        self._phase = "aborting"
        self._notifier.notify("STOPPING=1", f"STATUS=stopping ({reason})")
        deadline = time.monotonic() + self.kill_timeout
        for w in self.workers.values():
            if w.alive:
                if w.state in (ProcessState.STARTING, ProcessState.RUNNING):
                    w.sm.change(ProcessState.STOPPING, reason)
                self._send(w, Abort())
                w.kill_at = deadline
        log.info("pipeline %s: aborting (%s)", self.name, reason)

    def _cancel_restarts(self, reason: str) -> None:
        """Workers waiting to be restarted stay down: the run is ending."""
        for w in self.workers.values():
            if w.state is ProcessState.BACKOFF:
                w.sm.change(ProcessState.STOPPED, reason)
                w.restart_at = None

    def _check_done(self) -> None:
        if self._phase == "aborting":
            if not any(w.alive for w in self.workers.values()):
                self._phase = "finished"
            return
        if self._phase not in ("running", "draining"):
            return
        outputs_done = all(p.eos for p in self._out_ports)
        workers_done = all(
            (not w.alive) and w.done and w.state is ProcessState.EXITED for w in self.workers.values()
        )
        if outputs_done and workers_done:
            self._phase = "finished"

    def _count_unprocessed_inputs(self) -> int:
        """Inputs accepted but not committed by every input node (queued ones included)."""
        ports = getattr(self, "_in_ports", [])
        if not ports:
            return 0
        sent = getattr(self, "_input_count", 0)
        committed = min(min(p.committed, sent) for p in ports)
        return sent - committed + self._inq.qsize()

    def _release_ports(self) -> None:
        """Close every iceoryx2 object of the supervisor: its ports, its inbox, its node. A
        closed bridge object holds no file and no mapping, so whatever Python objects still
        reference them (an error's traceback, a cycle the garbage collector has not reached),
        a finished run keeps nothing in this process. Only frames the caller still holds
        (zero-copy outputs of recv()) keep their own chunks."""
        ports = [*getattr(self, "_in_ports", []), *getattr(self, "_out_ports", [])]
        self._in_ports, self._out_ports = [], []
        inbox, node = getattr(self, "_inbox", None), getattr(self, "_iox", None)
        self._inbox = self._iox = None
        for p in ports:
            p.close()
        for obj in (inbox, node):
            if obj is not None:
                obj.close()

    def _shutdown(self) -> None:
        """Make sure nothing is left: processes, ports, shared memory."""
        try:
            for w in self.workers.values():
                if w.alive:
                    self._signal(w, signal.SIGKILL)
            for w in self.workers.values():
                if w.proc is not None:
                    try:
                        w.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
                        log.error("worker %s (pid %s) did not die", w.name, w.pid)
                    if w.exit_status is None:
                        w.exit_status = w.proc.returncode
                if w.chan is not None:
                    w.chan.close()
            self._unprocessed_inputs = self._count_unprocessed_inputs()
            self._release_ports()
            self._outq.settle()
            for w in self.workers.values():
                if w.board is not None:
                    w.board.close()
                    w.board = None
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server = None
            self._notifier.notify("STOPPING=1")
            self._notifier.close()
            left = resources.purge(self.root)
            if left:
                log.warning("could not remove shared-memory files of run %s: %s", self.run_id, left)
        except BaseException as e:  # noqa: BLE001
            log.exception("shutdown of %s failed", self.name)
            if self._error is None:
                self._error = SupervisorError(f"shutdown failed: {e!r}")
        finally:
            self._release_ports()  # (again, should the above have failed before them)
            self._outq.settle()
            _forget_locals(self._error)
            self._ended_at = time.monotonic()
            self._phase = "finished"
            if not getattr(self, "_eos_queued", False) and self._error is None:
                self._outq.put(("eos", None, None))
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            for fd in (wake_r, wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._finished.set()
            _LIVE.discard(self)
