//! Counting what the workers serve, for `/metrics` (SPEC §8), the slow log
//! and `rpcctl status`.
//!
//! Each worker counts into its own [`shm::Slot`] of a shared memfd (the [`shm`]
//! module), as php-fpm's scoreboard does: plain stores into memory the
//! master can read at any time, no message per request, nothing to flush.
//! A worker killed by SIGKILL loses nothing it had answered, since its slot
//! outlives it: when the master reaps a worker it adds the slot's final
//! counts to its totals of retired workers ([`Totals`]), so that no counter
//! goes backwards across a reload or a worker restart. The master then
//! aggregates over every generation ([`totals`]), renders the exposition
//! with the `prometheus-client` crate ([`expose`]) and serves it over a
//! small HTTP listener of its own ([`http`]).

pub mod expose;
pub mod http;
pub mod shm;
pub mod totals;

pub use shm::{Recorder, Stats};
pub use totals::{MethodTotals, Totals, Window};

/// Reply codes, as `rpcd_requests_total`'s `code` label: `ok`, SPEC §2's
/// error codes, and `other` for an error code of a handler's own.
pub const CODES: [&str; 12] = [
    "ok",
    "bad_json",
    "bad_request",
    "unknown_method",
    "bad_params",
    "too_large",
    "overloaded",
    "shutting_down",
    "timeout",
    "handler_failed",
    "unavailable",
    "other",
];
pub const NCODES: usize = CODES.len();
pub const OK: u8 = 0;
pub const OTHER_CODE: u8 = (NCODES - 1) as u8;

/// The code index of an error code's text.
pub fn code_index(code: &str) -> u8 {
    CODES.iter().position(|c| *c == code).filter(|&i| i != 0).map_or(OTHER_CODE, |i| i as u8)
}

/// The code index of a [`crate::protocol::ErrorCode`].
pub fn error_index(code: crate::protocol::ErrorCode) -> u8 {
    code_index(code.as_str())
}

/// Upper bounds of the latency histogram's buckets, in nanoseconds (then
/// `+Inf`): from 10 µs, since a ping takes tens of microseconds, to 10 s.
pub const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
pub const NBUCKETS: usize = BOUNDS_NS.len() + 1;

/// The bucket of a duration.
#[inline]
pub fn bucket(ns: u64) -> usize {
    BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BOUNDS_NS.len())
}

/// Why a handler process was replaced (`rpcd_handler_restarts_total`'s
/// `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerRestart {
    /// It exited (or was killed) by itself.
    Exited,
    /// It broke the protocol (an invalid frame).
    ProtocolError,
    /// It closed its channel without exiting.
    HungUp,
    /// It missed a call's deadline.
    Timeout,
    /// Recycled after `max_requests`.
    MaxRequests,
    /// Recycled above `max_rss_mb`.
    MaxRss,
    /// Its warmup call failed.
    WarmupFailed,
}

pub const HANDLER_REASONS: [&str; 7] = ["exited", "protocol_error", "hung_up", "timeout", "max_requests", "max_rss", "warmup_failed"];
pub const NREASONS: usize = HANDLER_REASONS.len();

/// Why the master replaced a worker (`rpcd_worker_restarts_total`'s `reason`).
pub const WORKER_REASONS: [&str; 4] = ["exited", "crashed", "heartbeat", "not_ready"];

/// The label of an exit status as the pool reports it ("exited with status
/// 1", "killed by SIGKILL"), when the master did not kill it itself.
pub fn worker_reason(status: &str, killed_for: Option<&'static str>) -> &'static str {
    match killed_for {
        Some(r) => r,
        None if status.starts_with("killed") => "crashed",
        None => "exited",
    }
}

/// CLOCK_MONOTONIC in nanoseconds (what `Instant` reads, without its
/// arithmetic): requests' arrival and reply times.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// The worker's recorder, for the code that has no [`Shared`] at hand (the
/// handler pools). Set once, at the worker's start.
///
/// [`Shared`]: crate::connection::Shared
static WORKER: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();

pub fn set_worker(r: Recorder) {
    let _ = WORKER.set(r);
}

pub fn worker() -> Option<&'static Recorder> {
    WORKER.get()
}

/// Counts a handler process's replacement (pool `pool`, in the config's order).
pub fn handler_restart(pool: usize, why: HandlerRestart) {
    if let Some(r) = worker() {
        r.handler_restart(pool, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_buckets() {
        assert_eq!(code_index("bad_json"), 1);
        assert_eq!(code_index("unavailable"), 10);
        assert_eq!(code_index("ok"), OTHER_CODE); // "ok" is not an error code
        assert_eq!(code_index("my_own"), OTHER_CODE);
        assert_eq!(error_index(crate::protocol::ErrorCode::Timeout), 8);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(u64::MAX), NBUCKETS - 1);
        assert_eq!(worker_reason("killed by SIGKILL", None), "crashed");
        assert_eq!(worker_reason("exited with status 1", None), "exited");
        assert_eq!(worker_reason("killed by SIGKILL", Some("heartbeat")), "heartbeat");
    }
}
