//! The one definition of every BPF map key and value used by xlb.
//!
//! The XDP program (`lb-ebpf`) and the controller (`lb-userspace`) both use these types, so the
//! layouts can never disagree. Everything is `#[repr(C)]` with explicit padding (no implicit
//! holes: the kernel hashes and compares keys byte for byte, and userspace must be able to write
//! every byte). Addresses and ports are stored exactly as they appear on the wire (network byte
//! order), so the data plane copies them without swapping.
//!
//! Pure logic that both sides need (checksum arithmetic, the IPVS TCP state machine) lives here
//! too, so the packet path and the tests/reference models run the same code.
#![no_std]

pub mod conntable;
pub mod csum;
pub mod hash;
pub mod reason;
pub mod tcp;

/// Address family tags stored in keys and values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the data plane balances.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps in the XDP object (the `#[map]` statics of `lb-ebpf` carry these names).
pub mod map_names {
    pub const SERVICES_V4: &str = "SERVICES_V4";
    pub const SERVICES_V6: &str = "SERVICES_V6";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SLOTS: &str = "SLOTS";
    pub const SCHED_STATE: &str = "SCHED_STATE";
    pub const FLOWS_V4: &str = "FLOWS_V4";
    pub const FLOWS_V6: &str = "FLOWS_V6";
    pub const FLOW_BUCKETS_V4: &str = "FLOW_BUCKETS_V4";
    pub const FLOW_BUCKETS_V6: &str = "FLOW_BUCKETS_V6";
    pub const FLOW_SPILLED_V4: &str = "FLOW_SPILLED_V4";
    pub const FLOW_SPILLED_V6: &str = "FLOW_SPILLED_V6";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
    pub const GLOBALS: &str = "GLOBALS";
    pub const EVENTS: &str = "EVENTS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const SERVICE_FILTER: &str = "SERVICE_FILTER";
    pub const SERVICE_CACHE: &str = "SERVICE_CACHE";
    pub const CONFIG_GEN: &str = "CONFIG_GEN";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const FLOW_POOL: &str = "FLOW_POOL";
    pub const FLOW_QUOTA: &str = "FLOW_QUOTA";
    pub const RECENT_V4: &str = "RECENT_V4";
    pub const RECENT_V6: &str = "RECENT_V6";
    pub const TEMPLATES_V4: &str = "TEMPLATES_V4";
    pub const TEMPLATES_V6: &str = "TEMPLATES_V6";
    pub const WIDE_V4: &str = "WIDE_V4";
    pub const WIDE_V6: &str = "WIDE_V6";
    pub const PREFIX_V4: &str = "PREFIX_V4";
    pub const PREFIX_V6: &str = "PREFIX_V6";
    pub const NEW_FLOW: &str = "NEW_FLOW";
    pub const LOCALITY_V4: &str = "LOCALITY_V4";
    pub const LOCALITY_V6: &str = "LOCALITY_V6";
    pub const GROUPS: &str = "GROUPS";
    pub const HANDOFF: &str = "HANDOFF";
    pub const NAT_V4: &str = "NAT_V4";
    pub const NAT_V6: &str = "NAT_V6";
    pub const NAT_SOURCES: &str = "NAT_SOURCES";
    pub const FRAGS_V4: &str = "FRAGS_V4";
    pub const FRAGS_V6: &str = "FRAGS_V6";
    pub const SYNC_EVENTS: &str = "SYNC_EVENTS";
}

/// The service prefilter: bit `bit(addr, port, proto)` of a bitmap is set for every virtual
/// service. False positives only cost a lookup; the controller sets a service's bit before the
/// service appears and clears it after it is gone, so there are no false negatives.
pub mod filter {
    /// Bits in the bitmap (a power of two).
    pub const BITS: u32 = 1 << 16;
    /// u64 words in the bitmap.
    pub const WORDS: u32 = BITS / 64;

    /// `addr` is the destination address as stored in keys (IPv4: the address; IPv6: the XOR
    /// of its four words), `port` in network byte order, as on the wire.
    #[inline(always)]
    pub fn bit(addr: u32, port: u16, proto: u8) -> u32 {
        let x = addr ^ ((port as u32) << 8) ^ ((proto as u32) << 24);
        // Multiplicative hashing: the top bits of the product mix every input bit.
        x.wrapping_mul(0x9e37_79b1) >> (32 - BITS.trailing_zeros())
    }
}

/// Persistence (IPVS templates): a client network stays on one real server across
/// connections while its template lives.
pub mod persist {
    use crate::ticks;

    /// A template whose last controlled connection ends after its timeout ran out lives this
    /// much longer (IPVS re-arms such a template for 60 s).
    pub const REARM: u32 = ticks::from_secs(60);

    /// The network-order mask of word `i` (0..4) of an address whose first `prefix` bits
    /// count. IPv4 uses word 0 only.
    #[inline(always)]
    pub fn mask_word(prefix: u32, i: u32) -> u32 {
        let start = i * 32;
        let bits = prefix.saturating_sub(start);
        let host = if bits >= 32 {
            u32::MAX
        } else if bits == 0 {
            0
        } else {
            !(u32::MAX >> bits)
        };
        host.to_be()
    }
}

/// Template key: one template per (service, client network). Keying by service rather than
/// by port makes persistence span every port a multi-port service covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TemplateKeyV4 {
    pub service_id: u32,
    /// Client address & netmask, network byte order.
    pub net: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TemplateKeyV6 {
    pub service_id: u32,
    pub net: [u32; 4],
}

/// A persistence template (IPVS template connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Template {
    /// Index in `BACKENDS` and its generation when the template was made.
    pub backend: u32,
    pub generation: u32,
    /// Last new connection that used the template, in [`ticks`].
    pub last_used: u32,
    /// The service's persistence timeout, in ticks.
    pub timeout: u32,
    /// Connections the template controls (updated atomically); it does not expire while any
    /// is alive.
    pub controlled: u32,
    pub _pad: u32,
}

impl Template {
    #[inline(always)]
    pub fn expired(&self, controlled: u32, now: u32) -> bool {
        controlled == 0 && now.wrapping_sub(self.last_used) > self.timeout
    }
}

/// Scanning by groups: a least-connection service with many servers (more than
/// [`group::MIN_SLOTS`]) has its slot table cut into groups of [`group::SIZE`] slots. Each
/// group keeps its best server (by the service's rule, as a scan of the group alone finds it)
/// and a dirty flag, set whenever a member's connection count changes. A new flow rescans
/// only the dirty groups (clearing the flag first, so a change during the rescan leaves it
/// set) and then compares the groups' bests in order: the same choice as one scan of all
/// servers, at a cost of (2 × groups + SIZE × dirty groups) steps instead of one per server.
pub mod group {
    /// Slots per group (a power of two: 16 keeps 64-server services cheap, 32 would halve the
    /// cost at 4096 servers); group `g` of the `SLOTS` array covers slots
    /// `[g·SIZE, (g+1)·SIZE)` (grouped services' tables start on a group boundary).
    pub const SIZE: u32 = 16;
    pub const SHIFT: u32 = 4;
    /// Services with more slots than this scan by groups (two groups or more).
    pub const MIN_SLOTS: u32 = 32;
    /// A pick rescans at most this many dirty groups one by one; with more, it rescans them
    /// all. A power of two (indexes are masked for the verifier).
    pub const MAX_DIRTY: usize = 8;
}

/// One scan group's state (`GROUPS`, indexed by slot index >> `group::SHIFT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupState {
    /// Non-zero when a member's count changed since `best` was computed.
    pub dirty: u32,
    /// The group's best slot (offset in the service's table) plus one; 0 = none eligible.
    pub best: u32,
    /// Some member has fewer than half as many active connections as its weight (lblc's
    /// `is_overloaded()` asks this of the whole service).
    pub underloaded: u32,
    pub _pad: u32,
}

/// The destination caches of lblc and lblcr (IPVS's `ip_vs_lblc_entry` / `ip_vs_lblcr_entry`):
/// per (service, destination address), the server (lblc) or set of servers (lblcr) that
/// destination's connections go to.
pub mod locality {
    use crate::ticks;

    /// lblcr's set holds at most this many servers (IPVS's is unbounded; a set only grows
    /// when all its members are overloaded). Inserting into a full set drops its oldest
    /// member.
    pub const SET: usize = 8;
    /// `lblc_expiration` / `lblcr_expiration` (24 h, IPVS's default): an entry unused this
    /// long is stale (lblc, lblcr), and an lblcr set unchanged this long sheds its most loaded
    /// member.
    pub const EXPIRATION: u32 = ticks::from_secs(24 * 3600);
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalityKeyV4 {
    pub service_id: u32,
    /// Destination address, network byte order.
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalityKeyV6 {
    pub service_id: u32,
    pub addr: [u32; 4],
}

/// One destination's cache entry. lblc uses one member.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    /// Backend indexes, newest first, and the generations they were recorded with (a server
    /// deleted since no longer counts as a member).
    pub members: [u32; locality::SET],
    pub generations: [u32; locality::SET],
    pub len: u32,
    /// Last use and last change of the set, in [`ticks`].
    pub last_use: u32,
    pub last_mod: u32,
    pub _pad: u32,
}

/// Services wider than one (address, port): port ranges, all ports (port 0), destination
/// prefixes. Exact (address, port) services live in the hash maps; the rest in two LPM tries,
/// whose keys put the part that is an exact match first:
/// - `WIDE_*`: protocol, address, port — one address (or prefix) with a port range or all
///   ports; a range is split into aligned power-of-two blocks;
/// - `PREFIX_*`: protocol, port, address — a destination prefix on given ports.
///
/// A packet that no exact service takes looks in both; the longer destination prefix wins
/// (`Service::match_bits`), and on a tie the exact port of a `PREFIX_*` entry.
pub mod wide {
    /// Key data (after the LPM prefix length) of `WIDE_V4`: proto, address, port, padding.
    pub const V4_LEN: usize = 8;
    /// `WIDE_V6`/`PREFIX_V6`: proto, 16 + 2 bytes, padding.
    pub const V6_LEN: usize = 20;

    /// Filter flag word index: the bitmap's words are followed by this one.
    pub const FLAGS_WORD: u32 = crate::filter::WORDS;
    /// Flags: some `WIDE_*` entry has one whole address (check bit(addr, 0, proto)).
    pub const F_ADDR_WIDE: u64 = 1;
    /// Some `PREFIX_*` entry exists (check bit(0, port, proto)).
    pub const F_PREFIX_PORT: u64 = 2;
    /// Some `WIDE_*` entry covers a prefix with every port for TCP (every TCP packet must
    /// be looked up), resp. UDP.
    pub const F_ANY_TCP: u64 = 4;
    pub const F_ANY_UDP: u64 = 8;
    /// Some real server is a NAT one: packets that are not for a service may be NAT replies
    /// (`NAT_SOURCES`); without it they skip that check.
    pub const F_NAT: u64 = 16;
    /// Some NAT real server answers from any port (port-0 services): its bit in
    /// `NAT_SOURCES` is set with port 0.
    pub const F_NAT_ANY_PORT: u64 = 32;

    /// `WIDE_V4` key data.
    #[inline(always)]
    pub fn v4_addr_port(proto: u8, addr: u32, port: u16) -> [u8; V4_LEN] {
        let a = addr.to_ne_bytes();
        let p = port.to_ne_bytes();
        [proto, a[0], a[1], a[2], a[3], p[0], p[1], 0]
    }

    /// `PREFIX_V4` key data.
    #[inline(always)]
    pub fn v4_port_addr(proto: u8, port: u16, addr: u32) -> [u8; V4_LEN] {
        let a = addr.to_ne_bytes();
        let p = port.to_ne_bytes();
        [proto, p[0], p[1], a[0], a[1], a[2], a[3], 0]
    }

    /// `WIDE_V6` key data.
    #[inline(always)]
    pub fn v6_addr_port(proto: u8, addr: [u32; 4], port: u16) -> [u8; V6_LEN] {
        let mut k = [0u8; V6_LEN];
        k[0] = proto;
        put_addr(&mut k, 1, addr);
        let p = port.to_ne_bytes();
        k[17] = p[0];
        k[18] = p[1];
        k
    }

    /// `PREFIX_V6` key data.
    #[inline(always)]
    pub fn v6_port_addr(proto: u8, port: u16, addr: [u32; 4]) -> [u8; V6_LEN] {
        let mut k = [0u8; V6_LEN];
        k[0] = proto;
        let p = port.to_ne_bytes();
        k[1] = p[0];
        k[2] = p[1];
        put_addr(&mut k, 3, addr);
        k
    }

    #[inline(always)]
    fn put_addr(k: &mut [u8; V6_LEN], at: usize, addr: [u32; 4]) {
        let mut i = 0;
        while i < 4 {
            let w = addr[i].to_ne_bytes();
            k[at + 4 * i] = w[0];
            k[at + 4 * i + 1] = w[1];
            k[at + 4 * i + 2] = w[2];
            k[at + 4 * i + 3] = w[3];
            i += 1;
        }
    }
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "xlb";
/// The new-flow programs (service lookup, persistence, scheduling, recording), reached by
/// tail calls through the `NEW_FLOW` program array: a SYN goes to `xlb_syn_*` (which inserts
/// its flow directly and hands anything unusual on to `xlb_new_*`), any other packet without
/// a live flow entry to `xlb_new_*`. Separate programs per family and per path keep each
/// within the verifier's budget, and established packets never pay for the code. They hand
/// the packet and its real server on to `xlb_xmit`, which sends it.
/// NAT replies go to `xlb_reply` the same way, ICMP errors to `xlb_icmp`, later IP
/// fragments to `xlb_frag`.
pub const NEW_FLOW_PROGRAMS: [(u32, &str); 8] = [
    (NEW_FLOW_V4, "xlb_new_v4"),
    (NEW_FLOW_V6, "xlb_new_v6"),
    (NEW_FLOW_V4 + NEW_FLOW_SYN, "xlb_syn_v4"),
    (NEW_FLOW_V6 + NEW_FLOW_SYN, "xlb_syn_v6"),
    (NEW_FLOW_XMIT, "xlb_xmit"),
    (NEW_FLOW_REPLY, "xlb_reply"),
    (NEW_FLOW_ICMP, "xlb_icmp"),
    (NEW_FLOW_FRAG, "xlb_frag"),
];
/// Index of `xlb_xmit` in `NEW_FLOW`.
pub const NEW_FLOW_XMIT: u32 = 4;
/// Index of `xlb_reply` in `NEW_FLOW`.
pub const NEW_FLOW_REPLY: u32 = 5;
/// Index of `xlb_icmp` in `NEW_FLOW`.
pub const NEW_FLOW_ICMP: u32 = 6;
/// Index of `xlb_frag` in `NEW_FLOW`.
pub const NEW_FLOW_FRAG: u32 = 7;
pub const NEW_FLOW_V4: u32 = 0;
pub const NEW_FLOW_V6: u32 = 1;
/// Added to the family's index: the SYN program.
pub const NEW_FLOW_SYN: u32 = 2;
/// `HANDOFF` value telling the new-flow program the flow has no usable entry (the main
/// program looked it up already); 0 means it did not look.
pub const HANDOFF_NO_ENTRY: u32 = 1;
/// `HANDOFF` value from the SYN program: the table is full and nothing in this CPU's ring
/// could be recycled just now (the new-flow program does not walk it again).
pub const HANDOFF_TABLE_FULL: u32 = 2;
/// The program that retires expired connections (run by the controller with
/// `BPF_PROG_TEST_RUN`; it never sees a packet).
pub const REAPER_NAME: &str = "xlb_reap";
/// The program that installs connections synchronised from another balancer
/// ([`sync`]; run by the controller with `BPF_PROG_TEST_RUN` on a [`SyncBatch`] frame).
pub const SYNC_INSTALL_NAME: &str = "xlb_sync_install";
/// A pass-through XDP program shipped in the same object. On veth, frames sent with `XDP_TX` or
/// `XDP_REDIRECT` are only delivered if the receiving peer runs an XDP program of its own.
pub const PASS_PROGRAM_NAME: &str = "xlb_pass";

/// Capacities compiled into the object; the controller overrides them from the configuration
/// (`EbpfLoader::set_max_entries`) before loading.
pub mod defaults {
    pub const CONN_TABLE_SIZE: u32 = 1 << 20;
    pub const MAX_SERVICES: u32 = 1 << 16;
    pub const MAX_BACKENDS: u32 = 1 << 16;
    pub const SLOT_TABLE_SIZE: u32 = 1 << 20;
    pub const TX_PORTS: u32 = 256;
    /// Persistence templates per family.
    pub const TEMPLATES: u32 = 1 << 16;
    /// lblc/lblcr destination-cache entries per family.
    pub const LOCALITY: u32 = 1 << 16;
    /// Entries of each wide-service trie (port-range blocks, prefixes).
    pub const WIDE_ENTRIES: u32 = 1 << 14;
    pub const EVENTS_BYTES: u32 = 1 << 14;
    /// The connection-synchronisation ring (`SYNC_EVENTS`): 14563 events of 72 bytes.
    pub const SYNC_EVENTS_BYTES: u32 = 1 << 20;
}

/// Schedulers, as stored in [`Service::scheduler`].
pub mod sched {
    /// Round robin: a shared pick counter walks the slot table (one slot per usable server).
    pub const RR: u8 = 1;
    /// Weighted round robin: the slot table holds one full IPVS wrr cycle.
    pub const WRR: u8 = 2;
    /// Source hashing: 256 buckets, by client address (and port with [`F_PORT`]).
    pub const SH: u8 = 3;
    /// Destination hashing: 256 buckets, by destination address.
    pub const DH: u8 = 4;
    /// Maglev hashing: a prime-sized table, by client address (and port with [`F_PORT`]).
    pub const MH: u8 = 5;
    /// The least-connection family: the slot table holds the servers with weight > 0 in IPVS
    /// list order, and a new flow goes to the best one by the scheduler's rule ([`least`]).
    pub const LC: u8 = 6;
    pub const WLC: u8 = 7;
    pub const SED: u8 = 8;
    pub const NQ: u8 = 9;
    pub const FO: u8 = 10;
    pub const OVF: u8 = 11;
    /// Power of two choices: two servers drawn at random by weight, the less loaded wins.
    pub const TWOS: u8 = 12;
    /// Locality-based least connection (with replication): a destination keeps its server
    /// (set of servers) unless overloaded; otherwise wlc picks ([`crate::locality`]).
    pub const LBLC: u8 = 13;
    pub const LBLCR: u8 = 14;

    /// `Service::flags`: when the hashed server cannot take the flow, look further
    /// (ipvsadm `sh-fallback` / `mh-fallback`).
    pub const F_FALLBACK: u8 = 1;
    /// `Service::flags`: hash the client's port too (`sh-port` / `mh-port`).
    pub const F_PORT: u8 = 2;
    /// `Service::flags`: no connection entries (sh, dh, mh only): every packet is hashed.
    pub const F_STATELESS: u8 = 4;

    /// The selection rules of IPVS's least-connection family, for one server at a time in
    /// list order (the data plane's scan; the controller's reference model is written
    /// independently, from the kernel's loops).
    pub mod least {
        use super::{FO, LC, NQ, OVF, SED, WLC};

        /// A server as these schedulers see it.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Load {
            pub weight: u64,
            pub active: u64,
            pub inactive: u64,
        }

        impl Load {
            /// `ip_vs_dest_conn_overhead()` (Linux 6.12): active × 256 + all connections.
            #[inline(always)]
            pub fn overhead(&self) -> u64 {
                (self.active << 8) + self.active + self.inactive
            }
        }

        /// Whether the scheduler may choose this server at all (the caller has checked the
        /// overload flag): weight 0 never; ovf not once its active count exceeds its weight.
        #[inline(always)]
        pub fn eligible(sched: u8, d: &Load) -> bool {
            d.weight > 0 && (sched != OVF || d.active <= d.weight)
        }

        /// nq returns the first idle server (no active connection) at once.
        #[inline(always)]
        pub fn takes_at_once(sched: u8, d: &Load) -> bool {
            sched == NQ && d.active == 0
        }

        /// twos: whether the second draw beats the first (`ip_vs_twos_schedule()`).
        #[inline(always)]
        pub fn second_wins(first: &Load, second: &Load) -> bool {
            second.weight * first.overhead() > first.weight * second.overhead()
        }

        /// Whether `d`, later in list order, replaces `best`: strictly better only, so ties
        /// go to the earlier server. Ratios are compared by cross-multiplication as IPVS does.
        #[inline(always)]
        pub fn replaces(sched: u8, best: &Load, d: &Load) -> bool {
            match sched {
                LC => d.overhead() < best.overhead(),
                WLC => best.overhead() * d.weight > d.overhead() * best.weight,
                SED | NQ => (best.active + 1) * d.weight > (d.active + 1) * best.weight,
                FO | OVF => d.weight > best.weight,
                _ => false,
            }
        }
    }
}

/// Forwarding methods, as stored in [`Backend::forward`].
pub mod forward {
    /// Direct routing (IPVS `-g`): rewrite the MACs, decrement TTL, transmit.
    pub const DR: u8 = 1;
    /// NAT (IPVS `-m`): rewrite the destination address and port; replies come back through
    /// the balancer and get the VIP and service port back (`NAT_V4`/`NAT_V6`).
    pub const NAT: u8 = 2;
    /// Tunnelling (IPVS `-i`): wrap the packet in an outer header to the real server
    /// ([`Backend::tun_type`](crate::Backend)).
    pub const TUNNEL: u8 = 3;
}

/// Tunnel types and flags (IPVS `--tun-type`, `--tun-csum`, `--tun-remcsum`).
pub mod tunnel {
    /// IP in IP: protocol 4 (IPv4 inner) or 41 (IPv6 inner).
    pub const IPIP: u8 = 0;
    /// Generic UDP Encapsulation: UDP + a 4-byte GUE header (variant 0).
    pub const GUE: u8 = 1;
    /// GRE: a 4-byte header (8 with checksum), no key, no sequence number.
    pub const GRE: u8 = 2;
    /// Checksum the outer UDP (GUE) or GRE header and payload.
    pub const F_CSUM: u8 = 1;
    /// GUE remote checksum offload. IPVS adds the option only to packets whose checksum is
    /// left to the hardware, which forwarded packets never are; the others get the full UDP
    /// checksum, as with `F_CSUM`.
    pub const F_REMCSUM: u8 = 2;
    /// Bytes an outer IPv4 / IPv6 header adds.
    pub const V4_OUTER: u32 = 20;
    pub const V6_OUTER: u32 = 40;
    /// UDP + GUE base header.
    pub const GUE_LEN: u32 = 12;
    /// GRE base header, and with the checksum field.
    pub const GRE_LEN: u32 = 4;
    pub const GRE_CSUM_LEN: u32 = 8;
    /// Source ports of GUE packets are spread over this range (Linux's default
    /// `ip_local_port_range`, as `udp_flow_src_port` uses), from the flow's hash.
    pub const GUE_SPORT_MIN: u32 = 32768;
    pub const GUE_SPORT_MAX: u32 = 60999;

    /// Bytes the tunnel adds in front of the inner packet.
    #[inline(always)]
    pub fn overhead(outer_v6: bool, tun_type: u8, flags: u8) -> u32 {
        let ip = if outer_v6 { V6_OUTER } else { V4_OUTER };
        ip + match tun_type {
            GUE => GUE_LEN,
            GRE if flags & F_CSUM != 0 => GRE_CSUM_LEN,
            GRE => GRE_LEN,
            _ => 0,
        }
    }

    /// The GUE source port for a flow hash (`udp_flow_src_port`'s spreading).
    #[inline(always)]
    pub fn gue_sport(hash: u32) -> u16 {
        let h = hash ^ (hash << 16);
        (((h as u64 * (GUE_SPORT_MAX - GUE_SPORT_MIN) as u64) >> 32) as u32 + GUE_SPORT_MIN) as u16
    }
}

/// IP fragments: the first fragment of a datagram carries the ports and is handled like any
/// packet of its flow; the balancer records where it went under the datagram's identity, and
/// the later fragments (no ports) follow it there (`FRAGS_V4`/`FRAGS_V6`, LRU). A later
/// fragment whose first one was not seen (reordered, or not for a service) goes to the
/// kernel untouched.
pub mod frag {
    /// `Pkt::frag`: not a fragment, the first fragment, a later one.
    pub const NONE: u8 = 0;
    pub const FIRST: u8 = 1;
    pub const LATER: u8 = 2;
    /// `Fragment::kind`: the datagram goes to a real server (client → server), or is a NAT
    /// reply going back to a client.
    pub const TO_SERVER: u32 = 0;
    pub const REPLY: u32 = 1;
    /// Datagrams in flight remembered at once.
    pub const TABLE_SIZE: u32 = 1 << 16;
}

/// A datagram's identity: addresses, IP ID (16 bits for IPv4, 32 for IPv6) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKeyV4 {
    pub src: u32,
    pub dst: u32,
    pub id: u32,
    pub proto: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKeyV6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub id: u32,
    pub proto: u32,
}

/// Where a datagram's first fragment went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    /// [`frag::TO_SERVER`] or [`frag::REPLY`].
    pub kind: u32,
    /// The real server (`BACKENDS` index) and its generation.
    pub backend: u32,
    pub generation: u32,
    /// A NAT reply's VIP (network byte order, IPv4 in `vip[0]`).
    pub vip: [u32; 4],
}

/// What a NAT reply needs to become the virtual service's packet again: the VIP and service
/// port it replaces the real server's address and port with. Keyed in `NAT_V4`/`NAT_V6` by
/// the reply's own tuple (source = real server, destination = client), a [`FlowKeyV4`] /
/// [`FlowKeyV6`]; the connection itself stays in the flow table under the client's tuple.
///
/// It also caches what the full reply path last found ([`NatRoute`]): the connection's real
/// server, its state and the route toward the client. While that is fresh, a reply that
/// cannot change the connection's state (an ACK without SYN, FIN or RST of an ESTABLISHED
/// connection, or a UDP datagram) and fits the route's MTU is sent by the main program
/// straight away; any other reply, or one after [`nat::REFRESH`], takes the full path
/// (connection state and timeouts, route lookup), which refreshes the cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatV4 {
    pub vip: u32,
    /// Service port, network byte order.
    pub vport: u16,
    pub _pad: u16,
    pub route: NatRoute,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatV6 {
    pub vip: [u32; 4],
    pub vport: u16,
    pub _pad: u16,
    pub route: NatRoute,
}

/// See [`NatV4`]. Written by the CPU taking a connection's full reply path (the fields are
/// rewritten with the same values unless the route changed; `stamp` is written last).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatRoute {
    /// The connection's real server (`BACKENDS` index) and its generation.
    pub backend: u32,
    pub generation: u32,
    /// Egress interface and MACs toward the client.
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    /// The route's MTU: larger replies take the full path (which answers with ICMP).
    pub mtu: u32,
    /// The connection's state after the last full check: only ESTABLISHED TCP connections
    /// (and UDP) take the fast path, where an ACK changes nothing.
    pub state: u32,
    /// When the full path last checked the connection and the route ([`ticks`]); 0 = never.
    pub stamp: u32,
}

/// NAT reply caching (see [`NatV4`]).
pub mod nat {
    use crate::ticks;
    /// How long a cached check of a connection and its route toward the client is trusted.
    pub const REFRESH: u32 = ticks::from_secs(1);
}

/// Lookup key of an IPv4 virtual service: (VIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyV4 {
    /// VIP, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Lookup key of an IPv6 virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKeyV6 {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

// Constructors from whole 32-bit words. A field-wise struct literal makes LLVM zero the
// padding bytes with a `memset` call - a BPF-to-BPF call and a byte loop on the packet path.

#[inline(always)]
fn ports_word(a: u16, b: u16) -> u32 {
    let [a0, a1] = a.to_ne_bytes();
    let [b0, b1] = b.to_ne_bytes();
    u32::from_ne_bytes([a0, a1, b0, b1])
}

#[inline(always)]
fn byte_word(b0: u8, b1: u8) -> u32 {
    u32::from_ne_bytes([b0, b1, 0, 0])
}

impl ServiceKeyV4 {
    #[inline(always)]
    pub fn new(addr: u32, port: u16, proto: u8) -> Self {
        let [p0, p1] = port.to_ne_bytes();
        let w: [u32; 2] = [addr, u32::from_ne_bytes([p0, p1, proto, 0])];
        // SAFETY: same size, alignment and field offsets; every bit pattern is valid.
        unsafe { core::mem::transmute(w) }
    }
}

impl ServiceKeyV6 {
    #[inline(always)]
    pub fn new(addr: [u32; 4], port: u16, proto: u8) -> Self {
        let [p0, p1] = port.to_ne_bytes();
        let w: [u32; 5] = [
            addr[0],
            addr[1],
            addr[2],
            addr[3],
            u32::from_ne_bytes([p0, p1, proto, 0]),
        ];
        // SAFETY: as above.
        unsafe { core::mem::transmute(w) }
    }
}

impl FlowKeyV4 {
    #[inline(always)]
    pub fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        let w: [u32; 4] = [src, dst, ports_word(sport, dport), byte_word(proto, 0)];
        // SAFETY: as above.
        unsafe { core::mem::transmute(w) }
    }
}

impl FlowKeyV6 {
    #[inline(always)]
    pub fn new(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        let w: [u32; 10] = [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            ports_word(sport, dport),
            byte_word(proto, 0),
        ];
        // SAFETY: as above.
        unsafe { core::mem::transmute(w) }
    }
}

impl Flow {
    #[inline(always)]
    pub fn new(backend: u32, generation: u32, service_id: u32, last_seen: u32, state: u8) -> Self {
        Self::controlled(backend, generation, service_id, last_seen, state, 0)
    }

    /// A flow controlled by a persistence template (`template`: see [`Flow::template`]).
    #[inline(always)]
    pub fn controlled(
        backend: u32,
        generation: u32,
        service_id: u32,
        last_seen: u32,
        state: u8,
        template: u32,
    ) -> Self {
        let w: [u32; 6] = [
            backend,
            generation,
            service_id,
            last_seen,
            state as u32,
            template,
        ];
        // SAFETY: as above.
        unsafe { core::mem::transmute(w) }
    }
}

/// Value of the service maps. A hash-map update replaces the whole value atomically, so a packet
/// sees either the old or the new service (slot table, scheduler) and never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of the service in the per-service arrays (stats, scheduler state).
    pub id: u32,
    /// First entry of this service's slot table in `SLOTS`.
    pub slots_base: u32,
    /// Number of entries in the slot table; 0 means no usable real server.
    pub slots_len: u32,
    /// Added to the shared pick counter before indexing the slot table, so that a new table
    /// continues the scheduler's sequence where IPVS would (see the controller's scheduler code).
    pub sched_offset: u32,
    /// Persistence timeout in [`ticks`]; 0: the service is not persistent.
    pub persist_timeout: u32,
    /// One of [`sched`].
    pub scheduler: u8,
    /// `SERVICE_F_*` flags.
    pub flags: u8,
    /// Persistence granularity: the client address prefix length (IPv4 0..=32, IPv6 0..=128).
    pub persist_prefix: u8,
    /// Destination prefix length this entry matches (32/128 for one address): among wide
    /// matches the longer prefix wins ([`wide`]).
    pub match_bits: u8,
}

/// A CPU's copy of the service it looked up last (`SERVICE_CACHE`, per CPU): new flows to
/// the same virtual service - a SYN burst, a flood - skip the hash lookup. Valid while
/// `generation` equals `CONFIG_GEN`, which the controller bumps after every change of the
/// services.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCache {
    /// The key's words: an IPv4 `ServiceKeyV4` in the first two, or a `ServiceKeyV6`.
    pub key: [u32; 5],
    pub family: u8,
    pub _pad: [u8; 3],
    pub generation: u64,
    pub service: Service,
}

/// Real server as the data plane needs it. One entry per (service, real server), like an IPVS
/// destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address, network byte order (IPv4 in `addr[0]`).
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    pub family: u8,
    /// One of [`forward`].
    pub forward: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
    /// The scan group of the server's slot plus one, 24 bits little-endian; 0 when its
    /// service does not scan by groups (see [`group`]).
    pub group: [u8; 3],
    /// The service this entry belongs to.
    pub service_id: u32,
    /// Bumped whenever the id is given to a different real server; flows remember it, so a flow
    /// never follows a recycled id to the wrong server.
    pub generation: u32,
    /// Egress interface; `XDP_TX` when it is the ingress interface, else `XDP_REDIRECT`.
    pub ifindex: u32,
    /// Next hop MAC (the real server's own MAC for direct routing).
    pub dst_mac: [u8; 6],
    /// MAC of the egress interface.
    pub src_mac: [u8; 6],
    /// Weight (0 = quiesced: no new flows). The hashing schedulers keep quiesced servers in
    /// their tables and check this when they land on one.
    pub weight: u32,
    /// Connection thresholds (ipvsadm `-x` / `-y`); 0 = none. See [`ConnCounts::overloaded`].
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// Tunnelling: one of [`tunnel`]'s types, and its `F_*` flags.
    pub tun_type: u8,
    pub tun_flags: u8,
    /// GUE destination port, network byte order.
    pub tun_port: u16,
    /// MTU of the path to the real server (the egress interface's or the route's): a tunnelled
    /// packet that would exceed it is refused with ICMP as IPVS does. 0 = unknown (no check).
    pub mtu: u32,
    /// Outer source address of tunnelled packets (network byte order, IPv4 in `tun_src[0]`),
    /// of the real server's family.
    pub tun_src: [u32; 4],
}

impl Backend {
    /// The index in `GROUPS` of the server's scan group, if its service has groups.
    #[inline(always)]
    pub fn group_index(&self) -> Option<u32> {
        let g = u32::from_le_bytes([self.group[0], self.group[1], self.group[2], 0]);
        g.checked_sub(1)
    }

    pub fn set_group_index(&mut self, g: Option<u32>) {
        let v = g.map_or(0, |g| g + 1).to_le_bytes();
        self.group = [v[0], v[1], v[2]];
    }

    /// IPVS `__ip_vs_dest_update_overload()`: whether a server with `total` connections is
    /// overloaded, given whether it was (hysteresis between the two thresholds; the lower one
    /// defaults to 3/4 of the upper).
    #[inline(always)]
    pub fn overloaded(&self, total: u64, was: bool) -> bool {
        let u = self.upper_threshold as u64;
        if u == 0 {
            return false;
        }
        if total >= u {
            return true;
        }
        let l = if self.lower_threshold != 0 {
            self.lower_threshold as u64
        } else {
            u - u / 4
        };
        was && total >= l
    }
}

/// The entry can take packets (not deleted).
pub const BACKEND_F_AVAILABLE: u8 = 1;
/// `dst_mac` holds a resolved neighbour.
pub const BACKEND_F_NEIGH_VALID: u8 = 2;

/// An element of the `BACKENDS` array. Array elements are overwritten in place by the kernel
/// (a plain memcpy), so a reader on another CPU could see a half-written [`Backend`]. The
/// controller therefore writes the inactive half first and then flips `active` (only its low
/// byte ever changes, and a byte cannot tear); bytes rewritten with their own value are never
/// observed changing. See `lb-userspace`'s `dataplane::backends`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSlot {
    /// Index (0 or 1) of the half that readers use.
    pub active: u32,
    pub _pad: u32,
    pub half: [Backend; 2],
}

impl BackendSlot {
    #[inline(always)]
    pub fn current(&self) -> &Backend {
        &self.half[(self.active & 1) as usize]
    }
}

/// Connection-table key, IPv4 (client → VIP direction).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Connection-table key, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Connection-table value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Index in `BACKENDS`.
    pub backend: u32,
    /// `Backend::generation` when the flow was scheduled.
    pub generation: u32,
    pub service_id: u32,
    /// Last packet, in [`ticks`] of the kernel's coarse monotonic clock.
    pub last_seen: u32,
    /// IPVS connection state ([`tcp::state`]) in the low byte; [`FLOW_DEAD`] once the entry
    /// was retired. Changed only with compare-and-swap, so the per-server connection counts
    /// follow every change exactly once.
    pub status: u32,
    /// 0, or the connection is controlled by a persistence template: the service's client
    /// prefix length + 1, so the template's key can be rebuilt from the flow's key when the
    /// connection ends (see [`persist`]).
    pub template: u32,
}

/// `Flow::status`: the entry was retired (its connection is no longer counted); it is about
/// to be deleted.
pub const FLOW_DEAD: u32 = 1 << 31;

impl Flow {
    /// The IPVS connection state.
    #[inline(always)]
    pub fn state(&self) -> u8 {
        self.status as u8
    }
}

/// Connection counts of one real server (IPVS ActiveConn / InActConn), global across CPUs and
/// updated atomically. One cache line each, so busy servers do not slow their neighbours.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub active: u64,
    pub inactive: u64,
    /// Non-zero while the server is overloaded (IPVS `IP_VS_DEST_F_OVERLOAD`): its
    /// connections reached its upper threshold and have not yet fallen below the lower one.
    pub overloaded: u64,
    pub _reserved: [u64; 5],
}

impl ConnCounts {
    /// Connections of the server, active or not.
    pub fn total(&self) -> u64 {
        self.active.wrapping_add(self.inactive)
    }
}

/// How many connection-table entries may still be created (`FLOW_POOL`, one per table:
/// index 0 IPv4, 1 IPv6). CPUs take entries in batches into their `FLOW_QUOTA`, so the shared
/// counter is touched once per batch. The table ([`conntable`]) has twice the pool's capacity
/// in slots, so a key's bucket nearly always has a free way while the pool has entries.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowPool {
    /// Entries not yet handed to a CPU (signed: CPUs take a batch first and give back what
    /// was not there).
    pub free: i64,
    /// Entries a CPU takes at once (1..=64, smaller for small tables so that CPUs holding
    /// unused entries do not starve the others).
    pub batch: i64,
    /// Size of each CPU's ring of recently created connections (`RECENT_V4/V6`) minus one;
    /// the size is a power of two.
    pub recent_mask: u64,
    /// The table's buckets minus one (a power of two, see [`conntable`]).
    pub bucket_mask: u64,
    /// The table's hash seed, random, chosen when the table is created.
    pub seed: u64,
    pub _reserved: [u64; 3],
}

/// Per-CPU, per table (index 0 IPv4, 1 IPv6): entries taken from the pool and not used yet,
/// and the cursors of the CPU's ring of recently created connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowQuota {
    pub left: [u64; 2],
    /// Connections recorded in the ring so far (the next slot is `recent_next & mask`).
    pub recent_next: [u64; 2],
    /// The oldest ring position not yet examined for recycling.
    pub recent_evict: [u64; 2],
}

/// Size of each CPU's ring of recently created connections: about its share of the table,
/// a power of two between 1024 and 2^20.
pub fn recent_ring_size(capacity: u32, ncpus: u32) -> u32 {
    (capacity / ncpus.max(1))
        .next_power_of_two()
        .clamp(1024, 1 << 20)
}

/// Live candidates a new connection examines in its CPU's ring when the table is full.
pub const RECYCLE_TRIES: u32 = 8;
/// Ring slots it looks at in all (slots of connections that are gone already are skipped).
pub const RECYCLE_SCAN: u32 = 1024;

/// A full table recycles a UDP connection only once it has been idle this long (ticks, 1 s):
/// a busy UDP flow keeps its server.
pub const RECYCLE_UDP_IDLE: u32 = 60;

/// Whether a connection in state `st`, idle for `idle` ticks, may give its entry to a new
/// connection when the table is full (as conntrack's early drop does): never an established
/// TCP connection; embryonic and closing ones (a SYN flood's included) first in, first out.
#[inline(always)]
pub fn recyclable(st: u8, idle: u32) -> bool {
    match st {
        tcp::state::ESTABLISHED => false,
        tcp::state::UDP => idle >= RECYCLE_UDP_IDLE,
        _ => true,
    }
}

/// The largest batch a CPU takes from the pool.
pub const FLOW_POOL_BATCH: i64 = 64;

/// The batch for a table of `capacity` connections on `ncpus` CPUs: at most 1/16 of the
/// table sits unused in CPUs' hands.
pub fn flow_pool_batch(capacity: u32, ncpus: u32) -> i64 {
    (capacity as i64 / (16 * ncpus.max(1) as i64)).clamp(1, FLOW_POOL_BATCH)
}

/// Entries NAT's reply tables (LRU hashes, one entry per NAT connection) need beyond the
/// connections they hold so that they never evict a live connection's: a CPU refilling its
/// private free list takes 128 entries (`LOCAL_FREE_TARGET` in `kernel/bpf/bpf_lru_list.c`)
/// and evicts when the shared free list has fewer; each CPU's private list holds up to that
/// many. One more list's worth covers the entry an insert takes before it finds its key
/// present.
pub fn lru_table_reserve(ncpus: u32) -> u32 {
    128 * (ncpus + 2)
}

/// Per-service round-robin state, shared by all CPUs (atomic fetch-add). One cache line per
/// service so services do not slow each other down.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedState {
    /// New flows scheduled so far.
    pub picks: u64,
    /// twos: the sum of the eligible servers' weights, as last computed, valid while the
    /// configuration generation (`total_gen` − 1) and the count of overload-flag changes of
    /// the service's servers (`total_flips`) are what they were then.
    pub weight_total: u64,
    pub total_gen: u64,
    pub total_flips: u64,
    /// Overload-flag changes of the service's servers so far (atomic).
    pub overload_flips: u64,
    /// The slot table the total was computed over (`slots_base << 32 | slots_len`): a pick
    /// that still holds the previous service entry never passes its total off as the new
    /// table's.
    pub total_table: u64,
    pub _reserved: [u64; 2],
}

/// Traffic counters, per CPU, per service and per real server (IPVS `--stats` columns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections scheduled.
    pub conns: u64,
    pub in_packets: u64,
    /// Bytes of the IP packets (L3 length), as IPVS counts them.
    pub in_bytes: u64,
    pub out_packets: u64,
    pub out_bytes: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.conns += other.conns;
        self.in_packets += other.in_packets;
        self.in_bytes += other.in_bytes;
        self.out_packets += other.out_packets;
        self.out_bytes += other.out_bytes;
    }
}

/// Flow timestamps count ticks of 2^24 ns (16.8 ms) of the kernel's coarse monotonic clock
/// (`bpf_ktime_get_coarse_ns`, userspace `CLOCK_MONOTONIC_COARSE`): a shift rather than a
/// division on the packet path. A u32 of ticks wraps after 2.3 years; durations are compared
/// with wrapping arithmetic.
pub mod ticks {
    pub const SHIFT: u32 = 24;

    /// Ticks of a nanosecond timestamp.
    #[inline(always)]
    pub fn from_ns(ns: u64) -> u32 {
        (ns >> SHIFT) as u32
    }

    /// A duration in seconds as ticks, rounded up (a timeout never ends early).
    pub const fn from_secs(s: u32) -> u32 {
        ((s as u64 * 1_000_000_000).div_ceil(1 << SHIFT)) as u32
    }
}

/// Global settings read by the data plane (one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Globals {
    /// Idle timeout in [`ticks`] per [`tcp::state`] (index = state; slots past
    /// `tcp::state::COUNT` are unused). A power of two, so the program indexes it with a mask
    /// the verifier follows.
    pub timeouts: [u32; TIMEOUT_SLOTS],
    /// `GLOBAL_F_*` flags.
    pub flags: u32,
}

/// `Globals::flags`: IPVS `expire_nodest_conn=1`.
pub const GLOBAL_F_EXPIRE_NODEST: u32 = 1;
/// `Globals::flags`: this balancer is a synchronisation master: connections and templates
/// worth synchronising are reported in `SYNC_EVENTS` ([`sync`]).
pub const GLOBAL_F_SYNC_EVENTS: u32 = 2;

/// Length of `Globals::timeouts`.
pub const TIMEOUT_SLOTS: usize = 16;

impl Globals {
    /// Settings with the given idle timeouts in seconds.
    pub fn with_timeouts(secs: [u32; tcp::state::COUNT]) -> Self {
        Self::with_ticks(secs.map(ticks::from_secs))
    }

    /// Settings with the given idle timeouts in ticks.
    pub fn with_ticks(t: [u32; tcp::state::COUNT]) -> Self {
        let mut timeouts = [0; TIMEOUT_SLOTS];
        timeouts[..tcp::state::COUNT].copy_from_slice(&t);
        Globals { timeouts, flags: 0 }
    }

    /// The idle timeout of state `st`, in ticks.
    #[inline(always)]
    pub fn timeout(&self, st: u8) -> u32 {
        self.timeouts[st as usize & (TIMEOUT_SLOTS - 1)]
    }
}

impl Default for Globals {
    fn default() -> Self {
        Globals::with_timeouts(tcp::DEFAULT_TIMEOUTS)
    }
}

/// The real servers' decapsulator (`xlb decap`, program `xlb_decap` in its own object): it
/// strips xlb's tunnel headers (IPIP, IPv6 in IPv6 and mixed, GUE, GRE) from packets for
/// its virtual IPs and hands the inner packet to the local stack.
pub mod decap {
    pub const PROGRAM_NAME: &str = "xlb_decap";
    /// Map names.
    pub const VIPS: &str = "DECAP_VIPS";
    pub const GUE_PORTS: &str = "DECAP_GUE_PORTS";
    pub const STATS: &str = "DECAP_STATS";
    /// `DECAP_STATS` indexes.
    pub const DECAPSULATED: u32 = 0;
    /// Not a tunnel packet (or a GUE port not configured): untouched.
    pub const NOT_TUNNEL: u32 = 1;
    /// A tunnel packet for an address that is not one of the VIPs: untouched.
    pub const NOT_VIP: u32 = 2;
    /// A tunnel packet whose headers are inconsistent or cut short: untouched.
    pub const MALFORMED: u32 = 3;
    pub const COUNT: u32 = 4;
    pub const NAMES: [&str; COUNT as usize] =
        ["decapsulated", "not_tunnel", "not_vip", "malformed"];

    /// A VIP: the family (`FAMILY_V4`/`FAMILY_V6`) and the address in network byte order
    /// (IPv4 in `addr[0]`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct VipKey {
        pub family: u32,
        pub addr: [u32; 4],
    }
}

/// Messages from the data plane to the controller (`EVENTS` ring buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub kind: u32,
    /// The backend index (`EVENT_NEIGH_MISSING`).
    pub backend: u32,
    /// The address to resolve (`EVENT_ROUTE_MISSING`): `FAMILY_V4` or `FAMILY_V6`, and the
    /// address in network byte order (IPv4 in `addr[0]`).
    pub family: u32,
    pub addr: [u32; 4],
}

/// A packet needed a real server whose next-hop MAC is unknown: resolve it.
pub const EVENT_NEIGH_MISSING: u32 = 1;
/// A NAT reply's route toward the client had no resolved next hop (`bpf_fib_lookup` said
/// "no neighbour"): make the kernel resolve `addr`.
pub const EVENT_ROUTE_MISSING: u32 = 2;

/// Connection synchronisation (the IPVS sync daemon's job): a master balancer reports its
/// connections and templates as they are made and change state ([`SyncConn`] in the
/// `SYNC_EVENTS` ring, when [`GLOBAL_F_SYNC_EVENTS`] is set); its controller sends them to the
/// backups, whose controllers resolve them to their own services and real servers and install
/// them with the `xlb_sync_install` program ([`SyncBatch`] frames).
pub mod sync {
    use crate::tcp::state;

    /// `SyncConn::kind`: a connection, or a persistence template.
    pub const CONN: u8 = 1;
    pub const TEMPLATE: u8 = 2;

    /// Records in one [`SyncBatch`](crate::SyncBatch) (one run of the install program).
    pub const BATCH: usize = 32;

    /// `SyncConn::result`, written by the install program for each record.
    /// Not looked at (beyond the batch's count).
    pub const R_NONE: u32 = 0;
    /// A connection that was not in the table was installed (and counted).
    pub const R_INSTALLED: u32 = 1;
    /// The connection was there with the same real server: state and idle time refreshed.
    pub const R_REFRESHED: u32 = 2;
    /// The connection was there with another real server: retired, installed anew.
    pub const R_REPLACED: u32 = 3;
    /// A template was installed or refreshed.
    pub const R_TEMPLATE: u32 = 4;
    /// Refused: the connection table is full.
    pub const R_TABLE_FULL: u32 = 5;
    /// Refused: the real server (backend index and generation) is not usable here.
    pub const R_NO_SERVER: u32 = 6;
    /// Refused: a NAT connection whose reply tuple a live connection of another service
    /// holds.
    pub const R_NAT_TUPLE_TAKEN: u32 = 7;
    /// Not done: another CPU was changing or retiring the entry at that moment (the next
    /// refresh brings it again).
    pub const R_BUSY: u32 = 8;
    /// Refused: the record is malformed (family, protocol, state, kind).
    pub const R_INVALID: u32 = 9;
    /// Not done: the connection is here on another real server and the master's is not
    /// active (IPVS keeps the local one then).
    pub const R_KEPT: u32 = 10;

    /// Whether a connection in `st` is worth synchronising (IPVS `ip_vs_sync_conn_needed()`:
    /// TCP once established and while closing, not embryonic connections (a SYN flood would
    /// flood the backups too); UDP always).
    #[inline(always)]
    pub fn worthy(st: u8) -> bool {
        const STATES: u32 = 1 << state::ESTABLISHED
            | 1 << state::FIN_WAIT
            | 1 << state::CLOSE
            | 1 << state::CLOSE_WAIT
            | 1 << state::TIME_WAIT
            | 1 << state::UDP;
        (st as u32) < 32 && STATES & (1 << st as u32) != 0
    }
}

/// A connection or template of the master (`SYNC_EVENTS`), or one to install on a backup
/// (a [`SyncBatch`] record, resolved to this balancer's backend index, generation and
/// service id). Addresses and ports as on the wire (IPv4 in word 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncConn {
    /// [`sync::CONN`] or [`sync::TEMPLATE`].
    pub kind: u8,
    /// `FAMILY_V4` / `FAMILY_V6`.
    pub family: u8,
    pub proto: u8,
    /// A connection's [`tcp::state`] (0 for a template).
    pub state: u8,
    /// Client address (a template: the client network).
    pub src: [u32; 4],
    /// Virtual address (a template: the VIP of the connection that made it).
    pub dst: [u32; 4],
    /// Client port (0 for a template) and virtual port.
    pub sport: u16,
    pub dport: u16,
    /// The real server (`BACKENDS` index and generation) and the service id.
    pub backend: u32,
    pub generation: u32,
    pub service_id: u32,
    /// A connection: `Flow::template` (0, or controlled by a template: its service's client
    /// prefix length + 1). A template: its client prefix length + 1.
    pub template: u32,
    /// A template's timeout, in [`ticks`]. A connection's is its state's (the balancer's
    /// timeouts), so this is 0 in its events; to install one controlled by a template
    /// (`template` ≠ 0), its service's persistence timeout (for a template made for it).
    pub timeout: u32,
    /// Install: the program's answer (`sync::R_*`).
    pub result: u32,
}

/// The frame the install program runs on: a count and up to [`sync::BATCH`] records (the
/// frame always has the full size; records past `count` are ignored). The program writes
/// each record's `result` back into the frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncBatch {
    pub count: u32,
    pub _pad: [u32; 3],
    pub records: [SyncConn; sync::BATCH],
}

impl Default for SyncBatch {
    fn default() -> Self {
        SyncBatch {
            count: 0,
            _pad: [0; 3],
            records: [SyncConn::default(); sync::BATCH],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, contain only integers and have no implicit
    // padding (checked by the layout tests below).
    unsafe impl aya::Pod for ServiceKeyV4 {}
    unsafe impl aya::Pod for ServiceKeyV6 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for FlowKeyV4 {}
    unsafe impl aya::Pod for FlowKeyV6 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for crate::conntable::FlowBucket {}
    unsafe impl aya::Pod for crate::conntable::FlowEntry<FlowKeyV4> {}
    unsafe impl aya::Pod for crate::conntable::FlowEntry<FlowKeyV6> {}
    unsafe impl aya::Pod for TemplateKeyV4 {}
    unsafe impl aya::Pod for TemplateKeyV6 {}
    unsafe impl aya::Pod for Template {}
    unsafe impl aya::Pod for LocalityKeyV4 {}
    unsafe impl aya::Pod for LocalityKeyV6 {}
    unsafe impl aya::Pod for Locality {}
    unsafe impl aya::Pod for GroupState {}
    unsafe impl aya::Pod for SchedState {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Globals {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for ServiceCache {}
    unsafe impl aya::Pod for ConnCounts {}
    unsafe impl aya::Pod for FlowPool {}
    unsafe impl aya::Pod for FlowQuota {}
    unsafe impl aya::Pod for NatV4 {}
    unsafe impl aya::Pod for NatV6 {}
    unsafe impl aya::Pod for decap::VipKey {}
    unsafe impl aya::Pod for FragKeyV4 {}
    unsafe impl aya::Pod for FragKeyV6 {}
    unsafe impl aya::Pod for Fragment {}
    unsafe impl aya::Pod for SyncConn {}
    unsafe impl aya::Pod for SyncBatch {}
}

#[cfg(test)]
mod layout_tests {
    extern crate std;
    use super::*;
    use core::mem::{align_of, size_of};

    /// Sizes are part of the map ABI (pinned maps are reused across versions later on); a
    /// change here must be deliberate. The sums prove there is no implicit padding.
    #[test]
    fn gue_source_ports_stay_in_range_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for h in (0u32..1000).map(|i| i.wrapping_mul(0x9e37_79b9)) {
            let p = tunnel::gue_sport(h) as u32;
            assert!((tunnel::GUE_SPORT_MIN..tunnel::GUE_SPORT_MAX).contains(&p));
            seen.insert(p);
        }
        assert!(seen.len() > 900, "{} distinct ports", seen.len());
        assert_eq!(tunnel::overhead(false, tunnel::IPIP, 0), 20);
        assert_eq!(tunnel::overhead(true, tunnel::GUE, 0), 52);
        assert_eq!(tunnel::overhead(false, tunnel::GRE, tunnel::F_CSUM), 28);
    }

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKeyV4>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ServiceKeyV6>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<Service>(), 5 * 4 + 4);
        assert_eq!(size_of::<TemplateKeyV4>(), 8);
        assert_eq!(size_of::<TemplateKeyV6>(), 20);
        assert_eq!(size_of::<Template>(), 24);
        assert_eq!(size_of::<LocalityKeyV4>(), 8);
        assert_eq!(size_of::<LocalityKeyV6>(), 20);
        assert_eq!(size_of::<Locality>(), 2 * 4 * locality::SET + 4 * 4);
        assert_eq!(
            size_of::<Backend>(),
            16 + 2 + 1 + 1 + 1 + 3 + 4 * 3 + 6 + 6 + 4 * 3 + 1 + 1 + 2 + 4 + 16
        );
        assert_eq!(size_of::<NatRoute>(), 4 * 3 + 6 + 6 + 4 * 3);
        assert_eq!(size_of::<NatV4>(), 8 + size_of::<NatRoute>());
        assert_eq!(size_of::<FragKeyV4>(), 16);
        assert_eq!(size_of::<FragKeyV6>(), 40);
        assert_eq!(size_of::<Fragment>(), 28);
        assert_eq!(size_of::<NatV6>(), 20 + size_of::<NatRoute>());
        assert_eq!(size_of::<BackendSlot>(), 8 + 2 * size_of::<Backend>());
        assert_eq!(size_of::<FlowKeyV4>(), 4 + 4 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<FlowKeyV6>(), 16 + 16 + 2 + 2 + 1 + 3);
        assert_eq!(size_of::<Flow>(), 6 * 4);
        assert_eq!(size_of::<ConnCounts>(), 64);
        assert_eq!(size_of::<FlowPool>(), 64);
        assert_eq!(size_of::<FlowQuota>(), 48);
        assert_eq!(size_of::<SchedState>(), 64);
        assert_eq!(align_of::<SchedState>(), 64);
        assert_eq!(size_of::<Counters>(), 5 * 8);
        assert_eq!(size_of::<Globals>(), 4 * TIMEOUT_SLOTS + 4);
        assert_eq!(size_of::<Event>(), 28);
        assert_eq!(size_of::<SyncConn>(), 4 + 16 + 16 + 4 + 6 * 4);
        assert_eq!(
            size_of::<SyncBatch>(),
            16 + sync::BATCH * size_of::<SyncConn>()
        );
        assert_eq!(
            size_of::<ServiceCache>(),
            20 + 1 + 3 + 8 + size_of::<Service>()
        );
    }

    /// The word-wise constructors equal field-wise literals.
    #[test]
    fn constructors_match_fields() {
        assert_eq!(
            FlowKeyV4::new(1, 2, 0x1234, 0x5678, 6),
            FlowKeyV4 {
                src: 1,
                dst: 2,
                sport: 0x1234,
                dport: 0x5678,
                proto: 6,
                _pad: [0; 3]
            }
        );
        assert_eq!(
            FlowKeyV6::new([1, 2, 3, 4], [5, 6, 7, 8], 9, 10, 17),
            FlowKeyV6 {
                src: [1, 2, 3, 4],
                dst: [5, 6, 7, 8],
                sport: 9,
                dport: 10,
                proto: 17,
                _pad: [0; 3]
            }
        );
        assert_eq!(
            ServiceKeyV4::new(0x0a00000a, 0x5000, 6),
            ServiceKeyV4 {
                addr: 0x0a00000a,
                port: 0x5000,
                proto: 6,
                _pad: 0
            }
        );
        assert_eq!(
            ServiceKeyV6::new([1, 2, 3, 4], 443, 17),
            ServiceKeyV6 {
                addr: [1, 2, 3, 4],
                port: 443,
                proto: 17,
                _pad: 0
            }
        );
        assert_eq!(
            Flow::new(7, 8, 9, 10, 3),
            Flow {
                backend: 7,
                generation: 8,
                service_id: 9,
                last_seen: 10,
                status: 3,
                template: 0
            }
        );
    }
}
