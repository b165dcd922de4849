//! What the master tells operators about the work done: `/metrics` (SPEC
//! §8) and the per-method part of `status`. The counting itself is in the
//! workers (`crate::metrics`); here it is added up with what only the master
//! knows (workers' states and restarts, reloads, ZooKeeper).

use super::Master;
use crate::metrics::expose::{self, Snapshot};
use crate::metrics::http::{self, Scrape};
use crate::metrics::Totals;
use crate::pool::WState;
use crate::registry::ZkState;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::sync::mpsc;

/// The master's own counters.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) worker_restarts: BTreeMap<&'static str, u64>,
    pub(super) reloads_ok: u64,
    pub(super) reloads_failed: u64,
    pub(super) zk_events: BTreeMap<&'static str, u64>,
}

/// The `/metrics` listener's task, and the channel its scrapes come in on.
pub(super) struct Endpoint {
    pub(super) running: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    pub(super) tx: mpsc::UnboundedSender<Scrape>,
}

impl Endpoint {
    pub(super) fn new() -> (Endpoint, mpsc::UnboundedReceiver<Scrape>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Endpoint { running: None, tx }, rx)
    }
}

impl Master {
    /// Serves `/metrics` where the current config says (after a reload
    /// that moved it, at the new address only; nowhere once it is unset).
    pub(super) fn apply_metrics_listen(&mut self) {
        let want = self.cur.cfg.metrics.addr();
        if self.metrics.running.as_ref().map(|(a, _)| *a) == want {
            return;
        }
        if let Some((addr, task)) = self.metrics.running.take() {
            log::info!("metrics: no longer serving on {addr}");
            task.abort();
        }
        if let Some(addr) = want {
            let task = tokio::spawn(http::run(addr, self.metrics.tx.clone()));
            self.metrics.running = Some((addr, task));
        }
    }

    pub(super) fn totals(&self) -> Totals {
        self.pool.stats.as_ref().map(|s| s.totals()).unwrap_or_default()
    }

    pub(super) fn on_scrape(&mut self, s: Scrape) {
        let _ = s.reply.send(expose::render(self.snapshot(), s.openmetrics));
    }

    fn snapshot(&self) -> Snapshot {
        let totals = self.totals();
        let mut workers = expose::zeroed(&["starting", "serving", "draining"]);
        let mut handler_processes: BTreeMap<String, u64> = self.cur.cfg.handlers.keys().map(|k| (k.clone(), 0)).collect();
        for w in self.pool.workers.values() {
            let state = match w.state {
                WState::Starting => "starting",
                WState::Serving => "serving",
                WState::Draining => "draining",
            };
            *workers.entry(state).or_default() += 1;
            for (pool, pids) in &w.handlers {
                *handler_processes.entry(pool.clone()).or_default() += pids.len() as u64;
            }
        }
        let mut worker_restarts = expose::worker_reasons();
        for (k, v) in &self.counters.worker_restarts {
            *worker_restarts.entry(k).or_default() += v;
        }
        Snapshot {
            start_time: self.started_unix as f64,
            connections: totals.open,
            totals,
            workers,
            worker_restarts,
            handler_processes,
            reloads_ok: self.counters.reloads_ok,
            reloads_failed: self.counters.reloads_failed,
            zk_registered: self.zk_status.state == ZkState::Registered,
            zk_events: self.counters.zk_events.clone(),
        }
    }

    /// Keeps a reading for `status`'s last minute (every few seconds).
    pub(super) fn sample_window(&mut self, now: Instant) {
        if self.window.due(now) {
            let t = self.totals();
            self.window.sample(now, &t);
        }
    }

    /// `status`'s `methods`: per method, over the last minute, the requests,
    /// the errors among them and their p50 and p99 latency, with the total
    /// since the start; and how long "the last minute" covers.
    pub(super) fn methods_json(&self) -> Value {
        let now = Instant::now();
        let totals = self.totals();
        let (recent, since) = self.window.last_minute(now, &totals);
        let ms = |s: Option<f64>| s.map(|s| (s * 1e6).round() / 1e3);
        let methods: serde_json::Map<String, Value> = recent
            .iter()
            .map(|(name, m)| {
                let all = &totals.methods[name];
                let codes: serde_json::Map<String, Value> = crate::metrics::CODES
                    .iter()
                    .zip(m.codes)
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| (c.to_string(), json!(n)))
                    .collect();
                (
                    name.clone(),
                    json!({
                        "requests": m.count(),
                        "errors": m.errors(),
                        "codes": codes,
                        "p50_ms": ms(m.quantile(0.5)),
                        "p99_ms": ms(m.quantile(0.99)),
                        "total_requests": all.count(),
                        "total_errors": all.errors(),
                    }),
                )
            })
            .collect();
        json!({"window_secs": (since.as_secs_f64() * 10.0).round() / 10.0, "by_method": methods})
    }
}
