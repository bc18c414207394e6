"""The runtime's user API: ``execute_pipeline`` / ``execute_pipeline_with_input`` (async) and
the engine of :meth:`Pipeline.run <remotemedia.Pipeline.run>`.

Users reach it through the package facade (``from remotemedia import execute_pipeline``, or
``remotemedia.runtime``, the seed API's module name): the model (``remotemedia/``) never
imports the runtime, and the facade's ``remotemedia._runtime()`` is the one place that loads
this module late (see ``tests/test_layers.py``)::

    remotemedia (model: Node, Pipeline, manifest, frames, errors, runs)
        ▲ imports                            │ Pipeline.run() / remotemedia.execute_pipeline
        │                                    ▼ remotemedia._runtime()  (the one late import)
    supervisor (runtime: api ─▶ core ─▶ arbiter, inline ─▶ worker processes)

Every entry point parses its keywords in one place, :func:`plan_run`, against one table: the
:class:`~remotemedia.Supervisor` options plus :data:`~remotemedia.runs.RUN_OPTIONS` (the seed
API's keywords). An unknown keyword raises :class:`~remotemedia.errors.RunOptionError` (a
TypeError) listing the valid ones.

Both accept a :class:`~remotemedia.Pipeline`, a list of Node instances, a manifest dict or JSON
string, or a list mixing instances and manifest node dicts. They run the pipeline on the
multiprocess runtime (in a thread, so the event loop stays free) and return every output of
the terminal node(s), ordered by the input it derives from. The instances are the ones you
configured: their state crosses to the workers by cleanup-then-cloudpickle.

Example::

    import asyncio
    from remotemedia import execute_pipeline_with_input
    from remotemedia.nodes import MapNode

    async def main():
        return await execute_pipeline_with_input([MapNode(lambda x: x * 3)], [1, 2, 3])

    asyncio.run(main())     # -> [3, 6, 9]

A pipeline without a Source, run without inputs, runs once on a single ``None`` input (the
seed API's one-shot form)::

    await execute_pipeline([PassThroughNode(name="test")])      # -> [] (None means "no output")
"""

from __future__ import annotations

import asyncio
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional

from remotemedia.errors import NodeTypeError, RunOptionError
from remotemedia.pipeline import as_pipeline
from remotemedia.options import SUPERVISOR_KEYS
from remotemedia.runs import RUN_OPTIONS, Outputs, node_metrics, resolve_inputs

from .core import RunReport, Supervisor
from .inline import resolve_executor, run_inline

__all__ = [
    "execute_pipeline",
    "execute_pipeline_with_input",
    "run_pipeline",
    "plan_run",
    "supervisor_options",
    "Supervisor",
    "RunReport",
    "Outputs",
    "RUN_OPTIONS",
]



def supervisor_options() -> FrozenSet[str]:
    """The keyword options of :class:`~remotemedia.Supervisor`: the options table's
    (tests/test_options.py checks that they are its signature's)."""
    return frozenset(SUPERVISOR_KEYS)


@dataclass
class RunPlan:
    """What an entry point runs: the pipeline, its inputs (``[None]`` for a one-shot run) and
    its options split into the Supervisor's and :data:`RUN_OPTIONS`."""

    pipeline: Any
    inputs: Optional[Iterable[Any]]
    supervisor_options: Dict[str, Any] = field(default_factory=dict)
    run_options: Dict[str, Any] = field(default_factory=dict)
    executor: str = "multiprocess"

    def run(self) -> Any:
        """Run it (blocking) and return the RunReport."""
        if self.executor == "inline":
            return run_inline(self.pipeline, self.inputs, **self.supervisor_options)
        # run() starts the workers itself: under its signal handlers, so that a signal while
        # they start drains instead of killing the process with the workers running.
        return Supervisor(self.pipeline, **self.supervisor_options).run(self.inputs)

    def result(self, report: Any) -> List[Any]:
        """The entry point's return value from the run's RunReport."""
        if self.run_options["enable_metrics"]:
            return Outputs(report.outputs, node_metrics(report.nodes))
        return report.outputs


def plan_run(pipeline_or_manifest: Any, inputs: Optional[Iterable[Any]], options: Mapping[str, Any], where: str) -> RunPlan:
    """Parse an entry point's keywords (the one place that does) and decide what runs.

    ``inputs`` None on a pipeline without a Source means the one-shot form: the pipeline runs
    once on a single ``None`` input. With a Source, None means "driven by the sources".

    Raises:
        RunOptionError: a keyword that is neither a Supervisor option nor in RUN_OPTIONS.
        and whatever building the pipeline raises.
    """
    valid = supervisor_options() | RUN_OPTIONS.keys()
    unknown = [k for k in options if k not in valid]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k) for k in unknown]
        raise RunOptionError(
            f"{where}() got unknown keyword argument(s) {', '.join(hints)}; valid keywords: "
            f"{', '.join(sorted(RUN_OPTIONS))} and the Supervisor options {', '.join(sorted(supervisor_options()))}"
        )
    run_options = {k: options.get(k, d) for k, d in RUN_OPTIONS.items()}
    executor = resolve_executor(run_options["executor"], run_options["use_rust"])
    # (trust_instances is about loading a manifest: once the pipeline is built it is spent)
    pipeline = as_pipeline(pipeline_or_manifest, trust_instances=options.get("trust_instances", False))
    if inputs is None and not pipeline.sources:
        inputs = [None]
    sup_options = {k: v for k, v in options.items() if k not in RUN_OPTIONS and k != "trust_instances"}
    return RunPlan(pipeline, inputs, sup_options, run_options, executor)


def run_pipeline(
    pipeline: Any, inputs: Optional[Iterable[Any]], input_data: Optional[Iterable[Any]], options: Mapping[str, Any]
) -> List[Any]:
    """The body of :meth:`Pipeline.run <remotemedia.Pipeline.run>` (blocking; arguments and
    errors as documented there), which reaches it through the facade."""
    plan = plan_run(pipeline, resolve_inputs(inputs, input_data, "Pipeline.run"), options, "Pipeline.run")
    return plan.result(plan.run())


async def _run(pipeline_or_manifest: Any, inputs: Optional[Iterable[Any]], options: Mapping[str, Any], where: str) -> List[Any]:
    plan = plan_run(pipeline_or_manifest, inputs, options, where)
    if plan.executor == "inline":
        # in a thread like the multiprocess runtime: the event loop stays free
        return plan.result(await asyncio.to_thread(plan.run))
    sup = Supervisor(plan.pipeline, **plan.supervisor_options)
    try:
        report = await asyncio.to_thread(sup.run, plan.inputs)
    except asyncio.CancelledError:
        sup.kill()
        await asyncio.to_thread(sup.join)
        raise
    return plan.result(report)


async def execute_pipeline(pipeline_or_manifest: Any, **options: Any) -> List[Any]:
    """Run a pipeline and return the terminal outputs.

    A pipeline with a Source runs until its sources end. A pipeline without one runs once on
    a single ``None`` input (the one-shot form)::

        result = await execute_pipeline([PassThroughNode(name="test")])   # []: PassThroughNode returns the None, and None means "no output"

    ``options``: the :class:`~remotemedia.Supervisor` options and ``enable_metrics=True``
    (return an :class:`Outputs` list whose ``.metrics`` holds per-node frames in/out,
    process time p50/p99, restarts and errors).
    ``executor="inline"`` (or ``use_rust=False``) runs the pipeline in this process on your own
    node objects (see ``supervisor.inline``); ``executor="multiprocess"`` (the default, or
    ``use_rust=True``: the runtime whose transport is the Rust bridge) in supervised workers.

    Raises:
        ValueError: empty pipeline, bad connections (PipelineValidationError).
        TypeError: items that are not nodes or manifest dicts (NodeTypeError); an unknown
            keyword (RunOptionError, listing the valid ones).
        NodeError / NodeInitError / SerializationError: a node failed (e.g. the first node
            of a one-shot run cannot take None).
    """
    return await _run(pipeline_or_manifest, None, options, "execute_pipeline")


async def execute_pipeline_with_input(
    pipeline_or_manifest: Any,
    inputs: Optional[Iterable[Any]] = None,
    *,
    input_data: Optional[Iterable[Any]] = None,
    **options: Any,
) -> List[Any]:
    """Feed every item of ``inputs`` (or ``input_data``, the seed API's name for it) to the
    pipeline's input nodes and return all outputs of the terminal node(s), in input order.

    ``options`` as for :func:`execute_pipeline` (``enable_metrics=True`` returns
    :class:`Outputs`).

    Raises:
        TypeError: ``inputs`` is missing, given twice, or not an iterable of frames (a str,
            bytes or dict is refused); an unknown keyword (RunOptionError).
        and everything :func:`execute_pipeline` raises.
    """
    inputs = resolve_inputs(inputs, input_data, "execute_pipeline_with_input")
    if inputs is None:
        raise NodeTypeError(
            "execute_pipeline_with_input needs inputs (an iterable of frames); "
            "for a one-shot or source-driven run use execute_pipeline(pipeline)"
        )
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise NodeTypeError(
            f"inputs must be an iterable of frames (e.g. a list), got {type(inputs).__name__}"
        )
    return await _run(pipeline_or_manifest, list(inputs), options, "execute_pipeline_with_input")
