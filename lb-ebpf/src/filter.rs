//! The service prefilter: a bitmap with one bit per hash of (destination address, port,
//! protocol), set by the controller for every virtual service. Packets whose bit is clear are
//! not for a service and go to the kernel after one array read, without a hash lookup; packets
//! of established flows then go straight to the connection table.

use lb_common::filter;

use crate::{maps::SERVICE_FILTER, parse::Pkt};

#[inline(always)]
pub fn may_match(pkt: &Pkt) -> bool {
    let addr = pkt.dst[0] ^ pkt.dst[1] ^ pkt.dst[2] ^ pkt.dst[3];
    let bit = filter::bit(addr, pkt.dport, pkt.proto);
    match SERVICE_FILTER.get(bit / 64) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        // Cannot happen (the index is masked); be safe and look further.
        None => true,
    }
}
