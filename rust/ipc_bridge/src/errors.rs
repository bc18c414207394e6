//! Python exceptions raised by the bridge.
//!
//! The classes are defined once, in `remotemedia/errors.py`, and imported here, so Python code
//! catches the exact same types whether an error comes from Rust or from Python.

use pyo3::PyErr;

pyo3::import_exception!(remotemedia.errors, ServiceError);
pyo3::import_exception!(remotemedia.errors, PortError);
pyo3::import_exception!(remotemedia.errors, LoanError);
pyo3::import_exception!(remotemedia.errors, SendError);
pyo3::import_exception!(remotemedia.errors, ReceiveError);
pyo3::import_exception!(remotemedia.errors, WaitError);
pyo3::import_exception!(remotemedia.errors, TransportError);
pyo3::import_exception!(remotemedia.errors, SharedMemoryFullError);

/// `what` says which operation on which resource failed; `e` is the iceoryx2 error.
pub fn service_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    ServiceError::new_err(format!("{what}: {e:?}"))
}

pub fn port_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    PortError::new_err(format!("{what}: {e:?}"))
}

pub fn loan_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    LoanError::new_err(format!("{what}: {e:?}"))
}

pub fn send_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    SendError::new_err(format!("{what}: {e:?}"))
}

pub fn receive_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    ReceiveError::new_err(format!("{what}: {e:?}"))
}

pub fn wait_err(what: impl core::fmt::Display, e: impl core::fmt::Debug) -> PyErr {
    WaitError::new_err(format!("{what}: {e:?}"))
}

pub fn transport_err(what: impl core::fmt::Display) -> PyErr {
    TransportError::new_err(what.to_string())
}

/// A chunk's memory could not be reserved: `what` (a frame of `frame_bytes` on `service`)
/// failed for lack of room in `full.directory`.
pub fn shm_full_err(full: &crate::reserve::Full, what: String, frame_bytes: usize, service: &str) -> PyErr {
    SharedMemoryFullError::new_err((
        full.directory.clone(),
        full.size,
        full.free,
        full.needed,
        crate::reserve::SHM_RESERVE,
        what,
        frame_bytes,
        service.to_owned(),
    ))
}
