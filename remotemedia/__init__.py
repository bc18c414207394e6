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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import errors
from .frames import Frame, FrameInfo
from .node import Node, NodeOptions, Source
from .pipeline import Pipeline
from .group import Group
from .registry import register_node, registered_types
from . import nodes as nodes  # registers the built-in node types

if TYPE_CHECKING:
    from supervisor.core import RunReport, Supervisor

    from .runtime import execute_pipeline, execute_pipeline_with_input

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


def __getattr__(name: str):
    # Loaded on first use: the supervisor package imports remotemedia (a cycle otherwise), and
    # every worker process imports remotemedia without needing the runtime (asyncio) or the
    # arbiter, whose imports would add to each worker's start-up.
    if name in ("Supervisor", "RunReport"):
        from supervisor import core

        return getattr(core, name)
    if name in ("execute_pipeline", "execute_pipeline_with_input"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'remotemedia' has no attribute {name!r}")
