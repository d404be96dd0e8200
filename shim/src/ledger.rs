//! The claim's memory ledger: the region file mapped shared by every process of the claim.
//!
//! A charge is "add to my slot, then sum all slots": with sequentially consistent operations,
//! of two processes racing for the last bytes at least one sees the other's addition, so the
//! claim can never overshoot its limit (at worst both back off and one retries). Each process
//! owns one slot for as long as it holds an open-file-description lock on the slot's bytes; the
//! kernel drops the lock when the process dies, by SIGKILL too, and whoever next runs short
//! reclaims the dead slot's bytes. Nothing depends on PIDs, which differ across PID namespaces.
//!
//! The lock's open file description is held by a one-page mapping, not by a descriptor: a
//! program that closes descriptors it did not open (`closefrom`, `close_range`, a daemonising
//! helper) would otherwise drop the lock while its memory is still charged, and the next
//! reclaimer would zero a live slot, letting the claim overshoot. The mapping goes at exit and
//! at `exec` (when the driver frees the process's memory anyway), and is not inherited by a
//! `fork` child (`MADV_DONTFORK`), which claims a slot of its own.

use std::ffi::CString;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_api::region::{
    self, CREATE_LOCK, MAX_DEVICES, REGION_SIZE, RegionDeviceSpec, RegionHeader, RegionSlot,
    SLOT_ACTIVE, SLOT_COUNT, SLOT_FREE, SLOT_SIZE,
};

/// `MY_SLOT` while no slot is held.
const NO_SLOT: usize = usize::MAX;
/// `MY_SLOT` while one thread is claiming a slot for the process.
const CLAIMING: usize = usize::MAX - 1;

/// Attempts a charge makes when it lost a race rather than hit the limit.
const RACE_RETRIES: usize = 16;

/// This process's slot index (per process: reset in a `fork` child).
static MY_SLOT: AtomicUsize = AtomicUsize::new(NO_SLOT);
/// The descriptor whose open file description holds this process's slot lock, where no
/// mapping could hold it (see the module's documentation).
static LOCK_FD: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Why the region could not be used; printed on the refusal line.
#[derive(Debug)]
pub enum LedgerError {
    Open {
        path: String,
        error: std::io::Error,
    },
    Lock {
        path: String,
        error: std::io::Error,
    },
    Create {
        path: String,
        error: std::io::Error,
    },
    Map {
        path: String,
        error: std::io::Error,
    },
    Invalid {
        path: String,
        error: region::RegionError,
    },
    Mismatch {
        path: String,
        region: Vec<String>,
        config: Vec<String>,
    },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LedgerError::Open { path, error } => write!(f, "cannot open region {path}: {error}"),
            LedgerError::Lock { path, error } => write!(f, "cannot lock region {path}: {error}"),
            LedgerError::Create { path, error } => {
                write!(f, "cannot initialise region {path}: {error}")
            }
            LedgerError::Map { path, error } => write!(f, "cannot map region {path}: {error}"),
            LedgerError::Invalid { path, error } => {
                write!(f, "region {path} is not usable: {error}")
            }
            LedgerError::Mismatch {
                path,
                region,
                config,
            } => write!(
                f,
                "region {path} was created for {} but the config asks for {}; a process's limits come only from what its claim was prepared with",
                region.join(", "),
                config.join(", ")
            ),
        }
    }
}

pub struct Ledger {
    path: CString,
    base: *mut u8,
    limits: [u64; MAX_DEVICES],
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Sync for Ledger {}
unsafe impl Send for Ledger {}

impl Ledger {
    /// Opens (creating if absent) and maps the region at `path` for `devices`.
    pub fn open(path: &str, devices: &[RegionDeviceSpec]) -> Result<Ledger, LedgerError> {
        let c_path = CString::new(path).map_err(|_| LedgerError::Open {
            path: path.into(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"),
        })?;
        let fd = open_region(&c_path).map_err(|error| LedgerError::Open {
            path: path.into(),
            error,
        })?;
        let result = Self::map_checked(fd, path, c_path.clone(), devices);
        // SAFETY: our descriptor; slot locks use a descriptor of their own.
        unsafe { libc::close(fd) };
        result
    }

    fn map_checked(
        fd: i32,
        path: &str,
        c_path: CString,
        devices: &[RegionDeviceSpec],
    ) -> Result<Ledger, LedgerError> {
        ofd_lock(fd, CREATE_LOCK.0, CREATE_LOCK.1, true).map_err(|error| LedgerError::Lock {
            path: path.into(),
            error,
        })?;
        let created = initialise_if_empty(fd, devices);
        ofd_unlock(fd, CREATE_LOCK.0, CREATE_LOCK.1);
        created.map_err(|error| LedgerError::Create {
            path: path.into(),
            error,
        })?;

        let mut bytes = vec![0u8; REGION_SIZE];
        // SAFETY: reading into a buffer of exactly REGION_SIZE bytes.
        let read = unsafe { libc::pread(fd, bytes.as_mut_ptr().cast(), REGION_SIZE, 0) };
        bytes.truncate(read.max(0) as usize);
        let snapshot =
            region::RegionSnapshot::parse(&bytes).map_err(|error| LedgerError::Invalid {
                path: path.into(),
                error,
            })?;
        // The plugin writes the claim's limits into the region it creates: a config that asks
        // for other GPUs or other limits (a forged TESSERA_CONFIG naming the claim's region)
        // does not get them.
        if snapshot.devices != devices {
            let describe = |specs: &[RegionDeviceSpec]| -> Vec<String> {
                specs
                    .iter()
                    .map(|d| {
                        format!(
                            "{} (memoryLimit {}, cores {}, contextOverhead {})",
                            d.uuid, d.memory_limit, d.cores, d.context_overhead
                        )
                    })
                    .collect()
            };
            return Err(LedgerError::Mismatch {
                path: path.into(),
                region: describe(&snapshot.devices),
                config: describe(devices),
            });
        }

        // SAFETY: shared mapping of a file of exactly REGION_SIZE bytes (checked by parse).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                REGION_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(LedgerError::Map {
                path: path.into(),
                error: std::io::Error::last_os_error(),
            });
        }
        let mut limits = [0u64; MAX_DEVICES];
        for (limit, device) in limits.iter_mut().zip(devices) {
            *limit = device.memory_limit;
        }
        Ok(Ledger {
            path: c_path,
            base: base.cast(),
            limits,
        })
    }

    /// The claim's compute-limiter arrival time on `device` (see `compute`).
    #[inline(always)]
    pub fn compute_tat(&self, device: usize) -> &std::sync::atomic::AtomicU64 {
        &self.header().devices[device.min(MAX_DEVICES - 1)].compute_tat
    }

    /// GPU time the claim's kernels have taken on `device` so far (see
    /// `RegionDevice::compute_busy_ns`).
    pub fn compute_busy(&self, device: usize) -> &std::sync::atomic::AtomicU64 {
        &self.header().devices[device.min(MAX_DEVICES - 1)].compute_busy_ns
    }

    fn header(&self) -> &RegionHeader {
        // SAFETY: the mapping starts with a RegionHeader and lives as long as self.
        unsafe { &*self.base.cast::<RegionHeader>() }
    }

    fn slot(&self, index: usize) -> &RegionSlot {
        debug_assert!(index < SLOT_COUNT);
        // SAFETY: index < SLOT_COUNT keeps the slot inside the mapping; slots are 64-aligned.
        unsafe {
            &*self
                .base
                .add(region::slot_offset(index))
                .cast::<RegionSlot>()
        }
    }

    fn high_water(&self) -> usize {
        (self.header().slots_high_water.load(Ordering::SeqCst) as usize).min(SLOT_COUNT)
    }

    /// The claim's limit on `device`.
    #[inline(always)]
    pub fn limit(&self, device: usize) -> u64 {
        self.limits.get(device).copied().unwrap_or(0)
    }

    /// Bytes charged on `device` by every process of the claim (dead ones until reclaimed).
    #[inline]
    pub fn used(&self, device: usize) -> u64 {
        if device >= MAX_DEVICES {
            return 0;
        }
        let mut total = 0u64;
        for index in 0..self.high_water() {
            total =
                total.saturating_add(self.slot(index).memory_used[device].load(Ordering::SeqCst));
        }
        total
    }

    /// Charges `bytes` on `device` to this process if the claim stays within its limit.
    #[inline]
    pub fn reserve(&self, device: usize, bytes: u64) -> bool {
        let limit = self.limit(device);
        if bytes > limit {
            return false;
        }
        let Some(mine) = self.my_slot() else {
            return false;
        };
        let counter = &self.slot(mine).memory_used[device];
        for attempt in 0..=RACE_RETRIES {
            counter.fetch_add(bytes, Ordering::SeqCst);
            if self.used(device) <= limit {
                return true;
            }
            counter.fetch_sub(bytes, Ordering::SeqCst);
            // Over the limit: either truly full, or a racing charge that will roll back.
            if self.used(device).saturating_add(bytes) > limit {
                if attempt == 0 && self.reclaim_dead(mine) {
                    continue;
                }
                return false;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Gives back `bytes` on `device` that this process charged.
    #[inline]
    pub fn release(&self, device: usize, bytes: u64) {
        let mine = MY_SLOT.load(Ordering::Relaxed);
        if mine >= SLOT_COUNT || device >= MAX_DEVICES {
            return;
        }
        let counter = &self.slot(mine).memory_used[device];
        // Saturating: a counter never wraps below zero, whatever a caller does.
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            Some(v.saturating_sub(bytes))
        });
    }

    /// Bytes spilled to host memory on `device` by every process of the claim (a part of
    /// [`used`](Self::used)).
    pub fn spilled(&self, device: usize) -> u64 {
        if device >= MAX_DEVICES {
            return 0;
        }
        let mut total = 0u64;
        for index in 0..self.high_water() {
            total = total
                .saturating_add(self.slot(index).memory_spilled[device].load(Ordering::SeqCst));
        }
        total
    }

    /// Records `bytes` already charged on `device` as spilled, if the claim's spilled bytes
    /// stay within `limit` ("add then sum", as [`reserve`](Self::reserve)).
    pub fn reserve_spill(&self, device: usize, bytes: u64, limit: u64) -> bool {
        let mine = MY_SLOT.load(Ordering::Relaxed);
        if mine >= SLOT_COUNT || device >= MAX_DEVICES || bytes > limit {
            return false;
        }
        let counter = &self.slot(mine).memory_spilled[device];
        counter.fetch_add(bytes, Ordering::SeqCst);
        if self.spilled(device) <= limit {
            return true;
        }
        counter.fetch_sub(bytes, Ordering::SeqCst);
        false
    }

    /// Gives back `bytes` this process recorded as spilled on `device`.
    pub fn release_spill(&self, device: usize, bytes: u64) {
        let mine = MY_SLOT.load(Ordering::Relaxed);
        if mine >= SLOT_COUNT || device >= MAX_DEVICES {
            return;
        }
        let _ = self.slot(mine).memory_spilled[device].fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |v| Some(v.saturating_sub(bytes)),
        );
    }

    /// Counts a context this process created on `device` (for metrics).
    pub fn count_context(&self, device: usize, delta: i32) {
        let mine = MY_SLOT.load(Ordering::Relaxed);
        if mine >= SLOT_COUNT || device >= MAX_DEVICES {
            return;
        }
        let counter = &self.slot(mine).contexts[device];
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
            Some(v.saturating_add_signed(delta))
        });
    }

    /// This process's slot, claiming one on first use.
    #[inline(always)]
    fn my_slot(&self) -> Option<usize> {
        let mine = MY_SLOT.load(Ordering::Relaxed);
        if mine < SLOT_COUNT {
            return Some(mine);
        }
        self.claim_slot()
    }

    #[cold]
    fn claim_slot(&self) -> Option<usize> {
        loop {
            match MY_SLOT.compare_exchange(NO_SLOT, CLAIMING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(index) if index < SLOT_COUNT => return Some(index),
                // Another thread is claiming; wait for it.
                Err(_) => std::thread::yield_now(),
            }
        }
        let claimed = self.claim_free_slot();
        MY_SLOT.store(claimed.unwrap_or(NO_SLOT), Ordering::Release);
        if claimed.is_none() {
            crate::report::line(format_args!(
                "all {SLOT_COUNT} process slots of region {} are taken; refusing GPU memory",
                self.path.to_string_lossy()
            ));
        }
        claimed
    }

    fn claim_free_slot(&self) -> Option<usize> {
        // A descriptor of our own: its open file description is what holds the lock, and a
        // fork child closes its inherited copy without releasing the parent's lock.
        let fd = open_region(&self.path).ok()?;
        for index in 0..SLOT_COUNT {
            let offset = region::slot_offset(index);
            if ofd_lock(fd, offset, SLOT_SIZE, false).is_err() {
                continue;
            }
            let slot = self.slot(index);
            // Whatever the counters hold belonged to a dead owner.
            zero_slot(slot);
            slot.pid.store(std::process::id(), Ordering::SeqCst);
            slot.generation.fetch_add(1, Ordering::SeqCst);
            slot.state.store(SLOT_ACTIVE, Ordering::SeqCst);
            self.header()
                .slots_high_water
                .fetch_max(index as u32 + 1, Ordering::SeqCst);
            if !hold_by_mapping(fd) {
                LOCK_FD.store(fd as usize, Ordering::Release);
            }
            return Some(index);
        }
        // SAFETY: our descriptor, holding no lock.
        unsafe { libc::close(fd) };
        None
    }

    /// Reclaims the slots of dead processes (before reporting usage to a person).
    pub fn reclaim_dead_slots(&self) {
        self.reclaim_dead(MY_SLOT.load(Ordering::Relaxed));
    }

    /// Frees the counters of slots whose owner died. True if any bytes came back.
    #[cold]
    fn reclaim_dead(&self, mine: usize) -> bool {
        let Ok(fd) = open_region(&self.path) else {
            return false;
        };
        let mut reclaimed = false;
        for index in 0..self.high_water() {
            let slot = self.slot(index);
            if index == mine || slot.state.load(Ordering::SeqCst) != SLOT_ACTIVE {
                continue;
            }
            let offset = region::slot_offset(index);
            if ofd_lock(fd, offset, SLOT_SIZE, false).is_err() {
                continue; // alive
            }
            reclaimed |= slot
                .memory_used
                .iter()
                .any(|c| c.load(Ordering::SeqCst) != 0);
            zero_slot(slot);
            slot.state.store(SLOT_FREE, Ordering::SeqCst);
            ofd_unlock(fd, offset, SLOT_SIZE);
        }
        // SAFETY: our descriptor; closing it drops only the locks taken through it.
        unsafe { libc::close(fd) };
        reclaimed
    }
}

/// Forgets this process's slot in a `fork` child: the parent still owns it. Only
/// async-signal-safe work here (atomic stores and `close`).
pub fn forget_slot_after_fork() {
    let fd = LOCK_FD.swap(usize::MAX, Ordering::AcqRel);
    if fd != usize::MAX {
        // SAFETY: closing the child's copy of the descriptor leaves the parent's open file
        // description, and so its lock, in place.
        unsafe { libc::close(fd as i32) };
    }
    MY_SLOT.store(NO_SLOT, Ordering::Release);
}

/// Makes a private mapping of one page of the region through `fd` hold `fd`'s open file
/// description, and so its slot lock, for the rest of this process image, then closes `fd`.
/// False (and `fd` left open) where it cannot.
fn hold_by_mapping(fd: i32) -> bool {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => return false,
    };
    // SAFETY: a new read-only shared mapping of our own descriptor, at an address the kernel
    // picks; the region is larger than a page.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: the mapping just made; a child that inherited it would keep the parent's lock.
    if unsafe { libc::madvise(map, page, libc::MADV_DONTFORK) } != 0 {
        // SAFETY: the mapping just made, used by nothing else.
        unsafe { libc::munmap(map, page) };
        return false;
    }
    // SAFETY: our descriptor; the mapping keeps its open file description, lock included.
    unsafe { libc::close(fd) };
    true
}

fn zero_slot(slot: &RegionSlot) {
    for counter in slot.memory_used.iter().chain(slot.memory_spilled.iter()) {
        counter.store(0, Ordering::SeqCst);
    }
    for counter in &slot.contexts {
        counter.store(0, Ordering::SeqCst);
    }
}

fn open_region(path: &CString) -> std::io::Result<i32> {
    // SAFETY: NUL-terminated path; flags are plain constants.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o666,
        )
    };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

/// Writes a fresh region into an empty file; leaves an existing one alone.
fn initialise_if_empty(fd: i32, devices: &[RegionDeviceSpec]) -> std::io::Result<()> {
    // SAFETY: fstat into a zeroed struct.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if stat.st_size != 0 {
        return Ok(());
    }
    let bytes = region::encode_new(devices)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut written = 0usize;
    while written < bytes.len() {
        // SAFETY: writing from a live buffer within its bounds.
        let n = unsafe {
            libc::pwrite(
                fd,
                bytes[written..].as_ptr().cast(),
                bytes.len() - written,
                written as libc::off_t,
            )
        };
        if n <= 0 {
            let error = std::io::Error::last_os_error();
            // Leave no half-written region behind to be mistaken for a valid one.
            // SAFETY: truncating our own descriptor.
            unsafe { libc::ftruncate(fd, 0) };
            return Err(error);
        }
        written += n as usize;
    }
    Ok(())
}

fn flock(kind: i32, offset: usize, len: usize) -> libc::flock {
    // SAFETY: flock is plain data; l_pid must be 0 for OFD locks.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = offset as libc::off_t;
    lock.l_len = len as libc::off_t;
    lock
}

/// Takes a write lock owned by `fd`'s open file description; `wait` blocks until it is free.
fn ofd_lock(fd: i32, offset: usize, len: usize, wait: bool) -> std::io::Result<()> {
    let lock = flock(libc::F_WRLCK, offset, len);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl with a valid flock.
        if unsafe { libc::fcntl(fd, cmd, &lock) } == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn ofd_unlock(fd: i32, offset: usize, len: usize) {
    let lock = flock(libc::F_UNLCK, offset, len);
    // SAFETY: fcntl with a valid flock.
    unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &lock) };
}
