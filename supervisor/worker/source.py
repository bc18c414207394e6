"""Source stepping: a node without inputs produces frames from its ``generate()``."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator, List, Optional, Tuple

from remotemedia.errors import OutputSerializationError, SharedMemoryFullError
from remotemedia.node import iter_generated

from .counters import Counters
from .emitter import Emitter
from .failures import Aborted
from .ledger import Ledger

log = logging.getLogger("remotemedia.worker")


class SourceStepper:
    """Iterates a source node's ``generate()``, one item per :meth:`step`. The position (the
    number of items produced) is the ledger's ``source_position``: a restarted deterministic
    source skips the items committed before. ``fail(seq, origin, error, fatal)`` reports an
    exception of the node."""

    def __init__(
        self,
        node: Any,
        name: str,
        ledger: Ledger,
        emitter: Emitter,
        counters: Counters,
        board: Any,
        event_loop: Callable[[], Any],
        fail: Callable[[Optional[int], Optional[int], BaseException, bool], None],
    ) -> None:
        self.node = node
        self.name = name
        self.ledger = ledger
        self.emitter = emitter
        self.counters = counters
        self.board = board
        self.event_loop = event_loop
        self.fail = fail
        self.draining = False  # Drain, or generate() ended
        self._gen: Optional[Iterator[Any]] = None

    @property
    def position(self) -> int:
        return self.ledger.source_position

    @property
    def done(self) -> bool:
        """No more items will come (drained or exhausted, generator closed)."""
        return self.draining and self._gen is None

    def drain(self) -> None:
        """Stop at the next step (the supervisor's Drain)."""
        self.draining = True

    def start(self) -> None:
        gen = iter_generated(self.node.generate(), self.event_loop)
        # A restarted deterministic source skips what was already committed downstream.
        for _ in range(self.ledger.source_position):
            try:
                next(gen)
            except StopIteration:
                break
        self._gen = gen

    def step(self) -> bool:
        """Produce and emit one item; False when none came (drained, ended, failed)."""
        if self._gen is None:
            self.start()
        assert self._gen is not None
        if self.draining:
            self.close()
            return False
        ledger, board, emitter = self.ledger, self.board, self.emitter
        position = ledger.source_position
        if board is not None:
            board.busy(-1, position)
        t0 = time.perf_counter_ns()
        try:
            item = next(self._gen)
        except StopIteration:
            self._gen = None
            self.draining = True
            return False
        except (Aborted, SharedMemoryFullError):
            raise
        except Exception as e:
            self.fail(None, position, e, True)
            return False
        finally:
            if board is not None:
                board.idle()
        emitter.origin = position
        emitter.stream = 0
        emitter.created = time.monotonic_ns()
        if item is not None:
            try:
                emitter.emit(item)
            except OutputSerializationError as e:
                emitter.release_loans()
                self.fail(None, position, e, True)
                return False
        if emitter.loans:
            emitter.release_loans()
        counters = self.counters
        counters.latency.add(time.perf_counter_ns() - t0)
        ledger.source_position = position + 1
        counters.frames_in += 1
        if board is not None:
            board.set("frames_in", counters.frames_in)
        ledger.mark()
        ledger.advance()
        return True

    def run_batch(self, stage: Any, max_items: int, max_ns: int) -> int:
        """:meth:`step` up to ``max_items`` times (or for ``max_ns``) in the bridge's loop
        (``StageLoop.run_source``); the caller marks the commit point after. Items sent."""
        if self._gen is None:
            self.start()
        if self.draining:
            self.close()
            return 0
        n, ended = stage.run_source(self._gen, self.ledger, self._failed, max_items, max_ns)
        if ended:
            self._gen = None
            self.draining = True
        return n

    def serve(self, stage: Any, inbox: Any, fds: List[int], timeout: float, spin_us: int, max_items: int, max_ns: int, slice_ns: int) -> Optional[Tuple[int, bool]]:
        """:meth:`run_batch`'s turns and the waits for room between them, in the bridge
        (``StageLoop.serve_source``) until it needs the runner. ``(items sent, fds ready)``;
        None when the bridge cannot (not started, draining, a Python transport)."""
        if self._gen is None or self.draining:
            return None
        got = stage.serve_source(self._gen, self.ledger, self._failed, inbox, fds, timeout, spin_us, max_items, max_ns, slice_ns)
        if got is None:
            return None
        n, ended, ready = got
        if ended:
            self._gen = None
            self.draining = True
        return n, ready

    def _failed(self, position: int, e: BaseException, emitting: bool) -> None:
        """run_batch: generate() (or sending its item) raised ``e``; as step()'s except
        clauses."""
        if emitting:
            self.emitter.release_loans()
            if not isinstance(e, OutputSerializationError):
                raise e
        elif isinstance(e, (Aborted, SharedMemoryFullError)) or not isinstance(e, Exception):
            raise e
        self.fail(None, position, e, True)

    def close(self) -> None:
        """Close the generator (its ``finally`` blocks run now)."""
        gen, self._gen = self._gen, None
        if gen is not None and hasattr(gen, "close"):
            try:
                gen.close()
            except Exception:
                log.exception("closing generate() of %s", self.name)
