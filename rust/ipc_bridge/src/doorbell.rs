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
//!
//!  producer (Notifier.notify)              consumer (Listener.wait)
//!  --------------------------              -----------------------
//!  publish the frame                        pending.swap(0) == 1 ?  -> return "notified"
//!  pending.swap(1)          (SeqCst)        spin: pending / watched queues
//!  sleeping.load() == 0 ?   (SeqCst)        sleeping += 1           (SeqCst)
//!    yes: done, no syscall                  pending.swap(0) == 1 ?  -> sleeping -= 1, return
//!    no:  iceoryx2 notify (datagram)        ppoll(listener fd, ...) ; sleeping -= 1
//! ```
//!
//! Dekker's argument: each side stores, then (after a full barrier) loads what the other
//! stores. So either the producer sees `sleeping` and sends the datagram that ends the
//! ppoll(), or the consumer sees `pending` and does not sleep (or both: one spurious wake-up).
//! `pending` means exactly what a datagram in the socket meant: "look at your queues".
//!
//! A listener resets its slot when it is created (a predecessor killed inside ppoll() leaves
//! `sleeping` at 1: harmless, it only costs syscalls, but the reset makes it exact again), so
//! a slot must have one listener. The memfd has no name (nobody outside the run can open
//! it) and a sealed size; a process of the run that scribbles on it can only cost wake-ups a
//! listener's timeout (a worker's heartbeat) bounds.

use std::sync::atomic::{AtomicU32, Ordering};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// Bytes per slot: one cache line, so that two inboxes' bells never share one.
pub const SLOT_BYTES: usize = 64;

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

    /// `(sleeping, pending)` of `slot` (for tests and tools).
    fn state(&self, slot: usize) -> PyResult<(u32, u32)> {
        check_slot(self, slot)?;
        Ok((self.word(slot, 0).load(Ordering::SeqCst), self.word(slot, 4).load(Ordering::SeqCst)))
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

    fn sleeping(&self) -> &AtomicU32 {
        self.db.get().word(self.slot, 0)
    }

    fn pending(&self) -> &AtomicU32 {
        self.db.get().word(self.slot, 4)
    }

    fn flow(&self) -> &AtomicU32 {
        self.db.get().word(self.slot, 8)
    }

    /// Producer: mark the inbox pending; true when a listener may sleep (then notify it).
    pub fn ring(&self) -> bool {
        self.pending().swap(1, Ordering::SeqCst);
        self.sleeping().load(Ordering::SeqCst) != 0
    }

    /// Producer of an ack that only makes room: mark the inbox pending; true when a listener
    /// may sleep waiting for room (then notify it). A sleeper waiting for anything else finds
    /// the ack when it next looks.
    pub fn ring_flow(&self) -> bool {
        self.pending().swap(1, Ordering::SeqCst);
        self.sleeping().load(Ordering::SeqCst) != 0 && self.flow().load(Ordering::SeqCst) != 0
    }

    /// Consumer: take the pending mark (true: look at the queues, as after a wake-up).
    pub fn take(&self) -> bool {
        // (a load first: while idle nobody rings, and a swap would dirty the line for nothing)
        self.pending().load(Ordering::Relaxed) != 0 && self.pending().swap(0, Ordering::SeqCst) != 0
    }

    /// Consumer, before ppoll(): announce the sleep (and whether acks that make room should
    /// end it: `flow`), then check nothing came meanwhile. False (the sleep is cancelled) when
    /// something did.
    pub fn sleep(&self, flow: bool) -> bool {
        self.flow().store(flow as u32, Ordering::SeqCst);
        self.sleeping().fetch_add(1, Ordering::SeqCst);
        if self.pending().swap(0, Ordering::SeqCst) != 0 {
            self.wake();
            return false;
        }
        true
    }

    /// Consumer, after ppoll().
    pub fn wake(&self) {
        let _ = self.sleeping().fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Consumer, when its listener is created: nobody sleeps, and look at the queues once.
    pub fn reset(&self) {
        self.flow().store(1, Ordering::SeqCst);
        self.sleeping().store(0, Ordering::SeqCst);
        self.pending().store(1, Ordering::SeqCst);
    }

    pub fn slot(&self) -> usize {
        self.slot
    }
}
