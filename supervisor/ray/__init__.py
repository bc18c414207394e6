"""Backend ``ray``: a pipeline across hosts on a Ray cluster (see the README's "Across hosts").

One module per concern:

* :mod:`~supervisor.ray.plan`: the pipeline cut into host parts (pure);
* :mod:`~supervisor.ray.edges`: the cross-host edge protocol (sequence numbers, incarnations,
  retention, replay, duplicates; pure);
* :mod:`~supervisor.ray.state`: the run's state actor (incarnations, checkpoints);
* :mod:`~supervisor.ray.agent`: ``HostAgent``, one Ray actor per host, running its part under
  a local Supervisor;
* :mod:`~supervisor.ray.driver`: :class:`RaySupervisor`, placement, the caller's edges,
  status.

Only ``agent`` and ``driver`` import Ray, and only ``Supervisor(..., backend="ray")`` imports
them: the local backend never imports Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ray_supervisor_class", "RAY_EXTRA_HINT"]

RAY_EXTRA_HINT = "backend='ray' needs Ray: pip install 'remotemedia[ray]'"


def ray_supervisor_class() -> Any:
    """The Supervisor class of backend ``ray`` (imports Ray). SupervisorError when Ray is not
    installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        from remotemedia.errors import SupervisorError

        raise SupervisorError(RAY_EXTRA_HINT) from None
    from .driver import RaySupervisor

    return RaySupervisor
