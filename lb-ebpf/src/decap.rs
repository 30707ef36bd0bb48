//! `xlb_decap`: the real servers' side of tunnelling. Kernels without the ipip, fou or gre
//! modules (and real servers that should not need them) cannot take tunnelled packets; this
//! program strips xlb's outer headers - IPv4 or IPv6, then IPIP (4 / 41), GRE (with
//! checksum, key and sequence fields skipped) or GUE (variant 0 with options, or variant 1)
//! on the configured ports - from packets whose inner destination is one of the configured
//! VIPs, and hands the inner packet to the local stack (`XDP_PASS`). Everything else passes
//! untouched. The outer checksums are not verified: the inner packet's own are, by the stack.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose (see the main program).
#![allow(clippy::needless_borrows_for_generic_args)]

mod access;

use access::{ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, at, be16};
use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_UDP, decap};

#[map]
static DECAP_VIPS: HashMap<decap::VipKey, u8> = HashMap::with_max_entries(4096, 0);

/// GUE ports (network byte order).
#[map]
static DECAP_GUE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);

#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);

const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_GRE: u8 = 47;

#[xdp]
pub fn xlb_decap(ctx: XdpContext) -> u32 {
    let what = decapsulate(&ctx);
    if let Some(c) = DECAP_STATS.get_ptr_mut(what) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_PASS
}

/// Strips the outer headers of a tunnel packet for a VIP; returns the `decap` counter.
#[inline(always)]
fn decapsulate(ctx: &XdpContext) -> u32 {
    let Some(mut ethertype) = be16(ctx, 12) else {
        return decap::NOT_TUNNEL;
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let Some(t) = be16(ctx, 16) else {
            return decap::NOT_TUNNEL;
        };
        ethertype = t;
        l3 = 18;
    }
    // The outer header: its length and the protocol it carries.
    let (outer_len, proto) = match ethertype {
        ETH_P_IP => {
            let Some(h) = at::<[u8; 10]>(ctx, l3) else {
                return decap::NOT_TUNNEL;
            };
            let h = unsafe { &*h };
            let ihl = (h[0] & 0x0f) as usize * 4;
            // Fragments are left to the stack (it reassembles, but cannot decapsulate).
            if h[0] >> 4 != 4 || ihl < 20 || (h[6] & 0x3f) != 0 || h[7] != 0 {
                return decap::NOT_TUNNEL;
            }
            (ihl, h[9])
        }
        ETH_P_IPV6 => {
            let Some(h) = at::<[u8; 8]>(ctx, l3) else {
                return decap::NOT_TUNNEL;
            };
            let h = unsafe { &*h };
            if h[0] >> 4 != 6 {
                return decap::NOT_TUNNEL;
            }
            (40, h[6])
        }
        _ => return decap::NOT_TUNNEL,
    };
    let l4 = l3 + outer_len;
    // The tunnel header: its length, and the inner packet's family.
    let (tunnel_len, inner_v4) = match proto {
        PROTO_IPIP => (0, true),
        PROTO_IPV6 => (0, false),
        PROTO_GRE => match gre(ctx, l4) {
            Some(t) => t,
            None => return decap::MALFORMED,
        },
        PROTO_UDP => {
            let Some(dport) = at::<u16>(ctx, l4 + 2) else {
                return decap::NOT_TUNNEL;
            };
            if unsafe { DECAP_GUE_PORTS.get(&*dport) }.is_none() {
                return decap::NOT_TUNNEL;
            }
            match gue(ctx, l4 + 8) {
                Some((len, v4)) => (8 + len, v4),
                None => return decap::MALFORMED,
            }
        }
        _ => return decap::NOT_TUNNEL,
    };
    let inner = l4 + tunnel_len;
    // The inner destination must be a VIP of this server.
    let mut key = decap::VipKey::default();
    if inner_v4 {
        let Some(h) = at::<[u32; 5]>(ctx, inner) else {
            return decap::MALFORMED;
        };
        let h = unsafe { &*h };
        if (h[0] as u8) >> 4 != 4 {
            return decap::MALFORMED;
        }
        key.family = FAMILY_V4 as u32;
        key.addr[0] = h[4];
    } else {
        let Some(h) = at::<[u32; 10]>(ctx, inner) else {
            return decap::MALFORMED;
        };
        let h = unsafe { &*h };
        if (h[0] as u8) >> 4 != 6 {
            return decap::MALFORMED;
        }
        key.family = FAMILY_V6 as u32;
        key.addr = [h[6], h[7], h[8], h[9]];
    }
    if unsafe { DECAP_VIPS.get(&key) }.is_none() {
        return decap::NOT_VIP;
    }
    // Move the Ethernet header (and VLAN tag) up to the inner packet, then drop the rest.
    // The new header ends where the inner packet starts: only outer bytes are overwritten.
    let strip = outer_len + tunnel_len;
    let inner_type = if inner_v4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be();
    if l3 != ETH_HLEN {
        // MACs and tag in one access.
        let Some(head) = at::<[u32; 4]>(ctx, 0) else {
            return decap::MALFORMED;
        };
        let head = unsafe { *head };
        let (Some(to), Some(t)) = (at::<[u32; 4]>(ctx, strip), at::<u16>(ctx, strip + 16)) else {
            return decap::MALFORMED;
        };
        unsafe {
            *to = head;
            *t = inner_type;
        }
    } else {
        let Some(macs) = at::<[u32; 3]>(ctx, 0) else {
            return decap::MALFORMED;
        };
        let macs = unsafe { *macs };
        let (Some(to), Some(t)) = (at::<[u32; 3]>(ctx, strip), at::<u16>(ctx, strip + 12)) else {
            return decap::MALFORMED;
        };
        unsafe {
            *to = macs;
            *t = inner_type;
        }
    }
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return decap::MALFORMED;
    }
    decap::DECAPSULATED
}

/// A GRE header at `off`: (length, inner is IPv4). Version 0, no routing; the checksum, key
/// and sequence fields are skipped when present.
#[inline(always)]
fn gre(ctx: &XdpContext, off: usize) -> Option<(usize, bool)> {
    let h = at::<[u8; 4]>(ctx, off)?;
    let h = unsafe { *h };
    if h[0] & 0x40 != 0 || h[1] & 0x07 != 0 {
        return None;
    }
    let len =
        4 + 4 * ((h[0] >> 7) as usize + ((h[0] >> 5) & 1) as usize + ((h[0] >> 4) & 1) as usize);
    match u16::from_be_bytes([h[2], h[3]]) {
        ETH_P_IP => Some((len, true)),
        ETH_P_IPV6 => Some((len, false)),
        _ => None,
    }
}

/// A GUE header at `off`: (length, inner is IPv4). Variant 0 (header with options; control
/// messages are not data) or variant 1 (the IP packet directly).
#[inline(always)]
fn gue(ctx: &XdpContext, off: usize) -> Option<(usize, bool)> {
    let h = at::<[u8; 2]>(ctx, off)?;
    let [b0, proto] = unsafe { *h };
    match b0 >> 6 {
        0 => {
            if b0 & 0x20 != 0 {
                return None;
            }
            let len = 4 + (b0 & 0x1f) as usize * 4;
            match proto {
                PROTO_IPIP => Some((len, true)),
                PROTO_IPV6 => Some((len, false)),
                _ => None,
            }
        }
        1 => Some((0, b0 >> 4 == 4)),
        _ => None,
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
