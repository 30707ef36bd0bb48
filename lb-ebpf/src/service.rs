//! Virtual-service lookup for packets that open a connection (established flows never need
//! it). Each CPU keeps a copy of the service it found last, valid for one configuration
//! generation: a burst of new connections to one VIP - the common case, and the SYN-flood case
//! - costs two compares instead of a hash lookup.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{FAMILY_V4, Service, ServiceKeyV4, ServiceKeyV6, filter, wide};

use crate::{
    maps::{
        CONFIG_GEN, PREFIX_V4, PREFIX_V6, SERVICE_CACHE, SERVICE_FILTER, SERVICES_V4, SERVICES_V6,
        WIDE_V4, WIDE_V6,
    },
    parse::Pkt,
};

/// The virtual service for (destination, port, protocol). Always answered from this CPU's
/// cached copy (filled on a miss): one kind of pointer for the verifier whatever map the
/// service came from, so the code after the lookup is walked once, not once per map.
#[inline(always)]
pub fn lookup(pkt: &Pkt) -> Option<&'static Service> {
    let words = key_words(pkt);
    let generation = unsafe { core::ptr::read_volatile(CONFIG_GEN.get_ptr(0)?) };
    let cache = SERVICE_CACHE.get_ptr_mut(0)?;
    let c = unsafe { &mut *cache };
    // Word by word: an array comparison compiles to a call to a `memcmp` subprogram.
    let k = &c.key;
    let hit = c.generation == generation
        && c.family == pkt.family
        && k[0] == words[0]
        && k[1] == words[1]
        && k[2] == words[2]
        && k[3] == words[3]
        && k[4] == words[4];
    if !hit {
        let svc = in_map(pkt)?;
        // Word by word again: a struct or array copy becomes a call to a `memmove` subprogram.
        unsafe {
            let dst = &raw mut c.key as *mut u32;
            for (i, w) in words.iter().enumerate() {
                core::ptr::write_volatile(dst.add(i), *w);
            }
            let src = svc as *const Service as *const u32;
            let dst = &raw mut c.service as *mut u32;
            for i in 0..core::mem::size_of::<Service>() / 4 {
                core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
            }
        }
        c.family = pkt.family;
        c.generation = generation;
    }
    Some(unsafe { &(*cache).service })
}

/// The key as five words, laid out as `ServiceKeyV4` (first two) or `ServiceKeyV6`.
#[inline(always)]
fn key_words(pkt: &Pkt) -> [u32; 5] {
    if pkt.family == FAMILY_V4 {
        let k = ServiceKeyV4::new(pkt.dst[0], pkt.dport, pkt.proto);
        // SAFETY: ServiceKeyV4 is two plain u32 words.
        let w = unsafe { core::mem::transmute::<ServiceKeyV4, [u32; 2]>(k) };
        [w[0], w[1], 0, 0, 0]
    } else {
        let k = ServiceKeyV6::new(pkt.dst, pkt.dport, pkt.proto);
        // SAFETY: ServiceKeyV6 is five plain u32 words.
        unsafe { core::mem::transmute::<ServiceKeyV6, [u32; 5]>(k) }
    }
}

#[inline(always)]
fn in_map(pkt: &Pkt) -> Option<&'static Service> {
    let exact = if pkt.family == FAMILY_V4 {
        let key = ServiceKeyV4::new(pkt.dst[0], pkt.dport, pkt.proto);
        unsafe { SERVICES_V4.get(&key) }
    } else {
        let key = ServiceKeyV6::new(pkt.dst, pkt.dport, pkt.proto);
        unsafe { SERVICES_V6.get(&key) }
    };
    if exact.is_some() {
        return exact;
    }
    in_wide(pkt)
}

/// The wide services (`lb_common::wide`): the longer destination prefix wins, then the
/// exact port.
#[inline(never)]
fn in_wide(pkt: &Pkt) -> Option<&'static Service> {
    let flags = *SERVICE_FILTER.get(filter::WORDS)?;
    if flags == 0 {
        return None;
    }
    let (by_addr, by_port) = if pkt.family == FAMILY_V4 {
        (
            WIDE_V4.get(Key::new(
                64,
                wide::v4_addr_port(pkt.proto, pkt.dst[0], pkt.dport),
            )),
            PREFIX_V4.get(Key::new(
                64,
                wide::v4_port_addr(pkt.proto, pkt.dport, pkt.dst[0]),
            )),
        )
    } else {
        (
            WIDE_V6.get(Key::new(
                160,
                wide::v6_addr_port(pkt.proto, pkt.dst, pkt.dport),
            )),
            PREFIX_V6.get(Key::new(
                160,
                wide::v6_port_addr(pkt.proto, pkt.dport, pkt.dst),
            )),
        )
    };
    match (by_addr, by_port) {
        (Some(a), Some(p)) => Some(if a.match_bits > p.match_bits { a } else { p }),
        (a, None) => a,
        (None, p) => p,
    }
}
