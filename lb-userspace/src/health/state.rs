//! The health of every checked real server, and what the data plane serves because of it
//! (keepalived.md §5.2, §5.4): a server is alive only if none of its checks is down; a dead
//! one is removed from its service, or kept with weight 0 under `inhibit_on_failure`; the
//! sorry server takes over when no server is usable or the quorum is lost.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    runner::{Report, ServerKey},
    spec::{CheckSpec, Probe},
};
use crate::config::{BackendConfig, ServiceConfig, ServiceKey};

/// The last attempt of a check.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LastResult {
    pub ok: bool,
    pub detail: String,
    pub latency: Duration,
    pub at_unix: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckState {
    /// `tcp`, `http`, ...
    pub kind: String,
    /// The check as configured: a changed one starts afresh (as its task does).
    #[serde(skip)]
    pub spec: Option<CheckSpec>,
    pub up: bool,
    pub weight: Option<u32>,
    pub last: Option<LastResult>,
    /// When it last went up or down (or started).
    pub since_unix: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerState {
    pub checks: Vec<CheckState>,
    pub alive: bool,
    /// The weight it is served with when alive (the configured one, or what a probe set).
    pub weight: u32,
    /// Its configured weight.
    pub configured_weight: u32,
    pub since_unix: f64,
}

/// A change of a real server's or a service's state, for logs and notify programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Server { server: ServerKey, alive: bool },
    Quorum { service: ServiceKey, up: bool },
}

#[derive(Clone, Default)]
pub struct Health {
    servers: HashMap<ServerKey, ServerState>,
    quorum: HashMap<ServiceKey, bool>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn kind(p: &Probe) -> &'static str {
    match p {
        Probe::Tcp => "tcp",
        Probe::Http(h) if h.tls.is_some() => "https",
        Probe::Http(_) => "http",
        Probe::Smtp { .. } => "smtp",
        Probe::Dns { .. } => "dns",
        Probe::Udp { .. } => "udp",
        Probe::Ping => "ping",
        Probe::File { .. } => "file",
        Probe::Misc(_) => "misc",
        Probe::SendExpect(_) => "send_expect",
    }
}

impl Health {
    /// Follows the configuration: servers and checks that appeared or changed start in their
    /// initial state (up, or down with alpha); gone ones are forgotten.
    pub fn sync(&mut self, services: &[ServiceConfig]) {
        let now = unix(SystemTime::now());
        let mut seen = std::collections::HashSet::new();
        for s in services {
            for b in &s.backends {
                let key = (s.key, b.addr, b.port);
                seen.insert(key);
                let st = self.servers.entry(key).or_insert_with(|| ServerState {
                    checks: Vec::new(),
                    alive: true,
                    weight: b.weight,
                    configured_weight: b.weight,
                    since_unix: now,
                });
                st.configured_weight = b.weight;
                st.checks.truncate(b.health.checks.len());
                for (i, c) in b.health.checks.iter().enumerate() {
                    let fresh = CheckState {
                        kind: kind(&c.probe).into(),
                        spec: Some(c.clone()),
                        up: !c.timing.alpha,
                        weight: None,
                        last: None,
                        since_unix: now,
                    };
                    if i >= st.checks.len() {
                        st.checks.push(fresh);
                    } else if st.checks[i].spec.as_ref() != Some(c) {
                        st.checks[i] = fresh;
                    }
                }
                Self::settle(st, now);
            }
        }
        self.servers.retain(|k, _| seen.contains(k));
        self.quorum
            .retain(|k, _| services.iter().any(|s| s.key == *k));
    }

    fn settle(st: &mut ServerState, now: f64) -> bool {
        let alive = st.checks.iter().all(|c| c.up);
        let configured = st.configured_weight as i64;
        let mut w = configured;
        for c in &st.checks {
            if let Some(x) = c.weight {
                w += x as i64 - configured;
            }
        }
        let weight = w.clamp(0, 65535) as u32;
        let changed = alive != st.alive;
        if changed {
            st.since_unix = now;
        }
        let weight_changed = weight != st.weight;
        st.alive = alive;
        st.weight = weight;
        changed || weight_changed
    }

    /// Records a report; returns whether the server's alive/weight changed, and its
    /// transition if it went up or down.
    pub fn record(&mut self, r: &Report) -> (bool, Option<Event>) {
        let Some(st) = self.servers.get_mut(&r.server) else {
            return (false, None);
        };
        let Some(c) = st.checks.get_mut(r.check) else {
            return (false, None);
        };
        let now = unix(r.at);
        c.last = Some(LastResult {
            ok: r.outcome.ok,
            detail: r.outcome.detail.clone(),
            latency: r.outcome.latency,
            at_unix: now,
        });
        if c.up != r.up {
            c.since_unix = now;
        }
        c.up = r.up;
        c.weight = r.weight;
        let was = st.alive;
        let changed = Self::settle(st, now);
        let event = (st.alive != was).then_some(Event::Server {
            server: r.server,
            alive: st.alive,
        });
        (changed, event)
    }

    pub fn server(&self, k: &ServerKey) -> Option<&ServerState> {
        self.servers.get(k)
    }

    pub fn servers(&self) -> impl Iterator<Item = (&ServerKey, &ServerState)> {
        self.servers.iter()
    }

    /// Whether a service with a quorum has it (`None`: no quorum configured).
    pub fn quorum_up(&self, k: &ServiceKey) -> Option<bool> {
        self.quorum.get(k).copied()
    }

    /// What the data plane serves: `configured` with dead servers removed (or at weight 0),
    /// probe-set weights, and the sorry server where no server is usable or the quorum is
    /// lost. Returns quorum transitions too.
    pub fn effective(&mut self, configured: &[ServiceConfig]) -> (Vec<ServiceConfig>, Vec<Event>) {
        let mut out = Vec::with_capacity(configured.len());
        let mut events = Vec::new();
        for s in configured {
            let mut svc = s.clone();
            svc.backends.clear();
            let mut alive_sum: u64 = 0;
            for b in &s.backends {
                let st = self.servers.get(&(s.key, b.addr, b.port));
                let (alive, weight) = st.map_or((true, b.weight), |st| (st.alive, st.weight));
                if alive {
                    alive_sum += weight as u64;
                    let mut e = b.clone();
                    e.weight = weight;
                    svc.backends.push(e);
                } else if b.health.inhibit_on_failure {
                    let mut e = b.clone();
                    e.weight = 0;
                    svc.backends.push(e);
                }
            }
            let h = &s.health;
            // keepalived's quorum with hysteresis (keepalived.md §5.4); without a quorum
            // setting, "usable" means some alive server with a weight.
            let quorum = h.quorum.max(1) as u64;
            let was = self.quorum.get(&s.key).copied();
            let up = match was {
                None => alive_sum >= quorum + h.hysteresis as u64,
                Some(true) => {
                    !(alive_sum == 0 || alive_sum < quorum.saturating_sub(h.hysteresis as u64))
                }
                Some(false) => alive_sum >= quorum + h.hysteresis as u64,
            };
            if h.quorum > 0 || h.sorry_server.is_some() {
                // At start-up only a lost quorum is announced (keepalived: quorum_up does not
                // run when the quorum is up from the start).
                if was != Some(up) && (was.is_some() || !up) {
                    events.push(Event::Quorum { service: s.key, up });
                }
                self.quorum.insert(s.key, up);
            }
            if !up && let Some((addr, port)) = h.sorry_server {
                // The sorry server replaces whatever is left (with weight 0 servers kept, so
                // their connections go on).
                for b in &mut svc.backends {
                    b.weight = 0;
                }
                let sorry = BackendConfig {
                    addr,
                    port,
                    weight: 1,
                    forwarding: s.forwarding,
                    tunnel: (s.forwarding == crate::config::Forwarding::Tunnel)
                        .then(crate::config::Tunnel::default),
                    upper_threshold: 0,
                    lower_threshold: 0,
                    health: Default::default(),
                };
                match svc
                    .backends
                    .iter_mut()
                    .find(|b| b.addr == addr && b.port == port)
                {
                    Some(b) => b.weight = 1,
                    None => svc.backends.push(sorry),
                }
            }
            out.push(svc);
        }
        (out, events)
    }
}
