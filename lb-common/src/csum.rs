//! Internet checksum arithmetic (RFC 1071) with incremental updates (RFC 1624).
//!
//! The one's-complement sum is byte-order independent: summing byte-swapped words gives the
//! byte-swapped sum. So every function here works on 16/32-bit words loaded from the packet
//! with native loads (no swapping), as long as the checksum field is loaded the same way. The
//! data plane uses them on raw packet words; the tests check them against full recomputation.

/// Folds a 32-bit one's-complement accumulator to 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The two 16-bit halves of a 32-bit word as loaded from the packet, for a one's-complement
/// accumulator (headers built or summed word by word).
#[inline(always)]
pub fn words(w: u32) -> u32 {
    (w & 0xffff) + (w >> 16)
}

/// RFC 1624 eqn. 3: the checksum `check` after one 16-bit word of the covered data changes from
/// `old` to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    !fold(sum)
}

/// Like [`replace16`] for a 32-bit word (an IPv4 address, two adjacent ports).
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = (!check as u32) + ((!old) & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// New IPv4 header checksum after the TTL byte dropped by one. `ttl_proto_old` is the raw
/// 16-bit word at header offset 8 (TTL, protocol) before the change.
#[inline(always)]
pub fn ipv4_ttl_decrement(check: u16, ttl_proto_old: u16) -> u16 {
    let [ttl, proto] = ttl_proto_old.to_ne_bytes();
    let new = u16::from_ne_bytes([ttl.wrapping_sub(1), proto]);
    replace16(check, ttl_proto_old, new)
}

/// Full checksum of a byte slice (for tests and for headers built in userspace).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_be_bytes([*last, 0]) as u32;
    }
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ttl: u8, id: u16, options: &[u8]) -> [u8; 60] {
        let mut h = [0u8; 60];
        let ihl = 5 + options.len() / 4;
        h[0] = 0x40 | ihl as u8;
        h[2..4].copy_from_slice(&(40u16 + options.len() as u16).to_be_bytes());
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6] = 0x40;
        h[8] = ttl;
        h[9] = 6;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[192, 168, 56, 10]);
        h[20..20 + options.len()].copy_from_slice(options);
        let c = checksum(&h[..ihl * 4]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// The incremental TTL update must equal a full recomputation for every TTL and many
    /// header contents, including those whose checksum is 0x0000/0xffff after the change.
    #[test]
    fn ttl_decrement_matches_full_recompute() {
        let opts: [&[u8]; 2] = [&[], &[0x94, 0x04, 0, 0]];
        for o in opts {
            let ihl = 20 + o.len();
            for ttl in 2..=255u8 {
                for id in (0..=u16::MAX).step_by(251) {
                    let mut h = header(ttl, id, o);
                    let check = u16::from_ne_bytes([h[10], h[11]]);
                    let old = u16::from_ne_bytes([h[8], h[9]]);
                    h[8] -= 1;
                    let inc = ipv4_ttl_decrement(check, old).to_ne_bytes();
                    h[10] = 0;
                    h[11] = 0;
                    let full = checksum(&h[..ihl]).to_be_bytes();
                    assert_eq!(inc, full, "ttl {ttl} id {id}");
                    // and the header verifies
                    h[10..12].copy_from_slice(&inc);
                    assert_eq!(checksum(&h[..ihl]), 0);
                }
            }
        }
    }

    #[test]
    fn replace32_matches_full_recompute() {
        let mut h = header(64, 0x1234, &[]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let old = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
        let new_addr = [172u8, 16, 3, 200];
        let new = u32::from_ne_bytes(new_addr);
        h[16..20].copy_from_slice(&new_addr);
        let inc = replace32(check, old, new).to_ne_bytes();
        h[10] = 0;
        h[11] = 0;
        assert_eq!(inc, checksum(&h[..20]).to_be_bytes());
    }

    #[test]
    fn checksum_matches_etherparse() {
        let mut ip = etherparse::Ipv4Header::new(
            100,
            17,
            etherparse::IpNumber::TCP,
            [10, 1, 2, 3],
            [4, 5, 6, 7],
        )
        .unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let bytes = ip.to_bytes();
        assert_eq!(checksum(&bytes), 0);
        assert_eq!(ip.calc_header_checksum(), {
            let mut b = bytes.to_vec();
            b[10] = 0;
            b[11] = 0;
            checksum(&b)
        });
    }
}
