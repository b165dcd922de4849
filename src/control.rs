//! The control socket: newline-delimited JSON over a unix stream socket.
//!
//! Request: `{"cmd": "status" | "stop" | "reload"}`. Reply: one JSON line,
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Every connection
//! is served by its own task, so a silent or slow client never delays the
//! master's loop; the loop only sees complete, authorised requests.

use crate::config::{parse_mode, resolve_group, ControlConfig};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

pub const MAX_REQUEST: usize = 64 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once; more are refused, not queued.
pub const MAX_CLIENTS: usize = 64;
/// How long a refused peer may keep writing before its connection closes.
const REFUSED_LINGER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Status,
    /// `restart`: the service manager starts rpcd again at once; hand the
    /// connections and the registration over (see [`crate::handover`]).
    Stop { restart: bool },
    Reload,
    /// Re-exec the binary at the daemon's path in the same PID.
    Upgrade,
}

/// Unknown fields are ignored, so that newer clients can add options.
#[derive(Deserialize)]
struct RequestLine {
    cmd: String,
    #[serde(default)]
    restart: bool,
}

/// A reply, and a way to learn that it was written to the client.
pub struct Reply {
    pub value: Value,
    pub written: Option<oneshot::Sender<()>>,
}

/// A request handed to the master's loop.
pub struct Request {
    pub cmd: Command,
    pub reply: oneshot::Sender<Reply>,
}

/// Who may talk to the daemon (root and our own uid always may).
#[derive(Debug, Clone, Default)]
pub struct Acl {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Acl {
    pub fn from_config(c: &ControlConfig) -> Acl {
        Acl { uids: c.allow_uids.clone(), gids: c.allow_gids.clone() }
    }
    fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || groups.iter().any(|g| self.gids.contains(g))
    }
}

/// Supplementary groups of the peer (SO_PEERGROUPS, Linux 4.13+).
fn peer_groups(fd: i32) -> Vec<u32> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / 4);
    groups
}

/// Creates the control socket. A stale file left by a crash is replaced; a
/// live daemon answering on it is an "already running" error.
pub fn bind(cfg: &ControlConfig) -> Result<UnixListener, String> {
    let path = &cfg.socket;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket; refusing to replace it", path.display()));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!("another rpcd is already running (it answers on {})", path.display()));
            }
            Err(_) => {
                log::info!("removing stale control socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
            }
        }
    }
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let l = UnixListener::bind(path).map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    apply_mode(cfg)?;
    Ok(l)
}

/// Takes over a control socket passed by the service manager (see
/// `sockets`), with the mode and group of the config.
pub fn adopt(l: std::os::unix::net::UnixListener, cfg: &ControlConfig) -> Result<UnixListener, String> {
    let err = |e: std::io::Error| format!("cannot use the passed control socket {}: {e}", cfg.socket.display());
    l.set_nonblocking(true).map_err(err)?;
    let l = UnixListener::from_std(l).map_err(err)?;
    apply_mode(cfg)?;
    Ok(l)
}

/// Sets the socket's mode and group from the config.
pub fn apply_mode(cfg: &ControlConfig) -> Result<(), String> {
    let path = &cfg.socket;
    let mode = parse_mode(&cfg.mode)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    if let Some(g) = &cfg.group {
        let gid = resolve_group(g)?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| format!("cannot chgrp {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Accepts control connections until the listener is dropped.
pub async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<Request>, acl: watch::Receiver<Acl>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    log::warn!("control: more than {MAX_CLIENTS} clients at once; refusing one");
                    let mut stream = stream;
                    tokio::spawn(async move {
                        let _ = send_line(&mut stream, &json!({"ok": false, "error": "too many control clients; try again"})).await;
                    });
                    continue;
                };
                let tx = tx.clone();
                let acl = acl.clone();
                tokio::spawn(async move {
                    connection(stream, tx, acl).await;
                    drop(permit);
                });
            }
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send_line(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).await
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Command, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let req: RequestLine = serde_json::from_str(text.trim()).map_err(|e| format!("malformed request: {e}"))?;
    match req.cmd.as_str() {
        "status" => Ok(Command::Status),
        "stop" => Ok(Command::Stop { restart: req.restart }),
        "reload" => Ok(Command::Reload),
        "upgrade" => Ok(Command::Upgrade),
        other => {
            let shown: String = other.chars().take(40).collect();
            Err(format!("unknown command \"{shown}\" (expected status, stop, reload or upgrade)"))
        }
    }
}

async fn connection(mut stream: UnixStream, tx: mpsc::UnboundedSender<Request>, acl: watch::Receiver<Acl>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("control: cannot read peer credentials: {e}");
            return;
        }
    };
    let groups = peer_groups(stream.as_raw_fd());
    let allowed = acl.borrow().allows(cred.uid(), cred.gid(), &groups);
    if !allowed {
        log::warn!(
            "control: refused uid {} gid {} pid {}: not allowed (see control.allow_uids/allow_gids)",
            cred.uid(),
            cred.gid(),
            cred.pid().unwrap_or(0)
        );
        let _ = send_line(&mut stream, &json!({"ok": false, "error": "permission denied"})).await;
        // Let the peer finish writing its request before we close, so that
        // it reads the refusal instead of failing its write with EPIPE.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = MAX_REQUEST;
        let _ = tokio::time::timeout(REFUSED_LINGER, async {
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
        return;
    }
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    loop {
        let mut line = Vec::new();
        let read = tokio::time::timeout(READ_TIMEOUT, (&mut rd).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line)).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return,
            Err(_) => return, // silent client: just close
        };
        if n == 0 {
            return;
        }
        if line.len() > MAX_REQUEST {
            let v = json!({"ok": false, "error": format!("request over {MAX_REQUEST} bytes")});
            let mut out = serde_json::to_vec(&v).unwrap_or_default();
            out.push(b'\n');
            let _ = wr.write_all(&out).await;
            return;
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let cmd = match parse_request(&line) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control: {e}");
                let mut out = serde_json::to_vec(&json!({"ok": false, "error": e})).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let (rtx, rrx) = oneshot::channel();
        if tx.send(Request { cmd, reply: rtx }).is_err() {
            return;
        }
        let Ok(reply) = rrx.await else { return };
        let mut out = serde_json::to_vec(&reply.value).unwrap_or_default();
        out.push(b'\n');
        let _ = wr.write_all(&out).await;
        let _ = wr.flush().await;
        if let Some(w) = reply.written {
            let _ = w.send(());
            // Keep the connection open: it closes when the daemon exits,
            // which is how `rpcctl stop` learns that it has.
            std::future::pending::<()>().await;
        }
    }
}

// ---- client side (rpcctl) ----

#[derive(Debug)]
pub enum ClientError {
    /// No daemon answers on the socket (exit code 3).
    NotRunning(String),
    Other(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(s) | ClientError::Other(s) => f.write_str(s),
        }
    }
}

/// A connection to the control socket that can wait for the daemon's exit.
pub struct Client {
    stream: std::os::unix::net::UnixStream,
    path: PathBuf,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(stream) => Ok(Client { stream, path: path.to_path_buf() }),
            Err(e) => match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    Err(ClientError::NotRunning(format!("rpcd is not running (no answer on {}: {e})", path.display())))
                }
                _ => Err(ClientError::Other(format!("cannot connect to {}: {e}", path.display()))),
            },
        }
    }

    /// Sends a command and waits (up to `timeout`) for its reply.
    pub fn call(&mut self, cmd: &str, timeout: Duration) -> Result<Value, ClientError> {
        self.request(json!({"cmd": cmd}), timeout)
    }

    /// Sends a request (`{"cmd": ..., options}`) and waits for its reply.
    pub fn request(&mut self, req: Value, timeout: Duration) -> Result<Value, ClientError> {
        let err = |e: std::io::Error| ClientError::Other(format!("{}: {e}", self.path.display()));
        self.stream.set_read_timeout(Some(timeout)).map_err(err)?;
        let line = format!("{req}\n");
        if let Err(e) = self.stream.write_all(line.as_bytes()) {
            // The daemon may have answered (a refusal) and closed before
            // our request arrived: its reply is still there to read.
            if e.kind() != std::io::ErrorKind::BrokenPipe && e.kind() != std::io::ErrorKind::ConnectionReset {
                return Err(err(e));
            }
        }
        let mut reply = String::new();
        BufReader::new(&self.stream).read_line(&mut reply).map_err(|e| {
            ClientError::Other(format!("no reply from {} within {:?}: {e}", self.path.display(), timeout))
        })?;
        if reply.is_empty() {
            return Err(ClientError::Other("the daemon closed the connection without a reply".into()));
        }
        serde_json::from_str(&reply).map_err(|e| ClientError::Other(format!("bad reply from the daemon: {e}")))
    }

    /// Waits until the daemon closes the connection (it exits).
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.stream.set_read_timeout(Some(timeout));
        let mut buf = [0u8; 256];
        loop {
            match std::io::Read::read(&mut self.stream, &mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}
