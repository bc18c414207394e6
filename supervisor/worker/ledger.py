"""The worker's commit/ack ledger: which input frames the node processed, which of those are
committed (their outputs committed downstream), and who is told what, when.

::

    run_node / SourceStepper:  processed[edge] = seq  -> mark()     (a candidate commit point:
                                                                     positions, out_next, snapshot)
    acks from downstream (OutPort.committed grows)    -> advance()  (markers whose outputs are
                                                                     all committed -> the commit)
    every ack_every frames                            -> InPort.ack(processed, reported)  (flow)
    every 10 ms, or 1 MiB of input, or final          -> flush()    (status block, or a Commit
                                                                     message with a snapshot /
                                                                     the final one; then acks
                                                                     upstream with reported)

Upstream may forget a frame only once the supervisor knows it is committed: the *committed*
half of an ack upstream is always ``reported`` (what the supervisor was told), never more.
The ledger touches no process: ports, status block and control channel are parameters (the
unit tests pass fakes).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from ..protocol import Commit

#: Seconds between commit reports while frames flow (each costs the status block's stores and
#: an ack per input).
COMMIT_INTERVAL = 0.01
#: ... unless the input frames committed since the last report hold this many bytes: until it
#: hears of the commit, upstream keeps them for replay, and a stage that passes its input
#: through keeps the chunks it received, so past its borrow limit (a few frames) every big
#: frame would be copied out of shared memory once more. Small frames wait for the interval.
COMMIT_REPORT_BYTES = 1 << 20


class Marker:
    """A point of the input stream the node can be restarted from."""

    __slots__ = ("positions", "source_position", "out_next", "snapshot")

    def __init__(self, positions: Dict[int, int], source_position: int, out_next: Dict[int, int], snapshot: Optional[bytes]) -> None:
        self.positions = positions  # edge -> last processed seq
        self.source_position = source_position
        self.out_next = out_next  # edge -> next seq after the outputs of this point
        self.snapshot = snapshot


class Ledger:
    """Commit/ack bookkeeping of one worker.

    ``inputs``/``outputs`` are the worker's ports (InPort/OutPort, or fakes with the same
    attributes), ``board`` its status block (or None), ``chan`` its control channel.
    ``snapshot`` returns the node's pickled runtime state (None: the node has none, and
    commits go through the status block)."""

    def __init__(
        self,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        *,
        chan: Any,
        board: Any,
        is_source: bool,
        keeps_position: bool = False,
        source_position: int = 0,
        snapshot: Optional[Callable[[], bytes]] = None,
        snapshot_interval: Optional[float] = 1.0,
        ack_every: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chan = chan
        self.board = board
        self.is_source = is_source
        self.keeps_position = keeps_position or is_source  # (commits hold source_position)
        self.clock = clock
        self.by_edge_in = {p.spec.index: p for p in inputs}
        self._in_ids = [p.spec.index for p in inputs]
        self._out_ids = [p.spec.index for p in outputs]
        # only lossless edges hold commits back (a lossy edge keeps nothing to replay)
        self._lossless_out = [(p.spec.index, p) for p in outputs if p.lossless]
        self._out_pairs = [(p.spec.index, p) for p in outputs]
        self._out1 = self._out_pairs[0] if len(self._out_pairs) == 1 else None
        self.processed: Dict[int, int] = {p.spec.index: p.expected - 1 for p in inputs}
        self.committed: Dict[int, int] = dict(self.processed)
        self.reported: Dict[int, int] = dict(self.committed)  # last commit the supervisor knows
        self.source_position = source_position
        self.committed_position = source_position
        self.markers: Deque[Marker] = deque()
        self.commit_dirty = False
        self.next_commit = 0.0
        self.commit_out_next: Dict[int, int] = self.out_next()
        self.commit_snapshot: Optional[bytes] = None
        self._snapshot = snapshot
        self.snapshot_interval: Optional[float] = snapshot_interval if snapshot is not None else None
        self.next_snapshot = clock() + (snapshot_interval or 0.0)
        self.ack_every = ack_every
        # A node that records its input order may consume no further than the order ring
        # holds past the reported commit (see Runner.step_ordered).
        self.order_cap = 0
        self.order_limit = sys.maxsize
        self._limits_order = False
        # A worker feeding nodes with replicas may send toward each no further than its ring
        # of dispatch choices holds past the reported commit (see .replicas.Dispatch).
        self._dispatch: List[Any] = []

    def limit_order(self, consumed: int, capacity: int) -> None:
        """Record-order mode: ``consumed`` frames so far, an order ring of ``capacity``."""
        self.order_cap = capacity
        self.order_limit = consumed + capacity
        self._limits_order = True

    def limit_dispatch(self, dispatch: Sequence[Any], capacity: int) -> None:
        """Toward nodes with replicas: ``dispatch`` (their ``replicas.Dispatch``, whose
        ``limit`` each reported commit moves) record their choices in rings of
        ``capacity``."""
        self.order_cap = capacity
        self._dispatch = list(dispatch)
        self._limit_dispatch(self.commit_out_next)

    def _limit_dispatch(self, out_next: Dict[int, int]) -> None:
        for d in self._dispatch:  # (the frames after this commit may fill the ring)
            d.limit = sum(out_next[e] for e in d.edges) + self.order_cap

    def release(self) -> None:
        """Forget the ports (the worker closes them)."""
        self.by_edge_in, self._lossless_out, self._out_pairs, self._out1 = {}, [], [], None

    # ------------------------------------------------------------------ state

    def out_next(self) -> Dict[int, int]:
        return {e: p.next_seq for e, p in self._out_pairs}

    def uncommitted_progress(self) -> bool:
        last = self.markers[-1] if self.markers else None
        if last is not None:
            return last.positions != self.processed or last.source_position != self.source_position
        return self.processed != self.committed or self.source_position != self.committed_position

    def deadline(self, deadline: float) -> float:
        """``deadline``, or earlier when a snapshot or a commit report falls due before it."""
        if self.snapshot_interval is not None and self.next_snapshot < deadline and self.uncommitted_progress():
            deadline = self.next_snapshot
        if self.commit_dirty and self.next_commit < deadline:
            deadline = self.next_commit
        return deadline

    # ------------------------------------------------------------------ commit points

    def mark(self, force_snapshot: bool = False) -> None:
        """Record the current point as a candidate commit (with a snapshot of the node's
        runtime state when it has one and one is due).

        Without a snapshot, a point behind another pending one replaces the newest instead of
        queueing (at most two are pending: the oldest, which commits as soon as its outputs
        are committed, and the newest): any point between two frames is a consistent commit
        point, so skipping some only makes commits coarser, and it saves an allocation per
        frame while downstream has not caught up."""
        snap = None
        if self.snapshot_interval is not None:
            now = self.clock()
            if not force_snapshot and now < self.next_snapshot:
                return
            self.next_snapshot = now + self.snapshot_interval
            snap = self._snapshot()  # type: ignore[misc]
        out1 = self._out1
        out_next = {out1[0]: out1[1].next_seq} if out1 is not None else {e: p.next_seq for e, p in self._out_pairs}
        markers = self.markers
        if snap is None and len(markers) > 1:
            last = markers[-1]
            if last.snapshot is None:
                last.positions = self.processed.copy()
                last.source_position = self.source_position
                last.out_next = out_next
                return
        markers.append(Marker(self.processed.copy(), self.source_position, out_next, snap))

    def snapshot_if_due(self) -> None:
        """Idle: a node with snapshots commits what it processed once its snapshot is due."""
        if self.snapshot_interval is not None and self.uncommitted_progress() and self.clock() >= self.next_snapshot:
            self.mark()

    def commit_now(self) -> None:
        """Commit what is processed as soon as downstream allows (a full order ring: a node
        that commits only with its snapshots takes one now)."""
        if self.snapshot_interval is not None and self.uncommitted_progress():
            self.mark(force_snapshot=True)
        self.advance(force_flush=True)

    def advance(self, force_flush: bool = False, force_acks: bool = False) -> None:
        """Move the commit point past every marker whose outputs are committed downstream,
        and send acks: *processed* every ``ack_every`` frames (flow control), *committed*
        batched with the commit report to the supervisor (at most every 10 ms while busy)."""
        markers = self.markers
        lossless = self._lossless_out
        while markers:
            m = markers[0]
            if lossless:
                nxt = m.out_next
                pending = False
                for e, p in lossless:
                    if p.committed < nxt[e]:
                        pending = True
                        break
                if pending:
                    break  # (its outputs are not all committed downstream yet)
            markers.popleft()
            self.committed = m.positions
            self.committed_position = m.source_position
            self.commit_out_next = m.out_next
            if m.snapshot is not None:
                self.commit_snapshot = m.snapshot
            self.commit_dirty = True
        if self.commit_dirty and (force_flush or self.clock() >= self.next_commit or self.unreported_bytes() >= COMMIT_REPORT_BYTES):
            self.flush()
            return
        processed, reported, ack_every = self.processed, self.reported, self.ack_every
        for i, p in self.by_edge_in.items():
            n = processed[i] + 1
            # (a quarter of the window, or less when big frames make the window small)
            if force_flush or force_acks or n - p.acked_processed >= ack_every or n - p.acked_processed >= p.notify_every:
                p.ack(n, reported[i] + 1)

    def unreported_bytes(self) -> int:
        """Bytes of the input frames committed but not yet reported (from each input's last
        frame size; 0 while unknown)."""
        committed, reported = self.committed, self.reported
        return sum((committed[i] - reported[i]) * max(0, p.frame_len) for i, p in self.by_edge_in.items())

    def tick(self, acks_arrived: bool, now: float) -> None:
        """Housekeeping: commits after acks from downstream, the commit report when due, and
        the answer to duplicates upstream sent again."""
        if acks_arrived and self.markers:
            self.advance()
        elif self.commit_dirty and now >= self.next_commit:
            self.flush()
        for i, p in self.by_edge_in.items():
            if p.dup_pending:
                p.ack(self.processed[i] + 1, self.reported[i] + 1)

    def final(self, ends: Dict[int, int]) -> None:
        """The final commit, once every output (its end of stream included) is committed
        downstream and no marker is pending: everything processed, and the end of stream of
        each input that ended (``ends``: edge -> the seq of its end). Only this commit covers
        those ends: see Runner.finish."""
        self.processed.update(ends)
        self.committed = dict(self.processed)
        self.committed_position = self.source_position
        self.commit_out_next = self.out_next()
        self.flush(final=True)

    def flush(self, final: bool = False) -> None:
        """Report the commit to the supervisor (if it moved, or ``final``), then ack upstream."""
        if self.commit_dirty or final:
            self.commit_dirty = False
            snap, self.commit_snapshot = self.commit_snapshot, None
            # The supervisor must know the commit before upstream may forget the frames: in
            # the status block (a few stores, no wake-up) unless a snapshot goes with it, and
            # by message when it must act on it (the final commit, relayed upstream).
            board = self.board
            via_board = board is not None and self.snapshot_interval is None
            if final or not via_board:
                self.chan.send(
                    Commit(
                        in_seqs=dict(self.committed),
                        out_next=dict(self.commit_out_next),
                        source_position=self.committed_position if self.keeps_position else None,
                        snapshot=snap,
                        final=final,
                    )
                )
            # (the final commit's message goes first: a status block that showed the inputs'
            # ends without it would restart a worker killed in between, to wait for them)
            if via_board:
                committed, out_next = self.committed, self.commit_out_next
                board.write_commit(
                    self.committed_position,
                    [committed[i] for i in self._in_ids] + [out_next[i] for i in self._out_ids],
                )
            self.reported = self.committed
            if self.order_cap:
                # the frames after this commit may fill the order rings (Scoreboard.read_order)
                if self._limits_order:
                    self.order_limit = sum(self.committed.values()) + len(self.committed) + self.order_cap
                if self._dispatch:
                    self._limit_dispatch(self.commit_out_next)
            self.next_commit = self.clock() + COMMIT_INTERVAL
        for i, p in self.by_edge_in.items():
            p.ack(self.processed[i] + 1, self.reported[i] + 1)


__all__: List[str] = ["Ledger", "Marker"]
