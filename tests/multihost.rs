//! A multi-host test bed in network namespaces (root only): a ZooKeeper
//! ensemble on three hosts, rpcd on three others listening on 0.0.0.0 and
//! advertising the address it routes to ZooKeeper with, and a discovery
//! client (`rpcctl call`) on its own host, all joined by a bridge in a
//! "switch" namespace. Under client load, five scenarios: a rolling restart,
//! a daemon's host cut off from ZooKeeper, a ZooKeeper minority cut off, the
//! ZooKeeper leader killed, a daemon's host cut off from the clients. Each
//! reports the calls made, the failed ones (asserted 0), the time to
//! converge and the final node count (asserted one per daemon, each at its
//! own host's address). RELIABILITY.md has the diagram and the figures.
//!
//! Nothing is added to the root namespace: addresses (10.213.0.0/24) exist
//! only inside the namespaces made here, and those are removed at the end,
//! also on a panic. Links are cut with blackhole routes at both ends, or a
//! member's link set down. Every process is started through
//! `ip netns exec` (which execs: the child's PID is the program's) and
//! ended by that PID.
mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zookeeper_client as zk;

const NET: &str = "10.213.0";
const ROOT: &str = "/mh";
const PORT: u16 = 8001;
const SESSION_MS: u64 = 4000;
/// Generous: a bound against hanging, not a speed requirement.
const CONVERGE: Duration = Duration::from_secs(60);
/// The load: one ping every INTERVAL, bounded by LOAD_COUNT.
const INTERVAL: &str = "0.015";
const LOAD_COUNT: &str = "20000";
/// Each call's limit, retries included (a cut lasts longer).
const CALL_TIMEOUT: &str = "3";

fn zk_addr(i: usize) -> String {
    format!("{NET}.{}", 11 + i)
}
fn rpc_addr(i: usize) -> String {
    format!("{NET}.{}", 21 + i)
}
fn cli_addr() -> String {
    format!("{NET}.31")
}
fn zk_hosts() -> String {
    (0..3).map(|i| format!("{}:2181", zk_addr(i))).collect::<Vec<_>>().join(",")
}

// ---------- namespaces ----------

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next().map(String::from)).collect()
}

fn netns_pids(ns: &str) -> Vec<i32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The namespaces of one run: a switch (a bridge) and one per host, each
/// joined to the switch by a veth pair. Removed when dropped.
struct Net {
    prefix: String,
    made: Vec<String>,
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn create(hosts: &[(String, String)]) -> Net {
        Net::clean_stale();
        let mut net = Net { prefix: format!("rpcdmh-{}", std::process::id()), made: vec![] };
        let sw = net.ns("sw");
        net.add(&sw);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (host, addr) in hosts {
            let ns = net.ns(host);
            net.add(&ns);
            let port = format!("mh-{host}");
            ip(&["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn add(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.made.push(ns.to_string());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// Namespaces an earlier run left (killed before its clean-up, which
    /// SIGKILL skips): their processes were started by that run.
    fn clean_stale() {
        for ns in netns_list() {
            let Some(pid) = ns.strip_prefix("rpcdmh-").and_then(|r| r.split('-').next()).and_then(|p| p.parse::<i32>().ok()) else { continue };
            if alive(pid) {
                continue; // another run, still going
            }
            for p in netns_pids(&ns) {
                kill(p, libc::SIGKILL);
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            eprintln!("removed {ns}, left by an earlier run");
        }
    }

    /// Drops everything between two hosts, at both ends.
    fn blackhole(&self, a: (&str, &str), b: (&str, &str), on: bool) {
        let verb = if on { "add" } else { "del" };
        ip(&["-n", &self.ns(a.0), "route", verb, "blackhole", &format!("{}/32", b.1)]);
        ip(&["-n", &self.ns(b.0), "route", verb, "blackhole", &format!("{}/32", a.1)]);
    }

    fn link(&self, host: &str, up: bool) {
        ip(&["-n", &self.ns(host), "link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// Removes the namespaces; returns those that still had processes.
    fn remove(&mut self) -> Vec<(String, Vec<i32>)> {
        let mut busy = vec![];
        for ns in self.made.drain(..).rev() {
            let pids = netns_pids(&ns);
            if !pids.is_empty() {
                busy.push((ns.clone(), pids));
            }
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        busy
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, pids) in self.remove() {
            eprintln!("namespace {ns} still had processes {pids:?} at removal");
        }
    }
}

/// Moves the calling thread into a network namespace.
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    // SAFETY: setns on a descriptor we own; it affects this thread only.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .expect("thread in a namespace")
}

// ---------- processes ----------

fn spawn_in(ns: &str, program: &str, args: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {program} in {ns}: {e}"))
}

/// Waits (bounded) for a child to exit.
fn wait_child(c: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + timeout;
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn end_child(c: &mut Child) {
    kill(c.id() as i32, libc::SIGKILL);
    let _ = wait_child(c, Duration::from_secs(10));
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = s.rsplit(')').next().unwrap_or("").split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<u64>() as f64 / hz
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct ZkMember {
    id: usize,
    ns: String,
    addr: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl ZkMember {
    fn new(id: usize, ns: String, base: &Path) -> ZkMember {
        let dir = base.join(format!("zk{id}"));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("myid"), format!("{id}\n")).unwrap();
        let addr = zk_addr(id - 1);
        let servers: String = (0..3).map(|i| format!("server.{}={}:2888:3888\n", i + 1, zk_addr(i))).collect();
        std::fs::write(
            dir.join("zoo.cfg"),
            format!(
                "tickTime=500\ninitLimit=20\nsyncLimit=4\ndataDir={}\nclientPort=2181\nclientPortAddress={addr}\nminSessionTimeout=1000\nmaxSessionTimeout=60000\nadmin.enableServer=false\n4lw.commands.whitelist=*\n{servers}",
                data.display()
            ),
        )
        .unwrap();
        ZkMember { id, ns, addr, dir, child: None }
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let cfg = self.dir.join("zoo.cfg").display().to_string();
        let args = [
            "-Xmx128m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Xss512k",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.cnxTimeout=1000",
            // An isolated member's election retries back off up to this
            // (default 60 s), which would make its rejoining slow to see.
            "-Dzookeeper.fastleader.maxNotificationInterval=2000",
            "-cp",
            ZK_JAR,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            &cfg,
        ];
        self.child = Some(spawn_in(&self.ns, "/usr/bin/java", &args, &self.dir.join("zk.log")));
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            end_child(&mut c);
        }
    }
}

struct Rpcd {
    i: usize,
    ns: String,
    addr: String,
    dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    pid: i32,
}

impl Rpcd {
    fn new(i: usize, ns: String, base: &Path) -> Rpcd {
        let dir = base.join(format!("rpc{}", i + 1));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("control.sock");
        std::fs::write(
            dir.join("rpcd.toml"),
            format!(
                "[server]\nlisten = \"0.0.0.0:{PORT}\"\nworkers = 2\ngraceful_timeout_secs = 5\n\n[zookeeper]\nenabled = true\nhosts = \"{}\"\nroot = \"{ROOT}\"\nsession_timeout_ms = {SESSION_MS}\nderegister_delay_ms = 500\n\n[control]\nsocket = \"{}\"\n\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
                zk_hosts(),
                socket.display()
            ),
        )
        .unwrap();
        Rpcd { i, ns, addr: rpc_addr(i), dir, socket, child: None, pid: 0 }
    }

    fn log(&self) -> PathBuf {
        self.dir.join("rpcd.log")
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none());
        let cfg = self.dir.join("rpcd.toml").display().to_string();
        let c = spawn_in(&self.ns, RPCD, &["--config", &cfg], &self.log());
        self.pid = c.id() as i32;
        self.child = Some(c);
    }

    fn status(&mut self) -> Option<Value> {
        let out = Command::new(RPCCTL).arg("--socket").arg(&self.socket).args(["status", "--json"]).stdin(Stdio::null()).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// (zookeeper.state, zookeeper.node) from `rpcctl status --json`.
    fn zk_state(&mut self) -> (String, Option<String>) {
        match self.status() {
            Some(v) => (v["zookeeper"]["state"].as_str().unwrap_or("?").to_string(), v["zookeeper"]["node"].as_str().map(String::from)),
            None => ("no answer".into(), None),
        }
    }

    fn start(&mut self) {
        self.spawn();
        let log = self.log();
        let pid = self.pid;
        let mut up = false;
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("rpcd {} exited ({st}) at start:\n{}", self.i + 1, tail(&log, 30));
                }
            }
            if self.zk_state().0 == "registered" {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(up, "rpcd {} (pid {pid}) not registered within 30s:\n{}", self.i + 1, tail(&log, 30));
    }

    /// Graceful stop (`rpcctl stop`: deregister, drain, exit).
    fn stop(&mut self) {
        let out = Command::new(RPCCTL).arg("--socket").arg(&self.socket).args(["stop", "--timeout", "30"]).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "rpcctl stop: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let mut c = self.child.take().unwrap();
        let st = wait_child(&mut c, Duration::from_secs(20));
        if st.is_none() {
            end_child(&mut c);
        }
        assert!(st.is_some_and(|s| s.success()), "rpcd {} exit: {st:?}:\n{}", self.i + 1, tail(&self.log(), 30));
    }

    /// SIGTERM (a graceful stop), then SIGKILL to the master and the
    /// workers it had, if it does not exit within 10 s.
    fn kill_all(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let workers = children(c.id() as i32);
        kill(c.id() as i32, libc::SIGTERM);
        if wait_child(&mut c, Duration::from_secs(10)).is_none() {
            end_child(&mut c);
            for p in workers.into_iter().filter(|&p| alive(p)) {
                kill(p, libc::SIGKILL);
            }
        }
    }
}

// ---------- ZooKeeper, seen from the client's host ----------

#[derive(Debug, Clone, PartialEq)]
struct Node {
    path: String,
    host: String,
    port: u64,
    pid: i64,
    owner: i64,
}

/// A ZooKeeper session of the test's own, on a thread inside the client's
/// namespace (a current-thread runtime that keeps the session alive).
struct Observer {
    handle: tokio::runtime::Handle,
    client: zk::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(ns: &str) -> Observer {
        let (htx, hrx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            htx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let handle = hrx.recv().unwrap();
        let client = run_on(&handle, Duration::from_secs(60), async move {
            // Short: its connection moves off a member cut off within ~2 s.
            zk::Client::connector().with_session_timeout(Duration::from_secs(5)).connect(&zk_hosts()).await
        })
        .expect("the observer's session: answered")
        .expect("the observer's session");
        Observer { handle, client, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// The nodes under ROOT, or None if ZooKeeper did not answer within 3 s.
    fn nodes(&self) -> Option<Vec<Node>> {
        let c = self.client.clone();
        run_on(&self.handle, Duration::from_secs(5), async move {
            tokio::time::timeout(Duration::from_secs(3), async {
                let kids = match c.list_children(ROOT).await {
                    Ok(k) => k,
                    Err(zk::Error::NoNode) => vec![],
                    Err(_) => return None,
                };
                let mut out = Vec::new();
                for k in kids {
                    let path = format!("{ROOT}/{k}");
                    match c.get_data(&path).await {
                        Ok((d, stat)) => {
                            let v: Value = serde_json::from_slice(&d).unwrap_or(Value::Null);
                            out.push(Node {
                                path,
                                host: v["host"].as_str().unwrap_or("").to_string(),
                                port: v["port"].as_u64().unwrap_or(0),
                                pid: v["pid"].as_i64().unwrap_or(-1),
                                owner: stat.ephemeral_owner,
                            });
                        }
                        Err(zk::Error::NoNode) => {}
                        Err(_) => return None,
                    }
                }
                out.sort_by(|a, b| a.path.cmp(&b.path));
                Some(out)
            })
            .await
            .ok()
            .flatten()
        })
        .flatten()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_on<T: Send + 'static>(h: &tokio::runtime::Handle, limit: Duration, f: impl std::future::Future<Output = T> + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    h.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv_timeout(limit).ok()
}

/// Samples the node count every 200 ms until stopped: (min, max) seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, usize)>,
}

impl Sampler {
    fn start(obs: &Observer) -> Sampler {
        let (handle, client) = (obs.handle.clone(), obs.client.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let view = Observer { handle, client, stop: None, thread: None };
            let (mut lo, mut hi) = (usize::MAX, 0);
            let end = Instant::now() + Duration::from_secs(300);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                if let Some(n) = view.nodes() {
                    lo = lo.min(n.len());
                    hi = hi.max(n.len());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (lo, hi)
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

// ---------- the client load ----------

/// `rpcctl call ping` in a loop on the client's host; each output line is
/// timestamped as it arrives. Stopped with SIGINT: rpcctl finishes the
/// call in progress and says how many it made.
struct Load {
    started: Instant,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    err: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Tally {
    made: u64,
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    lines: Vec<(Instant, String)>,
}

impl Tally {
    /// The longest time between two consecutive lines: the slowest call
    /// (retries included) plus one interval.
    fn longest(&self) -> f64 {
        self.lines.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).fold(0.0, f64::max)
    }

    /// Servers that answered after `t`, with how many answers.
    fn answered_between(&self, from: Instant, to: Instant) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (at, l) in &self.lines {
            if *at > from && *at < to && !l.starts_with("FAILED") {
                *m.entry(l.split_whitespace().next().unwrap_or("").to_string()).or_insert(0) += 1;
            }
        }
        m
    }
}

impl Load {
    fn start(ns: &str, target: &[&str], extra: &[&str]) -> Load {
        let mut args: Vec<&str> = vec!["netns", "exec", ns, RPCCTL, "call", "ping"];
        args.extend_from_slice(target);
        args.extend_from_slice(&["--count", LOAD_COUNT, "--interval", INTERVAL]);
        args.extend_from_slice(extra);
        let started = Instant::now();
        let mut child = Command::new("ip").args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start rpcctl call");
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let err: Arc<Mutex<String>> = Arc::default();
        let (out, errp) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let l2 = lines.clone();
        let e2 = err.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    l2.lock().unwrap().push((Instant::now(), line));
                }
            }),
            std::thread::spawn(move || {
                for line in BufReader::new(errp).lines().map_while(Result::ok) {
                    let mut e = e2.lock().unwrap();
                    e.push_str(&line);
                    e.push('\n');
                }
            }),
        ];
        Load { started, child: Some(child), lines, err, readers }
    }

    fn answers_from(&self, addr: &str, after: Instant) -> usize {
        let prefix = format!("{addr}:{PORT} ");
        self.lines.lock().unwrap().iter().filter(|(t, l)| *t > after && l.starts_with(&prefix)).count()
    }

    /// Waits until each of `addrs` answered at least once after `after`.
    fn wait_answers(&self, addrs: &[String], after: Instant, what: &str) -> Duration {
        let t0 = Instant::now();
        wait_for(what, Duration::from_secs(30), || addrs.iter().all(|a| self.answers_from(a, after) > 0).then_some(()));
        t0.elapsed()
    }

    /// Stops the load and checks its accounting: every call made printed
    /// one line, an answer or FAILED, and the exit code says whether any failed.
    fn stop(mut self) -> Tally {
        let mut child = self.child.take().unwrap();
        kill(child.id() as i32, libc::SIGINT);
        let st = wait_child(&mut child, Duration::from_secs(20));
        if st.is_none() {
            end_child(&mut child);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let st = st.expect("rpcctl call stops within 20s of SIGINT");
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        let err = self.err.lock().unwrap().clone();
        let failures: Vec<String> = lines.iter().filter(|(_, l)| l.starts_with("FAILED")).map(|(_, l)| l.clone()).collect();
        let ok = lines.iter().filter(|(_, l)| l.ends_with(" pong null")).count() as u64;
        let failed = failures.len() as u64;
        assert_eq!(ok + failed, lines.len() as u64, "every line is an answer or FAILED: {lines:?}");
        let summary = err.lines().find_map(|l| l.strip_prefix("rpcctl: stopped after ")).unwrap_or_else(|| panic!("no summary ({st}): {err}"));
        // "M of N call(s); F failed"
        let words: Vec<&str> = summary.split_whitespace().collect();
        let made: u64 = words[0].parse().unwrap();
        let said_failed: u64 = words[4].parse().unwrap();
        assert_eq!(made, ok + failed, "calls made = answers + failures: {summary}");
        assert_eq!(said_failed, failed, "{summary}");
        assert_eq!(st.code(), Some(if failed > 0 { 1 } else { 0 }), "exit code: {err}");
        Tally { made, ok, failed, failures, lines }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            end_child(&mut c);
        }
    }
}

// ---------- the bed ----------

struct Row {
    scenario: &'static str,
    calls: u64,
    failed: u64,
    converge: f64,
    nodes: usize,
    notes: String,
}

struct Bed {
    zks: Vec<ZkMember>,
    rpcs: Vec<Rpcd>,
    obs: Option<Observer>,
    cli: String,
    net: Net,
    _dir: tempfile::TempDir,
}

impl Bed {
    fn start() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let mut hosts: Vec<(String, String)> = (0..3).map(|i| (format!("zk{}", i + 1), zk_addr(i))).collect();
        hosts.extend((0..3).map(|i| (format!("rpc{}", i + 1), rpc_addr(i))));
        hosts.push(("cli".into(), cli_addr()));
        let net = Net::create(&hosts);
        let zks = (0..3).map(|i| ZkMember::new(i + 1, net.ns(&format!("zk{}", i + 1)), dir.path())).collect();
        let rpcs = (0..3).map(|i| Rpcd::new(i, net.ns(&format!("rpc{}", i + 1)), dir.path())).collect();
        let cli = net.ns("cli");
        let mut bed = Bed { zks, rpcs, obs: None, cli, net, _dir: dir };
        for z in &mut bed.zks {
            z.start();
        }
        bed.wait_ensemble(Duration::from_secs(120));
        bed.obs = Some(Observer::start(&bed.cli));
        for d in &mut bed.rpcs {
            d.start();
        }
        bed.wait_converged(CONVERGE);
        bed
    }

    fn obs(&self) -> &Observer {
        self.obs.as_ref().unwrap()
    }

    /// "leader" / "follower" of a member, asked from the client's host.
    fn mode(&self, i: usize) -> Option<String> {
        let addr = self.zks[i].addr.clone();
        in_ns(&self.cli, move || four_letter_at(&format!("{addr}:2181"), "srvr")).and_then(|o| o.lines().find_map(|l| l.strip_prefix("Mode: ").map(|m| m.trim().to_string())))
    }

    fn modes(&self) -> Vec<Option<String>> {
        (0..3).map(|i| self.mode(i)).collect()
    }

    fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| self.mode(i).as_deref() == Some("leader"))
    }

    /// Every member serving, one leader.
    fn wait_ensemble(&self, limit: Duration) -> Duration {
        let t0 = Instant::now();
        let end = t0 + limit;
        loop {
            let m = self.modes();
            let leaders = m.iter().filter(|x| x.as_deref() == Some("leader")).count();
            let followers = m.iter().filter(|x| x.as_deref() == Some("follower")).count();
            if leaders == 1 && followers == 2 {
                return t0.elapsed();
            }
            if Instant::now() > end {
                panic!("ensemble not whole within {limit:?}: {m:?}\n{}", self.zk_logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn zk_logs(&self) -> String {
        self.zks.iter().map(|z| format!("--- zk{} ---\n{}", z.id, tail(&z.dir.join("zk.log"), 15))).collect::<Vec<_>>().join("\n")
    }

    /// One node per daemon, at its own address and port, naming its PID,
    /// and each daemon reporting that node as its registration.
    fn check(&mut self) -> Result<Vec<Node>, String> {
        let nodes = self.obs().nodes().ok_or("ZooKeeper did not answer")?;
        if nodes.len() != 3 {
            return Err(format!("{} nodes: {nodes:?}", nodes.len()));
        }
        for d in &mut self.rpcs {
            let mine: Vec<&Node> = nodes.iter().filter(|n| n.host == d.addr).collect();
            if mine.len() != 1 || mine[0].port != PORT as u64 || mine[0].pid != d.pid as i64 {
                return Err(format!("rpc{} (pid {}): {mine:?}", d.i + 1, d.pid));
            }
            let (state, node) = d.zk_state();
            if state != "registered" || node.as_deref() != Some(mine[0].path.as_str()) {
                return Err(format!("rpc{} reports {state} {node:?}, ZooKeeper has {}", d.i + 1, mine[0].path));
            }
        }
        Ok(nodes)
    }

    fn wait_converged(&mut self, limit: Duration) -> Vec<Node> {
        let end = Instant::now() + limit;
        loop {
            match self.check() {
                Ok(n) => return n,
                Err(e) if Instant::now() > end => {
                    let logs: String = self.rpcs.iter().map(|d| format!("--- rpc{} ---\n{}\n", d.i + 1, tail(&d.log(), 12))).collect();
                    panic!("not converged within {limit:?}: {e}\n{logs}{}", self.zk_logs());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn load(&self) -> Load {
        let hosts = zk_hosts();
        let l = Load::start(&self.cli, &["--zk", &hosts, "--root", ROOT], &["--strategy", "round-robin", "--timeout", CALL_TIMEOUT, "--attempt-timeout", "1"]);
        let addrs: Vec<String> = self.rpcs.iter().map(|d| d.addr.clone()).collect();
        l.wait_answers(&addrs, l.started, "the load to reach every daemon");
        l
    }

    /// After a scenario: the client reaches every daemon again; then the load stops.
    fn finish(&self, load: Load) -> Tally {
        let addrs: Vec<String> = self.rpcs.iter().map(|d| d.addr.clone()).collect();
        load.wait_answers(&addrs, Instant::now(), "the load to reach every daemon after converging");
        std::thread::sleep(Duration::from_millis(500));
        load.stop()
    }

    fn sessions_on(&self, i: usize) -> usize {
        let addr = self.zks[i].addr.clone();
        let cons = in_ns(&self.cli, move || four_letter_at(&format!("{addr}:2181"), "cons")).unwrap_or_default();
        (0..3).filter(|&d| cons.contains(&format!("/{}:", rpc_addr(d)))).count()
    }

    /// With RPCD_MULTIHOST_LOGS=DIR, the daemons' and ZooKeeper's logs are
    /// copied there.
    fn keep_logs(&self) {
        let Some(dir) = std::env::var_os("RPCD_MULTIHOST_LOGS").map(PathBuf::from) else { return };
        let _ = std::fs::create_dir_all(&dir);
        for d in &self.rpcs {
            let _ = std::fs::copy(d.log(), dir.join(format!("rpc{}.log", d.i + 1)));
        }
        for z in &self.zks {
            let _ = std::fs::copy(z.dir.join("zk.log"), dir.join(format!("zk{}.log", z.id)));
        }
    }

    fn teardown(&mut self) {
        self.keep_logs();
        self.obs = None;
        for d in &mut self.rpcs {
            d.kill_all();
        }
        for z in &mut self.zks {
            z.kill9();
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for d in &self.rpcs {
                eprintln!("--- rpc{} log ---\n{}", d.i + 1, tail(&d.log(), 40));
            }
            eprintln!("{}", self.zk_logs());
        }
        self.teardown();
    }
}

fn row(scenario: &'static str, t: &Tally, converge: Duration, nodes: &[Node], notes: String) -> Row {
    let notes = format!("{notes}; slowest call {:.2} s", t.longest());
    Row { scenario, calls: t.made, failed: t.failed, converge: converge.as_secs_f64(), nodes: nodes.len(), notes }
}

fn assert_no_failures(name: &str, t: &Tally) {
    assert_eq!(t.failed, 0, "{name}: {} of {} calls failed: {:?}", t.failed, t.made, &t.failures[..t.failures.len().min(10)]);
}

// ---------- the scenarios ----------

/// Each daemon in turn: graceful stop (deregister, drain), start again,
/// registered, before the next.
fn rolling_restart(bed: &mut Bed) -> Row {
    let load = bed.load();
    let sampler = Sampler::start(bed.obs());
    let t0 = Instant::now();
    let mut each = vec![];
    for i in 0..3 {
        let t = Instant::now();
        let old = bed.rpcs[i].pid;
        bed.rpcs[i].stop();
        bed.rpcs[i].start();
        assert_ne!(bed.rpcs[i].pid, old);
        bed.wait_converged(CONVERGE);
        each.push(t.elapsed().as_secs_f64());
    }
    let converge = t0.elapsed();
    let nodes = bed.wait_converged(CONVERGE);
    let (lo, _) = sampler.finish();
    let t = bed.finish(load);
    assert_no_failures("rolling restart", &t);
    let each: Vec<String> = each.iter().map(|s| format!("{s:.1}")).collect();
    row("rolling restart of the 3 daemons", &t, converge, &nodes, format!("stop+start+registered per daemon {} s; discovery saw >= {lo} nodes", each.join(" / ")))
}

/// rpc1's host cut off from every ZooKeeper server: its session expires and
/// its node goes (it serves on); healed, it registers again.
fn daemon_cut_from_zookeeper(bed: &mut Bed) -> Row {
    let d = 0;
    let before = bed.wait_converged(CONVERGE);
    let old = before.iter().find(|n| n.host == bed.rpcs[d].addr).unwrap().clone();
    let load = bed.load();
    let rpc = (format!("rpc{}", d + 1), bed.rpcs[d].addr.clone());
    let zks: Vec<(String, String)> = (0..3).map(|i| (format!("zk{}", i + 1), zk_addr(i))).collect();
    let cpu0 = cpu_secs(bed.rpcs[d].pid);
    for z in &zks {
        bed.net.blackhole((&rpc.0, &rpc.1), (&z.0, &z.1), true);
    }
    let cut = Instant::now();
    wait_for("rpc1's node to expire", CONVERGE, || bed.obs().nodes().filter(|n| !n.iter().any(|x| x.path == old.path)).map(|_| ()));
    let expired = cut.elapsed();
    // It knows it lost the registration, and keeps serving (the client's
    // calls go to the two others now; it is asked directly below).
    wait_for("rpc1 to report that it is not registered", Duration::from_secs(20), || (bed.rpcs[d].zk_state().0 != "registered").then_some(()));
    let addr = bed.rpcs[d].addr.clone();
    let direct = in_ns(&bed.cli.clone(), move || {
        let mut s = TcpStream::connect_timeout(&format!("{addr}:{PORT}").parse().unwrap(), Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(&frame(br#"{"in":"ping","params":"direct"}"#)).ok()?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).ok()?;
        serde_json::from_slice::<Value>(&body).ok()
    });
    assert_eq!(direct.as_ref().map(|v| v["result"].clone()), Some(Value::from("direct")), "rpc1 serves while cut off from ZooKeeper");
    std::thread::sleep(Duration::from_secs(1));
    let cpu = cpu_secs(bed.rpcs[d].pid) - cpu0;
    let cut_secs = cut.elapsed().as_secs_f64();
    for z in &zks {
        bed.net.blackhole((&rpc.0, &rpc.1), (&z.0, &z.1), false);
    }
    let healed = Instant::now();
    let nodes = bed.wait_converged(CONVERGE);
    let converge = healed.elapsed();
    let new = nodes.iter().find(|n| n.host == bed.rpcs[d].addr).unwrap();
    assert_ne!(new.path, old.path, "a fresh registration after the expiry");
    assert_ne!(new.owner, old.owner, "in a new session");
    let t = bed.finish(load);
    assert_no_failures("daemon cut from ZooKeeper", &t);
    row(
        "rpc1's host cut off from ZooKeeper, healed",
        &t,
        converge,
        &nodes,
        format!(
            "node expired {:.1} s after the cut; cut {cut_secs:.1} s, rpc1's master used {cpu:.2} s CPU meanwhile; converge = healed until registered again",
            expired.as_secs_f64()
        ),
    )
}

/// A follower (the minority) loses its link: daemons whose sessions it
/// held move them to the others, keeping their nodes; healed, it rejoins.
fn zookeeper_minority_cut(bed: &mut Bed) -> Row {
    let before = bed.wait_converged(CONVERGE);
    let leader = bed.leader().expect("a leader");
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    // The follower that holds most daemon sessions: the one that matters.
    let f = *followers.iter().max_by_key(|&&i| bed.sessions_on(i)).unwrap();
    let held = bed.sessions_on(f);
    let load = bed.load();
    let host = format!("zk{}", f + 1);
    bed.net.link(&host, false);
    let cut = Instant::now();
    // Quorum stays (2 of 3); every session lives on, whatever member held it.
    std::thread::sleep(Duration::from_millis(SESSION_MS * 3 / 2));
    let during = bed.wait_converged(CONVERGE);
    let kept = during.iter().zip(&before).all(|(a, b)| a.path == b.path && a.owner == b.owner);
    let moved = cut.elapsed();
    bed.net.link(&host, true);
    let healed = Instant::now();
    let rejoined = wait_for("the isolated member to serve again", CONVERGE, || matches!(bed.mode(f).as_deref(), Some("follower" | "leader")).then_some(healed.elapsed()));
    bed.wait_ensemble(CONVERGE);
    let nodes = bed.wait_converged(CONVERGE);
    let converge = healed.elapsed();
    let t = bed.finish(load);
    assert_no_failures("ZooKeeper minority cut", &t);
    assert!(kept, "every registration kept its node and session: before {before:?}, during {during:?}");
    row(
        "ZooKeeper follower (minority) isolated, healed",
        &t,
        converge,
        &nodes,
        format!(
            "zk{} held {held} daemon session(s); all 3 nodes kept, same sessions ({:.1} s after the cut); rejoined {:.1} s after healing",
            f + 1,
            moved.as_secs_f64(),
            rejoined.as_secs_f64()
        ),
    )
}

/// kill -9 of the leader: the two others elect a new one and every session
/// survives; the old leader is started again and rejoins.
fn zookeeper_leader_killed(bed: &mut Bed) -> Row {
    let before = bed.wait_converged(CONVERGE);
    let leader = bed.leader().expect("a leader");
    let held = bed.sessions_on(leader);
    let load = bed.load();
    let pid = bed.zks[leader].pid();
    bed.zks[leader].kill9();
    assert!(!alive(pid));
    let killed = Instant::now();
    let new = wait_for("a new leader", CONVERGE, || (0..3).find(|&i| i != leader && bed.mode(i).as_deref() == Some("leader")));
    let elected = killed.elapsed();
    let during = bed.wait_converged(CONVERGE);
    let converge = killed.elapsed();
    let kept = during.iter().zip(&before).all(|(a, b)| a.path == b.path && a.owner == b.owner);
    // Past a session timeout: nothing expires late.
    while killed.elapsed() < Duration::from_millis(SESSION_MS * 3 / 2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.wait_converged(CONVERGE);
    let restarted = Instant::now();
    bed.zks[leader].start();
    let rejoin = bed.wait_ensemble(Duration::from_secs(120));
    let rejoin = rejoin.max(restarted.elapsed());
    let nodes = bed.wait_converged(CONVERGE);
    let after = nodes.iter().zip(&before).all(|(a, b)| a.path == b.path && a.owner == b.owner);
    let t = bed.finish(load);
    assert_no_failures("ZooKeeper leader killed", &t);
    assert!(kept && after, "every registration kept its node and session: before {before:?}, after {nodes:?}");
    row(
        "ZooKeeper leader killed (-9), restarted",
        &t,
        converge,
        &nodes,
        format!(
            "zk{} held {held} daemon session(s); zk{} elected {:.1} s after the kill; all 3 nodes kept, same sessions; old leader restarted, rejoined in {:.1} s",
            leader + 1,
            new + 1,
            elected.as_secs_f64(),
            rejoin.as_secs_f64()
        ),
    )
}

/// rpc3's host cut off from the client's host only (ZooKeeper still sees
/// it): the client's calls go to the two others; healed, to all three.
/// `one_sided`: only rpc3 drops what it sends to the client, so the
/// client's connects hang and its requests run unanswered (a silent
/// partition); else both ends drop (the client's connects fail at once).
/// The negative control runs beside the two-sided cut: a client calling
/// rpc3 directly, without failover, must see failures.
fn daemon_cut_from_clients(bed: &mut Bed, one_sided: bool) -> (Row, Option<Tally>) {
    let d = 2;
    let before = bed.wait_converged(CONVERGE);
    let load = bed.load();
    let addr = bed.rpcs[d].addr.clone();
    let direct = (!one_sided).then(|| Load::start(&bed.cli, &["--addr", &format!("{addr}:{PORT}")], &["--timeout", "1"]));
    if let Some(c) = &direct {
        c.wait_answers(std::slice::from_ref(&addr), c.started, "the direct client to be answered");
    }
    let host = format!("rpc{}", d + 1);
    let cut_for = Duration::from_secs(5);
    let route = |verb: &str| {
        if one_sided {
            ip(&["-n", &bed.net.ns(&host), "route", verb, "blackhole", &format!("{}/32", cli_addr())]);
        } else {
            bed.net.blackhole((&host, &addr), ("cli", &cli_addr()), verb == "add");
        }
    };
    route("add");
    let cut = Instant::now();
    std::thread::sleep(cut_for);
    route("del");
    let healed = Instant::now();
    load.wait_answers(std::slice::from_ref(&addr), healed, "the client to reach rpc3 again");
    let converge = healed.elapsed();
    if let Some(c) = &direct {
        c.wait_answers(std::slice::from_ref(&addr), healed, "the direct client to reach rpc3 again");
    }
    let nodes = bed.wait_converged(CONVERGE);
    assert_eq!(nodes, before, "ZooKeeper saw nothing of it");
    let control = direct.map(Load::stop);
    let t = bed.finish(load);
    assert_no_failures("daemon cut from the clients", &t);
    let during = t.answered_between(cut + Duration::from_millis(1500), healed);
    assert!(!during.contains_key(&format!("{addr}:{PORT}")), "rpc3 answered during the cut: {during:?}");
    let during: u64 = during.values().sum();
    let name = if one_sided {
        "rpc3's host cut off from the client only, at rpc3's end (SYNs and replies dropped), 5 s, healed"
    } else {
        "rpc3's host cut off from the client only, both ends, 5 s, healed"
    };
    let notes = format!("{during} calls answered by the two others during the cut; converge = healed until rpc3 answers the client again");
    (row(name, &t, converge, &nodes, notes), control)
}

#[test]
fn multihost_bed_scenarios_under_load() {
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED multihost_bed_scenarios_under_load: needs root (network namespaces); CI runs as root");
        return;
    }
    assert!(zk_available(), "ZooKeeper is not installed (apt-get install zookeeper)");
    let t0 = Instant::now();
    let root_links = Command::new("ip").args(["-o", "link"]).output().unwrap().stdout;
    let mut bed = Bed::start();
    let setup = t0.elapsed();
    let prefix = bed.net.prefix.clone();
    let mut rows = vec![rolling_restart(&mut bed)];
    rows.push(daemon_cut_from_zookeeper(&mut bed));
    rows.push(zookeeper_minority_cut(&mut bed));
    rows.push(zookeeper_leader_killed(&mut bed));
    let (r, control) = daemon_cut_from_clients(&mut bed, false);
    rows.push(r);
    rows.push(daemon_cut_from_clients(&mut bed, true).0);
    let control = control.unwrap();

    // The negative control: without failover the same cut fails calls, so
    // the load generator does see failures when there are any.
    assert!(control.failed > 0, "a client without failover saw no failure during the cut: {control:?}");
    assert!(control.ok > 0);

    // Tear down, and check that nothing is left: every process ran inside
    // one of the namespaces.
    bed.teardown();
    for ns in bed.net.made.clone() {
        let left = netns_pids(&ns);
        assert!(left.is_empty(), "processes left in {ns}: {left:?}");
    }
    let busy = bed.net.remove();
    assert!(busy.is_empty(), "{busy:?}");
    drop(bed);
    let ours: Vec<String> = netns_list().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(ours.is_empty(), "namespaces left: {ours:?}");
    let links_after = Command::new("ip").args(["-o", "link"]).output().unwrap().stdout;
    let names = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b).lines().filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string())).collect()
    };
    let new: Vec<String> = names(&links_after).into_iter().filter(|n| !names(&root_links).contains(n)).collect();
    assert!(!new.iter().any(|n| n.starts_with("mh-") || n == "br0"), "links added to the root namespace: {new:?}");

    let total = t0.elapsed();
    println!("\n| scenario | calls | failed | time to converge | final nodes | notes |");
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    for r in &rows {
        println!("| {} | {} | {} | {:.1} s | {} | {} |", r.scenario, r.calls, r.failed, r.converge, r.nodes, r.notes);
    }
    println!(
        "| negative control: `--addr` rpc3 (no other server), `--timeout 1`, beside the two-sided cut | {} | {} | - | - | the load generator sees failures |",
        control.made, control.failed
    );
    println!("\nbed up in {:.1} s; whole test {:.1} s", setup.as_secs_f64(), total.as_secs_f64());
}
