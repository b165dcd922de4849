//! Soak: client load through the project's client while daemons reload, lose
//! workers to SIGKILL and ZooKeeper restarts. Bounded by RPCD_SOAK_SECS
//! (default 60). Asserts zero failed calls, no zombie, and the same number
//! of descriptors in masters and workers before and after.
mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fd_profile(d: &mut Daemon) -> (usize, Vec<usize>) {
    let ws = d.wait_serving(2);
    let mut w: Vec<usize> = ws.iter().map(|p| open_fds(*p)).collect();
    w.sort();
    (open_fds(d.pid), w)
}

#[test]
fn soak_load_reloads_kills_and_a_zookeeper_restart() {
    if !zk_available() {
        panic!("ZooKeeper is not installed; run scripts/install-test-deps");
    }
    let secs: u64 = std::env::var("RPCD_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let mut zk = ZkServer::start();
    let zkcfg = format!(
        "enabled = true\nhosts = \"{}\"\nroot = \"/soak\"\nsession_timeout_ms = 8000\nderegister_delay_ms = 300\nmax_retry_delay_ms = 500",
        zk.hosts()
    );
    let mut a = Daemon::start(Opts { workers: 2, zookeeper: Some(zkcfg.clone()), ..Default::default() });
    let mut b = Daemon::start(Opts { workers: 2, zookeeper: Some(zkcfg.clone()), ..Default::default() });
    wait_for("both registered", Duration::from_secs(30), || (zk.children("/soak").len() == 2).then_some(()));
    let fds_a = fd_profile(&mut a);
    let fds_b = fd_profile(&mut b);

    let interval = 0.005;
    let count = ((secs as f64) / (interval + 0.002)) as u64;
    let out_path = a.dir.path().join("load.out");
    let mut load = Command::new(RPCCTL)
        .args(["call", "ping", "\"soak\"", "--zk", &zk.hosts(), "--root", "/soak", "--count", &count.to_string()])
        .args(["--interval", &interval.to_string(), "--timeout", "20"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let load_pid = load.id() as i32;
    let start = Instant::now();
    let mut step = 0u32;
    let mut zk_restarted = false;
    let mut actions = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(3));
        step += 1;
        match step % 4 {
            0 => {
                let out = a.ctl(&["reload"]);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                actions.push("reload A");
            }
            1 => {
                let ws = b.wait_serving(2);
                kill(ws[0], libc::SIGKILL);
                actions.push("kill -9 a worker of B");
            }
            2 if !zk_restarted && start.elapsed() > Duration::from_secs(secs / 3) => {
                zk.restart();
                zk_restarted = true;
                actions.push("restart ZooKeeper");
            }
            _ => {
                kill(b.pid, libc::SIGHUP);
                actions.push("SIGHUP B");
            }
        }
    }
    let status = wait_for("the load to finish", Duration::from_secs(secs * 3 + 60), || load.try_wait().unwrap());
    let out = std::fs::read_to_string(&out_path).unwrap();
    let ok = out.lines().filter(|l| l.contains(" pong ")).count();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("FAILED")).collect();
    println!("soak: {secs}s, {ok} calls answered, {} failed; actions: {actions:?}", failed.len());
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(status.success());
    assert_eq!(ok as u64, count);
    assert!(zk_restarted || secs < 12);
    assert!(!alive(load_pid));

    // Settled: one node each, no zombie, descriptors as before.
    wait_for("one node per daemon", Duration::from_secs(30), || (zk.children("/soak").len() == 2).then_some(()));
    for d in [&mut a, &mut b] {
        d.wait_serving(2);
        for k in children(d.pid) {
            assert_ne!(proc_state(k), Some('Z'), "zombie {k}");
        }
    }
    wait_for("master and worker descriptors as before", Duration::from_secs(20), || {
        (fd_profile(&mut a) == fds_a && fd_profile(&mut b) == fds_b).then_some(())
    });
}
