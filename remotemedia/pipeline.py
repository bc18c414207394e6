"""Pipeline: a validated DAG of nodes.

``Pipeline(nodes)`` chains the nodes in order; ``connections`` describe any DAG (fan-out,
fan-in). Nodes may be configured instances, manifest entries (dicts), or both mixed. Every
check runs in the constructor, before any process exists.

Nodes without an upstream connection that are not :class:`~remotemedia.Source` receive the
pipeline inputs; the outputs of nodes without a downstream connection go back to the caller.

Example::

    from remotemedia import Pipeline
    from remotemedia.nodes import MapNode, PassThroughNode

    p = Pipeline(
        [PassThroughNode(name="a"), MapNode(lambda x: x + 1, name="b"),
         MapNode(lambda x: x * 10, name="c"), {"id": "d", "node_type": "PassThroughNode"}],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    sorted(p.run([1]))     # -> [2, 10]
"""

from __future__ import annotations

import io
import json
import pickle
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import cloudpickle

from .errors import NodeTypeError, PipelineValidationError
from .manifest import MANIFEST_VERSION, instance_entry, load_manifest, node_from_entry, node_host, parse_connections
from .node import Node, Source, check_node_name, missing_super_init
from .options import check as check_option
from .registry import get_node_class, type_name_of
from .serialization import DEFAULT_MAX_SIZE, serialize_node

__all__ = ["Pipeline", "as_pipeline", "INPUT", "OUTPUT"]

#: Pseudo node names of the caller's side of the pipeline.
INPUT = "__input__"
OUTPUT = "__output__"


def _check_node(node: Node, position: int) -> None:
    err = missing_super_init(node)
    if err is not None:
        raise err
    for method in ("process", "initialize", "cleanup"):
        if not callable(getattr(node, method, None)):
            raise NodeTypeError(
                f"item {position} ({type(node).__name__} {node.name!r}) has no callable {method}(); "
                "a Node must define initialize(), process(data) and cleanup()"
            )
    if isinstance(node, Source) and not callable(getattr(node, "generate", None)):
        raise NodeTypeError(f"item {position} (source {node.name!r}) has no callable generate()")


def _coerce_items(items: Sequence[Any], trust_instances: bool = False) -> List[Node]:
    bad = [(i, type(x).__name__) for i, x in enumerate(items) if not isinstance(x, (Node, Mapping))]
    if bad:
        listing = ", ".join(f"position {i}: {t}" for i, t in bad)
        raise NodeTypeError(
            f"pipeline items must be Node instances or manifest node dicts; invalid items at {listing}"
        )
    nodes: List[Node] = []
    for i, item in enumerate(items):
        node = item if isinstance(item, Node) else node_from_entry(item, f"nodes[{i}]", trust_instances=trust_instances)
        _check_node(node, i)
        nodes.append(node)
    return nodes


def _assign_names(nodes: List[Node], where: str = "pipeline item") -> None:
    explicit: Dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.name in (INPUT, OUTPUT):
            raise PipelineValidationError(
                f"node name {n.name!r} at position {i} is reserved for the caller's side of the pipeline; rename the node"
            )
        if not getattr(n, "_auto_name", False):
            if n.name in explicit:
                raise PipelineValidationError(
                    f"duplicate node name {n.name!r} at positions {explicit[n.name]} and {i}; node names must be unique"
                )
            explicit[n.name] = i
    if len({id(n) for n in nodes}) != len(nodes):
        raise PipelineValidationError("the same Node instance appears twice; create one instance per stage")
    used = set(explicit)
    counts: Dict[str, int] = defaultdict(int)
    for n in nodes:
        if getattr(n, "_auto_name", False):
            base = type(n).__name__
            name = base
            while name in used:
                counts[base] += 1
                name = f"{base}_{counts[base]}"
            n.name = name
            used.add(name)
    # (again here: a name may have been set after construction, and default names come from
    # class names)
    for i, n in enumerate(nodes):
        how = f"the default name, from class {type(n).__name__}; pass name=" if getattr(n, "_auto_name", False) else type(n).__name__
        check_node_name(n.name, f"{where} {i} ({how})")


def _plain_entry(node: Node) -> Dict[str, Any]:
    entry = node.to_manifest()
    host = node_host(node)
    if host is not None:
        entry["host"] = host
    return entry


def _state_bytes(node: Node) -> bytes:
    """A pickle of ``node`` that depends only on its values: no memo, so which objects happen
    to be shared (e.g. an auto name that *is* the class's ``__name__``) does not matter.
    Cyclic state cannot be written this way and raises."""
    buf = io.BytesIO()
    pickler = cloudpickle.CloudPickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(node)
    return buf.getvalue()


def _entry_of(node: Node, max_size: Optional[int]) -> Dict[str, Any]:
    """The manifest entry of ``node`` when instances may be written.

    The rule: a node is written as ``node_type`` + ``params`` only when that entry, after a
    round trip through JSON, rebuilds a node whose state after ``cleanup()`` pickles to the
    same bytes as the node's own (a memo-less pickle, so only values count). Otherwise (a
    class that is not registered under its name, params that are not plain JSON, a
    constructor that fails, cyclic state, or state the params do not rebuild: a loaded model,
    a lambda, a counter changed after construction) it is written as a pickled instance.
    Equal pickles unpickle to equal values, so a plain entry never loses state (object
    identity shared between attributes aside); the rule may pickle a node whose state only
    *looks* different (e.g. a set built in another order), which costs trust, not
    correctness. It constructs each node once more, so constructors should stay cheap (load
    models in initialize()).
    """
    blob = serialize_node(node, max_size)
    entry = _plain_entry(node)
    cls = type(node)
    try:
        registered = get_node_class(type_name_of(cls)) is cls
    except Exception:
        registered = False
    if registered:
        try:
            text = json.dumps(entry, allow_nan=False)
            rebuilt = node_from_entry(json.loads(text), "rebuild")
            # naming bookkeeping of the Pipeline constructor, not node state
            rebuilt._auto_name = getattr(node, "_auto_name", False)
            rebuilt.cleanup()
            if _state_bytes(rebuilt) == _state_bytes(node):
                return entry
        except Exception:
            pass  # not rebuildable from its entry: pickle it
    return instance_entry(node, blob)


class Pipeline:
    """A validated DAG of nodes.

    Args:
        nodes: Node instances and/or manifest node dicts (``{"id", "node_type", "params"}``),
            or a whole manifest (dict or JSON string).
        connections: ``[("a", "b"), ...]`` or ``[{"from": "a", "to": "b"}, ...]``; linear in
            list order when omitted.
        name: pipeline name (used in logs, service names and the CLI).
        trust_instances: allow manifest entries that hold a pickled node instance (written
            by ``serialize(include_instances=True)``). Unpickling runs code from the manifest:
            pass True only for manifests you made yourself.

    Raises:
        PipelineValidationError (a ValueError): empty pipeline, duplicate names, unknown
            connection endpoints, cycles, a connection into a Source.
        NodeTypeError (a TypeError): items that are not nodes, nodes without process().
        UnknownNodeTypeError / ManifestError: bad manifest entries.
    """

    def __init__(
        self,
        nodes: Union[Sequence[Any], Mapping[str, Any], str],
        connections: Optional[Sequence[Any]] = None,
        name: Optional[str] = None,
        trust_instances: bool = False,
    ) -> None:
        if isinstance(nodes, (Mapping, str, bytes)):
            nodes, manifest_connections, manifest_name = load_manifest(nodes, trust_instances)
            connections = connections if connections is not None else manifest_connections
            name = name or manifest_name
        elif isinstance(nodes, Pipeline):
            connections = connections if connections is not None else nodes.connections
            name = name or nodes.name
            nodes = list(nodes.nodes)
        elif not isinstance(nodes, Sequence):
            raise NodeTypeError(
                f"Pipeline expects a list of nodes or a manifest, got {type(nodes).__name__}"
            )
        if len(nodes) == 0:
            raise PipelineValidationError("cannot build an empty pipeline: give at least one node")
        self.nodes: List[Node] = _coerce_items(list(nodes), trust_instances)
        _assign_names(self.nodes)
        self.name: str = name or "pipeline"
        self._by_name: Dict[str, Node] = {n.name: n for n in self.nodes}
        if connections is None:
            conns = [(a.name, b.name) for a, b in zip(self.nodes, self.nodes[1:])]
        else:
            conns = parse_connections(list(connections))
        self.connections: List[Tuple[str, str]] = self._validate_connections(conns)
        self.order: List[str] = self._toposort()
        self._validate_replicas()

    # ------------------------------------------------------------------ validation

    def _validate_connections(self, conns: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        seen = set()
        for i, (a, b) in enumerate(conns):
            for end in (a, b):
                if end not in self._by_name:
                    raise PipelineValidationError(
                        f"connection {i} ({a!r} -> {b!r}) names unknown node {end!r}; nodes are: "
                        f"{', '.join(self._by_name)}"
                    )
            if a == b:
                raise PipelineValidationError(f"connection {i} connects node {a!r} to itself")
            if (a, b) in seen:
                raise PipelineValidationError(f"connection {i} ({a!r} -> {b!r}) is listed twice")
            if isinstance(self._by_name[b], Source):
                raise PipelineValidationError(
                    f"connection {i} ({a!r} -> {b!r}) feeds source {b!r}; a Source has no input"
                )
            seen.add((a, b))
        return list(conns)

    def replicas(self, name: str) -> int:
        """How many workers run node ``name`` (its ``replicas`` option; 1 when unset)."""
        n = self._by_name[name].options.get("replicas")
        return 1 if n is None else n

    def _validate_replicas(self) -> None:
        """A node with ``replicas`` > 1 must fit what its workers do (see the README's
        Replicas): its one upstream (a node or the caller) spreads the frames over the
        replicas, and each downstream node, fed by it alone (or the caller), takes their
        outputs back in input order. A node's state cannot be split."""
        for node in self.nodes:
            n = node.options.get("replicas")
            if n is None:
                continue
            check_option("replicas", n, f"node {node.name!r}")
            if n == 1:
                continue
            what = f"node {node.name!r} has replicas={n}"
            if isinstance(node, Source):
                raise PipelineValidationError(f"{what}, but it is a Source: a source cannot be split; drop the option")
            if callable(getattr(node, "snapshot", None)) and callable(getattr(node, "restore", None)):
                raise PipelineValidationError(
                    f"{what}, but it keeps state (it has snapshot() and restore()): each replica would see only "
                    "part of the frames; drop the option or make the node stateless"
                )
            ups = self.upstream(node.name)
            if len(ups) != 1 or (ups != [INPUT] and self.replicas(ups[0]) > 1):
                raise PipelineValidationError(
                    f"{what}, but it is fed by {', '.join(repr(u) for u in ups)}: a node with replicas needs exactly "
                    "one upstream node, itself without replicas"
                )
            for name in [node.name, *self.downstream(node.name)]:
                policy = self._by_name[name].options.get("queue_policy") if name != OUTPUT else None
                if policy not in (None, "block"):
                    raise PipelineValidationError(
                        f"{what}, but node {name!r} has queue_policy={policy!r}: the frames into and out of "
                        "replicas are kept in order and never dropped; use 'block' there"
                    )
            for down in self.downstream(node.name):
                if down != OUTPUT and self.upstream(down) != [node.name]:
                    raise PipelineValidationError(
                        f"{what}, but its downstream node {down!r} has other inputs too "
                        f"({', '.join(repr(u) for u in self.upstream(down) if u != node.name)}): a node fed by "
                        "replicas takes no other input"
                    )

    def _toposort(self) -> List[str]:
        indeg = {n: 0 for n in self._by_name}
        succ: Dict[str, List[str]] = defaultdict(list)
        for a, b in self.connections:
            succ[a].append(b)
            indeg[b] += 1
        ready = deque(n.name for n in self.nodes if indeg[n.name] == 0)
        order: List[str] = []
        while ready:
            n = ready.popleft()
            order.append(n)
            for m in succ[n]:
                indeg[m] -= 1
                if indeg[m] == 0:
                    ready.append(m)
        if len(order) != len(self.nodes):
            raise PipelineValidationError(f"connections contain a cycle: {' -> '.join(self._find_cycle(succ))}")
        return order

    def _find_cycle(self, succ: Mapping[str, List[str]]) -> List[str]:
        color: Dict[str, int] = {}
        stack: List[str] = []

        def dfs(n: str) -> Optional[List[str]]:
            color[n] = 1
            stack.append(n)
            for m in succ.get(n, []):
                if color.get(m) == 1:
                    return stack[stack.index(m) :] + [m]
                if m not in color:
                    found = dfs(m)
                    if found:
                        return found
            stack.pop()
            color[n] = 2
            return None

        for n in self._by_name:
            if n not in color:
                found = dfs(n)
                if found:
                    return found
        return ["?"]

    # ------------------------------------------------------------------ graph queries

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        return self._by_name[name]

    def upstream(self, name: str) -> List[str]:
        """Names of the nodes feeding ``name`` (``[INPUT]`` for input nodes)."""
        ups = [a for a, b in self.connections if b == name]
        if not ups and not isinstance(self._by_name[name], Source):
            return [INPUT]
        return ups

    def downstream(self, name: str) -> List[str]:
        """Names of the nodes fed by ``name`` (``[OUTPUT]`` for terminal nodes)."""
        return [b for a, b in self.connections if a == name] or [OUTPUT]

    def edges(self) -> List[Tuple[str, str]]:
        """Every edge, including those from INPUT and to OUTPUT, in a stable order."""
        out: List[Tuple[str, str]] = []
        for name in self.order:
            for up in self.upstream(name):
                if up == INPUT:
                    out.append((INPUT, name))
        out.extend(self.connections)
        for name in self.order:
            if self.downstream(name) == [OUTPUT]:
                out.append((name, OUTPUT))
        return out

    @property
    def sources(self) -> List[Node]:
        return [n for n in self.nodes if isinstance(n, Source)]

    @property
    def input_nodes(self) -> List[Node]:
        """Nodes that receive the pipeline inputs."""
        return [self._by_name[n] for n in self.order if self.upstream(n) == [INPUT]]

    # ------------------------------------------------------------------ running

    def run(
        self,
        inputs: Optional[Iterable[Any]] = None,
        *,
        input_data: Optional[Iterable[Any]] = None,
        **options: Any,
    ) -> List[Any]:
        """Run the pipeline and return the terminal outputs.

        Outputs are ordered by the input they derive from. ``input_data`` is an alias of
        ``inputs`` (the seed API's name; giving both is refused). Without inputs, a pipeline
        with a Source runs until its sources end and one without runs once on a single
        ``None`` input (the one-shot form). ``options`` are the
        :class:`~remotemedia.Supervisor` options and ``enable_metrics=True``, which returns
        an :class:`~remotemedia.runs.Outputs` list with per-node ``.metrics``.

        ``backend="ray"`` (with ``ray_address=``) runs the nodes across the hosts of a Ray
        cluster, each on the host its ``host`` option names (see the README's "Across hosts").
        ``executor="multiprocess"`` (the default; also ``use_rust=True``, its transport being
        the Rust bridge) runs each node in a supervised worker. ``executor="inline"`` (also
        ``use_rust=False``) runs the pipeline in this process on these very node objects,
        nothing pickled: for debugging with pdb and fast unit tests (see
        ``supervisor.inline``; it takes ``on_error`` only).

        Raises:
            RunOptionError (a TypeError): an unknown keyword (the message lists the valid
                ones), or both ``inputs`` and ``input_data``.
            ExecutorOptionError: an unknown executor, or options that do not apply inline.
            NodeError / NodeInitError / SerializationError: a node failed.
        """
        # The model does not import the runtime: the facade hands it over (its one late import).
        from . import _runtime

        return _runtime().run_pipeline(self, inputs, input_data, options)

    # ------------------------------------------------------------------ manifests

    def serialize(
        self,
        description: Optional[str] = None,
        include_instances: bool = False,
        max_node_size: Optional[int] = DEFAULT_MAX_SIZE,
    ) -> Dict[str, Any]:
        """The pipeline as a manifest v1 dict (plain JSON data).

        Args:
            description: stored in ``metadata.description``.
            include_instances: write every node that its registered ``node_type`` and
                ``params`` cannot rebuild as a pickled instance (see :func:`_entry_of`), so
                its state (a loaded model, a lambda) survives. Loading such a manifest needs
                ``Pipeline(manifest, trust_instances=True)``. Off: each node is written as
                ``node_type`` + ``params`` and state that is not in its params is lost.
            max_node_size: size limit of one pickled node (``include_instances`` only).
                Writing instances calls each node's ``cleanup()`` first, as a run does.

        Raises:
            SerializationError: a node to be pickled cannot be (the attribute is named) or
                exceeds ``max_node_size``.
        """
        meta: Dict[str, Any] = {"name": self.name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if description:
            meta["description"] = description
        if include_instances:
            entries = [_entry_of(n, max_node_size) for n in self.nodes]
        else:
            entries = [_plain_entry(n) for n in self.nodes]
        return {
            "version": MANIFEST_VERSION,
            "metadata": meta,
            "nodes": entries,
            "connections": [{"from": a, "to": b} for a, b in self.connections],
        }

    def to_json(self, **kw: Any) -> str:
        """:meth:`serialize` as a JSON string (same keywords, e.g. ``include_instances=True``)."""
        return json.dumps(self.serialize(**kw), default=repr)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.nodes)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name!r}: {len(self.nodes)} nodes, {len(self.connections)} connections>"


def as_pipeline(obj: Any, name: Optional[str] = None, trust_instances: bool = False) -> Pipeline:
    """A Pipeline from a Pipeline (returned as is), a list of nodes / manifest entries, a
    manifest dict or JSON string, or a single Node: what every entry point accepts
    (``trust_instances``: see :class:`Pipeline`).

    Raises:
        NodeTypeError: ``obj`` is none of these; and whatever :class:`Pipeline` raises.
    """
    if isinstance(obj, Pipeline):
        return obj
    if isinstance(obj, (list, tuple, dict, str, bytes)):
        return Pipeline(obj if not isinstance(obj, tuple) else list(obj), name=name, trust_instances=trust_instances)
    if isinstance(obj, Node):
        return Pipeline([obj], name=name)
    raise NodeTypeError(
        f"expected a Pipeline, a list of Node instances / manifest dicts, a manifest dict or a JSON "
        f"string, got {type(obj).__name__}"
    )
