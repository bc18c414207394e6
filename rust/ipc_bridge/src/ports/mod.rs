//! The exactly-once edge ends (the books of `supervisor/channels.py`, whose module docstring
//! draws the protocol) and the stage loop that drives them.
//!
//! ```text
//!   OutPort (outport.rs)                          InPort (inport.rs)
//!   seq, retention, window, resends  -- data -->  order checks, duplicates, gaps
//!   acks, commits, probes            <-- ack ---  acks (processed, committed), probes
//! ```
//!
//! Python keeps the policy (restarts, snapshots, options, errors): its `OutPort`/`InPort`
//! subclass these, make their transport ports and keep the edge's spec. The ports drive the
//! transport through [`transport`]: this crate's iceoryx2 ports directly, or any Python object
//! with the same methods (the in-memory fake of the unit tests).

pub mod books;
pub mod inport;
pub mod outport;
pub mod retain;
pub mod stage;
pub mod transport;

use pyo3::prelude::*;

pub(crate) const KIND_DATA: u32 = crate::pubsub::KIND_DATA;
pub(crate) const KIND_EOS: u32 = 1;
pub(crate) const KIND_ACK: u32 = 2;
pub(crate) const KIND_PROBE: u32 = 3;

/// Seconds of `clock` (None: CLOCK_MONOTONIC, as `time.monotonic()`).
pub(crate) fn now_s(py: Python<'_>, clock: &Option<Py<PyAny>>) -> PyResult<f64> {
    match clock {
        None => Ok(crate::pubsub::monotonic_ns() as f64 / 1e9),
        Some(c) => c.bind(py).call0()?.extract(),
    }
}
