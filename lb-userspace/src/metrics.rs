//! Prometheus metrics (`/metrics`, text exposition format 0.0.4).
//!
//! The IPVS families carry node_exporter's ipvs collector names and labels
//! (`node_ipvs_*`, `local_address`, `local_port`, `remote_address`, `remote_port`, `proto`,
//! `local_mark`), so dashboards and alerts written for IPVS hosts keep working; what IPVS
//! cannot show is under `xlb_*`. Counters are the data plane's own and never go back:
//! `ipvsadm -Z` zeroes only what ipvsadm lists.

use std::{fmt::Write, net::SocketAddr};

use anyhow::{Context, Result};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};

use crate::{api::Shared, control::Daemon, engine::CountersView};

/// Writes metric families: `# HELP` and `# TYPE` once each, then the samples.
struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

impl Exposition {
    /// A sample whose label set was formatted once (`{k="v",...}`): at 10,000 real servers
    /// the same labels appear in a dozen families.
    fn sample_with(&mut self, name: &str, labels: &str, value: u64) {
        self.out.push_str(name);
        self.out.push_str(labels);
        self.out.push(' ');
        push_decimal(&mut self.out, value);
        self.out.push('\n');
    }

    /// Like [`Exposition::sample_with`], for values that are not whole numbers.
    fn sample_text(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }
}

/// Appends a decimal number without going through `fmt` (a scrape writes ~10^5 of them).
fn push_decimal(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(*d as char);
    }
}

/// A service's `local_address`: a prefix service's carries its length (two nested prefixes
/// are two series).
fn local_address(k: &crate::config::ServiceKey) -> String {
    if k.is_host() {
        k.addr.to_string()
    } else {
        format!("{}/{}", k.addr, k.prefix)
    }
}

/// `{k="v",...}` with the values escaped.
fn label_text(labels: &[(&str, &str)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{k}=\"{}\"", escape(v));
    }
    s.push('}');
    s
}

/// The whole exposition.
pub fn render(d: &Daemon) -> Result<String> {
    let views = d.raw_view(false)?;
    let mut e = Exposition {
        out: String::with_capacity(256 + views.len() * 4096),
    };

    // Totals, as node_exporter's ipvs collector reads them from /proc/net/ip_vs_stats.
    let mut total = d.retired.clone();
    for s in &views {
        total.conns += s.stats.conns;
        total.in_packets += s.stats.in_packets;
        total.out_packets += s.stats.out_packets;
        total.in_bytes += s.stats.in_bytes;
        total.out_bytes += s.stats.out_bytes;
    }
    for (name, help, v) in [
        (
            "node_ipvs_connections_total",
            "The total number of connections made.",
            total.conns,
        ),
        (
            "node_ipvs_incoming_packets_total",
            "The total number of incoming packets.",
            total.in_packets,
        ),
        (
            "node_ipvs_outgoing_packets_total",
            "The total number of outgoing packets.",
            total.out_packets,
        ),
        (
            "node_ipvs_incoming_bytes_total",
            "The total amount of incoming data.",
            total.in_bytes,
        ),
        (
            "node_ipvs_outgoing_bytes_total",
            "The total amount of outgoing data.",
            total.out_bytes,
        ),
    ] {
        e.family(name, "counter", help);
        e.sample(name, &[], v);
    }

    // Label sets, formatted once per service and per real server.
    // A prefix service's address carries its length (two nested prefixes are two series).
    let local = |s: &crate::engine::ServiceView| local_address(&s.key);
    let svc_labels: Vec<String> = views
        .iter()
        .map(|s| {
            label_text(&[
                ("local_address", &local(s)),
                ("local_port", &s.key.port.to_string()),
                ("proto", s.key.protocol.label()),
            ])
        })
        .collect();
    let be_labels: Vec<Vec<String>> = views
        .iter()
        .map(|s| {
            let (addr, port) = (local(s), s.key.port.to_string());
            s.backends
                .iter()
                .map(|b| {
                    label_text(&[
                        ("local_address", &addr),
                        ("local_port", &port),
                        ("remote_address", &b.addr.to_string()),
                        ("remote_port", &b.port.to_string()),
                        ("proto", s.key.protocol.label()),
                        ("local_mark", ""),
                    ])
                })
                .collect()
        })
        .collect();

    type Pick = fn(&crate::engine::BackendView) -> u64;
    let backend_gauges: [(&str, &str, Pick); 3] = [
        (
            "node_ipvs_backend_connections_active",
            "The current active connections by local and remote address.",
            |b| b.active_conns,
        ),
        (
            "node_ipvs_backend_connections_inactive",
            "The current inactive connections by local and remote address.",
            |b| b.inactive_conns,
        ),
        (
            "node_ipvs_backend_weight",
            "The current backend weight by local and remote address.",
            |b| b.weight as u64,
        ),
    ];
    for (name, help, pick) in backend_gauges {
        e.family(name, "gauge", help);
        for (s, labels) in views.iter().zip(&be_labels) {
            for (b, l) in s.backends.iter().zip(labels) {
                e.sample_with(name, l, pick(b));
            }
        }
    }

    type Counter = fn(&CountersView) -> u64;
    let counters: [(&str, &str, Counter); 5] = [
        ("connections_total", "Connections scheduled.", |c| c.conns),
        ("incoming_packets_total", "Packets from clients.", |c| {
            c.in_packets
        }),
        (
            "outgoing_packets_total",
            "Packets from real servers to clients (NAT).",
            |c| c.out_packets,
        ),
        (
            "incoming_bytes_total",
            "Bytes (IP packet lengths) from clients.",
            |c| c.in_bytes,
        ),
        (
            "outgoing_bytes_total",
            "Bytes (IP packet lengths) from real servers to clients (NAT).",
            |c| c.out_bytes,
        ),
    ];
    for (suffix, help, pick) in counters {
        let name = format!("xlb_service_{suffix}");
        e.family(&name, "counter", &format!("{help} Per virtual service."));
        for (s, l) in views.iter().zip(&svc_labels) {
            e.sample_with(&name, l, pick(&s.stats));
        }
        let name = format!("xlb_backend_{suffix}");
        e.family(&name, "counter", &format!("{help} Per real server."));
        for (s, labels) in views.iter().zip(&be_labels) {
            for (b, l) in s.backends.iter().zip(labels) {
                e.sample_with(&name, l, pick(&b.stats));
            }
        }
    }

    type RatePick = fn(&crate::engine::RateView) -> u64;
    let rates: [(&str, &str, RatePick); 5] = [
        (
            "connections_per_second",
            "Connection rate (IPVS estimator, ipvsadm --rate CPS).",
            |r| r.cps,
        ),
        (
            "incoming_packets_per_second",
            "Incoming packet rate (ipvsadm --rate InPPS).",
            |r| r.in_pps,
        ),
        (
            "outgoing_packets_per_second",
            "Outgoing packet rate (ipvsadm --rate OutPPS).",
            |r| r.out_pps,
        ),
        (
            "incoming_bytes_per_second",
            "Incoming byte rate (ipvsadm --rate InBPS).",
            |r| r.in_bps,
        ),
        (
            "outgoing_bytes_per_second",
            "Outgoing byte rate (ipvsadm --rate OutBPS).",
            |r| r.out_bps,
        ),
    ];
    for (suffix, help, pick) in rates {
        let name = format!("xlb_service_{suffix}");
        e.family(&name, "gauge", help);
        for (s, l) in views.iter().zip(&svc_labels) {
            e.sample_with(&name, l, pick(&s.rate));
        }
        let name = format!("xlb_backend_{suffix}");
        e.family(&name, "gauge", help);
        for (s, labels) in views.iter().zip(&be_labels) {
            for (b, l) in s.backends.iter().zip(labels) {
                e.sample_with(&name, l, pick(&b.rate));
            }
        }
    }

    // Health checks: per checked real server, and per check.
    let mut checked: Vec<_> = d
        .health
        .servers()
        .filter(|(_, st)| !st.checks.is_empty())
        .collect();
    checked.sort_by(|a, b| a.0.cmp(b.0));
    let server_labels = |k: &crate::health::runner::ServerKey, extra: &[(&str, &str)]| {
        let (local, port) = (local_address(&k.0), k.0.port.to_string());
        let (remote, rport) = (k.1.to_string(), k.2.to_string());
        let mut l = vec![
            ("local_address", local.as_str()),
            ("local_port", port.as_str()),
            ("remote_address", remote.as_str()),
            ("remote_port", rport.as_str()),
            ("proto", k.0.protocol.label()),
        ];
        l.extend_from_slice(extra);
        label_text(&l)
    };
    let labels: Vec<String> = checked.iter().map(|(k, _)| server_labels(k, &[])).collect();
    e.family(
        "xlb_backend_up",
        "gauge",
        "Whether the health checks find the real server alive (1) or not (0).",
    );
    for ((_, st), l) in checked.iter().zip(&labels) {
        e.sample_with("xlb_backend_up", l, u64::from(st.alive));
    }
    e.family(
        "xlb_backend_health_change_timestamp_seconds",
        "gauge",
        "When the real server last went up or down (Unix time).",
    );
    for ((_, st), l) in checked.iter().zip(&labels) {
        e.sample_text(
            "xlb_backend_health_change_timestamp_seconds",
            l,
            format!("{:.3}", st.since_unix),
        );
    }
    type CheckPick = fn(&crate::health::state::CheckState) -> Option<String>;
    let check_families: [(&str, &str, CheckPick); 3] = [
        (
            "xlb_backend_check_up",
            "Whether a health check is up (1) or down (0).",
            |c| Some(u8::from(c.up).to_string()),
        ),
        (
            "xlb_backend_check_latency_seconds",
            "How long the last attempt of a health check took.",
            |c| {
                c.last
                    .as_ref()
                    .map(|l| format!("{:.6}", l.latency.as_secs_f64()))
            },
        ),
        (
            "xlb_backend_check_last_success",
            "Whether the last attempt of a health check succeeded.",
            |c| c.last.as_ref().map(|l| u8::from(l.ok).to_string()),
        ),
    ];
    let check_labels: Vec<Vec<String>> = checked
        .iter()
        .map(|(k, st)| {
            st.checks
                .iter()
                .enumerate()
                .map(|(i, c)| server_labels(k, &[("check", &i.to_string()), ("type", &c.kind)]))
                .collect()
        })
        .collect();
    for (name, help, pick) in check_families {
        e.family(name, "gauge", help);
        for ((_, st), labels) in checked.iter().zip(&check_labels) {
            for (c, l) in st.checks.iter().zip(labels) {
                if let Some(v) = pick(c) {
                    e.sample_text(name, l, v);
                }
            }
        }
    }
    e.family(
        "xlb_service_quorum_up",
        "gauge",
        "Whether a service with a quorum or a sorry server has its quorum (1) or not (0).",
    );
    for (s, l) in views.iter().zip(&svc_labels) {
        if let Some(up) = d.health.quorum_up(&s.key) {
            e.sample_with("xlb_service_quorum_up", l, u64::from(up));
        }
    }

    // Verdicts: every packet ends in exactly one; events happen on the way.
    let reasons = d.dp.reasons()?;
    let names = lb_common::reason::NAMES;
    let verdicts = lb_common::reason::VERDICTS as usize;
    e.family(
        "xlb_packets_total",
        "counter",
        "Packets by what the data plane did with them (action) and why (reason).",
    );
    for (n, v) in names.iter().zip(&reasons).take(verdicts) {
        let (action, reason) = n.split_once('_').unwrap_or((n, ""));
        e.sample(
            "xlb_packets_total",
            &[("action", action), ("reason", reason)],
            v,
        );
    }
    e.family(
        "xlb_events_total",
        "counter",
        "Events on the way of packets (flow-table pressure, NAT, ICMP, fragments).",
    );
    for (n, v) in names.iter().zip(&reasons).skip(verdicts) {
        e.sample("xlb_events_total", &[("event", n)], v);
    }

    let free = d.dp.flow_entries_free()?;
    let caps = [d.dp.limits.conn_table_size, d.dp.limits.conn_table_size_v6];
    e.family(
        "xlb_connection_table_entries",
        "gauge",
        "Connections in the connection table.",
    );
    for (i, fam) in ["ipv4", "ipv6"].iter().enumerate() {
        let used = (caps[i] as i64 - free[i]).max(0);
        e.sample("xlb_connection_table_entries", &[("family", fam)], used);
    }
    e.family(
        "xlb_connection_table_capacity",
        "gauge",
        "Capacity of the connection table.",
    );
    for (i, fam) in ["ipv4", "ipv6"].iter().enumerate() {
        e.sample("xlb_connection_table_capacity", &[("family", fam)], caps[i]);
    }

    e.family(
        "xlb_attached_info",
        "gauge",
        "Interfaces the XDP program is attached to, with the attach mode.",
    );
    for a in d.dp.attachments() {
        e.sample(
            "xlb_attached_info",
            &[("interface", &a.interface), ("mode", a.mode)],
            1,
        );
    }
    vrrp_metrics(&mut e, d);
    e.family(
        "xlb_config_generation",
        "gauge",
        "Configurations applied since start-up (start-up, reloads and administrative changes).",
    );
    e.sample("xlb_config_generation", &[], d.generation);
    e.family(
        "xlb_config_last_reload_successful",
        "gauge",
        "Whether the last reload was applied (1) or refused (0); 1 before any reload.",
    );
    let ok = d.last_reload.as_ref().is_none_or(|r| r.ok);
    e.sample("xlb_config_last_reload_successful", &[], u8::from(ok));
    e.family(
        "xlb_config_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload was attempted (Unix time; 0 = never).",
    );
    e.sample(
        "xlb_config_last_reload_timestamp_seconds",
        &[],
        d.last_reload.as_ref().map_or(0, |r| r.at_unix),
    );
    e.family("xlb_build_info", "gauge", "xlb's version.");
    e.sample(
        "xlb_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    Ok(e.out)
}

/// VRRP instances and the connection sync.
fn vrrp_metrics(e: &mut Exposition, d: &Daemon) {
    let insts = d.vrrp.as_ref().map(|v| v.get()).unwrap_or_default();
    if !insts.is_empty() {
        let labels: Vec<String> = insts
            .iter()
            .map(|i| {
                let vrid = i.vrid.to_string();
                label_text(&[
                    ("instance", i.name.as_str()),
                    ("interface", i.interface.as_str()),
                    ("vrid", vrid.as_str()),
                ])
            })
            .collect();
        type Pick = fn(&crate::vrrp::run::InstanceStatus) -> u64;
        let gauges: [(&str, &str, &str, Pick); 7] = [
            (
                "xlb_vrrp_state",
                "gauge",
                "VRRP state: 0 init, 1 backup, 2 master, 3 fault.",
                |i| i.state.number() as u64,
            ),
            (
                "xlb_vrrp_master",
                "gauge",
                "Whether this node is the instance's master (1) or not (0).",
                |i| u64::from(i.state == crate::vrrp::machine::State::Master),
            ),
            (
                "xlb_vrrp_priority",
                "gauge",
                "Effective VRRP priority (base plus trackers).",
                |i| i.priority as u64,
            ),
            (
                "xlb_vrrp_base_priority",
                "gauge",
                "Configured VRRP priority.",
                |i| i.base_priority as u64,
            ),
            (
                "xlb_vrrp_transitions_total",
                "counter",
                "VRRP state transitions.",
                |i| i.transitions,
            ),
            (
                "xlb_vrrp_adverts_sent_total",
                "counter",
                "VRRP advertisements sent.",
                |i| i.adverts_sent,
            ),
            (
                "xlb_vrrp_adverts_received_total",
                "counter",
                "Valid VRRP advertisements received and processed.",
                |i| i.adverts_received,
            ),
        ];
        for (name, kind, help, pick) in gauges {
            e.family(name, kind, help);
            for (i, l) in insts.iter().zip(&labels) {
                e.sample_with(name, l, pick(i));
            }
        }
        e.family(
            "xlb_vrrp_priority_zero_received_total",
            "counter",
            "Priority-0 advertisements (a master stepping down) received.",
        );
        for (i, l) in insts.iter().zip(&labels) {
            e.sample_with(
                "xlb_vrrp_priority_zero_received_total",
                l,
                i.priority_zero_received,
            );
        }
        e.family(
            "xlb_vrrp_adverts_dropped_total",
            "counter",
            "VRRP advertisements dropped, by reason.",
        );
        for i in &insts {
            let vrid = i.vrid.to_string();
            for (reason, n) in &i.dropped {
                let l = label_text(&[
                    ("instance", i.name.as_str()),
                    ("interface", i.interface.as_str()),
                    ("vrid", vrid.as_str()),
                    ("reason", reason.as_str()),
                ]);
                e.sample_with("xlb_vrrp_adverts_dropped_total", &l, *n);
            }
        }
        e.family(
            "xlb_vrrp_last_transition_timestamp_seconds",
            "gauge",
            "When the instance last changed state (Unix time).",
        );
        for (i, l) in insts.iter().zip(&labels) {
            e.sample_text(
                "xlb_vrrp_last_transition_timestamp_seconds",
                l,
                format!("{:.3}", i.since),
            );
        }
    }
    if let Some(s) = &d.conn_sync {
        let st = s.status();
        let l = label_text(&[("instance", st.instance.as_str())]);
        e.family(
            "xlb_conn_sync_master",
            "gauge",
            "Whether this node sends its connections (1) or installs the master's (0).",
        );
        e.sample_with("xlb_conn_sync_master", &l, u64::from(st.role == "master"));
        let counters: [(&str, &str, u64); 8] = [
            (
                "xlb_conn_sync_sent_messages_total",
                "Sync messages sent.",
                st.sent_messages,
            ),
            (
                "xlb_conn_sync_sent_records_total",
                "Connection records sent.",
                st.sent_records,
            ),
            (
                "xlb_conn_sync_received_messages_total",
                "Sync messages received.",
                st.received_messages,
            ),
            (
                "xlb_conn_sync_received_records_total",
                "Connection records received.",
                st.received_records,
            ),
            (
                "xlb_conn_sync_installed_total",
                "Received connections installed in the connection table.",
                st.installed,
            ),
            (
                "xlb_conn_sync_skipped_total",
                "Received connections of services or real servers not configured here.",
                st.skipped,
            ),
            (
                "xlb_conn_sync_refused_total",
                "Received connections refused (table full).",
                st.refused,
            ),
            (
                "xlb_conn_sync_errors_total",
                "Malformed or undeliverable sync messages.",
                st.errors,
            ),
        ];
        for (name, help, v) in counters {
            e.family(name, "counter", help);
            e.sample_with(name, &l, v);
        }
        e.family(
            "xlb_conn_sync_lag_seconds",
            "gauge",
            "Seconds since the last sync message received (backup) or sent (master).",
        );
        if let Some(lag) = st.lag_seconds {
            e.sample_text("xlb_conn_sync_lag_seconds", &l, format!("{lag:.3}"));
        }
    }
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    let d = s.lock().await;
    match render(&d) {
        Ok(text) => (
            axum::http::StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        ),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{e:#}\n"),
        ),
    }
}

/// Serves `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, state: Shared) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    }))
}
