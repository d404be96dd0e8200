//! The node's physical state, shared by every process through one `mmap`ed file.
//!
//! A fake GPU's memory must be a limit across processes, as a real card's is: a second process
//! sees what the first took, and allocating past the card fails. So per-device usage lives in a
//! file every process maps (see [`layout`]), and each process accounts in a slot of its own
//! ([`Lease`]) so that what a process took can be given back when it dies, however it dies.
//!
//! Liveness is a lock, never a PID (PIDs differ across PID namespaces and get reused): the
//! owner of a slot holds an `fcntl` lock on it for as long as it lives; the kernel drops the lock
//! when the process exits or is killed, and whoever can then take it drains the slot back into
//! the device totals. Draining happens lazily — when a process claims a slot, before an
//! allocation fails for lack of memory, and before any query of usage — so readers never see a
//! dead process's memory.
//!
//! The file is (re)initialised by a process that finds itself its only user, which also clears
//! any drift a crash left behind; a process that finds other users validates the header and
//! refuses a file created for another layout or another device list.

pub mod clock;
pub mod layout;
pub mod limits;
mod lock;

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::cgroup::CgroupSet;
use crate::config::Config;
use layout::{
    CGROUPS_OFFSET, DEVICES_OFFSET, DeviceRecord, FILE_SIZE, Header, LAYOUT_VERSION, LIMITS_OFFSET,
    LOCK_INIT, LOCK_SLOT_BASE, LOCK_USERS, MAGIC, MAX_SLOTS, SLOT_ACTIVE, SLOT_FREE, SLOTS_OFFSET,
    SlotRecord,
};
use lock::LockKind;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0}; it is in use by live processes, so it was not reset (stop them, or point FAKEGPU_STATE elsewhere)"
    )]
    Incompatible(String),
    #[error("all {MAX_SLOTS} process slots are held by live processes")]
    SlotsExhausted,
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> StateError {
    move |source| StateError::Io { what, source }
}

/// A device reservation that did not fit: on the card, or (past a cgroup's hard limit) under
/// the limit, when `used` is the cgroup's and `capacity` its hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device {device}: {requested} bytes requested, {used} of {capacity} in use")]
pub struct OutOfMemory {
    pub device: usize,
    pub requested: u64,
    pub used: u64,
    pub capacity: u64,
}

/// One process's usage, as NVML lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUsage {
    pub slot: usize,
    pub pid: u32,
    /// Device memory per device (index = NVML index).
    pub used: Vec<u64>,
    pub managed: Vec<u64>,
    /// Bit `d` set while the process has an active context on device `d`.
    pub devices_open: u64,
    /// Kernel time (virtual ns) per device.
    pub busy: Vec<u64>,
}

impl ProcessUsage {
    /// Whether NVML should list the process on `device`: it has a context there or holds memory.
    pub fn is_on(&self, device: usize) -> bool {
        self.devices_open & (1 << device) != 0
            || self.used[device] != 0
            || self.managed[device] != 0
    }
}

/// The mapped state file. Holds a shared "users" lock for as long as it is open, which is how a
/// newcomer knows whether it may reset the file.
pub struct Region {
    path: PathBuf,
    file: File,
    base: NonNull<u8>,
    device_count: usize,
    /// Serialises draining within this process: every thread drains through the same open file
    /// description, and an OFD lock does not exclude its own description.
    drain: Mutex<()>,
}

// SAFETY: the mapping is only accessed through atomics (records) or read once at open (header),
// and lives as long as the `Region`.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Opens (creating or resetting it when no other process uses it) the state file at `path`
    /// for the node `config` describes.
    pub fn open(path: &Path, config: &Config) -> Result<Arc<Self>, StateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(path)
            .map_err(io_error("cannot open it"))?;
        // Processes of other users (containers) share the node; the umask should not stop them.
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));

        lock::lock(file.as_fd(), LOCK_INIT, LockKind::Exclusive).map_err(io_error(
            "cannot lock it (does the filesystem support fcntl locks?)",
        ))?;
        let attached = Self::attach(&file, config);
        let _ = lock::unlock(file.as_fd(), LOCK_INIT);
        let base = attached?;

        Ok(Arc::new(Self {
            path: path.to_owned(),
            file,
            base,
            device_count: config.devices.len(),
            drain: Mutex::new(()),
        }))
    }

    /// With the init lock held: resets the file if we are alone, else validates it; maps it.
    fn attach(file: &File, config: &Config) -> Result<NonNull<u8>, StateError> {
        let alone = lock::try_lock(file.as_fd(), LOCK_USERS, LockKind::Exclusive)
            .map_err(io_error("cannot lock it"))?;
        if alone {
            // Per-cgroup limits are the driver's, not a process's: like a real driver's they
            // outlive the processes that set them (a runtime's hook sets them before the
            // container's first process attaches). Kept across a reset of a file of this
            // layout and node; everything else is the processes' and starts afresh.
            let limits = kept_limits(file, config);
            // Truncating to zero first zeroes every record: all earlier users are gone.
            file.set_len(0).map_err(io_error("cannot reset it"))?;
            file.set_len(FILE_SIZE as u64)
                .map_err(io_error("cannot size it"))?;
            let base = map(file)?;
            // SAFETY: the mapping is FILE_SIZE bytes, page-aligned, and no other process has
            // it mapped (we hold the users lock exclusively).
            unsafe {
                base.cast::<Header>()
                    .as_ptr()
                    .write_volatile(Header::for_config(
                        config.devices.len(),
                        config.fingerprint(),
                    ));
            }
            let region_view = RecordView {
                base,
                mapping: PhantomData,
            };
            for (index, device) in config.devices.iter().enumerate() {
                region_view
                    .device(index)
                    .capacity
                    .store(device.memory, Ordering::Relaxed);
            }
            if let Some(limits) = limits {
                // SAFETY: the table's bytes lie within the FILE_SIZE mapping, which no other
                // process has mapped yet (we hold the users lock exclusively).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        limits.as_ptr(),
                        base.as_ptr().add(LIMITS_OFFSET),
                        limits.len(),
                    );
                }
            }
            // Downgrading converts the lock in place; there is no window without it.
            lock::lock(file.as_fd(), LOCK_USERS, LockKind::Shared)
                .map_err(io_error("cannot lock it"))?;
            return Ok(base);
        }

        let shared = lock::try_lock(file.as_fd(), LOCK_USERS, LockKind::Shared)
            .map_err(io_error("cannot lock it"))?;
        if !shared {
            // Only an initialiser holds it exclusively, and it also holds the init lock we have.
            return Err(StateError::Incompatible(
                "its users lock is held exclusively".into(),
            ));
        }
        let size = file.metadata().map_err(io_error("cannot stat it"))?.len();
        if size < FILE_SIZE as u64 {
            return Err(StateError::Incompatible(format!(
                "it is {size} bytes, this build expects {FILE_SIZE} (another layout version?)"
            )));
        }
        let base = map(file)?;
        // SAFETY: the header was written before the initialiser released the init lock, which
        // we have taken since; the mapping covers it.
        let header = unsafe { base.cast::<Header>().as_ptr().read_volatile() };
        let expected = Header::for_config(config.devices.len(), config.fingerprint());
        let problem = if header.magic != MAGIC {
            Some("it is not a fake GPU state file".to_owned())
        } else if header.layout_version != LAYOUT_VERSION {
            Some(format!(
                "it has layout version {}, this build reads version {LAYOUT_VERSION}",
                header.layout_version
            ))
        } else if header != expected {
            Some("it was created for a different device list (another FAKEGPU_CONFIG?)".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            // SAFETY: `base` is the FILE_SIZE mapping made above and nothing else refers to it.
            unsafe { unmap(base) };
            return Err(StateError::Incompatible(problem));
        }
        Ok(base)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device_count(&self) -> usize {
        self.device_count
    }

    fn view(&self) -> RecordView<'_> {
        RecordView {
            base: self.base,
            mapping: PhantomData,
        }
    }

    /// The card's memory.
    pub fn capacity(&self, device: usize) -> u64 {
        self.view().device(device).capacity.load(Ordering::Relaxed)
    }

    /// Device memory in use by all processes, after returning dead processes' memory.
    pub fn used(&self, device: usize) -> u64 {
        self.reclaim_dead();
        self.used_now(device)
    }

    /// Device memory in use by all processes, without looking for dead ones first.
    pub fn used_now(&self, device: usize) -> u64 {
        self.view().device(device).used.load(Ordering::Relaxed)
    }

    /// Managed memory in use by all processes, after returning dead processes' memory.
    pub fn managed(&self, device: usize) -> u64 {
        self.reclaim_dead();
        self.view().device(device).managed.load(Ordering::Relaxed)
    }

    /// Returns the memory of every process that died to the devices; how many slots it drained.
    pub fn reclaim_dead(&self) -> usize {
        let _serial = self
            .drain
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let view = self.view();
        let mut drained = 0;
        for index in 0..MAX_SLOTS {
            let slot = view.slot(index);
            if slot.state.load(Ordering::Acquire) != SLOT_ACTIVE {
                continue;
            }
            let byte = LOCK_SLOT_BASE + index as i64;
            // An error here (not a conflict) leaves the slot alone: better to over-count than to
            // take a live process's memory.
            if let Ok(true) = lock::try_lock(self.file.as_fd(), byte, LockKind::Exclusive) {
                if slot.state.load(Ordering::Acquire) == SLOT_ACTIVE {
                    view.drain(slot, self.device_count);
                    drained += 1;
                }
                let _ = lock::unlock(self.file.as_fd(), byte);
            }
        }
        drained
    }

    /// The live processes and what they use.
    pub fn processes(&self) -> Vec<ProcessUsage> {
        self.reclaim_dead();
        let view = self.view();
        (0..MAX_SLOTS)
            .filter_map(|index| {
                let slot = view.slot(index);
                if slot.state.load(Ordering::Acquire) != SLOT_ACTIVE {
                    return None;
                }
                let per_device = |counters: &[AtomicU64]| {
                    counters[..self.device_count]
                        .iter()
                        .map(|c| c.load(Ordering::Relaxed))
                        .collect()
                };
                Some(ProcessUsage {
                    slot: index,
                    pid: slot.pid.load(Ordering::Relaxed),
                    used: per_device(&slot.used),
                    managed: per_device(&slot.managed),
                    devices_open: slot.devices_open.load(Ordering::Relaxed),
                    busy: per_device(&slot.busy),
                })
            })
            .collect()
    }

    /// Claims a slot for the calling process, in no cgroup a memory limit could bind (see
    /// [`Region::claim_in`]).
    pub fn claim(self: &Arc<Self>) -> Result<Lease, StateError> {
        self.claim_in(CgroupSet::default())
    }

    /// Claims a slot for the calling process, which is in `cgroups` (the limits that bind it):
    /// the first slot whose lock is free, draining it first if its owner died without giving it
    /// back.
    pub fn claim_in(self: &Arc<Self>, cgroups: CgroupSet) -> Result<Lease, StateError> {
        // A description of its own, so that the slot lock is independent of the region's (which
        // a forked child shares) and of any other lease in this process.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(io_error("cannot open it"))?;
        let view = self.view();
        for index in 0..MAX_SLOTS {
            let byte = LOCK_SLOT_BASE + index as i64;
            if !lock::try_lock(file.as_fd(), byte, LockKind::Exclusive)
                .map_err(io_error("cannot lock a slot"))?
            {
                continue;
            }
            let slot = view.slot(index);
            if slot.state.load(Ordering::Acquire) == SLOT_ACTIVE {
                view.drain(slot, self.device_count);
            }
            slot.pid.store(std::process::id(), Ordering::Relaxed);
            slot.devices_open.store(0, Ordering::Relaxed);
            view.start_clock(slot, self.device_count);
            view.store_cgroups(index, &cgroups);
            slot.generation.fetch_add(1, Ordering::Relaxed);
            slot.state.store(SLOT_ACTIVE, Ordering::Release);
            return Ok(Lease {
                region: Arc::clone(self),
                index,
                file,
                cgroups,
                limits_serial: Mutex::new(()),
            });
        }
        Err(StateError::SlotsExhausted)
    }

    /// Reserves `bytes` on `device` against the card's capacity, never past it.
    fn try_reserve(&self, device: usize, bytes: u64) -> Result<(), OutOfMemory> {
        let record = self.view().device(device);
        let capacity = record.capacity.load(Ordering::Relaxed);
        let mut used = record.used.load(Ordering::Relaxed);
        loop {
            let fits = used
                .checked_add(bytes)
                .is_some_and(|total| total <= capacity);
            if !fits {
                return Err(OutOfMemory {
                    device,
                    requested: bytes,
                    used,
                    capacity,
                });
            }
            match record.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => used = actual,
            }
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base` is the mapping made at open; no reference into it outlives `self`
        // (leases hold an `Arc<Region>`).
        unsafe { unmap(self.base) };
        // Closing `file` releases the users lock.
    }
}

/// Typed access to the records of a mapping that lives for `'a`.
#[derive(Clone, Copy)]
struct RecordView<'a> {
    base: NonNull<u8>,
    mapping: PhantomData<&'a Region>,
}

impl<'a> RecordView<'a> {
    fn device(self, index: usize) -> &'a DeviceRecord {
        assert!(index < crate::config::MAX_DEVICES);
        // SAFETY: the mapping is FILE_SIZE bytes and lives as long as the region that made
        // this view; records are 64-byte aligned in a page-aligned mapping and consist only of
        // atomics, so shared references to them are sound even while other processes write.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(DEVICES_OFFSET)
                .cast::<DeviceRecord>()
                .add(index)
        }
    }

    fn slot(self, index: usize) -> &'a SlotRecord {
        assert!(index < MAX_SLOTS);
        // SAFETY: as for `device`.
        unsafe {
            &*self
                .base
                .as_ptr()
                .add(SLOTS_OFFSET)
                .cast::<SlotRecord>()
                .add(index)
        }
    }

    /// Gives a slot's memory back to the devices and frees it. The caller holds its lock.
    fn drain(self, slot: &SlotRecord, device_count: usize) {
        for device in 0..device_count {
            let record = self.device(device);
            saturating_sub(&record.used, slot.used[device].swap(0, Ordering::Relaxed));
            saturating_sub(
                &record.managed,
                slot.managed[device].swap(0, Ordering::Relaxed),
            );
        }
        slot.devices_open.store(0, Ordering::Relaxed);
        slot.heartbeat.store(0, Ordering::Relaxed);
        slot.pid.store(0, Ordering::Relaxed);
        slot.state.store(SLOT_FREE, Ordering::Release);
    }
}

/// Device totals must never wrap below zero: a wrapped total would make every later
/// allocation fail. (They cannot in correct operation; this guards the crash windows.)
fn saturating_sub(counter: &AtomicU64, amount: u64) {
    if amount == 0 {
        return;
    }
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(amount))
    });
}

/// Gives back what a reservation took: one atomic subtraction, as this is on every free. A
/// release never exceeds what was reserved, so the counter cannot go below zero; should a bug
/// ever make it, the wrap is undone at once rather than left to fail every later allocation.
fn release(counter: &AtomicU64, amount: u64) {
    let before = counter.fetch_sub(amount, Ordering::Relaxed);
    if before < amount {
        counter.fetch_add(amount - before, Ordering::Relaxed);
    }
}

fn map(file: &File) -> Result<NonNull<u8>, StateError> {
    // SAFETY: mapping a file we hold open, shared, with a length the file has.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            FILE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(StateError::Io {
            what: "cannot map it",
            source: io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast()).ok_or(StateError::Io {
        what: "cannot map it",
        source: io::Error::other("mmap returned null"),
    })
}

/// # Safety
/// `base` must be a live FILE_SIZE mapping made by [`map`] that nothing refers to any more.
unsafe fn unmap(base: NonNull<u8>) {
    // SAFETY: per the function's contract.
    unsafe { libc::munmap(base.as_ptr().cast(), FILE_SIZE) };
}

/// A process's slot. Every byte of device or managed memory the process takes is counted both
/// in the device total (the limit) and here (so that it can be given back). Dropping the lease
/// gives everything back.
///
/// After `fork`, the child must neither use nor drop the lease it inherited (that would account
/// into, or drain, the parent's slot): close [`Lease::lock_fd`] in the child, forget the lease,
/// and claim a new one.
pub struct Lease {
    region: Arc<Region>,
    index: usize,
    /// Holds the slot's lock; the kernel releases it when the process dies.
    file: File,
    /// The cgroups the process was in when it claimed the slot (what memory limits bind it).
    cgroups: CgroupSet,
    /// Serialises this process's threads on the limit table's lock, which they all take
    /// through `file` (an OFD lock does not exclude its own description).
    limits_serial: Mutex<()>,
}

impl Lease {
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn slot_index(&self) -> usize {
        self.index
    }

    /// The descriptor holding the slot lock (see the type's note on `fork`).
    pub fn lock_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn slot(&self) -> &SlotRecord {
        self.region.view().slot(self.index)
    }

    /// Takes `bytes` of `device`'s memory, or fails without taking anything: past the card, or
    /// past a cgroup's hard limit that binds the process (see [`limits`]; then the error's
    /// `used` and `capacity` are the cgroup's). A reservation that does not fit looks for dead
    /// processes' memory before failing.
    #[inline]
    pub fn reserve(&self, device: usize, bytes: u64) -> Result<(), OutOfMemory> {
        if self.limits_may_bind() {
            return self.reserve_within_limits(device, bytes);
        }
        self.reserve_on_card(device, bytes)
    }

    /// The cgroups this process was in when it claimed its slot.
    pub fn cgroups(&self) -> &CgroupSet {
        &self.cgroups
    }

    fn reserve_on_card(&self, device: usize, bytes: u64) -> Result<(), OutOfMemory> {
        if let Err(first) = self.region.try_reserve(device, bytes) {
            if self.region.reclaim_dead() == 0 {
                return Err(first);
            }
            self.region.try_reserve(device, bytes)?;
        }
        // Device total first, slot second (and the reverse on release): a crash in between
        // over-counts, never under-counts, so the card's limit holds.
        self.slot().used[device].fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Gives back device memory taken with [`Lease::reserve`].
    pub fn release(&self, device: usize, bytes: u64) {
        release(&self.slot().used[device], bytes);
        release(&self.region.view().device(device).used, bytes);
    }

    /// Counts managed memory (no limit: it is host memory until prefetched).
    pub fn add_managed(&self, device: usize, bytes: u64) {
        self.region
            .view()
            .device(device)
            .managed
            .fetch_add(bytes, Ordering::Relaxed);
        self.slot().managed[device].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn release_managed(&self, device: usize, bytes: u64) {
        release(&self.slot().managed[device], bytes);
        release(&self.region.view().device(device).managed, bytes);
    }

    /// This process's device memory on `device`.
    pub fn used(&self, device: usize) -> u64 {
        self.slot().used[device].load(Ordering::Relaxed)
    }

    /// This process's managed memory on `device`.
    pub fn managed(&self, device: usize) -> u64 {
        self.slot().managed[device].load(Ordering::Relaxed)
    }

    /// Marks whether the process has an active context on `device` (NVML lists it if so).
    pub fn set_device_open(&self, device: usize, open: bool) {
        let bit = 1u64 << device;
        if open {
            self.slot().devices_open.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.slot().devices_open.fetch_and(!bit, Ordering::Relaxed);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // We hold the slot's lock, so nobody else is draining it.
        self.region
            .view()
            .drain(self.slot(), self.region.device_count);
        // Closing `file` releases the lock.
    }
}

#[cfg(test)]
mod tests;

/// The limit table of a file this build and node wrote, read before the file is reset; `None`
/// for a new, foreign or older file.
fn kept_limits(file: &File, config: &Config) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut header = vec![0u8; size_of::<Header>()];
    file.read_exact_at(&mut header, 0).ok()?;
    // SAFETY: Header is plain old data of this size; any bytes are a value of it.
    let found = unsafe { header.as_ptr().cast::<Header>().read_unaligned() };
    if found != Header::for_config(config.devices.len(), config.fingerprint()) {
        return None;
    }
    let mut table = vec![0u8; CGROUPS_OFFSET - LIMITS_OFFSET];
    file.read_exact_at(&mut table, LIMITS_OFFSET as u64).ok()?;
    Some(table)
}
