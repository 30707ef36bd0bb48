//! Builds the baseline programs and the shim (`bench/ebpf`) with nightly.
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    lb_build::build(
        &root,
        &[lb_build::EbpfCrate {
            package: "xlb-bench-ebpf",
            dir: "bench/ebpf",
            bins: &["xlb-bench"],
        }],
        &["lb-common/src"],
    );
}
