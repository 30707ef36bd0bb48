//! Admission of new connections into the connection table.
//!
//! The table never evicts on its own (see `acct`): a connection gets an entry from the pool,
//! and when the pool is empty it may take over the entry of a connection that is not
//! established - an embryonic one (a SYN flood's), a closing one, an idle UDP one - as
//! conntrack's early drop does. Established connections are never displaced.
//!
//! The candidates are found in a ring per CPU, oldest first: a connection enters its CPU's
//! ring when it is created and again when it starts closing. A candidate found established
//! leaves the ring (it comes back when it closes); a busy UDP one goes to the back.

use lb_common::{FLOW_DEAD, RECYCLE_TRIES, reason, tcp::state};

use crate::{
    acct,
    flow::FlowKey,
    maps::{FLOW_POOL, FLOW_QUOTA},
    stats,
};

/// Takes an entry for a new connection, recycling one if the table is full; `false` if
/// there is none to be had.
#[inline(always)]
pub fn take<K: FlowKey>(now: u32) -> bool {
    acct::take_entry(K::FAMILY) || (recycle::<K>(now) && acct::take_entry(K::FAMILY))
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
        copy_words(slot, key);
        unsafe { (*q).recent_next[i] = pos.wrapping_add(1) };
    }
}

/// Copies a key word by word (a struct copy would become a call to `memcpy`).
#[inline(always)]
fn copy_words<K>(dst: *mut K, src: &K) {
    let d = dst as *mut u32;
    let s = src as *const K as *const u32;
    for w in 0..core::mem::size_of::<K>() / 4 {
        unsafe { core::ptr::write_volatile(d.add(w), core::ptr::read_volatile(s.add(w))) };
    }
}

/// Frees one entry by retiring the oldest recyclable connection in this CPU's ring (looking
/// at up to `RECYCLE_TRIES` of them); `true` if an entry went back to the pool.
#[inline(always)]
fn recycle<K: FlowKey>(now: u32) -> bool {
    let i = K::INDEX;
    let Some(q) = FLOW_QUOTA.get_ptr_mut(0) else {
        return false;
    };
    let Some(pool) = FLOW_POOL.get(i as u32) else {
        return false;
    };
    let mask = pool.recent_mask;
    let next = unsafe { (*q).recent_next[i] };
    let mut pos = unsafe { (*q).recent_evict[i] };
    // Slots overwritten since the last look hold newer connections: start at the oldest kept.
    if next.wrapping_sub(pos) > mask + 1 {
        pos = next.wrapping_sub(mask + 1);
    }
    let mut freed = false;
    for _ in 0..RECYCLE_TRIES {
        if pos == next {
            break;
        }
        let Some(slot) = K::recent().get_ptr((pos & mask) as u32) else {
            break;
        };
        pos = pos.wrapping_add(1);
        let key = unsafe { &*slot };
        let Some(entry) = K::table().get_ptr_mut(key) else {
            continue;
        };
        let status_ptr = unsafe { &raw mut (*entry).status };
        let status = unsafe { core::ptr::read_volatile(status_ptr) };
        if status & FLOW_DEAD != 0 {
            continue;
        }
        let st = status as u8;
        let idle = now.wrapping_sub(unsafe { (*entry).last_seen });
        if !lb_common::recyclable(st, idle) {
            if st == state::UDP {
                // Busy now, maybe idle later: back of the queue (the slot just read is free,
                // so the ring has room; this walk stops before it gets there).
                record(key);
            }
            continue;
        }
        if acct::retire(status_ptr, status, unsafe { (*entry).backend }) {
            let _ = K::table().remove(key);
            acct::release_entry(K::FAMILY);
            stats::count(reason::EV_FLOW_RECYCLED);
            freed = true;
            break;
        }
    }
    unsafe { (*q).recent_evict[i] = pos };
    freed
}
