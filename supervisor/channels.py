"""Edge ends: how frames cross one edge without loss, duplication or deadlock.

Every edge ``A -> B`` is two iceoryx2 services (frames, and acks going back) plus the two
processes' inbox events. Each frame carries a sequence number that is contiguous per edge.

::

        A (OutPort)                                      B (InPort)
        -----------                                      ----------
        seq = next_seq++                                 accept only seq == expected
        retained[seq] = frame        -- data service -->   seq <  expected: duplicate, drop
        publish; notify B's inbox                          seq >  expected: gap, drop (+ Gap)
                                                          process ...
        in flight = next_seq - processed  <-- ack ---    ack(processed, committed); notify A
        drop retained < committed

An ack carries two counts: *processed* (frames the consumer has taken off its queue and
handled) drives flow control; *committed* (frames whose every derived output is itself
committed downstream, and which the supervisor knows about) lets the producer forget them.

*Flow control.* A lossless edge (policy ``block``) lets at most ``depth`` frames (and about
``max_bytes`` of them) be in flight, i.e. sent but not processed; the consumer's queue holds
``depth`` frames, so a send normally never overflows it. The publisher never blocks inside iceoryx2
(``DiscardData``): if a send is discarded anyway (a replay racing live frames, a consumer that
is gone) it returns 0, the frame stays retained, and the producer sends it again later, in
order. Nothing waits on a dead peer while holding the GIL.

*Replay.* Retained frames are the replay log. When a consumer restarts, the supervisor tells
the producer ``Replay(after=<consumer's last commit>)`` and every retained frame after it is
sent again; the consumer drops what it already has. Acks are *commits*: a consumer
acknowledges an input only when every output derived from it has itself been committed
downstream, so a crash anywhere never loses a frame that some upstream has already dropped.

*Probes.* A gap shows a lost frame only when a later one arrives. So that a lost *tail* is
found too, a consumer whose queue on an edge is empty tells its producer, about once a second,
which frame it waits for (:meth:`InPort.probe`, ``Kind.PROBE``). A producer that had published
that frame before it read an earlier probe for the same frame knows it was lost, and resends
from it (:meth:`OutPort._probed`).

*Hot path.* Most frames of a media stream are bare arrays of one dtype and shape. After an
edge has carried one such frame through Python (``encode``/``decode``), each end teaches its
bridge port the encoding (``learn_array``), and the following frames like it cross in one
bridge call per end: :meth:`OutPort.send_array` (encode, copy, publish, notify) and
:meth:`InPort.take` (receive, check the seq, decode to a read-only view). Anything else (a new
shape, a pickled object, a duplicate, a gap, end of stream) takes the Python path above; the books (sequence numbers, retention, acks) are the same.

*Lossy edges* (``drop_oldest`` / ``latest``) keep nothing and never wait: the iceoryx2
queue overwrites its oldest frame, and the consumer counts the holes as drops. Their acks
only tell the producer that the end of the stream was taken.

*Where it runs.* The books above are Rust (``rust/ipc_bridge/src/ports``: ``books.rs`` is the
protocol as plain state machines under ``cargo test``, ``outport.rs``/``inport.rs`` drive the
transport by what they decide); :class:`OutPort` and :class:`InPort` subclass them and make
their transport ports. A stage worker hands whole batches of frames to the bridge's
``StageLoop`` (take, decode, ``process()``, encode, send, one wake-up per batch), so that in the
steady state no Python runs per frame besides the node's own ``process()``; restarts,
snapshots, commits and errors stay in Python (``supervisor.worker``).

*Transport.* The ports do the books; a :class:`Transport` makes the bridge ports they publish,
receive and notify with. The default is iceoryx2 (``remotemedia._ipc_bridge``); the unit tests
(``tests/test_ports.py``) pass an in-memory fake and a fake clock, so the sequence, gap,
duplicate, replay, window and policy logic is tested in milliseconds, without processes.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, Callable, Optional, Tuple

import numpy as np

from remotemedia import _ipc_bridge as bridge
from remotemedia.frames import ND_TAG, Frame, Kind, ndarray_meta

from .protocol import RETENTION_BYTES, EdgeSpec

__all__ = ["OutPort", "InPort", "Transport", "ack_channel_options"]

# Frame kinds as plain ints, derived from the one definition (remotemedia.frames.Kind; the
# bridge's KIND_DATA is checked against it by tests/test_ports.py): an enum member lookup
# costs five times an int compare, and these are read for every frame.
KIND_DATA, KIND_EOS, KIND_ACK, KIND_PROBE = int(Kind.DATA), int(Kind.EOS), int(Kind.ACK), int(Kind.PROBE)
#: Largest pickled frame (meta bytes) the bridge unpickles in InPort.take().
PICKLE_MAX = 16 * 1024
#: Chunks a producer may hold loaned at once: allocate() buffers plus the one a copying send
#: needs.
MAX_LOANED = 8


def ack_channel_options() -> dict:
    # Acks are cumulative, so only the newest matters: a one-slot overwriting queue.
    return dict(max_subscribers=2, max_publishers=2, buffer_size=1, max_borrowed=1, safe_overflow=True)


class Transport:
    """Makes the bridge ports of edge ends: iceoryx2 ports of one ``remotemedia._ipc_bridge``
    Node.

    A port is made once per edge end; every frame then goes straight to the port's own methods
    (no call through the transport). A stand-in (``tests/test_ports.py``) implements what the
    ports use:

    - publisher: ``send(seq, kind, meta, buffers, *, origin, stream_id, created_ns) -> int``
      (subscribers reached, 0: discarded), ``send_array(seq, array, origin, stream_id,
      created_ns, notifier) -> int`` (-1: cannot, the caller falls back to ``send``),
      ``learn_array(...)``, ``loan(nbytes)`` (an object with ``send(...)`` and ``discard()``),
      ``update_connections()``, ``close()``;
    - subscriber: ``receive()`` (a Sample or None), ``take(expected, borrow_limit)`` (a
      decoded tuple, a Sample or None), ``learn_array(...)``, ``learn_pickle(loads,
      max_meta)``, ``has_samples()``, ``borrowed``, ``max_borrowed``, ``close()``; a Sample
      has ``seq kind origin stream_id created_ns sent_ns meta buffers``, ``len()`` and the
      buffer protocol;
    - notifier: ``notify()`` (TransportError: nobody listens), ``close()``.

    With the run's doorbells (``supervisor.doorbells``) notifiers and listeners ring their
    inbox's slot: a wake-up costs a syscall only when the listener sleeps.
    """

    def __init__(self, node: Any, doorbells: Any = None) -> None:
        self.node = node
        self.doorbells = doorbells  # the run's bridge.Doorbells, or None

    def publisher(self, service: str, **options: Any) -> Any:
        return bridge.Publisher(self.node, service, **options)

    def subscriber(self, service: str, **options: Any) -> Any:
        return bridge.Subscriber(self.node, service, **options)

    def notifier(self, inbox: str, bell: int = -1) -> Any:
        """Wakes ``inbox``; through its doorbell slot ``bell`` when there is one."""
        if self.doorbells is not None and bell >= 0:
            return bridge.Notifier(self.node, inbox, doorbells=self.doorbells, slot=bell)
        return bridge.Notifier(self.node, inbox)

    def listener(self, inbox: str, bell: int = -1, control_rings: bool = False) -> Any:
        """The one listener of ``inbox`` (and of its doorbell slot ``bell``). ``control_rings``:
        whoever writes on the descriptors given to its ``wait()`` rings the slot's control
        word after (the supervisor does for a worker's control channel), so it may sleep on
        the doorbell's futex instead of in ppoll()."""
        if self.doorbells is not None and bell >= 0:
            return bridge.Listener(self.node, inbox, doorbells=self.doorbells, slot=bell, control_rings=control_rings)
        return bridge.Listener(self.node, inbox)


class OutPort(bridge.OutPortCore):
    """Producer end of an edge: the books are the bridge's (``OutPortCore``,
    rust/ipc_bridge/src/ports/outport.rs); this class makes its transport ports.

    Its ports come from ``transport`` (default: iceoryx2 ports of the bridge Node ``node``);
    ``clock`` times resends.

    Attributes and methods (see the module docstring for the protocol): ``can_send()``,
    ``send(kind, meta, buffers, origin, stream_id, created_ns, notify=True) -> seq``,
    ``send_array(value, origin, stream_id, created_ns) -> bool`` (the hot path),
    ``send_loan(...)``, ``loan(nbytes)``, ``flush_notify()``, ``poll_acks()``,
    ``apply_ack(processed, committed)``, ``consumer_ended(processed, committed)``, ``replay(after)``, ``resend_due(force=False)``,
    ``close()``; the books ``next_seq processed committed retained undelivered in_flight
    next_retry fully_acked`` and counters ``sent zero_copy copied_on_reuse encoded_by_bridge
    resent discarded lost``."""

    spec: EdgeSpec

    def __new__(
        cls,
        node: Any,
        spec: EdgeSpec,
        next_seq: int = 0,
        committed: int = 0,
        consumer_finished: bool = False,
        *,
        transport: Optional[Transport] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> "OutPort":
        t = Transport(node) if transport is None else transport
        pub = t.publisher(spec.data_service, max_loaned=MAX_LOANED, **spec.channel_options())
        ack_sub = notifier = None
        try:
            # Lossy edges get acks too: a producer must not exit before its end-of-stream frame
            # was taken, because iceoryx2 drops the samples of a publisher that is gone.
            ack_sub = t.subscriber(spec.ack_service, **ack_channel_options())
            notifier = t.notifier(spec.dst_inbox, spec.dst_bell)
            self = super().__new__(
                cls, pub, ack_sub, notifier, name=f"{spec.src} -> {spec.dst}", lossless=spec.lossless,
                depth=spec.depth, max_bytes=spec.max_bytes, next_seq=next_seq, committed=committed,
                consumer_finished=consumer_finished, clock=None if clock is time.monotonic else clock,
            )  # fmt: skip
        except BaseException:
            _close_all(pub, ack_sub, notifier)
            raise
        self.spec = spec
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # (everything happens in __new__: the bridge class is built there)

    def learn_array(self, value: Any, meta: bytes, buffer: Any) -> None:
        """Let :meth:`send_array` take arrays like ``value`` (a bare array that
        :func:`remotemedia.frames.encode` turned into ``meta`` and ``buffer``)."""
        if type(value) is not np.ndarray or meta[:4] != ND_TAG:
            return
        self.teach_array(np.ndarray, value.dtype, value.shape, meta, memoryview(buffer).nbytes)


class InPort(bridge.InPortCore):
    """Consumer end of an edge: the books are the bridge's (``InPortCore``,
    rust/ipc_bridge/src/ports/inport.rs); this class makes its transport ports and teaches
    the subscriber the encodings it decodes by itself.

    Its ports come from ``transport`` (default: iceoryx2 ports of the bridge Node ``node``);
    ``clock`` times gaps.

    Methods: ``take()`` (the hot path), ``receive()``, ``ack(processed, committed,
    force=False)``, ``probe()``, ``gap_to_report(now)``, ``should_copy()``, ``close()``;
    the books ``expected eos eos_seq acked_processed acked_committed window notify_every
    gap_since dup_pending`` and counters ``received duplicates dropped decoded_by_bridge``."""

    spec: EdgeSpec

    def __new__(
        cls,
        node: Any,
        spec: EdgeSpec,
        expected: int = 0,
        *,
        transport: Optional[Transport] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> "InPort":
        t = Transport(node) if transport is None else transport
        sub = t.subscriber(spec.data_service, **spec.channel_options())
        ack_pub = ack_notifier = None
        try:
            ack_pub = t.publisher(spec.ack_service, **ack_channel_options())
            ack_notifier = t.notifier(spec.src_inbox, spec.src_bell)
            self = super().__new__(
                cls, sub, ack_pub, ack_notifier, index=spec.index, src=spec.src, lossless=spec.lossless,
                depth=spec.depth, max_bytes=spec.max_bytes, expected=expected,
                retain=spec.retain, retain_bytes=RETENTION_BYTES,
                clock=None if clock is time.monotonic else clock,
            )  # fmt: skip
        except BaseException:
            _close_all(sub, ack_pub, ack_notifier)
            raise
        self.spec = spec
        self._learned: Optional[Tuple[bytes, int]] = None
        # Small pickled objects (numbers, short strings, small dicts) are unpickled by the
        # bridge in take(): no Sample, no Python decoding. Never one so big that the window
        # estimate (InPortCore's) would have had to shrink for it.
        sub.learn_pickle(pickle.loads, min(PICKLE_MAX, spec.max_bytes // max(1, spec.depth)))
        sub.learn_containers()  # (media frames: arrays next to a little metadata)
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # (everything happens in __new__: the bridge class is built there)

    def learn(self, sample: Any, data: Any) -> None:
        """Teach :meth:`take` to decode frames like ``sample`` (decoded in Python to the bare
        array ``data``) by itself."""
        meta = ndarray_meta(sample)
        if meta is None or type(data) is not np.ndarray or not data.size:
            return
        key = (meta, len(sample))
        if key == self._learned:
            return  # (a frame the bridge passed on for another reason: a gap, a duplicate)
        self._learned = key
        self.sub.learn_array(
            meta, len(sample), data.dtype, data.size, data.shape if data.ndim != 1 else None
        )

def _close_all(*ports: Any) -> None:
    """Close bridge ports. A closed port keeps nothing of the run (no file, no mapping), so a
    reference left behind (a traceback, a cycle) cannot hold a finished run's files."""
    for port in ports:
        if port is not None:
            port.close()


def split_frame(value: Any) -> Tuple[Any, Optional[int]]:
    """Unwrap a :class:`remotemedia.frames.Frame`."""
    if type(value) is Frame:
        return value.value, value.stream_id
    return value, None
