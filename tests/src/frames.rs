//! Test frames built with etherparse, and the exact bytes direct routing must turn them into.

use std::net::IpAddr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv4Options, Ipv6Header, PacketBuilder, TcpHeader, VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0x00, 0x00, 0x00, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0x00, 0x00, 0x00, 0x01];

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

/// A frame from a client to the balancer.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// `Some(flags)` for TCP, `None` for UDP.
    pub tcp: Option<u8>,
    pub vlan: Option<u16>,
    pub ttl: u8,
    pub ipv4_options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame {
        Frame {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            tcp: Some(flags),
            vlan: None,
            ttl: 64,
            ipv4_options: Vec::new(),
            payload: Vec::new(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
        Frame {
            tcp: None,
            payload: b"query".to_vec(),
            ..Frame::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn flags(mut self, f: u8) -> Frame {
        self.tcp = Some(f);
        self
    }
    pub fn vlan(mut self, id: u16) -> Frame {
        self.vlan = Some(id);
        self
    }
    pub fn ttl(mut self, t: u8) -> Frame {
        self.ttl = t;
        self
    }
    pub fn options(mut self, o: &[u8]) -> Frame {
        self.ipv4_options = o.to_vec();
        self
    }
    pub fn payload(mut self, p: &[u8]) -> Frame {
        self.payload = p.to_vec();
        self
    }
    pub fn sport(mut self, p: u16) -> Frame {
        self.sport = p;
        self
    }

    /// The frame's bytes, checksums valid.
    pub fn build(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h =
                    Ipv4Header::new(0, self.ttl, IpNumber(0), s.octets(), d.octets()).unwrap();
                h.dont_fragment = true;
                h.identification = 0x1234;
                h.options = Ipv4Options::try_from(self.ipv4_options.as_slice()).unwrap();
                IpHeaders::Ipv4(h, Default::default())
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: 0,
                    flow_label: Default::default(),
                    payload_length: 0,
                    next_header: IpNumber(0),
                    hop_limit: self.ttl,
                    source: s.octets(),
                    destination: d.octets(),
                },
                Default::default(),
            ),
            _ => panic!("mixed address families"),
        };
        let mut out = Vec::new();
        match (self.vlan, self.tcp) {
            (None, Some(f)) => eth
                .ip(ip)
                .tcp_header(tcp_header(self.sport, self.dport, f))
                .write(&mut out, &self.payload)
                .unwrap(),
            (None, None) => eth
                .ip(ip)
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload)
                .unwrap(),
            (Some(v), Some(f)) => eth
                .single_vlan(VlanId::try_new(v).unwrap())
                .ip(ip)
                .tcp_header(tcp_header(self.sport, self.dport, f))
                .write(&mut out, &self.payload)
                .unwrap(),
            (Some(v), None) => eth
                .single_vlan(VlanId::try_new(v).unwrap())
                .ip(ip)
                .udp(self.sport, self.dport)
                .write(&mut out, &self.payload)
                .unwrap(),
        }
        out
    }
}

fn tcp_header(sport: u16, dport: u16, f: u8) -> TcpHeader {
    let mut t = TcpHeader::new(sport, dport, 1000, 64240);
    t.fin = f & FIN != 0;
    t.syn = f & SYN != 0;
    t.rst = f & RST != 0;
    t.psh = f & PSH != 0;
    t.ack = f & ACK != 0;
    if t.ack {
        t.acknowledgment_number = 5000;
    }
    t
}

/// Offset of the IP header in a frame (one optional 802.1Q tag).
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}

/// What direct routing must produce from `input`: destination MAC = real server, source MAC
/// = balancer, TTL / hop limit minus one with the IPv4 header checksum recomputed from
/// scratch (etherparse), every other byte unchanged.
pub fn expected_dr(input: &[u8], dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst_mac);
    out[6..12].copy_from_slice(&src_mac);
    let l3 = l3_offset(input);
    if out[l3] >> 4 == 4 {
        let ihl = (out[l3] & 0xf) as usize * 4;
        out[l3 + 8] -= 1;
        let (mut h, _) = Ipv4Header::from_slice(&out[l3..l3 + ihl]).unwrap();
        h.header_checksum = h.calc_header_checksum();
        out[l3 + 10..l3 + 12].copy_from_slice(&h.header_checksum.to_be_bytes());
    } else {
        out[l3 + 7] -= 1;
    }
    out
}

/// Whether a frame's IPv4 header checksum verifies.
pub fn ipv4_checksum_valid(frame: &[u8]) -> bool {
    let l3 = l3_offset(frame);
    let ihl = (frame[l3] & 0xf) as usize * 4;
    lb_common::csum::checksum(&frame[l3..l3 + ihl]) == 0
}

/// Asserts that a frame's IPv4 header checksum verifies (no-op for IPv6).
pub fn assert_ipv4_checksum_valid(frame: &[u8]) {
    let l3 = l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        let ihl = (frame[l3] & 0xf) as usize * 4;
        let (h, _) = Ipv4Header::from_slice(&frame[l3..l3 + ihl]).unwrap();
        assert_eq!(
            h.header_checksum,
            h.calc_header_checksum(),
            "IPv4 header checksum"
        );
    }
}
