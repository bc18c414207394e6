"""Replicas: a node with ``replicas`` N > 1 runs as N workers ``X[0]`` … ``X[N-1]``, each
with its own exactly-once edges (see :mod:`supervisor.channels`) from the node's one upstream
node ``U`` and to each downstream node ``D`` (``Supervisor._build`` makes them; ``Pipeline``
refuses the graphs this does not fit).

::

    U --(frame k: to X[k mod N])--> X[i] --(k, kind, output)--> D (outputs in k order)

*Dispatch* (``U``'s emitter): U's frames toward X are dealt round-robin, frame k to replica
``k mod N``. The choice is a function of k, and k is the number of frames U has sent to the
group (the sum of the replica edges' ``next_seq``), so a restarted U, which re-emits what it
emitted after its commit under the same sequence numbers, deals every frame again to the
replica it went to before: nothing to record. (Least-loaded dealing would send the next frame
to whichever replica is free, but its choices would have to be recorded for a restart, and
the outputs wait for the slowest replica anyway to leave in order: with replicas of one node
round-robin keeps them all busy.)

*Numbering* (each replica's emitter): replica i's input frame with sequence number ``s`` on
its edge from U is frame ``k = s * N + i`` of U's. Every output of the replica goes as the
tuple ``(k, kind, value)``: ``MORE`` (an output of k, more may follow), ``LAST`` (k's only or
last output), ``END`` (no value: k had no more outputs), ``FLUSH`` (k = -1: an output of
``flush()``, after the replica's last input).

*Merge* (:class:`Merge`, D's input step): D consumes its N input edges in the order of k:
from edge ``k mod N`` until it has taken the frame that ends k (``LAST`` or ``END``), then
k + 1. When the edge of k shows ``FLUSH`` or ends, every input was consumed: the ``flush()``
outputs follow, replica by replica. The order of consumption is a function of the frames'
contents, and D's commits hold the next k (as a source's hold its position), so a restarted D
goes on from its commit's k, consumes the replayed frames in the same order and re-emits
exactly what it emitted before. A replica's
crash is an ordinary restart: its edges replay the same frames with the same k's, and D waits
for them in order.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, List, Optional, Sequence, Tuple

from remotemedia.frames import decode

from ..channels import KIND_EOS, InPort, OutPort
from ..protocol import DeadLetter
from .deadletter import dead_letter

if TYPE_CHECKING:
    from .runner import Runner

#: What a replica's output frame ``(k, kind, value)`` is (see the module docstring).
MORE, LAST, END, FLUSH = 0, 1, 2, 3

Groups = Tuple[List[OutPort], List[List[OutPort]]]


def dispatch_groups(outputs: Sequence[OutPort]) -> Optional[Groups]:
    """The output edges of a worker, as (edges to nodes without replicas, the edges to each
    node with replicas in replica order); None when none goes to a replica."""
    plain: List[OutPort] = []
    groups: dict = {}
    for p in outputs:
        e = p.spec
        if e.to_replica:
            groups.setdefault(e.dst.rsplit("[", 1)[0], []).append(p)
        else:
            plain.append(p)
    if not groups:
        return None
    return plain, [sorted(g, key=lambda p: p.spec.replica) for g in groups.values()]


def pick(groups: Groups) -> List[OutPort]:
    """The edges the next frame goes on: every plain one, and the replica whose turn it is
    (frame k to replica k mod N, k being the frames sent to the group so far) of each group."""
    plain, reps = groups
    return plain + [g[sum(p.next_seq for p in g) % len(g)] for g in reps]


def merge_groups(inputs: Sequence[InPort]) -> List[List[int]]:
    """The positions in ``inputs`` of the edges from each node with replicas, in replica
    order."""
    groups: dict = {}
    for j, p in enumerate(inputs):
        e = p.spec
        if e.from_replica:
            groups.setdefault(e.src.rsplit("[", 1)[0], []).append(j)
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
        queues, n = self.queues, len(self.queues)
        while not self.draining:
            i = self.next_k % n
            q = queues[i]
            if not q:
                if not self.ended[i]:
                    return out
                self.draining = True
                break
            k, kind, item = q[0]
            if kind == FLUSH:
                self.draining = True
                break
            if k != self.next_k:
                raise RuntimeError(f"replica {i} sent the outputs of frame {k} where those of frame {self.next_k} were due")
            q.popleft()
            if kind != END:
                out.append(item)
            if kind != MORE:
                self.next_k += 1
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
Head = Tuple[int, int, Any, int, int, int, int, int, bool]


class Merge:
    """The input step of a node fed by replicas: their outputs in the order of their inputs
    (see the module docstring). Holds at most one frame per edge (its *head*) until its turn.

    Where it is (the next k, or -1 once every input was consumed) is the position of the
    node's commits (the ledger's ``source_position``, which only sources use otherwise): a
    restarted node goes on from the k of its commit."""

    def __init__(self, runner: "Runner", position: int) -> None:
        self.runner = runner
        self.ledger = runner.ledger
        self.ports: List[InPort] = sorted(runner.inputs, key=lambda p: p.spec.replica)
        self.n = len(self.ports)
        self.heads: List[Optional[Head]] = [None] * self.n
        self.draining = position < 0  # every input consumed: flush() outputs, replica by replica
        self.next_k = max(0, position)
        self.ledger.source_position = position

    def watch(self) -> List[Any]:
        """The subscriber whose frame would let the merge go on (for Runner.wait): frames on
        the others wait for their turn."""
        if not self.draining:
            p = self.ports[self.next_k % self.n]
            return [] if p.eos else [p.sub]
        return next(([p.sub] for p in self.ports if not p.eos), [])

    def _fill(self, i: int) -> None:
        port = self.ports[i]
        if self.heads[i] is not None or port.eos:
            return
        r = self.runner
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
            data = decode(got, True)  # (held until its turn: not a borrowed chunk)
            skipped = bool(r.skip) and seq in r.skip.get(port.spec.index, ())
            if skipped:
                r.counters.dead_letters += 1
                path = dead_letter(r.spec.name, r.spec.dead_letter_dir, port, got)
                r.chan.send(DeadLetter(port.spec.index, seq, path))
            del got
        k, kind, value = data
        self.heads[i] = (k, kind, value, seq, origin, stream_id, created_ns, sent_ns, skipped)

    def step(self) -> bool:
        """Consume the next frame in order if it is there; False when it is not."""
        heads, ports, n = self.heads, self.ports, self.n
        if not self.draining:
            k = self.next_k
            i = k % n
            self._fill(i)
            h = heads[i]
            if h is None:
                if not ports[i].eos:
                    return False
                self._drain()  # (its upstream sent nothing from k on)
            elif h[1] == FLUSH:
                self._drain()
            elif h[0] != k:
                raise RuntimeError(
                    f"node {self.runner.spec.name}: replica {ports[i].src} sent the outputs of frame {h[0]} where "
                    f"those of frame {k} were due"
                )
            else:
                if h[1] != MORE:
                    self.next_k = self.ledger.source_position = k + 1
                self._consume(i, h)
                return True
        for i in range(n):
            self._fill(i)
            h = heads[i]
            if h is not None:
                if h[1] != FLUSH:
                    raise RuntimeError(
                        f"node {self.runner.spec.name}: replica {ports[i].src} sent the outputs of frame {h[0]} "
                        "after every frame's"
                    )
                self._consume(i, h)
                return True
            if not ports[i].eos:
                return False
        return False

    def _drain(self) -> None:
        self.draining = True
        self.ledger.source_position = -1

    def _consume(self, i: int, h: Head) -> None:
        self.heads[i] = None
        k, kind, value, seq, origin, stream_id, created_ns, sent_ns, skipped = h
        port = self.ports[i]
        r = self.runner
        if kind == END or skipped:
            r.processed[port.spec.index] = seq
            r._mark()
            r._advance()
        else:
            r.run_node(port, value, seq, origin, stream_id, created_ns, sent_ns)
