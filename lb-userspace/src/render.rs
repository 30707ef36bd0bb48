//! Writes the model back as the TOML configuration file: `xlb config convert` prints it, and
//! changes made through the admin API are checked by parsing it again, so that a change is
//! held to exactly the rules a file is (one validator, not two that could drift apart).

use std::{fmt::Write, net::IpAddr, path::Path};

use crate::config::{
    self, BackendConfig, Config, DEFAULT_SOCKET, Forwarding, Limits, PortRange, ServiceConfig,
    Timeouts, TunnelChecksum, XdpModeSetting,
};
use crate::health::config::{command_text, render_check};

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn forwarding_name(f: Forwarding) -> &'static str {
    match f {
        Forwarding::Dr => "dr",
        Forwarding::Nat => "nat",
        Forwarding::Tunnel => "tunnel",
    }
}

fn endpoint(a: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(a, port).to_string()
}

/// `[dataplane]`: `all_limits` writes every capacity (validation must match the running
/// maps); otherwise only those that differ from the defaults.
fn dataplane(out: &mut String, interfaces: &[String], mode: XdpModeSetting, l: &Limits, all: bool) {
    let d = Limits::default();
    let names: Vec<String> = interfaces.iter().map(|i| quote(i)).collect();
    let _ = writeln!(out, "[dataplane]\ninterfaces = [{}]", names.join(", "));
    let mode = match mode {
        XdpModeSetting::Auto => "auto",
        XdpModeSetting::Native => "native",
        XdpModeSetting::Generic => "generic",
    };
    let _ = writeln!(out, "xdp_mode = \"{mode}\"");
    let mut size = |name: &str, v: u32, def: u32| {
        if all || v != def {
            let _ = writeln!(out, "{name} = {v}");
        }
    };
    size("conn_table_size", l.conn_table_size, d.conn_table_size);
    // The IPv6 table follows the IPv4 one unless set.
    let v6_default = if all || l.conn_table_size != d.conn_table_size {
        (l.conn_table_size / 4).max(64)
    } else {
        d.conn_table_size_v6
    };
    size("conn_table_size_v6", l.conn_table_size_v6, v6_default);
    size("max_services", l.max_services, d.max_services);
    size("max_backends", l.max_backends, d.max_backends);
    size("slot_table_size", l.slot_table_size, d.slot_table_size);
    size(
        "persistence_table_size",
        l.persistence_table_size,
        d.persistence_table_size,
    );
    size(
        "locality_table_size",
        l.locality_table_size,
        d.locality_table_size,
    );
    if all || !l.nat_tables {
        let _ = writeln!(out, "nat = {}", l.nat_tables);
    }
}

fn timeouts(out: &mut String, t: Timeouts) {
    if t != Timeouts::default() {
        let _ = writeln!(
            out,
            "\n[timeouts]\ntcp = {}\ntcp_fin = {}\nudp = {}",
            t.tcp, t.tcp_fin, t.udp
        );
    }
}

/// One `[[services]]` table with its backends.
pub fn service(out: &mut String, s: &ServiceConfig) {
    let multi_port = service_header(out, s);
    for b in &s.backends {
        backend(out, s, b, multi_port);
    }
}

/// A service's own settings, without its backends; `true` if it has several ports (its
/// backends' ports are then written differently).
fn service_header(out: &mut String, s: &ServiceConfig) -> bool {
    let _ = writeln!(out, "\n[[services]]\nname = {}", quote(&s.name));
    let single =
        s.ports.len() == 1 && (s.ports[0].first == s.ports[0].last || s.ports[0] == PortRange::ALL);
    let host = s.key.is_host();
    let addr = if host {
        s.key.addr.to_string()
    } else {
        format!("{}/{}", s.key.addr, s.key.prefix)
    };
    if single && host {
        let _ = writeln!(
            out,
            "address = {}",
            quote(&endpoint(s.key.addr, s.key.port))
        );
    } else {
        let _ = writeln!(out, "address = {}", quote(&addr));
        let ports: Vec<String> = s
            .ports
            .iter()
            .map(|r| {
                if *r == PortRange::ALL {
                    "0".to_string()
                } else if r.first == r.last {
                    r.first.to_string()
                } else {
                    format!("\"{}-{}\"", r.first, r.last)
                }
            })
            .collect();
        let _ = writeln!(out, "ports = [{}]", ports.join(", "));
    }
    let _ = writeln!(
        out,
        "protocol = \"{}\"",
        s.key.protocol.label().to_lowercase()
    );
    let _ = writeln!(out, "scheduler = \"{}\"", s.scheduler);
    let _ = writeln!(out, "forwarding = \"{}\"", forwarding_name(s.forwarding));
    let flags = s.sched_flags.names(s.scheduler);
    if !flags.is_empty() {
        let f: Vec<String> = flags.split(',').map(quote).collect();
        let _ = writeln!(out, "flags = [{}]", f.join(", "));
    }
    if s.mh_table_size != lb_common::hash::MH_DEFAULT_SIZE {
        let _ = writeln!(out, "mh_table_size = {}", s.mh_table_size);
    }
    if !s.conntrack {
        let _ = writeln!(out, "conntrack = false");
    }
    if let Some(p) = s.persistence {
        let _ = writeln!(
            out,
            "persistence = {{ timeout = {}, netmask = {} }}",
            p.timeout, p.prefix
        );
    }
    let h = &s.health;
    if let Some((ip, port)) = h.sorry_server {
        let _ = writeln!(out, "sorry_server = {}", quote(&endpoint(ip, port)));
    }
    if !h.reentry_delay.is_zero() {
        let _ = writeln!(out, "reentry_delay = {}", h.reentry_delay.as_secs_f64());
    }
    if h.quorum != 0 {
        let _ = writeln!(out, "quorum = {}", h.quorum);
    }
    if h.hysteresis != 0 {
        let _ = writeln!(out, "hysteresis = {}", h.hysteresis);
    }
    if let Some(c) = &h.quorum_up {
        let _ = writeln!(out, "quorum_up = {}", quote(&command_text(c)));
    }
    if let Some(c) = &h.quorum_down {
        let _ = writeln!(out, "quorum_down = {}", quote(&command_text(c)));
    }
    // The service-level tunnel default is not kept in the model: every tunnel server
    // carries its own settings.
    !single
}

fn backend(out: &mut String, s: &ServiceConfig, b: &BackendConfig, multi_port: bool) {
    let _ = writeln!(out, "\n[[services.backends]]");
    let address = if multi_port && b.port == 0 {
        b.addr.to_string()
    } else {
        endpoint(b.addr, b.port)
    };
    let _ = writeln!(out, "address = {}", quote(&address));
    let _ = writeln!(out, "weight = {}", b.weight);
    if b.forwarding != s.forwarding {
        let _ = writeln!(out, "forwarding = \"{}\"", forwarding_name(b.forwarding));
    }
    if let Some(t) = b.tunnel.filter(|_| b.forwarding == Forwarding::Tunnel) {
        let mut parts = vec![format!("type = \"{}\"", t.kind.name())];
        if t.port != 0 {
            parts.push(format!("port = {}", t.port));
        }
        match t.checksum {
            TunnelChecksum::None => {}
            TunnelChecksum::Csum => parts.push("checksum = \"csum\"".into()),
            TunnelChecksum::Remcsum => parts.push("checksum = \"remcsum\"".into()),
        }
        if let Some(src) = t.source {
            parts.push(format!("source = {}", quote(&src.to_string())));
        }
        let _ = writeln!(out, "tunnel = {{ {} }}", parts.join(", "));
    }
    if b.upper_threshold != 0 {
        let _ = writeln!(out, "upper_threshold = {}", b.upper_threshold);
    }
    if b.lower_threshold != 0 {
        let _ = writeln!(out, "lower_threshold = {}", b.lower_threshold);
    }
    let h = &b.health;
    if h.inhibit_on_failure {
        let _ = writeln!(out, "inhibit_on_failure = true");
    }
    if let Some(c) = &h.notify_up {
        let _ = writeln!(out, "notify_up = {}", quote(&command_text(c)));
    }
    if let Some(c) = &h.notify_down {
        let _ = writeln!(out, "notify_down = {}", quote(&command_text(c)));
    }
    if !h.checks.is_empty() {
        let checks: Vec<String> = h.checks.iter().map(render_check).collect();
        let _ = writeln!(out, "checks = [\n  {},\n]", checks.join(",\n  "));
    }
}

/// The whole configuration as a TOML file `xlb run --config` accepts.
pub fn to_toml(c: &Config) -> String {
    let mut out = String::new();
    let interfaces: Vec<String> = c
        .dataplane
        .interfaces
        .iter()
        .map(|i| i.value.clone())
        .collect();
    dataplane(
        &mut out,
        &interfaces,
        c.dataplane.xdp_mode,
        &c.dataplane.limits,
        false,
    );
    if c.dataplane.expire_nodest_conn {
        let _ = writeln!(out, "expire_nodest_conn = true");
    }
    let mut control = String::new();
    let socket = c.socket.display().to_string();
    if socket != DEFAULT_SOCKET {
        let _ = writeln!(control, "socket = {}", quote(&socket));
    }
    match c.metrics {
        None => control.push_str("metrics = \"off\"\n"),
        Some(m) if m.to_string() != config::DEFAULT_METRICS => {
            let _ = writeln!(control, "metrics = \"{m}\"");
        }
        Some(_) => {}
    }
    if let Some(u) = &c.script_user {
        let _ = writeln!(control, "script_user = {}", quote(u));
    }
    if c.script_security {
        let _ = writeln!(control, "script_security = true");
    }
    if let Some(pin) = &c.pin_dir {
        let _ = writeln!(control, "pin_dir = {}", quote(&pin.display().to_string()));
    }
    if !control.is_empty() {
        let _ = write!(out, "\n[control]\n{control}");
    }
    timeouts(&mut out, c.timeouts);
    for s in &c.services {
        service(&mut out, s);
    }
    out.push_str(&crate::vrrp::config::to_toml(&c.ha));
    out
}

/// Checks that `services` would be accepted as a configuration file with these capacities
/// (every rule of the file parser, per service and across services). The error names the
/// service, without the generated text's line numbers.
pub fn validate_services(services: &[ServiceConfig], limits: &Limits) -> Result<(), String> {
    validate_change(&[], services, limits)
}

/// [`validate_services`] for a change from `old`: services that did not change were
/// accepted before, so only their headers go through the parser again (for the rules across
/// services); their real servers are only counted. At 10,000 real servers this is what keeps
/// one ipvsadm command fast.
pub fn validate_change(
    old: &[ServiceConfig],
    services: &[ServiceConfig],
    limits: &Limits,
) -> Result<(), String> {
    // A sorry server takes a real-server entry when it is called in.
    let total: usize = services
        .iter()
        .map(|s| s.backends.len() + usize::from(s.health.sorry_server.is_some()))
        .sum();
    if total > limits.max_backends as usize {
        return Err(format!(
            "{total} real servers exceed dataplane.max_backends = {}",
            limits.max_backends
        ));
    }
    let before: std::collections::HashMap<_, &ServiceConfig> =
        old.iter().map(|s| (s.key, s)).collect();
    let unchanged: Vec<bool> = services
        .iter()
        .map(|s| before.get(&s.key).is_some_and(|o| *o == s))
        .collect();
    let mut out = String::new();
    dataplane(
        &mut out,
        &["xlb0".into()],
        XdpModeSetting::Auto,
        limits,
        true,
    );
    let mut starts = Vec::with_capacity(services.len());
    let mut lines = out.matches('\n').count();
    for (s, same) in services.iter().zip(&unchanged) {
        starts.push(lines + 2);
        let at = out.len();
        if *same {
            // Its header only (the rules across services need it), its servers unchanged.
            service_header(&mut out, s);
        } else {
            service(&mut out, s);
        }
        lines += out[at..].matches('\n').count();
    }
    match config::parse(Path::new("<change>"), &out) {
        Ok(parsed) => {
            // The parser normalises (e.g. a service's tunnel default reaches its servers);
            // what it reads back must be what was asked for, or the change is not expressible.
            if let Some((want, got)) = services
                .iter()
                .zip(&parsed.services)
                .zip(&unchanged)
                .filter(|(_, same)| !**same)
                .map(|(pair, _)| pair)
                .find(|(a, b)| a != b)
            {
                return Err(format!(
                    "service \"{}\": not a valid service definition (read back as {got:?}, asked {want:?})",
                    want.name
                ));
            }
            Ok(())
        }
        Err(e) => {
            let which = starts.iter().rposition(|l| *l <= e.line);
            match which {
                Some(i) => Err(format!("service {}: {}", services[i].key, e.message)),
                None => Err(e.message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, ChangeError, Model};

    const FILE: &str = r#"
[dataplane]
interfaces = ["eth0", "eth1"]
conn_table_size = 4096
nat = true

[control]
socket = "/run/xlb/a.sock"
metrics = "127.0.0.1:9999"

[timeouts]
tcp = 600

[[services]]
name = "web"
address = "10.0.0.1:80"
scheduler = "wrr"
persistence = { timeout = 600, netmask = "255.255.255.0" }

sorry_server = "10.0.1.9:80"
reentry_delay = 2.5
quorum = 2
hysteresis = 1
quorum_down = "/usr/local/bin/alert 'quorum lost'"
health = { interval = 2, timeout = 1 }

[[services.backends]]
address = "10.0.1.1:80"
weight = 3
upper_threshold = 100
lower_threshold = 50
inhibit_on_failure = true
notify_down = "/bin/logger down %h"
checks = [{ type = "http", path = "/health", status = [200, "300-302"] }, { type = "tcp", retry = 3 }]

[[services.backends]]
address = "10.0.1.2:8080"
forwarding = "nat"

[[services]]
name = "multi"
address = "10.0.0.2"
ports = [80, "8000-8100"]
protocol = "udp"
scheduler = "mh"
flags = ["mh-port"]
mh_table_size = 251
forwarding = "tunnel"
tunnel = { type = "gue", port = 6080, checksum = "remcsum" }

[[services.backends]]
address = "192.168.1.5"

[[services.backends]]
address = "2001:db8::5"
tunnel = { type = "ipip" }

[[services]]
name = "cache"
address = "0.0.0.0/0"
ports = [0]
scheduler = "dh"
conntrack = false

[[services.backends]]
address = "10.0.9.9:0"
"#;

    /// A file, written back and read again, is the same configuration.
    #[test]
    fn toml_round_trip() {
        let c = config::parse(Path::new("a.toml"), FILE).unwrap();
        let text = to_toml(&c);
        let again =
            config::parse(Path::new("b.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again.services, c.services, "{text}");
        assert_eq!(again.timeouts, c.timeouts);
        assert_eq!(again.dataplane.limits, c.dataplane.limits);
        assert_eq!(again.socket, c.socket);
        assert_eq!(again.metrics, c.metrics);
        assert_eq!(to_toml(&again), text);
        validate_services(&c.services, &c.dataplane.limits).unwrap();
    }

    /// A change is held to the file's rules; the error names the service and the rule.
    #[test]
    fn changes_are_validated_as_files_are() {
        let c = config::parse(Path::new("a.toml"), FILE).unwrap();
        let mut m = Model {
            services: c.services.clone(),
            timeouts: c.timeouts,
        };
        let key = c.services[0].key;
        let mut dr = c.services[0].backends[0].clone();
        dr.addr = "10.0.1.3".parse().unwrap();
        dr.port = 81;
        Change::AddServer {
            key,
            server: dr.clone(),
        }
        .apply(&mut m)
        .unwrap();
        let e = validate_services(&m.services, &c.dataplane.limits).unwrap_err();
        assert!(
            e.starts_with("service TCP 10.0.0.1:80: direct routing cannot change the port"),
            "{e}"
        );
        // Structural errors come first, with ipvsadm's words.
        assert_eq!(
            Change::AddServer { key, server: dr }.apply(&mut m),
            Err(ChangeError::DestExists)
        );
        assert_eq!(
            ChangeError::DestExists.to_string(),
            "Destination already exists"
        );
        // Checked as a change from the file: only the changed service is read in full, and
        // the same error comes out.
        let e2 = validate_change(&c.services, &m.services, &c.dataplane.limits).unwrap_err();
        assert_eq!(e2, e);
        validate_change(&c.services, &c.services, &c.dataplane.limits).unwrap();
        // Rules across services still see the unchanged ones.
        let mut dup = c.services.clone();
        let mut copy = c.services[0].clone();
        copy.key.port = 81;
        copy.ports = vec![crate::config::PortRange::one(81)];
        copy.backends.clear();
        copy.health = Default::default();
        dup.push(copy);
        let e = validate_change(&c.services, &dup, &c.dataplane.limits).unwrap_err();
        assert!(e.contains("is used twice"), "{e}");
        let mut few = c.dataplane.limits;
        few.max_backends = 4;
        let e = validate_change(&c.services, &c.services, &few).unwrap_err();
        assert!(e.contains("exceed dataplane.max_backends = 4"), "{e}");
        let mut limits = c.dataplane.limits;
        limits.nat_tables = false;
        let e = validate_services(&c.services, &limits).unwrap_err();
        assert!(e.contains("uses NAT"), "{e}");
    }

    #[test]
    fn change_semantics() {
        let c = config::parse(Path::new("a.toml"), FILE).unwrap();
        let mut m = Model::default();
        let mut svc = c.services[0].clone();
        Change::AddService {
            service: svc.clone(),
        }
        .apply(&mut m)
        .unwrap();
        assert!(m.services[0].backends.is_empty(), "-A brings no servers");
        assert_eq!(
            Change::AddService {
                service: svc.clone()
            }
            .apply(&mut m),
            Err(ChangeError::ServiceExists)
        );
        for b in &c.services[0].backends {
            Change::AddServer {
                key: svc.key,
                server: b.clone(),
            }
            .apply(&mut m)
            .unwrap();
        }
        // -E keeps the servers, the name and what ipvsadm cannot say.
        svc.scheduler = crate::config::Scheduler::Rr;
        svc.name = "other".into();
        svc.forwarding = crate::config::Forwarding::Nat;
        svc.persistence = None;
        Change::EditService {
            service: svc.clone(),
        }
        .apply(&mut m)
        .unwrap();
        assert_eq!(m.services[0].backends.len(), 2);
        assert_eq!(m.services[0].name, "web");
        assert_eq!(m.services[0].scheduler, crate::config::Scheduler::Rr);
        assert_eq!(m.services[0].forwarding, crate::config::Forwarding::Dr);
        assert_eq!(m.services[0].persistence, None);
        let b = &c.services[0].backends[1];
        Change::DeleteServer {
            key: svc.key,
            addr: b.addr,
            port: b.port,
        }
        .apply(&mut m)
        .unwrap();
        assert_eq!(
            Change::DeleteServer {
                key: svc.key,
                addr: b.addr,
                port: b.port
            }
            .apply(&mut m),
            Err(ChangeError::NoDest)
        );
        Change::SetTimeouts {
            tcp: 0,
            tcp_fin: 30,
            udp: 0,
        }
        .apply(&mut m)
        .unwrap();
        assert_eq!(m.timeouts.tcp, 900);
        assert_eq!(m.timeouts.tcp_fin, 30);
        Change::Clear.apply(&mut m).unwrap();
        assert_eq!(
            Change::DeleteService { key: svc.key }.apply(&mut m),
            Err(ChangeError::NoService)
        );
    }
}
