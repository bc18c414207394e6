"""What a worker counts (reported in Heartbeat and Done, see Runner.stats)."""

from __future__ import annotations

from ..stats import LatencyStats


class Counters:
    """Frames in and out, errors, dead letters and process() latency of one worker; shared
    by the loop, the emitter and the source stepper (plain attributes: bumped every frame)."""

    __slots__ = ("frames_in", "frames_out", "errors", "dead_letters", "latency", "serve_turns", "serve_steps")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.errors = 0
        self.dead_letters = 0
        self.latency = LatencyStats()
        # the bridge's loop (StageLoop.serve): its hand-backs to the runner, the frames it took
        self.serve_turns = 0
        self.serve_steps = 0
