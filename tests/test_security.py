"""Issue 10, items 1-4: nothing the runtime creates can be planted, read, truncated or blocked
by another local user, and a corrupt file never hangs a start, a restart or close().

The tests that act as another user create a throwaway user (useradd; removed with userdel in
a finally) and run the system interpreter as that user, with a copy of what it imports; they
are skipped when not root.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, Iterator, List, Tuple

import psutil
import pytest

from remotemedia import Pipeline, Supervisor
from remotemedia.errors import SupervisorError, UnsafeDirectoryError
from remotemedia.nodes import PassThroughNode
from supervisor import resources
from supervisor.control import find_endpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by other users, unlike a venv under /root
DEADLINE = 120.0  # generous: what matters is that it ends at all

needs_other_user = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, useradd and a system python to act as a second user",
)


# --------------------------------------------------------------------------- helpers


class OtherUser:
    def __init__(self, name: str) -> None:
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid
        self.pythonpath = ""

    def run(self, args: List[str], **kw) -> subprocess.CompletedProcess:
        """A command as this user (stdout and stderr captured as text)."""
        return subprocess.run(args, user=self.uid, group=self.gid, extra_groups=[], cwd="/", env=self.env(),
                              capture_output=True, text=True, timeout=DEADLINE, **kw)

    def python(self, code: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run([SYSTEM_PYTHON, "-c", textwrap.dedent(code), *args], **kw)

    def popen_python(self, code: str) -> subprocess.Popen:
        return subprocess.Popen([SYSTEM_PYTHON, "-c", textwrap.dedent(code)], user=self.uid, group=self.gid,
                                extra_groups=[], cwd="/", env=self.env(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def env(self) -> Dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONPATH": self.pythonpath, "PYTHONDONTWRITEBYTECODE": "1"}


def _user_pythonpath() -> str:
    """A copy of the runtime and what it imports, readable by anyone (the venv and the
    checkout may live under a 0700 home)."""
    import cloudpickle
    import numpy

    d = tempfile.mkdtemp(prefix="rm-sec-py-")
    os.chmod(d, 0o755)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("remotemedia", "supervisor"):
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(d, pkg), ignore=skip)
    for mod in (numpy, cloudpickle, psutil):
        src = os.path.dirname(mod.__file__)
        shutil.copytree(src, os.path.join(d, os.path.basename(src)), ignore=skip)
        libs = src + ".libs"  # numpy's bundled shared libraries
        if os.path.isdir(libs):
            shutil.copytree(libs, os.path.join(d, os.path.basename(libs)))
    for dirpath, dirs, files in os.walk(d):
        for n in dirs:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in files:
            p = os.path.join(dirpath, n)
            os.chmod(p, os.stat(p).st_mode | 0o444)
    return d


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    name = f"rmsec{secrets.token_hex(3)}"
    r = subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                        "--user-group", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    user = OtherUser(name)
    pypath = ""
    try:
        user.pythonpath = pypath = _user_pythonpath()
        yield user
    finally:
        # what the user's runs may have left at the default places, then the user
        for leftover in (f"/dev/shm/remotemedia-{user.uid}", f"/tmp/remotemedia-{user.uid}"):
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        subprocess.run(["pkill", "-KILL", "-u", str(user.uid)], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)
        if pypath:
            shutil.rmtree(pypath, ignore_errors=True)


@pytest.fixture
def sticky_dir() -> Iterator[str]:
    """A world-writable sticky directory, like /dev/shm and /tmp, where another user can plant
    names before the runtime uses them."""
    d = tempfile.mkdtemp(prefix="rms-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _own_pids(sup: Supervisor) -> List[int]:
    return [os.getpid(), *sup.worker_pids().values()]


def _shared_paths(pid: int) -> List[str]:
    """Every file a process maps or holds open."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                out.add(parts[5].strip().removesuffix(" (deleted)"))
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


# --------------------------------------------------------------------------- item 1: one private directory


def test_every_file_of_a_run_is_in_its_private_directory():
    """The supervisor and every worker map and hold files only inside the run's private
    directory: nothing of the run in /dev/shm itself, in /tmp/iceoryx2 or at a board name."""
    with Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")]) as sup:
        sup.send(b"x" * 5000)
        assert sup.recv(timeout=DEADLINE) == b"x" * 5000
        base = os.path.dirname(sup.root)
        assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700
        assert stat.S_IMODE(os.lstat(sup.root).st_mode) == 0o700
        outside = []
        for pid in _own_pids(sup):
            paths = _shared_paths(pid)
            assert any(p.startswith(sup.root + "/") for p in paths), pid  # it does use the run dir
            outside += [(pid, p) for p in paths
                        if (p.startswith(("/dev/shm/", "/tmp/iceoryx2")) and p != sup.root and not p.startswith(sup.root + "/"))
                        # (this test process may still map a finished run of an earlier test
                        # until the garbage collector frees it: that is another run's file)
                        and not (pid == os.getpid() and p.startswith(base + "/"))]
        assert not outside, f"files of the run outside {sup.root}: {outside}"
        boards = [p for p in _shared_paths(sup.worker_pids()["a"]) if "remotemedia-board" in p]
        assert boards and all(p.startswith("/memfd:") for p in boards)  # no name to plant
        for path in resources.files_of(sup.root):  # everything in it is ours
            assert os.lstat(path).st_uid == os.geteuid()
        sup.close()
    assert not os.path.exists(sup.root)


def test_run_directory_too_long_for_sockets_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(resources.ENV_BASE, str(tmp_path / ("x" * 80)))
    with pytest.raises(SupervisorError, match="too long for iceoryx2's sockets.*REMOTEMEDIA_SHM_DIR"):
        Supervisor([PassThroughNode()]).start()
    assert not (tmp_path / ("x" * 80)).exists()


@pytest.mark.parametrize("plant", ["other-owner", "symlink", "writable", "file"])
def test_unsafe_base_directory_is_refused(plant, sticky_dir, monkeypatch):
    """A base directory another user could have prepared is refused with a clear error, and
    nothing is written into it or through it."""
    base = os.path.join(sticky_dir, "base")
    target = os.path.join(sticky_dir, "target")
    os.mkdir(target, 0o755)
    open(os.path.join(target, "canary"), "w").close()
    if plant == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("chown needs root")
        os.mkdir(base, 0o755)
        os.chown(base, 65534, 65534)
        expect = "belongs to uid 65534"
    elif plant == "symlink":
        os.symlink(target, base)
        expect = "is a symlink"
    elif plant == "writable":
        os.mkdir(base)
        os.chmod(base, 0o777)
        expect = r"is writable by group or others \(mode 0777\)"
    else:
        open(base, "w").close()
        expect = "is not a directory"
    monkeypatch.setenv(resources.ENV_BASE, base)
    with pytest.raises(UnsafeDirectoryError, match=f"shared-memory base directory {re.escape(base)} {expect}.*"
                       f"remove it.*REMOTEMEDIA_SHM_DIR"):
        Supervisor([PassThroughNode()]).start()
    assert sorted(os.listdir(target)) == ["canary"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    if os.path.isdir(base) and not os.path.islink(base):
        assert os.listdir(base) == []


def test_own_base_readable_by_others_is_made_private(sticky_dir, monkeypatch):
    base = os.path.join(sticky_dir, "base")
    os.mkdir(base)
    os.chmod(base, 0o755)
    monkeypatch.setenv(resources.ENV_BASE, base)
    assert Pipeline([PassThroughNode()]).run([1]) == [1]
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700 and os.listdir(base) == []


@needs_other_user
def test_other_user_can_reach_nothing_of_a_run(other_user):
    """No listing, no opening, no planting, no truncating (the issue's global_mgmt attack)."""
    with Supervisor([PassThroughNode(name="a")]) as sup:
        sup.send(1)
        assert sup.recv(timeout=DEADLINE) == 1
        base = os.path.dirname(sup.root)
        mgmt = glob.glob(os.path.join(sup.root, "*global_mgmt"))
        assert mgmt
        segment = next(p for p in resources.files_of(sup.root) if p.endswith(".data"))
        r = other_user.python(
            """
            import os, sys
            res = []
            def tried(what, f):
                try:
                    f()
                    res.append(what + ": ALLOWED")
                except PermissionError:
                    res.append(what + ": denied")
            base, root, mgmt, seg = sys.argv[1:]
            tried("list base", lambda: os.listdir(base))
            tried("list run", lambda: os.listdir(root))
            tried("truncate mgmt", lambda: os.truncate(mgmt, 0))
            tried("read segment", lambda: open(seg, "rb").read(1))
            tried("plant in base", lambda: open(os.path.join(base, "12345x00"), "w"))
            tried("plant in run", lambda: os.symlink("/etc/passwd", os.path.join(root, "rm_x.dynamic")))
            print("\\n".join(res))
            """,
            base, sup.root, mgmt[0], segment,
        )
        assert r.returncode == 0, r.stderr
        assert "ALLOWED" not in r.stdout and r.stdout.count("denied") == 6, r.stdout
        assert os.path.getsize(mgmt[0]) > 0
        sup.close()


@needs_other_user
def test_planted_base_and_control_dir_are_refused_and_never_written_through(other_user, sticky_dir, monkeypatch):
    """The other user pre-creates the base directory, or symlinks the control directory to a
    directory of root's: the supervisor refuses clearly and leaves the target alone (the old
    code chmod-ed the symlink's target to 0700)."""
    target = os.path.join(sticky_dir, "roots")
    os.mkdir(target, 0o755)
    base = os.path.join(sticky_dir, "shm")
    assert other_user.run(["mkdir", "-m", "0777", base]).returncode == 0
    monkeypatch.setenv(resources.ENV_BASE, base)
    with pytest.raises(UnsafeDirectoryError, match=f"{base} belongs to uid {other_user.uid}"):
        Supervisor([PassThroughNode()]).start()
    assert os.listdir(base) == []

    monkeypatch.setenv(resources.ENV_BASE, os.path.join(sticky_dir, "mine"))
    for planted in ("symlink", "directory"):
        ctl = os.path.join(sticky_dir, f"ctl-{planted}")
        cmd = ["ln", "-s", target, ctl] if planted == "symlink" else ["mkdir", "-m", "0700", ctl]
        assert other_user.run(cmd).returncode == 0
        monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", ctl)
        sup = Supervisor([PassThroughNode()], name="victim")
        with pytest.raises(UnsafeDirectoryError, match=f"control directory {ctl} (is a symlink|belongs to uid)"):
            sup.run([1])
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o755 and os.listdir(target) == []
        with pytest.raises(UnsafeDirectoryError):
            find_endpoints()  # the status client does not trust it either


@pytest.mark.slow
@needs_other_user
def test_two_users_run_pipelines_at_once_without_blocking_each_other(other_user):
    """Root's run does not lock the other user out (the shared /tmp/iceoryx2 did), and the
    other user's run, started first, does not block root's."""
    user_script = """
        import sys
        from remotemedia import Pipeline, Supervisor
        from remotemedia.nodes import MapNode, PassThroughNode
        sup = Supervisor([PassThroughNode(name="p"), MapNode(lambda x: x * 3, name="m")]).start()
        print("root", sup.root, flush=True)
        sys.stdin.readline()  # root runs its pipeline meanwhile
        for i in range(50):
            sup.send(i)
        out = [sup.recv(timeout=60) for _ in range(50)]
        sup.close()
        sup.join()
        print("ok" if out == [3 * i for i in range(50)] else f"bad {out}", flush=True)
    """
    with Supervisor([PassThroughNode(name="first")]) as mine:  # root first
        mine.send("a")
        assert mine.recv(timeout=DEADLINE) == "a"
        user = other_user.popen_python(user_script)
        try:
            line = user.stdout.readline()
            assert line.startswith("root "), user.stderr.read()
            user_root = line.split()[1]
            assert user_root.startswith(f"/dev/shm/remotemedia-{other_user.uid}/")
            st = os.stat(user_root)
            assert st.st_uid == other_user.uid and stat.S_IMODE(st.st_mode) == 0o700
            # while the user's pipeline is up, root starts and finishes another one
            assert Pipeline([PassThroughNode(), PassThroughNode()]).run(range(50)) == list(range(50))
            out, err = user.communicate("go\n", timeout=DEADLINE)
            assert user.returncode == 0 and out.strip() == "ok", err
        finally:
            if user.poll() is None:
                user.kill()
                user.wait()
        mine.send("b")
        assert mine.recv(timeout=DEADLINE) == "b"
        mine.close()


def test_unit_install_never_writes_through_a_planted_symlink(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("precious")
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "remotemedia-tone.service").symlink_to(canary)
    r = subprocess.run([sys.executable, "-m", "supervisor.cli", "systemd-unit", "examples/tone.json", "--name", "tone",
                        "--install", "--unit-dir", str(unit_dir)], capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE)
    assert r.returncode == 0, r.stderr
    assert canary.read_text() == "precious"
    unit = unit_dir / "remotemedia-tone.service"
    assert not unit.is_symlink() and "[Service]" in unit.read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert sorted(os.listdir(unit_dir)) == ["remotemedia-tone.service"]


# --------------------------------------------------------------------------- item 2: no hang on corrupt files


def _python(code: str, *args: str, timeout: float = DEADLINE) -> Tuple[int, str, str]:
    """Run ``code`` in a fresh interpreter; a hang fails the test instead of hanging it."""
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"hung for {timeout} s; stderr:\n{err[-3000:]}")
    return p.returncode, out, err


@pytest.mark.slow
def test_corrupt_files_of_a_live_run_never_hang_restart_or_close():
    """The issue's attack, by the same user now (no one else can reach the files): truncate the
    run's global_mgmt segment, then SIGKILL a worker. Dead-node cleanup used to spin forever on
    the empty segment; now the restart ends (recovered or failed clearly) and close() returns."""
    code = """
        import glob, os, signal, sys, time
        from remotemedia import Supervisor
        from remotemedia.errors import RemoteMediaError
        from remotemedia.nodes import PassThroughNode
        sup = Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")], max_restarts=1).start()
        sup.send(1)
        assert sup.recv(timeout=30) == 1
        (mgmt,) = glob.glob(os.path.join(sup.root, "*global_mgmt"))
        os.truncate(mgmt, 0)
        for p in glob.glob(os.path.join(sup.root, "*.dynamic"))[:2]:
            with open(p, "r+b") as f:
                f.write(os.urandom(64))
        os.kill(sup.worker_pids()["a"], signal.SIGKILL)
        try:
            sup.send(2)
            print("recovered", sup.recv(timeout=60))
        except RemoteMediaError as e:
            print("failed clearly:", type(e).__name__)
        sup.close()
        try:
            sup.join()
        except RemoteMediaError:
            pass
        print("closed", os.path.exists(sup.root))
    """
    rc, out, err = _python(code)
    assert rc == 0, err[-3000:]
    assert ("recovered 2" in out or "failed clearly: NodeFatalError" in out) and "closed False" in out, out + err[-2000:]


@pytest.mark.slow
def test_corrupt_dead_run_never_hangs_a_start():
    """A dead run whose files are truncated or garbage, next to foreign entries, is removed (or
    skipped with a warning) by the next start, which completes; nothing is followed."""
    victim = _spawn_and_kill_run()
    for path in resources.files_of(victim):
        if path.endswith(("global_mgmt", ".dynamic", ".connection")):
            os.truncate(path, 0)
        elif path.endswith((".details", ".node_monitor_context", ".service")):
            os.chmod(path, 0o600)
            with open(path, "wb") as f:
                f.write(os.urandom(40))
    base = os.path.dirname(victim)
    canary_dir = tempfile.mkdtemp()
    canary = os.path.join(canary_dir, "canary")
    with open(canary, "w") as f:
        f.write("precious")
    os.symlink(canary_dir, os.path.join(victim, "nodes", "escape"))
    dead_pid = _dead_pid()
    os.symlink(canary_dir, os.path.join(base, f"{dead_pid}x0badc0de"))  # a "run" that is a symlink
    with open(os.path.join(base, "junk"), "w") as f:
        f.write("not a run")
    try:
        rc, out, err = _python(
            """
            from remotemedia import Pipeline
            from remotemedia.nodes import PassThroughNode
            print(Pipeline([PassThroughNode()]).run([1, 2]))
            """
        )
        assert rc == 0 and out.strip() == "[1, 2]", err[-3000:]
        assert not os.path.exists(victim)  # removed, without following its symlink
        assert open(canary).read() == "precious"
        assert "not a run directory of ours" in err
    finally:
        os.unlink(os.path.join(base, f"{dead_pid}x0badc0de"))
        os.unlink(os.path.join(base, "junk"))
        shutil.rmtree(canary_dir)


def test_stale_cleanup_is_bounded_by_its_deadline(monkeypatch):
    """Whatever iceoryx2 does with a stale run, a start waits at most the cleanup deadline."""
    victim = os.path.join(resources.base_dir(), f"{_dead_pid()}x5ca1ab1e")
    os.mkdir(victim, 0o700)
    released = []

    def stuck(root: str, grace: float = 2.0):
        while not released:
            time.sleep(0.01)
        return []

    monkeypatch.setattr(resources, "_alive_nodes", stuck)
    try:
        t0 = time.monotonic()
        assert resources.cleanup_stale_runs(timeout=0.3) == []
        assert time.monotonic() - t0 < DEADLINE
        assert resources.cleanup_stale_runs(timeout=0.3) == []  # the stuck one is not joined twice
    finally:
        released.append(1)
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(victim) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert not os.path.exists(victim)  # the background cleanup finished it once released


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _spawn_and_kill_run() -> str:
    """A supervisor in a child process, SIGKILLed with its workers: its run directory stays."""
    p = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys, time
            from remotemedia import Supervisor
            from remotemedia.nodes import PassThroughNode
            sup = Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b")]).start()
            sup.send(1)
            sup.recv(timeout=30)
            print(sup.root, *sup.worker_pids().values(), flush=True)
            time.sleep(600)
            """
        )],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        root, *pids = line.split()
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + DEADLINE
    while any(psutil.pid_exists(int(x)) and psutil.Process(int(x)).status() != psutil.STATUS_ZOMBIE for x in pids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert resources.files_of(root)
    return root


def test_bridge_refuses_a_root_that_is_missing_or_a_symlink(tmp_path):
    """iceoryx2 would create a missing root itself (group-readable) and follow a symlink."""
    from remotemedia import _ipc_bridge as bridge

    with pytest.raises(ValueError, match="does not exist"):
        bridge.Node(resources.PREFIX, "x", str(tmp_path / "missing"))
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="not a directory"):
        bridge.Node(resources.PREFIX, "x", str(tmp_path / "link"))
    assert os.listdir(tmp_path / "real") == [] and not (tmp_path / "missing").exists()
