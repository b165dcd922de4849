//! rpcd: a small prefork RPC daemon with ZooKeeper registration.
//!
//! Modules, by what they do:
//! - [`config`]: `/etc/rpcd.toml`
//! - [`protocol`]: frames, requests, replies, the built-in methods
//! - [`master`]: the one loop of the master process
//! - [`pool`]: worker processes; the kill-and-reap sequence
//! - [`worker`]: a worker process (`rpcd --worker`)
//! - [`control`]: the control socket, server and client side
//! - [`registry`]: ZooKeeper registration of the daemon
//! - [`client`]: the RPC client and ZooKeeper discovery used by `rpcctl`
//! - [`notify`]: sd_notify
//! - [`logging`]: stderr / syslog logging

pub mod client;
pub mod config;
pub mod control;
pub mod logging;
pub mod master;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod worker;
pub mod discovery;
pub mod zk;

/// serde_json as rpcd uses it (for the fuzz targets).
#[doc(hidden)]
pub use serde_json as serde_json_reexport;
