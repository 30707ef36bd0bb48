//! End to end: a client, the balancer running `xlb run`, and real servers running nginx, in
//! network namespaces joined by a bridge; real kernels' TCP stacks on both ends.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use xlb_tests::{
    counts, require_root,
    testbed::{DrBench, KeepAlive, http_get, http_get_from, in_netns, run},
    xlb_bin,
};

/// The benches share two CPUs; one at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

fn service(name: &str, addr: &str, sched: &str, backends: &[(String, u32)]) -> String {
    let mut s =
        format!("[[services]]\nname = \"{name}\"\naddress = \"{addr}\"\nscheduler = \"{sched}\"\n");
    for (b, w) in backends {
        s += &format!("[[services.backends]]\naddress = \"{b}\"\nweight = {w}\n");
    }
    s
}

/// A bench with `n` real servers running nginx and xlb serving one IPv4 service on the VIP
/// with `sched` and the given weights (one per server).
fn start_v4(prefix: &str, sched: &str, weights: &[u32]) -> (DrBench, PathBuf) {
    start_v4_with(prefix, sched, weights, "")
}

/// As [`start_v4`], with `extra` service settings (TOML lines).
fn start_v4_with(prefix: &str, sched: &str, weights: &[u32], extra: &str) -> (DrBench, PathBuf) {
    let xlb = xlb_bin();
    let mut b = DrBench::new(prefix, weights.len(), &xlb).unwrap();
    b.start_http().unwrap();
    let backends: Vec<(String, u32)> = b
        .servers
        .iter()
        .zip(weights)
        .map(|(s, w)| (s.v4.to_string(), *w))
        .collect();
    let svc = service("web", &format!("{}:80", b.vip4), sched, &backends);
    // The extra settings belong to the service, before its first backend.
    let svc = svc.replacen(
        "[[services.backends]]",
        &format!("{extra}[[services.backends]]"),
        1,
    );
    b.start_xlb(&xlb, &b.config(&svc)).unwrap();
    (b, xlb)
}

/// `n` sequential HTTP requests, one new TCP connection each; who answered each.
fn requests(bench: &DrBench, vip: SocketAddr, n: usize) -> Vec<String> {
    in_netns(&bench.cli, move || {
        (0..n)
            .map(|i| http_get(vip).unwrap_or_else(|e| panic!("request {i} to {vip}: {e:#}")))
            .collect::<Vec<_>>()
    })
    .unwrap()
}

fn xlb_list(bench: &DrBench) -> String {
    run(&[
        &xlb_bin().to_string_lossy(),
        "list",
        "-n",
        "--socket",
        &bench.socket().to_string_lossy(),
    ])
    .unwrap()
}

/// Gives the client namespace one more address (`addr/len`), to connect from.
fn add_client_address(b: &DrBench, addr: impl AsRef<str>) {
    run(&[
        "ip",
        "-n",
        &b.cli,
        "addr",
        "add",
        addr.as_ref(),
        "dev",
        "eth0",
    ])
    .unwrap();
}

#[test]
fn rr_spreads_new_connections_in_ipvs_order() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, _) = start_v4("xte2e-rr", "rr", &[1, 1, 1]);
    let got = requests(&b, SocketAddr::new(IpAddr::V4(b.vip4), 80), 30);
    // IPVS list order is the reverse of the order servers were added.
    let want: Vec<String> = ["be3", "be2", "be1"]
        .repeat(10)
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
    let list = xlb_list(&b);
    assert!(
        list.starts_with("IP Virtual Server version 1.2.1 (size=65536)\n"),
        "{list}"
    );
    assert!(list.contains("TCP  10.100.0.100:80 rr\n"), "{list}");
    for s in &b.servers {
        let line = list
            .lines()
            .find(|l| l.starts_with(&format!("  -> {}:80 ", s.v4)))
            .unwrap_or_else(|| panic!("no line for {} in\n{list}", s.v4));
        let cols: Vec<&str> = line.split_whitespace().collect();
        // -> addr Route weight active inactive: the 10 closed connections are inactive
        assert_eq!(cols[2..], ["Route", "1", "0", "10"], "{line}");
    }
}

#[test]
fn wrr_follows_the_weights() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, _) = start_v4("xte2e-wrr", "wrr", &[3, 1, 0]);
    let got = requests(&b, SocketAddr::new(IpAddr::V4(b.vip4), 80), 40);
    for w in got.chunks(4) {
        let c = counts(w);
        assert_eq!(
            (c.get("be1"), c.get("be2")),
            (Some(&3), Some(&1)),
            "{got:?}"
        );
    }
    assert!(
        !got.iter().any(|s| s == "be3"),
        "weight 0 got a connection: {got:?}"
    );
}

#[test]
fn long_lived_connection_keeps_its_real_server() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, xlb) = start_v4("xte2e-ll", "rr", &[1, 1, 1]);
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    let (bin, socket) = (xlb.clone(), b.socket());
    let (long, others, list) = in_netns(&b.cli, move || {
        let mut conn = KeepAlive::connect(vip).unwrap();
        let mut long = Vec::new();
        let mut others = Vec::new();
        for _ in 0..20 {
            long.push(conn.get().unwrap());
            others.push(http_get(vip).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        // while the long connection is still open
        let list = run(&[
            &bin.to_string_lossy(),
            "list",
            "-n",
            "--socket",
            &socket.to_string_lossy(),
        ])
        .unwrap();
        (long, others, list)
    })
    .unwrap();
    assert!(long.iter().all(|s| *s == long[0]), "{long:?}");
    assert_eq!(
        counts(&others).len(),
        3,
        "new connections kept rotating: {others:?}"
    );
    let active: u32 = list
        .lines()
        .filter(|l| l.starts_with("  -> ") && !l.contains("RemoteAddress"))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u32>().unwrap())
        .sum();
    assert_eq!(
        active, 1,
        "the open connection is the one active connection:\n{list}"
    );
}

/// (ActiveConn, InActConn) summed over the real servers of an `xlb list -n` output.
fn conn_totals(list: &str) -> (u64, u64) {
    list.lines()
        .filter(|l| l.starts_with("  -> ") && !l.contains("RemoteAddress"))
        .map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c[4].parse::<u64>().unwrap(), c[5].parse::<u64>().unwrap())
        })
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Connection accounting with real TCP stacks: N open connections are N ActiveConn; once the
/// clients close them they are InActConn (FIN_WAIT), and after the FIN timeout they are gone.
#[test]
fn connection_counts_follow_real_connections() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb = xlb_bin();
    let mut b = DrBench::new("xte2e-acct", 3, &xlb).unwrap();
    b.start_http().unwrap();
    let backends: Vec<(String, u32)> = b.servers.iter().map(|s| (s.v4.to_string(), 1)).collect();
    let cfg = b.config(&format!(
        "{}\n[timeouts]\ntcp_fin = 1\n",
        service("web", &format!("{}:80", b.vip4), "rr", &backends)
    ));
    b.start_xlb(&xlb, &cfg).unwrap();
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    const N: usize = 7;
    let (bin, socket) = (xlb.clone(), b.socket());
    let list = move || {
        run(&[
            &bin.to_string_lossy(),
            "list",
            "-n",
            "--socket",
            &socket.to_string_lossy(),
        ])
        .unwrap()
    };
    let (open, closed) = in_netns(&b.cli, move || {
        let mut conns: Vec<KeepAlive> = (0..N).map(|_| KeepAlive::connect(vip).unwrap()).collect();
        for c in &mut conns {
            c.get().unwrap();
        }
        let open = list();
        drop(conns);
        // The FINs reach the balancer within a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut closed = list();
        while conn_totals(&closed) != (0, N as u64) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            closed = list();
        }
        (open, closed)
    })
    .unwrap();
    assert_eq!(conn_totals(&open), (N as u64, 0), "{open}");
    assert_eq!(conn_totals(&closed), (0, N as u64), "{closed}");
    // tcp_fin = 1 s, the reaper runs every second: gone within a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = xlb_list(&b);
    while conn_totals(&last) != (0, 0) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        last = xlb_list(&b);
    }
    assert_eq!(conn_totals(&last), (0, 0), "{last}");
}

/// (ActiveConn, InActConn) of one real server in an `xlb list -n` output.
fn conns_of(list: &str, addr: std::net::Ipv4Addr) -> (u64, u64) {
    let line = list
        .lines()
        .find(|l| l.starts_with(&format!("  -> {addr}:80 ")))
        .unwrap_or_else(|| panic!("no line for {addr} in\n{list}"));
    let c: Vec<&str> = line.split_whitespace().collect();
    (c[4].parse().unwrap(), c[5].parse().unwrap())
}

/// lc and wlc with real connections: long-lived connections keep their servers busy, so once
/// the connections on one server end, new connections go there until the load evens out.
#[test]
fn least_connection_follows_long_lived_connections() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for sched in ["lc", "wlc"] {
        let (b, xlb) = start_v4(&format!("xte2e-{sched}"), sched, &[1, 1, 1]);
        let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
        let be1 = b.servers[0].v4;
        let (bin, socket) = (xlb.clone(), b.socket());
        let list = move || {
            run(&[
                &bin.to_string_lossy(),
                "list",
                "-n",
                "--socket",
                &socket.to_string_lossy(),
            ])
            .unwrap()
        };
        let (first, next, during) = in_netns(&b.cli, move || {
            // Six long-lived connections: two per server, in IPVS list order (be3 first).
            let mut conns: Vec<(String, KeepAlive)> = (0..6)
                .map(|_| {
                    let mut c = KeepAlive::connect(vip).unwrap();
                    (c.get().unwrap(), c)
                })
                .collect();
            let first: Vec<String> = conns.iter().map(|c| c.0.clone()).collect();
            // The two on be1 end.
            conns.retain(|c| c.0 != "be1");
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while conns_of(&list(), be1) != (0, 2) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            // be1: 2 inactive (overhead 2); be2, be3: 2 active each (overhead 514).
            let next: Vec<String> = (0..10).map(|_| http_get(vip).unwrap()).collect();
            let during = list();
            drop(conns);
            (first, next, during)
        })
        .unwrap();
        assert_eq!(
            first,
            ["be3", "be2", "be1", "be3", "be2", "be1"],
            "{sched}: equal load, list order"
        );
        assert!(
            next.iter().all(|s| s == "be1"),
            "{sched}: new connections avoid the busy servers: {next:?}\n{during}"
        );
        assert_eq!(conns_of(&during, be1), (0, 12), "{sched}:\n{during}");
        for s in &b.servers[1..] {
            assert_eq!(conns_of(&during, s.v4), (2, 0), "{sched}:\n{during}");
        }
    }
}

/// sh: every connection of a client address goes to the same real server; different
/// addresses spread over the servers.
#[test]
fn source_hashing_keeps_each_client_on_one_server() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, _) = start_v4("xte2e-sh", "sh", &[1, 1, 1]);
    let clients: Vec<IpAddr> = (31..39)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(10, 100, 0, i)))
        .collect();
    for c in &clients {
        add_client_address(&b, format!("{c}/24"));
    }
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    let cs = clients.clone();
    let answers: Vec<Vec<String>> = in_netns(&b.cli, move || {
        cs.iter()
            .map(|c| {
                (0..5)
                    .map(|_| http_get_from(*c, vip).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    })
    .unwrap();
    for (c, a) in clients.iter().zip(&answers) {
        assert!(a.iter().all(|s| *s == a[0]), "client {c}: {a:?}");
    }
    let distinct: std::collections::HashSet<&String> = answers.iter().map(|a| &a[0]).collect();
    assert!(distinct.len() >= 2, "8 clients on one server: {answers:?}");
}

/// Persistence (netmask /29): every connection from one client network lands on one real
/// server, though rr alone would spread them; another network gets rr's next server.
#[test]
fn persistence_keeps_a_client_network_on_one_server() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, _) = start_v4_with(
        "xte2e-pers",
        "rr",
        &[1, 1, 1],
        "persistence = { timeout = 300, netmask = \"255.255.255.248\" }\n",
    );
    // Two client networks: 10.100.0.32/29 and 10.100.0.40/29.
    let nets: [&[u8]; 2] = [&[33, 34, 35], &[41, 42]];
    for a in nets.iter().flat_map(|n| n.iter()) {
        add_client_address(&b, format!("10.100.0.{a}/24"));
    }
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    let answers: Vec<Vec<String>> = in_netns(&b.cli, move || {
        nets.iter()
            .map(|net| {
                let mut got = Vec::new();
                for _ in 0..3 {
                    for a in net.iter() {
                        let src = IpAddr::V4(std::net::Ipv4Addr::new(10, 100, 0, *a));
                        got.push(http_get_from(src, vip).unwrap());
                    }
                }
                got
            })
            .collect()
    })
    .unwrap();
    for (net, a) in nets.iter().zip(&answers) {
        assert!(a.iter().all(|s| *s == a[0]), "network of {net:?}: {a:?}");
    }
    assert_ne!(
        answers[0][0], answers[1][0],
        "rr gives the second network another server"
    );
}

/// One service over ports 80 and 8080 with persistence: a client's connections to either
/// port go to the same real server; a port outside the set is not balanced.
#[test]
fn a_multi_port_service_keeps_a_client_on_one_server_across_ports() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb = xlb_bin();
    let mut b = DrBench::new("xte2e-mport", 3, &xlb).unwrap();
    b.start_http().unwrap();
    let mut svc = format!(
        "[[services]]\nname = \"shop\"\naddress = \"{}\"\nports = [80, 8080]\nscheduler = \"rr\"\npersistence = {{ timeout = 300 }}\n",
        b.vip4
    );
    for s in &b.servers {
        svc += &format!("[[services.backends]]\naddress = \"{}\"\n", s.v4);
    }
    b.start_xlb(&xlb, &b.config(&svc)).unwrap();
    add_client_address(&b, "10.100.0.51/24");
    let vip = b.vip4;
    let (first, second, other_port) = in_netns(&b.cli, move || {
        let get = |src: u8, port: u16| {
            http_get_from(
                IpAddr::V4(std::net::Ipv4Addr::new(10, 100, 0, src)),
                SocketAddr::new(IpAddr::V4(vip), port),
            )
        };
        let first: Vec<String> = [80, 8080, 80, 8080, 8080]
            .iter()
            .map(|p| get(1, *p).unwrap())
            .collect();
        let second: Vec<String> = [8080, 80, 8080]
            .iter()
            .map(|p| get(51, *p).unwrap())
            .collect();
        (first, second, get(1, 8443))
    })
    .unwrap();
    assert!(first.iter().all(|s| *s == first[0]), "{first:?}");
    assert!(second.iter().all(|s| *s == second[0]), "{second:?}");
    assert_ne!(
        first[0], second[0],
        "rr: the second client gets another server"
    );
    assert!(
        other_port.is_err(),
        "port 8443 is not the service's: the balancer's own stack refuses it, got {other_port:?}"
    );
    let list = xlb_list(&b);
    assert!(
        list.contains("shop") || list.contains(&b.vip4.to_string()),
        "{list}"
    );
}

/// The balancer's neighbour entries vanish (flushed, as after a link flap or garbage
/// collection): forwarding goes on with the known MACs while the kernel re-resolves them.
#[test]
fn neighbour_flush_does_not_interrupt_forwarding() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (b, xlb) = start_v4("xte2e-neigh", "rr", &[1, 1]);
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    assert_eq!(requests(&b, vip, 4).len(), 4);
    b.bench
        .exec(&b.lb, &["ip", "neigh", "flush", "dev", "eth0"])
        .unwrap();
    let got = requests(&b, vip, 6);
    assert_eq!(counts(&got).len(), 2, "{got:?}");
    let counters = run(&[
        &xlb.to_string_lossy(),
        "counters",
        "--socket",
        &b.socket().to_string_lossy(),
    ])
    .unwrap();
    let missing = counters
        .lines()
        .find(|l| l.starts_with("drop_neigh_missing"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(missing, "0", "{counters}");
    // ... and the kernel has them again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = b
            .bench
            .exec(&b.lb, &["ip", "neigh", "show", "dev", "eth0"])
            .unwrap();
        if b.servers.iter().all(|s| n.contains(&format!("{} ", s.v4))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not re-resolved: {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ipv6_end_to_end() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb = xlb_bin();
    let mut b = DrBench::new("xte2e-v6", 3, &xlb).unwrap();
    b.start_http().unwrap();
    let backends: Vec<(String, u32)> = b
        .servers
        .iter()
        .map(|s| (format!("[{}]:80", s.v6), 1))
        .collect();
    let mut services = service("web6", &format!("[{}]:80", b.vip6), "rr", &backends);
    let v4: Vec<(String, u32)> = b.servers.iter().map(|s| (s.v4.to_string(), 1)).collect();
    services += &service("web4", &format!("{}:80", b.vip4), "rr", &v4);
    let cfg = b.config(&services);
    b.start_xlb(&xlb, &cfg).unwrap();
    let got = requests(&b, SocketAddr::new(IpAddr::V6(b.vip6), 80), 12);
    let c = counts(&got);
    assert_eq!(c.len(), 3, "{got:?}");
    assert!(c.values().all(|&n| n == 4), "{got:?}");
    let list = xlb_list(&b);
    assert!(list.contains("TCP  [fd00:100::100]:80 rr\n"), "{list}");
    // IPv4 services are listed before IPv6 ones.
    assert!(
        list.find("TCP  10.100.0.100:80").unwrap() < list.find("TCP  [fd00:100::100]:80").unwrap()
    );
}

#[test]
fn daemon_detaches_on_sigterm_and_rejects_bad_config_without_attaching() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb = xlb_bin();
    let mut b = DrBench::new("xte2e-life", 1, &xlb).unwrap();
    let lb = b.lb.clone();
    let xdp_on_lb = |b: &DrBench| {
        b.bench
            .exec(&lb, &["ip", "link", "show", "eth0"])
            .unwrap()
            .contains("xdp")
    };

    // A configuration error: named file, line and problem; exit status 1; nothing attached.
    let bad = b.bench.dir.join("bad.toml");
    let text = b.config(
        "[[services]]\nname = \"x\"\naddress = \"10.100.0.100:80\"\nscheduler = \"fastest\"\n",
    );
    let line = text.lines().position(|l| l.contains("fastest")).unwrap() + 1;
    std::fs::write(&bad, &text).unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lb,
            &xlb.to_string_lossy(),
            "run",
            "--config",
            &bad.to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:{line}:", bad.display()))
            && err.contains("unknown scheduler \"fastest\""),
        "{err}"
    );
    assert!(!xdp_on_lb(&b));
    // A missing interface is a located configuration error too.
    std::fs::write(
        &bad,
        b.config("").replace("[\"eth0\"]", "[\"eth0\", \"nope0\"]"),
    )
    .unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lb,
            &xlb.to_string_lossy(),
            "run",
            "--config",
            &bad.to_string_lossy(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(":2:") && err.contains("no interface named nope0"),
        "{err}"
    );
    assert!(!xdp_on_lb(&b));

    let cfg = b.config(&service(
        "web",
        "10.100.0.100:80",
        "rr",
        &[(b.servers[0].v4.to_string(), 1)],
    ));
    let pid = b.start_xlb(&xlb, &cfg).unwrap();
    assert!(xdp_on_lb(&b));
    let status = b
        .bench
        .stop(pid, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(status.success(), "{status}: {}", b.bench.log("xlb.log"));
    assert!(!xdp_on_lb(&b), "still attached after SIGTERM");
    assert!(!b.socket().exists(), "socket left behind");
}
