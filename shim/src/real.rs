//! The real driver and NVML entry points, resolved once from `libcuda.so.1` and
//! `libnvidia-ml.so.1` with the real `dlsym`: the bottom layer, which imports no other module
//! of the shim.
//!
//! Each [`RealFn`] is an atomic pointer: resolving writes it once at initialisation, and every
//! call after that is one load and an indirect call.

use std::ffi::{CStr, c_char, c_float, c_int, c_uint, c_void};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use tessera_gpu_abi::cuda::*;
use tessera_gpu_abi::nvml::*;

/// The real `dlsym`, resolved on first use with `dlvsym(RTLD_NEXT, …)`; the exported `dlsym`
/// (`hooks::dlsym`) jumps to it.
pub(crate) static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

type DlsymFn = unsafe extern "C" fn(*mut c_void, *const c_char) -> *mut c_void;

/// Versions of `dlsym` in glibc: 2.34 moved it into libc; older x86-64 and arm64 releases.
const DLSYM_VERSIONS: [&CStr; 3] = [c"GLIBC_2.34", c"GLIBC_2.2.5", c"GLIBC_2.17"];

/// The real `dlsym`'s address, 0 where glibc has none of the known versions.
pub(crate) fn real_dlsym_address() -> usize {
    let known = REAL_DLSYM.load(Ordering::Acquire);
    if known != 0 {
        return known;
    }
    for version in DLSYM_VERSIONS {
        // SAFETY: dlvsym with constant NUL-terminated strings.
        let found = unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) };
        if !found.is_null() {
            REAL_DLSYM.store(found as usize, Ordering::Release);
            return found as usize;
        }
    }
    0
}

/// Calls the real `dlsym` (for the shim's own lookups).
///
/// # Safety
/// `handle` must be a handle from `dlopen` or a pseudo-handle; `name` NUL-terminated.
pub unsafe fn real_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    let address = real_dlsym_address();
    if address == 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: `address` is glibc's dlsym.
    let f: DlsymFn = unsafe { std::mem::transmute::<usize, DlsymFn>(address) };
    // SAFETY: forwarded arguments, per this function's contract.
    unsafe { f(handle, name) }
}

/// The device of the calling thread's current context.
#[inline(always)]
pub(crate) fn current_device() -> Result<CUdevice, CUresult> {
    let Some(get) = cuda::cuCtxGetDevice.get() else {
        return Err(CUDA_ERROR_NOT_FOUND);
    };
    let mut device: CUdevice = 0;
    // SAFETY: real driver call with a valid out-pointer.
    match unsafe { get(&mut device) } {
        CUDA_SUCCESS => Ok(device),
        error => Err(error),
    }
}

/// A function of the real library, typed as `F` (an `unsafe extern "C" fn`).
pub struct RealFn<F> {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
    _type: PhantomData<F>,
}

// SAFETY: the only state is an atomic pointer; `F` is a plain function pointer type.
unsafe impl<F> Sync for RealFn<F> {}

impl<F: Copy> RealFn<F> {
    pub const fn new(name: &'static CStr) -> Self {
        Self {
            name,
            ptr: AtomicPtr::new(std::ptr::null_mut()),
            _type: PhantomData,
        }
    }

    /// The real function, once resolved.
    #[inline(always)]
    pub fn get(&self) -> Option<F> {
        let ptr = self.ptr.load(Ordering::Acquire);
        if ptr.is_null() {
            return None;
        }
        debug_assert_eq!(size_of::<F>(), size_of::<*mut c_void>());
        // SAFETY: `F` is a function pointer type of the same size as a data pointer (checked
        // above in debug builds), and `ptr` came from `dlsym` for the symbol `F` describes.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) })
    }

    /// The raw address, for comparisons.
    pub fn address(&self) -> *mut c_void {
        self.ptr.load(Ordering::Acquire)
    }
}

/// Something that can be looked up in a library handle.
pub trait Resolve: Sync {
    fn resolve(&self, handle: *mut c_void);
}

impl<F: Copy> Resolve for RealFn<F> {
    fn resolve(&self, handle: *mut c_void) {
        // SAFETY: `handle` is a live handle from `dlopen`; the name is NUL-terminated.
        let ptr = unsafe { real_dlsym(handle, self.name.as_ptr()) };
        self.ptr.store(ptr, Ordering::Release);
    }
}

macro_rules! real_fns {
    ($list:ident; $($name:ident: fn($($arg:ty),* $(,)?) -> $ret:ty;)*) => {
        $(
            #[allow(non_upper_case_globals)]
            pub static $name: RealFn<unsafe extern "C" fn($($arg),*) -> $ret> =
                RealFn::new(match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(name) => name,
                    Err(_) => panic!("symbol names contain no NUL"),
                });
        )*
        pub static $list: &[&dyn Resolve] = &[$(&$name),*];
    };
}

/// CUDA driver functions the shim wraps or calls.
pub mod cuda {
    use super::*;

    real_fns! { ALL;
        cuInit: fn(c_uint) -> CUresult;
        cuGetProcAddress: fn(*const c_char, *mut *mut c_void, c_int, cuuint64_t) -> CUresult;
        cuGetProcAddress_v2: fn(*const c_char, *mut *mut c_void, c_int, cuuint64_t, *mut CUdriverProcAddressQueryResult) -> CUresult;
        cuDeviceGetCount: fn(*mut c_int) -> CUresult;
        cuDeviceGet: fn(*mut CUdevice, c_int) -> CUresult;
        cuDeviceGetUuid: fn(*mut CUuuid, CUdevice) -> CUresult;
        cuDeviceGetUuid_v2: fn(*mut CUuuid, CUdevice) -> CUresult;
        cuDeviceTotalMem_v2: fn(*mut usize, CUdevice) -> CUresult;
        cuCtxGetDevice: fn(*mut CUdevice) -> CUresult;
        cuDevicePrimaryCtxRetain: fn(*mut CUcontext, CUdevice) -> CUresult;
        cuDevicePrimaryCtxRelease: fn(CUdevice) -> CUresult;
        cuDevicePrimaryCtxRelease_v2: fn(CUdevice) -> CUresult;
        cuDevicePrimaryCtxReset: fn(CUdevice) -> CUresult;
        cuDevicePrimaryCtxReset_v2: fn(CUdevice) -> CUresult;
        cuDevicePrimaryCtxGetState: fn(CUdevice, *mut c_uint, *mut c_int) -> CUresult;
        cuCtxCreate_v2: fn(*mut CUcontext, c_uint, CUdevice) -> CUresult;
        cuCtxCreate_v3: fn(*mut CUcontext, *mut c_void, c_int, c_uint, CUdevice) -> CUresult;
        cuCtxCreate_v4: fn(*mut CUcontext, *mut c_void, c_uint, CUdevice) -> CUresult;
        cuCtxDestroy_v2: fn(CUcontext) -> CUresult;
        cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> CUresult;
        cuMemAlloc_v2: fn(*mut CUdeviceptr, usize) -> CUresult;
        cuMemAllocPitch_v2: fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
        cuMemAllocManaged: fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
        cuMemFree_v2: fn(CUdeviceptr) -> CUresult;
        cuMemAdvise: fn(CUdeviceptr, usize, c_int, CUdevice) -> CUresult;
        cuMemAllocAsync: fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocAsync_ptsz: fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync: fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemAllocFromPoolAsync_ptsz: fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
        cuMemFreeAsync: fn(CUdeviceptr, CUstream) -> CUresult;
        cuMemFreeAsync_ptsz: fn(CUdeviceptr, CUstream) -> CUresult;
        cuMemCreate: fn(*mut CUmemGenericAllocationHandle, usize, *const CUmemAllocationProp, u64) -> CUresult;
        cuMemRelease: fn(CUmemGenericAllocationHandle) -> CUresult;
        cuArrayCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR) -> CUresult;
        cuArray3DCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR) -> CUresult;
        cuArrayDestroy: fn(CUarray) -> CUresult;
        cuMipmappedArrayCreate: fn(*mut CUmipmappedArray, *const CUDA_ARRAY3D_DESCRIPTOR, c_uint) -> CUresult;
        cuMipmappedArrayDestroy: fn(CUmipmappedArray) -> CUresult;
        cuLaunchKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;
        cuLaunchKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;
        cuLaunchKernelEx: fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void) -> CUresult;
        cuLaunchKernelEx_ptsz: fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void) -> CUresult;
        cuLaunchCooperativeKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void) -> CUresult;
        cuLaunchCooperativeKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void) -> CUresult;
        cuGraphLaunch: fn(CUgraphExec, CUstream) -> CUresult;
        cuGraphLaunch_ptsz: fn(CUgraphExec, CUstream) -> CUresult;
        cuGraphAddMemAllocNode: fn(*mut CUgraphNode, CUgraph, *const CUgraphNode, usize, *mut CUDA_MEM_ALLOC_NODE_PARAMS) -> CUresult;
        cuCtxGetCurrent: fn(*mut CUcontext) -> CUresult;
        cuEventCreate: fn(*mut CUevent, c_uint) -> CUresult;
        cuEventDestroy_v2: fn(CUevent) -> CUresult;
        cuEventRecord: fn(CUevent, CUstream) -> CUresult;
        cuEventRecord_ptsz: fn(CUevent, CUstream) -> CUresult;
        cuEventQuery: fn(CUevent) -> CUresult;
        cuEventElapsedTime: fn(*mut c_float, CUevent, CUevent) -> CUresult;
        cuStreamSynchronize: fn(CUstream) -> CUresult;
        cuStreamSynchronize_ptsz: fn(CUstream) -> CUresult;
        cuStreamIsCapturing: fn(CUstream, *mut c_int) -> CUresult;
        cuStreamIsCapturing_ptsz: fn(CUstream, *mut c_int) -> CUresult;
        cuThreadExchangeStreamCaptureMode: fn(*mut c_int) -> CUresult;
    }
}

/// NVML functions the shim wraps or calls.
pub mod nvml {
    use super::*;

    real_fns! { ALL;
        nvmlInit: fn() -> nvmlReturn_t;
        nvmlInit_v2: fn() -> nvmlReturn_t;
        nvmlInitWithFlags: fn(c_uint) -> nvmlReturn_t;
        nvmlDeviceGetUUID: fn(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo: fn(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t;
        nvmlDeviceGetMemoryInfo_v2: fn(nvmlDevice_t, *mut nvmlMemory_v2_t) -> nvmlReturn_t;
    }
}

/// Opens `soname` and resolves every function of `list` in it. A library that is absent is not
/// an error: a process that never loads the driver never calls these.
pub fn load(soname: &CStr, list: &[&dyn Resolve]) -> *mut c_void {
    // SAFETY: plain dlopen of a library name.
    let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !handle.is_null() {
        for f in list {
            f.resolve(handle);
        }
    }
    handle
}
