//! A lock-free, fixed-capacity map from a driver handle (device pointer, VMM handle, array,
//! context) to what it was charged: needed because a free names only the pointer.
//!
//! Open addressing with linear probing over an anonymous mapping reserved once at start-up, so
//! inserts and removals are a hash and a few compare-and-swaps: no allocation, no lock. Keys are
//! unique while live (the driver never hands out a live address twice), which is what makes
//! tombstone reuse safe. The mapping is `MAP_NORESERVE`: untouched entries cost no memory.

use std::sync::atomic::{AtomicU64, Ordering};

const EMPTY: u64 = 0;
const TOMBSTONE: u64 = u64::MAX;
/// Longest probe sequence before the table counts as full.
const MAX_PROBE: usize = 2048;
/// Bits of a packed value that hold the byte count; the top byte holds the device index.
const BYTES_BITS: u32 = 56;

#[repr(C)]
struct Entry {
    key: AtomicU64,
    value: AtomicU64,
}

/// What an entry records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Charge {
    pub bytes: u64,
    pub device: usize,
}

impl Charge {
    fn pack(self) -> Option<u64> {
        if self.bytes >> BYTES_BITS != 0 || self.device > 0xff {
            return None;
        }
        Some(self.bytes | (self.device as u64) << BYTES_BITS)
    }

    fn unpack(value: u64) -> Charge {
        Charge {
            bytes: value & ((1 << BYTES_BITS) - 1),
            device: (value >> BYTES_BITS) as usize,
        }
    }
}

pub struct PtrTable {
    entries: *mut Entry,
    capacity: usize,
}

// SAFETY: all access to `entries` is through atomics.
unsafe impl Sync for PtrTable {}
unsafe impl Send for PtrTable {}

impl PtrTable {
    /// Reserves a table of `capacity` entries (a power of two).
    pub fn new(capacity: usize) -> Option<PtrTable> {
        debug_assert!(capacity.is_power_of_two());
        let len = capacity * size_of::<Entry>();
        // SAFETY: anonymous private mapping; checked for failure below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(PtrTable {
            entries: ptr.cast(),
            capacity,
        })
    }

    #[inline(always)]
    fn entry(&self, index: usize) -> &Entry {
        // SAFETY: index is masked to capacity; the mapping lives as long as the table.
        unsafe { &*self.entries.add(index & (self.capacity - 1)) }
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        // Fibonacci hashing spreads aligned addresses, whose low bits are all zero.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize
    }

    /// Records `charge` for `key`. False when the key is not representable or the table is full.
    #[inline]
    pub fn insert(&self, key: u64, charge: Charge) -> bool {
        let Some(value) = charge.pack() else {
            return false;
        };
        if key == EMPTY || key == TOMBSTONE {
            return false;
        }
        let home = self.home(key);
        for probe in 0..MAX_PROBE.min(self.capacity) {
            let entry = self.entry(home + probe);
            let current = entry.key.load(Ordering::Acquire);
            if current != EMPTY && current != TOMBSTONE {
                continue;
            }
            if entry
                .key
                .compare_exchange(current, key, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                // Written after the key is claimed so two inserters never mix values. No reader
                // can look for `key` yet: the caller has not handed the pointer out.
                entry.value.store(value, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Removes `key`, answering what it was charged, or `None` if it was never recorded.
    #[inline]
    pub fn remove(&self, key: u64) -> Option<Charge> {
        if key == EMPTY || key == TOMBSTONE {
            return None;
        }
        let home = self.home(key);
        for probe in 0..MAX_PROBE.min(self.capacity) {
            let entry = self.entry(home + probe);
            let current = entry.key.load(Ordering::Acquire);
            if current == EMPTY {
                return None;
            }
            if current != key {
                continue;
            }
            let value = entry.value.load(Ordering::Acquire);
            if entry
                .key
                .compare_exchange(key, TOMBSTONE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(Charge::unpack(value));
            }
            // Another thread freed the same pointer concurrently (a double free): only one of
            // them uncharges.
            return None;
        }
        None
    }

    /// Drops every entry without touching memory that was never written: used in a `fork`
    /// child, whose parent's allocations are not its own.
    pub fn clear(&self) {
        let len = self.capacity * size_of::<Entry>();
        // SAFETY: our own private anonymous mapping; MADV_DONTNEED makes its pages read as zero
        // (EMPTY). Only called in a single-threaded fork child.
        unsafe { libc::madvise(self.entries.cast(), len, libc::MADV_DONTNEED) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(bytes: u64) -> Charge {
        Charge { bytes, device: 3 }
    }

    #[test]
    fn insert_remove_round_trip() {
        let table = PtrTable::new(1024).expect("mmap");
        assert!(table.insert(0x7f00_0000_0000, charge(4096)));
        assert!(table.insert(0x7f00_0020_0000, charge(1)));
        assert_eq!(table.remove(0x7f00_0000_0000), Some(charge(4096)));
        assert_eq!(
            table.remove(0x7f00_0000_0000),
            None,
            "second free is unknown"
        );
        assert_eq!(table.remove(0x1234), None, "never allocated");
        assert_eq!(table.remove(0x7f00_0020_0000), Some(charge(1)));
    }

    #[test]
    fn tombstones_are_reused_and_probes_stay_bounded() {
        let table = PtrTable::new(64).expect("mmap");
        for round in 0..1000u64 {
            let keys: Vec<u64> = (1..=48).map(|i| (round << 20) | (i << 8)).collect();
            for &k in &keys {
                assert!(table.insert(k, charge(k)), "round {round}");
            }
            for &k in &keys {
                assert_eq!(table.remove(k), Some(charge(k)));
            }
        }
    }

    #[test]
    fn full_table_refuses_and_clear_empties() {
        let table = PtrTable::new(16).expect("mmap");
        for i in 1..=16u64 {
            assert!(table.insert(i << 12, charge(i)));
        }
        assert!(!table.insert(17 << 12, charge(17)));
        table.clear();
        assert_eq!(table.remove(1 << 12), None);
        assert!(table.insert(17 << 12, charge(17)));
    }

    #[test]
    fn unrepresentable_charges_are_refused() {
        let table = PtrTable::new(16).expect("mmap");
        assert!(!table.insert(
            0x1000,
            Charge {
                bytes: 1 << 60,
                device: 0
            }
        ));
        assert!(!table.insert(
            0x1000,
            Charge {
                bytes: 1,
                device: 300
            }
        ));
    }

    #[test]
    fn concurrent_threads_never_lose_entries() {
        let table = std::sync::Arc::new(PtrTable::new(1 << 14).expect("mmap"));
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for i in 1..=2000u64 {
                        let key = (t << 40) | (i << 8);
                        assert!(table.insert(key, charge(i)));
                        assert_eq!(table.remove(key), Some(charge(i)));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
    }
}
