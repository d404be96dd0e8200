//! Reading a claim's accounting region for metrics: memory used and memory spilled to host
//! memory (oversubscription; 0 until the shim spills), summed over live slots only, and the GPU
//! time the claim's kernels have taken.
//!
//! A slot is live while its owner holds an open-file-description lock on the slot's byte range
//! (see `docs/reference/region.md`); the kernel drops it when the process dies, however it dies.
//! `F_OFD_GETLK` asks whether a write lock on the range could be taken: if not, a live process
//! owns the slot. The plugin never takes the locks itself, so it cannot disturb the shim.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{FcntlArg, fcntl};
use tessera_api::region::{REGION_SIZE, RegionSnapshot, SLOT_SIZE, slot_offset};
use tessera_driver::fsutil;

/// Usage of one device of a region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceUsage {
    pub uuid: String,
    pub memory_used: u64,
    pub memory_limit: u64,
    /// Bytes of the claim's allocations served from host memory (the slots' `memory_spilled`).
    pub memory_spilled: u64,
    /// GPU time the claim's kernels have taken on this device so far, ns (the region's
    /// `compute_busy_ns`, written by the claim's shim: the claim's own word about itself).
    pub gpu_busy_ns: u64,
}

/// Per-device usage of the region at `path`, and the number of live processes. The region is
/// the claim's containers' to write: it is opened as untrusted (no symlink, no FIFO) and only
/// its first `REGION_SIZE` bytes are read, however far a container extended it.
pub fn read_usage(path: &Path) -> std::io::Result<(Vec<DeviceUsage>, usize)> {
    let file = fsutil::open_untrusted(path)?;
    let bytes = fsutil::read_prefix(&file, REGION_SIZE)?;
    let snapshot = RegionSnapshot::parse(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let live: Vec<bool> = (0..snapshot.slots.len())
        .map(|i| slot_is_live(&file, i))
        .collect();
    let is_live =
        |slot: &tessera_api::region::SlotSnapshot| live.get(slot.index).copied().unwrap_or(false);
    let usage = snapshot
        .devices
        .iter()
        .enumerate()
        .map(|(index, device)| DeviceUsage {
            uuid: device.uuid.clone(),
            memory_used: snapshot.memory_used(index, is_live),
            memory_limit: device.memory_limit,
            memory_spilled: snapshot
                .slots
                .iter()
                .filter(|s| s.state == tessera_api::region::SLOT_ACTIVE && is_live(s))
                .map(|s| s.memory_spilled.get(index).copied().unwrap_or(0))
                .fold(0u64, u64::saturating_add),
            gpu_busy_ns: snapshot.compute_busy_ns.get(index).copied().unwrap_or(0),
        })
        .collect();
    let processes = snapshot
        .slots
        .iter()
        .filter(|s| s.state == tessera_api::region::SLOT_ACTIVE && is_live(s))
        .count();
    Ok((usage, processes))
}

/// Whether a process holds the lock on slot `index`.
fn slot_is_live(file: &File, index: usize) -> bool {
    let mut query = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: slot_offset(index) as i64,
        l_len: SLOT_SIZE as i64,
        // F_OFD_GETLK requires l_pid 0 on input.
        l_pid: 0,
    };
    match fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut query)) {
        Ok(_) => query.l_type != nix::libc::F_UNLCK as i16,
        // A kernel without OFD locks: count the slot rather than hide usage.
        Err(_) => true,
    }
}
