//! Worker processes: spawning (fork+exec of this binary), signalling and
//! reaping. This is the one place of the kill-and-reap sequence:
//!
//! 1. [`Pool::retire`] sends SIGTERM and gives each worker a deadline;
//! 2. [`Pool::enforce_deadlines`] SIGKILLs whoever is still there after it;
//! 3. [`reap`] collects every exit with `waitpid(-1, WNOHANG)` until none is
//!    left (one SIGCHLD may stand for several exits), retrying on EINTR and
//!    taking ECHILD as "already reaped".
//!
//! The master's loop calls these; stop and reload differ only in which
//! workers they retire.

use crate::config::Config;
use crate::worker::{WorkerSetup, CHANNEL_FD, LISTEN_FD, MASTER_PID_ENV};
use command_fds::{CommandFdExt, FdMapping};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WState {
    Starting,
    Serving,
    Draining,
}

#[derive(Debug)]
pub struct Worker {
    pub pid: i32,
    pub generation: u64,
    pub slot: usize,
    pub state: WState,
    pub spawned: Instant,
    pub last_seen: Instant,
    pub requests: u64,
    pub connections: u64,
    /// Set while draining: SIGKILL after this.
    pub kill_at: Option<Instant>,
    pub killed: bool,
}

/// How a worker ended, as reported by `stop` and `reload`.
#[derive(Debug, Clone, Serialize)]
pub struct Reaped {
    pub pid: i32,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

impl Reaped {
    fn from(ws: WaitStatus) -> Option<Reaped> {
        match ws {
            WaitStatus::Exited(pid, code) => Some(Reaped {
                pid: pid.as_raw(),
                status: format!("exited with status {code}"),
                exit_code: Some(code),
                signal: None,
            }),
            WaitStatus::Signaled(pid, sig, core) => Some(Reaped {
                pid: pid.as_raw(),
                status: format!("killed by {}{}", sig.as_str(), if core { " (core dumped)" } else { "" }),
                exit_code: None,
                signal: Some(sig.as_str().to_string()),
            }),
            _ => None,
        }
    }
    pub fn clean(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Collects every child that has exited. Never blocks.
pub fn reap() -> Vec<Reaped> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => break,
            Ok(ws) => {
                if let Some(r) = Reaped::from(ws) {
                    out.push(r);
                }
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => break, // nothing left: already reaped
            Err(e) => {
                log::error!("waitpid: {e}");
                break;
            }
        }
    }
    out
}

/// Sends a signal; a process that is already gone is not an error.
pub fn signal(pid: i32, sig: Signal) {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log::error!("kill({pid}, {sig}): {e}"),
    }
}

#[derive(Default)]
pub struct Pool {
    pub workers: BTreeMap<i32, Worker>,
}

impl Pool {
    /// Starts one worker sharing `listener`. Returns its PID and the
    /// master's end of its channel.
    pub fn spawn(
        &mut self,
        cfg: &Config,
        listener: &TcpListener,
        generation: u64,
        slot: usize,
    ) -> std::io::Result<(i32, UnixStream)> {
        let (mut master_end, worker_end) = UnixStream::pair()?;
        let setup = WorkerSetup { config: cfg.clone(), slot, generation };
        let mut line = serde_json::to_vec(&setup).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let listen_fd: OwnedFd = listener.try_clone()?.into();
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg0(format!("rpcd: worker {generation}.{slot}"))
            .arg("--worker")
            .env(MASTER_PID_ENV, std::process::id().to_string())
            .stdin(Stdio::null());
        for v in crate::notify::ENV_VARS {
            cmd.env_remove(v);
        }
        cmd.fd_mappings(vec![
            FdMapping { parent_fd: listen_fd, child_fd: LISTEN_FD },
            FdMapping { parent_fd: worker_end.into(), child_fd: CHANNEL_FD },
        ])
        .map_err(std::io::Error::other)?;
        let child = cmd.spawn()?;
        drop(cmd); // closes our copies of the worker's fds
        let pid = child.id() as i32;
        // The setup is small: it fits in the socket buffer without blocking.
        master_end.write_all(&line)?;
        let now = Instant::now();
        self.workers.insert(
            pid,
            Worker {
                pid,
                generation,
                slot,
                state: WState::Starting,
                spawned: now,
                last_seen: now,
                requests: 0,
                connections: 0,
                kill_at: None,
                killed: false,
            },
        );
        Ok((pid, master_end))
    }

    /// Step 1: SIGTERM every worker `select`ed, SIGKILL after `grace`.
    /// Returns their PIDs.
    pub fn retire(&mut self, grace: Duration, mut select: impl FnMut(&Worker) -> bool) -> Vec<i32> {
        let deadline = Instant::now() + grace;
        let mut pids = Vec::new();
        for w in self.workers.values_mut() {
            if w.state == WState::Draining || !select(w) {
                continue;
            }
            w.state = WState::Draining;
            w.kill_at = Some(deadline);
            signal(w.pid, Signal::SIGTERM);
            pids.push(w.pid);
        }
        if !pids.is_empty() {
            log::info!("retiring worker(s) {pids:?}: SIGTERM, SIGKILL after {}s", grace.as_secs_f64());
        }
        pids
    }

    /// Step 2: SIGKILL draining workers whose deadline has passed.
    pub fn enforce_deadlines(&mut self, now: Instant) {
        for w in self.workers.values_mut() {
            if let Some(at) = w.kill_at {
                if now >= at && !w.killed {
                    log::warn!("worker {} did not finish in time: SIGKILL", w.pid);
                    signal(w.pid, Signal::SIGKILL);
                    w.killed = true;
                }
            }
        }
    }

    /// SIGKILL one worker now (heartbeat lost, ready timeout, aborted reload).
    pub fn kill_now(&mut self, pid: i32, why: &str) {
        if let Some(w) = self.workers.get_mut(&pid) {
            if !w.killed {
                log::warn!("worker {pid}: {why}: SIGKILL");
                signal(pid, Signal::SIGKILL);
                w.killed = true;
            }
        }
    }

    /// Step 3: reap and forget. Returns each reaped worker with the record
    /// it had (None for a child that was not a tracked worker).
    pub fn reap(&mut self) -> Vec<(Reaped, Option<Worker>)> {
        reap()
            .into_iter()
            .map(|r| {
                let w = self.workers.remove(&r.pid);
                (r, w)
            })
            .collect()
    }

    pub fn alive(&self, pids: &[i32]) -> bool {
        pids.iter().any(|p| self.workers.contains_key(p))
    }
}
