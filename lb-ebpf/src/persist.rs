//! Persistence (IPVS templates): while a client network's template lives, its new
//! connections go to the template's real server without consulting the scheduler.
//!
//! A template lives for the service's persistence timeout after the last new connection
//! that used it, and never while a connection it controls is alive (each controlled flow
//! carries the prefix length that rebuilds the template's key, so its end is counted on the
//! right template). When its last connection ends after the timeout ran out, it stays up to
//! `persist::REARM` longer, as IPVS re-arms such templates.
//!
//! As in IPVS, a template outranks quiescing and the overload flag: a client keeps going to
//! a weight-0 or overloaded server while its template lives. Only a deleted server breaks it.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::maps::LruHashMap;
use lb_common::{
    BACKEND_F_AVAILABLE, Flow, FlowKeyV4, FlowKeyV6, Service, Template, TemplateKeyV4,
    TemplateKeyV6, persist,
};

use crate::{
    acct,
    flow::FlowKey,
    maps::{BACKENDS, TEMPLATES_V4, TEMPLATES_V6},
};

/// The template side of a connection-table key.
pub trait Templated: Sized + 'static {
    type Key: 'static;
    /// The template key of this flow's client network under `service_id`.
    fn template_key(&self, service_id: u32, prefix: u32) -> Self::Key;
    fn templates() -> &'static LruHashMap<Self::Key, Template>;
}

impl Templated for FlowKeyV4 {
    type Key = TemplateKeyV4;
    #[inline(always)]
    fn template_key(&self, service_id: u32, prefix: u32) -> TemplateKeyV4 {
        let w: [u32; 2] = [service_id, self.src & persist::mask_word(prefix, 0)];
        // SAFETY: two plain u32 words (word-wise, so no `memset` for padding).
        unsafe { core::mem::transmute(w) }
    }
    #[inline(always)]
    fn templates() -> &'static LruHashMap<TemplateKeyV4, Template> {
        &TEMPLATES_V4
    }
}

impl Templated for FlowKeyV6 {
    type Key = TemplateKeyV6;
    #[inline(always)]
    fn template_key(&self, service_id: u32, prefix: u32) -> TemplateKeyV6 {
        let w: [u32; 5] = [
            service_id,
            self.src[0] & persist::mask_word(prefix, 0),
            self.src[1] & persist::mask_word(prefix, 1),
            self.src[2] & persist::mask_word(prefix, 2),
            self.src[3] & persist::mask_word(prefix, 3),
        ];
        // SAFETY: five plain u32 words.
        unsafe { core::mem::transmute(w) }
    }
    #[inline(always)]
    fn templates() -> &'static LruHashMap<TemplateKeyV6, Template> {
        &TEMPLATES_V6
    }
}

/// `Flow::template` of a connection controlled under `svc`.
#[inline(always)]
pub fn marker(svc: &Service) -> u32 {
    svc.persist_prefix as u32 + 1
}

#[inline(always)]
fn add(p: *mut u32, v: u32) -> u32 {
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) }
}

/// `Template::controlled` of a template the reaper is deleting: nothing may join it.
pub const DEAD: u32 = u32::MAX;

/// The reaper claims an expired template (no controlled connection) for deletion.
#[inline(always)]
pub fn kill(controlled: *mut u32) -> bool {
    acct::cas(controlled, 0, DEAD)
}

/// The backend index of a live template of `key`'s client network, if its server still
/// exists. `control`: a new connection will be recorded under it (counted, and the
/// template's timeout restarts). A function of its own answering with a plain number
/// (`u64::MAX` for none), so the verifier walks on from one state (see `sched::xlb_pick`).
#[inline(never)]
pub fn lookup<K: FlowKey>(key: &K, svc: &Service, now: u32, control: bool) -> u64 {
    let tkey = key.template_key(svc.id, svc.persist_prefix as u32);
    let Some(t) = K::templates().get_ptr_mut(&tkey) else {
        return u64::MAX;
    };
    let controlled_ptr = unsafe { &raw mut (*t).controlled };
    let tpl = unsafe { &mut *t };
    let controlled = unsafe { core::ptr::read_volatile(controlled_ptr) };
    if controlled == DEAD || tpl.expired(controlled, now) {
        return u64::MAX;
    }
    let Some(slot) = BACKENDS.get(tpl.backend) else {
        return u64::MAX;
    };
    let backend = slot.current();
    if backend.flags & BACKEND_F_AVAILABLE == 0 || backend.generation != tpl.generation {
        return u64::MAX;
    }
    if control {
        // From the value seen: if the reaper claimed it meanwhile, this is a miss.
        if !acct::cas(controlled_ptr, controlled, controlled + 1) {
            return u64::MAX;
        }
        if tpl.last_used != now {
            tpl.last_used = now;
        }
    }
    tpl.backend as u64
}

/// Records a template for `key`'s client network pointing at backend `index` of generation
/// `generation` (replacing an expired or broken one); `control`: it controls the connection
/// being created. A template that is replaced in place keeps its count of controlled
/// connections: those still alive (on a server since deleted) release it when they end, so
/// the count stays exact.
#[inline(always)]
pub fn create<K: FlowKey>(
    key: &K,
    svc: &Service,
    now: u32,
    index: u32,
    generation: u32,
    control: bool,
) {
    let tkey = key.template_key(svc.id, svc.persist_prefix as u32);
    if let Some(t) = K::templates().get_ptr_mut(&tkey) {
        let controlled_ptr = unsafe { &raw mut (*t).controlled };
        let controlled = unsafe { core::ptr::read_volatile(controlled_ptr) };
        if controlled != DEAD {
            let tpl = unsafe { &mut *t };
            tpl.backend = index;
            tpl.generation = generation;
            tpl.last_used = now;
            tpl.timeout = svc.persist_timeout;
            if control {
                add(controlled_ptr, 1);
            }
            return;
        }
    }
    let w: [u32; 6] = [
        index,
        generation,
        now,
        svc.persist_timeout,
        control as u32,
        0,
    ];
    // SAFETY: six plain u32 words.
    let tpl: Template = unsafe { core::mem::transmute(w) };
    let _ = K::templates().insert(&tkey, &tpl, 0);
}

/// A connection recorded under a template did not make it into the table after all.
#[inline(always)]
pub fn uncontrol<K: FlowKey>(key: &K, svc: &Service, now: u32) {
    release::<K>(key, svc.id, marker(svc), now);
}

/// A controlled connection ended (its entry was retired).
#[inline(always)]
pub fn retired<K: FlowKey>(key: &K, flow: &Flow, now: u32) {
    if flow.template != 0 {
        release::<K>(key, flow.service_id, flow.template, now);
    }
}

#[inline(always)]
fn release<K: FlowKey>(key: &K, service_id: u32, marker: u32, now: u32) {
    let tkey = key.template_key(service_id, marker.wrapping_sub(1));
    let Some(t) = K::templates().get_ptr_mut(&tkey) else {
        return;
    };
    let controlled_ptr = unsafe { &raw mut (*t).controlled };
    let before = add(controlled_ptr, u32::MAX);
    if before == 0 || before == DEAD {
        // A template that was replaced since (it starts from zero) or is being deleted:
        // undo.
        add(controlled_ptr, 1);
        return;
    }
    if before == 1 {
        // Its last connection is gone: it lives on for at most REARM more.
        let tpl = unsafe { &mut *t };
        let keep = if persist::REARM < tpl.timeout {
            persist::REARM
        } else {
            tpl.timeout
        };
        let start = tpl.timeout - keep;
        if now.wrapping_sub(tpl.last_used) > start {
            tpl.last_used = now.wrapping_sub(start);
        }
    }
}
