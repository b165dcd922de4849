//! The Prometheus endpoint (SPEC §8, issue 13): real rpcd, a real private
//! Prometheus (Debian's package; scripts/install-test-deps installs it)
//! scraping it every second, real promtool. Counts are checked exactly: every
//! request frame is counted once, when its reply is written.
//!
//! The tests run one at a time: each starts a Prometheus (and some put rpcd
//! under load), and the bad-scrape test waits on the master's timers.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

const VERSION: &str = env!("CARGO_PKG_VERSION");
const RAW: &str = include_str!("fixtures/raw_handler.py");
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A program on PATH, or a clear failure (CI installs it).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        let p = dir.join(name);
        if std::fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/install-test-deps (it installs Debian's prometheus package, which has prometheus and promtool)");
}

/// rpcd with `[metrics] listen` on a free port (and `extra` config after it).
fn daemon(workers: u32, extra: &str) -> (Daemon, u16) {
    let mport = free_port();
    let d = Daemon::start(Opts {
        workers,
        extra: format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n\n{extra}"),
        files: vec![("raw_handler.py".into(), RAW.into())],
        ..Default::default()
    });
    (d, mport)
}

/// `rpcctl ARGS`, killed (by PID) if it takes longer than `timeout`.
fn rpcctl(d: &Daemon, args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(RPCCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
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
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            panic!("rpcctl {args:?} did not finish within {timeout:?}; log:\n{}", d.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (st.code(), t1.join().unwrap(), t2.join().unwrap())
}

// ---------- HTTP, by hand ----------

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` as it is and reads the reply to the end (the server closes
/// after each response); everything within `timeout`.
fn http_raw(port: u16, req: &[u8], timeout: Duration) -> Result<Reply, String> {
    let end = Instant::now() + timeout;
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(timeout)).unwrap();
    s.write_all(req).map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete reply within {timeout:?} (got {} bytes)", buf.len()));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no complete reply within {timeout:?} (got {} bytes)", buf.len()))
            }
            Err(e) => return Err(format!("read: {e} (after {} bytes)", buf.len())),
        }
    }
    parse_reply(&buf, req.starts_with(b"HEAD "))
}

/// A whole response (`head`: to a HEAD request, so no body whatever
/// Content-Length says).
fn parse_reply(buf: &[u8], to_head: bool) -> Result<Reply, String> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(buf)))?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (proto, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !proto.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = code.parse().map_err(|_| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = buf[head_end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    if to_head {
        if !body.is_empty() {
            return Err(format!("a body of {} bytes in the reply to HEAD", body.len()));
        }
    } else if chunked {
        let (mut out, mut rest) = (Vec::new(), &body[..]);
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or("chunked body cut short")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).split(';').next().unwrap().trim(), 16).map_err(|e| format!("chunk size: {e}"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or("chunk cut short")?);
            rest = rest.get(size + 2..).ok_or("chunk cut short")?;
        }
        body = out;
    } else if let Some(len) = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        let n: usize = len.1.parse().map_err(|_| format!("bad Content-Length {:?}", len.1))?;
        if body.len() != n {
            return Err(format!("Content-Length {n}, body {} bytes", body.len()));
        }
    }
    Ok(Reply { status, headers, body })
}

fn get(port: u16, path: &str, timeout: Duration) -> Result<Reply, String> {
    http_raw(port, format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes(), timeout)
}

/// What Prometheus 2.42 sends as its Accept header.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// GET /metrics as Prometheus asks for it.
fn get_metrics(port: u16, timeout: Duration) -> Result<Reply, String> {
    http_raw(port, format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {PROMETHEUS_ACCEPT}\r\nConnection: close\r\n\r\n").as_bytes(), timeout)
}

/// GET /metrics (as Prometheus asks): 200 and the exposition, or why not.
fn scrape(port: u16) -> Result<String, String> {
    let r = get_metrics(port, Duration::from_secs(5))?;
    if r.status != 200 {
        return Err(format!("status {}: {}", r.status, r.text()));
    }
    String::from_utf8(r.body).map_err(|e| format!("not UTF-8: {e}"))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------- the exposition ----------

/// One sample line: name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    /// `name{k="v",...}`, labels sorted: one key per series.
    fn key(&self) -> String {
        let l: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{}{{{}}}", self.name, l.join(","))
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("bad value {s:?}")),
    }
}

/// The samples of an exposition (text format or OpenMetrics), in order.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", no + 1);
        let name_end = line.find(['{', ' ']).ok_or_else(|| bad("no value"))?;
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices().peekable();
            let mut end = None;
            loop {
                while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                    chars.next();
                }
                match chars.peek() {
                    Some((i, '}')) => {
                        end = Some(*i + 1);
                        break;
                    }
                    None => break,
                    _ => {}
                }
                let mut k = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    k.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value not quoted"));
                }
                let mut v = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => v.push('\n'),
                            Some(c) => v.push(c),
                            None => return Err(bad("cut short")),
                        },
                        Some('"') => break,
                        Some(c) => v.push(c),
                        None => return Err(bad("cut short")),
                    }
                }
                if labels.insert(k.trim().to_string(), v).is_some() {
                    return Err(bad("a label twice"));
                }
            }
            rest = &r[end.ok_or_else(|| bad("no closing brace"))?..];
        }
        // Value, then an optional timestamp and an optional exemplar.
        let value = rest.split_whitespace().next().ok_or_else(|| bad("no value"))?;
        out.push(Sample { name, labels, value: parse_value(value).map_err(|e| bad(&e))? });
    }
    Ok(out)
}

/// Series key -> value; a series twice is an error.
fn series(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let mut m = BTreeMap::new();
    for s in parse_exposition(text)? {
        if m.insert(s.key(), s.value).is_some() {
            return Err(format!("series {} twice", s.key()));
        }
    }
    Ok(m)
}

/// The value of the one sample named `name` with (at least) `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let all = parse_exposition(text).ok()?;
    let hits: Vec<&Sample> =
        all.iter().filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))).collect();
    match hits.as_slice() {
        [one] => Some(one.value),
        _ => None,
    }
}

// ---------- exact counts ----------

/// Waits until `read` gives exactly `want`, and still does `settle` later
/// (an over-count arriving late is caught too). A counter above `want` is a
/// failure at once: it never comes down. Err says what was seen.
fn wait_exact(what: &str, want: f64, timeout: Duration, settle: Duration, mut read: impl FnMut() -> Option<f64>) -> Result<(), String> {
    let end = Instant::now() + timeout;
    let mut equal_since: Option<Instant> = None;
    let mut last = None;
    loop {
        let v = read();
        last = v.or(last);
        match v {
            Some(v) if v > want => return Err(format!("{what}: {v}, more than {want}")),
            Some(v) if v == want => {
                let since = *equal_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= settle {
                    return Ok(());
                }
            }
            _ => equal_since = None,
        }
        if Instant::now() > end {
            return Err(format!("{what}: {last:?} after {timeout:?}, not {want}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------- a private Prometheus ----------

struct Prometheus {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl Prometheus {
    /// Scrapes `127.0.0.1:target` every second (job "rpcd").
    fn start(target: u16) -> Prometheus {
        let bin = tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: rpcd\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut p = Prometheus { dir, port, child: Some(child) };
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if get(port, "/-/ready", Duration::from_secs(2)).is_ok_and(|r| r.status == 200) {
                break;
            }
            if let Ok(Some(st)) = p.child.as_mut().unwrap().try_wait() {
                p.child = None;
                panic!("prometheus exited ({st}) before it was ready; log:\n{}", p.log());
            }
            assert!(Instant::now() < end, "prometheus not ready within 60 s; log:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Result<Value, String> {
        let r = get(self.port, path, Duration::from_secs(5))?;
        let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("{path}: status {}, not JSON ({e}): {}", r.status, r.text()))?;
        if v["status"] != "success" {
            return Err(format!("{path}: {v}"));
        }
        Ok(v)
    }

    /// An instant query: each series' labels and value.
    fn query(&self, q: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(q)))?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().ok_or_else(|| format!("{q}: not a vector: {v}"))? {
            let labels = r["metric"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect();
            out.push((labels, parse_value(r["value"][1].as_str().unwrap_or(""))?));
        }
        Ok(out)
    }

    /// The value of a query that gives one series; None if none (or more).
    fn value(&self, q: &str) -> Option<f64> {
        match self.query(q).ok()?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// The scrape target as Prometheus sees it (health, last error).
    fn target(&self) -> String {
        match self.api("/api/v1/targets") {
            Ok(v) => v["data"]["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| format!("{} health={} lastError={:?}", t["scrapeUrl"], t["health"], t["lastError"]))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => e,
        }
    }

    /// Waits until the target has been scraped with success.
    fn wait_up(&self) {
        let end = Instant::now() + Duration::from_secs(30);
        while self.value("up{job=\"rpcd\"}") != Some(1.0) {
            assert!(Instant::now() < end, "Prometheus did not scrape rpcd within 30 s: {}", self.target());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// wait_exact on a query, with the target's state in the error.
    fn exact(&self, q: &str, want: f64) -> Result<(), String> {
        wait_exact(q, want, Duration::from_secs(30), Duration::from_millis(2500), || self.value(q)).map_err(|e| format!("{e} (target: {})", self.target()))
    }

    /// Each query reaches exactly its value (bounded), and all still have
    /// it over two more scrapes: the failures, if any.
    fn exact_all(&self, checks: &[(String, f64)]) -> Vec<String> {
        let mut failures = Vec::new();
        for (q, want) in checks {
            if let Err(e) = wait_exact(q, *want, Duration::from_secs(30), Duration::ZERO, || self.value(q)) {
                failures.push(format!("{e} (target: {})", self.target()));
            }
        }
        std::thread::sleep(Duration::from_millis(2500));
        for (q, want) in checks {
            let v = self.value(q);
            if v != Some(*want) {
                failures.push(format!("{q}: {v:?} two scrapes later, not {want}"));
            }
        }
        failures
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            kill(pid, libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------- load ----------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ping,
    Unknown,
    BadJson,
    /// `echo` through the raw handler: a declared method.
    Echo,
    /// `error` through the raw handler: its own code `my_code`.
    HandlerError,
}

/// A connection's requests, in order, sent `depth` frames at a time (one
/// write) and their replies checked one by one.
fn drive(mut s: TcpStream, conn: usize, plan: &[Kind], depth: usize) -> TcpStream {
    for (b, batch) in plan.chunks(depth).enumerate() {
        let mut out = Vec::new();
        for (j, k) in batch.iter().enumerate() {
            let p = json!([conn, b * depth + j]);
            let body = match k {
                Kind::Ping => json!({"in": "ping", "params": p}).to_string(),
                Kind::Unknown => json!({"in": "no_such_method", "params": p}).to_string(),
                Kind::BadJson => "{\"in\": \"ping\", \"params\": [1, 2".to_string(),
                Kind::Echo => json!({"in": "echo", "params": p}).to_string(),
                Kind::HandlerError => json!({"in": "error", "params": p}).to_string(),
            };
            out.extend(frame(body.as_bytes()));
        }
        s.write_all(&out).unwrap();
        for (j, k) in batch.iter().enumerate() {
            let p = json!([conn, b * depth + j]);
            let v = read_frame(&mut s).unwrap_or_else(|| panic!("connection {conn}: no reply to {k:?} {p}"));
            let ok = match k {
                Kind::Ping | Kind::Echo => v["out"] == "pong" && v["result"] == p,
                Kind::Unknown => v["result"]["code"] == "unknown_method",
                Kind::BadJson => v["result"]["code"] == "bad_json",
                Kind::HandlerError => v["result"]["code"] == "my_code",
            };
            assert!(ok, "connection {conn}: {k:?} {p} got {v}");
        }
    }
    s
}

/// `n` of `kind` spread evenly through `plan`.
fn sprinkle(plan: &mut Vec<Kind>, kind: Kind, n: usize) {
    for i in 0..n {
        let at = (i * 2 + 1) * plan.len() / (2 * n.max(1));
        plan.insert(at.min(plan.len()), kind);
    }
}

const RAW_POOL: &str = "[handlers.raw]\nexec = [\"/usr/bin/python3\", \"{dir}/raw_handler.py\"]\ndir = \"{dir}\"\nprocesses = 1\n\n[methods.echo]\nhandler = \"raw\"\n\n[methods.error]\nhandler = \"raw\"\n";

// ---------- the tests ----------

/// Exact counts under load, through Prometheus: pings on plain and
/// pipelined connections, unknown methods, bad JSON, a declared method, a
/// handler's own error code, a frame too large; the histogram, the gauges,
/// build info.
#[test]
fn prometheus_sees_exact_counts_under_load() {
    let _one = alone();
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let (mut d, mport) = daemon(2, RAW_POOL);
    d.wait_serving(2);
    let prom = Prometheus::start(mport);
    prom.wait_up();

    // 4 connections: two one request at a time, two pipelined 32 deep.
    const N: usize = 5000;
    let (m, k, e, r) = (37, 23, 40, 11);
    let shares = [(500, 1), (500, 1), (2000, 32), (2000, 32)];
    let mut plans: Vec<(Vec<Kind>, usize)> = shares.iter().map(|&(n, depth)| (vec![Kind::Ping; n], depth)).collect();
    sprinkle(&mut plans[0].0, Kind::Unknown, 20);
    sprinkle(&mut plans[2].0, Kind::Unknown, m - 20);
    sprinkle(&mut plans[1].0, Kind::BadJson, 10);
    sprinkle(&mut plans[3].0, Kind::BadJson, k - 10);
    sprinkle(&mut plans[0].0, Kind::Echo, e / 2);
    sprinkle(&mut plans[3].0, Kind::Echo, e - e / 2);
    sprinkle(&mut plans[1].0, Kind::HandlerError, r);
    let count = |kind: Kind| plans.iter().map(|(p, _)| p.iter().filter(|x| **x == kind).count()).sum::<usize>();
    assert_eq!((count(Kind::Ping), count(Kind::Unknown), count(Kind::BadJson), count(Kind::Echo), count(Kind::HandlerError)), (N, m, k, e, r));
    let port = d.port;
    let threads: Vec<_> = plans.into_iter().enumerate().map(|(i, (plan, depth))| std::thread::spawn(move || drive(connect(port), i, &plan, depth))).collect();
    // The connections stay open until the gauge has been seen.
    let held: Vec<TcpStream> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // A fifth: one frame over max_frame_bytes (1 MiB), then the close.
    let mut big = connect(port);
    big.write_all(&(2u32 << 20).to_le_bytes()).unwrap();
    big.write_all(b"{\"in\": \"ping\"").unwrap();
    let v = read_frame(&mut big).expect("a reply to the frame over the limit");
    assert_eq!(v["result"]["code"], "too_large", "{v}");
    assert!(closed_by_peer(&mut big, Duration::from_secs(10)), "closed after too_large");

    let want = |q: &str, v: usize| (q.to_string(), v as f64);
    let mut failures = prom.exact_all(&[
        want("rpcd_requests_total{method=\"ping\",code=\"ok\"}", N),
        want("rpcd_requests_total{method=\"other\",code=\"unknown_method\"}", m),
        want("rpcd_requests_total{method=\"other\",code=\"bad_json\"}", k),
        want("rpcd_requests_total{method=\"echo\",code=\"ok\"}", e),
        want("rpcd_requests_total{method=\"error\",code=\"other\"}", r),
        want("rpcd_requests_total{method=\"other\",code=\"too_large\"}", 1),
        // Nothing counted anywhere else.
        want("sum(rpcd_requests_total)", N + m + k + e + r + 1),
        want("rpcd_request_duration_seconds_count{method=\"ping\"}", N),
        want("rpcd_request_duration_seconds_bucket{method=\"ping\",le=\"+Inf\"}", N),
        want("rpcd_request_duration_seconds_count{method=\"echo\"}", e),
        want("rpcd_connections_accepted_total", 5),
        want("rpcd_up", 1),
        want(&format!("rpcd_build_info{{version=\"{VERSION}\"}}"), 1),
        want("rpcd_workers{state=\"serving\"}", 2),
        want("rpcd_handler_processes{handler=\"raw\"}", 2),
        want("rpcd_zookeeper_registered", 0),
    ]);
    let gauge = |q: &str, want: f64| {
        wait_for(&format!("{q} == {want} (target: {})", prom.target()), Duration::from_secs(20), || (prom.value(q) == Some(want)).then_some(()))
    };
    gauge("rpcd_connections", 4.0);
    drop(held);
    gauge("rpcd_connections", 0.0);

    let sum = prom.value("rpcd_request_duration_seconds_sum{method=\"ping\"}");
    let mean = sum.map(|s| s / N as f64);
    if !mean.is_some_and(|m| m > 0.0 && m < 1.0) {
        failures.push(format!("ping's mean latency {mean:?} s (sum {sum:?}), not in (0, 1)"));
    }
    let start = prom.value("rpcd_start_time_seconds");
    if !start.is_some_and(|s| s >= t0 - 5.0 && s <= t0 + 60.0) {
        failures.push(format!("rpcd_start_time_seconds {start:?}, the test started at {t0}"));
    }
    // The rest of the families exist, by name (labelled ones may have no
    // series yet): Prometheus has their metadata.
    let meta = prom.api("/api/v1/metadata").map(|v| v["data"].clone()).unwrap_or(Value::Null);
    for name in [
        "rpcd_worker_restarts",
        "rpcd_handler_restarts",
        "rpcd_reloads",
        "rpcd_zookeeper_session_events",
        "rpcd_requests",
        "rpcd_request_duration_seconds",
        "rpcd_connections_accepted",
    ] {
        if meta.get(name).is_none() {
            failures.push(format!("no metadata for the family {name} (families: {:?})", meta.as_object().map(|o| o.keys().collect::<Vec<_>>())));
        }
    }
    assert!(failures.is_empty(), "{} failed:\n{}\nexposition now:\n{}", failures.len(), failures.join("\n"), scrape(mport).unwrap_or_else(|e| e));
    eprintln!("metrics: pings {N}, unknown {m}, bad_json {k}, echo {e}, handler errors {r}, too_large 1, 5 connections; ping mean latency {:.1} µs", mean.unwrap() * 1e6);
}

/// The exposition as served: status, content type, `# EOF`, HEAD; every
/// SPEC §8 family by name; and `promtool check metrics` on it.
#[test]
fn exposition_is_openmetrics_and_promtool_accepts_it() {
    let _one = alone();
    let promtool = tool("promtool");
    let (mut d, mport) = daemon(2, RAW_POOL);
    d.wait_serving(2);
    let mut c = connect(d.port);
    for (req, code) in [
        (json!({"in": "ping", "params": 1}), None),
        (json!({"in": "pi", "params": 10}), None),
        (json!({"in": "nope", "params": 1}), Some("unknown_method")),
        (json!({"in": "echo", "params": 1}), None),
        (json!({"in": "error", "params": 1}), Some("my_code")),
        (json!({"params": 1}), Some("bad_request")),
    ] {
        let v = call(&mut c, &req);
        assert_eq!(v["result"]["code"].as_str(), code, "{req} -> {v}");
    }
    drop(c);

    // Counted when the reply is written: the scrape sees all 6 (bounded).
    let text = wait_for("the 6 requests in the exposition", Duration::from_secs(10), || {
        let t = scrape(mport).ok()?;
        let total: f64 = parse_exposition(&t).ok()?.iter().filter(|s| s.name == "rpcd_requests_total").map(|s| s.value).sum();
        (total == 6.0).then_some(t)
    });
    // As Prometheus asks for it: OpenMetrics.
    let r = get_metrics(mport, Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(CONTENT_TYPE), "{:?}", r.headers);
    assert!(r.text().ends_with("# EOF\n"), "does not end with # EOF: {:?}", &r.text()[r.text().len().saturating_sub(200)..]);
    let h = http_raw(mport, format!("HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1:{mport}\r\nAccept: {PROMETHEUS_ACCEPT}\r\n\r\n").as_bytes(), Duration::from_secs(5)).unwrap();
    assert_eq!((h.status, h.body.len()), (200, 0), "HEAD: {h:?}");
    assert_eq!(h.header("content-type"), Some(CONTENT_TYPE));
    // As curl asks for it (no Accept): what `curl URL | promtool check
    // metrics` checks.
    let plain = get(mport, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(plain.status, 200);
    let ct = plain.header("content-type").unwrap_or("");
    assert!(ct == CONTENT_TYPE || ct.starts_with("text/plain; version=0.0.4"), "Content-Type {ct:?} without Accept");

    // Each series once; the SPEC's names, with their types.
    let all = series(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let types: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_once(' ')).collect();
    for (family, ty) in [
        ("rpcd_build", "info"),
        ("rpcd_up", "gauge"),
        ("rpcd_start_time_seconds", "gauge"),
        ("rpcd_requests", "counter"),
        ("rpcd_request_duration_seconds", "histogram"),
        ("rpcd_connections", "gauge"),
        ("rpcd_connections_accepted", "counter"),
        ("rpcd_workers", "gauge"),
        ("rpcd_worker_restarts", "counter"),
        ("rpcd_handler_processes", "gauge"),
        ("rpcd_handler_restarts", "counter"),
        ("rpcd_reloads", "counter"),
        ("rpcd_zookeeper_registered", "gauge"),
        ("rpcd_zookeeper_session_events", "counter"),
    ] {
        assert_eq!(types.get(family).copied(), Some(ty), "# TYPE of {family}; all: {types:?}\n{text}");
    }
    for (name, labels, want) in [
        ("rpcd_build_info", vec![("version", VERSION)], 1.0),
        ("rpcd_up", vec![], 1.0),
        ("rpcd_requests_total", vec![("method", "ping"), ("code", "ok")], 1.0),
        ("rpcd_requests_total", vec![("method", "pi"), ("code", "ok")], 1.0),
        ("rpcd_requests_total", vec![("method", "other"), ("code", "unknown_method")], 1.0),
        ("rpcd_requests_total", vec![("method", "echo"), ("code", "ok")], 1.0),
        ("rpcd_requests_total", vec![("method", "error"), ("code", "other")], 1.0),
        ("rpcd_requests_total", vec![("method", "other"), ("code", "bad_request")], 1.0),
        ("rpcd_request_duration_seconds_count", vec![("method", "pi")], 1.0),
        ("rpcd_connections_accepted_total", vec![], 1.0),
        ("rpcd_workers", vec![("state", "serving")], 2.0),
        ("rpcd_handler_processes", vec![("handler", "raw")], 2.0),
    ] {
        assert_eq!(sample(&text, name, &labels), Some(want), "{name} {labels:?}\n{text}");
    }
    // Histogram buckets: cumulative, ending in +Inf == _count.
    let mut buckets: Vec<(f64, f64)> = parse_exposition(&text)
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "rpcd_request_duration_seconds_bucket" && s.labels.get("method").map(String::as_str) == Some("ping"))
        .map(|s| (parse_value(&s.labels["le"]).unwrap(), s.value))
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(buckets.len() >= 2 && buckets.last().unwrap().0 == f64::INFINITY, "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "buckets not cumulative: {buckets:?}");
    assert_eq!(buckets.last().unwrap().1, 1.0);
    assert!(all.keys().all(|k| k.starts_with("rpcd_")), "a series not named rpcd_*: {:?}", all.keys().filter(|k| !k.starts_with("rpcd_")).collect::<Vec<_>>());

    // promtool, on exactly what was served to a plain GET; it reads the
    // text format 0.0.4 only (prometheus/prometheus#8932), so what it says
    // of the OpenMetrics rendering is only reported.
    let check = |body: &[u8]| {
        let mut child = Command::new(&promtool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(body).unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (st, said) = check(&plain.body);
    assert!(st.success(), "promtool check metrics on GET /metrics ({:?}): {st}\n{said}\n--- exposition\n{}", plain.header("content-type"), plain.text());
    if plain.body != r.body {
        let (st, said) = check(&r.body);
        eprintln!("metrics: promtool check metrics on the OpenMetrics rendering: {st}: {}", said.trim());
        // The two renderings carry the same samples.
        let a = series(&plain.text()).unwrap();
        let b = series(&r.text()).unwrap();
        let differ: Vec<&String> = a.keys().chain(b.keys()).filter(|k| !k.starts_with("rpcd_request_duration_seconds_bucket") && a.get(*k) != b.get(*k)).collect();
        assert!(differ.is_empty(), "text and OpenMetrics renderings differ: {differ:?}");
    }
}

/// One client's tally in the monotonic test.
#[derive(Default, Debug, Clone)]
struct Tally {
    sent: u64,
    pings_ok: u64,
    /// Error replies by code.
    errors: BTreeMap<String, u64>,
    /// Sent and never answered (the connection closed first).
    unanswered: u64,
    connections: u64,
    /// Connections that ended under it (EOF or reset), by reason.
    broken: Vec<String>,
}

/// Clients sending one ping at a time until told to stop, reconnecting
/// when a connection ends.
fn pingers(port: u16, n: usize, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Tally>> {
    (0..n)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut y = Tally::default();
                let end = Instant::now() + Duration::from_secs(120);
                let mut conn: Option<TcpStream> = None;
                while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                    let s = match conn.as_mut() {
                        Some(s) => s,
                        None => match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(s) => {
                                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                                s.set_nodelay(true).unwrap();
                                y.connections += 1;
                                conn.insert(s)
                            }
                            Err(e) => {
                                y.broken.push(format!("connect: {e}"));
                                std::thread::sleep(Duration::from_millis(20));
                                continue;
                            }
                        },
                    };
                    let p = json!([t, y.sent]);
                    y.sent += 1;
                    let reply = s.write_all(&frame(json!({"in": "ping", "params": p}).to_string().as_bytes())).ok().and_then(|_| read_frame(s));
                    match reply {
                        Some(v) if v["out"] == "pong" && v["result"] == p => y.pings_ok += 1,
                        Some(v) if v["out"] == "error" => {
                            let code = v["result"]["code"].as_str().unwrap_or("?").to_string();
                            // As a client should: elsewhere (here: a new connection).
                            if code == "shutting_down" {
                                conn = None;
                            }
                            *y.errors.entry(code).or_default() += 1;
                        }
                        Some(v) => panic!("client {t}: {p} got {v}"),
                        None => {
                            y.unanswered += 1;
                            y.broken.push(format!("ping {} unanswered", y.sent - 1));
                            conn = None;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                y
            })
        })
        .collect()
}

/// Counters never go backwards across a reload and a worker's SIGKILL, and
/// lose nothing: the final counts are what the clients were answered.
#[test]
fn counters_are_monotonic_and_exact_across_reload_and_worker_kill() {
    let _one = alone();
    let (mut d, mport) = daemon(2, "");
    d.wait_serving(2);
    let prom = Prometheus::start(mport);
    prom.wait_up();

    // A scraper of our own, every 100 ms, keeping every exposition.
    let stop_scraper = Arc::new(AtomicBool::new(false));
    let scrapes: Arc<Mutex<Vec<(Instant, Result<BTreeMap<String, f64>, String>)>>> = Arc::default();
    let scraper = {
        let (stop, scrapes) = (stop_scraper.clone(), scrapes.clone());
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(180);
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                let s = scrape(mport).and_then(|t| series(&t));
                scrapes.lock().unwrap().push((Instant::now(), s));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let last_scrape = |what: &str| -> BTreeMap<String, f64> {
        let n = scrapes.lock().unwrap().len();
        wait_for(what, Duration::from_secs(10), || {
            let g = scrapes.lock().unwrap();
            g[n..].iter().rev().find_map(|(_, s)| s.as_ref().ok().cloned())
        })
    };
    let restarts = |m: &BTreeMap<String, f64>| m.iter().filter(|(k, _)| k.starts_with("rpcd_worker_restarts_total{")).map(|(_, v)| v).sum::<f64>();
    let pings_counted = |m: &BTreeMap<String, f64>| m.get("rpcd_requests_total{code=\"ok\",method=\"ping\"}").copied().unwrap_or(0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let clients = pingers(d.port, 3, stop.clone());
    let progress = |what: &str, more: f64| {
        let from = pings_counted(&last_scrape(what));
        wait_for(what, Duration::from_secs(30), || {
            let g = scrapes.lock().unwrap();
            g.last().and_then(|(_, s)| s.as_ref().ok()).is_some_and(|m| pings_counted(m) >= from + more).then_some(())
        });
    };
    progress("pings before the reload", 300.0);

    // A reload: a new generation, the old workers drained.
    let gen0 = d.status()["generation"].as_u64().unwrap();
    let (code, out, err) = rpcctl(&d, &["reload"], Duration::from_secs(60));
    assert_eq!(code, Some(0), "reload: {out}{err}\n{}", d.log());
    let pids = wait_for("the new generation serving", Duration::from_secs(30), || {
        let v = d.status();
        let ws = v["workers"].as_array().unwrap().clone();
        let g = v["generation"].as_u64().unwrap();
        (g > gen0 && ws.len() == 2 && ws.iter().all(|w| w["state"] == "serving" && w["generation"].as_u64() == Some(g)))
            .then(|| ws.iter().map(|w| w["pid"].as_i64().unwrap() as i32).collect::<Vec<_>>())
    });
    progress("pings after the reload", 300.0);
    let before_kill = last_scrape("a scrape before the SIGKILL");

    // A worker SIGKILLed (under load): the master respawns it.
    kill(pids[0], libc::SIGKILL);
    wait_for("the killed worker replaced", Duration::from_secs(30), || {
        let v = d.status();
        let ws = v["workers"].as_array().unwrap().clone();
        (ws.len() == 2 && ws.iter().all(|w| w["state"] == "serving" && w["pid"].as_i64() != Some(pids[0] as i64))).then_some(())
    });
    progress("pings after the SIGKILL", 300.0);
    stop.store(true, Ordering::SeqCst);
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let after = last_scrape("a scrape after the load");
    std::thread::sleep(Duration::from_millis(300));
    stop_scraper.store(true, Ordering::SeqCst);
    scraper.join().unwrap();

    let ok: u64 = tallies.iter().map(|t| t.pings_ok).sum();
    let sent: u64 = tallies.iter().map(|t| t.sent).sum();
    let unanswered: u64 = tallies.iter().map(|t| t.unanswered).sum();
    let connections: u64 = tallies.iter().map(|t| t.connections).sum();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        for (c, n) in &t.errors {
            *errors.entry(c.clone()).or_default() += n;
        }
    }
    let answered = ok + errors.values().sum::<u64>();
    eprintln!(
        "metrics: sent {sent}, pings answered {ok}, errors {errors:?}, unanswered {unanswered}, connections {connections}; broken: {:?}",
        tallies.iter().flat_map(|t| t.broken.iter()).collect::<Vec<_>>()
    );
    // Depth 1: only the request in flight when a connection ends (a killed
    // worker's, or a drained one's closing as the client sends) can go
    // unanswered, and then it was not answered, so not counted: at most one
    // per client for each of the two events.
    assert_eq!(sent, answered + unanswered);
    assert!(unanswered <= 6, "{unanswered} pings unanswered");

    // Every scrape succeeded, and no counter ever went down between two.
    let g = scrapes.lock().unwrap();
    let failed: Vec<&String> = g.iter().filter_map(|(_, s)| s.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} scrapes failed: {:?}", failed.len(), g.len(), failed);
    let ok_scrapes: Vec<&BTreeMap<String, f64>> = g.iter().filter_map(|(_, s)| s.as_ref().ok()).collect();
    let counter = |k: &str| k.starts_with("rpcd_requests_total{") || k.starts_with("rpcd_connections_accepted_total") || k.starts_with("rpcd_request_duration_seconds_count{") || k.starts_with("rpcd_worker_restarts_total{") || k.starts_with("rpcd_reloads_total{");
    let mut went_down = Vec::new();
    for w in ok_scrapes.windows(2) {
        for (k, v) in w[0].iter().filter(|(k, _)| counter(k)) {
            match w[1].get(k) {
                Some(v2) if v2 >= v => {}
                other => went_down.push(format!("{k}: {v} -> {other:?}")),
            }
        }
    }
    assert!(went_down.is_empty(), "counters went down between scrapes ({} scrapes): {:?}", ok_scrapes.len(), &went_down[..went_down.len().min(20)]);
    drop(g);

    // Exact: what the clients were answered, no more, no less.
    let mut checks = vec![
        ("rpcd_requests_total{method=\"ping\",code=\"ok\"}".to_string(), ok as f64),
        ("sum(rpcd_requests_total)".into(), answered as f64),
        ("rpcd_request_duration_seconds_count{method=\"ping\"}".into(), ok as f64),
        ("rpcd_connections_accepted_total".into(), connections as f64),
        ("rpcd_reloads_total{result=\"ok\"}".into(), 1.0),
        ("sum(rpcd_reloads_total{result=\"failed\"}) or vector(0)".into(), 0.0),
        ("sum(rpcd_worker_restarts_total)".into(), restarts(&before_kill) + 1.0),
        // Prometheus saw no counter reset either.
        ("sum(resets(rpcd_requests_total[10m])) + sum(resets(rpcd_connections_accepted_total[10m]))".into(), 0.0),
        ("rpcd_workers{state=\"serving\"}".into(), 2.0),
    ];
    for (code, n) in &errors {
        checks.push((format!("rpcd_requests_total{{method=\"other\",code=\"{code}\"}}"), *n as f64));
    }
    let mut failures = prom.exact_all(&checks);
    // The clients are gone: no open connection is left over from the killed
    // worker's slot or the old generation (a gauge: it comes down).
    let end = Instant::now() + Duration::from_secs(20);
    let mut open = prom.value("rpcd_connections");
    while open != Some(0.0) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        open = prom.value("rpcd_connections");
    }
    if open != Some(0.0) {
        failures.push(format!("rpcd_connections: {open:?} 20 s after every client went"));
    }
    let direct = scrape(mport).and_then(|t| series(&t)).expect("a last scrape");
    if pings_counted(&direct) != ok as f64 || pings_counted(&after) > ok as f64 {
        failures.push(format!("the last scrape counts {} pings, {} answered", pings_counted(&direct), ok));
    }
    assert!(failures.is_empty(), "{} failed:\n{}\nlog:\n{}", failures.len(), failures.join("\n"), d.log());
    eprintln!("metrics: worker restarts {} -> {}, reasons {:?}", restarts(&before_kill), restarts(&direct), direct.keys().filter(|k| k.starts_with("rpcd_worker_restarts_total")).collect::<Vec<_>>());
}

/// Scrapes that never complete, a huge header, a wrong path or method:
/// answered or closed, and meanwhile the master answers its control socket
/// and good scrapes at once.
#[test]
fn bad_scrapes_never_stall_the_master() {
    let _one = alone();
    let (mut d, mport) = daemon(1, "");
    d.wait_serving(1);
    scrape(mport).expect("a first scrape");
    let fds0 = open_fds(d.pid);

    // 50 connections that send nothing.
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..50).map(|_| TcpStream::connect(("127.0.0.1", mport)).expect("connect to the metrics port")).collect();
    // One that starts a request and never finishes it.
    let mut partial = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    partial.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    // A 64 KiB header.
    let big = std::thread::spawn(move || {
        let mut req = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{mport}\r\nX-Big: ").into_bytes();
        req.extend(std::iter::repeat(b'a').take(64 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(("127.0.0.1", mport)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let wrote = s.write_all(&req).map_err(|e| e.to_string());
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let read = loop {
            let mut b = [0u8; 4096];
            match s.read(&mut b) {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break Ok(()),
                Err(e) => break Err(e.to_string()),
            }
        };
        (wrote, read, got)
    });
    std::thread::sleep(Duration::from_millis(200));

    // While they are open: the control socket, good scrapes, other paths
    // and methods, a request sent in two parts 1 s apart, the RPC port.
    let t = Instant::now();
    let (code, out, err) = rpcctl(&d, &["status"], Duration::from_secs(10));
    assert_eq!(code, Some(0), "rpcctl status with 50 silent scrapers: {out}{err}");
    let status_took = t.elapsed();
    let t = Instant::now();
    let good = get_metrics(mport, Duration::from_secs(3)).expect("a good scrape with 50 silent ones open");
    let scrape_took = t.elapsed();
    assert_eq!(good.status, 200);
    assert!(good.text().ends_with("# EOF\n"));
    let nope = get(mport, "/nope", Duration::from_secs(3)).unwrap();
    assert_eq!(nope.status, 404, "{nope:?}");
    let post = http_raw(mport, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", Duration::from_secs(3)).unwrap();
    assert_eq!(post.status, 405, "{post:?}");
    let mut slow = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    slow.write_all(b"GET /metr").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    slow.write_all(b"ics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let slow_reply = parse_reply(&buf, false).expect("a reply to the request sent in two parts");
    assert_eq!(slow_reply.status, 200);
    let mut c = connect(d.port);
    assert_eq!(call(&mut c, &json!({"in": "ping", "params": 7}))["result"], 7);

    // The huge header: 431, or closed; never a hang or the metrics.
    let (wrote, read, got) = big.join().unwrap();
    read.unwrap_or_else(|e| panic!("the 64 KiB header was neither answered nor closed within 10 s: {e} (write: {wrote:?})"));
    let big_reply = if got.is_empty() { None } else { Some(parse_reply(&got, false).map(|r| r.status)) };
    assert!(matches!(big_reply, None | Some(Ok(431))), "64 KiB header: {big_reply:?} {:?}", String::from_utf8_lossy(&got[..got.len().min(300)]));

    // The silent ones (and the partial one) are closed by the server, in
    // about 5 s from their connect.
    let mut closed_after = Vec::new();
    silent.push(partial);
    for s in silent.iter_mut() {
        let left = Duration::from_secs(12).saturating_sub(opened.elapsed()).max(Duration::from_millis(1));
        assert!(closed_by_peer(s, left), "a silent connection still open {:?} after it was made", opened.elapsed());
        closed_after.push(opened.elapsed());
    }
    let first = closed_after.iter().min().unwrap();
    let last = closed_after.iter().max().unwrap();
    // Only as a sanity bound, not a timing: not closed at once either.
    assert!(*first >= Duration::from_secs(2), "a silent connection closed after only {first:?}");
    // And nothing is left open in the master.
    wait_for("the master's descriptors back to before", Duration::from_secs(5), || (open_fds(d.pid) <= fds0).then_some(()));
    scrape(mport).expect("a scrape after all that");
    eprintln!(
        "metrics: with 50 silent scrapers open, rpcctl status took {status_took:?}, a scrape {scrape_took:?}; silent ones closed after {first:?}..{last:?}; 64 KiB header: {big_reply:?}"
    );
}

/// The exact-count check can fail: one ping deliberately not sent is seen,
/// and so is one too many, both in a scrape and through Prometheus.
#[test]
fn exact_count_check_detects_off_by_one() {
    let _one = alone();
    let (mut d, mport) = daemon(1, "");
    d.wait_serving(1);
    let prom = Prometheus::start(mport);
    // 100 planned, 99 sent.
    let plan = vec![Kind::Ping; 99];
    drop(drive(connect(d.port), 0, &plan, 8));
    let direct = || scrape(mport).ok().and_then(|t| sample(&t, "rpcd_requests_total", &[("method", "ping"), ("code", "ok")]));
    let q = "rpcd_requests_total{method=\"ping\",code=\"ok\"}";
    let quick = Duration::from_secs(3);
    wait_exact("scrape", 99.0, Duration::from_secs(10), Duration::from_millis(500), direct).expect("the 99 sent");
    let short = wait_exact("scrape", 100.0, quick, Duration::ZERO, direct).expect_err("100 planned, 99 sent: must not pass");
    let over = wait_exact("scrape", 98.0, quick, Duration::ZERO, direct).expect_err("one more than expected: must not pass");
    prom.wait_up();
    prom.exact(q, 99.0).expect("Prometheus: the 99 sent");
    let p_short = wait_exact(q, 100.0, quick, Duration::ZERO, || prom.value(q)).expect_err("Prometheus: 100 must not pass");
    let p_over = wait_exact(q, 98.0, quick, Duration::ZERO, || prom.value(q)).expect_err("Prometheus: 98 must not pass");
    eprintln!("metrics: detected: {short}; {over}; {p_short}; {p_over}");
    // The parser and series keys that the other tests rely on.
    let t = "# TYPE a counter\na_total{x=\"1\",y=\"q\\\"\"} 3\na_total{x=\"2\"} 4 1700000000\n# EOF\n";
    let s = series(t).unwrap();
    assert_eq!(s.get("a_total{x=\"1\",y=\"q\\\"\"}"), Some(&3.0), "{s:?}");
    assert_eq!(sample(t, "a_total", &[("x", "2")]), Some(4.0));
    assert!(series("a 1\na 2\n").is_err(), "a series twice is caught");
}
