//! ipvsadm 1.31's output formats, column for column: the listings of `ipvsadm -L` in all their
//! variants (`print_title()`, `print_service_entry()`, `print_largenum()`), the single-service
//! listing, `-L -c` (`list_conn()`/`print_conn()`), `-L --timeout`, and the rules `ipvsadm -S`
//! (`ipvsadm-save`) writes, including ipvsadm's sort order.
//!
//! Without `-n`, ipvsadm resolves addresses (reverse DNS) and ports (`/etc/services`). xlb
//! resolves ports the same way ([`PortNames`]) but always prints addresses numerically: a
//! reverse lookup per line can stall a listing for seconds and the layout is the same either
//! way (columns are padded, never cut, except at ipvsadm's own 33/28-character limits).

use std::{
    cmp::Ordering,
    collections::HashMap,
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
    sync::OnceLock,
};

use crate::{
    api::{ConnView, ServicesResponse},
    config::{
        Forwarding, PortRange, Protocol, SchedFlags, Scheduler, ServiceKey, Timeouts,
        TunnelChecksum, TunnelType,
    },
    engine::{BackendView, CountersView, RateView, ServiceView},
};

/// `xlb list`'s knobs (`-L -n` with `--stats` / `--exact`); see [`ListFormat`] for all of
/// ipvsadm's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// `--stats`
    pub stats: bool,
    /// `--exact`
    pub exact: bool,
}

/// `ipvsadm -L -n` (and `--stats`, `--exact`).
pub fn list(resp: &ServicesResponse, opts: ListOptions) -> String {
    let f = ListFormat {
        numeric: true,
        stats: opts.stats,
        exact: opts.exact,
        ..Default::default()
    };
    list_all(resp, &f, &PortNames::default())
}

/// ipvsadm's listing options (its `FMT_*` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListFormat {
    /// `-n`: numeric ports (addresses are always numeric in xlb, see the module comment).
    pub numeric: bool,
    /// `--stats`
    pub stats: bool,
    /// `--rate`
    pub rate: bool,
    /// `--thresholds`
    pub thresholds: bool,
    /// `--persistent-conn`
    pub persistent_conn: bool,
    /// `--tun-info`
    pub tun_info: bool,
    /// `--nosort`: the daemon's order.
    pub nosort: bool,
    /// `--exact`: numbers in full instead of K/M/G/T.
    pub exact: bool,
}

/// The layout a [`ListFormat`] selects; the first of these flags wins, as in `print_title()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Stats,
    Rate,
    Thresholds,
    PersistentConn,
    TunInfo,
    Default,
}

impl ListFormat {
    fn layout(&self) -> Layout {
        if self.stats {
            Layout::Stats
        } else if self.rate {
            Layout::Rate
        } else if self.thresholds {
            Layout::Thresholds
        } else if self.persistent_conn {
            Layout::PersistentConn
        } else if self.tun_info {
            Layout::TunInfo
        } else {
            Layout::Default
        }
    }
}

/// `ipvsadm -L [options]` (`list_all()`): the version header, the column titles and every
/// service with its real servers.
pub fn list_all(resp: &ServicesResponse, f: &ListFormat, names: &PortNames) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "IP Virtual Server version 1.2.1 (size={})",
        resp.conn_table_size
    );
    title(&mut out, f.layout());
    for s in sorted_services(resp, f.nosort) {
        service_entry(&mut out, s, f, names);
    }
    out
}

/// `ipvsadm -L -t|-u service [options]` (`list_service()`): column titles and the one
/// service, no version header.
pub fn list_service(s: &ServiceView, f: &ListFormat, names: &PortNames) -> String {
    let mut out = String::new();
    title(&mut out, f.layout());
    service_entry(&mut out, s, f, names);
    out
}

/// The service ipvsadm means by `key` (address, port, protocol of a one-address service).
pub fn find_service<'a>(resp: &'a ServicesResponse, key: &ServiceKey) -> Option<&'a ServiceView> {
    resp.services.iter().find(|s| same_service(&s.key, key))
}

/// Whether two keys name the same service (the prefix length of a one-address key may be
/// either host length in older messages, see `ServiceKey`).
pub fn same_service(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.addr == b.addr
        && a.port == b.port
        && a.protocol == b.protocol
        && a.is_host() == b.is_host()
        && (a.is_host() || a.prefix == b.prefix)
}

/// `ipvsadm -L --timeout` (`list_timeout()`).
pub fn list_timeout(t: &Timeouts) -> String {
    format!(
        "Timeout (tcp tcpfin udp): {} {} {}\n",
        t.tcp, t.tcp_fin, t.udp
    )
}

/// `ipvsadm -L -c [-n] [--persistent-conn]` (`list_conn()`, `print_conn()`): entries in the
/// order given (IPVS prints its hash-table order, never sorted). xlb has no persistence
/// engines, so rows never carry the pe columns; the `--persistent-conn` title does.
pub fn list_connections(conns: &[ConnView], f: &ListFormat, names: &PortNames) -> String {
    let mut out = String::from("IPVS connection entries\n");
    if f.persistent_conn {
        let _ = writeln!(
            out,
            "pro expire {:<11} {:<18} {:<18} {:<18} {:<16} pe_data",
            "state", "source", "virtual", "destination", "pe name"
        );
    } else {
        let _ = writeln!(
            out,
            "pro expire {:<11} {:<18} {:<18} destination",
            "state", "source", "virtual"
        );
    }
    for c in conns {
        let proto = match c.protocol.as_str() {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        };
        let name = |a: std::net::SocketAddr| addr_port(a.ip(), a.port(), proto, f.numeric, names);
        let expire = format!("{:02}:{:02}", c.expire_secs / 60, c.expire_secs % 60);
        let _ = writeln!(
            out,
            "{:<3} {:<6} {:<11} {:<18} {:<18} {}",
            c.protocol,
            expire,
            c.state,
            name(c.client),
            name(c.vip),
            name(c.dest)
        );
    }
    out
}

/// `ipvsadm -S [-n]` (`ipvsadm-save`): one `-A` line per service and one `-a` line per real
/// server, sorted as `-L` sorts, options in ipvsadm's order. Like ipvsadm 1.31, servers are
/// saved without `-x`/`-y` (thresholds are not part of its save format). Services ipvsadm
/// cannot express (see [`unsaveable`]) are left out.
pub fn save(resp: &ServicesResponse, numeric: bool, names: &PortNames) -> String {
    let mut out = String::new();
    for s in sorted_services(resp, false) {
        if !expressible(s) {
            continue;
        }
        let svc = format!(
            "{} {}",
            match s.key.protocol {
                Protocol::Tcp => "-t",
                Protocol::Udp => "-u",
            },
            addr_port(s.key.addr, s.key.port, Some(s.key.protocol), numeric, names)
        );
        let _ = write!(out, "-A {svc} -s {}", s.scheduler.name());
        if let Some(p) = s.persistence {
            let _ = write!(out, " -p {}", p.timeout);
            match s.key.addr {
                IpAddr::V4(_) if p.prefix < 32 => {
                    let _ = write!(out, " -M {}", v4_mask(p.prefix));
                }
                IpAddr::V6(_) if p.prefix < 128 => {
                    let _ = write!(out, " -M {}", p.prefix);
                }
                _ => {}
            }
        }
        let flags = sched_flag_names(s.scheduler, s.sched_flags);
        if !flags.is_empty() {
            let _ = write!(out, " -b {flags}");
        }
        out.push('\n');
        for b in sorted_backends(s, false) {
            let dname = addr_port(b.addr, b.port, Some(s.key.protocol), numeric, names);
            let _ = write!(
                out,
                "-a {svc} -r {dname} {} -w {}",
                match b.forwarding {
                    Forwarding::Dr => "-g",
                    Forwarding::Nat => "-m",
                    Forwarding::Tunnel => "-i",
                },
                b.weight
            );
            if b.forwarding == Forwarding::Tunnel {
                let t = b.tunnel.unwrap_or_default();
                let csum = match t.checksum {
                    TunnelChecksum::None => "--tun-nocsum",
                    TunnelChecksum::Csum => "--tun-csum",
                    TunnelChecksum::Remcsum => "--tun-remcsum",
                };
                let _ = match t.kind {
                    TunnelType::Ipip => write!(out, " --tun-type ipip"),
                    TunnelType::Gue => write!(out, " --tun-type gue --tun-port {} {csum}", t.port),
                    TunnelType::Gre => write!(out, " --tun-type gre {csum}"),
                };
            }
            out.push('\n');
        }
    }
    out
}

/// What [`save`] cannot write down, one sentence each (for stderr): services wider than one
/// address and port (xlb's prefix and port-set services have no ipvsadm syntax) and tunnel
/// source addresses (an xlb setting).
pub fn unsaveable(resp: &ServicesResponse) -> Vec<String> {
    let mut v = Vec::new();
    for s in sorted_services(resp, false) {
        if !expressible(s) {
            v.push(format!(
                "service \"{}\" ({}) has no ipvsadm syntax and is not saved",
                s.name,
                service_name(s, true, &PortNames::default()).replacen("  ", " ", 1)
            ));
            continue;
        }
        for b in &s.backends {
            if let Some(src) = b.tunnel.and_then(|t| t.source) {
                v.push(format!(
                    "the tunnel source {src} of real server {} of service \"{}\" has no ipvsadm syntax and is not saved",
                    addr_port(b.addr, b.port, None, true, &PortNames::default()),
                    s.name
                ));
            }
        }
    }
    v
}

/// One address (or the whole address space of a port-0 service) and one port: what ipvsadm
/// can name with `-t`/`-u`.
fn expressible(s: &ServiceView) -> bool {
    s.key.is_host()
        && match s.ports.as_slice() {
            [] => true,
            [r] => *r == PortRange::ALL || (r.first == r.last && r.first == s.key.port),
            _ => false,
        }
}

fn title(out: &mut String, layout: Layout) {
    let _ = match layout {
        Layout::Stats => writeln!(
            out,
            "{:<33} {:>8} {:>8} {:>8} {:>8} {:>8}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Conns", "InPkts", "OutPkts", "InBytes", "OutBytes"
        ),
        Layout::Rate => writeln!(
            out,
            "{:<33} {:>8} {:>8} {:>8} {:>8} {:>8}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "CPS", "InPPS", "OutPPS", "InBPS", "OutBPS"
        ),
        Layout::Thresholds => writeln!(
            out,
            "{:<33} {:<10} {:<10} {:<10} {:<10}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Uthreshold", "Lthreshold", "ActiveConn", "InActConn"
        ),
        Layout::PersistentConn => writeln!(
            out,
            "{:<33} {:<9} {:<11} {:<10} {:<10}\n  -> RemoteAddress:Port",
            "Prot LocalAddress:Port", "Weight", "PersistConn", "ActiveConn", "InActConn"
        ),
        Layout::TunInfo => writeln!(
            out,
            "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn"
        ),
        Layout::Default => writeln!(
            out,
            "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"
        ),
    };
}

fn service_entry(out: &mut String, s: &ServiceView, f: &ListFormat, names: &PortNames) {
    let layout = f.layout();
    let name = service_name(s, f.numeric, names);
    match layout {
        Layout::Stats => {
            let _ = write!(out, "{name:<33}");
            counters(out, &s.stats, f.exact);
        }
        Layout::Rate => {
            let _ = write!(out, "{name:<33}");
            let r = &s.rate;
            for v in [r.cps, r.in_pps, r.out_pps, r.in_bps, r.out_bps] {
                out.push_str(&largenum(v, f.exact));
            }
        }
        _ => {
            let _ = write!(out, "{name} {}", s.scheduler.name());
            let flags = sched_flag_names(s.scheduler, s.sched_flags);
            if !flags.is_empty() {
                let _ = write!(out, " ({flags})");
            }
            if let Some(p) = s.persistence {
                let _ = write!(out, " persistent {}", p.timeout);
                match s.key.addr {
                    IpAddr::V4(_) if p.prefix < 32 => {
                        let _ = write!(out, " mask {}", v4_mask(p.prefix));
                    }
                    IpAddr::V6(_) if p.prefix < 128 => {
                        let _ = write!(out, " mask {}", p.prefix);
                    }
                    _ => {}
                }
            }
        }
    }
    out.push('\n');
    for b in sorted_backends(s, f.nosort) {
        let mut dname = addr_port(b.addr, b.port, Some(s.key.protocol), f.numeric, names);
        if b.addr.is_ipv4() {
            truncate(&mut dname, 28);
        }
        match layout {
            Layout::Stats => {
                let _ = write!(out, "  -> {dname:<28}");
                counters(out, &b.stats, f.exact);
                out.push('\n');
            }
            Layout::Rate => {
                let r: &RateView = &b.rate;
                let _ = write!(
                    out,
                    "  -> {dname:<28} {:>8} {:>8} {:>8}",
                    r.cps, r.in_pps, r.out_pps
                );
                out.push_str(&largenum(r.in_bps, f.exact));
                out.push_str(&largenum(r.out_bps, f.exact));
                out.push('\n');
            }
            Layout::Thresholds => {
                let _ = writeln!(
                    out,
                    "  -> {dname:<28} {:<10} {:<10} {:<10} {:<10}",
                    b.upper_threshold, b.lower_threshold, b.active_conns, b.inactive_conns
                );
            }
            Layout::PersistentConn => {
                let _ = writeln!(
                    out,
                    "  -> {dname:<28} {:<9} {:<11} {:<10} {:<10}",
                    b.weight, b.persist_conns, b.active_conns, b.inactive_conns
                );
            }
            Layout::TunInfo => {
                let _ = writeln!(
                    out,
                    "  -> {dname:<28} {:<7} {:<13} {:<6} {:<10} {:<10}",
                    b.forwarding.label(),
                    tun_info(b),
                    b.weight,
                    b.active_conns,
                    b.inactive_conns
                );
            }
            Layout::Default => {
                let _ = writeln!(
                    out,
                    "  -> {dname:<28} {:<7} {:<6} {:<10} {:<10}",
                    b.forwarding.label(),
                    b.weight,
                    b.active_conns,
                    b.inactive_conns
                );
            }
        }
    }
}

/// `fwd_tun_info()`: `ipip`, `gue:<port>:<flag>`, `gre:<flag>`, or `n/a` for other methods.
fn tun_info(b: &BackendView) -> String {
    if b.forwarding != Forwarding::Tunnel {
        return "n/a".into();
    }
    let t = b.tunnel.unwrap_or_default();
    let flag = match t.checksum {
        TunnelChecksum::None => "-c",
        TunnelChecksum::Csum => "+c",
        TunnelChecksum::Remcsum => "r+c",
    };
    match t.kind {
        TunnelType::Ipip => "ipip".into(),
        TunnelType::Gue => format!("gue:{}:{flag}", t.port),
        TunnelType::Gre => format!("gre:{flag}"),
    }
}

/// `print_sched_flags()`: `sh-fallback,sh-port` / `mh-...` for sh and mh, otherwise the
/// generic `flag-1,flag-2` (fallback and port are IPVS's SCHED1 and SCHED2 bits).
fn sched_flag_names(s: Scheduler, f: SchedFlags) -> String {
    match s {
        Scheduler::Sh | Scheduler::Mh => f.names(s),
        _ => {
            let mut v = Vec::new();
            if f.fallback {
                v.push("flag-1");
            }
            if f.port {
                v.push("flag-2");
            }
            v.join(",")
        }
    }
}

fn v4_mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0))
}

fn counters(out: &mut String, c: &CountersView, exact: bool) {
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

fn truncate(s: &mut String, n: usize) {
    if let Some((i, _)) = s.char_indices().nth(n) {
        s.truncate(i);
    }
}

/// `"%-4s %s"` of protocol and address:port; IPv4 names are cut at 33 characters. Services
/// wider than one address and port (IPVS would need a firewall mark for them) show their
/// prefix and port set instead: `TCP  0.0.0.0/0:80,443`, `TCP  10.0.0.1:8000-8100`.
fn service_name(s: &ServiceView, numeric: bool, names: &PortNames) -> String {
    let proto = s.key.protocol;
    let mut n = if expressible(s) {
        format!(
            "{:<4} {}",
            proto.label(),
            addr_port(s.key.addr, s.key.port, Some(proto), numeric, names)
        )
    } else {
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|r| {
                if *r == PortRange::ALL {
                    "0".to_string()
                } else if r.first == r.last {
                    port_name(r.first, Some(proto), numeric, names)
                } else {
                    r.to_string()
                }
            })
            .collect();
        let ports = if ports.is_empty() {
            port_name(s.key.port, Some(proto), numeric, names)
        } else {
            ports.join(",")
        };
        let addr = match (s.key.is_host(), s.key.addr) {
            (true, IpAddr::V4(a)) => a.to_string(),
            (true, IpAddr::V6(a)) => format!("[{a}]"),
            (false, IpAddr::V4(a)) => format!("{a}/{}", s.key.prefix),
            (false, IpAddr::V6(a)) => format!("[{a}/{}]", s.key.prefix),
        };
        format!("{:<4} {addr}:{ports}", proto.label())
    };
    if s.key.addr.is_ipv4() {
        truncate(&mut n, 33);
    }
    n
}

/// `addrport_to_anyname()`: `a.b.c.d:port`, `[v6]:port`; without `-n` the port by its
/// `/etc/services` name when it has one.
fn addr_port(
    a: IpAddr,
    port: u16,
    proto: Option<Protocol>,
    numeric: bool,
    names: &PortNames,
) -> String {
    let p = port_name(port, proto, numeric, names);
    match a {
        IpAddr::V4(v4) => format!("{v4}:{p}"),
        IpAddr::V6(v6) => format!("[{v6}]:{p}"),
    }
}

fn port_name(port: u16, proto: Option<Protocol>, numeric: bool, names: &PortNames) -> String {
    if !numeric
        && let Some(p) = proto
        && let Some(n) = names.name(port, proto_name(p))
    {
        return n.to_string();
    }
    port.to_string()
}

/// `/etc/services` protocol name.
pub fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `/etc/services`, as `getservbyname()` / `getservbyport()` read it: the first entry for a
/// port and protocol names it; a name or alias finds its port.
#[derive(Clone, Debug, Default)]
pub struct PortNames {
    by_port: HashMap<(String, u16), String>,
    by_name: HashMap<(String, String), u16>,
}

impl PortNames {
    /// Parses `services(5)` text: `name port/protocol [aliases...] [# comment]`.
    pub fn parse(text: &str) -> Self {
        let mut n = PortNames::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let (Some(name), Some(pp)) = (words.next(), words.next()) else {
                continue;
            };
            let Some((port, proto)) = pp.split_once('/') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            n.by_port
                .entry((proto.to_string(), port))
                .or_insert_with(|| name.to_string());
            for alias in std::iter::once(name).chain(words) {
                n.by_name
                    .entry((proto.to_string(), alias.to_string()))
                    .or_insert(port);
            }
        }
        n
    }

    /// This machine's `/etc/services` (empty if there is none), read once.
    pub fn system() -> &'static PortNames {
        static NAMES: OnceLock<PortNames> = OnceLock::new();
        NAMES.get_or_init(|| {
            std::fs::read_to_string("/etc/services")
                .map(|t| PortNames::parse(&t))
                .unwrap_or_default()
        })
    }

    /// The port of service `name` for `proto` (`tcp`, `udp`, `sctp`).
    pub fn port(&self, name: &str, proto: &str) -> Option<u16> {
        self.by_name
            .get(&(proto.to_string(), name.to_string()))
            .copied()
    }

    /// The name of `port` for `proto`.
    pub fn name(&self, port: u16, proto: &str) -> Option<&str> {
        self.by_port
            .get(&(proto.to_string(), port))
            .map(String::as_str)
    }
}

fn sorted_services(resp: &ServicesResponse, nosort: bool) -> Vec<&ServiceView> {
    let mut v: Vec<&ServiceView> = resp.services.iter().collect();
    if !nosort {
        merge_sort(&mut v, &|a, b| cmp_services(a, b));
    }
    v
}

fn sorted_backends(s: &ServiceView, nosort: bool) -> Vec<&BackendView> {
    let mut v: Vec<&BackendView> = s.backends.iter().collect();
    if !nosort {
        merge_sort(&mut v, &|a, b| cmp_dests(a, b));
    }
    v
}

/// An address as libipvs holds it (`union nf_inet_addr`), in host-order 32-bit words.
fn words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(v4) => [u32::from(v4), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| {
                u32::from_be_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }
    }
}

/// ipvsadm compares addresses by subtracting host-order u32s into an `int` (one word for
/// IPv4, up to four for IPv6, by the family of the left operand), so addresses 2^31 or more
/// apart sort "backwards" (10.0.0.1 after 200.0.0.1). Reproduced on purpose.
fn cmp_addr(a: IpAddr, b: IpAddr) -> Ordering {
    let (x, y) = (words(a), words(b));
    let n = if a.is_ipv6() { 4 } else { 1 };
    for i in 0..n {
        let r = x[i].wrapping_sub(y[i]) as i32;
        if r != 0 {
            return r.cmp(&0);
        }
    }
    Ordering::Equal
}

/// `ipvs_cmp_services()`: firewall mark (none in xlb), family, protocol, address, port.
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

/// The view the daemon would give of a configured service (zero counters), for tests.
#[cfg(test)]
pub(crate) fn view_of(cfg: &crate::config::ServiceConfig) -> ServiceView {
    ServiceView {
        name: cfg.name.clone(),
        key: cfg.key,
        scheduler: cfg.scheduler,
        sched_flags: cfg.sched_flags,
        ports: cfg.ports.clone(),
        persistence: cfg.persistence,
        id: 0,
        stats: CountersView::default(),
        rate: RateView::default(),
        backends: cfg
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| BackendView {
                addr: b.addr,
                port: b.port,
                forwarding: b.forwarding,
                weight: b.weight,
                active_conns: 0,
                inactive_conns: 0,
                stats: CountersView::default(),
                mac: None,
                index: i as u32,
                upper_threshold: b.upper_threshold,
                lower_threshold: b.lower_threshold,
                tunnel: b.tunnel,
                persist_conns: 0,
                rate: RateView::default(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Persistence, ServiceKey, Tunnel};

    fn be(addr: &str, port: u16, fwd: Forwarding, w: u32, a: u64, i: u64) -> BackendView {
        BackendView {
            addr: addr.parse().unwrap(),
            port,
            forwarding: fwd,
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

    fn svc(
        proto: Protocol,
        addr: &str,
        port: u16,
        sched: Scheduler,
        backends: Vec<BackendView>,
    ) -> ServiceView {
        ServiceView {
            name: "x".into(),
            key: ServiceKey::new(addr.parse().unwrap(), port, proto),
            scheduler: sched,
            sched_flags: Default::default(),
            ports: vec![if port == 0 {
                PortRange::ALL
            } else {
                PortRange::one(port)
            }],
            persistence: None,
            id: 0,
            stats: CountersView::default(),
            rate: Default::default(),
            backends,
        }
    }

    fn counters(conns: u64, in_packets: u64, in_bytes: u64) -> CountersView {
        CountersView {
            conns,
            in_packets,
            in_bytes,
            ..Default::default()
        }
    }

    fn rate(cps: u64, in_pps: u64, in_bps: u64) -> RateView {
        RateView {
            cps,
            in_pps,
            in_bps,
            ..Default::default()
        }
    }

    /// ipvs.md §7.3's example configuration as xlb can hold it: without the firewall-mark
    /// service (xlb serves no marks) and without `-o` on the DNS service (no one-packet
    /// scheduling), in the daemon's (unsorted) order, with the figures of the examples.
    fn example() -> ServicesResponse {
        let mut rs10 = be("192.168.1.10", 80, Forwarding::Dr, 2, 5, 40);
        rs10.upper_threshold = 1000;
        rs10.lower_threshold = 800;
        rs10.stats = counters(617567, 4938543, 356345678);
        rs10.rate = rate(6, 170, 20480);
        let mut rs11 = be("192.168.1.11", 80, Forwarding::Dr, 1, 3, 17);
        rs11.stats = counters(617000, 4938000, 356000000);
        rs11.rate = rate(6, 170, 20480);
        let mut http = svc(
            Protocol::Tcp,
            "10.0.0.1",
            80,
            Scheduler::Wlc,
            vec![rs11, rs10],
        );
        http.stats = counters(1234567, 9876543, 712345678);
        http.rate = rate(12, 340, 40960);

        let mut rs = be("192.168.1.10", 8443, Forwarding::Nat, 1, 0, 0);
        rs.persist_conns = 2;
        let mut https = svc(Protocol::Tcp, "10.0.0.1", 443, Scheduler::Sh, vec![rs]);
        https.sched_flags = SchedFlags {
            fallback: true,
            port: true,
        };
        https.persistence = Some(Persistence {
            timeout: 360,
            prefix: 24,
        });

        let dns = svc(
            Protocol::Udp,
            "10.0.0.1",
            53,
            Scheduler::Rr,
            vec![be("192.168.1.10", 53, Forwarding::Nat, 1, 0, 4)],
        );
        let v6 = svc(
            Protocol::Tcp,
            "2001:db8::1",
            80,
            Scheduler::Rr,
            vec![be("2001:db8::10", 80, Forwarding::Dr, 1, 1, 0)],
        );
        ServicesResponse {
            conn_table_size: 4096,
            services: vec![v6, dns, https, http],
        }
    }

    /// The firewall-mark service of the example, as a TCP service (xlb serves no marks):
    /// `-A -t 10.0.0.2:80 -s wrr -p 300`, a gue and a gre tunnel server.
    fn tunnels() -> ServicesResponse {
        let mut gue = be("172.16.0.5", 80, Forwarding::Tunnel, 3, 0, 0);
        gue.tunnel = Some(Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            checksum: TunnelChecksum::None,
            source: None,
        });
        let mut gre = be("172.16.0.6", 80, Forwarding::Tunnel, 1, 0, 0);
        gre.tunnel = Some(Tunnel {
            kind: TunnelType::Gre,
            port: 0,
            checksum: TunnelChecksum::Csum,
            source: None,
        });
        let mut ipip = be("2001:db8::20", 80, Forwarding::Tunnel, 1, 0, 0);
        ipip.tunnel = Some(Tunnel::default());
        let mut s = svc(
            Protocol::Tcp,
            "10.0.0.2",
            80,
            Scheduler::Wrr,
            vec![ipip, gre, gue],
        );
        s.persistence = Some(Persistence {
            timeout: 300,
            prefix: 32,
        });
        ServicesResponse {
            conn_table_size: 4096,
            services: vec![s],
        }
    }

    fn fmt() -> ListFormat {
        ListFormat {
            numeric: true,
            ..Default::default()
        }
    }

    #[test]
    fn list_n_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
            "TCP  10.0.0.1:80 wlc\n",
            "  -> 192.168.1.10:80              Route   2      5          40        \n",
            "  -> 192.168.1.11:80              Route   1      3          17        \n",
            "TCP  10.0.0.1:443 sh (sh-fallback,sh-port) persistent 360 mask 255.255.255.0\n",
            "  -> 192.168.1.10:8443            Masq    1      0          0         \n",
            "UDP  10.0.0.1:53 rr\n",
            "  -> 192.168.1.10:53              Masq    1      0          4         \n",
            "TCP  [2001:db8::1]:80 rr\n",
            "  -> [2001:db8::10]:80            Route   1      1          0         \n",
        );
        let resp = example();
        assert_eq!(list_all(&resp, &fmt(), &PortNames::default()), want);
        // `xlb list` prints the same.
        assert_eq!(list(&resp, ListOptions::default()), want);
    }

    #[test]
    fn single_service_matches_example() {
        let want = concat!(
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
            "TCP  10.0.0.1:80 wlc\n",
            "  -> 192.168.1.10:80              Route   2      5          40        \n",
            "  -> 192.168.1.11:80              Route   1      3          17        \n",
        );
        let resp = example();
        let key = ServiceKey::new("10.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        let s = find_service(&resp, &key).unwrap();
        assert_eq!(list_service(s, &fmt(), &PortNames::default()), want);
        let missing = ServiceKey::new("10.0.0.1".parse().unwrap(), 81, Protocol::Tcp);
        assert!(find_service(&resp, &missing).is_none());
    }

    #[test]
    fn stats_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes\n",
            "  -> RemoteAddress:Port\n",
            "TCP  10.0.0.1:80                   1234567  9876543        0  712345K        0\n",
            "  -> 192.168.1.10:80                617567  4938543        0  356345K        0\n",
            "  -> 192.168.1.11:80                617000  4938000        0  356000K        0\n",
            "TCP  10.0.0.1:443                        0        0        0        0        0\n",
            "  -> 192.168.1.10:8443                   0        0        0        0        0\n",
            "UDP  10.0.0.1:53                         0        0        0        0        0\n",
            "  -> 192.168.1.10:53                     0        0        0        0        0\n",
            "TCP  [2001:db8::1]:80                    0        0        0        0        0\n",
            "  -> [2001:db8::10]:80                   0        0        0        0        0\n",
        );
        let f = ListFormat {
            stats: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
        // --stats wins over the other layouts, as in print_title().
        let f = ListFormat {
            stats: true,
            rate: true,
            thresholds: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
    }

    #[test]
    fn rate_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port                 CPS    InPPS   OutPPS    InBPS   OutBPS\n",
            "  -> RemoteAddress:Port\n",
            "TCP  10.0.0.1:80                        12      340        0    40960        0\n",
            "  -> 192.168.1.10:80                     6      170        0    20480        0\n",
            "  -> 192.168.1.11:80                     6      170        0    20480        0\n",
            "TCP  10.0.0.1:443                        0        0        0        0        0\n",
            "  -> 192.168.1.10:8443                   0        0        0        0        0\n",
            "UDP  10.0.0.1:53                         0        0        0        0        0\n",
            "  -> 192.168.1.10:53                     0        0        0        0        0\n",
            "TCP  [2001:db8::1]:80                    0        0        0        0        0\n",
            "  -> [2001:db8::10]:80                   0        0        0        0        0\n",
        );
        let f = ListFormat {
            rate: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
    }

    /// Servers' CPS and PPS are printed raw (`%8llu`), their BPS through print_largenum.
    #[test]
    fn rate_of_servers_is_raw_for_cps_and_pps() {
        let mut resp = example();
        let http = resp
            .services
            .iter_mut()
            .find(|s| s.key.port == 80 && s.key.addr.is_ipv4())
            .unwrap();
        http.backends[0].rate = RateView {
            cps: 123456789,
            in_pps: 0,
            out_pps: 0,
            in_bps: 123456789,
            out_bps: 0,
        };
        let f = ListFormat {
            rate: true,
            ..fmt()
        };
        let out = list_all(&resp, &f, &PortNames::default());
        assert!(
            out.contains(
                "\n  -> 192.168.1.11:80              123456789        0        0  123456K        0\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn thresholds_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port            Uthreshold Lthreshold ActiveConn InActConn \n",
            "  -> RemoteAddress:Port\n",
            "TCP  10.0.0.1:80 wlc\n",
            "  -> 192.168.1.10:80              1000       800        5          40        \n",
            "  -> 192.168.1.11:80              0          0          3          17        \n",
            "TCP  10.0.0.1:443 sh (sh-fallback,sh-port) persistent 360 mask 255.255.255.0\n",
            "  -> 192.168.1.10:8443            0          0          0          0         \n",
            "UDP  10.0.0.1:53 rr\n",
            "  -> 192.168.1.10:53              0          0          0          4         \n",
            "TCP  [2001:db8::1]:80 rr\n",
            "  -> [2001:db8::10]:80            0          0          1          0         \n",
        );
        let f = ListFormat {
            thresholds: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
    }

    #[test]
    fn persistent_conn_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port            Weight    PersistConn ActiveConn InActConn \n",
            "  -> RemoteAddress:Port\n",
            "TCP  10.0.0.1:80 wlc\n",
            "  -> 192.168.1.10:80              2         0           5          40        \n",
            "  -> 192.168.1.11:80              1         0           3          17        \n",
            "TCP  10.0.0.1:443 sh (sh-fallback,sh-port) persistent 360 mask 255.255.255.0\n",
            "  -> 192.168.1.10:8443            1         2           0          0         \n",
            "UDP  10.0.0.1:53 rr\n",
            "  -> 192.168.1.10:53              1         0           0          4         \n",
            "TCP  [2001:db8::1]:80 rr\n",
            "  -> [2001:db8::10]:80            1         0           1          0         \n",
        );
        let f = ListFormat {
            persistent_conn: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
    }

    #[test]
    fn tun_info_matches_example() {
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn\n",
            "TCP  10.0.0.1:80 wlc\n",
            "  -> 192.168.1.10:80              Route   n/a           2      5          40        \n",
            "  -> 192.168.1.11:80              Route   n/a           1      3          17        \n",
            "TCP  10.0.0.1:443 sh (sh-fallback,sh-port) persistent 360 mask 255.255.255.0\n",
            "  -> 192.168.1.10:8443            Masq    n/a           1      0          0         \n",
            "UDP  10.0.0.1:53 rr\n",
            "  -> 192.168.1.10:53              Masq    n/a           1      0          4         \n",
            "TCP  [2001:db8::1]:80 rr\n",
            "  -> [2001:db8::10]:80            Route   n/a           1      1          0         \n",
        );
        let f = ListFormat {
            tun_info: true,
            ..fmt()
        };
        assert_eq!(list_all(&example(), &f, &PortNames::default()), want);
    }

    /// The example's tunnel servers (gue with port and no checksum, gre with checksum) on a
    /// TCP service, plus an IPv6 ipip server: the `--tun-info`, default and `-S` forms.
    #[test]
    fn tunnel_servers_match_example() {
        let resp = tunnels();
        let f = ListFormat {
            tun_info: true,
            ..fmt()
        };
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn\n",
            "TCP  10.0.0.2:80 wrr persistent 300\n",
            "  -> 172.16.0.5:80                Tunnel  gue:6080:-c   3      0          0         \n",
            "  -> 172.16.0.6:80                Tunnel  gre:+c        1      0          0         \n",
            "  -> [2001:db8::20]:80            Tunnel  ipip          1      0          0         \n",
        );
        assert_eq!(list_all(&resp, &f, &PortNames::default()), want);
        let want = concat!(
            "IP Virtual Server version 1.2.1 (size=4096)\n",
            "Prot LocalAddress:Port Scheduler Flags\n",
            "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
            "TCP  10.0.0.2:80 wrr persistent 300\n",
            "  -> 172.16.0.5:80                Tunnel  3      0          0         \n",
            "  -> 172.16.0.6:80                Tunnel  1      0          0         \n",
            "  -> [2001:db8::20]:80            Tunnel  1      0          0         \n",
        );
        assert_eq!(list_all(&resp, &fmt(), &PortNames::default()), want);
        let want = concat!(
            "-A -t 10.0.0.2:80 -s wrr -p 300\n",
            "-a -t 10.0.0.2:80 -r 172.16.0.5:80 -i -w 3 --tun-type gue --tun-port 6080 --tun-nocsum\n",
            "-a -t 10.0.0.2:80 -r 172.16.0.6:80 -i -w 1 --tun-type gre --tun-csum\n",
            "-a -t 10.0.0.2:80 -r [2001:db8::20]:80 -i -w 1 --tun-type ipip\n",
        );
        assert_eq!(save(&resp, true, &PortNames::default()), want);
    }

    #[test]
    fn save_matches_example() {
        // The example minus `-o` on the DNS service and minus the firewall-mark service;
        // thresholds (-x/-y of 192.168.1.10) are not saved, as by ipvsadm.
        let want = concat!(
            "-A -t 10.0.0.1:80 -s wlc\n",
            "-a -t 10.0.0.1:80 -r 192.168.1.10:80 -g -w 2\n",
            "-a -t 10.0.0.1:80 -r 192.168.1.11:80 -g -w 1\n",
            "-A -t 10.0.0.1:443 -s sh -p 360 -M 255.255.255.0 -b sh-fallback,sh-port\n",
            "-a -t 10.0.0.1:443 -r 192.168.1.10:8443 -m -w 1\n",
            "-A -u 10.0.0.1:53 -s rr\n",
            "-a -u 10.0.0.1:53 -r 192.168.1.10:53 -m -w 1\n",
            "-A -t [2001:db8::1]:80 -s rr\n",
            "-a -t [2001:db8::1]:80 -r [2001:db8::10]:80 -g -w 1\n",
        );
        assert_eq!(save(&example(), true, &PortNames::default()), want);
        assert!(unsaveable(&example()).is_empty());
    }

    #[test]
    fn connections_match_example() {
        let c =
            |proto: &str, secs: u32, state: &str, client: &str, vip: &str, dest: &str| ConnView {
                protocol: proto.into(),
                expire_secs: secs,
                state: state.into(),
                client: client.parse().unwrap(),
                vip: vip.parse().unwrap(),
                dest: dest.parse().unwrap(),
            };
        let conns = vec![
            c(
                "TCP",
                899,
                "ESTABLISHED",
                "203.0.113.7:51514",
                "10.0.0.1:80",
                "192.168.1.10:80",
            ),
            c(
                "TCP",
                58,
                "SYN_RECV",
                "198.51.100.23:40022",
                "10.0.0.1:80",
                "192.168.1.11:80",
            ),
            c(
                "TCP",
                119,
                "FIN_WAIT",
                "203.0.113.9:33000",
                "10.0.0.1:80",
                "192.168.1.10:80",
            ),
            c(
                "TCP",
                357,
                "ASSURED",
                "203.0.113.0:0",
                "10.0.0.1:443",
                "192.168.1.10:8443",
            ),
            c(
                "TCP",
                895,
                "ESTABLISHED",
                "203.0.113.7:40100",
                "10.0.0.1:443",
                "192.168.1.10:8443",
            ),
            c(
                "UDP",
                299,
                "UDP",
                "203.0.113.7:5353",
                "10.0.0.1:53",
                "192.168.1.10:53",
            ),
        ];
        let want = concat!(
            "IPVS connection entries\n",
            "pro expire state       source             virtual            destination\n",
            "TCP 14:59  ESTABLISHED 203.0.113.7:51514  10.0.0.1:80        192.168.1.10:80\n",
            "TCP 00:58  SYN_RECV    198.51.100.23:40022 10.0.0.1:80        192.168.1.11:80\n",
            "TCP 01:59  FIN_WAIT    203.0.113.9:33000  10.0.0.1:80        192.168.1.10:80\n",
            "TCP 05:57  ASSURED     203.0.113.0:0      10.0.0.1:443       192.168.1.10:8443\n",
            "TCP 14:55  ESTABLISHED 203.0.113.7:40100  10.0.0.1:443       192.168.1.10:8443\n",
            "UDP 04:59  UDP         203.0.113.7:5353   10.0.0.1:53        192.168.1.10:53\n",
        );
        assert_eq!(
            list_connections(&conns, &fmt(), &PortNames::default()),
            want
        );
        let f = ListFormat {
            persistent_conn: true,
            ..fmt()
        };
        let got = list_connections(&conns[..1], &f, &PortNames::default());
        assert_eq!(
            got,
            concat!(
                "IPVS connection entries\n",
                "pro expire state       source             virtual            destination        pe name          pe_data\n",
                "TCP 14:59  ESTABLISHED 203.0.113.7:51514  10.0.0.1:80        192.168.1.10:80\n",
            )
        );
        // Minutes are not capped at 99.
        let long = c(
            "TCP",
            6000 * 60 + 5,
            "NONE",
            "1.2.3.4:0",
            "10.0.0.1:80",
            "1.1.1.1:80",
        );
        assert!(
            list_connections(&[long], &fmt(), &PortNames::default()).contains("TCP 6000:05 NONE")
        );
    }

    #[test]
    fn timeout_matches_example() {
        assert_eq!(
            list_timeout(&Timeouts::default()),
            "Timeout (tcp tcpfin udp): 900 120 300\n"
        );
    }

    #[test]
    fn largenum_scales() {
        assert_eq!(largenum(99_999_999, false), " 99999999");
        assert_eq!(largenum(100_000_000, false), "  100000K");
        assert_eq!(largenum(1_500_000_000, false), "    1500M");
        assert_eq!(largenum(250_000_000_000, false), "     250G");
        assert_eq!(largenum(123_456_789_012_345, false), "     123T");
        assert_eq!(largenum(712345678, true), " 712345678");
        assert_eq!(largenum(5, true), "        5");
        let f = ListFormat {
            stats: true,
            exact: true,
            ..fmt()
        };
        assert!(list_all(&example(), &f, &PortNames::default()).contains(
            "\nTCP  10.0.0.1:80                   1234567  9876543        0 712345678        0\n"
        ));
    }

    /// Without -n, ports go by their /etc/services names (addresses stay numeric).
    #[test]
    fn names_without_numeric() {
        let names = PortNames::parse(
            "# comment\nhttp\t\t80/tcp\t\twww # WorldWideWeb HTTP\ndomain\t\t53/tcp\ndomain\t\t53/udp\nhttps 443/tcp\nhttp 80/udp\n",
        );
        assert_eq!(names.port("www", "tcp"), Some(80));
        assert_eq!(names.port("http", "udp"), Some(80));
        assert_eq!(names.port("domain", "sctp"), None);
        assert_eq!(names.name(53, "udp"), Some("domain"));
        let f = ListFormat::default();
        let out = list_all(&example(), &f, &names);
        assert!(
            out.contains("\nTCP  10.0.0.1:http wlc\n  -> 192.168.1.10:http"),
            "{out}"
        );
        assert!(out.contains("\nUDP  10.0.0.1:domain rr\n"), "{out}");
        assert!(out.contains("\n  -> 192.168.1.10:8443 "), "{out}");
        assert!(save(&example(), false, &names).starts_with("-A -t 10.0.0.1:http -s wlc\n"));
    }

    #[test]
    fn persistence_and_wide_services_are_listed() {
        let mut a = svc(Protocol::Tcp, "10.0.0.1", 443, Scheduler::Sh, vec![]);
        a.persistence = Some(Persistence {
            timeout: 360,
            prefix: 24,
        });
        let mut b = svc(Protocol::Tcp, "10.0.0.2", 80, Scheduler::Wrr, vec![]);
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
        let mut c = svc(Protocol::Tcp, "0.0.0.0", 80, Scheduler::Dh, vec![]);
        c.key.prefix = 0;
        let mut d = svc(Protocol::Tcp, "2001:db8::1", 0, Scheduler::Rr, vec![]);
        d.persistence = Some(Persistence {
            timeout: 60,
            prefix: 64,
        });
        let resp = ServicesResponse {
            conn_table_size: 4096,
            services: vec![a, b, c, d],
        };
        let got = list_all(&resp, &fmt(), &PortNames::default());
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
        // -S keeps what ipvsadm can express and says what it leaves out.
        assert_eq!(
            save(&resp, true, &PortNames::default()),
            concat!(
                "-A -t 10.0.0.1:443 -s sh -p 360 -M 255.255.255.0\n",
                "-A -t [2001:db8::1]:0 -s rr -p 60 -M 64\n",
            )
        );
        let skipped = unsaveable(&resp);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("(TCP 0.0.0.0/0:80)"), "{skipped:?}");
    }

    /// Flags of schedulers other than sh and mh go by IPVS's generic names.
    #[test]
    fn generic_scheduler_flags() {
        let mut s = svc(Protocol::Tcp, "10.0.0.1", 80, Scheduler::Rr, vec![]);
        s.sched_flags.fallback = true;
        let resp = ServicesResponse {
            conn_table_size: 1,
            services: vec![s],
        };
        assert!(
            list_all(&resp, &fmt(), &PortNames::default())
                .contains("\nTCP  10.0.0.1:80 rr (flag-1)\n")
        );
        assert_eq!(
            save(&resp, true, &PortNames::default()),
            "-A -t 10.0.0.1:80 -s rr -b flag-1\n"
        );
    }

    /// ipvsadm's signed-subtraction sort: 10.0.0.1 sorts after 200.0.0.1 (also within the
    /// 32-bit words of IPv6 addresses); --nosort keeps the daemon's order.
    #[test]
    fn address_sort_quirk() {
        let resp = ServicesResponse {
            conn_table_size: 1,
            services: vec![
                svc(Protocol::Tcp, "10.0.0.1", 80, Scheduler::Rr, vec![]),
                svc(Protocol::Tcp, "200.0.0.1", 80, Scheduler::Rr, vec![]),
                svc(Protocol::Tcp, "2001:db8::1", 80, Scheduler::Rr, vec![]),
                svc(Protocol::Tcp, "b001:db8::1", 80, Scheduler::Rr, vec![]),
                svc(Protocol::Udp, "10.0.0.1", 80, Scheduler::Rr, vec![]),
            ],
        };
        let out = list_all(&resp, &fmt(), &PortNames::default());
        let order: Vec<&str> = out
            .lines()
            .skip(3)
            .map(|l| l.split(' ').nth(2).unwrap())
            .collect();
        assert_eq!(
            order,
            vec![
                "200.0.0.1:80",
                "10.0.0.1:80",
                "10.0.0.1:80",
                "[b001:db8::1]:80",
                "[2001:db8::1]:80"
            ]
        );
        let f = ListFormat {
            nosort: true,
            ..fmt()
        };
        let out = list_all(&resp, &f, &PortNames::default());
        assert!(out.lines().nth(3).unwrap().starts_with("TCP  10.0.0.1:80"));
    }
}
