"""Manifest v1 loading (remotemedia.manifest.load_manifest, Pipeline(manifest)) and the
node-type registry."""

from __future__ import annotations

import json

import pytest

from remotemedia import Node, NodeOptions, Pipeline, register_node, registered_types
from remotemedia.errors import (
    ManifestError,
    NodeTypeError,
    PipelineValidationError,
    RemoteMediaError,
    UnknownNodeTypeError,
)
from remotemedia.manifest import MANIFEST_VERSION, load_manifest, parse_connections
from remotemedia.nodes import GainNode, PassThroughNode, RMSNode, SineSource
from remotemedia.registry import get_node_class, type_name_of, unregister_node

MANIFEST = {
    "version": "v1",
    "metadata": {"name": "tone-level"},
    "nodes": [
        {"id": "tone", "node_type": "SineSource", "params": {"seconds": 2}},
        {"id": "gain", "node_type": "GainNode", "params": {"gain_db": -6}, "options": {"restart_policy": "always"}},
        {"id": "level", "node_type": "RMSNode"},
    ],
    "connections": [{"from": "tone", "to": "gain"}, {"from": "gain", "to": "level"}],
}


def _manifest(**overrides):
    m = json.loads(json.dumps(MANIFEST))
    m.update(overrides)
    return m


def _one(entry):
    return {"version": "v1", "nodes": [entry]}


@pytest.fixture
def registrations():
    """Names registered by a test; unregistered afterwards even if the test fails."""
    names: list = []
    yield names
    for name in names:
        unregister_node(name)


# --------------------------------------------------------------------------- valid forms


class TestLoad:
    def test_dict_form(self):
        nodes, connections, name = load_manifest(MANIFEST)
        assert [type(n) for n in nodes] == [SineSource, GainNode, RMSNode]
        assert [n.name for n in nodes] == ["tone", "gain", "level"]
        assert nodes[0].seconds == 2
        assert nodes[1].factor == pytest.approx(10 ** (-6 / 20))
        assert connections == [("tone", "gain"), ("gain", "level")]
        assert name == "tone-level"

    def test_json_string_and_bytes_forms(self):
        for form in (json.dumps(MANIFEST), json.dumps(MANIFEST).encode()):
            nodes, connections, name = load_manifest(form)
            assert [n.name for n in nodes] == ["tone", "gain", "level"]
            assert connections == [("tone", "gain"), ("gain", "level")]
            assert name == "tone-level"

    def test_optional_parts_default(self):
        nodes, connections, name = load_manifest({"version": "v1", "nodes": [{"id": "p", "node_type": "PassThroughNode"}]})
        assert connections is None
        assert name is None
        assert nodes[0].name == "p"
        assert nodes[0].config == {}
        assert nodes[0].options == {}

    def test_missing_id_defaults_to_node_type(self):
        nodes, _, _ = load_manifest(_one({"node_type": "PassThroughNode"}))
        assert nodes[0].name == "PassThroughNode"

    def test_null_params_mean_no_params(self):
        nodes, _, _ = load_manifest(_one({"id": "p", "node_type": "PassThroughNode", "params": None}))
        assert nodes[0].config == {}

    def test_non_string_metadata_name_is_ignored(self):
        _, _, name = load_manifest(_manifest(metadata={"name": 5}))
        assert name is None

    def test_pipeline_from_dict_and_json(self):
        for form in (MANIFEST, json.dumps(MANIFEST)):
            p = Pipeline(form)
            assert p.name == "tone-level"
            assert [n.name for n in p.nodes] == ["tone", "gain", "level"]
            assert p.connections == [("tone", "gain"), ("gain", "level")]
            assert [n.name for n in p.sources] == ["tone"]

    def test_pipeline_arguments_override_the_manifest(self):
        p = Pipeline(MANIFEST, connections=[("tone", "level"), ("gain", "level")], name="other")
        assert p.name == "other"
        assert p.connections == [("tone", "level"), ("gain", "level")]
        assert [n.name for n in p.input_nodes] == ["gain"]

    def test_linear_connections_when_manifest_omits_them(self):
        m = _manifest()
        del m["connections"]
        p = Pipeline(m)
        assert p.connections == [("tone", "gain"), ("gain", "level")]

    def test_options_are_applied(self):
        nodes, _, _ = load_manifest(
            _one({"id": "g", "node_type": "GainNode", "params": {"gain_db": 3},
                  "options": {"restart_policy": "on-failure", "max_restarts": 5, "queue_depth": 8}})
        )
        opts = nodes[0].options
        assert isinstance(opts, NodeOptions)
        assert dict(opts) == {"restart_policy": "on-failure", "max_restarts": 5, "queue_depth": 8}
        assert nodes[0].to_manifest()["options"] == dict(opts)

    def test_empty_manifest_nodes_is_an_empty_pipeline(self):
        assert load_manifest({"version": "v1", "nodes": []})[0] == []
        with pytest.raises(PipelineValidationError, match="empty"):
            Pipeline({"version": "v1", "nodes": []})

    def test_graph_errors_surface_when_the_pipeline_is_built(self):
        m = _manifest(connections=[{"from": "tone", "to": "nowhere"}])
        load_manifest(m)  # graph checks are the Pipeline's job
        with pytest.raises(PipelineValidationError, match="nowhere"):
            Pipeline(m)

    def test_version_constant(self):
        assert MANIFEST_VERSION == "v1"


# --------------------------------------------------------------------------- errors


class TestErrors:
    def test_invalid_json_reports_line_and_column(self):
        text = '{"version": "v1",\n  "nodes": [oops]}'
        with pytest.raises(ManifestError) as ei:
            load_manifest(text)
        msg = str(ei.value)
        assert "line 2" in msg
        assert "column 13" in msg
        assert ei.value.where == "manifest"
        assert isinstance(ei.value, ValueError)

    def test_invalid_json_through_pipeline(self):
        with pytest.raises(ManifestError, match="invalid JSON"):
            Pipeline("{not json")

    @pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ('"v1"', "str"), ("3", "int"), ("null", "NoneType")])
    def test_non_object_json(self, text, kind):
        with pytest.raises(ManifestError, match=f"JSON object, got {kind}"):
            load_manifest(text)

    def test_non_mapping_non_string_is_a_type_error(self):
        with pytest.raises(NodeTypeError):
            load_manifest(42)  # type: ignore[arg-type]

    @pytest.mark.parametrize("version", ["v2", "1", 1, None, ""])
    def test_wrong_version(self, version):
        with pytest.raises(ManifestError, match="unsupported manifest version") as ei:
            load_manifest(_manifest(version=version))
        assert ei.value.where == "version"

    def test_missing_version_means_v1(self):
        # upstream manifests may omit it (issue 11); tests/test_manifest_seed.py covers the rest
        m = _manifest()
        del m["version"]
        assert [n.name for n in load_manifest(m)[0]] == ["tone", "gain", "level"]

    def test_unknown_top_level_key(self):
        with pytest.raises(ManifestError, match="'pipeline'") as ei:
            load_manifest(_manifest(pipeline="x"))
        assert ei.value.where == "manifest"

    @pytest.mark.parametrize("nodes", [{"a": 1}, "PassThroughNode", None, 3])
    def test_nodes_not_a_list(self, nodes):
        with pytest.raises(ManifestError, match="'nodes' must be a list") as ei:
            load_manifest({"version": "v1", "nodes": nodes})
        assert ei.value.where == "nodes"

    def test_missing_nodes(self):
        with pytest.raises(ManifestError) as ei:
            load_manifest({"version": "v1"})
        assert ei.value.where == "nodes"

    @pytest.mark.parametrize("entry", [1, "PassThroughNode", ["PassThroughNode"], None])
    def test_node_entry_not_an_object(self, entry):
        with pytest.raises(ManifestError, match="must be an object") as ei:
            load_manifest({"version": "v1", "nodes": [{"id": "ok", "node_type": "PassThroughNode"}, entry]})
        assert ei.value.where == "nodes[1]"

    @pytest.mark.parametrize("entry", [{"id": "x"}, {"id": "x", "node_type": ""}, {"id": "x", "node_type": 5}])
    def test_missing_node_type(self, entry):
        with pytest.raises(ManifestError, match="node_type") as ei:
            load_manifest(_one(entry))
        assert ei.value.where == "nodes[0]"

    def test_unknown_key_in_node_entry(self):
        with pytest.raises(ManifestError, match="'type'") as ei:
            load_manifest(_one({"id": "x", "node_type": "PassThroughNode", "type": "y"}))
        assert ei.value.where == "nodes[0]"

    @pytest.mark.parametrize("node_id", ["", 5])
    def test_bad_id(self, node_id):
        with pytest.raises(ManifestError, match="'id'"):
            load_manifest(_one({"id": node_id, "node_type": "PassThroughNode"}))

    def test_unknown_node_type(self):
        m = {"version": "v1", "nodes": [{"id": "a", "node_type": "PassThroughNode"}, {"id": "b", "node_type": "NoSuchNode"}]}
        with pytest.raises(UnknownNodeTypeError) as ei:
            load_manifest(m)
        e = ei.value
        assert isinstance(e, KeyError)
        assert isinstance(e, ManifestError)
        assert isinstance(e, ValueError)
        assert isinstance(e, RemoteMediaError)
        assert e.where == "nodes[1].node_type"
        assert e.node_type == "NoSuchNode"
        assert "PassThroughNode" in e.registered
        assert e.registered == sorted(e.registered)
        msg = str(e)
        assert msg.startswith("nodes[1].node_type: ")  # not repr()'d like a plain KeyError
        assert "'NoSuchNode'" in msg
        assert "PassThroughNode" in msg and "SineSource" in msg
        assert "register_node" in msg

    def test_unknown_node_type_catchable_as_key_error(self):
        with pytest.raises(KeyError):
            Pipeline(_one({"id": "a", "node_type": "Nope"}))

    @pytest.mark.parametrize("params", [[1, 2], "gain_db=3", 5])
    def test_params_not_an_object(self, params):
        with pytest.raises(ManifestError, match="'params' must be an object") as ei:
            load_manifest(_one({"id": "g", "node_type": "GainNode", "params": params}))
        assert ei.value.where == "nodes[0].params"

    @pytest.mark.parametrize("key,value", [("params", []), ("params", ""), ("options", [])])
    def test_falsy_non_object_params_or_options_are_rejected(self, key, value):
        with pytest.raises(ManifestError, match=f"'{key}' must be an object"):
            load_manifest(_one({"id": "g", "node_type": "GainNode", key: value}))

    @pytest.mark.parametrize("meta", [[], ""])
    def test_falsy_non_object_metadata_is_rejected(self, meta):
        with pytest.raises(ManifestError) as ei:
            load_manifest(_manifest(metadata=meta))
        assert ei.value.where == "metadata"

    def test_options_not_an_object(self):
        with pytest.raises(ManifestError, match="'options' must be an object") as ei:
            load_manifest(_one({"id": "g", "node_type": "GainNode", "options": ["always"]}))
        assert ei.value.where == "nodes[0].options"

    @pytest.mark.parametrize("reserved", ["name", "options"])
    def test_reserved_params(self, reserved):
        with pytest.raises(ManifestError, match=f"'{reserved}' is reserved") as ei:
            load_manifest(_one({"id": "g", "node_type": "GainNode", "params": {reserved: "x"}}))
        assert ei.value.where == "nodes[0].params"

    def test_constructor_type_error_missing_param(self):
        with pytest.raises(ManifestError, match="cannot construct BatchNode") as ei:
            load_manifest(_one({"id": "b", "node_type": "BatchNode", "params": {}}))
        assert ei.value.where == "nodes[0].params"
        assert isinstance(ei.value.__cause__, TypeError)

    def test_constructor_node_type_error_bad_value(self):
        with pytest.raises(ManifestError, match="positive int") as ei:
            load_manifest(_one({"id": "b", "node_type": "BatchNode", "params": {"size": "x"}}))
        assert isinstance(ei.value.__cause__, NodeTypeError)

    def test_unknown_runtime_option_is_a_manifest_error(self):
        with pytest.raises(ManifestError, match="unknown runtime option") as ei:
            load_manifest(_one({"id": "b", "node_type": "PassThroughNode", "options": {"retries": 3}}))
        assert ei.value.where.startswith("nodes[0]")
        assert "retries" in str(ei.value)

    def test_bad_metadata(self):
        with pytest.raises(ManifestError) as ei:
            load_manifest(_manifest(metadata=["x"]))
        assert ei.value.where == "metadata"

    def test_bad_connections(self):
        with pytest.raises(ManifestError) as ei:
            load_manifest(_manifest(connections={"from": "tone", "to": "gain"}))
        assert ei.value.where == "connections"
        with pytest.raises(ManifestError) as ei:
            load_manifest(_manifest(connections=[{"from": "tone", "to": "gain"}, {"src": "gain"}]))
        assert ei.value.where == "connections[1]"

    def test_parse_connections_forms(self):
        assert parse_connections([("a", "b"), ["b", "c"], {"from": "c", "to": "d"}]) == [("a", "b"), ("b", "c"), ("c", "d")]
        with pytest.raises(ManifestError, match="node ids"):
            parse_connections([{"from": "a", "to": 2}])


# --------------------------------------------------------------------------- registry


class TestRegistry:
    def test_builtins_are_registered(self):
        types = registered_types()
        assert types == sorted(types)
        for name in ("PassThroughNode", "MapNode", "SineSource", "FrameDiffNode"):
            assert name in types
        assert get_node_class("GainNode") is GainNode

    def test_register_under_class_name(self, registrations):
        @register_node
        class ManifestTestUpper(Node):
            def process(self, data):
                return data.upper()

        registrations.append("ManifestTestUpper")
        assert "ManifestTestUpper" in registered_types()
        assert get_node_class("ManifestTestUpper") is ManifestTestUpper
        assert type_name_of(ManifestTestUpper) == "ManifestTestUpper"
        nodes, _, _ = load_manifest(_one({"id": "u", "node_type": "ManifestTestUpper", "params": {"k": 1}}))
        assert isinstance(nodes[0], ManifestTestUpper)
        assert nodes[0].config == {"k": 1}
        assert nodes[0].process("abc") == "ABC"

    def test_register_under_explicit_name(self, registrations):
        @register_node("custom.Name")
        class Lower(Node):
            def __init__(self, suffix: str = "", **kw):
                super().__init__(suffix=suffix, **kw)
                self.suffix = suffix

            def process(self, data):
                return data.lower() + self.suffix

        registrations.append("custom.Name")
        assert get_node_class("custom.Name") is Lower
        assert "Lower" not in registered_types()
        assert type_name_of(Lower) == "custom.Name"
        p = Pipeline(_one({"id": "low", "node_type": "custom.Name", "params": {"suffix": "!"}}))
        assert p.nodes[0].process("ABC") == "abc!"
        entry = p.nodes[0].to_manifest()
        assert entry == {"id": "low", "node_type": "custom.Name", "params": {"suffix": "!"}}
        # and a serialized pipeline of it loads back
        q = Pipeline(p.serialize())
        assert type(q.nodes[0]) is Lower and q.nodes[0].suffix == "!"

    def test_strict_constructor_type_error_becomes_manifest_error(self, registrations):
        @register_node("test.Strict")
        class Strict(Node):
            def __init__(self, k: int, name=None, options=None):
                super().__init__(name, options=options, k=k)

        registrations.append("test.Strict")
        with pytest.raises(ManifestError, match="cannot construct test.Strict") as ei:
            load_manifest(_one({"id": "s", "node_type": "test.Strict", "params": {"k": 1, "bogus": 2}}))
        assert "bogus" in str(ei.value)

    def test_registering_twice_is_idempotent(self, registrations):
        class Twice(Node):
            pass

        register_node("test.Twice")(Twice)
        registrations.append("test.Twice")
        assert register_node("test.Twice")(Twice) is Twice
        assert get_node_class("test.Twice") is Twice

    @pytest.mark.parametrize("obj", [int, object, type("NotANode", (), {})])
    def test_registering_a_non_node_class(self, obj):
        before = registered_types()
        with pytest.raises(NodeTypeError, match="Node subclass"):
            register_node(obj)
        with pytest.raises(NodeTypeError, match="Node subclass"):
            register_node("test.NotANode")(obj)
        assert registered_types() == before

    def test_registering_an_instance_is_rejected(self):
        with pytest.raises(NodeTypeError):
            register_node("test.Instance")(PassThroughNode())  # type: ignore[arg-type]
        assert "test.Instance" not in registered_types()

    @pytest.mark.parametrize("name", ["", 5])
    def test_bad_registration_name(self, name):
        with pytest.raises(NodeTypeError, match="non-empty string"):
            register_node(name)  # type: ignore[arg-type]

    def test_name_clash_between_two_classes(self, registrations):
        class First(Node):
            pass

        class Second(Node):
            pass

        register_node("test.Clash")(First)
        registrations.append("test.Clash")
        with pytest.raises(NodeTypeError, match="already registered") as ei:
            register_node("test.Clash")(Second)
        assert "First" in str(ei.value)
        assert isinstance(ei.value, TypeError)
        assert get_node_class("test.Clash") is First

    def test_name_clash_with_a_builtin(self):
        class PassThroughNode(Node):  # noqa: F811 - same class name, another class
            pass

        try:
            with pytest.raises(NodeTypeError, match="already registered"):
                register_node(PassThroughNode)
        finally:
            from remotemedia import nodes as builtin

            # whatever happened, the builtin must stay registered
            if get_node_class("PassThroughNode") is not builtin.PassThroughNode:
                register_node(builtin.PassThroughNode)  # pragma: no cover
        assert get_node_class("PassThroughNode") is not PassThroughNode

    def test_unregister(self):
        class Gone(Node):
            pass

        register_node("test.Gone")(Gone)
        try:
            assert "test.Gone" in registered_types()
        finally:
            unregister_node("test.Gone")
        assert "test.Gone" not in registered_types()
        with pytest.raises(UnknownNodeTypeError):
            get_node_class("test.Gone")
        unregister_node("test.Gone")  # unregistering twice is harmless

    def test_unregistered_subclass_type_name(self):
        class Sub(PassThroughNode):
            pass

        assert type_name_of(PassThroughNode) == "PassThroughNode"
        assert type_name_of(Sub) == "Sub"


def test_entries_without_id_get_unique_names():
    p = Pipeline({"version": "v1", "nodes": [{"node_type": "PassThroughNode"}, {"node_type": "PassThroughNode"}]})
    assert [n.name for n in p.nodes] == ["PassThroughNode", "PassThroughNode_1"]


def test_unknown_runtime_option_points_at_options():
    with pytest.raises(ManifestError, match="unknown runtime option") as ei:
        load_manifest({"version": "v1", "nodes": [{"id": "a", "node_type": "PassThroughNode", "options": {"restrat_policy": "always"}}]})
    assert ei.value.where == "nodes[0].options"
