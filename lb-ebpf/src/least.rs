//! The least-connection family (lc, wlc, sed, nq, fo, ovf): every new flow scans the
//! service's servers in IPVS list order and takes the best by the scheduler's rule
//! (`lb_common::sched::least`), reading each server's live connection counts.
//!
//! The scan runs in `bpf_loop`, so the verifier checks one step instead of every iteration.

use core::ffi::c_void;

use lb_common::{
    BACKEND_F_AVAILABLE, Backend, Service, reason,
    sched::least::{self, Load},
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
