"""Manifest v1: a pipeline as plain data (dict or JSON string).

::

    {
      "version": "v1",
      "metadata": {"name": "tone-level"},                 # optional
      "nodes": [
        {"id": "tone",  "node_type": "SineSource", "params": {"seconds": 2}},
        {"id": "gain",  "node_type": "GainNode",   "params": {"gain_db": -6},
         "options": {"restart_policy": "always"}},         # optional runtime options
        {"id": "level", "node_type": "RMSNode"}
      ],
      "connections": [{"from": "tone", "to": "gain"},     # optional: linear when omitted
                      {"from": "gain", "to": "level"}]
    }

``node_type`` is looked up in the registry (:func:`remotemedia.register_node`); ``params``
become the constructor's keyword arguments and ``id`` its name.

Upstream (remotemedia-sdk) manifests load too: ``version`` may be omitted (v1), node entries
may carry ``is_streaming`` and ``capabilities`` (checked, then ignored: every node here streams
frame by frame, and placement does not use capabilities) and ``host`` (kept on the node, see
:func:`node_host`), and upstream type names with an exact equivalent are mapped
(:data:`UPSTREAM_TYPES`).

An entry may also carry a pickled instance instead of ``params`` (written by
``Pipeline.serialize(include_instances=True)``)::

    {"id": "m", "node_type": "ModelNode",
     "instance": {"format": "cloudpickle", "python": "3.12", "sha256": "<hex>", "data": "<base64>"}}

Loading one unpickles it, which runs code from the manifest: it needs ``trust_instances=True``.

Example::

    >>> from remotemedia.manifest import load_manifest
    >>> nodes, connections, name = load_manifest('{"version": "v1", "nodes": '
    ...     '[{"id": "p", "node_type": "PassThroughNode"}]}')
    >>> nodes[0].name
    'p'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ManifestError, NodeTypeError, SerializationError
from .node import check_node_name
from .registry import get_node_class, registered_types

__all__ = [
    "MANIFEST_VERSION",
    "UPSTREAM_TYPES",
    "INSTANCE_FORMAT",
    "load_manifest",
    "node_from_entry",
    "parse_connections",
    "instance_entry",
    "node_host",
]

MANIFEST_VERSION = "v1"
_TOP_KEYS = {"version", "metadata", "nodes", "connections"}
_NODE_KEYS = {"id", "node_type", "params", "options", "instance", "host", "is_streaming", "capabilities"}
_INSTANCE_KEYS = {"format", "python", "sha256", "data"}
INSTANCE_FORMAT = "cloudpickle"

#: Upstream node type names -> ours, only where ours does the same thing. (Upstream's
#: CalculatorNode keeps its name.) Near misses get a hint instead.
UPSTREAM_TYPES: Dict[str, str] = {"PassThrough": "PassThroughNode", "AudioChunker": "ChunkerNode"}
#: How an upstream type's params become ours: renames, then defaults (upstream's
#: AudioChunkerConfig: `chunk_size`, alias `chunkSize`, default 512 samples).
_UPSTREAM_PARAMS: Dict[str, Tuple[Dict[str, str], Dict[str, Any]]] = {
    "AudioChunker": ({"chunk_size": "size", "chunkSize": "size"}, {"size": 512}),
}
_UPSTREAM_NEAR: Dict[str, str] = {
    # upstream's is a sinc resampler (rubato) with quality levels and "auto" rates
    "FastResample": "ResampleNode(to_rate=<Hz>, from_rate=<Hz>), a linear-interpolation resampler",
}

# Where a manifest's "host" is kept on the node (a private name: a node may have its own
# `host` attribute, e.g. the server it talks to).
_HOST_ATTR = "_remotemedia_host"

_TRUST_HINT = (
    "unpickling it runs code from the manifest; pass trust_instances=True (CLI: --trust-instances) "
    "only for manifests you made yourself"
)


def node_host(node: Any) -> Optional[str]:
    """The ``host`` a manifest entry gave this node (kept for placement), or None."""
    return getattr(node, _HOST_ATTR, None)


def instance_entry(node: Any, blob: bytes) -> Dict[str, Any]:
    """The manifest entry of a node written as a pickled instance (``blob`` from
    :func:`remotemedia.serialization.serialize_node`)."""
    from .registry import type_name_of

    entry: Dict[str, Any] = {
        "id": node.name,
        "node_type": type_name_of(type(node)),
        "instance": {
            "format": INSTANCE_FORMAT,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "sha256": hashlib.sha256(blob).hexdigest(),
            "data": base64.b64encode(blob).decode("ascii"),
        },
    }
    host = node_host(node)
    if host is not None:
        entry["host"] = host
    return entry


def _node_from_instance(raw: Any, node_id: str, node_type: str, where: str, trust_instances: bool) -> Any:
    from .node import Node
    from .serialization import deserialize_node

    w = f"{where}.instance"
    if not trust_instances:
        raise ManifestError(f"node {node_id!r} is a pickled {node_type} instance; {_TRUST_HINT}", w)
    if not isinstance(raw, Mapping):
        raise ManifestError(f"'instance' must be an object with keys {sorted(_INSTANCE_KEYS)}, got {type(raw).__name__}", w)
    unknown = sorted(set(raw) - _INSTANCE_KEYS)
    missing = sorted({"format", "sha256", "data"} - set(raw))
    if unknown or missing:
        raise ManifestError(
            f"'instance' has {'unknown key(s) ' + ', '.join(map(repr, unknown)) if unknown else ''}"
            f"{'; ' if unknown and missing else ''}{'missing key(s) ' + ', '.join(map(repr, missing)) if missing else ''}; "
            f"it has {sorted(_INSTANCE_KEYS)}",
            w,
        )
    if raw["format"] != INSTANCE_FORMAT:
        raise ManifestError(f"unsupported instance format {raw['format']!r}; expected {INSTANCE_FORMAT!r}", f"{w}.format")
    data, digest = raw["data"], raw["sha256"]
    if not isinstance(data, str) or not isinstance(digest, str):
        raise ManifestError("'data' (base64) and 'sha256' (hex) must be strings", w)
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ManifestError(f"'data' is not valid base64: {e}", f"{w}.data") from None
    actual = hashlib.sha256(blob).hexdigest()
    if actual != digest.lower():
        raise ManifestError(
            f"the pickled instance of node {node_id!r} does not match its digest (sha256 {actual}, "
            f"manifest says {digest}): the manifest was altered or truncated; write it again with "
            "Pipeline.to_json(include_instances=True)",
            f"{w}.sha256",
        )
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        node = deserialize_node(blob, initialize=False)
    except SerializationError as e:
        made = raw.get("python")
        extra = f" (written by Python {made}, this is Python {here})" if made and made != here else ""
        raise ManifestError(f"cannot unpickle node {node_id!r}{extra}: {e}", w) from e
    if not isinstance(node, Node):
        raise ManifestError(f"the pickled instance of {node_id!r} is a {type(node).__name__}, not a Node", w)
    node.name = node_id  # the id outside the blob wins: renaming an entry renames the node
    return node


def _as_dict(manifest: Union[str, bytes, Mapping[str, Any]]) -> Mapping[str, Any]:
    if isinstance(manifest, (str, bytes)):
        try:
            data = json.loads(manifest)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", "manifest"
            ) from None
        if not isinstance(data, dict):
            raise ManifestError(f"a manifest must be a JSON object, got {type(data).__name__}", "manifest")
        return data
    if isinstance(manifest, Mapping):
        return manifest
    raise NodeTypeError(f"a manifest must be a dict or a JSON string, got {type(manifest).__name__}")


def _check_upstream_fields(entry: Mapping[str, Any], where: str) -> Optional[str]:
    """Check the upstream-only fields; returns the entry's ``host``."""
    if "is_streaming" in entry and not isinstance(entry["is_streaming"], bool):
        raise ManifestError(f"'is_streaming' must be true or false, got {entry['is_streaming']!r}", f"{where}.is_streaming")
    caps = entry.get("capabilities")
    if caps is not None and not isinstance(caps, Mapping):
        raise ManifestError(f"'capabilities' must be an object or null, got {type(caps).__name__}", f"{where}.capabilities")
    host = entry.get("host")
    if host is not None and (not isinstance(host, str) or not host):
        raise ManifestError(f"'host' must be a non-empty string such as \"host:port\", got {host!r}", f"{where}.host")
    return host


def _resolve_type(node_type: str, where: str) -> type:
    if node_type not in registered_types():
        if node_type in UPSTREAM_TYPES:
            node_type = UPSTREAM_TYPES[node_type]
        elif node_type in _UPSTREAM_NEAR:
            raise ManifestError(
                f"upstream node_type {node_type!r} has no exact equivalent here; the closest is "
                f"{_UPSTREAM_NEAR[node_type]} (check its params), or register your own class as {node_type!r}",
                where,
            )
    return get_node_class(node_type, where)


def _upstream_params(node_type: str, params: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """An upstream type's params in our names (others' params as they are)."""
    if node_type in registered_types() or node_type not in _UPSTREAM_PARAMS:
        return dict(params)
    renames, defaults = _UPSTREAM_PARAMS[node_type]
    out: Dict[str, Any] = {}
    for key, value in params.items():
        ours = renames.get(key, key)
        if ours in out:
            raise ManifestError(f"{key!r} gives {ours!r} a second time (upstream aliases of one param)", f"{where}.params")
        out[ours] = value
    return {**defaults, **out}


def node_from_entry(entry: Any, where: str, default_id: Optional[str] = None, trust_instances: bool = False) -> Any:
    """Instantiate one manifest node entry ``{"id", "node_type", "params", "options"}`` (or a
    pickled ``"instance"``, which needs ``trust_instances=True``)."""
    if not isinstance(entry, Mapping):
        raise ManifestError(f"a node entry must be an object, got {type(entry).__name__}", where)
    unknown = sorted(set(entry) - _NODE_KEYS)
    if unknown:
        raise ManifestError(
            f"unknown key(s) {', '.join(map(repr, unknown))}; a node entry has {sorted(_NODE_KEYS)}", where
        )
    node_type = entry.get("node_type")
    if not isinstance(node_type, str) or not node_type:
        raise ManifestError("missing or empty 'node_type' (the registered name of the node class)", where)
    host = _check_upstream_fields(entry, where)
    auto_name = "id" not in entry and default_id is None
    node_id = entry.get("id", default_id or node_type)
    if not isinstance(node_id, str) or not node_id:
        raise ManifestError(f"'id' must be a non-empty string, got {node_id!r}", where)
    check_node_name(
        node_id, f"manifest entry {where}.id" if "id" in entry else f"manifest entry {where} (no 'id', so named after its node_type; give it an 'id')"
    )
    params = entry.get("params")
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ManifestError(f"'params' must be an object, got {type(params).__name__}", f"{where}.params")
    options = entry.get("options")
    if options is not None and not isinstance(options, Mapping):
        raise ManifestError(f"'options' must be an object, got {type(options).__name__}", f"{where}.options")
    if "instance" in entry:
        if params:
            raise ManifestError("an 'instance' entry carries its whole state; remove 'params'", f"{where}.params")
        node = _node_from_instance(entry["instance"], node_id, node_type, where, trust_instances)
        if options:
            from .node import NodeOptions

            try:
                node.options = NodeOptions(node_id, **{**node.options, **options})
            except NodeTypeError as e:
                raise ManifestError(str(e), f"{where}.options") from None
        if host is not None:
            setattr(node, _HOST_ATTR, host)
        return node
    cls = _resolve_type(node_type, f"{where}.node_type")
    kwargs = _upstream_params(node_type, params, where)
    for reserved in ("name", "options"):
        if reserved in kwargs:
            raise ManifestError(f"'{reserved}' is reserved; set it with the entry's 'id' / 'options'", f"{where}.params")
    if options:
        from .node import NodeOptions

        try:
            NodeOptions(node_id, **options)
        except NodeTypeError as e:
            raise ManifestError(str(e), f"{where}.options") from None
    try:
        node = cls(name=node_id, options=dict(options) if options else None, **kwargs)
    except TypeError as e:
        raise ManifestError(f"cannot construct {node_type} with params {sorted(kwargs)}: {e}", f"{where}.params") from e
    if auto_name:
        node._auto_name = True  # several id-less entries of one type get _1, _2 suffixes
    if host is not None:
        setattr(node, _HOST_ATTR, host)
    return node


def parse_connections(raw: Any, where: str = "connections") -> List[Tuple[str, str]]:
    """Connections as ``[(from, to), ...]`` from tuples, lists or ``{"from", "to"}`` objects."""
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ManifestError(f"connections must be a list, got {type(raw).__name__}", where)
    out: List[Tuple[str, str]] = []
    for i, c in enumerate(raw):
        w = f"{where}[{i}]"
        if isinstance(c, Mapping):
            extra = sorted(set(c) - {"from", "to"})
            if extra or "from" not in c or "to" not in c:
                raise ManifestError(f'a connection is {{"from": <id>, "to": <id>}}, got {dict(c)!r}', w)
            src, dst = c["from"], c["to"]
        elif isinstance(c, (tuple, list)) and len(c) == 2:
            src, dst = c
        else:
            raise ManifestError(f"a connection is a (from, to) pair or a {{'from','to'}} object, got {c!r}", w)
        if not isinstance(src, str) or not isinstance(dst, str):
            raise ManifestError(f"connection endpoints must be node ids (strings), got {src!r} -> {dst!r}", w)
        out.append((src, dst))
    return out


def load_manifest(
    manifest: Union[str, bytes, Mapping[str, Any]], trust_instances: bool = False
) -> Tuple[List[Any], Optional[List[Tuple[str, str]]], Optional[str]]:
    """Parse and validate a manifest; returns ``(nodes, connections or None, name)``.

    ``trust_instances``: allow entries holding a pickled instance (unpickling runs code from
    the manifest: only for manifests you made yourself). Graph checks (unknown ids, cycles)
    happen when the Pipeline is built.
    """
    data = _as_dict(manifest)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(map(repr, unknown))}; a manifest has {sorted(_TOP_KEYS)}", "manifest")
    version = data.get("version", MANIFEST_VERSION)  # upstream manifests may omit it
    if version != MANIFEST_VERSION:
        raise ManifestError(f"unsupported manifest version {version!r}; expected {MANIFEST_VERSION!r}", "version")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, Sequence) or isinstance(raw_nodes, (str, bytes)):
        raise ManifestError("'nodes' must be a list of node entries", "nodes")
    nodes = [node_from_entry(e, f"nodes[{i}]", trust_instances=trust_instances) for i, e in enumerate(raw_nodes)]
    connections = parse_connections(data["connections"]) if data.get("connections") is not None else None
    meta = data.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise ManifestError("'metadata' must be an object", "metadata")
    name = meta.get("name")
    return nodes, connections, name if isinstance(name, str) else None
