//! Questions about a stream the memory and compute paths both ask the real driver.

use std::ffi::c_int;

use tessera_gpu_abi::cuda::*;

use crate::real::cuda as real;

/// `CU_STREAM_CAPTURE_STATUS_NONE`.
const CU_STREAM_CAPTURE_STATUS_NONE: c_int = 0;

/// Whether `stream` is being captured into a graph (or its status cannot be read, which is
/// treated the same: work the shim adds to a capturing stream would become part of the user's
/// graph). `per_thread`: the caller came through a `_ptsz` entry point, where stream 0 is the
/// thread's default stream.
pub fn capturing(stream: CUstream, per_thread: bool) -> bool {
    let f = if per_thread {
        real::cuStreamIsCapturing_ptsz.get()
    } else {
        real::cuStreamIsCapturing.get()
    };
    // A driver without the call (the fake, drivers before CUDA 10) has no capture either.
    let Some(f) = f else { return false };
    let mut status: c_int = 0;
    // SAFETY: real driver call with a valid out-pointer.
    let rc = unsafe { f(stream, &mut status) };
    rc != CUDA_SUCCESS || status != CU_STREAM_CAPTURE_STATUS_NONE
}

/// Waits for the work queued on `stream` (the thread's default stream for stream 0 when
/// `per_thread`).
pub fn synchronize(stream: CUstream, per_thread: bool) -> CUresult {
    let f = if per_thread {
        real::cuStreamSynchronize_ptsz.get()
    } else {
        real::cuStreamSynchronize.get()
    };
    match f {
        // SAFETY: real driver call with the caller's stream.
        Some(f) => unsafe { f(stream) },
        None => CUDA_ERROR_NOT_SUPPORTED,
    }
}
