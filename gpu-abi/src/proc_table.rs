//! How `cuGetProcAddress` maps a request `(name, cudaVersion, flags)` to an exported driver symbol.
//!
//! The version in a request is the CUDA version in which the caller's *signature* appeared, not
//! the driver's version: `cuMemAlloc` at 3020 means `cuMemAlloc_v2`, `cuDeviceGetUuid` at 9020 the
//! v1 call and at 11040 `cuDeviceGetUuid_v2`. Appending `_v2` is wrong; this table is the mapping
//! `cuda.h` encodes in its `#define`s. With `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM` a
//! caller asks for the per-thread default-stream variant (`_ptds`/`_ptsz`) where one exists.

use crate::cuda::{
    CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, CU_GET_PROC_ADDRESS_SUCCESS,
    CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND, CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT,
    CUdriverProcAddressQueryResult, cuuint64_t,
};

/// One variant of a driver entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcEntry {
    /// The name callers ask for (no version suffix).
    pub name: &'static str,
    /// The CUDA version (1000 × major + 10 × minor) that introduced this variant.
    pub since: i32,
    /// Whether this is the per-thread default-stream variant.
    pub per_thread: bool,
    /// The exported symbol that implements it.
    pub symbol: &'static str,
}

#[rustfmt::skip]
const fn e(name: &'static str, since: i32, symbol: &'static str) -> ProcEntry {
    ProcEntry { name, since, per_thread: false, symbol }
}

#[rustfmt::skip]
const fn pt(name: &'static str, since: i32, symbol: &'static str) -> ProcEntry {
    ProcEntry { name, since, per_thread: true, symbol }
}

/// The entry points Tessera's shim and fake driver know, with every variant `cuda.h` (12.x) maps
/// them to.
// One entry a line, like the `#define`s it mirrors.
#[rustfmt::skip]
pub const PROC_TABLE: &[ProcEntry] = &[
    e("cuGetProcAddress", 11030, "cuGetProcAddress"),
    e("cuGetProcAddress", 12000, "cuGetProcAddress_v2"),
    e("cuInit", 2000, "cuInit"),
    e("cuDriverGetVersion", 2020, "cuDriverGetVersion"),
    e("cuGetErrorString", 6000, "cuGetErrorString"),
    e("cuGetErrorName", 6000, "cuGetErrorName"),
    e("cuGetExportTable", 3000, "cuGetExportTable"),
    e("cuDeviceGet", 2000, "cuDeviceGet"),
    e("cuDeviceGetCount", 2000, "cuDeviceGetCount"),
    e("cuDeviceGetName", 2000, "cuDeviceGetName"),
    e("cuDeviceGetUuid", 9020, "cuDeviceGetUuid"),
    e("cuDeviceGetUuid", 11040, "cuDeviceGetUuid_v2"),
    e("cuDeviceTotalMem", 3020, "cuDeviceTotalMem_v2"),
    e("cuDeviceGetAttribute", 2000, "cuDeviceGetAttribute"),
    e("cuDeviceGetPCIBusId", 4010, "cuDeviceGetPCIBusId"),
    e("cuDeviceGetByPCIBusId", 4010, "cuDeviceGetByPCIBusId"),
    e("cuDeviceCanAccessPeer", 4000, "cuDeviceCanAccessPeer"),
    e("cuDeviceGetDefaultMemPool", 11020, "cuDeviceGetDefaultMemPool"),
    e("cuDevicePrimaryCtxRetain", 7000, "cuDevicePrimaryCtxRetain"),
    e("cuDevicePrimaryCtxRelease", 7000, "cuDevicePrimaryCtxRelease"),
    e("cuDevicePrimaryCtxRelease", 11000, "cuDevicePrimaryCtxRelease_v2"),
    e("cuDevicePrimaryCtxReset", 7000, "cuDevicePrimaryCtxReset"),
    e("cuDevicePrimaryCtxReset", 11000, "cuDevicePrimaryCtxReset_v2"),
    e("cuDevicePrimaryCtxSetFlags", 7000, "cuDevicePrimaryCtxSetFlags"),
    e("cuDevicePrimaryCtxSetFlags", 11000, "cuDevicePrimaryCtxSetFlags_v2"),
    e("cuDevicePrimaryCtxGetState", 7000, "cuDevicePrimaryCtxGetState"),
    e("cuCtxCreate", 3020, "cuCtxCreate_v2"),
    e("cuCtxCreate", 11040, "cuCtxCreate_v3"),
    e("cuCtxCreate", 12050, "cuCtxCreate_v4"),
    e("cuCtxDestroy", 4000, "cuCtxDestroy_v2"),
    e("cuCtxPushCurrent", 4000, "cuCtxPushCurrent_v2"),
    e("cuCtxPopCurrent", 4000, "cuCtxPopCurrent_v2"),
    e("cuCtxSetCurrent", 4000, "cuCtxSetCurrent"),
    e("cuCtxGetCurrent", 4000, "cuCtxGetCurrent"),
    e("cuCtxGetDevice", 2000, "cuCtxGetDevice"),
    e("cuCtxSynchronize", 2000, "cuCtxSynchronize"),
    e("cuMemGetInfo", 3020, "cuMemGetInfo_v2"),
    e("cuMemAlloc", 3020, "cuMemAlloc_v2"),
    e("cuMemAllocPitch", 3020, "cuMemAllocPitch_v2"),
    e("cuMemFree", 3020, "cuMemFree_v2"),
    e("cuMemAllocManaged", 6000, "cuMemAllocManaged"),
    e("cuMemAdvise", 8000, "cuMemAdvise"),
    e("cuMemAdvise", 12020, "cuMemAdvise_v2"),
    e("cuMemPrefetchAsync", 8000, "cuMemPrefetchAsync"),
    pt("cuMemPrefetchAsync", 8000, "cuMemPrefetchAsync_ptsz"),
    e("cuMemPrefetchAsync", 12020, "cuMemPrefetchAsync_v2"),
    pt("cuMemPrefetchAsync", 12020, "cuMemPrefetchAsync_v2_ptsz"),
    e("cuMemAllocHost", 3020, "cuMemAllocHost_v2"),
    e("cuMemFreeHost", 2000, "cuMemFreeHost"),
    e("cuMemHostAlloc", 2020, "cuMemHostAlloc"),
    e("cuMemGetAddressRange", 3020, "cuMemGetAddressRange_v2"),
    e("cuMemAllocAsync", 11020, "cuMemAllocAsync"),
    pt("cuMemAllocAsync", 11020, "cuMemAllocAsync_ptsz"),
    e("cuMemAllocFromPoolAsync", 11020, "cuMemAllocFromPoolAsync"),
    pt("cuMemAllocFromPoolAsync", 11020, "cuMemAllocFromPoolAsync_ptsz"),
    e("cuMemFreeAsync", 11020, "cuMemFreeAsync"),
    pt("cuMemFreeAsync", 11020, "cuMemFreeAsync_ptsz"),
    e("cuMemPoolCreate", 11020, "cuMemPoolCreate"),
    e("cuMemPoolDestroy", 11020, "cuMemPoolDestroy"),
    e("cuMemPoolTrimTo", 11020, "cuMemPoolTrimTo"),
    e("cuMemCreate", 10020, "cuMemCreate"),
    e("cuMemRelease", 10020, "cuMemRelease"),
    e("cuMemAddressReserve", 10020, "cuMemAddressReserve"),
    e("cuMemAddressFree", 10020, "cuMemAddressFree"),
    e("cuMemMap", 10020, "cuMemMap"),
    e("cuMemUnmap", 10020, "cuMemUnmap"),
    e("cuMemSetAccess", 10020, "cuMemSetAccess"),
    e("cuMemGetAllocationGranularity", 10020, "cuMemGetAllocationGranularity"),
    e("cuArrayCreate", 3020, "cuArrayCreate_v2"),
    e("cuArray3DCreate", 3020, "cuArray3DCreate_v2"),
    e("cuArrayDestroy", 2000, "cuArrayDestroy"),
    e("cuMipmappedArrayCreate", 5000, "cuMipmappedArrayCreate"),
    e("cuMipmappedArrayDestroy", 5000, "cuMipmappedArrayDestroy"),
    e("cuMemcpy", 4000, "cuMemcpy"),
    pt("cuMemcpy", 7000, "cuMemcpy_ptds"),
    e("cuMemcpyAsync", 4000, "cuMemcpyAsync"),
    pt("cuMemcpyAsync", 7000, "cuMemcpyAsync_ptsz"),
    e("cuMemcpyHtoD", 3020, "cuMemcpyHtoD_v2"),
    pt("cuMemcpyHtoD", 7000, "cuMemcpyHtoD_v2_ptds"),
    e("cuMemcpyDtoH", 3020, "cuMemcpyDtoH_v2"),
    pt("cuMemcpyDtoH", 7000, "cuMemcpyDtoH_v2_ptds"),
    e("cuMemcpyDtoD", 3020, "cuMemcpyDtoD_v2"),
    pt("cuMemcpyDtoD", 7000, "cuMemcpyDtoD_v2_ptds"),
    e("cuMemsetD8", 3020, "cuMemsetD8_v2"),
    pt("cuMemsetD8", 7000, "cuMemsetD8_v2_ptds"),
    e("cuStreamCreate", 2000, "cuStreamCreate"),
    e("cuStreamCreateWithPriority", 5050, "cuStreamCreateWithPriority"),
    e("cuStreamDestroy", 4000, "cuStreamDestroy_v2"),
    e("cuStreamSynchronize", 2000, "cuStreamSynchronize"),
    pt("cuStreamSynchronize", 7000, "cuStreamSynchronize_ptsz"),
    e("cuStreamQuery", 2000, "cuStreamQuery"),
    pt("cuStreamQuery", 7000, "cuStreamQuery_ptsz"),
    e("cuEventCreate", 2000, "cuEventCreate"),
    e("cuEventDestroy", 4000, "cuEventDestroy_v2"),
    e("cuEventRecord", 2000, "cuEventRecord"),
    pt("cuEventRecord", 7000, "cuEventRecord_ptsz"),
    e("cuEventQuery", 2000, "cuEventQuery"),
    e("cuEventSynchronize", 2000, "cuEventSynchronize"),
    e("cuEventElapsedTime", 2000, "cuEventElapsedTime"),
    e("cuEventElapsedTime", 12080, "cuEventElapsedTime_v2"),
    e("cuModuleLoadData", 2000, "cuModuleLoadData"),
    e("cuModuleGetFunction", 2000, "cuModuleGetFunction"),
    e("cuModuleUnload", 2000, "cuModuleUnload"),
    e("cuLaunchKernel", 4000, "cuLaunchKernel"),
    pt("cuLaunchKernel", 7000, "cuLaunchKernel_ptsz"),
    e("cuLaunchKernelEx", 11060, "cuLaunchKernelEx"),
    pt("cuLaunchKernelEx", 11060, "cuLaunchKernelEx_ptsz"),
    e("cuLaunchCooperativeKernel", 9000, "cuLaunchCooperativeKernel"),
    pt("cuLaunchCooperativeKernel", 9000, "cuLaunchCooperativeKernel_ptsz"),
    e("cuGraphCreate", 10000, "cuGraphCreate"),
    e("cuGraphDestroy", 10000, "cuGraphDestroy"),
    e("cuGraphAddKernelNode", 10000, "cuGraphAddKernelNode"),
    e("cuGraphAddKernelNode", 12000, "cuGraphAddKernelNode_v2"),
    e("cuGraphAddMemAllocNode", 11040, "cuGraphAddMemAllocNode"),
    e("cuGraphInstantiate", 10000, "cuGraphInstantiate"),
    e("cuGraphInstantiate", 11000, "cuGraphInstantiate_v2"),
    e("cuGraphInstantiateWithFlags", 11040, "cuGraphInstantiateWithFlags"),
    e("cuGraphExecDestroy", 10000, "cuGraphExecDestroy"),
    e("cuGraphLaunch", 10000, "cuGraphLaunch"),
    pt("cuGraphLaunch", 10000, "cuGraphLaunch_ptsz"),
];

/// The answer to one `cuGetProcAddress` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcLookup {
    Found(&'static ProcEntry),
    /// The name is known but every variant is newer than the caller's version.
    VersionNotSufficient,
    /// The name is not in the table.
    NotFound,
}

impl ProcLookup {
    /// The `CUdriverProcAddressQueryResult` that `cuGetProcAddress_v2` reports for this answer.
    pub const fn status(&self) -> CUdriverProcAddressQueryResult {
        match self {
            ProcLookup::Found(_) => CU_GET_PROC_ADDRESS_SUCCESS,
            ProcLookup::VersionNotSufficient => CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT,
            ProcLookup::NotFound => CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND,
        }
    }
}

/// Maps a request to the variant the driver would return: the newest variant no newer than
/// `cuda_version`, the per-thread one when the flags ask for it and it exists.
pub fn lookup(name: &[u8], cuda_version: i32, flags: cuuint64_t) -> ProcLookup {
    let want_per_thread = flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM != 0;
    let mut known = false;
    let mut best: Option<&'static ProcEntry> = None;
    for entry in PROC_TABLE {
        if entry.name.as_bytes() != name {
            continue;
        }
        known = true;
        if entry.since > cuda_version {
            continue;
        }
        best = match best {
            None => Some(entry),
            Some(current) => Some(prefer(current, entry, want_per_thread)),
        };
    }
    match (best, known) {
        (Some(entry), _) => ProcLookup::Found(entry),
        (None, true) => ProcLookup::VersionNotSufficient,
        (None, false) => ProcLookup::NotFound,
    }
}

fn prefer(
    a: &'static ProcEntry,
    b: &'static ProcEntry,
    want_per_thread: bool,
) -> &'static ProcEntry {
    let fits = |e: &ProcEntry| e.per_thread == want_per_thread;
    match (fits(a), fits(b)) {
        (true, false) => a,
        (false, true) => b,
        _ if b.since > a.since => b,
        _ => a,
    }
}

/// Whether `symbol` is one of the exported symbols in [`PROC_TABLE`].
pub fn is_known_symbol(symbol: &[u8]) -> bool {
    PROC_TABLE.iter().any(|e| e.symbol.as_bytes() == symbol)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(name: &str, version: i32, flags: u64) -> Option<&'static str> {
        match lookup(name.as_bytes(), version, flags) {
            ProcLookup::Found(e) => Some(e.symbol),
            _ => None,
        }
    }

    #[test]
    fn versions_pick_the_signature_not_a_suffix() {
        assert_eq!(symbol("cuMemAlloc", 3020, 0), Some("cuMemAlloc_v2"));
        assert_eq!(symbol("cuMemAlloc", 12090, 0), Some("cuMemAlloc_v2"));
        assert_eq!(symbol("cuDeviceGetUuid", 9020, 0), Some("cuDeviceGetUuid"));
        assert_eq!(
            symbol("cuDeviceGetUuid", 11040, 0),
            Some("cuDeviceGetUuid_v2")
        );
        assert_eq!(
            symbol("cuGetProcAddress", 11030, 0),
            Some("cuGetProcAddress")
        );
        assert_eq!(
            symbol("cuGetProcAddress", 12000, 0),
            Some("cuGetProcAddress_v2")
        );
        assert_eq!(symbol("cuCtxCreate", 3020, 0), Some("cuCtxCreate_v2"));
        assert_eq!(symbol("cuCtxCreate", 12090, 0), Some("cuCtxCreate_v4"));
    }

    #[test]
    fn per_thread_flag_selects_ptds_and_ptsz_variants() {
        assert_eq!(
            symbol("cuLaunchKernel", 7000, 2),
            Some("cuLaunchKernel_ptsz")
        );
        assert_eq!(symbol("cuLaunchKernel", 4000, 2), Some("cuLaunchKernel"));
        assert_eq!(symbol("cuLaunchKernel", 12000, 0), Some("cuLaunchKernel"));
        assert_eq!(
            symbol("cuMemcpyHtoD", 7000, 2),
            Some("cuMemcpyHtoD_v2_ptds")
        );
        assert_eq!(
            symbol("cuGraphLaunch", 10000, 2),
            Some("cuGraphLaunch_ptsz")
        );
        // No per-thread variant: the default one answers.
        assert_eq!(symbol("cuMemAlloc", 7000, 2), Some("cuMemAlloc_v2"));
    }

    #[test]
    fn old_versions_and_unknown_names() {
        assert_eq!(
            lookup(b"cuMemAlloc", 2000, 0),
            ProcLookup::VersionNotSufficient
        );
        assert_eq!(lookup(b"cuNoSuchThing", 12000, 0), ProcLookup::NotFound);
        assert_eq!(lookup(b"", 0, 0), ProcLookup::NotFound);
    }

    #[test]
    fn every_symbol_is_unique() {
        for (i, a) in PROC_TABLE.iter().enumerate() {
            for b in &PROC_TABLE[i + 1..] {
                assert_ne!(a.symbol, b.symbol, "{} listed twice", a.symbol);
            }
        }
    }
}
