//! Baseline XDP programs for `cargo xtask bench`, measured in the same run as xlb's program,
//! and the restore-and-tail-call shim that makes `BPF_PROG_TEST_RUN`'s `repeat` meaningful
//! for programs that rewrite the frame (see BENCHMARKS.md).
#![no_std]
#![no_main]
// Keys by reference, as in lb-ebpf (no extra stack copy before the helper call).
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, ProgramArray},
    programs::XdpContext,
};
use lb_common::{Flow, FlowKeyV4};

/// Length of the benchmark frames (Ethernet + IPv4 + TCP with 12 bytes of options).
const PKT_LEN: usize = 66;

/// Shim configuration: the frame to restore before every run (its first `len` bytes, 66 if
/// 0), and the optional per-run source-address variation (`src = 192.0.0.0 | (ctr & mask)`;
/// mask 0 = fixed flow).
#[repr(C)]
pub struct WrapCfg {
    pub pkt: [u8; 128],
    pub mask: u32,
    pub len: u32,
    pub ctr: u64,
}

#[map]
static WRAP_CFG: Array<WrapCfg> = Array::with_max_entries(1, 0);
#[map]
static WRAP_JMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The 5-tuple table of the "parse + one hash lookup" baseline (filled by the bench).
#[map]
static BASE_FLOWS: HashMap<[u32; 4], u32> = HashMap::with_max_entries(1024, 0);

/// Same key and value as xlb's IPv4 connection table; the bench sets the same capacity.
#[map]
static BASE_LRU: LruHashMap<FlowKeyV4, Flow> = LruHashMap::with_max_entries(1 << 20, 0);
#[map]
static BASE_LRU2: LruHashMap<FlowKeyV4, Flow> = LruHashMap::with_max_entries(1 << 20, 0);
/// Kept full: every insert evicts.
#[map]
static BASE_LRU_FULL: LruHashMap<FlowKeyV4, Flow> = LruHashMap::with_max_entries(1 << 20, 0);

/// A plain (preallocated) hash shaped like xlb's connection table, kept full: the floor of
/// xlb's recycling (lookup the new key, look up and delete the oldest entry, insert).
#[map]
static BASE_HASH_FULL: HashMap<FlowKeyV4, Flow> = HashMap::with_max_entries(1 << 20, 0);
/// [0]: how many inserts back the oldest entry of `BASE_HASH_FULL` was made (its capacity).
#[map]
static BASE_HASH_LAG: Array<u32> = Array::with_max_entries(1, 0);

struct Parsed {
    saddr: u32,
    daddr: u32,
    ports: u32,
}

impl Parsed {
    /// The packet's 5-tuple as xlb keys it, from source address `saddr`.
    #[inline(always)]
    fn key(&self, saddr: u32) -> FlowKeyV4 {
        FlowKeyV4::new(
            saddr,
            self.daddr,
            self.ports as u16,
            (self.ports >> 16) as u16,
            6,
        )
    }
}

#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Parsed> {
    let start = ctx.data();
    let end = ctx.data_end();
    // Ethernet (14) + IPv4 without options (20) + TCP ports (4)
    if start + 38 > end {
        return None;
    }
    unsafe {
        if *((start + 12) as *const u16) != 0x0008u16 {
            return None;
        }
        let vihl = *((start + 14) as *const u8);
        if vihl != 0x45 || *((start + 23) as *const u8) != 6 {
            return None;
        }
        Some(Parsed {
            saddr: *((start + 26) as *const u32),
            daddr: *((start + 30) as *const u32),
            ports: *((start + 34) as *const u32),
        })
    }
}

#[inline(always)]
fn swap_macs(ctx: &XdpContext) {
    let p = ctx.data() as *mut [u16; 6];
    if ctx.data() + 12 > ctx.data_end() {
        return;
    }
    unsafe {
        let m = *p;
        *p = [m[3], m[4], m[5], m[0], m[1], m[2]];
    }
}

/// (i) the harness floor.
#[xdp]
pub fn base_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// (ii) parse Ethernet + IPv4 + TCP, swap MACs, transmit.
#[xdp]
pub fn base_parse_tx(ctx: XdpContext) -> u32 {
    if parse(&ctx).is_none() {
        return xdp_action::XDP_PASS;
    }
    swap_macs(&ctx);
    xdp_action::XDP_TX
}

/// (iii) (ii) plus one hash lookup of the 5-tuple (a hit).
#[xdp]
pub fn base_parse_hash_tx(ctx: XdpContext) -> u32 {
    let Some(p) = parse(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = [p.saddr, p.daddr, p.ports, 6];
    if unsafe { BASE_FLOWS.get(&key) }.is_none() {
        return xdp_action::XDP_DROP;
    }
    swap_macs(&ctx);
    xdp_action::XDP_TX
}

/// (iv) (ii) plus the insert of the packet's 5-tuple into an LRU map shaped like xlb's
/// connection table, with the same capacity and occupancy: the kernel's cost that a new flow
/// cannot avoid.
#[xdp]
pub fn base_lru_insert(ctx: XdpContext) -> u32 {
    insert_into(&ctx, &BASE_LRU)
}

/// (iv) into a full table: every insert evicts the least recently used entry.
#[xdp]
pub fn base_lru_insert_full(ctx: XdpContext) -> u32 {
    insert_into(&ctx, &BASE_LRU_FULL)
}

#[inline(always)]
fn insert_into(ctx: &XdpContext, map: &LruHashMap<FlowKeyV4, Flow>) -> u32 {
    let Some(p) = parse(ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = p.key(p.saddr);
    let v = Flow::new(1, 1, 0, 0, 3);
    if map.insert(&key, &v, 0).is_err() {
        return xdp_action::XDP_DROP;
    }
    swap_macs(ctx);
    xdp_action::XDP_TX
}

/// (v) (iv) preceded by a lookup of the same key (a miss), as any connection table must do
/// before it inserts: shows what of xlb's new-flow cost is the table's.
#[xdp]
pub fn base_lru_lookup_insert(ctx: XdpContext) -> u32 {
    let Some(p) = parse(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = p.key(p.saddr);
    if BASE_LRU2.get_ptr(&key).is_some() {
        return xdp_action::XDP_DROP;
    }
    let v = Flow::new(1, 1, 0, 0, 3);
    if BASE_LRU2.insert(&key, &v, 0).is_err() {
        return xdp_action::XDP_DROP;
    }
    swap_macs(&ctx);
    xdp_action::XDP_TX
}

/// (vi) xlb's way with a full table on a plain hash: a lookup of the new key (a miss), a
/// lookup and a delete of the oldest entry (inserted `BASE_HASH_LAG` packets ago, so FIFO),
/// an insert.
#[xdp]
pub fn base_hash_recycle(ctx: XdpContext) -> u32 {
    let Some(p) = parse(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = p.key(p.saddr);
    if BASE_HASH_FULL.get_ptr(&key).is_some() {
        return xdp_action::XDP_DROP;
    }
    let lag = BASE_HASH_LAG.get(0).copied().unwrap_or(0);
    let old = u32::from_be(p.saddr).wrapping_sub(lag).to_be();
    let victim = p.key(old);
    if BASE_HASH_FULL.get_ptr(&victim).is_some() {
        let _ = BASE_HASH_FULL.remove(&victim);
    }
    let v = Flow::new(1, 1, 0, 0, 3);
    if BASE_HASH_FULL.insert(&key, &v, 0).is_err() {
        return xdp_action::XDP_DROP;
    }
    swap_macs(&ctx);
    xdp_action::XDP_TX
}

/// Not measured: removes the packet's 5-tuple from both baseline tables, so the bench can take
/// back what a measurement inserted and the tables stay at the same occupancy as xlb's.
#[xdp]
pub fn base_lru_delete(ctx: XdpContext) -> u32 {
    let Some(p) = parse(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let key = p.key(p.saddr);
    let _ = BASE_LRU.remove(&key);
    let _ = BASE_LRU2.remove(&key);
    xdp_action::XDP_DROP
}

/// The shim: restores the original frame (and optionally varies the source address), then
/// tail-calls the program under test. `repeat` runs then all see the same input.
#[xdp]
pub fn wrap(ctx: XdpContext) -> u32 {
    let Some(cfg) = WRAP_CFG.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let len = match unsafe { (*cfg).len } {
        0 => PKT_LEN,
        n => (n as usize).min(128),
    };
    // A program that encapsulated moved the frame's start: put it back (the frame's end is
    // never moved by the measured paths).
    let now = ctx.data_end() - ctx.data();
    if now > len {
        let delta = (now - len) as i32;
        if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
            return xdp_action::XDP_ABORTED;
        }
    }
    let start = ctx.data();
    if start + PKT_LEN > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    unsafe {
        // Word by word with volatile accesses: a plain array copy becomes a call to a memmove
        // subprogram with a byte loop, which would triple the shim's cost.
        let dst = start as *mut u64;
        let src = &(*cfg).pkt as *const [u8; 128] as *const u64;
        for i in 0..8 {
            core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i)));
        }
        let dst2 = (start + 64) as *mut u16;
        let src2 = (src as *const u8).add(64) as *const u16;
        core::ptr::write_volatile(dst2, core::ptr::read_volatile(src2));
        // Longer frames (IPv6): the rest, two bytes at a time.
        for i in 0..31usize {
            let off = PKT_LEN + i * 2;
            if off + 2 > len || start + off + 2 > ctx.data_end() {
                break;
            }
            let d = (start + off) as *mut u16;
            let s2 = (src as *const u8).add(off & 127) as *const u16;
            core::ptr::write_volatile(d, core::ptr::read_volatile(s2));
        }
        let mask = (*cfg).mask;
        if mask != 0 {
            let addr = (0xC000_0000u32 | ((*cfg).ctr as u32 & mask)).to_be();
            (*cfg).ctr += 1;
            *((start + 26) as *mut u32) = addr;
        }
    }
    unsafe { WRAP_JMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
