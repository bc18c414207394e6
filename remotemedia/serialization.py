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

import copyreg
import io
import pickle
import time
import types
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import cloudpickle

from .errors import NodeTypeError, SerializationError

__all__ = ["DEFAULT_MAX_SIZE", "serialize_node", "deserialize_node", "find_unpicklable", "node_fingerprint"]

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


def _code_with_filename(args: Tuple[Any, ...], filename: str) -> types.CodeType:
    """Unpickle a code object sent by value, with the file name it was compiled from."""
    return types.CodeType(*args).replace(co_filename=filename)


def _code_reduce(code: types.CodeType) -> Tuple[Any, Tuple[Any, ...]]:
    # cloudpickle writes co_filename as "<dynamic-code>" (for deterministic payloads), so a
    # worker's traceback through a class of a pipeline file or of __main__ would name no file
    # and show no source line. Keeping the real name lets linecache find the file (the worker
    # runs on the same host) and the traceback point at the user's file and line.
    ctor, args = cloudpickle.cloudpickle._code_reduce(code)
    return _code_with_filename, (args, code.co_filename)


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle, except that code sent by value keeps its file name (see _code_reduce)."""

    def __init__(self, file: Any, protocol: int) -> None:
        # One plain dict, not cloudpickle's ChainMap: the C pickler looks the table up for
        # every object, and a ChainMap lookup runs Python code (this halves the time of a
        # node of many small objects). Built per pickler so later copyreg entries count; set
        # before __init__, which is when the C pickler reads it.
        self.dispatch_table = {
            **copyreg.dispatch_table,
            **cloudpickle.CloudPickler._dispatch_table,
            types.CodeType: _code_reduce,
        }
        super().__init__(file, protocol=protocol)


def _dumps(obj: Any, limit: Optional[int], keep: bool = True) -> Tuple[bytes, int]:
    w = _LimitedWriter(limit, keep)
    _Pickler(w, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
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


#: Counts of the search's work, for tests: ``pickles`` (trial pickles), ``visited`` (objects
#: whose parts were examined). Reset by each :func:`find_unpicklable` call.
search_stats: Dict[str, int] = {"pickles": 0, "visited": 0}

#: Default time budget of :func:`find_unpicklable`, in seconds: an error message must not
#: wait long for a pinpointed path (read at each call, so a test can raise it).
SEARCH_BUDGET_S = 1.5

# Parts of these exact types always pickle: the search never tries them one by one.
_PLAIN = frozenset((int, float, bool, complex, str, bytes, type(None)))


def _pickle_error(obj: Any) -> Optional[BaseException]:
    search_stats["pickles"] += 1
    try:
        _dumps(obj, None, keep=False)
        return None
    except RecursionError as e:
        return e
    except Exception as e:
        return e


def find_unpicklable(
    obj: Any, path: str = "", error: Optional[BaseException] = None, budget_s: Optional[float] = None
) -> Tuple[str, BaseException]:
    """Locate the part of ``obj`` that fails to pickle: the nearest object on a path of failing
    parts none of whose own parts fail (e.g. the lock in ``model.session._lock``).

    Returns ``(path, error)``, ``path`` relative to ``obj`` (``""`` when ``obj`` itself fails
    without a failing part). ``error``: the error ``obj`` is already known to fail with (spares
    one pickle). Raises ValueError when ``obj`` pickles.

    Breadth first, each object examined once (so a reference cycle is not followed round and
    the path found is a shortest one). The failing parts of an object are found by bisection:
    its parts are pickled together, half by half, so a list of a million ints costs a few
    pickles of the list, not a million pickles of one int. After ``budget_s`` seconds
    (default :data:`SEARCH_BUDGET_S`) the deepest failing part found so far is returned.
    """
    search_stats["pickles"] = search_stats["visited"] = 0
    if error is None:
        error = _pickle_error(obj)
        if error is None:
            raise ValueError("object pickles fine")
    deadline = time.monotonic() + (SEARCH_BUDGET_S if budget_s is None else budget_s)
    # id -> the error it fails with, or None: it pickles. ``alive`` keeps every object whose id
    # is recorded alive (__getstate__ may return temporaries, whose ids could be reused).
    known: Dict[int, Optional[BaseException]] = {id(obj): error}
    alive: List[Any] = [obj]
    queue: Deque[Tuple[str, Any, BaseException]] = deque([(path, obj, error)])
    best = (path, error)

    def failing(parts: List[Tuple[str, Any]], fails: bool) -> List[Tuple[str, Any, BaseException]]:
        """The parts that fail alone, found by bisection; ``fails``: the parts are known to
        fail together (no need to pickle them all at once)."""
        if not parts:
            return []
        err = None
        if not fails or len(parts) == 1:
            err = _pickle_error([c for _, c in parts] if len(parts) > 1 else parts[0][1])
            if err is None:
                for _, c in parts:
                    known[id(c)] = None
                    alive.append(c)
                return []
        if len(parts) == 1:
            suffix, child = parts[0]
            assert err is not None
            known[id(child)] = err
            alive.append(child)
            return [(suffix, child, err)]
        mid = len(parts) // 2
        found = failing(parts[:mid], False)
        if time.monotonic() > deadline:
            return found
        # The right half must fail when the left one pickled and the whole fails.
        return found + failing(parts[mid:], fails and not found)

    while queue:
        p, o, err = queue.popleft()
        search_stats["visited"] += 1
        if len(p) > len(best[0]):
            best = (p, err)
        fresh: List[Tuple[str, Any]] = []
        fails_via_known = False
        seen_here = set()
        for suffix, child in _children(o):
            if child is o or type(child) in _PLAIN:
                continue
            k = id(child)
            if k in known:
                fails_via_known = fails_via_known or known[k] is not None
            elif k not in seen_here:
                seen_here.add(k)
                fresh.append((suffix, child))
        found = failing(fresh, not fails_via_known)
        if not found and not fails_via_known:
            return p, err  # it fails and none of its parts does: the culprit
        if time.monotonic() > deadline:
            return best
        queue.extend((p + s, c, e) for s, c, e in found)
    return best


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
        path, err = find_unpicklable(node, error=e)
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


def node_fingerprint(blob: bytes) -> bytes:
    """What :func:`serialize_node` made of a node, without what differs between two loads of
    the same code: a class defined in a script is pickled by value with a random tracker id
    (cloudpickle's, for identity across pickles), so reading the same file twice gives two
    blobs. Equal fingerprints mean the same code and the same state. Call it while the node's
    classes are alive (their ids are looked up in cloudpickle's registry).

    >>> from remotemedia.nodes import MapNode
    >>> node_fingerprint(serialize_node(MapNode(abs, name="a"))) == node_fingerprint(serialize_node(MapNode(abs, name="a")))
    True
    """
    from cloudpickle import cloudpickle as _cp

    tracked = getattr(_cp, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", None)  # (absent: blobs compared as they are)
    if not tracked:
        return blob
    for tracker_id in list(tracked.values()):
        if isinstance(tracker_id, str) and len(tracker_id) == 32:
            blob = blob.replace(tracker_id.encode(), b"0" * 32)
    return blob
