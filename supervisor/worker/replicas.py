"""Replicas: a node with ``replicas`` N > 1 runs as N workers ``X[0]`` … ``X[N-1]``, each
with its own exactly-once edges (see :mod:`supervisor.channels`) from the node's one upstream
node ``U`` and to each downstream node ``D`` (``Supervisor._build`` makes them; ``Pipeline``
refuses the graphs this does not fit).

::

    U --(k, frame: to the least-loaded X[i])--> X[i] --(k, kind, output)--> D (outputs in k order)

*Dispatch* (:class:`Dispatch`, in U's emitter or the gateway): U numbers the frames it sends
toward X, k = 0, 1, … (k is the number of frames U has sent to the group: the sum of the
replica edges' ``next_seq``), and sends each to the *least-loaded* replica: the one with the
fewest frames in flight (sent and not yet processed, as the replicas' acks say; each replica
acks every frame), the lowest index among equals. So a replica that is slow on some frames,
or slow altogether, gets fewer of them, and every replica stays busy as long as U has frames.
k travels with the frame (:func:`tag`: in front of its meta; the replica strips it). The
choice is not a function of k, so U records it in its status block (an order ring, see
:mod:`supervisor.scoreboard`) before the frame leaves: a restarted U, which re-emits what it
emitted after its commit under the same sequence numbers, sends every frame again to the
replica it went to before (the supervisor hands the choices after the commit to it,
``RestoreState.dispatch``), and stays less than the ring's capacity ahead of its reported
commit. The gateway (U is the caller) never restarts: nothing to record.

*Numbering* (each replica's emitter): every output of the replica for its input k goes as
the tuple ``(k, kind, value)``: ``MORE`` (an output of k, more may follow), ``LAST`` (k's
only or last output), ``END`` (no value: k had no more outputs), ``FLUSH`` (k = -1: an output
of ``flush()``, after the replica's last input). A replica takes its inputs in seq order, and
U sent them in k order, so each replica's outputs come in increasing k.

*Merge* (:class:`Merge`, D's input step; :class:`Reorder` at the gateway): D takes the
frames of its N input edges as they come and consumes them in the order of k: the frame whose
k is the next one until it has taken the frame that ends k (``LAST`` or ``END``), then
k + 1. Each edge's frames come in increasing k, so the next k is the first frame not yet
consumed of whichever replica got it; while it is on none of the edges, D waits for more.
When every edge shows ``FLUSH`` or ended, every input was consumed: the ``flush()`` outputs
follow, replica by replica. The order of consumption is a function of the frames' contents,
and D's commits hold the next k (as a source's hold its position), so a restarted D goes on
from its commit's k, consumes the replayed frames in the same order and re-emits exactly what
it emitted before. A replica's crash is an ordinary restart: its edges replay the same frames
with the same k's, and D waits for them in order.

In-order output bounds what least-loaded can gain: while the replica with frame k is busy
with it, the others run ahead only as far as their edges to D hold (D's ``queue_depth``).
"""

from __future__ import annotations

import os
import struct
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, List, Optional, Sequence, Tuple

from remotemedia.frames import decode

from ..channels import KIND_EOS, InPort, OutPort
from ..protocol import DeadLetter, replica_node
from .deadletter import dead_letter

if TYPE_CHECKING:
    from .runner import Runner

#: What a replica's output frame ``(k, kind, value)`` is (see the module docstring).
MORE, LAST, END, FLUSH = 0, 1, 2, 3

#: A frame toward a replica: this tag and k (little-endian int64) in front of the frame's own
#: meta (not a pickle's 0x80, nor an array's or a container's tag: the bridge leaves such
#: frames to Python, which strips it).
_TAG = struct.Struct("<4sq")
TAG_BYTES = b"RMK1"
TAG_LEN = _TAG.size

#: Set (to anything) in a run's environment, U deals frames round-robin (frame k to replica
#: k mod N) instead of least-loaded: only for bench/replicas.py, which compares the two.
ROUND_ROBIN_ENV = "REMOTEMEDIA_BENCH_ROUND_ROBIN"


def tag(k: int, meta: Any) -> bytes:
    """The meta of a frame toward a replica: k, then the frame's own meta."""
    return _TAG.pack(TAG_BYTES, k) + bytes(meta)


def tagged_k(sample: Any) -> int:
    """k of a received frame toward a replica (see :func:`tag`)."""
    m0, m1 = sample.meta
    if m1 - m0 < TAG_LEN:
        raise RuntimeError(f"frame {sample.seq} toward a replica came without its dispatch number")
    t, k = _TAG.unpack_from(memoryview(sample)[m0 : m0 + TAG_LEN])
    if t != TAG_BYTES:
        raise RuntimeError(f"frame {sample.seq} toward a replica came without its dispatch number")
    return k


def untag(sample: Any, copy: bool) -> Tuple[int, Any]:
    """``(k, value)`` of a received frame toward a replica (``copy``: as :func:`decode`)."""
    return tagged_k(sample), decode(sample, copy, skip=TAG_LEN)


class Dispatch:
    """U's side of one node with replicas: which replica each frame goes to (see the module
    docstring). ``ports``: the edges to its replicas, in replica order.

    A worker's U sets ``record`` (stores a choice in its status block: ``record(k, i)``),
    ``replay`` (the choices its predecessor made after the commit, from k = ``replay_from``)
    and ``limit`` (the first k the status block's ring has no room for; the ledger moves it
    with each reported commit)."""

    def __init__(self, node: str, ports: Sequence[OutPort]) -> None:
        self.node = node
        self.ports = list(ports)
        self.edges = tuple(p.spec.index for p in self.ports)
        self.k = sum(p.next_seq for p in self.ports)  # the number of the next frame
        self.record: Optional[Callable[[int, int], None]] = None
        self.replay: List[int] = []
        self.replay_from = self.k
        self.limit = sys.maxsize
        self.round_robin = bool(os.environ.get(ROUND_ROBIN_ENV))

    def forced(self) -> int:
        """The replica frame k must go to (its predecessor's choice), or -1: any."""
        i = self.k - self.replay_from
        return self.replay[i] if 0 <= i < len(self.replay) else -1

    def choose(self) -> int:
        """The replica frame k goes to, among those with room; -1 when none has room."""
        i = self.forced()
        if i >= 0:
            return i if self.ports[i].can_send() else -1
        if self.round_robin:
            i = self.k % len(self.ports)
            return i if self.ports[i].can_send() else -1
        best, load = -1, 0
        for i, p in enumerate(self.ports):
            if p.can_send():
                n = p.in_flight
                if best < 0 or n < load:
                    best, load = i, n
        return best

    def waits_on(self) -> List[OutPort]:
        """The edges one of which must have room before frame k can go."""
        i = self.forced()
        if i < 0 and self.round_robin:
            i = self.k % len(self.ports)
        return [self.ports[i]] if i >= 0 else self.ports

    def sent(self, i: int) -> Tuple[OutPort, int]:
        """Frame k goes to replica ``i`` (recorded before it leaves): its edge and k."""
        k = self.k
        if self.record is not None and k >= self.replay_from + len(self.replay):
            self.record(k, i)  # (the replayed choices are in the ring already)
        self.k = k + 1
        return self.ports[i], k


Groups = Tuple[List[OutPort], List[Dispatch]]


def dispatch_groups(outputs: Sequence[OutPort]) -> Optional[Groups]:
    """The output edges of a worker, as (edges to nodes without replicas, the dispatch toward
    each node with replicas, by node name: the order of ``WorkerSpec.dispatch_groups``); None
    when none goes to a replica."""
    plain: List[OutPort] = []
    groups: dict = {}
    for p in outputs:
        e = p.spec
        if e.to_replica:
            groups.setdefault(replica_node(e.dst), []).append(p)
        else:
            plain.append(p)
    if not groups:
        return None
    return plain, [Dispatch(n, sorted(g, key=lambda p: p.spec.replica)) for n, g in sorted(groups.items())]


def merge_groups(inputs: Sequence[InPort]) -> List[List[int]]:
    """The positions in ``inputs`` of the edges from each node with replicas, in replica
    order."""
    groups: dict = {}
    for j, p in enumerate(inputs):
        e = p.spec
        if e.from_replica:
            groups.setdefault(replica_node(e.src), []).append(j)
    return [sorted(g, key=lambda j: inputs[j].spec.replica) for g in groups.values()]


class Reorder:
    """The merge at the caller's end (the gateway), which takes every frame as it comes (its
    outputs are committed when received, and it never restarts): the outputs of N replicas,
    released in the order of their inputs (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self.queues: List[Deque[Tuple[int, int, Any]]] = [deque() for _ in range(n)]
        self.ended = [False] * n
        self.next_k = 0
        self.draining = False

    def put(self, i: int, k: int, kind: int, item: Any) -> None:
        self.queues[i].append((k, kind, item))

    def end(self, i: int) -> None:
        self.ended[i] = True

    def release(self) -> List[Any]:
        """The items whose turn has come, in order."""
        out: List[Any] = []
        queues = self.queues
        while not self.draining:
            k = self.next_k
            waiting = False  # a replica without a queued frame may still send k
            for i, q in enumerate(queues):
                if not q:
                    waiting = waiting or not self.ended[i]
                elif q[0][0] == k and q[0][1] != FLUSH:
                    break
            else:
                if waiting:
                    return out
                late = [(i, q[0][0]) for i, q in enumerate(queues) if q and q[0][1] != FLUSH]
                if late:
                    raise RuntimeError(f"replica {late[0][0]} sent the outputs of frame {late[0][1]} where those of frame {k} were due")
                self.draining = True  # (every replica has ended or sent its flush() outputs)
                break
            _, kind, item = q.popleft()
            if kind != END:
                out.append(item)
            if kind != MORE:
                self.next_k = k + 1
        for i, q in enumerate(queues):  # draining: flush() outputs, replica by replica
            while q:
                k, kind, item = q.popleft()
                if kind != FLUSH:
                    raise RuntimeError(f"replica {i} sent the outputs of frame {k} after every frame's")
                out.append(item)
            if not self.ended[i]:
                break
        return out


# (k, kind, value, seq, origin, stream_id, created_ns, sent_ns, dead-lettered)
Held = Tuple[int, int, Any, int, int, int, int, int, bool]


class Merge:
    """The input step of a node fed by replicas: their outputs in the order of their inputs
    (see the module docstring).

    It takes every frame that has arrived on every edge (each edge's queue here holds at most
    its window: a frame counts as processed for flow control only once consumed). Reading
    only up to one frame per edge would deadlock: a restarted replica sends its regenerated
    outputs again, the duplicates are dropped (and acked) only as later frames are read, and
    while they fill its window it processes nothing, maybe not the frame the merge waits for.

    Where it is (the next k, or -1 once every input was consumed) is the position of the
    node's commits (the ledger's ``source_position``, which only sources use otherwise): a
    restarted node goes on from the k of its commit."""

    def __init__(self, runner: "Runner", position: int) -> None:
        self.runner = runner
        self.ledger = runner.ledger
        self.ports: List[InPort] = sorted(runner.inputs, key=lambda p: p.spec.replica)
        self.n = len(self.ports)
        self.held: List[Deque[Held]] = [deque() for _ in range(self.n)]
        self.draining = position < 0  # every input consumed: flush() outputs, replica by replica
        self.next_k = max(0, position)
        self.ledger.source_position = position

    def watch(self) -> List[Any]:
        """The subscribers whose frame would let the merge go on (for Runner.wait): the edges
        with nothing held (one of them brings the next k when no held frame is it)."""
        if not self.draining:
            return [p.sub for p, q in zip(self.ports, self.held) if not q and not p.eos]
        return next(([p.sub] for p in self.ports if not p.eos), [])

    def holds(self) -> bool:
        """Frames taken off the edges are waiting for their turn."""
        return any(self.held)

    def _fill(self, i: int) -> None:
        """Take what edge ``i`` has."""
        port = self.ports[i]
        q = self.held[i]
        r = self.runner
        while not port.eos:
            got = port.receive() if r.skip else port.take()
            if got is None:
                return
            if type(got) is tuple:  # decoded by the bridge
                data, seq, origin, stream_id, created_ns, sent_ns = got
                skipped = False
            elif got.kind == KIND_EOS:
                return
            else:
                seq, origin, stream_id, created_ns, sent_ns, _ = got.info
                data = decode(got, port.sub.borrowed >= port.borrow_limit)
                skipped = bool(r.skip) and seq in r.skip.get(port.spec.index, ())
                if skipped:
                    r.counters.dead_letters += 1
                    path = dead_letter(r.spec.name, r.spec.dead_letter_dir, port, got)
                    r.chan.send(DeadLetter(port.spec.index, seq, path))
                del got
            k, kind, value = data
            q.append((k, kind, value, seq, origin, stream_id, created_ns, sent_ns, skipped))

    def step(self) -> bool:
        """Consume the next frame in order if it is there; False when it is not."""
        held, ports, n = self.held, self.ports, self.n
        if not self.draining:
            k = self.next_k
            waiting = False  # an edge with nothing held may still bring k
            for i in range(n):
                q = held[i]
                if not q:
                    self._fill(i)
                if q:
                    h = q[0]
                    if h[0] == k and h[1] != FLUSH:
                        if h[1] != MORE:
                            self.next_k = self.ledger.source_position = k + 1
                        self._consume(i)
                        return True
                elif not ports[i].eos:
                    waiting = True
            # (the frames behind the held ones: duplicates of a restarted replica are dropped
            # and acked only as they are read)
            for i in range(n):
                if held[i]:
                    self._fill(i)
            if waiting:
                return False
            # Every edge ended or shows its flush() outputs (its upstream sent nothing from k on).
            for i, q in enumerate(held):
                if q and q[0][1] != FLUSH:
                    raise RuntimeError(
                        f"node {self.runner.spec.name}: replica {ports[i].src} sent the outputs of frame {q[0][0]} where "
                        f"those of frame {k} were due"
                    )
            self._drain()
        for i in range(n):
            q = held[i]
            if not q:
                self._fill(i)
            if q:
                if q[0][1] != FLUSH:
                    raise RuntimeError(
                        f"node {self.runner.spec.name}: replica {ports[i].src} sent the outputs of frame {q[0][0]} "
                        "after every frame's"
                    )
                self._consume(i)
                return True
            if not ports[i].eos:
                return False
        return False

    def _drain(self) -> None:
        self.draining = True
        self.ledger.source_position = -1

    def _consume(self, i: int) -> None:
        k, kind, value, seq, origin, stream_id, created_ns, sent_ns, skipped = self.held[i].popleft()
        port = self.ports[i]
        r = self.runner
        if kind == END or skipped:
            r.processed[port.spec.index] = seq
            r._mark()
            r._advance()
        else:
            r.run_node(port, value, seq, origin, stream_id, created_ns, sent_ns)
