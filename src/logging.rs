//! Logging through the `log` facade to stderr or syslog.
//!
//! `auto` picks stderr when `JOURNAL_STREAM` is set (systemd captures it) or
//! stderr is a terminal, and syslog otherwise. Under journald every stderr
//! line carries a `<N>` priority prefix so the journal keeps the level.

use crate::config::{LogConfig, LogTarget};
use log::{Level, Log, Metadata, Record};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use syslog::{Facility, Formatter3164, LoggerBackend};

fn priority(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

struct StderrLogger {
    journal: bool,
    role: &'static str,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = if self.journal {
            format!("<{}>{}{}\n", priority(r.level()), self.role, r.args())
        } else {
            format!("rpcd[{}]: {}: {}{}\n", std::process::id(), r.level().as_str().to_lowercase(), self.role, r.args())
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

struct SyslogLogger {
    path: PathBuf,
    role: &'static str,
    inner: Mutex<Option<syslog::Logger<LoggerBackend, Formatter3164>>>,
}

fn connect_syslog(path: &PathBuf) -> Result<syslog::Logger<LoggerBackend, Formatter3164>, String> {
    let f = Formatter3164 { facility: Facility::LOG_DAEMON, hostname: None, process: "rpcd".into(), pid: std::process::id() };
    syslog::unix_custom(f, path).map_err(|e| format!("cannot open syslog socket {}: {e}", path.display()))
}

impl Log for SyslogLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let msg = format!("{}{}", self.role, r.args());
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // One reconnect attempt: the syslog daemon may have restarted.
        for _ in 0..2 {
            if g.is_none() {
                *g = connect_syslog(&self.path).ok();
            }
            let Some(l) = g.as_mut() else { break };
            let res = match r.level() {
                Level::Error => l.err(&msg),
                Level::Warn => l.warning(&msg),
                Level::Info => l.info(&msg),
                Level::Debug | Level::Trace => l.debug(&msg),
            };
            if res.is_ok() {
                return;
            }
            *g = None;
        }
        // Syslog is gone: do not lose the message.
        let _ = writeln!(std::io::stderr(), "rpcd[{}]: {}", std::process::id(), msg);
    }
    fn flush(&self) {}
}

/// Which target `auto` resolves to in this environment.
pub fn resolve_target(t: LogTarget) -> LogTarget {
    match t {
        LogTarget::Auto => {
            if std::env::var_os("JOURNAL_STREAM").is_some() || std::io::stderr().is_terminal() {
                LogTarget::Stderr
            } else {
                LogTarget::Syslog
            }
        }
        other => other,
    }
}

/// Installs the process-wide logger. `role` prefixes messages ("" for the
/// master, "worker N: " for workers). Falls back to stderr, with a warning,
/// when syslog cannot be reached.
pub fn init(cfg: &LogConfig, role: &'static str) {
    log::set_max_level(cfg.level.filter());
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let logger: Box<dyn Log> = match resolve_target(cfg.target) {
        LogTarget::Syslog => match connect_syslog(&cfg.syslog_socket) {
            Ok(l) => Box::new(SyslogLogger { path: cfg.syslog_socket.clone(), role, inner: Mutex::new(Some(l)) }),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "rpcd: {e}; logging to stderr");
                Box::new(StderrLogger { journal, role })
            }
        },
        _ => Box::new(StderrLogger { journal, role }),
    };
    let _ = log::set_boxed_logger(logger);
}
