"""How a pipeline is cut into host parts (backend ``ray``): pure, no Ray.

Every node goes to the part of its host (its ``host`` option, else a manifest's ``host``;
None: the driver's host). Each part runs under a local Supervisor, where its edges are
ordinary iceoryx2 edges: the driver's host's part in the driver process (with the caller's
edges to its nodes), every other host's in that host's agent. An edge between two parts is
*cut*: inside each part it ends in the part's gateway (``__input__ -> node`` for a cut edge
into it, ``node -> __output__`` for one out of it), and between the parts its frames cross
with the protocol of :mod:`supervisor.ray.edges`. So do the caller's edges to and from nodes
on other hosts (the other end is :data:`CALLER`).

Example::

    >>> from remotemedia import Pipeline
    >>> from remotemedia.nodes import PassThroughNode
    >>> p = Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b", options={"host": "gpu"})])
    >>> parts = plan_parts(p)
    >>> sorted(parts, key=str)
    [None, 'gpu']
    >>> parts[None].edges         # the caller's input edge stays local; a -> b is cut
    [('__input__', 'a'), ('a', '__output__')]
    >>> parts["gpu"].cut_in       # local edge 0 is global edge 1, from the driver's host's part
    {0: (1, None)}
    >>> parts["gpu"].cut_out      # b's outputs go to the caller
    {1: (2, '__caller__')}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from remotemedia.errors import PipelineValidationError
from remotemedia.manifest import node_host
from remotemedia.pipeline import INPUT, OUTPUT

__all__ = ["Part", "plan_parts", "node_placement", "CALLER", "host_text"]

#: The caller's end of an edge (the driver process): ``__input__`` / ``__output__``.
CALLER = "__caller__"


def node_placement(node: Any) -> Optional[str]:
    """Where a node runs: its ``host`` option, else its manifest entry's ``host``, else None
    (the driver's host)."""
    host = (getattr(node, "options", None) or {}).get("host")
    return host if host is not None else node_host(node)


def host_text(host: Optional[str]) -> str:
    """A host as status and logs show it."""
    return "(driver)" if host is None else host


@dataclass
class Part:
    """The nodes of one host and their edges.

    ``edges``: the part's local edges ``(src, dst)`` in local index order; ``global_index``:
    the pipeline's edge index of each. ``cut_in`` / ``cut_out``: local edge index -> (global
    edge index, the host at the other end: a host name, None for the driver's host's part, or
    :data:`CALLER` for the caller's inputs and outputs)."""

    host: Optional[str]
    nodes: List[str] = field(default_factory=list)
    edges: List[Tuple[str, str]] = field(default_factory=list)
    global_index: List[int] = field(default_factory=list)
    cut_in: Dict[int, Tuple[int, Any]] = field(default_factory=dict)
    cut_out: Dict[int, Tuple[int, Any]] = field(default_factory=dict)

    def local_connections(self) -> List[Tuple[str, str]]:
        return [(a, b) for a, b in self.edges if a not in (INPUT, OUTPUT) and b not in (INPUT, OUTPUT)]


def plan_parts(pipeline: Any) -> Dict[Optional[str], Part]:
    """The host parts of ``pipeline``, by host (None: the driver's host), each listing its
    nodes in the pipeline's topological order."""
    for n in pipeline.nodes:
        if ((getattr(n, "options", None) or {}).get("replicas") or 1) > 1:
            # (a host part's cut edges are numbered by the part's own edge list, which
            # replicas would expand)
            raise PipelineValidationError(
                f"node {n.name!r}: replicas are not supported with backend='ray' yet; run it with "
                f"replicas=1, or run the pipeline with backend='local'"
            )
    where = {n.name: node_placement(n) for n in pipeline.nodes}
    parts: Dict[Optional[str], Part] = {}
    for name in pipeline.order:
        host = where[name]
        parts.setdefault(host, Part(host)).nodes.append(name)
    for g, (src, dst) in enumerate(pipeline.edges()):
        # The caller is on the driver's host: its edges to the nodes there stay local.
        src_host = None if src == INPUT else where[src]
        dst_host = None if dst == OUTPUT else where[dst]
        if src_host == dst_host:
            part = parts[src_host]
            part.edges.append((src, dst))
            part.global_index.append(g)
            continue
        if src != INPUT:
            part = parts[src_host]
            part.cut_out[len(part.edges)] = (g, CALLER if dst == OUTPUT else dst_host)
            part.edges.append((src, OUTPUT))
            part.global_index.append(g)
        if dst != OUTPUT:
            part = parts[dst_host]
            part.cut_in[len(part.edges)] = (g, CALLER if src == INPUT else src_host)
            part.edges.append((INPUT, dst))
            part.global_index.append(g)
    return parts
