"""Node groups: several nodes run as one stage, in one worker process.

Each stage of a pipeline is a process, and each edge between two stages costs a hop: a copy
into shared memory (for frames not allocated in place), a wake-up of the next process and the
worker's Python around ``process()``. For a chain of light nodes (a gain, a format change, a
level meter) the hops cost more than the work. A :class:`Group` runs its nodes in one worker
and hands each frame from one to the next with a plain call::

    source -> [ Group( gain -> resample -> rms ) ] -> sink        two hops instead of four

    worker of the group:   frame -> gain.process() -> resample.process() -> rms.process()
                                       (in-process calls, no copy, no wake-up)

Members keep their whole Node contract: ``initialize()`` in the worker (in order),
``process()`` returning a value, ``None``, a generator or an awaitable, ``flush()`` at end of
stream (its outputs go through the members after it), ``snapshot()``/``restore()``,
``current_frame`` and ``cleanup()`` (in reverse order). Only the last member's
``allocate()`` gives shared memory (its output leaves the worker); the others get private
arrays. The group is supervised as one node: it restarts as a whole, its runtime options
(``options=``) apply to it as a whole, and its stats are the group's, with per-member counts
and mean times under ``members``.

Example::

    from remotemedia import Group, Pipeline
    from remotemedia.nodes import GainNode, RMSNode, SineSource

    Pipeline([SineSource(seconds=1.0), Group([GainNode(gain_db=-6), RMSNode()])]).run()

In a manifest, a group is an entry of type ``Group`` whose ``params.nodes`` lists its members::

    {"id": "chain", "node_type": "Group",
     "params": {"nodes": [{"id": "gain", "node_type": "GainNode", "params": {"gain_db": -6}},
                          {"id": "level", "node_type": "RMSNode"}]}}
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .errors import InvalidNodeNameError, NodeTypeError
from .frames import Frame
from .node import Node, Source, iter_outputs
from .registry import register_node

__all__ = ["Group"]


@register_node
class Group(Node):
    """Runs ``nodes`` as one pipeline stage, in one worker, each frame passing from one to the
    next by a plain call (see the module documentation).

    Args:
        nodes: the members, in order: :class:`Node` instances (not sources), or manifest
            entries (``{"id", "node_type", "params", "options"}``).
        name: the stage's name (default: ``Group``, suffixed when repeated).
        options: runtime options of the stage (restart policy, timeouts, queue policy...).

    Raises:
        NodeTypeError: no members, a member that is not a Node, a Source among them, a member
            with runtime options, the same instance twice, or two members of the same explicit
            name.
    """

    def __init__(self, nodes: Sequence[Any], name: Optional[str] = None, *, options: Optional[Dict[str, Any]] = None) -> None:
        members = _members(nodes, name)
        super().__init__(name, options=options)
        self.nodes: List[Node] = members
        self._loop: Any = None
        self._live: List[Node] = []
        self._stats: List[List[int]] = [[0, 0, 0, 0] for _ in members]  # in, out, errors, ns

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> None:
        self._live = []
        for m in self.nodes:
            try:
                m.initialize()
            except BaseException as e:
                e.add_note(f"in initialize() of {m.name!r}, member of group {self.name!r}")
                self._cleanup_live()
                raise
            self._live.append(m)

    def process(self, data: Any) -> Any:
        outs = self._through(0, [data])
        if not outs:
            return None
        if len(outs) == 1:
            return outs[0]
        return (o for o in outs)  # several outputs: a generator, emitted one by one

    def flush(self) -> Any:
        outs: List[Any] = []
        for i, m in enumerate(self.nodes):
            fl = getattr(m, "flush", None)
            if callable(fl):
                items = self._call(m, fl)
                outs.extend(self._through(i + 1, items))
        return (o for o in outs) if outs else None

    def cleanup(self) -> None:
        # (also called in the parent before pickling, on members never initialized)
        self._live = list(self.nodes)
        self._cleanup_live()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # ------------------------------------------------------------------ runtime state

    @property
    def snapshot(self) -> Optional[Callable[[], Any]]:  # type: ignore[override]
        """The members' runtime state, when at least one member keeps some (see
        ``Node.snapshot``); None otherwise, so the worker takes no snapshots of the group."""
        if not any(_stateful(m) for m in self.nodes):
            return None
        return lambda: {m.name: m.snapshot() for m in self.nodes if _stateful(m)}  # type: ignore[attr-defined]

    @property
    def restore(self) -> Optional[Callable[[Any], None]]:  # type: ignore[override]
        if not any(_stateful(m) for m in self.nodes):
            return None

        def restore(state: Mapping[str, Any]) -> None:
            for m in self.nodes:
                if _stateful(m) and m.name in state:
                    m.restore(state[m.name])  # type: ignore[attr-defined]

        return restore

    def member_stats(self) -> Dict[str, Dict[str, Any]]:
        """Per member: frames in and out of ``process()``, errors raised, and mean time per
        input frame. The worker adds them to the group's stats as ``members`` (run report,
        heartbeats)."""
        out: Dict[str, Dict[str, Any]] = {}
        for m, (n_in, n_out, errors, ns) in zip(self.nodes, self._stats):
            out[m.name] = {
                "frames_in": n_in,
                "frames_out": n_out,
                "errors": errors,
                "mean_ms": round(ns / n_in / 1e6, 4) if n_in else None,
            }
        return out

    def to_manifest(self) -> Dict[str, Any]:
        entry = super().to_manifest()
        entry["params"] = {"nodes": [m.to_manifest() for m in self.nodes]}
        return entry

    # ------------------------------------------------------------------ internals

    def _through(self, start: int, items: List[Any]) -> List[Any]:
        """Pass ``items`` through members ``start..`` in turn; the last member's outputs."""
        frame = self._frame_raw()
        last = len(self.nodes) - 1
        stream_id: Optional[int] = None
        for i in range(start, last + 1):
            m = self.nodes[i]
            m._remotemedia_frame = frame
            if i == last:
                # only the last member's output leaves the worker: it alone may allocate in
                # shared memory (a loaned chunk handed to another member would never be sent)
                m._remotemedia_allocator = self.__dict__.get("_remotemedia_allocator")  # type: ignore[attr-defined]
            nxt: List[Any] = []
            st = self._stats[i]
            t0 = time.perf_counter_ns()
            try:
                for item in items:
                    if type(item) is Frame:
                        item, stream_id = item.value, (item.stream_id if item.stream_id is not None else stream_id)
                    st[0] += 1
                    nxt.extend(self._call(m, m.process, item))
            except BaseException:
                st[2] += 1
                raise
            finally:
                m._remotemedia_frame = None
                st[3] += time.perf_counter_ns() - t0
            st[1] += len(nxt)
            items = nxt
            if not items:
                break
        if stream_id is not None:
            return [o if type(o) is Frame else Frame(o, stream_id) for o in items]
        return items

    def _call(self, m: Node, fn: Callable[..., Any], *args: Any) -> List[Any]:
        """Outputs of one member call, whatever its form (value, None, generator, awaitable,
        async generator), without the Nones."""
        try:
            return list(iter_outputs(fn(*args), self._event_loop))
        except BaseException as e:
            e.add_note(f"in {getattr(fn, '__name__', 'process')}() of {m.name!r}, member of group {self.name!r}")
            raise

    def _event_loop(self) -> Any:
        if self._loop is None:
            import asyncio  # only groups with async members need it

            self._loop = asyncio.new_event_loop()
        return self._loop

    def _cleanup_live(self) -> None:
        errors: List[BaseException] = []
        for m in reversed(self._live):
            try:
                m.cleanup()
            except Exception as e:  # every member gets its cleanup; the first error is raised
                e.add_note(f"in cleanup() of {m.name!r}, member of group {self.name!r}")
                errors.append(e)
        self._live = []
        if errors:
            raise errors[0]

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_loop"] = None
        state["_live"] = []
        state["_stats"] = [[0, 0, 0, 0] for _ in self.nodes]
        return state

    def __repr__(self) -> str:
        return f"<Group name={self.name!r} nodes={[m.name for m in self.nodes]}>"


def _stateful(m: Node) -> bool:
    return callable(getattr(m, "snapshot", None)) and callable(getattr(m, "restore", None))


def _members(nodes: Any, group: Optional[str]) -> List[Node]:
    from .pipeline import _assign_names, _check_node  # (pipeline imports this module's package)

    label = f"group {group!r}" if group else "a Group"
    if isinstance(nodes, (str, bytes, Mapping)) or not isinstance(nodes, Sequence):
        raise NodeTypeError(f"{label} takes a list of nodes, got {type(nodes).__name__}")
    if not nodes:
        raise NodeTypeError(f"{label} needs at least one node")
    members: List[Node] = []
    for i, n in enumerate(nodes):
        if isinstance(n, Mapping):
            from .manifest import node_from_entry

            n = node_from_entry(n, f"{label}.nodes[{i}]")
        if not isinstance(n, Node):
            raise NodeTypeError(
                f"{label}: member {i} is a {type(n).__name__}, not a Node instance "
                "(subclass remotemedia.Node, or give a manifest entry)"
            )
        if isinstance(n, Source):
            raise NodeTypeError(
                f"{label}: member {n.name!r} is a Source; a group has one input, so put the source "
                "before the group in the pipeline"
            )
        _check_node(n, i)
        if n.options:
            raise NodeTypeError(
                f"{label}: member {n.name!r} has runtime options ({', '.join(sorted(n.options))}); inside a "
                "group they would not apply (the group is supervised as one node): set them on the Group"
            )
        members.append(n)
    try:
        _assign_names(members, f"{label}, member")  # unique names, auto-named members suffixed as in a pipeline
    except InvalidNodeNameError:
        raise
    except Exception as e:
        raise NodeTypeError(f"{label}: {e}") from None
    return members
