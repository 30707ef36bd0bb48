//! New-flow scheduling.
//!
//! rr and wrr share one mechanism: the controller writes the service's slot table (rr: the
//! usable servers in IPVS list order; wrr: one whole IPVS wrr cycle) and every new flow takes
//! the next slot through an atomic counter shared by all CPUs, so the sequence is exactly the
//! IPVS one however the flows spread over CPUs, without a lock.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{BACKEND_F_AVAILABLE, Backend, Service, reason};

use crate::maps::{BACKENDS, SCHED_STATE, SLOTS};

/// The service's pick counter.
#[inline(always)]
fn counter(svc: &Service) -> Result<*mut u64, u32> {
    if svc.slots_len == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let state = SCHED_STATE
        .get_ptr_mut(svc.id)
        .ok_or(reason::DROP_INTERNAL)?;
    Ok(unsafe { &raw mut (*state).picks })
}

/// Takes the next pick: returns the counter value it owns.
#[inline(always)]
fn claim(picks: *mut u64) -> u64 {
    // `core::sync::atomic` has no read-modify-write on bpfel (the target does not declare
    // CAS); the intrinsic lowers to the BPF atomic fetch-and-add instruction (ISA v3). It must
    // be SeqCst: LLVM's BPF backend lowers a *relaxed* add to the old XADD, which returns
    // nothing, even when the result is used (the JIT emits `lock xadd` either way).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(picks, 1) }
}

/// The real server of pick number `n`.
#[inline(always)]
fn server(svc: &Service, n: u64) -> Result<(u32, &'static Backend), u32> {
    // Checked here, where the division is: the service entry lives in map memory, so the
    // compiler cannot reuse a check made before the atomic.
    let len = svc.slots_len as u64;
    if len == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let slot = (n.wrapping_add(svc.sched_offset as u64) % len) as u32;
    let index = *SLOTS
        .get(svc.slots_base.wrapping_add(slot))
        .ok_or(reason::DROP_INTERNAL)?;
    let be = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.service_id != svc.id {
        return Err(reason::DROP_INTERNAL);
    }
    Ok((index, be))
}

/// Picks the real server for a new flow: (backend index, backend), or the reason counter.
#[inline(always)]
pub fn pick(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    let picks = counter(svc)?;
    server(svc, claim(picks))
}

/// A pick that is only claimed once the caller knows the flow is new.
pub struct Tentative {
    picks: *mut u64,
    n: u64,
    pub index: u32,
    pub backend: &'static Backend,
}

/// The server the next pick would give, without taking it.
#[inline(always)]
pub fn peek(svc: &Service) -> Result<Tentative, u32> {
    let picks = counter(svc)?;
    let n = unsafe { core::ptr::read_volatile(picks) };
    let (index, backend) = server(svc, n)?;
    Ok(Tentative {
        picks,
        n,
        index,
        backend,
    })
}

/// Takes the pick `t` looked at. If another CPU took that number meanwhile, the pick this
/// flow really owns is returned as `Some`, so every number is used by exactly one flow, as
/// with IPVS's locked scheduler.
#[inline(always)]
pub fn confirm(svc: &Service, t: &Tentative) -> Result<Option<(u32, &'static Backend)>, u32> {
    let m = claim(t.picks);
    if m == t.n {
        Ok(None)
    } else {
        server(svc, m).map(Some)
    }
}
