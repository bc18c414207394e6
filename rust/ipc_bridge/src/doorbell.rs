//! Doorbells: wake-ups that cost a syscall only when the consumer sleeps.
//!
//! An iceoryx2 notification is a unix datagram: a `sendto()` for the producer and a
//! `recvfrom()` for the consumer, per frame, even while the consumer is busy and would have
//! found the frame anyway. A doorbell is one cache line per inbox in a memfd that the
//! supervisor shares with every process of the run:
//!
//! ```text
//!  offset 0  sleeping: listeners of the inbox blocked (or about to block) in ppoll()
//!  offset 4  pending:  something was sent since the listener last looked
//!  offset 8  flow:     the sleeper waits for room: acks that only make room wake it
//!                      (ring_flow); else they only mark it pending
//!  offset 12 napping:  listeners blocked (or about to block) in futex() on `seq`
//!  offset 16 seq:      the futex word: bumped by every ring that finds a napper
//!  offset 20 control:  the supervisor wrote on the listener's control channel
//!
//!  producer (Notifier.notify)              consumer (Listener.wait)
//!  --------------------------              -----------------------
//!  publish the frame                        pending.swap(0) == 1 ?  -> return "notified"
//!  pending.swap(1)          (SeqCst)        spin: pending / watched queues
//!  napping.load() != 0 ?    (SeqCst)        s = seq.load()
//!    yes: seq += 1, futex_wake(seq)         sleeping or napping += 1 (SeqCst)
//!  sleeping.load() == 0 ?   (SeqCst)        pending.swap(0) == 1 ?  -> undo, return
//!    yes: done                              napping:  futex_wait(seq, s) ; napping -= 1
//!    no:  iceoryx2 notify (datagram)        sleeping: ppoll(listener fd, ...) ; sleeping -= 1
//! ```
//!
//! Dekker's argument: each side stores, then (after a full barrier) loads what the other
//! stores. So either the producer sees the sleeper and wakes it, or the consumer sees
//! `pending` and does not sleep (or both: one spurious wake-up). For a napper the wake-up
//! cannot fall between its check and its sleep either: `futex_wait(seq, s)` sleeps only while
//! `seq` still holds the `s` read before the check, and a producer that saw the napper bumped
//! it. `pending` means exactly what a datagram in the socket meant: "look at your queues".
//!
//! Why two ways to sleep: a futex wake-up is the cheaper one (measured here, a paced token
//! through 5 processes: 14-16 us per hop against 22-24 us for a unix datagram and ppoll()),
//! but a futex cannot wait on file descriptors too. A listener naps only when whoever writes
//! on the descriptors it waits on also rings its `control` word (`Doorbells.ring_control`: the
//! supervisor, after each control message to a worker), and it still looks at them every
//! `NAP_POLL` (a supervisor that died rings nothing: its channel's end of file is found then).
//!
//! A listener resets its slot when it is created (a predecessor killed inside ppoll() leaves
//! `sleeping` at 1: harmless, it only costs syscalls, but the reset makes it exact again), so
//! a slot must have one listener. The memfd has no name (nobody outside the run can open
//! it) and a sealed size; a process of the run that scribbles on it can only cost wake-ups a
//! listener's timeout (a worker's heartbeat) bounds.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// Bytes per slot: one cache line, so that two inboxes' bells never share one.
pub const SLOT_BYTES: usize = 64;

/// A napping listener looks at its file descriptors at least this often (see the module doc).
pub const NAP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

const SLEEPING: usize = 0;
const PENDING: usize = 4;
const FLOW: usize = 8;
const NAPPING: usize = 12;
const SEQ: usize = 16;
const CONTROL: usize = 20;

/// Wakes every futex waiter on `word` (a shared mapping: no FUTEX_PRIVATE_FLAG).
fn futex_wake(word: &AtomicU32) {
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32) };
}

/// What a ring found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rang {
    /// the listener is awake: it looks at its queues before it sleeps (no syscall was made)
    Awake,
    /// it napped on the futex: woken
    Napper,
    /// it sleeps in ppoll(): the caller must notify it (a datagram)
    Sleeper,
}

/// How a futex wait ended.
pub enum Napped {
    /// woken, or `seq` had moved already
    Woken,
    /// the time is up
    TimedOut,
    /// a signal interrupted it
    Interrupted,
}

/// Sleeps while `word` holds `expected`, for at most `timeout`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: std::time::Duration) -> Napped {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    let rc = unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec, 0usize, 0u32)
    };
    if rc == 0 {
        return Napped::Woken;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ETIMEDOUT) => Napped::TimedOut,
        Some(libc::EINTR) => Napped::Interrupted,
        _ => Napped::Woken, // EAGAIN: seq moved before we slept
    }
}

/// The doorbells of a run: a shared mapping of a memfd, one slot per inbox.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Doorbells {
    ptr: usize,
    len: usize,
}

// The mapping is only ever accessed through atomics.
unsafe impl Send for Doorbells {}
unsafe impl Sync for Doorbells {}

impl Drop for Doorbells {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl Doorbells {
    /// After `pending` of `slot` is set: bumps `seq` and wakes the listener napping on it, if
    /// one does; true when one did.
    fn wake_nappers(&self, slot: usize) -> bool {
        if self.word(slot, NAPPING).load(Ordering::SeqCst) == 0 {
            return false;
        }
        let seq = self.word(slot, SEQ);
        seq.fetch_add(1, Ordering::SeqCst);
        futex_wake(seq);
        true
    }

    fn word(&self, slot: usize, offset: usize) -> &AtomicU32 {
        debug_assert!(slot < self.len / SLOT_BYTES);
        // In bounds (checked by Bell::new), 4-aligned (mmap is page-aligned).
        unsafe { &*((self.ptr + slot * SLOT_BYTES + offset) as *const AtomicU32) }
    }
}

#[pymethods]
impl Doorbells {
    /// Maps the doorbells behind `fd` (a memfd of `slots * 64` bytes or more, created by the
    /// supervisor). The descriptor may be closed afterwards: the mapping stays.
    #[new]
    fn new(fd: i32) -> PyResult<Self> {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(PyOSError::new_err(format!("doorbells: fstat({fd}) failed: {}", std::io::Error::last_os_error())));
        }
        let len = st.st_size as usize;
        if len < SLOT_BYTES {
            return Err(PyValueError::new_err(format!(
                "doorbells: fd {fd} holds {len} bytes, less than one {SLOT_BYTES}-byte slot"
            )));
        }
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(PyOSError::new_err(format!("doorbells: mmap({fd}) failed: {}", std::io::Error::last_os_error())));
        }
        Ok(Self { ptr: ptr as usize, len })
    }

    /// How many slots (inboxes) the mapping holds.
    #[getter]
    fn slots(&self) -> usize {
        self.len / SLOT_BYTES
    }

    /// `(sleeping, pending)` of `slot` (for tests and tools): sleeping counts the listeners
    /// blocked in ppoll() and in futex() alike.
    fn state(&self, slot: usize) -> PyResult<(u32, u32)> {
        check_slot(self, slot)?;
        let sleeping = self.word(slot, SLEEPING).load(Ordering::SeqCst) + self.word(slot, NAPPING).load(Ordering::SeqCst);
        Ok((sleeping, self.word(slot, PENDING).load(Ordering::SeqCst)))
    }

    /// `(ppoll sleepers, futex nappers)` of `slot` (for tests).
    fn sleepers(&self, slot: usize) -> PyResult<(u32, u32)> {
        check_slot(self, slot)?;
        Ok((self.word(slot, SLEEPING).load(Ordering::SeqCst), self.word(slot, NAPPING).load(Ordering::SeqCst)))
    }

    /// The supervisor, after writing on the control channel of the listener of `slot`: marks
    /// its `control` word and wakes it if it naps (a listener in ppoll() sees the channel).
    fn ring_control(&self, slot: usize) -> PyResult<()> {
        check_slot(self, slot)?;
        self.word(slot, CONTROL).store(1, Ordering::SeqCst);
        self.word(slot, PENDING).swap(1, Ordering::SeqCst);
        self.wake_nappers(slot);
        Ok(())
    }
}

fn check_slot(db: &Doorbells, slot: usize) -> PyResult<()> {
    if slot >= db.slots() {
        return Err(PyValueError::new_err(format!("doorbell slot {slot} out of range (the mapping has {})", db.slots())));
    }
    Ok(())
}

/// One inbox's slot, as a Notifier or a Listener holds it.
pub struct Bell {
    db: Py<Doorbells>,
    slot: usize,
}

impl Bell {
    pub fn new(db: Py<Doorbells>, slot: usize) -> PyResult<Self> {
        check_slot(db.get(), slot)?;
        Ok(Self { db, slot })
    }

    fn w(&self, offset: usize) -> &AtomicU32 {
        self.db.get().word(self.slot, offset)
    }

    /// Producer, after `pending` is set: wakes a napper.
    fn wake_sleepers(&self, flow_only: bool) -> Rang {
        if flow_only && self.w(FLOW).load(Ordering::SeqCst) == 0 {
            return Rang::Awake;
        }
        let napper = self.db.get().wake_nappers(self.slot);
        if self.w(SLEEPING).load(Ordering::SeqCst) != 0 {
            Rang::Sleeper
        } else if napper {
            Rang::Napper
        } else {
            Rang::Awake
        }
    }

    /// Producer: mark the inbox pending and wake a napping listener.
    pub fn ring(&self) -> Rang {
        self.w(PENDING).swap(1, Ordering::SeqCst);
        self.wake_sleepers(false)
    }

    /// Producer of an ack that only makes room: mark the inbox pending; wakes a listener that
    /// sleeps waiting for room. A sleeper waiting for anything else finds the ack when it
    /// next looks.
    pub fn ring_flow(&self) -> Rang {
        self.w(PENDING).swap(1, Ordering::SeqCst);
        self.wake_sleepers(true)
    }

    /// Consumer: take the pending mark (true: look at the queues, as after a wake-up).
    pub fn take(&self) -> bool {
        // (a load first: while idle nobody rings, and a swap would dirty the line for nothing)
        self.w(PENDING).load(Ordering::Relaxed) != 0 && self.w(PENDING).swap(0, Ordering::SeqCst) != 0
    }

    /// Consumer: take the control mark (true: the supervisor wrote on the control channel).
    pub fn take_control(&self) -> bool {
        self.w(CONTROL).load(Ordering::Relaxed) != 0 && self.w(CONTROL).swap(0, Ordering::SeqCst) != 0
    }

    /// Consumer, before ppoll(): announce the sleep (and whether acks that make room should
    /// end it: `flow`), then check nothing came meanwhile. False (the sleep is cancelled) when
    /// something did.
    pub fn sleep(&self, flow: bool) -> bool {
        self.w(FLOW).store(flow as u32, Ordering::SeqCst);
        self.w(SLEEPING).fetch_add(1, Ordering::SeqCst);
        if self.w(PENDING).swap(0, Ordering::SeqCst) != 0 {
            self.wake();
            return false;
        }
        true
    }

    /// Consumer, after ppoll().
    pub fn wake(&self) {
        let _ = self.w(SLEEPING).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Consumer: sleep in futex() until rung, until `deadline` (None: no limit) or until a
    /// signal, unless something is pending (`flow`: as for `sleep`). Every `NAP_POLL`,
    /// `tick()` runs (without waking from the listener's point of view: nothing is taken);
    /// true from it ends the nap. Returns None when something was pending (nothing slept),
    /// else how the nap ended (`TimedOut` also for a tick that ended it). The caller takes
    /// `pending` and `control` afterwards.
    pub fn nap(&self, flow: bool, deadline: Option<Instant>, mut tick: impl FnMut() -> bool) -> Option<Napped> {
        let seq = self.w(SEQ).load(Ordering::SeqCst);
        self.w(FLOW).store(flow as u32, Ordering::SeqCst);
        self.w(NAPPING).fetch_add(1, Ordering::SeqCst);
        let napped = if self.w(PENDING).load(Ordering::SeqCst) != 0 {
            None
        } else {
            Some(loop {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left.is_some_and(|l| l.is_zero()) {
                    break Napped::TimedOut;
                }
                match futex_wait(self.w(SEQ), seq, left.map_or(NAP_POLL, |l| l.min(NAP_POLL))) {
                    Napped::TimedOut => {
                        if tick() {
                            break Napped::TimedOut;
                        }
                    }
                    other => break other,
                }
            })
        };
        let _ = self.w(NAPPING).fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        napped
    }

    /// Consumer, when its listener is created: nobody sleeps, and look at the queues once.
    pub fn reset(&self) {
        self.w(FLOW).store(1, Ordering::SeqCst);
        self.w(SLEEPING).store(0, Ordering::SeqCst);
        self.w(NAPPING).store(0, Ordering::SeqCst);
        self.w(PENDING).store(1, Ordering::SeqCst);
    }

    pub fn slot(&self) -> usize {
        self.slot
    }
}
