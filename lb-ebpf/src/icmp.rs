//! ICMP. The errors the balancer sends itself: "fragmentation needed" (IPv4, DF set) and
//! ICMPv6 "packet too big" for packets that would exceed the path MTU once encapsulated, as
//! IPVS sends them (`ensure_mtu_is_adequate`), and for NAT replies too big for the client's
//! side; the packet is turned into the error in place and sent back out of the interface it
//! came in on, from the VIP. And the errors others send about the virtual services'
//! connections, relayed to the connections' real servers (`relay`), and those NAT real
//! servers send to clients, rewritten to come from the VIP (`nat::relay_icmp_to_client`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    BACKEND_F_AVAILABLE, FAMILY_V4, FLOW_DEAD, FlowKeyV4, FlowKeyV6, PROTO_TCP, PROTO_UDP, csum,
    reason,
};

use crate::{
    access::ETH_HLEN,
    flow::FlowKey,
    maps::BACKENDS,
    parse::{PROTO_ICMP, PROTO_ICMPV6, Pkt, at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// Bytes of the offending IPv6 packet quoted (RFC 4443 asks for as much as fits in 1280;
/// the headers that identify the flow are what the sender needs).
const V6_QUOTE: u32 = 128;
/// IPv4 quotes the header (up to 60 bytes) and the first 8 bytes of the payload (RFC 792).
const V4_QUOTE_WORDS: usize = 17;

/// Answers a packet too big for `mtu` (the largest packet the path takes) from `from`.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Pkt, mtu: u32, from: &[u32; 4]) -> (u32, u32) {
    if pkt.proto == PROTO_ICMP || pkt.proto == PROTO_ICMPV6 {
        // An ICMP error is never answered with one.
        return (xdp_action::XDP_DROP, reason::DROP_TOO_BIG);
    }
    let sent = if pkt.family == FAMILY_V4 {
        let Some(frag) = at::<u8>(ctx, pkt.l3 + 6) else {
            return (xdp_action::XDP_PASS, reason::PASS_TRUNCATED);
        };
        if unsafe { *frag } & 0x40 == 0 {
            // IPVS would fragment it; XDP cannot.
            return (xdp_action::XDP_DROP, reason::DROP_TOO_BIG);
        }
        frag_needed(ctx, pkt, mtu, from)
    } else {
        packet_too_big(ctx, pkt, mtu, from)
    };
    match sent {
        Some(()) => (xdp_action::XDP_TX, reason::TX_ICMP_TOO_BIG),
        None => (xdp_action::XDP_DROP, reason::DROP_TOO_BIG),
    }
}

/// Makes room for `extra` bytes of headers between the Ethernet header (with its VLAN tag)
/// and the packet, and addresses the frame back to its sender.
#[inline(always)]
fn prepend(ctx: &XdpContext, pkt: &Pkt, extra: u32) -> Option<()> {
    let eth = at::<[u16; 6]>(ctx, 0)?;
    let macs = unsafe { *eth };
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, -(extra as i32)) } != 0 {
        return None;
    }
    let eth = at::<[u16; 6]>(ctx, 0)?;
    unsafe {
        *eth = [macs[3], macs[4], macs[5], macs[0], macs[1], macs[2]];
    }
    // Ethertype (and the VLAN tag before it) as they were.
    let from = at::<u16>(ctx, extra as usize + 12)?;
    let to = at::<u16>(ctx, 12)?;
    unsafe { *to = *from };
    if pkt.l3 != ETH_HLEN {
        let from = at::<[u16; 2]>(ctx, extra as usize + 14)?;
        let to = at::<[u16; 2]>(ctx, 14)?;
        unsafe { *to = *from };
    }
    Some(())
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Option<()> {
    let cur = ctx.data_end() - ctx.data();
    if cur > len {
        let delta = (cur - len) as i32;
        if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_tail(ctx.ctx, -delta) } != 0 {
            return None;
        }
    }
    Some(())
}

/// Sum of `n` words from `off` (`n` at most `max`).
#[inline(always)]
fn sum_words(ctx: &XdpContext, off: usize, n: usize, max: usize) -> Option<u32> {
    let mut sum = 0;
    for i in 0..max {
        if i >= n {
            break;
        }
        let w = at::<u32>(ctx, off + i * 4)?;
        sum += csum::words(unsafe { *w });
    }
    Some(sum)
}

#[inline(always)]
fn frag_needed(ctx: &XdpContext, pkt: &Pkt, mtu: u32, from: &[u32; 4]) -> Option<()> {
    let hlen = pkt.l4 - pkt.l3;
    let quoted = hlen + 8;
    prepend(ctx, pkt, 28)?;
    let l2 = pkt.l3;
    truncate(ctx, l2 + 28 + quoted)?;
    let [mh, ml] = (mtu as u16).to_be_bytes();
    let icmp0 = u32::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0]);
    let icmp1 = u32::from_ne_bytes([0, 0, mh, ml]);
    let body = sum_words(ctx, l2 + 28, quoted / 4, V4_QUOTE_WORDS)?;
    let icheck = !csum::fold(csum::words(icmp0) + csum::words(icmp1) + body);
    let [lh, ll] = ((28 + quoted) as u16).to_be_bytes();
    // TOS as Linux sends ICMP errors: precedence "internetwork control".
    let w0 = u32::from_ne_bytes([0x45, 0xc0, lh, ll]);
    let w2 = u32::from_ne_bytes([64, PROTO_ICMP, 0, 0]);
    let (src, dst) = (from[0], pkt.src[0]);
    let check =
        !csum::fold(csum::words(w0) + csum::words(w2) + csum::words(src) + csum::words(dst));
    let h = at::<[u32; 7]>(ctx, l2)?;
    unsafe {
        (*h)[0] = w0;
        (*h)[1] = 0;
        (*h)[2] = w2 | (check as u32) << 16;
        (*h)[3] = src;
        (*h)[4] = dst;
        (*h)[5] = icmp0 | (icheck as u32) << 16;
        (*h)[6] = icmp1;
    }
    Some(())
}

#[inline(always)]
fn packet_too_big(ctx: &XdpContext, pkt: &Pkt, mtu: u32, from: &[u32; 4]) -> Option<()> {
    let quoted = if pkt.l3_len < V6_QUOTE {
        pkt.l3_len & !3
    } else {
        V6_QUOTE
    } as usize;
    prepend(ctx, pkt, 48)?;
    let l2 = pkt.l3;
    truncate(ctx, l2 + 48 + quoted)?;
    let len = (8 + quoted) as u16;
    let len_word = u16::from_ne_bytes(len.to_be_bytes()) as u32;
    let icmp0 = u32::from_ne_bytes([ICMPV6_PKT_TOOBIG, 0, 0, 0]);
    let icmp1 = u32::from_ne_bytes(mtu.to_be_bytes());
    let body = sum_words(ctx, l2 + 48, quoted / 4, V6_QUOTE as usize / 4)?;
    let mut sum = len_word + u16::from_ne_bytes([0, PROTO_ICMPV6]) as u32;
    for (s, f) in pkt.src.iter().zip(from) {
        sum += csum::words(*s) + csum::words(*f);
    }
    let icheck = !csum::fold(sum + csum::words(icmp0) + csum::words(icmp1) + body);
    let [lh, ll] = len.to_be_bytes();
    let h = at::<[u32; 12]>(ctx, l2)?;
    unsafe {
        (*h)[0] = u32::from_ne_bytes([0x60, 0, 0, 0]);
        (*h)[1] = u32::from_ne_bytes([lh, ll, PROTO_ICMPV6, 64]);
        for (i, (f, s)) in from.iter().zip(&pkt.src).enumerate() {
            (*h)[2 + i] = *f;
            (*h)[6 + i] = *s;
        }
        (*h)[10] = icmp0 | (icheck as u32) << 16;
        (*h)[11] = icmp1;
    }
    Some(())
}

/// The packet an ICMP error quotes (one a virtual service sent: VIP and service port as
/// source), as far as the error carries it.
pub struct Quoted {
    /// Offsets of the quoted IP header and of its ports.
    pub q3: usize,
    pub q4: usize,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// The quoted packet of ICMP error `pkt` (`parse_as::<MODE_ICMP>`), if it is a TCP/UDP packet
/// (not a later fragment) with its ports.
#[inline(always)]
pub fn quoted(ctx: &XdpContext, pkt: &Pkt) -> Option<Quoted> {
    let q3 = pkt.l4 + 8;
    let mut q = Quoted {
        q3,
        q4: 0,
        src: [0; 4],
        dst: [0; 4],
        sport: 0,
        dport: 0,
        proto: 0,
    };
    if pkt.family == FAMILY_V4 {
        let h = at::<[u8; 20]>(ctx, q3)?;
        let h = unsafe { &*h };
        let ihl = (h[0] & 0x0f) as usize * 4;
        if h[0] >> 4 != 4 || ihl < 20 || (h[6] & 0x1f) != 0 || h[7] != 0 {
            return None;
        }
        q.proto = h[9];
        q.q4 = q3 + ihl;
        let w = at::<[u32; 5]>(ctx, q3)?;
        let w = unsafe { &*w };
        q.src[0] = w[3];
        q.dst[0] = w[4];
    } else {
        let w = at::<[u32; 10]>(ctx, q3)?;
        let w = unsafe { &*w };
        if (w[0] as u8) >> 4 != 6 {
            return None;
        }
        q.proto = (u32::from_be(w[1]) >> 8) as u8;
        q.q4 = q3 + 40;
        q.src = [w[2], w[3], w[4], w[5]];
        q.dst = [w[6], w[7], w[8], w[9]];
    }
    if q.proto != PROTO_TCP && q.proto != PROTO_UDP {
        return None;
    }
    let ports = at::<[u16; 2]>(ctx, q.q4)?;
    let [sport, dport] = unsafe { *ports };
    q.sport = sport;
    q.dport = dport;
    Some(q)
}

/// An ICMP error (`xlb_icmp`): if it quotes a packet of a connection of a virtual service
/// (sent from the VIP to the client), it goes to the connection's real server with the
/// connection's forwarding method, as IPVS relays them (`ip_vs_in_icmp`), so path MTU
/// discovery and unreachable reports reach the server that holds the connection.
#[inline(always)]
pub fn relay(ctx: &XdpContext) -> (u32, u32) {
    let pkt = match crate::parse::parse_as::<{ crate::parse::MODE_ICMP }>(ctx) {
        Ok(p) => p,
        Err(why) => return (xdp_action::XDP_PASS, why),
    };
    let unrelated = (xdp_action::XDP_PASS, reason::PASS_ICMP_UNRELATED);
    let Some(q) = quoted(ctx, &pkt) else {
        return unrelated;
    };
    // The error went where the quoted packet came from. About a packet a VIP sent (to a
    // client) it goes to the connection's real server; otherwise it may be a NAT real
    // server's error about a client's packet, going to the client.
    if q.src != pkt.dst {
        return unrelated;
    }
    let index = if pkt.family == FAMILY_V4 {
        connection::<FlowKeyV4>(&q)
    } else {
        connection::<FlowKeyV6>(&q)
    };
    let Some(index) = index else {
        return crate::nat::relay_icmp_to_client(ctx, &pkt, &q);
    };
    if pkt.ttl <= 1 {
        return (xdp_action::XDP_PASS, reason::PASS_TTL_EXPIRED);
    }
    let verdict = crate::xmit::forward(ctx, &pkt, index);
    if verdict.1 == reason::TX || verdict.1 == reason::REDIRECT {
        crate::stats::count(reason::EV_ICMP_RELAYED);
    }
    verdict
}

/// The live connection whose reply `q` is: its real server's index.
#[inline(always)]
fn connection<K: FlowKey>(q: &Quoted) -> Option<u32> {
    let key = K::from_parts(&q.dst, &q.src, q.dport, q.sport, q.proto);
    let flow = crate::conntable::get(&key)?.flow();
    let flow = unsafe { &*flow };
    if flow.status & FLOW_DEAD != 0 {
        return None;
    }
    let be = BACKENDS.get(flow.backend)?.current();
    (be.flags & BACKEND_F_AVAILABLE != 0 && be.generation == flow.generation)
        .then_some(flow.backend)
}
