//! The slice of the CUDA driver API and NVML C ABIs that Tessera speaks.
//!
//! Hand-written from NVIDIA's public API documentation rather than generated from `cuda.h`, so no
//! CUDA toolkit is needed to build. Result codes are plain integers, never Rust enums: a driver may
//! return codes this crate does not list, and an out-of-range enum value would be undefined
//! behaviour.
#![no_std]
#![forbid(unsafe_code)]

pub mod cuda;
pub mod nvml;
pub mod proc_table;
