"""The worker template of ``start_method="forkserver"``: one process per run that has imported
what every worker needs and forks the run's workers (after gunicorn's ``--preload`` and
multiprocessing's forkserver).

A worker started with ``python -m supervisor.worker`` spends most of its start-up importing
numpy, cloudpickle and the runtime, and keeps its own copy of all of it (~20 MiB private per
worker). A forked worker starts with those imports done and shares their pages with the
template until it writes to them.

::

    supervisor (arbiter thread)                 template (python -m supervisor.worker.template)
    ---------------------------                 ------------------------------------------------
    Popen(template, pass_fds=(sock,))  ------>  import the worker, numpy, cloudpickle, the
                                                nodes' modules; a first fork (quiesces
                                                OpenBLAS's threads); gc.freeze()
                                       <------  Hello(pid, threads, preload failures)
    Spawn(argv, fd targets, cwd)       ------>  fork; the child: its own process group, the
      + SCM_RIGHTS: control socket,             fds at the supervisor's numbers (the output
      node memfd, status block,                 pipes as stdout and stderr), the cwd; then
      doorbells, stdout, stderr                 the worker's main() as ``python -m
                                                supervisor.worker`` runs it
                                       <------  Spawned(pid) | SpawnFailed(message)
                                       <------  Exited(pid, status): a child exited; it is
                                                *not* reaped yet, so its pid (and process
                                                group id) cannot be reused while the
                                                supervisor SIGKILLs what is left of its group
    Reap(pid)                          ------>  waitpid
    EOF (the supervisor closed it)     ------>  exit

Nothing iceoryx2 exists here, and no thread when it forks: the template only imports, and
checks its thread count before it says Hello (a template with threads is not used).

Lifetimes: the template dies with the thread of the supervisor that started it
(``PR_SET_PDEATHSIG``, as a spawned worker does), and each forked worker dies with the template
(its parent), so a SIGKILLed supervisor takes the whole tree with it. A template that dies
takes its workers along; the supervisor sees their pids exit and restarts them under their
restart policy, with a new template.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import importlib
import os
import pickle
import select
import signal
import socket
import sys
import threading
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

# What every worker imports: loading it here is the point of the template.
import cloudpickle  # noqa: F401
import numpy  # noqa: F401

from remotemedia import _ipc_bridge as bridge

from ..protocol import EXIT_SETUP_ERROR
from .process import PARENT_DEATH_SIGNAL
from .process import main as worker_main

__all__ = ["main", "Hello", "Spawn", "Spawned", "SpawnFailed", "Exited", "Reap", "MAX_FDS", "MAX_MESSAGE"]

#: Descriptors a Spawn request may carry.
MAX_FDS = 16
#: Largest message either side sends (a Spawn, its argv and cwd: far less).
MAX_MESSAGE = 1 << 16
#: ``sys.argv[0]`` of a worker started with ``python -m supervisor.worker``.
WORKER_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")


# ------------------------------------------------------------------ messages (pickled tuples)


def Hello(pid: int, threads: List[str], failed: Dict[str, str]) -> Tuple[Any, ...]:
    """The template is ready: its pid, its threads besides the main one (must be none), the
    preloaded modules that failed to import (module -> error)."""
    return ("hello", pid, threads, failed)


def Spawn(argv: Sequence[str], targets: Sequence[int], cwd: str) -> Tuple[Any, ...]:
    """Fork a worker: ``targets[i]`` is the descriptor number the i-th passed descriptor gets
    in the worker (1, 2 for stdout and stderr; the others keep the supervisor's numbers),
    ``argv`` the arguments of ``python -m supervisor.worker``. Its environment is the
    template's (the supervisor spawns a worker whose environment would differ)."""
    return ("spawn", list(argv), list(targets), cwd)


def Spawned(pid: int) -> Tuple[Any, ...]:
    return ("spawned", pid)


def SpawnFailed(message: str) -> Tuple[Any, ...]:
    return ("spawn_failed", message)


def Exited(pid: int, status: int) -> Tuple[Any, ...]:
    """A worker exited with ``status`` (Popen's returncode: the exit code, or minus the
    signal); it stays unreaped until Reap."""
    return ("exited", pid, status)


def Reap(pid: int) -> Tuple[Any, ...]:
    return ("reap", pid)


# ------------------------------------------------------------------ the template


def _threads() -> List[str]:
    """The names of this process's threads other than the calling one."""
    me = str(threading.get_native_id())
    out = []
    for tid in os.listdir("/proc/self/task"):
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                out.append(f"{f.read().strip()} (tid {tid})")
        except OSError:
            pass  # (it ended meanwhile)
    return out


def _quiesce() -> None:
    """A first fork whose child exits at once: libraries that start thread pools at import
    and stop them at fork (OpenBLAS, which numpy loads) stop them now, so the template holds
    no thread when it forks workers, and its thread count can be checked."""
    with warnings.catch_warnings():
        # (Python >= 3.12 warns about forking with threads: these stop at the fork)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def _status(pid: int) -> Optional[int]:
    """The exit status of child ``pid`` without reaping it (None: still running)."""
    r = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if r is None:
        return None
    return r.si_status if r.si_code == os.CLD_EXITED else -r.si_status


def _send(sock: socket.socket, msg: Tuple[Any, ...]) -> None:
    sock.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))  # (one record: SOCK_SEQPACKET)


#: The workers forked and not reaped yet: each pid still names its worker's process group.
_UNREAPED: Set[int] = set()


def _kill_workers() -> None:
    """SIGKILL the process group of every worker not reaped yet. A worker that has exited
    (its supervisor died: it saw its control socket close) is one of them until Reap, and its
    node's helpers may still run in its group, which nobody else would kill now."""
    for pid in _UNREAPED:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _on_parent_death(signum: int, frame: Any) -> None:
    # (in Python, not the bridge's native handler: the template only ever waits in poll(),
    # so this runs at once, and it knows its workers' groups)
    _kill_workers()
    os._exit(0)


def serve(sock: socket.socket) -> int:
    """Answer the supervisor's requests until it closes the socket."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    children: Dict[int, int] = {}  # pidfd -> pid of a child that has not exited yet
    while True:
        for fd, _events in poller.poll():
            if fd != sock.fileno():
                pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                status = _status(pid)
                _send(sock, Exited(pid, status if status is not None else -signal.SIGKILL))
                continue
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            if not data:
                _kill_workers()  # the supervisor is done (all reaped) or gone
                return 0
            msg = pickle.loads(data)
            if msg[0] == "spawn":
                _spawn(sock, poller, children, msg, fds)
            elif msg[0] == "reap":
                for fd in fds:
                    os.close(fd)
                try:
                    os.waitpid(msg[1], 0)
                except ChildProcessError:
                    pass
                _UNREAPED.discard(msg[1])


def _spawn(sock: socket.socket, poller: Any, children: Dict[int, int], msg: Tuple[Any, ...], fds: List[int]) -> None:
    _, argv, targets, cwd = msg
    try:
        if len(fds) != len(targets):
            raise OSError(f"got {len(fds)} descriptors for {len(targets)} targets")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
    except OSError as e:
        for fd in fds:
            os.close(fd)
        _send(sock, SpawnFailed(f"fork failed: {e}"))
        return
    if pid == 0:
        sock.detach()  # (its number is closed below; the object must not close it again later)
        _child(argv, dict(zip(targets, fds)), cwd)  # never returns
    _UNREAPED.add(pid)
    for fd in fds:
        os.close(fd)
    # The child cannot be reaped before this (only Reap reaps), so its pid is still its own.
    pidfd = os.pidfd_open(pid)
    children[pidfd] = pid
    poller.register(pidfd, select.POLLIN)
    _send(sock, Spawned(pid))


def _place_fds(placement: Dict[int, int]) -> None:
    """Give each received descriptor its target number (inheritable, as ``pass_fds`` would)
    and close every other descriptor of the template."""
    keep = set(placement) | {0, 1, 2}
    top = max(keep) + 1
    high = {target: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for target, fd in placement.items()}
    for target, fd in high.items():
        os.dup2(fd, target, inheritable=True)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # (the directory listing's own descriptor, already closed)


def _child(argv: List[str], placement: Dict[int, int], cwd: str) -> None:
    """In the forked child: become what ``Popen([python, -m, supervisor.worker, *argv],
    pass_fds=..., process_group=0, cwd=...)`` starts, run the worker, exit as the
    interpreter would."""
    code: Any = EXIT_SETUP_ERROR
    try:
        os.setpgid(0, 0)
        _place_fds(placement)
        os.chdir(cwd)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (a new interpreter's)
        signal.signal(PARENT_DEATH_SIGNAL, signal.SIG_DFL)  # (the worker arms its own)
        sys.argv = [WORKER_MAIN, *argv]
        rng = sys.modules.get("numpy.random")
        if rng is not None:  # the template's global RandomState would repeat in every worker
            rng.seed()  # (``random`` reseeds itself after a fork)
    except BaseException:  # noqa: BLE001 - nothing may return into the template's loop
        _print_exc()
        os._exit(EXIT_SETUP_ERROR)
    try:
        code = worker_main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends an interpreter
        _print_exc()
        code = 1
    os._exit(_finish(code))


def _finish(code: Any) -> int:
    """What ``sys.exit(code)`` does at the end of an interpreter: wait for non-daemon
    threads, run the atexit handlers, flush stdio; the exit status."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        print(code, file=sys.stderr)
        status = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]
    except BaseException:  # noqa: BLE001
        _print_exc()
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        _print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    return status


def _print_exc() -> None:
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001
        pass


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m supervisor.worker.template")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the supervisor")
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--preload", default="", help="comma-separated modules to import before forking")
    args = parser.parse_args(argv)

    # Like a worker: die with the supervisor's thread that started us; the workers we forked
    # die with us (their own parent-death signal), those that exited already by _kill_workers.
    if not bridge.die_with_parent(args.ppid, PARENT_DEATH_SIGNAL):
        return EXIT_SETUP_ERROR
    signal.signal(PARENT_DEATH_SIGNAL, _on_parent_death)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we end
    # An ignored SIGCHLD (inherited through exec) would reap the workers behind our back.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sock = socket.socket(fileno=args.fd)
    failed: Dict[str, str] = {}
    for name in filter(None, args.preload.split(",")):
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 - the worker will say it again, with its node
            failed[name] = f"{type(e).__name__}: {e}"
    _quiesce()
    # What the template imported stays shared with its workers as long as nobody writes to it;
    # the collector would (its links live in every object), so it leaves these objects alone.
    gc.collect()
    gc.freeze()
    _send(sock, Hello(os.getpid(), _threads(), failed))
    return serve(sock)


if __name__ == "__main__":
    sys.exit(main())
