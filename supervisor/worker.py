"""Worker process: runs one node. Entry point ``python -m supervisor.worker``.

::

    supervisor ---Setup(spec)---> worker: read node blob (memfd) -> cloudpickle.loads
                                          -> restore(snapshot) -> initialize()
                                          -> open iceoryx2 ports -> Ready
    loop (one wait point: inbox listener + control socket):
        control messages (Replay, Start, Drain, Abort)
        acks from downstream -> drop retained frames -> commits -> acks upstream
        resend undelivered frames
        next input frame (or next generate() item) -> process() -> emit outputs
            (a bare array like the edge's last one: InPort.take() decodes it and
             OutPort.send_array() sends it, one bridge call each; then the books)
    end of stream on every input -> flush() -> EOS downstream -> wait for acks
        -> cleanup() -> Done -> exit 0

The worker never decides policy: it reports (Ready, InitFailed, NodeFailed, Commit, Gap,
Heartbeat, Done, and commit points in its status block) and obeys. Exit codes are listed in
:mod:`supervisor.protocol`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import operator
import os
import secrets
import signal
import sys
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import cloudpickle
import numpy as np

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import LoanError, OutputSerializationError, SharedMemoryFullError
from remotemedia.frames import Frame, FrameInfo, decode, encode
from remotemedia.node import Node, iter_generated, iter_outputs

from .channels import KIND_DATA, KIND_EOS, MAX_LOANED, InPort, OutPort
from .protocol import (
    EXIT_ABORTED,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    EXIT_SETUP_ERROR,
    Abort,
    Acked,
    ChannelClosed,
    Commit,
    ControlChannel,
    DeadLetter,
    Done,
    Drain,
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
)
from .logs import WorkerLogHandler
from .scoreboard import Scoreboard
from .stats import LatencyStats

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("remotemedia.worker")

# Sent to the worker when its parent dies; its native handler (the bridge's die_with_parent)
# SIGKILLs the worker's process group, so the node's own child processes die too. A real-time
# signal: neither CPython nor the usual media libraries handle one.
PARENT_DEATH_SIGNAL = signal.SIGRTMAX


class _Abort(Exception):
    """Unwinds the worker when the supervisor says Abort or disappears."""


def _die_with_parent(expected_ppid: int) -> None:
    # PDEATHSIG fires when the *thread* that spawned us exits; the supervisor spawns from
    # its arbiter thread, which lives as long as any worker. The ppid check closes the race
    # where the parent died before the signal was armed.
    if not bridge.die_with_parent(expected_ppid, PARENT_DEATH_SIGNAL):
        os._exit(EXIT_SETUP_ERROR)


def _write_private(directory: str, stem: str, parts: Sequence[Tuple[str, Any]]) -> str:
    """Write the files ``stem + suffix`` (one per part) into ``directory`` and nowhere else;
    returns the path of the first. Each is created new, 0600, never through a symlink
    (O_CREAT|O_EXCL|O_NOFOLLOW), so a planted file or link is neither overwritten nor
    followed: on a collision (also the same frame dead-lettered again after a restart) the
    stem gets a fresh unpredictable suffix. A missing directory is created 0700."""
    if not stem or os.sep in stem or "\0" in stem or stem in (".", ".."):
        raise ValueError(f"file name {stem!r} would not stay inside {directory}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        name = stem
        for _ in range(16):
            created: List[str] = []
            try:
                for suffix, data in parts:
                    fd = os.open(name + suffix, flags, 0o600, dir_fd=dfd)
                    created.append(name + suffix)
                    with open(fd, "wb") as f:
                        f.write(data)
            except FileExistsError:
                for done in created:  # (unlink removes our entry; it follows nothing)
                    os.unlink(done, dir_fd=dfd)
                name = f"{stem}-{secrets.token_hex(8)}"
                continue
            return os.path.join(directory, name + parts[0][0])
        raise FileExistsError(f"no free name for {stem!r} in {directory}")
    finally:
        os.close(dfd)


def _format_exc(e: BaseException) -> Tuple[str, str, str, Optional[bytes]]:
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob: Optional[bytes] = cloudpickle.dumps(e)
    except Exception:
        blob = None
    mod = type(e).__module__
    name = type(e).__qualname__ if mod == "builtins" else f"{mod}.{type(e).__qualname__}"
    return name, str(e), tb, blob


class _Marker:
    """A point of the input stream the node can be restarted from."""

    __slots__ = ("positions", "source_position", "out_next", "snapshot")

    def __init__(self, positions: Dict[int, int], source_position: int, out_next: Dict[int, int], snapshot: Optional[bytes]) -> None:
        self.positions = positions  # edge -> last processed seq
        self.source_position = source_position
        self.out_next = out_next  # edge -> next seq after the outputs of this point
        self.snapshot = snapshot


class Runner:
    """The worker's main loop around one initialized node."""

    def __init__(self, node: Any, spec: WorkerSpec, chan: ControlChannel, restore: Optional[RestoreState]) -> None:
        self.node = node
        self.spec = spec
        self.chan = chan
        self.restore = restore or RestoreState()
        self.board = Scoreboard.from_fd(spec.scoreboard_fd) if spec.scoreboard_fd >= 0 else None
        self.iox = bridge.Node(spec.prefix, f"w{spec.index}", spec.root)
        self.inbox = bridge.Listener(self.iox, spec.inbox)
        # Inputs first: a restarted worker must be attached before anyone replays to it.
        self.inputs: List[InPort] = [
            InPort(self.iox, e, expected=self.restore.in_seqs.get(e.index, -1) + 1) for e in spec.in_edges
        ]
        self.outputs: List[OutPort] = [
            OutPort(
                self.iox,
                e,
                next_seq=self.restore.out_next.get(e.index, 0),
                committed=self.restore.out_committed.get(e.index, 0),
                consumer_finished=self.restore.out_finished.get(e.index, False),
            )
            for e in spec.out_edges
        ]
        self.by_edge_in = {p.spec.index: p for p in self.inputs}
        if self.inputs:
            # A stage lets the consumer it wakes run first when it has no input waiting (see
            # Notifier.yield_unless_queued): on a machine with fewer cores than stages this
            # is most of a hop's latency. A source does not: it would only slow itself down.
            subs = [p.sub for p in self.inputs]
            for p in self.outputs:
                p.notifier.yield_unless_queued(subs)
        self.by_edge_out = {p.spec.index: p for p in self.outputs}
        self._out1: Optional[OutPort] = self.outputs[0] if len(self.outputs) == 1 else None
        # only lossless edges hold commits back (a lossy edge keeps nothing to replay)
        self._lossless_out = [(p.spec.index, p) for p in self.outputs if p.lossless]
        self.skip = {edge: set(seqs) for edge, seqs in self.restore.skip.items()}
        self.started = not spec.is_source
        self._is_source = spec.is_source
        self.draining = False
        self.failed = False  # process() raised with on_error="raise": wait for Abort
        self.processed: Dict[int, int] = {p.spec.index: p.expected - 1 for p in self.inputs}
        self.committed: Dict[int, int] = dict(self.processed)
        self.source_position = self.restore.source_position
        self.committed_position = self.source_position
        self.markers: Deque[_Marker] = deque()
        self.commit_dirty = False
        self.reported: Dict[int, int] = dict(self.committed)  # last commit the supervisor knows
        self._next_commit = 0.0
        self._ctrl_ready = True
        self._next_ctrl = 0.0
        self.commit_out_next: Dict[int, int] = self.out_next()
        self.commit_snapshot: Optional[bytes] = None
        has_snapshot = callable(getattr(node, "snapshot", None)) and callable(getattr(node, "restore", None))
        interval = spec.snapshot_interval if spec.snapshot_interval is not None else 1.0
        self.snapshot_interval: Optional[float] = interval if has_snapshot else None
        self.next_snapshot = time.monotonic() + (interval or 0.0)
        self.ack_every = spec.ack_every or max(1, min((e.depth for e in spec.in_edges), default=4) // 4)
        self.frames_in = 0
        self.frames_out = 0
        self.errors = 0
        self.dead_letters = 0
        self.latency = LatencyStats()
        self.next_heartbeat = time.monotonic() + spec.heartbeat_interval
        self._rr = 0
        # A node with several inputs records the order it consumes them in and, restarted,
        # consumes the replayed frames in the recorded order (see step_ordered).
        self.consumed = 0  # input frames consumed, all edges together (when recording)
        self._order_cap = 0
        self._order_limit = sys.maxsize  # consume no further frame before a commit is reported
        self._replay: List[int] = []  # input positions of the frames after the commit, in order
        self._replay_from = self._replay_end = 0
        self._replay_stall: Optional[Tuple[int, float]] = None  # (frame number, waiting since)
        board = self.board
        if spec.records_order and board is not None and board.order_capacity:
            self.consumed = self._replay_from = self.restore.consumed(spec.in_edges)
            position = {e.index: i for i, e in enumerate(spec.in_edges)}
            self._replay = [position[e] for e in self.restore.order]
            self._replay_end = self._replay_from + len(self._replay)
            self._order_cap = board.order_capacity
            self._order_limit = self.consumed + self._order_cap
            self.step_input = self.step_ordered  # type: ignore[method-assign]
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._gen: Optional[Iterator[Any]] = None
        self._current_origin = 0
        self._current_stream = 0
        self._current_created = 0
        self._loans: Dict[int, Any] = {}
        self._loan_warned = False
        node._remotemedia_allocator = self.allocate
        # A Node builds current_frame only when asked (see Node.current_frame).
        self._lazy_frame = isinstance(node, Node)

    # ------------------------------------------------------------------ control

    def pump(self) -> bool:
        """Everything that must keep going even while the node is busy emitting. True when
        something arrived that may let a blocked step go on (control messages, acks)."""
        now = time.monotonic()
        if self.board is not None:
            self.board.beat()
        # The control socket is read when the last wait saw it readable, and at least every
        # 20 ms while busy (the wait does not poll it when a wake-up is already pending): a
        # recv() per frame would cost more than the frame.
        news = False
        if self._ctrl_ready or now >= self._next_ctrl:
            self._ctrl_ready = False
            self._next_ctrl = now + 0.02
            news = self._read_control()
        progress = False
        for p in self.outputs:
            if p.poll_acks():
                progress = True
            if p.undelivered is not None:
                p.resend_due()
        if progress and self.markers:
            self.advance_commits()
        elif self.commit_dirty and now >= self._next_commit:
            self.flush_commit()
        for i, p in self.by_edge_in.items():
            if p.dup_pending:
                p.ack(self.processed[i] + 1, self.reported[i] + 1)
        for p in self.inputs:
            if p.gap_since is not None:
                want = p.gap_to_report(now)
                if want is not None:
                    self.chan.send(Gap(p.spec.index, want))
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.spec.heartbeat_interval
            self.chan.send(Heartbeat(self.stats()))
        return news or progress

    def _read_control(self) -> bool:
        try:
            msgs = self.chan.receive()
        except ChannelClosed:
            raise _Abort("supervisor closed the control channel") from None
        self.handle_control(msgs)
        return bool(msgs)

    def handle_control(self, msgs: Sequence[Any]) -> None:
        """Act on control messages from the supervisor (those read with Setup too)."""
        for msg in msgs:
            if isinstance(msg, Acked):
                port = self.by_edge_out.get(msg.edge)
                if port is not None:
                    port.apply_ack(msg.processed, msg.committed)
            elif isinstance(msg, Replay):
                port = self.by_edge_out.get(msg.edge)
                if port is not None:
                    port.replay(msg.after)
            elif isinstance(msg, Start):
                self.started = True
            elif isinstance(msg, Drain):
                self.draining = True
            elif isinstance(msg, Abort):
                raise _Abort("abort requested")

    def wait(self, timeout: float) -> None:
        deadline = self.next_heartbeat
        for p in self.outputs:
            r = p.next_retry
            if r is not None:
                deadline = min(deadline, r)
        if self.snapshot_interval is not None and self.uncommitted_progress():
            deadline = min(deadline, self.next_snapshot)
        if self.commit_dirty:
            deadline = min(deadline, self._next_commit)
        timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        # Spin only on what would let us go on: inputs when we may send, acks of the full
        # outputs when we may not. (Acks of an output with room are no reason to burn a
        # core: on a paced stream every ack would be "caught" and grow the spin, stealing
        # the CPU from the very stage about to send us our next frame.)
        blocked = [p.ack_sub for p in self.outputs if not p.can_send()]
        if blocked:
            watch = blocked
        elif not self.failed and self.started and self.consumed < self._order_limit:
            if self.consumed < self._replay_end:  # only the recorded input lets us go on
                watch = [self.inputs[self._replay[self.consumed - self._replay_from]].sub]
            else:
                watch = [p.sub for p in self.inputs if not p.eos]
        else:
            watch = []
        _, ready = self.inbox.wait(timeout, [self.chan.fileno()], self.spec.spin_us if watch else 0, watch)
        if ready:
            self._ctrl_ready = True

    # ------------------------------------------------------------------ commits

    def out_next(self) -> Dict[int, int]:
        return {p.spec.index: p.next_seq for p in self.outputs}

    def uncommitted_progress(self) -> bool:
        last = self.markers[-1] if self.markers else None
        if last is not None:
            return last.positions != self.processed or last.source_position != self.source_position
        return self.processed != self.committed or self.source_position != self.committed_position

    def mark(self, force_snapshot: bool = False) -> None:
        """Record the current point as a candidate commit (with a snapshot of the node's
        runtime state when it has one and one is due)."""
        snap = None
        if self.snapshot_interval is not None:
            now = time.monotonic()
            if not force_snapshot and now < self.next_snapshot:
                return
            self.next_snapshot = now + self.snapshot_interval
            snap = cloudpickle.dumps(self.node.snapshot())
        self.markers.append(_Marker(dict(self.processed), self.source_position, self.out_next(), snap))

    def advance_commits(self, force_flush: bool = False, force_acks: bool = False) -> None:
        """Move the commit point past every marker whose outputs are committed downstream,
        and send acks: *processed* every ``ack_every`` frames (flow control), *committed*
        batched with the commit report to the supervisor (at most every 10 ms while busy)."""
        markers = self.markers
        while markers:
            m = markers[0]
            nxt = m.out_next
            if self._lossless_out and any(p.committed < nxt[e] for e, p in self._lossless_out):
                break
            markers.popleft()
            self.committed = m.positions
            self.committed_position = m.source_position
            self.commit_out_next = m.out_next
            if m.snapshot is not None:
                self.commit_snapshot = m.snapshot
            self.commit_dirty = True
        if self.commit_dirty and (force_flush or time.monotonic() >= self._next_commit):
            self.flush_commit()
            return
        for i, p in self.by_edge_in.items():
            # (a quarter of the window, or less when big frames make the window small)
            if force_flush or force_acks or self.processed[i] + 1 - p.acked_processed >= min(self.ack_every, p.notify_every):
                p.ack(self.processed[i] + 1, self.reported[i] + 1)

    def flush_commit(self, final: bool = False) -> None:
        if self.commit_dirty or final:
            self.commit_dirty = False
            snap, self.commit_snapshot = self.commit_snapshot, None
            # The supervisor must know the commit before upstream may forget the frames: in
            # the status block (a few stores, no wake-up) unless a snapshot goes with it, and
            # by message when it must act on it (the final commit, relayed upstream).
            board = self.board
            via_board = board is not None and self.snapshot_interval is None
            if via_board:
                committed, out_next = self.committed, self.commit_out_next
                board.write_commit(
                    self.committed_position,
                    [committed[e.index] for e in self.spec.in_edges] + [out_next[e.index] for e in self.spec.out_edges],
                )
            if final or not via_board:
                self.chan.send(
                    Commit(
                        in_seqs=dict(self.committed),
                        out_next=dict(self.commit_out_next),
                        source_position=self.committed_position if self.spec.is_source else None,
                        snapshot=snap,
                        final=final,
                    )
                )
            self.reported = self.committed
            if self._order_cap:
                # the frames after this commit may fill the order ring (Scoreboard.read_order)
                self._order_limit = sum(self.committed.values()) + len(self.committed) + self._order_cap
            self._next_commit = time.monotonic() + 0.01
        for i, p in self.by_edge_in.items():
            p.ack(self.processed[i] + 1, self.reported[i] + 1)

    # ------------------------------------------------------------------ emitting

    def allocate(self, shape: Any, dtype: Any) -> np.ndarray:
        """Node.allocate() in a worker: a writable array over a chunk loaned from the first
        output edge, so that returning it sends the frame without a copy."""
        dtype = np.dtype(dtype)
        try:
            count = operator.index(shape)  # an int, numpy's too
        except TypeError:
            shape = tuple(operator.index(n) for n in shape)
            count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if not self.outputs or nbytes == 0:
            return np.empty(shape, dtype)
        port = self.outputs[0]
        if not port.can_send():
            self.wait_for_room(port)
        try:
            if len(self._loans) >= MAX_LOANED - 2:  # keep chunks for the copying sends
                raise LoanError(f"{len(self._loans)} allocated buffers are still outstanding")
            loan = port.loan(nbytes)
        except LoanError as e:
            if not self._loan_warned:
                self._loan_warned = True
                log.warning("node %s: allocate() falls back to private memory (%s); return or drop "
                            "allocated buffers before allocating more", self.spec.name, e)
            return np.empty(shape, dtype)
        arr = np.frombuffer(loan, dtype=dtype, count=count).reshape(shape)
        self._loans[loan.address] = loan
        return arr

    def _release_loans(self) -> None:
        for loan in self._loans.values():
            if loan.pending:
                loan.discard()
        self._loans.clear()

    def emit(self, value: Any) -> None:
        if type(value) is Frame:
            value, stream_id = value.value, value.stream_id
            if stream_id is None:
                stream_id = self._current_stream
        else:
            stream_id = self._current_stream
        origin, created = self._current_origin, self._current_created
        # A bare array goes out through the bridge's hot path (encoded, copied, published and
        # notified in one call) on every edge that has seen its dtype and shape before.
        fast = type(value) is np.ndarray and not self._loans
        meta: Any = None
        bufs: List[Any] = []
        loan = None
        for i, port in enumerate(self.outputs):
            if not port.can_send():
                self.wait_for_room(port)
            if fast and port.send_array(value, origin, stream_id, created):
                continue
            if meta is None:
                try:
                    meta, bufs = encode(value)
                except Exception as e:
                    raise self._unsendable(value, e) from None
                if self._loans and len(bufs) == 1:
                    loan = self._loans.pop(bridge.buffer_address(bufs[0]), None)
                    if loan is not None and (loan.nbytes != memoryview(bufs[0]).nbytes or not loan.pending):
                        loan = None
            if i == 0 and loan is not None:
                port.send_loan(loan, meta, bufs[0], origin, stream_id, created)
            else:
                port.send(KIND_DATA, meta, bufs, origin, stream_id, created)
                if fast and len(bufs) == 1:
                    port.learn_array(value, meta, bufs[0])
        self.frames_out += 1
        if self.board is not None:
            self.board.set("frames_out", self.frames_out)

    def _unsendable(self, value: Any, error: BaseException) -> OutputSerializationError:
        """The one-line error of an output that does not pickle, with the path of the part
        that fails (the failure path only: emit() pays nothing for it)."""
        from remotemedia.serialization import find_unpicklable

        try:
            path, err = find_unpicklable(value, error=error)
        except Exception:  # (the search failed: report the first error)
            path, err = "", error
        frame = getattr(self.node, "current_frame", None)
        seq = frame[0] if frame is not None else None
        return OutputSerializationError(self.spec.name, seq, f"{type(err).__name__}: {err}", path.lstrip(".") or None)

    def wait_for_room(self, port: OutPort) -> None:
        """Backpressure: wait until ``port`` may send. Time spent here is not processing
        time, so the per-frame deadline is paused meanwhile."""
        busy = self.board.read() if self.board is not None else None
        if self.board is not None:
            self.board.idle()
        while not port.can_send():
            self.flush_commit()
            self.pump()
            if port.can_send():
                break
            self.wait(0.05)
        if busy is not None and busy["busy_since_ns"] and self.board is not None:
            self.board.busy(busy["busy_edge"], busy["busy_seq"])

    def emit_result(self, result: Any) -> None:
        if result is None:
            return
        t = type(result)
        if t is np.ndarray or t is dict or t is bytes or t is str or t is tuple or t is list:
            self.emit(result)  # the common cases, without the inspect checks below
            return
        for item in iter_outputs(result, self.event_loop):
            self.emit(item)

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            import asyncio  # only async nodes need it, and it costs every worker's start-up

            self._loop = asyncio.new_event_loop()
        return self._loop

    # ------------------------------------------------------------------ inputs

    def step_input(self) -> bool:
        inputs = self.inputs
        n = len(inputs)
        for i in range(n):
            port = inputs[(self._rr + i) % n] if n > 1 else inputs[0]
            if port.eos:
                continue
            # (frames to skip are dead-lettered from their Sample: no bridge decoding then)
            got = port.receive() if self.skip else port.take()
            if got is None:
                continue
            if n > 1:
                self._rr = (self._rr + i + 1) % n
            if type(got) is tuple:  # decoded by the bridge
                self.run_node(port, *got)
            elif got.kind != KIND_EOS:
                self.handle_frame(port, got)
            return True
        return False

    def step_ordered(self) -> bool:
        """:meth:`step_input` of a node with several inputs (lossless ones). Each frame's
        input is recorded in the status block before the node sees it, so before any of its
        outputs leaves; after a restart the frames after the commit are consumed again in
        the recorded order (waiting for the recorded edge even when others have frames
        ready), so a deterministic node emits again exactly what it emitted, under the same
        seqs, and its consumers' per-edge deduplication stays exact. Then round robin."""
        consumed = self.consumed
        if consumed >= self._order_limit:
            self._order_full()
            return False
        inputs = self.inputs
        if consumed < self._replay_end:
            port = inputs[self._replay[consumed - self._replay_from]]
            got = None if port.eos else port.receive() if self.skip else port.take()
            if got is None and not port.eos:
                self._replay_waits(consumed, port)
                return False
            if type(got) is tuple:
                self.consumed = consumed + 1  # (recorded already: Scoreboard.write_order)
                self.run_node(port, *got)
                return True
            if got is not None and got.kind != KIND_EOS:
                self.consumed = consumed + 1
                self.handle_frame(port, got)
                return True
            # Only an upstream that is not deterministic ends an input early.
            log.warning(
                "node %s: input from %s ended where the order recorded before the restart has a frame of it; "
                "the %d frames left of that order are consumed as they come (exactly-once needs deterministic nodes)",
                self.spec.name, port.src, self._replay_end - consumed,
            )
            self._replay_end = consumed
            return True
        n = len(inputs)
        rr = self._rr
        for i in range(n):
            j = (rr + i) % n
            port = inputs[j]
            if port.eos:
                continue
            got = port.receive() if self.skip else port.take()
            if got is None:
                continue
            self._rr = (j + 1) % n
            if type(got) is tuple:
                self.board.record_order(consumed, j)  # type: ignore[union-attr]
                self.consumed = consumed + 1
                self.run_node(port, *got)
            elif got.kind != KIND_EOS:
                self.board.record_order(consumed, j)  # type: ignore[union-attr]
                self.consumed = consumed + 1
                self.handle_frame(port, got)
            return True
        return False

    def _replay_waits(self, consumed: int, port: InPort) -> None:
        """Say so when the recorded order has waited long for one input while others have
        frames: with deterministic nodes that frame always comes (it came before the
        restart); a node upstream that is not deterministic may never send it."""
        now = time.monotonic()
        since = self._replay_stall
        if since is None or since[0] != consumed:
            self._replay_stall = (consumed, now)
        elif now - since[1] > 10.0 and any(p.sub.has_samples() for p in self.inputs if p is not port):
            self._replay_stall = (consumed, math.inf)  # once per frame
            log.warning(
                "node %s: replaying the order recorded before its restart, it has waited %.0f s for the next "
                "frame from %s while other inputs have frames (an upstream node that is not deterministic?)",
                self.spec.name, now - since[1], port.src,
            )

    def _order_full(self) -> None:
        """The frames consumed since the reported commit fill the order ring: consume no
        more until the commit moves. It waits only on acks of outputs already sent (never on
        more input), so it cannot deadlock; a node that commits only with its snapshots takes
        one now."""
        if self.snapshot_interval is not None and self.uncommitted_progress():
            self.mark(force_snapshot=True)
        self.advance_commits(force_flush=True)

    def handle_frame(self, port: InPort, sample: Any) -> None:
        seq, origin, stream_id, created_ns, sent_ns, _ = sample.info
        edge = port.spec.index
        if self.skip and seq in self.skip.get(edge, ()):
            self.dead_letter(port, sample)
            del sample
            self.processed[edge] = seq
            self.mark()
            self.advance_commits()
            return
        data = decode(sample, port.sub.borrowed >= port.borrow_limit)
        if type(data) is np.ndarray:
            port.learn(sample, data)  # the next frames like it take the hot path
        del sample
        self.run_node(port, data, seq, origin, stream_id, created_ns, sent_ns)

    def run_node(self, port: InPort, data: Any, seq: int, origin: int, stream_id: int, created_ns: int, sent_ns: int) -> None:
        """process() one input frame and emit its outputs, then the bookkeeping that can wait
        until they are sent: this is the hot path of every stage, every frame."""
        self._current_origin = origin
        self._current_stream = stream_id
        self._current_created = created_ns
        self.frames_in += 1
        edge = port.index
        node = self.node
        if self._lazy_frame:
            node._remotemedia_frame = (seq, origin, stream_id, created_ns, sent_ns, port.src)
        else:
            node.current_frame = FrameInfo(seq, origin, stream_id, created_ns, sent_ns, port.src)
        board = self.board
        if board is not None:
            board.busy(edge, seq)
        t0 = time.perf_counter_ns()
        try:
            result = node.process(data)
            out = self._out1
            # The commonest case first, without emit()'s generality: one output edge, a bare
            # array like the edge's last one, room to send it.
            if (
                out is not None
                and type(result) is np.ndarray
                and not self._loans
                and out.can_send()
                and out.send_array(result, origin, stream_id, created_ns)
            ):
                self.frames_out += 1
                if board is not None:
                    board.set("frames_out", self.frames_out)
            else:
                self.emit_result(result)
            if self._loans:
                self._release_loans()  # allocated but not returned
        except _Abort:
            raise
        except SharedMemoryFullError:
            self._release_loans()
            raise  # fatal whatever on_error says: see main()
        except Exception as e:
            self._release_loans()
            self.errors += 1
            exc_type, message, tb, blob = _format_exc(e)
            fatal = self.spec.on_error == "raise"
            self.chan.send(NodeFailed(seq, origin, exc_type, message, tb, blob, fatal=fatal))
            if fatal:
                self.failed = True
        finally:
            self.latency.add(time.perf_counter_ns() - t0)
            if self._lazy_frame:
                node._remotemedia_frame = None
            else:
                node.current_frame = None
            if board is not None:
                board.idle(self.frames_in)
        self.processed[edge] = seq
        self.mark()
        self.advance_commits()

    def dead_letter(self, port: InPort, sample: Any) -> None:
        """Skip a poison frame; keep a copy of it when a dead-letter directory is set."""
        self.dead_letters += 1
        path = None
        if self.spec.dead_letter_dir:
            header = {
                "node": self.spec.name,
                "edge": port.spec.index,
                "from": port.spec.src,
                "seq": sample.seq,
                "origin": sample.origin,
                "meta": list(sample.meta),
                "buffers": [list(b) for b in sample.buffers],
            }
            path = _write_private(
                self.spec.dead_letter_dir,
                f"{self.spec.name}-e{port.spec.index}-s{sample.seq}",
                ((".frame", memoryview(sample)), (".json", json.dumps(header).encode())),
            )
        log.error("dead-lettered poison frame %d from %s%s", sample.seq, port.spec.src, f" to {path}" if path else "")
        self.chan.send(DeadLetter(port.spec.index, sample.seq, path))

    # ------------------------------------------------------------------ source

    def start_source(self) -> None:
        gen = iter_generated(self.node.generate(), self.event_loop)
        # A restarted deterministic source skips what was already committed downstream.
        for _ in range(self.source_position):
            try:
                next(gen)
            except StopIteration:
                break
        self._gen = gen

    def step_source(self) -> bool:
        if self._gen is None:
            self.start_source()
        assert self._gen is not None
        if self.draining:
            self._close_gen()
            return False
        if self.board is not None:
            self.board.busy(-1, self.source_position)
        t0 = time.perf_counter_ns()
        try:
            item = next(self._gen)
        except StopIteration:
            self._gen = None
            self.draining = True
            return False
        except (_Abort, SharedMemoryFullError):
            raise
        except Exception as e:
            self.errors += 1
            exc_type, message, tb, blob = _format_exc(e)
            self.chan.send(NodeFailed(None, self.source_position, exc_type, message, tb, blob, fatal=True))
            self.failed = True
            return False
        finally:
            if self.board is not None:
                self.board.idle()
        self._current_origin = self.source_position
        self._current_stream = 0
        self._current_created = time.monotonic_ns()
        if item is not None:
            try:
                self.emit(item)
            except OutputSerializationError as e:
                self._release_loans()
                self.errors += 1
                exc_type, message, tb, blob = _format_exc(e)
                self.chan.send(NodeFailed(None, self.source_position, exc_type, message, tb, blob, fatal=True))
                self.failed = True
                return False
        if self._loans:
            self._release_loans()
        self.latency.add(time.perf_counter_ns() - t0)
        self.source_position += 1
        self.frames_in += 1
        if self.board is not None:
            self.board.set("frames_in", self.frames_in)
        self.mark()
        self.advance_commits()
        return True

    def _close_gen(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None and hasattr(gen, "close"):
            try:
                gen.close()
            except Exception:
                log.exception("closing generate() of %s", self.spec.name)

    # ------------------------------------------------------------------ end of stream

    def inputs_done(self) -> bool:
        if self.spec.is_source:
            return self.draining and self._gen is None
        return all(p.eos for p in self.inputs)

    def finish(self) -> None:
        """Every input ended: flush, end the outputs, wait until they are committed."""
        flush = getattr(self.node, "flush", None)
        if callable(flush) and not self.failed:
            try:
                self.emit_result(flush())
            except (_Abort, SharedMemoryFullError):
                raise
            except Exception as e:
                exc_type, message, tb, blob = _format_exc(e)
                self.chan.send(NodeFailed(None, None, exc_type, message, tb, blob, fatal=self.spec.on_error == "raise"))
                if self.spec.on_error == "raise":
                    self.failed = True
                    return
        for port in self.outputs:
            if not port.can_send():
                self.wait_for_room(port)
            # Sending takes a chunk, maybe the chunk of a loaned frame the consumer has released
            # but not yet committed (which would then be copied): give that commit a moment.
            patience = time.monotonic() + 0.1
            while port.loaned_retained and time.monotonic() < patience:
                self.pump()
                if port.loaned_retained:
                    self.wait(0.01)
            # On a lossy edge the end-of-stream frame would overwrite the newest data frame:
            # let the consumer take what is queued first.
            while not port.lossless and not port.fully_acked:
                self.pump()
                if port.fully_acked:
                    break
                self.wait(0.05)
            port.send(KIND_EOS, b"", [], self._current_origin, 0, 0)
        # The end of the inputs is committed only once our own end is committed downstream:
        # a restart after this point must still see the end of its inputs.
        for p in self.inputs:
            if p.eos_seq is not None:
                self.processed[p.spec.index] = p.eos_seq
        self.mark(force_snapshot=True)
        while True:
            self.pump()
            self.advance_commits(force_flush=True)
            if all(p.fully_acked for p in self.outputs) and not self.markers:
                break
            self.wait(0.1)
        self.flush_commit(final=True)

    # ------------------------------------------------------------------ main loop

    def step(self) -> bool:
        """Handle one frame (or one generate() item) if possible."""
        if self.failed:
            return False
        if self._is_source:
            if self.started and not self.inputs_done() and all(p.can_send() for p in self.outputs):
                return self.step_source()
            return False
        for p in self.outputs:
            if not p.can_send():
                return False
        return self.step_input()

    def run(self) -> int:
        just_pumped = False
        while True:
            # A frame first, housekeeping after: after a wake-up the frame is what is late.
            did = self.step()
            # Housekeeping once per frame; an empty step right after a frame's needs none
            # (what runs between sending a frame and sleeping delays the next stage when it
            # shares our core).
            news = self.pump() if did or not just_pumped else False
            just_pumped = did
            if self.failed:
                self.flush_commit()
                self.wait(0.5)
                continue
            if did or (news and self.step()):  # the housekeeping may have unblocked us (Start, acks)
                continue
            if self.inputs_done():
                self.finish()
                if self.failed:
                    continue
                return EXIT_OK
            if self.snapshot_interval is not None and self.uncommitted_progress() and time.monotonic() >= self.next_snapshot:
                self.mark()
            # Idle: tell upstream what we processed now; the commit report to the supervisor
            # follows within 10 ms (a message per frame would wake it for every frame).
            self.advance_commits(force_acks=True)
            self.wait(self.spec.heartbeat_interval)

    def stats(self) -> Dict[str, Any]:
        out = self._stats()
        member_stats = getattr(self.node, "member_stats", None)  # a Group's members
        if callable(member_stats):
            try:
                out["members"] = member_stats()
            except Exception:
                log.exception("member_stats() of %s", self.spec.name)
        return out

    def _stats(self) -> Dict[str, Any]:
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "errors": self.errors,
            "dead_letters": self.dead_letters,
            "latency": self.latency.summary(),
            "edges_in": {
                p.spec.index: {
                    "received": p.received,
                    "duplicates": p.duplicates,
                    "dropped": p.dropped,
                    "decoded_by_bridge": p.decoded_by_bridge,
                }
                for p in self.inputs
            },
            "edges_out": {
                p.spec.index: {
                    "sent": p.sent,
                    "zero_copy": p.zero_copy,
                    "copied_on_reuse": p.copied_on_reuse,
                    "encoded_by_bridge": p.encoded_by_bridge,
                    "resent": p.resent,
                    "discarded": p.discarded,
                    "in_flight": p.in_flight,
                    "retained": len(p.retained),
                }
                for p in self.outputs
            },
        }

    def close(self) -> None:
        """Release every iceoryx2 object of the worker (a closed one holds no file, whatever
        still references it: the node's allocator, a cycle)."""
        self._release_loans()
        for p in self.outputs:
            p.close()
        for p in self.inputs:
            p.close()
        self.outputs = []
        self._out1 = None
        self.inputs = []
        self.by_edge_in, self.by_edge_out, self._lossless_out = {}, {}, []
        self.inbox.close()
        self.iox.close()
        if self._loop is not None:
            self._loop.close()
        if self.board is not None:
            self.board.close()


def _on_sigterm(signum: int, frame: Any) -> None:
    # The supervisor asks politely first (Abort on the control socket); SIGTERM comes only
    # for a worker stuck in Python code, and raising here is what unwinds it so that
    # cleanup() still runs. A worker stuck in C code is SIGKILLed after the grace period.
    raise _Abort("SIGTERM")


def _configure_logging(spec: WorkerSpec) -> None:
    # Records go to the supervisor as marked JSON lines on stderr; it adds node, pid, time.
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(WorkerLogHandler())
    root.setLevel(spec.log_level)


def _read_blob(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=True) as f:
        f.seek(0)
        return f.read()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.worker")
    parser.add_argument("--fd", type=int, required=True, help="control socket fd")
    parser.add_argument("--blob-fd", type=int, required=True, help="memfd holding the pickled node")
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)

    _die_with_parent(args.ppid)
    # The supervisor orchestrates shutdown: Ctrl-C in a terminal must not kill workers
    # mid-frame. SIGTERM (sent only when a worker does not stop on request) exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)

    chan = ControlChannel.from_fd(args.fd)
    try:
        chan.send(Hello(os.getpid()))
        setup, early = await_setup(chan)
    except (ChannelClosed, _Abort):
        return EXIT_SETUP_ERROR
    if any(isinstance(m, Abort) for m in early):
        return EXIT_ABORTED  # stopped before it began (the Abort may share a read with Setup)
    spec = setup.spec
    _configure_logging(spec)

    t0 = time.monotonic()
    stage = "unpickle"
    try:
        blob = _read_blob(args.blob_fd)
        node = cloudpickle.loads(blob)
        del blob
        stage = "initialize"
        node.initialize()
        # Runtime state of the last commit wins over what initialize() set up.
        if setup.restore is not None and setup.restore.snapshot is not None and callable(getattr(node, "restore", None)):
            stage = "restore"
            node.restore(cloudpickle.loads(setup.restore.snapshot))
    except BaseException as e:  # noqa: BLE001 - everything must reach the supervisor
        exc_type, message, tb, _ = _format_exc(e)
        try:
            chan.send(InitFailed(stage, exc_type, message, tb))
        except ChannelClosed:
            pass
        return EXIT_LOAD_ERROR

    try:
        runner = Runner(node, spec, chan, setup.restore)
    except BaseException as e:  # noqa: BLE001
        exc_type, message, tb, _ = _format_exc(e)
        try:
            chan.send(InitFailed("setup", exc_type, message, tb))
        except ChannelClosed:
            pass
        _safe_cleanup(node, spec)
        return EXIT_SETUP_ERROR

    code = EXIT_OK
    try:
        chan.send(Ready(os.getpid(), time.monotonic() - t0))
        runner.handle_control(early)
        prof_dir = os.environ.get("REMOTEMEDIA_PROFILE_DIR")
        if prof_dir:  # development aid: a cProfile of the worker loop per node
            import cProfile

            prof = cProfile.Profile()
            try:
                code = prof.runcall(runner.run)
            finally:
                prof.dump_stats(os.path.join(prof_dir, f"{spec.name}.prof"))
        else:
            code = runner.run()
    except _Abort:
        code = EXIT_ABORTED
    except ChannelClosed:
        code = EXIT_ABORTED
    except SharedMemoryFullError as e:
        # Not the node's fault, and a restart would not cure it: the pipeline fails.
        code = _fail_and_wait(chan, e)
    finally:
        stats = runner.stats()
        _safe_cleanup(node, spec)
        runner.close()
    if code == EXIT_OK:
        try:
            chan.send(Done(stats))
        except ChannelClosed:
            pass
    return code


def await_setup(chan: ControlChannel) -> Tuple[Setup, List[Any]]:
    """Wait for the Setup message; also return the messages read with it. Those must not be
    lost: the supervisor relays acks to a worker while it starts (a consumer's final commit
    is relayed only once), and a restarted producer whose end of stream was committed while
    it was down would otherwise wait for that ack forever."""
    early: List[Any] = []
    while True:
        msgs = _blocking_receive(chan)
        setup = next((m for m in msgs if isinstance(m, Setup)), None)
        early.extend(m for m in msgs if m is not setup)
        if setup is not None or any(isinstance(m, Abort) for m in early):
            return setup, early  # type: ignore[return-value]


def _fail_and_wait(chan: ControlChannel, e: BaseException) -> int:
    """Report a fatal error that did not come from the node and wait for the supervisor's
    Abort (touching no shared memory meanwhile)."""
    exc_type, message, tb, blob = _format_exc(e)
    try:
        chan.send(NodeFailed(None, None, exc_type, message, tb, blob, fatal=True))
        while not any(isinstance(m, Abort) for m in _blocking_receive(chan)):
            pass
    except ChannelClosed:
        pass
    return EXIT_ABORTED


def _safe_cleanup(node: Any, spec: WorkerSpec) -> None:
    try:
        node.cleanup()
    except Exception:
        log.exception("cleanup() of node %s raised", spec.name)


def _blocking_receive(chan: ControlChannel) -> List[Any]:
    import select

    while True:
        msgs = chan.receive()
        if msgs:
            return msgs
        select.select([chan.fileno()], [], [], 1.0)


if __name__ == "__main__":
    sys.exit(main())
