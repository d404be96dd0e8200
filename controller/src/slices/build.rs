//! Inventory → devices for each sharing mode, and the split of a pool into slices within the
//! API's limits (dra-api.md §1.4).
//!
//! Device names follow `tessera_driver::DeviceName` exactly, and capacities come from
//! `DeviceName::limits`, because preparing a claim derives the limits from the name alone.
//!
//! Memory overcommit ([`MemoryOvercommit`], `docs/oversubscription.md`): shares are cut from the
//! offered memory (physical × the GPU's factor) in consumable, partitioned and fixed mode, as
//! `tessera_driver::allocation::claim_limits_with` cuts them; a whole GPU for one claim
//! (exclusive, partitioned's `gpu-<i>`) stays the physical card.

use std::collections::BTreeMap;

use tessera_api::names::{attribute, capacity};
use tessera_driver::health::Taint;
use tessera_driver::{DeviceName, Gpu, Inventory, MemoryOvercommit};

use super::model::*;

/// Devices per slice (`ResourceSliceMaxDevices`).
pub const MAX_DEVICES: usize = 128;
/// Devices per slice when any consumes counters (`ResourceSliceMaxDevicesWithAdvancedFeatures`).
pub const MAX_DEVICES_WITH_COUNTERS: usize = 64;
/// Counter sets per slice (`ResourceSliceMaxCounterSets`).
pub const MAX_COUNTER_SETS: usize = 8;
/// Attributes plus capacities per device.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// String and version attribute values.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 64;

const MIB: u64 = 1 << 20;
/// Consumable memory moves in steps of 256 MiB: fine enough for any workload, coarse enough that
/// the scheduler's rounding stays meaningful.
pub const MEMORY_STEP: u64 = 256 * MIB;
/// The partitioned ladder: whole, ½, ¼, ⅛.
pub const LADDER: [u32; 4] = [1, 2, 4, 8];

/// Why a pool cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error(
        "GPU {index} ({uuid}): {memory} bytes of memory is too small for mode {mode} (each device needs at least 1 MiB, consumable at least 512 MiB)"
    )]
    TooSmall {
        index: u32,
        uuid: String,
        memory: u64,
        mode: &'static str,
    },
    #[error("fixed mode needs 1 to 100 slices per GPU, not {0}")]
    BadSliceCount(u32),
    #[error("the inventory has no GPUs")]
    NoGpus,
}

/// Builds the pool of `node` for `mode`.
pub fn build_pool(
    inventory: &Inventory,
    node: &str,
    mode: SharingMode,
    layout: CounterLayout,
) -> Result<PoolPlan, BuildError> {
    build_pool_with(
        inventory,
        node,
        mode,
        layout,
        &MemoryOvercommit::none(),
        &BTreeMap::new(),
    )
}

/// [`build_pool`] with the node's memory overcommit, and `taints` (GPU index → taint) on every
/// device of the tainted GPUs.
pub fn build_pool_with(
    inventory: &Inventory,
    node: &str,
    mode: SharingMode,
    layout: CounterLayout,
    overcommit: &MemoryOvercommit,
    taints: &BTreeMap<u32, Taint>,
) -> Result<PoolPlan, BuildError> {
    if inventory.gpus.is_empty() {
        return Err(BuildError::NoGpus);
    }
    let mut units = Vec::with_capacity(inventory.gpus.len());
    for gpu in &inventory.gpus {
        let mut unit = gpu_unit(inventory, gpu, mode, overcommit)?;
        if let Some(taint) = taints.get(&gpu.index) {
            for device in &mut unit.devices {
                device.taints.push(taint.clone());
            }
        }
        units.push(unit);
    }
    let slices = split(units, layout);
    Ok(PoolPlan {
        pool: node.to_string(),
        node: node.to_string(),
        mode,
        slices,
    })
}

/// One GPU's share of the pool: its counter set (partitioned) and its devices.
struct Unit {
    counter_set: Option<CounterSet>,
    devices: Vec<Device>,
}

fn gpu_unit(
    inventory: &Inventory,
    gpu: &Gpu,
    mode: SharingMode,
    overcommit: &MemoryOvercommit,
) -> Result<Unit, BuildError> {
    let too_small = || BuildError::TooSmall {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        memory: gpu.memory,
        mode: mode.name(),
    };
    let mut attributes = attributes(inventory, gpu);
    let factor = overcommit.factor(gpu);
    if factor.overcommits() && mode != SharingMode::Exclusive {
        attributes.insert(
            attribute::MEMORY_OVERCOMMIT_PERCENT.to_string(),
            Attribute::Int((factor.permille() / 10).into()),
        );
    }
    // What shares are cut from: the offered memory (physical in exclusive mode, and for any
    // whole GPU, which goes to one claim).
    let offered = overcommit.offered(gpu);
    let device = |name: DeviceName| -> Result<Device, BuildError> {
        let basis = match name {
            DeviceName::Whole { .. } => gpu,
            _ => &offered,
        };
        let share = name.limits(basis).ok_or_else(too_small)?;
        Ok(Device {
            name: name.to_string(),
            gpu_index: gpu.index,
            attributes: attributes.clone(),
            capacity: BTreeMap::from([
                (
                    capacity::MEMORY.to_string(),
                    Capacity {
                        value: share.memory,
                        policy: None,
                    },
                ),
                (
                    capacity::CORES.to_string(),
                    Capacity {
                        value: share.cores.into(),
                        policy: None,
                    },
                ),
            ]),
            consumes_counters: Vec::new(),
            allow_multiple_allocations: false,
            taints: Vec::new(),
        })
    };
    let index = gpu.index;
    match mode {
        SharingMode::Exclusive => Ok(Unit {
            counter_set: None,
            devices: vec![device(DeviceName::Whole { index })?],
        }),
        SharingMode::Fixed { slices } => {
            if !(1..=100).contains(&slices) {
                return Err(BuildError::BadSliceCount(slices));
            }
            let devices = (0..slices)
                .map(|n| {
                    device(DeviceName::Slice {
                        index,
                        n,
                        of: slices,
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(Unit {
                counter_set: None,
                devices,
            })
        }
        SharingMode::Consumable => {
            if gpu.memory < 2 * MEMORY_STEP {
                return Err(too_small());
            }
            let mut d = device(DeviceName::Whole { index })?;
            d.allow_multiple_allocations = true;
            // max must be min + k·step and at most the offered memory; the default (a request
            // that names no memory) is the whole usable physical card, so asking for nothing
            // never oversubscribes a GPU that is not overcommitted.
            let steps =
                |bytes: u64| MEMORY_STEP + (bytes - MEMORY_STEP) / MEMORY_STEP * MEMORY_STEP;
            let max = steps(offered.memory);
            let memory = Capacity {
                value: offered.memory,
                policy: Some(RequestPolicy {
                    default: steps(gpu.memory),
                    min: MEMORY_STEP,
                    max,
                    step: MEMORY_STEP,
                }),
            };
            let cores = Capacity {
                value: 100,
                policy: Some(RequestPolicy {
                    default: 100,
                    min: 1,
                    max: 100,
                    step: 1,
                }),
            };
            d.capacity.insert(capacity::MEMORY.to_string(), memory);
            d.capacity.insert(capacity::CORES.to_string(), cores);
            Ok(Unit {
                counter_set: None,
                devices: vec![d],
            })
        }
        SharingMode::Partitioned => {
            let set = counter_set_name(index);
            let counters = BTreeMap::from([
                (capacity::MEMORY.to_string(), offered.memory),
                (capacity::CORES.to_string(), 100),
            ]);
            let mut devices = Vec::new();
            for of in LADDER {
                for n in 0..of {
                    let name = if of == 1 {
                        DeviceName::Whole { index }
                    } else {
                        DeviceName::Slice { index, n, of }
                    };
                    let mut d = device(name)?;
                    // A device consumes exactly what it gives, so the scheduler never hands out
                    // more of a GPU than it has, whatever mix of sizes it picks; the whole GPU
                    // consumes the whole set (with overcommit, more than its physical capacity).
                    let consumed = if of == 1 {
                        counters.clone()
                    } else {
                        d.capacity
                            .iter()
                            .map(|(k, c)| (k.clone(), c.value))
                            .collect()
                    };
                    d.consumes_counters.push(CounterConsumption {
                        counter_set: set.clone(),
                        counters: consumed,
                    });
                    devices.push(d);
                }
            }
            Ok(Unit {
                counter_set: Some(CounterSet {
                    name: set,
                    counters,
                }),
                devices,
            })
        }
    }
}

/// The counter set of GPU `index`: a DNS label.
pub fn counter_set_name(index: u32) -> String {
    format!("gpu-{index}-counters")
}

/// Attributes per DESIGN.md; optional inventory fields are left out rather than published empty.
/// The same a claim's containers read in their device metadata (`tessera-kubelet-plugin`).
pub fn attributes(inventory: &Inventory, gpu: &Gpu) -> BTreeMap<String, Attribute> {
    let mut a = BTreeMap::new();
    let mut string = |key: &str, value: Option<&str>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            a.insert(key.to_string(), Attribute::String(truncate(v)));
        }
    };
    string(attribute::UUID, Some(&gpu.uuid));
    string(attribute::PRODUCT_NAME, Some(&gpu.product_name));
    string(attribute::BRAND, gpu.brand.as_deref());
    string(attribute::ARCHITECTURE, gpu.architecture.as_deref());
    // Extended BDF (`0000:01:00.0`), as the standard attribute is defined; NVML writes an
    // eight-digit domain.
    string(
        attribute::PCI_BUS_ID,
        gpu.pci_bus_id
            .as_deref()
            .and_then(tessera_driver::topology::bus_id)
            .as_deref(),
    );
    string(attribute::PCIE_ROOT, gpu.pcie_root.as_deref());
    if let Some(node) = gpu.numa_node {
        a.insert(
            attribute::NUMA_NODE.to_string(),
            Attribute::Int(node.into()),
        );
    }
    if let Some(v) = gpu.cuda_compute_capability.as_deref().and_then(semver) {
        a.insert(
            attribute::CUDA_COMPUTE_CAPABILITY.to_string(),
            Attribute::Version(v),
        );
    }
    if let Some(v) = inventory.driver_version.as_deref().and_then(semver) {
        a.insert(attribute::DRIVER_VERSION.to_string(), Attribute::Version(v));
    }
    a.insert(
        attribute::INDEX.to_string(),
        Attribute::Int(gpu.index.into()),
    );
    a.insert(
        attribute::MINOR.to_string(),
        Attribute::Int(gpu.minor.into()),
    );
    a.insert(
        attribute::DRIVER_MEMORY_WALL.to_string(),
        Attribute::Bool(gpu.driver_memory_wall),
    );
    a
}

fn truncate(v: &str) -> String {
    v.chars().take(MAX_ATTRIBUTE_VALUE_LEN).collect()
}

/// `8.9` → `8.9.0`, `535.104.05` → `535.104.5`: semver has three parts and no leading zeros,
/// and the API server refuses a version attribute that is not semver.
pub fn semver(text: &str) -> Option<String> {
    let mut parts = text.trim().split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some(format!("{major}.{minor}.{patch}"))
}

/// Packs GPUs into slices, keeping a GPU's devices together where they fit, within the device
/// and counter-set limits of each slice.
fn split(units: Vec<Unit>, layout: CounterLayout) -> Vec<SliceContent> {
    let counters = units.iter().any(|u| u.counter_set.is_some());
    let taints = units
        .iter()
        .any(|u| u.devices.iter().any(|d| !d.taints.is_empty()));
    // The API's limit is 64 devices where any has taints or consumes counters.
    let max_devices = if counters || taints {
        MAX_DEVICES_WITH_COUNTERS
    } else {
        MAX_DEVICES
    };
    let mut slices = Vec::new();
    let mut counter_slices: Vec<SliceContent> = Vec::new();
    let mut current = SliceContent::default();
    for unit in units {
        if let Some(set) = unit.counter_set {
            let target = match layout {
                CounterLayout::Combined => {
                    // The set must sit with its devices: start a new slice if either would overflow.
                    if current.counter_sets.len() == MAX_COUNTER_SETS
                        || current.devices.len() + unit.devices.len() > max_devices
                    {
                        slices.push(std::mem::take(&mut current));
                    }
                    &mut current
                }
                CounterLayout::Separate => {
                    if counter_slices
                        .last()
                        .is_none_or(|s| s.counter_sets.len() == MAX_COUNTER_SETS)
                    {
                        counter_slices.push(SliceContent::default());
                    }
                    counter_slices.last_mut().expect("just pushed")
                }
            };
            target.counter_sets.push(set);
        }
        // Without counters in the slice, start a new slice rather than split a GPU's devices.
        if (layout == CounterLayout::Separate || !counters)
            && !current.devices.is_empty()
            && current.devices.len() + unit.devices.len() > max_devices
        {
            slices.push(std::mem::take(&mut current));
        }
        for device in unit.devices {
            // Only a GPU with more devices than a slice holds is spread over several slices
            // (fixed mode can, combined counters never do: the ladder is 15 devices).
            if current.devices.len() == max_devices {
                slices.push(std::mem::take(&mut current));
            }
            current.devices.push(device);
        }
    }
    if !current.devices.is_empty() || !current.counter_sets.is_empty() {
        slices.push(current);
    }
    // Counters first, so a consumer reading the pool in name order meets them before their users.
    counter_slices.extend(slices);
    counter_slices
}
