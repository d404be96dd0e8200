//! From a claim's allocation results to the limits the shim enforces, per GPU.
//!
//! Each result for `gpu.tessera.dev` names a device ([`DeviceName`]) and, in consumable mode, a
//! shareID and the capacity the scheduler charged. The device's own share (from its name and
//! the inventory) is the ceiling; consumed capacity, when present, narrows it. Several results on
//! one GPU (two shares, or two slices, in one claim) add up, because the shim keeps one limit per
//! GPU UUID.
//!
//! With a node memory overcommit ([`MemoryOvercommit`]), shares are cut from the offered memory
//! (physical × factor), exactly as the slices publish them; a whole GPU without consumed
//! capacity (exclusive mode, partitioned's `gpu-<i>`) stays the physical card. A claim's limit
//! is never more than it was allocated, and never more than the offered memory of the GPU.

use std::collections::BTreeMap;

use tessera_api::names::{DRIVER_NAME, capacity};

use crate::device_name::{DeviceName, ParseError};
use crate::inventory::Inventory;
use crate::overcommit::MemoryOvercommit;
use crate::quantity::{self, QuantityError};

/// One `status.allocation.devices.results[]` entry, whatever API version it was read in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceResult {
    /// The request, `<request>` or `<request>/<subrequest>` (prioritised list).
    pub request: String,
    pub driver: String,
    pub pool: String,
    pub device: String,
    pub share_id: Option<String>,
    /// Capacity name → quantity string, as the scheduler wrote it (consumable mode).
    pub consumed_capacity: BTreeMap<String, String>,
    /// `adminAccess: true` (KEP-5018): the device is the claim's in addition to whoever else
    /// has it, for monitoring or debugging; it consumed nothing.
    pub admin_access: bool,
}

/// A result of ours, resolved to its GPU and share.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocatedDevice {
    /// The claim's request name, without a subrequest (what the kubelet matches containers on).
    pub request: String,
    pub pool: String,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    pub gpu_uuid: String,
    pub gpu_index: u32,
    pub gpu_minor: u32,
    pub memory: u64,
    pub cores: u32,
    /// Allocated with admin access: no wall, no charge (see [`DeviceResult::admin_access`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin_access: bool,
}

/// The claim's limit on one GPU: the sum of its devices there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuLimit {
    pub uuid: String,
    pub index: u32,
    pub minor: u32,
    pub memory_limit: u64,
    pub cores: u32,
    /// What each CUDA context costs on the GPU, charged by the shim against `memory_limit`.
    /// Checkpoints written before it was measured have none: 0, as those claims were prepared.
    #[serde(default)]
    pub context_overhead: u64,
}

/// Everything a claim gets on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimLimits {
    /// One per result of ours, in result order.
    pub devices: Vec<AllocatedDevice>,
    /// One per GPU, in index order.
    pub gpus: Vec<GpuLimit>,
}

/// Why a claim's allocation cannot be prepared here. Messages name the device and field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the allocation has no devices of driver {DRIVER_NAME}")]
    NoDevices,
    #[error(transparent)]
    DeviceName(#[from] ParseError),
    #[error("device {device:?}: GPU index {index} is not on this node")]
    UnknownGpu { device: String, index: u32 },
    #[error("device {device:?} does not fit GPU {uuid} ({memory} bytes)")]
    DoesNotFit {
        device: String,
        uuid: String,
        memory: u64,
    },
    #[error("device {device:?}: consumedCapacity.{capacity}: {source}")]
    Quantity {
        device: String,
        capacity: String,
        #[source]
        source: QuantityError,
    },
    #[error("device {device:?}: consumedCapacity.memory is 0; a claim needs some memory")]
    NoMemory { device: String },
    #[error("the claim spans {0} GPUs, at most {max} are supported", max = tessera_api::region::MAX_DEVICES)]
    TooManyGpus(usize),
    #[error(
        "the claim mixes adminAccess requests with ordinary ones: an admin claim is prepared without a wall and an ordinary one with its share, so put them in two claims"
    )]
    MixedAdminAccess,
    #[error(
        "the claim's memory on GPU {uuid} ({limit} bytes) is less than one CUDA context there ({overhead} bytes, as measured on this node): no CUDA program could start in it; ask for more memory"
    )]
    BelowContextOverhead {
        uuid: String,
        limit: u64,
        overhead: u64,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Refuses a claim whose wall on a GPU is below one CUDA context there: every CUDA program would
/// fail at its first call, with an out-of-memory error that does not say why. An admin claim has
/// no wall. Checked when a claim is first prepared, not again for one already prepared (its
/// containers run with what they were given, whatever the node measures after a restart).
pub fn check_context_overhead(limits: &ClaimLimits) -> Result<()> {
    let admin = limits.devices.iter().all(|d| d.admin_access);
    match limits
        .gpus
        .iter()
        .find(|g| !admin && g.memory_limit < g.context_overhead)
    {
        Some(gpu) => Err(Error::BelowContextOverhead {
            uuid: gpu.uuid.clone(),
            limit: gpu.memory_limit,
            overhead: gpu.context_overhead,
        }),
        None => Ok(()),
    }
}

/// Resolves the results of `gpu.tessera.dev` (others are skipped) against `inventory`.
pub fn claim_limits(results: &[DeviceResult], inventory: &Inventory) -> Result<ClaimLimits> {
    claim_limits_with(results, inventory, &MemoryOvercommit::none())
}

/// [`claim_limits`] on a node whose memory is overcommitted by `overcommit`.
pub fn claim_limits_with(
    results: &[DeviceResult],
    inventory: &Inventory,
    overcommit: &MemoryOvercommit,
) -> Result<ClaimLimits> {
    let mut devices = Vec::new();
    for result in results.iter().filter(|r| r.driver == DRIVER_NAME) {
        devices.push(resolve(result, inventory, overcommit)?);
    }
    if devices.is_empty() {
        return Err(Error::NoDevices);
    }
    if devices.iter().any(|d| d.admin_access) && !devices.iter().all(|d| d.admin_access) {
        return Err(Error::MixedAdminAccess);
    }
    let mut gpus: BTreeMap<u32, GpuLimit> = BTreeMap::new();
    for device in &devices {
        let entry = gpus.entry(device.gpu_index).or_insert_with(|| GpuLimit {
            uuid: device.gpu_uuid.clone(),
            index: device.gpu_index,
            minor: device.gpu_minor,
            memory_limit: 0,
            cores: 0,
            context_overhead: 0,
        });
        entry.memory_limit = entry.memory_limit.saturating_add(device.memory);
        entry.cores = (entry.cores + device.cores).min(100);
    }
    // Two shares of one GPU can never add up to more than the card (as offered).
    for gpu in gpus.values_mut() {
        if let Some(card) = inventory.by_index(gpu.index) {
            gpu.memory_limit = gpu.memory_limit.min(overcommit.offered_memory(card));
            gpu.context_overhead = card.context_overhead;
        }
    }
    if gpus.len() > tessera_api::region::MAX_DEVICES {
        return Err(Error::TooManyGpus(gpus.len()));
    }
    Ok(ClaimLimits {
        devices,
        gpus: gpus.into_values().collect(),
    })
}

fn resolve(
    result: &DeviceResult,
    inventory: &Inventory,
    overcommit: &MemoryOvercommit,
) -> Result<AllocatedDevice> {
    let name = DeviceName::parse(&result.device)?;
    let device = || result.device.clone();
    let gpu = inventory
        .by_index(name.gpu_index())
        .ok_or_else(|| Error::UnknownGpu {
            device: device(),
            index: name.gpu_index(),
        })?;
    let request = result
        .request
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    // Admin access takes nothing from anyone: the card as it is, with no wall.
    let (memory, cores) = if result.admin_access {
        (gpu.memory, 100)
    } else {
        share_of(result, &name, gpu, overcommit)?
    };
    Ok(AllocatedDevice {
        request,
        pool: result.pool.clone(),
        device: result.device.clone(),
        share_id: result.share_id.clone(),
        gpu_uuid: gpu.uuid.clone(),
        gpu_index: gpu.index,
        gpu_minor: gpu.minor,
        memory,
        cores,
        admin_access: result.admin_access,
    })
}

/// The memory and cores an ordinary result gets: the device's own share, narrowed by the
/// consumed capacity where the scheduler wrote one.
fn share_of(
    result: &DeviceResult,
    name: &DeviceName,
    gpu: &crate::inventory::Gpu,
    overcommit: &MemoryOvercommit,
) -> Result<(u64, u32)> {
    let device = || result.device.clone();
    let consumes_memory = result.consumed_capacity.contains_key(capacity::MEMORY);
    // Shares are cut from the offered memory; a whole GPU handed to one claim is the card.
    let basis = match name {
        DeviceName::Whole { .. } if !consumes_memory => gpu.clone(),
        _ => overcommit.offered(gpu),
    };
    let share = name.limits(&basis).ok_or_else(|| Error::DoesNotFit {
        device: device(),
        uuid: gpu.uuid.clone(),
        memory: basis.memory,
    })?;
    let consumed = |capacity: &str| -> Result<Option<u64>> {
        result
            .consumed_capacity
            .get(capacity)
            .map(|q| quantity::parse(q))
            .transpose()
            .map_err(|source| Error::Quantity {
                device: device(),
                capacity: capacity.to_string(),
                source,
            })
    };
    let memory = match consumed(capacity::MEMORY)? {
        Some(0) => return Err(Error::NoMemory { device: device() }),
        Some(bytes) => bytes.min(share.memory),
        None => share.memory,
    };
    // Zero consumed cores means "no guaranteed share": the shim's smallest share, 1.
    let cores = match consumed(capacity::CORES)? {
        Some(cores) => cores.clamp(1, u64::from(share.cores)) as u32,
        None => share.cores,
    };
    Ok((memory, cores))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Gpu;

    fn inventory() -> Inventory {
        let gpu = |index: u32, memory: u64| Gpu {
            uuid: format!("GPU-{index}"),
            index,
            minor: index + 10,
            product_name: "test".into(),
            memory,
            brand: None,
            architecture: None,
            cuda_compute_capability: None,
            pci_bus_id: None,
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        };
        Inventory {
            driver_version: None,
            gpus: vec![gpu(0, 24 << 30), gpu(1, 48 << 30)],
        }
    }

    fn result(device: &str) -> DeviceResult {
        DeviceResult {
            request: "gpu".into(),
            driver: DRIVER_NAME.into(),
            pool: "node-a".into(),
            device: device.into(),
            ..Default::default()
        }
    }

    fn share(device: &str, id: &str, memory: &str, cores: &str) -> DeviceResult {
        DeviceResult {
            share_id: Some(id.into()),
            consumed_capacity: [
                ("memory".to_string(), memory.to_string()),
                ("cores".to_string(), cores.to_string()),
            ]
            .into_iter()
            .collect(),
            ..result(device)
        }
    }

    #[test]
    fn admin_access_gets_the_card_and_cannot_mix() {
        let admin = DeviceResult {
            admin_access: true,
            ..share("gpu-0", "s1", "1Gi", "10")
        };
        let limits = claim_limits(std::slice::from_ref(&admin), &inventory()).expect("limits");
        let gpu = &limits.gpus[0];
        assert_eq!(
            (gpu.memory_limit, gpu.cores),
            (inventory().gpus[0].memory, 100)
        );
        assert!(limits.devices[0].admin_access);
        let mixed = [admin, share("gpu-0", "s2", "1Gi", "10")];
        assert!(matches!(
            claim_limits(&mixed, &inventory()),
            Err(Error::MixedAdminAccess)
        ));
    }

    #[test]
    fn each_gpu_limit_carries_the_measured_context_cost_and_a_wall_below_it_is_refused() {
        let mut node = inventory();
        node.gpus[1].context_overhead = 500 << 20;
        let limits = claim_limits(&[share("gpu-1", "s1", "2Gi", "25")], &node).expect("valid");
        assert_eq!(limits.gpus[0].context_overhead, 500 << 20);
        assert!(check_context_overhead(&limits).is_ok());
        let tiny = claim_limits(&[share("gpu-1", "s1", "256Mi", "25")], &node).expect("resolves");
        let message = check_context_overhead(&tiny)
            .expect_err("below one context")
            .to_string();
        assert!(
            message.contains("GPU-1") && message.contains("less than one CUDA context"),
            "{message}"
        );
        // An admin claim has no wall, so nothing to fall below.
        let mut admin = share("gpu-1", "s1", "256Mi", "25");
        admin.admin_access = true;
        let admin = claim_limits(&[admin], &node).expect("resolves");
        assert!(check_context_overhead(&admin).is_ok());
    }

    #[test]
    fn consumable_shares_take_the_consumed_capacity() {
        let limits =
            claim_limits(&[share("gpu-1", "s1", "2Gi", "25")], &inventory()).expect("valid");
        assert_eq!(
            limits.gpus,
            vec![GpuLimit {
                uuid: "GPU-1".into(),
                index: 1,
                minor: 11,
                memory_limit: 2 << 30,
                cores: 25,
                context_overhead: 0,
            }]
        );
        assert_eq!(limits.devices[0].share_id.as_deref(), Some("s1"));
    }

    #[test]
    fn fixed_and_exclusive_devices_take_their_own_share() {
        let limits = claim_limits(&[result("gpu-0-slice-2of4"), result("gpu-1")], &inventory())
            .expect("valid");
        let got: Vec<_> = limits
            .gpus
            .iter()
            .map(|g| (g.index, g.memory_limit, g.cores))
            .collect();
        assert_eq!(got, vec![(0, 6 << 30, 25), (1, 48 << 30, 100)]);
    }

    #[test]
    fn two_results_on_one_gpu_add_up_to_at_most_the_card() {
        let results = [
            share("gpu-0", "a", "20Gi", "60"),
            share("gpu-0", "b", "20Gi", "60"),
        ];
        let limits = claim_limits(&results, &inventory()).expect("valid");
        assert_eq!(limits.devices.len(), 2);
        assert_eq!(
            (limits.gpus[0].memory_limit, limits.gpus[0].cores),
            (24 << 30, 100)
        );
    }

    #[test]
    fn other_drivers_are_skipped_and_subrequests_stripped() {
        let mut theirs = result("gpu-0");
        theirs.driver = "gpu.nvidia.com".into();
        let mut ours = result("gpu-1");
        ours.request = "gpu/large".into();
        let limits = claim_limits(&[theirs, ours], &inventory()).expect("valid");
        assert_eq!(limits.devices.len(), 1);
        assert_eq!(limits.devices[0].request, "gpu");
        let mut only_theirs = result("gpu-0");
        only_theirs.driver = "other".into();
        assert!(matches!(
            claim_limits(&[only_theirs], &inventory()),
            Err(Error::NoDevices)
        ));
    }

    #[test]
    fn errors_name_device_and_field() {
        let err = |r: DeviceResult| {
            claim_limits(&[r], &inventory())
                .expect_err("invalid")
                .to_string()
        };
        assert!(err(result("gpu-7")).contains("GPU index 7"));
        assert!(err(result("tpu-0")).contains("tpu-0"));
        assert!(err(share("gpu-0", "s", "lots", "1")).contains("consumedCapacity.memory"));
        assert!(err(share("gpu-0", "s", "0", "1")).contains("consumedCapacity.memory is 0"));
        assert!(err(result("gpu-0-mem-99999mi-0")).contains("does not fit"));
    }

    fn doubled() -> MemoryOvercommit {
        "2".parse().expect("valid")
    }

    #[test]
    fn overcommit_cuts_shares_from_the_offered_memory() {
        // Consumable: the consumed capacity, up to the offered 48 GiB of a 24 GiB card.
        let limits = claim_limits_with(
            &[share("gpu-0", "s", "20Gi", "25")],
            &inventory(),
            &doubled(),
        )
        .expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 20 << 30);
        let limits = claim_limits_with(
            &[share("gpu-0", "s", "40Gi", "25")],
            &inventory(),
            &doubled(),
        )
        .expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 40 << 30);
        // More than offered is cut to the offered memory (the scheduler's validRange max).
        let limits = claim_limits_with(
            &[share("gpu-0", "s", "60Gi", "25")],
            &inventory(),
            &doubled(),
        )
        .expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 48 << 30);
        // Without overcommit the same share is cut to the card, as before.
        let limits =
            claim_limits(&[share("gpu-0", "s", "40Gi", "25")], &inventory()).expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 24 << 30);
        // Fixed / partitioned slices: a quarter of the offered memory.
        let limits = claim_limits_with(&[result("gpu-0-slice-1of4")], &inventory(), &doubled())
            .expect("valid");
        assert_eq!(
            (limits.gpus[0].memory_limit, limits.gpus[0].cores),
            (12 << 30, 25)
        );
    }

    #[test]
    fn overcommit_leaves_a_whole_gpu_the_card_and_caps_a_claim_at_the_offered_memory() {
        let limits =
            claim_limits_with(&[result("gpu-1")], &inventory(), &doubled()).expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 48 << 30, "exclusive: the card");
        let results = [
            share("gpu-0", "a", "40Gi", "50"),
            share("gpu-0", "b", "40Gi", "50"),
        ];
        let limits = claim_limits_with(&results, &inventory(), &doubled()).expect("valid");
        assert_eq!(
            limits.gpus[0].memory_limit,
            48 << 30,
            "two shares: the offered memory"
        );
        // A per-model policy only touches its model.
        let l40s_only: MemoryOvercommit = "test=1.5,other=3".parse().expect("valid");
        let limits = claim_limits_with(&[result("gpu-1-slice-0of2")], &inventory(), &l40s_only)
            .expect("valid");
        assert_eq!(limits.gpus[0].memory_limit, 36 << 30);
    }
}
