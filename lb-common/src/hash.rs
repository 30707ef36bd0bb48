//! The hash functions of IPVS's hashing schedulers, so that sh, dh and mh map clients to the
//! same real servers as the kernel does (and the same on every node for the same config).
//! Used by the data plane on packets and by the controller to build tables; tested against
//! the vectors of `ipvs_model.py`.

/// `GOLDEN_RATIO_32` of `include/linux/hash.h`.
pub const GOLDEN_RATIO_32: u32 = 0x61c8_8647;

/// `hash_32(val, bits)`.
#[inline(always)]
pub fn hash_32(val: u32, bits: u32) -> u32 {
    val.wrapping_mul(GOLDEN_RATIO_32) >> (32 - bits)
}

/// An address as IPVS hashes it: IPv6 folded by XOR of its four words; host byte order.
/// `words` are stored as on the wire (IPv4 in `words[0]`, the rest zero).
#[inline(always)]
pub fn fold(words: [u32; 4]) -> u32 {
    u32::from_be(words[0] ^ words[1] ^ words[2] ^ words[3])
}

/// Buckets of the sh and dh tables (`CONFIG_IP_VS_SH_TAB_BITS`/`DH_TAB_BITS` = 8).
pub const SH_DH_BITS: u32 = 8;
pub const SH_DH_SIZE: u32 = 1 << SH_DH_BITS;

/// `ip_vs_sh_hashkey()`: bucket of a source address (and port, with `sh-port`) at `offset`.
/// `addr` and `port` in host order; `port` 0 without `sh-port`.
#[inline(always)]
pub fn sh_bucket(addr: u32, port: u16, offset: u32) -> u32 {
    offset.wrapping_add(hash_32((port as u32).wrapping_add(addr), SH_DH_BITS)) & (SH_DH_SIZE - 1)
}

/// `ip_vs_dh_hashkey()`: bucket of a destination address (host order).
#[inline(always)]
pub fn dh_bucket(addr: u32) -> u32 {
    hash_32(addr, SH_DH_BITS)
}

/// The table sizes IPVS's mh can be built with (`CONFIG_IP_VS_MH_TAB_INDEX` 8..17); 4093 is
/// the kernel default.
pub const MH_PRIMES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
];
pub const MH_DEFAULT_SIZE: u32 = 4093;

/// The fixed hsiphash keys of `ip_vs_mh.c` (`generate_hash_secret()`): the same tables on every
/// director.
pub const MH_KEY1: (u64, u64) = (2_654_435_761, 2_654_435_761);
pub const MH_KEY2: (u64, u64) = (2_654_446_892, 2_654_446_892);

/// The kernel's `hsiphash()` of one u32 on 64-bit machines: SipHash-1-3 of the value's four
/// bytes in little-endian order, the 64-bit result truncated to 32 bits.
#[inline(always)]
pub fn hsiphash_u32(value: u32, key: (u64, u64)) -> u32 {
    let (k0, k1) = key;
    let mut v0 = 0x736f_6d65_7073_6575u64 ^ k0;
    let mut v1 = 0x646f_7261_6e64_6f6du64 ^ k1;
    let mut v2 = 0x6c79_6765_6e65_7261u64 ^ k0;
    let mut v3 = 0x7465_6462_7974_6573u64 ^ k1;
    // One partial block: the message length (4) in the top byte, the bytes below.
    let b = (4u64 << 56) | value.to_le() as u64;
    macro_rules! round {
        () => {
            v0 = v0.wrapping_add(v1);
            v1 = v1.rotate_left(13);
            v1 ^= v0;
            v0 = v0.rotate_left(32);
            v2 = v2.wrapping_add(v3);
            v3 = v3.rotate_left(16);
            v3 ^= v2;
            v0 = v0.wrapping_add(v3);
            v3 = v3.rotate_left(21);
            v3 ^= v0;
            v2 = v2.wrapping_add(v1);
            v1 = v1.rotate_left(17);
            v1 ^= v2;
            v2 = v2.rotate_left(32);
        };
    }
    v3 ^= b;
    round!();
    v0 ^= b;
    v2 ^= 0xff;
    round!();
    round!();
    round!();
    (v0 ^ v1 ^ v2 ^ v3) as u32
}

/// `ip_vs_mh_hashkey()`: hash of an address and port (host order) at `offset`.
#[inline(always)]
pub fn mh_hash(addr: u32, port: u16, key: (u64, u64), offset: u32) -> u32 {
    hsiphash_u32(offset.wrapping_add(port as u32).wrapping_add(addr), key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> u32 {
        u32::from_be_bytes(a)
    }

    /// Vectors printed by `ipvs_model.py` (`ipvs.md` §2.13, §2.14).
    #[test]
    fn ipvs_model_vectors() {
        assert_eq!(sh_bucket(v4([10, 0, 0, 1]), 0, 0), 39);
        assert_eq!(sh_bucket(v4([192, 168, 1, 100]), 0, 0), 89);
        assert_eq!(sh_bucket(v4([203, 0, 113, 7]), 0, 0), 124);
        assert_eq!(sh_bucket(v4([10, 0, 0, 1]), 12345, 0), 134);
        assert_eq!(sh_bucket(v4([192, 168, 1, 100]), 12345, 0), 184);
        assert_eq!(sh_bucket(v4([203, 0, 113, 7]), 12345, 0), 219);
        assert_eq!(hsiphash_u32(0, MH_KEY1), 0x1d5a_77c2);
        assert_eq!(hsiphash_u32(0, MH_KEY2), 0xf882_433f);
        assert_eq!(hsiphash_u32(0x0a00_0001, MH_KEY1), 0x0308_0ce4);
        // Permutation of 192.168.1.12:80 in a 4093-slot table: offset 3773, skip 149.
        let a = v4([192, 168, 1, 12]);
        assert_eq!(mh_hash(a, 80, MH_KEY1, 0) % 4093, 3773);
        assert_eq!(mh_hash(a, 80, MH_KEY2, 0) % 4092 + 1, 149);
    }

    #[test]
    fn fold_is_host_order_xor() {
        let w = |a: [u8; 4]| u32::from_ne_bytes(a);
        assert_eq!(fold([w([10, 0, 0, 1]), 0, 0, 0]), 0x0a00_0001);
        assert_eq!(
            fold([w([0x20, 1, 0xd, 0xb8]), 0, 0, w([0, 0, 0, 1])]),
            0x2001_0db8 ^ 1
        );
    }
}
