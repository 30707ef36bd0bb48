//! Packet-level tests of the forwarding methods: NAT in both directions, the tunnels (IPIP,
//! IPv6 in IPv6 and mixed families, GUE, GRE, with and without checksums) and ICMP "too big"
//! for packets that do not fit once encapsulated. Every output byte is checked: rewritten
//! frames against frames built from scratch by etherparse (so incremental checksum updates
//! are compared with full computations), encapsulations field by field and checksum by
//! checksum.

use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, Ipv4Header, SlicedPacket, TransportSlice, UdpHeader};
use lb_common::{csum, reason, tunnel};
use xlb_tests::{frames::*, harness::*};

const XDP_REDIRECT: u32 = 4;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// NAT services: port 80 → 8080 on IPv4 (TCP and UDP), 443 → 8443 on IPv6.
const NAT: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
forwarding = "nat"
[[services.backends]]
address = "192.168.56.11:8080"

[[services]]
name = "dns"
address = "10.0.0.10:53"
protocol = "udp"
forwarding = "nat"
[[services.backends]]
address = "192.168.56.12:5353"

[[services]]
name = "web6"
address = "[2001:db8::10]:443"
forwarding = "nat"
[[services.backends]]
address = "[fd00:56::11]:8443"
"#;

/// What NAT must make of `f` for real server `server:port`: the same packet built afresh
/// (checksums computed from scratch) with the new destination, TTL - 1, re-addressed to the
/// server's MAC.
fn expected_nat(f: &Frame, server: &str, port: u16) -> Vec<u8> {
    let mut g = f.clone();
    g.dst = ip(server);
    g.dport = port;
    g.ttl -= 1;
    let mut out = g.build();
    out[0..6].copy_from_slice(&backend_mac(ip(server)));
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

#[test]
fn nat_rewrites_destination_port_and_checksums_exactly() {
    let h = Harness::new(NAT);
    let cases = [
        (
            Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN),
            "192.168.56.11",
            8080,
        ),
        (
            Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, ACK)
                .payload(b"GET / HTTP/1.1\r\n\r\n"),
            "192.168.56.11",
            8080,
        ),
        (
            Frame::tcp("203.0.113.8", 40001, "10.0.0.10", 80, SYN)
                .vlan(7)
                .options(&[1, 1, 1, 0]),
            "192.168.56.11",
            8080,
        ),
        (
            Frame::udp("203.0.113.7", 5000, "10.0.0.10", 53),
            "192.168.56.12",
            5353,
        ),
        (
            Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 443, SYN),
            "fd00:56::11",
            8443,
        ),
        (
            Frame::udp("2001:db8:9::7", 40000, "2001:db8::10", 443),
            "fd00:56::11",
            8443,
        ),
    ];
    for (f, server, port) in cases {
        // The IPv6 UDP case has no service: it must pass untouched.
        let input = f.build();
        let r = h.run(&input);
        if f.tcp.is_none() && f.dst.is_ipv6() {
            assert_eq!((r.action, r.out), (XDP_PASS, input));
            continue;
        }
        assert_eq!(r.action, XDP_TX, "{f:?}: counters {:?}", h.counters());
        assert_eq!(r.out, expected_nat(&f, server, port), "{f:?}");
    }
}

/// IPv4 UDP without a checksum stays without one (0 means "none").
#[test]
fn nat_leaves_a_zero_udp_checksum_zero() {
    let h = Harness::new(NAT);
    let f = Frame::udp("203.0.113.7", 5000, "10.0.0.10", 53);
    let mut input = f.build();
    let l4 = 14 + 20;
    input[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    let r = h.run(&input);
    assert_eq!(r.action, XDP_TX);
    let mut want = expected_nat(&f, "192.168.56.12", 5353);
    want[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    assert_eq!(r.out, want);
}

/// A reply frame from a real server to a client.
fn reply(src: &str, sport: u16, dst: &str, dport: u16, flags: Option<u8>) -> Frame {
    match flags {
        Some(f) => Frame::tcp(src, sport, dst, dport, f),
        None => Frame::udp(src, sport, dst, dport),
    }
}

/// NAT replies, in a namespace whose routing table knows the client: matched to their
/// connection, rewritten back to VIP:port, sent to the client's next hop from the route and
/// neighbour tables, counted as outgoing traffic; the connection's state follows IPVS's
/// OUTPUT table. Replies of unknown connections go to the kernel untouched; a client whose
/// next hop is not resolved is dropped (and reported) rather than leaked.
/// A namespace for NAT reply tests: `pub0` (a veth) toward the clients 203.0.113.7 and
/// 2001:db8:9::7 (permanent neighbours, MAC 02:c1:00:00:00:07), a route to 198.51.100.0/24
/// through an unresolved router, forwarding on. Returns the bench (dropping it removes the
/// namespace), the namespace and pub0's MAC.
fn nat_netns(prefix: &str) -> (xlb_tests::testbed::Bench, String, [u8; 6]) {
    xlb_tests::require_root();
    let mut bench = xlb_tests::testbed::Bench::new(prefix).unwrap();
    let ns = bench.netns("lb").unwrap();
    bench
        .sh(
            &ns,
            "ip link add pub0 type veth peer name pub1 && ip link set pub0 up && ip link set pub1 up \
             && ip addr add 203.0.113.1/24 dev pub0 && ip addr add 2001:db8:9::1/64 dev pub0 nodad \
             && ip neigh add 203.0.113.7 lladdr 02:c1:00:00:00:07 dev pub0 nud permanent \
             && ip neigh add 2001:db8:9::7 lladdr 02:c1:00:00:00:07 dev pub0 nud permanent \
             && ip route add 198.51.100.0/24 via 203.0.113.254 \
             && sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )
        .unwrap();
    let pub_mac = parse_mac(
        &bench
            .exec(&ns, &["cat", "/sys/class/net/pub0/address"])
            .unwrap(),
    );
    (bench, ns, pub_mac)
}

#[test]
fn nat_replies_go_back_to_the_client_as_the_service() {
    let (_bench, ns, pub_mac) = nat_netns("xtfwd-nat");
    let out = xlb_tests::testbed::in_netns(&ns, move || {
        let mut h = Harness::new(NAT);
        let pub0 = xlb::dataplane::ifindex("pub0").unwrap();
        h.dp.add_tx_port(pub0).unwrap();
        let mut results = Vec::new();
        // IPv4 TCP: SYN in, SYN-ACK back, ACK in, data back, FIN back.
        let syn = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN);
        assert_eq!(h.run(&syn.build()).action, XDP_TX);
        let before = h.counters();
        let synack = reply("192.168.56.11", 8080, "203.0.113.7", 40000, Some(SYN | ACK));
        let r = h.run(&synack.build());
        results.push((
            r.action,
            r.out == expected_reply(&synack, "10.0.0.10", 80, pub_mac),
        ));
        results.push((delta(&before, &h.counters()).len() as u32, true));
        assert_eq!(
            flow_state(&h, "203.0.113.7", 40000),
            lb_common::tcp::state::SYN_RECV
        );
        h.run(&syn.clone().flags(ACK).build());
        assert_eq!(
            flow_state(&h, "203.0.113.7", 40000),
            lb_common::tcp::state::ESTABLISHED
        );
        let data = reply("192.168.56.11", 8080, "203.0.113.7", 40000, Some(ACK | PSH))
            .payload(&[0x55; 700]);
        let r = h.run(&data.build());
        results.push((
            r.action,
            r.out == expected_reply(&data, "10.0.0.10", 80, pub_mac),
        ));
        let fin = reply("192.168.56.11", 8080, "203.0.113.7", 40000, Some(FIN | ACK));
        h.run(&fin.build());
        // OUTPUT table: a FIN from the server in ESTABLISHED → FIN_WAIT.
        assert_eq!(
            flow_state(&h, "203.0.113.7", 40000),
            lb_common::tcp::state::FIN_WAIT
        );
        let web = h.service_id(&parse_services(NAT)[0].key);
        let stats = h.dp.service_stats(web).unwrap();
        results.push((stats.out_packets as u32, stats.out_bytes == 40 + 740 + 40));
        // UDP.
        let q = Frame::udp("203.0.113.7", 5000, "10.0.0.10", 53);
        assert_eq!(h.run(&q.build()).action, XDP_TX);
        let a = reply("192.168.56.12", 5353, "203.0.113.7", 5000, None).payload(b"answer");
        let r = h.run(&a.build());
        results.push((
            r.action,
            r.out == expected_reply(&a, "10.0.0.10", 53, pub_mac),
        ));
        // IPv6.
        let syn6 = Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 443, SYN);
        assert_eq!(h.run(&syn6.build()).action, XDP_TX);
        let sa6 = reply("fd00:56::11", 8443, "2001:db8:9::7", 40000, Some(SYN | ACK));
        let r = h.run(&sa6.build());
        results.push((
            r.action,
            r.out == expected_reply(&sa6, "2001:db8::10", 443, pub_mac),
        ));
        // From a NAT server's address and port, but no connection: untouched.
        let stray = reply("192.168.56.11", 8080, "203.0.113.7", 40001, Some(ACK)).build();
        let before = h.counters();
        let r = h.run(&stray);
        results.push((r.action, r.out == stray));
        let d = delta(&before, &h.counters());
        results.push((d.len() as u32, d == vec![("pass_nat_no_flow", 1)]));
        // A client behind a router whose MAC is unknown: dropped, not leaked.
        let far = Frame::tcp("198.51.100.9", 40000, "10.0.0.10", 80, SYN);
        assert_eq!(h.run(&far.build()).action, XDP_TX);
        let before = h.counters();
        let r = h.run(
            &reply(
                "192.168.56.11",
                8080,
                "198.51.100.9",
                40000,
                Some(SYN | ACK),
            )
            .build(),
        );
        let d = delta(&before, &h.counters());
        results.push((r.action, d == vec![("drop_nat_no_route", 1)]));
        results
    })
    .unwrap();
    assert_eq!(
        out,
        vec![
            (XDP_REDIRECT, true),
            (1, true),
            (XDP_REDIRECT, true),
            (3, true),
            (XDP_REDIRECT, true),
            (XDP_REDIRECT, true),
            (XDP_PASS, true),
            (1, true),
            (XDP_DROP, true),
        ]
    );
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// What a NAT reply must become: from the VIP and service port, TTL - 1, to the client's
/// neighbour from the egress interface.
fn expected_reply(f: &Frame, vip: &str, vport: u16, egress_mac: [u8; 6]) -> Vec<u8> {
    let mut g = f.clone();
    g.src = ip(vip);
    g.sport = vport;
    g.ttl -= 1;
    let mut out = g.build();
    out[0..6].copy_from_slice(&[0x02, 0xc1, 0, 0, 0, 0x07]);
    out[6..12].copy_from_slice(&egress_mac);
    out
}

fn flow_state(h: &Harness, client: &str, cport: u16) -> u8 {
    let c = match ip(client) {
        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        _ => unreachable!(),
    };
    h.dp.flows_v4()
        .into_iter()
        .find(|(k, _)| k.src == c && k.sport == cport.to_be())
        .map(|(_, f)| f.state())
        .expect("flow")
}

/// A TCP service tunnelling to one real server with `tunnel` options.
fn tunnel_service(vip: &str, server: &str, tunnel: &str) -> String {
    tunnel_service_proto(vip, server, tunnel, "tcp")
}

fn tunnel_service_proto(vip: &str, server: &str, tunnel: &str, proto: &str) -> String {
    format!(
        "[[services]]\nname = \"t-{vip}\"\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nforwarding = \"tunnel\"\ntunnel = {tunnel}\n[[services.backends]]\naddress = \"{server}\"\n"
    )
}

/// Decodes a tunnelled frame and checks every field of the outer headers; returns the inner
/// packet.
fn check_encapsulation(
    out: &[u8],
    server: IpAddr,
    kind: u8,
    csum_on: bool,
    gue_port: u16,
    inner_v4: bool,
) -> Vec<u8> {
    assert_eq!(&out[0..6], &backend_mac(server), "destination MAC");
    assert_eq!(&out[6..12], &LB_MAC, "source MAC");
    let mut outer_df = None;
    let (outer_len, proto, payload, pseudo): (usize, u8, &[u8], Vec<u8>) = match server {
        IpAddr::V4(s) => {
            assert_eq!(&out[12..14], &[0x08, 0x00]);
            let (h, rest) = Ipv4Header::from_slice(&out[14..]).unwrap();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "outer IPv4 checksum"
            );
            assert_eq!(h.destination, s.octets());
            assert_eq!(
                h.source,
                LB_SOURCE_V4.parse::<std::net::Ipv4Addr>().unwrap().octets()
            );
            assert_eq!(h.total_len as usize, out.len() - 14);
            // DF copied from an IPv4 inner packet (always set for IPv6 inner); ID 0 with DF,
            // as Linux sends.
            if h.dont_fragment {
                assert_eq!(h.identification, 0, "ID 0 with DF, as Linux sends");
            }
            outer_df = Some(h.dont_fragment);
            assert_eq!(h.time_to_live, 63, "the inner TTL after the decrement");
            let mut pseudo = h.source.to_vec();
            pseudo.extend_from_slice(&h.destination);
            (
                20,
                h.protocol.0,
                &rest[..h.payload_len().unwrap() as usize],
                pseudo,
            )
        }
        IpAddr::V6(s) => {
            assert_eq!(&out[12..14], &[0x86, 0xdd]);
            let (h, rest) = etherparse::Ipv6Header::from_slice(&out[14..]).unwrap();
            assert_eq!(h.destination, s.octets());
            assert_eq!(
                h.source,
                LB_SOURCE_V6.parse::<std::net::Ipv6Addr>().unwrap().octets()
            );
            assert_eq!(h.payload_length as usize, out.len() - 14 - 40);
            assert_eq!(h.hop_limit, 63);
            assert_eq!(u32::from(h.flow_label), 0);
            let mut pseudo = h.source.to_vec();
            pseudo.extend_from_slice(&h.destination);
            (40, h.next_header.0, rest, pseudo)
        }
    };
    let _ = outer_len;
    let inner_proto = if inner_v4 { 4 } else { 41 };
    let inner = match kind {
        tunnel::IPIP => {
            assert_eq!(proto, inner_proto);
            payload
        }
        tunnel::GUE => {
            assert_eq!(proto, 17);
            let (u, rest) = UdpHeader::from_slice(payload).unwrap();
            assert_eq!(u.destination_port, gue_port);
            assert!(
                (32768..60999).contains(&u.source_port),
                "GUE source port range"
            );
            assert_eq!(u.length as usize, payload.len());
            if csum_on {
                // Verify over pseudo-header + whole UDP datagram.
                let mut buf = pseudo.clone();
                buf.extend_from_slice(&[0, 17]);
                buf.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                buf.extend_from_slice(payload);
                assert_ne!(u.checksum, 0);
                assert_eq!(csum::checksum(&buf), 0, "outer UDP checksum");
            } else {
                assert_eq!(u.checksum, 0);
            }
            assert_eq!(&rest[0..4], &[0, inner_proto, 0, 0], "GUE header");
            &rest[4..]
        }
        tunnel::GRE => {
            assert_eq!(proto, 47);
            let ethertype: [u8; 2] = if inner_v4 { [8, 0] } else { [0x86, 0xdd] };
            if csum_on {
                assert_eq!(&payload[0..4], &[0x80, 0, ethertype[0], ethertype[1]]);
                assert_eq!(&payload[6..8], &[0, 0], "reserved");
                assert_eq!(csum::checksum(payload), 0, "GRE checksum");
                &payload[8..]
            } else {
                assert_eq!(&payload[0..4], &[0, 0, ethertype[0], ethertype[1]]);
                &payload[4..]
            }
        }
        _ => unreachable!(),
    };
    if let Some(df) = outer_df {
        let inner_df = !inner_v4 || inner[6] & 0x40 != 0;
        assert_eq!(df, inner_df, "outer DF copied from the inner packet");
    }
    inner.to_vec()
}

#[test]
fn tunnels_wrap_packets_exactly() {
    let inners = [
        (
            Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, ACK).payload(b"hello tunnel"),
            "10.0.0.10:80",
        ),
        (
            Frame::udp("203.0.113.7", 40000, "10.0.0.10", 80).payload(b"datagram!"),
            "10.0.0.10:80",
        ),
        (
            Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 80, SYN),
            "[2001:db8::10]:80",
        ),
    ];
    let tunnels = [
        ("{ type = \"ipip\" }", tunnel::IPIP, false, 0),
        ("{ type = \"gue\", port = 6080 }", tunnel::GUE, false, 6080),
        (
            "{ type = \"gue\", port = 5555, checksum = \"csum\" }",
            tunnel::GUE,
            true,
            5555,
        ),
        // IPVS computes the full checksum for remcsum too (forwarded packets are not
        // CHECKSUM_PARTIAL).
        (
            "{ type = \"gue\", port = 5555, checksum = \"remcsum\" }",
            tunnel::GUE,
            true,
            5555,
        ),
        ("{ type = \"gre\" }", tunnel::GRE, false, 0),
        (
            "{ type = \"gre\", checksum = \"csum\" }",
            tunnel::GRE,
            true,
            0,
        ),
    ];
    for (f, vip) in &inners {
        for server in ["10.0.2.1", "fd00:2::1"] {
            for (opts, kind, csum_on, port) in tunnels {
                let proto = if f.tcp.is_none() { "udp" } else { "tcp" };
                let h = Harness::new(&tunnel_service_proto(vip, server, opts, proto));
                if f.tcp.is_some() {
                    // The connection first (a lone ACK has none and goes to the kernel).
                    assert_eq!(
                        h.run(&f.clone().flags(SYN).payload(b"").build()).action,
                        XDP_TX
                    );
                }
                let input = f.build();
                let r = h.run(&input);
                let what = format!("{opts} to {server}, inner {f:?}");
                assert_eq!(r.action, XDP_TX, "{what}: counters {:?}", h.counters());
                let inner =
                    check_encapsulation(&r.out, ip(server), kind, csum_on, port, f.src.is_ipv4());
                let want = expected_dr(&input, [0; 6], [0; 6]);
                assert_eq!(inner, want[14..], "{what}: inner packet");
                // The GUE source port is the flow's: the same on every packet.
                if kind == tunnel::GUE {
                    let again = h.run(&input);
                    let sport = |o: &[u8], off: usize| [o[off], o[off + 1]];
                    let off = 14 + if server.contains(':') { 40 } else { 20 };
                    assert_eq!(sport(&r.out, off), sport(&again.out, off));
                }
            }
        }
    }
}

/// The outer header copies the inner DSCP; ECN is encapsulated (CE becomes ECT(0)).
#[test]
fn tunnels_copy_dscp_and_encapsulate_ecn() {
    let h = Harness::new(&tunnel_service(
        "10.0.0.10:80",
        "10.0.2.1",
        "{ type = \"ipip\" }",
    ));
    for (tos, outer) in [(0xb8u8, 0xb8u8), (0xb9, 0xb9), (0x2b, 0x2a)] {
        let mut input = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build();
        input[15] = tos;
        let (mut hdr, _) = Ipv4Header::from_slice(&input[14..]).unwrap();
        hdr.header_checksum = hdr.calc_header_checksum();
        input[24..26].copy_from_slice(&hdr.header_checksum.to_be_bytes());
        let r = h.run(&input);
        assert_eq!(r.action, XDP_TX);
        assert_eq!(r.out[15], outer, "outer TOS for inner {tos:#x}");
    }
}

/// A tunnel with a VLAN-tagged client frame keeps the tag in front of the outer header.
#[test]
fn tunnels_keep_the_vlan_tag() {
    let h = Harness::new(&tunnel_service(
        "10.0.0.10:80",
        "10.0.2.1",
        "{ type = \"ipip\" }",
    ));
    let input = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN)
        .vlan(9)
        .build();
    let r = h.run(&input);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(&r.out[12..18], &[0x81, 0x00, 0x00, 0x09, 0x08, 0x00]);
    assert_eq!(r.out.len(), input.len() + 20);
    assert_eq!(
        &r.out[18 + 20..],
        &expected_dr(&input, [0; 6], [0; 6])[18..]
    );
}

/// Too big once encapsulated (the harness's path MTU is 1500): IPv4 with DF gets ICMP
/// "fragmentation needed" with the tunnel's MTU, from the VIP, quoting the header and 8
/// bytes; IPv6 gets "packet too big"; IPv4 without DF is dropped (XDP cannot fragment).
#[test]
fn oversized_tunnelled_packets_get_icmp_too_big() {
    let h = Harness::new(
        &(tunnel_service(
            "10.0.0.10:80",
            "10.0.2.1",
            "{ type = \"gue\", port = 6080 }",
        ) + &tunnel_service("[2001:db8::10]:80", "fd00:2::1", "{ type = \"ipip\" }")),
    );
    let mtu_v4 = PATH_MTU - tunnel::overhead(false, tunnel::GUE, 0);
    for syn in [
        Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN),
        Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 80, SYN),
    ] {
        assert_eq!(h.run(&syn.build()).action, XDP_TX);
    }
    // Exactly fits: forwarded.
    let fits = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, ACK)
        .payload(&vec![7; mtu_v4 as usize - 40])
        .build();
    assert_eq!(h.run(&fits).action, XDP_TX);
    let big = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, ACK)
        .payload(&vec![7; mtu_v4 as usize - 39])
        .build();
    let before = h.counters();
    let r = h.run(&big);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(delta(&before, &h.counters()), vec![("tx_icmp_too_big", 1)]);
    assert_eq!(&r.out[0..6], &CLIENT_MAC);
    assert_eq!(&r.out[6..12], &LB_MAC);
    let p = SlicedPacket::from_ethernet(&r.out).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip4)) = &p.net else {
        panic!("not IPv4: {:?}", p.net)
    };
    let hdr = ip4.header();
    assert_eq!(hdr.source_addr().to_string(), "10.0.0.10");
    assert_eq!(hdr.destination_addr().to_string(), "203.0.113.7");
    assert_eq!(csum::checksum(&r.out[14..34]), 0, "IP header checksum");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: mtu_v4 as u16
            }
        )
    );
    assert_eq!(csum::checksum(&r.out[34..]), 0, "ICMP checksum");
    assert_eq!(&r.out[42..], &big[14..14 + 28], "quoted header + 8 bytes");
    // Without DF: dropped.
    let mut nodf = big.clone();
    nodf[20] &= !0x40;
    let (mut hd, _) = Ipv4Header::from_slice(&nodf[14..]).unwrap();
    hd.header_checksum = hd.calc_header_checksum();
    nodf[24..26].copy_from_slice(&hd.header_checksum.to_be_bytes());
    let before = h.counters();
    assert_eq!(h.run(&nodf).action, XDP_DROP);
    assert_eq!(delta(&before, &h.counters()), vec![("drop_too_big", 1)]);
    // IPv6.
    let mtu_v6 = PATH_MTU - tunnel::overhead(true, tunnel::IPIP, 0);
    let big6 = Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 80, ACK)
        .payload(&vec![7; mtu_v6 as usize - 59])
        .build();
    let r = h.run(&big6);
    assert_eq!(r.action, XDP_TX);
    let p = SlicedPacket::from_ethernet(&r.out).unwrap();
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        panic!("not ICMPv6: {:?}", p.transport)
    };
    assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: mtu_v6 });
    let Some(etherparse::NetSlice::Ipv6(ip6)) = &p.net else {
        panic!()
    };
    let src = ip6.header().source_addr();
    let dst = ip6.header().destination_addr();
    assert_eq!(
        (src.to_string().as_str(), dst.to_string().as_str()),
        ("2001:db8::10", "2001:db8:9::7")
    );
    assert_eq!(
        icmp.header()
            .icmp_type
            .calc_checksum(src.octets(), dst.octets(), icmp.payload())
            .unwrap(),
        icmp.header().checksum,
        "ICMPv6 checksum"
    );
    assert_eq!(icmp.payload(), &big6[14..14 + 128], "quoted packet");
    let _ = reason::TX_ICMP_TOO_BIG;
}

/// Runs the decapsulator on `frame`.
fn decap_run(d: &xlb::decap::Decap, frame: &[u8]) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 64];
    let r = d
        .program()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// `xlb decap` takes back exactly what the balancer added, for every tunnel type and
/// family: the balancer's output, run through the decapsulator, is the inner packet behind
/// the outer frame's Ethernet header. Tunnel packets for other addresses, UDP to other ports
/// and plain traffic pass untouched.
#[test]
fn decap_strips_what_the_balancer_adds() {
    let d = xlb::decap::Decap::load(&xlb::decap::Options {
        interfaces: vec![],
        vips: vec![ip("10.0.0.10"), ip("2001:db8::10")],
        gue_ports: vec![6080],
        mode: xlb::config::XdpModeSetting::Auto,
    })
    .unwrap();
    let inners = [
        (
            Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN),
            "10.0.0.10:80",
        ),
        (
            Frame::tcp("2001:db8:9::7", 40000, "2001:db8::10", 80, SYN),
            "[2001:db8::10]:80",
        ),
    ];
    let tunnels = [
        "{ type = \"ipip\" }",
        "{ type = \"gue\", port = 6080 }",
        "{ type = \"gue\", port = 6080, checksum = \"csum\" }",
        "{ type = \"gre\" }",
        "{ type = \"gre\", checksum = \"csum\" }",
    ];
    for (f, vip) in &inners {
        for server in ["10.0.2.1", "fd00:2::1"] {
            for opts in tunnels {
                for vlan in [None, Some(5)] {
                    let h = Harness::new(&tunnel_service(vip, server, opts));
                    let f = match vlan {
                        Some(v) => f.clone().vlan(v),
                        None => f.clone(),
                    };
                    let input = f.build();
                    let r = h.run(&input);
                    assert_eq!(r.action, XDP_TX);
                    let (action, out) = decap_run(&d, &r.out);
                    let mut want = expected_dr(&input, [0; 6], [0; 6]);
                    want[0..12].copy_from_slice(&r.out[0..12]);
                    assert_eq!(
                        (action, &out),
                        (XDP_PASS, &want),
                        "{opts} to {server}, {f:?}"
                    );
                }
            }
        }
    }
    let counted = d.counters().unwrap();
    assert_eq!(counted[0], ("decapsulated", 40));
    // Untouched: plain traffic, GUE on another port, a tunnel to another address.
    let h = Harness::new(&tunnel_service(
        "10.0.0.11:80",
        "10.0.2.1",
        "{ type = \"gue\", port = 7070 }",
    ));
    let other_port = h
        .run(&Frame::tcp("203.0.113.7", 40000, "10.0.0.11", 80, SYN).build())
        .out;
    let h = Harness::new(&tunnel_service(
        "10.0.0.11:80",
        "10.0.2.1",
        "{ type = \"ipip\" }",
    ));
    let other_vip = h
        .run(&Frame::tcp("203.0.113.7", 40000, "10.0.0.11", 80, SYN).build())
        .out;
    for frame in [
        Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build(),
        other_port,
        other_vip,
    ] {
        assert_eq!(decap_run(&d, &frame), (XDP_PASS, frame.clone()));
    }
    let counted = d.counters().unwrap();
    assert_eq!(
        &counted[1..],
        &[("not_tunnel", 2), ("not_vip", 1), ("malformed", 0)]
    );
}

/// GRE headers with key and sequence number (not xlb's, but valid GRE) and GUE variant 1
/// are decapsulated too; truncated ones are counted as malformed and left alone.
#[test]
fn decap_accepts_other_valid_gre_and_gue_forms() {
    let d = xlb::decap::Decap::load(&xlb::decap::Options {
        interfaces: vec![],
        vips: vec![ip("10.0.0.10")],
        gue_ports: vec![6080],
        mode: xlb::config::XdpModeSetting::Auto,
    })
    .unwrap();
    let inner_frame = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build();
    let inner = &inner_frame[14..];
    let outer = |proto: u8, tunnel: &[u8]| -> Vec<u8> {
        let len = 20 + tunnel.len() + inner.len();
        let mut h = Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber(proto),
            [10, 0, 0, 2],
            [10, 0, 2, 1],
        )
        .unwrap();
        h.total_len = len as u16;
        h.header_checksum = h.calc_header_checksum();
        let mut f = inner_frame[0..14].to_vec();
        h.write(&mut f).unwrap();
        f.extend_from_slice(tunnel);
        f.extend_from_slice(inner);
        f
    };
    // GRE with key (K) and sequence number (S).
    let gre_ks = outer(47, &[0x30, 0, 0x08, 0, 0, 0, 0, 42, 0, 0, 0, 7]);
    // GUE variant 1: the IPv4 packet right after UDP.
    let mut udp = vec![0x9c, 0x40, 0x17, 0xc0];
    udp.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    let gue1 = outer(17, &udp);
    for f in [gre_ks, gue1] {
        let (action, out) = decap_run(&d, &f);
        assert_eq!((action, &out[14..]), (XDP_PASS, inner));
    }
    let cut = &outer(47, &[0x30, 0, 0x08, 0, 0, 0, 0, 42, 0, 0, 0, 7])[..40];
    assert_eq!(decap_run(&d, cut), (XDP_PASS, cut.to_vec()));
    assert_eq!(d.counters().unwrap()[3], ("malformed", 1));
}

/// An ICMP error from `router` to `vip` quoting the first `quote` bytes of the reply
/// `quoted` (a frame, Ethernet header included).
fn icmp_error(router: &str, vip: &str, quoted: &[u8], quote: usize, ttl: u8) -> Vec<u8> {
    use etherparse::{PacketBuilder, icmpv4::DestUnreachableHeader};
    let body = &quoted[14..14 + quote];
    let mut out = Vec::new();
    match (ip(router), ip(vip)) {
        (IpAddr::V4(r), IpAddr::V4(v)) => PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv4(r.octets(), v.octets(), ttl)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut out, body)
            .unwrap(),
        (IpAddr::V6(r), IpAddr::V6(v)) => PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
            .ipv6(r.octets(), v.octets(), ttl)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1400 })
            .write(&mut out, body)
            .unwrap(),
        _ => unreachable!(),
    }
    out
}

/// ICMP errors about a connection (a router on the way to the client could not forward a
/// reply) go to the connection's real server by its forwarding method - direct routing as
/// it is, NAT with the outer destination and the quoted source rewritten (checksums
/// included), tunnels encapsulated - so path MTU discovery works through the balancer.
/// Errors quoting no connection go to the kernel untouched.
#[test]
fn icmp_errors_follow_their_connection() {
    for (method, vip4, rip4, vip6, rip6) in [
        (
            "dr",
            "10.0.0.10",
            "10.0.1.1:80",
            "2001:db8::10",
            "[2001:db8:1::1]:80",
        ),
        (
            "nat",
            "10.0.0.10",
            "192.168.56.11:8080",
            "2001:db8::10",
            "[fd00:56::11]:8080",
        ),
        (
            "tunnel",
            "10.0.0.10",
            "10.0.2.1:80",
            "2001:db8::10",
            "[fd00:2::1]:80",
        ),
    ] {
        let toml = format!(
            "[[services]]\nname = \"v4\"\naddress = \"{vip4}:80\"\nforwarding = \"{method}\"\n[[services.backends]]\naddress = \"{rip4}\"\n\
             [[services]]\nname = \"v6\"\naddress = \"[{vip6}]:80\"\nforwarding = \"{method}\"\n[[services.backends]]\naddress = \"{rip6}\"\n"
        );
        let h = Harness::new(&toml);
        for (client, vip, rip, router, quote) in [
            ("203.0.113.7", vip4, rip4, "198.51.100.1", 28),
            ("2001:db8:9::7", vip6, rip6, "2001:db8:7::1", 48),
        ] {
            let (rip_addr, rport) = {
                let sa: std::net::SocketAddr = rip.parse().unwrap();
                (sa.ip(), sa.port())
            };
            assert_eq!(
                h.run(&Frame::tcp(client, 40000, vip, 80, SYN).build())
                    .action,
                XDP_TX
            );
            let reply = Frame::tcp(vip, 80, client, 40000, SYN | ACK).build();
            let input = icmp_error(router, vip, &reply, quote, 64);
            let before = h.counters();
            let r = h.run(&input);
            let what = format!("{method}, {vip}");
            assert_eq!(
                r.action,
                XDP_TX,
                "{what}: {:?}",
                delta(&before, &h.counters())
            );
            assert_eq!(
                delta(&before, &h.counters()),
                vec![("tx", 1), ("icmp_relayed", 1)],
                "{what}"
            );
            match method {
                "dr" => assert_eq!(
                    r.out,
                    expected_dr(&input, backend_mac(rip_addr), LB_MAC),
                    "{what}"
                ),
                "nat" => {
                    let reply =
                        Frame::tcp(&rip_addr.to_string(), rport, client, 40000, SYN | ACK).build();
                    let mut want = icmp_error(router, &rip_addr.to_string(), &reply, quote, 63);
                    want[0..6].copy_from_slice(&backend_mac(rip_addr));
                    want[6..12].copy_from_slice(&LB_MAC);
                    assert_eq!(r.out, want, "{what}");
                }
                _ => {
                    let inner = check_encapsulation(
                        &r.out,
                        rip_addr,
                        tunnel::IPIP,
                        false,
                        0,
                        vip.contains('.'),
                    );
                    assert_eq!(inner, expected_dr(&input, [0; 6], [0; 6])[14..], "{what}");
                }
            }
            // The same error about a connection that does not exist.
            let other = Frame::tcp(vip, 80, client, 40001, SYN | ACK).build();
            let stray = icmp_error(router, vip, &other, quote, 64);
            let before = h.counters();
            assert_eq!(
                h.run(&stray),
                Run {
                    action: XDP_PASS,
                    out: stray.clone()
                },
                "{what}"
            );
            assert_eq!(
                delta(&before, &h.counters()),
                vec![("pass_icmp_unrelated", 1)]
            );
        }
    }
}

/// Echo requests and replies are not errors: the kernel's, untouched.
#[test]
fn icmp_echo_goes_to_the_kernel() {
    use etherparse::PacketBuilder;
    let h = Harness::new(NAT);
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4([203, 0, 113, 7], [10, 0, 0, 10], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .unwrap();
    let before = h.counters();
    assert_eq!(h.run(&ping).out, ping);
    assert_eq!(delta(&before, &h.counters()), vec![("pass_not_tcp_udp", 1)]);
}

/// Splits the IP packet of `frame` into fragments carrying at most `chunk` payload bytes
/// each (a multiple of 8), IPv4 or IPv6 (a fragment header after the fixed one), with IP ID
/// `id`; checksums valid.
fn fragments(frame: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    let l3 = 14;
    let v4 = frame[l3] >> 4 == 4;
    let hlen = if v4 {
        (frame[l3] & 0xf) as usize * 4
    } else {
        40
    };
    let payload = &frame[l3 + hlen..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        let more = end < payload.len();
        let mut f = frame[..l3 + hlen].to_vec();
        if v4 {
            let word = (off / 8) as u16 | if more { 0x2000 } else { 0 };
            f[l3 + 4..l3 + 6].copy_from_slice(&(id as u16).to_be_bytes());
            f[l3 + 6..l3 + 8].copy_from_slice(&word.to_be_bytes());
            f[l3 + 2..l3 + 4].copy_from_slice(&((hlen + end - off) as u16).to_be_bytes());
            f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let c = csum::checksum(&f[l3..l3 + hlen]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let nh = f[l3 + 6];
            f[l3 + 6] = 44;
            f[l3 + 4..l3 + 6].copy_from_slice(&((8 + end - off) as u16).to_be_bytes());
            let word = ((off / 8) as u16) << 3 | more as u16;
            f.extend_from_slice(&[nh, 0]);
            f.extend_from_slice(&word.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        f.extend_from_slice(&payload[off..end]);
        out.push(f);
        off = end;
    }
    out
}

/// Reassembles the IP payload of forwarded fragments (IPv4, or IPv6 with the fragment
/// header right after the fixed one); returns (first fragment's headers, datagram payload).
fn reassemble(frames: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let mut data = Vec::new();
    let mut head = Vec::new();
    for f in frames {
        let v4 = f[14] >> 4 == 4;
        let (off, start) = if v4 {
            let word = u16::from_be_bytes([f[20], f[21]]);
            (
                (word & 0x1fff) as usize * 8,
                14 + (f[14] & 0xf) as usize * 4,
            )
        } else {
            let word = u16::from_be_bytes([f[56], f[57]]);
            ((word >> 3) as usize * 8, 14 + 48)
        };
        if off == 0 {
            head = f[..start].to_vec();
        }
        if data.len() < off {
            data.resize(off, 0);
        }
        data.truncate(off);
        data.extend_from_slice(&f[start..]);
    }
    (head, data)
}

/// The UDP checksum over a datagram's pseudo-header (from its IP header) and payload
/// verifies.
fn udp_checksum_ok(head: &[u8], udp: &[u8]) -> bool {
    let mut buf = Vec::new();
    if head[14] >> 4 == 4 {
        buf.extend_from_slice(&head[26..34]);
        buf.extend_from_slice(&[0, 17]);
        buf.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    } else {
        buf.extend_from_slice(&head[22..54]);
        buf.extend_from_slice(&(udp.len() as u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, 17]);
    }
    buf.extend_from_slice(udp);
    csum::checksum(&buf) == 0
}

/// Fragmented datagrams: the first fragment (it carries the ports) is scheduled and
/// forwarded like its flow's packets, and every later fragment goes to the same real server
/// by the same method - NAT rewriting the address only (the reassembled datagram's checksum
/// verifies), tunnels without the (underivable) outer checksum. A later fragment seen before
/// its first goes to the kernel untouched. IPv4 and IPv6.
#[test]
fn fragments_follow_their_first_fragment() {
    for (method, servers4, servers6) in [
        (
            "nat",
            ["192.168.56.11:5353", "192.168.56.12:5353"],
            ["[fd00:56::11]:5353", "[fd00:56::12]:5353"],
        ),
        (
            "dr",
            ["10.0.1.1:53", "10.0.1.2:53"],
            ["[2001:db8:1::1]:53", "[2001:db8:1::2]:53"],
        ),
        (
            "tunnel",
            ["10.0.2.1:53", "10.0.2.2:53"],
            ["[fd00:2::1]:53", "[fd00:2::2]:53"],
        ),
    ] {
        let mut toml = String::new();
        for (name, vip, servers) in [
            ("v4", "10.0.0.10:53", servers4),
            ("v6", "[2001:db8::10]:53", servers6),
        ] {
            toml += &format!(
                "[[services]]\nname = \"{name}\"\naddress = \"{vip}\"\nprotocol = \"udp\"\nforwarding = \"{method}\"\ntunnel = {{ type = \"gue\", port = 6080, checksum = \"csum\" }}\n"
            );
            if method != "tunnel" {
                toml = toml.replace(
                    "tunnel = { type = \"gue\", port = 6080, checksum = \"csum\" }\n",
                    "",
                );
            }
            for s in servers {
                toml += &format!("[[services.backends]]\naddress = \"{s}\"\n");
            }
        }
        let h = Harness::new(&toml);
        for (client, vip, servers) in [
            ("203.0.113.7", "10.0.0.10", servers4.map(|s| s.to_string())),
            (
                "2001:db8:9::7",
                "2001:db8::10",
                servers6.map(|s| s.to_string()),
            ),
        ] {
            let what = format!("{method} {vip}");
            let big = Frame::udp(client, 5000, vip, 53).payload(&pattern_bytes(3000));
            let frags = fragments(&big.build(), 1232, 0x4242);
            assert_eq!(frags.len(), 3);
            // A later fragment before its first: the kernel's, untouched.
            let before = h.counters();
            assert_eq!(
                h.run(&frags[1]),
                Run {
                    action: XDP_PASS,
                    out: frags[1].clone()
                },
                "{what}"
            );
            assert_eq!(
                delta(&before, &h.counters()),
                vec![("pass_fragment", 1)],
                "{what}"
            );
            // In order (the early one again at the end): all to the same server.
            let before = h.counters();
            let outs: Vec<Run> = [&frags[0], &frags[1], &frags[2]]
                .iter()
                .map(|f| h.run(f))
                .collect();
            let d = delta(&before, &h.counters());
            assert!(outs.iter().all(|r| r.action == XDP_TX), "{what}: {d:?}");
            assert!(
                d.contains(&("fragment_first", 1)) && d.contains(&("fragment_later", 2)),
                "{what}: {d:?}"
            );
            let first_mac = &outs[0].out[0..6];
            assert!(
                outs.iter().all(|r| &r.out[0..6] == first_mac),
                "{what}: one server"
            );
            let server_of = |mac: &[u8]| -> IpAddr {
                servers
                    .iter()
                    .map(|s| s.parse::<std::net::SocketAddr>().unwrap().ip())
                    .find(|a| backend_mac(*a) == mac)
                    .expect("a configured server")
            };
            let server = server_of(first_mac);
            match method {
                "dr" => {
                    for (f, r) in frags.iter().zip(&outs) {
                        assert_eq!(r.out, expected_dr(f, backend_mac(server), LB_MAC), "{what}");
                    }
                }
                "nat" => {
                    let outs: Vec<Vec<u8>> = outs.into_iter().map(|r| r.out).collect();
                    for o in &outs {
                        if o[14] >> 4 == 4 {
                            assert_eq!(
                                csum::checksum(&o[14..34]),
                                0,
                                "{what}: IPv4 header checksum"
                            );
                        }
                    }
                    let (head, udp) = reassemble(&outs);
                    assert_eq!(&udp[2..4], &5353u16.to_be_bytes(), "{what}: port");
                    assert!(
                        udp_checksum_ok(&head, &udp),
                        "{what}: reassembled UDP checksum"
                    );
                    assert_eq!(&udp[8..], &pattern_bytes(3000)[..], "{what}: payload");
                }
                _ => {
                    for (f, r) in frags.iter().zip(&outs) {
                        let inner = check_encapsulation(
                            &r.out,
                            server,
                            tunnel::GUE,
                            false,
                            6080,
                            vip.contains('.'),
                        );
                        assert_eq!(inner, expected_dr(f, [0; 6], [0; 6])[14..], "{what}");
                    }
                }
            }
            // Another flow's datagram: rr sends it to the other server, fragments and all.
            let other = Frame::udp(client, 5001, vip, 53).payload(&pattern_bytes(3000));
            let macs: Vec<Vec<u8>> = fragments(&other.build(), 1232, 0x4343)
                .iter()
                .map(|f| h.run(f).out[0..6].to_vec())
                .collect();
            assert!(macs.iter().all(|m| m == &macs[0]), "{what}");
            assert_ne!(server_of(&macs[0]), server, "{what}: rr");
        }
    }
}

fn pattern_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Replies of NAT connections come first: a wide service that covers the client's address
/// and port does not capture them; a reply too big for the client's side is answered to the
/// real server with ICMP "fragmentation needed" carrying the route's MTU, from the VIP.
#[test]
fn nat_replies_win_over_wide_services_and_get_too_big_answers() {
    let (_bench, ns, pub_mac) = nat_netns("xtfwd-nat2");
    let out = xlb_tests::testbed::in_netns(&ns, move || {
        let toml = format!(
            "{NAT}[[services]]\nname = \"all\"\naddress = \"0.0.0.0/0\"\nports = [0]\n[[services.backends]]\naddress = \"10.0.9.9\"\n"
        );
        let mut h = Harness::new(&toml);
        let pub0 = xlb::dataplane::ifindex("pub0").unwrap();
        h.dp.add_tx_port(pub0).unwrap();
        let syn = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN);
        assert_eq!(h.run(&syn.build()).action, XDP_TX);
        let synack = reply("192.168.56.11", 8080, "203.0.113.7", 40000, Some(SYN | ACK));
        let r = h.run(&synack.build());
        let wide_ok = (r.action, r.out == expected_reply(&synack, "10.0.0.10", 80, pub_mac));
        // The client's side now takes 1000 bytes: a 1200-byte reply (DF) is refused.
        let st = std::process::Command::new("ip")
            .args(["link", "set", "pub0", "mtu", "1000"])
            .status()
            .unwrap();
        assert!(st.success());
        let big = reply("192.168.56.11", 8080, "203.0.113.7", 40000, Some(ACK | FIN)).payload(&[9; 1160]);
        let input = big.build();
        let before = h.counters();
        let r = h.run(&input);
        let d = delta(&before, &h.counters());
        (wide_ok, r, d, input)
    })
    .unwrap();
    assert_eq!(out.0, (XDP_REDIRECT, true), "the reply went the NAT way");
    let (r, d, input) = (out.1, out.2, out.3);
    assert_eq!(r.action, XDP_TX, "{d:?}");
    assert_eq!(d, vec![("tx_icmp_too_big", 1)]);
    let p = SlicedPacket::from_ethernet(&r.out).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip4)) = &p.net else {
        panic!("not IPv4")
    };
    assert_eq!(ip4.header().source_addr().to_string(), "10.0.0.10");
    assert_eq!(ip4.header().destination_addr().to_string(), "192.168.56.11");
    let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1000 }
        )
    );
    assert_eq!(csum::checksum(&r.out[34..]), 0, "ICMP checksum");
    assert_eq!(&r.out[42..], &input[14..14 + 28], "quoted header + 8 bytes");
}

/// Two services mapped to the same NAT real server port (port sets, or two VIPs): a client
/// that uses one source port for both would give the two connections one reply tuple; the
/// second is refused (the client retries from another port) rather than mixing replies.
#[test]
fn nat_reply_tuples_are_never_shared() {
    let h = Harness::new(
        r#"
[[services]]
name = "http"
address = "10.0.0.10:80"
forwarding = "nat"
[[services.backends]]
address = "192.168.56.11:8080"

[[services]]
name = "alt"
address = "10.0.0.10:81"
forwarding = "nat"
[[services.backends]]
address = "192.168.56.11:8080"
"#,
    );
    assert_eq!(
        h.run(&Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build())
            .action,
        XDP_TX
    );
    let before = h.counters();
    let r = h.run(&Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 81, SYN).build());
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("drop_nat_tuple_taken", 1)]
    );
    // Another client port is fine, and so is the first connection's own retransmission.
    assert_eq!(
        h.run(&Frame::tcp("203.0.113.7", 40001, "10.0.0.10", 81, SYN).build())
            .action,
        XDP_TX
    );
    assert_eq!(
        h.run(&Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build())
            .action,
        XDP_TX
    );
    let entries = h.dp.nat_entries_v4();
    assert_eq!(entries.len(), 2, "{entries:?}");
}

/// A connection keeps the forwarding method it was created with: changing a real server's
/// method makes it a new entry, and the old method's connections end as a removed server's.
#[test]
fn changing_the_forwarding_method_does_not_rewrite_live_connections() {
    let dr = "[[services]]\nname = \"web\"\naddress = \"10.0.0.10:80\"\nforwarding = \"dr\"\n[[services.backends]]\naddress = \"10.0.1.1:80\"\n";
    let mut h = Harness::new(dr);
    let syn = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, SYN).build();
    assert_eq!(
        h.run(&syn).out,
        expected_dr(&syn, backend_mac(ip("10.0.1.1")), LB_MAC)
    );
    h.apply(&dr.replace("\"dr\"", "\"nat\""));
    let ack = Frame::tcp("203.0.113.7", 40000, "10.0.0.10", 80, ACK).build();
    let before = h.counters();
    assert_eq!(h.run(&ack).action, XDP_DROP);
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("drop_backend_gone", 1)]
    );
    // A new connection gets the new method.
    let f = Frame::tcp("203.0.113.7", 40001, "10.0.0.10", 80, SYN);
    let before = h.counters();
    let r = h.run(&f.build());
    assert_eq!(
        r.out,
        expected_nat(&f, "10.0.1.1", 80),
        "{:?}",
        delta(&before, &h.counters())
    );
}

/// ICMP errors that NAT real servers send to clients (here: port unreachable for a UDP
/// datagram) leave as the VIP's, quoting the datagram as the client sent it (IPVS
/// `ip_vs_out_icmp`), toward the client's next hop.
#[test]
fn nat_servers_icmp_errors_reach_the_client_as_the_vips() {
    use etherparse::{PacketBuilder, icmpv4::DestUnreachableHeader};
    let (_bench, ns, pub_mac) = nat_netns("xtfwd-nat3");
    let out = xlb_tests::testbed::in_netns(&ns, move || {
        let mut h = Harness::new(NAT);
        let pub0 = xlb::dataplane::ifindex("pub0").unwrap();
        h.dp.add_tx_port(pub0).unwrap();
        let q = Frame::udp("203.0.113.7", 5000, "10.0.0.10", 53);
        let r = h.run(&q.build());
        assert_eq!(r.action, XDP_TX);
        // What the server got, and its error about it (quoting header + 8 bytes).
        let at_server = r.out;
        let mut error = Vec::new();
        PacketBuilder::ethernet2([2, 0xbe, 0, 0, 0, 0x12], LB_MAC)
            .ipv4([192, 168, 56, 12], [203, 0, 113, 7], 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut error, &at_server[14..14 + 28])
            .unwrap();
        let before = h.counters();
        let r = h.run(&error);
        (r, delta(&before, &h.counters()), at_server)
    })
    .unwrap();
    let (r, d, at_server) = out;
    assert_eq!(r.action, XDP_REDIRECT, "{d:?}");
    assert_eq!(d, vec![("redirect", 1), ("icmp_relayed", 1)]);
    // The client's datagram as it left the client (TTL as the server saw it), with the UDP
    // checksum the quote carries (not rewritten, as IPVS leaves it).
    let mut quote = Frame::udp("203.0.113.7", 5000, "10.0.0.10", 53)
        .ttl(63)
        .build()[14..14 + 28]
        .to_vec();
    quote[26..28].copy_from_slice(&at_server[14 + 26..14 + 28]);
    let mut want = Vec::new();
    PacketBuilder::ethernet2(pub_mac, [0x02, 0xc1, 0, 0, 0, 0x07])
        .ipv4([10, 0, 0, 10], [203, 0, 113, 7], 63)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut want, &quote)
        .unwrap();
    want[0..6].copy_from_slice(&[0x02, 0xc1, 0, 0, 0, 0x07]);
    want[6..12].copy_from_slice(&pub_mac);
    assert_eq!(r.out, want);
}
