"""Unit tests of the exactly-once edge ends (supervisor/channels.py) over an in-memory
transport and a fake clock: no process, no shared memory, milliseconds per test.

The fake keeps what the ports rely on from iceoryx2: a subscriber queue of ``depth`` frames
that discards a frame when full (lossless edges) or overwrites its oldest one (lossy edges,
``safe_overflow``), a one-slot overwriting ack queue, notifiers that count their wake-ups (and
fail when nobody listens), loans whose chunk the publisher reuses after it was sent. The
process-level tests (test_flow, test_supervision, ...) cover the same logic through real
workers; these pin it down frame by frame.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import pytest

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import ReceiveError, TransportError
from remotemedia.frames import CT_TAG, Kind, decode, decode_bytes, encode
from supervisor import channels
from supervisor.channels import KIND_ACK, KIND_DATA, KIND_EOS, KIND_PROBE, InPort, OutPort
from supervisor.protocol import EdgeSpec

# --------------------------------------------------------------------------- the fake transport


class FakeSample(bytes):
    """A received frame: its payload (meta, then buffers) with the header as attributes, like
    ``_ipc_bridge.Sample`` (``len()`` and the buffer protocol come from bytes)."""

    seq: int
    kind: int
    origin: int
    stream_id: int
    created_ns: int
    sent_ns: int
    meta: Tuple[int, int]
    buffers: List[Tuple[int, int]]

    @property
    def info(self) -> Tuple[int, int, int, int, int, int]:
        return (self.seq, self.origin, self.stream_id, self.created_ns, self.sent_ns, self.kind)

    def __del__(self) -> None:
        sub = getattr(self, "borrowed_from", None)
        if sub is not None:  # (a subscriber that counts borrows, as iceoryx2 does)
            sub.borrowed -= 1


def make_sample(seq: int, kind: int, meta: Any, buffers: Any, origin: int, stream_id: int, created_ns: int) -> FakeSample:
    parts = [bytes(memoryview(meta))] + [bytes(memoryview(b).cast("B")) for b in buffers]
    s = FakeSample(b"".join(parts))
    s.seq, s.kind, s.origin, s.stream_id, s.created_ns, s.sent_ns = seq, kind, origin, stream_id, created_ns, 1
    s.meta = (0, len(parts[0]))
    off, s.buffers = len(parts[0]), []
    for p in parts[1:]:
        s.buffers.append((off, len(p)))
        off += len(p)
    return s


class Bus:
    """Services and inboxes of one fake host."""

    def __init__(self) -> None:
        self.subscribers: Dict[str, List["FakeSubscriber"]] = {}
        self.notifies: Dict[str, int] = {}
        self.dead_inboxes: set = set()

    def notify_count(self, inbox: str) -> int:
        return self.notifies.get(inbox, 0)


class FakeSubscriber:
    def __init__(self, bus: Bus, service: str, buffer_size: int, max_borrowed: int, safe_overflow: bool, **_: Any) -> None:
        self.bus, self.service = bus, service
        self.capacity, self.safe_overflow = buffer_size, safe_overflow
        self.max_borrowed = max_borrowed
        self.borrowed = 0
        self.count_borrows = False  # as iceoryx2: a receive with max_borrowed frames held fails
        self.queue: Deque[FakeSample] = deque()
        self.refuse = 0  # the next N deliveries are discarded (a full queue, a racing replay)
        self.lose = 0  # the next N deliveries count as delivered and vanish (a lost frame)
        self.overflowed = 0
        self._learned: Optional[Tuple[bytes, int, Any, int, Any]] = None
        self._pickle: Optional[Tuple[Any, int]] = None
        self._containers = False
        self.last_len = 0
        bus.subscribers.setdefault(service, []).append(self)

    def deliver(self, s: FakeSample) -> bool:
        if self.refuse:
            self.refuse -= 1
            return False
        if self.lose:
            self.lose -= 1
            return True
        if len(self.queue) >= self.capacity:
            if not self.safe_overflow:
                return False
            self.queue.popleft()
            self.overflowed += 1
        self.queue.append(s)
        return True

    def receive(self) -> Optional[FakeSample]:
        if not self.queue:
            return None
        if self.count_borrows and self.borrowed >= self.max_borrowed:
            raise ReceiveError(f"receiving on {self.service!r} with {self.borrowed} of {self.max_borrowed} frames still held")
        s = self.queue.popleft()
        if self.count_borrows:
            self.borrowed += 1
            s.borrowed_from = self
        return s

    def take(self, expected: int, borrow_limit: int) -> Any:
        s = self.receive()
        if s is None or s.seq != expected or s.kind != KIND_DATA:
            return s
        m0, m1 = s.meta
        self.last_len = len(s)  # (as the bridge's: the payload of the frame returned decoded)
        if self._pickle is not None and not s.buffers and 0 < m1 - m0 <= self._pickle[1] and s[m0] == 0x80:
            return (self._pickle[0](bytes(s[m0:m1])), s.seq, s.origin, s.stream_id, s.created_ns, s.sent_ns)
        if self._containers and s.buffers and bytes(s[m0 : m0 + 4]) == CT_TAG:
            value = decode_bytes(bytes(s[m0:m1]), [memoryview(s)[o : o + n] for o, n in s.buffers])
            return (value, s.seq, s.origin, s.stream_id, s.created_ns, s.sent_ns)
        c = self._learned
        if c is None or len(s) != c[1]:
            return s
        if bytes(s[m0:m1]) != c[0]:
            return s
        dtype, count, shape = c[2], c[3], c[4]
        a = np.frombuffer(s, dtype, count=count, offset=s.buffers[0][0])
        if shape is not None:
            a = a.reshape(shape)
        return (a, s.seq, s.origin, s.stream_id, s.created_ns, s.sent_ns)

    def learn_array(self, meta: bytes, payload_len: int, dtype: Any, count: int, shape: Any = None) -> None:
        self._learned = (bytes(meta), payload_len, dtype, count, shape)

    def learn_pickle(self, loads: Any, max_meta: int) -> None:
        self._pickle = (loads, max_meta)

    def learn_containers(self) -> None:
        self._containers = True

    def has_samples(self) -> bool:
        return bool(self.queue)

    def close(self) -> None:
        """Gone: its queue is lost, like a dead process's."""
        subs = self.bus.subscribers.get(self.service, [])
        if self in subs:
            subs.remove(self)


class FakeLoan:
    def __init__(self, pub: "FakePublisher", chunk: bytearray) -> None:
        self.pub, self.chunk = pub, chunk
        self.view = memoryview(chunk)

    def send(self, seq: int, kind: int, meta: Any, *, origin: int = 0, stream_id: int = 0, created_ns: int = 0) -> int:
        self.pub.sent_chunks.append(self.chunk)
        return self.pub.send(seq, kind, meta, [self.chunk], origin=origin, stream_id=stream_id, created_ns=created_ns)

    def discard(self) -> None:
        self.pub.free_chunks.append(self.chunk)


class FakePublisher:
    def __init__(self, bus: Bus, service: str, **options: Any) -> None:
        self.bus, self.service = bus, service
        self.log: List[Tuple[int, int]] = []  # (seq, kind) of every publish attempt
        self.learned: Optional[Tuple[Any, Tuple[int, ...]]] = None
        self.sent_chunks: Deque[bytearray] = deque()  # sent loaned chunks, oldest first
        self.free_chunks: List[bytearray] = []
        self.connection_updates = 0
        self.fail = 0  # the next N publishes raise (a transport error the node may survive)

    def send(self, seq: int, kind: int, meta: Any, buffers: Any = (), *, origin: int = 0, stream_id: int = 0, created_ns: int = 0) -> int:
        self.log.append((seq, kind))
        if self.fail:
            self.fail -= 1
            raise TransportError(f"publishing frame {seq} failed")
        s = make_sample(seq, kind, meta, buffers, origin, stream_id, created_ns)
        return sum(sub.deliver(s) for sub in list(self.bus.subscribers.get(self.service, [])))

    def learn_array(self, array_type: Any, dtype: Any, shape: Any, meta: bytes, nbytes: int) -> None:
        self.learned = (dtype, shape)

    def send_array(self, seq: int, value: Any, origin: int, stream_id: int, created_ns: int, notifier: Any) -> int:
        if self.learned is None or (value.dtype, value.shape) != self.learned:
            return -1
        meta, bufs = encode(value)
        n = self.send(seq, KIND_DATA, meta, bufs, origin=origin, stream_id=stream_id, created_ns=created_ns)
        if n:
            try:
                notifier.notify()
            except TransportError:
                pass
        return n

    def loan(self, nbytes: int) -> FakeLoan:
        # iceoryx2 hands out a chunk again once every subscriber let go of it: model the worst
        # case, the oldest sent chunk is the next loan.
        if self.free_chunks:
            chunk = self.free_chunks.pop()
        elif self.sent_chunks:
            chunk = self.sent_chunks.popleft()
        else:
            chunk = bytearray(nbytes)
        return FakeLoan(self, chunk)

    def update_connections(self) -> None:
        self.connection_updates += 1

    def close(self) -> None:
        pass


class FakeNotifier:
    def __init__(self, bus: Bus, inbox: str) -> None:
        self.bus, self.inbox = bus, inbox

    def notify(self) -> None:
        if self.inbox in self.bus.dead_inboxes:
            raise TransportError(f"nobody listens on {self.inbox}")
        self.bus.notifies[self.inbox] = self.bus.notifies.get(self.inbox, 0) + 1

    def close(self) -> None:
        pass


class FakeTransport:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def publisher(self, service: str, **options: Any) -> FakePublisher:
        return FakePublisher(self.bus, service, **options)

    def subscriber(self, service: str, **options: Any) -> FakeSubscriber:
        return FakeSubscriber(self.bus, service, **options)

    def notifier(self, inbox: str, bell: int = -1) -> FakeNotifier:
        return FakeNotifier(self.bus, inbox)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Edge:
    """Both ends of one edge on a fake bus."""

    def __init__(self, policy: str = "block", depth: int = 4, max_bytes: int = 1 << 20) -> None:
        self.bus, self.clock = Bus(), Clock()
        self.transport = FakeTransport(self.bus)
        self.spec = EdgeSpec(
            index=0, src="a", dst="b", data_service="data", ack_service="ack", src_inbox="inbox-a",
            dst_inbox="inbox-b", depth=depth, max_borrowed=4, policy=policy, max_bytes=max_bytes,
        )  # fmt: skip
        self.out = self.producer()
        self.inp = self.consumer()

    def producer(self, next_seq: int = 0, committed: int = 0, consumer_finished: bool = False) -> OutPort:
        return OutPort(
            None, self.spec, next_seq, committed, consumer_finished, transport=self.transport, clock=self.clock
        )

    def consumer(self, expected: int = 0) -> InPort:
        return InPort(None, self.spec, expected, transport=self.transport, clock=self.clock)

    def restart_consumer(self, expected: int) -> InPort:
        self.inp.close()
        self.inp = self.consumer(expected)
        return self.inp

    @property
    def data_sub(self) -> FakeSubscriber:
        return self.inp.sub

    def send(self, value: Any, origin: int = 0) -> int:
        meta, bufs = encode(value)
        return self.out.send(KIND_DATA, meta, bufs, origin)

    def eos(self) -> int:
        return self.out.send(KIND_EOS, b"", [])

    def drain(self) -> List[Tuple[int, Any]]:
        """Every in-order frame the consumer can take now: (seq, value or "EOS")."""
        got = []
        while True:
            s = self.inp.receive()
            if s is None:
                return got
            got.append((s.seq, "EOS" if s.kind == KIND_EOS else decode(s)))


# --------------------------------------------------------------------------- one fact


def test_frame_kinds_have_one_definition() -> None:
    # The bridge recognises data frames itself (send_array, take): its constant must be Kind's.
    assert bridge.KIND_DATA == Kind.DATA
    assert (KIND_DATA, KIND_EOS, KIND_ACK, KIND_PROBE) == (Kind.DATA, Kind.EOS, Kind.ACK, Kind.PROBE)
    assert all(type(k) is int for k in (KIND_DATA, KIND_EOS, KIND_ACK, KIND_PROBE))


def test_ports_use_the_transport_they_are_given() -> None:
    e = Edge()
    assert isinstance(e.out.pub, FakePublisher) and isinstance(e.out.ack_sub, FakeSubscriber)
    assert isinstance(e.inp.sub, FakeSubscriber) and isinstance(e.inp.ack_pub, FakePublisher)
    assert e.out.notifier.inbox == "inbox-b" and e.inp.ack_notifier.inbox == "inbox-a"
    assert isinstance(channels.Transport(None), channels.Transport)  # the iceoryx2 default


# --------------------------------------------------------------------------- lossless edges


def test_in_order_delivery_and_commit_releases_retained() -> None:
    e = Edge()
    for i in range(3):
        assert e.send(f"v{i}", origin=i) == i
    assert e.bus.notify_count("inbox-b") == 3
    assert [r.seq for r in e.out.retained] == [0, 1, 2] and e.out.in_flight == 3
    assert e.drain() == [(0, "v0"), (1, "v1"), (2, "v2")]
    assert e.inp.expected == 3 and e.inp.received == 3
    e.inp.ack(3, 2)  # processed 3, committed 2 (the ack frame's layout: Kind.ACK)
    assert e.bus.notify_count("inbox-a") == 1  # a new commit always wakes the producer
    assert e.out.poll_acks()
    assert (e.out.processed, e.out.committed) == (3, 2)
    assert [r.seq for r in e.out.retained] == [2] and not e.out.fully_acked
    e.inp.ack(3, 3)
    assert e.out.poll_acks() and e.out.fully_acked and e.out.retained_bytes == 0
    assert not e.out.poll_acks()  # nothing new


def test_ack_frame_carries_processed_in_seq_and_committed_in_origin() -> None:
    e = Edge()
    for i in range(4):
        e.send(i)
    e.drain()
    e.inp.ack(4, 1)
    s = e.out.ack_sub.queue[0]
    assert (s.kind, s.seq, s.origin, len(s)) == (KIND_ACK, 4, 1, 0)


def test_ack_channel_keeps_only_the_newest() -> None:
    e = Edge()
    for i in range(4):
        e.send(i)
    e.drain()
    e.inp.ack(1, 1)
    e.inp.ack(2, 1)
    e.inp.ack(4, 3)
    assert len(e.out.ack_sub.queue) == 1
    assert e.out.poll_acks() and (e.out.processed, e.out.committed) == (4, 3)


def test_unchanged_ack_is_not_resent_unless_forced() -> None:
    e = Edge()
    e.send(0)
    e.drain()
    e.inp.ack(1, 1)
    assert e.out.poll_acks()
    e.inp.ack(1, 1)
    assert not e.out.ack_sub.queue
    e.inp.ack(1, 1, force=True)
    assert len(e.out.ack_sub.queue) == 1


def test_a_frame_not_taken_gives_its_borrow_back_before_the_next_is_received() -> None:
    # Every borrow but one held (the node keeps frame 0 zero-copy), then a duplicate arrives
    # before frame 1: the duplicate must be let go before frame 1 is received (a worker of a
    # node keeping its frames died of ExceedsMaxBorrows under load when it was not).
    e = Edge()
    sub = e.data_sub
    sub.max_borrowed, sub.count_borrows = 2, True
    frame = np.arange(8, dtype=np.int32)  # (an array: taken as the Sample, zero copy)
    e.send(frame)
    kept = e.inp.take()
    assert kept.seq == 0 and sub.borrowed == 1
    e.out.close()
    e.out = e.producer(next_seq=0, committed=0)  # restarted: frame 0 again, then frame 1
    e.send(frame)
    e.send(frame)
    got = e.inp.take()
    assert got.seq == 1 and e.inp.duplicates == 1 and sub.borrowed == 2
    del got, kept
    assert sub.borrowed == 0


def test_duplicates_from_a_restarted_producer_are_dropped_and_answered() -> None:
    e = Edge()
    for i in range(3):
        e.send(i)
    e.drain()
    e.inp.ack(3, 3)
    # The producer restarts from an older commit (its ack subscriber is new: it does not know
    # the consumer's position) and regenerates frames 1 and 2.
    e.out.close()
    e.out = e.producer(next_seq=1, committed=1)
    e.send(1)
    e.send(2)
    assert e.drain() == []
    assert e.inp.duplicates == 2 and e.inp.dup_pending
    e.inp.ack(3, 3)  # unchanged counts, sent anyway: a duplicate asks for it
    assert not e.inp.dup_pending
    assert e.out.poll_acks() and e.out.fully_acked and e.out.processed == 3
    e.send(3)
    assert e.drain() == [(3, 3)]


def test_gap_is_detected_and_reported_after_min_age_then_every_interval() -> None:
    e = Edge()
    raw = e.transport.publisher("data")  # a frame arriving ahead of its predecessor
    meta, bufs = encode("late")
    raw.send(1, KIND_DATA, meta, bufs)
    assert e.inp.receive() is None and e.inp.expected == 0
    since = e.clock.t
    assert e.inp.gap_since == since
    assert e.inp.gap_to_report(since + 0.01) is None  # younger than min_age
    assert e.inp.gap_to_report(since + 0.06) == 0  # replay from seq 0
    assert e.inp.gap_to_report(since + 0.1) is None  # reported less than interval ago
    assert e.inp.gap_to_report(since + 0.3) == 0
    # the missing frame, then the replayed one: the gap closes
    raw.send(0, KIND_DATA, *encode("first"))
    raw.send(1, KIND_DATA, meta, bufs)
    assert e.drain() == [(0, "first"), (1, "late")]
    assert e.inp.gap_since is None and e.inp.gap_to_report(since + 10) is None


def test_discarded_publish_is_retried_in_order_with_backoff() -> None:
    e = Edge(depth=8)
    e.data_sub.refuse = 1  # the consumer's queue refuses the first frame
    for i in range(3):
        e.send(i)
    # frame 0 was discarded; 1 and 2 wait behind it unpublished (order is kept)
    assert e.out.pub.log == [(0, KIND_DATA)]
    assert e.out.discarded == 1 and e.out.undelivered == 0 and e.out.sent == 0
    assert e.out.next_retry == pytest.approx(e.clock.t + 0.002)
    assert not e.out.resend_due()  # not yet
    e.clock.t += 0.003
    e.data_sub.refuse = 1
    assert not e.out.resend_due()  # discarded again: the backoff doubles
    assert e.out.next_retry == pytest.approx(e.clock.t + 0.004)
    e.clock.t += 0.005
    assert e.out.resend_due() and e.out.undelivered is None and e.out.next_retry is None
    assert e.out.resent == 3 and e.out.discarded == 2
    assert e.drain() == [(0, 0), (1, 1), (2, 2)]
    e.send(3)  # in order again: published at once
    assert e.drain() == [(3, 3)]


@pytest.mark.parametrize("loaned", [False, True])
def test_a_publish_that_raised_is_kept_for_the_replay_its_gap_asks_for(loaned: bool) -> None:
    e = Edge(depth=8)
    e.out.pub.fail = 1
    with pytest.raises(TransportError):
        _send_loaned(e.out, 5) if loaned else e.send("lost")
    assert [r.seq for r in e.out.retained] == [0] and e.out.loaned_retained == int(loaned)
    e.send("next")
    assert e.drain() == [] and e.inp.gap_since is not None  # the consumer sees the hole...
    e.clock.t += 1
    after = e.inp.gap_to_report(e.clock.t) - 1
    e.out.replay(after)  # ...and the supervisor has the producer replay after it
    got = e.drain()
    assert [s for s, _ in got] == [0, 1] and got[1][1] == "next"


def test_resend_stops_at_the_first_discard_and_keeps_the_rest_in_order() -> None:
    e = Edge(depth=2)  # the consumer's queue holds 2 frames
    e.data_sub.refuse = 1
    for i in range(3):
        e.send(i)
    e.clock.t += 1
    assert not e.out.resend_due()  # 0 and 1 fit, 2 is discarded: the backoff restarts
    assert e.out.undelivered == 2 and e.out.next_retry == pytest.approx(e.clock.t + 0.002)
    assert e.drain() == [(0, 0), (1, 1)]
    e.inp.ack(2, 0)  # progress: resend now, not after the backoff
    e.out.poll_acks()
    assert e.out.next_retry == 0.0 and e.out.resend_due()
    assert e.drain() == [(2, 2)]


def test_replay_after_a_consumer_restart_resends_everything_after_its_commit() -> None:
    e = Edge(depth=8)
    for i in range(5):
        e.send(i)
    assert len(e.drain()) == 5
    e.inp.ack(4, 2)  # processed 4, committed 2 (seq 0 and 1)
    e.out.poll_acks()
    # The consumer dies; its successor resumes after its last commit.
    e.restart_consumer(expected=2)
    e.out.replay(after=1)
    assert e.out.processed == 2  # nothing beyond the commit is processed any more
    assert e.out.pub.connection_updates == 1
    assert e.drain() == [(2, 2), (3, 3), (4, 4)]
    assert e.out.resent == 3


def test_replay_to_a_consumer_that_has_more_than_its_commit_drops_what_it_has() -> None:
    e = Edge(depth=8)
    for i in range(4):
        e.send(i)
    e.drain()
    e.inp.ack(4, 1)
    e.out.poll_acks()
    # The consumer restarts, and its last commit says it resumes at 3 (its ledger is ahead
    # of what the producer has learned), while the producer replays after its own view, 0.
    e.restart_consumer(expected=3)
    e.out.replay(after=0)
    assert e.drain() == [(3, 3)]
    assert e.inp.duplicates == 2 and e.inp.dup_pending


# --------------------------------------------------------------------------- probes: a lost tail


def test_a_lost_tail_is_found_by_a_second_probe_and_resent() -> None:
    e = Edge(depth=8)
    e.send(0)
    e.data_sub.lose = 2  # counted delivered, never queued: nothing later will show a gap
    e.send(1)
    e.send(2)
    assert e.drain() == [(0, 0)] and e.inp.gap_since is None
    e.inp.ack(1, 1)
    e.inp.probe()
    s = e.out.ack_sub.queue[0]
    assert (s.kind, s.seq, s.origin, s.stream_id) == (KIND_PROBE, 1, 1, 1)  # an ack, and "I wait for 1"
    assert e.out.poll_acks() and e.out.committed == 1  # the ack it overwrote (one slot): it carries it
    assert e.out.resent == 0  # one probe proves nothing: the frame may have been on its way
    e.clock.t += 1.0
    e.inp.probe()
    e.out.poll_acks()
    assert e.out.lost == 2 and e.out.resent == 2
    assert e.drain() == [(1, 1), (2, 2)]
    e.clock.t += 1.0
    e.inp.probe()  # its queue is empty, and it waits for 3: nothing was published
    e.out.poll_acks()
    assert e.out.resent == 2


def test_a_probe_carries_the_consumers_ack() -> None:
    e = Edge(depth=8)
    for i in range(3):
        e.send(i)
    e.drain()
    e.inp.acked_processed, e.inp.acked_committed = 3, 2  # (as ack() left them, its frame overwritten)
    e.inp.probe()
    assert e.out.poll_acks() and (e.out.processed, e.out.committed) == (3, 2)
    assert e.out.resent == 0


def test_a_probe_no_later_than_the_first_one_read_proves_nothing() -> None:
    # Both probes were sent before the producer read the first: the frame may have been
    # published after them, and be in the queue by now.
    e = Edge(depth=8)
    e.inp.probe()  # waits for 0; nothing published yet
    e.send(0)
    e.out.poll_acks()  # read after the publish: 0 < end, but the probe may predate it
    e.inp.sub.queue.clear()  # (make the queue look empty again to send a second probe)
    e.inp.probe()  # same clock: not later than the first read
    e.out.poll_acks()
    assert e.out.resent == 0 and e.out.lost == 0


def test_no_probe_with_frames_queued_after_a_gap_at_the_end_or_on_a_lossy_edge() -> None:
    e = Edge(depth=8)
    e.send(0)
    e.inp.probe()  # frame 0 is queued
    assert not e.out.ack_sub.queue
    e.drain()
    e.data_sub.lose = 1
    e.send(1)
    e.send(2)
    e.drain()  # 2 arrives: a gap, reported by Gap (the supervisor replays), not by a probe
    assert e.inp.gap_since is not None
    e.inp.probe()
    assert not e.out.ack_sub.queue
    f = Edge(depth=8)
    f.eos()
    f.drain()
    f.inp.probe()
    assert not f.out.ack_sub.queue
    g = Edge(policy="drop_oldest", depth=4)
    g.inp.probe()
    assert not g.out.ack_sub.queue


def test_window_in_frames() -> None:
    e = Edge(depth=3)
    for i in range(3):
        assert e.out.can_send()
        e.send(i)
    assert not e.out.can_send() and e.out.in_flight == 3
    e.drain()
    e.inp.ack(1, 0)
    e.out.poll_acks()
    assert e.out.can_send() and e.out.in_flight == 2


def test_window_in_bytes() -> None:
    e = Edge(depth=16, max_bytes=2500)
    frame = np.zeros(1000, np.uint8)
    sent = 0
    while e.out.can_send():
        e.send(frame)
        sent += 1
    # each frame counts its meta and its 1000 bytes: the third one fills max_bytes
    assert sent == 3 and e.out.in_flight == 3 and e.out.retained_bytes > 2500
    # the consumer sizes its window (when to wake the producer) from the frames it takes
    e.drain()
    assert e.inp.window == 3 and e.inp.notify_every == 1


def test_end_of_stream() -> None:
    e = Edge()
    e.send("x")
    assert e.eos() == 1 and e.out.eos_sent
    assert e.drain() == [(0, "x"), (1, "EOS")]
    assert e.inp.eos and e.inp.eos_seq == 1
    e.inp.ack(2, 2)
    assert e.out.poll_acks() and e.out.fully_acked


def test_end_of_stream_below_the_commit_after_a_producer_restart() -> None:
    e = Edge()
    for i in range(3):
        e.send(i)
    e.drain()
    e.inp.ack(3, 3)
    # The producer restarts from its commit at 0 and learns that the consumer committed 3.
    # It regenerates fewer outputs this time (say, behind a lossy edge): 2, then its end.
    e.out.close()
    e.out = e.producer(next_seq=0, committed=3)
    e.send(0)
    e.send(1)
    assert e.out.pub.log == [] and not e.out.retained  # already committed: neither sent nor kept
    assert e.eos() == 3  # not 2: the end becomes the next frame the consumer takes
    assert e.drain() == [(3, "EOS")] and e.inp.eos_seq == 3


def test_end_of_stream_not_resent_to_a_finished_consumer() -> None:
    e = Edge()
    e.out = e.producer(next_seq=0, committed=3, consumer_finished=True)
    e.eos()
    assert e.out.pub.log == [] and e.out.fully_acked


def test_a_consumer_that_ended_is_not_waited_for_by_a_restarted_producer() -> None:
    # The consumer took 0..2 and its end of stream (seq 3), committed all 4 and exited; the
    # producer restarted before the supervisor knew (consumer_finished False) and regenerates.
    e = Edge()
    e.out = e.producer(next_seq=0, committed=3)
    for i in range(3):
        e.send(i)
    e.out.consumer_ended(4, 4)  # the relayed final commit (Acked) of a consumer that has exited
    assert e.eos() == 3 and e.out.pub.log == []  # its end: skipped, not sent past the consumer's
    assert e.out.fully_acked and e.out.can_send() and e.out.committed == e.out.next_seq
    e.send(9)  # (a frame regenerated beyond the consumer's end: skipped too, no window used)
    assert e.out.pub.log == [] and e.out.fully_acked and not e.out.retained


def test_end_of_stream_below_expected_is_taken_not_dropped() -> None:
    e = Edge()
    e.restart_consumer(expected=5)
    raw = e.transport.publisher("data")
    raw.send(2, KIND_EOS, b"")
    assert e.drain() == [(2, "EOS")]
    assert e.inp.eos and e.inp.eos_seq == 4 and e.inp.duplicates == 0


def test_notify_to_a_gone_consumer_is_not_an_error() -> None:
    e = Edge()
    e.bus.dead_inboxes.add("inbox-b")
    e.send(0)  # published; waking nobody is fine (a restarted consumer looks by itself)
    assert e.out.sent == 1 and e.drain() == [(0, 0)]


# --------------------------------------------------------------------------- hot paths


def test_send_array_books_like_send() -> None:
    e = Edge(depth=8)
    a = np.arange(16, dtype=np.float32)
    assert not e.out.send_array(a, 0, 0, 0)  # nothing learned: the caller encodes
    meta, bufs = encode(a)
    e.out.learn_array(a, meta, bufs[0])
    assert e.out.send(KIND_DATA, meta, bufs) == 0
    assert e.out.send_array(a + 1, 1, 0, 0)
    assert e.out.encoded_by_bridge == 1 and e.out.sent == 2 and len(e.out.retained) == 2
    assert e.bus.notify_count("inbox-b") == 2
    e.data_sub.refuse = 1
    assert e.out.send_array(a + 2, 2, 0, 0)  # discarded: retained, retried later
    assert e.out.undelivered == 2 and e.out.discarded == 1
    assert not e.out.send_array(a + 3, 3, 0, 0)  # out of order now: the Python path queues it
    e.out.send(KIND_DATA, *encode(a + 3))
    e.clock.t += 1
    assert e.out.resend_due()
    got = e.drain()
    assert [s for s, _ in got] == [0, 1, 2, 3]
    assert all((v == a + i).all() for i, (_, v) in enumerate(got))


def test_a_bare_array_viewing_a_received_chunk_is_retained_as_a_copy_of_its_bytes(node: Any) -> None:
    # (a pass-through stage's frame: the hot path keeps a copy for replay, so that the chunk
    # goes back upstream; the copy must be the array's bytes, not its frame's: a replay of
    # it is decoded by dtype and shape)
    pub, sub = bridge.Publisher(node, "e/data"), bridge.Subscriber(node, "e/data")
    want = np.arange(12, dtype=np.float64).reshape(3, 4)
    pub.send(0, 0, *encode(want))
    view = decode(sub.receive())  # (its base, or its base's base, is the Sample)
    e = Edge(depth=8)
    meta, bufs = encode(want)
    e.out.learn_array(want, meta, bufs[0])
    assert e.out.send_array(view, 0, 0, 0)
    assert e.out.retained_copies == 1
    (kept,) = e.out.retained[-1].buffers
    assert type(kept) is not bridge.Sample and bytes(kept) == want.tobytes()
    assert e.out.replay(-1) is None
    assert [(s, v.tolist()) for s, v in e.drain()][-1] == (0, want.tolist())
    del view, kept, e


def test_take_decodes_learned_frames_and_passes_others_through() -> None:
    e = Edge(depth=8)
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    for i in range(3):
        e.send(a + i, origin=10 + i)
    s = e.inp.take()
    assert type(s) is FakeSample and s.seq == 0  # nothing learned yet: a Sample
    e.inp.learn(s, decode(s))
    got = e.inp.take()
    assert type(got) is tuple and got[1:3] == (1, 11) and (got[0] == a + 1).all()
    assert e.inp.decoded_by_bridge == 1 and e.inp.expected == 2
    e.eos()
    assert e.inp.take()[1] == 2
    assert e.inp.take().kind == KIND_EOS and e.inp.eos


def test_take_unpickles_small_objects_never_ones_that_would_shrink_the_window() -> None:
    # 16 frames of at most 4 KiB in flight: a pickle up to 4 KiB is taken decoded; a bigger
    # one comes as a Sample, whose size the window estimate (InPort._accept) must see.
    e = Edge(depth=16, max_bytes=16 * 4096)
    e.send(42, origin=5)
    e.send({"k": "v"})
    e.send("x" * 5000)
    got = e.inp.take()
    assert type(got) is tuple and got[:3] == (42, 0, 5)
    assert e.inp.take()[0] == {"k": "v"}
    assert e.inp.decoded_by_bridge == 2 and e.inp.window == 16
    s = e.inp.take()
    assert type(s) is FakeSample and decode(s) == "x" * 5000
    assert e.inp.window < 16


# --------------------------------------------------------------------------- zero-copy loans


def _send_loaned(out: OutPort, fill: int, n: int = 64) -> int:
    loan = out.loan(n)
    loan.view[:] = bytes([fill]) * n
    meta, _ = encode(np.zeros(n, np.uint8))
    return out.send_loan(loan, meta, loan.view)


def test_loaned_frame_is_copied_before_its_chunk_is_reused() -> None:
    e = Edge(depth=8)
    _send_loaned(e.out, 1)
    assert e.out.loaned_retained == 1 and e.out.zero_copy == 1
    _send_loaned(e.out, 2)  # the fake reuses frame 0's chunk for this loan
    assert e.out.copied_on_reuse == 1
    assert bytes(e.out.retained[0].buffers[0]) == bytes([1]) * 64  # the replay log is intact
    e.drain()
    e.restart_consumer(expected=0)
    e.out.replay(after=-1)
    got = e.drain()
    assert [bytes(v) for _, v in got] == [bytes([1]) * 64, bytes([2]) * 64]


def test_committed_loaned_frame_is_not_copied() -> None:
    e = Edge(depth=8)
    _send_loaned(e.out, 1)
    e.drain()
    e.inp.ack(1, 1)  # committed before the next loan: nothing to copy
    _send_loaned(e.out, 2)
    assert e.out.copied_on_reuse == 0 and e.out.loaned_retained == 1


def test_loaned_frame_behind_an_undelivered_one_waits_in_private_memory() -> None:
    e = Edge(depth=8)
    e.data_sub.refuse = 1
    e.send("first")
    _send_loaned(e.out, 7)
    assert e.out.loaned_retained == 0 and e.out.zero_copy == 0
    assert e.out.pub.log == [(0, KIND_DATA)]
    e.clock.t += 1
    assert e.out.resend_due()
    assert [v if s == 0 else bytes(v) for s, v in e.drain()] == ["first", bytes([7]) * 64]


# --------------------------------------------------------------------------- lossy edges


@pytest.mark.parametrize("policy,depth", [("drop_oldest", 2), ("latest", 1)])
def test_lossy_edge_never_waits_and_counts_drops(policy: str, depth: int) -> None:
    e = Edge(policy=policy, depth=depth)
    for i in range(5):
        assert e.out.can_send()
        e.send(i)
    assert not e.out.retained and e.out.sent == 5
    assert e.drain() == [(i, i) for i in range(5 - depth, 5)]
    assert e.inp.dropped == 5 - depth and e.data_sub.overflowed == 5 - depth


def test_replay_on_a_lossy_edge_repeats_the_end_of_stream() -> None:
    e = Edge(policy="drop_oldest", depth=4)
    e.send(0)
    e.send(1)
    e.eos()
    assert not e.out.fully_acked
    e.restart_consumer(expected=0)  # what the dead consumer had queued is gone
    e.out.replay(after=-1)
    assert e.out.processed == 2 and e.out.pub.log[-1] == (2, KIND_EOS)
    assert e.drain() == [(2, "EOS")] and e.inp.dropped == 2
    e.inp.ack(3, 3)
    assert e.out.poll_acks() and e.out.fully_acked


def test_replay_on_a_lossy_edge_without_end_of_stream_sends_nothing() -> None:
    e = Edge(policy="drop_oldest", depth=4)
    e.send(0)
    n = len(e.out.pub.log)
    e.restart_consumer(expected=0)
    e.out.replay(after=-1)
    assert len(e.out.pub.log) == n and e.out.processed == 1 and e.out.fully_acked


def test_frames_the_bridge_decodes_size_the_window_too() -> None:
    # Media frames of 512 KiB with 1 MiB in flight: a 2-frame window, though the depth allows
    # 32. They come decoded from the first one on (no Sample for the consumer to measure), so
    # the taken frame's length must reach the window estimate, or the consumer would wake its
    # waiting producer every 16 frames instead of every frame.
    e = Edge(depth=32, max_bytes=1 << 20)
    for i in range(2):
        meta, bufs = bridge.encode_container((i, np.zeros(512 << 10, np.uint8)))
        e.out.send(KIND_DATA, meta, bufs)
    got = e.inp.take()
    assert type(got) is tuple and got[0][0] == 0
    assert (e.inp.window, e.inp.notify_every) == (2, 1)


def test_each_consumer_may_borrow_what_its_worker_keeps_for_replay():
    # A worker keeps what it sent until it is committed downstream, i.e. at most the
    # windows on the longest path from it to the end: its input edge gets that on top of the
    # node's own max_borrowed (capped), so kept inputs are not copied out of shared memory.
    from supervisor.protocol import RETENTION_CAP, with_retention_allowance

    def edge(i, src, dst, depth, policy="block"):
        return EdgeSpec(index=i, src=src, dst=dst, data_service=f"e{i}", ack_service=f"a{i}", src_inbox="x",
                        dst_inbox="y", depth=depth, max_borrowed=2, policy=policy)  # fmt: skip

    # src -> a -> b -> out, and a -> c (lossy) -> out
    edges = [
        edge(0, "__input__", "a", 4), edge(1, "a", "b", 8), edge(2, "b", "__output__", 16),
        edge(3, "a", "c", 32, "latest"), edge(4, "c", "__output__", 2),
    ]  # fmt: skip
    got = {e.index: e.max_borrowed for e in with_retention_allowance(edges)}
    # a: max(8 + 16 via b, 32 + 2 via c); b: 16; the lossy edge keeps nothing to replay
    assert got == {0: 2 + 34, 1: 2 + 16, 2: 2, 3: 2, 4: 2}
    deep = [edge(i, f"n{i}", f"n{i + 1}", 32) for i in range(5)]
    assert with_retention_allowance(deep)[0].max_borrowed == 2 + RETENTION_CAP


def test_the_retention_allowance_is_bounded_in_bytes(monkeypatch):
    # The consumer borrows for its worker's replay log at most RETENTION_BYTES of frames the
    # size of the last one it took; then, as without an allowance, frames are copied.
    import dataclasses

    monkeypatch.setattr(channels, "RETENTION_BYTES", 3000)
    e = Edge()
    e.spec = dataclasses.replace(e.spec, max_borrowed=2 + 10, retain=10)
    e.inp.close()
    e.inp = e.consumer()
    assert e.inp.borrow_limit == 1 + 10  # (nothing taken yet)
    e.send(np.zeros(1000, np.uint8))
    assert e.drain()[0][0] == 0
    assert 1000 < e.inp.frame_len < 1500 and e.inp.borrow_limit == 1 + 2
    e.send(np.zeros(10, np.uint8))
    e.drain()
    assert e.inp.borrow_limit == 1 + 10
    with pytest.raises(ValueError, match="retain"):
        InPort(None, dataclasses.replace(e.spec, max_borrowed=4, retain=4), transport=e.transport)
