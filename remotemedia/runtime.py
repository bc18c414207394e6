"""The seed API's module name for the async one-call API: ``from remotemedia.runtime import
execute_pipeline`` keeps working. It only re-exports, through the facade's late import
(``remotemedia._runtime()``), what :mod:`supervisor.api` exports (``execute_pipeline``,
``execute_pipeline_with_input``, ``plan_run``, ``supervisor_options``, ``Outputs``,
``RUN_OPTIONS``, ...). New code imports from :mod:`remotemedia` (or :mod:`remotemedia.runs`
for the run options and :class:`~remotemedia.runs.Outputs`).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    from . import _runtime

    if not name.startswith("_"):
        try:
            return getattr(_runtime(), name)
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
