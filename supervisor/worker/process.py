"""The worker process: start-up (Hello, Setup, load the node), the loop, the end (Done, exit
code). See the package docstring for the sequence."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from typing import Any, List, Optional, Tuple

import cloudpickle

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import SharedMemoryFullError

from ..logs import WorkerLogHandler
from ..protocol import (
    EXIT_ABORTED,
    EXIT_LOAD_ERROR,
    EXIT_OK,
    EXIT_SETUP_ERROR,
    Abort,
    ChannelClosed,
    ControlChannel,
    Done,
    Hello,
    InitFailed,
    NodeFailed,
    Ready,
    Setup,
    WorkerSpec,
)
from .failures import Aborted as _Abort
from .failures import format_exc as _format_exc
from .runner import Runner

log = logging.getLogger("remotemedia.worker")

# Sent to the worker when its parent dies; its native handler (the bridge's die_with_parent)
# SIGKILLs the worker's process group, so the node's own child processes die too. A real-time
# signal: neither CPython nor the usual media libraries handle one.
PARENT_DEATH_SIGNAL = signal.SIGRTMAX


def _die_with_parent(expected_ppid: int) -> None:
    # PDEATHSIG fires when the *thread* that spawned us exits; the supervisor spawns from
    # its arbiter thread, which lives as long as any worker. The ppid check closes the race
    # where the parent died before the signal was armed.
    if not bridge.die_with_parent(expected_ppid, PARENT_DEATH_SIGNAL):
        os._exit(EXIT_SETUP_ERROR)


def _on_sigterm(signum: int, frame: Any) -> None:
    # The supervisor asks politely first (Abort on the control socket); SIGTERM comes only
    # for a worker stuck in Python code, and raising here is what unwinds it so that
    # cleanup() still runs. A worker stuck in C code is SIGKILLed after the grace period.
    raise _Abort("SIGTERM")


def _configure_logging(spec: WorkerSpec) -> None:
    # Records go to the supervisor as marked JSON lines on stderr; it adds node, pid, time.
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(WorkerLogHandler())
    root.setLevel(spec.log_level)


def _read_blob(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=True) as f:
        f.seek(0)
        return f.read()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.worker")
    parser.add_argument("--fd", type=int, required=True, help="control socket fd")
    parser.add_argument("--blob-fd", type=int, required=True, help="memfd holding the pickled node")
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)

    _die_with_parent(args.ppid)
    # The supervisor orchestrates shutdown: Ctrl-C in a terminal must not kill workers
    # mid-frame. SIGTERM (sent only when a worker does not stop on request) exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)

    chan = ControlChannel.from_fd(args.fd)
    try:
        chan.send(Hello(os.getpid()))
        setup, early = await_setup(chan)
    except (ChannelClosed, _Abort):
        return EXIT_SETUP_ERROR
    if any(isinstance(m, Abort) for m in early):
        return EXIT_ABORTED  # stopped before it began (the Abort may share a read with Setup)
    spec = setup.spec
    _configure_logging(spec)

    t0 = time.monotonic()
    stage = "unpickle"
    try:
        blob = _read_blob(args.blob_fd)
        node = cloudpickle.loads(blob)
        del blob
        stage = "initialize"
        node.initialize()
        # Runtime state of the last commit wins over what initialize() set up.
        if setup.restore is not None and setup.restore.snapshot is not None and callable(getattr(node, "restore", None)):
            stage = "restore"
            node.restore(cloudpickle.loads(setup.restore.snapshot))
    except BaseException as e:  # noqa: BLE001 - everything must reach the supervisor
        exc_type, message, tb, _ = _format_exc(e)
        try:
            chan.send(InitFailed(stage, exc_type, message, tb))
        except ChannelClosed:
            pass
        return EXIT_LOAD_ERROR

    try:
        runner = Runner(node, spec, chan, setup.restore)
    except BaseException as e:  # noqa: BLE001
        exc_type, message, tb, _ = _format_exc(e)
        try:
            chan.send(InitFailed("setup", exc_type, message, tb))
        except ChannelClosed:
            pass
        _safe_cleanup(node, spec)
        return EXIT_SETUP_ERROR

    code = EXIT_OK
    try:
        chan.send(Ready(os.getpid(), time.monotonic() - t0))
        runner.handle_control(early)
        prof_dir = os.environ.get("REMOTEMEDIA_PROFILE_DIR")
        if prof_dir:  # development aid: a cProfile of the worker loop per node
            import cProfile

            prof = cProfile.Profile()
            try:
                code = prof.runcall(runner.run)
            finally:
                prof.dump_stats(os.path.join(prof_dir, f"{spec.name}.prof"))
        else:
            code = runner.run()
    except _Abort:
        code = EXIT_ABORTED
    except ChannelClosed:
        code = EXIT_ABORTED
    except SharedMemoryFullError as e:
        # Not the node's fault, and a restart would not cure it: the pipeline fails.
        code = _fail_and_wait(chan, e)
    finally:
        stats = runner.stats()
        _safe_cleanup(node, spec)
        runner.close()
    if code == EXIT_OK:
        try:
            chan.send(Done(stats))
        except ChannelClosed:
            pass
    return code


def await_setup(chan: ControlChannel) -> Tuple[Setup, List[Any]]:
    """Wait for the Setup message; also return the messages read with it. Those must not be
    lost: the supervisor relays acks to a worker while it starts (a consumer's final commit
    is relayed only once), and a restarted producer whose end of stream was committed while
    it was down would otherwise wait for that ack forever."""
    early: List[Any] = []
    while True:
        msgs = _blocking_receive(chan)
        setup = next((m for m in msgs if isinstance(m, Setup)), None)
        early.extend(m for m in msgs if m is not setup)
        if setup is not None or any(isinstance(m, Abort) for m in early):
            return setup, early  # type: ignore[return-value]


def _fail_and_wait(chan: ControlChannel, e: BaseException) -> int:
    """Report a fatal error that did not come from the node and wait for the supervisor's
    Abort (touching no shared memory meanwhile)."""
    exc_type, message, tb, blob = _format_exc(e)
    try:
        chan.send(NodeFailed(None, None, exc_type, message, tb, blob, fatal=True))
        while not any(isinstance(m, Abort) for m in _blocking_receive(chan)):
            pass
    except ChannelClosed:
        pass
    return EXIT_ABORTED


def _safe_cleanup(node: Any, spec: WorkerSpec) -> None:
    try:
        node.cleanup()
    except Exception:
        log.exception("cleanup() of node %s raised", spec.name)


def _blocking_receive(chan: ControlChannel) -> List[Any]:
    import select

    while True:
        msgs = chan.receive()
        if msgs:
            return msgs
        select.select([chan.fileno()], [], [], 1.0)
