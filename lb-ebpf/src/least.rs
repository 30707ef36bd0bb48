//! The least-connection family (lc, wlc, sed, nq, fo, ovf, twos): every new flow scans the
//! service's servers in IPVS list order and takes the best by the scheduler's rule
//! (`lb_common::sched::least`), reading each server's live connection counts; twos draws
//! two servers by weight and keeps the less loaded.
//!
//! The scan runs in `bpf_loop`, so the verifier checks one step instead of every iteration.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_loop};
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, Service, group, reason,
    sched::{
        self,
        least::{self, Load},
    },
};

use crate::{
    Ref,
    maps::{
        BACKEND_CONNS, BACKENDS, CONFIG_GEN, DRAW_SCRATCH, GROUP_SCAN, GROUPS, SCAN_SCRATCH,
        SCHED_STATE, SLOTS,
    },
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Scan {
    slots_base: u32,
    service_id: u32,
    sched: u32,
    found: u32,
    best_index: u32,
    _pad: u32,
    best: Load,
}

/// The best server by `sched`'s rule (lblc and lblcr fall back to wlc's): by groups for a
/// service with many servers (`lb_common::group`), else one scan of all.
#[inline(always)]
pub fn scan(svc: &Service, sched: u8) -> Result<(u32, &'static Backend), u32> {
    if has_groups(svc)
        && let Some(found) = grouped(svc, sched)
    {
        let index = found?;
        let be = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
        return Ok((index, be));
    }
    linear(svc, sched)
}

/// The service's table is scanned by groups (`lb_common::group`): large enough, and placed
/// on a group boundary by the controller.
#[inline(always)]
fn has_groups(svc: &Service) -> bool {
    svc.slots_len > group::MIN_SLOTS && svc.slots_base & (group::SIZE - 1) == 0
}

/// One scan of all servers.
#[inline(always)]
fn linear(svc: &Service, sched: u8) -> Result<(u32, &'static Backend), u32> {
    // State in a per-CPU map, a pointer to it on the stack (see `Ref`).
    let scan = unsafe { &mut *SCAN_SCRATCH.get_ptr_mut(0).ok_or(reason::DROP_INTERNAL)? };
    scan.slots_base = svc.slots_base;
    scan.service_id = svc.id;
    scan.sched = sched as u32;
    scan.found = 0;
    scan.best_index = 0;
    let mut ctx = Ref {
        p: scan as *mut Scan,
    };
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            svc.slots_len,
            step as *mut c_void,
            &raw mut ctx as *mut c_void,
            0,
        )
    };
    if scan.found == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let be = BACKENDS
        .get(scan.best_index)
        .ok_or(reason::DROP_INTERNAL)?
        .current();
    Ok((scan.best_index, be))
}

/// Whether some server of `svc` has fewer than half as many active connections as its weight
/// (the second half of lblc's `is_overloaded()`; the overload flag does not matter here).
#[inline(always)]
pub fn any_underloaded(svc: &Service) -> bool {
    if has_groups(svc)
        && let Some(w) = refresh_groups(svc, sched::WLC)
    {
        // The groups know (lblc and lblcr services scan their groups by wlc's rule).
        let mut walk = Ref {
            p: w as *mut Groups,
        };
        w.stale = 0;
        unsafe {
            bpf_loop(
                w.groups,
                underloaded_group_step as *mut c_void,
                &raw mut walk as *mut c_void,
                0,
            )
        };
        return w.stale != 0;
    }
    let mut u = Underloaded {
        slots_base: svc.slots_base,
        found: 0,
    };
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            svc.slots_len,
            underloaded_step as *mut c_void,
            &raw mut u as *mut c_void,
            0,
        )
    };
    u.found != 0
}

/// Group `g` has an underloaded member: stop (reported through `Groups::stale`).
#[inline(never)]
extern "C" fn underloaded_group_step(g: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { Ref::<Groups>::state(ctx) };
    let Some(st) = GROUPS.get(w.first_group.wrapping_add(g as u32)) else {
        return 1;
    };
    if unsafe { core::ptr::read_volatile(&st.underloaded) } != 0 {
        w.stale = 1;
        return 1;
    }
    0
}

#[repr(C)]
struct Underloaded {
    slots_base: u32,
    found: u32,
}

#[inline(never)]
extern "C" fn underloaded_step(i: u64, ctx: *mut c_void) -> i64 {
    let u = unsafe { &mut *(ctx as *mut Underloaded) };
    let Some(index) = SLOTS.get(u.slots_base.wrapping_add(i as u32)) else {
        return 1;
    };
    let index = *index;
    let Some(be) = BACKENDS.get(index) else {
        return 1;
    };
    let weight = be.current().weight as u64;
    let Some(c) = BACKEND_CONNS.get_ptr(index) else {
        return 1;
    };
    let active = unsafe { core::ptr::read_volatile(&raw const (*c).active) };
    if active * 2 < weight {
        u.found = 1;
        return 1;
    }
    0
}

/// Active connections of server `index`.
#[inline(always)]
pub fn active(index: u32) -> u64 {
    match BACKEND_CONNS.get_ptr(index) {
        Some(c) => unsafe { core::ptr::read_volatile(&raw const (*c).active) },
        None => 0,
    }
}

/// The load of server `index` whatever its overload flag (lblcr's set maximum).
#[inline(always)]
pub fn raw_load(index: u32, be: &Backend) -> Load {
    match BACKEND_CONNS.get_ptr(index) {
        Some(c) => unsafe {
            Load {
                weight: be.weight as u64,
                active: core::ptr::read_volatile(&raw const (*c).active),
                inactive: core::ptr::read_volatile(&raw const (*c).inactive),
            }
        },
        None => Load {
            weight: be.weight as u64,
            active: 0,
            inactive: 0,
        },
    }
}

/// The load of server `index` if it can take a new flow at all (available, in this service,
/// not overloaded).
#[inline(always)]
pub fn load(index: u32, service_id: u32) -> Option<Load> {
    let be = BACKENDS.get(index)?.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.service_id != service_id {
        return None;
    }
    let c = BACKEND_CONNS.get_ptr(index)?;
    unsafe {
        if core::ptr::read_volatile(&raw const (*c).overloaded) != 0 {
            return None;
        }
        Some(Load {
            weight: be.weight as u64,
            active: core::ptr::read_volatile(&raw const (*c).active),
            inactive: core::ptr::read_volatile(&raw const (*c).inactive),
        })
    }
}

/// One server of the scan; 1 stops the loop.
#[inline(never)]
extern "C" fn step(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { Ref::<Scan>::state(ctx) };
    let Some(index) = SLOTS.get(s.slots_base.wrapping_add(i as u32)) else {
        return 1;
    };
    let index = *index;
    let Some(d) = load(index, s.service_id) else {
        return 0;
    };
    consider(s, index, d) as i64
}

/// Offers server `index` with load `d` to the scan: `true` when the scan may stop (nq found
/// an idle server).
#[inline(always)]
fn consider(s: &mut Scan, index: u32, d: Load) -> bool {
    let sched = s.sched as u8;
    if !least::eligible(sched, &d) {
        return false;
    }
    if least::takes_at_once(sched, &d) {
        s.best = d;
        s.best_index = index;
        s.found = 1;
        return true;
    }
    if s.found == 0 || least::replaces(sched, &s.best, &d) {
        s.best = d;
        s.best_index = index;
        s.found = 1;
    }
    false
}

/// The grouped scan (`lb_common::group`). `None` when the groups' state is unusable (a
/// group's best no longer eligible: a change the controller has not marked yet); the caller
/// then scans everything.
#[inline(always)]
fn grouped(svc: &Service, sched: u8) -> Option<Result<u32, u32>> {
    let w = refresh_groups(svc, sched)?;
    let mut walk = Ref {
        p: w as *mut Groups,
    };
    // The groups' bests, in order.
    w.scan.found = 0;
    w.stale = 0;
    unsafe {
        bpf_loop(
            w.groups,
            combine_step as *mut c_void,
            &raw mut walk as *mut c_void,
            0,
        )
    };
    if w.stale != 0 {
        return None;
    }
    Some(if w.scan.found != 0 {
        Ok(w.scan.best_index)
    } else {
        Err(reason::PASS_NO_BACKEND)
    })
}

/// Brings the service's scan groups up to date: collects the dirty ones (clearing their
/// flags first) and rescans them by `sched`'s rule. The walk's state lives in a per-CPU map,
/// not on the stack: the call chain down to the callbacks must stay within the verifier's
/// 512 bytes of stack.
#[inline(always)]
fn refresh_groups(svc: &Service, sched: u8) -> Option<&'static mut Groups> {
    let w = unsafe { &mut *GROUP_SCAN.get_ptr_mut(0)? };
    w.slots_base = svc.slots_base;
    w.slots_len = svc.slots_len;
    w.first_group = svc.slots_base >> group::SHIFT;
    w.groups = svc.slots_len.div_ceil(group::SIZE);
    w.all = 0;
    w.dirty_len = 0;
    w.stale = 0;
    w.group_done = 0;
    w.group_under = 0;
    w.scan.slots_base = svc.slots_base;
    w.scan.service_id = svc.id;
    w.scan.sched = sched as u32;
    w.scan.found = 0;
    let mut walk = Ref {
        p: w as *mut Groups,
    };
    let ctx = &raw mut walk as *mut c_void;
    unsafe { bpf_loop(w.groups, collect_step as *mut c_void, ctx, 0) };
    let rescan = if w.all != 0 {
        w.groups * group::SIZE
    } else {
        w.dirty_len * group::SIZE
    };
    unsafe { bpf_loop(rescan, rescan_step as *mut c_void, ctx, 0) };
    Some(w)
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Groups {
    slots_base: u32,
    slots_len: u32,
    first_group: u32,
    groups: u32,
    /// More dirty groups than `dirty` holds: rescan all.
    all: u32,
    dirty_len: u32,
    dirty: [u32; group::MAX_DIRTY],
    stale: u32,
    /// The group being rescanned has its final best (nq found an idle server).
    group_done: u32,
    /// The group being rescanned has an underloaded member.
    group_under: u32,
    /// The scan state of the group being rescanned, then of the final comparison (one
    /// field for both keeps the stack small).
    scan: Scan,
}

/// `n` masked into `Groups::dirty`'s range for the verifier, which does not carry a
/// comparison made before over to the index. Read through a volatile load: LLVM would
/// otherwise drop the mask, knowing the comparison.
#[inline(always)]
fn masked_dirty_index(n: usize) -> usize {
    unsafe { core::ptr::read_volatile(&n) & (group::MAX_DIRTY - 1) }
}

/// Group `g` of the service: collects it if dirty (clearing the flag).
#[inline(never)]
extern "C" fn collect_step(g: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { Ref::<Groups>::state(ctx) };
    let Some(st) = GROUPS.get_ptr_mut(w.first_group.wrapping_add(g as u32)) else {
        return 1;
    };
    unsafe {
        if core::ptr::read_volatile(&raw const (*st).dirty) == 0 {
            return 0;
        }
        core::ptr::write_volatile(&raw mut (*st).dirty, 0);
    }
    let n = w.dirty_len as usize;
    if n < group::MAX_DIRTY {
        w.dirty[masked_dirty_index(n)] = g as u32;
        w.dirty_len += 1;
    } else {
        // Too many: every group is rescanned (clear the remaining flags as we go).
        w.all = 1;
    }
    0
}

/// Slot `i` of the rescan: group `i / SIZE` of the list (all groups, or the dirty ones).
#[inline(never)]
extern "C" fn rescan_step(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { Ref::<Groups>::state(ctx) };
    let nth = i >> group::SHIFT;
    let g = if w.all != 0 {
        nth as u32
    } else if nth < group::MAX_DIRTY as u64 {
        w.dirty[masked_dirty_index(nth as usize)]
    } else {
        return 1;
    };
    let at = (i as u32) & (group::SIZE - 1);
    if at == 0 {
        w.group_done = 0;
        w.group_under = 0;
        w.scan.found = 0;
        if w.all != 0
            && let Some(st) = GROUPS.get_ptr_mut(w.first_group.wrapping_add(g))
        {
            // Rescanning everything: this group's flag is cleared too.
            unsafe { core::ptr::write_volatile(&raw mut (*st).dirty, 0) };
        }
    }
    let pos = (g << group::SHIFT) | at;
    if pos < w.slots_len
        && let Some(index) = SLOTS.get(w.slots_base.wrapping_add(pos))
    {
        let index = *index;
        if let Some(be) = BACKENDS.get(index)
            && active(index) * 2 < be.current().weight as u64
        {
            w.group_under = 1;
        }
        if w.group_done == 0
            && let Some(d) = load(index, w.scan.service_id)
            && consider(&mut w.scan, pos, d)
        {
            // nq's idle server: the rest of the group cannot beat it.
            w.group_done = 1;
        }
    }
    if at == group::SIZE - 1 || pos + 1 >= w.slots_len {
        let best = if w.scan.found != 0 {
            w.scan.best_index + 1
        } else {
            0
        };
        if let Some(st) = GROUPS.get_ptr_mut(w.first_group.wrapping_add(g)) {
            unsafe {
                core::ptr::write_volatile(&raw mut (*st).best, best);
                core::ptr::write_volatile(&raw mut (*st).underloaded, w.group_under);
            }
        }
    }
    0
}

/// Group `g`'s best offered to the final comparison.
#[inline(never)]
extern "C" fn combine_step(g: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { Ref::<Groups>::state(ctx) };
    let Some(st) = GROUPS.get(w.first_group.wrapping_add(g as u32)) else {
        return 1;
    };
    let best = unsafe { core::ptr::read_volatile(&st.best) };
    if best == 0 {
        return 0;
    }
    let Some(index) = SLOTS.get(w.slots_base.wrapping_add(best - 1)) else {
        w.stale = 1;
        return 1;
    };
    let index = *index;
    let Some(d) = load(index, w.scan.service_id) else {
        w.stale = 1;
        return 1;
    };
    if !least::eligible(w.scan.sched as u8, &d) {
        w.stale = 1;
        return 1;
    }
    consider(&mut w.scan, index, d) as i64
}

/// twos' two walks over the servers: the sum of the eligible weights, then the two draws.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Draw {
    slots_base: u32,
    service_id: u32,
    /// Remaining weight of each draw (signed, as IPVS's `int`); the walk stops when both
    /// have fallen to zero or below.
    r: [i64; 2],
    total: u64,
    index: [u32; 2],
    found: [u32; 2],
    load: [Load; 2],
}

/// `ip_vs_twos_schedule()`: two servers drawn by weight (uniform in [0, total], so the first
/// eligible server gets one extra chance, as in IPVS), the one with the lower overhead per
/// weight wins.
#[inline(always)]
pub fn twos(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    let d = unsafe { &mut *DRAW_SCRATCH.get_ptr_mut(0).ok_or(reason::DROP_INTERNAL)? };
    d.slots_base = svc.slots_base;
    d.service_id = svc.id;
    d.total = 0;
    d.found = [0; 2];
    let mut ctx = Ref { p: d as *mut Draw };
    let ctx = &raw mut ctx as *mut c_void;
    let n = svc.slots_len;
    // The sum of the eligible weights changes only with the configuration and the overload
    // flags: it is computed again only when one of them changed since.
    let st = SCHED_STATE
        .get_ptr_mut(svc.id)
        .ok_or(reason::DROP_INTERNAL)?;
    let generation = CONFIG_GEN
        .get_ptr(0)
        .map_or(0, |g| unsafe { core::ptr::read_volatile(g) });
    let table = (svc.slots_base as u64) << 32 | svc.slots_len as u64;
    unsafe {
        let flips = core::ptr::read_volatile(&raw const (*st).overload_flips);
        if (*st).total_gen == generation.wrapping_add(1)
            && (*st).total_flips == flips
            && (*st).total_table == table
        {
            d.total = (*st).weight_total;
        } else {
            aya_ebpf::helpers::bpf_loop(n, sum_step as *mut c_void, ctx, 0);
            // Invalidated first, tagged last: a reader never pairs a new tag with an old sum.
            core::ptr::write_volatile(&raw mut (*st).total_gen, 0);
            core::ptr::write_volatile(&raw mut (*st).weight_total, d.total);
            core::ptr::write_volatile(&raw mut (*st).total_flips, flips);
            core::ptr::write_volatile(&raw mut (*st).total_table, table);
            core::ptr::write_volatile(&raw mut (*st).total_gen, generation.wrapping_add(1));
        }
    }
    if d.total == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let bound = d.total.wrapping_add(1);
    if bound == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    d.r = [
        (unsafe { bpf_get_prandom_u32() } as u64 % bound) as i64,
        (unsafe { bpf_get_prandom_u32() } as u64 % bound) as i64,
    ];
    unsafe { aya_ebpf::helpers::bpf_loop(n, draw_step as *mut c_void, ctx, 0) };
    if d.found[0] == 0 || d.found[1] == 0 {
        // The servers changed between the walks.
        return Err(reason::PASS_NO_BACKEND);
    }
    let i = if least::second_wins(&d.load[0], &d.load[1]) {
        d.index[1]
    } else {
        d.index[0]
    };
    let be = BACKENDS.get(i).ok_or(reason::DROP_INTERNAL)?.current();
    Ok((i, be))
}

#[inline(always)]
fn draw_load(d: &Draw, i: u64) -> Option<(u32, Load)> {
    let index = *SLOTS.get(d.slots_base.wrapping_add(i as u32))?;
    let l = load(index, d.service_id)?;
    (l.weight > 0).then_some((index, l))
}

#[inline(never)]
extern "C" fn sum_step(i: u64, ctx: *mut c_void) -> i64 {
    let d = unsafe { Ref::<Draw>::state(ctx) };
    if let Some((_, l)) = draw_load(d, i) {
        d.total += l.weight;
    }
    0
}

#[inline(never)]
extern "C" fn draw_step(i: u64, ctx: *mut c_void) -> i64 {
    let d = unsafe { Ref::<Draw>::state(ctx) };
    let Some((index, l)) = draw_load(d, i) else {
        return 0;
    };
    for k in 0..2 {
        d.r[k] -= l.weight as i64;
        if d.r[k] <= 0 && d.found[k] == 0 {
            d.found[k] = 1;
            d.index[k] = index;
            d.load[k] = l;
        }
    }
    (d.found[0] != 0 && d.found[1] != 0) as i64
}
