"""The Prometheus endpoint follows Prometheus conventions: a real latency histogram, ``_total``
counters that never go down (not even across a worker restart), build_info, and the
supervisor's own process_* metrics."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Tuple

import pytest

from remotemedia import Supervisor
from remotemedia.nodes import PassThroughNode, RangeSource
from supervisor.metrics import SupervisorCollector, build_info, serve_metrics
from supervisor.monitor import WorkerSampler
from supervisor.stats import LATENCY_BUCKETS_S, LatencyStats

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("REMOTEMEDIA_RUNTIME_DIR", str(d))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def families(text: str) -> Dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: Dict[str, Any]) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}


def key(name: str, **labels: str) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def check_conventions(fams: Dict[str, Any]) -> None:
    """What every scrape must satisfy, whatever the figures."""
    for f in fams.values():
        for s in f.samples:
            assert not (f.type == "gauge" and "quantile" in s.labels), f"gauge {s.name} has a quantile label"
            if f.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
    for gone in ("remotemedia_node_frames_per_second", "remotemedia_node_cpu_percent"):
        assert gone not in fams
    h = fams["remotemedia_node_process_latency_seconds"]
    assert h.type == "histogram"
    per_node: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for s in h.samples:
        key = (s.labels["pipeline"], s.labels["node"])
        d = per_node.setdefault(key, {"buckets": []})
        if s.name.endswith("_bucket"):
            d["buckets"].append((float(s.labels["le"]), s.value))
        else:
            d[s.name.rsplit("_", 1)[1]] = s.value
    assert per_node, "no latency histogram at all"
    for key, d in per_node.items():
        les = [le for le, _ in d["buckets"]]
        counts = [c for _, c in d["buckets"]]
        assert les == list(LATENCY_BUCKETS_S) + [float("inf")], key
        assert counts == sorted(counts), f"buckets of {key} are not cumulative: {counts}"
        assert counts[-1] == d["count"], key
        assert d["sum"] >= 0


# --------------------------------------------------------------------------- no processes


def test_latency_stats_count_into_fixed_buckets():
    s = LatencyStats(size=4)
    ns = [10_000, 50_000, 50_001, 3_000_000, 10 * 10**9, 11 * 10**9]
    for v in ns:
        s.add(v)
    h = s.histogram()
    assert len(h["counts"]) == len(LATENCY_BUCKETS_S) + 1
    assert h["counts"][0] == 2  # <= 50 us: a sample on a bound is in that bound's bucket
    assert h["counts"][1] == 1  # (50 us, 100 us]
    assert h["counts"][LATENCY_BUCKETS_S.index(0.005)] == 1
    assert h["counts"][LATENCY_BUCKETS_S.index(10.0)] == 1
    assert h["counts"][-1] == 1  # +Inf
    assert h["sum_ns"] == sum(ns) and sum(h["counts"]) == len(ns)
    # the histogram counts every sample; the quantiles stay over the ring of recent ones
    assert s.summary()["count"] == len(ns) and len(s.ring) == 4


def _stats(counts: List[int], sum_ns: int, dropped: int) -> Dict[str, Any]:
    return {"latency_histogram": {"counts": counts, "sum_ns": sum_ns}, "edges_in": {3: {"dropped": dropped}}}


def test_sampler_sums_heartbeat_figures_over_restarts():
    n = len(LATENCY_BUCKETS_S) + 1
    sm = WorkerSampler()
    seen: List[Dict[str, Any]] = []

    def report(incarnation: int, counts: List[int], sum_ns: int, dropped: int) -> None:
        sm.take_stats(incarnation, _stats(counts + [0] * (n - len(counts)), sum_ns, dropped))
        seen.append(dict(sm.latency_histogram(), dropped=sm.dropped(3)))

    report(1, [2, 1], 300_000, 5)
    report(1, [4, 1], 500_000, 7)  # the same process, later: cumulative, replaces
    report(2, [1], 10_000, 1)  # a restart counts from 0 again: added to the first's last
    report(2, [3, 0, 0, 1], 2_000_000, 2)
    report(4, [0], 0, 0)  # incarnation 3 died before it reported
    last = seen[-1]
    assert last["cumulative"][:4] == [7, 8, 8, 9] and last["count"] == 9
    assert last["sum_s"] == pytest.approx((500_000 + 2_000_000) / 1e9)
    assert last["dropped"] == 9
    for a, b in zip(seen, seen[1:]):  # never down
        assert b["count"] >= a["count"] and b["sum_s"] >= a["sum_s"] and b["dropped"] >= a["dropped"]
        assert all(y >= x for x, y in zip(a["cumulative"], b["cumulative"]))
    assert sm.dropped(99) == 0


def fake_status() -> Dict[str, Any]:
    def node(state: str, cumulative: List[int], inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
        k = len(LATENCY_BUCKETS_S)
        cum = (cumulative + [cumulative[-1]] * k)[:k]
        return {
            "state": state,
            "pid": 1234,
            "restarts": 2,
            "replacements": 5,
            "frames_in": 100,
            "frames_out": 90,
            "fps_in": 12.5,
            "fps_out": 11.0,
            "p50_ms": 0.2,
            "p99_ms": 3.0,
            "rss_bytes": 50_000_000,
            "cpu_percent": 37.5,
            "cpu_seconds": 4.25,
            "latency_histogram": {"le_s": list(LATENCY_BUCKETS_S), "cumulative": cum, "count": cum[-1] + 1, "sum_s": 12.5},
            "dead_letters": 1,
            "memory_kills": 3,
            "hang_kills": 4,
            "inputs": inputs,
        }

    return {
        "name": "pipe",
        "nodes": {
            "src": node("RUNNING", [5, 9], []),
            "enc": node("BACKOFF", [0, 0, 2], [{"edge": 0, "from": "src", "policy": "block", "depth": 8, "queued": 6, "dropped": 17}]),
        },
    }


def test_collector_exports_conventional_families_from_a_status_dict():
    registry = CollectorRegistry()
    registry.register(SupervisorCollector(fake_status))
    fams = families(generate_latest(registry).decode())
    check_conventions(fams)
    got = samples(fams)
    enc = (("node", "enc"), ("pipeline", "pipe"))
    assert got[("remotemedia_node_frames_in_total", enc)] == 100
    assert got[("remotemedia_node_frames_out_total", enc)] == 90
    assert got[("remotemedia_node_restarts_total", enc)] == 2
    assert got[("remotemedia_node_replacements_total", enc)] == 5
    assert got[("remotemedia_node_dead_letters_total", enc)] == 1
    assert got[("remotemedia_node_memory_kills_total", enc)] == 3
    assert got[("remotemedia_node_hang_kills_total", enc)] == 4
    assert got[("remotemedia_node_cpu_seconds_total", enc)] == 4.25
    assert got[("remotemedia_node_rss_bytes", enc)] == 50_000_000
    assert got[("remotemedia_node_up", enc)] == 0 and got[("remotemedia_node_up", (("node", "src"), ("pipeline", "pipe")))] == 1
    bucket = lambda le: got[key("remotemedia_node_process_latency_seconds_bucket", node="enc", pipeline="pipe", le=le)]  # noqa: E731
    assert bucket("5e-05") == 0 and bucket("0.00025") == 2 and bucket("10.0") == 2 and bucket("+Inf") == 3
    assert got[("remotemedia_node_process_latency_seconds_count", enc)] == 3
    assert got[("remotemedia_node_process_latency_seconds_sum", enc)] == 12.5
    edge = (("node", "enc"), ("pipeline", "pipe"), ("source", "src"))
    assert got[("remotemedia_edge_queued_frames", edge)] == 6
    assert got[("remotemedia_edge_dropped_frames_total", edge)] == 17
    assert fams["remotemedia_edge_queued_frames"].type == "gauge"
    info = fams["remotemedia_build_info"]
    assert info.type == "gauge" and [s.value for s in info.samples] == [1.0]
    assert info.samples[0].labels == build_info()
    from remotemedia import _ipc_bridge

    assert info.samples[0].labels["iceoryx2"] == _ipc_bridge.__iceoryx2_version__


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_the_endpoint_serves_the_supervisors_own_process_metrics():
    port = free_port()
    server = serve_metrics(fake_status, port)
    try:
        fams = families(scrape(port))
    finally:
        server.shutdown()
    check_conventions(fams)
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "python_info"):
        assert name in fams, name
    got = samples(fams)
    assert got[("process_cpu_seconds_total", ())] > 0
    assert got[("process_resident_memory_bytes", ())] > 0


# --------------------------------------------------------------------------- a real run


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


MONOTONIC = (
    "remotemedia_node_frames_in_total",
    "remotemedia_node_frames_out_total",
    "remotemedia_node_process_latency_seconds_bucket",
    "remotemedia_node_process_latency_seconds_count",
    "remotemedia_node_process_latency_seconds_sum",
    "remotemedia_node_cpu_seconds_total",
    "remotemedia_node_restarts_total",
    "remotemedia_node_dead_letters_total",
    "remotemedia_node_hang_kills_total",
    "remotemedia_node_memory_kills_total",
    "remotemedia_edge_dropped_frames_total",
)


@pytest.mark.slow
def test_counters_never_go_down_across_a_worker_restart(runtime_dir):
    port = free_port()
    sup = Supervisor(
        [RangeSource(10**9, name="src"), PassThroughNode(name="p")], name="m", metrics_port=port, backoff_base=0.05
    )
    t = threading.Thread(target=lambda: sup.run(on_output=lambda v, i: None), daemon=True)
    t.start()
    scrapes: List[Samples] = []
    errors: List[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        # scrapes all along: before the kill, while p is down, while it restarts, after
        while not stop.is_set():
            try:
                fams = families(scrape(port))
            except urllib.error.URLError:
                time.sleep(0.05)
                continue  # the endpoint starts with the supervisor's thread
            try:
                check_conventions(fams)
            except BaseException as e:  # noqa: BLE001 - reported by the test's thread
                errors.append(e)
                return
            scrapes.append(samples(fams))
            time.sleep(0.02)

    s = threading.Thread(target=scraper, daemon=True)
    s.start()
    p_lab = (("node", "p"), ("pipeline", "m"))
    count = lambda: scrapes[-1].get(("remotemedia_node_process_latency_seconds_count", p_lab), 0) if scrapes else 0  # noqa: E731
    cpu = lambda: scrapes[-1].get(("remotemedia_node_cpu_seconds_total", p_lab), 0) if scrapes else 0  # noqa: E731
    try:
        # Latency arrives with p's first heartbeat, CPU time with its samples; p runs until
        # it has used more CPU than its replacement can before that is first sampled.
        wait_for(lambda: count() > 0 and cpu() >= 2.0, "latency and 2 s of CPU time of p")
        before = scrapes[-1]
        assert before[("remotemedia_node_process_latency_seconds_sum", p_lab)] > 0
        assert before[("remotemedia_node_up", p_lab)] == 1
        pid = sup.worker_pids()["p"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: sup.worker_pids().get("p") not in (None, pid) and sup.states().get("p") == "RUNNING", "p restarted")
        # the new process has reported (a heartbeat) and counted beyond what the dead one had
        n_restart = len(scrapes)
        wait_for(
            lambda: len(scrapes) > n_restart + 1
            and count() > before[("remotemedia_node_process_latency_seconds_count", p_lab)]
            and scrapes[-1][("remotemedia_node_restarts_total", p_lab)] == 1
            and scrapes[-1][("remotemedia_node_up", p_lab)] == 1
            and cpu() > before[("remotemedia_node_cpu_seconds_total", p_lab)] + 0.3,
            "p's new process counting",
        )
        # status keeps its quantiles (p50/p99), frames/s and CPU % for the table, next to the totals
        node = sup.status()["nodes"]["p"]
        assert node["restarts"] == 1 and node["latency_histogram"]["count"] >= count()
        assert node["p50_ms"] is not None and {"p99_ms", "cpu_percent", "fps_out", "cpu_seconds"} <= set(node)
    finally:
        stop.set()
        s.join(30)
        sup.stop()
        t.join(60)
    assert not t.is_alive()
    assert not errors, errors[0]
    assert len(scrapes) > 2
    for a, b in zip(scrapes, scrapes[1:]):
        for key, v in a.items():
            if key[0] in MONOTONIC:
                assert b[key] >= v, f"{key} went down from {v} to {b[key]}"
    last = scrapes[-1]
    assert last[("remotemedia_node_frames_in_total", p_lab)] > before[("remotemedia_node_frames_in_total", p_lab)]
    assert last[("remotemedia_node_cpu_seconds_total", p_lab)] >= before[("remotemedia_node_cpu_seconds_total", p_lab)]
    info = [k for k in last if k[0] == "remotemedia_build_info"]
    assert len(info) == 1 and last[info[0]] == 1
    assert last[("process_resident_memory_bytes", ())] > 0
