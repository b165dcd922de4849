//! What operators see of the work done, without Prometheus (tests/metrics.rs
//! has the real Prometheus): `rpcctl status`'s per-method counts, errors
//! and latency over the last minute, counts that survive a worker's SIGKILL
//! and a reload exactly, the slow log, and `[metrics]` config errors. Real
//! rpcd, real Python handler processes, real signals.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

const RAW: &str = include_str!("fixtures/raw_handler.py");

fn handler_opts(workers: u32, extra_server: &str) -> Opts {
    let extra = format!(
        "[handlers.py]\nexec = [\"{PYTHON}\", \"{{dir}}/raw_handler.py\"]\ndir = \"{{dir}}\"\nprocesses = 1\n\n\
         [methods.echo]\nhandler = \"py\"\n\n[methods.sleep]\nhandler = \"py\"\n\n[methods.error]\nhandler = \"py\"\n"
    );
    Opts { workers, extra, extra_server: extra_server.into(), files: vec![("raw_handler.py".into(), RAW.into())], ..Default::default() }
}

/// Sends `n` frames of `body` on one connection, pipelined, and reads the
/// `n` replies; returns how many were errors.
fn send_n(port: u16, body: &[u8], n: usize) -> usize {
    let mut s = connect(port);
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend_from_slice(&frame(body));
    }
    s.write_all(&out).unwrap();
    (0..n).filter(|_| read_frame(&mut s).expect("a reply")["out"] == "error").count()
}

fn by_method(d: &mut Daemon) -> Value {
    d.status()["methods"]["by_method"].clone()
}

fn total(d: &mut Daemon, method: &str) -> u64 {
    by_method(d)[method]["total_requests"].as_u64().unwrap_or(0)
}

#[test]
fn status_shows_each_methods_requests_errors_and_latency() {
    let mut d = Daemon::start(handler_opts(2, ""));
    assert_eq!(send_n(d.port, br#"{"in":"ping","params":1}"#, 100), 0);
    assert_eq!(send_n(d.port, br#"{"in":"echo","params":[1,2]}"#, 20), 0);
    assert_eq!(send_n(d.port, br#"{"in":"error","params":null}"#, 4), 4);
    assert_eq!(send_n(d.port, br#"{"in":"nosuch","params":null}"#, 7), 7);
    assert_eq!(send_n(d.port, b"{not json", 3), 3);
    assert_eq!(send_n(d.port, br#"{"in":"pi","params":"x"}"#, 2), 2);
    let m = by_method(&mut d);
    let get = |name: &str, k: &str| m[name][k].as_u64().unwrap_or_else(|| panic!("{name}.{k} in {m}"));
    assert_eq!((get("ping", "requests"), get("ping", "errors")), (100, 0), "{m}");
    assert_eq!((get("echo", "requests"), get("echo", "errors")), (20, 0), "{m}");
    // A handler's own error code counts as "other"; unknown methods and
    // bad frames are method "other".
    assert_eq!((get("error", "requests"), get("error", "errors")), (4, 4), "{m}");
    assert_eq!(m["error"]["codes"], json!({"other": 4}), "{m}");
    assert_eq!((get("other", "requests"), get("other", "errors")), (10, 10), "{m}");
    assert_eq!(m["other"]["codes"], json!({"unknown_method": 7, "bad_json": 3}), "{m}");
    assert_eq!(m["pi"]["codes"], json!({"bad_params": 2}), "{m}");
    assert_eq!(get("ping", "total_requests"), 100);
    assert!(m.get("nosuch").is_none(), "a client cannot make a method appear: {m}");
    for name in ["ping", "echo"] {
        let (p50, p99) = (m[name]["p50_ms"].as_f64().unwrap(), m[name]["p99_ms"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 10_000.0, "{name}: p50 {p50} p99 {p99}");
    }
    // The table, and each worker's handler processes.
    let out = d.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Methods: last"), "{text}");
    let row = text.lines().find(|l| l.trim_start().starts_with("ping ")).unwrap_or_else(|| panic!("no ping row in {text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!((cols[1], cols[2], cols[5], cols[6]), ("100", "0", "100", "0"), "{row}");
    assert_eq!(d.handler_pids().len(), 2, "one py process per worker");
    for w in d.status()["workers"].as_array().unwrap() {
        assert_eq!(w["handlers"]["py"].as_array().map(|a| a.len()), Some(1), "{w}");
    }
}

#[test]
fn counts_survive_a_worker_sigkill_and_a_reload_exactly() {
    let mut d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let mut sent = 0u64;
    for _ in 0..5 {
        send_n(d.port, br#"{"in":"ping","params":null}"#, 100);
        sent += 100;
    }
    let before = total(&mut d, "ping");
    assert_eq!(before, sent);
    // SIGKILL a worker that has served (its counts are in shared memory).
    let pids = d.worker_pids();
    kill(pids[0], libc::SIGKILL);
    wait_for("the worker replaced", Duration::from_secs(20), || {
        let p = d.worker_pids();
        (p.len() == 2 && !p.contains(&pids[0])).then_some(())
    });
    assert_eq!(total(&mut d, "ping"), sent, "nothing lost with the killed worker");
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut last = total(&mut d, "ping");
    assert_eq!(last, sent, "nothing lost with the retired generation");
    for _ in 0..3 {
        send_n(d.port, br#"{"in":"ping","params":null}"#, 100);
        sent += 100;
        let now = total(&mut d, "ping");
        assert!(now >= last, "went back: {last} -> {now}");
        last = now;
    }
    assert_eq!(last, sent);
}

#[test]
fn a_slow_request_is_logged_once_with_method_duration_worker_and_peer() {
    let mut d = Daemon::start(handler_opts(1, "slow_request_ms = 150\n"));
    let mut s = connect(d.port);
    let local = s.local_addr().unwrap();
    assert_eq!(call(&mut s, &json!({"in": "sleep", "params": 0.3}))["out"], "slept");
    for _ in 0..20 {
        assert_eq!(call(&mut s, &json!({"in": "ping", "params": null}))["out"], "pong");
    }
    let worker = d.worker_pids()[0];
    let line = wait_for("the slow log line", Duration::from_secs(10), || d.log().lines().find(|l| l.contains("slow request")).map(String::from));
    assert!(line.contains("method sleep took"), "{line}");
    assert!(line.contains(&format!("worker {worker}")), "{line}");
    assert!(line.contains(&format!("peer {local}")), "{line}");
    let ms: f64 = line.split("took ").nth(1).and_then(|r| r.split(" ms").next()).and_then(|v| v.parse().ok()).expect("a duration");
    assert!((290.0..10_000.0).contains(&ms), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.log().matches("slow request").count(), 1, "once, and not for the fast pings:\n{}", d.log());
}

#[test]
fn a_bad_metrics_address_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for (value, want) in [("nonsense", "metrics.listen"), ("127.0.0.1:8001", "server.listen's address")] {
        let path = dir.path().join("rpcd.toml");
        std::fs::write(&path, format!("[server]\nlisten = \"127.0.0.1:8001\"\n[metrics]\nlisten = \"{value}\"\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rpcd")).arg("--check-config").arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{value}: {err}");
    }
}

#[test]
fn bad_scrapes_get_errors_and_the_endpoint_serves_on() {
    let mport = free_port();
    let mut d = Daemon::start(Opts { workers: 1, extra: format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"), ..Default::default() });
    let get = |req: &[u8]| -> String {
        let mut s = wait_for("the metrics port", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", mport)).ok());
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(req);
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut out);
        out
    };
    // A silent client and a half-sent request hold nothing up meanwhile.
    let mut silent = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    let mut half = TcpStream::connect(("127.0.0.1", mport)).unwrap();
    half.write_all(b"GET /metr").unwrap();
    assert!(get(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    assert!(get(b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
    assert!(get(b"hello\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let r = get(&big);
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 431 "), "{r}");
    let ok = get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200 ") && ok.contains("text/plain; version=0.0.4") && ok.contains("rpcd_up 1"), "{ok}");
    let om = get(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n");
    assert!(om.contains("application/openmetrics-text") && om.ends_with("# EOF\n"), "{om}");
    assert_eq!(d.status()["state"], "serving");
    // The silent ones are closed by the server after its read timeout.
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut out = String::new();
        let t = std::time::Instant::now();
        let _ = std::io::Read::read_to_string(s, &mut out);
        assert!(t.elapsed() < Duration::from_secs(14), "not closed by the server");
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 408 "), "{out}");
    }
}

/// One series' value in a plain scrape of `/metrics`.
fn series(port: u16, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).ok()?;
    out.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn zookeeper_registration_and_session_events_are_counted() {
    let mut z = ZkServer::start();
    let mport = free_port();
    let zk = format!("enabled = true\nhosts = \"{}\"\nroot = \"/obs\"\nsession_timeout_ms = 4000\n", z.hosts());
    let _d = Daemon::start(Opts { zookeeper: Some(zk), extra: format!("[metrics]\nlisten = \"127.0.0.1:{mport}\"\n"), ..Default::default() });
    wait_for("registered", Duration::from_secs(20), || (series(mport, "rpcd_zookeeper_registered") == Some(1.0)).then_some(()));
    assert_eq!(series(mport, "rpcd_zookeeper_session_events_total{event=\"connected\"}"), Some(1.0));
    // ZooKeeper goes away: the session is disconnected, and no longer registered.
    z.stop();
    wait_for("disconnected", Duration::from_secs(20), || {
        (series(mport, "rpcd_zookeeper_session_events_total{event=\"disconnected\"}") == Some(1.0)).then_some(())
    });
    assert_eq!(series(mport, "rpcd_zookeeper_registered"), Some(0.0));
}
