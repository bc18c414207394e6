"""The worker's output side: a node's results become frames on every output edge.

A bare array like the edge's last one goes out through the bridge's hot path
(OutPort.send_array: encoded, copied, published and notified in one call); anything else is
encoded once and sent on each edge; an array the node got from ``allocate()`` (a chunk loaned
from the first edge) is sent without a copy.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from remotemedia import _ipc_bridge as bridge
from remotemedia.errors import LoanError, OutputSerializationError
from remotemedia.frames import Frame, encode
from remotemedia.node import iter_outputs

from ..channels import KIND_DATA, MAX_LOANED, OutPort
from .replicas import END, FLUSH, LAST, MORE, Dispatch, dispatch_groups
from .replicas import tag as tag_meta

if TYPE_CHECKING:
    import asyncio

    from .counters import Counters

log = logging.getLogger("remotemedia.worker")

# Results that are one output as they are (no generator, no awaitable): emit_result() skips
# iter_outputs' inspect checks for them.
_PLAIN = frozenset((np.ndarray, dict, bytes, str, tuple, list, int, float, bool))


class Emitter:
    """Sends a node's outputs. ``wait_for_room(*ports)`` is the worker loop's backpressure
    (it keeps the housekeeping going until one of ``ports`` has room); ``wait_for_dispatch(d)``
    waits until the commit has moved far enough for the next frame toward the replicas of
    ``d`` to be recorded (see .replicas); ``event_loop()`` the loop that async nodes' results
    run on.

    ``origin``/``stream``/``created`` are those of the input frame being processed: the
    outputs inherit them. ``replica``: which replica of its node this worker is (-1: none)."""

    def __init__(
        self,
        node: Any,
        name: str,
        outputs: Sequence[OutPort],
        counters: "Counters",
        board: Any,
        wait_for_room: Callable[..., None],
        event_loop: Callable[[], "asyncio.AbstractEventLoop"],
        replica: int = -1,
        wait_for_dispatch: Optional[Callable[[Dispatch], None]] = None,
    ) -> None:
        self.node = node
        self.name = name
        self.outputs = list(outputs)
        self.counters = counters
        self.board = board
        self.wait_for_room = wait_for_room
        self.wait_for_dispatch = wait_for_dispatch
        self.event_loop = event_loop
        self.loans: Dict[int, Any] = {}  # address -> loan, of arrays allocate() handed out
        self._loan_warned = False
        self.origin = 0
        self.stream = 0
        self.created = 0
        # Edges to the replicas of a node: each frame goes to one of them (see .replicas).
        self.groups = dispatch_groups(self.outputs)
        self._plain = self.outputs if self.groups is None else self.groups[0]
        # A replica: every output carries the number k of its input (see .replicas).
        self.replica = replica
        self.k = -1  # the input being processed (-1: flush())
        self.k_open = False  # its end was not sent yet
        if self.replica >= 0:
            self.emit_result = self._emit_replica_result  # type: ignore[method-assign]

    def allocate(self, shape: Any, dtype: Any) -> np.ndarray:
        """Node.allocate() in a worker: a writable array over a chunk loaned from the first
        output edge, so that returning it sends the frame without a copy."""
        dtype = np.dtype(dtype)
        try:
            count = operator.index(shape)  # an int, numpy's too
        except TypeError:
            shape = tuple(operator.index(n) for n in shape)
            count = math.prod(shape)
        nbytes = count * dtype.itemsize
        # (a loan is of one edge's memory: not when the frame may go to another replica's,
        # nor when it is wrapped with its input's number)
        if not self.outputs or nbytes == 0 or self.groups or self.replica >= 0:
            return np.empty(shape, dtype)
        port = self.outputs[0]
        if not port.can_send():
            self.wait_for_room(port)
        try:
            if len(self.loans) >= MAX_LOANED - 2:  # keep chunks for the copying sends
                raise LoanError(f"{len(self.loans)} allocated buffers are still outstanding")
            loan = port.loan(nbytes)
        except LoanError as e:
            if not self._loan_warned:
                self._loan_warned = True
                log.warning("node %s: allocate() falls back to private memory (%s); return or drop "
                            "allocated buffers before allocating more", self.name, e)
            return np.empty(shape, dtype)
        arr = np.frombuffer(loan, dtype=dtype, count=count).reshape(shape)
        self.loans[loan.address] = loan
        return arr

    def release_loans(self) -> None:
        """Give back the chunks of arrays allocated but not returned."""
        for loan in self.loans.values():
            if loan.pending:
                loan.discard()
        self.loans.clear()

    def emit(self, value: Any, tag: Any = None) -> None:
        """Send ``value`` on every output edge (on the least-loaded replica's of each node
        with replicas, see .replicas). ``tag``: a replica's ``(k, kind)``, sent with the
        value."""
        if type(value) is Frame:
            value, stream_id = value.value, value.stream_id
            if stream_id is None:
                stream_id = self.stream
        else:
            stream_id = self.stream
        if tag is not None:
            value = (tag[0], tag[1], value)
        origin, created = self.origin, self.created
        # A bare array goes out through the bridge's hot path (encoded, copied, published and
        # notified in one call) on every edge that has seen its dtype and shape before.
        fast = type(value) is np.ndarray and not self.loans
        meta: Any = None
        bufs: List[Any] = []
        loan = None
        for i, port in enumerate(self._plain):
            if not port.can_send():
                self.wait_for_room(port)
            if fast and port.send_array(value, origin, stream_id, created):
                continue
            if meta is None:
                try:
                    meta, bufs = encode(value)
                except Exception as e:
                    raise self._unsendable(value, e) from None
                if self.loans and len(bufs) == 1:
                    loan = self.loans.pop(bridge.buffer_address(bufs[0]), None)
                    if loan is not None and (loan.nbytes != memoryview(bufs[0]).nbytes or not loan.pending):
                        loan = None
            if i == 0 and loan is not None:
                port.send_loan(loan, meta, bufs[0], origin, stream_id, created)
            else:
                port.send(KIND_DATA, meta, bufs, origin, stream_id, created)
                if fast and len(bufs) == 1:
                    port.learn_array(value, meta, bufs[0])
        if self.groups is not None:
            for d in self.groups[1]:
                port, k = self._dispatch(d)
                if meta is None:
                    try:
                        meta, bufs = encode(value)
                    except Exception as e:
                        raise self._unsendable(value, e) from None
                port.send(KIND_DATA, tag_meta(k, meta), bufs, origin, stream_id, created)
        if tag is not None and tag[1] == END:
            return  # (a marker, not an output)
        counters = self.counters
        counters.frames_out += 1
        if self.board is not None:
            self.board.set("frames_out", counters.frames_out)

    def _dispatch(self, d: Dispatch) -> Tuple[OutPort, int]:
        """The replica edge of ``d`` the next frame goes on (waiting for room), and its k."""
        if d.k >= d.limit and self.wait_for_dispatch is not None:
            self.wait_for_dispatch(d)
        if d.forced() < 0:
            for p in d.ports:  # (the replicas' loads as of now)
                p.poll_acks()
        i = d.choose()
        while i < 0:
            self.wait_for_room(*d.waits_on())
            i = d.choose()
        return d.sent(i)

    def start_input(self, k: int) -> None:
        """A replica is about to process input frame number ``k`` (its upstream's number:
        see .replicas)."""
        self.k = k
        self.k_open = True

    def end_input(self) -> None:
        """A replica has processed input k: when no output said so (none, or a generator's),
        an empty marker lets the downstream node go on to k + 1."""
        if self.k_open:
            self.k_open = False
            self.emit(None, (self.k, END))

    def _emit_replica_result(self, result: Any) -> None:
        """emit_result() of a replica: each output goes with the number k of its input and
        whether it is the input's last one (see .replicas); flush()'s (``k`` = -1) after
        every input's."""
        if result is None:
            return
        k = self.k
        if k < 0:
            for item in iter_outputs(result, self.event_loop):
                self.emit(item, (-1, FLUSH))
        elif type(result) in _PLAIN and self.k_open:
            self.k_open = False
            self.emit(result, (k, LAST))
        else:
            for item in iter_outputs(result, self.event_loop):
                self.emit(item, (k, MORE))

    def emit_result(self, result: Any) -> None:
        """Emit what process()/flush() returned: nothing, one value, or what it yields."""
        if result is None:
            return
        if type(result) in _PLAIN:
            self.emit(result)  # the common cases, without the inspect checks below
            return
        for item in iter_outputs(result, self.event_loop):
            self.emit(item)

    def _unsendable(self, value: Any, error: BaseException) -> OutputSerializationError:
        """The one-line error of an output that does not pickle, with the path of the part
        that fails (the failure path only: emit() pays nothing for it)."""
        from remotemedia.serialization import find_unpicklable

        try:
            path, err = find_unpicklable(value, error=error)
        except Exception:  # (the search failed: report the first error)
            path, err = "", error
        frame = getattr(self.node, "current_frame", None)
        seq = frame[0] if frame is not None else None
        return OutputSerializationError(self.name, seq, f"{type(err).__name__}: {err}", path.lstrip(".") or None)

    def close(self) -> None:
        self.release_loans()
        self.outputs = []
