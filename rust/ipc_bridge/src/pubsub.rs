//! Frame publish/subscribe over iceoryx2 `[u8]` services with a [`FrameHeader`] user header.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use iceoryx2::port::publisher::Publisher as IoxPublisher;
use iceoryx2::port::update_connections::UpdateConnections;
use iceoryx2::port::subscriber::Subscriber as IoxSubscriber;
use iceoryx2::prelude::*;
use iceoryx2::sample::Sample as IoxSample;
use iceoryx2::sample_mut_uninit::SampleMutUninit;
use iceoryx2::service::port_factory::publish_subscribe::PortFactory;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::intern;
use pyo3::types::PyBytes;

use crate::errors::{loan_err, port_err, receive_err, send_err, service_err, shm_full_err, transport_err};
use crate::layout;
use crate::event::Notifier;
use crate::node::{Anchor, Node, Svc};
use crate::reserve::{self, Plan, Reserver};

/// Kind of an ordinary data frame. Frame kinds are defined by `remotemedia.frames.Kind`; this
/// copy must equal `Kind.DATA` (tests/test_ports.py checks it through `_ipc_bridge.KIND_DATA`).
pub const KIND_DATA: u32 = 0;

/// Copies above this size release the GIL while they run.
const GIL_FREE_COPY: usize = 64 * 1024;

/// Fixed header of every frame, stored in the iceoryx2 user header (no serialization).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, ZeroCopySend)]
#[type_name("RemoteMediaFrameHeaderV1")]
pub struct FrameHeader {
    /// Sequence number on this edge (an ack frame: frames processed, see `Kind.ACK` in
    /// remotemedia/frames.py).
    pub seq: u64,
    /// Index of the pipeline input (or source item) this frame derives from (an ack frame:
    /// frames committed).
    pub origin: u64,
    /// Application stream id.
    pub stream_id: u64,
    /// CLOCK_MONOTONIC ns when the originating input entered the pipeline.
    pub created_ns: u64,
    /// CLOCK_MONOTONIC ns when this frame was published.
    pub sent_ns: u64,
    /// Frame kind (data, end of stream, ack), defined by `remotemedia.frames.Kind`.
    pub kind: u32,
    /// Free flags, defined by Python.
    pub flags: u32,
    /// Length of the meta bytes in the payload.
    pub meta_len: u32,
    /// Number of out-of-band buffers in the payload.
    pub nbufs: u32,
}

type Factory = PortFactory<Svc, [u8], FrameHeader>;
type Uninit = SampleMutUninit<Svc, [core::mem::MaybeUninit<u8>], FrameHeader>;

/// CLOCK_MONOTONIC in nanoseconds, the clock of `time.monotonic_ns()` (system-wide on Linux,
/// so timestamps compare across processes).
#[pyfunction]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Clone, Copy, Debug)]
struct ChannelOpts {
    max_publishers: usize,
    max_subscribers: usize,
    buffer_size: usize,
    max_borrowed: usize,
    history: usize,
    safe_overflow: bool,
    max_nodes: usize,
}

fn open_service(node: &Node, name: &str, o: ChannelOpts) -> PyResult<Factory> {
    let service_name = ServiceName::new(name)
        .map_err(|e| service_err(format!("invalid service name {name:?}"), e))?;
    node.with(|n| {
        n.service_builder(&service_name)
            .publish_subscribe::<[u8]>()
            .user_header::<FrameHeader>()
            // Buffer offsets are multiples of BUFFER_ALIGN; the payload start must be too.
            .payload_alignment(Alignment::new(layout::BUFFER_ALIGN).expect("power of two"))
            .max_publishers(o.max_publishers)
            .max_subscribers(o.max_subscribers)
            .subscriber_max_buffer_size(o.buffer_size)
            .subscriber_max_borrowed_samples(o.max_borrowed)
            .history_size(o.history)
            .enable_safe_overflow(o.safe_overflow)
            .max_nodes(o.max_nodes)
            .open_or_create()
            .map_err(|e| {
                service_err(
                    format!(
                        "opening frame service {name:?} ({o:?}); both ends must use the same settings \
                         and the same iceoryx2 release ({})",
                        crate::ICEORYX2_VERSION
                    ),
                    e,
                )
            })
    })
}

/// Address of the first byte of a contiguous buffer-protocol object. The worker uses it to
/// recognise a frame buffer that is one of its loaned chunks (numpy's `__array_interface__`
/// would build a dict per frame for the same number).
#[pyfunction]
pub fn buffer_address(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    Ok(RawBuffer::get(obj)?.ptr() as usize)
}

/// A borrowed Python buffer (PyBUF_SIMPLE: contiguous bytes), released on drop.
pub(crate) struct RawBuffer {
    view: Box<ffi::Py_buffer>,
}

impl RawBuffer {
    pub(crate) fn get(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_SIMPLE) };
        if rc == -1 {
            return Err(PyErr::fetch(obj.py()));
        }
        Ok(Self { view })
    }
    fn ptr(&self) -> *const u8 {
        self.view.buf as *const u8
    }
    pub(crate) fn len(&self) -> usize {
        self.view.len as usize
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.len() == 0 {
            return &[];
        }
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }
}

impl Drop for RawBuffer {
    fn drop(&mut self) {
        Python::attach(|_| unsafe { ffi::PyBuffer_Release(&mut *self.view) });
    }
}

/// Raw copy job that may cross into a GIL-free closure: the source buffers stay exported (and
/// the destination chunk loaned) for the whole copy.
struct CopyJob {
    parts: layout::PerBuffer<(usize, usize, usize)>, // (src ptr, dst offset, len)
    dst: usize,
}
unsafe impl Send for CopyJob {}

impl CopyJob {
    fn run(&self) {
        for &(src, off, len) in &self.parts {
            unsafe { core::ptr::copy_nonoverlapping(src as *const u8, (self.dst as *mut u8).add(off), len) };
        }
    }
}

pub(crate) fn header(seq: u64, kind: u32, origin: u64, stream_id: u64, created_ns: u64, flags: u32) -> FrameHeader {
    FrameHeader { seq, origin, stream_id, created_ns, sent_ns: 0, kind, flags, meta_len: 0, nbufs: 0 }
}

/// Publishing end of one frame service.
///
/// Frames are copied into a loaned shared-memory chunk (the copy releases the GIL above 64 KiB)
/// and sent. `send()` never blocks: the service discards a frame when the subscriber's queue is
/// full, and reports it by returning 0 (the caller keeps the frame and sends it again).
///
/// A chunk's memory is reserved before the first write into it (see [`reserve`]): a full
/// shared-memory filesystem raises SharedMemoryFullError instead of killing the process.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Publisher {
    port: Mutex<Port>,
    #[pyo3(get)]
    service: String,
    tx_cache: Mutex<Option<TxCache>>,
    anchor: Anchor<Factory>,
}

/// The iceoryx2 publisher (None once closed) and what is known of its chunks, under one lock:
/// a loan and the check that its chunk is reserved take it once.
struct Port {
    publisher: Option<IoxPublisher<Svc, [u8], FrameHeader>>,
    reserver: Reserver,
    /// whether `payload_address` was checked against iceoryx2's own
    layout_checked: bool,
}

/// What `Publisher.send_array()` needs to encode an array by itself: the array type, dtype and
/// shape it accepts, and the meta Python encoded for them (Python decides what qualifies).
struct TxCache {
    array_type: Py<PyAny>,
    dtype: Py<PyAny>,
    dims: Vec<isize>,
    meta: Arc<[u8]>,
    nbytes: usize,
}

/// The address of a loaned chunk's payload: right after our user header, aligned as the
/// service was built (`BUFFER_ALIGN`), which is how iceoryx2 lays a chunk out
/// (`MessageTypeDetails::payload_ptr_from_header`). Not `payload_mut()`, which takes two
/// locks to learn the slice's length (~360 instructions, a tenth of a send); the first loan
/// of each publisher compares the two (`checked`), so that another layout is an error, not
/// frames written to the wrong place.
fn payload_address(sample: &mut Uninit, checked: &mut bool) -> PyResult<usize> {
    let user_header = sample.user_header_mut() as *mut FrameHeader as usize;
    let payload = (user_header + std::mem::size_of::<FrameHeader>()).next_multiple_of(layout::BUFFER_ALIGN);
    if !*checked {
        let actual = sample.payload_mut().as_mut_ptr() as usize;
        if actual != payload {
            return Err(transport_err(format!(
                "iceoryx2 {} lays a chunk out differently than this bridge expects (payload at \
                 user header + {}, not + {}): rebuild the bridge against the iceoryx2 release it names",
                crate::ICEORYX2_VERSION,
                actual as isize - user_header as isize,
                payload - user_header
            )));
        }
        *checked = true;
    }
    Ok(payload)
}

impl Publisher {
    fn with<R>(&self, f: impl FnOnce(&IoxPublisher<Svc, [u8], FrameHeader>) -> PyResult<R>) -> PyResult<R> {
        let guard = self.port.lock().expect("publisher mutex poisoned");
        match guard.publisher.as_ref() {
            Some(p) => f(p),
            None => Err(transport_err(format!("publisher of {:?} is closed", self.service))),
        }
    }

    /// `send()` for the ports: `meta` and `buffers` are any contiguous buffer-protocol objects.
    /// Returns the subscribers reached and the frame's bytes (meta and buffers).
    pub(crate) fn send_objects<'py, B: std::borrow::Borrow<Bound<'py, PyAny>>>(
        &self,
        py: Python<'py>,
        h: FrameHeader,
        meta: &Bound<'py, PyAny>,
        buffers: &[B],
    ) -> PyResult<(usize, u64)> {
        let meta_buf = RawBuffer::get(meta)?;
        let bufs = buffers.iter().map(|b| RawBuffer::get(b.borrow())).collect::<PyResult<Vec<_>>>()?;
        let parts: layout::PerBuffer<(usize, usize)> = bufs.iter().map(|b| (b.ptr() as usize, b.len())).collect();
        let nbytes = (meta_buf.len() + parts.iter().map(|p| p.1).sum::<usize>()) as u64;
        Ok((self.send_parts(py, h, (meta_buf.ptr() as usize, meta_buf.len()), &parts)?, nbytes))
    }

    /// `send()` of a frame whose meta and buffers the caller has as memory: `parts` are
    /// `(address, len)` of buffers that stay valid during the call. Returns the subscribers
    /// reached.
    pub(crate) fn send_slices(&self, py: Python<'_>, h: FrameHeader, meta: &[u8], parts: &[(usize, usize)]) -> PyResult<usize> {
        self.send_parts(py, h, (meta.as_ptr() as usize, meta.len()), parts)
    }

    /// A frame with no payload (acks, probes, ends of stream): the header says it all.
    pub(crate) fn send_empty(&self, py: Python<'_>, h: FrameHeader) -> PyResult<usize> {
        let empty: &[u8] = &[]; // (a dangling but non-null pointer: copying 0 bytes from it is sound)
        self.send_parts(py, h, (empty.as_ptr() as usize, 0), &[])
    }

    /// Copies `meta` and the `(ptr, len)` buffers into one chunk and sends it.
    fn send_parts(&self, py: Python<'_>, mut h: FrameHeader, meta: (usize, usize), bufs: &[(usize, usize)]) -> PyResult<usize> {
        let lens: layout::PerBuffer<usize> = bufs.iter().map(|b| b.1).collect();
        let lay = layout::compute(meta.1, &lens).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if meta.1 > u32::MAX as usize || bufs.len() > u32::MAX as usize {
            return Err(PyValueError::new_err("frame meta larger than 4 GiB"));
        }
        let seq = h.seq;
        // The port lock is held to loan and to send, not across the copy: a big copy releases
        // the GIL, and another thread waiting for this lock with the GIL held would deadlock
        // with us (iceoryx2 ports are not thread-safe, so the lock itself must stay).
        let (mut sample, dst) = self.loan_reserved(py, lay.total, || format!("frame {seq} ({} bytes) on {:?}", lay.total, self.service))?;
        unsafe { layout::write_table(dst as *mut u8, &lay, &lens) };
        let mut parts = layout::PerBuffer::with_capacity(bufs.len() + 1);
        parts.push((meta.0, lay.meta_offset, meta.1));
        for (&(ptr, len), &off) in bufs.iter().zip(&lay.buffer_offsets) {
            parts.push((ptr, off, len));
        }
        let job = CopyJob { parts, dst };
        if lay.total >= GIL_FREE_COPY {
            py.detach(|| job.run());
        } else {
            job.run();
        }
        h.meta_len = meta.1 as u32;
        h.nbufs = bufs.len() as u32;
        h.sent_ns = monotonic_ns();
        *sample.user_header_mut() = h;
        let sample = unsafe { sample.assume_init() };
        self.with(|_| sample.send().map_err(|e| send_err(format!("sending frame {seq} on {:?}", self.service), e)))
    }

    /// Loans a chunk for a payload of `total` bytes whose memory (header to end of payload)
    /// is there to be written, and the payload's address; `what` names the frame for the
    /// error.
    fn loan_reserved(&self, py: Python<'_>, total: usize, what: impl FnOnce() -> String) -> PyResult<(Uninit, usize)> {
        let (sample, start, end, payload, plan) = {
            let mut guard = self.port.lock().expect("publisher mutex poisoned");
            let Port { publisher, reserver, layout_checked } = &mut *guard;
            let p = publisher.as_ref().ok_or_else(|| transport_err(format!("publisher of {:?} is closed", self.service)))?;
            let mut sample = self.loan_uninit(p, total)?;
            let header = sample.header() as *const _ as usize;
            let payload = payload_address(&mut sample, layout_checked)?;
            let (start, end) = (reserve::page_down(header.min(payload)), reserve::page_up(payload + total.max(1)));
            let plan = reserver.plan(start, end);
            (sample, start, end, payload, plan)
        };
        let Plan::Reserve(segment, from) = plan else { return Ok((sample, payload)) };
        // (first use of a chunk: the GIL is released, the system calls may wait for a lock)
        let result = py.detach(|| segment.reserve(from, end, reserve::page_up(payload)));
        self.port.lock().expect("publisher mutex poisoned").reserver.done(start, end, result.is_ok());
        result.map_err(|full| shm_full_err(&full, what(), total, &self.service))?;
        Ok((sample, payload))
    }

    fn loan_uninit(&self, p: &IoxPublisher<Svc, [u8], FrameHeader>, total: usize) -> PyResult<Uninit> {
        // iceoryx2 cannot loan an empty slice; one byte keeps header-only frames uniform.
        p.loan_slice_uninit(total.max(1)).map_err(|e| {
            loan_err(
                format!("loaning {total} bytes on {:?} (shared memory exhausted or too many frames held)", self.service),
                e,
            )
        })
    }

    /// `send_array()` for the ports.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_array_to(
        &self,
        py: Python<'_>,
        seq: u64,
        array: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notifier: Option<&Notifier>,
    ) -> PyResult<isize> {
        let (meta, data, nbytes) = {
            let guard = self.tx_cache.lock().expect("publisher cache poisoned");
            let Some(c) = guard.as_ref() else { return Ok(-1) };
            if array.get_type().as_ptr() != c.array_type.as_ptr() {
                return Ok(-1);
            }
            let Some(a) = crate::ndarray::contiguous(array) else { return Ok(-1) };
            // Builtin dtypes are singletons; flexible ones (strings, datetimes with a unit, other
            // byte orders) are new objects with every array, so identity falls back to equality.
            if a.dims != c.dims.as_slice()
                || (a.descr != c.dtype.as_ptr() && !array.getattr(intern!(py, "dtype"))?.eq(c.dtype.bind(py))?)
            {
                return Ok(-1);
            }
            // (type, dtype and shape are what Python vetted, so the bytes are `nbytes`; the guard
            // is not held across the copy, which may release the GIL)
            (c.meta.clone(), a.data as usize, c.nbytes)
        };
        let h = header(seq, KIND_DATA, origin, stream_id, created_ns, 0);
        let n = self.send_parts(py, h, (meta.as_ptr() as usize, meta.len()), &[(data, nbytes)])?;
        if n > 0
            && let Some(nt) = notifier
        {
            nt.notify_quiet(py, nbytes);
        }
        Ok(n as isize)
    }
}

#[pymethods]
impl Publisher {
    /// Creates the publisher of service `service` (created on first use).
    #[new]
    #[pyo3(signature = (node, service, *, max_subscribers = 2, buffer_size = 16, max_borrowed = 8,
                        history = 0, safe_overflow = false, max_publishers = 1, max_nodes = 16,
                        initial_max_slice_len = 4096, max_loaned = 2))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: Py<Node>,
        service: &str,
        max_subscribers: usize,
        buffer_size: usize,
        max_borrowed: usize,
        history: usize,
        safe_overflow: bool,
        max_publishers: usize,
        max_nodes: usize,
        initial_max_slice_len: usize,
        max_loaned: usize,
    ) -> PyResult<Self> {
        let opts = ChannelOpts {
            max_publishers,
            max_subscribers,
            buffer_size,
            max_borrowed,
            history,
            safe_overflow,
            max_nodes,
        };
        let factory = open_service(node.get(), service, opts)?;
        let publisher = factory
            .publisher_builder()
            .initial_max_slice_len(initial_max_slice_len.max(1))
            .allocation_strategy(AllocationStrategy::PowerOfTwo)
            .backpressure_strategy(BackpressureStrategy::DiscardData)
            .max_loaned_samples(max_loaned)
            .create()
            .map_err(|e| port_err(format!("creating publisher on {service:?}"), e))?;
        Ok(Self {
            port: Mutex::new(Port { publisher: Some(publisher), reserver: Reserver::default(), layout_checked: false }),
            service: service.to_owned(),
            tx_cache: Mutex::new(None),
            anchor: Anchor::new(factory, node),
        })
    }

    /// Sends one frame: `meta` and every buffer of `buffers` (any contiguous buffer-protocol
    /// objects) are copied into one shared-memory chunk. Returns the number of subscribers
    /// that received it (0: nobody connected, or the subscriber's queue was full).
    #[pyo3(signature = (seq, kind, meta, buffers = Vec::new(), *, origin = 0, stream_id = 0, created_ns = 0, flags = 0))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        seq: u64,
        kind: u32,
        meta: &Bound<'_, PyAny>,
        buffers: Vec<Bound<'_, PyAny>>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        flags: u32,
    ) -> PyResult<usize> {
        Ok(self.send_objects(py, header(seq, kind, origin, stream_id, created_ns, flags), meta, &buffers)?.0)
    }

    /// Tells `send_array()` which arrays it may encode by itself: exactly of type `array_type`,
    /// with this dtype object and this shape, whose bytes Python encodes as `meta` followed by
    /// one buffer of `nbytes` bytes. One entry: a new one replaces the last.
    fn learn_array(&self, array_type: Py<PyAny>, dtype: Py<PyAny>, shape: Vec<isize>, meta: &[u8], nbytes: usize) {
        *self.tx_cache.lock().expect("publisher cache poisoned") =
            Some(TxCache { array_type, dtype, dims: shape, meta: meta.into(), nbytes });
    }

    /// The hot path of a stage's output: encodes `array` with the learned meta (see
    /// `learn_array()`), copies it into a chunk, sends it and wakes `notifier`, in one call.
    /// Returns the number of subscribers reached (0: discarded, as `send()`), or -1 without
    /// sending anything when `array` is not like the learned one (the caller encodes it in
    /// Python and calls `send()`).
    #[pyo3(signature = (seq, array, origin = 0, stream_id = 0, created_ns = 0, notifier = None))]
    #[allow(clippy::too_many_arguments)]
    fn send_array(
        &self,
        py: Python<'_>,
        seq: u64,
        array: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notifier: Option<&Bound<'_, Notifier>>,
    ) -> PyResult<isize> {
        self.send_array_to(py, seq, array, origin, stream_id, created_ns, notifier.map(|n| n.get()))
    }

    /// Loans a chunk for a frame whose single out-of-band buffer of `nbytes` bytes is written in
    /// place (zero-copy send). `meta_reserve` bytes are kept for the meta written by
    /// `Loan.send()`.
    #[pyo3(signature = (nbytes, meta_reserve = 4032))]
    pub(crate) fn loan(slf: Bound<'_, Self>, nbytes: usize, meta_reserve: usize) -> PyResult<Loan> {
        let this = slf.get();
        let lay = layout::compute(meta_reserve, &[nbytes]).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let (sample, base) = this.loan_reserved(slf.py(), lay.total, || {
            format!("a loan of {nbytes} bytes (Node.allocate()) on {:?}", this.service)
        })?;
        Ok(Loan {
            inner: Mutex::new(Some(sample)),
            base,
            data_offset: lay.buffer_offsets[0],
            nbytes,
            meta_reserve,
            publisher: slf.unbind(),
        })
    }

    /// Connects to subscribers that appeared since the last send (e.g. a restarted consumer).
    pub(crate) fn update_connections(&self) -> PyResult<()> {
        self.with(|p| p.update_connections().map_err(|e| send_err(format!("updating connections of {:?}", self.service), e)))
    }

    /// Releases the port, its service and its node (further calls raise TransportError).
    /// Frames sent stay with their subscribers; a pending Loan keeps its chunk until it is
    /// sent or discarded. Idempotent.
    fn close(&self) {
        let port = {
            let mut guard = self.port.lock().expect("publisher mutex poisoned");
            // (the reserver holds the segment's file and directory open)
            (guard.publisher.take(), std::mem::take(&mut guard.reserver))
        };
        drop(port);
        let cache = self.tx_cache.lock().expect("publisher cache poisoned").take();
        drop(cache);
        self.anchor.release();
    }

    fn __repr__(&self) -> String {
        format!("<ipc_bridge.Publisher service={:?}>", self.service)
    }
}

/// A chunk loaned for an in-place frame: a writable buffer of `nbytes` bytes. `send()` hands it
/// to the subscribers without any copy; afterwards it can no longer be exported.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Loan {
    inner: Mutex<Option<Uninit>>,
    base: usize,
    data_offset: usize,
    #[pyo3(get)]
    nbytes: usize,
    meta_reserve: usize,
    publisher: Py<Publisher>,
}

#[pymethods]
impl Loan {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        if this.inner.lock().expect("loan mutex poisoned").is_none() {
            return Err(PyBufferError::new_err("this loaned frame was already sent"));
        }
        let ptr = this.base + this.data_offset;
        unsafe { fill_view(view, flags, ptr, this.nbytes, false, slf.into_any()) }
    }

    /// Address of the writable data region (to recognise the array later).
    #[getter]
    fn address(&self) -> usize {
        self.base + self.data_offset
    }

    /// True until `send()` (or `discard()`) was called.
    #[getter]
    fn pending(&self) -> bool {
        self.inner.lock().expect("loan mutex poisoned").is_some()
    }

    /// Writes `meta` into the reserved space and sends the frame. Returns the number of
    /// subscribers reached.
    #[pyo3(signature = (seq, kind, meta, *, origin = 0, stream_id = 0, created_ns = 0, flags = 0))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        seq: u64,
        kind: u32,
        meta: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        flags: u32,
    ) -> PyResult<usize> {
        let meta_buf = RawBuffer::get(meta)?;
        if meta_buf.len() > self.meta_reserve {
            return Err(PyValueError::new_err(format!(
                "frame meta of {} bytes exceeds the {} bytes reserved in the loan",
                meta_buf.len(),
                self.meta_reserve
            )));
        }
        let mut sample = self
            .inner
            .lock()
            .expect("loan mutex poisoned")
            .take()
            .ok_or_else(|| transport_err("this loaned frame was already sent"))?;
        let lens = [self.nbytes];
        let lay = layout::Layout { meta_offset: layout::ENTRY_SIZE, buffer_offsets: smallvec::smallvec![self.data_offset], total: 0 };
        unsafe {
            layout::write_table(self.base as *mut u8, &lay, &lens);
            core::ptr::copy_nonoverlapping(meta_buf.ptr(), (self.base as *mut u8).add(layout::ENTRY_SIZE), meta_buf.len());
        }
        let mut h = header(seq, kind, origin, stream_id, created_ns, flags);
        h.meta_len = meta_buf.len() as u32;
        h.nbufs = 1;
        h.sent_ns = monotonic_ns();
        *sample.user_header_mut() = h;
        let sample = unsafe { sample.assume_init() };
        let publisher = self.publisher.get();
        publisher.with(|_| {
            sample.send().map_err(|e| send_err(format!("sending loaned frame {seq} on {:?}", publisher.service), e))
        })
    }

    /// Returns the chunk to the pool without sending it.
    fn discard(&self) {
        self.inner.lock().expect("loan mutex poisoned").take();
    }
}

/// Receiving end of one frame service.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Subscriber {
    subscriber: Mutex<Option<IoxSubscriber<Svc, [u8], FrameHeader>>>,
    borrowed: Arc<AtomicUsize>,
    rx_cache: Mutex<Option<RxCache>>,
    /// `(loads, max meta bytes)` of the pickled-object hot path (see `learn_pickle()`)
    rx_pickle: Mutex<Option<(Py<PyAny>, usize)>>,
    /// Set by `learn_containers()`: container frames (see container.rs) are decoded by `take()`.
    rx_container: Mutex<Option<crate::container::Codec>>,
    /// Payload length of the last frame `take()` returned decoded (the consumer sizes its
    /// producer's window from it).
    last_len: AtomicUsize,
    /// Frames `take()` decoded into a private copy because `borrow_limit` frames were held.
    copied: AtomicU64,
    #[pyo3(get)]
    max_borrowed: usize,
    #[pyo3(get)]
    service: String,
    anchor: Anchor<Factory>,
}

/// What `Subscriber.take()` needs to decode a frame by itself: the meta Python decoded as a bare
/// array, the payload length of such frames, and the array's dtype (a `numpy.dtype`) and shape.
struct RxCache {
    meta: Vec<u8>,
    payload_len: usize,
    dtype: Py<PyAny>,
    dims: Arc<[isize]>,
    /// the buffer's bytes: count x itemsize
    nbytes: usize,
}

/// What `take()` got: a frame the subscriber decoded, or a Sample for Python to handle.
pub(crate) enum Taken {
    /// `(data, seq, origin, stream_id, created_ns, sent_ns)`
    Decoded(Py<PyAny>, u64, u64, u64, u64, u64),
    Sample(Py<PyAny>),
}

impl Taken {
    /// As Python sees it: the tuple `(data, seq, origin, stream_id, created_ns, sent_ns)`, or
    /// the Sample.
    pub(crate) fn into_object(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Taken::Decoded(data, seq, origin, stream_id, created_ns, sent_ns) => {
                (data, seq, origin, stream_id, created_ns, sent_ns).into_pyobject(py)?.into_any().unbind()
            }
            Taken::Sample(s) => s,
        })
    }

    /// From what a Python transport's `take()` returned.
    pub(crate) fn from_object(obj: Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(if obj.is_instance_of::<pyo3::types::PyTuple>() {
            let (data, seq, origin, stream_id, created_ns, sent_ns) = obj.extract()?;
            Taken::Decoded(data, seq, origin, stream_id, created_ns, sent_ns)
        } else {
            Taken::Sample(obj.unbind())
        })
    }
}

impl Subscriber {
    /// `take()` of a frame that is not a learned array: a small pickled object, decoded; the
    /// Sample otherwise.
    fn take_pickled(&self, py: Python<'_>, sample: Sample, expected: u64, copy: bool) -> PyResult<Option<Taken>> {
        let h = &sample.header;
        let (m0, m1) = sample.meta;
        if h.seq == expected
            && h.kind == KIND_DATA
            && !sample.buffers.is_empty()
            && m1 - m0 > 4
            && unsafe { std::slice::from_raw_parts((sample.ptr + m0) as *const u8, 4) } == crate::container::CT_TAG
        {
            let mut guard = self.rx_container.lock().expect("subscriber cache poisoned");
            if let Some(codec) = guard.as_mut() {
                let (seq, origin, stream_id, created_ns, sent_ns) = (h.seq, h.origin, h.stream_id, h.created_ns, h.sent_ns);
                self.last_len.store(sample.len, Ordering::Relaxed);
                let offsets = sample.buffers.clone();
                let (source, base) = if copy {
                    self.copied.fetch_add(1, Ordering::Relaxed);
                    // (a private copy of the payload, as Python's decode(copy=True); the chunk
                    // goes back now)
                    let data = unsafe { std::slice::from_raw_parts(sample.ptr as *const u8, sample.len) };
                    let private = PyBytes::new(py, data);
                    drop(sample);
                    let base = private.as_bytes().as_ptr() as usize;
                    (private.into_any(), base)
                } else {
                    let base = sample.ptr;
                    (Py::new(py, sample)?.into_bound(py).into_any(), base)
                };
                // (the meta and the offsets are the parsed layout's: inside the payload at
                // `base`, which `source` holds)
                let meta = unsafe { std::slice::from_raw_parts((base + m0) as *const u8, m1 - m0) };
                let obj = unsafe { codec.decode(py, meta, &source, base, &offsets)? };
                return Ok(Some(Taken::Decoded(obj.unbind(), seq, origin, stream_id, created_ns, sent_ns)));
            }
        }
        let loads = match self.rx_pickle.lock().expect("subscriber cache poisoned").as_ref() {
            Some((loads, max_meta))
                if h.seq == expected
                    && h.kind == KIND_DATA
                    && sample.buffers.is_empty()
                    && m1 > m0
                    && m1 - m0 <= *max_meta
                    && unsafe { *((sample.ptr + m0) as *const u8) } == 0x80 =>
            {
                loads.clone_ref(py)
            }
            _ => return Ok(Some(Taken::Sample(Py::new(py, sample)?.into_any()))),
        };
        let (seq, origin, stream_id, created_ns, sent_ns) = (h.seq, h.origin, h.stream_id, h.created_ns, h.sent_ns);
        self.last_len.store(sample.len, Ordering::Relaxed);
        let meta = PyBytes::new(py, unsafe { std::slice::from_raw_parts((sample.ptr + m0) as *const u8, m1 - m0) });
        drop(sample); // the chunk goes back to the publisher before the unpickling runs
        let obj = loads.bind(py).call1((meta,))?;
        Ok(Some(Taken::Decoded(obj.unbind(), seq, origin, stream_id, created_ns, sent_ns)))
    }

    /// The hot path of a stage's input. Receives the next frame; when it is the data frame
    /// `expected` carrying an array like the learned one (see `learn_array()`), returns
    /// `(array, seq, origin, stream_id, created_ns, sent_ns)` with `array` read-only: a view on
    /// shared memory while fewer than `borrow_limit` frames are held, else a private copy (the
    /// chunk goes back at once, as Python's `decode(copy=True)`). A small pickled object (see
    /// `learn_pickle()`) comes the same way, unpickled from a private copy of its bytes. Any
    /// other frame comes back as a `Sample` for Python to handle; None when the queue is empty.
    pub(crate) fn take_frame(&self, py: Python<'_>, expected: u64, borrow_limit: usize) -> PyResult<Option<Taken>> {
        // (counted before this frame, as Python's decode(copy=...) decision is)
        let copy = self.borrowed.load(Ordering::Acquire) >= borrow_limit;
        let Some(sample) = self.receive_sample()? else { return Ok(None) };
        let h = &sample.header;
        // (nothing is called back into Python while the cache is locked)
        let (dtype, dims) = {
            let guard = self.rx_cache.lock().expect("subscriber cache poisoned");
            match guard.as_ref() {
                Some(c)
                    if h.seq == expected
                        && h.kind == KIND_DATA
                        && sample.buffers.len() == 1
                        && sample.buffers[0].1 == c.nbytes
                        && sample.len == c.payload_len
                        && sample.meta.1 - sample.meta.0 == c.meta.len()
                        && unsafe {
                            std::slice::from_raw_parts((sample.ptr + sample.meta.0) as *const u8, c.meta.len())
                        } == c.meta.as_slice() =>
                {
                    (c.dtype.clone_ref(py), c.dims.clone())
                }
                _ => return self.take_pickled(py, sample, expected, copy),
            }
        };
        let (seq, origin, stream_id, created_ns, sent_ns) = (h.seq, h.origin, h.stream_id, h.created_ns, h.sent_ns);
        self.last_len.store(sample.len, Ordering::Relaxed);
        let (offset, nbytes) = sample.buffers[0];
        let data = unsafe { std::slice::from_raw_parts((sample.ptr + offset) as *const u8, nbytes) };
        // (the learned meta fixes the dtype and shape, and so the buffer's length)
        let arr = if copy {
            self.copied.fetch_add(1, Ordering::Relaxed);
            let private = PyBytes::new(py, data);
            drop(sample); // the chunk goes back to the publisher now
            let ptr = private.as_bytes().as_ptr();
            unsafe { crate::ndarray::view(dtype.bind(py), &dims, ptr, private.into_any())? }
        } else {
            let ptr = data.as_ptr();
            unsafe { crate::ndarray::view(dtype.bind(py), &dims, ptr, Py::new(py, sample)?.into_bound(py).into_any())? }
        };
        Ok(Some(Taken::Decoded(arr.unbind(), seq, origin, stream_id, created_ns, sent_ns)))
    }

    pub(crate) fn receive_sample(&self) -> PyResult<Option<Sample>> {
        let guard = self.subscriber.lock().expect("subscriber mutex poisoned");
        let sub = guard
            .as_ref()
            .ok_or_else(|| transport_err(format!("subscriber of {:?} is closed", self.service)))?;
        let Some(sample) = sub.receive().map_err(|e| {
            receive_err(
                format!(
                    "receiving on {:?} with {} of {} frames still held",
                    self.service,
                    self.borrowed.load(Ordering::Relaxed),
                    self.max_borrowed
                ),
                e,
            )
        })?
        else {
            return Ok(None);
        };
        let h = *sample.user_header();
        let payload: &[u8] = sample.payload();
        let parsed = layout::parse(payload, h.meta_len as usize, h.nbufs as usize)
            .map_err(|e| receive_err(format!("malformed frame {} on {:?}", h.seq, self.service), e.to_string()))?;
        let ptr = payload.as_ptr() as usize;
        let len = payload.len();
        self.borrowed.fetch_add(1, Ordering::AcqRel);
        Ok(Some(Sample {
            inner: Mutex::new(Some(sample)),
            ptr,
            len,
            header: h,
            meta: parsed.meta,
            buffers: parsed.buffers,
            borrowed: self.borrowed.clone(),
        }))
    }

    /// True when a frame is queued; no GIL needed (used while spinning).
    pub(crate) fn peek(&self) -> bool {
        match self.subscriber.lock() {
            Ok(g) => g.as_ref().map(|s| s.has_samples().unwrap_or(false)).unwrap_or(false),
            Err(_) => false,
        }
    }
}

#[pymethods]
impl Subscriber {
    /// Creates the subscriber of service `service` (created on first use, with the same
    /// settings as the publisher's).
    #[new]
    #[pyo3(signature = (node, service, *, max_subscribers = 2, buffer_size = 16, max_borrowed = 8,
                        history = 0, safe_overflow = false, max_publishers = 1, max_nodes = 16))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        node: Py<Node>,
        service: &str,
        max_subscribers: usize,
        buffer_size: usize,
        max_borrowed: usize,
        history: usize,
        safe_overflow: bool,
        max_publishers: usize,
        max_nodes: usize,
    ) -> PyResult<Self> {
        let opts = ChannelOpts {
            max_publishers,
            max_subscribers,
            buffer_size,
            max_borrowed,
            history,
            safe_overflow,
            max_nodes,
        };
        let factory = open_service(node.get(), service, opts)?;
        let subscriber = factory
            .subscriber_builder()
            .buffer_size(buffer_size)
            .create()
            .map_err(|e| port_err(format!("creating subscriber on {service:?}"), e))?;
        // Attach now: samples published before the first connection check would be lost.
        let _ = subscriber.has_samples();
        Ok(Self {
            subscriber: Mutex::new(Some(subscriber)),
            borrowed: Arc::new(AtomicUsize::new(0)),
            rx_cache: Mutex::new(None),
            rx_pickle: Mutex::new(None),
            rx_container: Mutex::new(None),
            last_len: AtomicUsize::new(0),
            copied: AtomicU64::new(0),
            max_borrowed,
            service: service.to_owned(),
            anchor: Anchor::new(factory, node),
        })
    }

    /// Returns the next frame, or None when the queue is empty. Never blocks.
    ///
    /// Raises ReceiveError when `max_borrowed` frames are still referenced from Python; the
    /// caller decides what to do (Python copies frames out before that limit is reached).
    fn receive(&self) -> PyResult<Option<Sample>> {
        self.receive_sample()
    }

    /// Tells `take()` how to decode frames whose meta is `meta` and whose payload is
    /// `payload_len` bytes: a read-only array of `count` items of `dtype` on the frame's buffer
    /// (as `numpy.frombuffer`), of shape `shape` unless it is None. One entry: a new one
    /// replaces the last.
    #[pyo3(signature = (meta, payload_len, dtype, count, shape = None))]
    fn learn_array(&self, meta: &[u8], payload_len: usize, dtype: &Bound<'_, PyAny>, count: usize, shape: Option<Vec<isize>>) -> PyResult<()> {
        let dtype = crate::ndarray::descr(dtype)?;
        let itemsize: usize = dtype.getattr(intern!(dtype.py(), "itemsize"))?.extract()?;
        let dims = shape.unwrap_or_else(|| vec![count as isize]);
        let n = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
        if n != Some(count) || count.checked_mul(itemsize).is_none_or(|b| b > payload_len) {
            return Err(PyValueError::new_err(format!(
                "learn_array: shape {dims:?} of {count} items of {itemsize} bytes does not fit a payload of {payload_len} bytes"
            )));
        }
        *self.rx_cache.lock().expect("subscriber cache poisoned") =
            Some(RxCache { meta: meta.to_vec(), payload_len, dtype: dtype.unbind(), dims: dims.into(), nbytes: count * itemsize });
        Ok(())
    }

    /// Lets `take()` decode small pickled frames itself: a data frame without out-of-band
    /// buffers whose meta is a pickle stream (protocol 2 or later: it starts with 0x80) of at
    /// most `max_meta` bytes becomes `loads(meta)` (Python's `decode()` of such a frame).
    fn learn_pickle(&self, loads: Py<PyAny>, max_meta: usize) {
        *self.rx_pickle.lock().expect("subscriber cache poisoned") = Some((loads, max_meta));
    }

    /// Lets `take()` decode container frames itself (flat dicts, tuples and lists holding
    /// arrays: see `remotemedia.frames`), their arrays read-only views on the shared memory
    /// (or on a private copy past the borrow limit).
    fn learn_containers(&self, py: Python<'_>) -> PyResult<()> {
        *self.rx_container.lock().expect("subscriber cache poisoned") = Some(crate::container::Codec::new(py)?);
        Ok(())
    }

    /// `take()` for Python (see `take_frame`): the tuple
    /// `(data, seq, origin, stream_id, created_ns, sent_ns)` or a Sample; None when the queue
    /// is empty.
    pub(crate) fn take(&self, py: Python<'_>, expected: u64, borrow_limit: usize) -> PyResult<Option<Py<PyAny>>> {
        self.take_frame(py, expected, borrow_limit)?.map(|t| t.into_object(py)).transpose()
    }

    /// True when at least one frame is queued.
    pub(crate) fn has_samples(&self) -> PyResult<bool> {
        let guard = self.subscriber.lock().expect("subscriber mutex poisoned");
        match guard.as_ref() {
            Some(s) => s
                .has_samples()
                .map_err(|e| receive_err(format!("checking {:?}", self.service), e)),
            None => Ok(false),
        }
    }

    /// Payload length of the last frame `take()` returned decoded.
    #[getter]
    pub(crate) fn last_len(&self) -> usize {
        self.last_len.load(Ordering::Relaxed)
    }

    /// Frames `take()` decoded into a private copy because the borrow limit was reached.
    #[getter]
    fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Number of received frames still referenced (not yet returned to the publisher).
    #[getter]
    fn borrowed(&self) -> usize {
        self.borrowed.load(Ordering::Acquire)
    }

    /// Releases the port, its service and its node (further receives raise TransportError).
    /// Samples received before stay valid: each keeps what it needs until it is gone.
    /// Idempotent.
    fn close(&self) {
        let subscriber = self.subscriber.lock().expect("subscriber mutex poisoned").take();
        drop(subscriber);
        let cache = self.rx_cache.lock().expect("subscriber cache poisoned").take();
        drop(cache);
        let pickle = self.rx_pickle.lock().expect("subscriber cache poisoned").take();
        drop(pickle);
        let codec = self.rx_container.lock().expect("subscriber cache poisoned").take();
        drop(codec);
        self.anchor.release();
    }

    fn __repr__(&self) -> String {
        format!("<ipc_bridge.Subscriber service={:?}>", self.service)
    }
}

/// One received frame. Exposes its payload through the (read-only) buffer protocol; the
/// shared-memory chunk goes back to the publisher when the Sample and every view of it are gone.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Sample {
    inner: Mutex<Option<IoxSample<Svc, [u8], FrameHeader>>>,
    ptr: usize,
    pub(crate) len: usize,
    pub(crate) header: FrameHeader,
    meta: (usize, usize),
    buffers: layout::PerBuffer<(usize, usize)>,
    borrowed: Arc<AtomicUsize>,
}

impl Drop for Sample {
    fn drop(&mut self) {
        if self.inner.get_mut().map(|s| s.take().is_some()).unwrap_or(false) {
            self.borrowed.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[pymethods]
impl Sample {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        unsafe { fill_view(view, flags, this.ptr, this.len, true, slf.into_any()) }
    }

    fn __len__(&self) -> usize {
        self.len
    }

    #[getter]
    fn seq(&self) -> u64 {
        self.header.seq
    }
    #[getter]
    fn origin(&self) -> u64 {
        self.header.origin
    }
    #[getter]
    fn stream_id(&self) -> u64 {
        self.header.stream_id
    }
    #[getter]
    fn created_ns(&self) -> u64 {
        self.header.created_ns
    }
    #[getter]
    fn sent_ns(&self) -> u64 {
        self.header.sent_ns
    }
    #[getter]
    fn kind(&self) -> u32 {
        self.header.kind
    }
    #[getter]
    fn flags(&self) -> u32 {
        self.header.flags
    }
    /// `(seq, origin, stream_id, created_ns, sent_ns, kind)` in one call.
    #[getter]
    fn info(&self) -> (u64, u64, u64, u64, u64, u32) {
        let h = &self.header;
        (h.seq, h.origin, h.stream_id, h.created_ns, h.sent_ns, h.kind)
    }

    /// `(start, end)` of the meta bytes in the payload.
    #[getter]
    fn meta(&self) -> (usize, usize) {
        self.meta
    }
    /// `(offset, len)` of every out-of-band buffer in the payload.
    #[getter]
    fn buffers(&self) -> Vec<(usize, usize)> {
        self.buffers.to_vec()
    }
    /// Address of the payload (for tests that check where the memory lies).
    #[getter]
    fn address(&self) -> usize {
        self.ptr
    }

    fn __repr__(&self) -> String {
        format!("<ipc_bridge.Sample seq={} kind={} len={}>", self.header.seq, self.header.kind, self.len)
    }
}

/// Fills a one-dimensional byte view. Read-only views refuse PyBUF_WRITABLE requests.
pub(crate) unsafe fn fill_view(
    view: *mut ffi::Py_buffer,
    flags: c_int,
    ptr: usize,
    len: usize,
    readonly: bool,
    owner: Bound<'_, PyAny>,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("Py_buffer view is null"));
    }
    if readonly && (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
        // numpy.frombuffer() asks for a writable view first and clears this error (every array
        // decoded from a frame): set it as CPython itself would, not as a pyo3 error, which
        // would build the exception object just to have it thrown away.
        unsafe {
            ffi::PyErr_SetString(
                ffi::PyExc_BufferError,
                c"a received frame is read-only shared memory; copy it (e.g. numpy.array(x)) to modify it".as_ptr(),
            );
        }
        return Err(PyErr::fetch(owner.py()));
    }
    unsafe {
        (*view).obj = owner.into_ptr();
        (*view).buf = ptr as *mut c_void;
        (*view).len = len as ffi::Py_ssize_t;
        (*view).readonly = readonly as c_int;
        (*view).itemsize = 1;
        (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT {
            c"B".as_ptr() as *mut _
        } else {
            core::ptr::null_mut()
        };
        (*view).ndim = 1;
        (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND { &mut (*view).len } else { core::ptr::null_mut() };
        (*view).strides =
            if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES { &mut (*view).itemsize } else { core::ptr::null_mut() };
        (*view).suboffsets = core::ptr::null_mut();
        (*view).internal = core::ptr::null_mut();
    }
    Ok(())
}
