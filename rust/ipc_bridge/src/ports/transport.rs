//! The bridge ports an edge end drives: iceoryx2 ones of this crate, called directly, or any
//! Python objects with the same methods (the in-memory fake of `tests/test_ports.py`).

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::TransportError;
use crate::event::Notifier;
use crate::pubsub::{header, FrameHeader, Publisher, Sample, Subscriber};

/// What an ack channel's newest frame said: `(seq, origin, stream_id, created_ns, kind)`.
pub(crate) type AckInfo = (u64, u64, u64, u64, u32);

pub(crate) enum Pub {
    Iox(Py<Publisher>),
    Py(Py<PyAny>),
}

pub(crate) enum Sub {
    Iox(Py<Subscriber>),
    Py(Py<PyAny>),
}

pub(crate) enum Notif {
    Iox(Py<Notifier>),
    Py(Py<PyAny>),
}

impl Pub {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> Self {
        match obj.cast::<Publisher>() {
            Ok(p) => Pub::Iox(p.clone().unbind()),
            Err(_) => Pub::Py(obj.clone().unbind()),
        }
    }

    pub(crate) fn object(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Pub::Iox(p) => p.clone_ref(py).into_any(),
            Pub::Py(o) => o.clone_ref(py),
        }
    }

    /// Publishes one frame: the number of subscribers reached (0: discarded) and the frame's
    /// bytes (meta and buffers).
    pub(crate) fn send(&self, py: Python<'_>, h: FrameHeader, meta: &Bound<'_, PyAny>, buffers: &[Py<PyAny>]) -> PyResult<(usize, u64)> {
        match self {
            Pub::Iox(p) => {
                let bufs: Vec<&Bound<'_, PyAny>> = buffers.iter().map(|b| b.bind(py)).collect();
                p.get().send_objects(py, h, meta, &bufs)
            }
            Pub::Py(o) => {
                let kw = PyDict::new(py);
                kw.set_item(intern!(py, "origin"), h.origin)?;
                kw.set_item(intern!(py, "stream_id"), h.stream_id)?;
                kw.set_item(intern!(py, "created_ns"), h.created_ns)?;
                let bufs: Vec<Py<PyAny>> = buffers.iter().map(|b| b.clone_ref(py)).collect();
                let n = o.bind(py).call_method(intern!(py, "send"), (h.seq, h.kind, meta, bufs), Some(&kw))?.extract()?;
                Ok((n, frame_bytes(meta, buffers)?))
            }
        }
    }

    /// A frame without payload (acks, probes).
    pub(crate) fn send_empty(&self, py: Python<'_>, h: FrameHeader) -> PyResult<usize> {
        match self {
            Pub::Iox(p) => p.get().send_empty(py, h),
            Pub::Py(o) => {
                let kw = PyDict::new(py);
                kw.set_item(intern!(py, "origin"), h.origin)?;
                kw.set_item(intern!(py, "stream_id"), h.stream_id)?;
                kw.set_item(intern!(py, "created_ns"), h.created_ns)?;
                let meta = pyo3::types::PyBytes::new(py, b"");
                let bufs: Vec<Py<PyAny>> = Vec::new();
                o.bind(py).call_method(intern!(py, "send"), (h.seq, h.kind, meta, bufs), Some(&kw))?.extract()
            }
        }
    }

    /// The hot path: -1 when the publisher cannot encode `array` itself.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_array(
        &self,
        py: Python<'_>,
        seq: u64,
        array: &Bound<'_, PyAny>,
        origin: u64,
        stream_id: u64,
        created_ns: u64,
        notifier: Option<&Notif>,
    ) -> PyResult<isize> {
        match (self, notifier) {
            (Pub::Iox(p), Some(Notif::Iox(n))) => p.get().send_array_to(py, seq, array, origin, stream_id, created_ns, Some(n.get())),
            (Pub::Iox(p), None) => p.get().send_array_to(py, seq, array, origin, stream_id, created_ns, None),
            _ => self
                .call(py, "send_array", (seq, array, origin, stream_id, created_ns, notifier.map(|n| n.object(py))))?
                .extract(),
        }
    }

    pub(crate) fn call<'py>(&self, py: Python<'py>, name: &str, args: impl pyo3::call::PyCallArgs<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.object(py).into_bound(py).call_method1(name, args)
    }

    pub(crate) fn update_connections(&self, py: Python<'_>) -> PyResult<()> {
        match self {
            Pub::Iox(p) => p.get().update_connections(),
            Pub::Py(o) => o.bind(py).call_method0(intern!(py, "update_connections")).map(|_| ()),
        }
    }

    pub(crate) fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.object(py).bind(py).call_method0(intern!(py, "close")).map(|_| ())
    }
}

impl Sub {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> Self {
        match obj.cast::<Subscriber>() {
            Ok(s) => Sub::Iox(s.clone().unbind()),
            Err(_) => Sub::Py(obj.clone().unbind()),
        }
    }

    pub(crate) fn object(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Sub::Iox(s) => s.clone_ref(py).into_any(),
            Sub::Py(o) => o.clone_ref(py),
        }
    }

    /// The next frame as a Python object (a Sample, or the fake's), or None.
    pub(crate) fn receive(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self {
            Sub::Iox(s) => match s.get().receive_sample()? {
                Some(sample) => Ok(Some(Py::new(py, sample)?.into_any())),
                None => Ok(None),
            },
            Sub::Py(o) => {
                let r = o.bind(py).call_method0(intern!(py, "receive"))?;
                Ok(if r.is_none() { None } else { Some(r.unbind()) })
            }
        }
    }

    /// Reads an ack channel to its newest frame; the header of that one.
    pub(crate) fn newest_ack(&self, py: Python<'_>) -> PyResult<Option<AckInfo>> {
        let mut newest = None;
        match self {
            Sub::Iox(s) => {
                let s = s.get();
                while let Some(sample) = s.receive_sample()? {
                    let h = sample.header;
                    newest = Some((h.seq, h.origin, h.stream_id, h.created_ns, h.kind));
                }
            }
            Sub::Py(o) => loop {
                let r = o.bind(py).call_method0(intern!(py, "receive"))?;
                if r.is_none() {
                    break;
                }
                let (seq, origin, stream_id, created_ns, _sent, kind): (u64, u64, u64, u64, u64, u32) =
                    r.getattr(intern!(py, "info"))?.extract()?;
                newest = Some((seq, origin, stream_id, created_ns, kind));
            },
        }
        Ok(newest)
    }

    /// `take()`: a decoded tuple, a Sample, or None.
    pub(crate) fn take(&self, py: Python<'_>, expected: u64, borrow_limit: usize) -> PyResult<Option<Py<PyAny>>> {
        match self {
            Sub::Iox(s) => s.get().take(py, expected, borrow_limit),
            Sub::Py(o) => {
                let r = o.bind(py).call_method1(intern!(py, "take"), (expected, borrow_limit))?;
                Ok(if r.is_none() { None } else { Some(r.unbind()) })
            }
        }
    }

    /// Payload length of the frame `take()` last returned decoded (0: unknown).
    pub(crate) fn last_len(&self, py: Python<'_>) -> usize {
        match self {
            Sub::Iox(s) => s.get().last_len(),
            Sub::Py(o) => o.bind(py).getattr(intern!(py, "last_len")).and_then(|v| v.extract()).unwrap_or(0),
        }
    }

    /// The iceoryx2 subscriber behind this port (None for a Python transport).
    pub(crate) fn iox(&self, py: Python<'_>) -> Option<Py<Subscriber>> {
        match self {
            Sub::Iox(s) => Some(s.clone_ref(py)),
            Sub::Py(_) => None,
        }
    }

    pub(crate) fn has_samples(&self, py: Python<'_>) -> PyResult<bool> {
        match self {
            Sub::Iox(s) => s.get().has_samples(),
            Sub::Py(o) => o.bind(py).call_method0(intern!(py, "has_samples"))?.extract(),
        }
    }

    pub(crate) fn borrowed(&self, py: Python<'_>) -> PyResult<usize> {
        self.object(py).bind(py).getattr(intern!(py, "borrowed"))?.extract()
    }

    pub(crate) fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.object(py).bind(py).call_method0(intern!(py, "close")).map(|_| ())
    }
}

/// `(seq, kind, payload length)` of a received frame object.
pub(crate) fn sample_info(py: Python<'_>, s: &Bound<'_, PyAny>) -> PyResult<(u64, u32, usize)> {
    if let Ok(sample) = s.cast::<Sample>() {
        let sample = sample.get();
        return Ok((sample.header.seq, sample.header.kind, sample.len));
    }
    Ok((s.getattr(intern!(py, "seq"))?.extract()?, s.getattr(intern!(py, "kind"))?.extract()?, s.len()?))
}

impl Notif {
    pub(crate) fn new(obj: &Bound<'_, PyAny>) -> Self {
        match obj.cast::<Notifier>() {
            Ok(n) => Notif::Iox(n.clone().unbind()),
            Err(_) => Notif::Py(obj.clone().unbind()),
        }
    }

    pub(crate) fn object(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Notif::Iox(n) => n.clone_ref(py).into_any(),
            Notif::Py(o) => o.clone_ref(py),
        }
    }

    /// Wakes the other end for `nbytes` of frames; a peer that is gone is not an error (it is
    /// woken by its restart).
    pub(crate) fn notify(&self, py: Python<'_>, nbytes: usize) -> PyResult<()> {
        match self {
            Notif::Iox(n) => {
                n.get().notify_quiet(py, nbytes);
                Ok(())
            }
            Notif::Py(o) => match o.bind(py).call_method0(intern!(py, "notify")) {
                Ok(_) => Ok(()),
                Err(e) if e.is_instance_of::<TransportError>(py) => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    pub(crate) fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.object(py).bind(py).call_method0(intern!(py, "close")).map(|_| ())
    }
}

pub(crate) fn frame_header(seq: u64, kind: u32, origin: u64, stream_id: u64, created_ns: u64) -> FrameHeader {
    header(seq, kind, origin, stream_id, created_ns, 0)
}

/// Bytes of a frame: its meta and every buffer (any buffer-protocol objects).
pub(crate) fn frame_bytes(meta: &Bound<'_, PyAny>, buffers: &[Py<PyAny>]) -> PyResult<u64> {
    let py = meta.py();
    let mut n = buffer_bytes(meta)?;
    for b in buffers {
        n += buffer_bytes(b.bind(py))?;
    }
    Ok(n)
}

/// Bytes of one buffer-protocol object.
pub(crate) fn buffer_bytes(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(b) = obj.cast::<pyo3::types::PyBytes>() {
        return Ok(b.as_bytes().len() as u64);
    }
    Ok(crate::pubsub::RawBuffer::get(obj)?.len() as u64)
}
