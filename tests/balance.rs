//! Scale: balanced workers and file-descriptor limits.
//!
//! Each worker's share of the open connections stays within ±20 % of the
//! mean, for a burst of new connections and for a slow trickle, with 2 and
//! 4 workers, and a pipelined load spreads its requests likewise. With
//! `RPCD_BALANCE=off` (the negative control) the same burst is not
//! balanced, so the check can fail. A daemon started with the soft limit a
//! service manager gives (1024) raises it to the hard limit, holds more
//! connections than 1024, and gives its handler processes 1024 back.

mod common;
use common::*;
use serde_json::{json, Value};
use std::net::TcpStream;
use std::time::Duration;

const RPCBENCH: &str = env!("CARGO_BIN_EXE_rpcbench");

/// The tests here run one at a time: each measures how work spreads over
/// processes that share the machine's cores, and the others' daemons and
/// clients would be part of what it measures.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn daemon(workers: u32, env: Vec<(String, String)>) -> Daemon {
    let mut d = Daemon::start(Opts {
        workers,
        extra_server: "heartbeat_interval_ms = 100\nmax_connections = 5000\n".into(),
        env,
        ..Default::default()
    });
    d.wait_serving(workers as usize);
    d
}

fn ping(s: &mut TcpStream, i: usize) {
    let r = call(s, &json!({"in": "ping", "params": i}));
    assert_eq!(r, json!({"out": "pong", "result": i}));
}

/// Each serving worker's open connections, once the status counts `total`.
fn shares(d: &mut Daemon, total: u64) -> Vec<u64> {
    wait_for(&format!("status to count {total} connections"), Duration::from_secs(20), || {
        let v = d.status();
        let c: Vec<u64> = v["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap()).collect();
        (c.iter().sum::<u64>() == total).then_some(c)
    })
}

/// Whether every value is within ±20 % of their mean.
fn balanced(c: &[u64]) -> bool {
    let mean = c.iter().sum::<u64>() as f64 / c.len() as f64;
    c.iter().all(|&x| (x as f64 - mean).abs() <= 0.2 * mean)
}

/// `n` connections opened as fast as the client can, then one ping each.
fn burst(port: u16, n: usize) -> Vec<TcpStream> {
    let mut v: Vec<TcpStream> = (0..n).map(|_| connect(port)).collect();
    for (i, s) in v.iter_mut().enumerate() {
        ping(s, i);
    }
    v
}

/// `n` connections, one every `gap`, each answering a ping before the next.
fn trickle(port: u16, n: usize, gap: Duration) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(port);
            ping(&mut s, i);
            std::thread::sleep(gap);
            s
        })
        .collect()
}

/// `what` (n connections opened by `open`) over 2 and then 4 workers: each
/// worker's share within ±20 % of the mean.
fn assert_balanced(what: &str, n: u64, open: impl Fn(u16) -> Vec<TcpStream>) {
    for workers in [2, 4] {
        let mut d = daemon(workers, vec![]);
        let held = open(d.port);
        let c = shares(&mut d, n);
        eprintln!("{what} over {workers} workers: {c:?}");
        assert!(balanced(&c), "{what} over {workers} workers: {c:?} is not within ±20 % of the mean");
        drop(held);
    }
}

#[test]
fn a_burst_of_connections_is_balanced_over_2_and_4_workers() {
    let _alone = alone();
    assert_balanced("burst of 400", 400, |port| burst(port, 400));
}

#[test]
fn a_trickle_of_connections_is_balanced_over_2_and_4_workers() {
    let _alone = alone();
    assert_balanced("trickle of 80", 80, |port| trickle(port, 80, Duration::from_millis(10)));
}

#[test]
fn without_the_board_connections_are_not_balanced() {
    let _alone = alone();
    // The negative control: the check above can fail.
    let mut d = daemon(4, vec![("RPCD_BALANCE".into(), "off".into())]);
    let held = trickle(d.port, 200, Duration::ZERO);
    let c = shares(&mut d, 200);
    eprintln!("200 connections over 4 workers, unbalanced: {c:?}");
    assert!(!balanced(&c), "with RPCD_BALANCE=off, 200 connections over 4 workers came out balanced: {c:?}");
    assert!(d.log().contains("RPCD_BALANCE=off"));
    drop(held);
}

#[test]
fn a_pipelined_load_spreads_its_requests() {
    let _alone = alone();
    let mut d = daemon(4, vec![]);
    let requests = |v: &Value| -> Vec<u64> { v["workers"].as_array().unwrap().iter().map(|w| w["requests"].as_u64().unwrap()).collect() };
    let before = requests(&d.status());
    let out = std::process::Command::new(RPCBENCH)
        .args(["--addr", &format!("127.0.0.1:{}", d.port), "--conns", "32", "--depth", "16", "--duration", "2", "--warmup", "0", "--kv"])
        .output()
        .unwrap();
    assert!(out.status.success(), "rpcbench: {}", String::from_utf8_lossy(&out.stderr));
    let kv = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(kv.contains("errors=0"), "rpcbench saw errors: {kv}");
    // The connections are closed now: the last heartbeats carry every request.
    let after = wait_for("the last heartbeats", Duration::from_secs(10), || {
        let v = d.status();
        let total: u64 = v["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap()).sum();
        (total == 0).then(|| requests(&v))
    });
    let done: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("requests per worker, 32 connections at depth 16: {done:?}");
    assert!(done.iter().sum::<u64>() > 1000, "{done:?}");
    assert!(balanced(&done), "requests per worker {done:?} are not within ±20 % of the mean");
}

fn limits(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

#[test]
fn a_soft_limit_of_1024_is_raised_and_handlers_get_it_back() {
    let _alone = alone();
    let hard = limits(std::process::id() as i32).1;
    assert!(hard >= 3000, "this test needs a hard RLIMIT_NOFILE of 3000 or more (have {hard})");
    // Started as a service manager would: soft 1024.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("rpcd-1024");
    std::fs::write(&wrapper, format!("#!/bin/sh\nulimit -Sn 1024 || exit 99\nexec {RPCD} \"$@\"\n")).unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let raw = include_str!("fixtures/raw_handler.py");
    let mut d = Daemon::start(Opts {
        workers: 1,
        binary: Some(wrapper),
        extra_server: "heartbeat_interval_ms = 100\nmax_connections = 2500\n".into(),
        extra: format!("[handlers.raw]\nexec = [\"{PYTHON}\", \"{{dir}}/raw_handler.py\"]\ndir = \"{{dir}}\"\nprocesses = 1\n\n[methods.echo]\nhandler = \"raw\"\n"),
        files: vec![("raw_handler.py".into(), raw.into())],
        ..Default::default()
    });
    let w = d.wait_serving(1)[0];
    assert_eq!(limits(d.pid), (hard, hard), "master");
    assert_eq!(limits(w), (hard, hard), "worker");
    let log = d.log();
    assert!(log.contains(&format!("RLIMIT_NOFILE soft {hard} (was 1024), hard {hard}")), "{log}");
    let handlers = d.handler_pids();
    assert_eq!(handlers.len(), 1, "{handlers:?}");
    assert_eq!(limits(handlers[0].2), (1024, hard), "a handler process gets the limit rpcd started with");
    // More connections than 1024 descriptors would allow, all answered.
    let held = burst(d.port, 2000);
    assert_eq!(shares(&mut d, 2000), vec![2000]);
    drop(held);
}

#[test]
fn check_config_says_when_the_limit_is_short() {
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let check = |max_connections: u32| {
        let cfg = dir.path().join("rpcd.toml");
        std::fs::write(
            &cfg,
            format!(
                "[server]\nlisten = \"127.0.0.1:1\"\nworkers = 4\nmax_connections = {max_connections}\n[zookeeper]\nenabled = false\n[control]\nsocket = \"{}/ctl.sock\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new("prlimit").arg("--nofile=1024:4096").arg(RPCD).arg("--check-config").arg("--config").arg(&cfg).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = check(10_000);
    assert!(
        err.contains("4 x 10000 = 40000 connections, plus 80 descriptors for rpcd itself, is 40080, over RLIMIT_NOFILE 4096"),
        "{err}"
    );
    assert!(err.contains("lower server.max_connections to 1004"), "{err}");
    // What it suggests fits: no warning.
    let err = check(1004);
    assert!(!err.contains("RLIMIT_NOFILE"), "{err}");
}
