//! Used by the build scripts of `lb-userspace` and `bench`: compiles an eBPF crate of this
//! workspace with the nightly toolchain for `bpfel-unknown-none` (`-Z build-std=core`, linked by
//! bpf-linker) and copies the object files into `OUT_DIR`, where `include_bytes!` picks them up.
//!
//! It does what aya-build does, plus checks the toolchain first so that a machine without
//! bpf-linker or nightly's rust-src gets one clear message: run `cargo xtask setup`.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The nightly toolchain the eBPF crates build with.
pub const TOOLCHAIN: &str = "nightly";
pub const TARGET: &str = "bpfel-unknown-none";

/// An eBPF crate of the workspace and the binaries (object files) it produces.
pub struct EbpfCrate<'a> {
    /// Package name, e.g. `lb-ebpf`.
    pub package: &'a str,
    /// Directory of the crate relative to the workspace root.
    pub dir: &'a str,
    /// `[[bin]]` names; each is copied to `OUT_DIR/<name>.bpf.o`.
    pub bins: &'a [&'a str],
}

/// Builds the crates; on failure prints why to stderr and exits the build script.
pub fn build(workspace_root: &Path, crates: &[EbpfCrate<'_>], extra_watch: &[&str]) {
    if let Err(msg) = try_build(workspace_root, crates, extra_watch) {
        eprintln!("\nerror: {msg}\n");
        std::process::exit(1);
    }
}

fn setup_hint(what: &str) -> String {
    format!(
        "{what}\n       The eBPF toolchain is incomplete: run `cargo xtask setup` (installs it idempotently)."
    )
}

fn try_build(root: &Path, crates: &[EbpfCrate<'_>], extra_watch: &[&str]) -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    for c in crates {
        println!("cargo:rerun-if-changed={}", root.join(c.dir).display());
    }
    for w in extra_watch {
        println!("cargo:rerun-if-changed={}", root.join(w).display());
    }

    check_toolchain()?;
    let linker = find_bpf_linker().ok_or_else(|| {
        setup_hint("bpf-linker was not found (neither on PATH nor in ~/.cargo/bin).")
    })?;
    println!("cargo:rerun-if-changed={}", linker.display());

    let target_dir = root.join("target").join("bpf");
    for c in crates {
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root)
            .args([
                "run",
                TOOLCHAIN,
                "cargo",
                "build",
                "--package",
                c.package,
                "--bins",
                "--release",
            ])
            .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
            .arg(&target_dir);
        // The outer cargo's settings describe the host build; none of them apply here.
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MAKEFLAGS",
            "RUSTUP_TOOLCHAIN",
        ] {
            cmd.env_remove(var);
        }
        let flags = [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
            // Global BPF functions (verified once, on their own): see `lb-ebpf`'s `xlb_pick`.
            "-Clink-arg=--export=xlb_pick",
            // BPF ISA v3: atomic fetch-and-add (shared round-robin counters), 32-bit jumps.
            "-Ctarget-cpu=v3",
        ];
        cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
        // bpf-linker may live in ~/.cargo/bin, which is not always on a build script's PATH.
        if let Some(dir) = linker.parent() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![dir.to_path_buf()];
            paths.extend(env::split_paths(&path));
            cmd.env("PATH", env::join_paths(paths).map_err(|e| e.to_string())?);
        }
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| setup_hint(&format!("cannot run rustup: {e}")))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            for line in stderr.lines() {
                println!("cargo:warning={line}");
            }
            let hint = if stderr.contains("rust-src") || stderr.contains("bpf-linker") {
                setup_hint("")
            } else {
                String::new()
            };
            return Err(format!(
                "building the eBPF crate {} failed ({}):\n{stderr}{hint}",
                c.package, out.status
            ));
        }
        for bin in c.bins {
            let built = target_dir.join(TARGET).join("release").join(bin);
            let dst = out_dir.join(format!("{bin}.bpf.o"));
            std::fs::copy(&built, &dst)
                .map_err(|e| format!("copying {} to {}: {e}", built.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// Nightly must be installed and have rust-src (for `-Z build-std=core`).
fn check_toolchain() -> Result<(), String> {
    let out = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .map_err(|e| setup_hint(&format!("cannot run rustup: {e}")))?;
    if !out.status.success() {
        return Err(setup_hint(&format!(
            "the {TOOLCHAIN} Rust toolchain is not usable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if !core.exists() {
        return Err(setup_hint(&format!(
            "rust-src is not installed for the {TOOLCHAIN} toolchain ({} is missing).",
            core.display()
        )));
    }
    Ok(())
}

fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
