//! The wire protocol: 4-byte little-endian length, then UTF-8 JSON.
//!
//! Request `{"in": METHOD, "params": ANY, "id"?: ANY}`, response
//! `{"out": STRING, "result": ANY, "id"?: ANY}`. Errors are
//! `{"out": "error", "result": {"code": CODE, "message": TEXT}}`.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Error codes of the contract (SPEC.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownMethod,
    BadParams,
    TooLarge,
    Overloaded,
    ShuttingDown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::BadParams => "bad_params",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

/// What the decoder found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame: body length (the body starts at offset 4).
    Frame(usize),
    /// More bytes are needed; the value is how many in total.
    Need(usize),
    /// The announced length is over the limit.
    TooLarge(u64),
}

pub fn decode(buf: &[u8], max_frame: u32) -> Decoded {
    if buf.len() < 4 {
        return Decoded::Need(4);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max_frame {
        return Decoded::TooLarge(len as u64);
    }
    let total = 4 + len as usize;
    if buf.len() < total {
        Decoded::Need(total)
    } else {
        Decoded::Frame(len as usize)
    }
}

/// Appends a frame to `out`, writing the body with `body`.
pub fn write_frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// A present JSON value, kept as its raw text (`null` included).
#[derive(Default)]
struct Present<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Present<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|v| Present(Some(v)))
    }
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "in", borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Present<'a>,
    #[serde(default, borrow)]
    id: Present<'a>,
}

/// Limits the request handler needs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub pi_max_terms: u64,
}

/// The original's pi series: bit-identical float loop (two divisions).
pub fn pi(n: u64) -> f64 {
    let mut s = 0.0f64;
    for i in 0..=n {
        let d = (2 * i + 1) as f64;
        s += 1.0 / d / d;
    }
    (8.0 * s).sqrt()
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Appends an error response frame.
pub fn error_frame(out: &mut Vec<u8>, code: ErrorCode, message: &str, id: Option<&RawValue>) {
    write_frame(out, |o| {
        o.extend_from_slice(b"{\"out\":\"error\",\"result\":{\"code\":\"");
        o.extend_from_slice(code.as_str().as_bytes());
        o.extend_from_slice(b"\",\"message\":");
        write_json_str(o, message);
        o.push(b'}');
        if let Some(id) = id {
            o.extend_from_slice(b",\"id\":");
            o.extend_from_slice(id.get().as_bytes());
        }
        o.push(b'}');
    });
}

fn ok_frame(out: &mut Vec<u8>, tag: &str, result: &[u8], id: Option<&RawValue>) {
    write_frame(out, |o| {
        o.extend_from_slice(b"{\"out\":\"");
        o.extend_from_slice(tag.as_bytes());
        o.extend_from_slice(b"\",\"result\":");
        o.extend_from_slice(result);
        if let Some(id) = id {
            o.extend_from_slice(b",\"id\":");
            o.extend_from_slice(id.get().as_bytes());
        }
        o.push(b'}');
    });
}

/// Deepest nesting accepted (as serde_json's own limit): a deeper echo
/// would be unreadable for most clients.
pub const MAX_DEPTH: usize = 128;

fn too_deep(b: &[u8]) -> bool {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &c in b {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Handles one request body and appends exactly one response frame to `out`.
/// Returns the error code when the request failed (for logging and counters).
pub fn handle(body: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Option<ErrorCode> {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) => {
            error_frame(out, ErrorCode::BadJson, &format!("body is not UTF-8: {e}"), None);
            return Some(ErrorCode::BadJson);
        }
    };
    if text.len() > MAX_DEPTH && too_deep(text.as_bytes()) {
        let msg = format!("JSON nested deeper than {MAX_DEPTH} levels");
        error_frame(out, ErrorCode::BadJson, &msg, None);
        return Some(ErrorCode::BadJson);
    }
    if !text.trim_start().starts_with('{') {
        // Arrays would otherwise deserialize positionally into the struct.
        let code = if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            ErrorCode::BadRequest
        } else {
            ErrorCode::BadJson
        };
        let msg = if code == ErrorCode::BadRequest { "request must be a JSON object" } else { "body is not valid JSON" };
        error_frame(out, code, msg, None);
        return Some(code);
    }
    let req: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let code = if e.is_data() { ErrorCode::BadRequest } else { ErrorCode::BadJson };
            error_frame(out, code, &e.to_string(), None);
            return Some(code);
        }
    };
    let id = req.id.0;
    let Some(method) = req.method else {
        error_frame(out, ErrorCode::BadRequest, "missing \"in\" (the method name)", id);
        return Some(ErrorCode::BadRequest);
    };
    let Some(params) = req.params.0 else {
        error_frame(out, ErrorCode::BadRequest, "missing \"params\"", id);
        return Some(ErrorCode::BadRequest);
    };
    match &*method {
        "ping" => {
            ok_frame(out, "pong", params.get().as_bytes(), id);
            None
        }
        "pi" => match serde_json::from_str::<u64>(params.get()) {
            Ok(n) if n <= limits.pi_max_terms => {
                let mut b = ryu::Buffer::new();
                ok_frame(out, "pi_r", b.format_finite(pi(n)).as_bytes(), id);
                None
            }
            Ok(n) => {
                let msg = format!("pi: n = {n} is over the limit of {} terms", limits.pi_max_terms);
                error_frame(out, ErrorCode::BadParams, &msg, id);
                Some(ErrorCode::BadParams)
            }
            Err(_) => {
                error_frame(out, ErrorCode::BadParams, "pi: params must be an integer n >= 0", id);
                Some(ErrorCode::BadParams)
            }
        },
        other => {
            let shown: String = other.chars().take(64).collect();
            error_frame(out, ErrorCode::UnknownMethod, &format!("unknown method \"{shown}\""), id);
            Some(ErrorCode::UnknownMethod)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const L: Limits = Limits { max_frame_bytes: 1 << 20, pi_max_terms: 10_000_000 };

    fn call(body: &str) -> Value {
        let mut out = Vec::new();
        handle(body.as_bytes(), &L, &mut out);
        let len = u32::from_le_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len + 4, out.len());
        serde_json::from_slice(&out[4..]).unwrap()
    }

    fn code(v: &Value) -> &str {
        assert_eq!(v["out"], "error", "{v}");
        v["result"]["code"].as_str().unwrap()
    }

    #[test]
    fn ping_echoes_params_and_id() {
        let v = call(r#"{"in":"ping","params":{"a":[1,2.5,"x"]},"id":7}"#);
        assert_eq!(v["out"], "pong");
        assert_eq!(v["result"], serde_json::json!({"a":[1,2.5,"x"]}));
        assert_eq!(v["id"], 7);
        let v = call(r#"{"in":"ping","params":null}"#);
        assert_eq!(v["out"], "pong");
        assert!(v["result"].is_null());
        assert!(v.get("id").is_none());
    }

    #[test]
    fn pi_is_bit_identical_and_shortest() {
        let mut out = Vec::new();
        handle(br#"{"in":"pi","params":0}"#, &L, &mut out);
        assert_eq!(&out[4..], br#"{"out":"pi_r","result":2.8284271247461903}"#);
        // Reference values from the original Python 2/3 loop.
        assert_eq!(pi(1000).to_bits(), 3.1412746456267633f64.to_bits());
        assert_eq!(call(r#"{"in":"pi","params":10}"#)["result"].as_f64().unwrap(), pi(10));
    }

    #[test]
    fn every_error_code() {
        assert_eq!(code(&call("{nope")), "bad_json");
        assert_eq!(code(&call("")), "bad_json");
        assert_eq!(code(&call("[1,2]")), "bad_request");
        assert_eq!(code(&call(r#"{"params":1}"#)), "bad_request");
        assert_eq!(code(&call(r#"{"in":5,"params":1}"#)), "bad_request");
        assert_eq!(code(&call(r#"{"in":"ping"}"#)), "bad_request");
        assert_eq!(code(&call(r#"{"in":"nope","params":1}"#)), "unknown_method");
        assert_eq!(code(&call(r#"{"in":"pi","params":-1}"#)), "bad_params");
        assert_eq!(code(&call(r#"{"in":"pi","params":1.5}"#)), "bad_params");
        assert_eq!(code(&call(r#"{"in":"pi","params":"3"}"#)), "bad_params");
        assert_eq!(code(&call(r#"{"in":"pi","params":10000001}"#)), "bad_params");
        let mut out = Vec::new();
        handle(b"{\"in\":\"ping\",\"params\":\"\xff\"}", &L, &mut out);
        let v: Value = serde_json::from_slice(&out[4..]).unwrap();
        assert_eq!(code(&v), "bad_json");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{{\"in\":\"ping\",\"params\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(&call(&deep)), "bad_json");
    }

    #[test]
    fn decoder() {
        assert_eq!(decode(&[1, 0], 10), Decoded::Need(4));
        assert_eq!(decode(&[3, 0, 0, 0, b'a'], 10), Decoded::Need(7));
        assert_eq!(decode(&[1, 0, 0, 0, b'a'], 10), Decoded::Frame(1));
        assert_eq!(decode(&[0xff; 4], 10), Decoded::TooLarge(0xffff_ffff));
        assert_eq!(decode(&[0, 0, 0, 0], 10), Decoded::Frame(0));
    }
}
