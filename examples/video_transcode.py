"""Decode an MP4, score motion, and encode an annotated MP4, each stage its own process.

    read (VideoFileSource) -> resize (VideoResizeNode) -> motion (FrameDiffNode)
         -> annotate (MotionBar, defined here) -> write (VideoFileSink, H.264)

Needs ``pip install 'remotemedia[media]'``.

    python examples/video_transcode.py [IN.mp4 [OUT.mp4]]
    remotemedia-supervisor start examples/video_transcode.py

Without IN it uses examples/media/clip.mp4 (made first with PyAV when missing); OUT defaults
to examples/media/annotated.mp4. The output has a bar along the top whose length is the
frame's motion score.
"""

import json
import os
import sys


from remotemedia import Node, Pipeline
from remotemedia.media import VideoFileSink, VideoFileSource, VideoResizeNode
from remotemedia.nodes import FrameDiffNode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_media  # noqa: E402  (beside this file)


class MotionBar(Node):
    """Draws the motion score (0..``full_scale``) as a red bar across the top of the frame."""

    def __init__(self, full_scale: float = 20.0, **kw):
        super().__init__(**kw)
        self.full_scale = full_scale

    def process(self, data):
        frame = data["frame"].copy()  # the input lives in shared memory owned by the sender
        h, w = frame.shape[:2]
        length = int(w * min(1.0, data["motion"] / self.full_scale))
        frame[: max(2, h // 30), :length] = (255, 0, 0)
        return {**data, "frame": frame}


def default_clip() -> str:
    path = os.path.join(make_media.MEDIA, "clip.mp4")
    if not os.path.exists(path):
        os.makedirs(make_media.MEDIA, exist_ok=True)
        make_media.make_video(path)
    return path


def build(src: str = "", dst: str = "") -> Pipeline:
    src = src or os.environ.get("VIDEO_IN") or default_clip()
    dst = dst or os.environ.get("VIDEO_OUT") or os.path.join(make_media.MEDIA, "annotated.mp4")
    return Pipeline(
        [
            VideoFileSource(src, name="read"),
            VideoResizeNode(width=320, name="resize"),
            FrameDiffNode(keep_frame=True, name="motion"),
            MotionBar(name="annotate"),
            VideoFileSink(dst, crf=23, name="write"),
        ],
        name="video-transcode",
    )


if __name__ == "__main__":
    args = sys.argv[1:] + ["", ""]
    for summary in build(args[0], args[1]).run():
        print(json.dumps(summary))
