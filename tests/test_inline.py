"""The inline executor (issue 11, item 3): the pipeline runs in the caller's process on the
caller's own node objects, with the multiprocess runtime's semantics."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import traceback

import pytest

from remotemedia import Group, Node, Pipeline, Source, execute_pipeline, execute_pipeline_with_input
from remotemedia.errors import ExecutorOptionError, NodeError, NodeInitError, RemoteMediaError
from remotemedia.frames import Frame
from remotemedia.nodes import MapNode, PassThroughNode, RangeSource

from supervisor.inline import run_inline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingNode(Node):
    """Upstream's test node: counts its process() calls on the instance."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.execution_count = 0
        self.initialized = 0
        self.cleaned = 0

    def initialize(self):
        self.initialized += 1

    def process(self, data):
        self.execution_count += 1
        return data

    def cleanup(self):
        self.cleaned += 1


class Boom(Node):
    def process(self, data):
        if data == 3:
            raise ValueError(f"bad frame {data}")  # BOOM-LINE
        return data


class BadInit(Node):
    def initialize(self):
        raise RuntimeError("no model here")


class Tracker(Node):
    def __init__(self, log, **kw):
        super().__init__(**kw)
        self.log = log

    def initialize(self):
        self.log.append(("init", self.name))

    def process(self, data):
        return data

    def cleanup(self):
        self.log.append(("cleanup", self.name))


class Splitter(Node):
    def process(self, data):
        for i in range(data):
            yield i


class AsyncDouble(Node):
    async def process(self, data):
        await asyncio.sleep(0)
        return data * 2


class AsyncGen(Node):
    async def process(self, data):
        for i in range(2):
            await asyncio.sleep(0)
            yield (data, i)


class Batcher(Node):
    """Emits pairs; the last odd frame comes out of flush()."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.buf = []

    def process(self, data):
        self.buf.append(data)
        if len(self.buf) == 2:
            out, self.buf = tuple(self.buf), []
            return out

    def flush(self):
        if self.buf:
            return tuple(self.buf)


class Letters(Source):
    def generate(self):
        yield from "abc"


class Tagger(Node):
    """Records current_frame of what it processes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen = []

    def process(self, data):
        f = self.current_frame
        self.seen.append((f.seq, f.origin, f.stream_id, f.source))
        return data


def test_execution_count_on_callers_object():
    node = CountingNode(name="counter")
    out = Pipeline([node]).run([1, 2, 3, 4, 5], executor="inline")
    assert out == [1, 2, 3, 4, 5]
    assert node.execution_count == 5  # the caller's object ran, not a copy
    assert node.initialized == 1 and node.cleaned == 1


def test_chain_and_use_rust_false():
    out = Pipeline([MapNode(lambda x: x * 2), MapNode(lambda x: x + 1)]).run([1, 2, 3], use_rust=False)
    assert out == [3, 5, 7]


def test_dag_fan_out_fan_in_in_input_order():
    payload = {"k": [1]}
    seen = []

    class Id(Node):
        def process(self, data):
            seen.append(data)
            return data

    p = Pipeline(
        [PassThroughNode(name="a"), Id(name="b"), Id(name="c"), PassThroughNode(name="d")],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    out = p.run([payload, payload], executor="inline")
    assert len(out) == 4 and all(o is payload for o in out)  # fan-out hands the same object
    assert all(s is payload for s in seen)
    p2 = Pipeline(
        [PassThroughNode(name="a"), MapNode(lambda x: x + 1, name="b"), MapNode(lambda x: x * 10, name="c"),
         PassThroughNode(name="d")],
        connections=[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    assert p2.run([1, 2], executor="inline") == [2, 10, 3, 20]  # by input, then arrival


def test_source_pipeline_and_report():
    report = run_inline(Pipeline([RangeSource(5), MapNode(lambda x: x * x, name="sq")]))
    assert report.outputs == [0, 1, 4, 9, 16]
    s = report.nodes["sq"]
    assert (s["frames_in"], s["frames_out"], s["errors"], s["restarts"]) == (5, 5, 0, 0)
    assert s["state"] == "EXITED" and s["pid"] == os.getpid()
    assert s["latency"]["count"] == 5 and s["latency"]["p50_ms"] is not None and "p99_ms" in s["latency"]
    assert report.nodes["RangeSource"]["frames_out"] == 5


def test_generators_async_and_flush():
    assert Pipeline([Splitter()]).run([3, 0, 2], executor="inline") == [0, 1, 2, 0, 1]
    assert Pipeline([AsyncDouble()]).run([1, 2], executor="inline") == [2, 4]
    assert Pipeline([AsyncGen()]).run([7], executor="inline") == [(7, 0), (7, 1)]
    # flush() at end of stream, and its output goes through the nodes downstream
    out = Pipeline([Batcher(), MapNode(lambda t: sum(t))]).run([1, 2, 3, 4, 5], executor="inline")
    assert out == [3, 7, 5]


def test_current_frame_and_stream_ids():
    tag = Tagger()
    out = Pipeline([tag]).run([Frame("x", stream_id=4), "y"], executor="inline")
    assert out == ["x", "y"]
    assert tag.seen == [(0, 0, 4, "__input__"), (1, 1, 0, "__input__")]
    assert tag.current_frame is None


def test_group_runs_inline():
    members = [CountingNode(name="m1"), MapNode(lambda x: x + 1, name="m2")]
    report = run_inline(Pipeline([RangeSource(3), Group(members, name="g")]))
    assert report.outputs == [1, 2, 3]
    assert members[0].execution_count == 3
    assert report.nodes["g"]["members"]["m1"]["frames_in"] == 3


def test_on_error_skip():
    boom = Boom()
    report = run_inline(Pipeline([boom]), [1, 2, 3, 4], on_error="skip")
    assert report.outputs == [1, 2, 4]
    assert report.nodes["Boom"]["errors"] == 1
    # per node too
    assert Pipeline([Boom(options={"on_error": "skip"})]).run([3, 5], executor="inline") == [5]


def test_node_error_has_the_real_traceback():
    with pytest.raises(NodeError) as ei:
        Pipeline([PassThroughNode(), Boom(name="boom")]).run([1, 2, 3, 4], executor="inline")
    err = ei.value
    assert err.node == "boom" and err.pid == os.getpid() and err.seq == 2
    assert isinstance(err.original, ValueError) and err.__cause__ is err.original
    frames = traceback.extract_tb(err.__cause__.__traceback__)
    with open(__file__) as f:
        line = next(i for i, l in enumerate(f, 1) if "# BOOM-LINE" in l and "raise" in l)
    assert (frames[-1].filename, frames[-1].lineno) == (__file__, line)


def test_initialize_failure_and_cleanup_on_callers_objects():
    log = []
    first, last = Tracker(log, name="first"), Tracker(log, name="last")
    with pytest.raises(NodeInitError) as ei:
        Pipeline([first, BadInit(name="bad"), last]).run([1], executor="inline")
    assert ei.value.node == "bad" and isinstance(ei.value.__cause__, RuntimeError)
    assert log == [("init", "first"), ("cleanup", "first")]  # what was initialized is cleaned up

    log.clear()
    with pytest.raises(NodeError):
        Pipeline([Tracker(log, name="a"), Boom(), Tracker(log, name="z")]).run([3], executor="inline")
    assert ("cleanup", "a") in log and ("cleanup", "z") in log  # also after an error
    log.clear()
    Pipeline([Tracker(log, name="a"), Tracker(log, name="z")]).run([1], executor="inline")
    assert log == [("init", "a"), ("init", "z"), ("cleanup", "a"), ("cleanup", "z")]


def test_source_error_is_node_error():
    class Broken(Source):
        def generate(self):
            yield 1
            raise OSError("device gone")

    with pytest.raises(NodeError) as ei:
        Pipeline([Broken(name="cam"), PassThroughNode()]).run(executor="inline")
    assert ei.value.node == "cam" and isinstance(ei.value.__cause__, OSError)


def test_executor_keywords_are_checked():
    p = Pipeline([PassThroughNode()])
    with pytest.raises(ValueError, match="'multiprocess', 'inline'"):
        p.run([1], executor="threads")
    with pytest.raises(ExecutorOptionError, match="contradicts"):
        p.run([1], use_rust=True, executor="inline")
    with pytest.raises(ExecutorOptionError, match="restart_policy do not apply to the inline executor"):
        p.run([1], executor="inline", restart_policy="never")
    with pytest.raises(ExecutorOptionError, match="'multiprocess', 'inline'"):
        asyncio.run(execute_pipeline_with_input(p, [1], executor="thread"))
    assert p.run([1], executor="multiprocess", use_rust=True) == [1]
    with pytest.raises(RemoteMediaError, match="no input nodes"):
        Pipeline([RangeSource(2)]).run([1], executor="inline")


def test_async_entry_points_inline():
    node = CountingNode()

    async def main():
        a = await execute_pipeline_with_input([node, MapNode(lambda x: -x)], [1, 2], executor="inline")
        b = await execute_pipeline([RangeSource(3)], use_rust=False)
        return a, b

    assert asyncio.run(main()) == ([-1, -2], [0, 1, 2])
    assert node.execution_count == 2


def _parity_pipeline() -> Pipeline:
    return Pipeline(
        [RangeSource(6, name="src"), Splitter(name="split"), MapNode(lambda x: x * 10, name="ten"),
         MapNode(lambda x: x + 1, name="one"), Batcher(name="pairs")],
        connections=[("src", "split"), ("split", "ten"), ("split", "one"), ("ten", "pairs"), ("one", "pairs")],
    )


@pytest.mark.slow
def test_parity_with_multiprocess():
    inline = run_inline(_parity_pipeline())
    multi = _parity_pipeline().run()
    # fan-in order between the two branches is arrival order (the branches race in the
    # multiprocess runtime), so compare per origin as multisets of the values
    flat = lambda outs: sorted(v for t in outs for v in t)  # noqa: E731
    assert flat(inline.outputs) == flat(multi)
    assert inline.outputs[0] in [(0, 1), (1, 0)] and len(inline.outputs) == len(multi)
    chain = [Splitter(), AsyncDouble(), Batcher()]
    assert Pipeline(chain).run([2, 3, 1], executor="inline") == Pipeline([Splitter(), AsyncDouble(), Batcher()]).run([2, 3, 1])


@pytest.mark.slow
def test_cli_start_inline(tmp_path):
    script = tmp_path / "p.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from remotemedia import Node, Pipeline
            from remotemedia.nodes import RangeSource

            class Where(Node):
                def process(self, data):
                    return (data, os.getpid())

            pipeline = Pipeline([RangeSource(3), Where(name="where")])
            """
        )
    )

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "supervisor.cli", "start", *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)

    r = cli("--inline", str(script))
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("[where #")]
    assert len(lines) == 3
    pids = {l.rsplit(", ", 1)[1].rstrip(")") for l in lines}
    assert len(pids) == 1  # one process: the CLI's own
    assert "3 outputs" in r.stderr

    r = cli("--inline", "--restart-policy", "never", str(script))
    assert r.returncode == 2 and "--restart-policy" in r.stderr and "--inline" in r.stderr

    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent(
            """
            from remotemedia import Node, Pipeline
            from remotemedia.nodes import RangeSource

            class Boom(Node):
                def process(self, data):
                    raise KeyError(data)

            pipeline = Pipeline([RangeSource(3), Boom(name="boom")])
            """
        )
    )
    r = cli("--inline", str(bad))
    assert r.returncode == 1
    assert "node 'boom'" in r.stderr and f'File "{bad}", line 7, in process' in r.stderr


def test_on_output_errors_are_the_callers():
    got = []

    def on_output(value, info):
        got.append((value, info.origin, info.source))
        if value == 2:
            raise KeyError("caller's bug")

    node = CountingNode(name="n")
    with pytest.raises(KeyError):
        run_inline(Pipeline([node]), [1, 2, 3], on_output=on_output)
    assert got == [(1, 0, "n"), (2, 1, "n")] and node.cleaned == 1


def test_seed_keywords_work_inline():
    # enable_metrics, input_data and the one-shot form go with the inline executor too
    node = MapNode(lambda x: x * 2, name="double")
    out = Pipeline([node]).run(input_data=[1, 2, 3], executor="inline", enable_metrics=True)
    assert list(out) == [2, 4, 6]
    assert out.metrics["double"]["frames_in"] == 3 and out.metrics["double"]["restarts"] == 0
    assert Pipeline([MapNode(lambda x: "once" if x is None else x)]).run(use_rust=False) == ["once"]
    assert asyncio.run(execute_pipeline([MapNode(lambda x: [x])], executor="inline")) == [[None]]
