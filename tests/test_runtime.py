"""End-to-end tests: real worker processes, real iceoryx2 shared memory."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
import zlib

import numpy as np
import pytest

from remotemedia import (
    Node,
    Pipeline,
    Supervisor,
    execute_pipeline,
    execute_pipeline_with_input,
)
from remotemedia.errors import (
    EndOfStream,
    ManifestError,
    NodeError,
    NodeInitError,
    PipelineValidationError,
    RemoteMediaError,
    RemoteTraceback,
    SerializationError,
    SupervisorError,
    UnknownNodeTypeError,
)
from remotemedia.nodes import BatchNode, MapNode, PassThroughNode, RangeSource

from conftest import in_run_dir, shm_mapping_of


# --------------------------------------------------------------------------- nodes used below


class FakeModel:
    """Stands for a loaded model: weights plus a lookup table, built in the parent."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.weights = rng.standard_normal((64, 64)).astype(np.float32)
        self.vocab = {i: f"tok{i}" for i in range(100)}
        self.loaded_in_pid = os.getpid()


class ModelNode(Node):
    def __init__(self, model: FakeModel, post, **kw):
        super().__init__(**kw)
        self.model = model
        self.post = post  # a lambda

    def process(self, data):
        score = float(self.model.weights[data % 64].sum())
        return {
            "token": self.model.vocab[data],
            "score": self.post(score),
            "loaded_in_pid": self.model.loaded_in_pid,
            "worker_pid": os.getpid(),
        }


class Lifecycle(Node):
    """Counts its lifecycle calls; process() reports what the worker's copy saw."""

    def __init__(self, marker_file: str, **kw):
        super().__init__(**kw)
        self.marker_file = marker_file
        self.cleanups = 0
        self.inits = 0
        self.resource = "open-handle"

    def initialize(self):
        self.inits += 1
        self.resource = f"reopened-in-{os.getpid()}"

    def process(self, data):
        return {"cleanups_before_pickle": self.cleanups, "inits": self.inits, "resource": self.resource}

    def cleanup(self):
        self.cleanups += 1
        self.resource = None
        with open(self.marker_file, "a") as f:
            f.write(f"cleanup {os.getpid()}\n")


class ZeroCopyProbe(Node):
    """Reports where its input array lives and a checksum, then passes it on."""

    def process(self, data):
        arr = data["array"]
        return {
            "array": arr,
            "mapping": shm_mapping_of(arr.ctypes.data),
            "writeable": bool(arr.flags.writeable),
            "crc": zlib.crc32(arr.reshape(-1).view(np.uint8)),
        }


class Failing(Node):
    def process(self, data):
        if data == 3:
            raise ValueError(f"cannot handle frame {data}")
        return data


class InitFails(Node):
    def initialize(self):
        raise RuntimeError("model file missing: /models/x.onnx")

    def process(self, data):
        return data


class InitDies(Node):
    def initialize(self):
        os._exit(13)

    def process(self, data):
        return data


class GenNode(Node):
    def process(self, data):
        for i in range(data):
            yield (data, i)


class AsyncNode(Node):
    async def process(self, data):
        await asyncio.sleep(0)
        return data * 2


class AsyncGenNode(Node):
    async def process(self, data):
        for i in range(2):
            await asyncio.sleep(0)
            yield data + i


class DropOdd(Node):
    def process(self, data):
        return None if data % 2 else data


class ListOut(Node):
    def process(self, data):
        return [data, data]


class Hoarder(Node):
    """Keeps every input it received (zero-copy frames included): must not stall the edge."""

    def initialize(self):
        self.kept = []

    def process(self, data):
        self.kept.append(data)
        return int(data[0])

    def flush(self):
        # every kept frame must still hold what it held on arrival, views and copies alike
        return [(int(a.min()), int(a.max())) for a in self.kept]


class HeaderEcho(Node):
    def process(self, data):
        f = self.current_frame
        return (data, f.seq, f.origin, f.source)

    def flush(self):
        return ("after", self.current_frame)  # (no frame in hand outside process())


@dataclasses.dataclass
class Packet:
    audio: np.ndarray
    meta: dict


# --------------------------------------------------------------------------- state and lifecycle


def test_state_preserved_model_and_lambda():
    model = FakeModel()
    node = ModelNode(model, post=lambda s: round(s * 2, 3), name="model")
    out = Pipeline([node]).run([1, 5, 99])
    assert [o["token"] for o in out] == ["tok1", "tok5", "tok99"]
    for x, o in zip([1, 5, 99], out):
        assert o["score"] == round(float(model.weights[x % 64].sum()) * 2, 3)
        assert o["loaded_in_pid"] == os.getpid()  # the parent's model, not a reload
        assert o["worker_pid"] != os.getpid()  # ran in a worker process


def test_class_defined_in_test_function_and_closure():
    offset = 1000

    class Local(Node):
        def process(self, data):
            return data + offset

    assert Pipeline([Local()]).run([1, 2]) == [1001, 1002]


def test_cleanup_before_pickle_and_initialize_after_unpickle_exactly_once(tmp_path):
    marker = tmp_path / "cleanup.log"
    node = Lifecycle(str(marker))
    out = Pipeline([node]).run([0, 1, 2])
    # In the worker: the copy was pickled after exactly one cleanup() and initialized once.
    assert all(o["cleanups_before_pickle"] == 1 and o["inits"] == 1 for o in out)
    assert all(o["resource"].startswith("reopened-in-") for o in out)
    # In the parent: cleanup() ran once, before pickling (the handle was released).
    assert node.cleanups == 1 and node.resource is None and node.inits == 0
    lines = marker.read_text().splitlines()
    pids = [int(line.split()[1]) for line in lines]
    assert pids[0] == os.getpid() and len(pids) == 2  # parent, then the worker at end of stream
    assert pids[1] != os.getpid()


# --------------------------------------------------------------------------- API forms


def test_execute_pipeline_with_input_list_of_instances_all_inputs_in_order():
    out = asyncio.run(execute_pipeline_with_input([PassThroughNode(), MapNode(lambda x: x * 3)], list(range(500))))
    assert out == [x * 3 for x in range(500)]


def test_execute_pipeline_source_driven():
    out = asyncio.run(execute_pipeline([RangeSource(25), BatchNode(10)]))
    assert out == [list(range(10)), list(range(10, 20)), list(range(20, 25))]


def test_mixed_manifest_and_instance_pipeline_keeps_instance_state():
    secret = {"k": 42}
    node = MapNode(lambda x: x + secret["k"], name="inst")
    items = [{"id": "first", "node_type": "PassThroughNode"}, node, {"node_type": "PassThroughNode", "id": "last"}]
    out = asyncio.run(execute_pipeline_with_input(items, [1, 2, 3]))
    assert out == [43, 44, 45]


def test_json_manifest_string():
    manifest = json.dumps(
        {
            "version": "v1",
            "nodes": [
                {"id": "src", "node_type": "RangeSource", "params": {"stop": 7}},
                {"id": "batch", "node_type": "BatchNode", "params": {"size": 3}},
            ],
            "connections": [{"from": "src", "to": "batch"}],
        }
    )
    assert asyncio.run(execute_pipeline(manifest)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_manifest_dict_with_input():
    manifest = {"version": "v1", "nodes": [{"id": "p", "node_type": "PassThroughNode"}]}
    assert asyncio.run(execute_pipeline_with_input(manifest, ["a", "b"])) == ["a", "b"]


@pytest.mark.slow
def test_fan_out_fan_in():
    p = Pipeline(
        [
            PassThroughNode(name="a"),
            MapNode(lambda x: ("b", x + 1), name="b"),
            MapNode(lambda x: ("c", x * 10), name="c"),
            PassThroughNode(name="d"),
        ],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    out = p.run(list(range(50)))
    assert sorted(out) == sorted([("b", x + 1) for x in range(50)] + [("c", x * 10) for x in range(50)])
    # ordered by the input they derive from
    assert [o[1] if o[0] == "b" else None for o in out if o[0] == "b"] == [x + 1 for x in range(50)]


@pytest.mark.slow
def test_generator_async_and_none_outputs():
    assert Pipeline([GenNode()]).run([1, 3]) == [(1, 0), (3, 0), (3, 1), (3, 2)]
    assert Pipeline([AsyncNode(), AsyncGenNode()]).run([1, 5]) == [2, 3, 10, 11]
    assert Pipeline([DropOdd()]).run(range(6)) == [0, 2, 4]
    assert Pipeline([ListOut()]).run([7]) == [[7, 7]]  # a list is one output


@pytest.mark.slow
def test_frame_header_reaches_the_node():
    out = Pipeline([PassThroughNode(name="up"), HeaderEcho(name="echo")]).run(["x", "y"])
    assert out == [("x", 0, 0, "up"), ("y", 1, 1, "up"), ("after", None)]


def test_any_picklable_payload_dataclass_text_bytes_json():
    pkt = Packet(np.arange(10, dtype=np.int16), {"lang": "en"})
    inputs = [pkt, "text", b"\x00\x01" * 1000, {"json": [1, 2, {"a": None}]}, 3.5, None]
    out = Pipeline([PassThroughNode()]).run(inputs)
    # None is "no output" at the source side too: it is sent, passed through, and dropped
    assert out[0].meta == {"lang": "en"} and np.array_equal(out[0].audio, pkt.audio)
    assert out[1:5] == inputs[1:5]


# --------------------------------------------------------------------------- zero copy, big frames


@pytest.mark.parametrize(
    "shape,dtype",
    [((64 << 20,), np.uint8), ((2160, 3840, 3), np.uint8), ((1024,), np.float32)],
    ids=["64MB", "4K-rgb", "4KB-audio"],
)
@pytest.mark.slow
def test_big_frames_bit_exact_and_zero_copy(shape, dtype):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, size=shape, dtype=np.uint8).view(dtype) if dtype == np.uint8 else rng.standard_normal(shape).astype(dtype)
    want_crc = zlib.crc32(arr.reshape(-1).view(np.uint8))
    out = Pipeline([PassThroughNode(name="first"), ZeroCopyProbe(name="probe")]).run([{"array": arr}])
    (o,) = out
    # In the worker the array was a read-only view on the iceoryx2 shared-memory segment.
    assert in_run_dir(o["mapping"]), o["mapping"]
    assert o["writeable"] is False
    assert o["crc"] == want_crc
    # And it arrives back bit-exact, dtype and shape included.
    assert o["array"].dtype == arr.dtype and o["array"].shape == arr.shape
    assert np.array_equal(o["array"], arr)


@pytest.mark.slow
def test_hoarding_node_does_not_stall():
    frames = [np.full(1000, i, dtype=np.int32) for i in range(100)]
    out = Pipeline([PassThroughNode(), Hoarder()]).run(frames)
    assert out[:100] == list(range(100))
    assert out[100] == [(i, i) for i in range(100)]


# --------------------------------------------------------------------------- streaming API


def test_supervisor_streaming_send_recv_close():
    with Supervisor([MapNode(lambda x: x * 2)]) as sup:
        pids = sup.worker_pids()
        assert list(pids) == ["MapNode"] and pids["MapNode"] != os.getpid()
        for i in range(5):
            sup.send(i)
        assert [sup.recv(timeout=10) for _ in range(5)] == [0, 2, 4, 6, 8]
        with pytest.raises(TimeoutError):
            sup.recv(timeout=0.2)
        sup.close()
        with pytest.raises(EndOfStream):
            sup.recv(timeout=10)
        with pytest.raises(EndOfStream):
            sup.recv(timeout=10)
        with pytest.raises(SupervisorError):
            sup.send(1)


def test_supervisor_run_report():
    sup = Supervisor([RangeSource(30), MapNode(lambda x: -x, name="neg")], name="rep")
    report = sup.run()
    assert report.outputs == [-x for x in range(30)]
    assert report.frames == {"RangeSource": 30, "neg": 30}
    assert report.nodes["neg"]["frames_in"] == 30 and report.duration > 0
    assert all(s["state"] == "EXITED" for s in report.nodes.values())


@pytest.mark.slow
def test_two_pipelines_at_once_do_not_collide():
    a = Supervisor([MapNode(lambda x: ("a", x))]).start()
    b = Supervisor([MapNode(lambda x: ("b", x))]).start()
    try:
        assert a.root != b.root
        for i in range(3):
            a.send(i)
            b.send(i)
        assert [a.recv(timeout=10) for _ in range(3)] == [("a", i) for i in range(3)]
        assert [b.recv(timeout=10) for _ in range(3)] == [("b", i) for i in range(3)]
    finally:
        a.close()
        b.close()
        a.join()
        b.join()


# --------------------------------------------------------------------------- errors


def test_exception_in_process_reaches_caller_as_node_error():
    with pytest.raises(NodeError) as ei:
        Pipeline([PassThroughNode(), Failing(name="fragile")]).run(range(10))
    e = ei.value
    assert e.node == "fragile" and isinstance(e.pid, int) and e.pid != os.getpid()
    assert e.seq == 3 and "cannot handle frame 3" in str(e) and "ValueError" in str(e)
    assert isinstance(e.__cause__, RemoteTraceback)
    assert "in process" in e.__cause__.tb and 'raise ValueError(f"cannot handle frame {data}")' in e.__cause__.tb
    assert isinstance(e.original, ValueError)


def test_initialize_failure_reported_at_once_with_traceback():
    t0 = time.monotonic()
    with pytest.raises(NodeInitError) as ei:
        Supervisor([PassThroughNode(), InitFails(name="loader")], init_timeout=600).run([1])
    assert time.monotonic() - t0 < 120  # at once, not at the 600 s init timeout (generous: a busy host)
    e = ei.value
    assert e.node == "loader" and "model file missing" in str(e)
    assert "RuntimeError" in e.__cause__.tb and "in initialize" in e.__cause__.tb


def test_worker_dying_during_initialize_reported_at_once():
    t0 = time.monotonic()
    with pytest.raises(NodeInitError) as ei:
        Supervisor([InitDies(name="dies")], init_timeout=600).run([1])
    assert time.monotonic() - t0 < 120  # not after the 600 s init timeout (generous: a busy host)
    assert ei.value.node == "dies" and "exit code 13" in str(ei.value)


def test_serialization_error_before_any_process(monkeypatch):
    import subprocess
    import threading

    from supervisor import launch

    spawned = []

    class Spy(subprocess.Popen):
        def __init__(self, *a, **kw):
            spawned.append(a)
            super().__init__(*a, **kw)

    monkeypatch.setattr(launch.subprocess, "Popen", Spy)  # (workers and worker templates alike)

    class Holder(Node):
        def __init__(self):
            super().__init__(name="holder")
            self.lock = threading.Lock()

        def process(self, data):
            return data

    with pytest.raises(SerializationError) as ei:
        Pipeline([PassThroughNode(), Holder()]).run([1])
    assert spawned == []  # refused before any worker was started
    assert ei.value.node_name == "holder" and ei.value.attribute_path == "lock"


@pytest.mark.parametrize(
    "bad,exc",
    [
        ([], ValueError),
        ([PassThroughNode(), "x", 3], TypeError),
        ({"version": "v1", "nodes": [{"id": "a", "node_type": "NoSuchNode"}]}, UnknownNodeTypeError),
        ('{"version": "v1", "nodes": [', ManifestError),
        (
            {"version": "v1", "nodes": [{"id": "a", "node_type": "PassThroughNode"}], "connections": [{"from": "a", "to": "zz"}]},
            PipelineValidationError,
        ),
        (
            {
                "version": "v1",
                "nodes": [{"id": "a", "node_type": "PassThroughNode"}, {"id": "b", "node_type": "PassThroughNode"}],
                "connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}],
            },
            PipelineValidationError,
        ),
        (42, TypeError),
    ],
    ids=["empty", "types", "unknown-type", "bad-json", "unknown-id", "cycle", "not-a-pipeline"],
)
def test_bad_input_is_refused_before_anything_starts(bad, exc):
    with pytest.raises(exc) as ei:
        asyncio.run(execute_pipeline_with_input(bad, [1]))
    assert isinstance(ei.value, RemoteMediaError)


def test_bad_inputs_argument():
    with pytest.raises(TypeError):
        asyncio.run(execute_pipeline_with_input([PassThroughNode()], "not a list"))
    with pytest.raises(SupervisorError, match="no input nodes"):
        Pipeline([RangeSource(3)]).run([1, 2])
