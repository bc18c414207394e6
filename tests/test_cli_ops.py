"""Operating pipelines from the command line: names, errors, status/stop, outputs, logs.

Every test runs the real ``remotemedia-supervisor`` as subprocesses, in a runtime directory of
its own (``REMOTEMEDIA_RUNTIME_DIR``), so it sees only the pipelines it started.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from typing import List, Optional

import click
import pytest

from supervisor.control import NameInUseError, NameLock, find_endpoints

from conftest import exit_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", str(d))
    return d


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def cli_proc(*args: str) -> subprocess.Popen:
    # (faulthandler: a CLI that does not exit when it should is made to say where it is, see
    # conftest.exit_status)
    return subprocess.Popen([sys.executable, "-m", "supervisor.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONFAULTHANDLER="1"))


ENDLESS = textwrap.dedent(
    """
    import time
    from remotemedia import Node, Pipeline, Source

    class Ticker(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.01)
                yield i
                i += 1

    class Work(Node):
        def process(self, x):
            return x

    pipeline = Pipeline([Ticker(name="ticker"), Work(name={node!r})], name="endless")
    """
)


def endless(tmp_path, node: str = "work"):
    p = tmp_path / f"endless-{node}.py"
    p.write_text(ENDLESS.format(node=node))
    return str(p)


def wait_for_endpoint(name: str, proc: subprocess.Popen, deadline: float = 30.0) -> int:
    end = time.monotonic() + deadline
    while True:
        eps = find_endpoints(name)
        if eps:
            return eps[0][2]
        if proc.poll() is not None:
            pytest.fail(f"{name!r} exited early: {proc.communicate()[1]}")
        assert time.monotonic() < end, f"no endpoint for {name!r}"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


# --------------------------------------------------------------------------- names (item 3)


@pytest.mark.slow
def test_second_start_of_a_running_name_is_refused(tmp_path):
    first = cli_proc("start", endless(tmp_path), "--quiet", "--name", "cams")
    try:
        pid = wait_for_endpoint("cams", first)
        assert pid == first.pid
        line = one_error_line(cli("start", endless(tmp_path), "--quiet", "--name", "cams"))
        assert line == f"error: pipeline 'cams' is already running (pid {first.pid}); stop it first or pick another --name"
        assert [p for _, _, p in find_endpoints("cams")] == [first.pid]  # the refused one never served
        assert cli("stop", "cams").returncode == 0
    finally:
        r = finish(first)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(os.path.join(os.environ["REMOTEMEDIA_RUNTIME_DIR"], "cams.lock"))  # released at exit


def test_name_lock_is_exclusive_across_processes_and_names_its_holder():
    lock = NameLock.acquire("cams")
    try:
        st = os.stat(lock.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and open(lock.path).read().strip() == str(os.getpid())
        with pytest.raises(NameInUseError, match=rf"'cams' is already running \(pid {os.getpid()}\)"):
            NameLock.acquire("cams")  # in this process too
        probe = (
            "from supervisor.control import NameLock, NameInUseError\n"
            "try:\n    NameLock.acquire('cams').release(); print('got it')\n"
            "except NameInUseError as e:\n    print('held by', e.pid)\n"
        )
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.stdout.strip() == f"held by {os.getpid()}", r.stderr
    finally:
        lock.release()
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.stdout.strip() == "got it", r.stderr


@pytest.mark.slow
def test_a_name_with_spaces_and_slashes_is_found_exactly_as_given(tmp_path):
    proc = cli_proc("start", endless(tmp_path), "--quiet", "--name", "my cams/2")
    try:
        wait_for_endpoint("my cams/2", proc)
        assert not find_endpoints("my_cams_2")  # another name
        r = cli("status", "my cams/2", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["name"] == "my cams/2"
        assert cli("status", "my_cams_2").returncode == 1
        assert cli("stop", "my cams/2").returncode == 0
    finally:
        r = finish(proc)
    assert r.returncode == 0, r.stderr


def test_a_name_too_long_for_a_socket_exits_2(tmp_path):
    line = one_error_line(cli("start", endless(tmp_path), "--name", "x" * 200))
    assert "too long for a control socket" in line and "--name" in line


# --------------------------------------------------------------------------- conventions (item 4)


def _walk(command: click.Command, path: str = "remotemedia-supervisor"):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _walk(sub, f"{path} {name}")


def test_every_option_and_argument_has_help():
    from supervisor.cli import main

    missing = []
    for path, command in _walk(main):
        doc = command.help or ""
        for p in command.params:
            if isinstance(p, click.Argument):
                # an argument is documented in its command's docstring, by its metavar
                if p.human_readable_name not in doc:
                    missing.append(f"{path} {p.human_readable_name} (not in the docstring)")
            elif not (getattr(p, "help", None) or "").strip():
                missing.append(f"{path} {p.opts[0]}")
    assert not missing, missing
    assert len(list(_walk(main))) >= 6  # the group, start, status, stop, systemd-unit, validate


def _busy_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    "args,needle",
    [
        (["start", "examples/tone.json", "--metrics-port", "99999"], "metrics_port must be None or a port number"),
        (["start", "examples/tone.json", "--stop-timeout", "-1"], "stop_timeout must be a number of seconds >= 0"),
        (["start", "examples/tone.json", "--kill-timeout", "-0.5"], "kill_timeout must be"),
        (["start", "examples/tone.json", "--init-timeout", "0"], "init_timeout must be a positive number of seconds"),
        (["start", "examples/tone.json", "--queue-bytes", "0"], "queue_bytes must be a positive int"),
        (["start", "examples/tone.json", "--log-level", "LOUD"], "'LOUD' is not one of"),
        (["start", "examples/tone.json", "--no-such-flag"], "No such option"),
        (["stop", "x", "--timeout", "-1"], "--timeout"),
        (["stop"], "give a pipeline NAME or --all"),
        (["status", "--interval", "0"], "--interval"),
        (["systemd-unit", "examples/tone.json", "--watchdog-sec", "-5"], "--watchdog-sec"),
        (["systemd-unit", "examples/tone.json", "--watchdog-sec", "0"], "--watchdog-sec"),
        (["systemd-unit", "examples/tone.json", "--init-timeout", "0"], "init_timeout must be"),
    ],
)
def test_bad_values_exit_2_with_one_line(args, needle):
    line = one_error_line(cli(*args))
    assert needle in line, line


def test_a_metrics_port_in_use_exits_2_with_one_line():
    pytest.importorskip("prometheus_client")
    with _busy_port() as s:
        port = s.getsockname()[1]
        line = one_error_line(cli("start", "examples/tone.json", "--metrics-port", str(port)))
    assert line.startswith(f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}") and "in use" in line


def test_usage_errors_are_one_json_object_with_log_format_json():
    with _busy_port() as s:
        port = s.getsockname()[1]
        runs = [
            cli("start", "examples/tone.json", "--log-format", "json", "--stop-timeout", "-1"),
            cli("start", "examples/tone.json", "--log-format=json", "--metrics-port", str(port)),
            cli("start", "missing.py", "--log-format", "json"),
        ]
    for r in runs:
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        rec = json.loads(lines[0])
        assert rec["level"] == "ERROR" and rec["msg"].startswith("error: ") and rec["node"] is None and rec["pid"] > 0


def test_status_all_with_nothing_running():
    r = cli("status", "--all", "--json")
    assert (r.returncode, r.stdout.strip()) == (0, "[]"), r.stderr
    r = cli("status", "--all")
    assert r.returncode == 0 and r.stdout == "" and "no running pipelines" in r.stderr
    r = cli("stop", "--all")
    assert r.returncode == 0 and "no running pipelines" in r.stderr


PLAIN = textwrap.dedent(
    """
    import numpy as np
    from remotemedia.nodes import MapNode, RangeSource

    def shape(i):
        return {"db": np.float64(-15.03), "i": np.int64(i), "small": np.arange(3), "big": np.zeros(100, np.float32),
                "many": list(range(20)), "raw": b"ab"}

    pipeline = [RangeSource(3, name="src"), MapNode(shape, name="shape")]
    """
)


@pytest.mark.slow
def test_outputs_print_as_plain_values_and_go_to_a_json_lines_file(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    out_file = tmp_path / "out.jsonl"
    r = cli("start", str(script), "--output", str(out_file))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "[shape #0] {'db': -15.03, 'i': 0, 'small': [0, 1, 2], 'big': <ndarray float32 (100,)>, "
        "'many': [0, 1, 2, 3, 4, 5, 6, 7, ... 12 more], 'raw': b'ab'}"
    )
    assert "np." not in r.stdout and "array(" not in r.stdout
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [(x["seq"], x["origin"], x["source"]) for x in records] == [(i, i, "shape") for i in range(3)]
    v = records[2]["value"]
    assert v["db"] == -15.03 and v["i"] == 2 and v["small"] == [0, 1, 2] and v["big"] == [0.0] * 100
    assert v["many"] == list(range(20)) and v["raw"] == {"base64": "YWI="}
    # '-': the JSON lines on stdout, instead of the summaries
    r = cli("start", str(script), "--output", "-")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["value"]["i"] for line in r.stdout.splitlines()] == [0, 1, 2]
    # a file that cannot be written: exit 2 before anything starts
    line = one_error_line(cli("start", str(script), "--output", str(tmp_path / "no" / "such" / "dir.jsonl")))
    assert "--output" in line


def test_validate_counts_in_the_singular(tmp_path):
    script = tmp_path / "two.py"
    script.write_text("from remotemedia.nodes import PassThroughNode as P\npipeline = [P(name='a'), P(name='b')]\n")
    r = cli("validate", str(script))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK: 2 nodes, 1 connection"), r.stdout


@pytest.mark.slow
def test_status_watch_prints_a_table_per_interval_with_whole_names(tmp_path):
    long_name = "a_node_with_a_rather_long_name"
    proc = cli_proc("start", endless(tmp_path, node=long_name), "--quiet")
    watcher: Optional[subprocess.Popen] = None
    try:
        wait_for_endpoint("endless", proc)
        watcher = cli_proc("status", "endless", "--watch", "--interval", "0.2")
        tables: List[List[str]] = []
        end = time.monotonic() + 60
        assert watcher.stdout is not None
        while len(tables) < 3 and time.monotonic() < end:
            ready, _, _ = select.select([watcher.stdout], [], [], 1.0)
            if not ready:
                continue
            line = watcher.stdout.readline()
            if not line:
                break
            if line.startswith("endless  (supervisor pid"):
                tables.append([])
            if tables:
                tables[-1].append(line.rstrip("\n"))
        assert len(tables) >= 3, (tables, watcher.stderr.read() if watcher.poll() is not None else "")
        for table in tables[:2]:
            row = next(l for l in table if l.strip().startswith(long_name))
            assert row.split()[0] == long_name and row.split()[1] in ("STARTING", "RUNNING")  # the whole name, its own column
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)  # Ctrl-C: exit 0
            assert exit_status(watcher, 30) == 0
        assert cli("stop", "endless").returncode == 0
        r = finish(proc)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_stop_all_stops_every_pipeline(tmp_path):
    procs = [cli_proc("start", endless(tmp_path), "--quiet", "--name", n) for n in ("one", "two")]
    try:
        for n, p in zip(("one", "two"), procs):
            wait_for_endpoint(n, p)
        r = cli("stop", "--all")
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.splitlines()) == sorted(f"stopping {n} (pid {p.pid})" for n, p in zip(("one", "two"), procs))
    finally:
        results = [finish(p) for p in procs]
    assert [x.returncode for x in results] == [0, 0], [x.stderr for x in results]
    assert not find_endpoints()


# --------------------------------------------------------------------------- logs (item 8)


FAILING = textwrap.dedent(
    """
    import os
    from remotemedia import Node
    from remotemedia.nodes import RangeSource

    class Crash(Node):
        def process(self, x):
            if x == 1:
                os._exit(7)
            return x

    class Raise(Node):
        def process(self, x):
            if x == 3:
                raise KeyError("missing-key")
            return x

    pipeline = [RangeSource(5, name="src"), Crash(name="crashy"), Raise(name="raiser")]
    """
)


@pytest.mark.slow
def test_failure_records_are_errors_that_name_their_node(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    r = cli("start", str(script), "--quiet", "--log-format", "json", "--backoff-base", "0.01")
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]  # every line is JSON
    crash = [x for x in records if x["logger"] == "remotemedia.supervisor" and "restarting in" in x["msg"]]
    assert crash and all(x["level"] == "ERROR" and x["node"] == "crashy" for x in crash), crash
    failed = [x for x in records if "failed" in x["msg"] and "raiser" in x["msg"] and x["logger"] == "remotemedia.supervisor"]
    assert failed and all(x["level"] == "ERROR" and x["node"] == "raiser" for x in failed), failed
    final = records[-1]
    assert final["logger"] == "remotemedia.cli" and final["level"] == "ERROR" and final["node"] == "raiser"
    about_a_node = [x for x in records if x["logger"] == "remotemedia.supervisor" and x["msg"].startswith("node ")]
    assert about_a_node and all(x["node"] is not None for x in about_a_node), about_a_node
    assert not [x for x in records if x["level"] == "INFO" and "failed" in x["msg"]]


def test_a_program_running_one_name_twice_gets_one_control_socket(caplog):
    from remotemedia import Supervisor
    from remotemedia.nodes import PassThroughNode

    first = Supervisor([PassThroughNode(name="p")], name="twice").start()
    try:
        with caplog.at_level("WARNING", logger="remotemedia.supervisor"):
            second = Supervisor([PassThroughNode(name="p")], name="twice").start()
        try:
            assert [pid for _, _, pid in find_endpoints("twice")] == [os.getpid()]
            assert any("another supervisor" in r.getMessage() and "no control socket" in r.getMessage() for r in caplog.records)
        finally:
            second.close()
            second.join()
        assert find_endpoints("twice")  # the first one's is still there
    finally:
        first.close()
        first.join()
    assert not find_endpoints("twice")
