//! The boundary every exported function goes through.
//!
//! A panic must never unwind into C (since Rust 1.81 it aborts the host program): it becomes
//! `CUDA_ERROR_UNKNOWN`. Bodies return `Result<(), CUresult>` so that `?` carries a driver
//! error out of helpers.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tessera_gpu_abi::cuda::{CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_UNKNOWN, CUDA_SUCCESS, CUresult};

pub type Result<T = (), E = CUresult> = std::result::Result<T, E>;

/// Runs an exported function's body.
pub fn guard(body: impl FnOnce() -> Result) -> CUresult {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => CUDA_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => CUDA_ERROR_UNKNOWN,
    }
}

/// Writes an out-parameter, failing with `CUDA_ERROR_INVALID_VALUE` when the caller passed NULL.
///
/// # Safety
/// `ptr` is NULL or valid for a write of `T`.
pub unsafe fn put<T>(ptr: *mut T, value: T) -> Result {
    if ptr.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and valid per the caller's contract.
    unsafe { ptr.write(value) };
    Ok(())
}

/// Reads an in-parameter struct, failing with `CUDA_ERROR_INVALID_VALUE` on NULL.
///
/// # Safety
/// `ptr` is NULL or valid for a read of `T`.
pub unsafe fn get<T: Copy>(ptr: *const T) -> Result<T> {
    if ptr.is_null() {
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: non-null, and valid per the caller's contract.
    Ok(unsafe { ptr.read() })
}

/// Fails with `CUDA_ERROR_INVALID_VALUE` unless `ok`.
pub fn check(ok: bool) -> Result {
    if ok {
        Ok(())
    } else {
        Err(CUDA_ERROR_INVALID_VALUE)
    }
}
