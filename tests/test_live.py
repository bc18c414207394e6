"""Live changes to a running pipeline: restart a node, reload the pipeline (API, control
socket, CLI, SIGHUP), and the logs the supervisor keeps. Every change happens under a stream
of numbered frames, and every frame must come out exactly once, in order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Dict, List

import pytest

from remotemedia import Node, Pipeline, Source, Supervisor
from remotemedia.errors import ReloadError, SupervisorError
from remotemedia.serialization import node_fingerprint, serialize_node
from supervisor.logring import LogRing

from conftest import Lines, exit_status, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Scale(Node):
    """x -> (x * k, pid): the pid tells which worker processed the frame."""

    def __init__(self, k: int = 1, **kw: Any) -> None:
        super().__init__(**kw)
        self.k = k

    def process(self, x: int) -> Any:
        return (x * self.k, os.getpid())


class Count(Node):
    """x -> (x, frames seen): a state that a restart keeps through snapshot()/restore()."""

    def initialize(self) -> None:
        self.n = 0

    def process(self, x: Any) -> Any:
        self.n += 1
        return (x, self.n)

    def snapshot(self) -> int:
        return self.n

    def restore(self, n: int) -> None:
        self.n = n


class _Stream:
    """Feeds 0..n-1 (a pause now and then, so that changes land mid-stream) and collects the
    outputs, each in a thread of its own."""

    def __init__(self, sup: Supervisor, n: int) -> None:
        self.sup, self.n, self.out, self.sent = sup, n, [], 0
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.feeder.start()
        self.reader.start()

    def _feed(self) -> None:
        for i in range(self.n):
            self.sup.send(i, timeout=60)
            self.sent = i + 1
            if i % 50 == 0:
                time.sleep(0.005)
        self.sup.close()

    def _read(self) -> None:
        for v in self.sup:
            self.out.append(v)

    def wait_sent(self, k: int) -> None:
        wait_for(lambda: self.sent >= k, what=f"{k} inputs sent")

    def join(self) -> List[Any]:
        self.feeder.join(120)
        self.reader.join(120)
        assert not self.feeder.is_alive() and not self.reader.is_alive()
        return self.out


@pytest.mark.slow
def test_restart_node_loses_and_repeats_nothing_and_keeps_state():
    n = 3000
    with Supervisor([Scale(name="a"), Count(name="b")]) as sup:
        s = _Stream(sup, n)
        pids = []
        for k in (500, 1200, 2000):
            s.wait_sent(k)
            pid = sup.status()["nodes"]["b"]["pid"]
            sup.restart_node("b")  # waits until the new worker is READY
            assert sup.status()["nodes"]["b"]["pid"] not in (None, pid)
            pids.append(pid)
        s.wait_sent(2500)
        sup.restart_node("a")
        nodes = sup.status()["nodes"]
        assert (nodes["b"]["replacements"], nodes["b"]["restarts"], nodes["a"]["replacements"]) == (3, 0, 1)
        out = s.join()
    assert [x for (x, _), _ in out] == list(range(n))  # every frame once, in order
    assert [c for _, c in out] == list(range(1, n + 1))  # b's count survived three restarts
    b = sup.report().nodes["b"]
    assert b["frames_in"] == n and b["replacements"] == 3  # every incarnation's frames, once each
    assert len({pid for (_, pid), _ in out}) == 2  # a replaced once: two workers processed frames


def test_restart_node_errors_are_specific():
    with Supervisor([Scale(name="a")]) as sup:
        with pytest.raises(SupervisorError, match="no node named 'nope'; its nodes: a"):
            sup.restart_node("nope")
        sup.close()
        list(sup)
    sup2 = Supervisor([Scale(name="a")])
    with pytest.raises(SupervisorError, match="before start"):
        sup2.restart_node("a")


class Gate(Node):
    """Holds its first frame until a file exists (a stuck downstream)."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = path

    def process(self, x: Any) -> Any:
        while not os.path.exists(self.path):
            time.sleep(0.005)
        return x


@pytest.mark.slow
def test_restart_with_downstream_stuck_hands_over_after_handover_timeout(tmp_path):
    gate = tmp_path / "open"
    with Supervisor([Scale(name="a"), Gate(str(gate), name="b")], handover_timeout=0.5) as sup:
        for i in range(20):
            sup.send(i)
        wait_for(lambda: sup.status()["nodes"]["a"]["frames_out"] >= 20, what="a to send its 20 outputs")
        sup.restart_node("a")  # b commits nothing: a hands over after 0.5 s at the commit it has
        lines = [e["msg"] for e in sup._arbiter.workers["a"].log_ring.since(0)[0]]
        assert any("handing over with frames not yet committed downstream" in m for m in lines), lines
        gate.touch()
        sup.close()
        out = list(sup)
    assert [x for (x, _pid) in out] == list(range(20))  # replayed to the new worker, once each


class Ticks(Source):
    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.n = n

    def generate(self):
        for i in range(self.n):
            time.sleep(0.002)
            yield i


@pytest.mark.slow
def test_restart_a_source_resumes_after_its_last_committed_item():
    n = 700
    sup = Supervisor([Ticks(n, name="src"), Scale(name="a")]).start()
    out: List[Any] = []
    box: Dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", sup.run(on_output=lambda v, i: out.append(v))), daemon=True)
    t.start()
    wait_for(lambda: len(out) > 150, what="150 outputs")
    sup.restart_node("src")
    wait_for(lambda: len(out) > 400, what="400 outputs")
    sup.restart_node("src")
    t.join(120)
    assert not t.is_alive()
    assert [x for x, _ in out] == list(range(n))


@pytest.mark.slow
def test_reload_replaces_changed_nodes_only_and_refuses_shape_changes():
    n = 3000
    with Supervisor([Scale(name="a", k=1), Count(name="b")]) as sup:
        s = _Stream(sup, n)
        s.wait_sent(800)
        b_pid = sup.status()["nodes"]["b"]["pid"]
        # what a reload cannot apply in place: refused, nothing touched
        bad = {
            "the nodes changed (added c)": [Scale(name="a"), Count(name="b"), Count(name="c")],
            "the connections changed": Pipeline([Scale(name="a"), Count(name="b")], connections=[]),
            "options of node 'b' changed (queue_depth 32 -> 8)": [Scale(name="a"), Count(name="b", options={"queue_depth": 8})],
        }
        for message, new in bad.items():
            with pytest.raises(ReloadError, match=message.replace("(", r"\(").replace(")", r"\)")):
                sup.reload(new)
        assert sup.reload([Scale(name="a", k=1), Count(name="b")]) == []  # nothing changed
        assert sup.reload([Scale(name="a", k=10), Count(name="b")]) == ["a"]
        assert sup.status()["nodes"]["b"]["pid"] == b_pid  # unchanged: untouched
        out = s.join()
    values = [v for (v, _), _ in out]
    switch = next(i for i, v in enumerate(values) if i and v == 10 * i)
    assert 800 <= switch < n
    assert values == list(range(switch)) + [10 * i for i in range(switch, n)]  # once each, in order
    assert [c for _, c in out] == list(range(1, n + 1))


def test_reload_from_a_source_and_its_errors():
    with Supervisor([Scale(name="a", k=1)]) as sup:
        with pytest.raises(SupervisorError, match="needs a source"):
            sup.reload()
        version = {"k": 2}
        sup.reload_from(lambda: [Scale(name="a", k=version["k"])])
        assert sup.reload() == ["a"]
        sup.send(3)
        assert sup.recv(timeout=60)[0] == 6
        version["k"] = "bad"
        sup.reload_from(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            sup.reload()
        sup.send(4)
        assert sup.recv(timeout=60)[0] == 8  # still the k=2 worker
        sup.close()
        list(sup)


def test_node_fingerprint_ignores_the_class_tracker_id():
    ns: Dict[str, Any] = {}
    code = textwrap.dedent(
        """
        from remotemedia import Node
        class Local(Node):
            def process(self, x):
                return x
        """
    )
    exec(code, ns)
    first = serialize_node(ns["Local"](name="l"))
    exec(code, ns)  # the same code, a new class object (as a second read of the file)
    second = serialize_node(ns["Local"](name="l"))
    assert first != second and node_fingerprint(first) == node_fingerprint(second)
    exec(code.replace("return x", "return -x"), ns)
    assert node_fingerprint(serialize_node(ns["Local"](name="l"))) != node_fingerprint(first)


def test_log_ring_numbers_limits_and_reports_what_it_lost():
    ring = LogRing(capacity=3)
    for i in range(5):
        ring.add({"msg": f"m{i}", "level": "INFO", "ts": float(i)}, "n", 7)
    lines, last, lost = ring.since(0)
    assert [e["msg"] for e in lines] == ["m2", "m3", "m4"] and last == 5 and lost == 2
    lines, last, lost = ring.since(3)
    assert [e["n"] for e in lines] == [4, 5] and lost == 0
    assert ring.since(5) == ([], 5, 0)
    assert [e["msg"] for e in ring.since(0, limit=1)[0]] == ["m4"]


# --------------------------------------------------------------------------- the CLI

_FILE = """
    import time
    from remotemedia import Node, Source, Pipeline

    class Ticks(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.005)
                yield i
                i += 1

    class Scale(Node):
        def __init__(self, k=1, **kw):
            super().__init__(**kw)
            self.k = k
        def initialize(self):
            print(f"scale k={{self.k}} ready", flush=True)
        def process(self, x):
            return x * self.k

    pipeline = Pipeline([Ticks(name="ticks"), Scale(name="scale", k={k})])
"""


def _cli(tmp_path, *args: str, **kw: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ, REMOTEMEDIA_RUNTIME_DIR=str(tmp_path / "run"))
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180, **kw)


def _outputs(lines: List[str]) -> List[Any]:
    """(origin, value) of the printed outputs: "[scale #12] 12000"."""
    return [(int(line.split("#")[1].split("]")[0]), int(line.rsplit(" ", 1)[1])) for line in list(lines) if line.startswith("[scale #")]


@pytest.mark.slow
def test_cli_restart_reload_logs_list_and_sighup(tmp_path):
    path = tmp_path / "p.py"
    path.write_text(textwrap.dedent(_FILE.format(k=1)))
    env = dict(os.environ, REMOTEMEDIA_RUNTIME_DIR=str(tmp_path / "run"))
    p = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", str(path), "--name", "live"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    lines: List[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        wait_for(lambda: p.poll() is not None or _cli(tmp_path, "status", "live").returncode == 0, what="the pipeline")
        assert p.poll() is None, p.stderr.read()
        listed = json.loads(_cli(tmp_path, "list", "--json").stdout)
        assert [(r["name"], r["pid"], r["workers"]) for r in listed] == [("live", p.pid, 2)]

        r = _cli(tmp_path, "restart", "live", "scale")
        assert r.returncode == 0 and r.stdout.startswith("restarted scale of live: pid "), r.stderr
        r = _cli(tmp_path, "restart", "live", "nope")
        assert r.returncode == 2 and "no node named 'nope'; its nodes: ticks, scale" in r.stderr

        r = _cli(tmp_path, "logs", "live", "--node", "scale", "-n", "5", "--json")
        ready = [json.loads(line) for line in r.stdout.splitlines()]
        assert r.returncode == 0 and [e["msg"] for e in ready] == ["scale k=1 ready"] * 2  # both workers
        assert len({e["pid"] for e in ready}) == 2 and all(e["node"] == "scale" for e in ready)

        assert _cli(tmp_path, "reload", "live").stdout.strip() == "reloaded live: nothing changed"
        follower = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "logs", "live", "--node", "scale", "-n", "0", "-f"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(env, PYTHONFAULTHANDLER="1"),
        )  # fmt: skip
        followed, follower_err = Lines(follower.stdout), Lines(follower.stderr)
        # -n 0 shows what comes after the follower connected, and nothing says when it has: a
        # worker restarted before that (a forked one is READY within milliseconds) is not
        # shown. Restart until one is, then the reload's worker comes after.
        deadline = time.monotonic() + 60
        while not followed:
            assert time.monotonic() < deadline, "logs -f never showed a restarted worker"
            assert _cli(tmp_path, "restart", "live", "scale").returncode == 0
            wait_until = time.monotonic() + 2
            while not followed and time.monotonic() < wait_until:
                time.sleep(0.05)
        path.write_text(textwrap.dedent(_FILE.format(k=1000)))
        r = _cli(tmp_path, "reload", "live")
        assert r.returncode == 0 and r.stdout.startswith("reloaded live: replaced scale (pid "), r.stderr
        wait_for(lambda: any("scale k=1000 ready" in line for line in list(followed)), what="logs -f to show the new worker")
        follower.send_signal(signal.SIGINT)
        assert exit_status(follower, 30, stderr=lambda: "".join(follower_err)) == 0
        before = {e["pid"] for e in ready}  # (-n 0: only what came after, not the lines before)
        assert not any(f"[scale {pid}]" in line for line in followed for pid in before), followed
        path.write_text("pipeline = [")  # a broken file: refused, the pipeline goes on
        r = _cli(tmp_path, "reload", "live")
        assert r.returncode == 1 and "refused, the pipeline goes on unchanged" in r.stderr and "syntax error in" in r.stderr

        path.write_text(textwrap.dedent(_FILE.format(k=7)))
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: any(o and v == 7 * o for o, v in _outputs(lines)), what="outputs of the SIGHUP reload")
        assert p.poll() is None  # SIGHUP reloads, it does not stop
        r = _cli(tmp_path, "stop", "live")
        assert r.returncode == 0, r.stderr
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    reader.join(30)
    assert p.returncode == 0, p.stderr.read()
    outs = _outputs(lines)
    origins = [o for o, _ in outs]
    assert origins == list(range(len(origins)))  # no frame lost or repeated through it all
    ks = [v // o for o, v in outs if o]
    changes = [k for i, k in enumerate(ks) if i == 0 or ks[i - 1] != k]
    assert changes == [1, 1000, 7]
