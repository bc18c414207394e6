"""The remotemedia supervisor: worker processes, their states, the CLI.

Not related to supervisord's ``supervisor`` package, which imports under the same name: do
not install both in one environment.
"""

from .arbiter import RunReport, Supervisor

__all__ = ["Supervisor", "RunReport"]
