//! Where a virtual service is found: the entries it needs in the data plane's match maps
//! (exact hash maps, the `WIDE_*` and `PREFIX_*` tries of `lb_common::wide`) and its bits in
//! the prefilter.

use std::net::IpAddr;

use lb_common::{ServiceKeyV4, ServiceKeyV6, filter, wide};

use crate::{
    config::{PortRange, ServiceConfig, host_bits},
    engine::addr_words,
};

/// One entry of a service in a match map. Trie entries carry their LPM prefix length in bits
/// (over the key data of `lb_common::wide`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatchEntry {
    ExactV4(ServiceKeyV4),
    ExactV6(ServiceKeyV6),
    WideV4(u32, [u8; wide::V4_LEN]),
    WideV6(u32, [u8; wide::V6_LEN]),
    PrefixV4(u32, [u8; wide::V4_LEN]),
    PrefixV6(u32, [u8; wide::V6_LEN]),
}

/// A port range as aligned power-of-two blocks: (first port, prefix bits of 16).
pub fn port_blocks(r: PortRange) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let mut at = r.first as u32;
    let end = r.last as u32;
    while at <= end {
        // The largest block that starts at `at` and stays within the range.
        let mut size = if at == 0 {
            1 << 16
        } else {
            1 << at.trailing_zeros()
        };
        while at + size - 1 > end {
            size >>= 1;
        }
        out.push((at as u16, 16 - size.trailing_zeros()));
        at += size;
    }
    out
}

/// Every entry `svc` needs.
pub fn entries(svc: &ServiceConfig) -> Vec<MatchEntry> {
    let k = &svc.key;
    let proto = k.protocol.number();
    let a = addr_words(k.addr);
    let v4 = k.addr.is_ipv4();
    let bits = host_bits(k.addr) as u32;
    let host = k.is_host();
    let mut out = Vec::new();
    for r in &svc.ports {
        if host && r.first == r.last {
            out.push(if v4 {
                MatchEntry::ExactV4(ServiceKeyV4::new(a[0], r.first.to_be(), proto))
            } else {
                MatchEntry::ExactV6(ServiceKeyV6::new(a, r.first.to_be(), proto))
            });
        } else if host || *r == PortRange::ALL {
            let prefix = if host { bits } else { k.prefix as u32 };
            for (first, pbits) in port_blocks(*r) {
                let len = 8 + prefix + if host { pbits } else { 0 };
                out.push(if v4 {
                    MatchEntry::WideV4(len, wide::v4_addr_port(proto, a[0], first.to_be()))
                } else {
                    MatchEntry::WideV6(len, wide::v6_addr_port(proto, a, first.to_be()))
                });
            }
        } else {
            for p in r.first..=r.last {
                let len = 8 + 16 + k.prefix as u32;
                out.push(if v4 {
                    MatchEntry::PrefixV4(len, wide::v4_port_addr(proto, p.to_be(), a[0]))
                } else {
                    MatchEntry::PrefixV6(len, wide::v6_port_addr(proto, p.to_be(), a))
                });
            }
        }
    }
    out
}

fn fold(a: IpAddr) -> u32 {
    let w = addr_words(a);
    w[0] ^ w[1] ^ w[2] ^ w[3]
}

/// The prefilter for a set of services: the bitmap, then the `wide::F_*` flag word.
pub fn filter_words(services: &[ServiceConfig]) -> Vec<u64> {
    let mut w = vec![0u64; filter::WORDS as usize + 1];
    let mut set = |bit: u32| w[(bit / 64) as usize] |= 1 << (bit % 64);
    let mut flags = 0u64;
    for s in services {
        let proto = s.key.protocol.number();
        for e in entries(s) {
            match e {
                // Ports are in network byte order in keys, as the filter wants them.
                MatchEntry::ExactV4(k) => set(filter::bit(fold(s.key.addr), k.port, proto)),
                MatchEntry::ExactV6(k) => set(filter::bit(fold(s.key.addr), k.port, proto)),
                MatchEntry::WideV4(..) | MatchEntry::WideV6(..) if s.key.is_host() => {
                    set(filter::bit(fold(s.key.addr), 0, proto));
                    flags |= wide::F_ADDR_WIDE;
                }
                MatchEntry::WideV4(..) | MatchEntry::WideV6(..) => {
                    flags |= if proto == lb_common::PROTO_TCP {
                        wide::F_ANY_TCP
                    } else {
                        wide::F_ANY_UDP
                    };
                }
                // The port follows the protocol byte in `PREFIX_*` keys.
                MatchEntry::PrefixV4(_, d) => {
                    set(filter::bit(0, u16::from_ne_bytes([d[1], d[2]]), proto));
                    flags |= wide::F_PREFIX_PORT;
                }
                MatchEntry::PrefixV6(_, d) => {
                    set(filter::bit(0, u16::from_ne_bytes([d[1], d[2]]), proto));
                    flags |= wide::F_PREFIX_PORT;
                }
            }
        }
    }
    for b in services.iter().flat_map(|s| &s.backends) {
        if b.forwarding == crate::config::Forwarding::Nat {
            flags |= wide::F_NAT;
            if b.port == 0 {
                flags |= wide::F_NAT_ANY_PORT;
            }
        }
    }
    w[filter::WORDS as usize] = flags;
    w
}

/// The NAT replies' prefilter (`NAT_SOURCES`): a bit per (real server address, port,
/// protocol) of every NAT real server (port 0 for those that answer from any port); the
/// service prefilter's flag word says whether to look (`wide::F_NAT`, `F_NAT_ANY_PORT`).
pub fn nat_source_words(services: &[ServiceConfig]) -> Vec<u64> {
    let mut w = vec![0u64; filter::WORDS as usize];
    for s in services {
        let proto = s.key.protocol.number();
        for b in s
            .backends
            .iter()
            .filter(|b| b.forwarding == crate::config::Forwarding::Nat)
        {
            let bit = filter::bit(fold(b.addr), b.port.to_be(), proto);
            w[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }
    w
}

/// Checks that the match maps can hold a change from `old` to `desired`: while services are
/// switched, the old entries and the new ones coexist (new ones are written before stale
/// ones go), so the union must fit. `max_services` sizes the exact maps; the tries hold
/// `lb_common::defaults::WIDE_ENTRIES` each.
pub fn check_capacity(
    old: &[ServiceConfig],
    desired: &[ServiceConfig],
    max_services: u32,
) -> Result<(), String> {
    let mut union = std::collections::HashSet::new();
    for s in old.iter().chain(desired) {
        union.extend(entries(s));
    }
    let mut counts = [0u32; 6];
    for e in &union {
        let i = match e {
            MatchEntry::ExactV4(_) => 0,
            MatchEntry::ExactV6(_) => 1,
            MatchEntry::WideV4(..) => 2,
            MatchEntry::WideV6(..) => 3,
            MatchEntry::PrefixV4(..) => 4,
            MatchEntry::PrefixV6(..) => 5,
        };
        counts[i] += 1;
    }
    let wide = lb_common::defaults::WIDE_ENTRIES;
    let maps = [
        (
            "SERVICES_V4 (IPv4 address:port services)",
            max_services,
            "raise [dataplane] max_services",
        ),
        (
            "SERVICES_V6 (IPv6 address:port services)",
            max_services,
            "raise [dataplane] max_services",
        ),
        (
            "WIDE_V4 (IPv4 port ranges)",
            wide,
            "use fewer or wider aligned ranges",
        ),
        (
            "WIDE_V6 (IPv6 port ranges)",
            wide,
            "use fewer or wider aligned ranges",
        ),
        (
            "PREFIX_V4 (IPv4 prefix services, one entry per port)",
            wide,
            "use fewer ports or port 0",
        ),
        (
            "PREFIX_V6 (IPv6 prefix services, one entry per port)",
            wide,
            "use fewer ports or port 0",
        ),
    ];
    for ((name, cap, hint), n) in maps.iter().zip(counts) {
        if n > *cap {
            return Err(format!(
                "the services need {n} entries in {name}, which holds {cap} (old and new entries coexist during a change): {hint}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(text: &str) -> Vec<ServiceConfig> {
        let t = format!("[dataplane]\ninterfaces = [\"x\"]\n{text}");
        crate::config::parse(std::path::Path::new("t.toml"), &t)
            .unwrap()
            .services
    }

    /// Old and new entries coexist during a change: the union must fit.
    #[test]
    fn capacity_counts_the_union() {
        let a = svc("[[services]]\nname = \"a\"\naddress = \"10.0.0.1\"\nports = [80, 443]\n");
        let b = svc("[[services]]\nname = \"b\"\naddress = \"10.0.0.2\"\nports = [80, 443]\n");
        assert!(check_capacity(&[], &a, 2).is_ok());
        let e = check_capacity(&a, &b, 3).unwrap_err();
        assert!(e.contains("4 entries in SERVICES_V4"), "{e}");
        assert!(check_capacity(&a, &b, 4).is_ok());
        assert!(check_capacity(&a, &a, 2).is_ok());
    }

    fn blocks(a: u16, b: u16) -> Vec<(u16, u32)> {
        port_blocks(PortRange { first: a, last: b })
    }

    /// Blocks cover the range exactly, each aligned to its size.
    #[test]
    fn port_blocks_cover_ranges_exactly() {
        assert_eq!(blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(blocks(80, 80), vec![(80, 16)]);
        assert_eq!(blocks(8000, 8003), vec![(8000, 14)]);
        for (a, b) in [
            (1, 65535),
            (1000, 2000),
            (7, 9),
            (65535, 65535),
            (1, 1),
            (1024, 65535),
        ] {
            let v = blocks(a, b);
            let mut next = a as u32;
            for (first, bits) in v {
                let size = 1u32 << (16 - bits);
                assert_eq!(first as u32, next, "{a}-{b}");
                assert_eq!(first as u32 % size, 0, "aligned");
                next += size;
            }
            assert_eq!(next, b as u32 + 1, "{a}-{b}");
        }
        // At most 2 blocks per bit.
        assert!(blocks(1, 65534).len() <= 30);
    }
}
