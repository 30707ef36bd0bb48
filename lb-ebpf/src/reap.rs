//! The reaper: retires connections idle past their state's timeout, so their counts leave
//! ActiveConn/InActConn and their entries return to the pool. IPVS arms a timer per
//! connection; here the controller runs this program (`BPF_PROG_TEST_RUN`, about once a
//! second), which walks both connection tables' buckets with `bpf_for_each_map_elem`.
//!
//! Retirement is the same compare-and-swap the packet path uses, so an entry is retired (and
//! its count decremented) exactly once, whoever gets there first.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_for_each_map_elem, bpf_map_delete_elem};
use lb_common::{
    FLOW_DEAD, FlowKeyV4, FlowKeyV6, Template,
    conntable::{FlowBucket, WAYS, way},
    reason,
};

use crate::{
    acct, conntable,
    flow::{self, FlowKey},
    maps::{FLOW_BUCKETS_V4, FLOW_BUCKETS_V6, TEMPLATES_V4, TEMPLATES_V6},
    stats,
};

#[repr(C)]
struct Walk {
    now: u32,
    _pad: u32,
}

/// `Flow::last_seen` of a dead entry one walk has seen (see `visit`).
const DEAD_MARK: u32 = u32::MAX;

/// Walks both tables.
#[inline(always)]
pub fn reap(now: u32) {
    let mut walk = Walk { now, _pad: 0 };
    // One callback per family: the verifier checks each against its own table's key.
    unsafe {
        bpf_for_each_map_elem(
            &raw const FLOW_BUCKETS_V4 as *mut c_void,
            visit::<FlowKeyV4> as *mut c_void,
            &raw mut walk as *mut c_void,
            0,
        );
    }
    unsafe {
        bpf_for_each_map_elem(
            &raw const FLOW_BUCKETS_V6 as *mut c_void,
            visit::<FlowKeyV6> as *mut c_void,
            &raw mut walk as *mut c_void,
            0,
        );
    }
    for templates in [
        &raw const TEMPLATES_V4 as *mut c_void,
        &raw const TEMPLATES_V6 as *mut c_void,
    ] {
        unsafe {
            bpf_for_each_map_elem(
                templates,
                visit_template as *mut c_void,
                &raw mut walk as *mut c_void,
                0,
            );
        }
    }
}

/// One bucket: retire the connections of its ways that expired. Always continues the walk
/// (returns 0).
#[inline(never)]
extern "C" fn visit<K: FlowKey>(
    _map: *mut c_void,
    index: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = unsafe { &mut *(ctx as *mut Walk) };
    let bucket = value as *const FlowBucket;
    let bucket_mut = value as *mut FlowBucket;
    let base = unsafe { *(index as *const u32) }.wrapping_mul(WAYS as u32);
    for w in 0..WAYS {
        let word = unsafe { core::ptr::read_volatile(&raw const (*bucket).ways[w]) };
        if word & way::TAG == 0 || word & way::CLAIMED != 0 {
            continue;
        }
        let slot = base + w as u32;
        let Some(e) = K::entries().get_ptr_mut(slot) else {
            continue;
        };
        let flow = unsafe { &raw mut (*e).flow };
        let status_ptr = unsafe { &raw mut (*flow).status };
        let status = unsafe { core::ptr::read_volatile(status_ptr) };
        if status & FLOW_DEAD != 0 {
            // Being retired (or, just inserted, not yet in service): whoever does it clears
            // or activates it within microseconds. One still dead a walk later was left
            // behind by a race (an entry reused under a packet that then retired it): marked
            // now, its way is freed by the next walk. (Activation writes `last_seen`, so a
            // mark never outlives an entry put into service.)
            let seen = unsafe { &raw mut (*flow).last_seen };
            if unsafe { core::ptr::read_volatile(seen) } != DEAD_MARK {
                unsafe { core::ptr::write_volatile(seen, DEAD_MARK) };
            } else if acct::cas(unsafe { &raw mut (*bucket_mut).ways[w] }, word, 0) {
                // Counted as it goes (per-CPU): a count carried in the walk's state would
                // make the verifier follow every combination of the bucket's ways.
                stats::count(reason::EV_FLOW_WAY_RECLAIMED);
            }
            continue;
        }
        let last_seen = unsafe { core::ptr::read_volatile(&raw const (*flow).last_seen) };
        if walk.now.wrapping_sub(last_seen) <= flow::timeout(status as u8) {
            continue;
        }
        if acct::retire(status_ptr, status, unsafe { (*flow).backend }) {
            let key = unsafe { &(*e).key };
            let flow = unsafe { &*flow };
            flow::let_go(key, flow, walk.now);
            conntable::clear_slot::<K>(slot);
            acct::release_entry(K::FAMILY);
            stats::count(reason::EV_FLOW_EXPIRED);
        }
    }
    0
}

/// One persistence template: delete it once it expired (no controlled connection left and
/// its timeout past).
#[inline(never)]
extern "C" fn visit_template(
    map: *mut c_void,
    key: *mut c_void,
    value: *mut c_void,
    ctx: *mut c_void,
) -> i64 {
    let walk = unsafe { &*(ctx as *const Walk) };
    let t = value as *mut Template;
    let controlled_ptr = unsafe { &raw mut (*t).controlled };
    let controlled = unsafe { core::ptr::read_volatile(controlled_ptr) };
    // Claimed by a compare-and-swap to `persist::DEAD` first: a packet that takes the
    // template at the same moment (its own swap from 0) wins or loses cleanly.
    if unsafe { (*t).expired(controlled, walk.now) } && crate::persist::kill(controlled_ptr) {
        unsafe { bpf_map_delete_elem(map, key) };
    }
    0
}
