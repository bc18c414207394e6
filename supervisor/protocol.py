"""Control protocol between the supervisor and its workers.

Each worker is connected to the supervisor by one ``socketpair`` (a file descriptor a spawned
worker inherits and a forked one gets through its template, see :mod:`supervisor.launch`; the
supervisor itself never forks). Messages are length-prefixed pickles of the small dataclasses
below; frames never travel here, they go through iceoryx2. EOF on the socket means the peer
died, which is how both sides notice a crash without polling.

::

    supervisor                                   worker
    ----------                                   ------
    Setup(spec, restore) + memfd     ------->    unpickle, initialize(), open ports
                                     <-------    Hello(pid)  (before unpickling)
                                     <-------    Ready | InitFailed(traceback)
    Replay(edge, after)              ------->    resend retained frames > after
    Drain / Abort                    ------->    stop generating / stop now
    Handover                         ------->    take no more input, commit everything,
                                                 cleanup(), exit EXIT_HANDOVER (a restart or
                                                 a reload replaces it from that commit)
                                     <-------    Commit(seqs, snapshot) (nodes with snapshots,
                                                 and every node's final commit), Gap(edge, want)
    reads the status block  ........            commit points of nodes without snapshots
    Acked(edge, seq) (relayed final) ------->    drop retained frames <= seq; the consumer
                                                 has ended: skip what is sent to it later
                                     <-------    NodeFailed(seq, traceback), Heartbeat(stats)
                                     <-------    Done(stats)  then exit 0

Exit codes of a worker (reserved, as gunicorn's WORKER_BOOT_ERROR / APP_LOAD_ERROR)::

    0   end of stream processed, cleanup() done
    3   EXIT_LOAD_ERROR: the node could not be unpickled or initialize() raised (not retried)
    4   EXIT_SETUP_ERROR: the worker could not open its ports / talk to the supervisor
    5   EXIT_ABORTED: stopped on request (Abort) after cleanup()
    6   EXIT_HANDOVER: stopped at a commit point on request (Handover) after cleanup()

The reserved codes mean this only while a worker loads (before READY); afterwards a node's own
``os._exit(3)`` is a crash like any other, restarted under the policy.
"""

from __future__ import annotations

import errno
import pickle
import socket
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "EXIT_OK",
    "EXIT_LOAD_ERROR",
    "EXIT_SETUP_ERROR",
    "EXIT_ABORTED",
    "EXIT_HANDOVER",
    "Handover",
    "EdgeSpec",
    "RETENTION_BYTES",
    "RETENTION_CAP",
    "with_retention_allowance",
    "WorkerSpec",
    "replica_name",
    "replica_node",
    "Setup",
    "Hello",
    "Ready",
    "InitFailed",
    "NodeFailed",
    "Commit",
    "Gap",
    "Acked",
    "DeadLetter",
    "Heartbeat",
    "Done",
    "Replay",
    "Start",
    "Drain",
    "RestoreState",
    "Abort",
    "ControlChannel",
    "ChannelClosed",
]

EXIT_OK = 0
EXIT_LOAD_ERROR = 3
EXIT_SETUP_ERROR = 4
EXIT_ABORTED = 5
EXIT_HANDOVER = 6


# --------------------------------------------------------------------------- specs


def replica_name(node: str, i: int) -> str:
    """The worker name of replica ``i`` of node ``node`` (``"model[0]"``)."""
    return f"{node}[{i}]"


def replica_node(worker: str) -> str:
    """The node a replica's worker runs (``"model[0]"`` -> ``"model"``)."""
    return worker.rsplit("[", 1)[0]


@dataclass(frozen=True)
class EdgeSpec:
    """One edge of the pipeline graph, as both of its ends see it."""

    index: int
    src: str  # node name, or "__input__"
    dst: str  # node name, or "__output__"
    data_service: str
    ack_service: str
    src_inbox: str  # event service that wakes the producer (acks)
    dst_inbox: str  # event service that wakes the consumer (frames)
    depth: int  # frames in flight (consumer queue size == producer window)
    max_borrowed: int  # frames the consumer may hold zero-copy
    policy: str = "block"  # block | drop_oldest | latest
    max_bytes: int = 256 * 1024 * 1024  # bytes in flight before the producer waits
    src_bell: int = -1  # doorbell slot of src_inbox (see supervisor.doorbells; -1: none)
    dst_bell: int = -1  # doorbell slot of dst_inbox
    # An edge into or out of one replica of a node with ``replicas`` > 1 (see
    # supervisor.replicas): which replica (of how many) its replicated end is; -1: none.
    replica: int = -1
    replicas: int = 1
    # Of max_borrowed, the frames the consumer may borrow for what its worker keeps for
    # replay, not for its node (see with_retention_allowance).
    retain: int = 0

    @property
    def lossless(self) -> bool:
        return self.policy == "block"

    @property
    def from_replica(self) -> bool:
        """Its producer is a replica (node names cannot contain "[": only a replica's worker
        name ends so)."""
        return self.replica >= 0 and self.src.endswith(f"[{self.replica}]")

    @property
    def to_replica(self) -> bool:
        """Its consumer is a replica."""
        return self.replica >= 0 and self.dst.endswith(f"[{self.replica}]")

    def channel_options(self) -> Dict[str, Any]:
        """Settings both ends pass to the bridge (they must match)."""
        # Two of each: a restarted process attaches before its dead predecessor is cleaned up.
        return dict(
            max_subscribers=2,
            max_publishers=2,
            buffer_size=self.depth,
            max_borrowed=self.max_borrowed,
            safe_overflow=not self.lossless,
        )


#: At most this many frames of an edge's borrow allowance are for the runtime's own retention
#: (see :func:`with_retention_allowance`): each is a chunk of the producer's segment, which is
#: sparse (only chunks in use take memory), but its size grows with the count.
RETENTION_CAP = 64
#: ... and at most this many bytes of them: a chunk once used keeps its memory while the run
#: lasts, and shared memory is often scarcer than private memory (a container's /dev/shm), so
#: past it kept frames are copied into private memory, as before there was an allowance.
RETENTION_BYTES = 128 << 20


def with_retention_allowance(edges: List[EdgeSpec]) -> List[EdgeSpec]:
    """The edges, each consumer allowed to borrow, besides the frames its node may hold
    (``max_borrowed``), as many as its worker may keep for replay: the windows along the
    longest path downstream of it (at most :data:`RETENTION_CAP`).

    A node that returns its input (or a view of it) sends it on, and its worker keeps that
    input for replay until the frame is committed downstream, which is after every window on
    the way to the sink has passed it. Those frames would otherwise count against the node's
    own borrow limit, and in a stream that keeps the windows full every frame past it would be
    copied out of shared memory once more (a 6 MB frame: as long as the hop's own copy). Kept
    frames need the memory either way (a chunk, or a private copy): the allowance only saves
    the copy. The consumer uses at most :data:`RETENTION_BYTES` of it (``InPort``)."""
    out: Dict[str, List[EdgeSpec]] = {}
    for e in edges:
        out.setdefault(e.src, []).append(e)
    below: Dict[str, int] = {}

    def downstream(node: str, seen: Tuple[str, ...] = ()) -> int:
        if node not in below:
            # (a pipeline is a DAG; `seen` only guards this walk against a malformed one)
            below[node] = max((e.depth + downstream(e.dst, seen + (node,)) for e in out.get(node, []) if e.dst not in seen), default=0)
        return below[node]

    def allow(e: EdgeSpec) -> EdgeSpec:
        retain = min(RETENTION_CAP, downstream(e.dst))
        return replace(e, max_borrowed=e.max_borrowed + retain, retain=retain)

    return [allow(e) if e.lossless else e for e in edges]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides its node."""

    name: str
    index: int
    run_id: str
    prefix: str
    root: str  # the run's private directory: every iceoryx2 file of the run is in it
    inbox: str
    in_edges: Tuple[EdgeSpec, ...]
    out_edges: Tuple[EdgeSpec, ...]
    is_source: bool
    on_error: str = "raise"
    heartbeat_interval: float = 1.0
    ack_every: int = 0  # 0: depth // 4
    log_level: int = 20
    scoreboard_fd: int = -1  # inherited memfd of the status block (see supervisor.scoreboard)
    snapshot_interval: Optional[float] = None  # None: 1 s when the node defines snapshot()
    dead_letter_dir: Optional[str] = None
    spin_us: int = 50  # adaptive spin before blocking (0: always block)
    bell: int = -1  # doorbell slot of inbox (see supervisor.doorbells; -1: none)
    handover_timeout: float = 10.0  # see Handover (the Supervisor passes its option's value)
    doorbell_fd: int = -1  # inherited memfd of the run's doorbells

    @property
    def records_order(self) -> bool:
        """A node with several inputs records the order it consumes them in, so that after a
        restart it consumes the replayed frames in the same order and re-emits exactly what it
        emitted (see :mod:`supervisor.scoreboard`). Not behind a lossy edge: nothing is replayed
        there, and exactly-once is not promised."""
        return (
            len(self.in_edges) > 1
            and all(e.lossless for e in self.in_edges)
            # (the outputs of replicas are merged in the order their k says: nothing to record)
            and not self.merges
        )

    @property
    def dispatch_groups(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """The nodes with replicas this worker feeds, by name: ``(node, its replica edges'
        indexes in replica order)`` (each frame toward such a node goes to one of the edges,
        see :mod:`supervisor.worker.replicas`)."""
        groups: Dict[str, List[EdgeSpec]] = {}
        for e in self.out_edges:
            if e.to_replica:
                groups.setdefault(replica_node(e.dst), []).append(e)
        return [(n, tuple(e.index for e in sorted(g, key=lambda e: e.replica))) for n, g in sorted(groups.items())]

    @property
    def rings(self) -> int:
        """Order rings of its status block (see :mod:`supervisor.scoreboard`): the input
        order (ring 0) when it :attr:`records_order`, then the dispatch choices toward each of
        its :attr:`dispatch_groups` (:meth:`dispatch_ring`)."""
        return int(self.records_order) + len(self.dispatch_groups)

    def dispatch_ring(self, group: int) -> int:
        """The order ring of the dispatch choices toward ``dispatch_groups[group]``."""
        return int(self.records_order) + group

    @property
    def replica(self) -> int:
        """Which replica of its node this worker is (-1: the node has no replicas)."""
        if len(self.in_edges) == 1 and self.in_edges[0].to_replica:
            return self.in_edges[0].replica
        return -1

    @property
    def merges(self) -> bool:
        """Its inputs are the outputs of a node's replicas (see supervisor.worker.replicas)."""
        return any(e.from_replica for e in self.in_edges)

    @property
    def keeps_position(self) -> bool:
        """Its commits hold a position: a source's items produced, a merge's next input."""
        return self.is_source or self.merges


@dataclass
class RestoreState:
    """Where a restarted worker resumes (its last commit)."""

    in_seqs: Dict[int, int] = field(default_factory=dict)  # edge -> last committed seq
    out_next: Dict[int, int] = field(default_factory=dict)  # edge -> next seq to assign
    snapshot: Optional[bytes] = None
    source_position: int = 0  # items of generate() already committed
    skip: Dict[int, List[int]] = field(default_factory=dict)  # edge -> poison seqs to dead-letter
    # out edge -> frames its consumer has already committed: regenerated frames below that
    # count are neither sent nor kept (the consumer may even have finished and exited)
    out_committed: Dict[int, int] = field(default_factory=dict)
    # out edge -> its consumer has already ended its stream (took our end of stream)
    out_finished: Dict[int, bool] = field(default_factory=dict)
    # (nodes with several inputs) the input edge of each frame consumed after the commit,
    # in the order consumed: a restarted worker consumes the replayed frames in this order
    order: List[int] = field(default_factory=list)
    # (workers feeding nodes with replicas) node -> the replica each frame sent toward it
    # after the commit went to, in order: a restarted worker sends them to the same ones
    dispatch: Dict[str, List[int]] = field(default_factory=dict)

    def consumed(self, in_edges: Tuple[EdgeSpec, ...]) -> int:
        """Input frames consumed up to the commit point, all input edges together (each
        lossless edge numbers its frames from 0, and a node consumes them in seq order)."""
        return sum(self.in_seqs.get(e.index, -1) + 1 for e in in_edges)

    def dispatched(self, edges: Tuple[int, ...]) -> int:
        """Frames sent toward a node with replicas up to the commit point (``edges``: its
        replica edges; each numbers its frames from 0)."""
        return sum(self.out_next.get(e, 0) for e in edges)


# --------------------------------------------------------------------------- messages


@dataclass
class Setup:
    """The node itself arrives through an inherited memfd (``--blob-fd``), so a 100 MB model
    never blocks this socket."""

    spec: WorkerSpec
    restore: Optional[RestoreState] = None


@dataclass
class Hello:
    pid: int


@dataclass
class Ready:
    pid: int
    init_seconds: float


@dataclass
class InitFailed:
    stage: str  # "unpickle" | "initialize" | "setup"
    exc_type: str
    message: str
    traceback: str


@dataclass
class NodeFailed:
    seq: Optional[int]
    origin: Optional[int]
    exc_type: str
    message: str
    traceback: str
    exc_blob: Optional[bytes] = None  # the pickled exception, when it pickles
    fatal: bool = True  # False: the frame was skipped (on_error="skip")


@dataclass
class Commit:
    """A commit point sent by message: when it carries a snapshot (which must arrive with its
    positions) or is final. Other commit points are written to the worker's status block
    (:meth:`supervisor.scoreboard.Scoreboard.write_commit`)."""

    in_seqs: Dict[int, int]
    out_next: Dict[int, int]
    source_position: Optional[int] = None
    snapshot: Optional[bytes] = None
    #: The worker is about to exit: the supervisor relays these acks to the producers,
    #: because iceoryx2 discards samples of a publisher that is gone, and the last acks of
    #: an exiting worker could otherwise vanish with it.
    final: bool = False


@dataclass
class Acked:
    """Relayed final ack of a consumer that exited (counts of processed / committed frames):
    the producer forgets what it kept for it and skips what it would send it later
    (``OutPort.consumer_ended``)."""

    edge: int
    processed: int
    committed: int


@dataclass
class DeadLetter:
    """The worker skipped a poison frame instead of processing it."""

    edge: int
    seq: int
    path: Optional[str] = None  # where the frame was written, if a dead-letter dir is set


@dataclass
class Gap:
    edge: int
    expected: int


@dataclass
class Heartbeat:
    stats: Dict[str, Any]


@dataclass
class Done:
    stats: Dict[str, Any]


@dataclass
class Replay:
    edge: int
    after: int


@dataclass
class Start:
    """Sources: every worker is READY, start generating."""


@dataclass
class Drain:
    """Sources: stop generating and end the stream. Others ignore it."""


@dataclass
class Abort:
    """Stop now: cleanup() and exit EXIT_ABORTED, without draining."""


@dataclass
class Handover:
    """Stop at a commit point for a replacement: take no more input, wait until every output
    is committed downstream (so that the commit covers every frame processed, with a snapshot
    when the node has one), report that commit, cleanup() and exit EXIT_HANDOVER. The
    replacement starts right after it: nothing is replayed to it, nothing repeated."""


# --------------------------------------------------------------------------- channel


class ChannelClosed(Exception):
    """The peer closed its end (it exited or crashed)."""


_LEN = struct.Struct("!I")


class ControlChannel:
    """Length-prefixed pickled messages over a stream socket.

    ``send`` blocks until the message is written; ``receive`` never blocks and returns every
    complete message that has arrived.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self._buf = bytearray()
        self.closed = False

    @classmethod
    def from_fd(cls, fd: int) -> "ControlChannel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: Any) -> None:
        data = pickle.dumps(msg, protocol=5)
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            # Not `closed`: the peer may have exited after writing messages we have yet to
            # read (its last Commit, Done); receive() still returns them.
            raise ChannelClosed(str(e)) from e

    def receive(self) -> List[Any]:
        """Every complete message available now; raises ChannelClosed on EOF once the
        buffered messages have been returned."""
        eof = False
        while True:
            try:
                chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except (ConnectionResetError, OSError) as e:
                if getattr(e, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                eof = True
                break
            if not chunk:
                eof = True
                break
            self._buf += chunk
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if len(self._buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self._buf[4 : 4 + n])))
            del self._buf[: 4 + n]
        if eof:
            self.closed = True
            if not out:
                raise ChannelClosed("peer closed the control channel")
        return out

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A connected pair; the child's end is inheritable (for ``pass_fds``)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child.set_inheritable(True)
    return parent, child
