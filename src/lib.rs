//! rpcd: a small prefork RPC daemon with ZooKeeper registration, as a
//! program (`rpcd`, `rpcctl`) and as a library for building your own daemon
//! with your methods in-process ([`methods`], [`main`]).
//!
//! Modules, by what they do:
//! - [`config`] — `/etc/rpcd.toml`
//! - [`protocol`] — frames, requests, replies, error codes
//! - [`methods`] — the method table; the built-ins; the library API
//! - [`handlers`] — handler processes, the user-defined methods in any language
//! - [`master`] — the one loop of the master process
//! - [`pool`] — child processes; the kill-and-reap sequence
//! - [`worker`] — a worker process (`rpcd --worker`)
//! - [`connection`], [`replies`] — a worker's client connections, in-order replies
//! - [`sockets`] — sockets passed by systemd (fd store, socket activation)
//! - [`control`] — the control socket, server and client side
//! - [`registry`] — ZooKeeper registration of the daemon
//! - [`client`], [`discovery`] — the RPC client and ZooKeeper discovery used by `rpcctl`
//! - [`notify`] — sd_notify
//! - [`logging`] — stderr / syslog logging

pub mod balance;
pub mod client;
#[doc(hidden)]
pub mod completions;
pub mod config;
pub mod connection;
pub mod control;
pub mod discovery;
pub mod handlers;
pub mod handover;
pub mod limits;
pub mod logging;
pub mod master;
pub mod methods;
pub mod metrics;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod replies;
pub mod sockets;
pub mod tls;
pub mod worker;
pub mod zk;

pub use methods::{MethodError, Methods};

/// serde_json as rpcd uses it (for the fuzz targets).
#[doc(hidden)]
pub use serde_json as serde_json_reexport;

use clap::{CommandFactory, FromArgMatches, Parser};
use std::path::PathBuf;

/// The daemon's command line (SPEC §5).
#[derive(Parser)]
#[command(name = "rpcd", version, about = "rpcd: prefork RPC daemon with ZooKeeper registration (runs in the foreground).")]
struct Args {
    /// Configuration file.
    #[arg(short, long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the configuration, print the error if any, and exit (0 = valid, 1 = invalid).
    #[arg(short = 't', long)]
    check_config: bool,
    /// Print the shell completion script for SHELL and exit (reads no configuration).
    #[arg(long, value_name = "SHELL", value_enum, exclusive = true)]
    completions: Option<completions::Shell>,
}

/// The command line that `rpcd` parses: [`Args`] and the master's internal
/// `--worker`, hidden from `--help`. The completion scripts are made from
/// [`Args`] alone, as clap_complete offers hidden options too.
fn command(name: &'static str) -> clap::Command {
    let worker = clap::Arg::new("worker")
        .long("worker")
        .hide(true)
        .action(clap::ArgAction::SetTrue)
        .help("Internal: run as a worker process spawned by the master.");
    Args::command().name(name).bin_name(name).arg(worker)
}

/// Runs the daemon with `methods` in-process: `rpcd [--config PATH]
/// [--check-config]` (or `--completions SHELL`: the shell completion
/// script, under this binary's name), exactly as the `rpcd` binary (which is
/// `rpcd::main(Methods::new())`). Workers are this same binary run with
/// `--worker`, so they serve `methods` too. Never returns.
pub fn main(methods: Methods) -> ! {
    // Before any thread exists (it sets an environment variable).
    limits::remember_original();
    let nofile = limits::raise();
    let name = std::env::args_os()
        .next()
        .and_then(|a| PathBuf::from(a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty() && !n.starts_with("rpcd:"))
        .unwrap_or_else(|| "rpcd".into());
    let name: &'static str = Box::leak(name.into_boxed_str());
    let matches = command(name).get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(shell) = args.completions {
        completions::print_and_exit(shell, &mut Args::command().name(name).bin_name(name), name);
    }
    if matches.get_flag("worker") {
        worker::run(methods);
    }
    let in_process = methods.in_process();
    let cfg = match config::Config::load_for(&args.config, &in_process).and_then(|mut c| c.load_secrets().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: configuration error: {e}");
            std::process::exit(1);
        }
    };
    if args.check_config {
        for w in cfg.warnings() {
            eprintln!("{name}: warning: {w}");
        }
        match &nofile {
            Ok(n) => {
                if let Some(w) = limits::check(&cfg, n.soft) {
                    eprintln!("{name}: warning: {w} (this is the hard limit here; a service gets its unit's LimitNOFILE=)");
                }
            }
            Err(e) => eprintln!("{name}: warning: cannot read or raise RLIMIT_NOFILE: {e}"),
        }
        println!("{name}: configuration {} is valid", args.config.display());
        std::process::exit(0);
    }
    logging::init(&cfg.log, "");
    std::process::exit(master::run(args.config, cfg, in_process, nofile.ok()));
}
