//! The RPC client used by `rpcctl call` (and tests and benchmarks): framed
//! JSON over TCP, lazily connected and reused per server, with failover.

use crate::discovery::{Server, Servers};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
            CallError::NotSent(s) => write!(f, "connection lost before the request was sent: {s}"),
            CallError::Lost(s) => write!(f, "connection lost before the reply: {s}"),
            CallError::Timeout => write!(f, "timed out"),
            CallError::Protocol(s) => write!(f, "protocol error: {s}"),
        }
    }
}

/// One connection to one server.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Conn, CallError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::Connect(format!("{addr}: {e}"))),
            Err(_) => return Err(CallError::Connect(format!("{addr}: timed out"))),
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn { stream, buf: BytesMut::with_capacity(4096), out: Vec::with_capacity(256) })
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, method: &str, params: &Value, timeout: Duration) -> Result<Response, CallError> {
        self.out.clear();
        let body = serde_json::to_vec(&json!({"in": method, "params": params})).map_err(|e| CallError::Protocol(e.to_string()))?;
        self.out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&body);
        match tokio::time::timeout(timeout, async {
            self.stream.write_all(&self.out).await.map_err(|e| CallError::NotSent(e.to_string()))?;
            self.read_reply().await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// Whether the server has closed this (idle) connection, as a draining
    /// server does: then a request must go on a fresh one.
    pub fn is_stale(&self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            // EOF, an error, or bytes nobody asked for: unusable.
            _ => true,
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
    pub timeout: Duration,
    pub attempts: usize,
    pub down_for: Duration,
    /// Retry calls that may have run (a connection lost after the request
    /// was sent) on another server. None: only for `ping` and `pi`.
    pub idempotent: Option<bool>,
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
            idempotent: None,
        }
    }

    fn pick(&mut self, list: &[Server]) -> Option<String> {
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
        Some(up[i].addr())
    }

    /// Calls `method`, retrying on another server where SPEC §2 allows it:
    /// when the request provably did not run (no connection, not sent, or
    /// answered `shutting_down`, `overloaded` or `unavailable`), and, for
    /// idempotent methods (`ping`, `pi`, or [`Caller::idempotent`]), when
    /// the connection was lost after sending. Timeouts are errors.
    pub async fn call(&mut self, method: &str, params: &Value) -> Result<Answer, String> {
        let idempotent = self.idempotent.unwrap_or(matches!(method, "ping" | "pi"));
        let mut last_err = String::from("no server available");
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0;
        while attempt < self.attempts && Instant::now() < deadline {
            let list = self.servers.current().await;
            let Some(addr) = self.pick(&list) else {
                if list.is_empty() {
                    last_err = "no server registered".into();
                }
                // Waiting for a server to come back uses no attempt.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            attempt += 1;
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if self.conns.get(&addr).is_some_and(Conn::is_stale) {
                self.conns.remove(&addr);
            }
            let fresh = !self.conns.contains_key(&addr);
            if fresh {
                match Conn::connect(&addr, left).await {
                    Ok(c) => {
                        self.conns.insert(addr.clone(), c);
                    }
                    Err(e) => {
                        last_err = e.to_string();
                        self.down.insert(addr, Instant::now() + self.down_for);
                        continue;
                    }
                }
            }
            let conn = self.conns.get_mut(&addr).unwrap();
            let failure = match conn.call(method, params, left).await {
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
                self.down.insert(addr, Instant::now() + self.down_for);
            }
        }
        Err(last_err)
    }
}
