"""Media I/O nodes on real codecs (the ``media`` extra: ``pip install 'remotemedia[media]'``).

Audio (soundfile / libsndfile: WAV, FLAC, OGG, ...):
:class:`AudioFileSource`, :class:`AudioFileSink`, and :class:`AudioResampleNode` (soxr, a
streaming resampler that keeps its filter state across chunks).
Video (PyAV / libav: H.264 in MP4, ...): :class:`VideoFileSource`, :class:`VideoFileSink`,
:class:`VideoResizeNode` (libswscale).

Frames follow the built-in nodes' conventions (:mod:`remotemedia.nodes`):

- audio: ``{"samples": float32 array, "sample_rate": int, "channels": int, "index": int,
  "time": float}``; ``samples`` is shaped ``(n,)`` for mono and ``(n, channels)`` otherwise,
  ``time`` is the chunk's start in seconds;
- video: ``{"frame": uint8 array H x W x 3 (RGB), "index": int, "pts": float, "fps": float}``;
  ``pts`` is the presentation time in seconds.

Sinks write as frames arrive and emit one summary dict at end of stream
(``{"path", "frames", ...}``), so a pipeline ending in a sink still reports what it wrote.

Importing this module registers its node types for manifests (``"node_type":
"AudioFileSource"``, ...). Example::

    from remotemedia import Pipeline
    from remotemedia.media import AudioFileSource, AudioResampleNode, AudioFileSink

    Pipeline([AudioFileSource("in.flac", name="read"),
              AudioResampleNode(to_rate=16000, name="resample"),
              AudioFileSink("out.wav", name="write")]).run()
    # -> [{'path': '/abs/out.wav', 'frames': 48000, 'sample_rate': 16000, 'channels': 1}]
"""

from __future__ import annotations

import os
from fractions import Fraction
from typing import Any, Iterator, Optional

import numpy as np

from .errors import NodeTypeError
from .node import Node, Source
from .registry import register_node

_EXTRA_HINT = "install the media extra: pip install 'remotemedia[media]'"

try:
    import av
    import soundfile
    import soxr
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"remotemedia.media needs soundfile, av and soxr ({_e}); {_EXTRA_HINT}") from _e

__all__ = [
    "AudioFileSource",
    "AudioFileSink",
    "AudioResampleNode",
    "VideoFileSource",
    "VideoFileSink",
    "VideoResizeNode",
]


def _audio(data: Any, where: str) -> np.ndarray:
    samples = data.get("samples") if isinstance(data, dict) else data
    if samples is None:
        raise TypeError(f"{where}: expected an audio frame {{'samples': array, 'sample_rate': int}}, got {data!r:.200}")
    return np.asarray(samples, dtype=np.float32)


def _channels(samples: np.ndarray) -> int:
    return 1 if samples.ndim == 1 else int(samples.shape[1])


def _video(data: Any, where: str) -> np.ndarray:
    frame = np.asarray(data.get("frame") if isinstance(data, dict) else data)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise TypeError(
            f"{where}: expected an RGB frame, a uint8 array H x W x 3 (or {{'frame': array}}), "
            f"got {frame.dtype} {frame.shape}"
        )
    return frame


@register_node
class AudioFileSource(Source):
    """Reads an audio file (any format libsndfile reads: WAV, FLAC, OGG/Vorbis, ...) as float32
    chunks of ``chunk`` frames. Its length is known, so the CLI shows progress.

    Example::

        AudioFileSource("speech.flac", chunk=1600)
        # yields {"samples": float32 (1600,), "sample_rate": 16000, "channels": 1,
        #         "index": 0, "time": 0.0}, ...
    """

    def __init__(self, path: str, chunk: int = 1024, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, path=path, chunk=chunk, **kw)
        if not isinstance(chunk, int) or chunk < 1:
            raise NodeTypeError(f"AudioFileSource chunk must be a positive int (frames per chunk), got {chunk!r}")
        self.path = os.path.abspath(path)
        self.chunk = chunk
        try:
            info = soundfile.info(self.path)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as e:
            raise NodeTypeError(f"AudioFileSource: cannot read {path!r} as an audio file: {e}") from e
        self.sample_rate, self.channels, self.frames = int(info.samplerate), int(info.channels), int(info.frames)

    def generate(self) -> Iterator[dict]:
        start = 0
        for index, block in enumerate(soundfile.blocks(self.path, blocksize=self.chunk, dtype="float32")):
            yield {
                "samples": block,
                "sample_rate": self.sample_rate,
                "channels": self.channels,
                "index": index,
                "time": start / self.sample_rate,
            }
            start += block.shape[0]

    def __len__(self) -> int:
        return -(-self.frames // self.chunk)


@register_node
class AudioFileSink(Node):
    """Writes audio chunks to a file; the format follows the extension (``.wav``, ``.flac``,
    ``.ogg``) unless ``format`` is given (a libsndfile format name such as ``"FLAC"``), with
    libsndfile's default ``subtype`` unless given (``"PCM_16"``, ``"FLOAT"``, ``"VORBIS"``).
    Sample rate and channels come from the first chunk. Emits, at end of stream,
    ``{"path", "frames", "sample_rate", "channels"}``.

    Example::

        AudioFileSink("out.flac", subtype="PCM_24")
    """

    def __init__(
        self,
        path: str,
        format: Optional[str] = None,
        subtype: Optional[str] = None,
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, path=path, format=format, subtype=subtype, **kw)
        self.path = os.path.abspath(path)
        self.format, self.subtype = format, subtype
        if not os.path.isdir(os.path.dirname(self.path)):
            raise NodeTypeError(f"AudioFileSink: the folder of {path!r} does not exist")
        ext = os.path.splitext(self.path)[1].lstrip(".").upper()
        fmt = (format or ext).upper()
        if fmt not in soundfile.available_formats():
            raise NodeTypeError(
                f"AudioFileSink: cannot tell the format of {path!r}; use an extension such as .wav, .flac "
                f"or .ogg, or format= one of {', '.join(sorted(soundfile.available_formats()))}"
            )
        if subtype is not None and not soundfile.check_format(fmt, subtype):
            raise NodeTypeError(
                f"AudioFileSink: subtype {subtype!r} is not valid for {fmt}; use one of "
                f"{', '.join(soundfile.available_subtypes(fmt))}"
            )
        self._file: Any = None
        self._written = 0
        self._rate = 0
        self._channels = 0

    def initialize(self) -> None:
        self._file, self._written = None, 0

    def process(self, data: Any) -> None:
        samples = _audio(data, self.name)
        rate = data.get("sample_rate") if isinstance(data, dict) else None
        if self._file is None:
            if not rate:
                raise ValueError(f"{self.name}: the first audio frame has no 'sample_rate'; the file needs one")
            self._rate, self._channels = int(rate), _channels(samples)
            self._file = soundfile.SoundFile(
                self.path, "w", samplerate=self._rate, channels=self._channels, format=self.format, subtype=self.subtype
            )
        elif (rate and int(rate) != self._rate) or _channels(samples) != self._channels:
            raise ValueError(
                f"{self.name}: a chunk of {_channels(samples)} channel(s) at {rate} Hz after "
                f"{self._channels} channel(s) at {self._rate} Hz; a file has one format (resample first)"
            )
        self._file.write(samples)
        self._written += samples.shape[0]
        return None

    def flush(self) -> dict:
        self._close()
        return {"path": self.path, "frames": self._written, "sample_rate": self._rate, "channels": self._channels}

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def cleanup(self) -> None:
        self._close()


@register_node
class AudioResampleNode(Node):
    """Resamples audio to ``to_rate`` with soxr (``quality``: ``"QQ"``, ``"LQ"``, ``"MQ"``,
    ``"HQ"``, ``"VHQ"``). It is a stream resampler: chunk boundaries leave no clicks, and the
    filter's tail is emitted at end of stream, so the output has the length the rate ratio
    gives. The input rate is the frames' ``sample_rate``; chunks already at ``to_rate`` pass
    through unchanged.

    Example::

        AudioResampleNode(to_rate=16000)   # 44.1 kHz stereo -> 16 kHz stereo
    """

    QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")

    def __init__(self, to_rate: int, quality: str = "HQ", name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, to_rate=to_rate, quality=quality, **kw)
        if not isinstance(to_rate, int) or to_rate < 1:
            raise NodeTypeError(f"AudioResampleNode to_rate must be a positive int (Hz), got {to_rate!r}")
        if quality not in self.QUALITIES:
            raise NodeTypeError(f"AudioResampleNode quality must be one of {', '.join(self.QUALITIES)}, got {quality!r}")
        self.to_rate, self.quality = to_rate, quality
        self.initialize()

    def initialize(self) -> None:
        self._stream: Any = None
        self._from = 0
        self._channels = 0
        self._out = 0
        self._last: dict = {}

    def process(self, data: Any) -> Any:
        samples = _audio(data, self.name)
        rate = data.get("sample_rate") if isinstance(data, dict) else None
        if not rate:
            raise ValueError(f"{self.name}: the audio frame has no 'sample_rate' to resample from")
        rate = int(rate)
        if self._from and (rate != self._from or _channels(samples) != self._channels):
            raise ValueError(
                f"{self.name}: input changed from {self._channels} channel(s) at {self._from} Hz to "
                f"{_channels(samples)} at {rate} Hz mid-stream"
            )
        self._from, self._channels = rate, _channels(samples)
        if rate == self.to_rate:
            return data
        if self._stream is None:
            self._stream = soxr.ResampleStream(rate, self.to_rate, self._channels, dtype="float32", quality=self.quality)
        out = self._stream.resample_chunk(np.ascontiguousarray(samples))
        self._last = dict(data)
        return self._emit(out) if out.shape[0] else None

    def _emit(self, out: np.ndarray) -> dict:
        frame = dict(self._last)
        frame.update(samples=out, sample_rate=self.to_rate, channels=self._channels, time=self._out / self.to_rate)
        self._out += out.shape[0]
        return frame

    def flush(self) -> Optional[dict]:
        if self._stream is None:
            return None
        shape = (0,) if self._channels == 1 else (0, self._channels)
        tail = self._stream.resample_chunk(np.zeros(shape, np.float32), last=True)
        self._stream = None
        return self._emit(tail) if tail.shape[0] else None

    def cleanup(self) -> None:
        self._stream = None  # a C object: rebuilt on the first frame after initialize()


def _open_video(path: str, where: str) -> Any:
    try:
        container = av.open(path)
    except (OSError, av.FFmpegError) as e:
        raise NodeTypeError(f"{where}: cannot open {path!r} as a video file: {e}") from e
    if not container.streams.video:
        container.close()
        raise NodeTypeError(f"{where}: {path!r} has no video stream")
    return container


@register_node
class VideoFileSource(Source):
    """Decodes the first video stream of a file (MP4/H.264, WebM, ... whatever libav reads)
    into RGB frames. The length is the container's frame count when it records one (MP4
    does), so the CLI shows progress.

    Example::

        VideoFileSource("clip.mp4")
        # yields {"frame": uint8 (720, 1280, 3), "index": 0, "pts": 0.0, "fps": 25.0}, ...
    """

    def __init__(self, path: str, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, path=path, **kw)
        self.path = os.path.abspath(path)
        with _open_video(self.path, "VideoFileSource") as c:
            s = c.streams.video[0]
            self.width, self.height = int(s.codec_context.width), int(s.codec_context.height)
            rate = s.average_rate or s.guessed_rate
            self.fps = float(rate) if rate else 0.0
            self.frames = int(s.frames or 0)

    def generate(self) -> Iterator[dict]:
        with av.open(self.path) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(c.decode(stream)):
                pts = float(frame.time) if frame.time is not None else (index / self.fps if self.fps else 0.0)
                yield {"frame": frame.to_ndarray(format="rgb24"), "index": index, "pts": pts, "fps": self.fps}

    def __len__(self) -> int:
        if not self.frames:
            raise TypeError(f"{self.path} does not record its frame count")
        return self.frames


@register_node
class VideoFileSink(Node):
    """Encodes RGB frames into a video file (H.264 in MP4 by default: ``codec="libx264"``,
    ``pix_fmt="yuv420p"``, quality ``crf`` 0-51, lower is better). Size comes from the first
    frame; ``fps`` from the frames' ``fps`` unless given. Frames are stamped in arrival order
    (frame ``i`` at ``i / fps``). Emits, at end of stream,
    ``{"path", "frames", "width", "height", "fps"}``.

    Example::

        VideoFileSink("out.mp4", crf=20)
    """

    def __init__(
        self,
        path: str,
        fps: Optional[float] = None,
        codec: str = "libx264",
        pix_fmt: str = "yuv420p",
        crf: Optional[int] = 23,
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, path=path, fps=fps, codec=codec, pix_fmt=pix_fmt, crf=crf, **kw)
        self.path = os.path.abspath(path)
        if not os.path.isdir(os.path.dirname(self.path)):
            raise NodeTypeError(f"VideoFileSink: the folder of {path!r} does not exist")
        if codec not in av.codecs_available:
            raise NodeTypeError(f"VideoFileSink: this PyAV build has no codec {codec!r} (try 'libx264' or 'mpeg4')")
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
            raise NodeTypeError(f"VideoFileSink fps must be a positive number, got {fps!r}")
        self.fps, self.codec, self.pix_fmt, self.crf = fps, codec, pix_fmt, crf
        self.initialize()

    def initialize(self) -> None:
        self._container: Any = None
        self._stream: Any = None
        self._count = 0

    def _open(self, frame: np.ndarray, data: Any) -> None:
        h, w = frame.shape[:2]
        if self.pix_fmt == "yuv420p" and (h % 2 or w % 2):
            raise ValueError(f"{self.name}: {self.pix_fmt} needs an even width and height, got {w}x{h} (resize first)")
        fps = self.fps or (data.get("fps") if isinstance(data, dict) else None)
        if not fps:
            raise ValueError(f"{self.name}: the frames carry no 'fps'; set VideoFileSink(fps=...)")
        # a rational rate: 29.97 -> 30000/1001, so timestamps stay exact
        rate = Fraction(fps).limit_denominator(1001)
        self._container = av.open(self.path, "w")
        self._stream = self._container.add_stream(self.codec, rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, self.pix_fmt
        if self.crf is not None and self.codec in ("libx264", "libx265"):
            self._stream.options = {"crf": str(self.crf)}
        self._fps = float(rate)

    def process(self, data: Any) -> None:
        frame = _video(data, self.name)
        if self._container is None:
            self._open(frame, data)
        elif (frame.shape[1], frame.shape[0]) != (self._stream.width, self._stream.height):
            raise ValueError(
                f"{self.name}: frame {self._count} is {frame.shape[1]}x{frame.shape[0]}, the video is "
                f"{self._stream.width}x{self._stream.height} (resize first)"
            )
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = self._count
        vf.time_base = 1 / Fraction(self._stream.average_rate)
        for packet in self._stream.encode(vf):
            self._container.mux(packet)
        self._count += 1
        return None

    def flush(self) -> dict:
        width = height = 0
        if self._container is not None:
            width, height = self._stream.width, self._stream.height
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = self._stream = None
        return {"path": self.path, "frames": self._count, "width": width, "height": height, "fps": getattr(self, "_fps", self.fps)}

    def cleanup(self) -> None:
        if self._container is not None:  # an interrupted run: close what was written
            self._container.close()
            self._container = self._stream = None


@register_node
class VideoResizeNode(Node):
    """Scales RGB frames to ``width`` x ``height`` with libswscale (``interpolation``: one of
    PyAV's names, e.g. ``"BILINEAR"``, ``"BICUBIC"``, ``"AREA"``). Give one side as ``None``
    to keep the aspect ratio (rounded to an even number, as yuv420p encoders need).

    Example::

        VideoResizeNode(width=640, height=None)   # 1920x1080 -> 640x360
    """

    def __init__(
        self,
        width: Optional[int] = None,
        height: Optional[int] = None,
        interpolation: str = "AREA",
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, width=width, height=height, interpolation=interpolation, **kw)
        for side, v in (("width", width), ("height", height)):
            if v is not None and (not isinstance(v, int) or v < 2):
                raise NodeTypeError(f"VideoResizeNode {side} must be an int >= 2 or None, got {v!r}")
        if width is None and height is None:
            raise NodeTypeError("VideoResizeNode needs width, height or both")
        self.width, self.height, self.interpolation = width, height, interpolation

    def _size(self, w: int, h: int) -> tuple:
        if self.width and self.height:
            return self.width, self.height
        if self.width:
            return self.width, max(2, round(h * self.width / w / 2) * 2)
        assert self.height
        return max(2, round(w * self.height / h / 2) * 2), self.height

    def process(self, data: Any) -> Any:
        frame = _video(data, self.name)
        w, h = self._size(frame.shape[1], frame.shape[0])
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out = vf.reformat(width=w, height=h, format="rgb24", interpolation=self.interpolation).to_ndarray()
        if isinstance(data, dict):
            return {**data, "frame": out}
        return out
