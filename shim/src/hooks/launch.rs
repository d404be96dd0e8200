//! Kernel launches: every launch path is intercepted here — plain, `Ex`, cooperative and graph
//! launches, with their per-thread-stream variants — so the compute-share limiter has one place
//! to act. The limiter is not built yet: today these forward unchanged (and cost one atomic
//! load and an indirect call), and `cores` is not enforced.

use std::ffi::{c_uint, c_void};

use tessera_gpu_abi::cuda::*;

use super::dispatch;
use crate::guard::guard;
use crate::real::cuda as real;

macro_rules! launch_kernel {
    ($name:ident) => {
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
                let call = |r: unsafe extern "C" fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult| unsafe {
                    r(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra)
                };
                dispatch(&real::$name, call, |_, r| call(r))
            })
        }
    };
}
launch_kernel!(cuLaunchKernel);
launch_kernel!(cuLaunchKernel_ptsz);

macro_rules! launch_kernel_ex {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            config: *const CUlaunchConfig,
            f: CUfunction,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void) -> CUresult| unsafe {
                    r(config, f, params, extra)
                };
                dispatch(&real::$name, call, |_, r| call(r))
            })
        }
    };
}
launch_kernel_ex!(cuLaunchKernelEx);
launch_kernel_ex!(cuLaunchKernelEx_ptsz);

macro_rules! launch_cooperative {
    ($name:ident) => {
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
                let call = |r: unsafe extern "C" fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void) -> CUresult| unsafe {
                    r(f, gx, gy, gz, bx, by, bz, shared, stream, params)
                };
                dispatch(&real::$name, call, |_, r| call(r))
            })
        }
    };
}
launch_cooperative!(cuLaunchCooperativeKernel);
launch_cooperative!(cuLaunchCooperativeKernel_ptsz);

macro_rules! graph_launch {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(exec: CUgraphExec, stream: CUstream) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                let call = |r: unsafe extern "C" fn(CUgraphExec, CUstream) -> CUresult| unsafe { r(exec, stream) };
                dispatch(&real::$name, call, |_, r| call(r))
            })
        }
    };
}
graph_launch!(cuGraphLaunch);
graph_launch!(cuGraphLaunch_ptsz);
