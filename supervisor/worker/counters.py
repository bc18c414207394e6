"""What a worker counts (reported in Heartbeat and Done, see Runner.stats)."""

from __future__ import annotations

from remotemedia import _ipc_bridge as bridge

from ..stats import LatencyStats


class Counters(bridge.FrameCounts):
    """Frames in and out, errors, dead letters and process() latency of one worker; shared
    by the loop, the emitter and the source stepper. ``frames_in`` and ``frames_out`` (bumped
    every frame) live in the bridge's ``FrameCounts``, which its stage loop bumps directly."""

    __slots__ = ("errors", "dead_letters", "latency", "serve_turns", "serve_steps")

    def __init__(self) -> None:
        self.errors = 0
        self.dead_letters = 0
        self.latency = LatencyStats()
        # the bridge's loop (StageLoop.serve): its hand-backs to the runner, the frames it took
        self.serve_turns = 0
        self.serve_steps = 0
