//! The producer end of an edge: sequence numbers, retention for replay, acks and commits, the
//! window, resends. The protocol is drawn in `supervisor/channels.py`; this is its
//! implementation, and the Python class `supervisor.channels.OutPort` builds one (it makes
//! the transport ports and keeps the edge's spec).

use pyo3::intern;
use pyo3::prelude::*;

use super::books::{Assign, Kept, OutBooks};
use super::retain::{views_chunk, Pool, COPY_MAX};
use super::transport::{buffer_bytes, frame_bytes, frame_header, Notif, Pub, Sub};
use super::{now_s, KIND_DATA, KIND_EOS, KIND_PROBE};

/// What a retained frame needs to be sent again (its seq and size are the books').
pub(crate) struct Ret {
    kind: u32,
    meta: Py<PyAny>,
    buffers: Vec<Py<PyAny>>,
    origin: u64,
    stream_id: u64,
    created_ns: u64,
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

/// Producer end of an edge (see `supervisor/channels.py` for the protocol).
#[pyclass(module = "remotemedia._ipc_bridge", subclass, name = "OutPortCore")]
pub struct OutPort {
    pub_: Pub,
    ack: Sub,
    notifier_: Notif,
    clock: Option<Py<PyAny>>,
    /// "src -> dst", for messages.
    name: String,
    books: OutBooks<Ret>,
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
    /// Frames sent with notify=False wait for flush_notify().
    #[pyo3(get)]
    notify_pending: bool,
    /// Bytes of frames sent since the consumer was last woken.
    unwoken: u64,
    array_meta: Option<Py<PyAny>>,
    /// a learned array's frame: meta and buffer
    array_nbytes: u64,
    /// a learned array's buffer alone
    array_buffer_nbytes: u64,
    /// Buffers for the copies of small retained frames (see retain.rs).
    pool: Pool,
    /// Retained frames kept as such copies.
    #[pyo3(get)]
    retained_copies: u64,
}

impl OutPort {
    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        now_s(py, &self.clock)
    }

    /// Wakes the consumer for the frames sent since the last wake-up (`unwoken` bytes).
    pub(crate) fn notify(&mut self, py: Python<'_>) -> PyResult<()> {
        let nbytes = std::mem::take(&mut self.unwoken);
        self.notifier_.notify(py, nbytes as usize)
    }

    /// Retain a frame of a lossless edge for replay, and book its publish: it reached `n`
    /// subscribers (then wake the consumer if `notify`); 0: it was discarded, so it and every
    /// later frame are resent in order after a backoff; None: it was not published (an
    /// earlier frame is still undelivered, or the publish raised).
    fn keep(&mut self, py: Python<'_>, k: Kept<Ret>, n: Option<usize>, notify: bool) -> PyResult<()> {
        let (seq, nbytes) = (k.seq, k.nbytes);
        self.books.keep(k);
        match n {
            None => {}
            Some(0) => {
                self.discarded += 1;
                let now = self.now(py)?;
                self.books.discarded(seq, now);
            }
            Some(_) => {
                self.sent += 1;
                self.unwoken += nbytes;
                if notify {
                    self.notify(py)?;
                }
            }
        }
        Ok(())
    }

    /// What to keep of a lossless frame's buffer for replay: the buffer itself, or a copy when
    /// the frame (`nbytes` in all) is small and the buffer views a received chunk (see
    /// retain.rs). `bytes`: the buffer's memory when the caller has it already.
    fn retainable(&mut self, buffer: &Bound<'_, PyAny>, bytes: Option<&[u8]>, nbytes: u64) -> PyResult<Py<PyAny>> {
        if nbytes > COPY_MAX || !views_chunk(buffer) {
            return Ok(buffer.clone().unbind());
        }
        self.retained_copies += 1;
        match bytes {
            Some(b) => self.pool.copy_slice(buffer.py(), b),
            None => self.pool.copy_of(buffer),
        }
    }

    fn publish(&mut self, py: Python<'_>, i: usize) -> PyResult<bool> {
        let k = &self.books.retained[i];
        let r = &k.frame;
        let h = frame_header(k.seq, r.kind, r.origin, r.stream_id, r.created_ns);
        let (n, _) = self.pub_.send(py, h, r.meta.bind(py), &r.buffers)?;
        if n == 0 {
            self.discarded += 1;
        } else {
            self.unwoken += k.nbytes;
        }
        Ok(n > 0)
    }

    pub(crate) fn iox_ack_sub(&self, py: Python<'_>) -> Option<Py<crate::pubsub::Subscriber>> {
        self.ack.iox(py)
    }

    pub(crate) fn committed_seq(&self) -> u64 {
        self.books.committed
    }

    pub(crate) fn undelivered_any(&self) -> bool {
        self.books.undelivered.is_some()
    }

    /// True when a lossless edge has room in its window (read for every frame).
    #[inline]
    pub(crate) fn has_room(&self) -> bool {
        self.books.has_room()
    }

    pub(crate) fn flush(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.notify_pending {
            self.notify_pending = false;
            self.notify(py)?;
        }
        Ok(())
    }

    /// The hot path of `send()`: a bare array like the learned one, encoded by the publisher.
    /// False when the caller must encode and `send()`. With `notify` false the consumer is
    /// woken by a later `flush()` (a batch).
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
        let b = &self.books;
        if b.undelivered.is_some() || b.loaned_retained > 0 || b.next_seq < b.committed || b.consumer_finished {
            return Ok(false); // (out of order, regenerated after a restart, or for nobody: send() knows)
        }
        let seq = b.next_seq;
        let n = self.pub_.send_array(py, seq, value, origin, stream_id, created_ns, notify.then_some(&self.notifier_))?;
        if n < 0 {
            return Ok(false);
        }
        let _ = self.books.assign(false);
        if !notify && n > 0 {
            self.notify_pending = true;
        }
        if !self.books.lossless && !notify {
            self.unwoken += self.array_nbytes; // (a lossless frame is counted by keep())
        }
        self.encoded_by_bridge += 1;
        if !self.books.lossless {
            self.sent += 1;
            return Ok(true);
        }
        let meta = meta.clone_ref(py);
        // (its bytes read from the array's fields, as send_array did: numpy's buffer request
        // costs a third of the retained copy)
        let bytes = crate::ndarray::contiguous(value).map(|a| {
            // SAFETY: send_array took it: a C-contiguous array of the learned dtype and shape,
            // `array_buffer_nbytes` bytes at `data`, alive while `value` is
            unsafe { std::slice::from_raw_parts(a.data, self.array_buffer_nbytes as usize) }
        });
        let buffer = self.retainable(value, bytes, self.array_nbytes)?;
        let frame = Ret { kind: KIND_DATA, meta, buffers: vec![buffer], origin, stream_id, created_ns };
        let k = Kept { seq, nbytes: self.array_nbytes, loaned: false, frame };
        // (the publisher notified the consumer already, or the batch will)
        self.keep(py, k, Some(n as usize), false)?;
        Ok(true)
    }

    /// The hot path of a media frame (a container the stage loop encoded: its meta, and each
    /// array with the address and length of its bytes), published from that memory. False
    /// when the caller must `send()` it (out of order, after a restart, a Python transport).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn try_send_encoded(
        &mut self,
        py: Python<'_>,
        meta: &[u8],
        parts: &[crate::container::Part],
        origin: u64,
        stream_id: u64,
        created_ns: u64,
    ) -> PyResult<bool> {
        let b = &self.books;
        if b.undelivered.is_some() || b.loaned_retained > 0 || b.next_seq < b.committed || b.consumer_finished {
            return Ok(false);
        }
        let Pub::Iox(publisher) = &self.pub_ else { return Ok(false) };
        let seq = b.next_seq;
        let slices: crate::layout::PerBuffer<(usize, usize)> = parts.iter().map(|p| (p.1, p.2)).collect();
        let nbytes = (meta.len() + slices.iter().map(|s| s.1).sum::<usize>()) as u64;
        let n = publisher.get().send_slices(py, frame_header(seq, KIND_DATA, origin, stream_id, created_ns), meta, &slices)?;
        let _ = self.books.assign(false);
        if n > 0 {
            self.notify_pending = true;
        }
        if !self.books.lossless {
            self.sent += 1;
            self.unwoken += nbytes;
            return Ok(true);
        }
        let mut buffers = Vec::with_capacity(parts.len());
        for (obj, ptr, len) in parts {
            // (the array is alive: its bytes are)
            let bytes = unsafe { std::slice::from_raw_parts(*ptr as *const u8, *len) };
            buffers.push(self.retainable(obj.bind(py), Some(bytes), nbytes)?);
        }
        let meta = pyo3::types::PyBytes::new(py, meta).into_any().unbind();
        let frame = Ret { kind: KIND_DATA, meta, buffers, origin, stream_id, created_ns };
        self.keep(py, Kept { seq, nbytes, loaned: false, frame }, Some(n), false)?;
        Ok(true)
    }

    /// Copy-on-reuse: before this publisher loans a chunk again, retained frames that still
    /// point into chunks it sent get a private copy (their chunk may be the next loan).
    pub(crate) fn secure(&mut self, py: Python<'_>) -> PyResult<()> {
        if self.books.loaned_retained == 0 {
            return Ok(());
        }
        self.poll(py)?; // frames committed meanwhile need no copy
        if self.books.loaned_retained == 0 {
            return Ok(());
        }
        for k in self.books.retained.iter_mut() {
            if k.loaned {
                let mut copies = Vec::with_capacity(k.frame.buffers.len());
                for b in &k.frame.buffers {
                    let view = pyo3::types::PyMemoryView::from(b.bind(py))?;
                    copies.push(view.call_method0(intern!(py, "tobytes"))?.unbind());
                }
                k.frame.buffers = copies;
                k.loaned = false;
                self.copied_on_reuse += 1;
            }
        }
        self.books.loaned_retained = 0;
        Ok(())
    }

    /// Consumes acks; true when the consumer made progress. A probe read here may resend.
    pub(crate) fn poll(&mut self, py: Python<'_>) -> PyResult<bool> {
        let Some((processed, committed, want, probed_ns, kind)) = self.ack.newest_ack(py)? else { return Ok(false) };
        let progress = self.books.apply(processed, committed);
        if kind == KIND_PROBE {
            self.probed(py, want, probed_ns)?;
        }
        Ok(progress)
    }

    /// See OutBooks::probed: a frame published but never delivered is sent again.
    fn probed(&mut self, py: Python<'_>, want: u64, probed_ns: u64) -> PyResult<()> {
        let now_ns = (self.now(py)? * 1e9) as u64;
        let Some((from, end)) = self.books.probed(want, probed_ns, now_ns) else { return Ok(()) };
        self.lost += end - from;
        let msg = format!(
            "edge {}: frames {}..{} were published but never reached the consumer (lost by the transport); resending them",
            self.name,
            from,
            end - 1
        );
        py.import(intern!(py, "logging"))?
            .call_method1(intern!(py, "getLogger"), ("remotemedia.supervisor",))?
            .call_method1(intern!(py, "warning"), (msg,))?;
        self.pub_.update_connections(py)?;
        self.resend(py, true)?;
        Ok(())
    }

    /// Send the undelivered tail in order, if its retry time has come. True when the whole
    /// tail went out.
    pub(crate) fn resend(&mut self, py: Python<'_>, force: bool) -> PyResult<bool> {
        let now = self.now(py)?;
        if self.books.due(now, force).is_none() {
            return Ok(self.books.undelivered.is_none());
        }
        self.secure(py)?; // (may read acks: the tail is looked up after it)
        let Some(due) = self.books.due(now, true) else { return Ok(true) };
        let mut sent_any = false;
        let mut stopped = None;
        for i in due {
            if !self.publish(py, i)? {
                stopped = Some(self.books.retained[i].seq);
                break;
            }
            sent_any = true;
            self.resent += 1;
        }
        if sent_any {
            self.notify(py)?;
        }
        let now = self.now(py)?;
        self.books.resent(stopped, sent_any, now);
        Ok(stopped.is_none())
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
        OutPort {
            pub_: Pub::new(publisher),
            ack: Sub::new(ack_subscriber),
            notifier_: Notif::new(notifier),
            clock,
            name,
            books: OutBooks::new(lossless, depth, max_bytes, next_seq, committed, consumer_finished),
            sent: 0,
            zero_copy: 0,
            copied_on_reuse: 0,
            encoded_by_bridge: 0,
            resent: 0,
            discarded: 0,
            lost: 0,
            notify_pending: false,
            unwoken: 0,
            array_meta: None,
            array_nbytes: 0,
            array_buffer_nbytes: 0,
            pool: Pool::default(),
            retained_copies: 0,
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
    fn lossless(&self) -> bool {
        self.books.lossless
    }

    #[getter]
    fn depth(&self) -> u64 {
        self.books.depth
    }

    #[getter]
    fn max_bytes(&self) -> u64 {
        self.books.max_bytes
    }

    /// The consumer's stream ended (known at a restart, or from `consumer_ended()`).
    #[getter]
    fn consumer_finished(&self) -> bool {
        self.books.consumer_finished
    }

    /// The consumer ended its stream and exited, having processed and committed these counts
    /// (its final commit, relayed by the supervisor): apply them, forget what is kept for it
    /// and skip whatever is sent to it later (see `OutBooks::consumer_ended`).
    fn consumer_ended(&mut self, processed: u64, committed: u64) {
        self.books.apply(processed, committed);
        self.books.consumer_ended();
    }

    #[getter]
    fn next_seq(&self) -> u64 {
        self.books.next_seq
    }

    /// Frames the consumer has processed (a count).
    #[getter]
    fn processed(&self) -> u64 {
        self.books.processed
    }

    /// Frames the consumer has committed (a count).
    #[getter]
    fn committed(&self) -> u64 {
        self.books.committed
    }

    #[getter]
    fn retained_bytes(&self) -> u64 {
        self.books.retained_bytes
    }

    /// Retained frames whose buffer is still a sent chunk.
    #[getter]
    fn loaned_retained(&self) -> u64 {
        self.books.loaned_retained
    }

    /// Seq of the first retained frame not known to be delivered (None: all delivered).
    #[getter]
    fn undelivered(&self) -> Option<u64> {
        self.books.undelivered
    }

    #[getter]
    fn eos_sent(&self) -> bool {
        self.books.eos_sent
    }

    #[getter]
    fn in_flight(&self) -> i64 {
        self.books.next_seq as i64 - self.books.processed as i64
    }

    /// The retained frames, oldest first (copies of the books, for tests and tools).
    #[getter]
    fn retained(&self, py: Python<'_>) -> Vec<Retained> {
        self.books
            .retained
            .iter()
            .map(|k| Retained {
                seq: k.seq,
                kind: k.frame.kind,
                meta: k.frame.meta.clone_ref(py),
                buffers: k.frame.buffers.iter().map(|b| b.clone_ref(py)).collect(),
                origin: k.frame.origin,
                stream_id: k.frame.stream_id,
                created_ns: k.frame.created_ns,
                nbytes: k.nbytes,
                loaned: k.loaned,
            })
            .collect()
    }

    #[getter]
    fn retained_count(&self) -> usize {
        self.books.retained.len()
    }

    /// True when a frame may be sent now (lossless: the window has room).
    fn can_send(&self) -> bool {
        self.has_room()
    }

    /// Queue one frame (the caller checked `can_send`) and publish it if the edge is in order.
    /// Returns the frame's seq. With `notify=False` the consumer is not woken yet: the caller
    /// sends more and then calls `flush_notify()` (one wake-up per batch).
    #[pyo3(name = "send", signature = (kind, meta, buffers, origin = 0, stream_id = 0, created_ns = 0, notify = true))]
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
        let seq = match self.books.assign(kind == KIND_EOS) {
            Assign::Skip(seq) => return Ok(seq),
            Assign::Send(seq) => seq,
        };
        if !self.books.lossless {
            let (_, nbytes) = self.pub_.send(py, frame_header(seq, kind, origin, stream_id, created_ns), meta, &buffers)?;
            self.sent += 1;
            self.unwoken += nbytes;
            if notify {
                self.notify(py)?;
            } else {
                self.notify_pending = true;
            }
            return Ok(seq);
        }
        let mut frame = Ret { kind, meta: meta.clone().unbind(), buffers, origin, stream_id, created_ns };
        let mut n = None;
        // (the frame's size comes from the publish, which reads every buffer anyway)
        let nbytes = if self.books.undelivered.is_none() {
            if self.books.loaned_retained > 0 {
                self.secure(py)?;
            }
            let h = frame_header(seq, kind, origin, stream_id, created_ns);
            match self.pub_.send(py, h, meta, &frame.buffers) {
                Ok((c, nbytes)) => {
                    n = Some(c);
                    nbytes
                }
                Err(e) => {
                    let nbytes = frame_bytes(meta, &frame.buffers)?;
                    // its seq is taken: a replay must find it
                    self.keep(py, Kept { seq, nbytes, loaned: false, frame }, None, false)?;
                    return Err(e);
                }
            }
        } else {
            frame_bytes(meta, &frame.buffers)?
        };
        for b in frame.buffers.iter_mut() {
            let obj = b.bind(py).clone();
            *b = self.retainable(&obj, None, nbytes)?;
        }
        self.keep(py, Kept { seq, nbytes, loaned: false, frame }, n, notify)?;
        if !notify && n.is_some_and(|c| c > 0) {
            self.notify_pending = true;
        }
        Ok(seq)
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
        let meta_len = buffer_bytes(meta.bind(py))?;
        self.pub_.call(py, "learn_array", (array_type, dtype, shape, meta.clone_ref(py), nbytes))?;
        self.array_meta = Some(meta);
        self.array_nbytes = meta_len + nbytes;
        self.array_buffer_nbytes = nbytes;
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
        let loan_send = |seq: u64| -> PyResult<usize> {
            let kw = pyo3::types::PyDict::new(py);
            kw.set_item(intern!(py, "origin"), origin)?;
            kw.set_item(intern!(py, "stream_id"), stream_id)?;
            kw.set_item(intern!(py, "created_ns"), created_ns)?;
            loan.call_method(intern!(py, "send"), (seq, KIND_DATA, meta), Some(&kw))?.extract()
        };
        let seq = match self.books.assign(false) {
            Assign::Skip(seq) => {
                loan.call_method0(intern!(py, "discard"))?;
                return Ok(seq);
            }
            Assign::Send(seq) => seq,
        };
        if !self.books.lossless {
            loan_send(seq)?;
            self.sent += 1;
            self.zero_copy += 1;
            self.unwoken += buffer_bytes(buffer)?;
            self.notify(py)?;
            return Ok(seq);
        }
        let nbytes = buffer_bytes(meta)? + buffer_bytes(buffer)?;
        let frame = Ret { kind: KIND_DATA, meta: meta.clone().unbind(), buffers: vec![buffer.clone().unbind()], origin, stream_id, created_ns };
        let mut k = Kept { seq, nbytes, loaned: true, frame };
        if self.books.undelivered.is_some() {
            // Out of order now: it must wait its turn like any frame, from private memory.
            k.frame.buffers = vec![pyo3::types::PyMemoryView::from(buffer)?.call_method0(intern!(py, "tobytes"))?.unbind()];
            k.loaned = false;
            loan.call_method0(intern!(py, "discard"))?;
            self.keep(py, k, None, false)?;
            return Ok(seq);
        }
        let n = match loan_send(seq) {
            Ok(n) => n,
            Err(e) => {
                self.keep(py, k, None, false)?; // its seq is taken: a replay must find it
                return Err(e);
            }
        };
        self.keep(py, k, Some(n), true)?;
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

    fn _notify(&mut self, py: Python<'_>) -> PyResult<()> {
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
        self.books.apply(processed, committed)
    }

    /// Send again every retained frame with seq > after (a consumer restarted).
    fn replay(&mut self, py: Python<'_>, after: i64) -> PyResult<()> {
        self.pub_.update_connections(py)?;
        if self.books.replay(after) {
            self.pub_.send_empty(py, frame_header(self.books.next_seq - 1, KIND_EOS, 0, 0, 0))?;
            self.notify(py)?;
        }
        if self.books.lossless {
            self.resend(py, true)?;
        }
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
        self.books.undelivered.map(|_| self.books.retry_at)
    }

    #[getter]
    fn fully_acked(&self) -> bool {
        self.books.fully_acked()
    }

    /// Release every port of this end (idempotent).
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        self.books.retained.clear();
        self.books.retained_bytes = 0;
        self.books.loaned_retained = 0;
        self.array_meta = None;
        self.pub_.close(py)?;
        self.ack.close(py)?;
        self.notifier_.close(py)
    }
}
