//! lblc and lblcr (`ip_vs_lblc.c`, `ip_vs_lblcr.c`): a cache by destination address keeps
//! each destination on one server (lblc) or a set of servers (lblcr) - what transparent cache
//! clusters want - unless that server is "overloaded" in lblc's sense: more active
//! connections than its weight while some server has fewer than half its weight. Then, and
//! on a miss, wlc picks and the cache learns the choice.
//!
//! The cache entries are updated without a lock (IPVS takes the service's scheduler lock):
//! two CPUs scheduling the same new destination at once may both write it; every member
//! carries its server's generation, so nothing ever points at a server that is gone.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_loop},
    maps::LruHashMap,
};
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, FAMILY_V4, Locality, LocalityKeyV4, LocalityKeyV6, Service,
    locality::{EXPIRATION, SET},
    sched::{self, least::Load},
};

use crate::{
    least,
    maps::{BACKENDS, LOCALITY_V4, LOCALITY_V6},
    parse::Pkt,
};

/// The backend index for a new flow of an lblc or lblcr service, or the reason counter.
#[inline(always)]
pub fn pick(svc: &Service, pkt: &Pkt) -> Result<u32, u32> {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    if pkt.family == FAMILY_V4 {
        let key = LocalityKeyV4 {
            service_id: svc.id,
            addr: pkt.dst[0],
        };
        in_cache(&LOCALITY_V4, &key, svc, now)
    } else {
        let key = LocalityKeyV6 {
            service_id: svc.id,
            addr: pkt.dst,
        };
        in_cache(&LOCALITY_V6, &key, svc, now)
    }
}

#[inline(always)]
fn in_cache<K>(
    cache: &LruHashMap<K, Locality>,
    key: &K,
    svc: &Service,
    now: u32,
) -> Result<u32, u32> {
    let entry = cache
        .get_ptr_mut(key)
        // An entry unused for the expiration time is gone in IPVS (its sweep removes it).
        .filter(|e| now.wrapping_sub(unsafe { (**e).last_use }) <= EXPIRATION);
    let Some(e) = entry else {
        let index = wlc(svc)?;
        let mut slot = core::mem::MaybeUninit::<Locality>::uninit();
        let fresh = crate::zeroed(&mut slot);
        fresh.members[0] = index;
        fresh.generations[0] = generation(index);
        fresh.len = 1;
        fresh.last_use = now;
        fresh.last_mod = now;
        let _ = cache.insert(key, fresh, 0);
        return Ok(index);
    };
    let e = unsafe { &mut *e };
    if e.last_use != now {
        e.last_use = now;
    }
    if svc.scheduler == sched::LBLC {
        // `ip_vs_lblc_schedule()`: the cached server if available, weighted and not
        // overloaded (lblc's sense; the threshold flag is not looked at).
        if let Some(be) = member(svc, e.members[0], e.generations[0])
            && be.weight > 0
            && !overloaded(svc, e.members[0], be)
        {
            return Ok(e.members[0]);
        }
        let index = wlc(svc)?;
        e.members[0] = index;
        e.generations[0] = generation(index);
        e.len = 1;
        return Ok(index);
    }
    // `ip_vs_lblcr_schedule()`.
    let min = set_min(svc, e);
    if e.len > 1 && now.wrapping_sub(e.last_mod) > EXPIRATION {
        // A set unchanged for the expiration time sheds its most loaded member.
        if let Some(pos) = set_max(svc, e) {
            erase(e, pos);
            e.last_mod = now;
        }
    }
    if let Some(index) = min
        && let Some(be) = BACKENDS.get(index)
        && !overloaded(svc, index, be.current())
    {
        return Ok(index);
    }
    let index = wlc(svc)?;
    insert(e, index, generation(index), now);
    Ok(index)
}

/// wlc over the whole service (`__ip_vs_lblc_schedule()`).
#[inline(always)]
fn wlc(svc: &Service) -> Result<u32, u32> {
    least::scan(svc, sched::WLC).map(|(index, _)| index)
}

#[inline(always)]
fn generation(index: u32) -> u32 {
    BACKENDS.get(index).map_or(0, |b| b.current().generation)
}

/// The member's server, if it still exists in this service (same generation, available).
#[inline(always)]
fn member(svc: &Service, index: u32, generation: u32) -> Option<&'static Backend> {
    let be = BACKENDS.get(index)?.current();
    (be.generation == generation && be.flags & BACKEND_F_AVAILABLE != 0 && be.service_id == svc.id)
        .then_some(be)
}

/// lblc's `is_overloaded()`: more active connections than its weight, while some server of
/// the service has fewer than half its weight.
#[inline(always)]
fn overloaded(svc: &Service, index: u32, be: &Backend) -> bool {
    least::active(index) > be.weight as u64 && least::any_underloaded(svc)
}

/// A walk over a set's members in `bpf_loop` (the verifier checks one step, not every
/// combination of eight members' branches).
#[repr(C)]
#[derive(Clone, Copy)]
struct SetWalk {
    entry: *const Locality,
    service_id: u32,
    found: u32,
    best_index: u32,
    best_pos: u32,
    best: Load,
}

impl SetWalk {
    #[inline(always)]
    /// Runs `step` over the members: (found, best index, best position).
    fn run(
        svc: &Service,
        e: &Locality,
        step: extern "C" fn(u64, *mut c_void) -> i64,
    ) -> (bool, u32, u32) {
        let mut slot = core::mem::MaybeUninit::<SetWalk>::uninit();
        let w = crate::zeroed(&mut slot);
        w.entry = e as *const Locality;
        w.service_id = svc.id;
        let n = if (e.len as usize) < SET {
            e.len
        } else {
            SET as u32
        };
        unsafe { bpf_loop(n, step as *mut c_void, w as *mut SetWalk as *mut c_void, 0) };
        (w.found != 0, w.best_index, w.best_pos)
    }

    /// Member `i` if it exists and its server is still in the service.
    #[inline(always)]
    fn member(&self, i: u64) -> Option<(u32, &'static Backend)> {
        let e = unsafe { &*self.entry };
        let i = i as usize;
        if i >= SET {
            return None;
        }
        let index = e.members[i];
        let be = BACKENDS.get(index)?.current();
        (be.generation == e.generations[i]
            && be.flags & BACKEND_F_AVAILABLE != 0
            && be.service_id == self.service_id)
            .then_some((index, be))
    }
}

/// `ip_vs_dest_set_min()`: the first member that is available, not flagged overloaded and
/// weighted, then any later one with a strictly lower overhead per weight.
#[inline(always)]
fn set_min(svc: &Service, e: &Locality) -> Option<u32> {
    let (found, index, _) = SetWalk::run(svc, e, min_step);
    found.then_some(index)
}

#[inline(never)]
extern "C" fn min_step(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut SetWalk) };
    let Some((index, _)) = w.member(i) else {
        return 0;
    };
    // `None` when flagged overloaded.
    let Some(l) = least::load(index, w.service_id) else {
        return 0;
    };
    let take = if w.found != 0 {
        sched::least::replaces(sched::WLC, &w.best, &l)
    } else {
        l.weight > 0
    };
    if take {
        w.found = 1;
        w.best_index = index;
        w.best = l;
    }
    0
}

/// `ip_vs_dest_set_max()`: the position of the member with the highest overhead per weight
/// (the first weighted one, then any later weighted one strictly higher); members whose
/// server is gone are passed over.
#[inline(always)]
fn set_max(svc: &Service, e: &Locality) -> Option<u32> {
    let (found, _, pos) = SetWalk::run(svc, e, max_step);
    found.then_some(pos)
}

#[inline(never)]
extern "C" fn max_step(i: u64, ctx: *mut c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut SetWalk) };
    let Some((index, be)) = w.member(i) else {
        return 0;
    };
    if be.weight == 0 {
        return 0;
    }
    let l = least::raw_load(index, be);
    if w.found == 0 || w.best.overhead() * l.weight < l.overhead() * w.best.weight {
        w.found = 1;
        w.best_pos = i as u32;
        w.best = l;
    }
    0
}

/// Removes the member at `pos`. A function of its own: its branches end in one state.
#[inline(never)]
fn erase(e: &mut Locality, pos: u32) {
    for i in 0..SET - 1 {
        if i as u32 >= pos && (i as u32) + 1 < e.len {
            e.members[i] = e.members[i + 1];
            e.generations[i] = e.generations[i + 1];
        }
    }
    if e.len > 0 {
        e.len -= 1;
    }
}

/// `ip_vs_dest_set_insert()`: a new member goes first (unless it is a member already); a
/// full set drops its oldest. A function of its own: its branches end in one state.
#[inline(never)]
fn insert(e: &mut Locality, index: u32, generation: u32, now: u32) {
    for i in 0..SET {
        if (i as u32) < e.len && e.members[i] == index && e.generations[i] == generation {
            return;
        }
    }
    for i in (1..SET).rev() {
        e.members[i] = e.members[i - 1];
        e.generations[i] = e.generations[i - 1];
    }
    e.members[0] = index;
    e.generations[0] = generation;
    if (e.len as usize) < SET {
        e.len += 1;
    }
    e.last_mod = now;
}
