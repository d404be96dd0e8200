//! Stream-ordered allocation and memory pools.
//!
//! Each device has a default pool; more can be created. An async or pool allocation is device
//! memory like any other, counted when it is made. Pools do not cache: memory freed with
//! `cuMemFreeAsync` returns to the card at once. (A real pool keeps freed memory reserved until
//! a synchronisation trims it to the release threshold, 0 by default — so at the next sync the
//! two agree; the fake simply skips the interval.)

use tessera_gpu_abi::cuda::*;

use super::AllocKind;
use crate::guard::{Result, check, get, guard, put};
use crate::handles::{Kind, Registry, from_ptr, to_ptr};
use crate::process::{Gpu, process};
use crate::stream::{stream_target, validate_stream};

pub struct Pool {
    pub physical: usize,
    is_default: bool,
}

pub struct Pools {
    pools: Registry<Pool>,
    /// The default pool's handle per CUDA ordinal.
    defaults: Vec<u64>,
}

impl Pools {
    pub fn new(gpus: &[Gpu]) -> Self {
        let pools = Registry::new(Kind::MemPool);
        let defaults = gpus
            .iter()
            .map(|gpu| {
                pools
                    .insert_with(|_| Pool {
                        physical: gpu.physical,
                        is_default: true,
                    })
                    .0
            })
            .collect();
        Self { pools, defaults }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(
    pool: *mut CUmemoryPool,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let process = process()?;
        process.gpu(dev)?;
        unsafe { put(pool, to_ptr(process.pools.defaults[dev as usize])) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolCreate(
    pool: *mut CUmemoryPool,
    props: *const CUmemPoolProps,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!pool.is_null())?;
        let props = unsafe { get(props) }?;
        check(props.alloc_type == CU_MEM_ALLOCATION_TYPE_PINNED)?;
        check(props.location.type_ == CU_MEM_LOCATION_TYPE_DEVICE)?;
        let gpu = process.gpu(props.location.id)?;
        let (handle, _) = process.pools.pools.insert_with(|_| Pool {
            physical: gpu.physical,
            is_default: false,
        });
        unsafe { put(pool, to_ptr(handle)) }
    })
}

/// A pool's outstanding allocations stay valid after it is destroyed, as documented for the
/// real driver; only the handle goes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolDestroy(pool: CUmemoryPool) -> CUresult {
    guard(|| {
        let process = process()?;
        let handle = from_ptr(pool);
        let found = process
            .pools
            .pools
            .get(handle)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        check(!found.is_default)?;
        process.pools.pools.remove(handle);
        Ok(())
    })
}

/// Nothing is cached, so there is nothing to trim.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPoolTrimTo(
    pool: CUmemoryPool,
    _min_bytes_to_keep: usize,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(process.pools.pools.contains(from_ptr(pool)))
    })
}

fn alloc_async(
    dptr: *mut CUdeviceptr,
    bytes: usize,
    pool: Option<CUmemoryPool>,
    stream: CUstream,
) -> Result {
    let process = process()?;
    check(!dptr.is_null() && bytes > 0)?;
    let target = stream_target(process, stream)?;
    let physical = match pool {
        None => target.physical,
        Some(pool) => {
            process
                .pools
                .pools
                .get(from_ptr(pool))
                .ok_or(CUDA_ERROR_INVALID_VALUE)?
                .physical
        }
    };
    let ptr = process.memory.allocate(
        process,
        AllocKind::Device,
        bytes as u64,
        physical,
        target.handle,
    )?;
    unsafe { put(dptr, ptr) }
}

fn free_async(dptr: CUdeviceptr, stream: CUstream) -> Result {
    let process = process()?;
    validate_stream(process, stream)?;
    process.memory.free(process, dptr, &[AllocKind::Device])
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| alloc_async(dptr, bytesize, None, stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: CUstream,
) -> CUresult {
    guard(|| alloc_async(dptr, bytesize, None, stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    guard(|| alloc_async(dptr, bytesize, Some(pool), stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync_ptsz(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    stream: CUstream,
) -> CUresult {
    guard(|| alloc_async(dptr, bytesize, Some(pool), stream))
}

/// Frees any device allocation (not only stream-ordered ones), synchronously.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    guard(|| free_async(dptr, stream))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeAsync_ptsz(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
    guard(|| free_async(dptr, stream))
}
