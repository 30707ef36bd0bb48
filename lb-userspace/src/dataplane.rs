//! The loaded XDP program and its maps: loading with the configured capacities, attaching,
//! and the low-level writes whose order makes every change atomic for packets.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray, RingBuf,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    Backend, BackendSlot, ConnCounts, Counters, Flow, FlowKeyV4, FlowKeyV6, FlowPool, FlowQuota,
    FragKeyV4, FragKeyV6, Fragment, Globals, GroupState, Locality, LocalityKeyV4, LocalityKeyV6,
    NatV4, NatV6, PASS_PROGRAM_NAME, PROGRAM_NAME, REAPER_NAME, SYNC_INSTALL_NAME, SchedState,
    Service, ServiceKeyV4, ServiceKeyV6, SyncBatch, SyncConn, Template, TemplateKeyV4,
    TemplateKeyV6,
    conntable::{self, FlowBucket, FlowEntry},
    map_names as names, reason, wide,
};
use tracing::{info, warn};

use crate::{
    config::{Limits, XdpModeSetting},
    engine::v6_of_words,
    matching::MatchEntry,
};

/// The XDP object, built from `lb-ebpf` by this crate's build script.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb.bpf.o"));

/// Where the kernel cannot wait for an RCU grace period on our behalf (see
/// [`Dataplane::wait_for_readers`]), how long to wait instead. An XDP program runs for
/// microseconds with bottom halves disabled; this is orders of magnitude more.
const FALLBACK_GRACE: Duration = Duration::from_millis(50);

/// The maps that hold state across daemons: pinned under the instance's pin directory and
/// reused by the next daemon (connections, counters, services, servers, scheduler state).
/// Scratch maps, the event ring and the tail-call table belong to one loaded object.
pub const PINNED_MAPS: &[&str] = &[
    names::BACKENDS,
    names::BACKEND_CONNS,
    names::BACKEND_STATS,
    names::CONFIG_GEN,
    names::FLOWS_V4,
    names::FLOWS_V6,
    names::FLOW_BUCKETS_V4,
    names::FLOW_BUCKETS_V6,
    names::FLOW_SPILLED_V4,
    names::FLOW_SPILLED_V6,
    names::FLOW_POOL,
    names::FLOW_QUOTA,
    names::FRAGS_V4,
    names::FRAGS_V6,
    names::GLOBALS,
    names::GROUPS,
    names::LOCALITY_V4,
    names::LOCALITY_V6,
    names::NAT_SOURCES,
    names::NAT_V4,
    names::NAT_V6,
    names::PREFIX_V4,
    names::PREFIX_V6,
    names::REASONS,
    names::RECENT_V4,
    names::RECENT_V6,
    names::SCHED_STATE,
    names::SERVICES_V4,
    names::SERVICES_V6,
    names::SERVICE_FILTER,
    names::SERVICE_STATS,
    names::SLOTS,
    names::TEMPLATES_V4,
    names::TEMPLATES_V6,
    names::TX_PORTS,
    names::WIDE_V4,
    names::WIDE_V6,
];

/// Map flags the kernel adds on its own (devmaps are `BPF_F_RDONLY_PROG`): not a difference
/// between builds.
const KERNEL_SET_FLAGS: u32 = 1 << 7;

/// The pin of the XDP link on `interface` (the program stays attached while it exists).
fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link_{interface}"))
}

/// How an attachment is held.
enum Held {
    /// Owned by the program object: detached when dropped.
    Owned(XdpLinkId),
    /// Pinned: stays attached when this process exits, until the pin is removed.
    Pinned {
        link: aya::programs::links::PinnedLink,
        /// The program's own handle, when the link was taken over from a predecessor.
        adopted: Option<XdpLinkId>,
    },
}

/// Where the program ended up attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub mode: &'static str,
}

pub struct Dataplane {
    ebpf: Ebpf,
    /// Holds the new-flow programs the main program tail-calls (kept open with the object).
    #[allow(dead_code)]
    new_flow: ProgramArray<MapData>,
    pub limits: Limits,
    services_v4: HashMap<MapData, ServiceKeyV4, Service>,
    services_v6: HashMap<MapData, ServiceKeyV6, Service>,
    wide_v4: LpmTrie<MapData, [u8; wide::V4_LEN], Service>,
    wide_v6: LpmTrie<MapData, [u8; wide::V6_LEN], Service>,
    prefix_v4: LpmTrie<MapData, [u8; wide::V4_LEN], Service>,
    prefix_v6: LpmTrie<MapData, [u8; wide::V6_LEN], Service>,
    groups: Array<MapData, GroupState>,
    locality_v4: HashMap<MapData, LocalityKeyV4, Locality>,
    locality_v6: HashMap<MapData, LocalityKeyV6, Locality>,
    templates_v4: HashMap<MapData, TemplateKeyV4, Template>,
    templates_v6: HashMap<MapData, TemplateKeyV6, Template>,
    backends: Array<MapData, BackendSlot>,
    slots: Mmapped<u32>,
    filter: Mmapped<u64>,
    /// NAT replies' prefilter (`NAT_SOURCES`): `filter`'s bits without its flag word.
    nat_sources: Mmapped<u64>,
    nat_v4: HashMap<MapData, FlowKeyV4, NatV4>,
    nat_v6: HashMap<MapData, FlowKeyV6, NatV6>,
    frags_v4: HashMap<MapData, FragKeyV4, Fragment>,
    frags_v6: HashMap<MapData, FragKeyV6, Fragment>,
    config_gen: Mmapped<u64>,
    sched_state: Array<MapData, SchedState>,
    flows_v4: Array<MapData, FlowEntry<FlowKeyV4>>,
    flows_v6: Array<MapData, FlowEntry<FlowKeyV6>>,
    flow_buckets_v4: Array<MapData, FlowBucket>,
    flow_buckets_v6: Array<MapData, FlowBucket>,
    /// Held for their memory figures only: the program alone uses them.
    flow_spilled_v4: Array<MapData, u64>,
    flow_spilled_v6: Array<MapData, u64>,
    backend_conns: Mmapped<ConnCounts>,
    flow_pool: Array<MapData, FlowPool>,
    flow_quota: PerCpuArray<MapData, FlowQuota>,
    /// Held for their memory figures only: the program alone uses them.
    recent_v4: PerCpuArray<MapData, FlowKeyV4>,
    recent_v6: PerCpuArray<MapData, FlowKeyV6>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    globals: Array<MapData, Globals>,
    tx_ports: DevMapHash<MapData>,
    events: Option<RingBuf<MapData>>,
    /// Connections and templates for the backups (`SYNC_EVENTS`), until taken.
    sync_events: Option<RingBuf<MapData>>,
    /// `GLOBAL_F_SYNC_EVENTS` is on (kept across [`Dataplane::set_globals`]).
    sync_on: bool,
    links: Vec<(Attachment, Held)>,
    /// The pin directory, when the maps are pinned.
    pin_dir: Option<PathBuf>,
    /// The maps came from a predecessor (their content is live).
    adopted: bool,
    /// The data plane was left running for a successor: its pins stay.
    left_running: bool,
    /// When each backend slot last flipped halves (see [`Dataplane::write_backend`]).
    last_flip: StdHashMap<u32, Instant>,
    /// When the last completed wait for readers started: everything retired before it is
    /// no longer seen by any packet.
    readers_done_since: Instant,
    ncpus: usize,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

/// Removes the entries of `map` whose key matches (best effort: a key the data plane
/// replaced meanwhile is simply gone already).
fn purge<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, matches: impl Fn(&K) -> bool) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| matches(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Writes the words of a bitmap that differ from `words`.
fn write_changed(map: &mut Mmapped<u64>, words: &[u64]) -> Result<()> {
    for (i, w) in words.iter().enumerate() {
        if map.read(i as u32) != Some(*w) {
            map.write(i as u32, &[*w])?;
        }
    }
    Ok(())
}

/// Entries of `GROUPS` for a slot table of `slots` entries.
fn groups_for(slots: u32) -> u32 {
    (slots >> lb_common::group::SHIFT) + 1
}

impl Dataplane {
    /// Loads the program and creates its maps with the configured capacities. Nothing is
    /// attached yet; nothing is pinned.
    pub fn load(limits: Limits) -> Result<Self> {
        Self::load_with(limits, None)
    }

    /// Like [`Dataplane::load`], with the state maps pinned under `dir`: maps a predecessor
    /// pinned there are reused as they are (see [`Dataplane::adopted`]), after checking
    /// that they have the capacities this configuration asks for.
    pub fn load_pinned(limits: Limits, dir: &Path) -> Result<Self> {
        ensure_bpffs_dir(dir)?;
        Self::load_with(limits, Some(dir))
    }

    /// Whether the maps were a predecessor's.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Checks a predecessor's pins in `dir` against this build's object and `limits`,
    /// without loading anything: every map of [`PINNED_MAPS`] must be there with the type,
    /// key and value sizes, flags and capacity this build and configuration would create.
    /// `Ok(false)`: there are none (a fresh start).
    pub fn check_pins(limits: &Limits, dir: &Path) -> Result<bool> {
        let present: Vec<&str> = PINNED_MAPS
            .iter()
            .copied()
            .filter(|n| dir.join(n).exists())
            .collect();
        if present.is_empty() {
            return Ok(false);
        }
        let afresh = format!(
            "remove {} to start afresh (the connections it holds are lost)",
            dir.display()
        );
        if present.len() != PINNED_MAPS.len() {
            let missing: Vec<&&str> = PINNED_MAPS
                .iter()
                .filter(|n| !present.contains(n))
                .collect();
            bail!(
                "{} holds only some of xlb's pinned maps (missing {missing:?}): not a complete state; {afresh}",
                dir.display()
            );
        }
        let ncpus = aya::util::nr_cpus().map_err(|(m, e)| anyhow!("{m}: {e}"))? as u32;
        let capacities = Self::capacities(limits, ncpus);
        let object = aya_obj::Object::parse(XDP_OBJECT).context("parsing the XDP object")?;
        let mut problems = Vec::new();
        for name in PINNED_MAPS {
            let def = object
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
            let want_entries = capacities
                .iter()
                .find(|(n, _)| n == name)
                .map_or(def.max_entries(), |(_, n)| *n);
            let info = aya::maps::MapInfo::from_pin(dir.join(name))
                .with_context(|| format!("opening the pinned map {}", dir.join(name).display()))?;
            let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
            if pinned_type != def.map_type()
                || info.key_size() != def.key_size()
                || info.value_size() != def.value_size()
                || info.map_flags() & !KERNEL_SET_FLAGS != def.map_flags() & !KERNEL_SET_FLAGS
            {
                problems.push(format!(
                    "{name} is a type {pinned_type} map of {}-byte keys and {}-byte values (flags {:#x}), this build makes type {} with {} and {} (flags {:#x})",
                    info.key_size(),
                    info.value_size(),
                    info.map_flags(),
                    def.map_type(),
                    def.key_size(),
                    def.value_size(),
                    def.map_flags()
                ));
            } else if info.max_entries() != want_entries {
                problems.push(format!(
                    "{name} has {} entries, this configuration wants {want_entries}",
                    info.max_entries()
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "the maps pinned in {} cannot be adopted: {}. Restore the previous [dataplane] sizes (or xlb version) to keep the running connections, or {afresh}",
                dir.display(),
                problems.join("; ")
            );
        }
        Ok(true)
    }

    /// The capacities the configuration gives the sized maps.
    fn capacities(limits: &Limits, ncpus: u32) -> Vec<(&'static str, u32)> {
        let reserve = lb_common::lru_table_reserve(ncpus);
        let slots_v4 = conntable::slots(limits.conn_table_size);
        let slots_v6 = conntable::slots(limits.conn_table_size_v6);
        let nat_size = |conns: u32| {
            if limits.nat_tables {
                conns + reserve
            } else {
                1
            }
        };
        vec![
            (names::FLOWS_V4, slots_v4),
            (names::FLOWS_V6, slots_v6),
            (names::FLOW_BUCKETS_V4, conntable::buckets(slots_v4)),
            (names::FLOW_BUCKETS_V6, conntable::buckets(slots_v6)),
            (names::FLOW_SPILLED_V4, conntable::spill_words(slots_v4)),
            (names::FLOW_SPILLED_V6, conntable::spill_words(slots_v6)),
            (names::NAT_V4, nat_size(limits.conn_table_size)),
            (names::NAT_V6, nat_size(limits.conn_table_size_v6)),
            (names::BACKEND_CONNS, limits.max_backends),
            (
                names::RECENT_V4,
                lb_common::recent_ring_size(limits.conn_table_size, ncpus),
            ),
            (
                names::RECENT_V6,
                lb_common::recent_ring_size(limits.conn_table_size_v6, ncpus),
            ),
            (names::SERVICES_V4, limits.max_services),
            (names::SERVICES_V6, limits.max_services),
            (names::SCHED_STATE, limits.max_services),
            (names::SERVICE_STATS, limits.max_services),
            (names::BACKENDS, limits.max_backends),
            (names::BACKEND_STATS, limits.max_backends),
            (names::SLOTS, limits.slot_table_size),
            (names::TEMPLATES_V4, limits.persistence_table_size),
            (names::TEMPLATES_V6, limits.persistence_table_size),
            (names::GROUPS, groups_for(limits.slot_table_size)),
            (names::LOCALITY_V4, limits.locality_table_size),
            (names::LOCALITY_V6, limits.locality_table_size),
        ]
    }

    fn load_with(limits: Limits, pin_dir: Option<&Path>) -> Result<Self> {
        raise_memlock_limit();
        let ncpus = aya::util::nr_cpus().map_err(|(m, e)| anyhow!("{m}: {e}"))?;
        // The connection tables have twice the pool's size in slots (see `conntable`). NAT's
        // reply tables (LRU) follow the pool, larger by what the LRU needs never to evict a live
        // NAT connection's entry (`lru_table_reserve`), unless NAT is configured out.
        let capacities = Self::capacities(&limits, ncpus as u32);
        let mut loader = EbpfLoader::new();
        for (name, n) in &capacities {
            loader.map_max_entries(name, *n);
        }
        let mut adopted = false;
        if let Some(dir) = pin_dir {
            adopted = Self::check_pins(&limits, dir)?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(XDP_OBJECT)
            .context("loading the XDP object (are you root with CAP_BPF/CAP_NET_ADMIN?)")?;
        let names_to_load = [
            PROGRAM_NAME,
            PASS_PROGRAM_NAME,
            REAPER_NAME,
            SYNC_INSTALL_NAME,
        ]
        .into_iter()
        .chain(lb_common::NEW_FLOW_PROGRAMS.iter().map(|(_, n)| *n));
        for name in names_to_load {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected the XDP program {name}"))?;
            if let Ok(info) = prog.info() {
                tracing::debug!(
                    program = name,
                    verified_insns = info.verified_instruction_count(),
                    "program verified"
                );
            }
        }
        // The main program tail-calls these for new flows.
        let mut new_flow: ProgramArray<MapData> = take(&mut ebpf, names::NEW_FLOW)?;
        for (index, name) in lb_common::NEW_FLOW_PROGRAMS {
            let prog: &Xdp = ebpf
                .program(name)
                .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
                .try_into()?;
            new_flow
                .set(index, prog.fd()?, 0)
                .with_context(|| format!("installing {name} in {}", names::NEW_FLOW))?;
        }
        let slots_map: Array<MapData, u32> = take(&mut ebpf, names::SLOTS)?;
        let filter_map: Array<MapData, u64> = take(&mut ebpf, names::SERVICE_FILTER)?;
        let nat_sources_map: Array<MapData, u64> = take(&mut ebpf, names::NAT_SOURCES)?;
        let gen_map: Array<MapData, u64> = take(&mut ebpf, names::CONFIG_GEN)?;
        let conns_map: Array<MapData, ConnCounts> = take(&mut ebpf, names::BACKEND_CONNS)?;
        let mut dp = Dataplane {
            services_v4: take(&mut ebpf, names::SERVICES_V4)?,
            services_v6: take(&mut ebpf, names::SERVICES_V6)?,
            wide_v4: take(&mut ebpf, names::WIDE_V4)?,
            wide_v6: take(&mut ebpf, names::WIDE_V6)?,
            prefix_v4: take(&mut ebpf, names::PREFIX_V4)?,
            prefix_v6: take(&mut ebpf, names::PREFIX_V6)?,
            locality_v4: take(&mut ebpf, names::LOCALITY_V4)?,
            locality_v6: take(&mut ebpf, names::LOCALITY_V6)?,
            templates_v4: take(&mut ebpf, names::TEMPLATES_V4)?,
            templates_v6: take(&mut ebpf, names::TEMPLATES_V6)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            slots: Mmapped::map(slots_map, limits.slot_table_size)?,
            filter: Mmapped::map(filter_map, lb_common::filter::WORDS + 1)?,
            nat_sources: Mmapped::map(nat_sources_map, lb_common::filter::WORDS)?,
            nat_v4: take(&mut ebpf, names::NAT_V4)?,
            nat_v6: take(&mut ebpf, names::NAT_V6)?,
            frags_v4: take(&mut ebpf, names::FRAGS_V4)?,
            frags_v6: take(&mut ebpf, names::FRAGS_V6)?,
            config_gen: Mmapped::map(gen_map, 1)?,
            sched_state: take(&mut ebpf, names::SCHED_STATE)?,
            groups: take(&mut ebpf, names::GROUPS)?,
            flows_v4: take(&mut ebpf, names::FLOWS_V4)?,
            flows_v6: take(&mut ebpf, names::FLOWS_V6)?,
            flow_buckets_v4: take(&mut ebpf, names::FLOW_BUCKETS_V4)?,
            flow_buckets_v6: take(&mut ebpf, names::FLOW_BUCKETS_V6)?,
            flow_spilled_v4: take(&mut ebpf, names::FLOW_SPILLED_V4)?,
            flow_spilled_v6: take(&mut ebpf, names::FLOW_SPILLED_V6)?,
            backend_conns: Mmapped::map(conns_map, limits.max_backends)?,
            flow_pool: take(&mut ebpf, names::FLOW_POOL)?,
            flow_quota: take(&mut ebpf, names::FLOW_QUOTA)?,
            recent_v4: take(&mut ebpf, names::RECENT_V4)?,
            recent_v6: take(&mut ebpf, names::RECENT_V6)?,
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            reasons: take(&mut ebpf, names::REASONS)?,
            globals: take(&mut ebpf, names::GLOBALS)?,
            tx_ports: take(&mut ebpf, names::TX_PORTS)?,
            events: Some(take(&mut ebpf, names::EVENTS)?),
            sync_events: Some(take(&mut ebpf, names::SYNC_EVENTS)?),
            sync_on: false,
            new_flow,
            ebpf,
            limits,
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            adopted,
            left_running: false,
            last_flip: StdHashMap::new(),
            readers_done_since: Instant::now(),
            ncpus,
        };
        if adopted {
            // Live connections are counted in FLOW_POOL/FLOW_QUOTA and the globals are in
            // force: nothing to initialise.
            dp.sync_on = dp
                .globals
                .get(&0, 0)
                .is_ok_and(|g| g.flags & lb_common::GLOBAL_F_SYNC_EVENTS != 0);
            return Ok(dp);
        }
        dp.set_globals(&Globals::default())?;
        for (i, capacity) in [limits.conn_table_size, limits.conn_table_size_v6]
            .into_iter()
            .enumerate()
        {
            let pool = FlowPool {
                free: capacity as i64,
                batch: lb_common::flow_pool_batch(capacity, ncpus as u32),
                recent_mask: lb_common::recent_ring_size(capacity, ncpus as u32) as u64 - 1,
                bucket_mask: conntable::buckets(conntable::slots(capacity)) as u64 - 1,
                seed: random_seed()?,
                ..FlowPool::default()
            };
            dp.flow_pool
                .set(i as u32, pool, 0)
                .context("writing FLOW_POOL")?;
        }
        Ok(dp)
    }

    /// Instructions the verifier walked through for each program of the object (its budget
    /// is one million per program).
    pub fn verified_instructions(&self) -> Vec<(String, Option<u32>)> {
        self.ebpf
            .programs()
            .map(|(name, p)| {
                let count = p.info().ok().and_then(|i| i.verified_instruction_count());
                (name.to_string(), count)
            })
            .collect()
    }

    /// The balancer program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(PROGRAM_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load")
    }

    /// Retires the connections idle past their timeout (runs the reaper program once over
    /// both connection tables).
    pub fn reap(&self) -> Result<()> {
        let prog: &Xdp = self
            .ebpf
            .program(REAPER_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load");
        // The program ignores its frame; BPF_PROG_TEST_RUN wants at least an Ethernet header.
        let frame = [0u8; 64];
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::default()
        })
        .context("running the connection reaper")?;
        Ok(())
    }

    /// Installs up to [`lb_common::sync::BATCH`] synchronised connections and templates
    /// (records resolved to this balancer's backend indexes, generations and service ids)
    /// with the `xlb_sync_install` program; returns each record's result (`sync::R_*`).
    pub fn install_sync(&self, records: &[SyncConn]) -> Result<Vec<u32>> {
        if records.len() > lb_common::sync::BATCH {
            bail!(
                "{} records in one install batch (at most {})",
                records.len(),
                lb_common::sync::BATCH
            );
        }
        let prog: &Xdp = self
            .ebpf
            .program(SYNC_INSTALL_NAME)
            .and_then(|p| <&Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load");
        let mut batch = SyncBatch {
            count: records.len() as u32,
            ..SyncBatch::default()
        };
        batch.records[..records.len()].copy_from_slice(records);
        let size = std::mem::size_of::<SyncBatch>();
        // SAFETY: `SyncBatch` is plain words without padding (lb-common's layout tests).
        let frame = unsafe { std::slice::from_raw_parts(&raw const batch as *const u8, size) };
        let mut out = vec![0u8; size];
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .context("running the sync install program")?;
        if r.return_value != 2 || r.data_size_out as usize != size {
            bail!(
                "the sync install program answered {} with {} bytes",
                r.return_value,
                r.data_size_out
            );
        }
        // SAFETY: `size` bytes of a `SyncBatch` as the program wrote it back.
        let done: SyncBatch = unsafe { std::ptr::read_unaligned(out.as_ptr() as *const SyncBatch) };
        Ok(done.records[..records.len()]
            .iter()
            .map(|r| r.result)
            .collect())
    }

    /// Makes the data plane report new and changed connections and new templates in
    /// `SYNC_EVENTS` (a synchronisation master), or stop.
    pub fn set_sync_events(&mut self, on: bool) -> Result<()> {
        self.sync_on = on;
        let g = self.globals.get(&0, 0).context("reading GLOBALS")?;
        self.set_globals(&g)
    }

    /// Whether the data plane reports connections for synchronisation.
    pub fn sync_events(&self) -> bool {
        self.sync_on
    }

    /// The ring buffer of connections to synchronise (taken once, by the task that sends
    /// them; see `connsync::SyncEvents`).
    pub fn take_sync_events(&mut self) -> Option<RingBuf<MapData>> {
        self.sync_events.take()
    }

    /// What `SYNC_EVENTS` holds now, oldest first (empty once the ring was taken).
    pub fn drain_sync_events(&mut self) -> Vec<SyncConn> {
        self.sync_events
            .as_mut()
            .map(crate::connsync::drain)
            .unwrap_or_default()
    }

    /// ActiveConn / InActConn (and the overload flag) of the real server at `index`.
    pub fn conn_counts(&self, index: u32) -> Result<ConnCounts> {
        self.backend_conns
            .read(index)
            .ok_or_else(|| anyhow!("backend index {index} beyond BACKEND_CONNS"))
    }

    /// Re-evaluates the server's overload flag after its thresholds changed (IPVS does so when
    /// a destination is edited); the data plane keeps it current as connections come and go.
    /// Re-evaluates a server's overload flag after its thresholds changed; `true` if the flag
    /// changed (the caller then invalidates what depends on it).
    pub fn refresh_overload(&mut self, index: u32, backend: &Backend) -> Result<bool> {
        let p = self
            .backend_conns
            .ptr_at(index)
            .ok_or_else(|| anyhow!("backend index {index} beyond BACKEND_CONNS"))?;
        // SAFETY: in bounds of the mapping; single aligned word accesses, as the program's.
        unsafe {
            let c = std::ptr::read_volatile(p);
            let was = c.overloaded != 0;
            let now = backend.overloaded(c.total(), was);
            if now != was {
                std::ptr::write_volatile(&raw mut (*p).overloaded, now as u64);
            }
            Ok(now != was)
        }
    }

    /// Connections that may still be created (IPv4, IPv6): the shared pool plus what CPUs
    /// hold. Equals the configured capacity minus the connections in the tables.
    pub fn flow_entries_free(&self) -> Result<[i64; 2]> {
        let quota = self.flow_quota.get(&0, 0)?;
        let mut free = [0i64; 2];
        for (i, f) in free.iter_mut().enumerate() {
            *f = self.flow_pool.get(&(i as u32), 0)?.free
                + quota.iter().map(|q| q.left[i] as i64).sum::<i64>();
        }
        Ok(free)
    }

    /// How table `index` (0 IPv4, 1 IPv6) places keys: its hash seed and bucket mask (see
    /// `lb_common::conntable`).
    pub fn flow_hashing(&self, index: u32) -> Result<(u64, u64)> {
        let pool = self.flow_pool.get(&index, 0).context("reading FLOW_POOL")?;
        Ok((pool.seed, pool.bucket_mask))
    }

    /// Connections in the tables (both families): capacity minus what may still be created.
    pub fn flows_in_table(&self) -> Result<u64> {
        let free = self.flow_entries_free()?;
        Ok((self.limits.conn_table_size as i64 - free[0]).max(0) as u64
            + (self.limits.conn_table_size_v6 as i64 - free[1]).max(0) as u64)
    }

    /// The ring buffer the program writes events to (taken once, by the daemon).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Attaches the balancer to `interface`.
    pub fn attach(&mut self, interface: &str, mode: XdpModeSetting) -> Result<Attachment> {
        let ifindex = ifindex(interface)?;
        let pin = self.pin_dir.as_deref().map(|d| link_pin(d, interface));
        if let Some(path) = pin.as_deref().filter(|p| p.exists()) {
            // A predecessor's program is attached here: replace it atomically (no packet
            // sees no program), keeping its link and pin. A link that cannot be updated (its
            // interface was deleted and made again) is replaced by a fresh attachment.
            match self.replace_pinned(interface, ifindex, path, mode) {
                Ok(attachment) => {
                    self.tx_ports
                        .insert(ifindex, ifindex, None, 0)
                        .with_context(|| format!("adding {interface} to the redirect map"))?;
                    return Ok(attachment);
                }
                Err(e) => {
                    warn!(
                        interface,
                        "cannot take the pinned link over ({e:#}); attaching afresh"
                    );
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        let (attachment, id) =
            attach_program(&mut self.ebpf, PROGRAM_NAME, interface, ifindex, mode)?;
        let held = match &pin {
            Some(path) => self.pin_link(id, path).with_context(|| {
                format!("pinning the XDP link of {interface} at {}", path.display())
            })?,
            None => Held::Owned(id),
        };
        self.links.push((attachment.clone(), held));
        // A devmap entry per interface, so real servers behind another attached interface
        // are reached with XDP_REDIRECT.
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding {interface} to the redirect map"))?;
        Ok(attachment)
    }

    fn xdp_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .expect("loaded in Dataplane::load")
    }

    /// Pins a fresh attachment's link, so the program stays attached after this process.
    fn pin_link(&mut self, id: XdpLinkId, path: &Path) -> Result<Held> {
        let link = self.xdp_mut().take_link(id)?;
        let fd: aya::programs::links::FdLink = link.try_into().map_err(|e| {
            anyhow!("{e} (the kernel attached XDP through netlink, without a link to pin)")
        })?;
        let pinned = fd.pin(path)?;
        Ok(Held::Pinned {
            link: pinned,
            adopted: None,
        })
    }

    /// Takes over a predecessor's pinned link on `interface`: `bpf_link_update` swaps the
    /// program in one step.
    fn replace_pinned(
        &mut self,
        interface: &str,
        ifindex: u32,
        path: &Path,
        mode: XdpModeSetting,
    ) -> Result<Attachment> {
        use aya::programs::links::{FdLink, PinnedLink};
        let keep = PinnedLink::from_pin(path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        let handle = FdLink::from(PinnedLink::from_pin(path)?);
        let xdp_link = aya::programs::xdp::XdpLink::try_from(handle)
            .map_err(|e| anyhow!("{} is not an XDP link: {e}", path.display()))?;
        let id = self
            .xdp_mut()
            .attach_to_link(xdp_link)
            .with_context(|| format!("replacing the program attached to {interface}"))?;
        let attachment = Attachment {
            interface: interface.to_string(),
            ifindex,
            // The link keeps the mode it was made with; `auto` resolved it then.
            mode: match mode {
                XdpModeSetting::Native => "native",
                XdpModeSetting::Generic => "generic",
                XdpModeSetting::Auto => "taken over",
            },
        };
        self.links.push((
            attachment.clone(),
            Held::Pinned {
                link: keep,
                adopted: Some(id),
            },
        ));
        info!(
            interface,
            "took over the attached program (atomic link update)"
        );
        Ok(attachment)
    }

    /// Pinned links of interfaces not in `interfaces` (a predecessor attached there): they
    /// are detached, or they would keep running the old program.
    pub fn drop_stale_links(&mut self, interfaces: &[String]) {
        let Some(dir) = self.pin_dir.clone() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = name.strip_prefix("link_")
                && !interfaces.iter().any(|i| i == ifname)
            {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => info!(
                        interface = ifname,
                        "detached the predecessor's program (interface no longer configured)"
                    ),
                    Err(err) => warn!(interface = ifname, "removing {}: {err}", e.path().display()),
                }
            }
        }
    }

    /// Lets the program redirect to interface `ifindex` (a real server's egress interface
    /// that xlb is not attached to).
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<()> {
        if self.tx_ports.get(ifindex, 0).is_ok() {
            return Ok(());
        }
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to the redirect map"))
    }

    pub fn attachments(&self) -> Vec<Attachment> {
        self.links.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Detaches from every interface, and removes the pinned state: a clean stop.
    pub fn detach_all(&mut self) {
        for (a, held) in std::mem::take(&mut self.links) {
            let result = match held {
                Held::Owned(id) => self.xdp_mut().detach(id).map_err(anyhow::Error::from),
                Held::Pinned { link, adopted, .. } => {
                    let r = link.unpin().map(drop).map_err(anyhow::Error::from);
                    if let Some(id) = adopted {
                        let _ = self.xdp_mut().detach(id);
                    }
                    r
                }
            };
            match result {
                Ok(()) => info!(interface = %a.interface, "detached"),
                Err(e) => warn!(interface = %a.interface, "detach failed: {e:#}"),
            }
        }
        if let Some(dir) = self.pin_dir.as_ref().filter(|_| !self.left_running) {
            for name in PINNED_MAPS {
                let _ = std::fs::remove_file(dir.join(name));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Leaves the program attached and the maps pinned for a successor (a handover): only
    /// this process's handles go.
    pub fn leave_running(&mut self) {
        let owned: Vec<String> = self
            .links
            .iter()
            .filter(|(_, h)| matches!(h, Held::Owned(_)))
            .map(|(a, _)| a.interface.clone())
            .collect();
        for i in owned {
            warn!(interface = %i, "attachment not pinned: it ends with this process");
        }
        for (_, held) in std::mem::take(&mut self.links) {
            if let Held::Pinned { link, .. } = held {
                drop(link);
            }
        }
        self.left_running = true;
    }

    /// Writes the settings; the synchronisation flag stays as [`Dataplane::set_sync_events`]
    /// left it.
    pub fn set_globals(&mut self, g: &Globals) -> Result<()> {
        let mut g = *g;
        g.flags &= !lb_common::GLOBAL_F_SYNC_EVENTS;
        if self.sync_on {
            g.flags |= lb_common::GLOBAL_F_SYNC_EVENTS;
        }
        self.globals.set(0, g, 0).context("writing GLOBALS")
    }

    // ---- services ----

    /// Writes one match entry of a service (`crate::matching`).
    pub fn put_entry(&mut self, e: &MatchEntry, v: &Service) -> Result<()> {
        match e {
            MatchEntry::ExactV4(k) => self.put_service_v4(k, v),
            MatchEntry::ExactV6(k) => self.put_service_v6(k, v),
            MatchEntry::WideV4(len, d) => self
                .wide_v4
                .insert(&LpmKey::new(*len, *d), v, 0)
                .context("updating WIDE_V4"),
            MatchEntry::WideV6(len, d) => self
                .wide_v6
                .insert(&LpmKey::new(*len, *d), v, 0)
                .context("updating WIDE_V6"),
            MatchEntry::PrefixV4(len, d) => self
                .prefix_v4
                .insert(&LpmKey::new(*len, *d), v, 0)
                .context("updating PREFIX_V4"),
            MatchEntry::PrefixV6(len, d) => self
                .prefix_v6
                .insert(&LpmKey::new(*len, *d), v, 0)
                .context("updating PREFIX_V6"),
        }
    }

    /// Deletes one match entry.
    pub fn remove_entry(&mut self, e: &MatchEntry) -> Result<()> {
        match e {
            MatchEntry::ExactV4(k) => self.remove_service_v4(k),
            MatchEntry::ExactV6(k) => self.remove_service_v6(k),
            MatchEntry::WideV4(len, d) => self
                .wide_v4
                .remove(&LpmKey::new(*len, *d))
                .context("deleting from WIDE_V4"),
            MatchEntry::WideV6(len, d) => self
                .wide_v6
                .remove(&LpmKey::new(*len, *d))
                .context("deleting from WIDE_V6"),
            MatchEntry::PrefixV4(len, d) => self
                .prefix_v4
                .remove(&LpmKey::new(*len, *d))
                .context("deleting from PREFIX_V4"),
            MatchEntry::PrefixV6(len, d) => self
                .prefix_v6
                .remove(&LpmKey::new(*len, *d))
                .context("deleting from PREFIX_V6"),
        }
    }

    /// Live persistence templates: (service id, client network, template).
    pub fn templates(&self) -> Vec<(u32, std::net::IpAddr, Template)> {
        let v4 = self.templates_v4.iter().filter_map(|r| r.ok());
        let v6 = self.templates_v6.iter().filter_map(|r| r.ok());
        v4.map(|(k, t)| (k.service_id, std::net::IpAddr::from(k.net.to_ne_bytes()), t))
            .chain(v6.map(|(k, t)| (k.service_id, v6_of_words(k.net), t)))
            .collect()
    }

    /// Deletes the templates and lblc/lblcr cache entries of a service id about to be
    /// reused (both name their service by id).
    pub fn purge_templates(&mut self, service_id: u32) -> Result<()> {
        purge(&mut self.templates_v4, |k| k.service_id == service_id);
        purge(&mut self.templates_v6, |k| k.service_id == service_id);
        purge(&mut self.locality_v4, |k| k.service_id == service_id);
        purge(&mut self.locality_v6, |k| k.service_id == service_id);
        Ok(())
    }

    /// The lblc/lblcr destination caches: (service id, destination, members' backend
    /// indexes, newest first).
    pub fn locality(&self) -> Vec<(u32, std::net::IpAddr, Vec<u32>)> {
        let members = |l: &Locality| l.members[..(l.len as usize).min(l.members.len())].to_vec();
        let v4 = self.locality_v4.iter().filter_map(|r| r.ok());
        let v6 = self.locality_v6.iter().filter_map(|r| r.ok());
        v4.map(|(k, l)| {
            let addr = std::net::IpAddr::from(k.addr.to_ne_bytes());
            (k.service_id, addr, members(&l))
        })
        .chain(v6.map(|(k, l)| (k.service_id, v6_of_words(k.addr), members(&l))))
        .collect()
    }

    pub fn put_service_v4(&mut self, k: &ServiceKeyV4, v: &Service) -> Result<()> {
        self.services_v4
            .insert(k, v, 0)
            .context("updating SERVICES_V4")
    }
    pub fn put_service_v6(&mut self, k: &ServiceKeyV6, v: &Service) -> Result<()> {
        self.services_v6
            .insert(k, v, 0)
            .context("updating SERVICES_V6")
    }
    pub fn remove_service_v4(&mut self, k: &ServiceKeyV4) -> Result<()> {
        self.services_v4
            .remove(k)
            .context("deleting from SERVICES_V4")
    }
    pub fn remove_service_v6(&mut self, k: &ServiceKeyV6) -> Result<()> {
        self.services_v6
            .remove(k)
            .context("deleting from SERVICES_V6")
    }

    // ---- backends ----

    /// Makes sure no XDP program still runs that started before `since`: XDP programs run
    /// inside RCU read-side sections, so an RCU grace period is enough. The kernel waits for
    /// one in `membarrier(MEMBARRIER_CMD_GLOBAL)` (where that command is refused, a generous
    /// sleep stands in).
    pub fn wait_for_readers(&mut self, since: Instant) {
        if self.readers_done_since > since {
            return;
        }
        let start = Instant::now();
        const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
        // SAFETY: plain syscall without pointers.
        let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
        if r != 0 {
            std::thread::sleep(FALLBACK_GRACE);
        }
        self.readers_done_since = start;
    }

    /// Replaces backend `index` so that no reader ever sees a half-written entry: the new
    /// value goes into the half readers do not use, then `active` flips to it. The half that
    /// was retired by the previous flip is reused only once no reader can still be on it.
    pub fn write_backend(&mut self, index: u32, new: &Backend) -> Result<()> {
        let mut slot = self
            .backends
            .get(&index, 0)
            .with_context(|| format!("reading BACKENDS[{index}]"))?;
        if slot.current() == new && slot.half[0] == slot.half[1] {
            return Ok(());
        }
        if let Some(t) = self.last_flip.get(&index).copied() {
            self.wait_for_readers(t);
        }
        let spare = (1 - (slot.active & 1)) as usize;
        slot.half[spare] = *new;
        self.backends
            .set(index, slot, 0)
            .with_context(|| format!("writing BACKENDS[{index}]"))?;
        slot.active = spare as u32;
        self.backends
            .set(index, slot, 0)
            .with_context(|| format!("writing BACKENDS[{index}]"))?;
        self.last_flip.insert(index, Instant::now());
        Ok(())
    }

    pub fn read_backend(&self, index: u32) -> Result<Backend> {
        Ok(*self.backends.get(&index, 0)?.current())
    }

    // ---- slot tables ----

    pub fn write_slots(&mut self, base: u32, values: &[u32]) -> Result<()> {
        self.slots.write(base, values)
    }

    /// Marks scan groups `[first, first + n)` dirty (a new or changed table: the next pick
    /// rescans them). Their bests stay: a pick already past the dirty flags still finds a
    /// server (one it validates), not "none".
    pub fn dirty_groups(&mut self, first: u32, n: u32) -> Result<()> {
        for g in first..first + n {
            let old = self.groups.get(&g, 0).unwrap_or_default();
            self.groups
                .set(g, GroupState { dirty: 1, ..old }, 0)
                .with_context(|| format!("writing GROUPS[{g}]"))?;
        }
        Ok(())
    }

    pub fn read_slot(&self, index: u32) -> Option<u32> {
        self.slots.read(index)
    }

    /// Writes the prefilter words that differ from `words`.
    pub fn write_filter(&mut self, words: &[u64]) -> Result<()> {
        write_changed(&mut self.filter, words)
    }

    /// Writes the NAT replies' prefilter words that differ from `words`.
    pub fn write_nat_sources(&mut self, words: &[u64]) -> Result<()> {
        write_changed(&mut self.nat_sources, words)
    }

    /// NAT reply entries (reply tuple → VIP and port), for tests and listings.
    pub fn nat_entries_v4(&self) -> Vec<(FlowKeyV4, NatV4)> {
        self.nat_v4.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn nat_entries_v6(&self) -> Vec<(FlowKeyV6, NatV6)> {
        self.nat_v6.iter().filter_map(|r| r.ok()).collect()
    }

    /// Tells the data plane the services changed: per-CPU copies of old service entries stop
    /// being used. Called after every change, before anything the old entries referenced is
    /// reused.
    pub fn bump_config_generation(&mut self) -> Result<()> {
        let g = self.config_gen.read(0).unwrap_or(0);
        self.config_gen.write(0, &[g.wrapping_add(1)])
    }

    // ---- per-service scheduler state ----

    /// New flows the data plane has scheduled for service `id` so far.
    pub fn picks(&self, id: u32) -> Result<u64> {
        Ok(self.sched_state.get(&id, 0)?.picks)
    }

    pub fn reset_sched_state(&mut self, id: u32) -> Result<()> {
        self.sched_state
            .set(id, SchedState::default(), 0)
            .context("writing SCHED_STATE")
    }

    // ---- counters ----

    pub fn reset_service_stats(&mut self, id: u32) -> Result<()> {
        let zero = PerCpuValues::try_from(vec![Counters::default(); self.ncpus])?;
        self.service_stats
            .set(id, zero, 0)
            .context("zeroing SERVICE_STATS")
    }

    pub fn reset_backend_stats(&mut self, index: u32) -> Result<()> {
        let zero = PerCpuValues::try_from(vec![Counters::default(); self.ncpus])?;
        self.backend_stats
            .set(index, zero, 0)
            .context("zeroing BACKEND_STATS")
    }

    pub fn service_stats(&self, id: u32) -> Result<Counters> {
        let mut sum = Counters::default();
        for c in self.service_stats.get(&id, 0)?.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    pub fn backend_stats(&self, index: u32) -> Result<Counters> {
        let mut sum = Counters::default();
        for c in self.backend_stats.get(&index, 0)?.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    /// The `reason` counters summed over CPUs.
    pub fn reasons(&self) -> Result<Vec<u64>> {
        (0..reason::COUNT)
            .map(|r| Ok(self.reasons.get(&r, 0)?.iter().sum()))
            .collect()
    }

    // ---- connection tables ----

    /// Every IPv4 flow entry (a full walk: for listings, not for the packet path).
    pub fn flows_v4(&self) -> Vec<(FlowKeyV4, Flow)> {
        table_entries(&self.flow_buckets_v4, &self.flows_v4)
    }

    pub fn flows_v6(&self) -> Vec<(FlowKeyV6, Flow)> {
        table_entries(&self.flow_buckets_v6, &self.flows_v6)
    }

    pub fn flow_v4(&self, k: &FlowKeyV4) -> Option<Flow> {
        self.table_entry(0, &self.flow_buckets_v4, &self.flows_v4, k)
    }

    pub fn flow_v6(&self, k: &FlowKeyV6) -> Option<Flow> {
        self.table_entry(1, &self.flow_buckets_v6, &self.flows_v6, k)
    }

    /// The entry of `key` in table `index` (0 IPv4, 1 IPv6): the ways whose tag matches in
    /// its bucket (from the table's seed), then in its alternate buckets.
    fn table_entry<K: aya::Pod + PartialEq>(
        &self,
        index: u32,
        buckets: &Array<MapData, FlowBucket>,
        entries: &Array<MapData, FlowEntry<K>>,
        key: &K,
    ) -> Option<Flow>
    where
        FlowEntry<K>: aya::Pod,
    {
        let pool = self.flow_pool.get(&index, 0).ok()?;
        let h = conntable::key_hash(key, pool.seed);
        let bucket = conntable::bucket(h, pool.bucket_mask);
        let tag = conntable::tag(h);
        let [alt, alt2] = conntable::alternates(bucket, tag, pool.bucket_mask);
        [bucket, alt, alt2].into_iter().find_map(|bucket| {
            let ways = buckets.get(&bucket, 0).ok()?.ways;
            ways.iter().enumerate().find_map(|(w, word)| {
                if word & (conntable::way::TAG | conntable::way::CLAIMED) != tag {
                    return None;
                }
                let e = entries
                    .get(&(bucket * conntable::WAYS as u32 + w as u32), 0)
                    .ok()?;
                (e.key == *key).then_some(e.flow)
            })
        })
    }

    /// Kernel memory charged to each map (`memlock` of its fdinfo), with its capacity.
    pub fn memory(&self) -> Vec<(&'static str, u64, u32)> {
        let mut out = Vec::new();
        let mut add = |name: &'static str, fd: i32| {
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            out.push((name, field("memlock:"), field("max_entries:") as u32));
        };
        add(names::FLOWS_V4, raw_fd(&self.flows_v4));
        add(names::FLOWS_V6, raw_fd(&self.flows_v6));
        add(names::FLOW_BUCKETS_V4, raw_fd(&self.flow_buckets_v4));
        add(names::FLOW_BUCKETS_V6, raw_fd(&self.flow_buckets_v6));
        add(names::FLOW_SPILLED_V4, raw_fd(&self.flow_spilled_v4));
        add(names::FLOW_SPILLED_V6, raw_fd(&self.flow_spilled_v6));
        add(names::NAT_V4, raw_fd(&self.nat_v4));
        add(names::NAT_V6, raw_fd(&self.nat_v6));
        add(names::NAT_SOURCES, raw_fd(&self.nat_sources.map));
        add(names::FRAGS_V4, raw_fd(&self.frags_v4));
        add(names::FRAGS_V6, raw_fd(&self.frags_v6));
        add(names::SERVICES_V4, raw_fd(&self.services_v4));
        add(names::SERVICES_V6, raw_fd(&self.services_v6));
        add(names::WIDE_V4, raw_fd(&self.wide_v4));
        add(names::WIDE_V6, raw_fd(&self.wide_v6));
        add(names::PREFIX_V4, raw_fd(&self.prefix_v4));
        add(names::PREFIX_V6, raw_fd(&self.prefix_v6));
        add(names::TEMPLATES_V4, raw_fd(&self.templates_v4));
        add(names::GROUPS, raw_fd(&self.groups));
        add(names::LOCALITY_V4, raw_fd(&self.locality_v4));
        add(names::LOCALITY_V6, raw_fd(&self.locality_v6));
        add(names::TEMPLATES_V6, raw_fd(&self.templates_v6));
        add(names::BACKENDS, raw_fd(&self.backends));
        add(names::SLOTS, raw_fd(&self.slots.map));
        add(names::SERVICE_FILTER, raw_fd(&self.filter.map));
        add(names::SCHED_STATE, raw_fd(&self.sched_state));
        add(names::BACKEND_CONNS, raw_fd(&self.backend_conns.map));
        add(names::RECENT_V4, raw_fd(&self.recent_v4));
        add(names::RECENT_V6, raw_fd(&self.recent_v6));
        add(names::SERVICE_STATS, raw_fd(&self.service_stats));
        add(names::BACKEND_STATS, raw_fd(&self.backend_stats));
        out
    }
}

/// Every entry of a connection table whose way is in use: its buckets' way words name the
/// slots (an entry retired but not yet cleared is listed with its status).
fn table_entries<K: aya::Pod>(
    buckets: &Array<MapData, FlowBucket>,
    entries: &Array<MapData, FlowEntry<K>>,
) -> Vec<(K, Flow)>
where
    FlowEntry<K>: aya::Pod,
{
    let mut out = Vec::new();
    for (bucket, b) in buckets.iter().enumerate() {
        let Ok(b) = b else { continue };
        for (w, word) in b.ways.iter().enumerate() {
            if word & conntable::way::TAG == 0 || word & conntable::way::CLAIMED != 0 {
                continue;
            }
            let slot = (bucket * conntable::WAYS + w) as u32;
            if let Ok(e) = entries.get(&slot, 0) {
                out.push((e.key, e.flow));
            }
        }
    }
    out
}

/// A random seed for a connection table's hash (a table of predictable buckets could be
/// filled bucket by bucket by a client choosing its ports).
fn random_seed() -> Result<u64> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    Ok(u64::from_ne_bytes(bytes))
}

/// A pinned data plane outlives its daemon unless stopped with [`Dataplane::detach_all`]
/// (a clean stop): an error or a panic in the controller must not take the connections with
/// it; the next daemon adopts them. An unpinned one (tests, benchmarks) goes with it.
impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.pin_dir.is_some() {
            self.leave_running();
        } else {
            self.detach_all();
        }
    }
}

/// The fd of a typed map (aya keeps the inner `MapData` behind `IterableMap`).
fn raw_fd<K: aya::Pod, V, M: aya::maps::IterableMap<K, V>>(m: &M) -> i32 {
    m.map().fd().as_fd().as_raw_fd()
}

/// An array map written through a shared mapping (`BPF_F_MMAPABLE`): slot tables can hold
/// 100k+ entries and one syscall each would make changes slow; the prefilter's words must be
/// replaced with single stores.
struct Mmapped<V: aya::Pod> {
    map: Array<MapData, V>,
    ptr: *mut u8,
    len: usize,
    entries: u32,
}

// The mapping is owned by this struct and only written through &mut self.
unsafe impl<V: aya::Pod> Send for Mmapped<V> {}
unsafe impl<V: aya::Pod> Sync for Mmapped<V> {}

impl<V: aya::Pod> Mmapped<V> {
    /// Array map values are laid out `round_up(value_size, 8)` apart.
    const STRIDE: usize = std::mem::size_of::<V>().div_ceil(8) * 8;

    fn map(map: Array<MapData, V>, entries: u32) -> Result<Self> {
        let page = 4096usize;
        let len = (entries as usize * Self::STRIDE).div_ceil(page) * page;
        let fd = raw_fd(&map);
        // SAFETY: mapping a BPF_F_MMAPABLE array of `entries` elements; the length is what the
        // kernel allows for it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of a BPF array failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Mmapped {
            map,
            ptr: ptr as *mut u8,
            len,
            entries,
        })
    }

    fn write(&mut self, base: u32, values: &[V]) -> Result<()> {
        let end = base as usize + values.len();
        if end > self.entries as usize {
            bail!(
                "range {base}..{end} beyond the array ({} entries)",
                self.entries
            );
        }
        for (i, v) in values.iter().enumerate() {
            // SAFETY: in bounds (checked above); an aligned store of the whole value.
            unsafe {
                let p = self.ptr.add((base as usize + i) * Self::STRIDE) as *mut V;
                std::ptr::write_volatile(p, *v);
            }
        }
        // Visible before whatever the caller publishes next (a service that points here).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn ptr_at(&self, index: u32) -> Option<*mut V> {
        (index < self.entries)
            .then(|| unsafe { self.ptr.add(index as usize * Self::STRIDE) as *mut V })
    }

    fn read(&self, index: u32) -> Option<V> {
        if index >= self.entries {
            return None;
        }
        // SAFETY: in bounds.
        Some(unsafe {
            std::ptr::read_volatile(self.ptr.add(index as usize * Self::STRIDE) as *const V)
        })
    }
}

impl<V: aya::Pod> Drop for Mmapped<V> {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

pub fn ifindex(interface: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("no interface named {interface}"))
}

/// Attaches program `name` of `ebpf` to an interface, trying native mode first for `auto`.
pub(crate) fn attach_program(
    ebpf: &mut Ebpf,
    name: &str,
    interface: &str,
    ifindex: u32,
    mode: XdpModeSetting,
) -> Result<(Attachment, XdpLinkId)> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?;
    let tries: &[(XdpMode, &'static str)] = match mode {
        XdpModeSetting::Native => &[(XdpMode::Driver, "native")],
        XdpModeSetting::Generic => &[(XdpMode::Skb, "generic")],
        XdpModeSetting::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    };
    let mut last = None;
    for (m, label) in tries {
        match prog.attach_to_if_index(ifindex, *m) {
            Ok(id) => {
                return Ok((
                    Attachment {
                        interface: interface.to_string(),
                        ifindex,
                        mode: label,
                    },
                    id,
                ));
            }
            Err(e) => last = Some(anyhow!(e).context(format!("{label} XDP on {interface}"))),
        }
    }
    Err(last.expect("at least one mode tried"))
}

/// Attaches the pass-through program to `interface` in native mode through the legacy netlink
/// interface, so the attachment stays after this process exits (until the interface goes
/// away or another program replaces it). Used on the peer of a veth that xlb transmits on
/// (test benches, the demo): veth delivers XDP_TX/XDP_REDIRECT frames only into a peer that
/// runs XDP itself.
pub async fn attach_pass_through(interface: &str) -> Result<()> {
    use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp};
    const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
    let mut ebpf = Ebpf::load(XDP_OBJECT).context("loading the XDP object")?;
    let prog: &mut Xdp = ebpf
        .program_mut(PASS_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {PASS_PROGRAM_NAME} missing"))?
        .try_into()?;
    prog.load()?;
    let fd = prog.fd()?.as_fd().as_raw_fd();
    let index = ifindex(interface)?;
    let (conn, handle, _) = rtnetlink::new_connection().context("netlink")?;
    tokio::spawn(conn);
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::Xdp(vec![
        LinkXdp::Fd(fd),
        LinkXdp::Flags(XDP_FLAGS_DRV_MODE),
    ]));
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .with_context(|| format!("attaching the pass-through XDP program to {interface}"))?;
    Ok(())
}

/// Makes sure `dir` exists on a bpffs; `/sys/fs/bpf` is mounted if it is not yet (as
/// systemd does at boot).
fn ensure_bpffs_dir(dir: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let on_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let default_root = Path::new("/sys/fs/bpf");
    if dir.starts_with(default_root) && !on_bpffs(default_root) {
        ensure_bpffs(default_root)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !on_bpffs(dir) {
        bail!(
            "pin directory {} is not on a bpffs (mount one: mount -t bpf bpf DIR)",
            dir.display()
        );
    }
    Ok(())
}

/// Mounts bpffs at `dir` if nothing is mounted there.
pub fn ensure_bpffs(dir: &std::path::Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(&*dir.to_string_lossy()) && l.contains(" bpf ")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {}", dir.display()))
}

/// BPF map memory is charged to RLIMIT_MEMLOCK on older kernels; lift it so large connection
/// tables load everywhere.
pub(crate) fn raise_memlock_limit() {
    let r = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) };
}

#[cfg(test)]
mod tests {
    use super::XDP_OBJECT;

    fn u16le(b: &[u8], o: usize) -> usize {
        u16::from_le_bytes([b[o], b[o + 1]]) as usize
    }
    fn u32le(b: &[u8], o: usize) -> usize {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
    }
    fn u64le(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn cstr(b: &[u8], o: usize) -> &str {
        let end = b[o..].iter().position(|&c| c == 0).unwrap();
        std::str::from_utf8(&b[o..o + end]).unwrap()
    }

    /// The packet path must not call the compiler's memcpy/memmove/memset/memcmp: they become
    /// BPF subprograms with byte loops (a struct copy cost a third of the program's time once,
    /// and a zeroing `memset` in a scheduler blew the verifier's budget). Reads the
    /// relocations of the `xdp` section and of `.text` (the functions the programs call),
    /// except those inside the builtins themselves.
    #[test]
    fn packet_path_calls_no_mem_builtins() {
        const BUILTINS: [&str; 5] = ["memcpy", "memmove", "memset", "memcmp", "bcmp"];
        let b = XDP_OBJECT;
        assert_eq!(&b[..4], b"\x7fELF");
        let shoff = u64le(b, 0x28) as usize;
        let shentsize = u16le(b, 0x3a);
        let shnum = u16le(b, 0x3c);
        let shstrndx = u16le(b, 0x3e);
        let sh = |i: usize| shoff + i * shentsize;
        let shstr = u64le(b, sh(shstrndx) + 0x18) as usize;
        let name_of = |i: usize| cstr(b, shstr + u32le(b, sh(i)));
        let mut checked = [0; 2];
        for i in 0..shnum {
            // SHT_REL relocating the xdp or .text section
            if u32le(b, sh(i) + 4) != 9 {
                continue;
            }
            let target = u32le(b, sh(i) + 0x2c);
            let which = match name_of(target) {
                "xdp" => 0,
                ".text" => 1,
                _ => continue,
            };
            let (off, size) = (
                u64le(b, sh(i) + 0x18) as usize,
                u64le(b, sh(i) + 0x20) as usize,
            );
            let symtab = u32le(b, sh(i) + 0x28);
            let (symoff, symsize, strtab) = (
                u64le(b, sh(symtab) + 0x18) as usize,
                u64le(b, sh(symtab) + 0x20) as usize,
                u32le(b, sh(symtab) + 0x28),
            );
            let stroff = u64le(b, sh(strtab) + 0x18) as usize;
            // The builtins' own code in the relocated section (they may call each other).
            let own: Vec<(u64, u64)> = (symoff..symoff + symsize)
                .step_by(24)
                .filter(|&s| {
                    u16le(b, s + 6) == target && BUILTINS.contains(&cstr(b, stroff + u32le(b, s)))
                })
                .map(|s| (u64le(b, s + 8), u64le(b, s + 16)))
                .collect();
            for r in (off..off + size).step_by(16) {
                let at = u64le(b, r);
                if own.iter().any(|(v, n)| (*v..v + n).contains(&at)) {
                    continue;
                }
                let sym = (u64le(b, r + 8) >> 32) as usize;
                let name = cstr(b, stroff + u32le(b, symoff + sym * 24));
                assert!(
                    !BUILTINS.contains(&name),
                    "the XDP object calls {name} from {} (relocation at {at:#x})",
                    name_of(target)
                );
                checked[which] += 1;
            }
        }
        assert!(checked[0] > 0, "no relocations of the xdp section found");
        assert!(checked[1] > 0, "no relocations of the .text section found");
    }
}
