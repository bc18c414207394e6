"""Node groups: several nodes in one worker, frames handed on by plain calls."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from remotemedia import Frame, Group, Node, Pipeline, Supervisor
from remotemedia.errors import ManifestError, NodeError, NodeInitError, NodeTypeError
from remotemedia.nodes import BatchNode, FilterNode, MapNode, PassThroughNode, RangeSource

from conftest import shm_mapping_of
from test_supervision import RunningSum, Slow, kill_worker


class Pid(Node):
    def process(self, x):
        return (x, os.getpid())


class Twice(Node):
    """Two outputs per input, as a generator."""

    def process(self, x):
        yield x
        yield x + 1000


class AsyncAdd(Node):
    async def process(self, x):
        await asyncio.sleep(0)
        return x + 1


class Seq(Node):
    def process(self, x):
        f = self.current_frame
        return (x, f.seq, f.origin)


class Tagged(Node):
    def process(self, x):
        return Frame(x, stream_id=7)


class StreamOf(Node):
    def process(self, x):
        return (x, self.current_frame.stream_id)


class Lifecycle(Node):
    """Records its lifecycle calls in a file shared by the members of a group."""

    def __init__(self, path, fail_init=False, **kw):
        super().__init__(**kw)
        self.path, self.fail_init = path, fail_init

    def _log(self, what):
        with open(self.path, "a") as f:
            f.write(f"{self.name}:{what}\n")

    def initialize(self):
        self._log("init")
        if self.fail_init:
            raise RuntimeError("no model file")

    def process(self, x):
        return x

    def cleanup(self):
        if os.path.exists(self.path):
            self._log("cleanup")


class Draw(Node):
    """Fills an allocated array; reports whether it lies in shared memory."""

    def process(self, i):
        out = self.allocate(4096, np.uint8)
        out[:] = i % 251
        self.in_shm = shm_mapping_of(out.ctypes.data).startswith("/dev/shm/")
        return out


class Where(Node):
    def process(self, arr):
        return (int(arr[0]), None)


class Tell(Node):
    def process(self, d):
        return (int(d["arr"][0]), d["shm"])


class DrawAndTell(Draw):
    def process(self, i):
        out = super().process(i)
        return {"arr": out, "shm": self.in_shm}


class Boom(Node):
    def process(self, x):
        if x == 3:
            raise ValueError("bad frame 3")
        return x


@pytest.mark.slow
def test_group_runs_members_in_one_worker_in_order():
    g = Group([MapNode(lambda x: x + 1), Twice(), FilterNode(lambda x: x % 2 == 0), AsyncAdd(), Pid()], name="g")
    sup = Supervisor([RangeSource(6, name="src"), g])
    sup.start()
    pids = sup.worker_pids()
    report = sup.run()
    assert set(pids) == {"src", "g"}  # one worker for the five members
    want = [(x + 1, pids["g"]) for i in range(6) for x in (i + 1, i + 1001) if x % 2 == 0]
    assert report.outputs == want
    # the same chain, one worker per node, gives the same frames
    members = report.nodes["g"]["members"]
    assert list(members) == ["MapNode", "Twice", "FilterNode", "AsyncAdd", "Pid"]
    assert [(v["frames_in"], v["frames_out"]) for v in members.values()] == [(6, 6), (6, 12), (12, 6), (6, 6), (6, 6)]
    assert all(v["errors"] == 0 and v["mean_ms"] >= 0 for v in members.values())
    plain = [MapNode(lambda x: x + 1), Twice(), FilterNode(lambda x: x % 2 == 0), AsyncAdd()]
    assert [o[0] for o in report.outputs] == Pipeline([RangeSource(6), *plain]).run()


@pytest.mark.slow
def test_members_see_the_frame_and_stream_ids_carry_through():
    out = Pipeline([Group([Tagged(), Seq()]), StreamOf()]).run([10, 20])
    assert out == [((10, 0, 0), 7), ((20, 1, 1), 7)]


def test_flush_of_a_member_goes_through_the_members_after_it():
    g = Group([BatchNode(size=4), MapNode(lambda b: sum(b))])
    assert Pipeline([g]).run(range(10)) == [6, 22, 17]  # the last, partial batch at end of stream


@pytest.mark.slow
def test_only_the_last_member_allocates_in_shared_memory():
    report = Supervisor([Group([DrawAndTell(name="first"), Tell(name="last")], name="g")]).run(range(5))
    # the first member's array stayed in the worker's private memory
    assert report.outputs == [(i % 251, False) for i in range(5)]
    report = Supervisor([Group([MapNode(lambda i: i * 2), DrawAndTell(name="last")], name="g")]).run(range(5))
    assert [(int(o["arr"][0]), o["shm"]) for o in report.outputs] == [(i * 2 % 251, True) for i in range(5)]
    report = Supervisor([Group([MapNode(lambda i: i), Draw(name="last")], name="g"), Where()]).run(range(5))
    assert [o[0] for o in report.outputs] == [i % 251 for i in range(5)]
    ((_, edge),) = report.nodes["g"]["edges_out"].items()
    assert edge["zero_copy"] == 5  # the last member's output left without a copy


def test_a_member_error_names_the_member():
    with pytest.raises(NodeError) as ei:
        Pipeline([Group([PassThroughNode(name="ok"), Boom(name="boom")], name="g")]).run(range(5))
    e = ei.value
    assert e.node == "g" and "bad frame 3" in str(e)
    assert "'boom', member of group 'g'" in e.traceback


def test_a_member_failing_to_initialize_cleans_up_the_others(tmp_path):
    path = str(tmp_path / "log")
    open(path, "w").close()
    g = Group([Lifecycle(path, name="a"), Lifecycle(path, fail_init=True, name="b"), Lifecycle(path, name="c")], name="g")
    with pytest.raises(NodeInitError) as ei:
        Pipeline([g]).run([1])
    assert "no model file" in str(ei.value)
    assert "'b', member of group 'g'" in (ei.value.traceback or "")
    lines = open(path).read().split()
    # cleanup-then-pickle in the parent first, then in the worker: a and b initialized, a
    # cleaned up again, c never initialized
    worker = lines[lines.index("a:init"):]
    assert worker == ["a:init", "b:init", "a:cleanup"]


@pytest.mark.slow
def test_snapshot_of_a_stateful_member_survives_a_restart():
    n = 1500
    g = Group([PassThroughNode(), RunningSum(name="sum")], name="g", options={"snapshot_interval": 0.05})
    assert callable(g.snapshot) and callable(g.restore)
    assert Group([PassThroughNode()]).snapshot is None  # no member keeps state: no snapshots
    sup = Supervisor([RangeSource(n, name="src"), Slow(0.001, name="slow"), g])
    sup.start()
    kill_worker(sup, "g", when=0.8)
    report = sup.run()
    assert report.nodes["g"]["restarts"] == 1
    assert report.outputs == [sum(range(i + 1)) for i in range(n)]


@pytest.mark.slow
def test_group_in_a_manifest_round_trips():
    manifest = {
        "version": "v1",
        "nodes": [
            {"id": "src", "node_type": "RangeSource", "params": {"stop": 4}},
            {"id": "chain", "node_type": "Group", "options": {"on_error": "skip"},
             "params": {"nodes": [{"id": "p", "node_type": "PassThroughNode"},
                                  {"id": "b", "node_type": "BatchNode", "params": {"size": 2}}]}},
        ],
    }
    p = Pipeline(manifest)
    assert p.run() == [[0, 1], [2, 3]]
    chain = next(n for n in p.nodes if n.name == "chain")
    entry = chain.to_manifest()
    assert entry["node_type"] == "Group" and entry["options"] == {"on_error": "skip"}
    assert [m["id"] for m in entry["params"]["nodes"]] == ["p", "b"]
    assert Pipeline({"version": "v1", "nodes": [manifest["nodes"][0], entry]}).run() == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "members, message",
    [
        ([], "at least one node"),
        ("PassThroughNode", "takes a list of nodes"),
        ([PassThroughNode(), 42], "member 1 is a int"),
        ([RangeSource(3)], "is a Source"),
        ([PassThroughNode(name="x"), PassThroughNode(name="x")], "duplicate node name 'x'"),
        ([{"node_type": "NoSuchNode"}], "NoSuchNode"),
        ([PassThroughNode(options={"on_error": "skip"})], "set them on the Group"),
    ],
    ids=["empty", "string", "not-a-node", "source", "duplicate", "unknown-type", "member-options"],
)
def test_bad_groups_are_refused_clearly(members, message):
    with pytest.raises((NodeTypeError, ManifestError)) as ei:
        Group(members, name="g")
    assert message in str(ei.value)
    same = PassThroughNode()
    with pytest.raises(NodeTypeError, match="same Node instance"):
        Group([same, same])


def test_auto_named_members_are_suffixed():
    g = Group([PassThroughNode(), PassThroughNode()])
    assert [m.name for m in g.nodes] == ["PassThroughNode", "PassThroughNode_1"]
