//! Test fixtures: a mocked API server serving canned ResourceClaims, plugin instances started
//! in-process on temporary directories, and a kubelet stand-in speaking every DRA version over
//! the plugin's unix socket.
#![allow(dead_code)]

pub mod api;
pub mod kubelet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_driver::Inventory;
use tessera_driver::cdi::CdiMode;
use tessera_kubelet_plugin::metrics::Metrics;
use tessera_kubelet_plugin::node::FaultHook;
use tessera_kubelet_plugin::{Node, NodeConfig, Plugin, Sockets};

#[allow(unused_imports)]
pub use api::{ApiServer, claim, config_entry, result, share};
#[allow(unused_imports)]
pub use kubelet::{Claim, Kubelet, Version};

pub const GIB: u64 = 1 << 30;
pub const NODE: &str = "node-a";
pub const GPU0: &str = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
pub const GPU1: &str = "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d";

/// The fake node: an RTX 4090 (24 GiB) and an L40S (48 GiB), in the fake GPU node's format.
pub fn inventory_json() -> String {
    serde_json::json!({
        "driverVersion": "570.86.15",
        "devices": [
            {"uuid": GPU0, "name": "NVIDIA GeForce RTX 4090", "memory": 24 * GIB, "pciBusId": "0000:01:00.0", "computeCapability": "8.9", "brand": "geforce"},
            {"uuid": GPU1, "name": "NVIDIA L40S", "memory": 48 * GIB, "pciBusId": "0000:41:00.0", "computeCapability": "8.9"},
        ]
    })
    .to_string()
}

/// A node's directories and a mocked API server; plugin instances started from it share both.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub api: ApiServer,
    pub inventory: Inventory,
}

impl Env {
    /// An environment whose API server serves `resource.k8s.io` in `served` versions.
    pub fn new(served: &[&str]) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tkp")
            .tempdir()
            .expect("tempdir");
        let inventory = Inventory::from_json(&inventory_json()).expect("inventory");
        Env {
            dir,
            api: ApiServer::new(served),
            inventory,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            node_name: NODE.into(),
            plugin_dir: self.path("plugins/gpu.tessera.dev"),
            cdi_dir: self.path("cdi"),
            state_dir: self.path("state"),
            cdi_mode: CdiMode::Toolkit,
            driver_files: None,
            inventory: self.inventory.clone(),
            memory_overcommit: Default::default(),
            oversubscribe_by_default: false,
            boot_id: "boot-1".into(),
            booted_at: std::time::UNIX_EPOCH,
            driver_wall: None,
        }
    }

    /// Starts a plugin instance (as a restarted process would: all state from disk).
    pub async fn start(&self, instance: Option<&str>, fault: Option<FaultHook>) -> Instance {
        self.start_with(self.node_config(), instance, fault).await
    }

    pub async fn start_with(
        &self,
        config: NodeConfig,
        instance: Option<&str>,
        fault: Option<FaultHook>,
    ) -> Instance {
        self.start_watching_health(config, instance, fault, None)
            .await
    }

    /// [`Env::start_with`], serving the kubelet's health stream from `health` when given.
    pub async fn start_watching_health(
        &self,
        config: NodeConfig,
        instance: Option<&str>,
        fault: Option<FaultHook>,
        health: Option<tokio::sync::watch::Receiver<tessera_driver::health::NodeGpus>>,
    ) -> Instance {
        std::fs::create_dir_all(&config.plugin_dir).expect("plugin dir");
        let metrics = Arc::new(Metrics::new(config.state_dir.clone()));
        let mut node = Node::new(config, self.api.client(), metrics.clone());
        if let Some(hook) = fault {
            node = node.with_fault_hook(hook);
        }
        let sockets = Sockets::new(
            &self.path("registry"),
            &self.path("plugins/gpu.tessera.dev"),
            instance,
        );
        let plugin = Plugin::start(Arc::new(node), sockets.clone(), None, health)
            .await
            .expect("plugin starts");
        let kubelet = Kubelet::connect(&sockets.dra).await;
        Instance {
            plugin,
            sockets,
            kubelet,
            metrics,
        }
    }

    pub fn claim_dir(&self, uid: &str) -> PathBuf {
        self.path("state/claims").join(uid)
    }

    pub fn spec_path(&self, uid: &str) -> PathBuf {
        self.path("cdi").join(format!("tessera-{uid}.json"))
    }

    pub fn checkpoint(&self) -> tessera_driver::checkpoint::Checkpoint {
        tessera_driver::checkpoint::Checkpoint::load(&self.path("state/checkpoint.json"))
            .expect("checkpoint")
    }

    /// Asserts that nothing of claim `uid` is left on disk.
    pub fn assert_clean(&self, uid: &str) {
        assert!(
            !self.claim_dir(uid).exists(),
            "claim dir of {uid} left behind"
        );
        assert!(
            !self.spec_path(uid).exists(),
            "CDI spec of {uid} left behind"
        );
        assert!(
            !self.checkpoint().claims.contains_key(uid),
            "checkpoint still lists {uid}"
        );
        assert_eq!(
            self.board_entries(uid),
            Vec::<String>::new(),
            "board entries of {uid} left behind"
        );
    }

    /// The claim's entries on the GPUs' boards, as `<GPU UUID>/<file>`, sorted.
    pub fn board_entries(&self, uid: &str) -> Vec<String> {
        let mut found = Vec::new();
        for gpu in std::fs::read_dir(self.path("state/boards"))
            .into_iter()
            .flatten()
        {
            let gpu = gpu.expect("GPU dir");
            for entry in std::fs::read_dir(gpu.path()).expect("GPU dir").flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with(&format!("{uid}.")) {
                    found.push(format!("{}/{name}", gpu.file_name().to_string_lossy()));
                }
            }
        }
        found.sort();
        found
    }

    /// Asserts that claim `uid` is fully prepared on disk and returns its parsed config.
    pub fn assert_prepared(&self, uid: &str) -> tessera_api::ShimConfig {
        let dir = self.claim_dir(uid);
        let config = std::fs::read(dir.join("config.json")).expect("config.json");
        let config = tessera_api::ShimConfig::from_json(&config).expect("a valid shim config");
        let region = std::fs::read(dir.join("region")).expect("region");
        tessera_api::region::RegionSnapshot::parse(&region).expect("a valid region");
        validate_spec(&self.spec_path(uid));
        let record = self
            .checkpoint()
            .claims
            .get(uid)
            .cloned()
            .expect("checkpoint record");
        assert_eq!(
            record.state,
            tessera_driver::checkpoint::ClaimState::PrepareCompleted
        );
        // Its own entries (compute and memory) on each of its GPUs' boards, and only there.
        let mut expected: Vec<String> = config
            .devices
            .iter()
            .flat_map(|d| {
                [
                    format!("{}.compute", priority_name(config.priority)),
                    "memory".to_string(),
                ]
                .map(|kind| format!("{}/{uid}.{kind}", d.uuid))
            })
            .collect();
        expected.sort();
        assert_eq!(self.board_entries(uid), expected);
        config
    }
}

/// Loads a spec file the way the reference CDI implementation does.
pub fn validate_spec(path: &Path) {
    let mut spec = container_device_interface::spec::read_spec(&path.to_path_buf(), 0)
        .unwrap_or_else(|e| panic!("CDI crate refused {}: {e:?}", path.display()));
    spec.validate()
        .unwrap_or_else(|e| panic!("CDI crate validation of {} failed: {e:?}", path.display()));
}

/// A running plugin instance with a connected kubelet stand-in.
pub struct Instance {
    pub plugin: Plugin,
    pub sockets: Sockets,
    pub kubelet: Kubelet,
    pub metrics: Arc<Metrics>,
}

impl Instance {
    pub async fn stop(self) {
        self.plugin.stop().await;
    }
}

/// A fault hook that crashes once at `step` (for any claim).
pub fn crash_at(step: tessera_kubelet_plugin::Step) -> FaultHook {
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    Arc::new(move |at, _uid| at == step && !fired.swap(true, std::sync::atomic::Ordering::SeqCst))
}

/// Opens `path` read-write and takes an open-file-description lock (exclusive or shared) on
/// `len` bytes at `start`, as a live process of a claim holds its region slot or board entry;
/// the lock lasts while the returned file is open (drop it: the process died).
pub fn hold_lock(path: &Path, start: usize, len: usize, exclusive: bool) -> std::fs::File {
    use nix::fcntl::{FcntlArg, fcntl};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let kind = if exclusive {
        nix::libc::F_WRLCK
    } else {
        nix::libc::F_RDLCK
    };
    let lock = nix::libc::flock {
        l_type: kind as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: start as nix::libc::off_t,
        l_len: len as nix::libc::off_t,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_OFD_SETLK(&lock)).expect("lock");
    file
}

/// Charges a prepared claim's region as processes of the claim do: each `(slot, used, spilled)`
/// is an active slot with those bytes on its first device. Slot 0's process stays alive (holds
/// its slot's lock) while the returned file is open; the others read as dead.
pub fn charge_region(path: &Path, slots: &[(usize, u64, u64)]) -> std::fs::File {
    use tessera_api::region::{SLOT_ACTIVE, SLOT_SIZE, slot_offset};
    let mut bytes = std::fs::read(path).expect("region");
    let mut put = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
    put(32, &(slots.len() as u32).to_le_bytes());
    for &(slot, used, spilled) in slots {
        put(slot_offset(slot), &SLOT_ACTIVE.to_le_bytes());
        put(slot_offset(slot) + 64, &used.to_le_bytes());
        put(slot_offset(slot) + 192, &spilled.to_le_bytes());
    }
    std::fs::write(path, &bytes).expect("charge");
    hold_lock(path, slot_offset(0), SLOT_SIZE, true)
}

/// A priority as it appears in a compute entry's file name.
fn priority_name(priority: tessera_api::Priority) -> &'static str {
    match priority {
        tessera_api::Priority::High => "high",
        tessera_api::Priority::Normal => "normal",
        tessera_api::Priority::Low => "low",
    }
}
