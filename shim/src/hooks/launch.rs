//! Kernel launches: every launch path — plain, `Ex`, cooperative and graph launches, with their
//! per-thread-stream variants — goes through the compute limiter ([`crate::compute::launch`]),
//! keyed by what it runs (function and block count, or the executable graph) so that its cost
//! can be learned.

use std::ffi::{c_uint, c_void};

use tessera_gpu_abi::cuda::*;

use super::dispatch;
use crate::compute;
use crate::guard::guard;
use crate::real::cuda as real;

/// A grid's block count (a kernel's cost grows with it).
#[inline(always)]
fn blocks(x: c_uint, y: c_uint, z: c_uint) -> u64 {
    u64::from(x) * u64::from(y) * u64::from(z)
}

/// The block-count part of a graph's key (a graph's cost is its own).
const GRAPH: u64 = u64::MAX;

macro_rules! launch_kernel {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            f: CUfunction,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            stream: CUstream,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(
                    CUfunction,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    CUstream,
                    *mut *mut c_void,
                    *mut *mut c_void,
                ) -> CUresult| unsafe {
                    r(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
                };
                dispatch(&real::$name, call, |enforcer, r| {
                    let key = compute::key(f as usize, blocks(gx, gy, gz));
                    compute::launch(enforcer.compute_claim(), key, stream, $per_thread, || {
                        call(r)
                    })
                })
            })
        }
    };
}
launch_kernel!(cuLaunchKernel, false);
launch_kernel!(cuLaunchKernel_ptsz, true);

macro_rules! launch_kernel_ex {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            config: *const CUlaunchConfig,
            f: CUfunction,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(
                    *const CUlaunchConfig,
                    CUfunction,
                    *mut *mut c_void,
                    *mut *mut c_void,
                ) -> CUresult| unsafe { r(config, f, params, extra) };
                dispatch(&real::$name, call, |enforcer, r| {
                    // SAFETY: the caller passes a valid config or NULL (which the driver refuses).
                    let Some(c) = (unsafe { config.as_ref() }) else {
                        return call(r);
                    };
                    let key =
                        compute::key(f as usize, blocks(c.grid_dim_x, c.grid_dim_y, c.grid_dim_z));
                    compute::launch(
                        enforcer.compute_claim(),
                        key,
                        c.h_stream,
                        $per_thread,
                        || call(r),
                    )
                })
            })
        }
    };
}
launch_kernel_ex!(cuLaunchKernelEx, false);
launch_kernel_ex!(cuLaunchKernelEx_ptsz, true);

macro_rules! launch_cooperative {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            f: CUfunction,
            gx: c_uint,
            gy: c_uint,
            gz: c_uint,
            bx: c_uint,
            by: c_uint,
            bz: c_uint,
            shared: c_uint,
            stream: CUstream,
            params: *mut *mut c_void,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(
                    CUfunction,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    c_uint,
                    CUstream,
                    *mut *mut c_void,
                ) -> CUresult| unsafe {
                    r(f, gx, gy, gz, bx, by, bz, shared, stream, params)
                };
                dispatch(&real::$name, call, |enforcer, r| {
                    let key = compute::key(f as usize, blocks(gx, gy, gz));
                    compute::launch(enforcer.compute_claim(), key, stream, $per_thread, || {
                        call(r)
                    })
                })
            })
        }
    };
}
launch_cooperative!(cuLaunchCooperativeKernel, false);
launch_cooperative!(cuLaunchCooperativeKernel_ptsz, true);

macro_rules! graph_launch {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(exec: CUgraphExec, stream: CUstream) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(CUgraphExec, CUstream) -> CUresult| unsafe {
                    r(exec, stream)
                };
                dispatch(&real::$name, call, |enforcer, r| {
                    let key = compute::key(exec as usize, GRAPH);
                    compute::launch(enforcer.compute_claim(), key, stream, $per_thread, || {
                        call(r)
                    })
                })
            })
        }
    };
}
graph_launch!(cuGraphLaunch, false);
graph_launch!(cuGraphLaunch_ptsz, true);
