//! Connections handed over: those the previous instance left in the fd
//! store (adopted at start, passed to the first generation's workers once
//! they are ready), and those a worker hands over while it retires (into the
//! store for a restart, to the new generation for a reload or an upgrade).
//! The channel messages and the store's names are in [`crate::handover`].

use super::Master;
use crate::config::Config;
use crate::handover;
use crate::notify;
use crate::pool::WState;
use crate::sockets::{self, Passed};
use serde_json::Value;
use socket2::Type;

impl Master {
    /// Gives the connections the previous instance handed over to the
    /// first generation's workers, round robin, and removes them from the
    /// store (the workers own them now).
    pub(super) fn deliver_adopted(&mut self) {
        if self.adopted.is_empty() {
            return;
        }
        let n = self.adopted.len();
        log::info!("passing {n} handed-over connection(s) to the workers");
        for (name, conn) in std::mem::take(&mut self.adopted) {
            notify::remove_stored(&name);
            self.pass_to_worker(conn);
        }
    }

    /// Queues a connection to the next serving worker of the current
    /// generation. False (and the connection closed) if there is none.
    fn pass_to_worker(&mut self, conn: handover::Conn) -> bool {
        let takers: Vec<i32> = self
            .pool
            .workers
            .values()
            .filter(|w| w.generation == self.cur.id && w.state == WState::Serving && self.chans.contains_key(&w.pid))
            .map(|w| w.pid)
            .collect();
        if takers.is_empty() {
            return false;
        }
        self.next_taker = self.next_taker.wrapping_add(1);
        let pid = takers[self.next_taker % takers.len()];
        self.chans[&pid].1.send(conn).is_ok()
    }

    /// A worker handed a connection over: for a restart, into the store;
    /// for a reload (or an upgrade) that keeps the listener, to a worker of
    /// the new generation.
    pub(super) fn handed_over(&mut self, c: handover::Conn) {
        if let Some(stop) = self.stop.as_mut() {
            if stop.restart {
                let name = format!("{}{}", handover::CONN_PREFIX, stop.handed.len() + 1);
                sockets::store(&name, &c.fd);
                stop.handed.push((name, c.leftover));
            } else {
                log::warn!("a worker handed over a connection during a stop; closing it");
            }
            return;
        }
        if !self.pass_to_worker(c) {
            log::warn!("no worker to take a handed-over connection; closing it");
        }
    }
}

/// What the previous instance handed over through the store: the
/// connections its state names (others are closed: their framing is
/// unknown), and its ZooKeeper node when the ensemble is the same.
pub(super) fn take_handover(passed: &mut Passed, cfg: &Config) -> (Vec<(String, handover::Conn)>, Option<String>) {
    let read = |fd| handover::read_memfd(fd).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
    let state = passed.take_named(handover::STATE_NAME).and_then(read);
    let zk = passed.take_named(handover::ZK_NAME).and_then(read);
    let conns = passed.take_prefixed(handover::CONN_PREFIX);
    let mut adopted = Vec::new();
    let mut unknown = 0usize;
    for (name, fd) in conns {
        let leftover = state.as_ref().and_then(|s| s["conns"][&name].as_str()).and_then(handover::unhex);
        let tcp = socket2::SockRef::from(&fd).r#type().ok() == Some(Type::STREAM) && !socket2::SockRef::from(&fd).is_listener().unwrap_or(true);
        match leftover {
            Some(leftover) if tcp => adopted.push((name, handover::Conn { fd, leftover })),
            _ => {
                unknown += 1;
                notify::remove_stored(&name);
            }
        }
    }
    if unknown > 0 {
        log::warn!("closed {unknown} passed connection(s) that the handover state does not describe");
    }
    if state.is_some() {
        notify::remove_stored(handover::STATE_NAME);
    }
    if !adopted.is_empty() {
        log::info!("adopting {} connection(s) handed over by the previous instance", adopted.len());
    }
    let had_zk = zk.is_some();
    let node = zk.and_then(|z| {
        let node = z["node"].as_str()?.to_string();
        if z["hosts"].as_str() == Some(cfg.zookeeper.hosts.as_str()) && cfg.zookeeper.enabled {
            Some(node)
        } else {
            log::info!("the previous instance's node {node} was on another ensemble; it expires with its session");
            None
        }
    });
    if had_zk && node.is_none() {
        notify::remove_stored(handover::ZK_NAME);
    }
    (adopted, node)
}
