//! Fuzzing of both configuration parsers (xlb's TOML and keepalived.conf): mutated corpus
//! files (`fuzz-corpus/`) never make them panic, and every error they report points at a
//! line of the text.

use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use proptest::{
    prelude::*,
    sample::Index,
    test_runner::{Config, FileFailurePersistence},
};
use xlb::{config, config::ConfigError, keepalived};

const CASES: u32 = 2000;
const TOML_LABEL: &str = "fuzz.toml";
/// A directory that does not exist: relative includes find nothing.
const KEEPALIVED_LABEL: &str = "/nonexistent-xlb-fuzz/keepalived.conf";

fn corpus(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "too few corpus files in {}",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// Tokens that tend to break parsers.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "\"",
    "'",
    "#",
    "!",
    "\\",
    "\n",
    "\r\n",
    "\t",
    " ",
    "=",
    "[",
    "]",
    ",",
    "-",
    "/",
    ":",
    "[[services]]",
    "[[services.backends]]",
    "[dataplane]",
    "[timeouts]",
    "0",
    "-1",
    "1",
    "255",
    "256",
    "65535",
    "65536",
    "2147483648",
    "4294967296",
    "18446744073709551616",
    "99999999999999999999999999999999999999999",
    "1e400",
    "-0",
    "0.0000001",
    "0x10",
    "NaN",
    "inf",
    "ü",
    "日本語",
    "\u{0}",
    "\u{feff}",
    "\u{202e}",
    "\u{85}",
    "🦀",
    "255.255.255.255",
    "0.0.0.0",
    "224.0.0.1",
    "10.0.0.1",
    "10.0.0.1-300",
    "10.0.0.1-10.0.0.0",
    "10.0.0.0/8",
    "10.0.0.0/0",
    "0.0.0.0/0",
    "::",
    "2001:db8::1",
    "2001:db8::1-ffff",
    "[2001:db8::1]:80",
    "fe80::1%eth0",
    "10.0.0.1:80",
    "10.0.0.1:0",
    "fwmark",
    "fwmark 1",
    "group",
    "include",
    "include *",
    "include {a,b}{c,d}",
    "virtual_server",
    "virtual_server_group",
    "real_server",
    "vrrp_instance",
    "vrrp_script",
    "vrrp_sync_group",
    "global_defs",
    "TCP_CHECK",
    "HTTP_GET",
    "MISC_CHECK",
    "url",
    "lb_kind TUN type gue port 0",
    "lb_algo mh",
    "protocol SCTP",
    "persistence_granularity 0.0.0.0",
    "weight",
    "@node",
    "$VAR=1",
    "address = ",
    "ports = [0, \"1-65535\"]",
    "persistence = {}",
    "tunnel = {}",
    "true",
    "\"\"\"",
    "'''",
    "#{",
    "}}}}",
    "{{{{",
];

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    DeleteRange(Index, u8),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    InsertToken(Index, Index),
    InsertText(Index, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), 1u8..40).prop_map(|(i, n)| Mutation::DeleteRange(i, n)),
        1 => any::<Index>().prop_map(Mutation::DeleteLine),
        1 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(a, t)| Mutation::InsertToken(a, t)),
        1 => (any::<Index>(), "[ -~\t\n]{1,12}").prop_map(|(a, s)| Mutation::InsertText(a, s)),
        1 => (any::<Index>(), "\\PC{1,4}").prop_map(|(a, s)| Mutation::InsertText(a, s)),
    ]
}

fn lines_of(b: &[u8]) -> Vec<Vec<u8>> {
    b.split(|c| *c == b'\n').map(|l| l.to_vec()).collect()
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut b = text.as_bytes().to_vec();
    for m in mutations {
        match m {
            Mutation::FlipBit(i, bit) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] ^= 1 << bit;
            }
            Mutation::SetByte(i, v) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] = *v;
            }
            Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
            Mutation::DeleteRange(i, n) if !b.is_empty() => {
                let k = i.index(b.len());
                let end = (k + *n as usize).min(b.len());
                b.drain(k..end);
            }
            Mutation::DeleteLine(i) | Mutation::DuplicateLine(i) => {
                let mut lines = lines_of(&b);
                let k = i.index(lines.len());
                if matches!(m, Mutation::DeleteLine(_)) {
                    lines.remove(k);
                } else {
                    let l = lines[k].clone();
                    lines.insert(k, l);
                }
                b = lines.join(&b'\n');
            }
            Mutation::SwapLines(x, y) => {
                let mut lines = lines_of(&b);
                let n = lines.len();
                lines.swap(x.index(n), y.index(n));
                b = lines.join(&b'\n');
            }
            Mutation::InsertToken(at, t) => {
                let k = at.index(b.len() + 1);
                let tok = TOKENS[t.index(TOKENS.len())].as_bytes();
                b.splice(k..k, tok.iter().copied());
            }
            Mutation::InsertText(at, s) => {
                let k = at.index(b.len() + 1);
                b.splice(k..k, s.bytes());
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// The error must name the parsed text (`label`) and one of its lines (or the one after
/// its end).
fn located_in(text: &str, label: &str, e: &ConfigError) -> Result<(), String> {
    if e.file != label {
        // Only an include that resolved to a real file can name another one.
        return if e.line >= 1 || e.message.contains("cannot read") {
            Ok(())
        } else {
            Err(format!("error in {} without a line: {e}", e.file))
        };
    }
    let lines = text.lines().count();
    if e.line == 0 || e.line > lines + 1 {
        return Err(format!("line {} not within 1..={}: {e}", e.line, lines + 1));
    }
    Ok(())
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

fn check_toml(text: &str) -> Result<(), String> {
    let r = catch_unwind(|| config::parse(Path::new(TOML_LABEL), text))
        .map_err(|p| format!("config::parse panicked: {}", panic_text(p)))?;
    match r {
        Ok(_) => Ok(()),
        Err(e) => located_in(text, TOML_LABEL, &e),
    }
}

fn check_keepalived(text: &str) -> Result<(), String> {
    let r = catch_unwind(AssertUnwindSafe(|| {
        let k = keepalived::parse_str(Path::new(KEEPALIVED_LABEL), text)?;
        for w in &k.warnings {
            assert!(w.line >= 1 && !w.to_string().is_empty(), "{w}");
        }
        let _ = (k.timeouts(), k.vrrp_interfaces());
        k.services().map(|(s, w)| (s, w, k))
    }))
    .map_err(|p| format!("keepalived panicked: {}", panic_text(p)))?;
    match r {
        Ok((services, warnings, k)) => {
            for w in k.warnings.iter().chain(&warnings) {
                if w.file == KEEPALIVED_LABEL && w.line > text.lines().count() + 1 {
                    return Err(format!("warning outside the text: {w}"));
                }
            }
            for s in &services {
                if s.backends.is_empty() || s.ports.is_empty() {
                    return Err(format!("service without backends or ports: {s:?}"));
                }
            }
            Ok(())
        }
        Err(e) => located_in(text, KEEPALIVED_LABEL, &e),
    }
}

fn config() -> Config {
    Config {
        cases: CASES,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz_config.proptest-regressions",
        ))),
        ..Config::default()
    }
}

fn case() -> impl Strategy<Value = (Index, Vec<Mutation>)> {
    (any::<Index>(), prop::collection::vec(mutation(), 1..8))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn toml_parser_survives_mutations((file, mutations) in case()) {
        let corpus = corpus("toml");
        let (path, text) = &corpus[file.index(corpus.len())];
        let text = apply(text, &mutations);
        if let Err(m) = check_toml(&text) {
            return Err(TestCaseError::fail(format!("{} mutated: {m}\n{text:?}", path.display())));
        }
    }

    #[test]
    fn keepalived_parser_survives_mutations((file, mutations) in case()) {
        let corpus = corpus("keepalived");
        let (path, text) = &corpus[file.index(corpus.len())];
        let text = apply(text, &mutations);
        if let Err(m) = check_keepalived(&text) {
            return Err(TestCaseError::fail(format!("{} mutated: {m}\n{text:?}", path.display())));
        }
    }
}

#[test]
fn the_corpus_files_are_valid() {
    for (path, text) in corpus("toml") {
        config::parse(&path, &text).unwrap_or_else(|e| panic!("{e}"));
    }
    for (path, text) in corpus("keepalived") {
        let k = keepalived::parse_str(&path, &text).unwrap_or_else(|e| panic!("{e}"));
        let (services, _) = k.services().unwrap_or_else(|e| panic!("{e}"));
        assert!(!services.is_empty(), "{}", path.display());
    }
}

/// Every prefix of every corpus file, and every file less one line.
#[test]
fn every_truncation_and_every_missing_line() {
    let mut failures = Vec::new();
    for (kind, check) in [
        ("toml", check_toml as fn(&str) -> Result<(), String>),
        ("keepalived", check_keepalived),
    ] {
        for (path, text) in corpus(kind) {
            let b = text.as_bytes();
            let lines = lines_of(b);
            let variants = (0..b.len())
                .map(|n| b[..n].to_vec())
                .chain((0..lines.len()).map(|i| {
                    let mut l = lines.clone();
                    l.remove(i);
                    l.join(&b'\n')
                }));
            for v in variants {
                let t = String::from_utf8_lossy(&v);
                if let Err(m) = check(&t) {
                    failures.push(format!("{}: {m}\n{t:?}", path.display()));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures, first: {}",
        failures.len(),
        failures[0]
    );
}
