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

use std::collections::{BTreeMap, BTreeSet};

use crate::inventory::Inventory;

/// One GPU's health as a look at the node reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Present but not usable; the reason names what was seen.
    Unhealthy(String),
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
    /// UUID → reason, for every withdrawn GPU.
    withdrawn: BTreeMap<String, String>,
    /// UUID → reason, for GPUs marked until restart (XID errors).
    marked: BTreeMap<String, String>,
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

    /// Withdrawn GPUs: UUID → reason.
    pub fn withdrawn(&self) -> &BTreeMap<String, String> {
        &self.withdrawn
    }

    /// The inventory to publish: the start-up inventory without the withdrawn GPUs (indices
    /// unchanged, so device names stay the same).
    pub fn offered(&self) -> Inventory {
        Inventory {
            driver_version: self.known.driver_version.clone(),
            gpus: self
                .known
                .gpus
                .iter()
                .filter(|g| !self.withdrawn.contains_key(&g.uuid))
                .cloned()
                .collect(),
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

    /// Withdraws `uuid` until restart (an XID error). Unknown UUIDs are ignored.
    pub fn mark(&mut self, uuid: &str, reason: &str) -> Vec<Change> {
        if self.known.gpus.iter().any(|g| g.uuid == uuid) {
            self.marked.insert(uuid.to_string(), reason.to_string());
        }
        self.settle()
    }

    /// Recomputes the withdrawn set from the last look and the marks.
    fn settle(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for gpu in &self.known.gpus {
            let reason = match (self.marked.get(&gpu.uuid), self.last.seen.get(&gpu.uuid)) {
                (Some(marked), _) => Some(marked.clone()),
                (None, None) => Some(GONE.to_string()),
                (None, Some(Health::Unhealthy(reason))) => Some(reason.clone()),
                (None, Some(Health::Healthy)) => None,
            };
            match (reason, self.withdrawn.contains_key(&gpu.uuid)) {
                (Some(reason), false) => {
                    self.withdrawn.insert(gpu.uuid.clone(), reason.clone());
                    changes.push(Change::Withdrawn {
                        uuid: gpu.uuid.clone(),
                        index: gpu.index,
                        reason,
                    });
                }
                // Still withdrawn; keep the newest reason without announcing it again.
                (Some(reason), true) => {
                    self.withdrawn.insert(gpu.uuid.clone(), reason);
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
        assert_eq!(t.withdrawn()["GPU-1"], "lost", "newest reason kept");
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
        assert_eq!(t.mark("GPU-1", "XID 79").len(), 1);
        assert!(t.mark("GPU-9", "XID 79").is_empty(), "unknown UUID ignored");
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
    fn application_xids_are_not_critical() {
        assert!(!xid_is_critical(13) && !xid_is_critical(43));
        assert!(xid_is_critical(48) && xid_is_critical(79) && xid_is_critical(94));
    }
}
