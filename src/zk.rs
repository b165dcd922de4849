//! Shared ZooKeeper helpers for the registrar and discovery.

use std::path::Path;
use std::time::Duration;
use zookeeper_client as zk;

/// What rpcd creates without `zookeeper.auth_file`: open to everyone, as
/// before SPEC §9.
pub const PERSISTENT: zk::CreateOptions<'static> = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
pub const EPHEMERAL_SEQUENTIAL: zk::CreateOptions<'static> =
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());

/// The ACL of what an authenticated rpcd creates (SPEC §9): all rights for
/// the session's own identity (`auth` scheme, which the server turns into
/// `digest:USER:HASH`), read for everyone else, so that discovery clients
/// keep working and nobody else can delete, overwrite or re-point the
/// registration.
pub static CREATOR_ALL_ANYONE_READ: [zk::Acl; 2] = [
    zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
    zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
];

/// The ACLs for what rpcd creates: [`CREATOR_ALL_ANYONE_READ`] in an
/// authenticated session, world-all otherwise.
pub fn acls(authenticated: bool) -> zk::Acls<'static> {
    match authenticated {
        true => zk::Acls::new(&CREATOR_ALL_ANYONE_READ),
        false => zk::Acls::anyone_all(),
    }
}

/// Options for the persistent parents rpcd creates (root, chroot).
pub fn persistent(authenticated: bool) -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(acls(authenticated))
}

/// Options for the registration node.
pub fn ephemeral_sequential(authenticated: bool) -> zk::CreateOptions<'static> {
    zk::CreateMode::EphemeralSequential.with_acls(acls(authenticated))
}

/// `zookeeper.auth_file`: credentials for ZooKeeper's `digest` scheme
/// (SPEC §9). The password shows in no log line, error or `Debug` output.
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
    /// Reads `user:password` (one line; a final newline is allowed) from
    /// `path`. Refuses a file that "other" may read or write (mode & 0o007),
    /// and names the file in every error; never quotes the password.
    pub fn load(path: &Path) -> Result<Auth, String> {
        use std::os::unix::fs::MetadataExt;
        let p = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {p}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{p} is not a regular file"));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o007 != 0 {
            let what = match (mode & 0o004 != 0, mode & 0o002 != 0) {
                (true, true) => "readable and writable",
                (true, false) => "readable",
                (false, true) => "writable",
                (false, false) => "executable",
            };
            return Err(format!(
                "{p} is {what} by others (mode {mode:04o}); chmod {:04o} it (rpcd refuses credentials that others than the file's owner and group may read or change)",
                mode & 0o7770
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {p}: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|_| format!("{p} is not UTF-8 text"))?;
        let line = text.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&text);
        if line.contains('\n') {
            return Err(format!("{p} must hold one line, user:password (it has more lines)"));
        }
        let Some((user, password)) = line.split_once(':') else {
            return Err(match line.is_empty() {
                true => format!("{p} is empty; expected one line, user:password"),
                false => format!("{p}: expected one line, user:password (no ':' found)"),
            });
        };
        if user.is_empty() {
            return Err(format!("{p}: the user (before the ':') is empty"));
        }
        if password.is_empty() {
            return Err(format!("{p}: the password (after the ':') is empty"));
        }
        if user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{p}: the user contains whitespace or control characters"));
        }
        if password.starts_with(char::is_whitespace) || password.ends_with(char::is_whitespace) {
            return Err(format!("{p}: the password starts or ends with whitespace"));
        }
        if password.chars().any(|c| c.is_control()) {
            return Err(format!("{p}: the password contains control characters"));
        }
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

/// Opens a session, authenticated with `auth` (digest) if given: the
/// credentials go with the connect request, and the client sends them again
/// on every reconnect of the session, before any other request. A missing
/// chroot node is created first (with [`persistent`]'s ACLs), so that a
/// connect string with a chroot works on an empty ensemble.
pub async fn connect(connect: &str, session_timeout: Duration, auth: Option<&Auth>) -> Result<zk::Client, String> {
    let (hosts, chroot) = split_chroot(connect);
    let mut connector = zk::Client::connector().with_session_timeout(session_timeout);
    if let Some(a) = auth {
        connector = connector.with_auth("digest", &a.digest());
    }
    let client = connector.connect(hosts).await.map_err(|e| match (e, auth) {
        (zk::Error::AuthFailed, Some(a)) => format!("ZooKeeper at {hosts} refused the digest credentials of user {:?}: AuthFailed", a.user),
        (e, _) => format!("cannot connect to ZooKeeper at {hosts}: {e}"),
    })?;
    if chroot.is_empty() {
        return Ok(client);
    }
    match tokio::time::timeout(session_timeout, client.mkdir(chroot, &persistent(auth.is_some()))).await {
        Ok(Ok(())) => {}
        Ok(Err(zk::Error::NoAuth)) => return Err(format!("not allowed to create the chroot {chroot}: NoAuth{}", no_auth_hint(auth.is_some()))),
        Ok(Err(e)) => return Err(format!("cannot create chroot {chroot}: {e}")),
        Err(_) => return Err(format!("timed out creating chroot {chroot}")),
    }
    client.chroot(chroot.to_string()).map_err(|_| format!("invalid chroot \"{chroot}\""))
}

/// What to say after a NoAuth on a create: ZooKeeper's digest
/// authentication itself never fails (other credentials are just another
/// identity), so a NoAuth is where a wrong identity shows.
pub fn no_auth_hint(authenticated: bool) -> &'static str {
    match authenticated {
        true => " — does zookeeper.auth_file hold the identity the root's ACL names?",
        false => " — the ACL there does not let an unauthenticated session create; set zookeeper.auth_file to the identity it names",
    }
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

    fn auth_file(dir: &tempfile::TempDir, text: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join("zookeeper.auth");
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn auth_file_is_one_line_user_colon_password() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["rpcd:s3cret\n", "rpcd:s3cret", "rpcd:s3cret\r\n"] {
            let a = Auth::load(&auth_file(&dir, text, 0o640)).unwrap();
            assert_eq!(a.user, "rpcd");
            assert_eq!(a.digest(), b"rpcd:s3cret");
        }
        // The password may hold ':' and inner spaces (ZooKeeper splits at the first ':').
        let a = Auth::load(&auth_file(&dir, "rpcd:a:b c\n", 0o600)).unwrap();
        assert_eq!(a.digest(), b"rpcd:a:b c");
        assert_eq!(Auth::load(&auth_file(&dir, "u:p", 0o400)).unwrap().user, "u");
    }

    #[test]
    fn auth_file_format_errors_name_the_file_and_never_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("", "is empty"),
            ("\n", "is empty"),
            ("hunter2\n", "no ':' found"),
            (":hunter2\n", "the user (before the ':') is empty"),
            ("rpcd:\n", "the password (after the ':') is empty"),
            ("rpcd:hunter2\nother:hunter2\n", "must hold one line"),
            ("rpcd:hunter2\n\n", "must hold one line"),
            (" rpcd:hunter2\n", "the user contains whitespace"),
            ("rp cd:hunter2\n", "the user contains whitespace"),
            ("rpcd: hunter2\n", "starts or ends with whitespace"),
            ("rpcd:hunter2 \n", "starts or ends with whitespace"),
            ("rpcd:hunter2\t\n", "starts or ends with whitespace"),
            ("rpcd:hun\u{7}ter2\n", "control characters"),
        ];
        for (text, want) in cases {
            let p = auth_file(&dir, text, 0o640);
            let e = Auth::load(&p).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(e.contains(&p.display().to_string()), "{text:?}: {e}");
            assert!(!e.contains("hunter2") && !e.contains("hun"), "{text:?} leaks the password: {e}");
        }
        let missing = dir.path().join("missing");
        assert!(Auth::load(&missing).unwrap_err().starts_with(&format!("cannot read {}", missing.display())));
        assert!(Auth::load(dir.path()).unwrap_err().contains("is not a regular file"));
    }

    #[test]
    fn auth_file_readable_or_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (0o644, "is readable by others (mode 0644); chmod 0640 it"),
            (0o604, "is readable by others (mode 0604); chmod 0600 it"),
            (0o666, "is readable and writable by others (mode 0666); chmod 0660 it"),
            (0o642, "is writable by others (mode 0642); chmod 0640 it"),
            (0o641, "is executable by others (mode 0641); chmod 0640 it"),
        ];
        for (mode, want) in cases {
            let p = auth_file(&dir, "rpcd:hunter2\n", mode);
            let e = Auth::load(&p).unwrap_err();
            assert!(e.starts_with(&p.display().to_string()), "{mode:o}: {e}");
            assert!(e.contains(want), "{mode:o}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        // Owner and group only: fine.
        for mode in [0o600, 0o640, 0o660, 0o440] {
            assert!(Auth::load(&auth_file(&dir, "rpcd:hunter2\n", mode)).is_ok(), "{mode:o}");
        }
    }

    #[test]
    fn auth_debug_hides_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let a = Auth::load(&auth_file(&dir, "rpcd:hunter2\n", 0o640)).unwrap();
        let d = format!("{a:?} {:?}", Some(a.clone()));
        assert!(d.contains("rpcd") && !d.contains("hunter2"), "{d}");
    }

    #[test]
    fn acls_are_creator_all_and_world_read_only_with_auth() {
        let with: &[zk::Acl] = &acls(true);
        assert_eq!(with.len(), 2);
        assert_eq!((with[0].scheme(), with[0].id(), with[0].permission()), ("auth", "", zk::Permission::ALL));
        assert_eq!((with[1].scheme(), with[1].id(), with[1].permission()), ("world", "anyone", zk::Permission::READ));
        let without: &[zk::Acl] = &acls(false);
        assert_eq!(without, &zk::Acls::anyone_all() as &[zk::Acl]);
    }
}
