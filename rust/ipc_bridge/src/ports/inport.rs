//! The consumer end of an edge: the sequence checks (duplicates, gaps, lossy drops), acks with
//! flow control, probes. Protocol: `supervisor/channels.py`; the Python class
//! `supervisor.channels.InPort` builds one.

use pyo3::prelude::*;

use super::books::{Accept, InBooks, Wake};
use crate::pubsub::Taken;
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
    pub(crate) books: InBooks,
    /// Frames `take()` returned decoded (the hot path).
    #[pyo3(get, set)]
    decoded_by_bridge: u64,
    /// Frames the node may hold before a frame is copied (its max_borrowed less one).
    base_limit: usize,
    /// Frames the worker may keep for replay on top (see `protocol.with_retention_allowance`),
    /// using at most `retain_bytes` of shared memory.
    retain: usize,
    retain_bytes: u64,
}

impl InPort {
    pub(crate) fn index(&self) -> u64 {
        self.index
    }

    pub(crate) fn iox_sub(&self, py: Python<'_>) -> Option<Py<crate::pubsub::Subscriber>> {
        self.sub_.iox(py)
    }

    pub(crate) fn src(&self, py: Python<'_>) -> Py<PyAny> {
        self.src.clone_ref(py)
    }

    /// `take()`: the next in-order frame, decoded by the subscriber when it can.
    pub(crate) fn take_next(&mut self, py: Python<'_>) -> PyResult<Option<Taken>> {
        let Some(r) = self.sub_.take(py, self.books.expected, self.limit())? else { return Ok(None) };
        let r = match r {
            Taken::Decoded(..) => {
                // (the subscriber decodes only the frame it was told to expect)
                self.books.took(self.books.expected);
                let len = self.sub_.last_len(py);
                if len > 0 {
                    self.books.sized(len);
                }
                self.decoded_by_bridge += 1;
                return Ok(Some(r));
            }
            Taken::Sample(s) => s,
        };
        if self.accept(py, r.bind(py))? {
            return Ok(Some(Taken::Sample(r)));
        }
        // (a frame not taken, a duplicate or past a gap, gives its borrow back before the
        // next one is received: with every other borrow held, receiving first fails)
        drop(r);
        Ok(self.receive_next(py)?.map(Taken::Sample))
    }

    /// Frames held before the next one is copied: the node's own, and as many of the
    /// retention allowance as `retain_bytes` of frames the size of the last one.
    fn limit(&self) -> usize {
        let len = self.books.frame_len.max(1) as u64;
        self.base_limit + self.retain.min((self.retain_bytes / len) as usize)
    }

    pub(crate) fn receive_next(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        loop {
            let Some(s) = self.sub_.receive(py)? else { return Ok(None) };
            if self.accept(py, s.bind(py))? {
                return Ok(Some(s));
            }
        }
    }

    /// Sequence checks of one received frame (see InBooks::accept): true when it is the next
    /// one.
    fn accept(&mut self, py: Python<'_>, s: &Bound<'_, PyAny>) -> PyResult<bool> {
        let (seq, kind, len) = sample_info(py, s)?;
        let now = if self.books.lossless && seq > self.books.expected && self.books.gap_since.is_none() {
            now_s(py, &self.clock)?
        } else {
            0.0
        };
        Ok(self.books.accept(seq, kind == KIND_EOS, len, now) == Accept::Take)
    }

    /// `ack()` (see there).
    pub(crate) fn send_ack(&mut self, py: Python<'_>, processed: u64, committed: u64, force: bool) -> PyResult<()> {
        let sub = &self.sub_;
        let Some(wake) = self.books.ack(processed, committed, force, || sub.has_samples(py).unwrap_or(true)) else {
            return Ok(());
        };
        // (processed, committed) in the seq and origin fields: see Kind.ACK
        self.ack_pub_.send_empty(py, frame_header(self.books.acked_processed, KIND_ACK, self.books.acked_committed, 0, 0))?;
        match wake {
            Wake::No => {}
            Wake::Flow => self.ack_notifier_.notify_flow(py)?,
            Wake::Always => self.ack_notifier_.notify(py, 0)?,
        }
        Ok(())
    }
}

#[pymethods]
impl InPort {
    /// Made by `supervisor.channels.InPort` (see there).
    #[new]
    #[pyo3(signature = (subscriber, ack_publisher, ack_notifier, *, index, src, lossless, depth, max_bytes,
                        expected = 0, retain = 0, retain_bytes = 0, clock = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        subscriber: &Bound<'_, PyAny>,
        ack_publisher: &Bound<'_, PyAny>,
        ack_notifier: &Bound<'_, PyAny>,
        index: u64,
        src: Py<PyAny>,
        lossless: bool,
        depth: u64,
        max_bytes: u64,
        expected: u64,
        retain: usize,
        retain_bytes: u64,
        clock: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let max_borrowed: usize = subscriber.getattr("max_borrowed")?.extract()?;
        if retain >= max_borrowed {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "retain ({retain}) must be less than the subscriber's max_borrowed ({max_borrowed}), which includes it"
            )));
        }
        Ok(InPort {
            sub_: Sub::new(subscriber),
            ack_pub_: Pub::new(ack_publisher),
            ack_notifier_: Notif::new(ack_notifier),
            clock,
            index,
            src,
            books: InBooks::new(lossless, depth, max_bytes, expected),
            decoded_by_bridge: 0,
            base_limit: (max_borrowed - retain).saturating_sub(1),
            retain,
            retain_bytes,
        })
    }

    /// Frames that may be held before the next frame taken is copied out of shared memory.
    #[getter]
    fn borrow_limit(&self) -> usize {
        self.limit()
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

    #[getter]
    fn lossless(&self) -> bool {
        self.books.lossless
    }

    /// Seq of the next frame to take.
    #[getter]
    fn expected(&self) -> u64 {
        self.books.expected
    }

    #[getter]
    fn eos(&self) -> bool {
        self.books.eos
    }

    #[getter]
    fn eos_seq(&self) -> Option<u64> {
        self.books.eos_seq
    }

    #[getter]
    fn acked_processed(&self) -> u64 {
        self.books.acked_processed
    }

    #[setter]
    fn set_acked_processed(&mut self, v: u64) {
        self.books.acked_processed = v;
    }

    #[getter]
    fn acked_committed(&self) -> u64 {
        self.books.acked_committed
    }

    #[setter]
    fn set_acked_committed(&mut self, v: u64) {
        self.books.acked_committed = v;
    }

    #[getter]
    fn notified_processed(&self) -> u64 {
        self.books.notified_processed
    }

    /// The producer's window in frames, as estimated here.
    #[getter]
    fn window(&self) -> u64 {
        self.books.window
    }

    /// Payload bytes of the last data frame taken (-1: none yet).
    #[getter]
    fn frame_len(&self) -> i64 {
        self.books.frame_len
    }

    #[getter]
    fn notify_every(&self) -> u64 {
        self.books.notify_every
    }

    #[getter]
    fn gap_since(&self) -> Option<f64> {
        self.books.gap_since
    }

    #[getter]
    fn received(&self) -> u64 {
        self.books.received
    }

    #[getter]
    fn duplicates(&self) -> u64 {
        self.books.duplicates
    }

    #[getter]
    fn dup_pending(&self) -> bool {
        self.books.dup_pending
    }

    /// Frames lost on a lossy edge.
    #[getter]
    fn dropped(&self) -> u64 {
        self.books.dropped
    }

    /// The next in-order frame (a Sample), or None.
    fn receive(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.receive_next(py)
    }

    /// Like `receive()`, but an in-order data frame carrying a bare array like the last one
    /// `learn()` saw, a media frame or a small pickled object comes decoded by the bridge, as
    /// `(value, seq, origin, stream_id, created_ns, sent_ns)` (the hot path: no Sample, no
    /// Python decoding). Anything else comes as a Sample. Raises what decoding raised (the
    /// frame is consumed).
    fn take(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.take_next(py)?.map(|t| t.into_object(py)).transpose()
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
        let sub = &self.sub_;
        if !self.books.should_probe(|| sub.has_samples(py).unwrap_or(true)) {
            return Ok(());
        }
        let now_ns = (now_s(py, &self.clock)? * 1e9) as u64;
        let b = &self.books;
        self.ack_pub_.send_empty(py, frame_header(b.acked_processed, KIND_PROBE, b.acked_committed, b.expected, now_ns))?;
        self.ack_notifier_.notify(py, 0)
    }

    fn _producer_may_wait(&self, py: Python<'_>) -> PyResult<bool> {
        let queued = self.sub_.has_samples(py)?;
        Ok(self.books.producer_may_wait(|| queued))
    }

    /// The seq to ask a replay from, when a gap has lasted `min_age` and was not reported in
    /// the last `interval` seconds.
    #[pyo3(signature = (now, min_age = 0.05, interval = 0.2))]
    fn gap_to_report(&mut self, now: f64, min_age: f64, interval: f64) -> Option<u64> {
        self.books.gap_to_report(now, min_age, interval)
    }

    /// True when the next frame must be copied out of shared memory so that the borrow limit
    /// is never reached (a node holding on to frames must not stall the edge).
    fn should_copy(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.sub_.borrowed(py)? >= self.limit())
    }

    /// Release every port of this end (idempotent). Frames already received stay valid: each
    /// keeps its chunk until it is gone.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.sub_.close(py)?;
        self.ack_pub_.close(py)?;
        self.ack_notifier_.close(py)
    }
}
