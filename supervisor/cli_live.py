"""The verbs that act on a running pipeline besides ``status`` and ``stop``: ``restart`` a
node, ``reload`` the pipeline file, ``logs`` of the nodes, ``list`` the running pipelines.
They talk to the supervisor over its control socket (:mod:`supervisor.control`).

::

    remotemedia-supervisor list
    remotemedia-supervisor restart cams detector        # no frame lost or repeated
    remotemedia-supervisor reload cams                  # = SIGHUP = systemctl reload
    remotemedia-supervisor logs cams --node detector -n 20 --follow
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import click

from remotemedia.errors import RemoteMediaError

from .cli import EXIT_FAILED, _statuses, main

__all__: List[str] = []


def _fail(message: str) -> None:
    """A refusal or failure of the running pipeline: exit 1. (A bad command line raises
    click.UsageError instead: exit 2, one line, through the group's handler.)"""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILED)


def _endpoint(name: str) -> Tuple[str, int]:
    """(socket path, pid) of running pipeline ``name``; exits 1 when there is none."""
    from .control import find_endpoints, runtime_dir

    eps = find_endpoints(name)
    if not eps:
        running = ", ".join(sorted({n for n, _, _ in find_endpoints()})) or "none"
        _fail(f"no running pipeline named {name!r} (running: {running}; looked in {runtime_dir()})")
    _, path, pid = eps[0]
    return path, pid


def _nodes(name: str) -> Dict[str, Any]:
    """The nodes of running pipeline ``name`` as status shows them (exit 1 when it is not
    running)."""
    return _statuses(name, False)[0]["nodes"]


def _check_node(name: str, node: Optional[str]) -> None:
    """click.UsageError (exit 2) unless ``node`` is None or a node of pipeline ``name``."""
    nodes = _nodes(name)
    if node is not None and node not in nodes:
        raise click.UsageError(f"pipeline {name!r} has no node named {node!r}; its nodes: {', '.join(nodes)}")


def _ask(path: str, req: Dict[str, Any], timeout: float = 5.0) -> Dict[str, Any]:
    from .control import request

    try:
        return request(path, req, timeout=timeout)
    except (OSError, RemoteMediaError, ValueError) as e:
        _fail(f"no answer from the supervisor ({e})")
        raise  # (unreachable)


def _wait_running(name: str, old: Dict[str, Optional[int]], timeout: float) -> Dict[str, Optional[int]]:
    """Until each node of ``old`` (name -> pid before) runs under another pid; the new pids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = _nodes(name)
        new = {n: nodes[n]["pid"] for n in old}
        if all(nodes[n]["state"] == "RUNNING" and new[n] not in (None, old[n]) for n in old):
            return new
        if time.monotonic() > deadline:
            late = ", ".join(f"{n} ({nodes[n]['state']})" for n in old if nodes[n]["state"] != "RUNNING" or new[n] == old[n])
            _fail(f"not RUNNING again within {timeout:g} s: {late}; see `remotemedia-supervisor status`")
        time.sleep(0.1)


@main.command()
@click.argument("name")
@click.argument("node")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait until the new worker is RUNNING.")
def restart(name: str, node: str, timeout: float) -> None:
    """Replace the worker of NODE in running pipeline NAME by a new one, at a commit point:
    it takes no more input, waits until its outputs are committed downstream and exits
    (cleanup() runs); the new one starts right after (initialize() runs, state restored when
    the node has snapshot()/restore()). No frame is lost or processed twice; the other nodes
    go on. Waits until the new worker is RUNNING."""
    path, _ = _endpoint(name)
    _check_node(name, node)
    resp = _ask(path, {"cmd": "restart", "node": node})
    if not resp.get("ok"):
        _fail(str(resp.get("error")))
    new = _wait_running(name, {node: resp.get("pid")}, timeout)
    click.echo(f"restarted {node} of {name}: pid {resp.get('pid')} -> {new[node]}")


@main.command()
@click.argument("name")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds to wait for the file to load and the replaced nodes to be RUNNING.")
def reload(name: str, timeout: float) -> None:
    """Re-read the pipeline file of running pipeline NAME (as SIGHUP does) and replace, at a
    commit point, each node whose code or parameters changed; unchanged nodes are not touched.
    A file that does not load, or that changes the nodes, the connections or an option that
    shapes the edges, is refused (exit 1) and the pipeline goes on as it was: those need a
    restart of the pipeline."""
    path, _ = _endpoint(name)
    before = {n: v["pid"] for n, v in _nodes(name).items()}
    resp = _ask(path, {"cmd": "reload"}, timeout=timeout)
    if not resp.get("ok"):
        _fail(f"reload of {name} refused, the pipeline goes on unchanged: {resp.get('error')}")
    replaced = resp.get("replaced") or []
    if not replaced:
        click.echo(f"reloaded {name}: nothing changed")
        return
    new = _wait_running(name, {n: before.get(n) for n in replaced}, timeout)
    click.echo(f"reloaded {name}: replaced " + ", ".join(f"{n} (pid {before.get(n)} -> {new[n]})" for n in replaced))


def _format_line(e: Dict[str, Any]) -> str:
    ts = e.get("ts")
    when = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}" if isinstance(ts, (int, float)) else "--:--:--"
    host = f" on {e['host']}" if e.get("host") else ""  # (backend ray: the host it ran on)
    return f"{when} {e.get('level', 'INFO'):<7} [{e.get('node')} {e.get('pid')}{host}] {e.get('msg', '')}"


@main.command()
@click.argument("name")
@click.option("--node", help="Only this node's lines (default: every node's).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True,
              help="How many of the most recent lines to show first.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C or the pipeline ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def logs(name: str, node: Optional[str], lines: int, follow: bool, as_json: bool) -> None:
    """Show the recent output of the nodes of running pipeline NAME (log records and
    stdout/stderr lines of their workers, every incarnation, the last 2000 lines per node),
    from the supervisor's memory."""
    path, pid = _endpoint(name)
    _check_node(name, node)
    resp = _ask(path, {"cmd": "logs", "node": node, "lines": lines})
    if not resp.get("ok"):
        _fail(str(resp.get("error")))

    def show(resp: Dict[str, Any]) -> None:
        for n, k in (resp.get("lost") or {}).items():
            click.echo(f"... {k} lines of {n} no longer held", err=True)
        for e in resp["lines"]:
            click.echo(json.dumps(e, default=repr) if as_json else _format_line(e))

    try:
        show(resp)
        cursor = resp.get("cursor") or {}
        while follow:
            time.sleep(0.25)
            try:
                from .control import request

                resp = request(path, {"cmd": "logs", "node": node, "after": cursor})
            except (OSError, RemoteMediaError, ValueError):
                click.echo(f"pipeline {name} (pid {pid}) has ended", err=True)
                return
            if resp.get("ok"):
                if any(resp.get("lost", {}).values()) or resp["lines"]:
                    show(resp)
                cursor = resp.get("cursor") or cursor
    except KeyboardInterrupt:
        return


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_(as_json: bool) -> None:
    """List the running pipelines of this user: name, supervisor pid, phase, nodes up,
    uptime."""
    from .control import find_endpoints, request

    rows = []
    for sup_name, path, pid in find_endpoints():
        try:
            resp = request(path, {"cmd": "status"})
            st = resp["status"] if resp.get("ok") else {}
        except (OSError, RemoteMediaError, ValueError):
            st = {}
        rows.append({
            "name": sup_name, "pid": pid, "phase": st.get("phase"), "workers_up": st.get("workers_up"),
            "workers": st.get("workers"), "uptime_s": st.get("uptime_s"),
        })  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no running pipeline")
        return
    width = max(4, *(len(r["name"]) for r in rows))
    click.echo(f"{'NAME':<{width}} {'PID':>7} {'PHASE':<9} {'UP':>5} {'UPTIME':>9}")
    for r in rows:
        up = f"{r['workers_up']}/{r['workers']}" if r["workers"] is not None else "?"
        uptime = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "?"
        click.echo(f"{r['name']:<{width}} {r['pid']:>7} {r['phase'] or '?':<9} {up:>5} {uptime:>9}")
