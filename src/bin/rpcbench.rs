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
//! ```text
//! rpcbench --addr 127.0.0.1:8001 [--proto rpcd|redis] [--method ping|pi|NAME]
//!          [--params JSON] [--reply-as ping|pi | --expect BODY]
//!          [--conns 16] [--depth 1] [--duration 5] [--warmup 1] [--kv]
//! ```

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process::exit;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: rpcbench --addr HOST:PORT [--proto rpcd|redis] [--method ping|pi|NAME] \
[--params JSON] [--reply-as ping|pi | --expect BODY] [--conns N] [--depth D] [--duration SECS] \
[--warmup SECS] [--kv]";

/// Caps: every loop here is bounded.
const MAX_CONNS: usize = 10_000;
const MAX_DEPTH: usize = 4096;
const MAX_DURATION: f64 = 3600.0;
const MAX_RECONNECTS: u64 = 10_000;

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
}

struct Stats {
    ok: u64,
    errors: u64,
    /// Replies, warm-up included.
    total: u64,
    hist: Hist,
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

struct Bench<'a> {
    proto: Proto,
    req_len: usize,
    blob: &'a [u8],
    expected: &'a [u8],
    depth: usize,
    measure_from: Instant,
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

    /// Reads all that is available, checks and counts the replies, and
    /// sends as many new requests as replies arrived.
    fn on_readable(&mut self, c: &mut Conn) {
        let mut done = 0usize;
        let mut now = Instant::now();
        loop {
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
            match c.stream.read(&mut c.rbuf[c.rend..]) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => {
                    now = Instant::now();
                    c.rend += n;
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
                            }
                        }
                    }
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
        if done > 0 && !c.dead {
            self.queue(c, done, now);
            self.flush(c);
        }
    }
}

fn main() {
    let a = parse_args();
    let (req, expected) = request_and_reply(&a);
    // depth+1 copies: any window of depth requests starting at any phase.
    let blob = req.repeat(a.depth + 1);

    let mut poll = Poll::new().unwrap_or_else(|e| die(&format!("epoll: {e}")));
    let mut conns: Vec<Conn> = Vec::with_capacity(a.conns);
    for i in 0..a.conns {
        let mut stream = match connect(a.addr) {
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
            rbuf: vec![0; 64 * 1024],
            rpos: 0,
            rend: 0,
            wrem: 0,
            wphase: 0,
            sent: VecDeque::with_capacity(a.depth),
            dead: false,
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
        stats: Stats { ok: 0, errors: 0, total: 0, hist: Hist::new() },
    };
    for c in conns.iter_mut() {
        b.queue(c, a.depth, start);
        b.flush(c);
    }

    let mut events = Events::with_capacity(1024);
    let mut reconnects = 0u64;
    let mut lost = 0u64;
    // The client's own CPU use over the measured time: near 100% means the
    // client, not the server, limits the rate.
    let mut cpu_from: Option<Duration> = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if cpu_from.is_none() && now >= measure_from {
            cpu_from = Some(cpu_time());
        }
        let timeout = (end - now).min(Duration::from_millis(100));
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            die(&format!("epoll_wait: {e}"));
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if c.dead {
                continue;
            }
            if ev.is_writable() && c.wrem > 0 {
                b.flush(c);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                b.on_readable(c);
            }
        }
        // Replace dead connections (bounded): their requests count as errors.
        for (i, c) in conns.iter_mut().enumerate() {
            if !c.dead {
                continue;
            }
            let n = c.sent.len() as u64;
            b.stats.errors += n;
            lost += n;
            let _ = poll.registry().deregister(&mut c.stream);
            if reconnects >= MAX_RECONNECTS || Instant::now() >= end {
                continue;
            }
            reconnects += 1;
            match connect(a.addr) {
                Ok(mut s) => {
                    if poll.registry().register(&mut s, Token(i), Interest::READABLE | Interest::WRITABLE).is_ok() {
                        c.stream = s;
                        c.rpos = 0;
                        c.rend = 0;
                        c.wrem = 0;
                        c.wphase = 0;
                        c.sent.clear();
                        c.dead = false;
                        let t = Instant::now();
                        b.queue(c, b.depth, t);
                        b.flush(c);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
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
    if a.kv {
        println!(
            "rps={rps:.0} requests={} errors={} p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1} mean_us={:.1} secs={elapsed:.3} reconnects={reconnects} client_cpu_pct={client_cpu:.0} total_replies={}",
            s.ok,
            s.errors,
            us(p50),
            us(p99),
            us(p999),
            us(max),
            us(mean),
            s.total
        );
    } else {
        let what = match a.proto {
            Proto::Redis => "redis PING".to_string(),
            Proto::Rpcd => format!("rpcd {}", a.method),
        };
        println!(
            "{what} at {}: {} connection(s), depth {}, {elapsed:.2} s measured after {:.2} s warm-up",
            a.addr, a.conns, a.depth, a.warmup
        );
        println!("  requests/s  {rps:.0}   ({} replies checked, {} errors; client CPU {client_cpu:.0}%)", s.ok, s.errors);
        println!(
            "  latency     p50 {:.1} us   p99 {:.1} us   p99.9 {:.1} us   max {:.1} us   mean {:.1} us",
            us(p50),
            us(p99),
            us(p999),
            us(max),
            us(mean)
        );
        if reconnects > 0 || lost > 0 {
            println!("  reconnects  {reconnects} ({lost} requests lost with their connections; {alive} alive at the end)");
        }
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
