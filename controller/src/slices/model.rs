//! A version-neutral ResourceSlice model: what a pool holds, before it is rendered for one
//! `resource.k8s.io` version. Building and splitting work on this model so that every API version
//! publishes the same devices.

use std::collections::BTreeMap;

/// How a node's GPUs are offered (DESIGN.md, "How a GPU is offered").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SharingMode {
    /// One device per GPU, `allowMultipleAllocations`, capacity `memory`/`cores` with request policies.
    Consumable,
    /// Shared counters per GPU and a ladder of devices (whole, ½, ¼, ⅛) consuming them.
    Partitioned,
    /// Each GPU as N equal, independent devices.
    Fixed { slices: u32 },
    /// Whole GPUs.
    Exclusive,
}

impl SharingMode {
    /// The name used in flags, Events and docs.
    pub fn name(&self) -> &'static str {
        match self {
            SharingMode::Consumable => "consumable",
            SharingMode::Partitioned => "partitioned",
            SharingMode::Fixed { .. } => "fixed",
            SharingMode::Exclusive => "exclusive",
        }
    }
}

/// Where shared counters live: 1.33/1.34 keep them in the slice of the devices consuming them;
/// from 1.35 a slice holds either devices or counters, never both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterLayout {
    Combined,
    Separate,
}

/// A device attribute value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    Int(i64),
    Bool(bool),
    String(String),
    /// Semantic version 2.0.0.
    Version(String),
}

/// A consumable-capacity request policy: a range with a step, and the default a request gets
/// when it does not name this capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestPolicy {
    pub default: u64,
    pub min: u64,
    pub max: u64,
    pub step: u64,
}

/// One capacity of a device; plain integers (bytes, or cores out of 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub value: u64,
    pub policy: Option<RequestPolicy>,
}

/// A named set of counters (one per GPU in partitioned mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSet {
    pub name: String,
    pub counters: BTreeMap<String, u64>,
}

/// What one device takes from a counter set when allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterConsumption {
    pub counter_set: String,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    /// The GPU index the device lives on; not published, used to keep a GPU's devices together.
    pub gpu_index: u32,
    pub attributes: BTreeMap<String, Attribute>,
    pub capacity: BTreeMap<String, Capacity>,
    pub consumes_counters: Vec<CounterConsumption>,
    pub allow_multiple_allocations: bool,
    /// Device taints (an unhealthy GPU's devices, where the server keeps taints).
    pub taints: Vec<tessera_driver::health::Taint>,
}

/// The contents of one ResourceSlice: devices, counter sets, or (combined layout) both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceContent {
    pub counter_sets: Vec<CounterSet>,
    pub devices: Vec<Device>,
}

/// A node's pool, split into slices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    /// Pool name, the node name.
    pub pool: String,
    pub node: String,
    pub mode: SharingMode,
    pub slices: Vec<SliceContent>,
}

impl PoolPlan {
    /// Every device of the pool, in slice order.
    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.slices.iter().flat_map(|s| s.devices.iter())
    }
}
