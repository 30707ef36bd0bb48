//! xlb's controller: configuration, the data-plane maps, schedulers, next-hop resolution, the
//! admin API and the ipvsadm-compatible output. The `xlb` binary is a thin CLI over this.

pub mod api;
pub mod change;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod engine;
pub mod ipvsadm;
pub mod matching;
pub mod neigh;
pub mod sched;
