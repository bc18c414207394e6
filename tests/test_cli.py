"""The remotemedia-supervisor CLI, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str, timeout: float = 120, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


@pytest.mark.slow
def test_main_example_runs():
    r = cli("start", "examples/audio_levels.py")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[gate #")]
    assert len(lines) == 20
    assert "'state': 'QUIET'" in lines[0]  # the lambda configured in the parent ran in the worker
    assert "20 outputs" in r.stderr


@pytest.mark.slow
def test_grouped_example_runs_in_two_workers():
    r = cli("start", "examples/grouped_levels.py")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[meter #")]
    assert len(lines) == 20 and "'state': 'QUIET'" in lines[0]
    table = r.stderr[r.stderr.index("node "):]
    assert "meter" in table and "gain" not in table  # three nodes, one stage


@pytest.mark.slow
def test_json_manifest_runs():
    r = cli("start", "examples/tone.json")
    assert r.returncode == 0, r.stderr
    assert len([l for l in r.stdout.splitlines() if l.startswith("[level #")]) == 10


@pytest.mark.slow
def test_class_defined_in_pipeline_script(tmp_path):
    script = tmp_path / "mine.py"
    script.write_text(
        textwrap.dedent(
            """
            from remotemedia import Node, Pipeline
            from remotemedia.nodes import RangeSource

            TABLE = {i: i * i for i in range(10)}

            class Square(Node):          # defined here, not importable by the workers
                def __init__(self, table, **kw):
                    super().__init__(**kw)
                    self.table = table
                def process(self, x):
                    return ("sq", self.table[x])

            pipeline = Pipeline([RangeSource(5), Square(TABLE)])
            """
        )
    )
    r = cli("start", str(script))
    assert r.returncode == 0, r.stderr
    assert [l.split("] ")[1] for l in r.stdout.splitlines()] == [repr(("sq", i * i)) for i in range(5)]


def test_input_file(tmp_path):
    script = tmp_path / "upper.py"
    script.write_text("from remotemedia.nodes import MapNode\npipeline = [MapNode(str.upper)]\n")
    data = tmp_path / "in.txt"
    data.write_text("a\nb\nc\n")
    r = cli("start", str(script), "--input", str(data))
    assert r.returncode == 0, r.stderr
    assert [l.split("] ")[1] for l in r.stdout.splitlines()] == ["'A'", "'B'", "'C'"]


@pytest.mark.slow
def test_queue_options(tmp_path):
    script = tmp_path / "upper.py"
    script.write_text("from remotemedia.nodes import MapNode\npipeline = [MapNode(str.upper)]\n")
    data = tmp_path / "in.txt"
    data.write_text("a\nb\n")
    r = cli("start", str(script), "--input", str(data), "--queue-depth", "4", "--queue-bytes", "0.5")
    assert r.returncode == 0, r.stderr
    assert [l.split("] ")[1] for l in r.stdout.splitlines()] == ["'A'", "'B'"]
    r = cli("start", str(script), "--input", str(data), "--queue-bytes", "0")
    assert r.returncode != 0
    assert "queue_bytes must be a positive int" in r.stderr


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "not found"),
        ("def broken(:\n", "syntax error"),
        ("x = 1\n", "neither `pipeline` nor `build()`"),
        ("pipeline = 42\n", "expected a Pipeline"),
        ("pipeline = []\n", "empty"),
        (
            "from remotemedia import Pipeline\nfrom remotemedia.nodes import PassThroughNode as P\n"
            "pipeline = Pipeline([P(name='a'), P(name='b')], connections=[('a','b'),('b','a')])\n",
            "cycle",
        ),
        ("raise RuntimeError('boom at import')\n", "boom at import"),
    ],
    ids=["missing", "syntax", "no-object", "wrong-type", "empty", "cycle", "import-error"],
)
def test_bad_pipeline_files_exit_2(tmp_path, content, needle):
    path = tmp_path / "p.py"
    if content is not None:
        path.write_text(content)
    r = cli("start", str(path))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr


def test_bad_manifest_exits_2(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"version": "v1", "nodes": [{"id": "x", "node_type": "Nope"}]}))
    r = cli("start", str(path))
    assert r.returncode == 2 and "unknown node_type 'Nope'" in r.stderr and "PassThroughNode" in r.stderr


@pytest.mark.slow
def test_node_failure_exits_1(tmp_path):
    path = tmp_path / "f.py"
    path.write_text(
        "from remotemedia import Node\nfrom remotemedia.nodes import RangeSource\n"
        "class F(Node):\n    def process(self, x):\n        raise KeyError('missing-key')\n"
        "pipeline = [RangeSource(3), F(name='f')]\n"
    )
    r = cli("start", str(path))
    assert r.returncode == 1
    assert "node 'f'" in r.stderr and "missing-key" in r.stderr and "Traceback" in r.stderr


def test_validate_command():
    r = cli("validate", "examples/video_motion.py")
    assert r.returncode == 0 and "4 nodes, 4 connections" in r.stdout


@pytest.mark.slow
def test_fatal_node_exits_1_naming_node_status_and_traceback(tmp_path):
    path = tmp_path / "segv.py"
    path.write_text(
        "import ctypes\nfrom remotemedia import Node\nfrom remotemedia.nodes import RangeSource\n"
        "class Segv(Node):\n    def process(self, x):\n        if x == 2:\n            ctypes.string_at(0)\n        return x\n"
        "pipeline = [RangeSource(5), Segv(name='segv')]\n"
    )
    r = cli("start", str(path), "--max-restarts", "1", "--poison-threshold", "100")
    assert r.returncode == 1
    assert "node 'segv'" in r.stderr and "restart limit reached" in r.stderr and "signal SIGSEGV" in r.stderr
    assert "Segmentation fault" in r.stderr and "in process" in r.stderr  # the worker's last traceback


@pytest.mark.slow
def test_second_sigterm_kills_immediately(tmp_path):
    import signal

    path = tmp_path / "slow.py"
    path.write_text(
        "import time\nfrom remotemedia import Node, Source\n"
        "class Forever(Source):\n    def generate(self):\n        i = 0\n        while True:\n            yield i\n            i += 1\n"
        "class Stuck(Node):\n    def process(self, x):\n        time.sleep(600)\n"
        "pipeline = [Forever(name='src'), Stuck(name='stuck')]\n"
    )
    from conftest import Lines, exit_status, wait_for
    from supervisor.control import find_endpoints, request

    p = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", str(path), "--stop-timeout", "600"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines = Lines(p.stderr)

    def stuck_has_a_frame() -> bool:
        eps = [path for name, path, pid in find_endpoints("slow") if pid == p.pid]
        if p.poll() is not None:
            pytest.fail(f"start exited early: {''.join(lines)}")
        try:
            nodes = request(eps[0], {"cmd": "status"})["status"]["nodes"] if eps else {}
            return bool(nodes) and nodes["stuck"]["state"] == "RUNNING" and nodes["src"]["frames_out"] > 0
        except (OSError, KeyError, ValueError):
            return False

    try:
        # (events, not a schedule: a busy host is slow to start and to react)
        wait_for(stuck_has_a_frame, 120, "the pipeline to run with a frame in flight")
        p.send_signal(signal.SIGTERM)
        wait_for(lambda: any("draining (send it again to kill)" in line for line in lines), 60, "the first SIGTERM's drain")
        p.send_signal(signal.SIGTERM)
        # (generous, and far below the 600 s stop timeout: one that waited for it fails here)
        exit_status(p, 120, stderr=lambda: "".join(lines))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = lines.text()
    assert p.returncode == 1 and "SIGKILL to every worker" in err and "frames in flight were lost" in err, err
