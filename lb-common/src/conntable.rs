//! The connection tables' layout: a set-associative table of xlb's own, shared by the data
//! plane (which finds, inserts and retires entries) and the controller (which lists and looks
//! them up).
//!
//! Why not a kernel hash map: a new connection into a full table must take over an old
//! connection's entry (the counts are exact, nothing may evict behind xlb's back), and on a
//! kernel hash that is a delete in the victim's bucket and an insert in the new key's, four
//! random memory accesses and two bucket locks - more than the kernel's own evicting LRU
//! insert. Here a key's bucket is one cache line of [`WAYS`] way words; the entry of way `w`
//! of bucket `b` (its key and flow) is element `b * WAYS + w` of an array. A lookup reads the
//! line and, on a tag match, the entry; a new connection into a full table takes over the
//! oldest recyclable way of its own bucket (as conntrack's early drop looks in the new
//! tuple's bucket): one line and one entry.
//!
//! A bucket that is full sends a new key to one of two alternate buckets ([`alternates`])
//! and is marked as spilled, so lookups of its keys look there too; at most half full, that
//! is rare.
//!
//! A way word: the key's 16-bit tag (15 bits of its hash, the low bit set; 0: the way is free), [`way::CLAIMED`] while an insert
//! writes the entry (lookups skip it), [`way::ESTABLISHED`] as a hint for the choice of a
//! victim, and the low bits of the tick the connection was created in (oldest first).

use crate::Flow;

/// Ways per bucket: one cache line of 32-bit words.
pub const WAYS: usize = 16;

/// One bucket: the words of its ways.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket {
    pub ways: [u32; WAYS],
}

/// An entry: the connection's key and its flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry<K> {
    pub key: K,
    pub flow: Flow,
}

/// The bits of a way word.
pub mod way {
    /// The key's tag; 0 when the way is free.
    pub const TAG: u32 = 0xffff;
    /// An insert is writing the entry: lookups skip the way, other inserts leave it alone.
    pub const CLAIMED: u32 = 1 << 16;
    /// The connection was established when last seen changing state: not worth looking at
    /// for recycling (a hint; the entry's status decides).
    pub const ESTABLISHED: u32 = 1 << 17;
    /// The low bits of the tick the connection was created in (14 bits of 16.8 ms ticks:
    /// ages compare right up to 4.6 minutes; an older connection may look young, which only
    /// spares it longer).
    pub const BORN_SHIFT: u32 = 18;
    pub const BORN_MASK: u32 = 0x3fff;

    /// The word of a published entry.
    #[inline(always)]
    pub fn live(tag: u32, born: u32, established: bool) -> u32 {
        tag | (born & BORN_MASK) << BORN_SHIFT | if established { ESTABLISHED } else { 0 }
    }

    /// Ticks since the way's connection was created (modulo the field).
    #[inline(always)]
    pub fn age(word: u32, now: u32) -> u32 {
        now.wrapping_sub(word >> BORN_SHIFT) & BORN_MASK
    }
}

/// Slots (ways in all) of a table for `capacity` connections: twice as many, a power of two,
/// at least 16 buckets. At most half full, a bucket of 16 is full for about one key in 250
/// (Poisson, mean 8): such a key goes to one of its [`alternates`].
pub fn slots(capacity: u32) -> u32 {
    (capacity.max(1) as u64 * 2)
        .next_power_of_two()
        .clamp(WAYS as u64 * 16, 1 << 31) as u32
}

/// Buckets of a table of `slots`.
pub fn buckets(slots: u32) -> u32 {
    slots / WAYS as u32
}

/// The hash of a key (any `#[repr(C)]` key made of whole 32-bit words) under the table's
/// random seed: a multiply-xorshift per word and murmur3's finaliser. The low bits pick the
/// bucket, the top 16 the tag.
#[inline(always)]
pub fn key_hash<K>(key: &K, seed: u64) -> u64 {
    let words = key as *const K as *const u32;
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for i in 0..core::mem::size_of::<K>() / 4 {
        // SAFETY: `i` stays within the key, whose size is a multiple of 4.
        let w = unsafe { core::ptr::read_volatile(words.add(i)) };
        h = (h ^ w as u64).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 29;
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The tag of hash `h`: its top 15 bits, the low bit set (never 0).
#[inline(always)]
pub fn tag(h: u64) -> u32 {
    (h >> 48) as u32 | 1
}

/// The bucket of hash `h` in a table whose bucket count is `mask + 1`.
#[inline(always)]
pub fn bucket(h: u64, mask: u64) -> u32 {
    (h & mask) as u32
}

/// The buckets a key goes to when its own is full, in this order (`bucket` with `tag`, in a
/// table whose bucket count is `mask + 1`, at least 4): the key's own bucket is then marked
/// as spilled (one bit per bucket), so that a lookup that does not find a key there looks in
/// these too. Functions of the bucket and the tag only, so the controller finds them as the
/// data plane does; never the bucket itself nor each other (an odd and an even offset).
/// At most half full, a bucket is full for about one key in 250 and two given buckets for
/// one in 60,000: a third keeps a full bucket from refusing a key while the table has room.
#[inline(always)]
pub fn alternates(bucket: u32, tag: u32, mask: u64) -> [u32; 2] {
    let mask = mask as u32;
    let odd = (tag.wrapping_mul(0x9e37_79b1) >> 8) & mask | 1;
    let even = ((tag.wrapping_mul(0x85eb_ca6b) >> 8) & (mask >> 1) | 1) << 1;
    [bucket ^ odd, bucket ^ even]
}

/// Words of the spilled-bucket bitmap of a table of `slots`.
pub fn spill_words(slots: u32) -> u32 {
    buckets(slots).div_ceil(64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowKeyV4;

    #[test]
    fn sizes() {
        assert_eq!(core::mem::size_of::<FlowBucket>(), 64);
        assert_eq!(core::mem::size_of::<FlowEntry<FlowKeyV4>>(), 40);
        assert_eq!(core::mem::size_of::<FlowEntry<crate::FlowKeyV6>>(), 64);
        assert_eq!(slots(64), 256);
        assert_eq!(slots(1 << 20), 1 << 21);
        assert_eq!(slots(1_000_000), 1 << 21);
    }

    #[test]
    fn word_fields() {
        let w = way::live(0x1235, 0x4_0005, true);
        assert_eq!(w & way::TAG, 0x1235);
        assert_eq!(w & way::CLAIMED, 0);
        assert_ne!(w & way::ESTABLISHED, 0);
        assert_eq!(way::age(w, 0x4_0009), 4);
        assert_eq!(way::age(way::live(1, 0x3fff, false), 0x4000), 1);
    }

    /// Keys that differ in one address bit land all over the table, and tags spread.
    #[test]
    fn the_hash_spreads_sequential_keys() {
        let mask = (1u64 << 12) - 1;
        let mut hits = [0u32; 1 << 12];
        for i in 0..(1u32 << 16) {
            let k = FlowKeyV4::new(0xc000_0000 | i, 0x0a00_000a, 12345, 80, 6);
            hits[bucket(key_hash(&k, 42), mask) as usize] += 1;
        }
        // Mean 16 per bucket: none empty, none over three times the mean.
        assert!(hits.iter().all(|&n| (1..48).contains(&n)), "{hits:?}");
        let k = FlowKeyV4::new(1, 2, 3, 4, 6);
        assert_ne!(key_hash(&k, 1), key_hash(&k, 2), "the seed matters");
        assert_ne!(tag(0), 0);
    }

    #[test]
    fn the_alternates_are_other_buckets_of_the_table() {
        for mask in [15u64, 1023, (1 << 20) - 1] {
            for t in [1u32, 3, 0xffff, 0x1235] {
                for b in [0u32, 5, mask as u32] {
                    let [a1, a2] = alternates(b, t, mask);
                    assert!(a1 != b && a2 != b && a1 != a2, "{b} {a1} {a2}");
                    assert!(a1 as u64 <= mask && a2 as u64 <= mask);
                }
            }
        }
        assert_eq!(spill_words(256), 1);
        assert_eq!(spill_words(1 << 21), 2048);
    }
}
