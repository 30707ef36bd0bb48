//! Network-namespace test benches: namespaces, veths and a bridge, real HTTP servers (nginx)
//! on real servers, and a client, all confined to namespaces the bench creates and removes
//! (also when a test fails: cleanup runs in `Drop`, and leftovers of a killed run with the same
//! prefix are removed first).
//!
//! Used by the end-to-end tests and by `cargo xtask demo`, so both exercise the same topology.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

/// Namespaces, processes and a scratch directory that disappear together.
pub struct Bench {
    pub prefix: String,
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
}

/// The value of the first sample of a scrape whose line starts with `prefix` (name and
/// labels); panics, showing the scrape, if there is none.
pub fn metric_value<T: std::str::FromStr>(text: &str, prefix: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs a command to completion (bounded by `timeout`), failing with its stderr.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .arg("-s")
        .arg("KILL")
        .arg("30")
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &str) -> Result<String> {
    let argv: Vec<&str> = std::iter::once("ip")
        .chain(args.split_whitespace())
        .collect();
    run(&argv)
}

/// Removes namespaces named `<prefix>-*` and the processes in them.
pub fn cleanup_prefix(prefix: &str) {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if name.starts_with(&format!("{prefix}-")) {
            kill_netns_processes(name);
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

fn kill_netns_processes(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Bench {
    pub fn new(prefix: &str) -> Result<Bench> {
        cleanup_prefix(prefix);
        let dir = std::env::temp_dir().join(format!("xlb-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Bench {
            prefix: prefix.to_string(),
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
        })
    }

    /// Creates namespace `<prefix>-<short>` with its loopback up.
    pub fn netns(&mut self, short: &str) -> Result<String> {
        let name = format!("{}-{short}", self.prefix);
        ip(&format!("netns add {name}"))?;
        self.namespaces.push(name.clone());
        ip(&format!("-n {name} link set lo up"))?;
        // Fresh interfaces: no duplicate address detection, so IPv6 (link-local addresses and
        // neighbour discovery included) works at once instead of after a second or two.
        self.sh(
            &name,
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        )?;
        Ok(name)
    }

    /// Runs `argv` inside namespace `ns`.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", ns];
        v.extend_from_slice(argv);
        run(&v)
    }

    /// xlb's `/metrics` as scraped inside namespace `ns` (the default listener).
    pub fn scrape_metrics(&self, ns: &str) -> Result<String> {
        self.exec(
            ns,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9469/metrics",
            ],
        )
    }

    /// Checks a scrape with `promtool check metrics` (kept as `<dir>/<name>`); the error
    /// carries promtool's output.
    pub fn promtool_check(&self, name: &str, text: &str) -> Result<()> {
        let file = self.dir.join(name);
        std::fs::write(&file, text)?;
        run(&[
            "sh",
            "-c",
            &format!("promtool check metrics < {}", file.display()),
        ])
        .map(|_| ())
    }

    /// Runs a shell snippet inside namespace `ns`.
    pub fn sh(&self, ns: &str, script: &str) -> Result<String> {
        self.exec(ns, &["sh", "-c", script])
    }

    /// Starts a long-running process in `ns`; its output goes to `<dir>/<log>`.
    pub fn spawn(&mut self, ns: &str, argv: &[&str], log: &str) -> Result<u32> {
        let logf = File::create(self.dir.join(log))?;
        let mut cmd = Command::new("ip");
        // The caller may block SIGINT/SIGTERM to handle them on a thread (the demo does);
        // the started process must not inherit that, or it could not be stopped.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::signal::SigSet::all()
                    .thread_unblock()
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {argv:?} in {ns}"))?;
        let pid = child.id();
        self.children.push((log.to_string(), child));
        Ok(pid)
    }

    /// Sends `sig` to a process started with [`Bench::spawn`] and waits (up to 10 s) for it
    /// to exit; returns its exit status.
    pub fn stop(
        &mut self,
        pid: u32,
        sig: nix::sys::signal::Signal,
    ) -> Result<std::process::ExitStatus> {
        let i = self
            .children
            .iter()
            .position(|(_, c)| c.id() == pid)
            .ok_or_else(|| anyhow!("no process {pid}"))?;
        let (_, mut child) = self.children.remove(i);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("process {pid} did not exit after {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether a spawned process is still running.
    pub fn running(&mut self, pid: u32) -> bool {
        self.children
            .iter_mut()
            .find(|(_, c)| c.id() == pid)
            .map(|(_, c)| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn cleanup(&mut self) {
        for (_, c) in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for (_, c) in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for ns in self.namespaces.drain(..).rev() {
            kill_netns_processes(&ns);
            let _ = run(&["ip", "netns", "del", &ns]);
        }
        if std::env::var_os("XLB_KEEP_BENCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in {ns} panicked"))?
}

/// A real server of the bench.
#[derive(Clone, Debug)]
pub struct RealServer {
    pub name: String,
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

/// Client, balancer and real servers on one L2 segment (a bridge in its own namespace): the
/// direct-routing topology. The VIP is on the balancer's interface (it answers ARP/ND for it)
/// and on each real server's loopback, with `arp_ignore=1`/`arp_announce=2` so only the
/// balancer answers.
pub struct DrBench {
    pub bench: Bench,
    pub sw: String,
    pub cli: String,
    pub lb: String,
    pub servers: Vec<RealServer>,
    pub vip4: Ipv4Addr,
    pub vip6: Ipv6Addr,
    pub client4: Ipv4Addr,
    pub client6: Ipv6Addr,
}

pub const LB_IF: &str = "eth0";

impl DrBench {
    /// Builds the topology with `n` real servers. `xlb` is the binary used to put the
    /// pass-through XDP program on the balancer's bridge port (veth delivers XDP_TX frames
    /// only into a peer running XDP).
    pub fn new(prefix: &str, n: usize, xlb: &Path) -> Result<DrBench> {
        let mut bench = Bench::new(prefix)?;
        let sw = bench.netns("sw")?;
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        let port = |bench: &mut Bench, short: &str, v4: &str, v6: &str| -> Result<String> {
            let ns = bench.netns(short)?;
            ip(&format!(
                "link add eth0 netns {ns} type veth peer name p-{short} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set p-{short} master br0 up"))?;
            ip(&format!("-n {ns} addr add {v4}/24 dev eth0"))?;
            ip(&format!("-n {ns} addr add {v6}/64 dev eth0 nodad"))?;
            ip(&format!("-n {ns} link set eth0 up"))?;
            Ok(ns)
        };
        let vip4: Ipv4Addr = "10.100.0.100".parse()?;
        let vip6: Ipv6Addr = "fd00:100::100".parse()?;
        let client4: Ipv4Addr = "10.100.0.1".parse()?;
        let client6: Ipv6Addr = "fd00:100::1".parse()?;
        let cli = port(&mut bench, "cli", "10.100.0.1", "fd00:100::1")?;
        // Checksum offload is lost when XDP forwards a veth frame: clients must send
        // complete checksums or the real servers drop the segments.
        bench.exec(&cli, &["ethtool", "-K", "eth0", "tx", "off"])?;
        let lb = port(&mut bench, "lb", "10.100.0.2", "fd00:100::2")?;
        ip(&format!("-n {lb} addr add {vip4}/32 dev eth0"))?;
        ip(&format!("-n {lb} addr add {vip6}/128 dev eth0 nodad"))?;
        bench.exec(&sw, &[&xlb.to_string_lossy(), "util", "xdp-pass", "p-lb"])?;
        let mut servers = Vec::new();
        for i in 1..=n {
            let name = format!("be{i}");
            let v4: Ipv4Addr = format!("10.100.0.{}", 10 + i).parse()?;
            let v6: Ipv6Addr = format!("fd00:100::{}", 10 + i).parse()?;
            let ns = port(&mut bench, &name, &v4.to_string(), &v6.to_string())?;
            ip(&format!("-n {ns} addr add {vip4}/32 dev lo"))?;
            ip(&format!("-n {ns} addr add {vip6}/128 dev lo nodad"))?;
            bench.sh(
                &ns,
                "sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
                 net.ipv4.conf.eth0.arp_ignore=1 net.ipv4.conf.eth0.arp_announce=2",
            )?;
            servers.push(RealServer { name, ns, v4, v6 });
        }
        Ok(DrBench {
            bench,
            sw,
            cli,
            lb,
            servers,
            vip4,
            vip6,
            client4,
            client6,
        })
    }

    /// Starts nginx on every real server (see [`start_nginx`]).
    pub fn start_http(&mut self) -> Result<()> {
        start_nginx(&mut self.bench, &self.servers)
    }

    /// A configuration for the balancer with `services` (TOML `[[services]]` text).
    pub fn config(&self, services: &str) -> String {
        balancer_config(&[LB_IF], &self.socket(), services)
    }

    pub fn socket(&self) -> PathBuf {
        self.bench.dir.join("xlb.sock")
    }

    /// Starts `xlb run` in the balancer namespace with `config` and waits until its admin API
    /// answers. Returns the daemon's pid.
    pub fn start_xlb(&mut self, xlb: &Path, config: &str) -> Result<u32> {
        let (lb, socket) = (self.lb.clone(), self.socket());
        start_xlb_in(&mut self.bench, &lb, xlb, config, &socket)
    }
}

/// A bench balancer's configuration: attached natively to `interfaces`, small tables, the
/// admin API on `socket`, then `services` (TOML `[[services]]` text).
fn balancer_config(interfaces: &[&str], socket: &Path, services: &str) -> String {
    let interfaces: Vec<String> = interfaces.iter().map(|i| format!("\"{i}\"")).collect();
    format!(
        "[dataplane]\ninterfaces = [{}]\nxdp_mode = \"native\"\nconn_table_size = 65536\nconn_table_size_v6 = 65536\nmax_services = 64\nmax_backends = 256\nslot_table_size = 65536\n\n[control]\nsocket = \"{}\"\n\n{services}",
        interfaces.join(", "),
        socket.display()
    )
}

/// Starts `xlb run` in namespace `ns` with `config` and waits until its admin API (at
/// `socket`) answers. Returns the daemon's pid.
pub fn start_xlb_in(
    bench: &mut Bench,
    ns: &str,
    xlb: &Path,
    config: &str,
    socket: &Path,
) -> Result<u32> {
    let path = bench.dir.join("xlb.toml");
    std::fs::write(&path, config)?;
    let pid = bench.spawn(
        ns,
        &[
            &xlb.to_string_lossy(),
            "run",
            "--config",
            &path.to_string_lossy(),
        ],
        "xlb.log",
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if run(&[
            &xlb.to_string_lossy(),
            "list",
            "--socket",
            &socket.to_string_lossy(),
        ])
        .is_ok()
        {
            return Ok(pid);
        }
        if !bench.running(pid) || Instant::now() > deadline {
            bail!("xlb did not start:\n{}", bench.log("xlb.log"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Path of the files every real server's nginx serves under `/files/`.
pub fn files_dir(bench: &Bench) -> PathBuf {
    bench.dir.join("files")
}

/// Starts nginx on every real server, answering `GET /` (and any other method) with the
/// server's name on ports 80, 8080 and 8443 (IPv4 and IPv6; multi-port services use the
/// others), and serving [`files_dir`] under `/files/`.
pub fn start_nginx(bench: &mut Bench, servers: &[RealServer]) -> Result<()> {
    let files = files_dir(bench);
    std::fs::create_dir_all(&files)?;
    for s in servers {
        let dir = bench.dir.join(format!("nginx-{}", s.name));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf = format!(
            r#"worker_processes 1;
daemon off;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    client_max_body_size 16m;
    server {{
        listen 80 reuseport;
        listen [::]:80 reuseport;
        listen 8080 reuseport;
        listen [::]:8080 reuseport;
        listen 8443 reuseport;
        listen [::]:8443 reuseport;
        location / {{ default_type text/plain; return 200 "{name}\n"; }}
        location /files/ {{ alias {files}/; }}
    }}
}}
"#,
            d = dir.display(),
            name = s.name,
            files = files.display(),
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        bench.spawn(
            &s.ns,
            &[
                "nginx",
                "-e",
                &dir.join("error.log").to_string_lossy(),
                "-p",
                &dir.to_string_lossy(),
                "-c",
                &path.to_string_lossy(),
            ],
            &format!("nginx-{}.log", s.name),
        )?;
    }
    // Wait until each answers locally.
    for s in servers {
        let addr = SocketAddr::new(IpAddr::V4(s.v4), 80);
        let ns = s.ns.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = in_netns(&ns, move || http_get(addr).is_ok())?;
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx on {} did not start: {}",
                    s.name,
                    bench.log(&format!("nginx-{}.log", s.name))
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The seeds' NAT topology: the client on the public side of the balancer, the real servers
/// on a private segment (a bridge) behind it, with the balancer as their default gateway.
/// The VIPs are the balancer's own addresses on its public interface; xlb is attached to both
/// interfaces (requests come in on one, replies on the other).
pub struct NatBench {
    pub bench: Bench,
    pub sw: String,
    pub cli: String,
    pub lb: String,
    pub servers: Vec<RealServer>,
    pub vip4: Ipv4Addr,
    pub vip6: Ipv6Addr,
    pub client4: Ipv4Addr,
    pub client6: Ipv6Addr,
}

/// The NAT balancer's interfaces.
pub const NAT_PUBLIC_IF: &str = "pub0";
pub const NAT_PRIVATE_IF: &str = "priv0";

impl NatBench {
    pub fn new(prefix: &str, n: usize, xlb: &Path) -> Result<NatBench> {
        Self::build(prefix, n, xlb, None)
    }

    /// As [`NatBench::new`], with the client behind a router (namespace `rtr`) whose link
    /// toward the client has MTU `mtu`: replies larger than that make the router send ICMP
    /// "too big" to the VIP.
    pub fn with_router(prefix: &str, n: usize, xlb: &Path, mtu: u32) -> Result<NatBench> {
        Self::build(prefix, n, xlb, Some(mtu))
    }

    fn build(prefix: &str, n: usize, xlb: &Path, router_mtu: Option<u32>) -> Result<NatBench> {
        let mut bench = Bench::new(prefix)?;
        let xlb = xlb.to_string_lossy().to_string();
        let sw = bench.netns("sw")?;
        let cli = bench.netns("cli")?;
        let lb = bench.netns("lb")?;
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        // The balancer's public side: the client itself, or the router.
        let public_peer = match router_mtu {
            None => {
                ip(&format!(
                    "link add eth0 netns {cli} type veth peer name {NAT_PUBLIC_IF} netns {lb}"
                ))?;
                (cli.clone(), "eth0")
            }
            Some(mtu) => {
                let rtr = bench.netns("rtr")?;
                ip(&format!(
                    "link add eth0 netns {cli} type veth peer name r-cli netns {rtr}"
                ))?;
                ip(&format!(
                    "link add r-lb netns {rtr} type veth peer name {NAT_PUBLIC_IF} netns {lb}"
                ))?;
                bench.sh(
                    &rtr,
                    &format!(
                        "ip addr add 10.201.0.254/24 dev r-cli && ip addr add fd00:201::254/64 dev r-cli nodad \
                         && ip addr add 10.200.0.254/24 dev r-lb && ip addr add fd00:200::254/64 dev r-lb nodad \
                         && ip link set r-cli mtu {mtu} up && ip link set r-lb up \
                         && sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
                    ),
                )?;
                (rtr, "r-lb")
            }
        };
        ip(&format!(
            "link add {NAT_PRIVATE_IF} netns {lb} type veth peer name p-lb netns {sw}"
        ))?;
        ip(&format!("-n {sw} link set p-lb master br0 up"))?;
        let vip4: Ipv4Addr = "10.200.0.100".parse()?;
        let vip6: Ipv6Addr = "fd00:200::100".parse()?;
        let (client4, client6): (Ipv4Addr, Ipv6Addr) = if router_mtu.is_some() {
            ("10.201.0.1".parse()?, "fd00:201::1".parse()?)
        } else {
            ("10.200.0.1".parse()?, "fd00:200::1".parse()?)
        };
        let (gw4, gw6) = if router_mtu.is_some() {
            ("10.201.0.254", "fd00:201::254")
        } else {
            ("10.200.0.2", "fd00:200::2")
        };
        bench.sh(
            &cli,
            &format!(
                "ip addr add {client4}/24 dev eth0 && ip addr add {client6}/64 dev eth0 nodad \
                 && ip link set eth0 up && ethtool -K eth0 tx off >/dev/null \
                 && ip route add default via {gw4} && ip -6 route add default via {gw6}"
            ),
        )?;
        bench.sh(
            &lb,
            &format!(
                "ip addr add 10.200.0.2/24 dev {NAT_PUBLIC_IF} && ip addr add fd00:200::2/64 dev {NAT_PUBLIC_IF} nodad                  && ip addr add {vip4}/32 dev {NAT_PUBLIC_IF} && ip addr add {vip6}/128 dev {NAT_PUBLIC_IF} nodad                  && ip addr add 192.168.56.1/24 dev {NAT_PRIVATE_IF} && ip addr add fd00:56::1/64 dev {NAT_PRIVATE_IF} nodad                  && ip link set {NAT_PUBLIC_IF} up && ip link set {NAT_PRIVATE_IF} up                  && sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
            ),
        )?;
        if router_mtu.is_some() {
            bench.sh(
                &lb,
                "ip route add 10.201.0.0/24 via 10.200.0.254 && ip -6 route add fd00:201::/64 via fd00:200::254",
            )?;
        }
        // Frames xlb redirects out of one veth reach the peer only if it runs XDP.
        bench.exec(&public_peer.0, &[&xlb, "util", "xdp-pass", public_peer.1])?;
        bench.exec(&sw, &[&xlb, "util", "xdp-pass", "p-lb"])?;
        let mut servers = Vec::new();
        for i in 1..=n {
            let name = format!("be{i}");
            let ns = bench.netns(&name)?;
            let v4: Ipv4Addr = format!("192.168.56.{}", 10 + i).parse()?;
            let v6: Ipv6Addr = format!("fd00:56::{}", 10 + i).parse()?;
            ip(&format!(
                "link add eth0 netns {ns} type veth peer name p-{name} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set p-{name} master br0 up"))?;
            // Replies leave through the balancer with complete checksums (XDP forwards
            // them as they are).
            bench.sh(
                &ns,
                &format!(
                    "ip addr add {v4}/24 dev eth0 && ip addr add {v6}/64 dev eth0 nodad && ip link set eth0 up                      && ip route add default via 192.168.56.1 && ip -6 route add default via fd00:56::1                      && ethtool -K eth0 tx off >/dev/null"
                ),
            )?;
            servers.push(RealServer { name, ns, v4, v6 });
        }
        Ok(NatBench {
            bench,
            sw,
            cli,
            lb,
            servers,
            vip4,
            vip6,
            client4,
            client6,
        })
    }

    pub fn start_http(&mut self) -> Result<()> {
        start_nginx(&mut self.bench, &self.servers)
    }

    /// A configuration for the balancer (attached to both sides) with `services`.
    pub fn config(&self, services: &str) -> String {
        balancer_config(&[NAT_PUBLIC_IF, NAT_PRIVATE_IF], &self.socket(), services)
    }

    pub fn socket(&self) -> PathBuf {
        self.bench.dir.join("xlb.sock")
    }

    pub fn start_xlb(&mut self, xlb: &Path, config: &str) -> Result<u32> {
        let (lb, socket) = (self.lb.clone(), self.socket());
        start_xlb_in(&mut self.bench, &lb, xlb, config, &socket)
    }
}

/// `method path` on a new connection (HTTP/1.1, `Connection: close`) with `body`; returns
/// the status code and the response body's bytes.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: xlb\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response ({} bytes)", resp.len()))?;
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    if let Some(len) = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().to_string())
    }) {
        let len: usize = len.parse()?;
        if resp.len() - split - 4 != len {
            bail!(
                "body of {} bytes, Content-Length {len}",
                resp.len() - split - 4
            );
        }
    }
    Ok((status, resp[split + 4..].to_vec()))
}

/// Deterministic pseudo-random bytes (xorshift), for files compared byte for byte.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One HTTP/1.1 GET of `/` with `Connection: close` on a new connection; returns the body.
pub fn http_get(addr: SocketAddr) -> Result<String> {
    get_and_close(connect(addr)?)
}

/// As [`http_get`], from source address `src` (one of the caller's addresses).
pub fn http_get_from(src: IpAddr, addr: SocketAddr) -> Result<String> {
    use std::os::fd::AsRawFd;

    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // A blocking connect gives up after the send timeout.
    setsockopt(
        &fd,
        sockopt::SendTimeout,
        &nix::sys::time::TimeVal::new(3, 0),
    )?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )
    .with_context(|| format!("binding to {src}"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("connecting from {src} to {addr}"))?;
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    get_and_close(s)
}

fn get_and_close(mut s: TcpStream) -> Result<String> {
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: xlb\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response: {resp:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {head}");
    }
    Ok(body.trim().to_string())
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// A keep-alive HTTP/1.1 connection for several requests.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Result<KeepAlive> {
        Ok(KeepAlive {
            reader: BufReader::new(connect(addr)?),
        })
    }

    /// GET / on the open connection; returns the body.
    pub fn get(&mut self) -> Result<String> {
        write!(self.reader.get_mut(), "GET / HTTP/1.1\r\nHost: xlb\r\n\r\n")?;
        let mut len = None;
        let mut status = String::new();
        self.reader.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("unexpected status line {status:?}");
        }
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = Some(v.trim().parse::<usize>()?);
            }
        }
        let mut body = vec![0; len.ok_or_else(|| anyhow!("no content-length"))?];
        self.reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }
}

/// Balancers on one shared segment (a bridge in its own namespace), for VRRP: node `i`
/// (1-based) is namespace `<prefix>-<name>` with `eth0` at 10.100.0.2i/24 and
/// 2001:db8:100::2i/64; a client namespace sits on the same segment at 10.100.0.10.
pub struct HaBench {
    pub bench: Bench,
    pub sw: String,
    pub nodes: Vec<String>,
    pub client: String,
}

impl HaBench {
    pub fn new(prefix: &str, names: &[&str]) -> Result<HaBench> {
        let mut bench = Bench::new(prefix)?;
        let sw = bench.netns("sw")?;
        ip(&format!("-n {sw} link add br0 type bridge"))?;
        ip(&format!("-n {sw} link set br0 up"))?;
        let mut nodes = Vec::new();
        let all: Vec<&str> = names.iter().copied().chain(["client"]).collect();
        for (i, name) in all.iter().enumerate() {
            let ns = bench.netns(name)?;
            let port = format!("p-{name}");
            ip(&format!(
                "link add eth0 netns {ns} type veth peer name {port} netns {sw}"
            ))?;
            ip(&format!("-n {sw} link set {port} master br0 up"))?;
            let host = if *name == "client" { 10 } else { 21 + i };
            ip(&format!("-n {ns} addr add 10.100.0.{host}/24 dev eth0"))?;
            ip(&format!(
                "-n {ns} addr add 2001:db8:100::{host}/64 dev eth0"
            ))?;
            ip(&format!("-n {ns} link set eth0 up"))?;
            // Frames the balancers' XDP program transmits arrive only at peers running XDP.
            bench.sh(
                &sw,
                &format!("ethtool -K {port} tx off >/dev/null 2>&1 || true"),
            )?;
            if *name != "client" {
                nodes.push(ns);
            }
        }
        let client = format!("{prefix}-client");
        Ok(HaBench {
            bench,
            sw,
            nodes,
            client,
        })
    }

    /// Whether namespace `ns` holds `addr` on an interface.
    pub fn has_addr(&self, ns: &str, addr: &str) -> bool {
        self.bench
            .exec(ns, &["ip", "-o", "addr", "show"])
            .map(|o| {
                o.split_whitespace()
                    .any(|w| w.split('/').next() == Some(addr))
            })
            .unwrap_or(false)
    }

    /// Waits (up to `limit`) until `addr` is (`present`) or is not on `ns`; the time it took.
    pub fn wait_addr(
        &self,
        ns: &str,
        addr: &str,
        present: bool,
        limit: Duration,
    ) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.has_addr(ns, addr) == present {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Starts keepalived (Debian's) in `ns` with `conf`; logs to `<name>.log`. Returns the
    /// parent's pid (SIGTERM to it stops keepalived cleanly, priority 0 included).
    pub fn start_keepalived(&mut self, ns: &str, name: &str, conf: &str) -> Result<u32> {
        let dir = self.bench.dir.clone();
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let p = |s: &str| {
            dir.join(format!("{name}{s}"))
                .to_string_lossy()
                .into_owned()
        };
        self.bench.spawn(
            ns,
            &[
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-P",
                "-f",
                &path.to_string_lossy(),
                "-p",
                &p(".pid"),
                "-r",
                &p("-vrrp.pid"),
                "-c",
                &p("-checkers.pid"),
            ],
            &format!("{name}.log"),
        )
    }

    /// Starts `xlb run` in `ns` with the TOML `config` (`args` added, e.g. `--keepalived`);
    /// waits for its API on `socket`.
    pub fn start_xlb(
        &mut self,
        ns: &str,
        name: &str,
        xlb: &Path,
        args: &[&str],
        socket: &Path,
    ) -> Result<u32> {
        let mut argv: Vec<String> = vec![xlb.to_string_lossy().into_owned(), "run".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.extend(["--socket".into(), socket.to_string_lossy().into_owned()]);
        if !args.contains(&"--metrics") {
            argv.extend(["--metrics".into(), "off".into()]);
        }
        let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        let log = format!("{name}.log");
        let pid = self.bench.spawn(ns, &argv, &log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if run(&[
                &xlb.to_string_lossy(),
                "status",
                "--socket",
                &socket.to_string_lossy(),
            ])
            .is_ok()
            {
                return Ok(pid);
            }
            if !self.bench.running(pid) || Instant::now() > deadline {
                bail!("xlb did not start:\n{}", self.bench.log(&log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A TOML configuration of a balancer on this segment: attached to `eth0`, no services
    /// unless given, then `rest` (`[[vrrp]]` sections and so on).
    pub fn xlb_config(&self, rest: &str) -> String {
        format!(
            "[dataplane]\ninterfaces = [\"eth0\"]\nxdp_mode = \"native\"\nconn_table_size = 65536\nconn_table_size_v6 = 65536\nmax_services = 64\nmax_backends = 256\nslot_table_size = 65536\n\n{rest}"
        )
    }
}
