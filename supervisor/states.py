"""Worker process states and their legal transitions (after supervisord's ``states.py``).

::

    STOPPED -> STARTING -> RUNNING -> EXITED (clean end of stream, or crash)
                  |           |          |
                  |           v          v
                  |       STOPPING -> STOPPED        crash: EXITED -> BACKOFF -> STARTING
                  v
                FATAL   (load error, restart limit reached)

Every change goes through :meth:`StateMachine.change`, which refuses an illegal transition
and logs the legal ones.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Dict, FrozenSet, List, Tuple

from remotemedia.errors import SupervisorError

__all__ = ["ProcessState", "TRANSITIONS", "IllegalTransition", "StateMachine"]

log = logging.getLogger("remotemedia.supervisor")


class ProcessState(enum.Enum):
    STOPPED = "STOPPED"  # not running, not wanted (initial, or stopped on request)
    STARTING = "STARTING"  # spawned, waiting for READY (initialize() running)
    RUNNING = "RUNNING"  # READY received
    BACKOFF = "BACKOFF"  # failed, waiting before the next start
    STOPPING = "STOPPING"  # asked to stop (drain or abort)
    EXITED = "EXITED"  # exited on its own (0 after end of stream, else a crash)
    FATAL = "FATAL"  # gave up: will not be restarted


S = ProcessState
TRANSITIONS: Dict[ProcessState, FrozenSet[ProcessState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.STOPPING, S.FATAL, S.EXITED}),
    S.RUNNING: frozenset({S.STOPPING, S.EXITED}),
    S.BACKOFF: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.EXITED}),
    S.EXITED: frozenset({S.STARTING, S.BACKOFF, S.FATAL, S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}


class IllegalTransition(SupervisorError):
    """A state change that the transition table does not allow."""


class StateMachine:
    """The state of one worker, with its history of changes."""

    def __init__(self, name: str, initial: ProcessState = ProcessState.STOPPED) -> None:
        self.name = name
        self.state = initial
        self.since = time.monotonic()
        self.history: List[Tuple[float, ProcessState, ProcessState, str]] = []

    def change(self, new: ProcessState, reason: str = "") -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"node {self.name!r}: illegal state change {old.value} -> {new.value} ({reason})")
        self.state = new
        self.since = time.monotonic()
        self.history.append((self.since, old, new, reason))
        log.debug("node %s: %s -> %s%s", self.name, old.value, new.value, f" ({reason})" if reason else "")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ProcessState):
            return self.state is other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<StateMachine {self.name}: {self.state.value}>"
