"""Cleanup-then-cloudpickle: how a configured Node instance crosses the process boundary.

::

    parent                                        worker
    ------                                        ------
    serialize_node(node)                          deserialize_node(blob)
      node.cleanup()        release handles         cloudpickle.loads(blob)
      cloudpickle -> bytes  (size-limited,          node.initialize()     reacquire handles
                             checked while writing)

Everything the node holds that pickles (a loaded model's weights, a lambda, a closure, a class
defined in the user's ``__main__`` or pipeline script) arrives intact. What does not pickle
(locks, sockets, sessions, CUDA handles) must be released in ``cleanup()`` and recreated in
``initialize()``; otherwise :class:`~remotemedia.errors.SerializationError` names the node, the
attribute path that failed (e.g. ``model.session._lock``), the reason and the fix.

Example::

    >>> from remotemedia.nodes import MapNode
    >>> blob = serialize_node(MapNode(lambda x: x + 1, name="inc"))
    >>> deserialize_node(blob).process(1)
    2
"""

from __future__ import annotations

import io
import pickle
import time
from typing import Any, Iterator, List, Optional, Tuple

import cloudpickle

from .errors import NodeTypeError, SerializationError

__all__ = ["DEFAULT_MAX_SIZE", "serialize_node", "deserialize_node", "find_unpicklable"]

#: Default limit of a pickled node, in bytes (100 MB).
DEFAULT_MAX_SIZE = 100 * 1024 * 1024

_FIX = (
    "release it in cleanup() (e.g. set the attribute to None) and recreate it in initialize(), "
    "which runs in the worker after unpickling"
)


class _SizeExceeded(Exception):
    pass


class _LimitedWriter(io.RawIOBase):
    """A sink that stops the pickler as soon as the limit is crossed."""

    def __init__(self, limit: Optional[int], keep: bool = True) -> None:
        self.limit = limit
        self.size = 0
        self.parts: List[bytes] = []
        self.keep = keep

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        # The pickler also hands over pickle.PickleBuffer objects (large numpy arrays).
        n = memoryview(b).nbytes
        self.size += n
        if self.limit is not None and self.size > self.limit:
            raise _SizeExceeded()
        if self.keep:
            self.parts.append(bytes(b))
        return n


def _dumps(obj: Any, limit: Optional[int], keep: bool = True) -> Tuple[bytes, int]:
    w = _LimitedWriter(limit, keep)
    cloudpickle.CloudPickler(w, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return b"".join(w.parts), w.size


def _children(obj: Any) -> Iterator[Tuple[str, Any]]:
    """The parts a pickler would recurse into, with their path suffixes."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (f".{k}" if isinstance(k, str) and k.isidentifier() else f"[{k!r}]"), v
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            yield f"[{i}]", v
        return
    state: Any = None
    getstate = getattr(obj, "__getstate__", None)
    if callable(getstate):
        try:
            state = getstate()
        except Exception:
            state = None
    if state is None:
        state = getattr(obj, "__dict__", None)
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        # (dict state, slots state)
        merged = dict(state[0] or {})
        merged.update(state[1])
        state = merged
    if isinstance(state, dict):
        for k, v in state.items():
            yield (f".{k}" if isinstance(k, str) and k.isidentifier() else f"[{k!r}]"), v
    elif state is not None and state is not obj:
        yield ".__getstate__()", state


def _pickle_error(obj: Any) -> Optional[BaseException]:
    try:
        _dumps(obj, None, keep=False)
        return None
    except RecursionError as e:
        return e
    except Exception as e:
        return e


def find_unpicklable(obj: Any, path: str = "", depth: int = 0, budget: Optional[List[float]] = None) -> Tuple[str, BaseException]:
    """Locate the deepest attribute of ``obj`` that fails to pickle.

    Returns ``(path, error)``, ``path`` relative to ``obj`` (``""`` when ``obj`` itself fails
    without a failing part). The search is bounded in depth and time.
    """
    if budget is None:
        budget = [time.monotonic() + 1.0]
    err = _pickle_error(obj)
    if err is None:
        raise ValueError("object pickles fine")
    if depth >= 12 or time.monotonic() > budget[0]:
        return path, err
    for suffix, child in _children(obj):
        if child is obj:
            continue
        if _pickle_error(child) is not None:
            return find_unpicklable(child, path + suffix, depth + 1, budget)
    return path, err


def _largest_parts(obj: Any, limit: int) -> str:
    sizes = []
    for suffix, child in _children(obj):
        try:
            _, n = _dumps(child, limit + 1, keep=False)
        except _SizeExceeded:
            n = limit + 1
        except Exception:
            continue
        sizes.append((n, suffix.lstrip(".")))
    sizes.sort(reverse=True)
    return ", ".join(f"{name} ({n / 1e6:.1f} MB{'+' if n > limit else ''})" for n, name in sizes[:3])


def serialize_node(node: Any, max_size: Optional[int] = DEFAULT_MAX_SIZE, call_cleanup: bool = True) -> bytes:
    """``node.cleanup()`` then cloudpickle; returns the bytes for a worker.

    Args:
        node: a :class:`~remotemedia.Node` instance.
        max_size: refuse nodes larger than this many bytes (checked while pickling, so an
            oversized node fails fast without building the whole blob). ``None``: no limit.
        call_cleanup: call ``node.cleanup()`` first (the contract); tests may disable it.

    Raises:
        SerializationError: cleanup() raised, an attribute cannot be pickled, or the node is
            larger than ``max_size``.
    """
    from .node import Node

    if not isinstance(node, Node):
        raise NodeTypeError(f"serialize_node expects a Node instance, got {type(node).__name__}")
    name = getattr(node, "name", type(node).__name__)
    if call_cleanup:
        try:
            node.cleanup()
        except Exception as e:
            raise SerializationError(
                name,
                f"cleanup() raised {type(e).__name__}: {e}",
                "make cleanup() safe to call on a node that was configured but never initialized",
            ) from e
    try:
        blob, _ = _dumps(node, max_size)
        return blob
    except _SizeExceeded:
        assert max_size is not None
        raise SerializationError(
            name,
            f"the pickled node exceeds the size limit of {max_size / 1e6:.1f} MB "
            f"(largest attributes: {_largest_parts(node, max_size) or 'n/a'})",
            "load large weights in initialize() (from a file or model hub) instead of pickling them, "
            "or raise the limit with Supervisor(..., max_node_size=<bytes>)",
        ) from None
    except Exception as e:
        path, err = find_unpicklable(node)
        attr = path.lstrip(".") or None
        reason = f"{type(err).__name__}: {err}"
        if attr:
            reason = f"attribute {attr!r} cannot be pickled ({reason})"
            fix = f"{attr}: {_FIX}"
        elif _pickle_error(type(node)) is not None:
            # cloudpickle sends a class defined in __main__ / a script by value, with the
            # module globals its methods use
            reason = (
                f"class {type(node).__qualname__} cannot be pickled: a module-level object its methods "
                f"use does not pickle ({reason})"
            )
            fix = (
                "create that object inside the method or in initialize(), or move the class to an "
                "importable module (then it is pickled by reference)"
            )
        else:
            fix = f"the offending object: {_FIX}"
        raise SerializationError(name, reason, fix, attr) from e


def deserialize_node(blob: bytes, initialize: bool = True) -> Any:
    """cloudpickle.loads then ``initialize()`` (the worker side of :func:`serialize_node`).

    Raises:
        SerializationError: the blob does not unpickle (missing module, version mismatch).
        Whatever ``initialize()`` raises, unchanged (the worker reports it as NodeInitError).
    """
    try:
        node = cloudpickle.loads(blob)
    except Exception as e:
        raise SerializationError(
            "unknown",
            f"unpickling failed: {type(e).__name__}: {e}",
            "the worker must import the same modules and package versions as the parent; "
            "classes defined in an importable module are pickled by reference",
        ) from e
    if initialize:
        node.initialize()
    return node
