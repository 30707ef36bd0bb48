//! xlb's XDP data plane: parse, find the virtual service, keep each flow on its real server,
//! schedule new flows, forward by direct routing, count everything.
//!
//! One concern per module: `parse` (headers), `filter` (is this possibly for a service),
//! `flow` (connection table and states), `acct` (connection counts), `admit` (table
//! admission), `reap` (expiry of idle connections), `service` (finding the virtual service of
//! a new flow), `sched` (picking a real server; `least` for the least-connection family),
//! `dr` (the forwarding method), `stats` (per-CPU counters). All map layouts come from
//! `lb-common`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed by reference on purpose: by value they would be copied into
// another stack slot before the helper call.
#![allow(clippy::needless_borrows_for_generic_args)]

mod acct;
mod admit;
mod dr;
mod filter;
mod flow;
mod least;
mod maps;
mod parse;
mod reap;
mod sched;
mod service;
mod stats;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::reason;

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let (action, why) = process(&ctx);
    stats::count(why);
    action
}

/// Retires idle connections (see `reap`). Run by the controller with `BPF_PROG_TEST_RUN` on a
/// dummy frame; never attached to an interface.
#[xdp]
pub fn xlb_reap(_ctx: XdpContext) -> u32 {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    reap::reap(now);
    xdp_action::XDP_PASS
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
    if !filter::may_match(&pkt) {
        return (xdp_action::XDP_PASS, reason::PASS_NO_SERVICE);
    }
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    let target = match flow::track(&pkt, now) {
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
    let (action, why) = dr::forward(ctx, &pkt, target.index, target.backend);
    if why == reason::TX || why == reason::REDIRECT {
        stats::forwarded(target.service_id, target.index, pkt.l3_len, target.new_conn);
    } else if target.new_conn {
        stats::new_conn(target.service_id, target.index);
    }
    (action, why)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
