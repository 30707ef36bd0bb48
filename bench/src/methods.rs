//! Per forwarding method: a new flow, an established flow and (NAT) a reply, IPv4 and IPv6,
//! each service with one real server on its own VIP, measured in the same rounds as the
//! baselines. NAT replies need a route and a neighbour toward the client: the bench runs in
//! a network namespace of its own that has them (`BenchNetns`).

use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Context, Result, ensure};
use lb_common::reason;
use serde::Serialize;
use xlb::engine::{Engine, NextHop};

use crate::{Bench, Method};

/// The client of every frame here (the hot flows' and the replies').
const CLIENT4: [u8; 4] = [192, 168, 1, 1];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT_PORT: u16 = 12345;

/// One measured service: a method, a family, its VIP and real server.
pub struct Spec {
    pub label: &'static str,
    pub v6: bool,
    pub forwarding: &'static str,
    pub tunnel: &'static str,
    vip: IpAddr,
    server: IpAddr,
    server_port: u16,
}

pub fn specs() -> Vec<Spec> {
    let v4 = |i: u8| IpAddr::from([10, 0, 3, i]);
    let s4 = |i: u8| IpAddr::from([10, 3, 0, i]);
    let v6 = |i: u16| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x30 + i]);
    let s6 = |i: u16| IpAddr::from([0x2001, 0xdb8, 3, 0, 0, 0, 0, i]);
    let spec = |label, v6, forwarding, tunnel, vip, server, server_port| Spec {
        label,
        v6,
        forwarding,
        tunnel,
        vip,
        server,
        server_port,
    };
    vec![
        spec("DR, IPv4", false, "dr", "", v4(1), s4(1), 80),
        spec("NAT, IPv4", false, "nat", "", v4(2), s4(2), 8080),
        spec(
            "tunnel IPIP, IPv4",
            false,
            "tunnel",
            "{ type = \"ipip\" }",
            v4(3),
            s4(3),
            80,
        ),
        spec(
            "tunnel GUE, IPv4",
            false,
            "tunnel",
            "{ type = \"gue\", port = 6080 }",
            v4(4),
            s4(4),
            80,
        ),
        spec(
            "tunnel GRE, IPv4",
            false,
            "tunnel",
            "{ type = \"gre\" }",
            v4(5),
            s4(5),
            80,
        ),
        spec(
            "tunnel GUE + csum, IPv4",
            false,
            "tunnel",
            "{ type = \"gue\", port = 6080, checksum = \"csum\" }",
            v4(6),
            s4(6),
            80,
        ),
        spec("DR, IPv6", true, "dr", "", v6(1), s6(1), 80),
        spec("NAT, IPv6", true, "nat", "", v6(2), s6(2), 8080),
        spec(
            "tunnel IPv6-in-IPv6",
            true,
            "tunnel",
            "{ type = \"ipip\" }",
            v6(3),
            s6(3),
            80,
        ),
    ]
}

/// The services' configuration text; their real servers are resolved on the loopback.
pub fn services(engine: &mut Engine, dp: &mut xlb::dataplane::Dataplane) -> Result<String> {
    let mut text = String::new();
    for (i, s) in specs().iter().enumerate() {
        let vip = match s.vip {
            IpAddr::V4(a) => format!("{a}:80"),
            IpAddr::V6(a) => format!("[{a}]:80"),
        };
        let server = match s.server {
            IpAddr::V4(a) => format!("{a}:{}", s.server_port),
            IpAddr::V6(a) => format!("[{a}]:{}", s.server_port),
        };
        write!(
            text,
            "[[services]]\nname = \"method-{i}\"\naddress = \"{vip}\"\nscheduler = \"rr\"\nforwarding = \"{}\"\n",
            s.forwarding
        )?;
        if !s.tunnel.is_empty() {
            writeln!(text, "tunnel = {}", s.tunnel)?;
        }
        writeln!(text, "[[services.backends]]\naddress = \"{server}\"")?;
        engine.set_next_hop(
            dp,
            s.server,
            Some(NextHop {
                ifindex: 1,
                dst_mac: [2, 0, 0, 3, 0, i as u8],
                src_mac: [2, 0, 0, 0, 0xaa, 1],
                gateway: None,
                mtu: 1500,
                source: Some(if s.v6 {
                    IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2])
                } else {
                    IpAddr::from([10, 0, 0, 2])
                }),
            }),
        )?;
    }
    Ok(text)
}

/// A TCP frame (12 bytes of NOP options, like the main cases' 66-byte frames; checksums
/// valid) from `src:sport` to `dst:dport`.
fn tcp_frame(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 32];
    tcp[20..32].fill(1);
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if flags & 0x10 != 0 {
        tcp[8..12].copy_from_slice(&5000u32.to_be_bytes());
    }
    tcp[12] = 8 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut f = vec![2, 0, 0, 0, 0xaa, 1, 2, 0, 0, 0xc0, 0xa8, 1];
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[8, 0]);
            let mut ip = vec![0x45, 0, 0, 52, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = lb_common::csum::checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6, 0, 32]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, 6, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 32, 0, 0, 0, 6]);
        }
        _ => unreachable!(),
    }
    pseudo.extend_from_slice(&tcp);
    let c = lb_common::csum::checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

#[derive(Clone, Serialize)]
pub struct MethodCase {
    pub label: String,
    /// ns per new flow, per established-flow packet, per NAT reply; per round.
    pub new: Vec<f64>,
    pub established: Vec<f64>,
    pub reply: Vec<f64>,
}

pub fn new_cases() -> Vec<MethodCase> {
    specs()
        .into_iter()
        .map(|s| MethodCase {
            label: s.label.to_string(),
            new: Vec::new(),
            established: Vec::new(),
            reply: Vec::new(),
        })
        .collect()
}

const HOT_REPEAT: u32 = 1_000_000;

fn new_repeat() -> u32 {
    20_000.min(crate::new_flow_repeat())
}

/// The verdict counter `what` moved by exactly `n` during `f`.
fn expect_moved(
    b: &mut Bench,
    counter: u32,
    n: u64,
    what: &str,
    f: impl FnOnce(&mut Bench) -> Result<f64>,
) -> Result<f64> {
    let before = b.dp.reasons()?;
    let ns = f(b)?;
    let after = b.dp.reasons()?;
    let moved = after[counter as usize] - before[counter as usize];
    ensure!(
        moved == n,
        "{what}: {} moved by {moved}, expected {n} (every iteration on the intended path)",
        reason::NAMES[counter as usize]
    );
    Ok(ns)
}

/// One round over every case: new flows (a fresh client address per packet), the hot
/// established flow, and for NAT the hot flow's replies.
pub fn round(
    b: &mut Bench,
    cases: &mut [MethodCase],
    input: &crate::schedulers::RoundInput,
) -> Result<()> {
    let floor_vary = input.floor_vary;
    let floor_hot = input.floor_hot;
    let drop = input.drop;
    for (spec, case) in specs().iter().zip(cases.iter_mut()) {
        let client = if spec.v6 {
            IpAddr::from(CLIENT6)
        } else {
            IpAddr::from(CLIENT4)
        };
        let syn = tcp_frame(client, CLIENT_PORT, spec.vip, 80, 0x02);
        let ack = tcp_frame(client, CLIENT_PORT, spec.vip, 80, 0x10);
        b.fresh = input.window;
        let ns = expect_moved(b, reason::TX, new_repeat() as u64, spec.label, |b| {
            Ok(b.measure("xlb", &syn, Method::Fresh, new_repeat())?.1)
        })?;
        case.new.push(ns - floor_vary + drop);
        b.retire_new_flows()?;
        b.measure("xlb", &syn, Method::Direct, 1)?;
        b.measure("xlb", &ack, Method::Direct, 1)?;
        let ns = expect_moved(b, reason::TX, HOT_REPEAT as u64, spec.label, |b| {
            Ok(
                b.measure("xlb", &ack, Method::Shim { mask: 0 }, HOT_REPEAT)?
                    .1,
            )
        })?;
        case.established.push(ns - floor_hot + drop);
        if spec.forwarding == "nat" {
            let reply = tcp_frame(spec.server, spec.server_port, client, CLIENT_PORT, 0x10);
            let ns = expect_moved(b, reason::REDIRECT, HOT_REPEAT as u64, spec.label, |b| {
                Ok(
                    b.measure("xlb", &reply, Method::Shim { mask: 0 }, HOT_REPEAT)?
                        .1,
                )
            })?;
            case.reply.push(ns - floor_hot + drop);
        }
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn ratio(a: &[f64], base: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(base).map(|(x, y)| x / y).collect();
    median(&r)
}

pub fn report(cases: &[MethodCase], parse_hash: f64) {
    println!(
        "\nForwarding methods (one real server each; new flow: a fresh client per packet; established: one hot flow; reply: the NAT server's packets of that flow), ns/packet, median of rounds:\n"
    );
    println!(
        "| method | new flow ns | established ns | × DR established | × parse+hash | reply ns | reply × DR established |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let dr = |v6: bool| {
        cases
            .iter()
            .find(|c| c.label == if v6 { "DR, IPv6" } else { "DR, IPv4" })
            .unwrap()
    };
    for c in cases {
        let base = dr(c.label.contains("IPv6"));
        let (reply, reply_ratio) = if c.reply.is_empty() {
            (String::from("-"), String::from("-"))
        } else {
            (
                format!("{:.0}", median(&c.reply)),
                format!("{:.2}", ratio(&c.reply, &base.established)),
            )
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {reply} | {reply_ratio} |",
            c.label,
            median(&c.new),
            median(&c.established),
            ratio(&c.established, &base.established),
            median(&c.established) / parse_hash,
        );
    }
    println!("\nForwarding targets (established flow, median of per-round ratios to DR's):");
    for c in cases {
        let base = dr(c.label.contains("IPv6"));
        let target = if c.label.starts_with("NAT") {
            1.3
        } else if c.label.starts_with("tunnel") {
            1.5
        } else {
            continue;
        };
        let mut lines = vec![("", ratio(&c.established, &base.established))];
        if !c.reply.is_empty() {
            lines.push((" reply", ratio(&c.reply, &base.established)));
        }
        for (what, r) in lines {
            println!(
                "  {:<28} / DR  {r:>5.2}  (target ≤ {target}) {}",
                format!("{}{what}", c.label),
                if r <= target { "ok" } else { "MISSED" }
            );
        }
    }
}

/// The network namespace the bench runs in: NAT replies are routed to the client through
/// `nat0` (a veth), whose neighbour entries are permanent; forwarding is on. Removed on drop.
pub struct BenchNetns {
    name: String,
}

impl BenchNetns {
    pub fn enter() -> Result<BenchNetns> {
        let name = format!("xlb-bench-{}", std::process::id());
        let sh = |script: &str| -> Result<()> {
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .status()
                .with_context(|| format!("running {script}"))?;
            ensure!(st.success(), "{script} failed");
            Ok(())
        };
        sh(&format!("ip netns add {name}"))?;
        let ns = BenchNetns { name: name.clone() };
        sh(&format!(
            "ip -n {name} link set lo up && ip -n {name} link add nat0 type veth peer name nat1 \
             && ip -n {name} link set nat0 up && ip -n {name} link set nat1 up \
             && ip -n {name} addr add 192.168.1.254/24 dev nat0 \
             && ip -n {name} addr add 2001:db8:9::254/64 dev nat0 nodad \
             && ip -n {name} neigh add 192.168.1.1 lladdr 02:00:00:c0:a8:01 dev nat0 nud permanent \
             && ip -n {name} neigh add 2001:db8:9::1 lladdr 02:00:00:c0:a8:01 dev nat0 nud permanent \
             && ip netns exec {name} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        ))?;
        let f = std::fs::File::open(format!("/run/netns/{name}"))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the bench namespace")?;
        Ok(ns)
    }

    /// The egress interface toward the client, for the redirect map.
    pub fn egress(&self) -> Result<u32> {
        xlb::dataplane::ifindex("nat0")
    }
}

impl Drop for BenchNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
