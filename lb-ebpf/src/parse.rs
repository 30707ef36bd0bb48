//! Header parsing with verifier-friendly bounds checks.
//!
//! Every access goes through [`at`], which proves `offset + size_of::<T>() <= data_end` to the
//! verifier. Offsets that come from the packet (IHL, extension-header lengths) are masked to
//! small bounds first so the verifier can track them.

use aya_ebpf::programs::XdpContext;

pub use crate::access::at;
use crate::access::{ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, be16};
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, frag, reason};

const IPV6_HLEN: usize = 40;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// `parse`'s answer for an ICMP error (not a reason counter): `icmp::relay` decides whether
/// it is about a connection of a virtual service.
pub const TO_ICMP: u32 = u32::MAX - 2;
/// ... for a later IP fragment (no ports): `frag::relay` follows its datagram.
pub const TO_FRAGMENT: u32 = u32::MAX - 3;

/// What `parse_as` makes of ICMP errors and later fragments: `TO_ICMP` / `TO_FRAGMENT`
/// (`MODE_PACKETS`), or packets of their own (`MODE_ICMP`: protocol 1 or 58, `l4` at the
/// ICMP header; `MODE_FRAGMENT`: `l4` at the fragment's payload, no ports).
pub const MODE_PACKETS: u8 = 0;
pub const MODE_ICMP: u8 = 1;
pub const MODE_FRAGMENT: u8 = 2;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_FRAGMENT: u8 = 44;
/// Extension headers skipped before giving up (hop-by-hop and destination options).
const MAX_EXT_HEADERS: usize = 4;

/// What the rest of the program needs to know about a TCP/UDP packet.
#[derive(Clone, Copy)]
pub struct Pkt {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub family: u8,
    pub proto: u8,
    /// Addresses as on the wire; IPv4 uses index 0.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Ports as on the wire (network byte order).
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Length of the IP packet (header included), for byte counters.
    pub l3_len: u32,
    /// TTL / hop limit as received.
    pub ttl: u8,
    /// `lb_common::frag::{NONE, FIRST, LATER}` (the datagram's ID is read from the packet
    /// when needed, `frag::id`: one field less keeps the new-flow programs' frames within
    /// the verifier's bounds).
    pub frag: u8,
}

/// Parses the frame. `Err` carries the `reason` counter of a packet that goes to the kernel
/// untouched.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Pkt, u32> {
    parse_as::<MODE_PACKETS>(ctx)
}

/// [`parse`], with ICMP errors and later fragments handled as `MODE` says.
#[inline(always)]
pub fn parse_as<const MODE: u8>(ctx: &XdpContext) -> Result<Pkt, u32> {
    let mut ethertype = be16(ctx, 12).ok_or(reason::PASS_TRUNCATED)?;
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, 16).ok_or(reason::PASS_TRUNCATED)?;
        l3 = ETH_HLEN + 4;
    }
    match ethertype {
        ETH_P_IP => parse_v4::<MODE>(ctx, l3),
        ETH_P_IPV6 => parse_v6::<MODE>(ctx, l3),
        _ => Err(reason::PASS_NOT_IP),
    }
}

#[inline(always)]
fn parse_v4<const MODE: u8>(ctx: &XdpContext, l3: usize) -> Result<Pkt, u32> {
    // The fixed header in one bounds check:
    // [ver/ihl tos tot_len] [id frag] [ttl proto csum] [src] [dst]
    let hdr = at::<[u32; 5]>(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    let w = unsafe { *hdr };
    let [vihl, _tos, len_hi, len_lo] = w[0].to_ne_bytes();
    let [_, _, frag_hi, frag_lo] = w[1].to_ne_bytes();
    let [ttl, proto, _, _] = w[2].to_ne_bytes();
    if vihl >> 4 != 4 {
        return Err(reason::PASS_MALFORMED);
    }
    let hlen = ((vihl & 0x0f) as usize) * 4;
    if hlen < 20 {
        return Err(reason::PASS_MALFORMED);
    }
    let tot_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if tot_len < hlen {
        return Err(reason::PASS_MALFORMED);
    }
    // The frame may carry Ethernet padding after the packet, never less than the packet.
    if ctx.data() + l3 + tot_len > ctx.data_end() {
        return Err(reason::PASS_TRUNCATED);
    }
    let frag_word = u16::from_be_bytes([frag_hi, frag_lo]);
    let later = frag_word & 0x1fff != 0;
    let frag = if later {
        frag::LATER
    } else if frag_word & 0x2000 != 0 {
        frag::FIRST
    } else {
        frag::NONE
    };
    if later && MODE != MODE_FRAGMENT {
        return Err(TO_FRAGMENT);
    }
    let (sport, dport, tcp_flags) = if later {
        (0, 0, 0)
    } else {
        parse_l4::<MODE>(ctx, proto, l3 + hlen, tot_len - hlen)?
    };
    Ok(Pkt {
        l3,
        l4: l3 + hlen,
        family: FAMILY_V4,
        proto,
        src: [w[3], 0, 0, 0],
        dst: [w[4], 0, 0, 0],
        sport,
        dport,
        tcp_flags,
        l3_len: tot_len as u32,
        ttl,
        frag,
    })
}

#[inline(always)]
fn parse_v6<const MODE: u8>(ctx: &XdpContext, l3: usize) -> Result<Pkt, u32> {
    let hdr = at::<[u32; 10]>(ctx, l3).ok_or(reason::PASS_TRUNCATED)?;
    let w = unsafe { &*hdr };
    if (u32::from_be(w[0]) >> 28) != 6 {
        return Err(reason::PASS_MALFORMED);
    }
    let payload_len = (u32::from_be(w[1]) >> 16) as usize;
    if ctx.data() + l3 + IPV6_HLEN + payload_len > ctx.data_end() {
        return Err(reason::PASS_TRUNCATED);
    }
    let mut next = (u32::from_be(w[1]) >> 8) as u8;
    let ttl = u32::from_be(w[1]) as u8;
    let src = [w[2], w[3], w[4], w[5]];
    let dst = [w[6], w[7], w[8], w[9]];
    let mut l4 = l3 + IPV6_HLEN;
    let mut ext_len = 0usize;
    // Skip hop-by-hop and destination options; anything else that is not TCP/UDP is passed.
    for _ in 0..MAX_EXT_HEADERS {
        if next != NEXTHDR_HOP && next != NEXTHDR_DEST {
            break;
        }
        let eh = at::<[u8; 2]>(ctx, l4).ok_or(reason::PASS_TRUNCATED)?;
        let [nh, len] = unsafe { *eh };
        let this = (len as usize + 1) * 8;
        next = nh;
        l4 += this;
        ext_len += this;
    }
    let mut frag = frag::NONE;
    if next == NEXTHDR_FRAGMENT {
        if ext_len != 0 {
            // Options before the fragment header: not followed (`frag::id` reads the ID
            // right after the fixed header).
            return Err(reason::PASS_IPV6_EXT);
        }
        // next header, reserved, offset (13 bits) + M, identification
        let fh = at::<[u8; 8]>(ctx, l4).ok_or(reason::PASS_TRUNCATED)?;
        let fh = unsafe { *fh };
        let word = u16::from_be_bytes([fh[2], fh[3]]);
        next = fh[0];
        l4 += 8;
        ext_len += 8;
        if word >> 3 != 0 {
            if MODE != MODE_FRAGMENT {
                return Err(TO_FRAGMENT);
            }
            if ext_len > payload_len {
                return Err(reason::PASS_MALFORMED);
            }
            return Ok(Pkt {
                l3,
                l4,
                family: FAMILY_V6,
                proto: next,
                src,
                dst,
                sport: 0,
                dport: 0,
                tcp_flags: 0,
                l3_len: (IPV6_HLEN + payload_len) as u32,
                ttl,
                frag: frag::LATER,
            });
        }
        // An atomic fragment (offset 0, no more) is a whole packet.
        if word & 1 != 0 {
            frag = frag::FIRST;
        }
    }
    if next != PROTO_TCP && next != PROTO_UDP && next != PROTO_ICMPV6 {
        return Err(if is_v6_extension(next) {
            reason::PASS_IPV6_EXT
        } else {
            reason::PASS_NOT_TCP_UDP
        });
    }
    if ext_len > payload_len {
        return Err(reason::PASS_MALFORMED);
    }
    let (sport, dport, tcp_flags) = parse_l4::<MODE>(ctx, next, l4, payload_len - ext_len)?;
    Ok(Pkt {
        l3,
        l4,
        family: FAMILY_V6,
        proto: next,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        l3_len: (IPV6_HLEN + payload_len) as u32,
        ttl,
        frag,
    })
}

#[inline(always)]
fn is_v6_extension(nh: u8) -> bool {
    // routing, fragment, ESP, AH, no-next-header, dest options, mobility, HIP, shim6
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 59 | 60 | 135 | 139 | 140)
}

/// Ports and TCP flags; `l4_len` is what the IP header says the L4 part holds.
#[inline(always)]
fn parse_l4<const MODE: u8>(
    ctx: &XdpContext,
    proto: u8,
    l4: usize,
    l4_len: usize,
) -> Result<(u16, u16, u8), u32> {
    match proto {
        PROTO_TCP => {
            // ports, seq, ack, data offset, flags
            let hdr = at::<[u8; 20]>(ctx, l4).ok_or(reason::PASS_TRUNCATED)?;
            let h = unsafe { &*hdr };
            let doff = (h[12] >> 4) as usize * 4;
            if doff < 20 || doff > l4_len {
                return Err(reason::PASS_MALFORMED);
            }
            let ports = unsafe { *(hdr as *const [u16; 2]) };
            Ok((ports[0], ports[1], h[13]))
        }
        PROTO_UDP => {
            let hdr = at::<[u16; 4]>(ctx, l4).ok_or(reason::PASS_TRUNCATED)?;
            if l4_len < 8 {
                return Err(reason::PASS_MALFORMED);
            }
            let h = unsafe { *hdr };
            Ok((h[0], h[1], 0))
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            // Type and code: a one-byte check compiles to a comparison the verifier does
            // not take as a bound.
            let h = at::<[u8; 2]>(ctx, l4).ok_or(reason::PASS_TRUNCATED)?;
            let t = unsafe { (*h)[0] };
            let error = if proto == PROTO_ICMP {
                matches!(t, 3 | 4 | 11 | 12)
            } else {
                matches!(t, 1..=4)
            };
            if !error {
                Err(reason::PASS_NOT_TCP_UDP)
            } else if MODE == MODE_ICMP {
                // The header and the quoted IP header's first bytes at least.
                if l4_len < 8 + 20 {
                    return Err(reason::PASS_MALFORMED);
                }
                Ok((0, 0, 0))
            } else {
                Err(TO_ICMP)
            }
        }
        _ => Err(reason::PASS_NOT_TCP_UDP),
    }
}
