//! The producer end of an edge: sequence numbers, retention for replay, acks and commits, the
//! window, resends. The protocol is drawn in `supervisor/channels.py`; this is its
//! implementation, and the Python class `supervisor.channels.OutPort` builds one (it makes
//! the transport ports and keeps the edge's spec).

use std::collections::VecDeque;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::transport::{frame_header, Notif, Pub, Sub};
use super::{now_s, KIND_DATA, KIND_EOS, KIND_PROBE};

/// A sent frame kept for replay until the consumer commits it.
pub(crate) struct Ret {
    seq: u64,
    kind: u32,
    meta: Py<PyAny>,
    buffers: Vec<Py<PyAny>>,
    origin: u64,
    stream_id: u64,
    created_ns: u64,
    nbytes: u64,
    /// The buffer is a view of a chunk this publisher loaned and sent (zero-copy output). The
    /// chunk stays intact until this publisher loans again, so the view is copied to private
    /// memory just before that ("copy on reuse"), unless it was committed by then.
    loaned: bool,
}

/// A read-only view of a retained frame (for tests and tools).
#[pyclass(module = "remotemedia._ipc_bridge", frozen, get_all)]
pub struct Retained {
    seq: u64,
    kind: u32,
    meta: Py<PyAny>,
    buffers: Vec<Py<PyAny>>,
    origin: u64,
    stream_id: u64,
    created_ns: u64,
    nbytes: u64,
    loaned: bool,
}

fn nbytes_of(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().len() as u64);
    }
    Ok(pyo3::types::PyMemoryView::from(obj)?.getattr(intern!(py, "nbytes"))?.extract()?)
}

/// Producer end of an edge (see `supervisor/channels.py` for the protocol).
#[pyclass(module = "remotemedia._ipc_bridge", subclass, name = "OutPortCore")]
pub struct OutPort {
    pub_: Pub,
    ack: Sub,
    notifier_: Notif,
    clock: Option<Py<PyAny>>,
    /// "src -> dst", for messages.
    name: String,
    #[pyo3(get)]
    lossless: bool,
    #[pyo3(get)]
    depth: u64,
    #[pyo3(get)]
    max_bytes: u64,
    /// The consumer's stream already ended (restarts only).
    #[pyo3(get, set)]
    consumer_finished: bool,
    #[pyo3(get, set)]
    next_seq: u64,
    /// Frames the consumer has processed / committed (counts).
    #[pyo3(get, set)]
    processed: u64,
    #[pyo3(get, set)]
    committed: u64,
    retained: VecDeque<Ret>,
    #[pyo3(get, set)]
    retained_bytes: u64,
    /// Retained frames whose buffer is still a sent chunk.
    #[pyo3(get, set)]
    loaned_retained: u64,
    last_nbytes: u64,
    /// Seq of the first retained frame not known to be delivered (None: all delivered).
    #[pyo3(get, set)]
    undelivered: Option<u64>,
    retry_at: f64,
    retry_delay: f64,
    #[pyo3(get, set)]
    sent: u64,
    /// Frames sent from a loaned chunk, without a copy.
    #[pyo3(get, set)]
    zero_copy: u64,
    /// Of those, copied after all: not committed before the next loan.
    #[pyo3(get, set)]
    copied_on_reuse: u64,
    /// Frames sent by the publisher's own encoder (the hot path).
    #[pyo3(get, set)]
    pub(crate) encoded_by_bridge: u64,
    #[pyo3(get, set)]
    resent: u64,
    #[pyo3(get, set)]
    discarded: u64,
    /// Frames resent because a probe showed the transport lost them.
    #[pyo3(get, set)]
    lost: u64,
    /// (frame the consumer waits for, read at ns)
    probe: Option<(u64, u64)>,
    #[pyo3(get, set)]
    eos_sent: bool,
    /// Frames sent with notify=False wait for flush_notify().
    #[pyo3(get)]
    notify_pending: bool,
    array_meta: Option<Py<PyAny>>,
    array_nbytes: u64,
}

impl OutPort {
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        now_s(py, &self.clock)
    }

    pub(crate) fn notify(&self, py: Python<'_>) -> PyResult<()> {
        self.notifier_.notify(py)
    }

    fn schedule_retry(&mut self, py: Python<'_>, reset: bool) -> PyResult<()> {
        self.retry_delay = if reset { 0.002 } else { (self.retry_delay * 2.0).min(0.1) };
        self.retry_at = self.now(py)? + self.retry_delay;
        Ok(())
    }

    /// Retain `r` (a frame of a lossless edge) for replay, and book its publish: it reached
    /// `n` subscribers (then wake the consumer if `notify`); 0: it was discarded, so it and
    /// every later frame are resent in order after a backoff; None: it was not published (an
    /// earlier frame is still undelivered, or the publish raised).
    fn keep(&mut self, py: Python<'_>, r: Ret, n: Option<usize>, notify: bool) -> PyResult<()> {
        let (seq, nbytes, loaned) = (r.seq, r.nbytes, r.loaned);
        self.retained.push_back(r);
        self.retained_bytes += nbytes;
        self.last_nbytes = nbytes;
        if loaned {
            self.loaned_retained += 1;
        }
        match n {
            None => {}
            Some(0) => {
                self.discarded += 1;
                self.undelivered = Some(seq);
                self.schedule_retry(py, true)?;
            }
            Some(_) => {
                self.sent += 1;
                if notify {
                    self.notify(py)?;
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self, py: Python<'_>, i: usize) -> PyResult<bool> {
        let r = &self.retained[i];
        let h = frame_header(r.seq, r.kind, r.origin, r.stream_id, r.created_ns);
        let n = self.pub_.send(py, h, r.meta.bind(py), &r.buffers)?;
        if n == 0 {
            self.discarded += 1;
        }
        Ok(n > 0)
    }

    pub(crate) fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.notify_pending {
            self.notify_pending = false;
            self.notify(py)?;
        }
        Ok(())
    }

    /// True when a lossless edge has room in its window (read for every frame).
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        if !self.lossless {
            return true;
        }
        let n = self.next_seq.saturating_sub(self.processed);
        n == 0 || (n < self.depth && n * self.last_nbytes < self.max_bytes)
    }

    /// The hot path of `send()`; Some(sent) or None when the caller must encode and `send()`.
    /// With `notify` false the consumer is woken by a later `flush_notify()` (a batch).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_send_array(
        &mut self,
        py: Python<'_>,
        value: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notify: bool,
    ) -> PyResult<bool> {
        let Some(meta) = self.array_meta.as_ref() else { return Ok(false) };
        if self.undelivered.is_some() || self.loaned_retained > 0 {
            return Ok(false);
        }
        let seq = self.next_seq;
        if seq < self.committed {
            return Ok(false); // regenerated after a restart: send() knows what to skip
        }
        let n = self.pub_.send_array(py, seq, value, origin, stream_id, created_ns, notify.then_some(&self.notifier_))?;
        if n < 0 {
            return Ok(false);
        }
        if !notify && n > 0 {
            self.notify_pending = true;
        }
        self.next_seq = seq + 1;
        self.encoded_by_bridge += 1;
        if !self.lossless {
            self.sent += 1;
            return Ok(true);
        }
        // (the publisher notified the consumer already)
        let r = Ret {
            seq,
            kind: KIND_DATA,
            meta: meta.clone_ref(py),
            buffers: vec![value.clone().unbind()],
            origin,
            stream_id,
            created_ns,
            nbytes: self.array_nbytes,
            loaned: false,
        };
        self.keep(py, r, Some(n as usize), false)?;
        Ok(true)
    }

    /// `send()` (see the Python docstring of OutPort.send).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_frame(
        &mut self,
        py: Python<'_>,
        kind: u32,
        meta: &Bound<'_, PyAny>,
        buffers: Vec<Py<PyAny>>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notify: bool,
    ) -> PyResult<u64> {
        let mut seq = self.next_seq;
        self.next_seq += 1;
        if kind == KIND_EOS {
            self.eos_sent = true;
        }
        if !self.lossless {
            self.pub_.send(py, frame_header(seq, kind, origin, stream_id, created_ns), meta, &buffers)?;
            self.sent += 1;
            if notify {
                self.notify(py)?;
            } else {
                self.notify_pending = true;
            }
            return Ok(seq);
        }
        if seq < self.committed {
            if kind != KIND_EOS || self.consumer_finished {
                return Ok(seq); // regenerated after a restart, and already committed downstream
            }
            // An end of stream the consumer has not seen: after a restart behind a lossy edge
            // the outputs may number differently. It becomes the next frame the consumer takes.
            seq = self.committed;
            self.next_seq = seq + 1;
        }
        let mut nbytes = nbytes_of(py, meta)?;
        for b in &buffers {
            nbytes += nbytes_of(py, b.bind(py))?;
        }
        let r = Ret { seq, kind, meta: meta.clone().unbind(), buffers, origin, stream_id, created_ns, nbytes, loaned: false };
        let mut n = None;
        if self.undelivered.is_none() {
            if self.loaned_retained > 0 {
                self.secure(py)?;
            }
            let h = frame_header(seq, kind, origin, stream_id, created_ns);
            match self.pub_.send(py, h, meta, &r.buffers) {
                Ok(k) => n = Some(k),
                Err(e) => {
                    self.keep(py, r, None, false)?; // its seq is taken: a replay must find it
                    return Err(e);
                }
            }
        }
        self.keep(py, r, n, notify)?;
        if !notify && n.is_some_and(|k| k > 0) {
            self.notify_pending = true;
        }
        Ok(seq)
    }

    /// Copy-on-reuse: before this publisher loans a chunk again, retained frames that still
    /// point into chunks it sent get a private copy (their chunk may be the next loan).
    pub(crate) fn secure(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.loaned_retained == 0 {
            return Ok(());
        }
        self.poll(py)?; // frames committed meanwhile need no copy
        if self.loaned_retained == 0 {
            return Ok(());
        }
        for r in self.retained.iter_mut() {
            if r.loaned {
                let mut copies = Vec::with_capacity(r.buffers.len());
                for b in &r.buffers {
                    let view = pyo3::types::PyMemoryView::from(b.bind(py))?;
                    copies.push(view.call_method0(intern!(py, "tobytes"))?.unbind());
                }
                r.buffers = copies;
                r.loaned = false;
                self.copied_on_reuse += 1;
            }
        }
        self.loaned_retained = 0;
        Ok(())
    }

    /// Consumes acks; true when the consumer made progress. A probe read here may resend.
    pub(crate) fn poll(&mut self, py: Python<'_>) -> PyResult<bool> {
        let Some((processed, committed, want, probed_ns, kind)) = self.ack.newest_ack(py)? else { return Ok(false) };
        let progress = self.apply(processed, committed);
        if kind == KIND_PROBE {
            self.probed(py, want, probed_ns)?;
        }
        Ok(progress)
    }

    pub(crate) fn apply(&mut self, processed: u64, committed: u64) -> bool {
        let mut progress = false;
        if processed > self.processed {
            self.processed = processed.min(self.next_seq);
            progress = true;
        }
        if committed > self.committed {
            self.committed = committed;
            progress = true;
            while self.retained.front().is_some_and(|r| r.seq < committed) {
                let r = self.retained.pop_front().expect("front checked");
                self.retained_bytes -= r.nbytes;
                if r.loaned {
                    self.loaned_retained -= 1;
                }
            }
            if self.undelivered.is_some_and(|u| u < committed) {
                self.undelivered = self.retained.front().map(|r| r.seq);
            }
        }
        if progress && self.undelivered.is_some() {
            self.retry_at = 0.0; // room was made: resend now
        }
        progress
    }

    /// See OutPort._probed in supervisor/channels.py.
    fn probed(&mut self, py: Python<'_>, want: u64, probed_ns: u64) -> PyResult<()> {
        let end = self.undelivered.unwrap_or(self.next_seq);
        if !self.lossless || want >= end || want < self.committed {
            self.probe = None; // nothing published that it waits for
            return Ok(());
        }
        let now_ns = (self.now(py)? * 1e9) as u64;
        match self.probe {
            Some((w, at)) if w == want && probed_ns > at => {}
            // (a probe sent before we read the first may predate the publish: wait for one after)
            _ => {
                self.probe = Some((want, now_ns));
                return Ok(());
            }
        }
        self.probe = None;
        self.lost += end - want;
        let msg = format!(
            "edge {}: frames {}..{} were published but never reached the consumer (lost by the transport); resending them",
            self.name,
            want,
            end - 1
        );
        py.import(intern!(py, "logging"))?
            .call_method1(intern!(py, "getLogger"), ("remotemedia.supervisor",))?
            .call_method1(intern!(py, "warning"), (msg,))?;
        self.pub_.update_connections(py)?;
        self.processed = self.processed.min(want);
        self.undelivered = Some(want);
        self.resend(py, true)?;
        Ok(())
    }

    /// Send the undelivered tail in order, if its retry time has come. True when the whole
    /// tail went out.
    pub(crate) fn resend(&mut self, py: Python<'_>, force: bool) -> PyResult<bool> {
        let Some(first) = self.undelivered else { return Ok(true) };
        if !force && self.now(py)? < self.retry_at {
            return Ok(false);
        }
        self.secure(py)?;
        let mut sent_any = false;
        for i in 0..self.retained.len() {
            let seq = self.retained[i].seq;
            if seq < first {
                continue;
            }
            if !self.publish(py, i)? {
                self.undelivered = Some(seq);
                if sent_any {
                    self.notify(py)?;
                }
                self.schedule_retry(py, sent_any)?;
                return Ok(false);
            }
            sent_any = true;
            self.resent += 1;
        }
        self.undelivered = None;
        if sent_any {
            self.notify(py)?;
        }
        Ok(true)
    }
}

#[pymethods]
impl OutPort {
    /// Made by `supervisor.channels.OutPort` (see there): the transport ports, the edge's
    /// shape, the position after a restart, and a clock (None: CLOCK_MONOTONIC).
    #[new]
    #[pyo3(signature = (publisher, ack_subscriber, notifier, *, name, lossless, depth, max_bytes,
                        next_seq = 0, committed = 0, consumer_finished = false, clock = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        publisher: &Bound<'_, PyAny>,
        ack_subscriber: &Bound<'_, PyAny>,
        notifier: &Bound<'_, PyAny>,
        name: String,
        lossless: bool,
        depth: u64,
        max_bytes: u64,
        next_seq: u64,
        committed: u64,
        consumer_finished: bool,
        clock: Option<Py<PyAny>>,
    ) -> Self {
        let start = next_seq.max(committed);
        OutPort {
            pub_: Pub::new(publisher),
            ack: Sub::new(ack_subscriber),
            notifier_: Notif::new(notifier),
            clock,
            name,
            lossless,
            depth,
            max_bytes,
            consumer_finished,
            next_seq,
            processed: start,
            committed: start,
            retained: VecDeque::new(),
            retained_bytes: 0,
            loaned_retained: 0,
            last_nbytes: 0,
            undelivered: None,
            retry_at: 0.0,
            retry_delay: 0.002,
            sent: 0,
            zero_copy: 0,
            copied_on_reuse: 0,
            encoded_by_bridge: 0,
            resent: 0,
            discarded: 0,
            lost: 0,
            probe: None,
            eos_sent: false,
            notify_pending: false,
            array_meta: None,
            array_nbytes: 0,
        }
    }

    #[getter(r#pub)]
    fn get_pub(&self, py: Python<'_>) -> Py<PyAny> {
        self.pub_.object(py)
    }

    #[getter]
    fn ack_sub(&self, py: Python<'_>) -> Py<PyAny> {
        self.ack.object(py)
    }

    #[getter]
    fn notifier(&self, py: Python<'_>) -> Py<PyAny> {
        self.notifier_.object(py)
    }

    #[getter]
    fn in_flight(&self) -> i64 {
        self.next_seq as i64 - self.processed as i64
    }

    /// The retained frames, oldest first (copies of the books, for tests and tools).
    #[getter]
    fn retained(&self, py: Python<'_>) -> Vec<Retained> {
        self.retained
            .iter()
            .map(|r| Retained {
                seq: r.seq,
                kind: r.kind,
                meta: r.meta.clone_ref(py),
                buffers: r.buffers.iter().map(|b| b.clone_ref(py)).collect(),
                origin: r.origin,
                stream_id: r.stream_id,
                created_ns: r.created_ns,
                nbytes: r.nbytes,
                loaned: r.loaned,
            })
            .collect()
    }

    #[getter]
    fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// True when a frame may be sent now (lossless: the window has room).
    fn can_send(&self) -> bool {
        self.has_room()
    }

    /// Queue one frame (the caller checked `can_send`) and publish it if the edge is in order.
    /// Returns the frame's seq. With `notify=False` the consumer is not woken yet: the caller
    /// sends more and then calls `flush_notify()` (one wake-up per batch).
    #[pyo3(signature = (kind, meta, buffers, origin = 0, stream_id = 0, created_ns = 0, notify = true))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        py: Python<'_>,
        kind: u32,
        meta: &Bound<'_, PyAny>,
        buffers: Vec<Py<PyAny>>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notify: bool,
    ) -> PyResult<u64> {
        self.send_frame(py, kind, meta, buffers, origin, stream_id, created_ns, notify)
    }

    /// Wake the consumer for the frames sent with `notify=False`.
    fn flush_notify(&mut self, py: Python<'_>) -> PyResult<()> {
        self.flush(py)
    }

    /// The hot path of `send()`: a bare array like the last one `learn_array()` saw is
    /// encoded, copied, published and notified by the bridge in one call (the caller checked
    /// `can_send`). False, with nothing sent, when the bridge cannot (then encode and `send()`).
    fn send_array(&mut self, py: Python<'_>, value: &Bound<'_, PyAny>, origin: u64, stream_id: u64, created_ns: u64) -> PyResult<bool> {
        self.try_send_array(py, value, origin, stream_id, created_ns, true)
    }

    /// Let `send_array()` take arrays of this type, dtype and shape, encoded as `meta` and one
    /// buffer of `nbytes` bytes.
    fn teach_array(&mut self, py: Python<'_>, array_type: Py<PyAny>, dtype: Py<PyAny>, shape: Py<PyAny>, meta: Py<PyAny>, nbytes: u64) -> PyResult<()> {
        let meta_len = nbytes_of(py, meta.bind(py))?;
        self.pub_.call(py, "learn_array", (array_type, dtype, shape, meta.clone_ref(py), nbytes))?;
        self.array_meta = Some(meta);
        self.array_nbytes = meta_len + nbytes;
        Ok(())
    }

    /// Send a frame whose single buffer was written in place in `loan` (zero copy). `buffer`
    /// is the caller's view of the loaned memory, kept for replay.
    #[pyo3(signature = (loan, meta, buffer, origin = 0, stream_id = 0, created_ns = 0))]
    #[allow(clippy::too_many_arguments)]
    fn send_loan(
        &mut self,
        py: Python<'_>,
        loan: &Bound<'_, PyAny>,
        meta: &Bound<'_, PyAny>,
        buffer: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
    ) -> PyResult<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let loan_send = |seq: u64| -> PyResult<usize> {
            let kw = pyo3::types::PyDict::new(py);
            kw.set_item(intern!(py, "origin"), origin)?;
            kw.set_item(intern!(py, "stream_id"), stream_id)?;
            kw.set_item(intern!(py, "created_ns"), created_ns)?;
            loan.call_method(intern!(py, "send"), (seq, KIND_DATA, meta), Some(&kw))?.extract()
        };
        if !self.lossless {
            loan_send(seq)?;
            self.sent += 1;
            self.zero_copy += 1;
            self.notify(py)?;
            return Ok(seq);
        }
        if seq < self.committed {
            loan.call_method0(intern!(py, "discard"))?;
            return Ok(seq);
        }
        let nbytes = nbytes_of(py, meta)? + nbytes_of(py, buffer)?;
        let mut r = Ret {
            seq,
            kind: KIND_DATA,
            meta: meta.clone().unbind(),
            buffers: vec![buffer.clone().unbind()],
            origin,
            stream_id,
            created_ns,
            nbytes,
            loaned: true,
        };
        if self.undelivered.is_some() {
            // Out of order now: it must wait its turn like any frame, from private memory.
            r.buffers = vec![pyo3::types::PyMemoryView::from(buffer)?.call_method0(intern!(py, "tobytes"))?.unbind()];
            r.loaned = false;
            loan.call_method0(intern!(py, "discard"))?;
            self.keep(py, r, None, false)?;
            return Ok(seq);
        }
        let n = match loan_send(seq) {
            Ok(n) => n,
            Err(e) => {
                self.keep(py, r, None, false)?; // its seq is taken: a replay must find it
                return Err(e);
            }
        };
        self.keep(py, r, Some(n), true)?;
        if n > 0 {
            self.zero_copy += 1;
        }
        Ok(seq)
    }

    /// A chunk of this edge's publisher for an in-place output frame.
    fn loan(&mut self, py: Python<'_>, nbytes: usize) -> PyResult<Py<PyAny>> {
        self.secure(py)?;
        Ok(self.pub_.call(py, "loan", (nbytes,))?.unbind())
    }

    fn _secure(&mut self, py: Python<'_>) -> PyResult<()> {
        self.secure(py)
    }

    fn _notify(&self, py: Python<'_>) -> PyResult<()> {
        self.notify(py)
    }

    /// Consume acks. True when the consumer made progress.
    fn poll_acks(&mut self, py: Python<'_>) -> PyResult<bool> {
        self.poll(py)
    }

    fn _probed(&mut self, py: Python<'_>, want: u64, probed_ns: u64) -> PyResult<()> {
        self.probed(py, want, probed_ns)
    }

    /// The consumer processed `processed` frames and committed `committed`; forget the
    /// committed ones. True on progress.
    fn apply_ack(&mut self, processed: u64, committed: u64) -> bool {
        self.apply(processed, committed)
    }

    /// Send again every retained frame with seq > after (a consumer restarted).
    fn replay(&mut self, py: Python<'_>, after: i64) -> PyResult<()> {
        if !self.lossless {
            // Nothing is kept on a lossy edge: what the dead consumer had queued is gone, so
            // count it as taken, and repeat the end of the stream if it was already sent.
            self.pub_.update_connections(py)?;
            self.processed = self.next_seq - u64::from(self.eos_sent);
            if self.eos_sent {
                self.pub_.send_empty(py, frame_header(self.next_seq - 1, KIND_EOS, 0, 0, 0))?;
                self.notify(py)?;
            }
            return Ok(());
        }
        self.pub_.update_connections(py)?;
        // The restarted consumer has processed nothing beyond its commit.
        self.processed = self.processed.min((after + 1).max(0) as u64);
        let first = self.retained.iter().map(|r| r.seq as i64).find(|&s| s > after);
        if let Some(first) = first {
            let first = first as u64;
            if self.undelivered.is_none_or(|u| first < u) {
                self.undelivered = Some(first);
            }
        }
        self.retry_at = 0.0;
        self.resend(py, true)?;
        Ok(())
    }

    /// Send the undelivered tail in order, if its retry time has come. True when the whole
    /// tail went out.
    #[pyo3(signature = (force = false))]
    fn resend_due(&mut self, py: Python<'_>, force: bool) -> PyResult<bool> {
        self.resend(py, force)
    }

    #[getter]
    fn next_retry(&self) -> Option<f64> {
        self.undelivered.map(|_| self.retry_at)
    }

    #[getter]
    fn fully_acked(&self) -> bool {
        if !self.lossless {
            return self.processed >= self.next_seq;
        }
        self.retained.is_empty()
    }

    /// Release every port of this end (idempotent).
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.retained.clear();
        self.retained_bytes = 0;
        self.loaned_retained = 0;
        self.array_meta = None;
        self.pub_.close(py)?;
        self.ack.close(py)?;
        self.notifier_.close(py)
    }
}
