"""The main example with its light stages grouped: two worker processes instead of four.

    tone (SineSource) -> [ gain -> level -> gate ]  (one Group, one worker)

Run it with:

    remotemedia-supervisor start examples/grouped_levels.py

A gain, an RMS meter and a threshold each take microseconds per chunk; as separate stages every
chunk would also pay three hops (a copy, a wake-up, the worker loop). As a ``Group`` the chunk
goes from one member to the next with a plain call. The members are ordinary nodes, configured
in the parent as usual: ``LevelGate`` keeps its lambda and lookup table.
"""

from audio_levels import LevelGate  # the CLI puts the script's directory on sys.path

from remotemedia import Group, Pipeline
from remotemedia.nodes import GainNode, RMSNode, SineSource


def build():
    return Pipeline(
        [
            SineSource(frequency=440.0, sample_rate=16000, chunk=1600, seconds=2.0, name="tone"),
            Group(
                [
                    GainNode(gain_db=-12.0, name="gain"),
                    RMSNode(name="level"),
                    LevelGate(threshold_db=-20.0, label=lambda s: s.upper(), name="gate"),
                ],
                name="meter",
            ),
        ],
        name="grouped-levels",
    )
