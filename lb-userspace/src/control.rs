//! The running daemon's state and every way it changes: administrative changes (ipvsadm,
//! API), reloads of the configuration, zeroing, rate sampling. Each change is computed on a
//! copy of the model, validated whole, and applied by the engine in one switch; a refused
//! change leaves everything as it was.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::SystemTime,
};

use anyhow::{Context, Result, bail};
use lb_common::tcp;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::{
    api::{ChangesRequest, ChangesResponse, ConnView},
    change::{Change, ChangeError, Model},
    config::{self, Config, DataplaneConfig, ServiceConfig, ServiceKey},
    dataplane::Dataplane,
    engine::{CountersView, Engine, ServiceView, monotonic_coarse_ticks},
    estimator::Estimator,
    render,
};

/// Where the configuration comes from, for reloads.
#[derive(Clone, Debug)]
pub enum Source {
    Toml(PathBuf),
    Keepalived {
        path: PathBuf,
        /// `--interface` given on the command line.
        interfaces: Vec<String>,
    },
}

impl Source {
    pub fn path(&self) -> &std::path::Path {
        match self {
            Source::Toml(p) | Source::Keepalived { path: p, .. } => p,
        }
    }
}

/// The outcome of the last reload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReloadResult {
    pub at_unix: u64,
    pub ok: bool,
    pub message: String,
}

/// What counters and rates are kept per: a service, or a real server of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum StatKey {
    Service(ServiceKey),
    Server(ServiceKey, IpAddr, u16),
}

/// A `-Z` snapshot: the raw counters at the time, for the id/index they were read at (an
/// entry that got a new index since counts afresh).
#[derive(Clone, Debug)]
struct Baseline {
    index: u32,
    at: CountersView,
}

#[derive(Clone, Debug, Default)]
struct Rate {
    index: u32,
    est: Estimator,
}

/// What the daemon shares between its tasks (behind one async mutex: changes are rare and
/// short; packets never wait for it).
pub struct Daemon {
    pub dp: Dataplane,
    pub engine: Engine,
    pub source: Source,
    /// The data-plane settings in force (a reload cannot change them live).
    pub dataplane: DataplaneConfig,
    /// The file's [control] settings at start (socket, metrics, pin_dir): a reload that
    /// changes them is told they wait for a restart.
    pub control: (PathBuf, Option<SocketAddr>, Option<PathBuf>),
    /// Tells the neighbour watcher which real servers to keep resolved.
    pub watch: Option<UnboundedSender<Vec<IpAddr>>>,
    /// Counts applied configurations (start-up is 1).
    pub generation: u64,
    pub last_reload: Option<ReloadResult>,
    baselines: HashMap<StatKey, Baseline>,
    rates: HashMap<StatKey, Rate>,
    /// Where the engine's state is saved for a successor (`None`: not pinned, not saved).
    pub state_path: Option<PathBuf>,
    /// The engine changed since the state was last saved.
    pub dirty: bool,
    /// A successor asked to take over: no more changes.
    pub handing_over: bool,
    /// The services as configured (file, reloads, ipvsadm); the engine serves them with the
    /// health checks' verdicts applied.
    pub configured: Vec<ServiceConfig>,
    pub health: crate::health::state::Health,
    /// The running checks (`None` in tests that do not check).
    pub runner: Option<crate::health::runner::Runner>,
    /// Notify programs and checks run as this user unless they name one.
    pub script_user: Option<String>,
    /// When a recovered server's reentry delay runs out (Unix time).
    pub reentry_due: Option<f64>,
    /// Health verdicts not yet applied (the last apply failed).
    pub health_dirty: bool,
    /// Final counters of the services removed so far (they stay in the totals).
    pub retired: CountersView,
    /// Wakes the main loop for a handover.
    pub handover: std::sync::Arc<tokio::sync::Notify>,
    /// VRRP and connection sync as running (changes take effect at a restart).
    pub ha: crate::vrrp::config::Ha,
    /// The VRRP instances' state, as the VRRP task publishes it.
    pub vrrp: Option<crate::vrrp::run::StatusHandle>,
    /// The connection sync's counters, if it runs.
    pub conn_sync: Option<std::sync::Arc<crate::vrrp::syncd::SyncStats>>,
    /// The kernel still has an XDP program on every attached interface (checked
    /// periodically; an operator's `ip link set dev X xdp off` clears it).
    pub xdp_present: bool,
}

/// How long a notify program may run.
const NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bumped whenever the saved state or a pinned map's layout changes meaning.
const STATE_VERSION: u32 = 1;

/// The sizes of every pinned map's key and value type: a successor built with other layouts
/// must not adopt the maps.
pub fn layout_fingerprint() -> Vec<usize> {
    use lb_common::*;
    use std::mem::size_of;
    vec![
        size_of::<BackendSlot>(),
        size_of::<ConnCounts>(),
        size_of::<Counters>(),
        size_of::<FlowKeyV4>(),
        size_of::<FlowKeyV6>(),
        size_of::<Flow>(),
        size_of::<FlowPool>(),
        size_of::<FlowQuota>(),
        size_of::<FragKeyV4>(),
        size_of::<FragKeyV6>(),
        size_of::<Fragment>(),
        size_of::<Globals>(),
        size_of::<GroupState>(),
        size_of::<LocalityKeyV4>(),
        size_of::<LocalityKeyV6>(),
        size_of::<Locality>(),
        size_of::<NatV4>(),
        size_of::<NatV6>(),
        size_of::<SchedState>(),
        size_of::<Service>(),
        size_of::<ServiceKeyV4>(),
        size_of::<ServiceKeyV6>(),
        size_of::<TemplateKeyV4>(),
        size_of::<TemplateKeyV6>(),
        size_of::<Template>(),
        wide::V4_LEN,
        wide::V6_LEN,
    ]
}

/// What a daemon leaves for its successor next to its socket.
#[derive(Serialize, Deserialize)]
pub struct SavedState {
    version: u32,
    layout: Vec<usize>,
    xlb: String,
    generation: u64,
    engine: crate::engine::EngineSnapshot,
    /// The health checks' verdicts (a dead server stays out across a restart).
    #[serde(default)]
    health: crate::health::state::SavedHealth,
}

/// What a predecessor left: its engine, configuration generation and health verdicts.
pub struct Predecessor {
    pub engine: crate::engine::EngineSnapshot,
    pub generation: u64,
    pub health: crate::health::state::SavedHealth,
}

/// Reads a predecessor's saved state; `Err` says why it cannot be used.
pub fn read_state(path: &std::path::Path) -> Result<Predecessor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let s: SavedState =
        serde_json::from_slice(&bytes).with_context(|| format!("decoding {}", path.display()))?;
    if s.version != STATE_VERSION || s.layout != layout_fingerprint() {
        bail!(
            "{} was written by xlb {} with other map layouts",
            path.display(),
            s.xlb
        );
    }
    Ok(Predecessor {
        engine: s.engine,
        generation: s.generation,
        health: s.health,
    })
}

fn add(a: &mut CountersView, b: &CountersView) {
    a.conns += b.conns;
    a.in_packets += b.in_packets;
    a.in_bytes += b.in_bytes;
    a.out_packets += b.out_packets;
    a.out_bytes += b.out_bytes;
}

fn sub(a: &CountersView, b: &CountersView) -> CountersView {
    CountersView {
        conns: a.conns.saturating_sub(b.conns),
        in_packets: a.in_packets.saturating_sub(b.in_packets),
        in_bytes: a.in_bytes.saturating_sub(b.in_bytes),
        out_packets: a.out_packets.saturating_sub(b.out_packets),
        out_bytes: a.out_bytes.saturating_sub(b.out_bytes),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Daemon {
    pub fn new(dp: Dataplane, engine: Engine, source: Source, config: &Config) -> Self {
        Daemon {
            dp,
            engine,
            source,
            dataplane: config.dataplane.clone(),
            control: (
                config.socket.clone(),
                config.metrics,
                config.pin_dir.clone(),
            ),
            watch: None,
            generation: 0,
            last_reload: None,
            baselines: HashMap::new(),
            rates: HashMap::new(),
            state_path: None,
            dirty: false,
            handing_over: false,
            configured: Vec::new(),
            health: Default::default(),
            runner: None,
            script_user: None,
            reentry_due: None,
            health_dirty: false,
            retired: CountersView::default(),
            handover: Default::default(),
            ha: config.ha.clone(),
            vrrp: None,
            conn_sync: None,
            xdp_present: true,
        }
    }

    /// xlb's data plane as each VRRP instance with `track_dataplane` sees it (by instance
    /// index): down when the program is off an interface, or when a tracked service has no
    /// real server left to take connections.
    pub fn dataplane_health(&self) -> HashMap<usize, bool> {
        let attached = self.xdp_present
            && self
                .dataplane
                .interfaces
                .iter()
                .all(|i| self.dp.attachments().iter().any(|a| a.interface == i.value));
        let services: Vec<&ServiceConfig> = self.engine.configs().collect();
        let mut out = HashMap::new();
        for (idx, inst) in self.ha.instances.iter().enumerate() {
            let Some(t) = &inst.track_dataplane else {
                continue;
            };
            let serving = services
                .iter()
                .filter(|s| t.services.is_empty() || t.services.contains(&s.name))
                .all(|s| s.backends.iter().any(|b| b.weight > 0));
            out.insert(idx, attached && serving);
        }
        out
    }

    /// Saves the engine's state for a successor (written whole, then renamed into place).
    pub fn save_state(&mut self) -> Result<()> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let state = SavedState {
            version: STATE_VERSION,
            layout: layout_fingerprint(),
            xlb: env!("CARGO_PKG_VERSION").to_string(),
            generation: self.generation,
            engine: self.engine.snapshot(),
            health: self.health.saved(),
        };
        let tmp = path.with_extension("state.tmp");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&tmp, serde_json::to_vec(&state)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// The model in force.
    /// The model in force, as configured (health checks act on top of it).
    pub fn model(&self) -> Model {
        Model {
            services: self.configured.clone(),
            timeouts: self.engine.timeouts(),
        }
    }

    /// Takes over what start-up installed: the configured services, the health state they
    /// were installed with (see [`initial_health`]), and starts the checks.
    pub fn start_health(
        &mut self,
        configured: Vec<ServiceConfig>,
        health: crate::health::state::Health,
        events: Vec<crate::health::state::Event>,
        runner: crate::health::runner::Runner,
    ) {
        self.configured = configured;
        self.health = health;
        let mut runner = runner;
        runner.reconcile(&self.configured);
        self.runner = Some(runner);
        self.handle_events(events);
    }

    /// Whether a health tick without reports has work: a recovered server's reentry delay ran
    /// out, or an earlier apply failed and is to be tried again.
    pub fn health_due(&self) -> bool {
        self.health_dirty || self.reentry_ran_out()
    }

    fn reentry_ran_out(&self) -> bool {
        self.reentry_due
            .is_some_and(|t| t <= crate::health::state::unix(SystemTime::now()))
    }

    /// Applies the reports of the health checks (batched by the caller): transitions are
    /// logged and notified, and if any server's state changed the data plane follows.
    pub fn on_health(&mut self, reports: Vec<crate::health::runner::Report>) {
        // A recovered server whose reentry delay ran out since the last batch, or a failed
        // apply of an earlier batch to try again.
        let mut changed = self.health_due();
        let mut events = Vec::new();
        for r in &reports {
            if self.runner.as_ref().is_some_and(|run| !run.is_current(r)) {
                continue;
            }
            let (c, e) = self.health.record(r);
            changed |= c;
            if !r.outcome.ok {
                tracing::debug!(server = %std::net::SocketAddr::new(r.server.1, r.server.2), check = r.check, detail = %r.outcome.detail, "check failed");
            }
            events.extend(e);
        }
        if !changed || self.handing_over {
            self.reentry_due = self.health.next_reentry();
            self.handle_events(events);
            return;
        }
        let (effective, quorum_events) = self.health.effective(&self.configured);
        self.reentry_due = self.health.next_reentry();
        events.extend(quorum_events);
        match self.engine.apply(&mut self.dp, &effective) {
            Ok(()) => {
                self.health_dirty = false;
                self.generation += 1;
                self.dirty = true;
                if let Err(e) = self.save_state() {
                    tracing::warn!("saving state for a successor: {e:#}");
                }
            }
            Err(e) => {
                // Kept for the next tick: the verdicts stand, the data plane catches up.
                self.health_dirty = true;
                tracing::error!("applying health changes (retried): {e:#}");
            }
        }
        self.handle_events(events);
    }

    /// Logs state changes and runs their notify programs (in the background, with a
    /// timeout, without a shell, as the script user).
    fn handle_events(&self, events: Vec<crate::health::state::Event>) {
        use crate::health::state::Event;
        for e in events {
            let (argv, addr, what) = match &e {
                Event::Server { server, alive } => {
                    let addr = SocketAddr::new(server.1, server.2);
                    let detail = self
                        .health
                        .server(server)
                        .map(|st| {
                            st.checks
                                .iter()
                                .filter_map(|c| {
                                    c.last.as_ref().map(|l| format!("{}: {}", c.kind, l.detail))
                                })
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_default();
                    if *alive {
                        tracing::info!(service = %server.0, server = %addr, %detail, "real server up");
                    } else {
                        tracing::warn!(service = %server.0, server = %addr, %detail, "real server down");
                    }
                    let b = self
                        .configured
                        .iter()
                        .find(|s| s.key == server.0)
                        .and_then(|s| {
                            s.backends
                                .iter()
                                .find(|b| b.addr == server.1 && b.port == server.2)
                        });
                    let argv = b.and_then(|b| {
                        if *alive {
                            b.health.notify_up.clone()
                        } else {
                            b.health.notify_down.clone()
                        }
                    });
                    (argv, addr, if *alive { "notify_up" } else { "notify_down" })
                }
                Event::Quorum { service, up } => {
                    let addr = SocketAddr::new(service.addr, service.port);
                    if *up {
                        tracing::info!(%service, "quorum gained");
                    } else {
                        tracing::warn!(%service, "quorum lost");
                    }
                    let s = self.configured.iter().find(|s| s.key == *service);
                    let argv = s.and_then(|s| {
                        if *up {
                            s.health.quorum_up.clone()
                        } else {
                            s.health.quorum_down.clone()
                        }
                    });
                    (argv, addr, if *up { "quorum_up" } else { "quorum_down" })
                }
            };
            if let Some(argv) = argv {
                let user = self.script_user.clone();
                tokio::spawn(async move {
                    let o =
                        crate::health::probe::run_command(argv, addr, user, NOTIFY_TIMEOUT).await;
                    if o.ok {
                        tracing::info!(script = what, %addr, "ran");
                    } else {
                        tracing::warn!(script = what, %addr, detail = %o.detail, "failed");
                    }
                });
            }
        }
    }

    /// Validates `model` completely and makes the data plane serve it (with the health
    /// checks' verdicts on top); on error nothing changed.
    pub fn apply_model(&mut self, model: &Model) -> Result<()> {
        if self.handing_over {
            bail!("this daemon is handing over to a successor: no more changes");
        }
        render::validate_change(&self.configured, &model.services, &self.dp.limits)
            .map_err(anyhow::Error::msg)?;
        let mut health = self.health.clone();
        health.sync(&model.services);
        let (effective, events) = health.effective(&model.services);
        // Counters of services about to go are kept in the totals (node_ipvs_*_total never
        // goes back, as IPVS's /proc/net/ip_vs_stats does not).
        let staying: std::collections::HashSet<ServiceKey> =
            effective.iter().map(|s| s.key).collect();
        let leaving: Vec<ServiceKey> = self
            .engine
            .configs()
            .map(|s| s.key)
            .filter(|k| !staying.contains(k))
            .collect();
        let mut gone = CountersView::default();
        for k in &leaving {
            if let Some(id) = self.engine.service_id(k)
                && let Ok(c) = self.dp.service_stats(id)
            {
                add(&mut gone, &c.into());
            }
        }
        self.engine.apply(&mut self.dp, &effective)?;
        self.health = health;
        self.configured = model.services.clone();
        if let Some(r) = &mut self.runner {
            r.reconcile(&self.configured);
        }
        self.handle_events(events);
        add(&mut self.retired, &gone);
        self.generation += 1;
        self.dirty = true;
        let timeouts = if model.timeouts != self.engine.timeouts() {
            self.engine.set_timeouts(&mut self.dp, model.timeouts)
        } else {
            Ok(())
        };
        if let Some(w) = &self.watch {
            let _ = w.send(watched_addrs(&self.configured));
        }
        // Counters of what is gone, or counts afresh under a new index, are forgotten.
        let live: HashMap<StatKey, u32> = self.indexes();
        self.baselines
            .retain(|k, b| live.get(k).is_some_and(|i| *i == b.index));
        self.rates
            .retain(|k, r| live.get(k).is_some_and(|i| *i == r.index));
        // A successor must find exactly what the maps hold now, even if this process dies
        // in the next instant.
        if let Err(e) = self.save_state() {
            tracing::warn!("saving state for a successor: {e:#}");
        }
        timeouts
    }

    /// Every service and server with its id / backend index.
    fn indexes(&self) -> HashMap<StatKey, u32> {
        let mut m = HashMap::new();
        for s in self.engine.configs() {
            if let Some(id) = self.engine.service_id(&s.key) {
                m.insert(StatKey::Service(s.key), id);
            }
            for b in &s.backends {
                if let Some(i) = self.engine.backend_index(&s.key, b.addr, b.port) {
                    m.insert(StatKey::Server(s.key, b.addr, b.port), i);
                }
            }
        }
        m
    }

    /// Applies a batch of changes (ipvsadm commands, `ipvsadm -R`, the API).
    pub fn apply_changes(&mut self, req: &ChangesRequest) -> ChangesResponse {
        let mut model = self.model();
        let mut results = Vec::with_capacity(req.changes.len());
        let mut zero = Vec::new();
        let mut failed = false;
        for c in &req.changes {
            match c.apply(&mut model) {
                Ok(()) => {
                    if let Change::Zero { key } = c {
                        zero.push(*key);
                    }
                    results.push(None);
                }
                Err(e) => {
                    failed = true;
                    results.push(Some(e));
                }
            }
        }
        if failed && !req.skip_failed {
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(ChangeError::Invalid(
                    "not made: another change of the batch was refused".into(),
                ));
            }
            return ChangesResponse {
                results,
                applied: false,
                error: None,
            };
        }
        let structural = req
            .changes
            .iter()
            .zip(&results)
            .any(|(c, r)| r.is_none() && !matches!(c, Change::Zero { .. }));
        if structural && let Err(e) = self.apply_model(&model) {
            tracing::warn!("change refused: {e:#}");
            // A refusal of the result is reported on every change that was to be made
            // (zeroing included: nothing of the batch happens).
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(ChangeError::Invalid(format!("{e:#}")));
            }
            return ChangesResponse {
                results,
                applied: false,
                error: Some(format!("{e:#}")),
            };
        }
        for key in zero {
            if let Err(e) = self.zero(key) {
                return ChangesResponse {
                    results,
                    applied: structural,
                    error: Some(format!("zeroing counters: {e:#}")),
                };
            }
        }
        if structural {
            tracing::info!(
                changes = req.changes.len(),
                generation = self.generation,
                "administrative change applied"
            );
        }
        ChangesResponse {
            results,
            applied: true,
            error: None,
        }
    }

    /// `ipvsadm -Z [service]`: what ipvsadm shows starts again from zero; the data plane's
    /// counters (and Prometheus') keep counting.
    pub fn zero(&mut self, key: Option<ServiceKey>) -> Result<()> {
        let views = self.engine.view(&self.dp)?;
        for s in views.iter().filter(|s| key.is_none_or(|k| k == s.key)) {
            let k = StatKey::Service(s.key);
            self.rates.entry(k.clone()).or_default().est.reset(&s.stats);
            self.baselines.insert(
                k,
                Baseline {
                    index: s.id,
                    at: s.stats.clone(),
                },
            );
            for b in &s.backends {
                let k = StatKey::Server(s.key, b.addr, b.port);
                self.rates.entry(k.clone()).or_default().est.reset(&b.stats);
                self.baselines.insert(
                    k,
                    Baseline {
                        index: b.index,
                        at: b.stats.clone(),
                    },
                );
            }
        }
        Ok(())
    }

    /// One 2-second sample of every estimator.
    pub fn sample_rates(&mut self) -> Result<()> {
        let views = self.engine.view(&self.dp)?;
        let mut seen = HashSet::new();
        let mut sample = |k: StatKey, index: u32, c: &CountersView| {
            let r = self.rates.entry(k.clone()).or_default();
            if r.index != index {
                *r = Rate {
                    index,
                    est: Estimator::default(),
                };
            }
            r.est.sample(c);
            seen.insert(k);
        };
        for s in &views {
            sample(StatKey::Service(s.key), s.id, &s.stats);
            for b in &s.backends {
                sample(StatKey::Server(s.key, b.addr, b.port), b.index, &b.stats);
            }
        }
        self.rates.retain(|k, _| seen.contains(k));
        Ok(())
    }

    /// The raw view (counters since each entry was created; what Prometheus exports).
    /// `persistent_conns` walks the template tables for `--persistent-conn`'s column.
    pub fn raw_view(&self, persistent_conns: bool) -> Result<Vec<ServiceView>> {
        let mut views = self.engine.view(&self.dp)?;
        let mut persist: HashMap<u32, u64> = HashMap::new();
        if persistent_conns && views.iter().any(|s| s.persistence.is_some()) {
            for (_, _, t) in self.dp.templates() {
                *persist.entry(t.backend).or_default() += 1;
            }
        }
        for s in &mut views {
            if let Some(r) = self.rates.get(&StatKey::Service(s.key)) {
                s.rate = r.est.read();
            }
            for b in &mut s.backends {
                if let Some(r) = self.rates.get(&StatKey::Server(s.key, b.addr, b.port)) {
                    b.rate = r.est.read();
                }
                b.persist_conns = persist.get(&b.index).copied().unwrap_or(0);
            }
        }
        Ok(views)
    }

    /// The view ipvsadm shows: counters since the last `-Z`.
    pub fn view(&self) -> Result<Vec<ServiceView>> {
        let mut views = self.raw_view(true)?;
        for s in &mut views {
            if let Some(b) = self.baselines.get(&StatKey::Service(s.key))
                && b.index == s.id
            {
                s.stats = sub(&s.stats, &b.at);
            }
            for be in &mut s.backends {
                if let Some(b) = self
                    .baselines
                    .get(&StatKey::Server(s.key, be.addr, be.port))
                    && b.index == be.index
                {
                    be.stats = sub(&be.stats, &b.at);
                }
            }
        }
        Ok(views)
    }

    /// The connection table as `ipvsadm -L -c` lists it (connections, then templates).
    pub fn connections(&self) -> Vec<ConnView> {
        let now = monotonic_coarse_ticks();
        let secs_left = |last: u32, timeout_secs: u32| -> u32 {
            let idle = now.wrapping_sub(last) as u64;
            let idle_secs = (idle << lb_common::ticks::SHIFT) / 1_000_000_000;
            (timeout_secs as u64).saturating_sub(idle_secs) as u32
        };
        let mut servers: HashMap<u32, SocketAddr> = HashMap::new();
        let mut services: HashMap<u32, ServiceKey> = HashMap::new();
        for s in self.engine.configs() {
            if let Some(id) = self.engine.service_id(&s.key) {
                services.insert(id, s.key);
            }
            for b in &s.backends {
                if let Some(i) = self.engine.backend_index(&s.key, b.addr, b.port) {
                    servers.insert(i, SocketAddr::new(b.addr, b.port));
                }
            }
        }
        let mut out = Vec::new();
        let mut push = |proto: u8, client: SocketAddr, vip: SocketAddr, f: &lb_common::Flow| {
            if f.status & lb_common::FLOW_DEAD != 0 {
                return;
            }
            let Some(dest) = servers.get(&f.backend) else {
                return;
            };
            // DR and tunnel servers keep the packet's port.
            let dest = if dest.port() == 0 {
                SocketAddr::new(dest.ip(), vip.port())
            } else {
                *dest
            };
            let state = f.state();
            out.push(ConnView {
                protocol: if proto == lb_common::PROTO_UDP {
                    "UDP"
                } else {
                    "TCP"
                }
                .into(),
                expire_secs: secs_left(f.last_seen, self.engine.state_timeout(state)),
                state: tcp::STATE_NAMES
                    .get(state as usize)
                    .copied()
                    .unwrap_or("NONE")
                    .into(),
                client,
                vip,
                dest,
            });
        };
        for (k, f) in self.dp.flows_v4() {
            let client = SocketAddr::new(IpAddr::from(k.src.to_ne_bytes()), u16::from_be(k.sport));
            let vip = SocketAddr::new(IpAddr::from(k.dst.to_ne_bytes()), u16::from_be(k.dport));
            push(k.proto, client, vip, &f);
        }
        for (k, f) in self.dp.flows_v6() {
            let client = SocketAddr::new(crate::engine::v6_of_words(k.src), u16::from_be(k.sport));
            let vip = SocketAddr::new(crate::engine::v6_of_words(k.dst), u16::from_be(k.dport));
            push(k.proto, client, vip, &f);
        }
        // Persistence templates: client network, port 0; state NONE as IPVS shows them.
        for (id, net, t) in self.dp.templates() {
            let (Some(key), Some(dest)) = (services.get(&id), servers.get(&t.backend)) else {
                continue;
            };
            let timeout_secs =
                ((t.timeout as u64) << lb_common::ticks::SHIFT).div_ceil(1_000_000_000) as u32;
            out.push(ConnView {
                protocol: key.protocol.label().into(),
                expire_secs: secs_left(t.last_used, timeout_secs),
                state: "NONE".into(),
                client: SocketAddr::new(net, 0),
                vip: SocketAddr::new(key.addr, key.port),
                dest: *dest,
            });
        }
        out
    }

    /// Re-reads the configuration and applies what changed. Data-plane settings (interfaces,
    /// map sizes) cannot change while running: such a change is refused, naming them.
    pub fn reload(&mut self) -> Result<()> {
        let result = self.try_reload();
        self.last_reload = Some(ReloadResult {
            at_unix: unix_now(),
            ok: result.is_ok(),
            message: match &result {
                Ok(()) => format!("generation {}", self.generation),
                Err(e) => format!("{e:#}"),
            },
        });
        match &result {
            Ok(()) => tracing::info!(
                config = %self.source.path().display(),
                generation = self.generation,
                "configuration reloaded"
            ),
            Err(e) => tracing::error!(
                config = %self.source.path().display(),
                "reload refused, running configuration kept: {e:#}"
            ),
        }
        result
    }

    fn try_reload(&mut self) -> Result<()> {
        let config = load_source(&self.source)?;
        let names = |d: &DataplaneConfig| -> Vec<String> {
            d.interfaces.iter().map(|i| i.value.clone()).collect()
        };
        if names(&config.dataplane) != names(&self.dataplane) {
            bail!(
                "the interfaces changed ({:?} → {:?}): restart xlb to attach elsewhere",
                names(&self.dataplane),
                names(&config.dataplane)
            );
        }
        if config.dataplane.limits != self.dataplane.limits {
            bail!("[dataplane] map sizes changed: restart xlb to resize the maps");
        }
        if config.dataplane.xdp_mode != self.dataplane.xdp_mode {
            bail!("[dataplane] xdp_mode changed: restart xlb to re-attach");
        }
        if (&config.socket, config.metrics, &config.pin_dir)
            != (&self.control.0, self.control.1, &self.control.2)
        {
            tracing::warn!(
                "[control] settings changed in the file: they take effect at the next restart"
            );
        }
        if config.script_security {
            crate::health::security::check(&config.services, config.script_user.as_deref())
                .map_err(anyhow::Error::msg)?;
        }
        if config.ha != self.ha {
            tracing::warn!(
                "VRRP / conn_sync settings changed in the file: they take effect at the next restart (restarting VRRP here would hand the VIPs over)"
            );
        }
        // The user programs run as is part of the new configuration (checks that run
        // programs restart under it).
        let old_user = std::mem::replace(&mut self.script_user, config.script_user.clone());
        if let Some(r) = &mut self.runner {
            r.set_script_user(config.script_user.clone());
        }
        if let Err(e) = self.apply_model(&Model {
            services: config.services,
            timeouts: config.timeouts,
        }) {
            self.script_user = old_user.clone();
            if let Some(r) = &mut self.runner {
                r.set_script_user(old_user);
            }
            return Err(e);
        }
        if config.dataplane.expire_nodest_conn != self.dataplane.expire_nodest_conn {
            self.engine
                .set_expire_nodest_conn(&mut self.dp, config.dataplane.expire_nodest_conn)?;
            self.dataplane.expire_nodest_conn = config.dataplane.expire_nodest_conn;
        }
        Ok(())
    }
}

/// The addresses whose next hops must be kept resolved: every real server and sorry server
/// (a sorry server is served only when needed, and must be ready then).
pub fn watched_addrs(services: &[ServiceConfig]) -> Vec<std::net::IpAddr> {
    let mut v: Vec<std::net::IpAddr> = services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .map(|b| b.addr)
                .chain(s.health.sorry_server.map(|(a, _)| a))
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The health state a configuration starts with (servers up, those with `alpha` checks
/// down) and the services the data plane serves with it.
pub fn initial_health(
    configured: &[ServiceConfig],
    predecessor: Option<crate::health::state::SavedHealth>,
) -> (
    crate::health::state::Health,
    Vec<ServiceConfig>,
    Vec<crate::health::state::Event>,
) {
    let mut health = predecessor
        .map(crate::health::state::Health::restore)
        .unwrap_or_default();
    health.sync(configured);
    let (effective, events) = health.effective(configured);
    (health, effective, events)
}

/// Reads the configuration a daemon runs from.
pub fn load_source(source: &Source) -> Result<Config> {
    match source {
        Source::Toml(p) => Ok(config::load(p)?),
        Source::Keepalived { path, interfaces } => crate::keepalived_config::load(path, interfaces)
            .with_context(|| format!("reading {}", path.display())),
    }
}
