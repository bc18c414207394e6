"""``remotemedia-supervisor``: run a pipeline file under the supervisor.

::

    remotemedia-supervisor start examples/audio_levels.py       # a Python pipeline file
    remotemedia-supervisor start pipeline.json                  # a manifest
    remotemedia-supervisor start p.py --input numbers.txt       # one input per line
    remotemedia-supervisor start --inline p.py                  # in this process (pdb works)
    remotemedia-supervisor validate p.py                        # check it without running
    remotemedia-supervisor status cams --watch                  # a running pipeline's nodes
    remotemedia-supervisor stop cams                            # drain and stop it (--all: every one)
    remotemedia-supervisor systemd-unit p.py --user media       # a systemd unit that runs it

A Python pipeline file defines ``pipeline`` (a Pipeline or a list of nodes/manifest dicts) or
``build()`` returning one. Classes defined in the file travel to the workers by value.

Running pipelines: ``status``, ``stop``, ``list``, ``restart NAME NODE``, ``reload NAME`` (also
SIGHUP), ``logs NAME`` (see :mod:`supervisor.cli_live`).

Exit codes: 0 the run completed (also after a graceful stop: SIGINT, SIGTERM, SIGQUIT,
or stdout closed by its reader, as with ``| head``); 1 the pipeline failed (a node raised, a
worker could not start, a node went FATAL) or a stop did not drain (frames were lost); 2 the
command line or the pipeline file is invalid (missing file, syntax error, no pipeline object,
invalid pipeline, a bad option value, a pipeline name already running). A bad command line or
option value is reported in one line (``error: ...``), as a JSON object with
``--log-format json``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

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


class _Text:
    """A summary printed as is (not quoted) inside a value's repr."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


#: Items of a list, tuple or array printed before the rest is summarised.
_SHOWN_ITEMS = 8


def _numpy() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np


def _summarize(value: Any, limit: int = 160) -> str:
    """An output as a plain, short line: numpy scalars as numbers, small arrays as lists,
    long arrays, lists and bytes summarised (``<ndarray float32 (48000,)>``,
    ``[0, 1, ..., 7, ... 92 more]``).

    >>> import numpy as np
    >>> _summarize({"rms_db": np.float64(-15.03), "peak": np.array([1, 2])})
    "{'rms_db': -15.03, 'peak': [1, 2]}"
    """
    np = _numpy()

    def short(v: Any) -> Any:
        if np is not None and isinstance(v, np.generic):
            return v.item()
        if np is not None and isinstance(v, np.ndarray):
            if v.size > _SHOWN_ITEMS:
                return _Text(f"<ndarray {v.dtype} {tuple(v.shape)}>")
            return v.tolist()
        if isinstance(v, dict):
            return {short(k): short(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            items = [short(x) for x in v[:_SHOWN_ITEMS]]
            if len(v) > _SHOWN_ITEMS:
                items.append(_Text(f"... {len(v) - _SHOWN_ITEMS} more"))
            return tuple(items) if isinstance(v, tuple) else items
        if isinstance(v, (bytes, bytearray)) and len(v) > 32:
            return _Text(f"<{type(v).__name__} of {len(v)} bytes>")
        return v

    text = repr(short(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: Any) -> Any:
    """An output as JSON data, in full: numpy scalars -> numbers, arrays -> (nested) lists,
    tuples and sets -> lists, bytes -> ``{"base64": ...}``, mapping keys -> str, anything
    else -> its repr."""
    np = _numpy()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        # JSON keys are strings: numbers and str keep their text, anything else its repr
        return {str(k) if k is None or isinstance(k, (str, int, float)) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    return repr(value)


def _plural(n: int, word: str) -> str:
    """``1 connection``, ``2 connections``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _print_report(report: Any, sink: Optional[LogSink] = None) -> None:
    if sink is not None and sink.fmt == "json":
        sink.write(
            {
                "level": "INFO",
                "logger": "remotemedia.report",
                "msg": f"pipeline {report.pipeline!r}: {_plural(report.output_count, 'output')} in {report.duration:.2f} s",
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
    click.echo(f"pipeline {report.pipeline!r}: {_plural(report.output_count, 'output')} in {report.duration:.2f} s", err=True)
    width = max([4] + [len(n) for n in report.nodes])
    # backend ray: which host each node ran on
    hosts = any("host" in s for s in report.nodes.values())
    hw = max([4] + [len(str(s.get("host"))) for s in report.nodes.values()]) if hosts else 0
    host_head = f"{'host':<{hw}} " if hosts else ""
    click.echo(f"  {'node':<{width}}  {host_head}{'state':<8} {'in':>8} {'out':>8} {'restarts':>8}  p50 ms", err=True)
    for name, s in report.nodes.items():
        lat = (s.get("latency") or {}).get("p50_ms")
        host_cell = f"{str(s.get('host')):<{hw}} " if hosts else ""
        click.echo(
            f"  {name:<{width}}  {host_cell}{s.get('state', '?'):<8} {s.get('frames_in', 0):>8} {s.get('frames_out', 0):>8} "
            f"{s.get('restarts', 0):>8}  {'-' if lat is None else f'{lat:.3f}'}",
            err=True,
        )


def _json_errors(args: Sequence[str]) -> bool:
    """Whether the command line asks for JSON logs (then its errors are JSON too)."""
    args = list(args)
    for i, a in enumerate(args):
        if a == "--log-format=json" or (a == "--log-format" and args[i + 1 : i + 2] == ["json"]):
            return True
    return False


def _usage_error_line(e: click.ClickException) -> str:
    """A click error as one line: what is wrong, and where the help is."""
    message = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        return f"error: {message} (see '{ctx.command_path} --help')"
    return f"error: {message}"


class _Cli(click.Group):
    """The command group; its errors (exit 2) are one ``error: ...`` line on stderr, or one
    JSON object with ``--log-format json``, instead of click's usage block."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                e.show()  # no command at all: the help, as click prints it
                sys.exit(e.exit_code)
            sink = LogSink("json" if _json_errors(argv) else "text")
            line = _usage_error_line(e) if isinstance(e, click.UsageError) else f"error: {e.format_message()}"
            _error(sink, line[len("error: "):])
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_FAILED)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            # the reader of stdout went away (`| head`): nothing more to say, and nowhere to
            # say it; flushing at exit must not raise again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.exit(EXIT_FAILED)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
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

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        # the table's own check, at parse time: a bad value is a usage error (exit 2) of
        # every command that takes the flag (start, systemd-unit), before anything starts
        if value is None:
            return None
        assert flag is not None
        if not option.allowed(flag.to_option(option.key, value)):
            unit = f" ({flag.unit} here)" if flag.unit else ""
            raise click.BadParameter(f"{option.key} must be {option.allowed.text}, got {value!r}{unit}", ctx, param)
        return value
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
        callback=None if flag.choices else check,
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
@click.option(
    "--output", "-o", "output_path", type=click.Path(dir_okay=False, allow_dash=True),
    help="Also write every output to this file as one JSON line: value, seq, origin, stream_id, source "
    "(the node it came from), created_ns, sent_ns. '-': to stdout, instead of the printed summaries.",
)
@_table_flags
@click.option("--progress/--no-progress", default=None, help="A live progress line on stderr: frames in and out, frames/s, restarts; a bar and an ETA for sources of known length (default: when stderr is a terminal).")
@click.option("--inline", is_flag=True, help="Run in this process on the file's own node objects (no workers; for pdb and quick checks).")
def start(
    pipeline_file: str,
    input_file: Any,
    json_input: bool,
    quiet: bool,
    output_path: Optional[str],
    progress: Optional[bool],
    inline: bool,
    **flags: Any,
) -> None:
    """Run PIPELINE_FILE (.py defining `pipeline` or `build()`, or a .json manifest) until its
    sources are exhausted, or until SIGINT/SIGTERM/SIGQUIT (drain, then exit 0; exit 1 when
    the drain timed out and frames were lost). SIGHUP reloads the file (see `reload`). With
    --inline the pipeline runs in this process (see supervisor.inline); the supervision
    options do not apply then.

    The options are remotemedia.options' table (the README's), in the command line's units."""
    from supervisor.core import Supervisor

    options = flag_values(flags)
    _ray_address_means_ray(options)

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
    output = _open_output(output_path)
    if inline:
        _start_inline(pipeline, pipeline_file, input_file, json_input, quiet, sink, options["on_error"], output)
        return
    try:
        sup = Supervisor(pipeline, **options)
    except RemoteMediaError as e:
        raise PipelineFileError(f"invalid options for {pipeline_file}: {e}") from e
    _check_metrics_port(options["metrics_host"], options["metrics_port"])
    _claim_name(sup.name)
    # `reload`, SIGHUP and the unit's ExecReload= read the file again
    sup.reload_from(lambda: load_pipeline(pipeline_file, options["name"], options["trust_instances"]))

    inputs = _cli_inputs(pipeline, pipeline_file, input_file, json_input)

    show_progress = sys.stderr.isatty() if progress is None else progress
    bar = _Progress.of(sup, sys.stderr) if show_progress else None
    if bar is not None:
        sink.stream = bar.above(sys.stderr)  # worker and supervisor log lines go above it
    show = _with_output(_printer(quiet or output_path == "-", lambda: sup.stop(), bar), output, lambda: sup.stop())
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
        _error(sink, str(e), str(cause) if cause is not None else None, getattr(e, "node", None))
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


def _ray_address_means_ray(options: Dict[str, Any]) -> None:
    """``--ray-address ADDR`` alone runs on that cluster: backend ``ray`` unless ``--backend``
    was given (then a contradiction is the Supervisor's error)."""
    ctx = click.get_current_context()
    if options.get("ray_address") is not None and ctx.get_parameter_source("backend") is click.core.ParameterSource.DEFAULT:
        options["backend"] = "ray"


#: ``start`` parameters that keep their meaning with --inline (``input_file`` is ``--input``).
_INLINE_CLI_OPTIONS = ("pipeline_file", "name", "input_file", "json_input", "quiet", "output_path", "log_level", "log_format", "inline", "trust_instances", "on_error")


def _claim_name(name: str) -> None:
    """Hold the pipeline name for this process's life (control.NameLock), or exit 2 naming
    the pid that runs it."""
    from .control import NameInUseError, NameLock, find_endpoints

    import atexit

    try:
        lock = NameLock.acquire(name, handover=True)
    except NameInUseError as e:
        raise PipelineFileError(str(e)) from None
    except RemoteMediaError as e:
        raise PipelineFileError(f"cannot use the pipeline name {name!r}: {e}") from None
    # A systemd unit keeps its lock and socket in its own runtime directory
    # (REMOTEMEDIA_RUNTIME_DIR=%t/remotemedia/%N): the lock above cannot see it, its socket can.
    others = [pid for _, _, pid in find_endpoints(name) if pid != os.getpid()]
    if others:
        lock.release()
        raise PipelineFileError(str(NameInUseError(name, others[0])))
    # held until this process exits (the kernel would drop it then anyway; this also
    # removes the file)
    atexit.register(lock.release)


def _check_metrics_port(host: str, port: Optional[int]) -> None:
    """Exit 2 now, in one line, when the metrics endpoint could not be served (no
    prometheus-client, the port taken), rather than fail later inside the running
    supervisor."""
    import socket

    if port is None:
        return
    if importlib.util.find_spec("prometheus_client") is None:
        raise PipelineFileError("--metrics-port needs the prometheus-client package: pip install 'remotemedia[metrics]'")
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise PipelineFileError(f"--metrics-host {host}: cannot resolve it ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        # as the metrics server binds (http.server allows address reuse)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise PipelineFileError(
                f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e}); "
                "pick a free port (0: any free port)"
            ) from None


def _open_output(path: Optional[str]) -> Optional[TextIO]:
    """The file of ``--output`` (stdout for '-'), opened now so that a bad path exits 2."""
    if path is None:
        return None
    if path == "-":
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise PipelineFileError(f"--output {path}: cannot write it ({e.strerror or e})") from None


def _with_output(show: Callable[[Any, FrameInfo], None], output: Optional[TextIO], on_closed: Callable[[], None]) -> Callable[[Any, FrameInfo], None]:
    """``show``, plus each output as one JSON line on ``output`` (``--output``)."""
    if output is None:
        return show
    open_ = [True]

    def both(value: Any, info: FrameInfo) -> None:
        show(value, info)
        if not open_[0]:
            return
        try:
            output.write(json.dumps({"value": _jsonable(value), **info._asdict()}) + "\n")
            output.flush()
        except OSError as e:
            open_[0] = False
            logging.getLogger("remotemedia.cli").error("--output: cannot write (%s): stopping the pipeline", e.strerror or e)
            on_closed()

    return both


def _start_inline(pipeline: Pipeline, pipeline_file: str, input_file: Any, json_input: bool, quiet: bool, sink: LogSink, on_error: str,
                  output: Optional[TextIO] = None) -> None:
    """``start --inline``: the pipeline in this process (supervisor.inline), the outputs and
    the report printed like a supervised run's, the same exit codes."""
    import signal
    import threading

    from .core import _STOP_SIGNALS
    from .inline import run_inline

    inputs = _cli_inputs(pipeline, pipeline_file, input_file, json_input)
    stop = threading.Event()
    show = _with_output(_printer(quiet or output is sys.stdout, stop.set), output, stop.set)

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
        _error(sink, str(e), detail, getattr(e, "node", None))
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


def _error(sink: LogSink, message: str, detail: Optional[str] = None, node: Optional[str] = None) -> None:
    """The final error of a command: ``error: ...`` on stderr, or one JSON record (with the
    node it concerns, if any)."""
    if sink.fmt == "json":
        sink.write({"level": "ERROR", "logger": "remotemedia.cli", "msg": f"error: {message}", "detail": detail}, node, os.getpid())
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
@click.option("--all", "all_", is_flag=True, help="Every running pipeline of this user.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (a list with --all; [] when none runs).")
@click.option("--watch", "-w", is_flag=True, help="Refresh the table every --interval seconds until Ctrl-C (redrawn in place on a terminal, else one table per refresh).")
@click.option("--interval", type=click.FloatRange(min=0.05), default=2.0, show_default=True, help="Seconds between the refreshes of --watch.")
def status(name: Optional[str], all_: bool, as_json: bool, watch: bool, interval: float) -> None:
    """Show the nodes of running pipeline NAME (or of every one with --all).

    NAME is the pipeline name exactly as `start` used it (its --name, else the pipeline's own);
    without NAME and --all, the one running pipeline. Exit 1 when NAME is not running.

    \b
        remotemedia-supervisor status cams
        remotemedia-supervisor status cams --watch --interval 1
        remotemedia-supervisor status --all --json
    """
    from .monitor import format_table

    if name and all_:
        raise click.UsageError("give a pipeline NAME or --all, not both")
    if watch and as_json:
        raise click.UsageError("--watch shows the table; for JSON, call `status --json` at your own pace")
    if not name and not all_:
        name = _the_one_running()
    results = _statuses(name, all_)
    if watch:
        _watch(name, all_, interval, results)
        return
    if as_json:
        click.echo(json.dumps(results if all_ or len(results) != 1 else results[0], indent=2, default=repr))
    elif results:
        click.echo("\n\n".join(format_table(st) for st in results))
    else:
        click.echo(f"no running pipelines (looked in {_runtime_dir()})", err=True)


def _the_one_running() -> str:
    from .control import find_endpoints

    eps = find_endpoints()
    if len({n for n, _, _ in eps}) != 1:
        names = ", ".join(repr(n) for n in sorted({n for n, _, _ in eps})) or "none"
        raise click.UsageError(f"give a pipeline NAME or --all (running: {names})")
    return eps[0][0]


def _statuses(name: Optional[str], all_: bool, vanished_ok: bool = False) -> List[Dict[str, Any]]:
    """The status dicts of pipeline ``name`` (or of every one with ``all_``); exit 1 when
    ``name`` is not running (unless ``vanished_ok``: then [])."""
    from .control import find_endpoints, request

    eps = find_endpoints(None if all_ else name)
    if not eps and not all_:
        if vanished_ok:
            return []
        click.echo(f"no running pipeline named {name!r} (looked in {_runtime_dir()})", err=True)
        sys.exit(EXIT_FAILED)
    results = []
    for sup_name, path, pid in eps:
        try:
            resp = request(path, {"cmd": "status"})
        except (OSError, RemoteMediaError, ValueError) as e:
            if pid_alive(pid):  # (one that exits meanwhile is simply not running any more)
                click.echo(f"{sup_name} (pid {pid}): no answer: {e}", err=True)
            continue
        if resp.get("ok"):
            results.append(resp["status"])
    if not results and not all_ and not vanished_ok:
        sys.exit(EXIT_FAILED)
    return results


def _watch(name: Optional[str], all_: bool, interval: float, results: List[Dict[str, Any]]) -> None:
    """``status --watch``: the table every ``interval`` s until Ctrl-C, or until pipeline
    ``name`` is gone (exit 0)."""
    import time

    from .monitor import format_table

    tty = sys.stdout.isatty()
    try:
        while True:
            if results:
                text = "\n\n".join(format_table(st) for st in results)
            else:
                text = f"no running pipelines (looked in {_runtime_dir()})"
            stamp = time.strftime("%H:%M:%S")
            if tty:
                # home, clear the screen, draw: the table stays in place
                click.echo(f"\x1b[H\x1b[2J{stamp}  every {interval:g} s, Ctrl-C to quit\n{text}")
            else:
                click.echo(f"{stamp}\n{text}\n")
            if not results and not all_:
                click.echo(f"pipeline {name!r} is no longer running", err=True)
                return
            time.sleep(interval)
            results = _statuses(name, all_, vanished_ok=True)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Stop every running pipeline of this user.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the supervisors have exited.")
@click.option("--timeout", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds --wait waits for the supervisors to exit (their drain included); exit 1 after that.")
def stop(name: Optional[str], all_: bool, wait: bool, timeout: float) -> None:
    """Drain and stop running pipeline NAME (like SIGTERM), or every one with --all.

    NAME is the pipeline name exactly as `start` used it. Exit 1 when NAME is not running or
    a supervisor did not exit within --timeout.
    """
    import time

    from .control import find_endpoints, request

    if bool(name) == all_:
        raise click.UsageError("give a pipeline NAME or --all")
    eps = find_endpoints(None if all_ else name)
    if not eps:
        if all_:
            click.echo(f"no running pipelines (looked in {_runtime_dir()})", err=True)
            return
        click.echo(f"no running pipeline named {name!r} (looked in {_runtime_dir()})", err=True)
        sys.exit(EXIT_FAILED)
    failed = False
    for sup_name, path, pid in eps:
        try:
            resp = request(path, {"cmd": "stop"})
        except (OSError, RemoteMediaError, ValueError) as e:
            resp = {"ok": False, "error": f"no answer: {e}"}
        if not resp.get("ok"):
            click.echo(f"{sup_name} (pid {pid}): {resp.get('error')}", err=True)
            failed = True
            continue
        click.echo(f"stopping {sup_name} (pid {pid})")
    if wait:
        deadline = time.monotonic() + timeout
        while any(pid_alive(pid) for _, _, pid in eps):
            if time.monotonic() > deadline:
                left = ", ".join(f"{n} (pid {p})" for n, _, p in eps if pid_alive(p))
                click.echo(f"timed out after {timeout:g} s waiting for {left} to exit", err=True)
                sys.exit(EXIT_FAILED)
            time.sleep(0.1)
    if failed:
        sys.exit(EXIT_FAILED)


def _runtime_dir() -> str:
    from .control import runtime_dir

    return runtime_dir()


#: Table flags a unit always passes to `start` (ExecStart), given or not.
_UNIT_ALWAYS = ("name", "stop_timeout")


@main.command("systemd-unit")
@click.argument("pipeline_file", type=click.Path(dir_okay=True))
@click.option("--user", help="Run the service as this user (User=); without it a system unit runs as root (a warning says so).")
@click.option("--user-unit", is_flag=True, help="A unit for `systemctl --user` (the service manager of the user running this): no User=, WantedBy=default.target, --unit-dir ~/.config/systemd/user.")
@click.option("--watchdog-sec", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="WatchdogSec=: systemd restarts the service when its pipeline has been wedged this long.")
@click.option("--quiet/--no-quiet", default=True, show_default=True, help="Pass --quiet to start (the outputs are not printed into the journal).")
@click.option("--install", is_flag=True, help="Write the unit into --unit-dir (and reload systemd when that is the default directory).")
@click.option("--unit-dir", type=click.Path(file_okay=False), help="Where --install writes the unit.  [default: /etc/systemd/system; ~/.config/systemd/user with --user-unit]")
@_table_flags
def systemd_unit(
    pipeline_file: str,
    user: Optional[str],
    user_unit: bool,
    watchdog_sec: float,
    quiet: bool,
    install: bool,
    unit_dir: Optional[str],
    **flags: Any,
) -> None:
    """Print (or --install) a Type=notify systemd unit that runs PIPELINE_FILE.

    Every `start` option of the options table (--metrics-port, --log-format, timeouts, ...)
    goes into ExecStart, checked as `start` checks it. ExecReload= runs `reload NAME`.

    \b
        remotemedia-supervisor systemd-unit cams.py --name cams --user media --metrics-port 9100
        remotemedia-supervisor systemd-unit cams.py --user-unit --install
    """
    import pwd
    import subprocess

    from supervisor.core import Supervisor

    from .systemd import render_unit, unit_name

    options = flag_values(flags)
    _ray_address_means_ray(options)
    pipeline = load_pipeline(pipeline_file, options["name"], options["trust_instances"])
    try:
        Supervisor(pipeline, **options)  # the checks of `start` (nothing runs)
    except RemoteMediaError as e:
        raise PipelineFileError(f"invalid options for {pipeline_file}: {e}") from e
    if options["metrics_port"] is not None and importlib.util.find_spec("prometheus_client") is None:
        raise PipelineFileError("--metrics-port needs the prometheus-client package: pip install 'remotemedia[metrics]'")
    name = options["name"] or pipeline.name
    if user_unit and user:
        raise click.UsageError("--user does not apply to --user-unit (a user unit runs as the user whose systemd runs it)")
    if not user_unit:
        if not user:
            click.echo("warning: no --user: the service will run as root; give --user ACCOUNT, or --user-unit for systemctl --user", err=True)
        else:
            try:
                pwd.getpwnam(user)
            except KeyError:
                click.echo(f"warning: user {user!r} does not exist on this machine: systemd will not start the unit until it does", err=True)

    ctx = click.get_current_context()
    args: List[str] = []
    for key in (k for k in OPTIONS if k in flags):  # the table's order, whatever the command line's
        if key in _UNIT_ALWAYS or ctx.get_parameter_source(key) is click.core.ParameterSource.DEFAULT:
            continue
        flag_name, value = OPTIONS[key].flag_name, flags[key]
        assert flag_name is not None
        if OPTIONS[key].flag.type is bool:  # type: ignore[union-attr]
            args += [flag_name] if value else []
        else:
            args += [flag_name, f"{value:g}" if isinstance(value, float) else str(value)]
    text = render_unit(
        pipeline_file, name, user=user, stop_timeout=options["stop_timeout"], watchdog_sec=watchdog_sec,
        extra_args=args, quiet=quiet, user_unit=user_unit,
    )
    if not install:
        click.echo(text, nl=False)
        return
    default_dir = os.path.expanduser("~/.config/systemd/user") if user_unit else "/etc/systemd/system"
    unit_dir = unit_dir or default_dir
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
        fix = "choose --unit-dir" if user_unit else "run as root, or choose --unit-dir"
        raise click.ClickException(f"cannot write {path}: {e} ({fix})") from e
    click.echo(f"wrote {path}")
    systemctl = ["systemctl", "--user"] if user_unit else ["systemctl"]
    if os.path.abspath(unit_dir) == os.path.abspath(default_dir):
        try:
            r = subprocess.run([*systemctl, "daemon-reload"], capture_output=True, text=True)
            problem = r.stderr.strip() if r.returncode != 0 else None
        except OSError as e:
            problem = str(e)
        if problem:
            click.echo(f"warning: {' '.join(systemctl)} daemon-reload failed: {problem}", err=True)
        click.echo(f"start it with: {' '.join(systemctl)} enable --now {unit_name(name)}")


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
    click.echo(f"{pipeline_file}: OK: {_plural(len(pipeline.nodes), 'node')}, {_plural(len(pipeline.connections), 'connection')}")


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


from . import cli_live  # noqa: E402,F401  (registers restart, reload, logs, list on main)

if __name__ == "__main__":  # pragma: no cover
    # (`python -m supervisor.cli`: the commands of cli_live are registered on the group of the
    # module supervisor.cli, not on this __main__ copy of it)
    from supervisor.cli import main as _main

    _main()
