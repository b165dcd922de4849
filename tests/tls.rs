//! TLS on the RPC port (SPEC §9), end to end: real rpcd, real rustls on both
//! sides, Python's `ssl` (OpenSSL) as a foreign client framing the original
//! protocol, certificates made here with rcgen (no key is committed).
//!
//! Bad clients (plain TCP on a TLS port, a TLS client on a plain port, an
//! unknown CA, an expired certificate, a client certificate from another
//! CA, a handshake that never finishes, a burst of 1000 bad handshakes)
//! each get a clean refusal, no worker restarts, and good clients are
//! served throughout. Reload re-reads the certificate; a bad one fails the
//! reload and changes nothing; open connections keep their session.

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------- certificates ----------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate and its key, PEM. `client`: for client auth;
    /// `expired`: valid only in 2020.
    fn issue(&self, cn: &str, client: bool, expired: bool) -> (String, String) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// Files in a test's own directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki { dir: tempfile::tempdir().unwrap() }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes `NAME.pem` and `NAME.key`.
    fn pair(&self, name: &str, (cert, key): (String, String)) -> (PathBuf, PathBuf) {
        (self.write(&format!("{name}.pem"), &cert), self.write(&format!("{name}.key"), &key))
    }
}

fn tls_table(cert: &Path, key: &Path, client_ca: Option<&Path>) -> String {
    let mut t = format!("\n[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout_ms = 800\n", cert.display(), key.display());
    if let Some(ca) = client_ca {
        t.push_str(&format!("client_ca = \"{}\"\n", ca.display()));
    }
    t
}

// ---------- clients ----------

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(mut cmd: Command, timeout: Duration) -> Out {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t2 = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            kill(child.id() as i32, libc::SIGKILL);
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out { code: status.code(), stdout: t1.join().unwrap(), stderr: t2.join().unwrap() }
}

/// `rpcctl call ping` with these extra arguments, one attempt.
fn rpcctl_ping(port: u16, extra: &[&str]) -> Out {
    let mut c = Command::new(RPCCTL);
    c.args(["call", "ping", "\"t\"", "--addr", &format!("127.0.0.1:{port}"), "--timeout", "5"]).args(extra);
    run(c, Duration::from_secs(30))
}

/// A client in Python's `ssl` (OpenSSL): connects, sends the original
/// protocol's frames (`struct.pack("I", n)`), prints each reply, and the
/// server certificate's SHA-256. With `hold`, it sends one request, waits
/// for a line on stdin, then sends another on the same session.
const PY_CLIENT: &str = r#"
import hashlib, json, socket, ssl, struct, sys
port, ca, cert, key, hold = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="127.0.0.1")
print("cert", hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest(), s.version(), flush=True)
def call(req):
    b = json.dumps(req).encode()
    s.sendall(struct.pack("I", len(b)) + b)
    hdr = b""
    while len(hdr) < 4:
        c = s.recv(4 - len(hdr))
        if not c:
            raise SystemExit("closed")
        hdr += c
    n = struct.unpack("I", hdr)[0]
    body = b""
    while len(body) < n:
        c = s.recv(n - len(body))
        if not c:
            raise SystemExit("closed")
        body += c
    print("reply", body.decode(), flush=True)
call({"in": "pi", "params": 10, "id": 7})
if hold:
    sys.stdin.readline()
    call({"in": "ping", "params": "after"})
"#;

fn py_client(port: u16, ca: &Path, client: Option<(&Path, &Path)>) -> Out {
    let (c, k) = client.map(|(c, k)| (c.display().to_string(), k.display().to_string())).unwrap_or_default();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_CLIENT, &port.to_string()]).arg(ca).args([&c, &k, "0"]);
    run(cmd, Duration::from_secs(30))
}

/// SHA-256 of a PEM certificate's DER, as Python prints it.
fn fingerprint(pem: &Path) -> String {
    let out = Command::new("python3")
        .args(["-c", "import hashlib,ssl,sys; print(hashlib.sha256(ssl.PEM_cert_to_DER_cert(open(sys.argv[1]).read())).hexdigest())"])
        .arg(pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Good TLS clients pinging in a loop on fresh connections (each a full
/// handshake) until stopped: (answered, failed, first failure).
struct Pinger {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Option<String>>>,
}

impl Pinger {
    fn start(port: u16, ca: &Path) -> Pinger {
        let (stop, ok, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (s, o, f, ca) = (stop.clone(), ok.clone(), failed.clone(), ca.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let client = rpcd::tls::Client::new(&rpcd::tls::ClientOptions { ca: Some(ca), ..Default::default() }).unwrap();
            let mut first = None;
            let end = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < end {
                let r = rt.block_on(async {
                    let mut c = rpcd::client::Conn::connect_with(&format!("127.0.0.1:{port}"), Duration::from_secs(3), Some(&client)).await?;
                    c.call("ping", &json!("g"), Duration::from_secs(3)).await
                });
                match r {
                    Ok(r) if r.out == "pong" => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    other => {
                        f.fetch_add(1, Ordering::SeqCst);
                        first.get_or_insert_with(|| format!("{:?}", other.map(|r| r.out).map_err(|e| e.to_string())));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            first
        });
        Pinger { stop, ok, failed, thread: Some(thread) }
    }

    fn answered(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    fn finish(mut self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let first = self.thread.take().unwrap().join().unwrap();
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), first)
    }
}

fn restarts(d: &mut Daemon) -> u64 {
    d.status()["workers"].as_array().unwrap().iter().map(|w| w["restarts"].as_u64().unwrap_or(0)).sum()
}

fn refusal_lines(d: &Daemon) -> usize {
    d.log().lines().filter(|l| l.contains("TLS handshake refused: peer")).count()
}

// ---------- tests ----------

#[test]
fn tls_port_serves_good_clients_and_refuses_bad_ones_cleanly() {
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let other = Ca::new("another CA");
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let other_pem = pki.write("other.pem", &other.pem());
    let (cert, key) = pki.pair("server", ca.issue("server", false, false));
    let mut d = Daemon::start(Opts { workers: 1, extra_server: tls_table(&cert, &key, None), ..Default::default() });
    let workers = d.worker_pids();

    // rpcctl, and the node-less status.
    let out = rpcctl_ping(d.port, &["--tls", "--ca", ca_pem.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("pong \"t\""), "{}", out.stdout);
    let st = d.status();
    assert_eq!(st["tls"]["enabled"], json!(true), "{st}");
    assert_eq!(st["tls"]["client_auth"], json!(false), "{st}");

    // Interop: OpenSSL (Python's ssl) framing the original protocol.
    let out = py_client(d.port, &ca_pem, None);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains(r#"reply {"out":"pi_r","result":3.112540936042491,"id":7}"#), "{}", out.stdout);
    assert!(out.stdout.contains(&format!("cert {}", fingerprint(&cert))), "{}", out.stdout);

    let pinger = Pinger::start(d.port, &ca_pem);
    wait_for("the good client's first answers", Duration::from_secs(10), || (pinger.answered() >= 3).then_some(()));

    // A plain client gets a frame it can read, then the close.
    let mut s = connect(d.port);
    let r = call(&mut s, &json!({"in": "ping", "params": 1}));
    assert_eq!(r["out"], "error");
    assert_eq!(r["result"]["code"], "bad_request", "{r}");
    assert!(r["result"]["message"].as_str().unwrap().contains("TLS"), "{r}");
    assert!(closed_by_peer(&mut s, Duration::from_secs(5)));

    // A server certificate from an unknown CA: the client refuses it.
    let out = rpcctl_ping(d.port, &["--tls", "--ca", other_pem.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("invalid peer certificate: UnknownIssuer"), "{}", out.stderr);

    // A handshake that never finishes: the first byte of a TLS record, then
    // silence. The worker closes it at handshake_timeout_ms (800 ms).
    let mut slow = connect(d.port);
    slow.write_all(&[0x16, 0x03]).unwrap();
    let t = Instant::now();
    assert!(closed_by_peer(&mut slow, Duration::from_secs(10)), "a silent handshake was not closed");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(700), "closed after {waited:?}, before the handshake timeout");

    // 1000 bad handshakes in a burst: garbage records, plain frames and
    // clients that hang up mid-handshake, 50 at a time.
    let before = refusal_lines(&d);
    let mut refused = 0;
    for round in 0..20 {
        let mut socks = Vec::new();
        for i in 0..50 {
            let mut s = connect(d.port);
            let bytes: &[u8] = match (round * 50 + i) % 3 {
                0 => &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5], // a record that is no ClientHello
                1 => b"\x0b\x00\x00\x00{\"in\":\"x\"}", // the plain protocol
                _ => &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], // a ClientHello cut short, then EOF
            };
            s.write_all(bytes).unwrap();
            if (round * 50 + i) % 3 == 2 {
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
            socks.push(s);
        }
        for mut s in socks {
            if closed_by_peer(&mut s, Duration::from_secs(10)) {
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1000, "every bad handshake ends in a close");
    // The log says so at its rate (10 a minute, the default), not 1000 times.
    let logged = refusal_lines(&d) - before;
    assert!(logged <= 10, "{logged} refusal lines for a burst of 1000");

    let (ok, failed, first) = pinger.finish();
    assert_eq!(failed, 0, "the good client failed during the bad ones: {first:?}");
    assert!(ok >= 10, "only {ok} good calls answered");
    assert_eq!(d.worker_pids(), workers, "a worker was replaced");
    assert_eq!(restarts(&mut d), 0);

    // Negative control: the same good client with a CA that did not sign
    // the server's certificate sees every call fail.
    let bad = Pinger::start(d.port, &other_pem);
    wait_for("failures the negative control must see", Duration::from_secs(10), || (bad.failed.load(Ordering::SeqCst) >= 3).then_some(()));
    let (ok, failed, _) = bad.finish();
    assert_eq!(ok, 0);
    assert!(failed >= 3);
}

#[test]
fn mutual_tls_requires_a_client_certificate_from_client_ca() {
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let clients = Ca::new("client CA");
    let other = Ca::new("another client CA");
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let clients_pem = pki.write("clients.pem", &clients.pem());
    let (cert, key) = pki.pair("server", ca.issue("server", false, false));
    let (good_c, good_k) = pki.pair("alice", clients.issue("alice", true, false));
    let (stranger_c, stranger_k) = pki.pair("mallory", other.issue("mallory", true, false));
    let (old_c, old_k) = pki.pair("expired", clients.issue("bob", true, true));
    let mut d = Daemon::start(Opts { workers: 1, extra_server: tls_table(&cert, &key, Some(&clients_pem)), ..Default::default() });
    let workers = d.worker_pids();
    assert_eq!(d.status()["tls"]["client_auth"], json!(true));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let ca_arg = s(&ca_pem);

    let out = rpcctl_ping(d.port, &["--tls", "--ca", &ca_arg, "--cert", &s(&good_c), "--key", &s(&good_k)]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let out = py_client(d.port, &ca_pem, Some((&good_c, &good_k)));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("\"out\":\"pi_r\""), "{}", out.stdout);

    let cases: [(&str, Vec<String>, &str); 3] = [
        ("no certificate", vec![], "no client certificate"),
        ("another CA", vec!["--cert".into(), s(&stranger_c), "--key".into(), s(&stranger_k)], "client certificate refused: UnknownIssuer"),
        ("expired", vec!["--cert".into(), s(&old_c), "--key".into(), s(&old_k)], "client certificate refused: certificate expired"),
    ];
    for (what, extra, logged) in cases {
        let mut args = vec!["--tls".to_string(), "--ca".into(), ca_arg.clone()];
        args.extend(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = rpcctl_ping(d.port, &args);
        assert_eq!(out.code, Some(1), "{what}: {}{}", out.stdout, out.stderr);
        assert!(!out.stdout.contains("pong"), "{what}: {}", out.stdout);
        let t = Instant::now();
        let log = loop {
            let l = d.log();
            if l.contains(logged) {
                break l;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "no refusal ({what}: {logged}) in the log:\n{l}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(log.contains("TLS handshake refused: peer 127.0.0.1:"), "{what}: {log}");
    }
    // Python's ssl without a certificate is refused in the handshake too.
    let out = py_client(d.port, &ca_pem, None);
    assert_ne!(out.code, Some(0), "{}", out.stdout);
    assert!(!out.stdout.contains("reply"), "{}", out.stdout);

    // The good client is still served, by the same worker.
    let out = rpcctl_ping(d.port, &["--tls", "--ca", &ca_arg, "--cert", &s(&good_c), "--key", &s(&good_k)]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(d.worker_pids(), workers);
    assert_eq!(restarts(&mut d), 0);
}

#[test]
fn a_tls_client_on_a_plain_port_gets_a_clear_error_and_the_port_keeps_serving() {
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let workers = d.worker_pids();
    let out = rpcctl_ping(d.port, &["--tls", "--ca", ca_pem.to_str().unwrap()]);
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("TLS handshake failed"), "{}", out.stderr);
    let out = py_client(d.port, &ca_pem, None);
    assert_ne!(out.code, Some(0));
    let out = rpcctl_ping(d.port, &[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(d.status()["tls"]["enabled"], json!(false));
    assert_eq!(d.worker_pids(), workers);
    assert_eq!(restarts(&mut d), 0);
}

#[test]
fn reload_rereads_the_certificate_a_bad_one_changes_nothing_and_open_sessions_go_on() {
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let (cert, key) = pki.pair("server", ca.issue("server one", false, false));
    let first = fingerprint(&cert);
    let mut d = Daemon::start(Opts { workers: 2, extra_server: tls_table(&cert, &key, None), ..Default::default() });

    // A session opened before the reloads, kept open across them.
    let mut held = Command::new("python3")
        .args(["-c", PY_CLIENT, &d.port.to_string()])
        .arg(&ca_pem)
        .args(["", "", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = std::io::BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    for _ in 0..2 {
        held_out.read_line(&mut line).unwrap();
    }
    assert!(line.contains(&format!("cert {first}")) && line.contains("pi_r"), "{line}");

    // A key that is not the certificate's: the reload fails, says why, and
    // the running certificate stays.
    let (_, stray_key) = ca.issue("stray", false, false);
    std::fs::write(&key, &stray_key).unwrap();
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("server.tls.key") && err.contains("is not the key of the certificate"), "{err}");
    // A file that is not PEM at all, and one that is missing: the same.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let out = d.ctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.tls.cert"), "{out:?}");
    let out = py_client(d.port, &ca_pem, None);
    assert!(out.stdout.contains(&format!("cert {first}")), "the old certificate is no longer served: {}", out.stdout);
    assert_eq!(d.status()["generation"], json!(1));

    // A new certificate: the next reload serves it to new connections.
    let (c2, k2) = ca.issue("server two", false, false);
    std::fs::write(&cert, &c2).unwrap();
    std::fs::write(&key, &k2).unwrap();
    let second = fingerprint(&cert);
    assert_ne!(first, second);
    let (socket, config) = (d.socket.clone(), d.config.clone());
    let reload = std::thread::spawn(move || {
        let mut c = Command::new(RPCCTL);
        c.arg("--socket").arg(&socket).arg("reload");
        let _ = config;
        run(c, Duration::from_secs(60))
    });
    // The old workers hand their plain connections over; the TLS session
    // stays with its worker, which goes on serving it (until 2 s before
    // graceful_timeout_secs, 5 here): its next request is answered.
    wait_for("the old worker keeping its TLS session", Duration::from_secs(20), || d.log().contains("TLS sessions cannot be handed over").then_some(()));
    let out = py_client(d.port, &ca_pem, None);
    assert!(out.stdout.contains(&format!("cert {second}")), "{}", out.stdout);
    held.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    held_out.read_line(&mut line).unwrap();
    assert!(line.contains(r#"reply {"out":"pong","result":"after"}"#), "the held session was not answered: {line:?}\n{}", d.log());
    let st = held.wait().unwrap();
    assert!(st.success());
    let out = reload.join().unwrap();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(d.status()["generation"], json!(2));
}

#[test]
fn check_config_validates_the_certificate_and_key() {
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let (cert, key) = pki.pair("server", ca.issue("server", false, false));
    let (_, other_key) = pki.pair("other", ca.issue("other", false, false));
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let check = |tls: String| {
        let cfg = pki.write("rpcd.toml", &format!("[server]\nlisten = \"127.0.0.1:1\"\n{tls}\n[zookeeper]\nenabled = false\n"));
        let mut c = Command::new(RPCD);
        c.arg("--check-config").arg("--config").arg(cfg);
        run(c, Duration::from_secs(10))
    };
    let out = check(tls_table(&cert, &key, Some(&ca_pem)));
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let out = check(tls_table(&cert, &other_key, None));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("is not the key of the certificate"), "{}", out.stderr);
    let out = check(tls_table(&cert, Path::new("/nonexistent/key.pem"), None));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("server.tls.key: cannot read /nonexistent/key.pem"), "{}", out.stderr);
    let out = check(tls_table(&key, &key, None));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("no certificate"), "{}", out.stderr);
    let out = check(format!("\n[server.tls]\ncert = \"{}\"\n", cert.display()));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("server.tls.cert") && out.stderr.contains("without server.tls.key"), "{}", out.stderr);
    let out = check(tls_table(&cert, &key, Some(&key)));
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("server.tls.client_ca"), "{}", out.stderr);
}

#[test]
fn discovery_uses_tls_for_nodes_that_say_so() {
    if !zk_available() {
        panic!("ZooKeeper is not installed");
    }
    let zk = ZkServer::start();
    let pki = Pki::new();
    let ca = Ca::new("rpcd test CA");
    let ca_pem = pki.write("ca.pem", &ca.pem());
    let (cert, key) = pki.pair("server", ca.issue("server", false, false));
    let zk_cfg = format!("hosts = \"{}\"\nroot = \"/tlsdemo\"", zk.hosts());
    let mut tls = Daemon::start(Opts { workers: 1, zookeeper: Some(zk_cfg.clone()), extra_server: tls_table(&cert, &key, None), ..Default::default() });
    let mut plain = Daemon::start(Opts { workers: 1, zookeeper: Some(zk_cfg), ..Default::default() });
    let nodes = wait_for("two nodes", Duration::from_secs(20), || {
        let c = zk.children("/tlsdemo");
        (c.len() == 2).then_some(c)
    });
    for (_, data) in &nodes {
        let port = data["port"].as_u64().unwrap() as u16;
        if port == tls.port {
            assert_eq!(data["tls"], json!(true), "{data}");
        } else {
            assert_eq!(port, plain.port);
            assert!(data.get("tls").is_none(), "a plain node says tls: {data}");
        }
    }
    // Without --tls, rpcctl uses TLS for the node that says so, plain for the other.
    let mut c = Command::new(RPCCTL);
    c.args(["call", "ping", "\"z\"", "--zk", &zk.hosts(), "--root", "/tlsdemo", "--count", "20", "--strategy", "round-robin", "--ca"]).arg(&ca_pem);
    let out = run(c, Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    for port in [tls.port, plain.port] {
        assert!(out.stdout.contains(&format!("127.0.0.1:{port} pong \"z\"")), "{port} did not answer: {}", out.stdout);
    }
    let mut c = Command::new(RPCCTL);
    c.args(["servers", "--zk", &zk.hosts(), "--root", "/tlsdemo", "--json", "--ca"]).arg(&ca_pem);
    let out = run(c, Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let checks: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["check"].as_str().unwrap()).collect();
    assert!(checks.contains(&"ok (tls)") && checks.contains(&"ok (plain)"), "{checks:?}");
    let _ = (tls.status(), plain.status());
}
