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
    /// A user-defined method's deadline passed (it may have run).
    Timeout,
    /// The handler process died, hung up or broke the protocol while it
    /// held the request (it may have run).
    HandlerFailed,
    /// No handler process could take the request (it did not run).
    Unavailable,
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
            ErrorCode::Timeout => "timeout",
            ErrorCode::HandlerFailed => "handler_failed",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// Whether a client may send the request to another server without
    /// asking: it provably did not run (SPEC §2).
    pub fn retryable(code: &str) -> bool {
        matches!(code, "overloaded" | "shutting_down" | "unavailable")
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

/// The method name, borrowed from the body unless it has escapes (a plain
/// `Cow<str>` field would always allocate).
struct Method<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Method<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cow<'de, str>;
            // As String's visitor says: error messages stay the same.
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_string(V).map(Method)
    }
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "in", borrow)]
    method: Option<Method<'a>>,
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

pub(crate) fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Appends an error response frame.
pub fn error_frame(out: &mut Vec<u8>, code: ErrorCode, message: &str, id: Option<&RawValue>) {
    error_frame_id(out, code, message, id.map(RawValue::get));
}

/// [`error_frame`] with the raw text of the id.
pub fn error_frame_id(out: &mut Vec<u8>, code: ErrorCode, message: &str, id: Option<&str>) {
    error_frame_code(out, code.as_str(), message, id)
}

/// An error frame with any code (a method's own), and the raw text of the id.
pub fn error_frame_code(out: &mut Vec<u8>, code: &str, message: &str, id: Option<&str>) {
    write_frame(out, |o| {
        o.extend_from_slice(b"{\"out\":\"error\",\"result\":{\"code\":");
        write_json_str(o, code);
        o.extend_from_slice(b",\"message\":");
        write_json_str(o, message);
        o.push(b'}');
        if let Some(id) = id {
            o.extend_from_slice(b",\"id\":");
            o.extend_from_slice(id.as_bytes());
        }
        o.push(b'}');
    });
}

pub(crate) fn ok_frame(out: &mut Vec<u8>, tag: &str, result: &[u8], id: Option<&str>) {
    write_frame(out, |o| {
        o.extend_from_slice(b"{\"out\":\"");
        o.extend_from_slice(tag.as_bytes());
        o.extend_from_slice(b"\",\"result\":");
        o.extend_from_slice(result);
        if let Some(id) = id {
            o.extend_from_slice(b",\"id\":");
            o.extend_from_slice(id.as_bytes());
        }
        o.push(b'}');
    });
}

/// Length of the JSON scalar at the front of `b` when it is one of the
/// simple kinds: `null`, `true`, `false`, a number, or a string without
/// escapes or control characters. None for anything else.
pub(crate) fn simple_scalar_len(b: &[u8]) -> Option<usize> {
    match *b.first()? {
        b'n' => b.starts_with(b"null").then_some(4),
        b't' => b.starts_with(b"true").then_some(4),
        b'f' => b.starts_with(b"false").then_some(5),
        b'"' => {
            let end = b[1..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
            (b[1 + end] == b'"').then_some(end + 2)
        }
        b'-' | b'0'..=b'9' => {
            let digits = |b: &[u8], mut i: usize| {
                while b.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                i
            };
            let mut i = usize::from(b[0] == b'-');
            match b.get(i)? {
                b'0' => i += 1,
                b'1'..=b'9' => i = digits(b, i + 1),
                _ => return None,
            }
            if b.get(i) == Some(&b'.') {
                let j = digits(b, i + 1);
                if j == i + 1 {
                    return None;
                }
                i = j;
            }
            if matches!(b.get(i), Some(b'e' | b'E')) {
                i += 1;
                if matches!(b.get(i), Some(b'+' | b'-')) {
                    i += 1;
                }
                let j = digits(b, i);
                if j == i {
                    return None;
                }
                i = j;
            }
            Some(i)
        }
        _ => None,
    }
}

/// The fast path's parser: a request of exactly the form
/// `{"in":"NAME","params":P}` or `{"in":"NAME","params":P,"id":I}`, without
/// whitespace, NAME without escapes or control characters, P and I simple
/// scalars. Returns (NAME, P, I) as slices of `text`; None sends the request
/// the general way (serde_json), which answers these exactly the same.
fn simple_request(text: &str) -> Option<(&str, &str, Option<&str>)> {
    const IN: &[u8] = b"{\"in\":\"";
    const PARAMS: &[u8] = b",\"params\":";
    const ID: &[u8] = b",\"id\":";
    let b = text.as_bytes();
    let m0 = IN.len();
    if !b.starts_with(IN) {
        return None;
    }
    let m1 = m0 + b[m0..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    if b[m1] != b'"' || !b[m1 + 1..].starts_with(PARAMS) {
        return None;
    }
    let p0 = m1 + 1 + PARAMS.len();
    let p1 = p0 + simple_scalar_len(&b[p0..])?;
    // Every boundary below sits next to an ASCII byte: valid str indices.
    if &b[p1..] == b"}" {
        return Some((&text[m0..m1], &text[p0..p1], None));
    }
    if !b[p1..].starts_with(ID) {
        return None;
    }
    let i0 = p1 + ID.len();
    let i1 = i0 + simple_scalar_len(&b[i0..])?;
    (&b[i1..] == b"}").then(|| (&text[m0..m1], &text[p0..p1], Some(&text[i0..i1])))
}

/// `pi`'s params as serde_json reads a u64: plain digits are taken here,
/// anything else is left to serde_json.
pub(crate) fn pi_terms(params: &str) -> Result<u64, ()> {
    let b = params.as_bytes();
    if !b.is_empty() && b.len() <= 19 && b.iter().all(u8::is_ascii_digit) && (b[0] != b'0' || b.len() == 1) {
        return Ok(b.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')));
    }
    serde_json::from_str::<u64>(params).map_err(|_| ())
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

/// A request body, parsed: a call to make, or an error to answer with.
#[derive(Debug, PartialEq)]
pub enum Parsed<'a> {
    Call { method: Cow<'a, str>, params: &'a str, id: Option<&'a str> },
    Invalid { code: ErrorCode, message: Cow<'static, str>, id: Option<&'a str> },
}

impl Parsed<'_> {
    fn invalid(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Parsed::Invalid { code, message: message.into(), id: None }
    }
}

/// Parses one request body: the borrow-only fast path for the common
/// shape, serde_json for everything else (both answer alike).
#[inline(always)]
pub fn parse(body: &[u8]) -> Parsed<'_> {
    let text = if body.is_ascii() {
        // SAFETY: ASCII is UTF-8 (and the check is much cheaper for short bodies).
        unsafe { std::str::from_utf8_unchecked(body) }
    } else {
        match std::str::from_utf8(body) {
            Ok(t) => t,
            Err(e) => return Parsed::invalid(ErrorCode::BadJson, format!("body is not UTF-8: {e}")),
        }
    };
    if let Some((method, params, id)) = simple_request(text) {
        return Parsed::Call { method: Cow::Borrowed(method), params, id };
    }
    parse_general(text)
}

/// Any request, through serde_json.
fn parse_general(text: &str) -> Parsed<'_> {
    if text.len() > MAX_DEPTH && too_deep(text.as_bytes()) {
        return Parsed::invalid(ErrorCode::BadJson, format!("JSON nested deeper than {MAX_DEPTH} levels"));
    }
    if !text.trim_start().starts_with('{') {
        // Arrays would otherwise deserialize positionally into the struct.
        return if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            Parsed::invalid(ErrorCode::BadRequest, "request must be a JSON object")
        } else {
            Parsed::invalid(ErrorCode::BadJson, "body is not valid JSON")
        };
    }
    let req: Request = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let code = if e.is_data() { ErrorCode::BadRequest } else { ErrorCode::BadJson };
            return Parsed::invalid(code, e.to_string());
        }
    };
    let id = req.id.0.map(RawValue::get);
    let Some(Method(method)) = req.method else {
        return Parsed::Invalid { code: ErrorCode::BadRequest, message: "missing \"in\" (the method name)".into(), id };
    };
    let Some(params) = req.params.0 else {
        return Parsed::Invalid { code: ErrorCode::BadRequest, message: "missing \"params\"".into(), id };
    };
    Parsed::Call { method, params: params.get(), id }
}

/// The `unknown_method` answer.
pub fn unknown_method(out: &mut Vec<u8>, method: &str, id: Option<&str>) {
    let shown: String = method.chars().take(64).collect();
    error_frame_id(out, ErrorCode::UnknownMethod, &format!("unknown method \"{shown}\""), id);
}

/// Handles one request body as a worker serving only the built-in methods
/// would, and appends exactly one response frame to `out`. Returns the
/// error code when the request failed. (Workers go through their method
/// table, [`crate::methods`]; this is for tools, tests and fuzzing.)
pub fn handle(body: &[u8], limits: &Limits, out: &mut Vec<u8>) -> Option<ErrorCode> {
    match parse(body) {
        Parsed::Invalid { code, message, id } => {
            error_frame_id(out, code, &message, id);
            Some(code)
        }
        Parsed::Call { method, params, id } => crate::methods::builtin::answer(&method, params, id, limits.pi_max_terms, out),
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
    fn fast_path_answers_exactly_like_the_general_path() {
        let scalars = [
            "null", "nul", "true", "tru", "false", "0", "-0", "01", "-", "1.", "1.5", "1.5e", "1e5", "1E+5", "1e-5",
            "-0.0e-0", "10000000", "10000001", "18446744073709551615", "18446744073709551616", "1e400", "\"\"",
            "\"x\"", "\"x\\\"y\"", "\"\u{7f}\"", "\"\u{e9}\"", "\"a\tb\"", "\"\\u0041\"", "[]", "{}", "\"", "1 ", ".5",
        ];
        let methods = ["ping", "pi", "p", "pin", "PI", "", "p\\u0069", "\u{e9}", "x\ty"];
        let tails = ["}", "} ", "}}", "", ",}"];
        let (mut fast, mut n) = (0, 0);
        for m in methods {
            for p in scalars {
                for (k, i) in std::iter::once(None).chain(scalars.iter().step_by(3).map(Some)).enumerate() {
                    let t = tails[(n + k) % tails.len()];
                    let body = match i {
                        None => format!("{{\"in\":\"{m}\",\"params\":{p}{t}"),
                        Some(i) => format!("{{\"in\":\"{m}\",\"params\":{p},\"id\":{i}{t}"),
                    };
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    let ca = handle(body.as_bytes(), &L, &mut a);
                    let cb = answer_general(&body, &mut b);
                    assert_eq!((ca, String::from_utf8_lossy(&a)), (cb, String::from_utf8_lossy(&b)), "{body}");
                    fast += usize::from(simple_request(&body).is_some());
                    n += 1;
                }
            }
        }
        assert!(fast > 100, "the fast path took only {fast} of {n}");
        assert_eq!(simple_request(r#"{"in":"ping","params":null,"id":7}"#), Some(("ping", "null", Some("7"))));
    }

    /// The general path alone, answered like [`handle`].
    fn answer_general(text: &str, out: &mut Vec<u8>) -> Option<ErrorCode> {
        match parse_general(text) {
            Parsed::Invalid { code, message, id } => {
                error_frame_id(out, code, &message, id);
                Some(code)
            }
            Parsed::Call { method, params, id } => crate::methods::builtin::answer(&method, params, id, L.pi_max_terms, out),
        }
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
