"""The gateway: the caller's end of the data path, in the caller's own thread.

::

    caller thread(s)                          gateway (lock)             workers
    ----------------                          --------------             -------
    send(x): encode ......................... OutPort.send per input edge --> input nodes
             (window full: wait on the gateway inbox for their acks)
    recv():  pending outputs? else ........... InPort.receive per output edge <-- terminal nodes
             decode, ack (the caller's queue is the end of the line)
             (nothing yet: wait on the gateway inbox for their frames)

    arbiter thread (never a frame of its own)
    -----------------------------------------
    service()  now and then, non-blocking: acks, resends, late end of stream, outputs nobody
               receives yet (a close() followed by join() must still drain), gaps, probes
    replay(), apply_ack(), committed(), finished(): what a worker-process object answers for
               its edges, the gateway answers for the caller's: restarts treat both alike

Every edge of the caller (``__input__ -> node`` and ``node -> __output__``) is an ordinary
exactly-once edge (see :mod:`supervisor.channels`) whose other end is this object. Its inbox
(``in/gw``) is notified by the input nodes' acks and the terminal nodes' frames, and waited on
by whichever caller thread needs to wait: one thread waits on the inbox at a time, the others
wait on a condition it signals after every wake-up, so a send() blocked on a full window also
collects outputs for a recv() in another thread, and a single thread that sends everything
before receiving anything never deadlocks (the outputs wait in the gateway, as they did in the
old output queue).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NoReturn, Optional, Sequence, Tuple

from remotemedia.errors import EndOfStream, SharedMemoryFullError, SupervisorError
from remotemedia.frames import FrameInfo, decode

from .channels import KIND_DATA, KIND_EOS, InPort, OutPort, Transport
from .doorbells import GATEWAY_SLOT
from .protocol import EdgeSpec
from .tracebacks import forget_locals
from .worker.replicas import Reorder, dispatch_groups, merge_groups, tag

__all__ = ["Gateway", "INBOX", "EncodedFrame"]

#: The gateway's inbox service: acks of the input edges and frames of the output edges.
INBOX = "in/gw"
#: Longest single wait on the inbox: how soon a waiter notices the run failed or ended when
#: nothing wakes it (the arbiter interrupts it at once in both cases; this is the backstop).
_SLICE = 0.1

#: Seconds between probes of the output edges (see InPort.probe), as a worker's heartbeat.
_PROBE_EVERY = 1.0

#: ``(meta, buffers, stream id)`` of one encoded input frame.
EncodedFrame = Tuple[bytes, List[Any], int]


class Gateway:
    """The caller's end of every edge from ``__input__`` and to ``__output__``.

    Thread-safe: every method may be called from any thread. Only the caller's threads block
    in it (send, recv and their waits); the arbiter's calls never wait.
    """

    def __init__(
        self,
        transport: Transport,
        input_edges: Sequence[EdgeSpec],
        output_edges: Sequence[EdgeSpec],
        spin_us: int = 0,
        on_error: Optional[Callable[[BaseException], None]] = None,
        start: Optional[Dict[int, int]] = None,
    ) -> None:
        """``start``: edge -> the seq its frames start at (0 when absent): where a run resumed
        by the Ray backend's host agent picks its cut edges up."""
        self._on_error = on_error
        # reentrant: a failure found inside the lock fails the run, which ends the inputs
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wait_lock = threading.Lock()  # one thread waits on the inbox at a time
        self.spin_us = spin_us
        self.inputs: List[OutPort] = []
        self.outputs: List[InPort] = []
        self._listener: Any = None
        self._waker: Any = None
        try:
            t = transport
            self._listener = t.listener(INBOX, GATEWAY_SLOT)
            self._waker = t.notifier(INBOX, GATEWAY_SLOT)
            at = start or {}
            for e in input_edges:
                n = at.get(e.index, 0)
                self.inputs.append(OutPort(t.node, e, next_seq=n, committed=n, transport=t))
            for e in output_edges:
                self.outputs.append(InPort(t.node, e, expected=at.get(e.index, 0), transport=t))
        except BaseException:
            self._close_ports()
            raise
        # Input nodes with replicas: each input goes to the least-loaded one; terminal nodes
        # with replicas: their outputs are put back in input order (see
        # supervisor.worker.replicas).
        self._groups = dispatch_groups(self.inputs)
        self._reorder: Dict[int, Tuple[Reorder, int]] = {}  # output port position -> (its group's, replica)
        for g in merge_groups(self.outputs):
            r = Reorder(len(g))
            self._reorder.update({j: (r, i) for i, j in enumerate(g)})
        self._in_by_edge = {p.spec.index: p for p in self.inputs}
        self._out_by_edge = {p.spec.index: p for p in self.outputs}
        self._watch_out = [p.sub for p in self.outputs]
        self._watch_acks = [p.ack_sub for p in self.inputs]
        # outputs taken off the edges, not yet received: (value, info, Sample the value is a
        # view of, or None)
        self._pending: Deque[Tuple[Any, FrameInfo, Any]] = deque()
        self.copy_outputs = False  # outputs are kept after the run: copies, not views
        self.sent = 0  # inputs sent (the origin of the next one)
        self.inputs_closed = False
        self.closed = False
        self._next_probe = 0.0
        self.error: Optional[BaseException] = None  # what the gateway failed with (reported)

    # ================================================================ the caller's side

    def send(self, frame: EncodedFrame, deadline: Optional[float], check: Callable[[], None]) -> None:
        """Publish one encoded input on every input edge, waiting for room in their windows
        until ``deadline`` (TimeoutError). ``check`` raises the run's error, if it failed."""
        while True:
            with self._lock:
                if self._try_send(frame):
                    return
            check()
            if self.closed or self.inputs_closed:
                raise SupervisorError("send(): the pipeline has stopped")
            if not self._wait(deadline, self._watch_acks):
                raise TimeoutError("send(): the pipeline's inputs stayed full") from None

    def try_send(self, frame: EncodedFrame, notify: bool = True) -> bool:
        """:meth:`send` without waiting: False when a window is full. With ``notify=False``
        the input nodes are woken only by :meth:`flush` (one wake-up for a batch of inputs)."""
        with self._lock:
            return self._try_send(frame, notify)

    def flush(self) -> None:
        """Wake the input nodes for the inputs sent with ``notify=False``."""
        with self._lock:
            if not self.closed:
                for p in self.inputs:
                    p.flush_notify()

    def _try_send(self, frame: EncodedFrame, notify: bool = True) -> bool:
        if self.closed or self.inputs_closed:
            raise SupervisorError("send(): the pipeline has stopped" if self.closed else "send() after close(): the input stream is closed")
        groups = self._groups
        if not self._room():
            if not notify:  # (the batch so far must not wait for room)
                for q in self.inputs:
                    q.flush_notify()
            self._pump_inputs()
            if not self._room():
                return False
        meta, bufs, stream_id = frame
        now = time.monotonic_ns()
        try:
            # (self.inputs read now: a host agent's gateway keeps its cut edges apart, see
            # supervisor.ray.agent.HostGateway)
            for p in self.inputs if groups is None else groups[0]:
                p.send(KIND_DATA, meta, bufs, self.sent, stream_id, now, notify)
            if groups is not None:
                for d in groups[1]:
                    for p in d.ports:  # (the replicas' loads as of now)
                        p.poll_acks()
                    port, k = d.sent(d.choose())  # (one has room: _room())
                    port.send(KIND_DATA, tag(k, meta), bufs, self.sent, stream_id, now, notify)
        except SharedMemoryFullError as e:  # not the caller's fault: the run fails, explained
            self._report(e)
            raise
        self.sent += 1
        return True

    def _room(self) -> bool:
        """Every input edge has room, but of those to the replicas of a node, one is enough."""
        if self._groups is None:
            return all(p.can_send() for p in self.inputs)
        plain, groups = self._groups
        return all(p.can_send() for p in plain) and all(any(p.can_send() for p in d.ports) for d in groups)

    def close_inputs(self) -> None:
        """End the input stream: end of stream on every input edge (now, or as soon as its
        window has room)."""
        with self._lock:
            self.inputs_closed = True
            if not self.closed:
                self._pump_inputs()

    def recv(self, deadline: Optional[float], check: Callable[[], None]) -> Tuple[Any, FrameInfo]:
        """The next output. EndOfStream once every output edge ended and every output was
        received; TimeoutError at ``deadline``; the run's error (via ``check``) when it failed
        and no output is left that arrived before."""
        while True:
            with self._lock:
                if not self.closed:
                    self._pump_outputs()
                if self._pending:
                    value, info, _ = self._pending.popleft()
                    return value, info
                ended = self.closed or (bool(self.outputs) and self.all_eos())
            check()
            if ended:
                raise EndOfStream("every output has been received")
            if not self._wait(deadline, self._watch_out):
                raise TimeoutError("recv(): no output in time") from None

    def take(self) -> List[Tuple[Any, FrameInfo]]:
        """Every output ready now (never waits): those taken before, then those queued on
        the output edges."""
        with self._lock:
            if not self.closed:
                self._pump_outputs()
            pending = self._pending
            if not pending:
                return []
            out = [(value, info) for value, info, _ in pending]
            pending.clear()
            return out

    def wait(self, deadline: Optional[float]) -> None:
        """Wait (up to one slice) for anything: room for inputs or an output."""
        self._wait(deadline, self._watch_out)

    def _wait(self, deadline: Optional[float], watch: List[Any]) -> bool:
        """Wait until the inbox is notified (or another waiter signals), at most one slice.
        False when ``deadline`` has passed."""
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        slice_ = _SLICE if deadline is None else min(_SLICE, deadline - now)
        if self._wait_lock.acquire(blocking=False):
            try:
                if not self.closed:
                    self._listener.wait(slice_, [], self.spin_us, watch)
            finally:
                self._wait_lock.release()
            with self._cond:
                self._cond.notify_all()
        else:
            with self._cond:
                self._cond.wait(min(slice_, 0.01))
        return True

    # ================================================================ the arbiter's side

    def service(self) -> List[Tuple[int, int]]:
        """Everything that must go on while no caller thread is in the gateway: acks,
        resends, a late end of stream, outputs nobody receives yet. Never waits (skipped
        while a caller holds the gateway: it does the same). Returns the gaps to replay, as
        ``(edge, after)``."""
        if not self._lock.acquire(blocking=False):
            return []
        try:
            if self.closed:
                return []
            try:
                self._pump_inputs()
                self._pump_outputs()
            except Exception as e:
                if e is self.error:
                    return []  # (reported: the run is failing)
                raise
            now = time.monotonic()
            if now >= self._next_probe:
                self._next_probe = now + _PROBE_EVERY
                for p in self.outputs:
                    p.probe()
            gaps = []
            for p in self.outputs:
                if p.gap_since is not None:
                    want = p.gap_to_report(now)
                    if want is not None:
                        gaps.append((p.spec.index, want - 1))
            return gaps
        finally:
            self._lock.release()
        # (outputs taken here wake a waiting recv() through its next slice or notify)

    def busy(self) -> bool:
        """Work is pending that the arbiter's service() should not leave for long (or a
        caller thread is in the gateway: then it is, as far as the arbiter can tell)."""
        if self.closed:
            return False
        # The ports' books are read under the lock: a port is borrowed while it sends, and a
        # big frame's copy runs with the GIL released.
        if not self._lock.acquire(blocking=False):
            return True
        try:
            if self.inputs_closed and not all(p.eos_sent for p in self.inputs):
                return True
            return any(p.undelivered is not None for p in self.inputs) or any(
                p.gap_since is not None for p in self.outputs
            )
        finally:
            self._lock.release()

    def replay(self, edge: int, after: int) -> None:
        """An input node restarted: send again what it has not committed."""
        with self._lock:
            p = self._in_by_edge.get(edge)
            if p is not None and not self.closed:
                p.replay(after)

    def apply_ack(self, edge: int, processed: int, committed: int) -> None:
        """An ack relayed by the arbiter (an input node's final commit: it has exited)."""
        with self._lock:
            p = self._in_by_edge.get(edge)
            if p is not None and not self.closed:
                p.consumer_ended(processed, committed)

    def committed(self, edge: int) -> int:
        """Frames of output edge ``edge`` received (for the caller, received is committed)."""
        with self._lock:
            p = self._out_by_edge.get(edge)
            return p.expected if p is not None else 0

    def finished(self, edge: int) -> bool:
        """Output edge ``edge`` has delivered its end of stream."""
        with self._lock:
            p = self._out_by_edge.get(edge)
            return p is not None and p.eos

    def all_eos(self) -> bool:
        with self._lock:
            return all(p.eos for p in self.outputs)

    def in_flight(self) -> Dict[int, int]:
        with self._lock:
            return {p.spec.index: p.in_flight for p in self.inputs}

    def unprocessed(self) -> int:
        """Inputs sent but not committed by every input node."""
        with self._lock:
            if not self.inputs:
                return 0
            if self._groups is None:
                return self.sent - min(min(p.committed, self.sent) for p in self.inputs)
            plain, groups = self._groups
            done = [p.committed for p in plain] + [sum(p.committed for p in d.ports) for d in groups]
            return self.sent - min(min(n, self.sent) for n in done)

    def interrupt(self) -> None:
        """Wake a caller waiting in the gateway (the run failed or ended)."""
        waker = self._waker
        if waker is not None and not self.closed:
            try:
                waker.notify()
            except Exception:
                pass
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Release every iceoryx2 object; outputs not yet received become private copies
        (nothing of a finished run stays mapped for them). Idempotent."""
        self.interrupt()
        with self._wait_lock, self._lock:
            if self.closed:
                return
            self.closed = True
            self._settle()
            for r, _ in self._reorder.values():  # (outputs whose turn never came: no view outlives the ports)
                for q in r.queues:
                    q.clear()
            self._close_ports()
            self._cond.notify_all()

    # ================================================================ inside the lock

    def _report(self, err: BaseException) -> None:
        """A failure found in the gateway fails the run (before it is raised where it was
        found: the arbiter completes it)."""
        self.error = err
        if self._on_error is not None:
            self._on_error(err)

    def _pump_inputs(self) -> None:
        for p in self.inputs:
            p.poll_acks()
            if p.undelivered is not None:
                p.resend_due()
        if self.inputs_closed:
            for p in self.inputs:
                if not p.eos_sent and p.can_send():
                    p.send(KIND_EOS, b"", [], self.sent, 0, 0)

    def _pump_outputs(self) -> None:
        reorder = self._reorder
        for j, p in enumerate(self.outputs):
            if j not in reorder:
                self._take_outputs(p, self._pending)
                continue
            # (a replica's outputs: ((k, kind, value), info, sample) until their turn)
            r, i = reorder[j]
            taken: Deque[Tuple[Any, FrameInfo, Any]] = deque()
            self._take_outputs(p, taken)
            for (k, kind, value), info, sample in taken:
                r.put(i, k, kind, (value, info, sample))
            if p.eos:
                r.end(i)
        for r in {id(r): r for r, _ in reorder.values()}.values():
            self._pending.extend(r.release())

    def _take_outputs(self, p: InPort, pending: Deque[Tuple[Any, FrameInfo, Any]]) -> None:
        """Append what output edge ``p`` has to ``pending``, and ack it."""
        last = None
        while True:
            try:
                s = p.take()  # (a small pickled value comes unpickled by the bridge)
            except Exception as e:
                self._undecodable(p, e)
            if s is None:
                break
            if type(s) is tuple:
                value, seq, origin, stream_id, created_ns, sent_ns = s
                last = seq
                pending.append((value, FrameInfo(seq, origin, stream_id, created_ns, sent_ns, p.src), None))
                continue
            last = s.seq
            if s.kind == KIND_EOS:
                continue
            info = FrameInfo(s.seq, s.origin, s.stream_id, s.created_ns, s.sent_ns, p.src)
            views = bool(s.buffers)  # (a value unpickled from the meta alone holds no view)
            copy = p.should_copy() or (views and self.copy_outputs)
            try:
                value = decode(s, copy=copy)
            except Exception as e:
                s = None  # (the error outlives the run: it must not hold the frame)
                self._undecodable(p, e)
            pending.append((value, info, None if copy or not views else s))
            del s
        if last is not None or p.dup_pending:
            n = p.expected  # the caller's queue is the end of the line: received = committed
            p.ack(n, n)

    def _undecodable(self, port: InPort, e: Exception) -> NoReturn:
        """An output this process cannot rebuild: the run fails."""
        err = SupervisorError(f"an output of node {port.src!r} could not be decoded in the caller's process: {e!r}")
        # The error outlives the run (the caller keeps it): it must not hold the frame, which
        # decode()'s frames still reference.
        forget_locals(e)
        self._report(err)
        raise err from e

    def _settle(self) -> None:
        pending = self._pending
        for i in range(len(pending)):
            value, info, sample = pending[i]
            if sample is not None:
                try:
                    pending[i] = (decode(sample, copy=True), info, None)
                except Exception:  # (it decoded once; should it not again, the view stays)
                    pass

    def _close_ports(self) -> None:
        ports: List[Any] = [*self.inputs, *self.outputs]
        for p in ports:
            p.close()
        for obj in (self._listener, self._waker):
            if obj is not None:
                obj.close()
