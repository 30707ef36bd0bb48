//! `ipvsadm`, `ipvsadm-save`, `ipvsadm-restore` and `xlb ipvsadm ...`: ipvsadm 1.31's
//! command line over the xlb daemon.
//!
//! The parser follows ipvsadm 1.31 (`ipvsadm.c: parse_options()`, `process_options()`,
//! `generic_opt_check()`, `tunnel_opt_check()`) and popt's way of reading argv: the first
//! option must be the command, short options bundle (`-Ln`, `-w5`), long options take
//! `--opt=value` or `--opt value`, `-p`'s value is optional (the next word is taken unless it
//! starts with `-`), words that are not options are collected as arguments (`--set`'s three
//! timeouts). Errors are ipvsadm's, word for word, with its exit codes: 2 for what its
//! `fail()` reports, 255 for popt's errors and for what the kernel refuses (ipvsadm returns
//! -1 from `main()`), 1 when a listing fails.
//!
//! What xlb does not do is refused as the kernel would refuse it (exit 255): firewall-mark
//! and SCTP services, one-packet scheduling, persistence engines, the sync daemon.
//!
//! Deliberate differences from ipvsadm: nothing is parsed before the daemon is asked in
//! ipvsadm (it initialises libipvs first), so a parse error here wins over an unreachable
//! daemon; `-R` parses every line before applying anything and sends the lines in one
//! request (see [`parse_restore`]); `-R` exits 255 when any line failed (ipvsadm returns the
//! last line's status); addresses are never reverse-resolved (see `ipvsadm.rs`).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs},
    path::{Path, PathBuf},
    str::FromStr,
};

use crate::{
    api::{self, ChangesRequest, ChangesResponse, ConnectionsResponse, ServicesResponse},
    change::{Change, ChangeError, service_name},
    config::{
        BackendConfig, DEFAULT_PERSISTENCE_TIMEOUT, Forwarding, MAX_PERSISTENCE_TIMEOUT,
        Persistence, PortRange, Protocol, SchedFlags, Scheduler, ServiceConfig, ServiceKey,
        Timeouts, Tunnel, TunnelChecksum, TunnelType,
    },
    ipvsadm::{self, ListFormat, PortNames},
};

/// ipvsadm's release this command line follows, and its date.
pub const IPVSADM_VERSION: &str = "v1.31";
pub const IPVSADM_VERSION_DATE: &str = "2019/12/24";

/// `fail()`'s exit status.
const EXIT_FAIL: i32 = 2;
/// `main()` returning -1: popt errors, `tryhelp_exit()`, kernel errors.
const EXIT_KERNEL: i32 = 255;
/// A listing that cannot be made.
const EXIT_LIST: i32 = 1;

/// A command line ipvsadm would not accept: the message it prints (to stderr) and its exit
/// status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub message: String,
    pub exit_code: i32,
}

impl CliError {
    /// ipvsadm's `fail(2, ...)`.
    fn fail(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            exit_code: EXIT_FAIL,
        }
    }
    /// `tryhelp_exit(argv[0], -1)`.
    fn tryhelp() -> Self {
        CliError {
            message: "Try `ipvsadm -h' or 'ipvsadm --help' for more information.".into(),
            exit_code: EXIT_KERNEL,
        }
    }
}

/// What an ipvsadm command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invocation {
    /// `-A -E -D -C -a -e -d -Z --set`
    Change(Change),
    /// `-L` / `-l`
    List(ListRequest),
    /// `-S [-n]`
    Save { numeric: bool },
    /// `-R`
    Restore,
    /// `-h`: [`usage`] on stdout, exit 0.
    Help,
    /// `-v`: [`version`] on stdout, exit 0.
    Version,
    /// A well-formed command that is refused the way the kernel refuses one: the message is
    /// printed (stderr) and the exit status is 255. Either xlb does not do it (firewall
    /// marks, SCTP, `-o`, `--pe`, the sync daemon, non-prefix netmasks) or it names
    /// something that cannot exist in xlb (e.g. `-D -f 1`: "No such service").
    Refused { message: String },
}

/// `-L` with its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListRequest {
    pub target: ListTarget,
    pub format: ListFormat,
}

/// What `-L` lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListTarget {
    /// The whole table.
    All,
    /// `-L -t|-u service`
    Service(ServiceKey),
    /// `-L -f mark` / `-L --sctp-service ...`: a service xlb cannot have ("No such service").
    Unservable,
    /// `-L -c`
    Connections,
    /// `-L --timeout`
    Timeout,
    /// `-L --daemon` (the sync daemon's role, if `[conn_sync]` is configured).
    Daemon,
}

const FWMARK_REFUSED: &str = "Firewall-mark services (-f) are not supported by xlb: XDP sees packets before netfilter marks them (xlb's configuration file can give a service an address prefix and a set of ports instead)";
const SCTP_REFUSED: &str = "SCTP services are not supported by xlb (TCP and UDP only)";
const OPS_REFUSED: &str = "One-packet scheduling (-o) is not supported by xlb (yet)";
const PE_REFUSED: &str = "Persistence engines (--pe) are not supported by xlb (yet)";
const SYNC_REFUSED: &str = "xlb's connection synchronisation daemon follows VRRP: configure [conn_sync] (keepalived's lvs_sync_daemon) instead of --start-daemon/--stop-daemon";

// ---------------------------------------------------------------------------------------
// ipvsadm's tables

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Add,
    Edit,
    Del,
    Flush,
    List,
    AddDest,
    DelDest,
    EditDest,
    Timeout,
    StartDaemon,
    StopDaemon,
    Restore,
    Save,
    Zero,
}

const CMDNAMES: [&str; 14] = [
    "add-service",
    "edit-service",
    "delete-service",
    "flush",
    "list",
    "add-server",
    "delete-server",
    "edit-server",
    "set",
    "start-daemon",
    "stop-daemon",
    "restore",
    "save",
    "zero",
];

/// Option bits (`OPTC_*`), the columns of [`MATRIX`].
mod optc {
    pub const NUMERIC: usize = 0;
    pub const CONNECTION: usize = 1;
    pub const SERVICE: usize = 2;
    pub const SCHEDULER: usize = 3;
    pub const PERSISTENT: usize = 4;
    pub const NETMASK: usize = 5;
    pub const SERVER: usize = 6;
    pub const FORWARD: usize = 7;
    pub const WEIGHT: usize = 8;
    pub const UTHRESHOLD: usize = 9;
    pub const LTHRESHOLD: usize = 10;
    pub const MCAST: usize = 11;
    pub const TIMEOUT: usize = 12;
    pub const DAEMON: usize = 13;
    pub const STATS: usize = 14;
    pub const RATE: usize = 15;
    pub const THRESHOLDS: usize = 16;
    pub const PERSISTENTCONN: usize = 17;
    pub const NOSORT: usize = 18;
    pub const SYNCID: usize = 19;
    pub const EXACT: usize = 20;
    pub const ONEPACKET: usize = 21;
    pub const PERSISTENCE_ENGINE: usize = 22;
    pub const SCHED_FLAGS: usize = 23;
    pub const MCAST_GROUP: usize = 24;
    pub const MCAST_PORT: usize = 25;
    pub const MCAST_TTL: usize = 26;
    pub const SYNC_MAXLEN: usize = 27;
    pub const TUN_INFO: usize = 28;
    pub const TUN_TYPE: usize = 29;
    pub const TUN_PORT: usize = 30;
    pub const TUN_NOCSUM: usize = 31;
    pub const TUN_CSUM: usize = 32;
    pub const TUN_REMCSUM: usize = 33;
}

const OPTNAMES: [&str; 34] = [
    "numeric",
    "connection",
    "service-address",
    "scheduler",
    "persistent",
    "netmask",
    "real-server",
    "forwarding-method",
    "weight",
    "u-threshold",
    "l-threshold",
    "mcast-interface",
    "timeout",
    "daemon",
    "stats",
    "rate",
    "thresholds",
    "persistent-conn",
    "nosort",
    "syncid",
    "exact",
    "ops",
    "pe",
    "sched-flags",
    "mcast-group",
    "mcast-port",
    "mcast-ttl",
    "sync-maxlen",
    "tun-info",
    "tun-type",
    "tun-port",
    "tun-nocsum",
    "tun-csum",
    "tun-remcsum",
];

/// `commands_v_options[]` of ipvsadm 1.31, one string per command (in [`CMDNAMES`] order),
/// one character per option (in [`OPTNAMES`] order): `+` required, `x` illegal, `1` at most
/// one of the `1`s, blank optional.
const MATRIX: [&str; 14] = [
    // -n -c svc -s -p -M -r fwd -w -x -y -mc tot dmn -st -rt thr -pc srt sid -ex ops -pe -b grp port ttl size tinf type tprt nocs csum remc
    "xx+   xxxxxxxxxxxxxxx   xxxxxxxxxx", // add-service
    "xx+   xxxxxxxxxxxxxxx   xxxxxxxxxx", // edit-service
    "xx+xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // delete-service
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // flush
    " 11xxxxxxxxx11       xxxxxxx xxxxx", // list
    "xx+xxx+    xxxxxxxxxxxxxxxxxx     ", // add-server
    "xx+xxx+xxxxxxxxxxxxxxxxxxxxxxxxxxx", // delete-server
    "xx+xxx+    xxxxxxxxxxxxxxxxxx     ", // edit-server
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // set
    "xxxxxxxxxxx xxxxxxx xxxx    xxxxxx", // start-daemon
    "xxxxxxxxxxxxxxxxxxx xxxxxxxxxxxxxx", // stop-daemon
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // restore
    " xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // save
    "xx xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", // zero
];

const TUNNAMES: [&str; 3] = ["ipip", "gue", "gre"];
const TUNOPTS: [usize; 4] = [
    optc::TUN_PORT,
    optc::TUN_NOCSUM,
    optc::TUN_CSUM,
    optc::TUN_REMCSUM,
];
/// `tunnel_types_v_options[]`: tun-port, tun-nocsum, tun-csum, tun-remcsum per type.
const TUN_MATRIX: [&str; 3] = ["xxxx", "+111", "x11x"];

const TUN_F_CSUM: u32 = 1;
const TUN_F_REMCSUM: u32 = 2;
const SVC_F_SCHED1: u32 = 1;
const SVC_F_SCHED2: u32 = 2;
const SVC_F_SCHED3: u32 = 4;

// ---------------------------------------------------------------------------------------
// popt

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Add,
    Edit,
    Del,
    Clear,
    List,
    Zero,
    AddServer,
    EditServer,
    DelServer,
    Set,
    Help,
    Version,
    Restore,
    Save,
    StartDaemon,
    StopDaemon,
    Tcp,
    Udp,
    Sctp,
    Fwmark,
    Scheduler,
    Persistent,
    Netmask,
    RealServer,
    Masquerading,
    Ipip,
    Gatewaying,
    Weight,
    UThreshold,
    LThreshold,
    Numeric,
    Connection,
    McastInterface,
    SyncId,
    Timeout,
    Daemon,
    Stats,
    Rate,
    Thresholds,
    PersistentConn,
    NoSort,
    Sort,
    Exact,
    Ipv6,
    Ops,
    Pe,
    SchedFlags,
    McastGroup,
    McastPort,
    McastTtl,
    SyncMaxlen,
    TunInfo,
    TunType,
    TunPort,
    TunNocsum,
    TunCsum,
    TunRemcsum,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArgKind {
    None,
    Required,
    Optional,
}

struct OptDef {
    long: &'static str,
    short: Option<char>,
    arg: ArgKind,
    tag: Tag,
}

const fn o(long: &'static str, short: Option<char>, arg: ArgKind, tag: Tag) -> OptDef {
    OptDef {
        long,
        short,
        arg,
        tag,
    }
}

/// ipvsadm 1.31's popt option table, in its order.
const OPTIONS: &[OptDef] = {
    use ArgKind::{None as N, Optional as O, Required as R};
    &[
        o("add-service", Some('A'), N, Tag::Add),
        o("edit-service", Some('E'), N, Tag::Edit),
        o("delete-service", Some('D'), N, Tag::Del),
        o("clear", Some('C'), N, Tag::Clear),
        o("list", Some('L'), N, Tag::List),
        o("list", Some('l'), N, Tag::List),
        o("zero", Some('Z'), N, Tag::Zero),
        o("add-server", Some('a'), N, Tag::AddServer),
        o("edit-server", Some('e'), N, Tag::EditServer),
        o("delete-server", Some('d'), N, Tag::DelServer),
        o("set", None, N, Tag::Set),
        o("help", Some('h'), N, Tag::Help),
        o("version", Some('v'), N, Tag::Version),
        o("restore", Some('R'), N, Tag::Restore),
        o("save", Some('S'), N, Tag::Save),
        o("start-daemon", None, R, Tag::StartDaemon),
        o("stop-daemon", None, R, Tag::StopDaemon),
        o("tcp-service", Some('t'), R, Tag::Tcp),
        o("udp-service", Some('u'), R, Tag::Udp),
        o("sctp-service", None, R, Tag::Sctp),
        o("fwmark-service", Some('f'), R, Tag::Fwmark),
        o("scheduler", Some('s'), R, Tag::Scheduler),
        o("persistent", Some('p'), O, Tag::Persistent),
        o("netmask", Some('M'), R, Tag::Netmask),
        o("real-server", Some('r'), R, Tag::RealServer),
        o("masquerading", Some('m'), N, Tag::Masquerading),
        o("ipip", Some('i'), N, Tag::Ipip),
        o("gatewaying", Some('g'), N, Tag::Gatewaying),
        o("weight", Some('w'), R, Tag::Weight),
        o("u-threshold", Some('x'), R, Tag::UThreshold),
        o("l-threshold", Some('y'), R, Tag::LThreshold),
        o("numeric", Some('n'), N, Tag::Numeric),
        o("connection", Some('c'), N, Tag::Connection),
        o("mcast-interface", None, R, Tag::McastInterface),
        o("syncid", None, R, Tag::SyncId),
        o("timeout", None, N, Tag::Timeout),
        o("daemon", None, N, Tag::Daemon),
        o("stats", None, N, Tag::Stats),
        o("rate", None, N, Tag::Rate),
        o("thresholds", None, N, Tag::Thresholds),
        o("persistent-conn", None, N, Tag::PersistentConn),
        o("nosort", None, N, Tag::NoSort),
        o("sort", None, N, Tag::Sort),
        o("exact", Some('X'), N, Tag::Exact),
        o("ipv6", Some('6'), N, Tag::Ipv6),
        o("ops", Some('o'), N, Tag::Ops),
        o("pe", None, R, Tag::Pe),
        o("sched-flags", Some('b'), R, Tag::SchedFlags),
        o("mcast-group", None, R, Tag::McastGroup),
        o("mcast-port", None, R, Tag::McastPort),
        o("mcast-ttl", None, R, Tag::McastTtl),
        o("sync-maxlen", None, R, Tag::SyncMaxlen),
        o("tun-info", None, N, Tag::TunInfo),
        o("tun-type", None, R, Tag::TunType),
        o("tun-port", None, R, Tag::TunPort),
        o("tun-nocsum", None, N, Tag::TunNocsum),
        o("tun-csum", None, N, Tag::TunCsum),
        o("tun-remcsum", None, N, Tag::TunRemcsum),
    ]
};

/// popt's errors (`poptStrerror()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoptError {
    BadOption,
    NoArg,
    UnwantedArg,
}

impl PoptError {
    fn text(self) -> &'static str {
        match self {
            PoptError::BadOption => "unknown option",
            PoptError::NoArg => "missing argument",
            PoptError::UnwantedArg => "option does not take an argument",
        }
    }
}

/// popt's `poptGetNextOpt()` / `poptGetArg()` over one argv (without the program name).
struct Popt<'a> {
    argv: &'a [String],
    next: usize,
    /// The rest of a bundle of short options (`-Ln` after `L`).
    bundle: Option<String>,
    /// The argv word last consumed, what `poptBadOption()` names.
    last: usize,
    args: std::collections::VecDeque<String>,
    only_args: bool,
}

impl<'a> Popt<'a> {
    fn new(argv: &'a [String]) -> Self {
        Popt {
            argv,
            next: 0,
            bundle: None,
            last: 0,
            args: Default::default(),
            only_args: false,
        }
    }

    fn bad_option(&self) -> &str {
        self.argv.get(self.last).map_or("", String::as_str)
    }

    fn next_opt(&mut self) -> Result<Option<(Tag, Option<String>)>, PoptError> {
        loop {
            if let Some(rest) = self.bundle.take() {
                let c = rest.chars().next().expect("bundles are not empty");
                let def = OPTIONS
                    .iter()
                    .find(|d| d.short == Some(c))
                    .ok_or(PoptError::BadOption)?;
                let after = &rest[c.len_utf8()..];
                let after = after.strip_prefix('=').unwrap_or(after);
                if def.arg == ArgKind::None {
                    if !after.is_empty() {
                        self.bundle = Some(after.to_string());
                    }
                    return Ok(Some((def.tag, None)));
                }
                if !after.is_empty() {
                    return Ok(Some((def.tag, Some(after.to_string()))));
                }
                return self.take_arg(def);
            }
            let Some(word) = self.argv.get(self.next) else {
                return Ok(None);
            };
            self.next += 1;
            self.last = self.next - 1;
            if self.only_args || word == "-" || !word.starts_with('-') {
                self.args.push_back(word.clone());
                continue;
            }
            if word == "--" {
                self.only_args = true;
                continue;
            }
            if let Some(long) = word.strip_prefix("--") {
                let (name, value) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                let def = OPTIONS
                    .iter()
                    .find(|d| d.long == name)
                    .ok_or(PoptError::BadOption)?;
                if def.arg == ArgKind::None {
                    if value.is_some() {
                        return Err(PoptError::UnwantedArg);
                    }
                    return Ok(Some((def.tag, None)));
                }
                if value.is_some() {
                    return Ok(Some((def.tag, value)));
                }
                return self.take_arg(def);
            }
            self.bundle = Some(word[1..].to_string());
        }
    }

    /// The option's value from the next word (an optional value is not taken from a word
    /// that starts with `-`).
    fn take_arg(&mut self, def: &OptDef) -> Result<Option<(Tag, Option<String>)>, PoptError> {
        match self.argv.get(self.next) {
            None if def.arg == ArgKind::Optional => Ok(Some((def.tag, None))),
            None => Err(PoptError::NoArg),
            Some(w) if def.arg == ArgKind::Optional && w.starts_with('-') => {
                Ok(Some((def.tag, None)))
            }
            Some(w) => {
                self.next += 1;
                self.last = self.next - 1;
                Ok(Some((def.tag, Some(w.clone()))))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// parse_options() / process_options()

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    None,
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    fn services_name(self) -> Option<&'static str> {
        match self {
            Proto::Tcp => Some("tcp"),
            Proto::Udp => Some("udp"),
            Proto::Sctp => Some("sctp"),
            Proto::None => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fwd {
    Masq,
    Tunnel,
    Droute,
}

/// `struct ipvs_command_entry` plus the option and format flags.
struct Entry {
    cmd: Cmd,
    options: u64,
    format: ListFormat,
    // service
    af: u16,
    proto: Proto,
    addr: Option<IpAddr>,
    port: u16,
    fwmark: u32,
    /// IPv4: the mask (host order); IPv6: the prefix length.
    netmask: u32,
    persistent: bool,
    timeout: u32,
    onepacket: bool,
    sched_name: String,
    pe_name: String,
    sched_flags: u32,
    // real server
    dest_af: u16,
    dest_addr: Option<IpAddr>,
    dest_port: u16,
    fwd: Fwd,
    weight: u32,
    u_threshold: u32,
    l_threshold: u32,
    tun_type: usize,
    tun_port: u16,
    tun_flags: u32,
    // --set
    timeouts: (u32, u32, u32),
}

impl Entry {
    fn new(cmd: Cmd) -> Self {
        Entry {
            cmd,
            options: 0,
            format: ListFormat::default(),
            af: 0,
            proto: Proto::None,
            addr: None,
            port: 0,
            fwmark: 0,
            netmask: 0xffff_ffff,
            persistent: false,
            timeout: 0,
            onepacket: false,
            sched_name: String::new(),
            pe_name: String::new(),
            sched_flags: 0,
            dest_af: 0,
            dest_addr: None,
            dest_port: 0,
            fwd: Fwd::Droute,
            weight: 1,
            u_threshold: 0,
            l_threshold: 0,
            tun_type: 0,
            tun_port: 0,
            tun_flags: 0,
            timeouts: (0, 0, 0),
        }
    }

    fn has(&self, opt: usize) -> bool {
        self.options & (1 << opt) != 0
    }

    /// `set_option()`.
    fn set(&mut self, opt: usize) -> Result<(), CliError> {
        if self.has(opt) {
            return Err(CliError::fail(format!(
                "multiple '{}' options specified",
                OPTNAMES[opt]
            )));
        }
        self.options |= 1 << opt;
        Ok(())
    }
}

/// Parses one ipvsadm command line (without the program name), with this machine's
/// `/etc/services` for port names.
pub fn parse_args(args: &[String]) -> Result<Invocation, CliError> {
    parse_args_with(args, PortNames::system())
}

/// [`parse_args`] with the given port names.
pub fn parse_args_with(args: &[String], names: &PortNames) -> Result<Invocation, CliError> {
    let mut popt = Popt::new(args);
    let (tag, arg) = match popt.next_opt() {
        Ok(Some(first)) => first,
        Ok(None) | Err(_) => return Err(CliError::tryhelp()),
    };
    let cmd = match tag {
        Tag::Add => Cmd::Add,
        Tag::Edit => Cmd::Edit,
        Tag::Del => Cmd::Del,
        Tag::AddServer => Cmd::AddDest,
        Tag::EditServer => Cmd::EditDest,
        Tag::DelServer => Cmd::DelDest,
        Tag::Clear => Cmd::Flush,
        Tag::List => Cmd::List,
        Tag::Zero => Cmd::Zero,
        Tag::Set => Cmd::Timeout,
        Tag::Restore => Cmd::Restore,
        Tag::Save => Cmd::Save,
        Tag::StartDaemon => {
            if !matches!(arg.as_deref(), Some("master" | "backup")) {
                return Err(CliError::fail("illegal start-daemon parameter specified"));
            }
            Cmd::StartDaemon
        }
        Tag::StopDaemon => {
            if !matches!(arg.as_deref(), Some("master" | "backup")) {
                return Err(CliError::fail("illegal start_daemon specified"));
            }
            Cmd::StopDaemon
        }
        Tag::Help => return Ok(Invocation::Help),
        Tag::Version => return Ok(Invocation::Version),
        _ => return Err(CliError::tryhelp()),
    };
    let mut e = Entry::new(cmd);
    let mut sched_flags_arg = String::new();
    loop {
        let (tag, arg) = match popt.next_opt() {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(err) => {
                return Err(CliError {
                    message: format!("{}: {}", popt.bad_option(), err.text()),
                    exit_code: EXIT_KERNEL,
                });
            }
        };
        let value = arg.clone();
        let arg = arg.unwrap_or_default();
        match tag {
            Tag::Tcp | Tag::Udp | Tag::Sctp => {
                e.set(optc::SERVICE)?;
                e.proto = match tag {
                    Tag::Tcp => Proto::Tcp,
                    Tag::Udp => Proto::Udp,
                    _ => Proto::Sctp,
                };
                let p = parse_service(&arg, e.proto, names);
                p.apply_to_service(&mut e);
                if p.result & SERVICE_ADDR == 0 {
                    return Err(CliError::fail(
                        "illegal virtual server address[:port] specified",
                    ));
                }
            }
            Tag::Fwmark => {
                e.set(optc::SERVICE)?;
                e.af = AF_INET;
                e.proto = Proto::Tcp;
                e.fwmark = parse_fwmark(&arg)?;
            }
            Tag::Scheduler => {
                e.set(optc::SCHEDULER)?;
                e.sched_name = arg.chars().take(15).collect();
            }
            Tag::Persistent => {
                e.set(optc::PERSISTENT)?;
                e.persistent = true;
                e.timeout = parse_timeout(value.as_deref(), 1, MAX_PERSISTENCE_TIMEOUT)?;
            }
            Tag::Netmask => {
                e.set(optc::NETMASK)?;
                if e.af != AF_INET6 {
                    e.netmask = parse_netmask(&arg).ok_or_else(|| {
                        CliError::fail("illegal virtual server persistent mask specified")
                    })?;
                } else {
                    let n = atoi(&arg);
                    if !(1..=128).contains(&n) {
                        return Err(CliError::fail("illegal ipv6 netmask specified"));
                    }
                    e.netmask = n as u32;
                }
            }
            Tag::RealServer => {
                e.set(optc::SERVER)?;
                let p = parse_service(&arg, e.proto, names);
                e.dest_af = p.af.unwrap_or(e.af);
                e.dest_addr = p.addr.or(e.addr);
                e.dest_port = p.port.unwrap_or(e.port);
                if p.result & SERVICE_ADDR == 0 {
                    return Err(CliError::fail(
                        "illegal real server address[:port] specified",
                    ));
                }
                if p.result == SERVICE_ADDR {
                    e.dest_port = e.port;
                }
            }
            Tag::Ipip | Tag::Gatewaying | Tag::Masquerading => {
                e.set(optc::FORWARD)?;
                e.fwd = match tag {
                    Tag::Ipip => Fwd::Tunnel,
                    Tag::Gatewaying => Fwd::Droute,
                    _ => Fwd::Masq,
                };
            }
            Tag::Weight => {
                e.set(optc::WEIGHT)?;
                e.weight = string_to_number(&arg, 0, 65535)
                    .ok_or_else(|| CliError::fail("illegal weight specified"))?
                    as u32;
            }
            Tag::UThreshold => {
                e.set(optc::UTHRESHOLD)?;
                e.u_threshold = string_to_number(&arg, 0, i32::MAX as i64)
                    .ok_or_else(|| CliError::fail("illegal u_threshold specified"))?
                    as u32;
            }
            Tag::LThreshold => {
                e.set(optc::LTHRESHOLD)?;
                e.l_threshold = string_to_number(&arg, 0, i32::MAX as i64)
                    .ok_or_else(|| CliError::fail("illegal l_threshold specified"))?
                    as u32;
            }
            Tag::Connection => e.set(optc::CONNECTION)?,
            Tag::Numeric => {
                e.set(optc::NUMERIC)?;
                e.format.numeric = true;
            }
            Tag::McastInterface => e.set(optc::MCAST)?,
            Tag::SyncId => {
                e.set(optc::SYNCID)?;
                string_to_number(&arg, 0, 255)
                    .ok_or_else(|| CliError::fail("illegal syncid specified"))?;
            }
            Tag::Timeout => e.set(optc::TIMEOUT)?,
            Tag::Daemon => e.set(optc::DAEMON)?,
            Tag::Stats => {
                e.set(optc::STATS)?;
                e.format.stats = true;
            }
            Tag::Rate => {
                e.set(optc::RATE)?;
                e.format.rate = true;
            }
            Tag::Thresholds => {
                e.set(optc::THRESHOLDS)?;
                e.format.thresholds = true;
            }
            Tag::PersistentConn => {
                e.set(optc::PERSISTENTCONN)?;
                e.format.persistent_conn = true;
            }
            Tag::NoSort => {
                e.set(optc::NOSORT)?;
                e.format.nosort = true;
            }
            // Sort is the default, a no-op for compatibility.
            Tag::Sort => {}
            Tag::Exact => {
                e.set(optc::EXACT)?;
                e.format.exact = true;
            }
            Tag::Ipv6 => {
                if e.fwmark != 0 {
                    e.af = AF_INET6;
                    e.netmask = 128;
                } else {
                    return Err(CliError::fail("-6 used before -f\n"));
                }
            }
            Tag::Ops => {
                e.set(optc::ONEPACKET)?;
                e.onepacket = true;
            }
            Tag::Pe => {
                e.set(optc::PERSISTENCE_ENGINE)?;
                e.pe_name = arg.chars().take(32).collect();
            }
            Tag::SchedFlags => {
                e.set(optc::SCHED_FLAGS)?;
                sched_flags_arg = arg.chars().take(127).collect();
            }
            Tag::McastGroup => {
                e.set(optc::MCAST_GROUP)?;
                if arg.contains(':') {
                    if !arg.parse::<Ipv6Addr>().is_ok_and(|a| a.is_multicast()) {
                        return Err(CliError::fail(format!("invalid IPv6 mcast-group `{arg}'")));
                    }
                } else if !arg.parse::<Ipv4Addr>().is_ok_and(|a| a.is_multicast()) {
                    return Err(CliError::fail(format!("invalid IPv4 mcast-group `{arg}'")));
                }
            }
            Tag::McastPort => {
                e.set(optc::MCAST_PORT)?;
                string_to_number(&arg, 1, 65535)
                    .ok_or_else(|| CliError::fail("illegal mcast-port specified"))?;
            }
            Tag::McastTtl => {
                e.set(optc::MCAST_TTL)?;
                string_to_number(&arg, 1, 255)
                    .ok_or_else(|| CliError::fail("illegal mcast-ttl specified"))?;
            }
            Tag::SyncMaxlen => {
                e.set(optc::SYNC_MAXLEN)?;
                string_to_number(&arg, 1, 65535 - 20 - 8)
                    .ok_or_else(|| CliError::fail("illegal sync-maxlen specified"))?;
            }
            Tag::TunInfo => {
                e.set(optc::TUN_INFO)?;
                e.format.tun_info = true;
            }
            Tag::TunType => {
                e.set(optc::TUN_TYPE)?;
                e.tun_type = TUNNAMES
                    .iter()
                    .position(|n| *n == arg)
                    .ok_or_else(|| CliError::fail("illegal tunnel type specified"))?;
            }
            Tag::TunPort => {
                e.set(optc::TUN_PORT)?;
                e.tun_port = string_to_number(&arg, 1, 65535)
                    .ok_or_else(|| CliError::fail("illegal tunnel port specified"))?
                    as u16;
            }
            Tag::TunNocsum => e.set(optc::TUN_NOCSUM)?,
            Tag::TunCsum => {
                e.set(optc::TUN_CSUM)?;
                e.tun_flags |= TUN_F_CSUM;
            }
            Tag::TunRemcsum => {
                e.set(optc::TUN_REMCSUM)?;
                e.tun_flags |= TUN_F_REMCSUM;
            }
            // A command after the first one.
            Tag::Add
            | Tag::Edit
            | Tag::Del
            | Tag::Clear
            | Tag::List
            | Tag::Zero
            | Tag::AddServer
            | Tag::EditServer
            | Tag::DelServer
            | Tag::Set
            | Tag::Help
            | Tag::Version
            | Tag::Restore
            | Tag::Save
            | Tag::StartDaemon
            | Tag::StopDaemon => {
                return Err(CliError::fail(format!(
                    "invalid option `{}'",
                    popt.bad_option()
                )));
            }
        }
    }

    if e.cmd == Cmd::Timeout {
        if popt.args.len() < 3 {
            return Err(CliError::fail("--set option requires 3 timeout values"));
        }
        let mut t = [0u32; 3];
        for slot in &mut t {
            let a = popt.args.pop_front().unwrap_or_default();
            *slot = parse_timeout(Some(&a), 0, MAX_PERSISTENCE_TIMEOUT)?;
        }
        e.timeouts = (t[0], t[1], t[2]);
    }
    if let Some(a) = popt.args.pop_front() {
        return Err(CliError::fail(format!("unexpected argument {a}")));
    }
    if !sched_flags_arg.is_empty() {
        e.sched_flags = parse_sched_flags(&e.sched_name, &sched_flags_arg)?;
    }

    process_options(e)
}

/// The checks of `process_options()` after parsing, then what the command means for xlb.
fn process_options(mut e: Entry) -> Result<Invocation, CliError> {
    generic_opt_check(e.cmd, e.options)?;

    if matches!(e.cmd, Cmd::Add | Cmd::Edit) {
        if e.fwmark == 0 && e.port == 0 && !e.persistent {
            return Err(CliError::fail(
                "Zero port specified for non-persistent service",
            ));
        }
        if e.onepacket && e.fwmark == 0 && e.proto != Proto::Udp {
            return Err(CliError::fail(
                "One-Packet Scheduling is only for UDP virtual services",
            ));
        }
        if e.sched_name.is_empty() {
            e.sched_name = "wlc".into();
        }
    }

    if matches!(e.cmd, Cmd::AddDest | Cmd::EditDest) {
        // The destination port must be the service port for DR and tunnels (not for
        // firewall-mark services).
        if e.fwmark == 0 && matches!(e.fwd, Fwd::Tunnel | Fwd::Droute) {
            e.dest_port = e.port;
        }
        if e.dest_af != e.af && e.fwd != Fwd::Tunnel {
            return Err(CliError::fail(
                "Different address family is allowed only for tunneling servers",
            ));
        }
        let tun_opts = [
            optc::TUN_TYPE,
            optc::TUN_PORT,
            optc::TUN_NOCSUM,
            optc::TUN_CSUM,
            optc::TUN_REMCSUM,
        ];
        if tun_opts.iter().any(|o| e.has(*o)) && e.fwd != Fwd::Tunnel {
            return Err(CliError::fail(
                "Tunnel options conflict with forward method",
            ));
        }
        tunnel_opt_check(e.tun_type, e.options)?;
    }

    if e.cmd == Cmd::List {
        let any = |opts: &[usize]| opts.iter().any(|o| e.has(*o));
        if (any(&[optc::CONNECTION, optc::TIMEOUT, optc::DAEMON])
            && any(&[optc::STATS, optc::RATE, optc::THRESHOLDS]))
            || (any(&[optc::TIMEOUT, optc::DAEMON]) && e.has(optc::PERSISTENTCONN))
        {
            return Err(CliError::fail("options conflicts in the list command"));
        }
    }

    Ok(invocation(&e))
}

/// `generic_opt_check()`.
fn generic_opt_check(cmd: Cmd, options: u64) -> Result<(), CliError> {
    let i = cmd as usize;
    let row = MATRIX[i].as_bytes();
    let mut last = 0;
    let mut count = 0;
    for (j, &rule) in row.iter().enumerate() {
        if options & (1 << j) == 0 {
            if rule == b'+' {
                return Err(CliError::fail(format!(
                    "You need to supply the '{}' option for the '{}' command",
                    OPTNAMES[j], CMDNAMES[i]
                )));
            }
        } else {
            if rule == b'x' {
                return Err(CliError::fail(format!(
                    "Illegal '{}' option with the '{}' command",
                    OPTNAMES[j], CMDNAMES[i]
                )));
            }
            if rule == b'1' {
                count += 1;
                if count == 1 {
                    last = j;
                    continue;
                }
                return Err(CliError::fail(format!(
                    "The option '{}' conflicts with the '{}' option in the '{}' command",
                    OPTNAMES[j], OPTNAMES[last], CMDNAMES[i]
                )));
            }
        }
    }
    Ok(())
}

/// `tunnel_opt_check()`.
fn tunnel_opt_check(tun_type: usize, options: u64) -> Result<(), CliError> {
    let row = TUN_MATRIX[tun_type].as_bytes();
    let mut last = 0;
    let mut count = 0;
    for (j, &k) in TUNOPTS.iter().enumerate() {
        if options & (1 << k) == 0 {
            if row[j] == b'+' {
                return Err(CliError::fail(format!(
                    "You need to supply the '{}' option for the '{}' tunnel type",
                    OPTNAMES[k], TUNNAMES[tun_type]
                )));
            }
        } else {
            if row[j] == b'x' {
                return Err(CliError::fail(format!(
                    "Illegal '{}' option with the '{}' tunnel type",
                    OPTNAMES[k], TUNNAMES[tun_type]
                )));
            }
            if row[j] == b'1' {
                count += 1;
                if count == 1 {
                    last = k;
                    continue;
                }
                return Err(CliError::fail(format!(
                    "The option '{}' conflicts with the '{}' option in the '{}' tunnel type",
                    OPTNAMES[k], OPTNAMES[last], TUNNAMES[tun_type]
                )));
            }
        }
    }
    Ok(())
}

fn refused(message: impl Into<String>) -> Invocation {
    Invocation::Refused {
        message: message.into(),
    }
}

/// What the checked command line asks of xlb.
fn invocation(e: &Entry) -> Invocation {
    // The service, if it is one xlb can have: Err(what the kernel would say to -A).
    let key = || -> Result<ServiceKey, &'static str> {
        if e.fwmark != 0 {
            return Err(FWMARK_REFUSED);
        }
        let protocol = match e.proto {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
            _ => return Err(SCTP_REFUSED),
        };
        Ok(ServiceKey::new(
            e.addr.expect("a parsed -t/-u has an address"),
            e.port,
            protocol,
        ))
    };
    match e.cmd {
        Cmd::Add | Cmd::Edit => {
            let key = match key() {
                Ok(k) => k,
                Err(m) if e.cmd == Cmd::Add => return refused(m),
                Err(_) => return refused("No such service"),
            };
            let Ok(scheduler) = Scheduler::from_str(&e.sched_name) else {
                return refused("Scheduler or persistence engine not found");
            };
            if e.has(optc::PERSISTENCE_ENGINE) {
                return refused(if e.pe_name == "sip" {
                    PE_REFUSED
                } else {
                    "Scheduler or persistence engine not found"
                });
            }
            if e.onepacket {
                return refused(OPS_REFUSED);
            }
            let persistence = if e.persistent {
                let prefix = if key.addr.is_ipv4() {
                    let m = e.netmask;
                    if m == 0 || m.leading_ones() + m.trailing_zeros() != 32 {
                        return refused(format!(
                            "Netmask {} is not supported by xlb: persistence groups clients by address prefix, so the mask must be ones followed by zeros (e.g. 255.255.255.0)",
                            Ipv4Addr::from(m)
                        ));
                    }
                    m.leading_ones() as u8
                } else {
                    e.netmask as u8
                };
                Some(Persistence {
                    timeout: e.timeout,
                    prefix,
                })
            } else {
                None
            };
            // IPVS's SCHED1/SCHED2 are the fallback and port flags of sh and mh; other
            // schedulers ignore them (and xlb does not keep them).
            let sched_flags = if matches!(scheduler, Scheduler::Sh | Scheduler::Mh) {
                SchedFlags {
                    fallback: e.sched_flags & SVC_F_SCHED1 != 0,
                    port: e.sched_flags & SVC_F_SCHED2 != 0,
                }
            } else {
                SchedFlags::default()
            };
            let service = ServiceConfig {
                name: service_name(&key),
                key,
                ports: vec![if key.port == 0 {
                    PortRange::ALL
                } else {
                    PortRange::one(key.port)
                }],
                persistence,
                scheduler,
                sched_flags,
                mh_table_size: lb_common::hash::MH_DEFAULT_SIZE,
                conntrack: true,
                forwarding: Forwarding::Dr,
                backends: Vec::new(),
                health: Default::default(),
            };
            Invocation::Change(if e.cmd == Cmd::Add {
                Change::AddService { service }
            } else {
                Change::EditService { service }
            })
        }
        Cmd::Del => match key() {
            Ok(key) => Invocation::Change(Change::DeleteService { key }),
            Err(_) => refused("No such service"),
        },
        Cmd::Flush => Invocation::Change(Change::Clear),
        Cmd::Zero => {
            if !e.has(optc::SERVICE) {
                return Invocation::Change(Change::Zero { key: None });
            }
            match key() {
                Ok(key) => Invocation::Change(Change::Zero { key: Some(key) }),
                Err(_) => refused("No such service"),
            }
        }
        Cmd::AddDest | Cmd::EditDest | Cmd::DelDest => {
            let Ok(key) = key() else {
                return refused("Service not defined");
            };
            let addr = e.dest_addr.expect("a parsed -r has an address");
            let port = e.dest_port;
            if e.cmd == Cmd::DelDest {
                return Invocation::Change(Change::DeleteServer { key, addr, port });
            }
            if e.l_threshold > e.u_threshold {
                // The kernel's -ERANGE, through strerror().
                return refused("Numerical result out of range");
            }
            let (forwarding, tunnel) = match e.fwd {
                Fwd::Droute => (Forwarding::Dr, None),
                Fwd::Masq => (Forwarding::Nat, None),
                Fwd::Tunnel => (
                    Forwarding::Tunnel,
                    Some(Tunnel {
                        kind: [TunnelType::Ipip, TunnelType::Gue, TunnelType::Gre][e.tun_type],
                        port: e.tun_port,
                        checksum: if e.tun_flags & TUN_F_REMCSUM != 0 {
                            TunnelChecksum::Remcsum
                        } else if e.tun_flags & TUN_F_CSUM != 0 {
                            TunnelChecksum::Csum
                        } else {
                            TunnelChecksum::None
                        },
                        source: None,
                    }),
                ),
            };
            let server = BackendConfig {
                addr,
                port,
                weight: e.weight,
                forwarding,
                tunnel,
                upper_threshold: e.u_threshold,
                lower_threshold: e.l_threshold,
                health: Default::default(),
            };
            Invocation::Change(if e.cmd == Cmd::AddDest {
                Change::AddServer { key, server }
            } else {
                Change::EditServer { key, server }
            })
        }
        Cmd::Timeout => Invocation::Change(Change::SetTimeouts {
            tcp: e.timeouts.0,
            tcp_fin: e.timeouts.1,
            udp: e.timeouts.2,
        }),
        Cmd::StartDaemon => refused(SYNC_REFUSED),
        // The kernel's answer: no daemon runs.
        Cmd::StopDaemon => refused("No daemon is running"),
        Cmd::Restore => Invocation::Restore,
        Cmd::Save => Invocation::Save {
            numeric: e.format.numeric,
        },
        Cmd::List => {
            let target = if e.has(optc::CONNECTION) {
                ListTarget::Connections
            } else if e.has(optc::SERVICE) {
                match key() {
                    Ok(k) => ListTarget::Service(k),
                    Err(_) => ListTarget::Unservable,
                }
            } else if e.has(optc::TIMEOUT) {
                ListTarget::Timeout
            } else if e.has(optc::DAEMON) {
                ListTarget::Daemon
            } else {
                ListTarget::All
            };
            Invocation::List(ListRequest {
                target,
                format: e.format,
            })
        }
    }
}

// ---------------------------------------------------------------------------------------
// ipvsadm's value parsers

const SERVICE_ADDR: u8 = 1;
const SERVICE_PORT: u8 = 2;

/// What `parse_service()` found.
#[derive(Debug, Default)]
struct ServiceParse {
    result: u8,
    af: Option<u16>,
    addr: Option<IpAddr>,
    port: Option<u16>,
}

impl ServiceParse {
    fn apply_to_service(&self, e: &mut Entry) {
        if let (Some(af), Some(addr)) = (self.af, self.addr) {
            e.af = af;
            e.addr = Some(addr);
            if af == AF_INET6 {
                e.netmask = 128;
            }
        }
        if let Some(p) = self.port {
            e.port = p;
        }
    }
}

/// `parse_service()`: `host[:port]`, `[v6]:port`, or an unbracketed IPv6 address (which
/// takes no port); the port is a number or an `/etc/services` name of the protocol.
fn parse_service(buf: &str, proto: Proto, names: &PortNames) -> ServiceParse {
    let mut r = ServiceParse::default();
    if str_is_digit(buf) {
        return r;
    }
    let mut host = buf;
    let mut portp: Option<&str> = None;
    if let Some(rest) = buf.strip_prefix('[') {
        let Some(i) = rest.find(']') else {
            return r;
        };
        host = &rest[..i];
        match rest[i + 1..].strip_prefix(':') {
            Some(p) => portp = Some(p),
            None => return r,
        }
    }
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        r.af = Some(AF_INET6);
        r.addr = Some(IpAddr::V6(v6));
    } else {
        // As ipvsadm: the last colon of what is left separates the port ("[1.2.3.4]:80"
        // thereby loses its port).
        portp = None;
        if let Some(i) = host.rfind(':') {
            portp = Some(&host[i + 1..]);
            host = &host[..i];
        }
        match inet_aton(host).or_else(|| host_to_addr(host)) {
            Some(a) => {
                r.af = Some(AF_INET);
                r.addr = Some(IpAddr::V4(a));
            }
            None => return r,
        }
    }
    r.result |= SERVICE_ADDR;
    if let Some(p) = portp {
        r.result |= SERVICE_PORT;
        match string_to_number(p, 0, 65535)
            .map(|n| n as u16)
            .or_else(|| proto.services_name().and_then(|proto| names.port(p, proto)))
        {
            Some(n) => r.port = Some(n),
            None => r.result = 0,
        }
    }
    r
}

/// `str_is_digit()`: true for "" too.
fn str_is_digit(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

/// `strtol(s, &end, 10)` with `*end == '\0' && end != s`, in `min..=max`.
fn string_to_number(s: &str, min: i64, max: i64) -> Option<i64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !str_is_digit(digits) {
        return None;
    }
    let v: i64 = digits.parse().ok()?;
    let v = if neg { -v } else { v };
    (min..=max).contains(&v).then_some(v)
}

/// `atoi()`.
fn atoi(s: &str) -> i64 {
    let t = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let digits: String = rest
        .chars()
        .take_while(char::is_ascii_digit)
        .take(18)
        .collect();
    let v: i64 = digits.parse().unwrap_or(0);
    if neg { -v } else { v }
}

/// `parse_timeout()`: no value = 360 s (`-p` alone).
fn parse_timeout(buf: Option<&str>, min: u32, max: u32) -> Result<u32, CliError> {
    let Some(buf) = buf else {
        return Ok(DEFAULT_PERSISTENCE_TIMEOUT);
    };
    string_to_number(buf, min as i64, max as i64)
        .map(|v| v as u32)
        .ok_or_else(|| CliError::fail(format!("invalid timeout value `{buf}' specified")))
}

/// `parse_fwmark()`.
fn parse_fwmark(buf: &str) -> Result<u32, CliError> {
    string_to_number(buf, 1, u32::MAX as i64)
        .map(|v| v as u32)
        .ok_or_else(|| CliError::fail(format!("invalid fwmark value `{buf}' specified")))
}

/// `parse_netmask()`: a dotted mask (any `inet_aton()` form) or a host name.
fn parse_netmask(buf: &str) -> Option<u32> {
    inet_aton(buf).or_else(|| host_to_addr(buf)).map(u32::from)
}

/// `parse_sched_flags()`: comma-separated, checked against the scheduler (wlc when none was
/// given).
fn parse_sched_flags(sched: &str, arg: &str) -> Result<u32, CliError> {
    let sched = if sched.is_empty() { "wlc" } else { sched };
    let mut flags = 0;
    let mut tokens: Vec<&str> = arg.split(',').filter(|t| !t.is_empty()).collect();
    if tokens.is_empty() {
        tokens.push(arg);
    }
    for flag in tokens {
        let (bit, only) = match flag {
            "flag-1" => (SVC_F_SCHED1, None),
            "flag-2" => (SVC_F_SCHED2, None),
            "flag-3" => (SVC_F_SCHED3, None),
            "sh-fallback" => (SVC_F_SCHED1, Some("sh")),
            "sh-port" => (SVC_F_SCHED2, Some("sh")),
            "mh-fallback" => (SVC_F_SCHED1, Some("mh")),
            "mh-port" => (SVC_F_SCHED2, Some("mh")),
            _ => {
                return Err(CliError::fail(format!("invalid scheduler flag `{flag}'")));
            }
        };
        flags |= bit;
        if only.is_some_and(|s| s != sched) {
            return Err(CliError::fail(format!(
                "incompatible scheduler flag `{flag}'"
            )));
        }
    }
    Ok(flags)
}

/// glibc's `inet_aton()`: `a.b.c.d`, `a.b.c` (c: 16 bits), `a.b` (b: 24 bits), `a`
/// (32 bits), each part decimal, octal (leading 0) or hex (0x).
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut vals = Vec::with_capacity(4);
    for p in &parts {
        let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or(p.strip_prefix("0X")) {
            (h, 16)
        } else if p.len() > 1 && p.starts_with('0') {
            (&p[1..], 8)
        } else {
            (*p, 10)
        };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let v = if digits.is_empty() {
            0
        } else {
            if !digits.chars().all(|c| c.is_digit(radix)) {
                return None;
            }
            u64::from_str_radix(digits, radix).ok()?
        };
        vals.push(v);
    }
    let (last, head) = vals.split_last()?;
    if head.iter().any(|v| *v > 0xff) || *last >= 1u64 << (8 * (4 - head.len())) {
        return None;
    }
    let mut addr = *last as u32;
    for (i, v) in head.iter().enumerate() {
        addr |= (*v as u32) << (24 - 8 * i);
    }
    Some(Ipv4Addr::from(addr))
}

/// `host_to_addr()`: a host name's first IPv4 address. Names of digits and dots are not
/// looked up (no such host name exists; this keeps typos off the DNS).
fn host_to_addr(name: &str) -> Option<Ipv4Addr> {
    if name.is_empty()
        || name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return None;
    }
    (name, 0)
        .to_socket_addrs()
        .ok()?
        .find_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
}

// ---------------------------------------------------------------------------------------
// -R

/// One line of an `ipvsadm -R` input, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreLine {
    /// 1-based line number.
    pub line: usize,
    pub what: RestoreItem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreItem {
    Change(Change),
    /// Refused as the kernel would refuse it: reported, and the restore goes on.
    Refused(String),
}

/// Parses `ipvsadm -R`'s input: one command per line, words split on blanks, a leading word
/// `ipvsadm` ignored, `#` to the end of the line a comment, blank lines skipped. Any line
/// that does not parse, or is not a change (e.g. `-L`), fails the whole input with exit
/// status 2 and a message naming the line; nothing is applied then.
pub fn parse_restore(text: &str, names: &PortNames) -> Result<Vec<RestoreLine>, CliError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
        let mut words: Vec<String> = content
            .split([' ', '\t', '\r'])
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        if words.first().is_some_and(|w| w == "ipvsadm") {
            words.remove(0);
        }
        if words.is_empty() {
            continue;
        }
        let bad = |msg: &str| CliError {
            message: format!(
                "{}\nline {line}: {}\nnothing was restored",
                msg.trim_end_matches('\n'),
                content.trim()
            ),
            exit_code: EXIT_FAIL,
        };
        let what = match parse_args_with(&words, names) {
            Ok(Invocation::Change(c)) => RestoreItem::Change(c),
            Ok(Invocation::Refused { message }) => RestoreItem::Refused(message),
            Ok(_) => return Err(bad("only changes can be restored")),
            Err(e) => return Err(bad(&e.message)),
        };
        out.push(RestoreLine { line, what });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Texts

/// `-v`: ipvsadm's version line, naming xlb.
pub fn version() -> String {
    format!(
        "ipvsadm {IPVSADM_VERSION} {IPVSADM_VERSION_DATE} (compiled with xlb v{}, IPVS v1.2.1 semantics over XDP)\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// `-h`: ipvsadm 1.31's usage text, preceded by the version line.
pub fn usage(program: &str) -> String {
    let mut s = version();
    s.push_str(&USAGE.replace("{P}", program));
    s
}

const USAGE: &str = r#"Usage:
  {P} -A|E virtual-service [-s scheduler] [-p [timeout]] [-M netmask] [--pe persistence_engine] [-b sched-flags]
  {P} -D virtual-service
  {P} -C
  {P} -R
  {P} -S [-n]
  {P} -a|e virtual-service -r server-address [options]
  {P} -d virtual-service -r server-address
  {P} -L|l [virtual-service] [options]
  {P} -Z [virtual-service]
  {P} --set tcp tcpfin udp
  {P} --start-daemon {master|backup} [daemon-options]
  {P} --stop-daemon {master|backup}
  {P} -h

Commands:
Either long or short options are allowed.
  --add-service     -A        add virtual service with options
  --edit-service    -E        edit virtual service with options
  --delete-service  -D        delete virtual service
  --clear           -C        clear the whole table
  --restore         -R        restore rules from stdin
  --save            -S        save rules to stdout
  --add-server      -a        add real server with options
  --edit-server     -e        edit real server with options
  --delete-server   -d        delete real server
  --list            -L|-l     list the table
  --zero            -Z        zero counters in a service or all services
  --set tcp tcpfin udp        set connection timeout values
  --start-daemon              start connection sync daemon
  --stop-daemon               stop connection sync daemon
  --help            -h        display this help message

virtual-service:
  --tcp-service|-t  service-address   service-address is host[:port]
  --udp-service|-u  service-address   service-address is host[:port]
  --sctp-service    service-address   service-address is host[:port]
  --fwmark-service|-f fwmark          fwmark is an integer greater than zero

Options:
  --ipv6         -6                   fwmark entry uses IPv6
  --scheduler    -s scheduler         one of rr|wrr|lc|wlc|lblc|lblcr|dh|sh|sed|nq|fo|ovf|mh,
                                      the default scheduler is wlc.
  --pe            engine              alternate persistence engine may be sip,
                                      not set by default.
  --persistent   -p [timeout]         persistent service
  --netmask      -M netmask           persistent granularity mask
  --real-server  -r server-address    server-address is host (and port)
  --gatewaying   -g                   gatewaying (direct routing) (default)
  --ipip         -i                   ipip encapsulation (tunneling)
  --masquerading -m                   masquerading (NAT)
  --tun-type      type                one of ipip|gue|gre,
                                      the default tunnel type is ipip.
  --tun-port      port                tunnel destination port
  --tun-nocsum                        tunnel encapsulation without checksum
  --tun-csum                          tunnel encapsulation with checksum
  --tun-remcsum                       tunnel encapsulation with remote checksum
  --weight       -w weight            capacity of real server
  --u-threshold  -x uthreshold        upper threshold of connections
  --l-threshold  -y lthreshold        lower threshold of connections
  --connection   -c                   output of current IPVS connections
  --timeout                           output of timeout (tcp tcpfin udp)
  --daemon                            output of daemon information
  --stats                             output of statistics information
  --rate                              output of rate information
  --exact                             expand numbers (display exact values)
  --thresholds                        output of thresholds information
  --persistent-conn                   output of persistent connection info
  --tun-info                          output of tunnel information
  --nosort                            disable sorting output of service/server entries
  --sort                              does nothing, for backwards compatibility
  --ops          -o                   one-packet scheduling
  --numeric      -n                   numeric output of addresses and ports
  --sched-flags  -b flags             scheduler flags (comma-separated)
Daemon Options:
  --syncid sid                        syncid for connection sync (default=255)
  --sync-maxlen length                Max sync message length (default=1472)
  --mcast-interface interface         multicast interface for connection sync
  --mcast-group address               IPv4/IPv6 group (default=224.0.0.81)
  --mcast-port port                   UDP port (default=8848)
  --mcast-ttl ttl                     Multicast TTL (default=1)

xlb: firewall-mark and SCTP services, one-packet scheduling (-o), persistence engines
(--pe) and the sync daemon are not supported; addresses are always shown numerically.
"#;

/// What ipvsadm prints for a change the kernel refused (`ipvs_strerror()` knows which
/// command got which errno: "Service not defined" for the server commands).
pub fn error_text(change: &Change, err: &ChangeError) -> String {
    let server_cmd = matches!(
        change,
        Change::AddServer { .. } | Change::EditServer { .. } | Change::DeleteServer { .. }
    );
    match err {
        ChangeError::NoService if server_cmd => "Service not defined".into(),
        e => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Running it

fn stdout_write(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

fn stderr_line(s: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{s}");
}

/// Runs ipvsadm as invoked: `program` is the basename it was called by (`ipvsadm`;
/// `ipvsadm-save` = `ipvsadm -S`, which takes `-n`; `ipvsadm-restore` = `ipvsadm -R`),
/// `args` the words after it. Talks to the daemon on `socket`; prints to stdout and stderr
/// as ipvsadm does; returns the exit status.
pub async fn run(program: &str, args: Vec<String>, socket: PathBuf) -> i32 {
    let program = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    let mut args = args;
    match program {
        "ipvsadm-save" => args.insert(0, "-S".into()),
        "ipvsadm-restore" => args.insert(0, "-R".into()),
        _ => {}
    }
    let inv = if args.is_empty() {
        // No arguments: `list_all(FMT_NONE)`, names resolved.
        Invocation::List(ListRequest {
            target: ListTarget::All,
            format: ListFormat::default(),
        })
    } else {
        match parse_args(&args) {
            Ok(i) => i,
            Err(e) => {
                stderr_line(&e.message);
                return e.exit_code;
            }
        }
    };
    match &inv {
        Invocation::Help => {
            stdout_write(&usage("ipvsadm"));
            return 0;
        }
        Invocation::Version => {
            stdout_write(&version());
            return 0;
        }
        _ => {}
    }
    // ipvsadm's `ipvs_init()`: without the kernel's IPVS it can do nothing.
    if let Err(e) = tokio::net::UnixStream::connect(&socket).await {
        stderr_line(&format!(
            "Can't initialize ipvs: cannot reach the xlb daemon at {}: {e}\nAre you sure that the xlb daemon is running (`xlb run`; --socket or XLB_SOCKET select another instance)?",
            socket.display()
        ));
        return EXIT_FAIL;
    }
    match inv {
        Invocation::Help | Invocation::Version => 0,
        Invocation::Refused { message } => {
            stderr_line(&message);
            EXIT_KERNEL
        }
        Invocation::Change(c) => {
            let items = vec![RestoreLine {
                line: 1,
                what: RestoreItem::Change(c),
            }];
            apply(&socket, items, false).await
        }
        Invocation::List(req) => list(&socket, req).await,
        Invocation::Save { numeric } => {
            let resp: ServicesResponse = match api::get_json(&socket, "/v1/services").await {
                Ok(r) => r,
                Err(e) => {
                    stderr_line(&format!("{e:#}"));
                    return EXIT_LIST;
                }
            };
            let empty = PortNames::default();
            let names = if numeric { &empty } else { PortNames::system() };
            stdout_write(&ipvsadm::save(&resp, numeric, names));
            for note in ipvsadm::unsaveable(&resp) {
                stderr_line(&format!("xlb: {note}"));
            }
            0
        }
        Invocation::Restore => {
            let mut text = String::new();
            if let Err(e) =
                tokio::io::AsyncReadExt::read_to_string(&mut tokio::io::stdin(), &mut text).await
            {
                stderr_line(&format!("reading the rules from stdin: {e}"));
                return EXIT_FAIL;
            }
            match parse_restore(&text, PortNames::system()) {
                Ok(items) => apply(&socket, items, true).await,
                Err(e) => {
                    stderr_line(&e.message);
                    e.exit_code
                }
            }
        }
    }
}

/// Sends the changes in one request and reports each refusal in line order; 0 if all were
/// made, 255 otherwise.
async fn apply(socket: &Path, items: Vec<RestoreLine>, skip_failed: bool) -> i32 {
    let mut changes: Vec<Change> = items
        .iter()
        .filter_map(|l| match &l.what {
            RestoreItem::Change(c) => Some(c.clone()),
            RestoreItem::Refused(_) => None,
        })
        .collect();
    let resp = if changes.is_empty() {
        ChangesResponse::default()
    } else {
        keep_port_sets(socket, &mut changes).await;
        let req = ChangesRequest {
            changes: changes.clone(),
            skip_failed,
        };
        match api::post_json::<_, ChangesResponse>(socket, "/v1/changes", &req).await {
            Ok(r) => r,
            Err(e) => {
                stderr_line(&format!("{e:#}"));
                return EXIT_KERNEL;
            }
        }
    };
    let (messages, failed) = report(&items, &changes, &resp);
    for m in &messages {
        stderr_line(m);
    }
    if failed { EXIT_KERNEL } else { 0 }
}

/// The error lines for `items` given the daemon's answer to `changes` (the items'
/// changes, in order), and whether anything failed.
fn report(
    items: &[RestoreLine],
    changes: &[Change],
    resp: &ChangesResponse,
) -> (Vec<String>, bool) {
    let mut messages = Vec::new();
    let mut failed = false;
    let mut results = changes.iter().zip(resp.results.iter());
    for item in items {
        match &item.what {
            RestoreItem::Refused(m) => {
                messages.push(m.clone());
                failed = true;
            }
            RestoreItem::Change(_) => {
                let Some((c, r)) = results.next() else {
                    continue;
                };
                if let Some(e) = r {
                    failed = true;
                    // A refusal of the whole result is printed once, below.
                    let whole = matches!(e, ChangeError::Invalid(m) if resp.error.as_deref() == Some(m.as_str()));
                    if !whole {
                        messages.push(error_text(c, e));
                    }
                }
            }
        }
    }
    if let Some(e) = &resp.error {
        messages.push(e.clone());
        failed = true;
    }
    (messages, failed)
}

/// `-E` names a service by one address and port; a service of xlb's configuration may cover
/// more ports, which ipvsadm cannot express: they are kept.
async fn keep_port_sets(socket: &Path, changes: &mut [Change]) {
    if !changes
        .iter()
        .any(|c| matches!(c, Change::EditService { .. }))
    {
        return;
    }
    let Ok(resp) = api::get_json::<ServicesResponse>(socket, "/v1/services").await else {
        return;
    };
    for c in changes {
        if let Change::EditService { service } = c
            && let Some(v) = ipvsadm::find_service(&resp, &service.key)
            && !v.ports.is_empty()
        {
            service.ports = v.ports.clone();
        }
    }
}

async fn list(socket: &Path, req: ListRequest) -> i32 {
    let empty = PortNames::default();
    let names = if req.format.numeric {
        &empty
    } else {
        PortNames::system()
    };
    let f = &req.format;
    let text = match req.target {
        ListTarget::All | ListTarget::Service(_) => {
            let resp: ServicesResponse = match api::get_json(socket, "/v1/services").await {
                Ok(r) => r,
                Err(e) => {
                    stderr_line(&format!("{e:#}"));
                    return EXIT_LIST;
                }
            };
            match req.target {
                ListTarget::Service(key) => match ipvsadm::find_service(&resp, &key) {
                    Some(s) => ipvsadm::list_service(s, f, names),
                    None => {
                        stderr_line("No such service");
                        return EXIT_LIST;
                    }
                },
                _ => ipvsadm::list_all(&resp, f, names),
            }
        }
        ListTarget::Unservable => {
            stderr_line("No such service");
            return EXIT_LIST;
        }
        ListTarget::Connections => {
            match api::get_json::<ConnectionsResponse>(socket, "/v1/connections").await {
                Ok(r) => ipvsadm::list_connections(&r.connections, f, names),
                Err(e) => {
                    stderr_line(&format!("{e:#}"));
                    return EXIT_LIST;
                }
            }
        }
        ListTarget::Timeout => match api::get_json::<Timeouts>(socket, "/v1/timeouts").await {
            Ok(t) => ipvsadm::list_timeout(&t),
            Err(e) => {
                stderr_line(&format!("{e:#}"));
                return EXIT_LIST;
            }
        },
        // The sync daemon's role of the moment, as ipvsadm prints a kernel daemon.
        ListTarget::Daemon => match api::get_json::<api::StatusResponse>(socket, "/v1/status").await
        {
            Ok(r) => r.conn_sync.map_or(String::new(), |s| {
                format!(
                    "{} sync daemon (mcast={}, syncid={}, maxlen={}, group={}, port={}, ttl={})\n",
                    s.role, s.interface, s.sync_id, s.maxlen, s.group, s.port, s.ttl
                )
            }),
            Err(e) => {
                stderr_line(&format!("{e:#}"));
                return EXIT_LIST;
            }
        },
    };
    stdout_write(&text);
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{change::Model, ipvsadm::view_of};

    fn names() -> PortNames {
        PortNames::parse("http 80/tcp www\nhttp 80/udp\ndomain 53/udp\nhttps 443/tcp\n")
    }

    fn parse(line: &str) -> Result<Invocation, CliError> {
        let args: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse_args_with(&args, &names())
    }

    fn change(line: &str) -> Change {
        match parse(line) {
            Ok(Invocation::Change(c)) => c,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn service(line: &str) -> ServiceConfig {
        match change(line) {
            Change::AddService { service } | Change::EditService { service } => service,
            c => panic!("{line}: {c:?}"),
        }
    }

    fn server(line: &str) -> (ServiceKey, BackendConfig) {
        match change(line) {
            Change::AddServer { key, server } | Change::EditServer { key, server } => (key, server),
            c => panic!("{line}: {c:?}"),
        }
    }

    /// The error (message, exit status) of a command line.
    fn error(line: &str) -> (String, i32) {
        match parse(line) {
            Err(e) => (e.message, e.exit_code),
            Ok(i) => panic!("{line}: accepted as {i:?}"),
        }
    }

    fn fails(line: &str, message: &str) {
        assert_eq!(error(line), (message.to_string(), 2), "{line}");
    }

    fn refused_with(line: &str) -> String {
        match parse(line) {
            Ok(Invocation::Refused { message }) => message,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn list(line: &str) -> ListRequest {
        match parse(line) {
            Ok(Invocation::List(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn key(addr: &str, port: u16, p: Protocol) -> ServiceKey {
        ServiceKey::new(addr.parse().unwrap(), port, p)
    }

    #[test]
    fn add_service_defaults() {
        let s = service("-A -t 10.0.0.1:80");
        assert_eq!(
            s,
            ServiceConfig {
                health: Default::default(),
                name: "TCP 10.0.0.1:80".into(),
                key: key("10.0.0.1", 80, Protocol::Tcp),
                ports: vec![PortRange::one(80)],
                persistence: None,
                scheduler: Scheduler::Wlc,
                sched_flags: SchedFlags::default(),
                mh_table_size: 4093,
                conntrack: true,
                forwarding: Forwarding::Dr,
                backends: vec![],
            }
        );
        // -p without a value: 360 s, /32.
        let s = service("-A -t 10.0.0.1:0 -s sh -p");
        assert_eq!(
            s.persistence,
            Some(Persistence {
                timeout: 360,
                prefix: 32
            })
        );
        assert_eq!(s.ports, vec![PortRange::ALL]);
        assert_eq!(s.scheduler, Scheduler::Sh);
        // -p's value: separate, bundled, long with = and separate; not a following option.
        for line in [
            "-A -t 10.0.0.1:80 -p 600",
            "-A -t 10.0.0.1:80 -p600",
            "-A -t 10.0.0.1:80 --persistent=600",
            "-A -t 10.0.0.1:80 --persistent 600",
        ] {
            assert_eq!(service(line).persistence.unwrap().timeout, 600, "{line}");
        }
        let s = service("-A -t 10.0.0.1:80 -p -s rr");
        assert_eq!(s.persistence.unwrap().timeout, 360);
        assert_eq!(s.scheduler, Scheduler::Rr);
        let s = service("-A -t 10.0.0.1:80 -s rr -p");
        assert_eq!(s.persistence.unwrap().timeout, 360);
        // -M: dotted mask (any inet_aton form), IPv6 prefix length.
        let s = service("-A -t 10.0.0.1:443 -s sh -b sh-fallback,sh-port -p -M 255.255.255.0");
        assert_eq!(
            s.persistence,
            Some(Persistence {
                timeout: 360,
                prefix: 24
            })
        );
        assert_eq!(
            s.sched_flags,
            SchedFlags {
                fallback: true,
                port: true
            }
        );
        assert_eq!(
            service("-A -t 10.0.0.1:443 -p 10 -M 0xffff0000")
                .persistence
                .unwrap()
                .prefix,
            16
        );
        let s = service("-A -t [2001:db8::1]:80 -p 60 -M 64 -s mh -b mh-port");
        assert_eq!(s.persistence.unwrap().prefix, 64);
        assert_eq!(s.key, key("2001:db8::1", 80, Protocol::Tcp));
        assert!(s.sched_flags.port && !s.sched_flags.fallback);
        // -M before an IPv6 -t is read as an IPv4 mask, then replaced by 128 (as ipvsadm).
        assert_eq!(
            service("-A -M 64 -t [2001:db8::1]:80 -p")
                .persistence
                .unwrap()
                .prefix,
            128
        );
        // -M without -p: no persistence.
        assert_eq!(
            service("-A -t 10.0.0.1:80 -M 255.255.0.0").persistence,
            None
        );
        // Flags of other schedulers are accepted and not kept.
        assert_eq!(
            service("-A -t 10.0.0.1:80 -s rr -b flag-1,flag-3").sched_flags,
            SchedFlags::default()
        );
    }

    #[test]
    fn service_addresses() {
        let k = |line: &str| service(line).key;
        assert_eq!(k("-A -t 10.0.0.1:80"), key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(
            k("-A --tcp-service=10.0.0.1:80"),
            key("10.0.0.1", 80, Protocol::Tcp)
        );
        assert_eq!(
            k("-A --tcp-service 10.0.0.1:80"),
            key("10.0.0.1", 80, Protocol::Tcp)
        );
        assert_eq!(k("-A -t10.0.0.1:80"), key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(k("-At 10.0.0.1:80"), key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(k("-A -u 10.0.0.1:53"), key("10.0.0.1", 53, Protocol::Udp));
        assert_eq!(
            k("-A --udp-service 10.0.0.1:domain"),
            key("10.0.0.1", 53, Protocol::Udp)
        );
        assert_eq!(k("-A -t 10.0.0.1:http"), key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(k("-A -t 10.0.0.1:www"), key("10.0.0.1", 80, Protocol::Tcp));
        // inet_aton forms.
        assert_eq!(k("-A -t 10.1:80"), key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(
            k("-A -t [2001:db8::1]:443"),
            key("2001:db8::1", 443, Protocol::Tcp)
        );
        // Unbracketed IPv6 takes no port: port 0 (so it must be persistent).
        assert_eq!(
            k("-A -t 2001:db8::1 -p"),
            key("2001:db8::1", 0, Protocol::Tcp)
        );
        // Omitted port = 0.
        assert_eq!(k("-A -t 10.0.0.1 -p"), key("10.0.0.1", 0, Protocol::Tcp));
        for bad in [
            "-A -t 80",
            "-A -t 10.0.0.1:http-alt",
            "-A -u 10.0.0.1:https",
            "-A -t 10.0.0.1:65536",
            "-A -t 10.0.0.1:",
            "-A -t [2001:db8::1]",
            "-A -t [2001:db8::1:80",
            "-A -t 1.2.3.4.5:80",
            "-A -t 256.1.1.1:80",
        ] {
            fails(bad, "illegal virtual server address[:port] specified");
        }
    }

    #[test]
    fn add_server_defaults() {
        // DR, weight 1, the service's port.
        let (k, s) = server("-a -t 10.0.0.1:80 -r 192.168.1.10");
        assert_eq!(k, key("10.0.0.1", 80, Protocol::Tcp));
        assert_eq!(
            s,
            BackendConfig {
                health: Default::default(),
                addr: "192.168.1.10".parse().unwrap(),
                port: 80,
                weight: 1,
                forwarding: Forwarding::Dr,
                tunnel: None,
                upper_threshold: 0,
                lower_threshold: 0,
            }
        );
        // DR and tunnels get the service's port whatever was given; NAT keeps it.
        assert_eq!(server("-a -t 10.0.0.1:80 -r 192.168.1.10:8080").1.port, 80);
        assert_eq!(
            server("-a -t 10.0.0.1:80 -r 192.168.1.10:8080 -i").1.port,
            80
        );
        let (_, s) = server("-a -t 10.0.0.1:80 -r 192.168.1.10:8080 -m -w 0 -x 1000 -y 800");
        assert_eq!((s.port, s.weight, s.forwarding), (8080, 0, Forwarding::Nat));
        assert_eq!((s.upper_threshold, s.lower_threshold), (1000, 800));
        assert_eq!(server("-a -t 10.0.0.1:80 -r 192.168.1.10 -m").1.port, 80);
        assert_eq!(
            server("-a -t 10.0.0.1:80 -r 192.168.1.10:http -m -w 65535")
                .1
                .weight,
            65535
        );
        // -r before -t: the service port was not known yet (NAT keeps 0).
        assert_eq!(server("-a -r 192.168.1.10 -m -t 10.0.0.1:80").1.port, 0);
        assert_eq!(server("-a -r 192.168.1.10 -t 10.0.0.1:80").1.port, 80);
        // IPv6.
        let (_, s) = server("-a -t [2001:db8::1]:80 -r [2001:db8::10]:80");
        assert_eq!(s.addr, "2001:db8::10".parse::<IpAddr>().unwrap());
        let (_, s) = server("-a -t [2001:db8::1]:80 -r 2001:db8::10 -m");
        assert_eq!(s.port, 80);
        // Tunnels, mixed families allowed.
        let (_, s) = server(
            "-a -t 10.0.0.2:80 -r 172.16.0.5 -i -w 3 --tun-type gue --tun-port 6080 --tun-nocsum",
        );
        assert_eq!(
            s.tunnel,
            Some(Tunnel {
                kind: TunnelType::Gue,
                port: 6080,
                checksum: TunnelChecksum::None,
                source: None
            })
        );
        assert_eq!(s.weight, 3);
        let (_, s) = server("-a -t 10.0.0.2:80 -r 172.16.0.6 -i --tun-type gre --tun-csum");
        assert_eq!(s.tunnel.unwrap().kind, TunnelType::Gre);
        assert_eq!(s.tunnel.unwrap().checksum, TunnelChecksum::Csum);
        let (_, s) = server(
            "-a -t 10.0.0.2:80 -r [2001:db8::5]:80 -i --tun-type=gue --tun-port=1 --tun-remcsum",
        );
        assert_eq!(s.tunnel.unwrap().checksum, TunnelChecksum::Remcsum);
        assert_eq!(
            server("-a -t 10.0.0.2:80 -r 172.16.0.5 --ipip").1.tunnel,
            Some(Tunnel::default())
        );
        // -e sends a complete server: omitted options are the defaults again (NAT -> DR).
        let (_, s) = server("-e -t 10.0.0.1:80 -r 192.168.1.10:8080 -w 0");
        assert_eq!((s.forwarding, s.port, s.weight), (Forwarding::Dr, 80, 0));
        assert!(matches!(
            change("-e -t 10.0.0.1:80 -r 192.168.1.10 -w 0"),
            Change::EditServer { .. }
        ));
    }

    #[test]
    fn other_commands() {
        assert!(matches!(
            change("-E -t 10.0.0.1:80 -p 600"),
            Change::EditService { service } if service.scheduler == Scheduler::Wlc
        ));
        assert_eq!(
            change("-D -t 10.0.0.1:80"),
            Change::DeleteService {
                key: key("10.0.0.1", 80, Protocol::Tcp)
            }
        );
        assert_eq!(change("-C"), Change::Clear);
        assert_eq!(change("--clear"), Change::Clear);
        assert_eq!(
            change("-d -t 10.0.0.1:80 -r 192.168.1.10:8080"),
            Change::DeleteServer {
                key: key("10.0.0.1", 80, Protocol::Tcp),
                addr: "192.168.1.10".parse().unwrap(),
                port: 8080
            }
        );
        assert_eq!(
            change("-d -t 10.0.0.1:80 -r 192.168.1.10"),
            Change::DeleteServer {
                key: key("10.0.0.1", 80, Protocol::Tcp),
                addr: "192.168.1.10".parse().unwrap(),
                port: 80
            }
        );
        assert_eq!(change("-Z"), Change::Zero { key: None });
        assert_eq!(
            change("-Z -u 10.0.0.1:53"),
            Change::Zero {
                key: Some(key("10.0.0.1", 53, Protocol::Udp))
            }
        );
        assert_eq!(
            change("--set 900 0 300"),
            Change::SetTimeouts {
                tcp: 900,
                tcp_fin: 0,
                udp: 300
            }
        );
        assert_eq!(parse("-R"), Ok(Invocation::Restore));
        assert_eq!(parse("-S"), Ok(Invocation::Save { numeric: false }));
        assert_eq!(parse("-Sn"), Ok(Invocation::Save { numeric: true }));
        assert_eq!(parse("--save -n"), Ok(Invocation::Save { numeric: true }));
        assert_eq!(parse("-h"), Ok(Invocation::Help));
        assert_eq!(parse("--help --bogus"), Ok(Invocation::Help));
        assert_eq!(parse("-v"), Ok(Invocation::Version));
        assert_eq!(parse("--version"), Ok(Invocation::Version));
        assert!(version().starts_with("ipvsadm v1.31 2019/12/24 (compiled with xlb v"));
        assert!(usage("ipvsadm").contains("\n  ipvsadm -A|E virtual-service [-s scheduler]"));
    }

    #[test]
    fn list_requests() {
        let r = list("-L");
        assert_eq!(r.target, ListTarget::All);
        assert_eq!(r.format, ListFormat::default());
        let r = list("-Ln --stats --exact");
        assert!(r.format.numeric && r.format.stats && r.format.exact);
        let r = list("-l -n --rate --nosort --sort");
        assert!(r.format.rate && r.format.nosort);
        assert!(list("-L -n --thresholds").format.thresholds);
        assert!(list("-L -n --persistent-conn").format.persistent_conn);
        assert!(list("-L -n --tun-info").format.tun_info);
        assert!(list("-L -X").format.exact);
        assert_eq!(
            list("-L -n -t 10.0.0.1:80").target,
            ListTarget::Service(key("10.0.0.1", 80, Protocol::Tcp))
        );
        assert_eq!(list("-L -n -c").target, ListTarget::Connections);
        assert!(list("-Lnc --persistent-conn").format.persistent_conn);
        assert_eq!(list("-L --timeout").target, ListTarget::Timeout);
        assert_eq!(list("-L --daemon").target, ListTarget::Daemon);
        assert_eq!(list("-L -f 100").target, ListTarget::Unservable);
        assert_eq!(
            list("-L --sctp-service 10.0.0.1:80").target,
            ListTarget::Unservable
        );
        assert_eq!(list("-L -f 100 -6").target, ListTarget::Unservable);
        assert_eq!(list("--list --syncid 3").target, ListTarget::All);
    }

    #[test]
    fn refusals() {
        // Firewall marks: -A says why; the rest get the kernel's answer for a missing one.
        assert_eq!(refused_with("-A -f 100 -s wrr -p 300"), FWMARK_REFUSED);
        assert_eq!(refused_with("-A -f 100 -6"), FWMARK_REFUSED);
        assert_eq!(refused_with("-E -f 100"), "No such service");
        assert_eq!(refused_with("-D -f 100"), "No such service");
        assert_eq!(refused_with("-Z -f 100"), "No such service");
        assert_eq!(
            refused_with("-a -f 100 -r 172.16.0.5 -i"),
            "Service not defined"
        );
        assert_eq!(
            refused_with("-e -f 100 -r 172.16.0.5 -i"),
            "Service not defined"
        );
        assert_eq!(
            refused_with("-d -f 100 -r 172.16.0.5"),
            "Service not defined"
        );
        assert_eq!(refused_with("-A --sctp-service 10.0.0.1:80"), SCTP_REFUSED);
        assert_eq!(refused_with("-A -u 10.0.0.1:53 -s rr -o"), OPS_REFUSED);
        assert_eq!(refused_with("-A -f 1 -o"), FWMARK_REFUSED);
        assert_eq!(refused_with("-A -t 10.0.0.1:80 --pe sip -p"), PE_REFUSED);
        assert_eq!(
            refused_with("-A -t 10.0.0.1:80 --pe foo -p"),
            "Scheduler or persistence engine not found"
        );
        assert_eq!(
            refused_with("-A -t 10.0.0.1:80 -s foo"),
            "Scheduler or persistence engine not found"
        );
        assert_eq!(
            refused_with("-E -t 10.0.0.1:80 -s roundrobin"),
            "Scheduler or persistence engine not found"
        );
        assert_eq!(refused_with("--start-daemon master"), SYNC_REFUSED);
        assert_eq!(
            refused_with(
                "--start-daemon backup --mcast-interface eth1 --syncid 7 --mcast-group 224.0.0.81 --mcast-port 8848 --mcast-ttl 1 --sync-maxlen 1472"
            ),
            SYNC_REFUSED
        );
        assert_eq!(refused_with("--stop-daemon master"), "No daemon is running");
        assert_eq!(
            refused_with("-a -t 10.0.0.1:80 -r 192.168.1.10 -x 10 -y 20"),
            "Numerical result out of range"
        );
        assert!(
            refused_with("-A -t 10.0.0.1:80 -p -M 255.0.255.0")
                .starts_with("Netmask 255.0.255.0 is not supported by xlb")
        );
        assert!(refused_with("-A -t 10.0.0.1:80 -p -M 0.0.0.0").starts_with("Netmask 0.0.0.0"));
    }

    /// popt's errors and tryhelp_exit(): exit status 255.
    #[test]
    fn popt_errors() {
        let tryhelp = (
            "Try `ipvsadm -h' or 'ipvsadm --help' for more information.".to_string(),
            255,
        );
        for line in [
            "-t 10.0.0.1:80 -A",
            "--bogus",
            "-q",
            "foo",
            "-n -L",
            "--start-daemon",
        ] {
            assert_eq!(error(line), tryhelp, "{line}");
        }
        assert_eq!(error("-L --bogus"), ("--bogus: unknown option".into(), 255));
        assert_eq!(error("-Lq"), ("-Lq: unknown option".into(), 255));
        assert_eq!(error("-A -t"), ("-t: missing argument".into(), 255));
        assert_eq!(
            error("-A --tcp-service"),
            ("--tcp-service: missing argument".into(), 255)
        );
        assert_eq!(
            error("-L --numeric=yes"),
            (
                "--numeric=yes: option does not take an argument".into(),
                255
            )
        );
    }

    /// Every message of ipvsadm's own checks (`fail()`, exit status 2).
    #[test]
    fn fail_messages() {
        // A second command.
        fails("-A -t 10.0.0.1:80 -D", "invalid option `-D'");
        fails("-LA", "invalid option `-LA'");
        fails("-L --start-daemon master", "invalid option `master'");
        fails("-L -h", "invalid option `-h'");
        fails(
            "--start-daemon primary",
            "illegal start-daemon parameter specified",
        );
        fails("--stop-daemon primary", "illegal start_daemon specified");
        // Values.
        fails(
            "-a -t 10.0.0.1:80 -r 80",
            "illegal real server address[:port] specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r [::1]",
            "illegal real server address[:port] specified",
        );
        fails("-A -f 0", "invalid fwmark value `0' specified");
        fails(
            "-A -f 4294967296",
            "invalid fwmark value `4294967296' specified",
        );
        fails("-A -f x1", "invalid fwmark value `x1' specified");
        fails(
            "-A -t 10.0.0.1:80 -p x",
            "invalid timeout value `x' specified",
        );
        fails(
            "-A -t 10.0.0.1:80 -p 0",
            "invalid timeout value `0' specified",
        );
        fails(
            "-A -t 10.0.0.1:80 -p 2678401",
            "invalid timeout value `2678401' specified",
        );
        fails(
            "-A -t 10.0.0.1:80 -p -M 1.2.3.4.5",
            "illegal virtual server persistent mask specified",
        );
        fails("-A -t [::1]:80 -p -M 129", "illegal ipv6 netmask specified");
        fails("-A -t [::1]:80 -p -M x", "illegal ipv6 netmask specified");
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -w 65536",
            "illegal weight specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -w -1",
            "illegal weight specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -w 1x",
            "illegal weight specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -x 2147483648",
            "illegal u_threshold specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -y x",
            "illegal l_threshold specified",
        );
        fails("-L --syncid 256", "illegal syncid specified");
        fails("-L -6", "-6 used before -f\n");
        fails("-A -6 -f 1", "-6 used before -f\n");
        fails(
            "--start-daemon master --mcast-group 10.0.0.1",
            "invalid IPv4 mcast-group `10.0.0.1'",
        );
        fails(
            "--start-daemon master --mcast-group 2001:db8::1",
            "invalid IPv6 mcast-group `2001:db8::1'",
        );
        fails(
            "--start-daemon master --mcast-port 0",
            "illegal mcast-port specified",
        );
        fails(
            "--start-daemon master --mcast-ttl 256",
            "illegal mcast-ttl specified",
        );
        fails(
            "--start-daemon master --sync-maxlen 65508",
            "illegal sync-maxlen specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type vxlan",
            "illegal tunnel type specified",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-port 0",
            "illegal tunnel port specified",
        );
        fails("--set 900 120", "--set option requires 3 timeout values");
        fails("--set 900 120 x", "invalid timeout value `x' specified");
        fails(
            "--set 900 120 2678401",
            "invalid timeout value `2678401' specified",
        );
        fails("--set 900 120 300 5", "unexpected argument 5");
        fails("-L foo", "unexpected argument foo");
        fails(
            "-A -t 10.0.0.1:80 -b sh-port",
            "incompatible scheduler flag `sh-port'",
        );
        fails(
            "-A -t 10.0.0.1:80 -s sh -b mh-fallback",
            "incompatible scheduler flag `mh-fallback'",
        );
        fails(
            "-A -t 10.0.0.1:80 -s sh -b sh-port,fast",
            "invalid scheduler flag `fast'",
        );
        // Duplicates.
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -g -m",
            "multiple 'forwarding-method' options specified",
        );
        fails(
            "-A -t 10.0.0.1:80 -u 10.0.0.1:80",
            "multiple 'service-address' options specified",
        );
        fails("-L -n -n", "multiple 'numeric' options specified");
        fails(
            "-A -t 10.0.0.1:80 -p -p",
            "multiple 'persistent' options specified",
        );
        // The command/option matrix.
        fails(
            "-A",
            "You need to supply the 'service-address' option for the 'add-service' command",
        );
        fails(
            "-E -s rr",
            "You need to supply the 'service-address' option for the 'edit-service' command",
        );
        fails(
            "-D",
            "You need to supply the 'service-address' option for the 'delete-service' command",
        );
        fails(
            "-a -t 10.0.0.1:80",
            "You need to supply the 'real-server' option for the 'add-server' command",
        );
        fails(
            "-e -r 1.1.1.1",
            "You need to supply the 'service-address' option for the 'edit-server' command",
        );
        fails(
            "-d -t 10.0.0.1:80",
            "You need to supply the 'real-server' option for the 'delete-server' command",
        );
        fails(
            "-A -t 10.0.0.1:80 -w 2",
            "Illegal 'weight' option with the 'add-service' command",
        );
        fails(
            "-A -t 10.0.0.1:80 -n",
            "Illegal 'numeric' option with the 'add-service' command",
        );
        fails(
            "-E -t 10.0.0.1:80 -r 1.1.1.1",
            "Illegal 'real-server' option with the 'edit-service' command",
        );
        fails(
            "-D -t 10.0.0.1:80 -s rr",
            "Illegal 'scheduler' option with the 'delete-service' command",
        );
        fails("-C -n", "Illegal 'numeric' option with the 'flush' command");
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -s rr",
            "Illegal 'scheduler' option with the 'add-server' command",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 --tun-info",
            "Illegal 'tun-info' option with the 'add-server' command",
        );
        fails(
            "-d -t 10.0.0.1:80 -r 1.1.1.1 -w 1",
            "Illegal 'weight' option with the 'delete-server' command",
        );
        fails(
            "-d -t 10.0.0.1:80 -r 1.1.1.1 -i",
            "Illegal 'forwarding-method' option with the 'delete-server' command",
        );
        fails(
            "-L -s rr",
            "Illegal 'scheduler' option with the 'list' command",
        );
        fails("-L -o", "Illegal 'ops' option with the 'list' command");
        fails(
            "-L --tun-type gue",
            "Illegal 'tun-type' option with the 'list' command",
        );
        fails(
            "-L -c -t 10.0.0.1:80",
            "The option 'service-address' conflicts with the 'connection' option in the 'list' command",
        );
        fails(
            "-L -c --timeout",
            "The option 'timeout' conflicts with the 'connection' option in the 'list' command",
        );
        fails(
            "-L --timeout --daemon",
            "The option 'daemon' conflicts with the 'timeout' option in the 'list' command",
        );
        fails(
            "--set 1 2 3 -n",
            "Illegal 'numeric' option with the 'set' command",
        );
        fails(
            "-R -n",
            "Illegal 'numeric' option with the 'restore' command",
        );
        fails(
            "-S -c",
            "Illegal 'connection' option with the 'save' command",
        );
        fails(
            "-S -t 10.0.0.1:80",
            "Illegal 'service-address' option with the 'save' command",
        );
        fails("-Z -n", "Illegal 'numeric' option with the 'zero' command");
        fails(
            "--start-daemon master -n",
            "Illegal 'numeric' option with the 'start-daemon' command",
        );
        fails(
            "--stop-daemon master --mcast-interface eth0",
            "Illegal 'mcast-interface' option with the 'stop-daemon' command",
        );
        // process_options().
        fails(
            "-A -t 10.0.0.1:0",
            "Zero port specified for non-persistent service",
        );
        fails(
            "-E -t 10.0.0.1",
            "Zero port specified for non-persistent service",
        );
        fails(
            "-A -t 10.0.0.1:80 -o",
            "One-Packet Scheduling is only for UDP virtual services",
        );
        fails(
            "-a -t 10.0.0.1:80 -r [2001:db8::1]:80",
            "Different address family is allowed only for tunneling servers",
        );
        fails(
            "-e -t [2001:db8::1]:80 -r 10.0.0.2 -m",
            "Different address family is allowed only for tunneling servers",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 --tun-type gue --tun-port 1",
            "Tunnel options conflict with forward method",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -m --tun-csum",
            "Tunnel options conflict with forward method",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type gue",
            "You need to supply the 'tun-port' option for the 'gue' tunnel type",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-port 6080",
            "Illegal 'tun-port' option with the 'ipip' tunnel type",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-csum",
            "Illegal 'tun-csum' option with the 'ipip' tunnel type",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type gre --tun-port 1",
            "Illegal 'tun-port' option with the 'gre' tunnel type",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type gre --tun-remcsum",
            "Illegal 'tun-remcsum' option with the 'gre' tunnel type",
        );
        fails(
            "-a -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type gue --tun-port 1 --tun-nocsum --tun-csum",
            "The option 'tun-csum' conflicts with the 'tun-nocsum' option in the 'gue' tunnel type",
        );
        fails(
            "-e -t 10.0.0.1:80 -r 1.1.1.1 -i --tun-type gre --tun-csum --tun-nocsum",
            "The option 'tun-csum' conflicts with the 'tun-nocsum' option in the 'gre' tunnel type",
        );
        fails("-L -c --stats", "options conflicts in the list command");
        fails(
            "-L --timeout --rate",
            "options conflicts in the list command",
        );
        fails(
            "-L --daemon --persistent-conn",
            "options conflicts in the list command",
        );
    }

    #[test]
    fn error_texts() {
        let k = key("10.0.0.1", 80, Protocol::Tcp);
        let add = change("-A -t 10.0.0.1:80");
        assert_eq!(
            error_text(&add, &ChangeError::ServiceExists),
            "Service already exists"
        );
        let del = Change::DeleteService { key: k };
        assert_eq!(error_text(&del, &ChangeError::NoService), "No such service");
        let a = change("-a -t 10.0.0.1:80 -r 1.1.1.1");
        assert_eq!(
            error_text(&a, &ChangeError::NoService),
            "Service not defined"
        );
        assert_eq!(
            error_text(&a, &ChangeError::DestExists),
            "Destination already exists"
        );
        let d = change("-d -t 10.0.0.1:80 -r 1.1.1.1");
        assert_eq!(error_text(&d, &ChangeError::NoDest), "No such destination");
        assert_eq!(
            error_text(&d, &ChangeError::NoService),
            "Service not defined"
        );
        assert_eq!(
            error_text(&a, &ChangeError::Invalid("weight too large".into())),
            "weight too large"
        );
    }

    #[test]
    fn restore_input() {
        let text = "\
# saved by ipvsadm-save
ipvsadm -A -t 10.0.0.1:80 -s rr\n\
\n\
   \t \n\
-a -t 10.0.0.1:80 -r 192.168.1.10:80 -g -w 2   # the first one\r\n\
-A -f 100 -s wrr\n\
-C\n";
        let items = parse_restore(text, &names()).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].line, 2);
        assert!(
            matches!(&items[0].what, RestoreItem::Change(Change::AddService { service }) if service.scheduler == Scheduler::Rr)
        );
        assert_eq!(items[1].line, 5);
        assert!(
            matches!(&items[1].what, RestoreItem::Change(Change::AddServer { server, .. }) if server.weight == 2)
        );
        assert_eq!(items[2].what, RestoreItem::Refused(FWMARK_REFUSED.into()));
        assert_eq!(items[3].what, RestoreItem::Change(Change::Clear));

        let e = parse_restore(
            "-A -t 10.0.0.1:80\n-a -t 10.0.0.1:80 -r 1.1.1.1 -w x\n-C\n",
            &names(),
        )
        .unwrap_err();
        assert_eq!(e.exit_code, 2);
        assert_eq!(
            e.message,
            "illegal weight specified\nline 2: -a -t 10.0.0.1:80 -r 1.1.1.1 -w x\nnothing was restored"
        );
        let e = parse_restore("-L -n\n", &names()).unwrap_err();
        assert_eq!(e.exit_code, 2);
        assert!(
            e.message
                .starts_with("only changes can be restored\nline 1: -L -n")
        );
        let e = parse_restore("-t 10.0.0.1:80 -A\n", &names()).unwrap_err();
        assert_eq!(e.exit_code, 2);
        assert!(e.message.starts_with("Try `ipvsadm -h'"));
        assert_eq!(parse_restore("", &names()).unwrap(), vec![]);
    }

    /// Refusals are reported in line order, kernel errors by ipvs_strerror()'s words, a
    /// refusal of the whole result once.
    #[test]
    fn restore_report() {
        let items = parse_restore(
            "-A -t 10.0.0.1:80\n-A -f 1\n-a -t 10.0.0.9:80 -r 1.1.1.1\n-A -t 10.0.0.2:80\n",
            &names(),
        )
        .unwrap();
        let changes: Vec<Change> = items
            .iter()
            .filter_map(|l| match &l.what {
                RestoreItem::Change(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        let resp = ChangesResponse {
            results: vec![
                Some(ChangeError::ServiceExists),
                Some(ChangeError::NoService),
                None,
            ],
            applied: true,
            error: None,
        };
        let (msgs, failed) = report(&items, &changes, &resp);
        assert!(failed);
        assert_eq!(
            msgs,
            vec![
                "Service already exists".to_string(),
                FWMARK_REFUSED.to_string(),
                "Service not defined".to_string()
            ]
        );
        let whole = "service TCP 10.0.0.2:80: no real servers".to_string();
        let resp = ChangesResponse {
            results: vec![
                None,
                Some(ChangeError::NoService),
                Some(ChangeError::Invalid(whole.clone())),
            ],
            applied: false,
            error: Some(whole.clone()),
        };
        let (msgs, _) = report(&items, &changes, &resp);
        assert_eq!(
            msgs,
            vec![
                FWMARK_REFUSED.to_string(),
                "Service not defined".to_string(),
                whole
            ]
        );
        let ok = ChangesResponse {
            results: vec![None],
            applied: true,
            error: None,
        };
        assert_eq!(report(&items[..1], &changes[..1], &ok), (vec![], false));
    }

    /// A table -> `-S` -> each line parsed -> applied to an empty model -> the same
    /// services -> the same `-S` text.
    #[test]
    fn save_restore_round_trip() {
        let lines = [
            "-A -t 10.0.0.1:80 -s wlc",
            "-a -t 10.0.0.1:80 -r 192.168.1.11:80 -g -w 1",
            "-a -t 10.0.0.1:80 -r 192.168.1.10:80 -g -w 2",
            "-A -t 10.0.0.1:443 -s sh -b sh-fallback,sh-port -p -M 255.255.255.0",
            "-a -t 10.0.0.1:443 -r 192.168.1.10:8443 -m",
            "-A -u 10.0.0.1:53 -s rr",
            "-a -u 10.0.0.1:53 -r 192.168.1.10:53 -m",
            "-A -t 200.0.0.1:0 -s mh -b mh-port -p 60 -M 255.255.0.0",
            "-a -t 200.0.0.1:0 -r 192.168.2.1 -w 0",
            "-a -t 200.0.0.1:0 -r 192.168.2.2:8000 -m",
            "-A -t 10.0.0.2:80 -s wrr -p 300",
            "-a -t 10.0.0.2:80 -r 172.16.0.5 -i -w 3 --tun-type gue --tun-port 6080",
            "-a -t 10.0.0.2:80 -r 172.16.0.6 -i --tun-type gre --tun-csum",
            "-a -t 10.0.0.2:80 -r 172.16.0.7 -i --tun-type gue --tun-port 6081 --tun-remcsum",
            "-a -t 10.0.0.2:80 -r 2001:db8::20 -i",
            "-A -t [2001:db8::1]:80 -s rr",
            "-a -t [2001:db8::1]:80 -r [2001:db8::10]:80",
            "-A -u [2001:db8::1]:0 -s lblcr -p 10 -M 48",
            "-a -u [2001:db8::1]:0 -r [2001:db8::11]:53 -m -w 7",
        ];
        let mut table = Model::default();
        for l in lines {
            change(l).apply(&mut table).unwrap();
        }
        let view = |m: &Model| ServicesResponse {
            conn_table_size: 4096,
            services: m.services.iter().map(view_of).collect(),
        };
        let saved = ipvsadm::save(&view(&table), true, &PortNames::default());
        assert_eq!(
            saved,
            concat!(
                // 200.0.0.1 before 10.0.0.1: ipvsadm's signed-subtraction sort.
                "-A -t 200.0.0.1:0 -s mh -p 60 -M 255.255.0.0 -b mh-port\n",
                "-a -t 200.0.0.1:0 -r 192.168.2.1:0 -g -w 0\n",
                "-a -t 200.0.0.1:0 -r 192.168.2.2:8000 -m -w 1\n",
                "-A -t 10.0.0.1:80 -s wlc\n",
                "-a -t 10.0.0.1:80 -r 192.168.1.10:80 -g -w 2\n",
                "-a -t 10.0.0.1:80 -r 192.168.1.11:80 -g -w 1\n",
                "-A -t 10.0.0.1:443 -s sh -p 360 -M 255.255.255.0 -b sh-fallback,sh-port\n",
                "-a -t 10.0.0.1:443 -r 192.168.1.10:8443 -m -w 1\n",
                "-A -t 10.0.0.2:80 -s wrr -p 300\n",
                "-a -t 10.0.0.2:80 -r 172.16.0.5:80 -i -w 3 --tun-type gue --tun-port 6080 --tun-nocsum\n",
                "-a -t 10.0.0.2:80 -r 172.16.0.6:80 -i -w 1 --tun-type gre --tun-csum\n",
                "-a -t 10.0.0.2:80 -r 172.16.0.7:80 -i -w 1 --tun-type gue --tun-port 6081 --tun-remcsum\n",
                "-a -t 10.0.0.2:80 -r [2001:db8::20]:80 -i -w 1 --tun-type ipip\n",
                "-A -u 10.0.0.1:53 -s rr\n",
                "-a -u 10.0.0.1:53 -r 192.168.1.10:53 -m -w 1\n",
                "-A -t [2001:db8::1]:80 -s rr\n",
                "-a -t [2001:db8::1]:80 -r [2001:db8::10]:80 -g -w 1\n",
                "-A -u [2001:db8::1]:0 -s lblcr -p 10 -M 48\n",
                "-a -u [2001:db8::1]:0 -r [2001:db8::11]:53 -m -w 7\n",
            )
        );
        let mut restored = Model::default();
        for item in parse_restore(&saved, &names()).unwrap() {
            let RestoreItem::Change(c) = item.what else {
                panic!("refused: {item:?}");
            };
            c.apply(&mut restored).unwrap();
        }
        let sorted = |m: &Model| {
            let mut v = m.services.clone();
            for s in &mut v {
                s.backends.sort_by_key(|b| (b.addr, b.port));
            }
            v.sort_by_key(|s| s.key);
            v
        };
        assert_eq!(sorted(&restored), sorted(&table));
        assert_eq!(
            ipvsadm::save(&view(&restored), true, &PortNames::default()),
            saved
        );
        // Without -n ports go by name, and such a save restores too.
        let named = ipvsadm::save(&view(&table), false, &names());
        assert!(named.contains("-A -t 10.0.0.1:http -s wlc\n"), "{named}");
        let mut again = Model::default();
        for item in parse_restore(&named, &names()).unwrap() {
            let RestoreItem::Change(c) = item.what else {
                panic!("refused: {item:?}");
            };
            c.apply(&mut again).unwrap();
        }
        assert_eq!(sorted(&again), sorted(&table));
    }

    /// ipvsadm-save drops -x/-y (ipvsadm 1.31's format has no place for them).
    #[test]
    fn thresholds_are_not_saved() {
        let mut m = Model::default();
        change("-A -t 10.0.0.1:80").apply(&mut m).unwrap();
        change("-a -t 10.0.0.1:80 -r 192.168.1.10 -w 2 -x 1000 -y 800")
            .apply(&mut m)
            .unwrap();
        let resp = ServicesResponse {
            conn_table_size: 1,
            services: m.services.iter().map(view_of).collect(),
        };
        assert_eq!(
            ipvsadm::save(&resp, true, &PortNames::default()),
            "-A -t 10.0.0.1:80 -s wlc\n-a -t 10.0.0.1:80 -r 192.168.1.10:80 -g -w 2\n"
        );
    }

    #[test]
    fn value_parsers() {
        assert_eq!(inet_aton("10.0.0.1"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(inet_aton("10.1"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(inet_aton("10.1.2"), Some(Ipv4Addr::new(10, 1, 0, 2)));
        assert_eq!(inet_aton("167772161"), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(inet_aton("0x0a.0.0.010"), Some(Ipv4Addr::new(10, 0, 0, 8)));
        assert_eq!(
            inet_aton("255.255.255.0"),
            Some(Ipv4Addr::new(255, 255, 255, 0))
        );
        for bad in [
            "",
            "1.2.3.4.5",
            "256.0.0.1",
            "1..2",
            "09",
            "1.2.3.",
            "a.b.c.d",
            "1.2.65536",
        ] {
            assert_eq!(inet_aton(bad), None, "{bad}");
        }
        assert_eq!(string_to_number(" +5", 0, 10), Some(5));
        assert_eq!(string_to_number("5 ", 0, 10), None);
        assert_eq!(string_to_number("", 0, 10), None);
        assert_eq!(string_to_number("-", 0, 10), None);
        assert_eq!(string_to_number("99999999999999999999", 0, 10), None);
        assert_eq!(atoi("64abc"), 64);
        assert_eq!(atoi("x"), 0);
        assert_eq!(host_to_addr("1.2.3.4.5"), None);
        assert_eq!(host_to_addr("bad name"), None);
    }

    /// `run()` against a stand-in daemon that applies the changes to a `Model` as the real
    /// one does (structure only): exit statuses and what reaches the daemon.
    #[tokio::test]
    async fn run_against_a_daemon() {
        use axum::{Json, Router, extract::State, routing::get};
        use std::sync::{Arc, Mutex};

        type Shared = Arc<Mutex<Model>>;
        async fn services(State(m): State<Shared>) -> Json<ServicesResponse> {
            let m = m.lock().unwrap();
            Json(ServicesResponse {
                conn_table_size: 4096,
                services: m.services.iter().map(view_of).collect(),
            })
        }
        async fn timeouts(State(m): State<Shared>) -> Json<Timeouts> {
            Json(m.lock().unwrap().timeouts)
        }
        async fn connections() -> Json<ConnectionsResponse> {
            Json(ConnectionsResponse::default())
        }
        async fn status() -> Json<api::StatusResponse> {
            Json(api::StatusResponse {
                version: String::new(),
                attached: Vec::new(),
                maps: Vec::new(),
                config: String::new(),
                generation: 0,
                last_reload: None,
                connections: 0,
                vrrp: Vec::new(),
                conn_sync: None,
            })
        }
        async fn changes(
            State(m): State<Shared>,
            Json(req): Json<ChangesRequest>,
        ) -> Json<ChangesResponse> {
            let mut m = m.lock().unwrap();
            let mut next = m.clone();
            let results: Vec<Option<ChangeError>> = req
                .changes
                .iter()
                .map(|c| c.apply(&mut next).err())
                .collect();
            let applied = req.skip_failed || results.iter().all(Option::is_none);
            if applied {
                *m = next;
            }
            Json(ChangesResponse {
                results,
                applied,
                error: None,
            })
        }

        let dir = std::env::temp_dir().join(format!("xlb-ipvsadm-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("xlb.sock");
        let _ = std::fs::remove_file(&sock);
        let model: Shared = Default::default();
        // A service of xlb's configuration covering two ports.
        let mut wide = service("-A -t 10.0.0.9:80 -s rr");
        wide.name = "web".into();
        wide.ports = vec![PortRange::one(80), PortRange::one(443)];
        model.lock().unwrap().services.push(wide);
        let app = Router::new()
            .route("/v1/services", get(services))
            .route("/v1/timeouts", get(timeouts))
            .route("/v1/connections", get(connections))
            .route("/v1/status", get(status))
            .route("/v1/changes", axum::routing::post(changes))
            .with_state(model.clone());
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });

        let run = |program: &'static str, line: &'static str| {
            let sock = sock.clone();
            async move {
                let args = line.split_whitespace().map(String::from).collect();
                run(program, args, sock).await
            }
        };
        assert_eq!(run("ipvsadm", "-A -t 10.0.0.1:80 -s rr").await, 0);
        assert_eq!(run("ipvsadm", "-A -t 10.0.0.1:80").await, 255);
        assert_eq!(
            run("ipvsadm", "-a -t 10.0.0.1:80 -r 192.168.1.10 -w 2").await,
            0
        );
        assert_eq!(
            run("ipvsadm", "-a -t 10.0.0.2:80 -r 192.168.1.10").await,
            255
        );
        assert_eq!(
            run("ipvsadm", "-e -t 10.0.0.1:80 -r 192.168.1.10 -m").await,
            0
        );
        assert_eq!(
            run("ipvsadm", "-d -t 10.0.0.1:80 -r 192.168.1.11").await,
            255
        );
        assert_eq!(run("/sbin/ipvsadm", "--set 600 0 0").await, 0);
        {
            let m = model.lock().unwrap();
            let s = m
                .services
                .iter()
                .find(|s| s.key.port == 80 && s.name != "web")
                .unwrap();
            assert_eq!(s.scheduler, Scheduler::Rr);
            assert_eq!(s.backends[0].forwarding, Forwarding::Nat);
            assert_eq!(s.backends[0].weight, 1);
            assert_eq!(m.timeouts.tcp, 600);
        }
        // -E keeps the ports ipvsadm cannot name.
        assert_eq!(run("ipvsadm", "-E -t 10.0.0.9:80 -s wrr").await, 0);
        {
            let m = model.lock().unwrap();
            let s = m.services.iter().find(|s| s.name == "web").unwrap();
            assert_eq!(s.scheduler, Scheduler::Wrr);
            assert_eq!(s.ports, vec![PortRange::one(80), PortRange::one(443)]);
        }
        assert_eq!(run("ipvsadm", "-L -n").await, 0);
        assert_eq!(run("ipvsadm", "-Ln --stats --exact").await, 0);
        assert_eq!(run("ipvsadm", "-L -n -t 10.0.0.1:80").await, 0);
        assert_eq!(run("ipvsadm", "-L -n -t 10.0.0.1:81").await, 1);
        assert_eq!(run("ipvsadm", "-L -n -f 1").await, 1);
        assert_eq!(run("ipvsadm", "-L -n -c").await, 0);
        assert_eq!(run("ipvsadm", "-L --timeout").await, 0);
        assert_eq!(run("ipvsadm", "-L --daemon").await, 0);
        assert_eq!(run("ipvsadm-save", "-n").await, 0);
        assert_eq!(run("ipvsadm", "-S").await, 0);
        assert_eq!(run("ipvsadm", "-A -f 1").await, 255);
        assert_eq!(run("ipvsadm", "-A -t 10.0.0.1:0").await, 2);
        assert_eq!(run("ipvsadm", "-t 10.0.0.1:0").await, 255);
        assert_eq!(run("ipvsadm", "-h").await, 0);
        assert_eq!(run("ipvsadm", "-v").await, 0);
        assert_eq!(run("ipvsadm", "-D -t 10.0.0.1:80").await, 0);
        assert_eq!(run("ipvsadm", "-D -t 10.0.0.1:80").await, 255);
        assert_eq!(run("ipvsadm", "-Z").await, 0);
        assert_eq!(run("ipvsadm", "-C").await, 0);
        assert!(model.lock().unwrap().services.is_empty());

        server.abort();
        let _ = std::fs::remove_file(&sock);
        // No daemon: ipvsadm's "Can't initialize ipvs", exit status 2.
        assert_eq!(run("ipvsadm", "-L -n").await, 2);
        assert_eq!(run("ipvsadm", "-C").await, 2);
        // -h and parse errors need no daemon.
        assert_eq!(run("ipvsadm", "-h").await, 0);
        assert_eq!(run("ipvsadm", "-A").await, 2);
        let _ = std::fs::remove_dir(&dir);
    }
}
