//! Calls to handler methods: to a free process, or into the method's
//! queue; deadlines; answers; the queue fed as processes free up.

use super::{protocol, Call, Handlers, Inner, PState, Pool, RawValue, LOST_GRACE, RSS_IDLE_EVERY};
use crate::protocol::ErrorCode;
use serde::Deserialize;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// Hashes the worker's own call ids (sequential u64s, never chosen by a
/// client) with one multiplication: SipHash would cost more than the rest of
/// a call's bookkeeping.
#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(super) type Calls = HashMap<u64, Call, BuildHasherDefault<IdHasher>>;

/// A handler's answer frame.
#[derive(Deserialize, Debug)]
pub(super) struct Answer<'a> {
    pub(super) id: u64,
    #[serde(borrow)]
    pub(super) out: &'a RawValue,
    #[serde(borrow, default)]
    pub(super) result: Option<&'a RawValue>,
}

/// The common answer, `{"id":N,"out":"TAG","result":R}` with R a simple
/// scalar and no whitespace, without serde_json; None for anything else
/// (which serde_json then reads, with the same result).
pub(super) fn quick_answer(body: &[u8]) -> Option<Answer<'_>> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.strip_prefix("{\"id\":")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 20 || (digits > 1 && rest.starts_with('0')) {
        return None;
    }
    let id: u64 = rest[..digits].parse().ok()?;
    let rest = rest[digits..].strip_prefix(",\"out\":")?;
    let out_len = protocol::simple_scalar_len(rest.as_bytes())?;
    if !rest.starts_with('"') {
        return None;
    }
    let (out, rest) = rest.split_at(out_len);
    let rest = rest.strip_prefix(",\"result\":")?;
    let result = rest.strip_suffix('}')?;
    if protocol::simple_scalar_len(result.as_bytes())? != result.len() {
        return None;
    }
    let out: &RawValue = serde_json::from_str(out).ok()?;
    let result: &RawValue = serde_json::from_str(result).ok()?;
    Some(Answer { id, out, result: Some(result) })
}

impl Pool {
    /// Some process takes, or will soon take, calls.
    pub(super) fn usable(&self) -> bool {
        self.procs.values().any(|c| matches!(c.state, PState::Ready | PState::Warming))
            || self.slots.iter().any(|s| s.current.is_none() && s.respawn_at.is_some_and(|t| t <= Instant::now()))
    }

    /// A ready process with room, the least busy.
    pub(super) fn free_proc(&self) -> Option<i32> {
        let max = self.cfg.max_inflight as usize;
        self.procs
            .iter()
            .filter(|(_, c)| c.state == PState::Ready && c.inflight.len() < max)
            .min_by_key(|(_, c)| c.inflight.len())
            .map(|(&pid, _)| pid)
    }

    /// Sends call `id` to process `pid` (with `params`, or those it kept
    /// while it waited).
    pub(super) fn send(&mut self, id: u64, pid: i32, now: Instant, params: Option<&str>) {
        let Some(call) = self.calls.get_mut(&id) else { return };
        let Some(c) = self.procs.get_mut(&pid) else { return };
        let kept = call.params.take();
        let params = params.or(kept.as_deref()).unwrap_or("null");
        let left = call.deadline.saturating_duration_since(now).as_millis().max(1);
        let route = &self.routes[call.route];
        c.io.send(|w| {
            protocol::write_frame(w, |o| {
                o.extend_from_slice(b"{\"id\":");
                o.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
                o.extend_from_slice(b",\"in\":");
                o.extend_from_slice(&route.name_json);
                o.extend_from_slice(b",\"params\":");
                o.extend_from_slice(params.as_bytes());
                o.extend_from_slice(b",\"deadline_ms\":");
                o.extend_from_slice(itoa::Buffer::new().format(left).as_bytes());
                o.push(b'}');
            })
        });
        c.inflight.push(id);
        call.on = Some(pid);
    }

    /// Sends queued calls to `pid` while it has room.
    pub(super) fn feed(&mut self, pid: i32, now: Instant) {
        let max = self.cfg.max_inflight as usize;
        while self.procs.get(&pid).is_some_and(|c| c.state == PState::Ready && c.inflight.len() < max) {
            let Some(id) = self.queue.pop_front() else { return };
            let Some(call) = self.calls.get(&id) else { continue }; // answered already (timeout)
            self.routes[call.route].queued -= 1;
            if call.reply.as_ref().is_some_and(|r| r.abandoned()) {
                // Its connection has gone: nobody waits for it; do not run it.
                self.calls.remove(&id);
                continue;
            }
            self.send(id, pid, now, None);
        }
    }

    /// Answers every call held by `pid` with `code` ("handler NAME[PID] WHAT").
    pub(super) fn fail_proc(&mut self, pid: i32, code: ErrorCode, what: &str) {
        let Some(c) = self.procs.get_mut(&pid) else { return };
        let held = std::mem::take(&mut c.inflight);
        c.lost_at = None;
        for id in held {
            if let Some(call) = self.calls.remove(&id) {
                if let Some(r) = call.reply {
                    r.error(code, &format!("handler {}[{pid}] {what}", self.name));
                }
            }
        }
    }

    /// Drops answered calls off the front of a route's deadlines, so that
    /// the deque stays short (calls mostly end in the order they came).
    pub(super) fn trim(&mut self, route: usize) {
        let r = &mut self.routes[route];
        while r.deadlines.front().is_some_and(|(_, id)| !self.calls.contains_key(id)) {
            r.deadlines.pop_front();
        }
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        let deadlines = self.routes.iter().filter_map(|r| r.deadlines.front().map(|&(d, _)| d));
        let ladders = self.procs.values().filter_map(|c| c.child.next_due());
        let lost = self.procs.values().filter_map(|c| c.lost_at.map(|t| t + LOST_GRACE));
        let warm = self.procs.values().filter_map(|c| c.warmup.map(|(_, d)| d));
        let starts = self.slots.iter().filter(|s| s.current.is_none()).filter_map(|s| s.respawn_at);
        let rss = self.procs.values().filter(|c| self.cfg.max_rss_mb > 0 && c.state == PState::Ready).map(|c| c.rss_checked + RSS_IDLE_EVERY);
        deadlines.chain(ladders).chain(lost).chain(warm).chain(starts).chain(rss).min()
    }
}

impl Inner {
    /// After `pid` answered a call: recycle if due, feed it, or close it.
    pub(super) fn after_reply(&mut self, h: &Handlers, p: usize, pid: i32) {
        let now = Instant::now();
        self.check_recycle(h, p, pid, now);
        let pool = &mut self.pools[p];
        match pool.procs.get(&pid).map(|c| (c.state, c.inflight.is_empty())) {
            Some((PState::Ready, _)) => pool.feed(pid, now),
            Some((PState::Draining, true)) => pool.close_proc(pid),
            _ => {}
        }
        // Whatever waits may fit on another process now.
        if !pool.queue.is_empty() {
            if let Some(other) = pool.free_proc() {
                pool.feed(other, now);
            }
        }
    }

    /// Calls whose deadline has passed get `timeout`; a process holding one
    /// is killed and replaced.
    pub(super) fn expire(&mut self, p: usize, now: Instant) {
        let mut to_kill = Vec::new();
        {
            let pool = &mut self.pools[p];
            for r in 0..pool.routes.len() {
                while let Some(&(d, id)) = pool.routes[r].deadlines.front() {
                    if d > now {
                        break;
                    }
                    pool.routes[r].deadlines.pop_front();
                    let Some(call) = pool.calls.remove(&id) else { continue };
                    let ms = pool.routes[r].timeout.as_millis();
                    match call.on {
                        None => {
                            pool.routes[r].queued -= 1;
                            pool.queue.retain(|&q| q != id);
                            if let Some(reply) = call.reply {
                                let msg = format!("no handler {} process was free within {ms} ms (timeout_ms); the call did not run", pool.name);
                                reply.error(ErrorCode::Timeout, &msg);
                            }
                        }
                        Some(pid) => {
                            if let Some(c) = pool.procs.get_mut(&pid) {
                                c.inflight.retain(|&x| x != id);
                            }
                            if let Some(reply) = call.reply {
                                reply.error(ErrorCode::Timeout, &format!("handler {}[{pid}] did not answer within {ms} ms (timeout_ms)", pool.name));
                            }
                            to_kill.push(pid);
                        }
                    }
                }
                pool.trim(r);
            }
        }
        for pid in to_kill {
            let pool = &mut self.pools[p];
            if pool.procs.get(&pid).is_some_and(|c| c.state == PState::Killed) {
                continue;
            }
            log::warn!("handler {}[{pid}] missed a deadline: SIGTERM to its process group, SIGKILL after {} ms; not reused", pool.name, pool.cfg.kill_grace_ms);
            pool.fail_proc(pid, ErrorCode::HandlerFailed, "was killed: another call it held passed its deadline");
            pool.kill_proc(pid);
            crate::metrics::handler_restart(p, crate::metrics::HandlerRestart::Timeout);
            self.slot_gone_killed(p, pid);
        }
    }

    /// With no process that can take calls, what waits gets `unavailable`.
    pub(super) fn flush_if_unusable(&mut self, p: usize) {
        let pool = &mut self.pools[p];
        if pool.usable() || pool.queue.is_empty() {
            return;
        }
        let why = pool.last_error.clone().unwrap_or_else(|| "its processes are restarting".into());
        for id in std::mem::take(&mut pool.queue) {
            if let Some(call) = pool.calls.remove(&id) {
                pool.routes[call.route].queued -= 1;
                if let Some(r) = call.reply {
                    r.error(ErrorCode::Unavailable, &format!("handler {} has no process to take the call: {why}", pool.name));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_answer_reads_what_serde_json_reads() {
        let cases = [
            r#"{"id":7,"out":"pong","result":null}"#,
            r#"{"id":0,"out":"x","result":-1.5e3}"#,
            r#"{"id":18446744073709551615,"out":"s","result":"text"}"#,
            r#"{"id":7,"out":"pong","result":{"a":1}}"#,
            r#"{"id":7,"out":"po\"ng","result":1}"#,
            r#"{"id":07,"out":"pong","result":1}"#,
            r#"{"id":7, "out":"pong","result":1}"#,
            r#"{"id":7,"out":5,"result":1}"#,
            r#"{"id":7,"out":"pong","result":1,"x":2}"#,
            r#"{"id":7,"out":"pong","result":tru}"#,
            r#"{"id":-1,"out":"pong","result":1}"#,
            r#"{"id":18446744073709551616,"out":"s","result":1}"#,
        ];
        let mut quick = 0;
        for c in cases {
            // (A null result is None to serde_json: both are answered as null.)
            let seen = |a: Answer| (a.id, a.out.get().to_string(), a.result.map_or("null".to_string(), |r| r.get().to_string()));
            let slow = serde_json::from_str::<Answer>(c).ok().map(seen);
            if let Some(a) = quick_answer(c.as_bytes()) {
                quick += 1;
                assert_eq!(Some(seen(a)), slow, "{c}");
            }
        }
        assert_eq!(quick, 3);
    }
}
