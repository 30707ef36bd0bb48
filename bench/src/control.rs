//! Control-plane scale (`xlb-bench control`): how long a large configuration takes to load
//! and to reload with 10 % of it changed, how long a `/metrics` scrape and `xlb ipvsadm -Ln`
//! take at that size. Loads and reloads are measured in process (parse, validation, the
//! engine's map writes) and end to end (`xlb reload` against a running daemon); the scrape
//! and the listing against a running daemon, over its real socket and TCP listener.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use xlb::{
    config::{self, Limits},
    dataplane::Dataplane,
    engine::Engine,
    render,
};

/// One shape of configuration: `services` × `servers`, real servers drawn from `addrs`.
struct Shape {
    name: &'static str,
    services: usize,
    servers: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "1,000 services × 10 real servers",
        services: 1000,
        servers: 10,
    },
    Shape {
        name: "10 services × 1,000 real servers",
        services: 10,
        servers: 1000,
    },
];

const METRICS: &str = "127.0.0.1:9470";

fn limits() -> Limits {
    Limits {
        conn_table_size: 65536,
        conn_table_size_v6: 1024,
        max_services: 2048,
        max_backends: 32768,
        slot_table_size: 1 << 20,
        persistence_table_size: 1024,
        locality_table_size: 1024,
        nat_tables: false,
    }
}

/// Real server `j` of service `i`: services share a pool of on-link servers (a cluster
/// serving many VIPs), 10.3.0.0/16.
fn server(shape: &Shape, i: usize, j: usize) -> String {
    let n = if shape.servers >= 1000 {
        j
    } else {
        (i * shape.servers + j) % 1000
    };
    format!("10.3.{}.{}", n / 250, n % 250 + 1)
}

/// The configuration; `generation` > 0 changes 10 % of the services: weights of every
/// server of each 10th service, one server replaced in half of those, and the scheduler of
/// the others (for 10 services: 100 of the 1,000 servers of one service change weight).
fn config_text(shape: &Shape, socket: &Path, generation: usize) -> String {
    let mut t = format!(
        "[dataplane]\ninterfaces = [\"ctl0\"]\nxdp_mode = \"native\"\nconn_table_size = 65536\nconn_table_size_v6 = 1024\nmax_services = 2048\nmax_backends = 32768\nslot_table_size = 1048576\npersistence_table_size = 1024\nlocality_table_size = 1024\nnat = false\n\n[control]\nsocket = \"{}\"\nmetrics = \"{METRICS}\"\npin_dir = \"{}\"\n",
        socket.display(),
        socket.with_file_name("bpffs").join("xlb").display()
    );
    for i in 0..shape.services {
        let changed = generation > 0 && i % 10 == 0;
        let sched = if changed && i % 20 == 10 {
            "wrr"
        } else {
            "wlc"
        };
        t += &format!(
            "\n[[services]]\nname = \"s{i}\"\naddress = \"10.2.{}.{}:80\"\nscheduler = \"{sched}\"\n",
            i / 250,
            i % 250 + 1
        );
        for j in 0..shape.servers {
            let mut addr = server(shape, i, j);
            let mut weight = 1;
            if changed && i % 20 == 0 && j == 0 {
                addr = format!("10.3.250.{}", i % 250 + 1);
            }
            if changed || (generation > 0 && shape.services < 100 && j % 10 == 0) {
                weight = 2;
            }
            t += &format!("[[services.backends]]\naddress = \"{addr}\"\nweight = {weight}\n");
        }
    }
    t
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// In process: parse + validate + apply on a freshly loaded data plane, then the 10 %
/// change the same way.
fn in_process(shape: &Shape, socket: &Path) -> Result<(Duration, Duration)> {
    let mut dp = Dataplane::load(limits())?;
    let mut engine = Engine::new(&dp);
    let text = config_text(shape, socket, 0);
    let t = Instant::now();
    let c = config::parse(Path::new("bench.toml"), &text)?;
    render::validate_services(&c.services, &dp.limits).map_err(anyhow::Error::msg)?;
    engine.apply(&mut dp, &c.services)?;
    let load = t.elapsed();
    let text = config_text(shape, socket, 1);
    let t = Instant::now();
    let c2 = config::parse(Path::new("bench.toml"), &text)?;
    render::validate_services(&c2.services, &dp.limits).map_err(anyhow::Error::msg)?;
    engine.apply(&mut dp, &c2.services)?;
    let reload = t.elapsed();
    let changed = c
        .services
        .iter()
        .zip(&c2.services)
        .filter(|(a, b)| a != b)
        .count();
    ensure!(changed > 0, "the reload changed nothing");
    Ok((load, reload))
}

fn xlb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XLB_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("xlb")
}

struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `xlb run --config path` and waits until its admin socket answers.
    fn start(path: &Path, socket: &Path, log: &Path) -> Result<Daemon> {
        let child = Command::new(xlb_bin())
            .args(["run", "--config"])
            .arg(path)
            .env("XLB_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .context("starting xlb")?;
        let daemon = Daemon { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            ensure!(
                Instant::now() < deadline,
                "xlb did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn scrape() -> Result<usize> {
    let mut s = TcpStream::connect(METRICS)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    ensure!(body.starts_with(b"HTTP/1.1 200"), "scrape failed");
    Ok(body.len())
}

fn timed(cmd: &mut Command) -> Result<(Duration, Vec<u8>)> {
    let t = Instant::now();
    let o = cmd.output()?;
    let d = t.elapsed();
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok((d, o.stdout))
}

struct EndToEnd {
    start: Duration,
    reload: Duration,
    scrape_bytes: usize,
    scrape: Duration,
    list: Duration,
    change: Duration,
    state_bytes: usize,
}

/// End to end against a running daemon.
fn end_to_end(shape: &Shape, dir: &Path) -> Result<EndToEnd> {
    let socket = dir.join("xlb.sock");
    let path = dir.join("xlb.toml");
    std::fs::write(&path, config_text(shape, &socket, 0))?;
    let xlb = xlb_bin();
    let t = Instant::now();
    let _daemon = Daemon::start(&path, &socket, &dir.join("xlb.log"))?;
    let start = t.elapsed();
    let mut scrapes = Vec::new();
    let mut size = 0;
    for _ in 0..7 {
        let t = Instant::now();
        size = scrape()?;
        scrapes.push(t.elapsed());
    }
    let mut lists = Vec::new();
    for _ in 0..5 {
        let (d, out) = timed(
            Command::new(&xlb)
                .args(["ipvsadm", "--socket"])
                .arg(&socket)
                .arg("-Ln"),
        )?;
        ensure!(
            out.iter().filter(|b| **b == b'\n').count() >= shape.services * (shape.servers + 1),
            "the listing is short"
        );
        lists.push(d);
    }
    // One ipvsadm change at this size: the whole model is validated and the state saved
    // for a successor with every change.
    let mut changes = Vec::new();
    for k in 0..5 {
        let (d, _) = timed(
            Command::new(&xlb)
                .args(["ipvsadm", "--socket"])
                .arg(&socket)
                .args([
                    "-e",
                    "-t",
                    "10.2.0.1:80",
                    "-r",
                    &server(shape, 0, 0),
                    "-w",
                    &(k + 2).to_string(),
                ]),
        )?;
        changes.push(d);
    }
    let state = std::fs::metadata(dir.join("xlb.state"))?.len() as usize;
    std::fs::write(&path, config_text(shape, &socket, 1))?;
    let (reload, _) = timed(Command::new(&xlb).args(["reload", "--socket"]).arg(&socket))?;
    Ok(EndToEnd {
        start,
        reload,
        scrape_bytes: size,
        scrape: median(scrapes),
        list: median(lists),
        change: median(changes),
        state_bytes: state,
    })
}

/// Health checking at scale: `servers` real servers each with a TCP check every
/// `interval`, all aimed at local listeners (connect_ip 127.0.0.1), for `secs` seconds.
/// Returns (checks per second completed, the daemon's CPU use in cores).
fn health_scale(
    dir: &Path,
    servers: usize,
    checks: usize,
    interval: f64,
    secs: u64,
) -> Result<(f64, f64)> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            listener.set_nonblocking(true).ok();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let socket = dir.join("hc.sock");
    let mut t = format!(
        "[dataplane]\ninterfaces = [\"ctl0\"]\nxdp_mode = \"native\"\nconn_table_size = 65536\nconn_table_size_v6 = 1024\nmax_services = 64\nmax_backends = 32768\nnat = false\n\n[control]\nsocket = \"{}\"\nmetrics = \"off\"\npin_dir = \"{}\"\n\n[[services]]\nname = \"hc\"\naddress = \"10.2.0.1:80\"\nscheduler = \"rr\"\nhealth = {{ interval = {interval}, timeout = 1, warmup = {interval} }}\n",
        socket.display(),
        dir.join("bpffs").join("hc").display()
    );
    let check = format!("{{ type = \"tcp\", connect_ip = \"127.0.0.1\", connect_port = {port} }}");
    let checks = vec![check; checks].join(", ");
    for j in 0..servers {
        t += &format!(
            "[[services.backends]]\naddress = \"10.3.{}.{}\"\nchecks = [{checks}]\n",
            j / 250,
            j % 250 + 1
        );
    }
    let path = dir.join("hc.toml");
    std::fs::write(&path, t)?;
    let daemon = Daemon::start(&path, &socket, &dir.join("hc.log"))?;
    let pid = daemon.child.id();
    let cpu = || -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        Ok(ticks / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64)
    };
    // Past the warmup: every check is running.
    std::thread::sleep(Duration::from_secs_f64(1.5 + interval));
    let (a0, c0, t0) = (accepted.load(Ordering::Relaxed), cpu()?, Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (a1, c1, el) = (accepted.load(Ordering::Relaxed), cpu()?, t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();
    let per_s = (a1 - a0) as f64 / el.as_secs_f64();
    Ok((per_s, (c1 - c0) / el.as_secs_f64()))
}

/// Measures every shape and prints the table BENCHMARKS.md records.
pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("xlb-bench-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The daemon's interface, with the real servers on link (their resolution is asked for
    // and never answered; 1,000 addresses stay within the kernel's default neighbour-table
    // limit, gc_thresh3 = 1024).
    let sh = |s: &str| -> Result<()> {
        let st = Command::new("sh").arg("-c").arg(s).status()?;
        ensure!(st.success(), "{s} failed");
        Ok(())
    };
    // The daemon's pins go to a bpffs of the bench's own (not the host's /sys/fs/bpf).
    std::fs::create_dir_all(dir.join("bpffs"))?;
    sh(&format!("mount -t bpf bpf {}", dir.join("bpffs").display()))?;
    sh(
        "ip link add ctl0 type veth peer name ctl1 && ip link set ctl0 up && ip link set ctl1 up \
        && ip addr add 10.3.255.254/16 dev ctl0",
    )?;
    println!(
        "\n== control plane at scale (targets: load and 10 % reload < 1 s, /metrics < 100 ms, ipvsadm -Ln < 200 ms)"
    );
    println!(
        "{:<34} {:>10} {:>11} {:>10} {:>11} {:>9} {:>12} {:>11} {:>9} {:>9}",
        "configuration",
        "load",
        "reload 10%",
        "xlb start",
        "xlb reload",
        "/metrics",
        "ipvsadm -Ln",
        "ipvsadm -e",
        "scrape",
        "state"
    );
    for shape in &SHAPES {
        let (load, reload) = in_process(shape, &dir.join("unused.sock"))?;
        let e = end_to_end(shape, &dir)?;
        println!(
            "{:<34} {:>10} {:>11} {:>10} {:>11} {:>9} {:>12} {:>11} {:>5} KiB {:>5} KiB",
            shape.name,
            ms(load),
            ms(reload),
            ms(e.start),
            ms(e.reload),
            ms(e.scrape),
            ms(e.list),
            ms(e.change),
            e.scrape_bytes / 1024,
            e.state_bytes / 1024
        );
    }
    println!(
        "load / reload 10%: parse + validation + the engine's map writes, in process; xlb start: \
         process start to the admin API answering (program load and verification included); \
         xlb reload: the CLI command against the daemon, file re-read included; /metrics, \
         ipvsadm -Ln and one ipvsadm -e: medians of 7, 5 and 5 runs against the daemon (the CLI \
         process start included); state: what a daemon saves for its successor."
    );
    println!(
        "\n== health checks at scale (target: 10,000 TCP checks/s with the daemon under half a core)"
    );
    println!("{:<44} {:>14} {:>14}", "checks", "checks/s", "daemon CPU");
    for (servers, checks, interval) in [(1000usize, 1usize, 0.09f64), (1000, 2, 0.18)] {
        let (per_s, cores) = health_scale(&dir, servers, checks, interval, 10)?;
        println!(
            "{:<44} {:>14.0} {:>9.2} cores",
            format!(
                "{servers} servers × {checks} TCP check(s) every {} ms",
                (interval * 1e3) as u64
            ),
            per_s,
            cores
        );
    }
    println!(
        "checks/s: connections the local listener accepted over 10 s; daemon CPU: its user + system time over the same 10 s."
    );
    let _ = Command::new("ip").args(["link", "del", "ctl0"]).status();
    let _ = Command::new("umount").arg(dir.join("bpffs")).status();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
