"""The worker's commit/ack ledger on its own: fake ports, a fake status block, a fake control
channel and a fake clock; no process, no shared memory."""

from types import SimpleNamespace

from supervisor.protocol import Commit
from supervisor.worker.ledger import Ledger


class FakeIn:
    def __init__(self, index, expected=0, notify_every=1 << 30, frame_len=-1):
        self.spec = SimpleNamespace(index=index)
        self.frame_len = frame_len
        self.expected = expected
        self.acked_processed = expected
        self.notify_every = notify_every
        self.dup_pending = False
        self.acks = []

    def ack(self, processed, committed):
        self.acked_processed = processed
        self.acks.append((processed, committed))


class FakeOut:
    def __init__(self, index, lossless=True):
        self.spec = SimpleNamespace(index=index)
        self.next_seq = 0
        self.committed = 0
        self.lossless = lossless


class FakeBoard:
    def __init__(self):
        self.commits = []

    def write_commit(self, position, values):
        self.commits.append((position, list(values)))


class FakeChan:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _ledger(ins=(0,), outs=(1,), snapshot=None, lossless=True, board=True, ack_every=4, is_source=False):
    clock = Clock()
    inputs = [FakeIn(i) for i in ins]
    outputs = [FakeOut(o, lossless) for o in outs]
    b, chan = (FakeBoard() if board else None), FakeChan()
    ledger = Ledger(
        inputs, outputs, chan=chan, board=b, is_source=is_source, snapshot=snapshot,
        snapshot_interval=1.0, ack_every=ack_every, clock=clock,
    )
    return ledger, inputs, outputs, b, chan, clock


def _process(ledger, outputs, edge, seq, emitted=1):
    """What the worker does per frame: outputs sent, processed, a marker, advance."""
    for o in outputs:
        o.next_seq += emitted
    ledger.processed[edge] = seq
    ledger.mark()
    ledger.advance()


def test_a_frame_commits_only_once_its_outputs_are_committed_downstream():
    ledger, (inp,), (out,), board, chan, clock = _ledger()
    _process(ledger, [out], 0, 0)
    assert ledger.committed == {0: -1} and len(ledger.markers) == 1
    out.committed = 1  # the consumer committed our output
    ledger.tick(True, clock())
    assert ledger.committed == {0: 0} and not ledger.markers
    # reported through the status block (no snapshot: no message), then acked upstream
    assert board.commits == [(0, [0, 1])]
    assert chan.sent == []
    assert inp.acks[-1] == (1, 1)
    assert ledger.reported == {0: 0}


def test_upstream_may_forget_only_what_the_supervisor_was_told():
    ledger, (inp,), (out,), board, chan, clock = _ledger(ack_every=2)
    for seq in range(4):
        _process(ledger, [out], 0, seq)
    # flow control acks say what was processed; the committed half stays at the report
    assert inp.acks and all(c == 0 for _, c in inp.acks)
    assert inp.acks[-1][0] == 4
    out.committed = 1  # the first output committed downstream
    ledger.tick(True, clock())
    assert ledger.committed == {0: 0}
    assert inp.acks[-1] == (4, 1)
    out.committed = 4
    clock.t += 0.011
    ledger.tick(True, clock())
    assert ledger.committed == {0: 3}
    assert inp.acks[-1] == (4, 4)


def test_pending_commit_points_stay_bounded_and_the_commit_keeps_moving():
    # Downstream lags one frame behind, forever: the points queue no further than two, and
    # the commit still moves (the oldest point is never replaced, so it commits).
    ledger, (inp,), (out,), board, chan, clock = _ledger()
    for seq in range(1000):
        _process(ledger, [out], 0, seq)
        assert len(ledger.markers) <= 2
        out.committed = out.next_seq - 1
        ledger.tick(True, clock())
        clock.t += 0.001
    assert 990 <= ledger.committed[0] < 999
    # Downstream commits nothing for a while: still two points, not one per frame.
    for seq in range(1000, 1100):
        _process(ledger, [out], 0, seq)
    assert len(ledger.markers) == 2
    out.committed = out.next_seq
    clock.t += 0.011
    ledger.tick(True, clock())
    assert ledger.committed == {0: 1099} and not ledger.markers
    # every reported commit is a consistent point: k frames processed <-> k outputs sent
    assert all(values[0] + 1 == values[1] for _, values in board.commits)
    assert len(board.commits) > 50


def test_commit_reports_are_batched_to_one_per_10_ms():
    ledger, (inp,), (out,), board, chan, clock = _ledger()
    for seq in range(3):
        _process(ledger, [out], 0, seq)
        out.committed = out.next_seq
        ledger.tick(True, clock())
    assert len(board.commits) == 1  # the first; the next ones wait for the 10 ms
    assert ledger.commit_dirty and ledger.committed == {0: 2}
    assert ledger.deadline(clock() + 5) == ledger.next_commit
    clock.t += 0.011
    ledger.tick(False, clock())
    assert board.commits[-1] == (0, [2, 3]) and not ledger.commit_dirty
    assert inp.acks[-1] == (3, 3)


def test_a_lossy_output_holds_no_commit_back():
    ledger, (inp,), (out,), board, chan, clock = _ledger(lossless=False)
    _process(ledger, [out], 0, 0)
    assert ledger.committed == {0: 0}  # committed at once, nothing is kept to replay


def test_a_node_with_snapshots_commits_with_them_by_message():
    states = iter(range(100))
    ledger, (inp,), (out,), board, chan, clock = _ledger(snapshot=lambda: f"state{next(states)}".encode())
    _process(ledger, [out], 0, 0)  # no snapshot due yet: no commit point either
    assert not ledger.markers and ledger.uncommitted_progress()
    assert ledger.deadline(clock() + 5) == ledger.next_snapshot
    clock.t += 1.0
    ledger.snapshot_if_due()
    out.committed = 1
    ledger.tick(True, clock())
    assert board.commits == []
    (msg,) = chan.sent
    assert isinstance(msg, Commit)
    assert (msg.in_seqs, msg.out_next, msg.snapshot, msg.final) == ({0: 0}, {1: 1}, b"state0", False)
    assert not ledger.uncommitted_progress()


def test_the_final_commit_goes_by_message_with_the_source_position():
    ledger, _, (out,), board, chan, clock = _ledger(ins=(), is_source=True)
    for _ in range(3):
        out.next_seq += 1
        ledger.source_position += 1
        ledger.mark()
        ledger.advance()
    out.committed = 3
    ledger.mark(force_snapshot=True)
    ledger.advance(force_flush=True)
    ledger.flush(final=True)
    assert board.commits[-1] == (3, [3])
    msg = chan.sent[-1]
    assert isinstance(msg, Commit) and msg.final and msg.source_position == 3 and msg.out_next == {1: 3}


def test_duplicates_are_answered_with_the_current_ack():
    ledger, (inp,), (out,), board, chan, clock = _ledger()
    _process(ledger, [out], 0, 0)
    inp.acks.clear()
    inp.dup_pending = True
    ledger.tick(False, clock())
    assert inp.acks == [(1, 0)]


def test_the_order_ring_limit_follows_the_reported_commit():
    ledger, ins, outs, board, chan, clock = _ledger(ins=(0, 1))
    ledger.limit_order(0, 4)
    assert ledger.order_limit == 4
    _process(ledger, outs, 0, 0)
    _process(ledger, outs, 1, 0)
    outs[0].committed = 2
    ledger.tick(True, clock())
    assert ledger.reported == {0: 0, 1: 0}
    assert ledger.order_limit == 2 + 4


def test_the_dispatch_ring_limit_follows_the_reported_commit():
    # outputs 1 and 2 go to the two replicas of one node: the frames sent toward them after
    # the reported commit may fill a ring of 4
    ledger, ins, (o1, o2), board, chan, clock = _ledger(outs=(1, 2))
    group = SimpleNamespace(edges=(1, 2), limit=None)
    ledger.limit_dispatch([group], 4)
    assert group.limit == 0 + 4
    o1.next_seq, o2.next_seq = 2, 1  # frame 0 made three frames: two to replica 0, one to 1
    ledger.processed[0] = 0
    ledger.mark()
    ledger.advance()
    assert group.limit == 4  # (not committed downstream yet)
    o1.committed, o2.committed = 2, 1
    ledger.tick(True, clock())
    assert ledger.reported == {0: 0} and group.limit == 3 + 4
    assert ledger.order_limit > 10**9  # (no input order ring)


def test_a_commit_of_big_input_frames_is_reported_at_once():
    # Upstream keeps the frames until it hears of the commit (a pass-through node's worker:
    # the chunks it received); big ones are reported without waiting for the interval.
    from supervisor.worker.ledger import COMMIT_REPORT_BYTES

    for frame_len, reported_at_once in ((4096, False), (COMMIT_REPORT_BYTES, True)):
        ledger, (inp,), (out,), board, chan, clock = _ledger()
        inp.frame_len = frame_len
        _process(ledger, [out], 0, 0)
        out.committed = 1
        ledger.tick(True, clock())
        assert len(board.commits) == 1  # (the first report is due at once)
        _process(ledger, [out], 0, 1)
        out.committed = 2
        ledger.tick(True, clock())
        assert len(board.commits) == (2 if reported_at_once else 1), frame_len
        clock.t += 0.011
        ledger.tick(True, clock())
        assert len(board.commits) == 2 and inp.acks[-1] == (2, 2)
