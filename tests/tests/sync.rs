//! Connection synchronisation at packet level: the real program's reports on a master
//! (`SYNC_EVENTS`), and connections installed on a freshly loaded backup with
//! `xlb_sync_install`, which the backup's packets then follow, with exact counts.

use std::net::{IpAddr, SocketAddr};

use lb_common::{
    FAMILY_V4, PROTO_TCP, PROTO_UDP, SyncConn, reason, sync,
    tcp::state::{self, ESTABLISHED, FIN_WAIT},
};
use xlb::{
    config::{Forwarding, Limits, Protocol, ServiceKey},
    connsync::{self, ConnRecord, InstallReport},
    engine::addr_words,
};
use xlb_tests::{frames::*, harness::*};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// lc over two servers (on a tie lc takes the server added last, as IPVS, whose list has
/// the newest first: 10.0.1.2 while neither has connections), an IPv6 and a UDP service.
const LC: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "lc"
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"

[[services]]
name = "web6"
address = "[2001:db8::10]:443"
scheduler = "lc"
[[services.backends]]
address = "[2001:db8:1::1]:443"
[[services.backends]]
address = "[2001:db8:1::2]:443"

[[services]]
name = "dns"
address = "10.0.0.10:53"
protocol = "udp"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.3:53"
"#;

/// rr over two servers, persistent per /24.
const STICKY: &str = r#"
[[services]]
name = "sticky"
address = "10.0.0.11:443"
scheduler = "rr"
persistence = { timeout = 300, netmask = "255.255.255.0" }
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
"#;

/// NAT: port 80 → 8080.
const NAT: &str = r#"
[[services]]
name = "nat"
address = "10.0.0.12:80"
forwarding = "nat"
[[services.backends]]
address = "192.168.56.11:8080"
"#;

fn web() -> ServiceKey {
    ServiceKey::new(ip("10.0.0.10"), 80, Protocol::Tcp)
}

fn web6() -> ServiceKey {
    ServiceKey::new(ip("2001:db8::10"), 443, Protocol::Tcp)
}

/// Runs `frame`, expects direct routing to `server` with exact output bytes.
fn assert_dr(h: &Harness, frame: &[u8], server: &str) {
    let r = h.run(frame);
    assert_eq!(r.action, XDP_TX, "verdict; counters {:?}", h.counters());
    assert_eq!(r.out, expected_dr(frame, backend_mac(ip(server)), LB_MAC));
    assert_ipv4_checksum_valid(&r.out);
}

/// Runs `frame`, expects it handed to the kernel unchanged, counted under `why` only.
fn assert_pass(h: &Harness, frame: &[u8], why: u32) {
    let before = h.counters();
    let r = h.run(frame);
    assert_eq!(r.action, XDP_PASS);
    assert_eq!(r.out, frame, "a passed frame must not be modified");
    assert_eq!(
        delta(&before, &h.counters()),
        vec![(reason::NAMES[why as usize], 1)]
    );
}

/// (backend index, generation) of real server `addr` of service `key`.
fn backend(h: &Harness, key: &ServiceKey, addr: &str) -> (u32, u32) {
    let refs = h.engine.service_refs();
    let s = refs.iter().find(|s| s.config.key == *key).unwrap();
    let b = s
        .backends
        .iter()
        .find(|b| b.config.addr == ip(addr))
        .unwrap();
    (b.index, b.generation)
}

/// An established connection of `client` to web, on `server`.
fn web_conn(client: &str, server: &str, st: u8) -> ConnRecord {
    ConnRecord {
        protocol: PROTO_TCP,
        client: sa(client),
        vaddr: sa("10.0.0.10:80"),
        server: SocketAddr::new(ip(server), 80),
        state: st,
        forwarding: Forwarding::Dr,
        template: false,
        timeout: 900,
    }
}

fn install(h: &mut Harness, records: &[ConnRecord]) -> InstallReport {
    connsync::install(&mut h.dp, &h.engine, records).expect("install")
}

/// (a) A master reports a connection once it is established (not the SYN: embryonic
/// connections are not synchronised), each later change of state, UDP flows at once, and
/// nothing while the flag is off.
#[test]
fn master_reports_established_and_changed_connections() {
    let mut h = Harness::new(LC);
    let syn = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, SYN).build();
    let ack = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, ACK).build();
    let fin = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, FIN | ACK).build();

    // Off (the default): nothing.
    assert!(!h.dp.sync_events());
    assert_dr(&h, &syn, "10.0.1.2");
    assert_dr(&h, &ack, "10.0.1.2");
    assert!(h.dp.drain_sync_events().is_empty());

    h.dp.set_sync_events(true).unwrap();
    // Setting the timeouts keeps the flag.
    h.engine
        .set_timeouts(&mut h.dp, Default::default())
        .unwrap();
    assert!(h.dp.sync_events());
    let (index, generation) = backend(&h, &web(), "10.0.1.2");
    let service_id = h.service_id(&web());
    let want = |sport: u16, st: u8| SyncConn {
        kind: sync::CONN,
        family: FAMILY_V4,
        proto: PROTO_TCP,
        state: st,
        src: addr_words(ip("192.168.1.1")),
        dst: addr_words(ip("10.0.0.10")),
        sport: sport.to_be(),
        dport: 80u16.to_be(),
        backend: index,
        generation,
        service_id,
        template: 0,
        timeout: 0,
        result: 0,
    };

    // An established connection's FIN: FIN_WAIT.
    assert_dr(&h, &fin, "10.0.1.2");
    assert_eq!(h.dp.drain_sync_events(), vec![want(40000, FIN_WAIT)]);

    // A new connection: nothing for the SYN, ESTABLISHED with the ACK, nothing for a data
    // packet that changes nothing. (lc: .2 has the closing connection, .1 none.)
    let syn2 = Frame::tcp("192.168.1.1", 40001, "10.0.0.10", 80, SYN).build();
    let ack2 = Frame::tcp("192.168.1.1", 40001, "10.0.0.10", 80, ACK).build();
    let data2 = Frame::tcp("192.168.1.1", 40001, "10.0.0.10", 80, ACK | PSH)
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();
    assert_dr(&h, &syn2, "10.0.1.1");
    assert!(
        h.dp.drain_sync_events().is_empty(),
        "SYN_RECV is not synced"
    );
    assert_dr(&h, &ack2, "10.0.1.1");
    assert_dr(&h, &data2, "10.0.1.1");
    let (index2, generation2) = backend(&h, &web(), "10.0.1.1");
    let events = h.dp.drain_sync_events();
    assert_eq!(
        events,
        vec![SyncConn {
            backend: index2,
            generation: generation2,
            ..want(40001, ESTABLISHED)
        }]
    );
    // As records: the real server's address and port, the state's timeout.
    assert_eq!(
        connsync::records_from_events(&h.engine, &events),
        vec![web_conn("192.168.1.1:40001", "10.0.1.1", ESTABLISHED)]
    );

    // UDP: at once.
    let udp = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53).build();
    assert_dr(&h, &udp, "10.0.1.3");
    let ev = h.dp.drain_sync_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].proto, ev[0].state), (PROTO_UDP, state::UDP));
    assert_eq!(
        connsync::records_from_events(&h.engine, &ev),
        vec![ConnRecord {
            protocol: PROTO_UDP,
            client: sa("192.168.1.1:5353"),
            vaddr: sa("10.0.0.10:53"),
            server: sa("10.0.1.3:53"),
            state: state::UDP,
            forwarding: Forwarding::Dr,
            template: false,
            timeout: 300,
        }]
    );

    // Off again: nothing more.
    h.dp.set_sync_events(false).unwrap();
    let ack3 = Frame::tcp("192.168.1.1", 40002, "10.0.0.10", 80, ACK).build();
    let syn3 = Frame::tcp("192.168.1.1", 40002, "10.0.0.10", 80, SYN).build();
    h.run(&syn3);
    h.run(&ack3);
    assert!(h.dp.drain_sync_events().is_empty());
    assert_eq!(h.counters()[reason::EV_SYNC_DROPPED as usize], 0);

    // The refresh: every connection worth it (ESTABLISHED, FIN_WAIT, UDP; not SYN_RECV).
    let mut all = connsync::refresh_records(&h.dp, &h.engine, None);
    all.sort_by_key(|r| r.client);
    let mut want_all = vec![
        web_conn("192.168.1.1:40000", "10.0.1.2", FIN_WAIT),
        web_conn("192.168.1.1:40001", "10.0.1.1", ESTABLISHED),
        web_conn("192.168.1.1:40002", "10.0.1.2", ESTABLISHED),
        connsync::records_from_events(&h.engine, &ev)[0],
    ];
    want_all[0].timeout = 120;
    want_all.sort_by_key(|r| r.client);
    assert_eq!(all, want_all);
}

/// A persistent service reports its template before the connection it controls; the
/// refresh sends templates first.
#[test]
fn master_reports_templates_before_their_connections() {
    let mut h = Harness::new(STICKY);
    h.dp.set_sync_events(true).unwrap();
    let key = ServiceKey::new(ip("10.0.0.11"), 443, Protocol::Tcp);
    // rr's first pick: the server added last (IPVS's list order).
    let (index, generation) = backend(&h, &key, "10.0.1.2");
    // The template comes with the SYN, the connection with the ACK.
    h.run(&Frame::tcp("192.168.7.9", 1000, "10.0.0.11", 443, SYN).build());
    h.run(&Frame::tcp("192.168.7.9", 1000, "10.0.0.11", 443, ACK).build());
    let ev = h.dp.drain_sync_events();
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert_eq!(
        ev[0],
        SyncConn {
            kind: sync::TEMPLATE,
            family: FAMILY_V4,
            proto: PROTO_TCP,
            state: 0,
            src: addr_words(ip("192.168.7.0")),
            dst: addr_words(ip("10.0.0.11")),
            sport: 0,
            dport: 443u16.to_be(),
            backend: index,
            generation,
            service_id: h.service_id(&key),
            template: 25,
            timeout: lb_common::ticks::from_secs(300),
            result: 0,
        }
    );
    assert_eq!(
        (ev[1].kind, ev[1].state, ev[1].template),
        (sync::CONN, ESTABLISHED, 25)
    );
    let template = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("192.168.7.0:0"),
        vaddr: sa("10.0.0.11:443"),
        server: sa("10.0.1.2:443"),
        state: 0,
        forwarding: Forwarding::Dr,
        template: true,
        timeout: 300,
    };
    let conn = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("192.168.7.9:1000"),
        vaddr: sa("10.0.0.11:443"),
        server: sa("10.0.1.2:443"),
        state: ESTABLISHED,
        forwarding: Forwarding::Dr,
        template: false,
        timeout: 900,
    };
    assert_eq!(
        connsync::records_from_events(&h.engine, &ev),
        vec![template, conn]
    );
    assert_eq!(
        connsync::refresh_records(&h.dp, &h.engine, None),
        vec![template, conn]
    );
}

/// A full ring drops reports and counts them (`sync_dropped`), never blocks the packet.
#[test]
fn a_full_ring_drops_and_counts() {
    let mut h = Harness::with_limits(
        LC,
        Limits {
            conn_table_size: 32768,
            conn_table_size_v6: 1024,
            max_services: 16,
            max_backends: 64,
            slot_table_size: 1 << 12,
            ..Limits::default()
        },
    );
    h.dp.set_sync_events(true).unwrap();
    let n = 15_000u32;
    for i in 0..n {
        let f = Frame::udp(
            &format!("192.168.{}.{}", 10 + i / 250, 1 + i % 250),
            5353,
            "10.0.0.10",
            53,
        )
        .build();
        assert_eq!(h.run(&f).action, XDP_TX);
    }
    let got = h.dp.drain_sync_events().len() as u64;
    let dropped = h.counters()[reason::EV_SYNC_DROPPED as usize];
    assert_eq!(got + dropped, n as u64);
    // 1 MiB of 72-byte slots (a record and the ring's 8-byte header).
    assert_eq!(got, (1u64 << 20) / 72);
    // Room again.
    let f = Frame::udp("192.168.200.1", 5353, "10.0.0.10", 53).build();
    h.run(&f);
    assert_eq!(h.dp.drain_sync_events().len(), 1);
}

/// (b) On a backup, an installed connection takes the next packet of its flow (a plain ACK,
/// which would otherwise go to the kernel) to the synced server although lc would pick the
/// other; it is counted once, a refresh does not count it again, and lc sees the count.
#[test]
fn backup_forwards_installed_connections_to_their_server_counted_once() {
    let mut h = Harness::new(LC);
    let ack = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, ACK)
        .payload(b"more data")
        .build();
    assert_pass(&h, &ack, reason::PASS_TCP_NO_FLOW);

    let a = web_conn("192.168.1.1:40000", "10.0.1.1", ESTABLISHED);
    assert_eq!(
        install(&mut h, &[a]),
        InstallReport {
            installed: 1,
            ..Default::default()
        }
    );
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (1, 0));
    assert_eq!(h.conns(&web(), ip("10.0.1.2")), (0, 0));
    assert_eq!(h.dp.flows_in_table().unwrap(), 1);
    let before = h.counters();
    assert_dr(&h, &ack, "10.0.1.1");
    assert_eq!(delta(&before, &h.counters()), vec![("tx", 1)]);
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (1, 0));

    // A refresh: the same connection, not counted again.
    assert_eq!(
        install(&mut h, &[a, a]),
        InstallReport {
            refreshed: 2,
            ..Default::default()
        }
    );
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (1, 0));
    assert_eq!(h.dp.flows_in_table().unwrap(), 1);

    // lc counts it: with a second synced connection on .1, two new clients both go to .2
    // (0 then 1 active against 2; without the synced counts the second would go to .1).
    let b = web_conn("192.168.1.2:40000", "10.0.1.1", ESTABLISHED);
    assert_eq!(install(&mut h, &[b]).installed, 1);
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (2, 0));
    assert_dr(
        &h,
        &Frame::tcp("192.168.2.1", 1000, "10.0.0.10", 80, SYN).build(),
        "10.0.1.2",
    );
    assert_dr(
        &h,
        &Frame::tcp("192.168.2.2", 1000, "10.0.0.10", 80, SYN).build(),
        "10.0.1.2",
    );
    assert_eq!(h.conns(&web(), ip("10.0.1.2")), (2, 0));

    // A state change from the master moves the count (active → inactive).
    let closing = web_conn("192.168.1.1:40000", "10.0.1.1", FIN_WAIT);
    assert_eq!(install(&mut h, &[closing]).refreshed, 1);
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (1, 1));
    let key = lb_common::FlowKeyV4::new(
        addr_words(ip("192.168.1.1"))[0],
        addr_words(ip("10.0.0.10"))[0],
        40000u16.to_be(),
        80u16.to_be(),
        PROTO_TCP,
    );
    assert_eq!(h.dp.flow_v4(&key).unwrap().state(), FIN_WAIT);

    // IPv6 too (lc would pick ::2).
    let ack6 = Frame::tcp("2001:db8:9::1", 40000, "2001:db8::10", 443, ACK).build();
    assert_pass(&h, &ack6, reason::PASS_TCP_NO_FLOW);
    let c6 = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("[2001:db8:9::1]:40000"),
        vaddr: sa("[2001:db8::10]:443"),
        server: sa("[2001:db8:1::1]:443"),
        state: ESTABLISHED,
        forwarding: Forwarding::Dr,
        template: false,
        timeout: 900,
    };
    assert_eq!(install(&mut h, &[c6]).installed, 1);
    assert_dr(&h, &ack6, "2001:db8:1::1");
    assert_eq!(h.conns(&web6(), ip("2001:db8:1::1")), (1, 0));
    h.assert_counts_match_tables();

    // Records this backup has no service or server for are counted and skipped.
    let unknown = [
        ConnRecord {
            vaddr: sa("10.0.0.99:80"),
            ..a
        },
        web_conn("192.168.1.3:1", "10.0.1.9", ESTABLISHED),
    ];
    assert_eq!(
        install(&mut h, &unknown),
        InstallReport {
            no_service: 1,
            no_server: 1,
            ..Default::default()
        }
    );

    // The entries age like any other: the reaper retires them and the counts go.
    h.set_timeout_ticks([0; lb_common::tcp::state::COUNT]);
    std::thread::sleep(std::time::Duration::from_millis(40));
    h.reap();
    assert_eq!(h.dp.flows_in_table().unwrap(), 0);
    h.assert_counts_match_tables();
}

/// (c) A record naming another server replaces the backup's entry (the count moves with
/// it) when the master's connection is active; an inactive one leaves the entry alone, as
/// IPVS does.
#[test]
fn a_record_for_another_server_replaces_the_entry() {
    let mut h = Harness::new(LC);
    let syn = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, SYN).build();
    let ack = Frame::tcp("192.168.1.1", 40000, "10.0.0.10", 80, ACK).build();
    // The backup saw the connection itself (lc: .2).
    assert_dr(&h, &syn, "10.0.1.2");
    assert_dr(&h, &ack, "10.0.1.2");
    assert_eq!(h.conns(&web(), ip("10.0.1.2")), (1, 0));

    let closing_on_1 = web_conn("192.168.1.1:40000", "10.0.1.1", FIN_WAIT);
    assert_eq!(
        install(&mut h, &[closing_on_1]),
        InstallReport {
            kept: 1,
            ..Default::default()
        }
    );
    assert_dr(&h, &ack, "10.0.1.2");

    let on_1 = web_conn("192.168.1.1:40000", "10.0.1.1", ESTABLISHED);
    assert_eq!(
        install(&mut h, &[on_1]),
        InstallReport {
            replaced: 1,
            ..Default::default()
        }
    );
    assert_eq!(h.conns(&web(), ip("10.0.1.2")), (0, 0));
    assert_eq!(h.conns(&web(), ip("10.0.1.1")), (1, 0));
    assert_eq!(h.dp.flows_in_table().unwrap(), 1);
    assert_dr(&h, &ack, "10.0.1.1");
    h.assert_counts_match_tables();
}

/// (d) A full table refuses installs and counts them (`sync_refused`); established local
/// connections are never pushed out for synced ones.
#[test]
fn a_full_table_refuses_and_counts() {
    let mut h = Harness::with_limits(
        LC,
        Limits {
            conn_table_size: 4,
            conn_table_size_v6: 4,
            max_services: 16,
            max_backends: 64,
            slot_table_size: 1 << 12,
            ..Limits::default()
        },
    );
    let records: Vec<ConnRecord> = (0..6)
        .map(|i| {
            web_conn(
                &format!("192.168.1.1:{}", 1000 + i),
                "10.0.1.2",
                ESTABLISHED,
            )
        })
        .collect();
    let before = h.counters();
    assert_eq!(
        install(&mut h, &records),
        InstallReport {
            installed: 4,
            table_full: 2,
            ..Default::default()
        }
    );
    assert_eq!(delta(&before, &h.counters()), vec![("sync_refused", 2)]);
    assert_eq!(h.conns(&web(), ip("10.0.1.2")), (4, 0));
    assert_eq!(h.dp.flows_in_table().unwrap(), 4);
    // The refused ones have no entry: their packets go to the kernel.
    assert_pass(
        &h,
        &Frame::tcp("192.168.1.1", 1005, "10.0.0.10", 80, ACK).build(),
        reason::PASS_TCP_NO_FLOW,
    );
    assert_dr(
        &h,
        &Frame::tcp("192.168.1.1", 1003, "10.0.0.10", 80, ACK).build(),
        "10.0.1.2",
    );
    // Refreshing those that are in still works with the table full.
    assert_eq!(install(&mut h, &records[..4]).refreshed, 4);
    h.assert_counts_match_tables();
}

/// Templates: installed on the backup (a new connection of the client network follows
/// them), and synced connections join them, so their count of controlled connections stays
/// exact when the connections end.
#[test]
fn templates_and_controlled_connections_stay_consistent() {
    let mut h = Harness::new(STICKY);
    let key = ServiceKey::new(ip("10.0.0.11"), 443, Protocol::Tcp);
    let template = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("192.168.7.0:0"),
        vaddr: sa("10.0.0.11:443"),
        server: sa("10.0.1.1:443"),
        state: 0,
        forwarding: Forwarding::Dr,
        template: true,
        timeout: 300,
    };
    let conn = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("192.168.7.9:1000"),
        vaddr: sa("10.0.0.11:443"),
        server: sa("10.0.1.1:443"),
        state: ESTABLISHED,
        forwarding: Forwarding::Dr,
        template: false,
        timeout: 900,
    };
    assert_eq!(
        install(&mut h, &[template, conn, template]),
        InstallReport {
            installed: 1,
            templates: 2,
            ..Default::default()
        }
    );
    let templates = h.dp.templates();
    assert_eq!(templates.len(), 1);
    let (sid, net, t) = templates[0];
    assert_eq!((sid, net), (h.service_id(&key), ip("192.168.7.0")));
    let (index, _) = backend(&h, &key, "10.0.1.1");
    assert_eq!(
        (t.backend, t.controlled),
        (index, 1),
        "refreshed in place, count kept"
    );
    assert_eq!(h.conns(&key, ip("10.0.1.1")), (1, 0));

    // The synced connection's packets, and a new connection of the network (rr would
    // start with .2), go to the template's server.
    assert_dr(
        &h,
        &Frame::tcp("192.168.7.9", 1000, "10.0.0.11", 443, ACK).build(),
        "10.0.1.1",
    );
    assert_dr(
        &h,
        &Frame::tcp("192.168.7.20", 2000, "10.0.0.11", 443, SYN).build(),
        "10.0.1.1",
    );
    assert_eq!(h.dp.templates()[0].2.controlled, 2);

    // A connection without its template first: one is made for it.
    let other = ConnRecord {
        client: sa("192.168.8.1:1000"),
        server: sa("10.0.1.2:443"),
        ..conn
    };
    assert_eq!(install(&mut h, &[other]).installed, 1);
    let mut t: Vec<_> =
        h.dp.templates()
            .into_iter()
            .map(|(_, net, t)| (net, t.controlled))
            .collect();
    t.sort();
    assert_eq!(t, vec![(ip("192.168.7.0"), 2), (ip("192.168.8.0"), 1)]);

    // Everything expires: the counts come back to zero without wrapping.
    h.set_timeout_ticks([0; lb_common::tcp::state::COUNT]);
    std::thread::sleep(std::time::Duration::from_millis(40));
    h.reap();
    assert_eq!(h.dp.flows_in_table().unwrap(), 0);
    for (_, _, t) in h.dp.templates() {
        assert_eq!(t.controlled, 0);
    }
    h.assert_counts_match_tables();

    // A backup whose service is not persistent takes the connection, not the template.
    let mut plain = Harness::new(&STICKY.replace(
        "persistence = { timeout = 300, netmask = \"255.255.255.0\" }\n",
        "",
    ));
    assert_eq!(
        install(&mut plain, &[template, conn]),
        InstallReport {
            installed: 1,
            not_persistent: 1,
            ..Default::default()
        }
    );
    assert!(plain.dp.templates().is_empty());
}

/// A NAT connection gets its reply entry and its packets are rewritten for its server.
#[test]
fn nat_connections_get_their_reply_entry() {
    let mut h = Harness::new(NAT);
    let rec = ConnRecord {
        protocol: PROTO_TCP,
        client: sa("203.0.113.7:40000"),
        vaddr: sa("10.0.0.12:80"),
        server: sa("192.168.56.11:8080"),
        state: ESTABLISHED,
        forwarding: Forwarding::Nat,
        template: false,
        timeout: 900,
    };
    assert_eq!(install(&mut h, &[rec]).installed, 1);
    let nat = h.dp.nat_entries_v4();
    assert_eq!(nat.len(), 1);
    let (reply, entry) = nat[0];
    assert_eq!(
        reply,
        lb_common::FlowKeyV4::new(
            addr_words(ip("192.168.56.11"))[0],
            addr_words(ip("203.0.113.7"))[0],
            8080u16.to_be(),
            40000u16.to_be(),
            PROTO_TCP,
        )
    );
    assert_eq!(
        (entry.vip, entry.vport),
        (addr_words(ip("10.0.0.12"))[0], 80u16.to_be())
    );
    let f = Frame::tcp("203.0.113.7", 40000, "10.0.0.12", 80, ACK).payload(b"x");
    let r = h.run(&f.build());
    assert_eq!(r.action, XDP_TX);
    let mut g = f.clone();
    g.dst = ip("192.168.56.11");
    g.dport = 8080;
    g.ttl -= 1;
    let mut want = g.build();
    want[0..6].copy_from_slice(&backend_mac(ip("192.168.56.11")));
    want[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(r.out, want);
}

/// Master to backup through the wire format: the master's reports become messages, the
/// backup decodes and installs them, and its next packets of those flows follow.
#[test]
fn master_to_backup_through_the_wire_format() {
    let mut master = Harness::new(LC);
    let mut backup = Harness::new(LC);
    master.dp.set_sync_events(true).unwrap();
    // Two connections on the master: lc puts them on .2 and .1.
    for sport in [40000u16, 40001] {
        master.run(&Frame::tcp("192.168.1.1", sport, "10.0.0.10", 80, SYN).build());
        master.run(&Frame::tcp("192.168.1.1", sport, "10.0.0.10", 80, ACK).build());
    }
    let records = connsync::records_from_events(&master.engine, &master.dp.drain_sync_events());
    assert_eq!(records.len(), 2);
    let messages = connsync::encode_batch(7, &records, connsync::DEFAULT_MAXLEN_V4);
    let received: Vec<ConnRecord> = messages
        .iter()
        .flat_map(|m| connsync::decode(m, 7).unwrap())
        .collect();
    assert_eq!(received, records);
    assert_eq!(install(&mut backup, &received).installed, 2);
    for (sport, server) in [(40000u16, "10.0.1.2"), (40001, "10.0.1.1")] {
        let ack = Frame::tcp("192.168.1.1", sport, "10.0.0.10", 80, ACK)
            .payload(b"after the failover")
            .build();
        assert_dr(&master, &ack, server);
        assert_dr(&backup, &ack, server);
    }
    for s in ["10.0.1.1", "10.0.1.2"] {
        assert_eq!(backup.conns(&web(), ip(s)), master.conns(&web(), ip(s)));
    }
}

/// The UDP transport over multicast (IPv4 and IPv6 groups), in a network namespace of its
/// own: the IPv4 group on the loopback, the IPv6 one (link-local scope) on a veth; the
/// sender's loop on, both ends being one host.
#[test]
fn multicast_transport_delivers_to_the_group() {
    xlb_tests::require_root();
    let records = vec![
        web_conn("192.168.1.1:40000", "10.0.1.1", ESTABLISHED),
        web_conn("192.168.1.2:40000", "10.0.1.2", FIN_WAIT),
    ];
    let want = records.clone();
    std::thread::spawn(move || {
        // This thread alone moves to the new namespace (so do the sockets it makes, and
        // the commands it runs).
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let run = |cmd: &str| {
            let args: Vec<&str> = cmd.split_whitespace().collect();
            let ok = std::process::Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap();
            assert!(ok.success(), "{cmd}");
        };
        run("ip link set lo up multicast on");
        // No duplicate address detection: the link-local address is usable at once.
        std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0").unwrap();
        run("ip link add xsync0 type veth peer name xsync1");
        run("ip link set xsync0 up");
        run("ip link set xsync1 up");
        // The link-local address the IPv6 group is sent from.
        for _ in 0..100 {
            let out = std::process::Command::new("ip")
                .args(["-6", "addr", "show", "dev", "xsync0", "scope", "link"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("inet6") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            for (group, dev) in [("224.0.0.81:8848", "lo"), ("[ff02::8848]:8848", "xsync0")] {
                let cfg = connsync::SyncConfig {
                    sync_id: 3,
                    addr: sa(group),
                    interface: Some(dev.into()),
                    multicast_loop: true,
                    maxlen: connsync::SyncConfig::default_maxlen(&sa(group)),
                    ..Default::default()
                };
                let mut rx = connsync::SyncReceiver::new(&cfg).unwrap();
                let tx = connsync::SyncSender::new(&cfg).unwrap();
                assert_eq!(tx.send(&records).await.unwrap(), 1);
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
                    .await
                    .unwrap_or_else(|_| panic!("nothing received on {group}"))
                    .unwrap();
                assert_eq!(got, want, "{group}");
                assert_eq!(rx.stats().records_received, 2);
            }
        });
    })
    .join()
    .unwrap();
}
