use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xlb::{
    api::{self, CountersResponse, ServicesResponse, StatusResponse},
    config, daemon, dataplane, decap, ipvsadm,
};

/// xlb: an XDP layer-4 load balancer with IPVS semantics.
#[derive(Parser)]
#[command(name = "xlb", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the balancer: load the XDP program, fill it from the config, attach, serve.
    Run {
        /// Configuration file (TOML).
        #[arg(
            long,
            short,
            required_unless_present = "keepalived",
            conflicts_with = "keepalived"
        )]
        config: Option<PathBuf>,
        /// Run from a keepalived.conf instead (virtual_server blocks become services).
        #[arg(long)]
        keepalived: Option<PathBuf>,
        /// With --keepalived: attach here (repeatable; default: the vrrp_instances'
        /// interfaces, else the ones that route the VIPs).
        #[arg(long = "interface", short = 'i', requires = "keepalived")]
        interfaces: Vec<String>,
        /// Admin API socket (overrides the config's [control] socket).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Replace the daemon running on the same socket without losing a connection: it
        /// hands over its pinned maps and attached program, and this one swaps in its program
        /// atomically (an upgrade or restart).
        #[arg(long)]
        takeover: bool,
        /// bpffs directory for the pinned maps (overrides [control] pin_dir; default: one
        /// per socket under /sys/fs/bpf/xlb).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// /metrics listener, address:port or "off" (overrides [control] metrics).
        #[arg(long)]
        metrics: Option<String>,
    },
    /// Re-read the running daemon's configuration and apply what changed (as SIGHUP does).
    Reload {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// ipvsadm, against the running daemon: `xlb ipvsadm -Ln`, `xlb ipvsadm -A -t ...`,
    /// `xlb ipvsadm -S`; also reached through links named ipvsadm, ipvsadm-save and
    /// ipvsadm-restore (see `xlb links`). `--socket PATH` may come first.
    #[command(disable_help_flag = true)]
    Ipvsadm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Create links named ipvsadm, ipvsadm-save and ipvsadm-restore to this binary in DIR,
    /// so that existing scripts drive xlb unchanged.
    Links {
        /// Directory for the links (e.g. /usr/local/sbin).
        dir: PathBuf,
        /// Replace existing files of those names.
        #[arg(long)]
        force: bool,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Print the running table as `ipvsadm -L -n` does.
    List {
        /// Numeric output (xlb never resolves names; accepted for ipvsadm habits).
        #[arg(short = 'n', long)]
        numeric: bool,
        /// Traffic counters (`ipvsadm -L -n --stats`).
        #[arg(long)]
        stats: bool,
        /// Exact numbers instead of K/M/G (`--exact`).
        #[arg(long, short = 'X')]
        exact: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print the health of every checked real server and its checks.
    Health {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print the data plane's verdict and event counters.
    Counters {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print where the program is attached and how much memory its maps use.
    Status {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// On a real server of a tunnelling service: strip xlb's tunnel headers (IPIP, IPv6 in
    /// IPv6, GUE, GRE) from packets for the VIPs and hand them to the local stack. Runs until
    /// SIGINT/SIGTERM, then detaches and prints its counters.
    Decap {
        /// Interface receiving the tunnelled packets (repeatable).
        #[arg(long = "interface", short = 'i', required = true)]
        interfaces: Vec<String>,
        /// A VIP served by this real server (repeatable).
        #[arg(long = "vip", required = true)]
        vips: Vec<std::net::IpAddr>,
        /// A UDP port GUE packets arrive on (repeatable; none = no GUE).
        #[arg(long = "gue-port")]
        gue_ports: Vec<u16>,
        /// XDP attach mode: auto, native or generic.
        #[arg(long, default_value = "auto")]
        xdp_mode: String,
    },
    /// Helpers for test benches.
    #[command(hide = true)]
    Util {
        #[command(subcommand)]
        cmd: UtilCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a keepalived.conf as the equivalent xlb TOML configuration.
    Convert {
        /// The keepalived.conf.
        file: PathBuf,
        /// Interfaces for [dataplane] (default: the file's vrrp_instance interfaces).
        #[arg(long = "interface", short = 'i')]
        interfaces: Vec<String>,
    },
    /// Validate a configuration file (TOML, or keepalived.conf with --keepalived).
    Check {
        file: PathBuf,
        #[arg(long)]
        keepalived: bool,
    },
}

#[derive(Subcommand)]
enum UtilCmd {
    /// Attach a pass-through XDP program that stays after exit (veth peers in test benches).
    XdpPass { interfaces: Vec<String> },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XLB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Called as ipvsadm / ipvsadm-save / ipvsadm-restore: behave as that program.
    let mut argv = std::env::args();
    let invoked = argv
        .next()
        .map(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    if matches!(
        invoked.as_str(),
        "ipvsadm" | "ipvsadm-save" | "ipvsadm-restore"
    ) {
        let (socket, args) = take_socket(argv.collect());
        let code = rt.block_on(xlb::ipvsadm_cli::run(
            &invoked,
            args,
            api::socket_path(socket),
        ));
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let cli = Cli::parse();
    if let Cmd::Ipvsadm { args } = cli.cmd {
        let (socket, args) = take_socket(args);
        let code = rt.block_on(xlb::ipvsadm_cli::run(
            "ipvsadm",
            args,
            api::socket_path(socket),
        ));
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes a leading `--socket PATH` / `--socket=PATH` from ipvsadm's arguments (ipvsadm has
/// no such option, so nothing is shadowed).
fn take_socket(mut args: Vec<String>) -> (Option<PathBuf>, Vec<String>) {
    let mut socket = None;
    if let Some(first) = args.first() {
        if let Some(p) = first.strip_prefix("--socket=") {
            socket = Some(PathBuf::from(p));
            args.remove(0);
        } else if first == "--socket" && args.len() > 1 {
            socket = Some(PathBuf::from(args[1].clone()));
            args.drain(..2);
        }
    }
    (socket, args)
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run {
            config,
            keepalived,
            interfaces,
            socket,
            takeover,
            pin_dir,
            metrics,
        } => {
            let startup = match (config, keepalived) {
                (Some(c), _) => daemon::Startup::Toml(c),
                (None, Some(path)) => daemon::Startup::Keepalived { path, interfaces },
                (None, None) => anyhow::bail!("give --config FILE or --keepalived FILE"),
            };
            daemon::run(
                startup,
                daemon::Overrides {
                    socket,
                    pin_dir,
                    metrics,
                    takeover,
                },
            )
            .await
        }
        Cmd::Reload { socket } => {
            let r: api::ReloadResponse =
                api::post_json(&api::socket_path(socket), "/v1/reload", &()).await?;
            println!("reloaded (configuration generation {})", r.generation);
            Ok(())
        }
        Cmd::Ipvsadm { .. } => unreachable!("handled before the runtime dispatch"),
        Cmd::Links { dir, force } => {
            let exe = std::env::current_exe().context("finding this binary")?;
            for name in ["ipvsadm", "ipvsadm-save", "ipvsadm-restore"] {
                let link = dir.join(name);
                if force && link.symlink_metadata().is_ok() {
                    std::fs::remove_file(&link)
                        .with_context(|| format!("removing {}", link.display()))?;
                }
                std::os::unix::fs::symlink(&exe, &link).with_context(|| {
                    format!(
                        "linking {} → {} (--force replaces an existing file)",
                        link.display(),
                        exe.display()
                    )
                })?;
                println!("{} -> {}", link.display(), exe.display());
            }
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Convert { file, interfaces },
        } => {
            let loaded = xlb::keepalived_config::read(&file, &interfaces)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let mut c = loaded.config;
            if c.dataplane.interfaces.is_empty() {
                eprintln!(
                    "warning: {}: no vrrp_instance names an interface; [dataplane] interfaces is a placeholder (use --interface)",
                    file.display()
                );
                c.dataplane.interfaces.push(config::Located {
                    value: "eth0".into(),
                    file: String::new(),
                    line: 0,
                    column: 0,
                });
            }
            print!("{}", xlb::render::to_toml(&c));
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { file, keepalived },
        } => {
            let services = if keepalived {
                let l = xlb::keepalived_config::read(&file, &[])?;
                for w in &l.warnings {
                    eprintln!("warning: {w}");
                }
                xlb::render::validate_services(&l.config.services, &l.config.dataplane.limits)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                l.config.services
            } else {
                config::load(&file)?.services
            };
            println!(
                "{}: ok ({} services, {} real servers)",
                file.display(),
                services.len(),
                services.iter().map(|s| s.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        Cmd::List {
            numeric: _,
            stats,
            exact,
            socket,
        } => {
            let resp: ServicesResponse =
                api::get_json(&api::socket_path(socket), "/v1/services").await?;
            print!(
                "{}",
                ipvsadm::list(&resp, ipvsadm::ListOptions { stats, exact })
            );
            Ok(())
        }
        Cmd::Health { socket } => {
            let resp: api::HealthResponse =
                api::get_json(&api::socket_path(socket), "/v1/health").await?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            for s in resp.servers {
                println!(
                    "{} -> {} {} weight {} (for {:.0} s)",
                    s.service,
                    std::net::SocketAddr::new(s.addr, s.port),
                    if s.state.alive { "UP" } else { "DOWN" },
                    s.state.weight,
                    (now - s.state.since_unix).max(0.0)
                );
                for (i, c) in s.state.checks.iter().enumerate() {
                    let last = c.last.as_ref().map_or("not run yet".to_string(), |l| {
                        format!(
                            "{} in {:.1} ms: {}",
                            if l.ok { "ok" } else { "failed" },
                            l.latency.as_secs_f64() * 1e3,
                            l.detail
                        )
                    });
                    println!(
                        "   check {i} {:<11} {:<4} {last}",
                        c.kind,
                        if c.up { "up" } else { "down" }
                    );
                }
            }
            Ok(())
        }
        Cmd::Counters { socket } => {
            let resp: CountersResponse =
                api::get_json(&api::socket_path(socket), "/v1/counters").await?;
            for (name, v) in resp.counters {
                println!("{name:<22} {v}");
            }
            Ok(())
        }
        Cmd::Status { socket } => {
            let resp: StatusResponse =
                api::get_json(&api::socket_path(socket), "/v1/status").await?;
            println!("xlb {}", resp.version);
            println!(
                "config    {} (generation {}, {} connections)",
                resp.config, resp.generation, resp.connections
            );
            if let Some(r) = &resp.last_reload {
                println!(
                    "reload    {} at {} (Unix time): {}",
                    if r.ok { "applied" } else { "refused" },
                    r.at_unix,
                    r.message
                );
            }
            for a in resp.attached {
                println!(
                    "attached  {} (ifindex {}, {} mode)",
                    a.interface, a.ifindex, a.mode
                );
            }
            for m in resp.maps {
                println!(
                    "map       {:<14} {:>10} entries {:>10} KiB",
                    m.name,
                    m.max_entries,
                    m.bytes / 1024
                );
            }
            for v in &resp.vrrp {
                let master = match v.master {
                    Some((a, p)) => format!("{a} prio {p}"),
                    None => "-".into(),
                };
                println!(
                    "vrrp      {} {} vrid {} v{} {} prio {}/{} master {} transitions {} ({})",
                    v.name,
                    v.interface,
                    v.vrid,
                    v.version,
                    v.state.name(),
                    v.priority,
                    v.base_priority,
                    master,
                    v.transitions,
                    v.reason
                );
                if !v.fault.is_empty() {
                    println!("          fault: {}", v.fault.join("; "));
                }
            }
            if let Some(s) = &resp.conn_sync {
                println!(
                    "sync      {} for {} (id {}): sent {} records, installed {} (skipped {}, refused {}), lag {}",
                    s.role,
                    s.instance,
                    s.sync_id,
                    s.sent_records,
                    s.installed,
                    s.skipped,
                    s.refused,
                    s.lag_seconds
                        .map_or("-".to_string(), |l| format!("{l:.1} s"))
                );
            }
            Ok(())
        }
        Cmd::Check { config } => {
            let c = config::load(&config)?;
            println!(
                "{}: ok ({} services, {} real servers)",
                config.display(),
                c.services.len(),
                c.services.iter().map(|s| s.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        Cmd::Decap {
            interfaces,
            vips,
            gue_ports,
            xdp_mode,
        } => {
            let mode = match xdp_mode.as_str() {
                "auto" => config::XdpModeSetting::Auto,
                "native" => config::XdpModeSetting::Native,
                "generic" => config::XdpModeSetting::Generic,
                other => anyhow::bail!("--xdp-mode {other} is not one of: auto, native, generic"),
            };
            decap::run(decap::Options {
                interfaces,
                vips,
                gue_ports,
                mode,
            })
            .await
        }
        Cmd::Util {
            cmd: UtilCmd::XdpPass { interfaces },
        } => {
            for i in interfaces {
                dataplane::attach_pass_through(&i).await?;
            }
            Ok(())
        }
    }
}
