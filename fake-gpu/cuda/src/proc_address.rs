//! `cuGetProcAddress` and `cuGetProcAddress_v2`: how libcudart (so PyTorch, CuPy, …) reaches the
//! driver. A request `(name, cudaVersion, flags)` maps through `tessera_gpu_abi::proc_table` to
//! an exported symbol, and the symbol to this library's own function through a static table —
//! not `dlsym`, which a preloaded interposer hooks, and which would tie the answer to the
//! dynamic linker's view.

use std::ffi::{CStr, c_char, c_int, c_void};

use tessera_gpu_abi::cuda::*;
use tessera_gpu_abi::proc_table::{ProcLookup, lookup};

use crate::guard::{Result, check, guard};
use crate::{context, device, driver, graph, launch, memory, module, stream};

macro_rules! exports {
    ($($module:ident :: $($name:ident),+ ;)*) => {
        /// This library's function for an exported symbol name, or NULL.
        pub fn exported(symbol: &[u8]) -> *mut c_void {
            match symbol {
                $($(s if s == stringify!($name).as_bytes() => $module::$name as *mut c_void,)+)*
                _ => std::ptr::null_mut(),
            }
        }

        /// Every driver entry point this library exports.
        #[cfg(test)]
        pub const EXPORTED: &[&str] = &[$($(stringify!($name),)+)*];
    };
}

exports! {
    self:: cuGetProcAddress, cuGetProcAddress_v2;
    driver:: cuInit, cuDriverGetVersion, cuGetErrorString, cuGetErrorName, cuGetExportTable;
    device:: cuDeviceGet, cuDeviceGetCount, cuDeviceGetName, cuDeviceGetUuid, cuDeviceGetUuid_v2,
        cuDeviceTotalMem_v2, cuDeviceGetAttribute, cuDeviceGetPCIBusId, cuDeviceGetByPCIBusId,
        cuDeviceCanAccessPeer;
    context:: cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2,
        cuDevicePrimaryCtxReset, cuDevicePrimaryCtxReset_v2, cuDevicePrimaryCtxSetFlags,
        cuDevicePrimaryCtxSetFlags_v2, cuDevicePrimaryCtxGetState, cuCtxCreate_v2, cuCtxCreate_v3,
        cuCtxCreate_v4, cuCtxDestroy_v2, cuCtxPushCurrent_v2, cuCtxPopCurrent_v2, cuCtxSetCurrent,
        cuCtxGetCurrent, cuCtxGetDevice, cuCtxSynchronize;
    memory:: cuMemGetInfo_v2, cuMemAlloc_v2, cuMemAllocPitch_v2, cuMemFree_v2, cuMemAllocManaged,
        cuMemAdvise, cuMemAdvise_v2, cuMemPrefetchAsync, cuMemPrefetchAsync_ptsz,
        cuMemPrefetchAsync_v2, cuMemPrefetchAsync_v2_ptsz,
        cuMemAllocHost_v2, cuMemFreeHost, cuMemHostAlloc, cuMemGetAddressRange_v2;
    pool:: cuDeviceGetDefaultMemPool, cuMemAllocAsync, cuMemAllocAsync_ptsz, cuMemAllocFromPoolAsync,
        cuMemAllocFromPoolAsync_ptsz, cuMemFreeAsync, cuMemFreeAsync_ptsz, cuMemPoolCreate,
        cuMemPoolDestroy, cuMemPoolTrimTo;
    vmm:: cuMemCreate, cuMemRelease, cuMemAddressReserve, cuMemAddressFree, cuMemMap, cuMemUnmap,
        cuMemSetAccess, cuMemGetAllocationGranularity;
    array:: cuArrayCreate_v2, cuArray3DCreate_v2, cuArrayDestroy, cuMipmappedArrayCreate,
        cuMipmappedArrayDestroy;
    copy:: cuMemcpy, cuMemcpy_ptds, cuMemcpyAsync, cuMemcpyAsync_ptsz, cuMemcpyHtoD_v2,
        cuMemcpyHtoD_v2_ptds, cuMemcpyDtoH_v2, cuMemcpyDtoH_v2_ptds, cuMemcpyDtoD_v2,
        cuMemcpyDtoD_v2_ptds, cuMemsetD8_v2, cuMemsetD8_v2_ptds;
    stream:: cuStreamCreate, cuStreamCreateWithPriority, cuStreamDestroy_v2, cuStreamSynchronize,
        cuStreamSynchronize_ptsz, cuStreamQuery, cuStreamQuery_ptsz, cuEventCreate, cuEventDestroy_v2,
        cuEventRecord, cuEventRecord_ptsz, cuEventQuery, cuEventSynchronize, cuEventElapsedTime,
        cuEventElapsedTime_v2;
    module:: cuModuleLoadData, cuModuleGetFunction, cuModuleUnload;
    launch:: cuLaunchKernel, cuLaunchKernel_ptsz, cuLaunchKernelEx, cuLaunchKernelEx_ptsz,
        cuLaunchCooperativeKernel, cuLaunchCooperativeKernel_ptsz;
    graph:: cuGraphCreate, cuGraphDestroy, cuGraphAddKernelNode, cuGraphAddKernelNode_v2,
        cuGraphAddMemAllocNode,
        cuGraphInstantiate, cuGraphInstantiate_v2, cuGraphInstantiateWithFlags, cuGraphExecDestroy,
        cuGraphLaunch, cuGraphLaunch_ptsz;
}

use memory::{array, copy, pool, vmm};

/// Answers one request. `*pfn` is always written (NULL unless found), as is `*status` when
/// given; a known name asked for at a version older than its first variant is "version not
/// sufficient", anything else unknown (including the empty name) "symbol not found", both with
/// `CUDA_ERROR_NOT_FOUND`.
fn resolve(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
    status: *mut CUdriverProcAddressQueryResult,
) -> Result {
    check(!pfn.is_null())?;
    // SAFETY: non-null out-pointer from the caller.
    unsafe { *pfn = std::ptr::null_mut() };
    let report = |result: CUdriverProcAddressQueryResult| {
        if !status.is_null() {
            // SAFETY: non-null out-pointer from the caller.
            unsafe { *status = result };
        }
    };
    let known_flags = [
        CU_GET_PROC_ADDRESS_DEFAULT,
        CU_GET_PROC_ADDRESS_LEGACY_STREAM,
        CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM,
    ];
    if symbol.is_null() || !known_flags.contains(&flags) {
        report(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
        return Err(CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: a NUL-terminated name, per the API.
    let name = unsafe { CStr::from_ptr(symbol) }.to_bytes();
    let answer = lookup(name, version, flags);
    report(answer.status());
    let ProcLookup::Found(entry) = answer else {
        return Err(CUDA_ERROR_NOT_FOUND);
    };
    let function = exported(entry.symbol.as_bytes());
    if function.is_null() {
        // Every table symbol is exported (a unit test holds this); never hand out NULL as found.
        report(CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
        return Err(CUDA_ERROR_NOT_FOUND);
    }
    // SAFETY: checked non-null above.
    unsafe { *pfn = function };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
) -> CUresult {
    guard(|| resolve(symbol, pfn, version, flags, std::ptr::null_mut()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: cuuint64_t,
    status: *mut CUdriverProcAddressQueryResult,
) -> CUresult {
    guard(|| resolve(symbol, pfn, version, flags, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_gpu_abi::proc_table::PROC_TABLE;

    #[test]
    fn every_table_symbol_is_exported() {
        for entry in PROC_TABLE {
            assert!(
                !exported(entry.symbol.as_bytes()).is_null(),
                "{} is not exported",
                entry.symbol
            );
        }
    }

    #[test]
    fn every_export_is_in_the_table() {
        // Exports outside the table would be reachable by dlsym but not cuGetProcAddress.
        for name in EXPORTED {
            assert!(
                PROC_TABLE.iter().any(|e| e.symbol == *name),
                "{name} is exported but not in PROC_TABLE"
            );
        }
    }

    #[test]
    fn requests_resolve_to_the_variant_the_table_names() {
        let mut pfn = std::ptr::null_mut();
        let mut status = -1;
        let rc =
            unsafe { cuGetProcAddress_v2(c"cuMemAlloc".as_ptr(), &mut pfn, 12090, 0, &mut status) };
        assert_eq!((rc, status), (CUDA_SUCCESS, CU_GET_PROC_ADDRESS_SUCCESS));
        assert_eq!(pfn, memory::cuMemAlloc_v2 as *mut c_void);

        let rc =
            unsafe { cuGetProcAddress_v2(c"cuMemAlloc".as_ptr(), &mut pfn, 2000, 0, &mut status) };
        assert_eq!(
            (rc, status, pfn),
            (
                CUDA_ERROR_NOT_FOUND,
                CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT,
                std::ptr::null_mut()
            )
        );

        let rc = unsafe { cuGetProcAddress_v2(c"".as_ptr(), &mut pfn, 0, 0, &mut status) };
        assert_eq!(
            (rc, status, pfn),
            (
                CUDA_ERROR_NOT_FOUND,
                CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND,
                std::ptr::null_mut()
            )
        );

        let rc = unsafe { cuGetProcAddress(c"cuLaunchKernel".as_ptr(), &mut pfn, 12000, 2) };
        assert_eq!(
            (rc, pfn),
            (CUDA_SUCCESS, launch::cuLaunchKernel_ptsz as *mut c_void)
        );

        let rc = unsafe { cuGetProcAddress(c"cuInit".as_ptr(), &mut pfn, 12000, 7) };
        assert_eq!(
            (rc, pfn),
            (CUDA_ERROR_INVALID_VALUE, std::ptr::null_mut()),
            "unknown flags"
        );
    }
}
