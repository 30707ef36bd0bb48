//! Connection tracking: the flow table keeps every packet of a flow on the real server its first
//! packet was scheduled to, and follows the IPVS state machine (direct-routing "input only"
//! table) so idle timeouts are the IPVS ones.

use aya_ebpf::maps::LruHashMap;
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, FAMILY_V4, Flow, FlowKeyV4, FlowKeyV6, PROTO_TCP, Service,
    reason,
    tcp::{self, Direction, state},
};

use crate::{
    maps::{BACKENDS, FLOWS_V4, FLOWS_V6, GLOBALS},
    parse::Pkt,
    sched, stats,
};

/// The real server a packet goes to (a reference into `BACKENDS`, never a copy: large
/// by-value results make LLVM spill uninitialised bytes the verifier rejects).
pub struct Target {
    pub index: u32,
    pub backend: &'static Backend,
    /// The packet created the connection.
    pub new_conn: bool,
}

trait FlowKey: Sized + 'static {
    fn from_pkt(pkt: &Pkt) -> Self;
    fn table() -> &'static LruHashMap<Self, Flow>;
}

impl FlowKey for FlowKeyV4 {
    #[inline(always)]
    fn from_pkt(pkt: &Pkt) -> Self {
        FlowKeyV4 {
            src: pkt.src[0],
            dst: pkt.dst[0],
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Flow> {
        &FLOWS_V4
    }
}

impl FlowKey for FlowKeyV6 {
    #[inline(always)]
    fn from_pkt(pkt: &Pkt) -> Self {
        FlowKeyV6 {
            src: pkt.src,
            dst: pkt.dst,
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            _pad: [0; 3],
        }
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Flow> {
        &FLOWS_V6
    }
}

/// Finds or creates the flow of `pkt` for service `svc`; `Err` carries the reason counter.
#[inline(always)]
pub fn track(pkt: &Pkt, svc: &Service, now: u32) -> Result<Target, u32> {
    if pkt.family == FAMILY_V4 {
        track_in::<FlowKeyV4>(pkt, svc, now)
    } else {
        track_in::<FlowKeyV6>(pkt, svc, now)
    }
}

#[inline(always)]
fn timeout(st: u8) -> u32 {
    match GLOBALS.get(0) {
        Some(g) => g.timeouts.get(st as usize).copied().unwrap_or(0),
        None => 0,
    }
}

#[inline(always)]
fn track_in<K: FlowKey>(pkt: &Pkt, svc: &Service, now: u32) -> Result<Target, u32> {
    let key = K::from_pkt(pkt);
    let is_tcp = pkt.proto == PROTO_TCP;
    let f = pkt.tcp_flags;
    // IPVS creates connections from UDP datagrams and from TCP SYNs without RST.
    let may_create = !is_tcp || (f & tcp::flags::SYN != 0 && f & tcp::flags::RST == 0);

    if let Some(entry) = K::table().get_ptr_mut(&key) {
        let flow = unsafe { &mut *entry };
        let expired = now.wrapping_sub(flow.last_seen) > timeout(flow.state);
        let Some(slot) = BACKENDS.get(flow.backend) else {
            return Err(reason::DROP_INTERNAL);
        };
        let backend = slot.current();
        let alive = backend.flags & BACKEND_F_AVAILABLE != 0
            && backend.generation == flow.generation
            && backend.service_id == svc.id;
        // A fresh SYN on a closed connection's tuple starts a new connection (IPVS
        // conn_reuse_mode 1).
        let plain_syn = is_tcp
            && f & (tcp::flags::SYN | tcp::flags::ACK | tcp::flags::RST | tcp::flags::FIN)
                == tcp::flags::SYN;
        let reused = plain_syn && (flow.state == state::TIME_WAIT || flow.state == state::CLOSE);
        if !expired && alive && !reused {
            let next = if is_tcp {
                tcp::next_state(Direction::InputOnly, flow.state, f)
            } else {
                state::UDP
            };
            // Write only on change: most packets leave the entry (and its cache line) clean.
            if next != flow.state {
                flow.state = next;
            }
            if flow.last_seen != now {
                flow.last_seen = now;
            }
            return Ok(Target {
                index: flow.backend,
                backend,
                new_conn: false,
            });
        }
        if !may_create {
            return Err(if expired {
                reason::PASS_TCP_NO_FLOW
            } else {
                reason::DROP_BACKEND_GONE
            });
        }
        stats::count(reason::EV_FLOW_RESCHEDULED);
    } else if !may_create {
        return Err(reason::PASS_TCP_NO_FLOW);
    }

    let (index, backend) = sched::pick(svc)?;
    let flow = Flow {
        backend: index,
        generation: backend.generation,
        service_id: svc.id,
        last_seen: now,
        state: if is_tcp {
            tcp::next_state(Direction::InputOnly, state::NONE, f)
        } else {
            state::UDP
        },
        flags: 0,
        _pad: [0; 6],
    };
    if K::table().insert(&key, &flow, 0).is_err() {
        stats::count(reason::EV_FLOW_INSERT_FAILED);
    }
    Ok(Target {
        index,
        backend,
        new_conn: true,
    })
}
