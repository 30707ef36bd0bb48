//! Admission of new connections into the connection table.
//!
//! The table never evicts on its own (see `acct`): a connection gets an entry from the pool,
//! and when the pool is empty it may take over the entry of a connection that is not
//! established - an embryonic one (a SYN flood's), a closing one, an idle UDP one - as
//! conntrack's early drop does. Established connections are never displaced.
//!
//! The first candidates are those of the new connection's own bucket of the table, oldest
//! first (`conntable::insert`, one cache line away). When none of them can go, the candidates
//! are found in a ring per CPU, oldest first: a connection enters its CPU's ring when it is
//! created and again when it starts closing. A candidate found established leaves the ring
//! (it comes back when it closes); a busy UDP one goes to the back.

use core::ffi::c_void;

use lb_common::{FLOW_DEAD, RECYCLE_SCAN, RECYCLE_TRIES, reason, tcp::state};

use crate::{
    Ref, acct,
    flow::FlowKey,
    maps::{FLOW_POOL, FLOW_QUOTA, RECYCLE_WALK},
    stats,
};

/// Takes an entry for a new connection, recycling one if the table is full; `false` if
/// there is none to be had.
#[inline(always)]
pub fn take<K: FlowKey>(now: u32) -> bool {
    acct::take_entry(K::FAMILY) || recycle_for::<K>(now)
}

/// Takes an entry by recycling one (the table is full); `false` if none could be.
#[inline(always)]
pub fn recycle_for<K: FlowKey>(now: u32) -> bool {
    recycle::<K>(now) != 0 && acct::take_entry(K::FAMILY)
}

/// Records a connection this CPU just created in its ring.
#[inline(always)]
pub fn record<K: FlowKey>(key: &K) {
    let i = K::INDEX;
    let Some(q) = FLOW_QUOTA.get_ptr_mut(0) else {
        return;
    };
    let Some(pool) = FLOW_POOL.get(i as u32) else {
        return;
    };
    let pos = unsafe { (*q).recent_next[i] };
    if let Some(slot) = K::recent().get_ptr_mut((pos & pool.recent_mask) as u32) {
        crate::conntable::copy_words(slot, key);
        unsafe { (*q).recent_next[i] = pos.wrapping_add(1) };
    }
}

/// Frees one entry by retiring the oldest recyclable connection in this CPU's ring; `true` if
/// an entry went into this CPU's hand. Looks at up to `RECYCLE_TRIES` live candidates that cannot
/// be recycled (established ones, busy UDP flows) and up to `RECYCLE_SCAN` ring slots in all:
/// slots of connections that already expired cost a lookup miss each, and after a mass expiry
/// there may be many of them before the next live candidate.
///
/// A function of its own answering with a plain number (1 freed, 0 not): the verifier walks
/// on from one state after it (see `sched::xlb_pick`).
#[inline(never)]
fn recycle<K: FlowKey>(now: u32) -> u64 {
    let i = K::INDEX;
    let Some(q) = FLOW_QUOTA.get_ptr_mut(0) else {
        return 0;
    };
    let Some(pool) = FLOW_POOL.get(i as u32) else {
        return 0;
    };
    let mask = pool.recent_mask;
    let next = unsafe { (*q).recent_next[i] };
    let mut pos = unsafe { (*q).recent_evict[i] };
    // Slots overwritten since the last look hold newer connections: start at the oldest kept.
    if next.wrapping_sub(pos) > mask + 1 {
        pos = next.wrapping_sub(mask + 1);
    }
    // The walk's state lives in a per-CPU map, the callback gets a pointer to it: the frames
    // from the program down to the callback must fit the verifier's 512 bytes of stack.
    let Some(walk) = RECYCLE_WALK.get_ptr_mut(0) else {
        return 0;
    };
    let walk = unsafe { &mut *walk };
    walk.now = now;
    walk.live_left = RECYCLE_TRIES;
    walk.pos = pos;
    walk.next = next;
    walk.mask = mask;
    walk.freed = 0;
    let mut ctx = Ref {
        p: walk as *mut Walk,
    };
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            RECYCLE_SCAN,
            step::<K> as *mut c_void,
            &raw mut ctx as *mut c_void,
            0,
        )
    };
    unsafe { (*q).recent_evict[i] = walk.pos };
    (walk.freed != 0) as u64
}

#[repr(C)]
pub struct Walk {
    now: u32,
    live_left: u32,
    pos: u64,
    next: u64,
    mask: u64,
    freed: u32,
    _pad: u32,
}

/// One ring slot; 1 stops the walk.
#[inline(never)]
extern "C" fn step<K: FlowKey>(_i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { Ref::<Walk>::state(ctx) };
    if w.pos == w.next || w.live_left == 0 {
        return 1;
    }
    let Some(slot) = K::recent().get_ptr((w.pos & w.mask) as u32) else {
        return 1;
    };
    w.pos = w.pos.wrapping_add(1);
    let key = unsafe { &*slot };
    let Some(found) = crate::conntable::get(key) else {
        return 0;
    };
    let entry = found.flow();
    let status_ptr = unsafe { &raw mut (*entry).status };
    let status = unsafe { core::ptr::read_volatile(status_ptr) };
    if status & FLOW_DEAD != 0 {
        return 0;
    }
    let st = status as u8;
    let idle = w.now.wrapping_sub(unsafe { (*entry).last_seen });
    if !lb_common::recyclable(st, idle) {
        w.live_left -= 1;
        if st == state::UDP {
            // Busy now, maybe idle later: back of the queue (the slot just read is free, so
            // the ring has room; this walk stops before it gets there).
            record(key);
        }
        return 0;
    }
    if acct::retire(status_ptr, status, unsafe { (*entry).backend }) {
        crate::flow::let_go(key, unsafe { &*entry }, w.now);
        crate::conntable::clear_slot::<K>(found.slot);
        // Straight to this CPU's hand, for the connection that asked (through the shared
        // pool it would cost two more locked operations).
        acct::untake_entry(K::FAMILY);
        stats::count(reason::EV_FLOW_RECYCLED);
        w.freed = 1;
        return 1;
    }
    0
}
