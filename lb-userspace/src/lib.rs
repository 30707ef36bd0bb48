//! xlb's controller: configuration, the data-plane maps, schedulers, next-hop resolution, the
//! admin API and the ipvsadm-compatible output. The `xlb` binary is a thin CLI over this.

pub mod api;
pub mod change;
pub mod config;
pub mod connsync;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod engine;
pub mod estimator;
pub mod health;
pub mod ipvsadm;
pub mod ipvsadm_cli;
pub mod keepalived;
pub mod keepalived_config;
pub mod matching;
pub mod metrics;
pub mod neigh;
pub mod render;
pub mod sched;
pub mod sockopt;
pub mod vrrp;
