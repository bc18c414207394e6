"""Built-in nodes, registered for manifests under their class names.

Generic: :class:`PassThroughNode`, :class:`MapNode`, :class:`FilterNode`, :class:`BatchNode`,
:class:`UnbatchNode`, :class:`RangeSource`, :class:`CalculatorNode` (upstream's).
Audio (float32 numpy chunks): :class:`SineSource`, :class:`GainNode`, :class:`RMSNode`,
:class:`ChunkerNode`, :class:`ResampleNode`.
Video (uint8 HxWx3 numpy frames): :class:`SyntheticVideoSource`, :class:`FrameDiffNode`.
Files: :class:`FileLinesSource` (text lines), :class:`WavFileSource` (PCM WAV as float32).

Example manifest::

    {"version": "v1",
     "nodes": [{"id": "tone", "node_type": "SineSource", "params": {"seconds": 1.0}},
               {"id": "gain", "node_type": "GainNode", "params": {"gain_db": -6}},
               {"id": "level", "node_type": "RMSNode", "params": {}}]}
"""

from __future__ import annotations

import importlib
import os
import wave
from typing import Any, Callable, Iterator, List, Optional, Union

import numpy as np

from .errors import NodeTypeError
from .node import Node, Source
from .registry import register_node

__all__ = [
    "PassThroughNode",
    "MapNode",
    "FilterNode",
    "BatchNode",
    "UnbatchNode",
    "RangeSource",
    "CalculatorNode",
    "SineSource",
    "GainNode",
    "RMSNode",
    "ChunkerNode",
    "ResampleNode",
    "SyntheticVideoSource",
    "FrameDiffNode",
    "FileLinesSource",
    "WavFileSource",
]


def _resolve_callable(fn: Union[Callable[..., Any], str], node: str) -> Callable[..., Any]:
    """A callable, or a ``"module:qualname"`` string naming one (the manifest form)."""
    if callable(fn):
        return fn
    if isinstance(fn, str) and ":" in fn:
        mod_name, _, qual = fn.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise NodeTypeError(f"node {node!r}: cannot resolve function {fn!r}: {e}") from e
        if callable(obj):
            return obj
    raise NodeTypeError(
        f"node {node!r}: fn must be a callable or a 'module:function' string, got {fn!r}"
    )


@register_node
class PassThroughNode(Node):
    """Emits every input unchanged."""

    def process(self, data: Any) -> Any:
        return data


@register_node
class MapNode(Node):
    """Applies ``fn(data)`` to every input (``fn``: a callable, or ``"module:function"``).

    A lambda or closure works: it is cloudpickled with the node.
    """

    def __init__(self, fn: Union[Callable[[Any], Any], str], name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, fn=fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn)), **kw)
        self.fn = _resolve_callable(fn, self.name)

    def process(self, data: Any) -> Any:
        return self.fn(data)


@register_node
class FilterNode(Node):
    """Emits the inputs for which ``predicate(data)`` is true."""

    def __init__(self, predicate: Union[Callable[[Any], bool], str], name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, predicate=predicate if isinstance(predicate, str) else getattr(predicate, "__qualname__", repr(predicate)), **kw)
        self.predicate = _resolve_callable(predicate, self.name)

    def process(self, data: Any) -> Any:
        return data if self.predicate(data) else None


@register_node
class BatchNode(Node):
    """Groups ``size`` consecutive inputs into a list; the last, shorter batch is emitted at
    end of stream."""

    def __init__(self, size: int, name: Optional[str] = None, **kw: Any) -> None:
        if not isinstance(size, int) or size < 1:
            raise NodeTypeError(f"BatchNode size must be a positive int, got {size!r}")
        super().__init__(name, size=size, **kw)
        self.size = size
        self._batch: List[Any] = []

    def process(self, data: Any) -> Any:
        self._batch.append(data)
        if len(self._batch) >= self.size:
            out, self._batch = self._batch, []
            return out
        return None

    def flush(self) -> Any:
        out, self._batch = self._batch, []
        return out or None

    def snapshot(self) -> Any:
        return list(self._batch)

    def restore(self, state: Any) -> None:
        self._batch = list(state)


_CALC_OPS = {
    "add": lambda a, b: a + b,
    "subtract": lambda a, b: a - b,
    "multiply": lambda a, b: a * b,
    "divide": lambda a, b: a / b,
    "power": lambda a, b: a**b,
    "modulo": lambda a, b: a % b,
}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@register_node
class CalculatorNode(Node):
    """Upstream's calculator: input ``{"operation": "add"|"subtract"|"multiply"|"divide"|
    "power"|"modulo", "args": [a, b]}``, output the number ``a <op> b``.

    Unlike upstream's Python node, which returns an ``{"error": ...}`` dict, bad input and
    division (or modulo) by zero raise, so the run reports a NodeError naming the frame.
    """

    def process(self, data: Any) -> Any:
        if not isinstance(data, dict) or "operation" not in data or "args" not in data:
            raise TypeError(
                f"{self.name}: expected {{'operation': <one of {', '.join(_CALC_OPS)}>, 'args': [a, b]}}, "
                f"got {data!r:.200}"
            )
        op, args = data["operation"], data["args"]
        fn = _CALC_OPS.get(op) if isinstance(op, str) else None
        if fn is None:
            raise ValueError(f"{self.name}: unknown operation {op!r}; use one of {', '.join(_CALC_OPS)}")
        if not isinstance(args, (list, tuple)) or len(args) != 2 or not all(map(_is_number, args)):
            raise TypeError(f"{self.name}: 'args' must be a list of two numbers, got {args!r:.200}")
        a, b = args
        if op in ("divide", "modulo") and b == 0:
            raise ZeroDivisionError(f"{self.name}: {op} by zero ({a!r} {'/' if op == 'divide' else '%'} 0)")
        return fn(a, b)


@register_node
class UnbatchNode(Node):
    """Emits each item of an input list/tuple/array as its own frame."""

    def process(self, data: Any) -> Iterator[Any]:
        yield from data


@register_node
class RangeSource(Source):
    """Yields ``start, start+step, ... < stop`` (integers)."""

    def __init__(self, stop: int, start: int = 0, step: int = 1, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, stop=stop, start=start, step=step, **kw)
        self.start, self.stop, self.step = start, stop, step

    def generate(self) -> Iterator[int]:
        yield from range(self.start, self.stop, self.step)

    def __len__(self) -> int:
        return len(range(self.start, self.stop, self.step))


@register_node
class SineSource(Source):
    """Synthetic audio: a sine tone as float32 mono chunks of ``chunk`` samples.

    Emits dicts ``{"samples": ndarray[float32], "sample_rate": int, "index": int}``.
    """

    def __init__(
        self,
        frequency: float = 440.0,
        sample_rate: int = 16000,
        chunk: int = 1024,
        seconds: float = 1.0,
        amplitude: float = 0.5,
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, frequency=frequency, sample_rate=sample_rate, chunk=chunk, seconds=seconds, amplitude=amplitude, **kw)
        self.frequency, self.sample_rate, self.chunk = frequency, sample_rate, chunk
        self.seconds, self.amplitude = seconds, amplitude

    def generate(self) -> Iterator[dict]:
        total = self._total()
        for index, start in enumerate(range(0, total, self.chunk)):
            t = np.arange(start, min(start + self.chunk, total), dtype=np.float64) / self.sample_rate
            samples = (self.amplitude * np.sin(2 * np.pi * self.frequency * t)).astype(np.float32)
            yield {"samples": samples, "sample_rate": self.sample_rate, "index": index}

    def _total(self) -> int:
        # round, not int(): 2.01 s * 16000 Hz is 32159.999... in floating point
        return int(round(self.seconds * self.sample_rate))

    def __len__(self) -> int:
        return -(-self._total() // self.chunk)


def _samples(data: Any) -> np.ndarray:
    return np.asarray(data["samples"] if isinstance(data, dict) else data, dtype=np.float32)


def _with_samples(data: Any, samples: np.ndarray, **extra: Any) -> Any:
    if isinstance(data, dict):
        out = dict(data)
        out["samples"] = samples
        out.update(extra)
        return out
    return samples


@register_node
class GainNode(Node):
    """Scales audio samples by ``gain_db`` decibels (arrays or ``{"samples": ...}`` dicts)."""

    def __init__(self, gain_db: float = 0.0, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, gain_db=gain_db, **kw)
        self.factor = float(10 ** (gain_db / 20.0))

    def process(self, data: Any) -> Any:
        return _with_samples(data, _samples(data) * np.float32(self.factor))


@register_node
class RMSNode(Node):
    """Measures the level of each audio chunk: adds ``rms`` and ``dbfs`` to the dict
    (drops the samples when ``keep_samples`` is false)."""

    def __init__(self, keep_samples: bool = False, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, keep_samples=keep_samples, **kw)
        self.keep_samples = keep_samples

    def process(self, data: Any) -> Any:
        s = _samples(data)
        rms = float(np.sqrt(np.mean(np.square(s, dtype=np.float64)))) if s.size else 0.0
        dbfs = 20.0 * np.log10(rms) if rms > 0 else float("-inf")
        out = {k: v for k, v in (data.items() if isinstance(data, dict) else ()) if k != "samples"}
        if self.keep_samples:
            out["samples"] = s
        out.update(rms=rms, dbfs=dbfs, n=int(s.size))
        return out


@register_node
class ChunkerNode(Node):
    """Re-cuts a stream of audio chunks into chunks of exactly ``size`` samples (the remainder
    is emitted at end of stream)."""

    def __init__(self, size: int, name: Optional[str] = None, **kw: Any) -> None:
        if not isinstance(size, int) or size < 1:
            raise NodeTypeError(f"ChunkerNode size must be a positive int, got {size!r}")
        super().__init__(name, size=size, **kw)
        self.size = size
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, data: Any) -> Iterator[np.ndarray]:
        self._pending = np.concatenate([self._pending, _samples(data)])
        while self._pending.size >= self.size:
            out, self._pending = self._pending[: self.size], self._pending[self.size :]
            yield out

    def flush(self) -> Optional[np.ndarray]:
        out, self._pending = self._pending, np.zeros(0, dtype=np.float32)
        return out if out.size else None

    def snapshot(self) -> Any:
        return self._pending.copy()

    def restore(self, state: Any) -> None:
        self._pending = np.asarray(state, dtype=np.float32)


@register_node
class ResampleNode(Node):
    """Resamples audio chunks from ``from_rate`` (or the dict's ``sample_rate``) to
    ``to_rate`` by linear interpolation."""

    def __init__(self, to_rate: int, from_rate: Optional[int] = None, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, to_rate=to_rate, from_rate=from_rate, **kw)
        self.to_rate, self.from_rate = int(to_rate), from_rate

    def process(self, data: Any) -> Any:
        s = _samples(data)
        src = self.from_rate or (data.get("sample_rate") if isinstance(data, dict) else None)
        if not src:
            raise ValueError(f"{self.name}: input has no sample_rate; set from_rate")
        n_out = int(round(s.size * self.to_rate / src))
        x_old = np.linspace(0.0, 1.0, num=s.size, endpoint=False)
        x_new = np.linspace(0.0, 1.0, num=n_out, endpoint=False)
        out = np.interp(x_new, x_old, s).astype(np.float32) if s.size else s
        return _with_samples(data, out, sample_rate=self.to_rate)


@register_node
class SyntheticVideoSource(Source):
    """Synthetic video: ``frames`` RGB frames (uint8, height x width x 3) of a moving gradient
    with a bright square. Emits dicts ``{"frame": ndarray, "index": int, "pts": float}``."""

    def __init__(
        self,
        width: int = 640,
        height: int = 360,
        frames: int = 30,
        fps: float = 30.0,
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, width=width, height=height, frames=frames, fps=fps, **kw)
        self.width, self.height, self.frames, self.fps = width, height, frames, fps

    def generate(self) -> Iterator[dict]:
        yy, xx = np.mgrid[0 : self.height, 0 : self.width]
        base = ((xx + yy) % 256).astype(np.uint8)
        side = max(4, min(self.width, self.height) // 8)
        for i in range(self.frames):
            frame = np.empty((self.height, self.width, 3), dtype=np.uint8)
            # uint8 arithmetic wraps on purpose; NumPy 2 refuses Python ints > 255 here
            frame[..., 0] = base + np.uint8(i % 256)
            frame[..., 1] = base[::-1] + np.uint8((2 * i) % 256)
            frame[..., 2] = 128
            x = (i * 7) % max(1, self.width - side)
            y = (i * 3) % max(1, self.height - side)
            frame[y : y + side, x : x + side] = 255
            yield {"frame": frame, "index": i, "pts": i / self.fps}

    def __len__(self) -> int:
        return self.frames


@register_node
class FileLinesSource(Source):
    """Yields the lines of a text file (without the newline). Its length is known, so the CLI
    shows a progress bar."""

    def __init__(self, path: str, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, path=path, **kw)
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise NodeTypeError(f"FileLinesSource: no such file {path!r}")

    def generate(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")

    def __len__(self) -> int:
        with open(self.path, "rb") as f:
            return sum(1 for _ in f)


@register_node
class WavFileSource(Source):
    """Reads a PCM WAV file (8/16/32-bit) as float32 chunks of ``chunk`` frames, shaped
    (frames,) for mono and (frames, channels) otherwise. Emits dicts
    ``{"samples", "sample_rate", "index"}`` like :class:`SineSource`."""

    def __init__(self, path: str, chunk: int = 1024, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, path=path, chunk=chunk, **kw)
        self.path = os.path.abspath(path)
        self.chunk = chunk
        try:
            with wave.open(self.path, "rb") as w:
                self.sample_rate, self.channels = w.getframerate(), w.getnchannels()
                self.width, self.nframes = w.getsampwidth(), w.getnframes()
        except (OSError, wave.Error, EOFError) as e:
            raise NodeTypeError(f"WavFileSource: cannot read {path!r} as a PCM WAV file: {e}") from e
        if self.width not in (1, 2, 4):
            raise NodeTypeError(f"WavFileSource: {self.width * 8}-bit samples are not supported (use 8, 16 or 32)")

    def generate(self) -> Iterator[dict]:
        dtype, scale, offset = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 32768.0, 0.0), 4: (np.int32, 2**31, 0.0)}[self.width]
        with wave.open(self.path, "rb") as w:
            index = 0
            while True:
                raw = w.readframes(self.chunk)
                if not raw:
                    return
                x = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale
                if self.channels > 1:
                    x = x.reshape(-1, self.channels)
                yield {"samples": x, "sample_rate": self.sample_rate, "index": index}
                index += 1

    def __len__(self) -> int:
        return -(-self.nframes // self.chunk)


@register_node
class FrameDiffNode(Node):
    """Motion score of video frames: mean absolute difference to the previous frame (0..255),
    added as ``motion``; the frame itself is dropped unless ``keep_frame``."""

    def __init__(self, keep_frame: bool = False, name: Optional[str] = None, **kw: Any) -> None:
        super().__init__(name, keep_frame=keep_frame, **kw)
        self.keep_frame = keep_frame
        self._prev: Optional[np.ndarray] = None

    def process(self, data: Any) -> Any:
        frame = np.asarray(data["frame"] if isinstance(data, dict) else data)
        gray = frame.mean(axis=-1, dtype=np.float32) if frame.ndim == 3 else frame.astype(np.float32)
        motion = 0.0 if self._prev is None or self._prev.shape != gray.shape else float(np.mean(np.abs(gray - self._prev)))
        self._prev = gray
        out = {k: v for k, v in (data.items() if isinstance(data, dict) else ()) if k != "frame"}
        if self.keep_frame:
            out["frame"] = frame
        out["motion"] = motion
        return out

    def snapshot(self) -> Any:
        return self._prev

    def restore(self, state: Any) -> None:
        self._prev = state
