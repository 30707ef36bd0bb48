//! End to end: health checks against real servers in namespaces. A real server whose HTTP
//! service stops leaves scheduling (or stays with weight 0 under inhibit_on_failure) and
//! comes back when it recovers; a server that accepts but never answers fails by timeout;
//! HTTPS against a self-signed certificate; MISC_CHECK exit codes set weights; the sorry
//! server takes over when all are down, and the quorum programs run.

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use xlb_tests::{
    counts, ipvsadm, require_root,
    testbed::{DrBench, http_get, in_netns, run},
    xlb_bin,
};

/// The benches share two CPUs; one at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

fn health(b: &DrBench) -> String {
    run(&[
        &xlb_bin().to_string_lossy(),
        "health",
        "--socket",
        &b.socket().to_string_lossy(),
    ])
    .unwrap()
}

/// The server line of `addr` in `ipvsadm -Ln`, split in columns (None: not listed).
fn server_row(b: &DrBench, addr: &str) -> Option<Vec<String>> {
    ipvsadm(b, "-Ln")
        .lines()
        .find(|l| l.starts_with(&format!("  -> {addr} ")))
        .map(|l| l.split_whitespace().map(String::from).collect())
}

/// Waits (up to `limit`) until `f` holds; returns how long it took.
fn wait_for(limit: Duration, what: &str, b: &DrBench, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "{what} within {limit:?}\n{}\n{}",
            ipvsadm(b, "-Ln"),
            health(b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn nginx_dir(b: &DrBench, i: usize) -> std::path::PathBuf {
    b.bench.dir.join(format!("nginx-be{i}"))
}

fn stop_nginx(b: &DrBench, i: usize) {
    let pid = std::fs::read_to_string(nginx_dir(b, i).join("nginx.pid")).unwrap();
    run(&["kill", "-TERM", pid.trim()]).unwrap();
    let port80 = SocketAddr::new(IpAddr::V4(b.servers[i - 1].v4), 80);
    let ns = b.servers[i - 1].ns.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_netns(&ns, move || http_get(port80).is_ok()).unwrap() {
        assert!(Instant::now() < deadline, "nginx on be{i} did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_nginx(b: &mut DrBench, i: usize, log: &str) {
    let dir = nginx_dir(b, i);
    let ns = b.servers[i - 1].ns.clone();
    b.bench
        .spawn(
            &ns,
            &[
                "nginx",
                "-e",
                &dir.join("error.log").to_string_lossy(),
                "-p",
                &dir.to_string_lossy(),
                "-c",
                &dir.join("nginx.conf").to_string_lossy(),
            ],
            log,
        )
        .unwrap();
}

fn bench(prefix: &str, n: usize) -> DrBench {
    let mut b = DrBench::new(prefix, n, &xlb_bin()).unwrap();
    b.start_http().unwrap();
    b
}

/// Fast timing for tests: a check every second, 1 s timeout, one retry half a second later.
const FAST: &str =
    "health = { interval = 1, timeout = 1, retry = 1, delay_before_retry = 0.5, warmup = 0.2 }";

fn requests(b: &DrBench, n: usize) -> Vec<String> {
    let vip = SocketAddr::new(IpAddr::V4(b.vip4), 80);
    in_netns(&b.cli, move || {
        (0..n)
            .map(|i| http_get(vip).unwrap_or_else(|e| panic!("request {i}: {e:#}")))
            .collect::<Vec<_>>()
    })
    .unwrap()
}

/// HTTP_GET-style checks: a stopped server leaves scheduling within
/// (retry + 1) × (interval + timeout) - removed, or at weight 0 with inhibit_on_failure -
/// and returns with its weight once it answers again. The API and /metrics show it.
#[test]
fn failed_server_leaves_and_returns() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xthc-http", 3);
    let notified = b.bench.dir.join("notified.log");
    let svc = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nscheduler = \"rr\"\n{FAST}\n\
         [[services.backends]]\naddress = \"10.100.0.11\"\nweight = 2\ninhibit_on_failure = true\nchecks = [{{ type = \"http\", path = \"/\", status = [200] }}]\n\
         [[services.backends]]\naddress = \"10.100.0.12\"\nchecks = [{{ type = \"http\", path = \"/\" }}, {{ type = \"tcp\" }}]\n\
         notify_down = \"/bin/sh -c 'echo down $0 >> {n}' %h\"\nnotify_up = \"/bin/sh -c 'echo up $0 >> {n}' %h\"\n\
         [[services.backends]]\naddress = \"10.100.0.13\"\nchecks = [{{ type = \"tcp\" }}]\n",
        b.vip4,
        n = notified.display()
    );
    let config = b.config(&svc);
    b.start_xlb(&xlb_bin(), &config).unwrap();
    // Every check has run and passed.
    wait_for(Duration::from_secs(10), "all checks passing", &b, || {
        let h = health(&b);
        h.matches("ok in").count() == 4 && !h.contains("DOWN")
    });
    // The bound: retry × (interval + timeout) = 1 × (1 s + 1 s); keepalived's own
    // worst case here is the wait for the next check (1 s), the retry delay (0.5 s) and two
    // refused attempts; half a second more for polling and the 50 ms health tick.
    let bound = Duration::from_secs_f64(1.0 * (1.0 + 1.0));
    let limit = bound + Duration::from_millis(500);

    // be1 (inhibit_on_failure): stays listed with weight 0.
    stop_nginx(&b, 1);
    let took = wait_for(limit, "be1 at weight 0", &b, || {
        server_row(&b, "10.100.0.11:80").is_some_and(|r| r[3] == "0")
    });
    eprintln!("be1 inhibited after {took:?} (bound {bound:?})");
    // be2: removed.
    stop_nginx(&b, 2);
    wait_for(limit, "be2 removed", &b, || {
        server_row(&b, "10.100.0.12:80").is_none()
    });
    let h = health(&b);
    assert!(h.contains("10.100.0.12:80 DOWN"), "{h}");
    assert!(
        h.contains("connection refused") || h.contains("refused"),
        "{h}"
    );
    let got = requests(&b, 12);
    assert_eq!(counts(&got).get("be3"), Some(&12), "{got:?}");

    // Metrics show it.
    let metrics = b.bench.scrape_metrics(&b.lb).unwrap();
    assert!(
        metrics.contains("xlb_backend_up{local_address=\"10.100.0.100\",local_port=\"80\",remote_address=\"10.100.0.12\",remote_port=\"80\",proto=\"TCP\"} 0"),
        "{metrics}"
    );
    // ... in a valid exposition (the health families included).
    let check = b.bench.promtool_check("metrics.txt", &metrics);
    assert!(check.is_ok(), "promtool: {check:?}");

    // Back: at their configured weights.
    start_nginx(&mut b, 1, "nginx-be1b.log");
    start_nginx(&mut b, 2, "nginx-be2b.log");
    wait_for(Duration::from_secs(8), "be1 and be2 back", &b, || {
        server_row(&b, "10.100.0.11:80").is_some_and(|r| r[3] == "2")
            && server_row(&b, "10.100.0.12:80").is_some_and(|r| r[3] == "1")
    });
    let got = requests(&b, 12);
    assert_eq!(counts(&got).len(), 3, "{got:?}");
    // be2's notify programs ran, in order, with its address.
    wait_for(Duration::from_secs(5), "notify programs", &b, || {
        std::fs::read_to_string(&notified).is_ok_and(|s| s == "down 10.100.0.12\nup 10.100.0.12\n")
    });
}

/// A server that accepts connections but never answers fails its HTTP check by timeout.
#[test]
fn slow_server_fails_by_timeout() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xthc-slow", 2);
    // be2's port 9000 accepts and then says nothing.
    let ns = b.servers[1].ns.clone();
    let listener = in_netns(&ns, || TcpListener::bind("0.0.0.0:9000").unwrap()).unwrap();
    let silent = std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok((s, _)) = listener.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let svc = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nscheduler = \"rr\"\n{FAST}\n\
         [[services.backends]]\naddress = \"10.100.0.11\"\nchecks = [{{ type = \"http\", path = \"/\" }}]\n\
         [[services.backends]]\naddress = \"10.100.0.12\"\nchecks = [{{ type = \"http\", path = \"/\", connect_port = 9000 }}]\n",
        b.vip4
    );
    let config = b.config(&svc);
    b.start_xlb(&xlb_bin(), &config).unwrap();
    wait_for(Duration::from_secs(10), "be2 removed", &b, || {
        server_row(&b, "10.100.0.12:80").is_none()
    });
    let h = health(&b);
    assert!(
        h.contains("10.100.0.12:80 DOWN") && h.contains("timed out"),
        "{h}"
    );
    assert!(h.contains("10.100.0.11:80 UP"), "{h}");
    drop(silent);
}

/// HTTPS against a real TLS server (nginx) with a self-signed certificate.
#[test]
fn https_check_against_self_signed_server() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut b = bench("xthc-tls", 2);
    let dir = b.bench.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=be1.example",
        "-keyout",
        &dir.join("key.pem").to_string_lossy(),
        "-out",
        &dir.join("cert.pem").to_string_lossy(),
    ])
    .unwrap();
    let conf = dir.join("nginx.conf");
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 64; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n server {{\n  listen 443 ssl;\n  ssl_certificate {d}/cert.pem;\n  ssl_certificate_key {d}/key.pem;\n  location / {{ default_type text/plain; return 200 \"secure\\n\"; }}\n  location /missing {{ return 404; }}\n }}\n}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let ns = b.servers[0].ns.clone();
    b.bench
        .spawn(
            &ns,
            &[
                "nginx",
                "-e",
                &dir.join("error.log").to_string_lossy(),
                "-p",
                &dir.to_string_lossy(),
                "-c",
                &conf.to_string_lossy(),
            ],
            "nginx-tls.log",
        )
        .unwrap();
    // be1: HTTPS on 443 (body "secure\n", digest checked, SNI sent); be2: an HTTPS check
    // of a server without TLS on 443 (refused) - and be1 with a path that answers 404 is
    // checked apart below.
    let digest = {
        let out = run(&["sh", "-c", "printf 'secure\\n' | md5sum"]).unwrap();
        out.split_whitespace().next().unwrap().to_string()
    };
    let svc = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nscheduler = \"rr\"\n{FAST}\n\
         [[services.backends]]\naddress = \"10.100.0.11\"\nchecks = [{{ type = \"https\", connect_port = 443, path = \"/\", digest = \"{digest}\", sni = \"be1.example\" }}]\n\
         [[services.backends]]\naddress = \"10.100.0.12\"\nchecks = [{{ type = \"https\", connect_port = 443, path = \"/\" }}]\n",
        b.vip4
    );
    let config = b.config(&svc);
    b.start_xlb(&xlb_bin(), &config).unwrap();
    wait_for(
        Duration::from_secs(10),
        "be2 (no TLS server) removed",
        &b,
        || server_row(&b, "10.100.0.12:80").is_none(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let h = health(&b);
    assert!(h.contains("10.100.0.11:80 UP"), "{h}");
    assert!(h.matches("ok in").count() >= 1, "{h}");
    assert!(server_row(&b, "10.100.0.11:80").is_some());
    // A reload points be1's check at a path that answers 404: down, with the status said.
    std::fs::write(
        b.bench.dir.join("xlb.toml"),
        config.replace("path = \"/\", digest", "path = \"/missing\", digest"),
    )
    .unwrap();
    run(&[
        &xlb_bin().to_string_lossy(),
        "reload",
        "--socket",
        &b.socket().to_string_lossy(),
    ])
    .unwrap();
    wait_for(Duration::from_secs(10), "be1 down on 404", &b, || {
        server_row(&b, "10.100.0.11:80").is_none()
    });
    let h = health(&b);
    assert!(h.contains("status 404"), "{h}");
}

/// MISC_CHECK with misc_dynamic: the exit status sets the weight (2..255 → status - 2),
/// 1 takes the server down; the sorry server takes over when no server is usable, and the
/// quorum programs run.
#[test]
fn misc_dynamic_weights_sorry_server_and_quorum() {
    require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = bench("xthc-misc", 3);
    let dir = b.bench.dir.clone();
    let status = |i: usize| dir.join(format!("status{i}"));
    std::fs::write(status(1), "0").unwrap();
    std::fs::write(status(2), "0").unwrap();
    let check = |i: usize| {
        format!(
            "{{ type = \"misc\", command = \"/bin/sh -c 'exit $(cat {})'\", dynamic = true }}",
            status(i).display()
        )
    };
    let quorum_log = dir.join("quorum.log");
    let svc = format!(
        "[[services]]\nname = \"web\"\naddress = \"{}:80\"\nscheduler = \"wrr\"\n{FAST}\n\
         sorry_server = \"10.100.0.13\"\nquorum = 2\n\
         quorum_down = \"/bin/sh -c 'echo down >> {q}'\"\nquorum_up = \"/bin/sh -c 'echo up >> {q}'\"\n\
         [[services.backends]]\naddress = \"10.100.0.11\"\nweight = 1\nchecks = [{}]\n\
         [[services.backends]]\naddress = \"10.100.0.12\"\nweight = 1\nchecks = [{}]\n",
        b.vip4,
        check(1),
        check(2),
        q = quorum_log.display()
    );
    let mut b = b;
    let config = b.config(&svc);
    b.start_xlb(&xlb_bin(), &config).unwrap();
    wait_for(Duration::from_secs(10), "checks passing", &b, || {
        health(&b).matches("ok in").count() == 2
    });
    // Exit 7: weight 5.
    std::fs::write(status(1), "7").unwrap();
    wait_for(Duration::from_secs(6), "be1 weight 5", &b, || {
        server_row(&b, "10.100.0.11:80").is_some_and(|r| r[3] == "5")
    });
    // Exit 1: down (removed).
    std::fs::write(status(2), "1").unwrap();
    wait_for(Duration::from_secs(6), "be2 removed", &b, || {
        server_row(&b, "10.100.0.12:80").is_none()
    });
    // Both down: below the quorum; the sorry server (be3) takes the new connections and
    // quorum_down ran.
    std::fs::write(status(1), "1").unwrap();
    wait_for(Duration::from_secs(6), "the sorry server in", &b, || {
        server_row(&b, "10.100.0.13:80").is_some_and(|r| r[3] == "1")
    });
    let got = requests(&b, 5);
    assert_eq!(counts(&got).get("be3"), Some(&5), "{got:?}");
    wait_for(Duration::from_secs(5), "quorum_down ran", &b, || {
        std::fs::read_to_string(&quorum_log).is_ok_and(|s| s.contains("down"))
    });
    // Recovery: the sorry server leaves, quorum_up runs.
    std::fs::write(status(1), "0").unwrap();
    std::fs::write(status(2), "0").unwrap();
    wait_for(
        Duration::from_secs(8),
        "servers back, sorry server out",
        &b,
        || {
            server_row(&b, "10.100.0.13:80").is_none()
                && server_row(&b, "10.100.0.11:80").is_some_and(|r| r[3] == "1")
                && server_row(&b, "10.100.0.12:80").is_some()
        },
    );
    wait_for(Duration::from_secs(5), "quorum_up ran", &b, || {
        std::fs::read_to_string(&quorum_log).is_ok_and(|s| s.contains("up"))
    });
    let _ = Path::new("");
}
