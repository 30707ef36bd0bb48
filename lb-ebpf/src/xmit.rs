//! Sending a packet to its real server with the server's forwarding method, and the pieces
//! every method shares: the next-hop check, the TTL / hop limit decrement IPVS does in every
//! method, the Ethernet addresses and the transmit itself.
//!
//! Direct routing (IPVS `-g`) is those pieces alone: the IP packet is left as it is except
//! for the TTL, and the frame is re-addressed to the real server's MAC. NAT (`nat`) rewrites
//! the destination first; tunnelling (`tunnel`) wraps the packet.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    BACKEND_F_NEIGH_VALID, Backend, EVENT_NEIGH_MISSING, Event, FAMILY_V4, csum, forward, frag,
    reason,
};

use crate::{
    maps::{BACKENDS, EVENTS, TX_PORTS},
    nat,
    parse::{PROTO_ICMP, PROTO_ICMPV6, Pkt, at},
    stats, tunnel,
};

/// Rewrites and sends the packet to real server `index`; returns (XDP action, reason
/// counter). Inlined into each program that sends (the main program for established flows,
/// `xlb_xmit` for new ones, `xlb_icmp`, `xlb_frag`): a call would add its frame to the
/// caller's against the verifier's 512 bytes of stack.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Pkt, index: u32) -> (u32, u32) {
    match BACKENDS.get(index) {
        Some(b) => send(ctx, pkt, index, b.current()),
        None => (xdp_action::XDP_DROP, reason::DROP_INTERNAL),
    }
}

#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Pkt, index: u32, be: &Backend) -> (u32, u32) {
    if be.flags & BACKEND_F_NEIGH_VALID == 0 {
        // Ask the controller to resolve it; the client retransmits meanwhile.
        report(EVENT_NEIGH_MISSING, index, 0, &[0; 4]);
        return (xdp_action::XDP_DROP, reason::DROP_NEIGH_MISSING);
    }
    if pkt.frag == frag::FIRST {
        // Before any rewrite: the later fragments look the datagram up by its own addresses.
        crate::frag::record(ctx, pkt, frag::TO_SERVER, index, be.generation, &[0; 4]);
    }
    match be.forward {
        forward::DR => {}
        forward::NAT => {
            let rewritten = if pkt.frag == frag::LATER {
                nat::later_fragment_to_server(ctx, pkt, be)
            } else if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
                nat::icmp_to_server(ctx, pkt, be)
            } else {
                nat::to_server(ctx, pkt, be)
            };
            if rewritten.is_none() {
                return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
            }
        }
        forward::TUNNEL => return tunnel::encap(ctx, pkt, be),
        _ => return (xdp_action::XDP_DROP, reason::DROP_UNSUPPORTED),
    }
    if decrement_ttl(ctx, pkt).is_none() {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    if set_macs(ctx, &be.dst_mac, &be.src_mac).is_none() {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    transmit(ctx, be.ifindex)
}

/// Hands an event to the controller, written straight into the ring buffer.
#[inline(always)]
pub fn report(kind: u32, backend: u32, family: u32, addr: &[u32; 4]) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        stats::count(reason::EV_EVENT_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).kind = kind;
        (*ev).backend = backend;
        (*ev).family = family;
        // Volatile word stores: a copy of zeros would become a call to `memset`.
        for (i, w) in addr.iter().enumerate() {
            core::ptr::write_volatile(&raw mut (*ev).addr[i], *w);
        }
    }
    entry.submit(0);
}

/// Writes the frame's destination and source MACs.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> Option<()> {
    let eth = at::<[u16; 6]>(ctx, 0)?;
    unsafe {
        (*eth)[0] = u16::from_ne_bytes([dst[0], dst[1]]);
        (*eth)[1] = u16::from_ne_bytes([dst[2], dst[3]]);
        (*eth)[2] = u16::from_ne_bytes([dst[4], dst[5]]);
        (*eth)[3] = u16::from_ne_bytes([src[0], src[1]]);
        (*eth)[4] = u16::from_ne_bytes([src[2], src[3]]);
        (*eth)[5] = u16::from_ne_bytes([src[4], src[5]]);
    }
    Some(())
}

/// TTL / hop limit minus one (the caller made sure it is above one), with the IPv4 header
/// checksum updated incrementally.
#[inline(always)]
pub fn decrement_ttl(ctx: &XdpContext, pkt: &Pkt) -> Option<()> {
    if pkt.family == FAMILY_V4 {
        let ttl_proto = at::<u16>(ctx, pkt.l3 + 8)?;
        let check = at::<u16>(ctx, pkt.l3 + 10)?;
        unsafe {
            let old = *ttl_proto;
            let [ttl, proto] = old.to_ne_bytes();
            *ttl_proto = u16::from_ne_bytes([ttl - 1, proto]);
            *check = csum::ipv4_ttl_decrement(*check, old);
        }
    } else {
        let hop_limit = at::<u8>(ctx, pkt.l3 + 7)?;
        unsafe { *hop_limit -= 1 };
    }
    Some(())
}

/// Back out of the ingress interface, or to another one through the devmap.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, ifindex: u32) -> (u32, u32) {
    if ifindex == 0 || ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, reason::TX);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (action, reason::REDIRECT),
        Err(_) => (xdp_action::XDP_DROP, reason::DROP_INTERNAL),
    }
}
