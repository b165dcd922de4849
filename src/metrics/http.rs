//! The `/metrics` listener: a minimal HTTP/1.x server in the master's
//! runtime that never lets a client hold up the master's loop.
//!
//! Each connection is a task of its own, bounded in everything: the request
//! head must arrive within [`READ_TIMEOUT`] and fit in [`MAX_HEAD`] bytes
//! (else 408 or 431, and the connection closes); the reply must be taken
//! within [`WRITE_TIMEOUT`]; at most [`MAX_CLIENTS`] are served at once (the
//! rest are closed at accept). Only the reading of the counts happens in
//! the master's loop, through [`Scrape`]: a few microseconds per worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

pub const MAX_HEAD: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CLIENTS: usize = 64;

/// A scrape, for the master's loop to answer with the exposition.
pub struct Scrape {
    pub openmetrics: bool,
    pub reply: oneshot::Sender<String>,
}

/// Binds `addr` (retrying every second while it is taken: during a
/// restart the previous instance holds it until it exits) and serves it.
pub async fn run(addr: SocketAddr, tx: mpsc::UnboundedSender<Scrape>) {
    let mut warned = false;
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            Err(e) => {
                if !warned {
                    log::warn!("metrics: cannot listen on {addr}: {e}; retrying every second");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    log::info!("metrics: serving http://{}/metrics", listener.local_addr().unwrap_or(addr));
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, most likely: wait a little rather than spin.
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if busy.load(Ordering::Relaxed) >= MAX_CLIENTS {
            log::warn!("metrics: {MAX_CLIENTS} scrapes in progress; closing the connection from {peer}");
            continue;
        }
        busy.fetch_add(1, Ordering::Relaxed);
        let (tx, busy) = (tx.clone(), busy.clone());
        tokio::spawn(async move {
            serve(stream, &tx).await;
            busy.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = crate::master::bind_listener(addr, 128)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// What a request asks for.
#[derive(Debug, PartialEq)]
pub enum Asked {
    Metrics { openmetrics: bool, head_only: bool },
    /// A status and why, for anything else.
    Error(u16, &'static str),
}

/// Parses a complete request head.
pub fn parse(head: &[u8]) -> Asked {
    let Ok(text) = std::str::from_utf8(head) else { return Asked::Error(400, "Bad Request") };
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Asked::Error(400, "Bad Request");
    };
    if !version.starts_with("HTTP/1.") {
        return Asked::Error(505, "HTTP Version Not Supported");
    }
    let path = target.split('?').next().unwrap_or("");
    if path != "/metrics" {
        return Asked::Error(404, "Not Found");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Asked::Error(405, "Method Not Allowed"),
    };
    let openmetrics = lines.any(|l| {
        let mut kv = l.splitn(2, ':');
        kv.next().is_some_and(|k| k.trim().eq_ignore_ascii_case("accept")) && kv.next().is_some_and(|v| v.contains("application/openmetrics-text"))
    });
    Asked::Metrics { openmetrics, head_only }
}

/// Reads the request head: Ok(head) or Err(status) for a head too large,
/// too slow or cut short (0: closed, answer nothing).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 2048];
        loop {
            let n = stream.read(&mut chunk).await.map_err(|_| 0u16)?;
            if n == 0 {
                return Err(0);
            }
            let from = buf.len().saturating_sub(3);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                buf.truncate(from + end);
                return Ok(());
            }
            if buf.len() > MAX_HEAD {
                return Err(431);
            }
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(code)) => Err(code),
        Err(_) => Err(408),
    }
}

async fn serve(mut stream: TcpStream, tx: &mpsc::UnboundedSender<Scrape>) {
    let (status, reason, ctype, body, head_only) = match read_head(&mut stream).await {
        Err(0) => return,
        Err(431) => (431, "Request Header Fields Too Large", "text/plain", "request headers over 8 KiB\n".to_string(), false),
        Err(code) => (code, "Request Timeout", "text/plain", "no complete request within 5 s\n".to_string(), false),
        Ok(head) => match parse(&head) {
            Asked::Error(code, reason) => (code, reason, "text/plain", format!("{code} {reason}: rpcd serves GET /metrics\n"), false),
            Asked::Metrics { openmetrics, head_only } => {
                let (reply, rx) = oneshot::channel();
                if tx.send(Scrape { openmetrics, reply }).is_err() {
                    return;
                }
                match tokio::time::timeout(READ_TIMEOUT, rx).await {
                    Ok(Ok(text)) => (200, "OK", if openmetrics { super::expose::OPENMETRICS } else { super::expose::TEXT }, text, head_only),
                    _ => (503, "Service Unavailable", "text/plain", "the master did not answer\n".to_string(), false),
                }
            }
        },
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&body);
    }
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), Asked::Metrics { openmetrics: false, head_only: false });
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            Asked::Metrics { openmetrics: true, head_only: false }
        );
        assert_eq!(parse(b"HEAD /metrics HTTP/1.1"), Asked::Metrics { openmetrics: false, head_only: true });
        assert_eq!(parse(b"GET /nope HTTP/1.1"), Asked::Error(404, "Not Found"));
        assert_eq!(parse(b"POST /metrics HTTP/1.1"), Asked::Error(405, "Method Not Allowed"));
        assert_eq!(parse(b"GET /metrics"), Asked::Error(400, "Bad Request"));
        assert_eq!(parse(b"GET /metrics SPDY/3"), Asked::Error(505, "HTTP Version Not Supported"));
        assert_eq!(parse(b"\xff\xfe"), Asked::Error(400, "Bad Request"));
    }
}
