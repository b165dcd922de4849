//! Test harness: real binaries, real sockets, real signals, a real ZooKeeper.
//! Everything started here is ended by PID when its guard drops.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const RPCD: &str = env!("CARGO_BIN_EXE_rpcd");
pub const RPCCTL: &str = env!("CARGO_BIN_EXE_rpcctl");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(')').next().unwrap_or("").trim_start().chars().next().unwrap_or('X');
            state != 'Z' && state != 'X'
        }
        Err(_) => false,
    }
}

/// Process state letter (R, S, Z, ...), or None if gone.
pub fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.trim_start().chars().next()
}

/// Direct children of a process.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out.sort();
    out
}

pub fn kill(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

// ---------- wire protocol ----------

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one response frame; None on EOF.
pub fn read_frame(s: &mut TcpStream) -> Option<Value> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(serde_json::from_slice(&body).expect("response is JSON"))
}

pub fn call(s: &mut TcpStream, req: &Value) -> Value {
    s.write_all(&frame(req.to_string().as_bytes())).unwrap();
    read_frame(s).expect("a reply")
}

/// True once the peer has closed (EOF or reset) within `timeout`.
pub fn closed_by_peer(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---------- the daemon ----------

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
    pub pid: i32,
    pub notify: UnixDatagram,
    pub notes: Vec<String>,
    /// Descriptors sent with FDSTORE=1, by FDNAME, in order.
    pub stored: Vec<(String, std::os::fd::OwnedFd)>,
    fd_store: bool,
    known: Vec<i32>,
}

pub struct Opts {
    pub workers: u32,
    pub extra_server: String,
    pub zookeeper: Option<String>,
    pub extra: String,
    pub wait_ready: bool,
    pub env: Vec<(String, String)>,
    /// Start through `sh` so that WATCHDOG_PID can name the daemon's PID.
    pub watchdog_usec: Option<u64>,
    /// Body of the [log] table (default: stderr at info).
    pub log: Option<String>,
    /// Files written into the daemon's temp dir before it starts (name,
    /// contents); `{dir}` in the config text stands for that dir.
    pub files: Vec<(String, String)>,
    /// The daemon binary (default: rpcd).
    pub binary: Option<PathBuf>,
    /// The port to listen on (default: a free one).
    pub port: Option<u16>,
    /// Descriptors passed as systemd does (LISTEN_FDS from fd 3, with
    /// LISTEN_PID and these LISTEN_FDNAMES); they stay the caller's.
    pub passed: Vec<(i32, String)>,
    /// Keep what rpcd sends with FDSTORE=1 (in `Daemon::stored`), as
    /// systemd's fd store would; by default they are closed at once, as
    /// with FileDescriptorStoreMax=0.
    pub fd_store: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            workers: 2,
            extra_server: String::new(),
            zookeeper: None,
            extra: String::new(),
            wait_ready: true,
            env: vec![],
            watchdog_usec: None,
            log: None,
            files: vec![],
            binary: None,
            port: None,
            passed: vec![],
            fd_store: false,
        }
    }
}

/// The Python interpreter for handler processes (their environment is
/// cleared, so it must be a real path, not a shim that needs PATH).
pub const PYTHON: &str = "/usr/bin/python3";
/// The repo's share/ (rpcd_handler.py), for PYTHONPATH.
pub const SHARE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/share");
/// The repo's tests/ dir.
pub const TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");

/// A binary built from examples/ (`cargo build --release --examples`,
/// which scripts/test-all runs): next to the test binary's deps/ dir.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(|d| d.parent()).unwrap().join("examples").join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --release --examples` first", p.display());
    p
}

/// Process group of a process.
pub fn pgid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.split_whitespace().nth(2)?.parse().ok()
}

/// Parent of a process.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

impl Daemon {
    pub fn config_text(&self, o: &Opts) -> String {
        let zk = match &o.zookeeper {
            Some(z) => z.clone(),
            None => "enabled = false".into(),
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nworkers = {}\n{}{}\n\n[zookeeper]\n{}\n\n[control]\nsocket = \"{}\"\n\n[log]\n{}\n{}\n",
            self.port,
            o.workers,
            if o.extra_server.contains("graceful_timeout_secs") { "" } else { "graceful_timeout_secs = 5\n" },
            o.extra_server,
            zk,
            self.socket.display(),
            o.log.clone().unwrap_or_else(|| "target = \"stderr\"\nlevel = \"info\"".into()),
            o.extra
        )
    }

    pub fn start(o: Opts) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = o.port.unwrap_or_else(free_port);
        let config = dir.path().join("rpcd.toml");
        let socket = dir.path().join("control.sock");
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut d = Daemon { dir, port, config, socket, child: None, pid: 0, notify, notes: vec![], stored: vec![], fd_store: o.fd_store, known: vec![] };
        for (name, text) in &o.files {
            let p = d.dir.path().join(name);
            std::fs::write(&p, text.replace("{dir}", &d.dir.path().display().to_string())).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let text = d.config_text(&o).replace("{dir}", &d.dir.path().display().to_string());
        std::fs::write(&d.config, text).unwrap();
        let log = std::fs::File::create(d.dir.path().join("rpcd.log")).unwrap();
        let mut cmd = match o.watchdog_usec {
            Some(usec) => {
                let mut c = Command::new("/bin/sh");
                c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", RPCD]).env("WATCHDOG_USEC", usec.to_string());
                c
            }
            None if !o.passed.is_empty() => {
                let mut c = Command::new("/bin/sh");
                let bin = o.binary.clone().unwrap_or_else(|| RPCD.into());
                c.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""]).arg(bin);
                let names: Vec<&str> = o.passed.iter().map(|(_, n)| n.as_str()).collect();
                c.env("LISTEN_FDS", o.passed.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
                let fds: Vec<i32> = o.passed.iter().map(|(fd, _)| *fd).collect();
                use std::os::unix::process::CommandExt;
                // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec.
                unsafe {
                    c.pre_exec(move || {
                        // Out of the way first, then into place from fd 3.
                        let mut high = Vec::with_capacity(fds.len());
                        for &fd in &fds {
                            let h = libc::fcntl(fd, libc::F_DUPFD, 100);
                            if h < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            high.push(h);
                        }
                        for (i, &h) in high.iter().enumerate() {
                            if libc::dup2(h, 3 + i as i32) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            libc::close(h);
                        }
                        Ok(())
                    });
                }
                c
            }
            None => Command::new(o.binary.clone().unwrap_or_else(|| RPCD.into())),
        };
        cmd.arg("--config").arg(&d.config).env("NOTIFY_SOCKET", &notify_path).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn rpcd");
        d.pid = child.id() as i32;
        d.child = Some(child);
        if o.wait_ready {
            d.wait_note("READY=1", Duration::from_secs(20));
            d.remember_workers();
        }
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("rpcd.log")).unwrap_or_default()
    }

    /// Reads every pending sd_notify datagram into `notes`.
    /// Descriptors sent with them (FDSTORE=1) go to `stored`.
    pub fn drain_notes(&mut self) {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
        let mut buf = vec![0u8; 4096];
        loop {
            let mut cmsg = nix::cmsg_space!([RawFd; 8]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<UnixAddr>(self.notify.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC) else { break };
            let mut fds = Vec::new();
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(v) = c {
                    // SAFETY: received with SCM_RIGHTS: new descriptors, ours.
                    fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if self.fd_store && text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                let name = text.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("").to_string();
                self.stored.retain(|(n, _)| *n != name);
            }
            // (A BARRIER=1's descriptor is closed with `fds`, as systemd does.)
            if self.fd_store && text.lines().any(|l| l == "FDSTORE=1") {
                let name = text.lines().find_map(|l| l.strip_prefix("FDNAME=")).unwrap_or("stored").to_string();
                for fd in fds {
                    self.stored.push((name.clone(), fd));
                }
            }
            self.notes.push(text);
        }
    }

    /// Waits until a notify datagram containing `needle` as a line arrives.
    pub fn wait_note(&mut self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        let mut seen = self.notes.len();
        loop {
            self.drain_notes();
            while seen < self.notes.len() {
                let n = &self.notes[seen];
                seen += 1;
                if n.lines().any(|l| l == needle) {
                    return n.clone();
                }
            }
            if Instant::now() > end {
                panic!("no {needle} within {timeout:?}; notes {:?}; log:\n{}", self.notes, self.log());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("rpcd exited ({st}) before {needle}; log:\n{}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(RPCCTL).arg("--socket").arg(&self.socket).args(args).output().unwrap()
    }

    pub fn status(&mut self) -> Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {}; log:\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        self.remember(&v);
        v
    }

    fn remember(&mut self, v: &Value) {
        for w in v["workers"].as_array().into_iter().flatten() {
            let pid = w["pid"].as_i64().unwrap() as i32;
            if !self.known.contains(&pid) {
                self.known.push(pid);
            }
        }
    }

    pub fn remember_workers(&mut self) {
        for p in children(self.pid) {
            if !self.known.contains(&p) {
                self.known.push(p);
            }
        }
    }

    /// PIDs of serving workers, per the status report.
    pub fn worker_pids(&mut self) -> Vec<i32> {
        let v = self.status();
        let mut p: Vec<i32> = v["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect();
        p.sort();
        p
    }

    pub fn wait_serving(&mut self, n: usize) -> Vec<i32> {
        wait_for("workers serving", Duration::from_secs(20), || {
            let v = self.status();
            let ws = v["workers"].as_array().unwrap();
            let serving: Vec<i32> = ws.iter().filter(|w| w["state"] == "serving").map(|w| w["pid"].as_i64().unwrap() as i32).collect();
            (serving.len() == n && ws.len() == n).then_some(serving)
        })
    }

    /// Waits for the master to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            if Instant::now() > end {
                panic!("rpcd did not exit within {timeout:?}; log:\n{}", self.log());
            }
            // Answer the service manager's part (stored descriptors, BARRIER=1).
            self.drain_notes();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Handler PIDs of every worker, from `status --json`: (worker, pool, pid).
    pub fn handler_pids(&mut self) -> Vec<(i32, String, i32)> {
        let v = self.status();
        let mut out = Vec::new();
        for w in v["workers"].as_array().unwrap() {
            let wp = w["pid"].as_i64().unwrap() as i32;
            for (pool, pids) in w["handlers"].as_object().into_iter().flatten() {
                for p in pids.as_array().unwrap() {
                    let pid = p.as_i64().unwrap() as i32;
                    out.push((wp, pool.clone(), pid));
                    if !self.known.contains(&pid) {
                        self.known.push(pid);
                    }
                }
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.remember_workers();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for &p in &self.known {
            if alive(p) {
                kill(p, libc::SIGKILL);
            }
        }
    }
}

// ---------- ZooKeeper ----------

pub struct ZkServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
    cfg: PathBuf,
}

pub const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";

pub fn zk_available() -> bool {
    Path::new(ZK_JAR).exists() && Path::new("/usr/bin/java").exists()
}

/// A ZooKeeper four-letter command (`ruok`, `cons`, ...) and its answer.
pub fn four_letter(port: u16, cmd: &str) -> Option<String> {
    four_letter_at(&format!("127.0.0.1:{port}"), cmd)
}

/// The same, to a server at `addr` (`host:port`).
pub fn four_letter_at(addr: &str, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(cmd.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl ZkServer {
    /// A standalone server on a free port in a temp dir.
    pub fn start() -> ZkServer {
        assert!(zk_available(), "ZooKeeper is not installed (apt-get install zookeeper)");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("zoo.cfg");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            &cfg,
            format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nminSessionTimeout=1000\nmaxSessionTimeout=60000\nadmin.enableServer=false\n4lw.commands.whitelist=*\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut z = ZkServer { dir, port, child: None, cfg };
        z.boot();
        z
    }

    fn boot(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("zk.log")).unwrap();
        let child = Command::new("/usr/bin/java")
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Dzookeeper.admin.enableServer=false", "-cp", ZK_JAR])
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&self.cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start ZooKeeper");
        self.child = Some(child);
        let port = self.port;
        wait_for("ZooKeeper ruok", Duration::from_secs(60), || (four_letter(port, "ruok").as_deref() == Some("imok")).then_some(()));
    }

    pub fn hosts(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.boot();
    }

    /// Children of a path and their data, through the zkCli-free way: a
    /// short-lived tokio runtime with the same client crate as rpcctl.
    pub fn children(&self, path: &str) -> Vec<(String, Value)> {
        zk_children(&self.hosts(), path)
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn zk_children(hosts: &str, path: &str) -> Vec<(String, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = zookeeper_client::Client::connector()
            .with_session_timeout(Duration::from_secs(5))
            .connect(hosts)
            .await
            .expect("connect to test ZooKeeper");
        let mut out = Vec::new();
        let kids = match c.list_children(path).await {
            Ok(k) => k,
            Err(zookeeper_client::Error::NoNode) => vec![],
            Err(e) => panic!("list {path}: {e}"),
        };
        for k in kids {
            let p = format!("{path}/{k}");
            if let Ok((d, _)) = c.get_data(&p).await {
                out.push((p, serde_json::from_slice(&d).unwrap_or(Value::Null)));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    })
}

// ---------- a TCP proxy that can cut connections (partitions) ----------

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (c2, s2, k2) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((a, _)) => {
                        if c2.load(Ordering::SeqCst) {
                            drop(a);
                            continue;
                        }
                        let Ok(b) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        a.set_nonblocking(false).unwrap();
                        k2.lock().unwrap().push(a.try_clone().unwrap());
                        k2.lock().unwrap().push(b.try_clone().unwrap());
                        for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                            let cut = c2.clone();
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 16384];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if cut.load(Ordering::SeqCst) {
                                                continue; // black hole
                                            }
                                            if to.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy { port, cut, stop, conns }
    }

    /// Silently drops all traffic (a partition), new connections included.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Heals the partition; existing connections are reset.
    pub fn heal(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

// ---------- load ----------

/// Clients opening a fresh connection for each ping, every 2 ms, while
/// `restart` runs: (ok, refused, other failures, worst latency).
pub fn connects_during(port: u16, restart: impl FnOnce()) -> (u64, u64, Vec<String>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(std::sync::Mutex::new((0u64, 0u64, Vec::<String>::new(), Duration::ZERO)));
    let mut threads = Vec::new();
    for t in 0..2 {
        let (stop, tally) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                i += 1;
                let t0 = Instant::now();
                let r = (|| -> Result<(), (bool, String)> {
                    let mut c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| (e.kind() == std::io::ErrorKind::ConnectionRefused, format!("connect: {e}")))?;
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let p = serde_json::json!([t, i]);
                    c.write_all(&frame(serde_json::json!({"in": "ping", "params": p}).to_string().as_bytes())).map_err(|e| (false, format!("write: {e}")))?;
                    match read_frame(&mut c) {
                        Some(v) if v["result"] == p => Ok(()),
                        Some(v) => Err((false, format!("reply {v}"))),
                        None => Err((false, "closed before the reply".into())),
                    }
                })();
                let took = t0.elapsed();
                let mut g = tally.lock().unwrap();
                g.3 = g.3.max(took);
                match r {
                    Ok(()) => g.0 += 1,
                    Err((true, _)) => g.1 += 1,
                    Err((false, e)) => g.2.push(e),
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(200));
    restart();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let g = tally.lock().unwrap();
    (g.0, g.1, g.2.clone(), g.3)
}

/// Persistent clients: each keeps one connection and sends numbered pings
/// one after another until told to stop, never reconnecting. Per client:
/// (pings answered, worst latency, the first failure).
pub struct Persistent {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<(u64, Duration, Option<String>)>>,
    answered: Arc<Vec<std::sync::atomic::AtomicU64>>,
}

impl Persistent {
    pub fn start(port: u16, n: usize) -> Persistent {
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new((0..n).map(|_| Default::default()).collect());
        let threads = (0..n)
            .map(|t| {
                let (stop, answered) = (stop.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut c = connect(port);
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let local = c.local_addr().unwrap();
                    let end = Instant::now() + Duration::from_secs(60);
                    let (mut ok, mut worst) = (0u64, Duration::ZERO);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                        let p = serde_json::json!([t, ok]);
                        let t0 = Instant::now();
                        if let Err(e) = c.write_all(&frame(serde_json::json!({"in": "ping", "params": p}).to_string().as_bytes())) {
                            return (ok, worst, Some(format!("ping {ok} from {local}: write: {e}")));
                        }
                        match read_frame(&mut c) {
                            Some(v) if v["result"] == p => {}
                            Some(v) => return (ok, worst, Some(format!("ping {ok} from {local}: reply {v}"))),
                            None => return (ok, worst, Some(format!("ping {ok} from {local}: closed before the reply"))),
                        }
                        worst = worst.max(t0.elapsed());
                        ok += 1;
                        answered[t].store(ok, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    (ok, worst, None)
                })
            })
            .collect();
        Persistent { stop, threads, answered }
    }

    pub fn counts(&self) -> Vec<u64> {
        self.answered.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    }

    /// Waits until every client has had `more` pings answered beyond `from`.
    pub fn wait_progress(&self, from: &[u64], more: u64) {
        wait_for("every persistent client to make progress", Duration::from_secs(20), || {
            self.counts().iter().zip(from).all(|(now, before)| *now >= before + more).then_some(())
        });
    }

    pub fn finish(self) -> Vec<(u64, Duration, Option<String>)> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().map(|t| t.join().unwrap()).collect()
    }
}
