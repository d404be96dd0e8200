//! `cuGetProcAddress` and `cuGetProcAddress_v2`: how libcudart (and so PyTorch and CuPy) reach
//! the driver. Each request `(name, cudaVersion, flags)` is first answered by the real driver;
//! if the variant it stands for is one the shim wraps, the wrapper is handed out instead —
//! including the shim's own `cuGetProcAddress`, so lookups made through the returned pointer
//! stay intercepted. Without a config the real answers pass through untouched.

use std::ffi::{CStr, c_char, c_int, c_void};

use tessera_gpu_abi::cuda::*;
use tessera_gpu_abi::proc_table::{ProcLookup, lookup};

use super::by_symbol;
use crate::enforcer::{Mode, mode};
use crate::guard::guard;
use crate::real::cuda as real;

/// Replaces the real answer with the shim's wrapper where there is one.
///
/// # Safety
/// `symbol` NUL-terminated or NULL; `pfn` valid or NULL.
unsafe fn intercept(
    result: CUresult,
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
) {
    if result != CUDA_SUCCESS
        || symbol.is_null()
        || pfn.is_null()
        || matches!(mode(), Mode::Passthrough)
    {
        return;
    }
    // SAFETY: non-null, NUL-terminated per the API.
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    let hook = match lookup(name, version, flags) {
        ProcLookup::Found(entry) => by_symbol(entry.symbol.as_bytes()),
        // Older than any variant the table lists: the bare name is the v1 symbol, which the
        // shim exports for the calls that reach device memory.
        ProcLookup::VersionNotSufficient | ProcLookup::NotFound => by_symbol(name),
    };
    // SAFETY: the driver wrote *pfn on success.
    if !hook.is_null() && unsafe { !(*pfn).is_null() } {
        unsafe { *pfn = hook };
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        let _ = mode();
        let Some(real) = real::cuGetProcAddress.get() else {
            return CUDA_ERROR_NOT_FOUND;
        };
        let result = unsafe { real(symbol, pfn, version, flags) };
        unsafe { intercept(result, symbol, pfn, version, flags) };
        result
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
    status: *mut CUdriverProcAddressQueryResult,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        let _ = mode();
        let Some(real) = real::cuGetProcAddress_v2.get() else {
            return CUDA_ERROR_NOT_FOUND;
        };
        let result = unsafe { real(symbol, pfn, version, flags, status) };
        unsafe { intercept(result, symbol, pfn, version, flags) };
        result
    })
}
