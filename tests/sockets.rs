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
use std::sync::{Arc, Mutex};
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

/// Clients opening a fresh connection for each ping, every 2 ms, while
/// `restart` runs: (ok, refused, other failures, worst latency).
fn connects_during(port: u16, restart: impl FnOnce()) -> (u64, u64, Vec<String>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new((0u64, 0u64, Vec::<String>::new(), Duration::ZERO)));
    let mut threads = Vec::new();
    for t in 0..2 {
        let (stop, tally) = (stop.clone(), tally.clone());
        threads.push(std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(30);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                i += 1;
                let t0 = Instant::now();
                let r = (|| -> Result<(), (bool, String)> {
                    let mut c = TcpStream::connect(("127.0.0.1", port)).map_err(|e| (e.kind() == ErrorKind::ConnectionRefused, format!("connect: {e}")))?;
                    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let p = json!([t, i]);
                    c.write_all(&frame(json!({"in": "ping", "params": p}).to_string().as_bytes())).map_err(|e| (false, format!("write: {e}")))?;
                    match read_frame(&mut c) {
                        Some(v) if v["result"] == p => Ok(()),
                        Some(v) => Err((false, format!("reply {v}"))),
                        None => Err((false, "closed before the reply".into())),
                    }
                })();
                let took = t0.elapsed();
                let mut g = tally.lock().unwrap();
                g.3 = g.3.max(took);
                match r {
                    Ok(()) => g.0 += 1,
                    Err((true, _)) => g.1 += 1,
                    Err((false, e)) => g.2.push(e),
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(2));
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(200));
    restart();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let g = tally.lock().unwrap();
    (g.0, g.1, g.2.clone(), g.3)
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
