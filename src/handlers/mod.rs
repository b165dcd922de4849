//! Handler processes (SPEC §7): each worker's pools of long-running
//! programs, in any language, that serve the methods routed to them.
//!
//! A worker owns its handler processes: `[handlers.NAME] processes` of each
//! pool, started by [`process::spawn`] from the worker's runtime thread. A
//! call to a handler method goes to a free process of its pool (at most
//! `max_inflight` at a time on each), or waits in its method's queue (at
//! most `queue`; then `overloaded`), and is answered `timeout` when
//! `timeout_ms` from receipt passes. Pipelined calls of one connection may
//! run on different processes at once; [`crate::replies`] keeps their
//! replies in order.
//!
//! Failures, and what the client gets:
//! - the process dies, closes its channel or sends an invalid frame (bad
//!   JSON, over `max_frame_bytes`, an id it does not hold) while it holds a
//!   call: `handler_failed`; the process is killed if need be and started
//!   again with the crash-loop backoff ([`crate::pool::Backoff`]);
//! - a call's deadline passes: `timeout` at once; a process holding it gets
//!   SIGTERM to its process group, SIGKILL after `kill_grace_ms`, and is
//!   never reused (a replacement starts at once);
//! - no process can take calls (they cannot be started, or are in backoff):
//!   `unavailable`.
//!
//! A process is recycled after `max_requests` (+ jitter) calls or above
//! `max_rss_mb`: its replacement starts first and takes over once ready
//! (warmup included); the old one finishes what it holds, gets EOF, and goes
//! through the kill ladder. Retiring a process is the kill-and-reap sequence
//! of [`crate::pool`]: EOF, SIGTERM to the group after `kill_grace_ms`,
//! SIGKILL after as long again; the worker reaps with [`crate::pool::reap`].

pub mod process;

use crate::config::{Config, HandlerConfig};
use crate::pool::{Backoff, Child, Reaped, Target};
use crate::protocol::{self, Decoded, ErrorCode};
use crate::replies::ReplyTo;
use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

/// Hashes the worker's own call ids (sequential u64s, never chosen by a
/// client) with one multiplication: SipHash would cost more than the rest of
/// a call's bookkeeping.
#[derive(Default)]
struct IdHasher(u64);

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

type Calls = HashMap<u64, Call, BuildHasherDefault<IdHasher>>;

/// After a channel's EOF, how long to wait for the process's exit status
/// before answering its calls without it.
const LOST_GRACE: Duration = Duration::from_millis(200);
/// Check a busy process's RSS at most this often ...
const RSS_EVERY: Duration = Duration::from_millis(250);
/// ... and an idle one's this often.
const RSS_IDLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    /// Started; its warmup (if any) is in flight.
    Warming,
    /// Takes calls.
    Ready,
    /// Takes no new calls; gets EOF once it holds none.
    Draining,
    /// EOF sent; the kill ladder runs until it is reaped.
    Closing,
    /// Killed (deadline missed, protocol broken, channel lost); reaped soon.
    Killed,
}

struct Proc {
    child: Child,
    slot: usize,
    state: PState,
    io: Rc<process::Io>,
    /// Calls it holds, by id.
    inflight: Vec<u64>,
    served: u64,
    /// Recycle after this many calls.
    limit: Option<u64>,
    warmup: Option<(u64, Instant)>,
    rss_checked: Instant,
    /// Its channel ended at this time, before its exit was reaped.
    lost_at: Option<Instant>,
}

struct Slot {
    /// The process this slot runs (the newest, when one replaces another).
    current: Option<i32>,
    /// A process waiting to be retired once `current` is ready (recycling:
    /// make before break).
    outgoing: Option<i32>,
    backoff: Backoff,
    respawn_at: Option<Instant>,
}

/// A method routed to this pool.
struct Route {
    /// The method's name as a JSON string, for the request frames.
    name_json: Vec<u8>,
    timeout: Duration,
    queue_cap: usize,
    queued: usize,
    /// (deadline, call id), in arrival order, so in deadline order.
    deadlines: VecDeque<(Instant, u64)>,
}

struct Call {
    route: usize,
    deadline: Instant,
    reply: Option<ReplyTo>,
    /// Until it is sent.
    params: Option<Box<str>>,
    /// The process holding it.
    on: Option<i32>,
}

struct Pool {
    name: String,
    cfg: HandlerConfig,
    routes: Vec<Route>,
    slots: Vec<Slot>,
    procs: BTreeMap<i32, Proc>,
    queue: VecDeque<u64>,
    calls: Calls,
    /// Why processes could not be started lately (for `unavailable`).
    last_error: Option<String>,
}

/// Every handler pool of one worker.
pub struct Handlers {
    inner: RefCell<Inner>,
    /// Wakes the maintenance loop (something became due sooner).
    pub wake: Notify,
    /// When the maintenance loop will look next.
    scheduled: Cell<Option<Instant>>,
    /// The handler PIDs changed since they were last reported.
    changed: Cell<bool>,
    /// Wakes the worker to report the handler PIDs to the master.
    pub report: Notify,
    /// A handler process was reaped.
    pub exited: Notify,
    /// A warmup failed or a process could not start while `strict`.
    startup: Notify,
    me: RefCell<Weak<Handlers>>,
}

struct Inner {
    pools: Vec<Pool>,
    next_id: u64,
    max_frame: u32,
    warmup_timeout: Duration,
    /// Starting up: the first failure is the worker's failure.
    strict: bool,
    startup_error: Option<String>,
    /// Retiring everything: no more starts.
    retiring: bool,
    reaped: Vec<Value>,
}

/// A handler's answer frame.
#[derive(Deserialize, Debug)]
struct Answer<'a> {
    id: u64,
    #[serde(borrow)]
    out: &'a RawValue,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
}

/// The common answer, `{"id":N,"out":"TAG","result":R}` with R a simple
/// scalar and no whitespace, without serde_json; None for anything else
/// (which serde_json then reads, with the same result).
fn quick_answer(body: &[u8]) -> Option<Answer<'_>> {
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

impl Handlers {
    /// The pools of `cfg`, with no process started yet.
    pub fn new(cfg: &Config) -> Rc<Handlers> {
        let mut pools = Vec::new();
        for (name, h) in &cfg.handlers {
            let mut routes = Vec::new();
            let mut pool_methods = Vec::new();
            for (m, mc) in &cfg.methods {
                if mc.handler.as_deref() == Some(name.as_str()) {
                    let mut name_json = Vec::new();
                    protocol::write_json_str(&mut name_json, m);
                    routes.push(Route { name_json, timeout: mc.timeout(), queue_cap: mc.queue(), queued: 0, deadlines: VecDeque::new() });
                    pool_methods.push(m.clone());
                }
            }
            let slots = (0..h.processes).map(|_| Slot { current: None, outgoing: None, backoff: Backoff::default(), respawn_at: None }).collect();
            pools.push(Pool {
                name: name.clone(),
                cfg: h.clone(),
                routes,
                slots,
                procs: BTreeMap::new(),
                queue: VecDeque::new(),
                calls: Calls::default(),
                last_error: None,
            });
        }
        let h = Rc::new(Handlers {
            inner: RefCell::new(Inner {
                pools,
                next_id: 1,
                max_frame: cfg.server.max_frame_bytes,
                warmup_timeout: Duration::from_secs(cfg.server.ready_timeout_secs),
                strict: true,
                startup_error: None,
                retiring: false,
                reaped: Vec::new(),
            }),
            wake: Notify::new(),
            scheduled: Cell::new(None),
            changed: Cell::new(true),
            report: Notify::new(),
            exited: Notify::new(),
            startup: Notify::new(),
            me: RefCell::new(Weak::new()),
        });
        *h.me.borrow_mut() = Rc::downgrade(&h);
        h
    }

    /// The (pool, route) serving `method`, for the method table.
    pub fn route(&self, method: &str, cfg: &Config) -> Option<(usize, usize)> {
        let pool_name = cfg.methods.get(method)?.handler.as_deref()?;
        let inner = self.inner.borrow();
        let p = inner.pools.iter().position(|p| p.name == pool_name)?;
        // Routes were made in the config's method order, as here.
        let r = cfg.methods.iter().filter(|(_, m)| m.handler.as_deref() == Some(pool_name)).position(|(n, _)| n == method)?;
        Some((p, r))
    }

    pub fn is_empty(&self) -> bool {
        self.inner.borrow().pools.is_empty()
    }

    /// Starts every pool's processes and waits until all are ready (their
    /// warmup answered), or says why not. `strict`: the first failure ends
    /// the wait (a starting worker reports it and exits, so that a start
    /// or reload fails with the reason); otherwise pools keep retrying.
    pub async fn start(&self, deadline: Instant, strict: bool) -> Result<(), String> {
        {
            let mut inner = self.inner.borrow_mut();
            inner.strict = strict;
            let n = inner.pools.len();
            for p in 0..n {
                for s in 0..inner.pools[p].slots.len() {
                    inner.start_slot(self, p, s);
                }
            }
        }
        self.wake.notify_one();
        loop {
            let notified = self.startup.notified();
            {
                let mut inner = self.inner.borrow_mut();
                if let Some(e) = inner.startup_error.take() {
                    return Err(e);
                }
                if inner.all_ready() || (!strict && inner.all_settled()) {
                    inner.strict = false;
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                let inner = self.inner.borrow();
                let waiting: Vec<String> = inner
                    .pools
                    .iter()
                    .flat_map(|p| p.procs.values().filter(|c| c.state == PState::Warming).map(move |c| format!("{}[{}]", p.name, c.child.target.pid())))
                    .collect();
                return Err(format!("handler processes not ready in time: {}", waiting.join(", ")));
            }
        }
    }

    /// Takes one call for `route` of `pool`: sends it to a free process,
    /// queues it, or answers `overloaded`/`unavailable` at once.
    pub fn submit(&self, pool: usize, route: usize, params: &str, reply: ReplyTo) {
        let now = Instant::now();
        let mut inner = self.inner.borrow_mut();
        let id = inner.next_id;
        inner.next_id += 1;
        let p = &mut inner.pools[pool];
        if !p.usable() {
            let why = p.last_error.as_deref().unwrap_or("its processes are restarting");
            reply.error(ErrorCode::Unavailable, &format!("handler {} has no process to take the call: {why}", p.name));
            return;
        }
        let free = p.free_proc();
        let r = &mut p.routes[route];
        let deadline = now + r.timeout;
        if free.is_none() {
            if r.queued >= r.queue_cap {
                let msg = format!("handler {}: {} call(s) already waiting (queue = {}); try again or elsewhere", p.name, r.queued, r.queue_cap);
                reply.error(ErrorCode::Overloaded, &msg);
                return;
            }
            r.queued += 1;
            p.queue.push_back(id);
        }
        r.deadlines.push_back((deadline, id));
        // The params are copied only for a call that has to wait.
        let waiting = free.is_none().then(|| params.into());
        p.calls.insert(id, Call { route, deadline, reply: Some(reply), params: waiting, on: None });
        if let Some(pid) = free {
            p.send(id, pid, now, Some(params));
        }
        drop(inner);
        self.due_at(deadline);
    }

    /// Makes sure the maintenance loop looks at `at` at the latest.
    fn due_at(&self, at: Instant) {
        if self.scheduled.get().map_or(true, |s| at < s) {
            self.scheduled.set(Some(at));
            self.wake.notify_one();
        }
    }

    /// When [`Handlers::tick`] next has work.
    pub fn next_due(&self) -> Option<Instant> {
        let inner = self.inner.borrow();
        let due = inner.pools.iter().filter_map(|p| p.next_due()).min();
        self.scheduled.set(due);
        due
    }

    /// Does what is due: deadlines, kill ladders, restarts.
    pub fn tick(&self, now: Instant) {
        let mut inner = self.inner.borrow_mut();
        let retiring = inner.retiring;
        for p in 0..inner.pools.len() {
            inner.expire(p, now);
            let pool = &mut inner.pools[p];
            for c in pool.procs.values_mut() {
                for sig in c.child.enforce(now) {
                    log::warn!("handler {}[{}] is still running: {sig} to its process group", pool.name, c.child.target.pid());
                }
            }
            let lost: Vec<i32> = pool.procs.iter().filter(|(_, c)| c.lost_at.is_some_and(|t| now >= t + LOST_GRACE)).map(|(&pid, _)| pid).collect();
            for pid in lost {
                inner.pools[p].fail_proc(pid, ErrorCode::HandlerFailed, "closed its channel while it held the call");
                inner.crashed(self, p, pid, "closed its channel");
            }
            let warm_late: Vec<i32> = inner.pools[p]
                .procs
                .iter()
                .filter(|(_, c)| c.state == PState::Warming && c.warmup.is_some_and(|(_, d)| now >= d))
                .map(|(&pid, _)| pid)
                .collect();
            for pid in warm_late {
                let msg = format!("warmup did not answer within {}s", inner.warmup_timeout.as_secs());
                inner.warmup_failed(self, p, pid, &msg);
            }
            if inner.pools[p].cfg.max_rss_mb > 0 && !retiring {
                let idle: Vec<i32> = inner.pools[p]
                    .procs
                    .iter()
                    .filter(|(_, c)| c.state == PState::Ready && now.duration_since(c.rss_checked) >= RSS_IDLE_EVERY)
                    .map(|(&pid, _)| pid)
                    .collect();
                for pid in idle {
                    inner.check_recycle(self, p, pid, now);
                }
            }
            if !retiring {
                for s in 0..inner.pools[p].slots.len() {
                    let slot = &inner.pools[p].slots[s];
                    if slot.current.is_none() && slot.respawn_at.is_some_and(|t| t <= now) {
                        inner.start_slot(self, p, s);
                    }
                }
            }
        }
    }

    /// An exit reaped by the worker; true if it was one of ours.
    pub fn reaped(&self, r: &Reaped) -> bool {
        let mut inner = self.inner.borrow_mut();
        let Some(p) = inner.pools.iter().position(|p| p.procs.contains_key(&r.pid)) else { return false };
        let pool = &mut inner.pools[p];
        let c = pool.procs.get(&r.pid).expect("present");
        let expected = matches!(c.state, PState::Closing | PState::Killed);
        let lived = c.child.spawned.elapsed();
        let warming = c.state == PState::Warming;
        if expected {
            log::info!("handler {}[{}] {}", pool.name, r.pid, r.status);
        } else {
            let what = format!("{} while it held the call", r.status);
            pool.fail_proc(r.pid, ErrorCode::HandlerFailed, &what);
        }
        let name = pool.name.clone();
        let c = pool.procs.remove(&r.pid).expect("present");
        inner.reaped.push(json!({"pid": r.pid, "handler": name, "status": r.status}));
        h_changed(self);
        if !expected {
            if warming {
                let msg = format!("{} during warmup", r.status);
                inner.note_start_failure(self, p, &msg);
            }
            inner.slot_lost(self, p, c.slot, r.pid, lived, &r.status);
        }
        let pool = &mut inner.pools[p];
        if pool.slots[c.slot].outgoing == Some(r.pid) {
            pool.slots[c.slot].outgoing = None;
        }
        inner.flush_if_unusable(p);
        drop(inner);
        self.wake.notify_one();
        self.exited.notify_waiters();
        true
    }

    /// A process's channel ended (EOF or error).
    fn on_eof(&self, pool: usize, pid: i32) {
        let mut inner = self.inner.borrow_mut();
        let Some(c) = inner.pools[pool].procs.get_mut(&pid) else { return };
        if matches!(c.state, PState::Closing | PState::Killed) {
            return;
        }
        // Its exit status, which says why, usually follows at once.
        c.lost_at = Some(Instant::now());
        drop(inner);
        self.wake.notify_one();
    }

    /// A frame from a process. False once the process must no longer be read.
    fn on_frame(&self, pool: usize, pid: i32, body: &[u8]) -> bool {
        let mut inner = self.inner.borrow_mut();
        let p = &mut inner.pools[pool];
        let Some(c) = p.procs.get_mut(&pid) else { return false };
        if matches!(c.state, PState::Closing | PState::Killed) {
            return true; // no longer listened to
        }
        let ans: Answer = match quick_answer(body).map(Ok).unwrap_or_else(|| serde_json::from_slice::<Answer>(body)) {
            Ok(a) if a.out.get().starts_with('"') => a,
            Ok(_) => return inner.protocol_error(self, pool, pid, "sent a reply whose \"out\" is not a string"),
            Err(e) => {
                let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
                return inner.protocol_error(self, pool, pid, &format!("sent an invalid reply ({e}): {shown:?}"));
            }
        };
        let result = ans.result.map(RawValue::get).unwrap_or("null");
        if let Some((wid, _)) = c.warmup {
            if wid == ans.id {
                c.warmup = None;
                if ans.out.get() == "\"error\"" {
                    let msg = format!("warmup answered an error: {result}");
                    inner.warmup_failed(self, pool, pid, &msg);
                } else {
                    inner.became_ready(self, pool, pid);
                }
                return true;
            }
        }
        let Some(i) = c.inflight.iter().position(|&x| x == ans.id) else {
            return inner.protocol_error(self, pool, pid, &format!("answered id {}, which it does not hold", ans.id));
        };
        c.inflight.swap_remove(i);
        c.served += 1;
        if let Some(call) = p.calls.remove(&ans.id) {
            if let Some(reply) = call.reply {
                reply.send_raw(ans.out.get().as_bytes(), result.as_bytes());
            }
            p.trim(call.route);
        }
        inner.after_reply(self, pool, pid);
        true
    }

    /// Retires every process (the worker is stopping): no new starts;
    /// each gets EOF once it holds no call, then the kill ladder.
    pub fn retire_all(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.retiring = true;
        for p in 0..inner.pools.len() {
            let pids: Vec<i32> = inner.pools[p].procs.keys().copied().collect();
            for pid in pids {
                inner.pools[p].drain_proc(pid);
            }
        }
        drop(inner);
        self.wake.notify_one();
    }

    /// Answers every call still queued or in flight with `code` (the
    /// worker's graceful timeout passed).
    pub fn fail_outstanding(&self, code: ErrorCode, msg: &str) {
        let mut inner = self.inner.borrow_mut();
        for p in &mut inner.pools {
            for (_, call) in p.calls.drain() {
                if let Some(r) = call.reply {
                    r.error(code, msg);
                }
            }
            p.queue.clear();
            for r in &mut p.routes {
                r.queued = 0;
                r.deadlines.clear();
            }
            for c in p.procs.values_mut() {
                c.inflight.clear();
            }
        }
    }

    /// No handler process is left (all reaped).
    pub fn gone(&self) -> bool {
        self.inner.borrow().pools.iter().all(|p| p.procs.is_empty())
    }

    /// Handler PIDs by pool, for the master's status report.
    pub fn pids(&self) -> BTreeMap<String, Vec<i32>> {
        let inner = self.inner.borrow();
        inner.pools.iter().map(|p| (p.name.clone(), p.procs.keys().copied().collect())).collect()
    }

    /// Whether [`Handlers::pids`] changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.changed.replace(false)
    }

    /// The exits reaped so far, for the worker's last report.
    pub fn take_reaped(&self) -> Vec<Value> {
        std::mem::take(&mut self.inner.borrow_mut().reaped)
    }

    fn start_io(&self, pool: usize, name: &str, s: process::Spawned, io: Rc<process::Io>, max_frame: u32) {
        let pid = s.pid;
        let _ = s.chan.set_nonblocking(true);
        let chan = match tokio::net::UnixStream::from_std(s.chan) {
            Ok(c) => c,
            Err(e) => {
                log::error!("handler {name}[{pid}]: channel: {e}");
                return;
            }
        };
        let (rd, wr) = chan.into_split();
        tokio::task::spawn_local(process::writer(io, wr));
        tokio::task::spawn_local(reader(self.me.borrow().clone(), pool, pid, rd, max_frame));
        tokio::task::spawn_local(process::log_output(s.stdout, name.to_string(), pid, false));
        tokio::task::spawn_local(process::log_output(s.stderr, name.to_string(), pid, true));
    }
}

/// The set of handler PIDs changed: report it soon.
fn h_changed(h: &Handlers) {
    h.changed.set(true);
    h.report.notify_one();
}

/// Reads a process's answers until its channel ends.
async fn reader(h: Weak<Handlers>, pool: usize, pid: i32, mut rd: tokio::net::unix::OwnedReadHalf, max_frame: u32) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut at = 0usize;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some(h) = h.upgrade() else { return };
        loop {
            match protocol::decode(&buf[at..], max_frame) {
                Decoded::Frame(len) => {
                    let ok = h.on_frame(pool, pid, &buf[at + 4..at + 4 + len]);
                    at += 4 + len;
                    if !ok {
                        return;
                    }
                }
                Decoded::Need(total) => {
                    if total > buf.len() - at {
                        buf.reserve(total - (buf.len() - at));
                    }
                    break;
                }
                Decoded::TooLarge(n) => {
                    let mut inner = h.inner.borrow_mut();
                    inner.protocol_error(&h, pool, pid, &format!("sent a frame of {n} bytes, over max_frame_bytes ({max_frame})"));
                    return;
                }
            }
        }
        if at == buf.len() {
            buf.clear();
            at = 0;
            if buf.capacity() > 1 << 20 {
                buf = Vec::with_capacity(16 * 1024);
            }
        } else if at > 64 * 1024 {
            buf.drain(..at);
            at = 0;
        }
    }
    if let Some(h) = h.upgrade() {
        h.on_eof(pool, pid);
    }
}

impl Pool {
    /// Some process takes, or will soon take, calls.
    fn usable(&self) -> bool {
        self.procs.values().any(|c| matches!(c.state, PState::Ready | PState::Warming))
            || self.slots.iter().any(|s| s.current.is_none() && s.respawn_at.is_some_and(|t| t <= Instant::now()))
    }

    /// A ready process with room, the least busy.
    fn free_proc(&self) -> Option<i32> {
        let max = self.cfg.max_inflight as usize;
        self.procs
            .iter()
            .filter(|(_, c)| c.state == PState::Ready && c.inflight.len() < max)
            .min_by_key(|(_, c)| c.inflight.len())
            .map(|(&pid, _)| pid)
    }

    /// Sends call `id` to process `pid` (with `params`, or those it kept
    /// while it waited).
    fn send(&mut self, id: u64, pid: i32, now: Instant, params: Option<&str>) {
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
    fn feed(&mut self, pid: i32, now: Instant) {
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
    fn fail_proc(&mut self, pid: i32, code: ErrorCode, what: &str) {
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

    /// Draining: takes no new calls; EOF once it holds none.
    fn drain_proc(&mut self, pid: i32) {
        let Some(c) = self.procs.get_mut(&pid) else { return };
        match c.state {
            PState::Warming | PState::Ready => c.state = PState::Draining,
            PState::Draining => {}
            PState::Closing | PState::Killed => return,
        }
        if c.inflight.is_empty() {
            self.close_proc(pid);
        }
    }

    /// EOF on its channel, then the kill ladder to its process group.
    fn close_proc(&mut self, pid: i32) {
        let grace = self.cfg.kill_grace();
        let Some(c) = self.procs.get_mut(&pid) else { return };
        c.state = PState::Closing;
        c.io.shut();
        c.child.retire(None, &[(grace, Signal::SIGTERM), (grace * 2, Signal::SIGKILL)]);
    }

    /// SIGTERM to its process group now, SIGKILL after the kill grace.
    fn kill_proc(&mut self, pid: i32) {
        let grace = self.cfg.kill_grace();
        let Some(c) = self.procs.get_mut(&pid) else { return };
        if c.state == PState::Killed {
            return;
        }
        c.state = PState::Killed;
        c.lost_at = None;
        c.io.shut();
        c.child.retire(Some(Signal::SIGTERM), &[(grace, Signal::SIGKILL)]);
    }

    /// Drops answered calls off the front of a route's deadlines, so that
    /// the deque stays short (calls mostly end in the order they came).
    fn trim(&mut self, route: usize) {
        let r = &mut self.routes[route];
        while r.deadlines.front().is_some_and(|(_, id)| !self.calls.contains_key(id)) {
            r.deadlines.pop_front();
        }
    }

    fn next_due(&self) -> Option<Instant> {
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
    /// Every slot is ready, or waiting out a backoff after a failure.
    fn all_settled(&self) -> bool {
        self.pools.iter().all(|p| {
            p.slots.iter().all(|s| match s.current {
                Some(pid) => p.procs.get(&pid).is_some_and(|c| c.state == PState::Ready),
                None => s.respawn_at.is_some(),
            })
        })
    }

    fn all_ready(&self) -> bool {
        self.pools.iter().all(|p| p.slots.iter().all(|s| s.current.is_some_and(|pid| p.procs.get(&pid).is_some_and(|c| c.state == PState::Ready))))
    }

    /// Starts the process of slot `s` of pool `p`.
    fn start_slot(&mut self, h: &Handlers, p: usize, s: usize) {
        let warmup_timeout = self.warmup_timeout;
        let id = self.next_id;
        let pool = &mut self.pools[p];
        pool.slots[s].respawn_at = None;
        let spawned = match process::spawn(&pool.name, &pool.cfg, self.max_frame) {
            Ok(sp) => sp,
            Err(e) => {
                let msg = format!("cannot start {}: {e}", pool.cfg.exec[0]);
                let delay = pool.slots[s].backoff.failed(true);
                pool.slots[s].respawn_at = Some(Instant::now() + delay);
                log::error!("handler {}: {msg}; trying again in {:.1}s", pool.name, delay.as_secs_f64());
                pool.last_error = Some(msg.clone());
                self.note_start_failure(h, p, &msg);
                self.flush_if_unusable(p);
                return;
            }
        };
        let pid = spawned.pid;
        let pool = &mut self.pools[p];
        let io = Rc::new(process::Io::default());
        let limit = (pool.cfg.max_requests > 0).then(|| {
            let jitter = pool.cfg.max_requests_jitter;
            pool.cfg.max_requests + if jitter > 0 { rand::random::<u64>() % (jitter + 1) } else { 0 }
        });
        let now = Instant::now();
        let mut c = Proc {
            child: Child::new(Target::Group(pid)),
            slot: s,
            state: PState::Warming,
            io: io.clone(),
            inflight: Vec::new(),
            served: 0,
            limit,
            warmup: None,
            rss_checked: now,
            lost_at: None,
        };
        match &pool.cfg.warmup {
            Some(w) => {
                self.next_id += 1;
                let mut name_json = Vec::new();
                protocol::write_json_str(&mut name_json, &w.method);
                let params = serde_json::to_vec(&w.params).unwrap_or_else(|_| b"null".to_vec());
                io.send(|o| {
                    protocol::write_frame(o, |o| {
                        o.extend_from_slice(format!("{{\"id\":{id},\"in\":").as_bytes());
                        o.extend_from_slice(&name_json);
                        o.extend_from_slice(b",\"params\":");
                        o.extend_from_slice(&params);
                        o.extend_from_slice(format!(",\"deadline_ms\":{}}}", warmup_timeout.as_millis()).as_bytes());
                    })
                });
                c.warmup = Some((id, now + warmup_timeout));
            }
            None => c.state = PState::Ready,
        }
        let ready = c.state == PState::Ready;
        log::info!("handler {}[{pid}] started (slot {s}){}", pool.name, if ready { "" } else { ", warming up" });
        pool.procs.insert(pid, c);
        pool.slots[s].current = Some(pid);
        let name = pool.name.clone();
        h_changed(h);
        h.start_io(p, &name, spawned, io, self.max_frame);
        if ready {
            self.became_ready(h, p, pid);
        }
    }

    /// A process is ready: it takes calls (and replaces an outgoing one).
    fn became_ready(&mut self, h: &Handlers, p: usize, pid: i32) {
        let pool = &mut self.pools[p];
        let Some(c) = pool.procs.get_mut(&pid) else { return };
        if c.state == PState::Warming {
            c.state = PState::Ready;
        }
        let slot = c.slot;
        pool.last_error = None;
        if let Some(old) = pool.slots[slot].outgoing {
            log::info!("handler {}[{old}] replaced by {pid}: draining it", pool.name);
            pool.drain_proc(old);
        }
        if self.retiring {
            self.pools[p].drain_proc(pid);
        } else {
            self.pools[p].feed(pid, Instant::now());
        }
        h.startup.notify_waiters();
    }

    fn note_start_failure(&mut self, h: &Handlers, p: usize, msg: &str) {
        if self.strict && self.startup_error.is_none() {
            self.startup_error = Some(format!("handler {}: {msg}", self.pools[p].name));
        }
        h.startup.notify_waiters();
    }

    fn warmup_failed(&mut self, h: &Handlers, p: usize, pid: i32, msg: &str) {
        log::error!("handler {}[{pid}]: {msg}", self.pools[p].name);
        self.note_start_failure(h, p, msg);
        self.pools[p].last_error = Some(msg.to_string());
        self.pools[p].kill_proc(pid);
        self.slot_gone(h, p, pid, true);
        h.wake.notify_one();
    }

    /// The process of a slot is gone for good (killed or exited): start its
    /// successor, at once or after the backoff.
    fn slot_gone(&mut self, h: &Handlers, p: usize, pid: i32, crashed: bool) {
        let pool = &mut self.pools[p];
        let Some(slot) = pool.procs.get(&pid).map(|c| c.slot) else { return };
        let sl = &mut pool.slots[slot];
        if sl.current != Some(pid) {
            return;
        }
        sl.current = None;
        let delay = if crashed { sl.backoff.failed(true) } else { Duration::ZERO };
        sl.respawn_at = Some(Instant::now() + delay);
        if delay.is_zero() && !self.retiring {
            self.start_slot(h, p, slot);
        }
    }

    /// Process `pid` (slot `slot`) exited unexpectedly after `lived`.
    fn slot_lost(&mut self, h: &Handlers, p: usize, slot: usize, pid: i32, lived: Duration, status: &str) {
        let pool = &mut self.pools[p];
        let sl = &mut pool.slots[slot];
        if sl.current != Some(pid) {
            return;
        }
        sl.current = None;
        let delay = sl.backoff.exited(lived);
        let restarts = sl.backoff.restarts;
        log::warn!(
            "handler {}[{pid}] (slot {slot}) {status} after {:.1}s; starting it again in {:.1}s (restart {restarts})",
            pool.name,
            lived.as_secs_f64(),
            delay.as_secs_f64()
        );
        if self.retiring {
            return;
        }
        sl.respawn_at = Some(Instant::now() + delay);
        if delay.is_zero() {
            self.start_slot(h, p, slot);
        } else {
            pool.last_error = Some(format!("it {status} and is restarting (backoff {:.1}s)", delay.as_secs_f64()));
        }
    }

    /// `pid` closed its channel and no exit came: answer its calls and
    /// kill it.
    fn crashed(&mut self, h: &Handlers, p: usize, pid: i32, what: &str) {
        log::error!("handler {}[{pid}] {what}: killing it", self.pools[p].name);
        if self.pools[p].procs.get(&pid).is_some_and(|c| c.state == PState::Warming) {
            self.note_start_failure(h, p, what);
        }
        self.pools[p].kill_proc(pid);
        self.slot_gone(h, p, pid, true);
        self.flush_if_unusable(p);
    }

    /// The process broke the protocol: its calls get `handler_failed`; it
    /// is killed and replaced (with backoff). Returns false (stop reading).
    fn protocol_error(&mut self, h: &Handlers, p: usize, pid: i32, what: &str) -> bool {
        let pool = &mut self.pools[p];
        log::error!("handler {}[{pid}] {what}: protocol error, killing it", pool.name);
        pool.fail_proc(pid, ErrorCode::HandlerFailed, &format!("broke the protocol ({what})"));
        let warming = pool.procs.get(&pid).is_some_and(|c| c.state == PState::Warming);
        if warming {
            self.note_start_failure(h, p, what);
        }
        self.pools[p].last_error = Some(format!("a process {what}"));
        self.pools[p].kill_proc(pid);
        self.slot_gone(h, p, pid, true);
        self.flush_if_unusable(p);
        h.wake.notify_one();
        false
    }

    /// After `pid` answered a call: recycle if due, feed it, or close it.
    fn after_reply(&mut self, h: &Handlers, p: usize, pid: i32) {
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

    /// Starts the replacement of `pid` if it has served `max_requests` or
    /// its RSS is over `max_rss_mb` (looked at every [`RSS_EVERY`] at most).
    fn check_recycle(&mut self, h: &Handlers, p: usize, pid: i32, now: Instant) {
        let pool = &mut self.pools[p];
        let Some(c) = pool.procs.get_mut(&pid) else { return };
        let mut recycle = None;
        if c.state == PState::Ready && pool.slots[c.slot].current == Some(pid) && pool.slots[c.slot].outgoing.is_none() {
            if c.limit.is_some_and(|l| c.served >= l) {
                recycle = Some(format!("served {} calls (max_requests)", c.served));
            } else if pool.cfg.max_rss_mb > 0 && now.duration_since(c.rss_checked) >= RSS_EVERY {
                c.rss_checked = now;
                if let Some(rss) = process::rss_bytes(pid) {
                    if rss > pool.cfg.max_rss_mb * 1024 * 1024 {
                        recycle = Some(format!("RSS {} MiB is over max_rss_mb = {}", rss / (1024 * 1024), pool.cfg.max_rss_mb));
                    }
                }
            }
        }
        if let Some(why) = recycle {
            let slot = c.slot;
            log::info!("handler {}[{pid}] {why}: starting its replacement", pool.name);
            pool.slots[slot].outgoing = Some(pid);
            pool.slots[slot].current = None;
            self.start_slot(h, p, slot);
            let pool = &mut self.pools[p];
            if pool.slots[slot].current.is_none() {
                // The replacement could not start: keep this one serving.
                pool.slots[slot].outgoing = None;
                pool.slots[slot].current = Some(pid);
                pool.slots[slot].respawn_at = None;
                if let Some(c) = pool.procs.get_mut(&pid) {
                    c.limit = c.limit.map(|l| l + pool.cfg.max_requests.max(1));
                }
            }
        }
    }

    /// Calls whose deadline has passed get `timeout`; a process holding one
    /// is killed and replaced.
    fn expire(&mut self, p: usize, now: Instant) {
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
            self.slot_gone_killed(p, pid);
        }
    }

    /// A process killed for a missed deadline: its slot starts a fresh one
    /// at once (no backoff: it did not crash).
    fn slot_gone_killed(&mut self, p: usize, pid: i32) {
        let pool = &mut self.pools[p];
        let Some(slot) = pool.procs.get(&pid).map(|c| c.slot) else { return };
        if pool.slots[slot].current == Some(pid) {
            pool.slots[slot].current = None;
            pool.slots[slot].respawn_at = Some(Instant::now());
        }
        if pool.slots[slot].outgoing == Some(pid) {
            pool.slots[slot].outgoing = None;
        }
    }

    /// With no process that can take calls, what waits gets `unavailable`.
    fn flush_if_unusable(&mut self, p: usize) {
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
