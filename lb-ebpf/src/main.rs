//! xlb's XDP data plane: parse, find the virtual service, keep each flow on its real server,
//! schedule new flows, forward by direct routing, NAT or tunnelling, count everything.
//!
//! One concern per module: `parse` (headers), `filter` (is this possibly for a service),
//! `flow` (connection table and states), `acct` (connection counts), `admit` (table
//! admission), `persist` (persistence templates), `reap` (expiry of idle connections and
//! templates), `service` (finding the virtual service of a new flow), `sched` (picking a real
//! server; `least` for the least-connection family, `locality` for lblc/lblcr),
//! `xmit` (sending to the real server: direct routing and what every method shares), `nat`
//! (NAT both ways), `tunnel` (encapsulation), `icmp` (ICMP errors), `stats` (per-CPU
//! counters), `sync` (connection synchronisation between balancers). All map layouts come
//! from `lb-common`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map keys and values are passed by reference on purpose: by value they would be copied into
// another stack slot before the helper call.
#![allow(clippy::needless_borrows_for_generic_args)]

mod access;
mod acct;
mod admit;
mod conntable;
mod filter;
mod flow;
mod frag;
mod icmp;
mod least;
mod locality;
mod maps;
mod nat;
mod parse;
mod persist;
mod reap;
mod sched;
mod service;
mod stats;
mod sync;
mod tunnel;
mod xmit;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, macros::xdp, programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FlowKeyV4, FlowKeyV6, HANDOFF_NO_ENTRY, HANDOFF_TABLE_FULL, NEW_FLOW_FRAG,
    NEW_FLOW_ICMP, NEW_FLOW_REPLY, NEW_FLOW_SYN, NEW_FLOW_V4, NEW_FLOW_V6, NEW_FLOW_XMIT, reason,
};
use maps::{HANDOFF, NEW_FLOW, XMIT_HANDOFF};

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let (action, why) = process(&ctx);
    stats::count(why);
    action
}

/// Packets of IPv4 flows without a live entry (`flow::new_flow`), tail-called by `xlb`.
#[xdp]
pub fn xlb_new_v4(ctx: XdpContext) -> u32 {
    let (action, why) = process_new::<FlowKeyV4>(&ctx);
    stats::count(why);
    action
}

/// Packets of IPv6 flows without a live entry, tail-called by `xlb`.
#[xdp]
pub fn xlb_new_v6(ctx: XdpContext) -> u32 {
    let (action, why) = process_new::<FlowKeyV6>(&ctx);
    stats::count(why);
    action
}

/// IPv4 SYNs (`flow::syn`), tail-called by `xlb`.
#[xdp]
pub fn xlb_syn_v4(ctx: XdpContext) -> u32 {
    let (action, why) = process_syn::<FlowKeyV4>(&ctx);
    stats::count(why);
    action
}

/// IPv6 SYNs, tail-called by `xlb`.
#[xdp]
pub fn xlb_syn_v6(ctx: XdpContext) -> u32 {
    let (action, why) = process_syn::<FlowKeyV6>(&ctx);
    stats::count(why);
    action
}

/// Sends a new flow's packet to the real server a new-flow program chose (`XMIT_HANDOFF`).
/// A program of its own: the forwarding methods' frames do not fit on top of the new-flow
/// programs' within the verifier's 512 bytes of stack.
#[xdp]
pub fn xlb_xmit(ctx: XdpContext) -> u32 {
    let (action, why) = process_xmit(&ctx);
    stats::count(why);
    action
}

/// Replies from NAT real servers (`nat`), tail-called by `xlb`.
#[xdp]
pub fn xlb_reply(ctx: XdpContext) -> u32 {
    let (action, why) = match parse::parse(&ctx) {
        Ok(pkt) => {
            let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
            nat::reply(&ctx, &pkt, now)
        }
        Err(why) => (xdp_action::XDP_PASS, why),
    };
    stats::count(why);
    action
}

/// ICMP errors (`icmp::relay`), tail-called by `xlb`.
#[xdp]
pub fn xlb_icmp(ctx: XdpContext) -> u32 {
    let (action, why) = icmp::relay(&ctx);
    stats::count(why);
    action
}

/// Later IP fragments (`frag::relay`), tail-called by `xlb`.
#[xdp]
pub fn xlb_frag(ctx: XdpContext) -> u32 {
    let (action, why) = frag::relay(&ctx);
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

/// Installs a batch of connections synchronised from another balancer (see `sync`): its
/// frame is a `lb_common::SyncBatch`, which it returns with each record's result. Run by the
/// controller with `BPF_PROG_TEST_RUN`; never attached to an interface.
#[xdp]
pub fn xlb_sync_install(ctx: XdpContext) -> u32 {
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    sync::install(&ctx, now)
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
        Err(parse::TO_ICMP) => {
            unsafe { NEW_FLOW.tail_call(ctx, NEW_FLOW_ICMP) };
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        }
        Err(parse::TO_FRAGMENT) => {
            unsafe { NEW_FLOW.tail_call(ctx, NEW_FLOW_FRAG) };
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        }
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    let mut flags = 0;
    if !filter::may_match(&pkt, &mut flags) {
        if nat::may_be_reply(&pkt, flags) {
            let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
            if let Some(verdict) = nat::fast_reply(ctx, &pkt, now) {
                return verdict;
            }
            unsafe { NEW_FLOW.tail_call(ctx, NEW_FLOW_REPLY) };
            return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
        }
        return (xdp_action::XDP_PASS, reason::PASS_NO_SERVICE);
    }
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    match flow::established(&pkt, now) {
        Err(flow::TO_SYN) => hand_off(ctx, &pkt, NEW_FLOW_SYN, 0),
        Err(flow::TO_NEW_FLOW_NO_ENTRY) => {
            if nat::may_be_reply(&pkt, filter::flags()) && nat::is_reply(&pkt) {
                // A NAT reply whose tuple also passes the service prefilter (a wide service
                // covering the client, or a hash collision): replies of NAT connections
                // come first, as in IPVS.
                unsafe { NEW_FLOW.tail_call(ctx, NEW_FLOW_REPLY) };
                return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
            }
            hand_off(ctx, &pkt, 0, HANDOFF_NO_ENTRY)
        }
        result => finish(ctx, &pkt, result),
    }
}

/// Tail-calls the new-flow program `kind` (0 or `NEW_FLOW_SYN`) of the packet's family.
#[inline(always)]
fn hand_off(ctx: &XdpContext, pkt: &parse::Pkt, kind: u32, handoff: u32) -> (u32, u32) {
    if let Some(h) = HANDOFF.get_ptr_mut(0) {
        unsafe { *h = handoff };
    }
    let family = if pkt.family == FAMILY_V4 {
        NEW_FLOW_V4
    } else {
        NEW_FLOW_V6
    };
    unsafe { NEW_FLOW.tail_call(ctx, family + kind) };
    // Only if the controller did not install the new-flow programs.
    (xdp_action::XDP_DROP, reason::DROP_INTERNAL)
}

/// Parses a packet handed to a new-flow program again: cheaper than passing the parse
/// through a map, and only new flows pay.
#[inline(always)]
fn reparse<K: flow::FlowKey>(ctx: &XdpContext) -> Result<parse::Pkt, (u32, u32)> {
    let pkt = parse::parse(ctx).map_err(|why| (xdp_action::XDP_PASS, why))?;
    if pkt.family != K::FAMILY {
        return Err((xdp_action::XDP_DROP, reason::DROP_INTERNAL));
    }
    Ok(pkt)
}

/// The packet's real server, from a new-flow program to `xlb_xmit`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct XmitHandoff {
    pub index: u32,
    pub service_id: u32,
    pub new_conn: u32,
}

#[inline(always)]
fn process_xmit(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    let Some(h) = XMIT_HANDOFF.get(0) else {
        return (xdp_action::XDP_DROP, reason::DROP_INTERNAL);
    };
    send(ctx, &pkt, h.index, h.service_id, h.new_conn != 0)
}

/// A new-flow program's answer: its verdict, or on to `xlb_xmit` with the real server.
#[inline(always)]
fn finish_new(ctx: &XdpContext, result: Result<flow::Target, u32>) -> (u32, u32) {
    let t = match result {
        Ok(t) => t,
        Err(why) => return verdict(why),
    };
    if let Some(h) = XMIT_HANDOFF.get_ptr_mut(0) {
        unsafe {
            (*h).index = t.index;
            (*h).service_id = t.service_id;
            (*h).new_conn = t.new_conn as u32;
        }
    }
    unsafe { NEW_FLOW.tail_call(ctx, NEW_FLOW_XMIT) };
    (xdp_action::XDP_DROP, reason::DROP_INTERNAL)
}

#[inline(always)]
fn process_new<K: flow::FlowKey>(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match reparse::<K>(ctx) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    let handoff = HANDOFF.get(0).copied().unwrap_or(0);
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    let result = flow::new_flow::<K>(
        &pkt,
        now,
        // The SYN program looked the flow up before it found the table full.
        handoff == HANDOFF_NO_ENTRY || handoff == HANDOFF_TABLE_FULL,
        handoff != HANDOFF_TABLE_FULL,
    );
    finish_new(ctx, result)
}

#[inline(always)]
fn process_syn<K: flow::FlowKey>(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match reparse::<K>(ctx) {
        Ok(p) => p,
        Err(verdict) => return verdict,
    };
    let now = lb_common::ticks::from_ns(unsafe { bpf_ktime_get_coarse_ns() });
    match flow::syn::<K>(&pkt, now) {
        Ok(target) => finish_new(ctx, Ok(target)),
        // Anything unusual (a retransmitted SYN, a table full of established connections,
        // persistence...): the new-flow program looks at the table and decides.
        Err(handoff) => hand_off(ctx, &pkt, 0, handoff),
    }
}

/// Forwards the packet to its target, or turns the reason into a verdict.
#[inline(always)]
fn finish(ctx: &XdpContext, pkt: &parse::Pkt, result: Result<flow::Target, u32>) -> (u32, u32) {
    match result {
        Ok(t) => send(ctx, pkt, t.index, t.service_id, t.new_conn),
        Err(why) => verdict(why),
    }
}

/// The verdict a reason counter stands for.
#[inline(always)]
fn verdict(why: u32) -> (u32, u32) {
    let action = if reason::is_pass(why) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    };
    (action, why)
}

/// Sends the packet to real server `index` and counts it.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &parse::Pkt,
    index: u32,
    service_id: u32,
    new_conn: bool,
) -> (u32, u32) {
    let (action, why) = xmit::forward(ctx, pkt, index);
    if why == reason::TX || why == reason::REDIRECT {
        stats::forwarded(service_id, index, pkt.l3_len, new_conn);
    } else if new_conn {
        stats::new_conn(service_id, index);
    }
    (action, why)
}

/// A `bpf_loop` context that only points at the walk's state, which lives in a per-CPU map:
/// the frames from a program down to a callback must fit the verifier's 512 bytes of stack,
/// and the walks' states are large. (Map values may not hold pointers, so the pointer lives
/// here, on the stack.)
#[repr(C)]
pub struct Ref<T> {
    pub p: *mut T,
}

impl<T> Ref<T> {
    /// The state behind a callback's context.
    ///
    /// # Safety
    /// `ctx` is the `Ref<T>` handed to `bpf_loop`.
    #[inline(always)]
    pub unsafe fn state<'a>(ctx: *mut core::ffi::c_void) -> &'a mut T {
        unsafe { &mut *(*(ctx as *mut Ref<T>)).p }
    }
}

/// Zeroes `slot` (plain words only) word by word with volatile stores and returns it: a
/// struct literal with zeroed fields becomes a call to a `memset` subprogram (whose byte loop
/// the verifier walks iteration by iteration), and returning a value would copy it with
/// `memcpy`; this builds it in place.
#[inline(always)]
pub fn zeroed<T: Copy>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
    let p = slot.as_mut_ptr() as *mut u32;
    for i in 0..core::mem::size_of::<T>() / 4 {
        unsafe { core::ptr::write_volatile(p.add(i), 0) };
    }
    // SAFETY: every word was written; `T` is plain words.
    unsafe { slot.assume_init_mut() }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
