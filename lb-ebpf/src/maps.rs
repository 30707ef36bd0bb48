//! Every map of the program. Key/value types and names come from `lb-common`; the sizes here
//! are placeholders that the controller overrides from the configuration before loading.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    BackendSlot, ConnCounts, Counters, FlowKeyV4, FlowKeyV6, FlowPool, FlowQuota, FragKeyV4,
    FragKeyV6, Fragment, Globals, GroupState, Locality, LocalityKeyV4, LocalityKeyV6, NatV4, NatV6,
    SchedState, Service, ServiceCache, ServiceKeyV4, ServiceKeyV6, SyncBatch, Template,
    TemplateKeyV4, TemplateKeyV6,
    conntable::{FlowBucket, FlowEntry},
    defaults, filter, reason, wide,
};

/// `BPF_F_MMAPABLE`: the controller writes slot tables through a shared mapping instead of one
/// syscall per slot.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// `BPF_F_NO_PREALLOC`: a replaced element is freed after an RCU grace period instead of
/// being recycled at once, so a packet holding the old value never sees it overwritten.
const BPF_F_NO_PREALLOC: u32 = 1;

/// Virtual services by (VIP, port, protocol). The controller replaces a service with one
/// update; readers see the old or the new value.
#[map]
pub static SERVICES_V4: HashMap<ServiceKeyV4, Service> =
    HashMap::with_max_entries(defaults::MAX_SERVICES, BPF_F_NO_PREALLOC);
#[map]
pub static SERVICES_V6: HashMap<ServiceKeyV6, Service> =
    HashMap::with_max_entries(defaults::MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Services wider than one (address, port) (`lb_common::wide`).
#[map]
pub static WIDE_V4: LpmTrie<[u8; wide::V4_LEN], Service> =
    LpmTrie::with_max_entries(defaults::WIDE_ENTRIES, 0);
#[map]
pub static WIDE_V6: LpmTrie<[u8; wide::V6_LEN], Service> =
    LpmTrie::with_max_entries(defaults::WIDE_ENTRIES, 0);
#[map]
pub static PREFIX_V4: LpmTrie<[u8; wide::V4_LEN], Service> =
    LpmTrie::with_max_entries(defaults::WIDE_ENTRIES, 0);
#[map]
pub static PREFIX_V6: LpmTrie<[u8; wide::V6_LEN], Service> =
    LpmTrie::with_max_entries(defaults::WIDE_ENTRIES, 0);

/// Prefilter bitmap (`lb_common::filter`), then one word of `wide::F_*` flags.
#[map]
pub static SERVICE_FILTER: Array<u64> = Array::with_max_entries(filter::WORDS + 1, BPF_F_MMAPABLE);

/// Persistence templates (`lb_common::persist`). An evicted template only ends a client's
/// persistence early; nothing is counted from them.
#[map]
pub static TEMPLATES_V4: LruHashMap<TemplateKeyV4, Template> =
    LruHashMap::with_max_entries(defaults::TEMPLATES, 0);
#[map]
pub static TEMPLATES_V6: LruHashMap<TemplateKeyV6, Template> =
    LruHashMap::with_max_entries(defaults::TEMPLATES, 0);

/// lblc/lblcr destination caches (`lb_common::locality`). An evicted entry only makes its
/// destination start afresh, as IPVS's expiry does.
#[map]
pub static LOCALITY_V4: LruHashMap<LocalityKeyV4, Locality> =
    LruHashMap::with_max_entries(defaults::LOCALITY, 0);
#[map]
pub static LOCALITY_V6: LruHashMap<LocalityKeyV6, Locality> =
    LruHashMap::with_max_entries(defaults::LOCALITY, 0);

/// Replies of NAT connections by their own tuple (real server → client), see `nat`. Sized
/// like the connection tables, whose entries they follow.
#[map]
pub static NAT_V4: LruHashMap<FlowKeyV4, NatV4> =
    LruHashMap::with_max_entries(defaults::CONN_TABLE_SIZE, 0);
#[map]
pub static NAT_V6: LruHashMap<FlowKeyV6, NatV6> =
    LruHashMap::with_max_entries(defaults::CONN_TABLE_SIZE, 0);

/// Each CPU's NAT reply entry under construction (`nat::record`), off the stack.
#[map]
pub static NAT_SCRATCH_V4: PerCpuArray<NatV4> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static NAT_SCRATCH_V6: PerCpuArray<NatV6> = PerCpuArray::with_max_entries(1, 0);

/// Datagrams whose first fragment was forwarded (`frag`).
#[map]
pub static FRAGS_V4: LruHashMap<FragKeyV4, Fragment> =
    LruHashMap::with_max_entries(lb_common::frag::TABLE_SIZE, 0);
#[map]
pub static FRAGS_V6: LruHashMap<FragKeyV6, Fragment> =
    LruHashMap::with_max_entries(lb_common::frag::TABLE_SIZE, 0);

/// Prefilter of NAT replies: one bit per hash of (real server address, port, protocol) of
/// every NAT real server (`lb_common::filter::bit`; port 0 for servers that answer from any
/// port). Looked at only when `SERVICE_FILTER`'s flag word has `wide::F_NAT`.
#[map]
pub static NAT_SOURCES: Array<u64> = Array::with_max_entries(filter::WORDS, BPF_F_MMAPABLE);

/// Per-CPU copy of the last service looked up (`lb_common::ServiceCache`).
#[map]
pub static SERVICE_CACHE: PerCpuArray<ServiceCache> = PerCpuArray::with_max_entries(1, 0);

/// Generation of the service configuration, bumped by the controller after every change
/// (one u64, written with a single store through a shared mapping).
#[map]
pub static CONFIG_GEN: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Real servers by backend index (double-buffered entries, see `BackendSlot`).
#[map]
pub static BACKENDS: Array<BackendSlot> = Array::with_max_entries(defaults::MAX_BACKENDS, 0);

/// Slot tables of all services (backend indexes); a service owns `[slots_base, +slots_len)`.
#[map]
pub static SLOTS: Array<u32> = Array::with_max_entries(defaults::SLOT_TABLE_SIZE, BPF_F_MMAPABLE);

/// Scan groups of the least-connection services with many servers (`lb_common::group`),
/// indexed by slot index >> `group::SHIFT`.
#[map]
pub static GROUPS: Array<GroupState> =
    Array::with_max_entries(defaults::SLOT_TABLE_SIZE >> lb_common::group::SHIFT, 0);

/// What a new-flow program tells `xlb_xmit` about the packet it hands on.
#[map]
pub static XMIT_HANDOFF: PerCpuArray<crate::XmitHandoff> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's route lookup of a NAT reply (`nat`), off the stack.
#[map]
pub static FIB_SCRATCH: PerCpuArray<crate::nat::FibParams> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's state of a recycling walk (`admit::recycle`), off the stack.
#[map]
pub static RECYCLE_WALK: PerCpuArray<crate::admit::Walk> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's scratch words of `conntable`'s scans (values the verifier must not follow
/// one by one: the best candidate of a scan for a way to recycle, a chosen way).
#[map]
pub static WAY_SCRATCH: PerCpuArray<[u32; 4]> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's arguments for the schedulers (`sched::xlb_pick`), off the stack.
#[map]
pub static PICK_ARGS: PerCpuArray<crate::sched::PickArgs> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's state of a scan and of twos' draws (`least`), off the stack.
#[map]
pub static SCAN_SCRATCH: PerCpuArray<crate::least::Scan> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static DRAW_SCRATCH: PerCpuArray<crate::least::Draw> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's walk over an lblcr set (`locality`), off the stack.
#[map]
pub static SET_WALK: PerCpuArray<crate::locality::SetWalk> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's state of a grouped scan (`least::grouped`), off the stack.
#[map]
pub static GROUP_SCAN: PerCpuArray<crate::least::Groups> = PerCpuArray::with_max_entries(1, 0);

/// Per-service scheduler state, indexed by service id.
#[map]
pub static SCHED_STATE: Array<SchedState> = Array::with_max_entries(defaults::MAX_SERVICES, 0);

/// Connection tables: client 5-tuple → real server, set-associative (`conntable`): the
/// buckets' way words, and the entries. Entries come from the pool (`acct`) and only xlb
/// retires them (`admit` when the table is full).
#[map]
pub static FLOW_BUCKETS_V4: Array<FlowBucket> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE / 8, 0);
#[map]
pub static FLOWS_V4: Array<FlowEntry<FlowKeyV4>> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE * 2, 0);
#[map]
pub static FLOW_BUCKETS_V6: Array<FlowBucket> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE / 8, 0);
#[map]
pub static FLOWS_V6: Array<FlowEntry<FlowKeyV6>> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE * 2, 0);
/// One bit per bucket: it sent a key to its alternate bucket (`conntable::spill`).
#[map]
pub static FLOW_SPILLED_V4: Array<u64> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE / 512, 0);
#[map]
pub static FLOW_SPILLED_V6: Array<u64> =
    Array::with_max_entries(defaults::CONN_TABLE_SIZE / 512, 0);

/// Connection counts (ActiveConn / InActConn) by backend index, global, updated atomically.
/// Mapped by the controller, which reads the counts and re-evaluates the overload flag when
/// thresholds change.
#[map]
pub static BACKEND_CONNS: Array<ConnCounts> =
    Array::with_max_entries(defaults::MAX_BACKENDS, BPF_F_MMAPABLE);

/// Connection-table entries left to hand out (index 0 IPv4, 1 IPv6), and each CPU's share.
#[map]
pub static FLOW_POOL: Array<FlowPool> = Array::with_max_entries(2, 0);
#[map]
pub static FLOW_QUOTA: PerCpuArray<FlowQuota> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's ring of the connections it created, oldest first: where a new connection looks
/// for an entry to take over when the table is full.
#[map]
pub static RECENT_V4: PerCpuArray<FlowKeyV4> = PerCpuArray::with_max_entries(1024, 0);
#[map]
pub static RECENT_V6: PerCpuArray<FlowKeyV6> = PerCpuArray::with_max_entries(1024, 0);

/// Per-CPU traffic counters by service id and by backend index.
#[map]
pub static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(defaults::MAX_SERVICES, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(defaults::MAX_BACKENDS, 0);

/// Per-CPU verdict and event counters (`lb_common::reason`).
#[map]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Settings (timeouts); one element.
#[map]
pub static GLOBALS: Array<Globals> = Array::with_max_entries(1, 0);

/// Requests to the controller (e.g. resolve a real server's MAC).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(defaults::EVENTS_BYTES, 0);

/// Connections and templates for the backups (`sync`), when this balancer is a
/// synchronisation master. A ring of its own, so a burst of them never crowds out the
/// neighbour requests of `EVENTS`.
#[map]
pub static SYNC_EVENTS: RingBuf = RingBuf::with_byte_size(defaults::SYNC_EVENTS_BYTES, 0);

/// Each CPU's copy of the batch `xlb_sync_install` works on (`sync::install`), off the stack.
#[map]
pub static SYNC_BATCH: PerCpuArray<SyncBatch> = PerCpuArray::with_max_entries(1, 0);

/// Egress interfaces for `XDP_REDIRECT`, keyed by ifindex.
#[map]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(defaults::TX_PORTS, 0);

/// The new-flow programs, by family (`lb_common::NEW_FLOW_V4` / `NEW_FLOW_V6`).
#[map]
pub static NEW_FLOW: ProgramArray =
    ProgramArray::with_max_entries(lb_common::NEW_FLOW_PROGRAMS.len() as u32, 0);

/// What the main program tells the new-flow program it tail-calls (`lb_common::HANDOFF_*`).
/// Per CPU: a tail call runs on the CPU that made it, before any other packet.
#[map]
pub static HANDOFF: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
