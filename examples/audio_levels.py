"""Main example: a synthetic audio stream through four worker processes.

    tone (SineSource) -> gain (GainNode) -> level (RMSNode) -> gate (LevelGate, defined here)

Run it with:

    remotemedia-supervisor start examples/audio_levels.py

Everything is generated (no media files needed). ``LevelGate`` is defined in this file and
configured with a lambda and a lookup table in the parent process; the supervisor
cloudpickles the configured instance, so the worker gets exactly that state.
"""

from remotemedia import Node, Pipeline
from remotemedia.nodes import GainNode, RMSNode, SineSource


class LevelGate(Node):
    """Labels each chunk as speech-level or silence with a configurable threshold."""

    def __init__(self, threshold_db: float, label, **kw):
        super().__init__(**kw)
        self.threshold_db = threshold_db
        self.label = label  # a lambda: travels with the node
        self.names = {True: "loud", False: "quiet"}  # configured state
        self.count = 0

    def initialize(self):
        self.count = 0  # runtime state is (re)built in the worker

    def process(self, data):
        self.count += 1
        loud = data["dbfs"] > self.threshold_db
        return {"chunk": data["index"], "dbfs": round(float(data["dbfs"]), 2), "state": self.label(self.names[loud]), "n": self.count}


def build():
    return Pipeline(
        [
            SineSource(frequency=440.0, sample_rate=16000, chunk=1600, seconds=2.0, name="tone"),
            GainNode(gain_db=-12.0, name="gain"),
            RMSNode(name="level"),
            LevelGate(threshold_db=-20.0, label=lambda s: s.upper(), name="gate"),
        ],
        name="audio-levels",
    )
