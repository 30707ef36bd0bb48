//! Tunnelling (IPVS `-i`): the packet, its TTL / hop limit decremented, travels to the real
//! server inside an outer IPv4 or IPv6 header, as IPVS builds it (`ip_vs_tunnel_xmit`):
//! IP in IP (protocol 4 or 41), GUE (UDP + a 4-byte GUE header) or GRE (4 bytes, 8 with a
//! checksum). The outer header copies the inner DSCP (ECN encapsulated as RFC 6040 does), the
//! inner DF bit (IPv4 inner; always DF for IPv6 inner) and the decremented TTL; its source is
//! the configured or routed source address, its destination the real server.
//!
//! Checksums (`--tun-csum`) cover the whole inner packet. Reading it would cost a loop over
//! every byte; instead the inner packet's sum is derived from its own valid checksums: an
//! IPv4 header with a valid checksum sums to zero, and a TCP/UDP segment with a valid
//! checksum sums to the negated pseudo-header. Packets whose sum cannot be derived that way
//! (UDP without checksum, IPv6 extension headers, fragments, ICMP) leave without the optional
//! checksum: GUE
//! with UDP checksum 0 (IPv4 outer: "no checksum"), GRE without the C bit - both valid,
//! accepted packets.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, FAMILY_V4, PROTO_TCP, PROTO_UDP, csum, reason, tunnel};

use crate::{
    access::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6},
    icmp,
    parse::{Pkt, at},
    xmit,
};

const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_GRE: u8 = 47;

/// Wraps the packet for its real server and sends it.
#[inline(always)]
pub fn encap(ctx: &XdpContext, pkt: &Pkt, be: &Backend) -> (u32, u32) {
    let outer_v6 = be.family != FAMILY_V4;
    let inner_v4 = pkt.family == FAMILY_V4;
    // remcsum: IPVS computes the full checksum for packets that are not CHECKSUM_PARTIAL,
    // which forwarded packets never are.
    let want_csum =
        be.tun_flags & (tunnel::F_CSUM | tunnel::F_REMCSUM) != 0 && be.tun_type != tunnel::IPIP;
    let with_csum = want_csum && summable(ctx, pkt);
    let flags = if with_csum { tunnel::F_CSUM } else { 0 };
    let overhead = tunnel::overhead(outer_v6, be.tun_type, flags);
    let inner_len = pkt.l3_len;
    if be.mtu != 0 && inner_len + overhead > be.mtu {
        return icmp::too_big(ctx, pkt, be.mtu.saturating_sub(overhead), &pkt.dst);
    }
    if xmit::decrement_ttl(ctx, pkt).is_none() {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    // What the outer header takes from the inner one, read before the frame moves.
    let Some((dsfield, df, ttl)) = inner_fields(ctx, pkt) else {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    };
    let inner_sum = if with_csum { inner_sum(ctx, pkt) } else { 0 };
    let inner_proto = if inner_v4 { PROTO_IPIP } else { PROTO_IPV6 };
    let outer_proto = match be.tun_type {
        tunnel::GUE => PROTO_UDP,
        tunnel::GRE => PROTO_GRE,
        _ => inner_proto,
    };
    let vlan = pkt.l3 != ETH_HLEN;
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
    }
    let l2 = if vlan { ETH_HLEN + 4 } else { ETH_HLEN };
    if vlan {
        // The 802.1Q tag moves to the front with the Ethernet header.
        let (Some(from), Some(to)) = (at::<u32>(ctx, overhead as usize + 12), at::<u32>(ctx, 12))
        else {
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        };
        unsafe { *to = *from };
    }
    let Some(ethertype) = at::<u16>(ctx, l2 - 2) else {
        return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
    };
    unsafe { *ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP }.to_be() };
    if xmit::set_macs(ctx, &be.dst_mac, &be.src_mac).is_none() {
        return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
    }
    let total = inner_len + overhead;
    let tos = ecn_encapsulate(dsfield);
    let (ip_len, pseudo) = if outer_v6 {
        let Some(h) = at::<[u32; 10]>(ctx, l2) else {
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        };
        let plen = (total - tunnel::V6_OUTER) as u16;
        let [ph, pl] = plen.to_be_bytes();
        unsafe {
            (*h)[0] = u32::from_ne_bytes([0x60 | (tos >> 4), tos << 4, 0, 0]);
            (*h)[1] = u32::from_ne_bytes([ph, pl, outer_proto, ttl]);
            for i in 0..4 {
                (*h)[2 + i] = be.tun_src[i];
                (*h)[6 + i] = be.addr[i];
            }
        }
        let mut pseudo = 0;
        for i in 0..4 {
            pseudo += csum::words(be.tun_src[i]) + csum::words(be.addr[i]);
        }
        (tunnel::V6_OUTER as usize, pseudo)
    } else {
        let Some(h) = at::<[u32; 5]>(ctx, l2) else {
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        };
        let [th, tl] = (total as u16).to_be_bytes();
        // IPv4 ID: unused with DF (0, as Linux sends); otherwise it must vary.
        let id = if df {
            0
        } else {
            unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() as u16 }
        };
        let w0 = u32::from_ne_bytes([0x45, tos, th, tl]);
        let w1 = u32::from_ne_bytes([(id >> 8) as u8, id as u8, if df { 0x40 } else { 0 }, 0]);
        let w2 = u32::from_ne_bytes([ttl, outer_proto, 0, 0]);
        let sum = csum::words(w0)
            + csum::words(w1)
            + csum::words(w2)
            + csum::words(be.tun_src[0])
            + csum::words(be.addr[0]);
        let check = !csum::fold(sum);
        unsafe {
            (*h)[0] = w0;
            (*h)[1] = w1;
            (*h)[2] = w2 | (check as u32) << 16;
            (*h)[3] = be.tun_src[0];
            (*h)[4] = be.addr[0];
        }
        (
            tunnel::V4_OUTER as usize,
            csum::words(be.tun_src[0]) + csum::words(be.addr[0]),
        )
    };
    let l4 = l2 + ip_len;
    let written = match be.tun_type {
        tunnel::GUE => gue(
            ctx,
            pkt,
            be,
            l4,
            inner_len,
            inner_proto,
            with_csum,
            pseudo + inner_sum,
        ),
        tunnel::GRE => gre(ctx, l4, inner_v4, with_csum, inner_sum),
        _ => Some(()),
    };
    if written.is_none() {
        return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
    }
    xmit::transmit(ctx, be.ifindex)
}

/// UDP + GUE header (variant 0, no options). `partial` is the pseudo-header (addresses)
/// plus the inner packet's sum.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gue(
    ctx: &XdpContext,
    pkt: &Pkt,
    be: &Backend,
    l4: usize,
    inner_len: u32,
    inner_proto: u8,
    with_csum: bool,
    partial: u32,
) -> Option<()> {
    let h = at::<[u32; 3]>(ctx, l4)?;
    let sport = tunnel::gue_sport(flow_hash(pkt)).to_be();
    let udp_len = ((tunnel::GUE_LEN + inner_len) as u16).to_be();
    let ports = u32::from_ne_bytes({
        let s = sport.to_ne_bytes();
        let d = be.tun_port.to_ne_bytes();
        [s[0], s[1], d[0], d[1]]
    });
    let gue = u32::from_ne_bytes([0, inner_proto, 0, 0]);
    let check = if with_csum {
        let proto = u16::from_ne_bytes([0, PROTO_UDP]) as u32;
        let sum = partial + proto + 2 * udp_len as u32 + csum::words(ports) + csum::words(gue);
        match !csum::fold(sum) {
            0 => 0xffff,
            c => c,
        }
    } else {
        0
    };
    let l = udp_len.to_ne_bytes();
    let c = check.to_ne_bytes();
    unsafe {
        (*h)[0] = ports;
        (*h)[1] = u32::from_ne_bytes([l[0], l[1], c[0], c[1]]);
        (*h)[2] = gue;
    }
    Some(())
}

/// GRE header: no key, no sequence number; with the checksum field if `with_csum`.
#[inline(always)]
fn gre(ctx: &XdpContext, l4: usize, inner_v4: bool, with_csum: bool, inner_sum: u32) -> Option<()> {
    let proto = if inner_v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be_bytes();
    let flags = if with_csum { 0x80 } else { 0 };
    let w0 = u32::from_ne_bytes([flags, 0, proto[0], proto[1]]);
    if with_csum {
        let h = at::<[u32; 2]>(ctx, l4)?;
        let c = (!csum::fold(csum::words(w0) + inner_sum)).to_ne_bytes();
        unsafe {
            (*h)[0] = w0;
            (*h)[1] = u32::from_ne_bytes([c[0], c[1], 0, 0]);
        }
    } else {
        let h = at::<u32>(ctx, l4)?;
        unsafe { *h = w0 };
    }
    Some(())
}

/// Whether the inner packet's sum can be derived from its checksums.
#[inline(always)]
fn summable(ctx: &XdpContext, pkt: &Pkt) -> bool {
    // A fragment's L4 checksum covers the whole datagram, not this packet.
    if pkt.frag != lb_common::frag::NONE {
        return false;
    }
    if pkt.family != FAMILY_V4 && pkt.l4 != pkt.l3 + 40 {
        return false;
    }
    match pkt.proto {
        PROTO_TCP => true,
        PROTO_UDP => at::<u16>(ctx, pkt.l4 + 6).is_some_and(|c| unsafe { *c } != 0),
        _ => false,
    }
}

/// The one's-complement sum of the whole inner packet (see the module comment), as an
/// accumulator of wire-order words. Called after the TTL decrement.
#[inline(always)]
fn inner_sum(ctx: &XdpContext, pkt: &Pkt) -> u32 {
    let l4_len = pkt.l3_len - (pkt.l4 - pkt.l3) as u32;
    let len = u16::from_ne_bytes((l4_len as u16).to_be_bytes()) as u32;
    let proto = u16::from_ne_bytes([0, pkt.proto]) as u32;
    let mut pseudo = len + proto;
    for i in 0..4 {
        pseudo += csum::words(pkt.src[i]) + csum::words(pkt.dst[i]);
    }
    // A valid segment sums to the negated pseudo-header.
    let segment = (!csum::fold(pseudo)) as u32;
    if pkt.family == FAMILY_V4 {
        // A valid IPv4 header sums to zero.
        return segment;
    }
    // IPv6 has no header checksum: add the (hop-limit-decremented) header itself.
    match at::<[u32; 10]>(ctx, pkt.l3) {
        Some(h) => {
            let h = unsafe { &*h };
            let mut sum = segment;
            for w in h {
                sum += csum::words(*w);
            }
            sum
        }
        None => segment,
    }
}

/// (DSCP+ECN byte, DF, TTL/hop limit) of the inner packet.
#[inline(always)]
fn inner_fields(ctx: &XdpContext, pkt: &Pkt) -> Option<(u8, bool, u8)> {
    if pkt.family == FAMILY_V4 {
        let h = at::<[u8; 9]>(ctx, pkt.l3)?;
        let h = unsafe { &*h };
        Some((h[1], h[6] & 0x40 != 0, h[8]))
    } else {
        let h = at::<[u8; 8]>(ctx, pkt.l3)?;
        let h = unsafe { &*h };
        Some(((h[0] << 4) | (h[1] >> 4), true, h[7]))
    }
}

/// RFC 6040 / `INET_ECN_encapsulate`: the outer ECN field copies the inner one, except that
/// Congestion Experienced becomes ECT(0).
#[inline(always)]
fn ecn_encapsulate(dsfield: u8) -> u8 {
    let ecn = dsfield & 3;
    (dsfield & !3) | if ecn == 3 { 2 } else { ecn }
}

/// A hash of the flow's tuple, so a flow keeps one GUE source port and flows spread over
/// the real server's receive queues.
#[inline(always)]
fn flow_hash(pkt: &Pkt) -> u32 {
    let s = pkt.src[0] ^ pkt.src[1] ^ pkt.src[2] ^ pkt.src[3];
    let d = pkt.dst[0] ^ pkt.dst[1] ^ pkt.dst[2] ^ pkt.dst[3];
    let p = ((pkt.sport as u32) << 16) | pkt.dport as u32;
    let x = s.wrapping_mul(0x9e37_79b1) ^ d.rotate_left(13) ^ p ^ pkt.proto as u32;
    x.wrapping_mul(0x85eb_ca6b) ^ (x >> 15)
}
