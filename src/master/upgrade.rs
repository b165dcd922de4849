//! Upgrade in place, HAProxy's way: `rpcctl upgrade` makes the master
//! `execve` the binary at the path it was started from (after a package
//! upgrade, the new `/usr/sbin/rpcd`) in the same PID, so that systemd sees
//! no stop and no start. What it carries over, in a memfd named by
//! `RPCD_UPGRADE_FD`: the listener, the control socket, each worker's
//! channel (the workers stay its children), the generation counters, the
//! ZooKeeper node and a descriptor of the old binary.
//!
//! 1. Before: the new binary must pass `--check-config`; else the reply
//!    says why and nothing changes.
//! 2. The new image adopts all of it and then reloads: a new generation of
//!    workers (of the new binary) starts, and once it accepts the old
//!    workers retire with the reload's drain, at their own pace. It
//!    registers in ZooKeeper and deletes the old image's node (the exec
//!    closed that session's connection; the session lingers until then).
//! 3. If the new image cannot take over, it execs the old binary again
//!    (kept open across the exec) with the same state, which then reports
//!    the error; if the new generation fails to start, the old workers go
//!    on serving (as for a failed reload) and `status` shows the error.

use super::{Master, Phase, Responder};
use crate::control::Reply;
use crate::notify;
use crate::pool::WState;
use crate::sockets::Origin;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The variable naming the state memfd in the new image.
pub const UPGRADE_ENV: &str = "RPCD_UPGRADE_FD";

#[derive(Serialize, Deserialize)]
pub(super) struct AdoptedWorker {
    pub pid: i32,
    pub generation: u64,
    pub slot: usize,
    pub chan_fd: RawFd,
    pub uptime_ms: u64,
}

/// What one image hands the next.
#[derive(Serialize, Deserialize)]
pub(super) struct State {
    pub listen_fd: RawFd,
    pub origin: String,
    pub control_fd: RawFd,
    pub generation: u64,
    pub next_gen_id: u64,
    pub workers: Vec<AdoptedWorker>,
    pub zk_node: Option<String>,
    pub zk_hosts: String,
    /// The previous image's binary (for falling back).
    pub old_exe_fd: RawFd,
    /// The path both images run from.
    pub exe: PathBuf,
    pub from_version: String,
    pub started_unix: u64,
    pub upgrades: u64,
    /// Set by an image that could not take over, for the one it falls back to.
    pub failed: Option<String>,
}

impl State {
    /// Every descriptor the state names.
    fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        [self.listen_fd, self.control_fd, self.old_exe_fd].into_iter().chain(self.workers.iter().map(|w| w.chan_fd))
    }

    /// Marks them close-on-exec (`true`), or inherited by the next exec.
    fn set_cloexec(&self, on: bool) {
        for fd in self.fds() {
            // SAFETY: fcntl on descriptors this state hands over.
            unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
        }
    }
}

/// What `status` says about upgrades.
#[derive(Default, Clone)]
pub(super) struct UpgradeInfo {
    pub count: u64,
    pub from_version: Option<String>,
    pub error: Option<String>,
    /// The reload that follows an exec is part of the upgrade.
    pub reloading: bool,
}

impl UpgradeInfo {
    pub fn json(&self) -> Value {
        let state = if self.reloading {
            "reloading"
        } else if self.error.is_some() {
            "failed"
        } else if self.count > 0 {
            "done"
        } else {
            "none"
        };
        json!({"count": self.count, "state": state, "from_version": self.from_version, "error": self.error})
    }
}

/// The binary this process was started from, by path (a package upgrade
/// replaces the file there; `/proc/self/exe` then names the old, deleted one).
pub(super) fn own_path() -> PathBuf {
    let p = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let s = p.as_os_str().as_bytes();
    match s.strip_suffix(b" (deleted)") {
        Some(b) => PathBuf::from(std::ffi::OsStr::from_bytes(b)),
        None => p,
    }
}

/// The state the previous image left, if this process is an upgrade's new
/// image. Its descriptors are made close-on-exec again.
pub(super) fn take_state() -> Option<Result<State, String>> {
    let fd: RawFd = std::env::var(UPGRADE_ENV).ok()?.parse().ok()?;
    // SAFETY: only ever set by the previous image, for this memfd.
    std::env::remove_var(UPGRADE_ENV);
    // SAFETY: the previous image left this descriptor open for us.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let text = match crate::handover::read_memfd(owned) {
        Ok(t) => t,
        Err(e) => return Some(Err(format!("cannot read the upgrade state: {e}"))),
    };
    let st: State = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(e) => return Some(Err(format!("bad upgrade state: {e}"))),
    };
    st.set_cloexec(true);
    Some(Ok(st))
}

/// Runs the new binary's `--check-config` (blocking, bounded).
fn preflight(exe: &PathBuf, config: &PathBuf) -> Result<(), String> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--check-config").arg("--config").arg(config).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let out = crate::pool::output_within(&mut cmd, Duration::from_secs(10))
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?
        .ok_or_else(|| format!("{} --check-config did not finish within 10 s", exe.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!("{} --check-config failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr).trim()))
}

/// Whether two paths name the same file (device and inode).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A duplicate of `fd` that survives exec (dup clears FD_CLOEXEC).
fn inheritable(fd: RawFd) -> Result<RawFd, String> {
    nix::unistd::dup(fd).map_err(|e| format!("dup: {e}"))
}

/// Replaces this process's image with `exe`, passing `state`. Returns only
/// if the exec failed.
pub(super) fn exec(exe: &std::path::Path, args: &[OsString], state: &State) -> String {
    let text = match serde_json::to_string(state) {
        Ok(t) => t,
        Err(e) => return e.to_string(),
    };
    let f = match crate::handover::memfd("rpcd-upgrade", &text) {
        Ok(fd) => fd,
        Err(e) => return format!("cannot write the upgrade state: {e}"),
    };
    // The new image reads it: it must survive the exec.
    // SAFETY: fcntl on our own memfd.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) };
    let path = match CString::new(exe.as_os_str().as_bytes()) {
        Ok(p) => p,
        Err(e) => return e.to_string(),
    };
    let argv: Vec<CString> = args.iter().filter_map(|a| CString::new(a.as_bytes()).ok()).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != UPGRADE_ENV)
        .filter_map(|(k, v)| {
            let mut b = k.as_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_bytes());
            CString::new(b).ok()
        })
        .collect();
    env.push(CString::new(format!("{UPGRADE_ENV}={}", f.as_raw_fd())).unwrap_or_default());
    log::logger().flush();
    match nix::unistd::execve(&path, &argv, &env) {
        Err(e) => format!("cannot execute {}: {e}", exe.display()),
        Ok(never) => match never {},
    }
}

impl Master {
    /// `rpcctl upgrade`: checks the new binary, replies, then re-execs
    /// (from the loop, once the reply is written).
    pub(super) fn request_upgrade(&mut self, r: Responder) {
        let refuse = |r: Responder, msg: String| {
            log::error!("upgrade refused: {msg}");
            let _ = r.send(Reply { value: json!({"ok": false, "error": msg}), written: None });
        };
        if self.phase != Phase::Serving || self.reload.is_some() || self.stop.is_some() {
            return refuse(r, format!("rpcd is {}: try again once it serves", self.state_name()));
        }
        if self.pool.workers.values().any(|w| w.state != WState::Serving) {
            return refuse(r, "a worker is starting or retiring: try again in a moment".into());
        }
        if same_file(std::path::Path::new("/proc/self/exe"), &self.exe) {
            log::info!("upgrade: {} is the binary running already; nothing to do", self.exe.display());
            let v = json!({"ok": true, "pid": std::process::id(), "exe": self.exe, "unchanged": true});
            let _ = r.send(Reply { value: v, written: None });
            return;
        }
        if let Err(e) = preflight(&self.exe, &self.config_path) {
            return refuse(r, e);
        }
        log::info!("upgrade: re-executing {} (pid {})", self.exe.display(), std::process::id());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let v = json!({"ok": true, "pid": std::process::id(), "exe": self.exe, "from_version": env!("CARGO_PKG_VERSION"), "upgrades": self.upgrade.count});
        let _ = r.send(Reply { value: v, written: Some(tx) });
        self.exec_pending = Some(rx);
    }

    /// Builds the state and execs; on failure, serves on and says why.
    pub(super) async fn do_upgrade(&mut self, written: tokio::sync::oneshot::Receiver<()>) {
        let _ = tokio::time::timeout(Duration::from_secs(1), written).await;
        let fail = |m: &mut Master, msg: String| {
            log::error!("upgrade failed: {msg}; still serving");
            m.upgrade.error = Some(msg);
            notify::ready(&m.status_line());
        };
        let state = match self.upgrade_state(None) {
            Ok(s) => s,
            Err(e) => return fail(self, e),
        };
        notify::reloading();
        notify::flush();
        let args: Vec<OsString> = vec![self.arg0.clone(), "--config".into(), self.config_path.clone().into_os_string()];
        let err = exec(&self.exe.clone(), &args, &state);
        close_state(&state);
        fail(self, err);
    }

    pub(super) fn upgrade_state(&self, failed: Option<String>) -> Result<State, String> {
        let listener = self.cur.listener.as_ref().ok_or("no listener")?;
        let mut workers = Vec::new();
        for w in self.pool.workers.values() {
            let Some((chan, _)) = self.chans.get(&w.pid) else { continue };
            workers.push(AdoptedWorker {
                pid: w.pid,
                generation: w.generation,
                slot: w.slot,
                chan_fd: inheritable(chan.as_raw_fd())?,
                uptime_ms: w.spawned.elapsed().as_millis() as u64,
            });
        }
        let old_exe = std::fs::File::open("/proc/self/exe").map_err(|e| format!("cannot open /proc/self/exe: {e}"))?;
        let old_exe_fd = inheritable(old_exe.as_raw_fd())?;
        Ok(State {
            listen_fd: inheritable(listener.as_raw_fd())?,
            origin: self.cur.origin.as_str().to_string(),
            control_fd: inheritable(self.ctl_fd)?,
            generation: self.cur.id,
            next_gen_id: self.next_gen_id,
            workers,
            zk_node: self.zk_status.node.clone(),
            zk_hosts: self.cur.cfg.zookeeper.hosts.clone(),
            old_exe_fd,
            exe: self.exe.clone(),
            from_version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix: self.started_unix,
            upgrades: self.upgrade.count,
            failed,
        })
    }

    /// The new image: adopt the old image's workers into the pool and the
    /// generation, then reload onto this binary.
    pub(super) fn adopt_upgrade(&mut self, st: &State) {
        let now = Instant::now();
        for w in &st.workers {
            // SAFETY: the previous image passed this channel for us.
            let chan = unsafe { std::os::unix::net::UnixStream::from_raw_fd(w.chan_fd) };
            let spawned = now.checked_sub(Duration::from_millis(w.uptime_ms)).unwrap_or(now);
            self.pool.adopt(w.pid, w.generation, w.slot, spawned);
            self.watch_channel(w.pid, chan);
            if w.generation == self.cur.id {
                if let Some(s) = self.cur.slots.get_mut(w.slot) {
                    s.respawn_at = None;
                }
            }
        }
        self.next_gen_id = st.next_gen_id.max(self.cur.id + 1);
        self.started_unix = st.started_unix;
        let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.started = now.checked_sub(Duration::from_secs(now_unix.saturating_sub(st.started_unix))).unwrap_or(now);
        self.upgrade = UpgradeInfo { count: st.upgrades, from_version: Some(st.from_version.clone()), error: st.failed.clone(), reloading: false };
        // SAFETY: the previous image's binary, kept open across the exec.
        drop(unsafe { OwnedFd::from_raw_fd(st.old_exe_fd) });
        // READY=1 was sent long ago: serving, and registered again (the
        // exec closed the old session's connection).
        self.phase = Phase::Serving;
        if let Some(zk) = &self.zk {
            zk.publish(self.zk_payload());
        }
        if st.failed.is_none() {
            self.upgrade.count += 1;
            self.upgrade.reloading = true;
            log::info!("upgrade: now {} {} (was {}); adopted worker(s) {:?}; starting a generation of this binary", self.exe.display(), env!("CARGO_PKG_VERSION"), st.from_version, st.workers.iter().map(|w| w.pid).collect::<Vec<_>>());
            if let Err(e) = self.start_reload(Vec::new()) {
                self.upgrade.reloading = false;
                self.upgrade.error = Some(format!("the new binary cannot reload: {e}"));
                notify::ready(&self.status_line());
            }
        } else {
            notify::ready(&self.status_line());
            log::error!("upgrade failed: {}; back on {} {}", st.failed.as_deref().unwrap_or(""), self.exe.display(), env!("CARGO_PKG_VERSION"));
        }
    }
}

/// Closes the inheritable duplicates made for an exec that failed.
fn close_state(st: &State) {
    for fd in st.fds() {
        let _ = nix::unistd::close(fd);
    }
}

/// The listener and origin the previous image passed.
pub(super) fn listener_of(st: &State) -> (std::net::TcpListener, Origin) {
    // SAFETY: the previous image passed this descriptor for us.
    let l = unsafe { std::net::TcpListener::from_raw_fd(st.listen_fd) };
    let origin = match st.origin.as_str() {
        "fd store" => Origin::Store,
        "socket activation" => Origin::Activation,
        _ => Origin::Bound,
    };
    (l, origin)
}

/// Falls back to the previous image's binary after this image could not
/// take over. Returns only if that exec failed too.
pub(super) fn fall_back(st: State, why: &str, config: &std::path::Path) -> String {
    log::error!("upgrade: this binary cannot take over ({why}); going back to the previous one");
    let old = PathBuf::from(format!("/proc/self/fd/{}", st.old_exe_fd));
    // The old binary reopens its own path for the next upgrade.
    let args: Vec<OsString> = vec![st.exe.clone().into_os_string(), "--config".into(), config.as_os_str().to_owned()];
    // It must survive this exec once more.
    st.set_cloexec(false);
    let st = State { failed: Some(why.to_string()), ..st };
    exec(&old, &args, &st)
}
