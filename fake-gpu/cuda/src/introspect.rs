//! What tests ask the fake driver about itself, exported as plain C functions with a `fakegpu_`
//! prefix (a preloaded interposer has no reason to touch them, so they report what the driver
//! really did, beneath any shim).
//!
//! Device arguments are CUDA ordinals of the calling process (after `CUDA_VISIBLE_DEVICES`).
//! Before a successful `cuInit`, or for an ordinal that does not exist, the memory queries
//! answer `u64::MAX` and the counters 0. None of them panics or fails.

use std::ffi::c_int;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::process::{Gpu, Process, try_process};

fn query(default: u64, body: impl FnOnce(&Process) -> Option<u64>) -> u64 {
    catch_unwind(AssertUnwindSafe(|| try_process().and_then(body)))
        .ok()
        .flatten()
        .unwrap_or(default)
}

fn gpu(process: &Process, ordinal: c_int) -> Option<&Gpu> {
    process.gpu(ordinal).ok()
}

/// Device memory in use on the card by every process of the node (what bounds allocations).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_device_memory_used(ordinal: c_int) -> u64 {
    query(u64::MAX, |p| {
        gpu(p, ordinal).map(|g| p.lease.region().used(g.physical))
    })
}

/// Managed memory on the card's account, every process of the node (not limited by capacity).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_managed_memory_used(ordinal: c_int) -> u64 {
    query(u64::MAX, |p| {
        gpu(p, ordinal).map(|g| p.lease.region().managed(g.physical))
    })
}

/// Managed memory this process advised to prefer the host (`cuMemAdvise`).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_process_managed_host_preferred() -> u64 {
    query(u64::MAX, |p| Some(p.memory.host_preferred_bytes()))
}

/// Device memory this process holds on the card.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_process_memory_used(ordinal: c_int) -> u64 {
    query(u64::MAX, |p| {
        gpu(p, ordinal).map(|g| p.lease.used(g.physical))
    })
}

/// Managed memory this process holds on the card's account.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_process_managed_memory_used(ordinal: c_int) -> u64 {
    query(u64::MAX, |p| {
        gpu(p, ordinal).map(|g| p.lease.managed(g.physical))
    })
}

/// The card's capacity (what `cuDeviceTotalMem` answers without a shim).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_device_memory_total(ordinal: c_int) -> u64 {
    query(u64::MAX, |p| gpu(p, ordinal).map(|g| g.spec.memory))
}

/// Page-locked host memory (`cuMemAllocHost`, `cuMemHostAlloc`) this process holds.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_host_memory_used() -> u64 {
    query(u64::MAX, |p| Some(p.memory.host_bytes()))
}

/// Kernels this process ran: each direct launch (plain, `Ex`, cooperative, any stream variant)
/// counts 1, each graph launch counts its kernel nodes.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_launch_count() -> u64 {
    query(0, |p| Some(p.launches.kernels.total()))
}

/// Cooperative launches this process made (also counted by `fakegpu_launch_count`).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_cooperative_launch_count() -> u64 {
    query(0, |p| Some(p.launches.cooperative.total()))
}

/// `cuGraphLaunch` calls this process made.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_graph_launch_count() -> u64 {
    query(0, |p| Some(p.launches.graphs.total()))
}

/// Live contexts (an active primary context and created ones) on a device, in this process.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_context_count(ordinal: c_int) -> u64 {
    query(0, |p| {
        gpu(p, ordinal).map(|_| u64::from(p.contexts.active_on(ordinal as usize)))
    })
}

// --- The virtual clock ----------------------------------------------------------------------------
//
// Also how a compute limiter running over the fake driver keeps time: a limiter that finds
// `fakegpu_clock_ns` and `fakegpu_clock_sleep_until_ns` in the driver waits on the virtual clock
// instead of the host's, so its accuracy can be measured independently of host load.

/// The calling process's virtual time in ns (0 before `cuInit`).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_clock_ns() -> u64 {
    query(0, |p| Some(crate::clock::now_ns(p)))
}

/// Sleeps until the calling process's virtual clock reaches `until_ns` (at once if it has).
/// Returns 0, or -1 before `cuInit`.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_clock_sleep_until_ns(until_ns: u64) -> c_int {
    catch_unwind(AssertUnwindSafe(|| match try_process() {
        Some(p) => {
            p.lease.advance_to(until_ns);
            0
        }
        None => -1,
    }))
    .unwrap_or(-1)
}

/// Stops the calling process holding other processes' clocks back until it next runs a kernel
/// or waits (call it before sitting idle).
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_clock_leave() {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if let Some(p) = try_process() {
            p.lease.leave_lockstep();
        }
    }));
}

/// Kernel time (virtual ns) the calling process ran on the device.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_process_busy_ns(ordinal: c_int) -> u64 {
    query(0, |p| gpu(p, ordinal).map(|g| p.lease.busy(g.physical)))
}

/// Kernel time (virtual ns) the device ran, every process.
#[unsafe(no_mangle)]
pub extern "C" fn fakegpu_device_busy_ns(ordinal: c_int) -> u64 {
    query(0, |p| {
        gpu(p, ordinal).map(|g| p.lease.region().device_busy(g.physical))
    })
}
