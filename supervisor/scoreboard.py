"""A worker's status block in shared memory (the role of gunicorn's ``workertmp``).

The worker writes a few 64-bit fields with plain stores; the supervisor reads them whenever
it wants, without a message and without waking the worker. It survives the worker's death,
which is the point: after a crash the supervisor can still see which frame was being processed
(poison-frame detection) and, while the worker lives, whether it is stuck in ``process()`` or
not looping at all (hang detection).

::

    offset  field
    0       heartbeat_ns   CLOCK_MONOTONIC of the worker loop's last turn
    8       busy_since_ns  start of the current process()/generate() call, 0 when idle
    16      busy_edge      edge of the frame being processed (-1: source item / flush)
    24      busy_seq       seq (or source position) of that frame
    32      frames_in
    40      frames_out
    48      pid

The file lives in /dev/shm under the run's prefix, so it is removed with the run.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Dict

__all__ = ["Scoreboard", "FIELDS"]

FIELDS = ("heartbeat_ns", "busy_since_ns", "busy_edge", "busy_seq", "frames_in", "frames_out", "pid")
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_SIZE = 64


class Scoreboard:
    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, _SIZE)
            self._mm = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._q = memoryview(self._mm).cast("q")

    def reset(self) -> None:
        for i in range(len(FIELDS)):
            self._q[i] = 0
        self._q[_INDEX["busy_edge"]] = -1

    def set(self, field: str, value: int) -> None:
        self._q[_INDEX[field]] = value

    def get(self, field: str) -> int:
        return self._q[_INDEX[field]]

    # worker-side shortcuts (hot path: one store each)
    def beat(self) -> None:
        self._q[0] = time.monotonic_ns()

    def busy(self, edge: int, seq: int) -> None:
        self._q[2] = edge
        self._q[3] = seq
        self._q[1] = time.monotonic_ns()

    def idle(self) -> None:
        self._q[1] = 0

    def read(self) -> Dict[str, int]:
        return {name: self._q[i] for i, name in enumerate(FIELDS)}

    def close(self, unlink: bool = False) -> None:
        try:
            self._q.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
