//! Streams and events, on the virtual clock ([`crate::clock`]). Synchronising waits (in virtual
//! time) until everything the process queued is done; an event records the virtual time at which
//! the work queued before it completes, so elapsed times are simulated kernel time. Queries
//! always answer "complete": a poll loop would otherwise spin without moving virtual time.
//! Completion is tracked per process, not per stream.

use std::ffi::{c_float, c_int, c_uint};
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_gpu_abi::cuda::*;

use crate::clock::{synchronise, work_done_ns};
use crate::context::{Current, current};
use crate::guard::{Result, check, guard, put};
use crate::handles::{Kind, Registry, from_ptr, to_ptr};
use crate::process::{Process, process};

pub struct Stream {
    ctx: Current,
}

pub struct Event {
    ctx: u64,
    flags: c_uint,
    /// Device-clock time of the last record; 0 = never recorded.
    recorded_ns: AtomicU64,
}

pub struct Streams {
    streams: Registry<Stream>,
    events: Registry<Event>,
}

impl Streams {
    pub fn new() -> Self {
        Self {
            streams: Registry::new(Kind::Stream),
            events: Registry::new(Kind::Event),
        }
    }

    /// Destroys a context's streams and events with it.
    pub fn destroy_context(&self, ctx: u64) {
        self.streams.remove_where(|s| s.ctx.handle == ctx);
        self.events.remove_where(|e| e.ctx == ctx);
    }
}

/// Whether a stream handle means "the default stream" (NULL, legacy or per-thread).
fn is_default(stream: CUstream) -> bool {
    matches!(stream as usize, 0 | CU_STREAM_LEGACY | CU_STREAM_PER_THREAD)
}

/// The context work on `stream` runs in: the stream's own, or the current one for the default
/// streams.
pub fn stream_target(process: &Process, stream: CUstream) -> Result<Current> {
    if is_default(stream) {
        return current(process);
    }
    process
        .streams
        .streams
        .get(from_ptr(stream))
        .map(|s| s.ctx)
        .ok_or(CUDA_ERROR_INVALID_HANDLE)
}

/// Checks a stream argument without needing its context (on the launch path: the default
/// streams cost nothing, others one shard lookup).
#[inline]
pub fn validate_stream(process: &Process, stream: CUstream) -> Result {
    if is_default(stream) || process.streams.streams.contains(from_ptr(stream)) {
        Ok(())
    } else {
        Err(CUDA_ERROR_INVALID_HANDLE)
    }
}

fn create_stream(out: *mut CUstream, flags: c_uint) -> Result {
    let process = process()?;
    check(!out.is_null() && (flags == CU_STREAM_DEFAULT || flags == CU_STREAM_NON_BLOCKING))?;
    let ctx = current(process)?;
    let (handle, _) = process.streams.streams.insert_with(|_| Stream { ctx });
    unsafe { put(out, to_ptr(handle)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreate(stream: *mut CUstream, flags: c_uint) -> CUresult {
    guard(|| create_stream(stream, flags))
}

/// Priorities are accepted (any value is clamped by the real driver) and not simulated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    stream: *mut CUstream,
    flags: c_uint,
    _priority: c_int,
) -> CUresult {
    guard(|| create_stream(stream, flags))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamDestroy_v2(stream: CUstream) -> CUresult {
    guard(|| {
        let process = process()?;
        process
            .streams
            .streams
            .remove(from_ptr(stream))
            .map(drop)
            .ok_or(CUDA_ERROR_INVALID_HANDLE)
    })
}

fn stream_idle(stream: CUstream) -> Result {
    stream_target(process()?, stream).map(drop)
}

fn stream_synchronise(stream: CUstream) -> Result {
    let process = process()?;
    stream_target(process, stream)?;
    synchronise(process);
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize(stream: CUstream) -> CUresult {
    guard(|| stream_synchronise(stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamSynchronize_ptsz(stream: CUstream) -> CUresult {
    guard(|| stream_synchronise(stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery(stream: CUstream) -> CUresult {
    guard(|| stream_idle(stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuStreamQuery_ptsz(stream: CUstream) -> CUresult {
    guard(|| stream_idle(stream))
}

// --- Events -------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventCreate(event: *mut CUevent, flags: c_uint) -> CUresult {
    guard(|| {
        let process = process()?;
        let known = CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
        check(!event.is_null() && flags & !known == 0)?;
        // An interprocess event must not time (the real driver's rule).
        check(flags & CU_EVENT_INTERPROCESS == 0 || flags & CU_EVENT_DISABLE_TIMING != 0)?;
        let ctx = current(process)?;
        let (handle, _) = process.streams.events.insert_with(|_| Event {
            ctx: ctx.handle,
            flags,
            recorded_ns: AtomicU64::new(0),
        });
        unsafe { put(event, to_ptr(handle)) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventDestroy_v2(event: CUevent) -> CUresult {
    guard(|| {
        let process = process()?;
        process
            .streams
            .events
            .remove(from_ptr(event))
            .map(drop)
            .ok_or(CUDA_ERROR_INVALID_HANDLE)
    })
}

fn record(event: CUevent, stream: CUstream) -> Result {
    let process = process()?;
    let event = process
        .streams
        .events
        .get(from_ptr(event))
        .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
    validate_stream(process, stream)?;
    event
        .recorded_ns
        .store(work_done_ns(process), Ordering::Release);
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord(event: CUevent, stream: CUstream) -> CUresult {
    guard(|| record(event, stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventRecord_ptsz(event: CUevent, stream: CUstream) -> CUresult {
    guard(|| record(event, stream))
}

/// Recorded work is always complete.
fn event_done(event: CUevent) -> Result {
    let process = process()?;
    check_event(process, event)
}

fn check_event(process: &Process, event: CUevent) -> Result {
    if process.streams.events.contains(from_ptr(event)) {
        Ok(())
    } else {
        Err(CUDA_ERROR_INVALID_HANDLE)
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventQuery(event: CUevent) -> CUresult {
    guard(|| event_done(event))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventSynchronize(event: CUevent) -> CUresult {
    guard(|| {
        let process = process()?;
        let at = process
            .streams
            .events
            .get(from_ptr(event))
            .ok_or(CUDA_ERROR_INVALID_HANDLE)?
            .recorded_ns
            .load(Ordering::Acquire);
        process.lease.advance_to(at);
        Ok(())
    })
}

/// Milliseconds between two records; both must have been recorded with timing enabled.
fn elapsed(ms: *mut c_float, start: CUevent, end: CUevent) -> Result {
    let process = process()?;
    check(!ms.is_null())?;
    let times = [start, end].map(|e| {
        let event = process
            .streams
            .events
            .get(from_ptr(e))
            .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
        let at = event.recorded_ns.load(Ordering::Acquire);
        if event.flags & CU_EVENT_DISABLE_TIMING != 0 || at == 0 {
            return Err(CUDA_ERROR_INVALID_HANDLE);
        }
        Ok(at)
    });
    let [start, end] = times;
    let (start, end) = (start?, end?);
    let millis = (end as i128 - start as i128) as f64 / 1e6;
    unsafe { put(ms, millis as c_float) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime(
    ms: *mut c_float,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    guard(|| elapsed(ms, start, end))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut c_float,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    guard(|| elapsed(ms, start, end))
}
