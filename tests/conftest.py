"""Shared fixtures.

The whole session runs with ``REMOTEMEDIA_SHM_DIR`` set to a fresh private directory (removed
at the end), so every run directory a test makes (see :mod:`supervisor.resources`) is this
session's own, and concurrent sessions on one host never see each other's runs. Likewise
``REMOTEMEDIA_RUNTIME_DIR`` (control sockets, pipeline-name locks): concurrent sessions never
claim each other's pipeline names.

``no_leaks`` (autouse) checks after every test that it left no worker process and no run
behind: no child process of the test runner, and no new entry in the session's directory.
``no_held_runs`` (autouse) checks that this process holds no file of a finished run (open or
mapped) that a garbage collection would not release; tests/test_release.py checks, with the
collector off, that a run releases everything without one.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, List, Optional, Set

import psutil
import pytest

from supervisor import resources

SESSION_SHM_DIR = ""
SESSION_RUNTIME_DIR = ""


def pytest_configure(config: pytest.Config) -> None:
    # A hook, not import time: workers import this module too (to unpickle test helpers).
    global SESSION_SHM_DIR
    SESSION_SHM_DIR = tempfile.mkdtemp(prefix="rmt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.environ[resources.ENV_BASE] = SESSION_SHM_DIR  # before any test, and any process it starts
    # control sockets and pipeline-name locks: pipeline names are claimed per runtime dir
    global SESSION_RUNTIME_DIR
    SESSION_RUNTIME_DIR = tempfile.mkdtemp(prefix="rmc-")
    os.environ["REMOTEMEDIA_RUNTIME_DIR"] = SESSION_RUNTIME_DIR
    # A runner started in the background by a non-interactive shell (`pytest ... &` in a
    # script) inherits SIGINT ignored, and so would every CLI a test starts and then stops
    # with Ctrl-C: it never exits (Python keeps an ignored SIGINT ignored). Tests run as from
    # a terminal: a handler here is reset to the default in each child at exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # A run stopped with SIGTERM (a CI timeout, `timeout`) ends as an interrupted one, so that
    # pytest_unconfigure still removes the session's directories (a killed run's shared memory
    # would stay on the host's tmpfs).
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION_SHM_DIR:
        shutil.rmtree(SESSION_SHM_DIR, ignore_errors=True)
    if SESSION_RUNTIME_DIR:
        shutil.rmtree(SESSION_RUNTIME_DIR, ignore_errors=True)


def _runs() -> Set[str]:
    """Every entry (run directory) in the session's shared-memory directory."""
    try:
        return {os.path.join(SESSION_SHM_DIR, f) for f in os.listdir(SESSION_SHM_DIR)}
    except FileNotFoundError:
        return set()


def _children() -> List[psutil.Process]:
    """This process's live descendants: its own runs' workers and helpers, nobody else's
    (other test sessions on the host are not in this tree)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            # (one that exits meanwhile is simply not there: it must not hide the others)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def _describe(p: psutil.Process) -> object:
    try:
        return (p.pid, p.cmdline())
    except psutil.Error:
        return (p.pid, "exited")


@pytest.fixture(autouse=True)
def no_leaks():
    before_files = _runs()
    before_children = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 30.0  # generous: a busy host is slow to reap, never a pass
    while True:
        left = [p for p in _children() if p.pid not in before_children]
        new_files = _runs() - before_files
        if (not left and not new_files) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in left:  # do not let one failure cascade into every later test
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"worker processes left behind: {[_describe(p) for p in left]}"
    assert not new_files, f"run directories left behind: {sorted(new_files)}"


def shm_mapping_of(address: int) -> str:
    """Path of the mapping of this process that contains ``address`` ('' when anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return parts[5] if len(parts) > 5 else ""
    return ""


def in_run_dir(path: str) -> bool:
    """Whether ``path`` (a mapping's file) is an iceoryx2 segment inside a run directory of
    this session."""
    base = os.environ[resources.ENV_BASE].rstrip("/") + "/"
    return path.startswith(base) and os.path.basename(path).startswith(resources.PREFIX)


def wait_for(cond, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``cond()`` until it is true; fail the test after ``timeout`` seconds (a generous
    deadline for an event, never a speed claim)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


class Lines(list):
    """The lines of a child's text pipe as they come (a thread reads it to its end): for tests
    that wait for what a process says, and so it never blocks writing to a full pipe.
    ``text()`` once it has exited: every line, the pipe read to its end."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self._reader = threading.Thread(target=lambda: self.extend(pipe), daemon=True)
        self._reader.start()

    def text(self, timeout: float = 30.0) -> str:
        self._reader.join(timeout)
        return "".join(self)


def exit_status(proc: subprocess.Popen, timeout: float, stderr: Optional[Callable[[], str]] = None) -> int:
    """``proc``'s exit status once it exits within ``timeout`` s; else the test fails with
    what it was doing: its state and signal masks (/proc), then the Python stack of each of
    its threads when it runs with ``PYTHONFAULTHANDLER=1`` (SIGABRT makes faulthandler print
    them to its stderr as it dies). For a CLI that must exit on Ctrl-C: once, under load,
    one did not within 30 s, and nothing said why.

    Its pipes are drained meanwhile (``communicate``: a process blocked writing to a full
    pipe never exits), unless the test's own threads read them: then ``stderr()`` returns
    what they read of its stderr."""
    try:
        if stderr is None:
            proc.communicate(timeout=timeout)
        else:
            proc.wait(timeout)
        return proc.returncode
    except subprocess.TimeoutExpired:
        pass
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            state = [line.strip() for line in f if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))]
    except OSError:
        state = ["(no /proc entry)"]
    ignored = next((int(s.split()[1], 16) for s in state if s.startswith("SigIgn")), 0)
    if ignored & (1 << (signal.SIGINT - 1)):
        state.insert(0, "it ignores SIGINT (inherited? see pytest_configure)")
    proc.send_signal(signal.SIGABRT)
    err = ""
    try:
        if stderr is None:
            err = proc.communicate(timeout=15)[1] or ""
        else:
            proc.wait(15)
            time.sleep(0.5)  # (the reading thread's last lines)
            err = stderr()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    err = err.decode(errors="replace") if isinstance(err, bytes) else err
    pytest.fail(f"{proc.args} did not exit within {timeout} s: {'; '.join(state)}\n{err[-8000:]}")


@pytest.fixture
def node():
    """An iceoryx2 node of the bridge in a run of its own, closed after the test, which fails
    if the run leaves anything in shared memory."""
    from remotemedia import _ipc_bridge

    run = resources.new_run()
    n = _ipc_bridge.Node(run.prefix, "test", run.root)
    yield n
    n.close()  # (pytest holds the object until the test is torn down)
    assert resources.purge(run.root) == []


class OnceFile:
    """True the first time it is asked, across processes (a marker file)."""

    def __init__(self, path: str):
        self.path = path

    def first(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True


def held_files_of_finished_runs() -> List[str]:
    """Files of this session's runs whose directory is gone (finished runs) that this process
    still holds open or maps."""
    base = SESSION_SHM_DIR.rstrip("/") + "/"
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) > 5:
                paths.add(parts[5].strip())
    out = []
    for p in paths:
        if p.startswith(base):
            run = p[len(base):].split("/")[0].removesuffix(" (deleted)")
            if not os.path.exists(base + run):
                out.append(p)
    return sorted(out)


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    if outcome.get_result().failed:
        item.stash[_FAILED] = True  # (its traceback keeps the test's locals)


@pytest.fixture(autouse=True)
def no_held_runs(request: pytest.FixtureRequest):
    yield
    if request.node.stash.get(_FAILED, False):
        return
    deadline = time.monotonic() + 30.0  # a run's thread may still be finishing (a busy host)
    while held_files_of_finished_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    if held_files_of_finished_runs():
        gc.collect()  # what a cycle holds is tests/test_release.py's business; this is for the rest
    held = held_files_of_finished_runs()
    assert not held, f"this process still holds files of finished runs: {held[:10]}"
