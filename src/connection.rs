//! One client connection of a worker: reading frames, answering them in
//! order, the drain.
//!
//! Frames are answered from the worker's method table
//! (`methods::Table`). Methods that answer at once write into the
//! worker's one reply buffer, and a batch of replies goes out in one write.
//! Calls answered later (handler processes, async methods) reserve a slot in
//! the connection's [`Replies`]; replies behind an outstanding one wait in
//! their own slot, so that the client gets every reply in request order.

use crate::handlers::Handlers;
use crate::methods::{self, Kind, Table};
use crate::protocol::{self, Decoded, ErrorCode, Parsed};
use crate::metrics::{self, Recorder};
use crate::replies::{Meta, Replies};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A connection's byte stream: plain TCP, or TLS over it (`crate::tls`).
/// Each connection task is compiled for its own kind, so the plain path
/// pays nothing for TLS.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Sized {
    /// Whether a restart can hand it to the next instance (plain TCP: the
    /// descriptor is the whole state). A TLS session lives in this process:
    /// such connections are drained as for a stop.
    const HANDS_OVER: bool;
    /// Whether [`Transport::write_now`] may leave bytes buffered in the
    /// process (TLS records not yet on the socket).
    const BUFFERS: bool;
    /// Writes what the socket takes now, without waiting. Returns how
    /// much of `out` was taken.
    fn write_now(&mut self, out: &[u8]) -> std::io::Result<usize>;
    /// Whether bytes taken by `write_now` still wait to go out.
    fn unflushed(&self) -> bool;
    /// Appends what has already arrived (decrypted), without waiting.
    fn take_arrived(&mut self, into: &mut Vec<u8>);
    fn peer(&self) -> Option<std::net::SocketAddr>;
    /// The TCP stream, for a hand-over (only when `HANDS_OVER`).
    fn into_tcp(self) -> Option<TcpStream>;
}

impl Transport for TcpStream {
    const HANDS_OVER: bool = true;
    const BUFFERS: bool = false;

    #[inline(always)]
    fn write_now(&mut self, out: &[u8]) -> std::io::Result<usize> {
        write_now(self, out)
    }

    #[inline(always)]
    fn unflushed(&self) -> bool {
        false
    }

    fn take_arrived(&mut self, into: &mut Vec<u8>) {
        // Ask the socket itself: the runtime may not have seen the
        // readiness of bytes that arrived just now.
        let mut chunk = [0u8; 16 * 1024];
        // (After the client's EOF, recv returns 0 at once.)
        loop {
            // SAFETY: recv writes at most chunk.len() bytes into chunk.
            let n = unsafe { libc::recv(self.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len(), libc::MSG_DONTWAIT) };
            match n {
                n if n > 0 => into.extend_from_slice(&chunk[..n as usize]),
                -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
                _ => break,
            }
        }
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer_addr().ok()
    }

    fn into_tcp(self) -> Option<TcpStream> {
        Some(self)
    }
}

impl Transport for crate::tls::Stream {
    const HANDS_OVER: bool = false;
    const BUFFERS: bool = true;

    fn write_now(&mut self, out: &[u8]) -> std::io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut done = 0;
        while done < out.len() {
            match Pin::new(&mut *self).poll_write(&mut cx, &out[done..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => done += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        // The records rustls has made: onto the socket, as far as it takes them.
        if let Poll::Ready(Err(e)) = Pin::new(&mut *self).poll_flush(&mut cx) {
            return Err(e);
        }
        Ok(done)
    }

    fn unflushed(&self) -> bool {
        self.get_ref().1.wants_write()
    }

    fn take_arrived(&mut self, into: &mut Vec<u8>) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *self).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => into.extend_from_slice(rb.filled()),
                _ => break,
            }
        }
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        self.get_ref().0.peer_addr().ok()
    }

    fn into_tcp(self) -> Option<TcpStream> {
        None
    }
}

/// Size of the worker's one read buffer (and the usual reply buffer).
pub const READ_CHUNK: usize = 64 * 1024;

/// While draining, how long a connection that has received nothing yet
/// waits for its first request (at most the idle timeout).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// While draining, a connection with nothing owed and nothing partly
/// received closes once it has been quiet this long, rather than at once: a
/// request its client sent as the drain began still arrives and is answered
/// (served, or `shutting_down`, which the client may retry elsewhere)
/// instead of meeting a closed connection and leaving the client unable to
/// tell whether it ran. A client that sees the close before it sends (rpcctl
/// and `rpcd::client` check) reconnects.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// ... and at the latest this long after the drain began, even if its
/// client keeps sending (it gets `shutting_down`) or never sends.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// Replies a connection may have outstanding before it stops reading (the
/// client then waits in TCP's flow control).
const MAX_OUTSTANDING: usize = 1024;

/// What the worker's connections share.
pub struct Shared {
    pub max_frame_bytes: u32,
    pub(crate) table: Table,
    pub handlers: Rc<Handlers>,
    pub idle_timeout: Option<Duration>,
    pub write_timeout: Duration,
    pub max_connections: u64,
    pub requests: Cell<u64>,
    pub connections: Cell<u64>,
    pub all_closed: tokio::sync::Notify,
    /// The worker's read and reply buffers, shared by its connections: they
    /// are served one at a time on this one thread and hold neither across
    /// an await, so an idle connection owns no buffer.
    pub rbuf: RefCell<Vec<u8>>,
    pub obuf: RefCell<Vec<u8>>,
    /// Set when the drain begins; the connections' wakers are woken then.
    /// (A flag is much cheaper to look at on every wakeup than a channel.)
    pub draining: Cell<bool>,
    pub wakers: RefCell<HashMap<u64, Waker>>,
    pub next_conn: Cell<u64>,
    /// Set with `draining` for a restart: idle connections are handed over
    /// (into `handed`) instead of being closed.
    pub handover: Cell<bool>,
    pub handed: RefCell<Vec<crate::handover::Conn>>,
    /// Woken when a connection joins `handed`.
    pub handed_ready: tokio::sync::Notify,
    /// This worker's place on the master's balance board, if it has one.
    pub seat: Option<crate::balance::Seat>,
    /// Where this worker counts (`crate::metrics`), if it has a slot.
    pub stats: Option<Recorder>,
    /// Woken when the drain begins (for handshakes under way).
    pub drain_begun: tokio::sync::Notify,
    /// A hand-over drain (reload, restart) leaves sessions that cannot be
    /// handed over (TLS) serving as before, until this is set near the
    /// graceful timeout: then they drain as for a stop.
    pub sessions_drain: Cell<bool>,
    /// `server.slow_request_ms` in nanoseconds (0: no slow log).
    pub slow_ns: u64,
    /// The requests answered in the batch being written, counted once it
    /// is (run-length: a pipelined batch of pings is one entry).
    pub tally: RefCell<Vec<Tally>>,
}

/// `n` requests of a batch, answered alike.
#[derive(Clone, Copy, Debug)]
pub struct Tally {
    /// The method's metric index and the code's, as one word: `metric << 8 | code`.
    pub key: u32,
    pub n: u32,
    /// `metrics::now_ns()` when its request arrived.
    pub arrival: u64,
}

/// Adds one request to the batch's tally.
#[inline(always)]
fn note(tally: &mut Vec<Tally>, metric: u16, code: u8, arrival: u64) {
    let key = u32::from(metric) << 8 | u32::from(code);
    if let Some(t) = tally.last_mut() {
        if t.key == key && t.arrival == arrival {
            t.n += 1;
            return;
        }
    }
    tally.push(Tally { key, n: 1, arrival });
}

impl Shared {
    /// A connection is about to be served (counted before its task runs,
    /// so that a burst of accepts sees it). [`Acceptor::accept`] has
    /// counted it on the board already; `adopted` ones are counted here.
    ///
    /// [`Acceptor::accept`]: crate::balance::Acceptor::accept
    pub fn conn_opened(&self, adopted: bool) {
        self.connections.set(self.connections.get() + 1);
        if let Some(r) = &self.stats {
            if !adopted {
                r.accepted();
            }
            r.opened();
        }
        if let Some(s) = self.seat.as_ref().filter(|_| adopted) {
            s.board.opened(s.entry);
        }
    }

    fn conn_closed(&self) {
        self.connections.set(self.connections.get() - 1);
        if let Some(r) = &self.stats {
            r.closed();
        }
        if let Some(s) = &self.seat {
            s.board.closed(s.entry);
        }
        if self.connections.get() == 0 {
            self.all_closed.notify_waiters();
        }
    }

    pub fn begin_drain(&self) {
        self.draining.set(true);
        self.drain_begun.notify_waiters();
        self.wake_all();
    }

    /// Ends the grace of the sessions a hand-over could not take (see
    /// [`Shared::sessions_drain`]).
    pub fn drain_sessions(&self) {
        self.sessions_drain.set(true);
        self.wake_all();
    }

    fn wake_all(&self) {
        for w in self.wakers.borrow().values() {
            w.wake_by_ref();
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

/// Serves one accepted connection (or refuses it when over the limit),
/// counted with [`Shared::conn_opened`] already.
pub async fn serve(stream: TcpStream, sh: Rc<Shared>) {
    serve_from(stream, sh, Vec::new()).await
}

/// Serves a connection handed over by the previous instance, whose client
/// had sent `leftover` (part of a frame) when it was handed over.
pub async fn serve_adopted(stream: TcpStream, sh: Rc<Shared>, leftover: Vec<u8>) {
    serve_from(stream, sh, leftover).await
}

/// Serves one accepted connection on a TLS port: the handshake (bounded by
/// its timeout, and cut short by a drain), then the protocol inside.
/// Counted with [`Shared::conn_opened`] already.
pub async fn serve_tls(stream: TcpStream, tls: Rc<crate::tls::Server>, sh: Rc<Shared>) {
    if sh.connections.get() > sh.max_connections {
        // No session to write `overloaded` in: close before the handshake.
        log::warn!("refused a connection: {} open", sh.connections.get() - 1);
    } else {
        let drain = async {
            let begun = sh.drain_begun.notified();
            if !sh.draining.get() {
                begun.await;
            }
            // A client already in its handshake gets the time a fresh
            // connection gets for its first request.
            tokio::time::sleep(FIRST_REQUEST_GRACE).await;
        };
        if let Some(s) = tls.accept(stream, drain).await {
            connection(s, &sh, Vec::new()).await;
        }
    }
    sh.conn_closed();
}

async fn serve_from(stream: TcpStream, sh: Rc<Shared>, leftover: Vec<u8>) {
    let over = sh.connections.get() > sh.max_connections;
    if over {
        refuse(stream, &sh).await;
    } else {
        connection(stream, &sh, leftover).await;
    }
    sh.conn_closed();
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

/// Appends replies for every complete frame at the front of `data` (to
/// `out`, or to `replies` once some reply is outstanding).
fn process(data: &[u8], out: &mut Vec<u8>, sh: &Shared, served: &mut Option<usize>, replies: &mut Option<Rc<Replies>>, c: &mut Counting) -> Processed {
    let mut at = 0;
    loop {
        let buf = &data[at..];
        match protocol::decode(buf, sh.max_frame_bytes) {
            Decoded::Frame(len) => {
                sh.requests.set(sh.requests.get() + 1);
                match served {
                    Some(0) => {
                        let start = out.len();
                        protocol::error_frame(out, ErrorCode::ShuttingDown, "server is shutting down; retry elsewhere", None);
                        in_order(out, start, replies, 0, metrics::error_index(ErrorCode::ShuttingDown), c);
                    }
                    _ => {
                        dispatch(&buf[4..4 + len], out, sh, replies, c);
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
                let msg = format!("frame of {n} bytes is over the limit of {} bytes", sh.max_frame_bytes);
                let start = out.len();
                protocol::error_frame(out, ErrorCode::TooLarge, &msg, None);
                in_order(out, start, replies, 0, metrics::error_index(ErrorCode::TooLarge), c);
                return Processed { used: at, need: 0, close: true };
            }
        }
    }
}

/// How the batch being answered is counted: when it arrived, and its tally.
struct Counting<'a> {
    arrival: u64,
    tally: &'a mut Vec<Tally>,
}

/// A reply written at `out[start..]` at once, counted with the batch: while
/// some reply before it is outstanding, it waits in a slot of its own
/// instead (and is counted when that is written).
#[inline(always)]
fn in_order(out: &mut Vec<u8>, start: usize, replies: &Option<Rc<Replies>>, metric: u16, code: u8, c: &mut Counting) {
    if let Some(r) = replies {
        if !r.is_empty() {
            r.push_ready(out.split_off(start), Meta { metric, code, arrival: c.arrival });
            return;
        }
    }
    note(c.tally, metric, code, c.arrival);
}

/// Answers one request body: at once onto `out`, or later through a slot.
#[inline(always)]
fn dispatch(body: &[u8], out: &mut Vec<u8>, sh: &Shared, replies: &mut Option<Rc<Replies>>, c: &mut Counting) {
    let start = out.len();
    let (metric, code) = match protocol::parse(body) {
        Parsed::Invalid { code, message, id } => {
            protocol::error_frame_id(out, code, &message, id);
            (0, metrics::error_index(code))
        }
        Parsed::Call { method, params, id } => match sh.table.get(&method) {
            None => {
                protocol::unknown_method(out, &method, id);
                (0, metrics::error_index(ErrorCode::UnknownMethod))
            }
            Some(e) => match &e.kind {
                Kind::Now(f) => (e.metric, methods::answer_now(e, f, params, id, out)),
                Kind::Later { f, timeout } => {
                    let meta = Meta { metric: e.metric, code: 0, arrival: c.arrival };
                    let reply = replies.get_or_insert_with(Replies::new).reserve(id, meta);
                    let fut = f(params.to_string());
                    let (timeout, prefix, name) = (*timeout, e.prefix.clone(), method.into_owned());
                    tokio::task::spawn_local(async move {
                        match tokio::time::timeout(timeout, fut).await {
                            Ok(Ok(result)) => reply.send_with_prefix(&prefix, &result),
                            Ok(Err(e)) => reply.error_code(&e.code, &e.message),
                            Err(_) => reply.error(ErrorCode::Timeout, &format!("method {name} did not finish within {} ms (timeout_ms)", timeout.as_millis())),
                        }
                    });
                    return;
                }
                Kind::Handler { pool, route } => {
                    let meta = Meta { metric: e.metric, code: 0, arrival: c.arrival };
                    let reply = replies.get_or_insert_with(Replies::new).reserve(id, meta);
                    sh.handlers.submit(*pool, *route, params, reply);
                    return;
                }
            },
        },
    };
    in_order(out, start, replies, metric, code, c);
}

/// What woke a connection up.
enum Event {
    /// `n` bytes were read: into the worker's read buffer when the
    /// connection had nothing pending, else appended to its pending bytes.
    Data(usize),
    Eof,
    Drain,
    IdleTimer,
    /// Outstanding replies at the front have been filled.
    Replies,
}

/// Reads once, without waiting: into the worker-wide buffer when nothing is
/// pending (the common case: a connection then holds no buffer of its
/// own), else onto the end of `pending`. Tokio clears the read readiness
/// after a short read, so an idle socket costs no extra `recv`.
fn poll_read_into<S: Transport>(cx: &mut Context<'_>, stream: &mut S, sh: &Shared, pending: &mut Vec<u8>, need: usize) -> Poll<std::io::Result<usize>> {
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
/// writes the replies (with any filled slots behind them) in one go. Holds
/// the worker-wide buffers only while it runs (never across an await).
#[allow(clippy::too_many_arguments)]
fn answer<S: Transport>(
    stream: &mut S,
    sh: &Shared,
    pending: &mut Vec<u8>,
    fresh: Option<usize>,
    served: &mut Option<usize>,
    need: &mut usize,
    replies: &mut Option<Rc<Replies>>,
    now: &mut u64,
) -> Answered {
    let mut out = sh.obuf.borrow_mut();
    out.clear();
    let mut tally = sh.tally.borrow_mut();
    let mut c = Counting { arrival: *now, tally: &mut tally };
    let close = match fresh {
        Some(n) => {
            let rbuf = sh.rbuf.borrow();
            let p = process(&rbuf[..n], &mut out, sh, served, replies, &mut c);
            if !p.close && p.used < n {
                pending.reserve(p.need.max(n - p.used));
                pending.extend_from_slice(&rbuf[p.used..n]);
            }
            *need = p.need;
            p.close
        }
        None => {
            let p = process(pending, &mut out, sh, served, replies, &mut c);
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
    if let Some(r) = replies {
        r.take_ready(&mut out, |m| note(c.tally, m.metric, m.code, m.arrival));
    }
    let res = if out.is_empty() {
        Answered::Written { close }
    } else {
        match stream.write_now(&out) {
            Ok(n) if n == out.len() => Answered::Written { close },
            Ok(n) => Answered::Rest { rest: out[n..].to_vec(), close },
            Err(_) => Answered::Failed,
        }
    };
    if !tally.is_empty() {
        *now = metrics::now_ns();
        count(sh, stream, &mut tally, *now);
    }
    if out.capacity() > 1 << 20 {
        *out = Vec::with_capacity(READ_CHUNK);
    }
    res
}

/// Counts a written batch (and logs its slow requests).
#[inline]
fn count<S: Transport>(sh: &Shared, stream: &S, tally: &mut Vec<Tally>, written: u64) {
    for t in tally.drain(..) {
        let ns = written.saturating_sub(t.arrival);
        if let Some(r) = &sh.stats {
            r.record((t.key >> 8) as u16, t.key as u8, t.n as u64, ns);
        }
        if sh.slow_ns > 0 && ns >= sh.slow_ns {
            slow(sh, stream, &t, ns);
        }
    }
}

#[cold]
fn slow<S: Transport>(sh: &Shared, stream: &S, t: &Tally, ns: u64) {
    let method = match t.key >> 8 {
        0 => "(other)",
        m => sh.table.names().nth(m as usize - 1).unwrap_or("(other)"),
    };
    let peer = stream.peer().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
    let more = if t.n > 1 { format!(" ({} requests in one batch)", t.n) } else { String::new() };
    log::warn!(
        "slow request: method {method} took {:.1} ms (over slow_request_ms = {}), reply {}, worker {}, peer {peer}{more}",
        ns as f64 / 1e6,
        sh.slow_ns / 1_000_000,
        metrics::CODES[(t.key & 0xff) as usize % metrics::NCODES],
        std::process::id()
    );
}

async fn connection<S: Transport>(mut stream: S, sh: &Shared, leftover: Vec<u8>) {
    // The task's waker, for the drain to wake it (a task's waker stays valid
    // for its whole life).
    let id = sh.next_conn.get();
    sh.next_conn.set(id + 1);
    let waker = poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    sh.wakers.borrow_mut().insert(id, waker);
    let _slot = WakerSlot(sh, id);
    // Bytes of an incomplete frame (empty, and unallocated, most of the time).
    let mut need = match protocol::decode(&leftover, sh.max_frame_bytes) {
        Decoded::Need(total) if leftover.len() >= 4 => total,
        _ => 0,
    };
    let mut pending: Vec<u8> = leftover;
    // Replies that come later (none, and unallocated, unless this
    // connection calls a handler or an async method).
    let mut replies: Option<Rc<Replies>> = None;
    // While draining: how many more frames are served normally (those
    // received, the one a client was in the middle of sending, or else the
    // one that may be on its way); later ones get `shutting_down`.
    let mut served: Option<usize> = None;
    let mut draining = false;
    // A restart's drain: read nothing more; once nothing is owed, the
    // connection goes to the next instance (unread bytes stay in the kernel).
    let mut handing = false;
    // While draining: when the connection closes even if not quiet.
    let mut close_by = None::<Instant>;
    // The client has shut its side: answer what it sent, then close.
    let mut eof = false;
    // Whether any byte has arrived: a connection accepted just before the
    // drain, whose client has not yet sent its first request (it is on its
    // way), gets that request answered rather than the connection closed.
    let mut received = !pending.is_empty();
    // One timer per connection, re-armed only when it fires early. Once
    // polled it wakes this task when due, so it is polled again only then.
    let mut idle_after = sh.idle_timeout;
    // When it was last active, as `metrics::now_ns()` (a cheaper clock read
    // than `Instant::now()` on every batch); `last_active` is the same as an
    // Instant, brought up to date where it is used (timers, the drain).
    let mut active_ns = metrics::now_ns();
    let mut last_active = Instant::now();
    let mut idle = idle_after.map(|d| Box::pin(tokio::time::sleep_until(last_active + d)));
    let mut idle_armed = false;
    loop {
        let ev = poll_fn(|cx| {
                if !draining && sh.draining.get() && (S::HANDS_OVER || !sh.handover.get() || sh.sessions_drain.get()) {
                    return Poll::Ready(Event::Drain);
                }
                // Deferred replies or a half-close: the plain path skips this.
                let mut read = !handing;
                if let Some(r) = &replies {
                    r.set_waker(cx.waker());
                    if r.front_ready() {
                        return Poll::Ready(Event::Replies);
                    }
                    read = !eof && r.len() < MAX_OUTSTANDING;
                }
                if read {
                    match poll_read_into(cx, &mut stream, sh, &mut pending, need) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Event::Eof),
                        Poll::Ready(Ok(n)) => return Poll::Ready(Event::Data(n)),
                        Poll::Pending => {}
                    }
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
        let outstanding = replies.as_ref().is_some_and(|r| !r.is_empty());
        let fresh = match ev {
            Event::Eof => {
                if !outstanding {
                    return end(&replies);
                }
                // Half-closed: the replies still owed go out first.
                eof = true;
                continue;
            }
            Event::IdleTimer => {
                last_active = instant_of(active_ns);
                let due = close_due(last_active, idle_after, close_by, &pending, sh);
                let now = Instant::now();
                if now >= due {
                    if !outstanding {
                        log::debug!("closing idle connection");
                        return end(&replies);
                    }
                    // Waiting for replies is not being idle.
                    last_active = now;
                    active_ns = metrics::now_ns();
                }
                if let Some(t) = idle.as_mut() {
                    t.as_mut().reset(close_due(last_active, idle_after, close_by, &pending, sh));
                    idle_armed = false;
                }
                continue;
            }
            Event::Replies => None,
            // Nothing was pending: the bytes are in the worker's buffer.
            Event::Data(n) => {
                received = true;
                pending.is_empty().then_some(n)
            }
            Event::Drain if S::HANDS_OVER && sh.handover.get() => {
                draining = true;
                handing = true;
                None
            }
            Event::Drain => {
                draining = true;
                // Take in what has already been received.
                stream.take_arrived(&mut pending);
                // Serve every complete frame, and the one partly received.
                let mut complete = 0usize;
                let mut at = 0usize;
                let mut partial = false;
                loop {
                    match protocol::decode(&pending[at..], sh.max_frame_bytes) {
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
                // Nothing received yet: the request that may be on its way
                // (the first, or the next on a kept-alive connection).
                served = Some((complete + usize::from(partial)).max(usize::from(pending.is_empty())));
                // Then linger until quiet (see DRAIN_QUIET).
                let quiet = if received { DRAIN_QUIET } else { FIRST_REQUEST_GRACE };
                idle_after = Some(idle_after.map_or(quiet, |d| d.min(quiet)));
                last_active = Instant::now();
                active_ns = metrics::now_ns();
                close_by = Some(last_active + DRAIN_LINGER);
                let at = close_due(last_active, idle_after, close_by, &pending, sh);
                match idle.as_mut() {
                    Some(t) => t.as_mut().reset(at),
                    None => idle = Some(Box::pin(tokio::time::sleep_until(at))),
                }
                idle_armed = false;
                None
            }
        };
        // When this batch arrived (and, once answered, was written).
        let mut now = metrics::now_ns();
        let answered = answer(&mut stream, sh, &mut pending, fresh, &mut served, &mut need, &mut replies, &mut now);
        let close = match answered {
            Answered::Written { close } if !S::BUFFERS || !stream.unflushed() => close,
            Answered::Written { close } => {
                match tokio::time::timeout(sh.write_timeout, stream.flush()).await {
                    Ok(Ok(())) => {}
                    _ => return end(&replies),
                }
                close
            }
            Answered::Rest { rest, close } => {
                match tokio::time::timeout(sh.write_timeout, async {
                    stream.write_all(&rest).await?;
                    stream.flush().await
                })
                .await
                {
                    Ok(Ok(())) => {}
                    _ => return end(&replies),
                }
                close
            }
            Answered::Failed => return end(&replies),
        };
        let outstanding = replies.as_ref().is_some_and(|r| !r.is_empty());
        if handing && !outstanding && !eof && !close {
            return hand_over(stream, pending, sh, &replies);
        }
        if close {
            // A frame over the limit: what was owed before it goes out first.
            if outstanding {
                eof = true;
                pending.clear();
                continue;
            }
            let _ = stream.shutdown().await;
            return end(&replies);
        }
        if !outstanding && (eof || (pending.is_empty() && close_by.is_some_and(|t| Instant::now() >= t))) {
            let _ = stream.shutdown().await;
            return end(&replies);
        }
        active_ns = now;
        if draining {
            // What is partly received may have changed the close's due time.
            last_active = instant_of(active_ns);
            if let Some(t) = idle.as_mut() {
                t.as_mut().reset(close_due(last_active, idle_after, close_by, &pending, sh));
                idle_armed = false;
            }
        }
    }
}

/// The Instant of a `metrics::now_ns()` reading (both are CLOCK_MONOTONIC).
fn instant_of(ns: u64) -> Instant {
    Instant::now() - Duration::from_nanos(metrics::now_ns().saturating_sub(ns))
}

/// When a quiet connection closes: after its idle timeout; while draining,
/// once quiet for the (shorter) drain linger and at the latest at
/// `close_by`, unless a frame is partly received (its client is sending:
/// the idle timeout, and the worker's graceful timeout, bound that).
fn close_due(last_active: Instant, idle_after: Option<Duration>, close_by: Option<Instant>, pending: &[u8], sh: &Shared) -> Instant {
    match close_by {
        Some(_) if !pending.is_empty() => last_active + sh.idle_timeout.unwrap_or(Duration::from_secs(3600)),
        Some(by) => (last_active + idle_after.unwrap_or_default()).min(by),
        None => last_active + idle_after.unwrap_or_default(),
    }
}

/// Passes the connection, with what its client has sent of the next frame,
/// to the worker's list for the next instance.
fn hand_over<S: Transport>(stream: S, leftover: Vec<u8>, sh: &Shared, replies: &Option<Rc<Replies>>) {
    end(replies);
    let Some(tcp) = stream.into_tcp() else { return };
    match tcp.into_std() {
        Ok(s) => {
            sh.handed.borrow_mut().push(crate::handover::Conn { fd: s.into(), leftover });
            sh.handed_ready.notify_one();
        }
        Err(e) => log::warn!("cannot hand a connection over: {e}; closing it"),
    }
}

/// The connection is done: nothing more will be read from its replies.
fn end(replies: &Option<Rc<Replies>>) {
    if let Some(r) = replies {
        r.close();
    }
}
