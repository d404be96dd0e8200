//! The host files behind a claim's CDI spec, shared by the kubelet plugin (one set per claim)
//! and the standalone `tessera` CLI (one set per named slice): the shim's config, a fresh
//! accounting region, and the shim copy with its `ld.so.preload`. Each write is atomic.

use std::io;
use std::path::Path;

use tessera_api::region::{self, RegionDeviceSpec};
use tessera_api::shim_config::{SHIM_CONFIG_VERSION, ShimConfigError};
use tessera_api::{GpuConfig, ShimConfig, ShimDevice};

use crate::allocation::GpuLimit;
use crate::cdi::{self, HostPaths};
use crate::fsutil;

/// The shim's config for `gpus` (validated). `id` is the claim UID (or the slice's name): the
/// shim's `claimUid`. The region is always at [`cdi::CONTAINER_REGION`] inside the container.
pub fn shim_config(
    id: &str,
    gpus: &[GpuLimit],
    settings: &GpuConfig,
) -> Result<ShimConfig, ShimConfigError> {
    let config = ShimConfig {
        version: SHIM_CONFIG_VERSION,
        claim_uid: id.to_string(),
        region: cdi::CONTAINER_REGION.to_string(),
        devices: gpus
            .iter()
            .map(|g| ShimDevice {
                uuid: g.uuid.clone(),
                memory_limit: g.memory_limit,
                cores: g.cores,
                context_overhead: 0,
                physical_memory: None,
                spill_limit: None,
            })
            .collect(),
        priority: settings.priority,
        oversubscribe: settings.oversubscribe,
        core_policy: settings.core_policy,
    };
    config.validate()?;
    Ok(config)
}

/// A fresh region whose device table matches [`shim_config`]'s devices.
pub fn region_bytes(gpus: &[GpuLimit]) -> io::Result<Vec<u8>> {
    let devices: Vec<RegionDeviceSpec> = gpus
        .iter()
        .map(|g| RegionDeviceSpec {
            uuid: g.uuid.clone(),
            memory_limit: g.memory_limit,
            cores: g.cores,
            context_overhead: 0,
        })
        .collect();
    region::encode_new(&devices).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes the config: readable by containers of any user, changeable only by its writer (root).
pub fn write_config(host: &HostPaths, json: &[u8]) -> io::Result<()> {
    create_parent(&host.config)?;
    fsutil::write_atomic(&host.config, json, 0o644)
}

/// Writes a fresh region: world-writable, since processes of non-root containers charge it.
pub fn write_region(host: &HostPaths, bytes: &[u8]) -> io::Result<()> {
    create_parent(&host.region)?;
    fsutil::write_atomic(&host.region, bytes, 0o666)
}

fn create_parent(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir),
        None => Ok(()),
    }
}

/// Copies the shim to `<state-dir>/lib/libtessera.so` (the host path every spec mounts),
/// writes the `ld.so.preload` naming it inside containers, and creates the board directory
/// `<state-dir>/board` (mode 1777: processes of any user create and stamp their GPU's board). The copy is replaced atomically and
/// only when it changed, so running containers keep the inode they mounted. Returns whether the
/// copy was (re)written. Errors name the path and the flag (`shim_flag`) it came from.
pub fn install_shim(shim: &Path, state_dir: &Path, shim_flag: &str) -> io::Result<bool> {
    let context =
        |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let host = HostPaths::new(state_dir, "_");
    let bytes = std::fs::read(shim).map_err(context(format!(
        "reading the shim {shim_flag} {}",
        shim.display()
    )))?;
    if !bytes.starts_with(b"\x7fELF") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{shim_flag} {} is not a shared library", shim.display()),
        ));
    }
    if let Some(lib) = host.shim.parent() {
        std::fs::create_dir_all(lib).map_err(context(format!("creating {}", lib.display())))?;
    }
    let replaced = std::fs::read(&host.shim).ok().as_deref() != Some(bytes.as_slice());
    if replaced {
        fsutil::write_durable(&host.shim, &bytes, 0o755)
            .map_err(context(format!("installing {}", host.shim.display())))?;
    }
    fsutil::write_atomic(&host.preload, cdi::preload_file().as_bytes(), 0o644)
        .map_err(context(format!("writing {}", host.preload.display())))?;
    create_board_dir(&host.board).map_err(context(format!("creating {}", host.board.display())))?;
    Ok(replaced)
}

/// The board directory, world-writable with the sticky bit (like `/tmp`).
fn create_board_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
}
