"""The seed API as written (issue 11, items 1 and 2): the one-shot form of execute_pipeline,
enable_metrics, Pipeline.run(input_data=...), unknown keywords, and the seed's
node_serialization helper names. The quoted snippets run verbatim."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from remotemedia import Node, Pipeline
from remotemedia.errors import NodeError, NodeTypeError, RunOptionError, SerializationError
from remotemedia.nodes import MapNode, PassThroughNode, RangeSource
from remotemedia import execute_pipeline, execute_pipeline_with_input
from remotemedia.runs import RUN_OPTIONS, Outputs
from supervisor.api import supervisor_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- nodes, the way the seed's docs write them


class SentimentModel:
    """Stands for a model loaded once in the caller (weights, vocabulary)."""

    def __init__(self) -> None:
        self.weights = {"good": 1.0, "bad": -1.0}

    def predict(self, text):
        words = (text or "").split()
        return sum(self.weights.get(w, 0.0) for w in words)


class CustomNode(Node):
    def __init__(self, loaded_model=None, **kwargs):
        super().__init__(**kwargs)
        self.loaded_model = loaded_model
        self.calls = 0

    def process(self, data):
        self.calls += 1
        if self.loaded_model is None:
            return {"node": self.name, "input": data, "calls": self.calls}
        return {"score": self.loaded_model.predict(data), "has_model": True}


class Constant(Node):
    """A first node that takes the one-shot's None and makes something of it."""

    def __init__(self, value, **kw):
        super().__init__(**kw)
        self.value = value

    def process(self, data):
        assert data is None
        return self.value


# --------------------------------------------------------------------------- 1: the one-shot form


def test_success_criterion_snippet_runs_verbatim():
    async def main():
        result = await execute_pipeline([PassThroughNode(name="test")])
        return result

    # PassThroughNode returns the None it got, and a None return is "no output"
    assert asyncio.run(main()) == []


def test_python_c_check_runs_verbatim():
    cmd = "from remotemedia.runtime import execute_pipeline; from remotemedia.nodes import PassThroughNode; import asyncio; asyncio.run(execute_pipeline([PassThroughNode(name='test')]))"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", cmd], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr


def test_custom_node_snippet_runs_verbatim():
    async def main():
        return await execute_pipeline([CustomNode(name="custom")])

    assert asyncio.run(main()) == [{"node": "custom", "input": None, "calls": 1}]


@pytest.mark.slow
def test_instance_with_loaded_model_snippet_runs_verbatim():
    model = SentimentModel()

    async def main():
        node = CustomNode(loaded_model=model); await execute_pipeline([node])  # noqa: E702
        return node

    asyncio.run(main())
    # ... and what it returns: the model crossed to the worker with the instance
    out = asyncio.run(execute_pipeline([CustomNode(loaded_model=model)]))
    assert out == [{"score": 0.0, "has_model": True}]


@pytest.mark.slow
def test_one_shot_of_a_chain_returns_the_terminal_outputs():
    nodes = [Constant("good good bad", name="text"), MapNode(str.split, name="split"), MapNode(len, name="count")]
    assert asyncio.run(execute_pipeline(nodes)) == [3]


@pytest.mark.slow
def test_one_shot_of_a_dag_feeds_none_to_every_root():
    p = Pipeline(
        [Constant(2, name="a"), Constant(3, name="b"), MapNode(lambda x: x * 10, name="c"), MapNode(lambda x: x + 1, name="d")],
        connections=[("a", "c"), ("a", "d"), ("b", "d")],
    )
    # a -> c (20), a -> d (3), b -> d (4); c and d are terminal
    assert sorted(asyncio.run(execute_pipeline(p))) == [3, 4, 20]


def test_one_shot_whose_first_node_cannot_take_none_raises_its_node_error():
    with pytest.raises(NodeError) as ei:
        asyncio.run(execute_pipeline([MapNode(lambda x: x + 1, name="inc")]))
    assert ei.value.node == "inc"
    assert "TypeError" in str(ei.value)


def test_with_a_source_nothing_changes():
    assert asyncio.run(execute_pipeline([RangeSource(4, name="src"), MapNode(lambda x: x * 2, name="dbl")])) == [0, 2, 4, 6]


def test_pipeline_run_without_inputs_is_the_one_shot_too():
    assert Pipeline([Constant(7, name="seven")]).run() == [7]


# --------------------------------------------------------------------------- 2: the seed's keywords


def test_enable_metrics_returns_outputs_with_per_node_metrics():
    nodes = [MapNode(lambda x: x + 1, name="inc"), MapNode(lambda x: x * 10, name="tens")]
    out = asyncio.run(execute_pipeline_with_input(nodes, [1, 2, 3], enable_metrics=True))
    assert isinstance(out, Outputs) and isinstance(out, list)
    assert out == [20, 30, 40]
    assert set(out.metrics) == {"inc", "tens"}
    for m in out.metrics.values():
        assert m["frames_in"] == 3 and m["frames_out"] == 3 and m["restarts"] == 0
        assert m["process_time_p50_ms"] is not None and m["process_time_p99_ms"] >= m["process_time_p50_ms"] >= 0


@pytest.mark.slow
def test_enable_metrics_on_the_one_shot_and_on_pipeline_run():
    out = asyncio.run(execute_pipeline([Constant(1, name="one")], enable_metrics=True))
    assert out == [1] and out.metrics["one"]["frames_in"] == 1 and out.metrics["one"]["frames_out"] == 1
    out = Pipeline([RangeSource(3, name="src"), PassThroughNode(name="p")]).run(enable_metrics=True)
    assert out == [0, 1, 2]
    assert out.metrics["src"]["frames_out"] == 3 and out.metrics["p"]["frames_in"] == 3


def test_without_enable_metrics_the_result_is_a_plain_list():
    out = asyncio.run(execute_pipeline_with_input([PassThroughNode(name="p")], [1]))
    assert type(out) is list and out == [1]


@pytest.mark.slow
def test_pipeline_run_input_data_is_an_alias_of_inputs():
    p = Pipeline([MapNode(lambda x: x * 3, name="triple")])
    assert p.run(input_data=[1, 2, 3]) == [3, 6, 9]
    assert p.run(input_data=[4], enable_metrics=True).metrics["triple"]["frames_in"] == 1
    with pytest.raises(RunOptionError, match="twice"):
        p.run([1], input_data=[2])
    with pytest.raises(NodeTypeError, match=r"input_data=\[x\]"):
        p.run(input_data=5)


def test_execute_pipeline_with_input_accepts_input_data():
    assert asyncio.run(execute_pipeline_with_input([PassThroughNode(name="p")], input_data=[5, 6])) == [5, 6]
    with pytest.raises(NodeTypeError, match="needs inputs"):
        asyncio.run(execute_pipeline_with_input([PassThroughNode(name="p")]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: asyncio.run(execute_pipeline([PassThroughNode()], enable_metric=True)),
        lambda: asyncio.run(execute_pipeline_with_input([PassThroughNode()], [1], enable_metric=True)),
        lambda: Pipeline([PassThroughNode()]).run([1], enable_metric=True),
    ],
    ids=["execute_pipeline", "execute_pipeline_with_input", "Pipeline.run"],
)
def test_unknown_keywords_raise_type_error_listing_the_valid_ones(call):
    with pytest.raises(TypeError) as ei:
        call()
    assert isinstance(ei.value, RunOptionError)
    msg = str(ei.value)
    assert "'enable_metric' (did you mean 'enable_metrics'?)" in msg
    for valid in list(RUN_OPTIONS) + ["max_restarts", "on_error", "queue_depth"]:
        assert valid in msg


def test_the_valid_keywords_are_the_supervisor_options_plus_the_seeds():
    import inspect

    from remotemedia import Supervisor

    params = inspect.signature(Supervisor.__init__).parameters
    assert supervisor_options() == {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert "enable_metrics" in RUN_OPTIONS
    # a Supervisor option passes through (a bad value is the Supervisor's error, not a TypeError)
    assert Pipeline([PassThroughNode(name="p")]).run([1], queue_depth=2) == [1]


# --------------------------------------------------------------------------- the seed's helper names


class Counter(Node):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.history = [1, 2, 3]
        self.cleanups = 0
        self.inits = 0

    def initialize(self):
        self.inits += 1

    def cleanup(self):
        self.cleanups += 1

    def process(self, data):
        return sum(self.history) + data


def test_node_serialization_helper_names_round_trip():
    from remotemedia.core.node_serialization import (
        MAX_SERIALIZED_SIZE_BYTES,
        deserialize_node_from_ipc,
        serialize_node_for_ipc,
    )

    node = Counter(name="c")
    data = serialize_node_for_ipc(node)
    assert isinstance(data, bytes) and 0 < len(data) <= MAX_SERIALIZED_SIZE_BYTES
    assert node.cleanups == 1  # cleanup() ran on the caller's object, as upstream
    restored = deserialize_node_from_ipc(data)
    assert restored is not node and restored.name == "c" and restored.history == [1, 2, 3]
    assert restored.inits == 1  # initialize() ran on the restored node
    assert restored.process(4) == 10


def test_node_serialization_helper_errors():
    import threading

    from remotemedia.core.node_serialization import SerializationError as SeedSerializationError
    from remotemedia.core.node_serialization import serialize_node_for_ipc

    assert SeedSerializationError is SerializationError
    node = Counter(name="locked")
    node.lock = threading.Lock()
    with pytest.raises(SerializationError) as ei:
        serialize_node_for_ipc(node)
    assert ei.value.node_name == "locked" and ei.value.attribute_path == "lock" and ei.value.suggestion
    with pytest.raises(TypeError):
        serialize_node_for_ipc("not a node")


def test_node_serialization_module_keeps_the_model_layer_free_of_the_supervisor():
    code = (
        "import sys; import remotemedia.core.node_serialization; "
        "assert not any(m == 'supervisor' or m.startswith('supervisor.') for m in sys.modules), sorted(sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
