//! Backing store for a loaned chunk before anything writes into it.
//!
//! An iceoryx2 data segment is a sparse file on a tmpfs (`/dev/shm`): it is ftruncate()d to its
//! full size and its pages are allocated by the first write to each. When the filesystem is
//! full, that write raises SIGBUS, which kills the process with no error and no cleanup (a
//! publisher's copy into a chunk, a node writing into an `allocate()`d array). So the bridge
//! allocates a loaned chunk's pages before writing into it, with `madvise(MADV_POPULATE_WRITE)`
//! (Linux 5.14), or `fallocate()` of the segment file on older kernels, which fail with an
//! error instead; the caller then raises `SharedMemoryFullError`.
//!
//! tmpfs keeps a page while its file exists, and iceoryx2 hands the same few chunks out again
//! and again (its free list is a stack), so a publisher remembers which chunks of its current
//! segment are populated and reserves each chunk once: afterwards a loan costs one hash lookup
//! and no system call.
//!
//! iceoryx2 itself writes a chunk's header (its first page) while loaning it, and its segments'
//! bookkeeping when it creates them, before the bridge can step in. Those writes are covered by
//! keeping [`SHM_RESERVE`] bytes free: a reservation that would leave less is refused, one that
//! fails half-way gives back what it took, and the reservations of all processes that use one
//! directory are serialized (a `flock` on the directory), so two of them never fill the
//! filesystem together.

use crate::fasthash::FastMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Bytes a reservation leaves free in the shared-memory filesystem, for iceoryx2's own writes
/// (chunk headers, new segments and services) that cannot be reserved beforehand.
pub const SHM_RESERVE: u64 = 1 << 20;

/// How long a reservation waits for another process's reservation in the same directory
/// before it goes on without the lock. Reservations hold it for milliseconds; a lock held
/// longer (a stuck process, or another user's on a shared /dev/shm) is not waited for again.
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

/// False once the kernel refused `MADV_POPULATE_WRITE` (before Linux 5.14).
static POPULATE_WRITE: AtomicBool = AtomicBool::new(true);

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

pub fn page_down(addr: usize) -> usize {
    addr & !(page_size() - 1)
}

pub fn page_up(addr: usize) -> usize {
    page_down(addr + page_size() - 1)
}

/// A reservation that did not fit: what the error message reports.
#[derive(Debug, Clone)]
pub struct Full {
    /// Directory of the segment file.
    pub directory: String,
    /// Size of its filesystem in bytes (0: no limit set).
    pub size: u64,
    /// Bytes free there (after giving back a failed reservation).
    pub free: u64,
    /// Bytes the reservation needed.
    pub needed: u64,
}

/// The memory mapping of one data segment: where it is, and which file and directory back it.
#[derive(Debug)]
pub struct Segment {
    start: usize,
    end: usize,
    path: Option<String>,
    file_offset: u64,
    directory: String,
    dir_fd: Option<OwnedFd>,
    file_fd: OnceLock<Option<OwnedFd>>,
    /// False once the directory lock was not granted in time.
    lockable: AtomicBool,
}

/// What one publisher knows about its chunks: the segment it loans from, and for every chunk
/// of that segment already reserved, the end of the reserved range.
#[derive(Default)]
pub struct Reserver {
    segment: Option<Arc<Segment>>,
    reserved: FastMap<usize, usize>,
}

/// What [`Reserver::plan`] decided.
pub enum Plan {
    /// Already reserved.
    Done,
    /// Reserve `[from, end)` of this segment, then call [`Reserver::done`].
    Reserve(Arc<Segment>, usize),
}

impl Reserver {
    /// `[start, end)` is a loaned chunk (page-aligned, from its header to the end of the
    /// payload). The hot path: a chunk reserved before returns `Done`.
    pub fn plan(&mut self, start: usize, end: usize) -> Plan {
        if let Some(seg) = &self.segment
            && seg.start <= start
            && end <= seg.end
        {
            let from = match self.reserved.get(&start) {
                Some(&e) if e >= end => return Plan::Done,
                Some(&e) => e,
                None => start,
            };
            return Plan::Reserve(seg.clone(), from);
        }
        // A chunk outside the segment we know: the publisher moved to a new segment (iceoryx2
        // makes a bigger one for bigger frames). It was created while the old one was still
        // mapped, so no chunk of it can be mistaken for a reserved one of the old segment; and
        // the old segment gets no more loans: forget it.
        self.reserved.clear();
        let seg = Arc::new(Segment::containing(start, end));
        self.segment = Some(seg.clone());
        Plan::Reserve(seg, start)
    }

    /// `[start, end)` is reserved (`ok`), or was given back.
    pub fn done(&mut self, start: usize, end: usize, ok: bool) {
        if ok {
            self.reserved.insert(start, end);
        } else {
            self.reserved.remove(&start);
        }
    }
}

impl Segment {
    /// The mapping that holds `[start, end)`, from /proc/self/maps (read once per segment).
    fn containing(start: usize, end: usize) -> Self {
        let found = std::fs::read_to_string("/proc/self/maps").ok().and_then(|maps| {
            maps.lines().find_map(|line| {
                let mut f = line.splitn(6, ' ');
                let (range, _perms, offset) = (f.next()?, f.next()?, f.next()?);
                let (_dev, _inode, path) = (f.next()?, f.next()?, f.next().unwrap_or("").trim_start());
                let (lo, hi) = range.split_once('-')?;
                let (lo, hi) = (usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?);
                if !(lo <= start && end <= hi) {
                    return None;
                }
                let path = path.strip_suffix(" (deleted)").unwrap_or(path);
                let path = path.starts_with('/').then(|| path.to_owned());
                Some((lo, hi, u64::from_str_radix(offset, 16).unwrap_or(0), path))
            })
        });
        // Without /proc (some sandboxes) every chunk counts as one segment: a segment change
        // then goes unnoticed, which only matters if a new segment reuses the addresses of an
        // old one and the filesystem is full too.
        let (start, end, file_offset, path) = found.unwrap_or((0, usize::MAX, 0, None));
        let directory = path
            .as_deref()
            .and_then(|p| std::path::Path::new(p).parent())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/dev/shm".to_owned());
        let dir_fd = CString::new(directory.as_bytes()).ok().and_then(|c| {
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        });
        Self { start, end, path, file_offset, directory, dir_fd, file_fd: OnceLock::new(), lockable: AtomicBool::new(true) }
    }

    /// `(size, free)` of the segment's filesystem in bytes; size 0 when it sets no limit.
    fn space(&self) -> Option<(u64, u64)> {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = match &self.dir_fd {
            Some(fd) => unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) },
            None => {
                let c = CString::new(self.directory.as_bytes()).ok()?;
                unsafe { libc::statvfs(c.as_ptr(), &mut st) }
            }
        };
        (rc == 0).then(|| (st.f_blocks as u64 * st.f_frsize as u64, st.f_bavail as u64 * st.f_frsize as u64))
    }

    fn full(&self, needed: usize) -> Full {
        let (size, free) = self.space().unwrap_or((0, 0));
        Full { directory: self.directory.clone(), size, free, needed: needed as u64 }
    }

    /// Allocates the pages of `[from, end)` (page-aligned). On failure the pages from `keep`
    /// on are given back (those before it hold the chunk header iceoryx2 wrote).
    pub fn reserve(&self, from: usize, end: usize, keep: usize) -> Result<(), Full> {
        let needed = end - from;
        let _lock = self.lock();
        if let Some((size, free)) = self.space()
            && size > 0
            && free < needed as u64 + SHM_RESERVE
        {
            return Err(Full { directory: self.directory.clone(), size, free, needed: needed as u64 });
        }
        if POPULATE_WRITE.load(Ordering::Relaxed) {
            loop {
                if unsafe { libc::madvise(from as *mut libc::c_void, needed, libc::MADV_POPULATE_WRITE) } == 0 {
                    return Ok(());
                }
                match errno() {
                    libc::EINTR | libc::EAGAIN => continue,
                    libc::EINVAL => {
                        POPULATE_WRITE.store(false, Ordering::Relaxed);
                        break;
                    }
                    _ => {
                        // EFAULT (the SIGBUS that was avoided), ENOMEM: give back what was taken.
                        let keep = keep.clamp(from, end);
                        if keep < end {
                            unsafe { libc::madvise(keep as *mut libc::c_void, end - keep, libc::MADV_REMOVE) };
                        }
                        return Err(self.full(needed));
                    }
                }
            }
        }
        // Older kernels: allocate the file's blocks (tmpfs gives back a failed fallocate itself).
        let Some(fd) = self.file_fd() else { return Ok(()) };
        let offset = self.file_offset + (from - self.start) as u64;
        loop {
            let rc = unsafe { libc::fallocate(fd, 0, offset as libc::off_t, needed as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            match errno() {
                libc::EINTR => continue,
                libc::ENOSPC | libc::ENOMEM => return Err(self.full(needed)),
                _ => return Ok(()), // cannot tell; the memory may well be there
            }
        }
    }

    fn file_fd(&self) -> Option<libc::c_int> {
        self.file_fd
            .get_or_init(|| {
                let c = CString::new(self.path.as_deref()?.as_bytes()).ok()?;
                let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .as_ref()
            .map(|fd| fd.as_raw_fd())
    }

    fn lock(&self) -> Option<DirLock> {
        let fd = self.dir_fd.as_ref()?.as_raw_fd();
        if !self.lockable.load(Ordering::Relaxed) {
            return None;
        }
        let deadline = Instant::now() + LOCK_PATIENCE;
        loop {
            if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Some(DirLock(fd));
            }
            let e = errno();
            if (e != libc::EWOULDBLOCK && e != libc::EINTR) || Instant::now() >= deadline {
                self.lockable.store(false, Ordering::Relaxed);
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// An exclusive flock on the segment directory, released on drop.
struct DirLock(libc::c_int);

impl Drop for DirLock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0, libc::LOCK_UN) };
    }
}

fn errno() -> libc::c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_outwards() {
        let p = page_size();
        assert_eq!(page_down(p + 1), p);
        assert_eq!(page_up(p + 1), 2 * p);
        assert_eq!(page_up(p), p);
        assert_eq!(page_down(p), p);
    }

    #[test]
    fn a_reserved_chunk_is_planned_once() {
        let p = page_size();
        // an anonymous shared mapping stands in for a segment
        let len = 8 * p;
        let base = unsafe {
            libc::mmap(core::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        } as usize;
        assert_ne!(base, libc::MAP_FAILED as usize);
        let mut r = Reserver::default();
        let Plan::Reserve(seg, from) = r.plan(base, base + 2 * p) else { panic!("first loan must reserve") };
        assert_eq!(from, base);
        assert!(seg.start <= base && base + len <= seg.end);
        seg.reserve(from, base + 2 * p, base + p).expect("an anonymous mapping has room");
        r.done(base, base + 2 * p, true);
        assert!(matches!(r.plan(base, base + 2 * p), Plan::Done));
        // the same chunk with a longer payload reserves only the rest
        let Plan::Reserve(_, from) = r.plan(base, base + 3 * p) else { panic!("longer payload") };
        assert_eq!(from, base + 2 * p);
        r.done(base, base + 3 * p, false);
        assert!(matches!(r.plan(base, base + p), Plan::Reserve(_, f) if f == base));
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
    }

    /// The cost a loan of an already reserved chunk pays (a lock and a lookup):
    /// `cargo test --release -p ipc_bridge hit_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hit_cost() {
        let p = page_size();
        let chunks = 40;
        let base = unsafe {
            libc::mmap(core::ptr::null_mut(), chunks * p, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1, 0)
        } as usize;
        let r = std::sync::Mutex::new(Reserver::default());
        for k in 0..chunks {
            let s = base + k * p;
            if let Plan::Reserve(seg, from) = r.lock().unwrap().plan(s, s + p) {
                seg.reserve(from, s + p, s + p).unwrap();
            }
            r.lock().unwrap().done(s, s + p, true);
        }
        let n = 10_000_000;
        let t = Instant::now();
        for i in 0..n {
            let s = std::hint::black_box(base + (i % chunks) * p);
            assert!(matches!(r.lock().unwrap().plan(page_down(s + 100), page_up(s + p - 10)), Plan::Done));
        }
        eprintln!("a reserved chunk's loan: {:.1} ns", t.elapsed().as_nanos() as f64 / n as f64);
        unsafe { libc::munmap(base as *mut libc::c_void, chunks * p) };
    }
}
