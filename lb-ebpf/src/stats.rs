//! Per-CPU counters: no atomics, no contention; the controller sums the CPUs when it reads.

use crate::maps::{BACKEND_STATS, REASONS, SERVICE_STATS};

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = REASONS.get_ptr_mut(reason) {
        unsafe { *c += 1 };
    }
}

/// A packet of `bytes` (L3 length) was forwarded for a service to a real server;
/// `new_conn` when it opened the connection. One update per counter block.
#[inline(always)]
pub fn forwarded(service_id: u32, backend: u32, bytes: u32, new_conn: bool) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        let c = unsafe { &mut *c };
        c.in_packets += 1;
        c.in_bytes += bytes as u64;
        c.conns += new_conn as u64;
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        let c = unsafe { &mut *c };
        c.in_packets += 1;
        c.in_bytes += bytes as u64;
        c.conns += new_conn as u64;
    }
}

/// A connection was scheduled but its first packet could not be forwarded.
#[inline(always)]
pub fn new_conn(service_id: u32, backend: u32) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        unsafe { (*c).conns += 1 };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        unsafe { (*c).conns += 1 };
    }
}

/// A NAT reply of `bytes` (L3 length) went back to the client (IPVS OutPkts / OutBytes).
#[inline(always)]
pub fn replied(service_id: u32, backend: u32, bytes: u32) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        let c = unsafe { &mut *c };
        c.out_packets += 1;
        c.out_bytes += bytes as u64;
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        let c = unsafe { &mut *c };
        c.out_packets += 1;
        c.out_bytes += bytes as u64;
    }
}
