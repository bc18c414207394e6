"""The inline executor: a pipeline run in the caller's process, on the caller's own nodes.

``Pipeline(nodes).run(inputs, executor="inline")`` (also ``execute_pipeline(...,
executor="inline")``, ``use_rust=False``, and ``remotemedia-supervisor start --inline``) runs
the very Node objects you built: nothing is pickled, no worker, no shared memory. It is the
mode to reach for to debug a node with ``pdb`` / breakpoints, or to unit-test nodes fast
(like Ray's local mode or Dask's synchronous scheduler); state your nodes keep (counters, a
loaded model) is visible on your objects afterwards.

The node contract is the worker's (``supervisor.worker.Runner``):

* ``initialize()`` on each node in topological order before the first frame; ``cleanup()``
  on each at the end, also after an error (a failing ``initialize()`` raises NodeInitError
  after ``cleanup()`` of the nodes initialized before it).
* ``process(data)`` may return a value, ``None`` for no output, a generator or an async
  generator of several outputs, or be ``async def``; ``Frame(value, stream_id)`` sets a
  stream id, which outputs inherit from their input; ``current_frame`` is set during
  ``process()`` (seq per edge, origin, stream id, times, upstream name).
* Source nodes' ``generate()`` drive the stream (several sources and the inputs take turns,
  one item each); every output of a node goes to each of its consumers (the same object:
  fan-out does not copy), and a node with several inputs takes frames in arrival order.
* ``flush()`` at end of stream, in topological order; its outputs go downstream.
* A frame is carried depth first: it goes through the whole graph before the next input is
  read. Outputs come back ordered by the input (or source item) they derive from, like the
  multiprocess runtime's.
* An exception in ``process()`` / ``generate()`` / ``flush()`` raises NodeError (node name,
  this process's pid, the frame's seq) whose ``__cause__`` and ``original`` are the real
  exception with its real traceback; ``on_error="skip"`` (run-wide or in a node's
  ``options``) logs it and drops the frame instead.

Options: ``on_error`` and ``name`` apply. The supervision options (restarts, timeouts,
memory limits, queues, ...) have nothing to act on in one process: given to the run they are
refused with an error; in a node's ``options`` (where they configure the node for
multiprocess runs) they are ignored, except ``on_error``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import traceback
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from remotemedia.errors import ExecutorOptionError, NodeError, NodeInitError, NodeTypeError, SupervisorError
from remotemedia.frames import Frame, FrameInfo
from remotemedia.node import ON_ERROR_POLICIES, Node, Source, iter_generated, iter_outputs
from remotemedia.pipeline import INPUT, OUTPUT, Pipeline, as_pipeline

from .core import RunReport
from .stats import LatencyStats

__all__ = ["run_inline", "resolve_executor", "EXECUTORS", "INLINE_OPTIONS"]

log = logging.getLogger("remotemedia.inline")

#: The executors of ``Pipeline.run`` / ``execute_pipeline``.
EXECUTORS = ("multiprocess", "inline")
#: Run options the inline executor honours (every other Supervisor option is refused).
INLINE_OPTIONS = ("on_error", "name")


def resolve_executor(executor: Optional[str] = None, use_rust: Optional[bool] = None) -> str:
    """The executor chosen by the ``executor=`` / ``use_rust=`` keywords: ``"multiprocess"``
    (the default; its transport is the Rust bridge, so ``use_rust=True`` means it) or
    ``"inline"`` (``use_rust=False``). Raises ExecutorOptionError (a ValueError) for an unknown
    executor or a contradiction such as ``use_rust=True, executor="inline"``."""
    if executor is not None and executor not in EXECUTORS:
        raise ExecutorOptionError(
            f"executor must be one of {', '.join(repr(e) for e in EXECUTORS)}, got {executor!r}: "
            "'multiprocess' runs each node in a supervised worker process, 'inline' runs the "
            "pipeline in this process on your own node objects"
        )
    if use_rust is None:
        return executor or "multiprocess"
    if not isinstance(use_rust, bool):
        raise ExecutorOptionError(f"use_rust must be True or False, got {use_rust!r}")
    implied = "multiprocess" if use_rust else "inline"
    if executor is not None and executor != implied:
        raise ExecutorOptionError(
            f"use_rust={use_rust} contradicts executor={executor!r}: use_rust=True is the multiprocess "
            "runtime (its transport is the Rust bridge), use_rust=False the inline executor; give one of the two"
        )
    return implied


def _check_options(options: Dict[str, Any]) -> str:
    unknown = sorted(set(options) - set(INLINE_OPTIONS))
    if unknown:
        raise ExecutorOptionError(
            f"option(s) {', '.join(unknown)} do not apply to the inline executor (one process, no workers to "
            f"supervise, restart, time out or limit); it accepts: {', '.join(INLINE_OPTIONS)}"
        )
    on_error = options.get("on_error", "raise")
    if on_error not in ON_ERROR_POLICIES:
        raise ExecutorOptionError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
    return on_error


class _Failed(Exception):
    """Carries a node's NodeError (or what ``on_output`` raised) up through the nodes
    upstream of it, whose own error handling must not catch it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Stage:
    """One node of the inline run and its books."""

    __slots__ = ("node", "on_error", "consumers", "seq_in", "seq_out", "frames_in", "frames_out", "errors",
                 "latency", "origin", "stream", "created", "excluded_ns", "initialized")

    def __init__(self, node: Node, on_error: str, consumers: List[str]) -> None:
        self.node = node
        self.on_error = on_error
        self.consumers = consumers
        self.seq_in: Dict[str, int] = defaultdict(int)  # upstream name -> next seq on that edge
        self.seq_out: Dict[str, int] = defaultdict(int)
        self.frames_in = 0
        self.frames_out = 0
        self.errors = 0
        self.latency = LatencyStats()
        self.origin = 0  # of the frame being (or last) processed: flush() outputs inherit it
        self.stream = 0
        self.created = 0
        self.excluded_ns = 0  # time spent downstream while this node emitted (not its own)
        self.initialized = False


class _InlineRun:
    def __init__(
        self,
        pipeline: Pipeline,
        on_error: str,
        on_output: Optional[Callable[[Any, FrameInfo], None]],
        stop: Optional[threading.Event],
    ) -> None:
        self.pipeline = pipeline
        self.on_output = on_output
        self.stages: Dict[str, _Stage] = {}
        for name in pipeline.order:
            node = pipeline.node(name)
            opt = (node.options or {}).get("on_error") or on_error
            if opt not in ON_ERROR_POLICIES:
                raise ExecutorOptionError(f"node {name!r}: on_error must be one of {ON_ERROR_POLICIES}, got {opt!r}")
            self.stages[name] = _Stage(node, opt, pipeline.downstream(name))
        self.input_nodes = [n.name for n in pipeline.input_nodes]
        self.outputs: List[Tuple[int, int, Any]] = []
        self.output_seq: Dict[str, int] = defaultdict(int)
        self.n_out = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.stop = stop
        self.stopped = False

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        for name, st in self.stages.items():
            try:
                st.node.initialize()
            except Exception as e:
                err = NodeInitError(name, f"initialize failed: {e}", pid=os.getpid(), exc_type=_type_name(e), original=e)
                err.traceback = _format(e)
                raise err from e
            st.initialized = True

    def cleanup(self) -> None:
        for name, st in self.stages.items():
            if not st.initialized:
                continue
            st.initialized = False
            try:
                st.node.cleanup()
            except Exception:
                log.exception("cleanup() of node %s raised", name)
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    # ------------------------------------------------------------------ frames

    def deliver(self, src: str, dst: str, value: Any, origin: int, stream: int, created: int) -> None:
        """Hand one frame from ``src`` to ``dst`` (a node, or OUTPUT: the caller)."""
        if dst == OUTPUT:
            seq = self.output_seq[src]
            self.output_seq[src] = seq + 1
            if self.on_output is not None:
                try:
                    self.on_output(value, FrameInfo(seq, origin, stream, created, time.monotonic_ns(), src))
                except Exception as e:  # the caller's error, not the node's
                    raise _Failed(e) from None
            else:
                self.outputs.append((origin, self.n_out, value))
            self.n_out += 1
            return
        st = self.stages[dst]
        seq = st.seq_in[src]
        st.seq_in[src] = seq + 1
        st.frames_in += 1
        st.origin, st.stream, st.created = origin, stream, created
        node = st.node
        node._remotemedia_frame = (seq, origin, stream, created, time.monotonic_ns(), src)
        excluded0 = st.excluded_ns
        t0 = time.perf_counter_ns()
        try:
            self.emit_result(dst, st, node.process(value))
        except _Failed:
            raise
        except Exception as e:
            self.failed(dst, st, e, seq)
        finally:
            node._remotemedia_frame = None
            st.latency.add(max(0, time.perf_counter_ns() - t0 - (st.excluded_ns - excluded0)))
            st.excluded_ns = excluded0

    def emit(self, name: str, st: _Stage, value: Any) -> None:
        if type(value) is Frame:
            value, stream = value.value, (value.stream_id if value.stream_id is not None else st.stream)
        else:
            stream = st.stream
        st.frames_out += 1
        t0 = time.perf_counter_ns()
        for dst in st.consumers:
            self.deliver(name, dst, value, st.origin, stream, st.created)
        st.excluded_ns += time.perf_counter_ns() - t0

    def emit_result(self, name: str, st: _Stage, result: Any) -> None:
        if result is None:
            return
        for item in iter_outputs(result, self.event_loop):
            self.emit(name, st, item)

    def failed(self, name: str, st: _Stage, e: Exception, seq: Optional[int]) -> None:
        st.errors += 1
        if st.on_error == "skip":
            log.warning("node %s skipped frame %s: %s: %s", name, seq, _type_name(e), e)
            return
        err = NodeError(name, str(e), pid=os.getpid(), seq=seq, exc_type=_type_name(e), original=e)
        err.traceback = _format(e)
        err.__cause__ = e
        raise _Failed(err)

    # ------------------------------------------------------------------ the run

    def feeds(self, inputs: Optional[Iterator[Any]]) -> Iterator[Tuple[Optional[str], Any, int, int]]:
        """``(source name or None for an input, value, origin, perf_counter_ns before it was
        made)``: the inputs and the sources' items, one of each in turn."""
        turns: List[Tuple[Optional[str], Iterator[Any]]] = []
        if inputs is not None:
            turns.append((None, inputs))
        for name, st in self.stages.items():
            if isinstance(st.node, Source):
                turns.append((name, self.generator(name, st)))
        position: Dict[Optional[str], int] = defaultdict(int)
        while turns:
            for turn in list(turns):
                if self.stop is not None and self.stop.is_set():
                    self.stopped = True
                    for _, it in turns:  # (closing generate() runs its finally blocks)
                        close = getattr(it, "close", None)
                        if callable(close):
                            close()
                    return
                key, it = turn
                t0 = time.perf_counter_ns()
                try:
                    value = next(it)
                except StopIteration:
                    turns.remove(turn)
                    continue
                except _Failed:
                    raise
                except Exception as e:
                    if key is None:
                        raise SupervisorError(f"the inputs iterator raised {type(e).__name__}: {e}") from e
                    st = self.stages[key]
                    st.errors += 1
                    err = NodeError(key, str(e), pid=os.getpid(), exc_type=_type_name(e), original=e)
                    err.traceback = _format(e)
                    raise err from e
                origin = position[key]
                position[key] = origin + 1
                yield key, value, origin, t0

    def generator(self, name: str, st: _Stage) -> Iterator[Any]:
        return iter_generated(st.node.generate(), self.event_loop)

    def run(self, inputs: Optional[Iterable[Any]]) -> None:
        it = iter(inputs) if inputs is not None else None
        for key, value, origin, t0 in self.feeds(it):
            created = time.monotonic_ns()
            if key is None:
                stream = 0
                if type(value) is Frame:
                    value, stream = value.value, value.stream_id or 0
                for dst in self.input_nodes:
                    self.deliver(INPUT, dst, value, origin, stream, created)
                continue
            st = self.stages[key]  # a source's item: emitted like a process() output
            st.frames_in += 1
            st.origin, st.stream, st.created = origin, 0, created
            excluded0 = st.excluded_ns
            if value is not None:
                self.emit(key, st, value)
            st.latency.add(max(0, time.perf_counter_ns() - t0 - (st.excluded_ns - excluded0)))
            st.excluded_ns = excluded0
        for name, st in self.stages.items():  # end of stream, upstream first
            flush = getattr(st.node, "flush", None)
            if not callable(flush):
                continue
            try:
                self.emit_result(name, st, flush())
            except _Failed:
                raise
            except Exception as e:
                self.failed(name, st, e, None)

    def node_stats(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for name, st in self.stages.items():
            s: Dict[str, Any] = {
                "frames_in": st.frames_in,
                "frames_out": st.frames_out,
                "errors": st.errors,
                "dead_letters": 0,
                "latency": st.latency.summary(),
                "state": "EXITED",
                "pid": os.getpid(),
                "restarts": 0,
                "exit_status": 0,
            }
            member_stats = getattr(st.node, "member_stats", None)  # a Group's members
            if callable(member_stats):
                s["members"] = member_stats()
            out[name] = s
        return out


def run_inline(
    pipeline_or_manifest: Any,
    inputs: Optional[Iterable[Any]] = None,
    on_output: Optional[Callable[[Any, FrameInfo], None]] = None,
    *,
    stop: Optional[threading.Event] = None,
    **options: Any,
) -> RunReport:
    """Run a pipeline in this process, on the caller's own node objects (nothing pickled), and
    return a :class:`~supervisor.core.RunReport` like :meth:`Supervisor.run`'s: the outputs
    ordered by the input they derive from, and per node ``frames_in``, ``frames_out``,
    ``errors``, ``restarts`` (0), ``latency`` (p50/p99 of ``process()``) and ``state``.

    Use it to debug a node with ``pdb`` (a breakpoint in ``process()`` just works) or to
    unit-test nodes fast, as Ray's local mode or Dask's synchronous scheduler are used. See the
    module documentation for the semantics; they are the multiprocess runtime's.

    Args:
        pipeline_or_manifest: a Pipeline, a list of nodes / manifest entries, a manifest.
        inputs: frames for the input nodes (any iterable, consumed one at a time), or None.
        on_output: ``on_output(value, frame_info)`` for each output as it comes, instead of
            collecting them.
        stop: once set, no further input or source item is taken; the stream then ends as
            usual (``flush()``, ``cleanup()``) and the report says ``stopped`` (the CLI sets it
            on SIGINT / SIGTERM, or when stdout is closed).
        options: ``on_error`` (``"raise"`` or ``"skip"``) and ``name``; the supervision
            options have nothing to act on here and are refused.

    Raises:
        NodeError: a node's ``process()``, ``generate()`` or ``flush()`` raised (its
            ``__cause__`` / ``original`` is that exception, with its traceback).
        NodeInitError: a node's ``initialize()`` raised.
        SupervisorError: inputs for a pipeline without input nodes; ExecutorOptionError (a
            ValueError too): an option that does not apply inline, a bad ``on_error``.
    """
    on_error = _check_options(options)
    pipeline = as_pipeline(pipeline_or_manifest, options.get("name"))
    if inputs is not None:
        if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
            raise NodeTypeError(f"inputs must be an iterable of frames (e.g. a list), got {type(inputs).__name__}")
        if not pipeline.input_nodes:
            raise SupervisorError(
                f"pipeline {pipeline.name!r} has no input nodes (every root is a Source); run it without inputs"
            )
    run = _InlineRun(pipeline, on_error, on_output, stop)
    started = time.monotonic()
    try:
        run.initialize()
        run.run(inputs)
    except _Failed as f:
        # Raised from here, not from deep inside the graph walk: the original exception (the
        # cause) keeps the traceback that points at the node's code.
        if isinstance(f.error, NodeError):
            raise f.error from f.error.__cause__
        raise f.error  # on_output's own exception
    finally:
        run.cleanup()
    run.outputs.sort(key=lambda t: (t[0], t[1]))
    return RunReport(
        options.get("name") or pipeline.name,
        time.monotonic() - started,
        [v for _, _, v in run.outputs],
        run.node_stats(),
        run.stopped,
        output_count=run.n_out,
    )


def _type_name(e: BaseException) -> str:
    mod = type(e).__module__
    return type(e).__qualname__ if mod == "builtins" else f"{mod}.{type(e).__qualname__}"


def _format(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))
