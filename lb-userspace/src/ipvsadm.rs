//! ipvsadm 1.31's listing formats, column for column (`print_title()`,
//! `print_service_entry()`, `print_largenum()`), including its sort order.

use std::{cmp::Ordering, fmt::Write, net::IpAddr};

use crate::{
    api::ServicesResponse,
    config::PortRange,
    engine::{BackendView, ServiceView},
};

/// Which `ipvsadm -L` listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// `--stats`
    pub stats: bool,
    /// `--exact`
    pub exact: bool,
}

/// `ipvsadm -L -n` (and `--stats`).
pub fn list(resp: &ServicesResponse, opts: ListOptions) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "IP Virtual Server version 1.2.1 (size={})",
        resp.conn_table_size
    );
    if opts.stats {
        let _ = writeln!(
            out,
            "{:<33} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"
        );
        out.push_str("  -> RemoteAddress:Port\n");
    } else {
        out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
        out.push_str("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n");
    }
    let mut services: Vec<&ServiceView> = resp.services.iter().collect();
    merge_sort(&mut services, &|a, b| cmp_services(a, b));
    for s in services {
        let name = service_name(s);
        if opts.stats {
            let _ = write!(out, "{name:<33}");
            largenums(&mut out, &s.stats, opts.exact);
            out.push('\n');
        } else {
            let _ = write!(out, "{name} {}", s.scheduler.name());
            let flags = s.sched_flags.names(s.scheduler);
            if !flags.is_empty() {
                let _ = write!(out, " ({flags})");
            }
            if let Some(p) = s.persistence {
                let _ = write!(out, " persistent {}", p.timeout);
                match s.key.addr {
                    IpAddr::V4(_) if p.prefix < 32 => {
                        let mask = u32::MAX.checked_shl(32 - p.prefix as u32).unwrap_or(0);
                        let _ = write!(out, " mask {}", std::net::Ipv4Addr::from(mask));
                    }
                    IpAddr::V6(_) if p.prefix < 128 => {
                        let _ = write!(out, " mask {}", p.prefix);
                    }
                    _ => {}
                }
            }
            out.push('\n');
        }
        let mut backends: Vec<&BackendView> = s.backends.iter().collect();
        merge_sort(&mut backends, &|a, b| cmp_dests(a, b));
        for b in backends {
            let addr = addr_port(b.addr, b.port);
            if opts.stats {
                let _ = write!(out, "  -> {addr:<28}");
                largenums(&mut out, &b.stats, opts.exact);
                out.push('\n');
            } else {
                let _ = writeln!(
                    out,
                    "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                    addr,
                    b.forwarding.label(),
                    b.weight,
                    b.active_conns,
                    b.inactive_conns
                );
            }
        }
    }
    out
}

fn largenums(out: &mut String, c: &crate::engine::CountersView, exact: bool) {
    for v in [
        c.conns,
        c.in_packets,
        c.out_packets,
        c.in_bytes,
        c.out_bytes,
    ] {
        out.push_str(&largenum(v, exact));
    }
}

/// `print_largenum()`: nine characters, scaled to K/M/G/T above 10^8 unless `--exact`.
pub fn largenum(i: u64, exact: bool) -> String {
    if exact {
        let len = i.to_string().len();
        let w = if len <= 8 { 9 } else { len + 1 };
        return format!("{i:>w$}");
    }
    match i {
        0..100_000_000 => format!("{i:>9}"),
        100_000_000..1_000_000_000 => format!("{:>8}K", i / 1000),
        1_000_000_000..100_000_000_000 => format!("{:>8}M", i / 1_000_000),
        100_000_000_000..100_000_000_000_000 => format!("{:>8}G", i / 1_000_000_000),
        _ => format!("{:>8}T", i / 1_000_000_000_000),
    }
}

/// `"%-4s %s"` of protocol and address:port; IPv4 names are cut at 33 characters. Services
/// wider than one address and port (IPVS would need a firewall mark for them) show their
/// prefix and port set instead: `TCP  0.0.0.0/0:80,443`, `TCP  10.0.0.1:8000-8100`.
fn service_name(s: &ServiceView) -> String {
    let single = s.ports.len() <= 1
        && s.ports
            .first()
            .is_none_or(|r| r.first == r.last || *r == PortRange::ALL);
    let mut n = if s.key.is_host() && single {
        format!(
            "{:<4} {}",
            s.key.protocol.label(),
            addr_port(s.key.addr, s.key.port)
        )
    } else {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|r| {
                if *r == PortRange::ALL {
                    "0".to_string()
                } else {
                    r.to_string()
                }
            })
            .collect();
        let addr = if s.key.is_host() {
            match s.key.addr {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            }
        } else {
            match s.key.addr {
                IpAddr::V4(a) => format!("{a}/{}", s.key.prefix),
                IpAddr::V6(a) => format!("[{a}/{}]", s.key.prefix),
            }
        };
        format!("{:<4} {addr}:{}", s.key.protocol.label(), ports.join(","))
    };
    if s.key.addr.is_ipv4() {
        n.truncate(33);
    }
    n
}

fn addr_port(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// ipvsadm compares addresses by subtracting host-order u32s into an `int`, so addresses
/// 2^31 or more apart sort "backwards" (10.0.0.1 after 200.0.0.1). Reproduced on purpose.
fn cmp_addr(a: IpAddr, b: IpAddr) -> Ordering {
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V4(y)) => (u32::from(x).wrapping_sub(u32::from(y)) as i32).cmp(&0),
        (IpAddr::V6(x), IpAddr::V6(y)) => x.octets().cmp(&y.octets()),
        (IpAddr::V4(_), IpAddr::V6(_)) => Ordering::Less,
        (IpAddr::V6(_), IpAddr::V4(_)) => Ordering::Greater,
    }
}

/// `ipvs_cmp_services()`: family, protocol, address, port.
fn cmp_services(a: &ServiceView, b: &ServiceView) -> Ordering {
    let fam = |x: IpAddr| if x.is_ipv4() { 2 } else { 10 };
    fam(a.key.addr)
        .cmp(&fam(b.key.addr))
        .then(a.key.protocol.number().cmp(&b.key.protocol.number()))
        .then_with(|| cmp_addr(a.key.addr, b.key.addr))
        .then(a.key.port.cmp(&b.key.port))
}

/// `ipvs_cmp_dests()`: address, then port.
fn cmp_dests(a: &BackendView, b: &BackendView) -> Ordering {
    cmp_addr(a.addr, b.addr).then(a.port.cmp(&b.port))
}

/// glibc's `qsort` is a top-down merge sort; with ipvsadm's non-transitive address
/// comparison the result depends on the algorithm, so the same one is used here (Rust's
/// sort may reject such a comparator).
fn merge_sort<T: Copy>(v: &mut [T], cmp: &dyn Fn(&T, &T) -> Ordering) {
    let n = v.len();
    if n <= 1 {
        return;
    }
    let n1 = n / 2;
    let (left, right) = v.split_at_mut(n1);
    merge_sort(left, cmp);
    merge_sort(right, cmp);
    let mut merged = Vec::with_capacity(n);
    let (mut i, mut j) = (0, 0);
    while i < left.len() && j < right.len() {
        if cmp(&left[i], &right[j]) != Ordering::Greater {
            merged.push(left[i]);
            i += 1;
        } else {
            merged.push(right[j]);
            j += 1;
        }
    }
    merged.extend_from_slice(&left[i..]);
    merged.extend_from_slice(&right[j..]);
    v.copy_from_slice(&merged);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Forwarding, Persistence, Protocol, Scheduler, ServiceKey},
        engine::CountersView,
    };

    fn be(addr: &str, port: u16, w: u32, a: u64, i: u64) -> BackendView {
        BackendView {
            addr: addr.parse().unwrap(),
            port,
            forwarding: Forwarding::Dr,
            weight: w,
            active_conns: a,
            inactive_conns: i,
            stats: CountersView::default(),
            mac: None,
            index: 0,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: None,
            persist_conns: 0,
            rate: Default::default(),
        }
    }

    fn svc(addr: &str, port: u16, sched: Scheduler, backends: Vec<BackendView>) -> ServiceView {
        ServiceView {
            name: "x".into(),
            key: ServiceKey::new(addr.parse().unwrap(), port, Protocol::Tcp),
            scheduler: sched,
            sched_flags: Default::default(),
            ports: vec![PortRange::one(port)],
            persistence: None,
            id: 0,
            stats: CountersView::default(),
            rate: Default::default(),
            backends,
        }
    }

    /// The `ipvsadm -L -n` layout of ipvs.md §7.3 (DR services), trailing blanks included.
    #[test]
    fn list_matches_ipvsadm() {
        let resp = ServicesResponse {
            conn_table_size: 4096,
            services: vec![
                svc(
                    "2001:db8::1",
                    80,
                    Scheduler::Rr,
                    vec![be("2001:db8::10", 80, 1, 1, 0)],
                ),
                svc(
                    "10.0.0.1",
                    80,
                    Scheduler::Wrr,
                    vec![
                        be("192.168.1.11", 80, 1, 3, 17),
                        be("192.168.1.10", 80, 2, 5, 40),
                    ],
                ),
            ],
        };
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
            "TCP  10.0.0.1:80 wrr\n",
            "  -> 192.168.1.10:80              Route   2      5          40        \n",
            "  -> 192.168.1.11:80              Route   1      3          17        \n",
            "TCP  [2001:db8::1]:80 rr\n",
            "  -> [2001:db8::10]:80            Route   1      1          0         \n",
        );
        assert_eq!(list(&resp, ListOptions::default()), want);
    }

    #[test]
    fn persistence_and_wide_services_are_listed() {
        let mut a = svc("10.0.0.1", 443, Scheduler::Sh, vec![]);
        a.persistence = Some(Persistence {
            timeout: 360,
            prefix: 24,
        });
        let mut b = svc("10.0.0.2", 80, Scheduler::Wrr, vec![]);
        b.persistence = Some(Persistence {
            timeout: 300,
            prefix: 32,
        });
        b.ports = vec![
            PortRange::one(80),
            PortRange::one(443),
            PortRange {
                first: 8000,
                last: 8100,
            },
        ];
        let mut c = svc("0.0.0.0", 80, Scheduler::Dh, vec![]);
        c.key.prefix = 0;
        let mut d = svc("2001:db8::1", 0, Scheduler::Rr, vec![]);
        d.ports = vec![PortRange::ALL];
        d.persistence = Some(Persistence {
            timeout: 60,
            prefix: 64,
        });
        let resp = ServicesResponse {
            conn_table_size: 4096,
            services: vec![a, b, c, d],
        };
        let got = list(&resp, ListOptions::default());
        let lines: Vec<&str> = got.lines().skip(3).collect();
        assert_eq!(
            lines,
            vec![
                "TCP  0.0.0.0/0:80 dh",
                "TCP  10.0.0.1:443 sh persistent 360 mask 255.255.255.0",
                "TCP  10.0.0.2:80,443,8000-8100 wrr persistent 300",
                "TCP  [2001:db8::1]:0 rr persistent 60 mask 64",
            ]
        );
    }

    #[test]
    fn stats_layout_and_largenum() {
        let mut s = svc(
            "10.0.0.1",
            80,
            Scheduler::Rr,
            vec![be("192.168.1.10", 80, 1, 0, 0)],
        );
        s.stats = CountersView {
            conns: 1234567,
            in_packets: 9876543,
            in_bytes: 712345678,
            ..Default::default()
        };
        let resp = ServicesResponse {
            conn_table_size: 4096,
            services: vec![s],
        };
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes\n",
            "  -> RemoteAddress:Port\n",
            "TCP  10.0.0.1:80                   1234567  9876543        0  712345K        0\n",
            "  -> 192.168.1.10:80                     0        0        0        0        0\n",
        );
        assert_eq!(
            list(
                &resp,
                ListOptions {
                    stats: true,
                    exact: false
                }
            ),
            want
        );
        assert_eq!(largenum(99_999_999, false), " 99999999");
        assert_eq!(largenum(100_000_000, false), "  100000K");
        assert_eq!(largenum(1_500_000_000, false), "    1500M");
        assert_eq!(largenum(250_000_000_000, false), "     250G");
        assert_eq!(largenum(123_456_789_012_345, false), "     123T");
        assert_eq!(largenum(712345678, true), " 712345678");
        assert_eq!(largenum(5, true), "        5");
    }

    /// Scheduler flags follow the scheduler, in parentheses (ipvs.md §7.3).
    #[test]
    fn scheduler_flags_are_listed() {
        let mut s = svc("10.0.0.1", 443, Scheduler::Sh, vec![]);
        s.sched_flags = crate::config::SchedFlags {
            fallback: true,
            port: true,
        };
        let resp = ServicesResponse {
            conn_table_size: 4096,
            services: vec![s],
        };
        assert!(
            list(&resp, ListOptions::default())
                .contains("\nTCP  10.0.0.1:443 sh (sh-fallback,sh-port)\n")
        );
    }

    /// ipvsadm's signed-subtraction sort: 10.0.0.1 sorts after 200.0.0.1.
    #[test]
    fn address_sort_quirk() {
        let resp = ServicesResponse {
            conn_table_size: 1,
            services: vec![
                svc("10.0.0.1", 80, Scheduler::Rr, vec![]),
                svc("200.0.0.1", 80, Scheduler::Rr, vec![]),
            ],
        };
        let out = list(&resp, ListOptions::default());
        let a = out.find("200.0.0.1").unwrap();
        let b = out.find("10.0.0.1").unwrap();
        assert!(a < b, "{out}");
    }
}
