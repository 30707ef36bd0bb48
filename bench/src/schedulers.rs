//! Per-scheduler costs: a new flow and an established flow for every scheduler with 64 real
//! servers, and the large pools (4096 real servers), each service on its own port of the VIP.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::{Result, ensure};
use lb_common::reason;
use serde::Serialize;
use xlb::engine::{Engine, NextHop};

use crate::{Bench, Method};

/// Real servers per service in the per-scheduler cases.
pub const SERVERS: u32 = 64;
/// Real servers of the large-pool cases.
pub const LARGE: u32 = 4096;

/// One measured service.
pub struct Spec {
    pub label: String,
    pub scheduler: &'static str,
    pub servers: u32,
    pub extra: &'static str,
    pub port: u16,
}

pub fn specs() -> Vec<Spec> {
    let mut v = Vec::new();
    let names = [
        "rr", "wrr", "lc", "wlc", "sed", "nq", "fo", "ovf", "twos", "sh", "dh", "mh", "lblc",
        "lblcr",
    ];
    for (i, s) in names.iter().enumerate() {
        v.push(Spec {
            label: s.to_string(),
            scheduler: s,
            servers: SERVERS,
            extra: "",
            port: 1000 + i as u16,
        });
    }
    v.push(Spec {
        label: "mh, conntrack = false".into(),
        scheduler: "mh",
        servers: SERVERS,
        extra: "conntrack = false\n",
        port: 1100,
    });
    for (i, (s, extra)) in [("rr", ""), ("wlc", ""), ("mh", "mh_table_size = 65521\n")]
        .into_iter()
        .enumerate()
    {
        v.push(Spec {
            label: format!("{s}, {LARGE} servers"),
            scheduler: s,
            servers: LARGE,
            extra,
            port: 1200 + i as u16,
        });
    }
    v
}

/// The services' configuration (each server's weight varies a little, so wrr has a real
/// cycle) and their servers' next hops.
pub fn services(engine: &mut Engine, dp: &mut xlb::dataplane::Dataplane) -> Result<String> {
    let mut text = String::new();
    let mut n = 0u32;
    for spec in specs() {
        write!(
            text,
            "[[services]]\nname = \"{}\"\naddress = \"10.0.0.10:{}\"\nscheduler = \"{}\"\n{}",
            spec.label, spec.port, spec.scheduler, spec.extra
        )?;
        for k in 0..spec.servers {
            n += 1;
            let addr = IpAddr::from([10, 2, (n >> 8) as u8, n as u8]);
            // ovf stops using a server once its active connections exceed its weight.
            let base = if spec.scheduler == "ovf" { 60_000 } else { 1 };
            write!(
                text,
                "[[services.backends]]\naddress = \"{addr}\"\nweight = {}\n",
                base + k % 4
            )?;
            engine.set_next_hop(
                dp,
                addr,
                Some(NextHop {
                    ifindex: 1,
                    dst_mac: [2, 0, 0, 2, (n >> 8) as u8, n as u8],
                    src_mac: [2, 0, 0, 0, 0xaa, 1],
                    gateway: None,
                    mtu: 1500,
                    source: Some(IpAddr::from([10, 0, 0, 2])),
                }),
            )?;
        }
    }
    Ok(text)
}

#[derive(Clone, Serialize)]
pub struct SchedCase {
    pub label: String,
    pub servers: u32,
    /// ns per new flow, per round.
    pub new: Vec<f64>,
    /// ns per established-flow packet, per round.
    pub established: Vec<f64>,
}

/// `frame` sent to port `port` of the VIP (the TCP checksum is not the program's business).
pub fn to_port(frame: &[u8], port: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f
}

/// New flows per measurement: enough to average over, few enough for the large pools (and
/// within the table's room at the small scale).
fn new_repeat() -> u32 {
    20_000.min(crate::new_flow_repeat())
}
const HOT_REPEAT: u32 = 1_000_000;

/// What one round measures with: the frames, the fresh-tuple window and
/// the floors measured in the same round.
pub struct RoundInput<'a> {
    pub window: u64,
    pub syn: &'a [u8],
    pub ack: &'a [u8],
    /// The drop program's cost with a varying tuple (new-flow floor).
    pub floor_vary: f64,
    /// The drop program's cost with a fixed frame (established floor).
    pub floor_hot: f64,
    /// The direct (no wrapper) cost of the drop program, added back.
    pub drop: f64,
}

/// One round over every case.
pub fn round(b: &mut Bench, cases: &mut [SchedCase], input: &RoundInput) -> Result<()> {
    let RoundInput {
        window,
        syn,
        ack,
        floor_vary,
        floor_hot,
        drop,
    } = *input;
    for (spec, case) in specs().iter().zip(cases.iter_mut()) {
        let syn_p = to_port(syn, spec.port);
        let ack_p = to_port(ack, spec.port);
        let before = b.dp.reasons()?;
        b.fresh = window;
        let (verdict, ns) = b.measure("xlb", &syn_p, Method::Fresh, new_repeat())?;
        let after = b.dp.reasons()?;
        let tx = after[reason::TX as usize] - before[reason::TX as usize];
        ensure!(
            verdict == crate::XDP_TX && tx == new_repeat() as u64,
            "{}: {tx} of {} new flows forwarded",
            spec.label,
            new_repeat()
        );
        case.new.push(ns - floor_vary + drop);
        b.retire_new_flows()?;
        // The hot flow of this service (a fresh client port per service).
        b.measure("xlb", &syn_p, Method::Direct, 1)?;
        b.measure("xlb", &ack_p, Method::Direct, 1)?;
        let before = b.dp.reasons()?;
        let (_, hot) = b.measure("xlb", &ack_p, Method::Shim { mask: 0 }, HOT_REPEAT)?;
        let after = b.dp.reasons()?;
        ensure!(
            after[reason::TX as usize] - before[reason::TX as usize] == HOT_REPEAT as u64,
            "{}: the established flow was not forwarded every time",
            spec.label
        );
        case.established.push(hot - floor_hot + drop);
    }
    Ok(())
}

pub fn new_cases() -> Vec<SchedCase> {
    specs()
        .into_iter()
        .map(|s| SchedCase {
            label: s.label,
            servers: s.servers,
            new: Vec::new(),
            established: Vec::new(),
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Per-round ratio to rr's new flow, then the median.
fn ratio_to(a: &[f64], base: &[f64]) -> f64 {
    let r: Vec<f64> = a.iter().zip(base).map(|(x, y)| x / y).collect();
    median(&r)
}

pub fn report(cases: &[SchedCase], parse_hash: f64) {
    let rr = &cases[0];
    println!(
        "\nSchedulers (new flow: a fresh 5-tuple every packet, table half full; established: one hot flow), ns/packet, median of rounds:\n"
    );
    println!(
        "| scheduler | servers | new flow ns | × rr new flow | established ns | × parse+hash |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for c in cases {
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.0} | {:.2} |",
            c.label,
            c.servers,
            median(&c.new),
            ratio_to(&c.new, &rr.new),
            median(&c.established),
            median(&c.established) / parse_hash
        );
    }
    println!("\nScheduler targets (median of per-round ratios to rr's new flow):");
    for c in &cases[1..] {
        let target = match c.label.as_str() {
            "wrr" | "sh" | "dh" | "mh" => 1.2,
            "lc" | "wlc" | "sed" | "nq" | "fo" | "ovf" | "twos" | "lblc" | "lblcr" => 2.0,
            _ => continue,
        };
        let r = ratio_to(&c.new, &rr.new);
        println!(
            "  new flow, {:<6} / rr  {r:>5.2}  (target ≤ {target}) {}",
            c.label,
            if r <= target { "ok" } else { "MISSED" }
        );
    }
}
