//! A fake NVML, `libnvidia-ml.so.1`, for testing Tessera without a GPU.
//!
//! It describes the same node as the fake CUDA driver (the model crate's config) and reads the
//! same state file, so `nvmlDeviceGetMemoryInfo` and the running-process list show what the fake
//! CUDA processes of the node really hold — the way `nvidia-smi` reads a real card. Enough of
//! NVML for nvml-wrapper 0.13 (what Tessera's plugin uses) and for `nvidia-smi`-style readers;
//! see `fake-gpu/README.md` for the list. Every exported function is wrapped so a panic becomes
//! `NVML_ERROR_UNKNOWN`.
#![allow(non_snake_case)]
// The exported functions are `unsafe extern "C"` because C callers pass raw pointers; each one
// documents its contract by being the NVML function of the same name.
#![allow(clippy::missing_safety_doc)]

mod device;
mod events;
mod guard;
mod library;
mod limits;
mod processes;
mod utilisation;
