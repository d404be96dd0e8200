//! The per-claim accounting region: a small file every process of a claim maps shared.
//!
//! Layout version 1 (native little-endian, all counters naturally aligned so they can be used as
//! atomics through a shared mapping):
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 4096 | [`RegionHeader`]: magic, version, geometry, the claim's devices and limits |
//! | 4096 + i·384 | 384 | [`RegionSlot`] *i*, one per live process, `i < SLOT_COUNT` |
//!
//! Usage is kept per process slot and summed by readers; there is no global counter a killed
//! process could leave inflated. A process owns its slot for as long as it holds a POSIX record
//! lock (`fcntl(F_SETLK)`) on the slot's byte range: the kernel drops that lock when the process
//! dies however it dies, so a slot whose lock can be taken belongs to nobody and its counters
//! can be reclaimed. PIDs are stored only for display; they differ across PID namespaces.
//! Creating the file is serialised by a lock on [`CREATE_LOCK`].

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::shim_config::ShimConfig;

/// Identifies a Tessera region file.
pub const MAGIC: [u8; 8] = *b"TSSRGN\0\0";
/// The layout version described above.
pub const REGION_VERSION: u32 = 1;
/// Devices a claim may span.
pub const MAX_DEVICES: usize = 16;
/// Bytes reserved for a device UUID, NUL-padded.
pub const UUID_BYTES: usize = 64;
/// Processes that may use one claim at the same time.
pub const SLOT_COUNT: usize = 256;
/// Size of the header.
pub const HEADER_SIZE: usize = 4096;
/// Size of one slot.
pub const SLOT_SIZE: usize = core::mem::size_of::<RegionSlot>();
/// Size of the whole file.
pub const REGION_SIZE: usize = HEADER_SIZE + SLOT_COUNT * SLOT_SIZE;
/// Byte range (offset, length) locked while a region file is being created.
pub const CREATE_LOCK: (usize, usize) = (0, 8);

/// `RegionSlot::state` of a slot no process has claimed since it was last reclaimed.
pub const SLOT_FREE: u32 = 0;
/// `RegionSlot::state` of a slot claimed by a process (live while its lock is held).
pub const SLOT_ACTIVE: u32 = 1;

/// One device of the claim, as recorded in the header.
#[repr(C)]
pub struct RegionDevice {
    /// NUL-padded UUID (`GPU-…`).
    pub uuid: [u8; UUID_BYTES],
    pub memory_limit: u64,
    pub cores: u32,
    pub _pad: u32,
    pub context_overhead: u64,
    /// The compute limiter's theoretical arrival time (ns on the limiter's clock): the claim's
    /// launches so far, each charged its kernel time ÷ share, end here. Shared by every process
    /// of the claim. Zero in a new file, which is the right start, so it lives in what was
    /// reserved space in version 1 without a version change.
    pub compute_tat: AtomicU64,
    /// GPU time the claim's kernels on this device have taken so far (ns, each launch counted
    /// at its measured cost), summed by every process of the claim: the plugin exports it, so
    /// that a claim's achieved share of the GPU can be seen beside its `cores`. Also in what was
    /// reserved space in version 1.
    pub compute_busy_ns: AtomicU64,
    pub _reserved: [u8; 24],
}

/// The first page of the file.
#[repr(C)]
pub struct RegionHeader {
    pub magic: [u8; 8],
    pub version: u32,
    pub header_size: u32,
    pub slot_size: u32,
    pub slot_count: u32,
    pub device_count: u32,
    pub _reserved0: u32,
    /// One past the highest slot index ever claimed: readers sum slots below it only.
    pub slots_high_water: AtomicU32,
    pub _reserved1: [u8; 28],
    pub devices: [RegionDevice; MAX_DEVICES],
    pub _reserved2: [u8; HEADER_SIZE - 64 - MAX_DEVICES * 128],
}

/// One process's usage. Cache-line aligned so processes never share a line they write.
#[repr(C, align(64))]
pub struct RegionSlot {
    pub state: AtomicU32,
    /// PID in the owner's PID namespace, for display only.
    pub pid: AtomicU32,
    /// How many times the slot has been claimed, so readers can tell owners apart.
    pub generation: AtomicU64,
    pub _reserved: [u8; 48],
    /// Device memory charged, per device index of the header.
    pub memory_used: [AtomicU64; MAX_DEVICES],
    /// Bytes served from host memory instead of device memory (oversubscription), per device.
    pub memory_spilled: [AtomicU64; MAX_DEVICES],
    /// Live CUDA contexts, per device.
    pub contexts: [AtomicU32; MAX_DEVICES],
}

const _: () = {
    assert!(core::mem::size_of::<RegionDevice>() == 128);
    assert!(core::mem::size_of::<RegionHeader>() == HEADER_SIZE);
    assert!(core::mem::offset_of!(RegionHeader, slots_high_water) == 32);
    assert!(core::mem::offset_of!(RegionHeader, devices) == 64);
    assert!(core::mem::offset_of!(RegionDevice, compute_tat) == 88);
    assert!(core::mem::offset_of!(RegionDevice, compute_busy_ns) == 96);
    assert!(core::mem::size_of::<RegionSlot>() == 384);
    assert!(core::mem::offset_of!(RegionSlot, memory_used) == 64);
    assert!(core::mem::offset_of!(RegionSlot, memory_spilled) == 192);
    assert!(core::mem::offset_of!(RegionSlot, contexts) == 320);
    assert!(HEADER_SIZE.is_multiple_of(64));
    assert!(cfg!(target_endian = "little"));
};

/// Offset of slot `index` in the file.
pub const fn slot_offset(index: usize) -> usize {
    HEADER_SIZE + index * SLOT_SIZE
}

/// The region's device table as the config describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDeviceSpec {
    pub uuid: String,
    pub memory_limit: u64,
    pub cores: u32,
    pub context_overhead: u64,
}

impl RegionDeviceSpec {
    /// The device table for a claim's config, in config order.
    pub fn from_config(config: &ShimConfig) -> Vec<RegionDeviceSpec> {
        config
            .devices
            .iter()
            .map(|d| RegionDeviceSpec {
                uuid: d.uuid.clone(),
                memory_limit: d.memory_limit,
                cores: d.cores,
                context_overhead: d.context_overhead,
            })
            .collect()
    }
}

/// Why region bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    #[error("region is {found} bytes, expected {REGION_SIZE}")]
    Size { found: usize },
    #[error("region has no Tessera magic (not a region file, or never initialised)")]
    Magic,
    #[error("region layout version {found} is not supported (this build reads {REGION_VERSION})")]
    Version { found: u32 },
    #[error("region geometry (header {header}, slot {slot} × {count}) does not match this build")]
    Geometry { header: u32, slot: u32, count: u32 },
    #[error("region lists {0} devices, at most {MAX_DEVICES} are supported")]
    DeviceCount(u32),
    #[error("too many devices ({0}) for a region")]
    TooManyDevices(usize),
    #[error("device uuid {0:?} does not fit a region")]
    UuidTooLong(String),
}

/// The bytes of a freshly initialised region file for `devices` (all slots free).
pub fn encode_new(devices: &[RegionDeviceSpec]) -> Result<Vec<u8>, RegionError> {
    if devices.len() > MAX_DEVICES {
        return Err(RegionError::TooManyDevices(devices.len()));
    }
    let mut bytes = vec![0u8; REGION_SIZE];
    bytes[0..8].copy_from_slice(&MAGIC);
    put_u32(&mut bytes, 8, REGION_VERSION);
    put_u32(&mut bytes, 12, HEADER_SIZE as u32);
    put_u32(&mut bytes, 16, SLOT_SIZE as u32);
    put_u32(&mut bytes, 20, SLOT_COUNT as u32);
    put_u32(&mut bytes, 24, devices.len() as u32);
    for (i, device) in devices.iter().enumerate() {
        let base = 64 + i * 128;
        let uuid = device.uuid.as_bytes();
        if uuid.len() >= UUID_BYTES {
            return Err(RegionError::UuidTooLong(device.uuid.clone()));
        }
        bytes[base..base + uuid.len()].copy_from_slice(uuid);
        put_u64(&mut bytes, base + 64, device.memory_limit);
        put_u32(&mut bytes, base + 72, device.cores);
        put_u64(&mut bytes, base + 80, device.context_overhead);
    }
    Ok(bytes)
}

/// A point-in-time copy of a region, read without mapping it (the plugin's metrics use this).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSnapshot {
    pub devices: Vec<RegionDeviceSpec>,
    /// Per device: GPU time the claim's kernels have taken so far, ns (`compute_busy_ns`).
    pub compute_busy_ns: Vec<u64>,
    pub slots_high_water: u32,
    pub slots: Vec<SlotSnapshot>,
}

/// One slot of a [`RegionSnapshot`]; only slots that were ever claimed are listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSnapshot {
    pub index: usize,
    pub state: u32,
    pub pid: u32,
    pub generation: u64,
    pub memory_used: Vec<u64>,
    pub memory_spilled: Vec<u64>,
    pub contexts: Vec<u32>,
}

impl RegionSnapshot {
    /// Parses a region file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<RegionSnapshot, RegionError> {
        let header = check_header(bytes)?;
        let device_count = header as usize;
        let devices = (0..device_count)
            .map(|i| {
                let base = 64 + i * 128;
                let raw = &bytes[base..base + UUID_BYTES];
                let end = raw.iter().position(|&b| b == 0).unwrap_or(UUID_BYTES);
                RegionDeviceSpec {
                    uuid: String::from_utf8_lossy(&raw[..end]).into_owned(),
                    memory_limit: get_u64(bytes, base + 64),
                    cores: get_u32(bytes, base + 72),
                    context_overhead: get_u64(bytes, base + 80),
                }
            })
            .collect();
        let slots_high_water = get_u32(bytes, 32).min(SLOT_COUNT as u32);
        let slots = (0..slots_high_water as usize)
            .map(|index| {
                let base = slot_offset(index);
                SlotSnapshot {
                    index,
                    state: get_u32(bytes, base),
                    pid: get_u32(bytes, base + 4),
                    generation: get_u64(bytes, base + 8),
                    memory_used: (0..device_count)
                        .map(|d| get_u64(bytes, base + 64 + d * 8))
                        .collect(),
                    memory_spilled: (0..device_count)
                        .map(|d| get_u64(bytes, base + 192 + d * 8))
                        .collect(),
                    contexts: (0..device_count)
                        .map(|d| get_u32(bytes, base + 320 + d * 4))
                        .collect(),
                }
            })
            .collect();
        let compute_busy_ns = (0..device_count)
            .map(|i| get_u64(bytes, 64 + i * 128 + 96))
            .collect();
        Ok(RegionSnapshot {
            devices,
            compute_busy_ns,
            slots_high_water,
            slots,
        })
    }

    /// Device memory charged on device `index`, summed over `slots` that `is_live` accepts.
    pub fn memory_used(&self, index: usize, is_live: impl Fn(&SlotSnapshot) -> bool) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.state == SLOT_ACTIVE && is_live(s))
            .map(|s| s.memory_used.get(index).copied().unwrap_or(0))
            .fold(0u64, u64::saturating_add)
    }
}

/// Validates the header of `bytes` and returns its device count.
pub fn check_header(bytes: &[u8]) -> Result<u32, RegionError> {
    if bytes.len() != REGION_SIZE {
        return Err(RegionError::Size { found: bytes.len() });
    }
    if bytes[0..8] != MAGIC {
        return Err(RegionError::Magic);
    }
    let version = get_u32(bytes, 8);
    if version != REGION_VERSION {
        return Err(RegionError::Version { found: version });
    }
    let (header, slot, count) = (get_u32(bytes, 12), get_u32(bytes, 16), get_u32(bytes, 20));
    if (header as usize, slot as usize, count as usize) != (HEADER_SIZE, SLOT_SIZE, SLOT_COUNT) {
        return Err(RegionError::Geometry {
            header,
            slot,
            count,
        });
    }
    let devices = get_u32(bytes, 24);
    if devices as usize > MAX_DEVICES {
        return Err(RegionError::DeviceCount(devices));
    }
    Ok(devices)
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(uuid: &str, limit: u64) -> RegionDeviceSpec {
        RegionDeviceSpec {
            uuid: uuid.into(),
            memory_limit: limit,
            cores: 30,
            context_overhead: 7,
        }
    }

    #[test]
    fn new_region_round_trips() {
        let devices = vec![spec("GPU-a", 1 << 30), spec("GPU-b", 2 << 30)];
        let bytes = encode_new(&devices).expect("encodes");
        assert_eq!(bytes.len(), REGION_SIZE);
        let snapshot = RegionSnapshot::parse(&bytes).expect("parses");
        assert_eq!(snapshot.devices, devices);
        assert_eq!(snapshot.slots_high_water, 0);
        assert!(snapshot.slots.is_empty());
    }

    #[test]
    fn sums_only_live_active_slots() {
        let mut bytes = encode_new(&[spec("GPU-a", 1 << 30)]).expect("encodes");
        put_u32(&mut bytes, 32, 3);
        for (i, (state, used)) in [(SLOT_ACTIVE, 100u64), (SLOT_FREE, 50), (SLOT_ACTIVE, 7)]
            .iter()
            .enumerate()
        {
            put_u32(&mut bytes, slot_offset(i), *state);
            put_u64(&mut bytes, slot_offset(i) + 64, *used);
        }
        let snapshot = RegionSnapshot::parse(&bytes).expect("parses");
        assert_eq!(snapshot.memory_used(0, |_| true), 107);
        assert_eq!(snapshot.memory_used(0, |s| s.index != 2), 100);
    }

    #[test]
    fn refuses_foreign_bytes() {
        assert_eq!(
            RegionSnapshot::parse(&[0u8; 10]),
            Err(RegionError::Size { found: 10 })
        );
        assert_eq!(
            RegionSnapshot::parse(&vec![0u8; REGION_SIZE]),
            Err(RegionError::Magic)
        );
        let mut bytes = encode_new(&[]).expect("encodes");
        put_u32(&mut bytes, 8, 9);
        assert_eq!(
            RegionSnapshot::parse(&bytes),
            Err(RegionError::Version { found: 9 })
        );
        assert!(encode_new(&[spec(&"x".repeat(UUID_BYTES), 1)]).is_err());
    }

    /// A tenant can write its claim's region: whatever it puts there, reading it (the plugin's
    /// metrics) never panics, never indexes past the file, and sums without overflow.
    mod hostile_bytes {
        use super::*;
        use proptest::prelude::*;

        fn devices() -> impl Strategy<Value = Vec<RegionDeviceSpec>> {
            proptest::collection::vec(
                ("GPU-[a-f0-9]{1,40}", any::<u64>(), 0u32..=100, any::<u64>()).prop_map(
                    |(uuid, memory_limit, cores, context_overhead)| RegionDeviceSpec {
                        uuid,
                        memory_limit,
                        cores,
                        context_overhead,
                    },
                ),
                1..=MAX_DEVICES,
            )
        }

        fn check(bytes: &[u8]) {
            if let Ok(snapshot) = RegionSnapshot::parse(bytes) {
                assert!(snapshot.devices.len() <= MAX_DEVICES);
                assert!(snapshot.slots.len() <= SLOT_COUNT);
                for index in 0..=snapshot.devices.len() {
                    snapshot.memory_used(index, |_| true);
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_length_and_content(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
                check(&raw);
                // The right size with garbage over the header.
                let mut sized = encode_new(&[spec("GPU-a", 1)]).expect("encodes");
                sized[..raw.len()].copy_from_slice(&raw);
                check(&sized);
            }

            #[test]
            fn any_charges_in_live_slots_sum_without_overflow(
                charges in proptest::collection::vec(any::<u64>(), 1..SLOT_COUNT),
            ) {
                let mut bytes = encode_new(&[spec("GPU-a", 1)]).expect("encodes");
                for (index, charge) in charges.iter().enumerate() {
                    put_u32(&mut bytes, slot_offset(index), SLOT_ACTIVE);
                    put_u64(&mut bytes, slot_offset(index) + 64, *charge);
                }
                put_u32(&mut bytes, 32, charges.len() as u32);
                let snapshot = RegionSnapshot::parse(&bytes).expect("parses");
                let sum = charges.iter().fold(0u64, |a, b| a.saturating_add(*b));
                prop_assert_eq!(snapshot.memory_used(0, |_| true), sum);
            }

            #[test]
            fn a_valid_region_with_any_fields_rewritten(
                devices in devices(),
                writes in proptest::collection::vec((24usize..REGION_SIZE - 8, any::<u64>()), 0..64),
                high_water in any::<u32>(),
                device_count in any::<u32>(),
            ) {
                let mut bytes = encode_new(&devices).expect("encodes");
                for (at, value) in writes {
                    put_u64(&mut bytes, at, value);
                }
                put_u32(&mut bytes, 32, high_water);
                check(&bytes);
                // A device count past what the slots hold is refused, never read past.
                put_u32(&mut bytes, 24, device_count);
                check(&bytes);
            }
        }
    }
}
