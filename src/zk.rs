//! Shared ZooKeeper helpers for the registrar and discovery.

use std::time::Duration;
use zookeeper_client as zk;

pub const PERSISTENT: zk::CreateOptions<'static> = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
pub const EPHEMERAL_SEQUENTIAL: zk::CreateOptions<'static> =
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());

/// `zookeeper.auth_file`: credentials for ZooKeeper's `digest` scheme
/// (SPEC §9). (Stub: to be completed with the file's checks.)
#[derive(Clone, PartialEq)]
pub struct Auth {
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "Auth {{ user: {:?}, password: <hidden> }}", self.user)
    }
}

impl Auth {
    /// Reads `user:password` from `path`.
    pub fn load(path: &std::path::Path) -> Result<Auth, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let line = text.trim_end_matches(['\n', '\r']);
        let (user, password) = line.split_once(':').ok_or_else(|| format!("{}: expected user:password", path.display()))?;
        Ok(Auth { user: user.to_string(), password: password.to_string() })
    }

    /// The bytes of `add_auth("digest", ...)`.
    pub fn digest(&self) -> Vec<u8> {
        format!("{}:{}", self.user, self.password).into_bytes()
    }
}

/// Splits `h1:2181,h2:2181/chroot` into the hosts and the chroot ("" if none).
/// The `//` of a per-host scheme (`tcp://h1:2181`) does not start a chroot.
pub fn split_chroot(connect: &str) -> (&str, &str) {
    let b = connect.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"://") {
            i += 3;
            continue;
        }
        if b[i] == b'/' {
            return (&connect[..i], connect[i..].trim_end_matches('/'));
        }
        i += 1;
    }
    (connect, "")
}

/// Opens a session. A missing chroot node is created first, so that a
/// connect string with a chroot works on an empty ensemble.
pub async fn connect(connect: &str, session_timeout: Duration) -> Result<zk::Client, String> {
    let (hosts, chroot) = split_chroot(connect);
    let client = zk::Client::connector()
        .with_session_timeout(session_timeout)
        .connect(hosts)
        .await
        .map_err(|e| format!("cannot connect to ZooKeeper at {hosts}: {e}"))?;
    if chroot.is_empty() {
        return Ok(client);
    }
    match tokio::time::timeout(session_timeout, client.mkdir(chroot, &PERSISTENT)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("cannot create chroot {chroot}: {e}")),
        Err(_) => return Err(format!("timed out creating chroot {chroot}")),
    }
    client.chroot(chroot.to_string()).map_err(|_| format!("invalid chroot \"{chroot}\""))
}

/// Joins a parent path and a child name.
pub fn join(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chroot_is_split_off_after_the_last_host() {
        assert_eq!(split_chroot("127.0.0.1:2181"), ("127.0.0.1:2181", ""));
        assert_eq!(split_chroot("a:1,b:2/x/y/"), ("a:1,b:2", "/x/y"));
        assert_eq!(split_chroot("[::1]:2181/x"), ("[::1]:2181", "/x"));
        assert_eq!(split_chroot("tcp://a:1,tcp+tls://b:2"), ("tcp://a:1,tcp+tls://b:2", ""));
        assert_eq!(split_chroot("tcp://a:1,tcp://b:2/x"), ("tcp://a:1,tcp://b:2", "/x"));
    }
}
