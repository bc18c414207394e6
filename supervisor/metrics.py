"""Prometheus endpoint (``--metrics-port``): the figures of ``status`` as metrics.

Requires ``prometheus-client`` (``pip install 'remotemedia[metrics]'``). Served from a
background HTTP thread of the supervisor on ``metrics_host:metrics_port`` (loopback by
default). Metric names::

    remotemedia_node_frames_in_total{pipeline,node}      counter
    remotemedia_node_frames_out_total{pipeline,node}     counter
    remotemedia_node_restarts_total{pipeline,node}       counter
    remotemedia_node_dead_letters_total{pipeline,node}   counter
    remotemedia_node_up{pipeline,node}                   gauge 1 when RUNNING
    remotemedia_node_frames_per_second{pipeline,node}    gauge
    remotemedia_node_process_latency_seconds{pipeline,node,quantile="0.5"|"0.99"}
    remotemedia_node_rss_bytes{pipeline,node}            gauge
    remotemedia_node_cpu_percent{pipeline,node}          gauge
    remotemedia_edge_queued_frames{pipeline,node,source} gauge
    remotemedia_edge_dropped_frames_total{pipeline,node,source} counter
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator

from remotemedia.errors import SupervisorError

__all__ = ["serve_metrics", "SupervisorCollector"]


class SupervisorCollector:
    """Prometheus collector over a status function (the same dict ``status`` serves)."""

    def __init__(self, status: Callable[[], Dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.status()
        p = st["name"]
        lab = ["pipeline", "node"]
        c_in = CounterMetricFamily("remotemedia_node_frames_in", "Frames a node has taken in", labels=lab)
        c_out = CounterMetricFamily("remotemedia_node_frames_out", "Frames a node has emitted", labels=lab)
        c_rst = CounterMetricFamily("remotemedia_node_restarts", "Worker restarts", labels=lab)
        c_dl = CounterMetricFamily("remotemedia_node_dead_letters", "Poison frames dead-lettered", labels=lab)
        g_up = GaugeMetricFamily("remotemedia_node_up", "1 when the node's worker is RUNNING", labels=lab)
        g_fps = GaugeMetricFamily("remotemedia_node_frames_per_second", "Frames emitted per second", labels=lab)
        g_lat = GaugeMetricFamily(
            "remotemedia_node_process_latency_seconds", "process() latency over recent frames", labels=lab + ["quantile"]
        )
        g_rss = GaugeMetricFamily("remotemedia_node_rss_bytes", "Resident memory of the worker", labels=lab)
        g_cpu = GaugeMetricFamily("remotemedia_node_cpu_percent", "CPU use of the worker", labels=lab)
        g_q = GaugeMetricFamily("remotemedia_edge_queued_frames", "Frames in flight on an input edge", labels=lab + ["source"])
        c_drop = CounterMetricFamily("remotemedia_edge_dropped_frames", "Frames dropped on a lossy input edge", labels=lab + ["source"])
        for node, n in st["nodes"].items():
            l = [p, node]
            c_in.add_metric(l, n["frames_in"])
            c_out.add_metric(l, n["frames_out"])
            c_rst.add_metric(l, n["restarts"])
            c_dl.add_metric(l, n["dead_letters"])
            g_up.add_metric(l, 1.0 if n["state"] == "RUNNING" else 0.0)
            g_fps.add_metric(l, n["fps_out"])
            for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
                if n[key] is not None:
                    g_lat.add_metric(l + [q], n[key] / 1000.0)
            if n["rss_bytes"] is not None:
                g_rss.add_metric(l, n["rss_bytes"])
            if n["cpu_percent"] is not None:
                g_cpu.add_metric(l, n["cpu_percent"])
            for i in n["inputs"]:
                g_q.add_metric(l + [i["from"]], i["queued"])
                c_drop.add_metric(l + [i["from"]], i["dropped"])
        yield from (c_in, c_out, c_rst, c_dl, g_up, g_fps, g_lat, g_rss, g_cpu, g_q, c_drop)


class _Server:
    def __init__(self, httpd: Any, thread: Any) -> None:
        self.httpd, self.thread = httpd, thread

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def serve_metrics(status: Callable[[], Dict[str, Any]], port: int, host: str = "127.0.0.1") -> _Server:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError as e:
        raise SupervisorError(
            "--metrics-port needs the prometheus-client package: pip install 'remotemedia[metrics]'"
        ) from e
    registry = CollectorRegistry(auto_describe=True)
    registry.register(SupervisorCollector(status))  # type: ignore[arg-type]
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise SupervisorError(f"cannot serve metrics on {host}:{port}: {e}") from e
    return _Server(httpd, thread)
