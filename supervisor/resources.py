"""Where a run's files live, who can reach them, and how they are removed.

Every file of a supervisor run lives in ONE private directory::

    <base>/                          0700, ours: $REMOTEMEDIA_SHM_DIR, else /dev/shm/remotemedia-<euid>
        <pid>x<random>/              one run (its supervisor's pid), 0700, created exclusively
            rm_*.dynamic, *.data, *.connection, *.event_mgmt   iceoryx2 shared memory (mmap-ed files)
            rm_*.event               iceoryx2 wake-up sockets
            services/, nodes/        iceoryx2 service configs, node details and liveness locks

* The bridge's iceoryx2 service type is file based (``rust/ipc_bridge/src/service.rs``):
  iceoryx2 puts its segments under the configured root instead of ``shm_open`` names in
  /dev/shm, and nothing in /tmp/iceoryx2. The base is on tmpfs by default, so a mapped file
  costs what POSIX shared memory costs.
* Worker status blocks (:mod:`supervisor.scoreboard`) and node blobs are memfds: no name.
* Other users can neither list nor open anything of a run, plant a file or symlink at a name
  the runtime will use, truncate a segment, nor block a run: the base is checked at every
  start (:func:`supervisor.private.ensure_private_dir`: a real directory, not a symlink, ours,
  not writable by others) and a run directory must not exist before. Each user has their own
  base, so users on one host never share a file. Processes of the same user are trusted: the
  frames in these files are unpickled by the workers.

A run directory's name carries its supervisor's pid, which makes cleanup simple:

* at the end of a run the supervisor removes its directory;
* a run whose supervisor died (SIGKILL) is recognised by the dead pid, and the next
  supervisor to start removes its directory, unless iceoryx2 still sees a live node in it (an
  orphaned worker). That cleanup never opens iceoryx2's shared memory (removing the directory
  is all it takes, everything is in it) and runs under a deadline: a corrupt or foreign entry
  is skipped with a warning, and a start never waits on it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

import psutil

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import SharedMemoryFullError, SupervisorError, UnsafeDirectoryError

from .private import ensure_private_dir

__all__ = [
    "PREFIX",
    "Run",
    "base_dir",
    "new_run_id",
    "run_root",
    "create_run_dir",
    "new_run",
    "files_of",
    "purge",
    "stale_runs",
    "cleanup_stale_runs",
    "pid_alive",
    "check_shm_space",
]

log = logging.getLogger("remotemedia.supervisor")

#: iceoryx2 file prefix of every run (the directory already makes a run's names unique).
PREFIX = "rm_"
ENV_BASE = "REMOTEMEDIA_SHM_DIR"
_RUN_RE = re.compile(r"^(\d+)x[0-9a-f]+$")
# iceoryx2 binds its wake-up sockets at <root>/<prefix><u128 id>.event; sun_path holds 107 bytes.
_MAX_SOCKET_PATH = 107
_LONGEST_SOCKET_NAME = len(PREFIX) + 39 + len(".event")


class Run(NamedTuple):
    """One run's identity: ``run_id`` (``<pid>x<random>``), iceoryx2 ``prefix`` and ``root``
    (its private directory)."""

    run_id: str
    prefix: str
    root: str


def base_dir() -> str:
    """The directory that holds this user's run directories (not checked here)."""
    return os.path.abspath(os.environ.get(ENV_BASE) or f"/dev/shm/remotemedia-{os.geteuid()}")


def check_shm_space(what: str) -> None:
    """Raise SharedMemoryFullError when the shared-memory filesystem has less than the room the
    bridge keeps free (``SHM_RESERVE``): then not a single frame could be sent, and iceoryx2
    could not even create its services safely."""
    directory = base_dir()  # its filesystem holds every segment of the run
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # no such directory: iceoryx2 reports that itself
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    if size and free < bridge.SHM_RESERVE:
        raise SharedMemoryFullError(directory, size, free, bridge.SHM_RESERVE, what=what)


def new_run_id() -> str:
    return f"{os.getpid()}x{secrets.token_hex(4)}"


def run_root(run_id: str) -> str:
    return os.path.join(base_dir(), run_id)


def create_run_dir(root: str) -> None:
    """Create the private directory of a run, after checking its base (see
    :func:`supervisor.private.ensure_private_dir`). Raises :class:`UnsafeDirectoryError` when
    the base is not private, :class:`SupervisorError` when ``root`` exists or is too long."""
    base = os.path.dirname(root)
    fix = f"set {ENV_BASE} to a directory of yours on tmpfs"
    if len(root) + 1 + _LONGEST_SOCKET_NAME > _MAX_SOCKET_PATH:
        raise SupervisorError(
            f"the run directory {root} is too long for iceoryx2's sockets (at most "
            f"{_MAX_SOCKET_PATH - 1 - _LONGEST_SOCKET_NAME} characters); {fix} with a shorter path"
        )
    ensure_private_dir(base, "shared-memory base directory", fix)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        raise UnsafeDirectoryError(f"the run directory {root} exists already; a run directory is never reused") from None
    except OSError as e:
        raise SupervisorError(f"cannot create the run directory {root}: {e.strerror or e}; {fix}") from e


def new_run() -> Run:
    """A fresh run with its private directory created (for code that drives the bridge
    without a Supervisor; remove it with :func:`purge`)."""
    run_id = new_run_id()
    root = run_root(run_id)
    create_run_dir(root)
    return Run(run_id, PREFIX, root)


def files_of(root: str) -> List[str]:
    """Every file of the run in ``root`` (empty once the run is removed)."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files]
    return sorted(out)


def purge(root: str) -> List[str]:
    """Remove the run directory ``root`` and everything in it. Every file of the run is in it,
    and none of its processes is alive any more, so iceoryx2 has nothing else to release.
    Returns what could not be removed (never follows a symlink)."""
    failed: List[str] = []
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return failed
    if not stat.S_ISDIR(st.st_mode):
        return [f"{root}: not a directory, left alone"]

    def onerror(_fn: object, path: str, exc: Tuple[type, BaseException, object]) -> None:
        if not isinstance(exc[1], FileNotFoundError):  # another start removing it too
            failed.append(f"{path}: {exc[1]}")

    shutil.rmtree(root, onerror=onerror)
    return failed


def pid_alive(pid: object) -> bool:
    """True while process ``pid`` exists and has not exited (a zombie, exited but not yet
    reaped, is not alive). The one answer for every caller: a process we may not inspect
    (another user's) is alive, and so is a pid that is not an int (unknown: never treat it
    as gone, which would remove what it may still use)."""
    if not isinstance(pid, int):
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied and the like: it exists
        return True


def stale_runs(base: Optional[str] = None) -> List[str]:
    """Run directories in ``base`` whose supervisor process is gone. Entries that are not run
    directories of ours (foreign names, symlinks, files, other owners) are skipped with a
    warning."""
    base = base or base_dir()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return []
    out = []
    euid = os.geteuid()
    for entry in entries:
        m = _RUN_RE.match(entry.name)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not m or not stat.S_ISDIR(st.st_mode) or st.st_uid != euid:
            log.warning("skipping %s: not a run directory of ours (remove it by hand)", entry.path)
            continue
        if not pid_alive(int(m.group(1))):
            out.append(entry.path)
    return sorted(out)


_cleanup_lock = threading.Lock()


def cleanup_stale_runs(timeout: float = 5.0) -> List[str]:
    """Remove the directories of dead runs; returns those removed. Bounded by ``timeout``:
    the work runs in a daemon thread, and whatever did not finish in time is skipped with a
    warning (a later start tries again)."""
    if not _cleanup_lock.acquire(blocking=False):
        log.warning("a previous stale-run cleanup has not finished; skipping this one")
        return []
    cleaned: List[str] = []
    done = threading.Event()

    def work() -> None:
        try:
            for root in stale_runs():
                alive = _alive_nodes(root)
                if alive:
                    # a worker of that run still holds its node (e.g. orphaned); leave it alone
                    log.warning("stale run %s still has live iceoryx2 nodes %s; not removing it", root, alive)
                    continue
                failed = purge(root)
                if failed:
                    log.warning("could not remove leftovers of dead run %s: %s", root, failed)
                else:
                    log.info("removed the shared-memory leftovers of dead run %s", root)
                cleaned.append(root)
        except Exception:  # pragma: no cover - cleanup must not stop a start
            log.exception("stale-run cleanup failed")
        finally:
            done.set()
            _cleanup_lock.release()

    threading.Thread(target=work, name="remotemedia-stale-cleanup", daemon=True).start()
    if not done.wait(timeout):
        log.warning("stale-run cleanup in %s did not finish within %.1f s; skipped the rest", base_dir(), timeout)
    return list(cleaned)


def _alive_nodes(root: str, grace: float = 2.0) -> List[Tuple[str, object, str]]:
    """Nodes of the run in ``root`` that are really alive. A process that is exiting (or a
    zombie) still holds its node lock for a moment: wait for those, up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = [n for n in _safe_list(root) if n[0] == "alive"]
        dying = [n for n in alive if not pid_alive(n[1])]
        if not dying or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _safe_list(root: str) -> List[Tuple[str, object, str]]:
    try:
        return list(bridge.list_nodes(PREFIX, root))
    except Exception as e:  # a corrupt node file must not stop the cleanup
        log.warning("cannot list the iceoryx2 nodes of %s: %s", root, e)
        return []
