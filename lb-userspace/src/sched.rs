//! Scheduler tables for the data plane, computed so that the XDP program's decisions are
//! exactly IPVS's.
//!
//! The data plane keeps one shared pick counter per service and reads slot
//! `(picks + offset) % len` of the service's slot table for every new flow. This module builds
//! that table and the offset:
//!
//! * **rr**: the servers with weight > 0 in IPVS list order; IPVS's cursor (the server picked
//!   last) becomes the offset.
//! * **wrr**: one complete IPVS wrr cycle (pass by pass: current weight `cw` from `mw` down by
//!   the gcd `di`; each pass takes, in list order, every server whose weight ≥ `cw`).
//!
//! IPVS keeps scheduler state across configuration changes (rr's cursor; wrr's `cw`, adjusted
//! by `ip_vs_wrr_dest_changed`). [`Sequencer::change`] recovers that state from the pick
//! counter and replays the change event by event, so the sequence continues where IPVS's
//! would. "List order" is IPVS's: a new server goes to the head of the list, so the list is
//! the reverse of the order servers were added.
//!
//! [`model`] is a plain step-by-step implementation of the IPVS rules used to check all of
//! this (and, through packet tests, the XDP program).

use std::{collections::HashMap, net::IpAddr};

use lb_common::hash::{MH_DEFAULT_SIZE, MH_KEY1, MH_KEY2, MH_PRIMES, SH_DH_SIZE, mh_hash};

use crate::config::Scheduler;

/// Identity of a real server within a service.
pub type DestId = (IpAddr, u16);

/// A real server as the schedulers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dest {
    pub id: DestId,
    pub weight: u32,
}

/// IPVS scheduler state that survives a configuration change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Resume {
    /// rr: the server returned last (`None` = the list head).
    Rr { cursor: Option<DestId> },
    /// wrr: the current weight `cw` (the cursor is reset to the head on every change).
    Wrr { cw: i64 },
    /// sh, dh, mh: the table is a function of the servers; nothing to carry over.
    Hash,
}

/// What the data plane must hold for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Table {
    /// Slot table.
    #[serde(with = "compact_dests")]
    pub slots: Vec<DestId>,
    /// Offset added to the pick counter.
    pub offset: u32,
}

/// Slot tables repeat a few servers many times (mh: thousands of slots): saved as the
/// distinct servers plus one small index per slot.
mod compact_dests {
    use super::DestId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Compact {
        dests: Vec<DestId>,
        slots: Vec<u32>,
    }

    pub fn serialize<S: Serializer>(v: &[DestId], s: S) -> Result<S::Ok, S::Error> {
        let mut dests: Vec<DestId> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let slots = v
            .iter()
            .map(|d| {
                *index.entry(*d).or_insert_with(|| {
                    dests.push(*d);
                    dests.len() as u32 - 1
                })
            })
            .collect();
        Compact { dests, slots }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DestId>, D::Error> {
        let c = Compact::deserialize(d)?;
        c.slots
            .iter()
            .map(|i| {
                c.dests
                    .get(*i as usize)
                    .copied()
                    .ok_or_else(|| serde::de::Error::custom(format!("slot names server {i}")))
            })
            .collect()
    }
}

/// A map with tuple keys, saved as a list of pairs (JSON keys are strings).
mod pairs {
    use std::{collections::HashMap, hash::Hash};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &HashMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Largest table one service may use (wrr cycles grow with the weights).
pub const MAX_TABLE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    #[error(
        "the wrr cycle of these weights needs {0} slots (sum of weight/gcd), more than the {1} allowed per service; use weights with a larger common divisor or smaller ones"
    )]
    CycleTooLong(u64, usize),
    #[error(
        "mh cannot balance {0} real servers over a {1}-slot table (IPVS refuses more servers than slots)"
    )]
    MhTooManyServers(usize, u32),
}

/// Per-service scheduler bookkeeping of the controller (saved across restarts, see
/// `Engine::snapshot`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Sequencer {
    scheduler: Scheduler,
    /// IPVS list order.
    list: Vec<Dest>,
    #[serde(with = "compact_dests")]
    table: Vec<DestId>,
    /// wrr: the pass (cw) each table position belongs to.
    table_cw: Vec<i64>,
    offset: u32,
    /// Pick counter value when the table was installed.
    picks_at_install: u64,
    /// State at install time, before any pick from the new table.
    installed: Resume,
    /// A new scheduler was bound to existing servers and has no table yet.
    rebound: bool,
    /// Last non-zero weight of each server (IPVS `last_weight`; mh builds its table from it).
    #[serde(with = "pairs")]
    last_weights: HashMap<DestId, u32>,
    /// mh's table size (a prime).
    mh_size: u32,
}

impl Sequencer {
    /// A new service without real servers, as `ipvsadm -A` creates it.
    pub fn new(scheduler: Scheduler) -> Self {
        Self::with_mh_size(scheduler, MH_DEFAULT_SIZE)
    }

    /// Like [`Sequencer::new`], with mh's table size.
    pub fn with_mh_size(scheduler: Scheduler, mh_size: u32) -> Self {
        let installed = match scheduler {
            Scheduler::Wrr => Resume::Wrr { cw: 0 },
            Scheduler::Sh | Scheduler::Dh | Scheduler::Mh => Resume::Hash,
            _ => Resume::Rr { cursor: None },
        };
        Sequencer {
            scheduler,
            list: Vec::new(),
            table: Vec::new(),
            table_cw: Vec::new(),
            offset: 0,
            picks_at_install: 0,
            installed,
            rebound: false,
            last_weights: HashMap::new(),
            mh_size,
        }
    }

    /// A fresh scheduler bound to a service that already has servers (`ipvsadm -E` switching
    /// schedulers): `init_svc` starts rr at the list head and wrr at `cw = mw`.
    pub fn rebind(&self, scheduler: Scheduler, mh_size: u32) -> Self {
        let mut s = Sequencer::with_mh_size(scheduler, mh_size);
        let list = &self.list;
        s.list = list.clone();
        s.last_weights = self.last_weights.clone();
        s.rebound = true;
        if let Resume::Wrr { cw } = &mut s.installed {
            *cw = wrr_di_mw(list).1;
        }
        s
    }

    pub fn scheduler(&self) -> Scheduler {
        self.scheduler
    }

    /// The IPVS list order currently installed.
    pub fn list(&self) -> &[Dest] {
        &self.list
    }

    /// The IPVS state after the data plane made `picks_now` picks in total.
    fn state(&self, picks_now: u64) -> Resume {
        if picks_now > self.picks_at_install && !self.table.is_empty() {
            let len = self.table.len() as u64;
            let last = ((picks_now - 1 + self.offset as u64) % len) as usize;
            match self.installed {
                Resume::Rr { .. } => Resume::Rr {
                    cursor: Some(self.table[last]),
                },
                Resume::Wrr { .. } => Resume::Wrr {
                    cw: self.table_cw[last],
                },
                Resume::Hash => Resume::Hash,
            }
        } else {
            self.installed
        }
    }

    /// Changes the real servers to `target` (configuration order: the order they were added)
    /// at a moment when the data plane's pick counter reads `picks_now`. Returns the table to
    /// install. On error nothing changes.
    pub fn change(&mut self, picks_now: u64, target: &[Dest]) -> Result<Table, SchedError> {
        let unchanged = target.len() == self.list.len()
            && target.iter().all(|t| self.list.iter().any(|d| d == t));
        if unchanged && !self.rebound {
            // No IPVS operation happens: the scheduler keeps its state (wrr's cursor too).
            return Ok(Table {
                slots: self.table.clone(),
                offset: self.offset,
            });
        }
        let mut state = self.state(picks_now);
        let mut list = self.list.clone();
        let mut last_weights = self.last_weights.clone();
        // IPVS applies a reload as single operations: deletions, edits, then additions.
        let removed: Vec<DestId> = list
            .iter()
            .filter(|d| !target.iter().any(|t| t.id == d.id))
            .map(|d| d.id)
            .collect();
        for id in removed {
            let pos = list.iter().position(|d| d.id == id).expect("present");
            if let Resume::Rr { cursor } = &mut state
                && *cursor == Some(id)
            {
                // ip_vs_rr_del_dest(): the cursor steps back to the previous node.
                *cursor = if pos == 0 {
                    None
                } else {
                    Some(list[pos - 1].id)
                };
            }
            list.remove(pos);
            last_weights.remove(&id);
            wrr_dest_changed(&mut state, &list);
        }
        for i in 0..list.len() {
            if let Some(t) = target.iter().find(|t| t.id == list[i].id)
                && t.weight != list[i].weight
            {
                list[i].weight = t.weight;
                if t.weight > 0 {
                    last_weights.insert(t.id, t.weight);
                }
                wrr_dest_changed(&mut state, &list);
            }
        }
        for t in target {
            if !list.iter().any(|d| d.id == t.id) {
                list.insert(0, *t);
                last_weights.insert(t.id, t.weight);
                wrr_dest_changed(&mut state, &list);
            }
        }

        let (table, table_cw, start) = match state {
            Resume::Rr { cursor } => {
                let table: Vec<DestId> =
                    list.iter().filter(|d| d.weight > 0).map(|d| d.id).collect();
                let next = rr_next(&list, cursor);
                let start = next
                    .and_then(|n| table.iter().position(|&t| t == n))
                    .unwrap_or(0);
                (table, Vec::new(), start)
            }
            Resume::Wrr { cw } => {
                let (table, table_cw) = wrr_cycle(&list)?;
                let start = table_cw.iter().position(|&c| c == cw).unwrap_or(0);
                (table, table_cw, start)
            }
            Resume::Hash => {
                let table = match self.scheduler {
                    Scheduler::Sh => sh_table(&list),
                    Scheduler::Dh => dh_table(&list),
                    _ => {
                        if list.len() > self.mh_size as usize {
                            return Err(SchedError::MhTooManyServers(list.len(), self.mh_size));
                        }
                        let lw: Vec<(DestId, u32)> = list
                            .iter()
                            .map(|d| (d.id, last_weights.get(&d.id).copied().unwrap_or(0)))
                            .collect();
                        mh_table(&lw, self.mh_size)
                    }
                };
                (table, Vec::new(), 0)
            }
        };
        let offset = if table.is_empty() {
            0
        } else {
            let len = table.len() as u64;
            ((start as u64 + len - picks_now % len) % len) as u32
        };
        self.list = list;
        self.last_weights = last_weights;
        self.table = table.clone();
        self.table_cw = table_cw;
        self.offset = offset;
        self.picks_at_install = picks_now;
        self.installed = state;
        self.rebound = false;
        Ok(Table {
            slots: table,
            offset,
        })
    }
}

/// `ip_vs_wrr_dest_changed()`.
fn wrr_dest_changed(state: &mut Resume, list: &[Dest]) {
    let Resume::Wrr { cw } = state else { return };
    let (di, mw) = wrr_di_mw(list);
    if *cw > mw || *cw == 0 {
        *cw = mw;
    } else if di > 1 {
        *cw = (*cw / di) * di + 1;
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// (di, mw) of `ip_vs_wrr_gcd_weight()` / `ip_vs_wrr_max_weight()`.
fn wrr_di_mw(list: &[Dest]) -> (i64, i64) {
    let di = list
        .iter()
        .filter(|d| d.weight > 0)
        .fold(0, |g, d| gcd(d.weight as i64, g));
    let di = if di == 0 { 1 } else { di };
    let max = list.iter().map(|d| d.weight as i64).max().unwrap_or(0);
    (di, max - (di - 1))
}

/// One complete wrr cycle and the pass (cw) of each position.
fn wrr_cycle(list: &[Dest]) -> Result<(Vec<DestId>, Vec<i64>), SchedError> {
    let (di, mw) = wrr_di_mw(list);
    if mw <= 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let len: u64 = list.iter().map(|d| (d.weight as i64 / di) as u64).sum();
    if len as usize > MAX_TABLE {
        return Err(SchedError::CycleTooLong(len, MAX_TABLE));
    }
    let mut slots = Vec::with_capacity(len as usize);
    let mut cws = Vec::with_capacity(len as usize);
    let mut cw = mw;
    while cw > 0 {
        for d in list {
            if d.weight as i64 >= cw {
                slots.push(d.id);
                cws.push(cw);
            }
        }
        cw -= di;
    }
    Ok((slots, cws))
}

/// sh's 256 buckets (`ip_vs_sh_reassign()`): a cyclic walk over the list in which each server
/// takes `weight` consecutive buckets - at least one, weight 0 included.
pub fn sh_table(list: &[Dest]) -> Vec<DestId> {
    if list.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(SH_DH_SIZE as usize);
    let (mut p, mut count) = (0usize, 0u32);
    for _ in 0..SH_DH_SIZE {
        out.push(list[p].id);
        count += 1;
        if count >= list[p].weight {
            p = (p + 1) % list.len();
            count = 0;
        }
    }
    out
}

/// dh's 256 buckets (`ip_vs_dh_reassign()`): plain round robin over the list; weights do not
/// replicate buckets.
pub fn dh_table(list: &[Dest]) -> Vec<DestId> {
    if list.is_empty() {
        return Vec::new();
    }
    (0..SH_DH_SIZE as usize)
        .map(|i| list[i % list.len()].id)
        .collect()
}

/// Offset, skip and turns of each server in mh's population (`ip_vs_mh_permutate()`,
/// `ip_vs_mh_shift_weight()`), in list order.
pub fn mh_setup(list: &[(DestId, u32)], m: u32) -> Vec<(u32, u32, u32)> {
    let g = list
        .iter()
        .filter(|(_, w)| *w > 0)
        .fold(0i64, |g, (_, w)| gcd(*w as i64, g)) as u32;
    if g == 0 {
        return Vec::new();
    }
    let tab_index = 8 + MH_PRIMES.iter().position(|&p| p == m).unwrap_or(4) as u32;
    let mw = list.iter().map(|(_, w)| *w).max().unwrap_or(0) / g;
    let bitlen = 32 - mw.leading_zeros();
    let shift = bitlen.saturating_sub(tab_index / 2);
    list.iter()
        .map(|((addr, port), lw)| {
            let a = fold_addr(*addr);
            let offset = mh_hash(a, *port, MH_KEY1, 0) % m;
            let skip = mh_hash(a, *port, MH_KEY2, 0) % (m - 1) + 1;
            let turns = match (lw / g) >> shift {
                0 if *lw != 0 => 1,
                t => t,
            };
            (offset, skip, turns)
        })
        .collect()
}

/// mh's table of `m` slots (`ip_vs_mh_populate()`): rounds over the list, each server taking
/// `turns` slots a round, each at its next free preferred position. Empty when every last
/// weight is 0.
pub fn mh_table(list: &[(DestId, u32)], m: u32) -> Vec<DestId> {
    let setup = mh_setup(list, m);
    if setup.is_empty() {
        return Vec::new();
    }
    let m = m as usize;
    let mut next: Vec<usize> = setup.iter().map(|s| s.0 as usize).collect();
    let mut table: Vec<Option<DestId>> = vec![None; m];
    let mut filled = 0;
    while filled < m {
        for (di, &(_, skip, turns)) in setup.iter().enumerate() {
            for _ in 0..turns {
                let mut c = next[di];
                while table[c].is_some() {
                    c += skip as usize;
                    if c >= m {
                        c -= m;
                    }
                }
                next[di] = c;
                table[c] = Some(list[di].0);
                filled += 1;
                if filled == m {
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table.into_iter().map(|d| d.expect("filled")).collect()
}

/// An address as IPVS's hashes take it (host order, IPv6 folded).
pub fn fold_addr(a: IpAddr) -> u32 {
    lb_common::hash::fold(crate::engine::addr_words(a))
}

/// rr: the server after `cursor`, wrapping around and ending with the cursor itself.
fn rr_next(list: &[Dest], cursor: Option<DestId>) -> Option<DestId> {
    let after = cursor
        .and_then(|c| list.iter().position(|d| d.id == c))
        .map(|i| i + 1)
        .unwrap_or(0);
    let n = list.len();
    (0..n)
        .map(|k| &list[(after + k) % n])
        .find(|d| d.weight > 0)
        .map(|d| d.id)
}

/// Step-by-step IPVS schedulers (`ip_vs_rr.c`, `ip_vs_wrr.c`), written straight from the
/// kernel's rules: a list with new servers at the head, a cursor, and for wrr the current
/// weight. Used as the reference the tables and the XDP program are tested against.
pub mod model {
    use std::{
        collections::{HashMap, HashSet},
        net::IpAddr,
    };

    use lb_common::hash::{self, MH_DEFAULT_SIZE, MH_KEY1};

    use super::{Dest, DestId, dh_table, fold_addr, gcd, mh_table, sh_table};
    use crate::config::{SchedFlags, Scheduler};

    #[derive(Clone, Debug)]
    pub struct Ipvs {
        scheduler: Scheduler,
        /// IPVS list order.
        pub list: Vec<Dest>,
        /// Index in `list` of the cursor node; `None` = the list head.
        cl: Option<usize>,
        cw: i64,
        mw: i64,
        di: i64,
        /// sh/mh flags.
        pub flags: SchedFlags,
        pub mh_size: u32,
        last_weight: HashMap<DestId, u32>,
        /// (activeconns, inactconns) per server, kept across removal and re-adding (IPVS's
        /// trash keeps a deleted server's counters while its connections live).
        conns: HashMap<DestId, (u64, u64)>,
        /// (u_threshold, l_threshold) per server.
        thresholds: HashMap<DestId, (u32, u32)>,
        overloaded: HashSet<DestId>,
        /// twos' random numbers.
        rng: u64,
        /// lblc/lblcr: each destination's server (set of servers), newest first. Expiry (24 h
        /// unused, or unchanged for lblcr's shedding) is not modelled.
        pub locality: HashMap<IpAddr, Vec<DestId>>,
    }

    impl Ipvs {
        /// `ip_vs_*_init_svc()` on an empty service.
        pub fn new(scheduler: Scheduler) -> Self {
            let mut s = Ipvs {
                scheduler,
                list: Vec::new(),
                cl: None,
                cw: 0,
                mw: 0,
                di: 1,
                flags: SchedFlags::default(),
                mh_size: MH_DEFAULT_SIZE,
                last_weight: HashMap::new(),
                conns: HashMap::new(),
                thresholds: HashMap::new(),
                overloaded: HashSet::new(),
                rng: 0x9e37_79b9_7f4a_7c15,
                locality: HashMap::new(),
            };
            s.recompute();
            s.cw = s.mw;
            s
        }

        fn recompute(&mut self) {
            let g = self
                .list
                .iter()
                .filter(|d| d.weight > 0)
                .fold(0, |g, d| gcd(d.weight as i64, g));
            self.di = if g == 0 { 1 } else { g };
            let max = self.list.iter().map(|d| d.weight as i64).max().unwrap_or(0);
            self.mw = max - (self.di - 1);
        }

        fn dest_changed(&mut self) {
            if self.scheduler != Scheduler::Wrr {
                return;
            }
            self.cl = None;
            self.recompute();
            if self.cw > self.mw || self.cw == 0 {
                self.cw = self.mw;
            } else if self.di > 1 {
                self.cw = (self.cw / self.di) * self.di + 1;
            }
        }

        /// `ipvsadm -a`: the new server goes to the list head.
        pub fn add(&mut self, d: Dest) {
            self.last_weight.insert(d.id, d.weight);
            self.list.insert(0, d);
            if let Some(c) = self.cl.as_mut() {
                *c += 1;
            }
            self.dest_changed();
        }

        /// `ipvsadm -d`.
        pub fn remove(&mut self, id: DestId) {
            let pos = self.list.iter().position(|d| d.id == id).expect("present");
            match self.cl {
                // rr: the cursor steps back to the previous node (or the head).
                Some(c) if c == pos => self.cl = if pos == 0 { None } else { Some(pos - 1) },
                Some(c) if c > pos => self.cl = Some(c - 1),
                _ => {}
            }
            self.list.remove(pos);
            self.dest_changed();
        }

        /// `ipvsadm -e ... -w`.
        pub fn edit(&mut self, id: DestId, weight: u32) {
            let d = self.list.iter_mut().find(|d| d.id == id).expect("present");
            d.weight = weight;
            if weight > 0 {
                self.last_weight.insert(id, weight);
            }
            self.dest_changed();
        }

        /// One scheduling decision (rr, wrr and the least-connection family).
        pub fn schedule(&mut self) -> Option<DestId> {
            match self.scheduler {
                Scheduler::Wrr => self.wrr(),
                Scheduler::Lc => self.lc(),
                Scheduler::Wlc => self.wlc(|a, i| a * 256 + (a + i)),
                Scheduler::Sed => self.wlc(|a, _| a + 1),
                Scheduler::Nq => self.nq(),
                Scheduler::Fo => self.fo(false),
                Scheduler::Ovf => self.fo(true),
                Scheduler::Twos => self.twos(),
                _ => self.rr(),
            }
        }

        /// twos: the probability that each server gets the next new connection.
        /// `ip_vs_twos_schedule()` draws two numbers uniformly in [0, total weight] and walks
        /// the eligible servers subtracting weights (so the first server gets one extra
        /// chance); the second draw wins if its overhead per weight is strictly lower.
        pub fn twos_probabilities(&self) -> Vec<(DestId, f64)> {
            let el: Vec<Dest> = self
                .list
                .iter()
                .filter(|d| self.eligible(d))
                .copied()
                .collect();
            let total: u64 = el.iter().map(|d| d.weight as u64).sum();
            let mut out: Vec<(DestId, f64)> = el.iter().map(|d| (d.id, 0.0)).collect();
            if total == 0 {
                return out;
            }
            let p: Vec<f64> = el
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    (d.weight as f64 + if i == 0 { 1.0 } else { 0.0 }) / (total + 1) as f64
                })
                .collect();
            let oh = |d: &Dest| {
                let (a, i) = self.counts(d.id);
                a * 256 + (a + i)
            };
            for (i, c1) in el.iter().enumerate() {
                for (j, c2) in el.iter().enumerate() {
                    let win = if c2.weight as u64 * oh(c1) > c1.weight as u64 * oh(c2) {
                        j
                    } else {
                        i
                    };
                    out[win].1 += p[i] * p[j];
                }
            }
            out
        }

        /// One twos decision with the model's own random numbers.
        fn twos(&mut self) -> Option<DestId> {
            let probs = self.twos_probabilities();
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let mut x = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
            for (d, p) in &probs {
                if x < *p {
                    return Some(*d);
                }
                x -= p;
            }
            probs.last().map(|p| p.0)
        }

        // ---- connection counts and thresholds (ip_vs_conn.c bind/unbind) ----

        /// (ActiveConn, InActConn) of a server.
        pub fn counts(&self, id: DestId) -> (u64, u64) {
            self.conns.get(&id).copied().unwrap_or((0, 0))
        }

        fn total(&self, id: DestId) -> u64 {
            let (a, i) = self.counts(id);
            a + i
        }

        /// `ipvsadm -e -x u -y l`: the flag is re-evaluated (`__ip_vs_dest_update_overload`).
        pub fn set_thresholds(&mut self, id: DestId, upper: u32, lower: u32) {
            self.thresholds.insert(id, (upper, lower));
            self.update_overload(id);
        }

        /// Set at `total >= u`, cleared below the lower value (`l`, or `u - u/4`), unchanged
        /// in between; no upper threshold clears it.
        fn update_overload(&mut self, id: DestId) {
            let (u, l) = self.thresholds.get(&id).copied().unwrap_or((0, 0));
            let total = self.total(id);
            if u == 0 {
                self.overloaded.remove(&id);
            } else if total >= u as u64 {
                self.overloaded.insert(id);
            } else {
                let l_val = if l != 0 { l } else { u - u / 4 };
                if total < l_val as u64 {
                    self.overloaded.remove(&id);
                }
            }
        }

        pub fn is_overloaded(&self, id: DestId) -> bool {
            self.overloaded.contains(&id)
        }

        /// A new TCP connection bound to `id` (its SYN makes it active at once).
        pub fn bind(&mut self, id: DestId) {
            self.conns.entry(id).or_default().0 += 1;
            self.update_overload(id);
        }

        /// An active connection of `id` became inactive (FIN, RST).
        pub fn deactivate(&mut self, id: DestId) {
            let c = self.conns.entry(id).or_default();
            c.0 -= 1;
            c.1 += 1;
        }

        /// A connection of `id` expired.
        pub fn unbind(&mut self, id: DestId, active: bool) {
            let c = self.conns.entry(id).or_default();
            if active {
                c.0 -= 1;
            } else {
                c.1 -= 1;
            }
            self.update_overload(id);
        }

        fn eligible(&self, d: &Dest) -> bool {
            d.weight > 0 && !self.is_overloaded(d.id)
        }

        /// `ip_vs_lc_schedule()`: minimum overhead, ties to the earlier server.
        fn lc(&self) -> Option<DestId> {
            let mut least: Option<(DestId, u64)> = None;
            for d in &self.list {
                if !self.eligible(d) {
                    continue;
                }
                let (a, i) = self.counts(d.id);
                let doh = a * 256 + (a + i);
                if least.is_none_or(|(_, loh)| doh < loh) {
                    least = Some((d.id, doh));
                }
            }
            least.map(|l| l.0)
        }

        /// `ip_vs_wlc_schedule()` (and sed's, with its own cost): the first eligible server,
        /// then any later one whose cost/weight is strictly lower, by cross-multiplication.
        fn wlc(&self, cost: impl Fn(u64, u64) -> u64) -> Option<DestId> {
            let first = self.list.iter().position(|d| self.eligible(d))?;
            let mut least = self.list[first];
            let (a, i) = self.counts(least.id);
            let mut loh = cost(a, i);
            for d in &self.list[first + 1..] {
                if self.is_overloaded(d.id) {
                    continue;
                }
                let (a, i) = self.counts(d.id);
                let doh = cost(a, i);
                if loh * d.weight as u64 > doh * least.weight as u64 {
                    least = *d;
                    loh = doh;
                }
            }
            Some(least.id)
        }

        /// `ip_vs_nq_schedule()`: the first idle server at once, else sed's choice.
        fn nq(&self) -> Option<DestId> {
            let mut least: Option<(Dest, u64)> = None;
            for d in &self.list {
                if !self.eligible(d) {
                    continue;
                }
                let (a, _) = self.counts(d.id);
                let doh = a + 1;
                if a == 0 {
                    return Some(d.id);
                }
                if least.is_none_or(|(l, loh)| loh * d.weight as u64 > doh * l.weight as u64) {
                    least = Some((*d, doh));
                }
            }
            least.map(|l| l.0.id)
        }

        /// `ip_vs_fo_schedule()`: the highest weight, ties to the earlier server; `ovf` also
        /// skips servers whose active connections exceed their weight.
        fn fo(&self, overflow: bool) -> Option<DestId> {
            let mut best: Option<Dest> = None;
            for d in &self.list {
                if !self.eligible(d) {
                    continue;
                }
                if overflow && self.counts(d.id).0 > d.weight as u64 {
                    continue;
                }
                if best.is_none_or(|b| d.weight > b.weight) {
                    best = Some(*d);
                }
            }
            best.map(|b| b.id)
        }

        /// One scheduling decision for a packet from `src:sport` to `dst`: the hashing
        /// schedulers look at the packet, rr and wrr do not.
        pub fn schedule_packet(&mut self, src: IpAddr, sport: u16, dst: IpAddr) -> Option<DestId> {
            // IPVS is_unavailable(): weight 0 or overloaded.
            let usable = |list: &[Dest], id: DestId| {
                list.iter()
                    .find(|d| d.id == id)
                    .is_some_and(|d| d.weight > 0 && !self.overloaded.contains(&id))
            };
            let port = if self.flags.port { sport } else { 0 };
            match self.scheduler {
                Scheduler::Sh => {
                    // ip_vs_sh_schedule() / ip_vs_sh_get_fallback()
                    let table = sh_table(&self.list);
                    if table.is_empty() {
                        return None;
                    }
                    let a = fold_addr(src);
                    let h = hash::sh_bucket(a, port, 0);
                    let d = table[h as usize];
                    if usable(&self.list, d) {
                        return Some(d);
                    }
                    if !self.flags.fallback {
                        return None;
                    }
                    (0..256u32)
                        .map(|i| table[hash::sh_bucket(a, port, (i + h) % 256) as usize])
                        .find(|d| usable(&self.list, *d))
                }
                Scheduler::Dh => {
                    let table = dh_table(&self.list);
                    if table.is_empty() {
                        return None;
                    }
                    let d = table[hash::dh_bucket(fold_addr(dst)) as usize];
                    (usable(&self.list, d)).then_some(d)
                }
                Scheduler::Mh => {
                    let lw: Vec<(DestId, u32)> = self
                        .list
                        .iter()
                        .map(|d| (d.id, self.last_weight.get(&d.id).copied().unwrap_or(0)))
                        .collect();
                    let table = mh_table(&lw, self.mh_size);
                    if table.is_empty() {
                        return None;
                    }
                    let m = self.mh_size;
                    let a = fold_addr(src);
                    let h = hash::mh_hash(a, port, MH_KEY1, 0) % m;
                    let d = table[h as usize];
                    if usable(&self.list, d) {
                        return Some(d);
                    }
                    if !self.flags.fallback {
                        return None;
                    }
                    (0..m)
                        .map(|i| table[(hash::mh_hash(a, port, MH_KEY1, (i + h) % m) % m) as usize])
                        .find(|d| usable(&self.list, *d))
                }
                Scheduler::Lblc => self.lblc(dst),
                Scheduler::Lblcr => self.lblcr(dst),
                _ => self.schedule(),
            }
        }

        /// `is_overloaded()` of ip_vs_lblc.c / ip_vs_lblcr.c: more active connections than
        /// its weight while some server of the service has fewer than half its weight.
        fn lblc_overloaded(&self, d: &Dest) -> bool {
            self.counts(d.id).0 > d.weight as u64
                && self
                    .list
                    .iter()
                    .any(|x| self.counts(x.id).0 * 2 < x.weight as u64)
        }

        fn current_wlc(&self) -> Option<DestId> {
            self.wlc(|a, i| a * 256 + (a + i))
        }

        /// `ip_vs_lblc_schedule()`.
        fn lblc(&mut self, dst: IpAddr) -> Option<DestId> {
            let cached = self
                .locality
                .get(&dst)
                .and_then(|set| set.first())
                .and_then(|id| self.list.iter().find(|d| d.id == *id));
            if let Some(d) = cached
                && d.weight > 0
                && !self.lblc_overloaded(d)
            {
                return Some(d.id);
            }
            let d = self.current_wlc()?;
            self.locality.insert(dst, vec![d]);
            Some(d)
        }

        /// `ip_vs_lblcr_schedule()` (without the 24 h shedding).
        fn lblcr(&mut self, dst: IpAddr) -> Option<DestId> {
            let Some(set) = self.locality.get(&dst).cloned() else {
                let d = self.current_wlc()?;
                self.locality.insert(dst, vec![d]);
                return Some(d);
            };
            // ip_vs_dest_set_min(): members still in the service, not flagged overloaded;
            // the first weighted one, then strictly lower overhead per weight.
            let oh = |d: &Dest| {
                let (a, i) = self.counts(d.id);
                a * 256 + (a + i)
            };
            let mut least: Option<Dest> = None;
            for id in &set {
                let Some(d) = self.list.iter().find(|d| d.id == *id) else {
                    continue;
                };
                if self.is_overloaded(d.id) {
                    continue;
                }
                match least {
                    None if d.weight > 0 => least = Some(*d),
                    Some(l) if oh(&l) * d.weight as u64 > oh(d) * l.weight as u64 => {
                        least = Some(*d)
                    }
                    _ => {}
                }
            }
            if let Some(l) = least
                && !self.lblc_overloaded(&l)
            {
                return Some(l.id);
            }
            let d = self.current_wlc()?;
            let set = self.locality.get_mut(&dst).expect("present");
            if !set.contains(&d) {
                set.insert(0, d);
                set.truncate(lb_common::locality::SET);
            }
            Some(d)
        }

        fn rr(&mut self) -> Option<DestId> {
            let n = self.list.len();
            let start = self.cl.map(|c| c + 1).unwrap_or(0);
            // Forward from after the cursor to the end, then from the head to the cursor.
            for k in 0..n {
                let i = (start + k) % n;
                if self.eligible(&self.list[i]) {
                    self.cl = Some(i);
                    return Some(self.list[i].id);
                }
            }
            None
        }

        fn wrr(&mut self) -> Option<DestId> {
            if self.mw == 0 {
                return None;
            }
            let n = self.list.len();
            let mut i = self.cl.map(|c| c + 1).unwrap_or(0);
            // At most one full cycle of passes.
            let max_steps = (n + 1) * (self.mw / self.di + 2) as usize;
            for _ in 0..max_steps {
                if i >= n {
                    // The scan reached the list end: next pass.
                    i = 0;
                    self.cw -= self.di;
                    if self.cw <= 0 {
                        self.cw = self.mw;
                    }
                    continue;
                }
                if self.list[i].weight as i64 >= self.cw && !self.is_overloaded(self.list[i].id) {
                    self.cl = Some(i);
                    return Some(self.list[i].id);
                }
                i += 1;
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{model::Ipvs, *};

    fn id(n: u8) -> DestId {
        (IpAddr::from([10, 0, 0, n]), 80)
    }
    fn d(n: u8, w: u32) -> Dest {
        Dest {
            id: id(n),
            weight: w,
        }
    }
    fn name(x: DestId) -> char {
        let IpAddr::V4(a) = x.0 else { unreachable!() };
        (b'A' + a.octets()[3] - 1) as char
    }

    /// Plays the table as the data plane does.
    struct Dataplane {
        table: Table,
        picks: u64,
    }
    impl Dataplane {
        fn pick(&mut self) -> Option<DestId> {
            if self.table.slots.is_empty() {
                return None;
            }
            let len = self.table.slots.len() as u64;
            let s = ((self.picks + self.table.offset as u64) % len) as usize;
            self.picks += 1;
            Some(self.table.slots[s])
        }
    }

    /// The wrr sequences of `ipvs.md` §2.2 (list order given; A/B/C = 10.0.0.1/2/3): the
    /// repeating cycle is the table.
    #[test]
    fn wrr_cycles_match_ipvs_reference() {
        let cases: &[(&[(u8, u32)], &str)] = &[
            (&[(1, 4), (2, 3), (3, 2)], "AABABCABC"),
            (&[(3, 2), (2, 3), (1, 4)], "ABACBACBA"),
            (&[(1, 4), (2, 2)], "AAB"),
            (&[(1, 6), (2, 4), (3, 2)], "AABABC"),
            (&[(1, 5), (2, 2)], "AAAABAB"),
            (&[(1, 4), (2, 0), (3, 2)], "AAC"),
            (&[(1, 1), (2, 1), (3, 1)], "ABC"),
        ];
        for (list, want) in cases {
            let list: Vec<Dest> = list.iter().map(|&(n, w)| d(n, w)).collect();
            let (slots, _) = wrr_cycle(&list).unwrap();
            let got: String = slots.iter().map(|&s| name(s)).collect();
            assert_eq!(&got, want, "{list:?}");
        }
    }

    /// "weights 3 and 1 give 3:1 over every 4 new connections; weight 0 receives none".
    #[test]
    fn wrr_proportions_and_weight_zero() {
        let mut seq = Sequencer::new(Scheduler::Wrr);
        let t = seq.change(0, &[d(1, 3), d(2, 1), d(3, 0)]).unwrap();
        let mut dp = Dataplane { table: t, picks: 0 };
        let picks: Vec<DestId> = (0..400).map(|_| dp.pick().unwrap()).collect();
        for w in picks.chunks(4) {
            assert_eq!(w.iter().filter(|&&x| x == id(1)).count(), 3);
            assert_eq!(w.iter().filter(|&&x| x == id(2)).count(), 1);
        }
        assert!(!picks.contains(&id(3)));
    }

    /// A fresh IPVS service fed its servers one by one starts wrr at cw = 1 (the adds adjust
    /// cw), and rr at the server added last.
    #[test]
    fn fresh_services_start_where_ipvs_starts() {
        for sched in [Scheduler::Rr, Scheduler::Wrr] {
            let target = [d(1, 4), d(2, 3), d(3, 2)];
            let mut m = Ipvs::new(sched);
            for t in target {
                m.add(t);
            }
            let mut seq = Sequencer::new(sched);
            let mut dp = Dataplane {
                table: seq.change(0, &target).unwrap(),
                picks: 0,
            };
            for _ in 0..50 {
                assert_eq!(dp.pick(), m.schedule(), "{sched:?}");
            }
        }
    }

    /// Long random sequences of picks and changes: the table + offset the controller installs
    /// must make exactly the decisions of the step-by-step IPVS model.
    #[test]
    fn tables_follow_ipvs_across_changes() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for sched in [Scheduler::Rr, Scheduler::Wrr] {
            for round in 0..40 {
                let mut model = Ipvs::new(sched);
                let mut seq = Sequencer::new(sched);
                let mut dp = Dataplane {
                    table: Table::default(),
                    picks: 0,
                };
                // configuration order of the current servers
                let mut config: Vec<Dest> = Vec::new();
                for step in 0..60 {
                    // change the configuration
                    let mut target = config.clone();
                    match next(4) {
                        0 if target.len() < 8 => {
                            let n = (1 + next(12)) as u8;
                            if !target.iter().any(|t| t.id == id(n)) {
                                target.push(d(n, next(6) as u32));
                            }
                        }
                        1 if !target.is_empty() => {
                            let i = next(target.len() as u64) as usize;
                            target.remove(i);
                        }
                        2 if !target.is_empty() => {
                            let i = next(target.len() as u64) as usize;
                            target[i].weight = next(6) as u32;
                        }
                        _ => {}
                    }
                    // the model receives the same change as single IPVS operations:
                    // deletions (in list order), weight edits, additions
                    for m in model.list.clone() {
                        if !target.iter().any(|t| t.id == m.id) {
                            model.remove(m.id);
                        }
                    }
                    for m in model.list.clone() {
                        if let Some(t) = target.iter().find(|t| t.id == m.id)
                            && t.weight != m.weight
                        {
                            model.edit(t.id, t.weight);
                        }
                    }
                    for t in &target {
                        if !config.iter().any(|c| c.id == t.id) {
                            model.add(*t);
                        }
                    }
                    config = target;
                    dp.table = seq.change(dp.picks, &config).unwrap();
                    for k in 0..next(20) {
                        assert_eq!(
                            dp.pick(),
                            model.schedule(),
                            "{sched:?} round {round} step {step} pick {k}: list {:?}",
                            model.list
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rr_skips_weight_zero_and_empty_is_empty() {
        let mut seq = Sequencer::new(Scheduler::Rr);
        let t = seq.change(0, &[d(1, 1), d(2, 0), d(3, 5)]).unwrap();
        // list order is the reverse of the configuration: C, (B), A
        assert_eq!(t.slots, vec![id(3), id(1)]);
        let t = seq.change(7, &[d(2, 0)]).unwrap();
        assert!(t.slots.is_empty());
    }

    /// `ipvsadm -E -s wrr` on an rr service: a fresh wrr (cw = mw) over the existing list.
    #[test]
    fn rebinding_a_scheduler_starts_it_fresh() {
        let mut rr = Sequencer::new(Scheduler::Rr);
        rr.change(0, &[d(1, 4), d(2, 3), d(3, 2)]).unwrap();
        let mut wrr = rr.rebind(Scheduler::Wrr, MH_DEFAULT_SIZE);
        let mut dp = Dataplane {
            table: wrr.change(5, &[d(1, 4), d(2, 3), d(3, 2)]).unwrap(),
            picks: 5,
        };
        // IPVS's init_svc: cw = mw, cursor at the head.
        let got: String = (0..9).map(|_| name(dp.pick().unwrap())).collect();
        // list order C, B, A with weights 2, 3, 4: passes cw=4 {A}, 3 {B,A}, 2 {C,B,A}, 1 {C,B,A}
        assert_eq!(got, "ABACBACBA");
    }

    /// sh and dh bucket fills of `ipvs_model.py` (A, B, C in list order).
    #[test]
    fn sh_dh_fills_match_ipvs_reference() {
        let count = |t: &[DestId], n: u8| t.iter().filter(|&&x| x == id(n)).count();
        let t = sh_table(&[d(1, 4), d(2, 3), d(3, 2)]);
        assert_eq!((count(&t, 1), count(&t, 2), count(&t, 3)), (116, 84, 56));
        assert_eq!(
            t[..9].iter().map(|&x| name(x)).collect::<String>(),
            "AAAABBBCC"
        );
        let t = sh_table(&[d(1, 4), d(2, 0), d(3, 2)]);
        assert_eq!((count(&t, 1), count(&t, 2), count(&t, 3)), (148, 36, 72));
        let t = dh_table(&[d(1, 1), d(2, 1), d(3, 1)]);
        assert_eq!((count(&t, 1), count(&t, 2), count(&t, 3)), (86, 85, 85));
    }

    /// mh offsets, skips, turns and slot counts of `ipvs_model.py` (192.168.1.12/.11/.10:80 in
    /// list order).
    #[test]
    fn mh_tables_match_ipvs_reference() {
        let ids: Vec<DestId> = [12u8, 11, 10]
            .iter()
            .map(|n| (IpAddr::from([192, 168, 1, *n]), 80))
            .collect();
        // (weights, (offset, skip, turns) per server, slots per server)
        type Case = ([u32; 3], [(u32, u32, u32); 3], [usize; 3]);
        let cases: &[Case] = &[
            (
                [1, 1, 1],
                [(3773, 149, 1), (2340, 414, 1), (2186, 43, 1)],
                [1365, 1364, 1364],
            ),
            (
                [1, 2, 3],
                [(3773, 149, 1), (2340, 414, 2), (2186, 43, 3)],
                [683, 1364, 2046],
            ),
            (
                [100, 200, 300],
                [(3773, 149, 1), (2340, 414, 2), (2186, 43, 3)],
                [683, 1364, 2046],
            ),
            (
                [1, 1000, 1],
                [(3773, 149, 1), (2340, 414, 62), (2186, 43, 1)],
                [64, 3966, 63],
            ),
        ];
        for (w, setup, slots) in cases {
            let lw: Vec<(DestId, u32)> = ids.iter().copied().zip(w.iter().copied()).collect();
            assert_eq!(mh_setup(&lw, 4093), setup.to_vec(), "{w:?}");
            let t = mh_table(&lw, 4093);
            assert_eq!(t.len(), 4093);
            let got: Vec<usize> = ids
                .iter()
                .map(|i| t.iter().filter(|&&x| x == *i).count())
                .collect();
            assert_eq!(got, slots.to_vec(), "{w:?}");
        }
    }

    /// Maglev's promise: removing (or adding) one of N equal servers moves at most 1/N + 2 %
    /// of the keys (measured over the table, which is what keys hash into).
    #[test]
    fn mh_disruption_is_minimal() {
        for (n, m) in [(3u8, 4093u32), (10, 4093), (25, 65521), (100, 131071)] {
            let all: Vec<(DestId, u32)> = (1..=n).map(|i| (id(i), 1)).collect();
            let t_all = mh_table(&all, m);
            for removed in [0usize, (n / 2) as usize, n as usize - 1] {
                let mut rest = all.clone();
                rest.remove(removed);
                let t_rest = mh_table(&rest, m);
                let moved = t_all
                    .iter()
                    .zip(&t_rest)
                    .filter(|(a, b)| a != b && **a != all[removed].0)
                    .count() as f64
                    / m as f64;
                let changed =
                    t_all.iter().zip(&t_rest).filter(|(a, b)| a != b).count() as f64 / m as f64;
                let bound = 1.0 / n as f64 + 0.02;
                assert!(
                    changed <= bound,
                    "n={n} m={m}: {changed:.4} of the keys moved (bound {bound:.4})"
                );
                assert!(
                    moved <= 0.02,
                    "n={n} m={m}: {moved:.4} of keys on kept servers moved"
                );
            }
        }
    }

    /// mh with weights 0 keeps the slots (built from last_weight); a server added with weight
    /// 0 gets none.
    #[test]
    fn mh_uses_last_weights() {
        let mut seq = Sequencer::new(Scheduler::Mh);
        let t1 = seq.change(0, &[d(1, 1), d(2, 1)]).unwrap();
        let t2 = seq.change(0, &[d(1, 1), d(2, 0)]).unwrap();
        assert_eq!(t1.slots, t2.slots, "quiescing moves no slots");
        let t3 = seq.change(0, &[d(1, 1), d(2, 0), d(3, 0)]).unwrap();
        assert!(!t3.slots.contains(&id(3)));
    }

    #[test]
    fn huge_wrr_cycles_are_refused() {
        let mut seq = Sequencer::new(Scheduler::Wrr);
        let many: Vec<Dest> = (1..=40).map(|n| d(n, 65535 - n as u32)).collect();
        assert!(matches!(
            seq.change(0, &many),
            Err(SchedError::CycleTooLong(..))
        ));
        assert!(
            seq.list().is_empty(),
            "a refused change leaves the state as it was"
        );
    }
}
