//! What a launch costs in GPU time, learned by timing sampled launches with CUDA events.
//!
//! The limiter charges every launch before the GPU has run it, so it needs an estimate: the
//! duration of the last launches of the same kernel with the same grid. At most every
//! `SAMPLE_EVERY_NS` per thread, a launch is bracketed by
//! two events on its own stream; the next launch on that thread reads their elapsed time if the
//! GPU is done with them, and never waits for it. Events are what every CUDA driver offers for
//! timing and cost a few hundred nanoseconds, paid on one launch in thousands.
//!
//! Sampling stays out of CUDA graph capture (PyTorch's `torch.cuda.graph`): a launch into a
//! capturing stream is not timed (an event recorded there would become a node of the user's
//! graph), and the shim's own event calls run in the relaxed capture mode, so that they cannot
//! invalidate a global-mode capture another thread has under way.
//!
//! The estimate is the smallest of the last `ROUND` samples (and follows a smaller one at once):
//! a sample can only be inflated (another context's kernels or time slice between the two
//! events), never deflated, so the low samples are the truthful ones; taking a fresh minimum
//! every round lets a kernel that really grew be charged its new cost within a round.

use std::cell::Cell;
use std::ffi::{c_float, c_int};
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_gpu_abi::cuda::*;

use crate::real::cuda as real;

/// How often a thread times a launch, on the limiter's clock.
const SAMPLE_EVERY_NS: u64 = 2_000_000;
/// Kernel shapes remembered per process.
const ENTRIES: usize = 4096;
const PROBES: usize = 16;

/// Samples per round of the minimum.
const ROUND: u64 = 16;

struct Entry {
    key: AtomicU64,
    cost: AtomicU64,
    /// The smallest sample of the round in progress (0 = none yet).
    round_min: AtomicU64,
    round_count: AtomicU64,
}

static TABLE: [Entry; ENTRIES] = [const {
    Entry {
        key: AtomicU64::new(0),
        cost: AtomicU64::new(0),
        round_min: AtomicU64::new(0),
        round_count: AtomicU64::new(0),
    }
}; ENTRIES];
/// The latest sample of any kernel: the estimate for one not timed yet (or not in the table).
static FALLBACK: AtomicU64 = AtomicU64::new(0);

/// A kernel shape's key: the function (or graph) and its block count. Never 0.
#[inline(always)]
pub fn key(handle: usize, blocks: u64) -> u64 {
    let mixed = (handle as u64 ^ blocks.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mixed | 1
}

#[inline(always)]
fn probe(key: u64) -> impl Iterator<Item = &'static Entry> {
    let start = (key >> 20) as usize;
    (0..PROBES).map(move |i| &TABLE[(start + i) % ENTRIES])
}

/// The cost (ns) to charge for a launch of `key`; 0 while nothing has been timed.
#[inline(always)]
pub fn estimate(key: u64) -> u64 {
    for entry in probe(key) {
        match entry.key.load(Ordering::Acquire) {
            0 => break,
            k if k == key => return entry.cost.load(Ordering::Relaxed),
            _ => {}
        }
    }
    FALLBACK.load(Ordering::Relaxed)
}

/// The cost measured for `key` itself, if any launch of it has been timed: never the fallback,
/// for decisions that must not rest on a guess (filling a gap).
#[inline(always)]
pub fn measured(key: u64) -> Option<u64> {
    for entry in probe(key) {
        match entry.key.load(Ordering::Acquire) {
            0 => break,
            k if k == key => return Some(entry.cost.load(Ordering::Relaxed)).filter(|&c| c > 0),
            _ => {}
        }
    }
    None
}

pub(super) fn learn(key: u64, sample: u64) {
    if sample == 0 {
        return;
    }
    FALLBACK.store(sample, Ordering::Relaxed);
    for entry in probe(key) {
        let current = entry.key.load(Ordering::Acquire);
        let mine = current == key
            || (current == 0
                && match entry
                    .key
                    .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => true,
                    Err(actual) => actual == key,
                });
        if mine {
            // Races between threads can lose a sample or mix two rounds; both are harmless.
            let low = entry.round_min.load(Ordering::Relaxed);
            let low = if low == 0 { sample } else { low.min(sample) };
            entry.round_min.store(low, Ordering::Relaxed);
            let cost = entry.cost.load(Ordering::Relaxed);
            if cost == 0 || sample < cost {
                entry.cost.store(sample, Ordering::Relaxed);
            }
            if entry.round_count.fetch_add(1, Ordering::Relaxed) + 1 >= ROUND {
                entry.cost.store(low, Ordering::Relaxed);
                entry.round_min.store(0, Ordering::Relaxed);
                entry.round_count.store(0, Ordering::Relaxed);
            }
            return;
        }
    }
}

/// One thread's timing in progress.
#[derive(Clone, Copy)]
struct Sampler {
    ctx: CUcontext,
    start: CUevent,
    end: CUevent,
    /// The key being timed; 0 = none in flight.
    pending: u64,
    next_at: u64,
}

impl Sampler {
    const IDLE: Sampler = Sampler {
        ctx: std::ptr::null_mut(),
        start: std::ptr::null_mut(),
        end: std::ptr::null_mut(),
        pending: 0,
        next_at: 0,
    };
}

thread_local! {
    static SAMPLER: Cell<Sampler> = const { Cell::new(Sampler::IDLE) };
}

/// Whether this launch should be timed; if so, its start event is recorded on `stream`.
#[inline(always)]
pub fn begin(now: u64, key: u64, stream: CUstream, per_thread: bool) -> bool {
    let sampler = SAMPLER.with(Cell::get);
    if sampler.pending == 0 && now < sampler.next_at {
        return false;
    }
    begin_slow(sampler, now, key, stream, per_thread)
}

#[cold]
fn begin_slow(
    mut sampler: Sampler,
    now: u64,
    key: u64,
    stream: CUstream,
    per_thread: bool,
) -> bool {
    let _relaxed = RelaxedCapture::enter();
    if sampler.pending != 0 {
        resolve(&mut sampler);
        if sampler.pending != 0 || now < sampler.next_at {
            SAMPLER.with(|s| s.set(sampler));
            return false;
        }
    }
    let started = !crate::stream::capturing(stream, per_thread)
        && events_for_current_context(&mut sampler)
        && record(sampler.start, stream, per_thread);
    if started {
        sampler.pending = key;
    }
    // Also after a failure (no context, a capturing stream): try again next period, not on
    // every launch.
    sampler.next_at = now.saturating_add(SAMPLE_EVERY_NS);
    SAMPLER.with(|s| s.set(sampler));
    started
}

/// Records the end event of a launch [`begin`] started timing.
pub fn end(stream: CUstream, per_thread: bool) {
    let _relaxed = RelaxedCapture::enter();
    let mut sampler = SAMPLER.with(Cell::get);
    if !record(sampler.end, stream, per_thread) {
        sampler.pending = 0;
    }
    SAMPLER.with(|s| s.set(sampler));
}

/// Drops a timing whose launch failed.
pub fn abandon() {
    SAMPLER.with(|s| {
        let mut sampler = s.get();
        sampler.pending = 0;
        s.set(sampler);
    });
}

/// In a fork child: the events belong to the parent's driver state.
pub fn forget_after_fork() {
    SAMPLER.with(|s| s.set(Sampler::IDLE));
}

/// `CU_STREAM_CAPTURE_MODE_RELAXED`.
const CU_STREAM_CAPTURE_MODE_RELAXED: c_int = 2;

/// The calling thread in the relaxed stream-capture mode until dropped.
struct RelaxedCapture(Option<c_int>);

impl RelaxedCapture {
    fn enter() -> Self {
        let Some(exchange) = real::cuThreadExchangeStreamCaptureMode.get() else {
            return RelaxedCapture(None);
        };
        let mut mode = CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: real driver call with a valid in/out pointer.
        match unsafe { exchange(&mut mode) } {
            CUDA_SUCCESS => RelaxedCapture(Some(mode)),
            _ => RelaxedCapture(None),
        }
    }
}

impl Drop for RelaxedCapture {
    fn drop(&mut self) {
        if let (Some(mut previous), Some(exchange)) =
            (self.0, real::cuThreadExchangeStreamCaptureMode.get())
        {
            // SAFETY: as in `enter`; puts back the mode the thread had.
            unsafe { exchange(&mut previous) };
        }
    }
}

fn record(event: CUevent, stream: CUstream, per_thread: bool) -> bool {
    let f = if per_thread {
        real::cuEventRecord_ptsz.get()
    } else {
        real::cuEventRecord.get()
    };
    // SAFETY: real driver call with an event this thread created in the current context.
    f.is_some_and(|f| unsafe { f(event, stream) } == CUDA_SUCCESS)
}

/// Reads a finished timing into the table; leaves it pending while the GPU is not there yet.
fn resolve(sampler: &mut Sampler) {
    let (Some(query), Some(elapsed)) = (real::cuEventQuery.get(), real::cuEventElapsedTime.get())
    else {
        sampler.pending = 0;
        return;
    };
    // SAFETY: real driver calls on events this thread created.
    match unsafe { query(sampler.end) } {
        CUDA_ERROR_NOT_READY => return,
        CUDA_SUCCESS => {
            let mut ms: c_float = 0.0;
            if unsafe { elapsed(&mut ms, sampler.start, sampler.end) } == CUDA_SUCCESS && ms > 0.0 {
                learn(sampler.pending, (f64::from(ms) * 1e6) as u64);
            }
        }
        _ => {}
    }
    sampler.pending = 0;
}

/// Makes sure the thread's two events belong to its current context (events cannot be recorded
/// on another context's streams).
fn events_for_current_context(sampler: &mut Sampler) -> bool {
    let (Some(get_current), Some(create)) =
        (real::cuCtxGetCurrent.get(), real::cuEventCreate.get())
    else {
        return false;
    };
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: real driver call with a valid out-pointer.
    if unsafe { get_current(&mut ctx) } != CUDA_SUCCESS || ctx.is_null() {
        return false;
    }
    if ctx == sampler.ctx && !sampler.start.is_null() {
        return true;
    }
    if let Some(destroy) = real::cuEventDestroy_v2.get() {
        for event in [sampler.start, sampler.end] {
            if !event.is_null() {
                // SAFETY: an event this thread created; failure (context gone) leaves nothing to do.
                unsafe { destroy(event) };
            }
        }
    }
    *sampler = Sampler {
        ctx,
        ..Sampler::IDLE
    };
    let mut start: CUevent = std::ptr::null_mut();
    let mut end: CUevent = std::ptr::null_mut();
    // SAFETY: real driver calls with valid out-pointers, in the current context.
    let made = unsafe {
        create(&mut start, CU_EVENT_DEFAULT) == CUDA_SUCCESS
            && create(&mut end, CU_EVENT_DEFAULT) == CUDA_SUCCESS
    };
    if !made {
        return false;
    }
    sampler.start = start;
    sampler.end = end;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cost_is_the_least_recent_sample_and_follows_a_kernel_that_grew() {
        let kernel = key(0x1000, 7680);
        learn(kernel, 1_000_000);
        assert_eq!(estimate(kernel), 1_000_000);
        // Inflated samples (someone else's kernels between the events) never raise it...
        learn(kernel, 1_400_000);
        learn(kernel, 1_200_000);
        assert_eq!(estimate(kernel), 1_000_000);
        // ... a smaller one lowers it at once ...
        learn(kernel, 900_000);
        assert_eq!(estimate(kernel), 900_000);
        // ... and a kernel that really got longer is charged its new cost after a round.
        for _ in 0..2 * ROUND {
            learn(kernel, 2_000_000);
        }
        assert_eq!(estimate(kernel), 2_000_000);
    }

    #[test]
    fn shapes_are_told_apart_and_an_unknown_one_costs_the_latest_sample() {
        let small = key(0x2000, 1);
        let large = key(0x2000, 1 << 20);
        assert_ne!(small, large);
        learn(small, 10_000);
        learn(large, 5_000_000);
        assert_eq!((estimate(small), estimate(large)), (10_000, 5_000_000));
        assert_eq!(estimate(key(0x3000, 3)), 5_000_000, "the fallback");
    }
}
