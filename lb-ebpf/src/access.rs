//! Bounds-checked access to the frame and the Ethernet constants, shared by the balancer and
//! the decapsulator.

use aya_ebpf::programs::XdpContext;

/// Pointer to a `T` at `off` bytes into the frame, if the frame is long enough: the check
/// the verifier needs before any access.
#[inline(always)]
pub fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// A big-endian 16-bit field at `off`.
#[inline(always)]
pub fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    at::<u16>(ctx, off).map(|p| u16::from_be(unsafe { *p }))
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
