"""Doorbells (supervisor/doorbells.py, rust/ipc_bridge/src/doorbell.rs): a notify to a
listener that is awake costs no syscall, and no wake-up is ever lost."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import wait_for
from remotemedia import Source, Supervisor
from remotemedia import _ipc_bridge as b
from remotemedia.nodes import MapNode
from supervisor.arbiter import Arbiter
from supervisor.doorbells import GATEWAY_SLOT, RunDoorbells, worker_slot


@pytest.fixture
def bells():
    db = RunDoorbells(3)
    yield db
    db.close()


def test_slots_are_one_per_inbox(bells):
    assert bells.bells.slots == 3
    assert GATEWAY_SLOT == 0 and worker_slot(0) == 1 and worker_slot(1) == 2
    with pytest.raises(ValueError, match="slot 3 out of range"):
        bells.bells.state(3)


def test_bad_descriptor_or_slot_is_a_clear_error(node, bells):
    with pytest.raises(OSError, match="fstat"):
        b.Doorbells(-1)
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(ValueError, match="less than one 64-byte slot"):
            b.Doorbells(r)  # (a pipe has no size)
    finally:
        os.close(r)
    with pytest.raises(ValueError, match="out of range"):
        b.Listener(node, "inbox", doorbells=bells.bells, slot=7)
    with pytest.raises(ValueError, match="out of range"):
        b.Notifier(node, "inbox", doorbells=bells.bells, slot=3)


def test_the_mapping_outlives_the_descriptor(node):
    db = RunDoorbells(1)
    bells = db.bells
    db.close()
    db.close()  # idempotent
    lis = b.Listener(node, "inbox", doorbells=bells, slot=0)
    assert bells.state(0) == (0, 1)  # a new listener: nobody sleeps, look once
    assert lis.wait(0.0) == (True, [])
    assert bells.state(0) == (0, 0)


def test_awake_listener_is_marked_not_woken(node, bells):
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=1)
    nt = b.Notifier(node, "inbox", doorbells=bells.bells, slot=1)
    assert lis.wait(0.0) == (True, [])  # (the look every new listener takes)
    assert nt.notify() == 1
    assert bells.bells.state(1) == (0, 1)  # pending, and no datagram
    assert lis.drain() == 1 and lis.drain() == 0
    nt.notify()
    assert lis.wait(5.0) == (True, [])  # returns at once: something is pending
    assert lis.wait(0.05) == (False, [])  # nothing is
    assert bells.bells.state(1) == (0, 0)


def test_sleeping_listener_is_woken(node, bells):
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=2)
    nt = b.Notifier(node, "inbox", doorbells=bells.bells, slot=2)
    lis.drain()
    result = []
    t = threading.Thread(target=lambda: result.append(lis.wait(60.0)))
    t.start()
    deadline = time.monotonic() + 30
    while bells.bells.state(2)[0] != 1:  # it sleeps in ppoll()
        assert time.monotonic() < deadline, "the listener never went to sleep"
        time.sleep(0.001)
    nt.notify()
    t.join(30)
    assert not t.is_alive() and result == [(True, [])]
    assert bells.bells.state(2) == (0, 0)


def _sleep_in_thread(lis, bells, slot, **kw):
    result = []
    t = threading.Thread(target=lambda: result.append(lis.wait(60.0, **kw)))
    t.start()
    deadline = time.monotonic() + 30
    while bells.bells.state(slot)[0] != 1:  # it sleeps in ppoll()
        assert time.monotonic() < deadline, "the listener never went to sleep"
        time.sleep(0.001)
    return t, result


def test_an_ack_that_only_makes_room_wakes_only_a_sleeper_waiting_for_room(node, bells):
    # StageLoop.serve sleeps with flow=False while it waits for input with room downstream:
    # acks of its consumer (Notifier.notify_flow) then only mark it pending.
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=2)
    nt = b.Notifier(node, "inbox", doorbells=bells.bells, slot=2)
    other = b.Notifier(node, "inbox", doorbells=bells.bells, slot=2)
    lis.drain()
    t, result = _sleep_in_thread(lis, bells, 2, flow=False)
    nt.notify_flow()
    t.join(0.3)
    assert t.is_alive() and bells.bells.state(2) == (1, 1)  # asleep, the ack pending
    other.notify()  # (its input, say)
    t.join(30)
    assert not t.is_alive() and result == [(True, [])]
    t, result = _sleep_in_thread(lis, bells, 2)  # (flow=True: it waits for room)
    nt.notify_flow()
    t.join(30)
    assert not t.is_alive() and result == [(True, [])]
    assert bells.bells.state(2) == (0, 0)


def test_a_closed_notifier_still_raises(node, bells):
    nt = b.Notifier(node, "inbox", doorbells=bells.bells, slot=1)
    nt.close()
    with pytest.raises(Exception, match="closed"):
        nt.notify()


_PEER = textwrap.dedent(
    """
    import os, random, sys
    from remotemedia import _ipc_bridge as b
    prefix, root, fd, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    node = b.Node(prefix, "peer", root)
    bells = b.Doorbells(fd)
    os.close(fd)
    sub = b.Subscriber(node, "ping", buffer_size=4)
    pub = b.Publisher(node, "pong", buffer_size=4)
    lis = b.Listener(node, "in/peer", doorbells=bells, slot=2)
    nt = b.Notifier(node, "in/test", doorbells=bells, slot=1)
    rng = random.Random(3)
    for i in range(n):
        while True:
            s = sub.receive()
            if s is not None:
                break
            notified, _ = lis.wait(10.0)
            if not notified:
                sys.exit(3 if sub.has_samples() else 4)  # a lost wake-up / nothing came
        assert s.seq == i, (s.seq, i)
        for _ in range(rng.randrange(200)):  # (a varying delay before the answer)
            pass
        assert pub.send(i, 0, b"x") == 1
        nt.notify()
    del s
    sub.close(); pub.close(); lis.close(); nt.close(); node.close()
    """
)


def test_no_wake_up_is_lost_between_processes(node, bells):
    """Ping-pong between two processes, each waking the other through the doorbells: each
    side sends, notifies and waits for the answer, so a lost wake-up is never covered by a
    later one: the wait would time out with the frame queued. Varying delays on both sides
    catch the listener both awake and asleep when the other rings."""
    n = 3000
    pub = b.Publisher(node, "ping", buffer_size=4)
    sub = b.Subscriber(node, "pong", buffer_size=4)
    lis = b.Listener(node, "in/test", doorbells=bells.bells, slot=1)
    nt = b.Notifier(node, "in/peer", doorbells=bells.bells, slot=2)
    proc = subprocess.Popen(
        [sys.executable, "-c", _PEER, node.prefix, node.root, str(bells.fd), str(n)],
        pass_fds=(bells.fd,),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    rng = random.Random(5)
    sleeps = woken = 0
    try:
        deadline = time.monotonic() + 60
        while pub.send(0, 0, b"x") == 0:  # (until the peer has subscribed)
            assert time.monotonic() < deadline and proc.poll() is None, "the peer never subscribed"
            time.sleep(0.01)
        nt.notify()
        for i in range(n):
            while True:
                s = sub.receive()
                if s is not None:
                    break
                before = bells.bells.state(1)
                notified, _ = lis.wait(10.0)
                sleeps += 1
                woken += before[1] == 0
                assert notified or not sub.has_samples(), f"round {i}: a lost wake-up"
                assert notified, f"round {i}: no answer in 10 s (peer exit code {proc.poll()})"
            assert s.seq == i
            del s
            for _ in range(rng.randrange(200)):
                pass
            if i + 1 < n:
                assert pub.send(i + 1, 0, b"x") == 1
                nt.notify()
    finally:
        proc.wait(60)
    assert proc.returncode == 0
    assert sleeps > 0 and woken > 0  # (waits found nothing pending: the race was run)


class _Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def close_w(self) -> None:
        os.close(self.w)
        self.w = -1


@pytest.fixture
def pipe():
    p = _Pipe()
    yield p
    os.close(p.r)
    if p.w >= 0:
        os.close(p.w)


def _asleep(lis, bells, slot, how, fds):
    """lis.wait(60, fds) in a thread, once the slot shows it asleep ``how``: (in ppoll(), on
    the futex)."""
    result = []
    t = threading.Thread(target=lambda: result.append(lis.wait(60.0, fds)))
    t.start()
    deadline = time.monotonic() + 30
    while bells.bells.sleepers(slot) != how:
        assert time.monotonic() < deadline, f"the listener never slept as {how}"
        time.sleep(0.001)
    return t, result


def test_a_listener_whose_fds_ring_naps_on_the_futex_and_the_ring_wakes_it(node, bells, pipe):
    # A worker's inbox: the supervisor rings the control word after each control message, so
    # the listener sleeps on the futex (the cheaper wake-up) though it has an fd to watch.
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=1, control_rings=True)
    nt = b.Notifier(node, "inbox", doorbells=bells.bells, slot=1)
    lis.drain()
    t, result = _asleep(lis, bells, 1, (0, 1), [pipe.r])
    nt.notify()  # a frame: the futex wake-up
    t.join(30)
    assert not t.is_alive() and result == [(True, [])]
    t, result = _asleep(lis, bells, 1, (0, 1), [pipe.r])
    os.write(pipe.w, b"x")
    bells.bells.ring_control(1)  # a control message
    t.join(30)
    assert not t.is_alive() and result and result[0][1] == [pipe.r]
    assert bells.bells.state(1) == (0, 0)


def test_a_napping_listener_still_finds_an_fd_nobody_rang_for(node, bells, pipe):
    # (the supervisor died: its channel's end of file rings nothing) -- found at a poll tick
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=1, control_rings=True)
    lis.drain()
    t, result = _asleep(lis, bells, 1, (0, 1), [pipe.r])
    pipe.close_w()
    t.join(30)
    assert not t.is_alive() and result == [(False, [pipe.r])]


def test_fds_whose_writers_do_not_ring_keep_the_listener_in_ppoll(node, bells, pipe):
    lis = b.Listener(node, "inbox", doorbells=bells.bells, slot=2)
    lis.drain()
    t, result = _asleep(lis, bells, 2, (1, 0), [pipe.r])
    os.write(pipe.w, b"x")  # no ring: ppoll() itself sees it
    t.join(30)
    assert not t.is_alive() and result == [(False, [pipe.r])]


class _Idle(Source):
    """Yields once, then waits until told to go on: the stage downstream sits idle."""

    def __init__(self, go: str, **kw):
        super().__init__(**kw)
        self.go = go

    def generate(self):
        yield 1
        while not os.path.exists(self.go):
            time.sleep(0.01)
        yield 2


def test_an_idle_worker_naps_and_the_supervisor_rings_its_control_word(tmp_path, monkeypatch):
    # Workers build their inbox with control_rings=True, so an idle one naps on the futex; that
    # is safe only because WorkerProcess.send rings its slot after every control message.
    rung = []
    real = Arbiter.ring_control
    monkeypatch.setattr(Arbiter, "ring_control", lambda self, slot: (rung.append(slot), real(self, slot)))
    go = tmp_path / "go"
    sup = Supervisor([_Idle(str(go), name="src"), MapNode(lambda x: x * 10, name="stage")], name="naps")
    with sup:
        assert sup.recv(timeout=60) == 10
        bells = sup._arbiter._bells.bells
        slot = worker_slot(1)  # (the stage: workers are numbered in pipeline order)
        wait_for(lambda: bells.sleepers(slot) == (0, 1), 60, "the idle stage napping on the futex")
        go.touch()
        assert sup.recv(timeout=60) == 20
    assert worker_slot(0) in rung and slot in rung  # (Setup, Start, ... rang each worker's)
