//! Turns the desired set of virtual services into map contents, and changes them so that
//! packets see either the old or the new state of a service, never a mix.
//!
//! [`Engine::apply`] works in two steps. First it computes everything on a copy of its state
//! (ids, slot tables, backend entries) and collects the writes; any error leaves the running
//! state untouched. Then it performs the writes in an order that keeps every intermediate
//! state consistent for the XDP program:
//!
//! 1. entries nobody references yet: counters of new ids, backend entries (double-buffered,
//!    see [`Dataplane::write_backend`]), slot tables in fresh regions;
//! 2. the service entries, each replaced by one atomic hash-map update (slot table, offset and
//!    scheduler change together);
//! 3. only then retire what the old state used: removed services, removed backends (marked
//!    unavailable, so their flows stop, as IPVS drops them), and - after a grace period - old
//!    slot regions and ids.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_common::{
    BACKEND_F_AVAILABLE, BACKEND_F_NEIGH_VALID, Backend, FAMILY_V4, FAMILY_V6, Globals, Service,
    tcp,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::{BackendConfig, Forwarding, Scheduler, ServiceConfig, ServiceKey, Timeouts},
    dataplane::Dataplane,
    matching::{self, MatchEntry},
    sched::{Dest, DestId, Sequencer, Table},
};

/// How long a deleted real server is kept for revival, as IPVS keeps deleted destinations in
/// its trash (`IP_VS_DEST_TRASH_PERIOD`): re-adding it in time keeps its counters, and its
/// connections continue.
pub const TRASH_PERIOD: Duration = Duration::from_secs(120);

/// Where packets for a real server leave: egress interface and the two MACs, plus what
/// tunnelling needs from the route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextHop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The router the real server is reached through (`dst_mac` is its MAC), if it is not
    /// on-link. Direct routing needs an on-link server; NAT and tunnels do not.
    pub gateway: Option<IpAddr>,
    /// MTU of the path (the route's, else the egress interface's).
    pub mtu: u32,
    /// The source address the routing table picks for the real server (tunnels' default
    /// outer source).
    pub source: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct BackendState {
    index: u32,
    generation: u32,
    config: BackendConfig,
    /// Its slot's scan group (`lb_common::group`), when its service scans by groups.
    group: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct ServiceState {
    id: u32,
    config: ServiceConfig,
    /// Configuration order.
    backends: Vec<BackendState>,
    seq: Sequencer,
    table: Table,
    region: Option<Region>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Region {
    start: u32,
    len: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Trashed {
    service: ServiceKey,
    backend: DestId,
    forwarding: Forwarding,
    index: u32,
    generation: u32,
    /// Saved as the time left (an `Instant` means nothing to the next process).
    #[serde(with = "instant_as_remaining")]
    until: Instant,
}

mod instant_as_remaining {
    use std::time::{Duration, Instant};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
        t.saturating_duration_since(Instant::now())
            .as_millis()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        let ms = u64::deserialize(d)?;
        Ok(Instant::now() + Duration::from_millis(ms))
    }
}

/// Everything the engine knows, as the next daemon adopts it (with the pinned maps it
/// describes): allocations, scheduler sequences, retired servers still draining, next hops.
#[derive(Serialize, Deserialize)]
pub struct EngineSnapshot {
    services: Vec<(ServiceKey, ServiceState)>,
    service_ids: Ids,
    backend_ids: Ids,
    regions: Regions,
    trash: Vec<Trashed>,
    /// Retired ids and regions: by the time a successor reads this, no packet uses them.
    deferred: Vec<Deferred>,
    next_hops: Vec<(IpAddr, NextHop)>,
    timeouts: Timeouts,
    expire_nodest_conn: bool,
    filter: Vec<u64>,
    nat_sources: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Deferred {
    Region(Region),
    ServiceId(u32),
    BackendIndex(u32),
}

/// One write to the maps.
enum Op {
    ResetService(u32),
    ResetBackendStats(u32),
    WriteBackend(u32, Backend),
    WriteSlots(u32, Vec<u32>),
    /// Scan groups (first, count) to rescan: written before the switch (a new table's groups
    /// may hold another service's or rule's bests) and again after it (a pick under the old
    /// entry may have rescanned them by the old rule meanwhile).
    DirtyGroups(u32, u32),
    DirtyGroupsAfterSwitch(u32, u32),
    /// The prefilter while services are switched: bits of old and new services.
    FilterUnion(Vec<u64>),
    /// The service entry; its scheduler offset is computed when it is written (see
    /// [`PendingSched`]).
    PutService(ServiceKey, Vec<MatchEntry>, Service, Box<PendingSched>),
    /// Match entries of removed services, or that a service no longer covers.
    RemoveEntries(Vec<MatchEntry>),
    /// The prefilter once old services are gone.
    FilterFinal(Vec<u64>),
    /// The NAT replies' prefilter, likewise: new real servers' bits before the switch (their
    /// replies must be recognised from the first connection), stale ones after.
    NatSourcesUnion(Vec<u64>),
    NatSourcesFinal(Vec<u64>),
}

/// The scheduler change of a service, replayed at the moment its entry is written: the
/// pick counter is read then, so picks made while the rest of the change was written are
/// accounted for.
struct PendingSched {
    before: Sequencer,
    targets: Vec<Dest>,
    /// The service id is new: its counter starts at zero (it is reset in the same change).
    fresh: bool,
}

/// Whether a service's table is scanned by groups (`lb_common::group`).
fn grouped(s: crate::config::Scheduler, slots: usize) -> bool {
    s.scans() && s != crate::config::Scheduler::Twos && slots as u32 > lb_common::group::MIN_SLOTS
}

/// First-fit allocator of `SLOTS` ranges.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Regions {
    /// start → len of free ranges, non-adjacent.
    free: BTreeMap<u32, u32>,
}

impl Regions {
    fn new(size: u32) -> Self {
        Regions {
            free: BTreeMap::from([(0, size)]),
        }
    }
    /// The first free range of `len` entries starting at a multiple of `align`.
    fn alloc(&mut self, len: u32, align: u32) -> Option<Region> {
        let (&free_start, &have, start) = self.free.iter().find_map(|(s, l)| {
            let start = s.div_ceil(align) * align;
            (start - s + len <= *l).then_some((s, l, start))
        })?;
        self.free.remove(&free_start);
        if start > free_start {
            self.free.insert(free_start, start - free_start);
        }
        let end = start + len;
        if free_start + have > end {
            self.free.insert(end, free_start + have - end);
        }
        Some(Region { start, len })
    }
    fn release(&mut self, r: Region) {
        let mut start = r.start;
        let mut len = r.len;
        if let Some((&s, &l)) = self.free.range(..start).next_back()
            && s + l == start
        {
            self.free.remove(&s);
            start = s;
            len += l;
        }
        if let Some(&l) = self.free.get(&(r.start + r.len)) {
            self.free.remove(&(r.start + r.len));
            len += l;
        }
        self.free.insert(start, len);
    }
}

/// Free ids (lowest first) with a generation per id.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(into = "SavedIds", try_from = "SavedIds")]
struct Ids {
    free: std::collections::BTreeSet<u32>,
    generation: Vec<u32>,
}

/// [`Ids`] as saved: the ids in use and the generations that are not zero (the free set of
/// a large table is most of it).
#[derive(Serialize, Deserialize)]
struct SavedIds {
    n: u32,
    used: Vec<u32>,
    generations: Vec<(u32, u32)>,
}

impl From<Ids> for SavedIds {
    fn from(ids: Ids) -> Self {
        let n = ids.generation.len() as u32;
        SavedIds {
            n,
            used: (0..n).filter(|i| !ids.free.contains(i)).collect(),
            generations: ids
                .generation
                .iter()
                .enumerate()
                .filter(|(_, g)| **g != 0)
                .map(|(i, g)| (i as u32, *g))
                .collect(),
        }
    }
}

impl TryFrom<SavedIds> for Ids {
    type Error = String;
    fn try_from(s: SavedIds) -> Result<Self, String> {
        let mut ids = Ids::new(s.n);
        for u in s.used {
            if !ids.free.remove(&u) {
                return Err(format!("id {u} out of range or listed twice"));
            }
        }
        for (i, g) in s.generations {
            *ids.generation
                .get_mut(i as usize)
                .ok_or_else(|| format!("generation of id {i} out of range"))? = g;
        }
        Ok(ids)
    }
}

impl Ids {
    fn new(n: u32) -> Self {
        Ids {
            free: (0..n).collect(),
            generation: vec![0; n as usize],
        }
    }
    fn alloc(&mut self) -> Option<(u32, u32)> {
        let id = self.free.pop_first()?;
        let g = &mut self.generation[id as usize];
        *g = g.wrapping_add(1).max(1);
        Some((id, *g))
    }
    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// What `ipvsadm -L` shows of a real server, plus what xlb knows in addition.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BackendView {
    pub addr: IpAddr,
    pub port: u16,
    pub forwarding: Forwarding,
    pub weight: u32,
    pub active_conns: u64,
    pub inactive_conns: u64,
    pub stats: CountersView,
    /// Resolved next-hop MAC, if any.
    pub mac: Option<String>,
    pub index: u32,
    /// `-x` / `-y` (0 = none).
    #[serde(default)]
    pub upper_threshold: u32,
    #[serde(default)]
    pub lower_threshold: u32,
    /// Tunnel settings of a tunnel server (`--tun-info`).
    #[serde(default)]
    pub tunnel: Option<crate::config::Tunnel>,
    /// Persistence templates pointing at this server (`--persistent-conn`'s PersistConn).
    #[serde(default)]
    pub persist_conns: u64,
    /// `--rate` figures.
    #[serde(default)]
    pub rate: RateView,
}

/// IPVS's rate estimates (`ipvsadm --rate`): connections, packets and bytes per second.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RateView {
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersView {
    pub conns: u64,
    pub in_packets: u64,
    pub in_bytes: u64,
    pub out_packets: u64,
    pub out_bytes: u64,
}

impl From<lb_common::Counters> for CountersView {
    fn from(c: lb_common::Counters) -> Self {
        CountersView {
            conns: c.conns,
            in_packets: c.in_packets,
            in_bytes: c.in_bytes,
            out_packets: c.out_packets,
            out_bytes: c.out_bytes,
        }
    }
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub key: ServiceKey,
    pub scheduler: Scheduler,
    #[serde(default)]
    pub sched_flags: crate::config::SchedFlags,
    /// The destination ports covered (one entry for a single port).
    #[serde(default)]
    pub ports: Vec<crate::config::PortRange>,
    #[serde(default)]
    pub persistence: Option<crate::config::Persistence>,
    pub id: u32,
    pub stats: CountersView,
    /// `--rate` figures.
    #[serde(default)]
    pub rate: RateView,
    pub backends: Vec<BackendView>,
}

pub struct Engine {
    services: BTreeMap<ServiceKey, ServiceState>,
    service_ids: Ids,
    backend_ids: Ids,
    regions: Regions,
    trash: Vec<Trashed>,
    deferred: Vec<(Instant, Deferred)>,
    next_hops: HashMap<IpAddr, NextHop>,
    timeouts: Timeouts,
    expire_nodest_conn: bool,
    /// The prefilter bitmap as installed.
    filter: Vec<u64>,
    /// The NAT replies' prefilter as installed.
    nat_sources: Vec<u64>,
}

/// The clock the data plane stamps flows with (`bpf_ktime_get_coarse_ns`), in ticks.
pub fn monotonic_coarse_ticks() -> u32 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE");
    lb_common::ticks::from_ns(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Idle timeout per connection state, in seconds, with the `ipvsadm --set` values applied.
fn timeouts_secs(t: Timeouts) -> [u32; tcp::state::COUNT] {
    let mut s = tcp::DEFAULT_TIMEOUTS;
    s[tcp::state::ESTABLISHED as usize] = t.tcp;
    s[tcp::state::FIN_WAIT as usize] = t.tcp_fin;
    s[tcp::state::UDP as usize] = t.udp;
    s
}

impl Engine {
    pub fn new(dp: &Dataplane) -> Self {
        Engine {
            services: BTreeMap::new(),
            service_ids: Ids::new(dp.limits.max_services),
            backend_ids: Ids::new(dp.limits.max_backends),
            regions: Regions::new(dp.limits.slot_table_size),
            trash: Vec::new(),
            deferred: Vec::new(),
            next_hops: HashMap::new(),
            timeouts: Timeouts::default(),
            expire_nodest_conn: false,
            filter: vec![0; lb_common::filter::WORDS as usize + 1],
            nat_sources: vec![0; lb_common::filter::WORDS as usize],
        }
    }

    /// The services as configured now (configuration order of backends).
    pub fn services(&self) -> Vec<ServiceConfig> {
        self.configs().cloned().collect()
    }

    /// The services as applied, by reference.
    pub fn configs(&self) -> impl Iterator<Item = &ServiceConfig> {
        self.services.values().map(|s| &s.config)
    }

    /// Sets the idle timeouts (`ipvsadm --set`).
    pub fn set_timeouts(&mut self, dp: &mut Dataplane, t: Timeouts) -> Result<()> {
        self.timeouts = t;
        self.write_globals(dp)
    }

    /// The idle timeouts in force (`ipvsadm -L --timeout`).
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The idle timeout of a connection state, in seconds.
    pub fn state_timeout(&self, state: u8) -> u32 {
        timeouts_secs(self.timeouts)
            .get(state as usize)
            .copied()
            .unwrap_or(0)
    }

    /// IPVS `expire_nodest_conn`.
    pub fn set_expire_nodest_conn(&mut self, dp: &mut Dataplane, on: bool) -> Result<()> {
        self.expire_nodest_conn = on;
        self.write_globals(dp)
    }

    fn write_globals(&self, dp: &mut Dataplane) -> Result<()> {
        let mut g = Globals::with_timeouts(timeouts_secs(self.timeouts));
        if self.expire_nodest_conn {
            g.flags |= lb_common::GLOBAL_F_EXPIRE_NODEST;
        }
        dp.set_globals(&g)
    }

    /// Makes the data plane serve exactly `desired`. Validates and computes everything first;
    /// on error nothing changes.
    pub fn apply(&mut self, dp: &mut Dataplane, desired: &[ServiceConfig]) -> Result<()> {
        let old: Vec<ServiceConfig> = self.services.values().map(|s| s.config.clone()).collect();
        matching::check_capacity(&old, desired, dp.limits.max_services)
            .map_err(anyhow::Error::msg)?;
        self.collect_deferred(dp);
        let mut next = self.clone_state();
        let mut ops = Vec::new();
        let mut retire = Vec::new();
        let now = Instant::now();
        for t in next.take_expired_trash(dp, now) {
            retire.push(Deferred::BackendIndex(t.index));
        }

        // Removed services.
        for (key, old) in &self.services {
            if !desired.iter().any(|d| d.key == *key) {
                let st = next.services.remove(key).expect("cloned");
                ops.push(Op::RemoveEntries(matching::entries(&old.config)));
                for b in &st.backends {
                    next.retire_backend(&mut ops, *key, st.id, b, now);
                }
                if let Some(r) = old.region {
                    retire.push(Deferred::Region(r));
                }
                retire.push(Deferred::ServiceId(old.id));
            }
        }

        for want in desired {
            next.plan_service(dp, want, &mut ops, &mut retire, now)
                .with_context(|| format!("service \"{}\" ({})", want.name, want.key))?;
        }

        // The prefilter never misses a service: new bits before the switch, stale ones after.
        let filter = matching::filter_words(desired);
        if filter != self.filter {
            let union: Vec<u64> = filter
                .iter()
                .zip(&self.filter)
                .map(|(a, b)| a | b)
                .collect();
            ops.push(Op::FilterUnion(union));
            ops.push(Op::FilterFinal(filter.clone()));
        }
        next.filter = filter;
        let nat_sources = matching::nat_source_words(desired);
        if nat_sources != self.nat_sources {
            let union: Vec<u64> = nat_sources
                .iter()
                .zip(&self.nat_sources)
                .map(|(a, b)| a | b)
                .collect();
            ops.push(Op::NatSourcesUnion(union));
            ops.push(Op::NatSourcesFinal(nat_sources.clone()));
        }
        next.nat_sources = nat_sources;

        // Execute: unreferenced entries first, then the switch, then retirement.
        let stage = |op: &Op| match op {
            Op::ResetService(_) | Op::ResetBackendStats(_) => 0,
            Op::WriteBackend(_, b) if b.flags & BACKEND_F_AVAILABLE != 0 => 1,
            Op::WriteSlots(..) | Op::DirtyGroups(..) => 2,
            Op::FilterUnion(_) | Op::NatSourcesUnion(_) => 3,
            Op::PutService(..) => 4,
            Op::RemoveEntries(_) => 5,
            Op::FilterFinal(_) | Op::NatSourcesFinal(_) | Op::DirtyGroupsAfterSwitch(..) => 6,
            // Backends retired by this change: only once nothing new can reach them.
            Op::WriteBackend(..) => 7,
        };
        ops.sort_by_key(stage);
        let mut bumped = false;
        for op in ops {
            if !bumped && stage(&op) > 5 {
                // Per-CPU copies of replaced service entries stop being used right after the
                // switch; what they referenced is reused only after a grace period.
                dp.bump_config_generation()?;
                bumped = true;
            }
            match op {
                Op::PutService(key, entries, mut svc, p) => {
                    let picks = if p.fresh { 0 } else { dp.picks(svc.id)? };
                    let mut seq = p.before;
                    let table = seq.change(picks, &p.targets)?;
                    svc.sched_offset = table.offset;
                    for e in &entries {
                        dp.put_entry(e, &svc)?;
                    }
                    if let Some(st) = next.services.get_mut(&key) {
                        debug_assert_eq!(st.table.slots, table.slots);
                        st.seq = seq;
                        st.table = table;
                    }
                }
                op => execute(dp, op)?,
            }
        }
        if !bumped {
            dp.bump_config_generation()?;
        }
        let at = Instant::now();
        next.deferred.extend(retire.into_iter().map(|d| (at, d)));
        *self = next;
        // Thresholds may have changed: the overload flags follow (as on an IPVS edit). A
        // changed flag invalidates its scan group and the cached twos sums (another
        // configuration generation).
        let mut flipped = false;
        for st in self.services.values() {
            for b in &st.backends {
                let entry = self.backend_entry_for(b, st.id);
                if dp.refresh_overload(b.index, &entry)? {
                    flipped = true;
                    if let Some(g) = b.group {
                        dp.dirty_groups(g, 1)?;
                    }
                }
            }
        }
        if flipped {
            dp.bump_config_generation()?;
        }
        Ok(())
    }

    /// The state a successor needs to take over the pinned maps (see [`Engine::adopt`]).
    pub fn snapshot(&self) -> EngineSnapshot {
        EngineSnapshot {
            services: self.services.iter().map(|(k, v)| (*k, v.clone())).collect(),
            service_ids: self.service_ids.clone(),
            backend_ids: self.backend_ids.clone(),
            regions: self.regions.clone(),
            trash: self.trash.clone(),
            deferred: self.deferred.iter().map(|(_, d)| d.clone()).collect(),
            next_hops: self.next_hops.iter().map(|(a, n)| (*a, *n)).collect(),
            timeouts: self.timeouts,
            expire_nodest_conn: self.expire_nodest_conn,
            filter: self.filter.clone(),
            nat_sources: self.nat_sources.clone(),
        }
    }

    /// Takes over from a predecessor whose maps `dp` reuses: the same ids, indexes, slot
    /// regions and sequences, so that every recorded connection still finds its server.
    pub fn adopt(dp: &Dataplane, s: EngineSnapshot) -> Result<Self> {
        let fresh = Engine::new(dp);
        let sizes = |ids: &Ids| ids.generation.len();
        if sizes(&s.service_ids) != sizes(&fresh.service_ids)
            || sizes(&s.backend_ids) != sizes(&fresh.backend_ids)
            || s.filter.len() != fresh.filter.len()
            || s.nat_sources.len() != fresh.nat_sources.len()
        {
            bail!("the saved state was made for other map sizes");
        }
        let now = Instant::now();
        Ok(Engine {
            services: s.services.into_iter().collect(),
            service_ids: s.service_ids,
            backend_ids: s.backend_ids,
            regions: s.regions,
            trash: s.trash,
            deferred: s.deferred.into_iter().map(|d| (now, d)).collect(),
            next_hops: s.next_hops.into_iter().collect(),
            timeouts: s.timeouts,
            expire_nodest_conn: s.expire_nodest_conn,
            filter: s.filter,
            nat_sources: s.nat_sources,
        })
    }

    fn clone_state(&self) -> Engine {
        Engine {
            services: self.services.clone(),
            service_ids: self.service_ids.clone(),
            backend_ids: self.backend_ids.clone(),
            regions: self.regions.clone(),
            trash: self.trash.clone(),
            deferred: self.deferred.clone(),
            next_hops: self.next_hops.clone(),
            timeouts: self.timeouts,
            expire_nodest_conn: self.expire_nodest_conn,
            filter: self.filter.clone(),
            nat_sources: self.nat_sources.clone(),
        }
    }

    /// Releases ids and slot regions retired by earlier changes, once no packet can still
    /// be using them (after a grace period, see [`Dataplane::wait_for_readers`]).
    pub fn collect_deferred(&mut self, dp: &mut Dataplane) {
        let Some(newest) = self.deferred.iter().map(|(t, _)| *t).max() else {
            return;
        };
        dp.wait_for_readers(newest);
        for (_, d) in std::mem::take(&mut self.deferred) {
            match d {
                Deferred::Region(r) => self.regions.release(r),
                Deferred::ServiceId(id) => {
                    // Templates and lblc/lblcr cache entries name their service by id: none
                    // may outlive it.
                    if let Err(e) = dp.purge_templates(id) {
                        tracing::warn!("purging the templates of service id {id}: {e:#}");
                    }
                    self.service_ids.release(id)
                }
                Deferred::BackendIndex(i) => self.backend_ids.release(i),
            }
        }
    }

    /// Removes from the trash the servers past their revival period that have no connection
    /// left (as IPVS frees a trashed destination once nothing refers to it): their indexes
    /// may be reused only then, because connection counts live at the index.
    fn take_expired_trash(&mut self, dp: &Dataplane, now: Instant) -> Vec<Trashed> {
        let (gone, kept): (Vec<Trashed>, Vec<Trashed>) = std::mem::take(&mut self.trash)
            .into_iter()
            .partition(|t| t.until <= now && dp.conn_counts(t.index).is_ok_and(|c| c.total() == 0));
        self.trash = kept;
        gone
    }

    /// Periodic housekeeping between configuration changes: frees trashed servers whose
    /// connections are all gone, and what earlier changes retired.
    /// Returns whether anything changed.
    pub fn expire_trash(&mut self, dp: &mut Dataplane) -> bool {
        let now = Instant::now();
        let gone = self.take_expired_trash(dp, now);
        let changed = !gone.is_empty() || !self.deferred.is_empty();
        self.deferred.extend(
            gone.into_iter()
                .map(|t| (now, Deferred::BackendIndex(t.index))),
        );
        self.collect_deferred(dp);
        changed
    }

    /// Marks a removed real server unavailable and keeps it in the trash for revival.
    fn retire_backend(
        &mut self,
        ops: &mut Vec<Op>,
        svc: ServiceKey,
        service_id: u32,
        b: &BackendState,
        now: Instant,
    ) {
        let mut entry = self.backend_entry_for(b, service_id);
        entry.flags &= !BACKEND_F_AVAILABLE;
        ops.push(Op::WriteBackend(b.index, entry));
        self.trash.push(Trashed {
            service: svc,
            backend: (b.config.addr, b.config.port),
            forwarding: b.config.forwarding,
            index: b.index,
            generation: b.generation,
            until: now + TRASH_PERIOD,
        });
    }

    fn plan_service(
        &mut self,
        dp: &Dataplane,
        want: &ServiceConfig,
        ops: &mut Vec<Op>,
        retire: &mut Vec<Deferred>,
        now: Instant,
    ) -> Result<()> {
        let key = want.key;
        let mut fresh = false;
        let mut st = match self.services.remove(&key) {
            Some(st) => st,
            None => {
                fresh = true;
                let Some((id, _)) = self.service_ids.alloc() else {
                    bail!("no free service id (dataplane.max_services reached)");
                };
                ops.push(Op::ResetService(id));
                ServiceState {
                    id,
                    config: want.clone(),
                    backends: Vec::new(),
                    seq: Sequencer::with_mh_size(want.scheduler, want.mh_table_size),
                    table: Table::default(),
                    region: None,
                }
            }
        };
        if st.seq.scheduler() != want.scheduler || st.config.mh_table_size != want.mh_table_size {
            // ipvsadm -E with another scheduler binds a fresh one to the existing servers.
            st.seq = st.seq.rebind(want.scheduler, want.mh_table_size);
        }

        // Backends: keep, change, add, remove.
        let mut backends = Vec::with_capacity(want.backends.len());
        // The indexes the slot table holds now (a server may get a new one below).
        let old_index_of: HashMap<DestId, u32> = st
            .backends
            .iter()
            .map(|b| ((b.config.addr, b.config.port), b.index))
            .collect();
        for bc in &want.backends {
            let id = (bc.addr, bc.port);
            let existing = st
                .backends
                .iter()
                .position(|b| (b.config.addr, b.config.port) == id)
                .map(|i| st.backends.remove(i));
            // A connection keeps the forwarding method it was created with (as in IPVS): a
            // server whose method changes becomes a new entry, and the old one retires with
            // its connections (which end as a removed server's do).
            let existing = match existing {
                Some(b) if b.config.forwarding != bc.forwarding => {
                    st.backends.push(b);
                    None
                }
                other => other,
            };
            let b = match existing {
                Some(mut b) => {
                    // Weight and forwarding live in the entry (the hashing schedulers check
                    // the weight on the packet path).
                    if b.config != *bc {
                        b.config = bc.clone();
                        ops.push(Op::WriteBackend(b.index, self.backend_entry_for(&b, st.id)));
                    }
                    b
                }
                None => {
                    // Revive from the trash (same index and generation: flows resume), or
                    // take a fresh index. Not across a change of forwarding method (the
                    // trashed entry's connections were made for the other one).
                    let revived = self
                        .trash
                        .iter()
                        .position(|t| {
                            t.service == key && t.backend == id && t.forwarding == bc.forwarding
                        })
                        .map(|i| self.trash.remove(i));
                    let (index, generation) = match revived {
                        Some(t) => (t.index, t.generation),
                        None => {
                            let Some(x) = self.backend_ids.alloc() else {
                                bail!("no free real-server slot (dataplane.max_backends reached)");
                            };
                            ops.push(Op::ResetBackendStats(x.0));
                            x
                        }
                    };
                    let b = BackendState {
                        index,
                        generation,
                        config: bc.clone(),
                        group: None,
                    };
                    ops.push(Op::WriteBackend(index, self.backend_entry_for(&b, st.id)));
                    b
                }
            };
            backends.push(b);
        }
        for gone in std::mem::take(&mut st.backends) {
            self.retire_backend(ops, key, st.id, &gone, now);
        }
        st.backends = backends;

        // Scheduler table.
        let targets: Vec<Dest> = st
            .backends
            .iter()
            .map(|b| Dest {
                id: (b.config.addr, b.config.port),
                weight: b.config.weight,
            })
            .collect();
        // Planned now (validation, slot table); the offset is computed again when the entry
        // is written.
        let before = st.seq.clone();
        let picks = if fresh { 0 } else { dp.picks(st.id)? };
        let table = st.seq.change(picks, &targets)?;
        let index_of: HashMap<DestId, u32> = st
            .backends
            .iter()
            .map(|b| ((b.config.addr, b.config.port), b.index))
            .collect();
        let slots: Vec<u32> = table.slots.iter().map(|d| index_of[d]).collect();
        // The table in place serves if it names the same servers at the same indexes.
        let same_slots = st.region.is_some()
            && st.table.slots == table.slots
            && table
                .slots
                .iter()
                .all(|d| old_index_of.get(d) == index_of.get(d));
        if !same_slots {
            if let Some(r) = st.region.take() {
                retire.push(Deferred::Region(r));
            }
            if !slots.is_empty() {
                // A table scanned by groups starts on a group boundary.
                let align = if grouped(want.scheduler, slots.len()) {
                    lb_common::group::SIZE
                } else {
                    1
                };
                let Some(r) = self.regions.alloc(slots.len() as u32, align) else {
                    bail!(
                        "the slot table needs {} entries and dataplane.slot_table_size has no free range that large",
                        slots.len()
                    );
                };
                ops.push(Op::WriteSlots(r.start, slots.clone()));
                st.region = Some(r);
            }
        }
        // Scan groups: each server learns its group (written into its entry, where the
        // connection accounting finds it), and the groups start dirty.
        let grouped = grouped(want.scheduler, slots.len());
        let start = st.region.map_or(0, |r| r.start);
        // Each server holds at most one slot in these tables (one per server with weight).
        let group_of: HashMap<u32, u32> = if grouped {
            slots
                .iter()
                .enumerate()
                .map(|(pos, &i)| (i, (start + pos as u32) >> lb_common::group::SHIFT))
                .collect()
        } else {
            HashMap::new()
        };
        for b in &mut st.backends {
            let group = group_of.get(&b.index).copied();
            if group != b.group {
                b.group = group;
                ops.push(Op::WriteBackend(b.index, self.backend_entry_for(b, st.id)));
            }
        }
        if grouped {
            let first = start >> lb_common::group::SHIFT;
            let n = (slots.len() as u32).div_ceil(lb_common::group::SIZE);
            ops.push(Op::DirtyGroups(first, n));
            ops.push(Op::DirtyGroupsAfterSwitch(first, n));
        }
        st.table = table;
        let entries = matching::entries(want);
        if !fresh {
            let stale: Vec<MatchEntry> = matching::entries(&st.config)
                .into_iter()
                .filter(|e| !entries.contains(e))
                .collect();
            if !stale.is_empty() {
                ops.push(Op::RemoveEntries(stale));
            }
        }
        st.config = want.clone();
        let region = st.region.unwrap_or(Region { start: 0, len: 0 });
        ops.push(Op::PutService(
            key,
            entries,
            Service {
                id: st.id,
                slots_base: region.start,
                slots_len: st.table.slots.len() as u32,
                sched_offset: st.table.offset,
                scheduler: want.scheduler.code(),
                flags: want.sched_flags.bits()
                    | if want.conntrack {
                        0
                    } else {
                        lb_common::sched::F_STATELESS
                    },
                persist_timeout: want
                    .persistence
                    .map_or(0, |p| lb_common::ticks::from_secs(p.timeout)),
                persist_prefix: want.persistence.map_or(0, |p| p.prefix),
                match_bits: want.key.prefix,
            },
            Box::new(PendingSched {
                before,
                targets,
                fresh,
            }),
        ));
        self.services.insert(key, st);
        Ok(())
    }

    fn backend_entry_for(&self, b: &BackendState, service_id: u32) -> Backend {
        let mut e = Backend {
            addr: addr_words(b.config.addr),
            port: b.config.port.to_be(),
            family: family(b.config.addr),
            forward: b.config.forwarding.code(),
            flags: BACKEND_F_AVAILABLE,
            service_id,
            generation: b.generation,
            weight: b.config.weight,
            upper_threshold: b.config.upper_threshold,
            lower_threshold: b.config.lower_threshold,
            ..Backend::default()
        };
        e.set_group_index(b.group);
        if let Some(t) = &b.config.tunnel {
            e.tun_type = t.kind.code();
            e.tun_flags = t.flags();
            e.tun_port = t.port.to_be();
        }
        if let Some(nh) = self.next_hops.get(&b.config.addr) {
            e.ifindex = nh.ifindex;
            e.dst_mac = nh.dst_mac;
            e.src_mac = nh.src_mac;
            e.mtu = nh.mtu;
            let source = b.config.tunnel.and_then(|t| t.source).or(nh.source);
            if let Some(src) = source {
                e.tun_src = addr_words(src);
            }
            // Direct routing reaches the server itself, never a router on the way; a tunnel
            // needs an outer source address.
            let usable = match b.config.forwarding {
                Forwarding::Dr => nh.gateway.is_none(),
                Forwarding::Tunnel => source.is_some(),
                Forwarding::Nat => true,
            };
            if usable {
                e.flags |= BACKEND_F_NEIGH_VALID;
            }
        }
        e
    }

    /// Records where `addr` is reached (or that it is not, with `None`) and rewrites the
    /// backends with that address.
    pub fn set_next_hop(
        &mut self,
        dp: &mut Dataplane,
        addr: IpAddr,
        nh: Option<NextHop>,
    ) -> Result<()> {
        if self.next_hops.get(&addr) == nh.as_ref() {
            return Ok(());
        }
        match nh {
            Some(nh) => self.next_hops.insert(addr, nh),
            None => self.next_hops.remove(&addr),
        };
        for st in self.services.values() {
            for b in st.backends.iter().filter(|b| b.config.addr == addr) {
                if let Some(gw) = nh.and_then(|n| n.gateway)
                    && b.config.forwarding == Forwarding::Dr
                {
                    tracing::warn!(
                        %addr, gateway = %gw, service = %st.config.name,
                        "direct routing needs the real server on a directly connected network, but it is routed through a gateway: its packets are dropped (drop_neigh_missing); use nat or tunnel, or fix the route"
                    );
                }
                if b.config.forwarding == Forwarding::Tunnel
                    && b.config.tunnel.and_then(|t| t.source).is_none()
                    && nh.is_some_and(|n| n.source.is_none())
                {
                    tracing::warn!(
                        %addr, service = %st.config.name,
                        "no source address for the tunnel (the route gives none): set tunnel.source"
                    );
                }
                dp.write_backend(b.index, &self.backend_entry_for(b, st.id))?;
            }
        }
        Ok(())
    }

    pub fn next_hop(&self, addr: IpAddr) -> Option<NextHop> {
        self.next_hops.get(&addr).copied()
    }

    /// The real server address behind a backend index (for neighbour events).
    pub fn backend_addr(&self, index: u32) -> Option<IpAddr> {
        self.services
            .values()
            .flat_map(|s| s.backends.iter())
            .find(|b| b.index == index)
            .map(|b| b.config.addr)
    }

    /// The table as `ipvsadm -L` shows it, with live counters. Connection counts are the
    /// data plane's (exact; idle connections leave them when the reaper retires them).
    pub fn view(&self, dp: &Dataplane) -> Result<Vec<ServiceView>> {
        let mut out = Vec::new();
        for st in self.services.values() {
            let mut backends = Vec::new();
            for b in &st.backends {
                let conns = dp.conn_counts(b.index)?;
                backends.push(BackendView {
                    addr: b.config.addr,
                    port: b.config.port,
                    forwarding: b.config.forwarding,
                    weight: b.config.weight,
                    active_conns: conns.active,
                    inactive_conns: conns.inactive,
                    stats: dp.backend_stats(b.index)?.into(),
                    mac: self
                        .next_hops
                        .get(&b.config.addr)
                        .map(|n| mac_string(&n.dst_mac)),
                    index: b.index,
                    upper_threshold: b.config.upper_threshold,
                    lower_threshold: b.config.lower_threshold,
                    tunnel: b.config.tunnel,
                    persist_conns: 0,
                    rate: RateView::default(),
                });
            }
            out.push(ServiceView {
                name: st.config.name.clone(),
                key: st.config.key,
                scheduler: st.config.scheduler,
                sched_flags: st.config.sched_flags,
                ports: st.config.ports.clone(),
                persistence: st.config.persistence,
                id: st.id,
                stats: dp.service_stats(st.id)?.into(),
                rate: RateView::default(),
                backends,
            });
        }
        Ok(out)
    }

    /// Backend index of a real server of a service (tests, diagnostics).
    pub fn backend_index(&self, svc: &ServiceKey, addr: IpAddr, port: u16) -> Option<u32> {
        self.services
            .get(svc)?
            .backends
            .iter()
            .find(|b| b.config.addr == addr && b.config.port == port)
            .map(|b| b.index)
    }

    /// Service id of a service (tests, diagnostics).
    pub fn service_id(&self, svc: &ServiceKey) -> Option<u32> {
        self.services.get(svc).map(|s| s.id)
    }

    /// Every service with its id and its real servers' backend indexes and generations
    /// (configuration order): what connection synchronisation resolves records against.
    pub fn service_refs(&self) -> Vec<ServiceRef<'_>> {
        self.services
            .values()
            .map(|st| ServiceRef {
                id: st.id,
                config: &st.config,
                backends: st
                    .backends
                    .iter()
                    .map(|b| BackendRef {
                        index: b.index,
                        generation: b.generation,
                        config: &b.config,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// A service as [`Engine::service_refs`] shows it.
pub struct ServiceRef<'a> {
    pub id: u32,
    pub config: &'a ServiceConfig,
    pub backends: Vec<BackendRef<'a>>,
}

/// A real server of a [`ServiceRef`]: its backend index and generation.
pub struct BackendRef<'a> {
    pub index: u32,
    pub generation: u32,
    pub config: &'a BackendConfig,
}

fn execute(dp: &mut Dataplane, op: Op) -> Result<()> {
    match op {
        Op::ResetService(id) => {
            dp.reset_sched_state(id)?;
            dp.reset_service_stats(id)
        }
        Op::ResetBackendStats(i) => dp.reset_backend_stats(i),
        Op::WriteBackend(i, b) => dp.write_backend(i, &b),
        Op::WriteSlots(base, v) => dp.write_slots(base, &v),
        Op::DirtyGroups(first, n) | Op::DirtyGroupsAfterSwitch(first, n) => {
            dp.dirty_groups(first, n)
        }
        Op::PutService(_, entries, v, _) => entries.iter().try_for_each(|e| dp.put_entry(e, &v)),
        Op::RemoveEntries(entries) => entries.iter().try_for_each(|e| dp.remove_entry(e)),
        Op::FilterUnion(w) | Op::FilterFinal(w) => dp.write_filter(&w),
        Op::NatSourcesUnion(w) | Op::NatSourcesFinal(w) => dp.write_nat_sources(&w),
    }
}

/// An address as the data plane stores it: wire byte order in 32-bit words.
pub fn addr_words(a: IpAddr) -> [u32; 4] {
    match a {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

/// The address of key words of `family` (`FAMILY_V4`: word 0; `FAMILY_V6`: all four);
/// `None` for another family.
pub fn addr_of_words(family: u8, w: [u32; 4]) -> Option<IpAddr> {
    match family {
        lb_common::FAMILY_V4 => Some(IpAddr::from(w[0].to_ne_bytes())),
        lb_common::FAMILY_V6 => Some(v6_of_words(w)),
        _ => None,
    }
}

/// The IPv6 address of key words (the inverse of [`addr_words`] for IPv6).
pub fn v6_of_words(w: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    IpAddr::from(o)
}

fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 }
}

pub fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_first_fit_and_merge() {
        let mut r = Regions::new(100);
        let a = r.alloc(10, 1).unwrap();
        let b = r.alloc(20, 1).unwrap();
        let c = r.alloc(30, 1).unwrap();
        assert_eq!((a.start, b.start, c.start), (0, 10, 30));
        r.release(b);
        assert_eq!(r.alloc(15, 1).unwrap().start, 10);
        r.release(a);
        r.release(Region { start: 10, len: 15 });
        r.release(c);
        assert_eq!(r.free, BTreeMap::from([(0, 100)]));
        assert!(r.alloc(101, 1).is_none());
    }

    #[test]
    fn regions_align_and_keep_the_gap() {
        let mut r = Regions::new(200);
        let a = r.alloc(10, 1).unwrap();
        let g = r.alloc(70, 64).unwrap();
        assert_eq!((a.start, g.start), (0, 64));
        // The gap before the aligned range stays free.
        assert_eq!(r.alloc(54, 1).unwrap().start, 10);
        assert_eq!(r.alloc(66, 1).unwrap().start, 134);
        assert!(r.alloc(1, 64).is_none());
        r.release(g);
        assert_eq!(r.alloc(64, 64).unwrap().start, 64);
    }

    #[test]
    fn ids_bump_generation_on_reuse() {
        let mut ids = Ids::new(2);
        assert_eq!(ids.alloc(), Some((0, 1)));
        assert_eq!(ids.alloc(), Some((1, 1)));
        assert_eq!(ids.alloc(), None);
        ids.release(0);
        assert_eq!(ids.alloc(), Some((0, 2)));
    }
}
