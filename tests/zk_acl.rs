//! `zookeeper.auth_file` (SPEC §9) against a real ZooKeeper, a real rpcd and
//! a real kazoo client: what an authenticated rpcd creates is creator-all,
//! world-read; an unauthenticated client can read (discovery works) but not
//! delete, overwrite, re-ACL or add nodes; the ACLs survive a session
//! expiry; a wrong identity is logged and retried while serving; the file's
//! mode is checked by `--check-config` and at start. A negative control
//! without auth_file shows the same attack succeeding.
mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SESSION_MS: u64 = 4000;
const PASSWORD: &str = "pw-Secret-4711";

/// A child process ended by PID when dropped.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command with its output in files; killed (by PID) after `timeout`.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .expect("spawn");
    let mut p = Proc(Some(child));
    let end = Instant::now() + timeout;
    let code = loop {
        if let Some(st) = p.0.as_mut().unwrap().try_wait().unwrap() {
            p.0 = None;
            break st.code();
        }
        assert!(Instant::now() < end, "{cmd:?} did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&o).unwrap_or_default(), std::fs::read_to_string(&e).unwrap_or_default())
}

/// tests/kazoo_acl.py: another, unauthenticated client's view and attempts, as JSON.
fn kazoo(hosts: &str, args: &[&str]) -> Value {
    kazoo_as(None, hosts, args)
}

/// The same, with a session authenticated as `cred` (digest) if given.
fn kazoo_as(cred: Option<&str>, hosts: &str, args: &[&str]) -> Value {
    let script = Path::new(TESTS).join("kazoo_acl.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(hosts).args(args).env_remove("KAZOO_DIGEST");
    if let Some(c) = cred {
        cmd.env("KAZOO_DIGEST", c);
    }
    let (code, out, err) = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(code, Some(0), "kazoo_acl.py {args:?}: {out}\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kazoo_acl.py {args:?}: {e}: {out}"))
}

/// kazoo's digest id for `user:password` (what ZooKeeper puts in the ACL).
fn kazoo_digest(cred: &str) -> String {
    kazoo("-", &["digest", cred])["id"].as_str().unwrap().to_string()
}

/// The digest id as man/rpcd.8 tells an operator to compute it.
fn shell_digest(cred: &str) -> String {
    let (code, out, err) = run_bounded(
        Command::new("/bin/sh").args(["-c", "printf %s \"$1\" | openssl dgst -binary -sha1 | base64", "sh", cred]),
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(0), "{err}");
    let user = cred.split_once(':').unwrap().0;
    format!("{user}:{}", out.trim())
}

/// The ACLs rpcd must give what it creates, as kazoo_acl.py lists them to
/// a session with that identity.
fn creator_all_world_read(digest_id: &str) -> Value {
    json!([[1, "world", "anyone"], [31, "digest", digest_id]])
}

/// The same as others see them: ZooKeeper (3.6+, ZOOKEEPER-1392) shows
/// the hash only to sessions with ADMIN rights on the node.
fn creator_all_world_read_redacted(user: &str) -> Value {
    json!([[1, "world", "anyone"], [31, "digest", format!("{user}:x")]])
}

/// Writes an auth file with `mode` in `dir`.
fn auth_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("zookeeper.auth");
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn zk_section(hosts: &str, root: &str, auth: Option<&Path>) -> String {
    let mut s = format!(
        "enabled = true\nhosts = \"{hosts}\"\nroot = \"{root}\"\nsession_timeout_ms = {SESSION_MS}\nderegister_delay_ms = 100\nmax_retry_delay_ms = 1000"
    );
    if let Some(p) = auth {
        s.push_str(&format!("\nauth_file = \"{}\"", p.display()));
    }
    s
}

fn zk_daemon(hosts: &str, root: &str, auth: Option<&Path>) -> Daemon {
    Daemon::start(Opts { zookeeper: Some(zk_section(hosts, root, auth)), ..Default::default() })
}

fn zk_status(d: &mut Daemon) -> (String, Option<String>) {
    let v = d.status();
    (v["zookeeper"]["state"].as_str().unwrap_or("?").to_string(), v["zookeeper"]["node"].as_str().map(String::from))
}

fn wait_registered(d: &mut Daemon, timeout: Duration) -> String {
    wait_for("zookeeper.state registered", timeout, || match zk_status(d) {
        (s, Some(n)) if s == "registered" => Some(n),
        _ => None,
    })
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

fn ping(port: u16, n: i64) {
    let mut s = connect(port);
    assert_eq!(call(&mut s, &json!({"in": "ping", "params": n}))["result"], n);
}

fn assert_no_password(what: &str, text: &str) {
    assert!(!text.contains(PASSWORD) && !text.contains("pw-"), "{what} shows a password:\n{text}");
}

// ---------------------------------------------------------------------------

#[test]
fn authenticated_registration_is_creator_all_world_read_and_others_cannot_touch_it() {
    let t0 = Instant::now();
    let z = ZkServer::start();
    let hosts = z.hosts();
    let secrets = tempfile::tempdir().unwrap();
    let auth = auth_file(secrets.path(), &format!("rpcd:{PASSWORD}\n"), 0o640);
    let mut d = zk_daemon(&hosts, "/demo", Some(&auth));
    let node = wait_registered(&mut d, Duration::from_secs(30));
    let cred = format!("rpcd:{PASSWORD}");
    let want = creator_all_world_read(&kazoo_digest(&cred));

    // The node and the root rpcd created: digest creator all, world read,
    // nothing else (as rpcd's identity sees them; others see the hash redacted).
    let mine = kazoo_as(Some(&cred), &hosts, &["inspect", &node, "/demo"]);
    assert_eq!(mine[&node]["acls"], want, "node ACL: {mine}");
    assert_eq!(mine["/demo"]["acls"], want, "root ACL: {mine}");
    let seen = kazoo(&hosts, &["inspect", &node, "/demo"]);
    assert_eq!(seen[&node]["acls"], creator_all_world_read_redacted("rpcd"), "node ACL: {seen}");
    assert_eq!(seen["/demo"]["acls"], creator_all_world_read_redacted("rpcd"), "root ACL: {seen}");
    assert_eq!(seen["/demo"]["children"], json!([name_of(&node)]));
    let data = seen[&node]["data"].as_str().unwrap().to_string();
    let v: Value = serde_json::from_str(&data).unwrap();
    assert_eq!((v["host"].as_str(), v["port"].as_u64()), (Some("127.0.0.1"), Some(d.port as u64)), "{v}");

    // An unauthenticated client: every write is refused.
    let tried = kazoo(&hosts, &["attack", "/demo", &node]);
    assert_eq!(tried, json!({"set_data": "NoAuthError", "set_acls": "NoAuthError", "create": "NoAuthError", "delete": "NoAuthError"}));
    let after = kazoo(&hosts, &["inspect", &node, "/demo"]);
    assert_eq!(after[&node]["data"], json!(data), "the node's data is unchanged");
    assert_eq!(kazoo_as(Some(&cred), &hosts, &["inspect", &node])[&node]["acls"], want, "the node's ACL is unchanged");
    assert_eq!(after["/demo"]["children"], json!([name_of(&node)]), "no fake node under the root");
    assert_eq!(zk_status(&mut d), ("registered".to_string(), Some(node.clone())));

    // Readers need nothing: the original-style kazoo discovery client and rpcctl servers.
    let script = Path::new(TESTS).join("kazoo_client.py");
    let (code, out, err) = run_bounded(Command::new("python3").arg(&script).args([&hosts, "/demo", "1", "5"]), Duration::from_secs(60));
    assert_eq!(code, Some(0), "kazoo client: {out}\n{err}");
    assert!(out.starts_with("discovered 1"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with(&format!("127.0.0.1:{} pong ", d.port))).count(), 5, "{out}");
    let (code, out, err) = run_bounded(Command::new(RPCCTL).args(["servers", "--zk", &hosts, "--root", "/demo", "--json"]), Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().map(|l| l.len()), Some(1), "{list}");
    assert_eq!((list[0]["node"].as_str(), list[0]["port"].as_u64()), (Some(node.as_str()), Some(d.port as u64)));

    let log = d.log();
    assert!(log.contains("authenticated as digest user \"rpcd\""), "{log}");
    assert_no_password("the log", &log);
    eprintln!("authenticated registration and attack checks: {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn negative_control_without_auth_file_an_unauthenticated_client_can_delete_the_node() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let mut d = zk_daemon(&hosts, "/demo", None);
    let node = wait_registered(&mut d, Duration::from_secs(30));
    let seen = kazoo(&hosts, &["inspect", &node, "/demo"]);
    assert_eq!(seen[&node]["acls"], json!([[31, "world", "anyone"]]), "{seen}");
    assert_eq!(seen["/demo"]["acls"], json!([[31, "world", "anyone"]]), "{seen}");
    // The same attack as above succeeds: the assertions there can fail.
    let tried = kazoo(&hosts, &["attack", "/demo", &node]);
    assert_eq!(tried, json!({"set_data": "ok", "set_acls": "ok", "create": "ok", "delete": "ok"}));
    let after = kazoo(&hosts, &["inspect", &node, "/demo"]);
    assert_eq!(after[&node], Value::Null, "the node was deleted by a stranger");
    assert_eq!(after["/demo"]["children"], json!(["rpcfake"]), "and a fake node put in its place");
}

#[test]
fn session_expiry_re_registers_with_the_same_acls_and_the_chroot_is_protected_too() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    let proxy = Proxy::start(z.port);
    let secrets = tempfile::tempdir().unwrap();
    let auth = auth_file(secrets.path(), &format!("rpcd:{PASSWORD}\n"), 0o600);
    // Through a chroot that rpcd creates itself.
    let mut d = zk_daemon(&format!("127.0.0.1:{}/svc", proxy.port), "/demo", Some(&auth));
    let first = wait_registered(&mut d, Duration::from_secs(30));
    let full = |n: &str| format!("/svc{n}");
    let cred = format!("rpcd:{PASSWORD}");
    let want = creator_all_world_read(&kazoo_digest(&cred));
    let seen = kazoo_as(Some(&cred), &hosts, &["inspect", "/svc", "/svc/demo", &full(&first)]);
    for p in ["/svc", "/svc/demo", &full(&first)] {
        assert_eq!(seen[p]["acls"], want, "{p}: {seen}");
    }

    // A partition longer than the session: ZooKeeper expires it, the node goes.
    proxy.cut();
    let cut = Instant::now();
    wait_for("the node expired", Duration::from_secs(30), || {
        (!zk_children(&hosts, "/svc/demo").iter().any(|(p, _)| *p == full(&first))).then_some(())
    });
    let expired = cut.elapsed();
    while cut.elapsed() < Duration::from_millis(SESSION_MS * 2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ping(d.port, 7);
    proxy.heal();
    let healed = Instant::now();
    let again = wait_for("a new registration", Duration::from_secs(30), || match zk_status(&mut d) {
        (s, Some(n)) if s == "registered" && n != first => Some(n),
        _ => None,
    });
    let secs = healed.elapsed().as_secs_f64();
    let seen = kazoo_as(Some(&cred), &hosts, &["inspect", &full(&again), "/svc/demo"]);
    assert_eq!(seen[&full(&again)]["acls"], want, "the new session's node: {seen}");
    assert_eq!(seen["/svc/demo"]["children"], json!([name_of(&again)]), "{seen}");
    let tried = kazoo(&hosts, &["attack", "/svc/demo", &full(&again)]);
    assert_eq!(tried["delete"], "NoAuthError", "{tried}");
    assert_eq!(tried["set_data"], "NoAuthError", "{tried}");
    let log = d.log();
    assert!(log.contains("Expired") || log.contains("expired"), "{log}");
    assert_no_password("the log", &log);
    eprintln!("expiry: node gone {:.2}s after the cut; re-registered with the ACLs {secs:.2}s after healing", expired.as_secs_f64());
}

#[test]
fn wrong_identity_is_logged_and_retried_while_serving_then_a_reload_with_the_right_one_registers() {
    let z = ZkServer::start();
    let hosts = z.hosts();
    // The operator creates the root for rpcd's identity, the way man/rpcd.8 says.
    let right = "rpcd:pw-Right-93a";
    let id = shell_digest(right);
    assert_eq!(id, kazoo_digest(right), "man/rpcd.8's one-liner computes ZooKeeper's digest");
    kazoo(&hosts, &["mkroot", "/demo", &id]);

    let secrets = tempfile::tempdir().unwrap();
    let auth = auth_file(secrets.path(), "rpcd:pw-Wrong-7d1\n", 0o640);
    let mut d = zk_daemon(&hosts, "/demo", Some(&auth));
    let msg = "zookeeper: not allowed to create under /demo: NoAuth — does zookeeper.auth_file hold the identity the root's ACL names?";
    wait_for("two NoAuth attempts logged", Duration::from_secs(30), || (d.log().matches(msg).count() >= 2).then_some(()));
    assert_eq!(zk_status(&mut d).0, "connecting");
    ping(d.port, 1);
    assert!(zk_children(&hosts, "/demo").is_empty(), "nothing was created");

    // The right credentials, by reload: a session with the new identity registers.
    std::fs::write(&auth, format!("{right}\n")).unwrap();
    let out = d.ctl(&["reload"]);
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let node = wait_registered(&mut d, Duration::from_secs(30));
    let seen = kazoo_as(Some(right), &hosts, &["inspect", &node, "/demo"]);
    assert_eq!(seen[&node]["acls"], creator_all_world_read(&id), "{seen}");
    assert_eq!(seen["/demo"]["acls"], creator_all_world_read(&id), "the operator's root ACL: {seen}");
    ping(d.port, 2);
    assert_no_password("the log", &d.log());
}

#[test]
fn auth_file_readable_by_others_is_refused_by_check_config_and_at_start() {
    let secrets = tempfile::tempdir().unwrap();
    let auth = auth_file(secrets.path(), &format!("rpcd:{PASSWORD}\n"), 0o644);
    // No ZooKeeper is needed: the file is checked before anything connects.
    let mut d = Daemon::start(Opts {
        zookeeper: Some(zk_section(&format!("127.0.0.1:{}", free_port()), "/demo", Some(&auth))),
        wait_ready: false,
        ..Default::default()
    });
    let want = format!("{} is readable by others (mode 0644); chmod 0640 it", auth.display());
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(1), "rpcd must refuse to start; log:\n{}", d.log());
    let log = d.log();
    assert!(log.contains(&want), "{log}");
    assert!(log.contains("zookeeper.auth_file"), "{log}");
    assert_no_password("the start error", &log);

    let check = || run_bounded(Command::new(RPCD).arg("--config").arg(&d.config).arg("--check-config"), Duration::from_secs(20));
    let (code, out, err) = check();
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains(&want), "{err}");
    assert_no_password("--check-config", &format!("{out}{err}"));

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, out, err) = check();
    assert_eq!(code, Some(0), "{out}{err}");
    assert_no_password("--check-config", &format!("{out}{err}"));
}
