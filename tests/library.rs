//! The Rust library API: examples/custom_daemon.rs is a daemon of its own
//! built on the rpcd crate, with typed sync and async methods in-process.
//! Its workers are itself run with --worker, so they serve its methods.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::Command;
use std::time::Duration;

fn daemon(extra: &str) -> Daemon {
    Daemon::start(Opts { workers: 2, extra: extra.into(), binary: Some(example_bin("custom_daemon")), ..Default::default() })
}

fn rpc(s: &mut std::net::TcpStream, method: &str, params: Value) -> Value {
    call(s, &json!({"in": method, "params": params}))
}

#[test]
fn a_daemon_built_on_the_library_serves_its_own_methods() {
    let mut d = daemon("[methods.sleep_ms]\ntimeout_ms = 300\n");
    let bin = example_bin("custom_daemon").canonicalize().unwrap();
    // The workers are the user's binary too.
    for w in d.worker_pids() {
        assert_eq!(std::fs::read_link(format!("/proc/{w}/exe")).unwrap(), bin, "worker {w}");
    }
    let mut s = connect(d.port);
    assert_eq!(rpc(&mut s, "add", json!([2, 3])), json!({"out": "sum", "result": 5}));
    assert_eq!(call(&mut s, &json!({"in": "add", "params": [1, 1], "id": [7]})), json!({"out": "sum", "result": 2, "id": [7]}));
    let v = rpc(&mut s, "add", json!([i64::MAX, 1]));
    assert_eq!(v["result"]["code"], "bad_params", "{v}");
    let v = rpc(&mut s, "add", json!("two and three"));
    assert_eq!(v["result"]["code"], "bad_params", "params that do not decode: {v}");
    assert_eq!(rpc(&mut s, "greet", json!({"name": "Ada"})), json!({"out": "greeting", "result": {"text": "Hello, Ada.", "length": 11}}));
    assert_eq!(rpc(&mut s, "greet", json!({"name": "ada", "shout": true}))["result"]["text"], "HELLO, ADA!");
    assert_eq!(rpc(&mut s, "divide", json!([1.0, 0.0]))["result"], json!({"code": "division_by_zero", "message": "divide: b must not be 0"}));
    assert_eq!(rpc(&mut s, "echo", json!({"any": [1, null]})), json!({"out": "pong", "result": {"any": [1, null]}}));
    // Async: answered later, and cut at its deadline (timeout_ms = 300).
    assert_eq!(rpc(&mut s, "sleep_ms", json!(20)), json!({"out": "slept", "result": 20}));
    let v = rpc(&mut s, "sleep_ms", json!(5000));
    assert_eq!(v["result"]["code"], "timeout", "{v}");
    // The built-ins are there, on the same API.
    assert_eq!(rpc(&mut s, "ping", json!(1)), json!({"out": "pong", "result": 1}));
    assert_eq!(rpc(&mut s, "pi", json!(0))["result"].as_f64().unwrap().to_bits(), 2.8284271247461903f64.to_bits());
    assert_eq!(rpc(&mut s, "nope", json!(1))["result"]["code"], "unknown_method");

    // Pipelined async and sync calls: replies in request order.
    let reqs = [
        json!({"in": "sleep_ms", "params": 150, "id": 1}),
        json!({"in": "add", "params": [1, 2], "id": 2}),
        json!({"in": "sleep_ms", "params": 10, "id": 3}),
        json!({"in": "ping", "params": "p", "id": 4}),
    ];
    let mut bytes = Vec::new();
    for r in &reqs {
        bytes.extend(frame(r.to_string().as_bytes()));
    }
    s.write_all(&bytes).unwrap();
    let ids: Vec<Value> = (0..4).map(|_| read_frame(&mut s).unwrap()["id"].clone()).collect();
    assert_eq!(ids, vec![json!(1), json!(2), json!(3), json!(4)]);
}

#[test]
fn the_library_daemon_checks_its_config_against_its_methods() {
    let bin = example_bin("custom_daemon");
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let p = dir.path().join("rpcd.toml");
        std::fs::write(&p, text).unwrap();
        let out = Command::new(&bin).arg("--check-config").arg("--config").arg(&p).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
    };
    let (code, out) = check("[handlers.h]\nexec = [\"/bin/true\"]\n[methods.add]\nhandler = \"h\"\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("methods.add.handler") && out.contains("defined twice"), "{out}");
    let (code, out) = check("[methods.add]\ntimeout_ms = 10\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("methods.add.timeout_ms"), "a synchronous method takes no timeout: {out}");
    let (code, out) = check("[methods.sleep_ms]\ntimeout_ms = 10\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("custom_daemon: configuration"), "named after the binary: {out}");
    // The rpcd binary itself knows none of these methods.
    let p = dir.path().join("rpcd.toml");
    std::fs::write(&p, "[methods.sleep_ms]\ntimeout_ms = 10\n").unwrap();
    let out = Command::new(RPCD).arg("--check-config").arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs handler"));
}

#[test]
fn reload_and_stop_work_for_a_library_daemon() {
    let mut d = daemon("");
    let before = d.worker_pids();
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let after = d.wait_serving(2);
    assert!(after.iter().all(|p| !before.contains(p)));
    let mut s = connect(d.port);
    assert_eq!(rpc(&mut s, "add", json!([40, 2]))["result"], 42);
    let out = d.ctl(&["stop"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}
