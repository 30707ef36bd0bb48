//! The VRRP state machine of every instance, as keepalived runs it (keepalived.md §2–3):
//! elections, preemption, priority 0 on leaving, sync groups and trackers. Pure: time comes
//! in as an argument and effects go out as [`Action`]s, so the whole behaviour is unit-tested
//! with a simulated clock; the runtime does the I/O.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{
    config::{Ha, Instance, Track},
    packet::{self, Advert},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum State {
    Init,
    Backup,
    Master,
    Fault,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Init => "INIT",
            State::Backup => "BACKUP",
            State::Master => "MASTER",
            State::Fault => "FAULT",
        }
    }
    /// The gauge value in /metrics (keepalived's SNMP numbering).
    pub fn number(self) -> u8 {
        match self {
            State::Init => 0,
            State::Backup => 1,
            State::Master => 2,
            State::Fault => 3,
        }
    }
}

/// What the runtime must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement of instance `inst` with this priority (0: leaving master).
    Advert {
        inst: usize,
        priority: u8,
    },
    /// Add (announcing them) / remove the instance's virtual addresses.
    AddVips(usize),
    RemoveVips(usize),
    /// Gratuitous ARPs / unsolicited NAs for every VIP, `repeat` each.
    Garp {
        inst: usize,
        repeat: u32,
    },
    /// The instance changed state (log, notify programs, metrics).
    Transition {
        inst: usize,
        from: State,
        to: State,
        reason: String,
    },
    /// Every member of sync group `group` is now in `state` (its notify programs).
    GroupTransition {
        group: usize,
        state: State,
    },
}

/// Why a received advertisement was not taken (counted per reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Drop {
    VersionMismatch,
    AuthMismatch,
    IntervalMismatch,
    BadTtl,
    NotFromPeer,
    WrongMode,
    Ignored,
}

impl Drop {
    pub fn name(self) -> &'static str {
        match self {
            Drop::VersionMismatch => "version_mismatch",
            Drop::AuthMismatch => "auth_mismatch",
            Drop::IntervalMismatch => "interval_mismatch",
            Drop::BadTtl => "bad_ttl",
            Drop::NotFromPeer => "not_from_peer",
            Drop::WrongMode => "wrong_mode",
            Drop::Ignored => "ignored_state",
        }
    }
}

/// One instance's running state.
#[derive(Clone, Debug)]
pub struct Inst {
    pub cfg: Instance,
    pub state: State,
    /// Effective priority (base plus trackers, 1..=254; 255 for an owner).
    pub priority: u8,
    /// Why it is in FAULT (empty otherwise).
    pub fault: Vec<String>,
    /// The address adverts are sent from (the tie-breaker), once known.
    pub source: Option<IpAddr>,
    pub master_adver_cs: u16,
    pub master: Option<(IpAddr, u8)>,
    down_at: Option<Instant>,
    advert_at: Option<Instant>,
    garp_at: Option<(Instant, u32)>,
    refresh_at: Option<Instant>,
    preempt_until: Option<Instant>,
    /// In a sync group: this member's timer expired and it waits for the others.
    want_master: bool,
    group: Option<usize>,
    pub transitions: u64,
    pub since: Option<Instant>,
    pub last_reason: String,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub priority_zero_received: u64,
    pub drops: HashMap<Drop, u64>,
}

/// Tracker inputs (true = up).
#[derive(Clone, Debug, Default)]
pub struct Trackers {
    pub scripts: HashMap<String, bool>,
    pub interfaces: HashMap<String, bool>,
    /// Per instance index: xlb's data plane as that instance tracks it.
    pub dataplane: HashMap<usize, bool>,
}

/// Every instance and sync group.
pub struct Machine {
    pub insts: Vec<Inst>,
    pub groups: Vec<(String, Vec<usize>, bool)>,
    group_cfg: Vec<crate::vrrp::config::SyncGroup>,
    pub trackers: Trackers,
    started: bool,
}

fn clamp_priority(base: u8, delta: i32) -> u8 {
    if base == 255 {
        255
    } else {
        (base as i32 + delta).clamp(1, 254) as u8
    }
}

/// A tracker's effect on priority (`Some(delta)`) or, with weight 0, whether it faults.
fn track_effect(t: &Track, up: bool) -> (i32, bool) {
    let (w, up) = if t.reverse {
        (-t.weight, !up)
    } else {
        (t.weight, up)
    };
    match w {
        0 => (0, !up),
        w if w > 0 => (if up { w } else { 0 }, false),
        w => (if up { 0 } else { w }, false),
    }
}

impl Machine {
    pub fn new(ha: &Ha) -> Self {
        let mut insts: Vec<Inst> = ha
            .instances
            .iter()
            .map(|c| Inst {
                cfg: c.clone(),
                state: State::Init,
                priority: c.priority,
                fault: Vec::new(),
                source: None,
                master_adver_cs: c.advert_int_cs,
                master: None,
                down_at: None,
                advert_at: None,
                garp_at: None,
                refresh_at: None,
                preempt_until: None,
                want_master: false,
                group: None,
                transitions: 0,
                since: None,
                last_reason: String::new(),
                adverts_sent: 0,
                adverts_received: 0,
                priority_zero_received: 0,
                drops: HashMap::new(),
            })
            .collect();
        let mut groups = Vec::new();
        for (gi, g) in ha.groups.iter().enumerate() {
            let members: Vec<usize> = g
                .members
                .iter()
                .filter_map(|m| insts.iter().position(|i| i.cfg.name == *m))
                .collect();
            for m in &members {
                insts[*m].group = Some(gi);
            }
            groups.push((g.name.clone(), members, false));
        }
        Machine {
            insts,
            groups,
            group_cfg: ha.groups.clone(),
            trackers: Trackers::default(),
            started: false,
        }
    }

    /// The time of the next timer, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.insts
            .iter()
            .flat_map(|i| [i.down_at, i.advert_at, i.garp_at.map(|g| g.0), i.refresh_at])
            .flatten()
            .min()
    }

    fn skew(&self, i: usize) -> Duration {
        let inst = &self.insts[i];
        Duration::from_micros(packet::skew_us(inst.priority, inst.master_adver_cs))
    }

    fn mdi(&self, i: usize) -> Duration {
        let inst = &self.insts[i];
        Duration::from_micros(packet::master_down_us(
            inst.priority,
            inst.master_adver_cs,
            inst.cfg.down_timer_adverts,
        ))
    }

    fn own_interval(&self, i: usize) -> Duration {
        self.insts[i].cfg.advert_interval()
    }

    /// Effective priority and fault reasons of instance `i` from the trackers.
    fn evaluate(&self, i: usize) -> (u8, Vec<String>) {
        let inst = &self.insts[i];
        let c = &inst.cfg;
        let in_group = inst.group;
        // Sync-group members ignore weights unless the group says otherwise: weighted scripts
        // are dropped, weighted interfaces fault (keepalived).
        let weights_count = in_group.is_none_or(|g| self.group_cfg[g].tracking_weight);
        let mut delta = 0i32;
        let mut fault = Vec::new();
        let t = &self.trackers;
        if inst.source.is_none() {
            fault.push(format!("no source address on {}", c.interface));
        }
        if !c.dont_track_primary && t.interfaces.get(&c.interface) == Some(&false) {
            fault.push(format!("interface {} is down", c.interface));
        }
        for v in c.vips.iter().chain(&c.excluded_vips) {
            if let Some(dev) = &v.dev
                && t.interfaces.get(dev) == Some(&false)
            {
                fault.push(format!("interface {dev} of VIP {} is down", v.addr));
            }
        }
        let group_tracks = in_group.map(|g| &self.group_cfg[g]);
        let scripts = c
            .track_scripts
            .iter()
            .chain(group_tracks.into_iter().flat_map(|g| &g.track_scripts));
        for tr in scripts {
            if tr.weight != 0 && !weights_count {
                continue;
            }
            let Some(&up) = t.scripts.get(&tr.name) else {
                continue;
            };
            let (d, f) = track_effect(tr, up);
            delta += d;
            if f {
                fault.push(format!("track_script {} is down", tr.name));
            }
        }
        let ifaces = c
            .track_interfaces
            .iter()
            .chain(group_tracks.into_iter().flat_map(|g| &g.track_interfaces));
        for tr in ifaces {
            let Some(&up) = t.interfaces.get(&tr.name) else {
                continue;
            };
            let tr = if weights_count {
                tr.clone()
            } else {
                Track {
                    weight: 0,
                    ..tr.clone()
                }
            };
            let (d, f) = track_effect(&tr, up);
            delta += d;
            if f {
                fault.push(format!("track_interface {} is down", tr.name));
            }
        }
        if let Some(dp) = &c.track_dataplane
            && let Some(&up) = t.dataplane.get(&i)
        {
            let tr = Track {
                name: "dataplane".into(),
                weight: if weights_count { dp.weight } else { 0 },
                reverse: dp.reverse,
            };
            let (d, f) = track_effect(&tr, up);
            delta += d;
            if f {
                fault.push("xlb's data plane is down".into());
            }
        }
        (clamp_priority(c.priority, delta), fault)
    }

    fn transition(
        &mut self,
        i: usize,
        to: State,
        reason: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let from = self.insts[i].state;
        if from == to {
            return;
        }
        let inst = &mut self.insts[i];
        inst.state = to;
        inst.transitions += 1;
        inst.since = Some(now);
        inst.last_reason = reason.clone();
        out.push(Action::Transition {
            inst: i,
            from,
            to,
            reason,
        });
        if let Some(g) = inst.group {
            let all = self.groups[g].1.iter().all(|m| self.insts[*m].state == to);
            if all {
                out.push(Action::GroupTransition {
                    group: g,
                    state: to,
                });
            }
        }
    }

    fn enter_backup(&mut self, i: usize, now: Instant, reason: String, out: &mut Vec<Action>) {
        let was_master = self.insts[i].state == State::Master;
        if was_master {
            out.push(Action::RemoveVips(i));
        }
        let inst = &mut self.insts[i];
        inst.advert_at = None;
        inst.garp_at = None;
        inst.refresh_at = None;
        inst.preempt_until = None;
        inst.want_master = false;
        let mdi = self.mdi(i);
        self.insts[i].down_at = Some(now + mdi);
        self.transition(i, State::Backup, reason, now, out);
    }

    fn become_master(&mut self, i: usize, now: Instant, reason: String, out: &mut Vec<Action>) {
        let prio = self.insts[i].priority;
        // The advert first, so the old master can drop the VIPs (keepalived's order).
        self.advertise(i, prio, out);
        out.push(Action::AddVips(i));
        let g = self.insts[i].cfg.garp;
        out.push(Action::Garp {
            inst: i,
            repeat: g.master_repeat,
        });
        let own = self.own_interval(i);
        let inst = &mut self.insts[i];
        inst.master_adver_cs = inst.cfg.advert_int_cs;
        inst.down_at = None;
        inst.want_master = false;
        inst.master = inst.source.map(|s| (s, prio));
        inst.advert_at = Some(now + own);
        inst.garp_at = (!g.master_delay.is_zero()).then(|| (now + g.master_delay, g.master_repeat));
        inst.refresh_at = g.master_refresh.map(|r| now + g.master_delay + r);
        self.transition(i, State::Master, reason, now, out);
    }

    /// Instance `i` sends an advertisement with `priority`.
    fn advertise(&mut self, i: usize, priority: u8, out: &mut Vec<Action>) {
        out.push(Action::Advert { inst: i, priority });
        self.insts[i].adverts_sent += 1;
    }

    /// A master advertises its priority now; the next advert is one interval away.
    fn readvertise(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        let iv = self.own_interval(i);
        self.advertise(i, self.insts[i].priority, out);
        self.insts[i].advert_at = Some(now + iv);
    }

    fn enter_fault(&mut self, i: usize, now: Instant, reason: String, out: &mut Vec<Action>) {
        if self.insts[i].state == State::Master {
            // keepalived sends two priority-0 adverts back to back, then lets go.
            for _ in 0..2 {
                self.advertise(i, 0, out);
            }
            out.push(Action::RemoveVips(i));
        }
        self.clear_timers(i);
        self.transition(i, State::Fault, reason, now, out);
    }

    /// No timer of instance `i` runs (FAULT, stopped).
    fn clear_timers(&mut self, i: usize) {
        let inst = &mut self.insts[i];
        inst.down_at = None;
        inst.advert_at = None;
        inst.garp_at = None;
        inst.refresh_at = None;
        inst.want_master = false;
    }

    /// Starts every instance (keepalived's `vrrp_init_state`).
    /// `resume[i]`: instance `i` was master in the daemon this one takes over from (its
    /// addresses are still in place): it stays master without an election, so an upgrade
    /// does not move the VIPs (a peer that became master meanwhile is settled by the
    /// adverts, as between any two masters).
    pub fn start(&mut self, now: Instant, resume: &[bool]) -> Vec<Action> {
        let mut out = Vec::new();
        self.started = true;
        for i in 0..self.insts.len() {
            let (prio, fault) = self.evaluate(i);
            self.insts[i].priority = prio;
            self.insts[i].fault = fault.clone();
            if !fault.is_empty() {
                if resume.get(i) == Some(&true) {
                    // The previous daemon's addresses are still in place: let go of them.
                    out.push(Action::RemoveVips(i));
                }
                self.enter_fault(i, now, fault.join("; "), &mut out);
            } else if resume.get(i) == Some(&true) {
                self.become_master(i, now, "resumed from the previous daemon".into(), &mut out);
            } else if self.insts[i].priority == 255 && self.insts[i].cfg.initial_master {
                // An owner takes over at once: BACKUP with an expired timer, without the
                // BACKUP notification (keepalived), so a sync group sees it wanting MASTER.
                self.insts[i].state = State::Backup;
                self.insts[i].want_master = true;
                self.insts[i].down_at = Some(now);
            } else {
                self.enter_backup(i, now, "starting".into(), &mut out);
            }
        }
        self.sync_groups(now, &mut out);
        out
    }

    /// Sync groups: one member in FAULT faults them all.
    fn sync_groups(&mut self, now: Instant, out: &mut Vec<Action>) {
        for g in 0..self.groups.len() {
            let members = self.groups[g].1.clone();
            if let Some(f) = members
                .iter()
                .find(|m| self.insts[**m].state == State::Fault)
            {
                let name = self.insts[*f].cfg.name.clone();
                for m in members {
                    if self.insts[m].state != State::Fault {
                        self.enter_fault(
                            m,
                            now,
                            format!("sync group member {name} is in FAULT"),
                            out,
                        );
                    }
                }
            }
        }
    }

    /// Whether member `i` may become master now: every other member of its group wants to.
    fn group_allows_master(&self, i: usize) -> bool {
        let Some(g) = self.insts[i].group else {
            return true;
        };
        self.groups[g].1.iter().all(|m| {
            *m == i
                || self.insts[*m].state == State::Master
                || (self.insts[*m].state == State::Backup && self.insts[*m].want_master)
        })
    }

    /// Fires every timer due at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 0..self.insts.len() {
            let inst = &self.insts[i];
            if inst.down_at.is_some_and(|t| t <= now) {
                if inst.state == State::Fault {
                    self.insts[i].down_at = None;
                    continue;
                }
                if !self.group_allows_master(i) {
                    // Wait for the others: re-arm for one interval plus 1/256 of one.
                    let iv = self.own_interval(i);
                    let inst = &mut self.insts[i];
                    inst.want_master = true;
                    inst.down_at = Some(now + iv + iv / 256);
                    continue;
                }
                let reason = if self.insts[i].priority == 255 && self.insts[i].transitions == 0 {
                    "address owner".to_string()
                } else {
                    let local = self.insts[i].priority;
                    match self.insts[i].master {
                        Some((a, 0)) => format!("master {a} stopped (priority 0)"),
                        Some((a, p)) if p < local => {
                            format!("preempting master {a} (priority {p} < {local})")
                        }
                        Some((a, _)) => format!(
                            "no advertisement from master {a} within the master down interval"
                        ),
                        None => "no master heard within the master down interval".to_string(),
                    }
                };
                self.become_master(i, now, reason, &mut out);
                // The rest of the group follows.
                if let Some(g) = self.insts[i].group {
                    let name = self.insts[i].cfg.name.clone();
                    for m in self.groups[g].1.clone() {
                        if m != i && self.insts[m].state == State::Backup {
                            self.become_master(
                                m,
                                now,
                                format!("sync group member {name} became master"),
                                &mut out,
                            );
                        }
                    }
                }
                continue;
            }
            if inst.state == State::Master {
                if inst.advert_at.is_some_and(|t| t <= now) {
                    self.readvertise(i, now, &mut out);
                }
                let inst = &mut self.insts[i];
                if let Some((t, repeat)) = inst.garp_at
                    && t <= now
                {
                    out.push(Action::Garp { inst: i, repeat });
                    inst.garp_at = None;
                }
                if let Some(t) = inst.refresh_at
                    && t <= now
                {
                    out.push(Action::Garp {
                        inst: i,
                        repeat: inst.cfg.garp.master_refresh_repeat,
                    });
                    inst.refresh_at = inst.cfg.garp.master_refresh.map(|r| now + r);
                }
            }
        }
        out
    }

    /// Checks what keepalived checks against the instance's own settings (§1.7, after the
    /// packet's own validity): `None` if the advert is to be processed.
    pub fn screen(
        &self,
        i: usize,
        adv: &Advert,
        src: IpAddr,
        ttl: Option<u8>,
        multicast: bool,
    ) -> Option<Drop> {
        let inst = &self.insts[i];
        let c = &inst.cfg;
        if matches!(inst.state, State::Fault | State::Init) {
            return Some(Drop::Ignored);
        }
        if multicast == c.unicast() {
            return Some(Drop::WrongMode);
        }
        if multicast && ttl.is_some_and(|t| t != 255) {
            return Some(Drop::BadTtl);
        }
        if adv.version != c.version {
            return Some(Drop::VersionMismatch);
        }
        if c.version == 2 {
            if adv.auth != c.auth_pass {
                return Some(Drop::AuthMismatch);
            }
            if adv.interval_cs != c.advert_int_cs {
                return Some(Drop::IntervalMismatch);
            }
        }
        if c.unicast() && c.check_unicast_src && !c.unicast_peers.contains(&src) {
            return Some(Drop::NotFromPeer);
        }
        None
    }

    /// A received advertisement for instance `i` (already screened).
    pub fn advert(&mut self, i: usize, now: Instant, src: IpAddr, adv: &Advert) -> Vec<Action> {
        let mut out = Vec::new();
        self.insts[i].adverts_received += 1;
        if adv.priority == 0 {
            self.insts[i].priority_zero_received += 1;
        }
        let local = self.insts[i].priority;
        match self.insts[i].state {
            State::Backup => {
                if adv.priority == 0 {
                    // The master is leaving: take over after Skew_Time.
                    let skew = self.skew(i);
                    let inst = &mut self.insts[i];
                    inst.down_at = Some(now + skew);
                    inst.master = Some((src, 0));
                    return out;
                }
                let c = &self.insts[i].cfg;
                let mut accept = c.nopreempt || adv.priority >= local;
                if !accept && !c.preempt_delay.is_zero() {
                    let delay = c.preempt_delay;
                    let inst = &mut self.insts[i];
                    let until = *inst.preempt_until.get_or_insert(now + delay);
                    accept = now < until;
                }
                if adv.priority >= local {
                    self.insts[i].preempt_until = None;
                }
                if !accept {
                    // Discarded (this node will preempt), but it is the master heard.
                    self.insts[i].master = Some((src, adv.priority));
                }
                if accept {
                    let inst = &mut self.insts[i];
                    if inst.cfg.version == 3 {
                        inst.master_adver_cs = adv.interval_cs;
                    }
                    inst.master = Some((src, adv.priority));
                    inst.want_master = false;
                    let mdi = self.mdi(i);
                    self.insts[i].down_at = Some(now + mdi);
                }
                // Otherwise the deadline stands: this node will preempt.
            }
            State::Master => {
                if adv.priority == 0 {
                    self.readvertise(i, now, &mut out);
                    return out;
                }
                let own = self.insts[i].source;
                let higher = adv.priority > local
                    || (adv.priority == local && own.is_some_and(|o| ip_greater(src, o)));
                if higher {
                    if self.insts[i].cfg.higher_prio_send_advert {
                        self.advertise(i, local, &mut out);
                    }
                    if self.insts[i].cfg.version == 3 {
                        self.insts[i].master_adver_cs = adv.interval_cs;
                    }
                    self.insts[i].master = Some((src, adv.priority));
                    let reason = format!(
                        "advertisement from {src} with {} priority {}",
                        if adv.priority > local {
                            "higher"
                        } else {
                            "equal"
                        },
                        adv.priority
                    );
                    self.enter_backup(i, now, reason.clone(), &mut out);
                    if let Some(g) = self.insts[i].group {
                        let name = self.insts[i].cfg.name.clone();
                        for m in self.groups[g].1.clone() {
                            if m != i && self.insts[m].state == State::Master {
                                self.enter_backup(
                                    m,
                                    now,
                                    format!("sync group member {name} became backup"),
                                    &mut out,
                                );
                            }
                        }
                    }
                } else if own == Some(src) {
                    // Our own advert looped back: nothing to do.
                } else if !self.insts[i].cfg.lower_prio_no_advert {
                    // Reassert at once (RFC 9568, keepalived's default) and re-announce.
                    self.readvertise(i, now, &mut out);
                    let g = self.insts[i].cfg.garp;
                    if g.lower_prio_repeat > 0 {
                        out.push(Action::Garp {
                            inst: i,
                            repeat: g.lower_prio_repeat,
                        });
                        if !g.lower_prio_delay.is_zero() {
                            self.insts[i].garp_at =
                                Some((now + g.lower_prio_delay, g.lower_prio_repeat));
                        }
                    }
                }
            }
            State::Fault | State::Init => {}
        }
        out
    }

    /// Re-evaluates trackers after any of them changed.
    pub fn retrack(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.started {
            return out;
        }
        for i in 0..self.insts.len() {
            let (prio, fault) = self.evaluate(i);
            let old = self.insts[i].priority;
            if prio != old {
                self.insts[i].priority = prio;
                // A backup's running deadline moves by the change of skew.
                if self.insts[i].state == State::Backup
                    && let Some(d) = self.insts[i].down_at
                {
                    let old_skew =
                        Duration::from_micros(packet::skew_us(old, self.insts[i].master_adver_cs));
                    let new_skew = self.skew(i);
                    let moved = d.checked_sub(old_skew).map_or(d, |t| t + new_skew);
                    self.insts[i].down_at = Some(moved.max(now));
                }
                tracing::info!(instance = %self.insts[i].cfg.name, from = old, to = prio, "VRRP priority changed");
            }
            let was_fault = self.insts[i].state == State::Fault;
            self.insts[i].fault = fault.clone();
            if !fault.is_empty() && !was_fault {
                self.enter_fault(i, now, fault.join("; "), &mut out);
            } else if fault.is_empty() && was_fault && !self.group_member_faulted(i) {
                self.leave_fault(i, now, &mut out);
            }
        }
        self.sync_groups(now, &mut out);
        out
    }

    fn group_member_faulted(&self, i: usize) -> bool {
        self.insts[i].group.is_some_and(|g| {
            self.groups[g]
                .1
                .iter()
                .any(|m| !self.insts[*m].fault.is_empty())
        })
    }

    fn leave_fault(&mut self, i: usize, now: Instant, out: &mut Vec<Action>) {
        if let Some(g) = self.insts[i].group {
            // The whole group leaves FAULT together.
            for m in self.groups[g].1.clone() {
                if self.insts[m].state == State::Fault {
                    self.enter_backup(m, now, "trackers are up again".into(), out);
                }
            }
        } else {
            self.enter_backup(i, now, "trackers are up again".into(), out);
        }
    }

    /// A clean stop: masters send priority 0 so a backup takes over after its skew time.
    pub fn shutdown(&mut self, _now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 0..self.insts.len() {
            if self.insts[i].state == State::Master {
                self.advertise(i, 0, &mut out);
                out.push(Action::RemoveVips(i));
            }
            self.clear_timers(i);
            let inst = &mut self.insts[i];
            let from = inst.state;
            inst.state = State::Init;
            if from != State::Init {
                out.push(Action::Transition {
                    inst: i,
                    from,
                    to: State::Init,
                    reason: "stopping".into(),
                });
            }
        }
        for g in 0..self.groups.len() {
            out.push(Action::GroupTransition {
                group: g,
                state: State::Init,
            });
        }
        out
    }
}

/// Numeric comparison of addresses (keepalived's tie-break on the packet's source).
fn ip_greater(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) > u32::from(b),
        (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) > u128::from(b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vrrp::config::{self, Garp, Notify, Vip};

    fn instance(name: &str, prio: u8) -> Instance {
        Instance {
            name: name.into(),
            interface: "eth0".into(),
            vrid: 51,
            priority: prio,
            initial_master: false,
            version: 2,
            advert_int_cs: 100,
            nopreempt: false,
            preempt_delay: Duration::ZERO,
            auth_pass: None,
            mcast_src_ip: None,
            unicast_src_ip: None,
            unicast_peers: vec![],
            unicast_ttl: None,
            check_unicast_src: false,
            vips: vec![Vip {
                addr: "10.9.0.100".parse().unwrap(),
                prefix: 24,
                dev: None,
            }],
            excluded_vips: vec![],
            garp: Garp::default(),
            lower_prio_no_advert: false,
            higher_prio_send_advert: false,
            v3_checksum_as_v2: false,
            down_timer_adverts: 3,
            dont_track_primary: false,
            track_scripts: vec![],
            track_interfaces: vec![],
            track_dataplane: None,
            notify: Notify::default(),
        }
    }

    /// A node: its machine and source address.
    struct Node {
        m: Machine,
        src: IpAddr,
        up: bool,
        log: Vec<(Duration, Action)>,
    }

    fn node(ha: Ha, src: &str) -> Node {
        let mut m = Machine::new(&ha);
        let src: IpAddr = src.parse().unwrap();
        for i in &mut m.insts {
            i.source = Some(src);
        }
        Node {
            m,
            src,
            up: false,
            log: vec![],
        }
    }

    fn ha(insts: Vec<Instance>) -> Ha {
        Ha {
            instances: insts,
            ..Ha::default()
        }
    }

    /// Runs nodes in 1 ms steps from `from` to `to`, delivering adverts between them.
    fn run(nodes: &mut [Node], t0: Instant, from: Duration, to: Duration) {
        let mut t = from;
        while t < to {
            let now = t0 + t;
            let mut sent = Vec::new();
            for (n, node) in nodes.iter_mut().enumerate() {
                if !node.up {
                    continue;
                }
                let acts = node.m.tick(now);
                for a in acts {
                    if let Action::Advert { inst, priority } = a {
                        let c = &node.m.insts[inst].cfg;
                        sent.push((
                            n,
                            Advert {
                                version: c.version,
                                vrid: c.vrid,
                                priority,
                                interval_cs: c.advert_int_cs,
                                auth: c.auth_pass,
                                addrs: c.vips.iter().map(|v| v.addr).collect(),
                            },
                            node.src,
                        ));
                    }
                    node.log.push((t, a));
                }
            }
            deliver(nodes, now, t, sent);
            t += Duration::from_millis(1);
        }
    }

    fn deliver(
        nodes: &mut [Node],
        now: Instant,
        t: Duration,
        mut sent: Vec<(usize, Advert, IpAddr)>,
    ) {
        while let Some((from, adv, src)) = sent.pop() {
            for (n, node) in nodes.iter_mut().enumerate() {
                if n == from || !node.up {
                    continue;
                }
                for i in 0..node.m.insts.len() {
                    if node.m.insts[i].cfg.vrid != adv.vrid
                        || node.m.screen(i, &adv, src, Some(255), true).is_some()
                    {
                        continue;
                    }
                    for a in node.m.advert(i, now, src, &adv) {
                        if let Action::Advert { inst, priority } = a {
                            let c = &node.m.insts[inst].cfg;
                            sent.push((
                                n,
                                Advert {
                                    priority,
                                    vrid: c.vrid,
                                    ..adv.clone()
                                },
                                node.src,
                            ));
                        }
                        node.log.push((t, a));
                    }
                }
            }
        }
    }

    fn start(node: &mut Node, t0: Instant, t: Duration) {
        node.up = true;
        for a in node.m.start(t0 + t, &[]) {
            node.log.push((t, a));
        }
    }

    fn became(node: &Node, to: State) -> Vec<Duration> {
        node.log
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Transition { to: s, .. } if *s == to => Some(*t),
                _ => None,
            })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn lone_backup_becomes_master_after_master_down_interval() {
        let t0 = Instant::now();
        let mut nodes = [node(ha(vec![instance("VI_1", 100)]), "10.9.0.2")];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        // MDI(100, 1 s) = 3.609375 s.
        assert_eq!(became(&nodes[0], State::Master), vec![ms(3610)]);
        assert_eq!(became(&nodes[0], State::Backup), vec![ms(0)]);
        let adverts = nodes[0]
            .log
            .iter()
            .filter(|(_, a)| matches!(a, Action::Advert { priority: 100, .. }))
            .count();
        assert_eq!(adverts, 2, "{:?}", nodes[0].log);
    }

    #[test]
    fn a_resumed_master_stays_master_without_an_election() {
        let t0 = Instant::now();
        let mut n = node(ha(vec![instance("VI_1", 100)]), "10.9.0.2");
        n.up = true;
        let acts = n.m.start(t0, &[true]);
        assert_eq!(n.m.insts[0].state, State::Master);
        assert_eq!(
            acts[..3],
            [
                Action::Advert {
                    inst: 0,
                    priority: 100
                },
                Action::AddVips(0),
                Action::Garp { inst: 0, repeat: 5 }
            ]
        );
    }

    #[test]
    fn an_owner_in_a_sync_group_waits_for_the_group_then_all_go_master() {
        let t0 = Instant::now();
        let mut owner = instance("VI_1", 255);
        owner.initial_master = true;
        let mut other = instance("VI_2", 100);
        other.vrid = 52;
        let mut h = ha(vec![owner, other]);
        h.groups.push(config::SyncGroup {
            name: "G".into(),
            members: vec!["VI_1".into(), "VI_2".into()],
            ..Default::default()
        });
        let mut nodes = [node(h, "10.9.0.2")];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        // The other member's timer (MDI(100)) decides; the owner goes with it.
        assert!(nodes[0].m.insts.iter().all(|i| i.state == State::Master));
        assert_eq!(became(&nodes[0], State::Master), vec![ms(3610), ms(3610)]);
    }

    #[test]
    fn garp_bursts_follow_garp_master_options() {
        let t0 = Instant::now();
        let mut i = instance("VI_1", 100);
        i.garp = Garp {
            master_delay: Duration::from_secs(2),
            master_repeat: 3,
            master_refresh: Some(Duration::from_secs(4)),
            master_refresh_repeat: 2,
            lower_prio_repeat: 1,
            lower_prio_delay: Duration::from_secs(1),
        };
        let mut nodes = [node(ha(vec![i]), "10.9.0.2")];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(12000));
        let garps: Vec<(Duration, u32)> = nodes[0]
            .log
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Garp { repeat, .. } => Some((*t, *repeat)),
                _ => None,
            })
            .collect();
        // Master at 3.61 s: a burst of 3 at once, 3 more after the 2 s delay, then 2 every
        // 4 s from delay + refresh.
        assert_eq!(garps, vec![(ms(3610), 3), (ms(5610), 3), (ms(9610), 2)]);
        // A lower priority heard: an advert at once, a burst of 1, another 1 s later.
        let now = t0 + ms(12000);
        let low = Advert {
            version: 2,
            vrid: 51,
            priority: 50,
            interval_cs: 100,
            auth: None,
            addrs: vec![],
        };
        let acts = nodes[0].m.advert(0, now, "10.9.0.9".parse().unwrap(), &low);
        assert_eq!(
            acts,
            vec![
                Action::Advert {
                    inst: 0,
                    priority: 100
                },
                Action::Garp { inst: 0, repeat: 1 }
            ]
        );
        let later = nodes[0].m.tick(now + ms(1000));
        assert!(
            later.contains(&Action::Garp { inst: 0, repeat: 1 }),
            "{later:?}"
        );
    }

    #[test]
    fn owner_takes_over_at_once() {
        let t0 = Instant::now();
        let mut i = instance("VI_1", 255);
        i.initial_master = true;
        let mut nodes = [node(ha(vec![i]), "10.9.0.2")];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(10));
        assert_eq!(became(&nodes[0], State::Master), vec![ms(0)]);
        assert!(became(&nodes[0], State::Backup).is_empty());
    }

    #[test]
    fn higher_priority_preempts_and_the_old_master_yields_without_priority_zero() {
        let t0 = Instant::now();
        let mut nodes = [
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.2"),
            node(ha(vec![instance("VI_1", 150)]), "10.9.0.1"),
        ];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        start(&mut nodes[1], t0, ms(5000));
        run(&mut nodes, t0, ms(5000), ms(12000));
        // MDI(150) = 3.414 s after its start.
        assert_eq!(became(&nodes[1], State::Master), vec![ms(8415)]);
        assert_eq!(became(&nodes[0], State::Backup), vec![ms(0), ms(8415)]);
        assert!(
            !nodes[0]
                .log
                .iter()
                .any(|(_, a)| matches!(a, Action::Advert { priority: 0, .. }))
        );
    }

    #[test]
    fn nopreempt_keeps_the_running_master() {
        let t0 = Instant::now();
        let mut hi = instance("VI_1", 150);
        hi.nopreempt = true;
        let mut nodes = [
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.2"),
            node(ha(vec![hi]), "10.9.0.1"),
        ];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        start(&mut nodes[1], t0, ms(5000));
        run(&mut nodes, t0, ms(5000), ms(15000));
        assert!(became(&nodes[1], State::Master).is_empty());
        assert_eq!(became(&nodes[0], State::Master).len(), 1);
    }

    #[test]
    fn preempt_delay_postpones_the_takeover() {
        let t0 = Instant::now();
        let mut hi = instance("VI_1", 150);
        hi.preempt_delay = Duration::from_secs(5);
        let mut nodes = [
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.2"),
            node(ha(vec![hi]), "10.9.0.1"),
        ];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        start(&mut nodes[1], t0, ms(5000));
        run(&mut nodes, t0, ms(5000), ms(20000));
        let t = became(&nodes[1], State::Master);
        assert_eq!(t.len(), 1);
        // The first lower advert (5.61 s) opens a 5 s window; the last one accepted is at
        // 9.61 s, and the takeover one MDI (3.414 s) after it.
        assert_eq!(t, vec![ms(13025)]);
    }

    #[test]
    fn priority_zero_hands_over_after_skew_time() {
        let t0 = Instant::now();
        let mut nodes = [
            node(ha(vec![instance("VI_1", 150)]), "10.9.0.1"),
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.2"),
        ];
        start(&mut nodes[0], t0, ms(0));
        start(&mut nodes[1], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(6000));
        assert_eq!(became(&nodes[0], State::Master), vec![ms(3415)]);
        let now = t0 + ms(6000);
        let acts = nodes[0].m.shutdown(now);
        nodes[0].up = false;
        assert_eq!(
            acts[..2],
            [
                Action::Advert {
                    inst: 0,
                    priority: 0
                },
                Action::RemoveVips(0)
            ]
        );
        let adv = Advert {
            version: 2,
            vrid: 51,
            priority: 0,
            interval_cs: 100,
            auth: None,
            addrs: vec![],
        };
        let src: IpAddr = "10.9.0.1".parse().unwrap();
        assert!(nodes[1].m.advert(0, now, src, &adv).is_empty());
        run(&mut nodes, t0, ms(6000), ms(8000));
        // Skew(100) = 0.609 s.
        assert_eq!(became(&nodes[1], State::Master), vec![ms(6610)]);
    }

    #[test]
    fn equal_priority_goes_to_the_higher_address() {
        let t0 = Instant::now();
        let mut nodes = [
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.1"),
            node(ha(vec![instance("VI_1", 100)]), "10.9.0.2"),
        ];
        start(&mut nodes[0], t0, ms(0));
        start(&mut nodes[1], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(10000));
        // Both time out together; the lower address yields on the other's advert.
        assert_eq!(became(&nodes[1], State::Master).len(), 1);
        assert_eq!(became(&nodes[0], State::Master).len(), 1);
        assert_eq!(nodes[0].m.insts[0].state, State::Backup);
        assert_eq!(nodes[1].m.insts[0].state, State::Master);
    }

    #[test]
    fn script_weights_lower_priority_and_weight_zero_faults() {
        let t0 = Instant::now();
        let mut i = instance("VI_1", 150);
        i.track_scripts = vec![
            Track {
                name: "chk".into(),
                weight: -60,
                reverse: false,
            },
            Track {
                name: "must".into(),
                weight: 0,
                reverse: false,
            },
        ];
        let mut n = node(ha(vec![i]), "10.9.0.1");
        n.m.trackers.scripts.insert("chk".into(), true);
        n.m.trackers.scripts.insert("must".into(), true);
        start(&mut n, t0, ms(0));
        assert_eq!(n.m.insts[0].priority, 150);
        n.m.trackers.scripts.insert("chk".into(), false);
        n.m.retrack(t0 + ms(10));
        assert_eq!(n.m.insts[0].priority, 90);
        n.m.trackers.scripts.insert("must".into(), false);
        let acts = n.m.retrack(t0 + ms(20));
        assert_eq!(n.m.insts[0].state, State::Fault);
        assert!(matches!(
            acts[0],
            Action::Transition {
                to: State::Fault,
                ..
            }
        ));
        n.m.trackers.scripts.insert("must".into(), true);
        n.m.retrack(t0 + ms(30));
        assert_eq!(n.m.insts[0].state, State::Backup);
    }

    #[test]
    fn fault_of_a_master_sends_priority_zero() {
        let t0 = Instant::now();
        let mut n = node(ha(vec![instance("VI_1", 100)]), "10.9.0.1");
        start(&mut n, t0, ms(0));
        n.m.tick(t0 + ms(4000));
        assert_eq!(n.m.insts[0].state, State::Master);
        n.m.trackers.interfaces.insert("eth0".into(), false);
        let acts = n.m.retrack(t0 + ms(4100));
        assert_eq!(
            acts[..3],
            [
                Action::Advert {
                    inst: 0,
                    priority: 0
                },
                Action::Advert {
                    inst: 0,
                    priority: 0
                },
                Action::RemoveVips(0)
            ]
        );
    }

    #[test]
    fn sync_group_members_fail_over_together() {
        let t0 = Instant::now();
        let mut a2 = instance("VI_2", 100);
        a2.vrid = 52;
        let mut b2 = instance("VI_2", 150);
        b2.vrid = 52;
        let group = config::SyncGroup {
            name: "G".into(),
            members: vec!["VI_1".into(), "VI_2".into()],
            ..Default::default()
        };
        let mut ha_a = ha(vec![instance("VI_1", 100), a2]);
        ha_a.groups.push(group.clone());
        let mut ha_b = ha(vec![instance("VI_1", 150), b2]);
        ha_b.groups.push(group);
        let mut nodes = [node(ha_a, "10.9.0.2"), node(ha_b, "10.9.0.1")];
        start(&mut nodes[0], t0, ms(0));
        run(&mut nodes, t0, ms(0), ms(5000));
        assert!(nodes[0].m.insts.iter().all(|i| i.state == State::Master));
        assert!(nodes[0].log.iter().any(|(_, a)| *a
            == Action::GroupTransition {
                group: 0,
                state: State::Master
            }));
        start(&mut nodes[1], t0, ms(5000));
        run(&mut nodes, t0, ms(5000), ms(10000));
        assert!(nodes[1].m.insts.iter().all(|i| i.state == State::Master));
        assert!(nodes[0].m.insts.iter().all(|i| i.state == State::Backup));
        // One member faulting faults the group: node b lets go of both.
        nodes[1].m.trackers.interfaces.insert("eth0".into(), false);
        let now = t0 + ms(10000);
        nodes[1].m.retrack(now);
        assert!(nodes[1].m.insts.iter().all(|i| i.state == State::Fault));
    }

    #[test]
    fn v2_screening_drops_mismatched_adverts() {
        let mut i = instance("VI_1", 100);
        i.auth_pass = Some(*b"secret12");
        let mut m = Machine::new(&ha(vec![i]));
        m.insts[0].source = Some("10.9.0.2".parse().unwrap());
        m.start(Instant::now(), &[]);
        let src: IpAddr = "10.9.0.1".parse().unwrap();
        let good = Advert {
            version: 2,
            vrid: 51,
            priority: 100,
            interval_cs: 100,
            auth: Some(*b"secret12"),
            addrs: vec![],
        };
        assert_eq!(m.screen(0, &good, src, Some(255), true), None);
        let bad = |f: &dyn Fn(&mut Advert)| {
            let mut a = good.clone();
            f(&mut a);
            a
        };
        assert_eq!(
            m.screen(0, &bad(&|a| a.auth = None), src, Some(255), true),
            Some(Drop::AuthMismatch)
        );
        assert_eq!(
            m.screen(0, &bad(&|a| a.interval_cs = 200), src, Some(255), true),
            Some(Drop::IntervalMismatch)
        );
        assert_eq!(
            m.screen(0, &bad(&|a| a.version = 3), src, Some(255), true),
            Some(Drop::VersionMismatch)
        );
        assert_eq!(m.screen(0, &good, src, Some(254), true), Some(Drop::BadTtl));
        assert_eq!(
            m.screen(0, &good, src, Some(255), false),
            Some(Drop::WrongMode)
        );
    }
}
