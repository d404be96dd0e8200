//! The GPUs of a node: what NVML reports, or what a fake inventory file describes.
//!
//! The fake inventory file is the fake GPU node's own config (`FAKEGPU_CONFIG`, see
//! `fake-gpu/README.md`), so one file describes the node to the plugin and to the fake
//! `libcuda.so.1`/`libnvidia-ml.so.1` alike:
//!
//! ```json
//! {"driverVersion": "570.86.15",
//!  "devices": [{"uuid": "GPU-…", "name": "NVIDIA GeForce RTX 4090", "memory": 25769803776,
//!               "pciBusId": "0000:01:00.0", "computeCapability": "8.9", "brand": "geforce",
//!               "architecture": "ada", "minorNumber": 0,
//!               "pcieRoot": "pci0000:00", "numaNode": 0}]}
//! ```
//!
//! Only the fields the plugin publishes or needs are read; the fake node's simulation fields
//! (`smCount`, `clockRateKhz`, …) are accepted and ignored, so the two formats cannot drift apart.
//!
//! Health, for fake nodes: a device may carry `"health": "healthy"` (the default) or
//! `"unhealthy"`, with an optional `"healthReason"`; the plugin re-reads the file while it runs
//! ([`Inventory::observe_file`]), so editing it withdraws and restores GPUs, and a device removed
//! from the file (or an empty `devices` list) counts as gone.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::health::{Health, Observation};

/// One physical GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    /// `GPU-…`, as NVML prints it; the identity used everywhere (config, region, CDI).
    pub uuid: String,
    /// NVML index (PCI order); the `<index>` of device names.
    pub index: u32,
    /// Minor number of `/dev/nvidia<minor>`.
    pub minor: u32,
    pub product_name: String,
    /// Device memory in bytes.
    pub memory: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// `major.minor`, e.g. `8.9`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_compute_capability: Option<String>,
    /// `0000:01:00.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// The PCIe root complex, `pci0000:00` (see [`crate::topology`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_root: Option<String>,
    /// The NUMA node; `None` where the GPU has no affinity or it is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Device memory one CUDA context takes on this GPU, charged per context against a claim's
    /// wall (the kubelet plugin measures it at start-up; 0 where nobody did).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub context_overhead: u64,
    /// Whether the driver holds a claim's containers to its memory on this GPU by itself
    /// (NVML 13.4's per-cgroup limits), beside the shim; found by the kubelet plugin at start-up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub driver_memory_wall: bool,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// All GPUs of a node, in index order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    pub gpus: Vec<Gpu>,
}

/// Why an inventory could not be loaded; messages name the file's field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read inventory file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("inventory file {path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
    #[error("NVML: {0}")]
    Nvml(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Inventory {
    /// The GPU with NVML index `index`.
    pub fn by_index(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// Reads a fake inventory file (the fake GPU node's config format).
    pub fn from_file(path: &Path) -> Result<Inventory> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Invalid { field, message, .. } => Error::Invalid {
                path: path.display().to_string(),
                field,
                message,
            },
            other => other,
        })
    }

    /// Parses a fake inventory document; errors carry an empty path.
    pub fn from_json(text: &str) -> Result<Inventory> {
        let file = parse(text)?;
        if file.devices.is_empty() {
            return Err(invalid(
                "devices".into(),
                "a node needs at least one device".into(),
            ));
        }
        let mut gpus = Vec::with_capacity(file.devices.len());
        for (index, entry) in file.devices.into_iter().enumerate() {
            let at = |field: &str| format!("devices[{index}].{field}");
            if !entry.uuid.starts_with("GPU-")
                || entry.uuid.len() >= tessera_api::region::UUID_BYTES
            {
                return Err(invalid(
                    at("uuid"),
                    format!(
                        "{:?} must start with \"GPU-\" and be at most 63 bytes",
                        entry.uuid
                    ),
                ));
            }
            if gpus.iter().any(|g: &Gpu| g.uuid == entry.uuid) {
                return Err(invalid(
                    at("uuid"),
                    format!("{:?} appears twice", entry.uuid),
                ));
            }
            if entry.memory == 0 {
                return Err(invalid(at("memory"), "must be greater than 0".into()));
            }
            gpus.push(Gpu {
                uuid: entry.uuid,
                index: index as u32,
                minor: entry.minor_number.unwrap_or(index as u32),
                product_name: entry.name,
                memory: entry.memory,
                brand: entry.brand,
                architecture: entry.architecture,
                cuda_compute_capability: entry.compute_capability,
                pci_bus_id: entry.pci_bus_id,
                pcie_root: entry.pcie_root,
                numa_node: entry.numa_node,
                context_overhead: 0,
                driver_memory_wall: false,
            });
        }
        Ok(Inventory {
            driver_version: file.driver_version,
            gpus,
        })
    }

    /// One look at a fake node: the GPUs its inventory file lists now, with their `health`.
    /// Unlike [`Inventory::from_file`] an empty `devices` list is accepted (every GPU gone).
    pub fn observe_file(path: &Path) -> Result<Observation> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::observe_json(&text).map_err(|e| match e {
            Error::Invalid { field, message, .. } => Error::Invalid {
                path: path.display().to_string(),
                field,
                message,
            },
            other => other,
        })
    }

    /// [`Inventory::observe_file`] of a document; errors carry an empty path.
    pub fn observe_json(text: &str) -> Result<Observation> {
        let file = parse(text)?;
        let seen = file
            .devices
            .into_iter()
            .map(|d| {
                let health = d.health();
                (d.uuid, health)
            })
            .collect();
        Ok(Observation { seen })
    }
}

fn invalid(field: String, message: String) -> Error {
    Error::Invalid {
        path: String::new(),
        field,
        message,
    }
}

/// The field a parse error is in, as a person reads it: serde's path without the `?` it writes
/// for a key that could not be read (a syntax error), and "JSON" where no field was reached.
fn json_field(path: &str) -> String {
    let field = path.trim_end_matches('?').trim_end_matches('.');
    match field {
        "" => "JSON".into(),
        field => field.into(),
    }
}

/// Parses the file and checks the fields every use needs (`health`).
fn parse(text: &str) -> Result<InventoryFile> {
    let file: InventoryFile =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
            .map_err(|e| invalid(json_field(&e.path().to_string()), e.inner().to_string()))?;
    for (index, entry) in file.devices.iter().enumerate() {
        if let Some(health) = &entry.health
            && health != HEALTHY
            && health != UNHEALTHY
        {
            return Err(invalid(
                format!("devices[{index}].health"),
                format!("{health:?}: expected \"{HEALTHY}\" or \"{UNHEALTHY}\""),
            ));
        }
    }
    Ok(file)
}

const HEALTHY: &str = "healthy";
const UNHEALTHY: &str = "unhealthy";

/// The fake GPU node's config, reduced to what the plugin uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InventoryFile {
    #[serde(default)]
    driver_version: Option<String>,
    devices: Vec<DeviceEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceEntry {
    uuid: String,
    name: String,
    memory: u64,
    #[serde(default)]
    pci_bus_id: Option<String>,
    /// Topology a fake node states (a real node reads it from sysfs).
    #[serde(default)]
    pcie_root: Option<String>,
    #[serde(default)]
    numa_node: Option<u32>,
    #[serde(default)]
    compute_capability: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    brand: Option<String>,
    #[serde(default)]
    minor_number: Option<u32>,
    /// `healthy` (the default) or `unhealthy`.
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    health_reason: Option<String>,
}

impl DeviceEntry {
    fn health(&self) -> Health {
        match self.health.as_deref() {
            Some(UNHEALTHY) => Health::Unhealthy(match &self.health_reason {
                Some(reason) => format!("marked unhealthy in the inventory file: {reason}"),
                None => "marked unhealthy in the inventory file".into(),
            }),
            _ => Health::Healthy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_GPUS: &str = r#"{
        "driverVersion": "570.86.15",
        "cudaDriverVersion": 12090,
        "devices": [
            {"uuid": "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b", "name": "NVIDIA GeForce RTX 4090",
             "memory": 25769803776, "pciBusId": "0000:01:00.0", "computeCapability": "8.9",
             "brand": "geforce", "smCount": 128, "maxThreadsPerSm": 1536},
            {"uuid": "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d", "name": "NVIDIA L40S",
             "memory": 51539607552, "minorNumber": 7}
        ]
    }"#;

    #[test]
    fn reads_the_fake_gpu_node_config() {
        let inventory = Inventory::from_json(TWO_GPUS).expect("valid");
        assert_eq!(inventory.driver_version.as_deref(), Some("570.86.15"));
        assert_eq!(inventory.gpus.len(), 2);
        let first = &inventory.gpus[0];
        assert_eq!((first.index, first.minor, first.memory), (0, 0, 24 << 30));
        assert_eq!(first.product_name, "NVIDIA GeForce RTX 4090");
        assert_eq!(first.cuda_compute_capability.as_deref(), Some("8.9"));
        assert_eq!(inventory.by_index(1).map(|g| g.minor), Some(7));
    }

    #[test]
    fn errors_name_the_field() {
        let err =
            Inventory::from_json(r#"{"devices":[{"uuid":"GPU-a","name":"x","memory":"big"}]}"#)
                .expect_err("bad memory")
                .to_string();
        assert!(err.contains("devices[0].memory"), "{err}");
        let err = Inventory::from_json(r#"{"devices":[{"uuid":"a","name":"x","memory":1}]}"#)
            .expect_err("bad uuid")
            .to_string();
        assert!(err.contains("devices[0].uuid"), "{err}");
        let err = Inventory::from_json(r#"{"devices":[]}"#)
            .expect_err("empty")
            .to_string();
        assert!(err.contains("devices"), "{err}"); // Malformed JSON: the field reached and the position, never serde's `?`.
        let err = Inventory::from_json(r#"{"devices": [{bad json"#)
            .expect_err("malformed")
            .to_string();
        assert!(
            err.contains("devices[0]: key must be a string at line 1 column 15"),
            "{err}"
        );
        assert!(!err.contains('?'), "{err}");
        let err = Inventory::from_json("not json")
            .expect_err("not JSON")
            .to_string();
        assert!(
            err.contains(": JSON: expected ident at line 1 column 2"),
            "{err}"
        );
    }

    #[test]
    fn health_is_read_while_running() {
        let look = Inventory::observe_json(
            r#"{"devices":[
                {"uuid":"GPU-a","name":"x","memory":1},
                {"uuid":"GPU-b","name":"x","memory":1,"health":"unhealthy","healthReason":"XID 79"},
                {"uuid":"GPU-c","name":"x","memory":1,"health":"healthy"}]}"#,
        )
        .expect("valid");
        assert_eq!(look.seen["GPU-a"], Health::Healthy);
        assert_eq!(look.seen["GPU-c"], Health::Healthy);
        assert_eq!(
            look.seen["GPU-b"],
            Health::Unhealthy("marked unhealthy in the inventory file: XID 79".into())
        );
        let empty = Inventory::observe_json(r#"{"devices":[]}"#).expect("empty is a look too");
        assert!(empty.seen.is_empty());
        let err = Inventory::observe_json(
            r#"{"devices":[{"uuid":"GPU-a","name":"x","memory":1,"health":"sick"}]}"#,
        )
        .expect_err("bad health")
        .to_string();
        assert!(
            err.contains("devices[0].health") && err.contains("sick"),
            "{err}"
        );
        // The start-up inventory lists unhealthy GPUs too: they are known, then withdrawn.
        let all = Inventory::from_json(
            r#"{"devices":[{"uuid":"GPU-a","name":"x","memory":1,"health":"unhealthy"}]}"#,
        )
        .expect("valid");
        assert_eq!(all.gpus.len(), 1);
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("inventory.json");
        std::fs::write(&path, r#"{"devices":[{"uuid":"GPU-a","name":"x"}]}"#).expect("write");
        let err = Inventory::from_file(&path)
            .expect_err("missing memory")
            .to_string();
        assert!(
            err.contains("inventory.json") && err.contains("memory"),
            "{err}"
        );
    }
}
