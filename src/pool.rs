//! Child processes: the one place of the kill-and-reap sequence, for every
//! kind of child rpcd has (the master's workers, a worker's handler
//! processes), and the master's worker pool.
//!
//! 1. retire ([`Child::retire`]): the gentle step (SIGTERM for a worker; for
//!    a handler, EOF on its channel, sent by its owner) and a ladder of
//!    deadlines (a worker: SIGKILL after the grace; a handler: SIGTERM to its
//!    process group after the kill grace, SIGKILL after as long again);
//! 2. enforce ([`Child::enforce`]): sends each signal of the ladder whose
//!    time has come, to the process or to its whole process group;
//! 3. reap ([`reap`]): collects every exit with `waitpid(-1, WNOHANG)` until
//!    none is left (one SIGCHLD may stand for several exits), retrying on
//!    EINTR and taking ECHILD as "already reaped". The master and each
//!    worker call it from their one loop, and each routes the exits to what
//!    it tracks.
//!
//! Crashed children come back with the same [`Backoff`]. Stop and reload
//! differ only in which workers they retire.

use crate::config::Config;
use crate::balance::Board;
use crate::worker::{WorkerSetup, BOARD_FD, CHANNEL_FD, LISTEN_FD, MASTER_PID_ENV};
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

/// A child that lived shorter than this counts as crashing.
pub const MIN_HEALTHY_LIFE: Duration = Duration::from_secs(10);
/// The longest wait before starting a crash-looping child again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The crash-loop backoff of one slot (a worker slot, a handler process
/// slot): 0, 0.1 s, 0.2 s ... 30 s while its child keeps dying within
/// [`MIN_HEALTHY_LIFE`], back to 0 after one healthy life.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    pub restarts: u32,
    failures: u32,
}

impl Backoff {
    /// Records an unexpected exit after `lived`; returns the delay before
    /// the next start.
    pub fn exited(&mut self, lived: Duration) -> Duration {
        self.restarts += 1;
        self.failed(lived < MIN_HEALTHY_LIFE)
    }

    /// Records a start that failed (or a life that counts as one when
    /// `crashed`), without counting a restart; returns the delay.
    pub fn failed(&mut self, crashed: bool) -> Duration {
        if crashed {
            self.failures += 1;
        } else {
            self.failures = 1;
        }
        if self.failures <= 1 {
            Duration::ZERO
        } else {
            (Duration::from_millis(100) * 2u32.saturating_pow((self.failures - 2).min(16))).min(MAX_BACKOFF)
        }
    }
}

/// Where a child's signals go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Process(i32),
    /// The process group the child leads (handlers: `process_group(0)`),
    /// so that whatever it started goes too.
    Group(i32),
}

impl Target {
    pub fn pid(self) -> i32 {
        match self {
            Target::Process(p) | Target::Group(p) => p,
        }
    }

    pub fn send(self, sig: Signal) {
        match self {
            Target::Process(p) => signal(p, sig),
            Target::Group(g) => match nix::sys::signal::killpg(Pid::from_raw(g), sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => log::error!("killpg({g}, {sig}): {e}"),
            },
        }
    }
}

/// The kill-and-reap state of one child, whatever its kind.
#[derive(Debug)]
pub struct Child {
    pub target: Target,
    pub spawned: Instant,
    /// Signals still to send, in time order (retire's escalation).
    ladder: Vec<(Instant, Signal)>,
    /// Retired: on its way out, by our choice.
    pub retiring: bool,
    killed: bool,
}

impl Child {
    pub fn new(target: Target) -> Child {
        Child { target, spawned: Instant::now(), ladder: Vec::new(), retiring: false, killed: false }
    }

    /// Step 1: sends `first` now (if any) and schedules each of `then` at its
    /// delay from now. A child already retiring keeps its earlier ladder
    /// where that is sooner.
    pub fn retire(&mut self, first: Option<Signal>, then: &[(Duration, Signal)]) {
        let now = Instant::now();
        if let Some(sig) = first {
            self.target.send(sig);
            if sig == Signal::SIGKILL {
                self.killed = true;
            }
        }
        for &(after, sig) in then {
            let at = now + after;
            match self.ladder.iter_mut().find(|(_, s)| *s == sig) {
                Some(step) => step.0 = step.0.min(at),
                None => self.ladder.push((at, sig)),
            }
        }
        self.ladder.sort_by_key(|&(at, _)| at);
        self.retiring = true;
    }

    /// Step 2: sends every signal of the ladder that is due. Returns the
    /// signals sent.
    pub fn enforce(&mut self, now: Instant) -> Vec<Signal> {
        let mut sent = Vec::new();
        while let Some(&(at, sig)) = self.ladder.first() {
            if at > now {
                break;
            }
            self.ladder.remove(0);
            if self.killed {
                continue;
            }
            self.target.send(sig);
            if sig == Signal::SIGKILL {
                self.killed = true;
            }
            sent.push(sig);
        }
        sent
    }

    /// When [`Child::enforce`] next has something to do.
    pub fn next_due(&self) -> Option<Instant> {
        if self.killed {
            return None;
        }
        self.ladder.first().map(|&(at, _)| at)
    }

    /// SIGKILL now (to the group for a group leader).
    pub fn kill_now(&mut self) {
        if !self.killed {
            self.target.send(Signal::SIGKILL);
            self.killed = true;
        }
        self.retiring = true;
    }

    pub fn killed(&self) -> bool {
        self.killed
    }
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
    /// Its handler processes, by pool, as it last reported them.
    pub handlers: BTreeMap<String, Vec<i32>>,
    /// What it reported reaping of its own children before it exited.
    pub reaped_handlers: Vec<serde_json::Value>,
    /// Its channel has closed: everything it reported has been read.
    pub channel_closed: bool,
    /// Its entry on the pool's balance board (none for a worker adopted
    /// from a previous image, which has that image's board).
    pub board_entry: Option<usize>,
    /// Its slot in the pool's stats (`crate::metrics::shm`); none for a
    /// worker adopted from a previous image.
    pub stats_entry: Option<usize>,
    /// Why the master killed it, if it did (a `rpcd_worker_restarts_total` reason).
    pub killed_for: Option<&'static str>,
    pub child: Child,
}

impl Worker {
    /// A worker just spawned (or adopted) as `pid`, last heard of now.
    fn new(pid: i32, generation: u64, slot: usize, state: WState, spawned: Instant) -> Worker {
        Worker {
            pid,
            generation,
            slot,
            state,
            spawned,
            last_seen: Instant::now(),
            requests: 0,
            connections: 0,
            handlers: BTreeMap::new(),
            reaped_handlers: Vec::new(),
            board_entry: None,
            stats_entry: None,
            killed_for: None,
            channel_closed: false,
            child: Child::new(Target::Process(pid)),
        }
    }
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

/// Runs a short-lived helper command from the master's loop, blocking for
/// at most `limit` (the caller pipes what it wants to read): its output, or None if it did not finish in time (it is
/// then killed and reaped). It waits for the child itself, so the pool's
/// `waitpid(-1)` (which runs only in the loop) never takes its status.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Option<std::process::Output>> {
    let mut child = cmd.stdin(Stdio::null()).spawn()?;
    let until = Instant::now() + limit;
    loop {
        match child.try_wait()? {
            Some(_) => return child.wait_with_output().map(Some),
            None if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
        }
    }
}

/// Marks every descriptor from 3 up close-on-exec: what this process
/// inherited from whoever started it (a shell's, a test runner's) must not
/// reach its children. Its own descriptors are close-on-exec already;
/// children get theirs explicitly (command-fds).
pub fn cloexec_inherited() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&fd| fd >= 3).collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD on a descriptor number; a closed one just fails.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
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
    /// Shared with the workers: their open connections, for balancing
    /// (`crate::balance`). Made at the first spawn; None if it cannot be.
    board: Option<Board>,
    board_failed: bool,
    /// Shared with the workers: what they count (`crate::metrics`). Made at
    /// the first spawn; None if it cannot be.
    pub stats: Option<crate::metrics::Stats>,
    stats_failed: bool,
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
        strict: bool,
    ) -> std::io::Result<(i32, UnixStream)> {
        let (mut master_end, worker_end) = UnixStream::pair()?;
        let board_entry = self.board_entry();
        let stats_entry = self.stats_entry();
        let setup = WorkerSetup { config: cfg.clone(), slot, generation, strict, board_entry, stats_entry, tls: cfg.secrets.tls.clone() };
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
        let mut fds = vec![
            FdMapping { parent_fd: listen_fd, child_fd: LISTEN_FD },
            FdMapping { parent_fd: worker_end.into(), child_fd: CHANNEL_FD },
        ];
        if let (Some(_), Some(b)) = (board_entry, &self.board) {
            fds.push(FdMapping { parent_fd: b.fd().try_clone()?, child_fd: BOARD_FD });
        }
        if let (Some(_), Some(st)) = (stats_entry, &self.stats) {
            fds.push(FdMapping { parent_fd: st.fd().try_clone()?, child_fd: crate::metrics::shm::STATS_FD });
        }
        cmd.fd_mappings(fds).map_err(std::io::Error::other)?;
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let (Some(i), Some(st)) = (stats_entry, &mut self.stats) {
                    st.release(i);
                }
                return Err(e);
            }
        };
        drop(cmd); // closes our copies of the worker's fds
        let pid = child.id() as i32;
        // The setup is small: it fits in the socket buffer without blocking.
        master_end.write_all(&line)?;
        let mut w = Worker::new(pid, generation, slot, WState::Starting, Instant::now());
        w.board_entry = board_entry;
        w.stats_entry = stats_entry;
        self.workers.insert(pid, w);
        Ok((pid, master_end))
    }

    /// A free entry on the balance board, zeroed (the lowest no tracked
    /// worker holds), making the board first if need be.
    fn board_entry(&mut self) -> Option<usize> {
        // RPCD_BALANCE=off: accept unbalanced (to compare, as the tests' negative control does).
        if self.board.is_none() && !self.board_failed && std::env::var_os("RPCD_BALANCE").is_some_and(|v| v == "off") {
            log::info!("RPCD_BALANCE=off: workers accept unbalanced");
            self.board_failed = true;
        }
        if self.board.is_none() && !self.board_failed {
            match Board::create() {
                Ok(b) => self.board = Some(b),
                Err(e) => {
                    log::warn!("cannot make the balance board ({e}): workers accept unbalanced");
                    self.board_failed = true;
                }
            }
        }
        let board = self.board.as_ref()?;
        let taken: std::collections::BTreeSet<usize> = self.workers.values().filter_map(|w| w.board_entry).collect();
        let free = (0..crate::balance::ENTRIES).find(|i| !taken.contains(i))?;
        board.claim(free);
        Some(free)
    }

    /// A free slot in the stats, zeroed, making the stats first if need be.
    fn stats_entry(&mut self) -> Option<usize> {
        if self.stats.is_none() && !self.stats_failed {
            match crate::metrics::Stats::create() {
                Ok(s) => self.stats = Some(s),
                Err(e) => {
                    log::warn!("cannot make the stats memory ({e}): requests are not counted");
                    self.stats_failed = true;
                }
            }
        }
        self.stats.as_mut()?.claim()
    }

    /// Takes over a worker started by the previous image of this process
    /// (an upgrade in place): it is our child already, and serving.
    pub fn adopt(&mut self, pid: i32, generation: u64, slot: usize, spawned: Instant) {
        self.workers.insert(pid, Worker::new(pid, generation, slot, WState::Serving, spawned));
    }

    /// Step 1: SIGTERM every worker `select`ed, SIGKILL after `grace`.
    /// Returns their PIDs.
    pub fn retire(&mut self, grace: Duration, select: impl FnMut(&Worker) -> bool) -> Vec<i32> {
        self.retire_with(Signal::SIGTERM, grace, select)
    }

    /// Step 1 with another first signal (SIGUSR2: hand over for a restart).
    pub fn retire_with(&mut self, first: Signal, grace: Duration, mut select: impl FnMut(&Worker) -> bool) -> Vec<i32> {
        let mut pids = Vec::new();
        for w in self.workers.values_mut() {
            if w.state == WState::Draining || !select(w) {
                continue;
            }
            w.state = WState::Draining;
            w.child.retire(Some(first), &[(grace, Signal::SIGKILL)]);
            pids.push(w.pid);
        }
        if !pids.is_empty() {
            log::info!("retiring worker(s) {pids:?}: {first}, SIGKILL after {}s", grace.as_secs_f64());
        }
        pids
    }

    /// Step 2: SIGKILL draining workers whose deadline has passed.
    pub fn enforce_deadlines(&mut self, now: Instant) {
        for w in self.workers.values_mut() {
            if w.child.enforce(now).contains(&Signal::SIGKILL) {
                log::warn!("worker {} did not finish in time: SIGKILL", w.pid);
            }
        }
    }

    /// SIGKILL one worker now (heartbeat lost, ready timeout, aborted reload).
    pub fn kill_now(&mut self, pid: i32, why: &str) {
        if let Some(w) = self.workers.get_mut(&pid) {
            if !w.child.killed() {
                log::warn!("worker {pid}: {why}: SIGKILL");
                w.child.kill_now();
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
                if let (Some(b), Some(i)) = (&self.board, w.as_ref().and_then(|w| w.board_entry)) {
                    b.release(i);
                }
                // Its counts are final now: they join the retired workers'.
                if let (Some(st), Some(i)) = (&mut self.stats, w.as_ref().and_then(|w| w.stats_entry)) {
                    st.release(i);
                }
                (r, w)
            })
            .collect()
    }

    pub fn alive(&self, pids: &[i32]) -> bool {
        pids.iter().any(|p| self.workers.contains_key(p))
    }
}
