//! A handler process's life: started, warmed up, ready; recycled (make
//! before break); crashed, killed or broken, and replaced (with the
//! crash-loop backoff); drained, sent EOF and retired through the kill
//! ladder of [`crate::pool`].

use super::{h_changed, process, Child, Handlers, Inner, PState, Pool, Proc, Target, RSS_EVERY};
use crate::protocol::{self, ErrorCode};
use nix::sys::signal::Signal;
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Pool {
    /// Draining: takes no new calls; EOF once it holds none.
    pub(super) fn drain_proc(&mut self, pid: i32) {
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
    pub(super) fn close_proc(&mut self, pid: i32) {
        let grace = self.cfg.kill_grace();
        let Some(c) = self.procs.get_mut(&pid) else { return };
        c.state = PState::Closing;
        c.io.shut();
        c.child.retire(None, &[(grace, Signal::SIGTERM), (grace * 2, Signal::SIGKILL)]);
    }

    /// SIGTERM to its process group now, SIGKILL after the kill grace.
    pub(super) fn kill_proc(&mut self, pid: i32) {
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
}

impl Inner {
    /// Every slot is ready, or waiting out a backoff after a failure.
    pub(super) fn all_settled(&self) -> bool {
        self.pools.iter().all(|p| {
            p.slots.iter().all(|s| match s.current {
                Some(pid) => p.procs.get(&pid).is_some_and(|c| c.state == PState::Ready),
                None => s.respawn_at.is_some(),
            })
        })
    }

    pub(super) fn all_ready(&self) -> bool {
        self.pools.iter().all(|p| p.slots.iter().all(|s| s.current.is_some_and(|pid| p.procs.get(&pid).is_some_and(|c| c.state == PState::Ready))))
    }

    /// Starts the process of slot `s` of pool `p`.
    pub(super) fn start_slot(&mut self, h: &Handlers, p: usize, s: usize) {
        if self.strict && self.startup_error.is_some() {
            return; // the worker is failing its start: it starts nothing more
        }
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
    pub(super) fn became_ready(&mut self, h: &Handlers, p: usize, pid: i32) {
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

    pub(super) fn note_start_failure(&mut self, h: &Handlers, p: usize, msg: &str) {
        if self.strict && self.startup_error.is_none() {
            self.startup_error = Some(format!("handler {}: {msg}", self.pools[p].name));
        }
        h.startup.notify_waiters();
    }

    pub(super) fn warmup_failed(&mut self, h: &Handlers, p: usize, pid: i32, msg: &str) {
        log::error!("handler {}[{pid}]: {msg}", self.pools[p].name);
        crate::metrics::handler_restart(p, crate::metrics::HandlerRestart::WarmupFailed);
        self.note_start_failure(h, p, msg);
        self.pools[p].last_error = Some(msg.to_string());
        self.pools[p].kill_proc(pid);
        self.slot_gone(h, p, pid, true);
        h.wake.notify_one();
    }

    /// The process of a slot is gone for good (killed or exited): start its
    /// successor, at once or after the backoff.
    pub(super) fn slot_gone(&mut self, h: &Handlers, p: usize, pid: i32, crashed: bool) {
        let pool = &mut self.pools[p];
        let Some(slot) = pool.procs.get(&pid).map(|c| c.slot) else { return };
        let sl = &mut pool.slots[slot];
        if sl.current != Some(pid) {
            return;
        }
        sl.current = None;
        let delay = if crashed { sl.backoff.failed(true) } else { Duration::ZERO };
        sl.respawn_at = Some(Instant::now() + delay);
        // Starting up, a failure is the worker's: it exits, nothing restarts.
        if delay.is_zero() && !self.retiring && !(self.strict && self.startup_error.is_some()) {
            self.start_slot(h, p, slot);
        }
    }

    /// Process `pid` (slot `slot`) exited unexpectedly after `lived`.
    pub(super) fn slot_lost(&mut self, h: &Handlers, p: usize, slot: usize, pid: i32, lived: Duration, status: &str) {
        let pool = &mut self.pools[p];
        let sl = &mut pool.slots[slot];
        if sl.current != Some(pid) {
            return;
        }
        sl.current = None;
        if self.strict && self.startup_error.is_some() {
            log::error!("handler {}[{pid}] (slot {slot}) {status} after {:.1}s while the worker was starting", pool.name, lived.as_secs_f64());
            return;
        }
        let delay = sl.backoff.exited(lived);
        let restarts = sl.backoff.restarts;
        if !self.retiring {
            crate::metrics::handler_restart(p, crate::metrics::HandlerRestart::Exited);
        }
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
    pub(super) fn crashed(&mut self, h: &Handlers, p: usize, pid: i32, what: &str) {
        log::error!("handler {}[{pid}] {what}: killing it", self.pools[p].name);
        crate::metrics::handler_restart(p, crate::metrics::HandlerRestart::HungUp);
        if self.pools[p].procs.get(&pid).is_some_and(|c| c.state == PState::Warming) {
            self.note_start_failure(h, p, what);
        }
        self.pools[p].kill_proc(pid);
        self.slot_gone(h, p, pid, true);
        self.flush_if_unusable(p);
    }

    /// The process broke the protocol: its calls get `handler_failed`; it
    /// is killed and replaced (with backoff). Returns false (stop reading).
    pub(super) fn protocol_error(&mut self, h: &Handlers, p: usize, pid: i32, what: &str) -> bool {
        let pool = &mut self.pools[p];
        log::error!("handler {}[{pid}] {what}: protocol error, killing it", pool.name);
        crate::metrics::handler_restart(p, crate::metrics::HandlerRestart::ProtocolError);
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

    /// Starts the replacement of `pid` if it has served `max_requests` or
    /// its RSS is over `max_rss_mb` (looked at every [`RSS_EVERY`] at most).
    pub(super) fn check_recycle(&mut self, h: &Handlers, p: usize, pid: i32, now: Instant) {
        let pool = &mut self.pools[p];
        let Some(c) = pool.procs.get_mut(&pid) else { return };
        let mut recycle = None;
        if c.state == PState::Ready && pool.slots[c.slot].current == Some(pid) && pool.slots[c.slot].outgoing.is_none() {
            if c.limit.is_some_and(|l| c.served >= l) {
                recycle = Some((format!("served {} calls (max_requests)", c.served), crate::metrics::HandlerRestart::MaxRequests));
            } else if pool.cfg.max_rss_mb > 0 && now.duration_since(c.rss_checked) >= RSS_EVERY {
                c.rss_checked = now;
                if let Some(rss) = process::rss_bytes(pid) {
                    if rss > pool.cfg.max_rss_mb * 1024 * 1024 {
                        recycle = Some((format!("RSS {} MiB is over max_rss_mb = {}", rss / (1024 * 1024), pool.cfg.max_rss_mb), crate::metrics::HandlerRestart::MaxRss));
                    }
                }
            }
        }
        if let Some((why, reason)) = recycle {
            let slot = c.slot;
            log::info!("handler {}[{pid}] {why}: starting its replacement", pool.name);
            crate::metrics::handler_restart(p, reason);
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

    /// A process killed for a missed deadline: its slot starts a fresh one
    /// at once (no backoff: it did not crash).
    pub(super) fn slot_gone_killed(&mut self, p: usize, pid: i32) {
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
}
