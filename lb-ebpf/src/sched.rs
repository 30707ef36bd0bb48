//! New-flow scheduling.
//!
//! rr and wrr share one mechanism: the controller writes the service's slot table (rr: the
//! usable servers in IPVS list order; wrr: one whole IPVS wrr cycle) and every new flow takes
//! the next slot through an atomic counter shared by all CPUs, so the sequence is exactly the
//! IPVS one however the flows spread over CPUs, without a lock.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{BACKEND_F_AVAILABLE, Backend, Service, reason};

use crate::maps::{BACKENDS, SCHED_STATE, SLOTS};

/// Picks the real server for a new flow: its backend index, or the reason counter.
#[inline(always)]
pub fn pick(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    if svc.slots_len == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let state = SCHED_STATE
        .get_ptr_mut(svc.id)
        .ok_or(reason::DROP_INTERNAL)?;
    // `core::sync::atomic` has no read-modify-write on bpfel (the target does not declare
    // CAS); the intrinsic lowers to the BPF atomic fetch-and-add instruction (ISA v3). It must
    // be SeqCst: LLVM's BPF backend lowers a *relaxed* add to the old XADD, which returns
    // nothing, even when the result is used (the JIT emits `lock xadd` either way).
    let n: u64 =
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(&raw mut (*state).picks, 1) };
    let slot = (n.wrapping_add(svc.sched_offset as u64) % svc.slots_len as u64) as u32;
    let index = *SLOTS
        .get(svc.slots_base.wrapping_add(slot))
        .ok_or(reason::DROP_INTERNAL)?;
    let be = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.service_id != svc.id {
        return Err(reason::DROP_INTERNAL);
    }
    Ok((index, be))
}
