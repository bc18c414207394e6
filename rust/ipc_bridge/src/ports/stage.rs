//! The stage loop: the frames of a worker taken, processed and sent without a line of Python
//! besides the node's own `process()` (or a source's `generate()`).
//!
//! ```text
//!   Runner.run (Python)                    StageLoop.serve (here), GIL released while waiting
//!   -------------------                    -----------------------------------------------
//!   once per hand-back: control, commit    loop:
//!   point (ledger mark/advance), commit      acks from downstream (poll); a commit or a
//!   report, heartbeat, gaps, resends    <--    resend is the runner's -> hand back
//!   -> serve() again                         run: up to N frames or T ns, each:
//!                                              every output has room? -> take (round robin)
//!                                              decoded by the subscriber (array, media frame)
//!                                              -> status block busy -> process(data)
//!                                              -> bare array / scalar / media frame on one
//!                                                 output edge: sent here; else emit_result
//!                                              -> status block idle, processed[edge] = seq
//!                                                 (written to the dict once per batch)
//!                                              anything else taken (a new encoding, an end
//!                                              of stream) goes to handle_frame (Python)
//!                                            flow-control acks upstream (committed half as
//!                                            the runner last reported it)
//!                                            hand back: slice over, timeout, control fd
//!                                            readable, Python ran, gap, all inputs ended
//!                                            wait (spin, then ppoll) on inputs, or on the
//!                                            acks of a full output
//! ```
//!
//! Python decides when this loop may run (a lazily framed Node, no recorded input order, no
//! frames to skip, no gap to answer) and keeps every policy: errors, restarts, commits.

use std::sync::Mutex;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString};

use super::inport::InPort;
use crate::container::Codec;
use super::outport::OutPort;
use super::KIND_DATA;
use crate::event::Listener;
use crate::pubsub::{monotonic_ns, Subscriber, Taken};

/// Fields of the worker's status block (`supervisor/scoreboard.py`), as 64-bit word indexes.
const BUSY_SINCE: usize = 1;
const BUSY_EDGE: usize = 2;
const BUSY_SEQ: usize = 3;
const FRAMES_IN: usize = 4;
const FRAMES_OUT: usize = 5;

/// `(count, total_ns, max_ns, per-bucket counts, samples)`: `LatencyStats.merge()`'s arguments.
type LatencyBatch = (u64, u64, u64, Vec<u64>, Vec<u64>);

/// process() durations counted as `supervisor.stats.LatencyStats` counts them (its bucket
/// bounds), handed over per batch.
struct Latencies {
    bounds: Vec<u64>,
    count: u64,
    total: u64,
    max: u64,
    buckets: Vec<u64>,
    samples: Vec<u64>,
}

impl Latencies {
    fn new(bounds: Vec<u64>) -> Self {
        let n = bounds.len() + 1; // (+Inf)
        Latencies { bounds, count: 0, total: 0, max: 0, buckets: vec![0; n], samples: Vec::with_capacity(64) }
    }

    fn push(&mut self, ns: u64) {
        self.count += 1;
        self.total += ns;
        self.max = self.max.max(ns);
        // (bisect_left: a sample equal to a bound belongs to that bound's bucket, le = "<=")
        self.buckets[self.bounds.partition_point(|&b| b < ns)] += 1;
        self.samples.push(ns);
    }

    fn take(&mut self) -> Option<LatencyBatch> {
        if self.count == 0 {
            return None;
        }
        let n = self.buckets.len();
        let out = (self.count, self.total, self.max, std::mem::replace(&mut self.buckets, vec![0; n]), std::mem::take(&mut self.samples));
        self.count = 0;
        self.total = 0;
        self.max = 0;
        Some(out)
    }
}

/// A worker's status block, mapped by Python (kept alive through `owner`).
struct Board {
    words: *mut i64,
    len: usize,
    _owner: Py<PyAny>,
}

unsafe impl Send for Board {}
unsafe impl Sync for Board {}

impl Board {
    #[inline]
    fn set(&self, i: usize, v: i64) {
        debug_assert!(i < self.len);
        // (plain stores the supervisor reads whenever it wants: see scoreboard.py)
        unsafe { std::ptr::write_volatile(self.words.add(i), v) };
    }
}

/// `(seq, origin, stream_id, created_ns, sent_ns, input index)` of the frame in process().
type FrameNow = (u64, u64, u64, u64, u64, usize);

/// The frame a stage's process() has in hand. The node's `current_frame` asks it (through
/// `Node._remotemedia_frame_of`, set by the runner) only when process() wants to know, instead
/// of the loop setting an attribute on the node twice per frame.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct FrameSlot {
    now: Mutex<Option<FrameNow>>,
    /// the producing node of each input
    srcs: Vec<Py<PyAny>>,
}

impl FrameSlot {
    fn set(&self, frame: Option<FrameNow>) {
        *self.now.lock().expect("frame slot poisoned") = frame;
    }
}

#[pymethods]
impl FrameSlot {
    /// `(seq, origin, stream_id, created_ns, sent_ns, source node)` of the frame being
    /// processed; None outside process().
    fn __call__(&self, py: Python<'_>) -> Option<(u64, u64, u64, u64, u64, Py<PyAny>)> {
        let now = *self.now.lock().expect("frame slot poisoned");
        now.map(|(seq, origin, stream, created, sent, j)| (seq, origin, stream, created, sent, self.srcs[j].clone_ref(py)))
    }
}

/// Frames in and out of a worker: the base of `supervisor.worker.counters.Counters`, so that
/// the loop bumps them per frame without Python's attribute protocol (Python code still
/// reads and writes them as attributes).
#[pyclass(module = "remotemedia._ipc_bridge", subclass)]
#[derive(Default)]
pub struct FrameCounts {
    #[pyo3(get, set)]
    pub frames_in: u64,
    #[pyo3(get, set)]
    pub frames_out: u64,
}

#[pymethods]
impl FrameCounts {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, pyo3::types::PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        Self::default()
    }
}

/// The frame loop of one stage worker (see the module doc).
#[pyclass(module = "remotemedia._ipc_bridge", name = "StageLoop")]
pub struct StageLoop {
    inputs: Vec<Py<InPort>>,
    outputs: Vec<Py<OutPort>>,
    process: Py<PyAny>,
    /// Runner callbacks: emit_result(result) (with origin/stream/created set on the emitter),
    /// handle_frame(port, sample), failed(seq, origin, exc) -> True when the loop must stop,
    /// halted() -> True when the runner failed or hands over.
    emitter: Py<PyAny>,
    handle_frame: Py<PyAny>,
    failed: Py<PyAny>,
    halted: Py<PyAny>,
    /// emitter.loans (arrays allocate() handed out: the fast send is not for them)
    loans: Py<PyDict>,
    /// ledger.processed: edge -> last processed seq
    processed: Py<PyDict>,
    /// per input: the last seq processed since `processed` was last written (one dict write
    /// per batch, not per frame; written before any Python runs and at the end of run())
    processed_now: Vec<Option<u64>>,
    counters: Py<FrameCounts>,
    ndarray: Py<PyAny>,
    dumps: Py<PyAny>,
    protocol: i32,
    board: Option<Board>,
    codec: Codec,
    rr: usize,
    /// (origin, stream, created) of the last frame the emitter was not told of
    last_origin: Option<(u64, u64, u64)>,
    /// process() durations of the frames since the last `take_latencies()`
    latencies: Latencies,
    /// The frame process() has in hand, for the node's `current_frame` (see FrameSlot).
    frame: Py<FrameSlot>,
    /// Python ran a frame's way (the emitter, handle_frame, a failure) since `serve()` began:
    /// the runner's state may have changed, so `serve()` hands back.
    python_turn: bool,
}

type Subs = Vec<Py<Subscriber>>;

/// When `serve()` hands back to the runner: at its timeout, once frames went through and a
/// commit report is due (a producer's loaned chunks wait for it), `slice_ns` after the first
/// frame, `lull_ns` after the last.
struct Turn {
    until: u64,
    commit_at: u64,
    slice_ns: u64,
    lull_ns: u64,
    slice_end: u64,
    lull_end: u64,
}

impl Turn {
    fn new(timeout: f64, commit_in: f64, slice_ns: u64, lull_ns: u64) -> Self {
        let start = monotonic_ns();
        let at = |s: f64| start.saturating_add((s.max(0.0) * 1e9) as u64);
        Turn { until: at(timeout), commit_at: at(commit_in), slice_ns, lull_ns, slice_end: u64::MAX, lull_end: u64::MAX }
    }

    /// After a step of `n` frames, at `now`: until when to wait for more; None: hand back.
    fn next(&mut self, n: usize, now: u64) -> Option<u64> {
        if n > 0 {
            if now >= self.commit_at {
                return None;
            }
            if self.slice_end == u64::MAX {
                self.slice_end = now.saturating_add(self.slice_ns);
            }
            self.lull_end = now.saturating_add(self.lull_ns);
        }
        let end = self.until.min(self.slice_end).min(self.lull_end);
        (now < end).then_some(end)
    }
}

/// How a wait of `serve()` ended.
enum Woke {
    Notified,
    /// one of the runner's file descriptors (its control channel) is readable
    Fds,
    /// the time is up, or a signal (the runner looks)
    Timeout,
}

/// The inbox's wait for at most `ns`, spinning on `watch` (when there is one to watch); `room`:
/// it waits for room (acks that make room must wake it; else they need not).
fn wait_until(
    py: Python<'_>,
    inbox: &Bound<'_, Listener>,
    fds: &[i32],
    ns: u64,
    spin_us: u64,
    watch: Vec<Py<Subscriber>>,
    room: bool,
) -> PyResult<Woke> {
    let spin = if watch.is_empty() { 0 } else { spin_us };
    let (notified, ready) = inbox.get().wait(py, Some(ns as f64 / 1e9), fds.to_vec(), spin, watch, room)?;
    Ok(if !ready.is_empty() {
        Woke::Fds
    } else if notified {
        Woke::Notified
    } else {
        Woke::Timeout
    })
}

impl StageLoop {
    fn outputs_have_room(&self, py: Python<'_>) -> bool {
        self.outputs.iter().all(|p| p.borrow(py).has_room())
    }

    /// The next frame of the inputs, round robin: (input index, frame), None when none waits.
    fn next_frame(&mut self, py: Python<'_>) -> PyResult<Option<(usize, Taken)>> {
        let n = self.inputs.len();
        for i in 0..n {
            let j = (self.rr + i) % n;
            let got = {
                let mut port = self.inputs[j].borrow_mut(py);
                if port.books.eos {
                    continue;
                }
                port.take_next(py)?
            };
            let Some(got) = got else { continue };
            if n > 1 {
                self.rr = (j + 1) % n;
            }
            return Ok(Some((j, got)));
        }
        Ok(None)
    }

    /// The emitter's idea of the input being processed: its outputs (and those of a later
    /// flush()) inherit origin, stream and creation time.
    fn set_origin(&mut self, py: Python<'_>, origin: u64, stream_id: u64, created_ns: u64) -> PyResult<()> {
        self.last_origin = None;
        let em = self.emitter.bind(py);
        em.setattr(intern!(py, "origin"), origin)?;
        em.setattr(intern!(py, "stream"), stream_id)?;
        em.setattr(intern!(py, "created"), created_ns)
    }

    /// Wakes the consumers of the frames sent since the last wake-up.
    fn flush_outputs(&self, py: Python<'_>) -> PyResult<()> {
        for p in &self.outputs {
            p.borrow_mut(py).flush(py)?;
        }
        Ok(())
    }

    /// The acks flow control needs (Ledger.advance's, with the committed half unchanged: only
    /// the runner's commit report moves it): every `ack_every` frames or `notify_every`, and
    /// with `idle` whatever was processed (the producer may be waiting for it).
    fn ack_inputs(&self, py: Python<'_>, ack_every: u64, idle: bool) -> PyResult<()> {
        let processed = self.processed.bind(py);
        for p in &self.inputs {
            let mut port = p.borrow_mut(py);
            let Some(last) = processed.get_item(port.index())? else { continue };
            let n = (last.extract::<i64>()? + 1).max(0) as u64;
            let ahead = n.saturating_sub(port.books.acked_processed);
            if ahead > 0 && (idle || ahead >= ack_every || ahead >= port.books.notify_every) {
                let committed = port.books.acked_committed;
                port.send_ack(py, n, committed, false)?;
            }
        }
        Ok(())
    }

    /// Takes the acks of every output; true when one has a frame to resend or a commit came
    /// back (the runner's job: its commit point may move).
    fn poll_outputs(&self, py: Python<'_>) -> PyResult<bool> {
        let mut runner = false;
        for o in &self.outputs {
            let mut port = o.borrow_mut(py);
            let committed = port.committed_seq();
            port.poll(py)?;
            runner |= port.undelivered_any() || port.committed_seq() != committed;
        }
        Ok(runner)
    }

    /// The ack subscribers of the outputs without room.
    fn blocked_acks(&self, py: Python<'_>, acks: &[Py<Subscriber>]) -> Vec<Py<Subscriber>> {
        self.outputs.iter().zip(acks).filter(|(o, _)| !o.borrow(py).has_room()).map(|(_, a)| a.clone_ref(py)).collect()
    }

    /// The iceoryx2 subscribers of the inputs and of the outputs' acks; None when a port has
    /// a Python transport.
    fn iox_subs(&self, py: Python<'_>) -> Option<(Subs, Subs)> {
        let subs: Option<Vec<_>> = self.inputs.iter().map(|p| p.borrow(py).iox_sub(py)).collect();
        let acks: Option<Vec<_>> = self.outputs.iter().map(|p| p.borrow(py).iox_ack_sub(py)).collect();
        Some((subs?, acks?))
    }

    /// What the inputs ask of the runner: (every input ended, a gap or duplicates to answer).
    fn inputs_state(&self, py: Python<'_>) -> (bool, bool) {
        let mut ended = true;
        let mut attention = false;
        for p in &self.inputs {
            let b = &p.borrow(py).books;
            ended &= b.eos;
            attention |= b.gap_since.is_some() || b.dup_pending;
        }
        (ended, attention)
    }

    /// Writes the seqs processed since the last write into `processed` (before Python runs:
    /// the runner reads it).
    fn sync_processed(&mut self, py: Python<'_>) -> PyResult<()> {
        for (j, last) in self.processed_now.iter_mut().enumerate() {
            if let Some(seq) = last.take() {
                self.processed.bind(py).set_item(self.inputs[j].borrow(py).index(), seq)?;
            }
        }
        Ok(())
    }

    /// frames_in + 1, counted; the new count.
    fn count_in(&self, py: Python<'_>) -> u64 {
        let mut c = self.counters.borrow_mut(py);
        c.frames_in += 1;
        c.frames_in
    }

    /// `run()`'s loop (`processed` is written by the caller).
    fn run_frames(&mut self, py: Python<'_>, max_frames: usize, max_ns: u64) -> PyResult<usize> {
        let until = monotonic_ns() + max_ns;
        let mut steps = 0;
        while steps < max_frames {
            if !self.outputs_have_room(py) {
                break;
            }
            let Some((j, got)) = self.next_frame(py)? else { break };
            steps += 1;
            let go_on = match got {
                Taken::Decoded(data, seq, origin, stream, created, sent) => {
                    self.run_frame(py, j, data, seq, origin, stream, created, sent)?
                }
                Taken::Sample(sample) => {
                    if super::transport::sample_info(py, sample.bind(py))?.1 == super::KIND_EOS {
                        continue; // (the port marked its input ended)
                    }
                    let port = self.inputs[j].clone_ref(py);
                    self.python_turn = true;
                    self.flush_outputs(py)?;
                    self.sync_processed(py)?;
                    self.handle_frame.bind(py).call1((port, sample))?;
                    !self.halted.bind(py).call0()?.is_truthy()?
                }
            };
            if !go_on || (steps > 1 && monotonic_ns() >= until) {
                break;
            }
        }
        self.flush_outputs(py)?;
        if let Some((origin, stream_id, created_ns)) = self.last_origin {
            self.set_origin(py, origin, stream_id, created_ns)?;
        }
        Ok(steps)
    }

    /// One decoded frame through process() and out; Ok(false) when the loop must stop.
    #[allow(clippy::too_many_arguments)]
    fn run_frame(
        &mut self,
        py: Python<'_>,
        j: usize,
        data: Py<PyAny>,
        seq: u64,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        sent_ns: u64,
    ) -> PyResult<bool> {
        let edge = self.inputs[j].borrow(py).index();
        let frames_in = self.count_in(py);
        self.frame.get().set(Some((seq, origin, stream_id, created_ns, sent_ns, j)));
        if let Some(b) = &self.board {
            b.set(BUSY_EDGE, edge as i64);
            b.set(BUSY_SEQ, seq as i64);
            b.set(BUSY_SINCE, monotonic_ns() as i64);
        }
        self.last_origin = Some((origin, stream_id, created_ns));
        let t0 = monotonic_ns();
        let mut python_ran = false;
        let outcome = self.process_and_send(py, data, origin, stream_id, created_ns, &mut python_ran);
        self.latencies.push(monotonic_ns().saturating_sub(t0));
        self.frame.get().set(None);
        if let Some(b) = &self.board {
            b.set(BUSY_SINCE, 0);
            b.set(FRAMES_IN, frames_in as i64);
        }
        let mut go_on = true;
        self.python_turn |= python_ran || outcome.is_err();
        if let Err(e) = outcome {
            // (raises again what the runner does not report: Abort, a full /dev/shm, ...)
            self.flush_outputs(py)?;
            self.sync_processed(py)?;
            let stop = self.failed.bind(py).call1((seq, origin, e.into_value(py)))?;
            go_on = !stop.is_truthy()?;
        } else if python_ran {
            self.sync_processed(py)?;
            go_on = !self.halted.bind(py).call0()?.is_truthy()?;
        }
        self.processed_now[j] = Some(seq);
        Ok(go_on)
    }

    fn process_and_send(
        &mut self,
        py: Python<'_>,
        data: Py<PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        python_ran: &mut bool,
    ) -> PyResult<()> {
        let result = self.process.bind(py).call1((data,))?;
        if result.is_none() {
            return Ok(());
        }
        self.send_result(py, result, origin, stream_id, created_ns, python_ran, true)
    }

    /// Sends what process() returned (or a source yielded): a bare array or a scalar on the
    /// one output edge here, anything else through the emitter.
    #[allow(clippy::too_many_arguments)]
    fn send_result(
        &mut self,
        py: Python<'_>,
        result: Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        python_ran: &mut bool,
        a_result: bool,
    ) -> PyResult<()> {
        let loans_empty = self.loans.bind(py).is_empty();
        // The commonest cases first, without emit()'s generality: one output edge with room,
        // and a bare array like the edge's last one, a scalar (what encode() would make of
        // it: a pickle and no out-of-band buffer) or a media frame. The consumer is woken once
        // per batch (flush_outputs), not per frame: an awake consumer needs no wake-up, and a
        // stage that yields its core after every frame it sends costs a context switch each.
        let mut sent = false;
        if self.outputs.len() == 1 && loans_empty {
            let mut out = self.outputs[0].borrow_mut(py);
            if out.has_room() {
                if result.get_type().is(self.ndarray.bind(py)) {
                    sent = out.try_send_array(py, &result, origin, stream_id, created_ns, false)?;
                } else if result.is_exact_instance_of::<PyInt>()
                    || result.is_exact_instance_of::<PyFloat>()
                    || result.is_exact_instance_of::<PyBool>()
                    || result.is_exact_instance_of::<PyString>()
                    || result.is_exact_instance_of::<PyBytes>()
                {
                    let meta = self.dumps.bind(py).call1((&result, self.protocol))?;
                    out.send_frame(py, KIND_DATA, &meta, Vec::new(), origin, stream_id, created_ns, false)?;
                    sent = true;
                } else if let Some(encoded) = self.codec.encode(&result)? {
                    // (a media frame: arrays next to a little metadata)
                    let (meta, parts) = &encoded;
                    if !out.try_send_encoded(py, meta, parts, origin, stream_id, created_ns)? {
                        let meta = PyBytes::new(py, meta).into_any();
                        let bufs = parts.iter().map(|p| p.0.clone_ref(py)).collect();
                        out.send_frame(py, KIND_DATA, &meta, bufs, origin, stream_id, created_ns, false)?;
                    }
                    self.codec.recycle(encoded);
                    out.encoded_by_bridge += 1;
                    sent = true;
                }
            }
        }
        if sent {
            let frames_out = {
                let mut c = self.counters.borrow_mut(py);
                c.frames_out += 1;
                c.frames_out
            };
            if let Some(b) = &self.board {
                b.set(FRAMES_OUT, frames_out as i64);
            }
        } else {
            *python_ran = true;
            self.flush_outputs(py)?; // (the emitter may wait for room: downstream must be awake)
            self.sync_processed(py)?;
            self.set_origin(py, origin, stream_id, created_ns)?;
            let how = if a_result { intern!(py, "emit_result") } else { intern!(py, "emit") };
            self.emitter.bind(py).call_method1(how, (result,))?;
        }
        if !self.loans.bind(py).is_empty() {
            *python_ran = true;
            self.sync_processed(py)?;
            self.emitter.bind(py).call_method0(intern!(py, "release_loans"))?; // allocated but not returned
        }
        Ok(())
    }
}

#[pymethods]
impl StageLoop {
    /// Built by the worker's Runner (supervisor/worker/runner.py) for a stage it may hand its
    /// frames to; `board` is the status block's buffer (or None).
    #[new]
    #[pyo3(signature = (inputs, outputs, node, emitter, handle_frame, failed, halted, processed,
                        counters, ndarray, dumps, protocol, bounds, board = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        inputs: Vec<Py<InPort>>,
        outputs: Vec<Py<OutPort>>,
        node: Py<PyAny>,
        emitter: Py<PyAny>,
        handle_frame: Py<PyAny>,
        failed: Py<PyAny>,
        halted: Py<PyAny>,
        processed: Py<PyDict>,
        counters: Bound<'_, FrameCounts>,
        ndarray: Py<PyAny>,
        dumps: Py<PyAny>,
        protocol: i32,
        bounds: Vec<u64>,
        board: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let process = node.bind(py).getattr(intern!(py, "process"))?.unbind();
        let srcs = inputs.iter().map(|p| p.borrow(py).src(py)).collect();
        let loans = emitter.bind(py).getattr(intern!(py, "loans"))?.cast_into::<PyDict>()?.unbind();
        let board = match board {
            None => None,
            Some(owner) => {
                let addr = crate::pubsub::buffer_address(owner.bind(py))?;
                let len = owner.bind(py).len()? / 8;
                if len <= FRAMES_OUT {
                    return Err(pyo3::exceptions::PyValueError::new_err("status block too small"));
                }
                Some(Board { words: addr as *mut i64, len, _owner: owner })
            }
        };
        let n_inputs = inputs.len();
        Ok(StageLoop {
            inputs,
            outputs,
            process,
            emitter,
            handle_frame,
            failed,
            halted,
            loans,
            processed_now: vec![None; n_inputs],
            processed,
            counters: counters.unbind(),
            ndarray,
            dumps,
            protocol,
            board,
            codec: Codec::new(py)?,
            rr: 0,
            last_origin: None,
            latencies: Latencies::new(bounds),
            frame: Py::new(py, FrameSlot { now: Mutex::new(None), srcs })?,
            python_turn: false,
        })
    }

    /// Handle the frames that are waiting, up to `max_frames` of them or for `max_ns`
    /// nanoseconds; returns how many steps were taken (frames, ends of stream), 0 when none
    /// waited or an output had no room.
    fn run(&mut self, py: Python<'_>, max_frames: usize, max_ns: u64) -> PyResult<usize> {
        let steps = self.run_frames(py, max_frames, max_ns);
        // (also when an error escapes: the frames before it were processed)
        self.sync_processed(py)?;
        steps
    }

    /// The stage's turn while frames flow: batches (`run`), the acks upstream that flow control
    /// needs, the acks from downstream, and the waits between them (GIL released), all here,
    /// without the runner's loop per wake-up. Hands back after `timeout` seconds, `slice_ns`
    /// after the first frame or `lull_ns` after the last (the runner then records the commit
    /// point and does its housekeeping: a paced stream's next frame will not find it busy),
    /// after frames once `commit_in` seconds passed (the runner may report a commit then: a
    /// producer's loaned chunks wait for it), or as soon as something needs the runner: the control channel readable
    /// (one of `fds`), a frame that went Python's way (an error, a new encoding, an end of
    /// stream), a gap or duplicates upstream, a frame to resend downstream, every input ended,
    /// a signal. Returns `(steps, fds_ready)`, or None when a port's transport is not this
    /// crate's iceoryx2 (the runner then waits itself).
    #[pyo3(signature = (inbox, fds, timeout, commit_in, spin_us, ack_every, max_frames, max_ns, slice_ns, lull_ns))]
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        py: Python<'_>,
        inbox: &Bound<'_, Listener>,
        fds: Vec<i32>,
        timeout: f64,
        commit_in: f64,
        spin_us: u64,
        ack_every: u64,
        max_frames: usize,
        max_ns: u64,
        slice_ns: u64,
        lull_ns: u64,
    ) -> PyResult<Option<(usize, bool)>> {
        let Some((subs, acks)) = self.iox_subs(py) else { return Ok(None) };
        let mut turn = Turn::new(timeout, commit_in, slice_ns, lull_ns);
        let mut steps = 0;
        self.python_turn = false;
        loop {
            if self.poll_outputs(py)? {
                break;
            }
            let n = self.run(py, max_frames, max_ns)?;
            steps += n;
            if self.python_turn {
                break;
            }
            let (ended, attention) = self.inputs_state(py);
            if ended || attention {
                break;
            }
            let idle = n == 0;
            self.ack_inputs(py, ack_every, idle)?;
            let now = monotonic_ns();
            let Some(end) = turn.next(n, now) else { break };
            if !idle {
                continue;
            }
            // Spin only on what would let us go on: acks of full outputs, else the inputs.
            let mut watch = self.blocked_acks(py, &acks);
            let room = !watch.is_empty();
            if !room {
                watch = self.inputs.iter().zip(&subs).filter(|(p, _)| !p.borrow(py).books.eos).map(|(_, s)| s.clone_ref(py)).collect();
            }
            match wait_until(py, inbox, &fds, end - now, spin_us, watch, room)? {
                Woke::Notified => {}
                Woke::Fds => return Ok(Some((steps, true))),
                Woke::Timeout => break,
            }
        }
        Ok(Some((steps, false)))
    }

    /// A source's turn: up to `max_frames` items of `items` (its generate(), started),
    /// or for `max_ns` nanoseconds, sent as the stage loop sends process() results; the
    /// position (items produced) is `ledger.source_position`. An exception of the generator
    /// or of sending an item goes to `failed(position, exc, emitting)` and ends the turn.
    /// Returns `(steps, ended)`: ended when the generator is exhausted.
    fn run_source(
        &mut self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        ledger: &Bound<'_, PyAny>,
        failed: &Bound<'_, PyAny>,
        max_frames: usize,
        max_ns: u64,
    ) -> PyResult<(usize, bool)> {
        let until = monotonic_ns() + max_ns;
        let position_name = intern!(py, "source_position");
        let mut position: u64 = ledger.getattr(position_name)?.extract()?;
        let mut steps = 0;
        let mut ended = false;
        while steps < max_frames {
            if !self.outputs_have_room(py) {
                break;
            }
            if let Some(b) = &self.board {
                b.set(BUSY_EDGE, -1);
                b.set(BUSY_SEQ, position as i64);
                b.set(BUSY_SINCE, monotonic_ns() as i64);
            }
            let t0 = monotonic_ns();
            let next = unsafe { pyo3::ffi::PyIter_Next(items.as_ptr()) };
            if let Some(b) = &self.board {
                b.set(BUSY_SINCE, 0);
            }
            if next.is_null() {
                if let Some(e) = PyErr::take(py) {
                    self.python_turn = true;
                    ledger.setattr(position_name, position)?;
                    failed.call1((position, e.into_value(py), false))?;
                } else {
                    ended = true;
                }
                break;
            }
            let item = unsafe { Bound::from_owned_ptr(py, next) };
            let created = monotonic_ns();
            self.last_origin = Some((position, 0, created));
            let mut python_ran = false;
            // (an item goes out as emit() sends it; a process() result as emit_result())
            let sent = if item.is_none() { Ok(()) } else { self.send_result(py, item, position, 0, created, &mut python_ran, false) };
            self.latencies.push(monotonic_ns().saturating_sub(t0));
            self.python_turn |= python_ran;
            if let Err(e) = sent {
                self.python_turn = true;
                ledger.setattr(position_name, position)?;
                failed.call1((position, e.into_value(py), true))?;
                break;
            }
            steps += 1;
            position += 1;
            let frames_in = self.count_in(py);
            if let Some(b) = &self.board {
                b.set(FRAMES_IN, frames_in as i64);
            }
            if python_ran {
                ledger.setattr(position_name, position)?;
                if self.halted.bind(py).call0()?.is_truthy()? {
                    break;
                }
            }
            if monotonic_ns() >= until {
                break;
            }
        }
        // (the ledger learns the position once per turn, and before any of the runner's code)
        ledger.setattr(position_name, position)?;
        self.flush_outputs(py)?;
        if let Some((origin, stream_id, created_ns)) = self.last_origin {
            self.set_origin(py, origin, stream_id, created_ns)?;
        }
        Ok((steps, ended))
    }

    /// `serve()` for a source: `run_source` turns while its outputs have room, and the waits
    /// for acks when they have none, until `timeout` seconds passed, `slice_ns` after the
    /// first item or `lull_ns` after the last, after items once `commit_in` passed, or something needs the runner (as `serve()`; also: the generator ended or
    /// failed). Returns `(steps, ended, fds_ready)`, or None when a port's transport is not
    /// this crate's iceoryx2.
    #[pyo3(signature = (items, ledger, failed, inbox, fds, timeout, commit_in, spin_us, max_frames, max_ns, slice_ns, lull_ns))]
    #[allow(clippy::too_many_arguments)]
    fn serve_source(
        &mut self,
        py: Python<'_>,
        items: &Bound<'_, PyAny>,
        ledger: &Bound<'_, PyAny>,
        failed: &Bound<'_, PyAny>,
        inbox: &Bound<'_, Listener>,
        fds: Vec<i32>,
        timeout: f64,
        commit_in: f64,
        spin_us: u64,
        max_frames: usize,
        max_ns: u64,
        slice_ns: u64,
        lull_ns: u64,
    ) -> PyResult<Option<(usize, bool, bool)>> {
        let Some((_, acks)) = self.iox_subs(py) else { return Ok(None) };
        let mut turn = Turn::new(timeout, commit_in, slice_ns, lull_ns);
        let mut steps = 0;
        self.python_turn = false;
        loop {
            if self.poll_outputs(py)? {
                break;
            }
            let (n, ended) = self.run_source(py, items, ledger, failed, max_frames, max_ns)?;
            steps += n;
            if ended || self.python_turn {
                return Ok(Some((steps, ended, false)));
            }
            let now = monotonic_ns();
            let Some(end) = turn.next(n, now) else { break };
            let watch = self.blocked_acks(py, &acks);
            if watch.is_empty() {
                if n == 0 {
                    break; // (room, and no item: the generator failed; the runner looks)
                }
                continue;
            }
            match wait_until(py, inbox, &fds, end - now, spin_us, watch, true)? {
                Woke::Notified => {}
                Woke::Fds => return Ok(Some((steps, false, true))),
                Woke::Timeout => break,
            }
        }
        Ok(Some((steps, false, false)))
    }

    /// What the node's `current_frame` asks (see FrameSlot).
    #[getter]
    fn frame_slot(&self, py: Python<'_>) -> Py<FrameSlot> {
        self.frame.clone_ref(py)
    }

    /// The process() durations since the last call, as `LatencyStats.merge()` takes them:
    /// `(count, total_ns, max_ns, per-bucket counts, samples)`; None when there were none.
    fn take_latencies(&mut self) -> Option<LatencyBatch> {
        self.latencies.take()
    }
}

#[cfg(test)]
mod tests {
    use super::Turn;

    fn turn() -> Turn {
        Turn { until: 1_000_000, commit_at: 50_000, slice_ns: 2_000, lull_ns: 200, slice_end: u64::MAX, lull_end: u64::MAX }
    }

    #[test]
    fn serve_hands_back_after_the_slice_the_lull_or_a_due_commit() {
        let mut t = turn();
        assert_eq!(t.next(0, 100), Some(1_000_000), "idle, no frame yet: until the timeout");
        assert_eq!(t.next(3, 1_000), Some(1_200), "after frames: the lull");
        assert_eq!(t.next(0, 1_100), Some(1_200));
        assert_eq!(t.next(0, 1_200), None, "no frame for the lull: hand back");
        let mut t = turn();
        for now in (1_000..2_900).step_by(100) {
            assert!(t.next(1, now).is_some(), "frames keep coming: within the slice");
        }
        assert_eq!(t.next(1, 3_000), None, "the slice is over");
        let mut t = turn();
        assert_eq!(t.next(0, 60_000), Some(1_000_000), "a commit due does not end an idle wait");
        assert_eq!(t.next(1, 60_100), None, "frames and a commit due: hand back");
    }
}
