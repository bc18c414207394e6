"""Exactly-once at a fan-in node: a restarted node with several inputs re-consumes the frames
after its last commit in the order it consumed them before (the order recorded in its status
block), so it re-emits exactly the outputs it emitted before, under the same sequence numbers,
and its consumer's per-edge deduplication drops only true duplicates.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time

import pytest

from remotemedia import _ipc_bridge as bridge
from remotemedia import Group, Node, Pipeline, Supervisor
from remotemedia.frames import encode
from remotemedia.nodes import PassThroughNode
from supervisor import resources
from supervisor.channels import KIND_DATA, InPort, OutPort
from supervisor.protocol import ControlChannel, EdgeSpec, RestoreState, WorkerSpec, socketpair
from supervisor.scoreboard import Scoreboard
from supervisor.worker import Runner


class Tag(Node):
    """Emits ``(upstream node, value)``: every output names the input edge it came from."""

    def process(self, x):
        return (self.current_frame.source, x)


class Delay(Node):
    def __init__(self, delay: float, **kw):
        super().__init__(**kw)
        self.delay = delay

    def process(self, x):
        time.sleep(self.delay)
        return x


# --------------------------------------------------------------------------- the worker alone


class Log(Node):
    """Records the input edge of every frame it processes, and passes the value on."""

    def initialize(self):
        self.seen = []

    def process(self, x):
        self.seen.append(x)
        return x


def _edge(i, src, dst, depth=64):
    return EdgeSpec(
        index=i, src=src, dst=dst, data_service=f"e{i}/data", ack_service=f"e{i}/ack",
        src_inbox=f"in/{src}", dst_inbox=f"in/{dst}", depth=depth, max_borrowed=4,
    )


class Rig:
    """One fan-in worker's Runner in this process: inputs from "x" (edge 0), "y" (edge 1) and
    "z" (edge 2), its output to edge 3, whose other ends the test holds."""

    def __init__(self, tmp_path, restore=None, capacity=64, order=None, inputs=("x", "y")):
        self.prefix = f"rm_{os.getpid()}x{os.urandom(4).hex()}_"
        self.iox = bridge.Node(self.prefix, "test")
        ins = tuple(_edge(i, src, "d") for i, src in enumerate(inputs))
        out = _edge(len(ins), "d", "sink")
        spec = WorkerSpec(
            name="d", index=0, run_id="t", prefix=self.prefix, inbox="in/d", in_edges=ins, out_edges=(out,),
            is_source=False, scoreboard=str(tmp_path / "d.board"), spin_us=0,
        )
        assert spec.records_order
        board = Scoreboard(spec.scoreboard, create=True, commit_slots=len(ins) + 1, order_slots=capacity)
        board.reset()
        restore = restore or RestoreState()
        if order:  # what the supervisor does before a restart
            restore.order = order
            board.write_order(restore.consumed(ins), order)
        self.board = board
        self.sup, child = socketpair()
        self.node = Log(name="d")
        self.node.initialize()
        self.runner = Runner(self.node, spec, ControlChannel(child), restore)
        self.producers = [OutPort(self.iox, e) for e in ins]
        self.sink = InPort(self.iox, out)

    def send(self, edge, values, start=0):
        p = self.producers[edge]
        p.next_seq = start
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

    def close(self):
        self.runner.close()
        for p in self.producers:
            p.close()
        self.sink.close()
        self.sup.close()
        self.board.close()
        del self.iox
        assert resources.purge(self.prefix) == []


def test_restart_consumes_replayed_frames_in_the_recorded_order(tmp_path):
    # Committed: x up to seq 1, y up to seq 0 (3 frames); then it consumed y, y, x, y, x, x.
    restore = RestoreState(in_seqs={0: 1, 1: 0})
    rig = Rig(tmp_path, restore, order=[1, 1, 0, 1, 0, 0])
    try:
        # Every frame of x is there first: round robin would take x now, the order says y.
        rig.send(0, [f"x{i}" for i in range(10)])
        assert rig.drain(1, budget=0.3) == []
        rig.send(1, [f"y{i}" for i in range(10)])
        seen = rig.drain(6)
        assert seen == ["y1", "y2", "x2", "y3", "x3", "x4"]
        # the order is used up: round robin again (both have frames ready)
        seen = rig.drain(10)
        assert seen[6:] in (["y4", "x5", "y5", "x6"], ["x5", "y4", "x6", "y5"])
        # the status block holds the order of every frame after the commit (3 frames)
        assert rig.board.read_order(3) == [1, 1, 0, 1, 0, 0] + [0 if v[0] == "x" else 1 for v in seen[6:]]
    finally:
        rig.close()


def test_order_ring_bounds_how_far_consumption_runs_ahead_of_the_commit(tmp_path):
    rig = Rig(tmp_path, capacity=4)
    try:
        rig.send(0, [f"x{i}" for i in range(10)])
        rig.send(1, [f"y{i}" for i in range(10)])
        # The sink takes nothing, so nothing commits: four frames fill the ring.
        assert len(rig.drain(20, budget=0.5)) == 4
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
            assert len(rig.board.read_order(committed)) <= 4
        assert sorted(rig.node.seen) == sorted([f"x{i}" for i in range(10)] + [f"y{i}" for i in range(10)])
    finally:
        rig.close()


def _count(outputs, expected):
    got = collections.Counter(outputs)
    lost = sum(1 for k in expected if got[k] == 0)
    dup = sum(n - 1 for n in got.values() if n > 1)
    extra = sum(n for k, n in got.items() if k not in expected)
    return lost, dup, extra


def _chaos(pipeline, victim, n, expected, capsys, period=(0.05, 0.3), min_kills=3):
    sup = Supervisor(pipeline, max_restarts=10_000, backoff_base=0.01, backoff_max=0.05)
    sup.start()
    kills = []
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "4321")))

    def killer():
        while sup.running:
            # a kill once it runs again (a kill while it starts tests less)
            if sup.states().get(victim) != "RUNNING":
                time.sleep(0.01)
                continue
            time.sleep(rng.uniform(*period))
            pid = sup.worker_pids().get(victim)
            if not pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append(time.monotonic())
            except ProcessLookupError:
                pass

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = sup.run(range(n))
    t.join(5)
    lost, dup, extra = _count(report.outputs, expected)
    restarts = report.nodes[victim]["restarts"]
    with capsys.disabled():
        print(f"\nfan-in chaos: {len(kills)} SIGKILLs of {victim}, {restarts} restarts, "
              f"{len(report.outputs)} outputs of {len(expected)}: {lost} lost, {dup} duplicated, {extra} unexpected")
    assert (lost, dup, extra) == (0, 0, 0)
    assert len(kills) >= min_kills, "the run was too short to kill anything"


def test_fanin_chaos_exactly_once(capsys):
    n = 3000
    p = Pipeline(
        [PassThroughNode(name="b"), PassThroughNode(name="c"), Delay(0.0005, name="slow"), Tag(name="d")],
        connections=[("b", "slow"), ("slow", "d"), ("c", "d")],
    )
    _chaos(p, "d", n, {(src, x) for x in range(n) for src in ("slow", "c")}, capsys)
