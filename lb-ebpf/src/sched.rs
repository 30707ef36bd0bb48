//! New-flow scheduling.
//!
//! Every scheduler reads the service's slot table, written by the controller:
//!
//! * rr and wrr share one mechanism: the table holds the usable servers in IPVS list order
//!   (rr) or one whole IPVS wrr cycle (wrr), and every new flow takes the next slot through an
//!   atomic counter shared by all CPUs, so the sequence is exactly the IPVS one however the
//!   flows spread over CPUs, without a lock.
//! * sh, dh and mh index the table with IPVS's hash of the client's address (sh, mh; with the
//!   port if asked) or of the destination (dh). Their tables keep quiesced servers, as IPVS's
//!   do; landing on one means no server, or - with the fallback flag - IPVS's probe sequence.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lb_common::{
    BACKEND_F_AVAILABLE, Backend, Service,
    hash::{self, MH_KEY1, SH_DH_SIZE},
    reason,
    sched::{self, F_FALLBACK, F_PORT},
};

use crate::{
    least,
    maps::{BACKEND_CONNS, BACKENDS, PICK_ARGS, SCHED_STATE, SLOTS},
    parse::Pkt,
};

/// State shared with the fallback probes run by `bpf_loop`: the verifier checks a loop body
/// once, where a plain loop of hundreds or thousands of iterations would be walked through
/// iteration by iteration (and beyond its instruction budget).
#[repr(C)]
struct Probe {
    slots_base: u32,
    slots_len: u32,
    service_id: u32,
    addr: u32,
    /// Primary bucket / slot.
    h: u32,
    port: u16,
    _pad: u16,
    /// The backend index found, when `found` is 1.
    index: u32,
    found: u32,
}

impl Probe {
    #[inline(always)]
    fn new(svc: &Service, addr: u32, port: u16, h: u32) -> Self {
        Probe {
            slots_base: svc.slots_base,
            slots_len: svc.slots_len,
            service_id: svc.id,
            addr,
            h,
            port,
            _pad: 0,
            index: 0,
            found: 0,
        }
    }

    /// Checks slot `slot`: 1 (stop) if its server can take the flow.
    #[inline(always)]
    fn check(&mut self, slot: u32) -> i64 {
        let Some(index) = SLOTS.get(self.slots_base.wrapping_add(slot)) else {
            return 1;
        };
        let index = *index;
        let Some(be) = BACKENDS.get(index) else {
            return 1;
        };
        let be = be.current();
        if be.flags & BACKEND_F_AVAILABLE != 0
            && be.service_id == self.service_id
            && usable(index, be)
        {
            self.index = index;
            self.found = 1;
            return 1;
        }
        0
    }

    /// Runs `probe` for i = 0..n and returns the server found.
    #[inline(always)]
    fn run(
        mut self,
        n: u32,
        probe: extern "C" fn(u64, *mut core::ffi::c_void) -> i64,
    ) -> Result<(u32, &'static Backend), u32> {
        unsafe {
            aya_ebpf::helpers::bpf_loop(
                n,
                probe as *mut core::ffi::c_void,
                &raw mut self as *mut core::ffi::c_void,
                0,
            )
        };
        if self.found == 0 {
            return Err(reason::PASS_NO_BACKEND);
        }
        let be = BACKENDS
            .get(self.index)
            .ok_or(reason::DROP_INTERNAL)?
            .current();
        Ok((self.index, be))
    }
}

/// One step of `ip_vs_sh_get_fallback()`: bucket `(i + 2h) mod 256`.
#[inline(never)]
extern "C" fn sh_probe(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let p = unsafe { &mut *(ctx as *mut Probe) };
    let roffset = (i as u32).wrapping_add(p.h) % SH_DH_SIZE;
    p.check(hash::sh_bucket(p.addr, p.port, roffset))
}

/// One step of `ip_vs_mh_get_fallback()`: a re-hash with offset `(h + i) mod M`.
#[inline(never)]
extern "C" fn mh_probe(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let p = unsafe { &mut *(ctx as *mut Probe) };
    let m = p.slots_len;
    if m == 0 {
        return 1;
    }
    let roffset = (i as u32).wrapping_add(p.h) % m;
    p.check(hash::mh_hash(p.addr, p.port, MH_KEY1, roffset) % m)
}

/// The service's pick counter (rr, wrr).
#[inline(always)]
fn counter(svc: &Service) -> Result<*mut u64, u32> {
    if svc.slots_len == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let state = SCHED_STATE
        .get_ptr_mut(svc.id)
        .ok_or(reason::DROP_INTERNAL)?;
    Ok(unsafe { &raw mut (*state).picks })
}

/// Takes the next pick: returns the counter value it owns.
#[inline(always)]
fn claim(picks: *mut u64) -> u64 {
    // `core::sync::atomic` has no read-modify-write on bpfel (the target does not declare
    // CAS); the intrinsic lowers to the BPF atomic fetch-and-add instruction (ISA v3). It must
    // be SeqCst: LLVM's BPF backend lowers a *relaxed* add to the old XADD, which returns
    // nothing, even when the result is used (the JIT emits `lock xadd` either way).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(picks, 1) }
}

/// The backend in slot `slot` of the service's table.
#[inline(always)]
fn slot_backend(svc: &Service, slot: u32) -> Result<(u32, &'static Backend), u32> {
    let index = *SLOTS
        .get(svc.slots_base.wrapping_add(slot))
        .ok_or(reason::DROP_INTERNAL)?;
    let be = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
    if be.flags & BACKEND_F_AVAILABLE == 0 || be.service_id != svc.id {
        return Err(reason::DROP_INTERNAL);
    }
    Ok((index, be))
}

/// The real server of counter value `n` (rr, wrr).
#[inline(always)]
fn server(svc: &Service, n: u64) -> Result<(u32, &'static Backend), u32> {
    // Checked here, where the division is: the service entry lives in map memory, so the
    // compiler cannot reuse a check made before the atomic.
    let len = svc.slots_len as u64;
    if len == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    slot_backend(svc, (n.wrapping_add(svc.sched_offset as u64) % len) as u32)
}

/// Whether a server the hash landed on may take a new flow (IPVS `is_unavailable()`):
/// weight > 0 and not overloaded.
#[inline(always)]
fn usable(index: u32, be: &Backend) -> bool {
    be.weight > 0 && !overloaded(index)
}

/// The server's connections reached its upper threshold (see `acct`).
#[inline(always)]
fn overloaded(index: u32) -> bool {
    match BACKEND_CONNS.get_ptr(index) {
        Some(c) => unsafe { core::ptr::read_volatile(&raw const (*c).overloaded) != 0 },
        None => true,
    }
}

/// Whether the service's scheduler decides from the packet alone (sh, dh, mh): the same
/// packet always gets the same server while the table stays the same.
#[inline(always)]
pub fn deterministic(svc: &Service) -> bool {
    matches!(svc.scheduler, sched::SH | sched::DH | sched::MH)
}

/// Picks the real server for a new flow: (backend index, backend), or the reason counter.
#[inline(always)]
pub fn pick(svc: &Service, pkt: &Pkt) -> Result<(u32, &'static Backend), u32> {
    let index = pick_only(svc, pkt)?;
    let be = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
    Ok((index, be))
}

/// Picks the backend index for a new flow, or the reason counter.
#[inline(always)]
pub fn pick_only(svc: &Service, pkt: &Pkt) -> Result<u32, u32> {
    call_pick(svc, pkt, false).map(|picked| picked as u32)
}

/// `xlb_pick`'s answer for the packet: the index (with `PICK_LEARN` if a tentative lblc/lblcr
/// pick is to be learnt), or the reason counter.
#[inline(always)]
fn call_pick(svc: &Service, pkt: &Pkt, tentative: bool) -> Result<u64, u32> {
    // The arguments go through a per-CPU map rather than the stack: the chain of frames
    // down to the schedulers' callbacks must fit the verifier's 512 bytes.
    let args = PICK_ARGS.get_ptr_mut(0).ok_or(reason::DROP_INTERNAL)?;
    unsafe { PickArgs::write(args, pkt, tentative) };
    let picked = xlb_pick(svc as *const Service, args as *const PickArgs);
    if (picked & !PICK_LEARN) >> 32 != 0 {
        return Err(picked as u32);
    }
    Ok(picked)
}

/// What the schedulers look at in a packet (every byte written: the verifier checks that a
/// global function's memory arguments are initialised).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PickArgs {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    pub family: u8,
    /// A tentative pick (`peek`): lblc/lblcr leave their destination cache alone.
    pub tentative: u8,
}

impl PickArgs {
    /// Writes the arguments for `pkt` into `dst`.
    #[inline(always)]
    unsafe fn write(dst: *mut PickArgs, pkt: &Pkt, tentative: bool) {
        let w: [u32; 9] = [
            pkt.src[0],
            pkt.src[1],
            pkt.src[2],
            pkt.src[3],
            pkt.dst[0],
            pkt.dst[1],
            pkt.dst[2],
            pkt.dst[3],
            u32::from_ne_bytes({
                let [a, b] = pkt.sport.to_ne_bytes();
                [a, b, pkt.family, tentative as u8]
            }),
        ];
        // Word by word: a struct copy becomes a call to `memcpy`.
        let d = dst as *mut u32;
        for (i, v) in w.iter().enumerate() {
            unsafe { core::ptr::write_volatile(d.add(i), *v) };
        }
    }
}

/// The schedulers proper, as a *global* BPF function (exported by the linker, so its BTF
/// linkage is global): the verifier checks it once, on its own, instead of once per path
/// that reaches it, and it answers with a plain number (the backend index, or
/// `1 << 32 | reason`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn xlb_pick(svc: *const Service, args: *const PickArgs) -> u64 {
    if svc.is_null() || args.is_null() {
        return 1 << 32 | reason::DROP_INTERNAL as u64;
    }
    // SAFETY: checked non-null; the verifier checked the caller's memory.
    let (svc, pkt) = unsafe { (&*svc, &*args) };
    let picked = match svc.scheduler {
        sched::SH => sh(svc, pkt),
        sched::DH => dh(svc, pkt),
        sched::MH => mh(svc, pkt),
        sched::RR | sched::WRR => rotate(svc),
        sched::TWOS => least::twos(svc),
        s => {
            // The least-connection family, and lblc/lblcr (a destination's cached server,
            // else wlc). One call of the scan for all of them keeps the program small.
            let local = matches!(s, sched::LBLC | sched::LBLCR);
            let tentative = pkt.tentative != 0;
            let cached = if local {
                crate::locality::cached(svc, pkt, !tentative)
            } else {
                None
            };
            match cached {
                Some(index) => BACKENDS
                    .get(index)
                    .map(|b| (index, b.current()))
                    .ok_or(reason::DROP_INTERNAL),
                None => {
                    let rule = if local { sched::WLC } else { s };
                    let r = least::scan(svc, rule);
                    if local && let Ok((index, _)) = r {
                        if tentative {
                            // Learnt by `confirm`, once the flow is known to be new.
                            return PICK_LEARN | index as u64;
                        }
                        crate::locality::learn(svc, pkt, index);
                    }
                    r
                }
            }
        }
    };
    match picked {
        Ok((index, _)) => index as u64,
        Err(why) => 1 << 32 | why as u64,
    }
}

/// Set in a tentative lblc/lblcr pick's answer: wlc chose, the destination cache is to learn
/// the choice.
const PICK_LEARN: u64 = 1 << 63;

/// rr, wrr: the next number's server; an overloaded one is passed over (IPVS's cursor moves
/// on to the next server), at most once round the table. (When all are overloaded, IPVS's
/// wrr also moves its current weight during the failed scan; xlb's position stays.)
#[inline(always)]
fn rotate(svc: &Service) -> Result<(u32, &'static Backend), u32> {
    let picks = counter(svc)?;
    let (index, be) = server(svc, claim(picks))?;
    if !overloaded(index) {
        return Ok((index, be));
    }
    let mut walk = Rotate {
        svc: svc as *const Service,
        picks,
        index: 0,
        found: 0,
    };
    // len numbers in all: when every server is overloaded the counter has gone once round
    // the table and the rr cursor is where it was, as IPVS leaves it.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            svc.slots_len.saturating_sub(1),
            rotate_step as *mut core::ffi::c_void,
            &raw mut walk as *mut core::ffi::c_void,
            0,
        )
    };
    if walk.found == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let be = BACKENDS
        .get(walk.index)
        .ok_or(reason::DROP_INTERNAL)?
        .current();
    Ok((walk.index, be))
}

#[repr(C)]
struct Rotate {
    svc: *const Service,
    picks: *mut u64,
    index: u32,
    found: u32,
}

/// Claims the next number; 1 (stop) once its server is not overloaded.
#[inline(never)]
extern "C" fn rotate_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *(ctx as *mut Rotate) };
    let svc = unsafe { &*w.svc };
    match server(svc, claim(w.picks)) {
        Ok((index, _)) if !overloaded(index) => {
            w.index = index;
            w.found = 1;
            1
        }
        Ok(_) => 0,
        Err(_) => 1,
    }
}

/// A pick that is only claimed once the caller knows the flow is new.
pub struct Tentative {
    /// The rr/wrr counter value looked at; `None` for the other schedulers, whose picks
    /// consume nothing.
    n: Option<u64>,
    /// lblc/lblcr: the destination cache's upkeep is due, and (`Some(true)`) its learning of
    /// wlc's choice.
    local: Option<bool>,
    pub index: u32,
    pub backend: &'static Backend,
}

/// The server the next pick would give, without taking it.
#[inline(always)]
pub fn peek(svc: &Service, pkt: &Pkt) -> Result<Tentative, u32> {
    match svc.scheduler {
        sched::RR | sched::WRR => {
            let picks = counter(svc)?;
            let n = unsafe { core::ptr::read_volatile(picks) };
            let (index, backend) = server(svc, n)?;
            if overloaded(index) {
                // The regular path walks past it.
                return Err(reason::PASS_NO_BACKEND);
            }
            Ok(Tentative {
                n: Some(n),
                local: None,
                index,
                backend,
            })
        }
        sched::LBLC | sched::LBLCR => {
            // Nothing learnt until `confirm`: a retransmitted SYN must teach the cache
            // nothing.
            let picked = call_pick(svc, pkt, true)?;
            let index = picked as u32;
            let backend = BACKENDS.get(index).ok_or(reason::DROP_INTERNAL)?.current();
            Ok(Tentative {
                n: None,
                local: Some(picked & PICK_LEARN != 0),
                index,
                backend,
            })
        }
        _ => {
            let (index, backend) = pick(svc, pkt)?;
            Ok(Tentative {
                n: None,
                local: None,
                index,
                backend,
            })
        }
    }
}

/// Takes the pick `t` looked at. If another CPU took that number meanwhile, the pick this
/// flow really owns is returned as `Some`, so every number is used by exactly one flow, as
/// with IPVS's locked scheduler.
#[inline(always)]
pub fn confirm(svc: &Service, t: &Tentative) -> Result<Option<(u32, &'static Backend)>, u32> {
    if let Some(learnt) = t.local {
        // The arguments of the peek are still in this CPU's PICK_ARGS.
        if let Some(args) = PICK_ARGS.get(0) {
            crate::locality::commit(svc, args, t.index, learnt);
        }
        return Ok(None);
    }
    let Some(n) = t.n else {
        return Ok(None);
    };
    let m = claim(counter(svc)?);
    if m == n {
        Ok(None)
    } else {
        server(svc, m).map(Some)
    }
}

/// The client's port as the hashing schedulers use it (host order; 0 unless asked for).
#[inline(always)]
fn hashed_port(svc: &Service, pkt: &PickArgs) -> u16 {
    if svc.flags & F_PORT != 0 {
        u16::from_be(pkt.sport)
    } else {
        0
    }
}

/// `ip_vs_sh_schedule()`.
#[inline(always)]
fn sh(svc: &Service, pkt: &PickArgs) -> Result<(u32, &'static Backend), u32> {
    if svc.slots_len != SH_DH_SIZE {
        return Err(reason::PASS_NO_BACKEND);
    }
    let addr = hash::fold(pkt.src);
    let port = hashed_port(svc, pkt);
    let h = hash::sh_bucket(addr, port, 0);
    let (index, be) = slot_backend(svc, h)?;
    if usable(index, be) {
        return Ok((index, be));
    }
    if svc.flags & F_FALLBACK == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    Probe::new(svc, addr, port, h).run(SH_DH_SIZE, sh_probe)
}

/// `ip_vs_dh_schedule()`: no fallback exists.
#[inline(always)]
fn dh(svc: &Service, pkt: &PickArgs) -> Result<(u32, &'static Backend), u32> {
    if svc.slots_len != SH_DH_SIZE {
        return Err(reason::PASS_NO_BACKEND);
    }
    let (index, be) = slot_backend(svc, hash::dh_bucket(hash::fold(pkt.dst)))?;
    if usable(index, be) {
        Ok((index, be))
    } else {
        Err(reason::PASS_NO_BACKEND)
    }
}

/// `ip_vs_mh_schedule()`.
#[inline(always)]
fn mh(svc: &Service, pkt: &PickArgs) -> Result<(u32, &'static Backend), u32> {
    let m = svc.slots_len;
    if m == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    let addr = hash::fold(pkt.src);
    let port = hashed_port(svc, pkt);
    let h = hash::mh_hash(addr, port, MH_KEY1, 0) % m;
    let (index, be) = slot_backend(svc, h)?;
    if usable(index, be) {
        return Ok((index, be));
    }
    if svc.flags & F_FALLBACK == 0 {
        return Err(reason::PASS_NO_BACKEND);
    }
    Probe::new(svc, addr, port, h).run(m, mh_probe)
}
