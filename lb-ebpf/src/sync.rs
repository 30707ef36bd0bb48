//! Connection synchronisation (IPVS's sync daemon), the data plane's two halves.
//!
//! Master: with `GLOBAL_F_SYNC_EVENTS` set, a connection is reported in `SYNC_EVENTS` when it
//! is created or changes state into a state worth synchronising (`lb_common::sync::worthy`:
//! UDP, and TCP once established; embryonic connections are not, as in IPVS), and a
//! persistence template when it is made (before the connection it controls). The check sits
//! on the paths that change an entry, never on an established packet that changes nothing.
//!
//! Backup: `xlb_sync_install` (run by the controller with `BPF_PROG_TEST_RUN`) installs a
//! batch of records the controller resolved to this balancer's servers, with the same
//! accounting the packet path does: an entry from the pool, the count of its state, the
//! recycling ring, the NAT reply entry, its template's count of controlled connections.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_loop, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, FAMILY_V4, FAMILY_V6, FLOW_DEAD, Flow, FlowKeyV4, FlowKeyV6,
    GLOBAL_F_SYNC_EVENTS, PROTO_TCP, PROTO_UDP, Service, SyncBatch, SyncConn, persist, reason,
    sync,
    tcp::{self, state},
};

use crate::{
    acct,
    flow::{self, FlowKey},
    maps::{BACKENDS, GLOBALS, SYNC_BATCH, SYNC_EVENTS},
    nat, stats,
};

/// Whether this balancer reports connections for synchronisation.
#[inline(always)]
fn enabled() -> bool {
    GLOBALS
        .get(0)
        .is_some_and(|g| g.flags & GLOBAL_F_SYNC_EVENTS != 0)
}

/// Connection `key` (entry `flow`) is now in state `st`: reported if worth it. The checks
/// are inline; the report is a function of its own, so its frame does not add to the
/// caller's (the new-flow programs are close to the verifier's 512 bytes of stack).
#[inline(always)]
pub fn conn<K: FlowKey>(key: &K, flow: &Flow, st: u8) {
    if sync::worthy(st) && enabled() {
        report_conn(key, flow, st);
    }
}

#[inline(never)]
fn report_conn<K: FlowKey>(key: &K, flow: &Flow, st: u8) {
    report(
        u32::from_ne_bytes([sync::CONN, K::FAMILY, key.protocol(), st]),
        &key.client_addr(),
        &key.service_addr(),
        ports(key.client_port(), key.service_port()),
        [
            flow.backend,
            flow.generation,
            flow.service_id,
            flow.template,
            0,
        ],
    );
}

/// A template was made for `key`'s client network under `svc`, pointing at backend `index`.
#[inline(always)]
pub fn template<K: FlowKey>(key: &K, svc: &Service, index: u32, generation: u32) {
    if enabled() {
        report_template(key, svc, index, generation);
    }
}

#[inline(never)]
fn report_template<K: FlowKey>(key: &K, svc: &Service, index: u32, generation: u32) {
    let prefix = svc.persist_prefix as u32;
    let src = key.client_addr();
    let net = [
        src[0] & persist::mask_word(prefix, 0),
        src[1] & persist::mask_word(prefix, 1),
        src[2] & persist::mask_word(prefix, 2),
        src[3] & persist::mask_word(prefix, 3),
    ];
    report(
        u32::from_ne_bytes([sync::TEMPLATE, K::FAMILY, key.protocol(), 0]),
        &net,
        &key.service_addr(),
        ports(0, key.service_port()),
        [
            index,
            generation,
            svc.id,
            crate::persist::marker(svc),
            svc.persist_timeout,
        ],
    );
}

#[inline(always)]
fn ports(sport: u16, dport: u16) -> u32 {
    let [a0, a1] = sport.to_ne_bytes();
    let [b0, b1] = dport.to_ne_bytes();
    u32::from_ne_bytes([a0, a1, b0, b1])
}

/// Writes one `SyncConn` into the ring, word by word (a struct copy would become `memcpy`):
/// the kind/family/protocol/state word, addresses, ports, then backend, generation, service
/// id, template and timeout.
#[inline(always)]
fn report(head: u32, src: &[u32; 4], dst: &[u32; 4], ports: u32, tail: [u32; 5]) {
    let Some(mut entry) = SYNC_EVENTS.reserve::<SyncConn>(0) else {
        stats::count(reason::EV_SYNC_DROPPED);
        return;
    };
    let w = entry.as_mut_ptr() as *mut u32;
    unsafe {
        core::ptr::write_volatile(w, head);
        for i in 0..4 {
            core::ptr::write_volatile(w.add(1 + i), src[i]);
            core::ptr::write_volatile(w.add(5 + i), dst[i]);
        }
        core::ptr::write_volatile(w.add(9), ports);
        for (i, v) in tail.iter().enumerate() {
            core::ptr::write_volatile(w.add(10 + i), *v);
        }
        core::ptr::write_volatile(w.add(15), 0);
    }
    entry.submit(0);
}

/// What a `bpf_loop` step needs: the batch (this CPU's copy) and the time.
#[repr(C)]
struct Walk {
    batch: *mut SyncBatch,
    now: u32,
    _pad: u32,
}

/// `xlb_sync_install`: installs the records of the `SyncBatch` frame and writes each one's
/// `result` back into it.
#[inline(always)]
pub fn install(ctx: &XdpContext, now: u32) -> u32 {
    let Some(batch) = SYNC_BATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let size = core::mem::size_of::<SyncBatch>() as u32;
    if unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, batch as *mut c_void, size) } != 0 {
        return xdp_action::XDP_DROP;
    }
    let count = unsafe { (*batch).count }.min(sync::BATCH as u32);
    let mut walk = Walk {
        batch,
        now,
        _pad: 0,
    };
    unsafe { bpf_loop(count, step as *mut c_void, &raw mut walk as *mut c_void, 0) };
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, batch as *mut c_void, size) } != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// One record.
#[inline(never)]
extern "C" fn step(i: u64, ctx: *mut c_void) -> i64 {
    let walk = unsafe { &*(ctx as *const Walk) };
    let r = unsafe { &mut (*walk.batch).records[i as usize & (sync::BATCH - 1)] };
    r.result = if r.family == FAMILY_V4 {
        one::<FlowKeyV4>(r, walk.now)
    } else if r.family == FAMILY_V6 {
        one::<FlowKeyV6>(r, walk.now)
    } else {
        sync::R_INVALID
    };
    0
}

/// The service as far as templates need it: id, persistence timeout and prefix.
#[inline(always)]
fn service_of(r: &SyncConn) -> Service {
    let w: [u32; 6] = [
        r.service_id,
        0,
        0,
        0,
        r.timeout,
        u32::from_ne_bytes([0, 0, r.template.wrapping_sub(1) as u8, 0]),
    ];
    // SAFETY: six plain u32 words, the layout of `Service`.
    unsafe { core::mem::transmute(w) }
}

#[inline(always)]
fn one<K: FlowKey>(r: &SyncConn, now: u32) -> u32 {
    if r.proto != PROTO_TCP && r.proto != PROTO_UDP {
        return sync::R_INVALID;
    }
    let Some(slot) = BACKENDS.get(r.backend) else {
        return sync::R_NO_SERVER;
    };
    let be = slot.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.generation != r.generation {
        return sync::R_NO_SERVER;
    }
    let key = K::from_parts(&r.src, &r.dst, r.sport, r.dport, r.proto);
    let svc = service_of(r);
    if r.kind == sync::TEMPLATE {
        if r.template == 0 {
            return sync::R_INVALID;
        }
        // Replaces a template of the network in place (its count of controlled connections
        // stays), or makes one that controls nothing yet.
        crate::persist::create(&key, &svc, now, r.backend, r.generation, false);
        return sync::R_TEMPLATE;
    }
    let valid = r.kind == sync::CONN
        && if r.proto == PROTO_TCP {
            r.state <= state::SYNACK
        } else {
            r.state == state::UDP
        };
    if !valid {
        return sync::R_INVALID;
    }
    install_conn(&key, r, be, &svc, now)
}

#[inline(always)]
fn install_conn<K: FlowKey>(key: &K, r: &SyncConn, be: &Backend, svc: &Service, now: u32) -> u32 {
    let mut result = sync::R_INSTALLED;
    if let Some(entry) = crate::conntable::get(key).map(|f| f.flow()) {
        let status_ptr = unsafe { &raw mut (*entry).status };
        let status = unsafe { core::ptr::read_volatile(status_ptr) };
        if status & FLOW_DEAD != 0 {
            return sync::R_BUSY;
        }
        let flow = unsafe { &mut *entry };
        let st = status as u8;
        if flow.backend == r.backend && flow.generation == r.generation {
            // The same connection: it takes the master's state (the count follows).
            if r.state != st {
                if !acct::cas(status_ptr, status, r.state as u32) {
                    return sync::R_BUSY;
                }
                flow::changed(key, flow.backend, st, r.state);
            }
            if flow.last_seen != now {
                flow.last_seen = now;
            }
            return sync::R_REFRESHED;
        }
        if !tcp::is_active(r.state) {
            // IPVS keeps a connection on another server when the master's is inactive.
            return sync::R_KEPT;
        }
        // Another server: this entry's connection ends here, as a reused tuple's does.
        if !flow::end_entry(key, status_ptr, status, flow, now) {
            return sync::R_BUSY;
        }
        result = sync::R_REPLACED;
    }
    let vip = key.service_addr();
    let vport = key.service_port();
    if !nat::reply_tuple_free_for(key, &vip, vport, be) {
        return sync::R_NAT_TUPLE_TAKEN;
    }
    if !acct::take_entry(K::FAMILY) {
        stats::count(reason::EV_SYNC_REFUSED);
        return sync::R_TABLE_FULL;
    }
    if r.template != 0 && crate::persist::lookup(key, svc, now, true) == u64::MAX {
        crate::persist::create(key, svc, now, r.backend, r.generation, true);
    }
    let flow = Flow::controlled(
        r.backend,
        r.generation,
        r.service_id,
        now,
        r.state,
        r.template,
    );
    let Some(slot) =
        crate::conntable::inserted(crate::conntable::insert::<K, false>(key, &flow, now, true))
    else {
        acct::untake_entry(K::FAMILY);
        if r.template != 0 {
            crate::persist::uncontrol(key, svc, now);
        }
        return sync::R_BUSY;
    };
    flow::admitted(key, slot, r.backend, r.state, now);
    nat::record_for(key, &vip, vport, r.backend, be);
    result
}
