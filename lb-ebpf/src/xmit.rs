//! Sending a packet to its real server with the server's forwarding method, and the pieces
//! every method shares: the next-hop check, the TTL / hop limit decrement IPVS does in every
//! method, the Ethernet addresses and the transmit itself.
//!
//! Direct routing (IPVS `-g`) is those pieces alone: the IP packet is left as it is except
//! for the TTL, and the frame is re-addressed to the real server's MAC. NAT (`nat`) rewrites
//! the destination first; tunnelling (`tunnel`) wraps the packet.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_NEIGH_VALID, Backend, EVENT_NEIGH_MISSING, Event, FAMILY_V4, csum, forward, reason,
};

use crate::{
    maps::{BACKENDS, EVENTS, TX_PORTS},
    nat,
    parse::{PROTO_ICMP, PROTO_ICMPV6, Pkt, at},
    stats, tunnel,
};

/// Rewrites and sends the packet to real server `index`; returns (XDP action, reason
/// counter).
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Pkt, index: u32) -> (u32, u32) {
    let r = xlb_forward(ctx.ctx, index, pkt.layout());
    ((r >> 32) as u32, r as u32)
}

/// The forwarding methods as a *global* BPF function (exported by the linker): the verifier
/// checks the methods' code once, on its own, rather than in every program and on every
/// path that forwards. It takes the packet's layout (`Pkt::layout`) and reads the rest
/// again, and answers `action << 32 | reason`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_forward(ctx: *mut xdp_md, index: u32, layout: u64) -> u64 {
    let ctx = XdpContext::new(ctx);
    let (action, why) = crate::parse::with_reread(&ctx, layout, |pkt| match BACKENDS.get(index) {
        Some(b) => send(&ctx, pkt, index, b.current()),
        None => (xdp_action::XDP_DROP, reason::DROP_INTERNAL),
    });
    (action as u64) << 32 | why as u64
}

#[inline(always)]
fn send(ctx: &XdpContext, pkt: &Pkt, index: u32, be: &Backend) -> (u32, u32) {
    if be.flags & BACKEND_F_NEIGH_VALID == 0 {
        // Ask the controller to resolve it; the client retransmits meanwhile.
        let mut ev = core::mem::MaybeUninit::<Event>::uninit();
        let ev = crate::zeroed(&mut ev);
        ev.kind = EVENT_NEIGH_MISSING;
        ev.backend = index;
        report(ev);
        return (xdp_action::XDP_DROP, reason::DROP_NEIGH_MISSING);
    }
    match be.forward {
        forward::DR => {}
        forward::NAT => {
            let rewritten = if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
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

/// Hands an event to the controller.
#[inline(always)]
pub fn report(ev: &Event) {
    if EVENTS.output::<Event>(ev, 0).is_err() {
        stats::count(reason::EV_EVENT_LOST);
    }
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
