"""The driver of backend ``ray``: the Supervisor a caller gets from ``Supervisor(nodes,
backend="ray")``, ``Pipeline.run(..., backend="ray")`` or ``remotemedia-supervisor start ...
--ray-address ADDR``.

::

    caller (send/recv/run)        driver pump thread                    Ray cluster
    ----------------------        ------------------                    -----------
    send(x) -> EdgeSender per     push(edge, 1, frames) ------------>   HostAgent of the input
               input edge         pull(edge, reply)  <---------------   HostAgent of the output
    recv()  <- EdgeReceiver per   status() of every agent, every 0.5 s  (one per host, placed by
               output edge        (a host silent for host_timeout:        label; state actor on
                                  its agent is killed, Ray restarts it)   the driver's node)

Placement: each host part of the pipeline (:mod:`supervisor.ray.plan`) gets one
:class:`~supervisor.ray.agent.HostAgent`, placed with the label selector
``{"remotemedia.host": <host>}`` (a hard constraint: a node never runs elsewhere), the part of
the nodes without ``host`` on the driver's own Ray node. Status, the report and the end of the
run combine every agent's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Tuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from remotemedia.errors import EndOfStream, RemoteMediaError, SupervisorError
from remotemedia.frames import FrameInfo
from remotemedia.node import Source

from ..channels import split_frame
from ..control import ControlServer
from ..logring import logs_request_error
from ..core import Progress, RunReport, Supervisor, _encode_input, _Outputs
from ..systemd import SystemdNotifier
from .agent import (
    BATCH_BYTES, BATCH_FRAMES, LONG_POLL, PIGGY_WAIT, PIGGY_WAIT_PER_BYTE, RETRY, HostAgent, HostSpec, _Agent, _frame_size, _frames_size, agent_name, pack,
    unpack,
)  # fmt: skip
from .edges import DATA, EOS, EdgeReceiver, EdgeSender
from .plan import CALLER, Part, host_text, plan_parts
from .state import RunState

__all__ = ["RaySupervisor", "LABEL"]

log = logging.getLogger("remotemedia.supervisor")



#: The node label that places a node: ``ray start --labels remotemedia.host=gpu``.
LABEL = "remotemedia.host"
#: Seconds between status polls of the agents.
STATUS_EVERY = 0.5
#: Seconds an output edge whose frames came with a push waits for the next push to carry
#: its next pull before it pulls on its own (a caller sending one frame at a time sends the
#: next one well within this).
CARRIED_IDLE = 0.005
#: ... plus this many seconds per byte of the frames that came, after the output of a lone
#: frame (no other input is waiting for its output): the caller's next frame reaches the next
#: push later when it is big (the caller's copy, the node's, the put). A big lone frame's
#: output comes with its push only so (a pull of its own was always in flight before).
CARRIED_IDLE_PER_BYTE = 2e-9
#: The driver's incarnation (it never restarts: when it dies, the run is over).
DRIVER_INC = 1

_RunState = ray.remote(num_cpus=0, max_restarts=0)(RunState)


#: A node's status before its host's agent first answered.
_EMPTY_NODE: Dict[str, Any] = {
    "state": "STARTING", "pid": None, "restarts": 0, "replacements": 0, "frames_in": 0, "frames_out": 0,
    "fps_in": 0.0, "fps_out": 0.0, "p50_ms": None, "p99_ms": None, "rss_bytes": None, "cpu_percent": None,
    "cpu_seconds": 0.0, "latency_histogram": {"le_s": [], "cumulative": [], "count": 0, "sum_s": 0.0},
    "dead_letters": 0, "memory_kills": 0, "hang_kills": 0, "inputs": [],
}  # fmt: skip


class _Input:
    """An input edge of the pipeline: the driver's sender, and its push in flight."""

    def __init__(self, edge: int, host: Optional[str], sender: EdgeSender) -> None:
        self.edge, self.host, self.sender = edge, host, sender
        self.data: Optional[Future] = None
        self.poll: Optional[Future] = None
        self.retry_at = 0.0


class _Output:
    """An output edge of the pipeline: the driver's receiver, and its pull in flight."""

    def __init__(self, edge: int, host: Optional[str], src: str, receiver: EdgeReceiver) -> None:
        self.edge, self.host, self.src, self.receiver = edge, host, src, receiver
        self.pull: Optional[Future] = None  # a pull of its own, or one a push carries
        self.carried = False  # ... that one
        self.carried_frames = 0  # frames that came with a push (a Ray call less each)
        self.retry_at = 0.0
        self.own_pull_at = 0.0  # no pull of its own before (the next push may carry it)


class _Host:
    """The driver's view of one host's agent."""

    def __init__(self, host: Optional[str], part: Part, handle: Any, local: Any = None) -> None:
        self.host, self.part, self.handle = host, part, handle
        self.local = local  # the driver's host's part (no agent: it runs in this process)
        self.status: Dict[str, Any] = {}
        self.status_call: Optional[Future] = None
        self.answered_at = time.monotonic()
        self.lost_kills = 0  # its agent killed for silence (host_timeout)
        self.killed_at: Optional[float] = None  # ... the last time, until it answers again
        self.report: Optional[Dict[str, Any]] = None


class RaySupervisor(Supervisor):
    """A Supervisor whose nodes run on a Ray cluster, each on the host its ``host`` option
    names (see the README's "Across hosts"). Same API as the local one, less the live
    changes (``restart_node``, ``reload``).

    Example::

        from remotemedia import Pipeline
        from remotemedia.nodes import MapNode

        p = Pipeline([MapNode(decode, name="decode"),
                      MapNode(infer, name="model", options={"host": "gpu"})])
        p.run(frames, backend="ray", ray_address="auto")
    """

    def __init__(self, nodes_or_pipeline: Any, **options: Any) -> None:
        super().__init__(nodes_or_pipeline, **options)
        self.parts = plan_parts(self.pipeline)
        self._options = dict(options)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()  # the pump has work
        self._arrived = threading.Event()  # an output (or the end) may be there for recv()
        self._receiving = 0  # callers waiting in recv()
        self._hosts: Dict[Optional[str], _Host] = {}
        self._inputs: List[_Input] = []
        self._outputs: List[_Output] = []
        self._pending: Deque[Tuple[Any, FrameInfo]] = deque()
        self._state: Any = None
        self._local: Optional[_Agent] = None
        self._send_lock = threading.Lock()  # one send at a time: every input edge numbers it alike
        self._thread: Optional[threading.Thread] = None
        self._started_ray = False
        self._phase = "new"
        self._error: Optional[BaseException] = None
        self._finished = threading.Event()
        self._started_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._stop_deadline: Optional[float] = None
        self._aborting = False
        self._aborted: Optional[str] = None
        self._stopped = False
        self._sent = 0
        self._delivered = 0  # outputs recv() returned
        self._eos_sent = False
        self._control: Optional[ControlServer] = None
        self._metrics_server: Any = None
        self._notifier = SystemdNotifier()
        self._next_notify = 0.0
        self._next_watchdog = 0.0

    # ================================================================ start

    def _connect(self) -> None:
        if ray.is_initialized():
            return
        kw: Dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
        if self.ray_address is None:
            # A cluster of this host alone (for trying a pipeline out): nothing listens beyond
            # this machine's loopback, and the object store stays small.
            kw.update(include_dashboard=False, object_store_memory=256 << 20, _node_ip_address="127.0.0.1")
        else:
            kw["address"] = self.ray_address
        # (a new local cluster turns Ray's token authentication on in os.environ: undone when
        # it is shut down, so that a later connection of this process sees the same settings)
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        ray.init(**kw)
        self._started_ray = True

    def _check_labels(self) -> None:
        wanted = sorted(h for h in self.parts if h is not None)
        if not wanted:
            return
        have = set()
        for n in ray.nodes():
            if n.get("Alive"):
                v = (n.get("Labels") or {}).get(LABEL)
                if v is not None:
                    have.add(v)
        missing = [h for h in wanted if h not in have]
        if missing:
            nodes = [n for n in self.pipeline.order if self._host_of(n) in missing]
            raise SupervisorError(
                f"pipeline {self.name!r}: no Ray node is labelled {', '.join(f'{LABEL}={h}' for h in missing)} "
                f"(for node(s) {', '.join(nodes)}); hosts join with `ray start --address ADDR --labels {LABEL}={missing[0]}`"
                + (f"; the labelled hosts are: {', '.join(sorted(have))}" if have else "")
            )

    def _host_of(self, node: str) -> Optional[str]:
        for h, part in self.parts.items():
            if node in part.nodes:
                return h
        return None

    def start(self) -> "RaySupervisor":
        """Connect to Ray, place one agent per host, wait until every host's part runs."""
        if self._thread is not None:
            raise SupervisorError(f"supervisor of {self.name!r} was already started")
        blobs = self._serialize_nodes()
        self._started_at = time.monotonic()
        self._phase = "booting"
        try:
            self._connect()
            self._check_labels()
            here = ray.get_runtime_context().get_node_id()
            state_name = f"remotemedia/{self.run_id}/state"
            self._state = _RunState.options(
                name=state_name, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)
            ).remote()
            ray.get([
                self._state.put_blobs.remote(host_text(h), {n: blobs[n] for n in part.nodes})
                for h, part in self.parts.items() if h is not None
            ])  # fmt: skip
            local_opts = {k: v for k, v in self._options.items() if k not in ("backend", "ray_address", "host_timeout", "name", "control", "metrics_port", "metrics_host")}
            local_opts.update(control=False)
            sources = [n.name for n in self.pipeline.nodes if isinstance(n, Source)]
            windows = {g: self.node_options.get(dst, self.defaults)["queue_depth"] for g, (_s, dst) in enumerate(self.pipeline.edges())}
            for host, part in self.parts.items():
                spec = HostSpec(
                    run_id=self.run_id,
                    name=self.name,
                    host=host,
                    part=part,
                    blobs={n: blobs[n] for n in part.nodes} if host is None else {},
                    sources=[n for n in part.nodes if n in sources],
                    node_options={n: dict(self.pipeline.node(n).options) for n in part.nodes},
                    supervisor_options=local_opts,
                    state=None if host is None else state_name,
                    windows=windows,
                )
                if host is None:
                    # The driver's host: its part runs here, under a local Supervisor of this
                    # process (the caller's edges to it stay iceoryx2 edges).
                    self._local = _Agent(spec, on_outputs=self._local_outputs, piggyback=self._claim_pulls)
                    self._hosts[host] = _Host(host, part, None, self._local)
                    continue
                handle = HostAgent.options(
                    name=agent_name(self.run_id, host), num_cpus=0, label_selector={LABEL: host}
                ).remote(spec)
                self._hosts[host] = _Host(host, part, handle)
                for local, (g, src) in part.cut_in.items():
                    if src == CALLER:
                        self._inputs.append(_Input(g, host, EdgeSender(g, DRIVER_INC, windows[g])))
                for local, (g, dst) in part.cut_out.items():
                    if dst == CALLER:
                        self._outputs.append(_Output(g, host, part.edges[local][0], EdgeReceiver(g, DRIVER_INC)))
            self._inputs.sort(key=lambda i: i.edge)
            self._outputs.sort(key=lambda o: o.edge)
            timeout = max(self.defaults["init_timeout"], 30.0) + 30.0
            calls = [h.handle.ready.remote(timeout) for h in self._hosts.values() if h.handle is not None]
            failed: List[Any] = []
            if self._local is not None:
                if not self._local.ready.wait(timeout):
                    failed.append(f"host (driver): the part's run did not start within {timeout:g} s")
                elif self._local.error:
                    failed.append(self._local.start_error or self._local.error)
            failed += [e for e in ray.get(calls, timeout=timeout + 30.0) if e]
            for e in failed:  # (a node's own error, NodeInitError..., as the local backend raises it)
                if isinstance(e, BaseException):
                    raise e
            if failed:
                raise SupervisorError(f"pipeline {self.name!r} failed to start: {'; '.join(map(str, failed))}")
        except BaseException:
            self._teardown(abort=True)
            self._phase = "finished"
            self._finished.set()
            raise
        self._phase = "running"
        try:
            if self.control_enabled:
                self._control = ControlServer(self.name, self._on_control)
            if self.metrics_port is not None:
                from ..metrics import serve_metrics

                self._metrics_server = serve_metrics(self.status, self.metrics_port, self.metrics_host)
        except BaseException:
            self._teardown(abort=True)
            self._phase = "finished"
            self._finished.set()
            raise
        self._notifier.notify("READY=1", f"STATUS={self.status_line()}")
        if self._closed_by_user:
            self._close_inputs()
        self._thread = threading.Thread(target=self._loop, name=f"remotemedia-ray-{self.name}", daemon=True)
        self._thread.start()
        return self

    # ================================================================ the caller's side

    def send(self, value: Any, timeout: Optional[float] = None) -> None:
        """Feed one input (see :meth:`Supervisor.send`); it is pushed to the input nodes'
        hosts by the driver's pump."""
        if self._thread is None:
            raise SupervisorError("send() before start(): use `with Supervisor(...) as sup:` or call start()")
        self._raise_if_failed()
        if self._closed_by_user:
            raise SupervisorError("send() after close(): the input stream is closed")
        if not self._input_edges:
            raise SupervisorError(f"pipeline {self.name!r} has no input nodes (every root is a Source); nothing to send to")
        frame = _encode_input(value, "the value given to send()")  # (a value that does not pickle is refused here)
        if not self._try_send(value, frame, None if timeout is None else time.monotonic() + timeout):
            raise TimeoutError(f"send(): the pipeline's inputs stayed full for {timeout} s")

    def _local_gateway(self) -> Any:
        gw = self._local.gw if self._local is not None else None
        return gw if gw is not None and gw.inputs else None

    def _try_send(self, value: Any, frame: Any, deadline: Optional[float]) -> bool:
        """One input to every input edge: those of the driver's host's part through its
        gateway (iceoryx2), those of other hosts' nodes through the driver's senders. False
        when ``deadline`` passed with an edge still full (nothing was sent)."""
        with self._send_lock:
            if not self._wait_room(deadline):
                return False
            gw = self._local_gateway()
            if gw is not None:
                try:
                    gw.send(frame, deadline, self._raise_if_failed)
                except TimeoutError:
                    return False
            self._add_input(value)
        if self._inputs:  # (else the driver's host's part took it: nothing for the pump)
            self._wake.set()
        return True

    def _wait_room(self, deadline: Optional[float]) -> bool:
        with self._cond:
            while not all(i.sender.room() for i in self._inputs):
                self._raise_if_failed()
                if self._finished.is_set() or self._phase in ("draining", "aborting"):
                    raise SupervisorError("send(): the pipeline has stopped")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.1 if left is None else min(0.1, left))
        return True

    def _add_input(self, value: Any) -> None:
        value, stream_id = split_frame(value)
        with self._cond:
            now = time.monotonic_ns()
            for i in self._inputs:
                s = i.sender
                s.add((s.next_seq, DATA, value, self._sent, stream_id or 0, now))
            self._sent += 1

    def _local_outputs(self, got: List[Tuple[Any, FrameInfo]]) -> None:
        """Outputs of the driver's host's part (its pump thread): to the caller's queue."""
        with self._cond:
            self._pending.extend(got)
            self._cond.notify_all()
        self._arrived.set()

    def recv(self, timeout: Optional[float] = None) -> Any:
        return self.recv_frame(timeout)[0]

    def recv_frame(self, timeout: Optional[float] = None) -> Tuple[Any, FrameInfo]:
        if self._thread is None and not self._finished.is_set():
            raise SupervisorError("recv() before start(): use `with Supervisor(...) as sup:` or call start()")
        if self._eos_delivered:
            raise EndOfStream(f"pipeline {self.name!r}: every output has been received")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._arrived.clear()
            with self._cond:
                if not self._pending and not self._finished.is_set():
                    # (while a caller waits here, it takes the answers of the output edges'
                    # pulls itself, not the pump: one thread switch less per frame; the next
                    # pull is the pump's, while the caller has its frame)
                    now = time.monotonic()
                    for o in self._outputs:
                        if o.pull is not None and o.pull.done():
                            self._output_turn(o, now, issue=False)
                            self._wake.set()
                if self._pending:
                    self._delivered += 1
                    return self._pending.popleft()
                if self._error is not None:
                    raise self._error
                if self._all_eos() or self._finished.is_set():
                    self._eos_delivered = True
                    raise EndOfStream(f"pipeline {self.name!r}: every output has been received")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"recv(): no output within {timeout} s")
                self._receiving += 1
            try:
                self._arrived.wait(0.1 if left is None else min(0.1, left))
            finally:
                with self._cond:
                    self._receiving -= 1

    def _all_eos(self) -> bool:
        """Every output edge delivered its end of stream (and the driver's host's part has
        handed over everything it took)."""
        if not all(o.receiver.eos for o in self._outputs):
            return False
        local = self._local
        if local is not None and local.gw is not None and local.gw.outputs:
            arb = local.sup._arbiter if local.sup is not None else None
            return arb is not None and arb.finished.is_set() and not local.gw._pending
        return bool(self._outputs)

    def close(self) -> None:
        if not self._closed_by_user:
            self._closed_by_user = True
            if self._thread is not None:
                self._close_inputs()

    def _close_inputs(self) -> None:
        if self._local is not None and self._local.sup is not None:
            self._local.sup.close()
        with self._cond:
            if self._eos_sent:
                return
            self._eos_sent = True
            for i in self._inputs:
                s = i.sender
                s.add((s.next_seq, EOS, None, self._sent, 0, 0))
        self._wake.set()

    def stop(self) -> None:
        """Drain across hosts: inputs end, every host's sources stop, frames in flight finish
        on every host; abort after ``stop_timeout``."""
        self._closed_by_user = True
        if self._thread is None:
            return
        with self._cond:
            if self._phase != "running":
                return
            self._phase = "draining"
            self._stopped = True
            self._stop_deadline = time.monotonic() + self.stop_timeout
        self._close_inputs()
        for h in self._hosts.values():
            if h.local is not None:
                h.local.drain()
            else:
                h.handle.drain.remote()
        self._wake.set()

    def kill(self) -> None:
        self._closed_by_user = True
        self._abort("kill requested")

    def _abort(self, reason: str) -> None:
        with self._cond:
            if self._aborting or self._finished.is_set():
                return
            self._aborting = True
            if self._aborted is None:
                self._aborted = reason
            self._phase = "aborting"
        for h in self._hosts.values():
            try:
                if h.local is not None:
                    h.local.abort()
                else:
                    h.handle.abort.remote()
            except Exception:
                pass
        self._wake.set()

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()
        self._arrived.set()
        log.error("pipeline %s failed: %s", self.name, err)
        self._abort(f"failed: {err}")

    def join(self, timeout: Optional[float] = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    @property
    def phase(self) -> str:
        return self._phase

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def run(self, inputs: Optional[Iterable[Any]] = None, on_output: Optional[Callable[[Any, FrameInfo], None]] = None) -> RunReport:
        """As :meth:`Supervisor.run`, across hosts."""
        if self._run_called or self._finished.is_set():
            raise SupervisorError(f"run() works once per Supervisor, and the supervisor of {self.name!r} has already run")
        self._run_called = True
        self._check_run_inputs(inputs)
        restore: Callable[[], None] = lambda: None  # noqa: E731
        outputs = _Outputs(on_output)
        try:
            if self._thread is None:
                self.start()
            # (after start(): connecting to Ray installs Ray's own handlers of these signals)
            restore = self._install_signal_handlers()
            feeder = None
            if inputs is not None:
                feeder = threading.Thread(target=self._feed, args=(iter(inputs),), name="remotemedia-ray-feed", daemon=True)
                feeder.start()
            else:
                self.close()
            while True:
                try:
                    value, info = self.recv_frame(0.2)
                except TimeoutError:
                    if self._finished.is_set() and not self._pending:
                        break
                    continue
                except EndOfStream:
                    break
                outputs.deliver(value, info)
            self.join()
            if feeder is not None:
                feeder.join(5.0)
            if self._error is not None:
                raise self._error
            return outputs.report(self)
        except BaseException:
            if self.running:
                self.kill()
                self.join()
            raise
        finally:
            restore()

    def _feed(self, inputs: Any) -> None:
        position = 0
        try:
            for value in inputs:
                if self._closed_by_user or self._finished.is_set():
                    return
                try:
                    frame = _encode_input(value, f"item {position} of run()'s inputs")
                except RemoteMediaError as e:
                    self._fail(e)
                    return
                position += 1
                while not self._try_send(value, frame, time.monotonic() + 0.5):
                    if self._closed_by_user or self._finished.is_set():
                        return
            self.close()
        except SupervisorError:
            return
        except Exception as e:  # noqa: BLE001 - the run fails, explained
            self._fail(SupervisorError(f"the inputs iterator raised {type(e).__name__}: {e}"))

    # (the context manager is Supervisor's, through these two)
    def _started(self) -> bool:
        return self._thread is not None

    def _run_error(self) -> Optional[BaseException]:
        return self._error

    def _install_signal_handlers(self) -> Callable[[], None]:
        """While run() runs: SIGINT, SIGTERM, SIGHUP, SIGQUIT and SIGXCPU drain across hosts
        (a second one aborts), as the local Supervisor's do."""
        import signal

        from ..core import _STOP_SIGNALS

        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        count = [0]

        def handler(signum: int, frame: Any) -> None:
            count[0] += 1
            if count[0] == 1:
                log.warning("%s: %s received, draining across hosts (send it again to abort)", self.name, signal.Signals(signum).name)
                threading.Thread(target=self.stop, daemon=True).start()  # (Ray calls: not in a handler)
            else:
                threading.Thread(target=self._abort, args=("second signal",), daemon=True).start()

        old = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}

        def restore() -> None:
            for sig, h in old.items():
                signal.signal(sig, h)

        return restore

    def restart_node(self, node: str, wait: bool = True, timeout: float = 60.0) -> None:
        raise SupervisorError("restart_node() is not available with backend='ray' (a host's agent restarts its nodes itself)")

    def reload(self, pipeline: Any = None, wait: bool = True, timeout: float = 120.0) -> List[str]:
        raise SupervisorError("reload() is not available with backend='ray'; restart the pipeline")

    # ================================================================ the pump

    def _future(self, ref: Any, pull: bool = False) -> Future:
        fut = ref.future()
        fut.add_done_callback(self._pulled if pull else self._done_call)
        return fut

    def _done_call(self, _fut: Any) -> None:
        # (a Ray thread: no lock may be taken here, the pump holds ours while calling Ray)
        self._wake.set()
        self._arrived.set()

    def _pulled(self, _fut: Any) -> None:
        # A pull answered: a caller waiting in recv() takes it (and wakes the pump for the
        # next pull once it has its frames); the pump only when nobody waits.
        self._arrived.set()
        if not self._receiving:
            self._wake.set()

    def _lone(self) -> bool:
        """Every input sent but the newest has its output (as far as a pipeline with one
        output per input goes: a hint of how long a push may wait for its frame's output,
        never of what is delivered). Under the lock."""
        return self._sent > 0 and self._sent - self._delivered - len(self._pending) <= 1

    def _claim_pulls(self, host: Any, nbytes: int) -> Tuple[Optional[Dict[int, Any]], Optional[Callable[[Any], None]]]:
        """The pulls of the caller's outputs from ``host`` that a push to it (of ``nbytes``
        of frames) may carry now (edge -> its receiver's reply, the frames it takes at most
        and the seconds it waits for them; None: none), and
        ``attach(future of the push, or what its call raised)``, which hands each pull its
        answer out of the push's reply (see HostAgent.push). An output edge has one pull at
        a time, its own or carried: a carried one takes the slot of its own."""
        with self._cond:
            if self._aborting:
                return None, None
            now = time.monotonic()
            finished = self._hosts[host].status.get("finished") if host in self._hosts else False
            mine = [
                o for o in self._outputs
                if o.host == host and o.pull is None and now >= o.retry_at and not (o.receiver.eos and finished)
            ]  # fmt: skip
            if not mine:
                return None, None
            answers: List[Tuple[int, Future]] = []
            for o in mine:
                fut: Future = Future()
                fut.add_done_callback(self._pulled)
                o.pull, o.carried = fut, True
                answers.append((o.edge, fut))
            wait = PIGGY_WAIT + (PIGGY_WAIT_PER_BYTE * nbytes if self._lone() else 0.0)
            pulls = {o.edge: (o.receiver.reply(), BATCH_FRAMES, wait) for o in mine}

        def hand_out(push: Any) -> None:
            try:
                got = unpack(push.result())
                pulled = got[2] if len(got) > 2 else {}
            except BaseException as e:  # noqa: BLE001 - each pull fails as the push did
                for _edge, fut in answers:
                    fut.set_exception(e)
                return
            for edge, fut in answers:
                fut.set_result(pulled.get(edge, ("none", 0, [], None)))

        def attach(push: Any) -> None:
            if isinstance(push, BaseException):
                for _edge, fut in answers:
                    fut.set_exception(push)
            else:
                push.add_done_callback(hand_out)

        return pulls, attach

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait(self._next_wait())
                self._wake.clear()
                self._turn()
                if self._done():
                    break
        except BaseException as e:  # noqa: BLE001 - the caller must see it
            log.exception("pipeline %s: the driver failed", self.name)
            with self._cond:
                if self._error is None:
                    self._error = e if isinstance(e, RemoteMediaError) else SupervisorError(f"the driver failed: {e!r}")
        finally:
            self._teardown(abort=self._aborting or self._error is not None)
            with self._cond:
                self._phase = "finished"
                self._ended_at = time.monotonic()
                self._finished.set()
                self._cond.notify_all()
            self._arrived.set()

    def _next_wait(self) -> float:
        """Seconds the pump may sleep: until an output edge whose last frames came with a
        push pulls on its own again (no push carried its next pull), else 0.05."""
        now = time.monotonic()
        left = 0.05
        for o in self._outputs:
            if o.pull is None and o.own_pull_at > now:
                left = min(left, o.own_pull_at - now)
        return left

    def _turn(self) -> None:
        now = time.monotonic()
        with self._cond:
            changed = False
            for i in self._inputs:
                changed |= self._input_turn(i, now)
            for o in self._outputs:
                if not self._receiving or o.pull is None:  # (else recv() takes the answer)
                    changed |= self._output_turn(o, now)
            if changed:  # (room for send(), outputs for recv())
                self._cond.notify_all()
                self._arrived.set()
        for h in self._hosts.values():
            self._status_turn(h, now)
        if self._control is not None:
            self._control.poll()
        self._notify_turn(now)
        if self._stop_deadline is not None and now > self._stop_deadline and not self._aborting:
            log.warning("pipeline %s: the drain took longer than %.1f s; aborting", self.name, self.stop_timeout)
            self._abort(f"drain timeout ({self.stop_timeout:g} s)")

    def _input_turn(self, i: _Input, now: float) -> bool:
        """Replies of the input edge's calls, and its next push or commit poll; True when a
        reply came (the window may have room)."""
        s = i.sender
        h = self._hosts[i.host]
        changed = False
        for which in ("data", "poll"):
            fut = getattr(i, which)
            if fut is None or not fut.done():
                continue
            setattr(i, which, None)
            changed = True
            try:
                status, reply = unpack(fut.result())[:2]
            except Exception as e:  # noqa: BLE001 - the agent died or restarts: retry
                log.info("pipeline %s: input edge %d to %s: %s; retrying", self.name, i.edge, host_text(i.host), type(e).__name__)
                i.retry_at = now + RETRY
                continue
            s.on_reply(reply, took=(which == "data"))
        if now < i.retry_at or self._aborting:
            return changed
        if i.data is None and s.pending():
            frames = s.batch(BATCH_FRAMES, BATCH_BYTES, _frame_size)
            pulls, attach = self._claim_pulls(i.host, _frames_size(frames)) if len(frames) == 1 else (None, None)
            try:
                msg = pack((i.edge, DRIVER_INC, frames, s.committed, pulls), _frames_size(frames))
                i.data = self._future(h.handle.push.remote(msg))
            except BaseException as e:
                if attach is not None:
                    attach(e)
                raise
            if attach is not None:
                attach(i.data)
        if i.poll is None and i.data is None and s.uncommitted() and not s.pending():
            i.poll = self._future(h.handle.push.remote(pack((i.edge, DRIVER_INC, [], s.committed, None), 0)))
        return changed

    def _output_turn(self, o: _Output, now: float, issue: bool = True) -> bool:
        """The output edge's pull: its frames to the caller's queue, then (``issue``) the next
        pull; True when frames came."""
        r = o.receiver
        h = self._hosts[o.host]
        fut = o.pull
        changed = False
        if fut is not None and fut.done():
            carried, o.pull, o.carried = o.carried, None, False
            try:
                status, inc, frames, _asked = unpack(fut.result())
                if frames and self._sent > 0 and self._sent - self._delivered - len(self._pending) - len(frames) <= 0:
                    # (the output of a lone frame: the next one comes with the caller's next
                    # frame, whose push may carry the next pull, a Ray call less per frame)
                    o.own_pull_at = now + CARRIED_IDLE + CARRIED_IDLE_PER_BYTE * _frames_size(frames)
                elif carried and frames:
                    # (frames came with a push: the next push to that host may well carry
                    # the next pull too)
                    o.own_pull_at = now + CARRIED_IDLE
                if carried and frames:
                    o.carried_frames += len(frames)
            except Exception as e:  # noqa: BLE001 - the agent died or restarts: retry
                log.info("pipeline %s: output edge %d from %s: %s; retrying", self.name, o.edge, host_text(o.host), type(e).__name__)
                o.retry_at = now + RETRY
                fut = None
            else:
                if status == "ok" and frames:
                    try:
                        took = r.on_batch(inc, frames, lambda f: True)
                    except Exception:  # (a stale incarnation's answer: ignored)
                        took = []
                    changed = bool(took)
                    for f in took:
                        if f[1] == DATA:
                            seq, _k, value, origin, stream_id, created_ns = f
                            self._pending.append((value, FrameInfo(seq, origin, stream_id, created_ns, 0, o.src)))
                    # the caller's queue is the end of the line: received is committed
                    r.set_committed(r.expected)
        if issue and o.pull is None and now >= max(o.retry_at, o.own_pull_at) and not self._aborting:
            finished = self._hosts[o.host].status.get("finished")
            if not (r.eos and finished):
                o.pull = self._future(h.handle.pull.remote(pack((o.edge, r.reply(), BATCH_FRAMES, LONG_POLL), 0)), pull=True)
        return changed

    def _status_turn(self, h: _Host, now: float) -> None:
        if h.local is not None:
            if now - h.answered_at >= STATUS_EVERY or not h.status:
                h.answered_at = now
                st = h.local.status()
                h.status = {**st, "state": "up"}
                if st.get("error") and not self._aborting:
                    err = st.get("error_obj")
                    self._fail(err if isinstance(err, BaseException) else SupervisorError(f"host (driver): {st['error']}"))
            return
        fut = h.status_call
        if fut is not None and fut.done():
            h.status_call = None
            try:
                st = fut.result()
            except Exception as e:  # noqa: BLE001 - dead or restarting
                if h.status.get("state") != "restarting":
                    log.warning("pipeline %s: the agent of host %s is not answering (%s)", self.name, host_text(h.host), type(e).__name__)
                h.status = {**h.status, "state": "restarting", "finished": False}
            else:
                h.answered_at = now
                h.killed_at = None
                prev_inc = h.status.get("incarnation")
                h.status = {**st, "state": "up"}
                if prev_inc is not None and st.get("incarnation") != prev_inc:
                    log.warning(
                        "pipeline %s: host %s's agent was restarted (incarnation %s); its nodes resumed from their checkpoint",
                        self.name, host_text(h.host), st.get("incarnation"),
                    )  # fmt: skip
                if st.get("error") and not self._aborting:
                    err = st.get("error_obj")
                    self._fail(err if isinstance(err, BaseException) else SupervisorError(f"host {host_text(h.host)}: {st['error']}"))
        if h.status_call is None and (now - h.answered_at >= STATUS_EVERY or not h.status):
            h.status_call = self._future(h.handle.status.remote())
        running = h.status.get("phase") == "running"  # (a starting agent may be slow to answer)
        if running and now - h.answered_at > self.host_timeout and h.status_call is not None and h.killed_at is None:
            # Lost (or hung): let Ray start its agent again, where the label allows. (Once:
            # until its new incarnation answers, it is starting, not lost.)
            log.warning("pipeline %s: host %s silent for %.0f s: restarting its agent", self.name, host_text(h.host), now - h.answered_at)
            h.lost_kills += 1
            h.killed_at = now
            try:
                ray.kill(h.handle, no_restart=False)
            except Exception:
                pass

    def _notify_turn(self, now: float) -> None:
        """systemd: STATUS from every host's figures; WATCHDOG=1 only while every host's
        agent answers and none of its nodes is hung."""
        n = self._notifier
        if not n.enabled or self._phase not in ("running", "draining"):
            return
        if now >= self._next_notify:
            self._next_notify = now + 2.0
            n.notify(f"STATUS={self.status_line()}")
        wd = n.watchdog_interval
        if wd and now >= self._next_watchdog:
            sick = self.unhealthy_workers()
            if not sick:
                n.notify("WATCHDOG=1")
                self._next_watchdog = now + wd
            else:
                self._next_watchdog = now + min(wd, 0.5)
                log.warning("watchdog withheld: %s", "; ".join(sick))

    def _on_control(self, req: Dict[str, Any]) -> Any:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "stop":
            self.stop()
            return {"ok": True}
        if cmd == "logs":
            fut: Future = Future()

            def gather() -> None:
                try:
                    fut.set_result(self._logs(req))
                except BaseException as e:  # noqa: BLE001 - the requester gets it
                    fut.set_exception(e)
                self._wake.set()

            threading.Thread(target=gather, name="remotemedia-ray-logs", daemon=True).start()
            return fut
        if cmd in ("restart", "reload"):
            return {"ok": False, "error": f"{cmd} is not available with backend ray: restart the pipeline"}
        return {"ok": False, "error": f"unknown command {cmd!r}; use status, stop or logs"}

    def _logs(self, req: Dict[str, Any]) -> Dict[str, Any]:
        """Every host's recent lines of its nodes, merged by time (each line says its host)."""
        error = logs_request_error(req, self.name, self.pipeline.order)
        if error is not None:
            return {"ok": False, "error": error}
        node = req.get("node")
        after = req.get("after") or {}
        calls = []
        answers = []
        for h in self._hosts.values():
            mine = [n for n in h.part.nodes if node is None or n == node]
            if mine:
                sub = dict(req, after={n: after[n] for n in mine if n in after})
                if h.local is not None:
                    answers.append(h.local.logs(sub))
                else:
                    calls.append(h.handle.logs.remote(sub))
        lines: List[Dict[str, Any]] = []
        cursor: Dict[str, int] = {}
        lost: Dict[str, int] = {}
        for got in answers + ray.get(calls, timeout=30.0):
            lines.extend(got.get("lines", []))
            cursor.update(got.get("cursor", {}))
            lost.update(got.get("lost", {}))
        lines.sort(key=lambda e: (e.get("ts") or 0, e.get("n", 0)))
        limit = req.get("lines")
        if limit is not None and len(lines) > limit:
            lines = lines[-limit:] if limit > 0 else []
        return {"ok": True, "lines": lines, "cursor": cursor, "lost": lost}

    @staticmethod
    def _finished_host(h: _Host) -> bool:
        if h.local is not None:
            arb = h.local.sup._arbiter if h.local.sup is not None else None
            return h.local.error is not None or (arb is not None and arb.finished.is_set())
        return bool(h.status.get("finished"))

    def _done(self) -> bool:
        if self._aborting:
            return all(self._finished_host(h) or h.status.get("state") == "restarting" for h in self._hosts.values()) or (
                self._stop_deadline is not None and time.monotonic() > self._stop_deadline + self.kill_timeout
            ) or self._error is not None
        if not self._all_eos():
            return False
        return all(self._finished_host(h) for h in self._hosts.values())

    def _teardown(self, abort: bool) -> None:
        """Shut every agent down (their runs end, their files go), then the state actor."""
        self._notifier.notify("STOPPING=1")
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        calls = []
        for h in self._hosts.values():
            if h.local is not None:
                continue
            try:
                if abort:
                    h.handle.abort.remote()
                calls.append((h, h.handle.shutdown.remote(self.kill_timeout + 5.0)))
            except Exception:
                pass
        local = self._local
        if local is not None:
            if abort:
                local.abort()
            if not local.shutdown(self.stop_timeout + self.kill_timeout + 10.0):
                log.warning("pipeline %s: the driver's host's part did not shut down cleanly", self.name)
            h = self._hosts[None]
            st = local.status()
            h.report, h.status = st.get("report"), {**st, "state": "stopped"}
        for h, ref in calls:
            try:
                ray.get(ref, timeout=self.stop_timeout + self.kill_timeout + 10.0)
            except Exception as e:  # noqa: BLE001
                log.warning("pipeline %s: host %s did not shut down cleanly: %s", self.name, host_text(h.host), e)
        for h in self._hosts.values():
            if h.local is not None:
                continue
            try:
                st = ray.get(h.handle.status.remote(), timeout=5.0)
                h.report = st.get("report")
                h.status = {**st, "state": "stopped"}
            except Exception:
                pass
            try:
                ray.kill(h.handle, no_restart=True)
            except Exception:
                pass
        if self._state is not None:
            try:
                ray.kill(self._state, no_restart=True)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()
            if self._auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._auth_mode
        self._notifier.close()

    # ================================================================ status, report

    def report(self, outputs: Optional[List[Any]] = None) -> RunReport:
        end = self._ended_at or time.monotonic()
        nodes: Dict[str, Dict[str, Any]] = {}
        for h in self._hosts.values():
            for name, r in (h.report or {}).items():
                nodes[name] = {**r, "host": host_text(h.host)}
        return RunReport(
            self.name,
            end - (self._started_at or end),
            outputs or [],
            nodes,
            self._stopped,
            aborted=self._aborted,
        )

    def status(self) -> Dict[str, Any]:
        """Every host's status combined: the nodes (each with its ``host``), and per host its
        agent's incarnation, Ray node and state."""
        nodes: Dict[str, Any] = {}
        hosts: Dict[str, Any] = {}
        for h in self._hosts.values():
            st = h.status
            key = host_text(h.host)
            hosts[key] = {
                "state": st.get("state", "starting"),
                "incarnation": st.get("incarnation"),
                "ray_node_id": st.get("ray_node_id"),
                "agent_pid": st.get("agent_pid"),
                "phase": st.get("phase"),
                "nodes": list(h.part.nodes),
                "lost_kills": h.lost_kills,
            }
            edges = self.pipeline.edges()
            for name in h.part.nodes:
                n = {**_EMPTY_NODE, **((st.get("nodes") or {}).get(name) or {})}
                if st.get("state") == "restarting":
                    n["state"], n["pid"] = "RESTARTING", None
                n["host"] = key
                # the local run's edge numbers and "__input__" for a cut edge -> the pipeline's
                n["inputs"] = [
                    {**i, "edge": h.part.global_index[i["edge"]], "from": edges[h.part.global_index[i["edge"]]][0]}
                    for i in n.get("inputs") or []
                ]
                nodes[name] = n
        return {
            "name": self.name,
            "pid": os.getpid(),
            "run_id": self.run_id,
            "backend": "ray",
            "phase": self._phase,
            "uptime_s": round(time.monotonic() - (self._started_at or time.monotonic()), 3),
            "workers_up": sum(1 for n in nodes.values() if n.get("state") == "RUNNING"),
            "workers": len(nodes),
            "nodes": {n: nodes[n] for n in self.pipeline.order if n in nodes},
            "hosts": hosts,
        }

    def status_line(self) -> str:
        st = self.status()
        return f"{st['workers_up']} of {st['workers']} workers up on {len(st['hosts'])} hosts, phase {st['phase']}"

    def progress(self) -> Progress:
        """The run's progress as of the hosts' last reports (see :meth:`Supervisor.progress`)."""
        st = self.status()
        sources = {n.name for n in self.pipeline.sources}
        generated = sum(n.get("frames_out", 0) for name, n in st["nodes"].items() if name in sources)
        total = sum(self.totals.values()) if self.totals is not None else None
        restarts = sum(n.get("restarts", 0) for n in st["nodes"].values())
        return Progress(generated, total, self._sent, restarts, self._phase)

    def unhealthy_workers(self) -> List[str]:
        """What withholds systemd's WATCHDOG=1: a host whose agent has not answered for a few
        status rounds, and every host's hung workers (a restart under way is not counted)."""
        now = time.monotonic()
        out = []
        for h in self._hosts.values():
            silent = now - h.answered_at
            if h.local is None and silent > 4 * STATUS_EVERY:
                out.append(f"host {host_text(h.host)} silent for {silent:.1f} s")
            out.extend(f"{w} on host {host_text(h.host)}" for w in h.status.get("unhealthy") or [])
        return out

    @property
    def workers(self) -> Dict[str, Any]:
        return {}

    def hosts(self) -> Dict[str, Dict[str, Any]]:
        """Host -> its agent's latest status (incarnation, Ray node, agent pid, nodes)."""
        return {host_text(h.host): dict(h.status) for h in self._hosts.values()}

    def agent(self, host: str) -> Any:
        """The Ray actor handle of ``host``'s agent."""
        return self._hosts[host].handle
