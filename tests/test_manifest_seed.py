"""Issue 11 items 4 and 5: node instances inside manifests (include_instances / trust_instances)
and upstream (remotemedia-sdk) manifests: optional version, is_streaming / capabilities / host,
upstream type names, CalculatorNode."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from remotemedia import Node, Pipeline, execute_pipeline_with_input, register_node
from remotemedia.errors import ManifestError, NodeError, RemoteMediaError, SerializationError, UnknownNodeTypeError
from remotemedia.manifest import load_manifest, node_host
from remotemedia.nodes import BatchNode, CalculatorNode, GainNode, MapNode, PassThroughNode, RangeSource
from remotemedia.registry import unregister_node
from remotemedia.pipeline import as_pipeline
from supervisor.core import Supervisor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeModel:
    """Stands for a loaded model: built in the parent, not rebuildable from params."""

    def __init__(self) -> None:
        self.weights = np.arange(16, dtype=np.float32) * 0.5
        self.vocab = {i: f"tok{i}" for i in range(16)}


@register_node("seed.ModelNode")
class ModelNode(Node):
    def __init__(self, model: object = None, post=None, **kw):
        super().__init__(**kw)
        self.model = model
        self.post = post

    def process(self, data):
        return {"token": self.model.vocab[data], "score": self.post(float(self.model.weights[data]))}


@register_node("seed.Counter")
class Counter(Node):
    def __init__(self, start: int = 0, **kw):
        super().__init__(start=start, **kw)
        self.count = start

    def process(self, data):
        self.count += 1
        return (data, self.count)


class Unregistered(Node):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.factor = 7

    def process(self, data):
        return data * self.factor


def _run(p, inputs, **kw):
    return asyncio.run(execute_pipeline_with_input(p, inputs, **kw))


def _instance_manifest():
    p = Pipeline(
        [PassThroughNode(name="p"), ModelNode(model=FakeModel(), post=lambda s: s * 10, name="m"), GainNode(gain_db=0.0, name="g")],
        connections=[("p", "m")],
        name="seed",
    )
    return p.to_json(include_instances=True)


# --------------------------------------------------------------------------- item 4: instances


class TestInstances:
    @pytest.mark.slow
    def test_model_and_lambda_round_trip_through_json_and_run(self):
        text = _instance_manifest()
        data = json.loads(text)  # plain JSON
        by_id = {e["id"]: e for e in data["nodes"]}
        assert set(by_id["m"]) == {"id", "node_type", "instance"}
        inst = by_id["m"]["instance"]
        assert inst["format"] == "cloudpickle" and len(inst["sha256"]) == 64
        # rebuildable nodes stay plain entries
        assert by_id["p"] == {"id": "p", "node_type": "PassThroughNode", "params": {}}
        assert by_id["g"]["params"] == {"gain_db": 0.0} and "instance" not in by_id["g"]

        p2 = Pipeline(text, trust_instances=True)
        m = p2.node("m")
        assert isinstance(m, ModelNode) and m.model.vocab[3] == "tok3"
        assert _run(Pipeline([p2.node("p"), m]), [3, 5]) == [
            {"token": "tok3", "score": 15.0},
            {"token": "tok5", "score": 25.0},
        ]

    def test_to_json_and_serialize_agree(self):
        p = Pipeline([Unregistered(name="u")])
        assert "instance" in p.serialize(include_instances=True)["nodes"][0]
        assert "instance" in json.loads(p.to_json(include_instances=True))["nodes"][0]
        # default unchanged: type + params, no instance
        assert "instance" not in p.serialize()["nodes"][0]

    def test_unregistered_class_runs_with_its_state(self):
        n = Unregistered(name="u")
        n.factor = 9
        p2 = Pipeline(Pipeline([n]).to_json(include_instances=True), trust_instances=True)
        assert _run(p2, [1, 2]) == [9, 18]

    def test_rule_state_changed_after_construction_is_pickled(self):
        fresh, used = Counter(start=2, name="fresh"), Counter(start=2, name="used")
        used.process(None)  # count 3: params (start=2) no longer rebuild it
        entries = {e["id"]: e for e in Pipeline([fresh, used]).serialize(include_instances=True)["nodes"]}
        assert entries["fresh"] == {"id": "fresh", "node_type": "seed.Counter", "params": {"start": 2}}
        assert "instance" in entries["used"]
        p2 = Pipeline(json.dumps({"version": "v1", "nodes": list(entries.values())}), trust_instances=True)
        assert p2.node("used").count == 3 and p2.node("fresh").count == 2

    def test_rule_lambda_in_registered_builtin_is_pickled(self):
        e = Pipeline([MapNode(lambda x: x + 1, name="inc")]).serialize(include_instances=True)["nodes"][0]
        assert "instance" in e and "params" not in e
        assert _run(Pipeline(json.dumps({"nodes": [e]}), trust_instances=True), [1]) == [2]

    def test_auto_named_builtin_stays_plain(self):
        p = Pipeline([PassThroughNode(), BatchNode(2)])
        assert all("instance" not in e for e in p.serialize(include_instances=True)["nodes"])

    def test_unpicklable_node_names_the_attribute(self):
        n = Unregistered(name="u")
        n.lk = threading.Lock()
        with pytest.raises(SerializationError) as ei:
            Pipeline([n]).to_json(include_instances=True)
        assert "lk" in str(ei.value)

    def test_size_limit(self):
        n = Unregistered(name="big")
        n.blob = np.zeros(1 << 20, dtype=np.uint8)
        with pytest.raises(SerializationError, match="size limit"):
            Pipeline([n]).serialize(include_instances=True, max_node_size=100_000)

    def test_untrusted_is_refused_everywhere_and_nothing_is_unpickled(self, tmp_path):
        marker = tmp_path / "ran"

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        n = Unregistered(name="u")
        n.payload = Evil()
        text = Pipeline([n]).to_json(include_instances=True)
        assert not marker.exists()

        def check(fn):
            with pytest.raises(ManifestError) as ei:
                fn()
            msg = str(ei.value)
            assert "trust_instances=True" in msg and "only for manifests you made yourself" in msg
            assert isinstance(ei.value, RemoteMediaError)

        check(lambda: Pipeline(text))
        check(lambda: Pipeline(json.loads(text)["nodes"]))  # a list of entries
        check(lambda: load_manifest(text))
        check(lambda: as_pipeline(text))
        check(lambda: Supervisor(text))
        check(lambda: _run(text, [1]))
        assert not marker.exists()

    @pytest.mark.slow
    def test_trusted_via_supervisor_and_execute(self):
        text = Pipeline([Unregistered(name="u")]).to_json(include_instances=True)
        assert _run(text, [2], trust_instances=True) == [14]
        assert Supervisor(text, trust_instances=True).run([3]).outputs == [21]

    def test_wrong_digest(self):
        data = json.loads(_instance_manifest())
        m = next(e for e in data["nodes"] if e["id"] == "m")
        m["instance"]["sha256"] = "0" * 64
        with pytest.raises(ManifestError, match="does not match its digest") as ei:
            Pipeline(data, trust_instances=True)
        assert ei.value.where == "nodes[1].instance.sha256"

    def test_tampered_data(self):
        data = json.loads(_instance_manifest())
        m = next(e for e in data["nodes"] if e["id"] == "m")
        blob = bytearray(base64.b64decode(m["instance"]["data"]))
        blob[len(blob) // 2] ^= 0xFF
        m["instance"]["data"] = base64.b64encode(bytes(blob)).decode()
        with pytest.raises(ManifestError, match="does not match its digest"):
            Pipeline(data, trust_instances=True)

    @pytest.mark.parametrize(
        "instance, match",
        [
            ("abc", "must be an object"),
            ({"format": "cloudpickle", "sha256": "00"}, "missing key"),
            ({"format": "pickle5", "sha256": "00", "data": ""}, "unsupported instance format"),
            ({"format": "cloudpickle", "sha256": "00", "data": "@@@"}, "not valid base64"),
            ({"format": "cloudpickle", "sha256": "00", "data": "", "extra": 1}, "unknown key"),
        ],
    )
    def test_malformed_instance(self, instance, match):
        with pytest.raises(ManifestError, match=match):
            load_manifest({"nodes": [{"id": "x", "node_type": "X", "instance": instance}]}, trust_instances=True)

    def test_instance_with_params_is_refused(self):
        e = Pipeline([Unregistered(name="u")]).serialize(include_instances=True)["nodes"][0]
        e["params"] = {"factor": 1}
        with pytest.raises(ManifestError, match="remove 'params'"):
            load_manifest({"nodes": [e]}, trust_instances=True)

    def test_instance_entry_id_and_options_win(self):
        e = Pipeline([Unregistered(name="u")]).serialize(include_instances=True)["nodes"][0]
        e["id"] = "renamed"
        e["options"] = {"restart_policy": "never"}
        n = load_manifest({"nodes": [e]}, trust_instances=True)[0][0]
        assert n.name == "renamed" and n.options["restart_policy"] == "never"


# --------------------------------------------------------------------------- item 5: upstream


# As upstream's Pipeline.serialize() writes it: ids "{name}_{i}", metadata with created_at, and
# to_manifest(include_capabilities=True) fields on every node; upstream type names.
UPSTREAM = """{
  "version": "v1",
  "metadata": {"name": "calc_pipeline", "created_at": "2025-11-20T10:00:00.000000", "description": "upstream"},
  "nodes": [
    {"id": "PassThrough_0", "node_type": "PassThrough", "params": {}, "is_streaming": false, "capabilities": null},
    {"id": "CalculatorNode_1", "node_type": "CalculatorNode", "params": {}, "is_streaming": false,
     "capabilities": {"gpu": false}, "host": "localhost:50051"}
  ],
  "connections": [{"from": "PassThrough_0", "to": "CalculatorNode_1"}]
}"""


class TestUpstream:
    def test_verbatim_upstream_manifest_runs_end_to_end(self):
        inputs = [{"operation": "add", "args": [2, 3]}, {"operation": "divide", "args": [1, 4]},
                  {"operation": "multiply", "args": [6, 7]}, {"operation": "subtract", "args": [1, 9]}]
        assert _run(UPSTREAM, inputs) == [5, 0.25, 42, -8]

    @pytest.mark.slow
    def test_without_version_and_connections(self):
        m = json.loads(UPSTREAM)
        del m["version"], m["connections"]
        p = Pipeline(m)
        assert p.name == "calc_pipeline" and p.connections == [("PassThrough_0", "CalculatorNode_1")]
        assert isinstance(p.node("PassThrough_0"), PassThroughNode)
        assert _run(m, [{"operation": "add", "args": [1, 1]}]) == [2]

    def test_host_is_kept_and_written_back(self):
        p = Pipeline(UPSTREAM)
        assert node_host(p.node("CalculatorNode_1")) == "localhost:50051"
        assert node_host(p.node("PassThrough_0")) is None
        entries = {e["id"]: e for e in p.serialize()["nodes"]}
        assert entries["CalculatorNode_1"]["host"] == "localhost:50051" and "host" not in entries["PassThrough_0"]
        assert Pipeline(p.to_json()).node("CalculatorNode_1") is not None

    @pytest.mark.parametrize(
        "field, value, match",
        [("is_streaming", "yes", "is_streaming"), ("capabilities", [1], "capabilities"), ("host", 5, "host"), ("host", "", "host")],
    )
    def test_upstream_fields_are_checked(self, field, value, match):
        with pytest.raises(ManifestError, match=match) as ei:
            load_manifest({"nodes": [{"id": "a", "node_type": "PassThrough", field: value}]})
        assert ei.value.where == f"nodes[0].{field}"

    def test_unknown_keys_still_refused_listing_known(self):
        with pytest.raises(ManifestError) as ei:
            load_manifest({"nodes": [{"id": "a", "node_type": "PassThrough", "streaming": True}]})
        msg = str(ei.value)
        assert "'streaming'" in msg
        for known in ("is_streaming", "capabilities", "host", "instance", "params", "options"):
            assert known in msg
        with pytest.raises(ManifestError, match="'executor'.*a manifest has"):
            load_manifest({"nodes": [], "executor": "x"})

    def test_audio_chunker_maps_to_chunker_node_with_its_params(self):
        from remotemedia.nodes import ChunkerNode

        for params, size in (({"chunk_size": 4}, 4), ({"chunkSize": 3}, 3), ({}, 512)):
            (node,), _, _ = load_manifest({"nodes": [{"id": "c", "node_type": "AudioChunker", "params": params}]})
            assert type(node) is ChunkerNode and node.size == size
        with pytest.raises(ManifestError, match="second time"):
            load_manifest({"nodes": [{"id": "c", "node_type": "AudioChunker", "params": {"chunk_size": 4, "chunkSize": 4}}]})
        chunks = Pipeline(load_manifest({"nodes": [{"id": "c", "node_type": "AudioChunker", "params": {"chunk_size": 4}}]})[0]).run(
            [np.arange(6, dtype=np.float32)], executor="inline"
        )
        assert [c.tolist() for c in chunks] == [[0, 1, 2, 3], [4, 5]]

    def test_near_equivalents_get_a_hint_not_a_silent_mapping(self):
        with pytest.raises(ManifestError, match="ResampleNode"):
            load_manifest({"nodes": [{"id": "r", "node_type": "FastResample"}]})
        with pytest.raises(UnknownNodeTypeError):
            load_manifest({"nodes": [{"id": "r", "node_type": "SileroVAD"}]})

    def test_a_registered_class_wins_over_the_mapping(self):
        @register_node("PassThrough")
        class MyPassThrough(Node):
            def process(self, data):
                return data

        try:
            assert type(load_manifest({"nodes": [{"id": "a", "node_type": "PassThrough"}]})[0][0]) is MyPassThrough
        finally:
            unregister_node("PassThrough")


class TestCalculator:
    @pytest.mark.parametrize(
        "op, args, out",
        [("add", [2, 3], 5), ("subtract", [2, 3], -1), ("multiply", [2.5, 2], 5.0), ("divide", [7, 2], 3.5),
         ("power", [2, 10], 1024), ("modulo", [7, 3], 1)],
    )
    def test_operations(self, op, args, out):
        assert CalculatorNode().process({"operation": op, "args": args}) == out

    @pytest.mark.parametrize(
        "data, exc, match",
        [
            (3, TypeError, "expected"),
            ({"operation": "add"}, TypeError, "expected"),
            ({"operation": "sqrt", "args": [1, 2]}, ValueError, "unknown operation 'sqrt'"),
            ({"operation": "add", "args": [1]}, TypeError, "two numbers"),
            ({"operation": "add", "args": [1, "2"]}, TypeError, "two numbers"),
            ({"operation": "add", "args": [True, 2]}, TypeError, "two numbers"),
            ({"operation": "divide", "args": [1, 0]}, ZeroDivisionError, "divide by zero"),
            ({"operation": "modulo", "args": [1, 0.0]}, ZeroDivisionError, "modulo by zero"),
        ],
    )
    def test_bad_input(self, data, exc, match):
        with pytest.raises(exc, match=match):
            CalculatorNode(name="calc").process(data)

    def test_division_by_zero_in_a_run_is_a_node_error(self):
        with pytest.raises(NodeError, match="divide by zero"):
            _run(UPSTREAM, [{"operation": "divide", "args": [1, 0]}])


# --------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_cli_trust_instances(tmp_path):
    k = 5
    p = Pipeline([RangeSource(3, name="src"), MapNode(lambda x: x * k, name="times")])
    path = tmp_path / "inst.json"
    path.write_text(p.to_json(include_instances=True))

    for cmd in ("start", "validate"):
        r = _cli(cmd, str(path))
        assert r.returncode == 2, r.stderr
        assert "--trust-instances" in r.stderr and "only for manifests you made yourself" in r.stderr
    r = _cli("validate", str(path), "--trust-instances")
    assert r.returncode == 0, r.stderr
    r = _cli("start", str(path), "--trust-instances")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["[times #0] 0", "[times #1] 5", "[times #2] 10"]  # the lambda's closure k=5
