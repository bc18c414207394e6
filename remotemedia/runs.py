"""What a run takes and returns, as plain data: the model's half of the run API.

:data:`RUN_OPTIONS` (the run keywords beyond the Supervisor options), :func:`resolve_inputs`
(``input_data``, the seed API's name for ``inputs``) and :class:`Outputs` (the list a run
made with ``enable_metrics=True`` returns). Nothing here runs a pipeline: the entry points
(``execute_pipeline*``, :meth:`Pipeline.run <remotemedia.Pipeline.run>`) are the runtime's
(:mod:`supervisor.api`), reached through the package facade, so that the model never imports
the runtime.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

from .errors import NodeTypeError, RunOptionError
from .options import OPTIONS, RUN_KEYS

__all__ = ["RUN_OPTIONS", "Outputs", "node_metrics", "resolve_inputs"]

#: The keywords of the run entry points (execute_pipeline, execute_pipeline_with_input,
#: Pipeline.run) beyond the Supervisor options, with their defaults: the options table's
#: ``run`` rows (:mod:`remotemedia.options`, where their help is).
#: :func:`supervisor.api.plan_run` is the only reader.
RUN_OPTIONS: Dict[str, Any] = {key: OPTIONS[key].default for key in RUN_KEYS}


class Outputs(list):  # type: ignore[type-arg]
    """The outputs of a run made with ``enable_metrics=True``: a plain list of the terminal
    outputs, plus ``metrics``, a dict keyed by node name::

        {"frames_in": 3, "frames_out": 3, "process_time_p50_ms": 0.04,
         "process_time_p99_ms": 1.2, "restarts": 0, "errors": 0}

    Process times are over the node's recent frames (``None`` for a node that processed
    none, e.g. a Source); ``errors`` counts process() exceptions (skipped with
    ``on_error="skip"``).
    """

    def __init__(self, items: Iterable[Any] = (), metrics: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        super().__init__(items)
        self.metrics: Dict[str, Dict[str, Any]] = metrics if metrics is not None else {}

    def __repr__(self) -> str:
        return f"Outputs({list.__repr__(self)}, metrics for {', '.join(self.metrics) or 'no nodes'})"


def node_metrics(nodes: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The ``metrics`` of :class:`Outputs` from a RunReport's ``nodes``."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, s in nodes.items():
        latency = s.get("latency") or {}
        out[name] = {
            "frames_in": s.get("frames_in", 0),
            "frames_out": s.get("frames_out", 0),
            "process_time_p50_ms": latency.get("p50_ms"),
            "process_time_p99_ms": latency.get("p99_ms"),
            "restarts": s.get("restarts", 0),
            "errors": s.get("errors", 0),
        }
    return out




def resolve_inputs(inputs: Optional[Iterable[Any]], input_data: Optional[Iterable[Any]], where: str) -> Optional[Iterable[Any]]:
    """``inputs`` or its alias ``input_data`` (the seed API's name); both at once is refused."""
    if input_data is None:
        return inputs
    if inputs is not None:
        raise RunOptionError(
            f"{where} got the inputs twice, as inputs and as input_data (its alias); pass one of them"
        )
    if isinstance(input_data, (str, bytes, dict)) or not isinstance(input_data, Iterable):
        raise NodeTypeError(
            f"{where}: input_data is an alias of inputs, an iterable of frames; got "
            f"{type(input_data).__name__} (for a single frame x pass input_data=[x])"
        )
    return input_data
