"""A finished run releases every iceoryx2 object of the calling process at once, whichever way
it ends: no file descriptor and no memory mapping of the run's directory is left, without a
garbage collection (a long-lived service runs many pipelines; what a cycle or an error's
traceback keeps would otherwise stay mapped until the collector happens to run).

Every test runs with the garbage collector disabled, so that nothing here depends on when it
runs; outputs and errors are kept alive on purpose while checking.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Iterator, List, Set

import numpy as np
import pytest

from remotemedia import Node, Supervisor, execute_pipeline_with_input
from remotemedia.errors import NodeError, NodeInitError, RemoteMediaError, SupervisorError, TransportError
from remotemedia.nodes import PassThroughNode
from supervisor import channels, resources

DEADLINE = 120.0  # generous: what matters is that it ends at all
ARRAY = np.arange(50_000, dtype=np.float64)  # travels as an out-of-band buffer: received as a view


@pytest.fixture(autouse=True)
def no_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _under(path: str, root: str) -> bool:
    path = path.removesuffix(" (deleted)")
    return path == root or path.startswith(root.rstrip("/") + "/")


def held(root: str) -> List[str]:
    """Every file in ``root`` (a run's directory, or the base of all runs) that this process
    holds open or mapped, removed ones included."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if _under(target, root):
            out.add(f"fd {target}")
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) > 5 and _under(parts[5].strip(), root):
                out.add(f"map {parts[5].strip()}")
    return sorted(out)


def held_runs() -> Set[str]:
    """The runs (directories in the base) of which this process holds a file."""
    base = resources.base_dir()
    return {os.path.relpath(p.split(" ", 1)[1].removesuffix(" (deleted)"), base).split("/")[0] for p in held(base)}


class Boom(Node):
    def process(self, x):
        raise ValueError("boom")


class InitFails(Node):
    def initialize(self):
        raise RuntimeError("no model here")

    def process(self, x):
        return x


def _refuse_in_supervisor(pid: int, value):
    if os.getpid() == pid:
        raise LookupError("this output cannot be rebuilt in the supervisor's process")
    return value


class NotHere:
    """Pickles in a worker, but does not unpickle in the process ``pid`` (the supervisor)."""

    def __init__(self, pid: int, value) -> None:
        self.pid, self.value = pid, value

    def __reduce__(self):
        return _refuse_in_supervisor, (self.pid, self.value)


class WrapForSupervisor(Node):
    def __init__(self, pid: int, **kw) -> None:
        super().__init__(**kw)
        self.pid = pid

    def process(self, x):
        return NotHere(self.pid, x)


class Slow(Node):
    def process(self, x):
        time.sleep(0.05)
        return x


def test_normal_end_keeps_nothing_and_outputs_nobody_took_become_copies():
    with Supervisor([PassThroughNode(name="p")]) as sup:
        for _ in range(3):
            sup.send(ARRAY)
        first = sup.recv(timeout=DEADLINE)
        assert np.array_equal(first, ARRAY)
        del first  # (an output the caller keeps is its own: a view keeps its chunk)
        sup.close()  # (the other two wait unread: taken zero-copy while the run drains)
    assert held(sup.root) == []
    rest = [sup.recv(timeout=DEADLINE) for _ in range(2)]  # still there, as private copies
    assert all(np.array_equal(r, ARRAY) and not r.flags.writeable for r in rest)


def test_outputs_run_returns_hold_nothing_of_the_finished_run():
    sup = Supervisor([PassThroughNode(name="p")])
    report = sup.run([ARRAY] * 3)
    assert len(report.outputs) == 3 and all(np.array_equal(o, ARRAY) for o in report.outputs)
    assert held(sup.root) == []


@pytest.mark.slow
def test_failure_in_a_worker_keeps_nothing():
    sup = Supervisor([PassThroughNode(name="p"), Boom(name="boom")])
    with pytest.raises(NodeError, match="boom") as ei:
        sup.run([ARRAY] * 5)
    assert ei.value is not None  # (the error, and through it the run, are still referenced)
    assert held(sup.root) == []


def test_failure_at_start_keeps_nothing():
    sup = Supervisor([PassThroughNode(name="p"), InitFails(name="bad")])
    with pytest.raises(NodeInitError) as ei:
        sup.start()
    assert ei.value is not None
    assert held(sup.root) == []


def test_supervisor_failing_while_it_opens_its_ports_keeps_nothing(monkeypatch):
    """The arbiter fails half-way through making a port (some of its parts exist): the error's
    traceback holds the half-made port, and the supervisor thread is gone."""
    made = []

    class FailingNotifier:
        def __init__(self, node, service, **kw):
            made.append(service)
            if len(made) == 2:  # the output port's: its subscriber and ack publisher exist
                raise TransportError("no notifier today")
            self._real = real(node, service, **kw)

        def __getattr__(self, name):
            return getattr(self._real, name)

    real = channels.bridge.Notifier
    monkeypatch.setattr(channels.bridge, "Notifier", FailingNotifier)  # (this process only)
    sup = Supervisor([PassThroughNode(name="p")])
    with pytest.raises(TransportError, match="no notifier today") as ei:
        sup.start()
    monkeypatch.undo()
    assert ei.value is not None
    assert held(sup.root) == []


def test_supervisor_failing_with_a_received_frame_in_hand_keeps_nothing():
    """An output that cannot be rebuilt in the caller's process fails the run while the
    gateway holds its received frame (in the caller's thread, or the arbiter's when it takes
    outputs nobody took yet); the error is kept by the caller, but the frame is not."""
    sup = Supervisor([WrapForSupervisor(os.getpid(), name="w")])
    with pytest.raises(SupervisorError, match="cannot be rebuilt") as ei:
        sup.run([ARRAY] * 3)
    assert isinstance(ei.value.__cause__, LookupError)
    assert held(sup.root) == []


def test_unpicklable_input_keeps_nothing():
    """The run fails in the arbiter thread while it encodes an input (its traceback passes
    through the frames that were sending)."""
    import threading

    sup = Supervisor([PassThroughNode(name="p")])
    with pytest.raises(RemoteMediaError, match="item 2 of run") as ei:
        sup.run([ARRAY, ARRAY, threading.Lock(), ARRAY])
    assert ei.value is not None
    assert held(sup.root) == []


@pytest.mark.slow
def test_kill_keeps_nothing():
    sup = Supervisor([PassThroughNode(name="p"), Slow(name="slow")]).start()
    for _ in range(10):
        sup.send(ARRAY)
    sup.recv(timeout=DEADLINE)  # frames are in flight everywhere
    sup.kill()
    assert sup.join(DEADLINE)
    assert held(sup.root) == []


@pytest.mark.slow
def test_async_api_keeps_nothing():
    before = held_runs()
    out = asyncio.run(execute_pipeline_with_input([PassThroughNode(name="p")], [ARRAY] * 3))
    assert len(out) == 3 and all(np.array_equal(o, ARRAY) for o in out)
    assert held_runs() - before == set()

    async def cancelled() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(execute_pipeline_with_input([Slow(name="slow")], [ARRAY] * 200), 1.0)

    asyncio.run(cancelled())
    assert held_runs() - before == set()


def test_closed_bridge_objects_hold_nothing_though_still_referenced():
    """The mechanism: close() releases the port and what it kept alive at once."""
    from remotemedia import _ipc_bridge as bridge

    run = resources.new_run()
    try:
        node = bridge.Node(run.prefix, "t", run.root)
        pub, sub = bridge.Publisher(node, "e/data"), bridge.Subscriber(node, "e/data")
        notifier, listener = bridge.Notifier(node, "in/x"), bridge.Listener(node, "in/x")
        notifier.yield_unless_queued([sub])
        pub.send(0, 0, b"m", [ARRAY])
        sample = sub.receive()
        objects = [pub, sub, notifier, listener, node]
        for o in objects:
            o.close()
        assert held(run.root)  # the sample still holds its chunk, and with it the node
        del sample
        assert held(run.root) == []
        assert node.closed and listener.fileno() == -1
        with pytest.raises(TransportError, match="closed"):
            bridge.Publisher(node, "other")
        with pytest.raises(TransportError, match="closed"):
            notifier.notify()
        for o in objects:
            o.close()  # idempotent
    finally:
        assert resources.purge(run.root) == []
