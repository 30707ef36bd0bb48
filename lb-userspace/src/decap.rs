//! `xlb decap`: runs on a real server of a tunnelling service. It attaches the decapsulator
//! (`xlb_decap`, its own small XDP object) to the server's interfaces, tells it the VIPs and
//! GUE ports to accept, and stays until SIGINT/SIGTERM, when it detaches and prints its
//! counters. The server keeps the VIPs on a local interface (`lo`), as with direct routing.

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{HashMap, PerCpuArray},
    programs::Xdp,
};
use lb_common::decap;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    config::XdpModeSetting,
    dataplane::{attach_program, ifindex, raise_memlock_limit},
    engine::addr_words,
};

pub static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-decap.bpf.o"));

/// What to decapsulate, and where.
#[derive(Clone, Debug)]
pub struct Options {
    pub interfaces: Vec<String>,
    pub vips: Vec<IpAddr>,
    pub gue_ports: Vec<u16>,
    pub mode: XdpModeSetting,
}

/// The loaded decapsulator, filled but not attached.
pub struct Decap {
    ebpf: Ebpf,
}

impl Decap {
    pub fn load(opts: &Options) -> Result<Decap> {
        if opts.vips.is_empty() {
            bail!("no VIP to decapsulate for: give at least one --vip");
        }
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(DECAP_OBJECT).context("loading the decapsulator")?;
        {
            let mut vips: HashMap<_, decap::VipKey, u8> = HashMap::try_from(
                ebpf.map_mut(decap::VIPS)
                    .ok_or_else(|| anyhow!("map {} missing", decap::VIPS))?,
            )?;
            for v in &opts.vips {
                let key = decap::VipKey {
                    family: if v.is_ipv4() {
                        lb_common::FAMILY_V4
                    } else {
                        lb_common::FAMILY_V6
                    } as u32,
                    addr: addr_words(*v),
                };
                vips.insert(key, 1, 0)
                    .with_context(|| format!("adding VIP {v}"))?;
            }
        }
        {
            let mut ports: HashMap<_, u16, u8> = HashMap::try_from(
                ebpf.map_mut(decap::GUE_PORTS)
                    .ok_or_else(|| anyhow!("map {} missing", decap::GUE_PORTS))?,
            )?;
            for p in &opts.gue_ports {
                if *p == 0 {
                    bail!("GUE port 0 is not a port");
                }
                ports
                    .insert(p.to_be(), 1, 0)
                    .with_context(|| format!("adding GUE port {p}"))?;
            }
        }
        let prog: &mut Xdp = ebpf
            .program_mut(decap::PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {} missing", decap::PROGRAM_NAME))?
            .try_into()?;
        prog.load()
            .map_err(|e| anyhow!("the kernel rejected the decapsulator: {e:#}"))?;
        Ok(Decap { ebpf })
    }

    /// The loaded program (tests run it with `BPF_PROG_TEST_RUN`).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(decap::PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("loaded by `load`")
    }

    /// The counters, summed over CPUs, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(decap::STATS)
                .ok_or_else(|| anyhow!("map {} missing", decap::STATS))?,
        )?;
        (0..decap::COUNT)
            .map(|i| Ok((decap::NAMES[i as usize], stats.get(&i, 0)?.iter().sum())))
            .collect()
    }
}

/// `xlb decap`: attach, wait for a signal, detach.
pub async fn run(opts: Options) -> Result<()> {
    if opts.interfaces.is_empty() {
        bail!("no interface to attach to: give at least one --interface");
    }
    let mut d = Decap::load(&opts)?;
    let mut links = Vec::new();
    for i in &opts.interfaces {
        let index = ifindex(i)?;
        let (a, id) = attach_program(&mut d.ebpf, decap::PROGRAM_NAME, i, index, opts.mode)?;
        info!(interface = %a.interface, mode = a.mode, "decapsulating");
        links.push((a, id));
    }
    info!(
        vips = ?opts.vips,
        gue_ports = ?opts.gue_ports,
        "decapsulating IPIP, GRE{} for these VIPs",
        if opts.gue_ports.is_empty() { "" } else { " and GUE" }
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let counters = d.counters()?;
    let prog: &mut Xdp = d
        .ebpf
        .program_mut(decap::PROGRAM_NAME)
        .expect("loaded above")
        .try_into()?;
    for (a, id) in links {
        prog.detach(id)
            .with_context(|| format!("detaching from {}", a.interface))?;
    }
    for (name, v) in counters {
        println!("{name:<14} {v}");
    }
    Ok(())
}
