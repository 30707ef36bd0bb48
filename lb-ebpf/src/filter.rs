//! The service prefilter: a bitmap with one bit per hash of (destination address, port,
//! protocol), set by the controller for every virtual service. Packets whose bit is clear are
//! not for a service and go to the kernel after one array read, without a hash lookup; packets
//! of established flows then go straight to the connection table.
//!
//! Wide services (port ranges, all ports, destination prefixes) set the bit of (address, 0)
//! or (0, port) instead, and a flag word says which of those further bits to try, so a
//! configuration without wide services pays nothing for them. The same word says whether
//! NAT real servers exist, so a configuration without NAT pays nothing for NAT replies.

use lb_common::{PROTO_TCP, filter, wide};

use crate::{maps::SERVICE_FILTER, parse::Pkt};

/// Whether the packet may be for a service. When it is not, `flags` holds the flag word
/// (`wide::F_*`, which also says whether NAT replies are possible).
#[inline(always)]
pub fn may_match(pkt: &Pkt, flags: &mut u64) -> bool {
    let addr = pkt.dst[0] ^ pkt.dst[1] ^ pkt.dst[2] ^ pkt.dst[3];
    if is_set(filter::bit(addr, pkt.dport, pkt.proto)) {
        return true;
    }
    *flags = match SERVICE_FILTER.get(filter::WORDS) {
        Some(f) => *f,
        None => return true,
    };
    let flags = *flags & !(wide::F_NAT | wide::F_NAT_ANY_PORT);
    if flags == 0 {
        return false;
    }
    let any = if pkt.proto == PROTO_TCP {
        wide::F_ANY_TCP
    } else {
        wide::F_ANY_UDP
    };
    flags & any != 0
        || (flags & wide::F_ADDR_WIDE != 0 && is_set(filter::bit(addr, 0, pkt.proto)))
        || (flags & wide::F_PREFIX_PORT != 0 && is_set(filter::bit(0, pkt.dport, pkt.proto)))
}

#[inline(always)]
fn is_set(bit: u32) -> bool {
    match SERVICE_FILTER.get(bit / 64) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        // Cannot happen (the index is masked); be safe and look further.
        None => true,
    }
}

/// The flag word (`wide::F_*`).
#[inline(always)]
pub fn flags() -> u64 {
    SERVICE_FILTER.get(filter::WORDS).map_or(0, |f| *f)
}
