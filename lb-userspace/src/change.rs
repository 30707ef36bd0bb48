//! Changes to the service model, as ipvsadm's commands and the admin API express them
//! (IPVS's `IP_VS_SO_SET_*` operations). A change edits a copy of the model; the result is
//! validated as a whole and applied by the engine in one switch, or not at all.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{BackendConfig, ServiceConfig, ServiceKey, Timeouts};

/// One administrative change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// `-A`: a new service (its `backends` are ignored; servers come with `-a`).
    AddService { service: ServiceConfig },
    /// `-E`: replaces the settings ipvsadm has words for (scheduler, flags, persistence),
    /// keeping the rest: the name, the port set, the real servers, the default forwarding
    /// method, `conntrack`, and mh's table size while the scheduler stays mh.
    EditService { service: ServiceConfig },
    /// `-D`
    DeleteService { key: ServiceKey },
    /// `-C`
    Clear,
    /// `-a`
    AddServer {
        key: ServiceKey,
        server: BackendConfig,
    },
    /// `-e`: replaces the server's settings (found by address and port; a tunnel's outer
    /// source, which ipvsadm cannot name, is kept).
    EditServer {
        key: ServiceKey,
        server: BackendConfig,
    },
    /// `-d`
    DeleteServer {
        key: ServiceKey,
        addr: IpAddr,
        port: u16,
    },
    /// `-Z [service]`: zeroes what ipvsadm shows (the data plane's counters, and what
    /// Prometheus scrapes, keep counting).
    Zero { key: Option<ServiceKey> },
    /// `--set tcp tcpfin udp` (0 = unchanged).
    SetTimeouts { tcp: u32, tcp_fin: u32, udp: u32 },
}

/// Why a change cannot be made: IPVS's own errors carry `ipvs_strerror()`'s words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ChangeError {
    #[error("Service already exists")]
    ServiceExists,
    #[error("No such service")]
    NoService,
    #[error("Destination already exists")]
    DestExists,
    #[error("No such destination")]
    NoDest,
    /// The change is well-formed but the result is not a valid configuration.
    #[error("{0}")]
    Invalid(String),
}

/// The model a change edits: the services and the timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Model {
    pub services: Vec<ServiceConfig>,
    pub timeouts: Timeouts,
}

impl Change {
    /// Applies the change to `m` (structure only: whether the result is a valid
    /// configuration is checked on the whole result, see `config::check_services`).
    pub fn apply(&self, m: &mut Model) -> Result<(), ChangeError> {
        let find = |m: &Model, k: &ServiceKey| m.services.iter().position(|s| s.key == *k);
        match self {
            Change::AddService { service } => {
                if find(m, &service.key).is_some() {
                    return Err(ChangeError::ServiceExists);
                }
                let mut s = service.clone();
                s.backends.clear();
                m.services.push(s);
            }
            Change::EditService { service } => {
                let i = find(m, &service.key).ok_or(ChangeError::NoService)?;
                let old = &mut m.services[i];
                old.scheduler = service.scheduler;
                old.sched_flags = service.sched_flags;
                old.persistence = service.persistence;
                if service.scheduler != crate::config::Scheduler::Mh {
                    old.mh_table_size = service.mh_table_size;
                }
            }
            Change::DeleteService { key } => {
                let i = find(m, key).ok_or(ChangeError::NoService)?;
                m.services.remove(i);
            }
            Change::Clear => m.services.clear(),
            Change::AddServer { key, server } => {
                let i = find(m, key).ok_or(ChangeError::NoService)?;
                let s = &mut m.services[i];
                if s.backends
                    .iter()
                    .any(|b| b.addr == server.addr && b.port == server.port)
                {
                    return Err(ChangeError::DestExists);
                }
                s.backends.push(server.clone());
            }
            Change::EditServer { key, server } => {
                let i = find(m, key).ok_or(ChangeError::NoService)?;
                let b = m.services[i]
                    .backends
                    .iter_mut()
                    .find(|b| b.addr == server.addr && b.port == server.port)
                    .ok_or(ChangeError::NoDest)?;
                // ipvsadm has no words for a tunnel's outer source or health checks: an edit
                // keeps them.
                let source = b.tunnel.and_then(|t| t.source);
                let health = std::mem::take(&mut b.health);
                *b = server.clone();
                if b.health == Default::default() {
                    b.health = health;
                }
                if let Some(t) = b.tunnel.as_mut()
                    && t.source.is_none()
                {
                    t.source = source;
                }
            }
            Change::DeleteServer { key, addr, port } => {
                let i = find(m, key).ok_or(ChangeError::NoService)?;
                let s = &mut m.services[i];
                let j = s
                    .backends
                    .iter()
                    .position(|b| b.addr == *addr && b.port == *port)
                    .ok_or(ChangeError::NoDest)?;
                s.backends.remove(j);
            }
            Change::Zero { key } => {
                if let Some(k) = key {
                    find(m, k).ok_or(ChangeError::NoService)?;
                }
            }
            Change::SetTimeouts { tcp, tcp_fin, udp } => {
                if let Some(v) = [*tcp, *tcp_fin, *udp]
                    .into_iter()
                    .find(|v| *v > crate::config::MAX_PERSISTENCE_TIMEOUT)
                {
                    return Err(ChangeError::Invalid(format!(
                        "timeout {v} is over 2678400 seconds"
                    )));
                }
                for (v, slot) in [
                    (*tcp, &mut m.timeouts.tcp),
                    (*tcp_fin, &mut m.timeouts.tcp_fin),
                    (*udp, &mut m.timeouts.udp),
                ] {
                    if v != 0 {
                        *slot = v;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The name a service created by ipvsadm gets (services from files keep theirs).
pub fn service_name(key: &ServiceKey) -> String {
    key.to_string()
}
