//! File descriptors: rpcd raises its soft `RLIMIT_NOFILE` to the hard limit
//! at start (as redis and Go programs do: a service manager's soft limit is
//! often 1024, far below what `max_connections` promises), gives handler
//! processes back the soft limit it started with (their code may use
//! `select()`, which breaks past descriptor 1023), and says when the
//! configuration may need more descriptors than the limit allows.

use crate::config::Config;

/// The soft limit the first rpcd process of a tree started with, passed to
/// workers (and across an upgrade's exec) in the environment.
pub const ORIGINAL_SOFT_ENV: &str = "RPCD_NOFILE_SOFT";

/// Descriptors a worker needs besides its connections (standard streams,
/// the listener, its channel, the runtime's epoll and wakers, the balance
/// board, a handed-over connection in transit), with room to spare.
pub const WORKER_OWN: u64 = 32;
/// ... and per handler process (its channel, stdout and stderr).
pub const PER_HANDLER_PROCESS: u64 = 3;
/// Descriptors the master needs besides connections and workers (the
/// listener, the control socket and its clients, ZooKeeper, the fd store's
/// memfds).
pub const MASTER_OWN: u64 = 64;
/// ... and per worker (its channel; two generations during a reload).
pub const PER_WORKER: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// The soft limit before [`raise`].
    pub was: u64,
    pub soft: u64,
    pub hard: u64,
}

fn get() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Records the soft limit this process tree started with. Call first in
/// `main`, while the process has one thread (it sets an environment variable).
pub fn remember_original() {
    if std::env::var_os(ORIGINAL_SOFT_ENV).is_none() {
        if let Ok((soft, _)) = get() {
            std::env::set_var(ORIGINAL_SOFT_ENV, soft.to_string());
        }
    }
}

/// The soft limit to give a program rpcd starts (a handler process).
pub fn original_soft() -> Option<u64> {
    std::env::var(ORIGINAL_SOFT_ENV).ok()?.parse().ok()
}

/// The soft limit now.
pub fn soft() -> std::io::Result<u64> {
    Ok(get()?.0)
}

/// Raises the soft limit to the hard one.
pub fn raise() -> std::io::Result<Nofile> {
    let (was, hard) = get()?;
    if was < hard {
        let r = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (soft, hard) = get()?;
    Ok(Nofile { was, soft, hard })
}

/// Sets the soft limit to `soft` (at most the hard limit). Async-signal
/// safe: for a child between fork and exec.
pub fn set_soft(soft: u64) -> std::io::Result<()> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        r.rlim_cur = soft.min(r.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What `cfg` may need at once, in the master and in each worker.
pub fn needs(cfg: &Config) -> (u64, u64) {
    let workers = cfg.server.workers.resolve() as u64;
    let conns = cfg.server.max_connections as u64;
    let worker = conns + WORKER_OWN + PER_HANDLER_PROCESS * cfg.handler_processes() as u64;
    // A restart hands every connection to the master before it exits.
    let master = workers * conns + master_own(cfg) + PER_WORKER * workers;
    (master, worker)
}

/// The master's own descriptors: [`MASTER_OWN`], and the `/metrics`
/// listener with its most clients when it is on.
fn master_own(cfg: &Config) -> u64 {
    MASTER_OWN + if cfg.metrics.addr().is_some() { crate::metrics::http::MAX_CLIENTS as u64 + 1 } else { 0 }
}

/// A warning when `cfg` may need more descriptors than `limit` (the soft
/// limit after [`raise`]), with the numbers and what to change.
pub fn check(cfg: &Config, limit: u64) -> Option<String> {
    let (master, worker) = needs(cfg);
    if master <= limit {
        return None;
    }
    let workers = cfg.server.workers.resolve() as u64;
    let conns = cfg.server.max_connections as u64;
    let fits = limit.saturating_sub(master_own(cfg) + PER_WORKER * workers) / workers.max(1);
    let worker_note = if worker > limit { format!("; each worker alone needs {worker}") } else { String::new() };
    Some(format!(
        "server.workers x server.max_connections = {workers} x {conns} = {} connections, plus {} descriptors for rpcd itself, \
         is {master}, over RLIMIT_NOFILE {limit} (the master holds every connection during a restart{worker_note}): \
         raise the limit (LimitNOFILE= in the unit, ulimit -Hn) to at least {master}, or lower server.max_connections to {fits}",
        workers * conns,
        master - workers * conns,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(workers: u32, conns: u32) -> Config {
        let mut c = Config::default();
        c.server.workers = crate::config::Workers::Count(workers);
        c.server.max_connections = conns;
        c
    }

    #[test]
    fn says_when_the_limit_is_short_with_numbers() {
        assert_eq!(check(&cfg(2, 10_000), 65_536), None);
        let w = check(&cfg(4, 10_000), 20_000).unwrap();
        assert!(w.contains("4 x 10000 = 40000 connections, plus 80 descriptors"), "{w}");
        assert!(w.contains("is 40080, over RLIMIT_NOFILE 20000"), "{w}");
        assert!(w.contains("lower server.max_connections to 4980"), "{w}");
        assert!(!w.contains("each worker alone"), "{w}");
        let w = check(&cfg(1, 10_000), 1024).unwrap();
        assert!(w.contains("each worker alone needs 10032"), "{w}");
        // What the suggestion says fits does fit.
        assert_eq!(check(&cfg(4, 4980), 20_000), None);
    }

    #[test]
    fn raise_reaches_the_hard_limit() {
        let n = raise().unwrap();
        assert_eq!(n.soft, n.hard);
    }
}
