//! The high-availability part of the configuration: VRRP instances, their scripts and sync
//! groups, and connection synchronisation. Read from TOML (`[[vrrp]]`, `[[vrrp_script]]`,
//! `[[vrrp_sync_group]]`, `[conn_sync]`, keys named as keepalived's keywords) or converted from
//! a keepalived.conf, with keepalived's defaults either way.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use serde::Deserialize;

use crate::health::config::{command_text, split_command};

/// The default connection-sync group and port (IPVS's).
pub const SYNC_GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 81);
pub const SYNC_PORT: u16 = 8848;
/// IPVS's master message size over IPv4 (1500 − 28).
pub const SYNC_MAXLEN: u16 = 1472;

/// Everything about high availability.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ha {
    pub instances: Vec<Instance>,
    pub scripts: Vec<Script>,
    pub groups: Vec<SyncGroup>,
    pub conn_sync: Option<ConnSync>,
}

/// A program to run, with its arguments (no shell).
pub type Command = Vec<String>;

/// The notify programs of an instance or a sync group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notify {
    pub master: Option<Command>,
    pub backup: Option<Command>,
    pub fault: Option<Command>,
    pub stop: Option<Command>,
    /// Run after the state's own program with `INSTANCE|GROUP NAME STATE PRIORITY`.
    pub any: Option<Command>,
}

/// A virtual address an instance owns while it is master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub addr: IpAddr,
    /// Prefix length (default /32 or /128, as `ip addr add`).
    pub prefix: u8,
    /// Interface to put it on (default: the instance's).
    pub dev: Option<String>,
}

/// A tracker's effect: weight 0 faults the instance while the tracked thing is down; a
/// positive weight is added while it is up, a negative one subtracted while it is down;
/// `reverse` flips the direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Track {
    pub name: String,
    pub weight: i32,
    pub reverse: bool,
}

/// Tracking of xlb's own data plane: down when the program is no longer attached to one of
/// the configured interfaces, or when every real server of the tracked services is down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackDataplane {
    /// Service names; empty: every service.
    pub services: Vec<String>,
    pub weight: i32,
    pub reverse: bool,
}

/// keepalived's gratuitous ARP / unsolicited NA settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Garp {
    pub master_delay: Duration,
    pub master_repeat: u32,
    pub master_refresh: Option<Duration>,
    pub master_refresh_repeat: u32,
    pub lower_prio_repeat: u32,
    pub lower_prio_delay: Duration,
}

impl Default for Garp {
    fn default() -> Self {
        Garp {
            master_delay: Duration::from_secs(5),
            master_repeat: 5,
            master_refresh: None,
            master_refresh_repeat: 1,
            lower_prio_repeat: 5,
            lower_prio_delay: Duration::from_secs(5),
        }
    }
}

/// One VRRP instance (virtual router), keepalived's defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub name: String,
    pub interface: String,
    pub vrid: u8,
    /// Base priority, 1..=255 (255: address owner).
    pub priority: u8,
    /// `state MASTER`: an owner becomes master at once; anyone else still waits a full
    /// Master_Down_Interval, as keepalived does.
    pub initial_master: bool,
    pub version: u8,
    pub advert_int_cs: u16,
    pub nopreempt: bool,
    pub preempt_delay: Duration,
    /// VRRPv2 simple password (8 bytes, zero-padded).
    pub auth_pass: Option<[u8; 8]>,
    pub mcast_src_ip: Option<IpAddr>,
    pub unicast_src_ip: Option<IpAddr>,
    pub unicast_peers: Vec<IpAddr>,
    pub unicast_ttl: Option<u8>,
    pub check_unicast_src: bool,
    pub vips: Vec<Vip>,
    /// Owned like `vips`, not advertised.
    pub excluded_vips: Vec<Vip>,
    pub garp: Garp,
    pub lower_prio_no_advert: bool,
    pub higher_prio_send_advert: bool,
    pub v3_checksum_as_v2: bool,
    pub down_timer_adverts: u32,
    pub dont_track_primary: bool,
    pub track_scripts: Vec<Track>,
    pub track_interfaces: Vec<Track>,
    pub track_dataplane: Option<TrackDataplane>,
    pub notify: Notify,
}

impl Instance {
    pub fn is_ipv6(&self) -> bool {
        self.vips.first().is_some_and(|v| v.addr.is_ipv6())
    }
    pub fn unicast(&self) -> bool {
        !self.unicast_peers.is_empty()
    }
    pub fn advert_interval(&self) -> Duration {
        Duration::from_millis(self.advert_int_cs as u64 * 10)
    }
}

/// `vrrp_script`: a program whose exit status is tracked (0 = up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    pub name: String,
    pub command: Command,
    pub user: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Default weight of instances' `track_script` entries that give none.
    pub weight: i32,
    pub reverse: bool,
    pub rise: u32,
    pub fall: u32,
    /// Start down (the first result decides otherwise).
    pub init_fail: bool,
}

/// Instances that change state together.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncGroup {
    pub name: String,
    pub members: Vec<String>,
    pub track_scripts: Vec<Track>,
    pub track_interfaces: Vec<Track>,
    /// Members' tracker weights count (keepalived `sync_group_tracking_weight`); otherwise
    /// weighted trackers are ignored and weighted interfaces fault the group.
    pub tracking_weight: bool,
    pub notify: Notify,
}

/// Connection synchronisation (keepalived's `lvs_sync_daemon`): while `instance` is master
/// this node sends its connections; while it is not, it installs what the master sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSync {
    pub interface: String,
    pub instance: String,
    /// Default: the instance's virtual_router_id (keepalived).
    pub sync_id: Option<u8>,
    /// Multicast group, or a unicast peer (send) / local address (receive).
    pub group: IpAddr,
    /// Unicast instead of multicast: the peer to send to.
    pub peer: Option<IpAddr>,
    pub port: u16,
    pub maxlen: u16,
    pub ttl: u8,
}

impl ConnSync {
    /// The sync id in use: validation sets an unset one to the instance's VRID.
    pub fn id(&self) -> u8 {
        self.sync_id.unwrap_or(0)
    }
}

impl Default for ConnSync {
    fn default() -> Self {
        ConnSync {
            interface: String::new(),
            instance: String::new(),
            sync_id: None,
            group: IpAddr::V4(SYNC_GROUP_V4),
            peer: None,
            port: SYNC_PORT,
            maxlen: SYNC_MAXLEN,
            ttl: 1,
        }
    }
}

// ---- validation shared by both sources ----

/// Checks the cross-references and keepalived's rules, and settles defaults that depend on
/// several settings. Errors name the instance.
pub fn complete(ha: &mut Ha) -> Result<Vec<String>, String> {
    let mut warnings = Vec::new();
    let mut names = HashSet::new();
    for s in &ha.scripts {
        if !names.insert(&s.name) {
            return Err(format!("vrrp_script \"{}\" is defined twice", s.name));
        }
    }
    let mut inst_names = HashSet::new();
    let mut ids = HashSet::new();
    for i in &mut ha.instances {
        if !inst_names.insert(i.name.clone()) {
            return Err(format!("vrrp instance \"{}\" is defined twice", i.name));
        }
        if i.vips.is_empty() {
            return Err(format!(
                "vrrp instance \"{}\" has no virtual_ipaddress",
                i.name
            ));
        }
        let v6 = i.vips[0].addr.is_ipv6();
        if let Some(v) = i.vips.iter().find(|v| v.addr.is_ipv6() != v6) {
            return Err(format!(
                "vrrp instance \"{}\": virtual_ipaddress {} is not of the family of {} (one family per instance; use virtual_ipaddress_excluded for the other)",
                i.name, v.addr, i.vips[0].addr
            ));
        }
        if v6 && i.version == 2 {
            warnings.push(format!(
                "vrrp instance \"{}\": IPv6 needs VRRP version 3; using 3",
                i.name
            ));
            i.version = 3;
        }
        if i.version == 3 && i.auth_pass.is_some() {
            return Err(format!(
                "vrrp instance \"{}\": authentication exists only in VRRP version 2",
                i.name
            ));
        }
        if i.version == 3 && i.advert_int_cs > 4095 {
            return Err(format!(
                "vrrp instance \"{}\": advert_int {} s is more than VRRPv3's 40.95 s",
                i.name,
                i.advert_int_cs as f64 / 100.0
            ));
        }
        if i.version == 2 {
            // Whole seconds on the wire (keepalived rounds).
            let s = ((i.advert_int_cs as u32 + 50) / 100).clamp(1, 255);
            i.advert_int_cs = (s * 100) as u16;
        }
        for a in i
            .unicast_peers
            .iter()
            .chain(i.unicast_src_ip.iter())
            .chain(i.mcast_src_ip.iter())
        {
            if a.is_ipv6() != v6 {
                return Err(format!(
                    "vrrp instance \"{}\": {a} is not of the VIPs' family",
                    i.name
                ));
            }
        }
        if i.priority == 255 && i.nopreempt {
            warnings.push(format!(
                "vrrp instance \"{}\": nopreempt is ignored for an address owner (priority 255)",
                i.name
            ));
            i.nopreempt = false;
        }
        if i.initial_master && i.nopreempt {
            warnings.push(format!(
                "vrrp instance \"{}\": nopreempt is ignored with state MASTER",
                i.name
            ));
            i.nopreempt = false;
        }
        if (i.initial_master || i.nopreempt) && !i.preempt_delay.is_zero() {
            i.preempt_delay = Duration::ZERO;
        }
        // One instance per (interface, family, VRID, peer set) on the wire.
        let key = (
            i.interface.clone(),
            v6,
            i.vrid,
            i.unicast_peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        );
        if !ids.insert(key) {
            return Err(format!(
                "vrrp instance \"{}\": virtual_router_id {} is used twice on {}",
                i.name, i.vrid, i.interface
            ));
        }
        for t in &i.track_scripts {
            if !ha.scripts.iter().any(|s| s.name == t.name) {
                return Err(format!(
                    "vrrp instance \"{}\": track_script \"{}\" names no vrrp_script",
                    i.name, t.name
                ));
            }
        }
    }
    let mut member_of = HashSet::new();
    for g in &ha.groups {
        for m in &g.members {
            if !inst_names.contains(m) {
                return Err(format!(
                    "vrrp_sync_group \"{}\": no vrrp instance \"{m}\"",
                    g.name
                ));
            }
            if !member_of.insert(m.clone()) {
                return Err(format!(
                    "vrrp instance \"{m}\" is in two sync groups (one at most)"
                ));
            }
        }
        for t in &g.track_scripts {
            if !ha.scripts.iter().any(|s| s.name == t.name) {
                return Err(format!(
                    "vrrp_sync_group \"{}\": track_script \"{}\" names no vrrp_script",
                    g.name, t.name
                ));
            }
        }
    }
    if let Some(s) = &mut ha.conn_sync {
        let Some(i) = ha.instances.iter().find(|i| i.name == s.instance) else {
            return Err(format!(
                "conn_sync names vrrp instance \"{}\", which is not defined",
                s.instance
            ));
        };
        s.sync_id.get_or_insert(i.vrid);
    }
    Ok(warnings)
}

/// Parses `ADDR[/LEN] [dev IF]` (keepalived's `virtual_ipaddress` line, the options xlb uses).
pub fn parse_vip(s: &str) -> Result<Vip, String> {
    let mut words = s.split_whitespace();
    let first = words
        .next()
        .ok_or_else(|| "empty virtual address".to_string())?;
    let (addr, prefix) = match first.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (first, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("\"{first}\" is not an IP address[/prefix]"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("\"{first}\": prefix length {p} is not 0..={max}")),
        },
    };
    let mut dev = None;
    while let Some(w) = words.next() {
        match w {
            "dev" => {
                dev = Some(
                    words
                        .next()
                        .ok_or_else(|| format!("\"{s}\": dev needs an interface"))?
                        .to_string(),
                )
            }
            other => {
                return Err(format!(
                    "\"{s}\": \"{other}\" is not understood (ADDR[/LEN] [dev IF])"
                ));
            }
        }
    }
    Ok(Vip { addr, prefix, dev })
}

fn vip_text(v: &Vip) -> String {
    let mut s = format!("{}/{}", v.addr, v.prefix);
    if let Some(d) = &v.dev {
        s.push_str(" dev ");
        s.push_str(d);
    }
    s
}

fn pass_bytes(s: &str) -> [u8; 8] {
    let mut b = [0u8; 8];
    for (d, c) in b.iter_mut().zip(s.bytes()) {
        *d = c;
    }
    b
}

fn secs_cs(s: f64) -> Result<u16, String> {
    let whole = s.fract() == 0.0 && (1.0..=255.0).contains(&s);
    if !((0.01..=40.95).contains(&s) || whole) {
        return Err(format!(
            "advert_int {s} is not between 0.01 and 255 seconds"
        ));
    }
    Ok((s * 100.0).round().min(u16::MAX as f64) as u16)
}

// ---- TOML ----

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum FileTrack {
    Name(String),
    Full {
        name: String,
        weight: Option<i32>,
        #[serde(default)]
        reverse: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileTrackDataplane {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    weight: i32,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileInstance {
    name: String,
    interface: String,
    virtual_router_id: u8,
    priority: Option<u8>,
    state: Option<String>,
    version: Option<u8>,
    advert_int: Option<f64>,
    #[serde(default)]
    nopreempt: bool,
    preempt_delay: Option<f64>,
    auth_pass: Option<String>,
    mcast_src_ip: Option<IpAddr>,
    unicast_src_ip: Option<IpAddr>,
    #[serde(default)]
    unicast_peer: Vec<IpAddr>,
    unicast_ttl: Option<u8>,
    #[serde(default)]
    check_unicast_src: bool,
    virtual_ipaddress: Vec<String>,
    #[serde(default)]
    virtual_ipaddress_excluded: Vec<String>,
    garp_master_delay: Option<u32>,
    garp_master_repeat: Option<u32>,
    garp_master_refresh: Option<u32>,
    garp_master_refresh_repeat: Option<u32>,
    garp_lower_prio_repeat: Option<u32>,
    garp_lower_prio_delay: Option<u32>,
    #[serde(default)]
    lower_prio_no_advert: bool,
    #[serde(default)]
    higher_prio_send_advert: bool,
    #[serde(default)]
    v3_checksum_as_v2: bool,
    down_timer_adverts: Option<u32>,
    #[serde(default)]
    dont_track_primary: bool,
    #[serde(default)]
    track_script: Vec<FileTrack>,
    #[serde(default)]
    track_interface: Vec<FileTrack>,
    track_dataplane: Option<FileTrackDataplane>,
    notify_master: Option<String>,
    notify_backup: Option<String>,
    notify_fault: Option<String>,
    notify_stop: Option<String>,
    notify: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileScript {
    name: String,
    script: String,
    user: Option<String>,
    interval: Option<f64>,
    timeout: Option<f64>,
    #[serde(default)]
    weight: i32,
    #[serde(default)]
    reverse: bool,
    rise: Option<u32>,
    fall: Option<u32>,
    #[serde(default)]
    init_fail: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileSyncGroup {
    name: String,
    group: Vec<String>,
    #[serde(default)]
    track_script: Vec<FileTrack>,
    #[serde(default)]
    track_interface: Vec<FileTrack>,
    #[serde(default)]
    sync_group_tracking_weight: bool,
    notify_master: Option<String>,
    notify_backup: Option<String>,
    notify_fault: Option<String>,
    notify_stop: Option<String>,
    notify: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConnSync {
    interface: String,
    instance: String,
    id: Option<u8>,
    group: Option<IpAddr>,
    peer: Option<IpAddr>,
    port: Option<u16>,
    maxlen: Option<u16>,
    ttl: Option<u8>,
}

fn command(what: &str, s: &Option<String>) -> Result<Option<Command>, String> {
    s.as_ref()
        .map(|c| split_command(c).map_err(|e| format!("{what}: {e}")))
        .transpose()
}

fn notify(
    master: &Option<String>,
    backup: &Option<String>,
    fault: &Option<String>,
    stop: &Option<String>,
    any: &Option<String>,
) -> Result<Notify, String> {
    Ok(Notify {
        master: command("notify_master", master)?,
        backup: command("notify_backup", backup)?,
        fault: command("notify_fault", fault)?,
        stop: command("notify_stop", stop)?,
        any: command("notify", any)?,
    })
}

/// `default`: the (weight, reverse) of an entry that gives no weight (a script's own).
fn tracks(v: &[FileTrack], default: impl Fn(&str) -> (i32, bool)) -> Result<Vec<Track>, String> {
    v.iter()
        .map(|t| {
            let (name, weight, reverse) = match t {
                FileTrack::Name(n) => (n.clone(), None, false),
                FileTrack::Full {
                    name,
                    weight,
                    reverse,
                } => (name.clone(), *weight, *reverse),
            };
            let (weight, reverse) = match weight {
                Some(w) => (w, reverse),
                None => default(&name),
            };
            if !(-253..=253).contains(&weight) {
                return Err(format!(
                    "track \"{name}\": weight {weight} is not -253..=253"
                ));
            }
            Ok(Track {
                name,
                weight,
                reverse,
            })
        })
        .collect()
}

fn secs(what: &str, v: f64, max: f64) -> Result<Duration, String> {
    if !(0.0..=max).contains(&v) || v.is_nan() {
        return Err(format!("{what} {v} is not between 0 and {max} seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// A `[[vrrp_script]]` as written → the model.
pub(crate) fn script_from_file(s: FileScript) -> Result<Script, String> {
    let interval = secs("vrrp_script interval", s.interval.unwrap_or(1.0), 86400.0)?;
    if interval.is_zero() {
        return Err(format!("vrrp_script \"{}\": interval must be > 0", s.name));
    }
    Ok(Script {
        command: split_command(&s.script)
            .map_err(|e| format!("vrrp_script \"{}\": {e}", s.name))?,
        user: s.user,
        interval,
        timeout: match s.timeout {
            Some(t) => secs("vrrp_script timeout", t, 86400.0)?,
            None => interval,
        },
        weight: s.weight,
        reverse: s.reverse,
        rise: s.rise.unwrap_or(1).max(1),
        fall: s.fall.unwrap_or(1).max(1),
        init_fail: s.init_fail,
        name: s.name,
    })
}

/// A track_script entry without a weight takes its script's weight and direction.
fn script_weight(scripts: &[Script]) -> impl Fn(&str) -> (i32, bool) + '_ {
    |n: &str| {
        scripts
            .iter()
            .find(|s| s.name == n)
            .map_or((0, false), |s| (s.weight, s.reverse))
    }
}

/// A `[[vrrp]]` as written → the model (`scripts`: the file's vrrp_scripts, whose weights
/// are the default of track_script entries).
pub(crate) fn instance_from_file(f: FileInstance, scripts: &[Script]) -> Result<Instance, String> {
    let ctx = |e: String| format!("vrrp instance \"{}\": {e}", f.name);
    let initial_master = match f.state.as_deref().map(str::to_ascii_lowercase).as_deref() {
        // keepalived: without `state`, an owner (priority 255) starts as master.
        None => f.priority == Some(255),
        Some("backup") => false,
        Some("master") => true,
        Some(x) => return Err(ctx(format!("state \"{x}\" is not master or backup"))),
    };
    if f.virtual_router_id == 0 {
        return Err(ctx("virtual_router_id must be 1..=255".into()));
    }
    if let Some(v) = f.version
        && !(2..=3).contains(&v)
    {
        return Err(ctx(format!("version {v} is not 2 or 3")));
    }
    let priority = f.priority.unwrap_or(if initial_master { 255 } else { 100 });
    if priority == 0 {
        return Err(ctx("priority must be 1..=255".into()));
    }
    let vips = f
        .virtual_ipaddress
        .iter()
        .map(|v| parse_vip(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ctx)?;
    let excluded_vips = f
        .virtual_ipaddress_excluded
        .iter()
        .map(|v| parse_vip(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ctx)?;
    let v6 = vips.first().is_some_and(|v| v.addr.is_ipv6());
    let d = Garp::default();
    let garp = Garp {
        master_delay: Duration::from_secs(f.garp_master_delay.unwrap_or(5) as u64),
        master_repeat: f.garp_master_repeat.unwrap_or(d.master_repeat).max(1),
        master_refresh: f
            .garp_master_refresh
            .filter(|r| *r > 0)
            .map(|r| Duration::from_secs(r as u64)),
        master_refresh_repeat: f.garp_master_refresh_repeat.unwrap_or(1).max(1),
        lower_prio_repeat: f
            .garp_lower_prio_repeat
            .or(f.garp_master_repeat)
            .unwrap_or(d.lower_prio_repeat),
        lower_prio_delay: Duration::from_secs(
            f.garp_lower_prio_delay.or(f.garp_master_delay).unwrap_or(5) as u64,
        ),
    };
    Ok(Instance {
        interface: f.interface.clone(),
        vrid: f.virtual_router_id,
        priority,
        initial_master,
        version: f.version.unwrap_or(if v6 { 3 } else { 2 }),
        advert_int_cs: secs_cs(f.advert_int.unwrap_or(1.0)).map_err(ctx)?,
        nopreempt: f.nopreempt,
        preempt_delay: secs("preempt_delay", f.preempt_delay.unwrap_or(0.0), 1000.0)
            .map_err(ctx)?,
        auth_pass: f.auth_pass.as_deref().map(pass_bytes),
        mcast_src_ip: f.mcast_src_ip,
        unicast_src_ip: f.unicast_src_ip,
        unicast_peers: f.unicast_peer.clone(),
        unicast_ttl: f.unicast_ttl,
        check_unicast_src: f.check_unicast_src,
        vips,
        excluded_vips,
        garp,
        lower_prio_no_advert: f.lower_prio_no_advert,
        higher_prio_send_advert: f.higher_prio_send_advert,
        v3_checksum_as_v2: f.v3_checksum_as_v2,
        down_timer_adverts: f.down_timer_adverts.unwrap_or(3).clamp(1, 100),
        dont_track_primary: f.dont_track_primary,
        track_scripts: tracks(&f.track_script, script_weight(scripts)).map_err(ctx)?,
        track_interfaces: tracks(&f.track_interface, |_| (0, false)).map_err(ctx)?,
        track_dataplane: f.track_dataplane.map(|t| TrackDataplane {
            services: t.services,
            weight: t.weight,
            reverse: t.reverse,
        }),
        notify: notify(
            &f.notify_master,
            &f.notify_backup,
            &f.notify_fault,
            &f.notify_stop,
            &f.notify,
        )
        .map_err(ctx)?,
        name: f.name,
    })
}

/// A `[[vrrp_sync_group]]` as written → the model.
pub(crate) fn group_from_file(g: FileSyncGroup, scripts: &[Script]) -> Result<SyncGroup, String> {
    let ctx = |e: String| format!("vrrp_sync_group \"{}\": {e}", g.name);
    Ok(SyncGroup {
        members: g.group.clone(),
        track_scripts: tracks(&g.track_script, script_weight(scripts)).map_err(ctx)?,
        track_interfaces: tracks(&g.track_interface, |_| (0, false)).map_err(ctx)?,
        tracking_weight: g.sync_group_tracking_weight,
        notify: notify(
            &g.notify_master,
            &g.notify_backup,
            &g.notify_fault,
            &g.notify_stop,
            &g.notify,
        )
        .map_err(ctx)?,
        name: g.name,
    })
}

/// `[conn_sync]` as written → the model.
pub(crate) fn conn_sync_from_file(s: FileConnSync) -> ConnSync {
    let d = ConnSync::default();
    ConnSync {
        interface: s.interface,
        instance: s.instance,
        sync_id: s.id,
        group: s.group.unwrap_or(d.group),
        peer: s.peer,
        port: s.port.unwrap_or(d.port),
        maxlen: s.maxlen.unwrap_or(d.maxlen),
        ttl: s.ttl.unwrap_or(d.ttl),
    }
}

// ---- keepalived.conf ----

fn script_cmd(s: &Option<crate::keepalived::Script>) -> Option<Command> {
    s.as_ref().map(|s| s.argv()).filter(|a| !a.is_empty())
}

fn ka_tracks(
    v: &[crate::keepalived::TrackEntry],
    default: impl Fn(&str) -> (i32, bool),
) -> Vec<Track> {
    v.iter()
        .map(|t| {
            let (weight, reverse) = match t.weight {
                Some(w) => (w, t.reverse),
                None => default(&t.name),
            };
            Track {
                name: t.name.clone(),
                weight,
                reverse,
            }
        })
        .collect()
}

/// The VRRP part of a keepalived.conf, with keepalived's defaults (global `vrrp_version`,
/// `vrrp_garp_*`), and warnings for what xlb does not do.
pub fn from_keepalived(k: &crate::keepalived::Keepalived) -> Result<(Ha, Vec<String>), String> {
    let g = &k.global_defs;
    let mut warnings = Vec::new();
    // Global defaults of instance settings (`vrrp_lower_prio_no_advert [true|false]`, ...).
    let global_flag = |name: &str| {
        g.raw
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.args.first().is_none_or(|a| a != "false"))
    };
    for (name, standard) in [
        ("vrrp_mcast_group4", "224.0.0.18"),
        ("vrrp_mcast_group6", "ff02::12"),
    ] {
        if let Some(d) = g.raw.iter().find(|d| d.name == name)
            && d.args.first().and_then(|a| a.parse::<IpAddr>().ok())
                != standard.parse::<IpAddr>().ok()
        {
            // Peers on another group would never hear each other: both would be master.
            return Err(format!(
                "{}: {name} {}: xlb advertises to the standard group {standard} only",
                d.loc,
                d.args.join(" ")
            ));
        }
    }
    let mut ha = Ha::default();
    for s in &k.vrrp_scripts {
        ha.scripts.push(Script {
            name: s.name.clone(),
            command: s.script.argv(),
            user: s.script.user.clone(),
            interval: s.interval,
            timeout: s.timeout,
            weight: s.weight,
            reverse: s.weight_reverse,
            rise: s.rise.max(1),
            fall: s.fall.max(1),
            init_fail: s.init_fail,
        });
    }
    for i in &k.vrrp_instances {
        let Some(interface) = i.interface.as_ref().map(|l| l.value.clone()) else {
            return Err(format!(
                "{}: vrrp_instance {} has no interface (xlb needs one)",
                i.loc, i.name
            ));
        };
        if i.use_vmac.is_some() {
            warnings.push(format!(
                "{}: vrrp_instance {}: use_vmac is not done by xlb; the VIPs go on {interface} and adverts use its MAC (keepalived's default)",
                i.loc, i.name
            ));
        }
        if i.strict_mode == Some(true) || g.vrrp_strict {
            warnings.push(format!(
                "{}: vrrp_instance {}: strict mode is not enforced by xlb",
                i.loc, i.name
            ));
        }
        if let Some(a) = &i.authentication
            && a.auth_type == crate::keepalived::AuthType::Ah
        {
            return Err(format!(
                "{}: vrrp_instance {}: auth_type AH is not supported (use PASS, or none)",
                i.loc, i.name
            ));
        }
        let vip = |v: &crate::keepalived::VirtualIp| Vip {
            addr: v.addr,
            prefix: v.prefix.unwrap_or(if v.addr.is_ipv4() { 32 } else { 128 }),
            dev: v.dev.clone(),
        };
        let vips: Vec<Vip> = i.virtual_ipaddress.iter().map(vip).collect();
        let v6 = vips.first().is_some_and(|v| v.addr.is_ipv6());
        let d = Garp::default();
        let delay = i
            .garp_master_delay
            .or(g.vrrp_garp_master_delay)
            .map_or(d.master_delay, |s| Duration::from_secs(s as u64));
        let repeat = i
            .garp_master_repeat
            .or(g.vrrp_garp_master_repeat)
            .unwrap_or(d.master_repeat)
            .max(1);
        let advert_cs = (i.advert_int.as_millis() / 10).clamp(1, u16::MAX as u128) as u16;
        ha.instances.push(Instance {
            name: i.name.clone(),
            interface,
            vrid: i.virtual_router_id,
            priority: i.effective_priority(),
            initial_master: i.effective_state() == crate::keepalived::VrrpState::Master,
            version: i
                .version
                .or(g.vrrp_version)
                .unwrap_or(if v6 { 3 } else { 2 }),
            advert_int_cs: advert_cs,
            nopreempt: i.nopreempt,
            preempt_delay: i.preempt_delay.unwrap_or(Duration::ZERO),
            auth_pass: i.authentication.as_ref().map(|a| a.pass_bytes()),
            mcast_src_ip: i.mcast_src_ip,
            unicast_src_ip: i.unicast_src_ip,
            unicast_peers: i.unicast_peers.iter().map(|p| p.addr).collect(),
            unicast_ttl: i.unicast_ttl,
            // A peer's min_ttl/max_ttl implies checking the source (the TTL range itself
            // is not checked).
            check_unicast_src: i.check_unicast_src
                || global_flag("vrrp_check_unicast_src") == Some(true)
                || i.unicast_peers
                    .iter()
                    .any(|p| p.min_ttl.is_some() || p.max_ttl.is_some()),
            vips,
            excluded_vips: i.virtual_ipaddress_excluded.iter().map(vip).collect(),
            garp: Garp {
                master_delay: delay,
                master_repeat: repeat,
                master_refresh: i
                    .garp_master_refresh
                    .or(g.vrrp_garp_master_refresh)
                    .filter(|r| *r > 0)
                    .map(|r| Duration::from_secs(r as u64)),
                master_refresh_repeat: i.garp_master_refresh_repeat.unwrap_or(1).max(1),
                lower_prio_repeat: repeat,
                lower_prio_delay: delay,
            },
            lower_prio_no_advert: i
                .lower_prio_no_advert
                .or(global_flag("vrrp_lower_prio_no_advert"))
                .unwrap_or(false),
            higher_prio_send_advert: i
                .higher_prio_send_advert
                .or(global_flag("vrrp_higher_prio_send_advert"))
                .unwrap_or(false),
            v3_checksum_as_v2: i.v3_checksum_as_v2.unwrap_or(false),
            down_timer_adverts: i.down_timer_adverts.unwrap_or(3),
            dont_track_primary: i.dont_track_primary,
            track_scripts: ka_tracks(&i.track_script, script_weight(&ha.scripts)),
            track_interfaces: ka_tracks(&i.track_interface, |_| (0, false)),
            track_dataplane: None,
            notify: Notify {
                master: script_cmd(&i.notify_master),
                backup: script_cmd(&i.notify_backup),
                fault: script_cmd(&i.notify_fault),
                stop: script_cmd(&i.notify_stop),
                any: script_cmd(&i.notify),
            },
        });
    }
    for s in &k.vrrp_sync_groups {
        ha.groups.push(SyncGroup {
            name: s.name.clone(),
            members: s.group.clone(),
            track_scripts: ka_tracks(&s.track_script, script_weight(&ha.scripts)),
            track_interfaces: ka_tracks(&s.track_interface, |_| (0, false)),
            tracking_weight: s.sync_group_tracking_weight,
            notify: Notify {
                master: script_cmd(&s.notify_master),
                backup: script_cmd(&s.notify_backup),
                fault: script_cmd(&s.notify_fault),
                stop: script_cmd(&s.notify_stop),
                any: script_cmd(&s.notify),
            },
        });
    }
    if let Some(s) = &g.lvs_sync_daemon {
        let d = ConnSync::default();
        ha.conn_sync = Some(ConnSync {
            interface: s.interface.clone(),
            instance: s.vrrp_instance.clone(),
            sync_id: s.id,
            group: s.group.unwrap_or(d.group),
            peer: None,
            port: s.port.unwrap_or(d.port),
            maxlen: s.maxlen.unwrap_or(d.maxlen),
            ttl: s.ttl.unwrap_or(d.ttl),
        });
    }
    warnings.extend(complete(&mut ha)?);
    Ok((ha, warnings))
}

// ---- rendering (xlb config convert) ----

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn render_tracks(key: &str, t: &[Track], out: &mut String) {
    if t.is_empty() {
        return;
    }
    let items: Vec<String> = t
        .iter()
        .map(|t| {
            let mut s = format!("{{ name = {}, weight = {}", q(&t.name), t.weight);
            if t.reverse {
                s.push_str(", reverse = true");
            }
            s.push_str(" }");
            s
        })
        .collect();
    out.push_str(&format!("{key} = [{}]\n", items.join(", ")));
}

fn render_notify(n: &Notify, out: &mut String) {
    for (k, v) in [
        ("notify_master", &n.master),
        ("notify_backup", &n.backup),
        ("notify_fault", &n.fault),
        ("notify_stop", &n.stop),
        ("notify", &n.any),
    ] {
        if let Some(c) = v {
            out.push_str(&format!("{k} = {}\n", q(&command_text(c))));
        }
    }
}

fn list(v: impl IntoIterator<Item = String>) -> String {
    let v: Vec<String> = v.into_iter().map(|s| q(&s)).collect();
    format!("[{}]", v.join(", "))
}

/// The TOML of `ha` (the sections [`from_file`] reads).
pub fn to_toml(ha: &Ha) -> String {
    let mut out = String::new();
    for s in &ha.scripts {
        out.push_str("\n[[vrrp_script]]\n");
        out.push_str(&format!("name = {}\n", q(&s.name)));
        out.push_str(&format!("script = {}\n", q(&command_text(&s.command))));
        if let Some(u) = &s.user {
            out.push_str(&format!("user = {}\n", q(u)));
        }
        out.push_str(&format!(
            "interval = {}\ntimeout = {}\nweight = {}\nrise = {}\nfall = {}\n",
            s.interval.as_secs_f64(),
            s.timeout.as_secs_f64(),
            s.weight,
            s.rise,
            s.fall
        ));
        if s.reverse {
            out.push_str("reverse = true\n");
        }
        if s.init_fail {
            out.push_str("init_fail = true\n");
        }
    }
    for i in &ha.instances {
        out.push_str("\n[[vrrp]]\n");
        out.push_str(&format!(
            "name = {}\ninterface = {}\nvirtual_router_id = {}\npriority = {}\nstate = {}\nversion = {}\nadvert_int = {}\n",
            q(&i.name),
            q(&i.interface),
            i.vrid,
            i.priority,
            q(if i.initial_master { "master" } else { "backup" }),
            i.version,
            i.advert_int_cs as f64 / 100.0
        ));
        if i.nopreempt {
            out.push_str("nopreempt = true\n");
        }
        if !i.preempt_delay.is_zero() {
            out.push_str(&format!(
                "preempt_delay = {}\n",
                i.preempt_delay.as_secs_f64()
            ));
        }
        if let Some(p) = &i.auth_pass {
            let end = p.iter().position(|b| *b == 0).unwrap_or(8);
            out.push_str(&format!(
                "auth_pass = {}\n",
                q(&String::from_utf8_lossy(&p[..end]))
            ));
        }
        for (k, v) in [
            ("mcast_src_ip", &i.mcast_src_ip),
            ("unicast_src_ip", &i.unicast_src_ip),
        ] {
            if let Some(a) = v {
                out.push_str(&format!("{k} = {}\n", q(&a.to_string())));
            }
        }
        if !i.unicast_peers.is_empty() {
            out.push_str(&format!(
                "unicast_peer = {}\n",
                list(i.unicast_peers.iter().map(|p| p.to_string()))
            ));
        }
        if let Some(t) = i.unicast_ttl {
            out.push_str(&format!("unicast_ttl = {t}\n"));
        }
        if i.check_unicast_src {
            out.push_str("check_unicast_src = true\n");
        }
        out.push_str(&format!(
            "virtual_ipaddress = {}\n",
            list(i.vips.iter().map(vip_text))
        ));
        if !i.excluded_vips.is_empty() {
            out.push_str(&format!(
                "virtual_ipaddress_excluded = {}\n",
                list(i.excluded_vips.iter().map(vip_text))
            ));
        }
        let g = &i.garp;
        out.push_str(&format!(
            "garp_master_delay = {}\ngarp_master_repeat = {}\ngarp_master_refresh_repeat = {}\ngarp_lower_prio_repeat = {}\ngarp_lower_prio_delay = {}\n",
            g.master_delay.as_secs(),
            g.master_repeat,
            g.master_refresh_repeat,
            g.lower_prio_repeat,
            g.lower_prio_delay.as_secs()
        ));
        if let Some(r) = g.master_refresh {
            out.push_str(&format!("garp_master_refresh = {}\n", r.as_secs()));
        }
        for (k, v) in [
            ("lower_prio_no_advert", i.lower_prio_no_advert),
            ("higher_prio_send_advert", i.higher_prio_send_advert),
            ("v3_checksum_as_v2", i.v3_checksum_as_v2),
            ("dont_track_primary", i.dont_track_primary),
        ] {
            if v {
                out.push_str(&format!("{k} = true\n"));
            }
        }
        if i.down_timer_adverts != 3 {
            out.push_str(&format!("down_timer_adverts = {}\n", i.down_timer_adverts));
        }
        render_tracks("track_script", &i.track_scripts, &mut out);
        render_tracks("track_interface", &i.track_interfaces, &mut out);
        if let Some(t) = &i.track_dataplane {
            out.push_str(&format!(
                "track_dataplane = {{ services = {}, weight = {}{} }}\n",
                list(t.services.iter().cloned()),
                t.weight,
                if t.reverse { ", reverse = true" } else { "" }
            ));
        }
        render_notify(&i.notify, &mut out);
    }
    for g in &ha.groups {
        out.push_str("\n[[vrrp_sync_group]]\n");
        out.push_str(&format!(
            "name = {}\ngroup = {}\n",
            q(&g.name),
            list(g.members.iter().cloned())
        ));
        render_tracks("track_script", &g.track_scripts, &mut out);
        render_tracks("track_interface", &g.track_interfaces, &mut out);
        if g.tracking_weight {
            out.push_str("sync_group_tracking_weight = true\n");
        }
        render_notify(&g.notify, &mut out);
    }
    if let Some(s) = &ha.conn_sync {
        out.push_str("\n[conn_sync]\n");
        out.push_str(&format!(
            "interface = {}\ninstance = {}\nid = {}\ngroup = {}\nport = {}\nmaxlen = {}\nttl = {}\n",
            q(&s.interface),
            q(&s.instance),
            s.id(),
            q(&s.group.to_string()),
            s.port,
            s.maxlen,
            s.ttl
        ));
        if let Some(p) = s.peer {
            out.push_str(&format!("peer = {}\n", q(&p.to_string())));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const HEAD: &str = "[dataplane]\ninterfaces = [\"eth0\"]\n";

    fn parse(text: &str) -> Result<Ha, String> {
        crate::config::parse(Path::new("t.toml"), &format!("{HEAD}{text}"))
            .map(|c| c.ha)
            .map_err(|e| e.to_string())
    }

    /// The seeds' two-node example, as keepalived.conf.
    const SEED: &str = r#"
global_defs {
    router_id LB1
    vrrp_garp_master_delay 1
    lvs_sync_daemon eth0 VI_1 id 7
}
vrrp_script chk_xlb {
    script "/usr/bin/pgrep -x xlb"
    interval 2
    weight -20
    fall 2
    rise 1
}
vrrp_instance VI_1 {
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority 150
    advert_int 1
    nopreempt
    unicast_src_ip 10.0.0.2
    unicast_peer {
        10.0.0.3
    }
    authentication {
        auth_type PASS
        auth_pass s3cr3t-longer-than-8
    }
    track_script {
        chk_xlb
    }
    virtual_ipaddress {
        10.0.0.100/24 dev eth0
    }
    notify_master "/etc/xlb/master.sh up"
}
vrrp_sync_group G1 {
    group {
        VI_1
    }
}
"#;

    #[test]
    fn keepalived_seed_converts_with_keepalived_defaults() {
        let k = crate::keepalived::parse_str(Path::new("k.conf"), SEED).unwrap();
        let (ha, warnings) = from_keepalived(&k).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        let i = &ha.instances[0];
        assert_eq!(
            (i.vrid, i.priority, i.version, i.advert_int_cs),
            (51, 150, 2, 100)
        );
        assert!(i.nopreempt && !i.initial_master);
        assert_eq!(i.auth_pass, Some(*b"s3cr3t-l"));
        assert_eq!(i.unicast_src_ip, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(i.unicast_peers, vec!["10.0.0.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            i.vips,
            vec![Vip {
                addr: "10.0.0.100".parse().unwrap(),
                prefix: 24,
                dev: Some("eth0".into())
            }]
        );
        // The script's weight is the track_script default; the global GARP delay applies.
        assert_eq!(i.track_scripts[0].weight, -20);
        assert_eq!(i.garp.master_delay, Duration::from_secs(1));
        assert_eq!(i.garp.master_repeat, 5);
        assert_eq!(
            i.notify.master,
            Some(vec!["/etc/xlb/master.sh".into(), "up".into()])
        );
        assert_eq!(ha.scripts[0].interval, Duration::from_secs(2));
        assert_eq!((ha.scripts[0].rise, ha.scripts[0].fall), (1, 2));
        assert_eq!(ha.groups[0].members, vec!["VI_1".to_string()]);
        let sync = ha.conn_sync.as_ref().unwrap();
        assert_eq!(
            (
                sync.interface.as_str(),
                sync.instance.as_str(),
                sync.sync_id
            ),
            ("eth0", "VI_1", Some(7))
        );
        assert_eq!(sync.group, IpAddr::V4(SYNC_GROUP_V4));
        // `xlb config convert`: the TOML reads back to the same model.
        assert_eq!(parse(&to_toml(&ha)).unwrap(), ha);
    }

    #[test]
    fn track_entries_inherit_the_scripts_weight_and_direction() {
        let ha = parse(
            "[[vrrp_script]]\nname = \"s\"\nscript = \"/bin/true\"\nweight = 20\nreverse = true\n\n[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\ntrack_script = [\"s\", { name = \"s\", weight = -5 }]\n\n[conn_sync]\ninterface = \"eth0\"\ninstance = \"V\"\n",
        )
        .unwrap();
        let t = &ha.instances[0].track_scripts;
        assert_eq!((t[0].weight, t[0].reverse), (20, true));
        assert_eq!((t[1].weight, t[1].reverse), (-5, false));
        // keepalived: the sync id defaults to the instance's VRID.
        assert_eq!(ha.conn_sync.unwrap().sync_id, Some(5));
    }

    #[test]
    fn keepalived_defaults_for_state_master_and_ipv6() {
        let k = crate::keepalived::parse_str(
            Path::new("k.conf"),
            "vrrp_instance A { state MASTER\n interface eth0\n virtual_router_id 9\n virtual_ipaddress { 2001:db8::1/64 }\n}\n",
        )
        .unwrap();
        let (ha, _) = from_keepalived(&k).unwrap();
        // state MASTER without priority: an address owner; IPv6: version 3.
        assert_eq!(
            (ha.instances[0].priority, ha.instances[0].version),
            (255, 3)
        );
        assert!(ha.instances[0].initial_master);
    }

    #[test]
    fn toml_defaults_and_errors() {
        let ha = parse(
            "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\nadvert_int = 1.4\n",
        )
        .unwrap();
        let i = &ha.instances[0];
        // v2 rounds the interval to whole seconds; /32 by default.
        assert_eq!(
            (i.priority, i.version, i.advert_int_cs, i.vips[0].prefix),
            (100, 2, 100, 32)
        );
        for (text, want) in [
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = []\n",
                "t.toml:3:1: vrrp instance \"V\" has no virtual_ipaddress",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\", \"2001:db8::1\"]\n",
                "is not of the family of",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\ntrack_script = [\"nope\"]\n",
                "track_script \"nope\" names no vrrp_script",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nversion = 3\nauth_pass = \"x\"\nvirtual_ipaddress = [\"10.1.1.1\"]\n",
                "authentication exists only in VRRP version 2",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1/33\"]\n",
                "prefix length 33",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\nstate = \"leader\"\n",
                "state \"leader\" is not master or backup",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\n[[vrrp]]\nname = \"W\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.2\"]\n",
                "virtual_router_id 5 is used twice on eth0",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\n[conn_sync]\ninterface = \"eth0\"\ninstance = \"X\"\n",
                "conn_sync names vrrp instance \"X\"",
            ),
            (
                "[[vrrp]]\nname = \"V\"\ninterface = \"eth0\"\nvirtual_router_id = 5\nvirtual_ipaddress = [\"10.1.1.1\"]\nprority = 5\n",
                "unknown field `prority`",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{e}\nwanted: {want}");
        }
    }
}
