//! `scripts/demo`, the README's first command, run as a user runs it: in a
//! terminal (a pty), stopped with Ctrl-C. The stop must be the graceful one
//! (the terminal's SIGINT reaches the script only, which passes one SIGTERM
//! on), not the fast stop a second signal asks for; and the demo leaves no
//! rpcd and no ZooKeeper behind.

use std::process::Command;

const PTY_DRIVER: &str = r#"
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv("scripts/demo", ["scripts/demo"])
out = b""
end = time.time() + 240
sent = False
while time.time() < end:
    r, _, _ = select.select([fd], [], [], 0.5)
    if r:
        try:
            d = os.read(fd, 65536)
        except OSError:
            break
        if not d:
            break
        out += d
    if not sent and b"zookeeper: registered" in out:
        time.sleep(0.5)
        os.write(fd, b"\x03")
        sent = True
if time.time() >= end:
    os.kill(pid, 9)
_, st = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.stdout.write("\nDRIVER: sent=%s status=%d\n" % (sent, st))
"#;

#[test]
fn ctrl_c_in_the_demo_is_the_graceful_stop() {
    // The suite's binaries, as built (a `cargo build --bins` here would
    // build them again with other features, under the other tests' feet).
    assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/rpcd").exists());
    let out = Command::new("python3")
        .arg("-c")
        .arg(PTY_DRIVER)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RPCD_DEMO_NO_BUILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("DRIVER: sent=True status=0"), "the demo did not start, or did not exit 0 after Ctrl-C:\n{text}");
    let pid: i32 = text
        .split("rpcd[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no rpcd PID in the output:\n{text}"));
    assert!(text.contains("SIGTERM: graceful stop"), "{text}");
    assert!(text.contains("stopped: reaped worker(s)"), "{text}");
    assert!(!text.contains("fast stop"), "Ctrl-C reached rpcd twice (a fast stop):\n{text}");
    assert!(!text.contains("killed by SIGKILL"), "{text}");
    // Nothing left: the master is gone (its workers die with it), and the
    // demo's ZooKeeper with its temp dir.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "rpcd {pid} still runs");
    let dir = text.split("files in ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("{text}"));
    assert!(!std::path::Path::new(dir).exists(), "the demo left {dir}");
    let zk_left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(dir))
        .collect();
    assert!(zk_left.is_empty(), "the demo left {zk_left:?}");
}
