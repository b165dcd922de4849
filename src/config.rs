//! `/etc/rpcd.toml`: parsing, defaults and validation.
//!
//! Every key has a default. Unknown keys and wrong types are errors that name
//! the key and the line (`rpcd --check-config` prints them).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/rpcd.toml";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub zookeeper: ZkConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
    /// `[metrics]`: the Prometheus endpoint (SPEC §8).
    pub metrics: MetricsConfig,
    /// `[methods.NAME]`: settings of built-in and in-process methods, and
    /// the routes of handler-backed ones (SPEC §7).
    pub methods: BTreeMap<String, MethodConfig>,
    /// `[handlers.NAME]`: pools of handler processes (SPEC §7).
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// What `server.tls` and `zookeeper.auth_file` name, read by
    /// [`Config::load_secrets`] (never from the TOML text, never sent to a
    /// worker with the config: the TLS material goes in the worker's setup).
    #[serde(skip)]
    pub secrets: Secrets,
}

/// The contents of the files the configuration names for security (SPEC §9).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Secrets {
    /// The certificate chain, key and client CAs of `[server.tls]`, checked.
    pub tls: Option<crate::tls::Material>,
    /// The ZooKeeper credentials of `zookeeper.auth_file`, checked.
    pub zk_auth: Option<crate::zk::Auth>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            zookeeper: ZkConfig::default(),
            control: ControlConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            methods: BTreeMap::from([("pi".to_string(), MethodConfig { max_terms: Some(DEFAULT_PI_MAX_TERMS), ..Default::default() })]),
            handlers: BTreeMap::new(),
            secrets: Secrets::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// host:port to bind.
    pub listen: String,
    /// host:port written to ZooKeeper (default: derived from `listen`).
    pub advertise: Option<String>,
    pub workers: Workers,
    pub max_frame_bytes: u32,
    pub graceful_timeout_secs: u64,
    /// listen(2) backlog.
    pub backlog: u32,
    /// Open connections per worker; further ones get `overloaded`.
    pub max_connections: u32,
    /// A connection that sends nothing for this long is closed (0 = never).
    pub idle_timeout_secs: u64,
    /// A reply that the client does not read within this long closes the connection.
    pub write_timeout_secs: u64,
    /// How often workers report to the master.
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is killed and replaced.
    pub heartbeat_timeout_secs: u64,
    /// New workers must report that they accept within this long (start and reload).
    pub ready_timeout_secs: u64,
    /// A request slower than this is logged, once (0 = off).
    pub slow_request_ms: u64,
    /// `[server.tls]`: TLS on the listen port when `cert` and `key` are set (SPEC §9).
    pub tls: TlsConfig,
}

/// `[server.tls]` (SPEC §9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates: when set, clients must present a certificate
    /// signed by one of them (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// A client that has not finished its handshake within this long is
    /// disconnected.
    pub handshake_timeout_ms: u64,
    /// Refused handshakes logged per worker per minute; the rest are
    /// counted and summed up in one line.
    pub log_refusals_per_minute: u32,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig { cert: None, key: None, client_ca: None, handshake_timeout_ms: 10_000, log_refusals_per_minute: 10 }
    }
}

impl TlsConfig {
    /// Whether the listen port speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some() && self.key.is_some()
    }
}

/// `[metrics]`: where the master serves `GET /metrics` (off when empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: String,
}

impl MetricsConfig {
    /// The address to serve on, if any (validated).
    pub fn addr(&self) -> Option<SocketAddr> {
        (!self.listen.trim().is_empty()).then(|| resolve_addr(&self.listen).expect("validated"))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8001".into(),
            advertise: None,
            workers: Workers::Count(4),
            max_frame_bytes: 1_048_576,
            graceful_timeout_secs: 10,
            backlog: 1024,
            max_connections: 10_000,
            idle_timeout_secs: 300,
            write_timeout_secs: 30,
            heartbeat_interval_ms: 1000,
            heartbeat_timeout_secs: 10,
            ready_timeout_secs: 30,
            slow_request_ms: 0,
            tls: TlsConfig::default(),
        }
    }
}

/// `workers = 4` or `workers = "auto"` (one per CPU).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workers {
    Auto,
    Count(u32),
}

impl Workers {
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n as usize,
            Workers::Auto => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }
    }
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer >= 1 or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Workers, E> {
                if (1..=1024).contains(&v) {
                    Ok(Workers::Count(v as u32))
                } else {
                    Err(E::custom(format!("workers must be between 1 and 1024, got {v}")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Workers, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Workers, E> {
                if v == "auto" {
                    Ok(Workers::Auto)
                } else {
                    Err(E::custom(format!("expected an integer >= 1 or \"auto\", got \"{v}\"")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ZkConfig {
    pub enabled: bool,
    pub hosts: String,
    pub root: String,
    pub node_prefix: String,
    pub session_timeout_ms: u64,
    /// After deleting our node on stop, wait this long before draining so
    /// that watchers can react.
    pub deregister_delay_ms: u64,
    /// Cap of the reconnect backoff.
    pub max_retry_delay_ms: u64,
    /// Weight written into the node data.
    pub weight: u32,
    /// `user:password` for ZooKeeper's digest scheme: the session
    /// authenticates, and what rpcd creates is creator-all, world-read (SPEC §9).
    pub auth_file: Option<PathBuf>,
}

impl Default for ZkConfig {
    fn default() -> Self {
        ZkConfig {
            enabled: true,
            hosts: "127.0.0.1:2181".into(),
            root: "/demo".into(),
            node_prefix: "rpc".into(),
            session_timeout_ms: 10_000,
            deregister_delay_ms: 1000,
            max_retry_delay_ms: 5000,
            weight: 1,
            auth_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Octal file mode of the socket, e.g. "0660".
    pub mode: String,
    /// Group owning the socket (name or number); default: the daemon's group.
    pub group: Option<String>,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/rpcd/control.sock"),
            mode: "0660".into(),
            group: None,
            allow_uids: vec![],
            allow_gids: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Auto,
    Syslog,
    Stderr,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub target: LogTarget,
    pub level: LogLevel,
    /// Unix datagram socket of the syslog daemon.
    pub syslog_socket: PathBuf,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { target: LogTarget::Auto, level: LogLevel::Info, syslog_socket: PathBuf::from("/dev/log") }
    }
}

/// `pi(n)` above this many terms is `bad_params` unless `[methods.pi]` says otherwise.
pub const DEFAULT_PI_MAX_TERMS: u64 = 10_000_000;
/// `[methods.NAME] timeout_ms` when unset.
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
/// `[methods.NAME] queue` when unset.
pub const DEFAULT_QUEUE: u32 = 64;

/// `[methods.NAME]`. Which keys apply depends on the method: `max_terms`
/// only to the built-in `pi`; `handler` and `queue` only to methods served
/// by handler processes; `timeout_ms` to those and to in-process async ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    /// The `[handlers.NAME]` pool that serves this method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    /// Deadline from receipt, queueing included; then `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Requests waiting for a free handler process, per worker; then `overloaded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// `pi` only: larger n is answered with `bad_params`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_terms: Option<u64>,
}

impl MethodConfig {
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS))
    }
    pub fn queue(&self) -> usize {
        self.queue.unwrap_or(DEFAULT_QUEUE) as usize
    }
}

/// `warmup = { in = "ping", params = ... }`: a request that a new handler
/// process must answer (with anything but an error) before it takes traffic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Warmup {
    #[serde(rename = "in")]
    pub method: String,
    /// TOML has no null: leave `params` out to send null.
    #[serde(default)]
    pub params: serde_json::Value,
}

fn default_dir() -> PathBuf {
    PathBuf::from("/")
}
fn one() -> u32 {
    1
}
fn default_kill_grace_ms() -> u64 {
    1000
}

/// `[handlers.NAME]`: a pool of handler processes, `processes` per worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// argv, no shell. A bare program name is looked up in PATH when the
    /// config is loaded (the handler's own environment starts empty).
    pub exec: Vec<String>,
    /// Working directory; a relative program path is taken from here.
    #[serde(default = "default_dir")]
    pub dir: PathBuf,
    /// The environment is cleared, then this, then `RPCD_FD`, `RPCD_HANDLER`
    /// and `RPCD_MAX_FRAME_BYTES` (names starting with `RPCD_` are rpcd's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Handler processes per worker.
    #[serde(default = "one")]
    pub processes: u32,
    /// Requests in flight per process (> 1: the handler answers by id).
    #[serde(default = "one")]
    pub max_inflight: u32,
    /// Recycle a process after this many requests (0 = never) ...
    #[serde(default)]
    pub max_requests: u64,
    /// ... plus a random 0..=jitter, so that they do not all recycle at once.
    #[serde(default)]
    pub max_requests_jitter: u64,
    /// Recycle a process whose RSS is above this (0 = never).
    #[serde(default)]
    pub max_rss_mb: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
    /// After EOF on its channel a handler has this long to exit, then
    /// SIGTERM to its process group, then after as long again SIGKILL.
    #[serde(default = "default_kill_grace_ms")]
    pub kill_grace_ms: u64,
}

impl HandlerConfig {
    pub fn kill_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.kill_grace_ms)
    }
}

/// A configuration error, formatted as `PATH:LINE:COL: key `a.b`: message`.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Byte offset of `key = ` for a dotted path such as `server.workers`, or
/// of the table header `[methods.add]` for a table's path.
fn find_key(text: &str, path: &str) -> Option<usize> {
    if let Some(at) = find_header(text, path) {
        return Some(at);
    }
    let mut parts: Vec<&str> = path.split('.').collect();
    let key = parts.pop()?;
    let table = parts.join(".");
    let mut in_table = table.is_empty();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_start_matches('[').split(']').next().unwrap_or("").trim();
            in_table = name == table;
        } else if in_table {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim().trim_matches('"') == key {
                    return Some(offset + line.find(k.trim()).unwrap_or(0));
                }
            }
        }
        offset += line.len();
    }
    None
}

/// The methods a binary serves in-process: rpcd's built-ins, plus a library
/// user's own (see [`crate::methods`]). Config validation needs them to tell
/// a handler route from a duplicate definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InProcess {
    /// Name → whether it is asynchronous (only those take `timeout_ms`).
    pub methods: BTreeMap<String, bool>,
}

impl InProcess {
    /// The built-in methods only (`ping`, `pi`), as the `rpcd` binary has.
    pub fn builtin() -> InProcess {
        InProcess { methods: BTreeMap::from([("ping".to_string(), false), ("pi".to_string(), false)]) }
    }
}

/// Byte offset of the header `[path]` (spaces and quotes as TOML allows).
fn find_header(text: &str, path: &str) -> Option<usize> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            let name = t.trim_start_matches('[').split(']').next().unwrap_or("");
            let name: Vec<String> = name.split('.').map(|p| p.trim().trim_matches('"').to_string()).collect();
            if name.join(".") == path {
                return Some(offset + line.find('[').unwrap_or(0));
            }
        }
        offset += line.len();
    }
    None
}

impl Config {
    /// Parses TOML text; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_for(text, origin, &InProcess::builtin())
    }

    /// [`Config::parse`] for a binary that serves `in_process` methods.
    pub fn parse_for(text: &str, origin: &str, in_process: &InProcess) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let offset = inner.span().map(|s| s.start).or_else(|| find_key(text, &path));
            let mut msg = inner.message().trim().to_string();
            if let Some(rest) = msg.strip_prefix("unknown field") {
                msg = format!("unknown key{rest}");
            }
            let key = if path.is_empty() || path == "." { String::new() } else { format!("key `{path}`: ") };
            match offset {
                Some(o) => {
                    let (l, c) = line_col(text, o);
                    ConfigError(format!("{origin}:{l}:{c}: {key}{msg}"))
                }
                None => ConfigError(format!("{origin}: {key}{msg}")),
            }
        })?;
        cfg.validate(text, origin)?;
        cfg.validate_methods(text, origin, in_process)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_for(path, &InProcess::builtin())
    }

    pub fn load_for(path: &Path, in_process: &InProcess) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{origin}: cannot read: {e}")))?;
        Config::parse_for(&text, &origin, in_process)
    }

    /// Reads and checks the files that `server.tls` and
    /// `zookeeper.auth_file` name into [`Config::secrets`]: the daemon does
    /// this at its start, at each reload (an error fails the reload and
    /// changes nothing) and for `--check-config`. (`rpcctl`, which reads the
    /// config only to find the control socket, does not.)
    pub fn load_secrets(&mut self) -> Result<(), ConfigError> {
        let tls = match self.server.tls.enabled() {
            true => Some(crate::tls::Material::load(&self.server.tls).map_err(ConfigError)?),
            false => None,
        };
        let zk_auth = match (&self.zookeeper.auth_file, self.zookeeper.enabled) {
            (Some(p), true) => Some(crate::zk::Auth::load(p).map_err(|e| ConfigError(format!("zookeeper.auth_file: {e}")))?),
            _ => None,
        };
        self.secrets = Secrets { tls, zk_auth };
        Ok(())
    }

    /// `pi`'s limit of terms.
    pub fn pi_max_terms(&self) -> u64 {
        self.methods.get("pi").and_then(|m| m.max_terms).unwrap_or(DEFAULT_PI_MAX_TERMS)
    }

    /// Things worth saying that do not make the config invalid.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for name in self.handlers.keys() {
            if !self.methods.values().any(|m| m.handler.as_deref() == Some(name.as_str())) {
                out.push(format!("handlers.{name} serves no method (no [methods.*] has handler = \"{name}\"); its processes are started anyway"));
            }
        }
        out
    }

    /// Handler processes per worker, over all pools.
    pub fn handler_processes(&self) -> usize {
        self.handlers.values().map(|h| h.processes as usize).sum()
    }

    /// The longest `kill_grace_ms` of any pool (zero without handlers).
    pub fn max_kill_grace(&self) -> std::time::Duration {
        self.handlers.values().map(|h| h.kill_grace()).max().unwrap_or_default()
    }

    /// Checks `[methods.*]` and `[handlers.*]`, and resolves each handler's
    /// program to an absolute path.
    fn validate_methods(&mut self, text: &str, origin: &str, in_process: &InProcess) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| key_error(text, origin, key, msg);
        for (name, h) in self.handlers.iter_mut() {
            let key = |k: &str| format!("handlers.{name}.{k}");
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(err(&format!("handlers.{name}"), "a handler name is letters, digits, '_' and '-'".into()));
            }
            if !h.dir.is_absolute() {
                return Err(err(&key("dir"), format!("\"{}\" must be an absolute path", h.dir.display())));
            }
            if !h.dir.is_dir() {
                return Err(err(&key("dir"), format!("{} is not a directory", h.dir.display())));
            }
            let Some(prog) = h.exec.first() else {
                return Err(err(&key("exec"), "must name a program: [\"/path/to/program\", \"arg\", ...]".into()));
            };
            let resolved = resolve_program(prog, &h.dir).map_err(|m| err(&key("exec"), m))?;
            h.exec[0] = resolved.display().to_string();
            if h.processes == 0 || h.processes > 256 {
                return Err(err(&key("processes"), "must be between 1 and 256".into()));
            }
            if h.max_inflight == 0 || h.max_inflight > 1024 {
                return Err(err(&key("max_inflight"), "must be between 1 and 1024".into()));
            }
            if h.kill_grace_ms == 0 || h.kill_grace_ms > 600_000 {
                return Err(err(&key("kill_grace_ms"), "must be between 1 and 600000".into()));
            }
            if h.max_requests == 0 && h.max_requests_jitter > 0 {
                return Err(err(&key("max_requests_jitter"), "needs max_requests > 0".into()));
            }
            for k in h.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(err(&key("env"), format!("\"{k}\" is not an environment variable name")));
                }
                if k.starts_with("RPCD_") {
                    return Err(err(&key("env"), format!("{k}: RPCD_* variables are set by rpcd")));
                }
            }
            if h.env.values().any(|v| v.contains('\0')) {
                return Err(err(&key("env"), "values must not contain NUL".into()));
            }
        }
        for (name, m) in &self.methods {
            let key = |k: &str| format!("methods.{name}.{k}");
            if name.is_empty() {
                return Err(err("methods", "a method name must not be empty".into()));
            }
            let builtin_pi = name == "pi" && in_process.methods.contains_key("pi");
            if m.max_terms.is_some() && !builtin_pi {
                return Err(err(&key("max_terms"), "only the built-in method pi takes max_terms".into()));
            }
            if let Some(&is_async) = in_process.methods.get(name) {
                if let Some(h) = &m.handler {
                    return Err(err(
                        &key("handler"),
                        format!("method {name} is defined twice: it is served in-process by this binary and routed to handler \"{h}\" here"),
                    ));
                }
                if m.queue.is_some() {
                    return Err(err(&key("queue"), format!("method {name} is served in-process: queue applies to handler methods only")));
                }
                if m.timeout_ms.is_some() && !is_async {
                    return Err(err(&key("timeout_ms"), format!("method {name} answers at once in-process: timeout_ms applies to handler and async methods only")));
                }
                continue;
            }
            let Some(h) = &m.handler else {
                return Err(err(&format!("methods.{name}"), format!("method {name} is not built in: it needs handler = \"NAME\" of a [handlers.NAME] pool")));
            };
            if !self.handlers.contains_key(h) {
                let known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
                return Err(err(&key("handler"), format!("no [handlers.{h}] is defined (handlers: {})", if known.is_empty() { "none".into() } else { known.join(", ") })));
            }
            if m.timeout_ms == Some(0) {
                return Err(err(&key("timeout_ms"), "must be at least 1".into()));
            }
            if m.queue.is_some_and(|q| q > 1_000_000) {
                return Err(err(&key("queue"), "must be at most 1000000".into()));
            }
        }
        for (name, h) in &self.handlers {
            if let Some(w) = &h.warmup {
                if w.method.is_empty() {
                    return Err(err(&format!("handlers.{name}.warmup"), "`in` must name a method".into()));
                }
            }
        }
        Ok(())
    }

    fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| key_error(text, origin, key, msg);
        let s = &self.server;
        resolve_addr(&s.listen).map_err(|m| err("server.listen", m))?;
        if let Some(a) = &s.advertise {
            let addr = resolve_addr(a).map_err(|m| err("server.advertise", m))?;
            if addr.ip().is_unspecified() {
                return Err(err("server.advertise", format!("\"{a}\" is not an address clients can reach")));
            }
        }
        if s.max_frame_bytes < 64 {
            return Err(err("server.max_frame_bytes", "must be at least 64".into()));
        }
        if s.backlog == 0 {
            return Err(err("server.backlog", "must be at least 1".into()));
        }
        if s.max_connections == 0 {
            return Err(err("server.max_connections", "must be at least 1".into()));
        }
        if s.heartbeat_interval_ms == 0 {
            return Err(err("server.heartbeat_interval_ms", "must be at least 1".into()));
        }
        if s.heartbeat_timeout_secs * 1000 <= s.heartbeat_interval_ms {
            return Err(err("server.heartbeat_timeout_secs", "must be longer than heartbeat_interval_ms".into()));
        }
        if s.ready_timeout_secs == 0 {
            return Err(err("server.ready_timeout_secs", "must be at least 1".into()));
        }
        if !self.metrics.listen.trim().is_empty() {
            let m = resolve_addr(&self.metrics.listen).map_err(|m| err("metrics.listen", m))?;
            if m.port() != 0 && m == resolve_addr(&s.listen).expect("checked above") {
                return Err(err("metrics.listen", format!("\"{}\" is server.listen's address", self.metrics.listen)));
            }
        }
        let z = &self.zookeeper;
        if z.enabled && z.hosts.trim().is_empty() {
            return Err(err("zookeeper.hosts", "must not be empty".into()));
        }
        if !z.root.starts_with('/') || (z.root.len() > 1 && z.root.ends_with('/')) {
            return Err(err("zookeeper.root", format!("\"{}\" must be an absolute ZooKeeper path", z.root)));
        }
        if z.node_prefix.is_empty() || z.node_prefix.contains('/') {
            return Err(err("zookeeper.node_prefix", "must be a non-empty name without '/'".into()));
        }
        if z.session_timeout_ms < 1000 {
            return Err(err("zookeeper.session_timeout_ms", "must be at least 1000".into()));
        }
        if z.auth_file.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(err("zookeeper.auth_file", "must be an absolute path".into()));
        }
        let t = &s.tls;
        for (key, path) in [("server.tls.cert", &t.cert), ("server.tls.key", &t.key), ("server.tls.client_ca", &t.client_ca)] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(err(key, "must be an absolute path".into()));
            }
        }
        match (&t.cert, &t.key) {
            (Some(_), None) => return Err(err("server.tls.cert", "is set without server.tls.key".into())),
            (None, Some(_)) => return Err(err("server.tls.key", "is set without server.tls.cert".into())),
            _ => {}
        }
        if t.client_ca.is_some() && !t.enabled() {
            return Err(err("server.tls.client_ca", "needs server.tls.cert and server.tls.key".into()));
        }
        if t.handshake_timeout_ms == 0 {
            return Err(err("server.tls.handshake_timeout_ms", "must be at least 1".into()));
        }
        parse_mode(&self.control.mode).map_err(|m| err("control.mode", m))?;
        if !self.control.socket.is_absolute() {
            return Err(err("control.socket", "must be an absolute path".into()));
        }
        if let Some(g) = &self.control.group {
            resolve_group(g).map_err(|m| err("control.group", m))?;
        }
        if self.pi_max_terms() > (1u64 << 50) {
            return Err(err("methods.pi.max_terms", "must be at most 2^50".into()));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        resolve_addr(&self.server.listen).expect("validated")
    }

    /// Seconds a graceful stop may take, whole.
    pub fn graceful_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.server.graceful_timeout_secs)
    }

    /// How long a retired worker has before SIGKILL: the drain, then (with
    /// handler pools) the kill ladder of its handler processes and a margin.
    pub fn worker_grace(&self) -> std::time::Duration {
        if self.handlers.is_empty() {
            self.graceful_timeout()
        } else {
            self.graceful_timeout() + self.max_kill_grace() * 2 + std::time::Duration::from_secs(1)
        }
    }
}

/// An error at `key`, placed at its line when the text has it.
fn key_error(text: &str, origin: &str, key: &str, msg: String) -> ConfigError {
    let at = match find_key(text, key) {
        Some(o) => {
            let (l, c) = line_col(text, o);
            format!("{origin}:{l}:{c}")
        }
        None => origin.to_string(),
    };
    ConfigError(format!("{at}: key `{key}`: {msg}"))
}

/// Where a program runs from: an absolute path as it is, a relative one
/// with a '/' from `dir`, a bare name from PATH (or the usual directories).
/// It must be an executable regular file.
pub fn resolve_program(prog: &str, dir: &Path) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if prog.is_empty() {
        return Err("the program name is empty".into());
    } else if prog.starts_with('/') {
        vec![PathBuf::from(prog)]
    } else if prog.contains('/') {
        vec![dir.join(prog)]
    } else {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        let found: Vec<PathBuf> = path.split(':').filter(|d| d.starts_with('/')).map(|d| Path::new(d).join(prog)).collect();
        if let Some(p) = found.iter().find(|p| p.is_file()) {
            vec![p.clone()]
        } else {
            return Err(format!("program \"{prog}\" is not in PATH ({path}); give its absolute path"));
        }
    };
    let p = &candidates[0];
    let meta = std::fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", p.display()));
    }
    nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).map_err(|e| format!("{} is not executable: {}", p.display(), e.desc()))?;
    Ok(p.clone())
}

/// Resolves `host:port` (`[v6]:port` allowed) to one socket address.
pub fn resolve_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.to_socket_addrs() {
        Ok(mut it) => it.next().ok_or_else(|| format!("\"{s}\" resolves to no address")),
        Err(e) => Err(format!("\"{s}\" is not a host:port address ({e})")),
    }
}

pub fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| format!("\"{s}\" is not an octal file mode"))?;
    if m > 0o777 {
        return Err(format!("\"{s}\" is not a file mode (at most 0777)"));
    }
    Ok(m)
}

pub fn resolve_group(g: &str) -> Result<u32, String> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        Ok(None) => Err(format!("no group named \"{g}\"")),
        Err(e) => Err(format!("cannot look up group \"{g}\": {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_spec() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8001");
        assert_eq!(c.server.workers, Workers::Count(4));
        assert_eq!(c.server.max_frame_bytes, 1048576);
        assert_eq!(c.zookeeper.root, "/demo");
        assert_eq!(c.zookeeper.node_prefix, "rpc");
        assert_eq!(c.control.mode, "0660");
        assert_eq!(c.pi_max_terms(), 10_000_000);
        assert!(c.handlers.is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nwokers = 3\n", "f.toml").unwrap_err().0;
        assert!(e.starts_with("f.toml:3:"), "{e}");
        assert!(e.contains("wokers"), "{e}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = Config::parse("[server]\n\nmax_frame_bytes = \"big\"\n", "f.toml").unwrap_err().0;
        assert!(e.starts_with("f.toml:3:"), "{e}");
        assert!(e.contains("server.max_frame_bytes"), "{e}");
    }

    #[test]
    fn workers_auto_and_bounds() {
        assert_eq!(Config::parse("[server]\nworkers = \"auto\"\n", "t").unwrap().server.workers, Workers::Auto);
        let e = Config::parse("[server]\nworkers = 0\n", "t").unwrap_err().0;
        assert!(e.contains("server.workers") && e.starts_with("t:2:"), "{e}");
        assert!(Config::parse("[server]\nworkers = \"many\"\n", "t").is_err());
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let e = Config::parse("[control]\nmode = \"0999\"\n", "t").unwrap_err().0;
        assert!(e.starts_with("t:2:") && e.contains("control.mode"), "{e}");
        let e = Config::parse("[server]\nlisten = \"nonsense\"\n", "t").unwrap_err().0;
        assert!(e.starts_with("t:2:") && e.contains("server.listen"), "{e}");
        let e = Config::parse("[server]\nadvertise = \"0.0.0.0:1\"\n", "t").unwrap_err().0;
        assert!(e.contains("server.advertise"), "{e}");
    }

    #[test]
    fn handler_and_method_errors_name_key_and_line() {
        let e = Config::parse("[server]\n\n[methods.x]\nqueue = 3\n", "t").unwrap_err().0;
        assert!(e.starts_with("t:3:") && e.contains("methods.x") && e.contains("needs handler"), "{e}");
        let e = Config::parse("[handlers.h]\nexec = [\"/bin/true\"]\nprocesses = 0\n", "t").unwrap_err().0;
        assert!(e.starts_with("t:3:") && e.contains("handlers.h.processes"), "{e}");
        let e = Config::parse("[handlers.h]\nexec = [\"/bin/true\"]\nenv = { RPCD_X = \"1\" }\n", "t").unwrap_err().0;
        assert!(e.contains("RPCD_X") && e.contains("set by rpcd"), "{e}");
        let c = Config::parse("[handlers.h]\nexec = [\"true\"]\n[methods.m]\nhandler = \"h\"\n", "t").unwrap();
        assert!(c.handlers["h"].exec[0].starts_with('/'), "a bare name is resolved: {:?}", c.handlers["h"].exec);
        assert_eq!(c.methods["m"].timeout(), std::time::Duration::from_millis(5000));
        assert_eq!(c.methods["m"].queue(), 64);
        assert!(c.warnings().is_empty());
        assert_eq!(c.worker_grace(), std::time::Duration::from_secs(10 + 2 + 1));
    }

    #[test]
    fn roundtrips_through_json() {
        let c = Config::parse("[server]\nworkers = \"auto\"\n", "t").unwrap();
        let j = serde_json::to_string(&c).unwrap();
        let back: Config = serde_json::from_str(&j).unwrap();
        assert_eq!(c, back);
    }
}

#[cfg(test)]
mod shipped {
    #[test]
    fn shipped_config_is_valid_and_equals_the_defaults() {
        let text = include_str!("../etc/rpcd.toml");
        let c = super::Config::parse(text, "etc/rpcd.toml").unwrap();
        assert_eq!(c, super::Config::default());
    }
}
