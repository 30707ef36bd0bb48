//! VRRP advertisements (v2: RFC 3768; v3: RFC 5798/9568) byte for byte as keepalived 2.2.7
//! sends and checks them, so xlb and keepalived can share a virtual router; plus the
//! gratuitous ARP and unsolicited neighbour advertisement frames a new master sends.
//!
//! Pure functions on byte buffers: the sockets live elsewhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number (IPv6 next header) of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// IPv4 multicast group adverts go to (link-local scope).
pub const MCAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// IPv6 multicast group adverts go to.
pub const MCAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// TTL / hop limit adverts are sent with and (in multicast mode) must arrive with, which
/// proves the sender is on the link.
pub const VRRP_TTL: u8 = 255;

/// Version/type, VRID, priority, count, auth type or interval, checksum.
const HDR_LEN: usize = 8;
/// v2's authentication data, present even without authentication.
const AUTH_LEN: usize = 8;
/// Largest VRRP message (padding included) that can be followed by Ethernet minimum-frame
/// padding: a 60-byte frame minus the 14-byte Ethernet and the 20-byte IPv4 headers. Larger
/// messages never get padded, so extra bytes there are garbage, not padding. (IPv6 adverts
/// are always longer than the minimum frame.)
const MAX_PADDED_V4_MSG: usize = 60 - 14 - 20;
/// Advert type ADVERTISEMENT, the only one defined.
const TYPE_ADVERT: u8 = 1;
const V2_AUTH_NONE: u8 = 0;
const V2_AUTH_PASS: u8 = 1;
const V2_AUTH_AH: u8 = 2;
/// v3's interval field is the low 12 bits; the top 4 are reserved.
const V3_INTERVAL_MASK: u16 = 0x0fff;

/// One advertisement's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    /// 2 or 3.
    pub version: u8,
    pub vrid: u8,
    pub priority: u8,
    /// Advertisement interval in centiseconds (v2 carries whole seconds: 100 x its byte;
    /// encoding a v2 advert writes interval_cs / 100, minimum 1).
    pub interval_cs: u16,
    /// v2 only: Some(8 password bytes) = auth type 1 (PASS); None = auth type 0 (8 zero
    /// bytes still sent).
    pub auth: Option<[u8; 8]>,
    /// All the same family as the carrying IP header.
    pub addrs: Vec<IpAddr>,
}

/// How a received v3/IPv4 advert's checksum was computed: keepalived's default includes the
/// IPv4 pseudo-header (RFC 5798), `v3_checksum_as_v2` peers and RFC 9568 do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumForm {
    PseudoHeader,
    Plain,
}

/// Why a received packet is not a usable advertisement.
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdvertError {
    #[error("VRRP message too short: {len} bytes, the header alone is 8")]
    TooShort { len: usize },
    #[error("unsupported VRRP version {0} (expected 2 or 3)")]
    BadVersion(u8),
    #[error("VRRP packet type {0} is not ADVERTISEMENT (1)")]
    BadType(u8),
    #[error("IP source and destination addresses are of different families")]
    FamilyMismatch,
    #[error("VRRPv2 advertisement over IPv6 (v2 is IPv4-only)")]
    V2OverIpv6,
    #[error("VRRPv3 advertisement without addresses (to be ignored, RFC 9568)")]
    NoAddresses,
    #[error("VRRP message is {got} bytes, its address count needs exactly {expected}")]
    LengthMismatch { expected: usize, got: usize },
    #[error("bad VRRP checksum")]
    BadChecksum,
    #[error("VRRPv2 auth type 2 (IP Authentication Header) is not supported")]
    AuthAhUnsupported,
    #[error("unknown VRRPv2 auth type {0}")]
    AuthTypeUnknown(u8),
    #[error("advertisement interval is zero")]
    ZeroInterval,
    #[error("IPv4 packet too short: {len} bytes, the header alone is 20")]
    Ipv4TooShort { len: usize },
    #[error("IP version {0}, expected 4")]
    NotIpv4(u8),
    #[error("invalid IPv4 header length of {0} words")]
    BadIhl(u8),
    #[error("IPv4 total length {total} does not fit the {got} bytes received")]
    Ipv4Length { total: usize, got: usize },
    #[error("IP protocol {0} is not VRRP (112)")]
    NotVrrp(u8),
}

/// RFC 1071 Internet checksum over the concatenation of `parts` (a part may have an odd
/// length; the next part continues the same 16-bit word). Over data that contains a valid
/// checksum, the result is 0.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut high: Option<u8> = None;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        match high.take() {
            Some(h) => sum += u64::from(u16::from_be_bytes([h, b])),
            None => high = Some(b),
        }
    }
    if let Some(h) = high {
        sum += u64::from(h) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header an upper-layer checksum covers: IPv4 src, dst, zero, protocol,
/// 16-bit length; IPv6 (RFC 8200 §8.1) src, dst, 32-bit length, 3 zeros, next header.
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ph = Vec::with_capacity(12);
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&[0, proto]);
            ph.extend_from_slice(&(len as u16).to_be_bytes());
            ph
        }
        _ => {
            // Mixed families are the caller's bug (decode rejects them first); map to IPv6
            // so the result is at least deterministic.
            debug_assert!(src.is_ipv6() && dst.is_ipv6(), "mixed families {src} {dst}");
            let v6 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped(),
                IpAddr::V6(a) => a,
            };
            let mut ph = Vec::with_capacity(40);
            ph.extend_from_slice(&v6(src).octets());
            ph.extend_from_slice(&v6(dst).octets());
            ph.extend_from_slice(&(len as u32).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, proto]);
            ph
        }
    }
}

/// The VRRP message (no IP header). `src`/`dst` are the IP addresses of the packet that will
/// carry it (used for the v3 pseudo-header: IPv6 always; IPv4 unless `v3_checksum_as_v2`).
/// v2 ignores them (no pseudo-header).
///
/// Out-of-range fields are clamped so the result is always a valid advert: at most 255
/// addresses, v2 interval 1..=255 s, v3 interval 1..=4095 cs. Any version other than 2 is
/// encoded as v3.
pub fn encode(adv: &Advert, src: IpAddr, dst: IpAddr, v3_checksum_as_v2: bool) -> Vec<u8> {
    debug_assert!(adv.addrs.len() <= 255, "{} addresses", adv.addrs.len());
    let addrs = &adv.addrs[..adv.addrs.len().min(255)];
    let v2 = adv.version == 2;
    let mut msg = Vec::with_capacity(HDR_LEN + 16 * addrs.len() + AUTH_LEN);
    msg.extend_from_slice(&[
        if v2 { 0x21 } else { 0x31 },
        adv.vrid,
        adv.priority,
        addrs.len() as u8,
    ]);
    if v2 {
        let auth_type = if adv.auth.is_some() {
            V2_AUTH_PASS
        } else {
            V2_AUTH_NONE
        };
        let secs = (adv.interval_cs / 100).clamp(1, 255) as u8;
        msg.extend_from_slice(&[auth_type, secs]);
    } else {
        let cs = adv.interval_cs.clamp(1, V3_INTERVAL_MASK);
        msg.extend_from_slice(&cs.to_be_bytes());
    }
    msg.extend_from_slice(&[0, 0]); // checksum, filled in below
    for a in addrs {
        match a {
            IpAddr::V4(a) => msg.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => msg.extend_from_slice(&a.octets()),
        }
    }
    if v2 {
        msg.extend_from_slice(&adv.auth.unwrap_or([0; AUTH_LEN]));
    }
    let sum = if v2 || (src.is_ipv4() && v3_checksum_as_v2) {
        checksum(&[&msg])
    } else {
        checksum(&[&pseudo_header(src, dst, IPPROTO_VRRP, msg.len()), &msg])
    };
    msg[6..8].copy_from_slice(&sum.to_be_bytes());
    msg
}

/// Parses and checks a VRRP message (no IP header; trailing Ethernet padding beyond the
/// exact length is tolerated as keepalived does). For v3/IPv4 both checksum forms are
/// accepted and the form found is returned; for IPv6 the pseudo-header form is required (the
/// kernel normally verified it already, but check anyway). Returns the advert and, for
/// v3/IPv4, Some(form) (None otherwise).
///
/// Only what the message itself can prove is checked here; whether it suits a configured
/// instance (VRID, version, interval, auth, TTL, addresses) is the caller's decision.
pub fn decode(
    msg: &[u8],
    src: IpAddr,
    dst: IpAddr,
) -> Result<(Advert, Option<ChecksumForm>), AdvertError> {
    if msg.len() < HDR_LEN {
        return Err(AdvertError::TooShort { len: msg.len() });
    }
    let version = msg[0] >> 4;
    if version != 2 && version != 3 {
        return Err(AdvertError::BadVersion(version));
    }
    let kind = msg[0] & 0x0f;
    if kind != TYPE_ADVERT {
        return Err(AdvertError::BadType(kind));
    }
    let ipv4 = match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => true,
        (IpAddr::V6(_), IpAddr::V6(_)) => false,
        _ => return Err(AdvertError::FamilyMismatch),
    };
    let v2 = version == 2;
    if v2 && !ipv4 {
        return Err(AdvertError::V2OverIpv6);
    }
    let count = usize::from(msg[3]);
    if !v2 && count == 0 {
        return Err(AdvertError::NoAddresses);
    }
    let addr_len = if ipv4 { 4 } else { 16 };
    let expected = HDR_LEN + count * addr_len + if v2 { AUTH_LEN } else { 0 };
    let got = msg.len();
    let padded = ipv4 && got > expected && got <= MAX_PADDED_V4_MSG;
    if got != expected && !padded {
        return Err(AdvertError::LengthMismatch { expected, got });
    }
    let msg = &msg[..expected];

    let form = if v2 {
        if checksum(&[msg]) != 0 {
            return Err(AdvertError::BadChecksum);
        }
        None
    } else if checksum(&[&pseudo_header(src, dst, IPPROTO_VRRP, expected), msg]) == 0 {
        ipv4.then_some(ChecksumForm::PseudoHeader)
    } else if ipv4 && checksum(&[msg]) == 0 {
        Some(ChecksumForm::Plain)
    } else {
        return Err(AdvertError::BadChecksum);
    };

    let (interval_cs, auth) = if v2 {
        let auth = match msg[4] {
            V2_AUTH_NONE => None,
            V2_AUTH_PASS => {
                let mut pass = [0; AUTH_LEN];
                pass.copy_from_slice(&msg[expected - AUTH_LEN..]);
                Some(pass)
            }
            V2_AUTH_AH => return Err(AdvertError::AuthAhUnsupported),
            t => return Err(AdvertError::AuthTypeUnknown(t)),
        };
        (u16::from(msg[5]) * 100, auth)
    } else {
        (
            u16::from_be_bytes([msg[4], msg[5]]) & V3_INTERVAL_MASK,
            None,
        )
    };
    if interval_cs == 0 {
        return Err(AdvertError::ZeroInterval);
    }

    let addrs = msg[HDR_LEN..HDR_LEN + count * addr_len]
        .chunks_exact(addr_len)
        .map(|a| match <[u8; 4]>::try_from(a) {
            Ok(v4) => IpAddr::from(v4),
            Err(_) => {
                let mut v6 = [0; 16];
                v6.copy_from_slice(a);
                IpAddr::from(v6)
            }
        })
        .collect();
    let adv = Advert {
        version,
        vrid: msg[1],
        priority: msg[2],
        interval_cs,
        auth,
        addrs,
    };
    Ok((adv, form))
}

/// An IPv4 packet carrying `msg`, built as keepalived does (IHL 5, TOS 0xC0 "network
/// control", no DF, the given ID, TTL, protocol 112, header checksum computed).
pub fn ipv4_packet(msg: &[u8], src: Ipv4Addr, dst: Ipv4Addr, id: u16, ttl: u8) -> Vec<u8> {
    let total = 20 + msg.len();
    debug_assert!(total <= usize::from(u16::MAX), "{total} bytes");
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0xc0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0, 0, ttl, IPPROTO_VRRP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(msg);
    p
}

/// Header fields of a received IPv4 packet that VRRP needs: the source for the election
/// tie-break and pseudo-header, the destination for the pseudo-header and multicast check,
/// the TTL for the on-link check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
}

/// Splits a received IPv4 packet (as a raw socket delivers it) into its header fields and
/// payload: honours IHL, checks version 4, that the total length fits the buffer (the
/// payload is cut to it, dropping any padding) and protocol 112. The header checksum is not
/// checked: the kernel already dropped packets with a bad one.
pub fn parse_ipv4(packet: &[u8]) -> Result<(Ipv4Info, &[u8]), AdvertError> {
    if packet.len() < 20 {
        return Err(AdvertError::Ipv4TooShort { len: packet.len() });
    }
    let version = packet[0] >> 4;
    if version != 4 {
        return Err(AdvertError::NotIpv4(version));
    }
    let ihl_words = packet[0] & 0x0f;
    let ihl = usize::from(ihl_words) * 4;
    if ihl < 20 {
        return Err(AdvertError::BadIhl(ihl_words));
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total < ihl || total > packet.len() {
        return Err(AdvertError::Ipv4Length {
            total,
            got: packet.len(),
        });
    }
    if packet[9] != IPPROTO_VRRP {
        return Err(AdvertError::NotVrrp(packet[9]));
    }
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let info = Ipv4Info {
        src: addr(12),
        dst: addr(16),
        ttl: packet[8],
    };
    Ok((info, &packet[ihl..total]))
}

/// Gratuitous ARP exactly as keepalived sends it, so switches and neighbours learn the VIP's
/// new MAC: Ethernet broadcast from `mac`, an ARP *request* (op 1) with sender = target =
/// `ip` and target hardware address all ones (not zero). 42 bytes; the NIC pads.
pub fn garp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    const BROADCAST: [u8; 6] = [0xff; 6];
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes()); // ethertype ARP
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&ip.octets());
    f
}

/// Unsolicited neighbour advertisement exactly as keepalived sends it, the IPv6 counterpart
/// of [`garp`]: from the VIP itself to all nodes (ff02::1, Ethernet 33:33:00:00:00:01), hop
/// limit 255 (RFC 4861 requires it), Override set so caches update, Router set if `router`
/// (keepalived sets it when the interface forwards IPv6), target = `ip` with a target
/// link-layer address option carrying `mac`. 86 bytes.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr, router: bool) -> Vec<u8> {
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    const ICMPV6: u8 = 58;
    const ICMP_LEN: usize = 32; // 4 header + 4 flags + 16 target + 8 option
    const FLAG_ROUTER: u8 = 0x80;
    const FLAG_OVERRIDE: u8 = 0x20;

    let mut icmp = Vec::with_capacity(ICMP_LEN);
    icmp.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum
    let flags = FLAG_OVERRIDE | if router { FLAG_ROUTER } else { 0 };
    icmp.extend_from_slice(&[flags, 0, 0, 0]);
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]); // target link-layer address, 1 x 8 bytes
    icmp.extend_from_slice(&mac);
    let sum = checksum(&[
        &pseudo_header(ip.into(), ALL_NODES.into(), ICMPV6, ICMP_LEN),
        &icmp,
    ]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = Vec::with_capacity(14 + 40 + ICMP_LEN);
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes()); // ethertype IPv6
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    f.extend_from_slice(&(ICMP_LEN as u16).to_be_bytes());
    f.extend_from_slice(&[ICMPV6, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

/// An interval in centiseconds as microseconds, keepalived's timer unit.
pub const fn interval_us(interval_cs: u16) -> u64 {
    interval_cs as u64 * 10_000
}

/// Skew_Time in integer microseconds as keepalived computes it:
/// (256 - priority) x interval / 256. Higher priorities wait less, so they win the race to
/// become master.
pub fn skew_us(priority: u8, interval_cs: u16) -> u64 {
    (256 - u64::from(priority)) * interval_us(interval_cs) / 256
}

/// Master_Down_Interval in integer microseconds: `adverts` (3 in the RFCs) intervals plus
/// the skew time.
pub fn master_down_us(priority: u8, interval_cs: u16, adverts: u32) -> u64 {
    u64::from(adverts) * interval_us(interval_cs) + skew_us(priority, interval_cs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    fn ip4(a: IpAddr) -> Ipv4Addr {
        match a {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => panic!("{a} is not IPv4"),
        }
    }

    fn advert(version: u8, vrid: u8, priority: u8, addrs: &[IpAddr]) -> Advert {
        Advert {
            version,
            vrid,
            priority,
            interval_cs: 100,
            auth: None,
            addrs: addrs.to_vec(),
        }
    }

    /// Encodes, checks the exact bytes, and checks decoding gives the advert back.
    fn check(
        adv: &Advert,
        src: IpAddr,
        dst: IpAddr,
        as_v2: bool,
        want: &str,
        form: Option<ChecksumForm>,
    ) -> Vec<u8> {
        let msg = encode(adv, src, dst, as_v2);
        assert_eq!(hex(want), msg, "encoding of {adv:?}");
        assert_eq!(decode(&msg, src, dst), Ok((adv.clone(), form)));
        msg
    }

    /// Recomputes a v2 (or v3 plain) checksum after a test edited the message.
    fn fix_plain_checksum(msg: &mut [u8]) {
        msg[6..8].fill(0);
        let sum = checksum(&[msg]);
        msg[6..8].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn c1_v2_multicast() {
        let (src, dst) = (v4("10.9.0.2"), IpAddr::V4(MCAST_V4));
        let adv = advert(2, 51, 100, &[v4("10.9.0.100")]);
        let msg = check(
            &adv,
            src,
            dst,
            false,
            "21 33 64 01 00 01 705d 0a090064 0000000000000000",
            None,
        );
        let pkt = ipv4_packet(&msg, ip4(src), MCAST_V4, 1, VRRP_TTL);
        let want = hex("45c00028 0001 0000 ff70 d087 0a090002 e0000012");
        assert_eq!(pkt[..20], want[..]);
        assert_eq!(pkt[20..], msg[..]);
        assert_eq!(checksum(&[&pkt[..20]]), 0);

        let (info, payload) = parse_ipv4(&pkt).unwrap();
        assert_eq!(
            info,
            Ipv4Info {
                src: ip4(src),
                dst: MCAST_V4,
                ttl: 255
            }
        );
        assert_eq!(payload, &msg[..]);
    }

    #[test]
    fn c2_c3_priorities() {
        let (src, dst) = (v4("10.9.0.2"), IpAddr::V4(MCAST_V4));
        let adv = advert(2, 51, 0, &[v4("10.9.0.100")]);
        check(
            &adv,
            src,
            dst,
            false,
            "21 33 00 01 00 01 d45d 0a090064 00000000 00000000",
            None,
        );
        let adv = advert(2, 51, 150, &[v4("10.9.0.100")]);
        let msg = encode(&adv, src, dst, false);
        assert_eq!(msg[6..8], [0x3e, 0x5d]);
        assert_eq!(decode(&msg, src, dst), Ok((adv, None)));
    }

    #[test]
    fn c4_v3_ipv4_multicast() {
        let (src, dst) = (v4("10.9.0.2"), IpAddr::V4(MCAST_V4));
        let adv = advert(3, 51, 100, &[v4("10.9.0.100")]);
        let msg = check(
            &adv,
            src,
            dst,
            false,
            "31 33 64 01 0064 7560 0a090064",
            Some(ChecksumForm::PseudoHeader),
        );
        let pkt = ipv4_packet(&msg, ip4(src), MCAST_V4, 1, VRRP_TTL);
        let want =
            hex("45c00020 0001 0000 ff70 d08f 0a090002 e0000012 31 33 64 01 0064 7560 0a090064");
        assert_eq!(pkt, want);
    }

    #[test]
    fn c5_v2_unicast_pass() {
        let (src, dst) = (v4("10.9.0.2"), v4("10.9.0.1"));
        let adv = Advert {
            // keepalived cuts "secret12345" to 8 bytes
            auth: Some(*b"secret12"),
            ..advert(2, 51, 100, &[v4("10.9.0.100"), v4("10.9.0.101")])
        };
        let msg = check(
            &adv,
            src,
            dst,
            false,
            "21 33 64 02 01 01 f76f 0a090064 0a090065 7365637265743132",
            None,
        );
        let pkt = ipv4_packet(&msg, ip4(src), ip4(dst), 1, VRRP_TTL);
        let want = hex("45c0002c 0001 0000 ff70 a68c 0a090002 0a090001");
        assert_eq!(pkt[..20], want[..]);
        assert_eq!(pkt[20..], msg[..]);
    }

    #[test]
    fn c6_v3_ipv6_vmac() {
        let (src, dst) = (v6("fe80::a8f7:40ff:fe38:58ed"), IpAddr::V6(MCAST_V6));
        let adv = advert(3, 52, 150, &[v6("fe80::100"), v6("2001:db8::100")]);
        let msg = check(
            &adv,
            src,
            dst,
            false,
            "31 34 96 02 0064 cadf fe800000000000000000000000000100 20010db8000000000000000000000100",
            None,
        );
        // The captured IPv6 header's payload length (0x0028) is the message length.
        assert_eq!(msg.len(), 0x28);
        // The form flag does not apply to IPv6: the kernel always uses the pseudo-header.
        assert_eq!(encode(&adv, src, dst, true), msg);
    }

    #[test]
    fn c7_v3_unicast_pseudo_header_uses_peer() {
        let (src, dst) = (v4("10.1.0.3"), v4("10.1.0.1"));
        let adv = advert(3, 88, 198, &[v4("10.195.76.227")]);
        let msg = check(
            &adv,
            src,
            dst,
            false,
            "31 58 c6 01 0064 9c19 0ac34ce3",
            Some(ChecksumForm::PseudoHeader),
        );
        check(
            &adv,
            src,
            dst,
            true,
            "31 58 c6 01 0064 b09b 0ac34ce3",
            Some(ChecksumForm::Plain),
        );
        // The dump has the header checksum left to the kernel (zero); everything else matches.
        let dump =
            hex("45c00020 0001 0000 ff70 0000 0a010003 0a010001 31 58 c6 01 0064 9c19 0ac34ce3");
        let pkt = ipv4_packet(&msg, ip4(src), ip4(dst), 1, VRRP_TTL);
        assert_eq!(pkt[..10], dump[..10]);
        assert_eq!(pkt[12..], dump[12..]);
        assert_eq!(checksum(&[&pkt[..20]]), 0);
        let (info, payload) = parse_ipv4(&dump).unwrap();
        assert_eq!((info.src, info.dst, info.ttl), (ip4(src), ip4(dst), 255));
        assert_eq!(
            decode(payload, src, dst),
            Ok((adv, Some(ChecksumForm::PseudoHeader)))
        );
    }

    #[test]
    fn k1_to_k5() {
        let (src, dst) = (v4("192.168.200.1"), IpAddr::V4(MCAST_V4));
        let vip = v4("192.168.200.16");
        let k1 = advert(2, 51, 100, &[vip]);
        check(
            &k1,
            src,
            dst,
            false,
            "21 33 64 01 00 01 f210 c0a8c810 0000000000000000",
            None,
        );
        let k2 = Advert {
            auth: Some(*b"1111\0\0\0\0"),
            ..k1
        };
        check(
            &k2,
            src,
            dst,
            false,
            "21 33 64 01 01 01 8eae c0a8c810 3131313100000000",
            None,
        );
        let k3 = advert(3, 51, 100, &[vip]);
        check(
            &k3,
            src,
            dst,
            false,
            "31 33 64 01 0064 7874 c0a8c810",
            Some(ChecksumForm::PseudoHeader),
        );
        check(
            &k3,
            src,
            dst,
            true,
            "31 33 64 01 0064 e1ad c0a8c810",
            Some(ChecksumForm::Plain),
        );
        let k5 = advert(3, 51, 100, &[v6("fe80::1"), v6("2001:db8::10")]);
        check(
            &k5,
            v6("fe80::a"),
            IpAddr::V6(MCAST_V6),
            false,
            "31 33 64 02 0064 3fe3 fe800000000000000000000000000001 20010db8000000000000000000000010",
            None,
        );
    }

    #[test]
    fn v3_ipv4_accepts_both_checksum_forms() {
        let (src, dst) = (v4("192.168.200.1"), IpAddr::V4(MCAST_V4));
        let k3 = hex("31 33 64 01 0064 7874 c0a8c810");
        let k4 = hex("31 33 64 01 0064 e1ad c0a8c810");
        let (a3, f3) = decode(&k3, src, dst).unwrap();
        let (a4, f4) = decode(&k4, src, dst).unwrap();
        assert_eq!(a3, a4);
        assert_eq!(f3, Some(ChecksumForm::PseudoHeader));
        assert_eq!(f4, Some(ChecksumForm::Plain));
        // The pseudo-header form only verifies with the addresses it was made for.
        assert_eq!(
            decode(&k3, src, v4("192.168.200.2")),
            Err(AdvertError::BadChecksum)
        );
    }

    #[test]
    fn ipv6_requires_pseudo_header() {
        let (src, dst) = (v6("fe80::a"), IpAddr::V6(MCAST_V6));
        let mut msg = encode(&advert(3, 51, 100, &[v6("fe80::1")]), src, dst, false);
        assert!(decode(&msg, src, dst).is_ok());
        fix_plain_checksum(&mut msg);
        assert_eq!(decode(&msg, src, dst), Err(AdvertError::BadChecksum));
    }

    #[test]
    fn round_trips() {
        let (s4, d4) = (v4("10.0.0.1"), IpAddr::V4(MCAST_V4));
        let (s6, d6) = (v6("fe80::1"), IpAddr::V6(MCAST_V6));
        let many: Vec<IpAddr> = (0..=254u8).map(|i| v4(&format!("10.1.2.{i}"))).collect();
        let cases = [
            (advert(2, 1, 255, &[v4("1.2.3.4")]), s4, d4),
            (
                Advert {
                    interval_cs: 25_500,
                    auth: Some(*b"\x01\x02\x03\x04\x05\x06\x07\x08"),
                    ..advert(2, 255, 1, &[v4("1.2.3.4"), v4("5.6.7.8")])
                },
                s4,
                d4,
            ),
            (advert(2, 7, 100, &[]), s4, d4),
            (advert(2, 9, 100, &many), s4, d4),
            (
                Advert {
                    interval_cs: 4095,
                    ..advert(3, 200, 254, &[v4("1.2.3.4"), v4("5.6.7.8")])
                },
                s4,
                v4("10.0.0.2"),
            ),
            (
                Advert {
                    interval_cs: 1,
                    ..advert(3, 3, 0, &[v6("2001:db8::1"), v6("fe80::5")])
                },
                s6,
                d6,
            ),
        ];
        for (adv, src, dst) in cases {
            for as_v2 in [false, true] {
                let msg = encode(&adv, src, dst, as_v2);
                let (got, form) = decode(&msg, src, dst).unwrap();
                assert_eq!(got, adv);
                let want_form = match (adv.version, src, as_v2) {
                    (3, IpAddr::V4(_), false) => Some(ChecksumForm::PseudoHeader),
                    (3, IpAddr::V4(_), true) => Some(ChecksumForm::Plain),
                    _ => None,
                };
                assert_eq!(form, want_form, "{adv:?}");
            }
        }
    }

    #[test]
    fn interval_encoding() {
        let (src, dst) = (v4("10.0.0.1"), IpAddr::V4(MCAST_V4));
        let interval_bytes = |version, interval_cs| {
            let adv = Advert {
                interval_cs,
                ..advert(version, 1, 100, &[v4("10.0.0.9")])
            };
            encode(&adv, src, dst, false)[4..6].to_vec()
        };
        // v2: whole seconds, truncated, within 1..=255
        assert_eq!(interval_bytes(2, 250), [0, 2]);
        assert_eq!(interval_bytes(2, 50), [0, 1]);
        assert_eq!(interval_bytes(2, 0), [0, 1]);
        assert_eq!(interval_bytes(2, 30_000), [0, 255]);
        // v3: centiseconds within 1..=4095, reserved bits zero
        assert_eq!(interval_bytes(3, 100), [0x00, 0x64]);
        assert_eq!(interval_bytes(3, 5_000), [0x0f, 0xff]);
        assert_eq!(interval_bytes(3, 0), [0x00, 0x01]);
        // Received reserved bits are ignored.
        let mut msg = hex("31 33 64 01 f064 0000 c0a8c810");
        fix_plain_checksum(&mut msg);
        let (adv, _) = decode(&msg, src, dst).unwrap();
        assert_eq!(adv.interval_cs, 100);
    }

    #[test]
    fn malformed() {
        let (src, dst) = (v4("10.9.0.2"), IpAddr::V4(MCAST_V4));
        let c1 = hex("21 33 64 01 00 01 705d 0a090064 0000000000000000");
        let c4 = hex("31 33 64 01 0064 7560 0a090064");
        let edited = |base: &[u8], at: usize, byte: u8| {
            let mut m = base.to_vec();
            m[at] = byte;
            fix_plain_checksum(&mut m);
            m
        };
        let dec = |m: &[u8]| decode(m, src, dst).map(|_| ());

        assert_eq!(dec(&c1[..7]), Err(AdvertError::TooShort { len: 7 }));
        assert_eq!(dec(&[]), Err(AdvertError::TooShort { len: 0 }));
        assert_eq!(
            dec(&c1[..19]),
            Err(AdvertError::LengthMismatch {
                expected: 20,
                got: 19
            })
        );
        assert_eq!(
            dec(&c4[..11]),
            Err(AdvertError::LengthMismatch {
                expected: 12,
                got: 11
            })
        );
        // count says 2 addresses, only 1 present
        assert_eq!(
            dec(&edited(&c1, 3, 2)),
            Err(AdvertError::LengthMismatch {
                expected: 24,
                got: 20
            })
        );
        assert_eq!(dec(&edited(&c1, 0, 0x11)), Err(AdvertError::BadVersion(1)));
        assert_eq!(dec(&edited(&c1, 0, 0x41)), Err(AdvertError::BadVersion(4)));
        assert_eq!(dec(&edited(&c1, 0, 0x22)), Err(AdvertError::BadType(2)));
        assert_eq!(dec(&edited(&c4, 0, 0x30)), Err(AdvertError::BadType(0)));

        let mut bad = c1.clone();
        bad[2] = 101;
        assert_eq!(dec(&bad), Err(AdvertError::BadChecksum));
        let mut bad = c4.clone();
        bad[11] ^= 1;
        assert_eq!(dec(&bad), Err(AdvertError::BadChecksum));
        // v2 checksum covers the auth bytes
        let mut bad = c1.clone();
        bad[19] = 1;
        assert_eq!(dec(&bad), Err(AdvertError::BadChecksum));

        assert_eq!(
            decode(&c1, src, IpAddr::V6(MCAST_V6)),
            Err(AdvertError::FamilyMismatch)
        );
        assert_eq!(
            decode(&c1, v6("fe80::1"), IpAddr::V6(MCAST_V6)),
            Err(AdvertError::V2OverIpv6)
        );

        let mut none = hex("31 33 64 00 0064 0000");
        fix_plain_checksum(&mut none);
        assert_eq!(dec(&none), Err(AdvertError::NoAddresses));

        assert_eq!(dec(&edited(&c1, 4, 2)), Err(AdvertError::AuthAhUnsupported));
        assert_eq!(
            dec(&edited(&c1, 4, 3)),
            Err(AdvertError::AuthTypeUnknown(3))
        );
        assert_eq!(dec(&edited(&c1, 5, 0)), Err(AdvertError::ZeroInterval));
        assert_eq!(dec(&edited(&c4, 5, 0)), Err(AdvertError::ZeroInterval));
    }

    #[test]
    fn ethernet_padding_tolerated() {
        let (src, dst) = (v4("10.9.0.2"), IpAddr::V4(MCAST_V4));
        let c1 = hex("21 33 64 01 00 01 705d 0a090064 0000000000000000");
        let c4 = hex("31 33 64 01 0064 7560 0a090064");
        let c5 = hex("21 33 64 02 01 01 f76f 0a090064 0a090065 7365637265743132");
        let pad = |m: &[u8], n: usize| [m, &vec![0; n]].concat();

        // Padded up to the 60-byte minimum frame: 26 bytes after a 20-byte IPv4 header.
        let (adv, _) = decode(&pad(&c1, 6), src, dst).unwrap();
        assert_eq!(adv.addrs, [v4("10.9.0.100")]);
        let (_, form) = decode(&pad(&c4, 14), src, dst).unwrap();
        assert_eq!(form, Some(ChecksumForm::PseudoHeader));
        assert!(decode(&pad(&c5, 2), src, v4("10.9.0.1")).is_ok());
        // Non-zero padding (some NICs) is still padding.
        assert!(decode(&[&c4[..], &[0xaa; 5]].concat(), src, dst).is_ok());
        // Anything longer cannot be padding.
        assert_eq!(
            decode(&pad(&c4, 15), src, dst),
            Err(AdvertError::LengthMismatch {
                expected: 12,
                got: 27
            })
        );
        assert_eq!(
            decode(&pad(&c5, 3), src, v4("10.9.0.1")),
            Err(AdvertError::LengthMismatch {
                expected: 24,
                got: 27
            })
        );
        // IPv6 adverts are never padded.
        let (s6, d6) = (v6("fe80::a"), IpAddr::V6(MCAST_V6));
        let k5 = encode(&advert(3, 51, 100, &[v6("fe80::1")]), s6, d6, false);
        assert_eq!(
            decode(&pad(&k5, 1), s6, d6),
            Err(AdvertError::LengthMismatch {
                expected: 24,
                got: 25
            })
        );

        // parse_ipv4 drops padding beyond the IP total length.
        let pkt = ipv4_packet(&c1, ip4(src), MCAST_V4, 7, 255);
        let padded = pad(&pkt, 6);
        assert_eq!(parse_ipv4(&padded).unwrap().1, &c1[..]);
    }

    #[test]
    fn parse_ipv4_checks() {
        let msg = hex("31 33 64 01 0064 7560 0a090064");
        let pkt = ipv4_packet(&msg, "10.9.0.2".parse().unwrap(), MCAST_V4, 9, 1);
        let (info, payload) = parse_ipv4(&pkt).unwrap();
        assert_eq!(info.ttl, 1);
        assert_eq!(payload, &msg[..]);

        let edited = |at: usize, byte: u8| {
            let mut p = pkt.clone();
            p[at] = byte;
            p
        };
        assert_eq!(
            parse_ipv4(&pkt[..19]),
            Err(AdvertError::Ipv4TooShort { len: 19 })
        );
        assert_eq!(parse_ipv4(&edited(0, 0x65)), Err(AdvertError::NotIpv4(6)));
        assert_eq!(parse_ipv4(&edited(0, 0x44)), Err(AdvertError::BadIhl(4)));
        assert_eq!(
            parse_ipv4(&edited(3, 33)),
            Err(AdvertError::Ipv4Length { total: 33, got: 32 })
        );
        assert_eq!(
            parse_ipv4(&edited(3, 19)),
            Err(AdvertError::Ipv4Length { total: 19, got: 32 })
        );
        // AH-authenticated adverts (protocol 51) are not supported.
        assert_eq!(parse_ipv4(&edited(9, 51)), Err(AdvertError::NotVrrp(51)));
        // Header options: the payload starts after IHL words.
        let mut opt = pkt[..20].to_vec();
        opt[0] = 0x46;
        opt[3] += 4;
        opt.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
        opt.extend_from_slice(&msg);
        assert_eq!(parse_ipv4(&opt).unwrap().1, &msg[..]);
        assert_eq!(
            parse_ipv4(&opt[..27]),
            Err(AdvertError::Ipv4Length { total: 36, got: 27 })
        );
    }

    #[test]
    fn checksum_helper() {
        // RFC 1071 §3 example: sum 0xddf2, checksum its complement.
        let data = hex("0001 f203 f4f5 f6f7");
        assert_eq!(checksum(&[&data]), !0xddf2);
        // Split at odd offsets, the result is the same as contiguous.
        assert_eq!(checksum(&[&data[..3], &data[3..5], &data[5..]]), !0xddf2);
        // An odd-length tail is padded with a zero byte.
        assert_eq!(checksum(&[&[0x12]]), !0x1200);
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn garp_matches_keepalived_capture() {
        let mac = [0xd6, 0xde, 0x50, 0x40, 0x59, 0x2b];
        let frame = garp(mac, "10.9.0.100".parse().unwrap());
        let want = hex(
            "ffffffffffff d6de5040592b 0806 0001 0800 06 04 0001 d6de5040592b 0a090064 \
             ffffffffffff 0a090064",
        );
        assert_eq!(frame, want);
        assert_eq!(frame.len(), 42);
    }

    #[test]
    fn unsolicited_na_matches_keepalived_capture() {
        let mac = [0x0e, 0x55, 0xb3, 0x69, 0x22, 0x8b];
        let ip: Ipv6Addr = "fe80::100".parse().unwrap();
        let frame = unsolicited_na(mac, ip, false);
        assert_eq!(frame.len(), 86);
        let mut want = hex("333300000001 0e55b369228b 86dd 60000000 0020 3a ff");
        want.extend_from_slice(&ip.octets());
        want.extend_from_slice(&hex("ff020000000000000000000000000001"));
        want.extend_from_slice(&hex("8800 7354 20000000"));
        want.extend_from_slice(&ip.octets());
        want.extend_from_slice(&hex("0201 0e55b369228b"));
        assert_eq!(frame, want);

        // Independent check with etherparse, also with the Router flag.
        for (router, flags) in [(false, 0x20), (true, 0xa0)] {
            let frame = unsolicited_na(mac, ip, router);
            let p = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
            let Some(etherparse::NetSlice::Ipv6(net)) = &p.net else {
                panic!("not IPv6: {:?}", p.net)
            };
            let h = net.header();
            assert_eq!(h.hop_limit(), 255);
            assert_eq!(h.traffic_class(), 0);
            assert_eq!(h.source_addr(), ip);
            assert_eq!(h.destination_addr(), "ff02::1".parse::<Ipv6Addr>().unwrap());
            let Some(etherparse::TransportSlice::Icmpv6(icmp)) = &p.transport else {
                panic!("not ICMPv6: {:?}", p.transport)
            };
            assert!(icmp.is_checksum_valid(ip.octets(), h.destination_addr().octets()));
            assert_eq!(icmp.slice()[0], 136);
            assert_eq!(icmp.slice()[4], flags);
        }
    }

    #[test]
    fn ipv4_header_agrees_with_etherparse() {
        let msg = hex("21 33 64 02 01 01 f76f 0a090064 0a090065 7365637265743132");
        let pkt = ipv4_packet(
            &msg,
            "10.9.0.2".parse().unwrap(),
            "10.9.0.1".parse().unwrap(),
            0xbeef,
            255,
        );
        let h = etherparse::Ipv4HeaderSlice::from_slice(&pkt).unwrap();
        assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
        assert!(!h.dont_fragment());
        assert_eq!(h.identification(), 0xbeef);
        assert_eq!(usize::from(h.total_len()), pkt.len());
        assert_eq!(h.protocol().0, IPPROTO_VRRP);
    }

    #[test]
    fn timers() {
        assert_eq!(skew_us(100, 100), 609_375);
        assert_eq!(master_down_us(100, 100, 3), 3_609_375);
        // Priority 0 from the leaving master: the skew is a whole interval.
        assert_eq!(skew_us(0, 100), 1_000_000);
        assert_eq!(skew_us(255, 100), 3_906);

        // keepalived.md §6.1, in milliseconds: priority, skew 1 s, MDI 1 s, 0.5 s, 0.1 s.
        let table: [(u8, u64, u64, u64, u64); 7] = [
            (1, 996, 3996, 1998, 400),
            (50, 805, 3805, 1902, 380),
            (90, 648, 3648, 1824, 365),
            (100, 609, 3609, 1805, 361),
            (150, 414, 3414, 1707, 341),
            (200, 219, 3219, 1609, 322),
            (254, 8, 3008, 1504, 301),
        ];
        let ms = |us: u64| (us + 500) / 1000;
        for (p, skew, mdi1, mdi05, mdi01) in table {
            assert_eq!(ms(skew_us(p, 100)), skew, "skew p={p}");
            assert_eq!(ms(master_down_us(p, 100, 3)), mdi1, "MDI 1 s p={p}");
            assert_eq!(ms(master_down_us(p, 50, 3)), mdi05, "MDI 0.5 s p={p}");
            assert_eq!(ms(master_down_us(p, 10, 3)), mdi01, "MDI 0.1 s p={p}");
        }
    }
}
