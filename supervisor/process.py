"""One worker process and everything about it that is not a frame (after supervisord's
``Subprocess``): its state machine, spawn, signals, deadlines, exit classification, restart
policy with backoff, poison-frame tracking and output capture.

::

    spawn()  memfd blob + socketpair + status block -> the run's launcher (supervisor.launch:
             spawned or forked python -m supervisor.worker)
             -> Setup(spec, restore)                          STOPPED/EXITED/BACKOFF -> STARTING
    ready()  Ready arrived                                    STARTING -> RUNNING
    check_deadlines()  init / process / heartbeat / memory    -> murder(): SIGTERM, SIGKILL later
    reaped(rc)  exit status known                             -> finish(): EXITED / STOPPED /
                                                                 FATAL / BACKOFF (restart_at)
    restart_due()  backoff over                               -> spawn() again

The arbiter owns the loop and the run's phase; a WorkerProcess owns one node's process and
asks the arbiter (its :class:`Context`) only for what spans several nodes: failing the run,
and the commit points of the consumers of its outputs when it restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple

import cloudpickle
import psutil

from remotemedia.errors import (
    NodeError,
    NodeFatalError,
    NodeInitError,
    RemoteMediaError,
    SharedMemoryFullError,
    SupervisorError,
    WorkerStartTimeout,
)

from .launch import Launcher, WorkerHandle
from .logring import LogRing
from .logs import LineBuffer, LogSink, parse_worker_line
from .monitor import WorkerSampler
from .protocol import (
    EXIT_HANDOVER,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    Acked,
    ChannelClosed,
    Commit,
    ControlChannel,
    EdgeSpec,
    Handover,
    Replay,
    RestoreState,
    Setup,
    WorkerSpec,
    socketpair,
)
from .scoreboard import ORDER_CAPACITY, Scoreboard
from .states import ProcessState, StateMachine

__all__ = ["WorkerProcess", "Context", "describe_exit", "OUTPUT_BUDGET"]

log = logging.getLogger("remotemedia.supervisor")

#: Bytes of captured worker output read per worker and arbiter turn.
OUTPUT_BUDGET = 1 << 20


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


class Context(Protocol):
    """What a worker process needs from the arbiter."""

    env: Dict[str, str]
    log_sink: LogSink
    kill_timeout: float
    heartbeat_timeout: float
    doorbell_fd: int  # the run's doorbells (see supervisor.doorbells), -1: none
    launcher: Launcher  # starts the run's workers (start_method)

    @property
    def booting(self) -> bool: ...  # the run has not reached RUNNING yet

    @property
    def ending(self) -> bool: ...  # the run is aborting or finished: exits are expected

    def fail(self, err: BaseException) -> None: ...

    def committed_count(self, edge: EdgeSpec) -> int: ...

    def consumer_finished(self, edge: EdgeSpec) -> bool: ...

    def ring_control(self, slot: int) -> None: ...  # wake the listener of doorbell ``slot``


class WorkerProcess:
    """The supervisor's side of one node's worker process."""

    def __init__(self, ctx: Context, blob: bytes, spec: WorkerSpec, options: Dict[str, Any]) -> None:
        self.ctx = ctx
        self.name = spec.name
        self.index = spec.index
        self.blob = blob
        self.spec = spec
        self.options = options
        self.sm = StateMachine(spec.name)
        self.proc: Optional[WorkerHandle] = None
        self.chan: Optional[ControlChannel] = None
        self.pid: Optional[int] = None
        self.board: Optional[Scoreboard] = None
        self.spawned_at = 0.0
        self.ready_at: Optional[float] = None
        self.restore = RestoreState()
        # The first start resumes from ``restore`` too (set before spawn(): the Ray backend's
        # host agent restarted, its nodes resume from the commit points it had saved).
        self.resumed = False
        self.sampler = WorkerSampler()
        self.starts = 0
        self.stats = {}  # (after the sampler and starts: see the setter)
        self.done = False
        self.restarts = 0
        self.last_traceback: Optional[str] = None
        self.exit_status: Optional[int] = None
        self.kill_at: Optional[float] = None
        self.kill_reason: Optional[str] = None
        self.last_heartbeat = 0.0
        self.restart_at: Optional[float] = None
        self.restart_times: Deque[float] = deque()
        self.out_fds: Dict[int, LineBuffer] = {}  # captured stdout/stderr pipe -> partial line
        self.out_streams: Dict[int, str] = {}
        self.tail: Deque[str] = deque(maxlen=60)  # last lines the worker wrote
        self.log_ring = LogRing()  # its recent lines, all incarnations, for `logs`
        self.poison: Optional[Tuple[int, int]] = None  # frame being processed at the last crash
        self.poison_count = 0
        # (edge, seq) in process() when the supervisor decided to kill the worker: a SIGTERM
        # unwinds process() and clears the status block's busy marker before the worker dies.
        self.kill_frame: Optional[Tuple[int, int]] = None
        # Commit(final=True) arrived: its end of stream is committed downstream, nothing of
        # its stream is left to do even if it dies before Done (in cleanup()).
        self.final_commit = False
        self.killed_at_stop = False  # SIGKILLed while the run was aborting
        self.source_start = 0  # a source: generate() position its current process started at
        self.generated = 0  # a source: items generated (absolute position), as of its last exit
        self.dead_letters = 0
        self.memory_kills = 0
        self.hang_kills = 0
        self.last_recovery: Optional[float] = None  # seconds from crash to replacement READY
        self.crashed_at: Optional[float] = None
        self.next_mem_check = 0.0
        # A requested replacement (restart, reload) under way: (blob of the replacement, why,
        # keep the node's state); the worker hands over and is started again from its commit.
        self.replacement: Optional[Tuple[bytes, str, bool]] = None
        self.replacements = 0  # workers replaced on request (restart, reload)

    @property
    def state(self) -> ProcessState:
        return self.sm.state

    @property
    def stats(self) -> Dict[str, Any]:
        """The last stats the worker reported (Heartbeat, Done): figures of its current
        process only, counted from 0 at each start."""
        return self._stats

    @stats.setter
    def stats(self, stats: Dict[str, Any]) -> None:
        # A setter, not heartbeat(): the arbiter stores Done's stats directly. The sampler
        # adds each process's last figures to the node's totals (``starts`` tells them apart).
        self._stats = stats
        self.sampler.take_stats(self.starts, stats)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def fds(self) -> List[int]:
        """What the arbiter waits on for this worker: its control socket and output pipes."""
        out = list(self.out_fds)
        if self.chan is not None and not self.chan.closed:
            out.append(self.chan.fileno())
        return out

    # ================================================================== spawn

    def spawn(self) -> None:
        """Start (or restart) the worker: a memfd with the pickled node, a control socket, the
        status block; then Setup (with the restore state on a restart)."""
        parent_sock, child_sock = socketpair()
        blob_fd = os.memfd_create(f"remotemedia-{self.name}", 0)
        try:
            view = memoryview(self.blob)
            while view:
                n = os.write(blob_fd, view)
                view = view[n:]
            argv = ["--fd", str(child_sock.fileno()), "--blob-fd", str(blob_fd), "--name", self.name]
            if self.board is None:
                self.board = Scoreboard.create(
                    commit_slots=len(self.spec.in_edges) + len(self.spec.out_edges),
                    order_slots=ORDER_CAPACITY if self.spec.rings else 0,
                    rings=self.spec.rings,
                )
            self.board.reset()
            # Before the worker exists: the recorded order and choices outlive it if it dies
            # before replaying them.
            if self.restore.order:
                position = {e.index: i for i, e in enumerate(self.spec.in_edges)}
                self.board.write_order(
                    self.restore.consumed(self.spec.in_edges), [position[e] for e in self.restore.order]
                )
            for g, (node, edges) in enumerate(self.spec.dispatch_groups):
                choices = self.restore.dispatch.get(node)
                if choices:
                    self.board.write_order(self.restore.dispatched(edges), choices, ring=self.spec.dispatch_ring(g))
            self.sm.change(ProcessState.STARTING, "spawn" if self.starts == 0 else "restart")
            self.proc = self.ctx.launcher.launch(
                argv,
                (child_sock.fileno(), blob_fd, self.board.fd) + ((self.ctx.doorbell_fd,) if self.ctx.doorbell_fd >= 0 else ()),
                self.ctx.env,
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
            os.close(blob_fd)
        self.pid = self.proc.pid
        self.chan = ControlChannel(parent_sock)
        self.out_fds = {}
        for fd, stream in ((self.proc.stdout_fd, "stdout"), (self.proc.stderr_fd, "stderr")):
            os.set_blocking(fd, False)
            self.out_fds[fd] = LineBuffer()
            self.out_streams[fd] = stream
        self.spawned_at = time.monotonic()
        self.kill_reason = None
        self.kill_frame = None
        self.final_commit = False
        self.source_start = self.restore.source_position
        self.restart_at = None
        self.ready_at = None
        self.done = False
        self.exit_status = None
        self.kill_at = None
        self.starts += 1
        restore = None
        if self.starts > 1 or self.resumed:
            restore = self.restore
            restore.out_committed = {e.index: self.ctx.committed_count(e) for e in self.spec.out_edges}
            restore.out_finished = {e.index: self.ctx.consumer_finished(e) for e in self.spec.out_edges}
        self.send(
            Setup(dataclasses.replace(self.spec, scoreboard_fd=self.board.fd, doorbell_fd=self.ctx.doorbell_fd), restore)
        )
        log.info("spawned worker for node %s (pid %d)", self.name, self.pid, extra={"node": self.name})

    def send(self, msg: Any) -> None:
        """A control message to the worker (dropped when it is gone: its restart gets Setup)."""
        if self.chan is None or self.chan.closed:
            return
        try:
            self.chan.send(msg)
        except ChannelClosed:
            return
        if self.spec.bell >= 0:
            # its inbox may nap on the doorbell's futex, which does not watch this channel
            self.ctx.ring_control(self.spec.bell)

    def receive(self) -> List[Any]:
        """Control messages the worker has sent."""
        if self.chan is None or self.chan.closed:
            return []
        try:
            return self.chan.receive()
        except ChannelClosed:
            return []

    # ================================================================== what it reports

    def ready(self, init_seconds: float) -> None:
        self.ready_at = time.monotonic()
        self.last_heartbeat = self.ready_at
        if self.state is ProcessState.STARTING:
            self.sm.change(ProcessState.RUNNING, f"ready after {init_seconds:.2f}s")
        if self.crashed_at is not None:
            self.last_recovery = self.ready_at - self.crashed_at
            self.crashed_at = None
            log.warning("node %s recovered in %.3f s (pid %s)", self.name, self.last_recovery, self.pid, extra={"node": self.name})

    def init_failed_error(self, msg: Any) -> Optional[NodeInitError]:
        """The error of an InitFailed report; None for a restart (its exit code says it)."""
        self.last_traceback = msg.traceback
        if self.starts > 1:
            return None  # a restart that failed to load: exit code 3 makes it FATAL in finish()
        return NodeInitError(
            self.name, f"{msg.stage} failed: {msg.message}", pid=self.pid, exc_type=msg.exc_type, traceback=msg.traceback
        )

    def node_failed_error(self, msg: Any, explain: Callable[[SharedMemoryFullError], None]) -> NodeError:
        """The error of a NodeFailed report (the node's own exception, unpickled, is its
        ``original``; ``explain`` completes a SharedMemoryFullError)."""
        self.last_traceback = msg.traceback
        original = None
        if msg.exc_blob is not None:
            try:
                original = cloudpickle.loads(msg.exc_blob)
            except Exception:
                original = None
        message = msg.message
        if isinstance(original, SharedMemoryFullError):
            explain(original)
            message = str(original)
        return NodeError(
            self.name, message, pid=self.pid, seq=msg.seq, exc_type=msg.exc_type, original=original, traceback=msg.traceback
        )

    def commit(self, msg: Commit) -> None:
        self.restore.in_seqs.update(msg.in_seqs)
        self.restore.out_next.update(msg.out_next)
        if msg.source_position is not None:
            self.restore.source_position = msg.source_position
        if msg.snapshot is not None:
            self.restore.snapshot = msg.snapshot
        if msg.final:
            self.final_commit = True

    def heartbeat(self, stats: Dict[str, Any]) -> None:
        self.stats = stats
        self.last_heartbeat = time.monotonic()

    # ================================================================== as an edge's end

    def replay(self, edge: int, after: int) -> None:
        """A consumer of ``edge`` restarted: resend what it has not committed."""
        if self.state is ProcessState.RUNNING:
            self.send(Replay(edge, after))

    def apply_ack(self, edge: int, processed: int, committed: int) -> None:
        self.send(Acked(edge, processed, committed))

    def committed(self, edge: int) -> int:
        """Frames of input edge ``edge`` this worker has committed, as far as we know."""
        self.sync_commit()
        return self.restore.in_seqs.get(edge, -1) + 1

    def finished(self, edge: int) -> bool:
        # (its final commit arrives before Done: a producer restarted in between must not
        # wait for acks of an end of stream the finished consumer will never send)
        return self.done or self.final_commit

    # ================================================================== status block

    def sync_commit(self) -> None:
        """Take the worker's last commit point from its status block (where workers without
        snapshots report commits, see ``Runner.flush_commit``) into its restore state."""
        c = self.board.read_commit() if self.board is not None else None
        if c is None:
            return
        source, seqs = c
        n_in = len(self.spec.in_edges)
        for e, seq in zip(self.spec.in_edges, seqs):
            self.restore.in_seqs[e.index] = seq
        for e, nxt in zip(self.spec.out_edges, seqs[n_in:]):
            self.restore.out_next[e.index] = nxt
        if self.spec.keeps_position:
            self.restore.source_position = source

    def sync_order(self) -> None:
        """Take what an exited worker recorded after its last commit (from its status block)
        into its restore state: the order in which a worker with several inputs consumed its
        input frames (its restart consumes the replayed frames in that order, see
        ``Runner.step_ordered``), and the replicas a worker feeding a node with replicas sent
        each frame to (its restart sends them to the same ones, see
        :mod:`supervisor.worker.replicas`)."""
        if self.board is None or not self.board.order_capacity:
            return
        spec = self.spec
        if spec.records_order:
            edges = [e.index for e in spec.in_edges]
            self.restore.order = [edges[i] for i in self.board.read_order(self.restore.consumed(spec.in_edges))]
        for g, (node, edges) in enumerate(spec.dispatch_groups):
            self.restore.dispatch[node] = self.board.read_order(self.restore.dispatched(edges), ring=spec.dispatch_ring(g))

    def busy_frame(self) -> Optional[Tuple[int, int]]:
        """(edge, seq) of the input frame the worker's process() is in, per its status block."""
        if self.board is None:
            return None
        b = self.board.read()
        if not b["busy_since_ns"] or b["busy_edge"] < 0:
            return None
        return b["busy_edge"], b["busy_seq"]

    def sample(self) -> None:
        b = self.board.read() if self.board is not None and self.alive else None
        self.sampler.sample(self.pid if self.alive else None, b["frames_in"] if b else 0, b["frames_out"] if b else 0)

    def silent_for(self, now_ns: int) -> Optional[float]:
        """Seconds since the worker's loop last turned, for a RUNNING worker."""
        if self.state is not ProcessState.RUNNING or not self.alive or self.board is None:
            return None
        beat = self.board.get("heartbeat_ns")
        return (now_ns - beat) / 1e9 if beat else None

    # ================================================================== output capture

    def read_output(self, final: bool = False) -> None:
        """Forward what the worker wrote to stdout/stderr, one prefixed line at a time, and
        keep the last lines (the traceback of a crash is usually there).

        At most OUTPUT_BUDGET bytes per call, lines cut at MAX_LINE bytes: a worker flooding
        its output neither stalls the arbiter nor grows its memory (the rest waits in the
        pipe for the next turn, which comes at once: the pipe is readable)."""
        budget = OUTPUT_BUDGET
        for fd in list(self.out_fds):
            lines = self.out_fds[fd]
            stream = self.out_streams.get(fd, "stderr")
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
                self._emit_lines(stream, lines.feed(chunk))
            if ended:
                self._emit_lines(stream, lines.flush())

    def _emit_lines(self, stream: str, lines: List[str]) -> None:
        for line in lines:
            rec = parse_worker_line(line, stream)
            self.tail.append(rec["msg"] + ("\n" + rec["exc"] if rec.get("exc") else ""))
            self.ctx.log_sink.write(rec, self.name, self.pid)
            self.log_ring.add(rec, self.name, self.pid)

    def _close_output(self) -> None:
        self.read_output(final=True)
        if self.proc is not None:
            self.proc.close_output()
        self.out_fds = {}

    def crash_report(self) -> Optional[str]:
        """The best traceback we have: the structured one, else the worker's last output."""
        if self.last_traceback:
            return self.last_traceback
        tail = "\n".join(self.tail).strip()
        return tail or None

    # ================================================================== signals, deadlines

    def signal(self, sig: int) -> None:
        if not self.alive or self.proc is None:
            return
        self.proc.signal(sig)  # (to its process group: its children go with it)

    def murder(self, reason: str, hard: bool = False) -> None:
        """Kill a misbehaving worker (SIGTERM, SIGKILL after kill_timeout); its exit is then
        handled like a crash, under the restart policy."""
        log.error("node %s (pid %s): %s; killing it", self.name, self.pid, reason, extra={"node": self.name})
        self.kill_reason = reason
        self.kill_frame = self.busy_frame()
        if hard:
            self.signal(signal.SIGKILL)
        else:
            self.signal(signal.SIGTERM)
            self.kill_at = time.monotonic() + self.ctx.kill_timeout

    def replace(self, reason: str, blob: Optional[bytes] = None) -> None:
        """Replace the worker by a new one at a commit point (``restart NODE``; ``reload``
        with the node's new ``blob``): the worker takes no more input, waits until its outputs
        are committed downstream, commits and exits (Handover); the new one starts from that
        commit. No frame is lost or processed twice. A restart keeps the node's state where
        the node has ``snapshot()``/``restore()``; a reload starts from the new node as the
        file defines it.

        SupervisorError when the worker is not RUNNING (starting, restarting, stopping, done)."""
        self.check_replaceable(reload=blob is not None)
        self.replacement = (self.blob if blob is None else blob, reason, blob is None)
        self.sm.change(ProcessState.STOPPING, reason)
        self.send(Handover())
        # (it waits up to handover_timeout for downstream, then cleanup() has kill_timeout)
        self.kill_at = time.monotonic() + self.spec.handover_timeout + self.ctx.kill_timeout
        log.info("node %s (pid %s): %s; handing over to a new worker", self.name, self.pid, reason)

    def check_replaceable(self, reload: bool = False) -> None:
        """SupervisorError unless :meth:`replace` can replace the worker now."""
        ended = self.done or self.final_commit
        if self.state is not ProcessState.RUNNING or not self.alive or ended:
            state = "finished (its stream has ended)" if ended else self.state.value
            raise SupervisorError(
                f"node {self.name!r} is {state}: only a RUNNING node can be {'reloaded' if reload else 'restarted'}"
                f"{'' if ended else '; try again once status shows it RUNNING'}"
            )

    def _start_replacement(self, rc: int, how: str) -> None:
        blob, reason, keep_state = self.replacement  # type: ignore[misc]
        self.replacement = None
        self.sm.change(ProcessState.STOPPED, f"handed over ({reason})" if rc == EXIT_HANDOVER else how)
        if rc != EXIT_HANDOVER:
            log.warning(
                "node %s (pid %s) %s while handing over; its replacement starts from its last commit (the frames "
                "after it are replayed)", self.name, self.pid, how,
            )
        self.blob = blob
        if not keep_state:
            self.restore.snapshot = None  # (the new node's state is what the file defines)
        self.replacements += 1
        self.kill_reason = None
        self.spawn()

    def stop(self, reason: str, deadline: float, abort_msg: Any) -> None:
        """Ask it to abort (cleanup() then exit); SIGKILL at ``deadline``."""
        if not self.alive:
            return
        if self.state in (ProcessState.STARTING, ProcessState.RUNNING):
            self.sm.change(ProcessState.STOPPING, reason)
        self.send(abort_msg)
        self.kill_at = deadline

    def kill_now(self, reason: str) -> None:
        if not self.alive:
            return
        if self.state in (ProcessState.STARTING, ProcessState.RUNNING):
            self.sm.change(ProcessState.STOPPING, reason)
        self.signal(signal.SIGKILL)
        self.killed_at_stop = True

    def check_deadlines(self, now: float, now_ns: int, aborting: bool) -> None:
        """Enforce deadlines: init timeout, per-frame timeout, heartbeat, memory, kills."""
        if not self.alive:
            return
        if self.kill_at is not None:
            if now >= self.kill_at:
                log.warning("node %s (pid %s) did not exit in time; SIGKILL", self.name, self.pid, extra={"node": self.name})
                self.signal(signal.SIGKILL)
                self.kill_at = None
                if aborting:
                    self.killed_at_stop = True
            return
        if self.kill_reason:
            return
        opts = self.options
        if self.state is ProcessState.STARTING and now - self.spawned_at > opts["init_timeout"]:
            self.murder(f"initialize() did not finish within init_timeout={opts['init_timeout']:g} s", hard=True)
            return
        if self.state is not ProcessState.RUNNING or self.board is None:
            return
        busy = self.board.get("busy_since_ns")
        if busy and opts["process_timeout"] and (now_ns - busy) / 1e9 > opts["process_timeout"]:
            self.hang_kills += 1
            seq = self.board.get("busy_seq")
            self.murder(f"process() of frame {seq} exceeded process_timeout={opts['process_timeout']:g} s")
            return
        beat = self.board.get("heartbeat_ns")
        stale = (now_ns - beat) / 1e9 if beat else 0.0
        if not busy and stale > self.ctx.heartbeat_timeout:
            self.hang_kills += 1
            self.murder(f"no heartbeat for {stale:.1f} s (worker loop stuck)")
            return
        if opts["memory_limit"] and now >= self.next_mem_check:
            self.next_mem_check = now + 0.25
            rss = _private_rss(self.pid)
            if rss is not None and rss > opts["memory_limit"]:
                self.memory_kills += 1
                self.murder(
                    f"memory limit exceeded: {rss / 2**20:.0f} MiB private RSS > {opts['memory_limit'] / 2**20:.0f} MiB"
                )

    def next_deadline(self, restarting: bool) -> Optional[float]:
        """The earliest time the arbiter must look at this worker again."""
        ds = [d for d in (self.restart_at if restarting else None, self.kill_at) if d is not None]
        if self.alive and (self.options["process_timeout"] or self.options["memory_limit"]):
            ds.append(time.monotonic() + 0.1)
        return min(ds) if ds else None

    # ================================================================== exit

    def poll_exit(self) -> Optional[int]:
        """The exit status when the process has exited (reaped by its own handle), else None.
        What the node started and left running dies with it."""
        if self.proc is None:
            return None
        rc = self.proc.poll_exit()
        if rc is not None and self.proc.note and not self.kill_reason:
            self.kill_reason = self.proc.note  # ("its worker template died": not the node's doing)
        return rc

    def collect_remains(self, rc: int) -> None:
        """After its last messages: the order it consumed in, its output, its counters."""
        self.sync_order()  # after the last commit, wherever it was reported
        self._close_output()
        if self.board is not None:  # its last counters outlive it
            b = self.board.read()
            self.sampler.sample(self.pid, b["frames_in"], b["frames_out"])
            if self.spec.is_source:
                self.generated = self.source_start + b["frames_in"]
        self.exit_status = rc
        self.kill_at = None
        if self.chan is not None:
            self.chan.close()

    def finish(self, rc: int) -> None:
        """Classify an exit: the end of its stream, a stop, a load error, a failed first
        start (the run fails), or a crash (the restart policy decides)."""
        state = self.state
        how = describe_exit(rc)
        if self.kill_reason:
            how = f"{self.kill_reason}; {how}"
        if self.replacement is not None and not self.done and not self.ctx.ending:
            self._start_replacement(rc, how)
            return
        self.replacement = None
        if self.done:
            # Its stream was complete (Done arrived); how it exited afterwards does not matter.
            if state in (ProcessState.RUNNING, ProcessState.STOPPING):
                self.sm.change(ProcessState.EXITED, "end of stream" if rc == EXIT_OK else f"end of stream, then {how}")
            return
        if state is ProcessState.STOPPING or self.ctx.ending:
            self.sm.change(ProcessState.STOPPED if state is ProcessState.STOPPING else ProcessState.EXITED, how)
            return
        if self.final_commit:
            # It died after its end of stream was committed downstream (Runner.finish), before
            # Done: in cleanup(), or killed there. Its stream is complete; a restart would
            # wait for an end of stream that never comes again.
            self.done = True
            self.sm.change(ProcessState.EXITED, f"end of stream, then {how} before reporting done")
            report = self.crash_report()
            log.warning(
                "node %s (pid %s): %s after its end of stream was committed (in cleanup()?); its stream is "
                "complete, not restarted%s",
                self.name,
                self.pid,
                how,
                f"\n{report}" if report else "",
                extra={"node": self.name},
            )
            return
        if rc == EXIT_LOAD_ERROR and state is ProcessState.STARTING:
            # Reserved exit codes mean something only while the worker loads; after READY a
            # worker's exit code is whatever its node did (os._exit(3) is a crash like any other).
            self.sm.change(ProcessState.FATAL, "load error")
            self.ctx.fail(NodeFatalError(self.name, f"could not load the node ({how})", self.pid, rc, self.crash_report()))
            return
        if state is ProcessState.STARTING and self.ctx.booting and self.starts == 1:
            # The first start must work: fail fast with what we know.
            self.sm.change(ProcessState.FATAL, f"failed to start ({how})")
            if self.kill_reason and "init_timeout" in self.kill_reason:
                err: RemoteMediaError = WorkerStartTimeout(self.name, self.kill_reason, self.pid)
            else:
                err = NodeInitError(
                    self.name,
                    f"the worker died during unpickling/initialize() ({how}) before reporting READY",
                    pid=self.pid,
                    traceback=self.crash_report(),
                )
            self.ctx.fail(err)
            return
        self.sm.change(ProcessState.EXITED, how)
        self._after_failure(rc, how)

    def _after_failure(self, rc: int, how: str) -> None:
        """Apply the restart policy to a worker that exited unexpectedly."""
        now = time.monotonic()
        policy = self.options["restart_policy"]
        self.crashed_at = self.crashed_at or now
        self._track_poison()
        if policy == "never" or (policy == "on-failure" and rc == 0):
            why = "restart_policy='never'" if policy == "never" else "it exited with code 0 before the end of its stream"
            self._go_fatal(rc, f"worker exited unexpectedly ({how}); not restarted: {why}")
            return
        window = self.options["restart_window"]
        while self.restart_times and now - self.restart_times[0] > window:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.options["max_restarts"]:
            self._go_fatal(
                rc,
                f"restart limit reached: {len(self.restart_times)} restarts within {window:g} s "
                f"(max_restarts={self.options['max_restarts']}); last exit: {how}",
            )
            return
        delay = min(self.options["backoff_base"] * (2 ** len(self.restart_times)), self.options["backoff_max"])
        self.restart_times.append(now)
        self.sm.change(ProcessState.BACKOFF, f"{how}; restart in {delay:.2f} s")
        self.restart_at = now + delay
        # a crash is a failure (ERROR); an early exit 0 restarted by restart_policy="always" is not
        log.log(logging.ERROR if rc != 0 else logging.WARNING, "node %s (pid %s) %s; restarting in %.2f s", self.name, self.pid, how, delay, extra={"node": self.name})

    def _go_fatal(self, rc: int, message: str) -> None:
        self.sm.change(ProcessState.FATAL, message)
        self.ctx.fail(NodeFatalError(self.name, message, self.pid, rc, self.crash_report()))

    def _track_poison(self) -> None:
        """Count crashes (and hang / memory kills) on the same input frame; past the threshold,
        dead-letter it."""
        frame = self.kill_frame or self.busy_frame()
        if frame is None:
            self.poison, self.poison_count = None, 0
            return
        self.poison_count = self.poison_count + 1 if frame == self.poison else 1
        self.poison = frame
        if self.poison_count >= self.options["poison_threshold"]:
            edge, seq = frame
            src = next((e.src for e in self.spec.in_edges if e.index == edge), "?")
            log.error(
                "node %s crashed %d times in a row on frame %d from %s: dead-lettering it\n%s",
                self.name,
                self.poison_count,
                seq,
                src,
                self.crash_report() or "(no traceback)",
                extra={"node": self.name},
            )
            self.restore.skip.setdefault(edge, []).append(seq)
            self.poison, self.poison_count = None, 0

    # ================================================================== restarts

    def restart_due(self, now: float) -> bool:
        return self.state is ProcessState.BACKOFF and self.restart_at is not None and now >= self.restart_at

    def restart(self) -> None:
        self.restarts += 1
        self.spawn()

    def cancel_restart(self, reason: str) -> None:
        """A worker waiting to be restarted stays down: the run is ending."""
        if self.state is ProcessState.BACKOFF:
            self.sm.change(ProcessState.STOPPED, reason)
            self.restart_at = None

    # ================================================================== end of the run

    def kill(self) -> None:
        """The run is over: SIGKILL whatever is left (then :meth:`wait_gone`)."""
        if self.alive:
            self.signal(signal.SIGKILL)

    def wait_gone(self) -> None:
        """Reap the killed process and close its control socket."""
        if self.proc is not None:
            if self.proc.wait(timeout=10) is None:  # pragma: no cover - unkillable (D state)
                log.error("worker %s (pid %s) did not die", self.name, self.pid, extra={"node": self.name})
            if self.exit_status is None:
                self.exit_status = self.proc.returncode
        if self.chan is not None:
            self.chan.close()

    def release(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None

    def report(self) -> Dict[str, Any]:
        """This node's line of the RunReport."""
        s = dict(self.stats)
        s.update(
            # (all its incarnations, as status counts them; the stats are the last one's)
            frames_in=max(self.sampler.total_in, s.get("frames_in", 0)),
            frames_out=max(self.sampler.total_out, s.get("frames_out", 0)),
            state=self.state.value,
            pid=self.pid,
            restarts=self.restarts,
            replacements=self.replacements,
            exit_status=self.exit_status,
            last_recovery_s=self.last_recovery,
            hang_kills=self.hang_kills,
            memory_kills=self.memory_kills,
            dead_letters=self.dead_letters,
        )
        return s
