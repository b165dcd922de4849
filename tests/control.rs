//! The control socket and `rpcctl status|stop|reload` (README "Control
//! protocol", SPEC §5 and §6): who may talk, the wire format, status, stop,
//! reload (SIGHUP too) under load, and the socket's life cycle.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------- helpers local to this file ----------

/// What a finished command left behind.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs a command to completion, killing it (by PID) after `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Out {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out { code: status.code(), stdout: t1.join().unwrap(), stderr: t2.join().unwrap() }
}

fn rpcctl(socket: &Path, args: &[&str]) -> Out {
    let mut c = Command::new(RPCCTL);
    c.arg("--socket").arg(socket).args(args);
    run(c, Duration::from_secs(60))
}

/// rpcctl as uid/gid 65534 with no supplementary groups.
fn rpcctl_as_nobody(socket: &Path, args: &[&str]) -> Out {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]).arg(RPCCTL).arg("--socket").arg(socket).args(args);
    run(c, Duration::from_secs(60))
}

/// A raw control connection.
struct Raw {
    s: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Raw { s, r }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }
    /// One reply line as JSON; None on EOF.
    fn reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "a reply is one whole line: {line:?}");
                Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}")))
            }
            Err(e) => panic!("no reply: {e}"),
        }
    }
    fn ask(&mut self, line: &[u8]) -> Value {
        self.send(line);
        self.reply().expect("a reply")
    }
    /// True once the daemon closed the connection (EOF or reset).
    fn closed(&mut self, timeout: Duration) -> bool {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 4096];
        loop {
            match self.r.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn assert_error(v: &Value, needle: &str) {
    assert_eq!(v["ok"], false, "{v}");
    let e = v["error"].as_str().unwrap_or_else(|| panic!("error text in {v}"));
    assert!(e.to_lowercase().contains(needle), "error {e:?} should mention {needle:?}");
}

fn pids_of(v: &Value) -> Vec<i32> {
    let mut p: Vec<i32> = v.as_array().unwrap_or_else(|| panic!("array: {v}")).iter().map(|p| p.as_i64().unwrap() as i32).collect();
    p.sort();
    p
}

fn status_pids(v: &Value) -> Vec<i32> {
    let mut p: Vec<i32> = v["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect();
    p.sort();
    p
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The harness config with lines added to its [control] table.
fn config_with_control(d: &Daemon, o: &Opts, control: &str) -> String {
    let t = d.config_text(o);
    assert!(t.contains("[control]\n"));
    t.replace("[control]\n", &format!("[control]\n{control}\n"))
}

fn opts(workers: u32) -> Opts {
    Opts { workers, ..Default::default() }
}

/// Starts a new rpcd on the daemon's (rewritten) config, as the harness
/// does: same notify socket, log appended. Waits for READY=1.
fn restart_on_same_config(d: &mut Daemon) {
    assert!(d.child.is_none(), "the old master has exited");
    let log = std::fs::OpenOptions::new().append(true).open(d.dir.path().join("rpcd.log")).unwrap();
    let child = Command::new(RPCD)
        .arg("--config")
        .arg(&d.config)
        .env("NOTIFY_SOCKET", d.dir.path().join("notify.sock"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn rpcd");
    d.pid = child.id() as i32;
    d.child = Some(child);
    d.wait_note("READY=1", Duration::from_secs(20));
    d.remember_workers();
}

fn ping(port: u16, v: &Value) -> Value {
    let mut s = connect(port);
    call(&mut s, &json!({"in": "ping", "params": v}))
}

/// Children of `pid` that are zombies.
fn zombie_children(pid: i32) -> Vec<i32> {
    children(pid).into_iter().filter(|&c| proc_state(c) == Some('Z')).collect()
}

/// Waits for a notify datagram with the line `needle` at index >= `from`
/// of `d.notes` (those already drained count). Returns its index.
fn wait_note_from(d: &mut Daemon, from: usize, needle: &str, timeout: Duration) -> usize {
    let end = Instant::now() + timeout;
    loop {
        d.drain_notes();
        if let Some(i) = d.notes.iter().skip(from).position(|n| n.lines().any(|l| l == needle)) {
            return from + i;
        }
        if Instant::now() > end {
            panic!("no {needle} within {timeout:?}; notes {:?}; log:\n{}", d.notes, d.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count_notes(d: &Daemon, needle: &str) -> usize {
    d.notes.iter().filter(|n| n.lines().any(|l| l == needle)).count()
}

/// Inode of the socket listening on 127.0.0.1:port (from /proc/net/tcp).
fn listen_inode(port: u16) -> Option<u64> {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").ok()?.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == want && f[3] == "0A").then(|| f[9].parse().ok()).flatten()
    })
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Makes the daemon's temp dir traversable by other users (it is 0700).
fn open_dir_to_others(d: &Daemon) {
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------- who may talk ----------

#[test]
fn unprivileged_peer_is_refused_by_peercred_until_allowed() {
    let mut d = Daemon::start(opts(2));
    let pids = d.wait_serving(2);
    // Let uid 65534 reach the socket at the file-system level, so that the
    // only thing refusing it is the daemon's SO_PEERCRED check.
    open_dir_to_others(&d);
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let out = rpcctl_as_nobody(&d.socket, &["status", "--json"]);
    assert_eq!(out.code, Some(1), "refused status: {out:?}");
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    assert!(out.stdout.is_empty(), "nothing about the daemon leaks: {out:?}");
    let out = rpcctl_as_nobody(&d.socket, &["stop"]);
    assert_eq!(out.code, Some(1), "refused stop: {out:?}");
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    let out = rpcctl_as_nobody(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(1), "refused reload: {out:?}");

    // The daemon logged each refusal, kept running and changed nothing.
    let refusals = d.log().lines().filter(|l| l.contains("refused uid 65534")).count();
    assert!(refusals >= 3, "refusals logged:\n{}", d.log());
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none(), "a refused stop must not stop rpcd");
    let v = d.status();
    assert_eq!(status_pids(&v), pids);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["state"], "serving");

    // allow_uids = [65534] (and a mode that lets it connect) by reload.
    d.rewrite_config(&config_with_control(&d, &opts(2), "mode = \"0666\"\nallow_uids = [65534]"));
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(mode_of(&d.socket), 0o666, "mode from the reloaded config");
    let out = rpcctl_as_nobody(&d.socket, &["status", "--json"]);
    assert_eq!(out.code, Some(0), "allowed uid: {out:?}\n{}", d.log());
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["pid"], d.pid);
    assert_eq!(v["generation"], 2);
    let new = status_pids(&v);
    let out = rpcctl_as_nobody(&d.socket, &["stop"]);
    assert_eq!(out.code, Some(0), "allowed stop: {out:?}");
    for p in &new {
        assert!(out.stdout.contains(&p.to_string()), "reaped {p} printed: {out:?}");
    }
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
}

#[test]
fn allow_gids_admits_by_primary_group() {
    let d = Daemon::start(opts(1));
    open_dir_to_others(&d);
    // 65534 is nogroup's gid: the uid is not listed, only the group.
    d.rewrite_config(&config_with_control(&d, &opts(1), "mode = \"0666\"\nallow_gids = [65534]"));
    assert_eq!(rpcctl(&d.socket, &["reload"]).code, Some(0));
    let out = rpcctl_as_nobody(&d.socket, &["status", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    // Another uid with a different gid is still refused.
    let mut c = Command::new("setpriv");
    c.args(["--reuid", "65533", "--regid", "65533", "--clear-groups", "--"]).arg(RPCCTL).arg("--socket").arg(&d.socket).args(["status"]);
    let out = run(c, Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("permission denied"), "{out:?}");
    assert!(d.log().contains("refused uid 65533"), "{}", d.log());
}

// ---------- the wire format ----------

#[test]
fn garbage_binary_and_huge_lines_get_errors_and_rpcd_keeps_working() {
    let mut d = Daemon::start(opts(2));
    let pids = d.wait_serving(2);
    let mut c = Raw::connect(&d.socket);
    assert_error(&c.ask(b"hello\n"), "malformed");
    assert_error(&c.ask(b"[1, 2]\n"), "malformed");
    assert_error(&c.ask(b"{\"cmd\": 5}\n"), "malformed");
    assert_error(&c.ask(b"{}\n"), "malformed");
    assert_error(&c.ask(b"{\"cmd\": \"launch\"}\n"), "unknown");
    assert_error(&c.ask(b"\x00\xff\xfe\x01\x02binary\x80\n"), "utf-8");
    assert_error(&c.ask(b"{\"cmd\": \"stat\xffus\"}\n"), "utf-8");
    // Blank lines are skipped; the same connection still works.
    let v = c.ask(b"\n\r\n{\"cmd\": \"status\"}\n");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pid"], d.pid);

    // A 1 MB line: an error naming the limit, then a close.
    let mut big = Raw::connect(&d.socket);
    let mut w = big.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut line = vec![b'x'; 1 << 20];
        line.push(b'\n');
        let _ = w.write_all(&line); // the daemon may close before taking it all
    });
    let v = big.reply().expect("an error reply before the close");
    assert_error(&v, "65536");
    assert!(big.closed(Duration::from_secs(10)), "closed after an oversized request");
    writer.join().unwrap();

    // 1 MB of binary without any newline, then the client hangs up.
    let mut bin = Raw::connect(&d.socket);
    let mut w = bin.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let junk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8 | 0x80).collect();
        let _ = w.write_all(&junk);
    });
    let v = bin.reply().expect("an error reply");
    assert_eq!(v["ok"], false, "{v}");
    writer.join().unwrap();

    // A request cut off by the client's close: no crash either.
    let mut cut = UnixStream::connect(&d.socket).unwrap();
    cut.write_all(b"{\"cmd\": \"sta").unwrap();
    drop(cut);

    // Still the same daemon and workers, still serving and answering.
    assert_eq!(c.ask(b"{\"cmd\":\"status\"}\n")["ok"], true);
    let v = d.status();
    assert_eq!(v["pid"], d.pid);
    assert_eq!(status_pids(&v), pids);
    assert_eq!(ping(d.port, &json!("after garbage"))["result"], "after garbage");
    assert!(d.child.as_mut().unwrap().try_wait().unwrap().is_none());
}

#[test]
fn silent_and_slow_control_clients_delay_nothing() {
    let mut d = Daemon::start(opts(2));
    let pids = d.wait_serving(2);
    // Connected, authorised, and saying nothing.
    let mut silent: Vec<Raw> = (0..20).map(|_| Raw::connect(&d.socket)).collect();
    // Half a request, then nothing.
    let mut slow = Raw::connect(&d.socket);
    slow.send(b"{\"cmd\": \"st");

    // Other control clients are answered at once.
    let t = Instant::now();
    let out = rpcctl(&d.socket, &["status", "--json"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let status_took = t.elapsed();
    assert!(status_took < Duration::from_secs(3), "status took {status_took:?} with silent clients connected");

    // Reaping and respawning are not delayed either.
    kill(pids[0], libc::SIGKILL);
    wait_for("the killed worker reaped and replaced", Duration::from_secs(8), || {
        let v = d.status();
        let p = status_pids(&v);
        (proc_state(pids[0]).is_none() && p.len() == 2 && !p.contains(&pids[0]) && v["workers"].as_array().unwrap().iter().all(|w| w["state"] == "serving"))
            .then_some(())
    });

    // SIGTERM: the master exits promptly, long before the 10 s read timeout.
    let workers = d.wait_serving(2);
    let t = Instant::now();
    kill(d.pid, libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
    let took = t.elapsed();
    eprintln!("SIGTERM to exit with {} silent control clients: {took:?} (status took {status_took:?})", silent.len() + 1);
    assert!(took < Duration::from_secs(4), "SIGTERM took {took:?} with silent control clients connected");
    for p in workers {
        assert_eq!(proc_state(p), None, "worker {p} reaped");
    }
    // The silent ones were closed by the exit, not left hanging.
    for s in silent.iter_mut() {
        assert!(s.closed(Duration::from_secs(2)));
    }
    assert!(slow.closed(Duration::from_secs(2)));
}

// ---------- status ----------

#[test]
fn status_reports_master_generation_and_real_children() {
    let mut d = Daemon::start(Opts { workers: 3, extra_server: "heartbeat_interval_ms = 100".into(), ..Default::default() });
    let pids = d.wait_serving(3);
    for i in 0..30 {
        assert_eq!(ping(d.port, &json!(i))["result"], i);
    }
    let v = wait_for("heartbeats to report 30 requests", Duration::from_secs(10), || {
        let v = d.status();
        let total: u64 = v["workers"].as_array().unwrap().iter().map(|w| w["requests"].as_u64().unwrap()).sum();
        (total >= 30).then_some(v)
    });
    assert_eq!(v["ok"], true);
    assert_eq!(v["pid"], d.pid);
    assert!(v["uptime_secs"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["config"], d.config.to_str().unwrap());
    assert_eq!(v["generation"], 1);
    assert_eq!(v["listen"], format!("127.0.0.1:{}", d.port));
    assert_eq!(v["state"], "serving");
    assert_eq!(v["zookeeper"]["state"], "disabled");
    assert!(v["zookeeper"].as_object().unwrap().contains_key("node"), "{v}");
    let ws = v["workers"].as_array().unwrap();
    assert_eq!(ws.len(), 3);
    for w in ws {
        assert_eq!(w["state"], "serving", "{w}");
        assert_eq!(w["generation"], 1, "{w}");
        assert_eq!(w["restarts"], 0, "{w}");
        assert!(w["uptime_secs"].as_f64().unwrap() >= 0.0, "{w}");
        assert!(w["uptime_secs"].as_f64().unwrap() <= v["uptime_secs"].as_f64().unwrap(), "{w} vs {v}");
        assert!(w["requests"].is_u64(), "{w}");
    }
    assert_eq!(status_pids(&v), pids);
    assert_eq!(children(d.pid), pids, "status lists the master's real children");

    // The readable summary.
    let out = rpcctl(&d.socket, &["status"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&format!("rpcd (pid {})", d.pid)), "{out:?}");
    assert!(out.stdout.contains(&format!("127.0.0.1:{}", d.port)), "{out:?}");
    assert!(out.stdout.contains(d.config.to_str().unwrap()), "{out:?}");
    assert!(out.stdout.contains("Generation: 1"), "{out:?}");
    assert!(out.stdout.contains("ZooKeeper: disabled"), "{out:?}");
    for p in &pids {
        assert!(out.stdout.lines().any(|l| l.contains(&p.to_string()) && l.contains("serving")), "worker {p}: {out:?}");
    }
    // --config finds the socket as well as --socket does.
    let out = run(
        {
            let mut c = Command::new(RPCCTL);
            c.arg("--config").arg(&d.config).args(["status", "--json"]);
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(0), "{out:?}");

    // stop on the raw socket: the reply lists every worker with its exit
    // status, then the connection closes as the master exits.
    let mut c = Raw::connect(&d.socket);
    let v = c.ask(b"{\"cmd\":\"stop\"}\n");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["pid"], d.pid);
    let reaped = v["reaped"].as_array().unwrap();
    let mut rp: Vec<i32> = reaped.iter().map(|r| r["pid"].as_i64().unwrap() as i32).collect();
    rp.sort();
    assert_eq!(rp, pids, "{v}");
    for r in reaped {
        assert_eq!(r["exit_code"], 0, "{r}");
        assert_eq!(r["status"], "exited with status 0", "{r}");
    }
    assert!(c.closed(Duration::from_secs(10)), "the connection closes when the master exits");
    assert_eq!(d.wait_exit(Duration::from_secs(5)), Some(0));
}

// ---------- stop ----------

#[test]
fn rpcctl_stop_prints_reaped_pids_and_leaves_nothing() {
    let mut d = Daemon::start(opts(3));
    let pids = d.wait_serving(3);
    let master = d.pid;
    let mut conn = connect(d.port);
    assert_eq!(call(&mut conn, &json!({"in": "ping", "params": 1}))["out"], "pong");
    let t = Instant::now();
    let out = rpcctl(&d.socket, &["stop"]);
    let took = t.elapsed();
    assert_eq!(out.code, Some(0), "{out:?}\n{}", d.log());
    // rpcctl returned only once the master had exited: it is already a zombie
    // waiting for us, without any polling here.
    let st = d.child.as_mut().unwrap().try_wait().unwrap();
    assert!(st.is_some(), "rpcctl stop returned while the master (pid {master}) was still running: {:?}", proc_state(master));
    assert_eq!(st.unwrap().code(), Some(0));
    d.child = None;
    for p in &pids {
        assert!(out.stdout.contains(&p.to_string()), "reaped {p} printed: {out:?}");
        assert_eq!(proc_state(*p), None, "worker {p} is gone (not a zombie)");
    }
    assert!(out.stdout.contains(&format!("pid {master}")), "{out:?}");
    assert!(out.stdout.contains("exited with status 0"), "{out:?}");
    assert!(closed_by_peer(&mut conn, Duration::from_secs(2)));
    assert!(!d.socket.exists(), "control socket removed");
    // Nothing is listening any more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", d.port)).is_err());
    eprintln!("rpcctl stop took {took:?}");

    // Not running: exit 3 for status (both forms); stop and reload too.
    for args in [&["status"][..], &["status", "--json"], &["stop"], &["reload"]] {
        let out = rpcctl(&d.socket, args);
        assert_eq!(out.code, Some(3), "{args:?}: {out:?}");
        assert!(out.stderr.contains("not running"), "{out:?}");
    }
}

#[test]
fn second_rpcd_on_the_same_socket_refuses_and_a_stale_socket_is_replaced() {
    let mut d = Daemon::start(opts(1));
    let pids = d.wait_serving(1);
    // The very same config again: "already running", and the first one is
    // left alone (its socket included).
    let mut c = Command::new(RPCD);
    c.arg("--config").arg(&d.config);
    let out = run(c, Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("already running"), "{out:?}");
    assert!(out.stderr.contains(d.socket.to_str().unwrap()), "names the socket: {out:?}");
    // Same socket, another port: refused too.
    let other = d.dir.path().join("other.toml");
    let port2 = free_port();
    std::fs::write(&other, d.config_text(&opts(1)).replace(&format!(":{}\"", d.port), &format!(":{port2}\""))).unwrap();
    let mut c = Command::new(RPCD);
    c.arg("--config").arg(&other);
    let out = run(c, Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("already running"), "{out:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port2)).is_err(), "the refused one serves nothing");
    let v = d.status();
    assert_eq!(v["pid"], d.pid);
    assert_eq!(status_pids(&v), pids);

    // A crash leaves the socket file behind; nobody answers on it.
    kill(d.pid, libc::SIGKILL);
    d.wait_exit(Duration::from_secs(5));
    wait_for("workers to die with the master", Duration::from_secs(5), || pids.iter().all(|&p| !alive(p)).then_some(()));
    assert!(d.socket.exists(), "the crash left the socket file");
    let out = rpcctl(&d.socket, &["status"]);
    assert_eq!(out.code, Some(3), "stale socket = not running: {out:?}");
    restart_on_same_config(&mut d);
    let v = d.status();
    assert_eq!(v["pid"], d.pid, "the new daemon answers on the replaced socket");
    assert!(d.log().contains("removing stale control socket"), "{}", d.log());
    assert_eq!(mode_of(&d.socket), 0o660);

    // A file that is not a socket is never removed.
    let out = rpcctl(&d.socket, &["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    d.wait_exit(Duration::from_secs(5));
    std::fs::write(&d.socket, "precious").unwrap();
    let mut c = Command::new(RPCD);
    c.arg("--config").arg(&d.config);
    let out = run(c, Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("not a socket"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&d.socket).unwrap(), "precious");
}

// ---------- socket mode and group ----------

#[test]
fn control_socket_mode_and_group_from_config() {
    let mut d = Daemon::start(opts(1));
    assert_eq!(mode_of(&d.socket), 0o660, "default mode");
    assert_eq!(std::fs::metadata(&d.socket).unwrap().gid(), unsafe { libc::getegid() }, "default group: the daemon's");
    // Mode and group from the config at start.
    let out = rpcctl(&d.socket, &["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    d.wait_exit(Duration::from_secs(5));
    d.rewrite_config(&config_with_control(&d, &opts(1), "mode = \"0640\"\ngroup = \"nogroup\""));
    restart_on_same_config(&mut d);
    let m = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o640);
    assert_eq!(m.gid(), 65534);
    // And on reload.
    d.rewrite_config(&config_with_control(&d, &opts(1), "mode = \"0600\"\ngroup = \"0\""));
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let m = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(m.gid(), 0);
    // An invalid mode is refused with its key and line.
    d.rewrite_config(&config_with_control(&d, &opts(1), "mode = \"999\""));
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("control.mode"), "{out:?}");
    assert_eq!(mode_of(&d.socket), 0o600, "unchanged");
}

// ---------- reload ----------

#[test]
fn invalid_reload_changes_nothing_and_says_where() {
    let mut d = Daemon::start(opts(2));
    let pids = d.wait_serving(2);
    d.drain_notes();
    let good = d.config_text(&opts(2));
    // Line 3 is `workers = 2`.
    assert_eq!(good.lines().nth(2), Some("workers = 2"));
    d.rewrite_config(&good.replace("workers = 2", "workers = \"lots\""));
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("server.workers"), "names the key: {out:?}");
    assert!(out.stderr.contains(&format!("{}:3:", d.config.display())), "names the file and line: {out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // An unknown key, on line 5.
    let bad = good.replacen("graceful_timeout_secs = 5\n", "graceful_timeout_secs = 5\nworkerz = 3\n", 1);
    assert_eq!(bad.lines().nth(4), Some("workerz = 3"));
    d.rewrite_config(&bad);
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("workerz") && out.stderr.contains(":5:"), "{out:?}");
    // SIGHUP with an invalid config: logged, nothing changes.
    kill(d.pid, libc::SIGHUP);
    wait_for("the failed SIGHUP reload logged", Duration::from_secs(10), || {
        (d.log().lines().filter(|l| l.contains("reload failed") && l.contains("workerz")).count() >= 2).then_some(())
    });
    let log = d.log();
    assert!(log.lines().any(|l| l.contains("reload failed") && l.contains("server.workers") && l.contains(":3:")), "{log}");

    let v = d.status();
    assert_eq!(status_pids(&v), pids, "the same workers serve");
    assert_eq!(children(d.pid), pids);
    assert_eq!(v["generation"], 1);
    assert_eq!(v["state"], "serving");
    assert!(v["workers"].as_array().unwrap().iter().all(|w| w["state"] == "serving"));
    assert_eq!(ping(d.port, &json!("still"))["result"], "still");
    d.drain_notes();
    assert!(!d.notes.iter().any(|n| n.contains("RELOADING=1")), "no RELOADING=1 for a refused reload: {:?}", d.notes);

    // Fixed: the next reload works.
    d.rewrite_config(&good);
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(d.status()["generation"], 2);
}

#[test]
fn sighup_reloads_with_reloading_monotonic_usec_then_ready() {
    let mut d = Daemon::start(opts(2));
    let old = d.wait_serving(2);
    let inode = listen_inode(d.port).expect("a listener in /proc/net/tcp");
    d.drain_notes();
    let start = d.notes.len();
    let before = monotonic_usec();
    kill(d.pid, libc::SIGHUP);
    let i_rel = wait_note_from(&mut d, start, "RELOADING=1", Duration::from_secs(10));
    let after = monotonic_usec();
    let note = d.notes[i_rel].clone();
    let usec: u64 = note
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("MONOTONIC_USEC with RELOADING=1: {note:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(usec >= before && usec <= after, "MONOTONIC_USEC={usec} is CLOCK_MONOTONIC ({before}..{after})");
    let i_ready = wait_note_from(&mut d, start, "READY=1", Duration::from_secs(20));
    assert!(i_rel < i_ready, "RELOADING=1 then READY=1: {:?}", d.notes);
    assert!(d.notes[i_ready].contains(&format!("MAINPID={}", d.pid)), "{}", d.notes[i_ready]);
    // READY=1 came with the reload complete: new generation serving, old one reaped.
    let v = d.status();
    assert_eq!(v["generation"], 2, "{v}");
    let new = status_pids(&v);
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|p| !old.contains(p)), "new PIDs: {old:?} -> {new:?}");
    assert!(v["workers"].as_array().unwrap().iter().all(|w| w["state"] == "serving" && w["generation"] == 2), "{v}");
    for p in &old {
        assert_eq!(proc_state(*p), None, "old worker {p} reaped");
    }
    assert_eq!(children(d.pid), new);
    assert_eq!(ping(d.port, &json!("hup"))["result"], "hup");
    assert_eq!(listen_inode(d.port), Some(inode), "same address: the same listening socket is kept");
}

#[test]
fn reload_to_a_new_port_serves_there_and_closes_the_old() {
    let mut d = Daemon::start(opts(2));
    let old = d.wait_serving(2);
    let old_port = d.port;
    let mut idle = connect(old_port);
    assert_eq!(call(&mut idle, &json!({"in": "ping", "params": 0}))["out"], "pong");
    let new_port = free_port();
    let text = d.config_text(&opts(2)).replace(&format!("127.0.0.1:{old_port}"), &format!("127.0.0.1:{new_port}"));
    d.rewrite_config(&text);
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let v = d.status();
    assert_eq!(v["listen"], format!("127.0.0.1:{new_port}"));
    let new = status_pids(&v);
    assert!(out.stdout.contains("generation 2"), "{out:?}");
    for p in &new {
        assert!(out.stdout.contains(&p.to_string()), "new {p} printed: {out:?}");
    }
    for p in &old {
        assert!(out.stdout.contains(&p.to_string()), "retired {p} printed: {out:?}");
        assert_eq!(proc_state(*p), None, "old worker {p} reaped when reload returned");
    }
    assert_eq!(ping(new_port, &json!("new"))["result"], "new");
    assert!(closed_by_peer(&mut idle, Duration::from_secs(5)), "old connections are drained");
    // Nobody listens on the old port any more (rpcd closed every copy; the
    // copy it sent with FDSTORE=1 is closed once we read it, as systemd's
    // store closes it on FDSTOREREMOVE=1).
    let refused = |d: &mut Daemon, port: u16| {
        wait_for("nothing to listen on the port", Duration::from_secs(5), || {
            d.drain_notes();
            matches!(std::net::TcpStream::connect(("127.0.0.1", port)), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused).then_some(())
        })
    };
    refused(&mut d, old_port);
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid)).unwrap().count();
    // And back to the old port: the address is free for a new listener.
    d.rewrite_config(&d.config_text(&opts(2)));
    let out = rpcctl(&d.socket, &["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(ping(old_port, &json!("back"))["result"], "back");
    refused(&mut d, new_port);
    // (A descriptor of the first reload's last moments, such as a retired
    // worker's channel, may still have been open when `fds` was counted.)
    let pid = d.pid;
    wait_for("no listener leaked (no more descriptors than before)", Duration::from_secs(5), || {
        (std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() <= fds).then_some(())
    });
}

#[test]
fn settings_that_cannot_change_at_runtime_are_reported() {
    let mut d = Daemon::start(opts(1));
    let moved = d.dir.path().join("moved.sock");
    let text = d.config_text(&opts(1)).replace(d.socket.to_str().unwrap(), moved.to_str().unwrap());
    d.rewrite_config(&text);
    for _ in 0..2 {
        let out = rpcctl(&d.socket, &["reload"]);
        assert_eq!(out.code, Some(0), "{out:?}");
        assert!(out.stdout.lines().any(|l| l.starts_with("warning:") && l.contains("control.socket")), "{out:?}");
    }
    assert!(!moved.exists(), "the socket did not move");
    assert_eq!(d.status()["generation"], 3);
    // Stop still cleans up the socket it really uses.
    let out = rpcctl(&d.socket, &["stop"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    d.wait_exit(Duration::from_secs(5));
    assert!(!d.socket.exists(), "the socket in use was removed on stop");
}

#[test]
fn twenty_concurrent_reloads_end_in_one_generation() {
    let n = 3usize;
    let mut d = Daemon::start(opts(n as u32));
    let first = d.wait_serving(n);
    d.drain_notes();
    let start = d.notes.len();
    // 20 clients connected first, then all asking at the same moment, with
    // two SIGHUPs in the middle of it.
    let barrier = Arc::new(std::sync::Barrier::new(21));
    let mut threads = Vec::new();
    for _ in 0..20 {
        let mut c = Raw::connect(&d.socket);
        c.s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let b = barrier.clone();
        threads.push(std::thread::spawn(move || {
            b.wait();
            c.ask(b"{\"cmd\":\"reload\"}\n")
        }));
    }
    barrier.wait();
    kill(d.pid, libc::SIGHUP);
    kill(d.pid, libc::SIGHUP);
    let replies: Vec<Value> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut gens = Vec::new();
    for v in &replies {
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(pids_of(&v["new_pids"]).len(), n, "{v}");
        gens.push(v["generation"].as_u64().unwrap());
    }
    // A SIGHUP may have queued one more reload: wait until it settles.
    let v = wait_for("one serving generation", Duration::from_secs(30), || {
        let v = d.status();
        let ws = v["workers"].as_array().unwrap();
        (v["state"] == "serving" && ws.len() == n && ws.iter().all(|w| w["state"] == "serving" && w["generation"] == v["generation"]))
            .then_some(v)
    });
    let g = v["generation"].as_u64().unwrap();
    let max_reply = *gens.iter().max().unwrap();
    eprintln!("20 concurrent reloads + 2 SIGHUPs: replies carried generations {gens:?}; final generation {g}");
    assert!(g >= max_reply && max_reply >= 2, "generation {g}, replies {gens:?}");
    assert!(g <= 5, "requests arriving together are coalesced, not run one by one: generation {g}");
    // Every reply describes a complete generation: the last one's PIDs are the ones serving.
    let p = status_pids(&v);
    for r in replies.iter().filter(|r| r["generation"] == g) {
        assert_eq!(pids_of(&r["new_pids"]), p, "{r}");
    }
    assert!(p.iter().all(|x| !first.contains(x)));
    wait_for("only the serving generation as children", Duration::from_secs(10), || (children(d.pid) == p).then_some(()));
    assert!(zombie_children(d.pid).is_empty());
    for q in &first {
        assert_eq!(proc_state(*q), None);
    }
    // sd_notify: one RELOADING=1 and one READY=1 per new generation (the
    // datagram queue is short, so late ones may still be on their way).
    let want = (g - 1) as usize;
    wait_for("every RELOADING=1/READY=1", Duration::from_secs(10), || {
        d.drain_notes();
        (count_notes(&d, "RELOADING=1") >= want && d.notes[start..].iter().filter(|n| n.lines().any(|l| l == "READY=1")).count() >= want).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    d.drain_notes();
    assert_eq!(count_notes(&d, "RELOADING=1"), want, "{:?}", d.notes);
    assert_eq!(d.notes[start..].iter().filter(|n| n.lines().any(|l| l == "READY=1")).count(), want, "{:?}", d.notes);
    for i in 0..10 {
        assert_eq!(ping(d.port, &json!(i))["result"], i);
    }
}

// ---------- reload under load ----------

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut v = self.errors.lock().unwrap();
        if v.len() < 10 {
            v.push(e);
        }
    }
}

/// One request on a fresh connection, no retry: any failure counts.
fn fresh_ping(port: u16, id: u64) -> Result<(), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&frame(json!({"in": "ping", "params": id}).to_string().as_bytes())).map_err(|e| format!("write: {e}"))?;
    let v = read_frame(&mut s).ok_or("closed before the reply")?;
    if v["out"] == "pong" && v["result"] == id {
        Ok(())
    } else {
        Err(format!("bad reply {v}"))
    }
}

#[test]
fn reload_under_load_fails_no_request() {
    let mut d = Daemon::start(opts(2));
    let first = d.wait_serving(2);
    let port = d.port;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Clients that open a new connection for every request (no retry).
    let mut threads = Vec::new();
    for t in 0..3u64 {
        let (tally, stop) = (tally.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                match fresh_ping(port, t * 1_000_000 + i) {
                    Ok(()) => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => tally.fail(e),
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    // The project's own client on a persistent connection (it retries on a
    // fresh connection when a reused one is closed by a draining worker).
    let count = 1000u64;
    let mut call = Command::new(RPCCTL);
    call.args(["call", "ping", "\"p\"", "--addr", &format!("127.0.0.1:{port}"), "--count", &count.to_string(), "--interval", "0.005"]);
    let caller = std::thread::spawn(move || run(call, Duration::from_secs(100)));

    // Reload back to back (every 4th by SIGHUP) for as long as rpcctl call runs.
    let mut took = Vec::new();
    let mut reloads = 0u64;
    while !caller.is_finished() || reloads < 10 {
        let t = Instant::now();
        if reloads % 4 == 3 {
            kill(d.pid, libc::SIGHUP);
            let want = 2 + reloads;
            wait_for("the SIGHUP reload to complete", Duration::from_secs(30), || {
                let v = d.status();
                (v["generation"] == want && v["state"] == "serving").then_some(())
            });
        } else {
            let out = rpcctl(&d.socket, &["reload"]);
            assert_eq!(out.code, Some(0), "{out:?}");
        }
        took.push(t.elapsed());
        reloads += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let call_out = caller.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let ok = tally.ok.load(Ordering::SeqCst);
    let failed = tally.failed.load(Ordering::SeqCst);
    let answered = call_out.stdout.lines().filter(|l| l.contains(" pong ")).count() as u64;
    let call_failed = call_out.stdout.lines().filter(|l| l.starts_with("FAILED")).count();
    took.sort();
    eprintln!(
        "reload under load: {reloads} reloads; fresh-connection clients {ok} ok / {failed} failed; rpcctl call {answered} ok / {call_failed} failed of {count}; reload took min {:?} median {:?} max {:?}",
        took[0],
        took[took.len() / 2],
        took[took.len() - 1]
    );
    assert_eq!(failed, 0, "fresh-connection requests failed during {reloads} reloads: {:?}", tally.errors.lock().unwrap());
    assert_eq!(call_out.code, Some(0), "rpcctl call: {call_out:?}");
    assert_eq!(call_failed, 0, "{call_out:?}");
    assert_eq!(answered, count, "{call_out:?}");
    assert!(ok + answered >= 2000, "a few thousand requests: {ok} + {answered}");
    let v = d.status();
    assert_eq!(v["generation"], 1 + reloads, "{v}");
    let now = d.wait_serving(2);
    assert!(now.iter().all(|p| !first.contains(p)));
    assert_eq!(children(d.pid), now);
}
