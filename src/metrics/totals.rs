//! Counts by name, added up over workers, and the last minute of them for
//! `rpcctl status`.

use super::{BOUNDS_NS, NBUCKETS, NCODES, NREASONS, OK};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// One method's counts: replies by code, the latency histogram (a count
/// per bucket, not cumulative) and the sum of the latencies.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MethodTotals {
    pub codes: [u64; NCODES],
    pub buckets: [u64; NBUCKETS],
    pub sum_ns: u64,
}

impl MethodTotals {
    pub fn add(&mut self, o: &MethodTotals) {
        for (a, b) in self.codes.iter_mut().zip(&o.codes) {
            *a += b;
        }
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
    }

    /// `self - o`, for counts that only grow (saturating, in case `o` is
    /// not an earlier reading of the same).
    pub fn since(&self, o: &MethodTotals) -> MethodTotals {
        let mut d = self.clone();
        for (a, b) in d.codes.iter_mut().zip(&o.codes) {
            *a = a.saturating_sub(*b);
        }
        for (a, b) in d.buckets.iter_mut().zip(&o.buckets) {
            *a = a.saturating_sub(*b);
        }
        d.sum_ns = d.sum_ns.saturating_sub(o.sum_ns);
        d
    }

    pub fn count(&self) -> u64 {
        self.codes.iter().sum()
    }

    pub fn errors(&self) -> u64 {
        self.count() - self.codes[OK as usize]
    }

    /// The `q` quantile in seconds, estimated from the buckets as
    /// Prometheus's `histogram_quantile` does: linear within the bucket
    /// (the last finite bound for the `+Inf` one). None without requests.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { BOUNDS_NS[i - 1] as f64 };
                let Some(&hi) = BOUNDS_NS.get(i) else { return Some(lo / 1e9) };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some((lo + (hi as f64 - lo) * within) / 1e9);
            }
            below += n;
        }
        Some(*BOUNDS_NS.last().unwrap() as f64 / 1e9)
    }
}

/// Everything counted, by method and handler pool name.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub methods: BTreeMap<String, MethodTotals>,
    /// Replacements by reason (as [`super::HANDLER_REASONS`]).
    pub handlers: BTreeMap<String, [u64; NREASONS]>,
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        for (name, m) in &o.methods {
            self.methods.entry(name.clone()).or_default().add(m);
        }
        for (name, r) in &o.handlers {
            let e = self.handlers.entry(name.clone()).or_insert([0; NREASONS]);
            for (a, b) in e.iter_mut().zip(r) {
                *a += b;
            }
        }
        self.accepted += o.accepted;
        self.open += o.open;
    }
}

/// How often the master keeps a reading, and how far back `status` looks.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const WINDOW: Duration = Duration::from_secs(60);

/// Readings of the per-method counts over the last minute.
#[derive(Default)]
pub struct Window {
    samples: VecDeque<(Instant, BTreeMap<String, MethodTotals>)>,
}

impl Window {
    /// Whether a reading is due ([`SAMPLE_EVERY`] after the last).
    pub fn due(&self, now: Instant) -> bool {
        !self.samples.back().is_some_and(|(at, _)| now.duration_since(*at) < SAMPLE_EVERY)
    }

    /// Keeps a reading if one is due.
    pub fn sample(&mut self, now: Instant, t: &Totals) {
        if !self.due(now) {
            return;
        }
        self.samples.push_back((now, t.methods.clone()));
        // Keep the newest reading at least WINDOW old, and nothing before it.
        while self.samples.len() > 1 && now.duration_since(self.samples[1].0) >= WINDOW {
            self.samples.pop_front();
        }
    }

    /// Per method, what happened since the reading closest to a minute ago
    /// (since the start, for a younger daemon), and how long that is.
    pub fn last_minute(&self, now: Instant, t: &Totals) -> (BTreeMap<String, MethodTotals>, Duration) {
        let base = self.samples.iter().find(|(at, _)| now.duration_since(*at) <= WINDOW + SAMPLE_EVERY);
        let empty = BTreeMap::new();
        let (since, old) = match base {
            Some((at, m)) => (now.duration_since(*at), m),
            None => (Duration::ZERO, &empty),
        };
        let d = t.methods.iter().map(|(name, m)| (name.clone(), old.get(name).map_or_else(|| m.clone(), |o| m.since(o)))).collect();
        (d, since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(buckets: &[(usize, u64)]) -> MethodTotals {
        let mut m = MethodTotals::default();
        for &(i, n) in buckets {
            m.buckets[i] = n;
            m.codes[0] += n;
        }
        m
    }

    #[test]
    fn quantiles_like_histogram_quantile() {
        assert_eq!(MethodTotals::default().quantile(0.5), None);
        // 100 requests all within (25 µs, 50 µs]: the median at 37.5 µs.
        let m = hist(&[(2, 100)]);
        assert!((m.quantile(0.5).unwrap() - 37.5e-6).abs() < 1e-9);
        // 99 fast, 1 in (1 s, 2.5 s]: p99 still fast, p100 in the slow bucket.
        let m = hist(&[(0, 99), (16, 1)]);
        assert!(m.quantile(0.99).unwrap() <= 10e-6);
        assert!(m.quantile(1.0).unwrap() > 1.0);
        // Only in +Inf: the last finite bound.
        assert_eq!(hist(&[(NBUCKETS - 1, 3)]).quantile(0.5), Some(10.0));
    }

    #[test]
    fn the_last_minute() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let mut t = Totals::default();
        t.methods.insert("ping".into(), hist(&[(0, 10)]));
        w.sample(t0, &t);
        t.methods.insert("ping".into(), hist(&[(0, 25)]));
        let (d, since) = w.last_minute(t0 + Duration::from_secs(30), &t);
        assert_eq!(d["ping"].count(), 15);
        assert_eq!(since, Duration::from_secs(30));
        // Readings older than the window go.
        for s in 1..=20 {
            w.sample(t0 + SAMPLE_EVERY * s, &t);
        }
        assert!(w.samples.len() <= 14);
        let (d, _) = w.last_minute(t0 + SAMPLE_EVERY * 20, &t);
        assert_eq!(d["ping"].count(), 0);
    }
}
