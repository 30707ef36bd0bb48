//! Bounds-checked access to the frame, shared by the balancer and the decapsulator.

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
