//! Direct routing (IPVS `-g`): the IP packet is left as it is except for the TTL / hop limit,
//! which IPVS decrements in every forwarding method; the frame is re-addressed to the real
//! server's MAC and sent from the egress interface's MAC.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    BACKEND_F_NEIGH_VALID, Backend, EVENT_NEIGH_MISSING, Event, FAMILY_V4, csum, forward, reason,
};

use crate::{
    maps::{EVENTS, TX_PORTS},
    parse::{Pkt, at},
    stats,
};

/// Rewrites and sends the packet; returns (XDP action, reason counter).
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Pkt, index: u32, be: &Backend) -> (u32, u32) {
    if be.forward != forward::DR {
        return (xdp_action::XDP_DROP, reason::DROP_UNSUPPORTED);
    }
    if be.flags & BACKEND_F_NEIGH_VALID == 0 {
        // Ask the controller to resolve it; the client retransmits meanwhile.
        let ev = Event {
            kind: EVENT_NEIGH_MISSING,
            backend: index,
        };
        if EVENTS.output::<Event>(&ev, 0).is_err() {
            stats::count(reason::EV_EVENT_LOST);
        }
        return (xdp_action::XDP_DROP, reason::DROP_NEIGH_MISSING);
    }
    if decrement_ttl(ctx, pkt).is_none() {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    let Some(eth) = at::<[u16; 6]>(ctx, 0) else {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    };
    let d = be.dst_mac;
    let s = be.src_mac;
    unsafe {
        (*eth)[0] = u16::from_ne_bytes([d[0], d[1]]);
        (*eth)[1] = u16::from_ne_bytes([d[2], d[3]]);
        (*eth)[2] = u16::from_ne_bytes([d[4], d[5]]);
        (*eth)[3] = u16::from_ne_bytes([s[0], s[1]]);
        (*eth)[4] = u16::from_ne_bytes([s[2], s[3]]);
        (*eth)[5] = u16::from_ne_bytes([s[4], s[5]]);
    }
    transmit(ctx, be.ifindex)
}

/// TTL / hop limit minus one (the caller made sure it is above one), with the IPv4 header
/// checksum updated incrementally.
#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, pkt: &Pkt) -> Option<()> {
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
fn transmit(ctx: &XdpContext, ifindex: u32) -> (u32, u32) {
    if ifindex == 0 || ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, reason::TX);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(action) => (action, reason::REDIRECT),
        Err(_) => (xdp_action::XDP_DROP, reason::DROP_INTERNAL),
    }
}
