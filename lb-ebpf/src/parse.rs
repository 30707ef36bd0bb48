//! Header parsing with verifier-friendly bounds checks.
//!
//! Every access goes through [`at`], which proves `offset + size_of::<T>() <= data_end` to the
//! verifier. Offsets that come from the packet (IHL, extension-header lengths) are masked to
//! small bounds first so the verifier can track them.

use aya_ebpf::programs::XdpContext;

pub use crate::access::at;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, reason};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HLEN: usize = 40;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// `parse`'s answer for an ICMP error (not a reason counter): `icmp::relay` decides whether
/// it is about a connection of a virtual service.
pub const TO_ICMP: u32 = u32::MAX - 2;
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
}

impl Pkt {
    /// The header offsets, family and protocol in one word, for a global function (which
    /// takes scalars, see `xmit::xlb_forward`); [`reread`] rebuilds the rest.
    #[inline(always)]
    pub fn layout(&self) -> u64 {
        self.l3 as u64
            | (self.l4 as u64) << 16
            | (self.family as u64) << 32
            | (self.proto as u64) << 40
    }
}

/// The largest L4 offset a [`Pkt::layout`] may carry: bounded, so the verifier can follow
/// offsets computed from it (IPv6 extension headers longer than this are not forwarded by
/// the global functions).
pub const MAX_L4: usize = 1024;

/// Fills `pkt` (addresses and flags zeroed by the caller) with the packet described by `layout` (a
/// [`Pkt::layout`] of this very frame), read again; `false` if the frame does not hold it.
/// Not an `Option`: LLVM spills the fields a failing path leaves unset, which the verifier
/// refuses to read back.
#[inline(always)]
pub fn reread(ctx: &XdpContext, layout: u64, pkt: &mut Pkt) -> bool {
    let l3 = if layout & 0xffff == 18 { 18 } else { ETH_HLEN };
    let l4 = ((layout >> 16) & 0xffff) as usize;
    if l4 > MAX_L4 || l4 < l3 + 20 {
        return false;
    }
    pkt.l3 = l3;
    pkt.l4 = l4;
    pkt.family = (layout >> 32) as u8;
    pkt.proto = (layout >> 40) as u8;
    if pkt.family == FAMILY_V4 {
        let Some(h) = at::<[u32; 5]>(ctx, l3) else {
            return false;
        };
        let w = unsafe { *h };
        let [_, _, len_hi, len_lo] = w[0].to_ne_bytes();
        pkt.l3_len = u16::from_be_bytes([len_hi, len_lo]) as u32;
        pkt.ttl = w[2] as u8;
        pkt.src[0] = w[3];
        pkt.dst[0] = w[4];
    } else {
        let Some(h) = at::<[u32; 10]>(ctx, l3) else {
            return false;
        };
        let w = unsafe { &*h };
        let v = u32::from_be(w[1]);
        pkt.l3_len = (v >> 16) + IPV6_HLEN as u32;
        pkt.ttl = v as u8;
        pkt.src = [w[2], w[3], w[4], w[5]];
        pkt.dst = [w[6], w[7], w[8], w[9]];
    }
    let Some(ports) = at::<[u16; 2]>(ctx, l4) else {
        return false;
    };
    let [sport, dport] = unsafe { *ports };
    pkt.sport = sport;
    pkt.dport = dport;
    if pkt.proto == PROTO_TCP {
        let Some(f) = at::<u8>(ctx, l4 + 13) else {
            return false;
        };
        pkt.tcp_flags = unsafe { *f };
    }
    true
}

/// Runs `f` on the packet described by `layout` (see [`reread`]), or answers "truncated".
#[inline(always)]
pub fn with_reread(
    ctx: &XdpContext,
    layout: u64,
    f: impl FnOnce(&Pkt) -> (u32, u32),
) -> (u32, u32) {
    // Read into a per-CPU scratch rather than the stack: the global functions' frames add
    // up with the main program's against the verifier's 512 bytes.
    let Some(raw) = crate::maps::REREAD.get_ptr_mut(0) else {
        return (
            aya_ebpf::bindings::xdp_action::XDP_DROP,
            reason::DROP_INTERNAL,
        );
    };
    let raw = unsafe { &mut *raw };
    // Word by word: an array assignment becomes a call to `memset`.
    for i in 0..4 {
        unsafe {
            core::ptr::write_volatile(&mut raw.src[i], 0);
            core::ptr::write_volatile(&mut raw.dst[i], 0);
        }
    }
    raw.tcp_flags = 0;
    if !reread(ctx, layout, raw) {
        return (
            aya_ebpf::bindings::xdp_action::XDP_PASS,
            reason::PASS_TRUNCATED,
        );
    }
    // Offsets with bounds the verifier sees: read back from memory they are unknown.
    let l3 = unsafe { core::ptr::read_volatile(&raw.l3) };
    let l4 = unsafe { core::ptr::read_volatile(&raw.l4) };
    let pkt = Pkt {
        l3: if l3 == 18 { 18 } else { ETH_HLEN },
        l4: l4 & (MAX_L4 * 2 - 1),
        ..*raw
    };
    f(&pkt)
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    at::<u16>(ctx, off).map(|p| u16::from_be(unsafe { *p }))
}

/// Parses the frame. `Err` carries the `reason` counter of a packet that goes to the kernel
/// untouched.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Pkt, u32> {
    parse_as::<false>(ctx)
}

/// [`parse`], or with `ICMP` an ICMP error as a packet of its own: protocol 1 or 58, `l4`
/// at the ICMP header, no ports (see `icmp::relay`).
#[inline(always)]
pub fn parse_as<const ICMP: bool>(ctx: &XdpContext) -> Result<Pkt, u32> {
    let mut ethertype = be16(ctx, 12).ok_or(reason::PASS_TRUNCATED)?;
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16(ctx, 16).ok_or(reason::PASS_TRUNCATED)?;
        l3 = ETH_HLEN + 4;
    }
    match ethertype {
        ETH_P_IP => parse_v4::<ICMP>(ctx, l3),
        ETH_P_IPV6 => parse_v6::<ICMP>(ctx, l3),
        _ => Err(reason::PASS_NOT_IP),
    }
}

#[inline(always)]
fn parse_v4<const ICMP: bool>(ctx: &XdpContext, l3: usize) -> Result<Pkt, u32> {
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
    if u16::from_be_bytes([frag_hi, frag_lo]) & 0x3fff != 0 {
        return Err(reason::PASS_FRAGMENT);
    }
    let (sport, dport, tcp_flags) = parse_l4::<ICMP>(ctx, proto, l3 + hlen, tot_len - hlen)?;
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
    })
}

#[inline(always)]
fn parse_v6<const ICMP: bool>(ctx: &XdpContext, l3: usize) -> Result<Pkt, u32> {
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
    if next == NEXTHDR_FRAGMENT {
        return Err(reason::PASS_FRAGMENT);
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
    let (sport, dport, tcp_flags) = parse_l4::<ICMP>(ctx, next, l4, payload_len - ext_len)?;
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
    })
}

#[inline(always)]
fn is_v6_extension(nh: u8) -> bool {
    // routing, fragment, ESP, AH, no-next-header, dest options, mobility, HIP, shim6
    matches!(nh, 0 | 43 | 44 | 50 | 51 | 59 | 60 | 135 | 139 | 140)
}

/// Ports and TCP flags; `l4_len` is what the IP header says the L4 part holds.
#[inline(always)]
fn parse_l4<const ICMP: bool>(
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
            } else if ICMP {
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
