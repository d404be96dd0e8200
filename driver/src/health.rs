//! GPU health: which of the node's GPUs may be offered right now, and what changed since the
//! last look.
//!
//! The GPUs a node may offer are those of its start-up inventory (preparing a claim needs a
//! GPU's record, so a GPU first seen later is reported, not offered, until the plugin restarts).
//! Each look at the node ([`Observation`]: NVML's view, or the fake inventory file's) says which
//! of them are still there and healthy; [`HealthTracker`] turns the looks into [`Change`]s and
//! into the inventory to publish ([`HealthTracker::offered`]). A GPU marked by an XID error
//! ([`HealthTracker::mark`]) stays withdrawn until the plugin restarts, as NVIDIA's device
//! plugin does: after such an error the GPU needs a reset, and nothing in NVML says when it
//! had one.
//!
//! Where the API server keeps device taints (KEP-5055), an unhealthy GPU is published tainted
//! instead of withdrawn ([`NodeGpus`]), so pods and admins see why: [`Taint`] says which taint
//! each reason gets. `NoExecute` where the work on the GPU is lost anyway (the GPU is gone or
//! lost, or a critical XID means it needs a reset), so the pods using it are evicted and
//! rescheduled; `NoSchedule` where running work may go on and only new claims stay away.

use std::collections::{BTreeMap, BTreeSet};

use crate::inventory::Inventory;

/// One GPU's health as a look at the node reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Present but not usable; the reason names what was seen.
    Unhealthy(String),
    /// Present, but the driver reports it lost (`NVML_ERROR_GPU_IS_LOST`): the work on it is
    /// gone and it needs a reset.
    Lost(String),
}

/// The taint key of a GPU the node no longer reports.
pub const TAINT_GONE: &str = "gpu.tessera.dev/gone";
/// The taint key of a GPU the driver reports lost.
pub const TAINT_LOST: &str = "gpu.tessera.dev/lost";
/// The taint key of a GPU withdrawn after a critical XID; the value is the XID.
pub const TAINT_XID: &str = "gpu.tessera.dev/xid";
/// The taint key of a GPU a look reports unhealthy in another way.
pub const TAINT_UNHEALTHY: &str = "gpu.tessera.dev/unhealthy";

/// What a device taint does (`DeviceTaint.effect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaintEffect {
    /// No new claim gets the device; claims already allocated keep it.
    NoSchedule,
    /// Also evicts the pods whose claims use the device.
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// A device taint for an unhealthy GPU.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Taint {
    pub key: &'static str,
    /// A label value (at most 63 characters); empty for most keys.
    pub value: String,
    pub effect: TaintEffect,
}

/// One unhealthy GPU: why, and the taint that says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unhealthy {
    pub reason: String,
    pub taint: Taint,
}

/// The node's GPUs as the slice controller publishes them: every GPU of the start-up inventory,
/// and the unhealthy ones by UUID. Where taints are kept, all are published and the unhealthy
/// ones tainted; elsewhere only [`NodeGpus::healthy`] ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeGpus {
    pub known: Inventory,
    pub unhealthy: BTreeMap<String, Unhealthy>,
}

impl NodeGpus {
    /// The known GPUs without the unhealthy ones (indices unchanged, so device names stay).
    pub fn healthy(&self) -> Inventory {
        Inventory {
            driver_version: self.known.driver_version.clone(),
            gpus: self
                .known
                .gpus
                .iter()
                .filter(|g| !self.unhealthy.contains_key(&g.uuid))
                .cloned()
                .collect(),
        }
    }

    /// GPU index → taint, for every unhealthy GPU.
    pub fn taints_by_index(&self) -> BTreeMap<u32, Taint> {
        self.known
            .gpus
            .iter()
            .filter_map(|g| Some((g.index, self.unhealthy.get(&g.uuid)?.taint.clone())))
            .collect()
    }
}

impl From<Inventory> for NodeGpus {
    /// Every GPU healthy.
    fn from(known: Inventory) -> NodeGpus {
        NodeGpus {
            known,
            unhealthy: BTreeMap::new(),
        }
    }
}

/// One look at the node: every GPU seen, by UUID. A GPU of the inventory that is not in
/// `seen` has gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    pub seen: BTreeMap<String, Health>,
}

impl Observation {
    /// Every GPU of `inventory`, healthy.
    pub fn all_healthy(inventory: &Inventory) -> Observation {
        Observation {
            seen: inventory
                .gpus
                .iter()
                .map(|g| (g.uuid.clone(), Health::Healthy))
                .collect(),
        }
    }
}

/// What a look (or a mark) changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The GPU is no longer offered.
    Withdrawn {
        uuid: String,
        index: u32,
        reason: String,
    },
    /// The GPU is offered again.
    Restored { uuid: String, index: u32 },
    /// A GPU that was not in the start-up inventory; reported once.
    Unknown { uuid: String },
}

/// Why a GPU that is no longer seen is withdrawn.
pub const GONE: &str = "no longer reported by the node (removed, or fallen off the bus)";

/// Which GPUs of the start-up inventory are withdrawn, and why.
#[derive(Clone, Debug)]
pub struct HealthTracker {
    known: Inventory,
    /// UUID → why, for every withdrawn GPU.
    withdrawn: BTreeMap<String, Unhealthy>,
    /// UUID → (XID, reason), for GPUs marked until restart.
    marked: BTreeMap<String, (u64, String)>,
    /// UUIDs of unknown GPUs already reported.
    unknown: BTreeSet<String>,
    last: Observation,
}

impl HealthTracker {
    /// Tracks `known`, every GPU offered until the first look says otherwise.
    pub fn new(known: Inventory) -> HealthTracker {
        let last = Observation::all_healthy(&known);
        HealthTracker {
            known,
            withdrawn: BTreeMap::new(),
            marked: BTreeMap::new(),
            unknown: BTreeSet::new(),
            last,
        }
    }

    /// The start-up inventory.
    pub fn known(&self) -> &Inventory {
        &self.known
    }

    /// Withdrawn GPUs: UUID → why.
    pub fn withdrawn(&self) -> &BTreeMap<String, Unhealthy> {
        &self.withdrawn
    }

    /// The inventory to offer: the start-up inventory without the withdrawn GPUs (indices
    /// unchanged, so device names stay the same).
    pub fn offered(&self) -> Inventory {
        self.node_gpus().healthy()
    }

    /// Every known GPU and the unhealthy ones, for the slice controller.
    pub fn node_gpus(&self) -> NodeGpus {
        NodeGpus {
            known: self.known.clone(),
            unhealthy: self.withdrawn.clone(),
        }
    }

    /// Takes a new look into account.
    pub fn observe(&mut self, observation: Observation) -> Vec<Change> {
        let mut changes = Vec::new();
        for uuid in observation.seen.keys() {
            if self.known.gpus.iter().all(|g| &g.uuid != uuid) && self.unknown.insert(uuid.clone())
            {
                changes.push(Change::Unknown { uuid: uuid.clone() });
            }
        }
        self.last = observation;
        changes.extend(self.settle());
        changes
    }

    /// Withdraws `uuid` until restart after critical XID `xid`. Unknown UUIDs are ignored.
    pub fn mark(&mut self, uuid: &str, xid: u64, reason: &str) -> Vec<Change> {
        if self.known.gpus.iter().any(|g| g.uuid == uuid) {
            self.marked
                .insert(uuid.to_string(), (xid, reason.to_string()));
        }
        self.settle()
    }

    /// Recomputes the withdrawn set from the last look and the marks.
    fn settle(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for gpu in &self.known.gpus {
            let taint = |key, value: String, effect| Taint { key, value, effect };
            let why = match (self.marked.get(&gpu.uuid), self.last.seen.get(&gpu.uuid)) {
                (Some((xid, reason)), _) => Some((
                    reason.clone(),
                    taint(TAINT_XID, xid.to_string(), TaintEffect::NoExecute),
                )),
                (None, None) => Some((
                    GONE.to_string(),
                    taint(TAINT_GONE, String::new(), TaintEffect::NoExecute),
                )),
                (None, Some(Health::Lost(reason))) => Some((
                    reason.clone(),
                    taint(TAINT_LOST, String::new(), TaintEffect::NoExecute),
                )),
                (None, Some(Health::Unhealthy(reason))) => Some((
                    reason.clone(),
                    taint(TAINT_UNHEALTHY, String::new(), TaintEffect::NoSchedule),
                )),
                (None, Some(Health::Healthy)) => None,
            };
            let why = why.map(|(reason, taint)| Unhealthy { reason, taint });
            match (why, self.withdrawn.contains_key(&gpu.uuid)) {
                (Some(why), false) => {
                    let reason = why.reason.clone();
                    self.withdrawn.insert(gpu.uuid.clone(), why);
                    changes.push(Change::Withdrawn {
                        uuid: gpu.uuid.clone(),
                        index: gpu.index,
                        reason,
                    });
                }
                // Still withdrawn; keep the newest reason without announcing it again.
                (Some(why), true) => {
                    self.withdrawn.insert(gpu.uuid.clone(), why);
                }
                (None, true) => {
                    self.withdrawn.remove(&gpu.uuid);
                    changes.push(Change::Restored {
                        uuid: gpu.uuid.clone(),
                        index: gpu.index,
                    });
                }
                (None, false) => {}
            }
        }
        changes
    }
}

/// XIDs that an application causes (and that leave the GPU usable), which must not withdraw a
/// GPU: 13 (graphics engine exception), 31 (GPU memory page fault), 43 (GPU stopped processing),
/// 45 (preemptive cleanup), 68 (video processor exception), 109 (context switch timeout) — the
/// list NVIDIA's k8s-device-plugin skips.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Whether XID `xid` means the GPU needs attention (withdraw it).
pub fn xid_is_critical(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Gpu;

    fn inventory(n: u32) -> Inventory {
        Inventory {
            driver_version: Some("570.86.15".into()),
            gpus: (0..n)
                .map(|i| Gpu {
                    uuid: format!("GPU-{i}"),
                    index: i,
                    minor: i,
                    product_name: "NVIDIA L40S".into(),
                    memory: 48 << 30,
                    brand: None,
                    architecture: None,
                    cuda_compute_capability: None,
                    pci_bus_id: None,
                    pcie_root: None,
                    numa_node: None,
                    context_overhead: 0,
                    driver_memory_wall: false,
                })
                .collect(),
        }
    }

    fn look(entries: &[(&str, Health)]) -> Observation {
        Observation {
            seen: entries
                .iter()
                .map(|(u, h)| (u.to_string(), h.clone()))
                .collect(),
        }
    }

    fn offered(t: &HealthTracker) -> Vec<u32> {
        t.offered().gpus.iter().map(|g| g.index).collect()
    }

    #[test]
    fn unhealthy_and_gone_gpus_are_withdrawn_and_come_back() {
        let mut t = HealthTracker::new(inventory(3));
        assert_eq!(offered(&t), [0, 1, 2]);
        let changes = t.observe(look(&[
            ("GPU-0", Health::Healthy),
            ("GPU-1", Health::Unhealthy("XID 79".into())),
        ]));
        assert_eq!(
            changes,
            [
                Change::Withdrawn {
                    uuid: "GPU-1".into(),
                    index: 1,
                    reason: "XID 79".into()
                },
                Change::Withdrawn {
                    uuid: "GPU-2".into(),
                    index: 2,
                    reason: GONE.into()
                },
            ]
        );
        assert_eq!(offered(&t), [0], "indices are kept");
        // The same look again changes nothing.
        assert!(
            t.observe(look(&[
                ("GPU-0", Health::Healthy),
                ("GPU-1", Health::Unhealthy("lost".into())),
            ]))
            .is_empty()
        );
        assert_eq!(t.withdrawn()["GPU-1"].reason, "lost", "newest reason kept");
        let back = t.observe(Observation::all_healthy(&inventory(3)));
        assert_eq!(
            back,
            [
                Change::Restored {
                    uuid: "GPU-1".into(),
                    index: 1
                },
                Change::Restored {
                    uuid: "GPU-2".into(),
                    index: 2
                },
            ]
        );
        assert_eq!(offered(&t), [0, 1, 2]);
    }

    #[test]
    fn all_gone_offers_nothing() {
        let mut t = HealthTracker::new(inventory(2));
        assert_eq!(t.observe(Observation::default()).len(), 2);
        assert!(t.offered().gpus.is_empty());
    }

    #[test]
    fn marks_last_until_restart_and_unknown_gpus_are_reported_once() {
        let mut t = HealthTracker::new(inventory(2));
        assert_eq!(t.mark("GPU-1", 79, "XID 79").len(), 1);
        assert!(
            t.mark("GPU-9", 79, "XID 79").is_empty(),
            "unknown UUID ignored"
        );
        let all = look(&[
            ("GPU-0", Health::Healthy),
            ("GPU-1", Health::Healthy),
            ("GPU-7", Health::Healthy),
        ]);
        assert_eq!(
            t.observe(all.clone()),
            [Change::Unknown {
                uuid: "GPU-7".into()
            }]
        );
        assert!(t.observe(all).is_empty(), "reported once");
        assert_eq!(
            offered(&t),
            [0],
            "the mark holds while the GPU looks healthy"
        );
    }

    #[test]
    fn each_reason_gets_its_taint() {
        let mut t = HealthTracker::new(inventory(4));
        t.mark("GPU-0", 79, "critical XID 79");
        t.observe(look(&[
            ("GPU-0", Health::Healthy),
            ("GPU-1", Health::Lost("lost".into())),
            ("GPU-2", Health::Unhealthy("too hot".into())),
        ]));
        let gpus = t.node_gpus();
        assert_eq!(gpus.known.gpus.len(), 4, "every GPU stays known");
        let taints = gpus.taints_by_index();
        let t = |key, value: &str, effect| Taint {
            key,
            value: value.into(),
            effect,
        };
        assert_eq!(
            taints,
            BTreeMap::from([
                (0, t(TAINT_XID, "79", TaintEffect::NoExecute)),
                (1, t(TAINT_LOST, "", TaintEffect::NoExecute)),
                (2, t(TAINT_UNHEALTHY, "", TaintEffect::NoSchedule)),
                (3, t(TAINT_GONE, "", TaintEffect::NoExecute)),
            ])
        );
        assert!(gpus.healthy().gpus.is_empty());
    }

    #[test]
    fn application_xids_are_not_critical() {
        assert!(!xid_is_critical(13) && !xid_is_critical(43));
        assert!(xid_is_critical(48) && xid_is_critical(79) && xid_is_critical(94));
    }
}
