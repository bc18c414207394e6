"""``execute_pipeline`` / ``execute_pipeline_with_input``: the async one-call API.

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
"""

from __future__ import annotations

import asyncio
from typing import Any, Iterable, List, Optional

from .errors import NodeTypeError, PipelineValidationError

__all__ = ["execute_pipeline", "execute_pipeline_with_input"]


async def _run(pipeline_or_manifest: Any, inputs: Optional[List[Any]], options: dict) -> List[Any]:
    from supervisor.arbiter import Supervisor, as_pipeline
    from supervisor.inline import resolve_executor, run_inline

    executor = resolve_executor(options.pop("executor", None), options.pop("use_rust", None))
    pipeline = as_pipeline(pipeline_or_manifest, trust_instances=options.pop("trust_instances", False))
    if inputs is None and not pipeline.sources:
        raise PipelineValidationError(
            f"pipeline {pipeline.name!r} has no Source node, so without inputs it has nothing to do; "
            "use execute_pipeline_with_input(pipeline, inputs)"
        )
    if executor == "inline":
        # in a thread like the multiprocess runtime: the event loop stays free
        return (await asyncio.to_thread(run_inline, pipeline, inputs, **options)).outputs
    sup = Supervisor(pipeline, **options)
    try:
        report = await asyncio.to_thread(sup.run, inputs)
    except asyncio.CancelledError:
        sup.kill()
        await asyncio.to_thread(sup.join)
        raise
    return report.outputs


async def execute_pipeline(pipeline_or_manifest: Any, **options: Any) -> List[Any]:
    """Run a pipeline driven by its Source node(s) and return the terminal outputs.

    ``options`` are :class:`~remotemedia.Supervisor` options, and ``executor=``
    (``"multiprocess"``, the default, or ``"inline"``: in this process, on your own node
    objects, see ``supervisor.inline``) or ``use_rust=`` (True: multiprocess, whose transport
    is the Rust bridge; False: inline).

    Raises:
        ValueError: empty pipeline, bad connections, no Source (PipelineValidationError).
        TypeError: items that are not nodes or manifest dicts (NodeTypeError).
        NodeError / NodeInitError / SerializationError: a node failed.
    """
    return await _run(pipeline_or_manifest, None, options)


async def execute_pipeline_with_input(pipeline_or_manifest: Any, inputs: Iterable[Any], **options: Any) -> List[Any]:
    """Feed every item of ``inputs`` to the pipeline's input nodes and return all outputs of
    the terminal node(s), in input order.

    Raises:
        TypeError: ``inputs`` is not an iterable of frames (a str, bytes or dict is refused).
        and everything :func:`execute_pipeline` raises.
    """
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Iterable):
        raise NodeTypeError(
            f"inputs must be an iterable of frames (e.g. a list), got {type(inputs).__name__}"
        )
    return await _run(pipeline_or_manifest, list(inputs), options)
