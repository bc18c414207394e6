"""Synthetic 1080p video: fan-out to two analysis branches, fan-in to a summary.

    video -> motion (FrameDiffNode) ---\\
          \\-> thumb (Thumbnail) --------> summary (Summary)

    remotemedia-supervisor start examples/video_motion.py

Each 1080p RGB frame (6.2 MB) crosses process boundaries through iceoryx2 shared memory and
is read by the next stage without a copy.
"""

import numpy as np

from remotemedia import Node, Pipeline
from remotemedia.nodes import FrameDiffNode, SyntheticVideoSource


class Thumbnail(Node):
    def __init__(self, step: int = 8, **kw):
        super().__init__(**kw)
        self.step = step

    def process(self, data):
        return {"index": data["index"], "thumb": np.ascontiguousarray(data["frame"][:: self.step, :: self.step])}


class Summary(Node):
    def process(self, data):
        if "motion" in data:
            return {"index": data["index"], "motion": round(data["motion"], 2)}
        return {"index": data["index"], "thumb": data["thumb"].shape}


pipeline = Pipeline(
    [
        SyntheticVideoSource(width=1920, height=1080, frames=30, name="video"),
        FrameDiffNode(name="motion"),
        Thumbnail(name="thumb"),
        Summary(name="summary"),
    ],
    connections=[("video", "motion"), ("video", "thumb"), ("motion", "summary"), ("thumb", "summary")],
    name="video-motion",
)
