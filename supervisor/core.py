"""The public supervisor: the caller's API over one run.

::

    caller thread                                  arbiter thread (supervisor.arbiter)
    -------------                                  -----------------------------------
    Supervisor(nodes)   options checked, nodes serialized by start()
    start() ........... waits ready .............  spawn workers, Setup -> Ready -> Start
    send(x)  encode -> Gateway.send  ----iceoryx2---->  input nodes          (data path:
    recv()   Gateway.recv <- decode  <---iceoryx2----   terminal nodes        no arbiter)
    run(inputs)  _RunLoop: feed + drain through the gateway, one wait point
    close()  end of stream on the input edges (gateway)
    stop() / kill() / signals --- post(StopRun / AbortRun) -->  drain / abort / SIGKILL
    join(), report(), status() <- the arbiter's snapshot, events and final figures

The data path (:mod:`supervisor.gateway`) and the control path (:mod:`supervisor.arbiter`,
:mod:`supervisor.process`) share nothing but the gateway's lock, which the arbiter takes only
to replay to a restarted input node, relay an ack, or do now and then what no caller did
(acks, resends, outputs nobody receives yet).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from remotemedia.errors import (
    EndOfStream,
    FrameSerializationError,
    NodeTypeError,
    ReloadError,
    SupervisorError,
)
from remotemedia.frames import FrameInfo, encode
from remotemedia.node import Node, Source
from remotemedia.options import DEFAULTS as _D, check_supervisor, node_defaults, resolve_node
from remotemedia.pipeline import INPUT, OUTPUT, as_pipeline
from remotemedia.serialization import find_unpicklable, node_fingerprint, serialize_node

from . import resources
from .arbiter import AbortRun, Arbiter, FailRun, ReloadRun, ReplaceNodes, RunConfig, Snapshot, StopRun
from .channels import split_frame
from .doorbells import GATEWAY_SLOT, worker_slot
from .gateway import INBOX as GATEWAY_INBOX
from .gateway import EncodedFrame, Gateway
from .logs import LogSink
from .monitor import build_status
from .process import WorkerProcess, describe_exit
from .protocol import EdgeSpec, WorkerSpec, replica_name, with_retention_allowance
from .states import ProcessState

__all__ = ["Supervisor", "RunReport", "Progress", "describe_exit"]

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
class Supervisor:
    """Runs a pipeline as supervised worker processes.

    Args:
        nodes_or_pipeline: a :class:`Pipeline`, a list of Node instances and/or manifest node
            dicts, a manifest dict or a JSON string.
        name: pipeline name (defaults to the pipeline's).
        init_timeout: seconds a worker may take to unpickle and ``initialize()``.
        stop_timeout: seconds a drain (stop(), SIGTERM) may take before workers are aborted.
        kill_timeout: seconds an aborted worker gets for ``cleanup()`` before SIGKILL.
        handover_timeout: seconds a worker being replaced (:meth:`restart_node`,
            :meth:`reload`) waits for its outputs to be committed downstream before it hands
            over at the commit it has (the frames after it are then replayed).
        queue_depth: frames in flight per edge (consumer queue and producer window).
        queue_bytes: bytes in flight per edge before the producer waits (default 256 MiB),
            whatever ``queue_depth`` allows: it bounds the memory of big frames in flight.
        max_borrowed: received frames a consumer may hold zero-copy per edge; past that,
            frames are copied out of shared memory so a hoarding node never stalls the edge.
            (Besides these, a worker may keep as many as the queues downstream of it hold, for
            replay: see :func:`supervisor.protocol.with_retention_allowance`.)
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
        start_method: ``"spawn"`` (each worker a new interpreter) or ``"forkserver"``
            (workers forked from a template process of the run that has imported the
            runtime, numpy and the modules the nodes' pickles import; see the README).
        trust_instances: accept manifest entries holding a pickled node instance (unpickling
            runs code: only for manifests you made yourself).
        backend: ``"local"`` (every worker on this host) or ``"ray"`` (the nodes run on the
            hosts of a Ray cluster, each where its ``host`` option says; see the README's
            "Across hosts"; needs ``pip install 'remotemedia[ray]'``).
        ray_address: the Ray cluster of backend ``"ray"`` (``"auto"``, ``"HOST:PORT"``);
            None: the one this process is connected to, else a new single-host one.
        host_timeout: backend ``"ray"``: seconds a host's agent may leave the supervisor's
            pings unanswered before it is declared lost and restarted.

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

    def __new__(cls, *args: Any, **kwargs: Any) -> "Supervisor":
        # backend="ray" gives the Ray backend's Supervisor (same API; supervisor.ray.driver).
        # Imported only then: the local backend never imports Ray.
        if cls is Supervisor and kwargs.get("backend") == "ray":
            from .ray import ray_supervisor_class

            return super().__new__(ray_supervisor_class())
        return super().__new__(cls)

    def __init__(
        self,
        nodes_or_pipeline: Any,
        *,
        name: Optional[str] = _D.name,
        init_timeout: float = _D.init_timeout,
        stop_timeout: float = _D.stop_timeout,
        kill_timeout: float = _D.kill_timeout,
        handover_timeout: float = _D.handover_timeout,
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
        start_method: str = _D.start_method,
        trust_instances: bool = _D.trust_instances,
        backend: str = _D.backend,
        ray_address: Optional[str] = _D.ray_address,
        host_timeout: float = _D.host_timeout,
    ) -> None:
        self.pipeline = as_pipeline(nodes_or_pipeline, name, trust_instances)
        self.name = name or self.pipeline.name
        check_supervisor(locals())  # every keyword against the options table (remotemedia.options)
        if backend == "local" and ray_address is not None:
            raise SupervisorError(
                f"Supervisor: ray_address={ray_address!r} is for backend='ray'; pass backend='ray' (CLI: --backend ray), or drop it"
            )
        self.backend = backend
        self.ray_address = ray_address
        self.host_timeout = host_timeout
        self.defaults = node_defaults(locals())  # the Supervisor-wide values of the per-node options
        self.stop_timeout = stop_timeout
        self.kill_timeout = kill_timeout
        self.handover_timeout = handover_timeout
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
        self.start_method = start_method
        self.control_enabled = control
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.totals = self._source_totals()
        self.node_options = {n.name: self._node_options(n) for n in self.pipeline.nodes}

        self._input_edges = [dst for src, dst in self._edge_list() if src == INPUT]
        self.run_id = resources.new_run_id()
        self.prefix = resources.PREFIX
        self.root = resources.run_root(self.run_id)  # the run's private directory, made by start()
        self._arbiter: Optional[Arbiter] = None
        self._closed_by_user = False
        self._eos_delivered = False
        self._copy_outputs = False  # run() keeps the outputs after the run: copies, not views
        self._run_called = False
        self.trust_instances = trust_instances
        self._reload_source: Optional[Callable[[], Any]] = None  # see reload_from()
        self._reload_lock = threading.Lock()  # one reload at a time
        self._fingerprints: Dict[str, bytes] = {}  # node -> node_fingerprint of its running blob
        # (the Ray backend's host agent: its gateway, and where its nodes resume)
        self._gateway_factory: Optional[Callable[..., Gateway]] = None
        self._resume: Dict[str, Any] = {}  # node -> RestoreState its first worker starts from
        self._speaks_to_systemd = True  # (not a host's part: its Ray driver speaks for every host)

    # ================================================================== options

    def _node_options(self, node: Node) -> Dict[str, Any]:
        return resolve_node(node.name, self.defaults, node.options)

    def _serialize_nodes(self) -> Dict[str, bytes]:
        """Each node's pickle (cleanup() then cloudpickle), as start() hands it to its worker."""
        return {n.name: serialize_node(n, self.max_node_size) for n in self.pipeline.nodes}

    def _edge_list(self) -> List[Tuple[str, str]]:
        """The run's edges, ``(src, dst)`` by edge index: the pipeline's (the Ray backend's
        host agent runs part of a pipeline, whose cut edges end in its gateway)."""
        return self.pipeline.edges()

    # ================================================================== caller API

    def start(self) -> "Supervisor":
        """Serialize the nodes, spawn the workers and wait until every one is READY.

        Raises SerializationError (nothing was started), NodeInitError (a node failed to
        unpickle or initialize, or its worker died while loading; the traceback is the cause),
        WorkerStartTimeout.
        Everything started is stopped and cleaned up before the error is raised.
        """
        if self._arbiter is not None:
            raise SupervisorError(f"supervisor of {self.name!r} was already started")
        blobs = self._serialize_nodes()
        self._fingerprints = {name: node_fingerprint(b) for name, b in blobs.items()}  # (what reload() compares)
        edges, nodes = self._build(blobs)
        config = RunConfig(
            name=self.name,
            run_id=self.run_id,
            root=self.root,
            prefix=self.prefix,
            stop_timeout=self.stop_timeout,
            kill_timeout=self.kill_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            spin_us=self.spin_us,
            env=self.env,
            log_sink=self.log_sink,
            control=self.control_enabled,
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host,
            start_method=self.start_method,
            gateway_factory=self._gateway_factory,
            systemd=self._speaks_to_systemd,
        )
        arbiter = Arbiter(config, edges, nodes, self.status)
        for node_name, restore in self._resume.items():
            w = arbiter.workers[node_name]
            w.restore, w.resumed = restore, True
        if self._reload_source is not None:
            arbiter.on_reload = self._reload_async
        resources.create_run_dir(self.root)
        self._arbiter = arbiter
        if self._closed_by_user:
            arbiter.close_inputs()
        _LIVE.add(self)
        arbiter.start()
        while not (arbiter.ready.wait(0.1) or arbiter.finished.is_set()):
            pass
        if not arbiter.ready.is_set():
            arbiter.join()
            if arbiter.error is None and arbiter.stopped:
                raise SupervisorError(f"pipeline {self.name!r} was stopped while starting")
            raise arbiter.error or SupervisorError(f"pipeline {self.name!r} failed to start")
        return self

    def send(self, value: Any, timeout: Optional[float] = None) -> None:
        """Feed one input to the pipeline's input nodes: encoded and published on their edges
        in the calling thread (thread-safe). Blocks while their windows are full
        (backpressure); raises TimeoutError after ``timeout`` seconds, and
        FrameSerializationError (nothing sent, the pipeline goes on) when ``value`` does not
        pickle."""
        arb = self._check_running("send()")
        if self._closed_by_user:
            raise SupervisorError("send() after close(): the input stream is closed")
        if not self._input_edges:
            raise SupervisorError(f"pipeline {self.name!r} has no input nodes (every root is a Source); nothing to send to")
        frame = _encode_input(value, "the value given to send()")  # here, where an error belongs
        deadline = None if timeout is None else time.monotonic() + timeout
        gw = self._gateway(arb)
        try:
            gw.send(frame, deadline, self._raise_if_failed)
        except TimeoutError:
            raise TimeoutError(f"send(): the pipeline's inputs stayed full for {timeout} s") from None

    def recv(self, timeout: Optional[float] = None) -> Any:
        """The next output of the terminal node(s), taken from shared memory in the calling
        thread.

        Raises the builtin TimeoutError when nothing arrives within ``timeout`` seconds,
        :class:`EndOfStream` once the stream is closed and every output was received, and
        the pipeline's error (NodeError, NodeFatalError, ...) if it failed (after the outputs
        that arrived before the failure).
        """
        return self.recv_frame(timeout)[0]

    def recv_frame(self, timeout: Optional[float] = None) -> Tuple[Any, FrameInfo]:
        """Like :meth:`recv`, with the frame header (``FrameInfo``: seq, origin, stream id,
        timestamps, source node)."""
        arb = self._arbiter
        if arb is None:
            raise SupervisorError("recv() before start(): use `with Supervisor(...) as sup:` or call start()")
        if self._eos_delivered:
            raise EndOfStream(f"pipeline {self.name!r}: every output has been received")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._gateway(arb).recv(deadline, self._raise_if_failed)
        except TimeoutError:
            raise TimeoutError(f"recv(): no output within {timeout} s") from None
        except EndOfStream:
            self._eos_delivered = True
            raise EndOfStream(f"pipeline {self.name!r}: every output has been received") from None

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the outputs until EndOfStream."""
        while True:
            try:
                yield self.recv()
            except EndOfStream:
                return

    def close(self) -> None:
        """End the input stream (end of stream follows the inputs already sent)."""
        if not self._closed_by_user:
            self._closed_by_user = True
            if self._arbiter is not None:
                self._arbiter.close_inputs()

    def stop(self) -> None:
        """Graceful stop: sources stop, inputs end, frames in flight drain, every worker runs
        cleanup() and exits. Escalates to abort after ``stop_timeout`` seconds."""
        self._closed_by_user = True
        if self._arbiter is not None:
            self._arbiter.post(StopRun("stop requested"))

    # ================================================================== live changes

    def restart_node(self, node: str, wait: bool = True, timeout: float = 60.0) -> None:
        """Replace the worker of ``node`` by a new one, at a commit point: the old worker
        takes no more input, waits until its outputs are committed downstream, commits and
        exits (``cleanup()`` runs); the new one is started from the node as it was pickled
        at start (``initialize()`` runs again) and, when the node has ``snapshot()`` /
        ``restore()``, with the state it had. No frame is lost or processed twice, and the
        other workers go on. With ``wait``, returns once the new worker is READY.

        Example::

            with Supervisor([Decoder(name="dec"), Model(name="model")]) as sup:
                ...
                sup.restart_node("model")   # e.g. after its GPU was reset

        Raises SupervisorError for an unknown node or one that is not RUNNING, TimeoutError
        when ``wait`` ran out."""
        arb = self._check_running("restart_node()")
        names = self.worker_names(node)  # (every replica of a node with replicas)
        starts = {n: arb.workers[n].starts if n in arb.workers else 0 for n in names}
        self._replace({n: None for n in names}, f"restart of {node!r} requested")
        if wait:
            self._wait_replaced(starts, timeout)

    def reload_from(self, source: Callable[[], Any]) -> None:
        """Where :meth:`reload` without an argument, SIGHUP (during :meth:`run`) and the
        control socket's ``reload`` get the new pipeline: ``source()`` returns a Pipeline or
        nodes (the CLI passes one that reads the pipeline file again)."""
        self._reload_source = source
        if self._arbiter is not None:
            self._arbiter.on_reload = self._reload_async

    def reload(self, pipeline: Any = None, wait: bool = True, timeout: float = 120.0) -> List[str]:
        """Apply a new version of the pipeline without stopping it: each node whose pickled
        form (its code or its state) changed is replaced at a commit point, as by
        :meth:`restart_node` but from the new node (its state is the new one: nothing is
        restored into it); unchanged nodes are not touched. Returns the names of the nodes
        replaced; with ``wait``, once they are READY again.

        ``pipeline``: a Pipeline or nodes, as the constructor takes; None: the one
        :meth:`reload_from` gives.

        Example::

            sup.reload(Pipeline([Decoder(name="dec"), Model(name="model", threshold=0.7)]))
            # -> ['model']

        Raises ReloadError (the running pipeline goes on as it was) when the new pipeline
        has other nodes or connections, or another option that shapes its edges (queue
        sizes, policies, snapshot interval): those need a restart of the pipeline;
        SerializationError when a new node does not pickle; SupervisorError when a node to
        replace is not RUNNING."""
        arb = self._check_running("reload()")
        with self._reload_lock:
            if pipeline is None:
                if self._reload_source is None:
                    raise SupervisorError(
                        "reload() without a pipeline needs a source: give it the new pipeline, or call reload_from() first"
                    )
                pipeline = self._reload_source()
            new = as_pipeline(pipeline, self.name, self.trust_instances)
            self._check_reloadable(new)
            blobs = {n.name: serialize_node(n, self.max_node_size) for n in new.nodes}
            prints = {name: node_fingerprint(b) for name, b in blobs.items()}
            changed = [n for n in blobs if prints[n] != self._fingerprints.get(n)]
            starts = {name: w.starts for name, w in arb.workers.items()}
            # (a node with replicas: each of its workers)
            workers: Dict[str, Optional[bytes]] = {w: blobs[n] for n in changed for w in self.worker_names(n)}
            replaced = self._replace(workers, "reload") if workers else []
            self.pipeline = new  # (what the next reload compares against)
            self._fingerprints.update({n: prints[n] for n in changed})
        if wait and replaced:
            self._wait_replaced({n: starts[n] for n in replaced}, timeout)
        return replaced

    def _check_reloadable(self, new: Any) -> None:
        old = self.pipeline
        old_names, new_names = [n.name for n in old.nodes], [n.name for n in new.nodes]
        if old_names != new_names:
            added = [n for n in new_names if n not in old_names]
            removed = [n for n in old_names if n not in new_names]
            what = "; ".join(
                x for x in (f"added {', '.join(added)}" if added else "", f"removed {', '.join(removed)}" if removed else "") if x
            ) or "their order changed"
            raise ReloadError(f"reload of {self.name!r}: the nodes changed ({what}); restart the pipeline to apply it")
        if list(old.edges()) != list(new.edges()):
            raise ReloadError(f"reload of {self.name!r}: the connections changed; restart the pipeline to apply it")
        for o, n in zip(old.nodes, new.nodes):
            if isinstance(o, Source) != isinstance(n, Source):
                raise ReloadError(
                    f"reload of {self.name!r}: node {n.name!r} is {'now' if isinstance(n, Source) else 'no longer'} a "
                    "Source; restart the pipeline to apply it"
                )
            before, after = self.node_options[o.name], self._node_options(n)
            changed = [f"{k} {before[k]!r} -> {after[k]!r}" for k in before if before[k] != after.get(k)]
            if changed:
                raise ReloadError(
                    f"reload of {self.name!r}: options of node {n.name!r} changed ({', '.join(changed)}); options are "
                    "applied by a restart of the pipeline"
                )

    def _replace(self, blobs: Dict[str, Optional[bytes]], reason: str) -> List[str]:
        arb = self._check_running("replacing nodes")
        done: "Future[List[str]]" = Future()
        arb.post(ReplaceNodes(blobs, reason, done))
        while True:
            try:
                return done.result(timeout=0.1)
            except FutureTimeout:
                if arb.finished.is_set():
                    self._raise_if_failed()
                    raise SupervisorError(f"pipeline {self.name!r} has stopped")

    def _wait_replaced(self, starts: Dict[str, int], timeout: float) -> None:
        """Until each node's worker was started again since ``starts`` and is RUNNING."""
        arb = self._check_running("waiting for a replacement")
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            waiting = [
                n for n, s in starts.items()
                if not (arb.workers[n].starts > s and arb.workers[n].state is ProcessState.RUNNING)
            ]  # fmt: skip
            if not waiting:
                return
            if arb.finished.is_set():
                raise SupervisorError(f"pipeline {self.name!r} stopped while {', '.join(waiting)} was being replaced")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{', '.join(waiting)} not RUNNING again within {timeout:g} s")
            time.sleep(0.02)

    def _reload_async(self) -> "Future[List[str]]":
        """A reload from the source in a thread of its own (the arbiter must not wait on a file
        being read and its nodes built); the outcome is logged and in the future."""
        fut: "Future[List[str]]" = Future()

        def work() -> None:
            try:
                replaced = self.reload(wait=False)
            except BaseException as e:  # noqa: BLE001 - logged, and the requester gets it
                log.error("%s: reload failed, the pipeline goes on unchanged: %s", self.name, e)
                fut.set_exception(e)
                return
            log.info("%s: reload: %s", self.name, f"replacing {', '.join(replaced)}" if replaced else "nothing changed")
            fut.set_result(replaced)

        threading.Thread(target=work, name=f"remotemedia-reload-{self.name}", daemon=True).start()
        return fut

    def kill(self) -> None:
        """Abort now: workers get Abort (cleanup() then exit), SIGKILL after kill_timeout."""
        self._closed_by_user = True
        if self._arbiter is not None:
            self._arbiter.post(AbortRun("kill requested"))

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until the run has ended and everything was cleaned up. True when it has.
        Outputs nobody receives are taken meanwhile (kept for recv()), so a closed stream
        drains without a reader."""
        arb = self._arbiter
        if arb is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while not arb.finished.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            gw = arb.gateway
            if gw is not None and not gw.closed and threading.current_thread() is not arb._thread:
                gw.service()
                gw.wait(deadline)
            else:
                arb.finished.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
        if arb.finished.is_set():
            arb.join()
            return True
        return False

    @property
    def workers(self) -> Dict[str, WorkerProcess]:
        """Node name -> its worker process (read-only view; empty before start())."""
        return dict(self._arbiter.workers) if self._arbiter is not None else {}

    def worker_pids(self) -> Dict[str, Optional[int]]:
        """Node name -> pid of its current worker process (None while not running)."""
        return {n: (w.pid if w.alive else None) for n, w in self.workers.items()}

    def states(self) -> Dict[str, str]:
        """Node name -> worker state (STARTING, RUNNING, EXITED, ...)."""
        return {n: w.state.value for n, w in self.workers.items()}

    @property
    def running(self) -> bool:
        return self._arbiter is not None and not self._arbiter.finished.is_set()

    @property
    def phase(self) -> str:
        """``new``, ``booting``, ``running``, ``draining``, ``aborting`` or ``finished``."""
        return self._arbiter.phase.value if self._arbiter is not None else "new"

    def run(
        self,
        inputs: Optional[Iterable[Any]] = None,
        on_output: Optional[Callable[[Any, FrameInfo], None]] = None,
    ) -> RunReport:
        """Run until the sources are exhausted (and ``inputs``, if given, are all processed)
        and every frame is drained, or until SIGINT/SIGTERM (then drain and stop cleanly; a
        second signal aborts). Returns a :class:`RunReport` with the outputs.

        ``inputs`` may be any iterable, also an endless generator: it is consumed in the
        calling thread as the pipeline accepts frames. With ``on_output``, each output is
        handed to ``on_output(value, frame_info)`` as it arrives instead of being collected
        (for long-running services).

        Raises the pipeline's error (NodeError, NodeInitError, NodeFatalError, ...) after
        everything was stopped and cleaned up. An exception raised by ``on_output`` aborts the
        pipeline, then propagates. run() works once per Supervisor (SupervisorError after).
        """
        if self._run_called or (self._arbiter is not None and self._arbiter.finished.is_set()):
            raise SupervisorError(
                f"run() works once per Supervisor, and the supervisor of {self.name!r} has already run "
                "(its workers have exited and its shared memory is gone); create a new Supervisor "
                "for another run (Pipeline.run() does that on every call)"
            )
        self._run_called = True
        self._copy_outputs = on_output is None
        restore = self._install_signal_handlers()
        try:
            if self._arbiter is None:
                try:
                    self.start()
                except SupervisorError:
                    arb = self._arbiter
                    if arb is None or arb.error is not None or not arb.stopped:
                        raise
                    # stopped (a signal) while starting: a graceful stop of a run that had not begun
            arb = self._arbiter
            assert arb is not None
            self._check_run_inputs(inputs)
            if inputs is None and not self._closed_by_user:
                self.close()
            outputs = _Outputs(on_output)
            _RunLoop(self, arb, iter(inputs) if inputs is not None else None, outputs.deliver).run()
            self.join()
            if arb.error is not None:
                raise arb.error
            return outputs.report(self)
        except BaseException:
            if self.running:  # on_output raised: nothing may outlive the call
                self.kill()
                self.join()
            raise
        finally:
            restore()

    def _check_run_inputs(self, inputs: Optional[Iterable[Any]]) -> None:
        """run()'s ``inputs`` (None: none), refused for a pipeline without input nodes and
        when they are not an iterable of frames."""
        if inputs is None:
            return
        if not self._input_edges:
            raise SupervisorError(f"pipeline {self.name!r} has no input nodes (every root is a Source); run it without inputs")
        if isinstance(inputs, (str, bytes, dict)):
            raise NodeTypeError(f"inputs must be an iterable of frames (e.g. a list), got {type(inputs).__name__}")

    def report(self, outputs: Optional[List[Any]] = None) -> RunReport:
        """Statistics of the run so far."""
        arb = self._arbiter
        if arb is None:
            return RunReport(self.name, 0.0, outputs or [])
        end = arb.ended_at or time.monotonic()
        aborted = arb.abort_reason
        return RunReport(
            self.name,
            end - (arb.started_at or end),
            outputs or [],
            {name: w.report() for name, w in arb.workers.items()},
            arb.stopped,
            killed=arb.killed,
            aborted=aborted,
            killed_nodes=[n for n, w in arb.workers.items() if w.killed_at_stop],
            unprocessed_inputs=arb.unprocessed_inputs if aborted is not None else 0,
            unprocessed_source_frames=(
                sum(max(0, w.generated - w.restore.source_position) for w in arb.workers.values() if w.spec.is_source)
                if aborted is not None
                else 0
            ),
        )

    def status(self) -> Dict[str, Any]:
        """Per-node figures (state, pid, restarts, frames, frames/s, latency, RSS, CPU, queues),
        the data behind ``remotemedia-supervisor status``."""
        arb = self._arbiter
        if arb is None:
            return build_status(Snapshot(self.name, self.run_id, "new", None, {}))
        return build_status(arb.snapshot())

    def status_line(self) -> str:
        return self._arbiter.status_line() if self._arbiter is not None else "0 workers up, phase new"

    def unhealthy_workers(self) -> List[str]:
        """See :meth:`Arbiter.unhealthy_workers`."""
        return self._arbiter.unhealthy_workers() if self._arbiter is not None else []

    def progress(self) -> "Progress":
        """The run's progress as of now (read live from the workers' status blocks, not from
        the last heartbeat), the figures behind ``start``'s progress line.

        >>> sup = Supervisor([RangeSource(300)])          # doctest: +SKIP
        >>> sup.progress()                                 # doctest: +SKIP
        Progress(generated=0, total=300, inputs=0, restarts=0, phase='new')
        """
        arb = self._arbiter
        total = sum(self.totals.values()) if self.totals is not None else None
        if arb is None:
            return Progress(0, total, 0, 0, "new")
        generated = restarts = 0
        for w in list(arb.workers.values()):
            restarts += w.restarts
            if not w.spec.is_source:
                continue
            done = w.generated  # as of its last exit
            board = w.board
            if board is not None and w.alive:
                try:
                    # A restart replays from its last commit: never below what it had reached.
                    done = max(done, w.source_start + board.get("frames_in"))
                except ValueError:  # (the block was released as the run ended)
                    pass
            generated += done
        gw = arb.gateway
        return Progress(generated, total, gw.sent if gw is not None else 0, restarts, arb.phase.value)

    def _source_totals(self) -> Optional[Dict[str, int]]:
        totals = {}
        for n in self.pipeline.sources:
            try:
                totals[n.name] = len(n)  # type: ignore[arg-type]
            except TypeError:
                return None
        return totals or None

    def __enter__(self) -> "Supervisor":
        if not self._started():
            self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.kill()
            self.join()
            return
        self.close()
        # Outputs nobody asked for are dropped; the stream still drains to a clean end.
        if not self.join(self.stop_timeout):
            self.stop()
            self.join()
        error = self._run_error()
        if error is not None:
            raise error

    def _started(self) -> bool:
        """start() was called (the Ray backend's driver says it its own way)."""
        return self._arbiter is not None

    def _run_error(self) -> Optional[BaseException]:
        """The error the run failed with, once it has ended."""
        return self._arbiter.error if self._arbiter is not None else None

    # ================================================================== plumbing for the caller

    def _check_running(self, what: str) -> "Arbiter":
        arb = self._arbiter
        if arb is None:
            raise SupervisorError(f"{what} before start(): use `with Supervisor(...) as sup:` or call start()")
        self._raise_if_failed()
        return arb

    def _raise_if_failed(self) -> None:
        arb = self._arbiter
        if arb is not None and arb.error is not None:
            raise arb.error

    def _gateway(self, arb: "Arbiter") -> Gateway:
        gw = arb.gateway
        if gw is None:  # (start() returns once the gateway exists; a failed start raised)
            self._raise_if_failed()
            raise SupervisorError(f"pipeline {self.name!r} has stopped")
        gw.copy_outputs = self._copy_outputs
        return gw

    def _install_signal_handlers(self) -> Callable[[], None]:
        """While run() runs: every signal that would end the process drains the pipeline
        instead (a second one kills the workers), so that nothing is left behind; see
        _STOP_SIGNALS and _IGNORED_SIGNALS."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        count = [0]

        def handler(signum: int, frame: Any) -> None:
            # Only post a command: the arbiter thread acts on it.
            count[0] += 1
            arb = self._arbiter
            if arb is None:
                return
            if signum == signal.SIGHUP and self._reload_source is not None:
                count[0] -= 1  # (a reload, not a stop)
                arb.post(ReloadRun("SIGHUP received"))
            elif count[0] == 1:
                log.warning("%s: %s received, draining (send it again to kill)", self.name, signal.Signals(signum).name)
                arb.post(StopRun(f"{signal.Signals(signum).name} received"))
            else:
                arb.post(AbortRun("second signal", hard=True))

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

    def worker_names(self, node: str) -> List[str]:
        """The workers of pipeline node ``node``: ``[node]``, or ``node[0]`` … ``node[N-1]``
        for a node with ``replicas`` N > 1."""
        n = self.pipeline.replicas(node) if node in (x.name for x in self.pipeline.nodes) else 1
        return [node] if n == 1 else [replica_name(node, i) for i in range(n)]

    def _build(self, blobs: Dict[str, bytes]) -> Tuple[List[EdgeSpec], List[Tuple[WorkerSpec, bytes, Dict[str, Any]]]]:
        """The edges and every worker's WorkerSpec. The caller's edges end in the gateway,
        like any other edge in a worker. A node with ``replicas`` N > 1 becomes N workers
        ``name[i]`` (each unpickles its own copy of the node), each with its own edges from
        the node's upstream and to each of its downstream nodes (see
        :mod:`supervisor.worker.replicas`)."""
        p = self.pipeline
        workers = {n.name: self.worker_names(n.name) for n in p.nodes}
        index_of = {w: i for i, w in enumerate(w for n in p.nodes for w in workers[n.name])}
        inbox = lambda name: GATEWAY_INBOX if name in (INPUT, OUTPUT) else f"in/w{index_of[name]}"  # noqa: E731
        bell = lambda name: GATEWAY_SLOT if name in (INPUT, OUTPUT) else worker_slot(index_of[name])  # noqa: E731
        edges: List[EdgeSpec] = []
        for src, dst in self._edge_list():
            consumer_opts = self.node_options.get(dst, self.defaults)
            srcs, dsts = workers.get(src, [src]), workers.get(dst, [dst])
            replicas = max(len(srcs), len(dsts))  # (Pipeline refuses replicas at both ends)
            for si, s in enumerate(srcs):
                for di, d in enumerate(dsts):
                    i = len(edges)
                    edges.append(
                        EdgeSpec(
                            index=i,
                            src=s,
                            dst=d,
                            data_service=f"e{i}/data",
                            ack_service=f"e{i}/ack",
                            src_inbox=inbox(s),
                            dst_inbox=inbox(d),
                            src_bell=bell(s),
                            dst_bell=bell(d),
                            depth=consumer_opts["queue_depth"],
                            max_borrowed=self.max_borrowed,
                            policy=consumer_opts["queue_policy"],
                            max_bytes=consumer_opts["queue_bytes"],
                            replica=-1 if replicas == 1 else max(si, di),
                            replicas=replicas,
                        )
                    )
        edges = with_retention_allowance(edges)
        nodes = []
        for node in p.nodes:
            opts = self.node_options[node.name]
            for w in workers[node.name]:
                spec = WorkerSpec(
                    name=w,
                    index=index_of[w],
                    run_id=self.run_id,
                    prefix=self.prefix,
                    root=self.root,
                    inbox=inbox(w),
                    bell=bell(w),
                    in_edges=tuple(e for e in edges if e.dst == w),
                    out_edges=tuple(e for e in edges if e.src == w),
                    is_source=isinstance(node, Source),
                    on_error=opts["on_error"],
                    heartbeat_interval=self.heartbeat_interval,
                    log_level=self.log_level,
                    snapshot_interval=opts["snapshot_interval"],
                    dead_letter_dir=self.dead_letter_dir,
                    spin_us=self.spin_us,
                    handover_timeout=self.handover_timeout,
                )
                nodes.append((spec, blobs[node.name], opts))
        return edges, nodes


@dataclass(frozen=True)
class Progress:
    """What :meth:`Supervisor.progress` returns."""

    generated: int  #: items the sources have produced so far (over restarts, each counted once)
    total: Optional[int]  #: items the sources produce in all, when every source has a length
    inputs: int  #: items of run()'s inputs sent into the pipeline
    restarts: int  #: worker restarts so far, all nodes together
    phase: str  #: ``new``, ``booting``, ``running``, ``draining``, ``aborting`` or ``finished``


#: An inputs iterator whose next() took longer than this (seconds) is treated as paced.
_SLOW_NEXT = 50e-6


class _Outputs:
    """What run() returns of the outputs: each handed to ``on_output`` as it comes, or
    collected and ordered by the input they derive from (then by arrival)."""

    def __init__(self, on_output: Optional[Callable[[Any, FrameInfo], None]]) -> None:
        self.on_output = on_output
        self.got: List[Tuple[int, int, Any]] = []
        self.count = 0

    def deliver(self, value: Any, info: FrameInfo) -> None:
        if self.on_output is not None:
            self.on_output(value, info)
        else:
            self.got.append((info.origin, self.count, value))
        self.count += 1

    def report(self, sup: "Supervisor") -> RunReport:
        """``sup``'s report, with the outputs collected and how many there were."""
        self.got.sort(key=lambda t: (t[0], t[1]))
        report = sup.report([v for _, _, v in self.got])
        report.output_count = self.count
        return report


class _RunLoop:
    """The caller's side of :meth:`Supervisor.run`, in the caller's thread: feed the inputs
    as the input edges take them, hand over the outputs as they come, until the run is
    finished. One wait point: the gateway's inbox."""

    def __init__(self, sup: Supervisor, arb: Arbiter, inputs: Optional[Iterator[Any]], deliver: Callable[[Any, FrameInfo], None]) -> None:
        self.sup = sup
        self.arb = arb
        self.inputs = inputs
        self.deliver = deliver
        self.held: Optional[EncodedFrame] = None  # encoded, waiting for room
        self.position = 0  # items taken from the inputs (for error messages)
        self.slow_inputs = False  # the last next() took long: wake the input nodes per item

    def run(self) -> None:
        arb = self.arb
        while True:
            gw = arb.gateway
            if gw is None or arb.finished.is_set():
                break
            gw.copy_outputs = self.sup._copy_outputs
            fed = self.feed(gw) if self.inputs is not None else False
            got = self.drain(gw)
            if arb.error is not None:
                break
            if gw.closed:  # the run is ending: the arbiter is cleaning up
                arb.finished.wait(0.05)
            elif not (fed or got):
                gw.wait(None)
        arb.join()
        gw = arb.gateway
        if gw is not None and arb.error is None:
            self.drain(gw)  # outputs taken before the end (private copies by now)

    def feed(self, gw: Gateway) -> bool:
        """Send inputs while the windows have room, waking the input nodes once for the batch.
        True when something was sent."""
        try:
            return self._feed(gw)
        finally:
            gw.flush()

    def _feed(self, gw: Gateway) -> bool:
        sent = False
        while self.inputs is not None:
            if gw.inputs_closed or gw.closed:  # stopped (stop(), a signal, a failure)
                self.inputs = None
                break
            if self.held is None:
                if sent and self.slow_inputs:
                    # A paced iterator (a camera, a socket) may block in next(): what was sent
                    # must not wait for it. A fast one (a list, a range) gets one wake-up for
                    # the whole batch.
                    gw.flush()
                t0 = time.perf_counter()
                try:
                    value = next(self.inputs)
                except StopIteration:
                    self.inputs = None
                    self.sup.close()
                    break
                except Exception as e:
                    self.inputs = None
                    self.arb.post(FailRun(SupervisorError(f"the inputs iterator raised {type(e).__name__}: {e}")))
                    break
                self.slow_inputs = time.perf_counter() - t0 > _SLOW_NEXT
                position = self.position
                self.position += 1
                try:
                    self.held = _encode_input(value, f"item {position} of run()'s inputs")
                except FrameSerializationError as e:
                    self.inputs = None
                    self.arb.post(FailRun(e))
                    break
            try:
                if not gw.try_send(self.held, notify=False):
                    break
            except SupervisorError:  # (closed meanwhile)
                self.inputs = None
                break
            self.held = None
            sent = True
        return sent

    def drain(self, gw: Gateway) -> bool:
        """Hand over every output ready now. True when there was one."""
        got = gw.take()
        for value, info in got:
            self.deliver(value, info)
        return bool(got)
