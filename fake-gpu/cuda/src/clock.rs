//! Time as the fake device sees it: the node's virtual clock (the model's `state::clock`).
//!
//! Kernels take simulated time, waits move the process's clock, and events record virtual
//! times, so anything measured against this clock — a compute limiter's accuracy above all —
//! does not depend on how loaded the host is.

use std::sync::atomic::Ordering;

use tessera_fake_gpu_model::Device;

use crate::launch::Shape;
use crate::process::Process;

/// Resident blocks per SM at most (the hardware's limit on recent GPUs).
const MAX_BLOCKS_PER_SM: u64 = 32;

/// How long a kernel of `shape` holds `device`: its blocks run in waves of (SMs × resident
/// blocks per SM), each wave the device's `wave_ns` (100 µs unless configured). The SMs are what kernels contend for.
pub fn kernel_ns(device: &Device, shape: &Shape) -> u64 {
    let per_sm = (u64::from(device.max_threads_per_sm) / shape.threads_per_block().max(1))
        .clamp(1, MAX_BLOCKS_PER_SM);
    let per_wave = (per_sm * u64::from(device.sm_count)).max(1);
    shape.blocks().div_ceil(per_wave).max(1) * device.wave_ns
}

/// The process's virtual present; never 0 (0 means "not recorded" to callers).
pub fn now_ns(process: &Process) -> u64 {
    process.lease.clock_now().max(1)
}

/// When everything the process has queued so far is done.
pub fn work_done_ns(process: &Process) -> u64 {
    now_ns(process).max(process.launches.pending_until.load(Ordering::Acquire))
}

/// Runs a kernel of `duration` on the process's CUDA device `ordinal`.
pub fn run(process: &Process, ordinal: usize, duration: u64) {
    let Some(gpu) = process.gpus.get(ordinal) else {
        return;
    };
    let placement = process.lease.run_kernel(gpu.physical, duration);
    process
        .launches
        .pending_until
        .fetch_max(placement.end, Ordering::AcqRel);
}

/// Waits (in virtual time) for everything the process has queued.
pub fn synchronise(process: &Process) {
    process.lease.advance_to(work_done_ns(process));
}
