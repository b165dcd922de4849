//! User-defined methods served by handler processes (SPEC §7): real rpcd,
//! real Python handler processes (tests/fixtures/raw_handler.py speaks the
//! channel protocol itself, so that it can also break it), real signals.
mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RAW: &str = include_str!("fixtures/raw_handler.py");
/// What the raw handler answers (each name routed to its pool).
const RAW_METHODS: &[&str] = &[
    "echo", "info", "version", "warm", "sleep", "crash", "garbage", "oversized", "unknown_id", "bad_out", "error", "flood", "grow",
    "spawn_child", "hang_hard", "print",
];

/// `[handlers.NAME]` running the raw handler (the script in the daemon's dir).
fn pool(name: &str, keys: &str) -> String {
    format!("[handlers.{name}]\nexec = [\"{PYTHON}\", \"{{dir}}/raw_handler.py\"]\ndir = \"{{dir}}\"\n{keys}\n\n")
}

/// `[methods.M]` for every raw handler method, routed to `pool`, with `keys`
/// (the `sleep` method gets `sleep_keys` instead when given).
fn routes(pool: &str, keys: &str) -> String {
    RAW_METHODS.iter().map(|m| format!("[methods.{m}]\nhandler = \"{pool}\"\n{keys}\n\n")).collect()
}

fn opts(workers: u32, extra: String) -> Opts {
    Opts { workers, extra, files: vec![("raw_handler.py".into(), RAW.into())], ..Default::default() }
}

fn rpc(s: &mut TcpStream, method: &str, params: Value) -> Value {
    call(s, &json!({"in": method, "params": params}))
}

fn code(v: &Value) -> String {
    assert_eq!(v["out"], "error", "{v}");
    v["result"]["code"].as_str().unwrap_or("").to_string()
}

fn message(v: &Value) -> String {
    v["result"]["message"].as_str().unwrap_or("").to_string()
}

fn pid_of(v: &Value) -> i32 {
    v["result"]["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}")) as i32
}

/// The PIDs of pool `name` in `status --json`.
fn pool_pids(d: &mut Daemon, name: &str) -> Vec<i32> {
    let mut p: Vec<i32> = d.handler_pids().into_iter().filter(|(_, n, _)| n == name).map(|(_, _, p)| p).collect();
    p.sort();
    p
}

fn wait_gone(pids: &[i32], within: Duration, what: &str) {
    wait_for(what, within, || pids.iter().all(|&p| !alive(p)).then_some(()));
}

#[test]
fn handler_methods_are_served_beside_the_builtins() {
    let extra = pool("raw", "processes = 2\nenv = { LANG = \"C.UTF-8\", MARK = \"yes\" }") + &routes("raw", "");
    let mut d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    assert_eq!(rpc(&mut s, "echo", json!({"a": [1, "x"]})), json!({"out": "pong", "result": {"a": [1, "x"]}}));
    // The client's id goes back on the reply; the handler never sees it.
    assert_eq!(call(&mut s, &json!({"in": "echo", "params": 5, "id": "mine"})), json!({"out": "pong", "result": 5, "id": "mine"}));
    // An error reply from the handler reaches the client as it is.
    assert_eq!(rpc(&mut s, "error", Value::Null), json!({"out": "error", "result": {"code": "my_code", "message": "as asked"}}));
    assert_eq!(code(&rpc(&mut s, "nope", Value::Null)), "unknown_method");
    // The built-ins are untouched.
    assert_eq!(rpc(&mut s, "ping", json!("p")), json!({"out": "pong", "result": "p"}));
    assert_eq!(rpc(&mut s, "pi", json!(0))["result"].as_f64().unwrap().to_bits(), 2.8284271247461903f64.to_bits());

    // The handler's world: its own process group, a child of the worker,
    // fd 3 and stdio only, stdin /dev/null, the configured environment only.
    let worker = d.worker_pids()[0];
    let listed = pool_pids(&mut d, "raw");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let info = rpc(&mut s, "info", Value::Null)["result"].clone();
        let pid = info["pid"].as_i64().unwrap() as i32;
        seen.insert(pid);
        assert!(listed.contains(&pid), "status lists {listed:?}, {pid} answered");
        assert_eq!(info["ppid"].as_i64().unwrap() as i32, worker, "{info}");
        assert_eq!(info["pgid"].as_i64().unwrap() as i32, pid, "its own process group: {info}");
        assert_eq!(info["fds"], json!([0, 1, 2, 3]), "{info}");
        assert_eq!(info["stdin"], "/dev/null");
        assert_eq!(info["cwd"].as_str().unwrap(), d.dir.path().to_str().unwrap());
        let env = info["env"].as_object().unwrap();
        let keys: BTreeSet<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["LANG", "MARK", "RPCD_FD", "RPCD_HANDLER", "RPCD_MAX_FRAME_BYTES"]), "{info}");
        assert_eq!(env["RPCD_FD"], "3");
        assert_eq!(env["RPCD_MAX_FRAME_BYTES"], "1048576");
        assert_eq!(env["RPCD_HANDLER"], "raw");
        let left = info["deadline_ms"].as_u64().unwrap();
        assert!(left > 0 && left <= 5000, "{info}");
    }
    assert!(!seen.is_empty());
    for p in &listed {
        assert_eq!(ppid(*p), Some(worker));
        assert_eq!(pgid(*p), Some(*p));
    }
    // rpcctl status shows them per worker.
    let out = d.ctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("raw: {} {}", listed[0], listed[1])), "{text}");
}

fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("raw_handler.py"), RAW).unwrap();
    let noexec = dir.path().join("noexec.py");
    std::fs::write(&noexec, "print(1)\n").unwrap();
    let p = dir.path().join("rpcd.toml");
    std::fs::write(&p, text.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
    let out = Command::new(RPCD).arg("--check-config").arg("--config").arg(&p).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn config_errors_name_the_key() {
    let base = pool("raw", "");
    let cases: Vec<(String, &str, &str)> = vec![
        (base.clone() + "[methods.add]\nhandler = \"nope\"\n", "methods.add.handler", "no [handlers.nope]"),
        (base.clone() + "[methods.add]\ntimeout_ms = 10\n", "methods.add", "needs handler"),
        ("[handlers.raw]\nexec = [\"{dir}/noexec.py\"]\n[methods.add]\nhandler = \"raw\"\n".into(), "handlers.raw.exec", "not executable"),
        ("[handlers.raw]\nexec = [\"/nonexistent/prog\"]\n".into(), "handlers.raw.exec", "No such file"),
        ("[handlers.raw]\nexec = []\n".into(), "handlers.raw.exec", "must name a program"),
        (base.clone() + "[methods.ping]\nhandler = \"raw\"\n", "methods.ping.handler", "defined twice"),
        (base.clone() + "[methods.pi]\nhandler = \"raw\"\n", "methods.pi.handler", "defined twice"),
        (base.clone() + "[methods.add]\nhandler = \"raw\"\n[methods.add]\nhandler = \"raw\"\n", "add", "duplicate"),
        (base.clone() + "[methods.add]\nhandler = \"raw\"\nmax_terms = 5\n", "methods.add.max_terms", "only the built-in method pi"),
        (base.clone() + "[methods.ping]\nqueue = 5\n", "methods.ping.queue", "handler methods only"),
        (pool("raw", "processes = 0"), "handlers.raw.processes", "between 1 and 256"),
        (pool("raw", "env = { RPCD_FD = \"4\" }"), "handlers.raw.env", "set by rpcd"),
        (pool("raw", "bogus = 1"), "bogus", "unknown key"),
        (pool("raw", "warmup = { method = \"ping\" }"), "warmup", "unknown key"),
        ("[handlers.raw]\nexec = [\"/bin/true\"]\ndir = \"relative\"\n".into(), "handlers.raw.dir", "absolute"),
    ];
    for (text, key, what) in cases {
        let (rc, out) = check_config(&text);
        assert_eq!(rc, 1, "{text}\n-> {out}");
        assert!(out.contains(key) && out.contains(what), "want `{key}` and `{what}` in: {out}\nfor:\n{text}");
        assert!(out.contains("rpcd.toml:"), "the error names the file and line: {out}");
    }
    // Valid, with a warning for a pool that serves nothing.
    let (rc, out) = check_config(&(base.clone() + &pool("idle", "")));
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("handlers.idle serves no method"), "{out}");
    let (rc, out) = check_config(&(base + "[methods.add]\nhandler = \"raw\"\ntimeout_ms = 100\nqueue = 3\n"));
    assert_eq!(rc, 0, "{out}");
}

#[test]
fn pipelined_calls_run_on_different_processes_and_replies_keep_their_order() {
    let extra = pool("raw", "processes = 4") + &routes("raw", "");
    let d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    // Seven requests in one write: four slow handler calls, with built-in
    // and quick handler calls between them.
    let reqs = [
        json!({"in": "sleep", "params": 0.5, "id": 1}),
        json!({"in": "ping", "params": "two", "id": 2}),
        json!({"in": "sleep", "params": 0.5, "id": 3}),
        json!({"in": "pi", "params": 10, "id": 4}),
        json!({"in": "sleep", "params": 0.5, "id": 5}),
        json!({"in": "nope", "params": null, "id": 6}),
        json!({"in": "sleep", "params": 0.5, "id": 7}),
        json!({"in": "echo", "params": "eight", "id": 8}),
    ];
    let mut bytes = Vec::new();
    for r in &reqs {
        bytes.extend(frame(r.to_string().as_bytes()));
    }
    s.write_all(&bytes).unwrap();
    let replies: Vec<Value> = (0..reqs.len()).map(|_| read_frame(&mut s).expect("a reply")).collect();
    let ids: Vec<i64> = replies.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>(), "replies in request order: {replies:?}");
    assert_eq!(replies[1]["result"], "two");
    assert_eq!(code(&replies[5]), "unknown_method");
    assert_eq!(replies[7]["result"], "eight");
    let slept: Vec<&Value> = [0, 2, 4, 6].iter().map(|&i| &replies[i]["result"]).collect();
    let pids: BTreeSet<i64> = slept.iter().map(|r| r["pid"].as_i64().unwrap()).collect();
    assert_eq!(pids.len(), 4, "four processes served the four slow calls: {slept:?}");
    // They ran at the same time: each started before any of them ended.
    let last_start = slept.iter().map(|r| r["start"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    let first_end = slept.iter().map(|r| r["end"].as_f64().unwrap()).fold(f64::MAX, f64::min);
    assert!(last_start < first_end, "the slow calls overlapped: {slept:?}");
}

#[test]
fn a_crash_mid_call_is_handler_failed_and_the_process_comes_back_with_backoff() {
    let extra = pool("raw", "processes = 1") + &routes("raw", "") + &pool("other", "processes = 1") + "[methods.b__echo]\nhandler = \"other\"\n";
    let mut d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    let mut other = connect(d.port);
    let first = pool_pids(&mut d, "raw");
    let v = rpc(&mut s, "crash", json!(3));
    assert_eq!(code(&v), "handler_failed", "{v}");
    assert!(message(&v).contains(&format!("[{}] exited with status 3", first[0])), "{v}");
    // Started again at once (first crash: no delay); other methods unharmed.
    assert_eq!(rpc(&mut other, "b__echo", json!(1))["result"], 1);
    assert_eq!(rpc(&mut s, "echo", json!(2))["result"], 2);
    let second = pool_pids(&mut d, "raw");
    assert_ne!(first, second);
    assert!(!alive(first[0]));
    // Crash it again and again: the restarts back off, and while it waits
    // the pool answers `unavailable` (retryable: the call did not run).
    let mut unavailable = None;
    for _ in 0..10 {
        let v = rpc(&mut s, "crash", json!(4));
        if v["out"] == "error" && code(&v) == "unavailable" {
            unavailable = Some(v);
            break;
        }
        assert_eq!(code(&v), "handler_failed", "{v}");
        let v = rpc(&mut s, "echo", json!("after"));
        if v["out"] == "error" {
            assert_eq!(code(&v), "unavailable", "{v}");
            unavailable = Some(v);
            break;
        }
    }
    let v = unavailable.expect("a call during the backoff gets `unavailable`");
    assert!(message(&v).contains("restarting"), "{v}");
    assert_eq!(rpc(&mut other, "b__echo", json!(3))["result"], 3, "the other pool kept serving");
    assert_eq!(rpc(&mut other, "ping", json!(4))["result"], 4);
    // It comes back after the backoff.
    wait_for("the handler back after its backoff", Duration::from_secs(10), || {
        (rpc(&mut s, "echo", json!("back"))["result"] == "back").then_some(())
    });
    let log = d.log();
    let delays: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split("starting it again in ").nth(1))
        .filter_map(|r| r.split('s').next()?.parse().ok())
        .collect();
    assert!(delays.len() >= 2 && delays[0] == 0.0 && delays.windows(2).all(|w| w[1] >= w[0]) && *delays.last().unwrap() >= 0.1, "backoff grew: {delays:?}\n{log}");
}

#[test]
fn a_call_past_its_deadline_is_timeout_and_its_process_group_is_killed_never_reused() {
    let quick: String = routes("raw", "timeout_ms = 400").replace("[methods.echo]\nhandler = \"raw\"\ntimeout_ms = 400", "[methods.echo]\nhandler = \"raw\"\ntimeout_ms = 10000");
    let extra = pool("raw", "processes = 1\nkill_grace_ms = 300") + &quick;
    let mut d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    let mut queued = connect(d.port);
    let mut other = connect(d.port);
    // The handler starts a child in its process group, then hangs.
    let c = rpc(&mut s, "spawn_child", Value::Null)["result"].clone();
    let (hpid, child) = (c["pid"].as_i64().unwrap() as i32, c["child"].as_i64().unwrap() as i32);
    assert!(alive(child));
    s.write_all(&frame(br#"{"in":"sleep","params":30}"#)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // A call queued behind it (the only process is busy) is not lost.
    queued.write_all(&frame(br#"{"in":"echo","params":"queued"}"#)).unwrap();
    let t = Instant::now();
    let v = read_frame(&mut s).unwrap();
    assert_eq!(code(&v), "timeout", "{v}");
    assert!(message(&v).contains(&format!("[{hpid}]")), "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "answered at its deadline, not when the handler gave up");
    assert_eq!(rpc(&mut other, "ping", json!(1))["result"], 1, "others unharmed");
    // SIGTERM to the whole group: the handler and its child go.
    wait_gone(&[hpid, child], Duration::from_secs(5), "the timed-out handler and its child");
    let v = read_frame(&mut queued).unwrap();
    assert_eq!(v["result"], "queued", "the queued call ran on the replacement: {v}");
    let now = pool_pids(&mut d, "raw");
    assert!(!now.contains(&hpid), "never reused: {now:?}");
    assert_eq!(pid_of(&rpc(&mut s, "info", Value::Null)), now[0]);

    // A handler that ignores SIGTERM gets SIGKILL after kill_grace_ms.
    let stubborn = now[0];
    let v = rpc(&mut s, "hang_hard", Value::Null);
    assert_eq!(code(&v), "timeout");
    wait_gone(&[stubborn], Duration::from_secs(5), "the SIGTERM-proof handler");
    let log = d.log();
    assert!(log.contains(&format!("handler raw[{stubborn}] is still running: SIGKILL")), "{log}");
    assert!(log.contains(&format!("handler raw[{stubborn}] killed by SIGKILL")), "{log}");
    assert_eq!(rpc(&mut s, "echo", json!("fine"))["result"], "fine");
}

#[test]
fn garbage_oversized_and_unknown_id_replies_are_handler_failed_and_the_process_replaced() {
    let extra = pool("raw", "processes = 2") + &routes("raw", "") + &pool("other", "processes = 1") + "[methods.b__echo]\nhandler = \"other\"\n";
    let mut d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    let mut other = connect(d.port);
    for (m, what) in [("garbage", "invalid reply"), ("oversized", "over max_frame_bytes"), ("unknown_id", "does not hold"), ("bad_out", "\"out\" is not a string")] {
        let before = pool_pids(&mut d, "raw");
        let v = rpc(&mut s, m, json!(7));
        assert_eq!(code(&v), "handler_failed", "{m}: {v}");
        assert!(message(&v).contains(what), "{m}: {v}");
        let culprit: i32 = message(&v).split('[').nth(1).and_then(|r| r.split(']').next()).and_then(|p| p.parse().ok()).unwrap();
        assert!(before.contains(&culprit));
        wait_gone(&[culprit], Duration::from_secs(5), "the handler that broke the protocol");
        assert_eq!(rpc(&mut other, "b__echo", json!(m))["result"], m, "other methods go on");
        assert_eq!(rpc(&mut other, "ping", json!(m))["result"], m);
        // The pool itself comes back (after a backoff once it keeps failing).
        wait_for("the pool serving again", Duration::from_secs(10), || (rpc(&mut s, "echo", json!(1))["result"] == 1).then_some(()));
    }
    // A client's frame over the limit is still the client's own too_large.
    assert_eq!(rpc(&mut other, "ping", json!("ok"))["result"], "ok");
}

#[test]
fn output_floods_are_logged_capped_rate_limited_and_never_block() {
    let extra = pool("raw", "processes = 1") + &routes("raw", "timeout_ms = 30000");
    let d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    let mut other = connect(d.port);
    assert_eq!(rpc(&mut s, "print", json!("hello"))["result"], "hello", "print() does not touch the channel");
    // A line of 100 KB.
    assert_eq!(rpc(&mut s, "flood", json!({"lines": 0, "long": 100000}))["result"], 0);
    let t = Instant::now();
    // 20,000 lines on each of stdout and stderr (~2.3 MB).
    let v = rpc(&mut s, "flood", json!({"lines": 20000, "width": 100}));
    assert_eq!(v["result"], 20000, "{v}");
    eprintln!("flood of 40,000 lines answered after {:?}", t.elapsed());
    assert_eq!(rpc(&mut other, "ping", json!(1))["result"], 1);
    // What was dropped is counted in the log within a second or so.
    wait_for("the count of lines not logged", Duration::from_secs(5), || d.log().contains("output line(s) not logged (over 100 lines/s)").then_some(()));
    let log = d.log();
    let out_lines = log.lines().filter(|l| l.contains("handler raw[") && l.contains(": out line ")).count();
    let err_lines = log.lines().filter(|l| l.contains("handler raw[") && l.contains(": err line ")).count();
    assert!(out_lines >= 100 && out_lines < 2000, "stdout lines logged: {out_lines}");
    assert!(err_lines >= 100 && err_lines < 2000, "stderr lines logged: {err_lines}");
    assert!(log.lines().any(|l| l.contains("warn: worker") && l.contains(": err line ")), "stderr is logged at warn");
    assert!(log.contains("printed hello"), "print() output is logged");
    let long = log.lines().find(|l| l.contains(": long yyy")).expect("the long line, capped");
    assert!(long.len() < 17 * 1024 && long.contains("[line truncated: "), "{}", &long[long.len() - 60..]);
    assert!(log.len() < 4 << 20, "log size {}", log.len());
}

#[test]
fn a_handler_that_cannot_be_execd_is_unavailable_and_a_reload_to_it_is_refused() {
    let extra = "[handlers.raw]\nexec = [\"{dir}/raw_handler.py\"]\nprocesses = 1\n".to_string() + &routes("raw", "");
    let mut d = Daemon::start(opts(1, extra));
    let mut s = connect(d.port);
    assert_eq!(rpc(&mut s, "echo", json!(1))["result"], 1);
    let script = d.dir.path().join("raw_handler.py");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Its process dies; the new one cannot be exec'd.
    let v = rpc(&mut s, "crash", json!(1));
    assert_eq!(code(&v), "handler_failed");
    let v = wait_for("unavailable", Duration::from_secs(5), || {
        let v = rpc(&mut s, "echo", json!(2));
        (v["out"] == "error").then_some(v)
    });
    assert_eq!(code(&v), "unavailable", "{v}");
    assert!(message(&v).contains("Permission denied"), "{v}");
    assert_eq!(rpc(&mut s, "ping", json!(3))["result"], 3, "built-ins unharmed");
    // A reload now is refused, with the reason, and changes nothing.
    let workers = d.worker_pids();
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("handlers.raw.exec") && err.contains("not executable"), "{err}");
    assert_eq!(d.worker_pids(), workers);
    // Executable again: the backoff's next try starts it.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    wait_for("the handler back", Duration::from_secs(40), || (rpc(&mut s, "echo", json!(4))["result"] == 4).then_some(()));
}

#[test]
fn a_handler_that_fails_at_start_fails_the_start_with_the_reason() {
    let script = RAW.replace("WARM_OK = True", "WARM_OK = False");
    let extra = pool("raw", "warmup = { in = \"warm\" }") + &routes("raw", "");
    let mut d = Daemon::start(Opts { wait_ready: false, files: vec![("raw_handler.py".into(), script)], ..opts(1, extra) });
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1));
    let log = d.log();
    assert!(log.contains("cannot start: handler raw: warmup answered an error") && log.contains("warmup refused on purpose"), "{log}");
    assert!(!d.notes.iter().any(|n| n.lines().any(|l| l == "READY=1")), "never ready: {:?}", d.notes);
}

#[test]
fn max_rss_mb_and_max_requests_recycle_without_a_failed_call() {
    let extra = pool("raw", "processes = 1\nmax_rss_mb = 60") + &routes("raw", "") + &pool("counted", "processes = 2\nmax_requests = 20\nmax_requests_jitter = 5") + "[methods.b__info]\nhandler = \"counted\"\n";
    let mut d = Daemon::start(opts(1, extra));
    let port = d.port;
    let mut s = connect(port);
    let fat = pool_pids(&mut d, "raw")[0];
    assert!(rpc(&mut s, "grow", json!(80))["result"].as_i64().unwrap() >= 80);
    // Calls keep coming while it is replaced: none fails.
    let failed = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..4 {
        let (failed, ok) = (failed.clone(), ok.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = connect(port);
            let mut pids = BTreeSet::new();
            let mut i = 0;
            while i < 250 {
                let m = if t % 2 == 0 { "echo" } else { "b__info" };
                let v = rpc(&mut c, m, json!(i));
                if v["out"] == "error" {
                    failed.lock().unwrap().push(v);
                } else {
                    ok.fetch_add(1, Ordering::SeqCst);
                    if m == "b__info" {
                        pids.insert(pid_of(&v));
                    }
                }
                i += 1;
            }
            pids
        }));
    }
    wait_for("the fat handler replaced", Duration::from_secs(10), || (!pool_pids(&mut d, "raw").contains(&fat)).then_some(()));
    wait_gone(&[fat], Duration::from_secs(5), "the recycled handler");
    let mut counted = BTreeSet::new();
    for t in threads {
        counted.extend(t.join().unwrap());
    }
    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let log = d.log();
    assert!(log.contains(&format!("handler raw[{fat}] RSS")) && log.contains("is over max_rss_mb = 60"), "{log}");
    assert!(log.contains(&format!("handler raw[{fat}] exited with status 0")), "drained and ended by EOF: {log}");
    let served = ok.load(Ordering::SeqCst);
    eprintln!("recycling: {served} calls ok, {} processes served b__info", counted.len());
    assert!(counted.len() >= 3, "max_requests = 20 (+0..5) recycled the counted pool: {counted:?} over {served} calls");
    let recycled = log.lines().filter(|l| l.contains("handler counted[") && l.contains("(max_requests): starting its replacement")).count();
    assert!(recycled >= 2, "{log}");
}

#[test]
fn a_full_queue_is_overloaded_and_a_call_that_waited_too_long_did_not_run() {
    let extra = pool("raw", "processes = 1")
        + "[methods.sleep]\nhandler = \"raw\"\nqueue = 1\ntimeout_ms = 5000\n\n[methods.b__sleep]\nhandler = \"raw\"\nqueue = 4\ntimeout_ms = 300\n\n[methods.echo]\nhandler = \"raw\"\n";
    let d = Daemon::start(opts(1, extra));
    let mut a = connect(d.port);
    let mut b = connect(d.port);
    let mut c = connect(d.port);
    let mut e = connect(d.port);
    a.write_all(&frame(br#"{"in":"sleep","params":1.0}"#)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    b.write_all(&frame(br#"{"in":"sleep","params":0.01}"#)).unwrap(); // waits: the queue is now full
    std::thread::sleep(Duration::from_millis(100));
    let v = rpc(&mut c, "sleep", json!(0.01));
    assert_eq!(code(&v), "overloaded", "{v}");
    // Another method's queue has room, but its deadline passes while it waits.
    let v = rpc(&mut e, "b__sleep", json!(0.01));
    assert_eq!(code(&v), "timeout", "{v}");
    assert!(message(&v).contains("did not run"), "{v}");
    assert_eq!(read_frame(&mut a).unwrap()["out"], "slept");
    assert_eq!(read_frame(&mut b).unwrap()["out"], "slept");
    assert_eq!(rpc(&mut c, "echo", json!("after"))["result"], "after");
}

#[test]
fn stop_drains_handler_calls_then_retires_and_reaps_every_handler() {
    let extra = pool("raw", "processes = 2") + &routes("raw", "");
    let mut d = Daemon::start(opts(2, extra));
    let handlers = d.handler_pids();
    assert_eq!(handlers.len(), 4, "{handlers:?}");
    let mut s = connect(d.port);
    s.write_all(&frame(br#"{"in":"sleep","params":1.0}"#)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = d.ctl(&["stop"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    // The call in flight was answered before the workers went.
    assert_eq!(read_frame(&mut s).unwrap()["out"], "slept");
    for (_, _, p) in &handlers {
        assert!(text.contains(&format!("handler raw {p} exited with status 0")), "{text}");
        assert!(!alive(*p));
    }
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_handler_that_ignores_eof_and_sigterm_is_killed_and_the_stop_still_completes() {
    let extra = pool("raw", "processes = 1\nkill_grace_ms = 300\nenv = { IGNORE_EOF = \"1\" }") + &routes("raw", "");
    let mut d = Daemon::start(opts(1, extra));
    let h = pool_pids(&mut d, "raw");
    let t = Instant::now();
    let out = d.ctl(&["stop"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains(&format!("handler raw {} killed by SIGKILL", h[0])), "{text}");
    eprintln!("stop with a stubborn handler took {:?}", t.elapsed());
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!alive(h[0]));
    let log = d.log();
    assert!(log.contains("is still running: SIGTERM") && log.contains("is still running: SIGKILL"), "{log}");
}

#[test]
fn sigkill_of_a_worker_or_the_master_leaves_no_handler_process() {
    let extra = pool("raw", "processes = 2") + &routes("raw", "");
    let mut d = Daemon::start(opts(2, extra));
    let mut s = connect(d.port);
    let c = rpc(&mut s, "spawn_child", Value::Null)["result"].clone();
    let (hpid, grandchild) = (c["pid"].as_i64().unwrap() as i32, c["child"].as_i64().unwrap() as i32);
    let all = d.handler_pids();
    let (worker, _, _) = *all.iter().find(|(_, _, p)| *p == hpid).unwrap();
    let its: Vec<i32> = all.iter().filter(|(w, _, _)| *w == worker).map(|(_, _, p)| *p).collect();
    kill(worker, libc::SIGKILL);
    let t = Instant::now();
    let mut gone = its.clone();
    gone.push(grandchild);
    wait_gone(&gone, Duration::from_secs(2), "the killed worker's handlers and their child");
    eprintln!("worker SIGKILL: {} handler processes and a grandchild gone after {:?}", its.len(), t.elapsed());
    // A new worker with new handlers takes its place.
    d.wait_serving(2);
    wait_for("four handlers again", Duration::from_secs(10), || (d.handler_pids().len() == 4).then_some(()));
    let now: Vec<i32> = d.handler_pids().into_iter().map(|(_, _, p)| p).collect();
    assert!(now.iter().all(|p| !its.contains(p)));
    // The master: everything goes with it.
    let workers = d.worker_pids();
    kill(d.pid, libc::SIGKILL);
    let t = Instant::now();
    let mut everything = now.clone();
    everything.extend(&workers);
    wait_gone(&everything, Duration::from_secs(2), "workers and handlers after the master's SIGKILL");
    eprintln!("master SIGKILL: {} workers and {} handlers gone after {:?}", workers.len(), now.len(), t.elapsed());
}

/// Sets `VERSION = n` (and WARM_OK) in the daemon's copy of the script.
fn rewrite_script(d: &Daemon, version: &str, warm_ok: bool) {
    let text = RAW.replace("VERSION = 1", &format!("VERSION = {version}")).replace("WARM_OK = True", if warm_ok { "WARM_OK = True" } else { "WARM_OK = False" });
    let p = d.dir.path().join("raw_handler.py");
    let tmp = d.dir.path().join("raw_handler.py.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

#[test]
fn reload_swaps_handler_code_under_load_with_no_failed_request() {
    let extra = pool("raw", "processes = 2\nwarmup = { in = \"warm\" }") + &routes("raw", "");
    let d = Daemon::start(opts(2, extra));
    let port = d.port;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Clients on fresh connections (no retry at all) ...
    for _ in 0..2 {
        let (stop, failures, ok) = (stop.clone(), failures.clone(), ok.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match (|| -> Result<Value, String> {
                    let mut c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    c.write_all(&frame(br#"{"in":"version","params":null}"#)).map_err(|e| format!("write: {e}"))?;
                    read_frame(&mut c).ok_or_else(|| "closed before the reply".to_string())
                })() {
                    Ok(v) if v["out"] == "v" => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(v) => failures.lock().unwrap().push(v.to_string()),
                    Err(e) => failures.lock().unwrap().push(e),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    // ... and rpcctl on one persistent connection, as a client of a
    // non-idempotent method (it retries only what provably did not run).
    let mut caller = Command::new(RPCCTL);
    caller.args(["call", "version", "--addr", &format!("127.0.0.1:{port}"), "--count", "600", "--interval", "0.005"]);
    let caller = std::thread::spawn(move || caller.output().unwrap());
    let mut versions_after = Vec::new();
    for v in 2..=4 {
        std::thread::sleep(Duration::from_millis(300));
        rewrite_script(&d, &v.to_string(), true);
        let out = d.ctl(&["reload"]);
        assert!(out.status.success(), "{out:?}");
        // From now on the new code answers, on any connection.
        for _ in 0..20 {
            let mut c = connect(port);
            versions_after.push((v, rpc(&mut c, "version", Value::Null)["result"].clone()));
        }
    }
    let out = caller.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let answered = stdout.lines().filter(|l| l.contains(" v ")).count();
    let failures = failures.lock().unwrap();
    eprintln!("3 reloads under load: fresh connections {} ok / {} failed; rpcctl {answered} ok of 600", ok.load(Ordering::SeqCst), failures.len());
    assert!(failures.is_empty(), "{failures:?}");
    assert!(out.status.success() && answered == 600, "{}", String::from_utf8_lossy(&out.stderr));
    for (want, got) in versions_after {
        assert_eq!(got, json!(want), "after the reload to version {want}");
    }
    assert!(ok.load(Ordering::SeqCst) > 100);
}

#[test]
fn a_new_handler_that_fails_its_warmup_fails_the_reload_and_the_old_one_keeps_serving() {
    let extra = pool("raw", "processes = 1\nwarmup = { in = \"warm\" }") + &routes("raw", "");
    let mut d = Daemon::start(opts(2, extra));
    let mut s = connect(d.port);
    let workers = d.worker_pids();
    let handlers = d.handler_pids();
    rewrite_script(&d, "2", false);
    let out = d.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("warmup answered an error") && err.contains("still serving generation 1"), "{err}");
    assert_eq!(d.worker_pids(), workers);
    assert_eq!(d.handler_pids(), handlers);
    assert_eq!(rpc(&mut s, "version", Value::Null)["result"], 1, "the old code still answers");
    // A script that does not even start: the same.
    let p = d.dir.path().join("raw_handler.py");
    std::fs::write(&p, "#!/usr/bin/python3\nraise SystemExit(7)\n").unwrap();
    let out = d.ctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(err.contains("exited with status 7 during warmup"), "{err}");
    assert_eq!(rpc(&mut s, "version", Value::Null)["result"], 1);
    // Fixed: the reload goes through, and the new code answers.
    rewrite_script(&d, "3", true);
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let mut s = connect(d.port);
    assert_eq!(rpc(&mut s, "version", Value::Null)["result"], 3);
}

/// The original server's handler methods, moved unchanged into a handler
/// file (tests/legacy/moved_handlers.py), served through rpcd and called by
/// a client framed like the original's: the same answers as the original
/// server (tests/legacy/original_server.py) gives.
#[test]
fn the_original_servers_handlers_moved_unchanged_answer_the_same() {
    let mut pythons = vec![PYTHON.to_string()];
    let py27 = "/root/.pyenv/versions/2.7.18/bin/python2.7";
    if std::path::Path::new(py27).exists() {
        pythons.push(py27.into());
    } else {
        eprintln!("note: no Python 2.7 here; the moved handlers run on {PYTHON} only");
    }
    let original_port = free_port();
    let mut original = Command::new(PYTHON)
        .args(["-W", "ignore", &format!("{TESTS}/legacy/original_server.py"), "127.0.0.1", &original_port.to_string(), "--processes", "2", "--no-zk", "--quiet"])
        .spawn()
        .unwrap();
    /// The original server and the processes it preforked.
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            for p in children(self.0) {
                kill(p, libc::SIGKILL);
            }
            kill(self.0, libc::SIGKILL);
        }
    }
    let guard = Kill(original.id() as i32);
    wait_for("the original server", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", original_port)).ok());
    let ask = |port: u16, calls: &[(&str, Value)]| -> String {
        let script = format!(
            "import sys, json, socket\nsys.path.insert(0, {tests:?} + '/')\nfrom interop_client import call\ns = socket.create_connection(('127.0.0.1', {port}), timeout=10)\nfor m, p in json.loads(sys.argv[1]):\n    r = call(s, m, p)\n    print(json.dumps([r['out'], r['result']], sort_keys=True))\n",
            tests = TESTS
        );
        let calls = serde_json::to_string(&calls.iter().map(|(m, p)| json!([m, p])).collect::<Vec<_>>()).unwrap();
        let out = Command::new(PYTHON).args(["-c", &script, &calls]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let params = [json!({"hello": "world", "n": [1, 2.5, null, true]}), json!("text"), json!(0), json!(1000), json!(12345)];
    let original_calls: Vec<(&str, Value)> =
        vec![("ping", params[0].clone()), ("ping", params[1].clone()), ("pi", params[2].clone()), ("pi", params[3].clone()), ("pi", params[4].clone())];
    let want = ask(original_port, &original_calls);
    assert_eq!(want.lines().count(), 5, "{want}");
    for py in &pythons {
        let extra = format!(
            "[handlers.legacy]\nexec = [\"{py}\", \"{TESTS}/legacy/moved_handlers.py\"]\nenv = {{ PYTHONPATH = \"{SHARE}\" }}\nprocesses = 2\nwarmup = {{ in = \"old_ping\" }}\n\n[methods.old_ping]\nhandler = \"legacy\"\n\n[methods.old_pi]\nhandler = \"legacy\"\n"
        );
        let d = Daemon::start(Opts { workers: 2, extra, ..Default::default() });
        let moved: Vec<(&str, Value)> = original_calls.iter().map(|(m, p)| (if *m == "ping" { "old_ping" } else { "old_pi" }, p.clone())).collect();
        assert_eq!(ask(d.port, &moved), want, "the moved handlers on {py} answer as the original does");
        // And rpcd's built-ins answer the original clients the same, too.
        assert_eq!(ask(d.port, &original_calls), want);
    }
    drop(guard);
    let _ = original.wait();
}
