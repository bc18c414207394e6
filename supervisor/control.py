"""Control endpoint: one Unix socket per running supervisor, for ``status``, ``stop``, ``restart``,
``reload`` and ``logs``.

::

    <runtime dir>/<pipeline name>-<supervisor pid>.sock     (dir 0700, socket 0600)

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

The server side is driven by the arbiter's single wait loop (the listening socket and the
connections are file descriptors in its wait list); a client that stalls is dropped.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import struct
import time
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional, Tuple

from remotemedia.errors import SupervisorError

from .private import ensure_private_dir
from .resources import pid_alive

__all__ = ["runtime_dir", "ControlServer", "find_endpoints", "request"]


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


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.deadline = time.monotonic() + 2.0


class ControlServer:
    """Listening control socket of one supervisor."""

    def __init__(self, name: str, handler: Callable[[Dict[str, Any]], Any]) -> None:
        self.dir = runtime_dir()
        _ensure_private_dir(self.dir)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "pipeline"
        self.path = os.path.join(self.dir, f"{safe}-{os.getpid()}.sock")
        if len(self.path.encode()) > 107:
            raise SupervisorError(f"control socket path too long ({self.path}); use a shorter pipeline name or REMOTEMEDIA_RUNTIME_DIR")
        try:
            os.unlink(self.path)  # a leftover of a previous process with our pid
        except FileNotFoundError:
            pass
        self.handler = handler
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.conns: Dict[int, _Conn] = {}
        self.pending: Dict[int, Tuple[_Conn, Future]] = {}  # deferred answers

    def fds(self) -> List[int]:
        return [self.listener.fileno(), *self.conns]

    def poll(self) -> None:
        """Accept, read and answer whatever is ready; never blocks."""
        while True:
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
        try:
            self.listener.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def find_endpoints(name: Optional[str] = None) -> List[Tuple[str, str, int]]:
    """Live control sockets as ``(name, path, pid)``; stale ones (dead pid) are removed."""
    base = runtime_dir()
    if os.path.lexists(base):
        _ensure_private_dir(base, create=False)  # stale sockets are removed: never in someone else's directory
    out = []
    for path in sorted(glob.glob(os.path.join(base, "*.sock")) + glob.glob(os.path.join(base, "*", "*.sock"))):
        stem = os.path.basename(path)[: -len(".sock")]
        sup_name, _, pid_s = stem.rpartition("-")
        if not pid_s.isdigit():
            continue
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
