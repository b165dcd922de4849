//! A restart hands over instead of stopping (SPEC §6): what the stopping
//! instance passes to the next one through the service manager's file
//! descriptor store, and the channel messages that carry connections.
//!
//! - **When.** SIGTERM while the service manager runs a *restart* job for
//!   our unit ([`restart_pending`]: `systemctl restart`, a package upgrade's
//!   restart, `try-restart`), or `rpcctl stop --restart`. Any other stop, or
//!   a failed query, is the graceful stop.
//! - **Connections.** Each worker stops accepting, finishes what is in
//!   flight, and at a frame boundary passes each idle connection (with the
//!   bytes of a frame partly received) to the master over its channel
//!   (`conn HEX` + the descriptor, SCM_RIGHTS). The master stores each as
//!   `FDNAME=conn-N`, then, once its workers are gone, a memfd
//!   [`STATE_NAME`] naming them with their bytes. The next master adopts
//!   the connections named in the state (others are closed: without the
//!   state their framing is unknown), gives them to its workers the same
//!   way once they are ready, and removes them from the store.
//! - **ZooKeeper, make-before-break.** The registration memfd
//!   [`ZK_NAME`] names our node; a restart leaves the node (the session is
//!   not closed) and the next instance deletes it once its own node exists.
//!   The memfd is stored at each registration, so a crash restart finds it
//!   too.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The store's name for the handover state (a memfd of JSON).
pub const STATE_NAME: &str = "handover";
/// The store's name for the registration memfd.
pub const ZK_NAME: &str = "zk";
/// Prefix of the store's names for handed-over connections.
pub const CONN_PREFIX: &str = "conn-";

/// An established client connection being handed over, with the bytes of
/// the frame its client was in the middle of sending.
pub struct Conn {
    pub fd: OwnedFd,
    pub leftover: Vec<u8>,
}

/// Encodes bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(b"0123456789abcdef"[(x >> 4) as usize]));
        s.push(char::from(b"0123456789abcdef"[(x & 15) as usize]));
    }
    s
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    let d = |c: u8| (c as char).to_digit(16).map(|v| v as u8);
    s.chunks(2).map(|p| Some(d(p[0])? << 4 | d(p[1])?)).collect()
}

/// Sends `line` with `fd` attached (SCM_RIGHTS) on a channel, waiting while
/// the socket is full. The descriptor travels with the line's first byte.
pub async fn send_with_fd(sock: &UnixStream, line: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let mut sent = 0usize;
    while sent < line.len() {
        sock.writable().await?;
        let attach = sent == 0;
        let r = sock.try_io(Interest::WRITABLE, || {
            let fds = fd.filter(|_| attach).map(|f| [f]);
            let cmsgs: &[ControlMessage] = match &fds {
                Some(f) => &[ControlMessage::ScmRights(f)],
                None => &[],
            };
            sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&line[sent..])], cmsgs, MsgFlags::MSG_NOSIGNAL, None).map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a channel in lines, keeping the descriptors that arrive with them
/// in order: a line that carries one takes the oldest with [`Self::fd`].
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    eof: bool,
}

impl Reader {
    /// Reads what is there (waiting until something is). Ok(false) at EOF.
    pub async fn fill(&mut self, sock: &UnixStream) -> std::io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        loop {
            sock.readable().await?;
            let mut chunk = [0u8; 16 * 1024];
            let mut cmsg = nix::cmsg_space!([RawFd; 64]);
            let r = sock.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC).map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(f) = c {
                        fds.extend(f);
                    }
                }
                Ok((msg.bytes, fds))
            });
            match r {
                Ok((n, fds)) => {
                    // SAFETY: SCM_RIGHTS gave us these descriptors; nothing else owns them.
                    self.fds.extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    if n == 0 {
                        self.eof = true;
                        return Ok(false);
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete line, without its newline.
    pub fn line(&mut self) -> Option<String> {
        let i = self.buf.iter().position(|&b| b == b'\n')?;
        let line: Vec<u8> = self.buf.drain(..=i).take(i).collect();
        Some(String::from_utf8_lossy(&line).into_owned())
    }

    /// The oldest descriptor received and not yet taken.
    pub fn fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }
}

/// Parses a `conn HEX` line (the descriptor comes from the reader).
pub fn parse_conn(line: &str) -> Option<Vec<u8>> {
    let rest = line.strip_prefix("conn")?;
    unhex(rest.trim())
}

/// The line that carries a connection.
pub fn conn_line(leftover: &[u8]) -> String {
    format!("conn {}\n", hex(leftover))
}

/// A sealed-size memfd holding `text`, for the store.
pub fn memfd(name: &str, text: &str) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(text.as_bytes())?;
    Ok(f.into())
}

/// Reads a memfd from the start (at most 64 MiB).
pub fn read_memfd(fd: OwnedFd) -> std::io::Result<String> {
    let mut f = std::fs::File::from(fd);
    f.rewind()?;
    let mut s = String::new();
    f.take(64 << 20).read_to_string(&mut s)?;
    Ok(s)
}

/// Whether the service manager is restarting our unit now: asks it, over
/// D-Bus through `systemctl`, for the job queued on the unit that holds
/// this process (its cgroup names it). False when not under systemd, when
/// no restart job runs, or when the question cannot be answered within
/// `limit`.
pub fn restart_pending(limit: Duration) -> bool {
    if std::env::var_os("INVOCATION_ID").is_none() && std::env::var_os("NOTIFY_SOCKET").is_none() {
        return false;
    }
    let Some(unit) = own_unit() else { return false };
    let mut cmd = std::process::Command::new("systemctl");
    cmd.args(["list-jobs", "--no-legend", "--no-pager", "--plain", "--", &unit])
        .env("SYSTEMD_COLORS", "0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = match crate::pool::output_within(&mut cmd, limit) {
        Ok(Some(o)) => o,
        Ok(None) => {
            log::warn!("systemd did not say within {} ms whether this is a restart; stopping", limit.as_millis());
            return false;
        }
        Err(e) => {
            log::warn!("cannot ask systemd whether this is a restart: {e}; stopping");
            return false;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        log::warn!("cannot ask systemd whether this is a restart: {}; stopping", String::from_utf8_lossy(&out.stderr).trim());
        return false;
    }
    // "JOB UNIT TYPE STATE"
    let job = text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[1] == unit).then(|| f[2].to_string())
    });
    log::info!("systemd job on {unit}: {}", job.as_deref().unwrap_or("none"));
    matches!(job.as_deref(), Some("restart" | "try-restart"))
}

/// The systemd unit whose cgroup holds this process.
fn own_unit() -> Option<String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/').rev().find(|c| c.ends_with(".service")).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff, 0x10];
        assert_eq!(hex(&b), "0001abff10");
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
        assert_eq!(unhex("0G"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(parse_conn("conn "), Some(vec![]));
        assert_eq!(parse_conn(conn_line(&[5, 0, 0, 0, b'{']).trim_end()), Some(vec![5, 0, 0, 0, b'{']));
    }
}
