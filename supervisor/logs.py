"""Logs: what workers print and log, emitted by the supervisor with the node name and pid.

::

    worker                                   supervisor
    ------                                   ----------
    print("x")            -> stdout pipe --> record(level=INFO,    stream=stdout, msg="x")
    sys.stderr / crashes  -> stderr pipe --> record(level=WARNING, stream=stderr, msg=line)
    logging.getLogger(..) -> stderr pipe --> record(level, logger, msg, exc)   (marked JSON line)
                                             -> LogSink: text or JSON, one line per record

Text format: ``2026-11-22T19:00:00.123Z INFO [node 1234] logger: message``; under systemd
(``$JOURNAL_STREAM`` set) the timestamp is left out, because the journal stamps each line
itself, and a ``<N>`` syslog priority prefix tells it the level. JSON format: one object per
line with ``ts``, ``level``, ``node``, ``pid``, ``logger``, ``msg`` (and ``exc`` when an
exception was logged).

``node`` is the node a record is about: the worker's own records carry its name, and so do the
supervisor's records about a node (a crash, a restart, a kill: logged with
``extra={"node": name}``); it is null only for records about no node in particular (the
pipeline draining). ``pid`` is the process that wrote the record (the worker, or the
supervisor). Failures (a node crashing, a run failing) are ERROR records.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, TextIO

__all__ = [
    "MARK",
    "MAX_LINE",
    "WorkerLogHandler",
    "LineBuffer",
    "LogSink",
    "parse_worker_line",
    "in_journal",
    "configure_cli_logging",
]

#: Prefix of a structured log record on a worker's stderr (ASCII record separator).
MARK = "\x1eRMLOG "

#: Bytes of one captured line the supervisor keeps; the rest of a longer line is cut.
MAX_LINE = 64 * 1024

_SYSLOG = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def in_journal() -> bool:
    """True when stderr is connected to the systemd journal."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class WorkerLogHandler(logging.Handler):
    """Installed in workers: writes each record as one marked JSON line on stderr."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data: Dict[str, Any] = {
                "level": record.levelname,
                "logger": record.name,
                "msg": record.getMessage(),
                "ts": record.created,
            }
            if record.exc_info:
                data["exc"] = logging.Formatter().formatException(record.exc_info)
            self.stream.write(MARK + json.dumps(data, default=repr) + "\n")
            self.stream.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class LineBuffer:
    """Splits a worker's output stream into lines of at most ``limit`` bytes: the rest of a
    longer line is dropped and counted (a marker at its end says how many bytes), so one
    endless line costs the supervisor ``limit`` bytes, not its length."""

    __slots__ = ("limit", "buf", "cut")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.cut = 0

    def feed(self, data: bytes) -> List[str]:
        """Add what was read; return the lines it completed."""
        *done, rest = data.split(b"\n")
        lines = []
        for part in done:
            self._add(part)
            lines.append(self._take())
        self._add(rest)
        return lines

    def flush(self) -> List[str]:
        """The unterminated last line, if any (the stream ended)."""
        return [self._take()] if self.buf or self.cut else []

    def _add(self, part: bytes) -> None:
        room = self.limit - len(self.buf)
        if len(part) > room:
            self.cut += len(part) - room
            part = part[:room]
        self.buf += part

    def _take(self) -> str:
        line = self.buf.decode("utf-8", "replace")
        if self.cut:
            line += f" [... {self.cut} bytes of this line cut]"
        self.buf = bytearray()
        self.cut = 0
        return line


def parse_worker_line(line: str, stream: str) -> Dict[str, Any]:
    """One line a worker wrote -> a record dict (level, logger, msg, ts, exc?)."""
    if line.startswith(MARK):
        try:
            data = json.loads(line[len(MARK) :])
            if isinstance(data, dict) and "msg" in data:
                return data
        except ValueError:
            pass
    return {
        "level": "INFO" if stream == "stdout" else "WARNING",
        "logger": stream,
        "msg": line,
        "ts": time.time(),
    }


def _ts(rec: Dict[str, Any]) -> float:
    ts = rec.get("ts")
    return time.time() if ts is None else float(ts)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class LogSink:
    """Writes records (from workers and from the supervisor itself) as text or JSON lines."""

    def __init__(self, fmt: str = "text", stream: Optional[TextIO] = None, journal: Optional[bool] = None) -> None:
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
        self.fmt = fmt
        self.stream = stream
        self.journal = in_journal() if journal is None else journal
        self._lock = threading.Lock()

    def format(self, rec: Dict[str, Any], node: Optional[str], pid: Optional[int]) -> str:
        if self.fmt == "json":
            out = {"ts": _iso(_ts(rec)), "level": rec.get("level", "INFO"), "node": node, "pid": pid}
            out["logger"] = rec.get("logger")
            out["msg"] = rec.get("msg", "")
            for k, v in rec.items():
                if k not in out and k != "ts" and v is not None:
                    out[k] = v
            return json.dumps(out, default=repr)
        who = f"[{node} {pid}] " if node else ""
        msg = rec.get("msg", "")
        if rec.get("exc"):
            msg += "\n" + rec["exc"]
        level = rec.get("level", "INFO")
        body = f"{level} {who}{rec.get('logger') or ''}: {msg}"
        if self.journal:
            prio = _SYSLOG.get(logging.getLevelName(level) if isinstance(level, str) else level, 6)
            return "\n".join(f"<{prio}>{line}" for line in body.split("\n"))
        return f"{_iso(_ts(rec))} {body}"

    def write(self, rec: Dict[str, Any], node: Optional[str] = None, pid: Optional[int] = None) -> None:
        line = self.format(rec, node, pid)
        stream = self.stream or sys.stderr
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass


class _SinkHandler(logging.Handler):
    """Routes the supervisor's own logging records to a LogSink."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        rec = {"level": record.levelname, "logger": record.name, "msg": record.getMessage(), "ts": record.created}
        if record.exc_info:
            rec["exc"] = logging.Formatter().formatException(record.exc_info)
        node = getattr(record, "node", None)  # log(..., extra={"node": name}): a record about that node
        self.sink.write(rec, node if isinstance(node, str) else None, os.getpid())


def configure_cli_logging(level: int, sink: LogSink) -> None:
    """The CLI's logging: every record, the supervisor's and the workers', through ``sink``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_SinkHandler(sink))
    root.setLevel(level)
