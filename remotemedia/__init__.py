"""remotemedia: media/ML pipelines of Python nodes, run as supervised worker processes that
exchange frames through iceoryx2 shared memory.

Example::

    from remotemedia import Node, Pipeline

    class Double(Node):
        def process(self, data):
            return data * 2

    print(Pipeline([Double(), Double()]).run([1, 2, 3]))   # [4, 8, 12]

Public names: :class:`Node`, :class:`Source`, :class:`Pipeline`, :class:`Supervisor`,
:func:`execute_pipeline`, :func:`execute_pipeline_with_input`, :func:`register_node`,
:class:`Frame`, :class:`Group` (several nodes in one worker); errors live in :mod:`remotemedia.errors`.

Layers: this package is the model (nodes, pipelines, manifests, frames, errors, run options)
and never imports the runtime (the ``supervisor`` package); the runtime imports the model.
This module, the facade, is the one exception: :func:`_runtime` loads the runtime's user API
(:mod:`supervisor.api`) on first use, for the runtime names exported here (``Supervisor``,
``RunReport``, ``execute_pipeline*``) and for :meth:`Pipeline.run` (tests/test_layers.py
holds every other module to it).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import errors
from .frames import Frame, FrameInfo
from .node import Node, NodeOptions, Source
from .pipeline import Pipeline
from .group import Group
from .registry import register_node, registered_types
from . import nodes as nodes  # registers the built-in node types

__version__ = "0.1.0"

__all__ = [
    "Node",
    "Source",
    "NodeOptions",
    "Pipeline",
    "Group",
    "Supervisor",
    "RunReport",
    "execute_pipeline",
    "execute_pipeline_with_input",
    "register_node",
    "registered_types",
    "Frame",
    "FrameInfo",
    "errors",
    "__version__",
]


#: Names of the runtime's user API that the facade exports (loaded on first use).
_RUNTIME_NAMES = ("Supervisor", "RunReport", "execute_pipeline", "execute_pipeline_with_input")


def _runtime() -> ModuleType:
    """The runtime's user API, :mod:`supervisor.api`: the one sanctioned import of the runtime
    from the model, done late. Late because the runtime imports this package (a cycle
    otherwise), and because every worker process imports this package without needing the
    runtime (asyncio) or the arbiter, whose imports would add to each worker's start-up."""
    from supervisor import api

    return api


def __getattr__(name: str) -> Any:
    if name in _RUNTIME_NAMES:
        return getattr(_runtime(), name)
    raise AttributeError(f"module 'remotemedia' has no attribute {name!r}")
