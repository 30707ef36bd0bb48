//! Shared helpers of xlb's integration tests: a harness that runs the real XDP program with
//! `BPF_PROG_TEST_RUN`, frame builders, and network-namespace test benches.

pub mod frames;
pub mod harness;
pub use xlb_testbed as testbed;

/// Tests need root (BPF, namespaces). Fail loudly rather than skip: a skipped test proves
/// nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "xlb's integration tests load BPF programs and create network namespaces: run them as root (cargo xtask test)"
    );
}

/// The `xlb` binary under test: `XLB_BIN`, else the one next to the test's build.
pub fn xlb_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        return std::path::PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("xlb");
    assert!(
        p.exists(),
        "{} not found: build it first (cargo build -p lb-userspace) or set XLB_BIN",
        p.display()
    );
    p
}

/// How many times each answer occurs.
pub fn counts(v: &[String]) -> std::collections::HashMap<String, usize> {
    let mut m = std::collections::HashMap::new();
    for s in v {
        *m.entry(s.clone()).or_default() += 1;
    }
    m
}

/// Runs `xlb args...` with `stdin` (the admin socket is a path: no namespace needed).
pub fn xlb_with_input(args: &[&str], stdin: &str) -> std::process::Output {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };
    let mut child = Command::new(xlb_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `xlb ipvsadm --socket S args...`: (exit code, stdout, stderr).
pub fn ipvsadm_in(socket: &std::path::Path, args: &[&str], stdin: &str) -> (i32, String, String) {
    let s = socket.to_string_lossy();
    let mut v = vec!["ipvsadm", "--socket", &s];
    v.extend_from_slice(args);
    let o = xlb_with_input(&v, stdin);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// An ipvsadm command line (blank-separated) that must succeed against the bench's
/// balancer; its standard output.
pub fn ipvsadm(b: &testbed::DrBench, line: &str) -> String {
    let args: Vec<&str> = line.split_whitespace().collect();
    let (code, out, err) = ipvsadm_in(&b.socket(), &args, "");
    assert_eq!(code, 0, "ipvsadm {line}: exit {code}\n{err}");
    out
}
