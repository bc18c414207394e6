//! Wake-ups: iceoryx2 event services. A consumer owns one Listener (its inbox); every producer
//! that has something for it holds a Notifier on the same service.

use std::sync::Mutex;

use iceoryx2::port::listener::Listener as IoxListener;
use iceoryx2::port::notifier::Notifier as IoxNotifier;
use iceoryx2::prelude::*;
use iceoryx2::service::port_factory::event::PortFactory;
use pyo3::prelude::*;

use crate::errors::{port_err, service_err, transport_err, wait_err};
use crate::node::{Node, Svc};

fn open_event(node: &Node, name: &str, max_notifiers: usize) -> PyResult<PortFactory<Svc>> {
    let service_name =
        ServiceName::new(name).map_err(|e| service_err(format!("invalid event service name {name:?}"), e))?;
    node.inner
        .service_builder(&service_name)
        .event()
        .max_notifiers(max_notifiers)
        .max_listeners(2)
        .open_or_create()
        .map_err(|e| service_err(format!("opening event service {name:?}"), e))
}

/// Wakes the listener(s) of an event service.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Notifier {
    notifier: IoxNotifier<Svc>,
    #[pyo3(get)]
    service: String,
    _factory: PortFactory<Svc>,
    _node: Py<Node>,
}

#[pymethods]
impl Notifier {
    #[new]
    #[pyo3(signature = (node, service, *, max_notifiers = 64))]
    fn new(node: Py<Node>, service: &str, max_notifiers: usize) -> PyResult<Self> {
        let factory = open_event(node.get(), service, max_notifiers)?;
        let notifier = factory
            .notifier_builder()
            .create()
            .map_err(|e| port_err(format!("creating notifier on {service:?}"), e))?;
        Ok(Self { notifier, service: service.to_owned(), _factory: factory, _node: node })
    }

    /// Wakes every listener. Returns how many listeners were notified (0 when none is
    /// attached, e.g. while the consumer restarts).
    fn notify(&self) -> PyResult<usize> {
        self.notifier
            .notify()
            .map_err(|e| wait_err(format!("notifying {:?}", self.service), e))
    }
}

/// The inbox of one process: `wait()` blocks, with the GIL released, until a notifier fires,
/// one of the extra file descriptors becomes readable, or the timeout passes.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Listener {
    listener: Mutex<IoxListener<Svc>>,
    fd: i32,
    #[pyo3(get)]
    service: String,
    _factory: PortFactory<Svc>,
    _node: Py<Node>,
}

impl Listener {
    fn drain_inner(&self) -> PyResult<u64> {
        let l = self.listener.lock().expect("listener mutex poisoned");
        l.try_wait(|_| {}).map_err(|e| wait_err(format!("draining {:?}", self.service), e))
    }
}

#[pymethods]
impl Listener {
    #[new]
    #[pyo3(signature = (node, service, *, max_notifiers = 64))]
    fn new(node: Py<Node>, service: &str, max_notifiers: usize) -> PyResult<Self> {
        let factory = open_event(node.get(), service, max_notifiers)?;
        let listener = factory
            .listener_builder()
            .create()
            .map_err(|e| port_err(format!("creating listener on {service:?}"), e))?;
        let fd = unsafe { listener.file_descriptor().native_handle() };
        Ok(Self { listener: Mutex::new(listener), fd, service: service.to_owned(), _factory: factory, _node: node })
    }

    /// File descriptor that becomes readable when a notification is pending (for selectors).
    fn fileno(&self) -> i32 {
        self.fd
    }

    /// Consumes every pending notification without blocking; returns how many there were.
    fn drain(&self) -> PyResult<u64> {
        self.drain_inner()
    }

    /// Waits until notified, until one of `fds` is readable, or until `timeout` seconds passed
    /// (`None`: no timeout). Returns `(notified, ready_fds)`.
    ///
    /// Returns early with `(False, [])` when a signal interrupts the wait, after running the
    /// Python signal handlers (so KeyboardInterrupt propagates).
    #[pyo3(signature = (timeout = None, fds = Vec::new()))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>, fds: Vec<i32>) -> PyResult<(bool, Vec<i32>)> {
        if self.drain_inner()? > 0 {
            return Ok((true, Vec::new()));
        }
        let timeout_ms: CInt = match timeout {
            None => -1,
            Some(t) if t <= 0.0 => 0,
            // Round up so that a short timeout never degenerates into a busy loop.
            Some(t) => ((t * 1000.0).ceil().min(i32::MAX as f64)) as CInt,
        };
        let mut pfds: Vec<libc::pollfd> = std::iter::once(self.fd)
            .chain(fds.iter().copied())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        let (rc, errno) = py.detach(|| {
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
            (rc, std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        });
        if rc < 0 {
            if errno == libc::EINTR {
                py.check_signals()?;
                return Ok((false, Vec::new()));
            }
            return Err(transport_err(format!("poll() on {:?} failed: errno {errno}", self.service)));
        }
        let notified = pfds[0].revents != 0 && self.drain_inner()? > 0;
        let ready = pfds[1..].iter().filter(|p| p.revents != 0).map(|p| p.fd).collect();
        Ok((notified, ready))
    }
}

type CInt = libc::c_int;
