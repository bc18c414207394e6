//! `remotemedia._ipc_bridge`: the iceoryx2 frame transport of remotemedia.
//!
//! The bridge moves frames (a small fixed header plus a payload laid out by [`layout`]) through
//! iceoryx2 publish-subscribe services, wakes waiters through iceoryx2 event services, exposes
//! dead-node cleanup and ties a worker's process group to its parent's life ([`process`]). It
//! also carries the data plane: the exactly-once books of every edge end and a stage's frame
//! loop ([`ports`]), and media frames encoded without pickle ([`container`]). Everything that
//! is policy (naming of services, queue depths, restarts, snapshots, commits, errors) is
//! decided in Python.
//!
//! ```text
//!  producer process                              consumer process
//!  ----------------                              ----------------
//!  Publisher.send(header, meta, buffers)         Listener.wait(timeout, fds)   (GIL released)
//!    loan chunk -> reserve its memory (first use   poll(listener fd + extra fds)
//!      of a chunk only: reserve.rs) -> memcpy
//!      (GIL released)
//!    -> iceoryx2 send ------ shared memory -----> Subscriber.receive() -> Sample
//!  Notifier.notify() ------- unix datagram -----> (wake-up)                  |
//!    (with doorbells: only to a consumer asleep,                             |
//!     a shared-memory mark otherwise: doorbell.rs)                           |
//!                                                 memoryview(Sample) zero-copy, read-only;
//!                                                 the chunk returns to the producer when
//!                                                 the last view is gone
//!
//!  hot path (a bare array like the one Python taught the port with `learn_array`):
//!  Publisher.send_array(seq, array, .., notifier)  Subscriber.take(expected, borrow_limit)
//!    encode + copy + send + notify, one call         -> (array view, seq, origin, ...) or
//!                                                       the Sample when it is anything else
//! ```

pub mod container;
pub mod doorbell;
pub mod errors;
pub mod event;
pub mod fasthash;
pub mod layout;
pub mod ndarray;
pub mod node;
pub mod ports;
pub mod process;
pub mod pubsub;
pub mod reserve;
pub mod service;

use pyo3::prelude::*;

/// The iceoryx2 release this bridge is built against. The Python `iceoryx2` package must be the
/// same release: services record it and refuse peers of another one.
pub const ICEORYX2_VERSION: &str = "0.10.0";

#[pymodule]
fn _ipc_bridge(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__iceoryx2_version__", ICEORYX2_VERSION)?;
    m.add("BUFFER_ALIGN", layout::BUFFER_ALIGN)?;
    m.add("KIND_DATA", pubsub::KIND_DATA)?;
    m.add("SHM_RESERVE", reserve::SHM_RESERVE)?;
    m.add_class::<node::Node>()?;
    m.add_class::<pubsub::Publisher>()?;
    m.add_class::<pubsub::Subscriber>()?;
    m.add_class::<pubsub::Sample>()?;
    m.add_class::<pubsub::Loan>()?;
    m.add_class::<doorbell::Doorbells>()?;
    m.add_class::<event::Notifier>()?;
    m.add_class::<event::Listener>()?;
    m.add_class::<ports::outport::OutPort>()?;
    m.add_class::<ports::outport::Retained>()?;
    m.add_class::<ports::retain::KeptBytes>()?;
    m.add_class::<ports::inport::InPort>()?;
    m.add_class::<ports::stage::StageLoop>()?;
    m.add_class::<ports::stage::FrameSlot>()?;
    m.add_class::<ports::stage::FrameCounts>()?;
    m.add("KIND_EOS", ports::KIND_EOS)?;
    m.add("KIND_ACK", ports::KIND_ACK)?;
    m.add("KIND_PROBE", ports::KIND_PROBE)?;
    m.add_function(wrap_pyfunction!(node::list_nodes, m)?)?;
    m.add_function(wrap_pyfunction!(node::remove_stale_resources, m)?)?;
    m.add_function(wrap_pyfunction!(pubsub::monotonic_ns, m)?)?;
    m.add_function(wrap_pyfunction!(pubsub::buffer_address, m)?)?;
    m.add_function(wrap_pyfunction!(container::encode_container, m)?)?;
    m.add_function(wrap_pyfunction!(process::die_with_parent, m)?)?;
    Ok(())
}
