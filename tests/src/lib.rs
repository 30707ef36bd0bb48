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
