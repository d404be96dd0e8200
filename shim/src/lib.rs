//! `libtessera.so`: the enforcement library preloaded into every process of a container that
//! uses a Tessera claim.
//!
//! It interposes the CUDA driver API and NVML three ways — exported symbols (for programs linked
//! with `-lcuda`), an exported `dlsym` (for `dlopen` + `dlsym` users) and `cuGetProcAddress`
//! (how libcudart, PyTorch and CuPy reach the driver) — and makes the claim's memory limit a hard
//! wall shared by every process of the claim through the region file.
//!
//! Rules every hook follows: no panic crosses the C ABI ([`guard`]); no allocation, lock or
//! environment read after initialisation on the allocation and launch paths (atomics only);
//! errors are real `CUresult`/`nvmlReturn_t` codes.
#![deny(unsafe_op_in_unsafe_fn)]
#![allow(non_snake_case)]

mod board_files;
mod compute;
mod devices;
mod enforcer;
mod guard;
mod hooks;
mod ledger;
mod ptr_table;
mod real;
mod report;
mod spill;
mod stream;
