//! The Python helper share/rpcd_handler.py, tested without rpcd by
//! tests/python/test_rpcd_handler.py (unittest, stdlib only), under every
//! interpreter it supports that this machine has: python3 (required) and,
//! when present, Python 3.8 and 2.7. One #[test] per interpreter, so they
//! run in parallel.
//!
//! RPCD_TEST_PYTHONS (colon-separated paths) replaces the list of optional
//! interpreters.
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const SUITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/test_rpcd_handler.py");
/// Where this machine keeps the older interpreters.
const PY38: &str = "/root/.pyenv/versions/3.8.18/bin/python3.8";
const PY27: &str = "/root/.pyenv/versions/2.7.18/bin/python2.7";
const LIMIT: Duration = Duration::from_secs(90);

/// Kills the suite (by its PID) if the test ends before it does.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the suite under `python`; panics with its output unless it passes.
fn run_suite(python: &str) {
    let t0 = Instant::now();
    let child = Command::new(python)
        .arg(SUITE)
        .arg("-v")
        .current_dir(Path::new(REPO).join("tests/python"))
        .env("PYTHONDONTWRITEBYTECODE", "1") // share/ is part of the source tree
        .env("RPCD_HANDLER_DIR", Path::new(REPO).join("share"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let mut g = Guard(child);
    let mut out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = g.0.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > LIMIT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(g); // kills it if it is still running, so the readers see EOF
    let (out, err) = (out_t.join().unwrap(), err_t.join().unwrap());
    let shown = format!("--- {python} {SUITE} -v: stdout ---\n{out}\n--- stderr ---\n{err}");
    let Some(status) = status else { panic!("{python}: the suite did not finish within {LIMIT:?}\n{shown}") };
    assert!(status.success(), "{python}: the suite failed ({status})\n{shown}");
    // unittest's summary, so that a suite that ran nothing does not pass.
    let ran = err
        .lines()
        .find_map(|l| l.strip_prefix("Ran ")?.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    assert!(ran >= 30, "{python}: only {ran} test(s) ran\n{shown}");
    assert!(err.lines().any(|l| l == "OK" || l.starts_with("OK (")), "{python}: no OK\n{shown}");
    eprintln!("{python}: {ran} tests passed in {:.1}s", t0.elapsed().as_secs_f64());
}

/// Runs the suite under an optional interpreter, or says why not.
fn optional(default: &str, version: &str) {
    let list = std::env::var("RPCD_TEST_PYTHONS").ok();
    let candidates: Vec<String> = match &list {
        Some(l) => l.split(':').filter(|p| !p.is_empty()).map(String::from).collect(),
        None => vec![default.to_string()],
    };
    let mut ran = false;
    for p in candidates {
        if !Path::new(&p).exists() {
            if list.is_none() {
                eprintln!("note: {p} is not on this machine; skipping the Python {version} run");
            } else {
                eprintln!("note: {p} (RPCD_TEST_PYTHONS) does not exist; skipping it");
            }
            continue;
        }
        let v = Command::new(&p).arg("-c").arg("import sys; print('%d.%d' % sys.version_info[:2])").output();
        match v {
            Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == version => {
                run_suite(&p);
                ran = true;
            }
            Ok(o) if o.status.success() => continue, // another version: its own test runs it
            _ => eprintln!("note: {p} does not run; skipping it"),
        }
    }
    if !ran && list.is_some() {
        eprintln!("note: no Python {version} in RPCD_TEST_PYTHONS; skipping");
    }
}

#[test]
fn helper_suite_python3() {
    let v = Command::new("python3").arg("--version").output();
    assert!(matches!(&v, Ok(o) if o.status.success()), "python3 is required for this test: {v:?}");
    run_suite("python3");
}

#[test]
fn helper_suite_python38() {
    optional(PY38, "3.8");
}

#[test]
fn helper_suite_python27() {
    optional(PY27, "2.7");
}
