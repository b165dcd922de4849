//! Discovery: which servers are alive, as ZooKeeper says.
//!
//! A background task watches the root's children (one-shot watches re-armed
//! after every event, the list re-read after every reconnect), keeps the
//! last known list while ZooKeeper is unreachable, ignores unparsable nodes
//! with a warning and skips servers that are draining.

use crate::zk::{connect, join};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::watch;
use zookeeper_client as zk;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Server {
    pub node: String,
    pub host: String,
    pub port: u16,
    pub data: Value,
}

impl Server {
    /// Whether its node says it speaks TLS (`"tls": true`, SPEC §9).
    pub fn tls(&self) -> bool {
        self.data.get("tls").and_then(|t| t.as_bool()).unwrap_or(false)
    }

    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where a client finds its servers.
#[derive(Clone)]
pub enum Servers {
    Static(Vec<Server>),
    /// `None` until the first listing arrives.
    Zk(watch::Receiver<Option<Vec<Server>>>),
}

impl Servers {
    /// A fixed `host:port`.
    pub fn fixed(addr: &str) -> Servers {
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        Servers::Static(vec![Server {
            node: String::new(),
            host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
            port: port.parse().unwrap_or(0),
            data: Value::Null,
        }])
    }

    /// Watches `root` in the ZooKeeper ensemble `hosts`.
    pub fn watch(hosts: &str, root: &str) -> Servers {
        let (tx, rx) = watch::channel(None);
        tokio::spawn(run(hosts.to_string(), root.to_string(), tx));
        Servers::Zk(rx)
    }

    /// The current list (waits up to 10 s for the first one).
    pub async fn current(&self) -> Vec<Server> {
        match self {
            Servers::Static(v) => v.clone(),
            Servers::Zk(rx) => {
                let mut rx = rx.clone();
                let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.is_some())).await;
                let list = rx.borrow().clone();
                list.unwrap_or_default()
            }
        }
    }

    /// Waits for the first listing; an error if ZooKeeper cannot be reached.
    pub async fn first(&self, timeout: Duration) -> Result<Vec<Server>, String> {
        match self {
            Servers::Static(v) => Ok(v.clone()),
            Servers::Zk(rx) => {
                let mut rx = rx.clone();
                let got = tokio::time::timeout(timeout, rx.wait_for(|v| v.is_some())).await;
                let ok = matches!(got, Ok(Ok(_)));
                drop(got);
                if ok {
                    let list = rx.borrow().clone();
                    Ok(list.unwrap_or_default())
                } else {
                    Err(format!("no answer from ZooKeeper within {timeout:?}"))
                }
            }
        }
    }
}

/// Parses a node's data as the original clients do: JSON with host and port.
pub fn parse_node(node: &str, data: &[u8]) -> Result<Server, String> {
    let v: Value = serde_json::from_slice(data).map_err(|e| format!("not JSON: {e}"))?;
    let host = v.get("host").and_then(|h| h.as_str()).ok_or("no \"host\" string")?.to_string();
    let port = v.get("port").and_then(|p| p.as_u64()).filter(|p| *p > 0 && *p < 65536).ok_or("no valid \"port\"")? as u16;
    Ok(Server { node: node.to_string(), host, port, data: v })
}

async fn read_servers(client: &zk::Client, root: &str, mut children: Vec<String>, warned: &mut HashSet<String>) -> Vec<Server> {
    // By sequence number: the last 10 characters of a sequential node's name.
    children.sort_by(|a, b| {
        let seq = |s: &str| {
            let n = s.chars().count();
            s.chars().skip(n.saturating_sub(10)).collect::<String>()
        };
        seq(a).cmp(&seq(b)).then(a.cmp(b))
    });
    let mut out = Vec::new();
    for child in children {
        let path = join(root, &child);
        let data = match tokio::time::timeout(Duration::from_secs(5), client.get_data(&path)).await {
            Ok(Ok((d, _))) => d,
            _ => continue, // deleted meanwhile, or unreachable: skip
        };
        match parse_node(&path, &data) {
            Ok(s) if s.data.get("state").and_then(|x| x.as_str()) == Some("draining") => {}
            Ok(s) => out.push(s),
            Err(e) => {
                if warned.insert(path.clone()) {
                    log::warn!("ignoring ZooKeeper node {path}: {e}");
                }
            }
        }
    }
    out
}

async fn run(hosts: String, root: String, tx: watch::Sender<Option<Vec<Server>>>) {
    let mut backoff = Duration::from_millis(100);
    let mut warned = HashSet::new();
    loop {
        let client = match connect(&hosts, Duration::from_secs(10), None).await {
            Ok(c) => c,
            Err(e) => {
                log::debug!("discovery: {e}; retrying in {backoff:?}");
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut states = client.state_watcher();
        loop {
            if tx.is_closed() {
                return;
            }
            match client.list_and_watch_children(&root).await {
                Ok((children, w)) => {
                    let list = read_servers(&client, &root, children, &mut warned).await;
                    tx.send_replace(Some(list));
                    let reconnected = async {
                        loop {
                            match states.changed().await {
                                zk::SessionState::SyncConnected => return false,
                                s if s.is_terminated() => return true,
                                _ => {}
                            }
                        }
                    };
                    tokio::select! {
                        ev = w.changed() => {
                            if ev.event_type == zk::EventType::Session { break; }
                        }
                        terminated = reconnected => {
                            if terminated { break; }
                            // Reconnected: re-list (events may have been missed).
                        }
                    }
                }
                Err(zk::Error::NoNode) => {
                    tx.send_replace(Some(Vec::new()));
                    match client.check_and_watch_stat(&root).await {
                        Ok((Some(_), _)) => continue,
                        Ok((None, w)) => {
                            let ev = w.changed().await;
                            if ev.event_type == zk::EventType::Session {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => break,
                Err(e) => {
                    log::debug!("discovery: listing {root}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        log::debug!("discovery: session ended; reconnecting");
    }
}
