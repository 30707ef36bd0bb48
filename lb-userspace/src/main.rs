use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
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
        #[arg(long, short)]
        config: PathBuf,
        /// Admin API socket (overrides the config's [control] socket).
        #[arg(long)]
        socket: Option<PathBuf>,
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
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run { config, socket } => daemon::run(&config, socket).await,
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
