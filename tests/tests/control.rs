//! End to end: the control plane of a running balancer. ipvsadm commands and rule files
//! against the daemon, changes, reloads and restarts under traffic (no request may fail, no
//! long-lived connection may break), Prometheus metrics checked by promtool, and a
//! keepalived.conf as the configuration.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::{
    counts, ipvsadm, ipvsadm_in, require_root,
    testbed::{DrBench, KeepAlive, http_get, in_netns, run},
    xlb_bin, xlb_with_input,
};

/// The benches share two CPUs; one at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

/// A server line of ipvsadm's default listing (`"  -> %-28s %-7s %-6d %-10u %-10u"`).
fn server_line(addr: &str, fwd: &str, w: u32, active: u64, inactive: u64) -> String {
    format!("  -> {addr:<28} {fwd:<7} {w:<6} {active:<10} {inactive:<10}\n")
}

/// Sequential HTTP requests from the client namespace until stopped (bounded: at most
/// `max` requests and 60 s); every answer or error is recorded.
struct Traffic {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Result<String, String>>>>,
}

impl Traffic {
    fn start(b: &DrBench, vip: SocketAddr, max: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ns = b.cli.clone();
        let handle = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut got = Vec::new();
                while !flag.load(Ordering::Relaxed) && got.len() < max && Instant::now() < deadline
                {
                    got.push(http_get(vip).map_err(|e| format!("{e:#}")));
                    std::thread::sleep(Duration::from_millis(5));
                }
                got
            })
            .unwrap()
        });
        Traffic {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn assert_no_failures(results: &[Result<String, String>]) -> Vec<String> {
    let failed: Vec<(usize, &String)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    results.iter().map(|r| r.clone().unwrap()).collect()
}

fn vip80(b: &DrBench) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(b.vip4), 80)
}

fn bench(prefix: &str, n: usize) -> DrBench {
    let mut b = DrBench::new(prefix, n, &xlb_bin()).unwrap();
    b.start_http().unwrap();
    b
}

/// Services built with ipvsadm commands, listed byte for byte as ipvsadm lists them, saved
/// with -S, cleared, restored with -R (the same table and the same rules again), with
/// ipvsadm's errors and exit codes; also through links named ipvsadm and ipvsadm-save.
#[test]
fn ipvsadm_commands_listing_and_save_restore() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-adm", 2);
    let config = b.config("");
    b.start_xlb(&xlb_bin(), &config).unwrap();
    let v = b.vip4;
    for line in [
        format!("-A -t {v}:80 -s wrr"),
        format!("-a -t {v}:80 -r 10.100.0.11:80 -g -w 2 -x 1000 -y 800"),
        format!("-a -t {v}:80 -r 10.100.0.12 -w 1"),
        format!("-A -t {v}:8080 -s sh -b sh-fallback,sh-port -p -M 255.255.255.0"),
        format!("-a -t {v}:8080 -r 10.100.0.11:8080 -g"),
        format!("-A -u {v}:53 -s rr"),
        format!("-a -u {v}:53 -r 10.100.0.12:5353 -m"),
        "-A -t [fd00:100::100]:80 -s rr".to_string(),
        "-a -t [fd00:100::100]:80 -r [fd00:100::11]:80".to_string(),
    ] {
        ipvsadm(&b, &line);
    }
    let mut want = String::from(
        "IP Virtual Server version 1.2.1 (size=65536)\n\
         Prot LocalAddress:Port Scheduler Flags\n  \
         -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
    );
    want += &format!("TCP  {v}:80 wrr\n");
    want += &server_line("10.100.0.11:80", "Route", 2, 0, 0);
    want += &server_line("10.100.0.12:80", "Route", 1, 0, 0);
    want += &format!("TCP  {v}:8080 sh (sh-fallback,sh-port) persistent 360 mask 255.255.255.0\n");
    want += &server_line("10.100.0.11:8080", "Route", 1, 0, 0);
    want += &format!("UDP  {v}:53 rr\n");
    want += &server_line("10.100.0.12:5353", "Masq", 1, 0, 0);
    want += "TCP  [fd00:100::100]:80 rr\n";
    want += &server_line("[fd00:100::11]:80", "Route", 1, 0, 0);
    assert_eq!(ipvsadm(&b, "-Ln"), want);
    assert_eq!(ipvsadm(&b, "-L -n"), want);

    // One service: no version header.
    let one = ipvsadm(&b, &format!("-L -n -t {v}:80"));
    assert_eq!(
        one,
        format!(
            "Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\nTCP  {v}:80 wrr\n{}{}",
            server_line("10.100.0.11:80", "Route", 2, 0, 0),
            server_line("10.100.0.12:80", "Route", 1, 0, 0)
        )
    );

    // Traffic follows the restored rules later; first the errors.
    let (code, _, err) = ipvsadm_in(&b.socket(), &["-A", "-t", &format!("{v}:80")], "");
    assert_eq!(code, 255);
    assert!(err.contains("Service already exists"), "{err}");
    let (code, _, err) = ipvsadm_in(
        &b.socket(),
        &["-a", "-t", &format!("{v}:81"), "-r", "10.100.0.11"],
        "",
    );
    // ipvsadm's words for a server command on a missing service.
    assert_eq!(code, 255);
    assert!(err.contains("Service not defined"), "{err}");
    let (code, _, err) = ipvsadm_in(
        &b.socket(),
        &["-d", "-t", &format!("{v}:80"), "-r", "10.100.0.13"],
        "",
    );
    assert_ne!(code, 0);
    assert!(err.contains("No such destination"), "{err}");
    // An option ipvsadm does not know: popt's error (ipvsadm exits -1, i.e. 255); nothing
    // changed. A known option the command does not take: ipvsadm's fail(), exit 2.
    let (code, _, _) = ipvsadm_in(&b.socket(), &["-A", "-t", &format!("{v}:90"), "-Q"], "");
    assert_eq!(code, 255);
    let (code, _, err) = ipvsadm_in(
        &b.socket(),
        &["-D", "-t", &format!("{v}:80"), "-s", "rr"],
        "",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Illegal"), "{err}");
    // Valid for ipvsadm, refused by the configuration rules (direct routing cannot move a
    // port across address families): the reason is printed, nothing changes.
    let (code, _, err) = ipvsadm_in(
        &b.socket(),
        &[
            "-a",
            "-t",
            &format!("{v}:80"),
            "-r",
            "[fd00:100::12]:80",
            "-g",
        ],
        "",
    );
    assert_ne!(code, 0, "{err}");
    assert!(!err.is_empty());
    assert_eq!(ipvsadm(&b, "-Ln"), want, "a refused change left traces");

    // The API itself: a malformed request is refused with what is wrong and where.
    let bad = run(&[
        "curl",
        "-sS",
        "--unix-socket",
        &b.socket().to_string_lossy(),
        "-H",
        "Content-Type: application/json",
        "-X",
        "POST",
        "-d",
        r#"{"changes":[{"op":"clear"},{"op":"add_servce"}]}"#,
        "-w",
        "\n%{http_code}",
        "http://xlb/v1/changes",
    ])
    .unwrap();
    assert!(bad.ends_with("\n400"), "{bad}");
    assert!(
        bad.contains("changes[1]") && bad.contains("add_servce"),
        "{bad}"
    );
    assert_eq!(
        ipvsadm(&b, "-Ln"),
        want,
        "a refused request changed something"
    );

    // -S, -C, -R: the same rules and the same table.
    let saved = ipvsadm(&b, "-S -n");
    assert!(
        saved.starts_with(&format!("-A -t {v}:80 -s wrr\n")),
        "{saved}"
    );
    assert!(
        saved.contains(&format!("-a -u {v}:53 -r 10.100.0.12:5353 -m -w 1\n")),
        "{saved}"
    );
    ipvsadm(&b, "-C");
    assert_eq!(
        ipvsadm(&b, "-Ln"),
        "IP Virtual Server version 1.2.1 (size=65536)\nProt LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n"
    );
    let (code, _, err) = ipvsadm_in(&b.socket(), &["-R"], &saved);
    assert_eq!(code, 0, "{err}");
    assert_eq!(ipvsadm(&b, "-S -n"), saved);
    assert_eq!(
        ipvsadm(&b, "-Ln")
            .lines()
            .filter(|l| l.starts_with("  -> 10") || l.starts_with("  -> ["))
            .count(),
        5
    );

    // A rule file with a bad line is refused whole (exit 2), before anything is applied.
    let (code, _, _) = ipvsadm_in(
        &b.socket(),
        &["-R"],
        &format!("-C\n-A -t {v}:9 -s rr\n-a -t {v}:9 -r 10.100.0.11 --bogus\n"),
    );
    assert_eq!(code, 2);
    assert_eq!(ipvsadm(&b, "-S -n"), saved);

    // The restored wrr service balances 2:1.
    let got = in_netns(&b.cli, {
        let vip = vip80(&b);
        move || (0..30).map(|_| http_get(vip).unwrap()).collect::<Vec<_>>()
    })
    .unwrap();
    let c = counts(&got);
    assert_eq!(
        (c.get("be1"), c.get("be2")),
        (Some(&20), Some(&10)),
        "{got:?}"
    );

    // Links named like ipvsadm's programs behave as them (the socket from XLB_SOCKET).
    let dir = b.bench.dir.join("sbin");
    std::fs::create_dir_all(&dir).unwrap();
    run(&[
        &xlb_bin().to_string_lossy(),
        "links",
        &dir.to_string_lossy(),
    ])
    .unwrap();
    let via_link = Command::new(dir.join("ipvsadm-save"))
        .arg("-n")
        .env("XLB_SOCKET", b.socket())
        .output()
        .unwrap();
    assert!(via_link.status.success());
    assert_eq!(String::from_utf8_lossy(&via_link.stdout), saved);
    let via_link = Command::new(dir.join("ipvsadm"))
        .args(["-L", "-n", "-t", &format!("{v}:8080")])
        .env("XLB_SOCKET", b.socket())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&via_link.stdout).contains("persistent 360 mask 255.255.255.0"),
        "{via_link:?}"
    );
}

/// Services and real servers added, drained and removed while a client keeps making
/// requests: not one fails, and each change shows in who answers.
#[test]
fn live_changes_under_traffic() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-live", 3);
    let config = b.config("");
    b.start_xlb(&xlb_bin(), &config).unwrap();
    let v = b.vip4;
    ipvsadm(&b, &format!("-A -t {v}:80 -s rr"));
    ipvsadm(&b, &format!("-a -t {v}:80 -r 10.100.0.11"));
    let traffic = Traffic::start(&b, vip80(&b), 5000);
    std::thread::sleep(Duration::from_millis(500));
    ipvsadm(&b, &format!("-a -t {v}:80 -r 10.100.0.12"));
    ipvsadm(&b, &format!("-a -t {v}:80 -r 10.100.0.13"));
    std::thread::sleep(Duration::from_millis(700));
    // Drain be1 (weight 0: no new connections), then remove it once idle.
    ipvsadm(&b, &format!("-e -t {v}:80 -r 10.100.0.11 -w 0"));
    std::thread::sleep(Duration::from_millis(500));
    ipvsadm(&b, &format!("-d -t {v}:80 -r 10.100.0.11"));
    std::thread::sleep(Duration::from_millis(700));
    // A second service appears and goes while the first keeps serving.
    ipvsadm(&b, &format!("-A -t {v}:8080 -s wlc"));
    ipvsadm(&b, &format!("-a -t {v}:8080 -r 10.100.0.11"));
    let other = in_netns(&b.cli, move || {
        http_get(SocketAddr::new(IpAddr::V4(v), 8080))
    })
    .unwrap()
    .unwrap();
    assert_eq!(other, "be1");
    ipvsadm(&b, &format!("-D -t {v}:8080"));
    std::thread::sleep(Duration::from_millis(300));
    let results = traffic.finish();
    let got = assert_no_failures(&results);
    assert!(got.len() > 50, "too few requests: {}", got.len());
    let first_be23 = got.iter().position(|s| s != "be1").expect("be2/be3 joined");
    let last_be1 = got.iter().rposition(|s| s == "be1").unwrap();
    assert!(
        first_be23 > 0,
        "be1 served before the others joined: {got:?}"
    );
    assert!(
        last_be1 < got.len() - 10,
        "be1 kept getting requests after removal"
    );
    let tail = counts(&got[last_be1 + 1..]);
    assert!(
        tail.contains_key("be2") && tail.contains_key("be3"),
        "{tail:?}"
    );
}

fn write_config(b: &DrBench, services: &str) -> PathBuf {
    let path = b.bench.dir.join("xlb.toml");
    std::fs::write(&path, b.config(services)).unwrap();
    path
}

fn service(port: u16, sched: &str, servers: &[(&str, u32)]) -> String {
    let mut s = format!(
        "[[services]]\nname = \"web{port}\"\naddress = \"10.100.0.100:{port}\"\nscheduler = \"{sched}\"\n"
    );
    for (a, w) in servers {
        s += &format!("[[services.backends]]\naddress = \"{a}\"\nweight = {w}\n");
    }
    s
}

fn status(b: &DrBench) -> String {
    run(&[
        &xlb_bin().to_string_lossy(),
        "status",
        "--socket",
        &b.socket().to_string_lossy(),
    ])
    .unwrap()
}

/// InPkts of the service on port 80 (`ipvsadm -Ln --stats --exact`): the service's own
/// counter, which no server change resets.
fn in_packets(b: &DrBench) -> u64 {
    let out = ipvsadm(b, "-L -n --stats --exact");
    out.lines()
        .find(|l| l.starts_with("TCP  10.100.0.100:80 "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .nth(3)
        .unwrap()
        .parse()
        .unwrap()
}

/// Reloads (SIGHUP and `xlb reload`) under continuous traffic and with a long-lived
/// connection open: no request fails, the long connection keeps its server, counters keep
/// counting; a bad file is refused with its location and changes nothing.
#[test]
fn reload_under_traffic_keeps_flows_and_counters() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-reload", 3);
    let path = write_config(
        &b,
        &service(80, "rr", &[("10.100.0.11", 1), ("10.100.0.12", 1)]),
    );
    let config = std::fs::read_to_string(&path).unwrap();
    let pid = b.start_xlb(&xlb_bin(), &config).unwrap();
    let vip = vip80(&b);
    let long = Arc::new(Mutex::new(None::<KeepAlive>));
    let first = in_netns(&b.cli, {
        let long = long.clone();
        move || {
            let mut k = KeepAlive::connect(vip).unwrap();
            let who = k.get().unwrap();
            *long.lock().unwrap() = Some(k);
            who
        }
    })
    .unwrap();
    // rr's first pick is the server added last (IPVS list order); it stays configured.
    assert_eq!(first, "be2");
    let traffic = Traffic::start(&b, vip, 5000);
    std::thread::sleep(Duration::from_millis(500));
    let before = in_packets(&b);

    // SIGHUP: a third server, wrr weights, and a second service.
    let changed = service(
        80,
        "wrr",
        &[("10.100.0.11", 1), ("10.100.0.12", 2), ("10.100.0.13", 2)],
    ) + &service(8080, "rr", &[("10.100.0.13", 1)]);
    write_config(&b, &changed);
    run(&["kill", "-HUP", &pid.to_string()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ipvsadm(&b, "-Ln").contains("TCP  10.100.0.100:8080 rr") {
        assert!(Instant::now() < deadline, "SIGHUP reload did not apply");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(status(&b).contains("generation 2"), "{}", status(&b));
    std::thread::sleep(Duration::from_millis(700));
    let mid = in_packets(&b);
    assert!(
        mid > before,
        "counters went back or stopped: {before} → {mid}"
    );

    // A broken file: refused with file:line, the running configuration stays.
    std::fs::write(
        &path,
        b.config(&service(80, "nosuch", &[("10.100.0.11", 1)])),
    )
    .unwrap();
    let o = xlb_with_input(&["reload", "--socket", &b.socket().to_string_lossy()], "");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("xlb.toml:") && err.contains("nosuch"), "{err}");
    assert!(ipvsadm(&b, "-Ln").contains("TCP  10.100.0.100:8080 rr"));

    // `xlb reload`: the second service goes, be1 leaves.
    write_config(
        &b,
        &service(80, "wrr", &[("10.100.0.12", 1), ("10.100.0.13", 1)]),
    );
    let o = xlb_with_input(&["reload", "--socket", &b.socket().to_string_lossy()], "");
    assert!(o.status.success(), "{o:?}");
    std::thread::sleep(Duration::from_millis(700));
    let results = traffic.finish();
    let got = assert_no_failures(&results);
    let after = in_packets(&b);
    assert!(
        after > mid,
        "counters went back or stopped: {mid} → {after}"
    );
    let tail = counts(&got[got.len() - 20..]);
    assert!(!tail.contains_key("be1"), "{tail:?}");

    // The long-lived connection survived all of it on its server (be1 was removed from
    // scheduling, not from its established connection).
    let again = in_netns(&b.cli, move || long.lock().unwrap().as_mut().unwrap().get()).unwrap();
    assert_eq!(again.unwrap(), first);
}

/// Mounts a bpffs for the bench's pinned maps (one that outlives each daemon: the daemons
/// run under `ip netns exec`, whose own /sys/fs/bpf would go with them).
fn bench_bpffs(b: &DrBench) -> PathBuf {
    let dir = b.bench.dir.join("bpffs");
    std::fs::create_dir_all(&dir).unwrap();
    run(&["mount", "-t", "bpf", "bpf", &dir.to_string_lossy()]).unwrap();
    dir
}

/// A restart in the middle of long-lived connections: the new daemon takes the pinned maps
/// over and swaps its program in atomically (`--takeover`), and a daemon killed outright is
/// succeeded by one that adopts what it left; the connections keep their servers
/// throughout, and a clean stop detaches everything.
#[test]
fn restart_keeps_long_lived_connections() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-restart", 3);
    let pins = bench_bpffs(&b);
    let svc = service(
        80,
        "rr",
        &[("10.100.0.11", 1), ("10.100.0.12", 1), ("10.100.0.13", 1)],
    );
    let config = b.config(&svc).replace(
        "[control]\n",
        &format!("[control]\npin_dir = \"{}/xlb\"\n", pins.display()),
    );
    let pid1 = b.start_xlb(&xlb_bin(), &config).unwrap();
    let vip = vip80(&b);
    let conns = Arc::new(Mutex::new(Vec::<KeepAlive>::new()));
    let who: Vec<String> = in_netns(&b.cli, {
        let conns = conns.clone();
        move || {
            let mut out = Vec::new();
            for _ in 0..3 {
                let mut k = KeepAlive::connect(vip).unwrap();
                out.push(k.get().unwrap());
                conns.lock().unwrap().push(k);
            }
            out
        }
    })
    .unwrap();
    assert_eq!(counts(&who).len(), 3, "{who:?}");
    let ask_all = |conns: &Arc<Mutex<Vec<KeepAlive>>>| {
        let conns = conns.clone();
        in_netns(&b.cli, move || {
            conns
                .lock()
                .unwrap()
                .iter_mut()
                .map(|k| k.get().map_err(|e| format!("{e:#}")))
                .collect::<Vec<_>>()
        })
        .unwrap()
    };
    let traffic = Traffic::start(&b, vip, 5000);

    // Upgrade in place: a second daemon takes over from the first.
    let xlb = xlb_bin();
    let cfg_path = b.bench.dir.join("xlb.toml");
    let lb = b.lb.clone();
    let pid2 = b
        .bench
        .spawn(
            &lb,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--takeover",
                "--config",
                &cfg_path.to_string_lossy(),
            ],
            "xlb2.log",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.bench.running(pid1) {
        assert!(
            Instant::now() < deadline,
            "the first daemon did not hand over:\n{}",
            b.bench.log("xlb2.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    while !b.bench.log("xlb2.log").contains("admin API listening") {
        assert!(Instant::now() < deadline, "{}", b.bench.log("xlb2.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.bench
            .log("xlb2.log")
            .contains("adopted the previous daemon's data plane"),
        "{}",
        b.bench.log("xlb2.log")
    );
    let answers = ask_all(&conns);
    assert_eq!(
        answers,
        who.iter().map(|w| Ok(w.clone())).collect::<Vec<_>>(),
        "{}",
        b.bench.log("xlb2.log")
    );

    // Refused before anything is touched: a successor whose maps would differ (another
    // table size) does not even ask for the handover; another instance (its own socket)
    // pointed at these pins does not take them.
    let resized = b.bench.dir.join("resized.toml");
    std::fs::write(
        &resized,
        config.replace("conn_table_size = 65536", "conn_table_size = 131072"),
    )
    .unwrap();
    let e = b
        .bench
        .exec(
            &lb,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--takeover",
                "--config",
                &resized.to_string_lossy(),
            ],
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("cannot be adopted"), "{e:#}");
    let other = b.bench.dir.join("other.toml");
    std::fs::write(
        &other,
        config
            .replace("xlb.sock", "other.sock")
            .replace("eth0", "lo"),
    )
    .unwrap();
    let e = b
        .bench
        .exec(
            &lb,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--config",
                &other.to_string_lossy(),
            ],
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("no usable saved state"), "{e:#}");
    assert!(b.bench.running(pid2));
    assert_eq!(
        ask_all(&conns),
        who.iter().map(|w| Ok(w.clone())).collect::<Vec<_>>()
    );

    // A crash right after a change: the data plane keeps forwarding without its
    // controller, and the next daemon adopts exactly what the maps hold (the change
    // included, which the file then takes back: no trace of it stays in the maps).
    let v = b.vip4;
    ipvsadm(&b, &format!("-A -t {v}:8080 -s rr"));
    ipvsadm(&b, &format!("-a -t {v}:8080 -r 10.100.0.11:8080"));
    let vip8080 = SocketAddr::new(IpAddr::V4(v), 8080);
    assert_eq!(
        in_netns(&b.cli, move || http_get(vip8080))
            .unwrap()
            .unwrap(),
        "be1"
    );
    run(&["kill", "-KILL", &pid2.to_string()]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ask_all(&conns),
        who.iter().map(|w| Ok(w.clone())).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_file(b.socket());
    let pid3 = b
        .bench
        .spawn(
            &lb,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--config",
                &cfg_path.to_string_lossy(),
            ],
            "xlb3.log",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.bench.log("xlb3.log").contains("admin API listening") {
        assert!(Instant::now() < deadline, "{}", b.bench.log("xlb3.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.bench.log("xlb3.log").contains("adopted"),
        "{}",
        b.bench.log("xlb3.log")
    );
    assert!(!ipvsadm(&b, "-Ln").contains(":8080"));
    assert!(
        in_netns(&b.cli, move || http_get(vip8080))
            .unwrap()
            .is_err(),
        "the removed service still answers"
    );
    assert_eq!(
        ask_all(&conns),
        who.iter().map(|w| Ok(w.clone())).collect::<Vec<_>>()
    );
    // The adopted connection counts are intact: 3 active (the keep-alive ones) at least.
    let active: u64 = ipvsadm(&b, "-Ln")
        .lines()
        .filter(|l| l.starts_with("  -> 10."))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(active >= 3, "{}", ipvsadm(&b, "-Ln"));
    let results = traffic.finish();
    assert_no_failures(&results);

    // A clean stop detaches and removes the pins.
    b.bench
        .stop(pid3, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let link = run(&["ip", "-n", &b.lb, "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("xdp"), "{link}");
    assert!(
        std::fs::read_dir(pins.join("xlb")).map_or(true, |mut d| d.next().is_none()),
        "pins left behind"
    );
    run(&["umount", &pins.to_string_lossy()]).unwrap();
}

/// `/metrics` passes promtool's exposition checks and carries node_exporter's IPVS names
/// with the same figures ipvsadm shows, plus xlb's own.
#[test]
fn metrics_follow_node_exporter_and_pass_promtool() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-metrics", 2);
    let svc = service(80, "rr", &[("10.100.0.11", 1), ("10.100.0.12", 3)]);
    let config = b.config(&svc);
    b.start_xlb(&xlb_bin(), &config).unwrap();
    let vip = vip80(&b);
    in_netns(&b.cli, move || {
        for _ in 0..10 {
            http_get(vip).unwrap();
        }
    })
    .unwrap();
    let text = b.bench.scrape_metrics(&b.lb).unwrap();
    let check = b.bench.promtool_check("metrics.txt", &text);
    assert!(check.is_ok(), "promtool: {check:?}");
    let value = |prefix: &str| -> u64 { xlb_testbed::metric_value(&text, prefix) };
    assert_eq!(value("node_ipvs_connections_total "), 10);
    let labels = |rs: &str| {
        format!(
            "{{local_address=\"10.100.0.100\",local_port=\"80\",remote_address=\"{rs}\",remote_port=\"80\",proto=\"TCP\",local_mark=\"\"}}"
        )
    };
    assert_eq!(
        value(&format!(
            "node_ipvs_backend_weight{} ",
            labels("10.100.0.12")
        )),
        3
    );
    assert_eq!(
        value(&format!(
            "xlb_backend_connections_total{} ",
            labels("10.100.0.11")
        )),
        5
    );
    assert_eq!(
        value(&format!(
            "node_ipvs_backend_connections_inactive{} ",
            labels("10.100.0.11")
        )),
        5
    );
    assert!(value("xlb_packets_total{action=\"tx\",reason=\"\"} ") > 0);
    assert_eq!(
        value("xlb_connection_table_capacity{family=\"ipv4\"} "),
        65536
    );
    assert_eq!(value("xlb_connection_table_entries{family=\"ipv4\"} "), 10);
    assert_eq!(value("xlb_config_generation "), 1);
    assert!(text.contains("xlb_attached_info{interface=\"eth0\",mode=\"native\"} 1"));
    // The connection table as ipvsadm -c lists it: the 10 closed connections, each from
    // the client to the VIP and on to the server that answered.
    let conns = ipvsadm(&b, "-L -n -c");
    let mut lines = conns.lines();
    assert_eq!(lines.next(), Some("IPVS connection entries"));
    assert_eq!(
        lines.next(),
        Some("pro expire state       source             virtual            destination")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 10, "{conns}");
    for r in &rows {
        assert_eq!(r[0], "TCP", "{conns}");
        // mm:ss left of the TIME_WAIT/FIN_WAIT timeout (2 min at most)
        let (m, sec) = r[1].split_once(':').unwrap();
        assert!(
            m.parse::<u32>().unwrap() <= 2 && sec.parse::<u32>().unwrap() < 60,
            "{conns}"
        );
        assert!(
            ["TIME_WAIT", "FIN_WAIT", "CLOSE"].contains(&r[2]),
            "{conns}"
        );
        assert!(r[3].starts_with("10.100.0.1:"), "{conns}");
        assert_eq!(r[4], "10.100.0.100:80", "{conns}");
        assert!(
            ["10.100.0.11:80", "10.100.0.12:80"].contains(&r[5]),
            "{conns}"
        );
    }
    assert_eq!(
        ipvsadm(&b, "-L --timeout"),
        "Timeout (tcp tcpfin udp): 900 120 300\n"
    );
    ipvsadm(&b, "--set 600 0 60");
    assert_eq!(
        ipvsadm(&b, "-L --timeout"),
        "Timeout (tcp tcpfin udp): 600 120 60\n"
    );

    // -Z zeroes ipvsadm's figures, not the scraped counters.
    ipvsadm(&b, "-Z");
    let stats = ipvsadm(&b, "-L -n --stats");
    let line = stats
        .lines()
        .find(|l| l.starts_with("TCP  10.100.0.100:80 "))
        .unwrap();
    assert_eq!(
        line.split_whitespace().skip(2).collect::<Vec<_>>(),
        ["0"; 5],
        "{stats}"
    );
    let again = b.bench.scrape_metrics(&b.lb).unwrap();
    assert!(
        again.contains("\nnode_ipvs_connections_total 10\n"),
        "{again}"
    );
}

/// A keepalived.conf with several virtual servers runs as the configuration: the table is
/// what keepalived would have given IPVS, and traffic flows.
#[test]
fn keepalived_conf_runs_as_configuration() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xtctl-kad", 3);
    let conf = b.bench.dir.join("keepalived.conf");
    std::fs::write(
        &conf,
        r#"! Configuration File for keepalived
global_defs {
   router_id LVS_TEST
}

vrrp_instance VI_1 {
    state MASTER
    interface eth0
    virtual_router_id 51
    priority 100
    advert_int 1
    authentication {
        auth_type PASS
        auth_pass 1111
    }
    virtual_ipaddress {
        10.100.0.100
    }
}

virtual_server 10.100.0.100 80 {
    delay_loop 6
    lb_algo wrr
    lb_kind DR
    protocol TCP

    real_server 10.100.0.11 80 {
        weight 2
        TCP_CHECK {
            connect_timeout 3
        }
    }
    real_server 10.100.0.12 80 {
        weight 1
        HTTP_GET {
            url {
              path /
              status_code 200
            }
            connect_timeout 3
        }
    }
}

virtual_server 10.100.0.100 8080 {
    lb_algo rr
    lb_kind DR
    persistence_timeout 50
    protocol TCP
    real_server 10.100.0.13 8080 {
        weight 1
    }
}
"#,
    )
    .unwrap();
    let xlb = xlb_bin();
    let lb = b.lb.clone();
    let socket = b.socket();
    b.bench
        .spawn(
            &lb,
            &[
                &xlb.to_string_lossy(),
                "run",
                "--keepalived",
                &conf.to_string_lossy(),
                "--socket",
                &socket.to_string_lossy(),
            ],
            "xlb.log",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !b.bench.log("xlb.log").contains("admin API listening") {
        assert!(Instant::now() < deadline, "{}", b.bench.log("xlb.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The file's vrrp_instance runs: VI_1 (state MASTER, priority 100: not an owner) takes
    // the VIP after one master-down interval, having removed the one the bench put there
    // (as keepalived does at start).
    while !b.bench.log("xlb.log").contains("to=\"MASTER\"") {
        assert!(Instant::now() < deadline, "{}", b.bench.log("xlb.log"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        b.bench
            .log("xlb.log")
            .contains("removed a virtual address left over"),
        "{}",
        b.bench.log("xlb.log")
    );
    let status = run(&[
        &xlb_bin().to_string_lossy(),
        "status",
        "--socket",
        &b.socket().to_string_lossy(),
    ])
    .unwrap();
    assert!(
        status.contains("vrrp      VI_1 eth0 vrid 51 v2 MASTER prio 100/100"),
        "{status}"
    );
    let mut want = String::from(
        "IP Virtual Server version 1.2.1 (size=1048576)\n\
         Prot LocalAddress:Port Scheduler Flags\n  \
         -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n\
         TCP  10.100.0.100:80 wrr\n",
    );
    want += &server_line("10.100.0.11:80", "Route", 2, 0, 0);
    want += &server_line("10.100.0.12:80", "Route", 1, 0, 0);
    want += "TCP  10.100.0.100:8080 rr persistent 50\n";
    want += &server_line("10.100.0.13:8080", "Route", 1, 0, 0);
    assert_eq!(ipvsadm(&b, "-Ln"), want);
    let got = in_netns(&b.cli, {
        let vip = vip80(&b);
        move || (0..9).map(|_| http_get(vip).unwrap()).collect::<Vec<_>>()
    })
    .unwrap();
    let c = counts(&got);
    assert_eq!(
        (c.get("be1"), c.get("be2")),
        (Some(&6), Some(&3)),
        "{got:?}"
    );
    // The same file converts to an equivalent TOML configuration.
    let toml = run(&[
        &xlb.to_string_lossy(),
        "config",
        "convert",
        &conf.to_string_lossy(),
    ])
    .unwrap();
    assert!(toml.contains("interfaces = [\"eth0\"]"), "{toml}");
    assert!(toml.contains("address = \"10.100.0.100:8080\""), "{toml}");
    assert!(toml.contains("persistence = { timeout = 50"), "{toml}");
}
