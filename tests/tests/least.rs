//! The least-connection family (lc, wlc, sed, nq, fo, ovf) and connection thresholds, run
//! side by side with the reference model (`xlb::sched::model`) over long random sequences of
//! new connections, closes, resets, expiries, weight and threshold changes and server
//! additions and removals: every choice, every count and every overload flag must agree.

use std::{net::IpAddr, time::Duration};

use lb_common::tcp::state;
use xlb::{
    config::{Protocol, Scheduler, ServiceKey},
    sched::{Dest, DestId, model::Ipvs},
};
use xlb_tests::{frames::*, harness::*};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn server(n: u8) -> IpAddr {
    ip(&format!("10.0.1.{n}"))
}

fn id(n: u8) -> DestId {
    (server(n), 80)
}

/// A configured real server: number, weight, upper and lower threshold.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rs {
    n: u8,
    weight: u32,
    upper: u32,
    lower: u32,
}

/// lblc and lblcr decide by destination: their service is a transparent-cache one, every
/// destination on port 80.
fn locality(sched: Scheduler) -> bool {
    matches!(sched, Scheduler::Lblc | Scheduler::Lblcr)
}

fn service_key(sched: Scheduler) -> ServiceKey {
    if locality(sched) {
        ServiceKey {
            addr: ip("0.0.0.0"),
            port: 80,
            protocol: Protocol::Tcp,
            prefix: 0,
        }
    } else {
        ServiceKey::new(ip("10.0.0.10"), 80, Protocol::Tcp)
    }
}

fn render(sched: Scheduler, cfg: &[Rs]) -> String {
    let address = if locality(sched) {
        "address = \"0.0.0.0/0\"\nports = [80]"
    } else {
        "address = \"10.0.0.10:80\""
    };
    let mut s = format!(
        "[[services]]\nname = \"m\"\n{address}\nscheduler = \"{}\"\n",
        sched.name()
    );
    for r in cfg {
        s += &format!(
            "[[services.backends]]\naddress = \"10.0.1.{}\"\nweight = {}\nupper_threshold = {}\nlower_threshold = {}\n",
            r.n, r.weight, r.upper, r.lower
        );
    }
    s
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ConnState {
    Active,
    /// FIN_WAIT: inactive, long timeout.
    Closing,
    /// CLOSE (after a reset): inactive, expires at the next expiry round.
    Closed,
}

struct Conn {
    port: u16,
    dst: &'static str,
    dest: DestId,
    state: ConnState,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const CLIENT: &str = "192.168.3.1";

fn tcp(port: u16, dst: &str, flags: u8) -> Vec<u8> {
    Frame::tcp(CLIENT, port, dst, 80, flags).build()
}

/// The destinations new connections go to: the VIP, or for lblc/lblcr a few addresses
/// behind the transparent cache.
fn destinations(sched: Scheduler) -> &'static [&'static str] {
    if locality(sched) {
        &[
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.3",
            "203.0.113.9",
            "192.0.2.77",
        ]
    } else {
        &["10.0.0.10"]
    }
}

/// Plays one scheduler for `steps` steps.
fn play(sched: Scheduler, seed: u64, steps: usize, thresholds: bool) {
    let mut rng = Rng(seed);
    let svc = service_key(sched);
    let dsts = destinations(sched);
    let rand_rs = |rng: &mut Rng, n: u8| {
        let upper = if thresholds {
            [0, 0, 2, 3, 5][rng.next(5) as usize]
        } else {
            0
        };
        let lower = if upper > 0 && rng.next(2) == 0 {
            1 + rng.next(upper as u64) as u32
        } else {
            0
        };
        Rs {
            n,
            weight: rng.next(5) as u32,
            upper,
            lower,
        }
    };
    let mut cfg: Vec<Rs> = vec![
        Rs {
            n: 1,
            weight: 2,
            upper: 0,
            lower: 0,
        },
        Rs {
            n: 2,
            weight: 1,
            upper: 0,
            lower: 0,
        },
    ];
    let mut h = Harness::new(&render(sched, &cfg));
    // Resets expire at the next reaper run; everything else stays.
    let mut t = [1_000_000u32; state::COUNT];
    t[state::CLOSE as usize] = 0;
    h.set_timeout_ticks(t);
    let mut model = Ipvs::new(sched);
    for r in &cfg {
        model.add(Dest {
            id: id(r.n),
            weight: r.weight,
        });
        model.set_thresholds(id(r.n), r.upper, r.lower);
    }
    let all: Vec<IpAddr> = (1..=9).map(server).collect();
    let mut conns: Vec<Conn> = Vec::new();
    let mut port = 10000u16;
    let mut chosen = 0;
    for step in 0..steps {
        let ctx = |cfg: &[Rs]| format!("{sched:?} step {step}: {cfg:?}");
        // A configuration change now and then.
        if rng.next(4) == 0 {
            let mut target = cfg.clone();
            match rng.next(4) {
                0 if target.len() < 6 => {
                    let n = 1 + rng.next(9) as u8;
                    if !target.iter().any(|t| t.n == n) {
                        target.push(rand_rs(&mut rng, n));
                    }
                }
                1 if target.len() > 1 => {
                    target.remove(rng.next(target.len() as u64) as usize);
                }
                _ => {
                    let i = rng.next(target.len() as u64) as usize;
                    let n = target[i].n;
                    target[i] = rand_rs(&mut rng, n);
                }
            }
            for m in model.list.clone() {
                if !target.iter().any(|t| id(t.n) == m.id) {
                    model.remove(m.id);
                }
            }
            for t in &target {
                match model.list.iter().find(|m| m.id == id(t.n)) {
                    Some(m) if m.weight != t.weight => model.edit(m.id, t.weight),
                    Some(_) => {}
                    None => model.add(Dest {
                        id: id(t.n),
                        weight: t.weight,
                    }),
                }
                model.set_thresholds(id(t.n), t.upper, t.lower);
            }
            cfg = target;
            h.apply(&render(sched, &cfg));
        }
        let alive = |d: DestId, model: &Ipvs| model.list.iter().any(|m| m.id == d);
        // Traffic.
        for _ in 0..rng.next(6) {
            match rng.next(5) {
                0 | 1 => {
                    port += 1;
                    let dst = dsts[rng.next(dsts.len() as u64) as usize];
                    let r = h.run(&tcp(port, dst, SYN));
                    let got = if r.action == XDP_TX {
                        h.server_of(&r, &all)
                    } else {
                        None
                    };
                    let want = model.schedule_packet(ip(CLIENT), port, ip(dst));
                    assert_eq!(got, want.map(|d| d.0), "to {dst}: {}", ctx(&cfg));
                    if let Some(d) = want {
                        // Established at once (a reset in SYN_RECV leaves IPVS's state as is).
                        assert_eq!(h.run(&tcp(port, dst, ACK)).action, XDP_TX);
                        model.bind(d);
                        conns.push(Conn {
                            port,
                            dst,
                            dest: d,
                            state: ConnState::Active,
                        });
                        chosen += 1;
                    }
                }
                2 => {
                    // The client closes an open connection.
                    let open: Vec<usize> = (0..conns.len())
                        .filter(|&i| {
                            conns[i].state == ConnState::Active && alive(conns[i].dest, &model)
                        })
                        .collect();
                    if let Some(&i) = open.get(rng.next(open.len().max(1) as u64) as usize) {
                        assert_eq!(
                            h.run(&tcp(conns[i].port, conns[i].dst, FIN | ACK)).action,
                            XDP_TX
                        );
                        model.deactivate(conns[i].dest);
                        conns[i].state = ConnState::Closing;
                    }
                }
                3 => {
                    // A reset, open or closing.
                    let live: Vec<usize> = (0..conns.len())
                        .filter(|&i| {
                            conns[i].state != ConnState::Closed && alive(conns[i].dest, &model)
                        })
                        .collect();
                    if let Some(&i) = live.get(rng.next(live.len().max(1) as u64) as usize) {
                        assert_eq!(h.run(&tcp(conns[i].port, conns[i].dst, RST)).action, XDP_TX);
                        if conns[i].state == ConnState::Active {
                            model.deactivate(conns[i].dest);
                        }
                        conns[i].state = ConnState::Closed;
                    }
                }
                _ => {
                    let open: Vec<usize> = (0..conns.len())
                        .filter(|&i| {
                            conns[i].state == ConnState::Active && alive(conns[i].dest, &model)
                        })
                        .collect();
                    if let Some(&i) = open.get(rng.next(open.len().max(1) as u64) as usize) {
                        // A retransmitted SYN follows its connection and schedules nothing
                        // (lblc/lblcr: their caches learn nothing from it).
                        let r = h.run(&tcp(conns[i].port, conns[i].dst, SYN));
                        assert_eq!(
                            h.server_of(&r, &all),
                            Some(conns[i].dest.0),
                            "retransmitted SYN; {}",
                            ctx(&cfg)
                        );
                    }
                    if rng.next(4) == 0 {
                        // Reset connections expire (timeout 0: a tick of 16.8 ms must have
                        // passed on the kernel's coarse clock, which itself lags by up to a
                        // jiffy: 20 ms was not always enough).
                        std::thread::sleep(Duration::from_millis(40));
                        h.reap();
                        conns.retain(|c| {
                            if c.state == ConnState::Closed {
                                model.unbind(c.dest, false);
                                false
                            } else {
                                true
                            }
                        });
                    }
                }
            }
        }
        // Counts and overload flags agree for every configured server.
        for r in &cfg {
            assert_eq!(
                h.conns(&svc, server(r.n)),
                model.counts(id(r.n)),
                "counts of 10.0.1.{}; {}",
                r.n,
                ctx(&cfg)
            );
            let index = h.engine.backend_index(&svc, server(r.n), 80).unwrap();
            assert_eq!(
                h.dp.conn_counts(index).unwrap().overloaded != 0,
                model.is_overloaded(id(r.n)),
                "overload flag of 10.0.1.{}; {}",
                r.n,
                ctx(&cfg)
            );
        }
    }
    h.assert_counts_match_tables();
    if locality(sched) {
        // The destination caches hold what the model's hold (members of servers still
        // configured, newest first).
        let by_index: std::collections::HashMap<u32, IpAddr> = cfg
            .iter()
            .map(|r| {
                (
                    h.engine.backend_index(&svc, server(r.n), 80).unwrap(),
                    server(r.n),
                )
            })
            .collect();
        let mut got: Vec<(IpAddr, Vec<IpAddr>)> =
            h.dp.locality()
                .into_iter()
                .map(|(_, dst, members)| {
                    (
                        dst,
                        members
                            .iter()
                            .filter_map(|i| by_index.get(i).copied())
                            .collect(),
                    )
                })
                .collect();
        got.sort();
        let configured: Vec<IpAddr> = cfg.iter().map(|r| server(r.n)).collect();
        let mut want: Vec<(IpAddr, Vec<IpAddr>)> = model
            .locality
            .iter()
            .map(|(dst, set)| {
                let members = set.iter().map(|d| d.0).filter(|a| configured.contains(a));
                (*dst, members.collect())
            })
            .collect();
        want.sort();
        assert_eq!(got, want, "{sched:?} destination caches");
        assert!(want.len() >= 3, "{sched:?}: {want:?}");
        if sched == Scheduler::Lblcr {
            assert!(
                want.iter().any(|(_, m)| m.len() > 1),
                "lblcr never grew a set: {want:?}"
            );
        }
    }
    assert!(
        chosen >= steps / 4,
        "{sched:?}: only {chosen} connections scheduled"
    );
}

/// lblc and lblcr: each destination keeps its server (set) until lblc's overload rule sends
/// it elsewhere; every choice is the model's.
#[test]
fn locality_schedulers_match_the_ipvs_model() {
    play(Scheduler::Lblc, 0x1b1c_0001, 300, true);
    play(Scheduler::Lblcr, 0x1b1c_0002, 300, true);
    play(Scheduler::Lblc, 0x1b1c_0003, 300, false);
    play(Scheduler::Lblcr, 0x1b1c_0004, 300, false);
}

#[test]
fn least_connection_family_matches_the_ipvs_model() {
    for (i, sched) in [
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Fo,
        Scheduler::Ovf,
    ]
    .into_iter()
    .enumerate()
    {
        play(sched, 0x5eed_0000 + i as u64 * 7919, 250, true);
    }
}

/// rr skips overloaded servers as IPVS's cursor does; wrr and rr keep their exact sequences
/// with connections coming and going (thresholds off for wrr: see `sched::rotate`).
#[test]
fn rotating_schedulers_with_thresholds_match_the_ipvs_model() {
    play(Scheduler::Rr, 0xabcd_ef01, 250, true);
    play(Scheduler::Wrr, 0x1357_9bdf, 250, false);
}

/// The worked example of `ipvs.md` §1.2 that tells the overhead formulas apart: A (1 active)
/// before B (256 inactive) in list order, equal weights. Linux 6.12's active·256 + total
/// gives A 257 and B 256, so B; the classic active·256 + inactive would tie and pick A.
#[test]
fn overhead_counts_total_connections_as_linux_does() {
    let render = |wa: u32, wb: u32| {
        // Configuration order B, A: list order A, B.
        format!(
            "[[services]]\nname = \"m\"\naddress = \"10.0.0.10:80\"\nscheduler = \"lc\"\n[[services.backends]]\naddress = \"10.0.1.2\"\nweight = {wb}\n[[services.backends]]\naddress = \"10.0.1.1\"\nweight = {wa}\n"
        )
    };
    let (a, b) = (server(1), server(2));
    let all = [a, b];
    let svc = ServiceKey::new(ip("10.0.0.10"), 80, Protocol::Tcp);
    let mut h = Harness::new(&render(0, 1));
    for port in 0..256 {
        let r = h.run(&tcp(20000 + port, "10.0.0.10", SYN));
        assert_eq!(h.server_of(&r, &all), Some(b));
        h.run(&tcp(20000 + port, "10.0.0.10", FIN | ACK));
    }
    h.apply(&render(1, 0));
    assert_eq!(
        h.server_of(&h.run(&tcp(30000, "10.0.0.10", SYN)), &all),
        Some(a)
    );
    h.apply(&render(1, 1));
    assert_eq!(h.conns(&svc, a), (1, 0));
    assert_eq!(h.conns(&svc, b), (0, 256));
    assert_eq!(
        h.server_of(&h.run(&tcp(30001, "10.0.0.10", SYN)), &all),
        Some(b)
    );
}

/// twos is random by design: over thousands of new connections (whose counts shift the odds
/// as they accumulate and close), each server's share must match the model's exact
/// probabilities, summed connection by connection, within 5 standard deviations.
#[test]
fn twos_matches_the_model_in_distribution() {
    let render = |cfg: &[(u8, u32)]| {
        let mut text =
            "[[services]]\nname = \"m\"\naddress = \"10.0.0.10:80\"\nscheduler = \"twos\"\n"
                .to_string();
        for (n, w) in cfg {
            text += &format!("[[services.backends]]\naddress = \"10.0.1.{n}\"\nweight = {w}\n");
        }
        text
    };
    let cfg = [(1u8, 1u32), (2, 2), (3, 3)];
    let mut model = Ipvs::new(Scheduler::Twos);
    for (n, w) in cfg {
        model.add(Dest {
            id: id(n),
            weight: w,
        });
    }
    let mut h = Harness::new(&render(&cfg));
    let mut rng = Rng(0x7e05_1234_abcd_0001);
    let mut port = 10000u16;
    twos_phase(&h, &mut model, &mut rng, &mut port, 2200);
    // A weight change that keeps the slot table (the same servers): the cached sum of the
    // weights must follow it.
    let cfg = [(1u8, 6u32), (2, 6), (3, 6)];
    h.apply(&render(&cfg));
    for n in 1..=3 {
        model.edit(id(n), 6);
    }
    twos_phase(&h, &mut model, &mut rng, &mut port, 1500);
}

/// `n` new connections (half of them closing soon, so the overheads differ from the
/// weights); the servers' shares must match the model's probabilities.
fn twos_phase(h: &Harness, model: &mut Ipvs, rng: &mut Rng, port: &mut u16, n: u16) {
    let all: Vec<IpAddr> = (1..=3).map(server).collect();
    let mut expected = [0f64; 4];
    let mut variance = [0f64; 4];
    let mut observed = [0u32; 4];
    for _ in 0..n {
        for (d, p) in model.twos_probabilities() {
            let n = match d.0 {
                IpAddr::V4(a) => a.octets()[3] as usize,
                _ => unreachable!(),
            };
            expected[n] += p;
            variance[n] += p * (1.0 - p);
        }
        *port += 1;
        let got = h
            .server_of(&h.run(&tcp(*port, "10.0.0.10", SYN)), &all)
            .unwrap_or_else(|| panic!("not forwarded: {:?}", h.counters()));
        h.run(&tcp(*port, "10.0.0.10", ACK));
        let n = match got {
            IpAddr::V4(a) => a.octets()[3] as usize,
            _ => unreachable!(),
        };
        observed[n] += 1;
        model.bind(id(n as u8));
        if rng.next(2) == 0 {
            h.run(&tcp(*port, "10.0.0.10", FIN | ACK));
            model.deactivate(id(n as u8));
        }
    }
    for n in 1..=3 {
        let tolerance = 5.0 * variance[n].sqrt();
        assert!(
            (observed[n] as f64 - expected[n]).abs() <= tolerance,
            "server {n}: observed {}, expected {:.1} ± {tolerance:.1} (all: {observed:?} vs {expected:?})",
            observed[n],
            expected[n]
        );
    }
}

fn big_server(n: u16) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(10, 1, (n >> 8) as u8, n as u8))
}

/// A service with more servers than `lb_common::group::MIN_SLOTS` is scanned by groups (the
/// dirty groups rescanned, then the groups' bests compared): every choice must still be the
/// model's single scan's, through connections opening, closing and expiring and weight
/// changes (which change the table and regroup it).
fn play_grouped(sched: Scheduler, seed: u64, servers: u16, steps: usize) {
    let mut rng = Rng(seed);
    let mut weights: Vec<u32> = (0..servers)
        .map(|_| [0, 1, 1, 2, 3, 4][rng.next(6) as usize])
        .collect();
    let render = |w: &[u32]| {
        let mut s = format!(
            "[[services]]\nname = \"big\"\naddress = \"10.0.0.10:80\"\nscheduler = \"{}\"\n",
            sched.name()
        );
        for (i, w) in w.iter().enumerate() {
            s += &format!(
                "[[services.backends]]\naddress = \"{}\"\nweight = {w}\n",
                big_server(i as u16 + 1)
            );
        }
        s
    };
    let mut h = Harness::with_limits(
        &render(&weights),
        xlb::config::Limits {
            conn_table_size: 4096,
            conn_table_size_v6: 4096,
            max_services: 64,
            max_backends: 4096,
            slot_table_size: 1 << 16,
            ..Default::default()
        },
    );
    let mut t = [1_000_000u32; state::COUNT];
    t[state::CLOSE as usize] = 0;
    h.set_timeout_ticks(t);
    let mut model = Ipvs::new(sched);
    for (i, w) in weights.iter().enumerate() {
        model.add(Dest {
            id: (big_server(i as u16 + 1), 80),
            weight: *w,
        });
    }
    let all: Vec<IpAddr> = (1..=servers).map(big_server).collect();
    let mut open: Vec<(u16, DestId)> = Vec::new();
    let mut closed: Vec<DestId> = Vec::new();
    let mut port = 1000u16;
    for step in 0..steps {
        match rng.next(10) {
            0..=5 => {
                port += 1;
                let r = h.run(&tcp(port, "10.0.0.10", SYN));
                let got = (r.action == XDP_TX)
                    .then(|| h.server_of(&r, &all))
                    .flatten();
                let want = model.schedule_packet(ip(CLIENT), port, ip("10.0.0.10"));
                assert_eq!(got, want.map(|d| d.0), "{sched:?} step {step}");
                if let Some(d) = want {
                    h.run(&tcp(port, "10.0.0.10", ACK));
                    model.bind(d);
                    open.push((port, d));
                }
            }
            6 | 7 if !open.is_empty() => {
                let (p, d) = open.swap_remove(rng.next(open.len() as u64) as usize);
                assert_eq!(h.run(&tcp(p, "10.0.0.10", RST)).action, XDP_TX);
                model.deactivate(d);
                closed.push(d);
            }
            8 => {
                // Two ticks of the coarse clock at least (see above).
                std::thread::sleep(Duration::from_millis(40));
                h.reap();
                for d in closed.drain(..) {
                    model.unbind(d, false);
                }
            }
            _ => {
                // A weight change: the table is rebuilt and regrouped.
                let i = rng.next(servers as u64) as usize;
                weights[i] = [0, 1, 2, 5][rng.next(4) as usize];
                model.edit((big_server(i as u16 + 1), 80), weights[i]);
                h.apply(&render(&weights));
            }
        }
    }
    h.assert_counts_match_tables();
}

#[test]
fn grouped_scans_match_the_model_on_large_services() {
    for (i, sched) in [
        Scheduler::Wlc,
        Scheduler::Lc,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Ovf,
    ]
    .into_iter()
    .enumerate()
    {
        play_grouped(sched, 0x6a0b_0000 + i as u64, 300 + 37 * i as u16, 400);
    }
    // Two or three groups (the smallest grouped services).
    play_grouped(Scheduler::Wlc, 0x6a0b_0100, 45, 400);
    play_grouped(Scheduler::Nq, 0x6a0b_0101, 70, 400);
    play_grouped(Scheduler::Fo, 0x6a0b_0102, 64, 300);
    // lblc/lblcr ask the groups whether any server is underloaded.
    play_grouped(Scheduler::Lblc, 0x6a0b_0103, 70, 400);
    play_grouped(Scheduler::Lblcr, 0x6a0b_0104, 333, 400);
}
