//! Packet-level tests: the real XDP program run with BPF_PROG_TEST_RUN on crafted frames.
//! Every forwarded frame is compared byte for byte with what direct routing must produce;
//! every frame that goes to the kernel must come out untouched.

use std::net::IpAddr;

use lb_common::{Flow, FlowKeyV4, reason, tcp::state};
use xlb::{
    config::{Forwarding, Protocol, Scheduler, ServiceKey},
    engine::addr_words,
    sched::{Dest, model::Ipvs},
};
use xlb_tests::{frames::*, harness::*};

const WEB: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1:80"
[[services.backends]]
address = "10.0.1.2:80"

[[services]]
name = "dns"
address = "10.0.0.10:53"
protocol = "udp"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.3:53"

[[services]]
name = "web6"
address = "[2001:db8::10]:443"
scheduler = "rr"
[[services.backends]]
address = "[2001:db8:1::1]:443"
"#;

/// One rr service with three real servers (configuration order .1, .2, .3).
const THREE_RR: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
[[services.backends]]
address = "10.0.1.3"
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `frame`, expects direct routing to `server` with exact output bytes.
fn assert_dr(h: &Harness, frame: &[u8], server: &str) {
    let r = h.run(frame);
    assert_eq!(r.action, XDP_TX, "verdict; counters {:?}", h.counters());
    assert_eq!(r.out, expected_dr(frame, backend_mac(ip(server)), LB_MAC));
    assert_ipv4_checksum_valid(&r.out);
}

/// Runs `frame`, expects it handed to the kernel unchanged, counted under `why`.
fn assert_pass(h: &Harness, frame: &[u8], why: u32) {
    let before = h.counters();
    let r = h.run(frame);
    assert_eq!(r.action, XDP_PASS, "verdict for {frame:02x?}");
    assert_eq!(r.out, frame, "a passed frame must not be modified");
    let after = h.counters();
    assert_eq!(
        delta(&before, &after),
        vec![(reason::NAMES[why as usize], 1)],
        "counters"
    );
}

/// Every program must stay well inside the verifier's one-million-instruction budget: the
/// next features grow it, and a program at the edge fails to load on the next kernel. (Each
/// is far below this bound now - tens of thousands - because the schedulers are a global
/// function verified once and large walk states live in per-CPU maps; a jump towards the
/// bound means a change multiplied the verifier's paths.)
#[test]
fn every_program_fits_the_verifier_budget_with_headroom() {
    let h = Harness::new(WEB);
    let counts = h.dp.verified_instructions();
    eprintln!("verified instructions: {counts:?}");
    assert!(counts.len() >= 7, "{counts:?}");
    for (name, count) in counts {
        let count = count.expect("the kernel reports verified_insns");
        assert!(count < 250_000, "{name}: {count} instructions verified");
    }
}

#[test]
fn ipv4_tcp_flow_is_forwarded_exactly_and_sticks() {
    let h = Harness::new(WEB);
    let syn = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, SYN).build();
    let r = h.run(&syn);
    let server = h
        .server_of(&r, &[ip("10.0.1.1"), ip("10.0.1.2")])
        .expect("sent to a real server");
    assert_dr(&Harness::new(WEB), &syn, &server.to_string());
    for flags in [ACK, ACK | PSH, FIN | ACK, ACK] {
        let f = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, flags)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        assert_dr(&h, &f, &server.to_string());
    }
}

#[test]
fn ipv6_tcp_and_udp_are_forwarded_exactly() {
    let h = Harness::new(WEB);
    let syn = Frame::tcp("2001:db8:9::1", 40000, "2001:db8::10", 443, SYN).build();
    assert_dr(&h, &syn, "2001:db8:1::1");
    let ack = Frame::tcp("2001:db8:9::1", 40000, "2001:db8::10", 443, ACK)
        .payload(&[7; 300])
        .build();
    assert_dr(&h, &ack, "2001:db8:1::1");
    let udp = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53).build();
    assert_dr(&h, &udp, "10.0.1.3");
    assert_dr(&h, &udp, "10.0.1.3");
}

#[test]
fn vlan_tagged_and_ip_options_are_forwarded_exactly() {
    let h = Harness::new(WEB);
    let tagged = Frame::tcp("192.168.1.7", 1000, "10.0.0.10", 80, SYN)
        .vlan(42)
        .build();
    assert_eq!(&tagged[12..14], &[0x81, 0x00]);
    let r = h.run(&tagged);
    assert_eq!(r.action, XDP_TX);
    let server = h.server_of(&r, &[ip("10.0.1.1"), ip("10.0.1.2")]).unwrap();
    assert_eq!(r.out, expected_dr(&tagged, backend_mac(server), LB_MAC));
    assert_eq!(&r.out[12..16], &tagged[12..16], "the tag is kept");

    // IHL 6 (router alert) and IHL 15 (40 bytes of NOP options + EOL).
    let mut long = vec![1u8; 39];
    long.push(0);
    for opts in [&[0x94, 0x04, 0x00, 0x00][..], &long[..]] {
        let f = Frame::tcp("192.168.1.8", 1000, "10.0.0.10", 80, SYN)
            .options(opts)
            .payload(b"x")
            .build();
        assert_eq!(f[14] & 0xf, 5 + opts.len() as u8 / 4);
        let r = h.run(&f);
        assert_eq!(r.action, XDP_TX);
        let server = h.server_of(&r, &[ip("10.0.1.1"), ip("10.0.1.2")]).unwrap();
        assert_eq!(r.out, expected_dr(&f, backend_mac(server), LB_MAC));
        assert_ipv4_checksum_valid(&r.out);
    }
}

#[test]
fn traffic_not_for_a_service_goes_to_the_kernel_untouched() {
    let h = Harness::new(WEB);
    // other address, other port, other protocol on the VIP
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 1, "10.0.0.11", 80, SYN).build(),
        reason::PASS_NO_SERVICE,
    );
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 1, "10.0.0.10", 81, SYN).build(),
        reason::PASS_NO_SERVICE,
    );
    assert_pass(
        &h,
        &Frame::udp("192.168.1.1", 1, "10.0.0.10", 80).build(),
        reason::PASS_NO_SERVICE,
    );
    assert_pass(
        &h,
        &Frame::tcp("2001:db8::99", 1, "2001:db8::11", 443, SYN).build(),
        reason::PASS_NO_SERVICE,
    );
    // ARP request for the VIP
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[192, 168, 1, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 10]);
    arp.resize(60, 0);
    assert_pass(&h, &arp, reason::PASS_NOT_IP);
    // ICMP echo to the VIP
    let mut icmp = Frame::udp("192.168.1.1", 1, "10.0.0.10", 53).build();
    icmp[14 + 9] = 1;
    let c = {
        let (hdr, _) = etherparse::Ipv4Header::from_slice(&icmp[14..34]).unwrap();
        hdr.calc_header_checksum()
    };
    icmp[24..26].copy_from_slice(&c.to_be_bytes());
    assert_pass(&h, &icmp, reason::PASS_NOT_TCP_UDP);
    // VRRP (protocol 112) and an unknown ethertype
    let mut vrrp = icmp.clone();
    vrrp[14 + 9] = 112;
    assert_pass(&h, &vrrp, reason::PASS_NOT_TCP_UDP);
    let mut lldp = arp.clone();
    lldp[12..14].copy_from_slice(&[0x88, 0xcc]);
    assert_pass(&h, &lldp, reason::PASS_NOT_IP);
}

/// A destination that shares the service's prefilter bit still goes to the kernel: the
/// prefilter only ever lets the exact lookup decide.
#[test]
fn prefilter_collisions_are_resolved_by_the_lookup() {
    let h = Harness::new(WEB);
    let want = lb_common::filter::bit(addr_words(ip("10.0.0.10"))[0], 80u16.to_be(), 6);
    let other = (0..u32::MAX)
        .map(|i| std::net::Ipv4Addr::from(0x0b00_0000 + i))
        .find(|a| lb_common::filter::bit(addr_words(IpAddr::V4(*a))[0], 80u16.to_be(), 6) == want)
        .unwrap();
    for flags in [SYN, ACK] {
        assert_pass(
            &h,
            &Frame::tcp("192.168.1.1", 1, &other.to_string(), 80, flags).build(),
            reason::PASS_NO_SERVICE,
        );
    }
}

/// Later fragments whose first fragment the balancer did not see go to the kernel
/// untouched (`forwarding.rs` tests fragments that follow their first one).
#[test]
fn later_fragments_without_their_first_go_to_the_kernel() {
    let h = Harness::new(WEB);
    let base = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53)
        .payload(&[1; 64])
        .build();
    for frag in [[0x00u8, 0x10], [0x20, 0x10]] {
        // offset, offset + MF (the DF bit cleared)
        let mut f = base.clone();
        f[14 + 6..14 + 8].copy_from_slice(&frag);
        let (mut hdr, _) = etherparse::Ipv4Header::from_slice(&f[14..34]).unwrap();
        hdr.header_checksum = hdr.calc_header_checksum();
        f[24..26].copy_from_slice(&hdr.header_checksum.to_be_bytes());
        assert_pass(&h, &f, reason::PASS_FRAGMENT);
    }
    // IPv6 fragment header at offset 8
    let mut f = Frame::tcp("2001:db8:9::1", 4000, "2001:db8::10", 443, SYN).build();
    let l4 = f.split_off(54);
    f[20] = 44; // next header: fragment
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[6, 0, 0, 0x41, 0, 0, 0, 7]); // next = TCP, offset 8, M=1
    f.extend_from_slice(&l4);
    assert_pass(&h, &f, reason::PASS_FRAGMENT);
}

#[test]
fn ipv6_destination_options_are_skipped() {
    let h = Harness::new(WEB);
    let mut f = Frame::tcp("2001:db8:9::1", 4000, "2001:db8::10", 443, SYN).build();
    let l4 = f.split_off(54);
    f[20] = 60; // destination options
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // next = TCP, len 0 (8 bytes), PadN
    f.extend_from_slice(&l4);
    assert_dr(&h, &f, "2001:db8:1::1");
    // A routing header is not followed: the destination is not final.
    let mut g = f.clone();
    g[20] = 43;
    assert_pass(&h, &g, reason::PASS_IPV6_EXT);
}

/// Every prefix of valid frames (Ethernet, VLAN, IPv4 with options, IPv6, TCP, UDP) is
/// handed to the kernel unchanged.
#[test]
fn truncated_frames_are_never_rewritten() {
    let h = Harness::new(WEB);
    let frames = [
        Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN).build(),
        Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN)
            .vlan(7)
            .options(&[1, 1, 1, 0])
            .build(),
        Frame::udp("192.168.1.1", 1, "10.0.0.10", 53).build(),
        Frame::tcp("2001:db8:9::1", 1, "2001:db8::10", 443, SYN).build(),
    ];
    for f in frames {
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for len in 14..f.len() {
            let cut = &f[..len];
            let before = h.counters();
            let r = h.run(cut);
            assert_eq!(r.action, XDP_PASS, "prefix {len} of {f:02x?}");
            assert_eq!(r.out, cut);
            let d = delta(&before, &h.counters());
            assert!(
                d == vec![("pass_truncated", 1)] || d == vec![("pass_not_ip", 1)],
                "prefix {len}: {d:?}"
            );
        }
    }
}

#[test]
fn malformed_headers_go_to_the_kernel_untouched() {
    let h = Harness::new(WEB);
    let good = Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN)
        .payload(b"abc")
        .build();
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, u32)> = vec![
        ("IHL 4", Box::new(|f| f[14] = 0x44), reason::PASS_MALFORMED),
        (
            "version 6 in an IPv4 frame",
            Box::new(|f| f[14] = 0x65),
            reason::PASS_MALFORMED,
        ),
        (
            "total length below header",
            Box::new(|f| f[16..18].copy_from_slice(&19u16.to_be_bytes())),
            reason::PASS_MALFORMED,
        ),
        (
            "total length beyond the frame",
            Box::new(|f| f[16..18].copy_from_slice(&200u16.to_be_bytes())),
            reason::PASS_TRUNCATED,
        ),
        (
            "IHL beyond the frame",
            Box::new(|f| f[14] = 0x4f),
            reason::PASS_MALFORMED,
        ),
        (
            "TCP data offset 4",
            Box::new(|f| f[14 + 20 + 12] = 0x40),
            reason::PASS_MALFORMED,
        ),
        (
            "TCP data offset past the packet",
            Box::new(|f| f[14 + 20 + 12] = 0xf0),
            reason::PASS_MALFORMED,
        ),
    ];
    for (what, edit, why) in cases {
        let mut f = good.clone();
        edit(&mut f);
        let before = h.counters();
        let r = h.run(&f);
        assert_eq!(r.action, XDP_PASS, "{what}");
        assert_eq!(r.out, f, "{what}: must not be modified");
        let d = delta(&before, &h.counters());
        assert_eq!(d, vec![(reason::NAMES[why as usize], 1)], "{what}");
    }
    // IPv6 payload length longer than the frame
    let mut f6 = Frame::tcp("2001:db8:9::1", 1, "2001:db8::10", 443, SYN).build();
    f6[18..20].copy_from_slice(&500u16.to_be_bytes());
    assert_pass(&h, &f6, reason::PASS_TRUNCATED);
}

/// Random corruption of valid frames: the program either leaves the frame alone or forwards
/// it with exactly the direct-routing rewrite, never anything else.
#[test]
fn corrupted_frames_are_never_rewritten_wrongly() {
    let h = Harness::new(WEB);
    let seeds = [
        Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN)
            .payload(b"abc")
            .build(),
        Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN)
            .vlan(9)
            .build(),
        Frame::udp("192.168.1.1", 1, "10.0.0.10", 53).build(),
        Frame::tcp("2001:db8:9::1", 1, "2001:db8::10", 443, SYN).build(),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let servers = [
        ip("10.0.1.1"),
        ip("10.0.1.2"),
        ip("10.0.1.3"),
        ip("2001:db8:1::1"),
    ];
    for i in 0..4000 {
        let mut f = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next() % 3 {
            let at = (next() % 60) as usize;
            if at < f.len() {
                f[at] = next() as u8;
            }
        }
        if next() % 4 == 0 {
            let len = (next() as usize) % f.len();
            f.truncate(len);
        }
        if f.len() < 14 {
            continue;
        }
        let r = h.run(&f);
        match r.action {
            XDP_PASS | XDP_DROP => assert_eq!(r.out, f, "frame {i}"),
            XDP_TX => {
                let s = h
                    .server_of(&r, &servers)
                    .unwrap_or_else(|| panic!("frame {i}: unknown MAC"));
                let mut want = expected_dr(&f, backend_mac(s), LB_MAC);
                // The IPv4 checksum is updated incrementally, never recomputed: a header that
                // arrived with a bad checksum leaves with a bad one (the real server drops it,
                // as the balancer's own stack would have).
                let l3 = l3_offset(&f);
                if f[l3] >> 4 == 4 && !ipv4_checksum_valid(&f) {
                    assert!(
                        !ipv4_checksum_valid(&r.out),
                        "frame {i}: a bad checksum was laundered"
                    );
                    want[l3 + 10..l3 + 12].copy_from_slice(&r.out[l3 + 10..l3 + 12]);
                }
                assert_eq!(r.out, want, "frame {i}");
            }
            a => panic!("frame {i}: unexpected verdict {a}"),
        }
    }
}

#[test]
fn ttl_expiring_goes_to_the_kernel() {
    let h = Harness::new(WEB);
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 9, "10.0.0.10", 80, SYN)
            .ttl(1)
            .build(),
        reason::PASS_TTL_EXPIRED,
    );
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 9, "10.0.0.10", 80, SYN)
            .ttl(0)
            .build(),
        reason::PASS_TTL_EXPIRED,
    );
    assert_pass(
        &h,
        &Frame::tcp("2001:db8:9::1", 9, "2001:db8::10", 443, SYN)
            .ttl(1)
            .build(),
        reason::PASS_TTL_EXPIRED,
    );
    let f = Frame::tcp("192.168.1.1", 10, "10.0.0.10", 80, SYN)
        .ttl(2)
        .build();
    let r = h.run(&f);
    assert_eq!(r.action, XDP_TX);
    assert_eq!(r.out[14 + 8], 1);
    assert_ipv4_checksum_valid(&r.out);
}

#[test]
fn segments_of_unknown_tcp_flows_go_to_the_kernel() {
    let h = Harness::new(WEB);
    for flags in [ACK, ACK | PSH, FIN | ACK, RST, SYN | RST] {
        assert_pass(
            &h,
            &Frame::tcp("192.168.1.1", 7000, "10.0.0.10", 80, flags).build(),
            reason::PASS_TCP_NO_FLOW,
        );
    }
}

fn key(svc: &str) -> ServiceKey {
    let sa: std::net::SocketAddr = svc.parse().unwrap();
    ServiceKey::new(sa.ip(), sa.port(), Protocol::Tcp)
}

/// New connections follow IPVS rr: list order is the reverse of the configuration order.
#[test]
fn rr_follows_ipvs_order() {
    let h = Harness::new(THREE_RR);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let got: Vec<IpAddr> = (0..9)
        .map(|i| {
            let r = h.run(&Frame::tcp("192.168.1.1", 1000 + i, "10.0.0.10", 80, SYN).build());
            h.server_of(&r, &servers).unwrap()
        })
        .collect();
    let want: Vec<IpAddr> = ["10.0.1.3", "10.0.1.2", "10.0.1.1"].map(ip).repeat(3);
    assert_eq!(got, want);
}

/// A retransmitted SYN finds its connection: same real server, and it does not consume a
/// scheduling decision (the next new connection gets the next server in IPVS order).
#[test]
fn retransmitted_syn_keeps_its_server_and_the_rr_sequence() {
    let h = Harness::new(THREE_RR);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let syn = Frame::tcp("192.168.1.1", 1000, "10.0.0.10", 80, SYN).build();
    let first = h.server_of(&h.run(&syn), &servers).unwrap();
    assert_eq!(first, servers[2]);
    for _ in 0..3 {
        assert_eq!(h.server_of(&h.run(&syn), &servers), Some(first));
    }
    let next = Frame::tcp("192.168.1.1", 1001, "10.0.0.10", 80, SYN).build();
    assert_eq!(h.server_of(&h.run(&next), &servers), Some(servers[1]));
    let id = h.service_id(&key("10.0.0.10:80"));
    assert_eq!(h.dp.service_stats(id).unwrap().conns, 2);
}

/// wrr: weights 3 and 1 give 3:1 over every 4 new connections; weight 0 gets none.
#[test]
fn wrr_follows_weights_exactly() {
    let cfg = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "wrr"
[[services.backends]]
address = "10.0.1.1"
weight = 3
[[services.backends]]
address = "10.0.1.2"
weight = 1
[[services.backends]]
address = "10.0.1.3"
weight = 0
"#;
    let h = Harness::new(cfg);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let picks: Vec<IpAddr> = (0..400)
        .map(|i| {
            let r = h.run(&Frame::tcp("192.168.2.1", 2000 + i, "10.0.0.10", 80, SYN).build());
            assert_eq!(r.action, XDP_TX);
            h.server_of(&r, &servers).unwrap()
        })
        .collect();
    for w in picks.chunks(4) {
        assert_eq!(w.iter().filter(|&&a| a == servers[0]).count(), 3, "{w:?}");
        assert_eq!(w.iter().filter(|&&a| a == servers[1]).count(), 1, "{w:?}");
    }
    assert!(
        !picks.contains(&servers[2]),
        "weight 0 must get no new flows"
    );
}

/// The XDP program and the step-by-step IPVS model agree decision for decision over random
/// sequences of new flows, weight changes and server additions/removals.
#[test]
fn scheduling_matches_the_ipvs_model_across_changes() {
    for sched in [Scheduler::Rr, Scheduler::Wrr] {
        let mut rng = 0x1234_5678_9abc_def1u64 ^ sched as u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let render = |cfg: &[(u8, u32)]| -> String {
            let mut s = format!(
                "[[services]]\nname = \"m\"\naddress = \"10.0.0.10:80\"\nscheduler = \"{}\"\n",
                sched.name()
            );
            for (n, w) in cfg {
                s += &format!("[[services.backends]]\naddress = \"10.0.1.{n}\"\nweight = {w}\n");
            }
            s
        };
        let mut cfg: Vec<(u8, u32)> = vec![(1, 2), (2, 1)];
        let mut h = Harness::new(&render(&cfg));
        let mut model = Ipvs::new(sched);
        let dest = |n: u8, w: u32| Dest {
            id: (ip(&format!("10.0.1.{n}")), 80),
            weight: w,
        };
        for (n, w) in &cfg {
            model.add(dest(*n, *w));
        }
        let all: Vec<IpAddr> = (1..=9).map(|n| ip(&format!("10.0.1.{n}"))).collect();
        let mut port = 10000u16;
        for step in 0..60 {
            let mut target = cfg.clone();
            match next(4) {
                0 if target.len() < 6 => {
                    let n = 1 + next(9) as u8;
                    if !target.iter().any(|t| t.0 == n) {
                        target.push((n, next(5) as u32));
                    }
                }
                1 if target.len() > 1 => {
                    target.remove(next(target.len() as u64) as usize);
                }
                2 => {
                    let i = next(target.len() as u64) as usize;
                    target[i].1 = next(5) as u32;
                }
                _ => {}
            }
            for m in model.list.clone() {
                if !target
                    .iter()
                    .any(|t| ip(&format!("10.0.1.{}", t.0)) == m.id.0)
                {
                    model.remove(m.id);
                }
            }
            for m in model.list.clone() {
                if let Some(t) = target
                    .iter()
                    .find(|t| ip(&format!("10.0.1.{}", t.0)) == m.id.0)
                    && t.1 != m.weight
                {
                    model.edit(m.id, t.1);
                }
            }
            for t in &target {
                if !cfg.iter().any(|c| c.0 == t.0) {
                    model.add(dest(t.0, t.1));
                }
            }
            cfg = target;
            h.apply(&render(&cfg));
            for _ in 0..next(12) {
                port += 1;
                let r = h.run(&Frame::tcp("192.168.3.1", port, "10.0.0.10", 80, SYN).build());
                let got = if r.action == XDP_TX {
                    h.server_of(&r, &all)
                } else {
                    None
                };
                let want = model.schedule().map(|d| d.0);
                assert_eq!(got, want, "{sched:?} step {step}: {cfg:?}");
            }
        }
    }
}

/// An established flow keeps its real server when servers are added; new flows use them.
#[test]
fn established_flow_keeps_its_server_after_a_backend_is_added() {
    let one = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"
"#;
    let mut h = Harness::new(one);
    let syn = Frame::tcp("192.168.1.1", 5555, "10.0.0.10", 80, SYN).build();
    assert_dr(&h, &syn, "10.0.1.1");
    h.apply(&format!(
        "{one}[[services.backends]]\naddress = \"10.0.1.2\"\n[[services.backends]]\naddress = \"10.0.1.3\"\n"
    ));
    for _ in 0..5 {
        let ack = Frame::tcp("192.168.1.1", 5555, "10.0.0.10", 80, ACK)
            .payload(b"data")
            .build();
        assert_dr(&h, &ack, "10.0.1.1");
    }
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let fresh: Vec<IpAddr> = (0..6)
        .map(|i| {
            h.server_of(
                &h.run(&Frame::tcp("192.168.1.2", 6000 + i, "10.0.0.10", 80, SYN).build()),
                &servers,
            )
            .unwrap()
        })
        .collect();
    assert!(
        fresh.contains(&servers[1]) && fresh.contains(&servers[2]),
        "{fresh:?}"
    );
}

/// Weight 0 quiesces: no new flows, existing ones continue.
#[test]
fn weight_zero_keeps_existing_flows() {
    let cfg = |w: u32| {
        format!(
            "[[services]]\nname = \"web\"\naddress = \"10.0.0.10:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.1.1\"\nweight = {w}\n[[services.backends]]\naddress = \"10.0.1.2\"\n"
        )
    };
    let mut h = Harness::new(&cfg(1));
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2"].map(ip).to_vec();
    // find a flow on 10.0.1.1
    let mut port = 100;
    let on_first = loop {
        port += 1;
        let f = Frame::tcp("192.168.1.1", port, "10.0.0.10", 80, SYN).build();
        if h.server_of(&h.run(&f), &servers) == Some(servers[0]) {
            break port;
        }
    };
    h.apply(&cfg(0));
    for i in 0..10 {
        let r = h.run(&Frame::tcp("192.168.1.9", 3000 + i, "10.0.0.10", 80, SYN).build());
        assert_eq!(h.server_of(&r, &servers), Some(servers[1]));
    }
    let ack = Frame::tcp("192.168.1.1", on_first, "10.0.0.10", 80, ACK).build();
    assert_dr(&h, &ack, "10.0.1.1");
}

/// All servers at weight 0 (or none): new flows go to the kernel (which answers with a reset /
/// port unreachable), counted.
#[test]
fn no_usable_server_passes_new_flows() {
    let h = Harness::new(
        "[[services]]\nname = \"web\"\naddress = \"10.0.0.10:80\"\nscheduler = \"wrr\"\n[[services.backends]]\naddress = \"10.0.1.1\"\nweight = 0\n\n[[services]]\nname = \"empty\"\naddress = \"10.0.0.10:81\"\nscheduler = \"rr\"\n",
    );
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN).build(),
        reason::PASS_NO_BACKEND,
    );
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 1, "10.0.0.10", 81, SYN).build(),
        reason::PASS_NO_BACKEND,
    );
}

/// A removed real server: the packets of its flows are dropped (IPVS with
/// expire_nodest_conn=0), a SYN on the same tuple too, until the entry expires; new tuples
/// go to the remaining server.
#[test]
fn removed_backend_flows_stop() {
    let mut h = Harness::new(WEB);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2"].map(ip).to_vec();
    let syn = Frame::tcp("192.168.7.7", 4242, "10.0.0.10", 80, SYN).build();
    let first = h.server_of(&h.run(&syn), &servers).unwrap();
    let keep = servers.iter().find(|s| **s != first).unwrap();
    let only = WEB.replace(
        &format!("[[services.backends]]\naddress = \"{first}:80\"\n"),
        "",
    );
    assert_ne!(only, WEB);
    h.apply(&only);
    for f in [ACK, RST, SYN] {
        let frame = Frame::tcp("192.168.7.7", 4242, "10.0.0.10", 80, f).build();
        let before = h.counters();
        let r = h.run(&frame);
        assert_eq!(r.action, XDP_DROP);
        assert_eq!(r.out, frame);
        assert_eq!(
            delta(&before, &h.counters()),
            vec![("drop_backend_gone", 1)]
        );
    }
    assert_dr(
        &h,
        &Frame::tcp("192.168.7.7", 4243, "10.0.0.10", 80, SYN).build(),
        &keep.to_string(),
    );
}

/// Once the entry of a removed server's flow has expired, the tuple is scheduled afresh.
#[test]
fn expired_flows_of_removed_servers_are_rescheduled() {
    let two = "[[services]]\nname = \"dns\"\naddress = \"10.0.0.10:53\"\nprotocol = \"udp\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.1.1\"\n[[services.backends]]\naddress = \"10.0.1.2\"\n";
    let mut h = Harness::new(two);
    h.engine
        .set_timeouts(
            &mut h.dp,
            xlb::config::Timeouts {
                tcp: 900,
                tcp_fin: 120,
                udp: 1,
            },
        )
        .unwrap();
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2"].map(ip).to_vec();
    let q = Frame::udp("192.168.9.9", 5000, "10.0.0.10", 53).build();
    let first = h.server_of(&h.run(&q), &servers).unwrap();
    let keep = servers.iter().find(|s| **s != first).unwrap();
    h.apply(&two.replace(
        &format!("[[services.backends]]\naddress = \"{first}\"\n"),
        "",
    ));
    assert_eq!(h.run(&q).action, XDP_DROP);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let before = h.counters();
    assert_dr(&h, &q, &keep.to_string());
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("tx", 1), ("flow_rescheduled", 1)]
    );
}

/// A service removed and added again within the trash period gets its real servers back,
/// with their flows (IPVS revives deleted destinations from its trash).
#[test]
fn readded_service_revives_its_flows() {
    let mut h = Harness::new(WEB);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2"].map(ip).to_vec();
    let syn = Frame::tcp("192.168.8.8", 4000, "10.0.0.10", 80, SYN).build();
    let first = h.server_of(&h.run(&syn), &servers).unwrap();
    let without_web = WEB
        .split("\n[[services]]\nname = \"dns\"")
        .nth(1)
        .map(|rest| format!("\n[[services]]\nname = \"dns\"{rest}"))
        .unwrap();
    h.apply(&without_web);
    let ack = Frame::tcp("192.168.8.8", 4000, "10.0.0.10", 80, ACK).build();
    assert_eq!(h.run(&ack).action, XDP_PASS, "no service, no flow");
    h.apply(WEB);
    assert_dr(&h, &ack, &first.to_string());
}

/// A retransmitted SYN of an existing connection follows it even when no server can take
/// new connections any more (all quiesced).
#[test]
fn retransmitted_syn_follows_its_flow_when_all_servers_are_quiesced() {
    let mut h = Harness::new(THREE_RR);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let syn = Frame::tcp("192.168.1.1", 777, "10.0.0.10", 80, SYN).build();
    let first = h.server_of(&h.run(&syn), &servers).unwrap();
    h.apply(
        &THREE_RR
            .replace(
                "address = \"10.0.1.1\"",
                "address = \"10.0.1.1\"\nweight = 0",
            )
            .replace(
                "address = \"10.0.1.2\"",
                "address = \"10.0.1.2\"\nweight = 0",
            )
            .replace(
                "address = \"10.0.1.3\"",
                "address = \"10.0.1.3\"\nweight = 0",
            ),
    );
    assert_dr(&h, &syn, &first.to_string());
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 778, "10.0.0.10", 80, SYN).build(),
        reason::PASS_NO_BACKEND,
    );
}

/// A service id freed by a removed service and given to a new one: the new service starts
/// its rr sequence where IPVS starts it (the server listed last), whatever the old counter.
#[test]
fn recycled_service_ids_start_fresh() {
    let mut h = Harness::new(THREE_RR);
    for i in 0..5 {
        h.run(&Frame::tcp("192.168.1.1", 100 + i, "10.0.0.10", 80, SYN).build());
    }
    h.apply("");
    h.engine.collect_deferred(&mut h.dp);
    let other = THREE_RR.replace("10.0.0.10:80", "10.0.0.20:80");
    h.apply(&other);
    assert_eq!(h.service_id(&key("10.0.0.20:80")), 0, "the id was recycled");
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let got: Vec<IpAddr> = (0..3)
        .map(|i| {
            h.server_of(
                &h.run(&Frame::tcp("192.168.1.1", 200 + i, "10.0.0.20", 80, SYN).build()),
                &servers,
            )
            .unwrap()
        })
        .collect();
    assert_eq!(got, ["10.0.1.3", "10.0.1.2", "10.0.1.1"].map(ip).to_vec());
}

/// An unresolved next hop: dropped, counted, and the controller is asked to resolve it.
#[test]
fn unresolved_next_hop_is_counted_and_reported() {
    let mut h = Harness::new(WEB);
    h.engine
        .set_next_hop(&mut h.dp, ip("10.0.1.3"), None)
        .unwrap();
    let mut events = h.dp.take_events().unwrap();
    let udp = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53).build();
    let before = h.counters();
    let r = h.run(&udp);
    assert_eq!(r.action, XDP_DROP);
    assert_eq!(r.out, udp);
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("drop_neigh_missing", 1)]
    );
    let item = events.next().expect("an event");
    let ev: lb_common::Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const _) };
    assert_eq!(ev.kind, lb_common::EVENT_NEIGH_MISSING);
    let dns = ServiceKey::new(ip("10.0.0.10"), 53, Protocol::Udp);
    assert_eq!(
        Some(ev.backend),
        h.engine.backend_index(&dns, ip("10.0.1.3"), 53)
    );
    drop(item);
    // Resolved: the same flow goes through.
    h.engine
        .set_next_hop(
            &mut h.dp,
            ip("10.0.1.3"),
            Some(xlb::engine::NextHop {
                ifindex: 1,
                dst_mac: backend_mac(ip("10.0.1.3")),
                src_mac: LB_MAC,
                ..Default::default()
            }),
        )
        .unwrap();
    assert_dr(&h, &udp, "10.0.1.3");
}

/// Per-CPU counters: packets, bytes (L3 length) and connections per service and real server;
/// one verdict per packet.
#[test]
fn counters_move_as_expected() {
    let h = Harness::new(WEB);
    let web = key("10.0.0.10:80");
    let id = h.service_id(&web);
    let f1 = Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, SYN).build();
    let f2 = Frame::tcp("192.168.1.1", 1, "10.0.0.10", 80, ACK)
        .payload(&[0; 100])
        .build();
    let miss = Frame::tcp("192.168.1.1", 1, "10.0.0.99", 80, SYN).build();
    let before = h.counters();
    let r = h.run(&f1);
    let server = h.server_of(&r, &[ip("10.0.1.1"), ip("10.0.1.2")]).unwrap();
    h.run(&f2);
    h.run(&miss);
    let after = h.counters();
    assert_eq!(
        delta(&before, &after),
        vec![("pass_no_service", 1), ("tx", 2)]
    );
    let verdicts: u64 = after[..reason::VERDICTS as usize].iter().sum();
    assert_eq!(verdicts, 3);
    let s = h.dp.service_stats(id).unwrap();
    assert_eq!((s.conns, s.in_packets), (1, 2));
    assert_eq!(s.in_bytes, (f1.len() - 14 + f2.len() - 14) as u64);
    let b =
        h.dp.backend_stats(h.engine.backend_index(&web, server, 80).unwrap())
            .unwrap();
    assert_eq!((b.conns, b.in_packets, b.in_bytes), (1, 2, s.in_bytes));
    assert_eq!(
        (s.out_packets, s.out_bytes),
        (0, 0),
        "direct routing sees no replies"
    );
}

/// The connection entry follows the IPVS direct-routing state machine.
#[test]
fn flow_entry_tracks_ipvs_states() {
    let h = Harness::new(WEB);
    let k = FlowKeyV4 {
        src: addr_words(ip("192.168.1.1"))[0],
        dst: addr_words(ip("10.0.0.10"))[0],
        sport: 999u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let state_after = |flags: u8| -> u8 {
        h.run(&Frame::tcp("192.168.1.1", 999, "10.0.0.10", 80, flags).build());
        let f: Flow = h.dp.flow_v4(&k).expect("tracked");
        f.state()
    };
    assert_eq!(state_after(SYN), state::SYN_RECV);
    assert_eq!(state_after(ACK), state::ESTABLISHED);
    assert_eq!(state_after(ACK | PSH), state::ESTABLISHED);
    assert_eq!(state_after(FIN | ACK), state::FIN_WAIT);
    assert_eq!(state_after(ACK), state::FIN_WAIT);
    assert_eq!(state_after(RST), state::CLOSE);
    // A new SYN on the closed tuple opens a new connection.
    assert_eq!(state_after(SYN), state::SYN_RECV);
    let view = h.engine.view(&h.dp).unwrap();
    let web = view.iter().find(|s| s.key == key("10.0.0.10:80")).unwrap();
    let (a, i): (u64, u64) = web.backends.iter().fold((0, 0), |acc, b| {
        (acc.0 + b.active_conns, acc.1 + b.inactive_conns)
    });
    assert_eq!((a, i), (1, 0), "SYN_RECV counts as active");
    assert!(web.backends.iter().all(|b| b.forwarding == Forwarding::Dr));
}

/// A real server behind another interface: the frame is rewritten for that interface and
/// redirected through the devmap (`XDP_REDIRECT`).
#[test]
fn servers_behind_another_interface_are_reached_by_redirect() {
    xlb_tests::require_root();
    let mut bench = xlb_tests::testbed::Bench::new("xtpkt-redir").unwrap();
    let ns = bench.netns("lb").unwrap();
    bench
        .exec(
            &ns,
            &[
                "ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1",
            ],
        )
        .unwrap();
    bench
        .exec(&ns, &["ip", "link", "set", "out0", "up"])
        .unwrap();
    let out = xlb_tests::testbed::in_netns(&ns, || {
        let mut h = Harness::new(WEB);
        let ifindex = xlb::dataplane::ifindex("out0").unwrap();
        h.dp.add_tx_port(ifindex).unwrap();
        let nh = xlb::engine::NextHop {
            ifindex,
            dst_mac: [2, 0, 0, 0, 0, 0x42],
            src_mac: [2, 0, 0, 0, 0, 0x43],
            ..Default::default()
        };
        h.engine
            .set_next_hop(&mut h.dp, ip("10.0.1.3"), Some(nh))
            .unwrap();
        let q = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53).build();
        let before = h.counters();
        let r = h.run(&q);
        (
            r.action,
            r.out == expected_dr(&q, nh.dst_mac, nh.src_mac),
            delta(&before, &h.counters()),
        )
    })
    .unwrap();
    const XDP_REDIRECT: u32 = 4;
    assert_eq!(out, (XDP_REDIRECT, true, vec![("redirect", 1)]));
}

/// sh, dh and mh: the XDP program and the IPVS model agree for every new flow, over random
/// clients (IPv4 and IPv6), weight changes (0 included: quiesced servers stay in the hash
/// tables), additions and removals, with and without the fallback and port flags.
#[test]
fn hashing_schedulers_match_the_ipvs_model() {
    use xlb::config::SchedFlags;
    for (sched, flags) in [
        (Scheduler::Sh, ""),
        (Scheduler::Sh, "\"sh-fallback\""),
        (Scheduler::Sh, "\"sh-fallback\", \"sh-port\""),
        (Scheduler::Dh, ""),
        (Scheduler::Mh, ""),
        (Scheduler::Mh, "\"mh-fallback\", \"mh-port\""),
    ] {
        for v6 in [false, true] {
            let mut rng =
                0x0bad_cafe_dead_beefu64 ^ (sched as u64) << 8 ^ flags.len() as u64 ^ v6 as u64;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let server = |n: u8| -> IpAddr {
                if v6 {
                    ip(&format!("2001:db8:1::{n}"))
                } else {
                    ip(&format!("10.0.1.{n}"))
                }
            };
            let vip = if v6 {
                "[2001:db8::10]:80"
            } else {
                "10.0.0.10:80"
            };
            let render = |cfg: &[(u8, u32)]| -> String {
                let mut s = format!(
                    "[[services]]\nname = \"h\"\naddress = \"{vip}\"\nscheduler = \"{}\"\nflags = [{flags}]\n",
                    sched.name()
                );
                for (n, w) in cfg {
                    let a = server(*n);
                    let a = if v6 {
                        format!("[{a}]:80")
                    } else {
                        format!("{a}:80")
                    };
                    s += &format!("[[services.backends]]\naddress = \"{a}\"\nweight = {w}\n");
                }
                s
            };
            let mut cfg: Vec<(u8, u32)> = vec![(1, 1), (2, 2), (3, 1)];
            let mut h = Harness::new(&render(&cfg));
            let mut model = Ipvs::new(sched);
            model.flags = SchedFlags {
                fallback: flags.contains("fallback"),
                port: flags.contains("port"),
            };
            for (n, w) in &cfg {
                model.add(Dest {
                    id: (server(*n), 80),
                    weight: *w,
                });
            }
            let all: Vec<IpAddr> = (1..=8).map(server).collect();
            for step in 0..30 {
                let mut target = cfg.clone();
                match next(4) {
                    0 if target.len() < 6 => {
                        let n = 1 + next(8) as u8;
                        if !target.iter().any(|t| t.0 == n) {
                            target.push((n, next(4) as u32));
                        }
                    }
                    1 if target.len() > 1 => {
                        target.remove(next(target.len() as u64) as usize);
                    }
                    _ => {
                        let i = next(target.len() as u64) as usize;
                        target[i].1 = next(4) as u32;
                    }
                }
                for m in model.list.clone() {
                    if !target.iter().any(|t| server(t.0) == m.id.0) {
                        model.remove(m.id);
                    }
                }
                for m in model.list.clone() {
                    if let Some(t) = target.iter().find(|t| server(t.0) == m.id.0)
                        && t.1 != m.weight
                    {
                        model.edit(m.id, t.1);
                    }
                }
                for t in &target {
                    if !cfg.iter().any(|c| c.0 == t.0) {
                        model.add(Dest {
                            id: (server(t.0), 80),
                            weight: t.1,
                        });
                    }
                }
                cfg = target;
                h.apply(&render(&cfg));
                for k in 0..25 {
                    let sport = 1024 + next(60000) as u16;
                    let client = if v6 {
                        format!("2001:db8:9::{:x}:{:x}", next(65536), next(65536))
                    } else {
                        format!("192.168.{}.{}", next(256), next(256))
                    };
                    let (vaddr, _) = vip.rsplit_once(':').unwrap();
                    let vaddr = vaddr.trim_matches(['[', ']']);
                    let r = h.run(&Frame::tcp(&client, sport, vaddr, 80, SYN).build());
                    let got = if r.action == XDP_TX {
                        h.server_of(&r, &all)
                    } else {
                        None
                    };
                    let want = model
                        .schedule_packet(ip(&client), sport, ip(vaddr))
                        .map(|d| d.0);
                    assert_eq!(
                        got, want,
                        "{sched:?} [{flags}] v6={v6} step {step} flow {k}: {cfg:?}"
                    );
                }
            }
        }
    }
}

/// `conntrack = false` (sh, dh, mh): no connection entry at all; every packet is hashed to
/// the same server, and a SYN still counts as a new connection.
#[test]
fn stateless_hashing_services_record_no_flows() {
    let cfg = THREE_RR.replace(
        "scheduler = \"rr\"",
        "scheduler = \"mh\"\nconntrack = false",
    );
    let h = Harness::new(&cfg);
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.1.3"].map(ip).to_vec();
    let before = h.counters();
    let mut seen = Vec::new();
    for port in 0..32u16 {
        let syn = h.run(&Frame::tcp("192.168.9.1", 7000 + port, "10.0.0.10", 80, SYN).build());
        let s = h.server_of(&syn, &servers).expect("forwarded");
        assert_eq!(
            syn.out,
            expected_dr(
                &Frame::tcp("192.168.9.1", 7000 + port, "10.0.0.10", 80, SYN).build(),
                backend_mac(s),
                LB_MAC
            )
        );
        let ack = h.run(&Frame::tcp("192.168.9.1", 7000 + port, "10.0.0.10", 80, ACK).build());
        assert_eq!(h.server_of(&ack, &servers), Some(s));
        seen.push(s);
    }
    assert_eq!(delta(&before, &h.counters()), vec![("tx", 64)]);
    assert!(h.dp.flows_v4().is_empty(), "no connection entries");
    // mh hashes the address only by default: one client, one server.
    assert!(seen.iter().all(|s| *s == seen[0]));
    let id = h.service_id(&key("10.0.0.10:80"));
    assert_eq!(h.dp.service_stats(id).unwrap().conns, 32);
}

/// `expire_nodest_conn`: the first packet of a removed server's connection ends it; a
/// datagram (or SYN) is scheduled afresh at once, a mid-connection segment is dropped and the
/// connection is gone.
#[test]
fn expire_nodest_conn_ends_connections_of_removed_servers() {
    let two = "[[services]]\nname = \"dns\"\naddress = \"10.0.0.10:53\"\nprotocol = \"udp\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.1.1\"\n[[services.backends]]\naddress = \"10.0.1.2\"\n[[services]]\nname = \"web\"\naddress = \"10.0.0.10:80\"\nscheduler = \"rr\"\n[[services.backends]]\naddress = \"10.0.1.1:80\"\n[[services.backends]]\naddress = \"10.0.1.2:80\"\n";
    let mut h = Harness::new(two);
    h.engine.set_expire_nodest_conn(&mut h.dp, true).unwrap();
    let servers: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2"].map(ip).to_vec();
    let q = Frame::udp("192.168.9.9", 5000, "10.0.0.10", 53).build();
    let udp_first = h.server_of(&h.run(&q), &servers).unwrap();
    let syn = Frame::tcp("192.168.9.9", 5001, "10.0.0.10", 80, SYN).build();
    let ack = Frame::tcp("192.168.9.9", 5001, "10.0.0.10", 80, ACK).build();
    let tcp_first = h.server_of(&h.run(&syn), &servers).unwrap();
    h.run(&ack);
    // Remove the servers the two flows are on (when both are the same one, one removal).
    let keep = |first: IpAddr| *servers.iter().find(|s| **s != first).unwrap();
    let mut cfg = two.to_string();
    for gone in [udp_first, tcp_first] {
        cfg = cfg
            .replace(
                &format!("[[services.backends]]\naddress = \"{gone}\"\n"),
                "",
            )
            .replace(
                &format!("[[services.backends]]\naddress = \"{gone}:80\"\n"),
                "",
            );
    }
    h.apply(&cfg);
    let before = h.counters();
    if cfg.contains(&format!("\"{}\"", keep(udp_first))) {
        assert_dr(&h, &q, &keep(udp_first).to_string());
        assert_eq!(
            delta(&before, &h.counters()),
            vec![("tx", 1), ("flow_rescheduled", 1)]
        );
    }
    let before = h.counters();
    assert_eq!(h.run(&ack).action, XDP_DROP);
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("drop_backend_gone", 1)]
    );
    assert_pass(&h, &ack, reason::PASS_TCP_NO_FLOW);
    h.assert_counts_match_tables();
}
