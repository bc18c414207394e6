"""Exactly-once at a fan-in node: a restarted node with several inputs re-consumes the frames
after its last commit in the order it consumed them before (the order recorded in its status
block), so it re-emits exactly the outputs it emitted before, under the same sequence numbers,
and its consumer's per-edge deduplication drops only true duplicates.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import signal
import threading
import time

import pytest

from remotemedia import _ipc_bridge as bridge
from remotemedia import Group, Node, Pipeline, Supervisor
from remotemedia.frames import encode
from remotemedia.nodes import PassThroughNode, RangeSource
from supervisor import resources
from supervisor.channels import KIND_DATA, KIND_EOS, InPort, OutPort
from supervisor.protocol import Acked, ControlChannel, EdgeSpec, RestoreState, Setup, WorkerSpec, socketpair
from supervisor.scoreboard import Scoreboard
from supervisor.worker import Runner, await_setup


class Tag(Node):
    """Emits ``(upstream node, value)``: every output names the input edge it came from. With
    ``poison``, dies (hard) on every frame ``poison`` = (upstream node, value)."""

    def __init__(self, delay: float = 0.0, poison=None, **kw):
        super().__init__(**kw)
        self.delay, self.poison = delay, poison

    def process(self, x):
        out = (self.current_frame.source, x)
        if out == self.poison:
            os._exit(1)
        if self.delay:
            time.sleep(self.delay)
        return out


class Numbered(Node):
    """Stateful: appends a running count to every value (kept across restarts by snapshots).
    Replayed in another order, the counts would go to other frames."""

    def initialize(self):
        self.n = 0

    def process(self, x):
        self.n += 1
        return (*x, self.n - 1)

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n = state


class Delay(Node):
    def __init__(self, delay: float, **kw):
        super().__init__(**kw)
        self.delay = delay

    def process(self, x):
        time.sleep(self.delay)
        return x


# --------------------------------------------------------------------------- the worker alone


class Log(Node):
    """Records every value it processes, and passes it on."""

    def initialize(self):
        self.seen = []

    def process(self, x):
        self.seen.append(x)
        return x


class StatefulLog(Log):
    def snapshot(self):
        return len(self.seen)

    def restore(self, state):
        pass


def _edge(i, src, dst, depth=64):
    return EdgeSpec(
        index=i, src=src, dst=dst, data_service=f"e{i}/data", ack_service=f"e{i}/ack",
        src_inbox=f"in/{src}", dst_inbox=f"in/{dst}", depth=depth, max_borrowed=4,
    )


class Rig:
    """One fan-in worker's Runner in this process, with inputs from ``inputs`` (edges 0, 1,
    ...) and one output: the test holds the other ends and steps the worker itself. With
    ``order``, it is a restart with that recorded order (edge indices)."""

    def __init__(self, tmp_path, restore=None, capacity=64, order=None, inputs=("x", "y"), node=None):
        self.run = resources.new_run()
        self.prefix = self.run.prefix
        self.iox = bridge.Node(self.prefix, "test", self.run.root)
        ins = tuple(_edge(i, src, "d") for i, src in enumerate(inputs))
        out = _edge(len(ins), "d", "sink")
        spec = WorkerSpec(
            name="d", index=0, run_id=self.run.run_id, prefix=self.prefix, root=self.run.root, inbox="in/d",
            in_edges=ins, out_edges=(out,), is_source=False, spin_us=0, snapshot_interval=3600.0,
        )
        assert spec.records_order
        board = Scoreboard.create(commit_slots=len(ins) + 1, order_slots=capacity)
        spec = dataclasses.replace(spec, scoreboard_fd=os.dup(board.fd))  # the worker maps its own
        board.reset()
        restore = restore or RestoreState()
        if order:  # what the supervisor does before a restart
            restore.order = order
            board.write_order(restore.consumed(ins), order)
        self.board = board
        self.sup, child = socketpair()
        self.node = node or Log(name="d")
        self.node.initialize()
        self.runner = Runner(self.node, spec, ControlChannel(child), restore)
        self.producers = [OutPort(self.iox, e) for e in ins]
        self.sink = InPort(self.iox, out)

    def send(self, edge, values):
        """Send ``values`` as the frames 0, 1, ... of ``edge`` (the worker drops those it
        committed before)."""
        p = self.producers[edge]
        for v in values:
            meta, bufs = encode(v)
            p.send(KIND_DATA, meta, bufs)

    def drain(self, until, budget=5.0):
        """Step the worker until the node has processed ``until`` frames or nothing moves."""
        deadline = time.monotonic() + budget
        idle = 0
        while len(self.node.seen) < until and time.monotonic() < deadline:
            if self.runner.step():
                idle = 0
                continue
            self.runner.pump()
            idle += 1
            if idle > 50:
                break
            time.sleep(0.002)
        return self.node.seen

    def waits_idle(self, timeout=0.3):
        """True when the worker's wait sleeps until ``timeout`` (rather than spinning on
        frames it may not take), once the wake-ups already pending are consumed."""
        self.runner.spec = dataclasses.replace(self.runner.spec, spin_us=50)
        try:
            self.runner.wait(0.01)
            t = time.monotonic()
            self.runner.wait(timeout)
            return time.monotonic() - t >= timeout * 0.8
        finally:
            self.runner.spec = dataclasses.replace(self.runner.spec, spin_us=0)

    def close(self):
        self.runner.close()
        for p in self.producers:
            p.close()
        self.sink.close()
        self.sup.close()
        self.board.close()
        del self.iox
        assert resources.purge(self.run.root) == []


def test_restart_consumes_replayed_frames_in_the_recorded_order(tmp_path):
    # Committed: x up to seq 1, y up to seq 0 (3 frames); then it consumed y, y, x, y, x, x.
    restore = RestoreState(in_seqs={0: 1, 1: 0})
    rig = Rig(tmp_path, restore, order=[1, 1, 0, 1, 0, 0])
    try:
        # Every frame of x is there first: round robin would take x now, the order says y.
        rig.send(0, [f"x{i}" for i in range(10)])
        assert rig.drain(1, budget=0.3) == []
        assert rig.waits_idle()  # (the frames of x are no reason to wake up)
        rig.send(1, [f"y{i}" for i in range(10)])
        assert rig.drain(2) == ["y1", "y2"]
        # killed now, its successor would still get the whole order
        assert rig.board.read_order(3) == [1, 1, 0, 1, 0, 0]
        seen = rig.drain(6)
        assert seen == ["y1", "y2", "x2", "y3", "x3", "x4"]
        # the order is used up: round robin again (both have frames ready)
        seen = rig.drain(10)
        assert seen[6:] in (["y4", "x5", "y5", "x6"], ["x5", "y4", "x6", "y5"])
        # the status block holds the order of every frame after the commit (3 frames)
        assert rig.board.read_order(3) == [1, 1, 0, 1, 0, 0] + [0 if v[0] == "x" else 1 for v in seen[6:]]
    finally:
        rig.close()


def test_an_ack_read_with_setup_reaches_the_restarted_worker(tmp_path):
    # A producer restarted after its end of stream was sent, and its consumer's final commit
    # (relayed once, as Acked) came while it was starting: the Acked shares a read with
    # Setup. Dropped, the producer waited in finish() for that ack forever (the consumer
    # has exited), and the run never ended.
    rig = Rig(tmp_path)
    sup, child = socketpair()
    try:
        out = rig.runner.outputs[0]
        sup_chan, worker_chan = ControlChannel(sup), ControlChannel(child)
        sup_chan.send(Setup(rig.runner.spec, None))
        sup_chan.send(Acked(out.spec.index, 1, 1))
        time.sleep(0.05)  # (both in one read)
        setup, early = await_setup(worker_chan)
        assert isinstance(setup, Setup)
        assert [type(m) for m in early] == [Acked]
        out.send(KIND_EOS, b"", [])
        assert not out.fully_acked
        rig.runner.handle_control(early)
        assert out.fully_acked
    finally:
        sup.close()
        child.close()
        rig.close()


@pytest.mark.slow
@pytest.mark.parametrize("snapshots", [False, True], ids=["commit-per-frame", "commit-by-snapshot"])
def test_order_ring_bounds_how_far_consumption_runs_ahead_of_the_commit(tmp_path, snapshots):
    # (a node with snapshots commits only with one: a full ring takes one early)
    rig = Rig(tmp_path, capacity=4, node=StatefulLog(name="d") if snapshots else None)
    try:
        rig.send(0, [f"x{i}" for i in range(10)])
        rig.send(1, [f"y{i}" for i in range(10)])
        # The sink takes nothing, so nothing commits: four frames fill the ring.
        assert len(rig.drain(20, budget=0.5)) == 4
        assert rig.waits_idle()
        assert len(rig.board.read_order(0)) == 4
        # As the sink commits what it gets, the worker goes on, never more than 4 ahead.
        deadline = time.monotonic() + 10
        taken = 0
        while len(rig.node.seen) < 20 and time.monotonic() < deadline:
            while rig.sink.receive() is not None:
                taken += 1
            rig.sink.ack(taken, taken)
            rig.drain(20, budget=0.05)
            committed = sum(rig.runner.reported.values()) + 2
            assert len(rig.node.seen) - committed <= 4
        assert sorted(rig.node.seen) == sorted([f"x{i}" for i in range(10)] + [f"y{i}" for i in range(10)])
    finally:
        rig.close()


def _count(outputs, expected):
    got = collections.Counter(tuple(o[:2]) for o in outputs)
    lost = sum(1 for k in expected if got[k] == 0)
    dup = sum(n - 1 for n in got.values() if n > 1)
    extra = sum(n for k, n in got.items() if k not in expected)
    return lost, dup, extra


def _chaos(pipeline, victims, n, expected, capsys, period=(0.05, 0.3), min_kills=3, max_kills=15, pace=0.0):
    """Run ``range(n)`` through ``pipeline`` while SIGKILLing one of ``victims`` (at random,
    each once it runs again) every ``period`` seconds, ``max_kills`` times at most (on a busy
    host restarts are slow); with ``expected``, check every one arrived exactly once. Returns
    the outputs. ``pace``: seconds the caller sleeps between inputs, so that a run whose
    frames are mostly dropped still lasts long enough to be killed in."""
    sup = Supervisor(pipeline, max_restarts=10_000, backoff_base=0.01, backoff_max=0.05)
    sup.start()
    kills = collections.Counter()
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "4321")))

    def killer():
        while sup.running and sum(kills.values()) < max_kills:
            victim = rng.choice(victims)
            # a kill once it runs again (a kill while it starts tests less)
            while sup.running and sup.states().get(victim) != "RUNNING":
                time.sleep(0.01)
            time.sleep(rng.uniform(*period))
            pid = sup.worker_pids().get(victim)
            if not pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                kills[victim] += 1
            except ProcessLookupError:
                pass

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    def paced():
        for x in range(n):
            time.sleep(pace)
            yield x

    report = sup.run(None if n is None else paced() if pace else range(n))
    t.join(5)
    restarts = {v: report.nodes[v]["restarts"] for v in sorted(set(victims))}
    line = f"\nfan-in chaos: {sum(kills.values())} SIGKILLs {dict(kills)}, restarts {restarts}, {len(report.outputs)} outputs"
    if expected is not None:
        lost, dup, extra = _count(report.outputs, expected)
        line += f" of {len(expected)}: {lost} lost, {dup} duplicated, {extra} unexpected"
    with capsys.disabled():
        print(line)
    if expected is not None:
        assert (lost, dup, extra) == (0, 0, 0)
    assert sum(kills.values()) >= min_kills, "the run was too short to kill anything"
    return report.outputs


@pytest.mark.slow
def test_fanin_chaos_exactly_once(capsys):
    # input -> b, input -> c, b -> d, c -> d; b is the slower branch
    n = 3000
    p = Pipeline(
        [Delay(0.0005, name="b"), PassThroughNode(name="c"), Tag(name="d")],
        connections=[("b", "d"), ("c", "d")],
    )
    _chaos(p, ["d"], n, {(src, x) for x in range(n) for src in ("b", "c")}, capsys)


@pytest.mark.slow
def test_fanin_chaos_three_inputs_into_a_stateful_group(capsys):
    # Three inputs into one worker (a Group whose last member keeps state by snapshots), and
    # its inputs' producers are killed too.
    n = 1000
    p = Pipeline(
        [PassThroughNode(name="b"), PassThroughNode(name="c"), Delay(0.0005, name="e"),
         Group([Tag(name="tag"), Numbered(name="num")], name="g", options={"snapshot_interval": 0.05})],
        connections=[("b", "g"), ("c", "g"), ("e", "g")],
    )
    expected = {(src, x) for x in range(n) for src in ("b", "c", "e")}
    outputs = _chaos(p, ["g", "g", "b", "e"], n, expected, capsys, max_kills=12)
    assert sorted(o[2] for o in outputs) == list(range(3 * n))  # each count once: same order


@pytest.mark.slow
def test_fanin_chaos_one_input_ends_first(capsys):
    # Two sources: one ends (end of stream on that edge) while the other still flows.
    p = Pipeline(
        [RangeSource(500, name="short"), RangeSource(1200, name="long"), Tag(0.001, name="d")],
        connections=[("short", "d"), ("long", "d")],
    )
    expected = {("short", x) for x in range(500)} | {("long", x) for x in range(1200)}
    _chaos(p, ["d"], None, expected, capsys, max_kills=6)


@pytest.mark.slow
def test_poison_frame_at_fanin_is_dead_lettered_and_the_rest_arrives_once():
    n = 300
    p = Pipeline(
        [PassThroughNode(name="b"), PassThroughNode(name="c"), Tag(poison=("c", 120), name="d")],
        connections=[("b", "d"), ("c", "d")],
    )
    report = Supervisor(p, max_restarts=100, backoff_base=0.01, backoff_max=0.05).run(range(n))
    expected = {(src, x) for x in range(n) for src in ("b", "c")} - {("c", 120)}
    assert _count(report.outputs, expected) == (0, 0, 0)
    assert report.nodes["d"]["dead_letters"] == 1


@pytest.mark.slow
def test_lossy_fanin_survives_kills_without_hanging(capsys):
    # drop_oldest inputs keep nothing to replay: no order is recorded and nothing is
    # promised but that the run ends, without a duplicate of what it delivered.
    n = 2000
    p = Pipeline(
        [PassThroughNode(name="b"), PassThroughNode(name="c"),
         Tag(0.0005, name="d", options={"queue_policy": "drop_oldest", "queue_depth": 8})],
        connections=[("b", "d"), ("c", "d")],
    )
    outputs = _chaos(p, ["d"], n, None, capsys, min_kills=1, pace=0.0005)
    assert set(outputs) <= {(src, x) for x in range(n) for src in ("b", "c")}
