//! End to end: xlb's VRRP against Debian's keepalived on one shared segment (a bridge between
//! namespaces). Election by priority both ways, preemption and nopreempt, failover when the
//! master dies within 3 × advert_int + skew (+0.5 s), immediate takeover on priority 0, one
//! master in steady state, adverts tshark decodes as valid VRRP; v2 and v3, IPv4 and IPv6,
//! multicast and unicast with PASS authentication; a keepalived.conf with nopreempt, unicast
//! peers, PASS and a track_script run by xlb as written; sync groups, track_interface and
//! notify programs.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use xlb_tests::{
    require_root,
    testbed::{HaBench, run},
    xlb_bin,
};

/// The benches share two CPUs; one at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

const VIP: &str = "10.100.0.200";

/// keepalived's Skew_Time and Master_Down_Interval (keepalived.md §2.1), seconds.
fn skew(prio: u32, adv: f64) -> f64 {
    (256 - prio) as f64 / 256.0 * adv
}
fn mdi(prio: u32, adv: f64) -> f64 {
    3.0 * adv + skew(prio, adv)
}
/// The issue's allowance on top of the protocol's own time.
const ALLOWANCE: f64 = 0.5;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn socket(b: &HaBench, name: &str) -> PathBuf {
    b.bench.dir.join(format!("{name}.sock"))
}

/// The `vrrp` line of `xlb status` for `instance`.
fn vrrp_line(sock: &std::path::Path, instance: &str) -> String {
    let out = run(&[
        &xlb_bin().to_string_lossy(),
        "status",
        "--socket",
        &sock.to_string_lossy(),
    ])
    .unwrap();
    out.lines()
        .find(|l| l.starts_with(&format!("vrrp      {instance} ")))
        .unwrap_or_else(|| panic!("no {instance} in:\n{out}"))
        .to_string()
}

/// Sends `sig` without waiting for the exit (timings start at the signal; keepalived takes
/// a second to exit after its priority-0 advert).
fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// Writes `cfg` (a TOML configuration) as `<name>.toml` and starts `xlb run` with it in
/// `ns` (log `x<name>.log`, socket `<name>.sock`); its pid and socket.
fn start_xlb_toml(b: &mut HaBench, ns: &str, name: &str, cfg: &str) -> (u32, PathBuf) {
    let path = b.bench.dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let sock = socket(b, name);
    let pid = b
        .start_xlb(
            ns,
            &format!("x{name}"),
            &xlb_bin(),
            &["--config", &path.to_string_lossy()],
            &sock,
        )
        .unwrap();
    (pid, sock)
}

fn keepalived_conf(body: &str) -> String {
    format!(
        "global_defs {{\n  router_id ka\n  script_user root\n  enable_script_security\n}}\n{body}"
    )
}

/// Polls for `dur`: the VIP must be on exactly one of the nodes all along.
fn assert_one_master(b: &HaBench, vip: &str, dur: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let holders = b.nodes.iter().filter(|n| b.has_addr(n, vip)).count();
        assert_eq!(holders, 1, "{vip} held by {holders} nodes");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Captures VRRP/ARP on the segment while `f` runs, decoded by tshark (`-V`).
fn capture(b: &HaBench, dur: Duration) -> String {
    let pcap = b.bench.dir.join("vrrp.pcap");
    let t = format!("{}", dur.as_secs_f64());
    let _ = b.bench.exec(
        &b.sw,
        &[
            "timeout",
            &t,
            "tcpdump",
            "-ni",
            "br0",
            "-w",
            &pcap.to_string_lossy(),
            "ip proto 112 or ip6 proto 112 or arp",
        ],
    );
    run(&["tshark", "-r", &pcap.to_string_lossy(), "-V"]).unwrap()
}

/// tshark's decodes of the adverts `src` sent.
fn adverts_from<'a>(decoded: &'a str, src: &str) -> Vec<&'a str> {
    decoded
        .split("\nFrame ")
        .filter(|f| f.contains("Virtual Router Redundancy Protocol"))
        .filter(|f| f.contains(&format!("Source Address: {src}")))
        .collect()
}

/// The master `dead` loses its link: `survivor` (priority `prio`, advert_int 1 s) must take
/// the VIP over within its master-down interval plus the allowance, and not before the
/// interval's worth of missed adverts (less the part of one interval that had passed since
/// the last advert).
fn master_link_dies(b: &HaBench, dead: &str, survivor: &str, prio: u32) {
    let t0 = Instant::now();
    b.bench
        .exec(dead, &["ip", "link", "set", "eth0", "down"])
        .unwrap();
    let took = b
        .wait_addr(survivor, VIP, true, secs(mdi(prio, 1.0) + 2.0))
        .unwrap_or_else(|| panic!("{survivor} did not take over"));
    assert!(took <= secs(mdi(prio, 1.0) + ALLOWANCE), "took {took:?}");
    assert!(
        t0.elapsed() >= secs(mdi(prio, 1.0) - 1.0 - 0.05),
        "too early: {:?}",
        t0.elapsed()
    );
}

/// `node`'s link comes back and it (priority `prio`, the higher) preempts `other` one
/// master-down interval later; then one master.
fn link_returns_and_preempts(b: &HaBench, node: &str, other: &str, prio: u32, log: &str) {
    b.bench
        .exec(node, &["ip", "link", "set", "eth0", "up"])
        .unwrap();
    assert!(
        b.wait_addr(node, VIP, true, secs(mdi(prio, 1.0) + 3.0))
            .is_some(),
        "{node} did not take the VIP back:\n{}",
        b.bench.log(log)
    );
    assert!(
        b.wait_addr(other, VIP, false, secs(1.0)).is_some(),
        "{other} kept the VIP"
    );
    assert_one_master(b, VIP, secs(1.5));
}

#[test]
fn xlb_master_keepalived_backup_v2_multicast() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = HaBench::new("xv2", &["a", "b"]).unwrap();
    let (a, bn) = (b.nodes[0].clone(), b.nodes[1].clone());
    let ka = keepalived_conf(&format!(
        "vrrp_instance VI_1 {{\n state BACKUP\n interface eth0\n virtual_router_id 51\n priority 100\n advert_int 1\n virtual_ipaddress {{ {VIP}/24 dev eth0 }}\n}}\n"
    ));
    let ka_pid = b.start_keepalived(&bn, "ka", &ka).unwrap();
    // keepalived alone becomes master after its MDI.
    assert!(
        b.wait_addr(&bn, VIP, true, secs(mdi(100, 1.0) + 2.0))
            .is_some(),
        "{}",
        b.bench.log("ka.log")
    );
    let notify = b.bench.dir.join("notify.out");
    let cfg = b.xlb_config(&format!(
        "[[vrrp]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = 150\nvirtual_ipaddress = [\"{VIP}/24\"]\ngarp_master_delay = 1\nnotify = \"/bin/sh -c 'echo \\\"$*\\\" >> {}' notify\"\n",
        notify.display()
    ));
    let t0 = Instant::now();
    let (x_pid, sock) = start_xlb_toml(&mut b, &a, "a", &cfg);
    // Higher priority: xlb preempts one MDI(150) after its start; keepalived lets go.
    let took = b.wait_addr(&a, VIP, true, secs(mdi(150, 1.0) + 2.0));
    assert!(took.is_some(), "{}", b.bench.log("xa.log"));
    assert!(
        t0.elapsed() >= secs(mdi(150, 1.0) - 0.1),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        b.wait_addr(&bn, VIP, false, secs(1.0)).is_some(),
        "keepalived kept the VIP"
    );
    let line = vrrp_line(&sock, "VI_1");
    assert!(line.contains("MASTER prio 150/150"), "{line}");
    assert!(
        line.contains("preempting master 10.100.0.22 (priority 100 < 150)"),
        "{line}"
    );
    assert!(
        b.bench.log("ka.log").contains("higher priority 150"),
        "{}",
        b.bench.log("ka.log")
    );
    // Steady state: one master; the adverts decode as valid VRRPv2 with xlb's fields, and
    // GARPs announce the VIP.
    let decoded = capture(&b, secs(2.5));
    let ours = adverts_from(&decoded, "10.100.0.21");
    assert!(ours.len() >= 2, "{decoded}");
    for f in &ours {
        for want in [
            "Version 2, Packet type 1 (Advertisement)",
            "Virtual Rtr ID: 51",
            "Priority: 150",
            "Adver Int: 1",
            "[Checksum Status: Good]",
            "IP Address: 10.100.0.200",
            "Time to Live: 255",
            "Destination Address: 224.0.0.18",
        ] {
            assert!(f.contains(want), "{want} missing in:\n{f}");
        }
    }
    assert!(
        adverts_from(&decoded, "10.100.0.22").is_empty(),
        "keepalived still advertises:\n{decoded}"
    );
    assert!(
        decoded.contains("Gratuitous ARP for 10.100.0.200")
            || decoded.contains("Is gratuitous: True"),
        "{decoded}"
    );
    assert_one_master(&b, VIP, secs(2.0));
    // xlb's node dies (link down): keepalived takes over within its MDI (+ allowance); xlb's
    // instance faults (its interface is tracked) and lets go of the VIP.
    master_link_dies(&b, &a, &bn, 100);
    assert!(b.wait_addr(&a, VIP, false, secs(1.0)).is_some());
    assert!(
        vrrp_line(&sock, "VI_1").contains("FAULT"),
        "{}",
        vrrp_line(&sock, "VI_1")
    );
    // Back up: BACKUP first, then xlb preempts (150 > 100) one MDI(150) later.
    link_returns_and_preempts(&b, &a, &bn, 150, "xa.log");
    // A clean stop sends priority 0: keepalived takes over after its skew time.
    let t0 = Instant::now();
    signal(x_pid, nix::sys::signal::Signal::SIGTERM);
    let took = b
        .wait_addr(&bn, VIP, true, secs(3.0))
        .expect("keepalived did not take over");
    let since_stop = t0.elapsed();
    assert!(
        since_stop <= secs(skew(100, 1.0) + ALLOWANCE),
        "{since_stop:?} ({took:?})"
    );
    assert!(!b.has_addr(&a, VIP));
    b.bench
        .stop(x_pid, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(
        b.bench
            .log("ka.log")
            .contains("Backup received priority 0 advertisement"),
        "{}",
        b.bench.log("ka.log")
    );
    let n = std::fs::read_to_string(&notify).unwrap_or_default();
    assert_eq!(
        n.lines().collect::<Vec<_>>(),
        [
            "INSTANCE VI_1 BACKUP 150",
            "INSTANCE VI_1 MASTER 150",
            "INSTANCE VI_1 FAULT 150",
            "INSTANCE VI_1 BACKUP 150",
            "INSTANCE VI_1 MASTER 150",
            "INSTANCE VI_1 STOP 150"
        ],
        "notify calls"
    );
    b.bench
        .stop(ka_pid, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
}

#[test]
fn keepalived_master_xlb_backup_failover_and_preemption() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = HaBench::new("xfo", &["a", "b"]).unwrap();
    let (a, bn) = (b.nodes[0].clone(), b.nodes[1].clone());
    let ka = keepalived_conf(&format!(
        "vrrp_instance VI_1 {{\n state MASTER\n interface eth0\n virtual_router_id 51\n priority 150\n advert_int 1\n virtual_ipaddress {{ {VIP}/24 dev eth0 }}\n}}\n"
    ));
    let ka_pid = b.start_keepalived(&a, "ka", &ka).unwrap();
    assert!(
        b.wait_addr(&a, VIP, true, secs(mdi(150, 1.0) + 2.0))
            .is_some()
    );
    let cfg = b.xlb_config(&format!(
        "[[vrrp]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = 100\nvirtual_ipaddress = [\"{VIP}/24\"]\n"
    ));
    let (_, sock) = start_xlb_toml(&mut b, &bn, "b", &cfg);
    // Lower priority: xlb stays backup behind keepalived.
    assert_one_master(&b, VIP, secs(mdi(100, 1.0) + 1.0));
    assert!(b.has_addr(&a, VIP));
    let line = vrrp_line(&sock, "VI_1");
    assert!(
        line.contains("BACKUP prio 100/100 master 10.100.0.21 prio 150"),
        "{line}"
    );
    // The master dies (its link goes): xlb takes over within MDI(100) + allowance.
    master_link_dies(&b, &a, &bn, 100);
    let line = vrrp_line(&sock, "VI_1");
    assert!(line.contains("MASTER prio 100/100"), "{line}");
    // It comes back: keepalived (150) preempts, xlb yields.
    link_returns_and_preempts(&b, &a, &bn, 150, "ka.log");
    // keepalived stops cleanly (priority 0): xlb takes over at once (skew time).
    let t0 = Instant::now();
    signal(ka_pid, nix::sys::signal::Signal::SIGTERM);
    b.wait_addr(&bn, VIP, true, secs(3.0))
        .expect("no takeover after priority 0");
    assert!(
        t0.elapsed() <= secs(skew(100, 1.0) + ALLOWANCE),
        "{:?}",
        t0.elapsed()
    );
    let line = vrrp_line(&sock, "VI_1");
    assert!(
        line.contains("master 10.100.0.21 stopped (priority 0)"),
        "{line}"
    );
}

#[test]
fn nopreempt_and_v3_with_keepalived() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = HaBench::new("xnp", &["a", "b"]).unwrap();
    let (a, bn) = (b.nodes[0].clone(), b.nodes[1].clone());
    let adv = 0.5;
    let ka = format!(
        "global_defs {{\n router_id ka\n vrrp_version 3\n}}\nvrrp_instance VI_1 {{\n state BACKUP\n interface eth0\n virtual_router_id 51\n priority 100\n advert_int {adv}\n virtual_ipaddress {{ {VIP}/24 dev eth0 }}\n}}\n"
    );
    let ka_pid = b.start_keepalived(&bn, "ka", &ka).unwrap();
    assert!(
        b.wait_addr(&bn, VIP, true, secs(mdi(100, adv) + 2.0))
            .is_some()
    );
    let cfg = b.xlb_config(&format!(
        "[[vrrp]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = 150\nversion = 3\nadvert_int = {adv}\nnopreempt = true\nvirtual_ipaddress = [\"{VIP}/24\"]\n"
    ));
    let (_, sock) = start_xlb_toml(&mut b, &a, "a", &cfg);
    // nopreempt: the higher priority does not take over a running master.
    assert_one_master(&b, VIP, secs(3.0 * mdi(150, adv)));
    assert!(b.has_addr(&bn, VIP));
    let line = vrrp_line(&sock, "VI_1");
    assert!(line.contains("v3 BACKUP"), "{line}");
    // v3 adverts of keepalived decode and are accepted; keepalived leaves: xlb takes over
    // after Skew_Time(150) of v3 at 50 cs.
    let decoded = capture(&b, secs(1.2));
    let theirs = adverts_from(&decoded, "10.100.0.22");
    assert!(
        !theirs.is_empty() && theirs[0].contains("Version 3"),
        "{decoded}"
    );
    let t0 = Instant::now();
    signal(ka_pid, nix::sys::signal::Signal::SIGTERM);
    b.wait_addr(&a, VIP, true, secs(3.0)).expect("no takeover");
    assert!(
        t0.elapsed() <= secs(skew(150, adv) + ALLOWANCE),
        "{:?}",
        t0.elapsed()
    );
    // xlb's own v3 adverts decode as valid (checksum with the IPv4 pseudo-header).
    let decoded = capture(&b, secs(1.2));
    let ours = adverts_from(&decoded, "10.100.0.21");
    assert!(!ours.is_empty(), "{decoded}");
    for f in ours {
        assert!(
            f.contains("Version 3, Packet type 1 (Advertisement)"),
            "{f}"
        );
        assert!(f.contains("[Checksum Status: Good]"), "{f}");
        assert!(f.contains("Priority: 150"), "{f}");
    }
}

/// The seeds' two-node example as written: keepalived.conf with state BACKUP and nopreempt
/// on both, unicast peers, PASS authentication and a track_script; xlb runs one node's file,
/// keepalived the other's.
#[test]
fn keepalived_conf_unicast_pass_track_script() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = HaBench::new("xuc", &["a", "b"]).unwrap();
    let (a, bn) = (b.nodes[0].clone(), b.nodes[1].clone());
    // Each node's script checks its own file.
    let flag = b.bench.dir.join("healthy-a");
    std::fs::write(&flag, "").unwrap();
    let flag_b = b.bench.dir.join("healthy-b");
    std::fs::write(&flag_b, "").unwrap();
    let conf = |me: &str, peer: &str, prio: u32, flag: &std::path::Path| {
        keepalived_conf(&format!(
            "vrrp_script chk_lb {{\n  script \"/usr/bin/test -e {}\"\n  interval 1\n  fall 1\n  rise 1\n}}\nvrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {prio}\n  advert_int 1\n  nopreempt\n  unicast_src_ip {me}\n  unicast_peer {{\n    {peer}\n  }}\n  authentication {{\n    auth_type PASS\n    auth_pass secret12345\n  }}\n  track_script {{\n    chk_lb\n  }}\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n}}\n",
            flag.display()
        ))
    };
    let ka1 = b.bench.dir.join("ka1.conf");
    std::fs::write(&ka1, conf("10.100.0.21", "10.100.0.22", 150, &flag)).unwrap();
    let sock = socket(&b, "a");
    b.start_xlb(
        &a,
        "xa",
        &xlb_bin(),
        &["--keepalived", &ka1.to_string_lossy()],
        &sock,
    )
    .unwrap();
    assert!(
        b.wait_addr(&a, VIP, true, secs(mdi(150, 1.0) + 2.0))
            .is_some(),
        "{}",
        b.bench.log("xa.log")
    );
    b.start_keepalived(&bn, "ka", &conf("10.100.0.22", "10.100.0.21", 100, &flag_b))
        .unwrap();
    assert_one_master(&b, VIP, secs(mdi(100, 1.0) + 1.0));
    assert!(b.has_addr(&a, VIP), "{}", b.bench.log("ka.log"));
    // Unicast, PASS: the adverts go to the peer, with the password's first 8 bytes.
    let decoded = capture(&b, secs(1.5));
    let ours = adverts_from(&decoded, "10.100.0.21");
    assert!(!ours.is_empty(), "{decoded}");
    for f in &ours {
        assert!(f.contains("Destination Address: 10.100.0.22"), "{f}");
        assert!(f.contains("Auth Type: Simple Text Authentication"), "{f}");
        assert!(f.contains("secret12"), "{f}");
        assert!(f.contains("[Checksum Status: Good]"), "{f}");
    }
    // The track_script fails (weight 0): xlb's instance faults, sends priority 0, and
    // keepalived takes over at once.
    let t0 = Instant::now();
    std::fs::remove_file(&flag).unwrap();
    b.wait_addr(&bn, VIP, true, secs(4.0))
        .expect("keepalived did not take over");
    // One script interval to notice, then the skew time.
    assert!(
        t0.elapsed() <= secs(1.0 + skew(100, 1.0) + ALLOWANCE + 0.3),
        "{:?}",
        t0.elapsed()
    );
    let line = vrrp_line(&sock, "VI_1");
    assert!(line.contains("FAULT"), "{line}");
    // Healthy again: back to BACKUP, and nopreempt keeps keepalived master.
    std::fs::write(&flag, "").unwrap();
    let t0 = Instant::now();
    while !vrrp_line(&sock, "VI_1").contains("BACKUP") {
        assert!(t0.elapsed() < secs(3.0), "{}", vrrp_line(&sock, "VI_1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_one_master(&b, VIP, secs(mdi(150, 1.0) + 1.0));
    assert!(b.has_addr(&bn, VIP));
}

#[test]
fn sync_group_faults_together_and_ipv6() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = HaBench::new("xsg", &["a", "b"]).unwrap();
    let (a, bn) = (b.nodes[0].clone(), b.nodes[1].clone());
    let vip6 = "2001:db8:100::200";
    // A second link of node a (no dummy module here: a veth pair inside the namespace).
    b.bench
        .sh(&a, "ip link add eth1 type veth peer name eth1p && ip link set eth1p up && ip link set eth1 up")
        .unwrap();
    let ka = keepalived_conf(&format!(
        "vrrp_sync_group G {{\n group {{\n  VI_1\n  VI_6\n }}\n}}\nvrrp_instance VI_1 {{\n state BACKUP\n interface eth0\n virtual_router_id 51\n priority 100\n advert_int 1\n virtual_ipaddress {{ {VIP}/24 dev eth0 }}\n}}\nvrrp_instance VI_6 {{\n state BACKUP\n interface eth0\n virtual_router_id 61\n priority 100\n advert_int 1\n virtual_ipaddress {{ {vip6}/64 dev eth0 }}\n}}\n"
    ));
    b.start_keepalived(&bn, "ka", &ka).unwrap();
    let out = b.bench.dir.join("group.out");
    let cfg = b.xlb_config(&format!(
        "[[vrrp]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = 150\nvirtual_ipaddress = [\"{VIP}/24\"]\ntrack_interface = [\"eth1\"]\n\n[[vrrp]]\nname = \"VI_6\"\ninterface = \"eth0\"\nvirtual_router_id = 61\npriority = 150\nvirtual_ipaddress = [\"{vip6}/64\"]\n\n[[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_1\", \"VI_6\"]\nnotify = \"/bin/sh -c 'echo \\\"$*\\\" >> {}' notify\"\n",
        out.display()
    ));
    let (_, sock) = start_xlb_toml(&mut b, &a, "a", &cfg);
    for vip in [VIP, vip6] {
        assert!(
            b.wait_addr(&a, vip, true, secs(mdi(150, 1.0) + 2.0))
                .is_some(),
            "{vip}: {}",
            b.bench.log("xa.log")
        );
        assert!(
            b.wait_addr(&bn, vip, false, secs(1.0)).is_some(),
            "{vip} on keepalived"
        );
    }
    assert_one_master(&b, vip6, secs(2.0));
    // IPv6 adverts: v3 to ff02::12 from the link-local address, valid for tshark.
    let decoded = capture(&b, secs(2.5));
    let v6: Vec<&str> = decoded
        .split("\nFrame ")
        .filter(|f| f.contains("Virtual Rtr ID: 61") && f.contains("Destination Address: ff02::12"))
        .collect();
    assert!(!v6.is_empty(), "{decoded}");
    assert!(
        v6.iter()
            .all(|f| f.contains("Version 3") && f.contains("[Checksum Status: Good]")),
        "{v6:?}"
    );
    // eth1 goes down: VI_1 faults, and its sync group with it; keepalived takes both over
    // at once (priority 0).
    let t0 = Instant::now();
    b.bench
        .exec(&a, &["ip", "link", "set", "eth1", "down"])
        .unwrap();
    for vip in [VIP, vip6] {
        b.wait_addr(&bn, vip, true, secs(3.0))
            .unwrap_or_else(|| panic!("{vip} not taken over"));
        assert!(!b.has_addr(&a, vip));
    }
    assert!(
        t0.elapsed() <= secs(0.1 + skew(100, 1.0) + ALLOWANCE),
        "{:?}",
        t0.elapsed()
    );
    for i in ["VI_1", "VI_6"] {
        assert!(
            vrrp_line(&sock, i).contains("FAULT"),
            "{}",
            vrrp_line(&sock, i)
        );
    }
    let lines = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        ["GROUP G BACKUP 0", "GROUP G MASTER 0", "GROUP G FAULT 0"],
        "group notify calls"
    );
}

/// Two xlb balancers with VRRP and connection sync in front of two real servers (direct
/// routing, lc): long-lived connections opened through the master continue on the same real
/// server through the backup after a failover, without a reset; the backup counted them.
#[test]
fn connections_survive_failover_with_conn_sync() {
    use xlb_tests::testbed::{DrBench, KeepAlive, in_netns};
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let xlb = xlb_bin();
    let mut b = DrBench::new("xcs", 2, &xlb).unwrap();
    b.start_http().unwrap();
    // VRRP owns the VIP: not configured statically on the first balancer.
    let lb1 = b.lb.clone();
    b.bench
        .exec(
            &lb1,
            &["ip", "addr", "del", "10.100.0.100/32", "dev", "eth0"],
        )
        .unwrap();
    let lb2 = b.bench.netns("lb2").unwrap();
    let sw = b.sw.clone();
    b.bench
        .sh(
            &sw,
            &format!("ip link add p-lb2 type veth peer name eth0 netns {lb2} && ip link set p-lb2 master br0 up"),
        )
        .unwrap();
    b.bench
        .sh(
            &lb2,
            "ip addr add 10.100.0.3/24 dev eth0 && ip link set eth0 up",
        )
        .unwrap();
    b.bench
        .exec(&sw, &[&xlb.to_string_lossy(), "util", "xdp-pass", "p-lb2"])
        .unwrap();
    let dir = b.bench.dir.clone();
    // The pins outlive each daemon (for the takeover below): a bpffs of the bench's own.
    let pins = dir.join("bpffs");
    std::fs::create_dir_all(&pins).unwrap();
    run(&["mount", "-t", "bpf", "bpf", &pins.to_string_lossy()]).unwrap();
    let _unmount = Unmount(pins.clone());
    let config = |name: &str, prio: u32| {
        let sock = dir.join(format!("{name}.sock"));
        format!(
            "[dataplane]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nconn_table_size = 65536\nconn_table_size_v6 = 65536\nmax_services = 64\nmax_backends = 256\nslot_table_size = 65536\n\n[control]\nsocket = \"{}\"\nmetrics = \"127.0.0.1:9469\"\npin_dir = \"{}/{name}\"\n\n[[services]]\nname = \"web\"\naddress = \"10.100.0.100:80\"\nscheduler = \"lc\"\nforwarding = \"dr\"\n[[services.backends]]\naddress = \"10.100.0.11:80\"\n[[services.backends]]\naddress = \"10.100.0.12:80\"\n\n[[vrrp]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\npriority = {prio}\nvirtual_ipaddress = [\"10.100.0.100/32\"]\ntrack_dataplane = {{ services = [\"web\"] }}\n\n[conn_sync]\ninterface = \"eth0\"\ninstance = \"VI_1\"\nid = 7\n",
            sock.display(),
            pins.display()
        )
    };
    let start = |b: &mut DrBench, ns: &str, name: &str, prio: u32| {
        let path = b.bench.dir.join(format!("{name}.toml"));
        std::fs::write(&path, config(name, prio)).unwrap();
        let sock = b.bench.dir.join(format!("{name}.sock"));
        let log = format!("{name}.log");
        let pid = b
            .bench
            .spawn(
                ns,
                &[
                    &xlb.to_string_lossy(),
                    "run",
                    "--config",
                    &path.to_string_lossy(),
                ],
                &log,
            )
            .unwrap();
        let t0 = Instant::now();
        while run(&[
            &xlb.to_string_lossy(),
            "status",
            "--socket",
            &sock.to_string_lossy(),
        ])
        .is_err()
        {
            assert!(
                t0.elapsed() < secs(20.0) && b.bench.running(pid),
                "{}",
                b.bench.log(&log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (pid, sock)
    };
    let (pid1, sock1) = start(&mut b, &lb1, "lb1", 150);
    let (_pid2, sock2) = start(&mut b, &lb2, "lb2", 100);
    let has = |bench: &xlb_tests::testbed::Bench, ns: &str| holds_vip(bench, ns);
    let t0 = Instant::now();
    while !has(&b.bench, &lb1) {
        assert!(
            t0.elapsed() < secs(mdi(150, 1.0) + 2.0),
            "{}",
            b.bench.log("lb1.log")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        vrrp_line(&sock2, "VI_1").contains("BACKUP"),
        "{}",
        vrrp_line(&sock2, "VI_1")
    );
    // Long-lived connections through the master, spread by lc.
    let vip: std::net::SocketAddr = "10.100.0.100:80".parse().unwrap();
    let mut conns: Vec<(KeepAlive, String)> = Vec::new();
    for _ in 0..6 {
        let mut c = in_netns(&b.cli, move || KeepAlive::connect(vip))
            .unwrap()
            .unwrap();
        let server = c.get().unwrap();
        conns.push((c, server));
    }
    let on = |s: &str| conns.iter().filter(|(_, x)| x == s).count();
    assert_eq!((on("be1"), on("be2")), (3, 3));
    // The backup learns them: its lc counts them as active.
    let active = |sock: &std::path::Path| {
        let (_, out, _) = xlb_tests::ipvsadm_in(sock, &["-Ln"], "");
        out.lines()
            .filter(|l| l.trim_start().starts_with("-> 10.100.0.1"))
            .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u32>().unwrap())
            .collect::<Vec<_>>()
    };
    let t0 = Instant::now();
    while active(&sock2) != vec![3, 3] {
        assert!(
            t0.elapsed() < secs(3.0),
            "backup counts {:?}\n{}",
            active(&sock2),
            run(&[
                &xlb.to_string_lossy(),
                "status",
                "--socket",
                &sock2.to_string_lossy()
            ])
            .unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = run(&[
        &xlb.to_string_lossy(),
        "status",
        "--socket",
        &sock2.to_string_lossy(),
    ])
    .unwrap();
    assert!(
        status.contains("sync      backup for VI_1 (id 7)"),
        "{status}"
    );
    let status = run(&[
        &xlb.to_string_lossy(),
        "status",
        "--socket",
        &sock1.to_string_lossy(),
    ])
    .unwrap();
    assert!(
        status.contains("sync      master for VI_1 (id 7)"),
        "{status}"
    );
    // ipvsadm -L --daemon shows each end's role as ipvsadm shows the kernel's daemons.
    for (sock, role) in [(&sock1, "master"), (&sock2, "backup")] {
        let (code, out, _) = xlb_tests::ipvsadm_in(sock, &["-L", "--daemon"], "");
        assert_eq!(code, 0);
        assert_eq!(
            out,
            format!(
                "{role} sync daemon (mcast=eth0, syncid=7, maxlen=1472, group=224.0.0.81, port=8848, ttl=1)\n"
            )
        );
    }
    // /metrics of both ends: valid for promtool, with the VRRP and sync families.
    let metrics = |ns: &str| {
        let text = b.bench.scrape_metrics(ns).unwrap();
        let check = b.bench.promtool_check(&format!("{ns}.metrics"), &text);
        assert!(check.is_ok(), "promtool: {check:?}");
        text
    };
    let sample = |text: &str, prefix: &str| -> f64 { xlb_testbed::metric_value(text, prefix) };
    let m1 = metrics(&lb1);
    let m2 = metrics(&lb2);
    let labels = "{instance=\"VI_1\",interface=\"eth0\",vrid=\"51\"}";
    assert_eq!(sample(&m1, &format!("xlb_vrrp_master{labels}")), 1.0);
    assert_eq!(sample(&m1, &format!("xlb_vrrp_state{labels}")), 2.0);
    assert_eq!(sample(&m2, &format!("xlb_vrrp_state{labels}")), 1.0);
    assert_eq!(sample(&m2, &format!("xlb_vrrp_priority{labels}")), 100.0);
    assert_eq!(sample(&m1, "xlb_conn_sync_master{instance=\"VI_1\"}"), 1.0);
    assert!(sample(&m1, "xlb_conn_sync_sent_records_total{instance=\"VI_1\"}") >= 6.0);
    assert!(sample(&m2, "xlb_conn_sync_installed_total{instance=\"VI_1\"}") >= 6.0);
    assert!(sample(&m2, "xlb_conn_sync_lag_seconds{instance=\"VI_1\"}") < 30.0);
    // An upgrade of the master in place (--takeover): the VIP never moves, the backup stays
    // backup, the connections go on.
    let path1 = b.bench.dir.join("lb1.toml");
    let pid1b = b
        .bench
        .spawn(
            &lb1,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--takeover",
                "--config",
                &path1.to_string_lossy(),
            ],
            "lb1b.log",
        )
        .unwrap();
    let t0 = Instant::now();
    while b.bench.running(pid1)
        || !run(&[
            &xlb.to_string_lossy(),
            "status",
            "--socket",
            &sock1.to_string_lossy(),
        ])
        .is_ok_and(|s| s.contains("MASTER"))
    {
        assert!(
            !has(&b.bench, &lb2),
            "the backup took over during the takeover"
        );
        assert!(
            has(&b.bench, &lb1),
            "the VIP left during the takeover:\n{}",
            b.bench.log("lb1b.log")
        );
        assert!(t0.elapsed() < secs(20.0), "{}", b.bench.log("lb1b.log"));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        b.bench.log("lb1b.log").contains("resuming"),
        "{}",
        b.bench.log("lb1b.log")
    );
    assert_one_master_ns(&b.bench, &[&lb1, &lb2], secs(mdi(100, 1.0) + 0.5));
    assert!(
        vrrp_line(&sock2, "VI_1").contains("BACKUP"),
        "{}",
        vrrp_line(&sock2, "VI_1")
    );
    for (i, (c, server)) in conns.iter_mut().enumerate() {
        let got = c
            .get()
            .unwrap_or_else(|e| panic!("connection {i} broke in the takeover: {e:#}"));
        assert_eq!(&got, server);
    }
    let _ = pid1;
    // Failover: the master's XDP program goes away (track_dataplane): it faults, and the
    // backup takes the VIP over at once; the connections go on.
    // (An XDP link is not removed by `ip link set xdp off`: detach it by its pin.)
    run(&[
        "bpftool",
        "link",
        "detach",
        "pinned",
        &pins.join("lb1/link_eth0").to_string_lossy(),
    ])
    .unwrap();
    let t0 = Instant::now();
    while !has(&b.bench, &lb2) {
        assert!(t0.elapsed() < secs(3.0), "{}", b.bench.log("lb2.log"));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The data-plane check runs every 0.5 s; then priority 0 and the skew time.
    assert!(
        t0.elapsed() <= secs(0.5 + skew(100, 1.0) + ALLOWANCE),
        "{:?}",
        t0.elapsed()
    );
    let line = vrrp_line(&sock1, "VI_1");
    assert!(
        line.contains("FAULT") && line.contains("xlb's data plane is down"),
        "{line}"
    );
    assert!(!has(&b.bench, &lb1));
    for (i, (c, server)) in conns.iter_mut().enumerate() {
        for _ in 0..3 {
            let got = c
                .get()
                .unwrap_or_else(|e| panic!("connection {i} broke after the failover: {e:#}"));
            assert_eq!(&got, server, "connection {i} moved");
        }
    }
    // New connections are scheduled by the new master, whose lc counts the synced ones.
    assert_eq!(active(&sock2), vec![3, 3]);
    let fresh = in_netns(&b.cli, move || {
        KeepAlive::connect(vip).and_then(|mut c| c.get())
    })
    .unwrap()
    .unwrap();
    assert!(fresh == "be1" || fresh == "be2", "{fresh}");
    signal(pid1b, nix::sys::signal::Signal::SIGTERM);
    // The daemons go before the bpffs (the guard unmounts it, also when a check fails).
    b.bench.cleanup();
}

/// Unmounts a bench's bpffs when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = run(&["umount", &self.0.to_string_lossy()]);
    }
}

/// Whether namespace `ns` holds the sync test's VIP.
fn holds_vip(bench: &xlb_tests::testbed::Bench, ns: &str) -> bool {
    bench
        .exec(ns, &["ip", "-o", "addr", "show", "dev", "eth0"])
        .unwrap()
        .contains("10.100.0.100/32")
}

/// [`assert_one_master`] for namespaces of any bench: the VIP on exactly one all along.
fn assert_one_master_ns(bench: &xlb_tests::testbed::Bench, nodes: &[&str], dur: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let holders = nodes.iter().filter(|n| holds_vip(bench, n)).count();
        assert_eq!(holders, 1, "the VIP is held by {holders} nodes");
        std::thread::sleep(Duration::from_millis(50));
    }
}
