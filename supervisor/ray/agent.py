"""The host agent (backend ``ray``): one Ray actor per host, class ``HostAgent``, running that
host's part of the pipeline under a local :class:`~supervisor.core.Supervisor`.

::

    driver                     HostAgent "gpu" (a Ray actor on a node labelled remotemedia.host=gpu)
    ------                     ---------------------------------------------------------------
    push(edge, inc, frames) -> EdgeReceiver -> HostGateway OutPort --iceoryx2--> node workers
    pull(edge, reply)       <- EdgeSender   <- HostGateway InPort  <--iceoryx2-- node workers
                               push(...) to the next host's agent (its EdgeReceiver)
                               pump thread: takes the local outputs, sends them, checkpoints
    state actor  <------------ checkpoint: every node's commit point and snapshot (then, and
                               only then, the cut edges' commits are reported to the senders)

Inside the host everything is the local runtime: the nodes are pickled by the driver exactly
as the local backend pickles them, and the local Supervisor gives them the same restarts,
snapshots, dead letters and iceoryx2 edges. Its gateway (:class:`HostGateway`) is the local
end of the part's *cut* edges: each cut edge into the host is an input edge of the local run,
each cut edge out of it an output edge, and the agent bridges them to Ray calls with the
protocol of :mod:`supervisor.ray.edges`.

When the agent's process dies (a SIGKILL, a lost node), its node workers die with it (they
watch their parent), Ray starts the actor again (``max_restarts=-1``), and the new agent
registers with the state actor: a new incarnation, and the checkpoint its nodes resume from.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray

from remotemedia.frames import decode, encode
from remotemedia.node import Node, Source
from remotemedia.pipeline import Pipeline

from ..arbiter import CallInLoop
from ..core import Supervisor
from ..gateway import Gateway
from ..protocol import RestoreState
from .edges import DATA, EOS, EdgeProtocolError, EdgeReceiver, EdgeSender, Frame, Reply, StaleIncarnation
from .plan import CALLER, Part, host_text
from .state import NO_SNAPSHOT_CHANGE

__all__ = ["HostAgent", "HostSpec", "HostGateway", "agent_name", "AGENT_CLASS_NAME"]

log = logging.getLogger("remotemedia.supervisor")





#: What ``ray list actors`` shows for the agents.
AGENT_CLASS_NAME = "HostAgent"
#: Frames of one push or pull at most (and about this many bytes).
BATCH_FRAMES = 256
BATCH_BYTES = 64 << 20
#: Calls whose frames come to at most this many bytes travel pickled in one bytes object
#: (see pack).
PACK_BYTES = 64 << 10
#: Arrays of at least this many bytes that a host's pump takes from a cut edge out of it are
#: not copied: on an edge it pushes, put into the process's Ray object store straight from
#: shared memory (see _Stored); on an edge the driver's process pulls, kept as the view of
#: shared memory they came in (see _Agent._take_outputs). Smaller ones are copied (Ray sends
#: them inline with the call anyway: its max_direct_call_object_size, 100 KiB).
STORE_BYTES = 100 << 10
#: Seconds a commit poll or an empty pull waits at the other end for news.
LONG_POLL = 0.2
#: Seconds a push that carries the pushing process's pulls waits for their frames at most
#: (see _Agent.push): about a fast node's turn; a slower node's outputs come with a pull of
#: their own.
PIGGY_WAIT = 0.002
#: ... plus this many seconds per byte of the pushed frame, when the driver says the frame is
#: a lone one (its caller waits for its output before it sends the next): a big frame takes
#: longer to get into and out of the nodes (8 ms more for 6.2 MB). A stream's pushes wait
#: PIGGY_WAIT only: the edge's next push waits for the reply.
PIGGY_WAIT_PER_BYTE = 1e-9
#: Seconds between retries of a call to an agent that is not there (restarting, lost).
RETRY = 0.2


def agent_name(run_id: str, host: Optional[str]) -> str:
    """The Ray actor name of a run's agent of ``host`` (None: the driver's host)."""
    return f"remotemedia/{run_id}/{host_text(host)}"


@dataclass
class HostSpec:
    """Everything an agent needs, given at creation (and again, unchanged, at each restart)."""

    run_id: str
    name: str  # the pipeline's
    host: Optional[str]
    part: Part
    # node -> its pickle (cleanup() then cloudpickle, by the driver); for an agent, empty: it
    # takes them from the state actor (a restart must not depend on creation arguments kept
    # in the object store)
    blobs: Dict[str, bytes]
    sources: List[str]  # the part's nodes that are Sources
    node_options: Dict[str, Dict[str, Any]]  # node -> its own options (Node(..., options=))
    supervisor_options: Dict[str, Any]  # the local Supervisor's keywords
    state: Optional[str]  # the Ray name of the run's state actor; None: the driver's own part
    checkpoint_interval: float = 0.05  # seconds between checkpoints (while the books move)
    window: int = 32  # frames in flight per cut edge (the consumer's queue_depth)
    windows: Dict[int, int] = field(default_factory=dict)  # global edge -> its window


class _Stand(Node):
    """A node of the part as the local Supervisor's Pipeline sees it: name, options, kind. The
    real node is the driver's pickle, handed to the worker unopened (the agent never unpickles
    user code)."""

    def process(self, data: Any) -> Any:  # pragma: no cover - never called: the worker runs the real node
        raise RuntimeError("a stand-in node does not process")


class _StandSource(Source):
    def generate(self) -> Any:  # pragma: no cover - never called
        raise RuntimeError("a stand-in source does not generate")


class HostSupervisor(Supervisor):
    """The local Supervisor of one host's part: the part's nodes (their pickles as the driver
    made them) and edges, cut edges ending in the gateway; nodes may resume from a
    checkpoint."""

    def __init__(
        self, spec: HostSpec, blobs: Dict[str, bytes], gateway_factory: Callable[..., Gateway], resume: Dict[str, RestoreState]
    ) -> None:
        part = spec.part
        stands = [
            (_StandSource if n in spec.sources else _Stand)(name=n, options=dict(spec.node_options.get(n) or {}))
            for n in part.nodes
        ]
        pipeline = Pipeline(stands, connections=part.local_connections(), name=f"{spec.name}@{host_text(spec.host)}")
        self._part = part  # (before Supervisor.__init__, which reads the edges)
        super().__init__(pipeline, **spec.supervisor_options)
        self._blobs = blobs
        self._gateway_factory = gateway_factory
        self._speaks_to_systemd = False  # (the driver tells systemd about every host at once)
        self._resume = resume

    def _serialize_nodes(self) -> Dict[str, bytes]:
        return {n: self._blobs[n] for n in self._part.nodes}

    def _edge_list(self) -> List[Tuple[str, str]]:
        return list(self._part.edges)


class HostGateway(Gateway):
    """The local end of a part's cut edges (and, in the driver's part, of the caller's edges,
    which stay what the base Gateway makes of them). A cut edge into the host is fed per edge
    by the agent (:meth:`send_cut`, frames of the sending host); a cut edge out of it is taken
    per edge by the agent's pump (:meth:`_Agent._take_outputs`), acknowledged as *processed*
    when taken and as *committed* only when the receiving host reports them committed, so that
    the nodes here commit a frame only once its outputs are safe on the other host.

    ``self.inputs`` / ``self.outputs`` hold the caller's edges only (what send(), recv() and
    the end of the input stream act on); ``cut_in`` / ``cut_out`` the cut edges by local
    index."""

    def __init__(self, transport: Any, input_edges: Any, output_edges: Any, spin_us: int = 0, on_error: Any = None, *, agent: "_Agent") -> None:
        super().__init__(transport, input_edges, output_edges, spin_us, on_error, start=agent.start_positions)
        part = agent.spec.part
        self.cut_in = {p.spec.index: p for p in self.inputs if p.spec.index in part.cut_in}
        self.cut_out = {p.spec.index: p for p in self.outputs if p.spec.index in part.cut_out}
        self.inputs = [p for p in self.inputs if p.spec.index not in part.cut_in]
        self.outputs = [p for p in self.outputs if p.spec.index not in part.cut_out]
        self._next_cut_probe = 0.0

    def _pump_inputs(self) -> bool:
        """Acks and resends of every edge into the host (the caller's get their end of stream
        from the base); True when a consumer of a cut edge made room. (A cut edge's end of
        stream comes from its sending host.)"""
        super()._pump_inputs()
        progress = False
        for p in self.cut_in.values():
            if p.poll_acks():
                progress = True
            if p.undelivered is not None:
                p.resend_due()
        return progress

    def service(self) -> List[Tuple[int, int]]:
        gaps = super().service()
        if not self._lock.acquire(blocking=False):
            return gaps
        try:
            if self.closed:
                return gaps
            now = time.monotonic()
            if now >= self._next_cut_probe:
                self._next_cut_probe = now + 1.0
                for p in self.cut_out.values():
                    p.probe()
            for p in self.cut_out.values():
                if p.gap_since is not None:
                    want = p.gap_to_report(now)
                    if want is not None:
                        gaps.append((p.spec.index, want - 1))
        finally:
            self._lock.release()
        return gaps

    def all_eos(self) -> bool:
        # (under the lock, as the base reads its ports: a port is borrowed while the pump
        # takes from it, and the arbiter's thread asks this)
        with self._lock:
            return all(p.eos for p in self.outputs) and all(p.eos for p in self.cut_out.values())

    def busy(self) -> bool:
        if super().busy():
            return True
        # (under the lock, as the base reads its ports: a push thread may be sending on a
        # cut edge, and the arbiter's thread asks this: 'Already mutably borrowed')
        if not self._lock.acquire(blocking=False):
            return True
        try:
            return not self.closed and any(p.undelivered is not None for p in self.cut_in.values())
        finally:
            self._lock.release()

    def room(self, edge: int) -> bool:
        p = self.cut_in[edge]
        if p.can_send():
            return True
        p.poll_acks()
        return p.can_send()

    def free(self, edge: int) -> int:
        """Frames the cut edge ``edge`` into the host can take now."""
        p = self.cut_in[edge]
        p.poll_acks()
        return max(0, p.depth - p.in_flight) if p.lossless else p.depth

    def _close_ports(self) -> None:
        self.inputs = [*self.inputs, *self.cut_in.values()]
        self.outputs = [*self.outputs, *self.cut_out.values()]
        self.cut_in, self.cut_out = {}, {}
        super()._close_ports()

    def send_cut(self, edge: int, frame: Frame) -> None:
        """Publish one frame of a cut edge into the host (the caller checked :meth:`room`)."""
        seq, kind, value, origin, stream_id, created_ns = frame
        p = self.cut_in[edge]
        if kind == EOS:
            meta, bufs = b"", []
        else:
            meta, bufs = encode(value)
        got = p.send(kind, meta, bufs, origin, stream_id, created_ns)
        if got != seq:
            raise EdgeProtocolError(f"local edge {edge}: frame {seq} was published as {got}")


class _Out:
    """A cut edge out of the host: its sender, and the call in flight to the receiving agent."""

    __slots__ = ("local", "edge", "dst", "sender", "data", "poll", "retry_at", "peer", "stored", "pulled", "lent", "held_back")

    def __init__(self, local: int, edge: int, dst: Any, sender: EdgeSender) -> None:
        self.local, self.edge, self.dst, self.sender = local, edge, dst, sender
        self.stored = 0  # frames whose value went into the object store (_Stored)
        # The driver's process pulls this edge (it cannot be called): a big frame is
        # retained as the view of shared memory it came in, and a pull's answer returns it
        # (see _Agent._take_outputs)
        self.pulled = dst == CALLER or dst is None
        self.lent = 0  # frames retained as views of shared memory (pulled edges)
        self.held_back = False  # the local edge holds frames back: the borrow limit was reached
        self.data: Optional[Tuple[Future, int]] = None  # (future, frames sent)
        self.poll: Optional[Future] = None
        self.retry_at = 0.0
        self.peer: Any = None


class _In:
    """A cut edge into the driver's host's part: its receiver, and the pull in flight to the
    sending agent (the driver's process cannot be called: it pulls)."""

    __slots__ = ("local", "edge", "src", "receiver", "pull", "retry_at", "peer", "reported")

    def __init__(self, local: int, edge: int, src: Any, receiver: EdgeReceiver) -> None:
        self.local, self.edge, self.src, self.receiver = local, edge, src, receiver
        self.pull: Optional[Future] = None
        self.retry_at = 0.0
        self.peer: Any = None
        self.reported = -1  # the commit the last answered pull reported


class _Agent:
    """The body of :class:`HostAgent` (a plain class: the Ray actor wraps it), and of the
    driver's host's part in the driver process (``spec.state`` None: it never restarts, so
    its commits need no state actor; it pulls its cut edges in, and hands the caller's
    outputs to ``on_outputs``)."""

    def __init__(
        self,
        spec: HostSpec,
        on_outputs: Optional[Callable[[List[Tuple[Any, Any]]], None]] = None,
        piggyback: Optional[Callable[[Any, int], Tuple[Any, Any]]] = None,
    ) -> None:
        """``piggyback(host, nbytes)`` (the driver's part): the driver's pulls from ``host`` for a
        push to it to carry, and what to do with the push's future (see
        :meth:`RaySupervisor._claim_pulls`)."""
        self.spec = spec
        self.in_driver = spec.state is None
        self.on_outputs = on_outputs
        self.piggyback = piggyback
        self.host = spec.host
        self.key = host_text(spec.host)
        self.error: Optional[str] = None
        self.start_error: Optional[BaseException] = None  # what the part's start raised
        self.ready = threading.Event()
        self.stopping = False
        self.lock: Any = threading.RLock()  # the gateway's lock once it exists
        self.cond = threading.Condition(self.lock)
        self.gw: Optional[HostGateway] = None
        self.sup: Optional[HostSupervisor] = None
        self.checkpoints = 0
        self.last_checkpoint: Dict[str, Any] = {}
        self._saved_snapshots: Dict[str, Any] = {}
        self.state: Any = None
        if self.in_driver:
            self.incarnation, checkpoint = 1, None
            self.blobs = spec.blobs
        else:
            self.state = ray.get_actor(spec.state)
            self.incarnation, checkpoint = ray.get(self.state.register.remote(self.key))
            self.blobs = ray.get(self.state.blobs.remote(self.key))
        self.resumed = checkpoint is not None
        part = spec.part
        resume: Dict[str, RestoreState] = {}
        self.start_positions: Dict[int, int] = {}
        in_committed: Dict[int, int] = {}
        if checkpoint is not None:
            for name, e in checkpoint["nodes"].items():
                resume[name] = RestoreState(
                    in_seqs={int(k): v for k, v in e["in_seqs"].items()},
                    out_next={int(k): v for k, v in e["out_next"].items()},
                    snapshot=e.get("snapshot"),
                    source_position=e.get("source_position", 0),
                )
                self._saved_snapshots[name] = e.get("snapshot")
            in_committed = {int(k): v for k, v in checkpoint["cut_in"].items()}
            self.start_positions.update(in_committed)
            self.start_positions.update({int(k): v for k, v in checkpoint["cut_out"].items()})
        self._resume = resume
        self.receivers: Dict[int, Tuple[int, EdgeReceiver]] = {}  # global edge -> (local, receiver)
        for local, (g, _src) in part.cut_in.items():
            self.receivers[g] = (local, EdgeReceiver(g, self.incarnation, in_committed.get(local, 0)))
        self.outs: Dict[int, _Out] = {}  # global edge -> its sending end
        # What commits release on the edges this host pushes (frames whose big values are
        # objects in Ray's store) and the answers of its pushes (which may hold a frame
        # pulled with them): dropped by the pump at the start and the end of its turn, not
        # in its middle, since freeing an object is a call into Ray, 0.3-0.5 ms each that a
        # lone frame waited for between leaving its node and its push. (An edge the driver
        # pulls retains views of shared memory: a commit frees those at once, so that the
        # edge may take more.)
        self.released: List[Any] = []
        for local, (g, dst) in part.cut_out.items():
            pushed = not (dst == CALLER or dst is None)
            sender = EdgeSender(
                g, self.incarnation, spec.windows.get(g, spec.window), self.start_positions.get(local, 0), self.released if pushed else None
            )
            self.outs[g] = _Out(local, g, dst, sender)
        self.out_by_local = {o.local: o for o in self.outs.values()}
        self.ins: Dict[int, _In] = {}  # (the driver's part) global edge -> its pulling end
        if self.in_driver:
            for g, (local, rec) in self.receivers.items():
                self.ins[g] = _In(local, g, part.cut_in[local][1], rec)
        self._started = threading.Thread(target=self._start, name="remotemedia-agent-start", daemon=True)
        self._started.start()

    # ================================================================ start, pump

    def _start(self) -> None:
        try:
            sup = HostSupervisor(self.spec, self.blobs, self._make_gateway, self._resume)
            self.sup = sup
            sup.start()
            arb = sup._arbiter
            assert arb is not None and arb.gateway is not None
        except BaseException as e:  # noqa: BLE001 - reported to the driver by status()/ready()
            self.error = f"{type(e).__name__}: {e}"
            self.start_error = _portable(e)
            log.error("host %s: the part's run failed to start: %s", self.key, self.error)
            self.ready.set()
            return
        self.ready.set()
        self._pump()

    def _make_gateway(self, *args: Any, **kwargs: Any) -> HostGateway:
        gw = HostGateway(*args, agent=self, **kwargs)
        with self.lock:
            self.lock = gw._lock  # one lock for the gateway and the edges' books
            self.cond = threading.Condition(self.lock)
            self.gw = gw
        return gw

    def _pump(self) -> None:
        """Move frames until shut down: local outputs into the senders and on to the receiving
        agents, replies back. (Checkpoints have a thread of their own: a frame never waits
        for one.)"""
        sup = self.sup
        assert sup is not None
        arb = sup._arbiter
        threading.Thread(target=self._checkpoints, args=(arb,), name="remotemedia-agent-checkpoints", daemon=True).start()
        while not self.stopping:
            gw = self.gw
            if gw is None:
                break
            try:
                self._drop_released()
                big: List[Tuple[_Out, Any, Frame]] = []
                with self.lock:
                    if not gw.closed and (gw._pump_inputs() | self._take_outputs(gw, big)):
                        self.cond.notify_all()  # (room for a push, frames for a pull)
                    self._collect_replies()
                    if self.ins:
                        self._collect_pulls(gw)
                if big:
                    self._store(big)
                self._send_pushes()
                self._drop_released()
                if self.ins:
                    self._send_pulls(gw)
                if self.on_outputs is not None and gw.outputs:
                    got = gw.take()  # (after the run ended too: what it took before)
                    if got:
                        self.on_outputs(got)
            except StaleIncarnation as e:
                self._stale(e)
                break
            except Exception as e:  # noqa: BLE001 - the run fails, explained
                self._failed("pump", e)
                break
            if arb is not None and arb.finished.is_set() and gw.closed:
                time.sleep(0.02)  # (finished: only replies are left)
            else:
                gw.wait(time.monotonic() + 0.05)
        self._drop_released()  # (objects in Ray's store: not kept past the pump)

    def _checkpoints(self, arb: Any) -> None:
        """Every ``checkpoint_interval``, when the books moved: store them, then report the
        commits (see :meth:`_checkpoint`)."""
        while not self.stopping:
            t0 = time.monotonic()
            try:
                self._checkpoint(arb)
            except StaleIncarnation as e:
                self._stale(e)
                return
            except Exception as e:  # noqa: BLE001 - the run fails, explained
                if self.stopping:
                    return
                self._failed("checkpoint", e)
                return
            time.sleep(max(0.0, self.spec.checkpoint_interval - (time.monotonic() - t0)))

    def _stale(self, e: BaseException) -> None:
        log.error("host %s: incarnation %d is stale (%s): stopping", self.key, self.incarnation, e)
        self.stopping = True
        if self.sup is not None:
            self.sup.kill()

    def _failed(self, what: str, e: BaseException) -> None:
        log.exception("host %s: the agent's %s failed", self.key, what)
        self.error = f"{type(e).__name__}: {e}"
        if self.sup is not None:
            self.sup.kill()

    def _drop_released(self) -> None:
        """Drops what commits released (see ``self.released``), outside the lock."""
        if self.released:
            with self.lock:
                dead = self.released[:]
                self.released.clear()
            del dead

    def _take_outputs(self, gw: HostGateway, big: List[Tuple["_Out", Any, Frame]]) -> bool:
        """The frames of the cut edges out of the host, from the gateway into the senders
        (while their windows have room); True when there were any. Under the lock.

        A big frame (STORE_BYTES) of an edge the driver's process pulls is retained as the
        view of shared memory it came in: a pull's answer returns it, and Ray copies it into
        this node's object store as the call's return value, owned by the caller (one copy,
        as a put, but the caller's Ray then knows where the object is: a put's reference in
        the answer made it ask this process first, ~3 ms more per 6.2 MB frame here). Such
        views hold the producer's chunks: the edge takes no more while it borrows as many as
        it may (InPort.should_copy), until a pull reports commits. A big frame of an edge
        pushed to another agent goes to ``big`` instead, still in shared memory, and ends its
        edge's turn: :meth:`_store` puts it into the object store outside the lock (a put
        waits when the store is full: the agent must still answer meanwhile)."""
        took = False
        for local, p in gw.cut_out.items():
            o = self.out_by_local[local]
            s = o.sender
            pulled = o.pulled
            o.held_back = False
            while s.room():
                if pulled and p.should_copy():
                    # (the sender retains as many views as the edge may borrow: the next
                    # frames wait in the local edge until a commit releases some)
                    o.held_back = True
                    break
                r = p.take()
                if r is None:
                    break
                took = True
                if type(r) is tuple:
                    value, seq, origin, stream_id, created_ns, _sent = r
                    if type(value) is np.ndarray:
                        if value.nbytes >= STORE_BYTES:
                            if pulled:
                                s.add((seq, DATA, value, origin, stream_id, created_ns))
                                o.lent += 1
                                continue
                            big.append((o, value, (seq, DATA, value.nbytes, origin, stream_id, created_ns)))
                            break
                        value = value.copy()  # (a view of shared memory: the sender keeps it)
                    s.add((seq, DATA, value, origin, stream_id, created_ns))
                    continue
                kind = r.kind
                if kind == DATA and len(r) >= STORE_BYTES:
                    if pulled:
                        s.add((r.seq, DATA, decode(r), r.origin, r.stream_id, r.created_ns))
                        o.lent += 1
                        del r
                        continue
                    big.append((o, r, (r.seq, DATA, len(r), r.origin, r.stream_id, r.created_ns)))
                    break
                value = decode(r, copy=True) if kind == DATA else None
                s.add((r.seq, kind, value, r.origin, r.stream_id, r.created_ns))
                del r
            p.ack(p.expected, s.committed)
        return took

    def _store(self, big: List[Tuple["_Out", Any, Frame]]) -> None:
        """Put the big frames :meth:`_take_outputs` left (each a view of shared memory, or
        the sample holding it) into the object store, then into their senders. Not under
        the lock."""
        while big:
            o, held, (seq, kind, nbytes, origin, stream_id, created_ns) = big.pop(0)
            ref = ray.put(held if type(held) is np.ndarray else decode(held))
            del held  # (the chunk goes back to its producer)
            with self.lock:
                o.sender.add((seq, kind, _Stored(ref, nbytes), origin, stream_id, created_ns))
                o.stored += 1
                self.cond.notify_all()  # (frames for a pull)

    # ================================================================ cut edges out

    def _peer(self, o: _Out) -> Any:
        if o.peer is None:
            o.peer = ray.get_actor(agent_name(self.spec.run_id, o.dst))
        return o.peer

    def _send_pushes(self) -> None:
        """One data push and one commit poll at most in flight per cut edge to another
        host (the driver pulls its own)."""
        now = time.monotonic()
        for o in self.outs.values():
            if o.dst == CALLER or o.dst is None or now < o.retry_at:
                continue  # (the driver's process pulls what goes to its host)
            s = o.sender
            try:
                if o.data is None and s.pending():
                    with self.lock:
                        frames = s.batch(BATCH_FRAMES, BATCH_BYTES, _frame_size)
                    if frames:
                        # (a lone frame's push carries the driver's pulls: a stream's pushes
                        # return at once, for the next batch)
                        carry = self.piggyback is not None and len(frames) == 1
                        pulls, attach = self.piggyback(o.dst, _frames_size(frames)) if carry else (None, None)
                        try:
                            sent, refs = with_refs(frames)
                            msg = pack((o.edge, self.incarnation, sent, s.committed, pulls), _frames_size(sent))
                            ref = self._peer(o).push.remote(msg, *refs)
                        except BaseException as e:
                            if attach is not None:
                                attach(e)
                            raise
                        upto = frames[-1][0] + 1
                        o.data = (self._future(ref, lambda: s.next_seq > upto or not s.room()), len(frames))
                        if attach is not None:
                            attach(o.data[0])
                if o.poll is None and o.data is None and s.uncommitted() and not s.pending():
                    ref = self._peer(o).push.remote(pack((o.edge, self.incarnation, [], s.committed, None), 0))
                    o.poll = self._future(ref, lambda: not s.room())
            except Exception as e:  # noqa: BLE001 - the peer is not there (yet): retry
                self._peer_failed(o, e)

    # ================================================================ cut edges in, pulled

    def _send_pulls(self, gw: HostGateway) -> None:
        """(The driver's part) one pull in flight per cut edge in, for what its local edge
        has room for; after the end of the stream, until the sender knows it committed."""
        now = time.monotonic()
        for i in self.ins.values():
            r = i.receiver
            if i.pull is not None or now < i.retry_at:
                continue
            if r.eos and i.reported >= r.expected:
                continue  # (done: the sender was told the end of its stream is committed)
            with self.lock:
                # (after the part's run ended, pulls only report the last commits)
                room = 0 if gw.closed else gw.free(i.local)
                reply = r.reply()
            if room <= 0 and reply[1] <= i.reported:
                continue  # (no room, no new commit to report: the pump comes back on an ack)
            try:
                if i.peer is None:
                    i.peer = ray.get_actor(agent_name(self.spec.run_id, i.src))
                call = i.peer.pull.remote(pack((i.edge, reply, max(room, 0), LONG_POLL if room > 0 else 0.0), 0))
                i.pull = call.future()
                i.pull.add_done_callback(lambda _f: self._wake())
            except Exception as e:  # noqa: BLE001 - the sending agent is not there (yet)
                i.peer = None
                i.retry_at = now + RETRY
                log.info("host %s: edge %d from %s: %s; retrying", self.key, i.edge, host_text(i.src), type(e).__name__)

    def _collect_pulls(self, gw: HostGateway) -> None:
        """Frames of the answered pulls into the local edges. Under the lock."""
        for i in self.ins.values():
            fut = i.pull
            if fut is None or not fut.done():
                continue
            i.pull = None
            try:
                status, inc, frames, asked = unpack(fut.result())
            except Exception as e:  # noqa: BLE001 - the sending agent died or restarts: retry
                i.peer = None
                i.retry_at = time.monotonic() + RETRY
                log.info("host %s: edge %d from %s: %s; retrying", self.key, i.edge, host_text(i.src), type(e).__name__)
                continue
            if status != "ok":
                continue
            i.reported = max(i.reported, asked[1])
            if gw.closed:
                continue
            try:
                took = i.receiver.on_batch(inc, frames, lambda f: gw.room(i.local))
            except StaleIncarnation:
                continue
            for f in took:
                gw.send_cut(i.local, f)
            if took:
                gw.flush()

    def _future(self, ref: Any, urgent: Optional[Callable[[], bool]] = None) -> Future:
        """A call's future, waking the pump when it is done (only if ``urgent()`` says so: a
        push's reply matters now only when frames wait for it, newer than those it carried or
        held back by a full window; else the pump takes it on its next turn, which the next
        frame starts, instead of competing with this frame's hop for the cores)."""
        fut = ref.future()
        if urgent is None:
            fut.add_done_callback(lambda _f: self._wake())
        else:
            fut.add_done_callback(lambda _f: self._wake() if urgent() else None)
        return fut

    def _wake(self) -> None:
        gw = self.gw
        if gw is not None:
            gw.interrupt()

    def _collect_replies(self) -> None:
        """Replies of the pushes and polls that are done. Under the lock."""
        for o in self.outs.values():
            for which in ("data", "poll"):
                slot = getattr(o, which)
                if slot is None:
                    continue
                fut = slot[0] if which == "data" else slot
                if not fut.done():
                    continue
                setattr(o, which, None)
                self.released.append(fut)  # (a push's answer may hold a frame pulled with it)
                try:
                    reply = unpack(fut.result())
                except Exception as e:  # noqa: BLE001 - the receiving agent died or restarts
                    self._peer_failed(o, e)
                    continue
                if reply[0] == "stale":
                    raise StaleIncarnation(f"edge {o.edge}: the receiving host has seen a newer incarnation of this one")
                o.sender.on_reply(reply[1], took=(which == "data"))

    def _peer_failed(self, o: _Out, e: BaseException) -> None:
        log.info("host %s: edge %d to %s: %s; retrying", self.key, o.edge, host_text(o.dst), type(e).__name__)
        o.peer = None
        o.retry_at = time.monotonic() + RETRY

    # ================================================================ checkpoints

    def _books(self) -> Dict[str, Any]:
        """Every node's commit point, producers before consumers (a consumer's commit covers
        what its producer's commit relies on). In the arbiter thread, or after it ended."""
        sup = self.sup
        assert sup is not None
        arb = sup._arbiter
        assert arb is not None
        nodes: Dict[str, Any] = {}
        for name in sup.pipeline.order:
            w = arb.workers[name]
            if not arb.finished.is_set() and w.chan is not None:
                for msg in w.receive():  # commits reported but not read yet
                    arb._on_message(w, msg)
            w.sync_commit()
            r = w.restore
            nodes[name] = {
                "in_seqs": dict(r.in_seqs),
                "out_next": dict(r.out_next),
                "snapshot": r.snapshot,
                "source_position": r.source_position,
            }
        return nodes

    def _checkpoint(self, arb: Any) -> None:
        """Store the commit points with the state actor, then report them to the senders."""
        fut: Future = Future()
        if not arb.finished.is_set():
            arb.post(CallInLoop(self._books, fut))
        while True:
            if arb.finished.is_set() and not fut.done():
                # (the run ended: nothing changes the books any more, and a command posted
                # as it ended is never read)
                nodes = self._books()
                break
            try:
                nodes = fut.result(timeout=0.05)
                break
            except FutureTimeout:
                continue
        part = self.spec.part
        consumer = {local: part.edges[local][1] for local in part.cut_in}
        producer = {local: part.edges[local][0] for local in part.cut_out}
        cut_in = {}
        for local, (g, _src) in part.cut_in.items():
            seq = nodes[consumer[local]]["in_seqs"].get(local)
            cut_in[local] = self.start_positions.get(local, 0) if seq is None else seq + 1
        cut_out = {}
        for local in part.cut_out:
            nxt = nodes[producer[local]]["out_next"].get(local)
            cut_out[local] = self.start_positions.get(local, 0) if nxt is None else nxt
        plain = {n: {k: v for k, v in e.items() if k != "snapshot"} for n, e in nodes.items()}
        books = {"nodes": plain, "cut_in": cut_in, "cut_out": cut_out}
        if books == self.last_checkpoint:
            return
        send_nodes = {}
        for n, e in nodes.items():
            e = dict(e)
            if self._saved_snapshots.get(n) is e["snapshot"]:
                e["snapshot"] = NO_SNAPSHOT_CHANGE
            send_nodes[n] = e
        ok = self.in_driver or ray.get(
            self.state.save.remote(self.key, self.incarnation, {"nodes": send_nodes, "cut_in": cut_in, "cut_out": cut_out})
        )
        if not ok:
            raise StaleIncarnation(f"host {self.key}: the state actor knows a newer incarnation than {self.incarnation}")
        for n, e in nodes.items():
            self._saved_snapshots[n] = e["snapshot"]
        self.last_checkpoint = books
        self.checkpoints += 1
        with self.lock:
            for local, (g, _src) in part.cut_in.items():
                self.receivers[g][1].set_committed(cut_in[local])
            self.cond.notify_all()

    # ================================================================ calls from others

    def push(
        self,
        edge: int,
        sender_inc: int,
        frames: Any,
        known_committed: int,
        pulls: Optional[Dict[int, Tuple[Reply, int]]] = None,
        values: Sequence[Any] = (),
    ) -> Tuple[Any, ...]:
        """Frames of a cut edge into this host (as :func:`with_refs` made them, ``values``
        the arrays of its object refs as Ray hands them over; or none: a commit poll,
        answered when the commit passes ``known_committed`` or after LONG_POLL). Returns
        ``("ok", reply, pulled)`` or ``("stale", reply, pulled)``.

        ``pulls``: the pulls of the pushing (driver) process from this host, carried by its
        push (edge -> its receiver's reply, the frames it takes at most and the seconds it
        waits for them): each is served as :meth:`pull` serves one, waiting at most that
        long for frames (PIGGY_WAIT, more for a big lone frame), so that a frame
        that comes back from this host within that time needs no Ray call of its own.
        ``pulled``: edge -> what :meth:`pull` would have returned (empty when the push was
        refused)."""
        status, reply = self._push(edge, sender_inc, with_values(frames, values), known_committed)
        if pulls and status == "ok":
            wait = max(w for _r, _n, w in pulls.values())
            pulled = self._pull_many({e: (r, n) for e, (r, n, _w) in pulls.items()}, wait)
        else:
            pulled = {}
        return status, reply, pulled

    def _push(self, edge: int, sender_inc: int, frames: List[Frame], known_committed: int) -> Tuple[str, Reply]:
        local, rec = self.receivers[edge]
        if not self.ready.wait(30.0) or self.error is not None:
            return ("ok", rec.reply())
        deadline = time.monotonic() + LONG_POLL
        with self.cond:
            try:
                if not frames:
                    rec.check_sender(sender_inc)
                    while rec.committed <= known_committed and not self.stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self.cond.wait(left)
                    return ("ok", rec.reply())
                rest = list(frames)
                while True:
                    gw = self.gw
                    if gw is None or gw.closed:
                        break
                    took = rec.on_batch(sender_inc, rest, lambda f: gw.room(local))
                    for f in took:
                        gw.send_cut(local, f)
                    if took:
                        gw.flush()
                    rest = [f for f in rest if f[0] >= rec.expected]
                    if not rest or rest[0][0] != rec.expected:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0 or self.stopping:
                        break
                    self.cond.wait(min(left, 0.005))
            except StaleIncarnation:
                return ("stale", rec.reply())
            return ("ok", rec.reply())

    def pull(self, edge: int, reply: Reply, max_frames: int, wait: float) -> Tuple[Any, int, Any, Reply]:
        """The driver's end of a cut edge out of this host (the caller's, or its host's part)
        asks for up to ``max_frames`` frames from its expected on (``reply``: what its
        receiver has and committed). Returns ``(status, our incarnation, frames, reply)``
        (a big array in the frames is the view of shared memory
        the sender retains, which Ray copies into this node's object store as the call's
        return value, owned by the caller: the caller's Ray fetches it with the answer,
        without asking another process where it is); waits up to ``wait`` seconds for
        frames when there are none."""
        return self._pull_many({edge: (reply, max_frames)}, wait)[edge]

    def _pull_many(self, pulls: Dict[int, Tuple[Reply, int]], wait: float) -> Dict[int, Tuple[Any, int, Any, Reply]]:
        """:meth:`pull` for several edges at once: waits until one of them has frames."""
        deadline = time.monotonic() + wait
        self.ready.wait(30.0)
        out: Dict[int, Tuple[Any, int, Any, Reply]] = {}
        with self.cond:
            asked: List[Tuple[int, EdgeSender, int, Reply]] = []
            for edge, (reply, max_frames) in pulls.items():
                o = self.outs[edge]
                s = o.sender
                full = not s.room()
                committed = s.committed
                if not s.on_reply(reply, took=True):
                    out[edge] = ("stale", self.incarnation, [], reply)
                    continue
                if (full and s.room()) or (o.held_back and s.committed > committed):
                    # (the pump takes more outputs now: the window has room, or views it
                    # retained were released; a commit alone it acks to the local producer
                    # on its next turn: waking it here would have it compete with the next
                    # frame's push for this process's GIL)
                    self._wake()
                asked.append((edge, s, max_frames, reply))
            while asked and not any(s.pending() and n > 0 for _e, s, n, _r in asked) and not self.stopping:
                left = deadline - time.monotonic()
                if left <= 0 or all(s.finished for _e, s, _n, _r in asked):
                    break
                self.cond.wait(left)
            for edge, s, n, reply in asked:
                frames = s.batch(n, BATCH_BYTES, _frame_size) if n > 0 else []
                out[edge] = ("ok", self.incarnation, frames, reply)
        return out

    def status(self) -> Dict[str, Any]:
        """This host's figures: the local run's status, the agent's incarnation, its Ray node,
        its cut edges."""
        sup = self.sup
        st: Dict[str, Any] = sup.status() if sup is not None else {"nodes": {}, "phase": "new"}
        arb = sup._arbiter if sup is not None else None
        st.update(
            host=self.key,
            incarnation=self.incarnation,
            resumed=self.resumed,
            agent_pid=os.getpid(),
            ray_node_id=ray.get_runtime_context().get_node_id(),
            error=self.error or (str(arb.error) if arb is not None and arb.error is not None else None),
            # the part's own error (NodeError, NodeInitError, ...), for the driver to raise as is
            error_obj=_portable(arb.error) if arb is not None and arb.error is not None else None,
            finished=bool(arb is not None and arb.finished.is_set()),
            unhealthy=sup.unhealthy_workers() if sup is not None else [],
            checkpoints=self.checkpoints,
            cut_out={
                g: {
                    "next": o.sender.next_seq, "committed": o.sender.committed, "resent": o.sender.resent,
                    "stored": o.stored, "lent": o.lent,
                }  # fmt: skip
                for g, o in self.outs.items()
            },
            cut_in={
                g: {"expected": r.expected, "committed": r.committed, "duplicates": r.duplicates, "stale": r.stale}
                for g, (_l, r) in self.receivers.items()
            },
        )
        if sup is not None and arb is not None:
            st["report"] = {name: w.report() for name, w in arb.workers.items()} if arb.finished.is_set() else None
        return st

    def logs(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """The recent lines of this host's nodes (the control socket's ``logs``)."""
        sup = self.sup
        arb = sup._arbiter if sup is not None else None
        if arb is None:
            return {"ok": True, "lines": [], "cursor": {}, "lost": {}}
        out = arb._logs(req)
        for line in out.get("lines", []):
            line["host"] = self.key
        return out

    def drain(self) -> None:
        """Stop the sources and drain (the cut edges into the host end when their senders
        drain)."""
        if self.sup is not None:
            self.sup.stop()

    def abort(self) -> None:
        if self.sup is not None:
            self.sup.kill()

    def shutdown(self, timeout: float) -> bool:
        """End the local run (abort it if it is still running after ``timeout``) and stop
        the pump. True when everything was cleaned up."""
        sup = self.sup
        done = True
        if sup is not None:
            if not sup.join(timeout):
                sup.kill()
                done = sup.join(timeout)
        self.stopping = True
        self._wake()
        with self.cond:
            self.cond.notify_all()
        return done


def _portable(err: BaseException) -> Optional[BaseException]:
    """``err`` when it survives a round trip through pickle (it crosses to the driver), else
    None (the driver then reports its text)."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return None
    return err


class _Stored:
    """The value of a frame a host pushes on (a big array, or what holds big arrays), put
    into this process's Ray object store once, straight from the shared-memory chunk the
    pump took it from (one copy, where a private copy and then Ray's own copy of a call
    argument made two). It is what the sender retains until the receiving host commits the
    frame, and every push of it (a replay too) passes the reference as an argument of the
    call (Ray brings the object to the receiver's node before the call runs, and hands the
    agent a zero-copy array of it). The object lives while the sender retains it or a
    receiver still holds the reference."""

    __slots__ = ("ref", "nbytes")

    def __init__(self, ref: Any, nbytes: int) -> None:
        self.ref, self.nbytes = ref, nbytes


class _Arg:
    """In a push's frames: the value is the push's ``i``-th array argument (:func:`with_refs`)."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self) -> Any:
        return (_Arg, (self.i,))


def _frame_size(f: Frame) -> int:
    v = f[2]
    if type(v) is _Stored:
        return v.nbytes + 64
    if type(v) is np.ndarray:
        return v.nbytes + 64
    if isinstance(v, (bytes, bytearray, memoryview)):
        return len(v) + 64
    return 256


def _frames_size(frames: Sequence[Frame]) -> int:
    return sum(_frame_size(f) for f in frames)


def pack(msg: Tuple[Any, ...], nbytes: int) -> Any:
    """A call's arguments, or its answer, as Ray carries them: pickled here into one bytes
    object when its frames come to at most PACK_BYTES (``nbytes``), else the tuple as it is
    (its arrays then go through Ray's object store out of band, not copied into a pickle).
    Ray serializes one bytes object for much less than a tuple of headers, dicts and a
    list of frames: a lone 4 KiB frame's push and its answer took ~0.9 ms less here."""
    if nbytes > PACK_BYTES:
        return msg
    try:
        return pickle.dumps(msg, protocol=5)
    except Exception:  # (what only cloudpickle can pickle, Ray pickles)
        return msg


def unpack(msg: Any) -> Tuple[Any, ...]:
    """Inverse of :func:`pack`."""
    return pickle.loads(msg) if type(msg) is bytes else msg


def with_refs(frames: List[Frame]) -> Tuple[List[Frame], List[Any]]:
    """A push's frames with each :class:`_Stored` value replaced by its index among the
    call's extra arguments, and those arguments (the object refs): Ray moves an argument's
    object to the receiver's node and hands over its value (no borrowed reference for the
    agent to fetch, the frames small enough to pickle)."""
    refs: List[Any] = []
    if not any(type(f[2]) is _Stored for f in frames):
        return frames, refs
    out: List[Frame] = []
    for f in frames:
        v = f[2]
        if type(v) is _Stored:
            out.append((f[0], f[1], _Arg(len(refs)), f[3], f[4], f[5]))
            refs.append(v.ref)
        else:
            out.append(f)
    return out, refs


def with_values(frames: List[Frame], values: Sequence[Any]) -> List[Frame]:
    """Inverse of :func:`with_refs`, given the values of the push's extra arguments."""
    if not values:
        return frames
    return [(f[0], f[1], values[f[2].i], f[3], f[4], f[5]) if type(f[2]) is _Arg else f for f in frames]


@ray.remote(max_restarts=-1, max_concurrency=64)
class HostAgent:
    """One host's agent (see the module). Created by the driver, placed by the node label
    ``remotemedia.host``; restarted by Ray when it dies."""

    def __init__(self, spec: HostSpec) -> None:
        self._a = _Agent(spec)

    def ready(self, timeout: float) -> Any:
        """Wait until the part's run started; None, or its start error (the exception itself
        when it pickles, else its text)."""
        self._a.ready.wait(timeout)
        if not self._a.ready.is_set():
            return f"host {self._a.key}: the part's run did not start within {timeout:g} s"
        return self._a.start_error or self._a.error

    def push(self, msg: Any, *values: Any) -> Any:
        """:meth:`_Agent.push`: ``msg`` its arguments but ``values`` (see :func:`pack`),
        ``values`` the arrays of the frames' object refs (see :func:`with_refs`)."""
        edge, sender_inc, frames, known_committed, pulls = unpack(msg)
        status, reply, pulled = self._a.push(edge, sender_inc, frames, known_committed, pulls, values)
        return pack((status, reply, pulled), sum(_frames_size(p[2]) for p in pulled.values()))

    def pull(self, msg: Any) -> Any:
        """:meth:`_Agent.pull`: ``msg`` its arguments (see :func:`pack`)."""
        answer = self._a.pull(*unpack(msg))
        return pack(answer, _frames_size(answer[2]))

    def status(self) -> Dict[str, Any]:
        return self._a.status()

    def logs(self, req: Dict[str, Any]) -> Dict[str, Any]:
        return self._a.logs(req)

    def drain(self) -> None:
        self._a.drain()

    def abort(self) -> None:
        self._a.abort()

    def shutdown(self, timeout: float) -> bool:
        return self._a.shutdown(timeout)

    def pid(self) -> int:
        return os.getpid()
