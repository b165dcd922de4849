//! examples/python/ works as its README says: its rpcd.toml (moved to a
//! free port, a temp control socket, and exec/PYTHONPATH pointing into this
//! repo) serves examples/python/handlers.py through share/rpcd_handler.py,
//! each method answers exactly as documented, print() lands in rpcd's log,
//! and SIGTERM stops rpcd with status 0 leaving no worker or handler
//! process behind. Its own daemon guard and framed client (the example's
//! config, not the harness's); /proc helpers from the harness.
mod common;
use common::{alive, children, free_port, wait_for};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const RPCD: &str = env!("CARGO_BIN_EXE_rpcd");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The interpreter the example config names (a real path: the handler's
/// environment is cleared, so a PATH shim would not do).
const PYTHON: &str = "/usr/bin/python3";
const WORKERS: usize = 2;
const PROCESSES: usize = 2;

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

// ---------- the daemon, ended by PID whatever happens ----------

struct Daemon {
    dir: tempfile::TempDir,
    port: u16,
    log: PathBuf,
    child: Child,
    /// Every descendant seen, killed by PID on drop if still there.
    seen: Vec<i32>,
}

impl Daemon {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Workers (children of rpcd) and their handler processes.
    fn tree(&mut self) -> (Vec<i32>, Vec<i32>) {
        let workers = children(self.pid());
        let handlers: Vec<i32> = workers.iter().flat_map(|&w| children(w)).collect();
        for &p in workers.iter().chain(&handlers) {
            if !self.seen.contains(&p) {
                self.seen.push(p);
            }
        }
        (workers, handlers)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        for &p in &self.seen {
            if alive(p) {
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        if std::thread::panicking() {
            eprintln!("--- rpcd log ({}) ---\n{}", self.dir.path().display(), self.log_text());
        }
    }
}

/// Replaces `from` (which must occur) in the example config.
fn subst(text: String, from: &str, to: &str) -> String {
    assert!(text.contains(from), "examples/python/rpcd.toml no longer contains {from:?}");
    text.replace(from, to)
}

fn start() -> Daemon {
    let example = Path::new(REPO).join("examples/python");
    let dir = tempfile::Builder::new().prefix("rpcd-python-example.").tempdir().unwrap();
    let port = free_port();
    let sock = dir.path().join("control.sock");
    let text = std::fs::read_to_string(example.join("rpcd.toml")).unwrap();
    let text = subst(text, "listen = \"127.0.0.1:8011\"", &format!("listen = \"127.0.0.1:{port}\""));
    let text = subst(text, "\"/tmp/rpcd-python-example.sock\"", &format!("{:?}", sock.to_str().unwrap()));
    let text = subst(text, "\"/usr/share/doc/rpcd/examples/python/handlers.py\"", &format!("{:?}", example.join("handlers.py").to_str().unwrap()));
    let text = subst(text, "PYTHONPATH = \"/usr/share/rpcd\"", &format!("PYTHONPATH = {:?}", Path::new(REPO).join("share").to_str().unwrap()));
    assert!(text.contains(&format!("exec = [\"{PYTHON}\", ")), "the example runs {PYTHON}");
    assert!(Path::new(PYTHON).exists(), "{PYTHON} is needed to run the example");
    let config = dir.path().join("rpcd.toml");
    std::fs::write(&config, &text).unwrap();
    let log = dir.path().join("rpcd.log");
    let child = Command::new(RPCD)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        .stdout(File::create(dir.path().join("rpcd.stdout")).unwrap())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start rpcd");
    Daemon { dir, port, log, child, seen: Vec::new() }
}

// ---------- a tiny framed client ----------

/// The harness's frame of a JSON value.
fn frame(v: &Value) -> Vec<u8> {
    common::frame(v.to_string().as_bytes())
}

fn read_frame(s: &mut TcpStream) -> Value {
    common::read_frame(s).expect("a reply")
}

fn call(s: &mut TcpStream, method: &str, params: Value) -> Value {
    s.write_all(&frame(&json!({"in": method, "params": params}))).unwrap();
    read_frame(s)
}

fn connect(port: u16) -> Option<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    Some(s)
}

#[test]
fn the_python_example_serves_its_methods() {
    let t0 = Instant::now();
    let mut d = start();

    // Up: a worker answers (it accepts only once its handlers are warm) ...
    let mut s = wait_for("rpcd to answer ping", Duration::from_secs(30), || {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("rpcd exited at start ({st}):\n{}", d.log_text());
        }
        let mut s = connect(d.port)?;
        s.write_all(&frame(&json!({"in": "ping", "params": "up?"}))).ok()?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut body).ok()?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        assert_eq!(v, json!({"out": "pong", "result": "up?"}));
        Some(s)
    });
    // ... and every worker has its handler processes.
    let (workers, handlers) = wait_for("every worker's handler processes", Duration::from_secs(30), || {
        let (w, h) = d.tree();
        (w.len() == WORKERS && h.len() == WORKERS * PROCESSES).then_some((w, h))
    });
    for &h in &handlers {
        let cmd = cmdline(h);
        assert!(cmd.starts_with(PYTHON) && cmd.contains("examples/python/handlers.py"), "handler {h}: {cmd}");
    }

    // The methods, exactly as the README shows them.
    let cases: Vec<(&str, Value, Value)> = vec![
        ("add", json!([1, 2, 3]), json!({"out": "ok", "result": 6})),
        ("add", json!([1.5, 2]), json!({"out": "ok", "result": 3.5})),
        ("add", json!([]), json!({"out": "ok", "result": 0})),
        ("add", json!("12"), json!({"out": "error", "result": {"code": "bad_params", "message": "add takes a list of numbers"}})),
        ("divide", json!([1, 4]), json!({"out": "ok", "result": 0.25})),
        ("divide", json!([1, 0]), json!({"out": "error", "result": {"code": "bad_params", "message": "division by zero"}})),
        ("divide", json!([1]), json!({"out": "error", "result": {"code": "bad_params", "message": "divide takes [a, b], two numbers"}})),
        (
            "word_count",
            json!("The cat and the hat. The END, the end!"),
            json!({"out": "counted", "result": {"words": 9, "distinct": 5, "top": [["the", 4], ["end", 2], ["and", 1], ["cat", 1], ["hat", 1]]}}),
        ),
        ("word_count", json!(""), json!({"out": "counted", "result": {"words": 0, "distinct": 0, "top": []}})),
        ("word_count", json!(7), json!({"out": "error", "result": {"code": "bad_params", "message": "word_count takes a string"}})),
        ("greet", json!("Ada"), json!({"out": "greeting", "result": "hello, Ada"})),
        ("greet", json!("Zoë"), json!({"out": "greeting", "result": "hello, Zoë"})),
        ("greet", json!(null), json!({"out": "error", "result": {"code": "bad_params", "message": "greet takes a name"}})),
        // rpcd's own built-in, beside them.
        ("ping", json!({"a": 1}), json!({"out": "pong", "result": {"a": 1}})),
    ];
    for (m, p, want) in &cases {
        assert_eq!(&call(&mut s, m, p.clone()), want, "{m} {p}");
    }
    // A method the config does not route: rpcd answers it (its message is rpcd's).
    let r = call(&mut s, "nope", json!(1));
    assert_eq!((&r["out"], &r["result"]["code"]), (&json!("error"), &json!("unknown_method")), "{r}");
    // On fresh connections too (so both workers' handlers serve), pipelined,
    // with the client's id echoed.
    for _ in 0..4 {
        let mut c = connect(d.port).expect("connect");
        let mut batch = Vec::new();
        for (i, (m, p, _)) in cases.iter().enumerate() {
            batch.extend(frame(&json!({"in": m, "params": p, "id": i})));
        }
        c.write_all(&batch).unwrap();
        for (i, (m, p, want)) in cases.iter().enumerate() {
            let mut want = want.clone();
            want["id"] = json!(i);
            assert_eq!(read_frame(&mut c), want, "pipelined {m} {p}");
        }
    }
    // print() in greet went to rpcd's log, tagged with the handler.
    wait_for("greet's print() in the log", Duration::from_secs(10), || {
        let log = d.log_text();
        handlers.iter().any(|h| log.contains(&format!("handler example[{h}]: greeting Ada"))).then_some(())
    });
    drop(s);

    // The tree before the stop: those PIDs must all be gone after it.
    let (w2, h2) = d.tree();
    assert_eq!((&w2, &h2), (&workers, &handlers), "processes changed while serving:\n{}", d.log_text());
    let all: Vec<i32> = workers.iter().chain(&handlers).copied().collect();
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let status = d.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("rpcd did not stop within 20s:\n{}", d.log_text()));
    assert_eq!(status.code(), Some(0), "rpcd's exit: {status}\n{}", d.log_text());
    let left: Vec<(i32, String)> = all.iter().filter(|&&p| alive(p)).map(|&p| (p, cmdline(p))).collect();
    assert!(left.is_empty(), "left behind after rpcd exited: {left:?}\n{}", d.log_text());
    let log = d.log_text();
    for h in &handlers {
        assert!(log.contains(&format!("handler example[{h}] exited with status 0")), "handler {h} did not exit 0:\n{log}");
    }
    assert!(!log.contains("Traceback"), "{log}");
    eprintln!("the Python example: {} calls, start to stop in {:.1}s", cases.len() * 5, t0.elapsed().as_secs_f64());
}
