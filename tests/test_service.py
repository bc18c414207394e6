"""Running as a service: systemd notify/watchdog, unit files, status/stop, metrics, logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import Lines, exit_status, wait_for
from remotemedia import Source, Supervisor
from remotemedia.nodes import PassThroughNode, RangeSource
from supervisor.control import find_endpoints, request
from supervisor.logs import LogSink, parse_worker_line
from supervisor.systemd import SystemdNotifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", str(d))
    return d


def cli_proc(args, env=None, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        **kw,
    )


TICKER = textwrap.dedent(
    """
    import logging, os, time
    from remotemedia import Node, Pipeline, Source

    class Ticker(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.01)
                yield i
                i += 1

    class Work(Node):
        def __init__(self, hang_at=None, **kw):
            super().__init__(**kw)
            self.hang_at = hang_at
        def process(self, x):
            if x == 3:
                print(f"hello from print {{x}}")
                self.logger.warning("a warning with %s", "args")
            if self.hang_at is not None and x == self.hang_at:
                time.sleep(3600)
            return x

    pipeline = Pipeline([Ticker(name="ticker"), Work(name="work", hang_at={hang_at})], name={name!r})
    """
)


def write_ticker(tmp_path, name="svc", hang_at=None):
    p = tmp_path / f"{name}.py"
    p.write_text(TICKER.format(name=name, hang_at=hang_at))
    return p


# --------------------------------------------------------------------------- systemd notify


def test_notifier_disabled_without_socket():
    n = SystemdNotifier(env={})
    assert not n.enabled and n.notify("READY=1") is False and n.watchdog_interval is None


def test_notify_never_blocks_when_systemd_does_not_read(tmp_path):
    # A notify socket whose queue is full (systemd busy, or a socket nobody reads) must not
    # stall the loop that supervises the pipeline: watchdog and status messages are dropped,
    # a state change is held and goes first once the socket takes messages again.
    path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    n = SystemdNotifier(env={"NOTIFY_SOCKET": path})
    results: list = []
    t = threading.Thread(target=lambda: results.extend(n.notify("WATCHDOG=1") for _ in range(5000)), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "notify() blocked on a full socket"
    assert results[0] and not all(results)  # (the queue filled up: the rest were dropped)
    assert n.notify("READY=1", "STATUS=up") is False  # (held)
    assert n.notify("WATCHDOG=1") is False  # (dropped: behind what is held)
    srv.settimeout(0.2)
    first = []
    while True:  # systemd reads again
        try:
            first.append(srv.recv(4096))
        except socket.timeout:
            break
    assert first and set(first) == {b"WATCHDOG=1"}
    assert n.notify("STOPPING=1") is True
    assert [srv.recv(4096), srv.recv(4096)] == [b"READY=1\nSTATUS=up", b"STOPPING=1"]
    n.close()
    srv.close()


@pytest.mark.slow
def test_notify_protocol_ready_status_watchdog_stopping(tmp_path):
    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(0.2)
    script = write_ticker(tmp_path, hang_at=150)  # the worker hangs after ~1.5 s
    proc = cli_proc(
        [
            "start",
            str(script),
            "--quiet",
            "--heartbeat-timeout",
            "1",
            "--stop-timeout",
            "2",
            "--kill-timeout",
            "1",
        ],
        env={"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000", "REMOTEMEDIA_RUNTIME_DIR": str(tmp_path / "run")},
    )
    msgs = []
    t0 = time.monotonic()
    silent = False  # the watchdog went quiet after READY (the event this test waits for)
    try:
        # Until 2 s without WATCHDOG=1 after at least 5 of them (they come every ~0.1 s while
        # healthy); a generous deadline instead of a schedule: a busy host delays the hang.
        while time.monotonic() - t0 < 90.0:
            try:
                data = srv.recv(4096).decode()
            except socket.timeout:
                data = ""
            now = time.monotonic() - t0
            if data:
                msgs.append((now, data))
            dogs = [t for t, m in msgs if "WATCHDOG=1" in m]
            if len(dogs) >= 5 and now - dogs[-1] > 2.0:
                silent = True
                break
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 20
        while time.monotonic() < end and proc.poll() is None:
            try:
                msgs.append((time.monotonic() - t0, srv.recv(4096).decode()))
            except socket.timeout:
                pass
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
    texts = [m for _, m in msgs]
    ready = next(i for i, m in enumerate(texts) if "READY=1" in m)
    assert not any("WATCHDOG=1" in m for m in texts[:ready]), "watchdog before READY"
    assert "STATUS=" in texts[ready] and "workers up" in texts[ready]
    dogs = [t for t, m in msgs if "WATCHDOG=1" in m]
    assert len(dogs) >= 5  # every ~0.1 s while healthy
    # the worker hangs at frame 150 (~1.5 s); heartbeats go stale 1 s later: the watchdog stops
    assert silent, f"watchdog kept going while a worker hung (last of {len(dogs)} at {dogs[-1]:.1f} s)"
    assert any("STOPPING=1" in m for m in texts[ready:])
    assert "watchdog withheld: work" in err


# --------------------------------------------------------------------------- unit file


def systemd_unit(*args):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "systemd-unit", *args], capture_output=True, text=True, cwd=ROOT)


def verify_unit(path, user=False):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("REMOTEMEDIA_REQUIRE_SYSTEMD"):
            pytest.fail("systemd-analyze is required (CI installs Debian's systemd package)")
        pytest.skip("systemd-analyze not installed")
    env = dict(os.environ)
    if user:  # the user manager's view needs a runtime directory
        env["XDG_RUNTIME_DIR"] = str(path.parent)
    v = subprocess.run([analyze, "verify", *(["--user"] if user else []), str(path)], capture_output=True, text=True, env=env)
    assert v.returncode == 0, v.stderr
    assert path.name not in v.stderr, v.stderr  # no warnings about our unit


def test_systemd_unit_renders_and_verifies(tmp_path):
    r = systemd_unit("examples/audio_levels.py", "--name", "audio", "--user", "root")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # an existing --user: no warning
    unit = r.stdout
    cli = f"{sys.executable} -m supervisor.cli"
    for needle in (
        "Type=notify",
        f"ExecStart={cli} start {os.path.join(ROOT, 'examples/audio_levels.py')} --name audio --quiet --stop-timeout 30\n",
        f"ExecReload={cli} reload audio\n",
        "SyslogIdentifier=remotemedia-audio\n",
        "WatchdogSec=30",
        "Restart=on-failure",
        "KillMode=mixed",
        "TimeoutStopSec=45",
        "User=root",
        "NoNewPrivileges=yes",
        "WantedBy=multi-user.target",
    ):
        assert needle in unit, needle
    path = tmp_path / "remotemedia-audio.service"
    path.write_text(unit)
    verify_unit(path)


def test_systemd_unit_passes_start_options_and_escapes_the_name(tmp_path):
    r = systemd_unit("examples/tone.json", "--name", "my cams/2%", "--user", "root", "--no-quiet", "--metrics-port", "9100",
                     "--log-format", "json", "--init-timeout", "5", "--queue-bytes", "0.5", "--trust-instances",
                     "--stop-timeout", "10", "--watchdog-sec", "7.5")
    assert r.returncode == 0, r.stderr
    unit = r.stdout
    exec_start = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    assert exec_start.endswith(
        "--name 'my cams/2%%' --stop-timeout 10 --init-timeout 5 --queue-bytes 0.5 --log-format json --metrics-port 9100 --trust-instances"
    ), exec_start
    assert "--quiet" not in exec_start
    assert f"ExecReload={sys.executable} -m supervisor.cli reload 'my cams/2%%'\n" in unit
    assert "SyslogIdentifier=remotemedia-my-cams-2\n" in unit and "WatchdogSec=7.5\n" in unit and "TimeoutStopSec=25\n" in unit
    path = tmp_path / "remotemedia-my-cams-2.service"
    path.write_text(unit)
    verify_unit(path)


def test_systemd_user_unit_verifies(tmp_path):
    r = systemd_unit("examples/tone.json", "--name", "tone", "--user-unit")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    unit = r.stdout
    assert "WantedBy=default.target" in unit and "User=" not in unit and "multi-user" not in unit
    d = tmp_path / "user"
    d.mkdir(mode=0o700)
    path = d / "remotemedia-tone.service"
    path.write_text(unit)
    verify_unit(path, user=True)
    r = systemd_unit("examples/tone.json", "--user-unit", "--install", "--unit-dir", str(tmp_path / "units"))
    assert r.returncode == 0, r.stderr
    assert "WantedBy=default.target" in (tmp_path / "units" / "remotemedia-tone-json.service").read_text()


@pytest.mark.slow
def test_systemd_unit_warns_about_root_and_unknown_users_and_checks_values():
    r = systemd_unit("examples/tone.json")
    assert r.returncode == 0 and "warning: no --user: the service will run as root" in r.stderr
    r = systemd_unit("examples/tone.json", "--user", "no-such-user-rm")
    assert r.returncode == 0 and "warning: user 'no-such-user-rm' does not exist" in r.stderr and "User=no-such-user-rm" in r.stdout
    for args in (["--watchdog-sec", "-5"], ["--watchdog-sec", "0"], ["--stop-timeout", "-1"], ["--metrics-port", "70000"],
                 ["--user-unit", "--user", "root"]):
        r = systemd_unit("examples/tone.json", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and r.stdout == "", (args, r.stderr)


def test_systemd_unit_install(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "systemd-unit", "examples/tone.json", "--install", "--unit-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "remotemedia-tone-json.service").read_text()
    assert "Type=notify" in text and "tone.json" in text


# --------------------------------------------------------------------------- status / stop


def status_json(name):
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "status", name, "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_status_shows_every_node_with_moving_counters(runtime_dir):
    class Ticker(Source):
        def generate(self):
            i = 0
            while True:
                time.sleep(0.005)
                yield i
                i += 1

    sup = Supervisor([Ticker(name="ticker"), PassThroughNode(name="pass"), PassThroughNode(name="sink")], name="live")
    t = threading.Thread(target=lambda: sup.run(on_output=lambda v, i: None), daemon=True)
    t.start()
    try:
        names = ("ticker", "pass", "sink")

        def wait_status(ready):
            # The figures are sampled about once a second; a busy host delays the first
            # samples: wait for them (generous deadline) instead of sleeping a fixed time.
            deadline = time.monotonic() + 60
            while True:
                st = status_json("live") if find_endpoints("live") else None
                if st is not None and set(st["nodes"]) == set(names) and ready(st["nodes"]):
                    return st
                assert time.monotonic() < deadline, f"status never got there: {st}"
                time.sleep(0.2)

        a = wait_status(lambda ns: all(ns[n]["frames_out"] > 0 and ns[n]["p50_ms"] is not None for n in names))
        b = wait_status(lambda ns: all(ns[n]["frames_out"] > a["nodes"][n]["frames_out"] for n in names))
        for name in ("ticker", "pass", "sink"):
            na, nb = a["nodes"][name], b["nodes"][name]
            assert nb["frames_out"] > na["frames_out"] > 0
            assert nb["state"] == "RUNNING" and isinstance(nb["pid"], int)
            assert nb["fps_out"] > 10
            assert nb["rss_bytes"] > 1e6 and nb["cpu_percent"] is not None
            assert nb["p50_ms"] is not None and nb["p99_ms"] >= nb["p50_ms"]
        (inp,) = b["nodes"]["sink"]["inputs"]
        assert inp["from"] == "pass" and inp["depth"] == 32 and inp["dropped"] == 0 and inp["queued"] >= 0
        table = subprocess.run([sys.executable, "-m", "supervisor.cli", "status", "live"], capture_output=True, text=True, cwd=ROOT)
        assert table.returncode == 0 and "ticker" in table.stdout and "RUNNING" in table.stdout and "p99ms" in table.stdout
        every = subprocess.run([sys.executable, "-m", "supervisor.cli", "status", "--all", "--json"], capture_output=True, text=True, cwd=ROOT)
        assert [s["name"] for s in json.loads(every.stdout)] == ["live"]
    finally:
        sup.stop()
        t.join(30)
    assert not find_endpoints("live")  # the socket is removed at exit


@pytest.mark.slow
def test_stop_command_drains_and_exits_0(tmp_path, runtime_dir):
    script = write_ticker(tmp_path, name="stopme")
    proc = cli_proc(["start", str(script)], env={"REMOTEMEDIA_RUNTIME_DIR": str(runtime_dir)})
    try:
        deadline = time.monotonic() + 15
        while not find_endpoints("stopme"):
            assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no endpoint"
            time.sleep(0.05)
        time.sleep(0.5)
        r = subprocess.run([sys.executable, "-m", "supervisor.cli", "stop", "stopme"], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    seen = [int(l.split("] ")[1]) for l in out.splitlines() if l.startswith("[work #")]
    assert seen and seen == list(range(len(seen)))  # drained: nothing lost at the end


def test_stop_unknown_name_fails(runtime_dir):
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "stop", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "no running pipeline named 'nope'" in r.stderr


SYSTEM_PYTHON = "/usr/bin/python3"  # readable by other users, unlike a venv under /root

PROBE = (
    "import json,socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(3)\n"
    "try:\n"
    " s.connect(sys.argv[1])\n"
    "except PermissionError:\n"
    " print('denied'); sys.exit()\n"
    "try:\n"
    " s.sendall(b'{\"cmd\": \"status\"}\\n'); print('answered' if s.recv(100) else 'closed')\n"
    "except ConnectionError:\n"
    " print('closed')\n"
)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON), reason="needs root and a system python to act as a second user")
def test_second_user_cannot_connect(tmp_path_factory, monkeypatch):
    base = tempfile.mkdtemp(prefix="rm-ctl-", dir="/tmp")
    os.chmod(base, 0o711)  # others may traverse: only our own permissions can stop them
    run = os.path.join(base, "run")
    monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", run)
    sup = Supervisor([PassThroughNode()], name="private").start()
    try:
        ((_, path, _),) = find_endpoints("private")
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        assert oct(os.stat(run).st_mode & 0o777) == "0o700"

        def probe():
            r = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, path], capture_output=True, text=True, user=65534, group=65534, cwd="/")
            return r.stdout.strip() or r.stderr.strip()

        assert probe() == "denied"
        # even with the file permissions opened up, the peer-uid check refuses the other user
        os.chmod(run, 0o755)
        os.chmod(path, 0o777)
        assert probe() == "closed"
        assert request(path, {"cmd": "status"})["ok"]  # the owner can
    finally:
        sup.close()
        sup.join()
        shutil.rmtree(base, ignore_errors=True)


def test_control_socket_answers_malformed_requests_with_what_is_wrong(runtime_dir):
    # Requests are JSON from anyone scripting against the socket, not only from the CLI: each
    # wrong one gets an answer saying what is wrong, and the supervisor runs on.
    sup = Supervisor([PassThroughNode(name="src"), PassThroughNode(name="p")], name="ctlbad").start()
    try:
        ((_, path, _),) = find_endpoints("ctlbad")
        for req, error in [
            ({"cmd": "restart", "node": ["p"]}, "'node' must be the name of a node of 'ctlbad'"),
            ({"cmd": "restart"}, "'node' must be the name"),
            ({"cmd": "restart", "node": "nope"}, "has no node named 'nope'; its nodes: src, p"),
            ({"cmd": "logs", "node": ["p"]}, "has no node named ['p']"),
            ({"cmd": "logs", "after": [1]}, "'after' must be the 'cursor' of an earlier answer"),
            ({"cmd": "logs", "after": {"p": "x"}}, "'after' must be the 'cursor'"),
            ({"cmd": "logs", "lines": "5"}, "'lines' must be a whole number of lines, got '5'"),
            ({"cmd": "bogus"}, "unknown command 'bogus'"),
            ([1, 2], "request must be a JSON object"),
        ]:
            resp = request(path, req)
            assert resp["ok"] is False and error in resp["error"], (req, resp)
        with socket.socket(socket.AF_UNIX) as s:  # (not JSON at all)
            s.connect(path)
            s.sendall(b"status please\n")
            assert b"JSONDecodeError" in s.recv(4096)
        assert request(path, {"cmd": "logs", "node": "p", "after": {"p": 0}, "lines": 5})["ok"]
        assert request(path, {"cmd": "status"})["ok"] and sup.running
    finally:
        sup.close()
        sup.join()


# --------------------------------------------------------------------------- metrics, logs, progress


@pytest.mark.slow
def test_prometheus_endpoint(runtime_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sup = Supervisor([RangeSource(10**9, name="src"), PassThroughNode(name="p")], name="metrics", metrics_port=port)
    t = threading.Thread(target=lambda: sup.run(on_output=lambda v, i: None), daemon=True)
    t.start()
    want = 'remotemedia_node_process_latency_seconds_count{node="p",pipeline="metrics"} '
    no_latency_yet = want + "0.0\n"
    try:
        # the latency histogram fills with the first heartbeat, a heartbeat interval after READY
        deadline = time.monotonic() + 15
        body = ""
        while (want not in body or no_latency_yet in body) and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except urllib.error.URLError:
                pass  # the endpoint starts with the supervisor's thread
    finally:
        sup.stop()
        t.join(30)
    assert 'remotemedia_node_frames_out_total{node="p",pipeline="metrics"}' in body
    assert 'remotemedia_node_up{node="src",pipeline="metrics"} 1.0' in body
    assert want in body and no_latency_yet not in body
    assert 'remotemedia_node_process_latency_seconds_bucket{le="+Inf",node="p",pipeline="metrics"}' in body
    assert 'remotemedia_edge_queued_frames{node="p",pipeline="metrics",source="src"}' in body
    assert "quantile=" not in body and "remotemedia_build_info{" in body


@pytest.mark.slow
def test_json_logs_parse_with_node_and_pid(tmp_path, runtime_dir):
    script = write_ticker(tmp_path, name="logs")
    proc = cli_proc(["start", str(script), "--quiet", "--log-format", "json", "--log-level", "INFO"])
    lines = Lines(proc.stderr)
    try:
        # (the event, not a schedule: a busy host is slow to start)
        wait_for(lambda: any('"hello from print 3"' in line for line in lines) or proc.poll() is not None, 120, "print 3")
        proc.send_signal(signal.SIGTERM)
        exit_status(proc, 60, stderr=lambda: "".join(lines))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = lines.text()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.strip()]  # every line is JSON
    work = [r for r in records if r.get("node") == "work"]
    assert any(r["msg"] == "hello from print 3" and r["logger"] == "stdout" for r in work)
    warn = [r for r in work if r["msg"] == "a warning with args"]
    assert warn and warn[0]["level"] == "WARNING" and warn[0]["logger"] == "remotemedia.node.work"
    assert all(isinstance(r["pid"], int) and r["ts"].endswith("Z") for r in work)
    assert any(r["node"] is None and "draining" in r["msg"] for r in records)  # the supervisor's own


def test_text_logs_under_journal_have_no_timestamp():
    import io

    buf = io.StringIO()
    LogSink("text", stream=buf, journal=True).write({"level": "ERROR", "logger": "x", "msg": "boom", "ts": 0.0}, "n", 7)
    assert buf.getvalue() == "<3>ERROR [n 7] x: boom\n"
    buf = io.StringIO()
    LogSink("text", stream=buf, journal=False).write({"level": "INFO", "logger": "x", "msg": "hi", "ts": 0.0}, "n", 7)
    assert buf.getvalue() == "1970-01-01T00:00:00.000Z INFO [n 7] x: hi\n"
    assert parse_worker_line("plain", "stdout")["level"] == "INFO"


@pytest.mark.slow
def test_progress_bar_on_tty_only(tmp_path):
    import pty

    script = tmp_path / "fin.py"
    script.write_text("from remotemedia.nodes import RangeSource, PassThroughNode\npipeline = [RangeSource(300), PassThroughNode()]\n")
    # on a terminal
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", str(script), "--quiet"], stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    tty_err = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "100% 300/300" in tty_err and "\r\x1b[K" in tty_err
    # not on a pipe
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "start", str(script), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "\r" not in r.stderr and "%" not in r.stderr
