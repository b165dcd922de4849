//! Sockets passed by the service manager (SPEC §6): the listener and the
//! control socket go to the fd store; passed ones are adopted when they
//! match the config and closed (and removed from the store) when not; a
//! restart through the store refuses no connect. The test plays the
//! service manager's part here (it holds the stored descriptor and passes
//! it in LISTEN_FDS, as systemd does); packaging/e2e-systemd does the same
//! under the real systemd.
mod common;
use common::*;
use serde_json::json;
use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn local_tcp(fd: &OwnedFd) -> Option<std::net::SocketAddr> {
    socket2::SockRef::from(fd).local_addr().ok()?.as_socket()
}

fn is_listener(fd: &OwnedFd) -> bool {
    socket2::SockRef::from(fd).is_listener().unwrap_or(false)
}

#[test]
fn a_bound_listener_and_control_socket_go_to_the_fd_store() {
    let mut d = Daemon::start(Opts { workers: 1, fd_store: true, ..Default::default() });
    d.drain_notes();
    let listen: Vec<&OwnedFd> = d.stored.iter().filter(|(n, _)| n == "listen").map(|(_, fd)| fd).collect();
    assert_eq!(listen.len(), 1, "one FDSTORE=1 FDNAME=listen: {:?}", d.notes);
    assert_eq!(local_tcp(listen[0]), Some(format!("127.0.0.1:{}", d.port).parse().unwrap()));
    assert!(is_listener(listen[0]));
    let control: Vec<&OwnedFd> = d.stored.iter().filter(|(n, _)| n == "control").map(|(_, fd)| fd).collect();
    assert_eq!(control.len(), 1, "{:?}", d.notes);
    let path = socket2::SockRef::from(control[0]).local_addr().unwrap().as_pathname().map(|p| p.to_path_buf());
    assert_eq!(path.as_deref(), Some(d.socket.as_path()));
    assert_eq!(d.status()["listener"], "bound");
    let out = d.ctl(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("Listen: 127.0.0.1:{} (bound)", d.port)), "{out:?}");
}

#[test]
fn a_passed_listener_is_adopted_instead_of_bound() {
    for (name, origin) in [("listen", "fd store"), ("rpcd.socket", "socket activation")] {
        // We keep our copy: had rpcd tried to bind the port, it would have
        // failed (EADDRINUSE), so serving proves it adopted the socket.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut d = Daemon::start(Opts { workers: 2, port: Some(port), passed: vec![(l.as_raw_fd(), name.into())], ..Default::default() });
        let mut s = connect(port);
        assert_eq!(call(&mut s, &json!({"in": "ping", "params": name}))["result"], name);
        assert_eq!(d.status()["listener"], origin);
        d.drain_notes();
        assert!(!d.stored.iter().any(|(n, _)| n == "listen"), "an adopted listener is not stored again: {:?}", d.notes);
        assert!(d.log().contains(&format!("listening on 127.0.0.1:{port} ({origin})")), "{}", d.log());
        drop(s);
        kill(d.pid, libc::SIGTERM);
        assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
        // Our copy still listens: rpcd closed only its own.
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    }
}

#[test]
fn passed_descriptors_that_do_not_match_are_closed_and_removed_from_the_store() {
    let stale = TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_port = stale.local_addr().unwrap().port();
    let fd: OwnedFd = stale.into();
    let mut d = Daemon::start(Opts { workers: 1, passed: vec![(fd.as_raw_fd(), "old".into())], fd_store: true, ..Default::default() });
    drop(fd); // rpcd's copy is now the only one
    d.drain_notes();
    assert!(d.notes.iter().any(|n| n.contains("FDSTOREREMOVE=1") && n.lines().any(|l| l == "FDNAME=old")), "{:?}", d.notes);
    wait_for("the stale listener to be closed", Duration::from_secs(5), || {
        matches!(TcpStream::connect(("127.0.0.1", stale_port)), Err(e) if e.kind() == ErrorKind::ConnectionRefused).then_some(())
    });
    // It bound its own listener, and stored it.
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": 1}))["result"], 1);
    assert_eq!(d.status()["listener"], "bound");
    assert!(d.stored.iter().any(|(n, fd)| n == "listen" && local_tcp(fd).map(|a| a.port()) == Some(d.port)));
}

#[test]
fn a_restart_through_the_fd_store_refuses_no_connect() {
    let gap = Duration::from_millis(300);
    // The restart: the old instance stops, nothing listens for `gap`
    // (systemd's stop-to-start), then the new one starts with what the old
    // one stored.
    let mut a = Daemon::start(Opts { workers: 2, fd_store: true, ..Default::default() });
    let port = a.port;
    a.drain_notes();
    let (_, stored) = a.stored.iter().find(|(n, _)| n == "listen").expect("the listener was stored");
    let stored = stored.try_clone().unwrap();
    let mut b = None;
    let (ok, refused, failed, worst) = connects_during(port, || {
        kill(a.pid, libc::SIGTERM);
        assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
        std::thread::sleep(gap);
        b = Some(Daemon::start(Opts { workers: 2, port: Some(port), passed: vec![(stored.as_raw_fd(), "listen".into())], ..Default::default() }));
    });
    eprintln!("restart through the store: {ok} ok, {refused} refused, {} failed; worst {worst:?}", failed.len());
    assert_eq!(refused, 0);
    assert!(failed.is_empty(), "{failed:?}");
    assert!(ok > 50, "{ok}");
    assert!(worst >= gap / 2, "some connect waited out the gap in the backlog: worst {worst:?}");
    let mut b = b.unwrap();
    assert_eq!(b.status()["listener"], "fd store");
    // Nothing but B holds the listener now.
    drop(stored);
    a.stored.clear();

    // Negative control: the same restart without the store refuses.
    let port = b.port;
    let mut c = None;
    let (ok, refused, failed, _) = connects_during(port, || {
        kill(b.pid, libc::SIGTERM);
        assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(0));
        std::thread::sleep(gap);
        c = Some(Daemon::start(Opts { workers: 2, port: Some(port), ..Default::default() }));
    });
    assert_eq!(c.unwrap().status()["listener"], "bound");
    eprintln!("restart without the store: {ok} ok, {refused} refused, {} failed", failed.len());
    assert!(refused > 0, "the client must see refusals when nothing holds the listener");
}

/// A stop for a restart (`rpcctl stop --restart`; under systemd, SIGTERM
/// during a restart job) as the service manager sees it: returns once the
/// old instance has exited, with what it stored.
fn stop_for_restart(a: &mut Daemon) -> String {
    let (rpcctl, socket) = (env!("CARGO_BIN_EXE_rpcctl"), a.socket.clone());
    let ctl = std::thread::spawn(move || std::process::Command::new(rpcctl).arg("--socket").arg(socket).args(["stop", "--restart"]).output().unwrap());
    assert_eq!(a.wait_exit(Duration::from_secs(20)), Some(0), "log:\n{}", a.log());
    a.drain_notes();
    let out = ctl.join().unwrap();
    assert!(out.status.success(), "rpcctl stop --restart: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_restart_hands_persistent_connections_to_the_next_instance() {
    let clients = 12;
    let mut a = Daemon::start(Opts { workers: 2, fd_store: true, ..Default::default() });
    let port = a.port;
    let load = Persistent::start(port, clients);
    load.wait_progress(&vec![0; clients], 20);
    // A client in the middle of sending a frame when the restart comes: the
    // worker has read its first bytes (they go over in the state).
    let mut partial = connect(port);
    partial.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = frame(json!({"in": "ping", "params": "split"}).to_string().as_bytes());
    partial.write_all(&req[..9]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = load.counts();

    let out = stop_for_restart(&mut a);
    assert!(out.contains(&format!("handed over: {} connection(s)", clients + 1)), "{out}\nlog:\n{}", a.log());
    let names: Vec<String> = a.stored.iter().map(|(n, _)| n.clone()).collect();
    let conns = names.iter().filter(|n| n.starts_with("conn-")).count();
    assert_eq!(conns, clients + 1, "stored: {names:?}");
    assert!(names.contains(&"handover".to_string()) && names.contains(&"listen".to_string()), "stored: {names:?}");
    // systemd's stop-to-start gap.
    std::thread::sleep(Duration::from_millis(200));
    let passed: Vec<(i32, String)> = a.stored.iter().map(|(n, fd)| (fd.as_raw_fd(), n.clone())).collect();
    let mut b = Daemon::start(Opts { workers: 2, port: Some(port), passed, fd_store: true, ..Default::default() });
    // B owns the connections now: A's copies go, as systemd's do once B
    // removes them from the store.
    a.stored.clear();
    load.wait_progress(&before, 20);
    partial.write_all(&req[9..]).unwrap();
    assert_eq!(read_frame(&mut partial).map(|v| v["result"].clone()), Some(json!("split")), "the split frame was answered after the restart");
    let held: u64 = wait_for("B's workers to report the adopted connections", Duration::from_secs(10), || {
        let n: u64 = b.status()["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap()).sum();
        (n == clients as u64 + 1).then_some(n)
    });
    assert!(b.log().contains(&format!("adopting {} connection(s)", clients + 1)), "log:\n{}", b.log());
    // B removed them from the store (they are its workers' now).
    b.drain_notes();
    assert!(!b.stored.iter().any(|(n, _)| n.starts_with("conn-") || n == "handover"), "{:?}", b.notes);
    let results = load.finish();
    let worst = results.iter().map(|r| r.1).max().unwrap();
    eprintln!("restart with {held} persistent connections: {} pings, 0 failed, worst {worst:?}", results.iter().map(|r| r.0).sum::<u64>());
    for r in &results {
        assert_eq!(r.2, None, "a persistent client failed");
    }

    // Negative control: a plain stop does not hand them over, and the
    // clients see it (the generator can fail).
    let load = Persistent::start(port, 4);
    load.wait_progress(&[0; 4], 10);
    kill(b.pid, libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(20)), Some(0));
    let results = load.finish();
    assert!(results.iter().all(|r| r.2.is_some()), "every client of a stopped daemon must see its connection end: {results:?}");
}

/// `rpcctl servers --json` every 50 ms until stopped: (samples, empty
/// samples, the largest count seen).
struct DiscoveryPoll {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64, usize)>,
}

impl DiscoveryPoll {
    fn start(hosts: String, root: &'static str) -> DiscoveryPoll {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut empty, mut most) = (0, 0, 0);
            let end = Instant::now() + Duration::from_secs(60);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                let out = std::process::Command::new(env!("CARGO_BIN_EXE_rpcctl")).args(["servers", "--zk", &hosts, "--root", root, "--json"]).output().unwrap();
                if out.status.success() {
                    let n = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
                    samples += 1;
                    empty += u64::from(n == 0);
                    most = most.max(n);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, empty, most)
        });
        DiscoveryPoll { stop, thread }
    }

    fn finish(self) -> (u64, u64, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn a_restart_keeps_the_daemon_discoverable_and_ends_with_one_node() {
    let z = ZkServer::start();
    let root = "/restarts";
    let zk = format!("enabled = true\nhosts = \"{}\"\nroot = \"{root}\"\nsession_timeout_ms = 6000\nderegister_delay_ms = 200", z.hosts());
    let mut a = Daemon::start(Opts { workers: 1, zookeeper: Some(zk.clone()), fd_store: true, ..Default::default() });
    let port = a.port;
    let node_a = wait_for("A registered", Duration::from_secs(20), || a.status()["zookeeper"]["node"].as_str().map(String::from));
    // The registration memfd went into the store with the node's path.
    wait_for("the registration in the store", Duration::from_secs(5), || {
        a.drain_notes();
        a.stored.iter().any(|(n, _)| n == "zk").then_some(())
    });
    let poll = DiscoveryPoll::start(z.hosts(), root);
    std::thread::sleep(Duration::from_millis(300));
    stop_for_restart(&mut a);
    // Make-before-break: the old instance is gone, its node is not.
    let nodes: Vec<String> = z.children(root).into_iter().map(|(p, _)| p).collect();
    assert_eq!(nodes, vec![node_a.clone()], "the node outlives the instance that stopped for the restart");
    std::thread::sleep(Duration::from_millis(200));
    let passed: Vec<(i32, String)> = a.stored.iter().map(|(n, fd)| (fd.as_raw_fd(), n.clone())).collect();
    let mut b = Daemon::start(Opts { workers: 1, port: Some(port), zookeeper: Some(zk), passed, fd_store: true, ..Default::default() });
    a.stored.clear();
    let node_b = wait_for("B registered", Duration::from_secs(20), || b.status()["zookeeper"]["node"].as_str().map(String::from));
    assert_ne!(node_a, node_b);
    let left = wait_for("one node, B's", Duration::from_secs(4), || {
        let nodes = z.children(root);
        (nodes.len() == 1).then_some(nodes)
    });
    assert_eq!(left[0].0, node_b);
    assert_eq!(left[0].1["pid"], json!(b.pid));
    assert!(b.log().contains(&format!("deleted {node_a}, the previous instance's node")), "log:\n{}", b.log());
    std::thread::sleep(Duration::from_millis(200));
    let (samples, empty, most) = poll.finish();
    eprintln!("discovery through a restart: {samples} samples, {empty} empty, at most {most} node(s)");
    assert!(samples >= 5, "{samples}");
    assert_eq!(empty, 0, "discovery was empty during the restart");

    // Negative control: a plain stop deregisters, and the poll sees it.
    let poll = DiscoveryPoll::start(z.hosts(), root);
    std::thread::sleep(Duration::from_millis(300));
    kill(b.pid, libc::SIGTERM);
    assert_eq!(b.wait_exit(Duration::from_secs(20)), Some(0));
    std::thread::sleep(Duration::from_millis(300));
    let (_, empty, _) = poll.finish();
    assert!(empty > 0, "the poll must see an empty discovery after a stop");
}
