"""Supervision: worker states, restarts with state, exactly-once frames, watchdogs, clean stop.

Every test uses real worker processes and real shared memory; the ``no_leaks`` fixture
checks afterwards that no process and no iceoryx2 file is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from remotemedia import Node, Pipeline, Source, Supervisor
from remotemedia.errors import NodeFatalError, WorkerStartTimeout
from remotemedia.nodes import MapNode, PassThroughNode, RangeSource
from supervisor import resources
from supervisor.states import TRANSITIONS, IllegalTransition, ProcessState, StateMachine
from conftest import OnceFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- state table


def test_state_table_walk():
    for old in ProcessState:
        for new in ProcessState:
            sm = StateMachine("n", initial=old)
            if new in TRANSITIONS[old]:
                sm.change(new, "test")
                assert sm.state is new and sm.history[-1][1:3] == (old, new)
            else:
                with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                    sm.change(new, "test")
                assert sm.state is old and not sm.history
    # the lifecycle of a crash and restart is legal end to end
    sm = StateMachine("n")
    for s in ("STARTING", "RUNNING", "EXITED", "BACKOFF", "STARTING", "RUNNING", "STOPPING", "STOPPED"):
        sm.change(ProcessState[s])
    assert [h[2].value for h in sm.history][-1] == "STOPPED"


# --------------------------------------------------------------------------- nodes


class Slow(Node):
    def __init__(self, delay: float, **kw):
        super().__init__(**kw)
        self.delay = delay

    def process(self, x):
        time.sleep(self.delay)
        return x


class CrashOnce(Node):
    """Dies hard (no exception, no cleanup) the first time it sees frame ``at``."""

    def __init__(self, at: int, once: OnceFile, how: str = "exit", **kw):
        super().__init__(**kw)
        self.at, self.once, self.how = at, once, how

    def process(self, x):
        if x == self.at and self.once.first():
            if self.how == "exit":
                os._exit(1)
            if self.how == "hang":
                time.sleep(3600)
            if self.how == "memory":
                self.ballast = bytearray(400 * 2**20)
                for i in range(0, len(self.ballast), 4096):
                    self.ballast[i] = 1
                time.sleep(3600)
        return x


class CrashOn(Node):
    """Always dies on frame ``at`` (a poison frame)."""

    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def process(self, x):
        if x == self.at:
            os._exit(1)
        return x


class RunningSum(Node):
    """Stateful: emits the running sum. snapshot()/restore() keep it across restarts."""

    def initialize(self):
        self.total = 0

    def process(self, x):
        self.total += x
        return self.total

    def snapshot(self):
        return self.total

    def restore(self, state):
        self.total = state


class FailsOnReload(Node):
    """Crashes once mid-stream; its restart cannot load (initialize raises)."""

    def __init__(self, once: OnceFile, **kw):
        super().__init__(**kw)
        self.once = once

    def initialize(self):
        if os.path.exists(self.once.path):
            raise RuntimeError("weights corrupted on reload")

    def process(self, x):
        if x == 5 and self.once.first():
            os._exit(1)
        return x


class HangInit(Node):
    def initialize(self):
        time.sleep(3600)

    def process(self, x):
        return x


# --------------------------------------------------------------------------- helpers


def kill_worker(sup: Supervisor, name: str, when: float = 0.0) -> None:
    def go():
        time.sleep(when)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = sup.worker_pids().get(name)
            if pid:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.01)

    threading.Thread(target=go, daemon=True).start()


# --------------------------------------------------------------------------- no frame lost


@pytest.mark.slow
def test_chaos_random_sigkill_exactly_once_in_order(capsys):
    n = 5000
    sup = Supervisor(
        [RangeSource(n, name="source"), Slow(0.002, name="a"), MapNode(lambda x: x, name="b"), PassThroughNode(name="c")],
        max_restarts=1000,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    sup.start()
    kills = []
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "1234")))

    def killer():
        while sup.running:
            time.sleep(rng.uniform(0.5, 1.2))
            pids = {k: v for k, v in sup.worker_pids().items() if v}
            if not pids:
                continue
            name = rng.choice(sorted(pids))
            try:
                os.kill(pids[name], signal.SIGKILL)
                kills.append(name)
            except ProcessLookupError:
                pass

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = sup.run()
    t.join(5)
    assert report.outputs == list(range(n))  # every frame exactly once, in order
    recoveries = {name: s["last_recovery_s"] for name, s in report.nodes.items() if s["last_recovery_s"] is not None}
    restarts = sum(s["restarts"] for s in report.nodes.values())
    with capsys.disabled():
        print(f"\nchaos: {len(kills)} SIGKILLs, {restarts} restarts, recovery (kill -> READY) s: "
              + ", ".join(f"{k}={v:.3f}" for k, v in sorted(recoveries.items())))
    assert len(kills) >= 3, "the run was too short to kill anything"
    assert restarts >= len(kills) - 1  # a kill during a node's very last moment needs no restart
    assert all(v < 60.0 for v in recoveries.values())  # (~0.1-0.5 s; generous: a busy host)


@pytest.mark.slow
def test_crash_in_process_restarts_and_loses_nothing(tmp_path):
    node = CrashOnce(50, OnceFile(str(tmp_path / "crashed")), name="crashy")
    report = Supervisor([PassThroughNode(name="up"), node, PassThroughNode(name="down")]).run(range(200))
    assert report.outputs == list(range(200))
    assert report.nodes["crashy"]["restarts"] == 1
    assert report.nodes["up"]["restarts"] == 0


@pytest.mark.slow
def test_sigkill_of_middle_worker(tmp_path):
    sup = Supervisor([RangeSource(1500, name="src"), Slow(0.002, name="mid"), PassThroughNode(name="sink")])
    sup.start()
    pid = sup.worker_pids()["mid"]
    kill_worker(sup, "mid", when=0.8)
    report = sup.run()
    assert report.outputs == list(range(1500))
    assert report.nodes["mid"]["restarts"] == 1 and report.nodes["mid"]["pid"] != pid


@pytest.mark.slow
def test_snapshot_restore_keeps_runtime_state():
    n = 1500
    node = RunningSum(name="sum", options={"snapshot_interval": 0.05})
    sup = Supervisor([RangeSource(n, name="src"), Slow(0.001, name="slow"), node])
    sup.start()
    kill_worker(sup, "sum", when=0.8)
    report = sup.run()
    want = [sum(range(i + 1)) for i in range(n)]
    assert report.nodes["sum"]["restarts"] == 1
    assert report.outputs == want  # the restarted worker resumed from its snapshot


# --------------------------------------------------------------------------- watchdogs


@pytest.mark.slow
def test_hang_in_process_is_killed_and_restarted(tmp_path):
    node = CrashOnce(20, OnceFile(str(tmp_path / "hung")), how="hang", name="hangs")
    t0 = time.monotonic()
    report = Supervisor([node], process_timeout=1.0, kill_timeout=1.0).run(range(60))
    assert report.outputs == list(range(60))
    assert report.nodes["hangs"]["restarts"] == 1 and report.nodes["hangs"]["hang_kills"] == 1
    assert time.monotonic() - t0 < 120  # (~3 s; the hang itself would never end)


@pytest.mark.slow
def test_hang_in_initialize_fails_clearly():
    t0 = time.monotonic()
    with pytest.raises(WorkerStartTimeout) as ei:
        Supervisor([PassThroughNode(), HangInit(name="stuck")], init_timeout=1.5).run([1])
    assert time.monotonic() - t0 < 120  # (~2 s; the hang itself would never end)
    assert ei.value.node == "stuck" and "init_timeout=1.5" in str(ei.value)


@pytest.mark.slow
def test_memory_cap_restarts_worker(tmp_path):
    node = CrashOnce(10, OnceFile(str(tmp_path / "big")), how="memory", name="hog")
    report = Supervisor([node], memory_limit=200 * 2**20).run(range(30))
    assert report.outputs == list(range(30))
    assert report.nodes["hog"]["memory_kills"] == 1 and report.nodes["hog"]["restarts"] == 1


@pytest.mark.slow
def test_load_failure_on_restart_is_fatal_without_looping(tmp_path):
    node = FailsOnReload(OnceFile(str(tmp_path / "once")), name="reload")
    sup = Supervisor([node], max_restarts=10)
    with pytest.raises(NodeFatalError) as ei:
        sup.run(range(20))
    e = ei.value
    assert e.node == "reload" and e.exit_status == 3
    assert "weights corrupted on reload" in (e.last_traceback or "")
    assert sup.report().nodes["reload"]["restarts"] == 1  # no retry loop
    assert sup.states()["reload"] == "FATAL"


@pytest.mark.slow
def test_restart_limit_goes_fatal_with_backoff():
    sup = Supervisor([CrashOn(0, name="doomed")], max_restarts=3, restart_window=60, backoff_base=0.1, poison_threshold=100)
    with pytest.raises(NodeFatalError) as ei:
        sup.run(range(5))
    e = ei.value
    assert e.node == "doomed" and "restart limit reached" in str(e) and e.exit_status == 1
    assert "exit code 1" in str(e)
    # exponential backoff: 0.1, 0.2, 0.4 s between failure and the next start
    hist = sup.workers["doomed"].sm.history
    starts = [t for t, old, new, _ in hist if new is ProcessState.STARTING]
    backoffs = [t for t, old, new, _ in hist if new is ProcessState.BACKOFF]
    delays = [s - b for b, s in zip(backoffs, starts[1:])]
    assert len(delays) == 3
    assert delays[0] >= 0.09 and delays[1] >= 0.19 and delays[2] >= 0.39


def test_restart_policy_never_is_fatal(tmp_path):
    node = CrashOnce(3, OnceFile(str(tmp_path / "x")), name="once", options={"restart_policy": "never"})
    with pytest.raises(NodeFatalError, match="restart_policy='never'"):
        Supervisor([node]).run(range(10))


@pytest.mark.slow
def test_poison_frame_is_dead_lettered_and_stream_continues(tmp_path):
    dl = tmp_path / "dead"
    sup = Supervisor([PassThroughNode(name="up"), CrashOn(7, name="victim")], poison_threshold=3, max_restarts=10, dead_letter_dir=str(dl))
    report = sup.run(range(20))
    assert report.outputs == [x for x in range(20) if x != 7]
    assert report.nodes["victim"]["dead_letters"] == 1
    assert report.nodes["victim"]["restarts"] == 3
    (meta,) = [json.loads(p.read_text()) for p in dl.glob("*.json")]
    assert meta["node"] == "victim" and meta["seq"] == 7 and meta["from"] == "up"
    frame = (dl / f"victim-e{meta['edge']}-s7.frame").read_bytes()
    import pickle

    m0, m1 = meta["meta"]
    assert pickle.loads(frame[m0:m1]) == 7  # the poison frame itself was kept


# --------------------------------------------------------------------------- supervisor death and clean stop

_SERVICE = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    PARENT = os.getpid()
    from remotemedia import Node, Source, Supervisor
    from remotemedia.nodes import PassThroughNode

    class Ticker(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.005)
                yield i
                i += 1

    class Marked(Node):
        def __init__(self, marker_dir, **kw):
            super().__init__(**kw)
            self.marker_dir = marker_dir
        def process(self, x):
            return x
        def cleanup(self):
            if os.getpid() != PARENT:  # not the parent's pre-pickle cleanup
                open(os.path.join(self.marker_dir, f"{{self.name}}.{{os.getpid()}}"), "w").close()

    class MarkedTicker(Ticker, Marked):
        pass

    d = sys.argv[1]
    sup = Supervisor([MarkedTicker(d, name="src"), Marked(d, name="a"), Marked(d, name="b")], stop_timeout=20)
    sup.start()
    print(json.dumps({{"pids": sup.worker_pids(), "root": sup.root}}), flush=True)
    seen = []
    report = sup.run(on_output=lambda v, i: seen.append(v))
    print(json.dumps({{"n": len(seen), "ordered": seen == list(range(len(seen))), "stopped": report.stopped}}), flush=True)
    """
)


def _start_service(tmp_path):
    script = tmp_path / "service.py"
    script.write_text(_SERVICE.format(root=ROOT))
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(markers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    info = json.loads(line)
    return proc, info, markers


@pytest.mark.slow
def test_sigterm_drains_and_every_worker_cleans_up(tmp_path):
    proc, info, markers = _start_service(tmp_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] > 20 and result["ordered"] and result["stopped"]
    names = sorted(f.split(".")[0] for f in os.listdir(markers))
    assert names == ["a", "b", "src"]  # cleanup() ran in every worker
    assert not any(psutil.pid_exists(p) for p in info["pids"].values())
    assert not os.path.exists(info["root"])


@pytest.mark.slow
def test_supervisor_sigkill_takes_workers_down_and_next_start_cleans(tmp_path):
    proc, info, _ = _start_service(tmp_path)
    time.sleep(0.5)
    assert resources.files_of(info["root"])  # the run's shared memory exists
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    pids = list(info["pids"].values())
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        # (at once: PR_SET_PDEATHSIG; generous for a busy host)
        assert time.monotonic() - t0 < 30, "workers outlived their supervisor by more than 30 s"
        time.sleep(0.02)
    assert resources.files_of(info["root"])  # leftovers of the dead run...
    assert info["root"] in resources.stale_runs()
    out = Pipeline([PassThroughNode()]).run([1])  # ...are removed by the next start
    assert out == [1]
    assert not os.path.exists(info["root"])


@pytest.mark.slow
def test_stop_method_drains_cleanly():
    class Endless(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.002)
                yield i
                i += 1

    sup = Supervisor([Endless(name="endless"), PassThroughNode(name="p")])
    got = []

    def on_output(v, info):
        got.append(v)
        if len(got) == 51:  # (an event, not a time: a busy host is slow to start)
            threading.Thread(target=sup.stop).start()

    report = sup.run(on_output=on_output)
    assert report.stopped and len(got) > 50 and got == list(range(len(got)))
    assert all(s["state"] == "EXITED" for s in report.nodes.values())
