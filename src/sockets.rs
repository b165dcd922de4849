//! Sockets passed to rpcd at start, and the listener handed back to the
//! service manager (SPEC §6: restarts lose nothing).
//!
//! systemd passes descriptors in `LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`:
//! from its file descriptor store (what an earlier instance stored with
//! `FDSTORE=1`, under the names [`LISTEN_NAME`] and [`CONTROL_NAME`]), or from
//! a `.socket` unit (socket activation). The master adopts the TCP listener
//! whose address is `server.listen` and the unix listener at
//! `control.socket`; the rest is closed and removed from the store. A
//! listener rpcd binds itself is stored at once, so that a restart, or a
//! crash restart, finds it there: connects made meanwhile wait in the
//! kernel's backlog instead of being refused.

use socket2::{SockRef, Type};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The store's name for the TCP listener (`FDNAME=listen`).
pub const LISTEN_NAME: &str = "listen";
/// The store's name for the control socket.
pub const CONTROL_NAME: &str = "control";

/// Where a listener came from (`rpcctl status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Bound by this instance.
    Bound,
    /// Adopted from systemd's file descriptor store.
    Store,
    /// Adopted from a `.socket` unit.
    Activation,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Bound => "bound",
            Origin::Store => "fd store",
            Origin::Activation => "socket activation",
        }
    }
}

/// The descriptors passed at start, until adopted or discarded.
#[derive(Default)]
pub struct Passed {
    fds: Vec<(OwnedFd, String)>,
}

impl Passed {
    /// Takes the descriptors passed to this process (none unless
    /// `LISTEN_PID` is ours) and clears the variables, so that no child
    /// sees them.
    pub fn from_env() -> Passed {
        match sd_notify::listen_fds_with_names(true) {
            // SAFETY: LISTEN_FDS hands these descriptors to this process
            // (LISTEN_PID checked); nothing else owns them.
            Ok(fds) => Passed { fds: fds.map(|(fd, name)| (unsafe { OwnedFd::from_raw_fd(fd) }, name)).collect() },
            Err(e) => {
                // What the store holds under our names cannot be adopted:
                // clear it, so that what we store next is all it holds.
                log::warn!("ignoring the passed descriptors: {e}");
                crate::notify::remove_stored(LISTEN_NAME);
                crate::notify::remove_stored(CONTROL_NAME);
                Passed::default()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The passed TCP listener bound to `addr`, if any.
    pub fn take_listener(&mut self, addr: SocketAddr) -> Option<(TcpListener, Origin)> {
        let i = self.fds.iter().position(|(fd, _)| {
            let s = SockRef::from(fd);
            s.r#type().ok() == Some(Type::STREAM) && s.is_listener().unwrap_or(false) && s.local_addr().ok().and_then(|a| a.as_socket()) == Some(addr)
        })?;
        let (fd, name) = self.fds.remove(i);
        Some((TcpListener::from(fd), origin_of(&name)))
    }

    /// The passed unix listener bound to `path`, if any and if `path` is
    /// still a socket (a stopped instance removes it: then the descriptor
    /// is unreachable and a fresh socket is bound instead).
    pub fn take_control(&mut self, path: &Path) -> Option<(UnixListener, Origin)> {
        let i = self.fds.iter().position(|(fd, _)| {
            let s = SockRef::from(fd);
            s.r#type().ok() == Some(Type::STREAM)
                && s.is_listener().unwrap_or(false)
                && s.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)).as_deref() == Some(path)
        })?;
        if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return None;
        }
        let (fd, name) = self.fds.remove(i);
        Some((UnixListener::from(fd), origin_of(&name)))
    }

    /// The descriptor passed under `name` (the store's memfds).
    pub fn take_named(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(_, n)| n == name)?;
        Some(self.fds.remove(i).0)
    }

    /// The descriptors passed under names starting with `prefix`.
    pub fn take_prefixed(&mut self, prefix: &str) -> Vec<(String, OwnedFd)> {
        let (taken, rest) = std::mem::take(&mut self.fds).into_iter().partition(|(_, n)| n.starts_with(prefix));
        self.fds = rest;
        taken.into_iter().map(|(fd, n)| (n, fd)).collect()
    }

    /// Closes what was not adopted, and removes it from the store.
    pub fn discard(self) {
        let mut names: Vec<String> = Vec::new();
        for (fd, name) in self.fds {
            let what = SockRef::from(&fd).local_addr().ok().map(|a| match (a.as_socket(), a.as_pathname()) {
                (Some(s), _) => s.to_string(),
                (None, Some(p)) => p.display().to_string(),
                _ => "another kind of descriptor".to_string(),
            });
            log::info!("closing passed descriptor {name:?} ({}): not the configured listener or control socket", what.unwrap_or_else(|| "not a socket".into()));
            if !names.contains(&name) {
                names.push(name);
            }
        }
        for name in names {
            crate::notify::remove_stored(&name);
        }
    }
}

fn origin_of(name: &str) -> Origin {
    if name == LISTEN_NAME || name == CONTROL_NAME {
        Origin::Store
    } else {
        Origin::Activation
    }
}

/// Hands a listener this instance bound to the store under `name`. At
/// start the store holds nothing under it any more (whatever it held was
/// passed, and [`Passed::discard`] removed what was not adopted, or
/// [`Passed::from_env`] cleared our names when the variables were bad); a
/// reload that replaces a stored listener removes the old one first.
pub fn store(name: &str, fd: impl AsFd) {
    crate::notify::store_fd(name, fd.as_fd());
}
