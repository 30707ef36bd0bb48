//! Next hops of real servers: the egress interface from the routing table and the real
//! server's MAC from the kernel's neighbour table (direct routing needs both; XDP cannot
//! resolve addresses itself).
//!
//! The kernel does the resolving: for an unresolved address we ask it to resolve (a neighbour
//! update with `NTF_USE`, which makes it send an ARP request / neighbour solicitation) and pick
//! the answer up from the neighbour notifications. Entries used only by XDP never get
//! confirmed by the stack, so the watcher also refreshes stale ones periodically.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use futures::{FutureExt, StreamExt, TryStreamExt};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteMetric, RouteType},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::engine::NextHop;

/// What the kernel knows about a real server right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Ready(NextHop),
    /// Routed out of `ifindex` (through `gateway`, if any), MAC not known yet (resolution
    /// was requested).
    Pending {
        ifindex: u32,
        gateway: Option<IpAddr>,
    },
    /// No usable route (or the address is local).
    Unreachable,
}

/// What the routing table says about a real server.
struct Route {
    oif: u32,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    mtu: Option<u32>,
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub struct Resolver {
    handle: Handle,
}

impl Resolver {
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Resolver { handle })
    }

    /// Resolves every address with one neighbour dump per family. An address behind a
    /// router resolves to the router's MAC.
    pub async fn resolve_all(&self, addrs: &[IpAddr]) -> Result<Vec<(IpAddr, Resolution)>> {
        let neigh = self.neighbours().await?;
        let mut links: HashMap<u32, Option<([u8; 6], u32)>> = HashMap::new();
        let mut out = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let Some(route) = self.route(addr).await? else {
                out.push((addr, Resolution::Unreachable));
                continue;
            };
            let oif = route.oif;
            let link = match links.get(&oif) {
                Some(m) => *m,
                None => {
                    let m = match self.egress_link(oif).await {
                        Ok(m) => Some(m),
                        Err(e) => {
                            warn!(%addr, ifindex = oif, "real server cannot be reached from XDP: {e:#}");
                            None
                        }
                    };
                    links.insert(oif, m);
                    m
                }
            };
            let Some((src_mac, link_mtu)) = link else {
                out.push((addr, Resolution::Unreachable));
                continue;
            };
            let hop = route.gateway.unwrap_or(addr);
            match neigh.get(&(oif, hop)) {
                Some((mac, state)) if usable(*state) => {
                    if *state == NeighbourState::Stale {
                        // Keep it fresh: XDP traffic never confirms it to the kernel.
                        self.request(oif, hop).await;
                    }
                    out.push((
                        addr,
                        Resolution::Ready(NextHop {
                            ifindex: oif,
                            dst_mac: *mac,
                            src_mac,
                            gateway: route.gateway,
                            mtu: route.mtu.unwrap_or(link_mtu),
                            source: route.source,
                        }),
                    ))
                }
                _ => {
                    self.request(oif, hop).await;
                    out.push((
                        addr,
                        Resolution::Pending {
                            ifindex: oif,
                            gateway: route.gateway,
                        },
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Asks the kernel to resolve `addr` on interface `oif`.
    pub async fn request(&self, oif: u32, addr: IpAddr) {
        let req = self
            .handle
            .neighbours()
            .add(oif, addr)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace();
        if let Err(e) = req.execute().await {
            debug!(%addr, "neighbour resolution request failed: {e}");
        }
    }

    /// The interface packets for `addr` arrive on: the one with a connected subnet holding
    /// it (longest prefix; loopback excluded), else the one the route to it leaves by.
    pub async fn interface_towards(&self, addr: IpAddr) -> Result<Option<u32>> {
        use netlink_packet_route::address::{AddressAttribute, AddressMessage};
        let mut addrs = self.handle.address().get().execute();
        let mut best: Option<(u8, u32)> = None;
        // A VIP on the loopback (DR real servers, anycast) does not say where packets come in.
        let lo = nix::net::if_::if_nametoindex("lo").unwrap_or(0);
        while let Some(m) = addrs.try_next().await.context("listing addresses")? {
            let m: AddressMessage = m;
            if m.header.index == lo {
                continue;
            }
            let plen = m.header.prefix_len;
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    let ip = *ip;
                    if ip.is_loopback() || ip.is_ipv4() != addr.is_ipv4() {
                        continue;
                    }
                    let same =
                        crate::config::mask_addr(ip, plen) == crate::config::mask_addr(addr, plen);
                    if same && best.is_none_or(|(p, _)| plen > p) {
                        best = Some((plen, m.header.index));
                    }
                }
            }
        }
        if let Some((_, i)) = best {
            return Ok(Some(i));
        }
        Ok(self.route(addr).await?.map(|r| r.oif))
    }

    /// The kernel's route to `addr`; `None` if unroutable or local.
    async fn route(&self, addr: IpAddr) -> Result<Option<Route>> {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(addr, prefix)
            .map_err(|e| anyhow!("{e}"))?
            .build();
        let mut routes = self.handle.route().get(msg).execute();
        match routes.try_next().await {
            Ok(Some(r)) => {
                if r.header.kind == RouteType::Local {
                    warn!(%addr, "real server address is local to this host");
                    return Ok(None);
                }
                let mut route = Route {
                    oif: 0,
                    gateway: None,
                    source: None,
                    mtu: None,
                };
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => route.oif = *i,
                        RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
                        RouteAttribute::PrefSource(s) => route.source = route_ip(s),
                        RouteAttribute::Metrics(m) => {
                            for x in m {
                                if let RouteMetric::Mtu(v) = x
                                    && *v != 0
                                {
                                    route.mtu = Some(*v);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                Ok((route.oif != 0).then_some(route))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                debug!(%addr, "no route: {e}");
                Ok(None)
            }
        }
    }

    /// The MAC and MTU frames to a real server leave with, if its egress interface can take
    /// them from XDP: an Ethernet device that is not a VLAN sub-interface (XDP sees the
    /// parent's tagged frames; re-tagging is not implemented).
    async fn egress_link(&self, index: u32) -> Result<([u8; 6], u32)> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await?
            .ok_or_else(|| anyhow!("interface {index} vanished"))?;
        let mut mac = None;
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => {
                    mac = Some(<[u8; 6]>::try_from(m.as_slice()).expect("6 bytes"))
                }
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(InfoKind::Vlan) = i {
                            return Err(anyhow!(
                                "its egress interface (ifindex {index}) is a VLAN sub-interface, which XDP forwarding does not support yet"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        let mac = mac.ok_or_else(|| {
            anyhow!("its egress interface (ifindex {index}) has no Ethernet address")
        })?;
        Ok((mac, mtu))
    }

    /// (ifindex, address) → (MAC, state) of every neighbour entry.
    async fn neighbours(&self) -> Result<HashMap<(u32, IpAddr), ([u8; 6], NeighbourState)>> {
        let mut out = HashMap::new();
        for v in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut s = self
                .handle
                .neighbours()
                .get()
                .set_address_family(v)
                .execute();
            while let Some(m) = s.try_next().await? {
                if let Some((k, v)) = entry(&m) {
                    out.insert(k, v);
                }
            }
        }
        Ok(out)
    }
}

fn usable(s: NeighbourState) -> bool {
    matches!(
        s,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    )
}

type NeighEntry = ((u32, IpAddr), ([u8; 6], NeighbourState));

fn entry(m: &NeighbourMessage) -> Option<NeighEntry> {
    let mut dst = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                dst = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                dst = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                mac = Some(<[u8; 6]>::try_from(l.as_slice()).expect("6 bytes"))
            }
            _ => {}
        }
    }
    Some((
        (m.header.ifindex, dst?),
        (mac.unwrap_or([0; 6]), m.header.state),
    ))
}

/// The name of the interface VIP `addr` is served on (see [`Resolver::interface_towards`]).
pub async fn interface_towards(addr: IpAddr) -> Result<Option<String>> {
    let r = Resolver::new()?;
    let Some(index) = r.interface_towards(addr).await? else {
        return Ok(None);
    };
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: on success the name is NUL-terminated within buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(Some(name.to_string_lossy().into_owned()))
}

/// Updates of next hops for the daemon: `(address, next hop or None)`.
pub type Updates = mpsc::UnboundedReceiver<(IpAddr, Option<NextHop>)>;

/// Handle to the watcher task.
#[derive(Clone)]
pub struct Watcher {
    /// Addresses to resolve now (a packet found one unresolved, or the config changed).
    pub resolve: mpsc::UnboundedSender<IpAddr>,
    /// Replaces the set of addresses watched.
    pub watch: mpsc::UnboundedSender<Vec<IpAddr>>,
    /// Next hops (interface, address) the data plane found unresolved on the way to a
    /// client (NAT replies): the kernel is asked to resolve them.
    pub nudge: mpsc::UnboundedSender<(u32, IpAddr)>,
}

/// Starts the watcher: it resolves watched addresses on request, whenever the kernel's
/// neighbour table changes for one of them, and every `refresh`. It reports a next hop when
/// it becomes known or changes; a known MAC is kept while the kernel re-resolves it (a
/// failing real server is the health checker's business, not the neighbour table's).
pub fn spawn_watcher(initial: Vec<IpAddr>, refresh: Duration) -> Result<(Watcher, Updates)> {
    let resolver = Resolver::new()?;
    let (mconn, _mhandle, mut events) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Neigh])
            .context("neighbour notifications")?;
    tokio::spawn(mconn);
    let (tx, rx) = mpsc::unbounded_channel();
    let (resolve_tx, mut resolve_rx) = mpsc::unbounded_channel::<IpAddr>();
    let (watch_tx, mut watch_rx) = mpsc::unbounded_channel::<Vec<IpAddr>>();
    let (nudge_tx, mut nudge_rx) = mpsc::unbounded_channel::<(u32, IpAddr)>();
    tokio::spawn(async move {
        let mut watched: HashSet<IpAddr> = initial.into_iter().collect();
        let mut known: HashMap<IpAddr, NextHop> = HashMap::new();
        // Router → the watched addresses reached through it.
        let mut via: HashMap<IpAddr, HashSet<IpAddr>> = HashMap::new();
        let mut tick = tokio::time::interval(refresh);
        loop {
            let todo: Vec<IpAddr> = tokio::select! {
                _ = tick.tick() => watched.iter().copied().collect(),
                Some(a) = resolve_rx.recv() => {
                    let mut v = vec![a];
                    while let Ok(a) = resolve_rx.try_recv() { v.push(a); }
                    v.sort(); v.dedup();
                    v.into_iter().filter(|a| watched.contains(a)).collect()
                }
                Some((oif, hop)) = nudge_rx.recv() => {
                    resolver.request(oif, hop).await;
                    Vec::new()
                }
                Some(w) = watch_rx.recv() => {
                    watched = w.into_iter().collect();
                    known.retain(|a, _| watched.contains(a));
                    watched.iter().copied().filter(|a| !known.contains_key(a)).collect()
                }
                Some((msg, _)) = events.next() => {
                    // Every notification already queued is handled with one neighbour dump
                    // (hundreds of unresolved servers make a stream of them).
                    let affected = |msg: netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>| -> Vec<IpAddr> {
                        match msg.payload {
                            netlink_packet_core::NetlinkPayload::InnerMessage(
                                RouteNetlinkMessage::NewNeighbour(m) | RouteNetlinkMessage::DelNeighbour(m),
                            ) => match entry(&m) {
                                // The server itself, or the router in front of some.
                                Some(((_, a), _)) => watched
                                    .get(&a)
                                    .copied()
                                    .into_iter()
                                    .chain(via.get(&a).into_iter().flatten().copied())
                                    .collect(),
                                None => Vec::new(),
                            },
                            _ => Vec::new(),
                        }
                    };
                    let mut v = affected(msg);
                    while let Some(Some((msg, _))) = events.next().now_or_never() {
                        v.extend(affected(msg));
                    }
                    v.sort();
                    v.dedup();
                    v
                }
                else => break,
            };
            if todo.is_empty() {
                continue;
            }
            match resolver.resolve_all(&todo).await {
                Ok(results) => {
                    for (addr, r) in &results {
                        let gw = match r {
                            Resolution::Ready(nh) => nh.gateway,
                            Resolution::Pending { gateway, .. } => *gateway,
                            Resolution::Unreachable => None,
                        };
                        via.retain(|_, addrs| {
                            addrs.remove(addr);
                            !addrs.is_empty()
                        });
                        if let Some(g) = gw {
                            via.entry(g).or_default().insert(*addr);
                        }
                    }
                    for (addr, r) in results {
                        let update = match r {
                            Resolution::Ready(nh) => Some(Some(nh)),
                            // Route moved to another interface: the old MAC is wrong there.
                            Resolution::Pending { ifindex, .. } => match known.get(&addr) {
                                Some(old) if old.ifindex != ifindex => Some(None),
                                _ => None,
                            },
                            Resolution::Unreachable => known.contains_key(&addr).then_some(None),
                        };
                        if let Some(u) = update {
                            if known.get(&addr).copied() == u {
                                continue;
                            }
                            match u {
                                Some(nh) => known.insert(addr, nh),
                                None => known.remove(&addr),
                            };
                            if tx.send((addr, u)).is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(e) => warn!("resolving real servers: {e:#}"),
            }
        }
    });
    Ok((
        Watcher {
            resolve: resolve_tx,
            watch: watch_tx,
            nudge: nudge_tx,
        },
        rx,
    ))
}
