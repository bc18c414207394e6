//! Wake-ups: iceoryx2 event services. A consumer owns one Listener (its inbox); every producer
//! that has something for it holds a Notifier on the same service.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iceoryx2::port::listener::Listener as IoxListener;
use iceoryx2::port::notifier::Notifier as IoxNotifier;
use iceoryx2::prelude::*;
use iceoryx2::service::port_factory::event::PortFactory;
use pyo3::prelude::*;

use crate::doorbell::{Bell, Doorbells, Napped, Rang};
use crate::errors::{port_err, service_err, transport_err, wait_err};
use crate::node::{Anchor, Node, Svc};
use crate::pubsub::Subscriber;

fn open_event(node: &Node, name: &str, max_notifiers: usize) -> PyResult<PortFactory<Svc>> {
    let service_name =
        ServiceName::new(name).map_err(|e| service_err(format!("invalid event service name {name:?}"), e))?;
    node.with(|n| {
        n.service_builder(&service_name)
            .event()
            .max_notifiers(max_notifiers)
            .max_listeners(2)
            .open_or_create()
            .map_err(|e| service_err(format!("opening event service {name:?}"), e))
    })
}

/// Frames of at least this many bytes since the last wake-up make a notifier give up its core
/// to a consumer that is awake (see `Notifier::notify_quiet`).
const YIELD_AWAKE_BYTES: usize = 64 * 1024;

/// Wakes the listener(s) of an event service.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Notifier {
    notifier: Mutex<Option<IoxNotifier<Svc>>>,
    bell: Option<Bell>,
    yield_unless: Mutex<Vec<Py<Subscriber>>>,
    #[pyo3(get)]
    service: String,
    anchor: Anchor<PortFactory<Svc>>,
}

#[pymethods]
impl Notifier {
    #[new]
    #[pyo3(signature = (node, service, *, max_notifiers = 64, doorbells = None, slot = 0))]
    fn new(
        node: Py<Node>,
        service: &str,
        max_notifiers: usize,
        doorbells: Option<Py<Doorbells>>,
        slot: usize,
    ) -> PyResult<Self> {
        let bell = doorbells.map(|d| Bell::new(d, slot)).transpose()?;
        let factory = open_event(node.get(), service, max_notifiers)?;
        let notifier = factory
            .notifier_builder()
            .create()
            .map_err(|e| port_err(format!("creating notifier on {service:?}"), e))?;
        Ok(Self {
            notifier: Mutex::new(Some(notifier)),
            bell,
            yield_unless: Mutex::new(Vec::new()),
            service: service.to_owned(),
            anchor: Anchor::new(factory, node),
        })
    }

    /// Wakes every listener, ignoring failures (a consumer that is gone is woken by its
    /// restart, not by us; a closed notifier wakes nobody). `nbytes`: what the wake-up is
    /// for (the frames sent since the last one).
    pub(crate) fn notify_quiet(&self, py: Python<'_>, nbytes: usize) {
        let rang = self.bell.as_ref().map(|b| b.ring());
        if rang == Some(Rang::Napper) {
            self.after_notify(py);
            return;
        }
        if rang == Some(Rang::Awake) {
            // Awake: it looks at its queues before it sleeps. Let it run first only for big
            // frames: awake may mean runnable but waiting for this core, and a big copy needs
            // it (64 MiB copies ran at half the throughput without the yield); for small ones
            // the context switch costs more than it saves (4 KiB streams ran 20 % faster
            // without it).
            if nbytes >= YIELD_AWAKE_BYTES {
                self.after_notify(py);
            }
            return;
        }
        let sent = self.notifier.lock().expect("notifier mutex poisoned").as_ref().map(|n| n.notify().is_ok());
        if sent == Some(true) {
            self.after_notify(py);
        }
    }

    /// `notify_quiet` for an ack that only makes room: with a doorbell, a listener asleep for
    /// another reason than room (see `Listener.wait(flow=...)`) is only marked pending.
    pub(crate) fn notify_flow(&self, py: Python<'_>) {
        match &self.bell {
            Some(b) => {
                if b.ring_flow() == Rang::Sleeper {
                    let _ = self.notifier.lock().expect("notifier mutex poisoned").as_ref().map(|n| n.notify());
                }
            }
            None => self.notify_quiet(py, 0),
        }
    }

    fn after_notify(&self, py: Python<'_>) {
        let subs = self.yield_unless.lock().expect("notifier mutex poisoned");
        if subs.is_empty() || subs.iter().any(|s| s.get().peek()) {
            return;
        }
        drop(subs);
        // The consumer we just woke is often queued on this very core (the kernel places a
        // wakee next to its waker), behind the bookkeeping we would do next. With no input
        // waiting we have nothing urgent: let it run first.
        py.detach(|| unsafe { libc::sched_yield() });
    }

    /// Wakes every listener. Returns how many listeners were notified (0 when none is
    /// attached, e.g. while the consumer restarts). With a doorbell, a listener that is awake
    /// is only marked pending (no syscall; it looks before it sleeps): that counts as 1.
    fn notify(&self, py: Python<'_>) -> PyResult<usize> {
        if self.bell.as_ref().is_some_and(|b| b.ring() != Rang::Sleeper) {
            if self.notifier.lock().expect("notifier mutex poisoned").is_none() {
                return Err(transport_err(format!("notifier of {:?} is closed", self.service)));
            }
            self.after_notify(py);
            return Ok(1);
        }
        let n = match self.notifier.lock().expect("notifier mutex poisoned").as_ref() {
            Some(n) => n.notify().map_err(|e| wait_err(format!("notifying {:?}", self.service), e))?,
            None => return Err(transport_err(format!("notifier of {:?} is closed", self.service))),
        };
        self.after_notify(py);
        Ok(n)
    }

    /// After each wake-up it sends, give up the CPU (`sched_yield`) unless one of `subscribers`
    /// has a frame queued. For a stage: its inputs. Empty (the default): never yield.
    fn yield_unless_queued(&self, subscribers: Vec<Py<Subscriber>>) {
        *self.yield_unless.lock().expect("notifier mutex poisoned") = subscribers;
    }

    /// Releases the port, its service and its node (`notify()` raises TransportError
    /// afterwards). Idempotent.
    fn close(&self) {
        let notifier = self.notifier.lock().expect("notifier mutex poisoned").take();
        drop(notifier);
        let subs = std::mem::take(&mut *self.yield_unless.lock().expect("notifier mutex poisoned"));
        drop(subs);
        self.anchor.release();
    }
}

/// The inbox of one process: `wait()` blocks, with the GIL released, until a notifier fires,
/// one of the extra file descriptors becomes readable, or the timeout passes.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Listener {
    listener: Mutex<Option<IoxListener<Svc>>>,
    bell: Option<Bell>,
    /// whoever writes on the fds given to wait() rings the doorbell's control word after
    control_rings: bool,
    fd: i32,
    spin_ns: AtomicU64,
    #[pyo3(get)]
    service: String,
    anchor: Anchor<PortFactory<Svc>>,
}

impl Listener {
    /// The blocking part of `wait()` on the doorbell's futex (see the doorbell module): until
    /// rung, until `deadline`, until one of `fds` (whose writers ring the control word) is
    /// readable, or until a signal. The fds are polled when the control word is set and
    /// every NAP_POLL.
    fn nap(
        &self,
        py: Python<'_>,
        bell: &Bell,
        fds: &[i32],
        flow: bool,
        deadline: Option<Instant>,
        spin_us: u64,
    ) -> PyResult<(bool, Vec<i32>)> {
        let napped_at = Instant::now();
        let mut ready = Vec::new();
        let napped = py.detach(|| {
            bell.nap(flow, deadline, || {
                ready = poll_now(fds);
                !ready.is_empty()
            })
        });
        if bell.take_control() && ready.is_empty() {
            ready = poll_now(fds);
        }
        let notified = bell.take();
        if let Some(Napped::Interrupted) = napped {
            py.check_signals()?;
        }
        if notified {
            self.woken_after(napped_at, spin_us);
        }
        Ok((notified, ready))
    }

    /// Woken soon after giving up the spin (it slept since `slept`): traffic is flowing, spin
    /// again next time.
    fn woken_after(&self, slept: Instant, spin_us: u64) {
        if spin_us > 0 && slept.elapsed() < Duration::from_micros(spin_us * 4) {
            self.spin_ns.fetch_max(spin_us * 250, Ordering::Relaxed);
        }
    }

    fn rung(&self) -> bool {
        self.bell.as_ref().is_some_and(|b| b.take())
    }

    fn drain_inner(&self) -> PyResult<u64> {
        match self.listener.lock().expect("listener mutex poisoned").as_ref() {
            Some(l) => l.try_wait(|_| {}).map_err(|e| wait_err(format!("draining {:?}", self.service), e)),
            None => Err(transport_err(format!("listener of {:?} is closed", self.service))),
        }
    }
}

#[pymethods]
impl Listener {
    /// With `doorbells`, notifiers that ring the same `slot` wake it with a syscall only while
    /// it sleeps (see the doorbell module); the slot must be this listener's alone. Then it
    /// sleeps on the doorbell's futex (the cheaper wake-up) rather than in ppoll() whenever
    /// `wait()` has no file descriptors to watch, or `control_rings` is True: whoever writes on
    /// those descriptors then calls `Doorbells.ring_control(slot)`, as the supervisor does for
    /// a worker's control channel.
    #[new]
    #[pyo3(signature = (node, service, *, max_notifiers = 64, doorbells = None, slot = 0, control_rings = false))]
    fn new(
        node: Py<Node>,
        service: &str,
        max_notifiers: usize,
        doorbells: Option<Py<Doorbells>>,
        slot: usize,
        control_rings: bool,
    ) -> PyResult<Self> {
        let bell = doorbells.map(|d| Bell::new(d, slot)).transpose()?;
        let factory = open_event(node.get(), service, max_notifiers)?;
        let listener = factory
            .listener_builder()
            .create()
            .map_err(|e| port_err(format!("creating listener on {service:?}"), e))?;
        let fd = unsafe { listener.file_descriptor().native_handle() };
        if let Some(b) = &bell {
            b.reset();
        }
        Ok(Self {
            listener: Mutex::new(Some(listener)),
            bell,
            control_rings,
            fd,
            spin_ns: AtomicU64::new(0),
            service: service.to_owned(),
            anchor: Anchor::new(factory, node),
        })
    }

    /// File descriptor that becomes readable when a notification is pending (for selectors);
    /// -1 once closed (the number may belong to another file by then).
    fn fileno(&self) -> i32 {
        if self.listener.lock().expect("listener mutex poisoned").is_some() { self.fd } else { -1 }
    }

    /// Releases the port (its socket), its service and its node; `wait()` and `drain()` raise
    /// TransportError afterwards. Not while another thread waits on it. Idempotent.
    fn close(&self) {
        let listener = self.listener.lock().expect("listener mutex poisoned").take();
        drop(listener);
        self.anchor.release();
    }

    /// Consumes every pending notification without blocking; returns how many there were
    /// (a doorbell's pending mark counts as one).
    fn drain(&self) -> PyResult<u64> {
        Ok(self.drain_inner()? + u64::from(self.rung()))
    }

    /// Waits until notified, until one of `fds` is readable, or until `timeout` seconds passed
    /// (`None`: no timeout). Returns `(notified, ready_fds)`.
    ///
    /// With `spin_us > 0` the wait first spins (GIL released) for up to that many
    /// microseconds, watching the `watch` subscribers' queues in shared memory and the
    /// listener, before it blocks in `ppoll()`. The spin budget adapts: it doubles when a spin
    /// catches the next frame and halves when it does not, so a busy pipeline gets
    /// microsecond wake-ups and an idle one stops spinning (no CPU). Extra fds are only
    /// checked by the blocking part.
    ///
    /// With `flow` False (a doorbell only), acks that only make room in a producer's window do
    /// not wake this sleep (it does not wait for room); they are found at the next look.
    ///
    /// Returns early with `(False, [])` when a signal interrupts the wait, after running the
    /// Python signal handlers (so KeyboardInterrupt propagates).
    #[pyo3(signature = (timeout = None, fds = Vec::new(), spin_us = 0, watch = Vec::new(), flow = true))]
    pub(crate) fn wait(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        fds: Vec<i32>,
        spin_us: u64,
        watch: Vec<Py<Subscriber>>,
        flow: bool,
    ) -> PyResult<(bool, Vec<i32>)> {
        // With a doorbell, datagrams come only to a sleeper: ppoll() finds one left over and
        // drains it, so the non-blocking recvfrom() of every wait is saved here and in the spin.
        let bell = self.bell.is_some();
        if bell && self.listener.lock().expect("listener mutex poisoned").is_none() {
            return Err(transport_err(format!("listener of {:?} is closed", self.service)));
        }
        if self.rung() || (!bell && self.drain_inner()? > 0) {
            return Ok((true, Vec::new()));
        }
        let start = Instant::now();
        let limit = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        if spin_us > 0 && limit.is_none_or(|l| !l.is_zero()) {
            let max = spin_us * 1000;
            let budget = self.spin_ns.load(Ordering::Relaxed).min(max);
            let budget = Duration::from_nanos(if budget == 0 { max.min(2_000) } else { budget });
            let budget = limit.map_or(budget, |l| budget.min(l));
            let caught = py.detach(|| {
                loop {
                    if self.rung() || watch.iter().any(|s| s.get().peek()) {
                        return true;
                    }
                    if !bell {
                        let pending =
                            self.listener.lock().map(|g| g.as_ref().is_some_and(|l| l.try_wait(|_| {}).unwrap_or(0) > 0));
                        if pending.unwrap_or(false) {
                            return true;
                        }
                    }
                    if start.elapsed() >= budget {
                        return false;
                    }
                    // Give the core to a process with work (the one about to send us a frame,
                    // on a machine with fewer cores than stages) instead of burning it.
                    unsafe { libc::sched_yield() };
                }
            });
            let cur = budget.as_nanos() as u64;
            if caught {
                self.spin_ns.store((cur * 2).clamp(2_000, max), Ordering::Relaxed);
                return Ok((true, Vec::new()));
            }
            self.spin_ns.store(cur / 2, Ordering::Relaxed);
        }
        if let Some(b) = self.bell.as_ref().filter(|_| fds.is_empty() || self.control_rings) {
            return self.nap(py, b, &fds, flow, limit.map(|l| start + l), spin_us);
        }
        let remaining = limit.map(|l| l.saturating_sub(start.elapsed()));
        let ts = remaining.map(|r| libc::timespec { tv_sec: r.as_secs() as libc::time_t, tv_nsec: r.subsec_nanos() as libc::c_long });
        let mut pfds: Vec<libc::pollfd> = std::iter::once(self.fd)
            .chain(fds.iter().copied())
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        if self.bell.as_ref().is_some_and(|b| !b.sleep(flow)) {
            return Ok((true, Vec::new())); // rung between the last look and the sleep
        }
        let blocked = Instant::now();
        let (rc, errno) = py.detach(|| {
            let tsp = ts.as_ref().map_or(core::ptr::null(), |t| t as *const libc::timespec);
            let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, tsp, core::ptr::null()) };
            (rc, std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        });
        if let Some(b) = &self.bell {
            b.wake();
        }
        if rc > 0 {
            self.woken_after(blocked, spin_us);
        }
        if rc < 0 {
            if errno == libc::EINTR {
                py.check_signals()?;
                return Ok((false, Vec::new()));
            }
            return Err(transport_err(format!("ppoll() on {:?} failed: errno {errno}", self.service)));
        }
        let notified = (pfds[0].revents != 0 && self.drain_inner()? > 0) | self.rung();
        let ready = pfds[1..].iter().filter(|p| p.revents != 0).map(|p| p.fd).collect();
        Ok((notified, ready))
    }

    /// Current adaptive spin budget in nanoseconds (for tests and benchmarks).
    #[getter]
    fn spin_budget_ns(&self) -> u64 {
        self.spin_ns.load(Ordering::Relaxed)
    }
}


/// The readable ones of `fds`, without blocking.
fn poll_now(fds: &[i32]) -> Vec<i32> {
    if fds.is_empty() {
        return Vec::new();
    }
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
    if rc <= 0 {
        return Vec::new();
    }
    pfds.iter().filter(|p| p.revents != 0).map(|p| p.fd).collect()
}
