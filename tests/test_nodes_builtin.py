"""The built-in nodes of remotemedia.nodes, driven directly in-process
(initialize() / process() / flush(), generators iterated by hand)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from remotemedia import Node, NodeOptions, Source
from remotemedia.errors import NodeTypeError
from remotemedia.nodes import (
    BatchNode,
    ChunkerNode,
    FilterNode,
    FrameDiffNode,
    GainNode,
    MapNode,
    PassThroughNode,
    RangeSource,
    ResampleNode,
    RMSNode,
    SineSource,
    SyntheticVideoSource,
    UnbatchNode,
)


def run(node: Node, inputs) -> list:
    """Drive a node like a worker does: initialize, process each input, flush, cleanup."""
    node.initialize()
    out: list = []

    def emit(result):
        if result is None:
            return
        if inspect.isgenerator(result):
            out.extend(r for r in result if r is not None)
        else:
            out.append(result)

    for x in inputs:
        emit(node.process(x))
    flush = getattr(node, "flush", None)
    if flush is not None:
        emit(flush())
    node.cleanup()
    return out


def generate(source: Source) -> list:
    source.initialize()
    try:
        return list(source.generate())
    finally:
        source.cleanup()


def sine(n: int, amplitude: float = 0.5, freq: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --------------------------------------------------------------------------- base classes


class TestNodeBase:
    @pytest.mark.parametrize("name", ["", 5, b"x"])
    def test_bad_name(self, name):
        with pytest.raises(NodeTypeError, match="non-empty string"):
            Node(name=name)

    def test_default_name_is_class_name(self):
        assert PassThroughNode().name == "PassThroughNode"
        assert PassThroughNode(name="p").name == "p"
        assert "PassThroughNode" in repr(PassThroughNode())

    def test_node_options_unknown_key(self):
        with pytest.raises(NodeTypeError) as ei:
            NodeOptions("n", restart_policy="always", retries=3, colour="red")
        assert isinstance(ei.value, TypeError)
        msg = str(ei.value)
        assert "colour, retries" in msg
        assert "restart_policy" in msg  # lists the valid options
        assert "'n'" in msg

    def test_node_with_unknown_option(self):
        with pytest.raises(NodeTypeError, match="bogus"):
            PassThroughNode(name="p", options={"bogus": 1})

    def test_node_options_known_keys(self):
        node = GainNode(name="g", options={"restart_policy": "always", "queue_depth": 4})
        assert isinstance(node.options, NodeOptions)
        assert node.options == {"restart_policy": "always", "queue_depth": 4}
        assert GainNode().options == {}

    def test_base_process_not_implemented(self):
        with pytest.raises(NotImplementedError):
            Node(name="n").process(1)

    def test_source_process_is_an_error(self):
        with pytest.raises(NodeTypeError, match="no input"):
            RangeSource(3, name="r").process(1)

    def test_config_keeps_free_params(self):
        node = Node(name="n", alpha=1, beta="b")
        assert node.config == {"alpha": 1, "beta": "b"}
        assert node.to_manifest() == {"id": "n", "node_type": "Node", "params": {"alpha": 1, "beta": "b"}}


# --------------------------------------------------------------------------- generic


class TestGeneric:
    def test_passthrough(self):
        obj = {"k": [1, 2]}
        node = PassThroughNode()
        assert node.process(obj) is obj
        assert run(PassThroughNode(), [1, "a", None, 3]) == [1, "a", 3]

    def test_map_lambda(self):
        node = MapNode(lambda x: x * 3, name="triple")
        assert run(node, [1, 2, 3]) == [3, 6, 9]
        assert node.config["fn"] == "TestGeneric.test_map_lambda.<locals>.<lambda>"

    def test_map_module_function_string(self):
        node = MapNode("math:sqrt")
        assert node.fn is math.sqrt
        assert node.config == {"fn": "math:sqrt"}
        assert run(node, [4.0, 9.0, 2.25]) == [2.0, 3.0, 1.5]

    def test_map_nested_qualname(self):
        node = MapNode("os.path:join")
        assert node.process("a") == "a"
        node = MapNode("builtins:str.upper")
        assert node.process("abc") == "ABC"

    def test_map_list_output_is_one_frame(self):
        assert run(MapNode(lambda x: [x, x]), [1, 2]) == [[1, 1], [2, 2]]

    @pytest.mark.parametrize(
        "fn,needle",
        [
            ("no_such_module_xyz:f", "cannot resolve"),
            ("math:no_such_function", "cannot resolve"),
            ("math:pi", "must be a callable"),
            ("sqrt", "must be a callable"),
            (42, "must be a callable"),
            (None, "must be a callable"),
        ],
    )
    def test_map_bad_fn(self, fn, needle):
        with pytest.raises(NodeTypeError, match=needle) as ei:
            MapNode(fn, name="bad")
        assert "'bad'" in str(ei.value)

    def test_filter(self):
        assert run(FilterNode(lambda x: x % 2 == 0), range(7)) == [0, 2, 4, 6]
        assert run(FilterNode("builtins:bool"), [0, 1, "", "a", None, [], [0]]) == [1, "a", [0]]
        with pytest.raises(NodeTypeError):
            FilterNode("nope")

    def test_batch(self):
        node = BatchNode(3)
        assert node.process(1) is None
        assert node.process(2) is None
        assert node.process(3) == [1, 2, 3]
        assert node.process(4) is None
        assert node.flush() == [4]
        assert node.flush() is None  # nothing left

    def test_batch_run_with_remainder(self):
        assert run(BatchNode(2), range(5)) == [[0, 1], [2, 3], [4]]
        assert run(BatchNode(5), range(5)) == [[0, 1, 2, 3, 4]]
        assert run(BatchNode(1), "ab") == [["a"], ["b"]]

    def test_batch_flush_of_empty_node(self):
        assert BatchNode(4).flush() is None

    @pytest.mark.parametrize("size", [0, -1, 1.5, "3", None])
    def test_batch_bad_size(self, size):
        with pytest.raises(NodeTypeError, match="positive int"):
            BatchNode(size)

    def test_batch_snapshot_restore(self):
        node = BatchNode(3)
        node.process("a")
        node.process("b")
        state = node.snapshot()
        assert state == ["a", "b"]
        node.process("c")  # completes the batch; the snapshot must not change
        assert state == ["a", "b"]
        fresh = BatchNode(3)
        fresh.restore(state)
        state.append("zzz")  # restore copied the state
        assert fresh.process("c") == ["a", "b", "c"]

    def test_unbatch(self):
        node = UnbatchNode()
        result = node.process([1, 2, 3])
        assert inspect.isgenerator(result)
        assert list(result) == [1, 2, 3]
        assert run(UnbatchNode(), [[1, 2], (3,), []]) == [1, 2, 3]
        rows = list(UnbatchNode().process(np.arange(6).reshape(3, 2)))
        assert len(rows) == 3 and np.array_equal(rows[2], [4, 5])

    def test_batch_then_unbatch_is_identity(self):
        batches = run(BatchNode(4), range(10))
        assert run(UnbatchNode(), batches) == list(range(10))

    def test_range_source(self):
        assert generate(RangeSource(5)) == [0, 1, 2, 3, 4]
        assert generate(RangeSource(10, start=2, step=3)) == [2, 5, 8]
        assert generate(RangeSource(0)) == []
        src = RangeSource(3)
        assert isinstance(src, Source)
        assert generate(src) == generate(src)  # restartable
        assert src.config == {"stop": 3, "start": 0, "step": 1}


# --------------------------------------------------------------------------- audio


class TestSine:
    def test_defaults(self):
        chunks = generate(SineSource())
        assert len(chunks) == 16
        assert [c["index"] for c in chunks] == list(range(16))
        assert [c["samples"].size for c in chunks] == [1024] * 15 + [640]
        assert all(c["sample_rate"] == 16000 for c in chunks)
        assert all(c["samples"].dtype == np.float32 for c in chunks)
        assert all(c["samples"].ndim == 1 for c in chunks)

    @pytest.mark.parametrize(
        "seconds,rate,chunk",
        [(1.0, 16000, 1024), (0.5, 44100, 512), (2.0, 8000, 8000), (0.25, 48000, 1000), (0.1, 16000, 160)],
    )
    def test_total_length_and_chunk_sizes(self, seconds, rate, chunk):
        chunks = generate(SineSource(seconds=seconds, sample_rate=rate, chunk=chunk))
        sizes = [c["samples"].size for c in chunks]
        total = round(seconds * rate)
        assert sum(sizes) == total
        assert all(s == chunk for s in sizes[:-1])
        assert 0 < sizes[-1] <= chunk
        assert len(chunks) == math.ceil(total / chunk)

    # regression: the total used to be int(seconds * rate), e.g. 2.01 s at 16000 Hz ->
    # 32159.999999999996 -> 32159 samples instead of 32160
    @pytest.mark.parametrize("seconds,rate", [(2.01, 16000), (2.01, 8000), (0.29, 100)])
    def test_total_length_is_not_truncated_by_float_error(self, seconds, rate):
        chunks = generate(SineSource(seconds=seconds, sample_rate=rate, chunk=4096))
        assert sum(c["samples"].size for c in chunks) == round(seconds * rate)

    def test_signal_is_continuous_amplitude_and_frequency(self):
        chunks = generate(SineSource(frequency=440.0, sample_rate=16000, chunk=1000, seconds=1.0, amplitude=0.5))
        signal = np.concatenate([c["samples"] for c in chunks])
        np.testing.assert_allclose(signal, sine(16000, 0.5, 440.0, 16000), atol=1e-6)
        assert np.max(np.abs(signal)) == pytest.approx(0.5, abs=1e-3)
        assert np.max(np.abs(signal)) <= 0.5 + 1e-6
        spectrum = np.abs(np.fft.rfft(signal))
        assert int(np.argmax(spectrum)) == 440  # 1 Hz bins for a 1 s signal

    def test_zero_seconds(self):
        assert generate(SineSource(seconds=0)) == []


class TestGain:
    def test_minus_6_db_halves(self):
        x = sine(1000, amplitude=0.8)
        y = GainNode(gain_db=-6.0).process(x)
        assert y.dtype == np.float32
        assert y.shape == x.shape
        np.testing.assert_allclose(y, x * 0.5, rtol=0.01, atol=1e-6)
        assert np.max(np.abs(y)) / np.max(np.abs(x)) == pytest.approx(10 ** (-6 / 20), rel=1e-4)

    @pytest.mark.parametrize("db,factor", [(0.0, 1.0), (20.0, 10.0), (-20.0, 0.1), (-40.0, 0.01)])
    def test_factor(self, db, factor):
        node = GainNode(gain_db=db)
        assert node.factor == pytest.approx(factor)
        np.testing.assert_allclose(node.process(np.ones(4, np.float32)), np.full(4, factor, np.float32), rtol=1e-6)

    def test_dict_input_keeps_other_keys(self):
        data = {"samples": sine(64), "sample_rate": 16000, "index": 7}
        out = GainNode(gain_db=-6.0).process(data)
        assert out is not data
        assert out["sample_rate"] == 16000 and out["index"] == 7
        np.testing.assert_allclose(out["samples"], data["samples"] * 10 ** (-6 / 20), rtol=1e-5, atol=1e-7)
        assert data["samples"] is not out["samples"]  # the input dict is not modified

    def test_list_input(self):
        out = GainNode(gain_db=20.0).process([0.1, -0.2])
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out, [1.0, -2.0], rtol=1e-5)


class TestRMS:
    def test_sine_level(self):
        chunks = generate(SineSource(amplitude=0.5, seconds=1.0))
        whole = {"samples": np.concatenate([c["samples"] for c in chunks]), "sample_rate": 16000}
        out = RMSNode().process(whole)
        assert out["rms"] == pytest.approx(0.5 / math.sqrt(2), abs=1e-4)
        assert out["rms"] == pytest.approx(0.3536, abs=1e-4)
        assert out["dbfs"] == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=1e-3)
        assert out["dbfs"] == pytest.approx(-9.03, abs=0.01)
        assert out["n"] == 16000
        assert out["sample_rate"] == 16000
        assert "samples" not in out

    def test_per_chunk_levels(self):
        outs = run(RMSNode(), generate(SineSource(amplitude=0.5, seconds=1.0)))
        assert len(outs) == 16
        assert [o["index"] for o in outs] == list(range(16))
        for o in outs:
            assert o["rms"] == pytest.approx(0.3536, abs=0.01)

    def test_after_gain(self):
        out = RMSNode().process(GainNode(gain_db=-6.0).process(sine(16000, 0.5)))
        assert out["dbfs"] == pytest.approx(-9.03 - 6.0, abs=0.02)

    def test_keep_samples(self):
        x = sine(100)
        out = RMSNode(keep_samples=True).process({"samples": x})
        assert np.array_equal(out["samples"], x)

    def test_array_input_and_known_values(self):
        out = RMSNode().process(np.full(10, 0.25, np.float32))
        assert out == {"rms": pytest.approx(0.25), "dbfs": pytest.approx(20 * math.log10(0.25)), "n": 10}

    def test_empty_and_silent(self):
        out = RMSNode().process(np.zeros(0, np.float32))
        assert out["rms"] == 0.0 and out["dbfs"] == float("-inf") and out["n"] == 0
        out = RMSNode().process(np.zeros(8, np.float32))
        assert out["rms"] == 0.0 and out["dbfs"] == float("-inf")


class TestChunker:
    def test_exact_sizes_and_remainder_on_flush(self):
        signal = np.arange(320, dtype=np.float32)
        node = ChunkerNode(100)
        outs = run(node, [signal[i : i + 64] for i in range(0, 320, 64)])
        assert [o.size for o in outs] == [100, 100, 100, 20]
        assert all(o.dtype == np.float32 for o in outs)
        assert np.array_equal(np.concatenate(outs), signal)

    def test_process_is_a_generator_and_flush_without_remainder(self):
        node = ChunkerNode(4)
        result = node.process(np.arange(8, dtype=np.float32))
        assert inspect.isgenerator(result)
        chunks = list(result)
        assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert node.flush() is None

    def test_dict_input_and_big_chunk(self):
        node = ChunkerNode(256)
        outs = list(node.process({"samples": sine(1000), "sample_rate": 16000}))
        assert [o.size for o in outs] == [256, 256, 256]
        rest = node.flush()
        assert rest.size == 1000 - 768
        assert np.array_equal(np.concatenate(outs + [rest]), sine(1000))
        assert node.flush() is None

    def test_sine_rechunked(self):
        chunks = generate(SineSource(seconds=1.0, chunk=1024))
        outs = run(ChunkerNode(480), chunks)
        sizes = [o.size for o in outs]
        assert sizes == [480] * 33 + [160]
        assert sum(sizes) == 16000

    @pytest.mark.parametrize("size", [0, -5, 2.0])
    def test_bad_size(self, size):
        with pytest.raises(NodeTypeError, match="positive int"):
            ChunkerNode(size)

    def test_snapshot_restore(self):
        node = ChunkerNode(10)
        assert list(node.process(np.arange(7, dtype=np.float32))) == []
        state = node.snapshot()
        fresh = ChunkerNode(10)
        fresh.restore(state)
        out = list(fresh.process(np.arange(7, 10, dtype=np.float32)))
        assert len(out) == 1 and np.array_equal(out[0], np.arange(10, dtype=np.float32))


class TestResample:
    @pytest.mark.parametrize("src,dst", [(16000, 8000), (16000, 48000), (44100, 16000), (8000, 8000)])
    def test_length_scales_with_rate_ratio(self, src, dst):
        x = sine(1600, rate=src)
        out = ResampleNode(to_rate=dst, from_rate=src).process(x)
        assert out.dtype == np.float32
        assert out.size == round(1600 * dst / src)

    def test_dict_uses_and_updates_sample_rate(self):
        data = {"samples": sine(1024), "sample_rate": 16000, "index": 3}
        out = ResampleNode(to_rate=8000).process(data)
        assert out["sample_rate"] == 8000
        assert out["index"] == 3
        assert out["samples"].size == 512
        assert data["sample_rate"] == 16000  # input untouched

    def test_from_rate_overrides_dict_rate(self):
        data = {"samples": np.ones(100, np.float32), "sample_rate": 16000}
        out = ResampleNode(to_rate=200, from_rate=100).process(data)
        assert out["samples"].size == 200

    def test_constant_signal_stays_constant(self):
        out = ResampleNode(to_rate=48000, from_rate=16000).process(np.full(160, 0.3, np.float32))
        np.testing.assert_allclose(out, 0.3, rtol=1e-6)

    def test_downsampled_tone_keeps_its_frequency(self):
        out = ResampleNode(to_rate=8000, from_rate=16000).process(sine(16000, freq=440.0, rate=16000))
        assert out.size == 8000
        assert int(np.argmax(np.abs(np.fft.rfft(out)))) == 440

    def test_missing_rate(self):
        with pytest.raises(ValueError, match="sample_rate"):
            ResampleNode(to_rate=8000).process(np.ones(10, np.float32))
        with pytest.raises(ValueError, match="from_rate"):
            ResampleNode(to_rate=8000).process({"samples": np.ones(10, np.float32)})

    def test_empty_input(self):
        out = ResampleNode(to_rate=8000, from_rate=16000).process(np.zeros(0, np.float32))
        assert out.size == 0


# --------------------------------------------------------------------------- video


class TestVideo:
    def test_synthetic_video_frames(self):
        frames = generate(SyntheticVideoSource(width=64, height=48, frames=5, fps=25.0))
        assert len(frames) == 5
        for i, f in enumerate(frames):
            assert f["frame"].shape == (48, 64, 3)
            assert f["frame"].dtype == np.uint8
            assert f["index"] == i
            assert f["pts"] == pytest.approx(i / 25.0)
        # the bright square (side min(w, h) // 8 = 6) is there, 255 in every channel, and it moves
        assert all((f["frame"] == 255).all(axis=-1).sum() >= 6 * 6 for f in frames)
        assert not np.array_equal(frames[0]["frame"], frames[1]["frame"])

    def test_default_size(self):
        src = SyntheticVideoSource(frames=2)
        frames = generate(src)
        assert [f["frame"].shape for f in frames] == [(360, 640, 3)] * 2

    # regression: `base + i` / `base[::-1] + 2 * i` on uint8 raised OverflowError under NumPy 2
    # (NEP 50) from frame 128 on, so a 5 s stream at 30 fps crashed
    def test_long_stream(self):
        frames = generate(SyntheticVideoSource(width=16, height=16, frames=300))
        assert len(frames) == 300
        assert all(f["frame"].dtype == np.uint8 for f in frames)
        assert [f["index"] for f in frames] == list(range(300))
        # the channels keep changing (wrapping) past frame 128/256
        assert not np.array_equal(frames[200]["frame"], frames[201]["frame"])

    def test_frame_diff_first_is_zero_then_positive(self):
        frames = generate(SyntheticVideoSource(width=64, height=48, frames=6))
        outs = run(FrameDiffNode(), frames)
        assert len(outs) == 6
        assert outs[0]["motion"] == 0.0
        assert all(o["motion"] > 0 for o in outs[1:])
        assert all(0 <= o["motion"] <= 255 for o in outs)
        assert [o["index"] for o in outs] == list(range(6))
        assert all("frame" not in o for o in outs)

    def test_frame_diff_moving_square_exact(self):
        def frame_with_square(x):
            f = np.zeros((10, 10, 3), np.uint8)
            f[0:2, x : x + 2] = 255
            return f

        node = FrameDiffNode(keep_frame=True)
        first = node.process(frame_with_square(0))
        assert first["motion"] == 0.0
        assert first["frame"].shape == (10, 10, 3)
        same = node.process(frame_with_square(0))
        assert same["motion"] == 0.0
        moved = node.process(frame_with_square(5))
        # the square left 4 pixels and covered 4 new ones: 8 * 255 / 100
        assert moved["motion"] == pytest.approx(8 * 255 / 100)

    def test_frame_diff_grayscale_and_shape_change(self):
        node = FrameDiffNode()
        assert node.process(np.zeros((4, 4), np.uint8))["motion"] == 0.0
        assert node.process(np.full((4, 4), 10, np.uint8))["motion"] == pytest.approx(10.0)
        assert node.process(np.zeros((8, 8), np.uint8))["motion"] == 0.0  # new shape: no previous frame

    def test_frame_diff_snapshot_restore(self):
        a = np.zeros((4, 4, 3), np.uint8)
        b = np.full((4, 4, 3), 30, np.uint8)
        node = FrameDiffNode()
        node.process(a)
        fresh = FrameDiffNode()
        fresh.restore(node.snapshot())
        assert fresh.process(b)["motion"] == pytest.approx(30.0)
        assert FrameDiffNode().snapshot() is None
