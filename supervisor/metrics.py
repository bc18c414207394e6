"""Prometheus endpoint (``--metrics-port``): the figures of ``status`` as metrics.

Requires ``prometheus-client`` (``pip install 'remotemedia[metrics]'``). Served from a
background HTTP thread of the supervisor on ``metrics_host:metrics_port`` (loopback by
default). Metric names (labels ``pipeline`` and ``node`` on every ``remotemedia_node_*`` and
``remotemedia_edge_*``, and ``host`` with backend ``ray``; ``source`` is the producing node of
an input edge)::

    remotemedia_node_frames_in_total                  counter  frames taken in
    remotemedia_node_frames_out_total                 counter  frames emitted
    remotemedia_node_process_latency_seconds_bucket{le}  histogram of process() time
    remotemedia_node_process_latency_seconds_sum/_count   (buckets 50 us .. 10 s)
    remotemedia_node_cpu_seconds_total                counter  user+system CPU of the worker
    remotemedia_node_rss_bytes                        gauge    resident memory of the worker
    remotemedia_node_up                               gauge    1 when RUNNING, else 0
    remotemedia_node_restarts_total                   counter  worker restarts (after a crash or kill)
    remotemedia_node_replacements_total               counter  workers replaced on request (restart, reload)
    remotemedia_node_dead_letters_total               counter  poison frames dead-lettered
    remotemedia_node_hang_kills_total                 counter  workers killed for a hang
    remotemedia_node_memory_kills_total               counter  workers killed over max_memory
    remotemedia_edge_queued_frames{source}            gauge    frames in flight on an input edge
    remotemedia_edge_dropped_frames_total{source}     counter  frames dropped by a lossy edge
    remotemedia_build_info{version,python,iceoryx2}   gauge    always 1
    process_* / python_info                                    the supervisor process itself

Every counter and the histogram count from the start of the run, over worker restarts (a
restarted worker counts from 0; the supervisor adds what its predecessor had counted, see
:class:`supervisor.monitor.WorkerSampler`), so ``rate()`` and ``histogram_quantile()`` work
on them. Rates (frames/s, CPU %) and quantiles are PromQL's job, e.g.::

    rate(remotemedia_node_frames_out_total[1m])
    rate(remotemedia_node_cpu_seconds_total[1m])            # cores in use
    histogram_quantile(0.99, sum by (le, node) (rate(remotemedia_node_process_latency_seconds_bucket[5m])))

Latency frames a worker processed after its last heartbeat before it was killed are not
counted (the histogram travels with the heartbeat, once per ``heartbeat_interval``).
"""

from __future__ import annotations

import platform
from typing import Any, Callable, Dict, Iterator, List

from remotemedia.errors import SupervisorError

__all__ = ["serve_metrics", "SupervisorCollector", "build_info"]


def build_info() -> Dict[str, str]:
    """Labels of ``remotemedia_build_info``: the remotemedia, Python and iceoryx2 versions.

    >>> sorted(build_info())
    ['iceoryx2', 'python', 'version']
    """
    from importlib.metadata import PackageNotFoundError, version

    from remotemedia import _ipc_bridge

    try:
        v = version("remotemedia")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from remotemedia import __version__ as v
    return {"version": v, "python": platform.python_version(), "iceoryx2": _ipc_bridge.__iceoryx2_version__}


class SupervisorCollector:
    """Prometheus collector over a status function (the same dict ``status`` serves).

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> registry = CollectorRegistry()
    >>> registry.register(SupervisorCollector(lambda: {"name": "p", "nodes": {}}))
    >>> b"remotemedia_build_info{" in generate_latest(registry)
    True
    """

    def __init__(self, status: Callable[[], Dict[str, Any]]) -> None:
        self.status = status
        self.info = build_info()  # (fixed for the life of the process)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        st = self.status()
        p = st["name"]
        # backend ray: every node's series also says which host it runs on
        by_host = "hosts" in st
        lab = ["pipeline", "node"] + (["host"] if by_host else [])
        counter = lambda name, doc, extra=(): CounterMetricFamily(name, doc, labels=lab + list(extra))  # noqa: E731
        gauge = lambda name, doc, extra=(): GaugeMetricFamily(name, doc, labels=lab + list(extra))  # noqa: E731
        c_in = counter("remotemedia_node_frames_in", "Frames a node has taken in")
        c_out = counter("remotemedia_node_frames_out", "Frames a node has emitted")
        h_lat = HistogramMetricFamily(
            "remotemedia_node_process_latency_seconds", "Time in process() (or a source's generate step) per frame", labels=lab
        )
        c_cpu = counter("remotemedia_node_cpu_seconds", "User and system CPU time of the node's worker processes")
        g_rss = gauge("remotemedia_node_rss_bytes", "Resident memory of the node's worker process")
        g_up = gauge("remotemedia_node_up", "1 when the node's worker is RUNNING")
        c_rst = counter("remotemedia_node_restarts", "Worker restarts after a crash or a kill")
        c_rpl = counter("remotemedia_node_replacements", "Workers replaced on request (restart NODE, reload)")
        c_dl = counter("remotemedia_node_dead_letters", "Poison frames dead-lettered")
        c_hang = counter("remotemedia_node_hang_kills", "Workers killed for a hang (heartbeat_timeout, process_timeout)")
        c_mem = counter("remotemedia_node_memory_kills", "Workers killed for using more than max_memory")
        g_q = gauge("remotemedia_edge_queued_frames", "Frames in flight on an input edge", ["source"])
        c_drop = counter("remotemedia_edge_dropped_frames", "Frames dropped on a lossy input edge", ["source"])
        for node, n in st["nodes"].items():
            l = [p, node] + ([n.get("host") or ""] if by_host else [])
            c_in.add_metric(l, n["frames_in"])
            c_out.add_metric(l, n["frames_out"])
            h = n["latency_histogram"]
            buckets: List[Any] = [(floatToGoString(le), c) for le, c in zip(h["le_s"], h["cumulative"])]
            buckets.append(("+Inf", h["count"]))
            h_lat.add_metric(l, buckets, h["sum_s"])
            c_cpu.add_metric(l, n["cpu_seconds"])
            if n["rss_bytes"] is not None:
                g_rss.add_metric(l, n["rss_bytes"])
            g_up.add_metric(l, 1.0 if n["state"] == "RUNNING" else 0.0)
            c_rst.add_metric(l, n["restarts"])
            c_rpl.add_metric(l, n["replacements"])
            c_dl.add_metric(l, n["dead_letters"])
            c_hang.add_metric(l, n["hang_kills"])
            c_mem.add_metric(l, n["memory_kills"])
            for i in n["inputs"]:
                g_q.add_metric(l + [i["from"]], i["queued"])
                c_drop.add_metric(l + [i["from"]], i["dropped"])
        info = GaugeMetricFamily("remotemedia_build_info", "Versions of remotemedia, Python and iceoryx2; always 1", labels=list(self.info))
        info.add_metric(list(self.info.values()), 1.0)
        yield from (c_in, c_out, h_lat, c_cpu, g_rss, g_up, c_rst, c_rpl, c_dl, c_hang, c_mem, g_q, c_drop, info)


class _Server:
    def __init__(self, httpd: Any, thread: Any) -> None:
        self.httpd, self.thread = httpd, thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def serve_metrics(status: Callable[[], Dict[str, Any]], port: int, host: str = "127.0.0.1") -> _Server:
    """Serve the metrics of ``status`` (and of this process) on ``http://host:port/metrics``
    from a daemon thread; ``shutdown()`` the result to stop it."""
    try:
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
    except ImportError as e:
        raise SupervisorError(
            "--metrics-port needs the prometheus-client package: pip install 'remotemedia[metrics]'"
        ) from e
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SupervisorCollector(status))  # type: ignore[arg-type]
    # The supervisor itself: process_cpu_seconds_total, process_resident_memory_bytes,
    # process_open_fds, ... (from /proc) and python_info. Both only read files when scraped.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise SupervisorError(f"cannot serve metrics on {host}:{port}: {e}") from e
    return _Server(httpd, thread)
