//! The connection sync daemon's roles in xlb: while the named VRRP instance is master, this
//! node streams its connections (see [`crate::connsync`]); otherwise it installs the
//! master's.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Counters of the sync daemon (shared with the API and /metrics).
#[derive(Default)]
pub struct SyncStats {
    pub master: std::sync::atomic::AtomicBool,
    pub sent_messages: AtomicU64,
    pub sent_records: AtomicU64,
    pub received_messages: AtomicU64,
    pub received_records: AtomicU64,
    pub installed: AtomicU64,
    pub skipped: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    /// Unix time (ms) of the last message received / sent; 0: none yet.
    pub last_received_ms: AtomicU64,
    pub last_sent_ms: AtomicU64,
    /// Milliseconds between a connection event and its send, last batch.
    pub send_delay_ms: AtomicU64,
    pub instance: std::sync::Mutex<String>,
    pub sync_id: std::sync::atomic::AtomicU8,
}

/// What `xlb status` and the API show of the sync daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyncStatus {
    pub instance: String,
    pub role: String,
    pub sync_id: u8,
    pub sent_messages: u64,
    pub sent_records: u64,
    pub received_messages: u64,
    pub received_records: u64,
    pub installed: u64,
    pub skipped: u64,
    pub refused: u64,
    pub errors: u64,
    /// Seconds since the last message from the master (backup), or since the last send
    /// (master); `None` before the first.
    pub lag_seconds: Option<f64>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl SyncStats {
    pub fn status(&self) -> SyncStatus {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let master = self.master.load(Ordering::Relaxed);
        let last = if master {
            l(&self.last_sent_ms)
        } else {
            l(&self.last_received_ms)
        };
        SyncStatus {
            instance: self.instance.lock().expect("lock").clone(),
            role: if master { "master" } else { "backup" }.into(),
            sync_id: self.sync_id.load(Ordering::Relaxed),
            sent_messages: l(&self.sent_messages),
            sent_records: l(&self.sent_records),
            received_messages: l(&self.received_messages),
            received_records: l(&self.received_records),
            installed: l(&self.installed),
            skipped: l(&self.skipped),
            refused: l(&self.refused),
            errors: l(&self.errors),
            lag_seconds: (last != 0).then(|| now_ms().saturating_sub(last) as f64 / 1000.0),
        }
    }
}

/// Starts the sync daemon for `cfg`, following `states` (the VRRP instances' states).
pub async fn start(
    cfg: crate::vrrp::config::ConnSync,
    states: tokio::sync::watch::Receiver<
        std::collections::HashMap<String, crate::vrrp::machine::State>,
    >,
    shared: crate::api::Shared,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let _ = (cfg, states, shared);
    anyhow::bail!("connection sync is not wired yet")
}
