//! The boundary every exported function goes through: a panic becomes `NVML_ERROR_UNKNOWN`
//! rather than unwinding into C, and bodies use `?` with NVML return codes.

use std::ffi::c_char;
use std::panic::{AssertUnwindSafe, catch_unwind};

use tessera_gpu_abi::nvml::{
    NVML_ERROR_INSUFFICIENT_SIZE, NVML_ERROR_INVALID_ARGUMENT, NVML_ERROR_UNKNOWN, NVML_SUCCESS,
    nvmlReturn_t,
};

pub type Result<T = (), E = nvmlReturn_t> = std::result::Result<T, E>;

pub fn guard(body: impl FnOnce() -> Result) -> nvmlReturn_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => NVML_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// Writes an out-parameter; NULL is `NVML_ERROR_INVALID_ARGUMENT`.
///
/// # Safety
/// `ptr` is NULL or valid for a write of `T`.
pub unsafe fn put<T>(ptr: *mut T, value: T) -> Result {
    if ptr.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null and valid per the caller's contract.
    unsafe { ptr.write(value) };
    Ok(())
}

/// Copies `text` and its NUL into a caller's buffer of `len` bytes, or fails with
/// `NVML_ERROR_INSUFFICIENT_SIZE` (NVML never truncates).
///
/// # Safety
/// `buffer` is NULL or valid for `len` bytes.
pub unsafe fn put_str(buffer: *mut c_char, len: u32, text: &str) -> Result {
    if buffer.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    if (len as usize) < text.len() + 1 {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `text.len() + 1 <= len` bytes, within the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buffer.cast::<u8>(), text.len());
        *buffer.add(text.len()) = 0;
    }
    Ok(())
}

/// Fails with `NVML_ERROR_INVALID_ARGUMENT` unless `ok`.
pub fn check(ok: bool) -> Result {
    if ok {
        Ok(())
    } else {
        Err(NVML_ERROR_INVALID_ARGUMENT)
    }
}
