//! Balanced workers: every worker's share of the open connections stays
//! near the mean.
//!
//! All workers accept from one listening socket. Each has it in its own
//! epoll set, so the kernel wakes every worker for each connection, and the
//! one that runs first takes it: with clients that keep their connection,
//! a few workers end up with most of them (Cloudflare, "Why does one NGINX
//! worker take all the load?", 2017: epoll wakes in LIFO order, so the
//! busiest process keeps winning). nginx damps this with
//! `ngx_accept_disabled` (a worker past 7/8 of its connections stops
//! accepting for a while) or an accept mutex. `SO_REUSEPORT` gives each
//! worker its own queue, filled by a hash of the addresses: even only on
//! average, a busy worker's queue waits for it (Cloudflare measured the
//! worst latency grow sharply), and a closed socket drops the connections
//! in its queue, which a reload or a restart would have to rescue.
//!
//! rpcd does what `ngx_accept_disabled` does, against the other workers
//! rather than against a fixed limit: the master shares a small [`Board`]
//! (a memfd mapped by every worker), where each worker keeps its count of
//! open connections and whether it is accepting. A worker with more than
//! the least-loaded one plus a margin ([`over_share`]) waits [`DEFER`] before
//! taking a pending connection, so that the least-loaded worker (woken for
//! the same connection) takes it first. Nothing waits longer than that: a
//! busy or stuck least-loaded worker delays a burst of connections by
//! `DEFER` each (once it has run out, the waiting worker takes one, and
//! weighs the next afresh). The listener and its queue stay as they are, so reload,
//! stop and restart keep their guarantees; a worker that stops accepting
//! (draining, handing over) leaves the comparison at once.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// How long a worker over its share waits before it takes a connection
/// that the least-loaded workers have not taken.
pub const DEFER: Duration = Duration::from_millis(2);

/// Entries on the board: enough for two generations of the most workers a
/// configuration may ask for, and workers still draining.
pub const ENTRIES: usize = 1024;

/// One worker's line, a cache line of its own (its owner writes it at every
/// connect and close; the others only read it).
#[repr(C, align(64))]
struct Entry {
    /// 1 while the worker accepts.
    accepting: AtomicU32,
    /// Connections it has open.
    open: AtomicU32,
}

const SIZE: usize = std::mem::size_of::<Entry>() * (ENTRIES + 1);

/// The shared memory: entry 0's place holds the header (how many entries
/// are in use, as an upper bound), entries follow.
pub struct Board {
    base: *mut Entry,
    fd: OwnedFd,
}

// SAFETY: all access to the mapping is through atomics.
unsafe impl Send for Board {}
unsafe impl Sync for Board {}

impl Board {
    /// A new, zeroed board (the master's).
    pub fn create() -> std::io::Result<Board> {
        let fd = nix::sys::memfd::memfd_create(c"rpcd-balance", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, SIZE as i64)?;
        Board::map(fd)
    }

    /// Maps a board passed as `fd` (a worker's).
    pub fn map(fd: OwnedFd) -> std::io::Result<Board> {
        // SAFETY: a shared mapping of a memfd of SIZE bytes; only atomics
        // are ever read or written through it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), SIZE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Board { base: p.cast(), fd })
    }

    /// A worker's copy of a descriptor number it inherited.
    ///
    /// # Safety
    /// `raw` must be an open descriptor of a board that nothing else owns.
    pub unsafe fn from_raw_fd(raw: i32) -> std::io::Result<Board> {
        Board::map(OwnedFd::from_raw_fd(raw))
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn entry(&self, i: usize) -> &Entry {
        assert!(i < ENTRIES);
        // SAFETY: within the mapping; entry i lives at index i + 1.
        unsafe { &*self.base.add(i + 1) }
    }

    fn header(&self) -> &AtomicU32 {
        // SAFETY: the first field of the first cache line.
        unsafe { &(*self.base).accepting }
    }

    /// The master: entry `i` is given to a new worker (zeroed).
    pub fn claim(&self, i: usize) {
        let e = self.entry(i);
        e.accepting.store(0, Ordering::Relaxed);
        e.open.store(0, Ordering::Relaxed);
        self.header().fetch_max(i as u32 + 1, Ordering::Release);
    }

    /// The master: entry `i`'s worker is gone (its counts no longer count).
    pub fn release(&self, i: usize) {
        let e = self.entry(i);
        e.accepting.store(0, Ordering::Release);
        e.open.store(0, Ordering::Release);
    }

    /// A worker starts (or stops) accepting.
    pub fn set_accepting(&self, i: usize, on: bool) {
        self.entry(i).accepting.store(on as u32, Ordering::Release);
    }

    pub fn opened(&self, i: usize) {
        self.entry(i).open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, i: usize) {
        let _ = self.entry(i).open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Over the accepting workers: the sum and the least of their open
    /// connections, how many they are; and entry `i`'s own count.
    fn counts(&self, i: usize) -> (u64, u64, u64, u64) {
        let used = (self.header().load(Ordering::Acquire) as usize).min(ENTRIES);
        let (mut sum, mut n, mut least) = (0u64, 0u64, u64::MAX);
        for j in 0..used {
            let e = self.entry(j);
            if e.accepting.load(Ordering::Acquire) == 1 {
                let open = e.open.load(Ordering::Relaxed) as u64;
                sum += open;
                n += 1;
                least = least.min(open);
            }
        }
        (sum, n, least, self.entry(i).open.load(Ordering::Relaxed) as u64)
    }

    /// Whether the worker at entry `i` has more than its share.
    pub fn over_share(&self, i: usize) -> bool {
        let (sum, n, least, mine) = self.counts(i);
        over_share(mine, least, sum, n)
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.cast(), SIZE) };
    }
}

/// A worker's place on the board.
#[derive(Clone)]
pub struct Seat {
    pub board: Rc<Board>,
    pub entry: usize,
}

/// A worker's listener: accepts, deferring to the least-loaded workers.
pub struct Acceptor {
    fd: AsyncFd<std::net::TcpListener>,
    seat: Option<Seat>,
    /// When this worker, over its share, takes the pending connection anyway.
    defer_until: Option<Instant>,
}

impl Acceptor {
    /// Takes the listener (made non-blocking); without a seat it accepts
    /// as a plain listener would.
    pub fn new(listener: std::net::TcpListener, seat: Option<Seat>) -> std::io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the listener, whose descriptor stays the same.
        let fd = unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
        if let Some(s) = &seat {
            s.board.set_accepting(s.entry, true);
        }
        Ok(Acceptor { fd, seat, defer_until: None })
    }

    /// The next connection (counted as open on the board: the caller counts
    /// its close). Cancel-safe: a deferral keeps its deadline.
    pub async fn accept(&mut self) -> std::io::Result<tokio::net::TcpStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            if self.seat.as_ref().is_some_and(|s| s.board.over_share(s.entry)) {
                let until = *self.defer_until.get_or_insert_with(|| Instant::now() + DEFER);
                if Instant::now() < until {
                    drop(guard);
                    tokio::time::sleep_until(until).await;
                    continue;
                }
            }
            // SAFETY: accept4 on our listening socket; the result is ours.
            let r = guard.try_io(|l| match unsafe {
                libc::accept4(l.get_ref().as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            } {
                -1 => Err(std::io::Error::last_os_error()),
                fd => Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) }),
            });
            self.defer_until = None;
            match r {
                Ok(Ok(stream)) => {
                    if let Some(s) = &self.seat {
                        s.board.opened(s.entry);
                    }
                    return tokio::net::TcpStream::from_std(stream);
                }
                Ok(Err(e)) => return Err(e),
                // Nothing pending (the readiness is cleared).
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Some(s) = &self.seat {
            s.board.set_accepting(s.entry, false);
        }
    }
}

/// Whether a worker with `mine` open connections is further above the
/// least-loaded accepting worker (`least`) than a tenth of the mean (`sum`
/// over `n` workers), rounded down: with few connections any worker above
/// the least defers (the shares stay within one connection), with many a
/// little slack spares needless waits. Either way the shares stay within
/// about a tenth of each other, inside ±20 % of the mean.
pub fn over_share(mine: u64, least: u64, sum: u64, n: u64) -> bool {
    if n < 2 || mine <= least {
        return false;
    }
    // mine - least > floor(sum / n / 10), in integers.
    10 * n * (mine - least) > sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin() {
        // Alone, or with nobody else accepting: never over.
        assert!(!over_share(100, 100, 100, 1));
        assert!(!over_share(5, 5, 5, 0));
        // Few connections: any worker above the least defers.
        assert!(!over_share(0, 0, 0, 4));
        assert!(over_share(1, 0, 1, 4));
        assert!(over_share(5, 4, 17, 4));
        assert!(!over_share(4, 4, 17, 4));
        // Many: a tenth of the mean (here 105).
        assert!(!over_share(1105, 1000, 4200, 4));
        assert!(over_share(1106, 1000, 4200, 4));
    }

    #[test]
    fn shared_counts() {
        let b = Board::create().unwrap();
        let w = Board::map(b.fd().try_clone().unwrap()).unwrap();
        for i in 0..3 {
            b.claim(i);
            w.set_accepting(i, true);
        }
        for _ in 0..4 {
            w.opened(0);
        }
        w.opened(1);
        assert!(b.over_share(0)); // 4 against a least of 0
        assert!(b.over_share(1));
        assert!(!b.over_share(2));
        // A worker that stops accepting leaves the mean.
        w.set_accepting(1, false);
        w.set_accepting(2, false);
        assert!(!b.over_share(0));
        w.set_accepting(2, true);
        b.release(0);
        assert!(!b.over_share(2));
        w.closed(1);
        w.closed(1); // never below zero
        assert_eq!(w.counts(1).3, 0);
    }
}
