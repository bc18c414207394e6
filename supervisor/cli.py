"""``remotemedia-supervisor``: run a pipeline file under the supervisor.

::

    remotemedia-supervisor start examples/audio_levels.py       # a Python pipeline file
    remotemedia-supervisor start pipeline.json                  # a manifest
    remotemedia-supervisor start p.py --input numbers.txt       # one input per line
    remotemedia-supervisor start --inline p.py                  # in this process (pdb works)
    remotemedia-supervisor validate p.py                        # check it without running

A Python pipeline file defines ``pipeline`` (a Pipeline or a list of nodes/manifest dicts) or
``build()`` returning one. Classes defined in the file travel to the workers by value.

Exit codes: 0 the run completed (also after a graceful stop: SIGINT, SIGTERM, SIGHUP, SIGQUIT,
or stdout closed by its reader, as with ``| head``); 1 the pipeline failed (a node raised, a
worker could not start, a node went FATAL) or a stop did not drain (frames were lost); 2 the
command line or the pipeline file is invalid (missing file, syntax error, no pipeline object,
invalid pipeline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Optional, Tuple

import click
import cloudpickle

from remotemedia.errors import RemoteMediaError, SerializationError
from remotemedia.frames import FrameInfo
from remotemedia.options import OPTIONS, Option, flag_values
from remotemedia.pipeline import Pipeline

from .logs import LogSink, configure_cli_logging
from .private import create_private_file
from .resources import pid_alive

__all__ = ["main", "load_pipeline", "PipelineFileError"]

EXIT_FAILED = 1
EXIT_USAGE = 2


class PipelineFileError(click.ClickException):
    """The pipeline file cannot be used; exit code 2."""

    exit_code = EXIT_USAGE


_MODULE_NAME = "__remotemedia_pipeline__"


def load_pipeline(path: str, name: Optional[str] = None, trust_instances: bool = False) -> Pipeline:
    """Load a Pipeline from a ``.py`` file (``pipeline`` or ``build()``) or a ``.json``
    manifest (``trust_instances``: accept pickled instances in it, see ``--trust-instances``).
    Raises :class:`PipelineFileError` with a message saying what to fix."""
    if not os.path.exists(path):
        raise PipelineFileError(f"pipeline file not found: {path}")
    if os.path.isdir(path):
        raise PipelineFileError(f"{path} is a directory; give a .py pipeline file or a .json manifest")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            return Pipeline(text, name=name, trust_instances=trust_instances)
        except RemoteMediaError as e:
            raise PipelineFileError(f"invalid manifest {path}: {e}") from e
        except TypeError as e:
            raise PipelineFileError(f"invalid manifest {path}: {e}") from e
    abspath = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, abspath)
    if spec is None or spec.loader is None:
        raise PipelineFileError(f"cannot load {path}: not a Python file (expected .py or .json)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module
    # The file is not importable by the workers: its classes and functions go by value.
    cloudpickle.register_pickle_by_value(module)
    script_dir = os.path.dirname(abspath)
    if script_dir not in sys.path:
        sys.path.insert(0, script_dir)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise PipelineFileError(f"syntax error in {path}, line {e.lineno}: {e.msg}\n    {(e.text or '').rstrip()}") from e
    except Exception as e:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])
        raise PipelineFileError(f"error while executing {path}: {type(e).__name__}: {e}\n{tb}") from e
    obj: Any = getattr(module, "pipeline", None)
    if obj is None:
        build = getattr(module, "build", None)
        if build is None:
            raise PipelineFileError(
                f"{path} defines neither `pipeline` nor `build()`; add e.g.\n"
                "    pipeline = Pipeline([...])\nor\n    def build(): return Pipeline([...])"
            )
        if not callable(build):
            raise PipelineFileError(f"`build` in {path} is not callable")
        try:
            obj = build()
        except Exception as e:
            raise PipelineFileError(f"build() in {path} raised {type(e).__name__}: {e}") from e
    try:
        if isinstance(obj, Pipeline):
            return Pipeline(obj, name=name) if name else obj
        if isinstance(obj, (list, tuple, dict, str)):
            return Pipeline(
                list(obj) if isinstance(obj, tuple) else obj,
                name=name or os.path.splitext(os.path.basename(path))[0],
                trust_instances=trust_instances,
            )
    except (RemoteMediaError, TypeError, ValueError) as e:
        raise PipelineFileError(f"invalid pipeline in {path}: {e}") from e
    raise PipelineFileError(
        f"`pipeline` in {path} is a {type(obj).__name__}; expected a Pipeline, a list of nodes or a manifest"
    )


def _summarize(value: Any, limit: int = 160) -> str:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]

    def short(v: Any) -> Any:
        if np is not None and isinstance(v, np.ndarray):
            return f"<ndarray {v.dtype} {tuple(v.shape)}>"
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)) and len(v) > 8:
            return f"<{type(v).__name__} of {len(v)}>"
        if isinstance(v, (bytes, bytearray)) and len(v) > 32:
            return f"<{type(v).__name__} of {len(v)} bytes>"
        return v

    text = repr(short(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_report(report: Any, sink: Optional[LogSink] = None) -> None:
    if sink is not None and sink.fmt == "json":
        sink.write(
            {
                "level": "INFO",
                "logger": "remotemedia.report",
                "msg": f"pipeline {report.pipeline!r}: {report.output_count} outputs in {report.duration:.2f} s",
                "report": {
                    "outputs": report.output_count,
                    "duration_s": report.duration,
                    "stopped": report.stopped,
                    "aborted": report.aborted,
                    "killed_nodes": report.killed_nodes,
                    "unprocessed_inputs": report.unprocessed_inputs,
                    "unprocessed_source_frames": report.unprocessed_source_frames,
                    "nodes": report.nodes,
                },
            }
        )
        return
    click.echo(f"pipeline {report.pipeline!r}: {report.output_count} outputs in {report.duration:.2f} s", err=True)
    width = max([4] + [len(n) for n in report.nodes])
    click.echo(f"  {'node':<{width}}  {'state':<8} {'in':>8} {'out':>8} {'restarts':>8}  p50 ms", err=True)
    for name, s in report.nodes.items():
        lat = (s.get("latency") or {}).get("p50_ms")
        click.echo(
            f"  {name:<{width}}  {s.get('state', '?'):<8} {s.get('frames_in', 0):>8} {s.get('frames_out', 0):>8} "
            f"{s.get('restarts', 0):>8}  {'-' if lat is None else f'{lat:.3f}'}",
            err=True,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="remotemedia")
def main() -> None:
    """Run remotemedia pipelines as supervised worker processes."""


def _flag(option: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of an options-table row: its flag, default and help from the table."""
    flag = option.flag
    assert flag is not None and option.flag_name is not None
    text = option.help_sentence
    if flag.unit:
        text += f" In {flag.unit} here" + (" (0: no limit)." if flag.zero_is_none else ".")
    if flag.type is bool:
        return click.option(option.flag_name, option.key, is_flag=True, default=option.default, help=text)
    if flag.choices:
        kind: Any = click.Choice(flag.choices, case_sensitive=option.key != "log_level")
    elif flag.type == "dir":
        kind = click.Path(file_okay=False)
    else:
        kind = flag.type
    default = flag.from_option(option.key, option.default)
    return click.option(
        option.flag_name,
        option.key,
        type=kind,
        default=default,
        # a default of None means something the table says ("none", "the pipeline's")
        show_default=True if default is not None else option.default_text,
        help=text,
    )


def _table_flags(f: Callable[..., Any]) -> Callable[..., Any]:
    """Every option of remotemedia.options that has a flag, in the table's order."""
    for option in reversed([o for o in OPTIONS.values() if o.flag is not None]):
        f = _flag(option)(f)
    return f


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=True))
@click.option("--input", "input_file", type=click.File("r"), help="Feed each line of this file ('-' for stdin) as one input.")
@click.option("--json-input", is_flag=True, help="Parse each input line as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="Do not print the outputs.")
@_table_flags
@click.option("--progress/--no-progress", default=None, help="A live progress line on stderr: frames in and out, frames/s, restarts; a bar and an ETA for sources of known length (default: when stderr is a terminal).")
@click.option("--inline", is_flag=True, help="Run in this process on the file's own node objects (no workers; for pdb and quick checks).")
def start(
    pipeline_file: str,
    input_file: Any,
    json_input: bool,
    quiet: bool,
    progress: Optional[bool],
    inline: bool,
    **flags: Any,
) -> None:
    """Run PIPELINE_FILE (.py defining `pipeline` or `build()`, or a .json manifest) until its
    sources are exhausted, or until SIGINT/SIGTERM/SIGHUP/SIGQUIT (drain, then exit 0; exit 1
    when the drain timed out and frames were lost). With --inline the pipeline runs in this
    process (see supervisor.inline); the supervision options do not apply then.

    The options are remotemedia.options' table (the README's), in the command line's units."""
    from supervisor.core import Supervisor

    options = flag_values(flags)

    if inline:
        ctx = click.get_current_context()
        given = [
            f"--{p.replace('_', '-')}"
            for p in ctx.params
            if p not in _INLINE_CLI_OPTIONS and ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"not with --inline: {', '.join(given)} (the pipeline runs in this process: there are no workers "
                "to supervise, restart, time out, limit or monitor); with --inline only --name, --input, "
                "--json-input, --quiet, --log-level, --log-format, --on-error and --trust-instances apply"
            )
    sink = LogSink(options["log_format"])
    configure_cli_logging(options["log_level"], sink)
    pipeline = load_pipeline(pipeline_file, options["name"], options["trust_instances"])
    if inline:
        _start_inline(pipeline, pipeline_file, input_file, json_input, quiet, sink, options["on_error"])
        return
    try:
        sup = Supervisor(pipeline, **options)
    except RemoteMediaError as e:
        raise PipelineFileError(f"invalid options for {pipeline_file}: {e}") from e

    inputs = _cli_inputs(pipeline, pipeline_file, input_file, json_input)

    show_progress = sys.stderr.isatty() if progress is None else progress
    bar = _Progress.of(sup, sys.stderr) if show_progress else None
    if bar is not None:
        sink.stream = bar.above(sys.stderr)  # worker and supervisor log lines go above it
    show = _printer(quiet, lambda: sup.stop(), bar)
    outcome = "failed"
    try:
        if bar is not None:
            bar.start()
        report = sup.run(inputs, on_output=show)
        outcome = "stopped" if report.stopped else "done"
    except SerializationError as e:
        _end_progress(bar, sink, outcome)
        _error(sink, str(e))
        sys.exit(EXIT_USAGE)
    except RemoteMediaError as e:
        _end_progress(bar, sink, outcome)
        cause = e.__cause__
        _error(sink, str(e), str(cause) if cause is not None else None)
        sys.exit(EXIT_FAILED)
    finally:
        _end_progress(bar, sink, outcome)
    try:
        _print_report(report, sink)
    except OSError:  # stderr is gone (the terminal hung up): the exit code still tells
        pass
    lost = report.loss_summary()
    if lost is not None:
        _error(sink, lost)
        sys.exit(EXIT_FAILED)


#: ``start`` parameters that keep their meaning with --inline (``input_file`` is ``--input``).
_INLINE_CLI_OPTIONS = ("pipeline_file", "name", "input_file", "json_input", "quiet", "log_level", "log_format", "inline", "trust_instances", "on_error")


def _start_inline(pipeline: Pipeline, pipeline_file: str, input_file: Any, json_input: bool, quiet: bool, sink: LogSink, on_error: str) -> None:
    """``start --inline``: the pipeline in this process (supervisor.inline), the outputs and
    the report printed like a supervised run's, the same exit codes."""
    import signal
    import threading

    from .core import _STOP_SIGNALS
    from .inline import run_inline

    inputs = _cli_inputs(pipeline, pipeline_file, input_file, json_input)
    stop = threading.Event()
    show = _printer(quiet, stop.set)

    # A signal ends the stream after the frame in hand (flush(), cleanup()), like a drain.
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _STOP_SIGNALS}
    try:
        report = run_inline(pipeline, inputs, on_output=show, stop=stop, on_error=on_error)
    except SerializationError as e:
        _error(sink, str(e))
        sys.exit(EXIT_USAGE)
    except RemoteMediaError as e:
        cause = e.__cause__
        detail = None
        if cause is not None:
            detail = "".join(traceback.format_exception(type(cause), cause, cause.__traceback__)).rstrip()
        _error(sink, str(e), detail)
        sys.exit(EXIT_FAILED)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    try:
        _print_report(report, sink)
    except OSError:
        pass


def _end_progress(bar: Optional["_Progress"], sink: LogSink, outcome: str) -> None:
    """The progress line's final state (once), then log lines go straight to stderr again."""
    if bar is not None and not bar.closed:
        bar.close(outcome)
        sink.stream = None


def _error(sink: LogSink, message: str, detail: Optional[str] = None) -> None:
    if sink.fmt == "json":
        sink.write({"level": "ERROR", "logger": "remotemedia.cli", "msg": f"error: {message}", "detail": detail})
        return
    click.echo(f"error: {message}", err=True)
    if detail:
        click.echo(detail, err=True)


def _duration(seconds: float) -> str:
    """``42s``, ``3:07`` (minutes), ``1:02:03`` (hours): an ETA or an elapsed time."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Rate:
    """A count's rate per second, smoothed exponentially over ``tau`` seconds. Until ``tau``
    seconds have passed since the count first moved, it is the plain average since then: the
    first figures are neither 0 nor the burst of the first frames.

    >>> r = _Rate(tau=2.0)
    >>> r.update(1, 10.0)  # the first frame starts the clock
    >>> r.update(11, 11.0)  # the average since then
    10.0
    """

    def __init__(self, tau: float = 2.0) -> None:
        self.tau = tau
        self.start: Optional[Tuple[int, float]] = None  # (count, time) when it first moved
        self.last: Tuple[int, float] = (0, 0.0)
        self.rate: Optional[float] = None

    def update(self, count: int, now: float) -> Optional[float]:
        if self.start is None:
            if count == 0:
                return None
            # The first frame's arrival starts the clock (not the boot: models take a while to
            # load), so it counts for nothing itself.
            self.start = self.last = (count, now)
            return None
        c0, t0 = self.start
        c1, t1 = self.last
        if now <= t1:
            return self.rate
        if now - t0 <= self.tau or self.rate is None:
            self.rate = (count - c0) / (now - t0)
        else:
            alpha = 1.0 - math.exp(-(now - t1) / self.tau)
            self.rate += alpha * ((count - c1) / (now - t1) - self.rate)
        self.last = (count, now)
        return self.rate

    def average(self, count: int, now: float) -> Optional[float]:
        """The plain average since the count first moved (the figure of a finished run)."""
        if self.start is None or now <= self.start[1]:
            return None
        return (count - self.start[0]) / (now - self.start[1])


class _Progress:
    """``start``'s live progress line on stderr: frames into the pipeline and out at the sink,
    outputs per second (smoothed), restarts so far, and for sources of known length a bar,
    the percentage and an ETA::

        [########............] 40% 120/300  in 152  out 120  39.8 frames/s  restarts 0  ETA 5s

    Outputs and log lines are printed above it, never on it (:meth:`printing`, :meth:`above`:
    clear the line, print, redraw). It is redrawn at most once per ``interval`` seconds, and
    printed a last time, with a newline, by :meth:`close`.

    ``in`` (source items produced, inputs sent) comes live from the workers' status blocks
    (Supervisor.progress()); ``out`` counts the outputs as they are handed over
    (:meth:`output`). With one source and no inputs, the bar counts the source's items whose
    outputs have reached the sink (an output's origin is its source position): it reaches
    100% when the last one arrives, not when the source has produced everything and the rest
    is still in flight. Otherwise it counts the items the sources have produced.
    """

    BAR = 20
    CLEAR = "\r\x1b[K"

    def __init__(
        self,
        figures: Callable[[], Any],
        stream: Any,
        *,
        single_source: bool = False,
        clear_for_outputs: bool = True,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.figures = figures  # () -> supervisor.core.Progress
        self.stream = stream
        self.single_source = single_source
        self.clear_for_outputs = clear_for_outputs  # stdout is the same terminal
        self.interval = interval
        self.clock = clock
        self.started_at = clock()
        self.out = 0  # outputs handed over
        self.sink_position = 0  # 1 + the highest source position seen at the sink
        self.done = 0  # the bar's count, never going back
        self.out_rate = _Rate()
        self.done_rate = _Rate()
        self.last_draw = -math.inf
        self.shown = False  # the line is on the terminal now (clear it before printing)
        self.closed = False
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remotemedia-progress", daemon=True)

    @classmethod
    def of(cls, sup: Any, stream: Any) -> "_Progress":
        """The line of a Supervisor's run, drawn on ``stream``."""
        p = sup.pipeline
        return cls(
            sup.progress,
            stream,
            single_source=sup.totals is not None and len(p.sources) == 1 and not p.input_nodes,
            clear_for_outputs=sys.stdout.isatty(),
        )

    # ------------------------------------------------------------------ the figures

    def output(self, info: FrameInfo) -> None:
        """Count one output (from the caller's on_output, before it is printed)."""
        self.out += 1
        if info.origin >= self.sink_position:
            self.sink_position = info.origin + 1

    def text(self, final: Optional[str] = None, columns: int = 80) -> str:
        """The line as of now; ``final``: how the run ended (``done``, ``stopped``, ``failed``)."""
        p = self.figures()
        now = self.clock()
        rate = self.out_rate.update(self.out, now)
        if final is not None:
            rate = self.out_rate.average(self.out, now)
            if rate is None and self.out and now > self.started_at:  # all between two draws
                rate = self.out / (now - self.started_at)
        bar = ""
        parts = []
        eta = None
        if p.total is not None:
            done = self.sink_position if self.single_source and self.out else p.generated
            if final == "done":
                done = max(done, p.generated)  # the rest was dropped on the way, not lost
            self.done = max(self.done, min(done, p.total))
            done_rate = self.done_rate.update(self.done, now)
            frac = self.done / p.total if p.total else 1.0
            filled = int(frac * self.BAR)
            bar = f"[{'#' * filled}{'.' * (self.BAR - filled)}] "
            parts.append(f"{int(frac * 100)}% {self.done}/{p.total}")  # (99% until it is all done)
            if done_rate:
                eta = (p.total - self.done) / done_rate
        parts += [
            f"in {p.generated + p.inputs}",
            f"out {self.out}",
            f"{'-' if rate is None else f'{rate:.1f}'} frames/s",
            f"restarts {p.restarts}",
        ]
        elapsed = _duration(now - self.started_at)
        if final is not None:
            parts.append(f"{final} in {elapsed}" if final == "done" else f"{final} after {elapsed}")
        elif p.phase in ("new", "booting"):
            parts.append(f"starting {elapsed}")
        elif p.phase in ("draining", "aborting", "finished"):
            parts.append(f"{'draining' if p.phase != 'aborting' else 'aborting'} {elapsed}")
        elif p.total is not None:
            parts.append(f"ETA {'?' if eta is None else _duration(eta)}")
        else:
            parts.append(elapsed)
        line = "  ".join(parts)
        # A narrow terminal loses the bar before the figures.
        return bar + line if len(bar) + len(line) < columns else line

    # ------------------------------------------------------------------ the terminal

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return 80

    def _draw(self, final: Optional[str] = None) -> None:
        # (lock held) Cut to the width: a line that wraps cannot be redrawn in place.
        columns = self._columns()
        line = self.text(final, columns)[: columns - 1]
        try:
            self.stream.write(self.CLEAR + line + ("\n" if final is not None else ""))
            self.stream.flush()
        except (OSError, ValueError):  # the terminal is gone: nothing more to draw on
            self.closed = True
        self.shown = final is None
        self.last_draw = self.clock()

    def _clear(self) -> None:
        if self.shown:
            try:
                self.stream.write(self.CLEAR)
                self.stream.flush()
            except (OSError, ValueError):
                self.closed = True
            self.shown = False

    def _printed(self) -> None:
        # Redraw now unless that would exceed the rate: then the next tick redraws.
        if not self.closed and self.clock() - self.last_draw >= self.interval:
            self._draw()

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        """Around printing an output on stdout: off the line, then the line back."""
        with self.lock:
            if self.clear_for_outputs:
                self._clear()
            try:
                yield
            finally:
                self._printed()

    def above(self, stream: Any) -> Any:
        """A stream (for the log sink) whose lines go above the progress line."""
        progress = self

        class _Above:
            def write(self, text: str) -> int:
                with progress.lock:
                    progress._clear()
                    n = stream.write(text)
                    stream.flush()
                    progress._printed()
                    return n

            def flush(self) -> None:
                stream.flush()

            def fileno(self) -> int:
                return stream.fileno()

            def isatty(self) -> bool:
                return stream.isatty()

        return _Above()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                if self.closed:
                    return
                if self.clock() - self.last_draw >= self.interval * 0.9:
                    self._draw()

    def start(self) -> None:
        with self.lock:
            self._draw()
        self._thread.start()

    def close(self, outcome: str) -> None:
        """The final state, once, with a newline; then the line is gone for good."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self.lock:
            if not self.closed:
                self._draw(final=outcome)
                self.closed = True


@main.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Every running pipeline.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(name: Optional[str], all_: bool, as_json: bool) -> None:
    """Show the nodes of running pipeline NAME (or of every one with --all)."""
    from .control import find_endpoints, request
    from .monitor import format_table

    if not name and not all_:
        eps = find_endpoints()
        if len(eps) != 1:
            names = ", ".join(sorted({n for n, _, _ in eps})) or "none"
            raise PipelineFileError(f"give a pipeline NAME or --all (running: {names})")
    else:
        eps = find_endpoints(None if all_ else name)
    if not eps:
        click.echo(f"no running pipeline{' named ' + repr(name) if name else ''} (looked in {_runtime_dir()})", err=True)
        sys.exit(EXIT_FAILED)
    results = []
    for sup_name, path, pid in eps:
        try:
            resp = request(path, {"cmd": "status"})
        except (OSError, RemoteMediaError, ValueError) as e:
            click.echo(f"{sup_name} (pid {pid}): no answer: {e}", err=True)
            continue
        if resp.get("ok"):
            results.append(resp["status"])
    if as_json:
        click.echo(json.dumps(results if all_ or len(results) != 1 else results[0], indent=2, default=repr))
    else:
        click.echo("\n\n".join(format_table(st) for st in results))
    if not results:
        sys.exit(EXIT_FAILED)


@main.command()
@click.argument("name")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the supervisor has exited.")
@click.option("--timeout", type=float, default=120.0, show_default=True)
def stop(name: str, wait: bool, timeout: float) -> None:
    """Drain and stop running pipeline NAME (like SIGTERM)."""
    import time

    from .control import find_endpoints, request

    eps = find_endpoints(name)
    if not eps:
        click.echo(f"no running pipeline named {name!r} (looked in {_runtime_dir()})", err=True)
        sys.exit(EXIT_FAILED)
    for sup_name, path, pid in eps:
        resp = request(path, {"cmd": "stop"})
        if not resp.get("ok"):
            click.echo(f"{sup_name} (pid {pid}): {resp.get('error')}", err=True)
            sys.exit(EXIT_FAILED)
        click.echo(f"stopping {sup_name} (pid {pid})")
    if wait:
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for _, _, pid in eps):
            if time.monotonic() > deadline:
                click.echo("timed out waiting for the supervisor to exit", err=True)
                sys.exit(EXIT_FAILED)
            time.sleep(0.1)


def _runtime_dir() -> str:
    from .control import runtime_dir

    return runtime_dir()


@main.command("systemd-unit")
@click.argument("pipeline_file", type=click.Path(dir_okay=True))
@click.option("--name", help="Pipeline / unit name (default: the pipeline's).")
@click.option("--user", help="Run the service as this user (User=).")
@click.option("--stop-timeout", type=float, default=30.0, show_default=True)
@click.option("--watchdog-sec", type=float, default=30.0, show_default=True)
@click.option("--install", is_flag=True, help="Write the unit to --unit-dir and reload systemd.")
@click.option("--unit-dir", default="/etc/systemd/system", show_default=True, type=click.Path(file_okay=False))
def systemd_unit(
    pipeline_file: str,
    name: Optional[str],
    user: Optional[str],
    stop_timeout: float,
    watchdog_sec: float,
    install: bool,
    unit_dir: str,
) -> None:
    """Print (or install) a Type=notify systemd unit that runs PIPELINE_FILE."""
    import subprocess

    from .systemd import render_unit, unit_name

    pipeline = load_pipeline(pipeline_file, name)
    name = name or pipeline.name
    text = render_unit(pipeline_file, name, user=user, stop_timeout=stop_timeout, watchdog_sec=watchdog_sec)
    if not install:
        click.echo(text, nl=False)
        return
    path = os.path.join(unit_dir, unit_name(name))
    try:
        os.makedirs(unit_dir, exist_ok=True)
        # A new file of our own, then renamed over the unit: never written through a symlink
        # or into a file someone else prepared at that name.
        fd, tmp = create_private_file(unit_dir, f".{unit_name(name)}", ".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                os.fchmod(f.fileno(), 0o644)  # systemd units are world-readable
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise click.ClickException(f"cannot write {path}: {e} (run as root, or choose --unit-dir)") from e
    click.echo(f"wrote {path}")
    if unit_dir == "/etc/systemd/system":
        r = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if r.returncode != 0:
            click.echo(f"warning: systemctl daemon-reload failed: {r.stderr.strip()}", err=True)
        click.echo(f"start it with: systemctl enable --now {unit_name(name)}")


@main.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=True))
@_flag(OPTIONS["trust_instances"])
def validate(pipeline_file: str, trust_instances: bool) -> None:
    """Check PIPELINE_FILE without starting anything: load, validate, serialize each node."""
    from remotemedia.serialization import serialize_node

    pipeline = load_pipeline(pipeline_file, trust_instances=trust_instances)
    for node in pipeline.nodes:
        try:
            serialize_node(node)
        except SerializationError as e:
            raise PipelineFileError(str(e)) from e
    click.echo(f"{pipeline_file}: OK: {len(pipeline.nodes)} nodes, {len(pipeline.connections)} connections")


def _cli_inputs(pipeline: Any, pipeline_file: str, input_file: Any, json_input: bool) -> Optional[Iterator[Any]]:
    """The frames of ``--input`` (a line each, JSON-decoded with ``--json-input``), or None."""
    if input_file is None:
        return None
    if not pipeline.input_nodes:
        raise PipelineFileError(f"--input given but {pipeline_file} has no input nodes (every root is a Source)")
    lines = (line.rstrip("\n") for line in input_file)
    return (json.loads(line) for line in lines) if json_input else lines


def _printer(quiet: bool, on_closed: Callable[[], None], progress: Optional[_Progress] = None) -> Callable[[Any, FrameInfo], None]:
    """The on_output callback that prints each output (above the progress line, which counts
    it); when stdout goes away it silences stdout and calls ``on_closed`` (stop the pipeline)."""
    stdout_open = [True]
    printing = progress.printing if progress is not None else contextlib.nullcontext

    def show(value: Any, info: FrameInfo) -> None:
        if progress is not None:
            progress.output(info)
        if quiet or not stdout_open[0]:
            return
        try:
            with printing():
                click.echo(f"[{info.source} #{info.origin}] {_summarize(value)}")
        except OSError as e:
            # The reader went away (`| head`: EPIPE, Python ignores SIGPIPE) or the terminal
            # hung up (EIO): stop like on SIGTERM instead of dying with the workers running.
            stdout_open[0] = False
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere
            os.close(devnull)
            logging.getLogger("remotemedia.cli").warning("stdout closed (%s): stopping the pipeline", e.strerror or e)
            on_closed()

    return show


if __name__ == "__main__":  # pragma: no cover
    main()
