"""The worker's loop around one initialized node: step (an input frame, or a source's next
item), pump (control messages, acks, resends, gaps, heartbeat), wait, finish. The books are
the :class:`~.ledger.Ledger`'s, the outputs the :class:`~.emitter.Emitter`'s, a source's items
the :class:`~.source.SourceStepper`'s; the per-frame path (:meth:`Runner.run_node`) calls them
through references bound once, in ``__init__``."""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import cloudpickle
import numpy as np

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import SharedMemoryFullError
from remotemedia.frames import PROTOCOL as _PROTOCOL
from remotemedia.frames import FrameInfo, decode
from remotemedia.node import Node

from ..channels import KIND_DATA, KIND_EOS, InPort, OutPort, Transport
from ..protocol import (
    EXIT_HANDOVER,
    EXIT_OK,
    Abort,
    Acked,
    ChannelClosed,
    ControlChannel,
    DeadLetter,
    Drain,
    Gap,
    Handover,
    Heartbeat,
    NodeFailed,
    Replay,
    RestoreState,
    Start,
    WorkerSpec,
)
from ..scoreboard import Scoreboard
from ..stats import BOUNDS_NS
from .counters import Counters
from .deadletter import dead_letter
from .emitter import Emitter
from .failures import Aborted as _Abort
from .failures import format_exc as _format_exc
from .ledger import Ledger
from .replicas import TAG_LEN, Dispatch, Merge, tagged_k, untag
from .source import SourceStepper

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("remotemedia.worker")

# Frames handled back to back before the housekeeping (Runner.step_batch): waiting frames
# are taken in one wake-up; acks and commits go out per batch, not per frame.
BATCH = 16
#: Results that encode() turns into a bare pickle (no out-of-band buffer): run_node pickles
#: them itself.
_SCALARS = frozenset((int, float, bool, str, bytes))
_dumps = pickle.dumps
BATCH_S = 0.002
BATCH_NS = int(BATCH_S * 1e9)
# While frames flow, a stage's bridge loop (StageLoop.serve) hands back to this loop at least
# this often: the commit point, the commit report and the heartbeat are made here.
SERVE_SLICE_NS = 2_000_000
# ... and once no frame came for this long (a paced stream: the housekeeping is done before the
# next frame, instead of when it arrives)
SERVE_LULL_NS = 200_000


class Runner:
    """The worker's main loop around one initialized node."""

    def __init__(self, node: Any, spec: WorkerSpec, chan: ControlChannel, restore: Optional[RestoreState]) -> None:
        self.node = node
        self.spec = spec
        self.chan = chan
        self.restore = restore or RestoreState()
        self.board = board = Scoreboard.from_fd(spec.scoreboard_fd) if spec.scoreboard_fd >= 0 else None
        self.iox = bridge.Node(spec.prefix, f"w{spec.index}", spec.root)
        doorbells = None
        if spec.doorbell_fd >= 0:  # (mapped; the descriptor is not needed any more)
            try:
                doorbells = bridge.Doorbells(spec.doorbell_fd)
            finally:
                os.close(spec.doorbell_fd)
        t = Transport(self.iox, doorbells)
        # (the supervisor rings the doorbell after each control message: WorkerProcess.send)
        self.inbox = t.listener(spec.inbox, spec.bell, control_rings=True)
        # Inputs first: a restarted worker must be attached before anyone replays to it.
        self.inputs: List[InPort] = [
            InPort(self.iox, e, expected=self.restore.in_seqs.get(e.index, -1) + 1, transport=t) for e in spec.in_edges
        ]
        self.outputs: List[OutPort] = [
            OutPort(
                self.iox,
                e,
                next_seq=self.restore.out_next.get(e.index, 0),
                committed=self.restore.out_committed.get(e.index, 0),
                consumer_finished=self.restore.out_finished.get(e.index, False),
                transport=t,
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
        self.skip = {edge: set(seqs) for edge, seqs in self.restore.skip.items()}
        self.started = not spec.is_source
        self.failed = False  # process() raised with on_error="raise": wait for Abort
        self.handing_over = False  # Handover arrived: no more input, commit, exit

        has_snapshot = callable(getattr(node, "snapshot", None)) and callable(getattr(node, "restore", None))
        self.ledger = ledger = Ledger(
            self.inputs,
            self.outputs,
            chan=chan,
            board=board,
            is_source=spec.is_source,
            keeps_position=spec.merges,
            source_position=self.restore.source_position,
            snapshot=(lambda: cloudpickle.dumps(node.snapshot())) if has_snapshot else None,
            snapshot_interval=spec.snapshot_interval if spec.snapshot_interval is not None else 1.0,
            # (a replica acks every frame: its upstream sends the next frame to the replica
            # with the fewest in flight, see .replicas)
            ack_every=spec.ack_every
            or (1 if spec.replica >= 0 else max(1, min((e.depth for e in spec.in_edges), default=4) // 4)),
        )
        # (the per-frame path calls these: bound once)
        self.processed: Dict[int, int] = ledger.processed  # (the same dict, updated in place)
        self._mark = ledger.mark
        self._advance = ledger.advance
        self.counters = counters = Counters()

        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.emitter = emitter = Emitter(
            node, spec.name, self.outputs, counters, board, self.wait_for_room, self.event_loop, replica=spec.replica,
            wait_for_dispatch=self.wait_for_dispatch,
        )  # fmt: skip
        # Toward nodes with replicas: each frame's replica is recorded in an order ring of the
        # status block, the choices of the predecessor after the commit are made again, and
        # the worker stays less than the ring's capacity ahead of its reported commit.
        self._dispatch = emitter.groups[1] if emitter.groups is not None else []
        if self._dispatch and board is not None and board.order_capacity:
            for g, d in enumerate(self._dispatch):
                ring = spec.dispatch_ring(g)
                d.record = lambda k, i, ring=ring: board.record_order(k, i, ring)  # type: ignore[misc]
                d.replay = list(self.restore.dispatch.get(d.node, ()))
            ledger.limit_dispatch(self._dispatch, board.order_capacity)
        self._loans = emitter.loans  # (the same dict)
        self._emit_result = emitter.emit_result
        node._remotemedia_allocator = emitter.allocate
        self.source: Optional[SourceStepper] = (
            SourceStepper(node, spec.name, ledger, emitter, counters, board, self.event_loop, self.node_failed)
            if spec.is_source
            else None
        )

        self.next_heartbeat = time.monotonic() + spec.heartbeat_interval
        self._ctrl_ready = True
        self._next_ctrl = 0.0
        self._rr = 0
        # A node with several inputs records the order it consumes them in and, restarted,
        # consumes the replayed frames in the recorded order (see step_ordered).
        self.consumed = 0  # input frames consumed, all edges together (when recording)
        self._replay: List[int] = []  # input positions of the frames after the commit, in order
        self._replay_from = self._replay_end = 0
        self._replay_stall: Optional[Tuple[int, float]] = None  # (frame number, waiting since)
        if spec.records_order and board is not None and board.order_capacity:
            self.consumed = self._replay_from = self.restore.consumed(spec.in_edges)
            position = {e.index: i for i, e in enumerate(spec.in_edges)}
            self._replay = [position[e] for e in self.restore.order]
            self._replay_end = self._replay_from + len(self._replay)
            ledger.limit_order(self.consumed, board.order_capacity)
            self.step_input = self.step_ordered  # type: ignore[method-assign]
        # Replicas (see .replicas): a replica numbers its outputs; a node fed by replicas
        # merges their outputs back into input order.
        self._replica = spec.replica >= 0
        self._merge: Optional[Merge] = None
        if spec.merges:
            self._merge = Merge(self, self.restore.source_position)
            self.step_input = self._merge.step  # type: ignore[method-assign]
        if self._replica:
            self._out1 = None  # (its outputs are wrapped: not the plain fast path)
        # A Node builds current_frame only when asked (see Node.current_frame).
        self._lazy_frame = isinstance(node, Node)
        # The frames of a stage go through the bridge's loop (take, process, send; see
        # StageLoop) unless the node needs what only this class does per frame: a recorded
        # input order, or a current_frame attribute of its own (not a Node).
        self._stage: Optional[bridge.StageLoop] = None
        self._serves = True  # (False once StageLoop.serve found a Python transport)
        if (
            self._lazy_frame
            and not (spec.records_order and board is not None and board.order_capacity)
            and not (self._replica or self._merge is not None or emitter.groups)
        ):
            self._stage = bridge.StageLoop(
                self.inputs, self.outputs, node, emitter, self.handle_frame, self._stage_failed,
                self._halted, ledger.processed, counters, np.ndarray, _dumps, _PROTOCOL, list(BOUNDS_NS),
                board.buffer if board is not None else None,
            )  # fmt: skip
            node._remotemedia_frame_of = self._stage.frame_slot  # (Node.current_frame asks it)

    # (views of the ledger's state, for tests and tools)

    @property
    def reported(self) -> Dict[int, int]:
        """The last commit the supervisor knows, per input edge."""
        return self.ledger.reported

    @property
    def source_position(self) -> int:
        return self.ledger.source_position

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
        for p in self.inputs:
            if p.eos:
                self._drop_after_end(p)
        self.ledger.tick(progress, now)
        for p in self.inputs:
            if p.gap_since is not None:
                want = p.gap_to_report(now)
                if want is not None:
                    self.chan.send(Gap(p.spec.index, want))
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.spec.heartbeat_interval
            self.chan.send(Heartbeat(self.stats()))
            for p in self.inputs:
                p.probe()
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
            if isinstance(msg, Acked):  # (a consumer's final commit: it has exited)
                port = self.by_edge_out.get(msg.edge)
                if port is not None:
                    port.consumer_ended(msg.processed, msg.committed)
            elif isinstance(msg, Replay):
                port = self.by_edge_out.get(msg.edge)
                if port is not None:
                    port.replay(msg.after)
            elif isinstance(msg, Start):
                self.started = True
            elif isinstance(msg, Drain):
                if self.source is not None:
                    self.source.drain()
            elif isinstance(msg, Handover):
                self.handing_over = True
            elif isinstance(msg, Abort):
                raise _Abort("abort requested")

    def _timeout(self, timeout: float) -> float:
        """``timeout``, or less when the heartbeat, a resend, a snapshot or a commit report
        falls due sooner."""
        deadline = self.next_heartbeat
        for p in self.outputs:
            r = p.next_retry
            if r is not None:
                deadline = min(deadline, r)
        deadline = self.ledger.deadline(deadline)
        return max(0.0, min(timeout, deadline - time.monotonic()))

    def serve(self) -> bool:
        """Idle and on the bridge's loop: let it wait, take (or generate), process, send and
        ack until it needs us (StageLoop.serve / serve_source), then record the commit point
        of what it did. False when this worker must wait here instead: a restart's frames to
        skip, a gap or duplicates to answer, a resend due, a source not started or ending, a
        Python transport."""
        stage = self._stage
        if stage is None or not self._serves or not self.started or self.skip or self.failed or self.handing_over:
            return False
        for i in self.inputs:
            if i.gap_since is not None or i.dup_pending:
                return False
        for o in self.outputs:
            if o.undelivered is not None:
                return False
        fds = [self.chan.fileno()]
        now = time.monotonic()
        timeout = self._timeout(self.spec.heartbeat_interval)
        commit_in = self.ledger.next_commit - now
        source = self.source
        if source is not None:
            got = source.serve(stage, self.inbox, fds, timeout, commit_in, self.spec.spin_us, BATCH, BATCH_NS, SERVE_SLICE_NS, SERVE_LULL_NS)
            if got is None:
                return False
        else:
            got = stage.serve(self.inbox, fds, timeout, commit_in, self.spec.spin_us, self.ledger.ack_every, BATCH, BATCH_NS, SERVE_SLICE_NS, SERVE_LULL_NS)
            if got is None:
                self._serves = False
                return False
        n, ctrl_ready = got
        if ctrl_ready:
            self._ctrl_ready = True
        counters = self.counters
        counters.serve_turns += 1
        counters.serve_steps += n
        latencies = stage.take_latencies()
        if latencies is not None:
            counters.latency.merge(*latencies)
        if n:
            self._mark()
        self._advance()  # (the bridge took the acks: commits from downstream among them)
        return True

    @staticmethod
    def _drop_after_end(port: InPort) -> None:
        """Read what arrives on an input after its end of stream: a restarted producer sends
        again what it sent after its commit, and those duplicates must be dropped and answered
        (the ack ``ledger.tick`` sends), or its window fills with them and it stops, with
        frames for its other consumers behind them; on a diamond or toward replicas those are
        what this worker's own end waits for. (A frame past the end, which only a node that
        emits more after its restart than before could send, is dropped too.)"""
        while port.receive() is not None:
            pass

    def wait(self, timeout: float) -> None:
        timeout = self._timeout(timeout)
        # Spin only on what would let us go on: inputs when we may send, acks of the full
        # outputs when we may not. (Acks of an output with room are no reason to burn a
        # core: on a paced stream every ack would be "caught" and grow the spin, stealing
        # the CPU from the very stage about to send us our next frame.)
        blocked = [p.ack_sub for p in self.blocked()]
        if blocked:
            watch = blocked
        elif not self.failed and self.started and self.consumed < self.ledger.order_limit:
            if self.consumed < self._replay_end:  # only the recorded input lets us go on
                watch = [self.inputs[self._replay[self.consumed - self._replay_from]].sub]
            elif self._merge is not None:
                watch = self._merge.watch()
            else:
                watch = [p.sub for p in self.inputs if not p.eos]
        else:
            watch = []
        _, ready = self.inbox.wait(timeout, [self.chan.fileno()], self.spec.spin_us if watch else 0, watch)
        if ready:
            self._ctrl_ready = True

    def blocked(self) -> List[OutPort]:
        """The outputs whose lack of room keeps the next frame from being handled (none: it
        may go): every full one, but toward a node with replicas only when none of those
        the frame may go to has room."""
        if not self._dispatch:
            return [p for p in self.outputs if not p.can_send()]
        out = [p for p in self.emitter.groups[0] if not p.can_send()]  # type: ignore[index]
        for d in self._dispatch:
            ports = d.waits_on()
            if not any(p.can_send() for p in ports):
                out.extend(ports)
        return out

    def wait_for_room(self, *ports: OutPort) -> None:
        """Backpressure: wait until one of ``ports`` may send. Time spent here is not
        processing time, so the per-frame deadline is paused meanwhile."""
        busy = self.board.read() if self.board is not None else None
        if self.board is not None:
            self.board.idle()
        while not any(p.can_send() for p in ports):
            self.ledger.flush()
            self.pump()
            if any(p.can_send() for p in ports):
                break
            self.wait(0.05)
        if busy is not None and busy["busy_since_ns"] and self.board is not None:
            self.board.busy(busy["busy_edge"], busy["busy_seq"])

    def wait_for_dispatch(self, d: Dispatch) -> None:
        """The next frame toward the replicas of ``d`` has no room in the status block's
        ring (the worker is a ring's capacity ahead of its reported commit): commit, and wait
        until the commit has moved."""
        busy = self.board.read() if self.board is not None else None
        if self.board is not None:
            self.board.idle()
        ledger = self.ledger
        while d.k >= d.limit:
            if not ledger.markers and not ledger.commit_dirty:
                raise RuntimeError(
                    f"node {self.spec.name}: one input made more than {ledger.order_cap} frames for the replicas of "
                    f"{d.node}, more than their exactly-once record holds; split the work over more inputs"
                )
            ledger.commit_now()
            self.pump()
            if d.k < d.limit:
                break
            self.wait(0.05)
        if busy is not None and busy["busy_since_ns"] and self.board is not None:
            self.board.busy(busy["busy_edge"], busy["busy_seq"])

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            import asyncio  # only async nodes need it, and it costs every worker's start-up

            self._loop = asyncio.new_event_loop()
        return self._loop

    def node_failed(self, seq: Optional[int], origin: Optional[int], e: BaseException, fatal: bool) -> None:
        """Report an exception of the node; a fatal one stops the loop until Abort."""
        self.counters.errors += 1
        exc_type, message, tb, blob = _format_exc(e)
        self.chan.send(NodeFailed(seq, origin, exc_type, message, tb, blob, fatal=fatal))
        if fatal:
            self.failed = True

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
        if consumed >= self.ledger.order_limit:
            # The frames consumed since the reported commit fill the order ring: consume no
            # more until the commit moves. It waits only on acks of outputs already sent
            # (never on more input), so it cannot deadlock.
            self.ledger.commit_now()
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

    def _stage_failed(self, seq: int, origin: int, e: BaseException) -> bool:
        """StageLoop: process() (or sending its outputs) raised ``e``; as run_node's except
        clauses. True when the loop must stop."""
        if isinstance(e, _Abort) or not isinstance(e, Exception):
            raise e
        self.emitter.release_loans()
        if isinstance(e, SharedMemoryFullError):
            raise e  # fatal whatever on_error says: see main()
        self.node_failed(seq, origin, e, self.spec.on_error == "raise")
        return self.failed or self.handing_over

    def _halted(self) -> bool:
        return self.failed or self.handing_over

    def handle_frame(self, port: InPort, sample: Any) -> None:
        seq, origin, stream_id, created_ns, sent_ns, _ = sample.info
        edge = port.spec.index
        if self.skip and seq in self.skip.get(edge, ()):
            self.counters.dead_letters += 1
            k = tagged_k(sample) if self._replica else -1
            path = dead_letter(self.spec.name, self.spec.dead_letter_dir, port, sample, TAG_LEN if self._replica else 0)
            self.chan.send(DeadLetter(edge, seq, path))
            del sample
            if self._replica:  # (its input k ends without an output)
                self.emitter.start_input(k)
                self.emitter.end_input()
            self.processed[edge] = seq
            self._mark()
            self._advance()
            return
        if self._replica:
            k, data = untag(sample, port.sub.borrowed >= port.borrow_limit)
            self.emitter.start_input(k)
        else:
            data = decode(sample, port.sub.borrowed >= port.borrow_limit)
            if type(data) is np.ndarray:
                port.learn(sample, data)  # the next frames like it take the hot path
        del sample
        self.run_node(port, data, seq, origin, stream_id, created_ns, sent_ns)

    def run_node(self, port: InPort, data: Any, seq: int, origin: int, stream_id: int, created_ns: int, sent_ns: int) -> None:
        """process() one input frame and emit its outputs, then the bookkeeping that can wait
        until they are sent: this is the hot path of every stage, every frame."""
        em = self.emitter
        em.origin = origin
        em.stream = stream_id
        em.created = created_ns
        counters = self.counters
        counters.frames_in += 1
        edge = port.index
        node = self.node
        if self._lazy_frame:
            node._remotemedia_frame = (seq, origin, stream_id, created_ns, sent_ns, port.src)
        else:
            node.current_frame = FrameInfo(seq, origin, stream_id, created_ns, sent_ns, port.src)
        board = self.board
        if board is not None:
            board.busy(edge, seq)
        if self._replica and not em.k_open:  # (handle_frame read k from the frame)
            raise RuntimeError(f"node {self.spec.name}: frame {seq} from {port.src} came without its dispatch number")
        t0 = time.perf_counter_ns()
        try:
            result = node.process(data)
            out = self._out1
            # The commonest cases first, without emit()'s generality: one output edge with room,
            # and a bare array like the edge's last one, or a scalar (what encode() would make
            # of it: a pickle and no out-of-band buffer).
            sent = False
            if out is not None and not self._loans and out.can_send():
                kind = type(result)
                if kind is np.ndarray:
                    sent = out.send_array(result, origin, stream_id, created_ns)
                elif kind in _SCALARS:
                    out.send(KIND_DATA, _dumps(result, _PROTOCOL), [], origin, stream_id, created_ns)
                    sent = True
            if sent:
                counters.frames_out += 1
                if board is not None:
                    board.set("frames_out", counters.frames_out)
            else:
                self._emit_result(result)
            if self._loans:
                em.release_loans()  # allocated but not returned
        except _Abort:
            raise
        except SharedMemoryFullError:
            em.release_loans()
            raise  # fatal whatever on_error says: see main()
        except Exception as e:
            em.release_loans()
            self.node_failed(seq, origin, e, self.spec.on_error == "raise")
        finally:
            counters.latency.add(time.perf_counter_ns() - t0)
            if self._lazy_frame:
                node._remotemedia_frame = None
            else:
                node.current_frame = None
            if board is not None:
                board.idle(counters.frames_in)
        if self._replica:
            em.end_input()  # (also when process() raised and on_error is "skip")
        self.processed[edge] = seq
        self._mark()
        self._advance()

    # ------------------------------------------------------------------ end of stream

    def inputs_done(self) -> bool:
        if self.source is not None:
            return self.source.done
        if self._merge is not None and self._merge.holds():
            return False  # (frames taken off the edges, not yet consumed)
        return all(p.eos for p in self.inputs)

    def finish(self) -> None:
        """Every input ended: flush, end the outputs, wait until they are committed."""
        flush = getattr(self.node, "flush", None)
        if callable(flush) and not self.failed:
            self.emitter.k = -1  # (a replica's flush() outputs: after every input's)
            try:
                self.emitter.emit_result(flush())
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
            port.send(KIND_EOS, b"", [], self.emitter.origin, 0, 0)
        ledger = self.ledger
        ledger.mark(force_snapshot=True)
        while True:
            self.pump()
            ledger.advance(force_flush=True)
            if all(p.fully_acked for p in self.outputs) and not ledger.markers:
                break
            self.wait(0.1)
        # Our own end is committed downstream: the final commit, and only it, commits the
        # end of the inputs. Had an earlier commit done so, upstream would forget its end of
        # stream (and a worker upstream exit), and this worker, killed before its final
        # commit, would be restarted to wait for an end of stream nobody sends again.
        ledger.final({p.spec.index: p.eos_seq for p in self.inputs if p.eos_seq is not None})

    def hand_over(self) -> None:
        """Handover (a restart or a reload replaces this worker): at a frame boundary, take
        no more input and wait until every output is committed downstream, so that the commit
        covers every frame processed (with a snapshot of the node's state, when it has one);
        report it. Its replacement then starts right after the last frame processed: nothing
        is replayed to it and nothing is emitted twice, deterministic node or not. Past
        ``handover_timeout`` (downstream stuck) it reports the commit it has: the frames after
        it are replayed to the replacement, as after a crash."""
        timeout = self.spec.handover_timeout
        ledger = self.ledger
        ledger.mark(force_snapshot=True)
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            ledger.advance(force_flush=True)
            if not ledger.markers:
                break
            if time.monotonic() >= deadline:
                log.warning(
                    "node %s: handing over with frames not yet committed downstream after %.0f s; its "
                    "replacement takes them again", self.spec.name, timeout,
                )
                break
            self.wait(0.05)
        ledger.flush()

    # ------------------------------------------------------------------ main loop

    def step(self) -> bool:
        """Handle one frame (or one generate() item) if possible."""
        if self.failed or self.handing_over:
            return False
        source = self.source
        if self._dispatch:
            if self.blocked():
                return False
            if source is not None:
                return self.started and not source.done and source.step()
            return self.step_input()
        if source is not None:
            if self.started and not source.done and all(p.can_send() for p in self.outputs):
                return source.step()
            return False
        for p in self.outputs:
            if not p.can_send():
                return False
        return self.step_input()

    def step_batch(self) -> bool:
        """Handle the frames that are waiting, up to ``BATCH`` of them or ``BATCH_S`` seconds'
        worth (the housekeeping, the status block's heartbeat among it, must not wait longer).
        False when there was none."""
        stage = self._stage
        if stage is not None and self.started and not self.skip and not self.failed and not self.handing_over:
            source = self.source
            if source is not None:
                if source.done:
                    return False
                n = source.run_batch(stage, BATCH, BATCH_NS)
            else:
                n = stage.run(BATCH, BATCH_NS)
            latencies = stage.take_latencies()
            if latencies is not None:
                self.counters.latency.merge(*latencies)
            if n:
                # (one commit point per batch: any point between two frames is one)
                self._mark()
                self._advance()
            return n > 0
        step = self.step
        if not step():
            return False
        until = time.monotonic() + BATCH_S
        for _ in range(BATCH - 1):
            if not step() or time.monotonic() >= until:
                break
        return True

    def run(self) -> int:
        ledger = self.ledger
        just_pumped = False
        while True:
            # Frames first, housekeeping after: after a wake-up the frames are what is late.
            did = self.step_batch()
            # Housekeeping once per batch of frames; an empty step right after a batch needs
            # none (what runs between sending a frame and sleeping delays the next stage when
            # it shares our core).
            news = self.pump() if did or not just_pumped else False
            just_pumped = did
            if self.handing_over:
                self.hand_over()
                return EXIT_HANDOVER
            if self.failed:
                ledger.flush()
                self.wait(0.5)
                continue
            if did or (news and self.step_batch()):  # the housekeeping may have unblocked us (Start, acks)
                continue
            if self.inputs_done():
                self.finish()
                if self.failed:
                    continue
                return EXIT_OK
            ledger.snapshot_if_due()
            # Idle: tell upstream what we processed now; the commit report to the supervisor
            # follows within 10 ms (a message per frame would wake it for every frame).
            ledger.advance(force_acks=True)
            if not self.serve():
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
        c = self.counters
        return {
            "frames_in": c.frames_in,
            "frames_out": c.frames_out,
            "errors": c.errors,
            "dead_letters": c.dead_letters,
            "latency": c.latency.summary(),
            "bridge_loop": {"turns": c.serve_turns, "frames": c.serve_steps},
            # cumulative since this process started; the supervisor sums it over restarts
            "latency_histogram": c.latency.histogram(),
            "edges_in": {
                p.spec.index: {
                    "received": p.received,
                    "duplicates": p.duplicates,
                    "dropped": p.dropped,
                    "decoded_by_bridge": p.decoded_by_bridge,
                    # (of those, copied out of shared memory at the borrow limit)
                    "copied_by_bridge": getattr(p.sub, "copied", 0),
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
                    "lost": p.lost,
                    "in_flight": p.in_flight,
                    "retained": p.retained_count,
                    # (small frames that viewed a chunk this worker received: kept as copies)
                    "retained_copies": p.retained_copies,
                }
                for p in self.outputs
            },
        }

    def close(self) -> None:
        """Release every iceoryx2 object of the worker (a closed one holds no file, whatever
        still references it: the node's allocator, a cycle)."""
        self._stage = None  # (it points into the status block, unmapped below)
        self.emitter.close()
        for p in self.outputs:
            p.close()
        for p in self.inputs:
            p.close()
        self.outputs = []
        self._out1 = None
        self.inputs = []
        self.by_edge_in, self.by_edge_out = {}, {}
        self.ledger.release()
        self.inbox.close()
        self.iox.close()
        if self._loop is not None:
            self._loop.close()
        if self.board is not None:
            self.board.close()
