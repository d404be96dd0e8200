//! A fake CUDA driver, `libcuda.so.1`, for testing Tessera without a GPU.
//!
//! It exports, with their real C signatures, every driver entry point in
//! `tessera_gpu_abi::proc_table::PROC_TABLE`, answers `cuGetProcAddress` from that table, and
//! simulates the node described by the model crate: device memory is host memory, limited by
//! each card's physical capacity across all processes through the shared state file, and by
//! any per-cgroup hard limit NVML set (NVML 13.4) that binds the process. See
//! `fake-gpu/README.md` for what is and is not simulated, and for the `fakegpu_*` introspection
//! functions tests use.
//!
//! Every exported function runs its body through [`guard::guard`], so a panic becomes
//! `CUDA_ERROR_UNKNOWN` instead of unwinding into C, and every call but the few the real driver
//! also allows returns `CUDA_ERROR_NOT_INITIALIZED` before `cuInit`.
#![allow(non_snake_case)]
// The exported functions are `unsafe extern "C"` because C callers pass raw pointers; each one
// documents its contract by being the CUDA function of the same name.
#![allow(clippy::missing_safety_doc)]

mod clock;
mod context;
mod device;
mod driver;
mod graph;
mod guard;
mod handles;
mod introspect;
mod launch;
mod memory;
mod module;
mod proc_address;
mod process;
mod stream;
