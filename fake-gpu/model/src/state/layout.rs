//! The byte layout of the shared state file, `repr(C)` and versioned.
//!
//! ```text
//! 0      Header            (one page; fixed fields, then reserved words)
//! 4096   DeviceRecord × MAX_DEVICES
//!        SlotRecord   × MAX_SLOTS
//!        LimitTable        (a live count, then LimitRecord × MAX_LIMITS)
//!        SlotCgroups  × MAX_SLOTS
//! ```
//!
//! Everything after the header is atomics, shared by every process that maps the file. The
//! header is written once, by the first process, while it holds the file alone (see
//! `super::Region::open`), and only read afterwards.
//!
//! Layout version 2 added the virtual clock (see `super::clock`): per device, where its queued
//! kernels end and how much kernel time it ran; per process, its virtual time, its lockstep
//! horizon and heartbeat, and its kernel time per device. A process that finds a version it does
//! not know refuses the file with a message rather than misreading it.
//!
//! Layout version 3 added NVML 13.4's per-cgroup device-memory limits (see `super::limits`):
//! the limit table, and per slot the hashes of the cgroup directories its process is in (see
//! `crate::cgroup`).

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::config::MAX_DEVICES;

pub const MAGIC: [u8; 8] = *b"FAKEGPU\0";
/// Bump when any offset or record changes meaning.
pub const LAYOUT_VERSION: u32 = 3;
/// Processes that can use one fake node at the same time.
pub const MAX_SLOTS: usize = 1024;
/// (device, cgroup) pairs that can have memory limits at the same time.
pub const MAX_LIMITS: usize = 64;
/// The longest canonical cgroup directory path a limit can name, in bytes.
pub const MAX_LIMIT_PATH: usize = 512;
/// Cgroup directories (a process's own and their ancestors) one slot can record.
pub const MAX_CGROUP_HASHES: usize = 127;

pub const HEADER_SIZE: usize = 4096;
pub const DEVICES_OFFSET: usize = HEADER_SIZE;
pub const SLOTS_OFFSET: usize = DEVICES_OFFSET + MAX_DEVICES * size_of::<DeviceRecord>();
pub const LIMITS_OFFSET: usize = SLOTS_OFFSET + MAX_SLOTS * size_of::<SlotRecord>();
pub const CGROUPS_OFFSET: usize = LIMITS_OFFSET + size_of::<LimitTable>();
pub const FILE_SIZE: usize = CGROUPS_OFFSET + MAX_SLOTS * size_of::<SlotCgroups>();

/// Byte ranges used only as `fcntl` lock targets (a lock may cover bytes that hold data; the
/// kernel does not care). Kept apart from the layout so that lock protocol and data layout can
/// change independently.
pub const LOCK_INIT: i64 = 0;
pub const LOCK_USERS: i64 = 1;
/// Held (exclusively) while the limit table is changed, and while a process bound by a limit
/// checks it and reserves, so that processes under one limit cannot race past it together.
pub const LOCK_LIMITS: i64 = 2;
pub const LOCK_SLOT_BASE: i64 = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 8],
    pub layout_version: u32,
    pub header_size: u32,
    pub device_count: u32,
    pub slot_count: u32,
    pub device_record_size: u32,
    pub slot_record_size: u32,
    pub devices_offset: u64,
    pub slots_offset: u64,
    /// Where a virtual-clock section starts; 0 = none (layout version 1).
    pub clock_offset: u64,
    pub clock_size: u64,
    pub file_size: u64,
    /// `Config::fingerprint` of the config the file was created for.
    pub config_fingerprint: u64,
    pub limits_offset: u64,
    pub limit_record_size: u32,
    pub limit_count: u32,
    pub cgroups_offset: u64,
    pub cgroups_record_size: u32,
    pub cgroup_hashes: u32,
    pub reserved: [u64; 12],
}

impl Header {
    pub fn for_config(device_count: usize, fingerprint: u64) -> Self {
        Self {
            magic: MAGIC,
            layout_version: LAYOUT_VERSION,
            header_size: HEADER_SIZE as u32,
            device_count: device_count as u32,
            slot_count: MAX_SLOTS as u32,
            device_record_size: size_of::<DeviceRecord>() as u32,
            slot_record_size: size_of::<SlotRecord>() as u32,
            devices_offset: DEVICES_OFFSET as u64,
            slots_offset: SLOTS_OFFSET as u64,
            clock_offset: 0,
            clock_size: 0,
            file_size: FILE_SIZE as u64,
            config_fingerprint: fingerprint,
            limits_offset: LIMITS_OFFSET as u64,
            limit_record_size: size_of::<LimitRecord>() as u32,
            limit_count: MAX_LIMITS as u32,
            cgroups_offset: CGROUPS_OFFSET as u64,
            cgroups_record_size: size_of::<SlotCgroups>() as u32,
            cgroup_hashes: MAX_CGROUP_HASHES as u32,
            reserved: [0; 12],
        }
    }
}

/// One GPU's physical state, summed over every process.
#[repr(C, align(64))]
pub struct DeviceRecord {
    /// The card's memory; written at initialisation.
    pub capacity: AtomicU64,
    /// Device memory in use (plain, pitched, async/pool, VMM, arrays, context overhead). Only
    /// ever at most `capacity`: reservations compare-and-swap against it.
    pub used: AtomicU64,
    /// Managed (unified) memory in use; host-backed, not limited by `capacity`.
    pub managed: AtomicU64,
    /// Virtual time at which the last kernel queued on the device ends: kernels run one after
    /// another, each holding the SMs for its duration.
    pub busy_until: AtomicU64,
    /// Kernel time the device has run, every process.
    pub busy_total: AtomicU64,
    /// The latest virtual time any process has reached (a newcomer starts there).
    pub frontier: AtomicU64,
    pub reserved: [AtomicU64; 10],
}

/// Slot states.
pub const SLOT_FREE: u32 = 0;
pub const SLOT_ACTIVE: u32 = 1;

/// One process's share. Its owner holds an `fcntl` write lock on byte
/// `LOCK_SLOT_BASE + index` for as long as it lives; whoever can take that lock knows the owner
/// is dead and may return its memory to the devices.
#[repr(C, align(64))]
pub struct SlotRecord {
    pub state: AtomicU32,
    /// The owner's PID as the owner sees it (in its own PID namespace).
    pub pid: AtomicU32,
    /// Incremented at every claim, so a reader can tell a reused slot from a long-lived one.
    pub generation: AtomicU64,
    /// Bit `d` set while the process has an active context on device `d` (NVML lists it).
    pub devices_open: AtomicU64,
    /// The process's virtual time (host code takes none; kernels, synchronisation and sleeps
    /// move it).
    pub clock: AtomicU64,
    /// The virtual time before which the process will do nothing: its clock while it runs, the
    /// time it waits for while it waits. Others may run up to it (see `super::clock`).
    pub horizon: AtomicU64,
    /// Monotonic wall-clock milliseconds of its last clock activity; 0 = not in the lockstep.
    pub heartbeat: AtomicU64,
    pub reserved: [AtomicU64; 2],
    pub used: [AtomicU64; MAX_DEVICES],
    pub managed: [AtomicU64; MAX_DEVICES],
    /// Kernel time this process ran, per device.
    pub busy: [AtomicU64; MAX_DEVICES],
}

/// Limit record states.
pub const LIMIT_FREE: u32 = 0;
pub const LIMIT_LIVE: u32 = 1;

/// The node's per-cgroup device-memory limits. Changed only under `LOCK_LIMITS`; read without it
/// by a process deciding whether it needs the lock at all.
#[repr(C, align(64))]
pub struct LimitTable {
    /// Live records. Zero on a node without limits, which keeps every reservation to one load.
    pub live: AtomicU64,
    pub reserved: [AtomicU64; 7],
    pub records: [LimitRecord; MAX_LIMITS],
}

/// One (device, cgroup directory) pair's limits.
#[repr(C, align(64))]
pub struct LimitRecord {
    pub state: AtomicU32,
    /// NVML index.
    pub device: AtomicU32,
    pub path_len: AtomicU32,
    pub reserved0: AtomicU32,
    /// Reported, not enforced (the real driver guarantees it under memory pressure, which the
    /// fake does not model).
    pub soft: AtomicU64,
    /// The wall; `u64::MAX` is none.
    pub hard: AtomicU64,
    /// `crate::cgroup::key_of` the directory, what slots' cgroup sets hold.
    pub path_hash: AtomicU64,
    /// The directory's identity when the limit was set: a directory removed (which clears its
    /// limits) and made again under the same name is another cgroup.
    pub dir_dev: AtomicU64,
    pub dir_ino: AtomicU64,
    pub reserved: [AtomicU64; 1],
    /// The canonical path's bytes, packed little-endian, `path_len` of them.
    pub path: [AtomicU64; MAX_LIMIT_PATH / 8],
}

/// The cgroup set of the process in the slot of the same index (see `crate::cgroup`), written
/// when the slot is claimed, before it becomes active.
#[repr(C, align(64))]
pub struct SlotCgroups {
    pub count: AtomicU64,
    pub hashes: [AtomicU64; MAX_CGROUP_HASHES],
}

const _: () = {
    assert!(size_of::<Header>() <= HEADER_SIZE);
    assert!(size_of::<LimitRecord>() == 576);
    assert!(size_of::<SlotCgroups>() == 1024);
    assert!(LIMITS_OFFSET.is_multiple_of(64) && CGROUPS_OFFSET.is_multiple_of(64));
    assert!(size_of::<DeviceRecord>() == 128);
    assert!(size_of::<SlotRecord>() == 448);
    assert!(SLOTS_OFFSET.is_multiple_of(64));
    assert!(MAX_DEVICES <= 64, "devices_open is a 64-bit mask");
};
