//! End to end, NAT and tunnelling: real kernels' TCP stacks, nginx on the real servers, the
//! balancer running `xlb run`, in network namespaces.
//!
//! NAT runs in the seeds' topology: the client on the public side, the real servers on a
//! private segment whose gateway is the balancer. Tunnels run on one segment with the real
//! servers running `xlb decap`; their replies go straight to the client. Captured tunnel
//! packets are decoded by tshark.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::{
    counts, require_root,
    testbed::{
        DrBench, NAT_PUBLIC_IF, NatBench, files_dir, http_get, http_request, in_netns, pattern, run,
    },
    xlb_bin,
};

/// The benches share two CPUs; one at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

/// `n` sequential HTTP requests from namespace `ns`, one connection each; who answered.
fn requests(ns: &str, vip: SocketAddr, n: usize) -> Vec<String> {
    in_netns(ns, move || {
        (0..n)
            .map(|i| http_get(vip).unwrap_or_else(|e| panic!("request {i} to {vip}: {e:#}")))
            .collect::<Vec<_>>()
    })
    .unwrap()
}

fn xlb(args: &[&str], socket: &std::path::Path) -> String {
    let bin = xlb_bin();
    let mut v = vec![bin.to_str().unwrap()];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--socket", socket.to_str().unwrap()]);
    run(&v).unwrap()
}

fn counter(counters: &str, name: &str) -> u64 {
    counters
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(name)).then(|| w.next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no counter {name} in {counters}"))
}

/// A UDP server in namespace `ns` answering each datagram on `port` with `name:` and the
/// datagram, until `stop` (at most 60 s).
fn udp_echo(ns: String, port: u16, name: String, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let s = UdpSocket::bind(("::", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut buf = vec![0u8; 16384];
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let mut answer = format!("{name}:").into_bytes();
                    answer.extend_from_slice(&buf[..n]);
                    let _ = s.send_to(&answer, from);
                }
            }
        });
    });
}

/// NAT (IPVS -m) end to end, VIP:80 → real servers' port 8080: HTTP requests spread by rr,
/// a 50 MB download compared byte for byte, UDP request/response (the answers come from the
/// VIP and service port), IPv6; `ipvsadm -L -n` shows Masq and traffic both ways.
#[test]
fn nat_end_to_end() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb_path = xlb_bin();
    let mut b = NatBench::new("xte2e-nat", 2, &xlb_path).unwrap();
    let big = pattern(50 << 20, 0x5eed);
    std::fs::create_dir_all(files_dir(&b.bench)).unwrap();
    std::fs::write(files_dir(&b.bench).join("big.bin"), &big).unwrap();
    b.start_http().unwrap();
    let mut services = String::new();
    for (name, vip, proto, port, servers) in [
        (
            "web",
            format!("{}:80", b.vip4),
            "tcp",
            8080,
            b.servers
                .iter()
                .map(|s| s.v4.to_string())
                .collect::<Vec<_>>(),
        ),
        (
            "dns",
            format!("{}:53", b.vip4),
            "udp",
            5353,
            b.servers.iter().map(|s| s.v4.to_string()).collect(),
        ),
        (
            "web6",
            format!("[{}]:80", b.vip6),
            "tcp",
            8080,
            b.servers.iter().map(|s| format!("[{}]", s.v6)).collect(),
        ),
    ] {
        services += &format!(
            "[[services]]\nname = \"{name}\"\naddress = \"{vip}\"\nprotocol = \"{proto}\"\nscheduler = \"rr\"\nforwarding = \"nat\"\n"
        );
        for s in servers {
            services += &format!("[[services.backends]]\naddress = \"{s}:{port}\"\n");
        }
    }
    let config = b.config(&services);
    b.start_xlb(&xlb_path, &config).unwrap();

    // HTTP, IPv4: rr over both servers.
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    let got = counts(&requests(&b.cli, vip, 20));
    assert_eq!(got.get("be1"), Some(&10), "{got:?}");
    assert_eq!(got.get("be2"), Some(&10), "{got:?}");

    // 50 MB, byte for byte.
    let want = big.clone();
    let (status, body) = in_netns(&b.cli, move || {
        http_request(vip, "GET", "/files/big.bin", b"", Duration::from_secs(60))
    })
    .unwrap()
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len(), want.len());
    assert!(body == want, "the 50 MB download differs from the file");

    // UDP: each answer comes from the VIP and the service port.
    let stop = Arc::new(AtomicBool::new(false));
    for s in &b.servers {
        udp_echo(s.ns.clone(), 5353, s.name.clone(), stop.clone());
    }
    std::thread::sleep(Duration::from_millis(300));
    let dns = SocketAddr::new(IpAddr::V4(b.vip4), 53);
    let answers = in_netns(&b.cli, move || {
        (0..10)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s.send_to(format!("q{i}").as_bytes(), dns).unwrap();
                let mut buf = [0u8; 256];
                let (n, from) = s.recv_from(&mut buf).unwrap();
                (from, String::from_utf8_lossy(&buf[..n]).to_string())
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    // Datagrams larger than the MTU: fragmented by the client's kernel on the way in and
    // by the server's on the way back; every fragment follows its first one both ways.
    let big_answers = in_netns(&b.cli, move || {
        (0..4)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let q = pattern(4000, i);
                s.send_to(&q, dns).unwrap();
                let mut buf = vec![0u8; 8192];
                let (n, from) = s.recv_from(&mut buf).unwrap();
                (from, buf[..n].to_vec(), q)
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for (from, answer, q) in &big_answers {
        assert_eq!(*from, dns);
        assert!(
            answer.len() == q.len() + 4 && answer[4..] == q[..],
            "a fragmented answer, reassembled: {} bytes for a {}-byte query",
            answer.len(),
            q.len()
        );
    }
    let counters = xlb(&["counters"], &b.socket());
    assert!(counter(&counters, "fragment_later") >= 16, "{counters}");
    assert!(answers.iter().all(|(from, _)| *from == dns), "{answers:?}");
    for (i, (_, a)) in answers.iter().enumerate() {
        assert!(a.ends_with(&format!(":q{i}")), "{a}");
    }
    let servers: BTreeSet<&str> = answers
        .iter()
        .map(|(_, a)| a.split(':').next().unwrap())
        .collect();
    assert_eq!(servers, BTreeSet::from(["be1", "be2"]));

    // IPv6.
    let vip6 = SocketAddr::new(IpAddr::V6(b.vip6), 80);
    let got = counts(&requests(&b.cli, vip6, 10));
    assert_eq!(
        (got.get("be1"), got.get("be2")),
        (Some(&5), Some(&5)),
        "{got:?}"
    );

    // The balancer forgets the client's MAC (its kernel never sends to the client itself, so
    // it would not learn it again): the first replies find no neighbour, the data plane asks
    // the controller, the controller has the kernel resolve it, the server's retransmission
    // gets through.
    b.bench
        .exec(&b.lb, &["ip", "neigh", "flush", "dev", NAT_PUBLIC_IF])
        .unwrap();
    let got = requests(&b.cli, vip, 4);
    assert_eq!(got.len(), 4);
    let counters = xlb(&["counters"], &b.socket());
    assert!(counter(&counters, "drop_nat_no_route") >= 1, "{counters}");

    let list = xlb(&["list", "-n", "--stats"], &b.socket());
    assert!(list.contains("192.168.56.11:8080"), "{list}");
    let plain = xlb(&["list", "-n"], &b.socket());
    assert_eq!(plain.matches("Masq").count(), 6, "{plain}");
    let counters = xlb(&["counters"], &b.socket());
    assert_eq!(counter(&counters, "drop_internal"), 0, "{counters}");
}

/// Tunnelling end to end with `xlb decap` on the real servers: IPIP, GUE with checksums,
/// GRE with checksums to IPv6 real servers (IPv4 in IPv6), IPv6 in IPv6, IPv6 in GUE over
/// IPv4; replies go straight to the client. Uploads larger than the tunnel's MTU get ICMP
/// "too big" from the balancer and complete after the client lowers its path MTU. tshark
/// decodes the captured tunnel packets with every checksum good.
#[test]
fn tunnels_end_to_end_with_decap() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb_path = xlb_bin();
    let mut b = DrBench::new("xte2e-tun", 2, &xlb_path).unwrap();
    b.start_http().unwrap();
    let (v4, v6): (Vec<String>, Vec<String>) = (
        b.servers.iter().map(|s| s.v4.to_string()).collect(),
        b.servers.iter().map(|s| format!("[{}]", s.v6)).collect(),
    );
    let plans: [(&str, String, &str, &Vec<String>); 5] = [
        ("ipip", format!("{}:80", b.vip4), "{ type = \"ipip\" }", &v4),
        (
            "gue",
            format!("{}:8080", b.vip4),
            "{ type = \"gue\", port = 6080, checksum = \"csum\" }",
            &v4,
        ),
        (
            "gre6",
            format!("{}:8443", b.vip4),
            "{ type = \"gre\", checksum = \"csum\" }",
            &v6,
        ),
        (
            "ip6ip6",
            format!("[{}]:80", b.vip6),
            "{ type = \"ipip\" }",
            &v6,
        ),
        (
            "gue4",
            format!("[{}]:8080", b.vip6),
            "{ type = \"gue\", port = 6080 }",
            &v4,
        ),
    ];
    let mut services = String::new();
    for (name, vip, tunnel, servers) in &plans {
        services += &format!(
            "[[services]]\nname = \"{name}\"\naddress = \"{vip}\"\nscheduler = \"rr\"\nforwarding = \"tunnel\"\ntunnel = {tunnel}\n"
        );
        for s in servers.iter() {
            let port = vip.rsplit(':').next().unwrap();
            services += &format!("[[services.backends]]\naddress = \"{s}:{port}\"\n");
        }
    }
    for s in b.servers.clone() {
        b.bench
            .spawn(
                &s.ns,
                &[
                    xlb_path.to_str().unwrap(),
                    "decap",
                    "-i",
                    "eth0",
                    "--vip",
                    &b.vip4.to_string(),
                    "--vip",
                    &b.vip6.to_string(),
                    "--gue-port",
                    "6080",
                ],
                &format!("decap-{}.log", s.name),
            )
            .unwrap();
    }
    for s in &b.servers {
        wait_for(|| {
            b.bench
                .log(&format!("decap-{}.log", s.name))
                .contains("decapsulating IPIP")
        });
    }
    let config = b.config(&services);
    b.start_xlb(&xlb_path, &config).unwrap();

    // Capture what reaches be1 while every service is used.
    let pcap = b.bench.dir.join("tunnels.pcap");
    let capture = b
        .bench
        .spawn(
            &b.sw.clone(),
            &[
                "dumpcap",
                "-i",
                "p-be1",
                "-w",
                pcap.to_str().unwrap(),
                "-f",
                "not arp and not icmp6",
            ],
            "dumpcap.log",
        )
        .unwrap();
    wait_for(|| b.bench.log("dumpcap.log").contains("Capturing on"));

    for (name, vip, _, _) in &plans {
        let addr: SocketAddr = vip.parse().unwrap();
        let got = counts(&requests(&b.cli, addr, 6));
        assert_eq!(
            (got.get("be1"), got.get("be2")),
            (Some(&3), Some(&3)),
            "{name}: {got:?}\n{}",
            b.bench.log("xlb.log")
        );
    }
    // Captured packets reach dumpcap in blocks, up to a second late.
    std::thread::sleep(Duration::from_millis(1500));
    b.bench
        .stop(capture, nix::sys::signal::Signal::SIGINT)
        .unwrap();

    // Uploads larger than the tunnel MTU (1500 - 20 for IPIP, - 40 for IPv6 in IPv6).
    let before = counter(&xlb(&["counters"], &b.socket()), "tx_icmp_too_big");
    for vip in [
        SocketAddr::new(IpAddr::V4(b.vip4), 80),
        SocketAddr::new(IpAddr::V6(b.vip6), 80),
    ] {
        let body = pattern(300_000, 7);
        let (status, answer) = in_netns(&b.cli, move || {
            http_request(vip, "POST", "/", &body, Duration::from_secs(20))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("upload to {vip}: {e:#}"));
        assert_eq!(status, 200);
        assert!(
            answer.starts_with(b"be"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let after = counter(&xlb(&["counters"], &b.socket()), "tx_icmp_too_big");
    assert!(after >= before + 2, "ICMP too-big sent: {before} → {after}");

    decode_with_tshark(&b, &pcap);
}

/// tshark's view of the capture: the protocol chains of xlb's tunnels, and no bad checksum
/// at any layer. GUE has no tshark dissector; a small Lua one decodes it.
fn decode_with_tshark(b: &DrBench, pcap: &std::path::Path) {
    let lua = b.bench.dir.join("gue.lua");
    std::fs::write(&lua, GUE_LUA).unwrap();
    let out = run(&[
        "tshark",
        "-r",
        pcap.to_str().unwrap(),
        "-X",
        &format!("lua_script:{}", lua.display()),
        "-o",
        "ip.check_checksum:TRUE",
        "-o",
        "udp.check_checksum:TRUE",
        "-o",
        "tcp.check_checksum:TRUE",
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-e",
        "frame.protocols",
        "-e",
        "ip.checksum.status",
        "-e",
        "udp.checksum.status",
        "-e",
        "tcp.checksum.status",
        "-e",
        "gre.checksum.status",
    ])
    .unwrap();
    let mut chains = BTreeSet::new();
    let mut checked = 0;
    for line in out.lines() {
        let mut f = line.split(';');
        let chain = f.next().unwrap();
        chains.insert(chain.to_string());
        // Tunnel packets only: the real servers' own replies leave with their checksums
        // left to (virtual) offload and show as bad in a capture.
        let tunnelled = ["ip:ip", "ipv6:ipv6", ":gre:", ":gue:"]
            .iter()
            .any(|t| chain.contains(t));
        if tunnelled {
            for status in f.flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
                // 0 = bad, 1 = good, 3 = not present (UDP checksum 0).
                assert!(
                    status == "1" || status == "3",
                    "checksum status {status} in {line}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked} checksums checked");
    for want in [
        "eth:ethertype:ip:ip:tcp",
        "eth:ethertype:ip:udp:gue:ip:tcp",
        "eth:ethertype:ipv6:gre:ip:tcp",
        "eth:ethertype:ipv6:ipv6:tcp",
        "eth:ethertype:ip:udp:gue:ipv6:tcp",
    ] {
        assert!(
            chains.iter().any(|c| c.starts_with(want)),
            "no {want} in the capture: {chains:?}"
        );
    }
}

/// A minimal GUE dissector (variant 0 with its header, variant 1 without) on port 6080.
const GUE_LUA: &str = r#"
local gue = Proto("gue", "Generic UDP Encapsulation")
local f_hlen = ProtoField.uint8("gue.hlen", "Option words", base.DEC, nil, 0x1f)
local f_proto = ProtoField.uint8("gue.proto", "Protocol", base.DEC)
gue.fields = { f_hlen, f_proto }
local ip_proto = DissectorTable.get("ip.proto")
function gue.dissector(tvb, pinfo, tree)
    local first = tvb(0, 1):uint()
    local variant = math.floor(first / 64)
    if variant == 1 then
        local version = math.floor(first / 16)
        return ip_proto:try(version == 4 and 4 or 41, tvb, pinfo, tree)
    end
    local len = 4 + (first % 32) * 4
    local t = tree:add(gue, tvb(0, len))
    t:add(f_hlen, tvb(0, 1))
    t:add(f_proto, tvb(1, 1))
    pinfo.cols.protocol = "GUE"
    ip_proto:try(tvb(1, 1):uint(), tvb(len):tvb(), pinfo, tree)
end
DissectorTable.get("udp.port"):add(6080, gue)
"#;

fn wait_for(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Path MTU discovery through the balancer: the client sits behind a router whose link to
/// it has MTU 1400, the real servers (NAT) send 1500-byte segments, the router answers with
/// ICMP "too big" to the VIP, and xlb relays it - rewritten - to the real server holding
/// the connection, which lowers its path MTU: downloads over IPv4 and IPv6 complete byte
/// for byte instead of stalling.
#[test]
fn path_mtu_discovery_through_nat() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb_path = xlb_bin();
    let mut b = NatBench::with_router("xte2e-pmtu", 1, &xlb_path, 1400).unwrap();
    let file = pattern(2 << 20, 0xfeed);
    std::fs::create_dir_all(files_dir(&b.bench)).unwrap();
    std::fs::write(files_dir(&b.bench).join("two.bin"), &file).unwrap();
    b.start_http().unwrap();
    let s = b.servers[0].clone();
    let services = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nforwarding = \"nat\"\n[[services.backends]]\naddress = \"{}:8080\"\n\
         [[services]]\nname = \"web6\"\naddress = \"[{}]:80\"\nforwarding = \"nat\"\n[[services.backends]]\naddress = \"[{}]:8080\"\n",
        b.vip4, s.v4, b.vip6, s.v6
    );
    let config = b.config(&services);
    b.start_xlb(&xlb_path, &config).unwrap();
    for vip in [
        SocketAddr::new(IpAddr::V4(b.vip4), 80),
        SocketAddr::new(IpAddr::V6(b.vip6), 80),
    ] {
        let want = file.clone();
        let (status, body) = in_netns(&b.cli, move || {
            http_request(vip, "GET", "/files/two.bin", b"", Duration::from_secs(20))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("download from {vip}: {e:#}"));
        assert_eq!(status, 200);
        assert!(
            body == want,
            "download from {vip} differs ({} bytes)",
            body.len()
        );
    }
    let relayed = counter(&xlb(&["counters"], &b.socket()), "icmp_relayed");
    assert!(relayed >= 2, "ICMP errors relayed: {relayed}");
}
