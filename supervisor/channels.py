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

*Transport.* The ports do the books; a :class:`Transport` makes the bridge ports they publish,
receive and notify with. The default is iceoryx2 (``remotemedia._ipc_bridge``); the unit tests
(``tests/test_ports.py``) pass an in-memory fake and a fake clock, so the sequence, gap,
duplicate, replay, window and policy logic is tested in milliseconds, without processes.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

import numpy as np

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import TransportError
from remotemedia.frames import ND_TAG, Frame, Kind, ndarray_meta

from .protocol import EdgeSpec

__all__ = ["OutPort", "InPort", "Retained", "Transport", "ack_channel_options"]

log = logging.getLogger("remotemedia.supervisor")

_EMPTY = b""
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

    def listener(self, inbox: str, bell: int = -1) -> Any:
        """The one listener of ``inbox`` (and of its doorbell slot ``bell``)."""
        if self.doorbells is not None and bell >= 0:
            return bridge.Listener(self.node, inbox, doorbells=self.doorbells, slot=bell)
        return bridge.Listener(self.node, inbox)


class Retained:
    """A sent frame kept for replay until the consumer commits it."""

    # slots, not a dataclass: one is built per frame on the hot path
    __slots__ = ("seq", "kind", "meta", "buffers", "origin", "stream_id", "created_ns", "nbytes", "loaned")

    def __init__(
        self,
        seq: int,
        kind: int,
        meta: Any,
        buffers: List[Any],
        origin: int,
        stream_id: int,
        created_ns: int,
        nbytes: int,
        loaned: bool = False,
    ) -> None:
        self.seq = seq
        self.kind = kind
        self.meta = meta
        self.buffers = buffers
        self.origin = origin
        self.stream_id = stream_id
        self.created_ns = created_ns
        self.nbytes = nbytes
        # The buffer is a view of a chunk this publisher loaned and sent (zero-copy output).
        # The chunk stays intact until this publisher loans again, so the view is copied to
        # private memory just before that ("copy on reuse"), unless it was committed by then.
        self.loaned = loaned


class OutPort:
    """Producer end of an edge.

    Its ports come from ``transport`` (default: iceoryx2 ports of the bridge Node ``node``);
    ``clock`` times resends."""

    def __init__(
        self,
        node: Any,
        spec: EdgeSpec,
        next_seq: int = 0,
        committed: int = 0,
        consumer_finished: bool = False,
        *,
        transport: Optional[Transport] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.consumer_finished = consumer_finished  # its stream already ended (restarts only)
        self.lossless = spec.lossless
        self.depth, self.max_bytes = spec.depth, spec.max_bytes
        self._clock = clock
        t = Transport(node) if transport is None else transport
        self.pub = t.publisher(spec.data_service, max_loaned=MAX_LOANED, **spec.channel_options())
        try:
            # Lossy edges get acks too: a producer must not exit before its end-of-stream frame
            # was taken, because iceoryx2 drops the samples of a publisher that is gone.
            self.ack_sub = t.subscriber(spec.ack_service, **ack_channel_options())
            self.notifier = t.notifier(spec.dst_inbox, spec.dst_bell)
        except BaseException:
            _close_all(self.pub, getattr(self, "ack_sub", None))
            raise
        self.next_seq = next_seq
        # counts of frames the consumer has processed / committed
        self.processed = self.committed = max(next_seq, committed)
        self.retained: Deque[Retained] = deque()
        self.retained_bytes = 0
        self.loaned_retained = 0  # retained frames whose buffer is still a sent chunk
        self.last_nbytes = 0
        # seq of the first retained frame not known to be delivered (None: all delivered)
        self.undelivered: Optional[int] = None
        self._retry_at = 0.0
        self._retry_delay = 0.002
        self.sent = 0
        self.zero_copy = 0  # frames sent from a loaned chunk, without a copy
        self.copied_on_reuse = 0  # of those, copied after all: not committed before the next loan
        self.encoded_by_bridge = 0  # frames sent by send_array (the hot path)
        self.resent = 0
        self.discarded = 0
        self.lost = 0  # frames resent because a probe showed the transport lost them
        self._probe: Optional[Tuple[int, int]] = None  # (frame the consumer waits for, read at ns)
        self.eos_sent = False
        self.notify_pending = False  # frames sent with notify=False wait for flush_notify()
        self._array_meta: Optional[bytes] = None  # see send_array
        self._array_nbytes = 0

    # -------------------------------------------------------------- sending

    @property
    def in_flight(self) -> int:
        return self.next_seq - self.processed

    def can_send(self) -> bool:
        if not self.lossless:
            return True
        n = self.next_seq - self.processed  # in flight (read for every frame: no property)
        return n <= 0 or (n < self.depth and n * self.last_nbytes < self.max_bytes)

    def send(
        self,
        kind: int,
        meta: Any,
        buffers: List[Any],
        origin: int = 0,
        stream_id: int = 0,
        created_ns: int = 0,
        notify: bool = True,
    ) -> int:
        """Queue one frame (the caller checked ``can_send``) and publish it if the edge is in
        order. Returns the frame's seq. With ``notify=False`` the consumer is not woken yet:
        the caller sends more and then calls :meth:`flush_notify` (one wake-up per batch)."""
        seq = self.next_seq
        self.next_seq += 1
        if kind == KIND_EOS:
            self.eos_sent = True
        if not self.lossless:
            self.pub.send(seq, kind, meta, buffers, origin=origin, stream_id=stream_id, created_ns=created_ns)
            self.sent += 1
            if notify:
                self._notify()
            else:
                self.notify_pending = True
            return seq
        if seq < self.committed:
            if kind != KIND_EOS or self.consumer_finished:
                return seq  # regenerated after a restart, and already committed downstream
            # An end of stream the consumer has not seen: after a restart behind a lossy edge
            # the outputs may number differently. It becomes the next frame the consumer takes.
            seq = self.committed
            self.next_seq = seq + 1
        if not buffers:  # (a small pickled object: the common case of non-array frames)
            nbytes = len(meta)
        elif len(buffers) == 1:
            nbytes = len(meta) + memoryview(buffers[0]).nbytes
        else:
            nbytes = len(meta) + sum(memoryview(b).nbytes for b in buffers)
        r = Retained(seq, kind, meta, buffers, origin, stream_id, created_ns, nbytes)
        n: Optional[int] = None
        if self.undelivered is None:
            if self.loaned_retained:
                self._secure()
            try:
                n = self.pub.send(seq, kind, meta, buffers, origin=origin, stream_id=stream_id, created_ns=created_ns)
            except BaseException:
                self._keep(r, None, False)  # its seq is taken: a replay must find it
                raise
        self._keep(r, n, notify)
        if not notify and n:
            self.notify_pending = True
        return seq

    def flush_notify(self) -> None:
        """Wake the consumer for the frames sent with ``notify=False``."""
        if self.notify_pending:
            self.notify_pending = False
            self._notify()

    def send_array(self, value: Any, origin: int, stream_id: int, created_ns: int) -> bool:
        """The hot path of :meth:`send`: a bare array like the last one :meth:`learn_array`
        saw is encoded, copied, published and notified by the bridge in one call (the caller
        checked ``can_send``). False, with nothing sent, when the bridge cannot (then encode
        and :meth:`send`)."""
        meta = self._array_meta
        if meta is None or self.undelivered is not None or self.loaned_retained:
            return False
        seq = self.next_seq
        if seq < self.committed:
            return False  # regenerated after a restart: send() knows what to skip
        n = self.pub.send_array(seq, value, origin, stream_id, created_ns, self.notifier)
        if n < 0:
            return False
        self.next_seq = seq + 1
        self.encoded_by_bridge += 1
        if not self.lossless:
            self.sent += 1
            return True
        # (the bridge notified the consumer already)
        self._keep(Retained(seq, KIND_DATA, meta, [value], origin, stream_id, created_ns, self._array_nbytes), n, False)
        return True

    def learn_array(self, value: Any, meta: bytes, buffer: Any) -> None:
        """Let :meth:`send_array` take arrays like ``value`` (a bare array that
        :func:`remotemedia.frames.encode` turned into ``meta`` and ``buffer``)."""
        if type(value) is not np.ndarray or meta[:4] != ND_TAG:
            return
        nbytes = memoryview(buffer).nbytes
        self.pub.learn_array(np.ndarray, value.dtype, value.shape, meta, nbytes)
        self._array_meta = meta
        self._array_nbytes = len(meta) + nbytes

    def send_loan(self, loan: Any, meta: bytes, buffer: Any, origin: int = 0, stream_id: int = 0, created_ns: int = 0) -> int:
        """Send a frame whose single buffer was written in place in ``loan`` (zero copy).
        ``buffer`` is the caller's view of the loaned memory, kept for replay."""
        seq = self.next_seq
        self.next_seq += 1
        if not self.lossless:
            loan.send(seq, KIND_DATA, meta, origin=origin, stream_id=stream_id, created_ns=created_ns)
            self.sent += 1
            self.zero_copy += 1
            self._notify()
            return seq
        if seq < self.committed:
            loan.discard()
            return seq
        nbytes = len(meta) + memoryview(buffer).nbytes
        if self.undelivered is not None:
            # Out of order now: it must wait its turn like any frame, from private memory.
            r = Retained(seq, KIND_DATA, meta, [bytes(memoryview(buffer))], origin, stream_id, created_ns, nbytes)
            loan.discard()
            self._keep(r, None, False)
            return seq
        r = Retained(seq, KIND_DATA, meta, [buffer], origin, stream_id, created_ns, nbytes, loaned=True)
        try:
            n = loan.send(seq, KIND_DATA, meta, origin=origin, stream_id=stream_id, created_ns=created_ns)
        except BaseException:
            self._keep(r, None, False)  # its seq is taken: a replay must find it
            raise
        self._keep(r, n, True)
        if n > 0:
            self.zero_copy += 1
        return seq

    def loan(self, nbytes: int) -> Any:
        """A chunk of this edge's publisher for an in-place output frame."""
        self._secure()
        return self.pub.loan(nbytes)

    def _secure(self) -> None:
        """Copy-on-reuse: before this publisher loans a chunk again, retained frames that still
        point into chunks it sent get a private copy (their chunk may be the next loan)."""
        if not self.loaned_retained:
            return
        self.poll_acks()  # frames committed meanwhile need no copy
        if not self.loaned_retained:
            return
        for r in self.retained:
            if r.loaned:
                r.buffers = [bytes(memoryview(b)) for b in r.buffers]
                r.loaned = False
                self.copied_on_reuse += 1
        self.loaned_retained = 0

    def _keep(self, r: Retained, n: Optional[int], notify: bool) -> None:
        """Retain ``r`` (a frame of a lossless edge) for replay, and book its publish: it
        reached ``n`` subscribers (then wake the consumer if ``notify``); 0: it was discarded,
        so it and every later frame are resent in order after a backoff; None: it was not
        published (an earlier frame is still undelivered, or the publish raised)."""
        self.retained.append(r)
        self.retained_bytes += r.nbytes
        self.last_nbytes = r.nbytes
        if r.loaned:
            self.loaned_retained += 1
        if n is None:
            return
        if n > 0:
            self.sent += 1
            if notify:
                self._notify()
        else:
            self.discarded += 1
            self.undelivered = r.seq
            self._schedule_retry(reset=True)

    def _publish(self, r: Retained) -> bool:
        n = self.pub.send(
            r.seq, r.kind, r.meta, r.buffers, origin=r.origin, stream_id=r.stream_id, created_ns=r.created_ns
        )
        if n == 0:
            self.discarded += 1
        return n > 0

    def _notify(self) -> None:
        try:
            self.notifier.notify()
        except TransportError:
            pass  # the consumer is gone; it is woken by its restart, not by us

    def _schedule_retry(self, reset: bool = False) -> None:
        if reset:
            self._retry_delay = 0.002
        else:
            self._retry_delay = min(self._retry_delay * 2, 0.1)
        self._retry_at = self._clock() + self._retry_delay

    # -------------------------------------------------------------- acks and resends

    def poll_acks(self) -> bool:
        """Consume acks. True when the consumer made progress."""
        if self.ack_sub is None:
            return False
        newest = None
        while True:
            s = self.ack_sub.receive()
            if s is None:
                break
            newest = s.info  # (processed, committed, ...): see Kind.ACK and Kind.PROBE
            del s
        if newest is None:
            return False
        progress = self.apply_ack(newest[0], newest[1])
        if newest[5] == KIND_PROBE:
            self._probed(newest[2], newest[3])
        return progress

    def _probed(self, want: int, probed_ns: int) -> None:
        """The consumer's queue was empty at ``probed_ns`` while it waited for frame ``want``
        (Kind.PROBE). Had ``want`` been published before an earlier probe for it was read,
        it is lost: iceoryx2 counted it delivered to a subscriber that never saw it (see
        shared/reference/iceoryx2.md, samples sent to a subscriber not yet attached). Nothing
        later shows the consumer a gap when it is the tail that is lost, so without this both
        ends would wait for each other forever. Resending is safe: the consumer drops what it
        has (by seq)."""
        end = self.undelivered if self.undelivered is not None else self.next_seq
        if not self.lossless or want >= end or want < self.committed:
            self._probe = None  # nothing published that it waits for
            return
        first = self._probe
        now_ns = int(self._clock() * 1e9)
        if first is None or first[0] != want or probed_ns <= first[1]:
            # (a probe sent before we read the first may predate the publish: wait for one after)
            self._probe = (want, now_ns)
            return
        self._probe = None
        self.lost += end - want
        log.warning(
            "edge %s -> %s: frames %d..%d were published but never reached the consumer (lost by the "
            "transport); resending them", self.spec.src, self.spec.dst, want, end - 1,
        )
        self.pub.update_connections()
        self.processed = min(self.processed, want)
        self.undelivered = want
        self.resend_due(force=True)

    def apply_ack(self, processed: int, committed: int) -> bool:
        """The consumer processed ``processed`` frames and committed ``committed``; forget
        the committed ones. True on progress."""
        progress = False
        if processed > self.processed:
            self.processed = min(processed, self.next_seq)
            progress = True
        if committed > self.committed:
            self.committed = committed
            progress = True
            while self.retained and self.retained[0].seq < committed:
                r = self.retained.popleft()
                self.retained_bytes -= r.nbytes
                if r.loaned:
                    self.loaned_retained -= 1
            if self.undelivered is not None and self.undelivered < committed:
                self.undelivered = self.retained[0].seq if self.retained else None
        if progress and self.undelivered is not None:
            self._retry_at = 0.0  # room was made: resend now
        return progress

    def replay(self, after: int) -> None:
        """Send again every retained frame with seq > after (a consumer restarted)."""
        if not self.lossless:
            # Nothing is kept on a lossy edge: what the dead consumer had queued is gone, so
            # count it as taken, and repeat the end of the stream if it was already sent.
            self.pub.update_connections()
            self.processed = self.next_seq - (1 if self.eos_sent else 0)
            if self.eos_sent:
                self.pub.send(self.next_seq - 1, KIND_EOS, _EMPTY, [])
                self._notify()
            return
        self.pub.update_connections()
        # The restarted consumer has processed nothing beyond its commit.
        self.processed = min(self.processed, after + 1)
        first = next((r.seq for r in self.retained if r.seq > after), None)
        if first is not None and (self.undelivered is None or first < self.undelivered):
            self.undelivered = first
        self._retry_at = 0.0
        self.resend_due(force=True)

    def resend_due(self, force: bool = False) -> bool:
        """Send the undelivered tail in order, if its retry time has come. True when the
        whole tail went out."""
        if self.undelivered is None:
            return True
        now = self._clock()
        if not force and now < self._retry_at:
            return False
        self._secure()
        sent_any = False
        for r in self.retained:
            if r.seq < self.undelivered:
                continue
            if not self._publish(r):
                self.undelivered = r.seq
                if sent_any:
                    self._notify()
                self._schedule_retry(reset=sent_any)
                return False
            sent_any = True
            self.resent += 1
        self.undelivered = None
        if sent_any:
            self._notify()
        return True

    @property
    def next_retry(self) -> Optional[float]:
        return self._retry_at if self.undelivered is not None else None

    @property
    def fully_acked(self) -> bool:
        if not self.lossless:
            return self.processed >= self.next_seq
        return not self.retained

    def close(self) -> None:
        """Release every iceoryx2 port of this end (idempotent)."""
        self.retained.clear()
        self.retained_bytes = 0
        _close_all(self.pub, self.ack_sub, self.notifier)


class InPort:
    """Consumer end of an edge.

    Its ports come from ``transport`` (default: iceoryx2 ports of the bridge Node ``node``);
    ``clock`` times gaps."""

    def __init__(
        self,
        node: Any,
        spec: EdgeSpec,
        expected: int = 0,
        *,
        transport: Optional[Transport] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.index, self.src = spec.index, spec.src
        self.lossless = spec.lossless
        self._clock = clock
        t = Transport(node) if transport is None else transport
        self.sub = t.subscriber(spec.data_service, **spec.channel_options())
        try:
            self.ack_pub = t.publisher(spec.ack_service, **ack_channel_options())
            self.ack_notifier = t.notifier(spec.src_inbox, spec.src_bell)
        except BaseException:
            _close_all(self.sub, getattr(self, "ack_pub", None))
            raise
        self.expected = expected
        self.eos = False
        self.eos_seq: Optional[int] = None
        self.acked_processed = expected
        self.acked_committed = expected
        self.notified_processed = expected
        # The producer's window in frames: ``depth``, or fewer when ``max_bytes`` of its
        # frames fill it first (estimated from the size of the frames we take).
        self.window = spec.depth
        self.notify_every = max(1, spec.depth // 2)
        self._frame_len = -1
        self.gap_since: Optional[float] = None
        self.gap_reported_at = 0.0
        self.received = 0
        self.duplicates = 0
        self.dup_pending = False
        self.dropped = 0  # frames lost on a lossy edge
        self.decoded_by_bridge = 0  # frames take() returned decoded (the hot path)
        self._learned: Optional[Tuple[bytes, int]] = None
        self.borrow_limit = self.sub.max_borrowed - 1
        # Small pickled objects (numbers, short strings, small dicts) are unpickled by the
        # bridge in take(): no Sample, no Python decoding. Never one so big that the window
        # estimate (see _accept) would have had to shrink for it.
        self.sub.learn_pickle(pickle.loads, min(PICKLE_MAX, spec.max_bytes // max(1, spec.depth)))

    def receive(self) -> Optional[Any]:
        """The next in-order frame (a bridge Sample), or None."""
        while True:
            s = self.sub.receive()
            if s is None:
                return None
            s = self._accept(s)
            if s is not None:
                return s

    def take(self) -> Optional[Any]:
        """Like :meth:`receive`, but an in-order data frame carrying a bare array like the last
        one :meth:`learn` saw, or a small pickled object, comes decoded by the bridge, as
        ``(value, seq, origin, stream_id, created_ns, sent_ns)`` (the hot path: no Sample, no
        Python decoding). Anything else comes as a Sample. Raises what unpickling raised (the
        frame is consumed)."""
        r = self.sub.take(self.expected, self.borrow_limit)
        if type(r) is tuple:
            self.expected += 1
            self.received += 1
            self.decoded_by_bridge += 1
            self.gap_since = None
            return r
        if r is None:
            return None
        r = self._accept(r)
        return r if r is not None else self.receive()

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
            meta, len(sample), np.frombuffer, data.dtype, data.size, data.shape if data.ndim != 1 else None
        )

    def _accept(self, s: Any) -> Optional[Any]:
        """Sequence checks of one received sample: the sample when it is the next frame,
        None when it must be dropped (duplicate, or beyond a gap on a lossless edge)."""
        seq = s.seq
        if seq < self.expected:
            if s.kind == KIND_EOS and not self.eos:
                # see OutPort.send: an end of stream is never a duplicate
                self.eos = True
                self.eos_seq = self.expected - 1
                self.received += 1
                return s
            # A restarted producer regenerates what we already have. It cannot know our
            # position (its ack subscriber is new): answer with an ack.
            self.duplicates += 1
            self.dup_pending = True
            return None
        if seq > self.expected:
            if self.lossless:
                if self.gap_since is None:
                    self.gap_since = self._clock()
                return None
            self.dropped += seq - self.expected
        self.expected = seq + 1
        self.gap_since = None
        self.received += 1
        if s.kind == KIND_EOS:
            self.eos = True
            self.eos_seq = seq
        else:
            n = len(s)
            if n != self._frame_len:
                # A payload is a little larger than what the producer counts, so this
                # never overestimates its window.
                self._frame_len = n
                self.window = max(1, min(self.spec.depth, -(-self.spec.max_bytes // max(n, 1))))
                self.notify_every = max(1, self.window // 2)
        return s

    def ack(self, processed: int, committed: int, force: bool = False) -> None:
        """Tell the producer how many frames are processed and committed (counts); unchanged
        counts are sent again only with ``force`` or after a duplicate arrived."""
        if self.ack_pub is None:
            return
        force = force or self.dup_pending
        self.dup_pending = False
        if not force and processed <= self.acked_processed and committed <= self.acked_committed:
            return
        self.acked_processed = max(processed, self.acked_processed)
        new_commit = committed > self.acked_committed
        self.acked_committed = max(committed, self.acked_committed)
        # (processed, committed) in the seq and origin fields: see Kind.ACK
        self.ack_pub.send(self.acked_processed, KIND_ACK, _EMPTY, origin=self.acked_committed)
        # Waking the producer costs it (and the CPU) a context switch per ack. For flow control
        # it only waits with a full window, and then we have half a window to take before it
        # could be stuck: wake it every half window. Commits (at most every 10 ms per worker)
        # always wake it: its own commits, and so its producer's reuse of loaned chunks, wait
        # on them (were the wake-up left to its next frame, a chain of stages would copy every
        # big loaned frame once more).
        if (
            force
            or new_commit
            or (self.acked_processed - self.notified_processed >= self.notify_every and self._producer_may_wait())
            or (self.eos_seq is not None and self.acked_processed > self.eos_seq)
        ):
            self.notified_processed = self.acked_processed
            try:
                self.ack_notifier.notify()
            except TransportError:
                pass

    def probe(self) -> None:
        """Say which frame we wait for, when our queue is empty (Kind.PROBE): the producer
        resends what it published that we never got (see :meth:`OutPort._probed`). About
        once a second (the worker's heartbeat), so its cost is nil."""
        if self.ack_pub is None or not self.lossless or self.eos or self.gap_since is not None or self.sub.has_samples():
            return
        self.ack_pub.send(
            self.acked_processed, KIND_PROBE, _EMPTY, origin=self.acked_committed,
            stream_id=self.expected, created_ns=int(self._clock() * 1e9),
        )  # fmt: skip
        try:
            self.ack_notifier.notify()
        except TransportError:
            pass

    def _producer_may_wait(self) -> bool:
        # The producer waits for room only with a full window (``depth`` frames, or
        # ``max_bytes`` of them) in flight beyond what it last learned, and it learned at least
        # ``notified_processed`` (it reads every ack before it blocks, and each notify since
        # woke it). With our queue empty we hold every frame it sent, so ``expected`` bounds
        # its next seq: below that line it cannot be waiting, and waking it would only cost
        # both of us a context switch (a paced stream's case). With frames queued it may be
        # refilling: wake it every half window to keep it busy.
        return self.expected >= self.notified_processed + self.window or self.sub.has_samples()

    def gap_to_report(self, now: float, min_age: float = 0.05, interval: float = 0.2) -> Optional[int]:
        """The seq to ask a replay from, when a gap has lasted ``min_age`` and was not reported
        in the last ``interval`` seconds."""
        if self.gap_since is None or now - self.gap_since < min_age or now - self.gap_reported_at < interval:
            return None
        self.gap_reported_at = now
        return self.expected

    def should_copy(self) -> bool:
        """True when the next frame must be copied out of shared memory so that the borrow
        limit is never reached (a node holding on to frames must not stall the edge)."""
        return self.sub.borrowed >= self.borrow_limit

    def close(self) -> None:
        """Release every iceoryx2 port of this end (idempotent). Frames already received
        stay valid: each keeps its chunk until it is gone."""
        _close_all(self.sub, self.ack_pub, self.ack_notifier)


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
