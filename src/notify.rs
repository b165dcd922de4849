//! sd_notify messages to the service manager (no-ops without `NOTIFY_SOCKET`).
//!
//! Messages are formatted by the `sd-notify` crate but sent without
//! blocking: the crate's blocking send would wedge the master's loop when
//! the manager's queue is full. A message that cannot be sent now is kept
//! and retried by [`flush`] on the next tick, in order; only the newest
//! `STATUS=` text is kept of those that pile up. Descriptors for the file
//! descriptor store ([`store_fd`]) travel with their message (SCM_RIGHTS).

use sd_notify::NotifyState;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

/// A message, with the descriptor it carries (a duplicate, owned until sent).
type Message = (String, Option<OwnedFd>);

thread_local! {
    static PENDING: RefCell<VecDeque<Message>> = const { RefCell::new(VecDeque::new()) };
    static SOCKET: RefCell<Option<UnixDatagram>> = const { RefCell::new(None) };
}

const MAX_PENDING: usize = 64;

fn try_send(msg: &str, fd: Option<&OwnedFd>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    SOCKET.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let sock = UnixDatagram::unbound()?;
            sock.set_nonblocking(true)?;
            *s = Some(sock);
        }
        let sock = s.as_ref().unwrap();
        let addr = match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(abs) => UnixAddr::new_abstract(abs),
            None => UnixAddr::new(std::path::Path::new(&path)),
        }?;
        let fds = fd.map(|fd| [fd.as_raw_fd()]);
        let cmsgs: &[ControlMessage] = match &fds {
            Some(fds) => &[ControlMessage::ScmRights(fds)],
            None => &[],
        };
        sendmsg(sock.as_raw_fd(), &[std::io::IoSlice::new(msg.as_bytes())], cmsgs, MsgFlags::empty(), Some(&addr))?;
        Ok(())
    })
}

fn send(states: &[NotifyState]) {
    send_with(states, None);
}

fn send_with(states: &[NotifyState], fd: Option<OwnedFd>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        // A newer status replaces an unsent one.
        if msg.starts_with("STATUS=") && msg.lines().count() == 1 {
            p.retain(|(m, _)| !(m.starts_with("STATUS=") && m.lines().count() == 1));
        }
        if p.len() >= MAX_PENDING {
            // Never the store's messages: dropping one would lose a socket.
            match p.iter().position(|(m, fd)| fd.is_none() && !m.starts_with("FDSTOREREMOVE=")) {
                Some(i) => log::warn!("sd_notify: the service manager is not reading; dropping {:?}", p.remove(i).map(|m| m.0)),
                None => log::warn!("sd_notify: the service manager is not reading; {} messages wait", p.len()),
            }
        }
        p.push_back((msg, fd));
    });
    flush();
}

/// Sends what is pending, in order, until the socket would block.
pub fn flush() {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        while let Some((m, fd)) = p.front() {
            match try_send(m, fd.as_ref()) {
                Ok(()) => {
                    p.pop_front();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("sd_notify failed: {e}");
                    p.pop_front();
                }
            }
        }
    });
}

/// True while messages wait to be sent.
pub fn pending() -> bool {
    PENDING.with(|p| !p.borrow().is_empty())
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::MainPid(std::process::id()), NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Hands a duplicate of `fd` to the service manager's file descriptor
/// store under `name` (`FDSTORE=1`, `FDNAME=`; kept only with
/// `FileDescriptorStoreMax=` > 0).
pub fn store_fd(name: &str, fd: BorrowedFd<'_>) {
    match fd.try_clone_to_owned() {
        Ok(dup) => send_with(&[NotifyState::Custom("FDSTORE=1"), NotifyState::Custom(&format!("FDNAME={name}"))], Some(dup)),
        Err(e) => log::warn!("cannot store {name} with the service manager: {e}"),
    }
}

/// Removes what the store holds under `name` (`FDSTOREREMOVE=1`).
pub fn remove_stored(name: &str) {
    send(&[NotifyState::Custom("FDSTOREREMOVE=1"), NotifyState::Custom(&format!("FDNAME={name}"))]);
}

/// Waits (up to `limit`) until the service manager has processed every
/// message sent before this one (`BARRIER=1`, as `sd_notify_barrier`): a
/// process that exits right after sending may otherwise have its last
/// messages dropped. False if it did not answer in time.
pub fn barrier(limit: std::time::Duration) -> bool {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return true;
    }
    let Ok((rd, wr)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else { return false };
    // The write end goes with the message; the manager closes it once it
    // has got this far.
    send_with(&[NotifyState::Custom("BARRIER=1")], Some(wr));
    let until = std::time::Instant::now() + limit;
    loop {
        flush();
        let mut fds = [nix::poll::PollFd::new(rd.as_fd(), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10u16));
        if fds[0].revents().is_some_and(|r| r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLIN)) && !pending() {
            return true;
        }
        if std::time::Instant::now() >= until {
            log::warn!("the service manager did not confirm the last messages within {} ms", limit.as_millis());
            return false;
        }
    }
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// The watchdog interval requested by the service manager, if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(std::time::Duration::from_micros(usec))
    } else {
        None
    }
}

/// Variables that must not leak into worker processes.
pub const ENV_VARS: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];
