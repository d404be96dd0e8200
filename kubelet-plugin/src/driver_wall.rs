//! The driver's own memory wall (`--driver-memory-wall`): where the NVIDIA driver keeps device
//! memory limits per cgroup (NVML 13.4, `nvmlDeviceSetMemoryLimits_v1`), each container of a
//! claim also gets the claim's memory as the driver's hard limit on its cgroup, set by
//! `tessera-cdi-hook` from the claim's CDI spec. The driver then counts what no preload sees
//! (contexts, module images, pools) and stops programs that bypass the shim. The shim stays for
//! what the driver does not do: the slice in `cuMemGetInfo` and NVML, one wall shared by all of a
//! claim's containers, compute shares, spill (docs/limits.md, "Two walls").

use std::collections::BTreeSet;

use tessera_driver::Inventory;
use tessera_driver::allocation::GpuLimit;
use tessera_driver::cdi::{DriverWallHook, Hook};

use crate::gpu_probe::Report;

/// `--driver-memory-wall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setting {
    /// On every GPU whose driver keeps per-cgroup limits.
    Auto,
    /// Never: the shim's wall only.
    Off,
}

impl std::str::FromStr for Setting {
    type Err = String;

    fn from_str(text: &str) -> Result<Setting, String> {
        match text {
            "auto" => Ok(Setting::Auto),
            "off" => Ok(Setting::Off),
            other => Err(format!("{other:?}: expected auto or off")),
        }
    }
}

/// The node's driver wall: the hook and the GPUs it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDriverWall {
    pub hook: DriverWallHook,
    pub gpus: BTreeSet<String>,
}

impl NodeDriverWall {
    /// The hook for a claim's GPUs that have the wall, each at the claim's memory there (at most
    /// the card: what a claim spills to the host is not on the card); `None` where none has it.
    pub fn hook_for(&self, gpus: &[GpuLimit], inventory: &Inventory) -> Option<Hook> {
        let limits: Vec<(&str, u64)> = gpus
            .iter()
            .filter(|g| self.gpus.contains(&g.uuid))
            .map(|g| {
                let card = inventory
                    .gpus
                    .iter()
                    .find(|c| c.uuid == g.uuid)
                    .map_or(u64::MAX, |c| c.memory);
                (g.uuid.as_str(), g.memory_limit.min(card))
            })
            .collect();
        (!limits.is_empty()).then(|| self.hook.hook(&limits))
    }
}

/// Marks the GPUs of `inventory` whose driver keeps per-cgroup limits (the probe's report) and
/// returns them; logs, per GPU, which walls hold.
pub fn resolve(
    setting: Setting,
    inventory: &mut Inventory,
    probe: Option<&Result<Report, String>>,
) -> BTreeSet<String> {
    let mut walled = BTreeSet::new();
    for gpu in &mut inventory.gpus {
        let found = match probe {
            Some(Ok(report)) => report.driver_walls.iter().find(|w| w.uuid == gpu.uuid),
            _ => None,
        };
        let reason = match (setting, probe, found) {
            (Setting::Off, _, _) => Some("--driver-memory-wall=off".to_string()),
            (_, None, _) => Some("no driver to ask (a fake inventory)".to_string()),
            (_, Some(Err(error)), _) => Some(format!("the GPU probe failed: {error}")),
            (_, _, None) => Some("the GPU probe did not report it".to_string()),
            (_, _, Some(wall)) if !wall.supported => Some(
                wall.reason
                    .clone()
                    .unwrap_or_else(|| "not supported".to_string()),
            ),
            _ => None,
        };
        gpu.driver_memory_wall = reason.is_none();
        match reason {
            None => {
                walled.insert(gpu.uuid.clone());
                tracing::info!(index = gpu.index, uuid = %gpu.uuid, walls = "shim and driver", "GPU memory walls");
            }
            Some(why) => {
                tracing::info!(index = gpu.index, uuid = %gpu.uuid, walls = "shim", driver_wall = %why, "GPU memory walls");
            }
        }
    }
    walled
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tessera_node_tools::context_probe::DriverWall;

    use super::*;

    fn node() -> Inventory {
        crate::test_inventory(&[24 << 30, 24 << 30])
    }

    fn report() -> Result<Report, String> {
        Ok(Report {
            driver_walls: vec![
                DriverWall {
                    uuid: "GPU-0".into(),
                    supported: true,
                    reason: None,
                },
                DriverWall {
                    uuid: "GPU-1".into(),
                    supported: false,
                    reason: Some("MIG".into()),
                },
            ],
            ..Report::default()
        })
    }

    #[test]
    fn only_gpus_whose_driver_walls_cgroups_get_the_hook() {
        let mut inventory = node();
        let gpus = resolve(Setting::Auto, &mut inventory, Some(&report()));
        assert_eq!(gpus, BTreeSet::from(["GPU-0".to_string()]));
        assert!(inventory.gpus[0].driver_memory_wall && !inventory.gpus[1].driver_memory_wall);
        let wall = NodeDriverWall {
            hook: DriverWallHook {
                program: PathBuf::from("/var/lib/tessera/bin/tessera-cdi-hook"),
                driver_root: PathBuf::from("/run/nvidia/driver"),
            },
            gpus,
        };
        let limit = |uuid: &str, memory_limit: u64| GpuLimit {
            uuid: uuid.into(),
            index: 0,
            minor: 0,
            memory_limit,
            cores: 50,
            context_overhead: 0,
        };
        let hook = wall
            .hook_for(
                &[limit("GPU-0", 48 << 30), limit("GPU-1", 1 << 30)],
                &inventory,
            )
            .expect("GPU-0 is walled");
        assert_eq!(hook.hook_name, "createRuntime");
        assert_eq!(hook.path, "/var/lib/tessera/bin/tessera-cdi-hook");
        // An overcommitted claim's limit is cut to the card; GPU-1 has no driver wall.
        assert_eq!(
            hook.args,
            [
                "tessera-cdi-hook",
                "memory-limit",
                "--driver-root",
                "/run/nvidia/driver",
                "--limit",
                &format!("GPU-0={}", 24u64 << 30),
            ]
        );
        assert_eq!(wall.hook_for(&[limit("GPU-1", 1 << 30)], &inventory), None);
    }

    #[test]
    fn off_or_no_answer_means_the_shim_alone() {
        for (setting, probe) in [
            (Setting::Off, Some(report())),
            (Setting::Auto, Some(Err("probe failed".to_string()))),
        ] {
            let mut inventory = node();
            assert!(resolve(setting, &mut inventory, probe.as_ref()).is_empty());
            assert!(inventory.gpus.iter().all(|g| !g.driver_memory_wall));
        }
        let mut inventory = node();
        assert!(resolve(Setting::Auto, &mut inventory, None).is_empty());
        assert_eq!("off".parse::<Setting>(), Ok(Setting::Off));
        assert!("on".parse::<Setting>().is_err());
    }
}
