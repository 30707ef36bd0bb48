//! xlb's XDP data plane: parse, find the virtual service, keep each flow on its real server,
//! schedule new flows, forward by direct routing, count everything.
//!
//! One concern per module: `parse` (headers), `flow` (connection table and states), `sched`
//! (picking a real server), `dr` (the forwarding method), `stats` (per-CPU counters). All map
//! layouts come from `lb-common`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod dr;
mod flow;
mod maps;
mod parse;
mod sched;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{FAMILY_V4, Service, ServiceKeyV4, ServiceKeyV6, reason};

use crate::{
    maps::{SERVICES_V4, SERVICES_V6},
    parse::Pkt,
};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let (action, why) = process(&ctx);
    stats::count(why);
    action
}

/// Does nothing but `XDP_PASS`. Attached to the peer of a veth that xlb transmits on, it makes
/// the kernel deliver `XDP_TX`/`XDP_REDIRECT` frames (veth only does so into a peer that runs
/// XDP itself).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn process(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    let Some(svc) = lookup_service(&pkt) else {
        return (xdp_action::XDP_PASS, reason::PASS_NO_SERVICE);
    };
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, reason::PASS_TTL_EXPIRED);
    }
    let now = (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32;
    let target = match flow::track(&pkt, &svc, now) {
        Ok(t) => t,
        Err(why) => {
            let action = if reason::is_pass(why) {
                xdp_action::XDP_PASS
            } else {
                xdp_action::XDP_DROP
            };
            return (action, why);
        }
    };
    if target.new_conn {
        stats::new_conn(svc.id, target.index);
    }
    let (action, why) = dr::forward(ctx, &pkt, target.index, target.backend);
    if why == reason::TX || why == reason::REDIRECT {
        stats::forwarded(svc.id, target.index, pkt.l3_len);
    }
    (action, why)
}

#[inline(always)]
fn lookup_service(pkt: &Pkt) -> Option<Service> {
    if pkt.family == FAMILY_V4 {
        let key = ServiceKeyV4 {
            addr: pkt.dst[0],
            port: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
        };
        unsafe { SERVICES_V4.get(&key) }.copied()
    } else {
        let key = ServiceKeyV6 {
            addr: pkt.dst,
            port: pkt.dport,
            proto: pkt.proto,
            _pad: 0,
        };
        unsafe { SERVICES_V6.get(&key) }.copied()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
