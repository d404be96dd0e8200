//! The intercepted entry points, and the table `dlsym` and `cuGetProcAddress` answer from: the
//! top layer. Hooks call the enforcer and its policies (ledger, compute, spill), which call the
//! real driver ([`crate::real`]); no module below imports one above it.

pub(crate) use crate::real::current_device;

use std::ffi::c_void;

use tessera_gpu_abi::cuda::*;

use crate::enforcer::{Enforcer, Mode, mode};
use crate::real::RealFn;

pub mod context;
pub mod dlsym;
pub mod launch;
pub mod memory;
pub mod nvml;
pub mod proc_address;

/// The shim's function for an exported driver or NVML symbol name, or NULL.
pub fn by_symbol(symbol: &[u8]) -> *mut c_void {
    macro_rules! table {
        ($($module:ident :: $name:ident),* $(,)?) => {
            match symbol {
                $(s if s == stringify!($name).as_bytes() => $module::$name as *mut c_void,)*
                _ => std::ptr::null_mut(),
            }
        };
    }
    table!(
        context::cuInit,
        proc_address::cuGetProcAddress,
        proc_address::cuGetProcAddress_v2,
        memory::cuMemGetInfo_v2,
        memory::cuDeviceTotalMem_v2,
        memory::cuMemAlloc_v2,
        memory::cuMemAllocPitch_v2,
        memory::cuMemAllocManaged,
        memory::cuMemFree_v2,
        memory::cuMemAllocAsync,
        memory::cuMemAllocAsync_ptsz,
        memory::cuMemAllocFromPoolAsync,
        memory::cuMemAllocFromPoolAsync_ptsz,
        memory::cuMemFreeAsync,
        memory::cuMemFreeAsync_ptsz,
        memory::cuMemCreate,
        memory::cuMemRelease,
        memory::cuGraphAddMemAllocNode,
        memory::cuArrayCreate_v2,
        memory::cuArray3DCreate_v2,
        memory::cuArrayDestroy,
        memory::cuMipmappedArrayCreate,
        memory::cuMipmappedArrayDestroy,
        memory::cuMemAlloc,
        memory::cuMemAllocPitch,
        memory::cuMemGetInfo,
        memory::cuDeviceTotalMem,
        memory::cuArrayCreate,
        memory::cuArray3DCreate,
        context::cuDevicePrimaryCtxRetain,
        context::cuDevicePrimaryCtxRelease,
        context::cuDevicePrimaryCtxRelease_v2,
        context::cuDevicePrimaryCtxReset,
        context::cuDevicePrimaryCtxReset_v2,
        context::cuCtxCreate_v2,
        context::cuCtxCreate_v3,
        context::cuCtxCreate_v4,
        context::cuCtxDestroy_v2,
        launch::cuLaunchKernel,
        launch::cuLaunchKernel_ptsz,
        launch::cuLaunchKernelEx,
        launch::cuLaunchKernelEx_ptsz,
        launch::cuLaunchCooperativeKernel,
        launch::cuLaunchCooperativeKernel_ptsz,
        launch::cuGraphLaunch,
        launch::cuGraphLaunch_ptsz,
        nvml::nvmlInit,
        nvml::nvmlInit_v2,
        nvml::nvmlInitWithFlags,
        nvml::nvmlDeviceGetMemoryInfo,
        nvml::nvmlDeviceGetMemoryInfo_v2,
    )
}

/// Dispatches one driver call on the shim's mode: `pass` without a config, `enforce` with one,
/// and a refusal when the config could not be used.
#[inline(always)]
pub(crate) fn dispatch<F: Copy>(
    real: &RealFn<F>,
    pass: impl FnOnce(F) -> CUresult,
    enforce: impl FnOnce(&Enforcer, F) -> CUresult,
) -> CUresult {
    let mode = mode();
    let Some(f) = real.get() else {
        return CUDA_ERROR_NOT_FOUND;
    };
    match mode {
        Mode::Passthrough => pass(f),
        Mode::Enforcing(enforcer) => enforce(enforcer, f),
        Mode::Refused => CUDA_ERROR_NOT_PERMITTED,
    }
}
