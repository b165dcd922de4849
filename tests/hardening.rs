//! Hostile clients and process faults: nothing may crash a worker, stall
//! other clients, leak a process or a descriptor, or lose a request.
mod common;
use common::*;
use serde_json::json;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn ping_ok(port: u16) -> bool {
    let mut s = connect(port);
    s.write_all(&frame(br#"{"in":"ping","params":"x"}"#)).is_ok() && read_frame(&mut s).is_some_and(|v| v["result"] == "x")
}

fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // fields after ')' start at field 3 (state); utime is 14, stime 15.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

#[test]
fn byte_at_a_time_sender_does_not_delay_others() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let w = d.wait_serving(1)[0];
    let port = d.port;
    let slow = std::thread::spawn(move || {
        let mut s = connect(port);
        let f = frame(br#"{"in":"ping","params":"slowly","id":1}"#);
        for b in &f {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(40));
        }
        read_frame(&mut s).unwrap()
    });
    // While the slow client dribbles (about 1.8 s), others are answered.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..20 {
        assert!(ping_ok(d.port));
    }
    assert!(!slow.is_finished(), "the slow frame is still being sent while others were served");
    let v = slow.join().unwrap();
    assert_eq!(v["result"], "slowly");
    assert_eq!(v["id"], 1);
    assert_eq!(d.wait_serving(1), vec![w], "same worker, never crashed");
}

#[test]
fn half_frames_zero_frames_huge_prefixes_and_garbage_never_crash_a_worker() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let w = d.wait_serving(1)[0];
    // Half-sent frames, then the client vanishes.
    for cut in [1usize, 3, 4, 10] {
        let mut s = connect(d.port);
        let f = frame(br#"{"in":"ping","params":"half"}"#);
        s.write_all(&f[..cut]).unwrap();
        drop(s);
    }
    // Zero-length frames: answered, connection usable.
    let mut s = connect(d.port);
    s.write_all(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    for _ in 0..2 {
        assert_eq!(read_frame(&mut s).unwrap()["result"]["code"], "bad_json");
    }
    assert_eq!(call(&mut s, &json!({"in":"ping","params":1}))["result"], 1);
    // Huge length prefixes.
    for len in [0x0010_0001u32, 0x7fff_ffff, 0xffff_ffff] {
        let mut s = connect(d.port);
        s.write_all(&len.to_le_bytes()).unwrap();
        assert_eq!(read_frame(&mut s).unwrap()["result"]["code"], "too_large");
        assert!(closed_by_peer(&mut s, Duration::from_secs(5)));
    }
    // Random garbage in frames.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut s = connect(d.port);
    for i in 0..300 {
        let n = (i * 7) % 200;
        let body: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        s.write_all(&frame(&body)).unwrap();
        let v = read_frame(&mut s).unwrap();
        assert_eq!(v["out"], "error", "{v}");
    }
    // Invalid UTF-8 and deep nesting.
    s.write_all(&frame(b"{\"in\":\"ping\",\"params\":\"\xc3\x28\"}")).unwrap();
    assert_eq!(read_frame(&mut s).unwrap()["result"]["code"], "bad_json");
    let deep = format!("{{\"in\":\"ping\",\"params\":{}{}}}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    s.write_all(&frame(deep.as_bytes())).unwrap();
    assert_eq!(read_frame(&mut s).unwrap()["result"]["code"], "bad_json");
    assert_eq!(call(&mut s, &json!({"in":"ping","params":"still here"}))["result"], "still here");
    assert_eq!(d.wait_serving(1), vec![w], "the worker never crashed");
}

#[test]
fn a_client_that_never_reads_is_cut_off_and_others_are_served() {
    let mut d = Daemon::start(Opts { workers: 1, extra_server: "write_timeout_secs = 2".into(), ..Default::default() });
    let w = d.wait_serving(1)[0];
    let mut hog = connect(d.port);
    // ~40 MB of replies that nobody reads: pipelined pings with a 4 KiB payload.
    let payload = "x".repeat(4000);
    let one = frame(json!({"in":"ping","params":payload}).to_string().as_bytes());
    let mut batch = Vec::new();
    for _ in 0..64 {
        batch.extend_from_slice(&one);
    }
    hog.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut sent = 0;
    for _ in 0..160 {
        if hog.write_all(&batch).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 0);
    // Other clients are answered meanwhile.
    for _ in 0..10 {
        assert!(ping_ok(d.port));
    }
    // The hog is disconnected after the write timeout, and the worker's
    // memory is given back: its connection count returns to 1 (ours) or 0.
    wait_for("the hog to be dropped", Duration::from_secs(20), || {
        let v = d.status();
        (v["workers"][0]["connections"].as_u64() == Some(0)).then_some(())
    });
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{w}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(rss_kb < 64 * 1024, "worker RSS {rss_kb} kB after the hog");
    assert!(ping_ok(d.port));
    assert_eq!(d.wait_serving(1), vec![w]);
}

#[test]
fn idle_connections_are_closed() {
    let d = Daemon::start(Opts { workers: 1, extra_server: "idle_timeout_secs = 1".into(), ..Default::default() });
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &json!({"in":"ping","params":1}))["result"], 1);
    let t = Instant::now();
    assert!(closed_by_peer(&mut s, Duration::from_secs(10)));
    assert!(t.elapsed() >= Duration::from_millis(800), "not before the idle timeout");
    // A half-sent frame is idle too (slowloris).
    let mut s = connect(d.port);
    s.write_all(&[10, 0, 0, 0, b'{']).unwrap();
    assert!(closed_by_peer(&mut s, Duration::from_secs(10)));
}

#[test]
fn connection_flood_to_fd_exhaustion_backs_off_and_recovers() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let w = d.wait_serving(1)[0];
    // The worker may hold only 40 descriptors.
    let st = std::process::Command::new("prlimit").arg(format!("--pid={w}")).arg("--nofile=40:40").status().unwrap();
    assert!(st.success());
    let mut flood: Vec<TcpStream> = Vec::new();
    for _ in 0..120 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", d.port)) {
            flood.push(s);
        }
    }
    // The worker is out of descriptors now: it must back off, not spin.
    wait_for("accept errors to be logged", Duration::from_secs(10), || d.log().contains("accept failed").then_some(()));
    let before = cpu_ticks(w);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(w) - before;
    assert!(used < 100, "worker used {used} ticks (1/100 s) in 3 s while out of descriptors: spinning");
    drop(flood);
    // It recovers by itself.
    wait_for("service after the flood", Duration::from_secs(15), || ping_ok(d.port).then_some(()));
    assert_eq!(d.wait_serving(1), vec![w], "same worker, never crashed");
}

#[test]
fn a_hundred_sighups_in_a_second_coalesce() {
    let mut d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let master_fds = open_fds(d.pid);
    let gen0 = d.status()["generation"].as_u64().unwrap();
    let t = Instant::now();
    // A burst: pending signals of one kind merge, and reloads that arrive
    // while one runs are coalesced into one more.
    for _ in 0..100 {
        kill(d.pid, libc::SIGHUP);
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    // Settles in one consistent, newer generation with 2 serving workers.
    // (A status answered before the master has seen the first SIGHUP still
    // shows the first generation: that is not settled yet.)
    let v = wait_for("reloads to settle", Duration::from_secs(60), || {
        let v = d.status();
        let ws = v["workers"].as_array().unwrap();
        let g = v["generation"].as_u64().unwrap();
        let settled = g > gen0
            && v["state"] == "serving"
            && ws.len() == 2
            && ws.iter().all(|w| w["state"] == "serving" && w["generation"].as_u64() == Some(g));
        settled.then_some(v)
    });
    let gens = v["generation"].as_u64().unwrap() - gen0;
    assert!(gens >= 1 && gens < 100, "reloads coalesced: {gens} generations for 100 SIGHUPs");
    // No zombie, no stray child, no leaked descriptor in the master.
    let kids = children(d.pid);
    assert_eq!(kids.len(), 2, "{kids:?}");
    for k in kids {
        assert_ne!(proc_state(k), Some('Z'));
    }
    assert!(ping_ok(d.port));
    wait_for("master fds back to the start", Duration::from_secs(10), || (open_fds(d.pid) == master_fds).then_some(()));
}

#[test]
fn worker_crashes_leak_no_descriptors_in_the_master() {
    let mut d = Daemon::start(Opts { workers: 2, ..Default::default() });
    d.wait_serving(2);
    let before = open_fds(d.pid);
    for _ in 0..5 {
        let ws = d.wait_serving(2);
        kill(ws[0], libc::SIGKILL);
        wait_for("replacement", Duration::from_secs(20), || {
            let now = d.wait_serving(2);
            (!now.contains(&ws[0])).then_some(())
        });
    }
    wait_for("master fds back to the start", Duration::from_secs(10), || (open_fds(d.pid) == before).then_some(()));
}
