//! Kernel launches: validated as the real driver validates them, counted, and otherwise
//! instantaneous (there is no device code to run).
//!
//! The path is kept free of locks — a thread-local context check, a lock-free function lookup, a
//! per-thread counter cell, one atomic update of the device's timeline — because the shim's
//! benchmark measures its own overhead against this path from many threads. Each kernel takes
//! simulated time on the virtual clock ([`crate::clock`]).

use std::ffi::{c_uint, c_void};
use std::sync::atomic::AtomicU64;

use tessera_gpu_abi::cuda::*;

use crate::context::current;
use crate::guard::{Result, check, get, guard};
use crate::handles::{Counter, from_ptr};
use crate::process::{Process, process};
use crate::stream::validate_stream;

pub struct Launches {
    /// Kernels run: direct launches plus every kernel node of every graph launch.
    pub kernels: Counter,
    pub cooperative: Counter,
    pub graphs: Counter,
    /// Virtual time at which the last kernel this process queued ends.
    pub pending_until: AtomicU64,
}

impl Launches {
    pub fn new() -> Self {
        Self {
            kernels: Counter::new(),
            cooperative: Counter::new(),
            graphs: Counter::new(),
            pending_until: AtomicU64::new(0),
        }
    }
}

/// A launch's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub grid: [c_uint; 3],
    pub block: [c_uint; 3],
}

impl Shape {
    /// The real driver's limits: no empty dimension, at most 1024 threads per block (z ≤ 64),
    /// grid y and z below 65536.
    pub fn validate(&self) -> Result {
        let [gx, gy, gz] = self.grid;
        let [bx, by, bz] = self.block;
        check(gx > 0 && gy > 0 && gz > 0 && bx > 0 && by > 0 && bz > 0)?;
        check(gx <= i32::MAX as c_uint && gy <= 65535 && gz <= 65535)?;
        check(
            bx <= 1024
                && by <= 1024
                && bz <= 64
                && u64::from(bx) * u64::from(by) * u64::from(bz) <= 1024,
        )
    }

    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|d| u64::from(*d)).product()
    }

    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|d| u64::from(*d)).product()
    }
}

fn launch(f: CUfunction, shape: Shape, stream: CUstream, cooperative: bool) -> Result {
    let process = process()?;
    check(!f.is_null())?;
    process
        .modules
        .functions
        .get(from_ptr(f))
        .ok_or(CUDA_ERROR_INVALID_HANDLE)?;
    shape.validate()?;
    let ctx = current(process)?;
    validate_stream(process, stream)?;
    if cooperative {
        check_co_resident(process, ctx.device, &shape)?;
        process.launches.cooperative.add(1);
    }
    process.launches.kernels.add(1);
    let duration = crate::clock::kernel_ns(&process.gpus[ctx.device].spec, &shape);
    crate::clock::run(process, ctx.device, duration);
    Ok(())
}

/// A cooperative grid must fit on the device at once: at most (threads per SM ÷ threads per
/// block) blocks per SM, on every SM.
fn check_co_resident(process: &Process, device: usize, shape: &Shape) -> Result {
    let spec = &process.gpus[device].spec;
    let per_sm = (u64::from(spec.max_threads_per_sm) / shape.threads_per_block()).max(1);
    if shape.blocks() > per_sm * u64::from(spec.sm_count) {
        return Err(CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE);
    }
    Ok(())
}

/// Whether a `cuLaunchKernelEx` config asks for a cooperative launch.
///
/// # Safety
/// `config.attrs` points to `config.num_attrs` attributes (checked non-null when non-empty).
unsafe fn wants_cooperative(config: &CUlaunchConfig) -> Result<bool> {
    if config.num_attrs == 0 {
        return Ok(false);
    }
    check(!config.attrs.is_null())?;
    // SAFETY: per the function's contract.
    let attrs = unsafe {
        std::slice::from_raw_parts(
            config.attrs as *const CUlaunchAttribute,
            config.num_attrs as usize,
        )
    };
    Ok(attrs.iter().any(|a| {
        a.id == CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            && i32::from_ne_bytes([a.value[0], a.value[1], a.value[2], a.value[3]]) != 0
    }))
}

fn launch_ex(config: *const CUlaunchConfig, f: CUfunction) -> Result {
    process()?;
    let config = unsafe { get(config) }?;
    let cooperative = unsafe { wants_cooperative(&config) }?;
    let shape = Shape {
        grid: [config.grid_dim_x, config.grid_dim_y, config.grid_dim_z],
        block: [config.block_dim_x, config.block_dim_y, config.block_dim_z],
    };
    launch(f, shape, config.h_stream, cooperative)
}

macro_rules! classic_launch {
    ($name:ident, cooperative = $cooperative:expr, $($extra:ident)?) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            f: CUfunction,
            grid_dim_x: c_uint,
            grid_dim_y: c_uint,
            grid_dim_z: c_uint,
            block_dim_x: c_uint,
            block_dim_y: c_uint,
            block_dim_z: c_uint,
            _shared_mem_bytes: c_uint,
            stream: CUstream,
            _kernel_params: *mut *mut c_void,
            $($extra: *mut *mut c_void,)?
        ) -> CUresult {
            guard(|| {
                let shape = Shape { grid: [grid_dim_x, grid_dim_y, grid_dim_z], block: [block_dim_x, block_dim_y, block_dim_z] };
                launch(f, shape, stream, $cooperative)
            })
        }
    };
}

classic_launch!(cuLaunchKernel, cooperative = false, _extra);
classic_launch!(cuLaunchKernel_ptsz, cooperative = false, _extra);
classic_launch!(cuLaunchCooperativeKernel, cooperative = true,);
classic_launch!(cuLaunchCooperativeKernel_ptsz, cooperative = true,);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    f: CUfunction,
    _kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    guard(|| launch_ex(config, f))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuLaunchKernelEx_ptsz(
    config: *const CUlaunchConfig,
    f: CUfunction,
    _kernel_params: *mut *mut c_void,
    _extra: *mut *mut c_void,
) -> CUresult {
    guard(|| launch_ex(config, f))
}
