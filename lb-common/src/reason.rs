//! Indexes of the per-CPU `REASONS` counter array.
//!
//! Every packet the program sees increments exactly one *verdict* counter (indexes below
//! [`VERDICTS`]), so their sum is the number of packets processed. The indexes from
//! [`VERDICTS`] up count events that happen on the way (a flow could not be recorded, ...).

// --- XDP_PASS: the packet goes to the kernel untouched ---
/// Not IPv4/IPv6 (ARP, LLDP, ...).
pub const PASS_NOT_IP: u32 = 0;
/// IP, but neither TCP nor UDP (ICMP, VRRP, ...).
pub const PASS_NOT_TCP_UDP: u32 = 1;
/// A later IP fragment (no ports) of a datagram whose first fragment the balancer did not
/// handle: not for a service, or it came first (`lb_common::frag`).
pub const PASS_FRAGMENT: u32 = 2;
/// Header fields that contradict each other or the frame (IHL < 5, total length too small...).
pub const PASS_MALFORMED: u32 = 3;
/// The frame ends inside a header.
pub const PASS_TRUNCATED: u32 = 4;
/// An IPv6 extension-header chain the program does not follow.
pub const PASS_IPV6_EXT: u32 = 5;
/// No virtual service for (destination, port, protocol).
pub const PASS_NO_SERVICE: u32 = 6;
/// A TCP segment without SYN for a flow the balancer does not know (IPVS hands these to the
/// local stack too, unless sloppy_tcp is set).
pub const PASS_TCP_NO_FLOW: u32 = 7;
/// The service has no usable real server.
pub const PASS_NO_BACKEND: u32 = 8;
/// TTL / hop limit would expire: the kernel answers with ICMP time exceeded.
pub const PASS_TTL_EXPIRED: u32 = 9;
/// A packet from a NAT real server's address and port that belongs to no connection: it
/// goes to the kernel untouched (as IPVS leaves it).
pub const PASS_NAT_NO_FLOW: u32 = 10;
/// An ICMP error (destination unreachable, too big, time exceeded...) to a VIP that quotes
/// no connection of a virtual service: the kernel's.
pub const PASS_ICMP_UNRELATED: u32 = 11;
// --- XDP_DROP ---
/// A NAT reply whose route toward the client has no usable next hop: none resolved yet (the
/// controller was asked to resolve it; the real server retransmits), or no route at all. The
/// kernel cannot forward it instead: rewritten, its source (the VIP) is one of the balancer's
/// own addresses, which the kernel refuses as a martian; not rewritten, it would leak the
/// real server's address to the client.
pub const DROP_NAT_NO_ROUTE: u32 = 12;
/// The real server's next-hop MAC is not resolved yet; the controller was asked to resolve it
/// and the client's retransmission will get through.
pub const DROP_NEIGH_MISSING: u32 = 13;
/// The flow's real server was removed (IPVS drops these packets too, expire_nodest_conn=0).
pub const DROP_BACKEND_GONE: u32 = 14;
/// An internal lookup failed (a slot or backend index out of range, or a new-flow program
/// missing from the program array): a controller bug.
pub const DROP_INTERNAL: u32 = 15;
/// The forwarding method is not implemented for this packet.
pub const DROP_UNSUPPORTED: u32 = 16;
/// A new connection found the connection table full and no entry it may take over (the oldest
/// connections its CPU created are established): it is refused rather than evicting a live
/// connection. (Services with sh, dh or mh forward it untracked instead.)
pub const DROP_FLOW_TABLE_FULL: u32 = 17;
/// Too big for the path (once encapsulated, or a NAT reply for the client's side), and may
/// not be answered with ICMP: an IPv4 packet without DF (IPVS would fragment it; XDP cannot),
/// or an ICMP error itself.
pub const DROP_TOO_BIG: u32 = 18;
/// A new NAT connection whose reply tuple (real server address and port, client address and
/// port) is in use by a live connection of another service mapped to the same real server
/// port: its replies could not be told apart. The client retries from another port.
pub const DROP_NAT_TUPLE_TAKEN: u32 = 19;
// --- sent ---
/// Too big for the path (once encapsulated, or a NAT reply for the client's side): answered
/// with ICMP "fragmentation needed" / ICMPv6 "packet too big" carrying the MTU, sent back out
/// of the ingress interface.
pub const TX_ICMP_TOO_BIG: u32 = 20;
pub const TX: u32 = 21;
pub const REDIRECT: u32 = 22;

/// Whether a verdict counter stands for `XDP_PASS`.
#[inline(always)]
pub fn is_pass(r: u32) -> bool {
    r < DROP_NAT_NO_ROUTE
}

/// Number of verdict counters.
pub const VERDICTS: u32 = 23;

// --- events (not verdicts) ---
/// A new flow could not be inserted into the connection table; it was forwarded untracked.
pub const EV_FLOW_INSERT_FAILED: u32 = 23;
/// A SYN or UDP datagram found an expired or stale flow entry and was scheduled afresh.
pub const EV_FLOW_RESCHEDULED: u32 = 24;
/// A new-flow event was lost because the controller's ring buffer was full.
pub const EV_EVENT_LOST: u32 = 25;
/// Entries the reaper retired because their connection had been idle past its timeout.
pub const EV_FLOW_EXPIRED: u32 = 26;
/// A new connection found the table full (or its two buckets full) and took the entry of
/// the oldest connection that was not established (see `lb_common::recyclable`).
pub const EV_FLOW_RECYCLED: u32 = 27;
/// A packet of a service with a deterministic scheduler (sh, dh, mh) was forwarded by hash
/// without a connection entry (table full, or a mid-connection packet with no entry: the
/// hash gives the same server).
pub const EV_FLOW_UNTRACKED: u32 = 28;
/// A NAT connection's reply entry could not be recorded (its replies will reach the kernel
/// unrewritten).
pub const EV_NAT_INSERT_FAILED: u32 = 29;
/// An ICMP error about a connection was relayed to the connection's real server.
pub const EV_ICMP_RELAYED: u32 = 30;

/// A first fragment (it carries the ports) was forwarded and its datagram recorded.
pub const EV_FRAGMENT_FIRST: u32 = 31;
/// A later fragment followed its datagram's first one.
pub const EV_FRAGMENT_LATER: u32 = 32;

/// A connection or template worth synchronising was not reported to the controller: the
/// `SYNC_EVENTS` ring was full (the backups learn of it at the next refresh).
pub const EV_SYNC_DROPPED: u32 = 33;
/// A synchronised connection could not be installed: the connection table was full.
pub const EV_SYNC_REFUSED: u32 = 34;

/// The reaper freed the way of an entry a race had left retired in the table (see `reap`).
pub const EV_FLOW_WAY_RECLAIMED: u32 = 35;

/// Size of the `REASONS` array.
pub const COUNT: u32 = 36;

/// Metric/label names, indexed by counter.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ip",
    "pass_not_tcp_udp",
    "pass_fragment",
    "pass_malformed",
    "pass_truncated",
    "pass_ipv6_ext",
    "pass_no_service",
    "pass_tcp_no_flow",
    "pass_no_backend",
    "pass_ttl_expired",
    "pass_nat_no_flow",
    "pass_icmp_unrelated",
    "drop_nat_no_route",
    "drop_neigh_missing",
    "drop_backend_gone",
    "drop_internal",
    "drop_unsupported",
    "drop_flow_table_full",
    "drop_too_big",
    "drop_nat_tuple_taken",
    "tx_icmp_too_big",
    "tx",
    "redirect",
    "flow_insert_failed",
    "flow_rescheduled",
    "event_lost",
    "flow_expired",
    "flow_recycled",
    "flow_untracked",
    "nat_insert_failed",
    "icmp_relayed",
    "fragment_first",
    "fragment_later",
    "sync_dropped",
    "sync_refused",
    "flow_way_reclaimed",
];
