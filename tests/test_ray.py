"""Backend ``ray`` on a 2-node Ray cluster on this machine (issue 15): placement by label, a
worker SIGKILL inside an agent, an agent SIGKILL mid-stream (0 lost, 0 duplicated, in order),
a drain across hosts, nothing left behind.

The cluster is ``ray.cluster_utils.Cluster`` with a label per node (``remotemedia.host=head``
for the head, where the driver runs, and ``remotemedia.host=gpu``), one for the whole module.
Ray must talk on 127.0.0.1 only: these tests run only inside a private network namespace
(``unshare -n``, then ``ip link set lo up``), where loopback is the only interface; .ci/run runs
them that way, and elsewhere they are skipped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, List

import numpy as np
import psutil
import pytest

from conftest import _children, _runs, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _private_network() -> bool:
    # (/proc/net/dev lists this network namespace's interfaces; /sys/class/net may be the
    # host's, when sysfs was not mounted again)
    try:
        with open("/proc/net/dev") as f:
            names = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    except OSError:
        return False
    return names == ["lo"]


if not _private_network():
    pytest.skip(
        "the Ray tests run inside a private network namespace only (unshare -n; ip link set lo up; see .ci/run): "
        "Ray would otherwise use this host's network address",
        allow_module_level=True,
    )

ray = pytest.importorskip("ray", reason="backend ray needs Ray: pip install 'remotemedia[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from ray_nodes import BadInit, Count, Fails, Tally, Ticks  # noqa: E402  (a light module: the node workers import it)
from remotemedia import Pipeline, Supervisor  # noqa: E402
from remotemedia.errors import EndOfStream, NodeError, NodeInitError, SupervisorError  # noqa: E402
from remotemedia.nodes import MapNode  # noqa: E402
from supervisor.ray import driver as ray_driver  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LABEL = "remotemedia.host"


@pytest.fixture(scope="module")
def cluster():
    # The node workers import this module's node classes: every Ray worker gets the tests'
    # directory (and the project) on its path, through the environment the cluster inherits.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT] + ([old] if old else []))
    common = dict(num_cpus=1, object_store_memory=80 << 20, node_ip_address="127.0.0.1")
    c = Cluster(
        initialize_head=True,
        head_node_args=dict(common, labels={LABEL: "head"}, include_dashboard=False),
    )
    gpu = c.add_node(**common, labels={LABEL: "gpu"})
    try:
        ray.init(address=c.address, log_to_driver=False)
        c.gpu_node_id = gpu.node_id
        c.head_node_id = c.head_node.node_id
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    # nothing of Ray is left either
    deadline = time.monotonic() + 30.0
    while [p for p in _children() if "ray" in " ".join(_cmdline(p))] and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, _cmdline(p)[:3]) for p in _children() if "ray" in " ".join(_cmdline(p))]
    assert not left, f"Ray processes left behind: {left}"


def _cmdline(p: psutil.Process) -> List[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaks():
    """(Overrides conftest's: the cluster's own processes live across the tests.) No node
    worker and no run directory (iceoryx2 files) left behind by a test."""
    before = _runs()
    yield
    deadline = time.monotonic() + 30.0
    while True:
        workers = [p for p in _children() if "supervisor.worker" in _cmdline(p)]
        files = _runs() - before
        if (not workers and not files) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not workers, f"node workers left behind: {[(p.pid, _cmdline(p)) for p in workers]}"
    assert not files, f"run directories left behind: {sorted(files)}"


def _stream(sup: Supervisor, n: int, on_count=None, keep=lambda x: x) -> List[Any]:
    """Send 0..n-1 from a thread, receive every output (``keep(output)`` of each);
    ``on_count(k)`` after the k-th."""

    def feed() -> None:
        for i in range(n):
            sup.send(i)
        sup.close()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    got: List[Any] = []
    while True:
        try:
            got.append(keep(sup.recv(timeout=120)))
        except EndOfStream:
            break
        if on_count is not None:
            on_count(len(got))
    t.join(30)
    return got


def _hop_pipeline(delay: float = 0.0) -> Pipeline:
    return Pipeline(
        [
            MapNode(lambda x: x + 1, name="a"),
            Count(delay, name="b", options={"host": "gpu", "snapshot_interval": 0.05}),
            MapNode(lambda t: t, name="c"),
        ]
    )


def test_placement_lands_on_the_labelled_node(cluster):
    sup = Supervisor(_hop_pipeline(), backend="ray", name="placement")
    with sup:
        wait_for(lambda: all(h.get("ray_node_id") for h in sup.hosts().values()), 120, "the agents' status")
        hosts = sup.hosts()
        assert hosts["gpu"]["ray_node_id"] == cluster.gpu_node_id
        assert hosts["(driver)"]["ray_node_id"] == cluster.head_node_id  # no host: the driver's
        st = sup.status()
        assert [st["nodes"][n]["host"] for n in ("a", "b", "c")] == ["(driver)", "gpu", "(driver)"]
        got = _stream(sup, 50)
    assert got == [(i + 1, i + 1) for i in range(50)]


def test_a_host_label_no_node_has_is_refused_at_start(cluster):
    p = Pipeline([MapNode(lambda x: x, name="m", options={"host": "tpu"})])
    with pytest.raises(SupervisorError, match=r"no Ray node is labelled remotemedia.host=tpu .*ray start"):
        Supervisor(p, backend="ray").start()


def test_a_nodes_error_on_another_host_is_raised_as_is(cluster):
    p = Pipeline([MapNode(lambda x: x, name="a"), Fails(name="f", options={"host": "gpu"})])
    with pytest.raises(NodeError, match=r"bad frame 3") as e:
        p.run(list(range(10)), backend="ray")
    assert e.value.node == "f"
    p = Pipeline([BadInit(name="init", options={"host": "gpu"})])
    with pytest.raises(NodeInitError, match=r"no GPU here") as e2:
        p.run([1], backend="ray")
    assert e2.value.node == "init"


def test_a_worker_sigkill_inside_an_agent_is_restarted_there(cluster):
    sup = Supervisor(_hop_pipeline(delay=0.003), backend="ray", name="worker-kill")
    killed: List[int] = []

    def kill_b(k: int) -> None:
        if k == 60 and not killed:
            pid = sup.status()["nodes"]["b"]["pid"]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with sup:
        wait_for(lambda: sup.status()["nodes"]["b"].get("pid"), 120, "node b's worker")
        got = _stream(sup, 200, kill_b)
        hosts = sup.hosts()
    assert killed
    assert got == [(i + 1, i + 1) for i in range(200)]  # its snapshot restored, nothing lost
    assert hosts["gpu"]["incarnation"] == 1  # the agent itself was not restarted
    assert sup.report().nodes["b"]["restarts"] == 1
    assert sup.report().nodes["b"]["host"] == "gpu"


def test_outputs_carried_by_pushes_survive_an_agent_sigkill(cluster, monkeypatch):
    """One frame at a time through a (driver) -> b (gpu) -> the caller: b's outputs come back
    in the replies of the pushes to gpu (a Ray call per frame, not two). SIGKILL the gpu's
    agent right after a frame was sent (its push, and the pull it carries, in flight or just
    answered): 0 lost, 0 duplicated, in order, b's count resumed from its snapshot."""
    # The driver pulls a lone frame's output itself when the caller's next frame has not come
    # within CARRIED_IDLE (5 ms); on a loaded host this loop's recv -> send took longer every
    # time and no push carried anything (0 of 61, 1 run in 5). Waiting longer keeps what is
    # tested here (pushes carry the pulls, across the agent's death) from depending on load.
    monkeypatch.setattr(ray_driver, "CARRIED_IDLE", 0.2)
    # Likewise a push waits PIGGY_WAIT (2 ms) for its frame's output to ride back with it; on
    # a loaded host b took longer (24 of 60 carried under two CPU hogs): let it wait longer.
    monkeypatch.setattr(ray_driver, "PIGGY_WAIT", 0.5)
    p = Pipeline([MapNode(lambda x: x + 1, name="a"), Count(name="b", options={"host": "gpu", "snapshot_interval": 0.05})])
    sup = Supervisor(p, backend="ray", name="carried")
    got: List[Any] = []
    with sup:
        wait_for(lambda: sup.hosts()["gpu"].get("agent_pid"), 120, "the agent's status")
        for i in range(150):
            sup.send(i)
            if i == 60:
                carried = sup._outputs[0].carried_frames
                os.kill(sup.hosts()["gpu"]["agent_pid"], signal.SIGKILL)
            got.append(sup.recv(timeout=120))
        sup.close()
        with pytest.raises(EndOfStream):
            sup.recv(timeout=120)
    assert got == [(i + 1, i + 1) for i in range(150)]
    assert sup.hosts()["gpu"]["incarnation"] == 2
    assert carried > 30, carried  # (what this test is about: the outputs rode with the pushes)


def test_agent_sigkills_mid_stream_lose_and_repeat_nothing(cluster):
    """Three parts: a on the head's agent, b on the gpu's, c in the driver (a -> b is an edge
    between two agents). SIGKILL the head's agent after 200 outputs, the gpu's after 400:
    0 lost, 0 duplicated, in order, and both counters resume from their snapshots."""
    p = Pipeline(
        [
            Count(0.002, name="a", options={"host": "head", "snapshot_interval": 0.05}),
            Count(0.002, name="b", options={"host": "gpu", "snapshot_interval": 0.05}),
            MapNode(lambda t: t, name="c"),
        ]
    )
    sup = Supervisor(p, backend="ray", name="agent-kill")
    killed: List[str] = []

    def kill_agent(k: int) -> None:
        victim = {200: "head", 400: "gpu"}.get(k)
        if victim is not None:
            os.kill(sup.hosts()[victim]["agent_pid"], signal.SIGKILL)
            killed.append(victim)

    with sup:
        wait_for(lambda: all(h.get("agent_pid") for h in sup.hosts().values()), 120, "the agents' status")
        got = _stream(sup, 600, kill_agent)
        wait_for(lambda: all((sup.hosts()[h].get("incarnation") or 0) >= 2 for h in killed) or not sup.running, 60, "the new incarnations")
    assert killed == ["head", "gpu"]
    assert len(got) == 600 and got == [((i, i + 1), i + 1) for i in range(600)]
    assert {h: s["incarnation"] for h, s in sup.hosts().items()} == {"head": 2, "gpu": 2, "(driver)": 1}


def test_big_frames_cross_as_objects_through_agent_sigkills(cluster):
    """Frames of 256 KiB (past STORE_BYTES: a host that pushes them puts them into its Ray
    object store once, from shared memory, and retains the reference until commit; a host
    that is pulled retains the view of shared memory and returns it in the pull's answer):
    made in the driver's part, through the head's agent and the gpu's to the caller (a push
    with the driver's objects, a push with an agent's, pulls answered with the gpu agent's
    views). SIGKILL the head's agent after 100 outputs, the gpu's after 200 (their objects
    and views die with them): 0 lost, 0 duplicated, in order, every array intact, the
    counts resumed."""
    size = 32 << 10  # int64s
    p = Pipeline(
        [
            MapNode(lambda i: np.full(size, i, dtype=np.int64), name="a"),
            Tally(0.002, name="b", options={"host": "head", "snapshot_interval": 0.05}),
            Tally(0.002, name="c", options={"host": "gpu", "snapshot_interval": 0.05}),
        ]
    )
    sup = Supervisor(p, backend="ray", name="big-kill")
    killed: List[str] = []
    stored = {}
    lent = {}

    def kill_agent(k: int) -> None:
        victim = {100: "head", 200: "gpu"}.get(k)
        if victim is not None:
            stored[victim] = sum(e["stored"] for e in sup.hosts()[victim]["cut_out"].values())
            lent[victim] = sum(e["lent"] for e in sup.hosts()[victim]["cut_out"].values())
            os.kill(sup.hosts()[victim]["agent_pid"], signal.SIGKILL)
            killed.append(victim)

    with sup:
        wait_for(lambda: all(h.get("agent_pid") for h in sup.hosts().values()), 120, "the agents' status")
        # (what is kept of each output: its arrays are views of the driver's object store,
        # which 300 of them would fill)
        got = _stream(sup, 300, kill_agent, lambda g: (len(g), int(g[0]), bool((g[:size] == g[0]).all()), *map(int, g[size:])))
    assert killed == ["head", "gpu"]
    # (the frames did go as objects to the gpu, and as views in the pulls' answers from it)
    assert stored["head"] > 0 and lent["gpu"] > 0
    assert got == [(size + 2, i, True, i + 1, i + 1) for i in range(300)]
    assert {h: s["incarnation"] for h, s in sup.hosts().items()} == {"head": 2, "gpu": 2, "(driver)": 1}


def test_sigterm_drains_across_hosts(cluster):
    """run() turns SIGTERM into a drain across hosts (after Ray, which installs handlers of
    its own when the driver connects): the gpu host's source stops, every frame it made is
    delivered, the run ends stopped, not aborted."""
    p = Pipeline(
        [Ticks(name="ticks", options={"host": "gpu"}), MapNode(lambda x: x * 2, name="double")],
    )
    sup = Supervisor(p, backend="ray", name="drain", stop_timeout=60.0)
    got: List[int] = []

    def on_output(value: int, info: Any) -> None:
        got.append(value)
        if len(got) == 50:
            os.kill(os.getpid(), signal.SIGTERM)

    report = sup.run(on_output=on_output)
    assert len(got) >= 50 and got == [2 * i for i in range(len(got))]  # every frame made is delivered
    assert report.stopped and report.aborted is None and report.output_count == len(got)
    assert {n: r["host"] for n, r in report.nodes.items()} == {"ticks": "gpu", "double": "(driver)"}


ACROSS = '''
import time
from remotemedia import Node, Pipeline, Source

class Ticks(Source):
    def initialize(self):
        print("ticks ready", flush=True)

    def generate(self):
        i = 0
        while True:
            time.sleep(0.01)
            yield i
            i += 1

class Double(Node):
    def initialize(self):
        print("double ready", flush=True)

    def process(self, x):
        return 2 * x

pipeline = Pipeline([Ticks(name="ticks", options={"host": "gpu"}), Double(name="double")], name="across")
'''


def test_the_cli_runs_across_hosts_shows_the_hosts_and_stop_drains(cluster, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", str(tmp_path / "run"))
    f = tmp_path / "across.py"
    f.write_text(ACROSS)
    cli = [sys.executable, "-m", "supervisor.cli"]
    proc = subprocess.Popen(
        cli + ["start", str(f), "--ray-address", cluster.address, "-o", str(tmp_path / "out.jsonl"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        def running() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"start exited early: {proc.communicate()[1]}")
            r = subprocess.run(cli + ["status", "across", "--json"], capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                return False
            st = json.loads(r.stdout)
            return all(n["state"] == "RUNNING" and n["frames_out"] > 0 for n in st["nodes"].values())

        wait_for(running, 120, "both hosts running")
        table = subprocess.run(cli + ["status", "across"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
        assert table.splitlines()[1].split()[:3] == ["node", "host", "state"]
        assert rows["ticks"][1:3] == ["gpu", "RUNNING"] and rows["double"][1:3] == ["(driver)", "RUNNING"]
        # logs: every host's lines, merged, each with its host
        got = subprocess.run(cli + ["logs", "across", "--json"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        said = {(e["node"], e["host"], e["msg"]) for e in map(json.loads, got.splitlines())}
        assert {("ticks", "gpu", "ticks ready"), ("double", "(driver)", "double ready")} <= said, said
        text = subprocess.run(cli + ["logs", "across", "--node", "ticks"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        assert " on gpu] ticks ready" in text and "double" not in text, text
        stop = subprocess.run(cli + ["stop", "across"], capture_output=True, text=True, cwd=ROOT, timeout=180)
        assert stop.returncode == 0, stop.stderr
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    values = [json.loads(line)["value"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert values and values == [2 * i for i in range(len(values))]  # drained: nothing lost at the end


def test_a_host_silent_for_host_timeout_gets_its_agent_restarted(cluster):
    """A hung host (its agent SIGSTOPped: it neither dies nor answers) is declared lost after
    host_timeout, not Ray's ~15 s: its agent is killed and Ray starts it again; the stream
    goes on with nothing lost or repeated."""
    sup = Supervisor(_hop_pipeline(delay=0.003), backend="ray", name="host-timeout", host_timeout=2.0)
    stopped: List[int] = []

    def hang_agent(k: int) -> None:
        if k == 60 and not stopped:
            pid = sup.hosts()["gpu"]["agent_pid"]
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)

    with sup:
        wait_for(lambda: sup.hosts()["gpu"].get("agent_pid"), 120, "the agent's status")
        got = _stream(sup, 200, hang_agent)
    assert stopped
    assert got == [(i + 1, i + 1) for i in range(200)]
    assert sup.hosts()["gpu"]["incarnation"] == 2 and sup.status()["hosts"]["gpu"]["lost_kills"] >= 1


def test_systemd_hears_the_driver_alone(cluster, tmp_path, monkeypatch):
    """Under systemd the driver speaks for every host: one READY=1, and no WATCHDOG=1 while a
    host is silent, also from the local Supervisor of the driver's own host part (same pid:
    systemd's NotifyAccess=main takes its messages too)."""
    import socket

    sock_path = str(tmp_path / "notify.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(sock_path)
    srv.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # (WATCHDOG=1 every 0.2 s while healthy)
    msgs: List[Any] = []
    done = threading.Event()

    def listen() -> None:  # (as systemd does, all along)
        while not done.is_set():
            try:
                msgs.append((time.monotonic(), srv.recv(4096).decode()))
            except socket.timeout:
                pass

    def dogs() -> List[float]:
        return [t for t, m in list(msgs) if "WATCHDOG=1" in m]

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    sup = Supervisor(_hop_pipeline(), backend="ray", name="sd-ray", host_timeout=60.0)
    pid = None
    try:
        with sup:
            wait_for(lambda: sup.hosts()["gpu"].get("agent_pid"), 120, "the agent's status")
            assert _stream(sup, 20) == [(i + 1, i + 1) for i in range(20)]
            wait_for(lambda: len(dogs()) >= 3, 30, "WATCHDOG=1 while every host answers")
            pid = sup.hosts()["gpu"]["agent_pid"]
            os.kill(pid, signal.SIGSTOP)  # (silent, not dead: host_timeout is far away)
            # the driver withholds WATCHDOG=1 once the host missed a few status rounds (~2 s)
            wait_for(lambda: time.monotonic() - max(dogs()) > 2.0, 30, f"WATCHDOG=1 to stop while host gpu is silent ({len(dogs())} so far)")
            os.kill(pid, signal.SIGCONT)
            pid = None
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        done.set()
        listener.join(5)
        srv.close()
    texts = [m for _, m in msgs]
    assert sum("READY=1" in m for m in texts) == 1, texts  # (the driver's, once every host runs)
