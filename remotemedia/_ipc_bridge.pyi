"""Type stubs of the Rust extension ``remotemedia._ipc_bridge`` (rust/ipc_bridge).

Mechanism only: iceoryx2 frame publish/subscribe, event wake-ups and dead-node cleanup.
Errors raised are the classes of :mod:`remotemedia.errors` (``ServiceError``, ``PortError``,
``LoanError``, ``SendError``, ``ReceiveError``, ``WaitError``, ``TransportError``,
``SharedMemoryFullError``).
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from typing_extensions import Buffer

__iceoryx2_version__: str
BUFFER_ALIGN: int
KIND_DATA: int
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
        frombuffer: Callable[..., Any],
        dtype: Any,
        count: int,
        shape: Optional[Tuple[int, ...]] = None,
    ) -> None:
        """Let ``take`` decode frames with this meta and payload length by itself, as
        ``frombuffer(sample, dtype, count=count, offset=...)`` reshaped to ``shape`` (one entry,
        replaced by the next call)."""
    def learn_pickle(self, loads: Callable[[bytes], Any], max_meta: int) -> None:
        """Let ``take`` unpickle data frames without out-of-band buffers whose meta is a pickle
        stream of at most ``max_meta`` bytes, as ``loads(bytes(meta))``."""
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
        """``(sleeping, pending)`` of ``slot`` (tests, tools)."""

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
    ) -> None:
        """With ``doorbells``: notifiers ringing the same ``slot`` wake this listener with a
        syscall only while it sleeps; the slot must be this listener's alone."""
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
    ) -> Tuple[bool, List[int]]:
        """Block (GIL released) until notified, one of ``fds`` is readable, or ``timeout``
        seconds passed; with ``spin_us``, first spin (adaptive budget, sched_yield between
        checks) watching the ``watch`` subscribers' queues. Returns ``(notified, ready_fds)``."""
