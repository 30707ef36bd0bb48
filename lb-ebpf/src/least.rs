//! The least-connection family (lc, wlc, sed, nq, fo, ovf, twos): every new flow scans the
//! service's servers in IPVS list order and takes the best by the scheduler's rule
//! (`lb_common::sched::least`), reading each server's live connection counts; twos draws
//! two servers by weight and keeps the less loaded.
//!
//! The scan runs in `bpf_loop`, so the verifier checks one step instead of every iteration.

use core::ffi::c_void;

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, Service, reason,
    sched::{
        self,
        least::{self, Load},
    },
};

use crate::maps::{BACKEND_CONNS, BACKENDS, SLOTS};

#[repr(C)]
#[derive(Clone, Copy)]
struct Scan {
    slots_base: u32,
    service_id: u32,
    sched: u32,
    found: u32,
    best_index: u32,
    _pad: u32,
    best: Load,
}

/// The best server of `svc` for a new flow, or no usable server.
#[inline(always)]
pub fn pick(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    if svc.scheduler == sched::TWOS {
        return twos(svc);
    }
    scan(svc, svc.scheduler)
}

/// The best server by `sched`'s rule (lblc and lblcr fall back to wlc's).
#[inline(always)]
pub fn scan(svc: &Service, sched: u8) -> Result<(u32, &'static Backend), u32> {
    let mut slot = core::mem::MaybeUninit::<Scan>::uninit();
    let scan = crate::zeroed(&mut slot);
    scan.slots_base = svc.slots_base;
    scan.service_id = svc.id;
    scan.sched = sched as u32;
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            svc.slots_len,
            step as *mut c_void,
            scan as *mut Scan as *mut c_void,
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
    let s = unsafe { &mut *(ctx as *mut Scan) };
    let Some(index) = SLOTS.get(s.slots_base.wrapping_add(i as u32)) else {
        return 1;
    };
    let index = *index;
    let Some(d) = load(index, s.service_id) else {
        return 0;
    };
    let sched = s.sched as u8;
    if !least::eligible(sched, &d) {
        return 0;
    }
    if least::takes_at_once(sched, &d) {
        s.best = d;
        s.best_index = index;
        s.found = 1;
        return 1;
    }
    if s.found == 0 || least::replaces(sched, &s.best, &d) {
        s.best = d;
        s.best_index = index;
        s.found = 1;
    }
    0
}

/// twos' two walks over the servers: the sum of the eligible weights, then the two draws.
#[repr(C)]
#[derive(Clone, Copy)]
struct Draw {
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
fn twos(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    let mut slot = core::mem::MaybeUninit::<Draw>::uninit();
    let d = crate::zeroed(&mut slot);
    d.slots_base = svc.slots_base;
    d.service_id = svc.id;
    let n = svc.slots_len;
    unsafe {
        aya_ebpf::helpers::bpf_loop(n, sum_step as *mut c_void, d as *mut Draw as *mut c_void, 0)
    };
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
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            n,
            draw_step as *mut c_void,
            d as *mut Draw as *mut c_void,
            0,
        )
    };
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
    let d = unsafe { &mut *(ctx as *mut Draw) };
    if let Some((_, l)) = draw_load(d, i) {
        d.total += l.weight;
    }
    0
}

#[inline(never)]
extern "C" fn draw_step(i: u64, ctx: *mut c_void) -> i64 {
    let d = unsafe { &mut *(ctx as *mut Draw) };
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
