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
    let mut scan = Scan {
        slots_base: svc.slots_base,
        service_id: svc.id,
        sched: svc.scheduler as u32,
        found: 0,
        best_index: 0,
        _pad: 0,
        best: Load::default(),
    };
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            svc.slots_len,
            step as *mut c_void,
            &raw mut scan as *mut c_void,
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
    let mut d = Draw {
        slots_base: svc.slots_base,
        service_id: svc.id,
        r: [0; 2],
        total: 0,
        index: [0; 2],
        found: [0; 2],
        load: [Load::default(); 2],
    };
    let n = svc.slots_len;
    unsafe {
        aya_ebpf::helpers::bpf_loop(n, sum_step as *mut c_void, &raw mut d as *mut c_void, 0)
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
        aya_ebpf::helpers::bpf_loop(n, draw_step as *mut c_void, &raw mut d as *mut c_void, 0)
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
