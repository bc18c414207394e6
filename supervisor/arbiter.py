"""The arbiter: the loop that supervises a run (after gunicorn's ``Arbiter``). It never moves
a frame of its own; the caller's frames go through the :class:`~supervisor.gateway.Gateway`
in the caller's thread.

::

    caller thread (Supervisor)              arbiter thread (Arbiter.run)
    --------------------------              ----------------------------
    start() ..... waits ready ........      spawn a WorkerProcess per node; Ready from all
                                            -> Start the sources -> ready
    send()/recv()/run() -- Gateway -->      (frames: the caller's thread, never here)
    stop()/kill()/signal -> post(cmd) -->   loop:
                                              wait: wake-up pipe, worker sockets and
                                                    output pipes, control socket, deadlines
                                              commands (StopRun, AbortRun, FailRun)
                                              worker messages (Ready, Commit, Gap, ...)
                                              gateway.service()   acks/resends nobody did
                                              reap     each child by its own handle
                                              murder   deadlines: init, process, heartbeat,
                                                       memory, kill
                                              manage   restarts whose backoff is over
                                              service  sampling, systemd status/watchdog
                                              done?    every output ended, workers exited
    run()/join() return  <---------------   shutdown: SIGKILL leftovers, close gateway and
                                            ports, purge the run's shared memory

Workers and the gateway are both *endpoints*: a restart replays the edges into the restarted
worker from their producers, whichever they are, and asks the consumers of its outputs what
they committed, whichever they are.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
from concurrent.futures import Future
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import RemoteMediaError, SharedMemoryFullError, SupervisorError
from remotemedia.options import DEFAULTS
from remotemedia.pipeline import INPUT, OUTPUT

from . import resources
from .channels import Transport
from .control import ControlServer
from .doorbells import RunDoorbells
from .gateway import Gateway
from .launch import Launcher, imported_modules, make_launcher
from .tracebacks import forget_locals
from .logring import logs_request_error
from .logs import LogSink
from .process import WorkerProcess
from .protocol import (
    Abort,
    Commit,
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
    Start,
    WorkerSpec,
    replica_name,
)
from .states import ProcessState
from .systemd import SystemdNotifier

__all__ = ["Arbiter", "Phase", "StopRun", "AbortRun", "FailRun", "CallInLoop", "RunConfig", "Snapshot"]

log = logging.getLogger("remotemedia.supervisor")


class Phase(enum.Enum):
    """Phase of a run: NEW -> BOOTING -> RUNNING -> DRAINING/ABORTING -> FINISHED."""

    NEW = "new"
    BOOTING = "booting"
    RUNNING = "running"
    DRAINING = "draining"
    ABORTING = "aborting"
    FINISHED = "finished"

    def __str__(self) -> str:
        return self.value


#: Phases in which crashed workers are restarted (a pending restart matters only then).
_RESTART_PHASES = (Phase.BOOTING, Phase.RUNNING, Phase.DRAINING)


# ------------------------------------------------------------------ commands (caller -> arbiter)


@dataclass(frozen=True)
class StopRun:
    """Drain: sources stop, inputs end, frames in flight finish; abort after stop_timeout."""

    reason: str


@dataclass(frozen=True)
class AbortRun:
    """Abort now (Abort to every worker, SIGKILL after kill_timeout), or SIGKILL at once."""

    reason: str
    hard: bool = False


@dataclass(frozen=True)
class FailRun:
    """The caller's side failed (the inputs iterator raised, an input does not pickle)."""

    error: BaseException


@dataclass(frozen=True)
class ReplaceNodes:
    """Replace workers at a commit point (see WorkerProcess.replace): ``blobs`` maps a node
    to its new pickled node (a reload; unchanged ones are left alone) or None (a restart).
    ``done`` gets the names of the nodes being replaced, or the error."""

    blobs: Dict[str, Optional[bytes]]
    reason: str
    done: "Future[List[str]]"


@dataclass(frozen=True)
class ReloadRun:
    """SIGHUP: re-read the pipeline's source and replace the nodes that changed."""

    reason: str


@dataclass(frozen=True)
class CallInLoop:
    """Run ``fn()`` in the arbiter thread, between two turns (it reads the workers' books
    consistently: nothing else changes them meanwhile); ``done`` gets its result or error.
    Used by the Ray backend's host agent for its checkpoints (supervisor.ray.agent)."""

    fn: Callable[[], Any]
    done: "Future[Any]"


Command = Union[StopRun, AbortRun, FailRun, ReplaceNodes, ReloadRun, CallInLoop]


@dataclass
class RunConfig:
    """Settings of the whole run (per-node options are in each WorkerProcess)."""

    name: str
    run_id: str
    root: str
    prefix: str
    stop_timeout: float
    kill_timeout: float
    heartbeat_timeout: float
    spin_us: int
    env: Dict[str, str]
    log_sink: LogSink
    control: bool = True
    metrics_port: Optional[int] = None
    metrics_host: str = "127.0.0.1"
    start_method: str = DEFAULTS.start_method
    #: Makes the caller's end of the edges (default: :class:`Gateway`); same arguments.
    gateway_factory: Optional[Callable[..., Gateway]] = None
    #: Whether the run tells systemd ($NOTIFY_SOCKET) about itself: not a host's part of a
    #: run across hosts, whose driver speaks for every host.
    systemd: bool = True


@dataclass
class Snapshot:
    """What status, metrics and systemd read: never the arbiter's fields themselves."""

    name: str
    run_id: str
    phase: str
    started_at: Optional[float]
    workers: Dict[str, WorkerProcess]
    in_flight: Dict[int, int] = field(default_factory=dict)  # the caller's input edges
    launcher: Dict[str, Any] = field(default_factory=dict)  # how workers start (Launcher.describe)


class Arbiter:
    """Supervises one run in its own thread. Created and started by the Supervisor."""

    def __init__(
        self,
        config: RunConfig,
        edges: List[EdgeSpec],
        nodes: List[Tuple[WorkerSpec, bytes, Dict[str, Any]]],
        status: Callable[[], Dict[str, Any]],
    ) -> None:
        self.config = config
        self.name = config.name
        self.edges = edges
        self.workers: Dict[str, WorkerProcess] = {
            spec.name: WorkerProcess(self, blob, spec, options) for spec, blob, options in nodes
        }
        self._status_fn = status  # () -> status dict (for the control socket)
        self.env = config.env
        self.log_sink = config.log_sink
        self.kill_timeout = config.kill_timeout
        self.heartbeat_timeout = config.heartbeat_timeout
        self._input_edges = [e for e in edges if e.src == INPUT]
        self._output_edges = [e for e in edges if e.dst == OUTPUT]
        self.phase = Phase.NEW
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.gateway: Optional[Gateway] = None
        self.stopped = False
        self.killed = False  # workers were SIGKILLed on request (second signal)
        self.abort_reason: Optional[str] = None  # why the run stopped without a drain
        self.unprocessed_inputs = 0  # counted when the gateway closes
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._inputs_closed = False
        self._stop_deadline: Optional[float] = None
        self._uncleanable_nodes = 0  # dead iceoryx2 nodes that failed to clean up (warned once each)
        self._cmds: "queue.SimpleQueue[Command]" = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._iox: Any = None
        self._bells: Optional[RunDoorbells] = None
        # How workers start; a template is started by run(), in the arbiter thread: it dies
        # with that thread, as the workers it forks die with it.
        self.launcher: Launcher = make_launcher(
            config.start_method,
            self.env,
            imported_modules(w.blob for w in self.workers.values()),
            hello_timeout=max((w.options["init_timeout"] for w in self.workers.values()), default=60.0),
        )
        #: Starts a reload from the pipeline's source (in a thread of its own) and returns its
        #: future: the nodes replaced, or the error. None: nothing to reload from.
        self.on_reload: Optional[Callable[[], "Future[List[str]]"]] = None
        self._control: Optional[ControlServer] = None
        self._metrics_server: Any = None
        self._notifier = SystemdNotifier() if config.systemd else SystemdNotifier(env={})
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._next_sample = 0.0
        self._thread: Optional[threading.Thread] = None
        # endpoint of each node name: its WorkerProcess, or the gateway for the caller's edges
        self._endpoints: Dict[str, Any] = dict(self.workers)

    # ================================================================== from the caller

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.phase = Phase.BOOTING
        self._thread = threading.Thread(target=self.run, name=f"remotemedia-arbiter-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def doorbell_fd(self) -> int:
        return self._bells.fd if self._bells is not None else -1

    def post(self, cmd: Command) -> None:
        """Queue a command for the arbiter thread (signal handlers call this and nothing else)."""
        self._cmds.put(cmd)
        self.poke()

    def poke(self, *_: Any) -> None:
        """Wake the arbiter thread (e.g. an answer of the control socket is ready)."""
        fd = self._wake_w
        if fd < 0:  # the run is over; closed descriptors may have been reused
            return
        try:
            os.write(fd, b"x")
        except (BlockingIOError, OSError):
            pass

    def close_inputs(self) -> None:
        """End the caller's input stream (thread-safe, no command needed)."""
        self._inputs_closed = True
        gw = self.gateway
        if gw is not None:
            gw.close_inputs()

    # ================================================================== thread

    def run(self) -> None:
        try:
            self.launcher.prepare()  # (first: a template imports while the rest is set up)
            resources.cleanup_stale_runs()
            resources.check_shm_space(f"starting pipeline {self.name!r}")
            self._iox = bridge.Node(self.config.prefix, "supervisor", self.config.root)
            self._bells = RunDoorbells(1 + len(self.workers))
            self.gateway = (self.config.gateway_factory or Gateway)(
                Transport(self._iox, self._bells.bells),
                self._input_edges,
                self._output_edges,
                self.config.spin_us,
                on_error=self._caller_failed,
            )
            if self._inputs_closed:  # (close() before the gateway existed)
                self.gateway.close_inputs()
            self._endpoints[INPUT] = self._endpoints[OUTPUT] = self.gateway
            if self.config.control:
                self._control = ControlServer(self.name, self._on_control)
            if self.config.metrics_port is not None:
                from .metrics import serve_metrics

                self._metrics_server = serve_metrics(self._status_fn, self.config.metrics_port, self.config.metrics_host)
            for w in self.workers.values():
                w.spawn()
            while self.phase is not Phase.FINISHED:
                self.tick()
        except BaseException as e:  # noqa: BLE001 - the caller must see every failure
            if isinstance(e, SharedMemoryFullError):
                self.explain_shm_full(e)  # (before it is logged)
            log.exception("supervisor %s failed", self.name, extra={"node": getattr(e, "node", None)})
            self.fail(e if isinstance(e, RemoteMediaError) else SupervisorError(f"supervisor failed: {e!r}"))
            forget_locals(e)  # (kept by log records too, also when the error raised is a wrapper)
        finally:
            self._shutdown()

    def tick(self) -> None:
        """One turn: wait, then everything that may have changed."""
        self._wait(self._next_timeout())
        self._handle_commands()
        if self._control is not None:
            self._control.poll()
        for w in list(self.workers.values()):
            w.read_output()
            for msg in w.receive():
                self._on_message(w, msg)
        self._service_gateway()
        self.launcher.pump()  # (the exits a template reported)
        self.reap_workers()
        self.murder_workers()
        self.manage_workers()
        self._service_tick()
        self._check_done()

    def _wait(self, timeout: float) -> None:
        fds = [self._wake_r]
        for w in self.workers.values():
            fds.extend(w.fds())
        if self._control is not None:
            fds.extend(self._control.fds())
        fds.extend(self.launcher.fds())
        # poll, not select: a big pipeline's descriptors (about 5 per worker) pass FD_SETSIZE
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            poller.poll(timeout * 1000)
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self) -> float:
        t = 0.5
        if any(w.chan is not None and w.chan.closed and w.alive for w in self.workers.values()):
            t = 0.01  # a channel hung up: reap the process promptly
        if self.phase in (Phase.DRAINING, Phase.ABORTING):
            t = min(t, 0.05)
        gw = self.gateway
        if gw is not None and gw.busy():
            t = min(t, 0.02)
        now = time.monotonic()
        restarting = self.phase in _RESTART_PHASES  # else a pending restart is no deadline
        for w in self.workers.values():
            d = w.next_deadline(restarting)
            if d is not None:
                t = min(t, max(0.0, d - now))
        return t

    def _handle_commands(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, StopRun):
                self.begin_drain(cmd.reason)
            elif isinstance(cmd, AbortRun):
                if cmd.hard:
                    self.stopped = True
                self.begin_abort(cmd.reason, hard=cmd.hard)
            elif isinstance(cmd, FailRun):
                self.fail(cmd.error)
            elif isinstance(cmd, ReplaceNodes):
                try:
                    cmd.done.set_result(self.replace_nodes(cmd.blobs, cmd.reason))
                except BaseException as e:  # noqa: BLE001 - the requester gets it
                    cmd.done.set_exception(e)
            elif isinstance(cmd, ReloadRun):
                self._reload(cmd.reason)
            elif isinstance(cmd, CallInLoop):
                try:
                    cmd.done.set_result(cmd.fn())
                except BaseException as e:  # noqa: BLE001 - the requester gets it
                    cmd.done.set_exception(e)

    # ================================================================== replacing workers

    def replace_nodes(self, blobs: Dict[str, Optional[bytes]], reason: str) -> List[str]:
        """Replace the named workers at a commit point (arbiter thread): a restart
        (``None``) or a reload (the node's new blob). Everything is checked before anything is
        replaced. Returns the nodes being replaced; they are RUNNING again once their
        replacement is READY."""
        if self.phase is not Phase.RUNNING:
            raise SupervisorError(f"pipeline {self.name!r} is {self.phase.value.lower()}: nodes are replaced only while it runs")
        # (a node with replicas, by its name: each of its workers)
        blobs = {
            w: b
            for n, b in blobs.items()
            for w in ([n] if n in self.workers or replica_name(n, 0) not in self.workers else
                      [x for x in self.workers if x.startswith(n + "[")])
        }  # fmt: skip
        unknown = [n for n in blobs if n not in self.workers]
        if unknown:
            raise SupervisorError(
                f"pipeline {self.name!r} has no node named {unknown[0]!r}; its nodes: {', '.join(self.workers)}"
            )
        for n, b in blobs.items():  # (raises for a node that is not RUNNING, before any is touched)
            self.workers[n].check_replaceable(reload=b is not None)
        for n, b in blobs.items():
            self.workers[n].replace(reason, b)
        return sorted(blobs)

    def _reload(self, reason: str) -> None:
        """SIGHUP: reload from the pipeline's source in the background (a file is read and
        its nodes built there, not in this loop); the outcome is logged."""
        if self.on_reload is None:
            log.warning("%s: %s, but this pipeline has no source to reload from (not started from a file)", self.name, reason)
            return
        log.info("%s: %s, reloading", self.name, reason)
        self.on_reload()  # (logs the outcome itself)

    def _caller_failed(self, err: BaseException) -> None:
        """The gateway failed in a caller's thread (or in service()): fail the run. (Called
        before the error is raised there: it leaves explained.)"""
        if isinstance(err, SharedMemoryFullError):
            self.explain_shm_full(err)  # (reads only the edges: safe from any thread)
        if threading.current_thread() is self._thread:
            self.fail(err if isinstance(err, RemoteMediaError) else SupervisorError(f"supervisor failed: {err!r}"))
        else:
            self.post(FailRun(err))

    def _service_gateway(self) -> None:
        gw = self.gateway
        if gw is None:
            return
        for edge, after in gw.service():
            self.replay_to(edge, after)

    # ================================================================== worker messages

    def _on_message(self, w: WorkerProcess, msg: Any) -> None:
        if isinstance(msg, Hello):
            w.pid = msg.pid
        elif isinstance(msg, Ready):
            w.ready(msg.init_seconds)
            self._on_worker_ready(w)
        elif isinstance(msg, InitFailed):
            err = w.init_failed_error(msg)
            if err is not None:
                self.fail(err)
        elif isinstance(msg, NodeFailed):
            err = w.node_failed_error(msg, self.explain_shm_full)
            if msg.fatal:
                self.fail(err)
            else:
                log.warning("node %s (pid %s) skipped frame %s: %s: %s", w.name, w.pid, msg.seq, msg.exc_type, msg.message, extra={"node": w.name})
        elif isinstance(msg, Commit):
            w.commit(msg)
            if msg.final:
                for edge, seq in msg.in_seqs.items():
                    self._endpoints[self.edges[edge].src].apply_ack(edge, seq + 1, seq + 1)
        elif isinstance(msg, DeadLetter):
            w.dead_letters += 1
        elif isinstance(msg, Gap):
            self.replay_to(msg.edge, msg.expected - 1)
        elif isinstance(msg, Heartbeat):
            w.heartbeat(msg.stats)
        elif isinstance(msg, Done):
            w.stats = msg.stats
            w.done = True

    def _on_worker_ready(self, w: WorkerProcess) -> None:
        # Producers resend whatever this worker has not committed (nothing on a first start).
        for e in w.spec.in_edges:
            self.replay_to(e.index, w.restore.in_seqs.get(e.index, -1))
        if self.phase is Phase.BOOTING:
            if all(x.state is ProcessState.RUNNING for x in self.workers.values()):
                self.phase = Phase.RUNNING
                for x in self.workers.values():
                    if x.spec.is_source:
                        x.send(Start())
                self.ready.set()
                log.info("pipeline %s: %d workers ready", self.name, len(self.workers))
                self._notifier.notify("READY=1", f"STATUS={self.status_line()}")
        elif w.spec.is_source:
            w.send(Start())
            if self.phase is Phase.DRAINING:
                w.send(Drain())

    def replay_to(self, edge_index: int, after: int) -> None:
        """The consumer of ``edge_index`` has committed up to ``after``: its producer resends
        the rest."""
        self._endpoints[self.edges[edge_index].src].replay(edge_index, after)

    # ------------------------------------------------------------------ Context of WorkerProcess

    @property
    def booting(self) -> bool:
        return self.phase is Phase.BOOTING

    @property
    def ending(self) -> bool:
        return self.phase in (Phase.ABORTING, Phase.FINISHED)

    def committed_count(self, e: EdgeSpec) -> int:
        """Frames of edge ``e`` its consumer has committed, as far as the supervisor knows."""
        return self._endpoints[e.dst].committed(e.index)

    def ring_control(self, slot: int) -> None:
        bells = self._bells
        if bells is not None:
            bells.bells.ring_control(slot)

    def consumer_finished(self, e: EdgeSpec) -> bool:
        return self._endpoints[e.dst].finished(e.index)

    # ================================================================== processes

    def reap_workers(self) -> None:
        """Collect the exit status of every worker that exited (each by its own handle)."""
        for w in self.workers.values():
            rc = w.poll_exit()
            if rc is None:
                continue
            w.sync_commit()  # its last commit point, before anything resets its status block
            for msg in w.receive():  # messages written just before exiting
                self._on_message(w, msg)
            w.collect_remains(rc)
            try:
                # bounded: every iceoryx2 storage of the run is file based, and opening one that
                # is not (or no longer) initialized gives up after iceoryx2's creation_timeout
                _cleaned, failed = self._iox.cleanup_dead_nodes()
                if failed > self._uncleanable_nodes:
                    # Seen when a worker is SIGKILLed while it exits (iceoryx2 removing its
                    # node): such a node fails again at every later reap, so say it once.
                    log.warning(
                        "%d dead iceoryx2 node(s) of run %s could not be cleaned up (seen when a worker is killed "
                        "while it exits); their files are removed with the run's directory when the run ends",
                        failed, self.config.run_id,
                    )
                self._uncleanable_nodes = max(self._uncleanable_nodes, failed)
            except Exception as e:  # pragma: no cover - cleanup must not kill the arbiter
                log.warning("dead-node cleanup failed: %s", e)
            w.finish(rc)

    def murder_workers(self) -> None:
        now, now_ns = time.monotonic(), time.monotonic_ns()
        aborting = self.phase is Phase.ABORTING
        for w in self.workers.values():
            w.check_deadlines(now, now_ns, aborting)
        if self.phase is Phase.DRAINING and self._stop_deadline is not None and now > self._stop_deadline:
            log.warning("pipeline %s did not drain within %.1f s; aborting", self.name, self.config.stop_timeout)
            self.begin_abort(f"drain timeout: not drained within stop_timeout={self.config.stop_timeout:g} s")

    def manage_workers(self) -> None:
        """Start the workers whose backoff delay has passed (also while booting: a worker that
        crashed after its READY while another one still initializes)."""
        if self.phase not in _RESTART_PHASES:
            return
        now = time.monotonic()
        for w in self.workers.values():
            if w.restart_due(now):
                w.restart()

    # ================================================================== service: status, systemd

    def _service_tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_sample:
            self._next_sample = now + 0.5
            for w in self.workers.values():
                w.sample()
        if not self._notifier.enabled or self.phase not in (Phase.RUNNING, Phase.DRAINING):
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
            silent = w.silent_for(now_ns)
            if silent is not None and silent > self.heartbeat_timeout:
                out.append(f"{w.name} (pid {w.pid}) silent for {silent:.1f} s")
        return out

    def status_line(self) -> str:
        up = sum(1 for w in self.workers.values() if w.alive and w.state is ProcessState.RUNNING)
        fps = sum(w.sampler.fps_out for w in self.workers.values() if any(e.dst == OUTPUT for e in w.spec.out_edges))
        return f"{up}/{len(self.workers)} workers up, {fps:.1f} frames/s out, phase {self.phase}"

    def snapshot(self) -> Snapshot:
        gw = self.gateway
        return Snapshot(
            self.name,
            self.config.run_id,
            self.phase.value,
            self.started_at,
            dict(self.workers),
            gw.in_flight() if gw is not None and not gw.closed else {},
            self.launcher.describe(),
        )

    def _on_control(self, req: Dict[str, Any]) -> Dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self._status_fn()}
        if cmd == "stop":
            self.begin_drain("stop requested over the control socket")
            return {"ok": True}
        if cmd == "restart":
            node = req.get("node")
            if not isinstance(node, str):
                return {"ok": False, "error": f"restart: 'node' must be the name of a node of {self.name!r} (a string), got {node!r}"}
            w = self.workers.get(node)
            pid = w.pid if w is not None else None
            self.replace_nodes({node: None}, "restart requested over the control socket")
            return {"ok": True, "node": node, "pid": pid}
        if cmd == "reload":
            if self.on_reload is None:
                return {"ok": False, "error": f"pipeline {self.name!r} was not started from a file: there is nothing to reload from"}
            fut: "Future[Any]" = Future()

            def answer(f: "Future[List[str]]") -> None:
                e = f.exception()
                fut.set_result({"ok": False, "error": str(e)} if e is not None else {"ok": True, "replaced": f.result()})
                self.poke()

            self.on_reload().add_done_callback(answer)
            return fut
        if cmd == "logs":
            return self._logs(req)
        return {"ok": False, "error": f"unknown command {cmd!r}; use status, stop, restart, reload or logs"}

    def _logs(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """The recent lines of one node (or all), after the given cursor (see LogRing)."""
        error = logs_request_error(req, self.name, self.workers)
        if error is not None:
            return {"ok": False, "error": error}
        node = req.get("node")
        after = req.get("after") or {}
        limit = req.get("lines")
        lines: List[Dict[str, Any]] = []
        cursor: Dict[str, int] = {}
        lost: Dict[str, int] = {}
        for name, w in self.workers.items():
            if node is not None and name != node:
                continue
            got, cursor[name], lost[name] = w.log_ring.since(int(after.get(name, 0)), limit)
            lines.extend(got)
        lines.sort(key=lambda e: (e["ts"] or 0, e["n"]))
        if limit is not None and len(lines) > limit:
            lines = lines[-limit:] if limit > 0 else []
        return {"ok": True, "lines": lines, "cursor": cursor, "lost": {k: v for k, v in lost.items() if v}}

    # ================================================================== stopping

    def fail(self, err: BaseException) -> None:
        if isinstance(err, SharedMemoryFullError):
            self.explain_shm_full(err)
        if self.error is None:
            self.error = err
            log.error("pipeline %s failed: %s", self.name, err, extra={"node": getattr(err, "node", None)})
            if self.gateway is not None:
                self.gateway.interrupt()
        self.begin_abort(str(err))

    def explain_shm_full(self, err: SharedMemoryFullError) -> None:
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

    def begin_drain(self, reason: str) -> None:
        if self.phase in (Phase.DRAINING, Phase.ABORTING, Phase.FINISHED):
            return
        self.stopped = True
        if self.phase in (Phase.NEW, Phase.BOOTING):
            # Nothing flows before every worker is READY: stopping now loses nothing.
            self.begin_abort(reason)
            self.abort_reason = None
            return
        self.phase = Phase.DRAINING
        self._notifier.notify("STOPPING=1", f"STATUS=draining ({reason})")
        self.close_inputs()
        self._stop_deadline = time.monotonic() + self.config.stop_timeout
        for w in self.workers.values():
            if w.spec.is_source:
                w.send(Drain())
        log.info("pipeline %s: draining (%s)", self.name, reason)

    def begin_abort(self, reason: str, hard: bool = False) -> None:
        if self.abort_reason is None and self.phase is not Phase.FINISHED:
            self.abort_reason = reason
        for w in self.workers.values():
            w.cancel_restart(reason)
        if self.gateway is not None:
            self.gateway.close_inputs()
        if hard:
            self.killed = True
            for w in self.workers.values():
                w.kill_now(reason)
            self.phase = Phase.ABORTING
            log.warning("pipeline %s: SIGKILL to every worker (%s)", self.name, reason)
            return
        if self.phase in (Phase.ABORTING, Phase.FINISHED):
            return
        self.phase = Phase.ABORTING
        self._notifier.notify("STOPPING=1", f"STATUS=stopping ({reason})")
        deadline = time.monotonic() + self.kill_timeout
        for w in self.workers.values():
            w.stop(reason, deadline, Abort())
        log.info("pipeline %s: aborting (%s)", self.name, reason)

    def _check_done(self) -> None:
        if self.phase is Phase.ABORTING:
            if not any(w.alive for w in self.workers.values()):
                self.phase = Phase.FINISHED
            return
        if self.phase not in (Phase.RUNNING, Phase.DRAINING):
            return
        gw = self.gateway
        outputs_done = gw is None or gw.all_eos()
        workers_done = all((not w.alive) and w.done and w.state is ProcessState.EXITED for w in self.workers.values())
        if outputs_done and workers_done:
            self.phase = Phase.FINISHED

    def _shutdown(self) -> None:
        """Make sure nothing is left: processes, ports, shared memory."""
        try:
            for w in self.workers.values():
                w.kill()
            for w in self.workers.values():
                w.wait_gone()
            self.launcher.close()  # (after the workers: it reports their exits)
            self._close_gateway()
            if self._iox is not None:
                self._iox.close()
                self._iox = None
            for w in self.workers.values():
                w.release()
            if self._control is not None:
                self._control.close()
                self._control = None
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server = None
            self._notifier.notify("STOPPING=1")
            self._notifier.close()
            left = resources.purge(self.config.root)
            if left:
                log.warning("could not remove shared-memory files of run %s: %s", self.config.run_id, left)
        except BaseException as e:  # noqa: BLE001
            log.exception("shutdown of %s failed", self.name)
            if self.error is None:
                self.error = SupervisorError(f"shutdown failed: {e!r}")
        finally:
            self.launcher.close()  # (again, should the above have failed before it)
            self._close_gateway()
            if self._iox is not None:
                self._iox.close()
                self._iox = None
            if self._bells is not None:
                self._bells.close()  # (after the workers: a restart needs it)
            forget_locals(self.error)
            self.ended_at = time.monotonic()
            self.phase = Phase.FINISHED
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            for fd in (wake_r, wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.finished.set()

    def _close_gateway(self) -> None:
        """Close the caller's ports (outputs not received yet become private copies: a
        finished run keeps nothing mapped) and count the inputs it did not finish."""
        gw = self.gateway
        if gw is None or gw.closed:
            return
        self.unprocessed_inputs = gw.unprocessed()
        gw.close()
