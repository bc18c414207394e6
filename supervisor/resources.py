"""Ownership of iceoryx2 resources: one file prefix per supervisor run.

Every file iceoryx2 creates for a run (``/dev/shm/<prefix>*`` segments, and the node and
service files under ``/tmp/iceoryx2``) starts with ``rm_<supervisor pid>x<random>_``. That
makes three things simple:

* two pipelines on one host never share a service;
* at the end of a run the supervisor removes exactly its own files;
* a run whose supervisor died (SIGKILL) is recognised by the dead pid in its prefix, and the
  next supervisor to start removes its leftovers (iceoryx2 dead-node cleanup, then the files).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from typing import Iterable, List, Set, Tuple

import psutil

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import SharedMemoryFullError

__all__ = ["IOX_ROOT", "SHM_DIR", "new_run", "files_of", "purge", "stale_prefixes", "cleanup_stale_runs", "pid_alive"]
__all__ += ["shm_dir", "check_shm_space"]

log = logging.getLogger("remotemedia.supervisor")

IOX_ROOT = "/tmp/iceoryx2"
SHM_DIR = "/dev/shm"
_PREFIX_RE = re.compile(r"^(rm_(\d+)x[0-9a-f]+_)")


def new_run() -> Tuple[str, str]:
    """A fresh ``(run_id, prefix)``."""
    run_id = f"{os.getpid()}x{secrets.token_hex(4)}"
    return run_id, f"rm_{run_id}_"


def shm_dir() -> str:
    """The directory that holds a run's shared-memory segments (the one whose filesystem
    bounds how many frames can be in flight)."""
    return SHM_DIR


def check_shm_space(what: str) -> None:
    """Raise SharedMemoryFullError when the shared-memory filesystem has less than the room the
    bridge keeps free (``SHM_RESERVE``): then not a single frame could be sent, and iceoryx2
    could not even create its services safely."""
    directory = shm_dir()
    try:
        st = os.statvfs(directory)
    except OSError:
        return  # no such directory: iceoryx2 reports that itself
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    if size and free < bridge.SHM_RESERVE:
        raise SharedMemoryFullError(directory, size, free, bridge.SHM_RESERVE, what=what)


def _walk(root: str) -> Iterable[str]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield os.path.join(dirpath, f)


def files_of(prefix: str) -> List[str]:
    """Every file of this prefix in /dev/shm and under the iceoryx2 root."""
    out = []
    if os.path.isdir(SHM_DIR):
        out += [os.path.join(SHM_DIR, f) for f in os.listdir(SHM_DIR) if f.startswith(prefix)]
    out += [p for p in _walk(IOX_ROOT) if os.path.basename(p).startswith(prefix)]
    return sorted(out)


def purge(prefix: str) -> List[str]:
    """Remove every resource of ``prefix``: dead-node cleanup first (so iceoryx2 releases what
    it tracks), then whatever files remain. Returns the files that could not be removed."""
    try:
        bridge.remove_stale_resources(prefix)
    except Exception as e:  # a half-written node file must not stop the file sweep
        log.debug("dead-node cleanup of %s failed: %s", prefix, e)
    failed = []
    dirs: Set[str] = set()
    for path in files_of(prefix):
        try:
            os.unlink(path)
            dirs.add(os.path.dirname(path))
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append(f"{path}: {e}")
    nodes_dir = os.path.join(IOX_ROOT, "nodes")
    for d in dirs:
        # per-node directories are named by node id; remove the ones we emptied
        if os.path.dirname(d) == nodes_dir:
            try:
                os.rmdir(d)
            except OSError:
                pass
    return failed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_prefixes() -> List[str]:
    """Prefixes of runs whose supervisor process is gone."""
    names: List[str] = []
    if os.path.isdir(SHM_DIR):
        names += os.listdir(SHM_DIR)
    names += [os.path.basename(p) for p in _walk(IOX_ROOT)]
    found = {}
    for n in names:
        m = _PREFIX_RE.match(n)
        if m:
            found[m.group(1)] = int(m.group(2))
    return sorted(p for p, pid in found.items() if not pid_alive(pid))


def cleanup_stale_runs() -> List[str]:
    """Remove the leftovers of every dead run; returns the prefixes cleaned."""
    cleaned = []
    for prefix in stale_prefixes():
        alive = _alive_nodes(prefix)
        if alive:
            # a worker of that run still holds its node (e.g. orphaned); leave it alone
            log.warning("stale run %s still has live iceoryx2 nodes %s; not cleaning", prefix, alive)
            continue
        failed = purge(prefix)
        if failed:
            log.warning("could not remove leftovers of dead run %s: %s", prefix, failed)
        else:
            log.info("removed the shared-memory leftovers of dead run %s", prefix)
        cleaned.append(prefix)
    return cleaned


def _alive_nodes(prefix: str, grace: float = 2.0) -> List[Tuple[str, object, str]]:
    """Nodes of ``prefix`` that are really alive. A process that is exiting (or a zombie)
    still holds its node lock for a moment: wait for those, up to ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        alive = [n for n in _safe_list(prefix) if n[0] == "alive"]
        dying = [n for n in alive if not _pid_running(n[1])]
        if not dying or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _pid_running(pid: object) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _safe_list(prefix: str) -> List[Tuple[str, object, str]]:
    try:
        return list(bridge.list_nodes(prefix))
    except Exception:
        return []
