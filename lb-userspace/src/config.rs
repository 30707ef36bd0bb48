//! The TOML configuration: parsing, validation with file:line:column errors, and the validated
//! model the rest of the controller works with.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

fn default_true() -> bool {
    true
}

fn default_mh_size() -> u32 {
    lb_common::hash::MH_DEFAULT_SIZE
}

/// Default Unix socket of the admin API.
pub const DEFAULT_SOCKET: &str = "/run/xlb/xlb.sock";

/// Default address of `/metrics` (loopback: exposing it is a deliberate choice).
pub const DEFAULT_METRICS: &str = "127.0.0.1:9469";

/// The bpffs directory instances pin their maps under by default: each in a subdirectory
/// named after its socket (see [`default_pin_dir`]).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/xlb";

/// The default pin directory of the instance serving `socket`: instances are told apart by
/// their sockets, so their pins are too.
pub fn default_pin_dir(socket: &Path) -> PathBuf {
    let name: String = socket
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        // bpffs refuses names with a dot.
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new(DEFAULT_PIN_ROOT).join(name)
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// L4 protocol of a virtual service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
    /// As ipvsadm prints it.
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// IPVS schedulers. All names are recognised so that a known-but-unsupported scheduler gets a
/// precise error rather than "unknown".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Rr,
    Wrr,
    Lc,
    Wlc,
    Sed,
    Nq,
    Sh,
    Dh,
    Mh,
    Lblc,
    Lblcr,
    Fo,
    Ovf,
    Twos,
}

impl Scheduler {
    pub const ALL: [Scheduler; 14] = [
        Scheduler::Rr,
        Scheduler::Wrr,
        Scheduler::Lc,
        Scheduler::Wlc,
        Scheduler::Sed,
        Scheduler::Nq,
        Scheduler::Sh,
        Scheduler::Dh,
        Scheduler::Mh,
        Scheduler::Lblc,
        Scheduler::Lblcr,
        Scheduler::Fo,
        Scheduler::Ovf,
        Scheduler::Twos,
    ];
    /// ipvsadm's (and keepalived's `lb_algo`) name.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Mh => "mh",
            Scheduler::Lblc => "lblc",
            Scheduler::Lblcr => "lblcr",
            Scheduler::Fo => "fo",
            Scheduler::Ovf => "ovf",
            Scheduler::Twos => "twos",
        }
    }
    /// Whether the data plane implements it (all of IPVS's do).
    pub fn supported(self) -> bool {
        true
    }
    /// The data plane's code for it.
    pub fn code(self) -> u8 {
        use lb_common::sched as s;
        match self {
            Scheduler::Wrr => s::WRR,
            Scheduler::Sh => s::SH,
            Scheduler::Dh => s::DH,
            Scheduler::Mh => s::MH,
            Scheduler::Lc => s::LC,
            Scheduler::Wlc => s::WLC,
            Scheduler::Sed => s::SED,
            Scheduler::Nq => s::NQ,
            Scheduler::Fo => s::FO,
            Scheduler::Ovf => s::OVF,
            Scheduler::Twos => s::TWOS,
            Scheduler::Lblc => s::LBLC,
            Scheduler::Lblcr => s::LBLCR,
            _ => s::RR,
        }
    }
    /// Whether new flows go to the best server by connection counts (the slot table is
    /// the list of servers, scanned per new flow).
    pub fn scans(self) -> bool {
        matches!(
            self,
            Scheduler::Lc
                | Scheduler::Wlc
                | Scheduler::Sed
                | Scheduler::Nq
                | Scheduler::Fo
                | Scheduler::Ovf
                | Scheduler::Twos
                | Scheduler::Lblc
                | Scheduler::Lblcr
        )
    }
}

impl FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scheduler::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("unknown scheduler \"{s}\""))
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Forwarding method (IPVS -g / -m / -i).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    Dr,
    Nat,
    Tunnel,
}

impl Forwarding {
    pub fn code(self) -> u8 {
        match self {
            Forwarding::Dr => lb_common::forward::DR,
            Forwarding::Nat => lb_common::forward::NAT,
            Forwarding::Tunnel => lb_common::forward::TUNNEL,
        }
    }
    /// ipvsadm's "Forward" column.
    pub fn label(self) -> &'static str {
        match self {
            Forwarding::Dr => "Route",
            Forwarding::Nat => "Masq",
            Forwarding::Tunnel => "Tunnel",
        }
    }
}

/// Tunnel type (IPVS `--tun-type`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    #[default]
    Ipip,
    Gue,
    Gre,
}

impl TunnelType {
    pub fn code(self) -> u8 {
        match self {
            TunnelType::Ipip => lb_common::tunnel::IPIP,
            TunnelType::Gue => lb_common::tunnel::GUE,
            TunnelType::Gre => lb_common::tunnel::GRE,
        }
    }
    /// ipvsadm's rule for which checksum options go with which tunnel type.
    pub fn allows(self, c: TunnelChecksum) -> bool {
        match self {
            TunnelType::Ipip => c == TunnelChecksum::None,
            TunnelType::Gue => true,
            TunnelType::Gre => c != TunnelChecksum::Remcsum,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TunnelType::Ipip => "ipip",
            TunnelType::Gue => "gue",
            TunnelType::Gre => "gre",
        }
    }
}

/// Tunnel checksum option (IPVS `--tun-nocsum` / `--tun-csum` / `--tun-remcsum`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelChecksum {
    #[default]
    None,
    Csum,
    Remcsum,
}

/// How a tunnel real server is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tunnel {
    pub kind: TunnelType,
    /// GUE destination port (required for gue, refused otherwise).
    pub port: u16,
    pub checksum: TunnelChecksum,
    /// Outer source address; `None` = the one the routing table picks for the real server.
    pub source: Option<IpAddr>,
}

impl Tunnel {
    pub fn flags(&self) -> u8 {
        match self.checksum {
            TunnelChecksum::None => 0,
            TunnelChecksum::Csum => lb_common::tunnel::F_CSUM,
            TunnelChecksum::Remcsum => lb_common::tunnel::F_REMCSUM,
        }
    }
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native if the driver supports it, else generic.
    #[default]
    Auto,
    Native,
    Generic,
}

/// Identity of a virtual service: (address or destination prefix, port, protocol). A
/// service covering several ports is named by its first one (0: all ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Destination prefix length: 32 (IPv4) or 128 (IPv6) for one address.
    #[serde(default = "full_prefix_marker")]
    pub prefix: u8,
}

/// Serde default for `ServiceKey::prefix` in messages that predate it: "one address" is
/// recognised by [`ServiceKey::is_host`] for either family.
fn full_prefix_marker() -> u8 {
    128
}

impl ServiceKey {
    /// One address and port.
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        ServiceKey {
            addr,
            port,
            protocol,
            prefix: host_bits(addr),
        }
    }

    /// The key names one address (not a wider prefix).
    pub fn is_host(&self) -> bool {
        self.prefix >= host_bits(self.addr)
    }
}

/// Prefix length of one address of `a`'s family.
pub fn host_bits(a: IpAddr) -> u8 {
    if a.is_ipv4() { 32 } else { 128 }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(
                f,
                "{} {}",
                self.protocol.label(),
                SocketAddr::new(self.addr, self.port)
            )
        } else {
            write!(
                f,
                "{} {}/{} port {}",
                self.protocol.label(),
                self.addr,
                self.prefix,
                self.port
            )
        }
    }
}

/// An inclusive range of destination ports; `0..=65535` is "all ports" (IPVS port 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };
    pub fn one(p: u16) -> Self {
        PortRange { first: p, last: p }
    }
    /// Ports in the range (never empty: `first <= last`).
    pub fn port_count(self) -> u32 {
        self.last as u32 - self.first as u32 + 1
    }
    pub fn overlaps(self, o: PortRange) -> bool {
        self.first <= o.last && o.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == PortRange::ALL {
            write!(f, "all ports")
        } else if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Persistence (ipvsadm `-p` / `-M`, keepalived `persistence_timeout` /
/// `persistence_granularity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persistence {
    /// Seconds a client network's template lives after its last new connection.
    pub timeout: u32,
    /// Client address prefix length that forms a network (IPv4 netmask as a length).
    pub prefix: u8,
}

/// ipvsadm's timeout for `-p` without a value (`IPVS_SVC_PERSISTENT_TIMEOUT`).
pub const DEFAULT_PERSISTENCE_TIMEOUT: u32 = 360;
/// The longest persistence timeout IPVS accepts (31 days).
pub const MAX_PERSISTENCE_TIMEOUT: u32 = 2_678_400;
/// A prefix service's port ranges become one entry per port, at most this many.
pub const MAX_PREFIX_PORTS: u32 = 1024;

/// Scheduler flags (ipvsadm `-b`): `sh-fallback`/`mh-fallback`, `sh-port`/`mh-port`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedFlags {
    /// Look for another server when the hashed one cannot take the flow.
    pub fallback: bool,
    /// Hash the client's port too.
    pub port: bool,
}

impl SchedFlags {
    pub fn bits(self) -> u8 {
        (if self.fallback {
            lb_common::sched::F_FALLBACK
        } else {
            0
        }) | (if self.port {
            lb_common::sched::F_PORT
        } else {
            0
        })
    }

    /// As ipvsadm lists them, e.g. `sh-fallback,sh-port`; empty without flags.
    pub fn names(self, s: Scheduler) -> String {
        let mut v = Vec::new();
        if self.fallback {
            v.push(format!("{s}-fallback"));
        }
        if self.port {
            v.push(format!("{s}-port"));
        }
        v.join(",")
    }
}

/// A validated virtual service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    pub key: ServiceKey,
    /// The destination ports the service covers, sorted and disjoint (one entry for a
    /// plain `address:port`; [`PortRange::ALL`] for port 0).
    #[serde(default)]
    pub ports: Vec<PortRange>,
    #[serde(default)]
    pub persistence: Option<Persistence>,
    pub scheduler: Scheduler,
    /// `sh`/`mh` flags.
    #[serde(default)]
    pub sched_flags: SchedFlags,
    /// Slots of the mh table (a prime of IPVS's list; default 4093).
    #[serde(default = "default_mh_size")]
    pub mh_table_size: u32,
    /// Record connections (default). sh, dh and mh may do without: every packet is hashed
    /// to its server and no connection-table insert is paid for new flows.
    #[serde(default = "default_true")]
    pub conntrack: bool,
    pub forwarding: Forwarding,
    /// In the order they were added (configuration order).
    pub backends: Vec<BackendConfig>,
    /// Sorry server and quorum (health checking).
    #[serde(default)]
    pub health: crate::health::config::ServiceHealth,
}

/// A validated real server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    pub forwarding: Forwarding,
    /// Tunnel settings of a tunnel real server.
    #[serde(default)]
    pub tunnel: Option<Tunnel>,
    /// Connection thresholds (ipvsadm `-x` / `-y`, keepalived `uthreshold` / `lthreshold`):
    /// at `upper_threshold` connections the server takes no new ones until it is below
    /// `lower_threshold` (default 3/4 of the upper). 0 = no limit.
    #[serde(default)]
    pub upper_threshold: u32,
    #[serde(default)]
    pub lower_threshold: u32,
    /// Checks, inhibit_on_failure, notify programs.
    #[serde(default)]
    pub health: crate::health::config::BackendHealth,
}

/// IPVS idle timeouts (`ipvsadm --set tcp tcpfin udp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    pub tcp: u32,
    pub tcp_fin: u32,
    pub udp: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300,
        }
    }
}

/// A value with the place it came from, for errors found after parsing (e.g. a missing
/// interface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl<T> Located<T> {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// Data-plane settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    pub interfaces: Vec<Located<String>>,
    pub xdp_mode: XdpModeSetting,
    pub limits: Limits,
    /// IPVS `expire_nodest_conn`: a packet of a connection whose real server was removed
    /// ends that connection and is scheduled afresh if it may open one (default: dropped
    /// until the connection expires, as IPVS).
    pub expire_nodest_conn: bool,
}

/// Capacities of the BPF maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub conn_table_size: u32,
    pub conn_table_size_v6: u32,
    pub max_services: u32,
    pub max_backends: u32,
    pub slot_table_size: u32,
    /// Persistence templates per address family.
    #[serde(default = "default_templates")]
    pub persistence_table_size: u32,
    /// lblc/lblcr destination-cache entries per address family.
    #[serde(default = "default_locality")]
    pub locality_table_size: u32,
    /// NAT's reply tables (one entry per connection, sized like the connection tables);
    /// `false` leaves them out to save their memory, and NAT real servers are refused.
    #[serde(default = "default_true")]
    pub nat_tables: bool,
}

fn default_locality() -> u32 {
    lb_common::defaults::LOCALITY
}

fn default_templates() -> u32 {
    lb_common::defaults::TEMPLATES
}

impl Default for Limits {
    fn default() -> Self {
        use lb_common::defaults as d;
        Limits {
            conn_table_size: d::CONN_TABLE_SIZE,
            conn_table_size_v6: d::CONN_TABLE_SIZE / 4,
            max_services: d::MAX_SERVICES,
            max_backends: d::MAX_BACKENDS,
            slot_table_size: d::SLOT_TABLE_SIZE,
            persistence_table_size: d::TEMPLATES,
            locality_table_size: d::LOCALITY,
            nat_tables: true,
        }
    }
}

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub dataplane: DataplaneConfig,
    pub socket: PathBuf,
    /// Where `/metrics` is served (`None`: not served).
    pub metrics: Option<SocketAddr>,
    /// Health-check programs and notify programs run as this user unless they name one
    /// (keepalived `script_user`); `None`: as the daemon (root).
    pub script_user: Option<String>,
    /// keepalived's `enable_script_security`: programs that would run as root must not be
    /// changeable by anyone else.
    pub script_security: bool,
    /// bpffs directory of this instance's pinned maps and link (restarts reuse them);
    /// `None`: [`default_pin_dir`] of the socket in use.
    pub pin_dir: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub services: Vec<ServiceConfig>,
    /// VRRP instances, their scripts and sync groups, connection sync.
    pub ha: crate::vrrp::config::Ha,
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    dataplane: FileDataplane,
    #[serde(default)]
    control: FileControl,
    #[serde(default)]
    timeouts: Option<Spanned<FileTimeouts>>,
    #[serde(default)]
    services: Vec<FileService>,
    #[serde(default)]
    vrrp_script: Vec<Spanned<crate::vrrp::config::FileScript>>,
    #[serde(default)]
    vrrp: Vec<Spanned<crate::vrrp::config::FileInstance>>,
    #[serde(default)]
    vrrp_sync_group: Vec<Spanned<crate::vrrp::config::FileSyncGroup>>,
    #[serde(default)]
    conn_sync: Option<crate::vrrp::config::FileConnSync>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDataplane {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    conn_table_size: Option<Spanned<u32>>,
    conn_table_size_v6: Option<Spanned<u32>>,
    max_services: Option<Spanned<u32>>,
    max_backends: Option<Spanned<u32>>,
    slot_table_size: Option<Spanned<u32>>,
    persistence_table_size: Option<Spanned<u32>>,
    locality_table_size: Option<Spanned<u32>>,
    nat: Option<Spanned<bool>>,
    #[serde(default)]
    expire_nodest_conn: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileControl {
    socket: Option<PathBuf>,
    /// "address:port", or "off".
    metrics: Option<Spanned<String>>,
    pin_dir: Option<PathBuf>,
    script_user: Option<String>,
    #[serde(default)]
    script_security: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    tcp: Option<u32>,
    tcp_fin: Option<u32>,
    udp: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: Spanned<String>,
    address: Spanned<String>,
    #[serde(default)]
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    scheduler: Option<Spanned<String>>,
    #[serde(default)]
    forwarding: Option<Spanned<String>>,
    /// Tunnel settings of the service's tunnel real servers (each may have its own).
    #[serde(default)]
    tunnel: Option<Spanned<FileTunnel>>,
    /// ipvsadm `-b`: sh-fallback, sh-port, mh-fallback, mh-port.
    #[serde(default)]
    flags: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    mh_table_size: Option<Spanned<u32>>,
    #[serde(default)]
    conntrack: Option<Spanned<bool>>,
    /// Ports when `address` has none: numbers, "first-last" ranges, 0 = all ports.
    #[serde(default)]
    ports: Option<Spanned<Vec<Spanned<FilePort>>>>,
    #[serde(default)]
    persistence: Option<Spanned<FilePersistence>>,
    /// Defaults for the checks of the service's real servers.
    #[serde(default)]
    health: Option<Spanned<crate::health::config::FileTiming>>,
    #[serde(default)]
    sorry_server: Option<Spanned<String>>,
    /// Seconds a recovered real server waits before it takes connections again.
    #[serde(default)]
    reentry_delay: Option<Spanned<f64>>,
    /// Default of the real servers' `inhibit_on_failure`.
    #[serde(default)]
    inhibit_on_failure: Option<bool>,
    #[serde(default)]
    quorum: Option<u32>,
    #[serde(default)]
    hysteresis: Option<u32>,
    #[serde(default)]
    quorum_up: Option<Spanned<String>>,
    #[serde(default)]
    quorum_down: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<FileBackend>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FilePort {
    Number(i64),
    Range(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePersistence {
    timeout: Option<Spanned<i64>>,
    /// IPv4: a netmask ("255.255.255.0") or a prefix length; IPv6: a prefix length.
    netmask: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTunnel {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    checksum: Option<Spanned<String>>,
    source: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    forwarding: Option<Spanned<String>>,
    tunnel: Option<Spanned<FileTunnel>>,
    upper_threshold: Option<Spanned<i64>>,
    lower_threshold: Option<Spanned<i64>>,
    #[serde(default)]
    checks: Vec<Spanned<crate::health::config::FileCheck>>,
    inhibit_on_failure: Option<bool>,
    notify_up: Option<Spanned<String>>,
    notify_down: Option<Spanned<String>>,
}

/// Byte offset → line/column.
struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, column)
    }
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.at(span.start);
        ConfigError {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
        }
    }
    fn located<T>(&self, s: Spanned<T>) -> Located<T> {
        let (line, column) = self.at(s.span().start);
        Located {
            value: s.into_inner(),
            file: self.file.clone(),
            line,
            column,
        }
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text (`path` names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let loc = Locator {
        file: path.display().to_string(),
        text,
    };
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        loc.err(span, e.message().to_string())
    })?;

    let dp = file.dataplane;
    let if_span = dp.interfaces.span();
    let interfaces: Vec<Located<String>> = dp
        .interfaces
        .into_inner()
        .into_iter()
        .map(|i| loc.located(i))
        .collect();
    if interfaces.is_empty() {
        return Err(loc.err(
            if_span,
            "dataplane.interfaces must name at least one interface",
        ));
    }
    let mut seen = HashSet::new();
    for i in &interfaces {
        if i.value.is_empty() || i.value.len() > 15 || i.value.contains(['/', ' ']) {
            return Err(i.error(format!("\"{}\" is not a valid interface name", i.value)));
        }
        if !seen.insert(i.value.clone()) {
            return Err(i.error(format!("interface {} is listed twice", i.value)));
        }
    }

    let mut limits = Limits::default();
    let size = |v: &Option<Spanned<u32>>,
                min: u32,
                max: u32,
                name: &str|
     -> Result<Option<u32>, ConfigError> {
        match v {
            None => Ok(None),
            Some(s) if *s.get_ref() < min || *s.get_ref() > max => Err(loc.err(
                s.span(),
                format!(
                    "{name} must be between {min} and {max}, not {}",
                    s.get_ref()
                ),
            )),
            Some(s) => Ok(Some(*s.get_ref())),
        }
    };
    if let Some(n) = size(&dp.conn_table_size, 64, 1 << 28, "conn_table_size")? {
        limits.conn_table_size = n;
        limits.conn_table_size_v6 = (n / 4).max(64);
    }
    if let Some(n) = size(&dp.conn_table_size_v6, 64, 1 << 28, "conn_table_size_v6")? {
        limits.conn_table_size_v6 = n;
    }
    if let Some(n) = size(&dp.max_services, 1, 1 << 20, "max_services")? {
        limits.max_services = n;
    }
    if let Some(n) = size(&dp.max_backends, 1, 1 << 22, "max_backends")? {
        limits.max_backends = n;
    }
    if let Some(n) = size(&dp.slot_table_size, 1, 1 << 28, "slot_table_size")? {
        limits.slot_table_size = n;
    }
    if let Some(n) = size(
        &dp.persistence_table_size,
        64,
        1 << 26,
        "persistence_table_size",
    )? {
        limits.persistence_table_size = n;
    }
    if let Some(n) = size(&dp.locality_table_size, 64, 1 << 26, "locality_table_size")? {
        limits.locality_table_size = n;
    }
    let nat_span = dp.nat.as_ref().map(|n| n.span());
    if let Some(n) = &dp.nat {
        limits.nat_tables = *n.get_ref();
    }

    let mut timeouts = Timeouts::default();
    if let Some(t) = file.timeouts {
        let span = t.span();
        let t = t.into_inner();
        for (v, slot, name) in [
            (t.tcp, &mut timeouts.tcp, "tcp"),
            (t.tcp_fin, &mut timeouts.tcp_fin, "tcp_fin"),
            (t.udp, &mut timeouts.udp, "udp"),
        ] {
            if let Some(v) = v {
                // ipvsadm --set accepts 0..=2678400 (31 days); 0 there means "unchanged", which
                // has no meaning in a file.
                if v == 0 || v > 2_678_400 {
                    return Err(loc.err(
                        span.clone(),
                        format!("timeouts.{name} must be between 1 and 2678400 seconds, not {v}"),
                    ));
                }
                *slot = v;
            }
        }
    }

    let mut services = Vec::new();
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut total_backends = 0usize;
    for s in file.services {
        let svc = service(&loc, s)?;
        total_backends += svc.0.backends.len();
        let (svc, name_span, addr_span) = svc;
        if !limits.nat_tables
            && (svc.forwarding == Forwarding::Nat
                || svc.backends.iter().any(|b| b.forwarding == Forwarding::Nat))
        {
            return Err(loc.err(
                name_span,
                format!(
                    "service \"{}\" uses NAT, but [dataplane] nat = false leaves out NAT's reply tables (line {})",
                    svc.name,
                    nat_span.map_or(0, |s| loc.at(s.start).0)
                ),
            ));
        }
        if !names.insert(svc.name.clone()) {
            return Err(loc.err(
                name_span,
                format!("service name \"{}\" is used twice", svc.name),
            ));
        }
        if !keys.insert(svc.key) {
            return Err(loc.err(addr_span, format!("service {} is defined twice", svc.key)));
        }
        // The same destination and protocol: port sets may only overlap where one side is
        // more specific - an exact port over a range over all ports (IPVS's VIP:port over
        // VIP:0) - and the more specific one wins; otherwise, which service would a packet
        // belong to? Different prefixes may overlap: the longer one wins.
        let host = svc.key.is_host();
        let rank = |r: PortRange| {
            if r == PortRange::ALL {
                2
            } else if host && r.first != r.last {
                1
            } else {
                // A prefix service's ports are all matched one by one.
                0
            }
        };
        let ambiguous = |a: PortRange, b: PortRange| a.overlaps(b) && rank(a) == rank(b);
        if let Some((other, r)) = services.iter().find_map(|o: &ServiceConfig| {
            let same = o.key.addr == svc.key.addr
                && o.key.prefix == svc.key.prefix
                && o.key.protocol == svc.key.protocol;
            if !same {
                return None;
            }
            svc.ports
                .iter()
                .find(|a| o.ports.iter().any(|b| ambiguous(**a, *b)))
                .map(|r| (o, *r))
        }) {
            return Err(loc.err(
                addr_span,
                format!(
                    "ports {r} of service \"{}\" are covered by service \"{}\" too",
                    svc.name, other.name
                ),
            ));
        }
        services.push(svc);
    }
    let metrics = match &file.control.metrics {
        None => Some(DEFAULT_METRICS.parse().expect("valid default")),
        Some(m) if m.get_ref() == "off" => None,
        Some(m) => Some(m.get_ref().parse::<SocketAddr>().map_err(|_| {
            loc.err(
                m.span(),
                format!(
                    "control.metrics \"{}\" is not an address:port (e.g. \"127.0.0.1:9469\") or \"off\"",
                    m.get_ref()
                ),
            )
        })?),
    };
    if services.len() > limits.max_services as usize {
        return Err(ConfigError {
            file: loc.file.clone(),
            line: 1,
            column: 1,
            message: format!(
                "{} services exceed dataplane.max_services = {}",
                services.len(),
                limits.max_services
            ),
        });
    }
    if total_backends > limits.max_backends as usize {
        return Err(ConfigError {
            file: loc.file.clone(),
            line: 1,
            column: 1,
            message: format!(
                "{total_backends} real servers exceed dataplane.max_backends = {}",
                limits.max_backends
            ),
        });
    }

    let ha = {
        use crate::vrrp::config as vc;
        let mut ha = vc::Ha::default();
        let first = file
            .vrrp
            .first()
            .map(|v| v.span())
            .or_else(|| file.vrrp_script.first().map(|v| v.span()))
            .unwrap_or(0..0);
        for s in file.vrrp_script {
            let span = s.span();
            ha.scripts
                .push(vc::script_from_file(s.into_inner()).map_err(|e| loc.err(span, e))?);
        }
        for i in file.vrrp {
            let span = i.span();
            ha.instances.push(
                vc::instance_from_file(i.into_inner(), &ha.scripts)
                    .map_err(|e| loc.err(span, e))?,
            );
        }
        for g in file.vrrp_sync_group {
            let span = g.span();
            ha.groups.push(
                vc::group_from_file(g.into_inner(), &ha.scripts).map_err(|e| loc.err(span, e))?,
            );
        }
        ha.conn_sync = file.conn_sync.map(vc::conn_sync_from_file);
        for w in vc::complete(&mut ha).map_err(|e| loc.err(first, e))? {
            tracing::warn!("{}: {w}", loc.file);
        }
        ha
    };

    Ok(Config {
        path: path.to_path_buf(),
        dataplane: DataplaneConfig {
            interfaces,
            xdp_mode: dp.xdp_mode,
            limits,
            expire_nodest_conn: dp.expire_nodest_conn,
        },
        socket: file
            .control
            .socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
        metrics,
        pin_dir: file.control.pin_dir,
        script_user: file.control.script_user,
        script_security: file.control.script_security,
        timeouts,
        services,
        ha,
    })
}

/// Parses "addr:port" / "[v6]:port" (port required) or, with `default_port`, also a bare
/// address.
fn parse_endpoint(s: &str, default_port: Option<u16>) -> Result<(IpAddr, u16), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port()));
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return match default_port {
            Some(p) => Ok((ip, p)),
            None => Err(format!("\"{s}\" has no port (write {})", example(ip))),
        };
    }
    Err(format!(
        "\"{s}\" is not an address with a port (e.g. 192.168.56.10:80 or [2001:db8::10]:80)"
    ))
}

/// A service address: "ip:port", "[v6]:port", "ip", "ip/prefix" (port: `None` if absent).
fn parse_service_address(s: &str) -> Result<(IpAddr, u8, Option<u16>), String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        check_unicast(sa.ip())?;
        return Ok((sa.ip(), host_bits(sa.ip()), Some(sa.port())));
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        check_unicast(ip)?;
        return Ok((ip, host_bits(ip), None));
    }
    if let Some((a, len)) = s.split_once('/')
        && let Ok(ip) = a.parse::<IpAddr>()
    {
        let max = host_bits(ip);
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("\"{s}\": the prefix length must be 0 to {max}"))?;
        if mask_addr(ip, len) != ip {
            return Err(format!(
                "\"{s}\" has host bits set: the network is {}/{len}",
                mask_addr(ip, len)
            ));
        }
        if len == max {
            check_unicast(ip)?;
        }
        return Ok((ip, len, None));
    }
    Err(format!(
        "\"{s}\" is not an address with a port (e.g. 192.168.56.10:80 or [2001:db8::10]:80), an address or a prefix (0.0.0.0/0)"
    ))
}

/// `a` with all but its first `len` bits cleared.
pub fn mask_addr(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(v) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            IpAddr::V4((u32::from(v) & m).into())
        }
        IpAddr::V6(v) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            IpAddr::V6((u128::from(v) & m).into())
        }
    }
}

/// `ports = [80, 443, "8000-8100"]`: sorted, adjacent ranges merged; 0 must stand alone.
fn parse_ports(
    loc: &Locator<'_>,
    p: &Spanned<Vec<Spanned<FilePort>>>,
) -> Result<Vec<PortRange>, ConfigError> {
    if p.get_ref().is_empty() {
        return Err(loc.err(p.span(), "ports must not be empty"));
    }
    let mut v = Vec::new();
    for item in p.get_ref() {
        let bad = |m: String| loc.err(item.span(), m);
        let r = match item.get_ref() {
            FilePort::Number(n) if (0..=65535).contains(n) => PortRange::one(*n as u16),
            FilePort::Number(n) => return Err(bad(format!("port {n} is not between 0 and 65535"))),
            FilePort::Range(text) => {
                let parsed = text.split_once('-').and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                });
                match parsed {
                    Some((a, b)) if a >= 1 && a <= b => PortRange { first: a, last: b },
                    _ => {
                        return Err(bad(format!(
                            "\"{text}\" is not a port range \"first-last\" with 1 <= first <= last <= 65535"
                        )));
                    }
                }
            }
        };
        if r == PortRange::one(0) {
            if p.get_ref().len() > 1 {
                return Err(bad(
                    "port 0 means all ports and cannot be combined with others".into(),
                ));
            }
            return Ok(vec![PortRange::ALL]);
        }
        v.push((r, item.span()));
    }
    v.sort_by_key(|(r, _)| *r);
    let mut out: Vec<PortRange> = Vec::new();
    for (r, span) in v {
        if let Some(last) = out.last_mut() {
            if last.overlaps(r) {
                return Err(loc.err(span, format!("ports {r} are listed twice")));
            }
            if last.last as u32 + 1 == r.first as u32 {
                last.last = r.last;
                continue;
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn parse_persistence(
    loc: &Locator<'_>,
    p: &Spanned<FilePersistence>,
    addr: IpAddr,
) -> Result<Persistence, ConfigError> {
    let timeout = match &p.get_ref().timeout {
        None => DEFAULT_PERSISTENCE_TIMEOUT,
        Some(t) if (1..=MAX_PERSISTENCE_TIMEOUT as i64).contains(t.get_ref()) => {
            *t.get_ref() as u32
        }
        Some(t) => {
            return Err(loc.err(
                t.span(),
                format!(
                    "persistence timeout must be 1 to {MAX_PERSISTENCE_TIMEOUT} seconds, not {}",
                    t.get_ref()
                ),
            ));
        }
    };
    let max = host_bits(addr);
    let prefix = match &p.get_ref().netmask {
        None => max,
        Some(m) => {
            let err = |msg: String| loc.err(m.span(), msg);
            match m.get_ref() {
                toml::Value::Integer(n) if (1..=max as i64).contains(n) => *n as u8,
                toml::Value::Integer(n) => {
                    return Err(err(format!(
                        "persistence netmask as a prefix length must be 1 to {max}, not {n}"
                    )));
                }
                toml::Value::String(text) if addr.is_ipv4() => {
                    let mask: std::net::Ipv4Addr = text.parse().map_err(|_| {
                        err(format!("\"{text}\" is not a netmask like 255.255.255.0"))
                    })?;
                    let bits = u32::from(mask);
                    if bits.leading_ones() + bits.trailing_zeros() != 32 || bits == 0 {
                        return Err(err(format!(
                            "netmask {text} is not contiguous ones followed by zeros"
                        )));
                    }
                    bits.leading_ones() as u8
                }
                toml::Value::String(text) => {
                    let n: u8 = text
                        .trim_start_matches('/')
                        .parse()
                        .ok()
                        .filter(|n| (1..=128).contains(n))
                        .ok_or_else(|| {
                            err(format!(
                                "an IPv6 service's persistence netmask is a prefix length 1 to 128, not \"{text}\""
                            ))
                        })?;
                    n
                }
                _ => {
                    return Err(err(
                        "persistence netmask is a netmask string or a prefix length".into(),
                    ));
                }
            }
        }
    };
    Ok(Persistence { timeout, prefix })
}

fn example(ip: IpAddr) -> String {
    SocketAddr::new(ip, 80).to_string()
}

pub fn check_unicast(ip: IpAddr) -> Result<(), String> {
    let bad = match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if bad {
        Err(format!("{ip} is not a unicast address"))
    } else {
        Ok(())
    }
}

fn service(
    loc: &Locator<'_>,
    s: FileService,
) -> Result<(ServiceConfig, Range<usize>, Range<usize>), ConfigError> {
    let name_span = s.name.span();
    let name = s.name.into_inner();
    if name.is_empty() {
        return Err(loc.err(name_span, "service name must not be empty"));
    }
    let addr_span = s.address.span();
    let (addr, prefix, addr_port) =
        parse_service_address(s.address.get_ref()).map_err(|m| loc.err(addr_span.clone(), m))?;
    let ports = match (&s.ports, addr_port) {
        (Some(p), Some(_)) => {
            return Err(loc.err(
                p.span(),
                "the address already has a port: give either address = \"ip:port\" or ports = [...]",
            ));
        }
        (Some(p), None) => parse_ports(loc, p)?,
        (None, Some(0)) => vec![PortRange::ALL],
        (None, Some(p)) => vec![PortRange::one(p)],
        (None, None) => {
            return Err(loc.err(
                addr_span,
                format!(
                    "\"{}\" has no port: write {} or add ports = [80, 443, \"8000-8100\"] (0 = all ports)",
                    s.address.get_ref(),
                    example(addr)
                ),
            ));
        }
    };
    let host = prefix == host_bits(addr);
    if !host {
        let expanded: u32 = ports
            .iter()
            .filter(|r| **r != PortRange::ALL)
            .map(|r| r.port_count())
            .sum();
        if expanded > MAX_PREFIX_PORTS {
            return Err(loc.err(
                addr_span,
                format!(
                    "a prefix service covers at most {MAX_PREFIX_PORTS} single ports ({expanded} given); use port 0 for all ports"
                ),
            ));
        }
    }
    let port = if ports[0] == PortRange::ALL {
        0
    } else {
        ports[0].first
    };
    let multi_port = ports.len() > 1 || ports[0].first != ports[0].last;
    let protocol = match &s.protocol {
        None => Protocol::Tcp,
        Some(p) => match p.get_ref().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(loc.err(
                    p.span(),
                    format!("protocol \"{other}\" is not one of: tcp, udp"),
                ));
            }
        },
    };
    // IPVS and Piranha default to wlc.
    let (scheduler, sched_span) = match &s.scheduler {
        None => (Scheduler::Wlc, name_span.clone()),
        Some(x) => (
            x.get_ref().parse::<Scheduler>().map_err(|m| {
                loc.err(
                    x.span(),
                    format!("{m}; IPVS schedulers are rr, wrr, lc, wlc, sed, nq, sh, dh, mh, lblc, lblcr, fo, ovf, twos"),
                )
            })?,
            x.span(),
        ),
    };
    if !scheduler.supported() {
        return Err(loc.err(
            sched_span,
            format!(
                "scheduler {scheduler}{} is not supported yet (supported: rr, wrr, lc, wlc, sed, nq, fo, ovf, twos, sh, dh, mh, lblc, lblcr)",
                if s.scheduler.is_none() {
                    " (the default)"
                } else {
                    ""
                }
            ),
        ));
    }
    let mut sched_flags = SchedFlags::default();
    if let Some(fl) = &s.flags {
        for f in fl.get_ref() {
            let (sched, what) = f.get_ref().split_once('-').unwrap_or(("", ""));
            let known = matches!(what, "fallback" | "port") && matches!(sched, "sh" | "mh");
            if !known {
                return Err(loc.err(
                    f.span(),
                    format!(
                        "unknown scheduler flag \"{}\" (flags: sh-fallback, sh-port, mh-fallback, mh-port)",
                        f.get_ref()
                    ),
                ));
            }
            if sched != scheduler.name() {
                return Err(loc.err(
                    f.span(),
                    format!(
                        "flag {} only applies to the {sched} scheduler, not {scheduler}",
                        f.get_ref()
                    ),
                ));
            }
            match what {
                "fallback" => sched_flags.fallback = true,
                _ => sched_flags.port = true,
            }
        }
    }
    let mh_table_size = match &s.mh_table_size {
        None => lb_common::hash::MH_DEFAULT_SIZE,
        Some(m) if scheduler != Scheduler::Mh => {
            return Err(loc.err(m.span(), "mh_table_size only applies to the mh scheduler"));
        }
        Some(m) if !lb_common::hash::MH_PRIMES.contains(m.get_ref()) => {
            return Err(loc.err(
                m.span(),
                format!(
                    "mh_table_size must be one of IPVS's primes {:?}, not {}",
                    lb_common::hash::MH_PRIMES,
                    m.get_ref()
                ),
            ));
        }
        Some(m) => *m.get_ref(),
    };
    let conntrack = match &s.conntrack {
        Some(c)
            if !*c.get_ref()
                && !matches!(scheduler, Scheduler::Sh | Scheduler::Dh | Scheduler::Mh) =>
        {
            return Err(loc.err(
                c.span(),
                format!(
                    "conntrack = false needs a scheduler that finds a flow's server from its packets (sh, dh or mh), not {scheduler}"
                ),
            ));
        }
        Some(c) => *c.get_ref(),
        None => true,
    };
    let persistence = match &s.persistence {
        None => None,
        Some(p) => Some(parse_persistence(loc, p, addr)?),
    };
    if persistence.is_some() && !conntrack {
        return Err(loc.err(
            s.persistence.as_ref().unwrap().span(),
            "persistence needs the connection table (conntrack = false cannot be persistent)",
        ));
    }
    let forwarding = parse_forwarding(loc, &s.forwarding)?.unwrap_or(Forwarding::Dr);
    let service_tunnel = match &s.tunnel {
        Some(t) => Some(parse_tunnel(loc, t)?),
        None => None,
    };
    if forwarding == Forwarding::Nat && !conntrack {
        return Err(loc.err(
            s.forwarding
                .as_ref()
                .map_or(name_span.clone(), |f| f.span()),
            "NAT needs the connection table to match replies (conntrack = false cannot NAT)",
        ));
    }

    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for b in s.backends {
        let bspan = b.span();
        let b = b.into_inner();
        let aspan = b.address.span();
        // Servers of a multi-port service take each packet's own port (IPVS port 0).
        let default_port = if multi_port { 0 } else { port };
        let (baddr, bport) = parse_endpoint(b.address.get_ref(), Some(default_port))
            .map_err(|m| loc.err(aspan.clone(), m))?;
        check_unicast(baddr).map_err(|m| loc.err(aspan.clone(), m))?;
        let weight = match &b.weight {
            None => 1,
            Some(w) if (0..=65535).contains(w.get_ref()) => *w.get_ref() as u32,
            Some(w) => {
                return Err(loc.err(
                    w.span(),
                    format!("weight must be between 0 and 65535, not {}", w.get_ref()),
                ));
            }
        };
        let threshold = |t: &Option<Spanned<i64>>, name: &str| match t {
            None => Ok(0),
            Some(v) if (0..=i32::MAX as i64).contains(v.get_ref()) => Ok(*v.get_ref() as u32),
            Some(v) => Err(loc.err(
                v.span(),
                format!(
                    "{name} must be between 0 and {}, not {}",
                    i32::MAX,
                    v.get_ref()
                ),
            )),
        };
        let upper_threshold = threshold(&b.upper_threshold, "upper_threshold")?;
        let lower_threshold = threshold(&b.lower_threshold, "lower_threshold")?;
        if let Some(l) = &b.lower_threshold
            && lower_threshold > upper_threshold
        {
            return Err(loc.err(
                l.span(),
                format!(
                    "lower_threshold ({lower_threshold}) must not exceed upper_threshold ({upper_threshold}; 0 = none)"
                ),
            ));
        }
        let bfwd = parse_forwarding(loc, &b.forwarding)?.unwrap_or(forwarding);
        if bfwd == Forwarding::Nat && !conntrack {
            return Err(loc.err(
                bspan,
                "NAT needs the connection table to match replies (conntrack = false cannot NAT)",
            ));
        }
        let tunnel = match (&b.tunnel, bfwd) {
            (Some(t), Forwarding::Tunnel) => Some(parse_tunnel(loc, t)?),
            (Some(t), _) => {
                return Err(loc.err(
                    t.span(),
                    "tunnel options conflict with the forwarding method (they need forwarding = \"tunnel\")",
                ));
            }
            (None, Forwarding::Tunnel) => Some(service_tunnel.unwrap_or_default()),
            (None, _) => None,
        };
        if let Some(src) = tunnel.and_then(|t| t.source)
            && src.is_ipv4() != baddr.is_ipv4()
        {
            return Err(loc.err(
                aspan,
                format!(
                    "tunnel source {src} and real server {baddr} are not the same address family"
                ),
            ));
        }
        let method = match bfwd {
            Forwarding::Dr => "direct routing",
            _ => "tunnelling",
        };
        if bfwd != Forwarding::Nat && bport != default_port {
            if multi_port {
                return Err(loc.err(
                    aspan,
                    format!(
                        "{method} keeps each packet's port: give the real servers of a multi-port service no port (not {bport})"
                    ),
                ));
            }
            return Err(loc.err(
                aspan,
                format!(
                    "{method} cannot change the port: real server port {bport} differs from the service port {port} (only NAT can)"
                ),
            ));
        }
        if bfwd != Forwarding::Tunnel && baddr.is_ipv4() != addr.is_ipv4() {
            return Err(loc.err(
                aspan,
                "real server and service must be the same address family (only tunnelling may mix them)",
            ));
        }
        if !seen.insert((baddr, bport)) {
            return Err(loc.err(
                bspan,
                format!(
                    "real server {} is listed twice",
                    SocketAddr::new(baddr, bport)
                ),
            ));
        }
        let defaults = s
            .health
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_default();
        let mut checks = Vec::new();
        for c in &b.checks {
            let spec = crate::health::config::check(c.get_ref(), &defaults)
                .map_err(|m| loc.err(c.span(), m))?;
            // A server of a multi-port or all-ports service has no one port to probe.
            let needs_port = !matches!(
                spec.probe,
                crate::health::spec::Probe::Ping
                    | crate::health::spec::Probe::File { .. }
                    | crate::health::spec::Probe::Misc(_)
            ) && !matches!(&spec.probe, crate::health::spec::Probe::SendExpect(se) if se.program.is_some());
            if needs_port && spec.connect_port.is_none() && bport == 0 {
                return Err(loc.err(
                    c.span(),
                    "this real server has no port of its own (multi-port or all-ports service): give the check a connect_port",
                ));
            }
            checks.push(spec);
        }
        let command = |c: &Option<Spanned<String>>| -> Result<Option<Vec<String>>, ConfigError> {
            c.as_ref()
                .map(|c| {
                    crate::health::config::split_command(c.get_ref())
                        .map_err(|m| loc.err(c.span(), m))
                })
                .transpose()
        };
        backends.push(BackendConfig {
            addr: baddr,
            port: bport,
            weight,
            forwarding: bfwd,
            tunnel,
            upper_threshold,
            lower_threshold,
            health: crate::health::config::BackendHealth {
                checks,
                inhibit_on_failure: b
                    .inhibit_on_failure
                    .or(s.inhibit_on_failure)
                    .unwrap_or(false),
                notify_up: command(&b.notify_up)?,
                notify_down: command(&b.notify_down)?,
            },
        });
    }
    let sorry_server = match &s.sorry_server {
        None => None,
        Some(a) => {
            let default_port = if multi_port { 0 } else { port };
            let (ip, p) = parse_endpoint(a.get_ref(), Some(default_port))
                .map_err(|m| loc.err(a.span(), m))?;
            check_unicast(ip).map_err(|m| loc.err(a.span(), m))?;
            if forwarding != Forwarding::Tunnel && ip.is_ipv4() != addr.is_ipv4() {
                return Err(loc.err(
                    a.span(),
                    "the sorry server and the service must be the same address family",
                ));
            }
            if forwarding != Forwarding::Nat && p != default_port {
                return Err(loc.err(
                    a.span(),
                    format!(
                        "the sorry server's port {p} differs from the service's: only NAT can change ports"
                    ),
                ));
            }
            Some((ip, p))
        }
    };
    let command = |c: &Option<Spanned<String>>| -> Result<Option<Vec<String>>, ConfigError> {
        c.as_ref()
            .map(|c| {
                crate::health::config::split_command(c.get_ref()).map_err(|m| loc.err(c.span(), m))
            })
            .transpose()
    };
    let reentry_delay = match &s.reentry_delay {
        None => std::time::Duration::ZERO,
        Some(d) => crate::health::config::secs(*d.get_ref(), "reentry_delay")
            .map_err(|m| loc.err(d.span(), m))?,
    };
    let health = crate::health::config::ServiceHealth {
        sorry_server,
        reentry_delay,
        quorum: s.quorum.unwrap_or(0),
        hysteresis: s.hysteresis.unwrap_or(0),
        quorum_up: command(&s.quorum_up)?,
        quorum_down: command(&s.quorum_down)?,
    };
    if let Some(t) = &s.tunnel
        && forwarding != Forwarding::Tunnel
        && backends.iter().all(|b| b.forwarding != Forwarding::Tunnel)
    {
        return Err(loc.err(
            t.span(),
            "tunnel options conflict with the forwarding method (no real server of this service tunnels)",
        ));
    }
    Ok((
        ServiceConfig {
            name,
            key: ServiceKey {
                addr,
                port,
                protocol,
                prefix,
            },
            ports,
            persistence,
            scheduler,
            sched_flags,
            mh_table_size,
            conntrack,
            forwarding,
            backends,
            health,
        },
        name_span,
        addr_span,
    ))
}

fn parse_forwarding(
    loc: &Locator<'_>,
    f: &Option<Spanned<String>>,
) -> Result<Option<Forwarding>, ConfigError> {
    let Some(f) = f else { return Ok(None) };
    let v = match f.get_ref().as_str() {
        "dr" => Forwarding::Dr,
        "nat" => Forwarding::Nat,
        "tunnel" => Forwarding::Tunnel,
        other => {
            return Err(loc.err(
                f.span(),
                format!("forwarding \"{other}\" is not one of: dr, nat, tunnel"),
            ));
        }
    };
    Ok(Some(v))
}

/// A `tunnel = { type, port, checksum, source }` table, with ipvsadm's rules for which
/// options go with which type.
fn parse_tunnel(loc: &Locator<'_>, t: &Spanned<FileTunnel>) -> Result<Tunnel, ConfigError> {
    let f = t.get_ref();
    let kind = match &f.kind {
        None => TunnelType::Ipip,
        Some(k) => match k.get_ref().as_str() {
            "ipip" => TunnelType::Ipip,
            "gue" => TunnelType::Gue,
            "gre" => TunnelType::Gre,
            other => {
                return Err(loc.err(
                    k.span(),
                    format!("tunnel type \"{other}\" is not one of: ipip, gue, gre"),
                ));
            }
        },
    };
    let port = match &f.port {
        None if kind == TunnelType::Gue => {
            return Err(loc.err(
                t.span(),
                "a gue tunnel needs a port (the real servers' GUE port)",
            ));
        }
        None => 0,
        Some(p) if kind != TunnelType::Gue => {
            return Err(loc.err(
                p.span(),
                format!("a {} tunnel takes no port (only gue does)", kind.name()),
            ));
        }
        Some(p) if (1..=65535).contains(p.get_ref()) => *p.get_ref() as u16,
        Some(p) => {
            return Err(loc.err(
                p.span(),
                format!(
                    "tunnel port must be between 1 and 65535, not {}",
                    p.get_ref()
                ),
            ));
        }
    };
    let checksum = match &f.checksum {
        None => TunnelChecksum::None,
        Some(c) => {
            let v = match c.get_ref().as_str() {
                "none" | "nocsum" => TunnelChecksum::None,
                "csum" => TunnelChecksum::Csum,
                "remcsum" => TunnelChecksum::Remcsum,
                other => {
                    return Err(loc.err(
                        c.span(),
                        format!("tunnel checksum \"{other}\" is not one of: none, csum, remcsum"),
                    ));
                }
            };
            if !kind.allows(v) {
                return Err(loc.err(
                    c.span(),
                    format!(
                        "a {} tunnel does not take checksum \"{}\"",
                        kind.name(),
                        c.get_ref()
                    ),
                ));
            }
            v
        }
    };
    let source = match &f.source {
        None => None,
        Some(a) => {
            let ip: IpAddr = a.get_ref().parse().map_err(|_| {
                loc.err(
                    a.span(),
                    format!("tunnel source \"{}\" is not an IP address", a.get_ref()),
                )
            })?;
            check_unicast(ip).map_err(|m| loc.err(a.span(), m))?;
            Some(ip)
        }
    };
    Ok(Tunnel {
        kind,
        port,
        checksum,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[dataplane]
interfaces = ["eth0"]
xdp_mode = "auto"
conn_table_size = 1048576

[[services]]
name = "web"
address = "192.168.56.10:80"     # VIP:port; IPv6 as "[2001:db8::10]:80"
protocol = "tcp"                  # tcp | udp
scheduler = "rr"
forwarding = "dr"

[[services.backends]]
address = "192.168.56.11:80"
weight = 1
"#;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("xlb.toml"), text)
    }

    #[test]
    fn the_documented_example_parses() {
        let c = p(EXAMPLE).unwrap();
        assert_eq!(c.dataplane.interfaces[0].value, "eth0");
        assert_eq!(c.dataplane.interfaces[0].line, 3);
        assert_eq!(c.dataplane.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.dataplane.limits.conn_table_size, 1 << 20);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.timeouts, Timeouts::default());
        let s = &c.services[0];
        assert_eq!(s.name, "web");
        assert_eq!(s.key.addr, "192.168.56.10".parse::<IpAddr>().unwrap());
        assert_eq!(s.key.port, 80);
        assert_eq!(s.key.protocol, Protocol::Tcp);
        assert_eq!(s.scheduler, Scheduler::Rr);
        assert_eq!(
            s.backends,
            vec![BackendConfig {
                health: Default::default(),
                addr: "192.168.56.11".parse().unwrap(),
                port: 80,
                weight: 1,
                forwarding: Forwarding::Dr,
                tunnel: None,
                upper_threshold: 0,
                lower_threshold: 0,
            }]
        );
    }

    #[test]
    fn ipv6_and_defaults() {
        let c = p(r#"
[dataplane]
interfaces = ["eth0", "eth1"]
[[services]]
name = "v6"
address = "[2001:db8::10]:443"
scheduler = "wrr"
[[services.backends]]
address = "2001:db8::11"
weight = 3
[[services.backends]]
address = "[2001:db8::12]:443"
"#)
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.key.protocol, Protocol::Tcp);
        assert_eq!(s.forwarding, Forwarding::Dr);
        assert_eq!(s.backends[0].port, 443);
        assert_eq!(s.backends[0].weight, 3);
        assert_eq!(s.backends[1].weight, 1);
        assert_eq!(c.dataplane.limits.conn_table_size_v6, (1 << 20) / 4);
    }

    /// Every error names the file, the line and the problem.
    #[test]
    fn forwarding_methods_per_real_server() {
        let c = parse(
            Path::new("x.toml"),
            r#"[dataplane]
interfaces = ["eth0"]
[[services]]
name = "web"
address = "10.0.0.1:80"
forwarding = "tunnel"
tunnel = { type = "gue", port = 6080, checksum = "csum" }
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
tunnel = { type = "gre", source = "10.0.0.2" }
[[services.backends]]
address = "192.168.1.5:8080"
forwarding = "nat"
[[services.backends]]
address = "10.0.1.4"
forwarding = "dr"
[[services.backends]]
address = "fd00::5"
"#,
        )
        .unwrap();
        let b = &c.services[0].backends;
        let gue = Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            checksum: TunnelChecksum::Csum,
            source: None,
        };
        assert_eq!(
            (b[0].forwarding, b[0].tunnel),
            (Forwarding::Tunnel, Some(gue))
        );
        assert_eq!(
            b[1].tunnel,
            Some(Tunnel {
                kind: TunnelType::Gre,
                port: 0,
                checksum: TunnelChecksum::None,
                source: Some("10.0.0.2".parse().unwrap()),
            })
        );
        assert_eq!(
            (b[2].forwarding, b[2].port, b[2].tunnel),
            (Forwarding::Nat, 8080, None)
        );
        assert_eq!((b[3].forwarding, b[3].tunnel), (Forwarding::Dr, None));
        // An IPv6 real server of an IPv4 service: only tunnelling may mix families.
        assert_eq!(
            (b[4].forwarding, b[4].tunnel),
            (Forwarding::Tunnel, Some(gue))
        );
        assert_eq!(gue.flags(), lb_common::tunnel::F_CSUM);
    }

    #[test]
    fn errors_are_located() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\nbogus = 1\n",
                3,
                "unknown field `bogus`",
            ),
            (
                "[dataplane]\ninterfaces = []\n",
                2,
                "at least one interface",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\nxdp_mode = \"turbo\"\n",
                3,
                "turbo",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\nconn_table_size = 1\n",
                3,
                "conn_table_size must be between",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1\"\nscheduler = \"rr\"\n",
                5,
                "has no port",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"fast\"\n",
                6,
                "unknown scheduler \"fast\"",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\nconntrack = false\n",
                7,
                "conntrack = false needs a scheduler that finds a flow's server from its packets (sh, dh or mh), not rr",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\n[[services.backends]]\naddress = \"10.0.0.2\"\nupper_threshold = 5\nlower_threshold = 7\n",
                9,
                "lower_threshold (7) must not exceed upper_threshold (5",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\n[[services.backends]]\naddress = \"10.0.0.2\"\nupper_threshold = -1\n",
                8,
                "upper_threshold must be between 0 and 2147483647, not -1",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nreentry_delay = 90000\n",
                6,
                "reentry_delay must be between 0 and 86400 seconds, not 90000",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"sh\"\nflags = [\"mh-port\"]\n",
                7,
                "only applies to the mh scheduler",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"mh\"\nmh_table_size = 4000\n",
                7,
                "must be one of IPVS's primes",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\nprotocol = \"sctp\"\n",
                7,
                "protocol \"sctp\"",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.0.2:8080\"\n",
                8,
                "direct routing cannot change the port",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.0.2\"\nweight = 70000\n",
                9,
                "weight must be between 0 and 65535",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"2001:db8::2\"\n",
                8,
                "same address family",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\nnat = false\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"nat\"\n",
                5,
                "[dataplane] nat = false leaves out NAT's reply tables (line 3)",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"sh\"\nconntrack = false\nforwarding = \"nat\"\n",
                8,
                "NAT needs the connection table",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\n[[services.backends]]\naddress = \"10.0.1.1:8080\"\n",
                8,
                "tunnelling cannot change the port",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\n[[services.backends]]\naddress = \"10.0.1.1\"\ntunnel = { type = \"gre\" }\n",
                8,
                "tunnel options conflict with the forwarding method",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\ntunnel = { type = \"gue\" }\n",
                7,
                "a gue tunnel needs a port",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\ntunnel = { type = \"gre\", port = 6080 }\n",
                7,
                "a gre tunnel takes no port",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\ntunnel = { type = \"gre\", checksum = \"remcsum\" }\n",
                7,
                "does not take checksum \"remcsum\"",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\ntunnel = { type = \"vxlan\" }\n",
                7,
                "not one of: ipip, gue, gre",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nforwarding = \"tunnel\"\ntunnel = { source = \"fd00::1\" }\n[[services.backends]]\naddress = \"10.0.1.1\"\n",
                9,
                "not the same address family",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\n[[services]]\nname = \"b\"\naddress = \"10.0.0.1:80\"\nscheduler = \"rr\"\n",
                9,
                "defined twice",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"a\"\naddress = \"224.0.0.1:80\"\nscheduler = \"rr\"\n",
                5,
                "not a unicast address",
            ),
            (
                "[dataplane]\ninterfaces = [\"eth0\"]\n[timeouts]\ntcp = 0\n",
                3,
                "timeouts.tcp must be between 1 and 2678400",
            ),
        ];
        for (text, line, needle) in cases {
            let e = p(text).expect_err(text);
            assert_eq!(e.file, "xlb.toml");
            assert_eq!(e.line, *line, "{e} for {text:?}");
            assert!(
                e.to_string().contains(needle),
                "{e} does not mention {needle:?}"
            );
            assert!(e.to_string().starts_with(&format!("xlb.toml:{line}:")));
        }
    }

    #[test]
    fn timeouts_section() {
        let c =
            p("[dataplane]\ninterfaces = [\"eth0\"]\n[timeouts]\ntcp = 600\nudp = 30\n").unwrap();
        assert_eq!(
            c.timeouts,
            Timeouts {
                tcp: 600,
                tcp_fin: 120,
                udp: 30
            }
        );
    }

    fn one_service(body: &str) -> Result<ServiceConfig, ConfigError> {
        let backend = if body.contains("2001:") {
            "2001:db8:1::1"
        } else {
            "10.0.1.1"
        };
        let text = format!(
            "[dataplane]\ninterfaces = [\"eth0\"]\n[[services]]\nname = \"s\"\n{body}\n[[services.backends]]\naddress = \"{backend}\"\n"
        );
        p(&text).map(|mut c| c.services.remove(0))
    }

    fn err(body: &str) -> String {
        match one_service(body) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => e.message,
        }
    }

    #[test]
    fn ports_lists_ranges_and_all_ports() {
        let s =
            one_service("address = \"10.0.0.10\"\nports = [443, 80, \"8000-8100\", 8101]").unwrap();
        assert_eq!(
            s.ports,
            vec![
                PortRange::one(80),
                PortRange::one(443),
                PortRange {
                    first: 8000,
                    last: 8101
                }
            ],
            "sorted, adjacent ranges merged"
        );
        assert_eq!(s.key.port, 80, "named by its first port");
        assert_eq!(
            s.backends[0].port, 0,
            "multi-port backends keep the client's port"
        );
        let all = one_service("address = \"10.0.0.10:0\"").unwrap();
        assert_eq!(all.ports, vec![PortRange::ALL]);
        assert_eq!(all.key.port, 0);
        let all = one_service("address = \"10.0.0.10\"\nports = [0]").unwrap();
        assert_eq!(all.ports, vec![PortRange::ALL]);
    }

    #[test]
    fn bad_ports_are_named() {
        assert!(err("address = \"10.0.0.10\"").contains("has no port"));
        assert!(err("address = \"10.0.0.10:80\"\nports = [443]").contains("already has a port"));
        assert!(err("address = \"10.0.0.10\"\nports = []").contains("must not be empty"));
        assert!(err("address = \"10.0.0.10\"\nports = [0, 80]").contains("port 0 means all"));
        assert!(err("address = \"10.0.0.10\"\nports = [80, \"70-90\"]").contains("twice"));
        let m = err("address = \"10.0.0.10\"\nports = [\"90-80\"]");
        assert!(m.contains("90-80"), "{m}");
        let m = err("address = \"10.0.0.10\"\nports = [70000]");
        assert!(m.contains("70000"), "{m}");
    }

    #[test]
    fn prefix_services() {
        let s = one_service("address = \"0.0.0.0/0\"\nports = [80]\nscheduler = \"dh\"").unwrap();
        assert_eq!(s.key.prefix, 0);
        assert!(!s.key.is_host());
        let s = one_service("address = \"198.51.100.0/24\"\nports = [80, 443]").unwrap();
        assert_eq!(s.key.prefix, 24);
        let s = one_service("address = \"2001:db8::/32\"\nports = [0]").unwrap();
        assert_eq!(s.key.prefix, 32);
        let m = err("address = \"198.51.100.1/24\"\nports = [80]");
        assert!(m.contains("host bits"), "{m}");
        let m = err("address = \"10.0.0.0/8\"\nports = [\"1-2000\"]");
        assert!(m.contains("at most"), "{m}");
        let m = err("address = \"10.0.0.0/33\"\nports = [80]");
        assert!(m.contains("33"), "{m}");
    }

    #[test]
    fn persistence_netmasks_and_timeouts() {
        let s = one_service(
            "address = \"10.0.0.10:80\"\npersistence = { timeout = 300, netmask = \"255.255.255.0\" }",
        )
        .unwrap();
        assert_eq!(
            s.persistence,
            Some(Persistence {
                timeout: 300,
                prefix: 24
            })
        );
        let s = one_service("address = \"10.0.0.10:80\"\npersistence = {}").unwrap();
        assert_eq!(
            s.persistence,
            Some(Persistence {
                timeout: DEFAULT_PERSISTENCE_TIMEOUT,
                prefix: 32
            }),
            "IPVS defaults: 360 s, one client address"
        );
        let s = one_service(
            "address = \"[2001:db8::10]:80\"\npersistence = { timeout = 60, netmask = 64 }",
        )
        .unwrap();
        assert_eq!(s.persistence.unwrap().prefix, 64);
        assert!(
            err("address = \"10.0.0.10:80\"\npersistence = { netmask = \"255.0.255.0\" }")
                .contains("contiguous")
        );
        assert!(
            err("address = \"10.0.0.10:80\"\npersistence = { timeout = 0 }").contains("timeout")
        );
        assert!(
            err("address = \"10.0.0.10:80\"\npersistence = { timeout = 99999999 }")
                .contains("timeout")
        );
        assert!(
            err("address = \"[2001:db8::10]:80\"\npersistence = { netmask = \"255.255.255.0\" }")
                .contains("IPv6")
        );
        assert!(
            err("address = \"10.0.0.10:80\"\nconntrack = false\nscheduler = \"sh\"\npersistence = {}")
                .contains("connection table")
        );
    }

    #[test]
    fn overlapping_port_sets_on_one_address_are_rejected() {
        let e = p(r#"
[dataplane]
interfaces = ["eth0"]
[[services]]
name = "a"
address = "10.0.0.10"
ports = [80, "400-450"]
[[services.backends]]
address = "10.0.1.1"
[[services]]
name = "b"
address = "10.0.0.10"
ports = ["440-500"]
[[services.backends]]
address = "10.0.1.2"
"#)
        .unwrap_err();
        assert!(
            e.message.contains("440-500") && e.message.contains("\"a\""),
            "{}",
            e.message
        );
        // Disjoint sets, another protocol, a wider prefix, or an exact port inside a range
        // or all ports are fine (the exact one wins).
        p(r#"
[dataplane]
interfaces = ["eth0"]
[[services]]
name = "a"
address = "10.0.0.10"
ports = [80, 443]
[[services.backends]]
address = "10.0.1.1"
[[services]]
name = "b"
address = "10.0.0.10"
ports = [0]
protocol = "udp"
[[services.backends]]
address = "10.0.1.2"
[[services]]
name = "c"
address = "10.0.0.0/24"
ports = [80]
[[services.backends]]
address = "10.0.1.3"
[[services]]
name = "d"
address = "10.0.0.10:0"
[[services.backends]]
address = "10.0.1.4"
[[services]]
name = "e"
address = "10.0.0.10"
ports = ["1000-2000"]
[[services.backends]]
address = "10.0.1.5"
[[services]]
name = "f"
address = "10.0.0.10:1500"
[[services.backends]]
address = "10.0.1.6:1500"
"#)
        .unwrap();
    }
}
