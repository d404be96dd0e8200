//! CUDA arrays and mipmapped arrays: opaque (no pointer reaches their bytes), so they are pure
//! accounting — width × height × depth × channels × bytes per channel of device memory (each
//! level's share, for a mipmapped array), charged to the current context's device.

use std::ffi::c_uint;

use tessera_gpu_abi::cuda::*;

use crate::context::current;
use crate::guard::{Result, check, get, guard, put};
use crate::handles::{Kind, Registry, from_ptr, to_ptr};
use crate::process::{Process, process};

pub struct Array {
    ctx: u64,
    physical: usize,
    bytes: u64,
}

pub struct Arrays {
    arrays: Registry<Array>,
    mipmapped: Registry<Array>,
}

impl Arrays {
    pub fn new() -> Self {
        Self {
            arrays: Registry::new(Kind::Array),
            mipmapped: Registry::new(Kind::MipmappedArray),
        }
    }

    /// Gives back the memory of a context's arrays when the context goes.
    pub fn destroy_context(&self, process: &Process, ctx: u64) {
        for array in self
            .arrays
            .remove_where(|a| a.ctx == ctx)
            .into_iter()
            .chain(self.mipmapped.remove_where(|a| a.ctx == ctx))
        {
            process.lease.release(array.physical, array.bytes);
        }
    }
}

/// Bytes of one `w × h × d` level; zero height or depth means a 1D or 2D array.
fn level_bytes(
    width: u64,
    height: u64,
    depth: u64,
    format: CUarray_format,
    channels: c_uint,
) -> Option<u64> {
    width
        .checked_mul(height.max(1))?
        .checked_mul(depth.max(1))?
        .checked_mul(u64::from(channels))?
        .checked_mul(array_format_bytes(format))
}

fn validate(width: usize, format: CUarray_format, channels: c_uint) -> Result {
    check(width > 0 && format > 0 && matches!(channels, 1 | 2 | 4))
}

fn create(
    registry: &Registry<Array>,
    out: *mut *mut std::ffi::c_void,
    bytes: Option<u64>,
) -> Result {
    let process = process()?;
    let bytes = bytes.ok_or(CUDA_ERROR_INVALID_VALUE)?;
    let ctx = current(process)?;
    process
        .lease
        .reserve(ctx.physical, bytes)
        .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
    let (handle, _) = registry.insert_with(|_| Array {
        ctx: ctx.handle,
        physical: ctx.physical,
        bytes,
    });
    unsafe { put(out, to_ptr(handle)) }
}

fn destroy(registry: &Registry<Array>, handle: u64) -> Result {
    let process = process()?;
    let array = registry.remove(handle).ok_or(CUDA_ERROR_INVALID_HANDLE)?;
    process.lease.release(array.physical, array.bytes);
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY_DESCRIPTOR,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!handle.is_null())?;
        let d = unsafe { get(desc) }?;
        validate(d.width, d.format, d.num_channels)?;
        let bytes = level_bytes(d.width as u64, d.height as u64, 0, d.format, d.num_channels);
        create(&process.arrays.arrays, handle, bytes)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!handle.is_null())?;
        let d = unsafe { get(desc) }?;
        validate(d.width, d.format, d.num_channels)?;
        let bytes = level_bytes(
            d.width as u64,
            d.height as u64,
            d.depth as u64,
            d.format,
            d.num_channels,
        );
        create(&process.arrays.arrays, handle, bytes)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(handle: CUarray) -> CUresult {
    guard(|| destroy(&process()?.arrays.arrays, from_ptr(handle)))
}

/// Level `l` has each non-zero extent halved `l` times (at least 1); there can be at most
/// 1 + ⌊log2(largest extent)⌋ levels.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    handle: *mut CUmipmappedArray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
    levels: c_uint,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!handle.is_null())?;
        let d = unsafe { get(desc) }?;
        validate(d.width, d.format, d.num_channels)?;
        let (w, h, depth) = (d.width as u64, d.height as u64, d.depth as u64);
        let largest = w.max(h).max(depth);
        check(levels >= 1 && levels <= 1 + largest.ilog2())?;
        let shrink = |extent: u64, level: u32| {
            if extent == 0 {
                0
            } else {
                (extent >> level).max(1)
            }
        };
        let bytes = (0..levels).try_fold(0u64, |sum, level| {
            let level = level_bytes(
                shrink(w, level),
                shrink(h, level),
                shrink(depth, level),
                d.format,
                d.num_channels,
            )?;
            sum.checked_add(level)
        });
        create(&process.arrays.mipmapped, handle, bytes)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(handle: CUmipmappedArray) -> CUresult {
    guard(|| destroy(&process()?.arrays.mipmapped, from_ptr(handle)))
}
