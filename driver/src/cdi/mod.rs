//! The CDI spec of a prepared claim, and the CDI device IDs handed to the kubelet.
//!
//! One spec file per claim, `tessera-<claim-uid>.json`, kind `gpu.tessera.dev/claim`. The
//! spec-level edits (applied once per container whichever devices it asks for) put the shim in
//! every process: `libtessera.so` mounted read-only, an `/etc/ld.so.preload` naming it (so
//! processes that drop `LD_PRELOAD` are covered), the claim's `config.json` mounted read-only
//! (a container must not raise its own limit), the `region` mounted read-write (every process of
//! the claim charges it), every claim's board entries read-only at `/run/tessera/boards` and the
//! claim's own entries read-write at `/run/tessera/board` (claims on one GPU see each other's
//! priority, activity and card memory there; see `tessera_api::board`), the plugin's reservation
//! files read-only
//! at `/run/tessera/reservations`, and `TESSERA_CONFIG`. Each allocated device is a CDI device
//! `<claim-uid>-<device>[-<shareID>]`. See `docs/reference/cdi.md`.

pub mod spec;
pub mod standalone;

use std::path::{Path, PathBuf};

use tessera_api::board::{EntryKind, own_entry_file_name};
use tessera_api::names::{DRIVER_NAME, SHIM_CONFIG_DEFAULT_PATH, SHIM_CONFIG_ENV};

use crate::allocation::AllocatedDevice;
pub use spec::{ContainerEdits, Device, DeviceNode, Hook, Mount, Spec};
pub use standalone::{DriverFiles, StandaloneError};

/// CDI class of Tessera's devices: kind `gpu.tessera.dev/claim`.
pub const CLASS: &str = "claim";
/// Kind of the NVIDIA Container Toolkit's devices, whose names include GPU UUIDs.
pub const NVIDIA_KIND: &str = "nvidia.com/gpu";
/// Where the shim appears inside containers.
pub const CONTAINER_SHIM: &str = "/usr/lib/tessera/libtessera.so";
/// The preload list inside containers.
pub const CONTAINER_PRELOAD: &str = "/etc/ld.so.preload";
/// The claim's config inside containers (also where the shim looks without `TESSERA_CONFIG`).
pub const CONTAINER_CONFIG: &str = SHIM_CONFIG_DEFAULT_PATH;
/// The claim's accounting region inside containers; `config.json`'s `region` field.
pub const CONTAINER_REGION: &str = "/etc/tessera/region";
/// Every claim's board entries inside containers, read-only: where claims sharing a GPU see
/// each other (priorities, the idle-GPU rule of `corePolicy: default`, card memory).
pub const CONTAINER_BOARDS: &str = tessera_api::board::BOARDS_DIR;
/// The claim's own board entries inside its containers, read-write.
pub const CONTAINER_OWN_BOARD: &str = tessera_api::board::OWN_BOARD_DIR;

/// The plugin's reservation files inside containers (read-only: only the plugin writes them).
pub const CONTAINER_RESERVATIONS: &str = tessera_api::memory_board::RESERVATIONS_DIR;

/// The CDI kind of Tessera's specs.
pub fn kind() -> String {
    format!("{DRIVER_NAME}/{CLASS}")
}

/// How GPUs themselves get into containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CdiMode {
    /// The NVIDIA Container Toolkit's CDI spec (`nvidia.com/gpu=<uuid>`) provides device nodes
    /// and driver libraries; Tessera adds only the shim.
    Toolkit,
    /// Tessera's spec also carries the device nodes and driver libraries (nodes without the
    /// toolkit).
    Standalone,
}

/// Host paths a claim's spec mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPaths {
    /// `<state-dir>/lib/libtessera.so`.
    pub shim: PathBuf,
    /// `<state-dir>/lib/ld.so.preload`.
    pub preload: PathBuf,
    /// `<state-dir>/claims/<uid>/config.json`.
    pub config: PathBuf,
    /// `<state-dir>/claims/<uid>/region`.
    pub region: PathBuf,
    /// `<state-dir>/boards`: a directory per GPU, an entry file per claim and kind in it.
    pub boards: PathBuf,
    /// The claim's name on the boards: its UID (a slice's name for the CLI's slices).
    pub owner: String,
    /// The priority the claim is prepared with, in its compute entry's name (see
    /// `tessera_api::board::entry_file_name`).
    pub priority: tessera_api::Priority,
    /// `<state-dir>/reservations`: the plugin's reservation file per overcommitted GPU; no
    /// container can write it.
    pub reservations: PathBuf,
}

impl HostPaths {
    /// The layout under a state directory.
    pub fn new(state_dir: &Path, claim_uid: &str) -> HostPaths {
        let claim = claim_dir(state_dir, claim_uid);
        HostPaths {
            shim: state_dir.join("lib/libtessera.so"),
            preload: state_dir.join("lib/ld.so.preload"),
            config: claim.join("config.json"),
            region: claim.join("region"),
            boards: state_dir.join("boards"),
            owner: claim_uid.to_string(),
            priority: tessera_api::Priority::Normal,
            reservations: state_dir.join("reservations"),
        }
    }

    /// `<boards>/<GPU UUID>/<owner>.<kind>`: the claim's own board entry of `kind` for GPU `uuid`.
    pub fn board_entry(&self, uuid: &str, kind: EntryKind) -> PathBuf {
        self.boards
            .join(uuid)
            .join(tessera_api::board::entry_file_name(
                &self.owner,
                kind,
                self.priority,
            ))
    }
}

/// `<state-dir>/claims/<uid>`.
pub fn claim_dir(state_dir: &Path, claim_uid: &str) -> PathBuf {
    state_dir.join("claims").join(claim_uid)
}

/// `tessera-<uid>.json`.
pub fn spec_file_name(claim_uid: &str) -> String {
    format!("tessera-{claim_uid}.json")
}

/// The CDI device name of one allocated device.
pub fn device_name(claim_uid: &str, device: &AllocatedDevice) -> String {
    match &device.share_id {
        Some(share) => format!("{claim_uid}-{}-{share}", device.device),
        None => format!("{claim_uid}-{}", device.device),
    }
}

/// The CDI device that bind-mounts a request's device metadata file (KEP-5304) read-only into
/// the claim's containers, and its fully qualified ID: one per request of the claim, named
/// `<uid>-metadata-<request>` beside the claim's `<uid>-gpu-…` devices in its spec.
pub fn metadata_device(
    claim_uid: &str,
    request: &str,
    host_file: &Path,
    container_path: &str,
) -> (Device, String) {
    let name = format!("{claim_uid}-metadata-{request}");
    let id = format!("{}={name}", kind());
    let device = Device {
        name,
        container_edits: ContainerEdits {
            mounts: vec![Mount::read_only(
                host_file.display().to_string(),
                container_path,
            )],
            ..ContainerEdits::default()
        },
    };
    (device, id)
}

/// The fully qualified CDI device IDs the kubelet passes to the runtime for `device`.
pub fn device_ids(claim_uid: &str, device: &AllocatedDevice, mode: CdiMode) -> Vec<String> {
    let mut ids = vec![format!("{}={}", kind(), device_name(claim_uid, device))];
    if mode == CdiMode::Toolkit {
        ids.push(format!("{NVIDIA_KIND}={}", device.gpu_uuid));
    }
    ids
}

/// The spec of a claim. `driver` is `Some` in standalone mode.
pub fn claim_spec(
    claim_uid: &str,
    devices: &[AllocatedDevice],
    host: &HostPaths,
    driver: Option<&DriverFiles>,
) -> Spec {
    build_spec(kind(), per_device(claim_uid, devices), Some(host), driver)
}

/// One CDI device per allocated device, named by [`device_name`].
fn per_device<'a>(
    claim_uid: &str,
    devices: &'a [AllocatedDevice],
) -> Vec<(String, &'a [AllocatedDevice])> {
    devices
        .iter()
        .map(|device| (device_name(claim_uid, device), std::slice::from_ref(device)))
        .collect()
}

/// The spec of a claim whose devices are all allocated with admin access (a monitoring
/// exporter, a debugging pod): its GPUs as they are, without the shim, its config, region or
/// board entries, so it has no wall and takes nothing from the claims sharing the GPUs.
/// Containers see `TESSERA_ADMIN_ACCESS=true`.
pub fn admin_claim_spec(
    claim_uid: &str,
    devices: &[AllocatedDevice],
    driver: Option<&DriverFiles>,
) -> Spec {
    build_spec(kind(), per_device(claim_uid, devices), None, driver)
}

/// Where `tessera-cdi-hook` is on the host and how it finds the driver: what a claim's spec
/// needs to have the driver's own memory wall set on each of its containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverWallHook {
    /// The hook program, a host path no container can write (`<state-dir>/bin`).
    pub program: PathBuf,
    /// The host's driver root, searched for `libnvidia-ml.so.1`.
    pub driver_root: PathBuf,
}

/// The OCI hook name: run in the runtime's namespaces once the container's cgroup exists and
/// before its process runs, with the container's state (its PID) on standard input.
pub const DRIVER_WALL_HOOK_NAME: &str = "createRuntime";

impl DriverWallHook {
    /// The hook that sets `limits` (GPU UUID, bytes) on each container's cgroup.
    pub fn hook(&self, limits: &[(&str, u64)]) -> Hook {
        let mut args = vec![
            "tessera-cdi-hook".to_string(),
            "memory-limit".to_string(),
            "--driver-root".to_string(),
            self.driver_root.display().to_string(),
        ];
        for (uuid, bytes) in limits {
            args.push("--limit".to_string());
            args.push(format!("{uuid}={bytes}"));
        }
        Hook {
            hook_name: DRIVER_WALL_HOOK_NAME.to_string(),
            path: self.program.display().to_string(),
            args,
            env: Vec::new(),
            timeout: Some(30),
        }
    }
}

/// The variable an admin-access claim's containers see.
pub const ADMIN_ACCESS_ENV: &str = "TESSERA_ADMIN_ACCESS";

/// CDI class of the standalone CLI's slices: kind `gpu.tessera.dev/slice`.
pub const SLICE_CLASS: &str = "slice";

/// The CDI kind of slices written by the standalone `tessera` CLI.
pub fn slice_kind() -> String {
    format!("{DRIVER_NAME}/{SLICE_CLASS}")
}

/// `tessera-slice-<name>.json`.
pub fn slice_spec_file_name(name: &str) -> String {
    format!("tessera-slice-{name}.json")
}

/// The spec of a slice made without Kubernetes (`tessera cdi generate`): one CDI device,
/// `gpu.tessera.dev/slice=<name>`, with the same claim-wide edits as a claim's spec and the
/// edits of every GPU in `devices`.
pub fn slice_spec(
    name: &str,
    devices: &[AllocatedDevice],
    host: &HostPaths,
    driver: Option<&DriverFiles>,
) -> Spec {
    build_spec(
        slice_kind(),
        vec![(name.to_string(), devices)],
        Some(host),
        driver,
    )
}

/// A spec of `kind` with one CDI device per entry, each carrying the edits of its GPUs; the shim
/// and the claim's files from `host`, or none (admin access).
fn build_spec(
    kind: String,
    named: Vec<(String, &[AllocatedDevice])>,
    host: Option<&HostPaths>,
    driver: Option<&DriverFiles>,
) -> Spec {
    let mut common = match host {
        Some(host) => shim_edits(&named, host),
        None => ContainerEdits {
            env: vec![format!("{ADMIN_ACCESS_ENV}=true")],
            ..ContainerEdits::default()
        },
    };
    if let Some(driver) = driver {
        common
            .device_nodes
            .extend(driver.control_nodes.iter().cloned());
        common.mounts.extend(driver.mounts.iter().cloned());
    }
    let devices = named
        .into_iter()
        .map(|(name, gpus)| {
            // Each CDI device needs an edit of its own (runtimes refuse empty devices): the
            // GPU's node in standalone mode, and in both modes a variable naming the GPU.
            let mut edits = ContainerEdits::default();
            for device in gpus {
                let env = format!("TESSERA_GPU_{}={}", device.gpu_index, device.gpu_uuid);
                if !edits.env.contains(&env) {
                    edits.env.push(env);
                }
                if let Some(driver) = driver {
                    let node = driver.gpu_node(device.gpu_minor);
                    if !edits.device_nodes.contains(&node) {
                        edits.device_nodes.push(node);
                    }
                }
            }
            Device {
                name,
                container_edits: edits,
            }
        })
        .collect();
    let mut spec = Spec {
        cdi_version: String::new(),
        kind,
        devices,
        container_edits: common,
    };
    spec.cdi_version = spec.minimum_version().to_string();
    spec
}

/// The claim-wide edits that put the shim in every process of a claim (module docs).
fn shim_edits(named: &[(String, &[AllocatedDevice])], host: &HostPaths) -> ContainerEdits {
    let path = |p: &Path| p.display().to_string();
    let mut common = ContainerEdits {
        env: vec![format!("{SHIM_CONFIG_ENV}={CONTAINER_CONFIG}")],
        device_nodes: Vec::new(),
        mounts: vec![
            Mount::read_only(path(&host.shim), CONTAINER_SHIM),
            Mount::read_only(path(&host.preload), CONTAINER_PRELOAD),
            Mount::read_only(path(&host.config), CONTAINER_CONFIG),
            Mount::read_write(path(&host.region), CONTAINER_REGION),
            Mount::read_only(path(&host.boards), CONTAINER_BOARDS),
            Mount::read_only(path(&host.reservations), CONTAINER_RESERVATIONS),
        ],
        hooks: Vec::new(),
    };
    // The claim's own entries: the only board files its containers can write.
    let mut uuids: Vec<&str> = named
        .iter()
        .flat_map(|(_, gpus)| gpus.iter().map(|d| d.gpu_uuid.as_str()))
        .collect();
    uuids.sort_unstable();
    uuids.dedup();
    for uuid in uuids {
        for kind in EntryKind::ALL {
            common.mounts.push(Mount::read_write(
                path(&host.board_entry(uuid, kind)),
                format!("{CONTAINER_OWN_BOARD}/{}", own_entry_file_name(uuid, kind)),
            ));
        }
    }
    common
}

/// The contents of `<state-dir>/lib/ld.so.preload`.
pub fn preload_file() -> String {
    format!("{CONTAINER_SHIM}\n")
}

#[cfg(test)]
mod tests;
