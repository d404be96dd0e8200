//! Tessera's node-side domain, free of I/O where it can be: what GPUs a node has, how devices are
//! named, how an allocation result becomes per-GPU limits, how the opaque claim config is merged,
//! what CDI spec a claim gets, and the checkpoint of prepared claims.
//!
//! The kubelet plugin does the I/O (API server, gRPC, files) around these pieces; the
//! ResourceSlice controller uses [`device_name`] and [`inventory`] to publish exactly the devices
//! that [`allocation`] can later turn back into limits without reading any slice.
#![forbid(unsafe_code)]

pub mod allocation;
pub mod cdi;
pub mod checkpoint;
pub mod claim_config;
pub mod claim_files;
pub mod device_name;
pub mod fsutil;
pub mod health;
pub mod inventory;
#[cfg(feature = "nvml")]
pub mod nvml;
pub mod overcommit;
pub mod quantity;
pub mod topology;

pub use allocation::{AllocatedDevice, ClaimLimits, DeviceResult, GpuLimit};
pub use device_name::DeviceName;
pub use inventory::{Gpu, Inventory};
pub use overcommit::MemoryOvercommit;
