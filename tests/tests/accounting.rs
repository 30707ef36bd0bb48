//! Connection accounting: ActiveConn/InActConn per real server as IPVS counts them in
//! direct-routing mode, expiry of idle connections by the reaper, and admission into a
//! connection table that never evicts a live connection.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lb_common::{FlowKeyV4, conntable, reason, tcp::state};
use xlb::config::{Limits, Protocol, ServiceKey};
use xlb_tests::{frames::*, harness::*};

const ONE_TCP_ONE_UDP: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"

[[services]]
name = "dns"
address = "10.0.0.10:53"
protocol = "udp"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.3"
"#;

const TWO_RR: &str = r#"
[[services]]
name = "web"
address = "10.0.0.10:80"
scheduler = "rr"
[[services.backends]]
address = "10.0.1.1"
[[services.backends]]
address = "10.0.1.2"
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(s: &str) -> ServiceKey {
    let (protocol, addr) = match s.strip_prefix("udp:") {
        Some(a) => (Protocol::Udp, a),
        None => (Protocol::Tcp, s),
    };
    let sa: std::net::SocketAddr = addr.parse().unwrap();
    ServiceKey::new(sa.ip(), sa.port(), protocol)
}

fn tcp(client: &str, port: u16, flags: u8) -> Vec<u8> {
    Frame::tcp(client, port, "10.0.0.10", 80, flags).build()
}

/// Pins the calling thread to `cpu`: a CPU holds a batch of table entries in hand, so exact
/// capacity checks must run on one CPU.
/// A table of 64 connections (256 slots, 16 buckets): small enough to fill.
fn small_table() -> Limits {
    Limits {
        conn_table_size: 64,
        conn_table_size_v6: 64,
        max_services: 8,
        max_backends: 16,
        slot_table_size: 1024,
        ..Limits::default()
    }
}

/// The connection-table key of a TCP connection from `client`:`port` to 10.0.0.10:80.
fn web_key(client: [u8; 4], port: u16) -> FlowKeyV4 {
    FlowKeyV4::new(
        u32::from_ne_bytes(client),
        u32::from_ne_bytes([10, 0, 0, 10]),
        port.to_be(),
        80u16.to_be(),
        6,
    )
}

fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

/// Every state's timeout, in ticks.
fn all_timeouts(ticks: u32) -> [u32; state::COUNT] {
    [ticks; state::COUNT]
}

/// The client-side flags drive each connection through IPVS's states, and the counts move
/// with them: SYN_RECV and ESTABLISHED are active; FIN_WAIT, CLOSE and UDP inactive.
#[test]
fn counts_follow_the_ipvs_states() {
    let h = Harness::new(ONE_TCP_ONE_UDP);
    let web = key("10.0.0.10:80");
    let rs = ip("10.0.1.1");
    let step = |frame: Vec<u8>, want: (u64, u64)| {
        assert_eq!(h.run(&frame).action, XDP_TX);
        assert_eq!(h.conns(&web, rs), want);
        h.assert_counts_match_tables();
    };
    // Connection A: opened, established, closed by the client.
    step(tcp("192.168.1.1", 1000, SYN), (1, 0));
    step(tcp("192.168.1.1", 1000, ACK), (1, 0));
    step(tcp("192.168.1.1", 1000, ACK | PSH), (1, 0));
    step(tcp("192.168.1.1", 1000, FIN | ACK), (0, 1));
    step(tcp("192.168.1.1", 1000, ACK), (0, 1));
    // Connection B: opened, then reset.
    step(tcp("192.168.1.2", 1000, SYN), (1, 1));
    step(tcp("192.168.1.2", 1000, ACK), (1, 1));
    step(tcp("192.168.1.2", 1000, RST), (0, 2));
    // A SYN retransmission changes nothing.
    step(tcp("192.168.1.3", 1000, SYN), (1, 2));
    step(tcp("192.168.1.3", 1000, SYN), (1, 2));
    // A new connection on B's closed tuple replaces it: the closed one is no longer counted.
    step(tcp("192.168.1.2", 1000, SYN), (2, 1));
    // UDP connections are always inactive.
    let dns = key("udp:10.0.0.10:53");
    let q = Frame::udp("192.168.1.1", 5353, "10.0.0.10", 53).build();
    assert_eq!(h.run(&q).action, XDP_TX);
    assert_eq!(h.run(&q).action, XDP_TX);
    assert_eq!(h.conns(&dns, ip("10.0.1.3")), (0, 1));
    h.assert_counts_match_tables();
}

/// Idle connections expire per their state's timeout: the reaper retires them, their counts
/// go, and their table entries become available again. Connections still within their
/// timeout are left alone.
#[test]
fn the_reaper_expires_idle_connections() {
    let mut h = Harness::new(ONE_TCP_ONE_UDP);
    let web = key("10.0.0.10:80");
    let rs = ip("10.0.1.1");
    let capacity = h.dp.limits.conn_table_size as i64;
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], capacity);
    // Closed connections time out quickly here, open ones do not.
    let mut t = all_timeouts(1_000_000);
    t[state::FIN_WAIT as usize] = 3;
    t[state::CLOSE as usize] = 3;
    h.set_timeout_ticks(t);
    for port in 0..10 {
        h.run(&tcp("192.168.2.1", 2000 + port, SYN));
        h.run(&tcp("192.168.2.1", 2000 + port, ACK));
    }
    for port in 0..4 {
        h.run(&tcp("192.168.2.1", 2000 + port, FIN | ACK));
    }
    h.run(&tcp("192.168.2.1", 2004, RST));
    assert_eq!(h.conns(&web, rs), (5, 5));
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], capacity - 10);

    std::thread::sleep(Duration::from_millis(150));
    let before = h.counters();
    h.reap();
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("flow_expired", 5)],
        "only the closed connections expire"
    );
    assert_eq!(h.conns(&web, rs), (5, 0));
    assert_eq!(h.dp.flows_v4().len(), 5);
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], capacity - 5);
    h.assert_counts_match_tables();

    // Now every state times out: everything goes, all entries come back.
    h.set_timeout_ticks(all_timeouts(2));
    std::thread::sleep(Duration::from_millis(100));
    h.reap();
    assert_eq!(h.conns(&web, rs), (0, 0));
    assert!(h.dp.flows_v4().is_empty());
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], capacity);
    // A segment of an expired connection is not forwarded (IPVS: no connection, no SYN).
    let before = h.counters();
    assert_eq!(h.run(&tcp("192.168.2.1", 2005, ACK)).action, XDP_PASS);
    assert_eq!(delta(&before, &h.counters()), vec![("pass_tcp_no_flow", 1)]);
}

/// A full connection table never displaces an established connection: with nothing else to
/// take over it refuses new connections, so a flood of new tuples ten times its size leaves
/// every established connection on its server (and every count exact). Closed and embryonic
/// connections give their entries to new ones, oldest first (of the new connection's bucket,
/// else of the CPU's ring).
#[test]
fn a_full_table_keeps_established_connections() {
    pin_to_cpu(0);
    let limits = small_table();
    let h = Harness::with_limits(TWO_RR, limits);
    let servers = [ip("10.0.1.1"), ip("10.0.1.2")];
    let mut owner = Vec::new();
    for port in 0..64u16 {
        let r = h.run(&tcp("192.168.3.1", 3000 + port, SYN));
        assert_eq!(r.action, XDP_TX, "connection {port} admitted");
        owner.push(h.server_of(&r, &servers).unwrap());
        h.run(&tcp("192.168.3.1", 3000 + port, ACK));
    }
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], 0);

    // The flood: 640 new tuples, all refused (before scheduling: rr does not advance).
    let before = h.counters();
    for i in 0..640u32 {
        let client = format!("172.16.{}.{}", i / 250, i % 250 + 1);
        let r = h.run(&tcp(&client, 40000, SYN));
        assert_eq!(r.action, XDP_DROP);
    }
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("drop_flow_table_full", 640)]
    );
    // Every established connection is still there, on its server.
    for (port, server) in owner.iter().enumerate() {
        let r = h.run(&tcp("192.168.3.1", 3000 + port as u16, ACK | PSH));
        assert_eq!(
            h.server_of(&r, &servers),
            Some(*server),
            "connection {port}"
        );
    }
    assert_eq!(h.dp.flows_v4().len(), 64, "nothing was evicted");
    let web = key("10.0.0.10:80");
    assert_eq!(h.conns(&web, servers[0]), (32, 0));
    assert_eq!(h.conns(&web, servers[1]), (32, 0));
    h.assert_counts_match_tables();

    // Half the connections are reset: their entries may be taken over at once (no need to
    // wait for the reaper), and rr continues where it stopped.
    for port in 0..32u16 {
        h.run(&tcp("192.168.3.1", 3000 + port, RST));
    }
    let before = h.counters();
    for port in 0..32u16 {
        let r = h.run(&tcp("192.168.4.1", 4000 + port, SYN));
        assert_eq!(
            h.server_of(&r, &servers),
            Some(owner[port as usize % 2]),
            "new connection {port}"
        );
    }
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("tx", 32), ("flow_recycled", 32)]
    );
    h.assert_counts_match_tables();

    // The table is full again. A new connection takes over the oldest connection of its
    // own bucket that is not established (a closed one, or one of these 32 if its bucket
    // has none left): the earliest of the 32 still in the table is the oldest embryonic
    // connection of its bucket, and its retransmitted SYN follows it (it is not recycled to
    // make room for itself).
    let first = (0..32u16)
        .find(|p| h.dp.flow_v4(&web_key([192, 168, 4, 1], 4000 + p)).is_some())
        .expect("one of the 32 is in the table");
    let before = h.counters();
    let r = h.run(&tcp("192.168.4.1", 4000 + first, SYN));
    assert_eq!(
        h.server_of(&r, &servers),
        Some(owner[first as usize % 2]),
        "retransmitted SYN"
    );
    assert_eq!(delta(&before, &h.counters()), vec![("tx", 1)]);
    h.assert_counts_match_tables();

    // A SYN flood now: it cycles through the embryonic entries (the 32 new connections, then
    // its own), so new connections keep getting in - a client that completes its handshake
    // promptly is established and stays - while the 32 established connections are untouched.
    let before = h.counters();
    for i in 0..640u32 {
        let client = format!("172.17.{}.{}", i / 250, i % 250 + 1);
        assert_eq!(h.run(&tcp(&client, 40000, SYN)).action, XDP_TX);
        if i == 300 {
            h.run(&tcp("192.168.6.1", 6000, SYN));
            h.run(&tcp("192.168.6.1", 6000, ACK));
        }
    }
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("tx", 642), ("flow_recycled", 641)]
    );
    for port in 32..64u16 {
        let r = h.run(&tcp("192.168.3.1", 3000 + port, ACK | PSH));
        assert_eq!(
            h.server_of(&r, &servers),
            Some(owner[port as usize]),
            "established connection {port} after the flood"
        );
    }
    let late = h.run(&tcp("192.168.6.1", 6000, ACK | PSH));
    assert_eq!(late.action, XDP_TX, "the connection made during the flood");
    assert_eq!(h.dp.flows_v4().len(), 64);
    h.assert_counts_match_tables();
}

/// A bucket that is full sends further keys to its alternate bucket: twenty connections whose
/// keys share one bucket of 16 ways are all recorded, their later packets find them (on
/// their servers), and they are listed, counted and expired like any other.
#[test]
fn a_full_bucket_spills_to_its_alternate() {
    pin_to_cpu(0);
    let limits = small_table();
    let mut h = Harness::with_limits(TWO_RR, limits);
    let (seed, mask) = h.dp.flow_hashing(0).unwrap();
    let flow_key = |port: u16| web_key([192, 168, 7, 1], port);
    let bucket = |port: u16| conntable::bucket(conntable::key_hash(&flow_key(port), seed), mask);
    let ports: Vec<u16> = (5000..60000)
        .filter(|p| bucket(*p) == bucket(5000))
        .take(20)
        .collect();
    assert_eq!(ports.len(), 20);
    let servers = [ip("10.0.1.1"), ip("10.0.1.2")];
    let before = h.counters();
    let mut owner = Vec::new();
    for &port in &ports {
        let r = h.run(&tcp("192.168.7.1", port, SYN));
        owner.push(h.server_of(&r, &servers).expect("forwarded"));
        h.run(&tcp("192.168.7.1", port, ACK));
    }
    assert_eq!(delta(&before, &h.counters()), vec![("tx", 40)]);
    for (i, &port) in ports.iter().enumerate() {
        assert!(
            h.dp.flow_v4(&flow_key(port)).is_some(),
            "connection {i} recorded"
        );
        let r = h.run(&tcp("192.168.7.1", port, ACK | PSH));
        assert_eq!(h.server_of(&r, &servers), Some(owner[i]), "connection {i}");
    }
    assert_eq!(h.dp.flows_v4().len(), 20);
    let web = key("10.0.0.10:80");
    assert_eq!(
        h.conns(&web, servers[0]).0 + h.conns(&web, servers[1]).0,
        20
    );
    h.assert_counts_match_tables();
    h.set_timeout_ticks(all_timeouts(0));
    std::thread::sleep(Duration::from_millis(50));
    h.reap();
    assert!(h.dp.flows_v4().is_empty());
    assert_eq!(h.dp.flow_entries_free().unwrap()[0], 64);
    h.assert_counts_match_tables();
}

/// A key whose bucket and first alternate bucket are both full goes to its second
/// alternate, and is found there.
#[test]
fn a_key_goes_to_its_second_alternate_when_the_first_is_full_too() {
    pin_to_cpu(0);
    let limits = small_table();
    let h = Harness::with_limits(TWO_RR, limits);
    let (seed, mask) = h.dp.flow_hashing(0).unwrap();
    let flow_key = |port: u16| web_key([192, 168, 8, 1], port);
    let hash = |port: u16| conntable::key_hash(&flow_key(port), seed);
    let bucket = |port: u16| conntable::bucket(hash(port), mask);
    // The key, its bucket's 16 ways, then its first alternate's 16 (keys whose own bucket it
    // is), all established so that nothing is recycled to make room.
    let last = 5000u16;
    let [alt, _] = conntable::alternates(bucket(last), conntable::tag(hash(last)), mask);
    let mut ports: Vec<u16> = (5001..60000)
        .filter(|p| bucket(*p) == bucket(last))
        .take(16)
        .collect();
    ports.extend((5001..60000).filter(|p| bucket(*p) == alt).take(16));
    ports.push(last);
    assert_eq!(ports.len(), 33);
    let servers = [ip("10.0.1.1"), ip("10.0.1.2")];
    let before = h.counters();
    let mut owner = Vec::new();
    for &port in &ports {
        let r = h.run(&tcp("192.168.8.1", port, SYN));
        owner.push(h.server_of(&r, &servers).expect("forwarded"));
        h.run(&tcp("192.168.8.1", port, ACK));
    }
    assert_eq!(delta(&before, &h.counters()), vec![("tx", 66)]);
    for (i, &port) in ports.iter().enumerate() {
        assert!(h.dp.flow_v4(&flow_key(port)).is_some(), "connection {i}");
        let r = h.run(&tcp("192.168.8.1", port, ACK | PSH));
        assert_eq!(h.server_of(&r, &servers), Some(owner[i]), "connection {i}");
    }
    assert_eq!(h.dp.flows_v4().len(), 33);
    h.assert_counts_match_tables();
}

/// Counts never drift: two CPUs drive random flag sequences over the same tuples while the
/// reaper retires entries concurrently; afterwards the counts equal the tables, and once
/// everything expires they are all zero and every entry is back in the pool.
#[test]
fn counts_never_drift_under_concurrency() {
    let mut h = Harness::new(TWO_RR);
    // Closed connections expire almost at once, so the reaper races with the packets.
    let mut t = all_timeouts(1_000_000);
    t[state::CLOSE as usize] = 0;
    t[state::FIN_WAIT as usize] = 1;
    h.set_timeout_ticks(t);
    let flags = [SYN, SYN, ACK, ACK | PSH, FIN | ACK, RST, ACK];
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (h, done) = (&h, &done);
        let reaper = s.spawn(move || {
            let mut runs = 0;
            while !done.load(Ordering::Relaxed) && runs < 100_000 {
                h.reap();
                runs += 1;
            }
            runs
        });
        let mut packets = Vec::new();
        for cpu in 0..2usize {
            packets.push(s.spawn(move || {
                pin_to_cpu(cpu % std::thread::available_parallelism().unwrap().get());
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ cpu as u64;
                for _ in 0..20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let port = 6000 + (x % 64) as u16;
                    let f = flags[((x >> 32) % flags.len() as u64) as usize];
                    h.run(&tcp("192.168.5.1", port, f));
                }
            }));
        }
        for p in packets {
            p.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        assert!(reaper.join().unwrap() > 0, "the reaper ran alongside");
    });
    h.assert_counts_match_tables();
    h.set_timeout_ticks(all_timeouts(0));
    std::thread::sleep(Duration::from_millis(50));
    h.reap();
    h.assert_counts_match_tables();
    assert!(h.dp.flows_v4().is_empty());
    for i in 0..h.dp.limits.max_backends {
        let c = h.dp.conn_counts(i).unwrap();
        assert_eq!((c.active, c.inactive), (0, 0), "backend index {i}");
    }
    assert_eq!(
        h.dp.flow_entries_free().unwrap()[0],
        h.dp.limits.conn_table_size as i64
    );
    let c = h.counters();
    assert_eq!(c[reason::DROP_INTERNAL as usize], 0);
}

/// With mh (likewise sh, dh) a full table does not refuse anyone: connections it cannot
/// record are forwarded by hash, and so are their later packets, which find no entry - the
/// hash names the same server. A flood ten times the table's size moves no established
/// connection.
#[test]
fn a_full_table_forwards_hashed_services_untracked() {
    pin_to_cpu(0);
    let limits = Limits {
        conn_table_size: 64,
        conn_table_size_v6: 64,
        max_services: 8,
        max_backends: 16,
        slot_table_size: 8192,
        ..Limits::default()
    };
    let mh = TWO_RR.replace("scheduler = \"rr\"", "scheduler = \"mh\"");
    let h = Harness::with_limits(&mh, limits);
    let servers = [ip("10.0.1.1"), ip("10.0.1.2")];
    let mut owner = Vec::new();
    for port in 0..64u16 {
        let r = h.run(&tcp("192.168.3.1", 3000 + port, SYN));
        owner.push(h.server_of(&r, &servers).unwrap());
        h.run(&tcp("192.168.3.1", 3000 + port, ACK));
    }
    let before = h.counters();
    for i in 0..640u32 {
        let client = format!("172.16.{}.{}", i / 250, i % 250 + 1);
        let syn = h.run(&tcp(&client, 40000, SYN));
        assert_eq!(syn.action, XDP_TX);
        // The handshake's ACK, without an entry, follows the SYN.
        let ack = h.run(&tcp(&client, 40000, ACK));
        assert_eq!(h.server_of(&ack, &servers), h.server_of(&syn, &servers));
    }
    assert_eq!(
        delta(&before, &h.counters()),
        vec![("tx", 1280), ("flow_untracked", 1280)]
    );
    for (port, server) in owner.iter().enumerate() {
        let r = h.run(&tcp("192.168.3.1", 3000 + port as u16, ACK | PSH));
        assert_eq!(
            h.server_of(&r, &servers),
            Some(*server),
            "connection {port}"
        );
    }
    h.assert_counts_match_tables();
}
