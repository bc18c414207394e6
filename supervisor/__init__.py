"""The remotemedia runtime: the user API behind the ``remotemedia`` facade (``api``), the
public Supervisor (``core``), the caller's data path (``gateway``), the supervision loop
(``arbiter``) and its worker-process objects (``process``, ``states``), the worker loop (``worker``),
the inline executor (``inline``), the CLI. It imports the model (``remotemedia``); the model
reaches it only through the facade's one late import, ``remotemedia._runtime()``.

Not related to supervisord's ``supervisor`` package, which imports under the same name: do
not install both in one environment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import RunReport, Supervisor

__all__ = ["Supervisor", "RunReport"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: every worker process imports this package (``python -m
    # supervisor.worker``) and has no use for the arbiter, whose imports cost it ~0.15 s of
    # start-up, ten times over for a ten-node pipeline on two cores.
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
