//! A worker's process group dies with the worker's parent.
//!
//! `PR_SET_PDEATHSIG` sends a signal to a process when its parent dies, even by SIGKILL. With
//! SIGKILL as that signal only the worker dies: the processes its node started (an ffmpeg
//! helper, a model server) are orphaned and keep running. So the death signal is a signal of
//! the caller's choice whose handler SIGKILLs the whole process group the worker leads (the
//! supervisor spawns it as a group leader), then the worker:
//!
//! ```text
//!  supervisor ──(dies, any way)──> kernel sends `signal` to the worker
//!  worker: native handler ──kill(-pgid, SIGKILL)──> worker + node's children + their children
//! ```
//!
//! The handler is native code, so it runs even while the node is stuck in C code holding the
//! GIL (a Python handler would wait for the GIL forever), and it is async-signal-safe: it only
//! calls kill(2) and getpid(2). Processes that left the group (`setsid`, `start_new_session`)
//! are out of its reach, by their own choice.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use pyo3::prelude::*;

/// The process group the handler kills; 0 when this process does not lead one (it then kills
/// only itself: a group it merely belongs to is its parent's).
static GROUP: AtomicI32 = AtomicI32::new(0);

extern "C" fn kill_group(_sig: libc::c_int) {
    let pgid = GROUP.load(Ordering::Relaxed);
    unsafe {
        if pgid > 0 {
            libc::kill(-pgid, libc::SIGKILL); // includes this process
        }
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Install the group-killing handler for `signal`, make `signal` this process's parent-death
/// signal, and report whether the parent is still `expected_ppid`. `false`: the parent died
/// before the signal was armed (no signal will come); the caller should exit.
///
/// Async-signal-safe (only syscalls, no allocation), so it may run between fork and exec.
pub fn arm(expected_ppid: libc::pid_t, signal: libc::c_int) -> io::Result<bool> {
    unsafe {
        let me = libc::getpid();
        GROUP.store(if libc::getpgrp() == me { me } else { 0 }, Ordering::Relaxed);
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = kill_group as *const () as libc::sighandler_t;
        libc::sigfillset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, core::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl(): then we were already reparented.
        Ok(libc::getppid() == expected_ppid)
    }
}

/// ``die_with_parent(expected_ppid, signal) -> bool``: when this process's parent dies (even
/// by SIGKILL), SIGKILL the process group this process leads (its children and theirs) and
/// this process, from a native handler of ``signal`` that runs even while Python is stuck
/// holding the GIL. ``signal`` must be one nothing else in the process handles (a real-time
/// signal). Returns False when the parent is no longer ``expected_ppid`` (it died before this
/// call): the caller should exit. Raises OSError when the signal cannot be handled.
#[pyfunction]
#[pyo3(signature = (expected_ppid, signal))]
pub fn die_with_parent(expected_ppid: i32, signal: i32) -> PyResult<bool> {
    Ok(arm(expected_ppid, signal)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncatchable_signal_is_refused() {
        let err = arm(unsafe { libc::getppid() }, libc::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    /// A group leader that gets the armed signal takes its child down with it.
    #[test]
    fn armed_signal_kills_the_whole_group() {
        let sig = libc::SIGRTMAX();
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let leader = unsafe { libc::fork() };
        assert!(leader >= 0);
        if leader == 0 {
            // child (only syscalls: the test harness has other threads)
            unsafe {
                libc::setpgid(0, 0);
                let grandchild = libc::fork();
                if grandchild == 0 {
                    loop {
                        libc::pause();
                    }
                }
                libc::write(fds[1], &grandchild as *const libc::pid_t as *const libc::c_void, 4);
                if !matches!(arm(libc::getppid(), sig), Ok(true)) {
                    libc::_exit(3);
                }
                libc::raise(sig);
                libc::_exit(4); // not reached
            }
        }
        unsafe { libc::close(fds[1]) };
        let mut grandchild: libc::pid_t = 0;
        let n = unsafe { libc::read(fds[0], &mut grandchild as *mut libc::pid_t as *mut libc::c_void, 4) };
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        assert_eq!(unsafe { libc::waitpid(leader, &mut status, 0) }, leader);
        assert_eq!(n, 4);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL, "status {status:#x}");
        // the grandchild (reparented, reaped by init or left a zombie) must not be running
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").trim_start().chars().next();
            if matches!(state, None | Some('Z') | Some('X')) {
                break;
            }
            if std::time::Instant::now() > deadline {
                unsafe { libc::kill(grandchild, libc::SIGKILL) };
                panic!("the leader's child survived it (state {state:?})");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
