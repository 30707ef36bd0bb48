//! NAT (IPVS `-m`, masquerading). Client packets get the real server's address and port as
//! destination; the real server's replies come back through the balancer (it is their
//! gateway), are matched to their connection and get the VIP and service port back as
//! source, then go toward the client by the kernel's routing table (`bpf_fib_lookup`).
//!
//! A reply is found by its own tuple in `NAT_V4`/`NAT_V6`, written when the connection is
//! created and removed when it ends; the connection itself (state, timeouts, counts) stays
//! the flow table's entry, which the reply checks and drives with IPVS's OUTPUT table. An
//! entry left behind by a path that could not remove it is harmless: the reply also needs
//! the live connection, and the map is an LRU.

use aya_ebpf::{
    bindings::xdp_action,
    maps::{LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_AVAILABLE, Backend, EVENT_ROUTE_MISSING, FAMILY_V4, FLOW_DEAD, Flow, FlowKeyV4,
    FlowKeyV6, Fragment, NatRoute, NatV4, NatV6, PROTO_TCP, PROTO_UDP, csum, filter, forward, frag,
    reason,
    tcp::{self, Direction, state},
    wide,
};

use crate::{
    acct,
    flow::FlowKey,
    maps::{BACKENDS, FIB_SCRATCH, NAT_SCRATCH_V4, NAT_SCRATCH_V6, NAT_SOURCES, NAT_V4, NAT_V6},
    parse::{Pkt, at},
    stats, xmit,
};

/// A family's reply map.
pub trait NatKey: Sized + 'static {
    type Entry: NatEntry;
    fn nat_table() -> &'static LruHashMap<Self, Self::Entry>;
    /// A per-CPU entry to build a new one in.
    fn scratch() -> &'static PerCpuArray<Self::Entry>;
    /// The tuple of a reply: from the real server (`addr`, `port`) to the client of `self`.
    fn reply_tuple(&self, addr: &[u32; 4], port: u16) -> Self;
    /// The connection's own key from a reply's packet and its entry.
    fn connection(pkt: &Pkt, nat: &Self::Entry) -> Self;
}

pub trait NatEntry: Copy + 'static {
    /// Sets the VIP (IPv4 in word 0) and service port, as on the wire.
    fn set_service(&mut self, vip: &[u32; 4], vport: u16);
    fn vip(&self) -> [u32; 4];
    fn vport(&self) -> u16;
    fn route(&self) -> &NatRoute;
    fn route_mut(&mut self) -> &mut NatRoute;
}

impl NatKey for FlowKeyV4 {
    type Entry = NatV4;
    #[inline(always)]
    fn nat_table() -> &'static LruHashMap<Self, NatV4> {
        &NAT_V4
    }
    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<NatV4> {
        &NAT_SCRATCH_V4
    }
    #[inline(always)]
    fn reply_tuple(&self, addr: &[u32; 4], port: u16) -> Self {
        FlowKeyV4::new(addr[0], self.src, port, self.sport, self.proto)
    }
    #[inline(always)]
    fn connection(pkt: &Pkt, nat: &NatV4) -> Self {
        FlowKeyV4::new(pkt.dst[0], nat.vip, pkt.dport, nat.vport, pkt.proto)
    }
}

impl NatKey for FlowKeyV6 {
    type Entry = NatV6;
    #[inline(always)]
    fn nat_table() -> &'static LruHashMap<Self, NatV6> {
        &NAT_V6
    }
    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<NatV6> {
        &NAT_SCRATCH_V6
    }
    #[inline(always)]
    fn reply_tuple(&self, addr: &[u32; 4], port: u16) -> Self {
        FlowKeyV6::new(*addr, self.src, port, self.sport, self.proto)
    }
    #[inline(always)]
    fn connection(pkt: &Pkt, nat: &NatV6) -> Self {
        FlowKeyV6::new(pkt.dst, nat.vip, pkt.dport, nat.vport, pkt.proto)
    }
}

impl NatEntry for NatV4 {
    #[inline(always)]
    fn route(&self) -> &NatRoute {
        &self.route
    }
    #[inline(always)]
    fn route_mut(&mut self) -> &mut NatRoute {
        &mut self.route
    }
    #[inline(always)]
    fn set_service(&mut self, vip: &[u32; 4], vport: u16) {
        self.vip = vip[0];
        self.vport = vport;
    }
    #[inline(always)]
    fn vip(&self) -> [u32; 4] {
        [self.vip, 0, 0, 0]
    }
    #[inline(always)]
    fn vport(&self) -> u16 {
        self.vport
    }
}

impl NatEntry for NatV6 {
    #[inline(always)]
    fn route(&self) -> &NatRoute {
        &self.route
    }
    #[inline(always)]
    fn route_mut(&mut self) -> &mut NatRoute {
        &mut self.route
    }
    #[inline(always)]
    fn set_service(&mut self, vip: &[u32; 4], vport: u16) {
        self.vip = *vip;
        self.vport = vport;
    }
    #[inline(always)]
    fn vip(&self) -> [u32; 4] {
        self.vip
    }
    #[inline(always)]
    fn vport(&self) -> u16 {
        self.vport
    }
}

/// The port a NAT real server listens on for a packet to `dport` (0 = the packet's own, for
/// port-0 services).
#[inline(always)]
fn server_port(be: &Backend, dport: u16) -> u16 {
    if be.port != 0 { be.port } else { dport }
}

/// Client → server: destination address and port become the real server's.
#[inline(always)]
pub fn to_server(ctx: &XdpContext, pkt: &Pkt, be: &Backend) -> Option<()> {
    rewrite(ctx, pkt, false, &be.addr, server_port(be, pkt.dport))
}

/// Rewrites the source (`src`) or destination address and port, updating the IPv4 header
/// checksum and the TCP/UDP checksum (whose pseudo-header holds the addresses) incrementally.
#[inline(always)]
fn rewrite(ctx: &XdpContext, pkt: &Pkt, src: bool, addr: &[u32; 4], port: u16) -> Option<()> {
    rewrite_parts(ctx, pkt, src, addr, port, true)
}

/// A later fragment (no L4 header): the address alone (and the IPv4 header checksum); the
/// datagram's L4 checksum, in its first fragment, covered the change already.
#[inline(always)]
pub fn later_fragment_to_server(ctx: &XdpContext, pkt: &Pkt, be: &Backend) -> Option<()> {
    rewrite_parts(ctx, pkt, false, &be.addr, 0, false)
}

#[inline(always)]
fn rewrite_parts(
    ctx: &XdpContext,
    pkt: &Pkt,
    src: bool,
    addr: &[u32; 4],
    port: u16,
    l4: bool,
) -> Option<()> {
    let (old_addr, old_port) = if src {
        (&pkt.src, pkt.sport)
    } else {
        (&pkt.dst, pkt.dport)
    };
    let port_off = pkt.l4 + if src { 0 } else { 2 };
    // One's-complement difference of the changed words, for the L4 checksum.
    let mut delta: u32 = 0;
    if pkt.family == FAMILY_V4 {
        let off = pkt.l3 + if src { 12 } else { 16 };
        let a = at::<u32>(ctx, off)?;
        let check = at::<u16>(ctx, pkt.l3 + 10)?;
        unsafe {
            *a = addr[0];
            *check = csum::replace32(*check, old_addr[0], addr[0]);
        }
        delta += word_delta(old_addr[0], addr[0]);
    } else {
        let off = pkt.l3 + if src { 8 } else { 24 };
        let a = at::<[u32; 4]>(ctx, off)?;
        unsafe { *a = *addr };
        for i in 0..4 {
            delta += word_delta(old_addr[i], addr[i]);
        }
    }
    if !l4 {
        return Some(());
    }
    let p = at::<u16>(ctx, port_off)?;
    unsafe { *p = port };
    delta += (!old_port as u32) + port as u32;
    let check_off = if pkt.proto == PROTO_TCP {
        pkt.l4 + 16
    } else {
        pkt.l4 + 6
    };
    let check = at::<u16>(ctx, check_off)?;
    unsafe {
        let c = *check;
        if pkt.proto == PROTO_UDP && c == 0 {
            // IPv4 UDP without a checksum stays without (a zero IPv6 UDP checksum is invalid
            // anyway and is left for the server to drop).
            return Some(());
        }
        let mut n = !csum::fold((!c as u32) + delta);
        if pkt.proto == PROTO_UDP && n == 0 {
            n = 0xffff;
        }
        *check = n;
    }
    Some(())
}

/// Client → server, an ICMP error about the connection (`icmp::relay`): the outer
/// destination becomes the real server, and so do the quoted packet's source address and
/// port (its IPv4 header checksum follows); the ICMP checksum is updated for all of it (and
/// for ICMPv6's pseudo-header). The quoted TCP/UDP checksum is left as it is, as IPVS does
/// (`ip_vs_nat_icmp`): the quote is usually cut short anyway.
#[inline(always)]
pub fn icmp_to_server(ctx: &XdpContext, pkt: &Pkt, be: &Backend) -> Option<()> {
    let q = crate::icmp::quoted(ctx, pkt)?;
    let port = server_port(be, q.sport);
    let mut delta: u32 = 0;
    if pkt.family == FAMILY_V4 {
        let dst = at::<u32>(ctx, pkt.l3 + 16)?;
        let check = at::<u16>(ctx, pkt.l3 + 10)?;
        let qsrc = at::<u32>(ctx, q.q3 + 12)?;
        let qcheck = at::<u16>(ctx, q.q3 + 10)?;
        unsafe {
            *dst = be.addr[0];
            *check = csum::replace32(*check, pkt.dst[0], be.addr[0]);
            *qsrc = be.addr[0];
            let old = *qcheck;
            let new = csum::replace32(old, q.src[0], be.addr[0]);
            *qcheck = new;
            delta += word_delta(q.src[0], be.addr[0]) + (!old as u32) + new as u32;
        }
    } else {
        let dst = at::<[u32; 4]>(ctx, pkt.l3 + 24)?;
        let qsrc = at::<[u32; 4]>(ctx, q.q3 + 8)?;
        unsafe {
            *dst = be.addr;
            *qsrc = be.addr;
        }
        for i in 0..4 {
            // The pseudo-header's destination and the quoted source.
            delta += word_delta(pkt.dst[i], be.addr[i]) + word_delta(q.src[i], be.addr[i]);
        }
    }
    let sport = at::<u16>(ctx, q.q4)?;
    unsafe { *sport = port };
    delta += (!q.sport as u32) + port as u32;
    let check = at::<u16>(ctx, pkt.l4 + 2)?;
    unsafe { *check = !csum::fold((!*check as u32) + delta) };
    Some(())
}

/// Server → client, an ICMP error a NAT real server sends about a client's packet (port
/// unreachable, say; IPVS `ip_vs_out_icmp`): it must come from the VIP and quote the packet
/// as the client sent it, so the outer source and the quoted destination address and port
/// become the VIP's again; then it goes toward the client as replies do.
#[inline(always)]
pub fn relay_icmp_to_client(ctx: &XdpContext, pkt: &Pkt, q: &crate::icmp::Quoted) -> (u32, u32) {
    if pkt.family == FAMILY_V4 {
        icmp_to_client_in::<FlowKeyV4>(ctx, pkt, q)
    } else {
        icmp_to_client_in::<FlowKeyV6>(ctx, pkt, q)
    }
}

#[inline(always)]
fn icmp_to_client_in<K: FlowKey>(
    ctx: &XdpContext,
    pkt: &Pkt,
    q: &crate::icmp::Quoted,
) -> (u32, u32) {
    let unrelated = (xdp_action::XDP_PASS, reason::PASS_ICMP_UNRELATED);
    // Sent by the server the quoted packet went to.
    if pkt.src != q.dst {
        return unrelated;
    }
    let reply = K::from_parts(&q.dst, &q.src, q.dport, q.sport, q.proto);
    let Some(nat) = K::nat_table().get_ptr(&reply) else {
        return unrelated;
    };
    let nat = unsafe { *nat };
    let r = nat.route();
    let Some(slot) = BACKENDS.get(r.backend) else {
        return unrelated;
    };
    let be = slot.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.generation != r.generation || be.addr != pkt.src {
        return unrelated;
    }
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, reason::PASS_TTL_EXPIRED);
    }
    let vip = nat.vip();
    let route = match route_to_client(ctx, pkt, &vip, 0) {
        Ok(route) => route,
        Err(verdict) => return verdict,
    };
    let sent = icmp_to_client(ctx, pkt, q, &vip, nat.vport()).is_some()
        && xmit::decrement_ttl(ctx, pkt).is_some()
        && xmit::set_macs(ctx, &route.dmac, &route.smac).is_some();
    if !sent {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    let verdict = xmit::transmit(ctx, route.ifindex);
    if verdict.1 == reason::TX || verdict.1 == reason::REDIRECT {
        stats::count(reason::EV_ICMP_RELAYED);
    }
    verdict
}

/// The rewrite of `relay_icmp_to_client`, checksums included (the ICMP checksum, the quoted
/// IPv4 header's, and ICMPv6's pseudo-header).
#[inline(always)]
fn icmp_to_client(
    ctx: &XdpContext,
    pkt: &Pkt,
    q: &crate::icmp::Quoted,
    vip: &[u32; 4],
    vport: u16,
) -> Option<()> {
    let mut delta: u32 = 0;
    if pkt.family == FAMILY_V4 {
        let src = at::<u32>(ctx, pkt.l3 + 12)?;
        let check = at::<u16>(ctx, pkt.l3 + 10)?;
        let qdst = at::<u32>(ctx, q.q3 + 16)?;
        let qcheck = at::<u16>(ctx, q.q3 + 10)?;
        unsafe {
            *src = vip[0];
            *check = csum::replace32(*check, pkt.src[0], vip[0]);
            *qdst = vip[0];
            let old = *qcheck;
            let new = csum::replace32(old, q.dst[0], vip[0]);
            *qcheck = new;
            delta += word_delta(q.dst[0], vip[0]) + (!old as u32) + new as u32;
        }
    } else {
        let src = at::<[u32; 4]>(ctx, pkt.l3 + 8)?;
        let qdst = at::<[u32; 4]>(ctx, q.q3 + 24)?;
        unsafe {
            *src = *vip;
            *qdst = *vip;
        }
        for (i, v) in vip.iter().enumerate() {
            // The pseudo-header's source and the quoted destination.
            delta += word_delta(pkt.src[i], *v) + word_delta(q.dst[i], *v);
        }
    }
    let dport = at::<u16>(ctx, q.q4 + 2)?;
    unsafe { *dport = vport };
    delta += (!q.dport as u32) + vport as u32;
    let check = at::<u16>(ctx, pkt.l4 + 2)?;
    unsafe { *check = !csum::fold((!*check as u32) + delta) };
    Some(())
}

/// One's-complement difference of a 32-bit word changing from `old` to `new`.
#[inline(always)]
fn word_delta(old: u32, new: u32) -> u32 {
    csum::words(!old) + csum::words(new)
}

/// Records a new NAT connection's reply tuple (`key` is the connection's).
#[inline(always)]
pub fn record<K: FlowKey>(key: &K, pkt: &Pkt, index: u32, be: &Backend) {
    record_for(key, &pkt.dst, pkt.dport, index, be);
}

/// [`record`] for a connection to `vip`:`vport` (as on the wire) that no packet brought (a
/// synchronised one).
#[inline(always)]
pub fn record_for<K: FlowKey>(key: &K, vip: &[u32; 4], vport: u16, index: u32, be: &Backend) {
    if be.forward != forward::NAT {
        return;
    }
    let reply = key.reply_tuple(&be.addr, server_port(be, vport));
    // Built in a per-CPU scratch entry: on the stack it would push the new-flow programs'
    // frames past the verifier's bounds.
    let Some(entry) = K::scratch().get_ptr_mut(0) else {
        return;
    };
    // Zeroed word by word (a struct literal would become a call to `memset`).
    let entry = crate::zeroed(unsafe { &mut *(entry as *mut core::mem::MaybeUninit<K::Entry>) });
    entry.set_service(vip, vport);
    let r = entry.route_mut();
    r.backend = index;
    r.generation = be.generation;
    if K::nat_table().insert(&reply, entry, 0).is_err() {
        stats::count(reason::EV_NAT_INSERT_FAILED);
    }
}

/// Whether a new connection to NAT real server `be` can have its reply tuple: unused, or
/// left by a server entry that was replaced, or already this connection's (VIP and port). Another
/// service mapped to the same real server port (port sets, or two VIPs to one server port)
/// with a live connection from the same client address and port holds it otherwise, and
/// their replies could not be told apart.
#[inline(always)]
pub fn reply_tuple_free<K: FlowKey>(key: &K, pkt: &Pkt, be: &Backend) -> bool {
    reply_tuple_free_for(key, &pkt.dst, pkt.dport, be)
}

/// [`reply_tuple_free`] for a connection to `vip`:`vport` (as on the wire).
#[inline(always)]
pub fn reply_tuple_free_for<K: FlowKey>(key: &K, vip: &[u32; 4], vport: u16, be: &Backend) -> bool {
    if be.forward != forward::NAT {
        return true;
    }
    let reply = key.reply_tuple(&be.addr, server_port(be, vport));
    let Some(e) = K::nat_table().get_ptr(&reply) else {
        return true;
    };
    let e = unsafe { &*e };
    if e.vip() == *vip && e.vport() == vport {
        return true;
    }
    // A connection's entry goes when the connection ends (`forget`), unless its server
    // entry was replaced meanwhile: an entry of a replaced server is stale.
    let r = e.route();
    match BACKENDS.get(r.backend) {
        Some(slot) => slot.current().generation != r.generation,
        None => true,
    }
}

/// A connection ended: its reply tuple goes too (if its server is still the one it had).
#[inline(always)]
pub fn forget<K: FlowKey>(key: &K, flow: &Flow) {
    let Some(slot) = BACKENDS.get(flow.backend) else {
        return;
    };
    let be = slot.current();
    if be.forward != forward::NAT || be.generation != flow.generation {
        return;
    }
    let dport = key.service_port();
    let reply = key.reply_tuple(&be.addr, server_port(be, dport));
    // Only this connection's: another service's connection may have taken the tuple since.
    let ours = match K::nat_table().get_ptr(&reply) {
        Some(e) => {
            let e = unsafe { &*e };
            e.vip() == key.service_addr() && e.vport() == dport
        }
        None => false,
    };
    if ours {
        let _ = K::nat_table().remove(&reply);
    }
}

/// Whether the packet may come from a NAT real server (`flags`: the service prefilter's flag
/// word): one bit per (source, port, protocol), and servers that answer from any port (port-0
/// services) under port 0.
#[inline(always)]
pub fn may_be_reply(pkt: &Pkt, flags: u64) -> bool {
    if flags & wide::F_NAT == 0 {
        return false;
    }
    let addr = pkt.src[0] ^ pkt.src[1] ^ pkt.src[2] ^ pkt.src[3];
    if is_set(filter::bit(addr, pkt.sport, pkt.proto)) {
        return true;
    }
    flags & wide::F_NAT_ANY_PORT != 0 && is_set(filter::bit(addr, 0, pkt.proto))
}

#[inline(always)]
fn is_set(bit: u32) -> bool {
    match NAT_SOURCES.get(bit / 64) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        None => false,
    }
}

/// Whether the packet's tuple is a NAT connection's reply tuple.
#[inline(always)]
pub fn is_reply(pkt: &Pkt) -> bool {
    if pkt.family == FAMILY_V4 {
        NAT_V4.get_ptr(&FlowKeyV4::from_pkt(pkt)).is_some()
    } else {
        NAT_V6.get_ptr(&FlowKeyV6::from_pkt(pkt)).is_some()
    }
}

/// A reply from a NAT real server: back to the client as the virtual service's packet.
#[inline(always)]
pub fn reply(ctx: &XdpContext, pkt: &Pkt, now: u32) -> (u32, u32) {
    if pkt.family == FAMILY_V4 {
        reply_in::<FlowKeyV4>(ctx, pkt, now)
    } else {
        reply_in::<FlowKeyV6>(ctx, pkt, now)
    }
}

/// `bpf_fib_lookup`'s parameters (`struct bpf_fib_lookup`, 64 bytes).
#[repr(C)]
pub struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    /// In: packet length; out: the route's MTU.
    tot_len: u16,
    /// In: ingress interface; out: egress interface.
    ifindex: u32,
    /// IPv4 TOS byte, or the IPv6 flow information word.
    tos_flowinfo: u32,
    src: [u32; 4],
    /// In: destination; out: the next hop.
    dst: [u32; 4],
    vlan: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;

#[inline(always)]
fn reply_in<K: FlowKey>(ctx: &XdpContext, pkt: &Pkt, now: u32) -> (u32, u32) {
    let no_flow = (xdp_action::XDP_PASS, reason::PASS_NAT_NO_FLOW);
    let Some(nat_ptr) = K::nat_table().get_ptr_mut(&K::from_pkt(pkt)) else {
        return no_flow;
    };
    let nat = unsafe { *nat_ptr };
    let key = K::connection(pkt, &nat);
    let Some(entry) = crate::conntable::get(&key).map(|f| f.flow()) else {
        return no_flow;
    };
    let status_ptr = unsafe { &raw mut (*entry).status };
    let status = unsafe { core::ptr::read_volatile(status_ptr) };
    if status & FLOW_DEAD != 0 {
        return no_flow;
    }
    let flow = unsafe { &mut *entry };
    let Some(slot) = BACKENDS.get(flow.backend) else {
        return no_flow;
    };
    let be = slot.current();
    let from_server = be.flags & BACKEND_F_AVAILABLE != 0
        && be.generation == flow.generation
        && be.forward == forward::NAT
        && be.addr == pkt.src
        && server_port(be, nat.vport()) == pkt.sport;
    if !from_server {
        return no_flow;
    }
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, reason::PASS_TTL_EXPIRED);
    }
    let mut now_state = if pkt.proto == PROTO_TCP {
        status as u8
    } else {
        state::UDP
    };
    if pkt.proto == PROTO_TCP {
        let st = status as u8;
        let next = tcp::next_state(Direction::Output, st, pkt.tcp_flags);
        now_state = next;
        if next != st && acct::cas(status_ptr, status, next as u32) {
            crate::flow::changed(&key, flow.backend, st, next);
            crate::sync::conn(&key, flow, next);
        }
    }
    if flow.last_seen != now {
        flow.last_seen = now;
    }
    let vip = nat.vip();
    if pkt.frag == frag::FIRST {
        crate::frag::record(ctx, pkt, frag::REPLY, flow.backend, be.generation, &vip);
    }
    let route = match route_to_client(ctx, pkt, &vip, nat.vport()) {
        Ok(r) => r,
        Err(verdict) => return verdict,
    };
    // Cache the check and the route for the fast path (`fast_reply`); the stamp last.
    let cache = unsafe { (*nat_ptr).route_mut() };
    cache.backend = flow.backend;
    cache.generation = be.generation;
    cache.ifindex = route.ifindex;
    cache.dmac = route.dmac;
    cache.smac = route.smac;
    cache.mtu = route.mtu;
    cache.state = now_state as u32;
    unsafe { core::ptr::write_volatile(&raw mut cache.stamp, now | 1) };
    send_to_client(
        ctx,
        pkt,
        &vip,
        Some(nat.vport()),
        &route,
        flow.backend,
        be.service_id,
    )
}

/// The main program's part: a reply of a connection whose full check (`reply_in`) is
/// fresh, that cannot change the connection's state, goes straight back with the cached
/// route. `None`: take the full path.
#[inline(always)]
pub fn fast_reply(ctx: &XdpContext, pkt: &Pkt, now: u32) -> Option<(u32, u32)> {
    if pkt.family == FAMILY_V4 {
        fast_reply_in::<FlowKeyV4>(ctx, pkt, now)
    } else {
        fast_reply_in::<FlowKeyV6>(ctx, pkt, now)
    }
}

#[inline(always)]
fn fast_reply_in<K: FlowKey>(ctx: &XdpContext, pkt: &Pkt, now: u32) -> Option<(u32, u32)> {
    let is_tcp = pkt.proto == PROTO_TCP;
    let f = pkt.tcp_flags;
    let state_neutral_ack =
        f & (tcp::flags::SYN | tcp::flags::FIN | tcp::flags::RST) == 0 && f & tcp::flags::ACK != 0;
    if (is_tcp && !state_neutral_ack) || pkt.frag != frag::NONE || pkt.ttl <= 1 {
        return None;
    }
    let nat = K::nat_table().get_ptr(&K::from_pkt(pkt))?;
    let nat = unsafe { &*nat };
    let r = nat.route();
    let stamp = unsafe { core::ptr::read_volatile(&r.stamp) };
    if stamp == 0 || now.wrapping_sub(stamp) > lb_common::nat::REFRESH {
        return None;
    }
    let settled = if is_tcp {
        state::ESTABLISHED
    } else {
        state::UDP
    };
    if r.state != settled as u32 || pkt.l3_len > r.mtu {
        return None;
    }
    let be = BACKENDS.get(r.backend)?.current();
    if be.flags & BACKEND_F_AVAILABLE == 0
        || be.generation != r.generation
        || be.addr != pkt.src
        || server_port(be, nat.vport()) != pkt.sport
    {
        return None;
    }
    let route = Route {
        ifindex: r.ifindex,
        dmac: r.dmac,
        smac: r.smac,
        mtu: r.mtu,
    };
    Some(send_to_client(
        ctx,
        pkt,
        &nat.vip(),
        Some(nat.vport()),
        &route,
        r.backend,
        be.service_id,
    ))
}

/// A later fragment of a NAT reply (its first one was recorded by `reply_in`).
#[inline(always)]
pub fn reply_fragment(ctx: &XdpContext, pkt: &Pkt, f: &Fragment, be: &Backend) -> (u32, u32) {
    if be.forward != forward::NAT || be.addr != pkt.src {
        return (xdp_action::XDP_PASS, reason::PASS_FRAGMENT);
    }
    match route_to_client(ctx, pkt, &f.vip, 0) {
        Ok(route) => send_to_client(ctx, pkt, &f.vip, None, &route, f.backend, be.service_id),
        Err(verdict) => verdict,
    }
}

/// Where a reply to the client leaves: egress interface and MACs, and the route's MTU.
pub struct Route {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
    mtu: u32,
}

/// The kernel's route from the VIP to the client (`bpf_fib_lookup`), or the verdict for a
/// reply that has none yet.
#[inline(always)]
fn route_to_client(
    ctx: &XdpContext,
    pkt: &Pkt,
    vip: &[u32; 4],
    vport: u16,
) -> Result<Route, (u32, u32)> {
    let vip = *vip;
    let Some(fib) = FIB_SCRATCH.get_ptr_mut(0) else {
        return Err((xdp_action::XDP_DROP, reason::DROP_INTERNAL));
    };
    let fib = unsafe { &mut *fib };
    fib.family = if pkt.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    fib.l4_protocol = pkt.proto;
    fib.sport = vport;
    fib.dport = pkt.dport;
    fib.tot_len = pkt.l3_len as u16;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    fib.tos_flowinfo = 0;
    fib.src = vip;
    fib.dst = pkt.dst;
    fib.vlan = 0;
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib as *mut FibParams as *mut _,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == FIB_FRAG_NEEDED {
        // Too big for the client's side: the real server hears it as from any router on
        // the way, with the route's MTU (from the VIP, the address it sent to).
        return Err(crate::icmp::too_big(ctx, pkt, fib.tot_len as u32, &vip));
    }
    if rc != FIB_SUCCESS {
        if rc == FIB_NO_NEIGH {
            // The kernel filled in the egress interface and the next hop.
            xmit::report(
                EVENT_ROUTE_MISSING,
                fib.ifindex,
                pkt.family as u32,
                &fib.dst,
            );
        }
        return Err((xdp_action::XDP_DROP, reason::DROP_NAT_NO_ROUTE));
    }
    Ok(Route {
        ifindex: fib.ifindex,
        dmac: fib.dmac,
        smac: fib.smac,
        // Out: the route's MTU.
        mtu: fib.tot_len as u32,
    })
}

/// Sends a reply toward the client as the VIP (and service port, unless a later fragment)
/// by `route`: rewrite, transmit, count.
#[inline(always)]
fn send_to_client(
    ctx: &XdpContext,
    pkt: &Pkt,
    vip: &[u32; 4],
    vport: Option<u16>,
    route: &Route,
    backend: u32,
    service_id: u32,
) -> (u32, u32) {
    let rewritten = match vport {
        Some(port) => rewrite(ctx, pkt, true, vip, port),
        None => rewrite_parts(ctx, pkt, true, vip, 0, false),
    };
    let sent = rewritten.is_some()
        && xmit::decrement_ttl(ctx, pkt).is_some()
        && xmit::set_macs(ctx, &route.dmac, &route.smac).is_some();
    if !sent {
        return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
    }
    let verdict = xmit::transmit(ctx, route.ifindex);
    if verdict.1 == reason::TX || verdict.1 == reason::REDIRECT {
        stats::replied(service_id, backend, pkt.l3_len);
    }
    verdict
}
