"""Pipeline construction and validation (pure unit tests: nothing is run, no process starts)."""

from __future__ import annotations

import json

import pytest

from remotemedia import Node, Pipeline, Source
from remotemedia.errors import (
    ManifestError,
    NodeTypeError,
    PipelineValidationError,
    RemoteMediaError,
    UnknownNodeTypeError,
)
from remotemedia.nodes import (
    BatchNode,
    ChunkerNode,
    GainNode,
    MapNode,
    PassThroughNode,
    RangeSource,
    RMSNode,
    SineSource,
)
from remotemedia.pipeline import INPUT, OUTPUT


def _names(pipeline: Pipeline) -> list:
    return [n.name for n in pipeline.nodes]


def _diamond() -> Pipeline:
    return Pipeline(
        [PassThroughNode(name=n) for n in "abcd"],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )


# --------------------------------------------------------------------------- item checks


class TestItems:
    def test_empty_list_is_a_validation_error_and_a_value_error(self):
        with pytest.raises(PipelineValidationError, match="empty"):
            Pipeline([])
        with pytest.raises(ValueError, match="empty"):
            Pipeline([])
        with pytest.raises(RemoteMediaError):
            Pipeline([])

    def test_empty_tuple_is_rejected_too(self):
        with pytest.raises(PipelineValidationError, match="empty"):
            Pipeline(())

    def test_wrong_item_types_list_positions_and_type_names(self):
        with pytest.raises(NodeTypeError) as ei:
            Pipeline([PassThroughNode(), "str", 123])
        assert isinstance(ei.value, TypeError)
        msg = str(ei.value)
        assert "position 1: str" in msg
        assert "position 2: int" in msg
        assert "position 0" not in msg

    def test_wrong_item_types_are_catchable_as_type_error(self):
        with pytest.raises(TypeError):
            Pipeline([None])

    def test_a_class_instead_of_an_instance_is_rejected(self):
        with pytest.raises(NodeTypeError, match="position 0: type"):
            Pipeline([PassThroughNode])

    def test_not_a_sequence_is_rejected(self):
        with pytest.raises(NodeTypeError, match="int"):
            Pipeline(42)  # type: ignore[arg-type]

    @pytest.mark.parametrize("method", ["process", "initialize", "cleanup"])
    def test_method_replaced_by_non_callable_is_rejected_naming_it(self, method):
        node = PassThroughNode(name="broken")
        setattr(node, method, "not callable")
        with pytest.raises(NodeTypeError) as ei:
            Pipeline([PassThroughNode(name="ok"), node])
        msg = str(ei.value)
        assert f"{method}()" in msg
        assert "'broken'" in msg
        assert "item 1" in msg

    def test_source_without_callable_generate_is_rejected(self):
        src = RangeSource(3, name="src")
        src.generate = None  # type: ignore[assignment]
        with pytest.raises(NodeTypeError, match="generate"):
            Pipeline([src, PassThroughNode()])

    def test_pipeline_of_a_pipeline_reuses_its_nodes_and_connections(self):
        p = _diamond()
        q = Pipeline(p, name="copy")
        assert q.nodes == p.nodes
        assert all(a is b for a, b in zip(q.nodes, p.nodes))
        assert q.connections == p.connections
        assert q.name == "copy"
        assert len(q) == 4
        assert list(q) == q.nodes


# --------------------------------------------------------------------------- names


class TestNames:
    def test_duplicate_explicit_names_are_rejected(self):
        with pytest.raises(PipelineValidationError, match="duplicate node name 'x'") as ei:
            Pipeline([PassThroughNode(name="x"), PassThroughNode(name="y"), PassThroughNode(name="x")])
        assert "positions 0 and 2" in str(ei.value)

    def test_repeated_auto_names_get_suffixes(self):
        p = Pipeline([PassThroughNode(), PassThroughNode(), PassThroughNode(), GainNode()])
        assert _names(p) == ["PassThroughNode", "PassThroughNode_1", "PassThroughNode_2", "GainNode"]
        assert p.node("PassThroughNode_2") is p.nodes[2]

    def test_auto_names_avoid_explicit_names(self):
        p = Pipeline(
            [PassThroughNode(), PassThroughNode(name="PassThroughNode"), PassThroughNode(name="PassThroughNode_1"), PassThroughNode()]
        )
        names = _names(p)
        assert names[1:3] == ["PassThroughNode", "PassThroughNode_1"]
        assert len(set(names)) == 4
        assert names[0].startswith("PassThroughNode_") and names[3].startswith("PassThroughNode_")

    def test_same_instance_twice_is_rejected(self):
        node = PassThroughNode(name="solo")
        with pytest.raises(PipelineValidationError):
            Pipeline([node, node])

    def test_same_auto_named_instance_twice_is_rejected(self):
        node = PassThroughNode()
        with pytest.raises(PipelineValidationError, match="same Node instance"):
            Pipeline([node, PassThroughNode(), node])

    def test_default_pipeline_name(self):
        assert Pipeline([PassThroughNode()]).name == "pipeline"
        assert Pipeline([PassThroughNode()], name="mine").name == "mine"

    # regression: a node named '__input__' used to make its downstream node look like an input
    # node (input_nodes == [__input__, b]) and '__output__' made its upstream node look terminal
    @pytest.mark.parametrize("reserved", [INPUT, OUTPUT])
    def test_reserved_pseudo_node_names_are_rejected(self, reserved):
        with pytest.raises(PipelineValidationError, match="reserved"):
            Pipeline([PassThroughNode(name=reserved), PassThroughNode(name="b")])
        with pytest.raises(PipelineValidationError, match="reserved"):
            Pipeline([{"id": reserved, "node_type": "PassThroughNode"}])


# --------------------------------------------------------------------------- graph


class TestGraph:
    def test_linear_connections_when_omitted(self):
        p = Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b"), PassThroughNode(name="c")])
        assert p.connections == [("a", "b"), ("b", "c")]
        assert p.order == ["a", "b", "c"]
        assert [n.name for n in p.input_nodes] == ["a"]
        assert p.upstream("a") == [INPUT]
        assert p.downstream("c") == [OUTPUT]
        assert p.edges() == [(INPUT, "a"), ("a", "b"), ("b", "c"), ("c", OUTPUT)]

    def test_single_node(self):
        p = Pipeline([PassThroughNode(name="only")])
        assert p.connections == []
        assert p.edges() == [(INPUT, "only"), ("only", OUTPUT)]

    def test_fan_out_fan_in(self):
        p = _diamond()
        assert p.connections == [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
        assert p.upstream("a") == [INPUT]
        assert p.upstream("d") == ["b", "c"]
        assert p.upstream("b") == ["a"]
        assert p.downstream("a") == ["b", "c"]
        assert p.downstream("d") == [OUTPUT]
        assert [n.name for n in p.input_nodes] == ["a"]
        assert p.sources == []
        edges = p.edges()
        assert edges == [(INPUT, "a"), ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", OUTPUT)]

    def test_order_is_topological_even_when_list_order_is_not(self):
        nodes = [PassThroughNode(name=n) for n in ["d", "c", "b", "a"]]
        conns = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
        p = Pipeline(nodes, connections=conns)
        assert sorted(p.order) == ["a", "b", "c", "d"]
        pos = {n: i for i, n in enumerate(p.order)}
        for a, b in conns:
            assert pos[a] < pos[b], (a, b, p.order)

    def test_sources_and_input_nodes(self):
        src = RangeSource(5, name="src")
        p = Pipeline(
            [src, PassThroughNode(name="side"), PassThroughNode(name="join")],
            connections=[("src", "join"), ("side", "join")],
        )
        assert p.sources == [src]
        assert p.upstream("src") == []  # a source has no input, not even INPUT
        assert [n.name for n in p.input_nodes] == ["side"]
        edges = p.edges()
        assert (INPUT, "side") in edges
        assert (INPUT, "src") not in edges
        assert ("join", OUTPUT) in edges
        assert ("src", OUTPUT) not in edges

    def test_multiple_terminal_nodes_each_get_an_output_edge(self):
        p = Pipeline(
            [PassThroughNode(name="a"), PassThroughNode(name="b"), PassThroughNode(name="c")],
            connections=[("a", "b"), ("a", "c")],
        )
        assert set(p.edges()) == {(INPUT, "a"), ("a", "b"), ("a", "c"), ("b", OUTPUT), ("c", OUTPUT)}

    def test_explicit_empty_connections_make_every_node_input_and_output(self):
        p = Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b")], connections=[])
        assert p.connections == []
        assert [n.name for n in p.input_nodes] == ["a", "b"]
        assert p.downstream("a") == [OUTPUT]

    def test_unknown_node_in_connection_lists_known_names(self):
        with pytest.raises(PipelineValidationError) as ei:
            Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b")], connections=[("a", "zz")])
        msg = str(ei.value)
        assert "'zz'" in msg
        assert "nodes are: a, b" in msg

    def test_self_loop_is_rejected(self):
        with pytest.raises(PipelineValidationError, match="itself"):
            Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b")], connections=[("a", "a")])

    def test_duplicate_connection_is_rejected(self):
        with pytest.raises(PipelineValidationError, match="listed twice"):
            Pipeline(
                [PassThroughNode(name="a"), PassThroughNode(name="b")],
                connections=[("a", "b"), {"from": "a", "to": "b"}],
            )

    def test_cycle_is_reported_with_its_path(self):
        with pytest.raises(PipelineValidationError, match="cycle") as ei:
            Pipeline(
                [PassThroughNode(name=n) for n in "abc"],
                connections=[("a", "b"), ("b", "c"), ("c", "b")],
            )
        msg = str(ei.value)
        assert " -> " in msg
        assert "b -> c -> b" in msg

    def test_longer_cycle_path(self):
        with pytest.raises(PipelineValidationError) as ei:
            Pipeline(
                [PassThroughNode(name=n) for n in "abcd"],
                connections=[("a", "b"), ("b", "c"), ("c", "d"), ("d", "b")],
            )
        assert "b -> c -> d -> b" in str(ei.value)

    def test_connection_into_a_source_is_rejected(self):
        with pytest.raises(PipelineValidationError, match="source 'src'"):
            Pipeline([PassThroughNode(name="a"), RangeSource(3, name="src")], connections=[("a", "src")])

    def test_implicit_linear_connection_into_a_source_is_rejected(self):
        with pytest.raises(PipelineValidationError, match="Source"):
            Pipeline([PassThroughNode(name="a"), RangeSource(3, name="src")])

    def test_connections_as_dicts_and_tuples_and_lists(self):
        nodes = lambda: [PassThroughNode(name=n) for n in "abc"]  # noqa: E731
        as_dicts = Pipeline(nodes(), connections=[{"from": "a", "to": "b"}, {"from": "b", "to": "c"}])
        as_tuples = Pipeline(nodes(), connections=[("a", "b"), ("b", "c")])
        as_lists = Pipeline(nodes(), connections=[["a", "b"], ["b", "c"]])
        assert as_dicts.connections == as_tuples.connections == as_lists.connections == [("a", "b"), ("b", "c")]

    @pytest.mark.parametrize(
        "bad",
        [
            [("a",)],
            [("a", "b", "c")],
            [{"from": "a"}],
            [{"to": "b"}],
            [{"from": "a", "to": "b", "via": "x"}],
            [("a", 1)],
            [42],
            "ab",
        ],
    )
    def test_malformed_connection_is_a_manifest_error(self, bad):
        with pytest.raises(ManifestError) as ei:
            Pipeline([PassThroughNode(name="a"), PassThroughNode(name="b")], connections=bad)
        assert ei.value.where is not None and ei.value.where.startswith("connections")


# --------------------------------------------------------------------------- mixed items


class TestMixed:
    def test_instances_and_manifest_dicts(self):
        a = MapNode(lambda x: x + 1, name="a")
        c = PassThroughNode(name="c")
        p = Pipeline(
            [a, {"id": "b", "node_type": "GainNode", "params": {"gain_db": -6}}, c],
        )
        assert _names(p) == ["a", "b", "c"]
        assert p.nodes[0] is a
        assert p.nodes[2] is c
        assert p.node("a") is a
        assert isinstance(p.nodes[1], GainNode)
        assert p.nodes[1].config == {"gain_db": -6}
        assert p.connections == [("a", "b"), ("b", "c")]

    def test_mixed_with_fan_out_connections(self):
        a = PassThroughNode(name="a")
        p = Pipeline(
            [a, MapNode(lambda x: x + 1, name="b"), MapNode(lambda x: x * 10, name="c"),
             {"id": "d", "node_type": "PassThroughNode"}],
            connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        )
        assert p.nodes[0] is a
        assert p.upstream("d") == ["b", "c"]

    def test_bad_manifest_entry_in_a_list_reports_its_position(self):
        with pytest.raises(UnknownNodeTypeError) as ei:
            Pipeline([PassThroughNode(name="a"), {"id": "b", "node_type": "NoSuchNode"}])
        assert ei.value.where == "nodes[1].node_type"


# --------------------------------------------------------------------------- serialize


class TestSerialize:
    def _pipeline(self) -> Pipeline:
        return Pipeline(
            [
                SineSource(seconds=0.5, chunk=256, name="tone"),
                GainNode(gain_db=-6.0, name="gain", options={"restart_policy": "always", "max_restarts": 2}),
                ChunkerNode(128, name="chunk"),
                RMSNode(name="level"),
                BatchNode(4, name="batch"),
            ],
            connections=[("tone", "gain"), ("gain", "chunk"), ("chunk", "level"), ("level", "batch")],
            name="tone-level",
        )

    def test_serialize_shape(self):
        m = self._pipeline().serialize(description="demo")
        assert m["version"] == "v1"
        assert m["metadata"]["name"] == "tone-level"
        assert m["metadata"]["description"] == "demo"
        assert "created_at" in m["metadata"]
        assert [n["id"] for n in m["nodes"]] == ["tone", "gain", "chunk", "level", "batch"]
        assert [n["node_type"] for n in m["nodes"]] == ["SineSource", "GainNode", "ChunkerNode", "RMSNode", "BatchNode"]
        assert m["nodes"][1]["params"] == {"gain_db": -6.0}
        assert m["nodes"][1]["options"] == {"restart_policy": "always", "max_restarts": 2}
        assert "options" not in m["nodes"][0]
        assert m["nodes"][4]["params"] == {"size": 4}
        assert m["connections"] == [
            {"from": "tone", "to": "gain"},
            {"from": "gain", "to": "chunk"},
            {"from": "chunk", "to": "level"},
            {"from": "level", "to": "batch"},
        ]

    def test_to_json_parses(self):
        p = self._pipeline()
        data = json.loads(p.to_json())
        assert data["version"] == "v1"
        assert data["metadata"]["name"] == "tone-level"
        assert data["connections"] == [{"from": a, "to": b} for a, b in p.connections]
        assert [n["id"] for n in data["nodes"]] == _names(p)

    def test_to_json_of_a_lambda_node_still_parses(self):
        p = Pipeline([MapNode(lambda x: x, name="m")])
        data = json.loads(p.to_json())
        assert data["nodes"][0]["node_type"] == "MapNode"
        assert isinstance(data["nodes"][0]["params"]["fn"], str)

    @pytest.mark.parametrize("via_json", [False, True])
    def test_serialized_manifest_rebuilds_an_equivalent_pipeline(self, via_json):
        p = self._pipeline()
        manifest = p.to_json() if via_json else p.serialize()
        q = Pipeline(manifest)
        assert q.name == p.name
        assert _names(q) == _names(p)
        assert [type(n) for n in q.nodes] == [type(n) for n in p.nodes]
        assert [n.config for n in q.nodes] == [n.config for n in p.nodes]
        assert [dict(n.options) for n in q.nodes] == [dict(n.options) for n in p.nodes]
        assert q.connections == p.connections
        assert q.order == p.order
        assert q.edges() == p.edges()
        assert all(a is not b for a, b in zip(p.nodes, q.nodes))
        # the rebuilt nodes are configured like the originals
        assert q.node("gain").factor == pytest.approx(p.node("gain").factor)
        assert q.node("chunk").size == 128
        assert q.node("tone").chunk == 256
        # and serialize again to the same manifest (apart from the timestamp)
        m1, m2 = p.serialize(), q.serialize()
        m1["metadata"].pop("created_at"), m2["metadata"].pop("created_at")
        assert m1 == m2

    def test_auto_named_nodes_round_trip(self):
        p = Pipeline([PassThroughNode(), PassThroughNode(), RMSNode()])
        q = Pipeline(p.serialize())
        assert _names(q) == ["PassThroughNode", "PassThroughNode_1", "RMSNode"]
        assert q.connections == p.connections

    def test_repr_and_node_lookup(self):
        p = _diamond()
        assert "4 nodes" in repr(p) and "4 connections" in repr(p)
        with pytest.raises(KeyError):
            p.node("nope")


class _Custom(Source):
    def generate(self):
        yield 1


def test_subclass_of_source_is_a_source():
    p = Pipeline([_Custom(name="s"), PassThroughNode(name="p")])
    assert [n.name for n in p.sources] == ["s"]
    assert p.input_nodes == []
    assert isinstance(p.nodes[0], Node)
