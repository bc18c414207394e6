"""Replicas: ``Node(..., options={"replicas": N})`` runs N workers of one node; its upstream
sends each frame to the least-loaded one, its downstream gets their outputs back in input order, and
exactly-once holds across the crash of a replica, of the upstream and of the downstream."""

from __future__ import annotations

import collections
import os
import random
import signal
import sys
import threading
import time

import pytest

from remotemedia import Node, Pipeline, Supervisor
from remotemedia.errors import OptionValueError, PipelineValidationError
from remotemedia.nodes import PassThroughNode, RangeSource


class Tagged(Node):
    """``(pid, x)``: which worker processed each frame."""

    def process(self, x):
        return (os.getpid(), x)


class Varied(Node):
    """0, 1 or 3 outputs per input (a generator for several), and a flush() output."""

    def process(self, x):
        if x % 3 == 1:
            return None
        if x % 3 == 2:
            return x
        return (x * 10 + j for j in range(3))

    def flush(self):
        return "flushed"


class Slowish(Node):
    def __init__(self, delay: float = 0.001, **kw):
        super().__init__(**kw)
        self.delay = delay

    def process(self, x):
        time.sleep(self.delay)
        return x


class Seen(Node):
    """``(n, x)``: ``n`` counts the frames this node consumed (kept across its restarts by
    snapshots), so the outputs sorted by ``n`` are the order the node consumed them in (the
    caller's RunReport sorts outputs by input, whatever order they came in)."""

    def initialize(self):
        self.n = 0

    def process(self, x):
        self.n += 1
        return (self.n - 1, x)

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n = state


def _consumed(outputs):
    """The values in the order Seen consumed them; every count once."""
    outputs = sorted(outputs, key=lambda t: t[0])
    assert [n for n, _ in outputs] == list(range(len(outputs)))
    return [x for _, x in outputs]


class Picky(Node):
    """Raises on multiples of 7; dies (hard) on ``poison``."""

    def __init__(self, poison: int = -1, **kw):
        super().__init__(**kw)
        self.poison = poison

    def process(self, x):
        if x == self.poison:
            os._exit(1)
        if x % 7 == 0:
            raise ValueError(x)
        return x


class Counting(Node):
    def initialize(self):
        self.n = 0

    def process(self, x):
        self.n += 1
        return x

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n = state


def _varied_expected(n):
    out = []
    for x in range(n):
        if x % 3 == 2:
            out.append(x)
        elif x % 3 == 0:
            out.extend(x * 10 + j for j in range(3))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 3])
def test_outputs_leave_in_input_order_and_every_replica_works(replicas):
    n = 300
    p = Pipeline([RangeSource(n, name="src"), Tagged(name="x", options={"replicas": replicas}), Seen(name="d")])
    report = Supervisor(p).run()
    consumed = _consumed(report.outputs)
    assert [v for _, v in consumed] == list(range(n))
    assert len({pid for pid, _ in consumed}) == replicas  # each replica is its own process
    names = [f"x[{i}]" for i in range(replicas)]
    assert set(names) <= set(report.nodes) and "x" not in report.nodes
    assert sum(report.nodes[w]["frames_in"] for w in names) == n


@pytest.mark.slow
def test_zero_or_several_outputs_per_input_and_flush():
    n = 100
    p = Pipeline([RangeSource(n, name="src"), Varied(name="x", options={"replicas": 2}), Seen(name="d")])
    out = _consumed(Supervisor(p).run().outputs)
    # every input's outputs in input order, then each replica's flush() output
    assert out == _varied_expected(n) + ["flushed", "flushed"]


class Add(Node):
    def __init__(self, n: int, **kw):
        super().__init__(**kw)
        self.n = n

    def process(self, x):
        return x + self.n


@pytest.mark.slow
def test_reload_replaces_every_replica_and_a_changed_count_is_refused():
    from remotemedia.errors import ReloadError

    def pipeline(n, replicas=2):
        return Pipeline([PassThroughNode(name="u"), Add(n, name="x", options={"replicas": replicas}), PassThroughNode(name="d")])

    with Supervisor(pipeline(0)) as sup:
        sup.send(1)
        assert sup.recv(timeout=30) == 1
        assert sup.reload(pipeline(100)) == ["x[0]", "x[1]"]
        sup.send(2)
        sup.send(3)
        assert [sup.recv(timeout=30), sup.recv(timeout=30)] == [102, 103]
        with pytest.raises(ReloadError, match="replicas 2 -> 3"):
            sup.reload(pipeline(100, replicas=3))
        sup.close()


@pytest.mark.slow
def test_a_frame_a_replica_skips_or_dead_letters_does_not_stall_the_merge():
    # on_error="skip": process() raised, no output; a poison frame (its replica dies on it
    # until it is dead-lettered): no output either; the merge goes on past both.
    n = 60
    p = Pipeline(
        [RangeSource(n, name="src"), Picky(poison=30, name="x", options={"replicas": 2, "on_error": "skip"}), Seen(name="d")]
    )
    report = Supervisor(p, backoff_base=0.01, poison_threshold=2).run()
    assert _consumed(report.outputs) == [x for x in range(n) if x % 7 and x != 30]
    assert report.nodes["x[0]"]["dead_letters"] + report.nodes["x[1]"]["dead_letters"] == 1


@pytest.mark.slow
def test_status_names_the_replicas():
    p = Pipeline([RangeSource(10**9, name="src"), Slowish(0.001, name="x", options={"replicas": 2}), PassThroughNode(name="d")])
    with Supervisor(p) as sup:
        nodes = sup.status()["nodes"]
        assert {"src", "x[0]", "x[1]", "d"} <= set(nodes) and "x" not in nodes
        assert [i["from"] for i in nodes["d"]["inputs"]] == ["x[0]", "x[1]"]
        assert [i["from"] for i in nodes["x[1]"]["inputs"]] == ["src"]
        sup.stop()


@pytest.mark.slow
def test_restart_node_replaces_every_replica_at_a_commit_point():
    n = 1500
    p = Pipeline([RangeSource(n, name="src"), Slowish(0.0005, name="x", options={"replicas": 2}), Seen(name="d")])
    with Supervisor(p) as sup:
        starts = {w: sup.workers[w].starts for w in ("x[0]", "x[1]")}
        out = []
        for v in sup:
            out.append(v)
            if len(out) == 200:
                sup.restart_node("x", timeout=60)  # (by the node's name: both replicas)
        assert all(sup.workers[w].starts == starts[w] + 1 for w in starts)
    assert _consumed(out) == list(range(n))


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [2, 3])
def test_the_caller_deals_inputs_to_replicas_and_gets_outputs_in_input_order(replicas):
    # input -> x[0..N-1] -> output: the gateway deals and merges
    n = 100
    p = Pipeline([Varied(name="x", options={"replicas": replicas})])
    with Supervisor(p) as sup:
        for x in range(n):
            sup.send(x)
        sup.close()
        out = list(sup)  # (as they arrive: no sorting by input)
        assert sup.join(60)
        assert sum(sup.report().nodes[f"x[{i}]"]["frames_in"] for i in range(replicas)) == n
    assert out == _varied_expected(n) + ["flushed"] * replicas


@pytest.mark.slow
def test_replicas_fed_by_the_caller_killed_mid_stream():
    p = Pipeline([Slowish(0.0005, name="x", options={"replicas": 2})])
    _chaos(p, ["x[0]", "x[1]"], 2000, key=None)


@pytest.mark.slow
@pytest.mark.parametrize("merge", [Seen, PassThroughNode])  # (commits by message / in the status block)
def test_one_request_at_a_time_through_a_restarted_merge(merge):
    # After d's crash, the next input (one replica gets it, the other gets nothing) must come
    # out: d knows which frame is next from its commit, it does not wait for every replica.
    p = Pipeline([PassThroughNode(name="u"), Slowish(0.0005, name="x", options={"replicas": 2}), merge(name="d")])
    with Supervisor(p, backoff_base=0.01) as sup:
        for x in range(5):
            sup.send(x)
            assert sup.recv(timeout=30) in ((x, x), x)
        pid = sup.worker_pids()["d"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (sup.states().get("d") == "RUNNING" and sup.worker_pids()["d"] not in (None, pid)):
            assert time.monotonic() < deadline, "d was not restarted"
            time.sleep(0.01)
        for x in range(5, 8):
            sup.send(x)
            assert sup.recv(timeout=30) in ((x, x), x)
        sup.close()
        assert list(sup) == []


def _chaos(pipeline, victims, n, min_kills=3, max_kills=8, period=(0.05, 0.25), key=_consumed, in_turn=False):
    """Run ``range(n)`` through ``pipeline`` while SIGKILLing one of ``victims`` (at random,
    or ``in_turn``) every ``period`` seconds; every output must arrive once, in input order
    (``key``: the values in the order they were consumed, from the outputs; None: the outputs
    are the values, in the order the caller got them)."""
    sup = Supervisor(pipeline, max_restarts=10_000, backoff_base=0.01, backoff_max=0.05)
    sup.start()
    kills = collections.Counter()
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "1616")))

    def killer():
        turn = 0
        while sup.running and sum(kills.values()) < max_kills:
            victim = victims[turn % len(victims)] if in_turn else rng.choice(victims)
            turn += 1
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

    def feed():
        for x in range(n):
            sup.send(x)
        sup.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        outputs = list(sup)  # (in the order they came)
        feeder.join(30)
        t.join(5)
        values = [x for _, x in outputs] if key is not None else outputs
        got = collections.Counter(values)
        lost = sum(1 for x in range(n) if got[x] == 0)
        dup = sum(c - 1 for c in got.values() if c > 1)
        print(f"\nreplica chaos: {sum(kills.values())} SIGKILLs {dict(kills)}: {lost} lost, {dup} duplicated")
        # (what did not finish, should it not: seen once in a full run on a loaded machine,
        # every output delivered but one worker never exiting)
        assert sup.join(60), f"the run did not end after its last output: {_unfinished(sup)}"
    finally:
        if sup.running:  # (a failure must not leave a run restarting workers under later tests)
            sup.kill()
            sup.join(30)
    assert (lost, dup) == (0, 0)
    assert (key(outputs) if key is not None else outputs) == list(range(n))  # in input order
    assert sum(kills.values()) >= min_kills, "the run was too short to kill anything"


def _unfinished(sup) -> dict:
    """The workers of a run that has not ended, with where they are (and their Python stacks
    when py-spy is installed, as in the dev extra)."""
    import shutil
    import subprocess

    st = sup.status()
    keys = ("state", "pid", "restarts", "frames_in", "frames_out", "inputs")
    out = {n: {k: w.get(k) for k in keys} for n, w in st["nodes"].items() if w.get("state") != "EXITED"}
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable))
    for w in out.values():
        if spy and w["pid"]:
            r = subprocess.run([spy, "dump", "--pid", str(w["pid"])], capture_output=True, text=True, timeout=30)
            w["stack"] = r.stdout or r.stderr
    return out


def _chain(replicas=2):
    # input -> u -> x[0..N-1] -> d -> output
    return Pipeline([PassThroughNode(name="u"), Slowish(0.0005, name="x", options={"replicas": replicas}), Seen(name="d")])


@pytest.mark.slow
def test_replica_killed_mid_stream_nothing_lost_or_duplicated_in_order():
    _chaos(_chain(), ["x[0]", "x[1]"], 2000)


@pytest.mark.slow
def test_upstream_and_downstream_killed_mid_stream_nothing_lost_or_duplicated_in_order():
    # u deals the frames (its choices are replayed after its restart); d merges them (its
    # commits hold the next frame's number)
    _chaos(_chain(3), ["u", "d"], 2000)


def test_replicas_option_is_validated():
    with pytest.raises(OptionValueError, match="replicas must be a positive int, got 0"):
        Pipeline([RangeSource(3, name="src"), PassThroughNode(name="x", options={"replicas": 0}), PassThroughNode(name="d")])
    with pytest.raises(OptionValueError, match="replicas"):
        Pipeline([RangeSource(3, name="src"), PassThroughNode(name="x", options={"replicas": 1.5}), PassThroughNode(name="d")])


def test_stateful_node_refuses_replicas():
    with pytest.raises(PipelineValidationError, match=r"node 'x' has replicas=2, but it keeps state \(it has snapshot\(\)"):
        Pipeline([RangeSource(3, name="src"), Counting(name="x", options={"replicas": 2}), PassThroughNode(name="d")])


@pytest.mark.parametrize(
    "nodes, connections, message",
    [
        ([RangeSource(3, name="x", options={"replicas": 2}), PassThroughNode(name="d")], None, "it is a Source"),
        (
            [PassThroughNode(name="u", options={"replicas": 2}), PassThroughNode(name="x", options={"replicas": 2})],
            None,
            "needs exactly one upstream node, itself without replicas",
        ),
        (
            [RangeSource(3, name="s"), RangeSource(3, name="t"), PassThroughNode(name="x", options={"replicas": 2}), PassThroughNode(name="d")],
            [("s", "x"), ("t", "x"), ("x", "d")],
            "needs exactly one upstream node",
        ),
        (
            [RangeSource(3, name="s"), PassThroughNode(name="x", options={"replicas": 2}), PassThroughNode(name="d")],
            [("s", "x"), ("x", "d"), ("s", "d")],
            "its downstream node 'd' has other inputs too",
        ),
        (
            [RangeSource(3, name="s"), PassThroughNode(name="x", options={"replicas": 2}), PassThroughNode(name="d", options={"queue_policy": "latest"})],
            None,
            "node 'd' has queue_policy='latest'",
        ),
    ],
)
def test_graphs_replicas_do_not_fit_are_refused(nodes, connections, message):
    with pytest.raises(PipelineValidationError, match=message):
        Pipeline(nodes, connections=connections)


def test_manifest_node_takes_the_option():
    manifest = {
        "version": "v1",
        "nodes": [
            {"id": "src", "node_type": "RangeSource", "params": {"stop": 3}},
            {"id": "x", "node_type": "PassThroughNode", "params": {}, "options": {"replicas": 3}},
            {"id": "d", "node_type": "PassThroughNode", "params": {}},
        ],
    }
    p = Pipeline(manifest)
    assert p.replicas("x") == 3 and p.replicas("d") == 1
    sup = Supervisor(p)
    assert sup.worker_names("x") == ["x[0]", "x[1]", "x[2]"] and sup.worker_names("d") == ["d"]
    edges, nodes = sup._build({n.name: b"" for n in p.nodes})
    assert [spec.name for spec, _, _ in nodes] == ["src", "x[0]", "x[1]", "x[2]", "d"]
    assert [(e.src, e.dst, e.replica) for e in edges] == [
        ("src", "x[0]", 0), ("src", "x[1]", 1), ("src", "x[2]", 2),
        ("x[0]", "d", 0), ("x[1]", "d", 1), ("x[2]", "d", 2), ("d", "__output__", -1),
    ]  # fmt: skip
    manifest["nodes"][1]["options"]["replicas"] = -1
    with pytest.raises(OptionValueError, match="replicas"):
        Pipeline(manifest)


# ------------------------------------------------------------------ least-loaded dispatch


class _Port:
    """What Dispatch reads of an OutPort."""

    def __init__(self, index, in_flight=0, room=True):
        self.spec = type("Spec", (), {"index": index})()
        self.next_seq = 0
        self.in_flight = in_flight
        self.room = room

    def can_send(self):
        return self.room


def test_dispatch_picks_the_replica_with_fewest_frames_in_flight_and_replays_recorded_choices():
    from supervisor.worker.replicas import Dispatch

    ports = [_Port(7, in_flight=3), _Port(8, in_flight=1), _Port(9, in_flight=1)]
    d = Dispatch("x", ports)
    recorded = []
    d.record = lambda k, i: recorded.append((k, i))
    assert d.choose() == 1  # the fewest in flight, the lowest index among equals
    ports[1].room = False
    assert d.choose() == 2  # (only those with room)
    assert d.sent(2) == (ports[2], 0) and recorded == [(0, 2)]
    for p in ports:
        p.room = False
    assert d.choose() == -1 and d.waits_on() == ports  # (any of them may free up first)
    # A restarted upstream: frames 1 and 2 go where its predecessor sent them, unrecorded
    # (the ring has them), whatever the loads say now.
    d.replay, d.replay_from = [0, 0], 1
    assert d.choose() == -1 and d.waits_on() == [ports[0]]
    ports[0].room = True
    assert d.sent(d.choose()) == (ports[0], 1) and d.sent(d.choose()) == (ports[0], 2)
    for p in ports:
        p.room = True
    assert d.choose() == 1 and d.sent(1) == (ports[1], 3)
    assert recorded == [(0, 2), (3, 1)]


def test_the_callers_merge_releases_outputs_in_input_order_whatever_replica_had_them():
    from supervisor.worker.replicas import END, FLUSH, LAST, MORE, Reorder

    r = Reorder(2)
    r.put(1, 0, LAST, "a")  # frames 0, 1 and 3 went to replica 1, frame 2 to replica 0
    r.put(1, 1, MORE, "b1")
    assert r.release() == ["a", "b1"]  # (1 is not over yet; replica 0 may still send)
    r.put(0, 2, END, None)
    r.put(1, 1, LAST, "b2")
    r.put(1, 3, LAST, "d")
    r.put(1, -1, FLUSH, "flushed 1")
    assert r.release() == ["b2", "d"]  # (replica 0 has not ended: 4 may still come)
    r.put(0, -1, FLUSH, "flushed 0")
    r.end(0)
    r.end(1)
    assert r.release() == ["flushed 0", "flushed 1"]


@pytest.mark.slow
def test_a_stopped_replica_gets_no_frames_the_others_take_them():
    # x[0] is SIGSTOPped before the first frame: least-loaded sends the frames to x[1] while
    # x[0]'s window (4) is full; round-robin would stall on x[0] after 4 frames (x[1] would
    # take 4 too). x[1] runs ahead as far as d's queue (128) holds its outputs (they leave in
    # input order, and frame 0 is x[0]'s). After SIGCONT every frame comes out once, in order.
    n = 300
    p = Pipeline(
        [
            PassThroughNode(name="u"),
            Tagged(name="x", options={"replicas": 2, "queue_depth": 4}),
            Seen(name="d", options={"queue_depth": 128}),
        ]
    )
    with Supervisor(p, heartbeat_timeout=600) as sup:
        stopped = sup.worker_pids()["x[0]"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            feeder = threading.Thread(target=lambda: [sup.send(x, timeout=120) for x in range(n)], daemon=True)
            feeder.start()
            deadline = time.monotonic() + 60
            while sup.status()["nodes"]["x[1]"]["frames_in"] < 100:
                assert time.monotonic() < deadline, f"x[1] took {sup.status()['nodes']['x[1]']['frames_in']} frames only"
                time.sleep(0.02)
            assert sup.status()["nodes"]["x[0]"]["frames_in"] == 0
        finally:
            os.kill(stopped, signal.SIGCONT)
        feeder.join(120)
        sup.close()
        outputs = list(sup)
        assert sup.join(60)
        nodes = sup.report().nodes
    consumed = _consumed(outputs)
    assert [x for _, x in consumed] == list(range(n))
    by_pid = collections.Counter(pid for pid, _ in consumed)
    assert by_pid[stopped] == nodes["x[0]"]["frames_in"] > 0 and nodes["x[1]"]["frames_in"] >= 100
    assert sum(by_pid.values()) == n


class Uneven(Node):
    """Every third frame takes 2 ms, the others none."""

    def process(self, x):
        if x % 3 == 0:
            time.sleep(0.002)
        return x


@pytest.mark.slow
def test_uneven_frames_every_worker_killed_mid_stream_nothing_lost_or_duplicated_in_order():
    # the upstream (whose dispatch choices are recorded and replayed), each replica and the
    # merge, killed in turn while the replicas take frames of uneven cost
    p = Pipeline([PassThroughNode(name="u"), Uneven(name="x", options={"replicas": 2}), Seen(name="d")])
    _chaos(p, ["u", "x[0]", "d", "x[1]"], 1500, min_kills=4, in_turn=True)
