//! NVML 13.4's per-cgroup device-memory limits: a driver-enforced wall per (device, cgroup).
//!
//! NVML sets them (`nvmlDeviceSetMemoryLimits_v1`) in the node's limit table; every reservation
//! of device memory by a process the limit binds (one in the limit's cgroup or below it, see
//! `crate::cgroup`) then fails once the device memory of all live processes under the limit
//! plus the request would pass the hard limit. The check and the reservation happen together
//! under the table's lock (`LOCK_LIMITS`), so processes sharing a limit cannot both pass it.
//!
//! A node without limits pays one atomic load per reservation (the table's live count); a
//! process no live limit binds pays a scan of the table without the lock.
//!
//! A limit whose directory is gone counts as cleared (the real driver clears a cgroup's limits
//! when the cgroup is removed); the record is freed when next seen under the lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::layout::{
    LIMIT_FREE, LIMIT_LIVE, LOCK_LIMITS, LimitRecord, LimitTable, MAX_CGROUP_HASHES,
    MAX_LIMIT_PATH, MAX_LIMITS, MAX_SLOTS, SLOT_ACTIVE, SlotCgroups,
};
use super::lock::{self, LockKind};
use super::{Lease, OutOfMemory, RecordView, Region};
use crate::cgroup::{CgroupSet, key_of};

/// No hard limit (`NVML_DEVICE_MEMORY_LIMIT_MAX`).
pub const NO_LIMIT: u64 = u64::MAX;

/// Why a path cannot name a cgroup directory for a limit.
#[derive(Debug, thiserror::Error)]
pub enum CgroupDirError {
    #[error("cannot open it: {0}")]
    Open(#[source] io::Error),
    #[error("it is not a directory")]
    NotADirectory,
    #[error("it is not on a cgroup filesystem (cgroup or cgroup2)")]
    NotCgroup,
    #[error(
        "its canonical path is {0} bytes; the fake GPU's limit table holds paths of at most {MAX_LIMIT_PATH}"
    )]
    TooLong(usize),
}

/// A cgroup directory as a limit is keyed by: its identity (see `crate::cgroup::key_of`), with
/// its canonical path for NVML's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    path: PathBuf,
    hash: u64,
    dev: u64,
    ino: u64,
}

impl CgroupDir {
    /// The directory `path` names (canonicalised). Any directory will do here; NVML also
    /// requires a cgroup filesystem ([`CgroupDir::require_cgroup_fs`]).
    pub fn open(path: &Path) -> Result<CgroupDir, CgroupDirError> {
        let path = std::fs::canonicalize(path).map_err(CgroupDirError::Open)?;
        let meta = std::fs::metadata(&path).map_err(CgroupDirError::Open)?;
        if !meta.is_dir() {
            return Err(CgroupDirError::NotADirectory);
        }
        let len = path.as_os_str().len();
        if len > MAX_LIMIT_PATH {
            return Err(CgroupDirError::TooLong(len));
        }
        Ok(CgroupDir {
            hash: key_of(meta.dev(), meta.ino()),
            dev: meta.dev(),
            ino: meta.ino(),
            path,
        })
    }

    /// Fails unless the directory is on a cgroup (v1) or cgroup2 filesystem.
    pub fn require_cgroup_fs(&self) -> Result<(), CgroupDirError> {
        const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
        const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
        let c_path = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|e| CgroupDirError::Open(io::Error::other(e)))?;
        // SAFETY: `statfs` is plain data, all-zero valid; the path is NUL-terminated and both
        // pointers outlive the call.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
            return Err(CgroupDirError::Open(io::Error::last_os_error()));
        }
        #[allow(clippy::unnecessary_cast)] // `f_type`'s width differs between libcs
        let kind = stat.f_type as i64;
        if kind == CGROUP_SUPER_MAGIC || kind == CGROUP2_SUPER_MAGIC {
            Ok(())
        } else {
            Err(CgroupDirError::NotCgroup)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why the limit table could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("cannot lock the node's limit table: {0}")]
    Lock(#[source] io::Error),
    #[error("all {MAX_LIMITS} memory-limit records of the fake GPU node are in use")]
    TableFull,
}

/// One (device, cgroup)'s limits, as `nvmlDeviceGetMemoryLimits_v1` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimit {
    pub soft: u64,
    pub hard: u64,
    /// Device memory of the live processes in the cgroup or below it.
    pub current_used: u64,
}

impl<'a> RecordView<'a> {
    fn limit_table(self) -> &'a LimitTable {
        // SAFETY: as for `device`: the table is atomics only, 64-byte aligned in the mapping,
        // which lives as long as the region that made this view.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(super::layout::LIMITS_OFFSET)
                .cast::<LimitTable>()
        }
    }

    pub(super) fn cgroups(self, slot: usize) -> &'a SlotCgroups {
        assert!(slot < MAX_SLOTS);
        // SAFETY: as for `limit_table`.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(super::layout::CGROUPS_OFFSET)
                .cast::<SlotCgroups>()
                .add(slot)
        }
    }

    /// Publishes a newly claimed slot's cgroup set (before the slot becomes active).
    pub(super) fn store_cgroups(self, slot: usize, set: &CgroupSet) {
        let record = self.cgroups(slot);
        let hashes = &set.hashes()[..set.len().min(MAX_CGROUP_HASHES)];
        for (cell, hash) in record.hashes.iter().zip(hashes) {
            cell.store(*hash, Ordering::Relaxed);
        }
        record.count.store(hashes.len() as u64, Ordering::Release);
    }

    fn slot_in(self, slot: usize, hash: u64) -> bool {
        let record = self.cgroups(slot);
        let count = (record.count.load(Ordering::Acquire) as usize).min(MAX_CGROUP_HASHES);
        record.hashes[..count]
            .iter()
            .any(|h| h.load(Ordering::Relaxed) == hash)
    }

    /// Device memory on `device` of the active slots whose process the limit with `hash` binds.
    fn usage_under(self, hash: u64, device: usize) -> u64 {
        (0..MAX_SLOTS)
            .filter(|&i| self.slot(i).state.load(Ordering::Acquire) == SLOT_ACTIVE)
            .filter(|&i| self.slot_in(i, hash))
            .map(|i| self.slot(i).used[device].load(Ordering::Relaxed))
            .sum()
    }
}

fn record_path(record: &LimitRecord) -> Vec<u8> {
    let len = (record.path_len.load(Ordering::Relaxed) as usize).min(MAX_LIMIT_PATH);
    record
        .path
        .iter()
        .flat_map(|word| word.load(Ordering::Relaxed).to_le_bytes())
        .take(len)
        .collect()
}

fn store_path(record: &LimitRecord, path: &[u8]) {
    for (word, chunk) in record.path.iter().zip(path.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
    }
    record.path_len.store(path.len() as u32, Ordering::Relaxed);
}

/// Whether the record's directory is still the one the limit was set on. Caller holds the lock.
fn still_there(record: &LimitRecord) -> bool {
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&record_path(record)));
    std::fs::metadata(&path).is_ok_and(|meta| {
        meta.is_dir()
            && meta.dev() == record.dir_dev.load(Ordering::Relaxed)
            && meta.ino() == record.dir_ino.load(Ordering::Relaxed)
    })
}

/// Whether a limit binding this process names a cgroup that was removed, as far as this process
/// can tell: its directory is gone (or another) where its parent is still seen. A container does
/// not see the host's path of its own cgroup at all (the runtime shows it the cgroup elsewhere):
/// there the limit stands, as the cgroup must, with the process in it.
fn removed_here(record: &LimitRecord) -> bool {
    if still_there(record) {
        return false;
    }
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(&record_path(record)));
    path.parent().is_some_and(Path::is_dir)
}

/// Frees a live record. Caller holds the lock.
fn free(table: &LimitTable, record: &LimitRecord) {
    record.state.store(LIMIT_FREE, Ordering::Release);
    table.live.fetch_sub(1, Ordering::AcqRel);
}

/// Frees every live record whose directory is gone. Caller holds the lock.
fn purge_removed(table: &LimitTable) {
    for record in &table.records {
        if record.state.load(Ordering::Acquire) == LIMIT_LIVE && !still_there(record) {
            free(table, record);
        }
    }
}

fn find<'t>(table: &'t LimitTable, device: usize, dir: &CgroupDir) -> Option<&'t LimitRecord> {
    let path = dir.path.as_os_str().as_bytes();
    table.records.iter().find(|record| {
        record.state.load(Ordering::Acquire) == LIMIT_LIVE
            && record.device.load(Ordering::Relaxed) as usize == device
            && record.path_hash.load(Ordering::Relaxed) == dir.hash
            && record_path(record) == path
    })
}

/// The table's lock, held through an open file description of its own (so that it excludes
/// every other user of the file, this process's CUDA side included), released on drop.
struct TableLock {
    _file: File,
}

impl Region {
    fn lock_limits(&self) -> Result<TableLock, LimitError> {
        // A new description of the same file (through /proc rather than the path, which might
        // have been replaced; the path without /proc): OFD locks of one description do not
        // exclude each other, and the region's own is shared by every thread, and by a fork
        // child.
        let reopen = |path: &Path| OpenOptions::new().read(true).write(true).open(path);
        let file = reopen(Path::new(&format!(
            "/proc/self/fd/{}",
            self.file.as_raw_fd()
        )))
        .or_else(|_| reopen(&self.path))
        .map_err(LimitError::Lock)?;
        lock::lock(file.as_fd(), LOCK_LIMITS, LockKind::Exclusive).map_err(LimitError::Lock)?;
        Ok(TableLock { _file: file })
    }

    /// Sets `device`'s limits for the cgroup `dir`; soft 0 with hard [`NO_LIMIT`] clears them.
    /// The values are not checked here (NVML checks them against the card).
    pub fn set_memory_limit(
        &self,
        device: usize,
        dir: &CgroupDir,
        soft: u64,
        hard: u64,
    ) -> Result<(), LimitError> {
        let _lock = self.lock_limits()?;
        let table = self.view().limit_table();
        purge_removed(table);
        let clear = soft == 0 && hard == NO_LIMIT;
        if let Some(record) = find(table, device, dir) {
            if clear {
                free(table, record);
            } else {
                record.soft.store(soft, Ordering::Relaxed);
                record.hard.store(hard, Ordering::Relaxed);
            }
            return Ok(());
        }
        if clear {
            return Ok(());
        }
        let record = table
            .records
            .iter()
            .find(|r| r.state.load(Ordering::Acquire) == LIMIT_FREE)
            .ok_or(LimitError::TableFull)?;
        record.device.store(device as u32, Ordering::Relaxed);
        store_path(record, dir.path.as_os_str().as_bytes());
        record.path_hash.store(dir.hash, Ordering::Relaxed);
        record.dir_dev.store(dir.dev, Ordering::Relaxed);
        record.dir_ino.store(dir.ino, Ordering::Relaxed);
        record.soft.store(soft, Ordering::Relaxed);
        record.hard.store(hard, Ordering::Relaxed);
        // Live last: a reader that sees it live (Acquire) sees the fields.
        record.state.store(LIMIT_LIVE, Ordering::Release);
        table.live.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// `device`'s limits for the cgroup `dir`, with what its processes use; `None` when it has
    /// none (never set, cleared, or the cgroup was removed since).
    pub fn memory_limit(
        &self,
        device: usize,
        dir: &CgroupDir,
    ) -> Result<Option<MemoryLimit>, LimitError> {
        let _lock = self.lock_limits()?;
        let table = self.view().limit_table();
        purge_removed(table);
        let Some(record) = find(table, device, dir) else {
            return Ok(None);
        };
        self.reclaim_dead();
        Ok(Some(MemoryLimit {
            soft: record.soft.load(Ordering::Relaxed),
            hard: record.hard.load(Ordering::Relaxed),
            current_used: self.view().usage_under(dir.hash, device),
        }))
    }

    /// How many (device, cgroup) pairs have limits (removed cgroups may still count until the
    /// table is next changed or read).
    pub fn memory_limits_live(&self) -> u64 {
        self.view().limit_table().live.load(Ordering::Acquire)
    }

    /// The cgroup set the process in `slot` published (for tests and diagnostics).
    pub fn slot_cgroups(&self, slot: usize) -> CgroupSet {
        let record = self.view().cgroups(slot);
        let count = (record.count.load(Ordering::Acquire) as usize).min(MAX_CGROUP_HASHES);
        CgroupSet::from_hashes(
            record.hashes[..count]
                .iter()
                .map(|h| h.load(Ordering::Relaxed))
                .collect(),
        )
    }
}

impl Lease {
    /// Whether `record` is a live hard limit on `device` that binds this process.
    fn bound_by(&self, record: &LimitRecord, device: usize) -> bool {
        record.state.load(Ordering::Acquire) == LIMIT_LIVE
            && record.device.load(Ordering::Relaxed) as usize == device
            && record.hard.load(Ordering::Relaxed) != NO_LIMIT
            && self
                .cgroups
                .contains(record.path_hash.load(Ordering::Relaxed))
    }

    /// Whether a reservation must go through [`Lease::reserve_within_limits`]: the one load a
    /// node without limits pays.
    #[inline]
    pub(super) fn limits_may_bind(&self) -> bool {
        !self.cgroups.is_empty() && self.region.memory_limits_live() != 0
    }

    /// A reservation on a node with limits: checked against every hard limit that binds this
    /// process, then taken from the card, all under the table's lock.
    pub(super) fn reserve_within_limits(
        &self,
        device: usize,
        bytes: u64,
    ) -> Result<(), OutOfMemory> {
        let view = self.region.view();
        let table = view.limit_table();
        if !table.records.iter().any(|r| self.bound_by(r, device)) {
            return self.reserve_on_card(device, bytes);
        }
        let _serial = self
            .limits_serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // The lease's own description: threads of this process are serialised above, other
        // processes by the lock. Should the lock fail (not a conflict: it waits), the wall is
        // still checked, only not atomically with another process's reservation.
        let locked = lock::lock(self.file.as_fd(), LOCK_LIMITS, LockKind::Exclusive).is_ok();
        let result = self
            .check_limits(table, device, bytes)
            .and_then(|()| self.reserve_on_card(device, bytes));
        if locked {
            let _ = lock::unlock(self.file.as_fd(), LOCK_LIMITS);
        }
        result
    }

    /// With the lock held: fails if the request would take any binding limit past its hard
    /// limit (after returning dead processes' memory, once, if that would help).
    fn check_limits(
        &self,
        table: &LimitTable,
        device: usize,
        bytes: u64,
    ) -> Result<(), OutOfMemory> {
        let view = self.region.view();
        let mut reclaimed = false;
        for record in &table.records {
            if !self.bound_by(record, device) {
                continue;
            }
            if removed_here(record) {
                free(table, record);
                continue;
            }
            let hard = record.hard.load(Ordering::Relaxed);
            let hash = record.path_hash.load(Ordering::Relaxed);
            let over = |used: u64| used.checked_add(bytes).is_none_or(|total| total > hard);
            let mut used = view.usage_under(hash, device);
            if over(used) && !reclaimed {
                reclaimed = true;
                if self.region.reclaim_dead() > 0 {
                    used = view.usage_under(hash, device);
                }
            }
            if over(used) {
                return Err(OutOfMemory {
                    device,
                    requested: bytes,
                    used,
                    capacity: hard,
                });
            }
        }
        Ok(())
    }
}
