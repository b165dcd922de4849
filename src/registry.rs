//! ZooKeeper registration of the daemon (runs as a task in the master).
//!
//! One EPHEMERAL_SEQUENTIAL node `{root}/{node_prefix}` per daemon, created
//! once the workers are ready. ZooKeeper being unreachable never stops the
//! daemon: the task retries with capped backoff and registers as soon as it
//! can. Connection loss keeps the session (and the node); expiry opens a new
//! session and registers again, then deletes any node of ours that an old
//! session left behind. On stop: mark the node draining, delete it, close
//! the session, wait `deregister_delay_ms`, then report `deregistered`.

use crate::config::{Config, ZkConfig};
use crate::zk::{connect, join, EPHEMERAL_SEQUENTIAL, PERSISTENT};
use serde::Serialize;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use tokio::sync::mpsc;
use zookeeper_client as zk;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ZkState {
    Disabled,
    Connecting,
    Registered,
    Deregistered,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub state: ZkState,
    pub node: Option<String>,
}

enum Cmd {
    Publish(Value),
    Reconfigure(ZkConfig, Value),
    Deregister,
}

pub struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    pub fn start(cfg: &ZkConfig, events: mpsc::UnboundedSender<Status>) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(Registrar { cfg: cfg.clone(), events, rx, payload: None, node: None, deregistering: false }.run());
        Handle { tx }
    }
    /// Registers (or updates the node's data).
    pub fn publish(&self, payload: Value) {
        let _ = self.tx.send(Cmd::Publish(payload));
    }
    /// Applies a reloaded `[zookeeper]` section; moves the node if needed.
    pub fn reconfigure(&self, cfg: &ZkConfig, payload: Value) {
        let _ = self.tx.send(Cmd::Reconfigure(cfg.clone(), payload));
    }
    pub fn deregister(&self) {
        let _ = self.tx.send(Cmd::Deregister);
    }
}

/// The host and port written to ZooKeeper: `server.advertise`, else the
/// bound address; a wildcard address is replaced by the local address that
/// routes to the first ZooKeeper host, never written as is.
pub fn advertised(cfg: &Config, bound: SocketAddr) -> Result<(String, u16), String> {
    if let Some(a) = &cfg.server.advertise {
        let addr = crate::config::resolve_addr(a)?;
        let host = a.rsplit_once(':').map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']')).unwrap_or(a);
        return Ok((host.to_string(), addr.port()));
    }
    if !bound.ip().is_unspecified() {
        return Ok((bound.ip().to_string(), bound.port()));
    }
    let (hosts, _) = crate::zk::split_chroot(&cfg.zookeeper.hosts);
    let first = hosts.split(',').next().unwrap_or("").trim();
    let first = if first.contains(':') { first.to_string() } else { format!("{first}:2181") };
    let derived = crate::config::resolve_addr(&first).ok().and_then(|zk| {
        let s = UdpSocket::bind(if zk.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }).ok()?;
        s.connect(zk).ok()?;
        s.local_addr().ok()
    });
    match derived {
        Some(a) if !a.ip().is_unspecified() => Ok((a.ip().to_string(), bound.port())),
        _ => Err(format!(
            "server.listen is the wildcard {bound} and no routable address could be derived; set server.advertise"
        )),
    }
}

struct Registrar {
    cfg: ZkConfig,
    events: mpsc::UnboundedSender<Status>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    payload: Option<Value>,
    node: Option<String>,
    deregistering: bool,
}

/// Why a session ended.
enum End {
    /// The session expired or closed: open a new one.
    Lost,
    /// The registration moved to a new ensemble/path; keep going there.
    Moved,
    /// Deregistered: the task is done.
    Done,
}

impl Registrar {
    fn report(&self, state: ZkState) {
        let _ = self.events.send(Status { state, node: self.node.clone() });
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.session_timeout_ms)
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let max = Duration::from_millis(self.cfg.max_retry_delay_ms.max(100));
        loop {
            // Nothing to do until the workers are ready.
            while self.payload.is_none() && !self.deregistering {
                match self.rx.recv().await {
                    Some(Cmd::Publish(p)) => self.payload = Some(p),
                    Some(Cmd::Reconfigure(c, p)) => {
                        self.cfg = c;
                        self.payload = Some(p);
                    }
                    Some(Cmd::Deregister) | None => self.deregistering = true,
                }
            }
            if self.deregistering {
                self.node = None;
                self.report(ZkState::Deregistered);
                return;
            }
            self.report(ZkState::Connecting);
            let hosts = self.cfg.hosts.clone();
            let timeout = self.timeout();
            let connecting = async move { connect(&hosts, timeout).await };
            tokio::pin!(connecting);
            let client = loop {
                tokio::select! {
                    r = &mut connecting => break Some(r),
                    cmd = self.rx.recv() => match cmd {
                        Some(Cmd::Publish(p)) => self.payload = Some(p),
                        Some(Cmd::Reconfigure(c, p)) => { self.cfg = c; self.payload = Some(p); break None; }
                        Some(Cmd::Deregister) | None => { self.deregistering = true; break None; }
                    },
                }
            };
            let client = match client {
                None => continue,
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    log::warn!("zookeeper: {e}; retrying in {:.1}s", backoff.as_secs_f64());
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            cmd = self.rx.recv() => match cmd {
                                Some(Cmd::Publish(p)) => self.payload = Some(p),
                                Some(Cmd::Reconfigure(c, p)) => { self.cfg = c; self.payload = Some(p); break; }
                                Some(Cmd::Deregister) | None => { self.deregistering = true; break; }
                            },
                        }
                    }
                    backoff = (backoff * 2).min(max);
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            match self.session(client).await {
                End::Done => return,
                End::Lost | End::Moved => continue,
            }
        }
    }

    /// Creates our node in this session, unless one of ours exists already
    /// (a create whose answer was lost). Deletes nodes of ours left by
    /// earlier sessions. Returns the node path.
    async fn register(&self, client: &zk::Client) -> Result<String, zk::Error> {
        let root = &self.cfg.root;
        let payload = self.payload.as_ref().expect("payload");
        let data = serde_json::to_vec(payload).unwrap_or_default();
        client.mkdir(root, &PERSISTENT).await?;
        let prefix = join(root, &self.cfg.node_prefix);
        let path = match self.find_ours(client, true).await? {
            Some(existing) => existing,
            None => {
                let (_, seq) = client.create(&prefix, &data, &EPHEMERAL_SEQUENTIAL).await?;
                format!("{prefix}{seq}")
            }
        };
        // Stale nodes of this daemon from an older session: delete them.
        let sid = client.session_id().0;
        for (child, owner) in self.ours(client).await? {
            if owner != sid && child != path {
                match client.delete(&child, None).await {
                    Ok(()) => log::warn!("zookeeper: deleted stale node {child} of an old session"),
                    Err(zk::Error::NoNode) => {}
                    Err(e) => log::warn!("zookeeper: cannot delete stale node {child}: {e}"),
                }
            }
        }
        Ok(path)
    }

    /// Nodes under root that belong to this daemon (same pid, start time,
    /// host and port), with their ephemeral owner.
    async fn ours(&self, client: &zk::Client) -> Result<Vec<(String, i64)>, zk::Error> {
        let Some(me) = &self.payload else { return Ok(vec![]) };
        let key = |v: &Value| (v.get("pid").cloned(), v.get("started").cloned(), v.get("host").cloned(), v.get("port").cloned());
        let mine = key(me);
        let mut out = Vec::new();
        let children = match client.list_children(&self.cfg.root).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => return Ok(out),
            Err(e) => return Err(e),
        };
        for c in children {
            if !c.starts_with(&self.cfg.node_prefix) {
                continue;
            }
            let path = join(&self.cfg.root, &c);
            let Ok((data, stat)) = client.get_data(&path).await else { continue };
            if stat.ephemeral_owner == 0 {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<Value>(&data) {
                if key(&v) == mine {
                    out.push((path, stat.ephemeral_owner));
                }
            }
        }
        Ok(out)
    }

    async fn find_ours(&self, client: &zk::Client, this_session: bool) -> Result<Option<String>, zk::Error> {
        let sid = client.session_id().0;
        Ok(self.ours(client).await?.into_iter().find(|(_, o)| (*o == sid) == this_session).map(|(p, _)| p))
    }

    async fn session(&mut self, client: zk::Client) -> End {
        let mut states = client.state_watcher();
        let t = self.timeout();
        // Register, retrying while the session lives.
        loop {
            if self.deregistering {
                return self.deregister(client).await;
            }
            match tokio::time::timeout(t, self.register(&client)).await {
                Ok(Ok(path)) => {
                    log::info!("zookeeper: registered {path} (session {})", client.session_id());
                    self.node = Some(path);
                    self.report(ZkState::Registered);
                    break;
                }
                Ok(Err(zk::Error::SessionExpired | zk::Error::ClientClosed)) => {
                    self.node = None;
                    return End::Lost;
                }
                Ok(Err(e)) => log::warn!("zookeeper: cannot register: {e}; retrying"),
                Err(_) => log::warn!("zookeeper: registration timed out; retrying"),
            }
            if client.state().is_terminated() {
                self.node = None;
                return End::Lost;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        loop {
            tokio::select! {
                s = states.changed() => match s {
                    zk::SessionState::Disconnected => {
                        log::warn!("zookeeper: connection lost; the session (and the node) survive until it expires");
                        self.report(ZkState::Connecting);
                    }
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        log::info!("zookeeper: reconnected (session {})", client.session_id());
                        self.report(ZkState::Registered);
                    }
                    s if s.is_terminated() => {
                        log::warn!("zookeeper: session {} {s:?}; registering again in a new session", client.session_id());
                        self.node = None;
                        self.report(ZkState::Connecting);
                        return End::Lost;
                    }
                    _ => {}
                },
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Publish(p)) => {
                        self.payload = Some(p);
                        self.update(&client).await;
                    }
                    Some(Cmd::Reconfigure(c, p)) => {
                        self.payload = Some(p);
                        let moved = c.hosts != self.cfg.hosts || c.root != self.cfg.root
                            || c.node_prefix != self.cfg.node_prefix || c.session_timeout_ms != self.cfg.session_timeout_ms;
                        if !moved {
                            self.cfg = c;
                            self.update(&client).await;
                            continue;
                        }
                        // Register at the new place first, then leave the old one:
                        // no window without a registration.
                        let old_node = self.node.clone();
                        let old_cfg = std::mem::replace(&mut self.cfg, c);
                        log::info!("zookeeper: moving registration to {} {}", self.cfg.hosts, self.cfg.root);
                        return self.moved(client, old_node, old_cfg).await;
                    }
                    Some(Cmd::Deregister) | None => {
                        self.deregistering = true;
                        return self.deregister(client).await;
                    }
                },
            }
        }
    }

    async fn update(&self, client: &zk::Client) {
        let (Some(node), Some(p)) = (&self.node, &self.payload) else { return };
        let data = serde_json::to_vec(p).unwrap_or_default();
        match tokio::time::timeout(self.timeout(), client.set_data(node, &data, None)).await {
            Ok(Ok(_)) => log::debug!("zookeeper: updated {node}"),
            Ok(Err(e)) => log::warn!("zookeeper: cannot update {node}: {e}"),
            Err(_) => log::warn!("zookeeper: updating {node} timed out"),
        }
    }

    async fn moved(&mut self, old: zk::Client, old_node: Option<String>, _old_cfg: ZkConfig) -> End {
        let t = self.timeout();
        let new = match tokio::time::timeout(t, connect(&self.cfg.hosts, t)).await {
            Ok(Ok(c)) => Some(c),
            _ => None,
        };
        let registered = match &new {
            Some(c) => match tokio::time::timeout(t, self.register(c)).await {
                Ok(Ok(path)) => Some(path),
                _ => None,
            },
            None => None,
        };
        if let Some(n) = &old_node {
            let _ = tokio::time::timeout(t, old.delete(n, None)).await;
        }
        close(old).await;
        match (new, registered) {
            (Some(c), Some(path)) => {
                log::info!("zookeeper: registered {path}");
                self.node = Some(path);
                self.report(ZkState::Registered);
                Box::pin(self.session_after_register(c)).await
            }
            _ => {
                log::warn!("zookeeper: the new ensemble is not reachable yet; retrying");
                self.node = None;
                self.report(ZkState::Connecting);
                End::Moved
            }
        }
    }

    /// Continues a session whose node is already registered.
    async fn session_after_register(&mut self, client: zk::Client) -> End {
        // register() finds our node of this session and keeps it.
        self.session(client).await
    }

    async fn deregister(&mut self, client: zk::Client) -> End {
        let t = Duration::from_secs(2).min(self.timeout());
        if let Some(node) = self.node.take() {
            if let Some(mut p) = self.payload.clone() {
                p["state"] = Value::from("draining");
                let data = serde_json::to_vec(&p).unwrap_or_default();
                let _ = tokio::time::timeout(t, client.set_data(&node, &data, None)).await;
            }
            match tokio::time::timeout(t, client.delete(&node, None)).await {
                Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => log::info!("zookeeper: deregistered {node}"),
                Ok(Err(e)) => log::warn!("zookeeper: cannot delete {node}: {e}; it expires with the session"),
                Err(_) => log::warn!("zookeeper: deleting {node} timed out; it expires with the session"),
            }
        }
        close(client).await;
        tokio::time::sleep(Duration::from_millis(self.cfg.deregister_delay_ms)).await;
        self.report(ZkState::Deregistered);
        End::Done
    }
}

/// Closes a session and waits (briefly) until the server has it closed.
async fn close(client: zk::Client) {
    let mut states = client.state_watcher();
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if states.changed().await.is_terminated() {
                break;
            }
        }
    })
    .await;
}
