//! A worker process: `rpcd --worker`, spawned (fork+exec) by the master.
//!
//! Inherits the listening socket as fd 3 and a socketpair to the master as
//! fd 4. Reads its settings from fd 4 (one JSON line), starts its handler
//! processes ([`crate::handlers`]) and waits for their warmup, then serves
//! the wire protocol ([`crate::connection`]) on a single-threaded tokio
//! runtime, reporting `ready` and then a heartbeat to the master.
//!
//! SIGTERM drains: stop accepting, answer every request already received
//! (handler calls included) within `graceful_timeout_secs`, close the
//! connections, retire the handler processes (EOF, SIGTERM, SIGKILL, reap),
//! report what was reaped, exit 0.
//!
//! Lines to the master: `ready`, `hb REQUESTS CONNECTIONS`, `handlers
//! {"POOL":[PID,...]}` when those change, `fail REASON` (the worker cannot
//! start: its handlers failed), `reaped [...]` and `bye` at the end.

use crate::config::Config;
use crate::connection::{self, Shared, READ_CHUNK};
use crate::handlers::Handlers;
use crate::methods::Methods;
use crate::protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

pub const LISTEN_FD: i32 = 3;
pub const CHANNEL_FD: i32 = 4;
/// The master's balance board (`crate::balance`), when the setup names an
/// entry on it.
pub const BOARD_FD: i32 = 5;
pub const MASTER_PID_ENV: &str = "RPCD_MASTER_PID";

/// After the drain's deadline has answered what was outstanding, how long
/// connections get to write it before the worker moves on.
const FLUSH_GRACE: Duration = Duration::from_millis(500);

/// In a hand-over drain, how long before the graceful timeout the TLS
/// sessions (which cannot be handed over) start their drain: enough for
/// its linger (`connection::DRAIN_LINGER`) and the writes.
const SESSIONS_DRAIN: Duration = Duration::from_secs(2);

/// What the master sends a new worker, as the first line on its channel.
#[derive(Serialize, Deserialize)]
pub struct WorkerSetup {
    pub config: Config,
    pub slot: usize,
    pub generation: u64,
    /// Part of a start or a reload: a handler that cannot start (or fails
    /// its warmup) fails the worker, and so the start or the reload. A
    /// worker replacing a crashed one serves anyway (that pool's methods
    /// are `unavailable` while its processes cannot start).
    #[serde(default)]
    pub strict: bool,
    /// This worker's entry on the balance board (at [`BOARD_FD`]).
    #[serde(default)]
    pub board_entry: Option<usize>,
    /// This worker's slot in the stats (at [`crate::metrics::shm::STATS_FD`]).
    #[serde(default)]
    pub stats_entry: Option<usize>,
    /// `[server.tls]`'s certificate, key and client CAs, as the master
    /// read and checked them (None: plain TCP).
    #[serde(default)]
    pub tls: Option<crate::tls::Material>,
}

/// Entry point of `rpcd --worker`. Never returns.
pub fn run(methods: Methods) -> ! {
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
    // The master raised it; a library user's own master may not have.
    let _ = crate::limits::raise();
    // Handler processes must not inherit the listener, the master's
    // channel, or anything else this process inherited.
    crate::pool::cloexec_inherited();
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
    // The worker's loop is a task of its own rather than the root future:
    // the LocalSet polls its root future on every wakeup of any task (each
    // request), and the loop's select! would then run each time.
    let code = local.block_on(&rt, async move { tokio::task::spawn_local(serve(setup, chan, methods)).await.unwrap_or(1) });
    std::process::exit(code)
}

/// The master's end of the channel, for reports.
struct Report {
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Report {
    async fn line(&mut self, s: &str) -> bool {
        self.wr.write_all(s.as_bytes()).await.is_ok()
    }

    /// The handler PIDs, if they changed since the last report.
    async fn handlers(&mut self, sh: &Shared) -> bool {
        if sh.handlers.take_changed() {
            let pids = serde_json::to_string(&sh.handlers.pids()).unwrap_or_default();
            return self.line(&format!("handlers {pids}\n")).await;
        }
        true
    }

    async fn heartbeat(&mut self, sh: &Shared) -> bool {
        if !self.handlers(sh).await {
            return false;
        }
        let msg = format!("hb {} {}\n", sh.requests.get(), sh.connections.get());
        self.line(&msg).await
    }
}

async fn serve(setup: WorkerSetup, chan: std::os::unix::net::UnixStream, methods: Methods) -> i32 {
    let cfg = &setup.config;
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(LISTEN_FD) };
    // SAFETY: the master passes the board at BOARD_FD whenever it names an entry.
    let seat = setup.board_entry.and_then(|entry| match unsafe { crate::balance::Board::from_raw_fd(BOARD_FD) } {
        Ok(b) => Some(crate::balance::Seat { board: Rc::new(b), entry }),
        Err(e) => {
            log::warn!("balance board: {e}; accepting without it");
            None
        }
    });
    // SAFETY: the master passes the stats at STATS_FD whenever it names a slot.
    let stats = setup.stats_entry.and_then(|entry| match unsafe { crate::metrics::Recorder::from_raw_fd(crate::metrics::shm::STATS_FD, entry) } {
        Ok(r) => {
            let pools: Vec<&str> = cfg.handlers.keys().map(|k| k.as_str()).collect();
            if r.set_handler_names(&pools) < pools.len() {
                log::warn!("stats: only the first {} handler pools are counted by name", crate::metrics::shm::MAX_HANDLERS);
            }
            crate::metrics::set_worker(r);
            Some(r)
        }
        Err(e) => {
            log::warn!("stats: {e}; requests are not counted");
            None
        }
    });
    chan.set_nonblocking(true).ok();
    let chan = match tokio::net::UnixStream::from_std(chan) {
        Ok(c) => c,
        Err(e) => {
            log::error!("master channel: {e}");
            return 1;
        }
    };
    let (chan_rd, chan_wr) = chan.into_split();
    let mut report = Report { wr: chan_wr };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signal handler: {e}");
            return 1;
        }
    };
    let mut usr2 = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signal handler: {e}");
            return 1;
        }
    };
    let sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signal handler: {e}");
            return 1;
        }
    };

    let tls = match &setup.tls {
        Some(m) => match crate::tls::Server::new(m, &cfg.server.tls) {
            Ok(t) => Some(Rc::new(t)),
            Err(e) => {
                log::error!("cannot start: {e}");
                let _ = report.line(&format!("fail {}\n", e.replace('\n', " "))).await;
                return 1;
            }
        },
        None => None,
    };

    // Handler processes first: the worker is ready when they are.
    let handlers = Handlers::new(cfg);
    tokio::task::spawn_local(maintain(handlers.clone(), sigchld));
    if !handlers.is_empty() {
        let deadline = std::time::Instant::now() + Duration::from_secs(cfg.server.ready_timeout_secs);
        let started = std::time::Instant::now();
        if let Err(e) = handlers.start(deadline, setup.strict).await {
            log::error!("cannot start: {e}");
            let _ = report.line(&format!("fail {}\n", e.replace('\n', " "))).await;
            handlers.retire_all();
            finish_handlers(&handlers, cfg).await;
            return 1;
        }
        log::info!("handler processes ready after {} ms: {:?}", started.elapsed().as_millis(), handlers.pids());
    }
    let mut table = methods.table(cfg, |m| handlers.route(m, cfg));
    log::debug!("methods: {}", table.names().collect::<Vec<_>>().join(", "));
    if let Some(r) = &stats {
        let names: Vec<&str> = table.names().collect();
        let named = r.set_method_names(&names);
        if named < names.len() {
            log::warn!("stats: {} methods are counted as \"other\" (room for {named} names)", names.len() - named);
            table.count_first(named);
        }
    }
    let shared = Rc::new(Shared {
        max_frame_bytes: cfg.server.max_frame_bytes,
        table,
        handlers: handlers.clone(),
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
        handover: Cell::new(false),
        handed: RefCell::new(Vec::new()),
        handed_ready: tokio::sync::Notify::new(),
        seat: seat.clone(),
        stats,
        drain_begun: tokio::sync::Notify::new(),
        sessions_drain: Cell::new(false),
        slow_ns: cfg.server.slow_request_ms.saturating_mul(1_000_000),
        tally: RefCell::new(Vec::new()),
    });

    release_startup_text();
    // The accept loop is registered with the runtime: tell the master.
    if !handlers.is_empty() && !report.heartbeat(&shared).await {
        return 1;
    }
    let listener = match crate::balance::Acceptor::new(std_listener, seat) {
        Ok(l) => l,
        Err(e) => {
            log::error!("listener: {e}");
            return 1;
        }
    };
    if !report.line("ready\n").await {
        return 1;
    }
    log::debug!("accepting");
    let hb_every = Duration::from_millis(cfg.server.heartbeat_interval_ms);
    let mut hb = tokio::time::interval(hb_every);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut from_master = crate::handover::Reader::default();
    let mut accept_backoff = Duration::from_millis(10);
    let mut listener = Some(listener);
    loop {
        tokio::select! {
            biased;
            _ = term.recv() => break,
            _ = usr2.recv() => {
                shared.handover.set(true);
                break;
            }
            r = from_master.fill(chan_rd.as_ref()) => {
                if !matches!(r, Ok(true)) {
                    log::warn!("master channel closed; exiting");
                    return 1;
                }
                adopt(&mut from_master, &shared);
            }
            _ = hb.tick() => {
                if !report.heartbeat(&shared).await {
                    log::warn!("master gone; exiting");
                    return 1;
                }
                if let Some(t) = &tls {
                    t.tick();
                }
            }
            _ = shared.handlers.report.notified() => {
                if !report.handlers(&shared).await {
                    return 1;
                }
            }
            r = listener.as_mut().unwrap().accept() => match r {
                Ok(stream) => {
                    accept_backoff = Duration::from_millis(10);
                    let _ = stream.set_nodelay(true);
                    shared.conn_opened(false);
                    match &tls {
                        None => tokio::task::spawn_local(connection::serve(stream, shared.clone())),
                        Some(t) => tokio::task::spawn_local(connection::serve_tls(stream, t.clone(), shared.clone())),
                    };
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
    // connection answer what it has received, then retire the handlers.
    drop(listener.take());
    shared.begin_drain();
    let handover = shared.handover.get();
    if handover {
        log::info!("restart: handing over {} connection(s) once what they are owed is written", shared.connections.get());
    } else {
        log::info!("draining {} connection(s)", shared.connections.get());
    }
    let deadline = Instant::now() + Duration::from_secs(cfg.server.graceful_timeout_secs);
    // A hand-over cannot take TLS sessions: they go on being served by this
    // worker, and drain as for a stop only this long before the deadline.
    let mut sessions_at = (handover && tls.is_some()).then(|| deadline.checked_sub(SESSIONS_DRAIN).unwrap_or(deadline).max(Instant::now()));
    if sessions_at.is_some() {
        log::info!("TLS sessions cannot be handed over: serving them for up to {:?} more", sessions_at.unwrap().saturating_duration_since(Instant::now()));
    }
    let mut flushing: Option<Instant> = None;
    let mut handed = 0usize;
    loop {
        let notified = shared.all_closed.notified();
        if shared.connections.get() == 0 {
            break;
        }
        if flushing.is_some_and(|t| Instant::now() >= t) {
            log::warn!("{} connection(s) still open after the graceful timeout; leaving them", shared.connections.get());
            break;
        }
        let wake_at = flushing.unwrap_or(deadline);
        let sessions = async {
            match sessions_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sessions => {
                sessions_at = None;
                log::info!("draining the TLS sessions still open: {}", shared.connections.get());
                shared.drain_sessions();
            }
            _ = notified => {}
            _ = tokio::time::sleep_until(wake_at) => {
                if flushing.is_none() {
                    // What handlers still hold will not be answered in time.
                    log::warn!("graceful timeout: answering the calls still outstanding with `timeout`");
                    shared.handlers.fail_outstanding(ErrorCode::Timeout, "rpcd is stopping: the call did not finish within graceful_timeout_secs");
                    flushing = Some(Instant::now() + FLUSH_GRACE);
                }
            }
            _ = hb.tick() => {
                if !report.heartbeat(&shared).await {
                    return 1;
                }
            }
            _ = shared.handlers.report.notified() => {
                if !report.handlers(&shared).await {
                    return 1;
                }
            }
            _ = shared.handed_ready.notified() => handed += hand_to_master(&shared, &report).await,
        }
    }
    handed += hand_to_master(&shared, &report).await;
    if handover {
        log::info!("handed {handed} connection(s) to the master");
    }
    let requests = shared.requests.get();
    if !handlers.is_empty() {
        handlers.retire_all();
        finish_handlers(&handlers, cfg).await;
    }
    let reaped = serde_json::to_string(&handlers.take_reaped()).unwrap_or_else(|_| "[]".into());
    let msg = format!("hb {requests} 0\nreaped {reaped}\nbye\n");
    let _ = report.line(&msg).await;
    log::info!("drained after {requests} request(s); exiting");
    0
}

/// Passes the connections handed over so far to the master, each with the
/// bytes of its next frame (for the next instance, or the next generation).
async fn hand_to_master(shared: &Shared, report: &Report) -> usize {
    let conns = std::mem::take(&mut *shared.handed.borrow_mut());
    let n = conns.len();
    for c in conns {
        let line = crate::handover::conn_line(&c.leftover);
        if let Err(e) = crate::handover::send_with_fd(report.wr.as_ref(), line.as_bytes(), Some(c.fd.as_raw_fd())).await {
            log::error!("cannot hand connections to the master: {e}");
            return 0;
        }
    }
    n
}

/// Serves the connections the master passed (handed over by the previous
/// instance), each with the bytes of a frame its client had partly sent.
fn adopt(from_master: &mut crate::handover::Reader, shared: &Rc<Shared>) {
    while let Some(line) = from_master.line() {
        let Some(leftover) = crate::handover::parse_conn(&line) else { continue };
        let Some(fd) = from_master.fd() else {
            log::warn!("the master passed a connection without its descriptor");
            continue;
        };
        let std = std::net::TcpStream::from(fd);
        let stream = match std.set_nonblocking(true).and_then(|()| tokio::net::TcpStream::from_std(std)) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("cannot serve a handed-over connection: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shared.conn_opened(true);
        tokio::task::spawn_local(connection::serve_adopted(stream, shared.clone(), leftover));
    }
}

/// Waits until every handler process is reaped (the kill ladder bounds it).
async fn finish_handlers(handlers: &Handlers, cfg: &Config) {
    let limit = Instant::now() + cfg.max_kill_grace() * 2 + Duration::from_secs(1);
    loop {
        let exited = handlers.exited.notified();
        if handlers.gone() || Instant::now() >= limit {
            break;
        }
        let _ = tokio::time::timeout_at(limit, exited).await;
    }
    if !handlers.gone() {
        log::error!("handler processes still running after the kill ladder: {:?}", handlers.pids());
    }
}

/// The handlers' maintenance: reaps on SIGCHLD (the worker's only children
/// are its handler processes), and runs deadlines, kill ladders and
/// restarts when due.
async fn maintain(handlers: Rc<Handlers>, mut sigchld: tokio::signal::unix::Signal) {
    loop {
        let due = handlers.next_due();
        let sleep = async {
            match due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = handlers.wake.notified() => {}
            _ = sigchld.recv() => {}
        }
        for r in crate::pool::reap() {
            if !handlers.reaped(&r) {
                log::debug!("reaped untracked child {}: {}", r.pid, r.status);
            }
        }
        handlers.tick(std::time::Instant::now());
    }
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

