//! The connection tables (layout, and why they are not kernel hashes, in
//! `lb_common::conntable`): finding a key's entry, inserting a new connection's, clearing a
//! retired one's way. Whose an entry is and its count are `acct`'s business (the swap of
//! `Flow::status`); a way word only says where a key is.
//!
//! Who writes a way word: an insert claims a free way by a compare-and-swap, or a way whose
//! connection it retired itself (only a retirement's owner clears or takes over a way); the
//! packet path sets and clears the established hint with atomic or/and.

use core::intrinsics::{AtomicOrdering, atomic_and, atomic_or, atomic_xchg};

use lb_common::{
    FLOW_DEAD, Flow, FlowKeyV4, FlowKeyV6,
    conntable::{self, FlowBucket, FlowEntry, WAYS, way},
    reason,
    tcp::state,
};

use crate::{
    acct,
    flow::FlowKey,
    maps::{FLOW_POOL, WAY_SCRATCH},
    stats,
};

/// `find`'s answer when the key has no entry.
pub const NONE: u64 = u64::MAX;

/// A key's entry and its slot (`bucket * WAYS + way`).
pub struct Found<K> {
    pub entry: *mut FlowEntry<K>,
    pub slot: u32,
}

impl<K> Found<K> {
    #[inline(always)]
    pub fn flow(&self) -> *mut Flow {
        unsafe { &raw mut (*self.entry).flow }
    }
}

/// `insert`'s answers: the new entry's slot (below 2^32), or one of these.
/// The key has an entry already.
pub const EXISTS: u64 = 1 << 32;
/// No way to be had: no free one (or no pool entry to fill it) and the bucket's oldest
/// recyclable candidate could not be recycled.
pub const FULL: u64 = 2 << 32;
/// Another insert of a key with the same tag is under way in the bucket (rare): not
/// inserted, so that a key never has two entries.
pub const BUSY: u64 = 3 << 32;

/// The slot of an entry `insert` made.
#[inline(always)]
pub fn inserted(answer: u64) -> Option<u32> {
    (answer >> 32 == 0).then_some(answer as u32)
}

/// Where a key goes: its bucket and its tag (and, from them, the buckets it spills to).
struct Place {
    bucket: u32,
    tag: u32,
    mask: u64,
}

impl Place {
    /// Only needed once the key's bucket is full or spilled: not computed for every lookup.
    #[inline(always)]
    fn alternates(&self) -> [u32; 2] {
        conntable::alternates(self.bucket, self.tag, self.mask)
    }
}

#[inline(always)]
fn place<K: FlowKey>(key: &K) -> Option<Place> {
    let pool = FLOW_POOL.get(K::INDEX as u32)?;
    let h = hash(key, pool.seed, pool.bucket_mask);
    Some(Place {
        bucket: h as u32,
        tag: (h >> 32) as u32,
        mask: pool.bucket_mask,
    })
}

/// The key's bucket index (low half) and tag (high half). Functions of their own (this and
/// `differ`) keep the IPv6 key's ten words out of their callers' stack frames, whose sum
/// along a call chain the verifier holds to 512 bytes.
#[inline(never)]
fn hash<K: FlowKey>(key: &K, seed: u64, mask: u64) -> u64 {
    let h = conntable::key_hash(key, seed);
    conntable::bucket(h, mask) as u64 | (conntable::tag(h) as u64) << 32
}

/// Whether bucket `bi` ever sent a key to its alternates.
#[inline(always)]
fn spilled<K: FlowKey>(bi: u32) -> bool {
    K::spilled()
        .get_ptr(bi / 64)
        .is_some_and(|w| unsafe { core::ptr::read_volatile(w) } & 1 << (bi % 64) != 0)
}

/// Marks bucket `bi` as spilled (before the key goes to an alternate, so that a lookup that
/// misses it in `bi` looks there). Never cleared: a stale bit costs a miss in that
/// bucket one more line.
#[inline(always)]
fn spill<K: FlowKey>(bi: u32) {
    if let Some(w) = K::spilled().get_ptr_mut(bi / 64) {
        unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(w, 1 << (bi % 64)) };
    }
}

/// The entry of `key`, if the table has one.
#[inline(always)]
pub fn get<K: FlowKey>(key: &K) -> Option<Found<K>> {
    let slot = K::find(key);
    if slot == NONE {
        return None;
    }
    let entry = K::entries().get_ptr_mut(slot as u32)?;
    Some(Found {
        entry,
        slot: slot as u32,
    })
}

// The lookups and inserts proper are *global* BPF functions (exported by the linker, as
// `sched::xlb_pick`): the verifier checks each once, on its own, instead of once per path of
// every program that reaches it, and each answers with a plain number. Global functions
// cannot be generic: one per family (and for inserts, with and without recycling, which
// the new-flow programs' stack cannot afford).

/// A global lookup: `$name(key)` is `find` for keys of type `$key`.
macro_rules! global_find {
    ($name:ident, $key:ty) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(key: *const $key) -> u64 {
            match unsafe { key.as_ref() } {
                Some(key) => find(key),
                None => NONE,
            }
        }
    };
}

/// A global insert: `$name(key, flow, now, pooled)` is `insert_in::<$key, $recycle>`
/// (`pooled` non-zero if the caller holds a pool entry).
macro_rules! global_insert {
    ($name:ident, $key:ty, $recycle:literal) => {
        #[unsafe(no_mangle)]
        #[inline(never)]
        pub extern "C" fn $name(key: *const $key, flow: *const Flow, now: u32, pooled: u32) -> u64 {
            match unsafe { (key.as_ref(), flow.as_ref()) } {
                (Some(key), Some(flow)) => insert_in::<$key, $recycle>(key, flow, now, pooled != 0),
                _ => FULL,
            }
        }
    };
}

global_find!(xlb_find_v4, FlowKeyV4);
global_find!(xlb_find_v6, FlowKeyV6);
// Without recycling, and with (a way of the key's buckets may be taken over).
global_insert!(xlb_insert_v4, FlowKeyV4, false);
global_insert!(xlb_insert_v6, FlowKeyV6, false);
global_insert!(xlb_admit_v4, FlowKeyV4, true);
global_insert!(xlb_admit_v6, FlowKeyV6, true);

/// Inserts the entry of a new connection (see `insert_in`).
#[inline(always)]
pub fn insert<K: FlowKey, const RECYCLE: bool>(
    key: &K,
    flow: &Flow,
    now: u32,
    pooled: bool,
) -> u64 {
    K::insert_entry::<RECYCLE>(key, flow, now, pooled)
}

/// The slot of `key`, or `NONE`: in its bucket, or if that one spilled, in its alternates.
#[inline(always)]
fn find<K: FlowKey>(key: &K) -> u64 {
    let Some(p) = place(key) else {
        return NONE;
    };
    let slot = find_in::<K>(p.bucket, p.tag, key);
    if slot != NONE || !spilled::<K>(p.bucket) {
        return slot;
    }
    let [alt, alt2] = p.alternates();
    let slot = find_in::<K>(alt, p.tag, key);
    if slot != NONE {
        return slot;
    }
    find_in::<K>(alt2, p.tag, key)
}

#[inline(always)]
fn find_in<K: FlowKey>(bi: u32, tag: u32, key: &K) -> u64 {
    let Some(b) = K::buckets().get_ptr(bi) else {
        return NONE;
    };
    let base = bi.wrapping_mul(WAYS as u32);
    for w in 0..WAYS {
        let word = unsafe { core::ptr::read_volatile(&raw const (*b).ways[w]) };
        if word & (way::TAG | way::CLAIMED) == tag {
            let slot = base + w as u32;
            if let Some(e) = K::entries().get_ptr(slot)
                && same(unsafe { &(*e).key }, key)
            {
                return slot as u64;
            }
        }
    }
    NONE
}

/// `claim`'s answers besides a slot.
const NO_WAY: u32 = u32::MAX;
const RACED: u32 = u32::MAX - 1;

/// Scratch words (`WAY_SCRATCH`): the best candidate of `oldest` and its age + 1, a chosen
/// slot (`opaque`).
const BEST: usize = 0;
const BEST_AGE: usize = 1;
const OPAQUE: usize = 2;

/// Inserts the entry of a new connection. `pooled`: the caller holds a pool entry for it; a
/// free way of the key's bucket takes it, or if that bucket is full, one of its alternates
/// (the bucket is marked as spilled). Without a pool entry (the pool is empty), or if all
/// three are full, the oldest recyclable connection of the key's bucket (not established; a
/// UDP one only once idle), or with a pool entry of an alternate, gives its way: retired
/// here and counted as recycled (the
/// caller's pool entry, if any, then goes back into the CPU's hand); with `RECYCLE` false
/// (callers whose stack cannot hold `take_over`'s frame on top of theirs) the answer is then
/// `FULL`. On any answer but `INSERTED` the caller still holds what it held (and a
/// connection recycled on the way left its entry in the CPU's hand).
///
/// The key is looked for first, in the same pass over the bucket: a retransmitted SYN whose
/// embryonic entry is the bucket's oldest finds it (`EXISTS`) rather than recycling it.
#[inline(always)]
fn insert_in<K: FlowKey, const RECYCLE: bool>(key: &K, flow: &Flow, now: u32, pooled: bool) -> u64 {
    let Some(p) = place(key) else {
        return FULL;
    };
    let alt = p.alternates();
    // Each loop below either goes on or leaves: the verifier follows one path per way, where
    // a loop carrying "the best so far" in registers would make it follow every combination
    // (what must be carried goes through the scratch map, which it does not follow).
    let r = look::<K>(p.bucket, p.tag, key);
    if r != 0 {
        return r;
    }
    let was_spilled = spilled::<K>(p.bucket);
    if was_spilled {
        let r = look::<K>(alt[0], p.tag, key) | look::<K>(alt[1], p.tag, key);
        if r != 0 {
            return if r & BUSY == BUSY { BUSY } else { EXISTS };
        }
    }
    let mut slot = NO_WAY;
    if pooled {
        slot = claim::<K>(p.bucket, p.tag);
        if slot == NO_WAY {
            spill::<K>(p.bucket);
            if !was_spilled {
                let r = look::<K>(alt[0], p.tag, key) | look::<K>(alt[1], p.tag, key);
                if r != 0 {
                    return if r & BUSY == BUSY { BUSY } else { EXISTS };
                }
            }
            slot = claim::<K>(alt[0], p.tag);
            if slot == NO_WAY {
                slot = claim::<K>(alt[1], p.tag);
            }
        }
        if slot == RACED {
            return BUSY;
        }
    }
    // No pool entry, or (rarely) all three buckets full: a connection of the key's bucket
    // that may be recycled gives its way, or with a pool entry, one of the alternates'.
    let recycled = slot == NO_WAY;
    if recycled {
        if !RECYCLE {
            return FULL;
        }
        slot = recycle::<K>(p.bucket, p.tag, now);
        if slot == NO_WAY && pooled {
            spill::<K>(p.bucket);
            slot = recycle::<K>(alt[0], p.tag, now);
            if slot == NO_WAY {
                slot = recycle::<K>(alt[1], p.tag, now);
            }
        }
        if slot == NO_WAY {
            return FULL;
        }
    }
    // Through memory, so that the verifier goes on with one state, not one per way.
    let slot = opaque(slot);
    let (bi, w) = (slot / WAYS as u32, slot as usize % WAYS);
    let Some(b) = K::buckets().get_ptr_mut(bi) else {
        return FULL;
    };
    let word = unsafe { &raw mut (*b).ways[w] };
    // Two inserts of one key may have claimed a way each at the same moment: whoever sees
    // the other's claim, or its entry published since the first pass (at least one of them
    // does), backs off.
    if !settled::<K>(p.bucket, p.tag, key, slot)
        || spilled::<K>(p.bucket)
            && !(settled::<K>(alt[0], p.tag, key, slot) && settled::<K>(alt[1], p.tag, key, slot))
    {
        release::<K>(word, recycled);
        return BUSY;
    }
    let Some(e) = K::entries().get_ptr_mut(slot) else {
        release::<K>(word, recycled);
        return FULL;
    };
    // Written and published retired: nobody recycles, reaps or changes it until the caller,
    // having counted it, `activate`s it. (The entry's status is retired already - a way is
    // free or taken over only once its connection was - and never reads live meanwhile, so
    // a recycler holding a stale view of the way cannot retire it either.)
    unsafe {
        let f = &raw mut (*e).flow;
        core::ptr::write_volatile(&raw mut (*f).status, flow.status | FLOW_DEAD);
        copy_words(&raw mut (*e).key, key);
        core::ptr::write_volatile(&raw mut (*f).backend, flow.backend);
        core::ptr::write_volatile(&raw mut (*f).generation, flow.generation);
        core::ptr::write_volatile(&raw mut (*f).service_id, flow.service_id);
        core::ptr::write_volatile(&raw mut (*f).last_seen, flow.last_seen);
        core::ptr::write_volatile(&raw mut (*f).template, flow.template);
        // The full barrier of the exchange publishes the entry's words before the tag.
        atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(
            word,
            way::live(p.tag, now, flow.status as u8 == state::ESTABLISHED),
        );
    }
    if recycled && pooled {
        // The recycled connection's entry serves; the caller's goes back into its hand.
        acct::untake_entry(K::FAMILY);
    }
    slot as u64
}

// `insert_in` writes a flow field by field (its status never live): it must name them all.
const _: () = assert!(
    core::mem::size_of::<Flow>() == 24,
    "Flow changed: update insert_in"
);

/// Puts the entry `insert` made at `slot` into service with `status` (after the caller
/// counted it): from here on its packets, the reaper and recycling may change it.
#[inline(always)]
pub fn activate<K: FlowKey>(slot: u32, status: u32, now: u32) {
    if let Some(e) = K::entries().get_ptr_mut(slot) {
        unsafe {
            core::ptr::write_volatile(&raw mut (*e).flow.last_seen, now);
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(&raw mut (*e).flow.status, status);
        }
    }
}

/// The flow of the entry at `slot` (one `insert` made, not yet activated).
#[inline(always)]
pub fn flow_at<K: FlowKey>(slot: u32) -> Option<*mut Flow> {
    K::entries()
        .get_ptr_mut(slot)
        .map(|e| unsafe { &raw mut (*e).flow })
}

/// The first pass over bucket `bi`: `EXISTS` (the key is there), `BUSY` (a claim of its tag
/// is under way) or 0.
#[inline(always)]
fn look<K: FlowKey>(bi: u32, tag: u32, key: &K) -> u64 {
    let Some(b) = K::buckets().get_ptr(bi) else {
        return 0;
    };
    let base = bi.wrapping_mul(WAYS as u32);
    for w in 0..WAYS {
        let word = unsafe { core::ptr::read_volatile(&raw const (*b).ways[w]) };
        if word & way::TAG == tag {
            if word & way::CLAIMED != 0 {
                return BUSY;
            }
            if let Some(e) = K::entries().get_ptr(base + w as u32)
                && same(unsafe { &(*e).key }, key)
            {
                return EXISTS;
            }
        }
    }
    0
}

/// Claims the first free way of bucket `bi` for `tag`: its slot, `NO_WAY` if the bucket is
/// full, `RACED` if another insert took the way first.
#[inline(always)]
fn claim<K: FlowKey>(bi: u32, tag: u32) -> u32 {
    let Some(b) = K::buckets().get_ptr_mut(bi) else {
        return NO_WAY;
    };
    for w in 0..WAYS {
        let word = unsafe { core::ptr::read_volatile(&raw const (*b).ways[w]) };
        if word & way::TAG == 0 {
            if !acct::cas(unsafe { &raw mut (*b).ways[w] }, word, way::CLAIMED | tag) {
                return RACED;
            }
            return bi.wrapping_mul(WAYS as u32) + w as u32;
        }
    }
    NO_WAY
}

/// Whether bucket `bi` holds no other claim of `tag` and no other entry of `key` than the
/// one at `own` (the slot this insert claimed).
#[inline(always)]
fn settled<K: FlowKey>(bi: u32, tag: u32, key: &K, own: u32) -> bool {
    let Some(b) = K::buckets().get_ptr(bi) else {
        return false;
    };
    let base = bi.wrapping_mul(WAYS as u32);
    for o in 0..WAYS {
        let slot = base + o as u32;
        let other = unsafe { core::ptr::read_volatile(&raw const (*b).ways[o]) };
        if other & way::TAG != tag || slot == own {
            continue;
        }
        if other & way::CLAIMED != 0
            || K::entries()
                .get_ptr(slot)
                .is_some_and(|e| same(unsafe { &(*e).key }, key))
        {
            return false;
        }
    }
    true
}

/// Takes over the way of bucket `bi`'s oldest connection that may be recycled, for `tag`:
/// its slot, or `NO_WAY`.
#[inline(always)]
fn recycle<K: FlowKey>(bi: u32, tag: u32, now: u32) -> u32 {
    let Some(b) = K::buckets().get_ptr_mut(bi) else {
        return NO_WAY;
    };
    let base = bi.wrapping_mul(WAYS as u32);
    let victim = oldest::<K>(b, now);
    if victim >= WAYS as u32 || !take_over::<K>(b, base, victim as usize, tag, now) {
        return NO_WAY;
    }
    base + victim
}

/// `v`, unknown to the verifier (written to and read back from a per-CPU map value).
#[inline(always)]
fn opaque(v: u32) -> u32 {
    let Some(p) = WAY_SCRATCH.get_ptr_mut(0) else {
        return v;
    };
    let p = unsafe { (p as *mut u32).add(OPAQUE) };
    unsafe {
        core::ptr::write_volatile(p, v);
        core::ptr::read_volatile(p)
    }
}

/// The bucket's oldest way that may be recycled (in use, not being written, not hinted
/// established), or `WAYS` if none. The best so far lives in a per-CPU map value, which the
/// verifier does not track: with it in registers it would follow every combination of the
/// 16 comparisons.
#[inline(always)]
fn oldest<K: FlowKey>(b: *const FlowBucket, now: u32) -> u32 {
    let Some(best) = WAY_SCRATCH.get_ptr_mut(0) else {
        return WAYS as u32;
    };
    let age_of_best = unsafe { (best as *mut u32).add(BEST_AGE) };
    let best = unsafe { (best as *mut u32).add(BEST) };
    // The age + 1 (0: none yet).
    unsafe {
        core::ptr::write_volatile(best, WAYS as u32);
        core::ptr::write_volatile(age_of_best, 0);
    }
    for w in 0..WAYS {
        let word = unsafe { core::ptr::read_volatile(&raw const (*b).ways[w]) };
        if word & way::TAG == 0 || word & (way::CLAIMED | way::ESTABLISHED) != 0 {
            continue;
        }
        let age = way::age(word, now) + 1;
        if age > unsafe { core::ptr::read_volatile(age_of_best) } {
            unsafe {
                core::ptr::write_volatile(best, w as u32);
                core::ptr::write_volatile(age_of_best, age);
            }
        }
    }
    unsafe { core::ptr::read_volatile(best) }
}

/// Backs out of a claimed way: frees it, and if it was a recycled connection's, that
/// connection's entry goes into the CPU's hand (the caller's own pool entry, if any, is
/// still the caller's).
#[inline(always)]
fn release<K: FlowKey>(word: *mut u32, recycled: bool) {
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(word, 0) };
    if recycled {
        acct::untake_entry(K::FAMILY);
    }
}

/// Retires the connection of way `w` if it may be recycled, and claims its way for `tag`.
/// A function of its own: its frame (persistence and NAT upkeep) stays off the insert's,
/// within the 512 bytes of stack of the new-flow programs' call chains.
#[inline(never)]
fn take_over<K: FlowKey>(b: *mut FlowBucket, base: u32, w: usize, tag: u32, now: u32) -> bool {
    let w = w & (WAYS - 1);
    let Some(e) = K::entries().get_ptr_mut(base + w as u32) else {
        return false;
    };
    let status_ptr = unsafe { &raw mut (*e).flow.status };
    let status = unsafe { core::ptr::read_volatile(status_ptr) };
    if status & FLOW_DEAD != 0 {
        // Being retired by someone else, who clears the way.
        return false;
    }
    let st = status as u8;
    let idle = now.wrapping_sub(unsafe { (*e).flow.last_seen });
    if !lb_common::recyclable(st, idle) {
        if st == state::ESTABLISHED {
            // The hint was missing: the next new connection of this bucket skips it.
            mark_slot::<K>(base + w as u32, true);
        }
        return false;
    }
    if !acct::retire(status_ptr, status, unsafe { (*e).flow.backend }) {
        return false;
    }
    unsafe {
        crate::flow::let_go(&(*e).key, &(*e).flow, now);
        // The way is ours now: nobody else clears or claims a way whose word is set.
        atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(&raw mut (*b).ways[w], way::CLAIMED | tag);
    }
    stats::count(reason::EV_FLOW_RECYCLED);
    true
}

/// Frees the way of `key`, whose connection this caller retired. By key rather than by a
/// slot kept from the lookup: the bucket is in cache by then, and a slot held across the
/// packet path would cost the new-flow programs stack they do not have.
#[inline(always)]
pub fn clear<K: FlowKey>(key: &K) {
    let slot = K::find(key);
    if slot != NONE {
        clear_slot::<K>(slot as u32);
    }
}

/// Frees the way of `slot`, whose connection this caller retired.
#[inline(always)]
pub fn clear_slot<K: FlowKey>(slot: u32) {
    if let Some(b) = K::buckets().get_ptr_mut(slot / WAYS as u32) {
        unsafe {
            atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(
                &raw mut (*b).ways[slot as usize % WAYS],
                0,
            )
        };
    }
}

/// Sets or clears the established hint of `key`'s way (after its connection changed state).
#[inline(always)]
pub fn mark<K: FlowKey>(key: &K, established: bool) {
    let slot = K::find(key);
    if slot != NONE {
        mark_slot::<K>(slot as u32, established);
    }
}

#[inline(always)]
fn mark_slot<K: FlowKey>(slot: u32, established: bool) {
    if let Some(b) = K::buckets().get_ptr_mut(slot / WAYS as u32) {
        let word = unsafe { &raw mut (*b).ways[slot as usize % WAYS] };
        unsafe {
            if established {
                atomic_or::<u32, u32, { AtomicOrdering::Relaxed }>(word, way::ESTABLISHED);
            } else {
                atomic_and::<u32, u32, { AtomicOrdering::Relaxed }>(word, !way::ESTABLISHED);
            }
        }
    }
}

/// Whether two keys are equal, word by word (a derived comparison of the IPv6 key would
/// become a call to `memcmp`).
#[inline(always)]
fn same<K>(a: &K, b: &K) -> bool {
    differ(a, b) == 0
}

#[inline(never)]
fn differ<K>(a: &K, b: &K) -> u64 {
    let a = a as *const K as *const u32;
    let b = b as *const K as *const u32;
    let mut diff = 0;
    for w in 0..core::mem::size_of::<K>() / 4 {
        diff |= unsafe { core::ptr::read_volatile(a.add(w)) ^ core::ptr::read_volatile(b.add(w)) };
    }
    diff as u64
}

/// Copies a value word by word (a struct copy would become a call to `memcpy`).
#[inline(always)]
pub fn copy_words<T>(dst: *mut T, src: &T) {
    let d = dst as *mut u32;
    let s = src as *const T as *const u32;
    for w in 0..core::mem::size_of::<T>() / 4 {
        unsafe { core::ptr::write_volatile(d.add(w), core::ptr::read_volatile(s.add(w))) };
    }
}
