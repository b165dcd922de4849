//! The exposition (SPEC §8), in the OpenMetrics text format or in
//! Prometheus's text format 0.0.4, written by the `prometheus-client`
//! crate from one reading of the counts (a [`Collector`] per scrape).

use super::{Totals, BOUNDS_NS, CODES, HANDLER_REASONS, WORKER_REASONS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::collections::BTreeMap;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What the master knows at a scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub start_time: f64,
    pub totals: Totals,
    pub connections: u64,
    /// Workers by state (every state named, zeros included).
    pub workers: BTreeMap<&'static str, u64>,
    /// Worker replacements by reason (as [`WORKER_REASONS`]).
    pub worker_restarts: BTreeMap<&'static str, u64>,
    /// Live handler processes by pool (every pool of the current config).
    pub handler_processes: BTreeMap<String, u64>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub zk_registered: bool,
    pub zk_events: BTreeMap<&'static str, u64>,
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        let mut m = e.encode_descriptor("rpcd_build", "rpcd's version", None, MetricType::Info)?;
        m.encode_info(&version)?;
        gauge(&mut e, "rpcd_up", "1 while rpcd serves", None, 1)?;
        {
            let m = e.encode_descriptor("rpcd_start_time", "When the master started, in seconds since the Unix epoch", Some(&Unit::Seconds), MetricType::Gauge)?;
            ConstGauge::new(self.start_time).encode(m)?;
        }
        {
            let mut m = e.encode_descriptor("rpcd_requests", "Requests answered, by method and reply code", None, MetricType::Counter)?;
            for (name, t) in &self.totals.methods {
                for (i, code) in CODES.iter().enumerate() {
                    // `ok` is always there (a method's series exist from its start); errors once seen.
                    if i == 0 || t.codes[i] > 0 {
                        let labels = [("method", name.as_str()), ("code", code)];
                        ConstCounter::new(t.codes[i]).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "rpcd_request_duration",
                "Time from a request's arrival to its reply being written, by method",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (name, t) in &self.totals.methods {
                let mut cum = 0u64;
                let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(t.buckets.len());
                for (i, n) in t.buckets.iter().enumerate() {
                    cum += n;
                    buckets.push((BOUNDS_NS.get(i).map_or(f64::INFINITY, |&b| b as f64 / 1e9), *n));
                }
                let labels = [("method", name.as_str())];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(t.sum_ns as f64 / 1e9, cum, &buckets, None)?;
            }
        }
        gauge(&mut e, "rpcd_connections", "Open client connections, over all workers", None, self.connections)?;
        counter(&mut e, "rpcd_connections_accepted", "Client connections accepted", self.totals.accepted)?;
        family_gauge(&mut e, "rpcd_workers", "Worker processes by state", "state", self.workers.iter().map(|(k, v)| (*k, *v)))?;
        family_counter(&mut e, "rpcd_worker_restarts", "Workers replaced after an unexpected exit, by reason", "reason", self.worker_restarts.iter().map(|(k, v)| (*k, *v)))?;
        family_gauge(&mut e, "rpcd_handler_processes", "Live handler processes, by pool", "handler", self.handler_processes.iter().map(|(k, v)| (k.as_str(), *v)))?;
        {
            let mut m = e.encode_descriptor("rpcd_handler_restarts", "Handler processes replaced, by pool and reason", None, MetricType::Counter)?;
            let pools: std::collections::BTreeSet<&String> = self.totals.handlers.keys().chain(self.handler_processes.keys()).collect();
            for pool in pools {
                let r = self.totals.handlers.get(pool).copied().unwrap_or_default();
                for (i, reason) in HANDLER_REASONS.iter().enumerate() {
                    let labels = [("handler", pool.as_str()), ("reason", reason)];
                    ConstCounter::new(r[i]).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        family_counter(&mut e, "rpcd_reloads", "Reloads, by result", "result", [("ok", self.reloads_ok), ("failed", self.reloads_failed)].into_iter())?;
        gauge(&mut e, "rpcd_zookeeper_registered", "1 while rpcd's node is in ZooKeeper", None, u64::from(self.zk_registered))?;
        family_counter(&mut e, "rpcd_zookeeper_session_events", "ZooKeeper session events, by event", "event", self.zk_events.iter().map(|(k, v)| (*k, *v)))?;
        Ok(())
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: u64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v as i64);
    let m = e.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn family_gauge<'a>(e: &mut DescriptorEncoder, name: &str, help: &str, label: &str, it: impl Iterator<Item = (&'a str, u64)>) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (k, v) in it {
        ConstGauge::new(v as i64).encode(m.encode_family(&[(label, k)])?)?;
    }
    Ok(())
}

fn family_counter<'a>(e: &mut DescriptorEncoder, name: &str, help: &str, label: &str, it: impl Iterator<Item = (&'a str, u64)>) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (k, v) in it {
        ConstCounter::new(v).encode(m.encode_family(&[(label, k)])?)?;
    }
    Ok(())
}

/// The exposition of `s`: OpenMetrics when `openmetrics`, else text 0.0.4.
pub fn render(s: Snapshot, openmetrics: bool) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(s));
    let mut out = String::with_capacity(16 * 1024);
    let r = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &reg)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &reg)
    };
    if let Err(e) = r {
        log::error!("metrics: cannot encode: {e}");
    }
    out
}

/// Every worker state and restart reason, at zero (so that their series
/// exist before the first event).
pub fn zeroed(names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    names.iter().map(|n| (*n, 0)).collect()
}

pub fn worker_reasons() -> BTreeMap<&'static str, u64> {
    zeroed(&WORKER_REASONS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MethodTotals;

    #[test]
    fn the_series_of_spec_8() {
        let mut s = Snapshot { start_time: 1.5e9, connections: 3, zk_registered: true, ..Default::default() };
        let mut ping = MethodTotals::default();
        ping.codes[0] = 7;
        ping.buckets[0] = 5;
        ping.buckets[3] = 2;
        ping.sum_ns = 150_000;
        s.totals.methods.insert("ping".into(), ping);
        s.totals.accepted = 4;
        s.workers = zeroed(&["serving", "starting"]);
        s.worker_restarts = worker_reasons();
        s.handler_processes.insert("py".into(), 2);
        s.zk_events.insert("connected", 1);
        for om in [true, false] {
            let text = render(std::mem::take(&mut s_clone(&s)), om);
            for want in [
                "rpcd_build_info{version=\"",
                "rpcd_up 1",
                "rpcd_start_time_seconds 1500000000",
                "rpcd_requests_total{method=\"ping\",code=\"ok\"} 7",
                "rpcd_request_duration_seconds_bucket{le=\"0.00001\",method=\"ping\"} 5",
                "rpcd_request_duration_seconds_bucket{le=\"+Inf\",method=\"ping\"} 7",
                "rpcd_request_duration_seconds_count{method=\"ping\"} 7",
                "rpcd_connections 3",
                "rpcd_connections_accepted_total 4",
                "rpcd_workers{state=\"serving\"} 0",
                "rpcd_worker_restarts_total{reason=\"heartbeat\"} 0",
                "rpcd_handler_processes{handler=\"py\"} 2",
                "rpcd_handler_restarts_total{handler=\"py\",reason=\"timeout\"} 0",
                "rpcd_reloads_total{result=\"failed\"} 0",
                "rpcd_zookeeper_registered 1",
                "rpcd_zookeeper_session_events_total{event=\"connected\"} 1",
            ] {
                let want = if om { want.to_string() } else { want.replace("le=\"0.00001\",method=\"ping\"", "method=\"ping\",le=\"1e-05\"").replace("le=\"+Inf\",method=\"ping\"", "method=\"ping\",le=\"+Inf\"") };
                assert!(text.contains(&want), "{} lacks {want}:\n{text}", if om { "OpenMetrics" } else { "text" });
            }
            assert_eq!(text.ends_with("# EOF\n"), om);
        }
    }

    fn s_clone(s: &Snapshot) -> Snapshot {
        Snapshot {
            start_time: s.start_time,
            totals: s.totals.clone(),
            connections: s.connections,
            workers: s.workers.clone(),
            worker_restarts: s.worker_restarts.clone(),
            handler_processes: s.handler_processes.clone(),
            reloads_ok: s.reloads_ok,
            reloads_failed: s.reloads_failed,
            zk_registered: s.zk_registered,
            zk_events: s.zk_events.clone(),
        }
    }
}
