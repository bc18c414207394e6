//! What a producer keeps of a small frame for replay when the frame still views a chunk it
//! received: a copy, in a buffer reused from a pool, so that the chunk goes back upstream as
//! soon as `process()` is done with it.
//!
//! A pass-through stage returns its input, a view on the received chunk. Kept as it is, the
//! view holds the chunk until the frame is committed downstream; small frames stream at tens
//! of thousands a second and their commits come back hundreds of frames later, so the input
//! port soon reaches its borrow limit and copies every frame it takes into a fresh Python
//! `bytes` (a malloc, a free when committed, an array's buffer info) instead. Copying the
//! few KiB here, into a buffer this port had already, costs less; big frames (above
//! [`COPY_MAX`]) are kept as views (their copy would cost more than holding the chunk: the
//! retention allowance of `supervisor/protocol.py` sizes the input's borrow limit for them).

use std::sync::{Arc, Mutex};

use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};
use std::os::raw::c_int;

use crate::pubsub::{fill_view, RawBuffer, Sample};

/// Frames of at most this many bytes (meta and buffers) are kept as copies when they view a
/// received chunk.
pub(crate) const COPY_MAX: u64 = 64 << 10;
/// Bytes of spare buffers a port's pool keeps for its next frames.
const POOL_BYTES: usize = 4 << 20;

/// Spare buffers of one output port (shared with the buffers it handed out, which come back
/// when they are dropped).
#[derive(Clone, Default)]
pub(crate) struct Pool(Arc<Mutex<Spare>>);

#[derive(Default)]
struct Spare {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut spare = self.0.lock().expect("pool poisoned");
        match spare.bufs.pop() {
            Some(mut v) => {
                spare.bytes -= v.capacity();
                v.clear();
                v.reserve(len);
                v
            }
            None => Vec::with_capacity(len),
        }
    }

    fn put(&self, v: Vec<u8>) {
        let mut spare = self.0.lock().expect("pool poisoned");
        if v.capacity() as u64 <= COPY_MAX && spare.bytes + v.capacity() <= POOL_BYTES {
            spare.bytes += v.capacity();
            spare.bufs.push(v);
        }
    }

    /// A read-only copy of `obj`'s bytes (any contiguous buffer-protocol object).
    pub(crate) fn copy_of(&self, obj: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let src = RawBuffer::get(obj)?;
        self.copy_slice(obj.py(), src.as_slice())
    }

    /// A read-only copy of `bytes`.
    pub(crate) fn copy_slice(&self, py: Python<'_>, bytes: &[u8]) -> PyResult<Py<PyAny>> {
        let mut buf = self.take(bytes.len());
        copy_around_cache(&mut buf, bytes);
        Ok(Py::new(py, KeptBytes { buf, pool: self.clone() })?.into_any())
    }
}

/// Appends `src` to the empty `dst` with stores that bypass the cache where the CPU has them: a
/// retained copy is read again only for a replay, and its buffer (one of the hundreds a port
/// keeps between commits) is cold, so ordinary stores would first read each of its lines in.
fn copy_around_cache(dst: &mut Vec<u8>, src: &[u8]) {
    debug_assert!(dst.is_empty() && dst.capacity() >= src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let p = dst.as_mut_ptr();
        // (streaming stores want 16-byte aligned destinations: the allocator's are)
        if (p as usize).is_multiple_of(16) && src.len() >= 256 {
            let n = src.len() / 16 * 16;
            unsafe {
                for i in (0..n).step_by(16) {
                    let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                    _mm_stream_si128(p.add(i) as *mut __m128i, v);
                }
                _mm_sfence();
                std::ptr::copy_nonoverlapping(src.as_ptr().add(n), p.add(n), src.len() - n);
                dst.set_len(src.len());
            }
            return;
        }
    }
    dst.extend_from_slice(src);
}

/// A retained frame's buffer: a private copy, read-only through the buffer protocol.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct KeptBytes {
    buf: Vec<u8>,
    pool: Pool,
}

impl Drop for KeptBytes {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[pymethods]
impl KeptBytes {
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        let (ptr, len) = (this.buf.as_ptr() as usize, this.buf.len());
        unsafe { fill_view(view, flags, ptr, len, true, slf.into_any()) }
    }

    fn __len__(&self) -> usize {
        self.buf.len()
    }
}

/// True when `obj` (an array, a memoryview, a Sample) views a received chunk: keeping it keeps
/// the chunk from its publisher.
pub(crate) fn views_chunk(obj: &Bound<'_, PyAny>) -> bool {
    let py = obj.py();
    let mut cur = obj.clone();
    // (numpy collapses chains of views to the owner; a memoryview of an array adds one step)
    for _ in 0..4 {
        if cur.is_instance_of::<Sample>() {
            return true;
        }
        if cur.is_exact_instance_of::<PyBytes>() {
            return false;
        }
        let next = if let Ok(mv) = cur.cast::<PyMemoryView>() {
            mv.getattr(intern!(py, "obj")).ok().filter(|n| !n.is_none())
        } else {
            // (an array's base read from its fields: no attribute lookup per frame)
            crate::ndarray::base(&cur)
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    false
}
