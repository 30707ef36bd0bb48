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
    maps::{BACKENDS, LOCALITY_V4, LOCALITY_V6, SET_WALK},
    sched::PickArgs,
};

/// The cached choice for the packet's destination: lblc's server or lblcr's least loaded
/// member, if usable and not overloaded in lblc's sense. `None`: wlc picks, and [`learn`]
/// records its choice. `upkeep`: also the cache's upkeep (last use, lblcr's shedding) - false
/// for a tentative pick, whose flow may turn out to exist already ([`commit`] does it then).
#[inline(always)]
pub fn cached(svc: &Service, pkt: &PickArgs, upkeep: bool) -> Option<u32> {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    let index = if pkt.family == FAMILY_V4 {
        candidate(&LOCALITY_V4, &key_v4(svc, pkt), svc, now, upkeep)
    } else {
        candidate(&LOCALITY_V6, &key_v6(svc, pkt), svc, now, upkeep)
    }?;
    let be = BACKENDS.get(index)?.current();
    (!overloaded(svc, index, be)).then_some(index)
}

/// A tentative pick turned out to open a connection: the cache's upkeep, and the wlc choice
/// `index` learnt if the cache did not give it (`learnt`). A function of its own: the fresh
/// entry it may build would otherwise sit in the SYN program's frame, whose chain down to the
/// schedulers' callbacks must fit the verifier's 512 bytes.
#[inline(never)]
pub fn commit(svc: &Service, pkt: &PickArgs, index: u32, learnt: bool) {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    if pkt.family == FAMILY_V4 {
        let key = key_v4(svc, pkt);
        if let Some(e) = entry(&LOCALITY_V4, &key, now) {
            upkeep(unsafe { &mut *e }, svc, now);
        }
        if learnt {
            record(&LOCALITY_V4, &key, svc, now, index);
        }
    } else {
        let key = key_v6(svc, pkt);
        if let Some(e) = entry(&LOCALITY_V6, &key, now) {
            upkeep(unsafe { &mut *e }, svc, now);
        }
        if learnt {
            record(&LOCALITY_V6, &key, svc, now, index);
        }
    }
}

/// Records wlc's choice `index` for the packet's destination: lblc's server, a new member of
/// lblcr's set, or a new entry.
#[inline(always)]
pub fn learn(svc: &Service, pkt: &PickArgs, index: u32) {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    if pkt.family == FAMILY_V4 {
        record(&LOCALITY_V4, &key_v4(svc, pkt), svc, now, index);
    } else {
        record(&LOCALITY_V6, &key_v6(svc, pkt), svc, now, index);
    }
}

#[inline(always)]
fn key_v4(svc: &Service, pkt: &PickArgs) -> LocalityKeyV4 {
    LocalityKeyV4 {
        service_id: svc.id,
        addr: pkt.dst[0],
    }
}

#[inline(always)]
fn key_v6(svc: &Service, pkt: &PickArgs) -> LocalityKeyV6 {
    LocalityKeyV6 {
        service_id: svc.id,
        addr: pkt.dst,
    }
}

/// The destination's live entry (one unused for the expiration time is gone in IPVS: its
/// sweep removes it).
#[inline(always)]
fn entry<K>(cache: &LruHashMap<K, Locality>, key: &K, now: u32) -> Option<*mut Locality> {
    cache
        .get_ptr_mut(key)
        .filter(|e| now.wrapping_sub(unsafe { (**e).last_use }) <= EXPIRATION)
}

#[inline(always)]
fn candidate<K>(
    cache: &LruHashMap<K, Locality>,
    key: &K,
    svc: &Service,
    now: u32,
    with_upkeep: bool,
) -> Option<u32> {
    let e = unsafe { &mut *entry(cache, key, now)? };
    if svc.scheduler == sched::LBLC {
        if with_upkeep {
            upkeep(e, svc, now);
        }
        // `ip_vs_lblc_schedule()`: the cached server if available and weighted (the
        // threshold flag is not looked at).
        let be = member(svc.id, e.members[0], e.generations[0])?;
        return (be.weight > 0).then_some(e.members[0]);
    }
    // `ip_vs_lblcr_schedule()`: the least loaded member, taken before the set sheds.
    let min = set_min(svc, e);
    if with_upkeep {
        upkeep(e, svc, now);
    }
    min
}

/// A destination's entry was used: its last use, and lblcr's shedding (a set unchanged for
/// the expiration time sheds its most loaded member).
#[inline(always)]
fn upkeep(e: &mut Locality, svc: &Service, now: u32) {
    if e.last_use != now {
        e.last_use = now;
    }
    if svc.scheduler == sched::LBLCR
        && e.len > 1
        && now.wrapping_sub(e.last_mod) > EXPIRATION
        && let Some(pos) = set_max(svc, e)
    {
        erase(e, pos);
        e.last_mod = now;
    }
}

#[inline(always)]
fn record<K>(cache: &LruHashMap<K, Locality>, key: &K, svc: &Service, now: u32, index: u32) {
    let generation = generation(index);
    if let Some(e) = entry(cache, key, now) {
        let e = unsafe { &mut *e };
        if svc.scheduler == sched::LBLC {
            e.members[0] = index;
            e.generations[0] = generation;
            e.len = 1;
        } else {
            insert(e, index, generation, now);
        }
        return;
    }
    let mut slot = core::mem::MaybeUninit::<Locality>::uninit();
    let fresh = crate::zeroed(&mut slot);
    fresh.members[0] = index;
    fresh.generations[0] = generation;
    fresh.len = 1;
    fresh.last_use = now;
    fresh.last_mod = now;
    let _ = cache.insert(key, fresh, 0);
}

#[inline(always)]
fn generation(index: u32) -> u32 {
    BACKENDS.get(index).map_or(0, |b| b.current().generation)
}

/// The member's server, if it still exists in this service (same generation, available).
#[inline(always)]
fn member(service_id: u32, index: u32, generation: u32) -> Option<&'static Backend> {
    let be = BACKENDS.get(index)?.current();
    (be.generation == generation
        && be.flags & BACKEND_F_AVAILABLE != 0
        && be.service_id == service_id)
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
/// The callbacks' context: the walk's state (in a per-CPU map; no pointers may be stored
/// there) and the entry walked.
#[repr(C)]
struct SetWalkRef {
    w: *mut SetWalk,
    entry: *const Locality,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SetWalk {
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
        // State in a per-CPU map, a pointer to it on the stack (the frames down to the
        // callback must fit the verifier's 512 bytes).
        let Some(w) = SET_WALK.get_ptr_mut(0) else {
            return (false, 0, 0);
        };
        let w = unsafe { &mut *w };
        w.service_id = svc.id;
        w.found = 0;
        w.best_index = 0;
        w.best_pos = 0;
        let n = if (e.len as usize) < SET {
            e.len
        } else {
            SET as u32
        };
        let mut ctx = SetWalkRef {
            w: w as *mut SetWalk,
            entry: e as *const Locality,
        };
        unsafe { bpf_loop(n, step as *mut c_void, &raw mut ctx as *mut c_void, 0) };
        (w.found != 0, w.best_index, w.best_pos)
    }
}

/// Member `i` of the walked entry if it exists and its server is still in the service.
#[inline(always)]
fn member_at(r: &SetWalkRef, service_id: u32, i: u64) -> Option<(u32, &'static Backend)> {
    let e = unsafe { &*r.entry };
    let i = i as usize;
    if i >= SET {
        return None;
    }
    let index = e.members[i];
    member(service_id, index, e.generations[i]).map(|be| (index, be))
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
    let r = unsafe { &*(ctx as *mut SetWalkRef) };
    let w = unsafe { &mut *r.w };
    let Some((index, _)) = member_at(r, w.service_id, i) else {
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
    let r = unsafe { &*(ctx as *mut SetWalkRef) };
    let w = unsafe { &mut *r.w };
    let Some((index, be)) = member_at(r, w.service_id, i) else {
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
/// Element by element through volatile accesses: LLVM would otherwise stage the arrays on
/// the stack.
#[inline(never)]
fn erase(e: &mut Locality, pos: u32) {
    let m = &raw mut e.members as *mut u32;
    let g = &raw mut e.generations as *mut u32;
    for i in 0..SET - 1 {
        if i as u32 >= pos && (i as u32) + 1 < e.len {
            unsafe {
                core::ptr::write_volatile(m.add(i), core::ptr::read_volatile(m.add(i + 1)));
                core::ptr::write_volatile(g.add(i), core::ptr::read_volatile(g.add(i + 1)));
            }
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
    let m = &raw mut e.members as *mut u32;
    let g = &raw mut e.generations as *mut u32;
    for i in (1..SET).rev() {
        unsafe {
            core::ptr::write_volatile(m.add(i), core::ptr::read_volatile(m.add(i - 1)));
            core::ptr::write_volatile(g.add(i), core::ptr::read_volatile(g.add(i - 1)));
        }
    }
    e.members[0] = index;
    e.generations[0] = generation;
    if (e.len as usize) < SET {
        e.len += 1;
    }
    e.last_mod = now;
}
