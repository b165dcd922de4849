//! The daemon core: process model, wire protocol, signals, sd_notify, logging.
mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn ready_only_when_workers_accept_and_status_lists_real_children() {
    let mut d = Daemon::start(Opts { workers: 3, ..Default::default() });
    let ready = d.notes.iter().find(|n| n.lines().any(|l| l == "READY=1")).unwrap().clone();
    assert!(ready.contains(&format!("MAINPID={}", d.pid)), "{ready}");
    let pids = d.wait_serving(3);
    assert_eq!(pids.len(), 3);
    let mut kids = children(d.pid);
    kids.sort();
    let mut p = pids.clone();
    p.sort();
    assert_eq!(kids, p, "status must report the master's real children");
    // Every worker accepts: 30 fresh connections all get answers.
    for i in 0..30 {
        let mut s = connect(d.port);
        assert_eq!(call(&mut s, &json!({"in": "ping", "params": i}))["result"], i);
    }
    assert!(d.notes.iter().any(|n| n.contains("STATUS=")), "STATUS= lines: {:?}", d.notes);
}

#[test]
fn ping_and_pi_bytes_on_the_wire() {
    let d = Daemon::start(Opts::default());
    let mut s = connect(d.port);
    s.write_all(&frame(br#"{"in": "ping", "params": {"x": [1, 2.5, "\u00e9"]}, "id": "abc"}"#)).unwrap();
    let mut len = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut len).unwrap();
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    std::io::Read::read_exact(&mut s, &mut body).unwrap();
    assert_eq!(std::str::from_utf8(&body).unwrap(), r#"{"out":"pong","result":{"x": [1, 2.5, "\u00e9"]},"id":"abc"}"#);
    s.write_all(&frame(br#"{"in":"pi","params":0}"#)).unwrap();
    std::io::Read::read_exact(&mut s, &mut len).unwrap();
    let mut body = vec![0; u32::from_le_bytes(len) as usize];
    std::io::Read::read_exact(&mut s, &mut body).unwrap();
    assert_eq!(body, br#"{"out":"pi_r","result":2.8284271247461903}"#);
    let v = call(&mut s, &json!({"in": "pi", "params": 1000}));
    assert_eq!(v["result"].as_f64().unwrap().to_bits(), 3.1412746456267633f64.to_bits());
}

fn code(v: &Value) -> String {
    assert_eq!(v["out"], "error", "{v}");
    assert!(v["result"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v["result"]["code"].as_str().unwrap().to_string()
}

#[test]
fn every_error_code_and_the_connection_stays_usable() {
    let d = Daemon::start(Opts { workers: 1, extra: "[methods.pi]\nmax_terms = 1000\n".into(), ..Default::default() });
    let mut s = connect(d.port);
    let raw = |s: &mut std::net::TcpStream, b: &[u8]| {
        s.write_all(&frame(b)).unwrap();
        read_frame(s).unwrap()
    };
    assert_eq!(code(&raw(&mut s, b"{not json")), "bad_json");
    assert_eq!(code(&raw(&mut s, b"")), "bad_json");
    assert_eq!(code(&raw(&mut s, b"{\"in\":\"ping\",\"params\":\"\xff\xfe\"}")), "bad_json");
    assert_eq!(code(&raw(&mut s, b"[\"ping\", 1]")), "bad_request");
    assert_eq!(code(&raw(&mut s, br#"{"params": 1}"#)), "bad_request");
    assert_eq!(code(&raw(&mut s, br#"{"in": 7, "params": 1}"#)), "bad_request");
    assert_eq!(code(&raw(&mut s, br#"{"in": "ping"}"#)), "bad_request");
    assert_eq!(code(&raw(&mut s, br#"{"in": "nope", "params": 1}"#)), "unknown_method");
    assert_eq!(code(&raw(&mut s, br#"{"in": "pi", "params": -3}"#)), "bad_params");
    assert_eq!(code(&raw(&mut s, br#"{"in": "pi", "params": 2.5}"#)), "bad_params");
    assert_eq!(code(&raw(&mut s, br#"{"in": "pi", "params": 1001}"#)), "bad_params");
    let deep = format!("{{\"in\":\"ping\",\"params\":{}{}}}", "[".repeat(50_000), "]".repeat(50_000));
    assert_eq!(code(&raw(&mut s, deep.as_bytes())), "bad_json");
    // Still usable after all of these.
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": "ok"}))["result"], "ok");
    // too_large: a 0xFFFFFFFF prefix gets an answer and a close.
    let mut s2 = connect(d.port);
    s2.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    assert_eq!(code(&read_frame(&mut s2).unwrap()), "too_large");
    assert!(closed_by_peer(&mut s2, Duration::from_secs(5)));
    // The worker survived every one of them.
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": 1}))["result"], 1);
}

#[test]
fn overloaded_when_a_worker_is_full() {
    let d = Daemon::start(Opts { workers: 1, extra_server: "max_connections = 2".into(), ..Default::default() });
    let mut a = connect(d.port);
    let mut b = connect(d.port);
    assert_eq!(call(&mut a, &json!({"in": "ping", "params": 1}))["out"], "pong");
    assert_eq!(call(&mut b, &json!({"in": "ping", "params": 1}))["out"], "pong");
    let mut c = connect(d.port);
    assert_eq!(code(&read_frame(&mut c).unwrap()), "overloaded");
    assert!(closed_by_peer(&mut c, Duration::from_secs(5)));
    drop(a);
    // Room again.
    wait_for("a free connection slot", Duration::from_secs(5), || {
        let mut c = connect(d.port);
        c.write_all(&frame(br#"{"in":"ping","params":2}"#)).ok()?;
        let v = read_frame(&mut c)?;
        (v["out"] == "pong").then_some(())
    });
}

#[test]
fn shutting_down_for_requests_after_the_drain_began() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": 0}))["out"], "pong");
    // Half a frame is in; then the stop begins.
    let f = frame(br#"{"in":"ping","params":"in flight"}"#);
    s.write_all(&f[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    kill(d.pid, libc::SIGTERM);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    // The rest of that frame, and a new request behind it, in one write.
    let mut rest = f[10..].to_vec();
    rest.extend(frame(br#"{"in":"ping","params":"late"}"#));
    s.write_all(&rest).unwrap();
    let first = read_frame(&mut s).unwrap();
    assert_eq!(first["result"], "in flight", "the request already being received is answered");
    assert_eq!(code(&read_frame(&mut s).unwrap()), "shutting_down");
    assert!(closed_by_peer(&mut s, Duration::from_secs(5)));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_kept_alive_connection_answers_what_its_client_sends_as_the_drain_begins() {
    // A client on an idle kept-alive connection sends just as the drain
    // begins: it must get an answer (served, or `shutting_down`, which it
    // may retry elsewhere), never a close that leaves it unsure whether the
    // request ran. Then the connection closes.
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": 0}))["out"], "pong");
    kill(d.pid, libc::SIGTERM);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(20));
    let mut answers = Vec::new();
    for i in 0..100 {
        s.write_all(&frame(json!({"in": "ping", "params": i}).to_string().as_bytes())).unwrap();
        let v = read_frame(&mut s).unwrap_or_else(|| panic!("request {i} met a closed connection after {answers:?}"));
        let got = if v["out"] == "pong" { "pong".to_string() } else { code(&v).to_string() };
        answers.push(got.clone());
        if got != "pong" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(answers.last().map(String::as_str), Some("shutting_down"), "{answers:?}");
    assert!(closed_by_peer(&mut s, Duration::from_secs(5)));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn two_hundred_pipelined_requests_in_one_write() {
    let d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let mut s = connect(d.port);
    let mut batch = Vec::new();
    for i in 0..200 {
        let req = if i % 2 == 0 { json!({"in": "ping", "params": i, "id": i}) } else { json!({"in": "pi", "params": i, "id": i}) };
        batch.extend(frame(req.to_string().as_bytes()));
    }
    s.write_all(&batch).unwrap();
    for i in 0..200 {
        let v = read_frame(&mut s).unwrap();
        assert_eq!(v["id"], i, "answered in order");
        if i % 2 == 0 {
            assert_eq!(v["result"], i);
        } else {
            assert_eq!(v["out"], "pi_r");
        }
    }
}

#[test]
fn two_hundred_concurrent_connections() {
    let d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let mut conns: Vec<_> = (0..200).map(|_| connect(d.port)).collect();
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(&frame(json!({"in": "ping", "params": i}).to_string().as_bytes())).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(read_frame(s).unwrap()["result"], i);
    }
}

#[test]
fn killed_worker_is_reaped_and_replaced() {
    let mut d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let before = d.wait_serving(2);
    let victim = before[0];
    kill(victim, libc::SIGKILL);
    let after = wait_for("a replacement worker", Duration::from_secs(10), || {
        let v = d.status();
        let pids: Vec<i32> = v["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "serving").map(|w| w["pid"].as_i64().unwrap() as i32).collect();
        (pids.len() == 2 && !pids.contains(&victim)).then_some(pids)
    });
    assert!(after.contains(&before[1]));
    assert_eq!(proc_state(victim), None, "the killed worker must be reaped, not left a zombie");
    let v = d.status();
    let restarted = v["workers"].as_array().unwrap().iter().find(|w| !before.contains(&(w["pid"].as_i64().unwrap() as i32))).unwrap().clone();
    assert_eq!(restarted["restarts"], 1);
    assert!(d.log().contains(&format!("worker {victim} (slot")), "exit logged");
    assert!(d.log().contains("killed by SIGKILL"));
}

#[test]
fn crash_loop_backs_off() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let mut killed = std::collections::BTreeSet::new();
    let end = Instant::now() + Duration::from_secs(20);
    // Kill whatever worker exists, as soon as it exists: 6 workers. (One
    // killed but not yet reaped is still listed: count it once.)
    while killed.len() < 6 && Instant::now() < end {
        for p in children(d.pid) {
            kill(p, libc::SIGKILL);
            killed.insert(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(killed.len() >= 6);
    let v = d.status();
    let backoff = v["backoff"].as_array().unwrap();
    let restarts = backoff.first().map(|b| b["restarts"].as_u64().unwrap()).or_else(|| v["workers"][0]["restarts"].as_u64()).unwrap();
    assert!(restarts >= 5, "{v}");
    assert!(d.log().contains("respawning in 0.") || d.log().contains("respawning in 1.") || d.log().contains("respawning in 3."), "backoff grows: {}", d.log());
    // It recovers by itself.
    d.wait_serving(1);
}

#[test]
fn stopped_worker_is_replaced_after_heartbeat_timeout() {
    let mut d = Daemon::start(Opts {
        workers: 1,
        extra_server: "heartbeat_interval_ms = 200\nheartbeat_timeout_secs = 2".into(),
        ..Default::default()
    });
    let w = d.wait_serving(1)[0];
    kill(w, libc::SIGSTOP);
    let t = Instant::now();
    let new = wait_for("replacement of the stopped worker", Duration::from_secs(15), || {
        let p = d.wait_serving(1)[0];
        (p != w).then_some(p)
    });
    assert!(t.elapsed() >= Duration::from_millis(1500), "not before the timeout");
    assert_ne!(new, w);
    assert_eq!(proc_state(w), None, "the stopped worker is killed and reaped");
    assert!(d.log().contains("no heartbeat"));
}

#[test]
fn sigkilled_master_leaves_no_worker_and_frees_the_port() {
    let mut d = Daemon::start(Opts { workers: 3, ..Default::default() });
    let pids = d.wait_serving(3);
    kill(d.pid, libc::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(5));
    let t = Instant::now();
    wait_for("workers to die with the master", Duration::from_secs(2), || pids.iter().all(|&p| !alive(p)).then_some(()));
    assert!(t.elapsed() < Duration::from_secs(2));
    // The port can be bound again: nobody holds it.
    wait_for("the port to be free", Duration::from_secs(2), || std::net::TcpListener::bind(("127.0.0.1", d.port)).ok());
}

#[test]
fn sigterm_exits_zero_with_every_worker_reaped() {
    let mut d = Daemon::start(Opts { workers: 3, ..Default::default() });
    let pids = d.wait_serving(3);
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": 1}))["out"], "pong");
    kill(d.pid, libc::SIGTERM);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    // The idle connection is closed by the drain.
    assert!(closed_by_peer(&mut s, Duration::from_secs(5)));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    for p in &pids {
        assert_eq!(proc_state(*p), None, "worker {p} reaped");
    }
    let log = d.log();
    let line = log.lines().find(|l| l.contains("stopped: reaped worker(s)")).expect("reaped PIDs logged");
    for p in &pids {
        assert!(line.contains(&p.to_string()), "{line}");
    }
    assert!(!d.socket.exists(), "control socket removed");
}

#[test]
fn sigint_is_a_graceful_stop_too() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    kill(d.pid, libc::SIGINT);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn stuck_drain_is_sigkilled_after_the_graceful_timeout() {
    let mut d = Daemon::start(Opts { workers: 1, extra_server: "".into(), ..Default::default() });
    let w = d.wait_serving(1)[0];
    kill(w, libc::SIGSTOP); // it cannot drain
    let t = Instant::now();
    kill(d.pid, libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(15)), Some(0));
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(4), "waited for the graceful timeout (5s): {took:?}");
    assert_eq!(proc_state(w), None);
    assert!(d.log().contains("SIGKILL"));
}

#[test]
fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:1\"\nworkers = \"lots\"\n").unwrap();
    let out = Command::new(RPCD).arg("--check-config").arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3:") && err.contains("server.workers"), "{err}");
    std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:1\"\n[nonsense]\nx = 1\n").unwrap();
    let out = Command::new(RPCD).arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":3:") && err.contains("nonsense"), "{err}");
    std::fs::write(&p, "[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let out = Command::new(RPCD).arg("-t").arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(RPCD).arg("--config").arg(dir.path().join("missing.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn port_in_use_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.toml");
    std::fs::write(
        &p,
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\n[zookeeper]\nenabled = false\n[control]\nsocket = \"{}\"\n", dir.path().join("s").display()),
    )
    .unwrap();
    let out = Command::new(RPCD).arg("--config").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on 127.0.0.1:{port}")));
}

#[test]
fn watchdog_pings_when_requested() {
    let mut d = Daemon::start(Opts { workers: 1, watchdog_usec: Some(300_000), ..Default::default() });
    d.wait_note("WATCHDOG=1", Duration::from_secs(5));
    d.wait_note("WATCHDOG=1", Duration::from_secs(5));
}

#[test]
fn syslog_messages_arrive_on_a_unix_datagram_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("log.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut d = Daemon::start(Opts {
        workers: 1,
        log: Some(format!("target = \"syslog\"\nsyslog_socket = \"{}\"", sock_path.display())),
        ..Default::default()
    });
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end && !got.iter().any(|m: &String| m.contains("ready:")) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let ready = got.iter().find(|m| m.contains("ready:")).unwrap_or_else(|| panic!("no ready message via syslog: {got:?}"));
    // <30> = facility daemon (3) * 8 + info (6); ident rpcd with the PID.
    assert!(ready.starts_with("<30>"), "{ready}");
    assert!(ready.contains(&format!("rpcd[{}]", d.pid)), "{ready}");
    d.remember_workers();
}

#[test]
fn python_client_framing_like_the_original() {
    let d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop_client.py");
    let out = Command::new("python3").arg(script).arg("127.0.0.1").arg(d.port.to_string()).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("pong {'hello': 'world'}") || stdout.contains("pong {u'hello': u'world'}"), "{stdout}");
    assert!(stdout.contains("pi_r 2.8284271247461903"), "{stdout}");
    assert!(stdout.contains("pi_r 3.1412746456267633"), "{stdout}");
}

#[test]
fn a_second_sigterm_kills_the_remaining_workers_at_once() {
    let mut d = Daemon::start(Opts { workers: 1, extra_server: "graceful_timeout_secs = 30".into(), ..Default::default() });
    let w = d.wait_serving(1)[0];
    kill(w, libc::SIGSTOP); // it cannot drain
    kill(d.pid, libc::SIGTERM);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(d.pid), "still draining");
    let t = Instant::now();
    kill(d.pid, libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(proc_state(w), None);
    assert!(d.log().contains("second stop signal"));
}
