//! Starting one handler process, and the tasks around it: the channel's
//! writer and reader, and the loggers of its stdout and stderr.
//!
//! The process is started by fork+exec from the worker's one runtime thread
//! (`PR_SET_PDEATHSIG` follows the thread that forked: a thread that may
//! exit, such as a blocking-pool thread, would take the handler with it). In
//! the child, before exec: `PR_SET_PDEATHSIG(SIGKILL)` and a check that the
//! worker is still its parent; its own process group; SIGINT and SIGHUP back
//! to their defaults (the worker ignores them). The channel, one end of an
//! `AF_UNIX` stream socketpair, is fd 3 (`RPCD_FD`); stdin is /dev/null;
//! stdout and stderr are pipes that the worker logs line by line. Every other
//! descriptor of the worker is close-on-exec.

use crate::config::HandlerConfig;
use command_fds::{CommandFdExt, FdMapping};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// The descriptor of the channel in a handler process (`RPCD_FD`).
pub const HANDLER_FD: i32 = 3;
/// Longest line of handler output logged as one line.
pub const MAX_LINE: usize = 16 * 1024;
/// Output lines per second per stream, after a burst of [`LINE_BURST`].
const LINES_PER_SEC: f64 = 100.0;
const LINE_BURST: f64 = 200.0;

/// A started handler process.
pub struct Spawned {
    pub pid: i32,
    pub chan: UnixStream,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Starts `cfg.exec` as handler `name`. Fails (with exec's error) if the
/// program cannot be run.
pub fn spawn(name: &str, cfg: &HandlerConfig, max_frame: u32) -> io::Result<Spawned> {
    let (ours, theirs) = UnixStream::pair()?;
    let mut cmd = Command::new(&cfg.exec[0]);
    cmd.args(&cfg.exec[1..])
        .current_dir(&cfg.dir)
        .env_clear()
        .envs(&cfg.env)
        .env("RPCD_FD", HANDLER_FD.to_string())
        .env("RPCD_HANDLER", name)
        .env("RPCD_MAX_FRAME_BYTES", max_frame.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd.fd_mappings(vec![FdMapping { parent_fd: theirs.into(), child_fd: HANDLER_FD }]).map_err(io::Error::other)?;
    let worker = nix::unistd::getpid();
    // The program gets the descriptor limit rpcd started with, not the one
    // rpcd raised for itself (its code may rely on select()).
    let nofile = crate::limits::original_soft();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != worker.as_raw() {
                return Err(io::Error::other("the worker is gone"));
            }
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            if let Some(n) = nofile {
                crate::limits::set_soft(n)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(cmd); // closes our copy of the handler's end
    let pid = child.id() as i32;
    let stdout: OwnedFd = child.stdout.take().expect("piped").into();
    let stderr: OwnedFd = child.stderr.take().expect("piped").into();
    // The worker reaps with waitpid(-1) (crate::pool::reap); `child` only
    // holds the PID, and dropping it neither waits nor kills.
    drop(child);
    Ok(Spawned { pid, chan: ours, stdout, stderr })
}

/// The worker's side of one process's channel: what is still to be sent.
#[derive(Default)]
pub struct Io {
    pub wbuf: RefCell<Vec<u8>>,
    pub notify: Notify,
    /// Send EOF once `wbuf` is out (and write nothing more).
    pub close: Cell<bool>,
}

impl Io {
    /// Queues a frame; the writer sends everything queued in one go.
    pub fn send(&self, frame_into: impl FnOnce(&mut Vec<u8>)) {
        let mut w = self.wbuf.borrow_mut();
        let was_empty = w.is_empty();
        frame_into(&mut w);
        if was_empty {
            self.notify.notify_one();
        }
    }

    pub fn shut(&self) {
        self.close.set(true);
        self.notify.notify_one();
    }
}

/// Writes what is queued on `io`, coalescing the frames queued meanwhile;
/// shuts the socket's write side (EOF for the handler) when asked to.
pub async fn writer(io: Rc<Io>, mut wr: tokio::net::unix::OwnedWriteHalf) {
    let mut spare = Vec::new();
    loop {
        let mut buf = std::mem::replace(&mut *io.wbuf.borrow_mut(), std::mem::take(&mut spare));
        if !buf.is_empty() {
            if wr.write_all(&buf).await.is_err() {
                // The reader sees the end and reports it.
                return;
            }
            buf.clear();
            if buf.capacity() <= 1 << 20 {
                spare = buf;
            }
            continue;
        }
        spare = buf;
        if io.close.get() {
            break;
        }
        io.notify.notified().await;
    }
    let _ = wr.shutdown().await;
}

/// A token bucket for output lines.
struct Rate {
    tokens: f64,
    at: Instant,
    dropped: u64,
    reported: Instant,
}

impl Rate {
    fn new() -> Rate {
        let now = Instant::now();
        Rate { tokens: LINE_BURST, at: now, dropped: 0, reported: now }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * LINES_PER_SEC).min(LINE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// The number of lines dropped since the last report, once a second.
    fn report(&mut self, force: bool) -> Option<u64> {
        if self.dropped > 0 && (force || self.reported.elapsed() >= Duration::from_secs(1)) {
            self.reported = Instant::now();
            return Some(std::mem::take(&mut self.dropped));
        }
        None
    }
}

/// Logs a handler's stdout or stderr line by line as `handler NAME[PID]:
/// LINE` (stdout at info, stderr at warn), lines capped at [`MAX_LINE`]
/// bytes, at most 100 lines a second after a burst of 200; reads on
/// whatever comes, so a flood never blocks the handler on a full pipe, and
/// never blocks the worker.
pub async fn log_output(fd: OwnedFd, name: String, pid: i32, stderr: bool) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { return };
    let level = if stderr { log::Level::Warn } else { log::Level::Info };
    let mut buf = vec![0u8; 16 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut cut = 0usize; // bytes dropped from the current over-long line
    let mut rate = Rate::new();
    let emit = |line: &mut Vec<u8>, cut: &mut usize, rate: &mut Rate| {
        if rate.take() {
            let text = String::from_utf8_lossy(line);
            let text = text.trim_end_matches('\r');
            if *cut > 0 {
                log::log!(level, "handler {name}[{pid}]: {text} [line truncated: {} more bytes]", *cut);
            } else {
                log::log!(level, "handler {name}[{pid}]: {text}");
            }
        }
        if let Some(n) = rate.report(false) {
            log::warn!("handler {name}[{pid}]: {n} output line(s) not logged (over {LINES_PER_SEC} lines/s)");
        }
        line.clear();
        *cut = 0;
    };
    loop {
        // Lines dropped are reported within a second, even if no more come.
        let read = if rate.dropped > 0 {
            match tokio::time::timeout(Duration::from_secs(1), rx.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(n) = rate.report(true) {
                        log::warn!("handler {name}[{pid}]: {n} output line(s) not logged (over {LINES_PER_SEC} lines/s)");
                    }
                    continue;
                }
            }
        } else {
            rx.read(&mut buf).await
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    take_capped(&mut line, &mut cut, &rest[..i]);
                    emit(&mut line, &mut cut, &mut rate);
                    rest = &rest[i + 1..];
                }
                None => {
                    take_capped(&mut line, &mut cut, rest);
                    rest = &[];
                }
            }
        }
    }
    if !line.is_empty() || cut > 0 {
        emit(&mut line, &mut cut, &mut rate);
    }
    if let Some(n) = rate.report(true) {
        log::warn!("handler {name}[{pid}]: {n} output line(s) not logged (over {LINES_PER_SEC} lines/s)");
    }
}

fn take_capped(line: &mut Vec<u8>, cut: &mut usize, bytes: &[u8]) {
    let room = MAX_LINE.saturating_sub(line.len());
    let keep = room.min(bytes.len());
    line.extend_from_slice(&bytes[..keep]);
    *cut += bytes.len() - keep;
}

/// Resident set size of a process, from /proc/PID/statm.
pub fn rss_bytes(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_ascii_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_capped() {
        let (mut line, mut cut) = (Vec::new(), 0);
        take_capped(&mut line, &mut cut, &vec![b'x'; MAX_LINE - 10]);
        take_capped(&mut line, &mut cut, &[b'y'; 30]);
        assert_eq!(line.len(), MAX_LINE);
        assert_eq!(cut, 20);
    }

    #[test]
    fn the_rate_limit_drops_and_counts() {
        let mut r = Rate::new();
        let kept = (0..1000).filter(|_| r.take()).count();
        assert!((200..=210).contains(&kept), "{kept}");
        assert_eq!(r.report(true), Some(1000 - kept as u64));
    }
}
