//! The host files behind a claim's CDI spec, shared by the kubelet plugin (one set per claim)
//! and the standalone `tessera` CLI (one set per named slice): the shim's config, a fresh
//! accounting region, and the shim copy with its `ld.so.preload`. Each write is atomic.

use std::io;
use std::path::Path;

use tessera_api::board::EntryKind;
use tessera_api::region::{self, RegionDeviceSpec};
use tessera_api::shim_config::{SHIM_CONFIG_VERSION, ShimConfigError};
use tessera_api::{GpuConfig, ShimConfig, ShimDevice};

use crate::allocation::GpuLimit;
use crate::cdi::{self, HostPaths};
use crate::fsutil;

/// The shim's config for `gpus` (validated). `id` is the claim UID (or the slice's name): the
/// shim's `claimUid`. The region is always at [`cdi::CONTAINER_REGION`] inside the container.
/// `oversubscribe` is the resolved setting the shim gets: the claim's `settings.oversubscribe`,
/// or the node's policy where the claim set none. No device gets `physicalMemory` or
/// `spillLimit` here; the kubelet plugin adds them on the GPUs its node overcommits.
pub fn shim_config(
    id: &str,
    gpus: &[GpuLimit],
    settings: &GpuConfig,
    oversubscribe: bool,
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
                context_overhead: g.context_overhead,
                physical_memory: None,
                spill_limit: None,
            })
            .collect(),
        priority: settings.priority,
        oversubscribe,
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
            context_overhead: g.context_overhead,
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
/// writes the `ld.so.preload` naming it inside containers, and creates the boards directory
/// `<state-dir>/boards` (the plugin's own: claims get their entries from
/// [`create_board_entries`]). The copy is replaced atomically and only when it changed, so
/// running containers keep the inode they mounted. Returns whether the
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
    create_plugin_dir(&host.boards)
        .map_err(context(format!("creating {}", host.boards.display())))?;
    create_reservations_dir(&host.reservations)
        .map_err(context(format!("creating {}", host.reservations.display())))?;
    Ok(replaced)
}

/// A directory only the plugin writes (mode 0755, the plugin's user).
fn create_plugin_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// Creates the claim's board entries, two per GPU in `uuids`, where they are missing (an
/// existing one is in use by the claim's processes): zeroed, mode 0666 (the claim's processes
/// may run as any user). The GPUs' directories are the plugin's own; containers mount them
/// read-only and only their own claim's entries read-write, so nothing a tenant does decides
/// what the plugin creates or removes here.
pub fn create_board_entries<'a>(
    host: &HostPaths,
    uuids: impl IntoIterator<Item = &'a str>,
) -> io::Result<()> {
    let empty = [0u8; tessera_api::board::ENTRY_SIZE];
    for uuid in uuids {
        board_gpu_name(uuid)?;
        create_plugin_dir(&host.boards.join(uuid))?;
        for kind in EntryKind::ALL {
            let entry = host.board_entry(uuid, kind);
            if entry.symlink_metadata().is_err() {
                fsutil::write_atomic(&entry, &empty, 0o666)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", entry.display())))?;
            }
        }
    }
    Ok(())
}

/// Removes the claim's board entries on every GPU (the boards directory is the plugin's own, so
/// listing it is safe); missing ones are fine.
pub fn remove_board_entries(host: &HostPaths) -> io::Result<()> {
    let gpus = match std::fs::read_dir(&host.boards) {
        Ok(gpus) => gpus,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("{}: {e}", host.boards.display()),
            ));
        }
    };
    for gpu in gpus {
        let name = gpu?.file_name();
        let Some(uuid) = name
            .to_str()
            .filter(|n| tessera_api::board::is_board_name(n))
        else {
            continue;
        };
        let dir = host.boards.join(uuid);
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|name| tessera_api::board::is_entry_of(name, &host.owner));
            if ours {
                let path = entry.path();
                fsutil::remove_file(&path)
                    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            }
        }
    }
    Ok(())
}

/// GPU UUIDs become directory names on the boards: refuse anything else.
fn board_gpu_name(uuid: &str) -> io::Result<()> {
    if tessera_api::board::is_board_name(uuid) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("GPU UUID {uuid:?} cannot name a board directory"),
        ))
    }
}

/// The reservations directory: only the plugin writes it (mode 0755, the plugin's user), so
/// nothing a container does decides what the plugin writes there. Containers mount it read-only.
fn create_reservations_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// `<state-dir>/reservations/<UUID>.reserved`: the card memory a GPU's prepared claims that did
/// not opt in to spilling are owed, in decimal bytes (see [`write_memory_reservations`]).
pub fn reservation_file(state_dir: &Path, uuid: &str) -> std::path::PathBuf {
    HostPaths::new(state_dir, "_")
        .reservations
        .join(tessera_api::memory_board::reservation_file_name(uuid))
}

/// Card memory owed, by GPU UUID.
pub type Reservations = std::collections::BTreeMap<String, u64>;

/// What the prepared claims that did not opt in to spilling are owed on each GPU the node
/// overcommits: Σ min(memory limit, physical memory), from the configs under
/// `<state-dir>/claims/` (every overcommitted GPU with a prepared claim appears, with 0 if none
/// is owed). Configs that cannot be read (a prepare that never wrote one) are skipped, and so are
/// the claims in `except` (those being prepared again now: a config left by an earlier, unfinished
/// preparation, or from before a reboot, is not another claim's).
pub fn memory_reservations(state_dir: &Path, except: &[&str]) -> io::Result<Reservations> {
    let mut owed = Reservations::new();
    let claims = state_dir.join("claims");
    let entries = match std::fs::read_dir(&claims) {
        Ok(entries) => entries.flatten().collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for entry in entries {
        if except.iter().any(|uid| entry.file_name() == *uid) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("config.json")) else {
            continue;
        };
        let Ok(config) = ShimConfig::from_json(&raw) else {
            continue;
        };
        for device in &config.devices {
            let Some(physical) = device.physical_memory else {
                continue;
            };
            let total = owed.entry(device.uuid.clone()).or_insert(0);
            if !config.oversubscribe {
                *total = total.saturating_add(device.memory_limit.min(physical));
            }
        }
    }
    Ok(owed)
}

/// Publishes [`memory_reservations`] plus `waiting` (claims the plugin holds back until the card
/// has their share, which the opted-in claims must not take meanwhile) as
/// `<state-dir>/reservations/<UUID>.reserved`. An opted-in claim's shim leaves that much of the card alone from
/// the moment those claims are prepared, not only once their processes have started. GPUs that
/// had a reservation and have no such claim any more get 0. Returns what was written.
pub fn write_memory_reservations(
    state_dir: &Path,
    waiting: &Reservations,
) -> io::Result<Reservations> {
    let mut owed = memory_reservations(state_dir, &[])?;
    for (uuid, bytes) in waiting {
        let total = owed.entry(uuid.clone()).or_insert(0);
        *total = total.saturating_add(*bytes);
    }
    let dir = HostPaths::new(state_dir, "_").reservations;
    create_reservations_dir(&dir)?;
    // GPUs reserved before and no longer: back to 0. Only the plugin's own directory is listed:
    // the board directory is every container's to write, and its names must not steer this.
    for entry in std::fs::read_dir(&dir)?.flatten() {
        let name = entry.file_name();
        if let Some(uuid) = name.to_str().and_then(|n| n.strip_suffix(".reserved")) {
            owed.entry(uuid.to_string()).or_insert(0);
        }
    }
    for (uuid, bytes) in &owed {
        fsutil::write_atomic(
            &reservation_file(state_dir, uuid),
            format!("{bytes}\n").as_bytes(),
            0o644,
        )?;
    }
    Ok(owed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn prepared(state: &Path, uid: &str, devices: serde_json::Value, oversubscribe: bool) {
        let dir = state.join("claims").join(uid);
        std::fs::create_dir_all(&dir).expect("claim dir");
        let config = serde_json::json!({
            "version": SHIM_CONFIG_VERSION, "claimUid": uid, "region": cdi::CONTAINER_REGION,
            "devices": devices, "oversubscribe": oversubscribe,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    }

    fn read(state: &Path, uuid: &str) -> String {
        std::fs::read_to_string(reservation_file(state, uuid)).expect("reservation")
    }

    #[test]
    fn only_claims_that_did_not_opt_in_on_overcommitted_gpus_reserve_the_card() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let over = |limit: u64| serde_json::json!({"uuid": "GPU-a", "memoryLimit": limit, "cores": 50, "physicalMemory": 8 * GIB});
        prepared(state, "fixed-1", serde_json::json!([over(6 * GIB)]), false);
        // A limit above the card (possible with a factor) reserves at most the card.
        prepared(state, "fixed-2", serde_json::json!([over(12 * GIB)]), false);
        prepared(state, "spills", serde_json::json!([over(6 * GIB)]), true);
        // Not overcommitted: no reservation file at all.
        prepared(
            state,
            "plain",
            serde_json::json!([{"uuid": "GPU-b", "memoryLimit": GIB, "cores": 10}]),
            false,
        );
        std::fs::create_dir_all(state.join("claims/half-prepared")).expect("no config");
        let owed = write_memory_reservations(state, &Reservations::new()).expect("write");
        assert_eq!(owed.get("GPU-a"), Some(&(14 * GIB)));
        assert_eq!(read(state, "GPU-a"), format!("{}\n", 14 * GIB));
        assert!(!reservation_file(state, "GPU-b").exists());
        // A claim being prepared again (its config left by an unfinished preparation) does not
        // count against itself.
        assert_eq!(
            memory_reservations(state, &["fixed-1"])
                .expect("read")
                .get("GPU-a"),
            Some(&(8 * GIB))
        );

        std::fs::remove_dir_all(state.join("claims/fixed-1")).expect("unprepare");
        std::fs::remove_dir_all(state.join("claims/fixed-2")).expect("unprepare");
        write_memory_reservations(state, &Reservations::new()).expect("write again");
        assert_eq!(
            read(state, "GPU-a"),
            "0\n",
            "only an opted-in claim is left"
        );
        // A claim the plugin holds back until the card has its share is owed it meanwhile.
        let waiting = Reservations::from([("GPU-a".to_string(), 3 * GIB)]);
        write_memory_reservations(state, &waiting).expect("write with a waiting claim");
        assert_eq!(read(state, "GPU-a"), format!("{}\n", 3 * GIB));
    }
}
