//! Copies and memsets. Device pointers are host addresses, so these are host `memmove`s and
//! `memset`s, done synchronously (an async copy is complete when the call returns).
//!
//! Pointers are checked for NULL only: a range check would cost a search of every allocation on
//! each copy. A bad device pointer therefore faults like a bad host pointer would, where the
//! real driver reports an error — loud either way, and the shim never copies.

use std::ffi::{c_uchar, c_void};

use tessera_gpu_abi::cuda::*;

use crate::context::current;
use crate::guard::{Result, check, guard};
use crate::process::process;
use crate::stream::validate_stream;

fn copy(dst: u64, src: u64, bytes: usize, stream: Option<CUstream>) -> Result {
    let process = process()?;
    current(process)?;
    if let Some(stream) = stream {
        validate_stream(process, stream)?;
    }
    if bytes == 0 {
        return Ok(());
    }
    check(dst != 0 && src != 0)?;
    // SAFETY: the caller vouches for both ranges, as with the real driver; `copy` tolerates
    // overlap.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    Ok(())
}

fn set(dst: u64, value: u8, count: usize) -> Result {
    let process = process()?;
    current(process)?;
    if count == 0 {
        return Ok(());
    }
    check(dst != 0)?;
    // SAFETY: the caller vouches for the range, as with the real driver.
    unsafe { std::ptr::write_bytes(dst as *mut u8, value, count) };
    Ok(())
}

macro_rules! copies {
    ($($name:ident($($arg:ident: $ty:ty),*) => $body:expr;)*) => {$(
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
            guard(|| $body)
        }
    )*};
}

copies! {
    cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) => copy(dst, src, bytes, None);
    cuMemcpy_ptds(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) => copy(dst, src, bytes, None);
    cuMemcpyAsync(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream) => copy(dst, src, bytes, Some(stream));
    cuMemcpyAsync_ptsz(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: CUstream) => copy(dst, src, bytes, Some(stream));
    cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, bytes: usize) => copy(dst, src as u64, bytes, None);
    cuMemcpyHtoD_v2_ptds(dst: CUdeviceptr, src: *const c_void, bytes: usize) => copy(dst, src as u64, bytes, None);
    cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, bytes: usize) => copy(dst as u64, src, bytes, None);
    cuMemcpyDtoH_v2_ptds(dst: *mut c_void, src: CUdeviceptr, bytes: usize) => copy(dst as u64, src, bytes, None);
    cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) => copy(dst, src, bytes, None);
    cuMemcpyDtoD_v2_ptds(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) => copy(dst, src, bytes, None);
    cuMemsetD8_v2(dst: CUdeviceptr, value: c_uchar, count: usize) => set(dst, value, count);
    cuMemsetD8_v2_ptds(dst: CUdeviceptr, value: c_uchar, count: usize) => set(dst, value, count);
}
