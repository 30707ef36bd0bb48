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
