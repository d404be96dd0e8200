//! The record of prepared claims, `<state-dir>/checkpoint.json`: what makes prepare and
//! unprepare idempotent across plugin restarts, and what unprepare works from once the claim is
//! gone from the API server.
//!
//! A claim is recorded `PrepareStarted` (with the devices it will get) before any of its files
//! is written, and `PrepareCompleted` after the last one. A restart between any two steps leaves
//! either no record (nothing written yet) or a `PrepareStarted` record naming everything that may
//! exist, so the next prepare finishes the job and the next unprepare removes it all. Each
//! record keeps the boot it was prepared in: after a reboot the CDI spec in `/var/run/cdi` is
//! gone and no process holds the region, so such a claim is prepared afresh.
//!
//! ```json
//! {"version": 1, "claims": {"<uid>": {"namespace": "…", "name": "…", "state": "PrepareCompleted",
//!   "bootId": "…", "devices": [{"request": "gpu", "pool": "node-a", "device": "gpu-0", …,
//!   "cdiDeviceIds": ["gpu.tessera.dev/claim=<uid>-gpu-0", "nvidia.com/gpu=GPU-…"]}],
//!   "gpus": [{"uuid": "GPU-…", "index": 0, "minor": 0, "memoryLimit": 2147483648, "cores": 25}]}}}
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::allocation::{AllocatedDevice, GpuLimit};
use crate::fsutil;

/// The checkpoint format this build reads and writes.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    /// Prepared (or being prepared) claims by UID.
    pub claims: BTreeMap<String, PreparedClaim>,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            claims: BTreeMap::new(),
        }
    }
}

/// Where a claim's preparation got to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    /// Files may be partly written; the devices listed are the ones being prepared.
    PrepareStarted,
    /// Config, region and CDI spec are written; the CDI IDs were (or can be) returned.
    PrepareCompleted,
}

/// One claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreparedClaim {
    pub namespace: String,
    pub name: String,
    pub state: ClaimState,
    /// `/proc/sys/kernel/random/boot_id` when it was prepared.
    pub boot_id: String,
    pub devices: Vec<PreparedDevice>,
    pub gpus: Vec<GpuLimit>,
}

/// A device of a claim and the CDI IDs returned for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PreparedDevice {
    #[serde(flatten)]
    pub device: AllocatedDevice,
    pub cdi_device_ids: Vec<String>,
}

/// A checkpoint that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("checkpoint {path} is corrupt: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "checkpoint {path} has version {found}; this plugin reads version {CHECKPOINT_VERSION} (downgrade across a format change?)"
    )]
    Version { path: String, found: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Checkpoint {
    /// Reads the checkpoint; a missing file is an empty checkpoint (first start).
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let display = || path.display().to_string();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
            Err(source) => {
                return Err(Error::Io {
                    path: display(),
                    source,
                });
            }
        };
        // Check the version before the shape, so a newer format is reported as such.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned =
            serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
                path: display(),
                source,
            })?;
        if versioned.version != CHECKPOINT_VERSION {
            return Err(Error::Version {
                path: display(),
                found: versioned.version,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
            path: display(),
            source,
        })
    }

    /// Like [`Checkpoint::load`], but an unreadable checkpoint last written before `booted_at`
    /// counts as empty (the `bool` says so): the checkpoint is written without fsync (see
    /// `fsutil`), so a power cut may leave it empty or torn, and after a reboot nothing in it
    /// matters any more (every claim is prepared afresh, and unprepare works from the claim
    /// UID). One written in this boot cannot be torn by a crash of the plugin, so it stays an
    /// error there.
    pub fn load_since_boot(
        path: &Path,
        booted_at: std::time::SystemTime,
    ) -> Result<(Checkpoint, bool)> {
        match Checkpoint::load(path) {
            Err(Error::Parse { .. })
                if std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < booted_at) =>
            {
                Ok((Checkpoint::default(), true))
            }
            other => other.map(|c| (c, false)),
        }
    }

    /// Writes the checkpoint atomically (mode 0600: it lists every claim on the node); with
    /// `durable`, its data is also fsynced before the rename. The plugin writes without: a crash
    /// of the plugin cannot tear an atomic rename, and a power cut is handled by
    /// [`Checkpoint::load_since_boot`].
    pub fn save(&self, path: &Path, durable: bool) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        let io_error = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        let write = if durable {
            fsutil::write_durable
        } else {
            fsutil::write_atomic
        };
        write(path, &bytes, 0o600).map_err(io_error)
    }

    /// The completed record of `uid` if it was prepared in boot `boot_id`.
    pub fn completed(&self, uid: &str, boot_id: &str) -> Option<&PreparedClaim> {
        self.claims
            .get(uid)
            .filter(|c| c.state == ClaimState::PrepareCompleted && c.boot_id == boot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let device = AllocatedDevice {
            request: "gpu".into(),
            pool: "node-a".into(),
            device: "gpu-0".into(),
            share_id: Some("9f0c4c4e-0000-4000-8000-000000000001".into()),
            gpu_uuid: "GPU-1".into(),
            gpu_index: 0,
            gpu_minor: 0,
            memory: 2 << 30,
            cores: 25,
            admin_access: false,
        };
        let claim = PreparedClaim {
            namespace: "default".into(),
            name: "inference".into(),
            state: ClaimState::PrepareCompleted,
            boot_id: "boot-1".into(),
            devices: vec![PreparedDevice {
                device,
                cdi_device_ids: vec!["gpu.tessera.dev/claim=u-gpu-0".into()],
            }],
            gpus: vec![GpuLimit {
                uuid: "GPU-1".into(),
                index: 0,
                minor: 0,
                memory_limit: 2 << 30,
                cores: 25,
                context_overhead: 0,
            }],
        };
        Checkpoint {
            version: CHECKPOINT_VERSION,
            claims: [("u".to_string(), claim)].into_iter().collect(),
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        assert_eq!(
            Checkpoint::load(&path).expect("missing is empty"),
            Checkpoint::default()
        );
        let checkpoint = sample();
        checkpoint.save(&path, true).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), checkpoint);
        assert!(checkpoint.completed("u", "boot-1").is_some());
        assert!(
            checkpoint.completed("u", "boot-2").is_none(),
            "a reboot invalidates the record"
        );
    }

    #[test]
    fn the_documented_format_is_stable() {
        // Field names are a contract with the plugin version that comes after this one.
        let json = serde_json::to_value(sample()).expect("serialise");
        let claim = &json["claims"]["u"];
        assert_eq!(json["version"], 1);
        assert_eq!(claim["state"], "PrepareCompleted");
        assert_eq!(claim["bootId"], "boot-1");
        assert_eq!(
            claim["devices"][0]["shareId"],
            "9f0c4c4e-0000-4000-8000-000000000001"
        );
        assert_eq!(
            claim["devices"][0]["cdiDeviceIds"][0],
            "gpu.tessera.dev/claim=u-gpu-0"
        );
        assert_eq!(claim["gpus"][0]["memoryLimit"], 2u64 << 30);
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, br#"{"version": 2, "claims": {}, "new": true}"#).expect("write");
        assert!(matches!(
            Checkpoint::load(&path),
            Err(Error::Version { found: 2, .. })
        ));
        std::fs::write(&path, b"{\"vers").expect("write");
        assert!(matches!(Checkpoint::load(&path), Err(Error::Parse { .. })));
        // Torn in an earlier boot: discarded; torn in this one: still an error.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        assert!(
            matches!(Checkpoint::load_since_boot(&path, later), Ok((c, true)) if c.claims.is_empty())
        );
        assert!(Checkpoint::load_since_boot(&path, std::time::UNIX_EPOCH).is_err());
    }
}
