//! rpcbench: a closed-loop load generator for rpcd's wire protocol and, with
//! the very same event loop, for redis' inline `PING` (to compare servers on
//! one client). Not packaged: a development tool (see bench/run).
//!
//! One thread, one epoll loop (mio), N connections, each keeping `depth`
//! requests in flight: whenever replies arrive, as many new requests are
//! sent, in one write per connection and wakeup. Every reply is checked
//! byte for byte against the expected one (for rpcd it is computed with the
//! daemon's own `protocol::handle`, so it is exact). Latency is measured per
//! request from when it was queued to when its reply was read.
//!
//! Methods that are not built in (handler processes, a library user's
//! methods, another server) are checked against `--reply-as ping` (the reply
//! is the one built-in `ping` would give for these params: right for any
//! echo) or `--expect BODY` (the literal reply body, e.g. the original
//! server's `{"out": "pong", "result": null}`).
//!
//! TLS (`--tls --ca PATH`): rustls's sync `ClientConnection` (aws-lc-rs,
//! TLS 1.3, or 1.2 with `--tls12`) driven by the same loop; the frames
//! inside are the same and checked the same way. `--handshakes`: each
//! connection loops connect, handshake, one request, close (new connections
//! per second, each a full handshake: resumption is off); `--resume`: the
//! same with a session cache shared by all connections, and every
//! handshake's kind (full, full after a HelloRetryRequest, resumed) as
//! rustls saw it is counted, so that a "resumed" rate that was really full
//! shows. TLS failures are errors, counted and reported (the first one's
//! reason on stderr), like wrong replies.
//!
//! ```text
//! rpcbench --addr 127.0.0.1:8001 [--proto rpcd|redis] [--method ping|pi|NAME]
//!          [--params JSON] [--reply-as ping|pi | --expect BODY]
//!          [--conns 16] [--depth 1] [--duration 5] [--warmup 1] [--kv]
//!          [--tls --ca PATH [--server-name NAME] [--tls12] [--kx GROUP]]
//!          [--handshakes | --resume [--tickets N]]
//! ```

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::exit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: rpcbench --addr HOST:PORT [--proto rpcd|redis] [--method ping|pi|NAME] \
[--params JSON] [--reply-as ping|pi | --expect BODY] [--conns N] [--depth D] [--duration SECS] \
[--warmup SECS] [--kv] [--tls --ca PATH [--server-name NAME] [--tls12] [--kx x25519|secp256r1|x25519mlkem768]] \
[--handshakes | --resume [--tickets N]]";

/// Caps: every loop here is bounded.
const MAX_CONNS: usize = 10_000;
const MAX_DEPTH: usize = 4096;
const MAX_DURATION: f64 = 3600.0;
const MAX_RECONNECTS: u64 = 10_000;
/// Connections opened in --handshakes/--resume mode (the duration bounds
/// them too).
const MAX_HANDSHAKES: u64 = 50_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Rpcd,
    Redis,
}

struct Args {
    addr: SocketAddr,
    proto: Proto,
    method: String,
    params: Option<String>,
    /// Check replies as if the request had called this built-in method.
    reply_as: Option<String>,
    /// Check replies against this literal body.
    expect: Option<String>,
    conns: usize,
    depth: usize,
    duration: f64,
    warmup: f64,
    kv: bool,
    tls: bool,
    ca: Option<String>,
    server_name: Option<String>,
    tls12: bool,
    kx: Option<String>,
    /// One request per connection: connect, (handshake,) request, close.
    handshakes: bool,
    /// With `handshakes`: resume TLS sessions.
    resume: bool,
    /// With `resume`: how many TLS 1.3 tickets the session cache keeps.
    tickets: Option<usize>,
}

fn die(msg: &str) -> ! {
    eprintln!("rpcbench: {msg}\n{USAGE}");
    exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8001".parse().unwrap(),
        proto: Proto::Rpcd,
        method: "ping".into(),
        params: None,
        reply_as: None,
        expect: None,
        conns: 16,
        depth: 1,
        duration: 5.0,
        warmup: 1.0,
        kv: false,
        tls: false,
        ca: None,
        server_name: None,
        tls12: false,
        kx: None,
        handshakes: false,
        resume: false,
        tickets: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--addr" => {
                let v = val();
                a.addr = std::net::ToSocketAddrs::to_socket_addrs(&v)
                    .ok()
                    .and_then(|mut i| i.next())
                    .unwrap_or_else(|| die(&format!("bad address {v}")));
            }
            "--proto" => {
                a.proto = match val().as_str() {
                    "rpcd" => Proto::Rpcd,
                    "redis" => Proto::Redis,
                    p => die(&format!("unknown protocol {p}")),
                }
            }
            "--method" => a.method = val(),
            "--params" => a.params = Some(val()),
            "--reply-as" => a.reply_as = Some(val()),
            "--expect" => a.expect = Some(val()),
            "--conns" | "-c" => a.conns = val().parse().unwrap_or_else(|_| die("bad --conns")),
            "--depth" | "-P" => a.depth = val().parse().unwrap_or_else(|_| die("bad --depth")),
            "--duration" | "-d" => a.duration = val().parse().unwrap_or_else(|_| die("bad --duration")),
            "--warmup" => a.warmup = val().parse().unwrap_or_else(|_| die("bad --warmup")),
            "--kv" => a.kv = true,
            "--tls" => a.tls = true,
            "--ca" => a.ca = Some(val()),
            "--server-name" => a.server_name = Some(val()),
            "--tls12" => a.tls12 = true,
            "--kx" => a.kx = Some(val()),
            "--handshakes" => a.handshakes = true,
            "--tickets" => a.tickets = Some(val().parse().unwrap_or_else(|_| die("bad --tickets"))),
            "--resume" => {
                a.handshakes = true;
                a.resume = true
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0)
            }
            other => die(&format!("unknown argument {other}")),
        }
    }
    if a.conns == 0 || a.conns > MAX_CONNS {
        die(&format!("--conns must be 1..={MAX_CONNS}"));
    }
    if a.depth == 0 || a.depth > MAX_DEPTH {
        die(&format!("--depth must be 1..={MAX_DEPTH}"));
    }
    if a.reply_as.is_some() && a.expect.is_some() {
        die("--reply-as and --expect exclude each other");
    }
    if !a.tls && (a.ca.is_some() || a.server_name.is_some() || a.tls12 || a.kx.is_some() || a.resume) {
        die("--ca, --server-name, --tls12, --kx and --resume need --tls");
    }
    if a.tls && a.ca.is_none() {
        die("--tls needs --ca PATH (the CA that signed the server's certificate)");
    }
    if a.tickets.is_some_and(|t| t == 0 || t > 1_000_000) || (a.tickets.is_some() && !a.resume) {
        die("--tickets N (1..=1000000) goes with --resume");
    }
    if a.handshakes && a.depth != 1 {
        die("--handshakes/--resume send one request per connection: --depth must be 1");
    }
    let valid = |v: f64| (0.0..=MAX_DURATION).contains(&v); // false for NaN too
    if !valid(a.duration) || a.duration == 0.0 || !valid(a.warmup) {
        die("--duration must be in (0, 3600] and --warmup in [0, 3600]");
    }
    a
}

/// The request bytes and the exact reply expected for it.
fn request_and_reply(a: &Args) -> (Vec<u8>, Vec<u8>) {
    match a.proto {
        Proto::Redis => {
            if !a.method.eq_ignore_ascii_case("ping") || a.params.is_some() || a.reply_as.is_some() || a.expect.is_some() {
                die("--proto redis speaks only PING without params (and checks +PONG)");
            }
            (b"PING\r\n".to_vec(), b"+PONG\r\n".to_vec())
        }
        Proto::Rpcd => {
            let like = a.reply_as.as_deref().unwrap_or(&a.method);
            let params = a.params.clone().unwrap_or_else(|| if like == "pi" { "1000".into() } else { "null".into() });
            let body = |method: &str| {
                let mut body = Vec::new();
                body.extend_from_slice(b"{\"in\":");
                serde_json::to_writer(&mut body, method).unwrap();
                body.extend_from_slice(b",\"params\":");
                body.extend_from_slice(params.as_bytes());
                body.push(b'}');
                body
            };
            let sent = body(&a.method);
            let mut req = (sent.len() as u32).to_le_bytes().to_vec();
            req.extend_from_slice(&sent);
            if let Some(e) = &a.expect {
                let mut reply = (e.len() as u32).to_le_bytes().to_vec();
                reply.extend_from_slice(e.as_bytes());
                return (req, reply);
            }
            // The daemon's own handler gives the exact expected reply (of
            // the method itself, or of the one named by --reply-as).
            let limits = rpcd::protocol::Limits { max_frame_bytes: u32::MAX, pi_max_terms: u64::MAX };
            let mut reply = Vec::new();
            let checked = body(like);
            if let Some(code) = rpcd::protocol::handle(&checked, &limits, &mut reply) {
                let hint = if a.reply_as.is_none() && code.as_str() == "unknown_method" {
                    " (not a built-in method: check its replies with --reply-as ping or --expect BODY)"
                } else {
                    ""
                };
                die(&format!("request {} would be answered with {}{hint}", String::from_utf8_lossy(&checked), code.as_str()));
            }
            (req, reply)
        }
    }
}

/// Log-linear latency histogram in nanoseconds: 64 sub-buckets per power
/// of two (under 1.6% error), exact count and max.
struct Hist {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    sum: u128,
}

const SUB: u32 = 6; // 2^6 sub-buckets per octave

impl Hist {
    fn new() -> Hist {
        Hist { counts: vec![0; (2usize << SUB) + (64 - SUB as usize) * (1 << SUB)], total: 0, max: 0, sum: 0 }
    }
    fn index(v: u64) -> usize {
        if v < (2 << SUB) {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB + 1
        let m = (v >> (e - SUB)) as usize; // in [2^SUB, 2^(SUB+1))
        (2 << SUB) + (e - SUB - 1) as usize * (1 << SUB) + (m - (1 << SUB))
    }
    /// The highest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < (2 << SUB) {
            return i as u64;
        }
        let j = i - (2 << SUB);
        let e = (j >> SUB) as u32 + SUB + 1;
        let m = ((j & ((1 << SUB) - 1)) + (1 << SUB)) as u64;
        ((m + 1) << (e - SUB)) - 1
    }
    fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += v as u128;
        self.max = self.max.max(v);
    }
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::upper(i).min(self.max);
            }
        }
        self.max
    }
}

struct Conn {
    stream: TcpStream,
    /// The TLS session over `stream` (--tls).
    tls: Option<Box<ClientConnection>>,
    rbuf: Vec<u8>,
    /// Parsed up to here; valid bytes up to `rend`.
    rpos: usize,
    rend: usize,
    /// Bytes of requests still to write, and how far into the request the
    /// next byte is (the request blob is periodic).
    wrem: usize,
    wphase: usize,
    /// Queue times of the requests in flight, oldest first.
    sent: VecDeque<Instant>,
    dead: bool,
    /// Dead, counted, and left so (the reconnect cap or the end was reached).
    gone: bool,
    /// --handshakes: the one reply arrived (when, and whether it was right).
    finished: Option<(Instant, bool)>,
    /// Its TLS failure was counted already.
    tls_failed: bool,
}

struct Stats {
    ok: u64,
    errors: u64,
    /// Replies, warm-up included.
    total: u64,
    hist: Hist,
    /// TLS sessions that failed (handshake refused, bad record, closed during
    /// the handshake), and the first one's reason.
    tls_errors: u64,
    first_tls_error: Option<String>,
    /// Connects that failed (each also counts as an error).
    connect_errors: u64,
    /// --handshakes: the measured handshakes by kind, as rustls saw them.
    full: u64,
    full_hrr: u64,
    resumed: u64,
    /// What the first session negotiated: version/suite/group.
    session: Option<String>,
}

enum Parsed {
    Incomplete,
    Reply { len: usize, ok: bool },
}

fn parse(proto: Proto, buf: &[u8], expected: &[u8]) -> Parsed {
    match proto {
        Proto::Rpcd => {
            if buf.len() < 4 {
                return Parsed::Incomplete;
            }
            let len = 4 + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < len {
                return Parsed::Incomplete;
            }
            Parsed::Reply { len, ok: &buf[..len] == expected }
        }
        Proto::Redis => {
            if buf.len() >= expected.len() && &buf[..expected.len()] == expected {
                return Parsed::Reply { len: expected.len(), ok: true };
            }
            match buf.windows(2).position(|w| w == b"\r\n") {
                Some(p) => Parsed::Reply { len: p + 2, ok: false },
                None => Parsed::Incomplete,
            }
        }
    }
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_nonblocking(true)?;
    Ok(TcpStream::from_std(s))
}

/// The client side of TLS: one configuration (and so one session cache)
/// for all connections.
struct Tls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    cache: Arc<SessionCache>,
}

/// The session cache of --resume, shared by all connections (which all
/// talk to one server): rustls's own in-memory cache, but keeping up to
/// `cap` TLS 1.3 tickets (the newest used first) where rustls keeps 8 per
/// server. With 8, at 16 connections, a server whose tickets arrive before
/// its reply (OpenSSL's, redis') has more tickets outstanding than the
/// cache holds, and half the connections find none: a limit of the client,
/// not of the server. It counts what goes in and out: tickets (or TLS 1.2
/// sessions) received, and handshakes that offered one or found none; a
/// resumption the server refused shows as offered but not resumed.
struct SessionCache {
    cap: usize,
    tls12: bool,
    data: Mutex<CacheData>,
    received: AtomicU64,
    offered: AtomicU64,
    none: AtomicU64,
}

#[derive(Default)]
struct CacheData {
    kx_hint: Option<rustls::NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("SessionCache").field("cap", &self.cap).finish()
    }
}

impl SessionCache {
    fn new(cap: usize, tls12: bool) -> SessionCache {
        SessionCache {
            cap,
            tls12,
            data: Mutex::new(CacheData::default()),
            received: AtomicU64::new(0),
            offered: AtomicU64::new(0),
            none: AtomicU64::new(0),
        }
    }
    fn data(&self) -> std::sync::MutexGuard<'_, CacheData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn counts(&self) -> [u64; 3] {
        [&self.received, &self.offered, &self.none].map(|c| c.load(Ordering::Relaxed))
    }
    /// Counts a lookup, for the protocol version in use only (rustls also
    /// looks for the other kind).
    fn took<T>(&self, tls12: bool, v: Option<T>) -> Option<T> {
        if tls12 == self.tls12 {
            let c = if v.is_some() { &self.offered } else { &self.none };
            c.fetch_add(1, Ordering::Relaxed);
        }
        v
    }
}

impl ClientSessionStore for SessionCache {
    fn set_kx_hint(&self, _: ServerName<'static>, group: rustls::NamedGroup) {
        self.data().kx_hint = Some(group);
    }
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.data().kx_hint
    }
    fn set_tls12_session(&self, _: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.received.fetch_add(1, Ordering::Relaxed);
        self.data().tls12 = Some(value);
    }
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        let v = self.data().tls12.clone();
        self.took(true, v)
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {
        self.data().tls12 = None;
    }
    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut d = self.data();
        if d.tls13.len() >= self.cap {
            d.tls13.pop_front();
        }
        d.tls13.push_back(value);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        let v = self.data().tls13.pop_back();
        self.took(false, v)
    }
}

fn tls_setup(a: &Args) -> Option<Tls> {
    if !a.tls {
        return None;
    }
    let ca = a.ca.as_deref().unwrap_or_default();
    let pem = std::fs::read(ca).unwrap_or_else(|e| die(&format!("--ca {ca}: {e}")));
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.unwrap_or_else(|e| die(&format!("--ca {ca}: not a PEM certificate file: {e}")));
        roots.add(c).unwrap_or_else(|e| die(&format!("--ca {ca}: unusable CA certificate: {e}")));
    }
    if roots.is_empty() {
        die(&format!("--ca {ca}: no certificate in it"));
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(kx) = &a.kx {
        let want = match kx.to_ascii_lowercase().as_str() {
            "p256" | "p-256" => "secp256r1".to_string(),
            k => k.to_string(),
        };
        provider.kx_groups.retain(|g| format!("{:?}", g.name()).to_ascii_lowercase() == want);
        if provider.kx_groups.is_empty() {
            die(&format!("--kx {kx}: not one of the provider's groups (x25519, secp256r1, secp384r1, x25519mlkem768)"));
        }
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if a.tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap_or_else(|e| die(&format!("TLS: {e}")))
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Off unless asked for: --handshakes measures full handshakes.
    let cache = Arc::new(SessionCache::new(a.tickets.unwrap_or(8.max(2 * a.conns)), a.tls12));
    config.resumption = if a.resume { Resumption::store(cache.clone()) } else { Resumption::disabled() };
    let name = a.server_name.clone().unwrap_or_else(|| a.addr.ip().to_string());
    let name = ServerName::try_from(name.clone())
        .unwrap_or_else(|_| die(&format!("--server-name {name}: not a DNS name or an IP address")));
    Some(Tls { config: Arc::new(config), name, cache })
}

/// A new connection (and its TLS session, which starts with the first flush).
fn open(addr: SocketAddr, tls: Option<&Tls>) -> std::io::Result<(TcpStream, Option<Box<ClientConnection>>)> {
    let s = connect(addr)?;
    let session = match tls {
        Some(t) => Some(Box::new(ClientConnection::new(t.config.clone(), t.name.clone()).map_err(std::io::Error::other)?)),
        None => None,
    };
    Ok((s, session))
}

fn describe(t: &ClientConnection) -> String {
    let v = t.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into());
    let s = t.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "?".into());
    let g = t.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name())).unwrap_or_else(|| "?".into());
    format!("{v}/{s}/{g}")
}

/// Makes room to read into `c.rbuf` (at least 4 KiB after `rend`).
#[inline(always)]
fn make_room(c: &mut Conn) {
    if c.rpos == c.rend {
        c.rpos = 0;
        c.rend = 0;
    } else if c.rbuf.len() - c.rend < 4096 {
        c.rbuf.copy_within(c.rpos..c.rend, 0);
        c.rend -= c.rpos;
        c.rpos = 0;
        if c.rbuf.len() - c.rend < 4096 {
            let l = c.rbuf.len();
            c.rbuf.resize(l * 2, 0);
        }
    }
}

struct Bench<'a> {
    proto: Proto,
    req_len: usize,
    blob: &'a [u8],
    expected: &'a [u8],
    depth: usize,
    measure_from: Instant,
    /// One request per connection (--handshakes).
    handshakes: bool,
    stats: Stats,
}

impl Bench<'_> {
    /// Queues `n` more requests on `c` (stamped `now`) and writes what the
    /// socket takes, in one write.
    fn queue(&self, c: &mut Conn, n: usize, now: Instant) {
        for _ in 0..n {
            c.sent.push_back(now);
        }
        c.wrem += n * self.req_len;
    }

    fn flush(&self, c: &mut Conn) {
        if c.tls.is_some() {
            return self.flush_tls(c);
        }
        while c.wrem > 0 && !c.dead {
            let chunk = &self.blob[c.wphase..c.wphase + c.wrem];
            match c.stream.write(chunk) {
                Ok(0) => c.dead = true,
                Ok(n) => {
                    c.wrem -= n;
                    c.wphase = (c.wphase + n) % self.req_len;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => c.dead = true,
            }
        }
    }

    /// TLS: hands the queued requests to rustls (which encrypts them, or
    /// keeps them until the handshake is done) and writes the records it
    /// has (handshake messages included) as far as the socket takes them.
    fn flush_tls(&self, c: &mut Conn) {
        let Some(tls) = c.tls.as_mut() else { return };
        // Bounded: a pass that moves nothing, or that the socket blocks, ends it.
        for _ in 0..64 {
            let mut moved = false;
            if c.wrem > 0 {
                match tls.writer().write(&self.blob[c.wphase..c.wphase + c.wrem]) {
                    Ok(n) => {
                        moved = n > 0;
                        c.wrem -= n;
                        c.wphase = (c.wphase + n) % self.req_len;
                    }
                    Err(_) => {
                        c.dead = true;
                        return;
                    }
                }
            }
            while tls.wants_write() {
                match tls.write_tls(&mut c.stream) {
                    Ok(0) => {
                        c.dead = true;
                        return;
                    }
                    Ok(_) => moved = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        c.dead = true;
                        return;
                    }
                }
            }
            if c.wrem == 0 || !moved {
                return;
            }
        }
    }

    fn tls_error(&mut self, c: &mut Conn, why: String) {
        if c.tls_failed {
            return;
        }
        c.tls_failed = true;
        self.stats.tls_errors += 1;
        if self.stats.first_tls_error.is_none() {
            self.stats.first_tls_error = Some(why);
        }
    }

    /// Checks and counts the replies in `c.rbuf`; returns how many.
    #[inline(always)]
    fn consume(&mut self, c: &mut Conn, now: Instant) -> usize {
        let mut done = 0usize;
        loop {
            match parse(self.proto, &c.rbuf[c.rpos..c.rend], self.expected) {
                Parsed::Incomplete => break,
                Parsed::Reply { len, ok } => {
                    c.rpos += len;
                    let Some(t) = c.sent.pop_front() else {
                        // A reply nobody asked for.
                        self.stats.errors += 1;
                        c.dead = true;
                        break;
                    };
                    done += 1;
                    self.stats.total += 1;
                    if now >= self.measure_from {
                        if ok {
                            self.stats.ok += 1;
                            self.stats.hist.record(now.duration_since(t).as_nanos() as u64);
                        } else {
                            self.stats.errors += 1;
                        }
                    } else if !ok {
                        self.stats.errors += 1;
                    }
                    if self.handshakes {
                        c.finished = Some((now, ok));
                    }
                }
            }
        }
        done
    }

    /// Reads all that is available, checks and counts the replies, and
    /// sends as many new requests as replies arrived.
    fn on_readable(&mut self, c: &mut Conn) {
        if c.tls.is_some() {
            return self.on_readable_tls(c);
        }
        let mut done = 0usize;
        let mut now = Instant::now();
        loop {
            make_room(c);
            match c.stream.read(&mut c.rbuf[c.rend..]) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => {
                    now = Instant::now();
                    c.rend += n;
                    done += self.consume(c, now);
                    if c.dead {
                        break;
                    }
                    if n < c.rbuf.len() - (c.rend - n) {
                        // A short read drained the socket (edge-triggered:
                        // more data will be another event).
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        if done > 0 && !c.dead && !self.handshakes {
            self.queue(c, done, now);
            self.flush(c);
        }
    }

    /// The same over TLS: reads records until the socket has no more
    /// (edge-triggered), decrypts, checks and counts the replies, then
    /// queues as many requests and writes what rustls has to send.
    fn on_readable_tls(&mut self, c: &mut Conn) {
        let mut done = 0usize;
        let mut now = Instant::now();
        loop {
            let Some(tls) = c.tls.as_mut() else { return };
            let eof = match tls.read_tls(&mut c.stream) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let handshaking = tls.is_handshaking();
                    c.dead = true;
                    if handshaking {
                        self.tls_error(c, format!("during the handshake: {e}"));
                    }
                    break;
                }
            };
            now = Instant::now();
            if let Err(e) = tls.process_new_packets() {
                let _ = tls.write_tls(&mut c.stream); // the alert, if any
                c.dead = true;
                self.tls_error(c, e.to_string());
                break;
            }
            if self.stats.session.is_none() && !tls.is_handshaking() {
                self.stats.session = Some(describe(tls));
            }
            let mut closed = eof;
            loop {
                make_room(c);
                let Some(tls) = c.tls.as_mut() else { return };
                match tls.reader().read(&mut c.rbuf[c.rend..]) {
                    Ok(0) => {
                        // close_notify.
                        closed = true;
                        break;
                    }
                    Ok(n) => c.rend += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        // Closed without close_notify.
                        closed = true;
                        break;
                    }
                }
            }
            done += self.consume(c, now);
            if closed {
                c.dead = true;
                if c.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                    self.tls_error(c, "the server closed the connection during the handshake".into());
                }
            }
            if c.dead {
                break;
            }
        }
        if c.dead {
            return;
        }
        if done > 0 && !self.handshakes {
            self.queue(c, done, now);
        }
        self.flush(c);
    }
}

/// Replaces connection `i` by a new one and queues its requests; false if
/// it could not be opened (counted as an error).
fn reopen(c: &mut Conn, i: usize, poll: &Poll, addr: SocketAddr, tls: Option<&Tls>, b: &mut Bench) -> bool {
    match open(addr, tls) {
        Ok((mut s, session)) => {
            if poll.registry().register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE).is_err() {
                b.stats.errors += 1;
                return false;
            }
            c.stream = s;
            c.tls = session;
            c.rpos = 0;
            c.rend = 0;
            c.wrem = 0;
            c.wphase = 0;
            c.sent.clear();
            c.dead = false;
            c.finished = None;
            c.tls_failed = false;
            let t = Instant::now();
            b.queue(c, b.depth, t);
            b.flush(c);
            true
        }
        Err(_) => {
            b.stats.errors += 1;
            b.stats.connect_errors += 1;
            false
        }
    }
}

fn main() {
    let a = parse_args();
    let (req, expected) = request_and_reply(&a);
    let tls = tls_setup(&a);
    // depth+1 copies: any window of depth requests starting at any phase.
    let blob = req.repeat(a.depth + 1);

    let mut poll = Poll::new().unwrap_or_else(|e| die(&format!("epoll: {e}")));
    let mut conns: Vec<Conn> = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        let (mut stream, session) = match open(a.addr, tls.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("rpcbench: cannot connect to {}: {e}", a.addr);
                exit(1)
            }
        };
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
            .unwrap_or_else(|e| die(&format!("epoll register: {e}")));
        conns.push(Conn {
            stream,
            tls: session,
            rbuf: vec![0; 64 * 1024],
            rpos: 0,
            rend: 0,
            wrem: 0,
            wphase: 0,
            sent: VecDeque::with_capacity(a.depth),
            dead: false,
            gone: false,
            finished: None,
            tls_failed: false,
        });
    }

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(a.warmup);
    let end = measure_from + Duration::from_secs_f64(a.duration);
    let mut b = Bench {
        proto: a.proto,
        req_len: req.len(),
        blob: &blob,
        expected: &expected,
        depth: a.depth,
        measure_from,
        handshakes: a.handshakes,
        stats: Stats {
            ok: 0,
            errors: 0,
            total: 0,
            hist: Hist::new(),
            tls_errors: 0,
            first_tls_error: None,
            connect_errors: 0,
            full: 0,
            full_hrr: 0,
            resumed: 0,
            session: None,
        },
    };
    for c in conns.iter_mut() {
        b.queue(c, a.depth, start);
        b.flush(c);
    }

    let mut events = Events::with_capacity(1024);
    let mut reconnects = 0u64;
    let mut opened = a.conns as u64;
    let mut lost = 0u64;
    // The client's own CPU use over the measured time: near 100% means the
    // client, not the server, limits the rate.
    let mut cpu_from: Option<Duration> = None;
    // The session cache's counts when the measurement began.
    let mut cache_from = [0u64; 3];
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if cpu_from.is_none() && now >= measure_from {
            cpu_from = Some(cpu_time());
            cache_from = tls.as_ref().map(|t| t.cache.counts()).unwrap_or_default();
        }
        let timeout = (end - now).min(Duration::from_millis(100));
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            die(&format!("epoll_wait: {e}"));
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let c = &mut conns[i];
            if c.dead {
                continue;
            }
            if ev.is_writable() && (c.wrem > 0 || c.tls.as_ref().is_some_and(|t| t.wants_write())) {
                b.flush(c);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                b.on_readable(c);
            }
            // --handshakes: the one reply is in; count the handshake's kind,
            // close (with close_notify) and open the next connection at
            // once (it resumes with the newest ticket).
            if let Some((at, ok)) = c.finished.take() {
                if let Some(t) = c.tls.as_mut() {
                    if ok && at >= measure_from {
                        match t.handshake_kind() {
                            Some(HandshakeKind::Resumed) => b.stats.resumed += 1,
                            Some(HandshakeKind::FullWithHelloRetryRequest) => b.stats.full_hrr += 1,
                            _ => b.stats.full += 1,
                        }
                    }
                    if !a.resume && t.handshake_kind() == Some(HandshakeKind::Resumed) {
                        // Resumption is off: this cannot be.
                        b.stats.errors += 1;
                    }
                    t.send_close_notify();
                    let _ = t.write_tls(&mut c.stream);
                }
                let _ = poll.registry().deregister(&mut c.stream);
                c.sent.clear();
                c.dead = true;
                if opened >= MAX_HANDSHAKES || Instant::now() >= end {
                    c.gone = true;
                    continue;
                }
                opened += 1;
                // If this fails, the connection is dead and replaced below.
                reopen(c, i, &poll, a.addr, tls.as_ref(), &mut b);
            }
        }
        // Replace dead connections (bounded): their requests count as errors.
        for (i, c) in conns.iter_mut().enumerate() {
            if !c.dead || c.gone {
                continue;
            }
            let n = c.sent.len() as u64;
            b.stats.errors += n;
            lost += n;
            c.sent.clear();
            if c.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                b.tls_error(c, "the connection ended during the handshake".into());
            }
            let _ = poll.registry().deregister(&mut c.stream);
            if reconnects >= MAX_RECONNECTS || Instant::now() >= end {
                c.gone = true;
                continue;
            }
            reconnects += 1;
            opened += 1;
            if !reopen(c, i, &poll, a.addr, tls.as_ref(), &mut b) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let elapsed = Instant::now().duration_since(measure_from).as_secs_f64();
    let client_cpu = (cpu_time() - cpu_from.unwrap_or_default()).as_secs_f64() / elapsed * 100.0;
    let alive = conns.iter().filter(|c| !c.dead).count();
    drop(conns);

    let s = &b.stats;
    let rps = s.ok as f64 / elapsed;
    let us = |ns: u64| ns as f64 / 1000.0;
    let mean = if s.hist.total > 0 { (s.hist.sum / s.hist.total as u128) as u64 } else { 0 };
    let (p50, p99, p999, max) = (s.hist.quantile(0.50), s.hist.quantile(0.99), s.hist.quantile(0.999), s.hist.max);
    let session = s.session.as_deref().unwrap_or("none");
    // Over the measured time: tickets (or TLS 1.2 sessions) received,
    // handshakes that offered one, and that found none to offer.
    let cache = tls.as_ref().map(|t| t.cache.counts()).unwrap_or_default();
    let [received, offered, none] = [0, 1, 2].map(|i| cache[i] - cache_from[i]);
    if a.kv {
        let mut extra = String::new();
        if a.tls {
            extra += &format!(" tls=1 session={session} tls_errors={}", s.tls_errors);
        }
        if a.handshakes {
            extra += &format!(" handshakes={} full={} full_hrr={} resumed={}", s.ok, s.full, s.full_hrr, s.resumed);
        }
        if a.resume {
            extra += &format!(" tickets_received={received} offered={offered} none_to_offer={none}");
        }
        println!(
            "rps={rps:.0} requests={} errors={} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} mean_us={:.1} secs={elapsed:.3} reconnects={reconnects} client_cpu_pct={client_cpu:.0} total_replies={} connect_errors={}{extra}",
            s.ok,
            s.errors,
            us(p50),
            us(p99),
            us(p999),
            us(max),
            us(mean),
            s.total,
            s.connect_errors
        );
    } else {
        let what = match a.proto {
            Proto::Redis => "redis PING".to_string(),
            Proto::Rpcd => format!("rpcd {}", a.method),
        };
        let how = match (a.tls, a.handshakes, a.resume) {
            (_, true, true) => " over TLS, a new connection per request, sessions resumed",
            (true, true, false) => " over TLS, a new connection (full handshake) per request",
            (false, true, _) => ", a new connection per request",
            (true, false, _) => " over TLS",
            (false, false, _) => "",
        };
        println!(
            "{what}{how} at {}: {} connection(s), depth {}, {elapsed:.2} s measured after {:.2} s warm-up",
            a.addr, a.conns, a.depth, a.warmup
        );
        println!("  requests/s  {rps:.0}   ({} replies checked, {} errors; client CPU {client_cpu:.0}%)", s.ok, s.errors);
        println!(
            "  latency     p50 {:.1} us   p99 {:.1} us   p99.9 {:.1} us   max {:.1} us   mean {:.1} us{}",
            us(p50),
            us(p99),
            us(p999),
            us(max),
            us(mean),
            if a.handshakes { " (connect to reply)" } else { "" }
        );
        if a.tls {
            println!("  TLS         {session} (the first session); {} failed", s.tls_errors);
        }
        if a.tls && a.handshakes {
            let n = s.full + s.full_hrr + s.resumed;
            let pct = |x: u64| if n > 0 { x as f64 * 100.0 / n as f64 } else { 0.0 };
            println!(
                "  handshakes  {rps:.0}/s: {} full ({:.1}%), {} full after a HelloRetryRequest ({:.1}%), {} resumed ({:.1}%)",
                s.full,
                pct(s.full),
                s.full_hrr,
                pct(s.full_hrr),
                s.resumed,
                pct(s.resumed)
            );
        }
        if a.resume {
            println!("  sessions    {received} tickets received; {offered} handshakes offered one (as many were begun), {none} found none to offer");
        }
        if reconnects > 0 || lost > 0 || s.connect_errors > 0 {
            println!(
                "  reconnects  {reconnects} ({lost} requests lost with their connections; {} connects failed; {alive} alive at the end)",
                s.connect_errors
            );
        }
    }
    if let Some(e) = &s.first_tls_error {
        eprintln!("rpcbench: {} TLS session(s) failed; the first: {e}", s.tls_errors);
    }
    exit(if s.errors > 0 || s.ok == 0 { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::Hist;

    #[test]
    fn histogram_buckets_are_tight() {
        for v in [0u64, 1, 127, 128, 129, 1000, 12_345, 1 << 20, u64::MAX >> 2] {
            let i = Hist::index(v);
            assert!(Hist::upper(i) >= v, "{v}");
            assert!(i == 0 || Hist::upper(i - 1) < v, "{v}");
            assert!((Hist::upper(i) - v) as f64 <= v as f64 / 64.0 + 1.0, "{v}");
        }
        let mut h = Hist::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() < 500_000.0 * 0.02, "{p50}");
        assert_eq!(h.quantile(1.0), 1_000_000);
    }
}
