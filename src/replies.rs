//! In-order replies for one connection (SPEC §2: requests on a connection
//! are answered in order) when some of them are answered later: by a handler
//! process, or by an asynchronous method.
//!
//! A connection that only ever calls methods answering at once never
//! allocates any of this. The first deferred call creates its [`Replies`]:
//! a queue of slots in request order. A deferred call reserves a slot and
//! gets a [`ReplyTo`]; replies that are ready at once, while any slot is
//! outstanding, take a slot of their own, already filled. The connection
//! writes the filled slots at the front of the queue, in order, as they
//! fill.

use crate::protocol::{self, ErrorCode};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::Waker;

/// What a reply is counted as once written (`crate::metrics`): its method's
/// metric index, its code's, and when its request arrived.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub metric: u16,
    pub code: u8,
    /// `crate::metrics::now_ns()` at its arrival.
    pub arrival: u64,
}

type Slot = (Option<Vec<u8>>, Meta);

/// The slots of one connection.
#[derive(Default)]
pub struct Replies {
    slots: RefCell<VecDeque<Slot>>,
    /// Sequence number of `slots[0]`.
    base: Cell<u64>,
    waker: RefCell<Option<Waker>>,
    /// The connection has gone: nobody will read what is still to come
    /// (queued work for it can be skipped).
    closed: Cell<bool>,
}

impl Replies {
    pub fn new() -> Rc<Replies> {
        Rc::new(Replies::default())
    }

    /// Slots not yet written (outstanding or filled).
    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.borrow().is_empty()
    }

    /// The connection's task, to wake when a slot fills.
    pub fn set_waker(&self, w: &Waker) {
        let mut cur = self.waker.borrow_mut();
        if !cur.as_ref().is_some_and(|c| c.will_wake(w)) {
            *cur = Some(w.clone());
        }
    }

    /// Reserves the next slot for a reply that comes later; `id` is the raw
    /// text of the client's id, put back on the reply.
    /// (`meta`: how the reply is counted; its code is set when it is sent.)
    pub fn reserve(self: &Rc<Self>, id: Option<&str>, meta: Meta) -> ReplyTo {
        let mut slots = self.slots.borrow_mut();
        let seq = self.base.get() + slots.len() as u64;
        slots.push_back((None, meta));
        ReplyTo { replies: self.clone(), seq, id: id.map(Box::from), done: false }
    }

    /// Queues a reply frame that is ready now, behind the outstanding ones.
    pub fn push_ready(&self, frame: Vec<u8>, meta: Meta) {
        self.slots.borrow_mut().push_back((Some(frame), meta));
    }

    /// Moves the filled slots at the front onto `out`, and their counting
    /// to `counted`. Returns how many.
    pub fn take_ready(&self, out: &mut Vec<u8>, mut counted: impl FnMut(Meta)) -> usize {
        let mut slots = self.slots.borrow_mut();
        let mut n = 0;
        while let Some((Some(_), _)) = slots.front() {
            let (frame, meta) = slots.pop_front().expect("front");
            out.extend_from_slice(&frame.unwrap_or_default());
            counted(meta);
            n += 1;
        }
        self.base.set(self.base.get() + n as u64);
        n
    }

    /// Whether the front slot is filled (the connection has something to write).
    pub fn front_ready(&self) -> bool {
        matches!(self.slots.borrow().front(), Some((Some(_), _)))
    }

    pub fn close(&self) {
        self.closed.set(true);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    fn fill(&self, seq: u64, frame: Vec<u8>, code: u8) {
        let Some(i) = seq.checked_sub(self.base.get()) else { return };
        let wake = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(i as usize) {
                Some((slot @ None, meta)) => {
                    *slot = Some(frame);
                    meta.code = code;
                }
                _ => return,
            }
            i == 0
        };
        if wake {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

/// The right, and the duty, to answer one deferred call. Dropped without an
/// answer (a method's future panicked or was dropped), it answers
/// `handler_failed`, so that a connection never waits forever.
pub struct ReplyTo {
    replies: Rc<Replies>,
    seq: u64,
    id: Option<Box<str>>,
    done: bool,
}

impl ReplyTo {
    /// Whether nobody will read the answer (the connection has gone).
    pub fn abandoned(&self) -> bool {
        self.replies.is_closed()
    }

    /// `{"out": OUT, "result": RESULT, "id"?: ...}` from raw JSON texts
    /// (`out_json` a JSON string, `result_json` any JSON value).
    pub fn send_raw(mut self, out_json: &[u8], result_json: &[u8]) {
        let mut frame = Vec::with_capacity(out_json.len() + result_json.len() + 40);
        protocol::write_frame(&mut frame, |o| {
            o.extend_from_slice(b"{\"out\":");
            o.extend_from_slice(out_json);
            o.extend_from_slice(b",\"result\":");
            o.extend_from_slice(result_json);
            if let Some(id) = &self.id {
                o.extend_from_slice(b",\"id\":");
                o.extend_from_slice(id.as_bytes());
            }
            o.push(b'}');
        });
        // A handler's own error reply counts under its code.
        let code = if out_json == b"\"error\"" { error_code_of(result_json) } else { crate::metrics::OK };
        self.finish(frame, code);
    }

    /// A reply whose head (`{"out":"TAG","result":`) is ready made.
    pub fn send_with_prefix(mut self, prefix: &[u8], result_json: &[u8]) {
        let mut frame = Vec::with_capacity(prefix.len() + result_json.len() + 24);
        protocol::write_frame(&mut frame, |o| {
            o.extend_from_slice(prefix);
            o.extend_from_slice(result_json);
            if let Some(id) = &self.id {
                o.extend_from_slice(b",\"id\":");
                o.extend_from_slice(id.as_bytes());
            }
            o.push(b'}');
        });
        self.finish(frame, crate::metrics::OK);
    }

    pub fn error(self, code: ErrorCode, message: &str) {
        self.error_code(code.as_str(), message)
    }

    pub fn error_code(mut self, code: &str, message: &str) {
        let mut frame = Vec::new();
        protocol::error_frame_code(&mut frame, code, message, self.id.as_deref());
        self.finish(frame, crate::metrics::code_index(code));
    }

    fn finish(&mut self, frame: Vec<u8>, code: u8) {
        self.done = true;
        self.replies.fill(self.seq, frame, code);
    }
}

/// The code index of an error reply's `result` (`{"code": ...}`).
fn error_code_of(result_json: &[u8]) -> u8 {
    #[derive(serde::Deserialize)]
    struct R<'a> {
        #[serde(borrow)]
        code: std::borrow::Cow<'a, str>,
    }
    match serde_json::from_slice::<R>(result_json) {
        Ok(r) => crate::metrics::code_index(&r.code),
        Err(_) => crate::metrics::OTHER_CODE,
    }
}

impl Drop for ReplyTo {
    fn drop(&mut self) {
        if !self.done {
            let mut frame = Vec::new();
            let msg = "the method ended without answering";
            protocol::error_frame_code(&mut frame, ErrorCode::HandlerFailed.as_str(), msg, self.id.as_deref());
            self.finish(frame, crate::metrics::error_index(ErrorCode::HandlerFailed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(metric: u16) -> Meta {
        Meta { metric, code: 0, arrival: 0 }
    }

    fn frames(mut b: &[u8]) -> Vec<String> {
        let mut v = Vec::new();
        while b.len() >= 4 {
            let n = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
            v.push(String::from_utf8(b[4..4 + n].to_vec()).unwrap());
            b = &b[4 + n..];
        }
        v
    }

    #[test]
    fn replies_go_out_in_request_order() {
        let r = Replies::new();
        let a = r.reserve(Some("1"), m(1));
        let mut now = Vec::new();
        protocol::ok_frame(&mut now, "pong", b"2", Some("2"));
        r.push_ready(now, m(2));
        let c = r.reserve(None, m(3));
        let mut out = Vec::new();
        let mut counted = Vec::new();
        assert_eq!(r.take_ready(&mut out, |m| counted.push((m.metric, m.code))), 0);
        c.send_raw(b"\"error\"", br#"{"code":"bad_params","message":"no"}"#);
        assert_eq!(r.take_ready(&mut out, |m| counted.push((m.metric, m.code))), 0, "the first is still outstanding");
        a.error(ErrorCode::Timeout, "late");
        assert_eq!(r.take_ready(&mut out, |m| counted.push((m.metric, m.code))), 3);
        // Counted as written, with their codes: timeout, ok, bad_params.
        assert_eq!(counted, vec![(1, 8), (2, 0), (3, 4)]);
        let f = frames(&out);
        assert!(f[0].contains("\"timeout\"") && f[0].ends_with(",\"id\":1}"), "{f:?}");
        assert_eq!(f[1], r#"{"out":"pong","result":2,"id":2}"#);
        assert_eq!(f[2], r#"{"out":"error","result":{"code":"bad_params","message":"no"}}"#);
        assert!(r.is_empty());
    }

    #[test]
    fn a_dropped_reply_answers_handler_failed() {
        let r = Replies::new();
        drop(r.reserve(Some("\"a\""), m(1)));
        let mut out = Vec::new();
        let mut code = 0;
        assert_eq!(r.take_ready(&mut out, |m| code = m.code), 1);
        assert_eq!(code, crate::metrics::error_index(ErrorCode::HandlerFailed));
        assert!(frames(&out)[0].contains("handler_failed"));
    }
}
