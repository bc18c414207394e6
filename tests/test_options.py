"""The one options table (remotemedia.options) and everything derived from it: the
Supervisor's keywords, NodeOptions, the per-node checks, RUN_OPTIONS, the CLI's flags and the
README's table. Every test here is fast: no worker is started but in the last one."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from remotemedia import NodeOptions, Supervisor
from remotemedia.errors import NodeTypeError, OptionValueError, SupervisorError
from remotemedia.nodes import PassThroughNode
from remotemedia.options import (
    DEFAULTS,
    NODE_KEYS,
    OPTIONS,
    RUN_KEYS,
    SUPERVISOR_KEYS,
    check_supervisor,
    markdown_table,
    node_defaults,
    resolve_node,
)
from remotemedia.runtime import RUN_OPTIONS, supervisor_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: A value each option refuses.
BAD = {
    "name": "",
    "init_timeout": 0,
    "stop_timeout": -1.0,
    "kill_timeout": "5",
    "handover_timeout": -1,
    "queue_depth": 0,
    "queue_bytes": 1.5,
    "max_borrowed": 1,
    "max_node_size": -1,
    "on_error": "ignore",
    "restart_policy": "sometimes",
    "max_restarts": -1,
    "restart_window": float("nan"),
    "process_timeout": 0,
    "memory_limit": "1G",
    "poison_threshold": True,
    "snapshot_interval": -0.5,
    "backoff_base": 0,
    "backoff_max": "5s",
    "heartbeat_interval": 0,
    "heartbeat_timeout": -1,
    "dead_letter_dir": 42,
    "env": {"A": 1},
    "log_level": "LOUD",
    "log_format": "xml",
    "control": "yes",
    "metrics_port": 70000,
    "metrics_host": "",
    "spin_us": -1,
    "start_method": "fork",
    "trust_instances": 1,
    "backend": "rya",
    "ray_address": "",
    "host_timeout": 0,
    "host": "gpu box",
    "queue_policy": "fifo",
    "replicas": 0,
    "enable_metrics": "yes",
    "executor": "threads",
    "use_rust": 1,
}


# --------------------------------------------------------------------------- the table itself


def test_every_default_is_allowed_and_every_option_has_a_refused_value():
    assert set(BAD) == set(OPTIONS)
    for key, option in OPTIONS.items():
        assert option.allowed(option.default), key
        assert not option.allowed(BAD[key]), key
        assert option.help and not option.help[0].isupper() and not option.help.endswith("."), key
        assert option.supervisor or option.per_node or option.run, key
        assert not (option.run and (option.supervisor or option.per_node)), key


def test_defaults_namespace_is_the_table_and_read_only():
    assert DEFAULTS.queue_depth == OPTIONS["queue_depth"].default == 32
    with pytest.raises(AttributeError, match="no option 'queue_dept'"):
        DEFAULTS.queue_dept
    with pytest.raises(AttributeError, match="read-only"):
        DEFAULTS.queue_depth = 4


# --------------------------------------------------------------------------- the Supervisor


def test_supervisor_signature_is_the_table():
    params = [p for p in inspect.signature(Supervisor.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert [p.name for p in params] == list(SUPERVISOR_KEYS)
    for p in params:
        assert p.default == OPTIONS[p.name].default, p.name
    assert supervisor_options() == frozenset(SUPERVISOR_KEYS)


def test_supervisor_docstring_names_every_option():
    doc = Supervisor.__doc__ or ""
    missing = [k for k in SUPERVISOR_KEYS if not re.search(rf"\b{k}\b", doc)]
    assert missing == []


def test_node_options_default_to_the_supervisors_then_the_table():
    sup = Supervisor([PassThroughNode(name="a"), PassThroughNode(name="b", options={"queue_depth": 4, "on_error": None})], max_restarts=9, control=False)
    assert sup.node_options["a"] == {**{k: OPTIONS[k].default for k in NODE_KEYS}, "max_restarts": 9}
    assert sup.node_options["b"] == {**sup.node_options["a"], "queue_depth": 4}  # None: unset
    assert sup.defaults == node_defaults({"max_restarts": 9})


@pytest.mark.parametrize("key", NODE_KEYS)
def test_bad_per_node_value_names_node_key_value_and_range(key):
    with pytest.raises(OptionValueError) as ei:
        resolve_node("n1", node_defaults({}), {key: BAD[key]})
    e = ei.value
    assert isinstance(e, SupervisorError) and isinstance(e, ValueError)
    msg = str(e)
    assert msg.startswith(f"node 'n1': {key} must be {OPTIONS[key].allowed.text}, got "), msg
    assert e.key == key and e.allowed == OPTIONS[key].allowed.text and e.where == "node 'n1'"


def test_bad_per_node_value_in_a_supervisor_says_which_node():
    with pytest.raises(OptionValueError, match=r"node 'p': max_restarts must be an int >= 0, got -1"):
        Supervisor([PassThroughNode(name="p", options={"max_restarts": -1})], control=False)
    # the message the CLI test and test_flow rely on
    with pytest.raises(SupervisorError, match="queue_bytes must be a positive int"):
        Supervisor([PassThroughNode(name="p", options={"queue_bytes": 0})], control=False)


def test_a_bad_supervisor_wide_value_is_the_supervisors():
    with pytest.raises(OptionValueError, match=r"^Supervisor: restart_policy must be one of 'never', 'on-failure', 'always', got 'sometimes'$"):
        Supervisor([PassThroughNode(name="p")], restart_policy="sometimes")
    # resolve_node alone says where the value came from too
    with pytest.raises(OptionValueError, match=r"node 'p' \(the Supervisor's value\): poison_threshold"):
        resolve_node("p", {**node_defaults({}), "poison_threshold": 0}, {})


@pytest.mark.parametrize("key", [k for k in SUPERVISOR_KEYS if k not in NODE_KEYS])
def test_bad_supervisor_only_value(key):
    with pytest.raises(OptionValueError, match=rf"^Supervisor: {key} must be "):
        check_supervisor({key: BAD[key], "self": object(), "nodes_or_pipeline": []})


def test_unknown_per_node_key_is_named_with_the_valid_ones():
    with pytest.raises(NodeTypeError) as ei:
        NodeOptions("n", restart_policy="always", retries=3, queue_dept=4)
    msg = str(ei.value)
    assert "unknown runtime option(s) queue_dept, retries" in msg and "'n'" in msg
    assert "queue_dept -> queue_depth" in msg  # a near miss gets a hint
    assert f"valid options: {', '.join(NODE_KEYS)}" in msg
    # options set behind NodeOptions' back are checked too (they were silently ignored)
    node = PassThroughNode(name="p")
    node.options = {"stop_timeout": 3}  # a Supervisor-wide option only
    with pytest.raises(NodeTypeError, match=r"node 'p': unknown runtime option\(s\) stop_timeout"):
        Supervisor([node], control=False)


def test_nodeoptions_keys_are_the_tables_per_node_options():
    assert NodeOptions.KEYS == NODE_KEYS
    assert set(NODE_KEYS) == {k for k, o in OPTIONS.items() if o.per_node}
    assert "queue_policy" in NODE_KEYS and "queue_policy" not in SUPERVISOR_KEYS


def test_run_options_are_the_tables():
    assert RUN_OPTIONS == {k: OPTIONS[k].default for k in RUN_KEYS}
    assert set(RUN_KEYS) == {"enable_metrics", "executor", "use_rust"}


# --------------------------------------------------------------------------- the README


def test_readme_table_is_the_generated_one():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- options table:[^\n]*-->\n\n(.*?)\n<!-- end of options table -->", text, re.S)
    assert m, "the README lost its options table markers"
    assert m.group(1) == markdown_table(), "README's options table is stale: paste `python -m remotemedia.options --markdown`"
    for key, option in OPTIONS.items():
        assert (f"| `{key}` |" in m.group(1)) is (not option.run), key


def test_markdown_command_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "remotemedia.options", "--markdown"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == markdown_table()
    r = subprocess.run([sys.executable, "-m", "remotemedia.options"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "usage" in r.stderr


# --------------------------------------------------------------------------- the CLI


def _start_command():
    from supervisor.cli import main

    return main.commands["start"]


def test_cli_flags_are_the_tables():
    start = _start_command()
    params = {p.name: p for p in start.params}
    flagged = [o for o in OPTIONS.values() if o.flag is not None]
    own = {"pipeline_file", "input_file", "json_input", "quiet", "output_path", "progress", "inline"}
    assert set(params) == own | {o.key for o in flagged}
    for o in flagged:
        p = params[o.key]
        assert p.opts == [o.flag_name], o.key
        assert p.default == o.flag.from_option(o.key, o.default), o.key
        assert p.help.startswith(o.help_sentence), o.key
    # every option of the CLI has help now
    assert all(p.help for p in start.params if hasattr(p, "help") and p.name != "pipeline_file")


def test_cli_help_shows_the_tables_defaults():
    r = CliRunner().invoke(_start_command(), ["--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for o in OPTIONS.values():
        if o.flag is None:
            continue
        assert o.flag_name in text, o.key
        if o.flag.type is not bool:
            shown = o.flag.from_option(o.key, o.default)
            assert f"[default: {o.default_text if shown is None else shown}" in text.replace("`", "") or (
                f"[default: ({o.default_text.replace('`', '')})]" in text
            ), o.key


def test_cli_passes_every_flag_to_the_supervisor(tmp_path, monkeypatch):
    import supervisor.core
    import supervisor.cli
    from remotemedia.errors import RemoteMediaError

    got = {}

    class Captured(RemoteMediaError):
        pass

    def fake_supervisor(pipeline, **kwargs):
        got.update(kwargs)
        raise Captured("captured")

    monkeypatch.setattr(supervisor.core, "Supervisor", fake_supervisor)
    monkeypatch.setattr(supervisor.cli, "configure_cli_logging", lambda level, sink: got.setdefault("_cli_level", level))
    script = tmp_path / "p.py"
    script.write_text("from remotemedia.nodes import PassThroughNode\npipeline = [PassThroughNode(name='p')]\n")
    r = CliRunner().invoke(
        _start_command(),
        [str(script), "--queue-bytes", "0.5", "--memory-limit", "0", "--log-level", "info", "--on-error", "skip", "--spin-us", "0"],
    )
    assert r.exit_code == 2 and "captured" in r.output, r.output
    assert got.pop("_cli_level") == 20
    expected = {o.key: o.default for o in OPTIONS.values() if o.flag is not None}
    expected.update(queue_bytes=1 << 19, memory_limit=None, log_level=20, on_error="skip", spin_us=0)
    assert got == expected


def test_cli_inline_takes_on_error(tmp_path):
    script = tmp_path / "p.py"
    script.write_text("from remotemedia.nodes import MapNode\npipeline = [MapNode(lambda x: 10 // int(x), name='div')]\n")
    data = tmp_path / "in.txt"
    data.write_text("1\n0\n2\n")
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "start", "--inline", "--on-error", "skip", str(script), "--input", str(data)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert [l.split("] ")[1] for l in r.stdout.splitlines()] == ["10", "5"]
