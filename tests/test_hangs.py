"""No hangs, and faults that must become clear errors (issue 10, items 7-9, 11, 12, 15-18).

Every run here is bounded: a regression shows up as a failed test naming the states of the
workers, never as a suite that hangs.
"""

from __future__ import annotations

import json
import random
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, Iterable, Optional

import psutil
import pytest

from remotemedia import Node, Pipeline, Source, Supervisor
from remotemedia.errors import EndOfStream, FrameSerializationError, SerializationError, SupervisorError
from remotemedia.nodes import PassThroughNode
from supervisor import resources
from supervisor.arbiter import Arbiter
from conftest import OnceFile, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- helpers


def run_bounded(sup: Supervisor, inputs: Optional[Iterable[Any]] = None, deadline: float = 90.0):
    """sup.run(inputs), failing the test (and stopping everything) if it does not return."""
    box: Dict[str, Any] = {}

    def go() -> None:
        try:
            box["report"] = sup.run(inputs)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        states = sup.states()
        sup.kill()
        sup.join(30)
        t.join(30)
        pytest.fail(f"run() did not return within {deadline} s; worker states: {states}")
    if "error" in box:
        raise box["error"]
    return box["report"]


# --------------------------------------------------------------------------- 7: death after the final commit


class DiesInCleanup(Node):
    """Processes every frame, then dies in the worker's cleanup() (after its final commit)."""

    def __init__(self, how: str, **kw):
        super().__init__(**kw)
        self.how = how
        self.in_worker = False

    def initialize(self):
        self.in_worker = True  # the parent's pre-pickle cleanup() must not die

    def process(self, x):
        return x

    def cleanup(self):
        if not self.in_worker:
            return
        if self.how == "os_exit":
            os._exit(1)
        if self.how == "system_exit":
            raise SystemExit(7)
        if self.how == "system_exit_0":
            raise SystemExit(0)
        if self.how == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.how == "hang":  # stuck where SIGTERM cannot unwind it: the heartbeat kill
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(3600)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["os_exit", "system_exit", "system_exit_0", "signal"])
def test_crash_in_cleanup_after_final_commit_ends_the_stream(how, caplog):
    caplog.set_level(logging.WARNING, logger="remotemedia.supervisor")
    sup = Supervisor(
        [PassThroughNode(name="up"), DiesInCleanup(how, name="dies"), PassThroughNode(name="down")],
        backoff_base=0.01,
    )
    report = run_bounded(sup, range(40))
    assert report.outputs == list(range(40))
    node = report.nodes["dies"]
    assert node["state"] == "EXITED" and node["restarts"] == 0
    warned = [r.getMessage() for r in caplog.records if "dies" in r.getMessage() and "end of stream" in r.getMessage()]
    assert warned, [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_heartbeat_kill_after_final_commit_ends_the_stream():
    sup = Supervisor(
        [PassThroughNode(name="up"), DiesInCleanup("hang", name="dies")],
        heartbeat_interval=0.1,
        heartbeat_timeout=2.0,
        kill_timeout=0.5,
        backoff_base=0.01,
    )
    report = run_bounded(sup, range(40))
    assert report.outputs == list(range(40))
    node = report.nodes["dies"]
    assert node["hang_kills"] == 1 and node["state"] == "EXITED" and node["restarts"] == 0
    assert node["exit_status"] == -signal.SIGKILL


class DiesBeforeFinalCommit(Node):
    """Passes frames through; in the worker, its first incarnation is SIGKILLed at the last
    moment before its final commit (its own end committed downstream, its inputs' ends not
    yet reported): where a chaos test's SIGKILL once landed under load."""

    def __init__(self, marker: str, **kw):
        super().__init__(**kw)
        self.marker = marker
        self.n = 0

    def initialize(self):
        from supervisor.worker.ledger import Ledger  # (the worker's own: this test reaches inside)

        once, flush = OnceFile(self.marker), Ledger.flush

        def flush_or_die(ledger, final=False):
            if final and once.first():
                os.kill(os.getpid(), signal.SIGKILL)
            return flush(ledger, final)

        Ledger.flush = flush_or_die

    def process(self, x):
        self.n += 1
        return x



class DiesBeforeFinalCommitWithSnapshots(DiesBeforeFinalCommit):
    """The same, committing with snapshots (by message, not in the status block)."""

    def snapshot(self):
        return self.n

    def restore(self, n):
        self.n = n


@pytest.mark.parametrize("snapshots", [False, True], ids=["commits-in-status-block", "commits-with-snapshots"])
@pytest.mark.parametrize("upstream", ["caller", "worker"])
def test_killed_just_before_the_final_commit_is_restarted_and_ends(upstream, snapshots, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="remotemedia.supervisor")
    cls = DiesBeforeFinalCommitWithSnapshots if snapshots else DiesBeforeFinalCommit
    dies = cls(str(tmp_path / "killed"), name="dies")
    nodes = [dies] if upstream == "caller" else [PassThroughNode(name="up"), dies]
    sup = Supervisor(nodes, backoff_base=0.01)
    report = run_bounded(sup, range(40))
    assert report.outputs == list(range(40))
    assert os.path.exists(tmp_path / "killed")
    assert report.nodes["dies"]["restarts"] == 1 and report.nodes["dies"]["state"] == "EXITED"


class Counted(Node):
    """``(n, x)``: ``n`` counts the frames this node consumed (kept across restarts by
    snapshots): every count once means it consumed every frame once."""

    def initialize(self):
        self.n = 0

    def process(self, x):
        self.n += 1
        return (self.n - 1, x)

    def snapshot(self):
        return self.n

    def restore(self, n):
        self.n = n


class FromWhere(Node):
    """``(upstream node, x)``."""

    def process(self, x):
        return (self.current_frame.source, x)


class Sleepy(Node):
    def process(self, x):
        time.sleep(0.0003)
        return x


def _end_topology(name: str, n: int):
    """``(pipeline, victims, the outputs' keys expected)``."""
    if name == "chain":
        return Pipeline([PassThroughNode(name="a"), Sleepy(name="b"), Counted(name="c")]), ["a", "b", "c"], list(range(n))
    if name == "fan-in":
        p = Pipeline([Sleepy(name="b"), PassThroughNode(name="c"), FromWhere(name="d")], connections=[("b", "d"), ("c", "d")])
        return p, ["b", "c", "d"], [(s, x) for s in ("b", "c") for x in range(n)]
    if name == "diamond":  # a worker's outputs meet again: a -> b -> d, a -> c -> d
        p = Pipeline(
            [PassThroughNode(name="a"), Sleepy(name="b"), PassThroughNode(name="c"), FromWhere(name="d")],
            connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        )
        return p, ["a", "b", "c", "d"], [(s, x) for s in ("b", "c") for x in range(n)]
    p = Pipeline([PassThroughNode(name="u"), Sleepy(name="x", options={"replicas": 2}), Counted(name="d")])
    return p, ["u", "x[0]", "x[1]", "d"], list(range(n))


class MarksItsEnd(Node):
    """Passes frames through; its flush() (it has taken its end of stream) creates a file."""

    def __init__(self, marker: str, **kw):
        super().__init__(**kw)
        self.marker = marker

    def process(self, x):
        return x

    def flush(self):
        open(self.marker, "a").close()


class SlowSleepy(Node):
    def process(self, x):
        time.sleep(0.01)
        return x


def test_producer_restarted_after_one_consumer_ended_feeds_the_other(tmp_path):
    # a -> b (slow) -> d, a -> c (fast) -> d; d commits only with rare snapshots, so every
    # commit lags far behind. c ends; then b and a die. b's replacement needs its frames
    # again, from a's replacement, which regenerates them from its old commit, sending c
    # every frame again on the way. c must drop and answer those duplicates after its end,
    # or a stops at a full window toward c, b never gets its frames, d never ends, nor c.
    marker = tmp_path / "c-ended"
    p = Pipeline(
        [PassThroughNode(name="a"), SlowSleepy(name="b"), MarksItsEnd(str(marker), name="c"),
         Counted(name="d", options={"snapshot_interval": 60.0})],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    sup = Supervisor(p, backoff_base=0.01)
    sup.start()
    try:
        for x in range(300):
            sup.send(x)
        sup.close()
        wait_for(marker.exists, 60, "c to take its end of stream")
        pids = sup.worker_pids()
        for victim in ("b", "a"):
            os.kill(pids[victim], signal.SIGKILL)
        got = []
        deadline = time.monotonic() + 120
        try:
            while True:
                got.append(sup.recv(timeout=max(0.1, deadline - time.monotonic())))
        except EndOfStream:
            pass
        except TimeoutError:
            pytest.fail(f"stalled after {len(got)} outputs: {sup.states()}")
        assert sup.join(60), sup.states()
    finally:
        sup.kill()
        sup.join(30)
    assert sorted(o[1] for o in got) == sorted(list(range(300)) * 2)
    assert sorted(o[0] for o in got) == list(range(600))
    assert all(sup.status()["nodes"][v]["restarts"] == 1 for v in ("a", "b"))


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["chain", "fan-in", "diamond", "replicas"])
def test_sigkills_around_the_end_of_the_stream_lose_nothing_and_end(topology):
    # Kills land where workers finish: sending their end of stream, waiting for its commit,
    # committing their inputs' ends, exiting. Every run must end, with every output once.
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "77")))
    n = 300
    for trial in range(4):
        pipeline, victims, expected = _end_topology(topology, n)
        sup = Supervisor(pipeline, max_restarts=10_000, backoff_base=0.01, backoff_max=0.05)
        sup.start()
        got: list = []
        start_killing = len(expected) - rng.randint(0, 40)
        kills = [(rng.uniform(0, 0.08), rng.choice(victims)) for _ in range(rng.randint(1, 3))]

        def killer() -> None:
            while sup.running and len(got) < start_killing:
                time.sleep(0.001)
            for pause, victim in kills:
                time.sleep(pause)
                pid = sup.worker_pids().get(victim)
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        def feed() -> None:
            for x in range(n):
                sup.send(x)
            sup.close()

        threads = [threading.Thread(target=f, daemon=True) for f in (feed, killer)]
        for t in threads:
            t.start()
        what = f"trial {trial} (kills {kills} from output {start_killing})"
        try:
            deadline = time.monotonic() + 120  # (generous: a busy host restarts slowly)
            while True:
                got.append(sup.recv(timeout=max(0.1, deadline - time.monotonic())))
        except EndOfStream:
            for t in threads:
                t.join(30)
            assert sup.join(60), f"{what} did not end after its last output: {sup.states()}"
        except TimeoutError:
            pytest.fail(f"{what} stalled after {len(got)} outputs: {sup.states()}")
        finally:
            sup.kill()
            sup.join(30)
        tagged = topology in ("fan-in", "diamond")
        keys = [tuple(o) for o in got] if tagged else [o[1] for o in got]
        assert sorted(keys) == sorted(expected), f"{what}: outputs lost or duplicated"
        if not tagged:
            assert sorted(o[0] for o in got) == list(range(n)), f"trial {trial}: a frame consumed twice or never"


# --------------------------------------------------------------------------- 8: crash while another node initializes


class SlowInit(Node):
    def __init__(self, seconds: float, **kw):
        super().__init__(**kw)
        self.seconds = seconds

    def initialize(self):
        time.sleep(self.seconds)

    def process(self, x):
        return x


@pytest.mark.slow
def test_crash_after_ready_while_another_node_initializes_is_restarted():
    sup = Supervisor([PassThroughNode(name="quick"), SlowInit(3.0, name="slow")], backoff_base=0.05)
    killed = []

    def killer():
        wait_for(lambda: sup.states().get("quick") == "RUNNING" and sup.states().get("slow") == "STARTING", what="quick READY")
        pid = sup.worker_pids()["quick"]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    report = run_bounded(sup, range(20))
    t.join(10)
    assert killed, "the quick worker was never seen READY while the slow one initialized"
    assert report.outputs == list(range(20))
    assert report.nodes["quick"]["restarts"] == 1 and report.nodes["quick"]["pid"] != killed[0]


class StuckSource(Source):
    """Never yields, and cannot be unwound by SIGTERM: only SIGKILL ends it."""

    def generate(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(3600)
        yield 0


class CrashFirst(Node):
    def __init__(self, once: OnceFile, **kw):
        super().__init__(**kw)
        self.once = once

    def process(self, x):
        if self.once.first():
            os._exit(1)
        return x


@pytest.mark.slow
def test_no_busy_spin_while_a_restart_is_pending_during_abort(tmp_path, monkeypatch):
    # "crash" waits in BACKOFF (1 s) when the run is aborted; "stuck" takes kill_timeout (3 s)
    # to die. Its pending restart must not make the arbiter spin meanwhile.
    sup = Supervisor(
        Pipeline([CrashFirst(OnceFile(str(tmp_path / "once")), name="crash"), StuckSource(name="stuck")], connections=[]),
        backoff_base=1.0,
        kill_timeout=3.0,
    )
    ticks = [0]
    real_tick = Arbiter.tick

    def counting_tick(arbiter):
        ticks[0] += 1
        real_tick(arbiter)

    monkeypatch.setattr(Arbiter, "tick", counting_tick)
    box: Dict[str, Any] = {}

    def go():
        try:
            box["report"] = sup.run([1, 2, 3])
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    wait_for(lambda: sup.states().get("crash") == "BACKOFF", what="the crash")
    sup.kill()
    before = ticks[0]
    t.join(60)
    assert not t.is_alive()
    during = ticks[0] - before
    # about 3 s of abort at a 50 ms tick is ~60 ticks (plus events); a spin is thousands
    assert during < 1000, f"the arbiter turned {during} times while waiting ~3 s for a SIGKILL"
    assert "error" not in box, box.get("error")
    assert box["report"].aborted == "kill requested"


# --------------------------------------------------------------------------- 9: poison frames that hang or eat memory


class PoisonHang(Node):
    """Hangs (or eats memory) on frame ``at``, every time."""

    def __init__(self, at: int, how: str, **kw):
        super().__init__(**kw)
        self.at, self.how = at, how

    def process(self, x):
        if x == self.at:
            if self.how == "memory":
                self.ballast = bytearray(400 * 2**20)
                for i in range(0, len(self.ballast), 4096):
                    self.ballast[i] = 1
            time.sleep(3600)
        return x


@pytest.mark.slow
@pytest.mark.parametrize("how", ["hang", "memory"])
def test_poison_frame_that_hangs_or_eats_memory_is_dead_lettered(how):
    opts: Dict[str, Any] = {"process_timeout": 1.0} if how == "hang" else {"memory_limit": 200 * 2**20}
    sup = Supervisor(
        [PassThroughNode(name="up"), PoisonHang(7, how, name="victim")],
        poison_threshold=2,
        max_restarts=1000,
        backoff_base=0.01,
        kill_timeout=1.0,
        **opts,
    )
    report = run_bounded(sup, range(15), deadline=120)
    assert report.outputs == [x for x in range(15) if x != 7]
    victim = report.nodes["victim"]
    assert victim["dead_letters"] == 1
    assert victim["restarts"] == 2
    kills = victim["hang_kills"] if how == "hang" else victim["memory_kills"]
    assert kills == 2


# --------------------------------------------------------------------------- 17: reserved exit codes after READY


class ExitsOnce(Node):
    def __init__(self, code: int, once: OnceFile, **kw):
        super().__init__(**kw)
        self.code, self.once = code, once

    def process(self, x):
        if x == 5 and self.once.first():
            os._exit(self.code)
        return x


@pytest.mark.slow
@pytest.mark.parametrize("code", [3, 4, 5])
def test_reserved_exit_code_after_ready_is_a_crash_and_restarted(code, tmp_path):
    sup = Supervisor([PassThroughNode(name="up"), ExitsOnce(code, OnceFile(str(tmp_path / "x")), name="exits")], backoff_base=0.01)
    report = run_bounded(sup, range(20))
    assert report.outputs == list(range(20))
    assert report.nodes["exits"]["restarts"] == 1


# --------------------------------------------------------------------------- 11: unpicklable inputs


def test_send_of_an_unpicklable_value_raises_in_the_caller_and_the_pipeline_goes_on():
    with Supervisor([PassThroughNode(name="p")]) as sup:
        sup.send(1)
        with pytest.raises(FrameSerializationError) as ei:
            sup.send({"ok": 1, "lock": threading.Lock()})
        e = ei.value
        assert isinstance(e, SerializationError) and isinstance(e, TypeError)
        assert "send()" in str(e) and e.attribute_path == "lock" and "lock" in e.reason
        sup.send(2)
        assert sup.recv(timeout=30) == 1
        assert sup.recv(timeout=30) == 2
        assert sup.running
        sup.close()


def test_unpicklable_item_of_run_inputs_fails_the_run_naming_its_position():
    def items():
        yield 1
        yield 2
        yield threading.Lock()
        yield 4

    sup = Supervisor([PassThroughNode(name="p")])
    with pytest.raises(FrameSerializationError, match=r"item 2 of run\(\)'s inputs") as ei:
        run_bounded(sup, items())
    assert "supervisor failed" not in str(ei.value)
    assert "lock" in str(ei.value)


# --------------------------------------------------------------------------- 12: run() twice


def test_second_run_is_refused_clearly():
    sup = Supervisor([PassThroughNode(name="p")])
    assert sup.run([1, 2]).outputs == [1, 2]
    with pytest.raises(SupervisorError, match=r"run\(\) works once per Supervisor.*new Supervisor"):
        sup.run([3])


def test_run_after_a_streaming_session_is_refused_clearly():
    with Supervisor([PassThroughNode(name="p")]) as sup:
        sup.send(1)
        assert sup.recv(timeout=30) == 1
    with pytest.raises(SupervisorError, match=r"run\(\) works once per Supervisor"):
        sup.run([2])


# --------------------------------------------------------------------------- 16: what a drain timeout lost


class Stuck(Node):
    def process(self, x):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stuck in "C code": only SIGKILL ends it
        time.sleep(3600)


class Ticker(Source):
    def generate(self):
        i = 0
        while True:
            time.sleep(0.01)
            yield i
            i += 1


@pytest.mark.slow
def test_drain_timeout_report_says_what_was_lost():
    sup = Supervisor([PassThroughNode(name="up"), Stuck(name="stuck")], stop_timeout=1.0, kill_timeout=1.0)
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("report", sup.run(range(5))), daemon=True)
    t.start()
    wait_for(lambda: sup.running and sup.states().get("stuck") == "RUNNING", what="start")
    time.sleep(0.5)
    sup.stop()
    t.join(60)
    assert not t.is_alive()
    report = box["report"]
    assert report.stopped and report.aborted and "drain" in report.aborted
    assert report.killed_nodes == ["stuck"]
    assert report.unprocessed_inputs == 5 and report.unprocessed_source_frames == 0
    summary = report.loss_summary()
    assert "stuck" in summary and "5 inputs" in summary


def test_clean_run_report_has_no_losses():
    report = Supervisor([PassThroughNode(name="p")]).run([1, 2, 3])
    assert report.aborted is None and report.killed_nodes == [] and report.unprocessed_inputs == 0
    assert report.loss_summary() is None


# --------------------------------------------------------------------------- CLI: 16, 18, 15


def _write(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


_TICKER = """
    import time
    from remotemedia import Node, Source
    from remotemedia.nodes import PassThroughNode

    class Ticker(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.01)
                yield i
                i += 1

    pipeline = [Ticker(name="src"), PassThroughNode(name="p")]
"""


def _cli(tmp_path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = dict(os.environ, REMOTEMEDIA_RUNTIME_DIR=str(tmp_path / "run"))
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def _descendants(pid: int):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _wait_workers(p: subprocess.Popen, n: int, tmp_path, ready=None, first=None) -> list:
    """Pids of the CLI's workers once the run is under way: ``ready()`` true (default: the
    first output line was read, into ``first``), ``n`` workers and the control socket there."""
    first = [] if first is None else first

    def running():
        assert p.poll() is None, p.stderr.read()
        if ready is not None:
            return ready()
        if not first:
            import select

            if select.select([p.stdout], [], [], 0.05)[0]:
                # byte by byte from the fd: communicate() reads the fd, not the file's buffer
                line = b""
                while not line.endswith(b"\n"):
                    c = os.read(p.stdout.fileno(), 1)
                    if not c:
                        break
                    line += c
                first.append(line.decode())
        return bool(first)

    wait_for(running, what="the run to be under way")

    def there():
        socks = os.listdir(tmp_path / "run") if (tmp_path / "run").exists() else []
        return len(_descendants(p.pid)) >= n and any(s.endswith(".sock") for s in socks)

    wait_for(there, what="the workers and the control socket")
    return [c.pid for c in _descendants(p.pid)]


def _assert_nothing_left(p: subprocess.Popen, pids, tmp_path) -> None:
    """No worker of the supervisor process ``p``, none of its run's files, no control socket."""
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"worker processes left behind: {alive}"
    base = resources.base_dir()  # a run's directory is named <supervisor pid>x<random>
    files = [d for d in (os.listdir(base) if os.path.isdir(base) else []) if d.startswith(f"{p.pid}x")]
    assert not files, f"shared-memory / iceoryx2 files left behind: {files}"
    left = os.listdir(tmp_path / "run") if (tmp_path / "run").exists() else []
    assert not [f for f in left if f.endswith(".sock")], f"control socket left behind: {left}"


@pytest.mark.slow
def test_cli_drain_timeout_exits_1_saying_what_was_lost(tmp_path):
    path = _write(
        tmp_path,
        "stuck.py",
        _TICKER
        + """
    import signal

    class Stuck(Node):
        def process(self, x):
            open(__file__ + ".stuck", "w").close()
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(3600)

    pipeline = [Ticker(name="src"), Stuck(name="stuck")]
    """,
    )
    p = _cli(tmp_path, path, "--stop-timeout", "1", "--kill-timeout", "1")
    pids = _wait_workers(p, 2, tmp_path, ready=lambda: os.path.exists(path + ".stuck"))
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    lost = err.split("did not drain", 1)[1]
    assert "workers SIGKILLed: stuck" in lost and "frames of the sources were not fully processed" in lost
    _assert_nothing_left(p, pids, tmp_path)


# (SIGHUP reloads a pipeline started from a file: tests/test_live.py)
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGINT, signal.SIGTERM, signal.SIGXCPU])
def test_cli_stop_signals_drain_and_leave_nothing(sig, tmp_path):
    path = _write(tmp_path, "ticker.py", _TICKER)
    p = _cli(tmp_path, path)
    first: list = []
    pids = _wait_workers(p, 2, tmp_path, first=first)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    out = first[0] + out
    assert p.returncode == 0, err
    assert f"{signal.Signals(sig).name} received, draining" in err
    seen = [int(l.split("#")[1].split("]")[0]) for l in out.splitlines() if l.startswith("[p #")]
    assert seen and seen == list(range(len(seen)))  # drained: every frame up to the stop, in order
    _assert_nothing_left(p, pids, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2])
def test_cli_survives_signals_without_meaning(sig, tmp_path):
    path = _write(tmp_path, "ticker.py", _TICKER)
    p = _cli(tmp_path, path)
    pids = _wait_workers(p, 2, tmp_path)
    p.send_signal(sig)
    time.sleep(0.5)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert f"{signal.Signals(sig).name} ignored" in err
    _assert_nothing_left(p, pids, tmp_path)


@pytest.mark.slow
def test_cli_stdout_closed_by_reader_stops_the_pipeline_cleanly(tmp_path):
    # `remotemedia-supervisor start p.py | head -3`
    path = _write(tmp_path, "ticker.py", _TICKER)
    r, w = os.pipe()
    p = _cli(tmp_path, path, stdout=w)
    os.close(w)
    with os.fdopen(r) as reader:
        lines = [reader.readline() for _ in range(3)]
        pids = _wait_workers(p, 2, tmp_path, ready=lambda: True)
    assert all(l.startswith("[p #") for l in lines), lines
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stdout closed" in err and "Traceback" not in err
    _assert_nothing_left(p, pids, tmp_path)


def test_stop_while_starting_is_a_graceful_stop():
    sup = Supervisor([PassThroughNode(name="quick"), SlowInit(1.5, name="slow")])
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("report", sup.run([1, 2])), daemon=True)
    t.start()
    wait_for(lambda: sup.states().get("slow") == "STARTING", what="the start")
    sup.stop()
    t.join(60)
    assert not t.is_alive()
    report = box["report"]  # not "failed to start": nothing had begun, nothing was lost
    assert report.stopped and report.outputs == [] and report.loss_summary() is None


def test_worker_told_to_abort_before_it_began_exits_at_once():
    # A stop right after the spawn: Setup and Abort arrive in one read of the control socket.
    from supervisor.protocol import EXIT_ABORTED, Abort, ControlChannel, Setup, socketpair

    parent, child = socketpair()
    blob_fd = os.memfd_create("empty-node", 0)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.worker", "--fd", str(child.fileno()), "--blob-fd", str(blob_fd),
             "--ppid", str(os.getpid()), "--name", "n"],
            pass_fds=(child.fileno(), blob_fd),
            cwd=ROOT,
        )
    finally:
        child.close()
        os.close(blob_fd)
    chan = ControlChannel(parent)
    chan.send(Setup(spec=None, restore=None))  # type: ignore[arg-type]
    chan.send(Abort())
    try:
        assert proc.wait(timeout=60) == EXIT_ABORTED  # not a load error of the (empty) node
    finally:
        proc.kill()
        proc.wait()
        chan.close()


def test_exception_in_on_output_stops_everything():
    sup = Supervisor([PassThroughNode(name="p")])

    def boom(value, info):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        sup.run(range(100), on_output=boom)
    assert not sup.running and all(pid is None for pid in sup.worker_pids().values())


# --------------------------------------------------------------------------- 15: one huge output line


_HUGE_LINE = """
    import json, resource, sys
    sys.path.insert(0, {root!r})
    from remotemedia import Node, Supervisor

    class Shout(Node):
        def process(self, x):
            sys.stdout.write("x" * {size} + "\\n")
            sys.stdout.write("after\\n")
            sys.stdout.flush()
            return x

    sup = Supervisor([Shout(name="shout")])
    sup.start()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = sup.run([1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"outputs": report.outputs, "growth_kib": after - before}}), flush=True)
"""


@pytest.mark.slow
def test_huge_output_line_is_cut_and_memory_stays_bounded(tmp_path):
    size = 100 * 2**20
    script = tmp_path / "shout.py"
    script.write_text(textwrap.dedent(_HUGE_LINE.format(root=ROOT, size=size)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["outputs"] == [1]
    assert result["growth_kib"] < 32 * 1024, result  # well under the line's 100 MiB
    lines = [l for l in r.stderr.splitlines() if "[shout " in l]
    (cut,) = [l for l in lines if "xxxx" in l]
    assert len(cut) < 128 * 1024
    assert f"{size - 64 * 1024} bytes of this line cut" in cut
    assert any(l.endswith("after") for l in lines)  # the next line comes through whole


# --------------------------------------------------------------------------- 18: a signal while Pipeline.run() starts

_STARTING = """
    import sys, time
    sys.path.insert(0, {root!r})
    from remotemedia import Node, Pipeline

    class SlowInit(Node):
        def initialize(self):
            time.sleep(2.0)
        def process(self, x):
            return x

    print("outputs", Pipeline([SlowInit(name="slow")]).run([1, 2]), flush=True)
"""


@pytest.mark.slow
def test_sighup_while_pipeline_run_starts_leaves_nothing(tmp_path):
    script = tmp_path / "starting.py"
    script.write_text(textwrap.dedent(_STARTING.format(root=ROOT)))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: p.poll() is not None or len(_descendants(p.pid)) >= 1, what="the worker")
    pids = [c.pid for c in _descendants(p.pid)]
    p.send_signal(signal.SIGHUP)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "SIGHUP received" in err and "outputs []" in out
    _assert_nothing_left(p, pids, tmp_path)
