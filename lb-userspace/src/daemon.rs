//! `xlb run`: load, fill the maps, attach, serve the admin API, keep next hops current, and
//! detach cleanly on SIGINT/SIGTERM.

use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::{EVENT_NEIGH_MISSING, EVENT_ROUTE_MISSING, Event};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, Daemon, Shared},
    config::{self, Config},
    control::Source,
    dataplane::{self, Dataplane},
    engine::Engine,
    neigh,
};

/// How often next hops are re-checked (and stale neighbour entries refreshed).
const NEIGH_REFRESH: Duration = Duration::from_secs(10);
/// At most one resolution request per real server this often, however many packets find it
/// unresolved.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(500);
/// How often idle connections are retired (IPVS's per-connection timers fire within a jiffy;
/// counts here lag the timeout by at most this).
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// How often health-check reports are applied (a transition reaches the data plane at most
/// this much later than its check).
const HEALTH_TICK: Duration = Duration::from_millis(50);
/// How often xlb's own data plane is checked for VRRP's `track_dataplane`.
const DATAPLANE_TRACK: Duration = Duration::from_millis(500);
/// How long start-up waits for the kernel to resolve real servers before attaching.
const NEIGH_STARTUP_WAIT: Duration = Duration::from_secs(2);

/// How `xlb run` was asked to configure itself.
pub enum Startup {
    Toml(PathBuf),
    Keepalived {
        path: PathBuf,
        interfaces: Vec<String>,
    },
}

/// Reads the configuration; for a keepalived.conf, settles which interfaces to attach to.
async fn startup_config(startup: Startup) -> Result<(Config, Source)> {
    match startup {
        Startup::Toml(p) => Ok((config::load(&p)?, Source::Toml(p))),
        Startup::Keepalived { path, interfaces } => {
            let loaded = crate::keepalived_config::read(&path, &interfaces)?;
            for w in &loaded.warnings {
                warn!("{w}");
            }
            let mut config = loaded.config;
            if config.dataplane.interfaces.is_empty() {
                let mut vips: Vec<IpAddr> = config.services.iter().map(|s| s.key.addr).collect();
                vips.sort();
                vips.dedup();
                let chosen = crate::keepalived_config::vip_interfaces(&vips).await?;
                info!(interfaces = ?chosen, "attaching to the interfaces that route the VIPs");
                config.dataplane.interfaces = chosen
                    .into_iter()
                    .map(|value| config::Located {
                        value,
                        file: path.display().to_string(),
                        line: 0,
                        column: 0,
                    })
                    .collect();
            }
            if config.dataplane.interfaces.is_empty() {
                anyhow::bail!(
                    "{}: no interface to attach to (no --interface, no vrrp_instance, no virtual_server)",
                    path.display()
                );
            }
            let interfaces = config
                .dataplane
                .interfaces
                .iter()
                .map(|i| i.value.clone())
                .collect();
            Ok((config, Source::Keepalived { path, interfaces }))
        }
    }
}

/// Where a daemon keeps its state for a successor: beside its socket.
pub fn state_path(socket: &std::path::Path) -> PathBuf {
    socket.with_extension("state")
}

/// Asks the daemon on `socket` to hand over, and waits until it is gone.
async fn take_over(socket: &std::path::Path) -> Result<()> {
    if tokio::net::UnixStream::connect(socket).await.is_err() {
        info!(socket = %socket.display(), "no running daemon to take over from");
        return Ok(());
    }
    let _: api::HandoverResponse = api::post_json(socket, "/v1/handover", &())
        .await
        .context("asking the running daemon to hand over")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::UnixStream::connect(socket).await.is_ok() {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the running daemon did not hand over within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!("the previous daemon handed over");
    Ok(())
}

/// Loads the data plane with its maps pinned under `pin_dir`; a predecessor's maps and saved
/// state are adopted. Pinned maps without a usable saved state are not this instance's to
/// take (another instance's, or a predecessor that died before saving): the start is refused
/// and they are left alone.
fn load_dataplane(
    config: &Config,
    pin_dir: &std::path::Path,
    state: &std::path::Path,
) -> Result<(
    Dataplane,
    Engine,
    u64,
    Option<crate::health::state::SavedHealth>,
)> {
    let dp = Dataplane::load_pinned(config.dataplane.limits, pin_dir)?;
    if !dp.adopted() {
        let engine = Engine::new(&dp);
        return Ok((dp, engine, 0, None));
    }
    let pred = crate::control::read_state(state).with_context(|| {
        format!(
            "{} holds a running data plane, but there is no usable saved state for it at {} (is it another instance's? give each instance its own socket and pin_dir; or remove {} to start afresh, losing its connections)",
            pin_dir.display(),
            state.display(),
            pin_dir.display()
        )
    })?;
    let engine = Engine::adopt(&dp, pred.engine)?;
    info!(
        pins = %pin_dir.display(),
        flows = dp.flows_in_table().unwrap_or(0),
        "adopted the previous daemon's data plane"
    );
    Ok((dp, engine, pred.generation, Some(pred.health)))
}

/// On a failed start: a predecessor's data plane keeps running, a fresh one is removed.
fn abandon(dp: &mut Dataplane) {
    if dp.adopted() {
        dp.leave_running();
    } else {
        dp.detach_all();
    }
}

/// Command-line settings of `xlb run` that override the configuration's.
#[derive(Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    /// "address:port" or "off".
    pub metrics: Option<String>,
    /// Take over from the daemon serving the same socket.
    pub takeover: bool,
}

pub async fn run(startup: Startup, o: Overrides) -> Result<()> {
    let (mut config, source) = startup_config(startup).await?;
    let (socket, takeover) = (o.socket, o.takeover);
    let path = source.path().to_path_buf();
    for i in &config.dataplane.interfaces {
        if dataplane::ifindex(&i.value).is_err() {
            return Err(i.error(format!("no interface named {}", i.value)).into());
        }
    }
    let socket = socket.unwrap_or_else(|| config.socket.clone());
    let pin_dir = o
        .pin_dir
        .or_else(|| config.pin_dir.clone())
        .unwrap_or_else(|| config::default_pin_dir(&socket));
    match o.metrics.as_deref() {
        None => {}
        Some("off") => config.metrics = None,
        Some(m) => {
            config.metrics = Some(m.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--metrics {m} is not an address:port (e.g. 127.0.0.1:9469) or \"off\""
                )
            })?)
        }
    }
    info!(config = %path.display(), services = config.services.len(), pins = %pin_dir.display(), "starting");
    let state = state_path(&socket);
    // Everything that can be checked before the running daemon lets go is checked first.
    crate::render::validate_services(&config.services, &config.dataplane.limits)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}", path.display()))?;
    if config.script_security {
        crate::health::security::check(&config.services, config.script_user.as_deref())
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{}", path.display()))?;
    }
    if takeover {
        Dataplane::check_pins(&config.dataplane.limits, &pin_dir)?;
        take_over(&socket).await?;
    } else if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        anyhow::bail!(
            "another xlb daemon is serving {} (use a different [control] socket per instance, or --takeover to replace it without losing connections)",
            socket.display()
        );
    }

    let (mut dp, mut engine, generation, predecessor_health) =
        load_dataplane(&config, &pin_dir, &state)?;
    let mut early_vrrp = None;
    if dp.adopted() {
        // Taking over a running data plane: VRRP resumes at once (the previous daemon
        // stopped advertising when it handed over), well before the peer's master-down
        // interval runs out; the rest of the start-up does not delay it.
        match crate::vrrp::run::start(config.ha.clone(), config.script_user.clone(), true).await {
            Ok(v) => early_vrrp = v,
            Err(e) => {
                abandon(&mut dp);
                return Err(e.context("starting VRRP"));
            }
        }
        // What ipvsadm changed at run time is not in the file: the file is what runs now.
        let running = engine.services();
        let differ = running
            .iter()
            .filter(|s| !config.services.contains(s))
            .count()
            + config
                .services
                .iter()
                .filter(|s| !running.contains(s))
                .count();
        if differ > 0 {
            warn!(
                services = differ,
                "the adopted services differ from the configuration file (changes made at run time); the file's are applied"
            );
        }
    }
    for (name, bytes, entries) in dp.memory() {
        info!(
            map = name,
            max_entries = entries,
            kib = bytes / 1024,
            "map memory"
        );
    }
    engine.set_timeouts(&mut dp, config.timeouts)?;
    engine.set_expire_nodest_conn(&mut dp, config.dataplane.expire_nodest_conn)?;

    let addrs = crate::control::watched_addrs(&config.services);
    let (watcher, mut updates) = neigh::spawn_watcher(addrs.clone(), NEIGH_REFRESH)?;
    wait_for_next_hops(&mut dp, &mut engine, &mut updates, &addrs).await?;

    let (health, effective, health_events) =
        crate::control::initial_health(&config.services, predecessor_health);
    if let Err(e) = engine
        .apply(&mut dp, &effective)
        .context("installing the configured services")
    {
        abandon(&mut dp);
        return Err(e);
    }
    for s in &config.services {
        info!(service = %s.name, key = %s.key, scheduler = %s.scheduler, backends = s.backends.len(), "service installed");
    }
    for i in &config.dataplane.interfaces {
        match dp.attach(&i.value, config.dataplane.xdp_mode) {
            Ok(a) => info!(interface = %a.interface, mode = a.mode, "XDP program attached"),
            Err(e) => {
                abandon(&mut dp);
                return Err(e.context(format!("attaching to {}", i.value)));
            }
        }
    }
    let names: Vec<String> = config
        .dataplane
        .interfaces
        .iter()
        .map(|i| i.value.clone())
        .collect();
    dp.drop_stale_links(&names);

    let events = dp.take_events();
    let mut daemon = Daemon::new(dp, engine, source, &config);
    daemon.generation = generation + 1;
    daemon.watch = Some(watcher.watch.clone());
    daemon.state_path = Some(state.clone());
    daemon.script_user = config.script_user.clone();
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = crate::health::runner::Runner::new(health_tx, config.script_user.clone());
    daemon.start_health(config.services.clone(), health, health_events, runner);
    if !daemon.runner.as_ref().is_none_or(|r| r.is_empty()) {
        info!(
            checks = daemon.runner.as_ref().map_or(0, |r| r.len()),
            "health checks running"
        );
    }
    if let Err(e) = daemon.save_state() {
        warn!("saving state for a successor: {e:#}");
    }
    let handover = daemon.handover.clone();
    let shared: Shared = Arc::new(Mutex::new(daemon));
    let api_task = match api::serve(&socket, shared.clone()).await {
        Ok(t) => t,
        Err(e) => {
            abandon(&mut shared.lock().await.dp);
            return Err(e);
        }
    };
    info!(socket = %socket.display(), "admin API listening");
    let metrics_task = match config.metrics {
        Some(addr) => match crate::metrics::serve(addr, shared.clone()).await {
            Ok(t) => {
                info!(%addr, "metrics at http://{addr}/metrics");
                Some(t)
            }
            Err(e) => {
                api_task.abort();
                abandon(&mut shared.lock().await.dp);
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        },
        None => None,
    };
    // VRRP last: the VIPs are taken only once the data plane serves them.
    let vrrp = match early_vrrp {
        Some(v) => Ok(Some(v)),
        None => crate::vrrp::run::start(config.ha.clone(), config.script_user.clone(), false).await,
    };
    let vrrp = match vrrp {
        Ok(v) => v,
        Err(e) => {
            api_task.abort();
            if let Some(t) = &metrics_task {
                t.abort();
            }
            abandon(&mut shared.lock().await.dp);
            let _ = std::fs::remove_file(&socket);
            return Err(e.context("starting VRRP"));
        }
    };
    if let Some(v) = &vrrp {
        shared.lock().await.vrrp = Some(v.status());
        info!(instances = config.ha.instances.len(), "VRRP running");
    }
    let sync_task = match (&config.ha.conn_sync, &vrrp) {
        (Some(cs), Some(v)) => {
            match crate::vrrp::syncd::start(cs.clone(), v.states.clone(), shared.clone()).await {
                Ok(t) => Some(t),
                Err(e) => {
                    if let Some(v) = vrrp {
                        v.shutdown().await;
                    }
                    api_task.abort();
                    if let Some(t) = &metrics_task {
                        t.abort();
                    }
                    abandon(&mut shared.lock().await.dp);
                    let _ = std::fs::remove_file(&socket);
                    return Err(e.context("starting the connection sync"));
                }
            }
        }
        _ => None,
    };
    let links = crate::vrrp::net::Addresses::new()?;
    let mut dp_track = tokio::time::interval(DATAPLANE_TRACK);
    dp_track.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Some(rb) = events {
        tokio::spawn(relay_events(
            rb,
            shared.clone(),
            watcher.resolve.clone(),
            watcher.nudge.clone(),
        ));
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut rates = tokio::time::interval(crate::estimator::PERIOD);
    rates.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reap = tokio::time::interval(REAP_INTERVAL);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut health_tick = tokio::time::interval(HEALTH_TICK);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handing_over = false;
    loop {
        tokio::select! {
            _ = reap.tick() => {
                let mut d = shared.lock().await;
                if let Err(e) = d.dp.reap() {
                    error!("expiring idle connections: {e:#}");
                }
                let Daemon { dp, engine, .. } = &mut *d;
                if engine.expire_trash(dp) {
                    d.dirty = true;
                }
                if d.dirty && let Err(e) = d.save_state() {
                    warn!("saving state for a successor: {e:#}");
                }
            }
            _ = health_tick.tick() => {
                // The reports of the last tick are applied together: at thousands of checks
                // per second one lock and at most one change per tick, not per report.
                let mut reports = Vec::new();
                while let Ok(r) = health_rx.try_recv() {
                    reports.push(r);
                }
                let mut d = shared.lock().await;
                // Without reports only a due reentry or a failed apply needs the batch (not
                // every tick while a reentry is pending: it recomputes the next one).
                if !reports.is_empty() || d.health_due() {
                    d.on_health(reports);
                }
            }
            _ = handover.notified() => {
                info!("handing over to a successor: the data plane keeps running");
                handing_over = true;
                break;
            }
            _ = dp_track.tick(), if vrrp.is_some() => {
                let attached: Vec<u32> = shared.lock().await.dp.attachments().iter().map(|a| a.ifindex).collect();
                let mut present = true;
                for ifindex in attached {
                    if !links.xdp_attached(ifindex).await.unwrap_or(true) {
                        present = false;
                    }
                }
                let mut d = shared.lock().await;
                d.xdp_present = present;
                let up = d.dataplane_health();
                drop(d);
                if let Some(v) = &vrrp && !up.is_empty() {
                    v.set_dataplane(up);
                }
            }
            _ = rates.tick() => {
                if let Err(e) = shared.lock().await.sample_rates() {
                    error!("sampling rates: {e:#}");
                }
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                // The outcome is logged and kept for `xlb status` and /metrics.
                let _ = shared.lock().await.reload();
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            Some((addr, nh)) = updates.recv() => {
                let mut d = shared.lock().await;
                let Daemon { dp, engine, .. } = &mut *d;
                match &nh {
                    Some(n) => info!(%addr, mac = %crate::engine::mac_string(&n.dst_mac), ifindex = n.ifindex, "next hop resolved"),
                    None => warn!(%addr, "next hop lost"),
                }
                if let Err(e) = set_next_hop(dp, engine, addr, nh) {
                    error!(%addr, "updating next hop: {e:#}");
                }
                d.dirty = true;
            }
        }
    }
    // A stopping VRRP lets go first (priority 0, VIPs removed) while the data plane still
    // forwards, so the peer takes over at once; handing over leaves the VIPs to the
    // successor, which resumes as master.
    if let Some(t) = sync_task {
        t.abort();
    }
    if let Some(v) = vrrp {
        if handing_over {
            v.hand_over().await;
        } else {
            v.shutdown().await;
        }
    }
    if handing_over {
        // Let the successor's request be answered before the socket goes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let mut d = shared.lock().await;
    if handing_over {
        // Whatever changed since the handover request (a next hop) goes to the successor.
        if d.dirty
            && let Err(e) = d.save_state()
        {
            warn!("saving state for the successor: {e:#}");
        }
        d.dp.leave_running();
        let _ = std::fs::remove_file(&socket);
        info!("handed over");
    } else {
        d.dp.detach_all();
        let _ = std::fs::remove_file(&state);
        let _ = std::fs::remove_file(&socket);
        info!("stopped");
    }
    Ok(())
}

/// Records a real server's next hop; one that leaves through an interface xlb is not attached
/// to is reached with XDP_REDIRECT, so that interface joins the redirect map (if it cannot, the
/// server stays unresolved and its packets are counted as drop_neigh_missing).
fn set_next_hop(
    dp: &mut Dataplane,
    engine: &mut Engine,
    addr: IpAddr,
    nh: Option<crate::engine::NextHop>,
) -> Result<()> {
    let nh = match nh {
        Some(n) if !dp.attachments().iter().any(|a| a.ifindex == n.ifindex) => {
            match dp.add_tx_port(n.ifindex) {
                Ok(()) => Some(n),
                Err(e) => {
                    warn!(%addr, "real server unreachable from XDP: {e:#}");
                    None
                }
            }
        }
        other => other,
    };
    engine.set_next_hop(dp, addr, nh)
}

/// Collects next hops until every real server is resolved or the start-up wait is over
/// (unresolved ones keep resolving in the background; their first packets are counted as
/// `drop_neigh_missing` and trigger another resolution).
async fn wait_for_next_hops(
    dp: &mut Dataplane,
    engine: &mut Engine,
    updates: &mut neigh::Updates,
    addrs: &[IpAddr],
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + NEIGH_STARTUP_WAIT;
    while addrs.iter().any(|a| engine.next_hop(*a).is_none()) {
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Ok(Some((addr, nh))) => {
                if let Some(n) = &nh {
                    info!(%addr, mac = %crate::engine::mac_string(&n.dst_mac), ifindex = n.ifindex, "next hop resolved");
                }
                set_next_hop(dp, engine, addr, nh)?
            }
            _ => break,
        }
    }
    for a in addrs.iter().filter(|a| engine.next_hop(**a).is_none()) {
        warn!(addr = %a, "real server not resolved yet (no ARP/ND answer); will keep trying");
    }
    Ok(())
}

/// Reads the data plane's events and turns them into work for the controller.
async fn relay_events(
    rb: RingBuf<MapData>,
    shared: Shared,
    resolve: tokio::sync::mpsc::UnboundedSender<IpAddr>,
    nudge: tokio::sync::mpsc::UnboundedSender<(u32, IpAddr)>,
) {
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until this task ends.
    // A real server that stays unresolvable would otherwise turn every packet sent to it into
    // a resolution request.
    let mut last_request: std::collections::HashMap<IpAddr, std::time::Instant> =
        Default::default();
    let mut fd = match unsafe { AsyncFd::register(rb) } {
        Ok(fd) => fd,
        Err(e) => {
            error!("cannot poll the event ring buffer: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!("event ring buffer: {e}");
                return;
            }
        };
        let mut backends = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the program writes `Event`s; the length was checked.
                let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                if ev.kind == EVENT_NEIGH_MISSING {
                    backends.push(ev.backend);
                } else if ev.kind == EVENT_ROUTE_MISSING
                    && let Some(hop) = crate::engine::addr_of_words(ev.family as u8, ev.addr)
                {
                    let now = std::time::Instant::now();
                    let due = last_request
                        .get(&hop)
                        .is_none_or(|t| now.duration_since(*t) >= RESOLVE_INTERVAL);
                    if due {
                        last_request.insert(hop, now);
                        let _ = nudge.send((ev.backend, hop));
                    }
                }
            }
        }
        guard.clear_ready();
        backends.sort_unstable();
        backends.dedup();
        if !backends.is_empty() {
            let d = shared.lock().await;
            for b in backends {
                if let Some(addr) = d.engine.backend_addr(b) {
                    let now = std::time::Instant::now();
                    let due = last_request
                        .get(&addr)
                        .is_none_or(|t| now.duration_since(*t) >= RESOLVE_INTERVAL);
                    if due {
                        last_request.insert(addr, now);
                        let _ = resolve.send(addr);
                    }
                }
            }
        }
    }
}
