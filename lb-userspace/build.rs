//! Builds the XDP program (`lb-ebpf`) with nightly and embeds it in the `xlb` binary.
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    lb_build::build(
        &root,
        &[lb_build::EbpfCrate {
            package: "lb-ebpf",
            dir: "lb-ebpf",
            bins: &["xlb", "xlb-decap"],
        }],
        &["lb-common/src"],
    );
}
