//! The workers' counters in shared memory: one [`Slot`] per worker in a
//! memfd the master makes and passes to each worker (at [`STATS_FD`]).
//!
//! A slot has one writer, its worker (one thread), so counting is a plain
//! load and store of a relaxed atomic: no locked instruction, no system
//! call. The master only reads, at a scrape or a `status`, and after the
//! worker is reaped (then the slot's counts are final and move to the
//! master's totals of retired workers, [`Stats::release`]).
//!
//! The slot names its own methods and handler pools (written once by the
//! worker, before it counts anything for them), so the master never has to
//! guess which table a worker of some generation had.

use super::totals::{MethodTotals, Totals};
use super::{HandlerRestart, NBUCKETS, NCODES, NREASONS};
use std::cell::UnsafeCell;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Where a worker finds the stats memfd.
pub const STATS_FD: i32 = 6;

/// Slots: as many as the balance board has entries.
pub const ENTRIES: usize = crate::balance::ENTRIES;

/// Methods a slot counts by name; index 0 is `other` (anything not in the
/// worker's table, and the methods past this many).
pub const MAX_METHODS: usize = 128;
/// Handler pools a slot counts by name.
pub const MAX_HANDLERS: usize = 32;
const METHOD_NAMES: usize = 8192;
const HANDLER_NAMES: usize = 2048;

#[repr(C)]
struct MethodCells {
    codes: [AtomicU64; NCODES],
    buckets: [AtomicU64; NBUCKETS],
    sum_ns: AtomicU64,
}

/// One worker's counters.
#[repr(C, align(4096))]
pub struct Slot {
    /// Bytes of `method_names` (and `handler_names`) written: stored last,
    /// with Release, so that a reader that sees the length sees the names.
    method_names_len: AtomicU32,
    handler_names_len: AtomicU32,
    accepted: AtomicU64,
    /// Connections open now (a gauge: not added up after the worker goes).
    open: AtomicU64,
    /// Newline-terminated names: the method at index i + 1 is line i.
    method_names: UnsafeCell<[u8; METHOD_NAMES]>,
    handler_names: UnsafeCell<[u8; HANDLER_NAMES]>,
    methods: [MethodCells; MAX_METHODS],
    handlers: [[AtomicU64; NREASONS]; MAX_HANDLERS],
}

const SIZE: usize = std::mem::size_of::<Slot>() * ENTRIES;

/// Adds to a counter that only this thread writes.
#[inline(always)]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn map(fd: &OwnedFd) -> std::io::Result<*mut Slot> {
    // SAFETY: a shared mapping of a memfd of SIZE bytes. Counters are only
    // touched through atomics; the names are written once, before the
    // Release store of their length, and read after its Acquire load.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// A worker's side: its slot, for the life of the process.
#[derive(Clone, Copy)]
pub struct Recorder {
    slot: &'static Slot,
}

// SAFETY: the slot is only written by its worker's one runtime thread; the
// names are written once, at the start.
unsafe impl Send for Recorder {}
unsafe impl Sync for Recorder {}

impl Recorder {
    /// Maps the stats passed at [`STATS_FD`] and takes slot `entry`. The
    /// mapping stays for the life of the process.
    ///
    /// # Safety
    /// `raw` must be the stats memfd, owned by nothing else.
    pub unsafe fn from_raw_fd(raw: i32, entry: usize) -> std::io::Result<Recorder> {
        if entry >= ENTRIES {
            return Err(std::io::Error::other(format!("stats slot {entry} out of range")));
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let base = map(&fd)?;
        Ok(Recorder { slot: &*base.add(entry) })
    }

    /// Names the methods (in the table's order: index i + 1 is `names[i]`).
    /// Returns how many got a name of their own (the rest count as `other`).
    pub fn set_method_names(&self, names: &[&str]) -> usize {
        put_names(self.slot.method_names.get().cast(), METHOD_NAMES, &self.slot.method_names_len, names, MAX_METHODS - 1)
    }

    /// Names the handler pools (in the config's order).
    pub fn set_handler_names(&self, names: &[&str]) -> usize {
        put_names(self.slot.handler_names.get().cast(), HANDLER_NAMES, &self.slot.handler_names_len, names, MAX_HANDLERS)
    }

    /// `n` requests to method `metric` answered with `code`, each after `ns`.
    #[inline]
    pub fn record(&self, metric: u16, code: u8, n: u64, ns: u64) {
        let m = &self.slot.methods[metric as usize % MAX_METHODS];
        bump(&m.codes[code as usize % NCODES], n);
        bump(&m.buckets[super::bucket(ns)], n);
        bump(&m.sum_ns, ns.saturating_mul(n));
    }

    #[inline]
    pub fn accepted(&self) {
        bump(&self.slot.accepted, 1);
    }

    #[inline]
    pub fn opened(&self) {
        bump(&self.slot.open, 1);
    }

    #[inline]
    pub fn closed(&self) {
        let o = &self.slot.open;
        o.store(o.load(Ordering::Relaxed).saturating_sub(1), Ordering::Relaxed);
    }

    pub fn handler_restart(&self, pool: usize, why: HandlerRestart) {
        if let Some(h) = self.slot.handlers.get(pool) {
            bump(&h[why as usize], 1);
        }
    }
}

/// Writes newline-terminated names at `dst` (of `cap` bytes), as many as
/// fit and at most `max`, then publishes the length. Returns how many.
fn put_names(dst: *mut u8, cap: usize, len: &AtomicU32, names: &[&str], max: usize) -> usize {
    let mut at = 0usize;
    let mut n = 0;
    for name in names.iter().take(max) {
        let b = name.as_bytes();
        if b.contains(&b'\n') || at + b.len() + 1 > cap {
            break;
        }
        // SAFETY: within the slot's name area (at + len + 1 <= cap); nobody
        // reads past the published length.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), dst.add(at), b.len());
            *dst.add(at + b.len()) = b'\n';
        }
        at += b.len() + 1;
        n += 1;
    }
    len.store(at as u32, Ordering::Release);
    n
}

fn get_names(src: *const u8, cap: usize, len: &AtomicU32) -> Vec<String> {
    let n = (len.load(Ordering::Acquire) as usize).min(cap);
    // SAFETY: the first n bytes were written before the length was published.
    let bytes = unsafe { std::slice::from_raw_parts(src, n) };
    bytes.split(|&b| b == b'\n').filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// The master's side: the memfd, which slots are in use, and the counts of
/// the workers already reaped.
pub struct Stats {
    base: *mut Slot,
    fd: OwnedFd,
    claimed: BTreeSet<usize>,
    retired: Totals,
}

impl Stats {
    pub fn create() -> std::io::Result<Stats> {
        let fd = nix::sys::memfd::memfd_create(c"rpcd-stats", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, SIZE as i64)?;
        let base = map(&fd)?;
        Ok(Stats { base, fd, claimed: BTreeSet::new(), retired: Totals::default() })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn slot(&self, i: usize) -> &Slot {
        assert!(i < ENTRIES);
        // SAFETY: within the mapping.
        unsafe { &*self.base.add(i) }
    }

    /// A free slot, zeroed, for a new worker.
    pub fn claim(&mut self) -> Option<usize> {
        let i = (0..ENTRIES).find(|i| !self.claimed.contains(i))?;
        // SAFETY: no process uses a slot that is not claimed (its worker
        // was reaped); the zeroed bytes are a valid Slot.
        unsafe { std::ptr::write_bytes(self.base.add(i), 0, 1) };
        self.claimed.insert(i);
        Some(i)
    }

    /// Slot `i`'s worker is gone: its final counts join the retired totals.
    pub fn release(&mut self, i: usize) {
        if self.claimed.remove(&i) {
            let mut t = read(self.slot(i));
            t.open = 0;
            self.retired.add(&t);
        }
    }

    /// Everything counted so far: the retired workers' and the live ones'.
    pub fn totals(&self) -> Totals {
        let mut t = self.retired.clone();
        for &i in &self.claimed {
            t.add(&read(self.slot(i)));
        }
        t
    }

    /// One live slot's counts (for `status`).
    pub fn of(&self, i: usize) -> Option<Totals> {
        self.claimed.contains(&i).then(|| read(self.slot(i)))
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, not used after this.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

/// A slot's counts, by name.
fn read(s: &Slot) -> Totals {
    let methods = get_names(s.method_names.get().cast(), METHOD_NAMES, &s.method_names_len);
    let handlers = get_names(s.handler_names.get().cast(), HANDLER_NAMES, &s.handler_names_len);
    let mut t = Totals { accepted: s.accepted.load(Ordering::Relaxed), open: s.open.load(Ordering::Relaxed), ..Default::default() };
    let cells = |c: &MethodCells| {
        let mut m = MethodTotals::default();
        for (d, v) in m.codes.iter_mut().zip(&c.codes) {
            *d = v.load(Ordering::Relaxed);
        }
        for (d, v) in m.buckets.iter_mut().zip(&c.buckets) {
            *d = v.load(Ordering::Relaxed);
        }
        m.sum_ns = c.sum_ns.load(Ordering::Relaxed);
        m
    };
    // Index 0, and any past the names (never used by a worker that could
    // name them all), is `other`.
    for (i, c) in s.methods.iter().enumerate() {
        let name = if i == 0 { None } else { methods.get(i - 1) };
        let m = cells(c);
        if name.is_some() || i == 0 || m.count() > 0 {
            t.methods.entry(name.cloned().unwrap_or_else(|| "other".into())).or_default().add(&m);
        }
    }
    for (i, name) in handlers.iter().enumerate() {
        let mut r = [0u64; NREASONS];
        for (d, v) in r.iter_mut().zip(&s.handlers[i]) {
            *d = v.load(Ordering::Relaxed);
        }
        let e = t.handlers.entry(name.clone()).or_insert([0; NREASONS]);
        for (a, b) in e.iter_mut().zip(r) {
            *a += b;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_their_worker() {
        let mut st = Stats::create().unwrap();
        let i = st.claim().unwrap();
        // SAFETY: a second mapping of the same memfd, as a worker has.
        let w = unsafe { Recorder::from_raw_fd(nix::unistd::dup(st.fd().as_raw_fd()).unwrap(), i) }.unwrap();
        assert_eq!(w.set_method_names(&["ping", "pi"]), 2);
        w.set_handler_names(&["py"]);
        w.record(1, 0, 3, 20_000);
        w.record(0, super::super::code_index("unknown_method"), 1, 5_000);
        w.accepted();
        w.handler_restart(0, HandlerRestart::Timeout);
        let t = st.totals();
        assert_eq!(t.methods["ping"].codes[0], 3);
        assert_eq!(t.methods["ping"].buckets[1], 3);
        assert_eq!(t.methods["ping"].sum_ns, 60_000);
        assert_eq!(t.methods["pi"].count(), 0);
        assert_eq!(t.methods["other"].codes[3], 1);
        assert_eq!(t.handlers["py"][HandlerRestart::Timeout as usize], 1);
        assert_eq!(t.accepted, 1);
        // The worker goes; its slot is reused: the totals stay.
        st.release(i);
        let j = st.claim().unwrap();
        assert_eq!(i, j);
        assert_eq!(st.totals().methods["ping"].codes[0], 3);
        let w2 = unsafe { Recorder::from_raw_fd(nix::unistd::dup(st.fd().as_raw_fd()).unwrap(), j) }.unwrap();
        w2.set_method_names(&["ping"]);
        w2.record(1, 0, 2, 1);
        assert_eq!(st.totals().methods["ping"].codes[0], 5);
        assert_eq!(st.totals().accepted, 1);
    }

    #[test]
    fn names_that_do_not_fit_count_as_other() {
        let st = Stats::create().unwrap();
        let long = "x".repeat(5000);
        let names = ["a", long.as_str(), long.as_str()];
        let mut st = st;
        let i = st.claim().unwrap();
        let w = unsafe { Recorder::from_raw_fd(nix::unistd::dup(st.fd().as_raw_fd()).unwrap(), i) }.unwrap();
        assert_eq!(w.set_method_names(&names), 2);
    }
}
