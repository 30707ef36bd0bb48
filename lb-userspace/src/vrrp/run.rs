//! The VRRP task of the daemon: drives [`Machine`] with real time, sockets, trackers and
//! programs, and publishes the instances' state for the admin API, /metrics and the
//! connection sync.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::{debug, error, info, warn};

use super::{
    config::{Command, Ha},
    machine::{Action, Machine, State},
    net::{self, Addresses, FrameSender, Link, Socket},
    packet::{self, Advert},
};

/// How often interfaces' link state is read.
const LINK_POLL: Duration = Duration::from_millis(100);
/// Notify programs are not awaited; this bounds them.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopping daemon waits for its stop programs (keepalived: 1 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// One instance as `xlb status`, the API and /metrics show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InstanceStatus {
    pub name: String,
    pub interface: String,
    pub vrid: u8,
    pub version: u8,
    pub state: State,
    pub base_priority: u8,
    pub priority: u8,
    pub advert_int: f64,
    pub unicast: bool,
    pub source: Option<IpAddr>,
    pub vips: Vec<String>,
    /// The master last heard (address, priority), or this node when master.
    pub master: Option<(IpAddr, u8)>,
    pub transitions: u64,
    /// Unix time of the last transition.
    pub since: f64,
    pub reason: String,
    pub fault: Vec<String>,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub priority_zero_received: u64,
    pub dropped: Vec<(String, u64)>,
    pub sync_group: Option<String>,
}

/// A view of the instances' published state.
#[derive(Clone)]
pub struct StatusHandle(Arc<Mutex<Vec<InstanceStatus>>>);

impl StatusHandle {
    pub fn get(&self) -> Vec<InstanceStatus> {
        self.0.lock().expect("status lock").clone()
    }
}

/// What the daemon holds of the running VRRP task.
pub struct Vrrp {
    cmds: mpsc::UnboundedSender<Cmd>,
    status: Arc<Mutex<Vec<InstanceStatus>>>,
    /// Every instance's state, by name (the connection sync follows its instance).
    pub states: watch::Receiver<HashMap<String, State>>,
    task: tokio::task::JoinHandle<()>,
}

enum Cmd {
    Shutdown(oneshot::Sender<()>),
    /// Stop without a word: the successor resumes.
    HandOver(oneshot::Sender<()>),
    /// The data plane's health per instance index (see `track_dataplane`).
    Dataplane(HashMap<usize, bool>),
}

impl Vrrp {
    pub fn status(&self) -> StatusHandle {
        StatusHandle(self.status.clone())
    }

    /// Tells the task how xlb's data plane is doing, per instance that tracks it.
    pub fn set_dataplane(&self, up: HashMap<usize, bool>) {
        let _ = self.cmds.send(Cmd::Dataplane(up));
    }

    /// Hands over to a successor (`xlb run --takeover`): the addresses stay where they are
    /// and nothing is sent; the successor resumes.
    pub async fn hand_over(self) {
        self.stop(Cmd::HandOver, Duration::from_secs(1)).await;
    }

    /// Stops cleanly: masters send priority 0 and give up their VIPs; notify_stop runs.
    pub async fn shutdown(self) {
        self.stop(Cmd::Shutdown, Duration::from_secs(3)).await;
    }

    /// Sends a stop command and waits for its answer (at most `wait`), then ends the task.
    async fn stop(self, cmd: fn(oneshot::Sender<()>) -> Cmd, wait: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(cmd(tx)).is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
        self.task.abort();
    }
}

/// Starts VRRP for `ha` (nothing to do without instances: `None`).
/// `resume`: this daemon took over a running data plane (an upgrade, or after a crash):
/// instances whose addresses are all still in place were master and stay master.
pub async fn start(ha: Ha, script_user: Option<String>, resume: bool) -> Result<Option<Vrrp>> {
    if ha.instances.is_empty() {
        return Ok(None);
    }
    let mut rt = Runtime::new(ha, script_user).await?;
    rt.resume = resume;
    let (cmds, cmd_rx) = mpsc::unbounded_channel();
    let status = rt.status.clone();
    let (states_tx, states) = watch::channel(HashMap::new());
    rt.states = Some(states_tx);
    let task = tokio::spawn(async move {
        if let Err(e) = rt.run(cmd_rx).await {
            error!("VRRP stopped: {e:#}");
        }
    });
    Ok(Some(Vrrp {
        cmds,
        status,
        states,
        task,
    }))
}

struct Runtime {
    ha: Ha,
    m: Machine,
    links: HashMap<String, Link>,
    /// Per (interface, IPv6).
    sockets: Vec<((String, bool), Arc<Socket>)>,
    frames: HashMap<String, FrameSender>,
    addrs: Addresses,
    script_user: Option<String>,
    status: Arc<Mutex<Vec<InstanceStatus>>>,
    states: Option<watch::Sender<HashMap<String, State>>>,
    /// SystemTime of each instance's last transition.
    since: Vec<SystemTime>,
    /// See [`start`].
    resume: bool,
}

impl Runtime {
    async fn new(ha: Ha, script_user: Option<String>) -> Result<Runtime> {
        let addrs = Addresses::new()?;
        let mut links = HashMap::new();
        for i in &ha.instances {
            for name in std::iter::once(&i.interface).chain(
                i.vips
                    .iter()
                    .chain(&i.excluded_vips)
                    .filter_map(|v| v.dev.as_ref()),
            ) {
                if !links.contains_key(name) {
                    let l = Link::get(name)
                        .with_context(|| format!("vrrp instance {}: interface {name}", i.name))?;
                    links.insert(name.clone(), l);
                }
            }
        }
        let mut m = Machine::new(&ha);
        // Sources: configured, else the interface's (its first IPv4 that is not a VIP, or
        // its link-local IPv6 address).
        // No instance's VIP may become a source (leftovers may still be on the interface).
        let vips = all_vips(&ha);
        for (idx, i) in ha.instances.iter().enumerate() {
            let link = &links[&i.interface];
            let src = match i.unicast_src_ip.or(i.mcast_src_ip) {
                Some(a) => Some(a),
                None => addrs.source(link.ifindex, i.is_ipv6(), &vips).await?,
            };
            if src.is_none() {
                warn!(instance = %i.name, interface = %i.interface, "no source address on the interface yet; the instance stays in FAULT until one appears");
            }
            m.insts[idx].source = src;
        }
        let mut sockets: Vec<((String, bool), Arc<Socket>)> = Vec::new();
        for i in &ha.instances {
            let key = (i.interface.clone(), i.is_ipv6());
            let multicast = ha
                .instances
                .iter()
                .any(|o| o.interface == i.interface && o.is_ipv6() == i.is_ipv6() && !o.unicast());
            if sockets.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let s = Socket::open(&links[&i.interface], i.is_ipv6(), multicast)
                .with_context(|| format!("vrrp instance {}: opening its sockets", i.name))?;
            sockets.push((key, Arc::new(s)));
        }
        let mut frames = HashMap::new();
        for (name, l) in &links {
            frames.insert(name.clone(), FrameSender::open(l)?);
        }
        let n = ha.instances.len();
        Ok(Runtime {
            ha,
            m,
            links,
            sockets,
            frames,
            addrs,
            script_user,
            status: Arc::new(Mutex::new(Vec::new())),
            states: None,
            since: vec![SystemTime::now(); n],
            resume: false,
        })
    }

    /// The interfaces whose link state matters.
    fn tracked_links(&self) -> Vec<String> {
        let mut v: Vec<String> = self.links.keys().cloned().collect();
        for i in &self.ha.instances {
            v.extend(i.track_interfaces.iter().map(|t| t.name.clone()));
        }
        for g in &self.ha.groups {
            v.extend(g.track_interfaces.iter().map(|t| t.name.clone()));
        }
        v.sort();
        v.dedup();
        v
    }

    async fn run(&mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) -> Result<()> {
        // keepalived removes VIPs left over from an earlier run before it starts; a daemon
        // taking over keeps those of the instances that were master.
        let mut resume = vec![false; self.ha.instances.len()];
        for (i, r) in resume.iter_mut().enumerate() {
            if self.resume && self.vips_in_place(i).await {
                info!(instance = %self.ha.instances[i].name, "the previous daemon was master: resuming");
                *r = true;
            } else {
                self.remove_vips(i, true).await;
            }
        }
        let links = self.tracked_links();
        for l in &links {
            self.m
                .trackers
                .interfaces
                .insert(l.clone(), net::link_up(l));
        }
        let (track_tx, mut track_rx) = mpsc::unbounded_channel::<(String, bool)>();
        let used: Vec<&super::config::Script> = self
            .ha
            .scripts
            .iter()
            .filter(|s| {
                self.ha
                    .instances
                    .iter()
                    .flat_map(|i| &i.track_scripts)
                    .chain(self.ha.groups.iter().flat_map(|g| &g.track_scripts))
                    .any(|t| t.name == s.name)
            })
            .collect();
        for s in used {
            if s.init_fail {
                self.m.trackers.scripts.insert(s.name.clone(), false);
            }
            tokio::spawn(run_script(
                s.clone(),
                self.script_user.clone(),
                track_tx.clone(),
            ));
        }
        let now = Instant::now();
        let acts = self.m.start(now.into_std(), &resume);
        self.execute(acts).await;
        self.publish();

        let mut link_poll = tokio::time::interval(LINK_POLL);
        link_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One reader task per socket feeds the loop.
        let (rx_tx, mut rx_rx) = mpsc::unbounded_channel::<(usize, net::Received)>();
        let mut readers = Vec::new();
        for (r, (_, sock)) in self.sockets.iter().enumerate() {
            let (sock, tx) = (sock.clone(), rx_tx.clone());
            readers.push(tokio::spawn(async move {
                loop {
                    match sock.recv().await {
                        Ok(p) => {
                            if tx.send((r, p)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!("reading VRRP advertisements: {e:#}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
        let result = loop {
            let deadline = self
                .m
                .next_deadline()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // Received adverts first: one already waiting must count before a timer that
            // expires at the same moment.
            let acts = tokio::select! {
                biased;
                Some((r, p)) = rx_rx.recv() => {
                    let mut acts = self.received(r, p);
                    // Whatever else arrived meanwhile, in one go.
                    while let Ok((r, p)) = rx_rx.try_recv() {
                        self.execute(std::mem::take(&mut acts)).await;
                        acts = self.received(r, p);
                    }
                    acts
                }
                _ = tokio::time::sleep_until(deadline) => self.m.tick(Instant::now().into_std()),
                Some((name, up)) = track_rx.recv() => {
                    self.m.trackers.scripts.insert(name, up);
                    self.m.retrack(Instant::now().into_std())
                }
                _ = link_poll.tick() => {
                    let mut changed = self.find_sources().await;
                    for l in &links {
                        let up = net::link_up(l);
                        if self.m.trackers.interfaces.insert(l.clone(), up) != Some(up) {
                            info!(interface = %l, up, "tracked interface changed");
                            changed = true;
                        }
                    }
                    if changed {
                        self.m.retrack(Instant::now().into_std())
                    } else {
                        Vec::new()
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Dataplane(up)) => {
                        let mut changed = false;
                        for (i, u) in &up {
                            if self.m.trackers.dataplane.get(i) != Some(u) {
                                info!(instance = %self.ha.instances[*i].name, up = *u, "xlb data plane tracking changed");
                                changed = true;
                            }
                        }
                        self.m.trackers.dataplane = up;
                        if changed {
                            self.m.retrack(Instant::now().into_std())
                        } else {
                            Vec::new()
                        }
                    }
                    Some(Cmd::Shutdown(done)) => {
                        let acts = self.m.shutdown(Instant::now().into_std());
                        self.execute(acts).await;
                        self.publish();
                        let _ = done.send(());
                        break Ok(());
                    }
                    Some(Cmd::HandOver(done)) => {
                        let _ = done.send(());
                        break Ok(());
                    }
                    // The handle went away without a word (the daemon is dying): leave
                    // everything as it is, as a crash would.
                    None => break Ok(()),
                },
            };
            if !acts.is_empty() {
                self.execute(acts).await;
            }
            self.publish();
        };
        for r in readers {
            r.abort();
        }
        result
    }

    /// Looks again for the source address of instances that have none; true if one was found.
    async fn find_sources(&mut self) -> bool {
        let mut found = false;
        for i in 0..self.ha.instances.len() {
            if self.m.insts[i].source.is_some() {
                continue;
            }
            let c = &self.ha.instances[i];
            let vips = all_vips(&self.ha);
            let ifindex = self.links[&c.interface].ifindex;
            if let Ok(Some(a)) = self.addrs.source(ifindex, c.is_ipv6(), &vips).await {
                info!(instance = %c.name, source = %a, "source address found");
                self.m.insts[i].source = Some(a);
                found = true;
            }
        }
        found
    }

    /// One received packet from socket `r`: decoded, matched to its instance, screened and
    /// fed to the machine.
    fn received(&mut self, r: usize, p: net::Received) -> Vec<Action> {
        let (iface, v6) = self.sockets[r].0.clone();
        let adv = match packet::decode(&p.msg, p.src, p.dst) {
            Ok((adv, _)) => adv,
            Err(e) => {
                debug!(interface = %iface, src = %p.src, "invalid VRRP packet: {e}");
                return Vec::new();
            }
        };
        let multicast = match p.dst {
            IpAddr::V4(d) => d.is_multicast(),
            IpAddr::V6(d) => d.is_multicast(),
        };
        let candidates: Vec<usize> = (0..self.ha.instances.len())
            .filter(|i| {
                let c = &self.ha.instances[*i];
                c.interface == iface
                    && c.is_ipv6() == v6
                    && c.vrid == adv.vrid
                    && (multicast != c.unicast())
                    && (!c.unicast() || self.m.insts[*i].source == Some(p.dst))
            })
            .collect();
        // One VRID may serve several unicast peer sets: the instance that lists the sender.
        let Some(i) = candidates
            .iter()
            .copied()
            .find(|i| self.ha.instances[*i].unicast_peers.contains(&p.src))
            .or(candidates.first().copied())
        else {
            return Vec::new();
        };
        if self.m.insts[i].source == Some(p.src) {
            return Vec::new();
        }
        if let Some(why) = self.m.screen(i, &adv, p.src, p.ttl, multicast) {
            *self.m.insts[i].drops.entry(why).or_default() += 1;
            debug!(instance = %self.ha.instances[i].name, src = %p.src, reason = why.name(), "advertisement dropped");
            return Vec::new();
        }
        self.m.advert(i, Instant::now().into_std(), p.src, &adv)
    }

    async fn execute(&mut self, acts: Vec<Action>) {
        // Stop programs are waited for (up to STOP_TIMEOUT, as keepalived): the daemon exits
        // right after.
        let mut stop_jobs = Vec::new();
        for a in acts {
            match a {
                Action::Advert { inst, priority } => self.send_advert(inst, priority),
                Action::AddVips(i) => self.add_vips(i).await,
                Action::RemoveVips(i) => self.remove_vips(i, false).await,
                Action::Garp { inst, repeat } => self.garp(inst, repeat),
                Action::Transition {
                    inst,
                    from,
                    to,
                    reason,
                } => {
                    self.since[inst] = SystemTime::now();
                    let c = &self.ha.instances[inst];
                    let prio = self.m.insts[inst].priority;
                    match to {
                        State::Fault => {
                            warn!(instance = %c.name, from = from.name(), to = to.name(), priority = prio, %reason, "VRRP transition")
                        }
                        _ => {
                            info!(instance = %c.name, from = from.name(), to = to.name(), priority = prio, %reason, "VRRP transition")
                        }
                    }
                    let own = match to {
                        State::Master => &c.notify.master,
                        State::Backup => &c.notify.backup,
                        State::Fault => &c.notify.fault,
                        State::Init => &c.notify.stop,
                    };
                    let state_word = if to == State::Init { "STOP" } else { to.name() };
                    let job = self.notify(
                        own.clone(),
                        c.notify.any.clone(),
                        "INSTANCE",
                        &c.name,
                        state_word,
                        prio,
                    );
                    if to == State::Init {
                        stop_jobs.extend(job);
                    }
                }
                Action::GroupTransition { group, state } => {
                    let g = &self.ha.groups[group];
                    info!(group = %g.name, state = state.name(), "VRRP sync group transition");
                    let own = match state {
                        State::Master => &g.notify.master,
                        State::Backup => &g.notify.backup,
                        State::Fault => &g.notify.fault,
                        State::Init => &g.notify.stop,
                    };
                    let state_word = if state == State::Init {
                        "STOP"
                    } else {
                        state.name()
                    };
                    let job = self.notify(
                        own.clone(),
                        g.notify.any.clone(),
                        "GROUP",
                        &g.name,
                        state_word,
                        0,
                    );
                    if state == State::Init {
                        stop_jobs.extend(job);
                    }
                }
            }
        }
        for j in stop_jobs {
            let _ = tokio::time::timeout(STOP_TIMEOUT, j).await;
        }
    }

    /// Runs a state's own program, then the generic `notify` with keepalived's four
    /// arguments, in that order; neither is awaited by VRRP (the task is returned).
    fn notify(
        &self,
        own: Option<Command>,
        any: Option<Command>,
        kind: &'static str,
        name: &str,
        state: &'static str,
        prio: u8,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let user = self.script_user.clone();
        let name = name.to_string();
        if own.is_none() && any.is_none() {
            return None;
        }
        Some(tokio::spawn(async move {
            if let Some(argv) = own {
                run_program(argv, user.clone(), NOTIFY_TIMEOUT).await;
            }
            if let Some(mut argv) = any {
                argv.extend([kind.to_string(), name, state.to_string(), prio.to_string()]);
                run_program(argv, user, NOTIFY_TIMEOUT).await;
            }
        }))
    }

    fn send_advert(&mut self, i: usize, priority: u8) {
        let c = &self.ha.instances[i];
        let Some(src) = self.m.insts[i].source else {
            return;
        };
        let adv = Advert {
            version: c.version,
            vrid: c.vrid,
            priority,
            interval_cs: c.advert_int_cs,
            auth: c.auth_pass,
            addrs: c.vips.iter().map(|v| v.addr).collect(),
        };
        let key = (c.interface.clone(), c.is_ipv6());
        let Some((_, sock)) = self.sockets.iter().find(|(k, _)| *k == key) else {
            return;
        };
        let dests: Vec<(IpAddr, u8)> = if c.unicast() {
            let ttl = c.unicast_ttl.unwrap_or(255);
            c.unicast_peers.iter().map(|p| (*p, ttl)).collect()
        } else {
            vec![(net::group(c.is_ipv6()), 255)]
        };
        for (dst, ttl) in dests {
            let msg = packet::encode(&adv, src, dst, c.v3_checksum_as_v2);
            if let Err(e) = sock.send(&msg, src, dst, ttl) {
                warn!(instance = %c.name, "{e:#}");
            }
        }
    }

    fn vip_link(&self, i: usize, dev: &Option<String>) -> &Link {
        let name = dev.as_ref().unwrap_or(&self.ha.instances[i].interface);
        &self.links[name]
    }

    /// Whether every address of instance `i` is on its interface.
    async fn vips_in_place(&self, i: usize) -> bool {
        let c = &self.ha.instances[i];
        for v in c.vips.iter().chain(&c.excluded_vips) {
            let l = self.vip_link(i, &v.dev).ifindex;
            if !self.addrs.has(l, v.addr).await.unwrap_or(false) {
                return false;
            }
        }
        true
    }

    async fn add_vips(&mut self, i: usize) {
        let c = self.ha.instances[i].clone();
        for v in c.vips.iter().chain(&c.excluded_vips) {
            let l = self.vip_link(i, &v.dev).ifindex;
            match self.addrs.add(l, v.addr, v.prefix).await {
                Ok(()) => info!(instance = %c.name, vip = %v.addr, "virtual address added"),
                Err(e) => error!(instance = %c.name, "{e:#}"),
            }
        }
    }

    async fn remove_vips(&mut self, i: usize, startup: bool) {
        let c = self.ha.instances[i].clone();
        for v in c.vips.iter().chain(&c.excluded_vips) {
            let l = self.vip_link(i, &v.dev).ifindex;
            match self.addrs.del(l, v.addr).await {
                Ok(true) if startup => {
                    info!(instance = %c.name, vip = %v.addr, "removed a virtual address left over from an earlier run")
                }
                Ok(true) => info!(instance = %c.name, vip = %v.addr, "virtual address removed"),
                Ok(false) => {}
                Err(e) => error!(instance = %c.name, "{e:#}"),
            }
        }
    }

    fn garp(&self, i: usize, repeat: u32) {
        let c = &self.ha.instances[i];
        for v in c.vips.iter().chain(&c.excluded_vips) {
            let link = self.vip_link(i, &v.dev);
            let frame = match v.addr {
                IpAddr::V4(a) => packet::garp(link.mac, a),
                IpAddr::V6(a) => {
                    packet::unsolicited_na(link.mac, a, net::ipv6_forwarding(&link.name))
                }
            };
            if let Some(f) = self.frames.get(&link.name) {
                for _ in 0..repeat {
                    if let Err(e) = f.send(&frame) {
                        warn!(instance = %c.name, vip = %v.addr, "{e:#}");
                        break;
                    }
                }
            }
        }
    }

    fn publish(&self) {
        let out: Vec<InstanceStatus> = self
            .m
            .insts
            .iter()
            .enumerate()
            .map(|(idx, i)| {
                let c = &i.cfg;
                let mut dropped: Vec<(String, u64)> = i
                    .drops
                    .iter()
                    .map(|(k, v)| (k.name().to_string(), *v))
                    .collect();
                dropped.sort();
                InstanceStatus {
                    name: c.name.clone(),
                    interface: c.interface.clone(),
                    vrid: c.vrid,
                    version: c.version,
                    state: i.state,
                    base_priority: c.priority,
                    priority: i.priority,
                    advert_int: c.advert_int_cs as f64 / 100.0,
                    unicast: c.unicast(),
                    source: i.source,
                    vips: c
                        .vips
                        .iter()
                        .map(|v| format!("{}/{}", v.addr, v.prefix))
                        .collect(),
                    master: if i.state == State::Master {
                        i.source.map(|s| (s, i.priority))
                    } else {
                        i.master
                    },
                    transitions: i.transitions,
                    since: crate::health::state::unix(self.since[idx]),
                    reason: i.last_reason.clone(),
                    fault: i.fault.clone(),
                    adverts_sent: i.adverts_sent,
                    adverts_received: i.adverts_received,
                    priority_zero_received: i.priority_zero_received,
                    dropped,
                    sync_group: self
                        .ha
                        .groups
                        .iter()
                        .find(|g| g.members.contains(&c.name))
                        .map(|g| g.name.clone()),
                }
            })
            .collect();
        *self.status.lock().expect("status lock") = out;
        if let Some(tx) = &self.states {
            let states: HashMap<String, State> = self
                .m
                .insts
                .iter()
                .map(|i| (i.cfg.name.clone(), i.state))
                .collect();
            tx.send_if_modified(|s| {
                if *s != states {
                    *s = states;
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// Every instance's virtual addresses.
fn all_vips(ha: &Ha) -> Vec<IpAddr> {
    ha.instances
        .iter()
        .flat_map(|i| i.vips.iter().chain(&i.excluded_vips))
        .map(|v| v.addr)
        .collect()
}

/// Runs a program (no shell) with a timeout; logs a failure.
async fn run_program(argv: Vec<String>, user: Option<String>, timeout: Duration) -> bool {
    let nowhere = SocketAddr::from(([0, 0, 0, 0], 0));
    let o = crate::health::probe::run_command(argv.clone(), nowhere, user, timeout).await;
    if !o.ok {
        debug!(program = %argv.join(" "), detail = %o.detail, "program failed");
    }
    o.ok
}

/// A `vrrp_script`: run every interval (never overlapping), keepalived's rise/fall counter
/// (keepalived.md §3.5), each change of verdict reported.
async fn run_script(
    s: super::config::Script,
    script_user: Option<String>,
    tx: mpsc::UnboundedSender<(String, bool)>,
) {
    use crate::health::spec::{MiscProbe, Probe, Target};
    let (rise, fall) = (s.rise, s.fall);
    // r in 0..rise+fall: up when r >= rise; the first result decides (r = rise - 1), or with
    // init_fail the script starts down (r = 0).
    let mut r: u32 = if s.init_fail { 0 } else { rise - 1 };
    let mut up: Option<bool> = if s.init_fail { Some(false) } else { None };
    let probe = Probe::Misc(MiscProbe {
        argv: s.command.clone(),
        shell: false,
        dynamic: false,
        user: s.user.clone(),
        group: None,
    });
    let target = Target {
        weight: 0,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        bind: None,
        timeout: s.timeout,
        script_user,
    };
    let mut tick = tokio::time::interval(s.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = crate::health::probe::run(&probe, &target, 0).await.ok;
        let now_up = if ok {
            if r < rise.saturating_sub(1) {
                r += 1;
                up.unwrap_or(false)
            } else {
                r = rise + fall - 1;
                true
            }
        } else if r > rise {
            r -= 1;
            up.unwrap_or(true)
        } else {
            r = 0;
            false
        };
        if up != Some(now_up) {
            info!(script = %s.name, up = now_up, "vrrp_script changed");
            up = Some(now_up);
            if tx.send((s.name.clone(), now_up)).is_err() {
                return;
            }
        }
    }
}
