//! A worker process: `rpcd --worker`, spawned (fork+exec) by the master.
//!
//! Inherits the listening socket as fd 3 and a socketpair to the master as
//! fd 4. Reads its settings from fd 4 (one JSON line), then serves the wire
//! protocol on a single-threaded tokio runtime, reporting `ready` and then a
//! heartbeat to the master. SIGTERM drains: stop accepting, answer every
//! request already received, close idle connections, exit 0.

use crate::config::Config;
use crate::protocol::{self, Decoded, ErrorCode, Limits};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub const LISTEN_FD: i32 = 3;
pub const CHANNEL_FD: i32 = 4;
pub const MASTER_PID_ENV: &str = "RPCD_MASTER_PID";

/// Size of the worker's one read buffer (and the usual reply buffer).
const READ_CHUNK: usize = 64 * 1024;

/// While draining, how long a connection that has received nothing yet
/// waits for its first request (at most the idle timeout).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// What the master sends a new worker, as the first line on its channel.
#[derive(Serialize, Deserialize)]
pub struct WorkerSetup {
    pub config: Config,
    pub slot: usize,
    pub generation: u64,
}

struct Shared {
    limits: Limits,
    idle_timeout: Option<Duration>,
    write_timeout: Duration,
    max_connections: u64,
    requests: Cell<u64>,
    connections: Cell<u64>,
    all_closed: tokio::sync::Notify,
    /// The worker's read and reply buffers, shared by its connections: they
    /// are served one at a time on this one thread and hold neither across
    /// an await, so an idle connection owns no buffer.
    rbuf: RefCell<Vec<u8>>,
    obuf: RefCell<Vec<u8>>,
    /// Set when the drain begins; the connections' wakers are woken then.
    /// (A flag is much cheaper to look at on every wakeup than a channel.)
    draining: Cell<bool>,
    wakers: RefCell<HashMap<u64, Waker>>,
    next_conn: Cell<u64>,
}

impl Shared {
    fn begin_drain(&self) {
        self.draining.set(true);
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers.into_values() {
            w.wake();
        }
    }
}

/// A connection's entry in [`Shared::wakers`], removed when it ends.
struct WakerSlot<'a>(&'a Shared, u64);

impl Drop for WakerSlot<'_> {
    fn drop(&mut self) {
        self.0.wakers.borrow_mut().remove(&self.1);
    }
}

/// Entry point of `rpcd --worker`. Never returns.
pub fn run() -> ! {
    // Die with the master; then close the race where it died before prctl.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let expected: i32 = std::env::var(MASTER_PID_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(-1);
    if nix::unistd::getppid().as_raw() != expected {
        eprintln!("rpcd worker: master {expected} is gone, exiting");
        std::process::exit(1);
    }
    // The terminal's Ctrl-C and hangup are the master's business.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let chan = unsafe { std::os::unix::net::UnixStream::from_raw_fd(CHANNEL_FD) };
    let mut line = String::new();
    if BufReader::new(&chan).read_line(&mut line).unwrap_or(0) == 0 {
        eprintln!("rpcd worker: no setup from the master");
        std::process::exit(1);
    }
    let setup: WorkerSetup = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rpcd worker: bad setup from the master: {e}");
            std::process::exit(1);
        }
    };
    let role: &'static str = Box::leak(format!("worker {}.{}: ", setup.generation, setup.slot).into_boxed_str());
    crate::logging::init(&setup.config.log, role);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&rt, serve(setup, chan));
    std::process::exit(code)
}

async fn serve(setup: WorkerSetup, chan: std::os::unix::net::UnixStream) -> i32 {
    let cfg = &setup.config;
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FD) };
    if let Err(e) = std_listener.set_nonblocking(true) {
        log::error!("listener: {e}");
        return 1;
    }
    let listener = match TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("listener: {e}");
            return 1;
        }
    };
    chan.set_nonblocking(true).ok();
    let chan = match tokio::net::UnixStream::from_std(chan) {
        Ok(c) => c,
        Err(e) => {
            log::error!("master channel: {e}");
            return 1;
        }
    };
    let (mut chan_rd, mut chan_wr) = chan.into_split();
    let shared = Rc::new(Shared {
        limits: Limits { max_frame_bytes: cfg.server.max_frame_bytes, pi_max_terms: cfg.methods.pi.max_terms },
        idle_timeout: (cfg.server.idle_timeout_secs > 0).then(|| Duration::from_secs(cfg.server.idle_timeout_secs)),
        write_timeout: Duration::from_secs(cfg.server.write_timeout_secs.max(1)),
        max_connections: cfg.server.max_connections as u64,
        requests: Cell::new(0),
        connections: Cell::new(0),
        all_closed: tokio::sync::Notify::new(),
        rbuf: RefCell::new(vec![0; READ_CHUNK]),
        obuf: RefCell::new(Vec::with_capacity(READ_CHUNK)),
        draining: Cell::new(false),
        wakers: RefCell::new(HashMap::new()),
        next_conn: Cell::new(0),
    });
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signal handler: {e}");
            return 1;
        }
    };

    release_startup_text();
    // The accept loop is registered with the runtime: tell the master.
    if chan_wr.write_all(b"ready\n").await.is_err() {
        return 1;
    }
    log::debug!("accepting");
    let hb_every = Duration::from_millis(cfg.server.heartbeat_interval_ms);
    let mut hb = tokio::time::interval(hb_every);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chan_buf = [0u8; 64];
    let mut accept_backoff = Duration::from_millis(10);
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            biased;
            _ = term.recv() => break,
            r = chan_rd.read(&mut chan_buf) => {
                if matches!(r, Ok(0) | Err(_)) {
                    log::warn!("master channel closed; exiting");
                    return 1;
                }
            }
            _ = hb.tick() => {
                let msg = format!("hb {} {}\n", shared.requests.get(), shared.connections.get());
                if chan_wr.write_all(msg.as_bytes()).await.is_err() {
                    log::warn!("master gone; exiting");
                    return 1;
                }
            }
            r = listener.as_ref().unwrap().accept() => match r {
                Ok((stream, _)) => {
                    accept_backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    let sh = shared.clone();
                    tokio::task::spawn_local(async move {
                        sh.connections.set(sh.connections.get() + 1);
                        let over = sh.connections.get() > sh.max_connections;
                        if over {
                            refuse(stream, &sh).await;
                        } else {
                            connection(stream, &sh).await;
                        }
                        sh.connections.set(sh.connections.get() - 1);
                        if sh.connections.get() == 0 {
                            sh.all_closed.notify_waiters();
                        }
                    });
                }
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off instead of spinning.
                    log::warn!("accept failed: {e}; retrying in {accept_backoff:?}");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }

    // Drain: stop accepting (close our copy of the listener), let every
    // connection answer what it has received, then exit.
    drop(listener.take());
    shared.begin_drain();
    log::info!("draining {} connection(s)", shared.connections.get());
    loop {
        let notified = shared.all_closed.notified();
        if shared.connections.get() == 0 {
            break;
        }
        tokio::select! {
            _ = notified => {}
            _ = hb.tick() => {
                let msg = format!("hb {} {}\n", shared.requests.get(), shared.connections.get());
                if chan_wr.write_all(msg.as_bytes()).await.is_err() {
                    return 1;
                }
            }
        }
    }
    let msg = format!("hb {} 0\nbye\n", shared.requests.get());
    let _ = chan_wr.write_all(msg.as_bytes()).await;
    log::info!("drained after {} request(s); exiting", shared.requests.get());
    0
}

/// Unmaps the pages of program text and read-only data that this process
/// has touched so far.
///
/// A worker is a fresh exec of the whole daemon, and starting it runs code
/// that never runs again (argument parsing, config decoding, relocation,
/// runtime setup), while the kernel maps file pages in 64 KiB runs around
/// each page touched: much of the binary's and libc's text ends up in the
/// worker's RSS. Dropping the mappings costs nothing (the pages stay in the
/// page cache, shared with the master); what serving needs is mapped again
/// on first use. Only read-only file mappings without a single private
/// (written) page are dropped, so nothing can be lost: not RELRO, not data.
fn release_startup_text() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else { return };
    let mut candidate: Option<(usize, usize)> = None;
    let release = |range: Option<(usize, usize)>| {
        if let Some((start, end)) = range {
            // SAFETY: a clean private file mapping: MADV_DONTNEED only drops
            // page table entries, the next access maps the same file pages.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    };
    for line in smaps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(first), Some(second)) = (f.next(), f.next()) else { continue };
        if let Some((a, b)) = first.split_once('-').filter(|(a, _)| !a.is_empty() && a.bytes().all(|c| c.is_ascii_hexdigit())) {
            // A mapping's header: "start-end perms offset dev inode path".
            let path = f.nth(3).unwrap_or("");
            candidate = match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(start), Ok(end)) if (second == "r-xp" || second == "r--p") && path.starts_with('/') && end > start => {
                    Some((start, end))
                }
                _ => None,
            };
        } else if first == "Private_Dirty:" {
            // The last field of interest in a mapping's entry.
            let clean = second == "0";
            let c = candidate.take();
            if clean {
                release(c);
            }
        }
    }
}

async fn refuse(mut stream: TcpStream, sh: &Shared) {
    let mut out = Vec::new();
    protocol::error_frame(&mut out, ErrorCode::Overloaded, "too many connections; try another server", None);
    let _ = tokio::time::timeout(sh.write_timeout, stream.write_all(&out)).await;
    log::warn!("refused a connection: {} open", sh.connections.get() - 1);
}

/// What [`process`] did with the front of a buffer.
struct Processed {
    /// Bytes of complete frames consumed.
    used: usize,
    /// Total size of the incomplete frame after them, when known (0 if not).
    need: usize,
    /// A frame over the limit: answered, and the connection must close.
    close: bool,
}

/// Appends replies for every complete frame at the front of `data`.
fn process(data: &[u8], out: &mut Vec<u8>, sh: &Shared, served: &mut Option<usize>) -> Processed {
    let mut at = 0;
    loop {
        let buf = &data[at..];
        match protocol::decode(buf, sh.limits.max_frame_bytes) {
            Decoded::Frame(len) => {
                sh.requests.set(sh.requests.get() + 1);
                match served {
                    Some(0) => {
                        protocol::error_frame(out, ErrorCode::ShuttingDown, "server is shutting down; retry elsewhere", None);
                    }
                    _ => {
                        let err = protocol::handle(&buf[4..4 + len], &sh.limits, out);
                        if log::log_enabled!(log::Level::Debug) {
                            log::debug!("request of {len} bytes: {}", err.map(|e| e.as_str()).unwrap_or("ok"));
                        }
                        if let Some(n) = served {
                            *n -= 1;
                        }
                    }
                }
                at += 4 + len;
            }
            Decoded::Need(total) => {
                return Processed { used: at, need: if buf.len() >= 4 { total } else { 0 }, close: false };
            }
            Decoded::TooLarge(n) => {
                let msg = format!("frame of {n} bytes is over the limit of {} bytes", sh.limits.max_frame_bytes);
                protocol::error_frame(out, ErrorCode::TooLarge, &msg, None);
                return Processed { used: at, need: 0, close: true };
            }
        }
    }
}

/// What woke a connection up.
enum Event {
    /// `n` bytes were read: into the worker's read buffer when the
    /// connection had nothing pending, else appended to its pending bytes.
    Data(usize),
    Eof,
    Drain,
    IdleTimer,
}

/// Reads once, without waiting: into the worker-wide buffer when nothing is
/// pending (the common case: a connection then holds no buffer of its
/// own), else onto the end of `pending`. Tokio clears the read readiness
/// after a short read, so an idle socket costs no extra `recv`.
fn poll_read_into(cx: &mut Context<'_>, stream: &mut TcpStream, sh: &Shared, pending: &mut Vec<u8>, need: usize) -> Poll<std::io::Result<usize>> {
    if pending.is_empty() {
        let mut rbuf = sh.rbuf.borrow_mut();
        let mut rb = ReadBuf::new(&mut rbuf[..]);
        return match Pin::new(stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
    }
    let want = need.saturating_sub(pending.len()).clamp(READ_CHUNK / 16, READ_CHUNK);
    pending.reserve(want);
    let mut rb = ReadBuf::uninit(pending.spare_capacity_mut());
    let res = Pin::new(stream).poll_read(cx, &mut rb);
    let n = rb.filled().len();
    // SAFETY: poll_read initialized and filled the first n bytes of the spare capacity.
    unsafe { pending.set_len(pending.len() + n) };
    match res {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes what the socket takes now. Returns how much was written.
fn write_now(stream: &TcpStream, out: &[u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < out.len() {
        match stream.try_write(&out[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The outcome of answering what a connection has received.
enum Answered {
    /// Every reply is written.
    Written { close: bool },
    /// The socket is full: these bytes still have to go out.
    Rest { rest: Vec<u8>, close: bool },
    Failed,
}

/// Answers every complete frame in the worker's read buffer (`fresh` bytes
/// of it) or in `pending`, keeps an incomplete frame in `pending`, and
/// writes the replies in one go. Holds the worker-wide buffers only while it
/// runs (never across an await).
fn answer(stream: &TcpStream, sh: &Shared, pending: &mut Vec<u8>, fresh: Option<usize>, served: &mut Option<usize>, need: &mut usize) -> Answered {
    let mut out = sh.obuf.borrow_mut();
    out.clear();
    let close = match fresh {
        Some(n) => {
            let rbuf = sh.rbuf.borrow();
            let p = process(&rbuf[..n], &mut out, sh, served);
            if !p.close && p.used < n {
                pending.reserve(p.need.max(n - p.used));
                pending.extend_from_slice(&rbuf[p.used..n]);
            }
            *need = p.need;
            p.close
        }
        None => {
            let p = process(pending, &mut out, sh, served);
            if p.close || p.used == pending.len() {
                // Nothing left over: give the memory back.
                *pending = Vec::new();
            } else if p.used > 0 {
                pending.drain(..p.used);
            }
            *need = p.need;
            p.close
        }
    };
    let res = if out.is_empty() {
        Answered::Written { close }
    } else {
        match write_now(stream, &out) {
            Ok(n) if n == out.len() => Answered::Written { close },
            Ok(n) => Answered::Rest { rest: out[n..].to_vec(), close },
            Err(_) => Answered::Failed,
        }
    };
    if out.capacity() > 1 << 20 {
        *out = Vec::with_capacity(READ_CHUNK);
    }
    res
}

async fn connection(mut stream: TcpStream, sh: &Shared) {
    // The task's waker, for the drain to wake it (a task's waker stays valid
    // for its whole life).
    let id = sh.next_conn.get();
    sh.next_conn.set(id + 1);
    let waker = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    sh.wakers.borrow_mut().insert(id, waker);
    let _slot = WakerSlot(sh, id);
    // Bytes of an incomplete frame (empty, and unallocated, most of the time).
    let mut pending: Vec<u8> = Vec::new();
    let mut need = 0usize;
    // While draining: how many more frames are served normally (the one a
    // client was in the middle of sending); later ones get `shutting_down`.
    let mut served: Option<usize> = None;
    let mut draining = false;
    // Whether any byte has arrived: a connection accepted just before the
    // drain, whose client has not yet sent its first request (it is on its
    // way), gets that request answered rather than the connection closed.
    let mut received = false;
    // One timer per connection, re-armed only when it fires early. Once
    // polled it wakes this task when due, so it is polled again only then.
    let mut idle_after = sh.idle_timeout;
    let mut last_active = Instant::now();
    let mut idle = idle_after.map(|d| Box::pin(tokio::time::sleep_until(last_active + d)));
    let mut idle_armed = false;
    loop {
        let ev = poll_fn(|cx| {
            if !draining && sh.draining.get() {
                return Poll::Ready(Event::Drain);
            }
            match poll_read_into(cx, &mut stream, sh, &mut pending, need) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Eof),
                Poll::Ready(Ok(n)) => return Poll::Ready(Event::Data(n)),
                Poll::Pending => {}
            }
            if let Some(t) = idle.as_mut() {
                if !idle_armed || t.is_elapsed() {
                    idle_armed = true;
                    if t.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::IdleTimer);
                    }
                }
            }
            Poll::Pending
        })
        .await;
        let fresh = match ev {
            Event::Eof => return,
            Event::IdleTimer => {
                let due = last_active + idle_after.unwrap_or_default();
                if Instant::now() >= due {
                    log::debug!("closing idle connection");
                    return;
                }
                if let Some(t) = idle.as_mut() {
                    t.as_mut().reset(due);
                    idle_armed = false;
                }
                continue;
            }
            // Nothing was pending: the bytes are in the worker's buffer.
            Event::Data(n) => {
                received = true;
                pending.is_empty().then_some(n)
            }
            Event::Drain => {
                draining = true;
                // Take in what the kernel has already received: ask the
                // socket itself, since the runtime may not have seen the
                // readiness of bytes that arrived just now.
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    // SAFETY: recv writes at most chunk.len() bytes into chunk.
                    let n = unsafe { libc::recv(stream.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), libc::MSG_DONTWAIT) };
                    match n {
                        n if n > 0 => pending.extend_from_slice(&chunk[..n as usize]),
                        -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
                // Serve every complete frame, and the one partly received.
                let mut complete = 0usize;
                let mut at = 0usize;
                let mut partial = false;
                loop {
                    match protocol::decode(&pending[at..], sh.limits.max_frame_bytes) {
                        Decoded::Frame(len) => {
                            complete += 1;
                            at += 4 + len;
                        }
                        Decoded::Need(_) => {
                            partial = at < pending.len();
                            break;
                        }
                        Decoded::TooLarge(_) => break,
                    }
                }
                served = Some(complete + usize::from(partial));
                if !received && pending.is_empty() {
                    // Accepted, but the first request has not arrived yet.
                    served = Some(1);
                    let grace = idle_after.map_or(FIRST_REQUEST_GRACE, |d| d.min(FIRST_REQUEST_GRACE));
                    idle_after = Some(grace);
                    last_active = Instant::now();
                    match idle.as_mut() {
                        Some(t) => t.as_mut().reset(last_active + grace),
                        None => idle = Some(Box::pin(tokio::time::sleep_until(last_active + grace))),
                    }
                    idle_armed = false;
                }
                None
            }
        };
        let answered = answer(&stream, sh, &mut pending, fresh, &mut served, &mut need);
        let close = match answered {
            Answered::Written { close } => close,
            Answered::Rest { rest, close } => {
                match tokio::time::timeout(sh.write_timeout, stream.write_all(&rest)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
                close
            }
            Answered::Failed => return,
        };
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        if draining && (served == Some(0) || (pending.is_empty() && received)) {
            let _ = stream.shutdown().await;
            return;
        }
        if idle.is_some() {
            last_active = Instant::now();
        }
    }
}
