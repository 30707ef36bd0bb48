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
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// After recovering, it takes connections again from this time (the service's
    /// `reentry_delay`; 0: at once).
    #[serde(default)]
    pub usable_from_unix: f64,
    /// The service's reentry delay.
    #[serde(default)]
    pub reentry_delay: Duration,
}

/// A change of a real server's or a service's state, for logs and notify programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Server { server: ServerKey, alive: bool },
    Quorum { service: ServiceKey, up: bool },
}

/// [`Health`] as saved for a successor.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SavedHealth {
    servers: Vec<(ServerKey, ServerState)>,
    quorum: Vec<(ServiceKey, bool)>,
}

#[derive(Clone, Default)]
pub struct Health {
    servers: HashMap<ServerKey, ServerState>,
    quorum: HashMap<ServiceKey, bool>,
}

/// `t` as Unix time in seconds.
pub fn unix(t: SystemTime) -> f64 {
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
                    usable_from_unix: 0.0,
                    reentry_delay: s.health.reentry_delay,
                });
                st.configured_weight = b.weight;
                st.reentry_delay = s.health.reentry_delay;
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
        // A server drained by hand (weight 0) stays drained whatever its probes say.
        let weight = if configured == 0 {
            0
        } else {
            w.clamp(0, 65535) as u32
        };
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
        if st.alive && !was {
            st.usable_from_unix = now + st.reentry_delay.as_secs_f64();
        }
        let event = (st.alive != was).then_some(Event::Server {
            server: r.server,
            alive: st.alive,
        });
        (changed, event)
    }

    /// What a successor needs to go on from this state (see [`Health::restore`]).
    pub fn saved(&self) -> SavedHealth {
        SavedHealth {
            // Servers without checks are always alive: nothing to carry over.
            servers: self
                .servers
                .iter()
                .filter(|(_, v)| !v.checks.is_empty())
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            quorum: self.quorum.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// A predecessor's state: its servers keep their verdicts (a dead server stays out
    /// until a check says otherwise); `sync` then drops what the configuration no longer has
    /// and resets changed checks.
    pub fn restore(s: SavedHealth) -> Self {
        Health {
            servers: s.servers.into_iter().collect(),
            quorum: s.quorum.into_iter().collect(),
        }
    }

    /// The earliest time a recovered server waiting out its reentry delay becomes usable.
    pub fn next_reentry(&self) -> Option<f64> {
        let now = unix(SystemTime::now());
        self.servers
            .values()
            .filter(|s| s.alive && s.usable_from_unix > now)
            .map(|s| s.usable_from_unix)
            .reduce(f64::min)
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
        // One clock reading for the whole pass.
        let now = unix(SystemTime::now());
        for s in configured {
            let mut svc = s.clone();
            svc.backends.clear();
            let mut alive_sum: u64 = 0;
            for b in &s.backends {
                let st = self.servers.get(&(s.key, b.addr, b.port));
                let (alive, weight) = st.map_or((true, b.weight), |st| {
                    (st.alive && st.usable_from_unix <= now, st.weight)
                });
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
            // setting, "usable" means some alive server with a weight. A quorum above what
            // all servers weigh together is lowered to that sum, as keepalived does.
            let total: u64 = s.backends.iter().map(|b| b.weight as u64).sum();
            let quorum = (h.quorum.max(1) as u64).min(total.max(1));
            let was = self.quorum.get(&s.key).copied();
            let up = match was {
                None => alive_sum >= quorum + h.hysteresis as u64,
                Some(true) => {
                    !(alive_sum == 0 || alive_sum < quorum.saturating_sub(h.hysteresis as u64))
                }
                Some(false) => alive_sum >= quorum + h.hysteresis as u64,
            };
            if h.quorum > 0
                || h.sorry_server.is_some()
                || h.quorum_up.is_some()
                || h.quorum_down.is_some()
            {
                // At start-up only a lost quorum is announced (keepalived: quorum_up does not
                // run when the quorum is up from the start).
                if was != Some(up) && (was.is_some() || !up) {
                    events.push(Event::Quorum { service: s.key, up });
                }
                self.quorum.insert(s.key, up);
            }
            if !up && let Some((addr, port)) = h.sorry_server {
                // The sorry server replaces whatever is left, as keepalived does: alive
                // servers are removed (a weight 0 would still hold sh/dh/mh buckets and
                // persistence templates), inhibited ones stay at weight 0.
                svc.backends.retain(|b| b.health.inhibit_on_failure);
                for b in &mut svc.backends {
                    b.weight = 0;
                }
                let sorry = BackendConfig {
                    addr,
                    port,
                    weight: 1,
                    forwarding: s.forwarding,
                    // A tunnelling service's sorry server takes the tunnel settings of its
                    // first tunnel server.
                    tunnel: (s.forwarding == crate::config::Forwarding::Tunnel)
                        .then(|| s.backends.iter().find_map(|b| b.tunnel).unwrap_or_default()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::Outcome;

    fn service(reentry: u64, sorry: bool) -> Vec<ServiceConfig> {
        let text = format!(
            "[dataplane]\ninterfaces = [\"x\"]\n[[services]]\nname = \"s\"\naddress = \"10.0.0.1:80\"\n{}reentry_delay = {reentry}\nquorum = 2\n\
             [[services.backends]]\naddress = \"10.0.0.11\"\nchecks = [{{ type = \"tcp\" }}]\n\
             [[services.backends]]\naddress = \"10.0.0.12\"\ninhibit_on_failure = true\nchecks = [{{ type = \"tcp\" }}]\n",
            if sorry {
                "sorry_server = \"10.0.0.99\"\n"
            } else {
                ""
            }
        );
        crate::config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap()
            .services
    }

    fn report(s: &ServiceConfig, i: usize, up: bool) -> Report {
        let b = &s.backends[i];
        Report {
            server: (s.key, b.addr, b.port),
            check: 0,
            task: 1,
            outcome: Outcome {
                ok: up,
                detail: String::new(),
                weight: None,
                latency: Duration::ZERO,
            },
            up,
            weight: None,
            at: SystemTime::now(),
        }
    }

    fn weights(v: &[ServiceConfig]) -> Vec<(String, u32)> {
        v[0].backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight))
            .collect()
    }

    /// Removal, inhibit, sorry server and quorum events, reentry delay.
    #[test]
    fn dead_servers_inhibit_sorry_and_reentry() {
        let cfg = service(3600, true);
        let mut h = Health::default();
        h.sync(&cfg);
        let (eff, ev) = h.effective(&cfg);
        assert_eq!(
            weights(&eff),
            [("10.0.0.11".into(), 1), ("10.0.0.12".into(), 1)]
        );
        assert!(ev.is_empty(), "quorum up from the start: no event");
        let (changed, ev) = h.record(&report(&cfg[0], 0, false));
        assert!(changed);
        assert_eq!(
            ev,
            Some(Event::Server {
                server: (cfg[0].key, "10.0.0.11".parse().unwrap(), 80),
                alive: false
            })
        );
        // be1 gone; below the quorum of 2: the sorry server in, be2 kept at weight 0.
        let (eff, ev) = h.effective(&cfg);
        assert_eq!(
            weights(&eff),
            [("10.0.0.12".into(), 0), ("10.0.0.99".into(), 1)]
        );
        assert_eq!(
            ev,
            [Event::Quorum {
                service: cfg[0].key,
                up: false
            }]
        );
        // be1 back, but its reentry delay (an hour) keeps it out.
        h.record(&report(&cfg[0], 0, true));
        assert!(h.next_reentry().is_some());
        let (eff, _) = h.effective(&cfg);
        assert!(!weights(&eff).iter().any(|(a, _)| a == "10.0.0.11"));
        // Without a delay it is back at once, the quorum (1 + 1) too.
        let cfg0 = service(0, true);
        let mut h = Health::default();
        h.sync(&cfg0);
        h.record(&report(&cfg0[0], 1, false));
        h.effective(&cfg0);
        h.record(&report(&cfg0[0], 1, true));
        let (eff, ev) = h.effective(&cfg0);
        assert_eq!(
            weights(&eff),
            [("10.0.0.11".into(), 1), ("10.0.0.12".into(), 1)]
        );
        assert_eq!(
            ev,
            [Event::Quorum {
                service: cfg0[0].key,
                up: true
            }]
        );
    }
}
