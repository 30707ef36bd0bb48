//! `cargo xtask bench`: ns/packet of xlb's XDP program, measured with BPF_PROG_TEST_RUN in one
//! process next to baseline programs built in the same run, reported as ratios.
//!
//! Method (see BENCHMARKS.md and the Katran anchor notes): programs that leave the frame as
//! they found it are run directly with `repeat` (D). Programs that rewrite it are run through
//! a shim (S) that restores the original frame before each iteration and tail-calls them;
//! their figure is `S(prog) − S(drop) + D(drop)`, i.e. the shim's own cost is removed. Every
//! run checks, from the programs' own counters, that each iteration took the intended path.

mod control;
mod methods;
mod schedulers;

use std::{net::IpAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, ProgramArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{Globals, reason, tcp};
use serde::Serialize;
use xlb::{
    config::{self, Limits},
    dataplane::Dataplane,
    engine::{Engine, NextHop},
};

static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-bench.bpf.o"));

/// The Katran anchor's frames (66 bytes: Ethernet, IPv4, TCP with 12 bytes of options),
/// client 192.168.1.1:12345 → VIP 10.0.0.10:80.
const SYN_VIP: &str = "02000000aa010200c0a800010800450000341234400040065cddc0a801010a00000a30390050000003e8000000008002faf073fc0000020405b40402010303070101";
const ACK_VIP: &str = "02000000aa010200c0a800010800450000341234400040065cddc0a801010a00000a30390050000003e9000013898010faf05c6600000101080a000003e8000007d0";
const SYN_NON_VIP: &str = "02000000aa010200c0a800010800450000341234400040065c84c0a801010a00006330390050000003e8000000008002faf073a30000020405b40402010303070101";

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Connections per sync-report measurement: well within `SYNC_EVENTS` (1 MiB, ~14,000
/// reports), so the ring never fills and every report is a real one.
const SYNC_BATCH: u32 = 8192;
/// Interleaved rounds (`XLB_BENCH_ROUNDS` for a quicker look; targets are judged on 9).
fn rounds() -> usize {
    std::env::var("XLB_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(9)
}
/// `XLB_BENCH_ONLY=core`: the main cases only (no schedulers, forwarding methods or control
/// plane).
fn core_only() -> bool {
    std::env::var("XLB_BENCH_ONLY").is_ok_and(|v| v == "core")
}
const HOT_REPEAT: u32 = 5_000_000;
/// New flows per measurement: at most an eighth of the table (which is half full of
/// established connections, a quarter of the "many flows").
fn new_flow_repeat() -> u32 {
    500_000.min(conn_table() / 8)
}
/// Established flows the "many flows" case cycles over (`XLB_BENCH_SCALE=small`: 2^14,
/// with a 2^16 table: a profiling mode where everything fits in the caches).
fn many_flows() -> u32 {
    if small() { 1 << 14 } else { 1 << 20 }
}
/// Connection-table capacity: 4M entries, as in the Katran anchor measurements (Katran's
/// default of 8M split over two CPUs), and four times the "many flows", so that case is all
/// hits.
fn conn_table() -> u32 {
    many_flows() * 4
}

fn small() -> bool {
    std::env::var("XLB_BENCH_SCALE").is_ok_and(|v| v == "small")
}
const REAL_SERVERS: u8 = 8;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[repr(C)]
#[derive(Clone, Copy)]
struct WrapCfg {
    pkt: [u8; 128],
    mask: u32,
    len: u32,
    ctr: u64,
}
unsafe impl aya::Pod for WrapCfg {}

struct Bench {
    base: Ebpf,
    dp: Dataplane,
    service_id: u32,
    /// Next unused source-address counter for `Method::Fresh` (above the "many flows" range).
    fresh: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Direct,
    /// Through the shim; with a mask, source addresses vary per run.
    Shim {
        mask: u32,
    },
    /// Through the shim, every run a source address never used before.
    Fresh,
}

fn run(prog: &Xdp, pkt: &[u8], repeat: u32) -> Result<(u32, Duration)> {
    let mut out = vec![0u8; 256];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((r.return_value, r.duration))
}

impl Bench {
    fn prog(&self, name: &str) -> &Xdp {
        self.base.program(name).unwrap().try_into().unwrap()
    }

    /// Points the shim at `target` with frame `pkt` and variation `mask`.
    fn arm_shim(
        &mut self,
        target_is_xlb: bool,
        target: &str,
        pkt: &[u8],
        mask: u32,
        ctr: u64,
    ) -> Result<()> {
        let fd = if target_is_xlb {
            self.dp.program().fd()?.try_clone()?
        } else {
            self.prog(target).fd()?.try_clone()?
        };
        let mut jmp: ProgramArray<_> =
            ProgramArray::try_from(self.base.map_mut("WRAP_JMP").unwrap())?;
        jmp.set(0, &fd, 0)?;
        let mut cfg = WrapCfg {
            pkt: [0; 128],
            mask,
            len: pkt.len() as u32,
            ctr,
        };
        cfg.pkt[..pkt.len()].copy_from_slice(pkt);
        let mut arr: Array<_, WrapCfg> = Array::try_from(self.base.map_mut("WRAP_CFG").unwrap())?;
        arr.set(0, cfg, 0)?;
        Ok(())
    }

    /// One measurement: ns per packet as the kernel reports it, and the last verdict.
    fn measure(
        &mut self,
        target: &str,
        pkt: &[u8],
        how: Method,
        repeat: u32,
    ) -> Result<(u32, f64)> {
        let xlb = target == "xlb";
        let (ret, d) = match how {
            Method::Direct => {
                let prog = if xlb {
                    self.dp.program()
                } else {
                    self.prog(target)
                };
                run(prog, pkt, repeat)?
            }
            Method::Shim { mask } => {
                self.arm_shim(xlb, target, pkt, mask, 0)?;
                run(self.prog("wrap"), pkt, repeat)?
            }
            Method::Fresh => {
                // Never the hot flow's own client address (192.168.1.1).
                const HOT_CLIENT: u64 = 0xa8_0101;
                if (self.fresh..self.fresh + repeat as u64).contains(&HOT_CLIENT) {
                    self.fresh = HOT_CLIENT + 1;
                }
                let start = self.fresh;
                self.fresh += repeat as u64;
                // 192.0.0.0 | counter: unique up to 2^30 (the base's bits are above them). A
                // full-scale run uses ~20M addresses.
                ensure!(self.fresh < 1 << 30, "out of fresh source addresses");
                self.arm_shim(xlb, target, pkt, (1 << 30) - 1, start)?;
                run(self.prog("wrap"), pkt, repeat)?
            }
        };
        Ok((ret, d.as_nanos() as f64))
    }
}

#[derive(Clone, Serialize)]
struct Case {
    name: &'static str,
    method: &'static str,
    /// ns/packet per round (after shim correction).
    rounds: Vec<f64>,
}

impl Case {
    fn min(&self) -> f64 {
        self.rounds.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn median(&self) -> f64 {
        let mut v = self.rounds.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }
}

fn pin_to_last_cpu() {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut set = nix::sched::CpuSet::new();
    if set.set(n - 1).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn main() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads BPF programs: run it as root"
    );
    if std::env::args().nth(1).as_deref() == Some("control") {
        let _netns = methods::BenchNetns::enter()?;
        return control::run();
    }
    pin_to_last_cpu();
    // NAT replies are routed: the bench runs in a namespace of its own with a route and a
    // neighbour toward the client (never touching the host's).
    let netns = methods::BenchNetns::enter()?;
    let syn = hex(SYN_VIP);
    let ack = hex(ACK_VIP);
    let nonvip = hex(SYN_NON_VIP);

    // The baseline tables get the capacity of xlb's table (its connections).
    let ncpus = aya::util::nr_cpus().map_err(|(m, e)| anyhow::anyhow!("{m}: {e}"))? as u32;
    let capacity = conn_table();
    let mut base = EbpfLoader::new()
        .map_max_entries("BASE_LRU", capacity)
        .map_max_entries("BASE_LRU2", capacity)
        .map_max_entries("BASE_LRU_FULL", capacity)
        .map_max_entries("BASE_HASH_FULL", capacity)
        .load(BENCH_OBJECT)
        .context("loading the baseline programs")?;
    for p in [
        "base_drop",
        "base_parse_tx",
        "base_parse_hash_tx",
        "base_lru_insert",
        "base_lru_insert_full",
        "base_lru_lookup_insert",
        "base_lru_delete",
        "base_hash_recycle",
        "wrap",
    ] {
        let prog: &mut Xdp = base.program_mut(p).unwrap().try_into()?;
        prog.load().with_context(|| format!("loading {p}"))?;
    }
    {
        let mut flows: HashMap<_, [u32; 4], u32> =
            HashMap::try_from(base.map_mut("BASE_FLOWS").unwrap())?;
        let w = |o: usize| u32::from_ne_bytes([syn[o], syn[o + 1], syn[o + 2], syn[o + 3]]);
        flows.insert([w(26), w(30), w(34), 6], 1, 0)?;
    }

    let limits = Limits {
        conn_table_size: conn_table(),
        conn_table_size_v6: 1024,
        max_services: 64,
        max_backends: 16384,
        slot_table_size: 1 << 20,
        ..Limits::default()
    };
    let mut dp = Dataplane::load(limits)?;
    let mut engine = Engine::new(&dp);
    let mut text = String::from(
        "[dataplane]\ninterfaces = [\"lo\"]\n[[services]]\nname = \"bench\"\naddress = \"10.0.0.10:80\"\nscheduler = \"rr\"\n",
    );
    for i in 1..=REAL_SERVERS {
        text += &format!("[[services.backends]]\naddress = \"10.1.0.{i}\"\n");
        engine.set_next_hop(
            &mut dp,
            IpAddr::from([10, 1, 0, i]),
            Some(NextHop {
                ifindex: 1,
                dst_mac: [2, 0, 0, 0, 1, i],
                src_mac: [2, 0, 0, 0, 0xaa, 1],
                gateway: None,
                mtu: 1500,
                source: Some(IpAddr::from([10, 0, 0, 2])),
            }),
        )?;
    }
    text += &schedulers::services(&mut engine, &mut dp)?;
    text += &methods::services(&mut engine, &mut dp)?;
    let services = config::parse(std::path::Path::new("bench.toml"), &text)?.services;
    engine.apply(&mut dp, &services)?;
    dp.add_tx_port(netns.egress()?)?;
    let service_id = engine.service_id(&services[0].key).unwrap();
    let mut b = Bench {
        base,
        dp,
        service_id,
        fresh: many_flows() as u64,
    };

    // The hot flow exists. The tables are half full of established connections before the
    // new-flow case (plus the "many flows" a quarter, plus the new flows of a measurement):
    // xlb's table never evicts, so the steady state is a busy table with room.
    ensure!(
        b.measure("xlb", &syn, Method::Direct, 1)?.0 == XDP_TX,
        "SYN to the VIP not forwarded"
    );
    let fill = conn_table() / 2;
    eprintln!(
        "filling the connection tables ({fill} of {} entries)...",
        conn_table()
    );
    let start = b.fresh;
    b.measure("xlb", &syn, Method::Fresh, fill)?;
    b.fresh = start;
    b.measure("xlb", &ack, Method::Fresh, fill)?;
    b.fresh = start;
    b.measure("base_lru_insert", &syn, Method::Fresh, fill)?;
    b.fresh = start;
    b.measure("base_lru_lookup_insert", &syn, Method::Fresh, fill)?;
    ensure!(
        b.dp.flow_entries_free()?[0] == (conn_table() - fill - 1) as i64,
        "the fill did not create {fill} connections"
    );
    // Source addresses: [0, many) the "many flows", then the fill, then a window reused by
    // every round (whatever it inserts is taken out again), then addresses used once (the
    // evicting baseline must never see a key again).
    let window = start + fill as u64;
    let mut unique = window + conn_table() as u64 / 2;
    b.fresh = unique;
    b.measure(
        "base_lru_insert_full",
        &syn,
        Method::Fresh,
        capacity + capacity / 4,
    )?;
    unique = b.fresh;
    // The recycling hash baseline: its own run of addresses (each packet's victim is the
    // address `capacity` before its own), filled to capacity.
    {
        let mut lag: Array<_, u32> = Array::try_from(b.base.map_mut("BASE_HASH_LAG").unwrap())?;
        lag.set(0, capacity, 0)?;
    }
    let mut hash_next = 1u64 << 29;
    b.fresh = hash_next;
    b.measure("base_hash_recycle", &syn, Method::Fresh, capacity)?;
    hash_next = b.fresh;

    // Profiling aid: `XLB_BENCH_PROFILE=new|full|established` runs only that case for ~20 s (for
    // `perf record -e cpu-clock` with net.core.bpf_jit_kallsyms=1).
    if let Ok(which) = std::env::var("XLB_BENCH_PROFILE") {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        b.measure("xlb", &syn, Method::Direct, 1)?;
        if which == "full" {
            let room = b.dp.flow_entries_free()?[0];
            b.measure("xlb", &syn, Method::Fresh, room as u32)?;
        }
        while std::time::Instant::now() < until {
            match which.as_str() {
                "full" => {
                    b.measure("xlb", &syn, Method::Fresh, 200_000)?;
                }
                s if s.starts_with("sched:") => {
                    let spec = schedulers::specs()
                        .into_iter()
                        .find(|x| x.label == s["sched:".len()..])
                        .ok_or_else(|| anyhow::anyhow!("no scheduler case {s}"))?;
                    let frame = schedulers::to_port(&syn, spec.port);
                    let (_, ns) = b.measure("xlb", &frame, Method::Fresh, 200_000)?;
                    eprintln!("{s}: {ns:.0} ns/packet (shim included)");
                    b.retire_new_flows()?;
                }
                "hash" => {
                    b.fresh = hash_next;
                    let (_, ns) = b.measure("base_hash_recycle", &syn, Method::Fresh, 200_000)?;
                    eprintln!("hash: {ns:.0} ns/packet (shim included)");
                    hash_next = b.fresh;
                }
                "new" => {
                    b.measure("xlb", &syn, Method::Fresh, 200_000)?;
                    b.retire_new_flows()?;
                }
                _ => {
                    b.measure("xlb", &ack, Method::Shim { mask: 0 }, 5_000_000)?;
                }
            };
            if (which == "new" || which.starts_with("sched:")) && b.fresh > 14_000_000 {
                b.fresh = start + fill as u64;
            }
        }
        return Ok(());
    }

    let names: [(&str, &str); 15] = [
        ("XDP_DROP (harness floor)", "D"),
        ("parse + swap MACs + XDP_TX", "D"),
        ("parse + 1 hash lookup + XDP_TX", "D"),
        ("bare LRU insert, new key, table 3/4 full", "S+vary"),
        ("LRU lookup (miss) + insert, table 3/4 full", "S+vary"),
        ("xlb: non-VIP packet → XDP_PASS", "D"),
        ("xlb: established flow, one hot flow", "S"),
        ("xlb: established flows, cycling over 1M", "S+vary"),
        ("xlb: new flow every packet, table 3/4 full", "S+vary"),
        ("bare LRU insert, new key, full table (evicts)", "S+vary"),
        (
            "xlb: new flow every packet, full table (recycles)",
            "S+vary",
        ),
        ("hash: lookup, delete oldest, insert, full table", "S+vary"),
        ("xlb: ACK establishing a connection, sync off", "S+vary"),
        ("xlb: the same, sync on (one report each)", "S+vary"),
        ("shim floor: S(drop)", "S"),
    ];
    let mut cases: Vec<Case> = names
        .iter()
        .map(|(n, m)| Case {
            name: n,
            method: m,
            rounds: Vec::new(),
        })
        .collect();

    let mut reaper_ns_per_entry: Vec<f64> = Vec::new();
    let mut sched_cases = schedulers::new_cases();
    let mut method_cases = methods::new_cases();
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let d_drop = b.measure("base_drop", &syn, Method::Direct, HOT_REPEAT)?;
        check(d_drop.0 == XDP_DROP, "base_drop")?;
        let s_drop = b.measure("base_drop", &syn, Method::Shim { mask: 0 }, HOT_REPEAT)?;
        let s_drop_vary = b.measure(
            "base_drop",
            &syn,
            Method::Shim { mask: 0xff_ffff },
            new_flow_repeat(),
        )?;
        let s_drop_many = b.measure(
            "base_drop",
            &ack,
            Method::Shim {
                mask: many_flows() - 1,
            },
            many_flows(),
        )?;
        let correct = |s: f64, floor: f64| s - floor + d_drop.1;

        let parse_tx = b.measure("base_parse_tx", &syn, Method::Direct, HOT_REPEAT)?;
        check(parse_tx.0 == XDP_TX, "base_parse_tx")?;
        let parse_hash = b.measure("base_parse_hash_tx", &syn, Method::Direct, HOT_REPEAT)?;
        check(
            parse_hash.0 == XDP_TX,
            "base_parse_hash_tx (the 5-tuple must hit)",
        )?;
        // New flows: xlb and the LRU baselines back to back, in alternating order, on the same
        // never-seen keys (each in its own map), so drift of the host hits them alike. Twice
        // per round: this is the noisiest case (each run is ~1 s of cache misses).
        let mut lru = Vec::new();
        let mut lru2 = Vec::new();
        let mut new = Vec::new();
        let mut reaps = Vec::new();
        for half in 0..2 {
            let start = window;
            let order: [u8; 3] = if (round + half) % 2 == 0 {
                [0, 1, 2]
            } else {
                [2, 1, 0]
            };
            for which in order {
                b.fresh = start;
                let measured = match which {
                    0 => {
                        lru.push(b.measure(
                            "base_lru_insert",
                            &syn,
                            Method::Fresh,
                            new_flow_repeat(),
                        )?);
                        "base"
                    }
                    1 => {
                        lru2.push(b.measure(
                            "base_lru_lookup_insert",
                            &syn,
                            Method::Fresh,
                            new_flow_repeat(),
                        )?);
                        "base"
                    }
                    _ => {
                        let before = b.snapshot()?;
                        new.push(b.measure("xlb", &syn, Method::Fresh, new_flow_repeat())?);
                        b.expect(
                            &before,
                            &[(reason::TX, new_flow_repeat() as u64)],
                            new_flow_repeat() as u64,
                            "new flows",
                        )?;
                        "xlb"
                    }
                };
                // Take the new entries back out, so every measurement sees the same table.
                if measured == "xlb" {
                    reaps.push(b.retire_new_flows()?);
                } else {
                    b.fresh = start;
                    b.measure("base_lru_delete", &syn, Method::Fresh, new_flow_repeat())?;
                }
            }
        }
        check(
            lru.iter().chain(&lru2).all(|r| r.0 == XDP_TX),
            "LRU baselines",
        )?;

        // Sync reports: the ACK that establishes a connection reports it when this balancer
        // is a sync master; off and on back to back, in alternating order, on fresh tuples.
        let (mut est_off, mut est_on) = (Vec::new(), Vec::new());
        for half in 0..2 {
            let order = if (round + half) % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for on in order {
                let ns = b.establishing(&syn, &ack, unique, on)?;
                unique = b.fresh;
                if on {
                    est_on.push(ns);
                } else {
                    est_off.push(ns);
                }
            }
        }

        // A full table: xlb's is filled up with embryonic connections (unmeasured), then every
        // new flow takes over the oldest one; the baseline's inserts evict.
        b.fresh = window;
        let room = b.dp.flow_entries_free()?[0];
        ensure!(
            room > 0,
            "the table should have room before the full-table case"
        );
        // A new connection whose bucket and alternate are both full recycles one even
        // while the pool has entries: a few more rounds take what is left.
        for _ in 0..8 {
            let room = b.dp.flow_entries_free()?[0];
            if room <= 0 {
                break;
            }
            b.measure("xlb", &syn, Method::Fresh, room as u32)?;
        }
        let left = b.dp.flow_entries_free()?[0];
        ensure!(left == 0, "the table did not fill: {left} entries left");
        // Warm-up: the ring of recent connections still starts with the established ones
        // of the fill and those the reaper took out since the last full-table run; the first
        // recycling new flows skip past them (8 established or 1024 gone ones each).
        b.fresh = unique;
        let warm = lb_common::recent_ring_size(conn_table(), ncpus) / 4 + 4096;
        b.measure("xlb", &syn, Method::Fresh, warm)?;
        unique = b.fresh;
        let before = b.snapshot()?;
        b.fresh = unique;
        let new_full = b.measure("xlb", &syn, Method::Fresh, new_flow_repeat())?;
        b.expect(
            &before,
            &[(reason::TX, new_flow_repeat() as u64)],
            new_flow_repeat() as u64,
            "new flows, full table",
        )?;
        let recycled = b.dp.reasons()?[reason::EV_FLOW_RECYCLED as usize]
            - before.0[reason::EV_FLOW_RECYCLED as usize];
        ensure!(
            recycled == new_flow_repeat() as u64,
            "new flows, full table: {recycled} recycled entries, expected {}",
            new_flow_repeat()
        );
        reaps.push(b.retire_new_flows()?);
        b.fresh = unique;
        let lru_full = b.measure(
            "base_lru_insert_full",
            &syn,
            Method::Fresh,
            new_flow_repeat(),
        )?;
        check(lru_full.0 == XDP_TX, "evicting LRU baseline")?;
        unique = b.fresh;
        b.fresh = hash_next;
        let hash_full = b.measure("base_hash_recycle", &syn, Method::Fresh, new_flow_repeat())?;
        check(hash_full.0 == XDP_TX, "recycling hash baseline")?;
        hash_next = b.fresh;

        let before = b.snapshot()?;
        let nonvip_r = b.measure("xlb", &nonvip, Method::Direct, HOT_REPEAT)?;
        b.expect(
            &before,
            &[(reason::PASS_NO_SERVICE, HOT_REPEAT as u64)],
            0,
            "non-VIP",
        )?;
        check(nonvip_r.0 == XDP_PASS, "non-VIP verdict")?;

        // The hot flow (the new-flow case may have evicted it), then one ACK to establish it.
        b.measure("xlb", &syn, Method::Direct, 1)?;
        b.measure("xlb", &ack, Method::Direct, 1)?;
        let before = b.snapshot()?;
        let hot = b.measure("xlb", &ack, Method::Shim { mask: 0 }, HOT_REPEAT)?;
        // The shim's own cost right after, so the correction sees the same host state.
        let s_drop_after = b.measure("base_drop", &syn, Method::Shim { mask: 0 }, HOT_REPEAT)?;
        b.expect(
            &before,
            &[(reason::TX, HOT_REPEAT as u64)],
            0,
            "hot established flow",
        )?;

        // (Re-)establish the 1M flows the new-flow case evicts, then one warm pass of ACKs
        // (moves them to ESTABLISHED), then the measured pass.
        b.measure(
            "xlb",
            &syn,
            Method::Shim {
                mask: many_flows() - 1,
            },
            many_flows(),
        )?;
        b.measure(
            "xlb",
            &ack,
            Method::Shim {
                mask: many_flows() - 1,
            },
            many_flows(),
        )?;
        let before = b.snapshot()?;
        let many = b.measure(
            "xlb",
            &ack,
            Method::Shim {
                mask: many_flows() - 1,
            },
            many_flows(),
        )?;
        b.expect(
            &before,
            &[(reason::TX, many_flows() as u64)],
            0,
            "1M established flows",
        )?;

        let values: [Vec<f64>; 15] = [
            vec![d_drop.1],
            vec![parse_tx.1],
            vec![parse_hash.1],
            lru.iter().map(|r| correct(r.1, s_drop_vary.1)).collect(),
            lru2.iter().map(|r| correct(r.1, s_drop_vary.1)).collect(),
            vec![nonvip_r.1],
            vec![correct(hot.1, (s_drop.1 + s_drop_after.1) / 2.0)],
            vec![correct(many.1, s_drop_many.1)],
            new.iter().map(|r| correct(r.1, s_drop_vary.1)).collect(),
            vec![correct(lru_full.1, s_drop_vary.1)],
            vec![correct(new_full.1, s_drop_vary.1)],
            vec![correct(hash_full.1, s_drop_vary.1)],
            est_off.iter().map(|r| correct(*r, s_drop_vary.1)).collect(),
            est_on.iter().map(|r| correct(*r, s_drop_vary.1)).collect(),
            vec![s_drop.1],
        ];
        for (c, v) in cases.iter_mut().zip(values) {
            c.rounds.extend(v);
        }
        reaper_ns_per_entry.extend(reaps);
        let input = schedulers::RoundInput {
            window,
            syn: &syn,
            ack: &ack,
            floor_vary: s_drop_vary.1,
            floor_hot: s_drop.1,
            drop: d_drop.1,
        };
        if !core_only() {
            schedulers::round(&mut b, &mut sched_cases, &input)?;
            methods::round(&mut b, &mut method_cases, &input)?;
        }
    }

    report(&cases, &b.dp, &reaper_ns_per_entry)?;
    if core_only() {
        return Ok(());
    }
    let parse_hash = cases
        .iter()
        .find(|c| c.name.starts_with("parse + 1 hash"))
        .unwrap()
        .median();
    schedulers::report(&sched_cases, parse_hash);
    methods::report(&method_cases, parse_hash);
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-methods.json");
    std::fs::write(&out, serde_json::to_string_pretty(&method_cases)?)?;
    drop(netns);
    let json = serde_json::to_string_pretty(&sched_cases)?;
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-schedulers.json");
    std::fs::write(&out, json)?;
    println!("\nraw rounds: {}", out.display());
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<()> {
    if !ok {
        bail!("{what}: the program did not take the intended path");
    }
    Ok(())
}

impl Bench {
    /// Retires the connections in SYN_RECV (the new flows of the last measurement) with the
    /// reaper; returns the reaper's cost in ns per table entry walked.
    fn retire_new_flows(&mut self) -> Result<f64> {
        let mut t = tcp::DEFAULT_TIMEOUTS.map(lb_common::ticks::from_secs);
        // The measurements' own connections: embryonic, or reset (`establishing`).
        t[tcp::state::SYN_RECV as usize] = 0;
        t[tcp::state::CLOSE as usize] = 0;
        self.dp.set_globals(&Globals::with_ticks(t))?;
        // Timeout 0 expires entries a tick (16.8 ms) old.
        std::thread::sleep(Duration::from_millis(40));
        let walked = self.dp.flows_in_table()?;
        let t0 = std::time::Instant::now();
        self.dp.reap()?;
        let took = t0.elapsed();
        self.dp.set_globals(&Globals::default())?;
        ensure!(
            self.dp.flow_entries_free()?[0] > 0,
            "the reaper did not retire the new flows"
        );
        Ok(took.as_nanos() as f64 / walked.max(1) as f64)
    }

    /// ns per ACK that establishes one of `SYNC_BATCH` fresh connections (from `start`), with
    /// the master's sync reports on or off; checks that every one was reported (or none),
    /// none dropped, then resets the connections and retires them.
    fn establishing(&mut self, syn: &[u8], ack: &[u8], start: u64, sync: bool) -> Result<f64> {
        self.dp.set_sync_events(sync)?;
        self.fresh = start;
        self.measure("xlb", syn, Method::Fresh, SYNC_BATCH)?;
        let before = self.snapshot()?;
        self.fresh = start;
        let (_, ns) = self.measure("xlb", ack, Method::Fresh, SYNC_BATCH)?;
        self.expect(
            &before,
            &[(reason::TX, SYNC_BATCH as u64)],
            0,
            "establishing ACKs",
        )?;
        self.dp.set_sync_events(false)?;
        let reports = self.dp.drain_sync_events().len();
        let dropped = self.dp.reasons()?[reason::EV_SYNC_DROPPED as usize]
            - before.0[reason::EV_SYNC_DROPPED as usize];
        let want = if sync { SYNC_BATCH as usize } else { 0 };
        ensure!(
            reports == want && dropped == 0,
            "establishing ACKs: {reports} sync reports ({dropped} dropped), expected {want}"
        );
        let mut rst = ack.to_vec();
        rst[47] = tcp::flags::RST | tcp::flags::ACK;
        self.fresh = start;
        self.measure("xlb", &rst, Method::Fresh, SYNC_BATCH)?;
        self.retire_new_flows()?;
        Ok(ns)
    }

    fn snapshot(&self) -> Result<(Vec<u64>, u64)> {
        Ok((
            self.dp.reasons()?,
            self.dp.service_stats(self.service_id)?.conns,
        ))
    }

    /// Every iteration must have ended in `verdicts` (and nothing else), creating `conns`
    /// connections, with no flow left untracked.
    fn expect(
        &self,
        before: &(Vec<u64>, u64),
        verdicts: &[(u32, u64)],
        conns: u64,
        what: &str,
    ) -> Result<()> {
        let (after, after_conns) = self.snapshot()?;
        for r in 0..reason::VERDICTS {
            let want = verdicts
                .iter()
                .find(|(v, _)| *v == r)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            let got = after[r as usize] - before.0[r as usize];
            ensure!(
                got == want,
                "{what}: {} moved by {got}, expected {want}",
                reason::NAMES[r as usize]
            );
        }
        let failed = after[reason::EV_FLOW_INSERT_FAILED as usize]
            - before.0[reason::EV_FLOW_INSERT_FAILED as usize];
        ensure!(failed == 0, "{what}: {failed} flows could not be recorded");
        ensure!(
            after_conns - before.1 == conns,
            "{what}: {} new connections, expected {conns}",
            after_conns - before.1
        );
        Ok(())
    }
}

fn report(cases: &[Case], dp: &Dataplane, reaper_ns_per_entry: &[f64]) -> Result<()> {
    let by = |n: &str| cases.iter().find(|c| c.name.starts_with(n)).unwrap();
    let drop = by("XDP_DROP");
    let parse_tx = by("parse + swap");
    let hash = by("parse + 1 hash");
    let lru = by("bare LRU");
    println!(
        "\nns/packet, BPF_PROG_TEST_RUN, {} interleaved rounds, pinned to one CPU (min / median):\n",
        drop.rounds.len()
    );
    println!("| case | method | ns min | ns median | × drop | × parse+TX | × parse+hash |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for c in cases {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            c.name,
            c.method,
            c.min(),
            c.median(),
            c.median() / drop.median(),
            c.median() / parse_tx.median(),
            c.median() / hash.median()
        );
    }
    let nonvip = by("xlb: non-VIP");
    let hot = by("xlb: established flow, one");
    let new = by("xlb: new flow");
    // Per-round ratios (the two figures were measured back to back), then their median: the
    // host's drift between rounds cancels out.
    let ratio = |a: &Case, b: &Case| {
        let mut r: Vec<f64> = a.rounds.iter().zip(&b.rounds).map(|(x, y)| x / y).collect();
        r.sort_by(|x, y| x.partial_cmp(y).unwrap());
        (r[r.len() / 2], r[0], r[r.len() - 1])
    };
    println!("\nTargets (median of the per-round ratios, [min, max] over rounds):");
    let line = |what: &str, (v, lo, hi): (f64, f64, f64), target: f64| {
        println!(
            "  {what:<44} {v:>5.2} [{lo:.2}, {hi:.2}]  (target ≤ {target}) {}",
            if v <= target { "ok" } else { "MISSED" }
        )
    };
    line("non-VIP packet / parse+hash", ratio(nonvip, hash), 1.2);
    line(
        "established, one hot flow / parse+hash",
        ratio(hot, hash),
        2.0,
    );
    line(
        "new flow, full table / bare insert, full LRU",
        ratio(
            by("xlb: new flow every packet, full"),
            by("bare LRU insert, new key, full"),
        ),
        1.1,
    );
    println!(
        "  (for reference: new flow, full table / the same on a plain hash: {:.2}; that / bare insert, full LRU: {:.2})",
        ratio(
            by("xlb: new flow every packet, full"),
            by("hash: lookup, delete")
        )
        .0,
        ratio(
            by("hash: lookup, delete"),
            by("bare LRU insert, new key, full")
        )
        .0
    );
    println!(
        "  (for reference: the ACK establishing a connection, sync reports on / off: {:.2})",
        ratio(by("xlb: the same, sync on"), by("xlb: ACK establishing")).0
    );
    println!(
        "  (for reference: new flow / bare LRU insert, both 3/4 full: {:.2})",
        ratio(new, lru).0
    );
    println!(
        "  (for reference: new flow / LRU lookup+insert {:.2}; lookup+insert / insert {:.2})",
        ratio(new, by("LRU lookup")).0,
        ratio(by("LRU lookup"), lru).0
    );
    let mut r = reaper_ns_per_entry.to_vec();
    r.sort_by(|x, y| x.partial_cmp(y).unwrap());
    if !r.is_empty() {
        println!(
            "\nReaper (expiry walk over both tables): {:.1} ns per entry walked (median of {}, min {:.1}, max {:.1})",
            r[r.len() / 2],
            r.len(),
            r[0],
            r[r.len() - 1]
        );
    }
    println!("\nMemory (kernel memlock of the map / capacity):");
    for (name, bytes, entries) in dp.memory() {
        if entries > 0 {
            println!(
                "  {name:<14} {entries:>9} entries {:>9.1} MiB  {:>6.1} bytes/entry",
                bytes as f64 / (1 << 20) as f64,
                bytes as f64 / entries as f64
            );
        }
    }
    let json = serde_json::to_string_pretty(cases)?;
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.json");
    std::fs::write(&out, json)?;
    println!("\nraw rounds: {}", out.display());
    Ok(())
}
