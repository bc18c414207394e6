"""How a run's worker processes start (the ``start_method`` option), and the supervisor's handle
on each one.

* ``spawn``: ``python -m supervisor.worker`` in a new interpreter (``subprocess.Popen``), a
  child of the supervisor.
* ``forkserver``: forked by the run's template (:mod:`supervisor.worker.template`), a process
  that has imported the worker, numpy, cloudpickle and the modules the nodes' pickles import,
  so a worker starts with all of that loaded, sharing those pages with its siblings.

The supervisor never forks itself (it has threads and iceoryx2 nodes); the template is
spawned like a worker. Either way :class:`WorkerProcess <supervisor.process.WorkerProcess>`
gets a handle with the same meaning: the worker's pid, its exit status as ``Popen`` gives it
(the exit code, or minus the signal), signals to its process group, its output pipes.

A forked worker is the template's child, not ours. The template reports its exit status
without reaping it (``waitid(WNOWAIT)``), so until the supervisor says ``Reap`` the worker's
pid and process group id stay its own: killing the group is race free, as it is for a spawned
worker that the supervisor has not reaped. If the template dies, its workers die with it
(their parent-death signal); their handles then learn the exit from a pidfd, and report
``-SIGKILL`` with the reason.

::

    Launcher            ForkserverLauncher (one template per run)        SpawnLauncher
    launch(argv, fds) -> ForkedWorker (pid, pidfd)                        SpawnedWorker (Popen)
    pump()               Exited messages -> handles; template death
    close()              template gone (it exits when we close its socket)
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from .worker.template import MAX_FDS, MAX_MESSAGE, Reap, Spawn

__all__ = [
    "WorkerHandle",
    "SpawnedWorker",
    "ForkedWorker",
    "Launcher",
    "SpawnLauncher",
    "ForkserverLauncher",
    "make_launcher",
    "worker_env",
    "imported_modules",
]

log = logging.getLogger("remotemedia.supervisor")

#: Template deaths a run tolerates; after that its workers are spawned.
MAX_TEMPLATE_DEATHS = 3
#: Seconds the template gets to fork a worker and answer (it answers in about a millisecond).
SPAWN_REPLY_TIMEOUT = 30.0


def worker_env(extra: Dict[str, str]) -> Dict[str, str]:
    """The environment of a worker started now: ours, ``extra`` (the ``env`` option), our
    ``sys.path`` as PYTHONPATH (the worker imports what we import), unbuffered output and
    faulthandler (a segfault still leaves a traceback)."""
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.abspath(p or os.getcwd()) for p in sys.path if p is not None]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("PYTHONFAULTHANDLER", "1")
    return env


# ================================================================== handles


class WorkerHandle:
    """The supervisor's handle on one worker process."""

    pid: int
    #: The exit status once reaped (Popen's: the exit code, or minus the signal), else None.
    returncode: Optional[int] = None
    #: Why it exited, when the runtime knows better than its status ("its worker template died").
    note: Optional[str] = None
    stdout_fd: int
    stderr_fd: int

    def poll_exit(self) -> Optional[int]:
        """The exit status, once, when the process has exited (then it is reaped, after what
        it left running in its process group is SIGKILLed); else None."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (it leads one: its children too)."""
        raise NotImplementedError

    def wait(self, timeout: float) -> Optional[int]:
        """Wait up to ``timeout`` seconds for the exit; the status (None: still running)."""
        raise NotImplementedError

    def close_output(self) -> None:
        """Close our ends of its stdout and stderr pipes."""
        for fd in (self.stdout_fd, self.stderr_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.stdout_fd = self.stderr_fd = -1


class SpawnedWorker(WorkerHandle):
    """A worker started with ``Popen``: our child."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        self.stdout_fd = proc.stdout.fileno()
        self.stderr_fd = proc.stderr.fileno()

    @property  # type: ignore[override]
    def returncode(self) -> Optional[int]:
        return self.proc.returncode

    def poll_exit(self) -> Optional[int]:
        if self.proc.returncode is not None:
            return None
        try:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return None
            # (a helper that ignored SIGTERM, one orphaned by a crash) The worker leads its
            # process group and is not reaped yet, so its pid still names that group only.
            os.killpg(self.pid, signal.SIGKILL)
        except (ChildProcessError, ProcessLookupError, PermissionError):
            pass  # (ChildProcessError: reaped elsewhere; poll() below has its status)
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)  # (not reaped: the group is still its own)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close_output(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self.stdout_fd = self.stderr_fd = -1


class ForkedWorker(WorkerHandle):
    """A worker forked by the run's template: the template's child, watched through it (and a
    pidfd, should the template die)."""

    def __init__(self, launcher: "ForkserverLauncher", pid: int, stdout_fd: int, stderr_fd: int) -> None:
        self.launcher = launcher
        self.pid = pid
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.returncode = None
        self.status: Optional[int] = None  # reported by the template, not yet reaped
        self.orphaned = False  # its template died (and so does it)
        try:
            # The template does not reap it before our Reap: the pid is still this process,
            # unless the template died since it answered (then init reaps it).
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.pidfd = -1
            self.orphaned = True

    def poll_exit(self) -> Optional[int]:
        if self.returncode is not None:
            return None
        if self.status is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # what it left in its group (not reaped yet)
            except (ProcessLookupError, PermissionError):
                pass
            self.launcher.reap(self)
            return self._exited(self.status)
        if self.orphaned and (self.pidfd < 0 or _readable(self.pidfd)):
            # Killed by its parent-death signal's handler (a SIGKILL of its group).
            self.note = "its worker template died"
            return self._exited(-signal.SIGKILL)
        return None

    def _exited(self, status: int) -> int:
        self.returncode = status
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        return status

    def signal(self, sig: int) -> None:
        if self.returncode is not None or self.pidfd < 0:
            return
        try:
            if self.orphaned:
                # Reaped by init, perhaps: its pid may be another process's by now, the pidfd
                # is not; what was left of its group, its death signal's handler has killed.
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            signal.pidfd_send_signal(self.pidfd, sig)

    def wait(self, timeout: float) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while True:
            self.poll_exit()
            if self.returncode is not None:
                return self.returncode
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.orphaned:
                _readable(self.pidfd, left)
            else:
                self.launcher.pump(left)


def _readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether ``fd`` is readable within ``timeout`` seconds (poll: any descriptor number)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


# ================================================================== launchers


class Launcher:
    """Starts a run's workers (one per run, owned by its arbiter thread: not thread safe)."""

    method = ""

    def prepare(self) -> None:
        """Get ready to launch (start the template) without waiting."""

    def launch(self, argv: List[str], pass_fds: Sequence[int], extra_env: Dict[str, str]) -> WorkerHandle:
        """Start ``python -m supervisor.worker *argv --ppid <its parent>`` with ``pass_fds``
        (at the same numbers), stdin /dev/null, stdout and stderr pipes, in its own process
        group, with :func:`worker_env` of ``extra_env``."""
        raise NotImplementedError

    def fds(self) -> List[int]:
        """What the arbiter waits on besides the workers' own descriptors."""
        return []

    def pump(self, timeout: float = 0.0) -> None:
        """Take in what the launcher was told about its workers (up to ``timeout`` s)."""

    def close(self) -> None:
        """After the run's workers are gone."""

    def describe(self) -> Dict[str, Any]:
        return {"start_method": self.method}


class SpawnLauncher(Launcher):
    """``start_method="spawn"``: a new interpreter per worker."""

    method = "spawn"

    def launch(self, argv: List[str], pass_fds: Sequence[int], extra_env: Dict[str, str]) -> WorkerHandle:
        return self.spawn(argv, pass_fds, worker_env(extra_env))

    @staticmethod
    def spawn(argv: List[str], pass_fds: Sequence[int], env: Dict[str, str]) -> SpawnedWorker:
        cmd = [sys.executable, "-m", "supervisor.worker", *argv, "--ppid", str(os.getpid())]
        proc = subprocess.Popen(
            cmd,
            pass_fds=tuple(pass_fds),
            process_group=0,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        return SpawnedWorker(proc)


class TemplateGone(Exception):
    """The template died, or did not answer in time."""


class ForkserverLauncher(Launcher):
    """``start_method="forkserver"``: workers forked by the run's template.

    The template starts at :meth:`prepare` (it imports while the arbiter sets up the run) and
    the first :meth:`launch` waits for its Hello. When it cannot be used (it fails to start,
    it has threads after its imports even without the nodes' modules, it dies more than
    ``MAX_TEMPLATE_DEATHS`` times) workers are spawned, with a warning; a worker whose
    environment differs from the template's (``os.environ`` changed since) is spawned too.
    """

    method = "forkserver"

    def __init__(self, extra_env: Dict[str, str], preload: Iterable[str], hello_timeout: float) -> None:
        self.extra_env = extra_env
        self.preload = sorted(set(preload))
        self.hello_timeout = hello_timeout
        self.proc: Optional[subprocess.Popen] = None  # the template
        self.sock: Optional[socket.socket] = None
        self.env: Dict[str, str] = {}
        self.pid: Optional[int] = None  # the template's, once it said Hello
        self.handles: Dict[int, ForkedWorker] = {}  # its children we have not reaped
        self.deaths = 0
        self.fallback: Optional[str] = None  # why workers are spawned instead
        self.started = 0  # templates started
        self.started_at = 0.0
        self.forked = 0
        self.spawned = 0

    # ------------------------------------------------------------------ the template

    def prepare(self) -> None:
        if self.proc is not None or self.fallback is not None:
            return
        try:
            os.close(os.pidfd_open(os.getpid()))
        except (AttributeError, OSError) as e:  # (Python >= 3.9 and Linux >= 5.3 have them)
            self._fall_back(f"pidfds are not available here ({e})")
            return
        self._start()

    def _start(self) -> None:
        try:
            self._start_template()
        except OSError as e:  # (out of processes or descriptors: a worker may still spawn later)
            self._fall_back(f"the worker template could not be started ({e})")

    def _start_template(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child.set_inheritable(True)
            self.env = worker_env(self.extra_env)
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "supervisor.worker.template",
                    "--fd", str(child.fileno()), "--ppid", str(os.getpid()), "--preload", ",".join(self.preload),
                ],
                pass_fds=(child.fileno(),),
                process_group=0,  # (a terminal's Ctrl-C is the supervisor's to handle)
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )  # fmt: skip
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.sock = parent
        self.pid = None
        self.started += 1
        self.started_at = time.monotonic()

    def _ready(self) -> bool:
        """Wait for the template's Hello if it has not come yet; False when workers are to be
        spawned (the fallback has been decided, and logged)."""
        while self.fallback is None:
            if self.proc is None:
                self._start()
                continue  # (or fall back)
            if self.pid is not None:
                return True
            try:
                hello = self._receive(time.monotonic() + self.hello_timeout, "hello")
            except TemplateGone as e:
                # (one that cannot get through its imports would not the next time either)
                if self.fallback is None:
                    self._fall_back(f"the worker template {e} before it was ready")
                return False
            _, pid, threads, failed = hello
            if failed:
                log.info("the worker template could not preload %s", "; ".join(f"{m} ({err})" for m, err in failed.items()))
            if threads:
                # Forking a process with threads copies only the forking one: locks the others
                # held stay locked forever in the child. Not a template, then.
                if self.preload:
                    log.warning(
                        "the worker template has threads after importing the nodes' modules (%s; %s): "
                        "starting it again without them", ", ".join(self.preload), ", ".join(threads)
                    )
                    self.preload = []
                    self._stop()
                    continue
                self._fall_back(f"the worker template has threads after its imports ({', '.join(threads)})")
                return False
            self.pid = pid
            log.debug("worker template (pid %d) ready after %.3f s", pid, time.monotonic() - self.started_at)
            return True
        return False

    def _fall_back(self, why: str) -> None:
        self.fallback = why
        log.warning("%s; workers are spawned instead (start_method='spawn')", why)
        self._stop()

    def _stop(self) -> None:
        """Close the template's socket (it exits: so do the workers it forked) and reap it."""
        sock, proc = self.sock, self.proc
        self.sock = self.proc = None
        self.pid = None
        for h in self.handles.values():
            if h.status is None:
                h.orphaned = True
        self.handles = {p: h for p, h in self.handles.items() if not h.orphaned}
        if sock is not None:
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _died(self) -> Optional[int]:
        """The template's socket hung up (or it stopped answering and was killed): it is
        dead, and so are the workers it forked, by their parent-death signal. Its exit
        status."""
        proc = self.proc
        status = None
        if proc is not None:
            try:
                status = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # (it closed the socket, yet lives: end it)
                proc.kill()
                status = proc.wait()
        if self.sock is not None:
            self.sock.close()
        pid, serving = (self.pid, True) if self.pid is not None else (proc.pid if proc is not None else None, False)
        self.sock = self.proc = self.pid = None
        orphans = [h for h in self.handles.values() if h.status is None]
        for h in orphans:
            h.orphaned = True
        self.handles = {p: h for p, h in self.handles.items() if not h.orphaned}
        self.deaths += 1
        if serving:  # (one that dies before its Hello is a failure to start: _ready says so)
            log.warning(
                "the worker template (pid %s) died (%s)%s", pid, _describe(status),
                f"; its {len(orphans)} running worker(s) die with it and are restarted under their restart policy" if orphans else "",
            )  # fmt: skip
            if self.deaths > MAX_TEMPLATE_DEATHS:
                self._fall_back(f"the worker template died {self.deaths} times")
        return status

    # ------------------------------------------------------------------ messages

    def _receive(self, deadline: float, want: str) -> Any:
        """Read messages until one of kind ``want`` (hello, spawned/spawn_failed) arrives,
        dispatching the others; TemplateGone if it dies or does not answer in time (then it
        is killed)."""
        while True:
            sock = self.sock
            if sock is None:
                raise TemplateGone("is gone")
            left = deadline - time.monotonic()
            if left <= 0:
                if self.proc is not None:
                    self.proc.kill()
                self._died()
                raise TemplateGone(f"did not answer within {self.hello_timeout if want == 'hello' else SPAWN_REPLY_TIMEOUT:g} s")
            if not _readable(sock.fileno(), left):
                continue
            msg = self._read_one()
            if msg is None:
                raise TemplateGone(f"died ({_describe(self._died())})")
            if msg[0] == want or (want == "spawned" and msg[0] == "spawn_failed"):
                return msg

    def _read_one(self) -> Optional[Any]:
        """One message (dispatched when it is an Exited), or None at EOF; the socket must be
        readable."""
        assert self.sock is not None
        try:
            data = self.sock.recv(MAX_MESSAGE)
        except (ConnectionResetError, OSError):
            data = b""
        if not data:
            return None
        msg = pickle.loads(data)
        if msg[0] == "exited":
            h = self.handles.get(msg[1])
            if h is not None:
                h.status = msg[2]
        return msg

    def pump(self, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while self.sock is not None:
            if not _readable(self.sock.fileno(), deadline - time.monotonic()):
                return
            if self._read_one() is None:
                self._died()
                return
            deadline = time.monotonic()  # (then whatever else is there already, no waiting)

    def fds(self) -> List[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    def reap(self, handle: ForkedWorker) -> None:
        """The supervisor is done with ``handle``'s exit: the template may reap it."""
        self.handles.pop(handle.pid, None)
        if self.sock is not None:
            try:
                self.sock.send(pickle.dumps(Reap(handle.pid)))
            except OSError:
                pass  # (the template is dying: its EOF is read on the next pump)

    # ------------------------------------------------------------------ launching

    def launch(self, argv: List[str], pass_fds: Sequence[int], extra_env: Dict[str, str]) -> WorkerHandle:
        env = worker_env(extra_env)
        for _attempt in range(2):  # (a template that just died is started again once)
            if not self._ready():
                break
            if env != self.env:
                # What an interpreter reads at start-up (PYTHONPATH, ...) and what the
                # template's imports read (OMP_NUM_THREADS, ...) would be the template's.
                changed = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
                log.info("the environment changed since the worker template started (%s): spawning the worker", ", ".join(changed))
                break
            try:
                return self._fork(argv, pass_fds)
            except TemplateGone:
                continue
            except OSError as e:  # (it lives, but could not fork this one: out of memory, ...)
                log.warning("the worker template could not start a worker (%s): spawning it", e)
                break
        self.spawned += 1
        return SpawnLauncher.spawn(argv, pass_fds, env)

    def _fork(self, argv: List[str], pass_fds: Sequence[int]) -> ForkedWorker:
        assert self.sock is not None and self.pid is not None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            fds = [*pass_fds, out_w, err_w]
            targets = [*pass_fds, 1, 2]
            if len(fds) > MAX_FDS:
                raise ValueError(f"{len(fds)} descriptors for a worker, at most {MAX_FDS}")
            request = pickle.dumps(Spawn([*argv, "--ppid", str(self.pid)], targets, os.getcwd()))
            try:
                socket.send_fds(self.sock, [request], fds)
            except (BrokenPipeError, ConnectionResetError):
                self._died()
                raise TemplateGone("is gone") from None
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        try:
            reply = self._receive(time.monotonic() + SPAWN_REPLY_TIMEOUT, "spawned")
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        if reply[0] == "spawn_failed":
            os.close(out_r)
            os.close(err_r)
            raise OSError(reply[1])
        try:
            handle = ForkedWorker(self, reply[1], out_r, err_r)
        except OSError as e:
            # (out of descriptors) Not an OSError for launch(): the worker runs, and must not
            # get a spawned twin on its control socket. The template kills it when it exits.
            os.close(out_r)
            os.close(err_r)
            raise RuntimeError(f"cannot watch the forked worker (pid {reply[1]}): {e}") from e
        self.handles[handle.pid] = handle
        self.forked += 1
        return handle

    def close(self) -> None:
        self._stop()

    def describe(self) -> Dict[str, Any]:
        return {
            "start_method": self.method,
            "template_pid": self.pid,
            "templates_started": self.started,
            "forked": self.forked,
            "spawned": self.spawned,
            "fallback": self.fallback,
        }


def _describe(status: Optional[int]) -> str:
    from .process import describe_exit  # (process imports this module)

    return describe_exit(status)


def make_launcher(start_method: str, extra_env: Dict[str, str], preload: Iterable[str] = (), hello_timeout: float = 60.0) -> Launcher:
    """The launcher of ``start_method`` (``"spawn"`` or ``"forkserver"``)."""
    if start_method == "spawn":
        return SpawnLauncher()
    if start_method == "forkserver":
        return ForkserverLauncher(extra_env, preload, hello_timeout)
    raise ValueError(f"unknown start_method {start_method!r}; use 'spawn' or 'forkserver'")


# ================================================================== preloading


#: Modules every template has imported anyway, and names that are not modules to import.
_NOT_PRELOADED = ("__main__", "builtins", "copyreg", "_codecs", "__builtin__")


def imported_modules(blobs: Iterable[bytes]) -> Set[str]:
    """The modules unpickling ``blobs`` (the nodes' pickles) imports: those of the classes and
    functions pickled by reference, and the modules cloudpickle pickles as such (a ``torch``
    that a node's method uses). Only modules this process has imported, under their own name,
    are given: importing one is then what the worker would do anyway.

    Example::

        >>> import cloudpickle
        >>> from remotemedia.nodes import PassThroughNode
        >>> "remotemedia.nodes" in imported_modules([cloudpickle.dumps(PassThroughNode())])
        True
    """
    found: Set[str] = set()
    for blob in blobs:
        found |= _pickle_modules(blob)
    out = set()
    for name in found:
        mod = sys.modules.get(name)
        spec = getattr(mod, "__spec__", None)
        if mod is None or spec is None or spec.name != name or name in _NOT_PRELOADED:
            continue
        out.add(name)
    return out


def _pickle_modules(blob: bytes) -> Set[str]:
    modules: Set[str] = set()
    memo: Dict[int, Any] = {}
    strings: List[str] = []  # the strings pushed lately (STACK_GLOBAL takes the last two)
    last: Any = None  # what the last opcode pushed (MEMOIZE stores it)
    subimport_next = False
    try:
        for op, arg, _pos in pickletools.genops(blob):
            name = op.name
            pushed: Any = None
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                pushed = arg
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = last
                continue
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = last
                continue
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                module, qualname = strings[-2], strings[-1]
                modules.add(module)
                subimport_next = module.startswith("cloudpickle") and qualname == "subimport"
                strings.clear()
                last = None
                continue
            elif name in ("GLOBAL", "INST") and isinstance(arg, str):
                modules.add(arg.split(" ")[0])
            if isinstance(pushed, str):
                strings.append(pushed)
                if subimport_next:
                    modules.add(pushed)
                    subimport_next = False
            last = pushed
    except Exception:  # (not a pickle we can read: nothing to preload from it)
        pass
    return modules

