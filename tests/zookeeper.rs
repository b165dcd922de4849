//! ZooKeeper registration and discovery against a real ZooKeeper: nodes and
//! their data, an original-style kazoo client, graceful stop under load,
//! outages, partitions, a 3-server ensemble, reloads that move the node, and
//! what `rpcctl servers` / `rpcctl status` report.
mod common;
use common::*;
use serde_json::Value;
use std::future::Future;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zookeeper_client as zk;

const SESSION_MS: u64 = 4000;

fn zk_section(hosts: &str, root: &str) -> String {
    zk_section_with(hosts, root, SESSION_MS, 300)
}

fn zk_section_with(hosts: &str, root: &str, session_ms: u64, deregister_ms: u64) -> String {
    format!("enabled = true\nhosts = \"{hosts}\"\nroot = \"{root}\"\nsession_timeout_ms = {session_ms}\nderegister_delay_ms = {deregister_ms}")
}

fn zk_daemon(hosts: &str, root: &str) -> Daemon {
    Daemon::start(Opts { zookeeper: Some(zk_section(hosts, root)), ..Default::default() })
}

fn opts(zookeeper: String) -> Opts {
    Opts { zookeeper: Some(zookeeper), ..Default::default() }
}

/// A node: full path, data (Null if not JSON), ephemeral owner.
#[derive(Debug, Clone)]
struct Node {
    path: String,
    data: Value,
    owner: i64,
}

/// A test-side ZooKeeper session on its own thread (a current-thread tokio
/// runtime that keeps pinging while the test thread waits).
struct ZkClient {
    handle: tokio::runtime::Handle,
    client: zk::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ZkClient {
    fn connect(hosts: &str) -> ZkClient {
        let (htx, hrx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            htx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stop_rx.await;
            });
        });
        let handle = hrx.recv().unwrap();
        let hosts = hosts.to_string();
        let client = run_on(&handle, async move {
            zk::Client::connector().with_session_timeout(Duration::from_secs(20)).connect(&hosts).await.expect("test client connects")
        });
        ZkClient { handle, client, stop: Some(stop_tx), thread: Some(thread) }
    }

    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        run_on(&self.handle, f)
    }

    fn nodes(&self, root: &str) -> Vec<Node> {
        let c = self.client.clone();
        let root = root.to_string();
        self.run(async move { list_nodes(&c, &root).await })
    }

    fn create(&self, path: &str, data: &[u8], mode: zk::CreateMode) -> String {
        let c = self.client.clone();
        let (path, data) = (path.to_string(), data.to_vec());
        self.run(async move {
            let (_, seq) = c.create(&path, &data, &mode.with_acls(zk::Acls::anyone_all())).await.expect("create");
            if seq.into_i64() >= 0 {
                format!("{path}{seq}")
            } else {
                path
            }
        })
    }

    fn mkdir(&self, path: &str) {
        let c = self.client.clone();
        let path = path.to_string();
        self.run(async move { c.mkdir(&path, &zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())).await.expect("mkdir") })
    }
}

impl Drop for ZkClient {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_on<T: Send + 'static>(h: &tokio::runtime::Handle, f: impl Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    h.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("ZooKeeper request answered within 30s")
}

async fn list_nodes(c: &zk::Client, root: &str) -> Vec<Node> {
    let kids = match c.list_children(root).await {
        Ok(k) => k,
        Err(zk::Error::NoNode) => vec![],
        Err(e) => panic!("list {root}: {e}"),
    };
    let mut out = Vec::new();
    for k in kids {
        let path = if root == "/" { format!("/{k}") } else { format!("{root}/{k}") };
        if let Ok((d, stat)) = c.get_data(&path).await {
            out.push(Node { path, data: serde_json::from_slice(&d).unwrap_or(Value::Null), owner: stat.ephemeral_owner });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Nodes of a root through a fresh session (for use right after ZooKeeper restarts).
fn fresh_nodes(hosts: &str, root: &str) -> Vec<Node> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = zk::Client::connector().with_session_timeout(Duration::from_secs(5)).connect(hosts).await.expect("connect to test ZooKeeper");
        list_nodes(&c, root).await
    })
}

fn pids_of(nodes: &[Node]) -> Vec<i64> {
    let mut p: Vec<i64> = nodes.iter().map(|n| n.data["pid"].as_i64().unwrap_or(-1)).collect();
    p.sort();
    p
}

fn sorted(mut v: Vec<i64>) -> Vec<i64> {
    v.sort();
    v
}

fn zk_status(d: &mut Daemon) -> (String, Option<String>) {
    let v = d.status();
    (v["zookeeper"]["state"].as_str().unwrap_or("?").to_string(), v["zookeeper"]["node"].as_str().map(String::from))
}

/// Waits until the daemon reports `registered` and returns its node path.
fn wait_registered(d: &mut Daemon, timeout: Duration) -> String {
    wait_for("zookeeper.state registered", timeout, || match zk_status(d) {
        (s, Some(n)) if s == "registered" => Some(n),
        _ => None,
    })
}

fn is_seq_node(path: &str, root: &str, prefix: &str) -> bool {
    let Some(rest) = path.strip_prefix(&format!("{root}/{prefix}")) else { return false };
    rest.len() == 10 && rest.bytes().all(|b| b.is_ascii_digit())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A child process ended by PID when dropped.
struct Proc(Option<Child>);

impl Proc {
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let c = self.0.as_mut().unwrap();
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.0 = None;
                return st;
            }
            assert!(Instant::now() < end, "child did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn running(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command with stdout/stderr in files, ended by PID after `timeout`.
fn run_logged(cmd: &mut Command, timeout: Duration) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .expect("spawn");
    let st = Proc(Some(child)).wait(timeout);
    (st, std::fs::read_to_string(&o).unwrap_or_default(), std::fs::read_to_string(&e).unwrap_or_default())
}

/// Runs rpcctl (ended by PID if it takes over a minute).
fn rpcctl(args: &[&str]) -> std::process::Output {
    let (status, stdout, stderr) = run_logged(Command::new(RPCCTL).args(args), Duration::from_secs(60));
    std::process::Output { status, stdout: stdout.into_bytes(), stderr: stderr.into_bytes() }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------

#[test]
fn two_daemons_register_with_their_data_and_status_and_servers_report_them() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    // Nine unrelated children first: the daemons get sequence numbers 9 and 10.
    let zc = ZkClient::connect(&hosts);
    zc.mkdir("/x/svc");
    for _ in 0..9 {
        zc.create("/x/svc/pad", b"", zk::CreateMode::PersistentSequential);
    }
    let before = unix_now();
    let mut a = zk_daemon(&hosts, "/x/svc");
    let mut b = zk_daemon(&hosts, "/x/svc");
    let na = wait_registered(&mut a, Duration::from_secs(30));
    let nb = wait_registered(&mut b, Duration::from_secs(30));
    assert_ne!(na, nb);

    let nodes: Vec<Node> = zc.nodes("/x/svc").into_iter().filter(|n| n.owner != 0).collect();
    assert_eq!(nodes.len(), 2, "two daemons, two nodes: {nodes:?}");
    for (d, path) in [(&a, &na), (&b, &nb)] {
        let n = nodes.iter().find(|n| &n.path == path).unwrap_or_else(|| panic!("status names {path}, ZooKeeper has {nodes:?}"));
        assert!(is_seq_node(&n.path, "/x/svc", "rpc"), "EPHEMERAL_SEQUENTIAL name: {}", n.path);
        assert_ne!(n.owner, 0, "{} must be ephemeral", n.path);
        let v = &n.data;
        assert_eq!(v["host"], "127.0.0.1", "{v}");
        assert_eq!(v["port"], d.port, "{v}");
        assert_eq!(v["pid"], d.pid, "{v}");
        assert_eq!(v["workers"], 2, "{v}");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"), "{v}");
        assert_eq!(v["state"], "serving", "{v}");
        assert_eq!(v["weight"], 1, "{v}");
        let started = v["started"].as_f64().unwrap_or_else(|| panic!("started is a number: {v}"));
        assert!(started >= before.floor() - 1.0 && started <= unix_now() + 1.0, "started {started} is unix seconds: {v}");
    }
    assert_ne!(nodes[0].owner, nodes[1].owner, "one session per daemon");

    // status --json
    let st = a.status();
    assert_eq!(st["zookeeper"]["state"], "registered", "{st}");
    assert_eq!(st["zookeeper"]["node"], na.as_str(), "{st}");
    // The human-readable status names the node too.
    let out = a.ctl(&["status"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains(&format!("registered ({na})")), "{}", text(&out.stdout));

    // rpcctl servers --json: exactly what ZooKeeper has, parsed.
    let out = rpcctl(&["servers", "--zk", &hosts, "--root", "/x/svc", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("servers --json: {e}: {}", text(&out.stdout)));
    let list = list.as_array().expect("a JSON array");
    assert_eq!(list.len(), 2, "{list:?}");
    let mut got: Vec<(String, String, u64, i64)> = list
        .iter()
        .map(|s| (s["node"].as_str().unwrap().to_string(), s["host"].as_str().unwrap().to_string(), s["port"].as_u64().unwrap(), s["data"]["pid"].as_i64().unwrap()))
        .collect();
    got.sort();
    let mut want = vec![(na.clone(), "127.0.0.1".to_string(), a.port as u64, a.pid as i64), (nb.clone(), "127.0.0.1".to_string(), b.port as u64, b.pid as i64)];
    want.sort();
    assert_eq!(got, want);
    // Through a chroot, the same servers.
    let out = rpcctl(&["servers", "--zk", &format!("{hosts}/x"), "--root", "/svc", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ports: Vec<u64> = list.as_array().unwrap().iter().map(|s| s["port"].as_u64().unwrap()).collect();
    ports.sort();
    assert_eq!(ports, { let mut p = vec![a.port as u64, b.port as u64]; p.sort(); p });
    // Plain output: one line per server, "node host:port data", in sequence order.
    let out = rpcctl(&["servers", "--zk", &hosts, "--root", "/x/svc"]);
    assert!(out.status.success());
    let plain = text(&out.stdout);
    assert_eq!(plain.lines().count(), 2, "{plain}");
    assert!(plain.lines().any(|l| l.starts_with(&format!("{na} 127.0.0.1:{} ", a.port))), "{plain}");
    let order: Vec<&str> = plain.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(order, vec!["/x/svc/rpc0000000009", "/x/svc/rpc0000000010"], "{plain}");

    // rpcctl call --zk --strategy round-robin alternates between both.
    let out = rpcctl(&["call", "ping", "7", "--zk", &hosts, "--root", "/x/svc", "--count", "10", "--strategy", "round-robin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 10, "{lines:?}");
    for w in lines.windows(2) {
        assert_ne!(w[0].split(' ').next(), w[1].split(' ').next(), "round-robin alternates: {lines:?}");
    }
    for l in &lines {
        assert!(l.ends_with(" pong 7"), "{l}");
    }

    // Nodes discovery must not use: garbage, JSON without a port, a draining server.
    let garbage = zc.create("/x/svc/rpc", b"\xff\x00 not json", zk::CreateMode::PersistentSequential);
    let no_port = zc.create("/x/svc/rpc", br#"{"host": "127.0.0.1"}"#, zk::CreateMode::PersistentSequential);
    let dead = free_port();
    let draining = zc.create(
        "/x/svc/rpc",
        format!(r#"{{"host": "127.0.0.1", "port": {dead}, "state": "draining"}}"#).as_bytes(),
        zk::CreateMode::PersistentSequential,
    );
    let out = rpcctl(&["servers", "--zk", &hosts, "--root", "/x/svc", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen: Vec<String> = list.as_array().unwrap().iter().map(|s| s["node"].as_str().unwrap().to_string()).collect();
    seen.sort();
    let mut real = vec![na.clone(), nb.clone()];
    real.sort();
    assert_eq!(seen, real, "garbage ({garbage}), port-less ({no_port}) and draining ({draining}) nodes are not servers");
    let warn = text(&out.stderr);
    assert!(warn.contains(&garbage) && warn.contains(&no_port), "a warning names each unparsable node: {warn}");
    assert!(!warn.contains(&draining), "a draining node is skipped silently: {warn}");
    // Calls only ever reach the two real servers and none fails.
    let out = rpcctl(&["call", "ping", "1", "--zk", &hosts, "--root", "/x/svc", "--count", "20"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let calls = text(&out.stdout);
    assert_eq!(calls.lines().count(), 20, "{calls}");
    for l in calls.lines() {
        let addr = l.split(' ').next().unwrap();
        assert!(addr == format!("127.0.0.1:{}", a.port) || addr == format!("127.0.0.1:{}", b.port), "{l}");
    }

    // SIGTERM: the node goes, the daemon exits 0.
    kill(a.pid, libc::SIGTERM);
    assert_eq!(a.wait_exit(Duration::from_secs(30)), Some(0));
    let left: Vec<String> = zc.nodes("/x/svc").into_iter().filter(|n| n.owner != 0).map(|n| n.path).collect();
    assert_eq!(left, vec![nb.clone()], "after SIGTERM only b's node is left");
}

#[test]
fn kazoo_client_like_the_original_discovers_and_calls_both() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let mut a = zk_daemon(&hosts, "/x");
    let mut b = zk_daemon(&hosts, "/x");
    wait_registered(&mut a, Duration::from_secs(30));
    wait_registered(&mut b, Duration::from_secs(30));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kazoo_client.py");
    let (st, out, err) = run_logged(Command::new("python3").arg(&script).args([&hosts, "/x", "2", "60"]), Duration::from_secs(60));
    assert!(st.success(), "kazoo client failed ({st}): {out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 61, "a discovery line and 60 calls: {out}\n{err}");
    assert!(lines[0].starts_with("discovered 2"), "{out}");
    for port in [a.port, b.port] {
        let n = lines.iter().filter(|l| l.starts_with(&format!("127.0.0.1:{port} pong "))).count();
        assert!(n > 0, "no call answered by port {port}: {out}");
    }
    assert!(lines[1..].iter().all(|l| l.contains(" pong ")), "{out}");
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(String::from).collect()
}

#[test]
fn graceful_stop_under_discovery_load_fails_no_call() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    // The daemon that stops waits 1 s between deleting its node and draining.
    let mut a = Daemon::start(opts(zk_section_with(&hosts, "/x", SESSION_MS, 1000)));
    let mut b = zk_daemon(&hosts, "/x");
    let na = wait_registered(&mut a, Duration::from_secs(30));
    let nb = wait_registered(&mut b, Duration::from_secs(30));
    let (addr_a, addr_b) = (format!("127.0.0.1:{}", a.port), format!("127.0.0.1:{}", b.port));

    // An observer of a's node: the first change must be the "draining" mark,
    // and right after the node is deleted a still answers a new connection
    // (deregistered first, drained only then).
    let zc = ZkClient::connect(&hosts);
    let (c, node, port) = (zc.client.clone(), na.clone(), a.port);
    let (otx, orx) = std::sync::mpsc::channel();
    zc.handle.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (_, _, w) = c.get_and_watch_data(&node).await.expect("a's node exists");
        let first = w.changed().await.event_type;
        let state = c.get_data(&node).await.ok().map(|(d, _)| serde_json::from_slice::<Value>(&d).unwrap_or(Value::Null)["state"].clone());
        loop {
            match c.check_and_watch_stat(&node).await {
                Ok((None, _)) => break,
                Ok((Some(_), w)) => {
                    w.changed().await;
                }
                Err(e) => panic!("watching {node}: {e}"),
            }
        }
        let ping = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
            let body = br#"{"in":"ping","params":"after-delete"}"#;
            let mut req = (body.len() as u32).to_le_bytes().to_vec();
            req.extend_from_slice(body);
            s.write_all(&req).await.map_err(|e| e.to_string())?;
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.map_err(|e| e.to_string())?;
            let mut reply = vec![0u8; u32::from_le_bytes(len) as usize];
            s.read_exact(&mut reply).await.map_err(|e| e.to_string())?;
            Ok::<String, String>(String::from_utf8_lossy(&reply).into_owned())
        }
        .await;
        let _ = otx.send((first, state, ping));
    });

    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("calls.out");
    let count = 1000;
    let child = Command::new(RPCCTL)
        .args(["call", "ping", "\"x\"", "--zk", &hosts, "--root", "/x", "--count", &count.to_string(), "--interval", "0.01"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(dir.path().join("calls.err")).unwrap())
        .spawn()
        .unwrap();
    let mut load = Proc(Some(child));
    wait_for("calls answered by both servers", Duration::from_secs(30), || {
        let l = lines_of(&out_path);
        (l.len() >= 100 && l.iter().any(|x| x.starts_with(&addr_a)) && l.iter().any(|x| x.starts_with(&addr_b))).then_some(())
    });
    // A server that registers while the client runs is found (the watch).
    let mut c = zk_daemon(&hosts, "/x");
    wait_registered(&mut c, Duration::from_secs(30));
    let addr_c = format!("127.0.0.1:{}", c.port);
    wait_for("calls answered by the new server", Duration::from_secs(20), || lines_of(&out_path).iter().any(|x| x.starts_with(&addr_c)).then_some(()));
    let before = lines_of(&out_path).len();
    let t = Instant::now();
    let out = a.ctl(&["stop"]);
    let stop_secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "rpcctl stop: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("stopped rpcd (pid {})", a.pid)), "{}", text(&out.stdout));
    assert_eq!(a.wait_exit(Duration::from_secs(10)), Some(0));
    let after = lines_of(&out_path).len();
    assert!(load.running(), "the load must outlast the stop (it had made {after} of {count} calls)");
    let left: Vec<String> = zc.nodes("/x").into_iter().map(|n| n.path).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&na) && left.contains(&nb), "a's node is gone, b's and c's stay: {left:?}");

    let (first, state, ping) = orx.recv_timeout(Duration::from_secs(10)).expect("observer finished");
    assert_eq!(first, zk::EventType::NodeDataChanged, "the node is marked before it is deleted");
    if let Some(s) = state {
        assert_eq!(s, "draining");
    }
    let ping = ping.unwrap_or_else(|e| panic!("a stopped serving before its node was gone: {e}"));
    assert!(ping.contains("\"pong\"") && ping.contains("after-delete"), "{ping}");

    let st = load.wait(Duration::from_secs(60));
    let lines = lines_of(&out_path);
    let err = std::fs::read_to_string(dir.path().join("calls.err")).unwrap_or_default();
    let failed = lines.iter().filter(|l| l.starts_with("FAILED")).count();
    assert_eq!(failed, 0, "failed calls: {err}");
    assert!(st.success(), "rpcctl call exit {st}: {err}");
    assert_eq!(lines.len(), count, "one line per call");
    assert!(lines.iter().all(|l| l.ends_with(" pong \"x\"")), "{lines:?}");
    let to_a = lines.iter().filter(|l| l.starts_with(&addr_a)).count();
    assert!(lines[after..].iter().all(|l| l.starts_with(&addr_b) || l.starts_with(&addr_c)), "after a stopped, only b and c answer");
    eprintln!(
        "graceful stop: {count} calls, 0 failed; {} calls during the {stop_secs:.2}s stop; {to_a} answered by the stopping server",
        after - before
    );
}

#[test]
fn zookeeper_down_at_start_then_up_registers() {
    let mut z = ZkServer::start();
    let hosts = z.hosts();
    z.stop();
    // READY without ZooKeeper; serving; reporting "connecting". The connect
    // string has a chroot that does not exist yet (created with the root).
    let mut d = zk_daemon(&format!("{hosts}/chroot/deep"), "/x");
    let mut s = connect(d.port);
    assert_eq!(call(&mut s, &serde_json::json!({"in": "ping", "params": 1}))["result"], 1);
    assert_eq!(zk_status(&mut d), ("connecting".to_string(), None));
    // Several connection attempts fail meanwhile; the daemon keeps serving.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(call(&mut s, &serde_json::json!({"in": "ping", "params": 2}))["result"], 2);
    assert_eq!(zk_status(&mut d).0, "connecting");
    z.restart();
    let t = Instant::now();
    let node = wait_registered(&mut d, Duration::from_secs(30));
    let secs = t.elapsed().as_secs_f64();
    assert!(is_seq_node(&node, "/x", "rpc"), "status names the node inside the chroot: {node}");
    let nodes = fresh_nodes(&hosts, "/chroot/deep/x");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].path, format!("/chroot/deep{node}"));
    assert_eq!(nodes[0].data["pid"], d.pid);
    assert_eq!(nodes[0].data["port"], d.port);
    eprintln!("registered {secs:.2}s after ZooKeeper answered ruok");
    // The retries were capped: within max_retry_delay_ms (5 s) plus one connect attempt (the session timeout).
    assert!(secs < 5.0 + SESSION_MS as f64 / 1000.0 + 2.0, "took {secs:.2}s to register");
}

#[test]
fn outage_longer_than_the_session_leaves_one_node_per_daemon() {
    let mut z = ZkServer::start();
    let hosts = z.hosts();
    let mut a = zk_daemon(&hosts, "/x");
    let mut b = zk_daemon(&hosts, "/x");
    let na = wait_registered(&mut a, Duration::from_secs(30));
    let nb = wait_registered(&mut b, Duration::from_secs(30));
    let old = fresh_nodes(&hosts, "/x");
    assert_eq!(old.len(), 2);
    // A discovery client calling through the outage keeps its last list.
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("calls.out");
    let child = Command::new(RPCCTL)
        .args(["call", "ping", "--zk", &hosts, "--root", "/x", "--count", "1500", "--interval", "0.01"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(dir.path().join("calls.err")).unwrap())
        .spawn()
        .unwrap();
    let mut load = Proc(Some(child));
    wait_for("the load runs", Duration::from_secs(30), || (lines_of(&out_path).len() >= 20).then_some(()));
    z.stop();
    let down = Instant::now();
    for d in [&mut a, &mut b] {
        wait_for("status shows the outage", Duration::from_secs(20), || (zk_status(d).0 == "connecting").then_some(()));
    }
    // Longer than the client-side expiry (7/5 of the session timeout).
    while down.elapsed() < Duration::from_millis(SESSION_MS * 2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still serving through the outage.
    let mut s = connect(a.port);
    assert_eq!(call(&mut s, &serde_json::json!({"in": "ping", "params": 3}))["result"], 3);
    let during = lines_of(&out_path).len();
    z.restart();
    let up = Instant::now();
    // The restarted server restores the old sessions (and their nodes) until
    // they time out; the daemons register in new sessions and remove the old
    // nodes: once both report registered there is exactly one node each.
    let (ra, rb) = (wait_registered(&mut a, Duration::from_secs(30)), wait_registered(&mut b, Duration::from_secs(30)));
    let secs = up.elapsed().as_secs_f64();
    let now = fresh_nodes(&hosts, "/x");
    let paths: Vec<String> = now.iter().map(|n| n.path.clone()).collect();
    assert_eq!(sorted(vec![a.pid as i64, b.pid as i64]), pids_of(&now), "one node per daemon: {now:?}");
    assert!(paths.contains(&ra) && paths.contains(&rb), "status names the live nodes: {ra} {rb} {paths:?}");
    assert!(!paths.contains(&na) && !paths.contains(&nb), "old nodes are gone: {paths:?}");
    for n in &now {
        assert!(old.iter().all(|o| o.owner != n.owner), "{} is owned by a new session", n.path);
    }
    // And it stays so past the restored sessions' timeout.
    while up.elapsed() < Duration::from_millis(SESSION_MS * 2) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let later = fresh_nodes(&hosts, "/x");
    assert_eq!(later.iter().map(|n| n.path.clone()).collect::<Vec<_>>(), paths);
    let st = load.wait(Duration::from_secs(60));
    let lines = lines_of(&out_path);
    let failed = lines.iter().filter(|l| l.starts_with("FAILED")).count();
    assert_eq!(failed, 0, "calls failed during the outage: {}", std::fs::read_to_string(dir.path().join("calls.err")).unwrap_or_default());
    assert!(st.success());
    assert_eq!(lines.len(), 1500);
    assert!(during >= 200, "calls went on during the outage: {during} made by its end");
    eprintln!("re-registered {secs:.2}s after ZooKeeper came back from a {:.1}s outage; 1500 discovery calls across it, 0 failed", (up - down).as_secs_f64());
}

#[test]
fn partition_between_daemon_and_zookeeper() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let proxy = Proxy::start(z.port);
    let mut a = zk_daemon(&format!("127.0.0.1:{}", proxy.port), "/x");
    let mut b = zk_daemon(&hosts, "/x");
    let na = wait_registered(&mut a, Duration::from_secs(30));
    let nb = wait_registered(&mut b, Duration::from_secs(30));
    let zc = ZkClient::connect(&hosts);
    let owner_of = |nodes: &[Node], p: &str| nodes.iter().find(|n| n.path == p).map(|n| n.owner);
    let n0 = zc.nodes("/x");
    let a_owner = owner_of(&n0, &na).unwrap();

    // A short cut, then the connections are reset: the session resumes, same node.
    proxy.cut();
    std::thread::sleep(Duration::from_millis(1000));
    proxy.heal();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wait_registered(&mut a, Duration::from_secs(20)), na);
    let n1 = zc.nodes("/x");
    assert_eq!(n1.len(), 2, "{n1:?}");
    assert_eq!(owner_of(&n1, &na), Some(a_owner), "the same session still owns a's node");

    // A partition longer than the session: ZooKeeper expires a's session
    // (its node goes); a keeps serving and registers again after healing.
    proxy.cut();
    let cut = Instant::now();
    wait_for("a's node expired", Duration::from_secs(30), || (!zc.nodes("/x").iter().any(|n| n.path == na)).then_some(()));
    let expired = cut.elapsed().as_secs_f64();
    while cut.elapsed() < Duration::from_millis(SESSION_MS * 2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut s = connect(a.port);
    assert_eq!(call(&mut s, &serde_json::json!({"in": "ping", "params": 4}))["result"], 4);
    assert_ne!(zk_status(&mut a).0, "registered", "a must not claim a registration it lost");
    proxy.heal();
    let healed = Instant::now();
    let ra = wait_registered(&mut a, Duration::from_secs(30));
    let secs = healed.elapsed().as_secs_f64();
    assert_ne!(ra, na);
    let n2 = zc.nodes("/x");
    assert_eq!(pids_of(&n2), sorted(vec![a.pid as i64, b.pid as i64]), "{n2:?}");
    assert!(owner_of(&n2, &ra).is_some_and(|o| o != a_owner), "a new session owns {ra}: {n2:?}");
    assert!(owner_of(&n2, &nb).is_some(), "b was not disturbed");
    std::thread::sleep(Duration::from_millis(SESSION_MS));
    assert_eq!(zc.nodes("/x").len(), 2, "exactly one node per daemon");
    eprintln!("partition: a's node expired {expired:.2}s after the cut; re-registered {secs:.2}s after healing");
}

// ---------- a 3-server ensemble on loopback ----------

struct Ensemble {
    _dir: tempfile::TempDir,
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Ensemble {
    fn start(n: usize) -> Ensemble {
        assert!(zk_available(), "ZooKeeper is not installed (apt-get install zookeeper)");
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let quorum: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let servers: String = quorum.iter().enumerate().map(|(i, (p, e))| format!("server.{}=127.0.0.1:{p}:{e}\n", i + 1)).collect();
        let mut children = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let data = dir.path().join(format!("data{}", i + 1));
            std::fs::create_dir_all(&data).unwrap();
            std::fs::write(data.join("myid"), format!("{}\n", i + 1)).unwrap();
            let cfg = dir.path().join(format!("zoo{}.cfg", i + 1));
            std::fs::write(
                &cfg,
                format!(
                    "tickTime=500\ninitLimit=20\nsyncLimit=5\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nminSessionTimeout=1000\nmaxSessionTimeout=60000\nadmin.enableServer=false\n4lw.commands.whitelist=*\n{servers}",
                    data.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join(format!("zk{}.log", i + 1))).unwrap();
            let child = Command::new("/usr/bin/java")
                .args(["-Xmx192m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Dzookeeper.admin.enableServer=false", "-cp", ZK_JAR])
                .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start ZooKeeper");
            children.push(Some(child));
        }
        let e = Ensemble { _dir: dir, ports, children };
        for i in 0..n {
            wait_for("ensemble member serving", Duration::from_secs(90), || e.mode(i).filter(|m| m == "leader" || m == "follower"));
        }
        e
    }

    fn hosts(&self) -> String {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
    }

    /// "leader" or "follower" once the member serves clients.
    fn mode(&self, i: usize) -> Option<String> {
        let out = four_letter(self.ports[i], "srvr")?;
        out.lines().find_map(|l| l.strip_prefix("Mode: ")).map(|m| m.trim().to_string())
    }

    /// The member that holds a client connection of session `sid`.
    fn holder(&self, sid: i64) -> Option<usize> {
        let needle = format!("sid=0x{sid:x},");
        (0..self.ports.len()).find(|&i| self.children[i].is_some() && four_letter(self.ports[i], "cons").is_some_and(|c| c.contains(&needle)))
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ensemble {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

#[test]
fn ensemble_member_failure_keeps_the_registration() {
    let mut e = Ensemble::start(3);
    let hosts = e.hosts();
    let mut d = Daemon::start(opts(zk_section_with(&hosts, "/x", 8000, 300)));
    let node = wait_registered(&mut d, Duration::from_secs(30));
    let zc = ZkClient::connect(&hosts);
    let nodes = zc.nodes("/x");
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let sid = nodes[0].owner;
    let i = wait_for("the daemon's session on a member", Duration::from_secs(10), || e.holder(sid));
    let mode = e.mode(i).unwrap_or_default();
    e.kill(i);
    let killed = Instant::now();
    // The daemon moves its session to a surviving member.
    let j = wait_for("the session on another member", Duration::from_secs(30), || e.holder(sid).filter(|&j| j != i));
    let secs = killed.elapsed().as_secs_f64();
    assert_eq!(wait_registered(&mut d, Duration::from_secs(20)), node);
    let after = zc.nodes("/x");
    assert_eq!(after.len(), 1, "no duplicate: {after:?}");
    assert_eq!((after[0].path.as_str(), after[0].owner), (node.as_str(), sid), "same node, same session");
    // Discovery through the surviving members sees it.
    let out = rpcctl(&["servers", "--zk", &hosts, "--root", "/x", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(|l| l.len()), Some(1), "{list}");
    assert_eq!(list[0]["port"], d.port);
    eprintln!("ensemble: killed member {} ({mode}); session resumed on member {} after {secs:.2}s", i + 1, j + 1);
}

// ---------- reload ----------

/// Every node creation and deletion in the whole tree, in ZooKeeper's order
/// (a persistent recursive watch: nothing is missed while connected).
struct Recorder {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rx: std::sync::mpsc::Receiver<Vec<(zk::EventType, String)>>,
}

impl Recorder {
    fn start(zc: &ZkClient) -> Recorder {
        let c = zc.client.clone();
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let (armed_tx, armed_rx) = std::sync::mpsc::channel();
        zc.handle.spawn(async move {
            let mut w = c.watch("/", zk::AddWatchMode::PersistentRecursive).await.expect("persistent watch");
            let _ = armed_tx.send(());
            let mut events = Vec::new();
            loop {
                tokio::select! {
                    ev = w.changed() => {
                        if ev.event_type == zk::EventType::Session && ev.session_state.is_terminated() {
                            break;
                        }
                        events.push((ev.event_type, ev.path));
                    }
                    _ = &mut stop_rx => break,
                }
            }
            let _ = tx.send(events);
        });
        armed_rx.recv_timeout(Duration::from_secs(10)).expect("watch armed");
        Recorder { stop: Some(stop), rx }
    }

    /// Replays the events on `initial` (the registrations under `roots`)
    /// and returns the number of registrations after each event.
    fn replay(mut self, initial: &[String], roots: &[&str]) -> (Vec<usize>, Vec<String>) {
        let _ = self.stop.take().unwrap().send(());
        let events = self.rx.recv_timeout(Duration::from_secs(10)).expect("events");
        let ours = |p: &str| roots.iter().any(|r| is_seq_node(p, r, "rpc"));
        let mut set: std::collections::BTreeSet<String> = initial.iter().cloned().collect();
        let mut counts = Vec::new();
        for (t, p) in events {
            if !ours(&p) {
                continue;
            }
            match t {
                zk::EventType::NodeCreated => {
                    set.insert(p);
                }
                zk::EventType::NodeDeleted => {
                    set.remove(&p);
                }
                _ => continue,
            }
            counts.push(set.len());
        }
        (counts, set.into_iter().collect())
    }
}

/// Samples the number of children of each root as fast as possible until stopped.
/// Returns once it has taken a few samples.
fn sampler(zc: &ZkClient, roots: &[&str]) -> (Arc<AtomicBool>, std::sync::mpsc::Receiver<Vec<Vec<usize>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, s, n) = (zc.client.clone(), stop.clone(), taken.clone());
    let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    zc.handle.spawn(async move {
        let mut samples = Vec::new();
        while !s.load(Ordering::SeqCst) {
            let mut one = Vec::new();
            for r in &roots {
                one.push(match c.list_children(r).await {
                    Ok(k) => k.len(),
                    Err(zk::Error::NoNode) => 0,
                    Err(e) => panic!("{r}: {e}"),
                });
            }
            samples.push(one);
            n.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = tx.send(samples);
    });
    wait_for("first samples", Duration::from_secs(10), || (taken.load(Ordering::SeqCst) >= 5).then_some(()));
    (stop, rx)
}

#[test]
fn reload_moves_the_registration_without_a_gap() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let mut d = zk_daemon(&hosts, "/old");
    let n0 = wait_registered(&mut d, Duration::from_secs(30));
    let zc = ZkClient::connect(&hosts);
    let owner0 = zc.nodes("/old")[0].owner;

    // 1. A new root. Samples read the old root first, then the new one: a
    //    (0, 0) sample means a moment without any registration.
    let rec = Recorder::start(&zc);
    let (stop, rx) = sampler(&zc, &["/old", "/new"]);
    d.rewrite_config(&d.config_text(&opts(zk_section(&hosts, "/new"))));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let n1 = wait_for("registered under /new", Duration::from_secs(30), || {
        let n = wait_registered(&mut d, Duration::from_secs(30));
        n.starts_with("/new/").then_some(n)
    });
    wait_for("/old emptied", Duration::from_secs(10), || zc.nodes("/old").is_empty().then_some(()));
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let samples = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let transition = samples.iter().filter(|s| s != &&vec![1, 0] && s != &&vec![0, 1]).count();
    assert_eq!(samples[0], vec![1, 0], "starts registered under /old");
    assert_eq!(samples.last().unwrap(), &vec![0, 1], "ends registered under /new");
    assert!(!samples.iter().any(|s| s == &vec![0, 0]), "a moment without any node: {samples:?}");
    let moved = zc.nodes("/new");
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].path, n1);
    assert_eq!(moved[0].data["pid"], d.pid);
    assert!(is_seq_node(&n1, "/new", "rpc"));
    assert_ne!(n1, n0);
    let owner1 = moved[0].owner;
    // Exactly, from ZooKeeper's own order of events: created, then deleted.
    let (counts, last) = rec.replay(&[n0.clone()], &["/old", "/new"]);
    assert_eq!(counts, vec![2, 1], "registrations after each create/delete");
    assert_eq!(last, vec![n1.clone()]);
    eprintln!("reload of root: {} samples ({transition} with both nodes), never zero", samples.len());

    // 2. New hosts (the same server through a proxy): a new session, again
    //    never zero nodes under /new, the old session's node deleted.
    let proxy = Proxy::start(z.port);
    let via = format!("127.0.0.1:{}", proxy.port);
    let rec = Recorder::start(&zc);
    let (stop, rx) = sampler(&zc, &["/new"]);
    d.rewrite_config(&d.config_text(&opts(zk_section(&via, "/new"))));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let n2 = wait_for("a new node under /new", Duration::from_secs(30), || {
        let n = wait_registered(&mut d, Duration::from_secs(30));
        (n != n1).then_some(n)
    });
    wait_for("the old node deleted", Duration::from_secs(10), || (zc.nodes("/new").len() == 1).then_some(()));
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let samples = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(!samples.iter().any(|s| s[0] == 0), "a moment without any node: {samples:?}");
    let now = zc.nodes("/new");
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].path, n2);
    assert!(now[0].owner != owner1 && now[0].owner != owner0, "a new session for the new hosts");
    let (counts, last) = rec.replay(&[n1.clone()], &["/new"]);
    assert_eq!(counts, vec![2, 1], "registrations after each create/delete");
    assert_eq!(last, vec![n2.clone()]);

    // 3. New hosts that cannot be reached (the proxy cut): the registration
    //    stays where it is until the new place answers.
    let proxy2 = Proxy::start(z.port);
    proxy2.cut();
    let via2 = format!("127.0.0.1:{}", proxy2.port);
    let rec = Recorder::start(&zc);
    d.rewrite_config(&d.config_text(&opts(zk_section(&via2, "/new"))));
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "reload: {}", text(&out.stderr));
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(SESSION_MS * 2) {
        let now = zc.nodes("/new");
        assert_eq!(now.len(), 1, "while the new hosts are unreachable the old node stays: {now:?}");
        assert_eq!(now[0].path, n2);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Status: still at the old node, connecting to the new hosts.
    assert_eq!(zk_status(&mut d), ("connecting".to_string(), Some(n2.clone())));
    proxy2.heal();
    let n3 = wait_for("registered through the new hosts", Duration::from_secs(30), || {
        let n = wait_registered(&mut d, Duration::from_secs(30));
        (n != n2).then_some(n)
    });
    wait_for("the old node deleted", Duration::from_secs(10), || (zc.nodes("/new").len() == 1).then_some(()));
    assert_eq!(zc.nodes("/new")[0].path, n3);
    let (counts, last) = rec.replay(&[n2.clone()], &["/new"]);
    assert_eq!(counts, vec![2, 1], "registrations after each create/delete");
    assert_eq!(last, vec![n3]);
    drop(proxy);
}

// ---------- the discovery client against misbehaving servers ----------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Closes the connection right after reading a request.
    Close,
    /// Reads requests and never answers.
    Silent,
    /// Answers every request with {"out": "pong", "result": "fake"}.
    Pong,
}

/// A fake server (one connection at a time) counting connections and requests.
struct Fake {
    port: u16,
    conns: Arc<std::sync::atomic::AtomicUsize>,
    frames: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Fake {
    fn start(mode: Mode) -> Fake {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let frames = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, f, s) = (conns.clone(), frames.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut sock, _)) => {
                        c.fetch_add(1, Ordering::SeqCst);
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        loop {
                            let mut len = [0u8; 4];
                            if sock.read_exact(&mut len).is_err() {
                                break;
                            }
                            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                            if sock.read_exact(&mut body).is_err() {
                                break;
                            }
                            f.fetch_add(1, Ordering::SeqCst);
                            if mode != Mode::Pong || sock.write_all(&frame(br#"{"out":"pong","result":"fake"}"#)).is_err() {
                                break;
                            }
                        }
                        if mode == Mode::Silent {
                            held.push(sock);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Fake { port, conns, frames, stop }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn discovery_client_fails_over_and_timeouts_are_errors() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let mut d = zk_daemon(&hosts, "/f");
    wait_registered(&mut d, Duration::from_secs(30));
    let zc = ZkClient::connect(&hosts);
    zc.mkdir("/s");
    let closer = Fake::start(Mode::Close);
    let silent = Fake::start(Mode::Silent);
    let refused = free_port();
    let node = |port: u16| format!(r#"{{"host": "127.0.0.1", "port": {port}, "state": "serving"}}"#).into_bytes();
    // The test session's own ephemeral nodes: a server that closes before
    // replying and one that refuses connections, next to the real daemon.
    zc.create("/f/rpc", &node(closer.port), zk::CreateMode::EphemeralSequential);
    zc.create("/f/rpc", &node(refused), zk::CreateMode::EphemeralSequential);
    let t = Instant::now();
    let (st, out, err) = run_logged(Command::new(RPCCTL).args(["call", "ping", "5", "--zk", &hosts, "--root", "/f", "--count", "30"]), Duration::from_secs(60));
    let secs = t.elapsed().as_secs_f64();
    assert!(st.success(), "failover: every call succeeds on the real server: {out}\n{err}");
    assert_eq!(out.lines().count(), 30);
    assert!(out.lines().all(|l| l == format!("127.0.0.1:{} pong 5", d.port)), "{out}");
    let tried = closer.frames.load(Ordering::SeqCst);
    assert!(tried >= 1, "the closing server was never tried (random choice over 30 calls)");
    // Marked down after a failure: not tried again for a while.
    assert!(tried <= 1 + (secs / 2.0) as usize + 1, "{tried} requests to a server that keeps failing within {secs:.1}s");

    // One connection per server, made at the first call and reused.
    let pong = Fake::start(Mode::Pong);
    zc.mkdir("/p");
    zc.create("/p/rpc", &node(pong.port), zk::CreateMode::EphemeralSequential);
    let (st, out, err) = run_logged(Command::new(RPCCTL).args(["call", "ping", "--zk", &hosts, "--root", "/p", "--count", "20"]), Duration::from_secs(30));
    assert!(st.success(), "{out}\n{err}");
    assert_eq!(out.lines().filter(|l| l.ends_with(" pong \"fake\"")).count(), 20, "{out}");
    assert_eq!((pong.conns.load(Ordering::SeqCst), pong.frames.load(Ordering::SeqCst)), (1, 20), "20 calls on one connection");

    // Only a server that closes before replying: the call fails, bounded.
    let lonely = Fake::start(Mode::Close);
    zc.mkdir("/c");
    zc.create("/c/rpc", &node(lonely.port), zk::CreateMode::EphemeralSequential);
    let t = Instant::now();
    let (st, out, _) = run_logged(Command::new(RPCCTL).args(["call", "ping", "--zk", &hosts, "--root", "/c", "--timeout", "2"]), Duration::from_secs(30));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(out.starts_with("FAILED") && out.contains("connection lost before the reply"), "{out}");
    assert!(secs < 10.0, "bounded by --timeout: {secs:.1}s");
    assert!(lonely.conns.load(Ordering::SeqCst) <= 6, "bounded attempts");

    // A server that never answers: a timeout is an error, not retried elsewhere.
    zc.create("/s/rpc", &node(silent.port), zk::CreateMode::EphemeralSequential);
    let t = Instant::now();
    let (st, out, _) = run_logged(Command::new(RPCCTL).args(["call", "ping", "--zk", &hosts, "--root", "/s", "--timeout", "1"]), Duration::from_secs(30));
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(st.code(), Some(1), "{out}");
    assert!(out.starts_with("FAILED") && out.contains("timed out"), "{out}");
    assert!((1.0..8.0).contains(&secs), "{secs:.2}s");
    assert_eq!(silent.frames.load(Ordering::SeqCst), 1, "the timed-out request was sent once");
}
