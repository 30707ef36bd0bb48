//! `cargo xtask <task>`: everything the project needs on a fresh machine, in one place.
//!
//! * `setup`  - installs (idempotently) the Debian packages, nightly's rust-src and bpf-linker;
//! * `build`  - setup, then a release build (`target/release/xlb` with the XDP object inside);
//! * `demo`   - the main job: a direct-routing balancer on network namespaces (or, with
//!   `--config`, xlb run on real interfaces);
//! * `test`   - formatting, lints, unit tests, packet tests and end-to-end tests;
//! * `bench`  - ns/packet against baselines measured in the same run.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use xlb_testbed::{DrBench, cleanup_prefix, http_get, in_netns};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent).
    Setup,
    /// Setup, then build everything in release mode.
    Build,
    /// Run the demo: client, balancer and three real servers in network namespaces.
    Demo {
        /// Instead of the namespace demo, run xlb on real interfaces with this configuration.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Requests per service.
        #[arg(long, default_value_t = 12)]
        requests: usize,
    },
    /// Run every check and test (as root).
    Test,
    /// Run the benchmarks (as root) and print ns/packet and ratios.
    Bench,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn status(mut c: Command) -> Result<()> {
    let what = format!("{c:?}");
    let st = c.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            let mut c = cargo();
            c.args(["build", "--release"]);
            status(c)
        }
        Task::Demo { config, requests } => demo(config, requests),
        Task::Test => test(),
        Task::Bench => bench(),
    }
}

// ---- setup ----

/// Debian packages: the LLVM bpf-linker links against, the kernel tools the tests drive, and
/// nginx as the real servers' HTTP server, tshark/tcpdump to capture and decode packets.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang",
    "bpftool",
    "iproute2",
    "ethtool",
    "nginx",
    "tshark",
    "tcpdump",
    // The real keepalived the VRRP tests interoperate with (Debian's policy-rc.d keeps it
    // from starting as a service).
    "keepalived",
];

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// promtool (the metrics tests check the exposition format with it) comes out of Debian's
/// prometheus package, unpacked rather than installed: installing would start a Prometheus
/// server.
fn install_promtool() -> Result<()> {
    if succeeds("promtool", &["--version"]) {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("promtool is missing: run `cargo xtask setup` as root");
    }
    eprintln!("setup: installing promtool (from Debian's prometheus package)");
    let dir = std::env::temp_dir().join(format!("xlb-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut download = Command::new("apt-get");
    download
        .args(["download", "-q", "prometheus"])
        .current_dir(&dir);
    if status(download).is_err() {
        let mut update = Command::new("apt-get");
        update
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(update)?;
        let mut download = Command::new("apt-get");
        download
            .args(["download", "-q", "prometheus"])
            .current_dir(&dir);
        status(download)?;
    }
    let deb = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| anyhow::anyhow!("apt-get download prometheus left no .deb"))?;
    let mut unpack = Command::new("dpkg-deb");
    unpack.arg("-x").arg(&deb).arg(dir.join("root"));
    status(unpack)?;
    std::fs::copy(dir.join("root/usr/bin/promtool"), "/usr/local/bin/promtool")
        .context("installing /usr/local/bin/promtool")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        if !nix::unistd::geteuid().is_root() {
            bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root");
        }
        eprintln!("setup: installing {}", missing.join(" "));
        let mut update = Command::new("apt-get");
        update
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(update)?;
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        status(install)?;
    }

    install_promtool()?;

    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        eprintln!("setup: installing the nightly toolchain");
        let mut c = Command::new("rustup");
        c.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]);
        status(c)?;
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
    {
        eprintln!("setup: adding rust-src to nightly");
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        status(c)?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("0.13"))
        .unwrap_or(false)
        || home_bin("bpf-linker")
            .and_then(|p| Command::new(p).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("0.13"))
            .unwrap_or(false);
    if !linker_ok {
        eprintln!("setup: building bpf-linker 0.13 against LLVM 22 (a few minutes)");
        let install = |locked: bool| {
            let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
            c.args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
            ])
            .args(["--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
            if locked {
                c.arg("--locked");
            }
            status(c)
        };
        if install(true).is_err() {
            install(false)?;
        }
    }
    eprintln!(
        "setup: toolchain ready (nightly + rust-src, bpf-linker 0.13, LLVM 22, kernel tools)"
    );
    Ok(())
}

fn home_bin(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let p = home.join("bin").join(name);
    p.exists().then_some(p)
}

// ---- test ----

fn test() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the tests load XDP programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    setup()?;
    eprintln!("== cargo fmt --check");
    let mut c = cargo();
    c.args(["fmt", "--all", "--", "--check"]);
    status(c)?;
    eprintln!("== clippy (host crates)");
    let mut c = cargo();
    c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    status(c)?;
    eprintln!("== clippy (eBPF crates)");
    for pkg in ["lb-ebpf", "xlb-bench-ebpf"] {
        let mut c = Command::new("rustup");
        c.current_dir(root())
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                pkg,
                "--target",
                "bpfel-unknown-none",
            ])
            .args([
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/bpf-clippy",
                "--",
                "-D",
                "warnings",
            ])
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO");
        status(c)?;
    }
    eprintln!("== build xlb for the end-to-end tests");
    let mut c = cargo();
    c.args(["build", "-p", "lb-userspace"]);
    status(c)?;
    eprintln!("== tests: unit, packet (BPF_PROG_TEST_RUN), end-to-end (network namespaces)");
    let mut c = cargo();
    c.args(["test", "--no-fail-fast"])
        .env("XLB_BIN", root().join("target/debug/xlb"));
    status(c)?;
    eprintln!("== all tests passed");
    Ok(())
}

// ---- bench ----

fn bench() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark loads XDP programs: run `cargo xtask bench` as root");
    }
    setup()?;
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "-p",
        "xlb-bench",
        "-p",
        "lb-userspace",
    ]);
    status(c)?;
    status(Command::new(root().join("target/release/xlb-bench")))?;
    // The control plane at scale: a real daemon, its API and metrics.
    let mut c = Command::new(root().join("target/release/xlb-bench"));
    c.arg("control");
    status(c)
}

// ---- demo ----

const DEMO_PREFIX: &str = "xlb-demo";

fn demo(config: Option<PathBuf>, requests: usize) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo attaches XDP programs and creates network namespaces: run `cargo xtask demo` as root"
        );
    }
    setup()?;
    let mut c = cargo();
    c.args(["build", "--release", "-p", "lb-userspace"]);
    status(c)?;
    let xlb = root().join("target/release/xlb");
    if let Some(cfg) = config {
        // Real interfaces: run the daemon in the foreground until interrupted.
        let mut c = Command::new(&xlb);
        c.args(["run", "--config"]).arg(cfg);
        return status(c);
    }

    // Interrupted? Clean up the namespaces (and everything running in them) before leaving.
    let signals = nix::sys::signal::SigSet::from_iter([
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ]);
    signals.thread_block()?;
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            eprintln!("\n{sig}: tearing the demo down");
            cleanup_prefix(DEMO_PREFIX);
            std::process::exit(130);
        }
    });

    let mut b = DrBench::new(DEMO_PREFIX, 3, &xlb)?;
    println!("== xlb demo: direct routing on network namespaces");
    println!(
        "   client {} / {}  ->  balancer (xlb, XDP on eth0; VIPs {} and {})  ->  {} (nginx, VIP on lo)",
        b.client4,
        b.client6,
        b.vip4,
        b.vip6,
        b.servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    b.start_http()?;
    let mut services = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nprotocol = \"tcp\"\nscheduler = \"rr\"\nforwarding = \"dr\"\n",
        b.vip4
    );
    for s in &b.servers {
        services += &format!(
            "\n[[services.backends]]\naddress = \"{}:80\"\nweight = 1\n",
            s.v4
        );
    }
    services += &format!(
        "\n[[services]]\nname = \"web6\"\naddress = \"[{}]:80\"\nscheduler = \"wrr\"\n",
        b.vip6
    );
    for (s, w) in b.servers.iter().zip([3, 2, 1]) {
        services += &format!(
            "\n[[services.backends]]\naddress = \"[{}]:80\"\nweight = {w}\n",
            s.v6
        );
    }
    let cfg = b.config(&services);
    println!(
        "\n== configuration ({})\n{}",
        b.bench.dir.join("xlb.toml").display(),
        indent(&cfg)
    );
    b.start_xlb(&xlb, &cfg)?;
    println!(
        "== xlb is running in {} (log: {})",
        b.lb,
        b.bench.dir.join("xlb.log").display()
    );

    for (vip, what) in [
        (SocketAddr::new(IpAddr::V4(b.vip4), 80), "rr"),
        (
            SocketAddr::new(IpAddr::V6(b.vip6), 80),
            "wrr, weights 3:2:1",
        ),
    ] {
        println!(
            "\n== {requests} HTTP requests from the client to http://{vip}/ ({what}), one TCP connection each"
        );
        let answers = in_netns(&b.cli, move || -> Vec<Result<String, String>> {
            (0..requests)
                .map(|_| http_get(vip).map_err(|e| format!("{e:#}")))
                .collect()
        })?;
        for (i, a) in answers.iter().enumerate() {
            match a {
                Ok(server) => println!("   request {:>2}: answered by {server}", i + 1),
                Err(e) => println!("   request {:>2}: FAILED: {e}", i + 1),
            }
        }
        if answers.iter().any(|a| a.is_err()) {
            bail!("some requests failed; xlb log:\n{}", b.bench.log("xlb.log"));
        }
    }

    let socket = b.socket();
    // ipvsadm's own command lines against the daemon, then the data plane's counters.
    for args in [
        &["ipvsadm", "-L", "-n"][..],
        &["ipvsadm", "-L", "-n", "--stats"],
        &["ipvsadm", "-S", "-n"],
        &["counters"],
    ] {
        println!("\n== xlb {}", args.join(" "));
        let mut c = Command::new(&xlb);
        if args[0] == "ipvsadm" {
            c.arg("ipvsadm")
                .arg("--socket")
                .arg(&socket)
                .args(&args[1..]);
        } else {
            c.args(args).arg("--socket").arg(&socket);
        }
        let out = c.output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if args[0] == "counters" {
            for l in text.lines().filter(|l| !l.trim_end().ends_with(" 0")) {
                println!("{l}");
            }
        } else {
            print!("{text}");
        }
    }
    // A few lines of what Prometheus scrapes.
    let lb = b.lb.clone();
    if let Ok(metrics) = b.bench.exec(
        &lb,
        &[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:9469/metrics",
        ],
    ) {
        println!("\n== curl http://127.0.0.1:9469/metrics (in the balancer's namespace; excerpt)");
        for l in metrics.lines().filter(|l| {
            l.starts_with("node_ipvs_connections_total")
                || l.starts_with("node_ipvs_backend_connections_inactive{local_address=\"10.")
                || l.starts_with("xlb_config_generation")
        }) {
            println!("{l}");
        }
    }
    println!("\n== tearing down (namespaces, nginx, xlb)");
    drop(b);
    println!("== done");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("   {l}\n")).collect()
}
