"""The runtime options: one table, from which every other list of them is derived.

Each :class:`Option` of :data:`OPTIONS` has its key, default, allowed values, scope (a
keyword of :class:`~remotemedia.Supervisor`, a per-node option of ``Node(...,
options={...})``, or both; or a keyword of the run functions only), help text and, when it
has one, its ``remotemedia-supervisor start`` flag. Derived from it:

* the defaults of the Supervisor's keywords (its signature reads ``DEFAULTS.<key>``;
  ``tests/test_options.py`` checks that signature and table agree, names, order and defaults),
  and the checks of their values (:func:`check_supervisor`);
* :attr:`NodeOptions.KEYS <remotemedia.node.NodeOptions.KEYS>` (:data:`NODE_KEYS`), and each
  node's resolved options with their checks (:func:`resolve_node`);
* the flags of ``remotemedia-supervisor start`` (``supervisor.cli``), their defaults and help;
* :data:`remotemedia.runtime.RUN_OPTIONS` and the Supervisor keywords the run functions accept;
* the options table of the README: ``python -m remotemedia.options --markdown`` prints it.

Adding an option: a row here, a keyword of ``Supervisor.__init__`` defaulting to
``DEFAULTS.<key>`` (for a Supervisor option), the code that reads it, then regenerate the
README's table.

This module is part of the model: it imports nothing of the runtime (``supervisor``).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import NodeTypeError, OptionValueError
from .serialization import DEFAULT_MAX_SIZE

__all__ = [
    "Option",
    "Flag",
    "Allowed",
    "OPTIONS",
    "DEFAULTS",
    "NODE_KEYS",
    "SUPERVISOR_KEYS",
    "RUN_KEYS",
    "RESTART_POLICIES",
    "ON_ERROR_POLICIES",
    "QUEUE_POLICIES",
    "LOG_FORMATS",
    "START_METHODS",
    "BACKENDS",
    "check",
    "check_supervisor",
    "check_node_keys",
    "node_defaults",
    "resolve_node",
    "flag_values",
    "markdown_table",
]

#: Restart policies of a node's worker (see the README's Supervision section).
RESTART_POLICIES = ("never", "on-failure", "always")
#: What happens when ``process()`` raises: stop the pipeline with NodeError, or drop the frame.
ON_ERROR_POLICIES = ("raise", "skip")
#: Queue policies of the edges into a node.
QUEUE_POLICIES = ("block", "drop_oldest", "latest")
#: Formats of the captured worker output and log lines.
LOG_FORMATS = ("text", "json")
#: How worker processes are started (see the README's Supervision section).
START_METHODS = ("spawn", "forkserver")
#: Where the workers run: ``local`` (this host) or ``ray`` (a Ray cluster; nodes placed by
#: their ``host`` option, see the README's "Across hosts").
BACKENDS = ("local", "ray")
#: Logging levels the command line accepts by name.
LOG_LEVEL_NAMES = ("DEBUG", "INFO", "WARNING", "ERROR")

_MIB = 1 << 20


@dataclass(frozen=True)
class Allowed:
    """The values an option accepts: ``text`` completes "<key> must be ..." in an error."""

    text: str
    test: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return bool(self.test(value))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _int_at_least(n: int) -> Allowed:
    return Allowed("a positive int" if n == 1 else f"an int >= {n}", lambda v: _is_int(v) and v >= n)


_POSITIVE_INT = _int_at_least(1)
_POSITIVE_SECONDS = Allowed("a positive number of seconds", lambda v: _is_number(v) and v > 0)
_SECONDS = Allowed("a number of seconds >= 0", lambda v: _is_number(v) and v >= 0)
_BOOL = Allowed("True or False", lambda v: isinstance(v, bool))
_NAME = Allowed("a non-empty str", lambda v: isinstance(v, str) and v != "")


def _one_of(values: Tuple[str, ...]) -> Allowed:
    return Allowed(f"one of {', '.join(map(repr, values))}", lambda v: isinstance(v, str) and v in values)


def _or_none(allowed: Allowed) -> Allowed:
    return Allowed(f"None or {allowed.text}", lambda v: v is None or allowed(v))


def _is_level(v: Any) -> bool:
    if _is_int(v):
        return v >= 0
    return isinstance(v, str) and isinstance(logging.getLevelName(v.upper()), int)


def _is_env(v: Any) -> bool:
    return isinstance(v, Mapping) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


@dataclass(frozen=True)
class Flag:
    """The ``remotemedia-supervisor start`` flag of an option: ``--<key with dashes>``.

    ``type``: the flag's value type (``bool``: an on/off switch; ``"dir"``: a directory path);
    ``choices``: the values it accepts, when it is one of a few words; ``unit``: ``"MiB"`` when
    the flag takes MiB and the option bytes (then ``zero_is_none``: 0 means no limit).
    """

    type: Any = str
    choices: Tuple[str, ...] = ()
    unit: str = ""
    zero_is_none: bool = False

    def to_option(self, key: str, value: Any) -> Any:
        """The option's value for the flag's ``value``."""
        if value is None:
            return None
        if key == "log_level":
            return logging.getLevelName(value.upper())
        if self.unit == "MiB":
            if self.zero_is_none and value == 0:
                return None
            return int(value * _MIB)
        return value

    def from_option(self, key: str, value: Any) -> Any:
        """The flag's value for the option's ``value`` (its default on the command line)."""
        if value is None:
            return None
        if key == "log_level":
            return logging.getLevelName(value)
        if self.unit == "MiB":
            return value / _MIB
        return value


@dataclass(frozen=True)
class Option:
    """One runtime option.

    ``supervisor``: a keyword of :class:`~remotemedia.Supervisor` (and so of ``Pipeline.run``
    and ``execute_pipeline*``); ``per_node``: settable per node with ``Node(...,
    options={...})`` (overriding the Supervisor's value for that node); ``run``: a keyword of
    the run functions only (:data:`remotemedia.runtime.RUN_OPTIONS`). ``shown``: the default
    as the README and ``--help`` print it, when ``repr(default)`` would not say it.
    """

    key: str
    default: Any
    allowed: Allowed
    help: str
    per_node: bool = False
    supervisor: bool = True
    run: bool = False
    flag: Optional[Flag] = None
    shown: Optional[str] = None

    @property
    def flag_name(self) -> Optional[str]:
        """``--queue-depth`` for ``queue_depth``; None without a flag."""
        return None if self.flag is None else "--" + self.key.replace("_", "-")

    @property
    def help_sentence(self) -> str:
        """The help as a plain-text sentence (``--help``): no code marks, a capital unless it
        starts with a value (`` `never`, ...``), a full stop."""
        text = self.help if self.help.startswith("`") else self.help[0].upper() + self.help[1:]
        return text.replace("`", "") + "."

    @property
    def default_text(self) -> str:
        """The default, for people."""
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "none"
        if isinstance(self.default, str):
            return f"`{self.default}`"
        return repr(self.default)


def _table() -> Tuple[Option, ...]:
    # The order of the Supervisor's keywords (tests/test_options.py checks it), then the
    # per-node-only options, then the run functions' own.
    return (
        Option("name", None, _or_none(_NAME), "pipeline name (logs, `status`, the control socket)", shown="the pipeline's", flag=Flag(str)),
        Option("init_timeout", 60.0, _POSITIVE_SECONDS, "seconds a worker may take to unpickle its node and run `initialize()`", per_node=True, shown="60 s", flag=Flag(float)),
        Option("stop_timeout", 30.0, _SECONDS, "seconds a drain (`stop()`, SIGTERM) may take before the workers are aborted", shown="30 s", flag=Flag(float)),
        Option("kill_timeout", 5.0, _SECONDS, "seconds an aborted or killed worker gets for `cleanup()` before SIGKILL", shown="5 s", flag=Flag(float)),
        Option(
            "handover_timeout", 10.0, _SECONDS,
            "seconds a worker being replaced (`restart`, `reload`) waits for its outputs to be committed downstream; then it hands over at the commit it has and the frames after it are replayed",
            shown="10 s", flag=Flag(float),
        ),  # fmt: skip
        Option("queue_depth", 32, _POSITIVE_INT, "frames in flight on each edge into the node (its queue and its producer's window)", per_node=True, flag=Flag(int)),
        Option(
            "queue_bytes", 256 * _MIB, _POSITIVE_INT,
            "bytes in flight on each edge into the node (whichever of this and `queue_depth` comes first): it bounds the memory of big frames in flight",
            per_node=True, shown="256 MiB", flag=Flag(float, unit="MiB"),
        ),
        Option(
            "max_borrowed", 8, _int_at_least(2),
            "received frames a node may hold zero-copy per edge; past that, frames are copied out of shared memory, so a node that keeps frames never stalls its upstream",
            flag=Flag(int),
        ),
        Option("max_node_size", DEFAULT_MAX_SIZE, _or_none(_POSITIVE_INT), "nodes whose pickle is larger than this many bytes are refused (None: no limit)", shown=f"{DEFAULT_MAX_SIZE // _MIB} MiB"),
        Option(
            "on_error", "raise", _one_of(ON_ERROR_POLICIES),
            "a Python exception in `process()`: `raise` stops the pipeline with `NodeError`; `skip` logs it and drops the frame",
            per_node=True, flag=Flag(str, ON_ERROR_POLICIES),
        ),
        Option(
            "restart_policy", "on-failure", _one_of(RESTART_POLICIES),
            "`never`, `on-failure` (a crash, non-zero exit or signal) or `always` (also an exit 0 before the end of the stream)",
            per_node=True, flag=Flag(str, RESTART_POLICIES),
        ),
        Option("max_restarts", 5, _int_at_least(0), "more restarts than this within `restart_window`: the node goes FATAL", per_node=True, flag=Flag(int)),
        Option("restart_window", 60.0, _POSITIVE_SECONDS, "seconds over which `max_restarts` counts restarts", per_node=True, shown="60 s", flag=Flag(float)),
        Option(
            "process_timeout", None, _or_none(_POSITIVE_SECONDS),
            "seconds one `process()` call may take (backpressure waits excluded) before the worker is killed and restarted",
            per_node=True, flag=Flag(float),
        ),
        Option(
            "memory_limit", None, _or_none(_POSITIVE_INT),
            "bytes of private (non-shared) resident memory a worker may use before it is killed and restarted",
            per_node=True, flag=Flag(float, unit="MiB", zero_is_none=True),
        ),
        Option(
            "poison_threshold", 3, _POSITIVE_INT,
            "crashes (and hang or memory kills) in a row on the same frame before it is dead-lettered",
            per_node=True, flag=Flag(int),
        ),
        Option(
            "snapshot_interval", None, _or_none(_POSITIVE_SECONDS),
            "seconds between `snapshot()`s, for nodes that define `snapshot()`/`restore(state)` (None: 1 s)",
            per_node=True, shown="1 s", flag=Flag(float),
        ),
        Option("backoff_base", 0.1, _POSITIVE_SECONDS, "seconds before a restart, doubled for each restart in the window (0.1, 0.2, 0.4 … s)", per_node=True, shown="0.1 s", flag=Flag(float)),
        Option("backoff_max", 5.0, _POSITIVE_SECONDS, "the longest delay before a restart, in seconds", per_node=True, shown="5 s", flag=Flag(float)),
        Option("heartbeat_interval", 1.0, _POSITIVE_SECONDS, "seconds between worker heartbeats", shown="1 s", flag=Flag(float)),
        Option(
            "heartbeat_timeout", None, _or_none(_POSITIVE_SECONDS),
            "a worker whose loop has not turned for this many seconds (while not inside `process()`) is killed and restarted",
            shown="max(10 s, 5 heartbeats)", flag=Flag(float),
        ),
        Option(
            "dead_letter_dir", None, Allowed("None or a directory path", lambda v: v is None or isinstance(v, (str, os.PathLike))),
            "directory where dead-lettered frames are written (raw payload + JSON header)", flag=Flag("dir"),
        ),
        Option("env", None, Allowed("None or a dict of str to str", lambda v: v is None or _is_env(v)), "extra environment variables for the workers"),
        Option(
            "log_level", logging.WARNING, Allowed("a logging level (logging.INFO or 'INFO')", _is_level),
            "logging level of the workers (on the command line also its own)", shown="WARNING", flag=Flag(str, LOG_LEVEL_NAMES),
        ),
        Option("log_format", "text", _one_of(LOG_FORMATS), "`text` or `json`: the format of the log lines and the workers' captured output on stderr", flag=Flag(str, LOG_FORMATS)),
        Option("control", True, _BOOL, "serve the control socket (`remotemedia-supervisor status` / `stop`)"),
        Option(
            "metrics_port", None, _or_none(Allowed("a port number (0 to 65535)", lambda v: _is_int(v) and 0 <= v <= 65535)),
            "serve Prometheus metrics on this port (needs prometheus-client)", flag=Flag(int),
        ),
        Option("metrics_host", "127.0.0.1", _NAME, "address of the metrics endpoint", shown="`127.0.0.1`", flag=Flag(str)),
        Option(
            "spin_us", 200, _int_at_least(0),
            "microseconds a worker spins (GIL released, adaptive) for the next frame before blocking; 0 always blocks",
            flag=Flag(int),
        ),
        Option(
            "start_method", "forkserver", _one_of(START_METHODS),
            "how workers start: `spawn` (a new Python interpreter each) or `forkserver` (forked from a template process of the run that has imported the runtime, numpy and the nodes' modules: faster, and sharing memory)",
            flag=Flag(str, START_METHODS),
        ),
        Option(
            "trust_instances", False, _BOOL,
            "accept manifest entries holding a pickled node instance (unpickling runs code: only for manifests you made yourself)",
            flag=Flag(bool),
        ),
        Option(
            "backend", "local", _one_of(BACKENDS),
            "`local` (every worker on this host) or `ray` (nodes run on the Ray cluster's hosts, placed by their `host` option; needs `pip install 'remotemedia[ray]'`)",
            flag=Flag(str, BACKENDS),
        ),
        Option(
            "ray_address", None, _or_none(_NAME),
            "the Ray cluster of backend `ray` (`auto`, `HOST:PORT`); None: the cluster this process is connected to, else a new one on this host only",
            flag=Flag(str),
        ),
        Option(
            "host_timeout", 10.0, _POSITIVE_SECONDS,
            "backend `ray`: seconds a host's agent may leave the supervisor's pings unanswered before it is declared lost and restarted (Ray's own node health check takes about 15 s)",
            shown="10 s", flag=Flag(float),
        ),
        Option(
            "host", None, _or_none(Allowed("a non-empty str without '/' or spaces", lambda v: isinstance(v, str) and v != "" and not any(c.isspace() or c == "/" for c in v))),
            "backend `ray`: run the node on the Ray nodes labelled `remotemedia.host=<host>` (hard placement); None: on the driver's host. The local backend ignores it",
            per_node=True, supervisor=False,
        ),
        Option(
            "queue_policy", "block", _one_of(QUEUE_POLICIES),
            "the edges into the node: `block` (lossless backpressure), `drop_oldest` (a bounded queue that overwrites its oldest frame) or `latest` (depth 1: only the newest frame)",
            per_node=True, supervisor=False,
        ),
        Option(
            "replicas", 1, _int_at_least(1),
            "workers that run copies of the node side by side: its upstream sends each frame to the least-loaded one (fewest frames in flight), its downstream gets their outputs back in input order (see the README's Replicas; not for nodes with `snapshot()`)",
            per_node=True, supervisor=False,
        ),
        Option("enable_metrics", False, _BOOL, "return an `Outputs` list whose `.metrics` summarizes each node (from the RunReport)", supervisor=False, run=True),
        Option(
            "executor", None, _or_none(_one_of(("multiprocess", "inline"))),
            "`multiprocess` (supervised workers; the default) or `inline` (this process, your own node objects)",
            supervisor=False, run=True, shown="`multiprocess`",
        ),
        Option(
            "use_rust", None, _or_none(_BOOL),
            "the seed API's switch: True is `multiprocess` (its transport is the Rust bridge), False is `inline`",
            supervisor=False, run=True,
        ),
    )


#: Every option, by key, in the table's order.
OPTIONS: Dict[str, Option] = {o.key: o for o in _table()}
#: The keyword options of :class:`~remotemedia.Supervisor`, in the order of its signature.
SUPERVISOR_KEYS: Tuple[str, ...] = tuple(o.key for o in OPTIONS.values() if o.supervisor)
#: The keys of ``Node(..., options={...})`` (:class:`~remotemedia.node.NodeOptions`).
NODE_KEYS: Tuple[str, ...] = tuple(o.key for o in OPTIONS.values() if o.per_node)
#: The keywords of the run functions beyond the Supervisor's.
RUN_KEYS: Tuple[str, ...] = tuple(o.key for o in OPTIONS.values() if o.run)


class _Defaults:
    """The table's defaults by attribute (``DEFAULTS.init_timeout``), for the Supervisor's
    signature; read-only."""

    __slots__ = ()

    def __getattr__(self, key: str) -> Any:
        try:
            return OPTIONS[key].default
        except KeyError:
            raise AttributeError(f"no option {key!r}; the options are {', '.join(OPTIONS)}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("the defaults are read-only: change them in remotemedia.options")


DEFAULTS = _Defaults()


def check(key: str, value: Any, where: str) -> None:
    """Raise :class:`~remotemedia.errors.OptionValueError` when ``value`` is not allowed for
    option ``key``; ``where`` starts the message (``"Supervisor"``, ``"node 'a'"``)."""
    option = OPTIONS[key]
    if not option.allowed(value):
        raise OptionValueError(
            f"{where}: {key} must be {option.allowed.text}, got {value!r}",
            where=where, key=key, value=value, allowed=option.allowed.text,
        )


def check_supervisor(values: Mapping[str, Any]) -> None:
    """Check every Supervisor option in ``values`` (other keys are ignored, so the
    Supervisor passes its ``locals()``)."""
    for key in SUPERVISOR_KEYS:
        if key in values:
            check(key, values[key], "Supervisor")


def _unknown(keys: Iterable[str], valid: Iterable[str]) -> Tuple[List[str], str]:
    valid = list(valid)
    unknown = sorted(set(keys) - set(valid))
    hints = [f"{k} -> {m[0]}" for k in unknown if (m := difflib.get_close_matches(k, valid, 1))]
    return unknown, (f" (did you mean: {', '.join(hints)}?)" if hints else "")


def check_node_keys(node_name: str, keys: Iterable[str]) -> None:
    """Raise :class:`~remotemedia.errors.NodeTypeError` (a TypeError, like an unexpected
    keyword argument) naming the keys that are not per-node options and listing the valid
    ones."""
    unknown, hint = _unknown(keys, NODE_KEYS)
    if unknown:
        raise NodeTypeError(
            f"node {node_name!r}: unknown runtime option(s) {', '.join(unknown)}{hint}; "
            f"valid options: {', '.join(NODE_KEYS)}"
        )


def node_defaults(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The Supervisor-wide values of the per-node options: those in ``values`` (other keys are
    ignored, so the Supervisor passes its ``locals()``), else the table's defaults."""
    return {key: values.get(key, OPTIONS[key].default) for key in NODE_KEYS}


def resolve_node(node_name: str, defaults: Mapping[str, Any], node_options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The options of node ``node_name``: every per-node option, from the node's own
    ``node_options`` where set (a None value means unset), else from ``defaults`` (the
    Supervisor's values), else the table's default; each checked.

    Raises:
        NodeTypeError: a key of ``node_options`` that is not a per-node option.
        OptionValueError: a value out of range; the message names the node, the key, the
            value, whether the node or the Supervisor set it, and what is allowed.
    """
    own = dict(node_options or {})
    check_node_keys(node_name, own)
    resolved = {key: defaults.get(key, OPTIONS[key].default) for key in NODE_KEYS}
    resolved.update({k: v for k, v in own.items() if v is not None})
    for key in NODE_KEYS:
        where = f"node {node_name!r}" if own.get(key) is not None else f"node {node_name!r} (the Supervisor's value)"
        check(key, resolved[key], where)
    return resolved


def flag_values(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """The option values of ``start``'s table flags (keyed by option key, as click passes
    them): MiB become bytes, level names numbers."""
    out = {}
    for key, value in flags.items():
        flag = OPTIONS[key].flag
        assert flag is not None, key
        out[key] = flag.to_option(key, value)
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's table of the Supervisor's and the per-node options."""
    lines = [
        "| option | default | per node | `start` flag | meaning |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS.values():
        if o.run:
            continue
        per_node = "only" if o.per_node and not o.supervisor else ("yes" if o.per_node else "")
        flag = ""
        if o.flag_name is not None:
            flag = f"`{o.flag_name}`" + (f" ({o.flag.unit})" if o.flag and o.flag.unit else "")
        lines.append(f"| `{o.key}` | {_cell(o.default_text)} | {per_node} | {flag} | {_cell(o.help)} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m remotemedia.options --markdown``: print the README's options table."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--markdown"]:
        print("usage: python -m remotemedia.options --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
