//! The shim's configuration file, written by the kubelet plugin per claim and read by
//! `libtessera.so` in every process of the containers that use the claim.
//!
//! ```json
//! {"version":1,"claimUid":"…","region":"/var/lib/tessera/claims/<uid>/region",
//!  "devices":[{"uuid":"GPU-…","memoryLimit":2147483648,"cores":25}],
//!  "priority":"normal","oversubscribe":false}
//! ```

use serde::{Deserialize, Serialize};

use crate::claim_config::{CorePolicy, Priority};
use crate::region::{MAX_DEVICES, UUID_BYTES};

/// The only config version this build writes and reads.
pub const SHIM_CONFIG_VERSION: u32 = 1;

/// One GPU of the claim and its share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShimDevice {
    /// The GPU's UUID (`GPU-…`); devices are matched by UUID, never by ordinal, so
    /// `CUDA_VISIBLE_DEVICES` reordering cannot misattribute usage.
    pub uuid: String,
    /// Bytes of device memory the claim may hold on this GPU.
    pub memory_limit: u64,
    /// Compute share, 1..=100 (100 = the whole GPU).
    pub cores: u32,
    /// Bytes charged for each CUDA context a process creates on this GPU (the driver's own
    /// per-context memory, which no allocation call reports). 0 charges nothing.
    #[serde(default)]
    pub context_overhead: u64,
    /// The GPU's physical memory in bytes, written only when the node overcommits this GPU's
    /// memory (`--memory-overcommit`, `docs/oversubscription.md`): the claims' limits on it may
    /// then add up to more than the card, and the spill path needs to know where the card ends.
    /// Absent otherwise, so a config without overcommit is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_memory: Option<u64>,
    /// Bytes of host memory the claim may spill to on this GPU (memory oversubscription,
    /// `docs/oversubscription.md`), across all its processes. Absent: the claim's memory limit
    /// (the wall bounds device + spilled bytes anyway). Only used when `oversubscribe` is set and
    /// `physicalMemory` is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spill_limit: Option<u64>,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShimConfig {
    pub version: u32,
    pub claim_uid: String,
    /// Path of the claim's accounting region file as seen inside the container.
    pub region: String,
    pub devices: Vec<ShimDevice>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub oversubscribe: bool,
    #[serde(default)]
    pub core_policy: CorePolicy,
}

/// Why a config file was refused. Messages name the field so the stderr line the shim prints is
/// enough to fix the file.
#[derive(Debug, thiserror::Error)]
pub enum ShimConfigError {
    #[error("not valid JSON: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("version {0} is not supported (this shim reads version {SHIM_CONFIG_VERSION})")]
    Version(u32),
    #[error("claimUid is empty")]
    ClaimUid,
    #[error("region must be an absolute path, got {0:?}")]
    Region(String),
    #[error("devices is empty")]
    NoDevices,
    #[error("devices has {0} entries, at most {MAX_DEVICES} are supported")]
    TooManyDevices(usize),
    #[error("devices[{index}].uuid {uuid:?} must start with \"GPU-\" and be at most {max} bytes", max = UUID_BYTES - 1)]
    Uuid { index: usize, uuid: String },
    #[error("devices[{index}].uuid {uuid:?} appears twice")]
    DuplicateUuid { index: usize, uuid: String },
    #[error("devices[{index}].memoryLimit must be greater than 0")]
    MemoryLimit { index: usize },
    #[error("devices[{index}].cores is {cores}, must be 1..=100")]
    Cores { index: usize, cores: u32 },
    #[error("devices[{index}].spillLimit must be greater than 0 when present")]
    SpillLimit { index: usize },
}

impl ShimConfig {
    /// Parses and validates a config file's contents.
    pub fn from_json(raw: &[u8]) -> Result<Self, ShimConfigError> {
        let config: ShimConfig = serde_json::from_slice(raw)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the writer calls this too, so a bad config never reaches a container.
    pub fn validate(&self) -> Result<(), ShimConfigError> {
        if self.version != SHIM_CONFIG_VERSION {
            return Err(ShimConfigError::Version(self.version));
        }
        if self.claim_uid.is_empty() {
            return Err(ShimConfigError::ClaimUid);
        }
        if !self.region.starts_with('/') {
            return Err(ShimConfigError::Region(self.region.clone()));
        }
        if self.devices.is_empty() {
            return Err(ShimConfigError::NoDevices);
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(ShimConfigError::TooManyDevices(self.devices.len()));
        }
        for (index, device) in self.devices.iter().enumerate() {
            if !device.uuid.starts_with("GPU-") || device.uuid.len() >= UUID_BYTES {
                return Err(ShimConfigError::Uuid {
                    index,
                    uuid: device.uuid.clone(),
                });
            }
            if self.devices[..index].iter().any(|d| d.uuid == device.uuid) {
                return Err(ShimConfigError::DuplicateUuid {
                    index,
                    uuid: device.uuid.clone(),
                });
            }
            if device.memory_limit == 0 {
                return Err(ShimConfigError::MemoryLimit { index });
            }
            if !(1..=100).contains(&device.cores) {
                return Err(ShimConfigError::Cores {
                    index,
                    cores: device.cores,
                });
            }
            if device.spill_limit == Some(0) {
                return Err(ShimConfigError::SpillLimit { index });
            }
        }
        Ok(())
    }

    /// The config as the plugin writes it.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> ShimConfig {
        ShimConfig {
            version: 1,
            claim_uid: "0b7c4a2e-1111-2222-3333-444455556666".into(),
            region: "/var/lib/tessera/claims/x/region".into(),
            devices: vec![ShimDevice {
                uuid: "GPU-8e1b1c4f-0000-0000-0000-000000000001".into(),
                memory_limit: 2 << 30,
                cores: 25,
                context_overhead: 0,
                physical_memory: None,
                spill_limit: None,
            }],
            priority: Priority::Normal,
            oversubscribe: false,
            core_policy: CorePolicy::Default,
        }
    }

    #[test]
    fn round_trips() {
        let config = valid();
        assert_eq!(
            ShimConfig::from_json(&config.to_json()).expect("valid"),
            config
        );
    }

    #[test]
    fn documented_example_parses() {
        let raw = br#"{"version":1,"claimUid":"abc","region":"/r","devices":[{"uuid":"GPU-1","memoryLimit":2147483648,"cores":25}],"priority":"normal","oversubscribe":false}"#;
        let config = ShimConfig::from_json(raw).expect("valid");
        assert_eq!(config.devices[0].memory_limit, 2147483648);
    }

    #[test]
    fn errors_name_the_field() {
        type Breaks = Box<dyn Fn(&mut ShimConfig)>;
        let cases: Vec<(Breaks, &str)> = vec![
            (Box::new(|c| c.version = 2), "version 2"),
            (Box::new(|c| c.claim_uid.clear()), "claimUid"),
            (Box::new(|c| c.region = "relative".into()), "region"),
            (Box::new(|c| c.devices.clear()), "devices is empty"),
            (
                Box::new(|c| c.devices[0].uuid = "0".into()),
                "devices[0].uuid",
            ),
            (
                Box::new(|c| c.devices[0].memory_limit = 0),
                "devices[0].memoryLimit",
            ),
            (Box::new(|c| c.devices[0].cores = 101), "devices[0].cores"),
            (
                Box::new(|c| c.devices.push(c.devices[0].clone())),
                "appears twice",
            ),
        ];
        for (mutate, expected) in cases {
            let mut config = valid();
            mutate(&mut config);
            let err = config.validate().expect_err(expected).to_string();
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
        let err = ShimConfig::from_json(
            br#"{"version":1,"claimUid":"a","region":"/r","devices":[],"memoryLimit":1}"#,
        )
        .expect_err("unknown field")
        .to_string();
        assert!(err.contains("memoryLimit"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ShimConfig::from_json(&raw);
        }

        #[test]
        fn valid_limits_round_trip(limit in 1u64.., cores in 1u32..=100) {
            let mut config = valid();
            config.devices[0].memory_limit = limit;
            config.devices[0].cores = cores;
            prop_assert_eq!(ShimConfig::from_json(&config.to_json()).expect("valid"), config);
        }
    }

    #[test]
    fn physical_memory_is_optional_and_written_only_when_set() {
        let plain = serde_json::to_string(&valid()).expect("json");
        assert!(!plain.contains("physicalMemory"), "{plain}");
        let mut over = valid();
        over.devices[0].physical_memory = Some(8 << 30);
        let text = serde_json::to_string(&over).expect("json");
        assert!(text.contains("\"physicalMemory\":8589934592"), "{text}");
        assert_eq!(ShimConfig::from_json(text.as_bytes()).expect("valid"), over);
        assert_eq!(
            ShimConfig::from_json(plain.as_bytes())
                .expect("valid")
                .devices[0]
                .physical_memory,
            None
        );
    }
}
