//! `xlb run`: load, fill the maps, attach, serve the admin API, keep next hops current, and
//! detach cleanly on SIGINT/SIGTERM.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

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
/// How long start-up waits for the kernel to resolve real servers before attaching.
const NEIGH_STARTUP_WAIT: Duration = Duration::from_secs(2);

pub async fn run(path: &Path, socket: Option<PathBuf>) -> Result<()> {
    let config = config::load(path)?;
    for i in &config.dataplane.interfaces {
        if dataplane::ifindex(&i.value).is_err() {
            return Err(i.error(format!("no interface named {}", i.value)).into());
        }
    }
    let socket = socket.unwrap_or_else(|| config.socket.clone());
    info!(config = %path.display(), services = config.services.len(), "starting");

    let mut dp = Dataplane::load(config.dataplane.limits)?;
    for (name, bytes, entries) in dp.memory() {
        info!(
            map = name,
            max_entries = entries,
            kib = bytes / 1024,
            "map memory"
        );
    }
    let mut engine = Engine::new(&dp);
    engine.set_timeouts(&mut dp, config.timeouts)?;
    engine.set_expire_nodest_conn(&mut dp, config.dataplane.expire_nodest_conn)?;

    let addrs = backend_addrs(&config);
    let (watcher, mut updates) = neigh::spawn_watcher(addrs.clone(), NEIGH_REFRESH)?;
    wait_for_next_hops(&mut dp, &mut engine, &mut updates, &addrs).await?;

    engine
        .apply(&mut dp, &config.services)
        .context("installing the configured services")?;
    for s in &config.services {
        info!(service = %s.name, key = %s.key, scheduler = %s.scheduler, backends = s.backends.len(), "service installed");
    }
    for i in &config.dataplane.interfaces {
        match dp.attach(&i.value, config.dataplane.xdp_mode) {
            Ok(a) => info!(interface = %a.interface, mode = a.mode, "XDP program attached"),
            Err(e) => {
                dp.detach_all();
                return Err(e.context(format!("attaching to {}", i.value)));
            }
        }
    }

    let events = dp.take_events();
    let shared: Shared = Arc::new(Mutex::new(Daemon { dp, engine }));
    let api_task = match api::serve(&socket, shared.clone()).await {
        Ok(t) => t,
        Err(e) => {
            shared.lock().await.dp.detach_all();
            return Err(e);
        }
    };
    info!(socket = %socket.display(), "admin API listening");
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
    let mut reap = tokio::time::interval(REAP_INTERVAL);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reap.tick() => {
                let mut d = shared.lock().await;
                let Daemon { dp, engine } = &mut *d;
                if let Err(e) = dp.reap() {
                    error!("expiring idle connections: {e:#}");
                }
                engine.expire_trash(dp);
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            Some((addr, nh)) = updates.recv() => {
                let mut d = shared.lock().await;
                let Daemon { dp, engine } = &mut *d;
                match &nh {
                    Some(n) => info!(%addr, mac = %crate::engine::mac_string(&n.dst_mac), ifindex = n.ifindex, "next hop resolved"),
                    None => warn!(%addr, "next hop lost"),
                }
                if let Err(e) = set_next_hop(dp, engine, addr, nh) {
                    error!(%addr, "updating next hop: {e:#}");
                }
            }
        }
    }
    api_task.abort();
    shared.lock().await.dp.detach_all();
    let _ = std::fs::remove_file(&socket);
    info!("stopped");
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

fn backend_addrs(config: &Config) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = config
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.addr))
        .collect();
    v.sort();
    v.dedup();
    v
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

/// The address an event names.
fn event_addr(ev: &Event) -> Option<IpAddr> {
    match ev.family as u8 {
        lb_common::FAMILY_V4 => Some(IpAddr::from(ev.addr[0].to_ne_bytes())),
        lb_common::FAMILY_V6 => Some(crate::engine::v6_of_words(ev.addr)),
        _ => None,
    }
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
                    && let Some(hop) = event_addr(&ev)
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
