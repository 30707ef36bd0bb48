//! IP fragments (`lb_common::frag`): a datagram's first fragment carries the ports and goes
//! wherever its flow goes; where that was is recorded under the datagram's identity, and the
//! later fragments (`xlb_frag`) follow it - to the same real server with the same method, or
//! for a NAT reply back to the client. Later fragments whose first one was not handled here
//! go to the kernel untouched: nothing is guessed, nothing is rewritten wrongly.

use aya_ebpf::{bindings::xdp_action, maps::LruHashMap, programs::XdpContext};
use lb_common::{BACKEND_F_AVAILABLE, FAMILY_V4, FragKeyV4, FragKeyV6, Fragment, frag, reason};

use crate::{
    maps::{BACKENDS, FRAGS_V4, FRAGS_V6},
    parse::{MODE_FRAGMENT, Pkt, at, parse_as},
    stats,
};

/// The datagram's IP ID: IPv4's header field, IPv6's fragment header's (`parse` takes
/// fragment headers only right after the fixed header).
#[inline(always)]
fn id(ctx: &XdpContext, pkt: &Pkt) -> Option<u32> {
    if pkt.family == FAMILY_V4 {
        let id = at::<[u8; 2]>(ctx, pkt.l3 + 4)?;
        Some(u16::from_be_bytes(unsafe { *id }) as u32)
    } else {
        let id = at::<[u8; 4]>(ctx, pkt.l3 + 44)?;
        Some(u32::from_be_bytes(unsafe { *id }))
    }
}

trait FragKey: Sized + 'static {
    fn of(pkt: &Pkt, id: u32) -> Self;
    fn table() -> &'static LruHashMap<Self, Fragment>;
}

impl FragKey for FragKeyV4 {
    #[inline(always)]
    fn of(pkt: &Pkt, id: u32) -> Self {
        FragKeyV4 {
            src: pkt.src[0],
            dst: pkt.dst[0],
            id,
            proto: pkt.proto as u32,
        }
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Fragment> {
        &FRAGS_V4
    }
}

impl FragKey for FragKeyV6 {
    #[inline(always)]
    fn of(pkt: &Pkt, id: u32) -> Self {
        FragKeyV6 {
            src: pkt.src,
            dst: pkt.dst,
            id,
            proto: pkt.proto as u32,
        }
    }
    #[inline(always)]
    fn table() -> &'static LruHashMap<Self, Fragment> {
        &FRAGS_V6
    }
}

/// Records where the datagram of first fragment `pkt` goes (call before rewriting it).
#[inline(always)]
pub fn record(
    ctx: &XdpContext,
    pkt: &Pkt,
    kind: u32,
    backend: u32,
    generation: u32,
    vip: &[u32; 4],
) {
    let Some(id) = id(ctx, pkt) else {
        return;
    };
    let mut slot = core::mem::MaybeUninit::<Fragment>::uninit();
    let f = crate::zeroed(&mut slot);
    f.kind = kind;
    f.backend = backend;
    f.generation = generation;
    for (i, w) in vip.iter().enumerate() {
        // Volatile: a copy of zeros would become a call to `memset`.
        unsafe { core::ptr::write_volatile(&raw mut f.vip[i], *w) };
    }
    let done = if pkt.family == FAMILY_V4 {
        FRAGS_V4.insert(&FragKeyV4::of(pkt, id), f, 0)
    } else {
        FRAGS_V6.insert(&FragKeyV6::of(pkt, id), f, 0)
    };
    if done.is_ok() {
        stats::count(reason::EV_FRAGMENT_FIRST);
    }
}

#[inline(always)]
fn lookup<K: FragKey>(ctx: &XdpContext, pkt: &Pkt) -> Option<Fragment> {
    let key = K::of(pkt, id(ctx, pkt)?);
    K::table().get_ptr(&key).map(|f| unsafe { *f })
}

/// A later fragment (`xlb_frag`).
#[inline(always)]
pub fn relay(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match parse_as::<MODE_FRAGMENT>(ctx) {
        Ok(p) => p,
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    let unknown = (xdp_action::XDP_PASS, reason::PASS_FRAGMENT);
    if pkt.frag != frag::LATER {
        return unknown;
    }
    let found = if pkt.family == FAMILY_V4 {
        lookup::<FragKeyV4>(ctx, &pkt)
    } else {
        lookup::<FragKeyV6>(ctx, &pkt)
    };
    let Some(f) = found else {
        return unknown;
    };
    let Some(slot) = BACKENDS.get(f.backend) else {
        return unknown;
    };
    let be = slot.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.generation != f.generation {
        return unknown;
    }
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, reason::PASS_TTL_EXPIRED);
    }
    let verdict = if f.kind == frag::REPLY {
        crate::nat::reply_fragment(ctx, &pkt, &f, be)
    } else {
        crate::xmit::forward(ctx, &pkt, f.backend)
    };
    if verdict.1 == reason::TX || verdict.1 == reason::REDIRECT {
        stats::count(reason::EV_FRAGMENT_LATER);
    }
    verdict
}
