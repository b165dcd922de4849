//! Shell completion scripts: `rpcctl completions SHELL` and `rpcd
//! --completions SHELL`, made by the built binaries. The bash scripts are
//! sourced in a real bash (no rc files, no bash-completion package: clap's
//! script needs only bash's builtins) and driven the way bash drives a
//! <TAB>; the zsh and fish scripts are checked as text, and by zsh and fish
//! themselves where those are installed.

use std::process::Command;

const RPCD: &str = env!("CARGO_BIN_EXE_rpcd");
const RPCCTL: &str = env!("CARGO_BIN_EXE_rpcctl");

/// The script that `bin args` prints: exit 0, nothing on stderr.
fn script(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().unwrap();
    assert!(out.status.success() && out.stderr.is_empty(), "{bin} {args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.len() > 100, "{bin} {args:?}: {text:?}");
    text
}

/// The commands that `rpcctl --help` lists.
fn rpcctl_commands() -> Vec<String> {
    let out = Command::new(RPCCTL).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<String> = text
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert!(v.len() >= 7 && v.iter().any(|c| c == "completions"), "{v:?}");
    v
}

/// Sources `script` in a non-interactive bash, reads `complete -p` for the
/// command `words[0]`, and calls the function it names as bash does for a
/// <TAB> at the end of `words` (the last word is the one being completed;
/// "" for a <TAB> after a space). Returns that `complete -p` line and the
/// completions (COMPREPLY), or Err with bash's output when a step failed.
fn bash_complete(script: &str, words: &[&str]) -> Result<(String, Vec<String>), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("completion.bash");
    std::fs::write(&path, script).unwrap();
    // $1: the script; the rest: the words.
    let driver = r#"
        source "$1" || exit 10
        shift
        spec=$(complete -p "$1") || exit 11
        printf 'spec:%s\n' "$spec"
        fn=${spec##* -F }
        fn=${fn%% *}
        declare -F "$fn" >/dev/null || { echo "no function $fn"; exit 12; }
        COMP_WORDS=("$@")
        COMP_CWORD=$(($# - 1))
        COMP_LINE="$*"
        COMP_POINT=${#COMP_LINE}
        COMP_TYPE=9
        COMP_KEY=9
        COMPREPLY=()
        prev=
        [ "$COMP_CWORD" -gt 0 ] && prev=${COMP_WORDS[COMP_CWORD-1]}
        "$fn" "$1" "${COMP_WORDS[COMP_CWORD]}" "$prev" || exit 13
        for r in "${COMPREPLY[@]}"; do printf 'reply:%s\n' "$r"; done
    "#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", driver, "bash"])
        .arg(&path)
        .args(words)
        .env_remove("BASH_ENV")
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !out.stderr.is_empty() {
        return Err(format!("bash, completing {words:?}: {}\n{text}", out.status));
    }
    let spec = text.lines().find_map(|l| l.strip_prefix("spec:")).ok_or_else(|| text.clone())?.to_string();
    let replies = text.lines().filter_map(|l| l.strip_prefix("reply:")).map(str::to_string).collect();
    Ok((spec, replies))
}

/// The completions of `words`, sorted, after checking that `complete -p`
/// names the function `_NAME` for the command NAME.
fn completions(script: &str, words: &[&str]) -> Vec<String> {
    let (spec, mut replies) = bash_complete(script, words).unwrap_or_else(|e| panic!("{e}"));
    let name = words[0];
    assert!(spec.starts_with("complete ") && spec.ends_with(&format!(" -F _{name} {name}")), "complete -p {name}: {spec:?}");
    replies.sort();
    replies
}

fn strings(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn rpcctl_bash_completes_commands_options_and_values() {
    let bash = script(RPCCTL, &["completions", "bash"]);
    assert_eq!(completions(&bash, &["rpcctl", "st"]), strings(&["status", "stop"]));
    assert_eq!(completions(&bash, &["rpcctl", "sta"]), strings(&["status"]));
    assert_eq!(completions(&bash, &["rpcctl", "comp"]), strings(&["completions"]));
    // Every command is offered at the first word.
    let all = completions(&bash, &["rpcctl", ""]);
    for c in rpcctl_commands() {
        assert!(all.contains(&c), "rpcctl <TAB> does not offer {c}: {all:?}");
    }
    // A command's own options, after the global ones.
    assert_eq!(completions(&bash, &["rpcctl", "--config", "/etc/rpcd.toml", "status", "--j"]), strings(&["--json"]));
    assert_eq!(completions(&bash, &["rpcctl", "stop", "--r"]), strings(&["--restart"]));
    // Values: the shells, and --strategy's.
    let shells = completions(&bash, &["rpcctl", "completions", ""]);
    for s in ["bash", "zsh", "fish"] {
        assert!(shells.contains(&s.to_string()), "{shells:?}");
    }
    assert_eq!(completions(&bash, &["rpcctl", "completions", "z"]), strings(&["zsh"]));
    assert_eq!(completions(&bash, &["rpcctl", "call", "ping", "--strategy", ""]), strings(&["random", "round-robin"]));
}

#[test]
fn rpcd_bash_completes_options_and_not_the_internal_one() {
    let bash = script(RPCD, &["--completions", "bash"]);
    assert_eq!(completions(&bash, &["rpcd", "--comp"]), strings(&["--completions"]));
    assert_eq!(completions(&bash, &["rpcd", "--co"]), strings(&["--completions", "--config"]));
    assert_eq!(completions(&bash, &["rpcd", "--completions", ""]), strings(&["bash", "fish", "zsh"]));
    assert_eq!(completions(&bash, &["rpcd", "--check-config", "--ch"]), strings(&["--check-config"]));
    // --worker (the master starts its workers with it) is not offered.
    assert_eq!(completions(&bash, &["rpcd", "--w"]), Vec::<String>::new());
    assert!(!bash.contains("worker"), "{bash}");
}

#[test]
fn a_broken_script_fails_the_bash_check() {
    // The harness itself: a script whose `complete` names a function it does
    // not define is caught (the same check on the real script passes above).
    let bash = script(RPCCTL, &["completions", "bash"]);
    let broken = bash.replace("-F _rpcctl ", "-F _rpcctl_missing ");
    assert_ne!(broken, bash);
    let e = bash_complete(&broken, &["rpcctl", "st"]).expect_err("a missing function");
    assert!(e.contains("no function _rpcctl_missing"), "{e}");
    // And one that completes the wrong words is caught by the assertions.
    let wrong = bash.replace("status stop", "stop");
    assert_ne!(wrong, bash);
    let (_, replies) = bash_complete(&wrong, &["rpcctl", "st"]).unwrap();
    assert_eq!(replies, ["stop"]);
}

#[test]
fn rpcd_completions_reads_no_configuration_and_takes_no_other_option() {
    // No configuration is read: an absent file does not matter ...
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(RPCD).arg("--completions").arg("bash").current_dir(dir.path()).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // ... and naming one, or another mode, is a usage error.
    for other in [&["--config", "/nonexistent/rpcd.toml"][..], &["--check-config"], &["-t"]] {
        let out = Command::new(RPCD).args(["--completions", "bash"]).args(other).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "rpcd --completions bash {other:?}: {out:?}");
    }
    // Only the shells that the packages ship.
    let out = Command::new(RPCD).args(["--completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = Command::new(RPCCTL).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

fn has(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn zsh_scripts_name_every_command_and_option() {
    let ctl = script(RPCCTL, &["completions", "zsh"]);
    assert!(ctl.starts_with("#compdef rpcctl\n"), "{ctl}");
    for c in rpcctl_commands() {
        assert!(ctl.contains(&format!("\n'{c}:")), "rpcctl's zsh script lacks the command {c}");
    }
    for o in ["--socket=", "--config=", "--json[", "--restart[", "--strategy=", "(random round-robin)", "(bash zsh fish)"] {
        assert!(ctl.contains(o), "rpcctl's zsh script lacks {o:?}");
    }
    let d = script(RPCD, &["--completions", "zsh"]);
    assert!(d.starts_with("#compdef rpcd\n"), "{d}");
    for o in ["'--config=", "'--check-config[", "'--completions=", "(bash zsh fish)"] {
        assert!(d.contains(o), "rpcd's zsh script lacks {o:?}");
    }
    assert!(!d.contains("worker"), "{d}");
    if !has("zsh") {
        println!("zsh is not installed: the zsh scripts are checked as text only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [("rpcctl", &ctl), ("rpcd", &d)] {
        let f = dir.path().join(format!("_{name}"));
        std::fs::write(&f, text).unwrap();
        // Valid zsh, and compinit registers its function for the command.
        let out = Command::new("zsh").arg("-n").arg(&f).output().unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "zsh -n _{name}: {out:?}");
        let probe = format!("autoload -U compinit && compinit -u -D && source {} && print -r -- $_comps[{name}]", f.display());
        let out = Command::new("zsh").args(["-f", "-c", &probe]).env("HOME", dir.path()).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("_{name}"), "zsh: {out:?}");
    }
}

#[test]
fn fish_scripts_name_every_command_and_option() {
    let ctl = script(RPCCTL, &["completions", "fish"]);
    for c in rpcctl_commands() {
        assert!(ctl.contains(&format!("-a \"{c}\"")), "rpcctl's fish script lacks the command {c}");
    }
    for o in ["-l socket", "-l config", "-l json", "-l restart", "-l strategy"] {
        assert!(ctl.contains(o), "rpcctl's fish script lacks {o:?}");
    }
    let d = script(RPCD, &["--completions", "fish"]);
    for o in ["complete -c rpcd -s c -l config", "complete -c rpcd -s t -l check-config", "complete -c rpcd -l completions"] {
        assert!(d.contains(o), "rpcd's fish script lacks {o:?}");
    }
    assert!(!d.contains("worker"), "{d}");
    if !has("fish") {
        println!("fish is not installed: the fish scripts are checked as text only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let complete = |name: &str, text: &str, line: &str| -> Vec<String> {
        let f = dir.path().join(format!("{name}.fish"));
        std::fs::write(&f, text).unwrap();
        let probe = format!("source {}; complete -C '{line}'", f.display());
        let out = Command::new("fish")
            .args(["--no-config", "-c", &probe])
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "fish, completing {line:?}: {out:?}");
        let mut v: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split('\t').next().unwrap().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(complete("rpcctl", &ctl, "rpcctl sta"), strings(&["status"]));
    assert_eq!(complete("rpcctl", &ctl, "rpcctl st"), strings(&["status", "stop"]));
    assert_eq!(complete("rpcd", &d, "rpcd --comp"), strings(&["--completions"]));
    assert_eq!(complete("rpcd", &d, "rpcd --completions "), strings(&["bash", "fish", "zsh"]));
}
