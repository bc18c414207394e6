"""Control endpoint: one Unix socket per running supervisor, for ``status``, ``stop``, ``restart``,
``reload`` and ``logs``.

::

    <runtime dir>/<name>-<supervisor pid>.sock     (dir 0700, socket 0600)
    <runtime dir>/<name>.lock                      (0600, flock-ed for the supervisor's life)

    client: {"cmd": "status"}\\n      supervisor: {"ok": true, "status": {...}}\\n
    client: {"cmd": "stop"}\\n        supervisor: {"ok": true}\\n   (then drains and exits)
    client: {"cmd": "restart", "node": N}\\n    supervisor: {"ok": true, "node": N, "pid": <old pid>}\\n
    client: {"cmd": "reload"}\\n      supervisor: {"ok": true, "replaced": [...]}\\n  (once applied)
    client: {"cmd": "logs", "node": N | null, "after": {N: n}, "lines": k}\\n
                                    supervisor: {"ok": true, "lines": [...], "cursor": {N: n},
                                                 "lost": {N: k}}\\n

A handler may answer later: it returns a ``concurrent.futures.Future`` (a reload reads the
pipeline file in a thread of its own) and the answer is written once the future is done.

The runtime dir is ``$REMOTEMEDIA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/remotemedia``, else
``/run/remotemedia`` for root, else ``/tmp/remotemedia-<uid>``. Only the owner can connect:
the directory is 0700 and the socket 0600, and the server also checks the peer's uid
(``SO_PEERCRED``), so even a permissive umask cannot open it to other users. A directory
another user could have prepared (a symlink, another owner, writable by others) is refused
(:func:`supervisor.private.ensure_private_dir`), never chmod-ed through.

``<name>`` is the pipeline name with every character but letters, digits, ``-``, ``_``, ``.``
and ``~`` percent-encoded (a leading ``.`` too): ``my cams/2`` -> ``my%20cams%2F2``. The
encoding can be undone, so ``status``/``stop`` find a pipeline by exactly the name it was
given, and two names never share a file.

One name, one supervisor: :class:`NameLock` holds an exclusive ``flock`` on ``<name>.lock``
(the holder's pid written in it) from before the supervisor starts until it exits, so a
second supervisor of the same name is refused (:class:`NameInUseError`), race-free, and a
lock left by a killed process is free again (the kernel drops it with the process).

The server side is driven by the arbiter's single wait loop (the listening socket and the
connections are file descriptors in its wait list); a client that stalls is dropped.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import os
import socket
import struct
import time
import urllib.parse
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

from remotemedia.errors import SupervisorError

from .private import ensure_private_dir
from .resources import pid_alive

__all__ = ["runtime_dir", "file_name", "NameLock", "NameInUseError", "ControlServer", "find_endpoints", "request"]


def runtime_dir() -> str:
    env = os.environ.get("REMOTEMEDIA_RUNTIME_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "remotemedia")
    if os.geteuid() == 0:
        return "/run/remotemedia"
    return f"/tmp/remotemedia-{os.getuid()}"


def _ensure_private_dir(path: str, create: bool = True) -> None:
    ensure_private_dir(path, "control directory", "set REMOTEMEDIA_RUNTIME_DIR to a directory of yours", create=create)


def file_name(name: str) -> str:
    """The reversible file-name form of a pipeline name (``my cams/2`` -> ``my%20cams%2F2``)."""
    quoted = urllib.parse.quote(name, safe="")
    return "%2E" + quoted[1:] if quoted.startswith(".") else quoted  # never a hidden file


def _pipeline_name(file_stem: str) -> str:
    return urllib.parse.unquote(file_stem)


#: Longest control socket path (``sun_path`` is 108 bytes with its NUL).
_MAX_SOCKET_PATH = 107


def _socket_path(base: str, name: str, pid: int) -> str:
    path = os.path.join(base, f"{file_name(name)}-{pid}.sock")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise SupervisorError(
            f"pipeline name {name!r} is too long for a control socket ({path} has {len(path.encode())} bytes, "
            f"at most {_MAX_SOCKET_PATH}); give a shorter --name or a shorter REMOTEMEDIA_RUNTIME_DIR"
        )
    return path


class NameInUseError(SupervisorError):
    """Another supervisor (``pid``) runs a pipeline of this name."""

    def __init__(self, name: str, pid: Optional[int]) -> None:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"pipeline {name!r} is already running ({who}); stop it first or pick another --name")
        self.name = name
        self.pid = pid


#: The NameLocks this process holds, by pipeline name.
_HELD: Dict[str, "NameLock"] = {}


class NameLock:
    """The exclusive claim of this process on a pipeline name: ``flock`` on
    ``<runtime dir>/<name>.lock`` (0600, our pid in it), released by :meth:`release` or when
    the process ends.

    ``remotemedia-supervisor start`` takes it before anything starts and hands it over
    (``handover=True``) to the one control server of that name this process then opens;
    without a handover the control server takes its own.

    Example::

        lock = NameLock.acquire("cams")      # NameInUseError: "... already running (pid 1234) ..."
        ...
        lock.release()
    """

    def __init__(self, name: str, path: str, fd: int, handover: bool) -> None:
        self.name = name
        self.path = path
        self.fd: Optional[int] = fd
        self.handover = handover

    @classmethod
    def acquire(cls, name: str, handover: bool = False) -> "NameLock":
        """Claim ``name`` or raise :class:`NameInUseError` naming the holder's pid (also
        :class:`~remotemedia.errors.SupervisorError` for a name too long for a socket)."""
        base = runtime_dir()
        _ensure_private_dir(base)
        _socket_path(base, name, 4194304)  # refuse a name the control socket could not carry
        held = _HELD.get(name)
        if held is not None:
            raise NameInUseError(name, os.getpid())
        path = os.path.join(base, f"{file_name(name)}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise SupervisorError(f"cannot lock {path}: {e.strerror or e}") from e
                raise NameInUseError(name, _holder_pid(path)) from None
            # A holder that released it unlinked the file after we opened it: our lock is on a
            # file nobody else can find any more; lock the current one instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        lock = cls(name, path, fd, handover)
        _HELD[name] = lock
        return lock

    @classmethod
    def for_server(cls, name: str) -> Tuple["NameLock", bool]:
        """The lock of a control server: the one handed over by ``start`` (owned: False), or
        a new one (owned: True)."""
        held = _HELD.get(name)
        if held is not None and held.handover:
            held.handover = False
            return held, False
        return cls.acquire(name), True

    def release(self) -> None:
        """Give the name up (unlinked first, while still locked: see :meth:`acquire`)."""
        if self.fd is None:
            return
        if _HELD.get(self.name) is self:
            del _HELD[self.name]
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _holder_pid(path: str) -> Optional[int]:
    # The holder writes its pid right after locking: give it a moment.
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read().strip()
        except OSError:
            text = ""
        if text.isdigit() or time.monotonic() > deadline:
            return int(text) if text.isdigit() else None
        time.sleep(0.02)


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline = time.monotonic() + 2.0


class ControlServer:
    """Listening control socket of one supervisor.

    A name another supervisor holds (:class:`NameLock`) gets no socket: a program may run
    the same pipeline twice (``Pipeline.run()`` in two threads), but ``status``/``stop NAME``
    must reach exactly one supervisor; a warning says so. (``remotemedia-supervisor start``
    refuses such a name before anything starts.)"""

    def __init__(self, name: str, handler: Callable[[Dict[str, Any]], Any]) -> None:
        self.dir = runtime_dir()
        _ensure_private_dir(self.dir)
        self.path = _socket_path(self.dir, name, os.getpid())
        self.handler = handler
        self.conns: Dict[int, _Conn] = {}
        self.pending: Dict[int, Tuple[_Conn, Future]] = {}  # deferred answers
        self.listener: Optional[socket.socket] = None
        try:
            self.lock, self._owns_lock = NameLock.for_server(name)
        except NameInUseError as e:
            logging.getLogger("remotemedia.supervisor").warning(
                "pipeline %r: another supervisor (pid %s) serves this name; this one has no control socket "
                "(status/stop reach the other one): give it another name to reach it", name, e.pid if e.pid is not None else "unknown",
            )
            return
        listener = None
        try:
            try:
                os.unlink(self.path)  # a leftover of a previous process with our pid
            except FileNotFoundError:
                pass
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            listener.listen(8)
            listener.setblocking(False)
            self.listener = listener
        except BaseException:
            if listener is not None:
                listener.close()
            if self._owns_lock:
                self.lock.release()
            raise

    def fds(self) -> List[int]:
        return [] if self.listener is None else [self.listener.fileno(), *self.conns]

    def poll(self) -> None:
        """Accept, read and answer whatever is ready; never blocks."""
        while self.listener is not None:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not self._peer_allowed(sock):
                sock.close()
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = _Conn(sock)
        for fd, (c, fut) in list(self.pending.items()):
            if fut.done():
                try:
                    resp = fut.result()
                except Exception as e:
                    resp = {"ok": False, "error": str(e) or type(e).__name__}
                self._send(c, resp)
                self._drop(fd)
        now = time.monotonic()
        for fd, c in list(self.conns.items()):
            if fd in self.pending:
                continue
            try:
                chunk = c.sock.recv(65536)
                if not chunk:
                    self._drop(fd)
                    continue
                c.buf += chunk
            except BlockingIOError:
                pass
            except OSError:
                self._drop(fd)
                continue
            if b"\n" in c.buf:
                line = bytes(c.buf.split(b"\n", 1)[0])
                resp = self._answer(line)
                if isinstance(resp, Future):
                    self.pending[fd] = (c, resp)
                else:
                    self._send(c, resp)
                    self._drop(fd)
            elif now > c.deadline or len(c.buf) > 1 << 16:
                self._drop(fd)

    def _peer_allowed(self, sock: socket.socket) -> bool:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        except OSError:
            return False
        return uid in (os.geteuid(), 0)

    def _answer(self, line: bytes) -> Any:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request must be a JSON object")
            return self.handler(req)
        except Exception as e:  # a bad request must not hurt the supervisor
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}

    def _send(self, c: _Conn, resp: Dict[str, Any]) -> None:
        data = (json.dumps(resp, default=repr) + "\n").encode()
        c.sock.setblocking(True)
        c.sock.settimeout(1.0)
        try:
            c.sock.sendall(data)
        except OSError:
            pass

    def _drop(self, fd: int) -> None:
        self.pending.pop(fd, None)
        c = self.conns.pop(fd, None)
        if c is not None:
            try:
                c.sock.close()
            except OSError:
                pass

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        if self.listener is None:
            return
        try:
            self.listener.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            if self._owns_lock:
                self.lock.release()


def find_endpoints(name: Optional[str] = None) -> List[Tuple[str, str, int]]:
    """Live control sockets as ``(name, path, pid)``, ``name`` exactly as the pipeline was
    named (compared with ``name`` as given); stale ones (dead pid) are removed."""
    base = runtime_dir()
    if os.path.lexists(base):
        _ensure_private_dir(base, create=False)  # stale sockets are removed: never in someone else's directory
    out = []
    for path in sorted(glob.glob(os.path.join(base, "*.sock")) + glob.glob(os.path.join(base, "*", "*.sock"))):
        stem = os.path.basename(path)[: -len(".sock")]
        file_stem, _, pid_s = stem.rpartition("-")
        if not pid_s.isdigit():
            continue
        sup_name = _pipeline_name(file_stem)
        pid = int(pid_s)
        if not pid_alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        if name is None or sup_name == name:
            out.append((sup_name, path, pid))
    return out


def request(path: str, req: Dict[str, Any], timeout: float = 5.0) -> Dict[str, Any]:
    """Send one request to a control socket and return the decoded answer."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    if not buf:
        raise SupervisorError(f"no answer from {path}")
    return json.loads(bytes(buf).split(b"\n", 1)[0])
