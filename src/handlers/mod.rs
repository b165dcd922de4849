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
//!
//! Files: this one has the types and the worker's API ([`Handlers`]);
//! `calls.rs` routes calls, queues, deadlines and answers; `lifecycle.rs`
//! starts, replaces, recycles and retires processes; [`process`] spawns one
//! and runs its I/O.

mod calls;
mod lifecycle;
pub mod process;

use calls::{quick_answer, Answer, Calls};

use crate::config::{Config, HandlerConfig};
use crate::pool::{Backoff, Child, Reaped, Target};
use crate::protocol::{self, Decoded, ErrorCode};
use crate::replies::ReplyTo;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;


/// After a channel's EOF, how long to wait for the process's exit status
/// before answering its calls without it.
const LOST_GRACE: Duration = Duration::from_millis(200);
/// The most handler exits a worker's last report lists.
const MAX_REAPED_REPORTED: usize = 1024;
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
        if inner.reaped.len() < MAX_REAPED_REPORTED {
            inner.reaped.push(json!({"pid": r.pid, "handler": name, "status": r.status}));
        }
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
        // What the last report lists: the processes retired now, not every
        // one this worker has replaced over its life.
        if !inner.retiring {
            inner.reaped.clear();
        }
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
