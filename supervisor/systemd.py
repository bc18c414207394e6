"""systemd integration: the ``sd_notify`` protocol and unit files.

``Type=notify`` units learn about the service through datagrams on ``$NOTIFY_SOCKET``::

    READY=1        every worker's initialize() has finished
    STATUS=...     one-line summary: workers up, frames/s
    WATCHDOG=1     every $WATCHDOG_USEC/2, only while every worker's heartbeat is fresh,
                   so systemd restarts a supervisor whose pipeline is wedged
    STOPPING=1     shutdown has begun

Without ``$NOTIFY_SOCKET`` :class:`SystemdNotifier` does nothing.

Example::

    remotemedia-supervisor systemd-unit examples/audio_levels.py --name audio --user media > audio.service
    remotemedia-supervisor systemd-unit examples/audio_levels.py --user media --install   # as root
    remotemedia-supervisor systemd-unit examples/audio_levels.py --user-unit --install    # systemctl --user
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from typing import List, Optional

__all__ = ["SystemdNotifier", "render_unit", "unit_name"]


class SystemdNotifier:
    """Sends sd_notify messages when run under systemd (``$NOTIFY_SOCKET`` set), never
    blocking the loop that calls it: when the socket's queue is full (systemd is not reading,
    or the socket is not systemd's), a state change (``READY=1``, ``STOPPING=1``) is held and
    sent first by the next call that gets through; ``WATCHDOG=1`` and ``STATUS=`` are dropped
    (the next ones say as much)."""

    #: Fields whose message may be dropped when systemd's queue is full.
    DROPPABLE = ("WATCHDOG=", "STATUS=")

    def __init__(self, env: Optional[dict] = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET") or ""
        self.address: Optional[str] = None
        self.sock: Optional[socket.socket] = None
        self._held: List[bytes] = []
        self._full = False  # (the last send found the queue full)
        if path:
            # "@name" is an abstract socket
            self.address = "\0" + path[1:] if path.startswith("@") else path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        usec = env.get("WATCHDOG_USEC")
        wd_pid = env.get("WATCHDOG_PID")
        self.watchdog_interval: Optional[float] = None
        if usec and (not wd_pid or wd_pid == str(os.getpid())):
            try:
                self.watchdog_interval = int(usec) / 1e6 / 2.0
            except ValueError:
                self.watchdog_interval = None

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, *fields: str) -> bool:
        """Sends ``fields`` as one message; False when it did not go now (see the class)."""
        if self.sock is None or self.address is None:
            return False
        while self._held and self._send(self._held[0]):
            self._held.pop(0)
        msg = "\n".join(fields).encode()
        if not self._held and self._send(msg):
            return True
        if self._full and not all(f.startswith(self.DROPPABLE) for f in fields):
            self._held.append(msg)  # (after what is held: systemd sees them in order)
        return False

    def _send(self, msg: bytes) -> bool:
        self._full = False
        try:
            self.sock.sendto(msg, self.address)  # type: ignore[union-attr]
            return True
        except BlockingIOError:  # (the queue is full)
            self._full = True
            return False
        except OSError:  # (no systemd there: nothing to wait for)
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def unit_name(name: str) -> str:
    """A systemd-safe unit name for a pipeline name."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "pipeline"
    return f"remotemedia-{safe}.service"


def _unit_value(text: str) -> str:
    """``text`` as literal unit-file text: ``%`` starts a specifier, ``$`` a variable."""
    return text.replace("%", "%%")


def _command_line(args: List[str]) -> str:
    """An ``Exec*=`` command line: each argument quoted for systemd (which takes the shell's
    single quotes), ``%`` and ``$`` escaped."""
    return " ".join(_unit_value(shlex.quote(a)).replace("$", "$$") for a in args)


def render_unit(
    pipeline_path: str,
    name: str,
    user: Optional[str] = None,
    stop_timeout: float = 30.0,
    watchdog_sec: float = 30.0,
    extra_args: Optional[List[str]] = None,
    python: Optional[str] = None,
    quiet: bool = True,
    user_unit: bool = False,
) -> str:
    """The text of a ``Type=notify`` unit running ``pipeline_path`` with this environment's
    interpreter: ``remotemedia-supervisor start`` with ``extra_args`` (more ``start``
    options) in ``ExecStart=``, ``reload NAME`` in ``ExecReload=``, the journal's identifier
    the unit's name. ``user_unit``: for ``systemctl --user`` (no ``User=``, wanted by
    ``default.target``, only the sandboxing an unprivileged service manager can set up).

    Example::

        render_unit("cams.py", "cams", user="media", extra_args=["--metrics-port", "9100"])
    """
    if watchdog_sec <= 0:
        raise ValueError(f"watchdog_sec must be a positive number of seconds, got {watchdog_sec!r}")
    if user_unit and user:
        raise ValueError("a user unit has no User=: it runs as the user whose service manager runs it")
    python = os.path.abspath(python or sys.executable)
    pipeline_path = os.path.abspath(pipeline_path)
    cli = [python, "-m", "supervisor.cli"]
    args = [*cli, "start", pipeline_path, "--name", name, *(["--quiet"] if quiet else []),
            "--stop-timeout", f"{stop_timeout:g}", *(extra_args or [])]
    # systemd sends SIGTERM, waits TimeoutStopSec, then SIGKILLs what is left: give the
    # drain its full time plus the workers' kill grace.
    timeout_stop = int(stop_timeout + 15)
    lines = [
        "[Unit]",
        f"Description=remotemedia pipeline {_unit_value(name)}",
        "After=network.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_command_line(args)}",
        f"ExecReload={_command_line([*cli, 'reload', name])}",
        f"WorkingDirectory={_unit_value(os.path.dirname(pipeline_path))}",
        # the journal names the lines after the unit, not after the interpreter (python3[pid])
        f"SyslogIdentifier={unit_name(name)[: -len('.service')]}",
        "Environment=PYTHONUNBUFFERED=1",
        "Restart=on-failure",
        "RestartSec=2",
        f"WatchdogSec={watchdog_sec:g}",
        # SIGTERM to the supervisor only: it drains the workers itself; whatever is left at
        # the end of TimeoutStopSec gets SIGKILL (the whole cgroup).
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={timeout_stop}",
        # the control socket (remotemedia-supervisor status/stop), owner-only
        "RuntimeDirectory=remotemedia/%N",
        "RuntimeDirectoryMode=0700",
        "Environment=REMOTEMEDIA_RUNTIME_DIR=%t/remotemedia/%N",
    ]
    if user:
        lines.append(f"User={user}")
    # hardening that leaves shared memory (/dev/shm) and the interpreter usable
    # (nothing that hides /dev/shm: a run's files live in /dev/shm/remotemedia-<uid>,
    # and the next start must find those of a crashed run to remove them)
    lines += ["NoNewPrivileges=yes"]
    if not user_unit:
        # file-system namespaces: a user's service manager cannot set them up (without
        # user namespaces), so they are for system units only
        lines += [
            "ProtectSystem=full",
            "ProtectHome=read-only",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "ProtectControlGroups=yes",
        ]
    lines += [
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "UMask=0077",
        "",
        "[Install]",
        f"WantedBy={'default.target' if user_unit else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)
