//! Packet-level tests of persistence (IPVS templates) and of services wider than one
//! (address, port): port sets and ranges, all ports, destination prefixes. The real XDP
//! program runs with BPF_PROG_TEST_RUN on crafted frames.

use std::{net::IpAddr, time::Duration};

use lb_common::tcp::state;
use xlb::config::{Protocol, ServiceKey};
use xlb_tests::{frames::*, harness::*};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(svc: &str) -> ServiceKey {
    let sa: std::net::SocketAddr = svc.parse().unwrap();
    ServiceKey::new(sa.ip(), sa.port(), Protocol::Tcp)
}

const SERVERS: [&str; 3] = ["10.0.1.1", "10.0.1.2", "10.0.1.3"];

fn servers() -> Vec<IpAddr> {
    SERVERS.map(ip).to_vec()
}

/// rr over three servers, persistent per /24 for `timeout` seconds.
fn persistent_rr(timeout: u32) -> String {
    format!(
        r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
persistence = {{ timeout = {timeout}, netmask = "255.255.255.0" }}
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
[[services.backends]]
address = "10.0.1.3"
"#
    )
}

/// The server a SYN from `client:sport` to `vip:vport` is sent to (exact DR rewrite checked).
fn syn_to(h: &Harness, client: &str, sport: u16, vip: &str, vport: u16) -> Option<IpAddr> {
    let frame = Frame::tcp(client, sport, vip, vport, SYN).build();
    let r = h.run(&frame);
    if r.action != XDP_TX {
        return None;
    }
    let server = h.server_of(&r, &servers_and_extra())?;
    assert_eq!(r.out, expected_dr(&frame, backend_mac(server), LB_MAC));
    Some(server)
}

fn servers_and_extra() -> Vec<IpAddr> {
    let mut v = servers();
    v.push(ip("10.0.1.9"));
    v.push(ip("2001:db8:1::1"));
    v.push(ip("2001:db8:1::2"));
    v
}

fn all_timeouts(ticks: u32) -> [u32; state::COUNT] {
    [ticks; state::COUNT]
}

/// Connections from one client network stick to one server across connections (rr would
/// spread them); another network gets the scheduler's next choice. The template counts the
/// connections it controls.
#[test]
fn a_client_network_sticks_to_one_server() {
    let h = Harness::new(&persistent_rr(300));
    let first = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
    for (i, client) in ["192.168.1.1", "192.168.1.2", "192.168.1.200"]
        .iter()
        .enumerate()
    {
        for port in 0..3 {
            let s = syn_to(&h, client, 2000 + (i as u16) * 10 + port, "10.0.0.10", 80);
            assert_eq!(s, Some(first), "{client} port {port}");
        }
    }
    let other = syn_to(&h, "192.168.2.1", 1000, "10.0.0.10", 80).unwrap();
    assert_ne!(other, first, "another /24 is scheduled (rr moves on)");
    assert_eq!(
        syn_to(&h, "192.168.2.77", 1000, "10.0.0.10", 80),
        Some(other)
    );

    let id = h.service_id(&key("10.0.0.10:80"));
    let mut templates = h.dp.templates();
    templates.sort_by_key(|t| t.1);
    assert_eq!(templates.len(), 2, "{templates:?}");
    assert_eq!(templates[0].0, id);
    assert_eq!(templates[0].1, ip("192.168.1.0"));
    assert_eq!(templates[0].2.controlled, 10);
    assert_eq!(templates[1].1, ip("192.168.2.0"));
    assert_eq!(templates[1].2.controlled, 2);
    // Established packets of those connections follow their entries as usual.
    let ack = Frame::tcp("192.168.1.2", 2010, "10.0.0.10", 80, ACK).build();
    assert_eq!(h.server_of(&h.run(&ack), &servers()), Some(first));
    h.assert_counts_match_tables();
}

/// A template outlives its connections by the persistence timeout, then expires; the next
/// connection of that network is scheduled afresh.
#[test]
fn a_template_outlives_its_connections_then_expires() {
    let mut h = Harness::new(&persistent_rr(1));
    h.set_timeout_ticks(all_timeouts(2));
    let first = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
    h.run(&Frame::tcp("192.168.1.1", 1000, "10.0.0.10", 80, RST).build());
    std::thread::sleep(Duration::from_millis(100));
    h.reap();
    assert!(h.dp.flows_v4().is_empty(), "the connection expired");
    let t = h.dp.templates();
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].2.controlled, 0,
        "no connection left under the template"
    );
    // Within the persistence timeout: same server, though rr would move on.
    assert_eq!(
        syn_to(&h, "192.168.1.9", 1000, "10.0.0.10", 80),
        Some(first)
    );
    h.run(&Frame::tcp("192.168.1.9", 1000, "10.0.0.10", 80, RST).build());
    std::thread::sleep(Duration::from_millis(100));
    h.reap();
    assert_eq!(h.dp.templates().len(), 1, "still within its timeout");
    // Past it: the reaper deletes the template and the network is scheduled again.
    std::thread::sleep(Duration::from_millis(1300));
    let before = h.counters();
    h.reap();
    assert!(h.dp.templates().is_empty(), "expired template deleted");
    assert!(delta(&before, &h.counters()).is_empty());
    let next = syn_to(&h, "192.168.1.1", 1001, "10.0.0.10", 80).unwrap();
    assert_ne!(next, first, "rr's next server once the template is gone");
}

/// A template does not expire while a connection it controls is alive, even past the
/// persistence timeout (IPVS keeps a template while it has controlled connections).
#[test]
fn a_template_lives_while_its_connections_do() {
    let mut h = Harness::new(&persistent_rr(1));
    let mut t = all_timeouts(1_000_000);
    t[state::CLOSE as usize] = 2;
    h.set_timeout_ticks(t);
    let first = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
    h.run(&Frame::tcp("192.168.1.1", 1000, "10.0.0.10", 80, ACK).build());
    std::thread::sleep(Duration::from_millis(1300));
    h.reap();
    assert_eq!(h.dp.templates().len(), 1);
    assert_eq!(
        syn_to(&h, "192.168.1.50", 1000, "10.0.0.10", 80),
        Some(first)
    );
}

/// As in IPVS, a template outranks quiescing: a weight-0 server keeps the clients whose
/// template points at it. Deleting the server breaks the template.
#[test]
fn quiescing_keeps_template_clients_deleting_breaks_them() {
    let mut h = Harness::new(&persistent_rr(300));
    let first = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
    let quiesced = persistent_rr(300).replace(
        &format!("address = \"{first}\"\n"),
        &format!("address = \"{first}\"\nweight = 0\n"),
    );
    h.apply(&quiesced);
    assert_eq!(
        syn_to(&h, "192.168.1.2", 1000, "10.0.0.10", 80),
        Some(first)
    );
    let other = syn_to(&h, "192.168.5.1", 1000, "10.0.0.10", 80).unwrap();
    assert_ne!(
        other, first,
        "a new network never lands on a weight-0 server"
    );

    let removed = persistent_rr(300).replace(
        &format!("[[services.backends]]\naddress = \"{first}\"\n"),
        "",
    );
    h.apply(&removed);
    let moved = syn_to(&h, "192.168.1.3", 1000, "10.0.0.10", 80).unwrap();
    assert_ne!(moved, first, "the template's server is gone");
    assert_eq!(
        syn_to(&h, "192.168.1.4", 1000, "10.0.0.10", 80),
        Some(moved)
    );
}

/// One service over ports 80 and 443 shares persistence between them; other ports of the
/// address are not the service's.
#[test]
fn a_multi_port_service_shares_persistence_across_its_ports() {
    let h = Harness::new(
        r#"
[[services]]
name = "shop"
address = "10.0.0.10"
ports = [80, 443]
scheduler = "rr"
persistence = { timeout = 300 }
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
[[services.backends]]
address = "10.0.1.3"
"#,
    );
    let s80 = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
    assert_eq!(syn_to(&h, "192.168.1.1", 1001, "10.0.0.10", 443), Some(s80));
    assert_eq!(syn_to(&h, "192.168.1.1", 1002, "10.0.0.10", 80), Some(s80));
    let other = syn_to(&h, "192.168.1.2", 1000, "10.0.0.10", 443).unwrap();
    assert_ne!(other, s80, "persistence is per client address here (/32)");
    let before = h.counters();
    let f = Frame::tcp("192.168.1.1", 1003, "10.0.0.10", 8080, SYN).build();
    let r = h.run(&f);
    assert_eq!((r.action, r.out), (XDP_PASS, f));
    assert_eq!(delta(&before, &h.counters()), vec![("pass_no_service", 1)]);
    let id = h.service_id(&key("10.0.0.10:80"));
    assert_eq!(h.dp.service_stats(id).unwrap().conns, 4);
}

/// Port ranges and all-port services; on one address an exact (address, port) service wins
/// over a range, and a range over all ports.
#[test]
fn port_ranges_all_ports_and_exact_wins() {
    let h = Harness::new(
        r#"
[[services]]
name = "range"
address = "10.0.0.20"
ports = ["8000-8100"]
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"

[[services]]
name = "everything"
address = "10.0.0.30:0"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.2"

[[services]]
name = "alt"
address = "10.0.0.30"
ports = ["8000-8100"]
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"

[[services]]
name = "ssh"
address = "10.0.0.30:22"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.3:22"
"#,
    );
    for (port, want) in [
        (8000, Some("10.0.1.1")),
        (8050, Some("10.0.1.1")),
        (8100, Some("10.0.1.1")),
        (7999, None),
        (8101, None),
    ] {
        assert_eq!(
            syn_to(&h, "192.168.1.1", 1000 + port, "10.0.0.20", port),
            want.map(ip),
            "port {port}"
        );
    }
    for port in [1, 80, 443, 21, 23, 65535] {
        assert_eq!(
            syn_to(&h, "192.168.1.1", 3000, "10.0.0.30", port),
            Some(ip("10.0.1.2")),
            "port {port}"
        );
    }
    assert_eq!(
        syn_to(&h, "192.168.1.1", 3001, "10.0.0.30", 22),
        Some(ip("10.0.1.3"))
    );
    // UDP is another protocol: not covered.
    let before = h.counters();
    let u = Frame::udp("192.168.1.1", 3000, "10.0.0.30", 53).build();
    assert_eq!(h.run(&u).action, XDP_PASS);
    assert_eq!(delta(&before, &h.counters()), vec![("pass_no_service", 1)]);
}

/// A destination-prefix service (a transparent cache cluster with dh): every destination in
/// the prefix is balanced by its address; the longer prefix wins, and an exact service wins
/// over both.
#[test]
fn prefix_services_longest_match_then_exact() {
    let h = Harness::new(
        r#"
[[services]]
name = "caches"
address = "0.0.0.0/0"
ports = [80]
scheduler = "dh"
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
[[services.backends]]
address = "10.0.1.3"

[[services]]
name = "partner"
address = "203.0.113.0/24"
ports = [80, 443]
scheduler = "rr"
[[services.backends]]
address = "10.0.1.9"

[[services]]
name = "vip"
address = "198.51.100.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.9:80"
"#,
    );
    let mut seen = std::collections::HashSet::new();
    for d in 1..=40u8 {
        let dst = format!("198.51.{d}.7");
        let a = syn_to(&h, "192.168.1.1", 1000 + d as u16, &dst, 80).unwrap();
        let b = syn_to(&h, "192.168.77.5", 5000 + d as u16, &dst, 80).unwrap();
        assert_eq!(a, b, "dh: a destination always goes to the same cache");
        assert!(servers().contains(&a));
        seen.insert(a);
    }
    assert_eq!(seen.len(), 3, "destinations spread over the caches");
    assert_eq!(
        syn_to(&h, "192.168.1.1", 2000, "203.0.113.5", 80),
        Some(ip("10.0.1.9"))
    );
    assert_eq!(
        syn_to(&h, "192.168.1.1", 2001, "203.0.113.5", 443),
        Some(ip("10.0.1.9"))
    );
    assert_eq!(
        syn_to(&h, "192.168.1.1", 2002, "198.51.100.10", 80),
        Some(ip("10.0.1.9"))
    );
    assert_eq!(
        syn_to(&h, "192.168.1.1", 2003, "198.51.100.10", 443),
        None,
        "only port 80 of /0"
    );
    assert_eq!(syn_to(&h, "192.168.1.1", 2004, "198.51.100.11", 443), None);
}

/// IPv6 persistence by prefix length.
#[test]
fn ipv6_persistence_by_prefix() {
    let h = Harness::new(
        r#"
[[services]]
name = "web6"
address = "[2001:db8::10]:443"
scheduler = "rr"
persistence = { timeout = 300, netmask = 64 }
[[services.backends]]
address = "2001:db8:1::1"
[[services.backends]]
address = "2001:db8:1::2"
"#,
    );
    let first = syn_to(&h, "2001:db8:aa::1", 1000, "2001:db8::10", 443).unwrap();
    assert_eq!(
        syn_to(&h, "2001:db8:aa::ffff:1", 1001, "2001:db8::10", 443),
        Some(first)
    );
    let other = syn_to(&h, "2001:db8:aa:1::1", 1000, "2001:db8::10", 443).unwrap();
    assert_ne!(other, first, "another /64");
    let t = h.dp.templates();
    assert_eq!(t.len(), 2);
    assert!(t.iter().any(|t| t.1 == ip("2001:db8:aa::")));
}

/// Persistence works with every scheduler: the first connection of a network is scheduled,
/// the template sends the network's next ones to the same server.
#[test]
fn persistence_works_with_every_scheduler() {
    for sched in [
        "rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh", "mh", "fo", "ovf", "twos", "lblc",
        "lblcr",
    ] {
        let cfg =
            persistent_rr(300).replace("scheduler = \"rr\"", &format!("scheduler = \"{sched}\""));
        let h = Harness::new(&cfg);
        let first = syn_to(&h, "192.168.1.1", 1000, "10.0.0.10", 80).unwrap();
        for i in 0..20u16 {
            let client = format!("192.168.1.{}", 2 + i);
            assert_eq!(
                syn_to(&h, &client, 1000 + i, "10.0.0.10", 80),
                Some(first),
                "{sched}: {client}"
            );
        }
        assert_eq!(h.dp.templates().len(), 1, "{sched}");
    }
}

/// lblc over IPv6 (a `::/0` transparent-cache service): each destination keeps the server
/// wlc gave it first; the cache holds one entry per destination.
#[test]
fn lblc_keeps_ipv6_destinations_on_their_caches() {
    let h = Harness::new(
        r#"
[[services]]
name = "caches6"
address = "::/0"
ports = [80]
scheduler = "lblc"
[[services.backends]]
address = "2001:db8:1::1"
[[services.backends]]
address = "2001:db8:1::2"
"#,
    );
    let dsts = [
        "2001:db8:aa::1",
        "2001:db8:bb::2",
        "2001:db8:cc::3",
        "2001:db8:dd::4",
    ];
    let first: Vec<IpAddr> = dsts
        .iter()
        .enumerate()
        .map(|(i, d)| syn_to(&h, "2001:db8:9::1", 1000 + i as u16, d, 80).unwrap())
        .collect();
    // wlc spreads the first connections of new destinations (one each, in turn).
    assert_ne!(first[0], first[1]);
    // Later connections to each destination, from other clients, stay where they went.
    for round in 0..2u16 {
        for (i, d) in dsts.iter().enumerate() {
            let port = 2000 + round * 10 + i as u16;
            assert_eq!(
                syn_to(&h, "2001:db8:9::77", port, d, 80),
                Some(first[i]),
                "{d}"
            );
        }
    }
    let mut cached: Vec<IpAddr> = h.dp.locality().into_iter().map(|(_, dst, _)| dst).collect();
    cached.sort();
    let mut want: Vec<IpAddr> = dsts.iter().map(|d| ip(d)).collect();
    want.sort();
    assert_eq!(cached, want);
}
