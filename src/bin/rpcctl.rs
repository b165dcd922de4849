use clap::{Parser, Subcommand};
use rpcd::client::{Caller, Strategy};
use rpcd::config::{Config, DEFAULT_PATH};
use rpcd::control::{Client, ClientError};
use rpcd::discovery::Servers;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

/// rpcctl: control rpcd through its control socket, and call RPC servers found in ZooKeeper.
#[derive(Parser)]
#[command(name = "rpcctl", version, about)]
struct Args {
    /// Control socket of the daemon (default: control.socket from --config).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Daemon configuration file, to find the control socket.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// TLS to the servers (SPEC §9).
#[derive(clap::Args, Clone)]
struct TlsArgs {
    /// Use TLS with every server (without it: with the servers whose node says "tls": true).
    #[arg(long)]
    tls: bool,
    /// CA certificates (PEM) to verify servers with (default: the system's).
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that require one (mutual TLS).
    #[arg(long, value_name = "PATH", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PATH", requires = "cert")]
    key: Option<PathBuf>,
    /// Verify the server's certificate for this name (default: the host connected to).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
}

impl TlsArgs {
    fn options(&self) -> rpcd::tls::ClientOptions {
        rpcd::tls::ClientOptions { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone(), server_name: self.server_name.clone() }
    }

    /// Whether any TLS option was given.
    fn any(&self) -> bool {
        self.tls || self.ca.is_some() || self.cert.is_some() || self.server_name.is_some()
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the daemon's state and workers (exit 3 when it is not running).
    Status {
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon gracefully; returns once it has exited and prints the reaped worker PIDs.
    Stop {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
        /// The service manager starts rpcd again at once (what SIGTERM does
        /// during `systemctl restart`): hand the open connections and the
        /// ZooKeeper registration over through its file descriptor store
        /// instead of deregistering and draining.
        #[arg(long)]
        restart: bool,
    },
    /// Reload the configuration; returns once the reload is complete (exit 1 if it was refused).
    Reload {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
    },
    /// Upgrade in place: the daemon re-executes the binary at its path (after a
    /// package upgrade, the new one) in the same PID, keeping its sockets and
    /// connections; returns once the new binary's workers serve (exit 1, with
    /// the reason, if the new binary cannot take over: the old one serves on).
    Upgrade {
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
    },
    /// Call METHOD on a server found in ZooKeeper (--zk) or at a fixed address (--addr).
    Call {
        /// Method name, e.g. ping or pi.
        method: String,
        /// Parameters as JSON (default null).
        params: Option<String>,
        /// ZooKeeper connect string to discover servers.
        #[arg(long, value_name = "HOSTS", conflicts_with = "addr", required_unless_present = "addr")]
        zk: Option<String>,
        /// ZooKeeper path where servers register.
        #[arg(long, default_value = "/demo", value_name = "PATH")]
        root: String,
        /// Call this server directly (HOST:PORT).
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
        /// Number of calls.
        #[arg(long, default_value_t = 1, value_name = "N")]
        count: u64,
        /// Seconds between calls.
        #[arg(long, default_value_t = 0.0, value_name = "SECS")]
        interval: f64,
        /// How a server is chosen for each call.
        #[arg(long, value_enum, default_value_t = Strategy::Random)]
        strategy: Strategy,
        /// Per-call time limit in seconds (retries included).
        #[arg(long, default_value_t = 10.0, value_name = "SECS")]
        timeout: f64,
        /// Time limit of one connect in seconds; then another server is tried.
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        connect_timeout: f64,
        /// Idempotent calls only: seconds to wait for one server's reply
        /// before trying another (default: a third of --timeout).
        #[arg(long, value_name = "SECS")]
        attempt_timeout: Option<f64>,
        /// The method is safe to run twice: retry it on another server even
        /// when the connection was lost after it was sent (ping and pi are).
        #[arg(long)]
        idempotent: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// List the servers that discovery sees in ZooKeeper.
    Servers {
        /// ZooKeeper connect string.
        #[arg(long, value_name = "HOSTS")]
        zk: String,
        /// ZooKeeper path where servers register.
        #[arg(long, default_value = "/demo", value_name = "PATH")]
        root: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// With any TLS option: also connect to each server (TLS where its
        /// node says so, or with --tls), ping it, and say how that went.
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Print the shell completion script for SHELL (bash, zsh or fish).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: rpcd::completions::Shell,
    },
}

fn socket_path(args: &Args) -> PathBuf {
    if let Some(s) = &args.socket {
        return s.clone();
    }
    let path = args.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    match Config::load(&path) {
        Ok(c) => c.control.socket,
        Err(e) => {
            // An invalid file still names its socket: let the daemon say
            // what is wrong with it (reload reports the key and line).
            let lenient = std::fs::read_to_string(&path).ok().and_then(|t| t.parse::<toml::Table>().ok()).and_then(|t| {
                t.get("control")?.get("socket")?.as_str().map(PathBuf::from)
            });
            match lenient {
                Some(p) => p,
                None if args.config.is_some() && !path.exists() => {
                    eprintln!("rpcctl: {e}");
                    exit(1);
                }
                None => rpcd::config::ControlConfig::default().socket,
            }
        }
    }
}

fn die(e: ClientError) -> ! {
    eprintln!("rpcctl: {e}");
    exit(match e {
        ClientError::NotRunning(_) => 3,
        ClientError::Other(_) => 1,
    })
}

fn fmt_secs(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}min {}s", s / 60, s % 60),
        _ => format!("{}h {}min", s / 3600, (s % 3600) / 60),
    }
}

fn print_status(v: &Value) {
    println!("rpcd (pid {}) - {} since {} ago", v["pid"], v["state"].as_str().unwrap_or("?"), fmt_secs(v["uptime_secs"].as_f64().unwrap_or(0.0)));
    println!("     Config: {}", v["config"].as_str().unwrap_or("?"));
    match v["listener"].as_str() {
        Some(origin) => println!("     Listen: {} ({origin})", v["listen"].as_str().unwrap_or("?")),
        None => println!("     Listen: {}", v["listen"].as_str().unwrap_or("?")),
    }
    if v["tls"]["enabled"].as_bool() == Some(true) {
        let mtls = if v["tls"]["client_auth"].as_bool() == Some(true) { ", client certificates required" } else { "" };
        println!("        TLS: on ({}{mtls})", v["tls"]["cert"].as_str().unwrap_or("?"));
    }
    println!(" Generation: {}", v["generation"]);
    if let Some(m) = v["metrics"].as_str() {
        println!("    Metrics: {m}");
    }
    let zk = &v["zookeeper"];
    match zk["node"].as_str() {
        Some(n) => println!("  ZooKeeper: {} ({n})", zk["state"].as_str().unwrap_or("?")),
        None => println!("  ZooKeeper: {}", zk["state"].as_str().unwrap_or("?")),
    }
    let workers = v["workers"].as_array().cloned().unwrap_or_default();
    println!("    Workers: {}", workers.len());
    println!("      {:>8}  {:<9} {:>4} {:>10} {:>12} {:>6} {:>8}  HANDLERS", "PID", "STATE", "GEN", "UPTIME", "REQUESTS", "CONNS", "RESTARTS");
    for w in &workers {
        println!(
            "      {:>8}  {:<9} {:>4} {:>10} {:>12} {:>6} {:>8}  {}",
            w["pid"].to_string(),
            w["state"].as_str().unwrap_or("?"),
            w["generation"].to_string(),
            fmt_secs(w["uptime_secs"].as_f64().unwrap_or(0.0)),
            w["requests"].to_string(),
            w["connections"].to_string(),
            w["restarts"].to_string(),
            handler_pids(&w["handlers"])
        );
    }
    for b in v["backoff"].as_array().cloned().unwrap_or_default() {
        println!("      slot {} crash-looping: {} restarts, next start in {:.1}s", b["slot"], b["restarts"], b["respawn_in_secs"].as_f64().unwrap_or(0.0));
    }
    print_methods(&v["methods"]);
}

/// Per method: the last minute's requests, errors, p50 and p99, and the
/// totals since the start.
fn print_methods(m: &Value) {
    let Some(by) = m["by_method"].as_object().filter(|b| !b.is_empty()) else { return };
    println!("    Methods: last {}", fmt_secs(m["window_secs"].as_f64().unwrap_or(0.0)));
    println!("      {:<20} {:>10} {:>8} {:>10} {:>10} {:>12} {:>8}", "METHOD", "REQUESTS", "ERRORS", "P50", "P99", "TOTAL", "ERRORS");
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| if x < 1.0 { format!("{:.0}us", x * 1000.0) } else { format!("{x:.1}ms") });
    for (name, s) in by {
        println!(
            "      {:<20} {:>10} {:>8} {:>10} {:>10} {:>12} {:>8}",
            name,
            s["requests"].to_string(),
            s["errors"].to_string(),
            ms(&s["p50_ms"]),
            ms(&s["p99_ms"]),
            s["total_requests"].to_string(),
            s["total_errors"].to_string()
        );
    }
}

/// `pool: PID PID; other: PID`, or `-` without handlers.
fn handler_pids(h: &Value) -> String {
    let Some(m) = h.as_object().filter(|m| !m.is_empty()) else { return "-".into() };
    m.iter()
        .map(|(name, pids)| {
            let list: Vec<String> = pids.as_array().into_iter().flatten().map(|p| p.to_string()).collect();
            format!("{name}: {}", if list.is_empty() { "none".into() } else { list.join(" ") })
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn control(args: &Args, cmd: &str, timeout: Duration) -> (Client, Value) {
    control_request(args, json!({"cmd": cmd}), timeout)
}

fn control_request(args: &Args, req: Value, timeout: Duration) -> (Client, Value) {
    let cmd = req["cmd"].as_str().unwrap_or("").to_string();
    let path = socket_path(args);
    let mut c = Client::connect(&path).unwrap_or_else(|e| die(e));
    let v = c.request(req, timeout).unwrap_or_else(|e| die(e));
    if v["ok"] != Value::Bool(true) {
        eprintln!("rpcctl: {cmd} failed: {}", v["error"].as_str().unwrap_or("unknown error"));
        exit(1);
    }
    (c, v)
}

/// `rpcctl upgrade`: asks for the exec, then follows `status` until the
/// new image has its own workers serving, or says why not.
fn upgrade(args: &Args, timeout: Duration) {
    let (mut c, v) = control(args, "upgrade", Duration::from_secs(30));
    let pid = v["pid"].as_i64().unwrap_or(0);
    if v["unchanged"] == Value::Bool(true) {
        println!("rpcd (pid {pid}) already runs {}: nothing to upgrade", v["exe"].as_str().unwrap_or("?"));
        return;
    }
    let before = v["upgrades"].as_u64().unwrap_or(0);
    let from = v["from_version"].as_str().unwrap_or("?").to_string();
    // The exec closes this connection; the control socket stays and the
    // new image answers on it.
    c.wait_closed(Duration::from_secs(10));
    let path = socket_path(args);
    let end = std::time::Instant::now() + timeout;
    let mut last = String::new();
    while std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(mut c) = Client::connect(&path) else { continue };
        let Ok(st) = c.call("status", Duration::from_secs(10)) else { continue };
        if st["pid"].as_i64() != Some(pid) {
            die(ClientError::Other(format!("rpcd now runs as pid {} instead of {pid}: the upgrade ended the process (the service manager restarted it)", st["pid"])));
        }
        let u = &st["upgrade"];
        let count = u["count"].as_u64().unwrap_or(0);
        let state = u["state"].as_str().unwrap_or("");
        if state == "failed" {
            eprintln!("rpcctl: upgrade failed: {}", u["error"].as_str().unwrap_or("unknown error"));
            if count == before {
                eprintln!("rpcctl: rpcd (pid {pid}) serves on with the previous binary");
            }
            exit(1);
        }
        if count > before && state == "done" {
            let workers: Vec<String> = st["workers"].as_array().into_iter().flatten().map(|w| w["pid"].to_string()).collect();
            println!(
                "upgraded rpcd (pid {pid}) in place: {} {} (was {from}); generation {}, workers: {}",
                st["exe"].as_str().unwrap_or("?"),
                st["version"].as_str().unwrap_or("?"),
                st["generation"],
                workers.join(" ")
            );
            return;
        }
        last = format!("{state} ({} worker(s))", st["workers"].as_array().map(Vec::len).unwrap_or(0));
    }
    eprintln!("rpcctl: the upgrade did not finish within {timeout:?}; last state: {last}");
    exit(1);
}

/// `rpcctl completions SHELL`: generated from this command line itself.
/// Connects to `addr` (with TLS when given) and pings it: "ok (tls)",
/// "ok (plain)" or what failed.
async fn probe(addr: &str, tls: Option<&rpcd::tls::Client>) -> String {
    let how = if tls.is_some() { "tls" } else { "plain" };
    let mut conn = match rpcd::client::Conn::connect_with(addr, Duration::from_secs(3), tls).await {
        Ok(c) => c,
        Err(e) => return format!("FAILED ({how}): {e}"),
    };
    match conn.call("ping", &json!("probe"), Duration::from_secs(3)).await {
        Ok(r) if r.out == "pong" => format!("ok ({how})"),
        Ok(r) => format!("FAILED ({how}): {} {}", r.out, r.result),
        Err(e) => format!("FAILED ({how}): {e}"),
    }
}

fn completions(shell: rpcd::completions::Shell) -> ! {
    let mut cmd = <Args as clap::CommandFactory>::command();
    let name = cmd.get_name().to_string();
    rpcd::completions::print_and_exit(shell, &mut cmd, &name)
}

fn main() {
    // A closed stdout (`rpcctl ... | head -1`) ends rpcctl quietly, as it
    // does other command-line tools, instead of a panic on the next print.
    // SAFETY: setting a signal's disposition at start, before any thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args = Args::parse();
    log::set_max_level(log::LevelFilter::Warn);
    rpcd::logging::init(
        &rpcd::config::LogConfig { target: rpcd::config::LogTarget::Stderr, level: rpcd::config::LogLevel::Warn, ..Default::default() },
        "rpcctl: ",
    );
    match &args.cmd {
        Cmd::Status { json } => {
            let (_, v) = control(&args, "status", Duration::from_secs(10));
            if *json {
                println!("{v}");
            } else {
                print_status(&v);
            }
        }
        Cmd::Stop { timeout, restart } => {
            let req = if *restart { json!({"cmd": "stop", "restart": true}) } else { json!({"cmd": "stop"}) };
            let (mut c, v) = control_request(&args, req, Duration::from_secs(*timeout));
            if !c.wait_closed(Duration::from_secs(10)) {
                eprintln!("rpcctl: the daemon replied but has not exited within 10s");
                exit(1);
            }
            let pid = v["pid"].as_i64().unwrap_or(0) as i32;
            // The control connection closes as the master exits; wait for the process to be gone.
            for _ in 0..100 {
                match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    Ok(s) if !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => break,
                }
            }
            let reaped = v["reaped"].as_array().cloned().unwrap_or_default();
            let pids: Vec<String> = reaped.iter().map(|r| r["pid"].to_string()).collect();
            let verb = if v["handed_over"].is_u64() { "stopped rpcd for a restart" } else { "stopped rpcd" };
            println!("{verb} (pid {pid}); reaped {} worker(s): {}", reaped.len(), pids.join(" "));
            if let Some(n) = v["handed_over"].as_u64() {
                println!("  handed over: {n} connection(s), the listener and the ZooKeeper registration");
            }
            for r in &reaped {
                println!("  {} {}", r["pid"], r["status"].as_str().unwrap_or(""));
                for h in r["handlers"].as_array().into_iter().flatten() {
                    println!("    handler {} {} {}", h["handler"].as_str().unwrap_or("?"), h["pid"], h["status"].as_str().unwrap_or(""));
                }
            }
        }
        Cmd::Upgrade { timeout } => upgrade(&args, Duration::from_secs(*timeout)),
        Cmd::Reload { timeout } => {
            let (_, v) = control(&args, "reload", Duration::from_secs(*timeout));
            let list = |k: &str| v[k].as_array().map(|a| a.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")).unwrap_or_default();
            println!("reloaded: generation {}; new workers: {}; retired: {}", v["generation"], list("new_pids"), list("old_pids"));
            for w in v["warnings"].as_array().cloned().unwrap_or_default() {
                println!("warning: {}", w.as_str().unwrap_or(""));
            }
        }
        Cmd::Call { method, params, zk, root, addr, count, interval, strategy, timeout, connect_timeout, attempt_timeout, idempotent, tls } => {
            if let Err(e) = rpcd::tls::Client::new(&tls.options()).map(drop).or_else(|e| if tls.any() { Err(e) } else { Ok(()) }) {
                eprintln!("rpcctl: {e}");
                exit(2);
            }
            let params: Value = match params {
                None => Value::Null,
                Some(p) => serde_json::from_str(p).unwrap_or_else(|e| {
                    eprintln!("rpcctl: PARAMS is not JSON: {e}");
                    exit(2)
                }),
            };
            let secs = |s: f64| Duration::from_secs_f64(if s.is_finite() { s.clamp(0.001, 1e9) } else { 1e9 });
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let (failed, made, stopped) = rt.block_on(async {
                // SIGINT or SIGTERM: stop after the call in progress and say
                // how many were made (as ping(8) does); a second one ends at once.
                let stop = std::sync::Arc::new(tokio::sync::Notify::new());
                let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (stop, stopping) = (stop.clone(), stopping.clone());
                    let (mut int, mut term) = (signal(SignalKind::interrupt()).expect("SIGINT"), signal(SignalKind::terminate()).expect("SIGTERM"));
                    tokio::spawn(async move {
                        for _ in 0..2 {
                            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                            if stopping.swap(true, std::sync::atomic::Ordering::SeqCst) {
                                exit(130);
                            }
                            stop.notify_one();
                        }
                    });
                }
                let servers = match (zk, addr) {
                    (Some(z), _) => Servers::watch(z, root),
                    (None, Some(a)) => Servers::fixed(a),
                    _ => unreachable!(),
                };
                let mut caller = Caller::new(servers, *strategy);
                caller.timeout = secs(*timeout);
                caller.connect_timeout = secs(*connect_timeout);
                caller.attempt_timeout = attempt_timeout.map(secs);
                if *idempotent {
                    caller.idempotent = Some(true);
                }
                caller.tls_options = tls.options();
                caller.tls_always = tls.tls;
                let (mut failed, mut made) = (0u64, 0u64);
                let stopped = || stopping.load(std::sync::atomic::Ordering::SeqCst);
                for i in 0..*count {
                    if stopped() {
                        break;
                    }
                    if i > 0 && *interval > 0.0 {
                        tokio::select! {
                            _ = tokio::time::sleep(secs(*interval)) => {}
                            _ = stop.notified() => break,
                        }
                    }
                    made += 1;
                    match caller.call(method, &params).await {
                        Ok(a) => println!("{} {} {}", a.server, a.response.out, a.response.result),
                        Err(e) => {
                            failed += 1;
                            println!("FAILED {e}");
                            eprintln!("rpcctl: call {} failed: {e}", i + 1);
                        }
                    }
                }
                (failed, made, stopped())
            });
            if stopped {
                eprintln!("rpcctl: stopped after {made} of {count} call(s); {failed} failed");
            }
            if failed > 0 {
                if !stopped {
                    eprintln!("rpcctl: {failed} of {count} call(s) failed");
                }
                exit(1);
            }
        }
        Cmd::Servers { zk, root, json, tls } => {
            let client = match tls.any().then(|| rpcd::tls::Client::new(&tls.options())).transpose() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rpcctl: {e}");
                    exit(2);
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let list = rt.block_on(async {
                let list = Servers::watch(zk, root).first(Duration::from_secs(15)).await?;
                let mut checks = Vec::new();
                if let Some(c) = &client {
                    for s in &list {
                        checks.push(probe(&s.addr(), (tls.tls || s.tls()).then_some(c)).await);
                    }
                }
                Ok::<_, String>((list, checks))
            });
            match list {
                Ok((list, checks)) => {
                    if *json {
                        let mut v = serde_json::to_value(&list).unwrap_or_default();
                        if let Some(a) = v.as_array_mut() {
                            for (s, c) in a.iter_mut().zip(&checks) {
                                s["check"] = json!(c);
                            }
                        }
                        println!("{v}");
                    } else {
                        for (i, s) in list.iter().enumerate() {
                            match checks.get(i) {
                                Some(c) => println!("{} {} {} {c}", s.node, s.addr(), s.data),
                                None => println!("{} {} {}", s.node, s.addr(), s.data),
                            }
                        }
                    }
                    if checks.iter().any(|c| c.starts_with("FAILED")) {
                        exit(1);
                    }
                }
                Err(e) => {
                    eprintln!("rpcctl: {e} ({zk})");
                    exit(1);
                }
            }
        }
        Cmd::Completions { shell } => completions(*shell),
    }
}
