//! The connection sync daemon's roles in xlb (keepalived's `lvs_sync_daemon`): while the
//! named VRRP instance is master, this node streams its new and changed connections as its
//! data plane reports them, plus a periodic refresh; otherwise it installs what the master
//! sends (see [`crate::connsync`] for the format and what is synchronised).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    api::Shared,
    connsync::{self, SyncConfig, SyncCounters, SyncEvents, SyncReceiver, SyncSender},
    vrrp::{config::ConnSync, machine::State},
};

/// How often a master sends every connection again (a backup's copies see no packets and
/// would otherwise idle out; also brings a restarted backup up to date). Well below the
/// shortest timeout that matters (UDP's 300 s).
pub const REFRESH: Duration = Duration::from_secs(30);

/// Counters of the sync daemon (shared with the API and /metrics).
pub struct SyncStats {
    pub cfg: ConnSync,
    pub master: AtomicBool,
    pub sender: Arc<SyncCounters>,
    pub receiver: Arc<SyncCounters>,
    pub installed: AtomicU64,
    pub skipped: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    last_sent: Mutex<Option<Instant>>,
}

/// What `xlb status` and the API show of the sync daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub instance: String,
    pub role: String,
    pub sync_id: u8,
    pub interface: String,
    /// The multicast group, or the unicast peer.
    pub group: IpAddr,
    pub port: u16,
    pub maxlen: u16,
    pub ttl: u8,
    pub sent_messages: u64,
    pub sent_records: u64,
    pub received_messages: u64,
    pub received_records: u64,
    /// Records applied to the connection table (installed, refreshed or replaced).
    pub installed: u64,
    /// Records of services or real servers this node does not have, or kept entries.
    pub skipped: u64,
    /// Records refused (table full).
    pub refused: u64,
    /// Send errors, malformed or foreign messages.
    pub errors: u64,
    /// Seconds since the last message from the master (backup), or since the last send
    /// (master); `None` before the first.
    pub lag_seconds: Option<f64>,
}

impl SyncStats {
    pub fn status(&self) -> SyncStatus {
        let master = self.master.load(Ordering::Relaxed);
        let s = self.sender.snapshot();
        let r = self.receiver.snapshot();
        let last = if master {
            *self.last_sent.lock().expect("lock")
        } else {
            r.last_receive
        };
        let c = &self.cfg;
        SyncStatus {
            instance: c.instance.clone(),
            role: if master { "master" } else { "backup" }.into(),
            sync_id: c.id(),
            interface: c.interface.clone(),
            group: c.peer.unwrap_or(c.group),
            port: c.port,
            maxlen: c.maxlen,
            ttl: c.ttl,
            sent_messages: s.messages_sent,
            sent_records: s.records_sent,
            received_messages: r.messages_received,
            received_records: r.records_received,
            installed: self.installed.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed) + r.records_skipped,
            refused: self.refused.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed) + s.send_errors + r.messages_dropped,
            lag_seconds: last.map(|t| t.elapsed().as_secs_f64()),
        }
    }
}

fn transport(cfg: &ConnSync, receiver: bool) -> SyncConfig {
    let addr = match (cfg.peer, receiver) {
        (None, _) => SocketAddr::new(cfg.group, cfg.port),
        (Some(p), false) => SocketAddr::new(p, cfg.port),
        // Unicast: listen on every address of the interface.
        (Some(p), true) => SocketAddr::new(
            if p.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            },
            cfg.port,
        ),
    };
    SyncConfig {
        sync_id: cfg.id(),
        addr,
        interface: Some(cfg.interface.clone()),
        ttl: cfg.ttl as u32,
        maxlen: cfg.maxlen as usize,
        multicast_loop: false,
    }
}

/// Starts the sync daemon for `cfg`, following the VRRP instances' `states`; the stats go
/// into the daemon's state for the API and /metrics.
pub async fn start(
    cfg: ConnSync,
    mut states: watch::Receiver<std::collections::HashMap<String, State>>,
    shared: Shared,
) -> Result<tokio::task::JoinHandle<()>> {
    let sender = SyncSender::new(&transport(&cfg, false)).context("the sync sender")?;
    let mut receiver = SyncReceiver::new(&transport(&cfg, true)).context("the sync receiver")?;
    let stats = Arc::new(SyncStats {
        cfg: cfg.clone(),
        master: AtomicBool::new(false),
        sender: sender.counters(),
        receiver: receiver.counters(),
        installed: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        last_sent: Mutex::new(None),
    });
    let mut events = {
        let mut d = shared.lock().await;
        d.conn_sync = Some(stats.clone());
        // Reports only while master.
        d.dp.set_sync_events(false)?;
        let rb =
            d.dp.take_sync_events()
                .context("the data plane's sync ring is taken already")?;
        SyncEvents::new(rb)?
    };
    info!(instance = %cfg.instance, interface = %cfg.interface, sync_id = cfg.id(), group = %cfg.group, peer = ?cfg.peer, "connection sync running");
    Ok(tokio::spawn(async move {
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut master = false;
        let mut last_refresh: Option<u32> = None;
        loop {
            tokio::select! {
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now_master = states.borrow().get(&cfg.instance) == Some(&State::Master);
                    if now_master == master {
                        continue;
                    }
                    master = now_master;
                    stats.master.store(master, Ordering::Relaxed);
                    let mut d = shared.lock().await;
                    if let Err(e) = d.dp.set_sync_events(master) {
                        warn!("connection sync: {e:#}");
                    }
                    if master {
                        // Everything this node knows (the old master's connections it
                        // installed included) goes to the new backup at once.
                        let records = connsync::refresh_records(&d.dp, &d.engine, None);
                        last_refresh = Some(crate::engine::monotonic_coarse_ticks());
                        drop(d);
                        info!(records = records.len(), "connection sync: master, sending the connection table");
                        send(&sender, &stats, &records).await;
                    } else {
                        info!("connection sync: backup, installing the master's connections");
                    }
                }
                batch = events.next() => {
                    let Ok(batch) = batch else {
                        warn!("connection sync: the event ring failed");
                        return;
                    };
                    if !master {
                        continue;
                    }
                    let records = {
                        let d = shared.lock().await;
                        connsync::records_from_events(&d.engine, &batch)
                    };
                    send(&sender, &stats, &records).await;
                }
                _ = refresh.tick(), if master => {
                    let records = {
                        let d = shared.lock().await;
                        connsync::refresh_records(&d.dp, &d.engine, last_refresh)
                    };
                    last_refresh = Some(crate::engine::monotonic_coarse_ticks());
                    send(&sender, &stats, &records).await;
                }
                got = receiver.recv() => {
                    let records = match got {
                        Ok(r) => r,
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            warn!("connection sync: {e:#}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if master {
                        // Another node thinks it is master too (a split): its connections
                        // are not installed over ours.
                        stats.skipped.fetch_add(records.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    let mut d = shared.lock().await;
                    let crate::control::Daemon { dp, engine, .. } = &mut *d;
                    match connsync::install(dp, engine, &records) {
                        Ok(r) => {
                            stats.installed.fetch_add(r.applied(), Ordering::Relaxed);
                            stats.refused.fetch_add(r.table_full + r.nat_tuple_taken, Ordering::Relaxed);
                            stats.skipped.fetch_add(
                                r.skipped() - r.table_full - r.nat_tuple_taken,
                                Ordering::Relaxed,
                            );
                        }
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            warn!("connection sync: installing: {e:#}");
                        }
                    }
                }
            }
        }
    }))
}

async fn send(sender: &SyncSender, stats: &SyncStats, records: &[connsync::ConnRecord]) {
    if records.is_empty() {
        return;
    }
    if let Err(e) = sender.send(records).await {
        warn!("connection sync: {e:#}");
    }
    *stats.last_sent.lock().expect("lock") = Some(Instant::now());
}
