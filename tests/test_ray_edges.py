"""Backend ray without Ray: the cross-host edge protocol (supervisor.ray.edges) on a fake
transport that loses calls and replies, delivers stale ones late, and crashes either end; the
cut of a pipeline into host parts (supervisor.ray.plan); the state actor's rules
(supervisor.ray.state); the options. All fast: no process, no cluster."""

from __future__ import annotations

import random
import subprocess
import sys
from typing import Any, List, Tuple

import pytest

from remotemedia import Pipeline, Supervisor
from remotemedia.errors import OptionValueError, SupervisorError
from remotemedia.nodes import MapNode, PassThroughNode, RangeSource
from supervisor.ray.edges import DATA, EOS, EdgeProtocolError, EdgeReceiver, EdgeSender, StaleIncarnation
from supervisor.ray.plan import CALLER, plan_parts
from supervisor.ray.state import NO_SNAPSHOT_CHANGE, RunState


def frame(seq: int, kind: int = DATA) -> Tuple[int, int, Any, int, int, int]:
    return (seq, kind, f"v{seq}", seq, 0, 0)


def everything(seq: Any) -> bool:
    return True


# --------------------------------------------------------------------------- the protocol


def test_frames_cross_in_order_and_commits_free_the_retention():
    s, r = EdgeSender(3, 1, window=4), EdgeReceiver(3, 1)
    for i in range(4):
        s.add(frame(i))
    assert not s.room()  # the window: 4 frames not yet taken
    batch = s.batch(10)
    assert [f[0] for f in batch] == [0, 1, 2, 3]
    taken = r.on_batch(1, batch, everything)
    assert [f[0] for f in taken] == [0, 1, 2, 3]
    assert s.on_reply(r.reply())
    assert s.room() and not s.pending() and len(s.retained) == 4  # taken, not committed
    r.set_committed(3)
    s.on_reply(r.reply(), took=False)
    assert [f[0] for f in s.retained] == [3] and s.committed == 3


def test_a_sender_given_a_list_hands_what_a_commit_releases_to_it():
    # (the agent drops them when no frame waits on it: a frame's object in Ray's store is
    # freed by a call into Ray)
    released: List[Any] = []
    s, r = EdgeSender(3, 1, window=8, released=released), EdgeReceiver(3, 1)
    for i in range(5):
        s.add(frame(i))
    r.on_batch(1, s.batch(10), everything)
    s.on_reply(r.reply())
    assert released == []  # taken, not committed: still retained
    r.set_committed(3)
    s.on_reply(r.reply(), took=False)
    assert released == [frame(0), frame(1), frame(2)]
    assert [f[0] for f in s.retained] == [3, 4] and s.committed == 3
    r.set_committed(3)
    s.on_reply(r.reply(), took=False)  # nothing new committed: nothing released twice
    assert len(released) == 3


def test_the_receiver_takes_only_what_its_side_has_room_for_and_the_sender_resends_the_rest():
    s, r = EdgeSender(0, 1, window=8), EdgeReceiver(0, 1)
    for i in range(5):
        s.add(frame(i))
    room = iter([True, True, False])
    taken = r.on_batch(1, s.batch(8), lambda f: next(room))
    assert [f[0] for f in taken] == [0, 1]
    s.on_reply(r.reply())
    assert [f[0] for f in s.batch(8)] == [2, 3, 4]


def test_duplicates_are_dropped_and_a_gap_stops_the_batch():
    r = EdgeReceiver(0, 1, expected=5)
    taken = r.on_batch(1, [frame(3), frame(4), frame(5), frame(7)], everything)
    assert [f[0] for f in taken] == [5]
    assert r.duplicates == 2 and r.gaps == 1 and r.expected == 6


def test_a_restarted_receiver_rewinds_the_sender_to_its_checkpoint():
    s, r = EdgeSender(0, 1, window=100), EdgeReceiver(0, 1)
    for i in range(10):
        s.add(frame(i))
    r.on_batch(1, s.batch(100), everything)
    r.set_committed(4)  # its checkpoint
    s.on_reply(r.reply())
    assert not s.pending()
    r2 = EdgeReceiver(0, 2, expected=r.committed)  # the new incarnation resumes there
    s.on_reply(r2.reply(), took=False)  # (even a commit poll's answer tells a new incarnation)
    assert [f[0] for f in s.batch(100)] == list(range(4, 10)) and s.resent == 6


def test_replies_and_batches_of_stale_incarnations_are_refused():
    s = EdgeSender(0, 1, window=100)
    for i in range(6):
        s.add(frame(i))
    assert s.on_reply((2, 2, 3))
    assert not s.on_reply((1, 5, 6))  # the old incarnation, answering late
    assert s.committed == 2 and s.cursor == 3 and s.stale_replies == 1
    r = EdgeReceiver(0, 1)
    r.on_batch(2, [frame(0)], everything)
    with pytest.raises(StaleIncarnation):
        r.on_batch(1, [frame(1)], everything)
    with pytest.raises(StaleIncarnation):
        r.check_sender(1)
    assert r.expected == 1


def test_a_restarted_sender_regenerates_and_the_receiver_keeps_the_first_copy():
    r = EdgeReceiver(0, 1)
    s = EdgeSender(0, 1, window=100)
    for i in range(6):
        s.add(frame(i))
    r.on_batch(1, s.batch(100), everything)
    s2 = EdgeSender(0, 2, window=100, next_seq=2)  # resumed from its node's commit: frame 2 on
    for i in range(2, 8):
        s2.add(frame(i))
    taken = r.on_batch(2, s2.batch(100), everything)
    assert [f[0] for f in taken] == [6, 7] and r.duplicates == 4


def test_a_reply_behind_a_durable_commit_is_stale_even_to_a_restarted_sender():
    s = EdgeSender(0, 2, window=100, next_seq=4)  # resumed: the receiver had committed 4
    for i in range(4, 9):
        s.add(frame(i))
    assert not s.on_reply((1, 2, 3))  # an old receiver incarnation, never seen by this sender
    assert s.cursor == 4 and s.receiver_inc == 0 and s.stale_replies == 1
    with pytest.raises(EdgeProtocolError):
        s.add(frame(11))  # not the next seq


def test_the_end_of_stream_is_finished_once_committed():
    s, r = EdgeSender(0, 1, window=4), EdgeReceiver(0, 1)
    s.add(frame(0))
    s.add(frame(1, EOS))
    r.on_batch(1, s.batch(4), everything)
    assert r.eos and not s.finished
    r.set_committed(r.expected)
    s.on_reply(r.reply())
    assert s.finished and not s.uncommitted()


class _Link:
    """One cut edge between a sending and a receiving host, over a transport that loses
    requests and replies and delivers old replies late; either host may crash. The sending
    host regenerates its frames from its own checkpoint (what its node had committed, i.e.
    what the receiver had committed when it was taken); the receiving host loses what it had
    not checkpointed. What the receiving host checkpointed is its output."""

    def __init__(self, rng: random.Random, n: int) -> None:
        self.rng, self.n = rng, n
        self.s_inc = self.r_inc = 1
        self.sender = EdgeSender(7, 1, window=rng.choice([1, 3, 16]))
        self.receiver = EdgeReceiver(7, 1)
        self.sender_ckpt = 0  # where a restarted sending host regenerates from
        self.produced = 0  # the next frame the sending host's node makes
        self.taken: List[Any] = []  # received, not checkpointed
        self.output: List[Any] = []  # checkpointed by the receiving host
        self.late: List[Tuple[int, int, int]] = []  # replies still on their way
        self.late_batches: List[Tuple[int, List[Any]]] = []

    def step(self) -> None:
        rng, s, r = self.rng, self.sender, self.receiver
        while s.room() and self.produced <= self.n:
            s.add(frame(self.produced, EOS if self.produced == self.n else DATA))
            self.produced += 1
        x = rng.random()
        if x < 0.55 and s.pending():  # a push
            batch = s.batch(rng.randint(1, 8))
            if rng.random() < 0.1:
                self.late_batches.append((self.s_inc, batch))  # held up somewhere
                return
            if rng.random() < 0.1:
                return  # the call failed (the receiver was not there)
            try:
                for f in r.on_batch(self.s_inc, batch, lambda f: rng.random() < 0.9):
                    self.taken.append(f)
            except StaleIncarnation:
                return
            reply = r.reply()
            if rng.random() < 0.1:
                self.late.append(reply)  # answered, but the call failed for the sender
            else:
                s.on_reply(reply)
        elif x < 0.65:  # a commit poll
            reply = r.reply()
            if rng.random() < 0.8:
                s.on_reply(reply, took=False)
        elif x < 0.80:  # the receiving host's checkpoint
            self.output.extend(self.taken)
            self.taken = []
            r.set_committed(r.expected)
        elif x < 0.85:  # the sending host's checkpoint (its node committed what was committed)
            self.sender_ckpt = s.committed
        elif x < 0.88 and self.late:  # an old reply arrives (a commit poll's, overtaken)
            s.on_reply(self.late.pop(rng.randrange(len(self.late))), took=False)
        elif x < 0.90 and self.late_batches:  # an old batch arrives
            inc, batch = self.late_batches.pop(0)
            try:
                self.taken.extend(r.on_batch(inc, batch, everything))
            except StaleIncarnation:
                pass
        elif x < 0.93:  # the receiving host's agent is SIGKILLed
            self.taken = []
            self.r_inc += 1
            self.receiver = EdgeReceiver(7, self.r_inc, expected=r.committed)
        elif x < 0.96:  # the sending host's agent is SIGKILLed
            self.s_inc += 1
            self.sender = EdgeSender(7, self.s_inc, window=s.window, next_seq=self.sender_ckpt)
            self.produced = self.sender_ckpt

    def done(self) -> bool:
        return self.receiver.committed == self.n + 1


@pytest.mark.parametrize("seed", range(40))
def test_crashes_losses_and_late_messages_lose_and_repeat_nothing(seed):
    rng = random.Random(seed)
    link = _Link(rng, n=rng.choice([5, 40, 120]))
    for _ in range(200_000):
        if link.done():
            break
        link.step()
    assert link.done(), "the edge stalled"
    assert [f[0] for f in link.output] == list(range(link.n + 1))  # in order, once each, EOS last
    assert link.output[-1][1] == EOS


# --------------------------------------------------------------------------- the plan


def test_a_pipeline_is_cut_where_its_hosts_change():
    p = Pipeline(
        [
            PassThroughNode(name="a"),
            MapNode(lambda x: x, name="b", options={"host": "gpu"}),
            MapNode(lambda x: x, name="c", options={"host": "gpu"}),
            PassThroughNode(name="d"),
        ]
    )
    assert p.edges() == [("__input__", "a"), ("a", "b"), ("b", "c"), ("c", "d"), ("d", "__output__")]
    parts = plan_parts(p)
    assert set(parts) == {None, "gpu"}
    gpu, here = parts["gpu"], parts[None]
    assert gpu.nodes == ["b", "c"]
    assert gpu.edges == [("__input__", "b"), ("b", "c"), ("c", "__output__")] and gpu.global_index == [1, 2, 3]
    assert gpu.cut_in == {0: (1, None)} and gpu.cut_out == {2: (3, None)}
    # the driver's host: the caller's edges stay local, the cut edges end in its gateway
    assert here.nodes == ["a", "d"]
    assert here.edges == [("__input__", "a"), ("a", "__output__"), ("__input__", "d"), ("d", "__output__")]
    assert here.cut_out == {1: (1, "gpu")} and here.cut_in == {2: (3, "gpu")}
    assert here.local_connections() == []


def test_the_callers_edges_to_other_hosts_are_cut():
    p = Pipeline([MapNode(lambda x: x, name="m", options={"host": "gpu"})])
    parts = plan_parts(p)
    assert set(parts) == {"gpu"}
    assert parts["gpu"].cut_in == {0: (0, CALLER)} and parts["gpu"].cut_out == {1: (1, CALLER)}


def test_a_manifest_host_places_a_node_too():
    p = Pipeline({"nodes": [{"id": "s", "node_type": "RangeSource", "params": {"stop": 3}, "host": "cam"},
                            {"id": "m", "node_type": "PassThroughNode"}]})  # fmt: skip
    parts = plan_parts(p)
    assert parts["cam"].nodes == ["s"] and parts["cam"].cut_out == {0: (0, None)} and parts[None].cut_in == {0: (0, "cam")}


# --------------------------------------------------------------------------- the state actor


def test_the_state_refuses_a_stale_incarnation_and_keeps_unsent_snapshots():
    st = RunState()
    assert st.register("gpu") == (1, None)
    assert st.save("gpu", 1, {"nodes": {"b": {"in_seqs": {0: 4}, "snapshot": b"s1"}}, "cut_in": {0: 5}, "cut_out": {}})
    inc, ckpt = st.register("gpu")  # the agent restarted
    assert inc == 2 and ckpt["cut_in"] == {0: 5}
    assert not st.save("gpu", 1, {"nodes": {}, "cut_in": {0: 9}, "cut_out": {}})  # the old one, late
    assert st.save("gpu", 2, {"nodes": {"b": {"in_seqs": {0: 6}, "snapshot": NO_SNAPSHOT_CHANGE}}, "cut_in": {0: 7}, "cut_out": {}})
    assert st.register("gpu")[1]["nodes"]["b"]["snapshot"] == b"s1"


# --------------------------------------------------------------------------- the options


def test_a_bad_backend_is_refused_with_the_values_allowed():
    with pytest.raises(OptionValueError, match=r"backend must be one of 'local', 'ray', got 'rya'"):
        Supervisor([PassThroughNode()], backend="rya")


def test_ray_address_without_backend_ray_is_refused():
    with pytest.raises(SupervisorError, match=r"ray_address='auto' is for backend='ray'"):
        Supervisor([PassThroughNode()], ray_address="auto")


def test_a_bad_host_is_refused_where_the_node_is_resolved():
    with pytest.raises(OptionValueError, match=r"node 'm': host must be"):
        Supervisor([MapNode(lambda x: x, name="m", options={"host": ""})])


def test_the_local_backend_never_imports_ray():
    code = (
        "import sys\n"
        "from remotemedia import Pipeline, Supervisor\n"
        "from remotemedia.nodes import PassThroughNode\n"
        "Supervisor([PassThroughNode(options={'host': 'gpu'})])\n"
        "import supervisor.cli, supervisor.api\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m.startswith('supervisor.ray')], sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_ray_without_ray_installed_says_how_to_install_it():
    code = (
        "import sys; sys.modules['ray'] = None\n"  # (import ray now raises ImportError)
        "from remotemedia import Supervisor\n"
        "from remotemedia.nodes import PassThroughNode\n"
        "try:\n"
        "    Supervisor([PassThroughNode()], backend='ray')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "SupervisorError backend='ray' needs Ray: pip install 'remotemedia[ray]'"


def test_every_error_pickles_with_its_attributes():
    """A host's error reaches the driver pickled (backend ray raises the NodeError itself)."""
    import inspect
    import pickle

    from remotemedia import errors

    err = errors.NodeError("f", "ValueError: bad frame 3", pid=12, seq=3, exc_type="ValueError", traceback="tb")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is errors.NodeError and str(back) == str(err)
    assert (back.node, back.pid, back.seq, back.exc_type, back.traceback) == ("f", 12, 3, "ValueError", "tb")
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, errors.RemoteMediaError) and cls.__reduce__ is errors.RemoteMediaError.__reduce__:
            e = cls.__new__(cls)  # (those with a __reduce__ of their own have their tests)
            e.args = ("x",)
            assert type(pickle.loads(pickle.dumps(e))) is cls, name


def _ray_status() -> dict:
    node = {
        "state": "RUNNING", "pid": 7, "restarts": 0, "replacements": 0, "frames_in": 5, "frames_out": 5,
        "fps_in": 1.0, "fps_out": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "rss_bytes": 1 << 20, "cpu_percent": 1.0,
        "cpu_seconds": 0.5, "latency_histogram": {"le_s": [0.001], "cumulative": [5], "count": 5, "sum_s": 0.004},
        "dead_letters": 0, "memory_kills": 0, "hang_kills": 0, "inputs": [],
    }  # fmt: skip
    return {
        "name": "cams", "pid": 1, "run_id": "r", "backend": "ray", "phase": "running", "uptime_s": 3.0,
        "workers_up": 2, "workers": 2,
        "nodes": {"camera": {**node, "host": "(driver)"}, "detector": {**node, "host": "gpu"}},
        "hosts": {"(driver)": {}, "gpu": {}},
    }  # fmt: skip


def test_status_and_metrics_say_each_nodes_host():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from supervisor.metrics import SupervisorCollector
    from supervisor.monitor import format_table

    lines = format_table(_ray_status()).splitlines()
    assert lines[1].split()[:3] == ["node", "host", "state"]
    assert lines[3].split()[:3] == ["detector", "gpu", "RUNNING"]
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(_ray_status))
    text = generate_latest(registry).decode()
    assert 'remotemedia_node_frames_out_total{host="gpu",node="detector",pipeline="cams"} 5.0' in text


def test_the_progress_line_and_the_watchdog_read_every_hosts_report():
    """(backend ray, no cluster) progress and the watchdog's health from the hosts' reports."""
    import time as _time

    pytest.importorskip("ray")  # (imported, never started)

    from supervisor.ray.driver import RaySupervisor, _Host
    from supervisor.ray.plan import plan_parts

    p = Pipeline([RangeSource(stop=10, name="src", options={"host": "cam"}), PassThroughNode(name="out")])
    sup = RaySupervisor(p, backend="ray")
    parts = plan_parts(p)
    cam = _Host("cam", parts["cam"], handle=object())
    cam.status = {"nodes": {"src": {"frames_out": 7, "restarts": 1}}, "unhealthy": ["src (pid 9) silent for 12.0 s"]}
    cam.answered_at = _time.monotonic()
    sup._hosts = {"cam": cam}
    assert (sup.progress().generated, sup.progress().total, sup.progress().restarts) == (7, 10, 1)
    assert sup.unhealthy_workers() == ["src (pid 9) silent for 12.0 s on host cam"]
    cam.answered_at -= 60
    assert sup.unhealthy_workers()[0].startswith("host cam silent for 6")


def test_replicas_are_refused_with_the_ray_backend() -> None:
    from remotemedia import Node, Pipeline
    from remotemedia.errors import PipelineValidationError
    from supervisor.ray.plan import plan_parts

    class Twice(Node):
        def process(self, data):
            return 2 * data

    p = Pipeline([Twice(name="a", options={"replicas": 2})])
    with pytest.raises(PipelineValidationError, match="replicas are not supported with backend='ray'"):
        plan_parts(p)
