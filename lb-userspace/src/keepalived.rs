//! keepalived.conf as configuration: keepalived's syntax (comments, blocks, quoted strings,
//! `include` globs), a typed model of what it holds (LVS virtual servers with their real
//! servers and checkers, VRRP scripts, instances and sync groups) and its conversion into
//! xlb's services.
//!
//! As keepalived logs and skips what it does not know, unknown directives are [`Warning`]s;
//! malformed values of known directives are [`ConfigError`]s naming file:line.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use crate::config::{
    BackendConfig, ConfigError, DEFAULT_PERSISTENCE_TIMEOUT, Forwarding, Located,
    MAX_PERSISTENCE_TIMEOUT, Persistence, PortRange, Protocol, SchedFlags, Scheduler,
    ServiceConfig, ServiceKey, Timeouts, Tunnel, TunnelChecksum, TunnelType, host_bits,
};

/// Files an include chain may nest (keepalived has no limit; a loop needs one).
const MAX_INCLUDE_DEPTH: usize = 16;
/// Names one `include` pattern may brace-expand to.
const MAX_INCLUDE_NAMES: usize = 256;
const MAX_FILE_SIZE: u64 = 16 << 20;
/// `{ }` nesting (keepalived's deepest is 4: virtual_server, real_server, HTTP_GET, url).
const MAX_NESTING: usize = 32;
/// Addresses one virtual_server_group entry may expand to (one service each).
pub const MAX_GROUP_ADDRESSES: u128 = 65536;
/// Services one file may make (xlb's largest `max_services`).
pub const MAX_SERVICES: usize = 1 << 20;
/// keepalived's defaults.
pub const DEFAULT_DELAY_LOOP: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TIMER_SECS: f64 = u32::MAX as f64;
/// ipvsadm --set's longest timeout (31 days).
const MAX_LVS_TIMEOUT: u64 = 2_678_400;

// ---- positions, warnings ----

/// Where something was written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Loc {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl Loc {
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
    pub fn warning(&self, message: impl Into<String>) -> Warning {
        Warning {
            file: self.file.clone(),
            line: self.line,
            message: message.into(),
        }
    }
    fn located<T>(&self, value: T) -> Located<T> {
        Located {
            value,
            file: self.file.clone(),
            line: self.line,
            column: self.column,
        }
    }
    fn of<T>(l: &Located<T>) -> Loc {
        Loc {
            file: l.file.clone(),
            line: l.line,
            column: l.column,
        }
    }
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Something ignored or adjusted, as keepalived would log it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Warning {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

// ---- the model ----

/// Everything read from a keepalived.conf and its includes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keepalived {
    /// The files read, the main one first.
    pub files: Vec<PathBuf>,
    pub global_defs: GlobalDefs,
    pub vrrp_scripts: Vec<VrrpScript>,
    pub vrrp_sync_groups: Vec<VrrpSyncGroup>,
    pub vrrp_instances: Vec<VrrpInstance>,
    pub virtual_server_groups: Vec<VirtualServerGroup>,
    pub virtual_servers: Vec<VirtualServer>,
    /// The top-level `SSL { }` block of SSL_GET checkers.
    pub ssl: Option<SslContext>,
    /// Top-level `track_file` blocks (FILE_CHECK names them).
    pub track_files: Vec<TrackFile>,
    /// Directives ignored while reading.
    pub warnings: Vec<Warning>,
}

/// `track_file NAME { file PATH; weight W [reverse] }` (also `vrrp_track_file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackFile {
    pub name: String,
    pub file: String,
    /// Default 1.
    pub weight: i32,
    pub reverse: bool,
    pub loc: Loc,
}

/// A directive kept as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDirective {
    pub name: String,
    pub args: Vec<String>,
    pub block: Option<Vec<RawDirective>>,
    pub loc: Loc,
}

/// A script with its arguments, run as `user` / `group` if given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Script {
    /// As written (quotes of the configuration removed).
    pub command: String,
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Script {
    /// The command split into arguments as keepalived does (shell-like quotes and escapes).
    pub fn argv(&self) -> Vec<String> {
        crate::health::config::split_words(&self.command).0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalDefs {
    pub router_id: Option<String>,
    pub script_user: Option<String>,
    pub script_group: Option<String>,
    pub enable_script_security: bool,
    pub lvs_timeouts: Option<Located<LvsTimeouts>>,
    pub lvs_sync_daemon: Option<LvsSyncDaemon>,
    pub vrrp_version: Option<u8>,
    pub vrrp_strict: bool,
    pub vrrp_garp_master_delay: Option<u32>,
    pub vrrp_garp_master_repeat: Option<u32>,
    pub vrrp_garp_master_refresh: Option<u32>,
    pub notification_email: Vec<String>,
    /// The other settings (notification_email_from, smtp_server, ...), as written.
    pub raw: Vec<RawDirective>,
}

/// `lvs_timeouts tcp T tcpfin T udp T` (seconds; 0 or absent: unchanged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LvsTimeouts {
    pub tcp: Option<u32>,
    pub tcpfin: Option<u32>,
    pub udp: Option<u32>,
}

/// `lvs_sync_daemon INTERFACE VRRP_INSTANCE [id N] [maxlen N] [port N] [ttl N] [group IP]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LvsSyncDaemon {
    pub interface: String,
    pub vrrp_instance: String,
    pub id: Option<u8>,
    pub maxlen: Option<u16>,
    pub port: Option<u16>,
    pub ttl: Option<u8>,
    pub group: Option<IpAddr>,
    pub loc: Loc,
}

/// `vrrp_script NAME { }`, with keepalived's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VrrpScript {
    pub name: String,
    /// `script` with `user` / `group` from the `user` keyword.
    pub script: Script,
    /// Default 1 s.
    pub interval: Duration,
    /// Default: the interval.
    pub timeout: Duration,
    /// -253..=253, default 0 (a failing script puts its instances in FAULT).
    pub weight: i32,
    pub weight_reverse: bool,
    pub rise: u32,
    pub fall: u32,
    pub init_fail: bool,
    pub loc: Loc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VrrpState {
    Master,
    Backup,
}

/// A `track_script` / `track_interface` entry: `NAME [weight W [reverse|noreverse]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackEntry {
    pub name: String,
    pub weight: Option<i32>,
    pub reverse: bool,
    pub loc: Loc,
}

/// A `unicast_peer { }` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnicastPeer {
    pub addr: IpAddr,
    pub min_ttl: Option<u8>,
    pub max_ttl: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthType {
    Pass,
    Ah,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authentication {
    pub auth_type: AuthType,
    /// As written; only its first 8 bytes go on the wire.
    pub auth_pass: String,
}

impl Authentication {
    /// The 8 bytes of the advertisements (zero-padded).
    pub fn pass_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(self.auth_pass.bytes()) {
            *d = s;
        }
        b
    }
}

/// A `virtual_ipaddress` entry: `ADDR[/LEN] [dev IF] [label L] [brd B] [scope S] ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualIp {
    pub addr: IpAddr,
    pub prefix: Option<u8>,
    pub dev: Option<String>,
    pub label: Option<String>,
    pub broadcast: Option<String>,
    pub scope: Option<String>,
    pub no_track: bool,
    /// Other `ip addr` options, as written.
    pub options: Vec<String>,
    pub loc: Loc,
}

/// `use_vmac [NAME] [MAC]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vmac {
    pub name: Option<String>,
    pub mac: Option<String>,
}

/// `vrrp_instance NAME { }`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VrrpInstance {
    pub name: String,
    pub loc: Loc,
    pub state: Option<VrrpState>,
    pub interface: Option<Located<String>>,
    pub virtual_router_id: u8,
    /// See [`VrrpInstance::effective_priority`].
    pub priority: Option<u8>,
    /// Default 1 s.
    pub advert_int: Duration,
    /// `version 2|3` (global `vrrp_version`, default 2).
    pub version: Option<u8>,
    pub nopreempt: bool,
    pub preempt_delay: Option<Duration>,
    pub native_ipv6: bool,
    pub dont_track_primary: bool,
    pub mcast_src_ip: Option<IpAddr>,
    pub unicast_src_ip: Option<IpAddr>,
    pub unicast_peers: Vec<UnicastPeer>,
    pub unicast_ttl: Option<u8>,
    pub check_unicast_src: bool,
    pub authentication: Option<Authentication>,
    pub virtual_ipaddress: Vec<VirtualIp>,
    pub virtual_ipaddress_excluded: Vec<VirtualIp>,
    pub track_script: Vec<TrackEntry>,
    pub track_interface: Vec<TrackEntry>,
    pub notify_master: Option<Script>,
    pub notify_backup: Option<Script>,
    pub notify_fault: Option<Script>,
    pub notify_stop: Option<Script>,
    pub notify: Option<Script>,
    pub garp_master_delay: Option<u32>,
    pub garp_master_repeat: Option<u32>,
    pub garp_master_refresh: Option<u32>,
    pub garp_master_refresh_repeat: Option<u32>,
    pub smtp_alert: Option<bool>,
    pub use_vmac: Option<Vmac>,
    pub vmac_xmit_base: bool,
    /// `accept` / `no_accept`.
    pub accept: Option<bool>,
    pub strict_mode: Option<bool>,
    pub lower_prio_no_advert: Option<bool>,
    pub higher_prio_send_advert: Option<bool>,
    pub skip_check_adv_addr: Option<bool>,
    pub v3_checksum_as_v2: Option<bool>,
    pub down_timer_adverts: Option<u32>,
}

impl VrrpInstance {
    /// keepalived: without `priority`, 255 for `state MASTER`, else 100.
    pub fn effective_priority(&self) -> u8 {
        self.priority.unwrap_or(match self.state {
            Some(VrrpState::Master) => 255,
            _ => 100,
        })
    }
    /// keepalived: without `state`, MASTER at priority 255, else BACKUP.
    pub fn effective_state(&self) -> VrrpState {
        self.state.unwrap_or(if self.effective_priority() == 255 {
            VrrpState::Master
        } else {
            VrrpState::Backup
        })
    }
}

/// `vrrp_sync_group NAME { group { ... } ... }`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VrrpSyncGroup {
    pub name: String,
    pub loc: Loc,
    pub group: Vec<String>,
    pub notify_master: Option<Script>,
    pub notify_backup: Option<Script>,
    pub notify_fault: Option<Script>,
    pub notify_stop: Option<Script>,
    pub notify: Option<Script>,
    pub track_script: Vec<TrackEntry>,
    pub track_interface: Vec<TrackEntry>,
    pub sync_group_tracking_weight: bool,
    pub smtp_alert: Option<bool>,
}

/// `virtual_server_group NAME { }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServerGroup {
    pub name: String,
    pub loc: Loc,
    pub members: Vec<GroupMember>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupMember {
    /// `IP [PORT]`, `IP-LAST [PORT]`, `IP-IP [PORT]`, `IP/LEN [PORT]`: `first..=last`
    /// (port 0: all ports).
    Range {
        first: IpAddr,
        last: IpAddr,
        port: u16,
        loc: Loc,
    },
    /// `fwmark N [inet|inet6]`.
    Fwmark {
        mark: u32,
        family: Option<Family>,
        loc: Loc,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Inet,
    Inet6,
}

/// What a virtual_server balances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsTarget {
    /// `virtual_server IP [PORT]` (port 0: all ports).
    Address { addr: IpAddr, port: u16 },
    /// `virtual_server fwmark N`.
    Fwmark { mark: u32 },
    /// `virtual_server group NAME`.
    Group(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsProtocol {
    Tcp,
    Udp,
    Sctp,
}

/// `lb_kind` / `lvs_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LvsMethod {
    Nat,
    Dr,
    /// `TUN [type ipip|gue port N|gre] [nocsum|csum|remcsum]`.
    Tun {
        kind: TunnelType,
        port: u16,
        checksum: TunnelChecksum,
    },
}

impl LvsMethod {
    fn forwarding(self) -> (Forwarding, Option<Tunnel>) {
        match self {
            LvsMethod::Nat => (Forwarding::Nat, None),
            LvsMethod::Dr => (Forwarding::Dr, None),
            LvsMethod::Tun {
                kind,
                port,
                checksum,
            } => (
                Forwarding::Tunnel,
                Some(Tunnel {
                    kind,
                    port,
                    checksum,
                    source: None,
                }),
            ),
        }
    }
}

/// `persistence_granularity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// An IPv4 netmask, as its prefix length.
    Netmask(u8),
    /// A prefix length (IPv6's form).
    PrefixLength(u8),
}

/// `sorry_server IP [PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SorryServer {
    pub addr: IpAddr,
    pub port: Option<u16>,
    pub inhibit: bool,
    pub method: Option<LvsMethod>,
    pub loc: Loc,
}

/// `virtual_server ... { }`. Unset options are `None`: their defaults depend on the real
/// servers and checkers (see [`Checker::timing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub target: VsTarget,
    pub loc: Loc,
    pub delay_loop: Option<Duration>,
    /// Default wlc.
    pub lb_algo: Option<Located<Scheduler>>,
    /// Default NAT.
    pub lb_kind: Option<Located<LvsMethod>>,
    /// Default UDP (keepalived's, with a warning) for address virtual servers.
    pub protocol: Option<Located<VsProtocol>>,
    pub persistence_timeout: Option<Located<u32>>,
    pub persistence_granularity: Option<Located<Granularity>>,
    pub persistence_engine: Option<String>,
    /// Scheduler flags as written: `sh-port`, `sh-fallback`, `mh-port`, `mh-fallback`,
    /// `flag-1`..`flag-3`, `ops`, `hashed`.
    pub flags: Vec<Located<String>>,
    pub ha_suspend: bool,
    pub virtualhost: Option<String>,
    pub alpha: bool,
    pub omega: bool,
    pub quorum: Option<u32>,
    pub hysteresis: Option<u32>,
    pub quorum_up: Option<Script>,
    pub quorum_down: Option<Script>,
    pub sorry_server: Option<SorryServer>,
    pub inhibit_on_failure: bool,
    /// Default weight of the real servers.
    pub weight: Option<Located<u32>>,
    pub connect_timeout: Option<Duration>,
    pub retry: Option<u32>,
    pub delay_before_retry: Option<Duration>,
    pub warmup: Option<Duration>,
    pub ip_family: Option<Family>,
    pub smtp_alert: Option<bool>,
    pub real_servers: Vec<RealServer>,
}

impl VirtualServer {
    fn new(target: VsTarget, loc: Loc) -> Self {
        VirtualServer {
            target,
            loc,
            delay_loop: None,
            lb_algo: None,
            lb_kind: None,
            protocol: None,
            persistence_timeout: None,
            persistence_granularity: None,
            persistence_engine: None,
            flags: Vec::new(),
            ha_suspend: false,
            virtualhost: None,
            alpha: false,
            omega: false,
            quorum: None,
            hysteresis: None,
            quorum_up: None,
            quorum_down: None,
            sorry_server: None,
            inhibit_on_failure: false,
            weight: None,
            connect_timeout: None,
            retry: None,
            delay_before_retry: None,
            warmup: None,
            ip_family: None,
            smtp_alert: None,
            real_servers: Vec::new(),
        }
    }
}

/// `real_server IP [PORT] { }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealServer {
    pub addr: IpAddr,
    /// Default: the virtual server's port.
    pub port: Option<u16>,
    pub loc: Loc,
    /// Default: the virtual server's `weight`, else 1.
    pub weight: Option<Located<u32>>,
    /// Default: the virtual server's `lb_kind`.
    pub method: Option<Located<LvsMethod>>,
    pub uthreshold: Option<Located<u32>>,
    pub lthreshold: Option<Located<u32>>,
    /// Default: the virtual server's.
    pub inhibit_on_failure: Option<bool>,
    pub notify_up: Option<Script>,
    pub notify_down: Option<Script>,
    pub alpha: Option<bool>,
    pub retry: Option<u32>,
    pub delay_before_retry: Option<Duration>,
    pub warmup: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub delay_loop: Option<Duration>,
    pub virtualhost: Option<String>,
    pub smtp_alert: Option<bool>,
    pub checkers: Vec<Checker>,
}

impl RealServer {
    pub fn inhibit(&self, vs: &VirtualServer) -> bool {
        self.inhibit_on_failure.unwrap_or(vs.inhibit_on_failure)
    }
    pub fn effective_weight(&self, vs: &VirtualServer) -> u32 {
        self.weight
            .as_ref()
            .or(vs.weight.as_ref())
            .map_or(1, |w| w.value)
    }
}

/// A health checker of a real server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checker {
    pub kind: CheckerKind,
    pub common: CheckCommon,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckerKind {
    Tcp,
    /// HTTP_GET.
    Http(HttpCheck),
    /// SSL_GET.
    Ssl(HttpCheck),
    Smtp(SmtpCheck),
    Dns(DnsCheck),
    Udp(UdpCheck),
    Ping,
    File(FileCheck),
    Misc(MiscCheck),
}

impl CheckerKind {
    /// The block's keyword.
    pub fn name(&self) -> &'static str {
        match self {
            CheckerKind::Tcp => "TCP_CHECK",
            CheckerKind::Http(_) => "HTTP_GET",
            CheckerKind::Ssl(_) => "SSL_GET",
            CheckerKind::Smtp(_) => "SMTP_CHECK",
            CheckerKind::Dns(_) => "DNS_CHECK",
            CheckerKind::Udp(_) => "UDP_CHECK",
            CheckerKind::Ping => "PING_CHECK",
            CheckerKind::File(_) => "FILE_CHECK",
            CheckerKind::Misc(_) => "MISC_CHECK",
        }
    }
    /// keepalived's retry default (`check_api.c:queue_checker`).
    fn default_retry(&self) -> u32 {
        match self {
            CheckerKind::Dns(_) => 3,
            CheckerKind::Misc(_) | CheckerKind::File(_) => 0,
            _ => 1,
        }
    }
    /// `None`: the delay_loop.
    fn default_delay_before_retry(&self) -> Option<Duration> {
        match self {
            CheckerKind::Http(_) | CheckerKind::Ssl(_) => Some(Duration::from_secs(3)),
            CheckerKind::Dns(_) => None,
            _ => Some(Duration::from_secs(1)),
        }
    }
}

/// Keywords every checker takes (MISC_CHECK and FILE_CHECK: no connection ones).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckCommon {
    pub connect_ip: Option<IpAddr>,
    pub connect_port: Option<u16>,
    pub bindto: Option<IpAddr>,
    pub bind_port: Option<u16>,
    pub bind_if: Option<String>,
    pub fwmark: Option<u32>,
    pub connect_timeout: Option<Duration>,
    pub retry: Option<u32>,
    pub delay_before_retry: Option<Duration>,
    pub warmup: Option<Duration>,
    pub delay_loop: Option<Duration>,
    pub alpha: Option<bool>,
    pub log_all_failures: Option<bool>,
}

/// A checker's timing after keepalived's inheritance: checker, then real server, then
/// virtual server, then the checker type's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckTiming {
    pub delay_loop: Duration,
    pub connect_timeout: Duration,
    pub retry: u32,
    pub delay_before_retry: Duration,
    pub warmup: Duration,
    pub alpha: bool,
}

impl Checker {
    pub fn timing(&self, vs: &VirtualServer, rs: &RealServer) -> CheckTiming {
        let c = &self.common;
        let delay_loop = c
            .delay_loop
            .or(rs.delay_loop)
            .or(vs.delay_loop)
            .unwrap_or(DEFAULT_DELAY_LOOP);
        CheckTiming {
            delay_loop,
            connect_timeout: c
                .connect_timeout
                .or(rs.connect_timeout)
                .or(vs.connect_timeout)
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            retry: c
                .retry
                .or(rs.retry)
                .or(vs.retry)
                .unwrap_or(self.kind.default_retry()),
            delay_before_retry: c
                .delay_before_retry
                .or(rs.delay_before_retry)
                .or(vs.delay_before_retry)
                .or(self.kind.default_delay_before_retry())
                .unwrap_or(delay_loop),
            warmup: c.warmup.or(rs.warmup).or(vs.warmup).unwrap_or(delay_loop),
            alpha: c.alpha.or(rs.alpha).unwrap_or(vs.alpha),
        }
    }
}

/// HTTP_GET / SSL_GET.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpCheck {
    pub urls: Vec<Url>,
    /// `1.0` (default), `1.0C` or `1.1`.
    pub http_protocol: Option<String>,
    pub virtualhost: Option<String>,
    pub fast_recovery: bool,
    pub enable_sni: Option<bool>,
    pub sni_name: Option<String>,
    pub tls_compliant: Option<bool>,
}

/// A `url { }` block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub path: String,
    /// The body's MD5, 32 lower-case hex digits.
    pub digest: Option<String>,
    /// Accepted status ranges; empty: 200-299.
    pub status_codes: Vec<(u16, u16)>,
    pub virtualhost: Option<String>,
    pub regex: Option<String>,
    pub regex_no_match: bool,
    pub loc: Loc,
}

impl Url {
    pub fn status_ok(&self, code: u16) -> bool {
        if self.status_codes.is_empty() {
            (200..=299).contains(&code)
        } else {
            self.status_codes
                .iter()
                .any(|(a, b)| (*a..=*b).contains(&code))
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmtpCheck {
    /// Default `smtpchecker.keepalived.org`.
    pub helo_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsCheck {
    /// A, NS, CNAME, SOA (default), MX, TXT, AAAA, RRSIG or DNSKEY.
    pub query_type: Option<String>,
    /// Default ".".
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpCheck {
    /// Hex bytes to send.
    pub payload: Option<String>,
    pub require_reply: bool,
    /// Hex bytes the reply must hold.
    pub reply: Option<String>,
    pub min_reply_length: Option<u32>,
    pub max_reply_length: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileCheck {
    pub track_file: String,
    pub weight: Option<i32>,
    pub reverse: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MiscCheck {
    /// `misc_path`, run as `user` / `group` from the `user` keyword.
    pub script: Script,
    /// Default: the virtual server's delay_loop.
    pub timeout: Option<Duration>,
    pub dynamic: bool,
}

/// The top-level `SSL { }` block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslContext {
    pub password: Option<String>,
    pub ca: Option<String>,
    pub certificate: Option<String>,
    pub key: Option<String>,
}

// ---- entry points ----

/// Reads a keepalived.conf and the files it includes.
pub fn load(path: &Path) -> Result<Keepalived, ConfigError> {
    let mut r = Reader::default();
    r.file(path, None, 0)?;
    r.finish()
}

/// Parses configuration text; `path_label` names it in errors and its directory is where
/// relative `include`s are looked for.
pub fn parse_str(path_label: &Path, text: &str) -> Result<Keepalived, ConfigError> {
    let mut r = Reader::default();
    r.files.push(path_label.display().to_string());
    r.paths.push(path_label.to_path_buf());
    if let Ok(c) = fs::canonicalize(path_label) {
        r.reading.push(c);
    }
    let dir = path_label.parent().unwrap_or(Path::new("")).to_path_buf();
    r.text(0, &dir, text, 0)?;
    r.finish()
}

impl Keepalived {
    /// The `lvs_timeouts` of global_defs, over IPVS's defaults.
    pub fn timeouts(&self) -> Option<Timeouts> {
        let t = &self.global_defs.lvs_timeouts.as_ref()?.value;
        let d = Timeouts::default();
        let pick = |v: Option<u32>, default: u32| v.filter(|v| *v != 0).unwrap_or(default);
        Some(Timeouts {
            tcp: pick(t.tcp, d.tcp),
            tcp_fin: pick(t.tcpfin, d.tcp_fin),
            udp: pick(t.udp, d.udp),
        })
    }

    /// The vrrp_instances' interfaces, each once, in file order.
    pub fn vrrp_interfaces(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for i in &self.vrrp_instances {
            // The VIPs arrive where they are configured: `dev` of a virtual_ipaddress if
            // given (VRRP may speak on another interface), else the instance's interface.
            let devs: Vec<&String> = i
                .virtual_ipaddress
                .iter()
                .chain(&i.virtual_ipaddress_excluded)
                .filter_map(|v| v.dev.as_ref())
                .collect();
            let all_on_dev = !i.virtual_ipaddress.is_empty()
                && i.virtual_ipaddress.iter().all(|v| v.dev.is_some());
            let names: Vec<&String> = if all_on_dev {
                devs
            } else {
                i.interface.iter().map(|n| &n.value).chain(devs).collect()
            };
            for name in names {
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
        }
        out
    }

    /// xlb's services: one per address virtual_server, and one per address of each
    /// virtual_server_group entry. What xlb cannot do (firewall marks, one-packet
    /// scheduling) or adjusts as keepalived does (ports, duplicates) is in the warnings.
    pub fn services(&self) -> Result<(Vec<ServiceConfig>, Vec<Warning>), ConfigError> {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        let mut names: HashMap<String, Loc> = HashMap::new();
        let mut keys: HashMap<ServiceKey, Loc> = HashMap::new();
        for vs in &self.virtual_servers {
            let Some(targets) = self.targets(vs, &mut warnings)? else {
                continue;
            };
            if vs.real_servers.is_empty() {
                warnings
                    .push(vs.loc.warning(
                        "virtual_server has no real_server; skipped (as keepalived does)",
                    ));
                continue;
            }
            if out.len() + targets.len() > MAX_SERVICES {
                return Err(vs.loc.error(format!(
                    "the virtual servers make more than {MAX_SERVICES} services"
                )));
            }
            let common = ServiceCommon::of(vs, &mut warnings)?;
            for t in targets {
                let Some(svc) = service(vs, &common, &t, &self.track_files, &mut warnings)? else {
                    continue;
                };
                if let Some(first) = keys.get(&svc.key) {
                    return Err(t.loc.error(format!(
                        "service {} is defined twice (first at {first})",
                        svc.key
                    )));
                }
                if let Some(first) = names.get(&svc.name) {
                    return Err(t.loc.error(format!(
                        "service name \"{}\" is used twice (first at {first})",
                        svc.name
                    )));
                }
                keys.insert(svc.key, t.loc.clone());
                names.insert(svc.name.clone(), t.loc.clone());
                out.push(svc);
            }
        }
        let mut seen = HashSet::new();
        warnings.retain(|w| seen.insert(w.clone()));
        Ok((out, warnings))
    }

    /// The addresses a virtual server stands for; `None`: skipped (with a warning).
    fn targets(
        &self,
        vs: &VirtualServer,
        warnings: &mut Vec<Warning>,
    ) -> Result<Option<Vec<Target>>, ConfigError> {
        let fwmark_note =
            "not supported by xlb's XDP data plane (no firewall marks at XDP); skipped";
        match &vs.target {
            VsTarget::Address { addr, port } => Ok(Some(vec![Target {
                addr: *addr,
                port: *port,
                group: None,
                loc: vs.loc.clone(),
            }])),
            VsTarget::Fwmark { mark } => {
                warnings.push(vs.loc.warning(format!(
                    "fwmark virtual_server (fwmark {mark}) {fwmark_note}"
                )));
                Ok(None)
            }
            VsTarget::Group(name) => {
                let Some(g) = self.virtual_server_groups.iter().find(|g| g.name == *name) else {
                    warnings.push(vs.loc.warning(format!(
                        "virtual_server group {name}: no virtual_server_group \"{name}\" is defined; skipped"
                    )));
                    return Ok(None);
                };
                let mut out = Vec::new();
                for m in &g.members {
                    match m {
                        GroupMember::Fwmark { mark, loc, .. } => warnings.push(loc.warning(
                            format!("fwmark {mark} of virtual_server_group {name} {fwmark_note}"),
                        )),
                        GroupMember::Range {
                            first,
                            last,
                            port,
                            loc,
                        } => {
                            let n = range_len(*first, *last);
                            if n > MAX_GROUP_ADDRESSES {
                                return Err(loc.error(format!(
                                    "{first}-{last} holds {n} addresses; xlb expands a range into one service per address, at most {MAX_GROUP_ADDRESSES}"
                                )));
                            }
                            if out.len() + n as usize > MAX_SERVICES {
                                return Err(loc.error(format!(
                                    "virtual_server_group {name} holds more than {MAX_SERVICES} addresses"
                                )));
                            }
                            for i in 0..n {
                                out.push(Target {
                                    addr: nth_addr(*first, i),
                                    port: *port,
                                    group: Some(name.clone()),
                                    loc: loc.clone(),
                                });
                            }
                        }
                    }
                }
                Ok(if out.is_empty() { None } else { Some(out) })
            }
        }
    }
}

// ---- conversion into xlb's services ----

struct Target {
    addr: IpAddr,
    port: u16,
    group: Option<String>,
    loc: Loc,
}

/// What all services of one virtual_server share.
struct ServiceCommon {
    protocol: Protocol,
    scheduler: Scheduler,
    flags: SchedFlags,
    method: LvsMethod,
}

impl ServiceCommon {
    fn of(vs: &VirtualServer, warnings: &mut Vec<Warning>) -> Result<Self, ConfigError> {
        let protocol = match &vs.protocol {
            None => {
                warnings.push(vs.loc.warning(
                    "virtual_server has no protocol: UDP (keepalived's default; add \"protocol TCP\" for TCP)",
                ));
                Protocol::Udp
            }
            Some(p) => match p.value {
                VsProtocol::Tcp => Protocol::Tcp,
                VsProtocol::Udp => Protocol::Udp,
                VsProtocol::Sctp => {
                    return Err(p.error("protocol SCTP is not supported by xlb (TCP and UDP only)"));
                }
            },
        };
        let scheduler = vs.lb_algo.as_ref().map_or(Scheduler::Wlc, |s| s.value);
        let mut flags = SchedFlags::default();
        for f in &vs.flags {
            let hashing = matches!(scheduler, Scheduler::Sh | Scheduler::Mh);
            let own = |kind: &str| {
                f.value
                    .strip_prefix(scheduler.name())
                    .is_some_and(|rest| rest == kind)
            };
            match f.value.as_str() {
                "ops" => warnings.push(Loc::of(f).warning(
                    "ops (one-packet scheduling) is not supported by xlb; ignored",
                )),
                "hashed" => {}
                "flag-1" if hashing => flags.fallback = true,
                "flag-2" if hashing => flags.port = true,
                _ if hashing && own("-fallback") => flags.fallback = true,
                _ if hashing && own("-port") => flags.port = true,
                other => warnings.push(Loc::of(f).warning(format!(
                    "{other} does not apply to the {scheduler} scheduler; ignored (as keepalived does)"
                ))),
            }
        }
        let method = vs.lb_kind.as_ref().map_or(LvsMethod::Nat, |m| m.value);
        Ok(ServiceCommon {
            protocol,
            scheduler,
            flags,
            method,
        })
    }
}

fn service(
    vs: &VirtualServer,
    c: &ServiceCommon,
    t: &Target,
    track_files: &[TrackFile],
    warnings: &mut Vec<Warning>,
) -> Result<Option<ServiceConfig>, ConfigError> {
    let (addr, port) = (t.addr, t.port);
    crate::config::check_unicast(addr).map_err(|m| t.loc.error(m))?;
    let sa = SocketAddr::new(addr, port);
    let suffix = if c.protocol == Protocol::Udp {
        "/udp"
    } else {
        ""
    };
    let name = match &t.group {
        None => format!("vs {sa}{suffix}"),
        Some(g) => format!("{g} {sa}{suffix}"),
    };
    let bits = host_bits(addr);
    let mut persistence = match (&vs.persistence_timeout, &vs.persistence_granularity) {
        (None, None) => None,
        (t, g) => {
            let prefix = match g {
                None => bits,
                Some(g) => match g.value {
                    Granularity::Netmask(p) if addr.is_ipv4() => p,
                    Granularity::Netmask(_) => {
                        return Err(g.error(
                            "an IPv6 virtual_server's persistence_granularity is a prefix length (1 to 128), not a netmask",
                        ));
                    }
                    Granularity::PrefixLength(p) if p <= bits => p,
                    Granularity::PrefixLength(p) => {
                        return Err(g.error(format!(
                            "persistence_granularity {p} is longer than an address of the virtual server ({bits} bits)"
                        )));
                    }
                },
            };
            Some(Persistence {
                timeout: t.as_ref().map_or(DEFAULT_PERSISTENCE_TIMEOUT, |t| t.value),
                prefix,
            })
        }
    };
    if port == 0 && persistence.is_none() {
        warnings.push(t.loc.warning(format!(
            "port 0 (all ports) is only valid for persistent services: persistence_timeout {DEFAULT_PERSISTENCE_TIMEOUT} set (as keepalived does)"
        )));
        persistence = Some(Persistence {
            timeout: DEFAULT_PERSISTENCE_TIMEOUT,
            prefix: bits,
        });
    }
    let ports = if port == 0 {
        vec![PortRange::ALL]
    } else {
        vec![PortRange::one(port)]
    };
    let (forwarding, _) = c.method.forwarding();

    let mut backends: Vec<BackendConfig> = Vec::new();
    let mut seen = HashSet::new();
    for rs in &vs.real_servers {
        let method = rs.method.as_ref().map_or(c.method, |m| m.value);
        let (bfwd, tunnel) = method.forwarding();
        if bfwd != Forwarding::Tunnel && rs.addr.is_ipv4() != addr.is_ipv4() {
            warnings.push(rs.loc.warning(format!(
                "real_server {} is not of the virtual server's address family (only tunnelling may mix them); skipped (as keepalived does)",
                rs.addr
            )));
            continue;
        }
        crate::config::check_unicast(rs.addr).map_err(|m| rs.loc.error(m))?;
        let bport = match (bfwd, rs.port) {
            (Forwarding::Nat, p) => p.unwrap_or(port),
            (_, Some(p)) if p != port => {
                warnings.push(rs.loc.warning(format!(
                    "real_server port {p} differs from the virtual server's port {port}: only NAT can change it; port {port} used (as keepalived does)"
                )));
                port
            }
            _ => port,
        };
        let weight = match rs.weight.as_ref().or(vs.weight.as_ref()) {
            None => 1,
            Some(w) if w.value <= 65535 => w.value,
            Some(w) => {
                return Err(w.error(format!("weight {} exceeds xlb's maximum 65535", w.value)));
            }
        };
        let upper = rs.uthreshold.as_ref().map_or(0, |u| u.value);
        let lower = rs.lthreshold.as_ref().map_or(0, |l| l.value);
        if let Some(l) = &rs.lthreshold
            && lower > upper
        {
            return Err(l.error(format!(
                "lthreshold ({lower}) must not exceed uthreshold ({upper}; 0 = none)"
            )));
        }
        if !seen.insert((rs.addr, bport)) {
            warnings.push(rs.loc.warning(format!(
                "real_server {} is listed twice; the second is removed (as keepalived does)",
                SocketAddr::new(rs.addr, bport)
            )));
            continue;
        }
        let mut checks = Vec::new();
        for ch in &rs.checkers {
            match check_spec(ch, vs, rs, track_files) {
                Ok(c) => checks.push(c),
                Err(m) => {
                    warnings.push(ch.loc.warning(format!("{}: {m}; ignored", ch.kind.name())))
                }
            }
        }
        backends.push(BackendConfig {
            addr: rs.addr,
            port: bport,
            weight,
            forwarding: bfwd,
            tunnel,
            upper_threshold: upper,
            lower_threshold: lower,
            health: crate::health::config::BackendHealth {
                checks,
                inhibit_on_failure: rs.inhibit(vs),
                notify_up: rs.notify_up.as_ref().map(Script::argv),
                notify_down: rs.notify_down.as_ref().map(Script::argv),
            },
        });
    }
    if backends.is_empty() {
        warnings.push(t.loc.warning(format!(
            "{name}: no real_server of its address family; skipped"
        )));
        return Ok(None);
    }
    // What xlb does not do (yet) is said, not silently dropped.
    if vs.ha_suspend {
        warnings.push(t.loc.warning(format!(
            "{name}: ha_suspend is not supported (checks run whichever node owns the VIP); ignored"
        )));
    }
    if vs.omega {
        warnings.push(t.loc.warning(format!(
            "{name}: omega is not supported (no quorum_down or notify_down at shutdown); ignored"
        )));
    }
    if let Some(s) = &vs.sorry_server {
        if s.inhibit {
            warnings.push(s.loc.warning(
                "sorry_server_inhibit is not supported (the sorry server is added when needed); ignored",
            ));
        }
        if s.method.is_some() {
            warnings.push(s.loc.warning(
                "sorry_server_lvs_method is not supported (the sorry server uses the service's method); ignored",
            ));
        }
    }
    let sorry_server = vs.sorry_server.as_ref().map(|s| {
        let sp = match forwarding {
            Forwarding::Nat => s.port.unwrap_or(port),
            _ => port,
        };
        (s.addr, sp)
    });
    let health = crate::health::config::ServiceHealth {
        sorry_server,
        reentry_delay: Duration::ZERO,
        quorum: vs.quorum.unwrap_or(0),
        hysteresis: vs.hysteresis.unwrap_or(0),
        quorum_up: vs.quorum_up.as_ref().map(Script::argv),
        quorum_down: vs.quorum_down.as_ref().map(Script::argv),
    };
    Ok(Some(ServiceConfig {
        name,
        key: ServiceKey::new(addr, port, c.protocol),
        ports,
        persistence,
        scheduler: c.scheduler,
        sched_flags: c.flags,
        mh_table_size: lb_common::hash::MH_DEFAULT_SIZE,
        conntrack: true,
        forwarding,
        backends,
        health,
    }))
}

/// A checker block as xlb's check: keepalived's timing inheritance and defaults.
fn check_spec(
    ch: &Checker,
    vs: &VirtualServer,
    rs: &RealServer,
    track_files: &[TrackFile],
) -> Result<crate::health::spec::CheckSpec, String> {
    use crate::health::spec::{
        CheckSpec, HttpProbe, HttpVersion, MiscProbe, Probe, Timing, TlsProbe, UrlProbe,
    };
    let t = ch.timing(vs, rs);
    let http = |h: &HttpCheck, tls: bool| -> Result<Probe, String> {
        let mut urls = Vec::new();
        for u in &h.urls {
            let digest = u
                .digest
                .as_deref()
                .map(crate::health::config::digest)
                .transpose()?;
            urls.push(UrlProbe {
                path: u.path.clone(),
                status: u.status_codes.clone(),
                digest,
                virtualhost: u.virtualhost.clone(),
            });
        }
        if urls.is_empty() {
            return Err("no url { path } block".into());
        }
        Ok(Probe::Http(HttpProbe {
            tls: tls.then(|| TlsProbe {
                sni: if h.enable_sni.unwrap_or(false) {
                    h.sni_name.clone().or_else(|| h.virtualhost.clone())
                } else {
                    None
                },
                verify: false,
            }),
            urls,
            version: match h.http_protocol.as_deref() {
                Some("1.1") => HttpVersion::Http11,
                Some("1.0C") => HttpVersion::Http10Close,
                _ => HttpVersion::Http10,
            },
            virtualhost: h
                .virtualhost
                .clone()
                .or_else(|| rs.virtualhost.clone())
                .or_else(|| vs.virtualhost.clone()),
            fast_recovery: h.fast_recovery,
        }))
    };
    let dns_type = |name: &str| {
        crate::health::config::DNS_TYPES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let hex = |s: &str| crate::health::config::hex(s, "payload");
    let probe = match &ch.kind {
        CheckerKind::Tcp => Probe::Tcp,
        CheckerKind::Http(h) => http(h, false)?,
        CheckerKind::Ssl(h) => http(h, true)?,
        CheckerKind::Smtp(m) => Probe::Smtp {
            helo: m
                .helo_name
                .clone()
                .unwrap_or_else(|| "smtpchecker.keepalived.org".into()),
        },
        CheckerKind::Dns(d) => {
            let tn = d.query_type.as_deref().unwrap_or("SOA");
            Probe::Dns {
                qtype: dns_type(tn).ok_or_else(|| format!("type {tn} is not supported"))?,
                name: d.name.clone().unwrap_or_else(|| ".".into()),
            }
        }
        CheckerKind::Udp(u) => Probe::Udp {
            payload: u
                .payload
                .as_deref()
                .map(hex)
                .transpose()?
                .unwrap_or_default(),
            require_reply: u.require_reply,
            reply: u.reply.as_deref().map(hex).transpose()?,
        },
        CheckerKind::Ping => Probe::Ping,
        CheckerKind::File(f) => {
            // FILE_CHECK's track_file names a top-level track_file block; the checker's own
            // weight, if set, replaces the block's (keepalived check_file.c).
            let t = track_files
                .iter()
                .find(|t| t.name == f.track_file)
                .ok_or_else(|| format!("track_file {} not found", f.track_file))?;
            let (weight, reverse) = match f.weight {
                Some(w) if w != 0 => (w, f.reverse),
                _ => (t.weight, t.reverse),
            };
            Probe::File {
                path: t.file.clone(),
                weight: Some(weight),
                reverse,
            }
        }
        CheckerKind::Misc(m) => Probe::Misc(MiscProbe {
            argv: m.script.argv(),
            shell: false,
            dynamic: m.dynamic,
            user: m.script.user.clone(),
            group: m.script.group.clone(),
        }),
    };
    // MISC_CHECK's timeout is its misc_timeout (default: the virtual server's delay_loop).
    let timeout = match &ch.kind {
        CheckerKind::Misc(m) => m.timeout.or(vs.delay_loop).unwrap_or(DEFAULT_DELAY_LOOP),
        _ => t.connect_timeout,
    };
    Ok(CheckSpec {
        probe,
        connect_ip: ch.common.connect_ip,
        connect_port: ch.common.connect_port,
        bind: ch.common.bindto,
        timing: Timing {
            interval: t.delay_loop,
            timeout,
            retry: t.retry,
            delay_before_retry: t.delay_before_retry,
            warmup: t.warmup,
            alpha: t.alpha,
            rise: 1,
            fall: 0,
        },
    })
}

fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

/// Addresses in `first..=last` (same family, `first <= last`).
fn range_len(first: IpAddr, last: IpAddr) -> u128 {
    (addr_bits(last) - addr_bits(first)).saturating_add(1)
}

fn nth_addr(first: IpAddr, i: u128) -> IpAddr {
    match first {
        IpAddr::V4(v) => IpAddr::V4(Ipv4Addr::from((u32::from(v) as u128 + i) as u32)),
        IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from(u128::from(v).wrapping_add(i))),
    }
}

// ---- reading: lines, words, blocks, includes ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    file: u32,
    line: u32,
    col: u32,
}

#[derive(Debug)]
enum Tok {
    Word(String, Pos),
    Open(Pos),
    Close(Pos),
    /// End of a line: ends the statement being read.
    End,
}

#[derive(Debug)]
struct Word {
    text: String,
    pos: Pos,
}

/// A statement: its words and its `{ }` block, if any.
#[derive(Debug)]
struct Node {
    words: Vec<Word>,
    block: Option<Vec<Node>>,
}

impl Node {
    fn name(&self) -> &str {
        &self.words[0].text
    }
    fn pos(&self) -> Pos {
        self.words[0].pos
    }
    fn args(&self) -> &[Word] {
        &self.words[1..]
    }
}

#[derive(Default)]
struct Reader {
    /// Display names, indexed by `Pos::file`.
    files: Vec<String>,
    paths: Vec<PathBuf>,
    /// Canonical paths of the include chain being read.
    reading: Vec<PathBuf>,
    toks: Vec<Tok>,
    warnings: Vec<Warning>,
}

enum Lexeme {
    Word(String, usize),
    Open(usize),
    Close(usize),
}

fn pos_at(file: u32, line: usize, col: usize) -> Pos {
    Pos {
        file,
        line: u32::try_from(line).unwrap_or(u32::MAX),
        col: u32::try_from(col).unwrap_or(u32::MAX),
    }
}

impl Reader {
    fn err(&self, pos: Pos, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.files[pos.file as usize].clone(),
            line: pos.line as usize,
            column: pos.col as usize,
            message: message.into(),
        }
    }

    fn warn(&mut self, pos: Pos, message: impl Into<String>) {
        self.warnings.push(Warning {
            file: self.files[pos.file as usize].clone(),
            line: pos.line as usize,
            message: message.into(),
        });
    }

    fn text(&mut self, file: u32, dir: &Path, text: &str, depth: usize) -> Result<(), ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.split('\n').enumerate() {
            let at = |col: usize| pos_at(file, i + 1, col);
            let body = raw.trim_start_matches([' ', '\t']);
            let indent = raw.len() - body.len();
            // keepalived recognises `include` only as a line's first word; its pattern may
            // hold braces (`{a,b}`), so it is not split into blocks.
            if let Some(rest) = body.strip_prefix("include")
                && (rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
            {
                let offset = indent + "include".len();
                let words = lex(rest, false).map_err(|(c, m)| self.err(at(offset + c), m))?;
                let inc = at(indent + 1);
                match words.as_slice() {
                    [Lexeme::Word(p, _)] => self.include(p, dir, inc, depth)?,
                    [] => return Err(self.err(inc, "include needs a file name or pattern")),
                    _ => {
                        return Err(self.err(
                            inc,
                            "include takes one file name or pattern (quote it if it has spaces)",
                        ));
                    }
                }
                continue;
            }
            for l in lex(raw, true).map_err(|(c, m)| self.err(at(c), m))? {
                self.toks.push(match l {
                    Lexeme::Word(s, c) => Tok::Word(s, at(c)),
                    Lexeme::Open(c) => Tok::Open(at(c)),
                    Lexeme::Close(c) => Tok::Close(at(c)),
                });
            }
            self.toks.push(Tok::End);
        }
        Ok(())
    }

    fn include(
        &mut self,
        pattern: &str,
        dir: &Path,
        at: Pos,
        depth: usize,
    ) -> Result<(), ConfigError> {
        let mut names = Vec::new();
        if pattern.len() > 4096 {
            return Err(self.err(at, "include pattern longer than 4096 bytes"));
        }
        if !brace_expand(pattern, &mut names, 0) {
            return Err(self.err(
                at,
                format!("include \"{pattern}\" expands to more than {MAX_INCLUDE_NAMES} names"),
            ));
        }
        for name in names {
            let path = dir.join(&name);
            if has_glob_meta(&name) {
                let found = glob(&path);
                if found.is_empty() {
                    self.warn(at, format!("include \"{name}\" matches no file"));
                }
                for f in found {
                    self.file(&f, Some(at), depth + 1)?;
                }
            } else {
                self.file(&path, Some(at), depth + 1)?;
            }
        }
        Ok(())
    }

    /// Reads a file into the token stream; `at`: the include that names it.
    fn file(&mut self, path: &Path, at: Option<Pos>, depth: usize) -> Result<(), ConfigError> {
        let fail = |r: &Self, m: String| match at {
            Some(p) => r.err(p, m),
            None => ConfigError {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                message: m,
            },
        };
        if depth > MAX_INCLUDE_DEPTH {
            return Err(fail(
                self,
                format!(
                    "includes nested more than {MAX_INCLUDE_DEPTH} deep (at {})",
                    path.display()
                ),
            ));
        }
        let canon = fs::canonicalize(path)
            .map_err(|e| fail(self, format!("cannot read {}: {e}", path.display())))?;
        if self.reading.contains(&canon) {
            return Err(fail(
                self,
                format!("include cycle: {} is already being read", path.display()),
            ));
        }
        let meta = fs::metadata(&canon)
            .map_err(|e| fail(self, format!("cannot read {}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(fail(
                self,
                format!("{} is not a regular file", path.display()),
            ));
        }
        if meta.len() > MAX_FILE_SIZE {
            return Err(fail(
                self,
                format!(
                    "{} is larger than {} MiB",
                    path.display(),
                    MAX_FILE_SIZE >> 20
                ),
            ));
        }
        let text = fs::read_to_string(&canon)
            .map_err(|e| fail(self, format!("cannot read {}: {e}", path.display())))?;
        let idx = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        self.files.push(path.display().to_string());
        self.paths.push(path.to_path_buf());
        self.reading.push(canon);
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        self.text(idx, &dir, &text, depth)?;
        self.reading.pop();
        Ok(())
    }

    fn finish(mut self) -> Result<Keepalived, ConfigError> {
        let nodes = self.tree()?;
        let mut p = Parser {
            files: &self.files,
            warnings: std::mem::take(&mut self.warnings),
        };
        let mut k = Keepalived {
            files: self.paths.clone(),
            ..Keepalived::default()
        };
        p.top(&nodes, &mut k)?;
        p.cross_check(&k);
        k.warnings = p.warnings;
        Ok(k)
    }

    /// Statements end at a line's end, `{` or `}`; a `{` opens the block of the statement
    /// before it, also one on the previous line.
    fn tree(&mut self) -> Result<Vec<Node>, ConfigError> {
        let mut stack: Vec<(Vec<Node>, Vec<Word>)> = Vec::new();
        let mut cur: Vec<Node> = Vec::new();
        let mut pending: Vec<Word> = Vec::new();
        for t in std::mem::take(&mut self.toks) {
            match t {
                Tok::Word(text, pos) => pending.push(Word { text, pos }),
                Tok::End => {
                    if !pending.is_empty() {
                        cur.push(Node {
                            words: std::mem::take(&mut pending),
                            block: None,
                        });
                    }
                }
                Tok::Open(pos) => {
                    let owner = if !pending.is_empty() {
                        std::mem::take(&mut pending)
                    } else {
                        match cur.pop() {
                            Some(n) if n.block.is_none() => n.words,
                            _ => return Err(self.err(pos, "\"{\" has no keyword before it")),
                        }
                    };
                    if stack.len() >= MAX_NESTING {
                        return Err(
                            self.err(pos, format!("blocks nested more than {MAX_NESTING} deep"))
                        );
                    }
                    stack.push((std::mem::take(&mut cur), owner));
                }
                Tok::Close(pos) => {
                    if !pending.is_empty() {
                        cur.push(Node {
                            words: std::mem::take(&mut pending),
                            block: None,
                        });
                    }
                    let Some((parent, owner)) = stack.pop() else {
                        return Err(self.err(pos, "\"}\" closes no block (one \"}\" too many)"));
                    };
                    let block = std::mem::replace(&mut cur, parent);
                    cur.push(Node {
                        words: owner,
                        block: Some(block),
                    });
                }
            }
        }
        if let Some((_, owner)) = stack.last() {
            return Err(self.err(
                owner[0].pos,
                format!(
                    "the block of \"{}\" is not closed (a \"}}\" is missing)",
                    owner[0].text
                ),
            ));
        }
        if !pending.is_empty() {
            cur.push(Node {
                words: pending,
                block: None,
            });
        }
        Ok(cur)
    }
}

/// Splits a line into words and braces, as keepalived: `#` and `!` start a comment anywhere
/// outside quotes (`\#`, `\!`: the characters), `"` quotes. Columns are 1-based.
fn lex(line: &str, braces: bool) -> Result<Vec<Lexeme>, (usize, String)> {
    fn flush(out: &mut Vec<Lexeme>, word: &mut Option<(String, usize)>) {
        if let Some((w, c)) = word.take() {
            out.push(Lexeme::Word(w, c));
        }
    }
    let mut out = Vec::new();
    let mut word: Option<(String, usize)> = None;
    let mut chars = line.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            ' ' | '\t' | '\r' | '\x0b' | '\x0c' => flush(&mut out, &mut word),
            '#' | '!' => break,
            '{' | '}' if braces => {
                flush(&mut out, &mut word);
                out.push(if c == '{' {
                    Lexeme::Open(i + 1)
                } else {
                    Lexeme::Close(i + 1)
                });
            }
            '\\' if matches!(chars.peek(), Some((_, '#' | '!'))) => {
                if let Some((_, n)) = chars.next() {
                    word.get_or_insert_with(|| (String::new(), i + 1)).0.push(n);
                }
            }
            '"' => {
                let w = &mut word.get_or_insert_with(|| (String::new(), i + 1)).0;
                loop {
                    match chars.next() {
                        None => return Err((i + 1, "unterminated quoted string".into())),
                        Some((_, '"')) => break,
                        // Escapes stay for the script parser (`Script::argv`).
                        Some((_, '\\')) => {
                            w.push('\\');
                            if let Some((_, n)) = chars.next() {
                                w.push(n);
                            }
                        }
                        Some((_, x)) => w.push(x),
                    }
                }
            }
            _ => word.get_or_insert_with(|| (String::new(), i + 1)).0.push(c),
        }
    }
    flush(&mut out, &mut word);
    Ok(out)
}

/// `a{b,c}d` → `abd`, `acd` (nested too). `false`: more than [`MAX_INCLUDE_NAMES`] (or
/// braces nested deeper than is reasonable).
fn brace_expand(s: &str, out: &mut Vec<String>, depth: usize) -> bool {
    if depth > 32 {
        return false;
    }
    let b: Vec<(usize, char)> = s.char_indices().collect();
    for (k, &(open, c)) in b.iter().enumerate() {
        if c != '{' {
            continue;
        }
        let mut depth = 0usize;
        let mut commas = Vec::new();
        let mut close = None;
        for &(j, d) in &b[k + 1..] {
            match d {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    close = Some(j);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => commas.push(j),
                _ => {}
            }
        }
        let Some(close) = close else { continue };
        if commas.is_empty() {
            continue;
        }
        let (prefix, suffix) = (&s[..open], &s[close + 1..]);
        let mut start = open + 1;
        for end in commas.into_iter().chain([close]) {
            let alt = format!("{prefix}{}{suffix}", &s[start..end]);
            if !brace_expand(&alt, out, depth + 1) {
                return false;
            }
            start = end + 1;
        }
        return true;
    }
    out.push(s.to_string());
    out.len() <= MAX_INCLUDE_NAMES
}

fn has_glob_meta(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The regular files matching a pattern of `*`, `?` and `[...]` per path component, in
/// order (names starting with `.` only for a pattern starting with `.`).
fn glob(pattern: &Path) -> Vec<PathBuf> {
    const MAX_MATCHES: usize = 4096;
    let mut cur: Vec<PathBuf> = vec![PathBuf::new()];
    for comp in pattern.components() {
        let mut next = Vec::new();
        match comp {
            Component::Normal(part) if has_glob_meta(&part.to_string_lossy()) => {
                let pat: Vec<char> = part.to_string_lossy().chars().collect();
                for dir in &cur {
                    let list = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir.as_path()
                    };
                    let Ok(entries) = fs::read_dir(list) else {
                        continue;
                    };
                    let mut found: Vec<String> = entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| {
                            (!n.starts_with('.') || pat.first() == Some(&'.'))
                                && wildmatch(&pat, &n.chars().collect::<Vec<_>>())
                        })
                        .collect();
                    found.sort();
                    next.extend(found.into_iter().map(|n| dir.join(n)));
                }
            }
            other => next.extend(cur.iter().map(|d| d.join(other.as_os_str()))),
        }
        next.truncate(MAX_MATCHES);
        cur = next;
    }
    cur.retain(|p| p.is_file());
    cur
}

/// fnmatch without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`, `\x`.
fn wildmatch(p: &[char], s: &[char]) -> bool {
    // The pattern index after `p[pi]` if it matches `c` (not for `*`).
    fn step(p: &[char], pi: usize, c: char) -> Option<usize> {
        match p[pi] {
            '?' => Some(pi + 1),
            '\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
            '[' => {
                let mut j = pi + 1;
                let negate = j < p.len() && matches!(p[j], '!' | '^');
                if negate {
                    j += 1;
                }
                let start = j;
                let mut hit = false;
                while j < p.len() && (p[j] != ']' || j == start) {
                    if j + 2 < p.len() && p[j + 1] == '-' && p[j + 2] != ']' {
                        hit |= p[j] <= c && c <= p[j + 2];
                        j += 3;
                    } else {
                        hit |= p[j] == c;
                        j += 1;
                    }
                }
                if j >= p.len() {
                    // No closing bracket: a literal `[`.
                    return (c == '[').then_some(pi + 1);
                }
                (hit != negate).then_some(j + 1)
            }
            x => (x == c).then_some(pi + 1),
        }
    }
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
            continue;
        }
        if pi < p.len()
            && let Some(n) = step(p, pi, s[si])
        {
            pi = n;
            si += 1;
            continue;
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

// ---- the typed model from the statements ----

struct Parser<'a> {
    files: &'a [String],
    warnings: Vec<Warning>,
}

type R<T> = Result<T, ConfigError>;

/// global_defs keywords kept as raw directives without a warning.
const GLOBAL_RAW: &[&str] = &[
    "notification_email_from",
    "smtp_server",
    "smtp_helo_name",
    "smtp_connect_timeout",
    "smtp_alert",
    "smtp_alert_vrrp",
    "smtp_alert_checker",
    "checker_log_all_failures",
    "default_interface",
    "vrrp_mcast_group4",
    "vrrp_mcast_group6",
    "vrrp_garp_master_refresh_repeat",
    "vrrp_garp_lower_prio_delay",
    "vrrp_garp_lower_prio_repeat",
    "vrrp_garp_interval",
    "vrrp_gna_interval",
    "vrrp_min_garp",
    "vrrp_garp_extra_if",
    "vrrp_lower_prio_no_advert",
    "vrrp_higher_prio_send_advert",
    "vrrp_check_unicast_src",
    "vrrp_skip_check_adv_addr",
    "vrrp_iptables",
    "vrrp_ipsets",
    "vrrp_nftables",
    "vrrp_priority",
    "checker_priority",
    "bfd_priority",
    "vrrp_no_swap",
    "checker_no_swap",
    "bfd_no_swap",
    "vrrp_rt_priority",
    "checker_rt_priority",
    "bfd_rt_priority",
    "max_auto_priority",
    "min_auto_priority_delay",
    "dynamic_interfaces",
    "notify_fifo",
    "notify_fifo_script",
    "vrrp_notify_fifo",
    "vrrp_notify_fifo_script",
    "lvs_notify_fifo",
    "lvs_notify_fifo_script",
    "lvs_flush",
    "lvs_flush_on_stop",
    "enable_traps",
    "enable_snmp_vrrp",
    "enable_snmp_keepalived",
    "enable_snmp_checker",
    "enable_snmp_rfc",
    "enable_snmp_rfcv2",
    "enable_snmp_rfcv3",
    "snmp_socket",
    "net_namespace",
    "instance",
    "use_pid_dir",
    "linkbeat_use_polling",
    "vrrp_startup_delay",
    "vrrp_log_unknown_vrids",
    "umask",
    "vrrp_netlink_cmd_rcv_bufs",
    "vrrp_netlink_monitor_rcv_bufs",
    "lvs_netlink_cmd_rcv_bufs",
    "lvs_netlink_monitor_rcv_bufs",
    "process_monitor_rcv_bufs",
    "vrrp_rx_bufs_policy",
    "vrrp_rx_bufs_multiplier",
    "random_seed",
    "reload_check_config",
    "reload_time_file",
    "reload_repeat",
    "config_save_dir",
    "data_use_instance",
    "script_timeout",
    "vrrp_own_all_vips",
    "vrrp_version_checksum",
    "vrrp_garp_master_refresh_timer",
    "checker_process_name",
    "vrrp_process_name",
    "process_names",
    "process_name",
];

impl Parser<'_> {
    fn loc(&self, p: Pos) -> Loc {
        Loc {
            file: self.files[p.file as usize].clone(),
            line: p.line as usize,
            column: p.col as usize,
        }
    }
    fn err(&self, p: Pos, m: impl Into<String>) -> ConfigError {
        self.loc(p).error(m)
    }
    fn warn(&mut self, p: Pos, m: impl Into<String>) {
        let w = self.loc(p).warning(m);
        self.warnings.push(w);
    }
    fn located<T>(&self, p: Pos, value: T) -> Located<T> {
        self.loc(p).located(value)
    }

    fn unsupported(&mut self, n: &Node, within: &str) {
        let name = n.name();
        let message = match name.chars().next() {
            Some('@') => {
                format!("\"{name}\": conditional configuration is not supported; line ignored")
            }
            Some('$') => {
                format!("\"{name}\": parameter definitions are not supported; line ignored")
            }
            Some('~') => format!("\"{name}\": sequences are not supported; line ignored"),
            _ => format!("unsupported directive \"{name}\" {within} (ignored)"),
        };
        self.warn(n.pos(), message);
    }

    /// A statement without a block and with `min..=max` arguments (extra ones: a warning).
    fn leaf<'n>(&mut self, n: &'n Node, min: usize, max: usize) -> R<&'n [Word]> {
        if n.block.is_some() {
            return Err(self.err(n.pos(), format!("\"{}\" takes no {{ }} block", n.name())));
        }
        let args = n.args();
        if args.len() < min {
            let what = if min == 1 {
                "a value".to_string()
            } else {
                format!("{min} values")
            };
            return Err(self.err(n.pos(), format!("\"{}\" needs {what}", n.name())));
        }
        if args.len() > max {
            self.warn(
                args[max].pos,
                format!("extra words after \"{}\" ignored", n.name()),
            );
            return Ok(&args[..max]);
        }
        Ok(args)
    }

    fn block<'n>(&self, n: &'n Node) -> R<&'n [Node]> {
        n.block
            .as_deref()
            .ok_or_else(|| self.err(n.pos(), format!("\"{}\" needs a {{ }} block", n.name())))
    }

    fn uint(&self, w: &Word, what: &str, min: u64, max: u64) -> R<u64> {
        w.text
            .parse::<u64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| {
                self.err(
                    w.pos,
                    format!(
                        "{what} \"{}\" is not a number between {min} and {max}",
                        w.text
                    ),
                )
            })
    }
    fn int(&self, w: &Word, what: &str, min: i64, max: i64) -> R<i64> {
        w.text
            .parse::<i64>()
            .ok()
            .filter(|v| (min..=max).contains(v))
            .ok_or_else(|| {
                self.err(
                    w.pos,
                    format!(
                        "{what} \"{}\" is not a number between {min} and {max}",
                        w.text
                    ),
                )
            })
    }
    fn u32_of(&mut self, n: &Node, min: u32, max: u32) -> R<u32> {
        let a = self.leaf(n, 1, 1)?;
        Ok(self.uint(&a[0], n.name(), min as u64, max as u64)? as u32)
    }
    /// Decimal seconds (keepalived's TIMER).
    fn timer_word(&self, w: &Word, what: &str) -> R<Duration> {
        w.text
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0 && *v <= MAX_TIMER_SECS)
            .map(|v| Duration::from_micros((v * 1e6).round() as u64))
            .ok_or_else(|| {
                self.err(
                    w.pos,
                    format!("{what} \"{}\" is not a number of seconds", w.text),
                )
            })
    }
    fn timer(&mut self, n: &Node) -> R<Duration> {
        let a = self.leaf(n, 1, 1)?;
        self.timer_word(&a[0], n.name())
    }
    fn ip(&self, w: &Word, what: &str) -> R<IpAddr> {
        w.text
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| self.err(w.pos, format!("{what} \"{}\" is not an IP address", w.text)))
    }
    fn ip_of(&mut self, n: &Node) -> R<IpAddr> {
        let a = self.leaf(n, 1, 1)?;
        self.ip(&a[0], n.name())
    }
    fn port(&self, w: &Word, what: &str) -> R<u16> {
        Ok(self.uint(w, what, 0, 65535)? as u16)
    }
    fn string(&mut self, n: &Node) -> R<String> {
        Ok(self.leaf(n, 1, 1)?[0].text.clone())
    }
    /// A keyword alone (true) or with on/off, true/false, yes/no.
    fn flag(&mut self, n: &Node) -> R<bool> {
        let a = self.leaf(n, 0, 1)?;
        match a.first().map(|w| w.text.as_str()) {
            None | Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(x) => Err(self.err(
                a[0].pos,
                format!(
                    "\"{}\" takes on/off, true/false or yes/no, not \"{x}\"",
                    n.name()
                ),
            )),
        }
    }
    /// `KEYWORD "command args" [user [group]]`.
    fn script(&mut self, n: &Node) -> R<Script> {
        let a = self.leaf(n, 1, 3)?;
        Ok(Script {
            command: a[0].text.clone(),
            user: a.get(1).map(|w| w.text.clone()),
            group: a.get(2).map(|w| w.text.clone()),
        })
    }
    fn raw(&self, n: &Node) -> RawDirective {
        RawDirective {
            name: n.name().to_string(),
            args: n.args().iter().map(|w| w.text.clone()).collect(),
            block: n
                .block
                .as_ref()
                .map(|b| b.iter().map(|c| self.raw(c)).collect()),
            loc: self.loc(n.pos()),
        }
    }
    /// The block's words, over all its lines (keepalived's `read_value_block`).
    fn value_block<'n>(&self, n: &'n Node) -> R<Vec<&'n Word>> {
        let mut out = Vec::new();
        for line in self.block(n)? {
            if line.block.is_some() {
                return Err(self.err(
                    line.pos(),
                    format!(
                        "\"{}\" holds a list; \"{}\" cannot open a block",
                        n.name(),
                        line.name()
                    ),
                ));
            }
            out.extend(line.words.iter());
        }
        Ok(out)
    }
    /// The block name of `vrrp_script NAME {`, etc.
    fn block_name(&mut self, n: &Node) -> R<String> {
        let a = n.args();
        let Some(first) = a.first() else {
            return Err(self.err(n.pos(), format!("\"{}\" needs a name", n.name())));
        };
        if a.len() > 1 {
            self.warn(
                a[1].pos,
                format!("extra words after \"{}\" ignored", n.name()),
            );
        }
        Ok(first.text.clone())
    }

    fn top(&mut self, nodes: &[Node], k: &mut Keepalived) -> R<()> {
        let mut defined: HashMap<(&'static str, String), Loc> = HashMap::new();
        let mut once = |kind: &'static str, name: &str, loc: &Loc| -> R<()> {
            if let Some(first) = defined.get(&(kind, name.to_string())) {
                return Err(loc.error(format!("{kind} {name} is defined twice (first at {first})")));
            }
            defined.insert((kind, name.to_string()), loc.clone());
            Ok(())
        };
        for n in nodes {
            match n.name() {
                "global_defs" => self.global_defs(n, &mut k.global_defs)?,
                "vrrp_script" => {
                    let s = self.vrrp_script(n)?;
                    once("vrrp_script", &s.name, &s.loc)?;
                    k.vrrp_scripts.push(s);
                }
                "vrrp_instance" => {
                    let i = self.vrrp_instance(n)?;
                    once("vrrp_instance", &i.name, &i.loc)?;
                    k.vrrp_instances.push(i);
                }
                "vrrp_sync_group" => {
                    let g = self.sync_group(n)?;
                    once("vrrp_sync_group", &g.name, &g.loc)?;
                    k.vrrp_sync_groups.push(g);
                }
                "virtual_server_group" => {
                    let g = self.vs_group(n)?;
                    once("virtual_server_group", &g.name, &g.loc)?;
                    k.virtual_server_groups.push(g);
                }
                "virtual_server" => k.virtual_servers.push(self.virtual_server(n)?),
                "SSL" => k.ssl = Some(self.ssl(n)?),
                "track_file" | "vrrp_track_file" => {
                    let t = self.track_file(n)?;
                    once("track_file", &t.name, &t.loc)?;
                    k.track_files.push(t);
                }
                _ => self.unsupported(n, "at top level"),
            }
        }
        Ok(())
    }

    /// References keepalived ignores with a log line.
    fn cross_check(&mut self, k: &Keepalived) {
        let scripts: HashSet<&str> = k.vrrp_scripts.iter().map(|s| s.name.as_str()).collect();
        let instances: HashSet<&str> = k.vrrp_instances.iter().map(|i| i.name.as_str()).collect();
        let tracks = k
            .vrrp_instances
            .iter()
            .flat_map(|i| &i.track_script)
            .chain(k.vrrp_sync_groups.iter().flat_map(|g| &g.track_script));
        for t in tracks {
            if !scripts.contains(t.name.as_str()) {
                self.warnings.push(t.loc.warning(format!(
                    "track_script {}: no vrrp_script \"{}\" is defined; ignored (as keepalived does)",
                    t.name, t.name
                )));
            }
        }
        for g in &k.vrrp_sync_groups {
            for m in &g.group {
                if !instances.contains(m.as_str()) {
                    self.warnings.push(g.loc.warning(format!(
                        "vrrp_sync_group {}: no vrrp_instance \"{m}\" is defined; ignored (as keepalived does)",
                        g.name
                    )));
                }
            }
        }
    }

    fn global_defs(&mut self, n: &Node, g: &mut GlobalDefs) -> R<()> {
        for c in self.block(n)? {
            match c.name() {
                "router_id" => g.router_id = Some(self.string(c)?),
                "script_user" => {
                    let a = self.leaf(c, 1, 2)?;
                    g.script_user = Some(a[0].text.clone());
                    g.script_group = a.get(1).map(|w| w.text.clone());
                }
                "enable_script_security" => {
                    self.leaf(c, 0, 0)?;
                    g.enable_script_security = true;
                }
                "lvs_timeouts" => {
                    let a = self.leaf(c, 2, 6)?;
                    let mut t = LvsTimeouts::default();
                    for pair in a.chunks(2) {
                        let [key, value] = pair else {
                            return Err(self.err(
                                pair[0].pos,
                                format!(
                                    "lvs_timeouts: \"{}\" needs a number of seconds",
                                    pair[0].text
                                ),
                            ));
                        };
                        let v = Some(self.uint(
                            value,
                            &format!("lvs_timeouts {}", key.text),
                            0,
                            MAX_LVS_TIMEOUT,
                        )? as u32);
                        match key.text.as_str() {
                            "tcp" => t.tcp = v,
                            "tcpfin" => t.tcpfin = v,
                            "udp" => t.udp = v,
                            other => {
                                return Err(self.err(
                                    key.pos,
                                    format!(
                                        "lvs_timeouts: \"{other}\" is not one of tcp, tcpfin, udp"
                                    ),
                                ));
                            }
                        }
                    }
                    g.lvs_timeouts = Some(self.located(c.pos(), t));
                }
                "lvs_sync_daemon" => g.lvs_sync_daemon = Some(self.sync_daemon(c)?),
                "vrrp_version" => g.vrrp_version = Some(self.u32_of(c, 2, 3)? as u8),
                "vrrp_strict" => {
                    self.leaf(c, 0, 0)?;
                    g.vrrp_strict = true;
                }
                "vrrp_garp_master_delay" => {
                    g.vrrp_garp_master_delay = Some(self.u32_of(c, 0, 1000)?)
                }
                "vrrp_garp_master_repeat" => {
                    g.vrrp_garp_master_repeat = Some(self.u32_of(c, 0, 1000)?)
                }
                "vrrp_garp_master_refresh" => {
                    g.vrrp_garp_master_refresh = Some(self.u32_of(c, 0, u32::MAX)?)
                }
                "notification_email" => {
                    let words = self.value_block(c)?;
                    g.notification_email
                        .extend(words.into_iter().map(|w| w.text.clone()));
                }
                name => {
                    if !GLOBAL_RAW.contains(&name) {
                        self.unsupported(c, "in global_defs");
                    }
                    let r = self.raw(c);
                    g.raw.push(r);
                }
            }
        }
        Ok(())
    }

    fn sync_daemon(&mut self, c: &Node) -> R<LvsSyncDaemon> {
        let a = self.leaf(c, 2, 12)?;
        let mut d = LvsSyncDaemon {
            interface: a[0].text.clone(),
            vrrp_instance: a[1].text.clone(),
            id: None,
            maxlen: None,
            port: None,
            ttl: None,
            group: None,
            loc: self.loc(c.pos()),
        };
        for pair in a[2..].chunks(2) {
            let [key, value] = pair else {
                return Err(self.err(
                    pair[0].pos,
                    format!("lvs_sync_daemon: \"{}\" needs a value", pair[0].text),
                ));
            };
            let what = format!("lvs_sync_daemon {}", key.text);
            match key.text.as_str() {
                "id" => d.id = Some(self.uint(value, &what, 0, 255)? as u8),
                "maxlen" => d.maxlen = Some(self.uint(value, &what, 1, 65507)? as u16),
                "port" => d.port = Some(self.uint(value, &what, 1, 65535)? as u16),
                "ttl" => d.ttl = Some(self.uint(value, &what, 1, 255)? as u8),
                "group" => d.group = Some(self.ip(value, &what)?),
                other => {
                    return Err(self.err(
                        key.pos,
                        format!("lvs_sync_daemon: \"{other}\" is not one of id, maxlen, port, ttl, group"),
                    ));
                }
            }
        }
        Ok(d)
    }

    /// `weight W [reverse|noreverse]`, W within ±`limit`.
    fn weight_reverse(&mut self, c: &Node, limit: i64) -> R<(i32, bool)> {
        let a = self.leaf(c, 1, 2)?;
        let weight = self.int(&a[0], "weight", -limit, limit)? as i32;
        let reverse = match a.get(1).map(|w| w.text.as_str()) {
            None | Some("noreverse") => false,
            Some("reverse") => true,
            Some(x) => {
                return Err(self.err(
                    a[1].pos,
                    format!(
                        "weight takes \"reverse\" or \"noreverse\" after the number, not \"{x}\""
                    ),
                ));
            }
        };
        Ok((weight, reverse))
    }

    fn track_file(&mut self, n: &Node) -> R<TrackFile> {
        let name = self.block_name(n)?;
        let loc = self.loc(n.pos());
        let (mut file, mut weight, mut reverse) = (None, 1, false);
        for c in self.block(n)? {
            match c.name() {
                "file" => file = Some(self.string(c)?),
                "weight" => (weight, reverse) = self.weight_reverse(c, 65535)?,
                _ => self.unsupported(c, "in track_file"),
            }
        }
        let file =
            file.ok_or_else(|| self.err(n.pos(), format!("track_file {name} has no file")))?;
        Ok(TrackFile {
            name,
            file,
            weight,
            reverse,
            loc,
        })
    }

    fn vrrp_script(&mut self, n: &Node) -> R<VrrpScript> {
        let name = self.block_name(n)?;
        let mut script: Option<Script> = None;
        let (mut user, mut group) = (None, None);
        let mut interval = Duration::from_secs(1);
        let mut timeout = None;
        let (mut weight, mut weight_reverse) = (0, false);
        let (mut rise, mut fall) = (1, 1);
        let mut init_fail = false;
        for c in self.block(n)? {
            match c.name() {
                "script" => {
                    script = Some(Script {
                        command: self.string(c)?,
                        ..Script::default()
                    })
                }
                "interval" => {
                    interval = self.timer(c)?;
                    if interval.is_zero() {
                        return Err(self.err(c.pos(), "interval must be more than 0 seconds"));
                    }
                }
                "timeout" => timeout = Some(self.timer(c)?),
                "weight" => (weight, weight_reverse) = self.weight_reverse(c, 253)?,
                "rise" => rise = self.u32_of(c, 1, u32::MAX)?,
                "fall" => fall = self.u32_of(c, 1, u32::MAX)?,
                "user" => {
                    let a = self.leaf(c, 1, 2)?;
                    user = Some(a[0].text.clone());
                    group = a.get(1).map(|w| w.text.clone());
                }
                "init_fail" => {
                    self.leaf(c, 0, 0)?;
                    init_fail = true;
                }
                _ => self.unsupported(c, "in vrrp_script"),
            }
        }
        let Some(mut script) = script else {
            return Err(self.err(n.pos(), format!("vrrp_script {name} has no \"script\"")));
        };
        script.user = user;
        script.group = group;
        Ok(VrrpScript {
            name,
            script,
            interval,
            timeout: timeout.unwrap_or(interval),
            weight,
            weight_reverse,
            rise,
            fall,
            init_fail,
            loc: self.loc(n.pos()),
        })
    }

    /// Lines `NAME [weight W [reverse|noreverse]]`.
    fn tracks(&mut self, n: &Node, max_weight: i64) -> R<Vec<TrackEntry>> {
        let mut out = Vec::new();
        for line in self.block(n)? {
            let a = self.leaf(line, 0, 3)?;
            let mut t = TrackEntry {
                name: line.name().to_string(),
                weight: None,
                reverse: false,
                loc: self.loc(line.pos()),
            };
            let mut i = 0;
            while i < a.len() {
                match a[i].text.as_str() {
                    "weight" => {
                        let w = a.get(i + 1).ok_or_else(|| {
                            self.err(a[i].pos, format!("{}: weight needs a number", n.name()))
                        })?;
                        t.weight = Some(self.int(w, "weight", -max_weight, max_weight)? as i32);
                        i += 2;
                    }
                    "reverse" => {
                        t.reverse = true;
                        i += 1;
                    }
                    "noreverse" => i += 1,
                    x => {
                        return Err(self.err(
                            a[i].pos,
                            format!(
                                "{}: \"{x}\" is not \"weight N\", \"reverse\" or \"noreverse\"",
                                n.name()
                            ),
                        ));
                    }
                }
            }
            out.push(t);
        }
        Ok(out)
    }

    fn vip(&mut self, line: &Node) -> R<VirtualIp> {
        if line.block.is_some() {
            return Err(self.err(line.pos(), "a virtual_ipaddress entry takes no { } block"));
        }
        let first = &line.words[0];
        let (a, len) = match first.text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (first.text.as_str(), None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            self.err(
                first.pos,
                format!("virtual_ipaddress \"{}\" is not an IP address", first.text),
            )
        })?;
        let prefix = match len {
            None => None,
            Some(l) => Some(
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= host_bits(addr))
                    .ok_or_else(|| {
                        self.err(
                            first.pos,
                            format!(
                                "virtual_ipaddress \"{}\": the prefix length must be 0 to {}",
                                first.text,
                                host_bits(addr)
                            ),
                        )
                    })?,
            ),
        };
        let mut v = VirtualIp {
            addr,
            prefix,
            dev: None,
            label: None,
            broadcast: None,
            scope: None,
            no_track: false,
            options: Vec::new(),
            loc: self.loc(first.pos),
        };
        let rest = line.args();
        let mut i = 0;
        while i < rest.len() {
            let key = rest[i].text.as_str();
            let slot = match key {
                "dev" => Some(&mut v.dev),
                "label" => Some(&mut v.label),
                "brd" | "broadcast" => Some(&mut v.broadcast),
                "scope" => Some(&mut v.scope),
                _ => None,
            };
            match slot {
                Some(slot) => {
                    let Some(value) = rest.get(i + 1) else {
                        return Err(self.err(
                            rest[i].pos,
                            format!("virtual_ipaddress {}: \"{key}\" needs a value", first.text),
                        ));
                    };
                    *slot = Some(value.text.clone());
                    i += 2;
                }
                None => {
                    if key == "no_track" {
                        v.no_track = true;
                    } else {
                        v.options.push(key.to_string());
                    }
                    i += 1;
                }
            }
        }
        Ok(v)
    }

    fn vrrp_instance(&mut self, n: &Node) -> R<VrrpInstance> {
        let mut v = VrrpInstance {
            name: self.block_name(n)?,
            loc: self.loc(n.pos()),
            advert_int: Duration::from_secs(1),
            ..VrrpInstance::default()
        };
        for c in self.block(n)? {
            match c.name() {
                "state" => {
                    let a = self.leaf(c, 1, 1)?;
                    v.state = Some(match a[0].text.as_str() {
                        "MASTER" => VrrpState::Master,
                        "BACKUP" => VrrpState::Backup,
                        x => {
                            return Err(self
                                .err(a[0].pos, format!("state \"{x}\" is not MASTER or BACKUP")));
                        }
                    });
                }
                "interface" => {
                    let name = self.string(c)?;
                    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                        return Err(self.err(
                            c.args()[0].pos,
                            format!("\"{name}\" is not a valid interface name"),
                        ));
                    }
                    v.interface = Some(self.located(c.args()[0].pos, name));
                }
                "virtual_router_id" => v.virtual_router_id = self.u32_of(c, 1, 255)? as u8,
                "priority" => v.priority = Some(self.u32_of(c, 1, 255)? as u8),
                "advert_int" => {
                    let t = self.timer(c)?;
                    if t < Duration::from_millis(10) || t > Duration::from_secs(255) {
                        return Err(self.err(
                            c.args()[0].pos,
                            format!(
                                "advert_int \"{}\" is not between 0.01 and 255 seconds",
                                c.args()[0].text
                            ),
                        ));
                    }
                    v.advert_int = t;
                }
                "version" => v.version = Some(self.u32_of(c, 2, 3)? as u8),
                "nopreempt" => {
                    self.leaf(c, 0, 0)?;
                    v.nopreempt = true;
                }
                "preempt" => {
                    self.leaf(c, 0, 0)?;
                }
                "preempt_delay" => {
                    let t = self.timer(c)?;
                    if t > Duration::from_secs(1000) {
                        return Err(self.err(c.pos(), "preempt_delay must be 0 to 1000 seconds"));
                    }
                    v.preempt_delay = Some(t);
                }
                "native_ipv6" => {
                    self.leaf(c, 0, 0)?;
                    v.native_ipv6 = true;
                }
                "dont_track_primary" => {
                    self.leaf(c, 0, 0)?;
                    v.dont_track_primary = true;
                }
                "mcast_src_ip" => v.mcast_src_ip = Some(self.ip_of(c)?),
                "unicast_src_ip" => v.unicast_src_ip = Some(self.ip_of(c)?),
                "unicast_peer" => {
                    for line in self.block(c)? {
                        let a = self.leaf(line, 0, 16)?;
                        let mut peer = UnicastPeer {
                            addr: self.ip(&line.words[0], "unicast_peer")?,
                            min_ttl: None,
                            max_ttl: None,
                        };
                        let mut i = 0;
                        while i < a.len() {
                            match a[i].text.as_str() {
                                k @ ("min_ttl" | "max_ttl") => {
                                    let w = a.get(i + 1).ok_or_else(|| {
                                        self.err(
                                            a[i].pos,
                                            format!("unicast_peer: {k} needs a number"),
                                        )
                                    })?;
                                    let t = Some(self.uint(w, k, 0, 255)? as u8);
                                    if k == "min_ttl" {
                                        peer.min_ttl = t;
                                    } else {
                                        peer.max_ttl = t;
                                    }
                                    i += 2;
                                }
                                // Several peers on one line.
                                _ => {
                                    v.unicast_peers.push(peer);
                                    peer = UnicastPeer {
                                        addr: self.ip(&a[i], "unicast_peer")?,
                                        min_ttl: None,
                                        max_ttl: None,
                                    };
                                    i += 1;
                                }
                            }
                        }
                        v.unicast_peers.push(peer);
                    }
                }
                "unicast_ttl" => v.unicast_ttl = Some(self.u32_of(c, 1, 255)? as u8),
                "check_unicast_src" => {
                    self.leaf(c, 0, 0)?;
                    v.check_unicast_src = true;
                }
                "authentication" => v.authentication = Some(self.authentication(c)?),
                "virtual_ipaddress" => {
                    for line in self.block(c)? {
                        v.virtual_ipaddress.push(self.vip(line)?);
                    }
                }
                "virtual_ipaddress_excluded" => {
                    for line in self.block(c)? {
                        v.virtual_ipaddress_excluded.push(self.vip(line)?);
                    }
                }
                "track_script" => v.track_script.extend(self.tracks(c, 253)?),
                "track_interface" => v.track_interface.extend(self.tracks(c, 253)?),
                "notify_master" => v.notify_master = Some(self.script(c)?),
                "notify_backup" => v.notify_backup = Some(self.script(c)?),
                "notify_fault" => v.notify_fault = Some(self.script(c)?),
                "notify_stop" => v.notify_stop = Some(self.script(c)?),
                "notify" => v.notify = Some(self.script(c)?),
                "garp_master_delay" => v.garp_master_delay = Some(self.u32_of(c, 0, 1000)?),
                "garp_master_repeat" => v.garp_master_repeat = Some(self.u32_of(c, 0, 1000)?),
                "garp_master_refresh" => {
                    v.garp_master_refresh = Some(self.u32_of(c, 0, u32::MAX)?)
                }
                "garp_master_refresh_repeat" => {
                    v.garp_master_refresh_repeat = Some(self.u32_of(c, 0, 1000)?)
                }
                "smtp_alert" => v.smtp_alert = Some(self.flag(c)?),
                "use_vmac" => {
                    let a = self.leaf(c, 0, 2)?;
                    v.use_vmac = Some(Vmac {
                        name: a.first().map(|w| w.text.clone()),
                        mac: a.get(1).map(|w| w.text.clone()),
                    });
                }
                "vmac_xmit_base" => {
                    self.leaf(c, 0, 0)?;
                    v.vmac_xmit_base = true;
                }
                "accept" => {
                    self.leaf(c, 0, 0)?;
                    v.accept = Some(true);
                }
                "no_accept" => {
                    self.leaf(c, 0, 0)?;
                    v.accept = Some(false);
                }
                "strict_mode" => v.strict_mode = Some(self.flag(c)?),
                "lower_prio_no_advert" => v.lower_prio_no_advert = Some(self.flag(c)?),
                "higher_prio_send_advert" => v.higher_prio_send_advert = Some(self.flag(c)?),
                "skip_check_adv_addr" => v.skip_check_adv_addr = Some(self.flag(c)?),
                "v3_checksum_as_v2" => v.v3_checksum_as_v2 = Some(self.flag(c)?),
                "down_timer_adverts" => v.down_timer_adverts = Some(self.u32_of(c, 1, 100)?),
                _ => self.unsupported(c, "in vrrp_instance"),
            }
        }
        if v.virtual_router_id == 0 {
            return Err(self.err(
                n.pos(),
                format!(
                    "vrrp_instance {} has no virtual_router_id (1 to 255)",
                    v.name
                ),
            ));
        }
        Ok(v)
    }

    fn authentication(&mut self, n: &Node) -> R<Authentication> {
        let (mut kind, mut pass) = (None, None);
        for c in self.block(n)? {
            match c.name() {
                "auth_type" => {
                    let a = self.leaf(c, 1, 1)?;
                    kind = Some(match a[0].text.as_str() {
                        "PASS" => AuthType::Pass,
                        "AH" => AuthType::Ah,
                        x => {
                            return Err(
                                self.err(a[0].pos, format!("auth_type \"{x}\" is not PASS or AH"))
                            );
                        }
                    });
                }
                "auth_pass" => {
                    let p = self.string(c)?;
                    if p.len() > 8 {
                        self.warn(
                            c.pos(),
                            "auth_pass is longer than 8 characters: only the first 8 are used (as keepalived does)",
                        );
                    }
                    pass = Some(p);
                }
                _ => self.unsupported(c, "in authentication"),
            }
        }
        match (kind, pass) {
            (Some(auth_type), Some(auth_pass)) if !auth_pass.is_empty() => Ok(Authentication {
                auth_type,
                auth_pass,
            }),
            (None, _) => Err(self.err(n.pos(), "authentication needs auth_type PASS or AH")),
            _ => Err(self.err(n.pos(), "authentication needs an auth_pass")),
        }
    }

    fn sync_group(&mut self, n: &Node) -> R<VrrpSyncGroup> {
        let mut g = VrrpSyncGroup {
            name: self.block_name(n)?,
            loc: self.loc(n.pos()),
            ..VrrpSyncGroup::default()
        };
        for c in self.block(n)? {
            match c.name() {
                "group" => {
                    let words = self.value_block(c)?;
                    g.group.extend(words.into_iter().map(|w| w.text.clone()));
                }
                "notify_master" => g.notify_master = Some(self.script(c)?),
                "notify_backup" => g.notify_backup = Some(self.script(c)?),
                "notify_fault" => g.notify_fault = Some(self.script(c)?),
                "notify_stop" => g.notify_stop = Some(self.script(c)?),
                "notify" => g.notify = Some(self.script(c)?),
                "track_script" => g.track_script.extend(self.tracks(c, 253)?),
                "track_interface" => g.track_interface.extend(self.tracks(c, 253)?),
                "sync_group_tracking_weight" => {
                    self.leaf(c, 0, 0)?;
                    g.sync_group_tracking_weight = true;
                }
                "smtp_alert" => g.smtp_alert = Some(self.flag(c)?),
                // Deprecated no-op.
                "global_tracking" => {}
                _ => self.unsupported(c, "in vrrp_sync_group"),
            }
        }
        if g.group.is_empty() {
            return Err(self.err(
                n.pos(),
                format!(
                    "vrrp_sync_group {} has no group {{ }} of vrrp_instances",
                    g.name
                ),
            ));
        }
        Ok(g)
    }

    fn vs_group(&mut self, n: &Node) -> R<VirtualServerGroup> {
        let name = self.block_name(n)?;
        let mut members = Vec::new();
        for line in self.block(n)? {
            let a = self.leaf(line, 0, 2)?;
            let loc = self.loc(line.pos());
            if line.name() == "fwmark" {
                let Some(m) = a.first() else {
                    return Err(self.err(line.pos(), "fwmark needs a mark number"));
                };
                let mark = self.uint(m, "fwmark", 0, u32::MAX as u64)? as u32;
                let family = match a.get(1).map(|w| w.text.as_str()) {
                    None => None,
                    Some("inet") => Some(Family::Inet),
                    Some("inet6") => Some(Family::Inet6),
                    Some(x) => {
                        return Err(self.err(
                            a[1].pos,
                            format!("fwmark family \"{x}\" is not inet or inet6"),
                        ));
                    }
                };
                members.push(GroupMember::Fwmark { mark, family, loc });
                continue;
            }
            if a.len() > 1 {
                self.warn(a[1].pos, "extra words after the address and port ignored");
            }
            let (first, last) = self.addr_range(&line.words[0])?;
            let port = match a.first() {
                Some(p) => self.port(p, "port")?,
                None => 0,
            };
            members.push(GroupMember::Range {
                first,
                last,
                port,
                loc,
            });
        }
        Ok(VirtualServerGroup {
            name,
            loc: self.loc(n.pos()),
            members,
        })
    }

    /// `IP`, `IP/LEN`, `IP-IP`, `A.B.C.D-E` (last octet), `X::Y-Z` (last group, hex).
    fn addr_range(&self, w: &Word) -> R<(IpAddr, IpAddr)> {
        let t = w.text.as_str();
        let bad = |why: &str| self.err(w.pos, format!("\"{t}\" {why}"));
        let ip = |s: &str| {
            s.parse::<IpAddr>()
                .map_err(|_| bad("is not an address, an address range or a prefix"))
        };
        if let Some((a, len)) = t.split_once('/') {
            let first = ip(a)?;
            let bits = host_bits(first) as u32;
            let len = len
                .parse::<u32>()
                .ok()
                .filter(|l| (1..=bits).contains(l))
                .ok_or_else(|| bad(&format!("has a prefix length outside 1 to {bits}")))?;
            let host = if len == 128 {
                0
            } else {
                (1u128 << (bits - len)) - 1
            };
            if addr_bits(first) & host != 0 {
                return Err(bad("has host bits set"));
            }
            return Ok((first, nth_addr(first, host)));
        }
        let Some((a, b)) = t.split_once('-') else {
            let one = ip(t)?;
            return Ok((one, one));
        };
        let first = ip(a)?;
        let last = if b.contains(['.', ':']) {
            let last = ip(b)?;
            if last.is_ipv4() != first.is_ipv4() {
                return Err(bad("mixes address families"));
            }
            last
        } else {
            match first {
                IpAddr::V4(v) => {
                    let end = b
                        .parse::<u8>()
                        .map_err(|_| bad("does not end with a last octet 0 to 255"))?;
                    let mut o = v.octets();
                    o[3] = end;
                    IpAddr::V4(o.into())
                }
                IpAddr::V6(v) => {
                    let end = u16::from_str_radix(b, 16)
                        .map_err(|_| bad("does not end with a last group 0 to ffff"))?;
                    let mut s = v.segments();
                    s[7] = end;
                    IpAddr::V6(s.into())
                }
            }
        };
        if addr_bits(last) < addr_bits(first) {
            return Err(bad("ends before it starts"));
        }
        Ok((first, last))
    }

    /// `lb_kind` / `lvs_method` values.
    fn method(&mut self, n: &Node) -> R<Located<LvsMethod>> {
        let a = self.leaf(n, 1, 6)?;
        let m = match a[0].text.as_str() {
            "NAT" | "DR" if a.len() > 1 => {
                self.warn(
                    a[1].pos,
                    format!("extra words after \"{}\" ignored", n.name()),
                );
                if a[0].text == "NAT" {
                    LvsMethod::Nat
                } else {
                    LvsMethod::Dr
                }
            }
            "NAT" => LvsMethod::Nat,
            "DR" => LvsMethod::Dr,
            "TUN" => self.tun(&a[1..], n.name())?,
            x => {
                return Err(self.err(
                    a[0].pos,
                    format!("{} \"{x}\" is not one of NAT, DR, TUN", n.name()),
                ));
            }
        };
        Ok(self.located(a[0].pos, m))
    }

    /// The options after `TUN`, with ipvsadm's rules for which go with which type.
    fn tun(&self, a: &[Word], what: &str) -> R<LvsMethod> {
        let (mut kind, mut port, mut checksum) = (TunnelType::Ipip, None, None);
        let mut i = 0;
        while i < a.len() {
            let w = &a[i];
            match w.text.as_str() {
                "type" => {
                    let t = a.get(i + 1).ok_or_else(|| {
                        self.err(w.pos, format!("{what} TUN type needs ipip, gue or gre"))
                    })?;
                    kind = match t.text.as_str() {
                        "ipip" => TunnelType::Ipip,
                        "gue" => TunnelType::Gue,
                        "gre" => TunnelType::Gre,
                        x => {
                            return Err(self.err(
                                t.pos,
                                format!("tunnel type \"{x}\" is not one of ipip, gue, gre"),
                            ));
                        }
                    };
                    i += 2;
                }
                "port" => {
                    let p = a.get(i + 1).ok_or_else(|| {
                        self.err(w.pos, format!("{what} TUN port needs a number"))
                    })?;
                    port = Some((self.uint(p, "tunnel port", 1, 65535)? as u16, p.pos));
                    i += 2;
                }
                "nocsum" | "csum" | "remcsum" => {
                    checksum = Some((
                        match w.text.as_str() {
                            "nocsum" => TunnelChecksum::None,
                            "csum" => TunnelChecksum::Csum,
                            _ => TunnelChecksum::Remcsum,
                        },
                        w.pos,
                    ));
                    i += 1;
                }
                x => {
                    return Err(self.err(
                        w.pos,
                        format!("{what} TUN: \"{x}\" is not type, port, nocsum, csum or remcsum"),
                    ));
                }
            }
        }
        let port = match (kind, port) {
            (TunnelType::Gue, Some((p, _))) => p,
            (TunnelType::Gue, None) => {
                return Err(self.err(a[0].pos, "a gue tunnel needs a port (type gue port N)"));
            }
            (_, Some((_, at))) => {
                return Err(self.err(
                    at,
                    format!("a {} tunnel takes no port (only gue does)", kind.name()),
                ));
            }
            (_, None) => 0,
        };
        let checksum = match checksum {
            None => TunnelChecksum::None,
            Some((c, at)) => {
                if !kind.allows(c) {
                    return Err(self.err(
                        at,
                        format!(
                            "a {} tunnel does not take this checksum option",
                            kind.name()
                        ),
                    ));
                }
                c
            }
        };
        Ok(LvsMethod::Tun {
            kind,
            port,
            checksum,
        })
    }

    fn virtual_server(&mut self, n: &Node) -> R<VirtualServer> {
        let a = n.args();
        let used;
        let target = match a.first().map(|w| w.text.as_str()) {
            None => {
                return Err(self.err(
                    n.pos(),
                    "virtual_server needs an address and port, \"fwmark N\" or \"group NAME\"",
                ));
            }
            Some("fwmark") => {
                let m = a.get(1).ok_or_else(|| {
                    self.err(n.pos(), "virtual_server fwmark needs a mark number")
                })?;
                used = 2;
                VsTarget::Fwmark {
                    mark: self.uint(m, "fwmark", 0, u32::MAX as u64)? as u32,
                }
            }
            Some("group") => {
                let g = a
                    .get(1)
                    .ok_or_else(|| self.err(n.pos(), "virtual_server group needs a group name"))?;
                used = 2;
                VsTarget::Group(g.text.clone())
            }
            Some(_) => {
                let addr = self.ip(&a[0], "virtual_server address")?;
                let port = match a.get(1) {
                    Some(p) => self.port(p, "virtual_server port")?,
                    None => 0,
                };
                used = 2;
                VsTarget::Address { addr, port }
            }
        };
        if a.len() > used {
            self.warn(a[used].pos, "extra words after virtual_server ignored");
        }
        let body = self.block(n)?;
        let mut vs = VirtualServer::new(target, self.loc(n.pos()));
        for c in body {
            match c.name() {
                "delay_loop" => vs.delay_loop = Some(self.timer(c)?),
                "lb_algo" | "lvs_sched" => {
                    let a = self.leaf(c, 1, 1)?;
                    let s = a[0].text.parse::<Scheduler>().map_err(|m| {
                        self.err(
                            a[0].pos,
                            format!("{m}; IPVS schedulers are rr, wrr, lc, wlc, sed, nq, sh, dh, mh, lblc, lblcr, fo, ovf, twos"),
                        )
                    })?;
                    vs.lb_algo = Some(self.located(a[0].pos, s));
                }
                "lb_kind" | "lvs_method" => vs.lb_kind = Some(self.method(c)?),
                "protocol" => {
                    let a = self.leaf(c, 1, 1)?;
                    let p = match a[0].text.to_ascii_uppercase().as_str() {
                        "TCP" => VsProtocol::Tcp,
                        "UDP" => VsProtocol::Udp,
                        "SCTP" => VsProtocol::Sctp,
                        _ => {
                            return Err(self.err(
                                a[0].pos,
                                format!("protocol \"{}\" is not one of TCP, UDP, SCTP", a[0].text),
                            ));
                        }
                    };
                    vs.protocol = Some(self.located(a[0].pos, p));
                }
                "persistence_timeout" => {
                    let a = self.leaf(c, 0, 1)?;
                    let t = match a.first() {
                        None => DEFAULT_PERSISTENCE_TIMEOUT,
                        Some(w) => {
                            self.uint(w, "persistence_timeout", 1, MAX_PERSISTENCE_TIMEOUT as u64)?
                                as u32
                        }
                    };
                    vs.persistence_timeout = Some(self.located(c.pos(), t));
                }
                "persistence_granularity" => {
                    let a = self.leaf(c, 1, 1)?;
                    let g = self.granularity(&a[0])?;
                    vs.persistence_granularity = Some(self.located(a[0].pos, g));
                }
                "persistence_engine" => vs.persistence_engine = Some(self.string(c)?),
                "ops" | "hashed" | "flag-1" | "flag-2" | "flag-3" | "sh-port" | "sh-fallback"
                | "mh-port" | "mh-fallback" => {
                    self.leaf(c, 0, 0)?;
                    vs.flags.push(self.located(c.pos(), c.name().to_string()));
                }
                "ha_suspend" => {
                    self.leaf(c, 0, 0)?;
                    vs.ha_suspend = true;
                }
                "virtualhost" => vs.virtualhost = Some(self.string(c)?),
                "alpha" => vs.alpha = self.flag(c)?,
                "omega" => vs.omega = self.flag(c)?,
                "quorum" => vs.quorum = Some(self.u32_of(c, 1, u32::MAX)?),
                "hysteresis" => vs.hysteresis = Some(self.u32_of(c, 0, u32::MAX)?),
                "quorum_up" => vs.quorum_up = Some(self.script(c)?),
                "quorum_down" => vs.quorum_down = Some(self.script(c)?),
                "sorry_server" => {
                    let a = self.leaf(c, 1, 2)?;
                    vs.sorry_server = Some(SorryServer {
                        addr: self.ip(&a[0], "sorry_server")?,
                        port: match a.get(1) {
                            Some(p) => Some(self.port(p, "sorry_server port")?),
                            None => None,
                        },
                        inhibit: false,
                        method: None,
                        loc: self.loc(c.pos()),
                    });
                }
                "sorry_server_inhibit" => {
                    self.leaf(c, 0, 0)?;
                    match &mut vs.sorry_server {
                        Some(s) => s.inhibit = true,
                        None => self.warn(c.pos(), "sorry_server_inhibit before or without sorry_server; ignored (as keepalived does)"),
                    }
                }
                "sorry_server_lvs_method" => {
                    let m = self.method(c)?.value;
                    match &mut vs.sorry_server {
                        Some(s) => s.method = Some(m),
                        None => self.warn(c.pos(), "sorry_server_lvs_method before or without sorry_server; ignored (as keepalived does)"),
                    }
                }
                "inhibit_on_failure" => vs.inhibit_on_failure = self.flag(c)?,
                "weight" => {
                    let a = self.leaf(c, 1, 1)?;
                    let w = self.uint(&a[0], "weight", 0, i32::MAX as u64)? as u32;
                    vs.weight = Some(self.located(a[0].pos, w));
                }
                "connect_timeout" => vs.connect_timeout = Some(self.timer(c)?),
                "retry" => vs.retry = Some(self.u32_of(c, 0, u32::MAX)?),
                "delay_before_retry" => vs.delay_before_retry = Some(self.timer(c)?),
                "warmup" => vs.warmup = Some(self.timer(c)?),
                "ip_family" => {
                    let a = self.leaf(c, 1, 1)?;
                    vs.ip_family = Some(match a[0].text.as_str() {
                        "inet" => Family::Inet,
                        "inet6" => Family::Inet6,
                        x => {
                            return Err(self
                                .err(a[0].pos, format!("ip_family \"{x}\" is not inet or inet6")));
                        }
                    });
                }
                "smtp_alert" => vs.smtp_alert = Some(self.flag(c)?),
                "real_server" => {
                    let rs = self.real_server(c)?;
                    vs.real_servers.push(rs);
                }
                _ => self.unsupported(c, "in virtual_server"),
            }
        }
        Ok(vs)
    }

    fn granularity(&self, w: &Word) -> R<Granularity> {
        if w.text.contains('.') {
            let mask: Ipv4Addr = w.text.parse().map_err(|_| {
                self.err(
                    w.pos,
                    format!(
                        "persistence_granularity \"{}\" is not a netmask like 255.255.255.0",
                        w.text
                    ),
                )
            })?;
            let bits = u32::from(mask);
            if bits == 0 || bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(self.err(
                    w.pos,
                    format!(
                        "persistence_granularity {} is not contiguous ones followed by zeros",
                        w.text
                    ),
                ));
            }
            return Ok(Granularity::Netmask(bits.leading_ones() as u8));
        }
        Ok(Granularity::PrefixLength(
            self.uint(w, "persistence_granularity", 1, 128)? as u8,
        ))
    }

    fn real_server(&mut self, n: &Node) -> R<RealServer> {
        let a = n.args();
        let Some(first) = a.first() else {
            return Err(self.err(n.pos(), "real_server needs an address"));
        };
        let addr = self.ip(first, "real_server address")?;
        let port = match a.get(1) {
            Some(p) => Some(self.port(p, "real_server port")?),
            None => None,
        };
        if a.len() > 2 {
            self.warn(a[2].pos, "extra words after real_server ignored");
        }
        let mut rs = RealServer {
            addr,
            port,
            loc: self.loc(n.pos()),
            weight: None,
            method: None,
            uthreshold: None,
            lthreshold: None,
            inhibit_on_failure: None,
            notify_up: None,
            notify_down: None,
            alpha: None,
            retry: None,
            delay_before_retry: None,
            warmup: None,
            connect_timeout: None,
            delay_loop: None,
            virtualhost: None,
            smtp_alert: None,
            checkers: Vec::new(),
        };
        for c in n.block.as_deref().unwrap_or(&[]) {
            match c.name() {
                "weight" => {
                    let a = self.leaf(c, 1, 1)?;
                    let w = self.uint(&a[0], "weight", 0, i32::MAX as u64)? as u32;
                    rs.weight = Some(self.located(a[0].pos, w));
                }
                "lvs_method" | "lb_kind" => rs.method = Some(self.method(c)?),
                "uthreshold" | "lthreshold" => {
                    let a = self.leaf(c, 1, 1)?;
                    let v = self.uint(&a[0], c.name(), 0, i32::MAX as u64)? as u32;
                    let v = Some(self.located(a[0].pos, v));
                    if c.name() == "uthreshold" {
                        rs.uthreshold = v;
                    } else {
                        rs.lthreshold = v;
                    }
                }
                "inhibit_on_failure" => rs.inhibit_on_failure = Some(self.flag(c)?),
                "notify_up" => rs.notify_up = Some(self.script(c)?),
                "notify_down" => rs.notify_down = Some(self.script(c)?),
                "alpha" => rs.alpha = Some(self.flag(c)?),
                "retry" | "nb_get_retry" => rs.retry = Some(self.u32_of(c, 0, u32::MAX)?),
                "delay_before_retry" => rs.delay_before_retry = Some(self.timer(c)?),
                "warmup" => rs.warmup = Some(self.timer(c)?),
                "connect_timeout" => rs.connect_timeout = Some(self.timer(c)?),
                "delay_loop" => rs.delay_loop = Some(self.timer(c)?),
                "virtualhost" => rs.virtualhost = Some(self.string(c)?),
                "smtp_alert" => rs.smtp_alert = Some(self.flag(c)?),
                "TCP_CHECK" | "HTTP_GET" | "SSL_GET" | "SMTP_CHECK" | "DNS_CHECK" | "UDP_CHECK"
                | "PING_CHECK" | "FILE_CHECK" | "MISC_CHECK" => {
                    let ck = self.checker(c)?;
                    rs.checkers.push(ck);
                }
                _ => self.unsupported(c, "in real_server"),
            }
        }
        Ok(rs)
    }

    fn checker(&mut self, n: &Node) -> R<Checker> {
        let name = n.name();
        let mut kind = match name {
            "TCP_CHECK" => CheckerKind::Tcp,
            "HTTP_GET" => CheckerKind::Http(HttpCheck::default()),
            "SSL_GET" => CheckerKind::Ssl(HttpCheck::default()),
            "SMTP_CHECK" => CheckerKind::Smtp(SmtpCheck::default()),
            "DNS_CHECK" => CheckerKind::Dns(DnsCheck::default()),
            "UDP_CHECK" => CheckerKind::Udp(UdpCheck::default()),
            "PING_CHECK" => CheckerKind::Ping,
            "FILE_CHECK" => CheckerKind::File(FileCheck::default()),
            _ => CheckerKind::Misc(MiscCheck::default()),
        };
        if let Some(w) = n.args().first() {
            self.warn(w.pos, format!("extra words after {name} ignored"));
        }
        let connects = !matches!(kind, CheckerKind::Misc(_) | CheckerKind::File(_));
        let mut common = CheckCommon::default();
        let (mut misc_user, mut misc_path) = (None, false);
        for c in n.block.as_deref().unwrap_or(&[]) {
            if self.check_common(c, &mut common, connects)? {
                continue;
            }
            let handled = match &mut kind {
                CheckerKind::Http(h) | CheckerKind::Ssl(h) => self.http_option(c, h)?,
                CheckerKind::Smtp(s) if c.name() == "helo_name" => {
                    s.helo_name = Some(self.string(c)?);
                    true
                }
                CheckerKind::Dns(d) => match c.name() {
                    "type" => {
                        let a = self.leaf(c, 1, 1)?;
                        let t = a[0].text.to_ascii_uppercase();
                        let types = &crate::health::config::DNS_TYPES;
                        if !types.iter().any(|(name, _)| *name == t) {
                            let names: Vec<&str> = types.iter().map(|(name, _)| *name).collect();
                            return Err(self.err(
                                a[0].pos,
                                format!(
                                    "DNS_CHECK type \"{}\" is not one of {}",
                                    a[0].text,
                                    names.join(", ")
                                ),
                            ));
                        }
                        d.query_type = Some(t);
                        true
                    }
                    "name" => {
                        d.name = Some(self.string(c)?);
                        true
                    }
                    _ => false,
                },
                CheckerKind::Udp(u) => match c.name() {
                    "payload" => {
                        u.payload = Some(self.string(c)?);
                        true
                    }
                    "require_reply" => {
                        let a = self.leaf(c, 0, 1)?;
                        u.require_reply = true;
                        u.reply = a.first().map(|w| w.text.clone());
                        true
                    }
                    "min_reply_length" => {
                        u.min_reply_length = Some(self.u32_of(c, 0, 65535)?);
                        true
                    }
                    "max_reply_length" => {
                        u.max_reply_length = Some(self.u32_of(c, 0, 65535)?);
                        true
                    }
                    _ => false,
                },
                CheckerKind::File(f) => match c.name() {
                    "track_file" => {
                        f.track_file = self.string(c)?;
                        true
                    }
                    "weight" => {
                        let a = self.leaf(c, 1, 2)?;
                        f.weight = Some(self.int(&a[0], "weight", -254, 254)? as i32);
                        f.reverse = a.get(1).is_some_and(|w| w.text == "reverse");
                        true
                    }
                    _ => false,
                },
                CheckerKind::Misc(m) => match c.name() {
                    "misc_path" => {
                        m.script.command = self.string(c)?;
                        misc_path = true;
                        true
                    }
                    "misc_timeout" => {
                        m.timeout = Some(self.timer(c)?);
                        true
                    }
                    "misc_dynamic" => {
                        m.dynamic = self.flag(c)?;
                        true
                    }
                    "user" => {
                        let a = self.leaf(c, 1, 2)?;
                        misc_user = Some((a[0].text.clone(), a.get(1).map(|w| w.text.clone())));
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if !handled {
                self.unsupported(c, &format!("in {name}"));
            }
        }
        match &mut kind {
            CheckerKind::Misc(m) => {
                if !misc_path {
                    return Err(self.err(n.pos(), "MISC_CHECK needs a misc_path"));
                }
                if let Some((u, g)) = misc_user {
                    m.script.user = Some(u);
                    m.script.group = g;
                }
            }
            CheckerKind::File(f) if f.track_file.is_empty() => {
                return Err(self.err(n.pos(), "FILE_CHECK needs a track_file"));
            }
            _ => {}
        }
        Ok(Checker {
            kind,
            common,
            loc: self.loc(n.pos()),
        })
    }

    /// The keywords all checkers share; `false`: not one of them.
    fn check_common(&mut self, c: &Node, k: &mut CheckCommon, connects: bool) -> R<bool> {
        match c.name() {
            "connect_ip" if connects => k.connect_ip = Some(self.ip_of(c)?),
            "connect_port" if connects => {
                let a = self.leaf(c, 1, 1)?;
                k.connect_port = Some(self.port(&a[0], "connect_port")?);
            }
            "bindto" if connects => k.bindto = Some(self.ip_of(c)?),
            "bind_port" if connects => {
                let a = self.leaf(c, 1, 1)?;
                k.bind_port = Some(self.port(&a[0], "bind_port")?);
            }
            "bind_if" if connects => k.bind_if = Some(self.string(c)?),
            "fwmark" if connects => k.fwmark = Some(self.u32_of(c, 0, u32::MAX)?),
            "connect_timeout" if connects => k.connect_timeout = Some(self.timer(c)?),
            "retry" | "nb_get_retry" => k.retry = Some(self.u32_of(c, 0, u32::MAX)?),
            "delay_before_retry" => k.delay_before_retry = Some(self.timer(c)?),
            "warmup" => k.warmup = Some(self.timer(c)?),
            "delay_loop" => k.delay_loop = Some(self.timer(c)?),
            "alpha" => k.alpha = Some(self.flag(c)?),
            "log_all_failures" => k.log_all_failures = Some(self.flag(c)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn http_option(&mut self, c: &Node, h: &mut HttpCheck) -> R<bool> {
        match c.name() {
            "url" => {
                if let Some(u) = self.url(c)? {
                    h.urls.push(u);
                }
            }
            "http_protocol" => {
                let a = self.leaf(c, 1, 1)?;
                let p = a[0].text.as_str();
                if !matches!(p, "1.0" | "1.0C" | "1.0c" | "1.1") {
                    return Err(self.err(
                        a[0].pos,
                        format!("http_protocol \"{p}\" is not 1.0, 1.0C or 1.1"),
                    ));
                }
                h.http_protocol = Some(p.to_ascii_uppercase());
            }
            "virtualhost" => h.virtualhost = Some(self.string(c)?),
            "fast_recovery" => h.fast_recovery = self.flag(c)?,
            "enable_sni" => h.enable_sni = Some(self.flag(c)?),
            "sni_name" => h.sni_name = Some(self.string(c)?),
            "tls_compliant" => h.tls_compliant = Some(self.flag(c)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// A `url { }` block; `None`: without a path (keepalived drops it).
    fn url(&mut self, n: &Node) -> R<Option<Url>> {
        let mut u = Url {
            path: String::new(),
            digest: None,
            status_codes: Vec::new(),
            virtualhost: None,
            regex: None,
            regex_no_match: false,
            loc: self.loc(n.pos()),
        };
        for c in self.block(n)? {
            match c.name() {
                "path" => u.path = self.string(c)?,
                "digest" => {
                    let a = self.leaf(c, 1, 1)?;
                    let d = &a[0].text;
                    if d.len() != 32 || !d.chars().all(|x| x.is_ascii_hexdigit()) {
                        return Err(self.err(
                            a[0].pos,
                            format!("digest \"{d}\" is not an MD5 sum (32 hex digits)"),
                        ));
                    }
                    u.digest = Some(d.to_ascii_lowercase());
                }
                "status_code" => {
                    let a = self.leaf(c, 1, usize::MAX)?;
                    for w in a {
                        let (lo, hi) = match w.text.split_once('-') {
                            Some((lo, hi)) => (lo, hi),
                            None => (w.text.as_str(), w.text.as_str()),
                        };
                        let range =
                            lo.parse::<u16>().ok().zip(hi.parse::<u16>().ok()).filter(
                                |(lo, hi)| (100..=599).contains(lo) && lo <= hi && *hi <= 599,
                            );
                        let Some(r) = range else {
                            return Err(self.err(
                                w.pos,
                                format!(
                                    "status_code \"{}\" is not a code or range within 100-599",
                                    w.text
                                ),
                            ));
                        };
                        u.status_codes.push(r);
                    }
                }
                "virtualhost" => u.virtualhost = Some(self.string(c)?),
                "regex" => u.regex = Some(self.string(c)?),
                "regex_no_match" => {
                    self.leaf(c, 0, 0)?;
                    u.regex_no_match = true;
                }
                _ => self.unsupported(c, "in url"),
            }
        }
        if u.path.is_empty() {
            self.warn(n.pos(), "url without a path; ignored (as keepalived does)");
            return Ok(None);
        }
        Ok(Some(u))
    }

    fn ssl(&mut self, n: &Node) -> R<SslContext> {
        let mut s = SslContext::default();
        for c in self.block(n)? {
            match c.name() {
                "password" => s.password = Some(self.string(c)?),
                "ca" => s.ca = Some(self.string(c)?),
                "certificate" => s.certificate = Some(self.string(c)?),
                "key" => s.key = Some(self.string(c)?),
                _ => self.unsupported(c, "in SSL"),
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn p(text: &str) -> Result<Keepalived, ConfigError> {
        parse_str(Path::new("keepalived.conf"), text)
    }

    /// 1-based line of the first line containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        text.lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} not in text"))
            + 1
    }

    const TWO_NODE: &str = include_str!("../fuzz-corpus/keepalived/two-node-a.conf");

    /// The services as xlb's TOML: whatever `services()` makes must pass xlb's own parser
    /// and come out the same.
    /// Through xlb's own writer and parser: what the conversion produces is a valid
    /// configuration that reads back the same (health checks included).
    fn through_toml(services: &[ServiceConfig]) -> Vec<ServiceConfig> {
        let mut t = String::from("[dataplane]\ninterfaces = [\"eth0\"]\n");
        for s in services {
            crate::render::service(&mut t, s);
        }
        crate::config::parse(Path::new("through.toml"), &t)
            .unwrap_or_else(|e| panic!("{e}\n{t}"))
            .services
    }

    #[test]
    fn the_two_node_config() {
        let k = p(TWO_NODE).unwrap();
        assert_eq!(k.warnings, vec![], "{:?}", k.warnings);
        let g = &k.global_defs;
        assert_eq!(g.router_id.as_deref(), Some("lb-a"));
        assert_eq!(g.script_user.as_deref(), Some("root"));
        assert!(g.enable_script_security);
        assert_eq!(g.notification_email, vec!["ops@example.com"]);
        assert_eq!(g.raw[0].name, "notification_email_from");
        assert_eq!(g.raw[0].args, vec!["lb-a@example.com"]);
        assert_eq!(
            k.timeouts(),
            Some(Timeouts {
                tcp: 7200,
                tcp_fin: 120,
                udp: 300
            })
        );

        let s = &k.vrrp_scripts[0];
        assert_eq!(s.name, "chk_nginx");
        assert_eq!(s.script.argv(), vec!["/usr/bin/pgrep", "-x", "nginx"]);
        assert_eq!(
            (s.interval, s.timeout, s.weight, s.fall, s.rise),
            (Duration::from_secs(2), Duration::from_secs(1), -20, 2, 1)
        );

        let v = &k.vrrp_instances[0];
        assert_eq!(v.name, "VI_1");
        assert_eq!(v.loc.line, line_of(TWO_NODE, "vrrp_instance VI_1"));
        assert_eq!(v.state, Some(VrrpState::Backup));
        assert_eq!(v.interface.as_ref().unwrap().value, "eth0");
        assert_eq!(
            (v.virtual_router_id, v.effective_priority(), v.advert_int),
            (51, 150, Duration::from_secs(1))
        );
        assert!(v.nopreempt);
        assert_eq!(v.unicast_src_ip, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            v.unicast_peers,
            vec![UnicastPeer {
                addr: "10.0.0.2".parse().unwrap(),
                min_ttl: None,
                max_ttl: None
            }]
        );
        let auth = v.authentication.as_ref().unwrap();
        assert_eq!(auth.auth_type, AuthType::Pass);
        assert_eq!(auth.pass_bytes(), *b"1111\0\0\0\0");
        assert_eq!(v.track_script[0].name, "chk_nginx");
        let vip = &v.virtual_ipaddress[0];
        assert_eq!(
            (
                vip.addr,
                vip.prefix,
                vip.dev.as_deref(),
                vip.label.as_deref()
            ),
            (
                "192.168.1.10".parse().unwrap(),
                Some(24),
                Some("eth0"),
                Some("eth0:1")
            )
        );
        assert_eq!(
            v.notify_master.as_ref().unwrap().argv(),
            vec!["/etc/keepalived/notify.sh", "master"]
        );
        assert_eq!(k.vrrp_interfaces(), vec!["eth0"]);

        let vs = &k.virtual_servers[0];
        assert_eq!(
            vs.loc.line,
            line_of(TWO_NODE, "virtual_server 192.168.1.10 80")
        );
        assert_eq!(vs.loc.file, "keepalived.conf");
        assert!(vs.inhibit_on_failure);
        assert_eq!(
            vs.sorry_server.as_ref().map(|s| (s.addr, s.port)),
            Some(("192.168.1.100".parse().unwrap(), Some(80)))
        );
        let rs = &vs.real_servers[1];
        assert_eq!(rs.loc.line, line_of(TWO_NODE, "real_server 192.168.1.12"));
        assert!(rs.inhibit(vs));
        assert_eq!(rs.checkers.len(), 2);
        let http = &rs.checkers[1];
        assert_eq!(http.loc.line, line_of(TWO_NODE, "HTTP_GET"));
        let CheckerKind::Http(h) = &http.kind else {
            panic!("{:?}", http.kind)
        };
        assert_eq!(h.urls[0].path, "/health");
        assert_eq!(
            h.urls[0].digest.as_deref(),
            Some("9b3a0c85a887a256d6939da88aabd8cd")
        );
        assert_eq!(h.urls[0].status_codes, vec![(200, 200)]);
        assert!(h.urls[0].status_ok(200) && !h.urls[0].status_ok(204));
        assert_eq!(
            http.timing(vs, rs),
            CheckTiming {
                delay_loop: Duration::from_secs(6),
                connect_timeout: Duration::from_secs(2),
                retry: 2,
                delay_before_retry: Duration::from_secs(1),
                warmup: Duration::from_secs(6),
                alpha: false,
            }
        );
        let tcp = &vs.real_servers[0].checkers[0];
        assert_eq!(tcp.common.connect_port, Some(80));
        assert_eq!(tcp.timing(vs, &vs.real_servers[0]).retry, 3);

        let (services, warnings) = k.services().unwrap();
        // The health settings are checked apart; the rest compared whole below.
        let h = &services[0];
        assert_eq!(
            h.health.sorry_server,
            Some(("192.168.1.100".parse().unwrap(), 80))
        );
        assert!(h.backends.iter().all(|b| b.health.inhibit_on_failure));
        assert_eq!(h.backends[0].health.checks.len(), 1);
        assert_eq!(
            h.backends[0].health.checks[0].probe,
            crate::health::spec::Probe::Tcp
        );
        assert_eq!(h.backends[0].health.checks[0].timing.retry, 3);
        assert_eq!(h.backends[1].health.checks.len(), 2);
        assert_eq!(through_toml(&services), services);
        let services: Vec<ServiceConfig> = services
            .into_iter()
            .map(|mut s| {
                s.health = Default::default();
                for b in &mut s.backends {
                    b.health = Default::default();
                }
                s
            })
            .collect();
        let backend = |a: &str, weight| BackendConfig {
            health: Default::default(),
            addr: a.parse().unwrap(),
            port: 80,
            weight,
            forwarding: Forwarding::Dr,
            tunnel: None,
            upper_threshold: 0,
            lower_threshold: 0,
        };
        assert_eq!(
            services,
            vec![ServiceConfig {
                health: Default::default(),
                name: "vs 192.168.1.10:80".into(),
                key: ServiceKey::new("192.168.1.10".parse().unwrap(), 80, Protocol::Tcp),
                ports: vec![PortRange::one(80)],
                persistence: Some(Persistence {
                    timeout: 50,
                    prefix: 32
                }),
                scheduler: Scheduler::Wlc,
                sched_flags: SchedFlags::default(),
                mh_table_size: 4093,
                conntrack: true,
                forwarding: Forwarding::Dr,
                backends: vec![backend("192.168.1.11", 3), backend("192.168.1.12", 1)],
            }]
        );
        // The sorry server is used now: no warning about it.
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(through_toml(&services), services);
    }

    #[test]
    fn the_reference_example_and_the_other_corpus_files() {
        let text = include_str!("../fuzz-corpus/keepalived/reference-example.conf");
        let k = p(text).unwrap();
        assert_eq!(k.vrrp_instances.len(), 4);
        assert_eq!(k.vrrp_interfaces(), vec!["eth0", "eth1", "eth3"]);
        // keepalived ends a line at any unquoted `!`: the password is "s3cr3t".
        let ext = &k.vrrp_instances[0];
        assert_eq!(ext.authentication.as_ref().unwrap().auth_pass, "s3cr3t");
        assert_eq!(
            ext.notify.as_ref().unwrap().command,
            "/etc/keepalived/notify_any.sh"
        );
        assert_eq!(k.vrrp_sync_groups[0].group, vec!["VI_EXT", "VI_INT"]);
        let v3 = &k.vrrp_instances[2];
        assert_eq!(v3.advert_int, Duration::from_millis(500));
        assert_eq!(v3.preempt_delay, Some(Duration::from_secs(10)));
        assert_eq!(v3.track_interface[0].weight, Some(-20));
        assert_eq!(v3.accept, Some(true));
        assert_eq!(k.vrrp_instances[3].virtual_ipaddress[0].prefix, Some(64));

        let (services, warnings) = k.services().unwrap();
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "vs 192.168.200.16:443",
                "WEB_VSG 192.168.200.16:80",
                "WEB_VSG 192.168.200.17:80",
                "WEB_VSG 192.168.200.20:80",
                "WEB_VSG 192.168.200.21:80",
                "WEB_VSG 192.168.200.22:80",
                "WEB_VSG 192.168.200.23:80",
                "WEB_VSG 192.168.200.24:80",
                "WEB_VSG 192.168.200.25:80",
                "vs 192.168.200.18:53/udp",
            ]
        );
        let https = &services[0];
        assert_eq!(
            https.persistence,
            Some(Persistence {
                timeout: 300,
                prefix: 24
            })
        );
        assert_eq!(https.forwarding, Forwarding::Nat);
        assert_eq!(
            https.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
            vec![8443, 8443]
        );
        assert_eq!(https.backends[0].weight, 3);
        let fwmark_line = line_of(text, "virtual_server fwmark 100");
        assert!(
            warnings.iter().any(|w| w.to_string()
                == format!("keepalived.conf:{fwmark_line}: fwmark virtual_server (fwmark 100) not supported by xlb's XDP data plane (no firewall marks at XDP); skipped")),
            "{warnings:?}"
        );
        assert_eq!(through_toml(&services), services);

        for (name, text) in [
            (
                "two-node-b",
                include_str!("../fuzz-corpus/keepalived/two-node-b.conf"),
            ),
            (
                "testbed-oneline",
                include_str!("../fuzz-corpus/keepalived/testbed-oneline.conf"),
            ),
            (
                "groups-and-checkers",
                include_str!("../fuzz-corpus/keepalived/groups-and-checkers.conf"),
            ),
        ] {
            let k = p(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let (services, _) = k.services().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!services.is_empty(), "{name}");
            assert_eq!(through_toml(&services), services, "{name}");
        }
    }

    #[test]
    fn layout_comments_and_quotes() {
        let text = "global_defs { router_id ka1\n  enable_script_security }\nvrrp_instance VI_1\n{\n  interface eth0 # the uplink\n  virtual_router_id 51 ! and a comment\n  virtual_ipaddress { 10.0.0.1/24 dev eth0 } }\nvirtual_server 10.0.0.1 80 { protocol TCP\n real_server 10.0.0.2 80 { weight 2\n MISC_CHECK { misc_path \"/bin/check.sh 'a b' # not a comment\"\n user nobody } } }\nvrrp_script s {\n script \"/bin/x \\\"q\\\"\"\n}\nglobal_defs {\n smtp_helo_name a\\#b\n}\n";
        let k = p(text).unwrap();
        assert_eq!(k.global_defs.router_id.as_deref(), Some("ka1"));
        assert!(k.global_defs.enable_script_security);
        let v = &k.vrrp_instances[0];
        assert_eq!(v.loc.line, 3);
        assert_eq!(v.interface.as_ref().unwrap().value, "eth0");
        assert_eq!(v.interface.as_ref().unwrap().line, 5);
        assert_eq!(v.virtual_router_id, 51);
        assert_eq!(v.virtual_ipaddress[0].dev.as_deref(), Some("eth0"));
        let rs = &k.virtual_servers[0].real_servers[0];
        assert_eq!(rs.weight.as_ref().unwrap().value, 2);
        let CheckerKind::Misc(m) = &rs.checkers[0].kind else {
            panic!()
        };
        assert_eq!(
            m.script.argv(),
            vec!["/bin/check.sh", "a b", "#", "not", "a", "comment"]
        );
        assert_eq!(m.script.user.as_deref(), Some("nobody"));
        assert_eq!(k.vrrp_scripts[0].script.argv(), vec!["/bin/x", "\"q\""]);
        assert_eq!(k.global_defs.raw[0].args, vec!["a#b"]);
        assert_eq!(k.warnings, vec![]);
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xlb-keepalived-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn includes_globs_braces_nesting_and_errors() {
        let d = scratch("include");
        write(
            &d,
            "keepalived.conf",
            "global_defs {\n    router_id x\n}\ninclude conf.d/*.conf\ninclude extra/{a,b}.inc\ninclude none.d/*.conf\n",
        );
        write(
            &d,
            "conf.d/10-vs.conf",
            "virtual_server 10.0.0.1 80 {\n    protocol TCP\n    include ../rs/*.rs\n}\n",
        );
        write(&d, "conf.d/.hidden.conf", "bogus {\n");
        write(
            &d,
            "conf.d/20-vrrp.conf",
            "\ninclude ../nested/script.conf\n",
        );
        write(
            &d,
            "nested/script.conf",
            "vrrp_script chk {\n    script /bin/true\n}\n",
        );
        write(&d, "rs/1.rs", "real_server 10.0.0.2 80 {\n}\n");
        write(&d, "rs/2.rs", "real_server 10.0.0.3 80 {\n}\n");
        write(
            &d,
            "extra/a.inc",
            "vrrp_instance A {\n virtual_router_id 1\n}\n",
        );
        write(&d, "extra/b.inc", "\n\nfoo bar\n");
        let main = d.join("keepalived.conf");
        let k = load(&main).unwrap();
        let files: Vec<String> = k
            .files
            .iter()
            .map(|f| f.strip_prefix(&d).unwrap().display().to_string())
            .collect();
        assert_eq!(
            files,
            vec![
                "keepalived.conf",
                "conf.d/10-vs.conf",
                "conf.d/../rs/1.rs",
                "conf.d/../rs/2.rs",
                "conf.d/20-vrrp.conf",
                "conf.d/../nested/script.conf",
                "extra/a.inc",
                "extra/b.inc"
            ]
        );
        let vs = &k.virtual_servers[0];
        assert!(
            vs.loc.file.ends_with("conf.d/10-vs.conf"),
            "{}",
            vs.loc.file
        );
        assert_eq!(vs.loc.line, 1);
        let rs: Vec<(String, usize)> = vs
            .real_servers
            .iter()
            .map(|r| (r.addr.to_string(), r.loc.line))
            .collect();
        assert_eq!(
            rs,
            vec![("10.0.0.2".to_string(), 1), ("10.0.0.3".to_string(), 1)]
        );
        assert!(vs.real_servers[1].loc.file.ends_with("rs/2.rs"));
        assert!(k.vrrp_scripts[0].loc.file.ends_with("nested/script.conf"));
        assert_eq!(k.vrrp_instances[0].name, "A");
        let w: Vec<String> = k.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                format!(
                    "{}:6: include \"none.d/*.conf\" matches no file",
                    main.display()
                ),
                format!(
                    "{}:3: unsupported directive \"foo\" at top level (ignored)",
                    d.join("extra/b.inc").display()
                ),
            ]
        );

        // parse_str: includes relative to the label's directory.
        let k = parse_str(&d.join("virtual.conf"), "include conf.d/20-vrrp.conf\n").unwrap();
        assert_eq!(k.vrrp_scripts[0].name, "chk");

        // An error in an included file names that file and line.
        write(
            &d,
            "bad/inner.conf",
            "vrrp_instance B {\n  priority high\n}\n",
        );
        write(&d, "bad/outer.conf", "\ninclude inner.conf\n");
        let e = load(&d.join("bad/outer.conf")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2:12: priority \"high\" is not a number between 1 and 255",
                d.join("bad/inner.conf").display()
            )
        );

        // Cycles and missing files: at the include line.
        write(&d, "loop/a.conf", "include b.conf\n");
        write(&d, "loop/b.conf", "\n\ninclude a.conf\n");
        let e = load(&d.join("loop/a.conf")).unwrap_err();
        assert_eq!((e.line, e.file.ends_with("loop/b.conf")), (3, true), "{e}");
        assert!(e.message.contains("include cycle"), "{e}");
        let e = p("\n  include missing-file-xyz.conf\n").unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.column),
            ("keepalived.conf", 2, 3)
        );
        assert!(
            e.message.contains("cannot read missing-file-xyz.conf"),
            "{e}"
        );
        let e = load(&d.join("absent.conf")).unwrap_err();
        assert_eq!(e.line, 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn group_ranges_expand_to_one_service_per_address() {
        let text = "virtual_server_group G {\n  10.0.0.1 80\n  10.0.0.5-7 80\n  10.0.1.0/31 443\n  2001:db8::a-c 80\n  10.0.2.1-10.0.2.2 8080\n  fwmark 5\n}\nvirtual_server group G {\n  protocol UDP\n  lb_kind NAT\n  real_server 10.9.0.1 8000 {\n  }\n  real_server 10.9.0.2 {\n  }\n}\n";
        let k = p(text).unwrap();
        let g = &k.virtual_server_groups[0];
        assert_eq!(g.members.len(), 6);
        let (services, warnings) = k.services().unwrap();
        let got: Vec<(String, u16)> = services
            .iter()
            .map(|s| (s.name.clone(), s.backends[1].port))
            .collect();
        let want: Vec<(String, u16)> = [
            ("G 10.0.0.1:80/udp", 80),
            ("G 10.0.0.5:80/udp", 80),
            ("G 10.0.0.6:80/udp", 80),
            ("G 10.0.0.7:80/udp", 80),
            ("G 10.0.1.0:443/udp", 443),
            ("G 10.0.1.1:443/udp", 443),
            ("G 10.0.2.1:8080/udp", 8080),
            ("G 10.0.2.2:8080/udp", 8080),
        ]
        .iter()
        .map(|(n, p)| (n.to_string(), *p))
        .collect();
        assert_eq!(got, want);
        assert!(services.iter().all(|s| s.backends[0].port == 8000));
        let w: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        assert!(
            w.contains(&"keepalived.conf:7: fwmark 5 of virtual_server_group G not supported by xlb's XDP data plane (no firewall marks at XDP); skipped".to_string()),
            "{w:?}"
        );
        for a in ["a", "b", "c"] {
            let m = format!(
                "keepalived.conf:5: G [2001:db8::{a}]:80/udp: no real_server of its address family; skipped"
            );
            assert!(w.contains(&m), "{m} not in {w:?}");
        }
        assert!(w.contains(&"keepalived.conf:14: real_server 10.9.0.2 is not of the virtual server's address family (only tunnelling may mix them); skipped (as keepalived does)".to_string()), "{w:?}");
        assert_eq!(through_toml(&services), services);

        // IPv6 members with IPv6 real servers.
        let k = p("virtual_server_group G6 {\n 2001:db8::a-c 80\n}\nvirtual_server group G6 {\n protocol TCP\n lb_kind DR\n real_server 2001:db8:1::1 80 {\n }\n}\n").unwrap();
        let (services, _) = k.services().unwrap();
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "G6 [2001:db8::a]:80",
                "G6 [2001:db8::b]:80",
                "G6 [2001:db8::c]:80"
            ]
        );
    }

    /// FILE_CHECK names a top-level track_file block; the checker's weight wins over the
    /// block's.
    #[test]
    fn file_check_follows_its_track_file() {
        let text = "track_file app {\n  file /run/app.state\n  weight 5 reverse\n}\n\
            virtual_server 10.0.0.1 80 {\n  lb_kind DR\n  protocol TCP\n\
              real_server 10.0.0.11 80 {\n    FILE_CHECK {\n      track_file app\n    }\n  }\n\
              real_server 10.0.0.12 80 {\n    FILE_CHECK {\n      track_file app\n      weight 0\n    }\n  }\n\
              real_server 10.0.0.13 80 {\n    FILE_CHECK {\n      track_file app\n      weight 2\n    }\n  }\n\
              real_server 10.0.0.14 80 {\n    FILE_CHECK {\n      track_file nosuch\n    }\n  }\n}\n";
        let k = parse_str(Path::new("keepalived.conf"), text).unwrap();
        assert_eq!(k.track_files.len(), 1);
        let (services, warnings) = k.services().unwrap();
        let probe = |i: usize| {
            services[0].backends[i]
                .health
                .checks
                .first()
                .map(|c| c.probe.clone())
        };
        use crate::health::spec::Probe;
        let file = |w, r| {
            Some(Probe::File {
                path: "/run/app.state".into(),
                weight: Some(w),
                reverse: r,
            })
        };
        assert_eq!(probe(0), file(5, true));
        assert_eq!(
            probe(1),
            file(5, true),
            "weight 0 on the checker: the block's"
        );
        assert_eq!(probe(2), file(2, false));
        assert_eq!(probe(3), None);
        assert!(
            warnings
                .iter()
                .any(|w| w.to_string().contains("track_file nosuch not found")),
            "{warnings:?}"
        );
    }

    #[test]
    fn fwmarks_and_ops_are_warnings() {
        let text = "virtual_server fwmark 7 {\n  lb_algo rr\n  real_server 10.0.0.2 0 {\n  }\n}\nvirtual_server 10.0.0.1 53 {\n  protocol UDP\n  ops\n  real_server 10.0.0.3 53 {\n  }\n}\n";
        let (services, warnings) = p(text).unwrap().services().unwrap();
        assert_eq!(services.len(), 1);
        let w: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                "keepalived.conf:1: fwmark virtual_server (fwmark 7) not supported by xlb's XDP data plane (no firewall marks at XDP); skipped",
                "keepalived.conf:8: ops (one-packet scheduling) is not supported by xlb; ignored",
            ]
        );
    }

    #[test]
    fn unknown_directives_are_warnings() {
        let text = "global_defs {\n  router_id a\n  frobnicate 1\n  smtp_server 10.0.0.9\n}\nvirtual_server 10.0.0.1 80 {\n  protocol TCP\n  foo bar {\n    baz\n  }\n  real_server 10.0.0.2 80 {\n    TCP_CHECK {\n      connect_port 80\n      wibble\n    }\n    BFD_CHECK {\n    }\n  }\n}\n@lb-b virtual_server 10.0.0.2 80 {\n}\nvrrp_track_process p {\n}\n";
        let k = p(text).unwrap();
        let w: Vec<String> = k.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                "keepalived.conf:3: unsupported directive \"frobnicate\" in global_defs (ignored)",
                "keepalived.conf:8: unsupported directive \"foo\" in virtual_server (ignored)",
                "keepalived.conf:14: unsupported directive \"wibble\" in TCP_CHECK (ignored)",
                "keepalived.conf:16: unsupported directive \"BFD_CHECK\" in real_server (ignored)",
                "keepalived.conf:20: \"@lb-b\": conditional configuration is not supported; line ignored",
                "keepalived.conf:22: unsupported directive \"vrrp_track_process\" at top level (ignored)",
            ]
        );
        assert_eq!(k.global_defs.raw.len(), 2);
    }

    #[test]
    fn errors_are_located() {
        let vs =
            |body: &str| format!("virtual_server 10.0.0.1 80 {{\n  protocol TCP\n{body}\n}}\n");
        let rs = |body: &str| vs(&format!("  real_server 10.0.0.2 80 {{\n{body}\n  }}"));
        let vi = |body: &str| {
            format!("vrrp_instance V {{\n  interface eth0\n  virtual_router_id 5\n{body}\n}}\n")
        };
        let cases: Vec<(String, usize, &str)> = vec![
            ("virtual_server 10.0.0.300 80 {\n}\n".into(), 1, "virtual_server address \"10.0.0.300\" is not an IP address"),
            ("virtual_server 10.0.0.1 http {\n}\n".into(), 1, "virtual_server port \"http\" is not a number between 0 and 65535"),
            (rs("    weight abc"), 4, "weight \"abc\" is not a number between 0 and 2147483647"),
            (rs("    weight"), 4, "\"weight\" needs a value"),
            (rs("    uthreshold -1"), 4, "uthreshold \"-1\" is not a number"),
            ("vrrp_instance VI_1\n".into(), 1, "\"vrrp_instance\" needs a { } block"),
            ("virtual_server 10.0.0.1 80\n".into(), 1, "\"virtual_server\" needs a { } block"),
            ("global_defs {\n  router_id a\n".into(), 1, "the block of \"global_defs\" is not closed"),
            (vs("  real_server 10.0.0.2 80 {\n    weight 1\n"), 1, "the block of \"virtual_server\" is not closed"),
            ("global_defs {\n}\n}\n".into(), 3, "\"}\" closes no block"),
            ("{\n}\n".into(), 1, "\"{\" has no keyword before it"),
            ("global_defs {\n}\n{\n}\n".into(), 3, "\"{\" has no keyword before it"),
            (vs("  lb_kind FOO"), 3, "lb_kind \"FOO\" is not one of NAT, DR, TUN"),
            (vs("  lb_kind nat"), 3, "lb_kind \"nat\" is not one of NAT, DR, TUN"),
            (vs("  lb_algo fastest"), 3, "unknown scheduler \"fastest\""),
            (vs("  lb_kind TUN type gue"), 3, "a gue tunnel needs a port"),
            (vs("  lb_kind TUN type gre port 5"), 3, "a gre tunnel takes no port"),
            (vs("  lb_kind TUN remcsum"), 3, "a ipip tunnel does not take this checksum option"),
            (vs("  protocol ICMP"), 3, "protocol \"ICMP\" is not one of TCP, UDP, SCTP"),
            (vs("  persistence_timeout 0"), 3, "persistence_timeout \"0\" is not a number between 1 and 2678400"),
            (vs("  persistence_granularity 255.0.255.0"), 3, "not contiguous"),
            (vs("  delay_loop soon"), 3, "delay_loop \"soon\" is not a number of seconds"),
            (vs("  inhibit_on_failure maybe"), 3, "takes on/off, true/false or yes/no, not \"maybe\""),
            (vs("  delay_loop 5 {\n  }"), 3, "\"delay_loop\" takes no { } block"),
            (vs("  sorry_server 10.0.0.x"), 3, "sorry_server \"10.0.0.x\" is not an IP address"),
            (rs("    lvs_method ROUTE"), 4, "lvs_method \"ROUTE\" is not one of NAT, DR, TUN"),
            (rs("    HTTP_GET {\n      url {\n        digest 1234\n      }\n    }"), 6, "digest \"1234\" is not an MD5 sum"),
            (rs("    HTTP_GET {\n      url {\n        path /\n        status_code 200 700\n      }\n    }"), 7, "status_code \"700\""),
            (rs("    MISC_CHECK {\n      misc_timeout 3\n    }"), 4, "MISC_CHECK needs a misc_path"),
            (rs("    DNS_CHECK {\n      type XYZ\n    }"), 5, "DNS_CHECK type \"XYZ\""),
            (rs("    TCP_CHECK {\n      connect_ip 1.2.3\n    }"), 5, "connect_ip \"1.2.3\" is not an IP address"),
            ("vrrp_instance V {\n  interface eth0\n}\n".into(), 1, "vrrp_instance V has no virtual_router_id"),
            (vi("  state LEADER"), 4, "state \"LEADER\" is not MASTER or BACKUP"),
            (vi("  priority 300"), 4, "priority \"300\" is not a number between 1 and 255"),
            (vi("  advert_int 0"), 4, "advert_int \"0\" is not between 0.01 and 255 seconds"),
            (vi("  authentication {\n    auth_type MD5\n  }"), 5, "auth_type \"MD5\" is not PASS or AH"),
            (vi("  authentication {\n    auth_type PASS\n  }"), 4, "authentication needs an auth_pass"),
            (vi("  virtual_ipaddress {\n    10.0.0.1/33\n  }"), 5, "the prefix length must be 0 to 32"),
            (vi("  virtual_ipaddress {\n    not-an-ip\n  }"), 5, "virtual_ipaddress \"not-an-ip\" is not an IP address"),
            (vi("  unicast_peer {\n    10.0.0.2 min_ttl\n  }"), 5, "unicast_peer: min_ttl needs a number"),
            (vi("  track_script {\n    chk weight 300\n  }"), 5, "weight \"300\" is not a number between -253 and 253"),
            ("vrrp_instance V {\n  virtual_router_id 1\n}\nvrrp_instance V {\n  virtual_router_id 2\n}\n".into(), 4, "vrrp_instance V is defined twice (first at keepalived.conf:1)"),
            ("vrrp_script s {\n  interval 2\n}\n".into(), 1, "vrrp_script s has no \"script\""),
            ("vrrp_sync_group G {\n  notify x\n}\n".into(), 1, "vrrp_sync_group G has no group"),
            ("virtual_server_group G {\n  10.0.0.5-2 80\n}\n".into(), 2, "\"10.0.0.5-2\" ends before it starts"),
            ("virtual_server_group G {\n  10.0.0.1/24 80\n}\n".into(), 2, "has host bits set"),
            ("virtual_server_group G {\n  fwmark x\n}\n".into(), 2, "fwmark \"x\" is not a number"),
            ("global_defs {\n  lvs_timeouts tcp 10 fin 5\n}\n".into(), 2, "lvs_timeouts: \"fin\" is not one of tcp, tcpfin, udp"),
            ("global_defs {\n  lvs_timeouts tcp\n}\n".into(), 2, "\"lvs_timeouts\" needs 2 values"),
            ("global_defs {\n  router_id \"lb-a\n}\n".into(), 2, "unterminated quoted string"),
            ("include a b\n".into(), 1, "include takes one file name or pattern"),
            ("include\n".into(), 1, "include needs a file name or pattern"),
            (format!("{}\n", "a {".repeat(40)), 1, "blocks nested more than 32 deep"),
        ];
        for (text, line, needle) in &cases {
            let e = p(text).expect_err(text);
            assert_eq!(e.file, "keepalived.conf", "{text}");
            assert_eq!(e.line, *line, "{e} for {text:?}");
            assert!(
                e.message.contains(needle),
                "{e} does not mention {needle:?} ({text:?})"
            );
            assert!(e.column >= 1, "{e}");
        }
    }

    #[test]
    fn conversion_errors_are_located() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "virtual_server 10.0.0.1 132 {\n  protocol SCTP\n  real_server 10.0.0.2 132 {\n  }\n}\n",
                2,
                "protocol SCTP is not supported by xlb (TCP and UDP only)",
            ),
            (
                "virtual_server 10.0.0.1 80 {\n  protocol TCP\n  real_server 10.0.0.2 80 {\n    weight 70000\n  }\n}\n",
                4,
                "weight 70000 exceeds xlb's maximum 65535",
            ),
            (
                "virtual_server 10.0.0.1 80 {\n  protocol TCP\n  weight 70000\n  real_server 10.0.0.2 80 {\n  }\n}\n",
                3,
                "weight 70000 exceeds",
            ),
            (
                "virtual_server 10.0.0.1 80 {\n  protocol TCP\n  real_server 10.0.0.2 80 {\n    uthreshold 5\n    lthreshold 7\n  }\n}\n",
                5,
                "lthreshold (7) must not exceed uthreshold (5",
            ),
            (
                "virtual_server 224.0.0.1 80 {\n  protocol TCP\n  real_server 10.0.0.2 80 {\n  }\n}\n",
                1,
                "224.0.0.1 is not a unicast address",
            ),
            (
                "virtual_server 10.0.0.1 80 {\n  protocol TCP\n  real_server 10.0.0.2 80 {\n  }\n}\n\nvirtual_server 10.0.0.1 80 {\n  protocol TCP\n  real_server 10.0.0.3 80 {\n  }\n}\n",
                7,
                "service TCP 10.0.0.1:80 is defined twice (first at keepalived.conf:1)",
            ),
            (
                "virtual_server 2001:db8::1 80 {\n  protocol TCP\n  persistence_granularity 255.255.255.0\n  real_server 2001:db8::2 80 {\n  }\n}\n",
                3,
                "an IPv6 virtual_server's persistence_granularity is a prefix length",
            ),
            (
                "virtual_server 10.0.0.1 80 {\n  protocol TCP\n  persistence_granularity 48\n  real_server 10.0.0.2 80 {\n  }\n}\n",
                3,
                "persistence_granularity 48 is longer than an address",
            ),
            (
                "virtual_server_group G {\n  10.0.0.0/8 80\n}\nvirtual_server group G {\n  protocol TCP\n  real_server 10.1.0.2 80 {\n  }\n}\n",
                2,
                "holds 16777216 addresses",
            ),
        ];
        for (text, line, needle) in cases {
            let e = p(text).unwrap().services().expect_err(text);
            assert_eq!(e.line, *line, "{e} for {text:?}");
            assert!(
                e.message.contains(needle),
                "{e} does not mention {needle:?}"
            );
        }
    }

    #[test]
    fn conversion_follows_keepalived() {
        let text = "virtual_server 10.0.0.1 80 {\n  lb_kind DR\n  weight 4\n  real_server 10.0.0.2 8080 {\n  }\n  real_server 10.0.0.3 {\n    lvs_method NAT\n  }\n  real_server 10.0.0.2 80 {\n  }\n  real_server 2001:db8::5 80 {\n  }\n  real_server 10.0.0.6 80 {\n    lvs_method TUN type gue port 6080 remcsum\n    weight 0\n  }\n}\nvirtual_server 10.0.0.1 0 {\n  protocol TCP\n  lb_kind DR\n  lb_algo sh\n  sh-port\n  mh-fallback\n  real_server 10.0.0.7 443 {\n  }\n}\nvirtual_server 10.0.0.9 80 {\n  protocol TCP\n}\n";
        let k = p(text).unwrap();
        assert_eq!(k.warnings, vec![]);
        let (services, warnings) = k.services().unwrap();
        let w: Vec<String> = warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                "keepalived.conf:1: virtual_server has no protocol: UDP (keepalived's default; add \"protocol TCP\" for TCP)",
                "keepalived.conf:4: real_server port 8080 differs from the virtual server's port 80: only NAT can change it; port 80 used (as keepalived does)",
                "keepalived.conf:9: real_server 10.0.0.2:80 is listed twice; the second is removed (as keepalived does)",
                "keepalived.conf:11: real_server 2001:db8::5 is not of the virtual server's address family (only tunnelling may mix them); skipped (as keepalived does)",
                "keepalived.conf:23: mh-fallback does not apply to the sh scheduler; ignored (as keepalived does)",
                "keepalived.conf:18: port 0 (all ports) is only valid for persistent services: persistence_timeout 360 set (as keepalived does)",
                "keepalived.conf:24: real_server port 443 differs from the virtual server's port 0: only NAT can change it; port 0 used (as keepalived does)",
                "keepalived.conf:27: virtual_server has no real_server; skipped (as keepalived does)",
            ]
        );
        let s = &services[0];
        assert_eq!(
            (s.key.protocol, s.forwarding),
            (Protocol::Udp, Forwarding::Dr)
        );
        let b: Vec<(String, u16, u32, Forwarding)> = s
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.port, b.weight, b.forwarding))
            .collect();
        assert_eq!(
            b,
            vec![
                ("10.0.0.2".into(), 80, 4, Forwarding::Dr),
                ("10.0.0.3".into(), 80, 4, Forwarding::Nat),
                ("10.0.0.6".into(), 80, 0, Forwarding::Tunnel),
            ]
        );
        assert_eq!(
            s.backends[2].tunnel,
            Some(Tunnel {
                kind: TunnelType::Gue,
                port: 6080,
                checksum: TunnelChecksum::Remcsum,
                source: None
            })
        );
        let all = &services[1];
        assert_eq!(all.ports, vec![PortRange::ALL]);
        assert_eq!(all.persistence.map(|p| p.timeout), Some(360));
        assert_eq!(
            all.sched_flags,
            SchedFlags {
                fallback: false,
                port: true
            }
        );
        assert_eq!(all.backends[0].port, 0);
        assert_eq!(all.forwarding, Forwarding::Dr);
        assert_eq!(through_toml(&services), services);
    }

    #[test]
    fn defaults_and_inheritance() {
        let text = "vrrp_instance M {\n  state MASTER\n  virtual_router_id 9\n  track_script {\n    missing\n  }\n}\nvrrp_instance B {\n  virtual_router_id 10\n  priority 255\n  interface eth1\n}\nvirtual_server 10.0.0.1 53 {\n  protocol UDP\n  retry 4\n  connect_timeout 1.5\n  real_server 10.0.0.2 53 {\n    delay_loop 20\n    DNS_CHECK {\n    }\n    MISC_CHECK {\n      misc_path /bin/true\n    }\n  }\n}\nvrrp_sync_group S {\n  group {\n    M\n    X\n  }\n}\n";
        let k = p(text).unwrap();
        let (m, b) = (&k.vrrp_instances[0], &k.vrrp_instances[1]);
        assert_eq!(
            (m.effective_priority(), m.effective_state()),
            (255, VrrpState::Master)
        );
        assert_eq!(
            (b.effective_priority(), b.effective_state()),
            (255, VrrpState::Master)
        );
        assert_eq!(k.vrrp_interfaces(), vec!["eth1"]);
        assert_eq!(k.timeouts(), None);
        let w: Vec<String> = k.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(
            w,
            vec![
                "keepalived.conf:5: track_script missing: no vrrp_script \"missing\" is defined; ignored (as keepalived does)",
                "keepalived.conf:26: vrrp_sync_group S: no vrrp_instance \"X\" is defined; ignored (as keepalived does)",
            ]
        );
        let vs = &k.virtual_servers[0];
        let rs = &vs.real_servers[0];
        let dns = rs.checkers[0].timing(vs, rs);
        assert_eq!(
            dns,
            CheckTiming {
                delay_loop: Duration::from_secs(20),
                connect_timeout: Duration::from_millis(1500),
                retry: 4,
                delay_before_retry: Duration::from_secs(20),
                warmup: Duration::from_secs(20),
                alpha: false
            }
        );
        let misc = rs.checkers[1].timing(vs, rs);
        assert_eq!(
            (misc.retry, misc.delay_before_retry),
            (4, Duration::from_secs(1))
        );
        let vs2 = VirtualServer::new(
            VsTarget::Address {
                addr: "10.0.0.1".parse().unwrap(),
                port: 1,
            },
            Loc::default(),
        );
        let rs2 = RealServer {
            retry: None,
            delay_loop: None,
            connect_timeout: None,
            ..rs.clone()
        };
        let dns = rs.checkers[0].timing(&vs2, &rs2);
        assert_eq!(
            (dns.delay_loop, dns.retry, dns.connect_timeout),
            (DEFAULT_DELAY_LOOP, 3, DEFAULT_CONNECT_TIMEOUT)
        );
    }

    #[test]
    fn timeouts_keep_ipvs_defaults_for_what_is_not_given() {
        let k = p("global_defs {\n  lvs_timeouts udp 30 tcp 0\n}\n").unwrap();
        assert_eq!(
            k.timeouts(),
            Some(Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 30
            })
        );
    }

    #[test]
    fn globs_and_braces() {
        let m = |p: &str, s: &str| {
            wildmatch(
                &p.chars().collect::<Vec<_>>(),
                &s.chars().collect::<Vec<_>>(),
            )
        };
        assert!(m("*.conf", "a.conf"));
        assert!(!m("*.conf", "a.conf.bak"));
        assert!(m("a?c", "abc"));
        assert!(m("[a-c]x", "bx"));
        assert!(!m("[!a-c]x", "bx"));
        assert!(m("[]]", "]"));
        assert!(m("[", "["));
        assert!(m("*a*b*c", "xxaxxbxxc"));
        assert!(m("\\*", "*") && !m("\\*", "a"));
        let mut out = Vec::new();
        assert!(brace_expand("a{b,c{d,e}}f{,g}", &mut out, 0));
        assert_eq!(out, vec!["abf", "abfg", "acdf", "acdfg", "acef", "acefg"]);
        let mut out = Vec::new();
        assert!(brace_expand("{x}", &mut out, 0));
        assert_eq!(out, vec!["{x}"]);
        let mut out = Vec::new();
        assert!(!brace_expand(&"{a,b}".repeat(12), &mut out, 0));
    }
}
