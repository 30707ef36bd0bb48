//! Connection tracking: the flow table keeps every packet of a flow on the real server its first
//! packet was scheduled to, and follows the IPVS state machine (direct-routing "input only"
//! table) so idle timeouts are the IPVS ones. Packets that open a connection are matched to
//! their virtual service here and handed to the scheduler.

use aya_ebpf::maps::{Array, PerCpuArray};
use lb_common::{
    BACKEND_F_AVAILABLE, FAMILY_V4, FAMILY_V6, FLOW_DEAD, Flow, FlowKeyV4, FlowKeyV6, PROTO_TCP,
    Service,
    conntable::{FlowBucket, FlowEntry},
    reason,
    sched::F_STATELESS,
    tcp::{self, Direction, state},
};

use crate::{
    acct, admit, conntable,
    maps::{
        BACKENDS, FLOW_BUCKETS_V4, FLOW_BUCKETS_V6, FLOW_SPILLED_V4, FLOW_SPILLED_V6, FLOWS_V4,
        FLOWS_V6, GLOBALS, RECENT_V4, RECENT_V6,
    },
    nat,
    parse::Pkt,
    persist, sched, service, stats, sync,
};

/// The real server a packet goes to (its index in `BACKENDS`).
pub struct Target {
    pub index: u32,
    pub service_id: u32,
    /// The packet created the connection.
    pub new_conn: bool,
}

pub trait FlowKey: persist::Templated + nat::NatKey {
    /// `FAMILY_V4` or `FAMILY_V6`.
    const FAMILY: u8;
    /// The table's index in per-family arrays (0 IPv4, 1 IPv6).
    const INDEX: usize;
    fn from_pkt(pkt: &Pkt) -> Self;
    /// This family's connection table (`conntable`): its entries and its buckets.
    fn entries() -> &'static Array<FlowEntry<Self>>;
    fn buckets() -> &'static Array<FlowBucket>;
    fn spilled() -> &'static Array<u64>;
    /// `conntable`'s global functions for this family: the slot of a key, an insert.
    fn find(key: &Self) -> u64;
    fn insert_entry<const RECYCLE: bool>(key: &Self, flow: &Flow, now: u32, pooled: bool) -> u64;
    /// This family's rings of recently created connections.
    fn recent() -> &'static PerCpuArray<Self>;
    /// The destination (service) port, network byte order.
    fn service_port(&self) -> u16;
    /// The destination (VIP) address, IPv4 in word 0.
    fn service_addr(&self) -> [u32; 4];
    /// A key from addresses (IPv4 in word 0) and ports as on the wire.
    fn from_parts(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> Self;
    /// The source (client) address, IPv4 in word 0, and port, network byte order.
    fn client_addr(&self) -> [u32; 4];
    fn client_port(&self) -> u16;
    fn protocol(&self) -> u8;
}

impl FlowKey for FlowKeyV4 {
    const FAMILY: u8 = FAMILY_V4;
    const INDEX: usize = 0;
    #[inline(always)]
    fn from_pkt(pkt: &Pkt) -> Self {
        FlowKeyV4::new(pkt.src[0], pkt.dst[0], pkt.sport, pkt.dport, pkt.proto)
    }
    #[inline(always)]
    fn entries() -> &'static Array<FlowEntry<Self>> {
        &FLOWS_V4
    }
    #[inline(always)]
    fn buckets() -> &'static Array<FlowBucket> {
        &FLOW_BUCKETS_V4
    }
    #[inline(always)]
    fn spilled() -> &'static Array<u64> {
        &FLOW_SPILLED_V4
    }
    #[inline(always)]
    fn find(key: &Self) -> u64 {
        conntable::xlb_find_v4(key)
    }
    #[inline(always)]
    fn insert_entry<const RECYCLE: bool>(key: &Self, flow: &Flow, now: u32, pooled: bool) -> u64 {
        if RECYCLE {
            conntable::xlb_admit_v4(key, flow, now, pooled as u32)
        } else {
            conntable::xlb_insert_v4(key, flow, now, pooled as u32)
        }
    }
    #[inline(always)]
    fn recent() -> &'static PerCpuArray<Self> {
        &RECENT_V4
    }
    #[inline(always)]
    fn service_port(&self) -> u16 {
        self.dport
    }
    #[inline(always)]
    fn from_parts(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        FlowKeyV4::new(src[0], dst[0], sport, dport, proto)
    }
    #[inline(always)]
    fn service_addr(&self) -> [u32; 4] {
        [self.dst, 0, 0, 0]
    }
    #[inline(always)]
    fn client_addr(&self) -> [u32; 4] {
        [self.src, 0, 0, 0]
    }
    #[inline(always)]
    fn client_port(&self) -> u16 {
        self.sport
    }
    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.proto
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
    fn entries() -> &'static Array<FlowEntry<Self>> {
        &FLOWS_V6
    }
    #[inline(always)]
    fn buckets() -> &'static Array<FlowBucket> {
        &FLOW_BUCKETS_V6
    }
    #[inline(always)]
    fn spilled() -> &'static Array<u64> {
        &FLOW_SPILLED_V6
    }
    #[inline(always)]
    fn find(key: &Self) -> u64 {
        conntable::xlb_find_v6(key)
    }
    #[inline(always)]
    fn insert_entry<const RECYCLE: bool>(key: &Self, flow: &Flow, now: u32, pooled: bool) -> u64 {
        if RECYCLE {
            conntable::xlb_admit_v6(key, flow, now, pooled as u32)
        } else {
            conntable::xlb_insert_v6(key, flow, now, pooled as u32)
        }
    }
    #[inline(always)]
    fn recent() -> &'static PerCpuArray<Self> {
        &RECENT_V6
    }
    #[inline(always)]
    fn service_port(&self) -> u16 {
        self.dport
    }
    #[inline(always)]
    fn from_parts(src: &[u32; 4], dst: &[u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        FlowKeyV6::new(*src, *dst, sport, dport, proto)
    }
    #[inline(always)]
    fn service_addr(&self) -> [u32; 4] {
        self.dst
    }
    #[inline(always)]
    fn client_addr(&self) -> [u32; 4] {
        self.src
    }
    #[inline(always)]
    fn client_port(&self) -> u16 {
        self.sport
    }
    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.proto
    }
}

/// `established`'s "not mine" answers (never reason counters): a SYN goes to the SYN program.
/// A plain `Result` rather than an enum around one: LLVM packs such an enum's tag into the
/// pointer's register, which the verifier rejects.
pub const TO_SYN: u32 = u32::MAX;
/// ... a flow without a usable entry (looked up already) to the new-flow program.
pub const TO_NEW_FLOW_NO_ENTRY: u32 = u32::MAX - 1;

/// The main program's part: an established flow's packet follows its entry. Everything else
/// (a SYN, a flow without a live entry) goes to the new-flow program (`TO_NEW_FLOW*`).
#[inline(always)]
pub fn established(pkt: &Pkt, now: u32) -> Result<Target, u32> {
    if pkt.family == FAMILY_V4 {
        established_in::<FlowKeyV4>(pkt, now)
    } else {
        established_in::<FlowKeyV6>(pkt, now)
    }
}

#[inline(always)]
fn established_in<K: FlowKey>(pkt: &Pkt, now: u32) -> Result<Target, u32> {
    let class = Class::of(pkt);
    // A SYN almost always opens a connection: the new-flow program inserts it directly.
    if class.plain_syn {
        return Err(TO_SYN);
    }
    match on_entry(&K::from_pkt(pkt), pkt, now, &class) {
        Some(r) => r,
        None => Err(TO_NEW_FLOW_NO_ENTRY),
    }
}

/// The new-flow program's part, for one family: a packet that may open a connection, or one
/// without a live entry. `no_entry`: the main program found no usable entry; `recycle`: a full
/// table may recycle an entry (false when the SYN program just tried).
#[inline(always)]
pub fn new_flow<K: FlowKey>(
    pkt: &Pkt,
    now: u32,
    no_entry: bool,
    recycle: bool,
) -> Result<Target, u32> {
    let key = K::from_pkt(pkt);
    let class = Class::of(pkt);
    if !no_entry && let Some(r) = on_entry(&key, pkt, now, &class) {
        return r;
    }
    let svc = service::lookup(pkt).ok_or(reason::PASS_NO_SERVICE)?;
    schedule(&key, pkt, svc, now, class.may_create, recycle)
}

/// What the TCP flags (or UDP) allow a packet to do.
struct Class {
    is_tcp: bool,
    /// IPVS creates connections from UDP datagrams and from TCP SYNs without RST.
    may_create: bool,
    /// SYN alone (not SYN-ACK, RST or FIN).
    plain_syn: bool,
}

impl Class {
    #[inline(always)]
    fn of(pkt: &Pkt) -> Self {
        let is_tcp = pkt.proto == PROTO_TCP;
        let f = pkt.tcp_flags;
        Class {
            is_tcp,
            may_create: !is_tcp || (f & tcp::flags::SYN != 0 && f & tcp::flags::RST == 0),
            plain_syn: is_tcp
                && f & (tcp::flags::SYN | tcp::flags::ACK | tcp::flags::RST | tcp::flags::FIN)
                    == tcp::flags::SYN,
        }
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

/// The packet's connection-table entry decides: `Some` when it does (an established flow, or
/// a drop), `None` when the flow has no usable entry - none, or one that ended here (counted
/// as rescheduled when the packet may open a connection) - and needs the scheduler.
#[inline(always)]
fn on_entry<K: FlowKey>(
    key: &K,
    pkt: &Pkt,
    now: u32,
    class: &Class,
) -> Option<Result<Target, u32>> {
    let is_tcp = class.is_tcp;
    let may_create = class.may_create;
    let plain_syn = class.plain_syn;
    let f = pkt.tcp_flags;
    let entry = conntable::get(key)?.flow();
    let status_ptr = unsafe { &raw mut (*entry).status };
    // One read: every decision below is about this status, and the swap that applies a
    // change fails if another CPU (or the reaper) changed it meanwhile.
    let status = unsafe { core::ptr::read_volatile(status_ptr) };
    let st = status as u8;
    let flow = unsafe { &mut *entry };
    let expired = status & FLOW_DEAD != 0 || now.wrapping_sub(flow.last_seen) > timeout(st);
    let Some(slot) = BACKENDS.get(flow.backend) else {
        return Some(Err(reason::DROP_INTERNAL));
    };
    let backend = slot.current();
    // The generation names the real server; the service it belongs to now is the
    // backend entry's (a server revived from the trash after its service was re-created
    // keeps its flows, as in IPVS).
    let alive = backend.flags & BACKEND_F_AVAILABLE != 0 && backend.generation == flow.generation;
    // A fresh SYN on a closed connection's tuple starts a new connection (IPVS
    // conn_reuse_mode 1).
    let reused = plain_syn && (st == state::TIME_WAIT || st == state::CLOSE);
    if !expired && alive && !reused {
        if pkt.ttl <= 1 {
            return Some(Err(reason::PASS_TTL_EXPIRED));
        }
        let next = if is_tcp {
            // NAT connections see both directions: IPVS's INPUT table for client packets
            // (replies drive the OUTPUT table, see `nat`).
            let dir = if backend.forward == lb_common::forward::NAT {
                Direction::Input
            } else {
                Direction::InputOnly
            };
            tcp::next_state(dir, st, f)
        } else {
            state::UDP
        };
        // Write only on change: most packets leave the entry (and its cache line) clean.
        // Losing the swap means someone else changed the state first; theirs stands.
        if next != st && acct::cas(status_ptr, status, next as u32) {
            changed(key, flow.backend, st, next);
            sync::conn(key, flow, next);
        }
        if flow.last_seen != now {
            flow.last_seen = now;
        }
        return Some(Ok(Target {
            index: flow.backend,
            service_id: backend.service_id,
            new_conn: false,
        }));
    }
    if !expired && !alive && !reused {
        // The real server was removed: IPVS (expire_nodest_conn=0) drops the packets of
        // its connections, a SYN on the same tuple included, until the entry expires.
        if !expire_nodest() {
            return Some(Err(reason::DROP_BACKEND_GONE));
        }
        // expire_nodest_conn=1: the connection ends here; a packet that may open one is
        // scheduled afresh (below), any other is dropped.
        if !may_create {
            end_entry(key, status_ptr, status, flow, now);
            return Some(Err(reason::DROP_BACKEND_GONE));
        }
    } else if !may_create {
        // An expired or closed entry, and a packet that cannot open a connection: it
        // keeps its entry (the reaper retires it) and is handled as one without.
        return None;
    }
    // The old connection ends here (unless the reaper got to it first, in which case it
    // deletes the entry): its count goes, its entry returns to the pool. One call site
    // for the scheduling keeps the program small for the verifier.
    end_entry(key, status_ptr, status, flow, now);
    stats::count(reason::EV_FLOW_RESCHEDULED);
    None
}

/// A new connection's entry is in the table at `slot`: it is counted, then put into service
/// (not before: see `conntable::activate`), and entered in this CPU's ring of candidates for
/// recycling.
#[inline(always)]
pub fn admitted<K: FlowKey>(key: &K, slot: u32, backend: u32, st: u8, now: u32) {
    acct::created(backend, st);
    conntable::activate::<K>(slot, st as u32, now);
    admit::record(key);
}

/// A connection went from state `st` to `next` (this caller won the swap): its count
/// follows, and its way's established hint; a closing one may now give its entry to a new
/// connection if the table fills.
#[inline(always)]
pub fn changed<K: FlowKey>(key: &K, backend: u32, st: u8, next: u8) {
    acct::moved(backend, st, next);
    if (st == state::ESTABLISHED) != (next == state::ESTABLISHED) {
        conntable::mark(key, next == state::ESTABLISHED);
    }
    if tcp::is_active(st) && !tcp::is_active(next) {
        admit::record(key);
    }
}

/// What a connection retired by this caller leaves behind: its persistence template's count
/// and its NAT reply entry let go of it (every retirer: a packet, the reaper, recycling).
#[inline(always)]
pub fn let_go<K: FlowKey>(key: &K, flow: &Flow, now: u32) {
    persist::retired(key, flow, now);
    nat::forget(key, flow);
}

/// Retires a connection-table entry whose connection ended, unless someone else did first
/// (then false).
#[inline(always)]
pub fn end_entry<K: FlowKey>(
    key: &K,
    status_ptr: *mut u32,
    status: u32,
    flow: &Flow,
    now: u32,
) -> bool {
    if !acct::retire(status_ptr, status, flow.backend) {
        return false;
    }
    let_go(key, flow, now);
    conntable::clear(key);
    acct::release_entry(K::FAMILY);
    true
}

/// The SYN program's part, the SYN of a new connection: insert the flow directly (one
/// pass over the key's bucket instead of a lookup and then an insert); the pick is claimed only if the
/// insert shows the flow is new. `Err` (the `HANDOFF` word for the new-flow program) when the
/// flow exists already, or when anything stands in the way (no service, no usable server,
/// expiring TTL, a table full of connections that cannot be recycled, persistence): the
/// new-flow program then looks at the connection table first and decides, so a retransmitted
/// SYN of an existing connection always follows it.
#[inline(always)]
pub fn syn<K: FlowKey>(pkt: &Pkt, now: u32) -> Result<Target, u32> {
    let key = &K::from_pkt(pkt);
    let svc = service::lookup(pkt).ok_or(0u32)?;
    if pkt.ttl <= 1 {
        return Err(0);
    }
    if svc.flags & F_STATELESS != 0 {
        // No entry to insert: the hash is the connection table.
        let (index, _) = sched::pick(svc, pkt).map_err(|_| 0u32)?;
        return Ok(Target {
            index,
            service_id: svc.id,
            new_conn: true,
        });
    }
    if svc.persist_timeout != 0 {
        // Templates come first: the regular path, which looks at the table first, so a
        // retransmitted SYN touches no template. (lblc/lblcr peek without learning; `confirm`
        // teaches their cache once the insert shows the flow is new.)
        return Err(0);
    }
    let t = sched::peek(svc, pkt).map_err(|_| 0u32)?;
    if t.backend.forward == lb_common::forward::NAT {
        // NAT checks its reply tuple first: the regular path.
        return Err(0);
    }
    // A plain SYN in state NONE: the input-only table's answer, without the lookup.
    let initial = state::SYN_RECV;
    let flow = Flow::new(t.index, t.backend.generation, svc.id, now, initial);
    // The insert looks for the key first (a retransmitted SYN follows its connection); a
    // full table recycles the oldest embryonic or closing connection of the key's bucket,
    // or failing that of this CPU's ring, here rather than after a detour through the
    // new-flow program.
    let pooled = acct::take_entry(K::FAMILY);
    let mut result = conntable::insert::<K, true>(key, &flow, now, pooled);
    let mut holds = pooled;
    if result == conntable::FULL && !pooled {
        if !admit::recycle_for::<K>(now) {
            return Err(lb_common::HANDOFF_TABLE_FULL);
        }
        holds = true;
        result = conntable::insert::<K, true>(key, &flow, now, true);
    }
    // A plain number, not an `Option`: LLVM spills an `Option`'s undefined payload from
    // whatever register, which the verifier refuses to read.
    let recorded = conntable::inserted(result).is_some();
    if !recorded {
        if holds {
            acct::untake_entry(K::FAMILY);
        }
        if result == conntable::EXISTS {
            return Err(0);
        }
        stats::count(reason::EV_FLOW_INSERT_FAILED);
    }
    let (index, backend) = match sched::confirm(svc, &t) {
        Ok(None) => (t.index, t.backend),
        Ok(Some((index, backend))) => {
            // Lost the race for that pick: record the one this flow owns. The entry is
            // not in service before `activate` below (nobody else changes it), and it is
            // counted only below, so rewriting it in place is safe.
            if recorded && let Some(e) = conntable::flow_at::<K>(result as u32) {
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
        admitted(key, result as u32, index, initial, now);
        nat::record(key, pkt, index, backend);
    }
    Ok(Target {
        index,
        service_id: svc.id,
        new_conn: true,
    })
}

/// A new connection: pick a real server and record the flow. Or (`create` false) a packet
/// that cannot open a connection and has none (IPVS hands it to the local stack): for sh, dh
/// and mh the hash names the server the connection was on (unless the table of servers
/// changed), so the packet goes there - connections survive a full table, a restart of the
/// balancer or a failover to another one. One function for both, so the program holds one
/// copy of the schedulers.
#[inline(always)]
fn schedule<K: FlowKey>(
    key: &K,
    pkt: &Pkt,
    svc: &Service,
    now: u32,
    create: bool,
    recycle: bool,
) -> Result<Target, u32> {
    if !create && !sched::deterministic(svc) {
        return Err(reason::PASS_TCP_NO_FLOW);
    }
    if pkt.ttl <= 1 {
        return Err(reason::PASS_TTL_EXPIRED);
    }
    // Before the pick, so a refused connection does not advance the scheduler.
    let tracked = create
        && svc.flags & F_STATELESS == 0
        && (if recycle {
            admit::take::<K>(now)
        } else {
            acct::take_entry(K::FAMILY)
        });
    if !tracked && !sched::deterministic(svc) {
        return Err(reason::DROP_FLOW_TABLE_FULL);
    }
    // Persistence: a live template of the client's network decides; otherwise the
    // scheduler does, and a template records its choice. Only the index is carried on (one
    // state for the verifier whichever way it was found); the server is read once, after.
    let persistent = svc.persist_timeout != 0;
    let templated = if persistent {
        persist::lookup(key, svc, now, tracked)
    } else {
        u64::MAX
    };
    let index = if templated != u64::MAX {
        templated as u32
    } else {
        match sched::pick_only(svc, pkt) {
            Ok(index) => index,
            Err(why) => {
                if tracked {
                    acct::untake_entry(K::FAMILY);
                }
                return Err(why);
            }
        }
    };
    let Some(slot) = BACKENDS.get(index) else {
        if tracked {
            acct::untake_entry(K::FAMILY);
            if templated != u64::MAX {
                persist::uncontrol(key, svc, now);
            }
        }
        return Err(reason::DROP_INTERNAL);
    };
    let backend = slot.current();
    if backend.forward == lb_common::forward::NAT
        && (!tracked || !nat::reply_tuple_free(key, pkt, backend))
    {
        // A NAT connection needs its reply entry, or its replies would leave with the real
        // server's address: not forwarded without one.
        if tracked {
            acct::untake_entry(K::FAMILY);
            if templated != u64::MAX {
                persist::uncontrol(key, svc, now);
            }
            return Err(reason::DROP_NAT_TUPLE_TAKEN);
        }
        return Err(if create {
            reason::DROP_FLOW_TABLE_FULL
        } else {
            reason::PASS_TCP_NO_FLOW
        });
    }
    if persistent && create && templated == u64::MAX {
        persist::create(key, svc, now, index, backend.generation, tracked);
        sync::template(key, svc, index, backend.generation);
    }
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
        let template = if persistent { persist::marker(svc) } else { 0 };
        let flow = Flow::controlled(index, backend.generation, svc.id, now, initial, template);
        if let Some(slot) =
            conntable::inserted(conntable::insert::<K, false>(key, &flow, now, true))
        {
            admitted(key, slot, index, initial, now);
            nat::record(key, pkt, index, backend);
            sync::conn(key, &flow, initial);
        } else {
            // Another CPU recorded this tuple meanwhile (or the table refused): this packet
            // still goes to the server picked for it.
            acct::untake_entry(K::FAMILY);
            if persistent {
                persist::uncontrol(key, svc, now);
            }
            stats::count(reason::EV_FLOW_INSERT_FAILED);
        }
    }
    Ok(Target {
        index,
        service_id: svc.id,
        new_conn: create,
    })
}
