//! The real XDP program, loaded with small maps, driven with `BPF_PROG_TEST_RUN`.

use std::{net::IpAddr, path::Path};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::reason;
use xlb::{
    config::{self, Limits, ServiceConfig, ServiceKey},
    dataplane::Dataplane,
    engine::{Engine, NextHop},
};

use crate::frames::LB_MAC;

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The path MTU the harness pretends every real server has.
pub const PATH_MTU: u32 = 1500;
/// The source addresses the harness pretends the routing table picks toward real servers
/// (tunnels' outer source).
pub const LB_SOURCE_V4: &str = "10.0.0.2";
pub const LB_SOURCE_V6: &str = "fd00::2";

/// The MAC the harness pretends real server `addr` has.
pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let o = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let n = o.len();
    [0x02, 0xbe, o[n - 4], o[n - 3], o[n - 2], o[n - 1]]
}

pub struct Harness {
    pub dp: Dataplane,
    pub engine: Engine,
}

/// Result of one run.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    pub action: u32,
    pub out: Vec<u8>,
}

impl Harness {
    /// Loads the program with small maps and installs the services of `toml` (the
    /// `[[services]]` part of a configuration). Every real server is resolved to
    /// [`backend_mac`], reached through the loopback device (so the verdict is `XDP_TX`).
    pub fn new(services_toml: &str) -> Harness {
        Self::with_limits(
            services_toml,
            Limits {
                conn_table_size: 4096,
                conn_table_size_v6: 4096,
                max_services: 64,
                max_backends: 256,
                slot_table_size: 1 << 16,
                ..Limits::default()
            },
        )
    }

    pub fn with_limits(services_toml: &str, limits: Limits) -> Harness {
        crate::require_root();
        let dp = Dataplane::load(limits).expect("load the XDP program");
        let engine = Engine::new(&dp);
        let mut h = Harness { dp, engine };
        h.apply(services_toml);
        h
    }

    /// Replaces the services (as a reload would). Real servers not seen before get their
    /// [`backend_mac`] as resolved next hop first.
    pub fn apply(&mut self, services_toml: &str) {
        let services = parse_services(services_toml);
        for s in &services {
            for b in &s.backends {
                if self.engine.next_hop(b.addr).is_none() {
                    let nh = NextHop {
                        ifindex: 1,
                        dst_mac: backend_mac(b.addr),
                        src_mac: LB_MAC,
                        gateway: None,
                        mtu: PATH_MTU,
                        source: Some(if b.addr.is_ipv4() {
                            LB_SOURCE_V4.parse().unwrap()
                        } else {
                            LB_SOURCE_V6.parse().unwrap()
                        }),
                    };
                    self.engine
                        .set_next_hop(&mut self.dp, b.addr, Some(nh))
                        .unwrap();
                }
            }
        }
        self.engine.apply(&mut self.dp, &services).expect("apply");
    }

    /// Runs the program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Run {
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        Run {
            action: r.return_value,
            out,
        }
    }

    /// The verdict/event counters.
    pub fn counters(&self) -> Vec<u64> {
        self.dp.reasons().unwrap()
    }

    /// Which real server (address) a forwarded frame was sent to, from its destination MAC.
    pub fn server_of(&self, run: &Run, candidates: &[IpAddr]) -> Option<IpAddr> {
        candidates
            .iter()
            .copied()
            .find(|a| run.out[0..6] == backend_mac(*a))
    }

    /// Runs the connection reaper once.
    pub fn reap(&self) {
        self.dp.reap().expect("reaper run");
    }

    /// Sets every state's idle timeout, in ticks (about 16.8 ms each), bypassing the
    /// whole-seconds configuration so expiry tests run quickly.
    pub fn set_timeout_ticks(&mut self, ticks: [u32; lb_common::tcp::state::COUNT]) {
        self.dp
            .set_globals(&lb_common::Globals::with_ticks(ticks))
            .unwrap();
    }

    /// (ActiveConn, InActConn) of real server `addr` of service `key`.
    pub fn conns(&self, key: &ServiceKey, addr: IpAddr) -> (u64, u64) {
        let view = self.engine.view(&self.dp).unwrap();
        let svc = view.iter().find(|s| s.key == *key).expect("service");
        let b = svc
            .backends
            .iter()
            .find(|b| b.addr == addr)
            .expect("real server");
        (b.active_conns, b.inactive_conns)
    }

    /// Checks the invariant behind ActiveConn/InActConn: the data plane's counts equal a count
    /// of the live (not retired) entries of the connection tables, for every backend index.
    pub fn assert_counts_match_tables(&self) {
        use std::collections::HashMap;
        let mut walked: HashMap<u32, (u64, u64)> = HashMap::new();
        let flows = self
            .dp
            .flows_v4()
            .into_iter()
            .map(|(_, f)| f)
            .chain(self.dp.flows_v6().into_iter().map(|(_, f)| f));
        for f in flows {
            if f.status & lb_common::FLOW_DEAD != 0 {
                continue;
            }
            let e = walked.entry(f.backend).or_default();
            if lb_common::tcp::is_active(f.state()) {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        for index in 0..self.dp.limits.max_backends {
            let c = self.dp.conn_counts(index).unwrap();
            let want = walked.get(&index).copied().unwrap_or((0, 0));
            assert_eq!(
                (c.active, c.inactive),
                want,
                "backend index {index}: counts vs connection table"
            );
        }
    }

    pub fn service_id(&self, key: &ServiceKey) -> u32 {
        self.engine.service_id(key).unwrap()
    }
}

/// Parses `[[services]]` TOML into validated services (a dummy `[dataplane]` is added).
pub fn parse_services(services_toml: &str) -> Vec<ServiceConfig> {
    let text = format!("[dataplane]\ninterfaces = [\"lo\"]\n{services_toml}");
    config::parse(Path::new("test.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .services
}

/// Counter deltas by name, for readable assertions.
pub fn delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    reason::NAMES
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(n, (b, a))| (*n, a - b))
        .collect()
}
