//! The consumer end of an edge: the sequence checks (duplicates, gaps, lossy drops), acks with
//! flow control, probes. Protocol: `supervisor/channels.py`; the Python class
//! `supervisor.channels.InPort` builds one.

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::transport::{frame_header, sample_info, Notif, Pub, Sub};
use super::{now_s, KIND_ACK, KIND_EOS, KIND_PROBE};

/// Consumer end of an edge (see `supervisor/channels.py` for the protocol).
#[pyclass(module = "remotemedia._ipc_bridge", subclass, name = "InPortCore")]
pub struct InPort {
    sub_: Sub,
    ack_pub_: Pub,
    ack_notifier_: Notif,
    clock: Option<Py<PyAny>>,
    /// The edge's index.
    #[pyo3(get)]
    index: u64,
    /// The producing node's name.
    #[pyo3(get)]
    src: Py<PyAny>,
    #[pyo3(get)]
    lossless: bool,
    depth: u64,
    max_bytes: u64,
    /// Seq of the next frame to take.
    #[pyo3(get, set)]
    expected: u64,
    #[pyo3(get, set)]
    pub(crate) eos: bool,
    #[pyo3(get, set)]
    eos_seq: Option<u64>,
    #[pyo3(get, set)]
    acked_processed: u64,
    #[pyo3(get, set)]
    acked_committed: u64,
    #[pyo3(get, set)]
    notified_processed: u64,
    /// The producer's window in frames: `depth`, or fewer when `max_bytes` of its frames fill
    /// it first (estimated from the size of the frames we take).
    #[pyo3(get, set)]
    window: u64,
    #[pyo3(get, set)]
    notify_every: u64,
    frame_len: i64,
    #[pyo3(get, set)]
    gap_since: Option<f64>,
    #[pyo3(get, set)]
    gap_reported_at: f64,
    #[pyo3(get, set)]
    received: u64,
    #[pyo3(get, set)]
    duplicates: u64,
    #[pyo3(get, set)]
    dup_pending: bool,
    /// Frames lost on a lossy edge.
    #[pyo3(get, set)]
    dropped: u64,
    /// Frames `take()` returned decoded (the hot path).
    #[pyo3(get, set)]
    decoded_by_bridge: u64,
    #[pyo3(get)]
    borrow_limit: usize,
}

impl InPort {
    pub(crate) fn index(&self) -> u64 {
        self.index
    }

    pub(crate) fn src(&self, py: Python<'_>) -> Py<PyAny> {
        self.src.clone_ref(py)
    }

    /// `take()`: the next in-order frame, decoded by the subscriber when it can.
    pub(crate) fn take_next(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let Some(r) = self.sub_.take(py, self.expected, self.borrow_limit)? else { return Ok(None) };
        if r.bind(py).is_instance_of::<PyTuple>() {
            self.expected += 1;
            self.received += 1;
            self.decoded_by_bridge += 1;
            self.gap_since = None;
            return Ok(Some(r));
        }
        if self.accept(py, r.bind(py))? {
            return Ok(Some(r));
        }
        self.receive_next(py)
    }

    pub(crate) fn receive_next(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            let Some(s) = self.sub_.receive(py)? else { return Ok(None) };
            if self.accept(py, s.bind(py))? {
                return Ok(Some(s));
            }
        }
    }

    /// Sequence checks of one received frame: true when it is the next one, false when it
    /// must be dropped (duplicate, or beyond a gap on a lossless edge).
    fn accept(&mut self, py: Python<'_>, s: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (seq, kind, len) = sample_info(py, s)?;
        if seq < self.expected {
            if kind == KIND_EOS && !self.eos {
                // see OutPort.send: an end of stream is never a duplicate
                self.eos = true;
                self.eos_seq = Some(self.expected - 1);
                self.received += 1;
                return Ok(true);
            }
            // A restarted producer regenerates what we already have. It cannot know our
            // position (its ack subscriber is new): answer with an ack.
            self.duplicates += 1;
            self.dup_pending = true;
            return Ok(false);
        }
        if seq > self.expected {
            if self.lossless {
                if self.gap_since.is_none() {
                    self.gap_since = Some(now_s(py, &self.clock)?);
                }
                return Ok(false);
            }
            self.dropped += seq - self.expected;
        }
        self.expected = seq + 1;
        self.gap_since = None;
        self.received += 1;
        if kind == KIND_EOS {
            self.eos = true;
            self.eos_seq = Some(seq);
        } else if len as i64 != self.frame_len {
            // A payload is a little larger than what the producer counts, so this never
            // overestimates its window.
            self.frame_len = len as i64;
            self.window = self.depth.min(self.max_bytes.div_ceil(len.max(1) as u64)).max(1);
            self.notify_every = (self.window / 2).max(1);
        }
        Ok(true)
    }

    fn producer_may_wait(&self, py: Python<'_>) -> PyResult<bool> {
        // The producer waits for room only with a full window (`depth` frames, or `max_bytes`
        // of them) in flight beyond what it last learned, and it learned at least
        // `notified_processed` (it reads every ack before it blocks, and each notify since
        // woke it). With our queue empty we hold every frame it sent, so `expected` bounds its
        // next seq: below that line it cannot be waiting, and waking it would only cost both
        // of us a context switch (a paced stream's case). With frames queued it may be
        // refilling: wake it every half window to keep it busy.
        Ok(self.expected >= self.notified_processed + self.window || self.sub_.has_samples(py)?)
    }

    /// `ack()` (see there).
    pub(crate) fn send_ack(&mut self, py: Python<'_>, processed: u64, committed: u64, force: bool) -> PyResult<()> {
        let force = force || self.dup_pending;
        self.dup_pending = false;
        if !force && processed <= self.acked_processed && committed <= self.acked_committed {
            return Ok(());
        }
        self.acked_processed = self.acked_processed.max(processed);
        let new_commit = committed > self.acked_committed;
        self.acked_committed = self.acked_committed.max(committed);
        // (processed, committed) in the seq and origin fields: see Kind.ACK
        self.ack_pub_.send_empty(py, frame_header(self.acked_processed, KIND_ACK, self.acked_committed, 0, 0))?;
        // Waking the producer costs it (and the CPU) a context switch per ack. For flow
        // control it only waits with a full window, and then we have half a window to take
        // before it could be stuck: wake it every half window. Commits (at most every 10 ms
        // per worker) always wake it: its own commits, and so its producer's reuse of loaned
        // chunks, wait on them (were the wake-up left to its next frame, a chain of stages
        // would copy every big loaned frame once more).
        if force
            || new_commit
            || (self.acked_processed - self.notified_processed >= self.notify_every && self.producer_may_wait(py)?)
            || self.eos_seq.is_some_and(|e| self.acked_processed > e)
        {
            self.notified_processed = self.acked_processed;
            self.ack_notifier_.notify(py)?;
        }
        Ok(())
    }
}

#[pymethods]
impl InPort {
    /// Made by `supervisor.channels.InPort` (see there).
    #[new]
    #[pyo3(signature = (subscriber, ack_publisher, ack_notifier, *, index, src, lossless, depth, max_bytes,
                        expected = 0, clock = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        subscriber: &Bound<'_, PyAny>,
        ack_publisher: &Bound<'_, PyAny>,
        ack_notifier: &Bound<'_, PyAny>,
        index: u64,
        src: Py<PyAny>,
        lossless: bool,
        depth: u64,
        max_bytes: u64,
        expected: u64,
        clock: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let sub_ = Sub::new(subscriber);
        let max_borrowed: usize = subscriber.getattr("max_borrowed")?.extract()?;
        let _ = py;
        Ok(InPort {
            sub_,
            ack_pub_: Pub::new(ack_publisher),
            ack_notifier_: Notif::new(ack_notifier),
            clock,
            index,
            src,
            lossless,
            depth,
            max_bytes,
            expected,
            eos: false,
            eos_seq: None,
            acked_processed: expected,
            acked_committed: expected,
            notified_processed: expected,
            window: depth,
            notify_every: (depth / 2).max(1),
            frame_len: -1,
            gap_since: None,
            gap_reported_at: 0.0,
            received: 0,
            duplicates: 0,
            dup_pending: false,
            dropped: 0,
            decoded_by_bridge: 0,
            borrow_limit: max_borrowed.saturating_sub(1),
        })
    }

    #[getter]
    fn sub(&self, py: Python<'_>) -> Py<PyAny> {
        self.sub_.object(py)
    }

    #[getter]
    fn ack_pub(&self, py: Python<'_>) -> Py<PyAny> {
        self.ack_pub_.object(py)
    }

    #[getter]
    fn ack_notifier(&self, py: Python<'_>) -> Py<PyAny> {
        self.ack_notifier_.object(py)
    }

    /// The next in-order frame (a Sample), or None.
    fn receive(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.receive_next(py)
    }

    /// Like `receive()`, but an in-order data frame carrying a bare array like the last one
    /// `learn()` saw, or a small pickled object, comes decoded by the bridge, as `(value, seq,
    /// origin, stream_id, created_ns, sent_ns)` (the hot path: no Sample, no Python decoding).
    /// Anything else comes as a Sample. Raises what unpickling raised (the frame is consumed).
    fn take(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.take_next(py)
    }

    fn _accept(&mut self, py: Python<'_>, s: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        Ok(if self.accept(py, s)? { Some(s.clone().unbind()) } else { None })
    }

    /// Tell the producer how many frames are processed and committed (counts); unchanged
    /// counts are sent again only with `force` or after a duplicate arrived.
    #[pyo3(signature = (processed, committed, force = false))]
    fn ack(&mut self, py: Python<'_>, processed: u64, committed: u64, force: bool) -> PyResult<()> {
        self.send_ack(py, processed, committed, force)
    }

    /// Say which frame we wait for, when our queue is empty (Kind.PROBE): the producer
    /// resends what it published that we never got. About once a second (the worker's
    /// heartbeat), so its cost is nil.
    fn probe(&mut self, py: Python<'_>) -> PyResult<()> {
        if !self.lossless || self.eos || self.gap_since.is_some() || self.sub_.has_samples(py)? {
            return Ok(());
        }
        let now_ns = (now_s(py, &self.clock)? * 1e9) as u64;
        self.ack_pub_
            .send_empty(py, frame_header(self.acked_processed, KIND_PROBE, self.acked_committed, self.expected, now_ns))?;
        self.ack_notifier_.notify(py)
    }

    fn _producer_may_wait(&self, py: Python<'_>) -> PyResult<bool> {
        self.producer_may_wait(py)
    }

    /// The seq to ask a replay from, when a gap has lasted `min_age` and was not reported in
    /// the last `interval` seconds.
    #[pyo3(signature = (now, min_age = 0.05, interval = 0.2))]
    fn gap_to_report(&mut self, now: f64, min_age: f64, interval: f64) -> Option<u64> {
        let since = self.gap_since?;
        if now - since < min_age || now - self.gap_reported_at < interval {
            return None;
        }
        self.gap_reported_at = now;
        Some(self.expected)
    }

    /// True when the next frame must be copied out of shared memory so that the borrow limit
    /// is never reached (a node holding on to frames must not stall the edge).
    fn should_copy(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.sub_.borrowed(py)? >= self.borrow_limit)
    }

    /// Release every port of this end (idempotent). Frames already received stay valid: each
    /// keeps its chunk until it is gone.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.sub_.close(py)?;
        self.ack_pub_.close(py)?;
        self.ack_notifier_.close(py)
    }
}
