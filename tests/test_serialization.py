"""Cleanup-then-cloudpickle (remotemedia.serialization) and frame encoding (remotemedia.frames).

Pure in-process tests: nothing crosses a real process boundary.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

from remotemedia import Node
from remotemedia.errors import NodeTypeError, SerializationError
from remotemedia.frames import decode_bytes, encode
from remotemedia.nodes import MapNode, PassThroughNode
from remotemedia.serialization import DEFAULT_MAX_SIZE, deserialize_node, find_unpicklable, serialize_node

MB = 1024 * 1024

# pickle writes payloads of at least this many bytes straight to the file object, bypassing its
# frame buffer (CPython's FRAME_SIZE_TARGET); a numpy array that large reaches the writer as a
# pickle.PickleBuffer. Regression guard: _LimitedWriter.write used to call len() on it, so every
# node holding a numpy array >= 64 KiB failed with a bogus "attribute ... cannot be pickled" error
# (and an oversized one never reported the size limit).
_DIRECT_WRITE = 64 * 1024


# --------------------------------------------------------------------------- helpers


class Plain:
    """A plain object holding whatever a test puts on it."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


class Holder(Node):
    """A node that keeps arbitrary attributes and echoes its input."""

    def process(self, data):
        return data


class Counting(Node):
    """Counts its lifecycle calls; cleanup() releases a handle, initialize() reacquires it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.cleanup_calls = 0
        self.init_calls = 0
        self.handle = object()
        self.handle_at_cleanup = "unset"

    def cleanup(self):
        self.cleanup_calls += 1
        self.handle = None

    def initialize(self):
        self.init_calls += 1
        self.handle_at_cleanup = self.handle  # what the unpickled copy arrived with
        self.handle = "reopened"

    def process(self, data):
        return (data, self.handle)


def _make_adder(k):
    def add(x):
        return x + k

    return add


@dataclasses.dataclass
class Chunk:
    samples: np.ndarray
    rate: int
    tag: str = "x"


# --------------------------------------------------------------------------- round trips


class TestRoundTrip:
    def test_configured_state_survives(self):
        class LocalModel:  # defined inside the test: pickled by value
            def __init__(self, bias):
                self.bias = bias

            def predict(self, x):
                return x + self.bias

        class LocalNode(Node):
            def __init__(self, **kw):
                super().__init__(**kw)
                self.threshold = 0.25
                self.labels = ["a", "b", "c"]
                self.table = {"x": 1, "y": [2, 3], 4: "four"}
                self.model = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # 16 KB
                self.local = LocalModel(bias=3)
                self.closure = _make_adder(10)

            def process(self, data):
                scaled = self.config["scale"](data)
                return self.closure(self.local.predict(scaled)) + float(self.model[1, 2])

        node = LocalNode(name="stateful", scale=lambda v: v * 2, options={"restart_policy": "always"})
        copy = deserialize_node(serialize_node(node))

        assert copy is not node
        assert type(copy).__name__ == "LocalNode"
        assert copy.name == "stateful"
        assert dict(copy.options) == {"restart_policy": "always"}
        assert copy.threshold == 0.25
        assert copy.labels == ["a", "b", "c"]
        assert copy.table == {"x": 1, "y": [2, 3], 4: "four"}
        assert copy.model.dtype == np.float32 and copy.model.shape == (64, 64)
        assert np.array_equal(copy.model, node.model)
        assert copy.model is not node.model
        assert copy.local.bias == 3 and copy.local.predict(1) == 4
        assert copy.closure(1) == 11
        assert copy.config["scale"](4) == 8
        # process works on the copy: (5 * 2 + 3) + 10 + model[1, 2] (= 66)
        assert copy.process(5) == node.process(5) == 23 + 66.0

    def test_lambda_map_node(self):
        copy = deserialize_node(serialize_node(MapNode(lambda x: x + 1, name="inc")))
        assert copy.name == "inc"
        assert copy.process(1) == 2

    def test_closure_map_node(self):
        offset = 7
        copy = deserialize_node(serialize_node(MapNode(lambda x: x + offset, name="add")))
        assert copy.process(1) == 8

    def test_module_function_string_map_node(self):
        copy = deserialize_node(serialize_node(MapNode("math:sqrt", name="sqrt")))
        assert copy.process(9.0) == 3.0
        assert copy.config == {"fn": "math:sqrt"}

    def test_result_is_bytes_within_default_limit(self):
        blob = serialize_node(PassThroughNode(name="p"))
        assert isinstance(blob, bytes)
        assert 0 < len(blob) < DEFAULT_MAX_SIZE
        assert DEFAULT_MAX_SIZE == 100 * MB

    def test_numpy_array_below_direct_write_size(self):
        node = Holder(name="h")
        node.model = np.linspace(0, 1, (_DIRECT_WRITE - 1024) // 8)  # float64, just under 64 KiB
        copy = deserialize_node(serialize_node(node))
        assert np.array_equal(copy.model, node.model)

    @pytest.mark.parametrize("nbytes", [_DIRECT_WRITE, 4 * MB])
    def test_numpy_model_of_realistic_size(self, nbytes):
        node = Holder(name="h")
        node.model = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
        copy = deserialize_node(serialize_node(node))
        assert np.array_equal(copy.model, node.model)
        assert copy.model.dtype == np.float32

    def test_large_bytes_attribute(self):
        node = Holder(name="h")
        node.blob = bytes(range(256)) * (4 * MB // 256)
        copy = deserialize_node(serialize_node(node))
        assert copy.blob == node.blob


# --------------------------------------------------------------------------- lifecycle


class TestLifecycle:
    def test_cleanup_once_before_pickling_initialize_once_after(self):
        node = Counting(name="c")
        blob = serialize_node(node)
        assert node.cleanup_calls == 1
        assert node.init_calls == 0
        copy = deserialize_node(blob)
        # cleanup ran before pickling: the copy carries its effects
        assert copy.cleanup_calls == 1
        assert copy.handle_at_cleanup is None
        # initialize ran exactly once, on the copy only
        assert copy.init_calls == 1
        assert copy.handle == "reopened"
        assert node.init_calls == 0
        assert copy.process(1) == (1, "reopened")

    def test_deserialize_without_initialize(self):
        node = Counting(name="c")
        copy = deserialize_node(serialize_node(node), initialize=False)
        assert copy.init_calls == 0
        assert copy.handle is None
        assert copy.handle_at_cleanup == "unset"

    def test_each_serialization_calls_cleanup_again(self):
        node = Counting(name="c")
        blob1 = serialize_node(node)
        blob2 = serialize_node(node)
        assert node.cleanup_calls == 2
        assert deserialize_node(blob1).cleanup_calls == 1
        assert deserialize_node(blob2).cleanup_calls == 2

    def test_call_cleanup_false_skips_cleanup(self):
        node = Counting(name="c")
        copy = deserialize_node(serialize_node(node, call_cleanup=False), initialize=False)
        assert node.cleanup_calls == 0
        assert copy.cleanup_calls == 0
        assert copy.handle is not None

    def test_cleanup_raising(self):
        class Bad(Node):
            def cleanup(self):
                raise RuntimeError("disk gone")

        with pytest.raises(SerializationError) as ei:
            serialize_node(Bad(name="bad"))
        e = ei.value
        assert e.node_name == "bad"
        assert "cleanup()" in e.reason
        assert "RuntimeError: disk gone" in e.reason
        assert "cleanup()" in str(e)
        assert isinstance(e.__cause__, RuntimeError)

    def test_initialize_error_propagates_unchanged(self):
        class FailsInit(Node):
            def initialize(self):
                raise OSError("no device")

        blob = serialize_node(FailsInit(name="f"))
        with pytest.raises(OSError, match="no device"):
            deserialize_node(blob)

    def test_garbage_blob(self):
        with pytest.raises(SerializationError, match="unpickling failed"):
            deserialize_node(b"not a pickle")

    @pytest.mark.parametrize("obj", [object(), "node", Plain(name="x"), PassThroughNode])
    def test_non_node_is_rejected(self, obj):
        with pytest.raises(NodeTypeError, match="Node instance"):
            serialize_node(obj)

    def test_serialization_error_pickles(self):
        e = SerializationError("n", "why", "fix it", "a.b")
        e2 = pickle.loads(pickle.dumps(e))
        assert (e2.node_name, e2.reason, e2.suggestion, e2.attribute_path) == ("n", "why", "fix it", "a.b")
        assert str(e2) == str(e)


# --------------------------------------------------------------------------- unpicklable state


def _node_with_nested_lock(big: Any = None, big_first: bool = False) -> Holder:
    node = Holder(name="asr")
    if big is not None and big_first:
        node.weights = big
    node.model = Plain(vocab={"a": 1}, session=Plain(timeout=3, _lock=threading.Lock()))
    if big is not None and not big_first:
        node.weights = big
    return node


class TestUnpicklable:
    def test_nested_lock_is_located(self):
        with pytest.raises(SerializationError) as ei:
            serialize_node(_node_with_nested_lock())
        e = ei.value
        assert e.node_name == "asr"
        assert e.attribute_path == "model.session._lock"
        assert "lock" in e.reason.lower()
        assert "model.session._lock" in e.reason
        assert "cleanup()" in e.suggestion
        assert "initialize()" in e.suggestion
        msg = str(e)
        assert "Suggestion:" in msg
        assert "'asr'" in msg
        assert "model.session._lock" in msg
        assert e.__cause__ is not None

    @pytest.mark.parametrize(
        "kind,big_first",
        [
            ("bytes", False),
            ("bytes", True),
            ("numpy", False),
            ("numpy", True),
        ],
        ids=["bytes-after-lock", "bytes-before-lock", "numpy-after-lock", "numpy-before-lock"],
    )
    def test_nested_lock_is_located_fast_next_to_50mb(self, kind, big_first):
        big = bytes(50 * MB) if kind == "bytes" else np.ones(50 * MB // 8)
        node = _node_with_nested_lock(big, big_first)
        t0 = time.thread_time()  # CPU time: what other processes on the host take does not count
        with pytest.raises(SerializationError) as ei:
            serialize_node(node)
        elapsed = time.thread_time() - t0
        assert ei.value.attribute_path == "model.session._lock"
        assert "lock" in ei.value.reason.lower()
        assert elapsed < 2.0, f"locating the lock took {elapsed:.2f} s of CPU"

    def test_lock_in_dict_attribute(self):
        node = Holder(name="d")
        node.tables = {"a": 1, "mylock": threading.Lock()}
        with pytest.raises(SerializationError) as ei:
            serialize_node(node)
        assert ei.value.attribute_path == "tables.mylock"

    def test_lock_under_non_identifier_dict_key(self):
        node = Holder(name="d")
        node.tables = {"ok": 1, "my lock": threading.RLock()}
        with pytest.raises(SerializationError) as ei:
            serialize_node(node)
        assert ei.value.attribute_path == "tables['my lock']"

    def test_lock_in_list_attribute(self):
        node = Holder(name="l")
        node.items = [1, threading.Lock(), "x"]
        with pytest.raises(SerializationError) as ei:
            serialize_node(node)
        assert ei.value.attribute_path == "items[1]"

    def test_lock_in_config(self):
        with pytest.raises(SerializationError) as ei:
            serialize_node(Holder(name="c", guard=threading.Lock()))
        assert ei.value.attribute_path == "config.guard"

    def test_cleanup_that_releases_the_lock_fixes_it(self):
        class Fixed(Holder):
            def cleanup(self):
                self.model.session._lock = None

            def initialize(self):
                self.model.session._lock = threading.Lock()

        node = Fixed(name="fixed")
        node.model = Plain(session=Plain(_lock=threading.Lock()))
        copy = deserialize_node(serialize_node(node))
        assert copy.model.session._lock is not None
        assert copy.model.session._lock.acquire(blocking=False)

    def test_find_unpicklable(self):
        obj = Plain(a=1, b=Plain(c=[0, Plain(d=threading.Lock())]))
        path, err = find_unpicklable(obj)
        assert path == ".b.c[1].d"
        assert isinstance(err, TypeError)
        assert "lock" in str(err)

    def test_find_unpicklable_with_prefix(self):
        path, _ = find_unpicklable({"k": threading.Lock()}, path="root")
        assert path == "root.k"

    def test_find_unpicklable_on_picklable_object(self):
        with pytest.raises(ValueError, match="pickles fine"):
            find_unpicklable({"a": [1, 2, 3]})


# --------------------------------------------------------------------------- size limit


class TestSizeLimit:
    def _big_node(self, payload) -> Holder:
        node = Holder(name="fat")
        node.small = list(range(10))
        node.weights = payload
        return node

    def test_limit_with_bytes_payload(self):
        with pytest.raises(SerializationError) as ei:
            serialize_node(self._big_node(bytes(30 * MB)), max_size=10 * MB)
        e = ei.value
        assert e.node_name == "fat"
        assert "size limit" in e.reason
        assert f"{10 * MB / 1e6:.1f} MB" in e.reason
        assert "largest attributes: weights" in e.reason
        assert e.attribute_path is None
        assert "initialize()" in e.suggestion

    def test_limit_with_numpy_payload(self):
        with pytest.raises(SerializationError) as ei:
            serialize_node(self._big_node(np.ones(30 * MB // 8)), max_size=10 * MB)
        assert "size limit" in ei.value.reason
        assert f"{10 * MB / 1e6:.1f} MB" in ei.value.reason
        assert "largest attributes: weights" in ei.value.reason

    @pytest.mark.parametrize("kind", ["bytes", "numpy"])
    def test_limit_is_enforced_while_pickling(self, kind):
        # 300 MB (lazily zeroed, never touched unless pickled); the limit must stop the pickler
        # at once instead of building the whole blob first
        payload = bytes(300 * MB) if kind == "bytes" else np.zeros(300 * MB, dtype=np.uint8)
        node = self._big_node(payload)
        tracemalloc.start()
        try:
            t0 = time.thread_time()  # CPU time (see above)
            with pytest.raises(SerializationError) as ei:
                serialize_node(node, max_size=10 * MB)
            elapsed = time.thread_time() - t0
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "size limit" in ei.value.reason
        assert elapsed < 1.0, f"oversized node took {elapsed:.2f} s of CPU to refuse"
        # no copy of the 300 MB payload (nor a blob beyond the limit) was ever built
        assert peak < 20 * MB, f"peak allocation while refusing: {peak / 1e6:.1f} MB"

    def test_limit_counts_many_small_parts(self):
        node = Holder(name="many")
        node.parts = [np.ones(1000) for _ in range(2000)]  # 16 MB in 8 KB arrays
        with pytest.raises(SerializationError, match="size limit"):
            serialize_node(node, max_size=10 * MB)
        assert len(serialize_node(node, max_size=20 * MB)) > 16_000_000

    def test_default_limit_applies(self):
        node = self._big_node(bytes(DEFAULT_MAX_SIZE + 1))
        with pytest.raises(SerializationError, match="size limit"):
            serialize_node(node)

    def test_max_size_none_disables_the_limit_bytes(self):
        node = self._big_node(bytes(30 * MB))
        copy = deserialize_node(serialize_node(node, max_size=None))
        assert len(copy.weights) == 30 * MB

    def test_max_size_none_disables_the_limit_numpy(self):
        node = self._big_node(np.ones(30 * MB // 8))
        copy = deserialize_node(serialize_node(node, max_size=None))
        assert copy.weights.shape == (30 * MB // 8,)

    def test_just_under_the_limit_passes(self):
        node = self._big_node(bytes(1 * MB))
        blob = serialize_node(node, max_size=2 * MB)
        assert 1 * MB < len(blob) <= 2 * MB


# --------------------------------------------------------------------------- frames


def _roundtrip(obj):
    meta, bufs = encode(obj)
    assert isinstance(meta, bytes)
    assert all(isinstance(b, memoryview) for b in bufs)
    return decode_bytes(meta, bufs), bufs


def _same_array(a: np.ndarray, b: np.ndarray) -> None:
    assert isinstance(b, np.ndarray)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # bit-exact (also for NaN payloads)


ARRAYS = [
    np.arange(10, dtype=np.float32),
    np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32),
    np.arange(-5, 5, dtype=np.int16).reshape(2, 5),
    (np.arange(360 * 640 * 3) % 256).astype(np.uint8).reshape(360, 640, 3),
    np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
    np.array([True, False, True]),
    np.zeros((0, 4), dtype=np.float64),
]


class TestFrames:
    @pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
    def test_array_alone(self, arr):
        out, bufs = _roundtrip(arr)
        _same_array(arr, out)
        if arr.size:
            assert np.array_equal(out, arr, equal_nan=arr.dtype.kind == "f")
        assert len(bufs) == 1
        assert bufs[0].nbytes == arr.nbytes

    def test_arrays_in_dict(self):
        audio = np.sin(np.linspace(0, 10, 16000)).astype(np.float32)
        video = np.full((4, 4, 3), 7, np.uint8)
        obj = {"audio": audio, "video": video, "rate": 16000, "name": "x"}
        out, bufs = _roundtrip(obj)
        assert len(bufs) == 2
        assert out["rate"] == 16000 and out["name"] == "x"
        _same_array(audio, out["audio"])
        _same_array(video, out["video"])
        assert np.array_equal(out["audio"], audio)

    def test_arrays_in_tuple_and_list(self):
        a, b, c = np.arange(3.0), np.arange(4, dtype=np.int64), np.ones((2, 2), np.float32)
        out, bufs = _roundtrip((a, [b, c], "tail"))
        assert len(bufs) == 3
        assert isinstance(out, tuple) and out[2] == "tail"
        _same_array(a, out[0])
        _same_array(b, out[1][0])
        _same_array(c, out[1][1])

    def test_arrays_in_dataclass(self):
        chunk = Chunk(samples=np.arange(1024, dtype=np.float32) / 1024, rate=48000, tag="mic")
        out, bufs = _roundtrip(chunk)
        assert len(bufs) == 1
        assert isinstance(out, Chunk)
        assert out.rate == 48000 and out.tag == "mic"
        _same_array(chunk.samples, out.samples)

    def test_shared_array_travels_once(self):
        a = np.arange(100.0)
        out, bufs = _roundtrip({"x": a, "y": a})
        assert len(bufs) == 1
        assert out["x"] is out["y"]

    def test_no_arrays_no_buffers(self):
        out, bufs = _roundtrip({"a": [1, 2.5, "s", None], "b": (b"raw", {3})})
        assert bufs == []
        assert out == {"a": [1, 2.5, "s", None], "b": (b"raw", {3})}

    def test_lambda_falls_back_to_cloudpickle(self):
        out, bufs = _roundtrip(lambda x: x * 3)
        assert bufs == []
        assert out(5) == 15

    def test_lambda_next_to_array_keeps_array_out_of_band(self):
        arr = np.arange(12, dtype=np.float64).reshape(3, 4)
        out, bufs = _roundtrip({"arr": arr, "fn": lambda x: x + 1})
        assert len(bufs) == 1
        _same_array(arr, out["arr"])
        assert out["fn"](1) == 2

    def test_local_class_instance(self):
        class Local:
            def __init__(self, v):
                self.v = v

        out, _ = _roundtrip(Local(np.arange(3)))
        assert type(out).__name__ == "Local"
        assert np.array_equal(out.v, np.arange(3))

    def test_decoded_arrays_do_not_alias_other_arrays(self):
        a, b = np.zeros(5), np.ones(5)
        out, _ = _roundtrip([a, b])
        _same_array(a, out[0])
        _same_array(b, out[1])


def test_class_pickled_by_value_with_unpicklable_global_is_explained():
    import sys
    import types

    import cloudpickle

    from remotemedia.errors import SerializationError
    from remotemedia.serialization import serialize_node

    mod = types.ModuleType("rm_dyn_script")
    exec(
        "import struct\nfrom remotemedia import Node\nS = struct.Struct('<q')\n"
        "class Stamper(Node):\n    def process(self, x):\n        return S.pack(x)\n",
        mod.__dict__,
    )
    sys.modules[mod.__name__] = mod
    cloudpickle.register_pickle_by_value(mod)  # as the CLI does for a pipeline script
    try:
        with pytest.raises(SerializationError) as ei:
            serialize_node(mod.Stamper())
        msg = str(ei.value)
        assert "class Stamper cannot be pickled" in msg and "module-level object" in msg and "_struct.Struct" in msg
        assert "importable module" in ei.value.suggestion
    finally:
        cloudpickle.unregister_pickle_by_value(mod)
        del sys.modules[mod.__name__]


# --------------------------------------------------------------------------- container frames


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(b) is type(a) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    "frame",
    [
        {"t": 123456789, "rate": 16000, "data": np.arange(1024, dtype=np.float32)},
        {"k": None, "yes": True, "no": False, "f": -0.25, "s": "héllo", "b": b"\x00\x01", "i": -(2**63), "d": np.ones(2)},
        (7, np.ones((2, 3, 4), dtype=">i4"), "x"),
        [np.zeros(3, dtype=np.complex64), np.array(["ab", "c"], dtype="<U2"), np.array(5.0)],
        {"a": np.arange(6, dtype=np.uint8).reshape(2, 3), "b": np.arange(4, dtype=np.int64)},
    ],
)
def test_container_frames_decode_in_python_as_the_bridge_encodes_them(frame) -> None:
    from remotemedia import _ipc_bridge as bridge
    from remotemedia.frames import CT_TAG, decode_bytes

    meta, bufs = bridge.encode_container(frame)
    assert meta[:4] == CT_TAG
    assert _same(frame, decode_bytes(meta, [memoryview(b).cast("B") for b in bufs]))


@pytest.mark.parametrize(
    "frame",
    [
        {"t": 1, "rate": 2},  # no array: a small pickle is as fast
        {"nested": {"data": np.arange(3)}},
        {1: np.arange(3)},  # a key that is not a str
        {"big": 2**70, "data": np.arange(3)},
        {"data": np.arange(12).reshape(3, 4).T},  # not contiguous
        {"data": np.array([object()])},
        {"data": np.zeros(0)},
        np.arange(3),  # a bare array has its own encoding
        {"data": np.arange(3).view(np.recarray)},  # a subclass: pickled as it is
    ],
)
def test_what_is_not_a_container_frame_is_pickled(frame) -> None:
    from remotemedia import _ipc_bridge as bridge

    assert bridge.encode_container(frame) is None
