//! Packaging: the manual pages, the systemd unit and the package scripts kept
//! in step with the binaries and the configuration; and, as root, the .deb
//! and .rpm built, linted, inspected, and the .deb installed and run under a
//! real systemd (packaging/build-packages, lint-packages, e2e-systemd).

use rpcd::config::Config;
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const RPCD: &str = env!("CARGO_BIN_EXE_rpcd");
const RPCCTL: &str = env!("CARGO_BIN_EXE_rpcctl");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// ---------- --help output ----------

#[derive(Debug)]
struct Opt {
    short: Option<String>,
    long: String,
    default: Option<String>,
    possible: Vec<String>,
}

#[derive(Debug, Default)]
struct Help {
    options: Vec<Opt>,
    /// Positional arguments, lower-cased, without <> or [].
    args: Vec<String>,
    commands: Vec<String>,
}

fn bracketed(desc: &str, label: &str) -> Option<String> {
    let start = desc.find(label)? + label.len();
    let end = desc[start..].find(']')? + start;
    Some(desc[start..end].to_string())
}

fn help(bin: &str, args: &[&str]) -> Help {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {args:?} --help: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut h = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let t = line.trim();
        match section {
            "Commands" => h.commands.push(t.split_whitespace().next().unwrap().to_string()),
            "Arguments" => {
                let name = t.split_whitespace().next().unwrap();
                h.args.push(name.trim_matches(|c| "<>[]".contains(c)).to_lowercase());
            }
            "Options" => {
                let (short, rest) = match t.strip_prefix('-').filter(|r| !r.starts_with('-')) {
                    Some(r) => (Some(r[..1].to_string()), r[1..].trim_start_matches(',').trim_start()),
                    None => (None, t),
                };
                let long = rest.strip_prefix("--").unwrap_or_else(|| panic!("no long option in {line:?}"));
                let long = long.split(|c: char| c.is_whitespace()).next().unwrap().to_string();
                h.options.push(Opt {
                    short,
                    long,
                    default: bracketed(t, "[default: "),
                    possible: bracketed(t, "[possible values: ").map(|v| v.split(", ").map(str::to_string).collect()).unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    h
}

// ---------- mdoc source ----------

/// Lines of section `.Sh NAME` up to the next `.Sh`.
fn man_section<'a>(man: &'a str, name: &str) -> Vec<&'a str> {
    let mut lines = man.lines().skip_while(|l| *l != format!(".Sh {name}"));
    assert!(lines.next().is_some(), "no .Sh {name}");
    lines.take_while(|l| !l.starts_with(".Sh ")).collect()
}

fn tokens(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Whether `line` has the macro `mac` followed by `arg`, e.g. `Fl -config`.
fn has_macro(line: &str, mac: &str, arg: &str) -> bool {
    tokens(line).windows(2).any(|w| w[0].trim_start_matches('.') == mac && w[1] == arg)
}

/// From the `.It` line for which `is_head` holds up to the next `.It` or `.El`.
fn item<'a>(lines: &[&'a str], is_head: impl Fn(&str) -> bool) -> Option<Vec<&'a str>> {
    let start = lines.iter().position(|l| l.starts_with(".It ") && is_head(l))?;
    let mut v = vec![lines[start]];
    v.extend(lines[start + 1..].iter().take_while(|l| !l.starts_with(".It") && !l.starts_with(".El")));
    Some(v)
}

/// Words of an item's text, without trailing punctuation and roff escapes.
fn words(item: &[&str]) -> Vec<String> {
    item.iter()
        .flat_map(|l| l.split_whitespace())
        .map(|w| w.replace("\\(dq", "\"").replace("\\&", "").trim_end_matches(['.', ',', ';']).to_string())
        .collect()
}

/// Checks that the item documenting `o` is among `lines`, names its short
/// option, and states its default and its possible values.
fn check_option(page: &str, place: &str, lines: &[&str], o: &Opt) {
    let long = format!("-{}", o.long);
    let it = item(lines, |l| l.starts_with(".It Fl ") && has_macro(l, "Fl", &long))
        .unwrap_or_else(|| panic!("{page}: no `.It Fl {long}` in {place}"));
    if let Some(s) = &o.short {
        assert!(has_macro(it[0], "Fl", s), "{page}: `{}` lacks `Fl {s}` ({place})", it[0]);
    }
    let w = words(&it);
    if let Some(d) = &o.default {
        assert!(w.iter().any(|x| x == "Default:") && w.contains(d), "{page}: --{} ({place}) does not say `Default: {d}`: {it:?}", o.long);
    }
    for p in &o.possible {
        assert!(w.contains(p), "{page}: --{} ({place}) does not name the value {p}: {it:?}", o.long);
    }
}

fn flags_in(man: &str) -> BTreeSet<String> {
    man.lines()
        .filter(|l| l.starts_with('.'))
        .flat_map(|l| {
            let t = tokens(l);
            t.windows(2).filter(|w| w[0].trim_start_matches('.') == "Fl").map(|w| w[1].to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn rpcd_8_documents_every_option() {
    let man = read("man/rpcd.8");
    let opts = man_section(&man, "OPTIONS");
    let h = help(RPCD, &[]);
    assert!(h.options.iter().any(|o| o.long == "config"), "{h:?}");
    for o in &h.options {
        check_option("rpcd.8", "OPTIONS", &opts, o);
    }
    // Nothing documented that the binary does not have (--worker is hidden
    // from --help: the master's internal way to start workers).
    let known: BTreeSet<String> =
        h.options.iter().flat_map(|o| [Some(format!("-{}", o.long)), o.short.clone()]).flatten().chain(["-worker".to_string()]).collect();
    for f in flags_in(&man) {
        assert!(known.contains(&f), "rpcd.8 documents `Fl {f}`, which rpcd does not have");
    }
}

#[test]
fn rpcctl_1_documents_every_command_and_option() {
    let man = read("man/rpcctl.1");
    let top = help(RPCCTL, &[]);
    let globals: BTreeSet<&str> = top.options.iter().map(|o| o.long.as_str()).collect();
    let options = man_section(&man, "OPTIONS");
    for o in &top.options {
        check_option("rpcctl.1", "OPTIONS", &options, o);
    }
    let commands = man_section(&man, "COMMANDS");
    let heads: Vec<usize> = (0..commands.len()).filter(|&i| commands[i].starts_with(".It Cm ")).collect();
    let mut known: BTreeSet<String> = top.options.iter().flat_map(|o| [Some(format!("-{}", o.long)), o.short.clone()]).flatten().collect();
    assert!(top.commands.len() >= 5, "{top:?}");
    for cmd in &top.commands {
        let i = *heads
            .iter()
            .find(|&&i| tokens(commands[i]).get(2) == Some(&cmd.as_str()))
            .unwrap_or_else(|| panic!("rpcctl.1: no `.It Cm {cmd}` in COMMANDS"));
        let end = heads.iter().find(|&&j| j > i).copied().unwrap_or(commands.len());
        let block = &commands[i..end];
        if cmd == "help" {
            continue; // `rpcctl help --help` is not a thing
        }
        let h = help(RPCCTL, &[cmd]);
        for o in h.options.iter().filter(|o| !globals.contains(o.long.as_str())) {
            check_option("rpcctl.1", &format!("`{cmd}`"), block, o);
            known.insert(format!("-{}", o.long));
        }
        for a in &h.args {
            assert!(item(block, |l| tokens(l) == [".It", "Ar", a.as_str()]).is_some(), "rpcctl.1: `{cmd}` lacks `.It Ar {a}`");
        }
    }
    for f in flags_in(&man) {
        assert!(known.contains(&f), "rpcctl.1 documents `Fl {f}`, which rpcctl does not have");
    }
    for &i in &heads {
        let name = tokens(commands[i])[2];
        assert!(top.commands.iter().any(|c| c == name), "rpcctl.1 documents command {name}, which rpcctl does not have");
    }
}

/// What the manual must say a key's default is.
#[derive(Debug, Clone, PartialEq)]
enum Dflt {
    /// `Default: .Li VALUE` (as TOML writes it).
    Value(Value),
    /// `Default: unset.`
    Unset,
    /// No default: the item says `Required.`
    Required,
}

/// The name that stands for any name in the templates `[handlers.NAME]`
/// and `[methods.NAME]`.
const ANY: &str = "NAME";

/// The smallest configuration with one handler pool and one method routed
/// to it: the template of `[handlers.NAME]` and `[methods.NAME]`.
fn template() -> String {
    format!("[handlers.{ANY}]\nexec = [\"/bin/sh\"]\n\n[methods.{ANY}]\nhandler = \"{ANY}\"\n")
}

/// Every key that a table takes, as the daemon's own "unknown key" error
/// lists them (Option keys included, which serialization leaves out).
/// `table_text` is the table's header and the keys it needs to be valid.
fn keys_of(table_text: &str) -> Vec<String> {
    let text = format!("{table_text}zz_not_a_key = 1\n");
    let e = Config::parse(&text, "t").expect_err("an unknown key is an error").0;
    let (_, expected) = e.split_once("expected").unwrap_or_else(|| panic!("no key list in {e:?}"));
    let keys: Vec<String> = expected.split('`').skip(1).step_by(2).map(str::to_string).collect();
    assert!(!keys.is_empty(), "no key list in {e:?}");
    keys
}

/// (table, key) → default, from the daemon's own defaults: every key of
/// `Config::default()`, and every key of the templates `[handlers.NAME]`
/// and `[methods.NAME]` with the default rpcd applies when it is left out.
fn config_keys() -> Vec<(String, String, Dflt)> {
    fn walk(table: &str, v: &Value, out: &mut Vec<(String, String, Dflt)>) {
        for (k, v) in v.as_object().unwrap() {
            match v {
                Value::Object(_) if table.is_empty() || table == "methods" || table == "handlers" || (table == "server" && k == "tls") => {
                    let t = if table.is_empty() { k.clone() } else { format!("{table}.{k}") };
                    walk(&t, v, out)
                }
                Value::Null => out.push((table.to_string(), k.clone(), Dflt::Unset)),
                _ => out.push((table.to_string(), k.clone(), Dflt::Value(v.clone()))),
            }
        }
    }
    let mut out = Vec::new();
    let defaults = Config::default();
    assert!(defaults.handlers.is_empty(), "handler pools by default?");
    walk("", &serde_json::to_value(&defaults).unwrap(), &mut out);
    // The in-process `pi` takes max_terms and nothing else.
    assert_eq!(defaults.methods.keys().collect::<Vec<_>>(), ["pi"]);

    let t = Config::parse(&template(), "template").unwrap_or_else(|e| panic!("the template does not parse: {e}"));
    let ser = serde_json::to_value(&t).unwrap();
    let pool = &ser["handlers"][ANY];
    for k in keys_of(&format!("[handlers.{ANY}]\nexec = [\"/bin/sh\"]\n")) {
        let d = match (k.as_str(), &pool[&k]) {
            ("exec", _) => Dflt::Required,
            // Left out when unset (warmup), or a new key: the manual must
            // then say "unset", or this test learns its default.
            (_, Value::Null) => Dflt::Unset,
            (_, v) => Dflt::Value(v.clone()),
        };
        out.push((format!("handlers.{ANY}"), k, d));
    }
    let m = &t.methods[ANY];
    let mut method_keys = keys_of(&format!("[methods.{ANY}]\n"));
    // Documented under [methods.pi], the only method that takes it.
    assert!(out.iter().any(|(t, k, _)| t == "methods.pi" && k == "max_terms"));
    method_keys.retain(|k| k != "max_terms");
    for k in method_keys {
        let d = match k.as_str() {
            "handler" => Dflt::Required,
            "timeout_ms" => Dflt::Value(Value::from(m.timeout().as_millis() as u64)),
            "queue" => Dflt::Value(Value::from(m.queue() as u64)),
            _ => match &ser["methods"][ANY][&k] {
                Value::Null => Dflt::Unset,
                v => Dflt::Value(v.clone()),
            },
        };
        out.push((format!("methods.{ANY}"), k, d));
    }
    out
}

/// A default as TOML writes it.
fn toml_literal(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        Value::Array(a) => format!("[{}]", a.iter().map(toml_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(o) if o.is_empty() => "{}".to_string(),
        Value::Object(o) => {
            format!("{{ {} }}", o.iter().map(|(k, v)| format!("{k} = {}", toml_literal(v))).collect::<Vec<_>>().join(", "))
        }
        other => other.to_string(),
    }
}

#[test]
fn rpcd_toml_5_documents_every_key_with_its_default() {
    let man = read("man/rpcd.toml.5");
    let keys = config_keys();
    assert!(keys.len() >= 38, "{keys:?}");
    for t in [format!("handlers.{ANY}"), format!("methods.{ANY}")] {
        assert!(keys.iter().filter(|(table, _, _)| *table == t).count() >= 3, "no keys of [{t}]: {keys:?}");
    }
    let all: Vec<&str> = man.lines().collect();
    let mut documented = BTreeSet::new();
    for (table, key, default) in &keys {
        let head = format!(".Ss \\&[{table}]\\&");
        let start = all.iter().position(|l| *l == head).unwrap_or_else(|| panic!("rpcd.toml.5: no `{head}`"));
        let sect: Vec<&str> = all[start + 1..].iter().take_while(|l| !l.starts_with(".Ss ") && !l.starts_with(".Sh ")).copied().collect();
        let it = item(&sect, |l| tokens(l) == [".It", "Ic", key.as_str()])
            .unwrap_or_else(|| panic!("rpcd.toml.5: no `.It Ic {key}` under [{table}]"));
        let w = words(&it);
        let at = w.iter().position(|x| x == "Default:");
        match default {
            Dflt::Required => {
                assert!(at.is_none(), "rpcd.toml.5: {table}.{key} is required but states a default: {it:?}");
                assert!(w.iter().any(|x| x == "Required"), "rpcd.toml.5: {table}.{key} does not say it is required: {it:?}");
            }
            Dflt::Unset | Dflt::Value(_) => {
                let at = at.unwrap_or_else(|| panic!("rpcd.toml.5: {table}.{key} has no `Default:`"));
                let stated = &w[at + 1..];
                if let Dflt::Value(v) = default {
                    let want = toml_literal(v);
                    assert!(
                        stated.len() >= 2 && stated[0] == ".Li" && stated[1] == want,
                        "rpcd.toml.5: {table}.{key}: default stated as {stated:?}, rpcd's is {want}"
                    );
                } else {
                    assert_eq!(stated.first().map(String::as_str), Some("unset"), "rpcd.toml.5: {table}.{key}");
                }
            }
        }
        documented.insert(format!("{table}.{key}"));
    }
    // Nothing documented that the daemon does not read.
    let mut table = String::new();
    for l in &all {
        if let Some(t) = l.strip_prefix(".Ss \\&[").and_then(|t| t.strip_suffix("]\\&")) {
            table = t.to_string();
        } else if l.starts_with(".Sh ") {
            table.clear();
        } else if let (false, [".It", "Ic", key]) = (table.is_empty(), tokens(l).as_slice()) {
            assert!(documented.contains(&format!("{table}.{key}")), "rpcd.toml.5 documents {table}.{key}, which rpcd does not read");
        }
    }
}

/// The table a header such as `[handlers.py]` is an instance of:
/// `handlers.NAME`, `methods.NAME` (but `methods.pi`), or itself.
fn table_template(name: &str) -> String {
    match name.split_once('.') {
        Some(("handlers", _)) => format!("handlers.{ANY}"),
        Some(("methods", m)) if m != "pi" => format!("methods.{ANY}"),
        _ => name.to_string(),
    }
}

/// The shipped file with its commented-out handler and method examples
/// (`#[handlers.NAME]`, `#key = ...` from the first such table on) put back.
fn uncommented(text: &str) -> String {
    let mut examples = false;
    text.lines()
        .map(|l| {
            examples |= l.starts_with("#[handlers.") || l.starts_with("#[methods.");
            match l.strip_prefix('#') {
                Some(r) if examples && (r.starts_with('[') || r.split_once('=').is_some_and(|(k, _)| is_key(k.trim_end()))) => r,
                _ => l,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

#[test]
fn shipped_rpcd_toml_lists_every_key() {
    // Set or commented out (`#advertise = ...`, `#[handlers.py]`): every
    // key is in the file; handler and method keys in commented-out examples.
    let mut in_file = BTreeSet::new();
    let mut table = String::new();
    let text = read("etc/rpcd.toml");
    for l in text.lines() {
        let l = l.strip_prefix('#').unwrap_or(l);
        if let Some(t) = l.strip_prefix('[') {
            table = table_template(t.split(']').next().unwrap());
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim_end();
            if is_key(k) {
                in_file.insert(format!("{table}.{k}"));
            }
        }
    }
    let keys: BTreeSet<String> = config_keys().into_iter().map(|(t, k, _)| format!("{t}.{k}")).collect();
    assert_eq!(in_file, keys, "etc/rpcd.toml and rpcd's keys differ");
    // Put back, the commented-out examples are a valid configuration that
    // routes methods to handler pools (src/config.rs checks that the file
    // as shipped is the defaults).
    let mut full = uncommented(&text);
    if !Path::new("/usr/bin/python3").exists() {
        full = full.replace("\"/usr/bin/python3\"", "\"/bin/sh\"");
    }
    let c = Config::parse(&full, "etc/rpcd.toml, uncommented").unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.handlers.is_empty() && c.methods.values().any(|m| m.handler.is_some()), "{c:?}");
    assert_eq!(c.warnings(), Vec::<String>::new(), "etc/rpcd.toml, uncommented");
}

#[test]
fn rpcd_toml_5_examples_are_valid() {
    // Every literal block of EXAMPLES with handler pools or methods is a
    // configuration rpcd accepts. (The others name hosts that need not
    // resolve here.)
    let man = read("man/rpcd.toml.5");
    let lines = man_section(&man, "EXAMPLES");
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with(".Bd -literal") {
            let body: Vec<&str> = lines[i + 1..].iter().take_while(|l| !l.starts_with(".Ed")).copied().collect();
            i += body.len() + 1;
            if body.iter().any(|l| l.starts_with("[handlers.") || l.starts_with("[methods.")) {
                blocks.push(body.join("\n").replace("\\(dq", "\"").replace("\\e", "\\").replace("\\&", ""));
            }
        }
        i += 1;
    }
    assert!(!blocks.is_empty(), "rpcd.toml.5: EXAMPLES has no handler configuration");
    for b in &blocks {
        let text = if Path::new("/usr/bin/python3").exists() { b.clone() } else { b.replace("\"/usr/bin/python3\"", "\"/bin/sh\"") };
        let c = Config::parse(&text, "rpcd.toml.5 EXAMPLES").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.warnings(), Vec::<String>::new(), "{text}");
    }
}

// ---------- unit, sysusers, scripts ----------

fn unit() -> Vec<(String, String)> {
    read("packaging/rpcd.service")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn unit_value(u: &[(String, String)], key: &str) -> String {
    let v: Vec<&String> = u.iter().filter(|(k, _)| k == key).map(|(_, v)| v).collect();
    assert_eq!(v.len(), 1, "rpcd.service: {key} set {} times", v.len());
    v[0].clone()
}

fn secs(v: &str) -> u64 {
    v.strip_suffix('s').unwrap_or(v).parse().unwrap_or_else(|_| panic!("not seconds: {v}"))
}

#[test]
fn unit_fits_the_daemon_and_its_defaults() {
    let u = unit();
    let v = |k: &str| unit_value(&u, k);
    assert_eq!(v("Type"), "notify");
    assert_eq!(v("ExecStart"), "/usr/sbin/rpcd --config /etc/rpcd.toml");
    assert_eq!(v("ExecReload"), "/usr/bin/rpcctl --config /etc/rpcd.toml reload");
    assert_eq!(v("KillMode"), "mixed");
    assert_eq!(v("Restart"), "on-failure");
    // Restarts keep the listener and the control socket (SPEC §6).
    assert!(v("FileDescriptorStoreMax").parse::<u32>().unwrap() >= 2);
    assert_eq!(v("RuntimeDirectoryPreserve"), "restart");
    assert_eq!((v("User"), v("Group")), ("rpcd".to_string(), "rpcd".to_string()));
    let c = Config::default();
    assert_eq!(
        c.control.socket.parent().unwrap(),
        Path::new("/run").join(v("RuntimeDirectory")),
        "the default control socket is not in the unit's RuntimeDirectory"
    );
    // Stop: deregistration (the delay, plus up to 5 s for ZooKeeper to
    // confirm), the drain, SIGKILL and reap, with a margin of 5 s at least.
    // With a handler pool (at its default kill_grace_ms), a worker has
    // longer before SIGKILL: it retires its handler processes after the drain.
    let z = &c.zookeeper;
    let with_pool = Config::parse(&template(), "template").unwrap();
    assert!(with_pool.worker_grace() > c.worker_grace(), "{:?}", with_pool.worker_grace());
    let drain = with_pool.worker_grace().as_millis() as u64;
    let stop = (drain + z.deregister_delay_ms + z.session_timeout_ms.min(5000)).div_ceil(1000);
    assert!(secs(&v("TimeoutStopSec")) >= stop + 5, "TimeoutStopSec {} < {stop} s + 5 s", v("TimeoutStopSec"));
    // Start and reload (ExecReload is bounded by TimeoutStartSec): new workers
    // get ready_timeout_secs (handler warmup included), and a reload then
    // drains the old ones.
    let reload = c.server.ready_timeout_secs + drain.div_ceil(1000);
    assert!(secs(&v("TimeoutStartSec")) >= reload + 5, "TimeoutStartSec {} < {reload} s + 5 s", v("TimeoutStartSec"));
    // Every man: page the unit names is shipped.
    for doc in v("Documentation").split_whitespace() {
        let page = doc.strip_prefix("man:").unwrap();
        let (name, sect) = page.trim_end_matches(')').split_once('(').unwrap();
        assert!(repo().join(format!("man/{name}.{sect}")).exists(), "Documentation={doc}: no man/{name}.{sect}");
    }
}

#[test]
fn rpm_pre_creates_the_user_of_the_sysusers_file() {
    let pre = read("packaging/rpm/pre.sh");
    let entries: Vec<String> =
        read("packaging/rpcd.sysusers").lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    for e in &entries {
        assert!(pre.lines().any(|l| l == e), "packaging/rpm/pre.sh lacks the sysusers line {e:?}");
    }
}

#[test]
fn debian_changelog_is_at_the_crate_version() {
    let first = read("packaging/debian/changelog").lines().next().unwrap().to_string();
    let want = format!("rpcd ({}-1) ", env!("CARGO_PKG_VERSION"));
    assert!(first.starts_with(&want), "packaging/debian/changelog starts {first:?}, not {want:?}");
}

// ---------- build, lint, install, run (root) ----------

fn run(what: &str, cmd: &mut Command) -> String {
    let t = Instant::now();
    let out = cmd.current_dir(repo()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("---- {what} ({:.1} s)\n{text}", t.elapsed().as_secs_f64());
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

fn one_file(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}*{suffix} in {}: {found:?}", dir.display());
    found[0].clone()
}

/// Files (not directories) of a tree, relative, sorted.
fn files_under(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            } else {
                out.push(format!("/{}", p.strip_prefix(root).unwrap().display()));
            }
        }
    }
    let mut v = Vec::new();
    walk(root, root, &mut v);
    v.sort();
    v
}

const PACKAGED: &[&str] = &[
    "/etc/rpcd.toml",
    "/usr/bin/rpcctl",
    "/usr/lib/systemd/system/rpcd.service",
    "/usr/lib/sysusers.d/rpcd.conf",
    "/usr/sbin/rpcd",
    "/usr/share/doc/rpcd/README.md",
    "/usr/share/doc/rpcd/examples/systemd/rpcd.socket",
    "/usr/share/man/man1/rpcctl.1.gz",
    "/usr/share/man/man5/rpcd.toml.5.gz",
    "/usr/share/man/man8/rpcd.8.gz",
    "/usr/share/rpcd/rpcd_handler.py",
];

/// Where the Python helper is installed (rpcd.8 and the examples name it).
const HANDLER_HELPER: &str = "/usr/share/rpcd/rpcd_handler.py";
const EXAMPLES_DOC: &str = "/usr/share/doc/rpcd/examples/python";

/// The files of examples/python/ that the packages ship: all but Python's
/// caches and editors' leftovers (what packaging/build-packages stages).
fn python_examples() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("examples/python"))
        .expect("examples/python/")
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".pyc") && !n.ends_with(".pyo") && !n.starts_with('.') && !n.ends_with('~'))
        .collect();
    v.sort();
    v
}

#[test]
fn python_example_is_complete() {
    // What rpcd.8, rpcd.toml.5 and README.md point to.
    let files = python_examples();
    for f in ["handlers.py", "rpcd.toml", "README.md"] {
        assert!(files.iter().any(|x| x == f), "examples/python/{f} is missing: {files:?}");
    }
    // Its configuration runs the installed copies.
    let toml = read("examples/python/rpcd.toml");
    assert!(toml.contains(&format!("{EXAMPLES_DOC}/handlers.py")), "examples/python/rpcd.toml does not run {EXAMPLES_DOC}/handlers.py");
    assert!(toml.contains("/usr/share/rpcd"), "examples/python/rpcd.toml does not put /usr/share/rpcd on PYTHONPATH");
}

/// Where zsh looks for vendors' completion functions: Debian's, Fedora's.
const DEB_ZSH_COMPLETIONS: &str = "/usr/share/zsh/vendor-completions";
const RPM_ZSH_COMPLETIONS: &str = "/usr/share/zsh/site-functions";

/// The shell completions that a package ships, (path, shell, program), with
/// zsh's in `zsh_dir`.
fn completion_files(zsh_dir: &str) -> Vec<(String, &'static str, &'static str)> {
    ["rpcctl", "rpcd"]
        .into_iter()
        .flat_map(|prog| {
            [
                (format!("/usr/share/bash-completion/completions/{prog}"), "bash", prog),
                (format!("{zsh_dir}/_{prog}"), "zsh", prog),
                (format!("/usr/share/fish/vendor_completions.d/{prog}.fish"), "fish", prog),
            ]
        })
        .collect()
}

fn check_payload(kind: &str, root: &Path, extra: &[&str], zsh_dir: &str) {
    let examples = python_examples();
    assert!(examples.iter().any(|f| f == "handlers.py"), "{examples:?}");
    let completions = completion_files(zsh_dir);
    let mut want: Vec<String> = PACKAGED
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .chain(examples.iter().map(|f| format!("{EXAMPLES_DOC}/{f}")))
        .chain(completions.iter().map(|(path, _, _)| path.clone()))
        .collect();
    want.sort();
    assert_eq!(files_under(root), want, "{kind}: files");
    {
        use std::os::unix::fs::PermissionsExt;
        let mut shipped = vec![(HANDLER_HELPER.to_string(), "share/rpcd_handler.py".to_string())];
        shipped.extend(examples.iter().map(|f| (format!("{EXAMPLES_DOC}/{f}"), format!("examples/python/{f}"))));
        for (dest, src) in shipped {
            let p = root.join(dest.trim_start_matches('/'));
            // (Not assert_eq!: that would print both files as bytes.)
            assert!(std::fs::read(&p).unwrap() == read(&src).as_bytes(), "{kind}: {dest} is not {src} (changed since the build?)");
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644, "{kind}: {dest} mode");
        }
    }
    assert_eq!(std::fs::read(root.join("etc/rpcd.toml")).unwrap(), read("etc/rpcd.toml").as_bytes(), "{kind}: /etc/rpcd.toml");
    assert_eq!(
        std::fs::read(root.join("usr/lib/systemd/system/rpcd.service")).unwrap(),
        read("packaging/rpcd.service").as_bytes(),
        "{kind}: rpcd.service"
    );
    assert_eq!(
        std::fs::read(root.join("usr/lib/sysusers.d/rpcd.conf")).unwrap(),
        read("packaging/rpcd.sysusers").as_bytes(),
        "{kind}: sysusers"
    );
    for bin in ["usr/sbin/rpcd", "usr/bin/rpcctl"] {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(bin);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o755, "{kind}: {bin} mode");
        let v = Command::new(&p).arg("--version").output().unwrap();
        assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")), "{kind}: {bin} --version: {v:?}");
        let sections = String::from_utf8(Command::new("objdump").arg("-h").arg(&p).output().unwrap().stdout).unwrap();
        assert!(!sections.contains(".debug_info") && !sections.contains(".debug_line"), "{kind}: {bin} is not stripped");
    }
    // The completions are what the packaged binaries print.
    for (path, shell, prog) in &completions {
        use std::os::unix::fs::PermissionsExt;
        let p = root.join(path.trim_start_matches('/'));
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644, "{kind}: {path} mode");
        let (bin, args) = match *prog {
            "rpcctl" => ("usr/bin/rpcctl", ["completions", shell]),
            _ => ("usr/sbin/rpcd", ["--completions", shell]),
        };
        let out = Command::new(root.join(bin)).args(args).output().unwrap();
        assert!(out.status.success() && out.stdout.len() > 100, "{kind}: {prog} completions {shell}: {out:?}");
        assert!(std::fs::read(&p).unwrap() == out.stdout, "{kind}: {path} is not what {prog} prints for {shell}");
    }
    for (page, src) in [("man8/rpcd.8.gz", "man/rpcd.8"), ("man1/rpcctl.1.gz", "man/rpcctl.1"), ("man5/rpcd.toml.5.gz", "man/rpcd.toml.5")]
    {
        let z = Command::new("zcat").arg(root.join("usr/share/man").join(page)).output().unwrap();
        assert!(z.status.success() && z.stdout == read(src).as_bytes(), "{kind}: {page} is not gzipped {src}");
    }
}

fn check_deb(deb: &Path, scratch: &Path) {
    let field = |f: &str| run(&format!("dpkg-deb -f {f}"), Command::new("dpkg-deb").arg("-f").arg(deb).arg(f));
    let depends = field("Depends");
    assert!(depends.contains("libc6 (>="), "Depends not computed from the binaries: {depends}");
    let root = scratch.join("deb");
    run("dpkg-deb -x", Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    check_payload(
        ".deb",
        &root,
        &["/usr/share/doc/rpcd/changelog.Debian.gz", "/usr/share/doc/rpcd/copyright", "/usr/share/lintian/overrides/rpcd"],
        DEB_ZSH_COMPLETIONS,
    );
    let ctl = scratch.join("deb-control");
    run("dpkg-deb -e", Command::new("dpkg-deb").arg("-e").arg(deb).arg(&ctl));
    assert_eq!(std::fs::read_to_string(ctl.join("conffiles")).unwrap().trim(), "/etc/rpcd.toml");
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    // Start on installation; on an upgrade, rpcctl upgrade in place, else
    // a restart (packaging/debian/postinst after the generated snippets).
    for s in [
        "systemd-sysusers",
        "deb-systemd-helper enable rpcd.service",
        "deb-systemd-invoke start rpcd.service",
        "rpcctl --config /etc/rpcd.toml upgrade",
        "deb-systemd-invoke restart rpcd.service",
    ] {
        assert!(postinst.contains(s), "postinst lacks {s:?}:\n{postinst}");
    }
    // Users before units: the service must find its user when it starts;
    // the unit reloaded and started before the upgrade is tried.
    assert!(postinst.find("systemd-sysusers") < postinst.find("deb-systemd-invoke"), "{postinst}");
    assert!(postinst.find("deb-systemd-invoke start") < postinst.find("rpcctl --config"), "{postinst}");
    let prerm = std::fs::read_to_string(ctl.join("prerm")).unwrap();
    assert!(prerm.contains("deb-systemd-invoke stop rpcd.service") && prerm.contains("\"$1\" = remove"), "stops only on removal: {prerm}");
    let postrm = std::fs::read_to_string(ctl.join("postrm")).unwrap();
    assert!(postrm.contains("deb-systemd-helper purge rpcd.service"), "{postrm}");
}

fn check_rpm(rpm: &Path, scratch: &Path) {
    let q = |what: &str, args: &[&str]| run(what, Command::new("rpm").arg("-qp").args(args).arg(rpm));
    let flags = q("rpm -qp file flags", &["--queryformat", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]"]);
    assert!(flags.lines().any(|l| l == "cn /etc/rpcd.toml"), "/etc/rpcd.toml is not %config(noreplace):\n{flags}");
    let scripts = q("rpm -qp --scripts", &["--scripts"]);
    for s in [
        "preinstall scriptlet",
        "systemd-sysusers --replace=/usr/lib/sysusers.d/rpcd.conf",
        "postinstall scriptlet",
        "preset rpcd.service",
        "preuninstall scriptlet",
        "disable --now rpcd.service",
        "postuninstall scriptlet",
        "try-restart rpcd.service",
    ] {
        assert!(scripts.contains(s), "rpm scriptlets lack {s:?}:\n{scripts}");
    }
    let requires = q("rpm -qp --requires", &["--requires"]);
    assert!(requires.contains("libc.so.6()(64bit)") && requires.lines().any(|l| l == "systemd"), "{requires}");
    // Where its files land: installed into a scratch root, without scripts.
    let root = scratch.join("rpm");
    std::fs::create_dir_all(&root).unwrap();
    run(
        "rpm --root -i",
        Command::new("rpm")
            .arg("--root")
            .arg(&root)
            .args(["--dbpath", "/rpmdb", "--nodeps", "--noscripts", "--nosignature", "-i"])
            .arg(rpm),
    );
    std::fs::remove_dir_all(root.join("rpmdb")).unwrap();
    check_payload(".rpm", &root, &[], RPM_ZSH_COMPLETIONS);
}

/// Serialises the root test across concurrent test runs on one machine
/// (the lock is held while the file is open).
struct Lock(#[allow(dead_code)] std::fs::File);

impl Lock {
    fn take() -> Lock {
        let f = std::fs::File::create("/run/lock/rpcd-packaging-test.lock").unwrap();
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        Lock(f)
    }
}

/// Ends the namespace's systemd and purges the package whatever happened.
struct E2eCleanup(PathBuf);

impl Drop for E2eCleanup {
    fn drop(&mut self) {
        let st = Command::new(repo().join("packaging/e2e-systemd")).arg("--cleanup").arg(&self.0).status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("packaging/e2e-systemd --cleanup {}: {st:?}", self.0.display());
        }
        let _ = std::fs::remove_dir(&self.0); // once empty
    }
}

#[test]
fn packages_build_lint_install_and_run_under_systemd() {
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "SKIPPED packages_build_lint_install_and_run_under_systemd: needs root (dpkg -i, namespaces, \
             systemd as PID 1); CI runs as root"
        );
        return;
    }
    let t = Instant::now();
    let _lock = Lock::take();
    let scratch = tempfile::tempdir().unwrap();
    run("packaging/build-packages", &mut Command::new("packaging/build-packages"));
    run("packaging/lint-packages", &mut Command::new("packaging/lint-packages"));
    let out = repo().join("target/packages");
    let deb = one_file(&out, "rpcd_", ".deb");
    let rpm = one_file(&out, "rpcd-", ".rpm");
    check_deb(&deb, scratch.path());
    check_rpm(&rpm, scratch.path());
    // A fixed place, so that a run killed before its clean-up (SIGKILL skips
    // both the script's trap and Drop) is cleaned up by the next one.
    let state = PathBuf::from("/run/rpcd-packaging-e2e");
    drop(E2eCleanup(state.clone()));
    std::fs::create_dir_all(&state).unwrap();
    let _cleanup = E2eCleanup(state.clone());
    let log = run("packaging/e2e-systemd", Command::new("packaging/e2e-systemd").arg("--state").arg(&state).arg(&deb));
    assert!(log.contains("e2e: PASS"), "{log}");
    println!("packaging end to end: {:.0} s", t.elapsed().as_secs_f64());
}
