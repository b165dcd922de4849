//! The RPC client used by `rpcctl call` (and tests and benchmarks): framed
//! JSON over TCP (or TLS, SPEC §9), lazily connected and reused per server,
//! with failover.

use crate::discovery::{Server, Servers};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A connection's byte stream: plain TCP or TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub out: String,
    pub result: Value,
}

impl Response {
    pub fn error_code(&self) -> Option<&str> {
        if self.out == "error" {
            self.result.get("code").and_then(|c| c.as_str())
        } else {
            None
        }
    }
}

#[derive(Debug)]
pub enum CallError {
    /// Could not connect: nothing was sent.
    Connect(String),
    /// The TLS handshake failed (a certificate refused either way, a
    /// plain-TCP port): nothing was sent, and trying again will not help.
    Tls(String),
    /// The request could not be written whole: it did not run.
    NotSent(String),
    /// The connection failed or closed after the request was sent, before
    /// the reply: it may have run.
    Lost(String),
    Timeout,
    /// The reply was not a valid frame or response.
    Protocol(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            CallError::Connect(s) => write!(f, "cannot connect: {s}"),
            CallError::Tls(s) => write!(f, "{s}"),
            CallError::NotSent(s) => write!(f, "connection lost before the request was sent: {s}"),
            CallError::Lost(s) => write!(f, "connection lost before the reply: {s}"),
            CallError::Timeout => write!(f, "timed out"),
            CallError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

/// One connection to one server.
pub struct Conn {
    stream: Io,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Conn {
    /// A plain-TCP connection.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn, CallError> {
        Conn::connect_with(addr, timeout, None).await
    }

    /// A connection, with TLS when `tls` is given; `timeout` bounds the
    /// connect and the handshake together. A failed handshake is a
    /// [`CallError::Connect`]: nothing was sent.
    pub async fn connect_with(addr: &str, timeout: Duration, tls: Option<&crate::tls::Client>) -> Result<Conn, CallError> {
        let open = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| CallError::Connect(format!("{addr}: {e}")))?;
            let _ = stream.set_nodelay(true);
            match tls {
                None => Ok(Io::Plain(stream)),
                Some(t) => t.connect(addr, stream).await.map(|s| Io::Tls(Box::new(s))).map_err(CallError::Tls),
            }
        };
        let stream = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(CallError::Connect(format!("{addr}: timed out"))),
        };
        Ok(Conn { stream, buf: BytesMut::with_capacity(4096), out: Vec::with_capacity(256) })
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, method: &str, params: &Value, timeout: Duration) -> Result<Response, CallError> {
        match tokio::time::timeout(timeout, self.send_and_read(method, params)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    async fn send_and_read(&mut self, method: &str, params: &Value) -> Result<Response, CallError> {
        self.out.clear();
        let body = serde_json::to_vec(&json!({"in": method, "params": params})).map_err(|e| CallError::Protocol(e.to_string()))?;
        self.out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&body);
        self.stream.write_all(&self.out).await.map_err(|e| CallError::NotSent(e.to_string()))?;
        self.stream.flush().await.map_err(|e| CallError::NotSent(e.to_string()))?;
        self.read_reply().await
    }

    /// Whether the server has closed this (idle) connection, as a draining
    /// server does: then a request must go on a fresh one.
    pub fn is_stale(&mut self) -> bool {
        match &mut self.stream {
            Io::Plain(s) => {
                let mut b = [0u8; 1];
                match s.try_read(&mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                    // EOF, an error, or bytes nobody asked for: unusable.
                    _ => true,
                }
            }
            Io::Tls(s) => {
                // Records that carry no data (session tickets) are taken in
                // and are no sign of staleness; a close_notify, an EOF or
                // data nobody asked for are.
                let mut b = [0u8; 1];
                let mut rb = ReadBuf::new(&mut b);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                !matches!(Pin::new(s.as_mut()).poll_read(&mut cx, &mut rb), Poll::Pending)
            }
        }
    }

    async fn read_reply(&mut self) -> Result<Response, CallError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    let v: Value = serde_json::from_slice(&self.buf[4..4 + len]).map_err(|e| CallError::Protocol(e.to_string()))?;
                    self.buf.advance(4 + len);
                    let out = v.get("out").and_then(|o| o.as_str()).ok_or_else(|| CallError::Protocol(format!("no \"out\" in {v}")))?;
                    return Ok(Response { out: out.to_string(), result: v.get("result").cloned().unwrap_or(Value::Null) });
                }
                self.buf.reserve(4 + len - self.buf.len());
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(CallError::Lost("closed by the server".into())),
                Ok(_) => {}
                Err(e) => return Err(CallError::Lost(e.to_string())),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    Random,
    RoundRobin,
}

/// Calls whichever servers are alive, failing over on connection errors.
pub struct Caller {
    servers: Servers,
    strategy: Strategy,
    conns: HashMap<String, Conn>,
    down: HashMap<String, Instant>,
    next: usize,
    /// Time limit of a whole call, retries included.
    pub timeout: Duration,
    pub attempts: usize,
    /// How long a server that failed is left out.
    pub down_for: Duration,
    /// Time limit of one connect: a server that does not answer a connect
    /// (a host cut off, its SYNs dropped) is marked down and another tried.
    pub connect_timeout: Duration,
    /// Time limit of one attempt of an idempotent call, after which another
    /// server is tried (the first one marked down). If no other server is
    /// up, the call keeps waiting for this one's reply until `timeout`.
    /// None: a third of `timeout`. Calls that are not idempotent have one
    /// attempt once sent, with all of the time that is left.
    pub attempt_timeout: Option<Duration>,
    /// Retry calls that may have run (a connection lost after the request
    /// was sent) on another server. None: only for `ping` and `pi`.
    pub idempotent: Option<bool>,
    /// What TLS connections trust and present (`--ca`, `--cert`, `--key`).
    pub tls_options: crate::tls::ClientOptions,
    /// TLS to every server (`--tls`); otherwise only to servers whose node
    /// says `"tls": true`.
    pub tls_always: bool,
    /// Made from `tls_options` when first needed.
    tls: Option<crate::tls::Client>,
}

/// What a successful call returns: the server that answered, and its reply.
pub struct Answer {
    pub server: String,
    pub response: Response,
    pub attempts: usize,
}

impl Caller {
    pub fn new(servers: Servers, strategy: Strategy) -> Caller {
        Caller {
            servers,
            strategy,
            conns: HashMap::new(),
            down: HashMap::new(),
            next: 0,
            timeout: Duration::from_secs(10),
            attempts: 6,
            down_for: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            attempt_timeout: None,
            idempotent: None,
            tls_options: crate::tls::ClientOptions::default(),
            tls_always: false,
            tls: None,
        }
    }

    /// The TLS configuration for a server that needs one.
    fn tls_client(&mut self) -> Result<&crate::tls::Client, String> {
        if self.tls.is_none() {
            self.tls = Some(crate::tls::Client::new(&self.tls_options)?);
        }
        Ok(self.tls.as_ref().unwrap())
    }

    fn pick(&mut self, list: &[Server]) -> Option<(String, bool)> {
        let now = Instant::now();
        self.down.retain(|_, until| *until > now);
        let up: Vec<&Server> = list.iter().filter(|s| !self.down.contains_key(&s.addr())).collect();
        if up.is_empty() {
            return None;
        }
        let i = match self.strategy {
            Strategy::Random => rand::random::<usize>() % up.len(),
            Strategy::RoundRobin => {
                self.next = self.next.wrapping_add(1);
                self.next % up.len()
            }
        };
        Some((up[i].addr(), self.tls_always || up[i].tls()))
    }

    /// Whether a server other than `addr` is in `list` and not marked down.
    fn another_up(down: &HashMap<String, Instant>, list: &[Server], addr: &str) -> bool {
        let now = Instant::now();
        list.iter().map(Server::addr).any(|a| a != addr && !matches!(down.get(&a), Some(until) if *until > now))
    }

    fn mark_down(&mut self, addr: &str) {
        self.down.insert(addr.to_string(), Instant::now() + self.down_for);
    }

    /// Calls `method`, retrying on another server where SPEC §2 allows it:
    /// when the request provably did not run (no connection within
    /// [`Caller::connect_timeout`], not sent, or answered `shutting_down`,
    /// `overloaded` or `unavailable`), and, for idempotent methods (`ping`,
    /// `pi`, or [`Caller::idempotent`]), when the connection was lost after
    /// sending or no reply came within [`Caller::attempt_timeout`]. For
    /// other methods a timeout is an error: the request may have run.
    pub async fn call(&mut self, method: &str, params: &Value) -> Result<Answer, String> {
        let idempotent = self.idempotent.unwrap_or(matches!(method, "ping" | "pi"));
        let per_attempt = self.attempt_timeout.unwrap_or(self.timeout / 3).max(Duration::from_millis(1));
        let mut last_err = String::from("no server available");
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0;
        while attempt < self.attempts && Instant::now() < deadline {
            let list = self.servers.current().await;
            let Some((addr, tls)) = self.pick(&list) else {
                if list.is_empty() {
                    last_err = "no server registered".into();
                }
                // Waiting for a server to come back uses no attempt.
                tokio::time::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now()))).await;
                continue;
            };
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if self.conns.get_mut(&addr).is_some_and(Conn::is_stale) {
                self.conns.remove(&addr);
            }
            let fresh = !self.conns.contains_key(&addr);
            if fresh {
                let timeout = self.connect_timeout.min(left);
                let tls = match tls {
                    false => None,
                    true => match self.tls_client() {
                        Ok(t) => Some(t.clone()),
                        // Nothing to try elsewhere: the client's own TLS settings are wrong.
                        Err(e) => return Err(e),
                    },
                };
                match Conn::connect_with(&addr, timeout, tls.as_ref()).await {
                    Ok(c) => {
                        self.conns.insert(addr.clone(), c);
                    }
                    Err(e) => {
                        last_err = e.to_string();
                        self.mark_down(&addr);
                        // A refused handshake is no passing trouble: give
                        // up unless another server can be asked.
                        if matches!(e, CallError::Tls(_)) && !Self::another_up(&self.down, &list, &addr) {
                            return Err(last_err);
                        }
                        continue;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            let conn = self.conns.get_mut(&addr).unwrap();
            let result = if idempotent && per_attempt < left {
                match tokio::time::timeout(per_attempt, conn.send_and_read(method, params)).await {
                    Ok(r) => r,
                    Err(_) if Self::another_up(&self.down, &list, &addr) => {
                        // No reply in time (a host cut off, a stuck server):
                        // ask another one; this one may answer later, unread.
                        self.conns.remove(&addr);
                        self.mark_down(&addr);
                        last_err = format!("{addr}: no reply within {per_attempt:?}");
                        continue;
                    }
                    // The only server up: wait on for its reply. (Reading
                    // is cancel-safe: what arrived so far is in the buffer.)
                    Err(_) => match tokio::time::timeout(left - per_attempt, conn.read_reply()).await {
                        Ok(r) => r,
                        Err(_) => Err(CallError::Timeout),
                    },
                }
            } else {
                conn.call(method, params, left).await
            };
            let failure = match result {
                Ok(resp) if resp.error_code().is_some_and(crate::protocol::ErrorCode::retryable) => format!("{addr}: {}", resp.result),
                Ok(response) => return Ok(Answer { server: addr, response, attempts: attempt }),
                Err(CallError::Timeout) => {
                    self.conns.remove(&addr);
                    return Err(format!("{addr}: timed out after {:?}", self.timeout));
                }
                Err(e @ CallError::Lost(_)) if !idempotent => {
                    self.conns.remove(&addr);
                    return Err(format!("{addr}: {e} (it may have run; not retried: {method} is not idempotent)"));
                }
                Err(e) => format!("{addr}: {e}"),
            };
            last_err = failure;
            self.conns.remove(&addr);
            // A reused connection may simply have been retired by a draining
            // worker: try the same server once more on a fresh connection.
            if fresh {
                self.mark_down(&addr);
            }
        }
        Err(last_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn server(port: u16) -> Server {
        Server { node: String::new(), host: "127.0.0.1".into(), port, data: Value::Null }
    }

    /// A server on its own thread: counts the requests it reads and answers
    /// them with `pong` (or never, when `silent`).
    fn fake(silent: bool) -> (u16, Arc<AtomicUsize>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let frames = Arc::new(AtomicUsize::new(0));
        let f = frames.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for sock in l.incoming().take(50) {
                let Ok(mut sock) = sock else { continue };
                let f = f.clone();
                let s2 = sock.try_clone().unwrap();
                held.push(s2);
                std::thread::spawn(move || {
                    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    loop {
                        let mut len = [0u8; 4];
                        if sock.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
                        if sock.read_exact(&mut body).is_err() {
                            return;
                        }
                        f.fetch_add(1, Ordering::SeqCst);
                        if !silent {
                            let reply = br#"{"out":"pong","result":null}"#;
                            let mut out = (reply.len() as u32).to_le_bytes().to_vec();
                            out.extend_from_slice(reply);
                            if sock.write_all(&out).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, frames)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn an_idempotent_call_without_a_reply_in_time_goes_to_another_server() {
        let (silent, silent_frames) = fake(true);
        let (good, good_frames) = fake(false);
        runtime().block_on(async {
            let mut c = Caller::new(Servers::Static(vec![server(silent), server(good)]), Strategy::RoundRobin);
            c.timeout = Duration::from_secs(10);
            c.attempt_timeout = Some(Duration::from_millis(200));
            c.down_for = Duration::from_secs(30);
            let t = Instant::now();
            for _ in 0..10 {
                let a = c.call("ping", &Value::Null).await.expect("every ping is answered");
                assert_eq!(a.server, format!("127.0.0.1:{good}"));
            }
            assert!(t.elapsed() < Duration::from_secs(5), "one attempt timeout, not the call's: {:?}", t.elapsed());
        });
        assert_eq!(silent_frames.load(Ordering::SeqCst), 1, "tried once, then marked down");
        assert_eq!(good_frames.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn the_only_server_up_is_waited_for_and_other_methods_are_never_retried_after_a_timeout() {
        let (silent, silent_frames) = fake(true);
        let (good, good_frames) = fake(false);
        runtime().block_on(async {
            // Alone, a slow server is waited for until the call's timeout.
            let mut c = Caller::new(Servers::Static(vec![server(silent)]), Strategy::RoundRobin);
            c.timeout = Duration::from_millis(600);
            c.attempt_timeout = Some(Duration::from_millis(100));
            let t = Instant::now();
            let e = c.call("ping", &Value::Null).await.err().expect("no reply");
            assert!(e.contains("timed out"), "{e}");
            assert!(t.elapsed() >= Duration::from_millis(600), "{:?}", t.elapsed());
            // A method that may not run twice: one attempt, the whole timeout.
            let mut c = Caller::new(Servers::Static(vec![server(silent), server(good)]), Strategy::RoundRobin);
            c.timeout = Duration::from_millis(500);
            c.attempt_timeout = Some(Duration::from_millis(100));
            c.next = 1; // round-robin picks the silent one first
            let t = Instant::now();
            let e = c.call("add", &json!([1, 2])).await.err().expect("not retried");
            assert!(e.contains("timed out"), "{e}");
            assert!(t.elapsed() >= Duration::from_millis(500), "{:?}", t.elapsed());
        });
        assert_eq!(silent_frames.load(Ordering::SeqCst), 2);
        assert_eq!(good_frames.load(Ordering::SeqCst), 0, "add was not sent elsewhere");
    }

    #[test]
    fn a_connect_that_hangs_is_given_up_after_the_connect_timeout() {
        // A listener that never accepts, its queue full: further SYNs are
        // dropped, and a connect hangs as it does to a host cut off.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        sock.listen(0).unwrap();
        let hung = sock.local_addr().unwrap().as_socket().unwrap();
        let fill: Vec<_> = (0..4).filter_map(|_| std::net::TcpStream::connect_timeout(&hung, Duration::from_millis(200)).ok()).collect();
        if std::net::TcpStream::connect_timeout(&hung, Duration::from_millis(300)).is_ok() {
            eprintln!("skipped: a full accept queue does not make connects hang here");
            return;
        }
        let (good, good_frames) = fake(false);
        runtime().block_on(async {
            let mut c = Caller::new(Servers::Static(vec![server(hung.port()), server(good)]), Strategy::RoundRobin);
            c.timeout = Duration::from_secs(10);
            c.connect_timeout = Duration::from_millis(200);
            c.next = 1; // the hung one first
            let t = Instant::now();
            let a = c.call("add", &json!([1, 2])).await.expect("not sent to the hung one, so retried");
            assert_eq!(a.server, format!("127.0.0.1:{good}"));
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        });
        assert_eq!(good_frames.load(Ordering::SeqCst), 1);
        drop(fill);
    }
}
