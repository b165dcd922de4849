//! Upgrade in place (`rpcctl upgrade`): the master re-executes the binary at
//! its path in the same PID, adopts its workers and sockets, starts workers
//! of the new binary and retires the old ones; a binary that fails its
//! check, or whose workers cannot start, leaves the old ones serving.
mod common;
use common::*;
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A copy of rpcd of our own, which the test can replace.
fn own_binary(dir: &Path) -> PathBuf {
    let p = dir.join("rpcd");
    replace_binary(&p, "first");
    p
}

/// Puts a new file at `path` (new inode, other bytes: the same code plus a
/// marker after the ELF image), as a package upgrade does. Its inode. (A
/// child process writes it: a descriptor open for writing in this process
/// could be inherited by a fork of another test's thread and make the exec
/// fail with ETXTBSY.)
fn replace_binary(path: &Path, marker: &str) -> u64 {
    sh("cat \"$0\" >\"$1.new\" && printf '\\nupgrade marker %s\\n' \"$2\" >>\"$1.new\" && chmod 755 \"$1.new\" && mv \"$1.new\" \"$1\"", &[Path::new(RPCD), path, Path::new(marker)]);
    std::fs::metadata(path).unwrap().ino()
}

/// Runs a shell script with arguments ($0, $1, ...); it must succeed.
fn sh(script: &str, args: &[&Path]) {
    let st = std::process::Command::new("/bin/sh").arg("-c").arg(script).args(args).status().unwrap();
    assert!(st.success(), "{script}");
}

fn exe_inode(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn an_upgrade_in_place_keeps_the_pid_and_refuses_no_connect() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = own_binary(bin_dir.path());
    let mut d = Daemon::start(Opts { workers: 2, binary: Some(bin.clone()), ..Default::default() });
    let old_workers = d.wait_serving(2);
    for round in 1..=2u64 {
        // (The first file's inode may be reused once nothing runs it.)
        let running = exe_inode(d.pid);
        let new_ino = replace_binary(&bin, &round.to_string());
        assert_ne!(new_ino, running);
        let load = Persistent::start(d.port, 8);
        load.wait_progress(&[0; 8], 10);
        let mut out = None;
        let (ok, refused, failed, worst) = connects_during(d.port, || out = Some(d.ctl(&["upgrade"])));
        let before = load.counts();
        load.wait_progress(&before, 10);
        for r in load.finish() {
            assert_eq!(r.2, None, "a persistent client failed through the upgrade");
        }
        let out = out.unwrap();
        eprintln!("upgrade {round}: {ok} ok, {refused} refused, {} failed, worst {worst:?}; {}", failed.len(), text(&out.stdout).trim());
        assert!(out.status.success(), "rpcctl upgrade: {}\nlog:\n{}", text(&out.stderr), d.log());
        assert!(text(&out.stdout).contains(&format!("upgraded rpcd (pid {}) in place", d.pid)), "{}", text(&out.stdout));
        assert_eq!(refused, 0);
        assert!(failed.is_empty(), "{failed:?}");
        assert!(ok > 20, "{ok}");
        // The same process, now running the new file; so do its workers.
        assert!(alive(d.pid));
        assert_eq!(exe_inode(d.pid), new_ino, "the master runs the new binary");
        let st = d.status();
        assert_eq!(st["pid"], json!(d.pid));
        assert_eq!(st["upgrade"]["count"], json!(round));
        assert_eq!(st["upgrade"]["state"], "done");
        let workers = d.wait_serving(2);
        for w in &workers {
            assert!(!old_workers.contains(w));
            assert_eq!(exe_inode(*w), new_ino, "worker {w} runs the new binary");
        }
    }
    // The old image's workers were retired and reaped.
    wait_for("the first workers reaped", Duration::from_secs(10), || old_workers.iter().all(|p| !alive(*p)).then_some(()));
    assert!(children(d.pid).len() == 2, "{:?}", children(d.pid));
    // It still stops as it should.
    kill(d.pid, libc::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn an_upgrade_to_a_binary_that_fails_its_check_is_refused_and_changes_nothing() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = own_binary(bin_dir.path());
    let mut d = Daemon::start(Opts { workers: 1, binary: Some(bin.clone()), ..Default::default() });
    let workers = d.wait_serving(1);
    let ino = exe_inode(d.pid);
    let broken = bin_dir.path().join("broken");
    sh("printf '#!/bin/sh\\necho not an rpcd >&2\\nexit 3\\n' >\"$0\" && chmod 755 \"$0\" && mv \"$0\" \"$1\"", &[&broken, &bin]);
    let out = d.ctl(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--check-config failed: not an rpcd"), "{}", text(&out.stderr));
    assert_eq!(exe_inode(d.pid), ino);
    assert_eq!(d.wait_serving(1), workers);
    let mut c = connect(d.port);
    assert_eq!(call(&mut c, &json!({"in": "ping", "params": 1}))["result"], json!(1));
}

#[test]
fn an_upgrade_whose_workers_cannot_start_leaves_the_old_ones_serving() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = own_binary(bin_dir.path());
    let handler = "import rpcd_handler\nrpcd_handler.serve({\"add\": lambda p: p[0] + p[1]})\n";
    let extra = format!("[handlers.py]\nexec = [\"{PYTHON}\", \"{{dir}}/h.py\"]\nenv = {{ PYTHONPATH = \"{SHARE}\" }}\nprocesses = 1\nwarmup = {{ in = \"add\", params = [1, 1] }}\n\n[methods.add]\nhandler = \"py\"\n");
    let mut d = Daemon::start(Opts { workers: 1, binary: Some(bin.clone()), extra, files: vec![("h.py".into(), handler.into())], ..Default::default() });
    let workers = d.wait_serving(1);
    replace_binary(&bin, "x");
    // The new generation's handlers will not start.
    std::fs::write(d.dir.path().join("h.py"), "import sys\nsys.stderr.write('broken on purpose\\n')\nsys.exit(7)\n").unwrap();
    let out = d.ctl(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("upgrade failed") && err.contains("did not start"), "{err}\nlog:\n{}", d.log());
    // The old workers (of the old binary) serve on, handlers included.
    let st = d.status();
    assert_eq!(st["upgrade"]["state"], "failed");
    assert_eq!(d.wait_serving(1), workers);
    let mut c = connect(d.port);
    assert_eq!(call(&mut c, &json!({"in": "add", "params": [2, 3]}))["result"], json!(5));
}

#[test]
fn an_upgrade_with_the_running_binary_does_nothing() {
    let mut d = Daemon::start(Opts { workers: 1, ..Default::default() });
    let workers = d.wait_serving(1);
    let out = d.ctl(&["upgrade"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing to upgrade"), "{}", text(&out.stdout));
    assert_eq!(d.wait_serving(1), workers);
    assert_eq!(d.status()["upgrade"]["count"], json!(0));
}

#[test]
fn a_reload_on_the_same_listener_hands_persistent_connections_to_the_new_generation() {
    let mut d = Daemon::start(Opts { workers: 2, ..Default::default() });
    let old = d.wait_serving(2);
    let load = Persistent::start(d.port, 8);
    load.wait_progress(&[0; 8], 10);
    for _ in 0..2 {
        let out = d.ctl(&["reload"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let before = load.counts();
        load.wait_progress(&before, 10);
    }
    let new = d.wait_serving(2);
    assert!(new.iter().all(|p| !old.contains(p)));
    let held: u64 = wait_for("the new workers to hold the 8 connections", Duration::from_secs(10), || {
        let n: u64 = d.status()["workers"].as_array().unwrap().iter().map(|w| w["connections"].as_u64().unwrap()).sum();
        (n == 8).then_some(n)
    });
    for r in load.finish() {
        assert_eq!(r.2, None, "a persistent client failed through the reloads");
    }
    assert!(d.log().contains("handed 4 connection(s) to the master") || d.log().contains("connection(s) to the master"), "{}", d.log());
    eprintln!("2 reloads: {held} persistent connections carried over");
}
