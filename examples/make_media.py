"""Test media made locally, for the real-media examples and tests/test_media.py.

- :func:`make_speech`: sentences spoken by espeak-ng (a Debian package: ``apt-get install
  espeak-ng``), trimmed to the speech, placed in quiet noise at known offsets, written with
  soundfile (FLAC, WAV or OGG by extension). Returns where the speech is.
- :func:`make_video`: generated frames (a moving square on a gradient, still for a while,
  then moving) encoded as H.264 in MP4 with PyAV.

Run it to write both into examples/media/::

    $ python examples/make_media.py
    examples/media/speech.flac: speech at [[1.0, 3.009], [4.509, 6.828]] s
    examples/media/clip.mp4: 90 frames 640x360 at 30 fps
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Sequence, Tuple

import numpy as np

SENTENCES = ("This is a test of voice activity detection.", "The quick brown fox jumps over the lazy dog.")
#: Seconds of silence before each sentence, and after the last one.
GAPS = (1.0, 1.5, 1.0)
HERE = os.path.dirname(os.path.abspath(__file__))
MEDIA = os.path.join(HERE, "media")


def espeak_path() -> str:
    """The espeak-ng executable, or a RuntimeError saying how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    return exe


def speak(text: str) -> Tuple[np.ndarray, int]:
    """``text`` spoken by espeak-ng as float32 mono, trimmed to the voiced part."""
    import soundfile

    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "s.wav")
        subprocess.run([espeak_path(), "-w", wav, text], check=True, capture_output=True, timeout=60)
        x, rate = soundfile.read(wav, dtype="float32")
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return x[loud[0] : loud[-1] + 1], int(rate)


def make_speech(path: str, sentences: Sequence[str] = SENTENCES, gaps: Sequence[float] = GAPS, noise_db: float = -60.0) -> List[Tuple[float, float]]:
    """Write the sentences with ``gaps[i]`` seconds of noise before sentence ``i`` (and
    ``gaps[-1]`` after the last); returns each sentence's ``(start, end)`` in seconds."""
    import soundfile

    if len(gaps) != len(sentences) + 1:
        raise ValueError(f"need {len(sentences) + 1} gaps for {len(sentences)} sentences, got {len(gaps)}")
    parts, truth, t, rate = [], [], 0, 0
    for text, gap in zip(sentences, gaps):
        voice, rate = speak(text)
        parts.append(np.zeros(int(round(gap * rate)), np.float32))
        t += parts[-1].size
        truth.append((round(t / rate, 3), round((t + voice.size) / rate, 3)))
        parts.append(voice)
        t += voice.size
    parts.append(np.zeros(int(round(gaps[-1] * rate)), np.float32))
    audio = np.concatenate(parts)
    noise = np.random.default_rng(0).normal(0.0, 10 ** (noise_db / 20), audio.size).astype(np.float32)
    soundfile.write(path, audio + noise, rate)
    return truth


def video_frames(frames: int, width: int, height: int, still: int = 0):
    """RGB frames: a gradient with a bright square that stays put for the first ``still``
    frames, then moves 8 px a frame."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(1, width - 1)), (yy * 255 // max(1, height - 1)), np.full_like(xx, 96)], -1).astype(np.uint8)
    side = max(8, min(width, height) // 6)
    for i in range(frames):
        f = base.copy()
        x = (max(0, i - still) * 8) % max(1, width - side)
        f[height // 3 : height // 3 + side, x : x + side] = 255
        yield f


def make_video(path: str, frames: int = 90, width: int = 640, height: int = 360, fps: int = 30, still: int = 30) -> None:
    """Encode :func:`video_frames` as H.264 (yuv420p) in MP4 with PyAV."""
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for f in video_frames(frames, width, height, still):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def main() -> int:
    os.makedirs(MEDIA, exist_ok=True)
    speech = os.path.join(MEDIA, "speech.flac")
    truth = make_speech(speech)
    print(f"{os.path.relpath(speech)}: speech at {[list(t) for t in truth]} s")
    clip = os.path.join(MEDIA, "clip.mp4")
    make_video(clip)
    print(f"{os.path.relpath(clip)}: 90 frames 640x360 at 30 fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
