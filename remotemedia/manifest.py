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

Example::

    >>> from remotemedia.manifest import load_manifest
    >>> nodes, connections, name = load_manifest('{"version": "v1", "nodes": '
    ...     '[{"id": "p", "node_type": "PassThroughNode"}]}')
    >>> nodes[0].name
    'p'
"""

from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ManifestError, NodeTypeError
from .node import check_node_name
from .registry import get_node_class

__all__ = ["MANIFEST_VERSION", "load_manifest", "node_from_entry", "parse_connections"]

MANIFEST_VERSION = "v1"
_TOP_KEYS = {"version", "metadata", "nodes", "connections"}
_NODE_KEYS = {"id", "node_type", "params", "options"}


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


def node_from_entry(entry: Any, where: str, default_id: Optional[str] = None) -> Any:
    """Instantiate one manifest node entry ``{"id", "node_type", "params", "options"}``."""
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
    cls = get_node_class(node_type, f"{where}.node_type")
    kwargs = dict(params)
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


def load_manifest(manifest: Union[str, bytes, Mapping[str, Any]]) -> Tuple[List[Any], Optional[List[Tuple[str, str]]], Optional[str]]:
    """Parse and validate a manifest; returns ``(nodes, connections or None, name)``.

    Graph checks (unknown ids, cycles) happen when the Pipeline is built.
    """
    data = _as_dict(manifest)
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ManifestError(f"unknown key(s) {', '.join(map(repr, unknown))}; a manifest has {sorted(_TOP_KEYS)}", "manifest")
    version = data.get("version")
    if version != MANIFEST_VERSION:
        raise ManifestError(f"unsupported manifest version {version!r}; expected {MANIFEST_VERSION!r}", "version")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, Sequence) or isinstance(raw_nodes, (str, bytes)):
        raise ManifestError("'nodes' must be a list of node entries", "nodes")
    nodes = [node_from_entry(e, f"nodes[{i}]") for i, e in enumerate(raw_nodes)]
    connections = parse_connections(data["connections"]) if data.get("connections") is not None else None
    meta = data.get("metadata")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise ManifestError("'metadata' must be an object", "metadata")
    name = meta.get("name")
    return nodes, connections, name if isinstance(name, str) else None
