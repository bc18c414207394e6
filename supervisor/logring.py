"""The recent output of each node, kept in memory for ``remotemedia-supervisor logs``.

Every line a worker writes (log records and plain stdout/stderr lines alike) goes to the
log sink *and* into its node's ring: a bounded deque of numbered entries. ``logs`` asks the
control socket for the entries after the last number it saw, so ``--follow`` is a poll that
never misses a line the ring still holds, and a ring that wrapped says how many it lost.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Collection, Deque, Dict, List, Optional, Tuple

__all__ = ["LogRing", "RING_LINES", "logs_request_error"]

#: Lines kept per node.
RING_LINES = 2000


class LogRing:
    """The last ``capacity`` lines of one node, numbered from 1 (thread-safe: the arbiter
    writes, the control socket reads, both in the arbiter thread today, but status readers
    may not be)."""

    def __init__(self, capacity: int = RING_LINES) -> None:
        self._lines: Deque[Tuple[int, Dict[str, Any]]] = deque(maxlen=capacity)
        self._next = 1
        self._lock = threading.Lock()

    def add(self, rec: Dict[str, Any], node: str, pid: Optional[int]) -> None:
        entry = {
            "ts": rec.get("ts"),
            "level": rec.get("level", "INFO"),
            "node": node,
            "pid": pid,
            "msg": rec.get("msg", "") + ("\n" + rec["exc"] if rec.get("exc") else ""),
        }
        with self._lock:
            self._lines.append((self._next, entry))
            self._next += 1

    def since(self, after: int = 0, limit: Optional[int] = None) -> Tuple[List[Dict[str, Any]], int, int]:
        """``(entries numbered after `after`, the last number, entries lost)``: the newest
        ``limit`` of them when given; *lost* counts those after ``after`` the ring no longer
        holds."""
        with self._lock:
            out = [dict(e, n=n) for n, e in self._lines if n > after]
            last = self._next - 1
            first = self._lines[0][0] if self._lines else self._next
        lost = max(0, first - after - 1) if last > after else 0
        if limit is not None and len(out) > limit:
            out = out[-limit:] if limit > 0 else []
        return out, last, lost


def logs_request_error(req: Dict[str, Any], pipeline: str, nodes: Collection[str]) -> Optional[str]:
    """What is wrong with a ``logs`` request of the control socket (``node``: a node's name
    or absent, ``after``: the ``cursor`` of an earlier answer, ``lines``: how many), or None."""
    node, after, lines = req.get("node"), req.get("after") or {}, req.get("lines")
    if node is not None and (not isinstance(node, str) or node not in nodes):
        return f"pipeline {pipeline!r} has no node named {node!r}; its nodes: {', '.join(nodes)}"
    if not isinstance(after, dict) or not all(type(v) is int for v in after.values()):
        return f"logs: 'after' must be the 'cursor' of an earlier answer (node name -> line number), got {after!r}"
    if lines is not None and type(lines) is not int:
        return f"logs: 'lines' must be a whole number of lines, got {lines!r}"
    return None
