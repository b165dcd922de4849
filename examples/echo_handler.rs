//! echo_handler: a handler process (SPEC §7) in Rust that answers every
//! request `{"id":N,"in":M,"params":P,"deadline_ms":MS}` with
//! `{"id":N,"out":"pong","result":P}`, `P` copied byte for byte, so that
//! the client's reply is exactly built-in `ping`'s `{"out":"pong","result":P}`.
//! bench/run measures the handler path with it.
//!
//! ```toml
//! [handlers.echo]
//! exec = ["/path/to/target/release/examples/echo_handler"]
//! processes = 2
//! max_inflight = 16          # any value: it answers in order, which is allowed
//! [methods.echo]
//! handler = "echo"
//! ```
//!
//! It reads the channel (fd `RPCD_FD`, 3) in large chunks, answers every
//! complete frame of a chunk, and writes those replies in one write. It
//! exits 0 when rpcd closes the channel (EOF), 1 on a channel error or an
//! invalid frame (rpcd then answers the calls it held `handler_failed`).
//!
//! Requests are taken apart by position when they have rpcd's layout (id,
//! in, params, deadline_ms, in that order, no spaces: what rpcd sends), and
//! with serde_json otherwise. Only std and serde_json.

use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::exit;

/// Read at most this much at a time (and at least this much room to read into).
const CHUNK: usize = 256 * 1024;
/// A frame over this is refused (rpcd's own limit is far lower by default).
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// The request's id (the digits) and params (raw JSON), borrowed from `body`.
fn split(body: &[u8]) -> Option<(&[u8], &[u8])> {
    fast(body).or_else(|| slow(body))
}

/// `{"id":DIGITS,"in":"NAME","params":P,"deadline_ms":DIGITS}`: rpcd's layout.
fn fast(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = body.strip_prefix(b"{\"id\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let (id, rest) = rest.split_at(digits);
    let rest = rest.strip_prefix(b",\"in\":\"")?;
    // Past the method name: a JSON string, escapes skipped.
    let mut i = 0;
    loop {
        match *rest.get(i)? {
            b'\\' => i += 2,
            b'"' => break,
            _ => i += 1,
        }
    }
    let rest = rest.get(i + 1..)?.strip_prefix(b",\"params\":")?;
    // deadline_ms comes last and is an integer: the params end where it begins.
    let rest = rest.strip_suffix(b"}")?;
    let tail = rest.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if tail == 0 {
        return None;
    }
    let params = rest[..rest.len() - tail].strip_suffix(b",\"deadline_ms\":")?;
    if params.is_empty() {
        return None;
    }
    Some((id, params))
}

/// Any other layout: parsed for real.
fn slow(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let m: BTreeMap<&str, &RawValue> = serde_json::from_slice(body).ok()?;
    let id = m.get("id")?.get().as_bytes();
    if id.is_empty() || !id.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let params = m.get("params").map_or(&b"null"[..], |p| p.get().as_bytes());
    Some((id, params))
}

fn reply(out: &mut Vec<u8>, id: &[u8], params: &[u8]) {
    let len = 7 + id.len() + 23 + params.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(b"{\"id\":"); // 6
    out.extend_from_slice(id);
    out.extend_from_slice(b",\"out\":\"pong\",\"result\":"); // 23
    out.extend_from_slice(params);
    out.push(b'}'); // 1
}

fn fail(msg: &str) -> ! {
    eprintln!("echo_handler: {msg}");
    exit(1)
}

fn main() {
    let fd: i32 = std::env::var("RPCD_FD").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    // SAFETY: rpcd hands us this descriptor (its one end of the channel) and
    // nothing else in this process uses it.
    let mut chan = unsafe { UnixStream::from_raw_fd(fd) };
    let mut buf: Vec<u8> = vec![0; CHUNK];
    let (mut start, mut end) = (0usize, 0usize); // unparsed bytes: buf[start..end]
    let mut out: Vec<u8> = Vec::with_capacity(CHUNK);
    loop {
        if start == end {
            (start, end) = (0, 0);
        } else if buf.len() - end < CHUNK / 4 {
            // Keep room to read into: move the partial frame to the front,
            // and grow only for a frame larger than the buffer.
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
            if buf.len() - end < CHUNK / 4 {
                let l = buf.len();
                buf.resize(l * 2, 0);
            }
        }
        let n = match chan.read(&mut buf[end..]) {
            Ok(0) => exit(0), // EOF: rpcd is done with us
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => fail(&format!("reading the channel: {e}")),
        };
        end += n;
        while end - start >= 4 {
            let len = u32::from_le_bytes(buf[start..start + 4].try_into().unwrap()) as usize;
            if len > MAX_FRAME {
                fail(&format!("a frame of {len} bytes"));
            }
            if end - start < 4 + len {
                break; // the rest comes with later reads (the buffer grows above)
            }
            let body = &buf[start + 4..start + 4 + len];
            let Some((id, params)) = split(body) else {
                fail(&format!("not a request: {:?}", String::from_utf8_lossy(&body[..body.len().min(80)])))
            };
            reply(&mut out, id, params);
            start += 4 + len;
        }
        if !out.is_empty() {
            if let Err(e) = chan.write_all(&out) {
                fail(&format!("writing the channel: {e}"));
            }
            out.clear();
            if out.capacity() > 4 * CHUNK {
                out = Vec::with_capacity(CHUNK);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_requests_apart() {
        let b = br#"{"id":17,"in":"echo","params":{"a":[1,",\"deadline_ms\":2"]},"deadline_ms":4999}"#;
        assert_eq!(fast(b), Some((&b"17"[..], &br#"{"a":[1,",\"deadline_ms\":2"]}"#[..])));
        let b = br#"{"id":3,"in":"e\"cho","params":null,"deadline_ms":1}"#;
        assert_eq!(split(b), Some((&b"3"[..], &b"null"[..])));
        let b = br#"{"in": "echo", "id": 5, "params": [1, 2]}"#;
        assert_eq!(fast(b), None);
        assert_eq!(split(b), Some((&b"5"[..], &b"[1, 2]"[..])));
        let mut out = Vec::new();
        reply(&mut out, b"5", b"[1, 2]");
        assert_eq!(&out[4..], br#"{"id":5,"out":"pong","result":[1, 2]}"#);
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()) as usize, out.len() - 4);
    }
}
