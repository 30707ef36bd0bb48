//! Connection tracking: the flow table keeps every packet of a flow on the real server its first
//! packet was scheduled to, and follows the IPVS state machine (direct-routing "input only"
//! table) so idle timeouts are the IPVS ones. Packets that open a connection are matched to
//! their virtual service here and handed to the scheduler.

use aya_ebpf::maps::{LruHashMap, PerCpuArray};
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, FAMILY_V4, FAMILY_V6, FLOW_DEAD, Flow, FlowKeyV4, FlowKeyV6,
    PROTO_TCP, Service, reason,
    sched::F_STATELESS,
    tcp::{self, Direction, state},
};

use crate::{
    acct, admit,
    maps::{BACKENDS, FLOWS_V4, FLOWS_V6, GLOBALS, RECENT_V4, RECENT_V6},
    parse::Pkt,
    sched, service, stats,
};

/// The real server a packet goes to (a reference into `BACKENDS`, never a copy: large
/// by-value results make LLVM spill uninitialised bytes the verifier rejects).
pub struct Target {
    pub index: u32,
    pub service_id: u32,
    pub backend: &'static Backend,
    /// The packet created the connection.
    pub new_conn: bool,
}

pub trait FlowKey: Sized + 'static {
    /// `FAMILY_V4` or `FAMILY_V6`.
    const FAMILY: u8;
    /// The table's index in per-family arrays (0 IPv4, 1 IPv6).
    const INDEX: usize;
    fn from_pkt(pkt: &Pkt) -> Self;
    fn table() -> &'static LruHashMap<Self, Flow>;
    /// This family's rings of recently created connections.
    fn recent() -> &'static PerCpuArray<Self>;
}

impl FlowKey for FlowKeyV4 {
    const FAMILY: u8 = FAMILY_V4;
    const INDEX: usize = 0;
    #[inline(always)]
    fn from_pkt(pkt: &Pkt) -> Self {
        FlowKeyV4::new(pkt.src[0], pkt.dst[0], pkt.sport, pkt.dport, pkt.proto)
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Flow> {
        &FLOWS_V4
    }
    #[inline(always)]
    fn recent() -> &'static PerCpuArray<Self> {
        &RECENT_V4
    }
}

impl FlowKey for FlowKeyV6 {
    const FAMILY: u8 = FAMILY_V6;
    const INDEX: usize = 1;
    #[inline(always)]
    fn from_pkt(pkt: &Pkt) -> Self {
        FlowKeyV6::new(pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto)
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Flow> {
        &FLOWS_V6
    }
    #[inline(always)]
    fn recent() -> &'static PerCpuArray<Self> {
        &RECENT_V6
    }
}

/// Finds the flow of `pkt` or, for a packet that may open one, schedules it; `Err` carries the
/// reason counter. An established flow needs no service lookup: its entry names the service
/// and the real server.
#[inline(always)]
pub fn track(pkt: &Pkt, now: u32) -> Result<Target, u32> {
    if pkt.family == FAMILY_V4 {
        track_in::<FlowKeyV4>(pkt, now)
    } else {
        track_in::<FlowKeyV6>(pkt, now)
    }
}

/// IPVS `expire_nodest_conn` is set.
#[inline(always)]
fn expire_nodest() -> bool {
    GLOBALS
        .get(0)
        .is_some_and(|g| g.flags & lb_common::GLOBAL_F_EXPIRE_NODEST != 0)
}

/// The idle timeout of state `st`, in ticks.
#[inline(always)]
pub fn timeout(st: u8) -> u32 {
    match GLOBALS.get(0) {
        Some(g) => g.timeout(st),
        None => 0,
    }
}

#[inline(always)]
fn track_in<K: FlowKey>(pkt: &Pkt, now: u32) -> Result<Target, u32> {
    let key = K::from_pkt(pkt);
    let is_tcp = pkt.proto == PROTO_TCP;
    let f = pkt.tcp_flags;
    // IPVS creates connections from UDP datagrams and from TCP SYNs without RST.
    let may_create = !is_tcp || (f & tcp::flags::SYN != 0 && f & tcp::flags::RST == 0);
    let plain_syn = is_tcp
        && f & (tcp::flags::SYN | tcp::flags::ACK | tcp::flags::RST | tcp::flags::FIN)
            == tcp::flags::SYN;

    // A SYN almost always opens a new connection: insert it directly (one hash-table walk
    // instead of a lookup and then an insert). The pick is claimed only if the insert shows
    // the flow is new; a retransmitted SYN finds its entry below, like any other packet.
    if plain_syn && let Some(t) = syn_fast_path(&key, pkt, now) {
        return Ok(t);
    }

    if let Some(entry) = K::table().get_ptr_mut(&key) {
        let status_ptr = unsafe { &raw mut (*entry).status };
        // One read: every decision below is about this status, and the swap that applies a
        // change fails if another CPU (or the reaper) changed it meanwhile.
        let status = unsafe { core::ptr::read_volatile(status_ptr) };
        let st = status as u8;
        let flow = unsafe { &mut *entry };
        let expired = status & FLOW_DEAD != 0 || now.wrapping_sub(flow.last_seen) > timeout(st);
        let Some(slot) = BACKENDS.get(flow.backend) else {
            return Err(reason::DROP_INTERNAL);
        };
        let backend = slot.current();
        // The generation names the real server; the service it belongs to now is the
        // backend entry's (a server revived from the trash after its service was re-created
        // keeps its flows, as in IPVS).
        let alive =
            backend.flags & BACKEND_F_AVAILABLE != 0 && backend.generation == flow.generation;
        // A fresh SYN on a closed connection's tuple starts a new connection (IPVS
        // conn_reuse_mode 1).
        let reused = plain_syn && (st == state::TIME_WAIT || st == state::CLOSE);
        if !expired && alive && !reused {
            if pkt.ttl <= 1 {
                return Err(reason::PASS_TTL_EXPIRED);
            }
            let next = if is_tcp {
                tcp::next_state(Direction::InputOnly, st, f)
            } else {
                state::UDP
            };
            // Write only on change: most packets leave the entry (and its cache line) clean.
            // Losing the swap means someone else changed the state first; theirs stands.
            if next != st && acct::swap_status(status_ptr, status, next as u32) {
                acct::moved(flow.backend, st, next);
                if tcp::is_active(st) && !tcp::is_active(next) {
                    // Closing: its entry may now go to a new connection if the table fills.
                    admit::record(&key);
                }
            }
            if flow.last_seen != now {
                flow.last_seen = now;
            }
            return Ok(Target {
                index: flow.backend,
                service_id: backend.service_id,
                backend,
                new_conn: false,
            });
        }
        if !expired && !alive && !reused {
            // The real server was removed: IPVS (expire_nodest_conn=0) drops the packets of
            // its connections, a SYN on the same tuple included, until the entry expires.
            if !expire_nodest() {
                return Err(reason::DROP_BACKEND_GONE);
            }
            // expire_nodest_conn=1: the connection ends here; a packet that may open one is
            // scheduled afresh, any other is dropped.
            if acct::retire(status_ptr, status, flow.backend) {
                let _ = K::table().remove(&key);
                acct::release_entry(K::FAMILY);
            }
            if !may_create {
                return Err(reason::DROP_BACKEND_GONE);
            }
            let svc = service::lookup(pkt).ok_or(reason::PASS_NO_SERVICE)?;
            stats::count(reason::EV_FLOW_RESCHEDULED);
            return schedule(&key, pkt, svc, now);
        }
        let svc = service::lookup(pkt).ok_or(reason::PASS_NO_SERVICE)?;
        if !may_create {
            return untracked(pkt, svc);
        }
        // The old connection ends here (unless the reaper got to it first, in which case it
        // deletes the entry): its count goes, its entry returns to the pool.
        if acct::retire(status_ptr, status, flow.backend) {
            let _ = K::table().remove(&key);
            acct::release_entry(pkt.family);
        }
        stats::count(reason::EV_FLOW_RESCHEDULED);
        return schedule(&key, pkt, svc, now);
    }
    let svc = service::lookup(pkt).ok_or(reason::PASS_NO_SERVICE)?;
    if !may_create {
        return untracked(pkt, svc);
    }
    schedule(&key, pkt, svc, now)
}

/// A packet that cannot open a connection and has none (IPVS hands it to the local stack).
/// For sh, dh and mh the hash names the server the connection was on (unless the table of
/// servers changed), so the packet goes there: connections survive a full table, a restart of
/// the balancer or a failover to another one.
#[inline(always)]
fn untracked(pkt: &Pkt, svc: &Service) -> Result<Target, u32> {
    if !sched::deterministic(svc) {
        return Err(reason::PASS_TCP_NO_FLOW);
    }
    if pkt.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    let (index, backend) = sched::pick(svc, pkt)?;
    if svc.flags & F_STATELESS == 0 {
        stats::count(reason::EV_FLOW_UNTRACKED);
    }
    Ok(Target {
        index,
        service_id: svc.id,
        backend,
        new_conn: false,
    })
}

/// `BPF_NOEXIST`: insert only if the key is absent. Every insert uses it: overwriting an
/// entry would lose its connection's count.
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// The SYN of a new connection. `None` when the flow exists already, or when anything stands
/// in the way (no service, no usable server, expiring TTL, a full table): the regular path
/// then looks at the connection table first and decides, so a retransmitted SYN of an
/// existing connection always follows it.
#[inline(always)]
fn syn_fast_path<K: FlowKey>(key: &K, pkt: &Pkt, now: u32) -> Option<Target> {
    let svc = service::lookup(pkt)?;
    if pkt.ttl <= 1 {
        return None;
    }
    if svc.flags & F_STATELESS != 0 {
        // No entry to insert: the hash is the connection table.
        let (index, backend) = sched::pick(svc, pkt).ok()?;
        return Some(Target {
            index,
            service_id: svc.id,
            backend,
            new_conn: true,
        });
    }
    let t = sched::peek(svc, pkt).ok()?;
    // A full table is the regular path's business (it may recycle an entry).
    if !acct::take_entry(K::FAMILY) {
        return None;
    }
    // A plain SYN in state NONE: the input-only table's answer, without the lookup.
    let initial = state::SYN_RECV;
    let flow = Flow::new(t.index, t.backend.generation, svc.id, now, initial);
    let recorded = match K::table().insert(key, &flow, BPF_NOEXIST) {
        Ok(()) => true,
        Err(e) => {
            acct::untake_entry(K::FAMILY);
            if e == -EEXIST {
                return None;
            }
            stats::count(reason::EV_FLOW_INSERT_FAILED);
            false
        }
    };
    let (index, backend) = match sched::confirm(svc, &t) {
        Ok(None) => (t.index, t.backend),
        Ok(Some((index, backend))) => {
            // Lost the race for that pick: record the one this flow owns. The entry is
            // ours alone until the SYN is forwarded (a flow's packets arrive on one CPU), and
            // it is counted only below, so rewriting it in place is safe.
            if recorded && let Some(e) = K::table().get_ptr_mut(key) {
                unsafe {
                    (*e).backend = index;
                    (*e).generation = backend.generation;
                }
            }
            (index, backend)
        }
        // The table changed under us and the number we own has no usable server: keep the
        // peeked one (recorded already) rather than drop a new connection.
        Err(_) => (t.index, t.backend),
    };
    if recorded {
        acct::created(index, initial);
        admit::record(key);
    }
    Some(Target {
        index,
        service_id: svc.id,
        backend,
        new_conn: true,
    })
}

/// A new connection: pick a real server and record the flow.
#[inline(always)]
fn schedule<K: FlowKey>(key: &K, pkt: &Pkt, svc: &Service, now: u32) -> Result<Target, u32> {
    if pkt.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    // Before the pick, so a refused connection does not advance the scheduler.
    let tracked = svc.flags & F_STATELESS == 0 && admit::take::<K>(now);
    if !tracked && !sched::deterministic(svc) {
        return Err(reason::DROP_FLOW_TABLE_FULL);
    }
    let (index, backend) = match sched::pick(svc, pkt) {
        Ok(p) => p,
        Err(why) => {
            if tracked {
                acct::untake_entry(K::FAMILY);
            }
            return Err(why);
        }
    };
    if !tracked {
        // sh, dh, mh: the hash keeps the connection on its server without an entry.
        if svc.flags & F_STATELESS == 0 {
            stats::count(reason::EV_FLOW_UNTRACKED);
        }
    } else {
        let initial = if pkt.proto == PROTO_TCP {
            tcp::next_state(Direction::InputOnly, state::NONE, pkt.tcp_flags)
        } else {
            state::UDP
        };
        let flow = Flow::new(index, backend.generation, svc.id, now, initial);
        if K::table().insert(key, &flow, BPF_NOEXIST).is_ok() {
            acct::created(index, initial);
            admit::record(key);
        } else {
            // Another CPU recorded this tuple meanwhile (or the table refused): this packet
            // still goes to the server picked for it.
            acct::untake_entry(K::FAMILY);
            stats::count(reason::EV_FLOW_INSERT_FAILED);
        }
    }
    Ok(Target {
        index,
        service_id: svc.id,
        backend,
        new_conn: true,
    })
}
