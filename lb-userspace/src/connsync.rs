//! Connection synchronisation (the IPVS sync daemon's job): a master balancer streams its
//! connections and persistence templates to backups, which install them in their own
//! connection tables, so that after a failover established connections continue on the same
//! real server and the least-connection schedulers of the new master count them.
//!
//! **What is synchronised, and when.** With [`Dataplane::set_sync_events`] on, the master's
//! data plane reports (ring `SYNC_EVENTS`):
//! * a connection when it is created or changes state, if the new state is worth it
//!   ([`lb_common::sync::worthy`], IPVS's rule): TCP in ESTABLISHED, FIN_WAIT, CLOSE,
//!   CLOSE_WAIT and TIME_WAIT, UDP always. Embryonic TCP connections (SYN_RECV) are not, so a
//!   SYN flood does not flood the backups too; a client whose handshake was under way at the
//!   failover retransmits its SYN to the new master. Changes of NAT connections driven by
//!   their replies are reported the same way;
//! * a persistence template when it is made, before the connection it controls.
//!
//! A full ring drops the report (counter `sync_dropped`); the next refresh brings it.
//! [`records_from_events`] turns reports into [`ConnRecord`]s (the master's real server
//! address and port, the state's timeout), [`SyncSender`] sends them in IPVS sync protocol
//! version 1 messages ([`encode_batch`]), [`SyncReceiver`] receives and decodes them on the
//! backup ([`decode`]), and [`install`] resolves each to the backup's own service (by
//! virtual address, port and protocol) and real server (by address and port) and installs
//! them with the `xlb_sync_install` program ([`Dataplane::install_sync`]): an absent
//! connection takes a table entry (refused when the table is full) and is counted in its
//! state (ActiveConn/InActConn, as lc and friends see them); a present one on the same server
//! takes the master's state (the counts follow) and its idle time restarts; a present one on
//! another server is retired and replaced when the master's is active (kept otherwise, as
//! IPVS does). NAT connections get their reply entry. On a persistent service, a connection
//! joins its client network's template (made if there is none, so the template's count of
//! controlled connections stays exact); templates are installed or refreshed in place.
//! Records of services or servers the backup does not have are counted and skipped (IPVS
//! leaves them unbound).
//!
//! **Refresh.** Entries on a backup see no packets and age like idle ones (their state's
//! timeout, the backup's own timeouts: the message's timeout is not used for connections;
//! both balancers should have the same `ipvsadm --set`). The master therefore sends
//! [`refresh_records`] periodically: every live template and every connection worth
//! synchronising, or only those that saw a packet since the last refresh (then a backup's
//! copy outlives the master's entry by at most the refresh period). A full refresh also
//! brings a backup that (re)started up to date. The period must be well below the shortest
//! timeout that matters (ESTABLISHED's 900 s, UDP's 300 s; a minute is a good choice).
//!
//! **Not synchronised:** connections of services without connection tracking (sh/dh/mh with
//! `conntrack = false`: the hash finds the server on any balancer), lblc/lblcr destination
//! caches, the end of a connection (a backup's copy expires by its state's timeout, as in
//! IPVS), connections whose real server is of the other address family (the version 1
//! format has one family per record), traffic counters. IPVS records with firewall marks,
//! local-node or bypass forwarding, or protocols other than TCP and UDP are skipped.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FLOW_DEAD, PROTO_TCP, PROTO_UDP, SyncConn, sync, tcp::state, ticks,
};
use tokio::io::unix::AsyncFd;

use crate::{
    config::{BackendConfig, Forwarding, ServiceConfig},
    dataplane::Dataplane,
    engine::{Engine, ServiceRef, addr_words, monotonic_coarse_ticks},
    sockopt,
};

// ---------------------------------------------------------------------------------------
// Wire format: IPVS sync protocol version 1
// ---------------------------------------------------------------------------------------

/// `IP_VS_SYNC_GROUP` and `IP_VS_SYNC_PORT`.
pub const DEFAULT_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 81);
pub const DEFAULT_PORT: u16 = 8848;
/// The master's default message size over IPv4 (1500 − 28) and IPv6 (1500 − 48).
pub const DEFAULT_MAXLEN_V4: usize = 1472;
pub const DEFAULT_MAXLEN_V6: usize = 1452;

/// Message header length, and record lengths (without options).
pub const HEADER_LEN: usize = 8;
pub const RECORD_V4_LEN: usize = 36;
pub const RECORD_V6_LEN: usize = 72;
/// `SYNC_PROTO_VER`.
const VERSION: u8 = 1;
/// `STYPE_F_INET6`: the record's addresses are IPv6.
const TYPE_INET6: u8 = 1;
/// `ver_size`: record version in the top 4 bits (0), length in the low 12.
const SVER_SHIFT: u16 = 12;
const SVER_MASK: u16 = 0x0fff;

/// IPVS connection flags (`IP_VS_CONN_F_*`) as carried in the records.
pub mod flags {
    pub const FWD_MASK: u32 = 0x0007;
    pub const MASQ: u32 = 0x0000;
    pub const LOCALNODE: u32 = 0x0001;
    pub const TUNNEL: u32 = 0x0002;
    pub const DROUTE: u32 = 0x0003;
    pub const BYPASS: u32 = 0x0004;
    pub const SYNC: u32 = 0x0020;
    pub const HASHED: u32 = 0x0040;
    pub const NOOUTPUT: u32 = 0x0080;
    pub const INACTIVE: u32 = 0x0100;
    pub const OUT_SEQ: u32 = 0x0200;
    pub const IN_SEQ: u32 = 0x0400;
    pub const NO_CPORT: u32 = 0x0800;
    pub const TEMPLATE: u32 = 0x1000;
    pub const ONE_PACKET: u32 = 0x2000;
}

/// IPVS's UDP state (`IP_VS_UDP_S_NORMAL`), the only one; TCP states are numbered alike in
/// IPVS and xlb (`lb_common::tcp::state`, NONE..SYNACK).
const UDP_S_NORMAL: u16 = 0;
/// Template states (`IP_VS_CTPL_S_NONE`, `_ASSURED`).
const CTPL_S_LAST: u16 = 2;

/// A connection or template, independent of the address family and of either balancer's
/// indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRecord {
    /// IP protocol number (TCP or UDP).
    pub protocol: u8,
    /// Client address and port; a template: the client network (masked) and port 0.
    pub client: SocketAddr,
    /// Virtual address and port.
    pub vaddr: SocketAddr,
    /// Real server address and port.
    pub server: SocketAddr,
    /// A connection's state ([`lb_common::tcp::state`]; UDP connections are
    /// `state::UDP`); 0 for a template.
    pub state: u8,
    pub forwarding: Forwarding,
    /// A persistence template (`IP_VS_CONN_F_TEMPLATE`).
    pub template: bool,
    /// Seconds: a connection's state timeout, a template's persistence timeout.
    pub timeout: u32,
}

/// Why a message was refused as a whole (IPVS drops the whole buffer in these cases).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("sync message of {0} bytes is shorter than its header")]
    TooShort(usize),
    #[error("sync message of {got} bytes says it has {said}")]
    BadSize { got: usize, said: usize },
    #[error("sync message of sync id {got} ignored (this backup takes sync id {want})")]
    OtherSyncId { got: u8, want: u8 },
    #[error(
        "not a sync protocol version 1 message (version {version}, reserved {reserved}): version 0 masters (sync_version=0) are not supported"
    )]
    NotVersion1 { version: u8, reserved: u8 },
    #[error("sync record {index} overruns the message")]
    Overrun { index: usize },
    #[error("sync record {index} has version {version} (only 0 is known)")]
    RecordVersion { index: usize, version: u16 },
    #[error("sync record {index} of {len} bytes is too short for its address family")]
    RecordTooShort { index: usize, len: usize },
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub sync_id: u8,
    pub records: Vec<ConnRecord>,
    /// Records skipped, as IPVS skips them (unsupported protocol, invalid state) or because
    /// xlb has nothing to put them on (firewall marks, local-node or bypass forwarding).
    pub skipped: usize,
}

fn forwarding_bits(f: Forwarding) -> u32 {
    match f {
        Forwarding::Nat => flags::MASQ,
        Forwarding::Tunnel => flags::TUNNEL,
        Forwarding::Dr => flags::DROUTE,
    }
}

fn ip_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One record's bytes; `None` if the version 1 format cannot carry it (addresses of mixed
/// families, or a protocol/state IPVS would reject).
pub fn encode_record(r: &ConnRecord) -> Option<Vec<u8>> {
    let v6 = r.vaddr.is_ipv6();
    if r.client.is_ipv6() != v6 || r.server.is_ipv6() != v6 {
        return None;
    }
    let wire_state = if r.template {
        0
    } else if r.protocol == PROTO_UDP {
        if r.state != state::UDP {
            return None;
        }
        UDP_S_NORMAL
    } else if r.protocol == PROTO_TCP {
        if r.state > state::SYNACK {
            return None;
        }
        r.state as u16
    } else {
        return None;
    };
    let mut f = forwarding_bits(r.forwarding);
    if r.template {
        f |= flags::TEMPLATE;
    } else if !lb_common::tcp::is_active(r.state) {
        f |= flags::INACTIVE;
    }
    let len = if v6 { RECORD_V6_LEN } else { RECORD_V4_LEN };
    let mut b = Vec::with_capacity(len);
    b.push(if v6 { TYPE_INET6 } else { 0 });
    b.push(r.protocol);
    b.extend_from_slice(&(len as u16 & SVER_MASK).to_be_bytes());
    b.extend_from_slice(&f.to_be_bytes());
    b.extend_from_slice(&wire_state.to_be_bytes());
    b.extend_from_slice(&r.client.port().to_be_bytes());
    b.extend_from_slice(&r.vaddr.port().to_be_bytes());
    b.extend_from_slice(&r.server.port().to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // fwmark
    b.extend_from_slice(&r.timeout.to_be_bytes());
    b.extend_from_slice(&ip_bytes(r.client.ip()));
    b.extend_from_slice(&ip_bytes(r.vaddr.ip()));
    b.extend_from_slice(&ip_bytes(r.server.ip()));
    debug_assert_eq!(b.len(), len);
    Some(b)
}

/// The records as version 1 messages of sync id `sync_id`, each at most `maxlen` bytes
/// (clamped to 80..=65535: one IPv6 record fits) and 255 records, in order. Records the
/// format cannot carry ([`encode_record`]) are left out.
pub fn encode_batch(sync_id: u8, records: &[ConnRecord], maxlen: usize) -> Vec<Vec<u8>> {
    let maxlen = maxlen.clamp(HEADER_LEN + RECORD_V6_LEN, u16::MAX as usize);
    let mut out = Vec::new();
    let mut msg: Vec<u8> = Vec::new();
    let mut n = 0u8;
    let finish = |msg: &mut Vec<u8>, n: u8, out: &mut Vec<Vec<u8>>| {
        if n == 0 {
            return;
        }
        let size = msg.len() as u16;
        msg[2..4].copy_from_slice(&size.to_be_bytes());
        msg[4] = n;
        out.push(std::mem::take(msg));
    };
    for r in records {
        let Some(rec) = encode_record(r) else {
            continue;
        };
        if n == u8::MAX || (n > 0 && msg.len() + rec.len() > maxlen) {
            finish(&mut msg, n, &mut out);
            n = 0;
        }
        if n == 0 {
            msg = vec![0, sync_id, 0, 0, 0, VERSION, 0, 0];
        }
        // Records are 4-byte aligned; the fixed ones are multiples of 4 already.
        msg.extend_from_slice(&rec);
        n += 1;
    }
    finish(&mut msg, n, &mut out);
    out
}

/// The records of a version 1 message, if its sync id is accepted: a backup with
/// `accept_sync_id` 0 accepts every sync id, otherwise only its own (as IPVS).
pub fn decode(msg: &[u8], accept_sync_id: u8) -> Result<Vec<ConnRecord>, SyncError> {
    decode_message(msg, accept_sync_id).map(|m| m.records)
}

/// [`decode`], with the sync id and the count of records skipped.
pub fn decode_message(msg: &[u8], accept_sync_id: u8) -> Result<Message, SyncError> {
    if msg.len() < 4 {
        return Err(SyncError::TooShort(msg.len()));
    }
    // The size sits at bytes 2..4 in both versions' headers.
    let said = u16::from_be_bytes([msg[2], msg[3]]) as usize;
    if said != msg.len() {
        return Err(SyncError::BadSize {
            got: msg.len(),
            said,
        });
    }
    let sync_id = msg[1];
    if accept_sync_id != 0 && sync_id != accept_sync_id {
        return Err(SyncError::OtherSyncId {
            got: sync_id,
            want: accept_sync_id,
        });
    }
    if msg.len() < HEADER_LEN {
        return Err(SyncError::TooShort(msg.len()));
    }
    let (reserved, nr, version, spare) = (msg[0], msg[4], msg[5], [msg[6], msg[7]]);
    if reserved != 0 || version != VERSION || spare != [0, 0] {
        return Err(SyncError::NotVersion1 { version, reserved });
    }
    let mut at = HEADER_LEN;
    let mut records = Vec::with_capacity(nr as usize);
    let mut skipped = 0;
    for index in 0..nr as usize {
        if at + RECORD_V4_LEN > msg.len() {
            return Err(SyncError::Overrun { index });
        }
        let ver_size = u16::from_be_bytes([msg[at + 2], msg[at + 3]]);
        let len = (ver_size & SVER_MASK) as usize;
        if at + len > msg.len() {
            return Err(SyncError::Overrun { index });
        }
        if ver_size >> SVER_SHIFT != 0 {
            return Err(SyncError::RecordVersion {
                index,
                version: ver_size >> SVER_SHIFT,
            });
        }
        let rec = &msg[at..at + len];
        let v6 = rec[0] & TYPE_INET6 != 0;
        if len < if v6 { RECORD_V6_LEN } else { RECORD_V4_LEN } {
            return Err(SyncError::RecordTooShort { index, len });
        }
        match parse_record(rec, v6) {
            Some(r) => records.push(r),
            None => skipped += 1,
        }
        at += (len + 3) & !3;
    }
    Ok(Message {
        sync_id,
        records,
        skipped,
    })
}

/// One record (its length checked); `None` for what is skipped.
fn parse_record(rec: &[u8], v6: bool) -> Option<ConnRecord> {
    let be16 = |o: usize| u16::from_be_bytes([rec[o], rec[o + 1]]);
    let be32 = |o: usize| u32::from_be_bytes(rec[o..o + 4].try_into().unwrap());
    let protocol = rec[1];
    let f = be32(4);
    let wire_state = be16(8);
    let (cport, vport, dport) = (be16(10), be16(12), be16(14));
    let fwmark = be32(16);
    let timeout = be32(20);
    let addr = |i: usize| -> IpAddr {
        if v6 {
            let o = 24 + 16 * i;
            let b: [u8; 16] = rec[o..o + 16].try_into().unwrap();
            IpAddr::from(b)
        } else {
            let o = 24 + 4 * i;
            let b: [u8; 4] = rec[o..o + 4].try_into().unwrap();
            IpAddr::from(b)
        }
    };
    let template = f & flags::TEMPLATE != 0;
    let forwarding = match f & flags::FWD_MASK {
        flags::MASQ => Forwarding::Nat,
        flags::TUNNEL => Forwarding::Tunnel,
        flags::DROUTE => Forwarding::Dr,
        _ => return None,
    };
    if fwmark != 0 {
        return None;
    }
    let st = if template {
        if wire_state >= CTPL_S_LAST {
            return None;
        }
        0
    } else {
        match protocol {
            PROTO_TCP if wire_state <= state::SYNACK as u16 => wire_state as u8,
            PROTO_UDP if wire_state == UDP_S_NORMAL => state::UDP,
            _ => return None,
        }
    };
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    Some(ConnRecord {
        protocol,
        client: SocketAddr::new(addr(0), cport),
        vaddr: SocketAddr::new(addr(1), vport),
        server: SocketAddr::new(addr(2), dport),
        state: st,
        forwarding,
        template,
        timeout,
    })
}

// ---------------------------------------------------------------------------------------
// Master: the data plane's reports and the refresh
// ---------------------------------------------------------------------------------------

/// Everything a `SYNC_EVENTS` ring holds now, oldest first.
pub fn drain(rb: &mut RingBuf<MapData>) -> Vec<SyncConn> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        if item.len() >= std::mem::size_of::<SyncConn>() {
            // SAFETY: the program writes `SyncConn`s; the length was checked.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const SyncConn) });
        }
    }
    out
}

/// The master's `SYNC_EVENTS` ring ([`Dataplane::take_sync_events`]) as a stream for a
/// tokio task.
pub struct SyncEvents {
    fd: AsyncFd<RingBuf<MapData>>,
}

impl SyncEvents {
    /// Must be called within a tokio runtime.
    pub fn new(rb: RingBuf<MapData>) -> Result<Self> {
        // SAFETY: the ring buffer owns its fd, which lives inside the AsyncFd until it is
        // dropped.
        let fd = unsafe { AsyncFd::register_with_interest(rb, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow!("polling the sync event ring buffer: {e}"))?;
        Ok(SyncEvents { fd })
    }

    /// Waits for reports and returns all there are, oldest first (never empty).
    pub async fn next(&mut self) -> Result<Vec<SyncConn>> {
        loop {
            let mut guard = self
                .fd
                .readable_mut()
                .await
                .context("sync event ring buffer")?;
            // Readiness is cleared before reading: a report that comes after the read wakes
            // the next wait (the kernel notifies once the reader has caught up).
            guard.clear_ready();
            let v = drain(guard.get_inner_mut());
            if !v.is_empty() {
                return Ok(v);
            }
        }
    }
}

/// A data-plane address (IPv4 unless the family says IPv6, as the program writes them).
fn word_addr(family: u8, w: [u32; 4]) -> IpAddr {
    let family = if family == FAMILY_V6 {
        FAMILY_V6
    } else {
        lb_common::FAMILY_V4
    };
    crate::engine::addr_of_words(family, w).expect("a known family")
}

/// What the master needs to know of its real servers, by backend index.
struct Servers<'a> {
    by_index: HashMap<u32, (u32, &'a BackendConfig)>,
    by_id: HashMap<u32, &'a ServiceConfig>,
}

impl<'a> Servers<'a> {
    fn new(refs: &'a [ServiceRef<'a>]) -> Self {
        let mut by_index = HashMap::new();
        let mut by_id = HashMap::new();
        for s in refs {
            by_id.insert(s.id, s.config);
            for b in &s.backends {
                by_index.insert(b.index, (b.generation, b.config));
            }
        }
        Servers { by_index, by_id }
    }

    /// The real server of backend `index` if it still has `generation`.
    fn server(&self, index: u32, generation: u32) -> Option<&'a BackendConfig> {
        self.by_index
            .get(&index)
            .filter(|(g, _)| *g == generation)
            .map(|(_, b)| *b)
    }
}

/// The real server's port as a connection to `vport` uses it (servers of multi-port
/// services have none of their own: the connection keeps its port).
fn server_port(b: &BackendConfig, vport: u16) -> u16 {
    if b.port != 0 { b.port } else { vport }
}

/// A template's timeout in seconds: its service's, else from its ticks.
fn template_timeout(svc: Option<&ServiceConfig>, timeout_ticks: u32) -> u32 {
    svc.and_then(|s| s.persistence)
        .map(|p| p.timeout)
        .unwrap_or_else(|| ((timeout_ticks as u64) << ticks::SHIFT).div_ceil(1_000_000_000) as u32)
}

/// The master's reports as records (reports of servers removed or replaced since are
/// dropped), in order: templates before the connections they control.
pub fn records_from_events(engine: &Engine, events: &[SyncConn]) -> Vec<ConnRecord> {
    let refs = engine.service_refs();
    let servers = Servers::new(&refs);
    events
        .iter()
        .filter_map(|e| {
            let b = servers.server(e.backend, e.generation)?;
            let vport = u16::from_be(e.dport);
            let vaddr = SocketAddr::new(word_addr(e.family, e.dst), vport);
            let server = SocketAddr::new(b.addr, server_port(b, vport));
            let client = SocketAddr::new(word_addr(e.family, e.src), u16::from_be(e.sport));
            Some(if e.kind == sync::TEMPLATE {
                ConnRecord {
                    protocol: e.proto,
                    client,
                    vaddr,
                    server,
                    state: 0,
                    forwarding: b.forwarding,
                    template: true,
                    timeout: template_timeout(servers.by_id.get(&e.service_id).copied(), e.timeout),
                }
            } else {
                ConnRecord {
                    protocol: e.proto,
                    client,
                    vaddr,
                    server,
                    state: e.state,
                    forwarding: b.forwarding,
                    template: false,
                    timeout: engine.state_timeout(e.state),
                }
            })
        })
        .collect()
}

/// Every live template and every connection worth synchronising, templates first: what a
/// periodic refresh sends. `seen_since` (in ticks of [`monotonic_coarse_ticks`]): only the
/// connections that saw a packet since (templates are always sent).
pub fn refresh_records(
    dp: &Dataplane,
    engine: &Engine,
    seen_since: Option<u32>,
) -> Vec<ConnRecord> {
    let refs = engine.service_refs();
    let servers = Servers::new(&refs);
    let now = monotonic_coarse_ticks();
    let mut out = Vec::new();
    for (service_id, net, t) in dp.templates() {
        if t.controlled == u32::MAX || t.expired(t.controlled, now) {
            continue;
        }
        let (Some(svc), Some(b)) = (
            servers.by_id.get(&service_id).copied(),
            servers.server(t.backend, t.generation),
        ) else {
            continue;
        };
        let vport = svc.ports.first().map_or(svc.key.port, |r| r.first);
        out.push(ConnRecord {
            protocol: svc.key.protocol.number(),
            client: SocketAddr::new(net, 0),
            vaddr: SocketAddr::new(svc.key.addr, vport),
            server: SocketAddr::new(b.addr, server_port(b, vport)),
            state: 0,
            forwarding: b.forwarding,
            template: true,
            timeout: template_timeout(Some(svc), t.timeout),
        });
    }
    let flows = dp
        .flows_v4()
        .into_iter()
        .map(|(k, f)| {
            (
                FAMILY_V4,
                [k.src, 0, 0, 0],
                [k.dst, 0, 0, 0],
                k.sport,
                k.dport,
                k.proto,
                f,
            )
        })
        .chain(
            dp.flows_v6()
                .into_iter()
                .map(|(k, f)| (FAMILY_V6, k.src, k.dst, k.sport, k.dport, k.proto, f)),
        );
    for (family, src, dst, sport, dport, proto, f) in flows {
        if f.status & FLOW_DEAD != 0 || !sync::worthy(f.state()) {
            continue;
        }
        if seen_since.is_some_and(|since| (f.last_seen.wrapping_sub(since) as i32) < 0) {
            continue;
        }
        let Some(b) = servers.server(f.backend, f.generation) else {
            continue;
        };
        let vport = u16::from_be(dport);
        out.push(ConnRecord {
            protocol: proto,
            client: SocketAddr::new(word_addr(family, src), u16::from_be(sport)),
            vaddr: SocketAddr::new(word_addr(family, dst), vport),
            server: SocketAddr::new(b.addr, server_port(b, vport)),
            state: f.state(),
            forwarding: b.forwarding,
            template: false,
            timeout: engine.state_timeout(f.state()),
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Backup: installing
// ---------------------------------------------------------------------------------------

/// What [`install`] did with the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Connections that were not in the table, installed and counted.
    pub installed: u64,
    /// Connections that were there on the same real server: state and idle time refreshed.
    pub refreshed: u64,
    /// Connections that were there on another real server: replaced.
    pub replaced: u64,
    /// Templates installed or refreshed.
    pub templates: u64,
    /// Connections kept on their other real server (the master's is not active).
    pub kept: u64,
    /// No service here for the record's virtual address, port and protocol.
    pub no_service: u64,
    /// The service has no such real server here (or it is not usable).
    pub no_server: u64,
    /// Templates for a service that is not persistent here.
    pub not_persistent: u64,
    /// Refused: the connection table is full.
    pub table_full: u64,
    /// Refused: a NAT connection whose reply tuple another service's connection holds.
    pub nat_tuple_taken: u64,
    /// Not done because another CPU was changing the entry (the next refresh brings it).
    pub busy: u64,
    /// Malformed records.
    pub invalid: u64,
}

impl InstallReport {
    /// Records that are now in the tables (installed, refreshed, replaced, templates).
    pub fn applied(&self) -> u64 {
        self.installed + self.refreshed + self.replaced + self.templates
    }

    /// Records that were not applied, for whatever reason.
    pub fn skipped(&self) -> u64 {
        self.kept
            + self.no_service
            + self.no_server
            + self.not_persistent
            + self.table_full
            + self.nat_tuple_taken
            + self.busy
            + self.invalid
    }

    pub fn add(&mut self, o: &InstallReport) {
        self.installed += o.installed;
        self.refreshed += o.refreshed;
        self.replaced += o.replaced;
        self.templates += o.templates;
        self.kept += o.kept;
        self.no_service += o.no_service;
        self.no_server += o.no_server;
        self.not_persistent += o.not_persistent;
        self.table_full += o.table_full;
        self.nat_tuple_taken += o.nat_tuple_taken;
        self.busy += o.busy;
        self.invalid += o.invalid;
    }

    fn count(&mut self, result: u32) {
        let c = match result {
            sync::R_INSTALLED => &mut self.installed,
            sync::R_REFRESHED => &mut self.refreshed,
            sync::R_REPLACED => &mut self.replaced,
            sync::R_TEMPLATE => &mut self.templates,
            sync::R_KEPT => &mut self.kept,
            sync::R_TABLE_FULL => &mut self.table_full,
            sync::R_NO_SERVER => &mut self.no_server,
            sync::R_NAT_TUPLE_TAKEN => &mut self.nat_tuple_taken,
            sync::R_BUSY => &mut self.busy,
            _ => &mut self.invalid,
        };
        *c += 1;
    }
}

/// Whether `addr` is within `net`/`prefix` (same family).
fn in_prefix(net: IpAddr, prefix: u8, addr: IpAddr) -> bool {
    let (n, a) = (ip_bytes(net), ip_bytes(addr));
    if n.len() != a.len() {
        return false;
    }
    let bits = (prefix as usize).min(n.len() * 8);
    let (whole, rest) = (bits / 8, bits % 8);
    if n[..whole] != a[..whole] {
        return false;
    }
    rest == 0 || (n[whole] ^ a[whole]) >> (8 - rest) == 0
}

/// The backup's services, to resolve records against.
struct Resolver<'a> {
    refs: &'a [ServiceRef<'a>],
    /// Single-address, single-port services by (address, port, protocol).
    exact: HashMap<(IpAddr, u16, u8), usize>,
}

impl<'a> Resolver<'a> {
    fn new(refs: &'a [ServiceRef<'a>]) -> Self {
        let mut exact = HashMap::new();
        for (i, s) in refs.iter().enumerate() {
            let k = &s.config.key;
            if let [r] = s.config.ports.as_slice()
                && k.is_host()
                && r.first == r.last
            {
                exact.insert((k.addr, r.first, k.protocol.number()), i);
            }
        }
        Resolver { refs, exact }
    }

    /// The service a packet to `vaddr` of `protocol` would find (the data plane's rule: an
    /// exact service first, else the longest destination prefix, then an exact port).
    fn service(&self, protocol: u8, vaddr: SocketAddr) -> Option<&'a ServiceRef<'a>> {
        if let Some(&i) = self.exact.get(&(vaddr.ip(), vaddr.port(), protocol)) {
            return Some(&self.refs[i]);
        }
        self.refs
            .iter()
            .filter(|s| {
                let c = s.config;
                c.key.protocol.number() == protocol
                    && in_prefix(c.key.addr, c.key.prefix, vaddr.ip())
                    && if c.ports.is_empty() {
                        c.key.port == vaddr.port()
                    } else {
                        c.ports
                            .iter()
                            .any(|r| r.first <= vaddr.port() && vaddr.port() <= r.last)
                    }
            })
            .max_by_key(|s| {
                let single =
                    s.config.ports.len() == 1 && s.config.ports[0].first == s.config.ports[0].last;
                (s.config.key.prefix, single)
            })
    }
}

/// Why a record is not handed to the install program.
enum Skip {
    Invalid,
    NoService,
    NoServer,
    NotPersistent,
}

impl InstallReport {
    fn skip(&mut self, why: Skip) {
        *match why {
            Skip::Invalid => &mut self.invalid,
            Skip::NoService => &mut self.no_service,
            Skip::NoServer => &mut self.no_server,
            Skip::NotPersistent => &mut self.not_persistent,
        } += 1;
    }
}

/// What a record becomes for the install program: this balancer's service id, backend index
/// and generation, and its persistence.
fn resolve(res: &Resolver, r: &ConnRecord) -> Result<SyncConn, Skip> {
    let v6 = r.vaddr.is_ipv6();
    if r.client.is_ipv6() != v6 {
        return Err(Skip::Invalid);
    }
    let svc = res.service(r.protocol, r.vaddr).ok_or(Skip::NoService)?;
    let (ip, port) = (r.server.ip(), r.server.port());
    let be = svc
        .backends
        .iter()
        .find(|b| b.config.addr == ip && b.config.port == port)
        .or_else(|| {
            // A multi-port service's server has no port: the connection kept the client's.
            svc.backends
                .iter()
                .find(|b| b.config.addr == ip && b.config.port == 0 && port == r.vaddr.port())
        })
        .ok_or(Skip::NoServer)?;
    let persistence = svc.config.persistence;
    if r.template && persistence.is_none() {
        return Err(Skip::NotPersistent);
    }
    let (template, timeout) = match persistence {
        Some(p) => {
            let secs = if r.template && r.timeout != 0 {
                r.timeout
            } else {
                p.timeout
            };
            (p.prefix as u32 + 1, ticks::from_secs(secs))
        }
        None => (0, 0),
    };
    Ok(SyncConn {
        kind: if r.template {
            sync::TEMPLATE
        } else {
            sync::CONN
        },
        family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
        proto: r.protocol,
        state: if r.template { 0 } else { r.state },
        src: addr_words(r.client.ip()),
        dst: addr_words(r.vaddr.ip()),
        sport: r.client.port().to_be(),
        dport: r.vaddr.port().to_be(),
        backend: be.index,
        generation: be.generation,
        service_id: svc.id,
        template,
        timeout,
        result: 0,
    })
}

/// Installs synchronised records in this (backup) balancer's tables: each is resolved to
/// this balancer's service and real server, then installed in batches by the
/// `xlb_sync_install` program. Records for services or servers this balancer does not have
/// are counted and skipped.
pub fn install(
    dp: &mut Dataplane,
    engine: &Engine,
    records: &[ConnRecord],
) -> Result<InstallReport> {
    let refs = engine.service_refs();
    let res = Resolver::new(&refs);
    let mut report = InstallReport::default();
    let mut batch = Vec::with_capacity(sync::BATCH);
    for r in records {
        match resolve(&res, r) {
            Ok(c) => batch.push(c),
            Err(why) => report.skip(why),
        }
        if batch.len() == sync::BATCH {
            for result in dp.install_sync(&batch)? {
                report.count(result);
            }
            batch.clear();
        }
    }
    if !batch.is_empty() {
        for result in dp.install_sync(&batch)? {
            report.count(result);
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Transport: UDP, multicast or unicast
// ---------------------------------------------------------------------------------------

/// Where and how synchronisation messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    /// The master's sync id (0..=255) in every message; a backup takes only messages of its
    /// own, or all with 0.
    pub sync_id: u8,
    /// A multicast group and port (default 224.0.0.81:8848; an IPv6 group works too), or for
    /// unicast: the backup to send to (sender) / the local address to listen on (receiver).
    pub addr: SocketAddr,
    /// The interface to send from / receive on (`SO_BINDTODEVICE`; the group is joined
    /// there). Without one, the routing table decides.
    pub interface: Option<String>,
    /// Multicast TTL / hop limit (IPVS: 1).
    pub ttl: u32,
    /// Largest message (the sender's; default 1472 over IPv4, 1452 over IPv6).
    pub maxlen: usize,
    /// The sender's own host receives its multicast messages too (IPVS: off; a test with
    /// both ends on one host needs it).
    pub multicast_loop: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            sync_id: 0,
            addr: SocketAddr::new(IpAddr::V4(DEFAULT_GROUP), DEFAULT_PORT),
            interface: None,
            ttl: 1,
            maxlen: DEFAULT_MAXLEN_V4,
            multicast_loop: false,
        }
    }
}

impl SyncConfig {
    /// The default message size for messages to `addr`.
    pub fn default_maxlen(addr: &SocketAddr) -> usize {
        if addr.is_ipv6() {
            DEFAULT_MAXLEN_V6
        } else {
            DEFAULT_MAXLEN_V4
        }
    }
}

/// Counters of one end of the synchronisation.
#[derive(Default, Debug)]
pub struct SyncCounters {
    pub messages_sent: AtomicU64,
    pub records_sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub messages_received: AtomicU64,
    pub records_received: AtomicU64,
    /// Messages refused as a whole (malformed, version 0, another sync id).
    pub messages_dropped: AtomicU64,
    /// Records skipped inside accepted messages.
    pub records_skipped: AtomicU64,
    last_receive: Mutex<Option<Instant>>,
}

/// A snapshot of [`SyncCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub messages_sent: u64,
    pub records_sent: u64,
    pub send_errors: u64,
    pub messages_received: u64,
    pub records_received: u64,
    pub messages_dropped: u64,
    pub records_skipped: u64,
    /// When the last accepted message arrived (a backup's synchronisation lag).
    pub last_receive: Option<Instant>,
}

impl SyncCounters {
    pub fn snapshot(&self) -> SyncStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SyncStats {
            messages_sent: g(&self.messages_sent),
            records_sent: g(&self.records_sent),
            send_errors: g(&self.send_errors),
            messages_received: g(&self.messages_received),
            records_received: g(&self.records_received),
            messages_dropped: g(&self.messages_dropped),
            records_skipped: g(&self.records_skipped),
            last_receive: *self.last_receive.lock().unwrap(),
        }
    }
}

/// Binds the sync socket; an IPv6 link-local address without a scope gets `scope_id` (the
/// sync interface's index).
fn bind(fd: &OwnedFd, addr: SocketAddr, scope_id: u32) -> io::Result<()> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6};
    let r = match addr {
        SocketAddr::V4(a) => nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => {
            let scope = if a.scope_id() != 0 {
                a.scope_id()
            } else {
                scope_id
            };
            let a = std::net::SocketAddrV6::new(*a.ip(), a.port(), 0, scope);
            nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))
        }
    };
    r.map_err(io::Error::from)
}

/// A UDP socket for `cfg`: the receiver's (bound to the group or the unicast address, group
/// joined) or the sender's (multicast interface, TTL and loop set).
fn open_socket(cfg: &SyncConfig, receiver: bool) -> Result<tokio::net::UdpSocket> {
    let v6 = cfg.addr.is_ipv6();
    let multicast = cfg.addr.ip().is_multicast();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let fd = sockopt::socket(domain, libc::SOCK_DGRAM, 0).context("creating the sync socket")?;
    let ifindex = match &cfg.interface {
        Some(name) => {
            let i = crate::dataplane::ifindex(name)?;
            sockopt::bind_to_device(&fd, name)
                .with_context(|| format!("binding the sync socket to {name}"))?;
            i
        }
        None => 0,
    };
    let one: libc::c_int = 1;
    if receiver {
        sockopt::set(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one).context("SO_REUSEADDR")?;
        if v6 {
            sockopt::set(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &one)
                .context("IPV6_V6ONLY")?;
        }
        bind(&fd, cfg.addr, ifindex)
            .with_context(|| format!("binding the sync socket to {}", cfg.addr))?;
        if multicast {
            match cfg.addr.ip() {
                IpAddr::V4(g) => {
                    let m = libc::ip_mreqn {
                        imr_multiaddr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(g.octets()),
                        },
                        imr_address: libc::in_addr { s_addr: 0 },
                        imr_ifindex: ifindex as libc::c_int,
                    };
                    sockopt::set(&fd, libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, &m)
                }
                IpAddr::V6(g) => {
                    let m = libc::ipv6_mreq {
                        ipv6mr_multiaddr: libc::in6_addr {
                            s6_addr: g.octets(),
                        },
                        ipv6mr_interface: ifindex,
                    };
                    sockopt::set(&fd, libc::IPPROTO_IPV6, libc::IPV6_ADD_MEMBERSHIP, &m)
                }
            }
            .with_context(|| format!("joining the sync group {}", cfg.addr.ip()))?;
        }
    } else if multicast {
        let ttl = cfg.ttl as libc::c_int;
        let lp = cfg.multicast_loop as libc::c_int;
        if v6 {
            let i = ifindex as libc::c_int;
            sockopt::set(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, &i)
                .context("IPV6_MULTICAST_IF")?;
            sockopt::set(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &ttl)
                .context("IPV6_MULTICAST_HOPS")?;
            sockopt::set(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, &lp)
                .context("IPV6_MULTICAST_LOOP")?;
        } else {
            let m = libc::ip_mreqn {
                imr_multiaddr: libc::in_addr { s_addr: 0 },
                imr_address: libc::in_addr { s_addr: 0 },
                imr_ifindex: ifindex as libc::c_int,
            };
            sockopt::set(&fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &m)
                .context("IP_MULTICAST_IF")?;
            sockopt::set(&fd, libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, &ttl)
                .context("IP_MULTICAST_TTL")?;
            sockopt::set(&fd, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &lp)
                .context("IP_MULTICAST_LOOP")?;
        }
    }
    let std_socket = std::net::UdpSocket::from(fd);
    tokio::net::UdpSocket::from_std(std_socket).context("registering the sync socket")
}

/// The master's end: sends records as version 1 messages.
pub struct SyncSender {
    socket: tokio::net::UdpSocket,
    dest: SocketAddr,
    sync_id: u8,
    maxlen: usize,
    counters: Arc<SyncCounters>,
}

impl SyncSender {
    /// Opens the socket (within a tokio runtime).
    pub fn new(cfg: &SyncConfig) -> Result<Self> {
        let mut dest = cfg.addr;
        // An IPv6 group's scope (link-local ff02::...) is the interface's.
        if let (SocketAddr::V6(d), Some(name)) = (&mut dest, &cfg.interface)
            && d.scope_id() == 0
            && d.ip().is_multicast()
        {
            d.set_scope_id(crate::dataplane::ifindex(name)?);
        }
        Ok(SyncSender {
            socket: open_socket(cfg, false)?,
            dest,
            sync_id: cfg.sync_id,
            maxlen: cfg.maxlen,
            counters: Arc::default(),
        })
    }

    /// Sends the records (as many messages as they need, in order); the number of messages.
    /// Every message is tried; the first error is returned.
    pub async fn send(&self, records: &[ConnRecord]) -> Result<usize> {
        let messages = encode_batch(self.sync_id, records, self.maxlen);
        let mut first_error = None;
        for m in &messages {
            match self.socket.send_to(m, self.dest).await {
                Ok(_) => {
                    self.counters.messages_sent.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .records_sent
                        .fetch_add(m[4] as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(anyhow!(e).context(format!("sending sync messages to {}", self.dest))),
            None => Ok(messages.len()),
        }
    }

    pub fn stats(&self) -> SyncStats {
        self.counters.snapshot()
    }

    /// The live counters (shareable with whoever reports them).
    pub fn counters(&self) -> Arc<SyncCounters> {
        self.counters.clone()
    }
}

/// The backup's end: receives and decodes messages.
pub struct SyncReceiver {
    socket: tokio::net::UdpSocket,
    sync_id: u8,
    buf: Vec<u8>,
    counters: Arc<SyncCounters>,
}

impl SyncReceiver {
    /// Opens the socket and joins the group (within a tokio runtime).
    pub fn new(cfg: &SyncConfig) -> Result<Self> {
        Ok(SyncReceiver {
            socket: open_socket(cfg, true)?,
            sync_id: cfg.sync_id,
            buf: vec![0; u16::MAX as usize],
            counters: Arc::default(),
        })
    }

    /// The address the socket is bound to (a unicast receiver bound to port 0 learns its
    /// port here).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// Waits for the next message with records and returns them. Messages that are refused
    /// (malformed, version 0, another sync id) are counted and skipped.
    pub async fn recv(&mut self) -> Result<Vec<ConnRecord>> {
        loop {
            let (n, from) = self
                .socket
                .recv_from(&mut self.buf)
                .await
                .context("receiving sync messages")?;
            match decode_message(&self.buf[..n], self.sync_id) {
                Ok(m) => {
                    let c = &self.counters;
                    c.messages_received.fetch_add(1, Ordering::Relaxed);
                    c.records_received
                        .fetch_add(m.records.len() as u64, Ordering::Relaxed);
                    c.records_skipped
                        .fetch_add(m.skipped as u64, Ordering::Relaxed);
                    *c.last_receive.lock().unwrap() = Some(Instant::now());
                    if !m.records.is_empty() {
                        return Ok(m.records);
                    }
                }
                Err(e) => {
                    self.counters
                        .messages_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%from, "sync message dropped: {e}");
                }
            }
        }
    }

    pub fn stats(&self) -> SyncStats {
        self.counters.snapshot()
    }

    pub fn counters(&self) -> Arc<SyncCounters> {
        self.counters.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn conn4() -> ConnRecord {
        ConnRecord {
            protocol: PROTO_TCP,
            client: sa("192.168.1.1:40000"),
            vaddr: sa("10.0.0.10:80"),
            server: sa("10.0.1.2:8080"),
            state: state::ESTABLISHED,
            forwarding: Forwarding::Dr,
            template: false,
            timeout: 900,
        }
    }

    fn conn6() -> ConnRecord {
        ConnRecord {
            protocol: PROTO_UDP,
            client: sa("[2001:db8:9::1]:5353"),
            vaddr: sa("[2001:db8::10]:53"),
            server: sa("[2001:db8:1::1]:53"),
            state: state::UDP,
            forwarding: Forwarding::Nat,
            template: false,
            timeout: 300,
        }
    }

    fn template4() -> ConnRecord {
        ConnRecord {
            protocol: PROTO_TCP,
            client: sa("192.168.1.0:0"),
            vaddr: sa("10.0.0.10:443"),
            server: sa("10.0.1.3:443"),
            state: 0,
            forwarding: Forwarding::Tunnel,
            template: true,
            timeout: 360,
        }
    }

    /// §8's layout, field by field: header (reserved 0, syncid, size BE, nr_conns, version
    /// 1, spare 0) and a 36-byte IPv4 record.
    #[test]
    fn one_ipv4_record_has_the_exact_ipvs_v1_layout() {
        let msgs = encode_batch(7, &[conn4()], DEFAULT_MAXLEN_V4);
        assert_eq!(msgs.len(), 1);
        let want: Vec<u8> = vec![
            // header
            0, 7, 0, 44, 1, 1, 0, 0, //
            // type (IPv4), protocol TCP, ver_size = version 0 | 36
            0, 6, 0x00, 36, //
            // flags: DROUTE (3), active (no INACTIVE)
            0, 0, 0, 3, //
            // state ESTABLISHED (1), cport 40000, vport 80, dport 8080
            0, 1, 0x9c, 0x40, 0, 80, 0x1f, 0x90, //
            // fwmark 0, timeout 900
            0, 0, 0, 0, 0, 0, 0x03, 0x84, //
            // caddr, vaddr, daddr
            192, 168, 1, 1, 10, 0, 0, 10, 10, 0, 1, 2,
        ];
        assert_eq!(msgs[0], want);
        assert_eq!(
            decode(&msgs[0], 7).unwrap(),
            vec![conn4()],
            "and back again"
        );
    }

    #[test]
    fn ipv6_record_is_72_bytes_with_the_inet6_type_bit() {
        let m = &encode_batch(1, &[conn6()], 1500)[0];
        assert_eq!(m.len(), HEADER_LEN + RECORD_V6_LEN);
        let r = &m[HEADER_LEN..];
        assert_eq!(r[0], 1, "type: IPv6");
        assert_eq!(r[1], 17);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), 72);
        // NAT (MASQ = 0) and inactive: UDP counts as InActConn.
        assert_eq!(
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            flags::INACTIVE
        );
        assert_eq!(u16::from_be_bytes([r[8], r[9]]), 0, "IP_VS_UDP_S_NORMAL");
        assert_eq!(r[24..40], ip_bytes(conn6().client.ip()));
        assert_eq!(decode(m, 0).unwrap(), vec![conn6()]);
    }

    #[test]
    fn templates_round_trip_with_the_template_flag() {
        let m = &encode_batch(0, &[template4(), conn4()], 1500)[0];
        let f = u32::from_be_bytes(m[12..16].try_into().unwrap());
        assert_eq!(f, flags::TEMPLATE | flags::TUNNEL);
        assert_eq!(decode(m, 0).unwrap(), vec![template4(), conn4()]);
    }

    #[test]
    fn round_trip_mixed_families_and_states() {
        let mut records = Vec::new();
        for (i, st) in [
            state::ESTABLISHED,
            state::FIN_WAIT,
            state::CLOSE,
            state::CLOSE_WAIT,
            state::TIME_WAIT,
            state::SYN_RECV,
        ]
        .into_iter()
        .enumerate()
        {
            records.push(ConnRecord {
                state: st,
                client: SocketAddr::new(sa("192.168.1.1:0").ip(), 1000 + i as u16),
                ..conn4()
            });
            records.push(ConnRecord {
                client: SocketAddr::new(sa("[2001:db8:9::1]:0").ip(), 2000 + i as u16),
                ..conn6()
            });
        }
        records.push(template4());
        let msgs = encode_batch(3, &records, 1500);
        let back: Vec<ConnRecord> = msgs.iter().flat_map(|m| decode(m, 3).unwrap()).collect();
        assert_eq!(back, records);
    }

    #[test]
    fn batches_split_at_maxlen_and_255_records() {
        let records: Vec<ConnRecord> = (0..100)
            .map(|i| ConnRecord {
                client: SocketAddr::new(sa("192.168.1.1:0").ip(), 1000 + i),
                ..conn4()
            })
            .collect();
        let msgs = encode_batch(0, &records, DEFAULT_MAXLEN_V4);
        // (1472 - 8) / 36 = 40 records a message.
        assert_eq!(
            msgs.iter().map(|m| m[4]).collect::<Vec<_>>(),
            vec![40, 40, 20]
        );
        for m in &msgs {
            assert!(m.len() <= DEFAULT_MAXLEN_V4);
            assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len());
        }
        assert_eq!(msgs[0].len(), 8 + 40 * 36);
        let back: Vec<ConnRecord> = msgs.iter().flat_map(|m| decode(m, 0).unwrap()).collect();
        assert_eq!(back, records);

        // Mixed sizes: an IPv6 record that does not fit starts the next message.
        let mixed = [conn4(), conn4(), conn6()];
        let msgs = encode_batch(0, &mixed, 8 + 36 * 2 + 71);
        assert_eq!(msgs.iter().map(|m| m[4]).collect::<Vec<_>>(), vec![2, 1]);

        // nr_conns is a byte: at most 255 records, however large the message may be.
        let many: Vec<ConnRecord> = (0..300)
            .map(|i| ConnRecord {
                client: SocketAddr::new(sa("192.168.1.1:0").ip(), i),
                ..conn4()
            })
            .collect();
        let msgs = encode_batch(0, &many, 65535);
        assert_eq!(msgs.iter().map(|m| m[4]).collect::<Vec<_>>(), vec![255, 45]);

        // Too small a maxlen still carries one IPv6 record per message.
        let msgs = encode_batch(0, &[conn6(), conn6()], 10);
        assert_eq!(msgs.len(), 2);
        assert!(encode_batch(0, &[], 1472).is_empty());
    }

    #[test]
    fn sync_id_filter_as_ipvs() {
        let m = &encode_batch(5, &[conn4()], 1500)[0];
        assert_eq!(
            decode(m, 0).unwrap().len(),
            1,
            "sync id 0 takes every sync id"
        );
        assert_eq!(decode(m, 5).unwrap().len(), 1);
        assert_eq!(
            decode(m, 6),
            Err(SyncError::OtherSyncId { got: 5, want: 6 })
        );
        assert_eq!(decode_message(m, 0).unwrap().sync_id, 5);
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let good = encode_batch(0, &[conn4(), conn4()], 1500).remove(0);
        assert_eq!(decode(&[], 0), Err(SyncError::TooShort(0)));
        assert_eq!(decode(&good[..3], 0), Err(SyncError::TooShort(3)));
        // Truncated: the size no longer matches.
        assert_eq!(
            decode(&good[..good.len() - 1], 0),
            Err(SyncError::BadSize {
                got: good.len() - 1,
                said: good.len()
            })
        );
        // A version 0 message: nr_conns first (reserved != 0), 24-byte records.
        let mut v0 = vec![1u8, 0, 0, 28];
        v0.extend_from_slice(&[0; 24]);
        assert_eq!(
            decode(&v0, 0),
            Err(SyncError::NotVersion1 {
                version: 0,
                reserved: 1
            })
        );
        let err = decode(&v0, 0).unwrap_err().to_string();
        assert!(err.contains("version 0"), "{err}");
        // Version 2, or the spare field set.
        let mut m = good.clone();
        m[5] = 2;
        assert!(matches!(
            decode(&m, 0),
            Err(SyncError::NotVersion1 { version: 2, .. })
        ));
        let mut m = good.clone();
        m[7] = 1;
        assert!(matches!(decode(&m, 0), Err(SyncError::NotVersion1 { .. })));
        // More records announced than there are.
        let mut m = good.clone();
        m[4] = 3;
        assert_eq!(decode(&m, 0), Err(SyncError::Overrun { index: 2 }));
        // A record claiming to be longer than the message.
        let mut m = good.clone();
        m[8 + 36 + 3] = 100;
        assert_eq!(decode(&m, 0), Err(SyncError::Overrun { index: 1 }));
        // A record of another version.
        let mut m = good.clone();
        m[8 + 2] = 0x10;
        assert_eq!(
            decode(&m, 0),
            Err(SyncError::RecordVersion {
                index: 0,
                version: 1
            })
        );
        // An IPv6 record of IPv4 length.
        let mut m = good.clone();
        m[8] = 1;
        assert_eq!(
            decode(&m, 0),
            Err(SyncError::RecordTooShort { index: 0, len: 36 })
        );
        // Garbage.
        let mut garbage = vec![0xa5u8; 100];
        garbage[2..4].copy_from_slice(&100u16.to_be_bytes());
        assert!(matches!(
            decode(&garbage, 0),
            Err(SyncError::NotVersion1 { .. })
        ));
    }

    #[test]
    fn records_ipvs_skips_are_skipped_not_fatal() {
        let mut m = encode_batch(0, &[conn4(), conn4(), conn4(), conn4(), conn4()], 1500).remove(0);
        let rec = |i: usize| HEADER_LEN + i * RECORD_V4_LEN;
        m[rec(0) + 1] = 132; // SCTP
        m[rec(1) + 9] = 11; // TCP state past SYNACK
        m[rec(2) + 7] = 1; // LOCALNODE forwarding
        m[rec(3) + 19] = 9; // a firewall mark
        let d = decode_message(&m, 0).unwrap();
        assert_eq!(d.records, vec![conn4()]);
        assert_eq!(d.skipped, 4);
    }

    #[test]
    fn records_with_options_are_read_past() {
        // A record carrying a 4-byte option (padded to 4): its length says 40.
        let mut m = encode_batch(0, &[conn4(), conn4()], 1500).remove(0);
        let mut opt = m[..HEADER_LEN + RECORD_V4_LEN].to_vec();
        opt[HEADER_LEN + 3] = 40;
        opt.extend_from_slice(&[2, 2, 0xaa, 0xbb]);
        opt.extend_from_slice(&m.split_off(HEADER_LEN + RECORD_V4_LEN));
        let len = opt.len() as u16;
        opt[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&opt, 0).unwrap(), vec![conn4(), conn4()]);
    }

    #[test]
    fn unencodable_records_are_left_out() {
        let mixed = ConnRecord {
            server: sa("[2001:db8:1::1]:80"),
            ..conn4()
        };
        assert!(encode_record(&mixed).is_none());
        let msgs = encode_batch(0, &[mixed, conn4()], 1500);
        assert_eq!(decode(&msgs[0], 0).unwrap(), vec![conn4()]);
    }

    #[test]
    fn prefixes_contain_what_they_should() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_prefix(ip("10.0.0.0"), 8, ip("10.200.1.1")));
        assert!(!in_prefix(ip("10.0.0.0"), 9, ip("10.200.1.1")));
        assert!(in_prefix(ip("10.0.0.10"), 32, ip("10.0.0.10")));
        assert!(in_prefix(ip("0.0.0.0"), 0, ip("1.2.3.4")));
        assert!(in_prefix(ip("2001:db8::"), 32, ip("2001:db8:ffff::1")));
        assert!(!in_prefix(ip("2001:db8::"), 33, ip("2001:db8:ffff::1")));
        assert!(!in_prefix(ip("10.0.0.0"), 8, ip("2001:db8::1")));
    }

    /// Unicast over the loopback: what is sent arrives decoded; foreign sync ids and garbage
    /// are counted and skipped.
    #[tokio::test]
    async fn unicast_transport_delivers_and_filters() {
        let mut rx = SyncReceiver::new(&SyncConfig {
            sync_id: 9,
            addr: sa("127.0.0.1:0"),
            ..SyncConfig::default()
        })
        .unwrap();
        let to = rx.local_addr().unwrap();
        let tx = SyncSender::new(&SyncConfig {
            sync_id: 9,
            addr: to,
            ..SyncConfig::default()
        })
        .unwrap();
        let other = SyncSender::new(&SyncConfig {
            sync_id: 4,
            addr: to,
            ..SyncConfig::default()
        })
        .unwrap();
        other.send(&[conn4()]).await.unwrap();
        let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        junk.send_to(b"not a sync message", to).unwrap();
        let records: Vec<ConnRecord> = (0..50)
            .map(|i| ConnRecord {
                client: SocketAddr::new(sa("192.168.1.1:0").ip(), 1000 + i),
                ..conn4()
            })
            .chain([conn6(), template4()])
            .collect();
        assert_eq!(tx.send(&records).await.unwrap(), 2);
        let mut got = Vec::new();
        while got.len() < records.len() {
            got.extend(rx.recv().await.unwrap());
        }
        assert_eq!(got, records);
        let s = rx.stats();
        assert_eq!(s.messages_received, 2);
        assert_eq!(s.records_received, 52);
        assert_eq!(s.messages_dropped, 2, "the other sync id and the junk");
        assert!(s.last_receive.is_some());
        let t = tx.stats();
        assert_eq!((t.messages_sent, t.records_sent, t.send_errors), (2, 52, 0));
    }
}
