//! Methods: what a worker answers, from one table.
//!
//! Every method, whatever serves it, is an entry of the worker's table:
//!
//! - methods that answer at once in the worker (the built-ins `ping` and
//!   `pi`, and a library user's synchronous methods);
//! - asynchronous methods in the worker (a library user's), with a deadline;
//! - methods served by handler processes (`[methods.NAME] handler = ...`,
//!   see [`crate::handlers`]).
//!
//! # Building your own daemon
//!
//! A Rust user builds a binary on this crate and gets the whole daemon
//! (config, master, workers, ZooKeeper, control socket, systemd) with their
//! methods in-process. Workers run `/proc/self/exe --worker`, so the user's
//! binary serves its own methods:
//!
//! ```no_run
//! use rpcd::methods::{MethodError, Methods};
//!
//! fn main() {
//!     let mut m = Methods::new(); // ping and pi
//!     m.method("add", |(a, b): (i64, i64)| Ok::<_, MethodError>(a + b)).out("sum");
//!     m.async_method("sleep_ms", |ms: u64| async move {
//!         tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
//!         Ok::<_, MethodError>(ms)
//!     });
//!     rpcd::main(m)
//! }
//! ```
//!
//! Params are decoded with serde (a decoding error is `bad_params`), results
//! encoded with serde as the reply's `result`; `out` is `"ok"` unless the
//! registration says otherwise ([`Registration::out`]). A method returns
//! [`MethodError`] for an error reply. A panic in a method is answered with
//! `handler_failed` and does not take the worker down. Asynchronous methods
//! run on the worker's single thread (their futures need not be `Send`) and
//! get `timeout` after `[methods.NAME] timeout_ms` (default 5000).

pub mod builtin;

use crate::config::{Config, InProcess};
use crate::protocol;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

/// An error reply: `{"out": "error", "result": {"code": CODE, "message": MESSAGE}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodError {
    pub code: Cow<'static, str>,
    pub message: String,
}

impl MethodError {
    /// An error with any code; SPEC §2 lists the ones clients know.
    pub fn new(code: impl Into<Cow<'static, str>>, message: impl Into<String>) -> MethodError {
        MethodError { code: code.into(), message: message.into() }
    }

    /// `bad_params`: the request's params are not what the method takes.
    pub fn bad_params(message: impl Into<String>) -> MethodError {
        MethodError::new("bad_params", message)
    }

    fn failed(message: impl Into<String>) -> MethodError {
        MethodError::new(protocol::ErrorCode::HandlerFailed.as_str(), message)
    }
}

impl std::fmt::Display for MethodError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for MethodError {}

/// Appends a result's JSON text to `out` at once, given the params' JSON
/// text. (The error is boxed so that the common, successful call returns
/// in a register.)
pub(crate) type RawFn = Box<dyn Fn(&str, &mut Vec<u8>) -> Result<(), Box<MethodError>>>;
type RawFactory = Rc<dyn Fn(&Config) -> RawFn>;
/// Answers later: the params' JSON text in, the result's JSON text out.
pub(crate) type AsyncFn = Rc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, MethodError>>>>>;

enum Body {
    Now(RawFactory),
    Later(AsyncFn),
}

/// One registered method; set its reply's `out` with [`Registration::out`].
pub struct Registration {
    name: String,
    out: String,
    body: Body,
}

impl Registration {
    /// The reply's `out` (default `"ok"`), e.g. `"pong"` for `ping`.
    pub fn out(&mut self, tag: &str) -> &mut Registration {
        self.out = tag.to_string();
        self
    }
}

/// The methods a binary serves in-process. [`Methods::new`] has the
/// built-ins; register your own and pass it to [`crate::main`].
pub struct Methods {
    regs: Vec<Registration>,
}

impl Default for Methods {
    fn default() -> Self {
        Methods::new()
    }
}

impl Methods {
    /// The built-in methods, `ping` and `pi`.
    pub fn new() -> Methods {
        let mut m = Methods { regs: Vec::new() };
        builtin::register(&mut m);
        m
    }

    fn push(&mut self, name: &str, body: Body) -> &mut Registration {
        assert!(!name.is_empty(), "rpcd: a method name must not be empty");
        assert!(!self.regs.iter().any(|r| r.name == name), "rpcd: method {name:?} is registered twice");
        self.regs.push(Registration { name: name.to_string(), out: "ok".into(), body });
        self.regs.last_mut().unwrap()
    }

    /// A synchronous method: `f` takes the params, decoded as `P`, and
    /// returns the result or an error. It runs on the worker's thread, so it
    /// should be quick (use [`Methods::async_method`] or a handler process
    /// for slow work).
    pub fn method<P, R, F>(&mut self, name: &str, f: F) -> &mut Registration
    where
        P: DeserializeOwned,
        R: Serialize,
        F: Fn(P) -> Result<R, MethodError> + 'static,
    {
        let f = Rc::new(f);
        let label = name.to_string();
        self.raw_method_with_config(name, move |_| {
            let (f, label) = (f.clone(), label.clone());
            move |params: &str, out: &mut Vec<u8>| {
                let p: P = decode(&label, params)?;
                let r = catch_unwind(AssertUnwindSafe(|| f(p))).map_err(|e| panicked(&label, e))??;
                serde_json::to_writer(&mut *out, &r).map_err(|e| MethodError::failed(format!("{label}: cannot encode the result: {e}")))
            }
        })
    }

    /// An asynchronous method: `f` takes the params, decoded as `P`, and
    /// returns a future of the result. Runs on the worker's thread; its
    /// deadline is `[methods.NAME] timeout_ms` (then `timeout`, and the
    /// future is dropped).
    pub fn async_method<P, R, Fut, F>(&mut self, name: &str, f: F) -> &mut Registration
    where
        P: DeserializeOwned,
        R: Serialize,
        Fut: Future<Output = Result<R, MethodError>> + 'static,
        F: Fn(P) -> Fut + 'static,
    {
        let label = name.to_string();
        let f: AsyncFn = Rc::new(move |params: String| {
            let started = decode::<P>(&label, &params).map(&f);
            let label = label.clone();
            Box::pin(async move {
                let r = started?.await?;
                serde_json::to_vec(&r).map_err(|e| MethodError::failed(format!("{label}: cannot encode the result: {e}")))
            })
        });
        self.push(name, Body::Later(f))
    }

    /// A method on raw JSON text, for methods that need no decoding (the
    /// built-in `ping` echoes its params this way): `f` gets the params'
    /// JSON text and appends the result's JSON text to the buffer, which
    /// must be valid JSON.
    pub fn raw_method<F>(&mut self, name: &str, f: F) -> &mut Registration
    where
        F: Fn(&str, &mut Vec<u8>) -> Result<(), MethodError> + 'static,
    {
        let f = Rc::new(f);
        self.raw_method_with_config(name, move |_| {
            let f = f.clone();
            move |params: &str, out: &mut Vec<u8>| f(params, out)
        })
    }

    /// [`Methods::raw_method`] built from the running configuration (the
    /// built-in `pi` reads `[methods.pi] max_terms`); called again for
    /// every generation of workers.
    pub fn raw_method_with_config<M, F>(&mut self, name: &str, make: M) -> &mut Registration
    where
        M: Fn(&Config) -> F + 'static,
        F: Fn(&str, &mut Vec<u8>) -> Result<(), MethodError> + 'static,
    {
        let make: RawFactory = Rc::new(move |cfg: &Config| {
            let f = make(cfg);
            Box::new(move |params: &str, out: &mut Vec<u8>| f(params, out).map_err(Box::new)) as RawFn
        });
        self.push(name, Body::Now(make))
    }

    /// The names served in-process, for config validation.
    pub fn in_process(&self) -> InProcess {
        InProcess { methods: self.regs.iter().map(|r| (r.name.clone(), matches!(r.body, Body::Later(_)))).collect() }
    }

    /// The worker's table: these methods, then the config's handler routes
    /// (`route(method)` gives each one's pool and route index).
    pub(crate) fn table(&self, cfg: &Config, mut route: impl FnMut(&str) -> Option<(usize, usize)>) -> Table {
        let mut t = Table { names: Vec::new(), keys: Vec::new(), entries: Vec::new(), slots: vec![EMPTY; 16] };
        for r in &self.regs {
            let kind = match &r.body {
                Body::Now(make) => Kind::Now(make(cfg)),
                Body::Later(f) => {
                    let timeout = cfg.methods.get(&r.name).map(|m| m.timeout()).unwrap_or(Duration::from_millis(crate::config::DEFAULT_TIMEOUT_MS));
                    Kind::Later { f: f.clone(), timeout }
                }
            };
            t.add(&r.name, &r.out, kind);
        }
        let routed: BTreeMap<&String, _> = cfg.methods.iter().filter(|(_, m)| m.handler.is_some()).collect();
        for name in routed.keys() {
            if let Some((pool, route)) = route(name) {
                // The handler's reply carries its own `out`.
                t.add(name, "", Kind::Handler { pool, route });
            }
        }
        t
    }
}

fn decode<P: DeserializeOwned>(name: &str, params: &str) -> Result<P, MethodError> {
    serde_json::from_str(params).map_err(|e| MethodError::bad_params(format!("{name}: {e}")))
}

fn panicked(name: &str, e: Box<dyn std::any::Any + Send>) -> MethodError {
    let what = e.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| e.downcast_ref::<String>().cloned()).unwrap_or_default();
    log::error!("method {name} panicked: {what}");
    MethodError::failed(format!("method {name} panicked: {what}"))
}

/// How an entry is served.
pub(crate) enum Kind {
    Now(RawFn),
    Later { f: AsyncFn, timeout: Duration },
    /// By the handler pool `pool` (its method route `route`).
    Handler { pool: usize, route: usize },
}

pub(crate) struct Entry {
    /// `{"out":"TAG","result":`, ready to copy.
    pub prefix: Vec<u8>,
    /// The same, padded to [`PREFIX_COPY`] bytes when it fits (copied with
    /// one fixed-size move instead of a `memcpy` call).
    short_prefix: Option<[u8; PREFIX_COPY]>,
    pub kind: Kind,
    /// Where it is counted (`crate::metrics`): entry i is metric i + 1 (0 is `other`).
    pub metric: u16,
}

const PREFIX_COPY: usize = 32;

/// A name's length and a number that, for names of up to 8 bytes and that
/// length, is made of all their bytes (overlapping loads): two comparisons
/// find a short name. Longer names are then compared whole.
#[inline(always)]
fn name_key(b: &[u8]) -> (u64, usize) {
    let n = b.len();
    let k = match n {
        0 => 0,
        1..=3 => u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16,
        4..=7 => {
            let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let hi = u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]);
            u64::from(lo) | u64::from(hi) << 32
        }
        _ => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
    };
    (k, n)
}

/// Method name → entry by [`name_key`]: up to [`LINEAR`] methods by
/// comparing keys in registration order (the built-ins first: `ping` is one
/// comparison), more through a small open-addressed index, whose lookups
/// cost the same for the first method and the hundredth.
pub(crate) struct Table {
    names: Vec<Box<str>>,
    keys: Vec<(u64, usize)>,
    entries: Vec<Entry>,
    /// Entry numbers by hash slot; [`EMPTY`] where none. At most half full.
    slots: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;
const LINEAR: usize = 8;

#[inline(always)]
fn slot_of(key: (u64, usize), mask: usize) -> usize {
    ((key.0 ^ (key.1 as u64).rotate_left(56)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize & mask
}

impl Table {
    fn add(&mut self, name: &str, out: &str, kind: Kind) {
        let mut prefix = b"{\"out\":".to_vec();
        protocol::write_json_str(&mut prefix, out);
        prefix.extend_from_slice(b",\"result\":");
        let short_prefix = (prefix.len() <= PREFIX_COPY).then(|| {
            let mut p = [0u8; PREFIX_COPY];
            p[..prefix.len()].copy_from_slice(&prefix);
            p
        });
        self.names.push(name.into());
        self.keys.push(name_key(name.as_bytes()));
        let metric = (self.entries.len() + 1).try_into().unwrap_or(0);
        self.entries.push(Entry { prefix, short_prefix, kind, metric });
        if self.entries.len() * 2 > self.slots.len() {
            self.slots = vec![EMPTY; self.slots.len() * 2];
            for i in 0..self.entries.len() {
                self.place(i);
            }
        } else {
            self.place(self.entries.len() - 1);
        }
    }

    fn place(&mut self, i: usize) {
        let mask = self.slots.len() - 1;
        let mut at = slot_of(self.keys[i], mask);
        while self.slots[at] != EMPTY {
            at = (at + 1) & mask;
        }
        self.slots[at] = i as u32;
    }

    #[inline]
    pub fn get(&self, name: &str) -> Option<&Entry> {
        let b = name.as_bytes();
        let key = name_key(b);
        if self.keys.len() <= LINEAR {
            let i = if b.len() <= 8 {
                self.keys.iter().position(|&k| k == key)?
            } else {
                (0..self.keys.len()).find(|&i| self.keys[i] == key && &*self.names[i] == name)?
            };
            return Some(&self.entries[i]);
        }
        let mask = self.slots.len() - 1;
        let mut at = slot_of(key, mask);
        loop {
            let i = self.slots[at];
            if i == EMPTY {
                return None;
            }
            let i = i as usize;
            // Up to 8 bytes the key is the whole name; longer ones compare whole.
            if self.keys[i] == key && (b.len() <= 8 || &*self.names[i] == name) {
                return Some(&self.entries[i]);
            }
            at = (at + 1) & mask;
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// Only the first `n` methods are counted by name (the stats had room
    /// for no more): the rest count as `other`.
    pub fn count_first(&mut self, n: usize) {
        for (i, e) in self.entries.iter_mut().enumerate() {
            if i >= n {
                e.metric = 0;
            }
        }
    }
}

/// Answers a call to an entry that answers at once: one frame onto `out`.
/// Returns the reply's code index (`crate::metrics::CODES`).
#[inline]
pub(crate) fn answer_now(entry: &Entry, f: &RawFn, params: &str, id: Option<&str>, out: &mut Vec<u8>) -> u8 {
    let start = out.len();
    match &entry.short_prefix {
        Some(p) => {
            out.reserve(4 + PREFIX_COPY);
            // SAFETY: 4 + PREFIX_COPY bytes reserved; only the length header
            // and the prefix's real bytes are kept (set_len).
            unsafe {
                let dst = out.as_mut_ptr().add(start);
                std::ptr::write_bytes(dst, 0, 4);
                std::ptr::copy_nonoverlapping(p.as_ptr(), dst.add(4), PREFIX_COPY);
                out.set_len(start + 4 + entry.prefix.len());
            }
        }
        None => {
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&entry.prefix);
        }
    }
    match f(params, out) {
        Ok(()) => {
            if let Some(id) = id {
                out.extend_from_slice(b",\"id\":");
                out.extend_from_slice(id.as_bytes());
            }
            out.push(b'}');
            let len = (out.len() - start - 4) as u32;
            out[start..start + 4].copy_from_slice(&len.to_le_bytes());
            crate::metrics::OK
        }
        Err(e) => {
            out.truncate(start);
            protocol::error_frame_code(out, &e.code, &e.message, id);
            crate::metrics::code_index(&e.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(t: &Table, name: &str, params: &str, id: Option<&str>) -> serde_json::Value {
        let mut out = Vec::new();
        let e = t.get(name).expect("method");
        let Kind::Now(f) = &e.kind else { panic!("not synchronous") };
        answer_now(e, f, params, id, &mut out);
        assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()) as usize + 4, out.len());
        serde_json::from_slice(&out[4..]).unwrap()
    }

    #[test]
    fn builtins_answer_as_the_protocol_says() {
        let t = Methods::new().table(&Config::default(), |_| None);
        let mut a = Vec::new();
        answer_now(t.get("ping").unwrap(), match &t.get("ping").unwrap().kind { Kind::Now(f) => f, _ => unreachable!() }, "{\"x\":1}", Some("7"), &mut a);
        let mut b = Vec::new();
        protocol::handle(br#"{"in":"ping","params":{"x":1},"id":7}"#, &protocol::Limits { max_frame_bytes: 1 << 20, pi_max_terms: 10 }, &mut b);
        assert_eq!(a, b);
        assert_eq!(call(&t, "pi", "0", None)["result"].as_f64().unwrap().to_bits(), 2.8284271247461903f64.to_bits());
        assert_eq!(call(&t, "pi", "10000001", None)["result"]["code"], "bad_params");
        assert!(t.get("nope").is_none());
    }

    #[test]
    fn typed_methods_decode_encode_and_survive_panics() {
        let mut m = Methods::new();
        m.method("add", |(a, b): (i64, i64)| Ok::<_, MethodError>(a + b)).out("sum");
        m.method("boom", |_: serde_json::Value| -> Result<(), MethodError> { panic!("on purpose") });
        m.method("fail", |_: ()| -> Result<(), MethodError> { Err(MethodError::new("my_code", "no")) });
        let t = m.table(&Config::default(), |_| None);
        let v = call(&t, "add", "[2,3]", Some("\"x\""));
        assert_eq!(v, serde_json::json!({"out": "sum", "result": 5, "id": "x"}));
        assert_eq!(call(&t, "add", "\"nope\"", None)["result"]["code"], "bad_params");
        assert_eq!(call(&t, "boom", "null", None)["result"]["code"], "handler_failed");
        assert_eq!(call(&t, "fail", "null", None)["result"], serde_json::json!({"code": "my_code", "message": "no"}));
        assert_eq!(m.in_process().methods.get("add"), Some(&false));
    }

    #[test]
    fn names_are_found_exactly() {
        let mut m = Methods::new();
        for n in ["p", "pin", "pingpong", "pingpong2", "pingpon", "ping\u{0}"] {
            let v = n.to_string();
            m.method(n, move |_: ()| Ok::<_, MethodError>(v.clone()));
        }
        let t = m.table(&Config::default(), |_| None);
        for n in ["p", "pin", "pingpong", "pingpong2", "pingpon", "ping\u{0}"] {
            assert_eq!(call(&t, n, "null", None)["result"], n);
        }
        assert_eq!(call(&t, "ping", "1", None)["result"], 1);
        for n in ["", "pingpong3", "pingpongx", "pi\u{0}", "PING", "pingpon\u{0}"] {
            assert!(t.get(n).is_none(), "{n:?}");
        }
    }

    #[test]
    fn many_methods_are_all_found() {
        let mut m = Methods::new();
        for i in 0..300 {
            m.method(&format!("m{i}"), move |_: ()| Ok::<_, MethodError>(i));
            m.method(&format!("a_rather_long_method_name_{i}"), move |_: ()| Ok::<_, MethodError>(i + 1000));
        }
        let t = m.table(&Config::default(), |_| None);
        for i in 0..300 {
            assert_eq!(call(&t, &format!("m{i}"), "null", None)["result"], i);
            assert_eq!(call(&t, &format!("a_rather_long_method_name_{i}"), "null", None)["result"], i + 1000);
        }
        assert!(t.get("m300").is_none() && t.get("a_rather_long_method_name_300").is_none());
        assert_eq!(call(&t, "ping", "1", None)["result"], 1);
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_registered_twice_is_refused() {
        let mut m = Methods::new();
        m.method("ping", |_: ()| Ok::<_, MethodError>(()));
    }
}
