"""Node names, dead-letter files, a node's own child processes and Node subclasses that skip
``super().__init__()`` (issue 10, items 13, 14 and 19)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from remotemedia import Group, Node, Pipeline, Source, Supervisor
from remotemedia.errors import InvalidNodeNameError, MissingSuperInitError, NodeTypeError, PipelineValidationError
from remotemedia.node import NODE_NAME_RULE, check_node_name
from remotemedia.nodes import PassThroughNode
from remotemedia.registry import get_node_class, registered_types
from supervisor import resources
from supervisor.worker.deadletter import write_private as _write_private

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- 13: node names

BAD_NAMES = ["x" * 300, "a\0b", "../escaped", "a/b", ".", "..", ".hidden", "-flag", "two words", "tab\t", "é"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_bad_node_name_is_refused_where_it_is_given(bad):
    with pytest.raises(InvalidNodeNameError) as e:
        PassThroughNode(name=bad)
    assert isinstance(e.value, ValueError) and isinstance(e.value, PipelineValidationError)
    assert e.value.node_name == bad and "PassThroughNode(name=...)" in str(e.value)
    assert NODE_NAME_RULE in str(e.value)
    with pytest.raises(InvalidNodeNameError, match=r"manifest entry nodes\[1\]\.id"):
        Pipeline({"version": "v1", "nodes": [{"id": "ok", "node_type": "PassThroughNode"}, {"id": bad, "node_type": "PassThroughNode"}]})


def test_a_name_set_after_construction_is_checked_before_any_process_starts():
    late = PassThroughNode(name="fine")
    late.name = "../escaped"
    with pytest.raises(InvalidNodeNameError, match=r"pipeline item 1 \(PassThroughNode\)"):
        Supervisor([PassThroughNode(name="a"), late])
    member = PassThroughNode(name="fine")
    member.name = "x" * 101
    with pytest.raises(InvalidNodeNameError, match=r"101 characters\) from group 'g', member 0"):
        Group([member], name="g")
    with pytest.raises(InvalidNodeNameError, match="manifest entry group 'g'.nodes\\[0\\].id"):
        Pipeline([{"id": "g", "node_type": "Group", "params": {"nodes": [{"id": "a/b", "node_type": "PassThroughNode"}]}}])


def test_a_default_name_that_breaks_the_rule_says_to_pass_a_name():
    class Débit(Node):
        def process(self, data):
            return data

    with pytest.raises(InvalidNodeNameError, match="default name, from class Débit; pass name="):
        Pipeline([Débit()])
    assert Pipeline([Débit(name="debit")]).nodes[0].name == "debit"


def test_the_names_people_use_are_accepted():
    for name in ["a", "video-motion", "asr.v2", "cam:0", "PassThroughNode_1", "_private", "3d", "x" * 100]:
        check_node_name(name, "test")
        assert PassThroughNode(name=name).name == name
    for node_type in registered_types():  # every built-in default name
        check_node_name(get_node_class(node_type).__name__, node_type)
    nodes = [PassThroughNode() for _ in range(12)]
    assert Pipeline(nodes).nodes[-1].name == "PassThroughNode_11"


# --------------------------------------------------------------------------- 13: dead-letter files


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_dead_letter_files_are_private_and_never_overwritten(tmp_path):
    dl = tmp_path / "missing" / "dead"
    parts = ((".frame", b"payload"), (".json", b"{}"))
    first = _write_private(str(dl), "n-e1-s7", parts)
    assert first == str(dl / "n-e1-s7.frame")
    assert _mode(dl) == 0o700
    assert {p.name: _mode(p) for p in dl.iterdir()} == {"n-e1-s7.frame": 0o600, "n-e1-s7.json": 0o600}
    # the same frame dead-lettered again (after a restart): a fresh name, the first kept
    second = _write_private(str(dl), "n-e1-s7", ((".frame", b"again"), (".json", b"{}")))
    assert second != first and os.path.basename(second).startswith("n-e1-s7-")
    assert (dl / "n-e1-s7.frame").read_bytes() == b"payload"
    assert open(second, "rb").read() == b"again" and _mode(second) == 0o600
    assert open(second[: -len(".frame")] + ".json", "rb").read() == b"{}"
    # a name that would leave the directory is refused, nothing is written
    for bad in ("../escaped", "a/b", ".."):
        with pytest.raises(ValueError):
            _write_private(str(dl), bad, parts)
    assert not (tmp_path / "missing" / "escaped.frame").exists()
    assert len(list(dl.iterdir())) == 4


class PoisonOn(Node):
    def __init__(self, at: int, **kw):
        super().__init__(**kw)
        self.at = at

    def process(self, x):
        if x == self.at:
            os._exit(1)
        return x


@pytest.mark.slow
def test_a_planted_symlink_in_the_dead_letter_dir_is_not_followed(tmp_path):
    dl = tmp_path / "dead"
    dl.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    p = Pipeline([PassThroughNode(name="up"), PoisonOn(3, name="bad")])
    edge = p.edges().index(("up", "bad"))
    for suffix in (".frame", ".json"):  # where the poison frame 3 would be written
        os.symlink(victim, dl / f"bad-e{edge}-s3{suffix}")
    report = Supervisor(p, poison_threshold=1, max_restarts=5, backoff_base=0.01, dead_letter_dir=str(dl)).run(range(6))
    assert report.outputs == [0, 1, 2, 4, 5] and report.nodes["bad"]["dead_letters"] == 1
    assert victim.read_text() == "precious" and _mode(victim) != 0o600
    written = sorted(f for f in dl.iterdir() if not f.is_symlink())
    assert [f.suffix for f in written] == [".frame", ".json"]
    assert all(f.name.startswith(f"bad-e{edge}-s3-") and _mode(f) == 0o600 for f in written)
    assert json.loads(written[1].read_text())["seq"] == 3


# --------------------------------------------------------------------------- 14: a node's children


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, deadline_s: float = 30.0) -> list:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _running(p)]


def _kill_if(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it is still the process this test started (its command line)."""
    try:
        proc = psutil.Process(pid)
        if marker in " ".join(proc.cmdline()):
            proc.kill()
    except psutil.Error:
        pass


_STUCK_SERVICE = textwrap.dedent(
    """
    import json, os, re, subprocess, sys
    sys.path.insert(0, {root!r})
    from remotemedia import Node, Supervisor

    class Stuck(Node):
        # starts a helper process, then hangs in C code holding the GIL
        def __init__(self, pidfile, **kw):
            super().__init__(**kw)
            self.pidfile = pidfile

        def process(self, x):
            self.helper = subprocess.Popen(["sleep", "600"])
            with open(self.pidfile + ".tmp", "w") as f:
                json.dump({{"helper": self.helper.pid, "worker": os.getpid()}}, f)
            os.rename(self.pidfile + ".tmp", self.pidfile)
            re.match(r"(a+)+$", "a" * 64 + "b")  # exponential backtracking, never releases the GIL

    sup = Supervisor([Stuck(sys.argv[1], name="stuck")], control=False)
    print(json.dumps({{"root": sup.root}}), flush=True)
    sup.run([1])
    """
)


@pytest.mark.slow
def test_node_children_die_with_a_sigkilled_supervisor(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(_STUCK_SERVICE.format(root=ROOT))
    pidfile = tmp_path / "pids.json"
    proc = subprocess.Popen([sys.executable, str(script), str(pidfile)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {}
    root = None
    try:
        root = json.loads(proc.stdout.readline())["root"]
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the node never started its helper"
            time.sleep(0.05)
        pids = json.loads(pidfile.read_text())
        assert _running(pids["helper"]) and _running(pids["worker"])
        proc.kill()
        proc.wait()
        left = _wait_gone([pids["worker"], pids["helper"]])
        assert left == [], f"outlived their SIGKILLed supervisor: {left} (helper {pids['helper']}, worker {pids['worker']})"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if pids:
            _kill_if(pids["helper"], "sleep 600")
            _kill_if(pids["worker"], "supervisor.worker")
            _wait_gone(list(pids.values()))
        if root:
            resources.purge(root)


class LeavesAHelper(Node):
    """Starts a helper process and does not stop it in cleanup()."""

    def __init__(self, pidfile: str, **kw):
        super().__init__(**kw)
        self.pidfile = pidfile

    def process(self, x):
        helper = subprocess.Popen(["sleep", "600"], start_new_session=False)
        with open(self.pidfile, "a") as f:
            f.write(f"{helper.pid}\n")
        return x


@pytest.mark.slow
def test_node_children_die_with_their_worker(tmp_path):
    pidfile = tmp_path / "pids"
    helpers = []
    try:
        assert Pipeline([LeavesAHelper(str(pidfile), name="leaky")]).run([1, 2]) == [1, 2]
        helpers = [int(line) for line in pidfile.read_text().split()]
        assert len(helpers) == 2
        assert _wait_gone(helpers) == [], "a node's helper outlived its worker"
    finally:
        for pid in helpers:
            _kill_if(pid, "sleep 600")


# --------------------------------------------------------------------------- 19: super().__init__()


class NoSuper(Node):
    def __init__(self, gain: float):
        self.gain = gain

    def process(self, x):
        return x * self.gain


class NoSuperSource(Source):
    def __init__(self, n: int):
        self.n = n

    def generate(self):
        yield from range(self.n)


class Base(Node):
    def __init__(self, **kw):  # forgets super().__init__(**kw)
        self.kw = kw


class Derived(Base):
    def process(self, x):
        return x


@pytest.mark.parametrize("cls, args, owner", [(NoSuper, (2.0,), "NoSuper"), (NoSuperSource, (3,), "NoSuperSource"), (Derived, (), "Base")])
def test_a_node_without_super_init_says_what_is_missing(cls, args, owner):
    fix = f"call super().__init__(**kwargs) at the start of {owner}.__init__"
    for make in (lambda: Pipeline([cls(*args)]), lambda: Supervisor([cls(*args)]), lambda: Pipeline([PassThroughNode(), cls(*args)])):
        with pytest.raises(MissingSuperInitError) as e:
            make()
        assert fix in str(e.value) and cls.__name__ in str(e.value) and e.value.node_class == owner
        assert isinstance(e.value, NodeTypeError) and isinstance(e.value, TypeError)
    node = cls(*args)
    for attr in ("name", "config", "options"):
        with pytest.raises(MissingSuperInitError, match=r"super\(\)\.__init__"):
            getattr(node, attr)
    assert getattr(node, "name", "fallback") == "fallback"  # still an AttributeError
    with pytest.raises(AttributeError) as e:
        node.no_such_thing  # noqa: B018
    assert not isinstance(e.value, MissingSuperInitError)


def test_a_group_member_without_super_init_says_what_is_missing():
    with pytest.raises(MissingSuperInitError, match="NoSuper.__init__"):
        Group([PassThroughNode(), NoSuper(1.0)])


def test_one_answer_to_is_this_process_alive():
    """resources.pid_alive is the only liveness check (control sockets, stale runs, dead
    iceoryx2 nodes, the CLI's stop): a zombie is gone, an unknown pid is not."""
    import subprocess
    import sys

    from supervisor import cli, control, resources

    assert resources.pid_alive(os.getpid())
    assert resources.pid_alive("not a pid")  # unknown: never treated as gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not resources.pid_alive(child.pid)  # a zombie: exited, not reaped yet
    child.wait()
    assert not resources.pid_alive(child.pid)
    for module in (cli, control):
        assert module.pid_alive is resources.pid_alive
        assert not [n for n in vars(module) if n.endswith("alive") and n != "pid_alive"]
