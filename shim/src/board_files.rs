//! The files through which the claims on one GPU see each other (`tessera_api::board`): the
//! claim's own entry, mapped read-write, and the other claims' entries, read with `pread` and
//! never mapped — a claim may truncate or grow its own files, and a mapping of them would then
//! fault its readers (`SIGBUS`).

use std::cell::UnsafeCell;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tessera_api::Priority;
use tessera_api::board::{
    BOARDS_DIR, ENTRY_SIZE, EntryKind, OWN_BOARD_DIR, entry_file_name, is_board_name,
    own_entry_file_name,
};

/// How often a GPU's directory is listed again.
pub(crate) const RESCAN_NS: u64 = 100_000_000;
/// Neighbours read at most (a GPU shared by more claims than this is not a real case).
const MAX_NEIGHBOURS: usize = 1024;

/// Where this claim's entries and its neighbours' are.
pub struct BoardPaths {
    /// Every claim's entries, a directory per GPU.
    all: String,
    /// The claim's own entries (`<UUID>.<kind>`), where the plugin mounted them; `None` in the
    /// development layout, where they are `<all>/<UUID>/<owner>.<kind>` and the shim creates them.
    own_dir: Option<String>,
    /// The claim's name on the board: its UID.
    owner: String,
    /// Its priority, in its compute entry's name in the development layout.
    priority: Priority,
}

impl BoardPaths {
    /// The mounted layout when the plugin's mounts are there, else the development layout in
    /// `named` (`TESSERA_BOARD`); `None` without either, or for an owner that cannot name a file.
    pub fn resolve(named: Option<String>, owner: &str, priority: Priority) -> Option<BoardPaths> {
        if !is_board_name(owner) {
            return None;
        }
        let (all, own_dir) = if std::path::Path::new(BOARDS_DIR).exists() {
            (BOARDS_DIR.to_string(), Some(OWN_BOARD_DIR.to_string()))
        } else {
            (named?, None)
        };
        Some(BoardPaths {
            all,
            own_dir,
            owner: owner.to_string(),
            priority,
        })
    }

    /// Maps the claim's own `kind` entry of GPU `uuid` (see [`OwnEntry`]).
    pub fn own(&self, uuid: &str, kind: EntryKind) -> Option<OwnEntry> {
        if !is_board_name(uuid) {
            return None;
        }
        match &self.own_dir {
            Some(dir) => {
                OwnEntry::map(&format!("{dir}/{}", own_entry_file_name(uuid, kind)), false)
            }
            None => {
                let dir = format!("{}/{uuid}", self.all);
                create_shared_dir(&dir)?;
                OwnEntry::map(
                    &format!(
                        "{dir}/{}",
                        entry_file_name(&self.owner, kind, self.priority)
                    ),
                    true,
                )
            }
        }
    }

    /// The other claims' `kind` entries on GPU `uuid`.
    pub fn neighbours(&self, uuid: &str, kind: EntryKind) -> Neighbours {
        Neighbours {
            dir: format!("{}/{uuid}", self.all),
            own_name: entry_file_name(&self.owner, kind, self.priority),
            suffix: kind.suffix(),
            listing: Listing {
                busy: AtomicBool::new(false),
                listed_at: AtomicU64::new(0),
                names: UnsafeCell::new(Vec::new()),
            },
        }
    }
}

/// The development layout's GPU directory: any process of any user may add its entry.
fn create_shared_dir(dir: &str) -> Option<()> {
    let path = CString::new(dir).ok()?;
    // SAFETY: a NUL-terminated path. EEXIST is fine; anything else shows in the open below.
    unsafe {
        libc::mkdir(path.as_ptr(), 0o1777);
        libc::chmod(path.as_ptr(), 0o1777);
    }
    Some(())
}

/// The claim's own entry: `ENTRY_SIZE` bytes mapped shared and read-write. The descriptor stays
/// open (memory entries hold their liveness lock on it).
pub struct OwnEntry {
    pub fd: i32,
    pub base: *mut u8,
}

// SAFETY: a shared mapping accessed only through atomics; the descriptor is only used for locks.
unsafe impl Send for OwnEntry {}
unsafe impl Sync for OwnEntry {}

impl OwnEntry {
    /// Opens `path` (creating it, mode 0666, when `create`), grows it to an entry if it is
    /// shorter and maps the entry. `None` when any step fails, with nothing left open.
    fn map(path: &str, create: bool) -> Option<OwnEntry> {
        let path = CString::new(path).ok()?;
        let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        let flags = if create { flags | libc::O_CREAT } else { flags };
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(path.as_ptr(), flags, 0o666) };
        if fd < 0 {
            return None;
        }
        if create {
            // SAFETY: our descriptor; processes of other users of the claim join it.
            unsafe { libc::fchmod(fd, 0o666) };
        }
        // The size by seeking rather than fstat: `fstat` is not a dynamic symbol before glibc
        // 2.33, and the shim must load into old images.
        // SAFETY: our descriptor.
        let current = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        let sized = current >= ENTRY_SIZE as libc::off_t
            // SAFETY: our descriptor.
            || (current >= 0 && unsafe { libc::ftruncate(fd, ENTRY_SIZE as libc::off_t) } == 0);
        let base = if sized {
            // SAFETY: a shared mapping of an entry of a file at least that long.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ENTRY_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            }
        } else {
            libc::MAP_FAILED
        };
        if base == libc::MAP_FAILED {
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
            return None;
        }
        Some(OwnEntry {
            fd,
            base: base.cast(),
        })
    }
}

impl Drop for OwnEntry {
    fn drop(&mut self) {
        // SAFETY: the mapping and descriptor made in map.
        unsafe {
            libc::munmap(self.base.cast(), ENTRY_SIZE);
            libc::close(self.fd);
        }
    }
}

/// The other claims' entries of one kind on one GPU.
pub struct Neighbours {
    dir: String,
    own_name: String,
    suffix: &'static str,
    listing: Listing,
}

/// The GPU directory's entry files as last listed. `busy` is taken without waiting (the shim
/// takes no blocking lock on a hook path): a thread that finds it taken lists the directory
/// itself, so nobody waits and nobody reads a list being rewritten.
struct Listing {
    busy: AtomicBool,
    /// When the names were listed (coarse ns; 0 = never). Touched only by `busy`'s holder.
    listed_at: AtomicU64,
    names: UnsafeCell<Vec<String>>,
}

// SAFETY: `names` is read and written only by the thread that holds `busy`.
unsafe impl Sync for Listing {}

impl Neighbours {
    /// Calls `f` with each neighbour's file name, entry and a descriptor of the file (valid
    /// during the call, for lock queries). The GPU's directory is listed at most every
    /// `RESCAN_NS` (entry files are created when a claim is prepared, long before its processes
    /// publish anything, and removed when it is unprepared); each file is opened without
    /// following links or waiting, read for one entry, and closed: short or unreadable ones are
    /// skipped, whatever their owners did. No descriptor is kept, so a program that closes
    /// descriptors it did not open cannot make this read the wrong file. `now` is the caller's
    /// clock, on which the rescans are timed (the compute limiter's runs on the fake GPU's
    /// virtual time).
    pub fn visit(&self, now: u64, mut f: impl FnMut(&str, &[u8; ENTRY_SIZE], i32)) {
        let listing = &self.listing;
        if listing
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            for name in self.list() {
                self.read(&name, &mut f);
            }
            return;
        }
        // SAFETY: `busy` is ours until the store below.
        let names = unsafe { &mut *listing.names.get() };
        let at = listing.listed_at.load(Ordering::Relaxed);
        if at == 0 || now < at || now - at >= RESCAN_NS {
            *names = self.list();
            listing.listed_at.store(now.max(1), Ordering::Relaxed);
        }
        for name in names.iter() {
            self.read(name, &mut f);
        }
        listing.busy.store(false, Ordering::Release);
    }

    fn read(&self, name: &str, f: &mut impl FnMut(&str, &[u8; ENTRY_SIZE], i32)) {
        let Ok(path) = CString::new(format!("{}/{name}", self.dir)) else {
            return;
        };
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            )
        };
        if fd < 0 {
            return;
        }
        let mut entry = [0u8; ENTRY_SIZE];
        // SAFETY: reading into a buffer of exactly ENTRY_SIZE bytes from our descriptor.
        let read = unsafe { libc::pread(fd, entry.as_mut_ptr().cast(), ENTRY_SIZE, 0) };
        if read == ENTRY_SIZE as isize {
            f(name, &entry, fd);
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
    }

    fn list(&self) -> Vec<String> {
        let Ok(listing) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        listing
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| {
                name.ends_with(self.suffix) && *name != self.own_name && is_board_name(name)
            })
            .take(MAX_NEIGHBOURS)
            .collect()
    }
}

/// A coarse monotonic clock in ns (never 0): real time, not the fake driver's clock.
pub fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; a vDSO read.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
        .max(1)
}
