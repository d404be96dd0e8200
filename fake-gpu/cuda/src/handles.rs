//! Opaque handles and the tables behind them.
//!
//! A handle is never a pointer to our data: callers pass garbage, stale and mistyped handles, and
//! the real driver answers those with an error rather than crashing. So a handle is
//! `kind << 48 | id` with `id` from one process-wide counter that is never reset (not even in a
//! fork child, whose copied thread-local state may still name the parent's handles), and every
//! use looks it up. Kind tags make a stream passed as an event simply "not found"; as an address
//! the value is non-canonical, so anything that dereferences it faults at once.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Kind {
    Context = 1,
    Stream = 2,
    Event = 3,
    Module = 4,
    Function = 5,
    Array = 6,
    MipmappedArray = 7,
    MemPool = 8,
    Graph = 9,
    GraphNode = 10,
    GraphExec = 11,
    Allocation = 12,
}

const KIND_SHIFT: u32 = 48;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh handle of `kind`.
pub fn new_handle(kind: Kind) -> u64 {
    ((kind as u64) << KIND_SHIFT) | (NEXT_ID.fetch_add(1, Ordering::Relaxed) & ID_MASK)
}

pub fn is_kind(handle: u64, kind: Kind) -> bool {
    handle >> KIND_SHIFT == kind as u64 && handle & ID_MASK != 0
}

/// Converts a C handle (`CUstream`, `CUevent`, …) to its number.
pub fn from_ptr<T>(ptr: *mut T) -> u64 {
    ptr as usize as u64
}

/// Converts a handle number to the C pointer type callers receive.
pub fn to_ptr<T>(handle: u64) -> *mut T {
    handle as usize as *mut T
}

/// Hashes already-unique integers (handles, addresses) cheaply but with the entropy spread to
/// the low bits, which is where the hash table takes its bucket index from.
#[derive(Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(self.0 ^ u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IntMap<V> = HashMap<u64, V, BuildHasherDefault<IntHasher>>;

/// Keeps a shard on its own cache line so that threads working on different shards do not
/// contend on the line.
#[repr(align(64))]
pub struct Padded<T>(pub T);

const SHARDS: usize = 16;

/// Handle → object, sharded so that unrelated handles do not share a lock.
pub struct Registry<T> {
    kind: Kind,
    shards: [Padded<RwLock<IntMap<Arc<T>>>>; SHARDS],
}

impl<T> Registry<T> {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            shards: std::array::from_fn(|_| Padded(RwLock::new(IntMap::default()))),
        }
    }

    fn shard(&self, handle: u64) -> &RwLock<IntMap<Arc<T>>> {
        &self.shards[(handle as usize) % SHARDS].0
    }

    /// Stores the object `make` builds for a new handle, and returns both.
    pub fn insert_with(&self, make: impl FnOnce(u64) -> T) -> (u64, Arc<T>) {
        let handle = new_handle(self.kind);
        let value = Arc::new(make(handle));
        write(self.shard(handle)).insert(handle, Arc::clone(&value));
        (handle, value)
    }

    pub fn get(&self, handle: u64) -> Option<Arc<T>> {
        if !is_kind(handle, self.kind) {
            return None;
        }
        read(self.shard(handle)).get(&handle).cloned()
    }

    pub fn contains(&self, handle: u64) -> bool {
        is_kind(handle, self.kind) && read(self.shard(handle)).contains_key(&handle)
    }

    pub fn remove(&self, handle: u64) -> Option<Arc<T>> {
        if !is_kind(handle, self.kind) {
            return None;
        }
        write(self.shard(handle)).remove(&handle)
    }

    /// Removes and returns every object `doomed` selects (a destroyed context's streams, …).
    pub fn remove_where(&self, doomed: impl Fn(&T) -> bool) -> Vec<Arc<T>> {
        let mut removed = Vec::new();
        for shard in &self.shards {
            write(&shard.0).retain(|_, value| {
                if doomed(value) {
                    removed.push(Arc::clone(value));
                    false
                } else {
                    true
                }
            });
        }
        removed
    }
}

/// Lock helpers that survive poisoning: a panic in one API call (already turned into
/// `CUDA_ERROR_UNKNOWN`) must not make every later call fail.
pub fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

pub fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------

const CHUNK: usize = 1024;
const MAX_CHUNKS: usize = 1024;
const EMPTY: u8 = 0;
const LIVE: u8 = 1;
const DEAD: u8 = 2;

struct Entry<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

/// An append-only table whose lookups take no lock and write no shared memory: the kernel-launch
/// path reads the function table from many threads at once, and a reader-writer lock would make
/// them contend on its counter. Entries are killed, never reused, so a handle's index can be
/// trusted after a bounds and state check; the memory of killed entries is kept (functions are
/// few: one per module and kernel name).
pub struct Slab<T> {
    chunks: [AtomicPtr<Entry<T>>; MAX_CHUNKS],
    next: AtomicUsize,
    kind: Kind,
}

// SAFETY: values are written once before being published with a release store and only read
// (shared) after an acquire load observes LIVE; `T: Sync` makes those shared reads sound.
unsafe impl<T: Send + Sync> Sync for Slab<T> {}
// SAFETY: as above; the slab owns its values.
unsafe impl<T: Send> Send for Slab<T> {}

impl<T> Slab<T> {
    pub fn new(kind: Kind) -> Self {
        Self {
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            next: AtomicUsize::new(0),
            kind,
        }
    }

    fn chunk(&self, index: usize) -> *mut Entry<T> {
        let slot = &self.chunks[index];
        let existing = slot.load(Ordering::Acquire);
        if !existing.is_null() {
            return existing;
        }
        let fresh: Box<[Entry<T>]> = (0..CHUNK)
            .map(|_| Entry {
                state: AtomicU8::new(EMPTY),
                value: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        let fresh = Box::into_raw(fresh).cast::<Entry<T>>();
        match slot.compare_exchange(
            std::ptr::null_mut(),
            fresh,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => fresh,
            Err(winner) => {
                // SAFETY: `fresh` came from `Box::into_raw` of a CHUNK-long slice just above and
                // was never published.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(fresh, CHUNK)) });
                winner
            }
        }
    }

    /// Stores `value` and returns its handle, or `None` when the table is full.
    pub fn insert(&self, value: T) -> Option<u64> {
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        if index >= CHUNK * MAX_CHUNKS {
            return None;
        }
        let chunk = self.chunk(index / CHUNK);
        // SAFETY: `chunk` points to CHUNK live entries; `index` is ours alone (fetch_add), so
        // nobody else writes this entry, and readers ignore it until it is LIVE.
        unsafe {
            let entry = &*chunk.add(index % CHUNK);
            (*entry.value.get()).write(value);
            entry.state.store(LIVE, Ordering::Release);
        }
        Some(((self.kind as u64) << KIND_SHIFT) | (index as u64 + 1))
    }

    fn entry(&self, handle: u64) -> Option<&Entry<T>> {
        if !is_kind(handle, self.kind) {
            return None;
        }
        let index = (handle & ID_MASK) as usize - 1;
        let chunk = self.chunks.get(index / CHUNK)?.load(Ordering::Acquire);
        if chunk.is_null() {
            return None;
        }
        // SAFETY: chunks are CHUNK entries long and never freed while the slab lives.
        Some(unsafe { &*chunk.add(index % CHUNK) })
    }

    /// The live value behind `handle`.
    pub fn get(&self, handle: u64) -> Option<&T> {
        let entry = self.entry(handle)?;
        if entry.state.load(Ordering::Acquire) != LIVE {
            return None;
        }
        // SAFETY: LIVE means the value was fully written before the release store we acquired.
        Some(unsafe { (*entry.value.get()).assume_init_ref() })
    }

    /// Makes `handle` invalid from now on; the value stays allocated (see the type's note).
    pub fn kill(&self, handle: u64) {
        if let Some(entry) = self.entry(handle) {
            let _ = entry
                .state
                .compare_exchange(LIVE, DEAD, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

impl<T> Drop for Slab<T> {
    fn drop(&mut self) {
        for slot in &mut self.chunks {
            let chunk = *slot.get_mut();
            if chunk.is_null() {
                continue;
            }
            // SAFETY: we own the slab exclusively; every chunk came from `Box::into_raw` of a
            // CHUNK-long slice, and entries that are not EMPTY hold initialised values.
            unsafe {
                let entries = Box::from_raw(std::ptr::slice_from_raw_parts_mut(chunk, CHUNK));
                for entry in entries.iter() {
                    if entry.state.load(Ordering::Relaxed) != EMPTY {
                        (*entry.value.get()).assume_init_drop();
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// A counter many threads bump at once without sharing a cache line; reading sums the cells.
pub struct Counter {
    cells: [Padded<AtomicU64>; SHARDS],
}

thread_local! {
    /// This thread's cell; assigned round-robin on first use (no destructor, nothing to free).
    static CELL: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_CELL: AtomicUsize = AtomicUsize::new(0);

impl Counter {
    pub fn new() -> Self {
        Self {
            cells: std::array::from_fn(|_| Padded(AtomicU64::new(0))),
        }
    }

    pub fn add(&self, n: u64) {
        let cell = CELL.with(|cell| {
            if cell.get() == usize::MAX {
                cell.set(NEXT_CELL.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            cell.get()
        });
        self.cells[cell].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.cells.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_their_kind() {
        let stream = new_handle(Kind::Stream);
        assert!(is_kind(stream, Kind::Stream));
        assert!(!is_kind(stream, Kind::Event));
        assert!(!is_kind(0, Kind::Stream));
        assert_ne!(new_handle(Kind::Stream), stream);
    }

    #[test]
    fn registry_lookups_respect_kind_and_removal() {
        let registry = Registry::<u32>::new(Kind::Event);
        let (handle, value) = registry.insert_with(|_| 7);
        assert_eq!(*value, 7);
        assert_eq!(registry.get(handle).as_deref(), Some(&7));
        assert!(
            registry.get(handle ^ (1 << KIND_SHIFT)).is_none(),
            "another kind's tag"
        );
        assert_eq!(registry.remove_where(|v| *v == 7).len(), 1);
        assert!(!registry.contains(handle));
    }

    #[test]
    fn slab_entries_die_and_stay_dead() {
        let slab = Slab::<String>::new(Kind::Function);
        let a = slab.insert("a".into()).unwrap();
        let b = slab.insert("b".into()).unwrap();
        assert_eq!(slab.get(a).map(String::as_str), Some("a"));
        slab.kill(a);
        assert!(slab.get(a).is_none());
        assert_eq!(slab.get(b).map(String::as_str), Some("b"));
        assert!(
            slab.get(new_handle(Kind::Function) + 10_000_000).is_none(),
            "never issued"
        );
        assert!(slab.get(b ^ (1 << KIND_SHIFT)).is_none());
    }

    #[test]
    fn slab_inserts_from_many_threads_cross_chunks() {
        let slab = Arc::new(Slab::<usize>::new(Kind::Function));
        let handles: Vec<Vec<u64>> = (0..4)
            .map(|t| {
                let slab = Arc::clone(&slab);
                std::thread::spawn(move || {
                    (0..1500)
                        .map(|i| slab.insert(t * 10_000 + i).unwrap())
                        .collect()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for (t, list) in handles.iter().enumerate() {
            for (i, handle) in list.iter().enumerate() {
                assert_eq!(slab.get(*handle), Some(&(t * 10_000 + i)));
            }
        }
    }

    #[test]
    fn counters_sum_their_cells() {
        let counter = Arc::new(Counter::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counter = Arc::clone(&counter);
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.total(), 8000);
    }
}
