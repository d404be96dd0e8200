//! Node-side helpers that call the NVIDIA driver's libraries directly. They are separate
//! programs, not part of the kubelet plugin, because creating a CUDA context needs `unsafe` FFI
//! (the plugin's crates forbid it) and leaves state in the calling process that the long-lived
//! plugin should not carry.

pub mod context_probe;
pub mod driver_libs;
