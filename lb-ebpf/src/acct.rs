//! Connection accounting: the ActiveConn/InActConn counts of every real server, which the
//! least-connection schedulers read and `ipvsadm -L` shows, and the admission of entries into
//! the connection table.
//!
//! Counts are exact because every change of a flow entry's state is a compare-and-swap on
//! `Flow::status`: whoever wins the swap applies the matching count change, exactly once
//! (creation: +1; a change between active and inactive states: one of each; retirement: −1).
//! Entries are retired by the reaper (idle past their timeout) or by a packet reusing an
//! expired tuple, or recycled by a new connection when the table is full (`admit`,
//! `conntable`). Nothing else removes an entry: the table is xlb's own (not an LRU, which
//! would evict behind our back and lose a decrement), entries handed out from the pool.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use lb_common::{FAMILY_V4, FLOW_DEAD, FLOW_POOL_BATCH, tcp};

use crate::maps::{BACKEND_CONNS, BACKENDS, FLOW_POOL, FLOW_QUOTA, GROUPS, SCHED_STATE};

#[inline(always)]
fn add(p: *mut u64, v: u64) {
    // Relaxed: the result is not used, so LLVM's plain XADD is what we want here.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Adds `delta` (+1 or −1) to the count of `state` (active or inactive) of `backend`.
#[inline(always)]
fn count(backend: u32, state: u8, delta: u64) {
    if let Some(c) = BACKEND_CONNS.get_ptr_mut(backend) {
        let p = if tcp::is_active(state) {
            unsafe { &raw mut (*c).active }
        } else {
            unsafe { &raw mut (*c).inactive }
        };
        add(p, delta);
    }
}

/// The overload flag of `backend` (of service `service_id`) changed: its scan group and the
/// service's cached twos total are stale.
#[inline(always)]
fn flipped(backend: u32, service_id: u32) {
    touch_group(backend);
    if let Some(st) = SCHED_STATE.get_ptr_mut(service_id) {
        add(unsafe { &raw mut (*st).overload_flips }, 1);
    }
}

/// Marks the scan group of `backend` dirty (after its count changed; see
/// `lb_common::group`). Written only when clean: most changes find it dirty already.
#[inline(always)]
fn touch_group(backend: u32) {
    let Some(g) = BACKENDS
        .get(backend)
        .and_then(|s| s.current().group_index())
    else {
        return;
    };
    if let Some(st) = GROUPS.get_ptr_mut(g) {
        unsafe {
            if core::ptr::read_volatile(&raw const (*st).dirty) == 0 {
                core::ptr::write_volatile(&raw mut (*st).dirty, 1);
            }
        }
    }
}

/// A connection in `state` was created on `backend`.
#[inline(always)]
pub fn created(backend: u32, state: u8) {
    count(backend, state, 1);
    touch_group(backend);
    update_overload(backend);
}

/// A connection of `backend` went from `old` to `new`.
#[inline(always)]
pub fn moved(backend: u32, old: u8, new: u8) {
    if tcp::is_active(old) != tcp::is_active(new) {
        count(backend, old, u64::MAX);
        count(backend, new, 1);
        touch_group(backend);
    }
}

/// A connection of `backend` in `state` is gone.
#[inline(always)]
pub fn gone(backend: u32, state: u8) {
    count(backend, state, u64::MAX);
    touch_group(backend);
    update_overload(backend);
}

/// Sets or clears the server's overload flag from its thresholds and connection count, as
/// IPVS does when it binds and unbinds connections.
#[inline(always)]
fn update_overload(backend: u32) {
    let (Some(c), Some(slot)) = (BACKEND_CONNS.get_ptr_mut(backend), BACKENDS.get(backend)) else {
        return;
    };
    let be = slot.current();
    if be.upper_threshold == 0 {
        // The common case: one load, no write.
        if unsafe { core::ptr::read_volatile(&raw const (*c).overloaded) } != 0 {
            unsafe { core::ptr::write_volatile(&raw mut (*c).overloaded, 0) };
            flipped(backend, be.service_id);
        }
        return;
    }
    unsafe {
        let total = core::ptr::read_volatile(&raw const (*c).active)
            .wrapping_add(core::ptr::read_volatile(&raw const (*c).inactive));
        let was = core::ptr::read_volatile(&raw const (*c).overloaded) != 0;
        let now = be.overloaded(total, was);
        if now != was {
            core::ptr::write_volatile(&raw mut (*c).overloaded, now as u64);
            flipped(backend, be.service_id);
        }
    }
}

/// Swaps a word (a flow's status, a template's count) from `old` to `new`; `true` if this
/// caller made the change.
#[inline(always)]
pub fn cas(word: *mut u32, old: u32, new: u32) -> bool {
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, old, new)
    }
    .1
}

/// Retires an entry whose status read `observed`: on success the caller owns the retirement
/// (the count is decremented here; the caller deletes the entry and returns it to the pool).
#[inline(always)]
pub fn retire(status: *mut u32, observed: u32, backend: u32) -> bool {
    if observed & FLOW_DEAD != 0 || !cas(status, observed, observed | FLOW_DEAD) {
        return false;
    }
    gone(backend, observed as u8);
    true
}

#[inline(always)]
fn pool_index(family: u8) -> usize {
    if family == FAMILY_V4 { 0 } else { 1 }
}

/// Takes one connection-table entry for `family`; `false` when the table is full.
#[inline(always)]
#[allow(clippy::manual_clamp)] // clamp's argument check brings a panic path into the program
pub fn take_entry(family: u8) -> bool {
    let i = pool_index(family);
    let Some(q) = FLOW_QUOTA.get_ptr_mut(0) else {
        return false;
    };
    let left = unsafe { &mut (*q).left[i] };
    if *left > 0 {
        *left -= 1;
        return true;
    }
    // Refill from the shared pool, a batch at a time (one contended atomic per batch).
    let Some(pool) = FLOW_POOL.get_ptr_mut(i as u32) else {
        return false;
    };
    let batch = unsafe { (*pool).batch }.min(FLOW_POOL_BATCH).max(1);
    let free = unsafe { &raw mut (*pool).free } as *mut u64;
    // A full table is read, not written: every new connection of a full table asks, and two
    // locked operations on the shared word would only confirm it (a stale read costs at most
    // one recycled entry that a concurrent release would have spared).
    if unsafe { core::ptr::read_volatile(free) } as i64 <= 0 {
        return false;
    }
    let before =
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(free, (-batch) as u64) }
            as i64;
    // Keep what was there (up to a batch) and give back the rest.
    let got = before.min(batch).max(0);
    if got < batch {
        add(free, (batch - got) as u64);
    }
    if got == 0 {
        return false;
    }
    *left = (got - 1) as u64;
    true
}

/// Puts an entry into this CPU's hand: one taken but not used (the insert found the key
/// present), or one a recycled connection freed for the connection that asked.
#[inline(always)]
pub fn untake_entry(family: u8) {
    if let Some(q) = FLOW_QUOTA.get_ptr_mut(0) {
        unsafe { (*q).left[pool_index(family)] += 1 };
    }
}

/// Returns the entry of a deleted flow to the shared pool.
#[inline(always)]
pub fn release_entry(family: u8) {
    if let Some(pool) = FLOW_POOL.get_ptr_mut(pool_index(family) as u32) {
        add(unsafe { &raw mut (*pool).free } as *mut u64, 1);
    }
}
