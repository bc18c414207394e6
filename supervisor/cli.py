"""``remotemedia-supervisor``: run a pipeline file under the supervisor.

::

    remotemedia-supervisor start examples/audio_levels.py       # a Python pipeline file
    remotemedia-supervisor start pipeline.json                  # a manifest
    remotemedia-supervisor start p.py --input numbers.txt       # one input per line
    remotemedia-supervisor start --inline p.py                  # in this process (pdb works)
    remotemedia-supervisor validate p.py                        # check it without running

A Python pipeline file defines ``pipeline`` (a Pipeline or a list of nodes/manifest dicts) or
``build()`` returning one. Classes defined in the file travel to the workers by value.

Running pipelines: ``status``, ``stop``, ``list``, ``restart NAME NODE``, ``reload NAME`` (also
SIGHUP), ``logs NAME`` (see :mod:`supervisor.cli_live`).

Exit codes: 0 the run completed (also after a graceful stop: SIGINT, SIGTERM, SIGQUIT,
or stdout closed by its reader, as with ``| head``); 1 the pipeline failed (a node raised, a
worker could not start, a node went FATAL) or a stop did not drain (frames were lost); 2 the
command line or the pipeline file is invalid (missing file, syntax error, no pipeline object,
invalid pipeline).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable, Iterator, Optional

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
@click.option("--progress/--no-progress", default=None, help="Progress bar for sources of known length (default: when stderr is a terminal).")
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
    sources are exhausted, or until SIGINT/SIGTERM/SIGQUIT (drain, then exit 0; exit 1 when
    the drain timed out and frames were lost). SIGHUP reloads the file (see `reload`). With --inline the pipeline runs in this
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
    # `reload`, SIGHUP and the unit's ExecReload= read the file again
    sup.reload_from(lambda: load_pipeline(pipeline_file, options["name"], options["trust_instances"]))

    inputs = _cli_inputs(pipeline, pipeline_file, input_file, json_input)

    show = _printer(quiet, lambda: sup.stop())

    show_progress = sys.stderr.isatty() if progress is None else progress
    bar = _ProgressBar(sup) if show_progress and sup.totals else None
    try:
        if bar is not None:
            bar.start()
        report = sup.run(inputs, on_output=show)
    except SerializationError as e:
        _error(sink, str(e))
        sys.exit(EXIT_USAGE)
    except RemoteMediaError as e:
        cause = e.__cause__
        _error(sink, str(e), str(cause) if cause is not None else None)
        sys.exit(EXIT_FAILED)
    finally:
        if bar is not None:
            bar.stop()
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


def _error(sink: LogSink, message: str, detail: Optional[str] = None) -> None:
    if sink.fmt == "json":
        sink.write({"level": "ERROR", "logger": "remotemedia.cli", "msg": f"error: {message}", "detail": detail})
        return
    click.echo(f"error: {message}", err=True)
    if detail:
        click.echo(detail, err=True)


class _ProgressBar:
    """A one-line progress bar on stderr for sources of known length (terminals only)."""

    def __init__(self, sup: Any, width: int = 30) -> None:
        import threading

        self.sup = sup
        self.width = width
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remotemedia-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _draw(self) -> None:
        p = self.sup.progress()
        if p is None:
            return
        done, total = p
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}% {done}/{total}")
        sys.stderr.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._draw()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


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


def _printer(quiet: bool, on_closed: Callable[[], None]) -> Callable[[Any, FrameInfo], None]:
    """The on_output callback that prints each output; when stdout goes away it silences
    stdout and calls ``on_closed`` (stop the pipeline)."""
    stdout_open = [True]

    def show(value: Any, info: FrameInfo) -> None:
        if quiet or not stdout_open[0]:
            return
        try:
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


from . import cli_live  # noqa: E402,F401  (registers restart, reload, logs, list on main)

if __name__ == "__main__":  # pragma: no cover
    # (`python -m supervisor.cli`: the commands of cli_live are registered on the group of the
    # module supervisor.cli, not on this __main__ copy of it)
    from supervisor.cli import main as _main

    _main()
