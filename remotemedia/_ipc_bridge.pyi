"""Type stubs of the Rust extension ``remotemedia._ipc_bridge`` (rust/ipc_bridge).

Mechanism only: iceoryx2 frame publish/subscribe, event wake-ups and dead-node cleanup.
Errors raised are the classes of :mod:`remotemedia.errors` (``ServiceError``, ``PortError``,
``LoanError``, ``SendError``, ``ReceiveError``, ``WaitError``, ``TransportError``).
"""

from typing import List, Optional, Sequence, Tuple

from typing_extensions import Buffer

__iceoryx2_version__: str
BUFFER_ALIGN: int
KIND_DATA: int

def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in ns (same clock as ``time.monotonic_ns()``)."""

def buffer_address(obj: Buffer) -> int:
    """Address of the first byte of a contiguous buffer (e.g. a memoryview of a loaned
    chunk)."""

def list_nodes(prefix: str, root: Optional[str] = None) -> List[Tuple[str, Optional[int], str]]:
    """``(state, pid, name)`` of every iceoryx2 node of ``prefix``; state is ``"alive"``,
    ``"dead"``, ``"inaccessible"`` or ``"undefined"``."""

def remove_stale_resources(prefix: str, root: Optional[str] = None) -> Tuple[int, int]:
    """Remove the resources of every dead node of ``prefix``; returns ``(cleaned, failed)``."""

class Node:
    """The iceoryx2 node of this process; every file it creates starts with ``prefix``."""

    prefix: str
    name: str
    def __init__(self, prefix: str, name: str = "", root: Optional[str] = None) -> None: ...
    def cleanup_dead_nodes(self) -> Tuple[int, int]:
        """Remove the stale resources of dead nodes of this prefix: ``(cleaned, failed)``."""

class Publisher:
    """Producer end of a frame service. ``send`` never blocks; it returns 0 when the frame was
    not delivered (no subscriber, or its queue is full)."""

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
    def loan(self, nbytes: int, meta_reserve: int = 4032) -> Loan:
        """A chunk whose single buffer of ``nbytes`` is written in place (zero-copy send)."""
    def update_connections(self) -> None: ...
    def close(self) -> None: ...

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
    def has_samples(self) -> bool: ...
    def close(self) -> None: ...

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

class Notifier:
    service: str
    def __init__(self, node: Node, service: str, *, max_notifiers: int = 64) -> None: ...
    def notify(self) -> int: ...

class Listener:
    service: str
    spin_budget_ns: int
    def __init__(self, node: Node, service: str, *, max_notifiers: int = 64) -> None: ...
    def fileno(self) -> int: ...
    def drain(self) -> int: ...
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
