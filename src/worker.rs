//! A worker process: `rpcd --worker`, spawned (fork+exec) by the master.
//!
//! Inherits the listening socket as fd 3 and a socketpair to the master as
//! fd 4. Reads its settings from fd 4 (one JSON line), then serves the wire
//! protocol on a single-threaded tokio runtime, reporting `ready` and then a
//! heartbeat to the master. SIGTERM drains: stop accepting, answer every
//! request already received, close idle connections, exit 0.

use crate::config::Config;
use crate::protocol::{self, Decoded, ErrorCode, Limits};
use bytes::{Buf, BytesMut};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const LISTEN_FD: i32 = 3;
pub const CHANNEL_FD: i32 = 4;
pub const MASTER_PID_ENV: &str = "RPCD_MASTER_PID";

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
    });
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("signal handler: {e}");
            return 1;
        }
    };

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
                    let dr = drain_rx.clone();
                    tokio::task::spawn_local(async move {
                        sh.connections.set(sh.connections.get() + 1);
                        let over = sh.connections.get() > sh.max_connections;
                        if over {
                            refuse(stream, &sh).await;
                        } else {
                            connection(stream, &sh, dr).await;
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
    let _ = drain_tx.send(true);
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

async fn refuse(mut stream: TcpStream, sh: &Shared) {
    let mut out = Vec::new();
    protocol::error_frame(&mut out, ErrorCode::Overloaded, "too many connections; try another server", None);
    let _ = tokio::time::timeout(sh.write_timeout, stream.write_all(&out)).await;
    log::warn!("refused a connection: {} open", sh.connections.get() - 1);
}

/// Appends replies for every complete frame in `buf`. Returns false when
/// the connection must be closed (a frame over the limit).
fn process(buf: &mut BytesMut, out: &mut Vec<u8>, sh: &Shared, served: &mut Option<usize>) -> bool {
    loop {
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
                buf.advance(4 + len);
            }
            Decoded::Need(total) => {
                if buf.capacity() < total {
                    buf.reserve(total - buf.len());
                }
                return true;
            }
            Decoded::TooLarge(n) => {
                let msg = format!("frame of {n} bytes is over the limit of {} bytes", sh.limits.max_frame_bytes);
                protocol::error_frame(out, ErrorCode::TooLarge, &msg, None);
                return false;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, sh: &Shared, mut drain: watch::Receiver<bool>) {
    let mut buf = BytesMut::with_capacity(4096);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    // While draining: how many more frames are served normally (the one a
    // client was in the middle of sending); later ones get `shutting_down`.
    let mut served: Option<usize> = None;
    let mut draining = *drain.borrow();
    if draining {
        served = Some(0);
    }
    loop {
        let keep = process(&mut buf, &mut out, sh, &mut served);
        if !out.is_empty() {
            match tokio::time::timeout(sh.write_timeout, stream.write_all(&out)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            out.clear();
            if out.capacity() > 1 << 20 {
                out.shrink_to(4096);
            }
        }
        if !keep {
            let _ = stream.shutdown().await;
            return;
        }
        if draining {
            if buf.is_empty() || served == Some(0) {
                let _ = stream.shutdown().await;
                return;
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let idle = async {
            match sh.idle_timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = drain.changed(), if !draining => {
                draining = true;
                // Take in what the kernel has already received.
                loop {
                    if buf.capacity() - buf.len() < 4096 {
                        buf.reserve(4096);
                    }
                    match stream.try_read_buf(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
                // Serve every complete frame, and the one partly received.
                let mut complete = 0usize;
                let mut at = 0usize;
                let mut partial = false;
                loop {
                    match protocol::decode(&buf[at..], sh.limits.max_frame_bytes) {
                        Decoded::Frame(len) => { complete += 1; at += 4 + len; }
                        Decoded::Need(_) => { partial = at < buf.len(); break; }
                        Decoded::TooLarge(_) => break,
                    }
                }
                served = Some(complete + usize::from(partial));
            }
            _ = idle => {
                log::debug!("closing idle connection");
                return;
            }
        }
    }
}
