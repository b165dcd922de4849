//! Stop: `STOPPING=1`; deregister from ZooKeeper (marked `draining`
//! first) and wait `deregister_delay_ms`; stop accepting; workers finish
//! what they have received (handler calls included), retire their handler
//! processes; SIGKILL after the grace; reap; exit 0. A second SIGTERM or
//! SIGINT stops waiting.
//!
//! A stop for a restart hands over instead ([`crate::handover`]): the node
//! stays registered, workers (SIGUSR2) finish what is in flight and pass
//! their idle connections to the master, which stores them with the state
//! that describes them; the listener and control socket stay in the store.

use super::{Master, Phase, Responder};
use crate::control::Reply;
use crate::handover;
use crate::notify;
use crate::registry::ZkState;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub(super) struct StopOp {
    pub(super) responders: Vec<Responder>,
    /// Waiting for ZooKeeper deregistration until then; None once draining.
    pub(super) deregister_until: Option<Instant>,
    pub(super) reaped: Vec<Value>,
    /// A restart: hand over instead of stopping.
    pub(super) restart: bool,
    /// Connections stored for the next instance: (store name, bytes read of
    /// their next frame).
    pub(super) handed: Vec<(String, Vec<u8>)>,
}

impl Master {
    pub(super) fn begin_stop(&mut self, responder: Option<Responder>, restart: bool) {
        if let Some(stop) = &mut self.stop {
            let by_signal = responder.is_none();
            stop.responders.extend(responder);
            if by_signal {
                // A second SIGTERM/SIGINT: stop waiting (for ZooKeeper or the drain).
                log::warn!("second stop signal: killing the remaining workers now");
                if stop.deregister_until.take().is_some() {
                    self.drain_all();
                }
                let pids: Vec<i32> = self.pool.workers.keys().copied().collect();
                for pid in pids {
                    self.pool.kill_now(pid, "fast stop");
                }
            }
            return;
        }
        self.phase = Phase::Stopping;
        notify::stopping();
        if restart {
            log::info!("stopping for a restart: keep the registration, finish what is in flight for up to {}s, hand the connections over, reap", self.cur.cfg.server.graceful_timeout_secs);
        } else {
            log::info!("stopping: deregister, stop accepting, drain for up to {}s, reap", self.cur.cfg.server.graceful_timeout_secs);
        }
        if let Some(op) = self.reload.take() {
            for r in op.responders {
                let _ = r.send(Reply { value: json!({"ok": false, "error": "rpcd is stopping"}), written: None });
            }
        }
        for r in self.queued_reload.take().unwrap_or_default() {
            let _ = r.send(Reply { value: json!({"ok": false, "error": "rpcd is stopping"}), written: None });
        }
        let deregister_until = match &self.zk {
            Some(zk) if restart => {
                zk.detach();
                None
            }
            Some(zk) => {
                zk.deregister();
                let z = &self.cur.cfg.zookeeper;
                Some(Instant::now() + Duration::from_millis(z.deregister_delay_ms + z.session_timeout_ms.min(5000)))
            }
            None => None,
        };
        self.stop = Some(StopOp { responders: responder.into_iter().collect(), deregister_until, reaped: Vec::new(), restart, handed: Vec::new() });
        if deregister_until.is_none() {
            self.drain_all();
        }
    }

    pub(super) fn drain_all(&mut self) {
        let grace = self.cur.cfg.worker_grace();
        let first = if self.stop.as_ref().is_some_and(|s| s.restart) {
            nix::sys::signal::Signal::SIGUSR2
        } else {
            nix::sys::signal::Signal::SIGTERM
        };
        self.pool.retire_with(first, grace, |_| true);
        // Stop accepting: close the master's copy of the listener too.
        self.cur.listener = None;
    }

    pub(super) fn advance_stop(&mut self) {
        let Some(stop) = &mut self.stop else { return };
        if let Some(until) = stop.deregister_until {
            if self.zk_status.state == ZkState::Deregistered || self.zk_status.state == ZkState::Disabled || Instant::now() >= until {
                if self.zk_status.state != ZkState::Deregistered {
                    log::warn!("zookeeper deregistration did not finish in time; draining anyway");
                }
                stop.deregister_until = None;
                self.drain_all();
            }
            return;
        }
        if self.pool.workers.is_empty() && self.exited.is_empty() {
            self.exit_code = Some(0);
        }
    }

    /// The memfd that tells the next instance which stored connections are
    /// ours and what their clients had sent of their next frame.
    fn store_handover_state(&self, handed: &[(String, Vec<u8>)]) {
        let conns: serde_json::Map<String, Value> = handed.iter().map(|(n, b)| (n.clone(), Value::from(handover::hex(b)))).collect();
        let text = json!({"pid": std::process::id(), "conns": conns}).to_string();
        match handover::memfd("rpcd-handover", &text) {
            Ok(fd) => {
                notify::remove_stored(handover::STATE_NAME);
                crate::sockets::store(handover::STATE_NAME, &fd);
                log::info!("handed {} connection(s) over to the next instance", handed.len());
            }
            Err(e) => log::error!("cannot store the handover state: {e}; the next instance closes the {} stored connection(s)", handed.len()),
        }
    }

    pub(super) async fn finish_stop(mut self) -> i32 {
        self.on_reap();
        for (r, w, _) in std::mem::take(&mut self.exited) {
            self.finish_worker(r, w);
        }
        let stop = self.stop.take().unwrap_or(StopOp { responders: vec![], deregister_until: None, reaped: vec![], restart: false, handed: vec![] });
        let pids: Vec<i64> = stop.reaped.iter().filter_map(|r| r["pid"].as_i64()).collect();
        log::info!("stopped: reaped worker(s) {pids:?}");
        let mut v = json!({"ok": true, "pid": std::process::id(), "reaped": stop.reaped});
        if stop.restart {
            v["handed_over"] = json!(stop.handed.len());
            self.store_handover_state(&stop.handed);
        }
        let mut acks = Vec::new();
        for r in stop.responders {
            let (tx, rx) = oneshot::channel();
            if r.send(Reply { value: v.clone(), written: Some(tx) }).is_ok() {
                acks.push(rx);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for a in acks {
                let _ = a.await;
            }
        })
        .await;
        if !stop.restart {
            let _ = std::fs::remove_file(&self.cur.cfg.control.socket);
        }
        // Give a busy service manager time to take what is queued (the
        // handed-over connections: up to 5 s), and to have processed it.
        let limit = if stop.restart { 1000 } else { 20 };
        for _ in 0..limit {
            notify::flush();
            if !notify::pending() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if stop.restart {
            notify::barrier(Duration::from_secs(2));
        }
        log::logger().flush();
        if let Some(why) = &self.start_failure {
            log::error!("{why}");
            return 1;
        }
        0
    }
}
