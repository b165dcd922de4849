//! Reload, like nginx: read and validate the new config first (on error,
//! keep running and say why); start the new generation of workers (and
//! their handler processes, warmed up); once every new worker accepts,
//! retire the old generation with the stop's drain; update ZooKeeper.
//! Reloads that arrive while one runs are coalesced into one more.

use super::{bind_listener, Gen, Master, Phase, Responder};
use crate::config::Config;
use crate::control::{self, Acl, Reply};
use crate::notify;
use crate::sockets::{self, Origin};
use crate::registry;
use serde_json::{json, Value};
use std::rc::Rc;
use std::time::{Duration, Instant};

pub(super) struct ReloadOp {
    pub(super) next: Option<Gen>,
    pub(super) deadline: Instant,
    pub(super) responders: Vec<Responder>,
    pub(super) warnings: Vec<String>,
    pub(super) old_pids: Vec<i32>,
    pub(super) reaped: Vec<Value>,
    pub(super) new_generation: u64,
    /// Set when the reload failed: `old_pids` are then the new workers
    /// being killed, and the reply (this error) waits until they are reaped.
    pub(super) failed: Option<String>,
}

impl Master {
    pub(super) fn request_reload(&mut self, responder: Option<Responder>) {
        if self.phase == Phase::Stopping {
            if let Some(r) = responder {
                let _ = r.send(Reply { value: json!({"ok": false, "error": "rpcd is stopping"}), written: None });
            }
            return;
        }
        if self.reload.is_some() {
            // Coalesce: one more reload after this one serves every request queued meanwhile.
            let q = self.queued_reload.get_or_insert_with(Vec::new);
            q.extend(responder);
            return;
        }
        let _ = self.start_reload(responder.into_iter().collect());
    }

    /// Starts a reload; Err(why) if it was refused at once.
    pub(super) fn start_reload(&mut self, responders: Vec<Responder>) -> Result<(), String> {
        let r = self.begin_reload(responders);
        if r.is_err() {
            self.counters.reloads_failed += 1;
        }
        r
    }

    fn begin_reload(&mut self, responders: Vec<Responder>) -> Result<(), String> {
        let fail = |responders: Vec<Responder>, msg: String| {
            log::error!("reload failed: {msg}; still serving the running configuration");
            for r in responders {
                let _ = r.send(Reply { value: json!({"ok": false, "error": msg}), written: None });
            }
            Err(msg)
        };
        let cfg = match Config::load_for(&self.config_path, &self.in_process).and_then(|mut c| c.load_secrets().map(|()| c)) {
            Ok(c) => c,
            Err(e) => return fail(responders, e.to_string()),
        };
        let mut warnings = Vec::new();
        let old = &self.cur.cfg;
        if cfg.control.socket != old.control.socket {
            warnings.push(format!(
                "control.socket cannot change at runtime: still {} (restart rpcd to move it)",
                old.control.socket.display()
            ));
        }
        if cfg.log.target != old.log.target || cfg.log.syslog_socket != old.log.syslog_socket {
            warnings.push("log.target and log.syslog_socket cannot change at runtime (restart rpcd to apply)".into());
        }
        if cfg.zookeeper.enabled != old.zookeeper.enabled {
            warnings.push("zookeeper.enabled cannot change at runtime (restart rpcd to apply)".into());
        }
        warnings.extend(cfg.warnings());
        if let Ok(soft) = crate::limits::soft() {
            warnings.extend(crate::limits::check(&cfg, soft));
        }
        // What cannot change keeps its running value, so that the new
        // generation, later reloads (and their warnings) and the stop's
        // cleanup all see what is really in use.
        let mut cfg = cfg;
        cfg.control.socket = old.control.socket.clone();
        cfg.log.target = old.log.target;
        cfg.log.syslog_socket = old.log.syslog_socket.clone();
        cfg.zookeeper.enabled = old.zookeeper.enabled;
        if cfg.zookeeper.enabled && cfg.secrets.zk_auth.is_none() && cfg.zookeeper.auth_file.is_some() {
            // The file says enabled = false, which waits for a restart: its
            // auth_file still applies to the running registration.
            if let Err(e) = cfg.load_secrets() {
                return fail(responders, e.to_string());
            }
        }
        if cfg.zookeeper.enabled && cfg.zookeeper.hosts.trim().is_empty() {
            cfg.zookeeper.hosts = old.zookeeper.hosts.clone();
        }
        let addr = cfg.listen_addr();
        let same = addr == self.cur.addr || cfg.server.listen == old.server.listen;
        let (listener, origin) = if let (true, Some(l)) = (same, self.cur.listener.clone()) {
            (l, self.cur.origin)
        } else {
            match bind_listener(addr, cfg.server.backlog) {
                Ok(l) => (Rc::new(l), Origin::Bound),
                Err(e) => return fail(responders, format!("cannot listen on {addr}: {e}")),
            }
        };
        let addr = listener.local_addr().unwrap_or(addr);
        if cfg.zookeeper.enabled {
            if let Err(e) = registry::advertised(&cfg, addr) {
                return fail(responders, e);
            }
        }
        for w in &warnings {
            log::warn!("reload: {w}");
        }
        notify::reloading();
        log::set_max_level(cfg.log.level.filter());
        let id = self.next_gen_id;
        self.next_gen_id += 1;
        log::info!("reload: starting generation {id} ({} worker(s) on {addr})", cfg.server.workers.resolve());
        let deadline = Instant::now() + Duration::from_secs(cfg.server.ready_timeout_secs);
        self.reload = Some(ReloadOp {
            next: Some(Gen::new(id, cfg, addr, listener, origin)),
            deadline,
            responders,
            warnings,
            old_pids: Vec::new(),
            reaped: Vec::new(),
            new_generation: id,
            failed: None,
        });
        Ok(())
    }

    pub(super) fn advance_reload(&mut self) {
        let Some(op) = &self.reload else { return };
        if let Some(next) = &op.next {
            if self.gen_ready(next) {
                // Commit: the new generation serves; retire the old one.
                let op = self.reload.as_mut().unwrap();
                let next = op.next.take().unwrap();
                let old = std::mem::replace(&mut self.cur, next);
                let new_id = self.cur.id;
                // Same listener: the old workers hand their idle connections
                // to the new ones (SIGUSR2); a new address: they drain.
                let mut first = nix::sys::signal::Signal::SIGUSR2;
                if let (Some(a), Some(b)) = (&old.listener, &self.cur.listener) {
                    if !Rc::ptr_eq(a, b) {
                        first = nix::sys::signal::Signal::SIGTERM;
                        // A new address: the store keeps this listener now.
                        notify::remove_stored(sockets::LISTEN_NAME);
                        sockets::store(sockets::LISTEN_NAME, &**b);
                    }
                }
                op.old_pids = self.pool.retire_with(first, old.cfg.worker_grace(), |w| w.generation != new_id);
                let _ = self.acl.send(Acl::from_config(&self.cur.cfg.control));
                if let Err(e) = control::apply_mode(&self.cur.cfg.control) {
                    op.warnings.push(e);
                }
                if let Some(zk) = &self.zk {
                    zk.reconfigure(&self.cur.cfg.zookeeper, self.cur.cfg.secrets.zk_auth.clone(), self.zk_payload());
                }
                self.apply_metrics_listen();
                log::info!("reload: generation {new_id} is accepting; retiring {:?}", self.reload.as_ref().unwrap().old_pids);
            } else if Instant::now() > op.deadline {
                let msg = format!("generation {} was not accepting within {}s", next.id, next.cfg.server.ready_timeout_secs);
                self.abort_reload(&msg);
            }
            return;
        }
        if self.pool.alive(&op.old_pids) || self.exited.iter().any(|(_, w, _)| op.old_pids.contains(&w.pid)) {
            return;
        }
        let op = self.reload.take().unwrap();
        if op.failed.is_some() {
            self.counters.reloads_failed += 1;
        } else {
            self.counters.reloads_ok += 1;
        }
        if let Some(msg) = op.failed {
            if self.upgrade.reloading {
                self.upgrade.reloading = false;
                self.upgrade.error = Some(format!("the new binary's workers did not start: {msg}"));
            }
            for r in op.responders {
                let _ = r.send(Reply { value: json!({"ok": false, "error": msg}), written: None });
            }
            notify::ready(&self.status_line());
            self.start_queued_reload();
            return;
        }
        if self.upgrade.reloading {
            self.upgrade.reloading = false;
            self.upgrade.error = None;
            log::info!("upgrade complete: {} {}", self.exe.display(), env!("CARGO_PKG_VERSION"));
        }
        let new_pids: Vec<i32> = self.pool.workers.values().filter(|w| w.generation == self.cur.id).map(|w| w.pid).collect();
        log::info!("reload complete: generation {}, workers {new_pids:?}, retired {:?}", self.cur.id, op.old_pids);
        let v = json!({
            "ok": true,
            "generation": op.new_generation,
            "old_pids": op.old_pids,
            "new_pids": new_pids,
            "reaped": op.reaped,
            "warnings": op.warnings,
        });
        for r in op.responders {
            let _ = r.send(Reply { value: v.clone(), written: None });
        }
        notify::ready(&self.status_line());
        self.start_queued_reload();
    }

    /// Gives up the reload under way: its new workers are killed, the old
    /// generation keeps serving, and once they are reaped the reply says
    /// why (so that what `rpcctl reload` returns to is the old state).
    pub(super) fn abort_reload(&mut self, why: &str) {
        let Some(op) = self.reload.take() else { return };
        let Some(next) = op.next else {
            self.reload = Some(op); // committed already (or failing): nothing to abort
            return;
        };
        let pids: Vec<i32> = self.pool.workers.values().filter(|w| w.generation == next.id).map(|w| w.pid).collect();
        for pid in &pids {
            self.pool.kill_now(*pid, "aborted reload");
        }
        let msg = format!("{why}; still serving generation {}", self.cur.id);
        log::error!("reload failed: {msg}");
        self.reload = Some(ReloadOp { next: None, old_pids: pids, failed: Some(msg), ..op });
        self.advance_reload();
    }

    pub(super) fn start_queued_reload(&mut self) {
        if let Some(q) = self.queued_reload.take() {
            let _ = self.start_reload(q);
        }
    }
}
