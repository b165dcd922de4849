//! ZooKeeper registration of the daemon (runs as a task in the master).
//!
//! One EPHEMERAL_SEQUENTIAL node `{root}/{node_prefix}` per daemon, created
//! once the workers are ready. ZooKeeper being unreachable never stops the
//! daemon: the task retries with capped backoff and registers as soon as it
//! can. Connection loss keeps the session (and the node); expiry opens a new
//! session and registers again, then deletes any node of ours that an old
//! session left behind. On stop: mark the node draining, delete it, close
//! the session, wait `deregister_delay_ms`, then report `deregistered`.
//!
//! With `zookeeper.auth_file` (SPEC §9) every session is opened with the
//! digest credentials (sent again on each reconnect before anything else),
//! and the node and the parents it creates get
//! [`crate::zk::CREATOR_ALL_ANYONE_READ`]. A reload that changes the
//! credentials moves the registration to a session with the new identity,
//! like a change of hosts or root.

use crate::config::{Config, ZkConfig};
use crate::zk::{connect, ephemeral_sequential, join, no_auth_hint, persistent, Auth};
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
    /// A session event that came with this state, if any
    /// (`rpcd_zookeeper_session_events_total`'s `event`).
    pub event: Option<&'static str>,
}

enum Cmd {
    Publish(Value),
    Reconfigure(ZkConfig, Option<Auth>, Value),
    Deregister,
    Detach,
}

pub struct Handle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Handle {
    /// Starts the registrar. `auth`: the credentials of
    /// `zookeeper.auth_file` (`Config::secrets.zk_auth`), if any.
    /// `previous`: the node a previous instance of this daemon left for a
    /// restart; it is deleted once ours exists.
    pub fn start(cfg: &ZkConfig, auth: Option<Auth>, events: mpsc::UnboundedSender<Status>, previous: Option<String>) -> Handle {
        let (tx, rx) = mpsc::unbounded_channel();
        let r =
            Registrar { cfg: cfg.clone(), auth, events, rx, payload: None, node: None, deregistering: false, detached: false, old: None, previous };
        tokio::spawn(r.run());
        Handle { tx }
    }
    /// Registers (or updates the node's data).
    pub fn publish(&self, payload: Value) {
        let _ = self.tx.send(Cmd::Publish(payload));
    }
    /// Applies a reloaded `[zookeeper]` section and credentials; moves the
    /// node if needed (new place, or new identity).
    pub fn reconfigure(&self, cfg: &ZkConfig, auth: Option<Auth>, payload: Value) {
        let _ = self.tx.send(Cmd::Reconfigure(cfg.clone(), auth, payload));
    }
    pub fn deregister(&self) {
        let _ = self.tx.send(Cmd::Deregister);
    }
    /// For a restart: stops without deleting the node or closing the
    /// session, so that the node stays until the next instance has
    /// registered and deletes it (or until the session expires).
    pub fn detach(&self) {
        let _ = self.tx.send(Cmd::Detach);
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
    let first = first.split_once("://").map(|(_, h)| h).unwrap_or(first);
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
    /// The digest credentials of the sessions we open (None: unauthenticated).
    auth: Option<Auth>,
    events: mpsc::UnboundedSender<Status>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    payload: Option<Value>,
    /// Our node in the current session.
    node: Option<String>,
    deregistering: bool,
    /// Stopping for a restart: leave the node and the session as they are.
    detached: bool,
    /// The node a previous instance left for us to delete.
    previous: Option<String>,
    /// The registration we are moving away from after a reload changed
    /// hosts/root/prefix: its session and node are kept until the node at
    /// the new place exists, so that there is no moment without one.
    old: Option<(zk::Client, Option<String>)>,
}

/// Why a session ended.
enum End {
    /// The session expired or closed: open a new one.
    Lost,
    /// The registration moves to a new ensemble/path; keep going there.
    Moved,
    /// Deregistered: the task is done.
    Done,
}

/// What a command means for a registration in progress.
enum Next {
    /// Keep going (the payload or a setting that needs no new session changed).
    Continue,
    /// The registration moves: new session, new place.
    Move,
    /// Deregister.
    Stop,
}

impl Registrar {
    fn report(&self, state: ZkState) {
        self.report_event(state, None);
    }

    fn report_event(&self, state: ZkState, event: Option<&'static str>) {
        // While moving, the old node is still our registration.
        let node = self.node.clone().or_else(|| self.old.as_ref().and_then(|(_, n)| n.clone()));
        let _ = self.events.send(Status { state, node, event });
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.session_timeout_ms)
    }

    fn moves(&self, c: &ZkConfig, auth: &Option<Auth>) -> bool {
        *auth != self.auth
            || c.hosts != self.cfg.hosts
            || c.root != self.cfg.root
            || c.node_prefix != self.cfg.node_prefix
            || c.session_timeout_ms != self.cfg.session_timeout_ms
    }

    /// Applies a command that arrived while not registered (yet).
    fn absorb(&mut self, cmd: Option<Cmd>) -> Next {
        match cmd {
            Some(Cmd::Publish(p)) => {
                self.payload = Some(p);
                Next::Continue
            }
            Some(Cmd::Reconfigure(c, a, p)) => {
                self.payload = Some(p);
                let moves = self.moves(&c, &a);
                self.cfg = c;
                self.auth = a;
                if moves {
                    Next::Move
                } else {
                    Next::Continue
                }
            }
            Some(Cmd::Detach) => {
                self.detached = true;
                Next::Stop
            }
            Some(Cmd::Deregister) | None => {
                self.deregistering = true;
                Next::Stop
            }
        }
    }

    /// Ends without closing any session: dropping a client would close its
    /// session, and with it the node. The process exits soon after.
    fn detach(&mut self, client: Option<zk::Client>) -> End {
        if let Some(c) = client {
            std::mem::forget(c);
        }
        if let Some(old) = self.old.take() {
            std::mem::forget(old);
        }
        log::info!("zookeeper: left {} for the next instance", self.node.as_deref().unwrap_or("no node"));
        End::Done
    }

    /// Deletes the node the previous instance left, now that ours exists.
    async fn retire_previous(&mut self, client: &zk::Client) {
        let Some(prev) = self.previous.take() else { return };
        if Some(&prev) == self.node.as_ref() {
            return;
        }
        match tokio::time::timeout(self.timeout(), client.delete(&prev, None)).await {
            Ok(Ok(())) => log::info!("zookeeper: deleted {prev}, the previous instance's node"),
            Ok(Err(zk::Error::NoNode)) => log::info!("zookeeper: the previous instance's node {prev} is gone already"),
            Ok(Err(e)) => log::warn!("zookeeper: cannot delete the previous instance's node {prev}: {e}; it expires with its session"),
            Err(_) => log::warn!("zookeeper: deleting the previous instance's node {prev} timed out; it expires with its session"),
        }
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let max = Duration::from_millis(self.cfg.max_retry_delay_ms.max(100));
        loop {
            // Nothing to do until the workers are ready.
            while self.payload.is_none() && !self.deregistering && !self.detached {
                let cmd = self.rx.recv().await;
                self.absorb(cmd);
            }
            if self.detached {
                self.detach(None);
                return;
            }
            if self.deregistering {
                self.deregister(None).await;
                return;
            }
            self.report(ZkState::Connecting);
            let hosts = self.cfg.hosts.clone();
            let timeout = self.timeout();
            let auth = self.auth.clone();
            let connecting = async move { connect(&hosts, timeout, auth.as_ref()).await };
            tokio::pin!(connecting);
            let client = loop {
                tokio::select! {
                    r = &mut connecting => break Some(r),
                    cmd = self.rx.recv() => match self.absorb(cmd) {
                        Next::Continue => {}
                        Next::Move | Next::Stop => break None,
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
                            cmd = self.rx.recv() => match self.absorb(cmd) {
                                Next::Continue => {}
                                Next::Move | Next::Stop => break,
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

    async fn session(&mut self, client: zk::Client) -> End {
        let mut states = client.state_watcher();
        let t = self.timeout();
        if let Some(a) = &self.auth {
            log::info!("zookeeper: session {} authenticated as digest user {:?}", client.session_id(), a.user);
        }
        self.report_event(if self.node.is_some() { ZkState::Registered } else { ZkState::Connecting }, Some("connected"));
        // Failed attempts are retried with backoff (a NoAuth, say, lasts
        // until an operator fixes an ACL or the credentials).
        let mut backoff = Duration::from_millis(500);
        let max = Duration::from_millis(self.cfg.max_retry_delay_ms.max(500));
        // Register, retrying while the session lives; commands are handled meanwhile.
        loop {
            if self.detached {
                return self.detach(Some(client));
            }
            if self.deregistering {
                return self.deregister(Some(client)).await;
            }
            let (cfg, payload) = (self.cfg.clone(), self.payload.clone().expect("payload"));
            let authed = self.auth.is_some();
            let failed = tokio::select! {
                r = tokio::time::timeout(t, register(&client, &cfg, authed, &payload)) => match r {
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
                    Ok(Err(zk::Error::NoAuth)) => {
                        format!("not allowed to create under {}: NoAuth{}", cfg.root, no_auth_hint(authed))
                    }
                    Ok(Err(e)) => format!("cannot register: {e}"),
                    Err(_) => "registration timed out".to_string(),
                },
                // A command aborts this attempt; a create already sent is
                // found again by the next one (same session), or goes with
                // the session when it closes.
                cmd = self.rx.recv() => match self.absorb(cmd) {
                    Next::Continue | Next::Stop => continue,
                    Next::Move => {
                        close(client).await;
                        return End::Moved;
                    }
                },
            };
            log::warn!("zookeeper: {failed}; retrying in {:.1}s", backoff.as_secs_f64());
            if client.state().is_terminated() {
                self.node = None;
                return End::Lost;
            }
            let sleep = tokio::time::sleep(backoff);
            backoff = (backoff * 2).min(max);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.rx.recv() => match self.absorb(cmd) {
                        Next::Continue => {}
                        Next::Stop => break,
                        Next::Move => {
                            close(client).await;
                            return End::Moved;
                        }
                    },
                }
            }
        }
        // Registered at the new place: now leave the old one.
        self.retire_old().await;
        self.retire_previous(&client).await;
        loop {
            tokio::select! {
                s = states.changed() => match s {
                    zk::SessionState::Disconnected => {
                        log::warn!("zookeeper: connection lost; the session (and the node) survive until it expires");
                        self.report_event(ZkState::Connecting, Some("disconnected"));
                    }
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        log::info!("zookeeper: reconnected (session {})", client.session_id());
                        self.report_event(ZkState::Registered, Some("reconnected"));
                    }
                    s if s.is_terminated() => {
                        log::warn!("zookeeper: session {} {s:?}; registering again in a new session", client.session_id());
                        self.node = None;
                        let event = match s {
                            zk::SessionState::Expired => "expired",
                            zk::SessionState::AuthFailed => "auth_failed",
                            _ => "closed",
                        };
                        self.report_event(ZkState::Connecting, Some(event));
                        return End::Lost;
                    }
                    _ => {}
                },
                cmd = self.rx.recv() => match cmd {
                    Some(Cmd::Publish(p)) => {
                        self.payload = Some(p);
                        self.update(&client).await;
                    }
                    Some(Cmd::Reconfigure(c, a, p)) => {
                        self.payload = Some(p);
                        if !self.moves(&c, &a) {
                            self.cfg = c;
                            self.update(&client).await;
                            continue;
                        }
                        // Register at the new place first, then leave this
                        // one: no window without a registration.
                        log::info!("zookeeper: moving registration from {} {} to {} {}", self.cfg.hosts, self.cfg.root, c.hosts, c.root);
                        if a != self.auth {
                            let who = |a: &Option<Auth>| a.as_ref().map_or("no credentials".to_string(), |a| format!("digest user {:?}", a.user));
                            log::info!("zookeeper: zookeeper.auth_file changed: new session as {} (was {})", who(&a), who(&self.auth));
                        }
                        self.cfg = c;
                        self.auth = a;
                        self.retire_old().await;
                        self.old = Some((client, self.node.take()));
                        return End::Moved;
                    }
                    Some(Cmd::Detach) => {
                        self.detached = true;
                        return self.detach(Some(client));
                    }
                    Some(Cmd::Deregister) | None => {
                        self.deregistering = true;
                        return self.deregister(Some(client)).await;
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

    /// Deletes the node we moved away from and closes its session.
    async fn retire_old(&mut self) {
        let Some((client, node)) = self.old.take() else { return };
        if let Some(node) = node {
            match tokio::time::timeout(self.timeout(), client.delete(&node, None)).await {
                Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => log::info!("zookeeper: deleted the old registration {node}"),
                Ok(Err(e)) => log::warn!("zookeeper: cannot delete the old registration {node}: {e}; it expires with its session"),
                Err(_) => log::warn!("zookeeper: deleting the old registration {node} timed out; it expires with its session"),
            }
        }
        close(client).await;
    }

    /// Marks our node(s) draining, deletes them, closes the session(s),
    /// waits `deregister_delay_ms` if there was a node, reports `deregistered`.
    async fn deregister(&mut self, client: Option<zk::Client>) -> End {
        let t = Duration::from_secs(2).min(self.timeout());
        let mut regs = Vec::new();
        if let Some(c) = client {
            regs.push((c, self.node.take()));
        }
        regs.extend(self.old.take());
        let mut had_node = false;
        for (client, node) in &regs {
            let Some(node) = node else { continue };
            had_node = true;
            let _ = tokio::time::timeout(t, async {
                let (data, stat) = client.get_data(node).await?;
                let mut v: Value = serde_json::from_slice(&data).unwrap_or_else(|_| self.payload.clone().unwrap_or(Value::Null));
                if v.is_object() {
                    v["state"] = Value::from("draining");
                    client.set_data(node, &serde_json::to_vec(&v).unwrap_or_default(), Some(stat.version)).await?;
                }
                Ok::<(), zk::Error>(())
            })
            .await;
            match tokio::time::timeout(t, client.delete(node, None)).await {
                Ok(Ok(())) | Ok(Err(zk::Error::NoNode)) => log::info!("zookeeper: deregistered {node}"),
                Ok(Err(e)) => log::warn!("zookeeper: cannot delete {node}: {e}; it expires with the session"),
                Err(_) => log::warn!("zookeeper: deleting {node} timed out; it expires with the session"),
            }
        }
        for (client, _) in regs {
            close(client).await;
        }
        if had_node {
            tokio::time::sleep(Duration::from_millis(self.cfg.deregister_delay_ms)).await;
        }
        self.report(ZkState::Deregistered);
        End::Done
    }
}

/// Creates our node in this session, unless this session has one already
/// (a create whose answer was lost, or an earlier attempt): then its data is
/// brought up to date. Deletes nodes of this daemon that older sessions left
/// (a restarted server restores them until they time out). Returns the path.
/// `authenticated`: the session has digest credentials, so what is created
/// gets [`crate::zk::CREATOR_ALL_ANYONE_READ`].
async fn register(client: &zk::Client, cfg: &ZkConfig, authenticated: bool, payload: &Value) -> Result<String, zk::Error> {
    // Never advertise a wildcard address: clients could not reach it.
    let host = payload.get("host").and_then(|h| h.as_str()).unwrap_or("");
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        return Err(zk::Error::BadArguments(&"the advertised host is empty or a wildcard address; set server.advertise"));
    }
    let data = serde_json::to_vec(payload).unwrap_or_default();
    if cfg.root != "/" {
        client.mkdir(&cfg.root, &persistent(authenticated)).await?;
    }
    let sid = client.session_id().0;
    let found = ours(client, cfg, payload).await?;
    let mut mine = found.iter().filter(|n| n.owner == sid);
    let path = match mine.next() {
        Some(n) => {
            if n.data != data {
                client.set_data(&n.path, &data, None).await?;
            }
            n.path.clone()
        }
        None => {
            let prefix = join(&cfg.root, &cfg.node_prefix);
            let (_, seq) = client.create(&prefix, &data, &ephemeral_sequential(authenticated)).await?;
            format!("{prefix}{seq}")
        }
    };
    // Anything else of ours goes: extra nodes of this session (never two),
    // and nodes of older sessions.
    for n in found.iter().filter(|n| n.path != path) {
        match client.delete(&n.path, None).await {
            Ok(()) if n.owner == sid => log::warn!("zookeeper: deleted a second node {} of this session", n.path),
            Ok(()) => log::warn!("zookeeper: deleted stale node {} of an old session", n.path),
            Err(zk::Error::NoNode) => {}
            Err(e) => log::warn!("zookeeper: cannot delete stale node {}: {e}", n.path),
        }
    }
    Ok(path)
}

struct Ours {
    path: String,
    owner: i64,
    data: Vec<u8>,
}

/// Ephemeral nodes under root that are ours: owned by this session, or
/// describing this daemon (same pid, start time, host and port).
async fn ours(client: &zk::Client, cfg: &ZkConfig, me: &Value) -> Result<Vec<Ours>, zk::Error> {
    let key = |v: &Value| (v.get("pid").cloned(), v.get("started").cloned(), v.get("host").cloned(), v.get("port").cloned());
    let mine = key(me);
    let sid = client.session_id().0;
    let mut out = Vec::new();
    let mut children = match client.list_children(&cfg.root).await {
        Ok(c) => c,
        Err(zk::Error::NoNode) => return Ok(out),
        Err(e) => return Err(e),
    };
    children.sort();
    for c in children {
        if !c.starts_with(&cfg.node_prefix) {
            continue;
        }
        let path = join(&cfg.root, &c);
        let (data, stat) = match client.get_data(&path).await {
            Ok(r) => r,
            Err(zk::Error::NoNode) => continue,
            Err(e) => return Err(e),
        };
        if stat.ephemeral_owner == 0 {
            continue;
        }
        let same_daemon = || serde_json::from_slice::<Value>(&data).is_ok_and(|v| key(&v) == mine);
        if stat.ephemeral_owner == sid || same_daemon() {
            out.push(Ours { path, owner: stat.ephemeral_owner, data });
        }
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(hosts: &str, advertise: Option<&str>) -> Config {
        let mut c = Config::default();
        c.zookeeper.hosts = hosts.into();
        c.server.advertise = advertise.map(String::from);
        c
    }

    #[test]
    fn a_wildcard_is_never_advertised() {
        let any4: SocketAddr = "0.0.0.0:8001".parse().unwrap();
        let any6: SocketAddr = "[::]:8001".parse().unwrap();
        // The local address that routes to the first ZooKeeper host (no packet is sent).
        assert_eq!(advertised(&cfg("127.0.0.1:2181,10.9.9.9:2181/chroot", None), any4).unwrap(), ("127.0.0.1".into(), 8001));
        assert_eq!(advertised(&cfg("tcp://127.0.0.1:2181", None), any4).unwrap(), ("127.0.0.1".into(), 8001));
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            assert_eq!(advertised(&cfg("[::1]:2181", None), any6).unwrap(), ("::1".into(), 8001));
        }
        // A concrete bound address as is; server.advertise wins.
        assert_eq!(advertised(&cfg("127.0.0.1:2181", None), "127.0.0.2:9".parse().unwrap()).unwrap(), ("127.0.0.2".into(), 9));
        assert_eq!(advertised(&cfg("127.0.0.1:2181", Some("127.0.0.3:7000")), any4).unwrap(), ("127.0.0.3".into(), 7000));
        assert_eq!(advertised(&cfg("127.0.0.1:2181", Some("[::1]:7000")), any4).unwrap(), ("::1".into(), 7000));
    }
}
