"""The Node contract: ``initialize()`` / ``process(data)`` / ``cleanup()``.

A node is configured in the parent process (load a model, capture a closure, fill a lookup
table), then handed to the runtime. The supervisor calls ``cleanup()`` on it, cloudpickles it,
and the worker process unpickles it and calls ``initialize()`` before the first frame::

    parent:  node = MyNode(threshold=0.5); node.model = load()     # configured state
             node.cleanup(); blob = cloudpickle.dumps(node)         # release handles
    worker:  node = cloudpickle.loads(blob); node.initialize()      # reacquire them
             for frame in inputs: outputs = node.process(frame)
             node.cleanup()                                        # at end of stream

``process(data)`` may return one value (any value, a list included), ``None`` for no output,
or be a generator / async generator that yields several outputs; ``async def process`` is
awaited. A :class:`Source` has no input: its ``generate()`` yields the frames.

Example::

    from remotemedia import Node, Pipeline

    class Scale(Node):
        def __init__(self, factor: float, **kw):
            super().__init__(**kw)
            self.factor = factor

        def process(self, data):
            return data * self.factor

    Pipeline([Scale(2.0), Scale(10.0)]).run([1, 2, 3])   # -> [20.0, 40.0, 60.0]
"""

from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

from .errors import InvalidNodeNameError, MissingSuperInitError, NodeTypeError
from .frames import FrameInfo
from .options import NODE_KEYS, ON_ERROR_POLICIES, QUEUE_POLICIES, RESTART_POLICIES, check_node_keys

__all__ = [
    "Node",
    "Source",
    "NodeOptions",
    "check_node_name",
    "NODE_NAME_RULE",
    "RESTART_POLICIES",
    "ON_ERROR_POLICIES",
    "QUEUE_POLICIES",
]


# A node name ends up in file names (dead letters), a memfd name (at most 249 bytes) and a
# command line, so: ASCII, no "/" or NUL, never "." or "..", and short. Dots, dashes and colons
# stay allowed for names like "asr.v2", "video-motion" or "cam:0".
_NODE_NAME_MAX = 100
_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,%d}" % (_NODE_NAME_MAX - 1))
#: The naming rule of nodes, as stated in errors.
NODE_NAME_RULE = (
    f"a node name is 1 to {_NODE_NAME_MAX} characters from A-Z, a-z, 0-9, '_', '.', '-' and ':', "
    "and starts with a letter, a digit or '_'"
)


def check_node_name(name: Any, origin: str) -> None:
    """Raise :class:`~remotemedia.errors.InvalidNodeNameError` unless ``name`` follows
    :data:`NODE_NAME_RULE`; ``origin`` says where the name came from (``"GainNode(name=...)"``,
    ``"manifest nodes[2].id"``)."""
    if not isinstance(name, str) or _NODE_NAME_RE.fullmatch(name) is None:
        raise InvalidNodeNameError(name, origin, NODE_NAME_RULE)


# Set by Node.__init__; missing when a subclass's __init__ skipped super().__init__().
_BASE_ATTRS = frozenset(("name", "config", "options", "_auto_name"))


def missing_super_init(node: Any) -> Optional[MissingSuperInitError]:
    """The error for a node whose class never ran ``Node.__init__`` (None when it did)."""
    if _BASE_ATTRS <= node.__dict__.keys():
        return None
    cls = type(node)
    # the __init__ that should have called super(): the first one defined below Node
    owner = next((c for c in cls.__mro__ if c is not Node and "__init__" in c.__dict__ and issubclass(c, Node)), cls)
    return MissingSuperInitError(
        owner.__qualname__,
        f"{cls.__qualname__} node was not set up by Node.__init__ (it has no name, config or options): "
        f"call super().__init__(**kwargs) at the start of {owner.__qualname__}.__init__ and pass it "
        "name= and options= when given",
    )


def iterate_async(loop: Any, agen: Any) -> Iterator[Any]:
    """Drive an async generator (an ``async def process``/``generate`` that yields) from
    synchronous code on ``loop``, one item at a time. Used by the worker and by Group."""
    while True:
        try:
            yield loop.run_until_complete(agen.__anext__())
        except StopAsyncIteration:
            return


def iter_outputs(result: Any, loop: Callable[[], Any]) -> Iterator[Any]:
    """The outputs of one ``process()`` / ``flush()`` result, whatever its form: a value, or the
    items of a generator or an async generator (an awaitable is awaited first); ``None`` is no
    output. ``loop()`` gives the event loop, asked for only by async results. The one reading
    of the node contract's return forms, used by the worker, the inline executor and Group."""
    if result is None:
        return
    if inspect.isawaitable(result):
        result = loop().run_until_complete(result)
    if inspect.isgenerator(result):
        items: Iterator[Any] = result
    elif inspect.isasyncgen(result):
        items = iterate_async(loop(), result)
    else:
        if result is not None:
            yield result
        return
    for item in items:
        if item is not None:
            yield item


def iter_generated(gen: Any, loop: Callable[[], Any]) -> Iterator[Any]:
    """A Source's ``generate()`` result as an iterator: a generator, an async generator (driven
    on ``loop()``) or any iterable."""
    if inspect.isasyncgen(gen):
        return iterate_async(loop(), gen)
    if not inspect.isgenerator(gen) and not hasattr(gen, "__next__"):
        return iter(gen)
    return gen


class NodeOptions(dict):
    """Per-node runtime options; a dict restricted to the per-node keys of the options table
    (:data:`remotemedia.options.NODE_KEYS`, also ``NodeOptions.KEYS``; the README lists them
    with their defaults). Unset keys fall back to the Supervisor's. Values are checked when a
    Supervisor resolves the node's options (:func:`remotemedia.options.resolve_node`).
    """

    KEYS = NODE_KEYS

    def __init__(self, node_name: str = "?", **options: Any) -> None:
        check_node_keys(node_name, options)
        super().__init__(**options)


class Node:
    """Base class of every pipeline stage.

    Args:
        name: unique name in the pipeline (default: the class name, suffixed when repeated).
        options: per-node runtime options (restart policy, timeouts, queue policy, ...), see
            :class:`NodeOptions`. They override the Supervisor-wide options for this node.
        **config: free configuration, kept in ``self.config`` and in manifests as ``params``.

    Subclasses override :meth:`process` and, when they hold resources that cannot be pickled
    (sessions, sockets, locks, GPU contexts), :meth:`initialize` and :meth:`cleanup`.

    Optional hooks:
        ``flush()``: called once at end of stream; its return value / yielded values are
            emitted like ``process`` outputs (for buffering nodes).
        ``snapshot()`` / ``restore(state)``: runtime state saved periodically and handed to a
            restarted worker.
    """

    # (seq, origin, stream_id, created_ns, sent_ns, source) of the frame being processed, set
    # by the worker; the FrameInfo is only built when a node asks for it.
    _remotemedia_frame: Optional[Tuple[int, int, int, int, int, str]] = None
    # ... or asked of the worker's frame loop, when it keeps that tuple itself (the bridge's
    # stage loop: no attribute set per frame)
    _remotemedia_frame_of: Optional[Callable[[], Optional[Tuple[int, int, int, int, int, str]]]] = None

    def _frame_raw(self) -> Optional[Tuple[int, int, int, int, int, str]]:
        raw = self._remotemedia_frame
        if raw is None:
            frame_of = self._remotemedia_frame_of
            if frame_of is not None:
                raw = frame_of()
        return raw

    @property
    def current_frame(self) -> Optional[FrameInfo]:
        """Header of the frame being processed (None outside ``process()``).

        Example::

            def process(self, data):
                if self.current_frame.stream_id == 1:
                    ...
        """
        raw = self._frame_raw()
        return None if raw is None else FrameInfo(*raw)

    @current_frame.setter
    def current_frame(self, value: Optional[FrameInfo]) -> None:
        self._remotemedia_frame = None if value is None else tuple(value)  # type: ignore[assignment]

    def __init__(self, name: Optional[str] = None, *, options: Optional[Dict[str, Any]] = None, **config: Any) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise NodeTypeError(f"Node name must be a non-empty string, got {name!r}")
        if name is not None:
            check_node_name(name, f"{type(self).__name__}(name=...)")
        self.name: str = name or type(self).__name__
        self._auto_name = name is None
        self.config: Dict[str, Any] = dict(config)
        self.options: NodeOptions = NodeOptions(self.name, **(options or {}))

    def __getattr__(self, attr: str) -> Any:
        # Only reached when normal lookup failed: say why the base attributes are missing.
        if attr in _BASE_ATTRS:
            err = missing_super_init(self)
            if err is not None:
                raise err
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}", name=attr, obj=self)

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        """Acquire resources. Runs in the worker, after unpickling, before the first frame."""

    def process(self, data: Any) -> Any:
        """Handle one input frame and return the output (``None``: no output)."""
        raise NotImplementedError(f"{type(self).__name__}.process() is not implemented")

    def cleanup(self) -> None:
        """Release resources. Runs before pickling (in the parent) and at the end of a run."""

    # ------------------------------------------------------------------ helpers

    def allocate(self, shape: Any, dtype: Any = "uint8") -> Any:
        """A writable numpy array for an output frame, in shared memory when running in a
        worker: fill it and return it (alone, as the whole output) and the frame is sent
        without any copy. Outside a worker (tests, in-process use) it is ``numpy.empty``.

        Do not touch the array after returning it: it now belongs to the consumer. Arrays
        allocated but not returned are given back after ``process()``.

        Example::

            class Render(Node):
                def process(self, data):
                    out = self.allocate((1080, 1920, 3), "uint8")
                    draw_into(out, data)        # writes straight into shared memory
                    return out
        """
        alloc = getattr(self, "_remotemedia_allocator", None)
        if alloc is None:
            import numpy as np

            return np.empty(shape, dtype)
        return alloc(shape, dtype)

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_remotemedia_allocator", None)  # bound to a worker's ports
        return state

    @property
    def logger(self) -> logging.Logger:
        """A logger named after the node (records are forwarded by the worker)."""
        return logging.getLogger(f"remotemedia.node.{self.name}")

    def to_manifest(self) -> Dict[str, Any]:
        """This node as a manifest v1 entry (its configured *state* is not included)."""
        from .registry import type_name_of

        entry: Dict[str, Any] = {"id": self.name, "node_type": type_name_of(type(self)), "params": dict(self.config)}
        if self.options:
            entry["options"] = dict(self.options)
        return entry

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


class Source(Node):
    """A node without input: :meth:`generate` yields the frames of the stream.

    ``generate`` may be a generator or an async generator. The stream ends when it returns
    (or when the supervisor is asked to stop, which closes the generator).

    Example::

        class Counter(Source):
            def __init__(self, n: int, **kw):
                super().__init__(**kw)
                self.n = n

            def generate(self):
                yield from range(self.n)
    """

    def generate(self) -> Iterator[Any]:
        """Yield the frames of the stream."""
        raise NotImplementedError(f"{type(self).__name__}.generate() is not implemented")

    def process(self, data: Any) -> Any:
        raise NodeTypeError(f"source {self.name!r} has no input; connect nothing into it")
