"""A worker's status block in shared memory (the role of gunicorn's ``workertmp``).

The worker writes a few 64-bit fields with plain stores; the supervisor reads them whenever
it wants, without a message and without waking the worker. It survives the worker's death,
which is the point: after a crash the supervisor can still see which frame was being processed
(poison-frame detection) and, while the worker lives, whether it is stuck in ``process()`` or
not looping at all (hang detection).

::

    offset  field
    0       heartbeat_ns   CLOCK_MONOTONIC of the worker loop's last turn
    8       busy_since_ns  start of the current process()/generate() call, 0 when idle
    16      busy_edge      edge of the frame being processed (-1: source item / flush)
    24      busy_seq       seq (or source position) of that frame
    32      frames_in
    40      frames_out
    48      pid
    56      order_capacity entries of each order ring below (0: no ring); set by the creator
    64      commit_gen     commits written by this incarnation (0: none yet)
    72      rings          (only with order_capacity > 0) how many order rings; set by the creator
    ...     two commit buffers, the newest is number commit_gen % 2; each holds the
            committed source position (sources), then the committed seq of every input edge
            and the next seq of every output edge (the edge order of the worker's spec)
    then    per ring:
            count          frames recorded in this ring so far
            entries        order_capacity uint16: the entry of frame number i is at
                           i % order_capacity

The commit area is how a worker reports a commit point (see ``Runner.flush_commit``): a
handful of stores instead of a pickled message per commit that would wake the supervisor
100 times a second per worker. The supervisor reads it when it needs it (a worker exited, a
producer restarts), and, as for everything here, it is still there after a crash.

An order ring records, frame by frame, a choice a restarted worker must make again the same
way for exactly-once, numbered so that a commit point gives the number of the first frame
after it (see ``WorkerSpec.rings`` for which ring is which):

* *the input order* of a node with several inputs (see ``Runner.step_ordered``): frames are
  numbered by how many the node consumed, all edges together, and the commit point of frame
  counts per edge gives that number at the commit; the entry is the position (in the spec's
  input edges) of the frame's edge. The frames it consumed after the commit were consumed in
  the order ``ring[commit .. count)``, and a restarted worker consumes the replayed frames in
  that order again, so it re-emits what it emitted before under the same output seqs.
* *the dispatch choices* toward a node with replicas (see :mod:`supervisor.worker.replicas`):
  frames are numbered by how many the worker sent to that node's replicas, and the commit's
  next seqs of the replica edges add up to that number at the commit; the entry is the
  replica the frame went to. A restarted worker re-emits the frames after its commit to the
  replicas they went to before, under the same seqs.

One store per frame plus the count, each before the frame (or any output of it) can leave;
the worker never runs more than ``order_capacity`` frames ahead of its reported commit, so
the entries after the commit are never overwritten.

The block is a memfd, not a named file: the supervisor creates it (:meth:`Scoreboard.create`)
and keeps the descriptor for the whole run, every incarnation of the worker inherits it
(``pass_fds``) and maps it (:meth:`Scoreboard.from_fd`). Without a name nobody else can open,
plant or truncate it; its size is sealed, so not even the worker can shrink it under the
supervisor's mapping.
"""

from __future__ import annotations

import mmap
from array import array
import os
import time
from typing import Dict, List, Optional, Tuple

from .private import sealed_memfd

__all__ = ["Scoreboard", "FIELDS", "ORDER_CAPACITY"]

FIELDS = ("heartbeat_ns", "busy_since_ns", "busy_edge", "busy_seq", "frames_in", "frames_out", "pid")
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_HEADER = 64
_GEN = 8  # index of commit_gen
_ORDER_CAP = 7  # index of order_capacity
_RINGS = 9  # index of rings (boards with rings only)
#: Entries of each order ring of a worker: how many frames it may consume (or send to a
#: node's replicas) beyond its last reported commit (commits wait on downstream acks of a few
#: windows of frames, and are reported every 10 ms). 32 KiB per ring.
ORDER_CAPACITY = 16384


def _ring_words(capacity: int) -> int:
    """64-bit words of one order ring: the count, then the uint16 entries."""
    return 1 + (2 * capacity + 7) // 8


class Scoreboard:
    """One worker's status block. Create it with :meth:`create` (supervisor) or map an
    inherited one with :meth:`from_fd` (worker)."""

    def __init__(self, fd: int, owner: bool, order_slots: Optional[int] = None, rings: int = 0) -> None:
        #: the memfd, kept open by its creator to pass it to every incarnation (-1: not ours)
        self.fd = fd if owner else -1
        self._mm = mmap.mmap(fd, os.fstat(fd).st_size)
        self._q = memoryview(self._mm).cast("q")
        if order_slots is not None:  # a new block: its layout is recorded in it
            self._q[_ORDER_CAP] = order_slots
            if order_slots:
                self._q[_RINGS] = rings
        self.order_capacity = cap = self._q[_ORDER_CAP]
        #: order rings (see the module docstring)
        self.rings = self._q[_RINGS] if cap else 0
        self._commit0 = _RINGS + 1 if cap else _GEN + 1  # index of the first commit buffer
        # each of the two commit buffers: source position, then the seqs
        self._width = (len(self._q) - self._commit0 - self.rings * _ring_words(cap)) // 2
        self.commit_slots = self._width - 1
        self._counts: List[int] = []  # index of each ring's count
        self._ring: List[memoryview] = []
        at = self._commit0 + 2 * self._width
        for _ in range(self.rings):
            self._counts.append(at)
            start = 8 * (at + 1)
            self._ring.append(memoryview(self._mm)[start : start + 2 * cap].cast("H"))
            at += _ring_words(cap)

    @classmethod
    def create(cls, commit_slots: int, order_slots: int = 0, rings: int = 1) -> "Scoreboard":
        """A new, zeroed block for a worker whose commits hold ``commit_slots`` seqs (input
        edges + output edges), with ``rings`` order rings of ``order_slots`` entries each
        (``order_slots`` 0: none)."""
        if not order_slots or not rings:
            order_slots = rings = 0
        ring_words = 1 + rings * _ring_words(order_slots) if order_slots else 0
        fd = sealed_memfd("remotemedia-board", _HEADER + 8 + 2 * 8 * (1 + commit_slots) + 8 * ring_words)
        try:
            return cls(fd, owner=True, order_slots=order_slots, rings=rings)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int) -> "Scoreboard":
        """Map the block behind an inherited descriptor (which is closed: the mapping is all
        the worker needs)."""
        try:
            return cls(fd, owner=False)
        finally:
            os.close(fd)

    def reset(self) -> None:
        for i in range(len(self._q)):
            self._q[i] = 0
        self._q[_INDEX["busy_edge"]] = -1
        self._q[_ORDER_CAP] = self.order_capacity
        if self.order_capacity:
            self._q[_RINGS] = self.rings

    def write_commit(self, source_position: int, seqs: List[int]) -> None:
        """Publish a commit point (worker side). Two buffers, used in turn: the generation
        count moves to the new one only once it is complete, so a worker killed in the middle
        of a write leaves the previous commit intact."""
        q = self._q
        gen = q[_GEN] + 1
        base = self._commit0 + (gen & 1) * self._width
        q[base] = source_position
        q[base + 1 : base + 1 + len(seqs)] = array("q", seqs)
        q[_GEN] = gen

    def read_commit(self) -> Optional[Tuple[int, List[int]]]:
        """The last complete commit point, ``(source_position, seqs)``, or None when this
        incarnation of the worker has not written one yet."""
        q = self._q
        while True:
            gen = q[_GEN]
            if gen == 0:
                return None
            base = self._commit0 + (gen & 1) * self._width
            source, seqs = q[base], q[base + 1 : base + self._width].tolist()
            # One newer write goes to the other buffer; two would have reused this one.
            if q[_GEN] - gen < 2:
                return source, seqs

    # order rings (see the module docstring)

    def record_order(self, count: int, position: int, ring: int = 0) -> None:
        """Worker side, before the frame (or any output of it) can leave: the entry of frame
        number ``count`` of ``ring`` is ``position`` (the caller keeps ``count`` less than
        ``order_capacity`` ahead of its reported commit)."""
        self._ring[ring][count % self.order_capacity] = position
        self._q[self._counts[ring]] = count + 1

    def write_order(self, start: int, positions: List[int], ring: int = 0) -> None:
        """Supervisor side, before a restarted worker starts: the entries of frames
        ``start ..`` of ``ring`` (its predecessor's), recorded as if made already, so that
        they survive this worker dying too."""
        if len(positions) > self.order_capacity:
            raise ValueError(f"{len(positions)} recorded frames do not fit an order ring of {self.order_capacity}")
        entries, cap = self._ring[ring], self.order_capacity
        for i, pos in enumerate(positions):
            entries[(start + i) % cap] = pos
        self._q[self._counts[ring]] = start + len(positions)

    def read_order(self, start: int, ring: int = 0) -> List[int]:
        """The entries of frames ``start ..`` (a commit point) of ``ring`` as recorded, for a
        restart; empty when there is no such ring or nothing after ``start``."""
        if ring >= self.rings:
            return []
        count, cap = self._q[self._counts[ring]], self.order_capacity
        if count - start > cap:
            raise RuntimeError(
                f"order ring of the status block holds {count - start} frames after the commit at {start}, more than its "
                f"capacity {cap}: the worker ran ahead of its commits"
            )
        entries = self._ring[ring]
        return [entries[i % cap] for i in range(start, count)]

    def set(self, field: str, value: int) -> None:
        self._q[_INDEX[field]] = value

    def get(self, field: str) -> int:
        return self._q[_INDEX[field]]

    @property
    def buffer(self) -> mmap.mmap:
        """The block's memory (for the bridge's StageLoop, which writes the busy fields)."""
        return self._mm

    # worker-side shortcuts (hot path: one store each)
    def beat(self) -> None:
        self._q[0] = time.monotonic_ns()

    def busy(self, edge: int, seq: int) -> None:
        self._q[2] = edge
        self._q[3] = seq
        self._q[1] = time.monotonic_ns()

    def idle(self, frames_in: int = -1) -> None:
        """Not in process() any more; with ``frames_in``, also count the frame (one call
        instead of two on the hot path)."""
        self._q[1] = 0
        if frames_in >= 0:
            self._q[4] = frames_in

    def read(self) -> Dict[str, int]:
        return {name: self._q[i] for i, name in enumerate(FIELDS)}

    def close(self) -> None:
        try:
            for ring in self._ring:
                ring.release()
            self._q.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
