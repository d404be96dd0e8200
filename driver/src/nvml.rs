//! The inventory from NVML, through nvml-wrapper (which dlopens `libnvidia-ml.so.1` at run time,
//! so the plugin binary starts on nodes without a driver and says why it found no GPU).

use std::ffi::OsStr;

use nvml_wrapper::Nvml;

use crate::inventory::{Error, Gpu, Inventory, Result};

/// Reads every GPU NVML sees. `library` overrides where `libnvidia-ml.so.1` is loaded from
/// (a containerised driver root, or the fake NVML in tests).
pub fn discover(library: Option<&OsStr>) -> Result<Inventory> {
    let nvml = match library {
        Some(path) => Nvml::builder().lib_path(path).init(),
        None => Nvml::init(),
    }
    .map_err(|e| Error::Nvml(format!("cannot initialise NVML: {e}")))?;
    let nvml_error = |what: &str, index: u32, e: nvml_wrapper::error::NvmlError| {
        Error::Nvml(format!("GPU {index}: {what}: {e}"))
    };
    let count = nvml
        .device_count()
        .map_err(|e| Error::Nvml(format!("device count: {e}")))?;
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|e| nvml_error("handle", index, e))?;
        let uuid = device.uuid().map_err(|e| nvml_error("uuid", index, e))?;
        let memory = device
            .memory_info()
            .map_err(|e| nvml_error("memory", index, e))?
            .total;
        // Optional attributes: a missing one leaves the attribute unpublished rather than
        // hiding the GPU.
        let cc = device
            .cuda_compute_capability()
            .ok()
            .map(|c| format!("{}.{}", c.major, c.minor));
        gpus.push(Gpu {
            uuid,
            index,
            minor: device.minor_number().unwrap_or(index),
            product_name: device.name().map_err(|e| nvml_error("name", index, e))?,
            memory,
            brand: device.brand().ok().map(|b| format!("{b:?}").to_lowercase()),
            architecture: device
                .architecture()
                .ok()
                .map(|a| a.to_string().to_lowercase()),
            cuda_compute_capability: cc,
            pci_bus_id: device.pci_info().ok().map(|p| p.bus_id.to_lowercase()),
        });
    }
    Ok(Inventory {
        driver_version: nvml.sys_driver_version().ok(),
        gpus,
    })
}
