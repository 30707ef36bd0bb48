//! VRRP's I/O: raw sockets for advertisements (as keepalived opens them, keepalived.md §1.10),
//! packet sockets for gratuitous ARP / unsolicited NA, and the virtual addresses through
//! rtnetlink.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage,
    recvmsg, sendmsg, sendto,
};
use tokio::io::unix::AsyncFd;

use super::packet::{IPPROTO_VRRP, MCAST_V4, MCAST_V6};
use crate::sockopt;

/// An interface as VRRP needs it.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl Link {
    pub fn get(name: &str) -> Result<Link> {
        let ifindex = crate::dataplane::ifindex(name)?;
        let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
            .with_context(|| format!("reading the MAC address of {name}"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.trim().split(':').collect();
        if parts.len() != 6 {
            bail!("{name} has no Ethernet address ({})", text.trim());
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).with_context(|| format!("MAC of {name}"))?;
        }
        Ok(Link {
            name: name.to_string(),
            ifindex,
            mac,
        })
    }
}

/// Whether an interface is up with a carrier (`operstate` up; `unknown` counts as up, as for
/// interfaces without carrier reporting).
pub fn link_up(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/operstate"))
        .map(|s| matches!(s.trim(), "up" | "unknown"))
        .unwrap_or(false)
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, name: i32, value: &T, what: &str) -> Result<()> {
    sockopt::set(fd, level, name, value).with_context(|| format!("setsockopt {what}"))
}

fn raw_socket(family: i32, protocol: i32) -> Result<OwnedFd> {
    sockopt::socket(family, libc::SOCK_RAW, protocol).context("opening a raw socket")
}

fn bind_to_device(fd: &OwnedFd, name: &str) -> Result<()> {
    sockopt::bind_to_device(fd, name).with_context(|| format!("binding a socket to {name}"))
}

/// A received advertisement's packet.
pub struct Received {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL / hop limit, when known.
    pub ttl: Option<u8>,
    /// The VRRP message (no IP header).
    pub msg: Vec<u8>,
}

/// The VRRP socket of one interface and family: receives every advertisement arriving on
/// it (instances are told apart by VRID and mode) and sends the instances' adverts.
pub struct Socket {
    pub link: Link,
    pub v6: bool,
    rx: AsyncFd<OwnedFd>,
    tx: OwnedFd,
    /// IPv4: the next IP ID (keepalived starts at 1 and skips 0).
    ip_id: std::sync::atomic::AtomicU16,
}

impl Socket {
    /// Opens the sockets; `multicast` joins the VRRP group on the interface.
    pub fn open(link: &Link, v6: bool, multicast: bool) -> Result<Socket> {
        let ifindex = link.ifindex as i32;
        let one: libc::c_int = 1;
        let zero: libc::c_int = 0;
        let hops: libc::c_int = 255;
        let (rx, tx) = if !v6 {
            let rx = raw_socket(libc::AF_INET, IPPROTO_VRRP as i32)?;
            bind_to_device(&rx, &link.name)?;
            if multicast {
                let mreq = libc::ip_mreqn {
                    imr_multiaddr: libc::in_addr {
                        s_addr: u32::from(MCAST_V4).to_be(),
                    },
                    imr_address: libc::in_addr { s_addr: 0 },
                    imr_ifindex: ifindex,
                };
                setsockopt(
                    &rx,
                    libc::IPPROTO_IP,
                    libc::IP_ADD_MEMBERSHIP,
                    &mreq,
                    "IP_ADD_MEMBERSHIP",
                )?;
            }
            setsockopt(
                &rx,
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_ALL,
                &zero,
                "IP_MULTICAST_ALL",
            )?;
            let tx = raw_socket(libc::AF_INET, IPPROTO_VRRP as i32)?;
            setsockopt(&tx, libc::IPPROTO_IP, libc::IP_HDRINCL, &one, "IP_HDRINCL")?;
            bind_to_device(&tx, &link.name)?;
            let mreq = libc::ip_mreqn {
                imr_multiaddr: libc::in_addr { s_addr: 0 },
                imr_address: libc::in_addr { s_addr: 0 },
                imr_ifindex: ifindex,
            };
            setsockopt(
                &tx,
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_IF,
                &mreq,
                "IP_MULTICAST_IF",
            )?;
            setsockopt(
                &tx,
                libc::IPPROTO_IP,
                libc::IP_MULTICAST_LOOP,
                &zero,
                "IP_MULTICAST_LOOP",
            )?;
            // Nothing is ever read from the send socket.
            setsockopt(&tx, libc::SOL_SOCKET, libc::SO_RCVBUF, &zero, "SO_RCVBUF")?;
            (rx, tx)
        } else {
            let six: libc::c_int = 6;
            let rx = raw_socket(libc::AF_INET6, IPPROTO_VRRP as i32)?;
            bind_to_device(&rx, &link.name)?;
            // The kernel verifies the checksum (with the pseudo-header) on receive.
            setsockopt(
                &rx,
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                &six,
                "IPV6_CHECKSUM",
            )?;
            setsockopt(
                &rx,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                &one,
                "IPV6_RECVHOPLIMIT",
            )?;
            setsockopt(
                &rx,
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVPKTINFO,
                &one,
                "IPV6_RECVPKTINFO",
            )?;
            if multicast {
                let mreq = libc::ipv6_mreq {
                    ipv6mr_multiaddr: libc::in6_addr {
                        s6_addr: MCAST_V6.octets(),
                    },
                    ipv6mr_interface: ifindex as u32,
                };
                setsockopt(
                    &rx,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_ADD_MEMBERSHIP,
                    &mreq,
                    "IPV6_ADD_MEMBERSHIP",
                )?;
            }
            let tx = raw_socket(libc::AF_INET6, IPPROTO_VRRP as i32)?;
            bind_to_device(&tx, &link.name)?;
            setsockopt(
                &tx,
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                &six,
                "IPV6_CHECKSUM",
            )?;
            setsockopt(
                &tx,
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_IF,
                &ifindex,
                "IPV6_MULTICAST_IF",
            )?;
            setsockopt(
                &tx,
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_HOPS,
                &hops,
                "IPV6_MULTICAST_HOPS",
            )?;
            setsockopt(
                &tx,
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                &hops,
                "IPV6_UNICAST_HOPS",
            )?;
            setsockopt(
                &tx,
                libc::IPPROTO_IPV6,
                libc::IPV6_MULTICAST_LOOP,
                &zero,
                "IPV6_MULTICAST_LOOP",
            )?;
            setsockopt(&tx, libc::SOL_SOCKET, libc::SO_RCVBUF, &zero, "SO_RCVBUF")?;
            (rx, tx)
        };
        Ok(Socket {
            link: link.clone(),
            v6,
            // SAFETY: the socket is owned by the AsyncFd from here on.
            rx: unsafe { AsyncFd::register(rx) }.context("registering the VRRP socket")?,
            tx,
            ip_id: std::sync::atomic::AtomicU16::new(1),
        })
    }

    /// Sends `msg` (a VRRP message) from `src` to `dst`.
    pub fn send(&self, msg: &[u8], src: IpAddr, dst: IpAddr, ttl: u8) -> Result<()> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                use std::sync::atomic::Ordering;
                let mut id = self.ip_id.fetch_add(1, Ordering::Relaxed);
                if id == 0 {
                    id = self.ip_id.fetch_add(1, Ordering::Relaxed);
                }
                let pkt = super::packet::ipv4_packet(msg, s, d, id, ttl);
                let to = SockaddrIn::from(SocketAddrV4::new(d, 0));
                let flags = if d.is_multicast() {
                    MsgFlags::from_bits_retain(libc::MSG_DONTROUTE)
                } else {
                    MsgFlags::empty()
                };
                sendto(self.tx.as_raw_fd(), &pkt, &to, flags).with_context(|| {
                    format!("sending a VRRP advertisement to {d} on {}", self.link.name)
                })?;
            }
            (IpAddr::V6(_), IpAddr::V6(d)) => {
                let scope = if d.is_multicast() || is_link_local(d) {
                    self.link.ifindex
                } else {
                    0
                };
                let to = SockaddrIn6::from(SocketAddrV6::new(d, 0, 0, scope));
                let iov = [io::IoSlice::new(msg)];
                let hops: libc::c_int = ttl as libc::c_int;
                // The source of this instance's adverts, per packet (instances on one
                // interface may have different ones; nothing is bound, so a tentative
                // link-local address does not stop the socket from opening).
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: match src {
                            IpAddr::V6(a) => a.octets(),
                            IpAddr::V4(_) => unreachable!("matched above"),
                        },
                    },
                    ipi6_ifindex: self.link.ifindex,
                };
                let cmsg = [
                    ControlMessage::Ipv6HopLimit(&hops),
                    ControlMessage::Ipv6PacketInfo(&info),
                ];
                sendmsg(
                    self.tx.as_raw_fd(),
                    &iov,
                    &cmsg,
                    MsgFlags::empty(),
                    Some(&to),
                )
                .with_context(|| {
                    format!("sending a VRRP advertisement to {d} on {}", self.link.name)
                })?;
            }
            _ => bail!("advertisement from {src} to {dst}: families differ"),
        }
        Ok(())
    }

    /// Waits for the next advertisement packet (malformed IP packets are skipped).
    pub async fn recv(&self) -> Result<Received> {
        loop {
            let mut guard = self.rx.readable().await?;
            // EAGAIN becomes WouldBlock, which clears the readiness (try_io's contract).
            match guard.try_io(|fd| self.recv_now(fd.get_ref()).map_err(io::Error::from)) {
                Ok(Ok(Some(r))) => return Ok(r),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(anyhow!(e).context("reading an advertisement")),
                Err(_would_block) => continue,
            }
        }
    }

    fn recv_now(&self, fd: &OwnedFd) -> std::result::Result<Option<Received>, nix::Error> {
        let mut buf = vec![0u8; 2048];
        if !self.v6 {
            let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            buf.truncate(n);
            let Ok((info, payload)) = super::packet::parse_ipv4(&buf) else {
                return Ok(None);
            };
            return Ok(Some(Received {
                src: IpAddr::V4(info.src),
                dst: IpAddr::V4(info.dst),
                ttl: Some(info.ttl),
                msg: payload.to_vec(),
            }));
        }
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::c_int);
        let (n, src, dst, hops) = {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let r = recvmsg::<SockaddrStorage>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )?;
            let mut dst = None;
            let mut hops = None;
            for c in r.cmsgs()? {
                match c {
                    ControlMessageOwned::Ipv6PacketInfo(p) => {
                        dst = Some(Ipv6Addr::from(p.ipi6_addr.s6_addr))
                    }
                    ControlMessageOwned::Ipv6HopLimit(h) => hops = Some(h as u8),
                    _ => {}
                }
            }
            let src = r.address.and_then(|a| a.as_sockaddr_in6().map(|s| s.ip()));
            (r.bytes, src, dst, hops)
        };
        let (Some(src), Some(dst)) = (src, dst) else {
            return Ok(None);
        };
        buf.truncate(n);
        Ok(Some(Received {
            src: IpAddr::V6(src),
            dst: IpAddr::V6(dst),
            ttl: hops,
            msg: buf,
        }))
    }
}

fn is_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// Sends hand-built Ethernet frames (gratuitous ARP, unsolicited NA) on one interface.
pub struct FrameSender {
    fd: OwnedFd,
    ifindex: u32,
}

impl FrameSender {
    pub fn open(link: &Link) -> Result<FrameSender> {
        Ok(FrameSender {
            fd: sockopt::socket(libc::AF_PACKET, libc::SOCK_RAW, 0)
                .context("opening a packet socket")?,
            ifindex: link.ifindex,
        })
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let proto = u16::from_be_bytes([frame[12], frame[13]]);
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto.to_be();
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address are live for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error()).context("sending a gratuitous ARP / NA");
        }
        Ok(())
    }
}

/// Whether IPv6 forwarding is on for `name` (the NA's Router flag, as keepalived sets it).
pub fn ipv6_forwarding(name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{name}/forwarding"))
        .is_ok_and(|s| s.trim() == "1")
}

/// The addresses of the host, through rtnetlink.
pub struct Addresses {
    handle: rtnetlink::Handle,
}

impl Addresses {
    pub fn new() -> Result<Addresses> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Addresses { handle })
    }

    /// The interface's addresses as (address, prefix, scope is link, flags permanent).
    async fn list(&self, ifindex: u32) -> Result<Vec<(IpAddr, u8, bool)>> {
        let mut out = Vec::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        while let Some(m) = s.try_next().await.context("listing addresses")? {
            let link_scope = m.header.scope == AddressScope::Link;
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    out.push((*ip, m.header.prefix_len, link_scope));
                }
            }
        }
        Ok(out)
    }

    /// The address adverts leave from: the first IPv4 address of the interface that is not
    /// one of `vips` (IPv4), or its link-local address (IPv6).
    pub async fn source(&self, ifindex: u32, v6: bool, vips: &[IpAddr]) -> Result<Option<IpAddr>> {
        let list = self.list(ifindex).await?;
        Ok(list
            .into_iter()
            .find(|(a, _, link)| {
                if v6 {
                    a.is_ipv6() && *link
                } else {
                    a.is_ipv4() && !vips.contains(a)
                }
            })
            .map(|(a, _, _)| a))
    }

    /// Whether the kernel has an XDP program on the interface.
    pub async fn xdp_attached(&self, ifindex: u32) -> Result<bool> {
        use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
        let mut s = self.handle.link().get().match_index(ifindex).execute();
        while let Some(m) = s.try_next().await.context("reading the link")? {
            for a in &m.attributes {
                if let LinkAttribute::Xdp(x) = a {
                    return Ok(x
                        .iter()
                        .any(|x| matches!(x, LinkXdp::Attached(a) if *a != XdpAttached::None)));
                }
            }
        }
        Ok(false)
    }

    pub async fn has(&self, ifindex: u32, addr: IpAddr) -> Result<bool> {
        Ok(self.list(ifindex).await?.iter().any(|(a, _, _)| *a == addr))
    }

    /// `ip addr add ADDR/PREFIX dev IF` (IPv6 without duplicate address detection, which
    /// would hold the address back while a failed-over peer still answers).
    pub async fn add(&self, ifindex: u32, addr: IpAddr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(ifindex, addr, prefix);
        if addr.is_ipv6() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(anyhow!("adding {addr}/{prefix}: {e}")),
        }
    }

    /// `ip addr del ADDR dev IF` (absent is fine).
    pub async fn del(&self, ifindex: u32, addr: IpAddr) -> Result<bool> {
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(addr)
            .execute();
        let mut removed = false;
        while let Some(m) = s.try_next().await.context("listing addresses")? {
            match self.handle.address().del(m).execute().await {
                Ok(()) => removed = true,
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EADDRNOTAVAIL => {}
                Err(e) => return Err(anyhow!("removing {addr}: {e}")),
            }
        }
        Ok(removed)
    }
}

/// The VRRP multicast group of a family.
pub fn group(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(MCAST_V6)
    } else {
        IpAddr::V4(MCAST_V4)
    }
}
