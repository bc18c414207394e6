"""Type stubs of the Rust extension ``remotemedia._ipc_bridge`` (rust/ipc_bridge).

Mechanism: iceoryx2 frame publish/subscribe, event wake-ups and dead-node cleanup; and the data
plane: the edge protocol's books (OutPortCore, InPortCore) and a stage's frame loop
(StageLoop), whose policy (restarts, commits, errors) stays in ``supervisor``.
Errors raised are the classes of :mod:`remotemedia.errors` (``ServiceError``, ``PortError``,
``LoanError``, ``SendError``, ``ReceiveError``, ``WaitError``, ``TransportError``,
``SharedMemoryFullError``).
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from typing_extensions import Buffer

__iceoryx2_version__: str
BUFFER_ALIGN: int
KIND_DATA: int
KIND_EOS: int
KIND_ACK: int
KIND_PROBE: int
SHM_RESERVE: int
"""Bytes a publisher leaves free in the shared-memory filesystem: it raises
``SharedMemoryFullError`` rather than reserve a chunk's memory (before writing into it) when
less would remain."""

def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns (same clock as ``time.monotonic_ns()``)."""

def buffer_address(obj: Buffer) -> int:
    """Address of the first byte of a contiguous buffer (e.g. a memoryview of a loaned
    chunk)."""

def die_with_parent(expected_ppid: int, signal: int) -> bool:
    """When this process's parent dies (even by SIGKILL), SIGKILL the process group this
    process leads (its children and theirs) and this process, from a native handler of
    ``signal`` that runs even while Python is stuck holding the GIL. ``signal`` must be one
    nothing else in the process handles (a real-time signal). Returns False when the parent
    is no longer ``expected_ppid`` (it died before this call): the caller should exit.
    Raises OSError when the signal cannot be handled."""

def list_nodes(prefix: str, root: str) -> List[Tuple[str, Optional[int], str]]:
    """``(state, pid, name)`` of every iceoryx2 node of ``prefix`` under ``root``; state is
    ``"alive"``, ``"dead"``, ``"inaccessible"`` or ``"undefined"``."""

def remove_stale_resources(prefix: str, root: str) -> Tuple[int, int]:
    """Remove the resources of every dead node of ``prefix`` under ``root``; returns
    ``(cleaned, failed)``."""

class Node:
    """The iceoryx2 node of this process. Every file it and its ports create lives under
    ``root`` (an existing directory, the run's private one: see ``supervisor.resources``) and
    starts with ``prefix``; nothing goes to /dev/shm or /tmp/iceoryx2 directly.

    Every bridge object has ``close()``: it releases the object's iceoryx2 port (or node),
    and what it kept alive, at once, so that a closed object holds no file and no mapping of
    the run however long Python keeps it. The node's files go once it and every port made
    from it are closed (or gone), and no Sample of it is left."""

    prefix: str
    name: str
    root: str
    closed: bool
    def __init__(self, prefix: str, name: str, root: str) -> None: ...
    def cleanup_dead_nodes(self) -> Tuple[int, int]:
        """Remove the stale resources of dead nodes of this prefix: ``(cleaned, failed)``."""
    def close(self) -> None:
        """Release the node; creating a port on it raises TransportError afterwards."""

class Publisher:
    """Producer end of a frame service. ``send`` never blocks; it returns 0 when the frame was
    not delivered (no subscriber, or its queue is full). Every write into a chunk (``send``,
    ``send_array``, ``loan``) first reserves the chunk's memory: ``SharedMemoryFullError`` when
    the shared-memory filesystem has no room, instead of a SIGBUS."""

    service: str
    def __init__(
        self,
        node: Node,
        service: str,
        *,
        max_subscribers: int = 2,
        buffer_size: int = 16,
        max_borrowed: int = 8,
        history: int = 0,
        safe_overflow: bool = False,
        max_publishers: int = 1,
        max_nodes: int = 16,
        initial_max_slice_len: int = 4096,
        max_loaned: int = 2,
    ) -> None: ...
    def send(
        self,
        seq: int,
        kind: int,
        meta: Buffer,
        buffers: Sequence[Buffer] = ...,
        *,
        origin: int = 0,
        stream_id: int = 0,
        created_ns: int = 0,
        flags: int = 0,
    ) -> int:
        """Copy ``meta`` and ``buffers`` (contiguous) into one chunk and publish it. Returns
        the number of subscribers reached."""
    def learn_array(self, array_type: type, dtype: Any, shape: Tuple[int, ...], meta: bytes, nbytes: int) -> None:
        """Let ``send_array`` encode arrays of exactly ``array_type``, this dtype object and this
        shape by itself, as ``meta`` plus one buffer of ``nbytes`` (one entry, replaced by the
        next call). Python decides what qualifies."""
    def send_array(
        self,
        seq: int,
        array: Any,
        origin: int = 0,
        stream_id: int = 0,
        created_ns: int = 0,
        notifier: Optional[Notifier] = None,
    ) -> int:
        """Encode (with the learned meta), copy, publish and notify in one call. Returns the
        subscribers reached (0: discarded), or -1 with nothing sent when ``array`` is not
        like the learned one."""
    def loan(self, nbytes: int, meta_reserve: int = 4032) -> Loan:
        """A chunk whose single buffer of ``nbytes`` is written in place (zero-copy send)."""
    def update_connections(self) -> None: ...
    def close(self) -> None:
        """Release the port, its service and the node (TransportError afterwards)."""

class Loan:
    """Writable buffer over a loaned chunk; ``send`` publishes it without a copy."""

    nbytes: int
    pending: bool
    address: int
    def __buffer__(self, flags: int) -> memoryview: ...
    def send(
        self,
        seq: int,
        kind: int,
        meta: Buffer,
        *,
        origin: int = 0,
        stream_id: int = 0,
        created_ns: int = 0,
        flags: int = 0,
    ) -> int: ...
    def discard(self) -> None: ...

class Subscriber:
    """Consumer end of a frame service."""

    service: str
    max_borrowed: int
    borrowed: int
    copied: int  # frames take() decoded into a private copy at the borrow limit
    def __init__(
        self,
        node: Node,
        service: str,
        *,
        max_subscribers: int = 2,
        buffer_size: int = 16,
        max_borrowed: int = 8,
        history: int = 0,
        safe_overflow: bool = False,
        max_publishers: int = 1,
        max_nodes: int = 16,
    ) -> None: ...
    def receive(self) -> Optional[Sample]:
        """Next frame or None; never blocks. ReceiveError when ``max_borrowed`` frames are
        still referenced."""
    def learn_array(
        self,
        meta: bytes,
        payload_len: int,
        dtype: Any,
        count: int,
        shape: Optional[Tuple[int, ...]] = None,
    ) -> None:
        """Let ``take`` decode frames with this meta and payload length by itself: a read-only
        array of ``count`` items of ``dtype`` on the frame's buffer, as ``numpy.frombuffer``
        makes it, of shape ``shape`` (one entry, replaced by the next call). ValueError when
        ``shape`` does not hold ``count`` items or they do not fit the payload, or the dtype
        holds Python objects."""
    def learn_pickle(self, loads: Callable[[bytes], Any], max_meta: int) -> None:
        """Let ``take`` unpickle data frames without out-of-band buffers whose meta is a pickle
        stream of at most ``max_meta`` bytes, as ``loads(bytes(meta))``."""
    def learn_containers(self) -> None:
        """Let ``take`` decode container frames (``remotemedia.frames.CT_TAG``: flat dicts,
        tuples and lists holding arrays) itself, their arrays read-only views."""
    def take(
        self, expected: int, borrow_limit: int
    ) -> Union[None, Sample, Tuple[Any, int, int, int, int, int]]:
        """Next frame: ``(value, seq, origin, stream_id, created_ns, sent_ns)`` when it is data
        frame ``expected`` and either an array like the learned one (a view while fewer than
        ``borrow_limit`` frames are held) or a small pickle (see ``learn_pickle``; what
        ``loads`` raises is raised, the frame consumed); otherwise the Sample; None when the
        queue is empty."""
    def has_samples(self) -> bool: ...
    def close(self) -> None:
        """Release the port, its service and the node; Samples received stay valid."""

class Sample:
    """A received frame: read-only buffer over its shared-memory payload, released when the
    Sample and every view of it are gone."""

    seq: int
    origin: int
    stream_id: int
    created_ns: int
    sent_ns: int
    kind: int
    flags: int
    meta: Tuple[int, int]
    buffers: List[Tuple[int, int]]
    address: int
    info: Tuple[int, int, int, int, int, int]  # seq, origin, stream_id, created_ns, sent_ns, kind
    def __buffer__(self, flags: int) -> memoryview: ...
    def __len__(self) -> int: ...

class Doorbells:
    """The doorbells of a run (see ``supervisor.doorbells``): a shared mapping of a memfd,
    one 64-byte slot ``(sleeping, pending)`` per inbox. The descriptor may be closed once
    mapped."""

    slots: int
    def __init__(self, fd: int) -> None:
        """OSError when ``fd`` cannot be mapped, ValueError when it holds less than a slot."""
    def state(self, slot: int) -> Tuple[int, int]:
        """``(sleeping, pending)`` of ``slot`` (tests, tools); sleeping counts listeners in
        ppoll() and on the futex alike."""
    def sleepers(self, slot: int) -> Tuple[int, int]:
        """``(in ppoll(), on the futex)`` of ``slot`` (tests)."""
    def ring_control(self, slot: int) -> None:
        """After writing on the control channel of the listener of ``slot``: wakes it if it
        naps on the futex (it then polls its descriptors)."""

class Notifier:
    service: str
    def __init__(
        self,
        node: Node,
        service: str,
        *,
        max_notifiers: int = 64,
        doorbells: Optional[Doorbells] = None,
        slot: int = 0,
    ) -> None: ...
    def notify(self) -> int:
        """Wake every listener; returns how many there are. With ``doorbells``, a listener
        that is awake is only marked pending in its slot (no syscall; counted as 1). Then yields
        the CPU when ``yield_unless_queued`` subscribers are set and none has a frame
        queued."""
    def yield_unless_queued(self, subscribers: Sequence[Subscriber]) -> None: ...
    def close(self) -> None:
        """Release the port, its service and the node (TransportError afterwards)."""

class Listener:
    service: str
    spin_budget_ns: int
    def __init__(
        self,
        node: Node,
        service: str,
        *,
        max_notifiers: int = 64,
        doorbells: Optional[Doorbells] = None,
        slot: int = 0,
        control_rings: bool = False,
    ) -> None:
        """With ``doorbells``: notifiers ringing the same ``slot`` wake this listener with a
        syscall only while it sleeps; the slot must be this listener's alone. It then sleeps
        on the doorbell's futex (a cheaper wake-up than ppoll()) whenever ``wait()`` has no
        ``fds``, or with ``control_rings``: whoever writes on those fds calls
        ``Doorbells.ring_control(slot)`` after (they are also polled every 50 ms)."""
    def fileno(self) -> int:
        """-1 once closed."""
    def drain(self) -> int: ...
    def close(self) -> None:
        """Release the port, its service and the node (not while another thread waits)."""
    def wait(
        self,
        timeout: Optional[float] = None,
        fds: Sequence[int] = ...,
        spin_us: int = 0,
        watch: Sequence[Subscriber] = ...,
        flow: bool = True,
    ) -> Tuple[bool, List[int]]:
        """Block (GIL released) until notified, one of ``fds`` is readable, or ``timeout``
        seconds passed; with ``spin_us``, first spin (adaptive budget, sched_yield between
        checks) watching the ``watch`` subscribers' queues. With ``flow`` False (a doorbell
        only) acks that only make room in a window do not end the sleep: they are found at
        the next look. Returns ``(notified, ready_fds)``."""


def encode_container(obj: Any) -> Optional[Tuple[bytes, List[Any]]]:
    """``(meta, buffers)`` of ``obj`` as a container frame (``remotemedia.frames.CT_TAG``),
    or None when it is not one (then it is pickled). For tests: stages encode them
    themselves."""

class KeptBytes:
    """A retained frame's buffer copied out of the chunk it viewed (read-only buffer
    protocol); its memory goes back to the port's pool when it is dropped."""

    def __len__(self) -> int: ...

class Retained:
    """A copy of one retained frame's books (``OutPortCore.retained``)."""

    seq: int
    kind: int
    meta: Any
    buffers: List[Any]
    origin: int
    stream_id: int
    created_ns: int
    nbytes: int
    loaned: bool

class OutPortCore:
    """The producer end of an edge: the books of ``supervisor/channels.py``'s protocol
    (``rust/ipc_bridge/src/ports``). ``supervisor.channels.OutPort`` subclasses it; its
    transport ports are this module's (called directly) or any objects with their methods."""

    lossless: bool
    depth: int
    max_bytes: int
    consumer_finished: bool
    next_seq: int
    processed: int
    committed: int
    retained_bytes: int
    loaned_retained: int
    undelivered: Optional[int]
    eos_sent: bool
    in_flight: int
    retained: List[Retained]
    retained_count: int
    next_retry: Optional[float]
    fully_acked: bool
    notify_pending: bool
    sent: int
    zero_copy: int
    copied_on_reuse: int
    #: retained frames kept as copies (small frames that viewed a received chunk)
    retained_copies: int
    encoded_by_bridge: int
    resent: int
    discarded: int
    lost: int
    pub: Any
    ack_sub: Any
    notifier: Any
    def __new__(
        cls,
        publisher: Any,
        ack_subscriber: Any,
        notifier: Any,
        *,
        name: str,
        lossless: bool,
        depth: int,
        max_bytes: int,
        next_seq: int = 0,
        committed: int = 0,
        consumer_finished: bool = False,
        clock: Optional[Callable[[], float]] = None,
    ) -> "OutPortCore": ...
    def can_send(self) -> bool: ...
    def send(
        self,
        kind: int,
        meta: Buffer,
        buffers: Sequence[Buffer],
        origin: int = 0,
        stream_id: int = 0,
        created_ns: int = 0,
        notify: bool = True,
    ) -> int: ...
    def flush_notify(self) -> None: ...
    def send_array(self, value: Any, origin: int, stream_id: int, created_ns: int) -> bool: ...
    def teach_array(self, array_type: type, dtype: Any, shape: Tuple[int, ...], meta: bytes, nbytes: int) -> None: ...
    def send_loan(
        self, loan: Any, meta: Buffer, buffer: Buffer, origin: int = 0, stream_id: int = 0, created_ns: int = 0
    ) -> int: ...
    def loan(self, nbytes: int) -> Any: ...
    def poll_acks(self) -> bool: ...
    def apply_ack(self, processed: int, committed: int) -> bool: ...
    def consumer_ended(self, processed: int, committed: int) -> None:
        """The consumer ended its stream and exited with these counts (its final commit,
        relayed): apply them, forget what is kept for it; later frames are skipped."""
    def replay(self, after: int) -> None: ...
    def resend_due(self, force: bool = False) -> bool: ...
    def close(self) -> None: ...

class InPortCore:
    """The consumer end of an edge (see ``OutPortCore``); ``supervisor.channels.InPort``
    subclasses it."""

    index: int
    src: str
    lossless: bool
    expected: int
    eos: bool
    eos_seq: Optional[int]
    acked_processed: int
    acked_committed: int
    notified_processed: int
    window: int
    notify_every: int
    frame_len: int  # payload bytes of the last data frame taken (-1: none yet)
    gap_since: Optional[float]
    received: int
    duplicates: int
    dup_pending: bool
    dropped: int
    decoded_by_bridge: int
    borrow_limit: int  # frames held before the next one taken is copied (see retain)
    sub: Any
    ack_pub: Any
    ack_notifier: Any
    def __new__(
        cls,
        subscriber: Any,
        ack_publisher: Any,
        ack_notifier: Any,
        *,
        index: int,
        src: str,
        lossless: bool,
        depth: int,
        max_bytes: int,
        expected: int = 0,
        retain: int = 0,  # of the subscriber's max_borrowed, frames for the worker's replay log
        retain_bytes: int = 0,  # ... of which at most this many bytes
        clock: Optional[Callable[[], float]] = None,
    ) -> "InPortCore": ...
    def receive(self) -> Any: ...
    def take(self) -> Any: ...
    def ack(self, processed: int, committed: int, force: bool = False) -> None: ...
    def probe(self) -> None: ...
    def gap_to_report(self, now: float, min_age: float = 0.05, interval: float = 0.2) -> Optional[int]: ...
    def should_copy(self) -> bool: ...
    def close(self) -> None: ...

class FrameSlot:
    """The frame a stage's ``process()`` has in hand (``Node.current_frame`` calls it through
    ``Node._remotemedia_frame_of``)."""

    def __call__(self) -> Optional[Tuple[int, int, int, int, int, str]]:
        """``(seq, origin, stream_id, created_ns, sent_ns, source node)``; None outside
        ``process()``."""

class FrameCounts:
    """Frames in and out of a worker, bumped by ``StageLoop`` per frame without Python's
    attribute protocol; the base of ``supervisor.worker.counters.Counters``."""

    frames_in: int
    frames_out: int
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

class StageLoop:
    """A stage worker's frame loop (``rust/ipc_bridge/src/ports/stage.rs``): take, process,
    send, status block, without Python per frame; built by ``supervisor.worker.runner``."""

    def __init__(
        self,
        inputs: Sequence[InPortCore],
        outputs: Sequence[OutPortCore],
        node: Any,
        emitter: Any,
        handle_frame: Callable[[Any, Any], None],
        failed: Callable[[int, int, BaseException], bool],
        halted: Callable[[], bool],
        processed: Dict[int, int],
        counters: FrameCounts,
        ndarray: type,
        dumps: Callable[..., bytes],
        protocol: int,
        bounds: List[int],
        board: Optional[Buffer] = None,
    ) -> None: ...
    def run(self, max_frames: int, max_ns: int) -> int:
        """Frames (and ends of stream) taken; 0 when none waited or an output was full."""
    def run_source(
        self, items: Any, ledger: Any, failed: Callable[[int, BaseException, bool], None], max_frames: int, max_ns: int
    ) -> Tuple[int, bool]:
        """A source's items sent: ``(items, exhausted)``."""
    def serve(
        self,
        inbox: Listener,
        fds: List[int],
        timeout: float,
        commit_in: float,
        spin_us: int,
        ack_every: int,
        max_frames: int,
        max_ns: int,
        slice_ns: int,
        lull_ns: int,
    ) -> Optional[Tuple[int, bool]]:
        """``run()`` turns, flow-control acks upstream, acks from downstream and the waits
        between them (GIL released) until ``timeout``, ``slice_ns`` after the first frame or
        ``lull_ns`` after the last, after frames once ``commit_in`` seconds passed (a commit
        report is due), or
        something the runner must handle (one of ``fds`` readable, a frame Python handled, a
        gap, duplicates, a resend, a commit from downstream, every input ended, a signal).
        ``(steps, fds_ready)``; None when a port's transport is not the bridge's iceoryx2.

        Example (what ``Runner.serve`` does)::

            steps, ctrl = stage.serve(inbox, [chan.fileno()], 1.0, 0.0, 50, 1, 16, 2_000_000, 2_000_000, 200_000)
        """
    def serve_source(
        self,
        items: Any,
        ledger: Any,
        failed: Callable[[int, BaseException, bool], None],
        inbox: Listener,
        fds: List[int],
        timeout: float,
        commit_in: float,
        spin_us: int,
        max_frames: int,
        max_ns: int,
        slice_ns: int,
        lull_ns: int,
    ) -> Optional[Tuple[int, bool, bool]]:
        """``serve()`` for a source: ``run_source()`` turns and the waits for room between
        them. ``(items, exhausted, fds_ready)``; None as for ``serve()``."""
    @property
    def frame_slot(self) -> FrameSlot: ...
    def take_latencies(self) -> Optional[Tuple[int, int, int, List[int], List[int]]]:
        """``LatencyStats.merge()``'s arguments for the frames since the last call."""
