//! The inventory from NVML, through nvml-wrapper (which dlopens `libnvidia-ml.so.1` at run time,
//! so the plugin binary starts on nodes without a driver and says why it found no GPU).

use std::collections::BTreeMap;
use std::ffi::OsStr;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};

use crate::health::{Health, Observation};
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
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        });
    }
    Ok(Inventory {
        driver_version: nvml.sys_driver_version().ok(),
        gpus,
    })
}

/// NVML kept open to watch the health of the node's GPUs: periodic looks
/// ([`HealthProbe::observe`]) and critical XID events ([`HealthProbe::xid_events`]).
pub struct HealthProbe {
    nvml: Nvml,
}

impl HealthProbe {
    /// Opens NVML (`library` as for [`discover`]).
    pub fn open(library: Option<&OsStr>) -> Result<HealthProbe> {
        let nvml = match library {
            Some(path) => Nvml::builder().lib_path(path).init(),
            None => Nvml::init(),
        }
        .map_err(|e| Error::Nvml(format!("cannot initialise NVML: {e}")))?;
        Ok(HealthProbe { nvml })
    }

    /// One look at the node: each GPU of `known` by UUID (not found: gone; `GPU_IS_LOST`:
    /// unhealthy), and any other GPU NVML lists now.
    pub fn observe(&self, known: &Inventory) -> Observation {
        let mut seen = BTreeMap::new();
        for gpu in &known.gpus {
            let health = match self.nvml.device_by_uuid(gpu.uuid.as_str()) {
                // A handle can outlive the GPU: ask it something.
                Ok(device) => match device.memory_info() {
                    Err(NvmlError::GpuLost) => Health::Lost(LOST.into()),
                    _ => Health::Healthy,
                },
                Err(NvmlError::NotFound) => continue,
                Err(NvmlError::GpuLost) => Health::Lost(LOST.into()),
                Err(e) => Health::Unhealthy(format!("NVML cannot reach the GPU: {e}")),
            };
            seen.insert(gpu.uuid.clone(), health);
        }
        if let Ok(count) = self.nvml.device_count() {
            for index in 0..count {
                if let Ok(uuid) = self.nvml.device_by_index(index).and_then(|d| d.uuid()) {
                    seen.entry(uuid).or_insert(Health::Healthy);
                }
            }
        }
        Observation { seen }
    }

    /// Registers for critical XID events on every GPU of `known`; an error means this NVML
    /// cannot deliver them (a driver or library without events), and the caller does without.
    pub fn xid_events(&self, known: &Inventory) -> Result<XidEvents<'_>> {
        let mut set = self
            .nvml
            .create_event_set()
            .map_err(|e| Error::Nvml(format!("creating an event set: {e}")))?;
        for gpu in &known.gpus {
            let device = self
                .nvml
                .device_by_uuid(gpu.uuid.as_str())
                .map_err(|e| Error::Nvml(format!("GPU {}: {e}", gpu.uuid)))?;
            set = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .map_err(|e| {
                    Error::Nvml(format!("GPU {}: registering for XID events: {e}", gpu.uuid))
                })?;
        }
        Ok(XidEvents { set })
    }
}

/// `NVML_ERROR_GPU_IS_LOST`, in words.
const LOST: &str = "NVML reports the GPU lost (NVML_ERROR_GPU_IS_LOST)";

/// Critical XID events of the node's GPUs.
pub struct XidEvents<'nvml> {
    set: EventSet<'nvml>,
}

impl XidEvents<'_> {
    /// Waits up to `timeout` for the next XID: `(uuid, xid)` (999 when NVML does not know the
    /// XID). `Ok(None)` on timeout.
    pub fn wait(&self, timeout: std::time::Duration) -> Result<Option<(String, u64)>> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        match self.set.wait(ms) {
            Ok(event) => {
                let xid = match event.event_data {
                    Some(XidError::Value(v)) => v,
                    _ => 999,
                };
                let uuid = event
                    .device
                    .uuid()
                    .map_err(|e| Error::Nvml(format!("XID {xid} event's GPU: {e}")))?;
                Ok(Some((uuid, xid)))
            }
            Err(NvmlError::Timeout) => Ok(None),
            Err(e) => Err(Error::Nvml(format!("waiting for XID events: {e}"))),
        }
    }
}
