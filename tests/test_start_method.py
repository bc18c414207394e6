"""How workers start (issue 16): ``start_method="spawn"`` (a new interpreter each) and
``"forkserver"`` (forked by the run's template, supervisor/worker/template.py).

A forked worker must be what a spawned one is (same descriptors, environment, signals, process
group; its own random state), its exits must read exactly as a spawned one's (exit codes,
signals, restarts), a template that dies or cannot be used must not take the run down, and
nothing may be left behind (the ``no_leaks`` fixture checks every test: no child process of
ours, template included).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import cloudpickle
import numpy as np
import psutil
import pytest
from click.testing import CliRunner

from remotemedia import Node, Pipeline, Supervisor
from remotemedia.errors import OptionValueError
from remotemedia.nodes import PassThroughNode
from supervisor import launch, resources
from supervisor.launch import imported_modules, make_launcher
from conftest import OnceFile, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("spawn", "forkserver")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- the option


def test_start_method_is_validated():
    with pytest.raises(OptionValueError, match=r"^Supervisor: start_method must be one of 'spawn', 'forkserver', got 'fork'$"):
        Supervisor([PassThroughNode()], start_method="fork")
    with pytest.raises(OptionValueError, match="start_method must be one of"):
        Pipeline([PassThroughNode()]).run([1], start_method=None)
    with pytest.raises(ValueError, match="unknown start_method 'fork'; use 'spawn' or 'forkserver'"):
        make_launcher("fork", {})
    from supervisor.cli import main

    r = CliRunner().invoke(main, ["start", "examples/tone.json", "--start-method", "fork"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: ") and "'fork' is not one of 'spawn', 'forkserver'" in r.output


def test_the_modules_a_pickle_imports_are_preloaded():
    import json as json_module

    node = PassThroughNode(name="p")
    found = imported_modules([cloudpickle.dumps(node)])
    assert "remotemedia.nodes" in found and "__main__" not in found

    def uses_json(x):  # pickled by value: the module it uses is pickled as a module reference
        return json_module.dumps(x)

    assert "json" in imported_modules([cloudpickle.dumps(uses_json)])
    assert imported_modules([b"not a pickle"]) == set()


# --------------------------------------------------------------------------- a forked worker is a worker


class Probe(Node):
    """Appends a description of the process it runs in to the list it gets."""

    def process(self, x):
        return [*x, self.describe()]

    @staticmethod
    def describe():
        fds = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass  # (the listing's own descriptor)
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "group_leader": os.getpgid(0) == os.getpid(),
            "argv": [sys.argv[0].rsplit(os.sep, 2)[-2:], *sys.argv[1::2]],  # (the flags, not their values)
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "path": list(sys.path),
            "stdio": [fds[0], fds[1].split(":")[0], fds[2].split(":")[0]],
            "fds": fds,
            "signals": {
                s.name: getattr(signal.getsignal(s), "__qualname__", repr(signal.getsignal(s)))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGRTMAX)
            },
            "random": random.random(),
            "np_random": float(np.random.random()),
        }


@pytest.mark.slow
def test_a_forked_worker_is_what_a_spawned_one_is():
    seen = {}
    for method in METHODS:
        sup = Supervisor([Probe(name="a"), Probe(name="b")], start_method=method, control=False)
        with sup:
            launcher = sup.status()["launcher"]
            sup.send([])
            got = sup.recv(timeout=60)
            if method == "forkserver":
                template = psutil.Process(launcher["template_pid"])
                template_fds = {f.path for f in template.open_files()} | {
                    os.readlink(f"/proc/{template.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{template.pid}/fd")
                }
            sup.close()
        seen[method] = got
        parent = launcher.get("template_pid") or os.getpid()
        assert launcher["start_method"] == method
        assert all(g["ppid"] == parent for g in got), (method, parent, got)
        if method == "forkserver":
            assert launcher["forked"] == 2 and launcher["spawned"] == 0 and launcher["fallback"] is None
            assert not _running(parent), "the template outlived its run"
    spawned, forked = seen["spawn"][0], seen["forkserver"][0]
    for key in ("group_leader", "argv", "cwd", "env", "path", "stdio", "signals"):
        assert forked[key] == spawned[key], key
    # nothing of the template's (its socket to us, its pidfds) is left open in its workers
    assert all(set(g["fds"].values()) & template_fds <= {"/dev/null"} for g in seen["forkserver"])
    # each forked worker has its own random state, not the template's copied into each
    a, b = seen["forkserver"]
    assert a["random"] != b["random"] and a["np_random"] != b["np_random"]


@pytest.mark.parametrize("method", [pytest.param("spawn", marks=pytest.mark.slow), "forkserver"])
def test_a_pipeline_runs_under_each_start_method(method):
    assert Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b")]).run([1, 2, 3], start_method=method) == [1, 2, 3]


# --------------------------------------------------------------------------- exits read as before


class Dies(Node):
    """Dies the first time it sees frame ``at``: ``how`` is an exit code or a signal name."""

    def __init__(self, at: int, once: OnceFile, how, **kw):
        super().__init__(**kw)
        self.at, self.once, self.how = at, once, how

    def process(self, x):
        if x == self.at and self.once.first():
            if isinstance(self.how, int):
                os._exit(self.how)
            os.kill(os.getpid(), getattr(signal, self.how))
        return x


@pytest.mark.slow
def test_exit_codes_and_signals_of_forked_workers(tmp_path, caplog, capsys):
    nodes = [
        Dies(2, OnceFile(str(tmp_path / "seven")), 7, name="seven"),
        Dies(4, OnceFile(str(tmp_path / "kill")), "SIGKILL", name="killed"),
        Dies(6, OnceFile(str(tmp_path / "segv")), "SIGSEGV", name="segv"),
    ]
    with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
        sup = Supervisor(nodes, start_method="forkserver", control=False, backoff_base=0.05)
        report = sup.run(list(range(10)))
    assert report.outputs == list(range(10))  # each frame exactly once, through three crashes
    for name in ("seven", "killed", "segv"):
        assert report.nodes[name]["restarts"] == 1, name
        assert report.nodes[name]["exit_status"] == 0, name
    text = caplog.text
    assert "node seven (pid" in text and ") exit code 7; restarting in" in text
    assert ") signal SIGKILL; restarting in" in text and ") signal SIGSEGV; restarting in" in text
    assert "Fatal Python error: Segmentation fault" in capsys.readouterr().err  # (faulthandler, as when spawned)


@pytest.mark.slow
def test_a_sigkill_from_outside_and_a_node_helper_under_forkserver(tmp_path, caplog):
    class Helper(Node):
        def __init__(self, pidfile, **kw):
            super().__init__(**kw)
            self.pidfile = pidfile

        def process(self, x):
            if x == 0:
                helper = subprocess.Popen(["sleep", "600"])
                with open(self.pidfile, "w") as f:
                    f.write(str(helper.pid))
            return x

    pidfile = tmp_path / "helper"
    with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
        with Supervisor([Helper(str(pidfile), name="h")], start_method="forkserver", control=False) as sup:
            sup.send(0)
            assert sup.recv(timeout=60) == 0
            helper, worker = int(pidfile.read_text()), sup.worker_pids()["h"]
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: sup.worker_pids()["h"] not in (None, worker) and sup.states()["h"] == "RUNNING", what="the restart")
            wait_for(lambda: not _running(helper), what="the helper to die with its worker")
            sup.send(1)
            assert sup.recv(timeout=60) == 1
            sup.close()
        assert sup.report().nodes["h"]["restarts"] == 1
    assert f"node h (pid {worker}) signal SIGKILL; restarting in" in caplog.text


# --------------------------------------------------------------------------- the template itself


@pytest.mark.slow
def test_a_dead_template_is_replaced_and_its_workers_restarted(caplog):
    with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
        with Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")], start_method="forkserver", control=False) as sup:
            sup.send(0)
            assert sup.recv(timeout=60) == 0
            template = sup.status()["launcher"]["template_pid"]
            workers = sup.worker_pids()
            os.kill(template, signal.SIGKILL)
            wait_for(
                lambda: all(sup.worker_pids()[n] not in (None, workers[n]) and sup.states()[n] == "RUNNING" for n in workers),
                what="both workers restarted",
            )
            launcher = sup.status()["launcher"]
            assert launcher["templates_started"] == 2 and launcher["template_pid"] not in (None, template)
            assert launcher["fallback"] is None and launcher["forked"] == 4
            assert not any(_running(p) for p in workers.values())
            for i in range(1, 6):
                sup.send(i)
            assert [sup.recv(timeout=60) for _ in range(5)] == [1, 2, 3, 4, 5]
            sup.close()
        report = sup.report()
    assert all(report.nodes[n]["restarts"] == 1 for n in workers)
    assert f"the worker template (pid {template}) died (signal SIGKILL); its 2 running worker(s) die with it" in caplog.text
    for n, pid in workers.items():
        assert f"node {n} (pid {pid}) its worker template died; signal SIGKILL; restarting in" in caplog.text


@pytest.mark.slow
def test_a_template_that_does_not_start_falls_back_to_spawn(monkeypatch, caplog):
    start = launch.ForkserverLauncher._start

    def start_and_die(self):
        start(self)
        self.proc.kill()  # dies before its Hello

    monkeypatch.setattr(launch.ForkserverLauncher, "_start", start_and_die)
    with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
        with Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")], start_method="forkserver", control=False) as sup:
            launcher = sup.status()["launcher"]
            assert all(psutil.Process(pid).ppid() == os.getpid() for pid in sup.worker_pids().values())
            sup.send(1)
            assert sup.recv(timeout=60) == 1
            sup.close()
    assert launcher["spawned"] == 2 and launcher["forked"] == 0
    assert launcher["fallback"].startswith("the worker template died")
    assert "the worker template died (signal SIGKILL) before it was ready; workers are spawned instead (start_method='spawn')" in caplog.text


def test_no_pidfds_no_template(monkeypatch, caplog):
    def no_pidfds(pid, flags=0):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(launch.os, "pidfd_open", no_pidfds)
    with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
        assert Pipeline([PassThroughNode(name="a")]).run([1], start_method="forkserver") == [1]
    assert "pidfds are not available here ([Errno 38] Function not implemented); workers are spawned instead" in caplog.text


_MODULE = textwrap.dedent(
    """
    import os, threading, time
    from remotemedia import Node

    with open(os.environ["IMPORT_LOG"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    if os.environ.get("IMPORT_STARTS_A_THREAD"):
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

    class Mine(Node):
        def process(self, x):
            return (x, os.getpid())
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_the_nodes_modules_are_imported_once_in_the_template(tmp_path, monkeypatch, method):
    (tmp_path / "preloaded_nodes.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("IMPORT_LOG", str(tmp_path / "imports"))
    from preloaded_nodes import Mine  # noqa: E402  (this process imports it: line 1)

    try:
        with Supervisor([Mine(name=f"m{i}") for i in range(3)], start_method=method, control=False) as sup:
            template = sup.status()["launcher"].get("template_pid")
            workers = set(sup.worker_pids().values())
            sup.close()
        importers = [int(line) for line in (tmp_path / "imports").read_text().split()]
        if method == "forkserver":
            assert importers == [os.getpid(), template]  # none of the workers imported it again
        else:
            assert importers[0] == os.getpid() and set(importers[1:]) == workers
    finally:
        sys.modules.pop("preloaded_nodes", None)


@pytest.mark.slow
def test_a_template_whose_preloads_start_threads_starts_again_without_them(tmp_path, monkeypatch, caplog):
    (tmp_path / "threaded_nodes.py").write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("IMPORT_LOG", str(tmp_path / "imports"))
    monkeypatch.setenv("IMPORT_STARTS_A_THREAD", "1")
    from threaded_nodes import Mine  # noqa: E402

    try:
        with caplog.at_level(logging.WARNING, logger="remotemedia.supervisor"):
            sup = Supervisor([Mine(name="m")], start_method="forkserver", control=False)
            report = sup.run([1])
        assert report.outputs[0][0] == 1
        assert "the worker template has threads after importing the nodes' modules (" in caplog.text
        assert "threaded_nodes" in caplog.text
        assert "starting it again without them" in caplog.text
    finally:
        sys.modules.pop("threaded_nodes", None)


_SERVICE = textwrap.dedent(
    """
    import json, os, subprocess, sys
    sys.path.insert(0, {root!r})
    from remotemedia import Node, Supervisor

    class Helper(Node):
        def process(self, x):
            self.helper = subprocess.Popen(["sleep", "600"])
            return self.helper.pid

    sup = Supervisor([Helper(name="h")], start_method="forkserver", control=False)
    sup.start()
    sup.send(0)
    helper = sup.recv(timeout=60)
    print(json.dumps({{"root": sup.root, "template": sup.status()["launcher"]["template_pid"],
                       "worker": sup.worker_pids()["h"], "helper": helper}}), flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.slow
def test_a_sigkilled_supervisor_takes_its_template_and_workers_along(tmp_path):
    script = tmp_path / "service.py"
    script.write_text(_SERVICE.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {}
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        pids = json.loads(line)
        root = pids.pop("root")
        assert all(_running(p) for p in pids.values())
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_running(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [k for k, p in pids.items() if _running(p)] == []
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        for p in pids.values():
            try:
                psutil.Process(p).kill()
            except psutil.Error:
                pass
        if pids:
            resources.purge(root)


class Env(Node):
    def process(self, x):
        return [os.environ.get(x)]  # (None would emit nothing)


@pytest.mark.slow
def test_a_worker_whose_environment_changed_is_spawned(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="remotemedia.supervisor"):
        with Supervisor([Env(name="e")], start_method="forkserver", control=False) as sup:
            sup.send("REMOTEMEDIA_TEST_CHANGED")
            assert sup.recv(timeout=60) == [None]
            monkeypatch.setenv("REMOTEMEDIA_TEST_CHANGED", "yes")  # (a new worker gets it, as when spawned)
            worker = sup.worker_pids()["e"]
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: sup.worker_pids()["e"] not in (None, worker) and sup.states()["e"] == "RUNNING", what="the restart")
            assert psutil.Process(sup.worker_pids()["e"]).ppid() == os.getpid()
            sup.send("REMOTEMEDIA_TEST_CHANGED")
            assert sup.recv(timeout=60) == ["yes"]
            launcher = sup.status()["launcher"]
            sup.close()
    assert launcher["forked"] == 1 and launcher["spawned"] == 1
    assert "the environment changed since the worker template started (REMOTEMEDIA_TEST_CHANGED): spawning the worker" in caplog.text
