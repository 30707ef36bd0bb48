//! Runs the checks: one tokio task per (real server, check), sleeping between attempts as
//! the state machine says, reporting every outcome to the daemon. Thousands of checks are
//! thousands of sleeping tasks, not threads.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    machine::Checker,
    probe,
    spec::{CheckSpec, Outcome, Probe, Target},
};
use crate::config::{ServiceConfig, ServiceKey};

/// A real server of a service.
pub type ServerKey = (ServiceKey, IpAddr, u16);

/// One attempt's result, with the checker's state after it.
#[derive(Clone, Debug)]
pub struct Report {
    pub server: ServerKey,
    pub check: usize,
    /// The task that made it: a report of a replaced task is stale.
    pub task: u64,
    pub outcome: Outcome,
    pub up: bool,
    pub weight: Option<u32>,
    pub at: SystemTime,
}

/// A running check: its spec and target (the user programs run as included), the task's
/// id and handle.
struct Task {
    spec: CheckSpec,
    target: Target,
    id: u64,
    handle: JoinHandle<()>,
}

/// The running checks.
pub struct Runner {
    tasks: HashMap<(ServerKey, usize), Task>,
    next_task: u64,
    tx: mpsc::UnboundedSender<Report>,
    /// Programs run as this user unless a check names one (keepalived `script_user`).
    script_user: Option<String>,
}

/// A draw in [0, 1) from a key and the clock: checks of many servers spread over the warmup
/// instead of starting together.
fn jitter(key: &impl Hash) -> f64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Where a check of `server` goes.
pub fn target(
    spec: &CheckSpec,
    service: &ServiceConfig,
    addr: IpAddr,
    port: u16,
    weight: u32,
) -> Target {
    let port = spec
        .connect_port
        .unwrap_or(if port != 0 { port } else { service.key.port });
    Target {
        weight,
        addr: SocketAddr::new(spec.connect_ip.unwrap_or(addr), port),
        bind: spec.bind,
        timeout: spec.timing.timeout,
        script_user: None,
    }
}

impl Runner {
    pub fn new(tx: mpsc::UnboundedSender<Report>, script_user: Option<String>) -> Self {
        Runner {
            tasks: HashMap::new(),
            next_task: 1,
            tx,
            script_user,
        }
    }

    /// Programs run as `user` from now on (checks that run programs restart).
    pub fn set_script_user(&mut self, user: Option<String>) {
        self.script_user = user;
    }

    /// Whether a report comes from the task now running its check (not one replaced by a
    /// reload, whose last report may still be queued).
    pub fn is_current(&self, r: &Report) -> bool {
        self.tasks
            .get(&(r.server, r.check))
            .is_some_and(|t| t.id == r.task)
    }

    /// Runs exactly the checks of `services`: new ones start (from their initial state),
    /// changed ones restart, removed ones stop.
    pub fn reconcile(&mut self, services: &[ServiceConfig]) {
        let mut wanted: HashMap<(ServerKey, usize), (CheckSpec, Target)> = HashMap::new();
        for s in services {
            for b in &s.backends {
                for (i, c) in b.health.checks.iter().enumerate() {
                    let mut t = target(c, s, b.addr, b.port, b.weight);
                    t.script_user = self.script_user.clone();
                    wanted.insert(((s.key, b.addr, b.port), i), (c.clone(), t));
                }
            }
        }
        self.tasks.retain(|k, t| {
            let keep = wanted
                .get(k)
                .is_some_and(|(w, target)| *w == t.spec && *target == t.target);
            if !keep {
                t.handle.abort();
            }
            keep
        });
        for (k, (spec, target)) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            let tx = self.tx.clone();
            let task_spec = spec.clone();
            let task_target = target.clone();
            let id = self.next_task;
            self.next_task += 1;
            let handle = tokio::spawn(check_loop(k.0, k.1, id, task_spec, target, tx));
            self.tasks.insert(
                k,
                Task {
                    spec,
                    target: task_target,
                    id,
                    handle,
                },
            );
        }
    }

    /// Checks running.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    pub fn stop(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.handle.abort();
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn check_loop(
    server: ServerKey,
    check: usize,
    task: u64,
    spec: CheckSpec,
    target: Target,
    tx: mpsc::UnboundedSender<Report>,
) {
    let (urls, fast) = match &spec.probe {
        Probe::Http(h) => (h.urls.len(), h.fast_recovery),
        _ => (1, false),
    };
    let mut m = Checker::new(spec.timing, urls, fast);
    tokio::time::sleep(m.first_delay(jitter(&(server, check)))).await;
    loop {
        let outcome = probe::run(&spec.probe, &target, m.url()).await;
        let (_, next) = m.record(&outcome);
        let report = Report {
            server,
            check,
            task,
            outcome,
            up: m.is_up(),
            weight: m.weight(),
            at: SystemTime::now(),
        };
        if tx.send(report).is_err() {
            return;
        }
        tokio::time::sleep(next.max(Duration::from_millis(1))).await;
    }
}
