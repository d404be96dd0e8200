//! What preparing one claim writes, computed before anything is written: the shim config, a
//! fresh region, the CDI spec and the CDI IDs. Then the writes themselves, each atomic.

use std::path::{Path, PathBuf};

use tessera_driver::allocation::{self, ClaimLimits};
use tessera_driver::cdi::{self, HostPaths, Spec};
use tessera_driver::checkpoint::PreparedDevice;
use tessera_driver::{claim_config, claim_files, fsutil};

use super::NodeConfig;
use super::metadata::{self, ClaimNames, RequestMetadata};
use crate::claims::Claim;

/// Everything one claim's preparation writes.
pub struct Plan {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub limits: ClaimLimits,
    pub devices: Vec<PreparedDevice>,
    pub host: HostPaths,
    pub claim_dir: PathBuf,
    pub spec_path: PathBuf,
    pub config_json: Vec<u8>,
    pub spec: Spec,
    /// What the claim needs on the card of each overcommitted GPU where it may not spill.
    pub card_shares: Vec<CardShare>,
    /// Every device is allocated with admin access: no shim, config, region or board entries
    /// (`cdi::admin_claim_spec`); nothing is charged or reserved for it.
    pub admin: bool,
    /// Each request's device metadata file (KEP-5304), mounted by the spec.
    pub metadata: Vec<RequestMetadata>,
}

/// A claim that may not spill, on an overcommitted GPU: its whole share (at most the card)
/// must be on the card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardShare {
    pub uuid: String,
    pub physical: u64,
    pub bytes: u64,
}

/// Why a claim cannot be prepared; the message goes back to the kubelet and names the cause.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Allocation(#[from] allocation::Error),
    #[error("opaque config: {0}")]
    Config(#[from] claim_config::Error),
    #[error("shim config: {0}")]
    ShimConfig(#[from] tessera_api::shim_config::ShimConfigError),
    #[error(transparent)]
    Standalone(#[from] cdi::StandaloneError),
}

impl Plan {
    /// Computes the plan of an allocated claim.
    pub fn new(config: &NodeConfig, claim: &Claim) -> Result<Plan, PlanError> {
        let allocation = claim.allocation.clone().unwrap_or_default();
        let limits = allocation::claim_limits_with(
            &allocation.results,
            &config.inventory,
            &config.memory_overcommit,
        )?;
        let settings = claim_config::merge(&allocation.config, &allocation.requests_of_ours())?;
        if let Some(files) = &config.driver_files {
            for gpu in &limits.gpus {
                files.check_gpu_node(gpu.minor)?;
            }
        }
        let mut devices: Vec<PreparedDevice> = limits
            .devices
            .iter()
            .map(|d| PreparedDevice {
                device: d.clone(),
                cdi_device_ids: cdi::device_ids(&claim.uid, d, config.cdi_mode),
            })
            .collect();
        // One per result of ours, in result order: each device with its request as allocated.
        let references: Vec<(&str, &allocation::AllocatedDevice)> = allocation
            .results
            .iter()
            .filter(|r| r.driver == tessera_api::names::DRIVER_NAME)
            .map(|r| r.request.as_str())
            .zip(&limits.devices)
            .collect();
        let claim_dir = cdi::claim_dir(&config.state_dir, &claim.uid);
        let metadata = metadata::for_claim(
            &ClaimNames {
                namespace: &claim.namespace,
                name: &claim.name,
                uid: &claim.uid,
                pod_claim_name: claim.pod_claim_name.as_deref(),
            },
            &references,
            &config.inventory,
            &claim_dir,
        );
        // `allocation::claim_limits_with` refuses a claim that mixes the two.
        let admin = limits.devices.iter().all(|d| d.admin_access);
        let shim = if admin {
            ShimFiles {
                config_json: Vec::new(),
                host: HostPaths::new(&config.state_dir, &claim.uid),
                spec: cdi::admin_claim_spec(
                    &claim.uid,
                    &limits.devices,
                    config.driver_files.as_ref(),
                ),
                card_shares: Vec::new(),
            }
        } else {
            ShimFiles::new(config, &claim.uid, &limits, &settings)?
        };
        let mut spec = shim.spec;
        for request in &metadata {
            let (device, id) = cdi::metadata_device(
                &claim.uid,
                &request.request,
                &request.host_file,
                &request.container_path,
            );
            spec.devices.push(device);
            // With the first device of its request, so every container of the request has it.
            if let Some(first) = devices
                .iter_mut()
                .find(|d| d.device.request == request.request)
            {
                first.cdi_device_ids.push(id);
            }
        }
        Ok(Plan {
            uid: claim.uid.clone(),
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices,
            claim_dir,
            spec_path: config.cdi_dir.join(cdi::spec_file_name(&claim.uid)),
            config_json: shim.config_json,
            host: shim.host,
            spec,
            limits,
            card_shares: shim.card_shares,
            admin,
            metadata,
        })
    }

    /// The region's device table, written fresh.
    pub fn region_bytes(&self) -> std::io::Result<Vec<u8>> {
        claim_files::region_bytes(&self.limits.gpus)
    }

    /// The shim's config (none for an admin claim, which has no shim).
    pub fn write_config(&self) -> std::io::Result<()> {
        if self.admin {
            return Ok(());
        }
        claim_files::write_config(&self.host, &self.config_json)
    }

    pub fn write_region(&self) -> std::io::Result<()> {
        if self.admin {
            return Ok(());
        }
        claim_files::write_region(&self.host, &self.region_bytes()?)
    }

    /// The claim's own entries on its GPUs' boards (see `tessera_api::board`); an admin claim
    /// has none, so no neighbour yields to it or counts its memory.
    pub fn write_board_entries(&self) -> std::io::Result<()> {
        if self.admin {
            return Ok(());
        }
        claim_files::create_board_entries(
            &self.host,
            self.limits.gpus.iter().map(|g| g.uuid.as_str()),
        )
    }

    /// Each request's device metadata file; before the spec, which mounts them.
    pub fn write_metadata(&self) -> std::io::Result<()> {
        for request in &self.metadata {
            if let Some(dir) = request.host_file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            fsutil::write_atomic(&request.host_file, &request.stream, 0o644)?;
        }
        Ok(())
    }

    pub fn write_spec(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.spec_path.parent().unwrap_or(Path::new("/")))?;
        fsutil::write_atomic(&self.spec_path, &self.spec.to_json(), 0o644)
    }
}

/// What puts the shim in a claim's containers: its config, its host paths, the CDI spec that
/// mounts them, and what it needs on overcommitted cards.
struct ShimFiles {
    config_json: Vec<u8>,
    host: HostPaths,
    spec: Spec,
    card_shares: Vec<CardShare>,
}

impl ShimFiles {
    fn new(
        config: &NodeConfig,
        uid: &str,
        limits: &ClaimLimits,
        settings: &tessera_api::GpuConfig,
    ) -> Result<ShimFiles, PlanError> {
        // A claim that does not say whether it may spill gets the node's policy.
        let oversubscribe = settings
            .oversubscribe
            .unwrap_or(config.oversubscribe_by_default);
        let spill_limit = claim_config::spill_limit_bytes(settings);
        let mut shim_config = claim_files::shim_config(uid, &limits.gpus, settings, oversubscribe)?;
        // On an overcommitted GPU the shim learns the card's physical memory (for the spill
        // path) and the claim's spill limit, at most its memory limit there (which bounds the
        // spill anyway); elsewhere the file stays as it always was.
        for device in &mut shim_config.devices {
            if let Some(gpu) = config.inventory.gpus.iter().find(|g| g.uuid == device.uuid)
                && config.memory_overcommit.factor(gpu).overcommits()
            {
                device.physical_memory = Some(gpu.memory);
                device.spill_limit = spill_limit.map(|bytes| bytes.min(device.memory_limit));
            }
        }
        let card_shares = shim_config
            .devices
            .iter()
            .filter(|_| !shim_config.oversubscribe)
            .filter_map(|d| {
                d.physical_memory.map(|physical| CardShare {
                    uuid: d.uuid.clone(),
                    physical,
                    bytes: d.memory_limit.min(physical),
                })
            })
            .collect();
        let mut host = HostPaths::new(&config.state_dir, uid);
        host.priority = settings.priority;
        let mut spec = cdi::claim_spec(uid, &limits.devices, &host, config.driver_files.as_ref());
        if let Some(hook) = config
            .driver_wall
            .as_ref()
            .and_then(|wall| wall.hook_for(&limits.gpus, &config.inventory))
        {
            spec.container_edits.hooks.push(hook);
        }
        Ok(ShimFiles {
            config_json: shim_config.to_json(),
            host,
            spec,
            card_shares,
        })
    }
}

/// Claim UIDs become path components: refuse anything that could leave the state directory.
pub fn check_uid(uid: &str) -> Result<(), String> {
    let ok = !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("claim UID {uid:?} is not a Kubernetes UID"))
    }
}
