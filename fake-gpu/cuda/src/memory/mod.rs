//! Linear memory: device, pitched, managed and page-locked host allocations.
//!
//! Device memory is host memory: a device pointer is the host address of its bytes, so copies
//! and memsets really move data and a kernel-less test can check contents. Small allocations
//! come from the C heap (fast on the alloc/free hot path); larger ones are anonymous
//! `MAP_NORESERVE` mappings, so a 20 GiB "device" allocation costs nothing until touched.
//!
//! Accounting: device memory (plain, pitched, async/pool) is reserved against the card's
//! physical capacity in the shared state before the bytes exist, so no process can take more
//! than the card has (nor more than a cgroup's hard limit that binds it lets its processes
//! hold; see the model's `state::limits`). Managed memory is counted apart and not limited: on a real GPU it is host
//! memory that migrates on demand, and becomes device memory only when touched or prefetched —
//! which the fake does not simulate. Page-locked host memory is host memory and only counted
//! for introspection. Exact requested sizes are counted (the real driver rounds up to its page
//! size, which the fake does not model).

pub mod array;
pub mod copy;
pub mod pool;
pub mod vmm;

use std::ffi::{c_uint, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_gpu_abi::cuda::*;

use crate::context::current;
use crate::guard::{Result, check, guard, put};
use crate::handles::{IntMap, Padded, lock};
use crate::process::{Process, process};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// Counted against the card (cuMemAlloc, pitched, async and pool allocations).
    Device,
    /// Counted apart, unlimited (cuMemAllocManaged).
    Managed,
    /// Not device memory (cuMemAllocHost, cuMemHostAlloc).
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    Heap,
    Mapping,
}

struct Allocation {
    len: u64,
    kind: AllocKind,
    physical: usize,
    ctx: u64,
    backing: Backing,
    /// Managed memory advised to live on the host (`cuMemAdvise` SetPreferredLocation CPU).
    host_preferred: bool,
}

const SHARDS: usize = 64;
/// Up to this size the C heap backs an allocation; beyond, a lazily-committed mapping.
const HEAP_MAX: u64 = 64 << 10;
/// CUDA guarantees at least this alignment for device allocations.
const ALIGNMENT: usize = 256;
/// The row alignment of pitched allocations (what current GPUs report through cuMemAllocPitch).
pub const PITCH_ALIGNMENT: u64 = 512;

/// Address → allocation, sharded by address so that threads allocating and freeing at once
/// rarely meet on a lock.
pub struct Memory {
    shards: [Padded<Mutex<IntMap<Allocation>>>; SHARDS],
    host_bytes: AtomicU64,
    /// Managed memory advised to prefer the host (see [`cuMemAdvise`]).
    host_preferred_bytes: AtomicU64,
}

impl Memory {
    pub fn new() -> Self {
        Self {
            shards: std::array::from_fn(|_| Padded(Mutex::new(IntMap::default()))),
            host_bytes: AtomicU64::new(0),
            host_preferred_bytes: AtomicU64::new(0),
        }
    }

    fn shard(&self, ptr: u64) -> &Mutex<IntMap<Allocation>> {
        // Addresses are 256-aligned and close together: multiply to spread them, then take high
        // bits, where the product's entropy is.
        let mixed = (ptr >> 8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.shards[(mixed >> 40) as usize % SHARDS].0
    }

    /// Charges and backs `len` bytes; returns the address.
    pub fn allocate(
        &self,
        process: &Process,
        kind: AllocKind,
        len: u64,
        physical: usize,
        ctx: u64,
    ) -> Result<u64> {
        check(len > 0)?;
        self.charge(process, kind, physical, len)?;
        let Some((ptr, backing)) = back(len) else {
            self.uncharge(process, kind, physical, len);
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        };
        lock(self.shard(ptr)).insert(
            ptr,
            Allocation {
                len,
                kind,
                physical,
                ctx,
                backing,
                host_preferred: false,
            },
        );
        Ok(ptr)
    }

    /// Frees an allocation of one of the `kinds`; anything else (unknown, interior, already
    /// freed, other kind) is `CUDA_ERROR_INVALID_VALUE`, as the real driver answers.
    pub fn free(&self, process: &Process, ptr: u64, kinds: &[AllocKind]) -> Result {
        let allocation = {
            let mut shard = lock(self.shard(ptr));
            match shard.get(&ptr) {
                Some(a) if kinds.contains(&a.kind) => shard.remove(&ptr),
                _ => None,
            }
        }
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        self.release(process, ptr, &allocation);
        Ok(())
    }

    fn release(&self, process: &Process, ptr: u64, allocation: &Allocation) {
        if allocation.host_preferred {
            self.host_preferred_bytes
                .fetch_sub(allocation.len, Ordering::Relaxed);
        }
        unback(ptr, allocation.len, allocation.backing);
        self.uncharge(
            process,
            allocation.kind,
            allocation.physical,
            allocation.len,
        );
    }

    fn charge(&self, process: &Process, kind: AllocKind, physical: usize, len: u64) -> Result {
        match kind {
            AllocKind::Device => process
                .lease
                .reserve(physical, len)
                .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY),
            AllocKind::Managed => {
                process.lease.add_managed(physical, len);
                Ok(())
            }
            AllocKind::Host => {
                self.host_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    fn uncharge(&self, process: &Process, kind: AllocKind, physical: usize, len: u64) {
        match kind {
            AllocKind::Device => process.lease.release(physical, len),
            AllocKind::Managed => process.lease.release_managed(physical, len),
            AllocKind::Host => {
                self.host_bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }

    /// Frees everything allocated in a context that is going away.
    pub fn free_context(&self, process: &Process, ctx: u64) {
        for shard in &self.shards {
            let doomed: Vec<(u64, Allocation)> = {
                let mut map = lock(&shard.0);
                let keys: Vec<u64> = map
                    .iter()
                    .filter(|(_, a)| a.ctx == ctx)
                    .map(|(k, _)| *k)
                    .collect();
                keys.into_iter()
                    .filter_map(|k| map.remove(&k).map(|a| (k, a)))
                    .collect()
            };
            for (ptr, allocation) in doomed {
                self.release(process, ptr, &allocation);
            }
        }
    }

    /// The allocation containing `ptr` (base, length). A scan: only `cuMemGetAddressRange` asks.
    pub fn range_of(&self, ptr: u64) -> Option<(u64, u64)> {
        self.shards.iter().find_map(|shard| {
            lock(&shard.0)
                .iter()
                .find(|(base, a)| {
                    a.kind != AllocKind::Host && **base <= ptr && ptr < **base + a.len
                })
                .map(|(base, a)| (*base, a.len))
        })
    }

    /// Checks that `[ptr, ptr + len)` lies in one managed allocation and applies `advice` to it.
    /// Only the preferred location is remembered (for introspection): advice about the host
    /// marks the whole allocation host-preferred, advice about a device or an unset clears it.
    fn advise(&self, ptr: u64, len: u64, advice: i32, device: i32) -> Result {
        check(len > 0)?;
        for shard in &self.shards {
            let mut map = lock(&shard.0);
            let Some((&base, allocation)) = map
                .iter_mut()
                .find(|(base, a)| **base <= ptr && ptr < **base + a.len)
            else {
                continue;
            };
            check(allocation.kind == AllocKind::Managed)?;
            check(
                ptr.checked_add(len)
                    .is_some_and(|end| end <= base + allocation.len),
            )?;
            let host = match advice {
                CU_MEM_ADVISE_SET_PREFERRED_LOCATION => Some(device == CU_DEVICE_CPU),
                CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION => Some(false),
                CU_MEM_ADVISE_SET_READ_MOSTLY
                | CU_MEM_ADVISE_UNSET_READ_MOSTLY
                | CU_MEM_ADVISE_SET_ACCESSED_BY
                | CU_MEM_ADVISE_UNSET_ACCESSED_BY => None,
                _ => return Err(CUDA_ERROR_INVALID_VALUE),
            };
            if let Some(host) = host
                && host != allocation.host_preferred
            {
                allocation.host_preferred = host;
                if host {
                    self.host_preferred_bytes
                        .fetch_add(allocation.len, Ordering::Relaxed);
                } else {
                    self.host_preferred_bytes
                        .fetch_sub(allocation.len, Ordering::Relaxed);
                }
            }
            return Ok(());
        }
        Err(CUDA_ERROR_INVALID_VALUE)
    }

    /// Managed memory this process advised to prefer the host.
    pub fn host_preferred_bytes(&self) -> u64 {
        self.host_preferred_bytes.load(Ordering::Relaxed)
    }

    /// Page-locked host memory this process holds.
    pub fn host_bytes(&self) -> u64 {
        self.host_bytes.load(Ordering::Relaxed)
    }
}

fn back(len: u64) -> Option<(u64, Backing)> {
    let size = usize::try_from(len).ok()?;
    if len <= HEAP_MAX {
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; ALIGNMENT is a power of two and a multiple of the pointer size.
        let rc = unsafe { libc::posix_memalign(&mut ptr, ALIGNMENT, size) };
        return (rc == 0 && !ptr.is_null()).then_some((ptr as u64, Backing::Heap));
    }
    // SAFETY: a fresh anonymous mapping; nothing else is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (ptr != libc::MAP_FAILED).then_some((ptr as u64, Backing::Mapping))
}

fn unback(ptr: u64, len: u64, backing: Backing) {
    match backing {
        // SAFETY: `ptr` came from posix_memalign in `back` and is freed once (it was removed
        // from the table before this call).
        Backing::Heap => unsafe { libc::free(ptr as *mut c_void) },
        // SAFETY: `ptr`/`len` are exactly a mapping made in `back`, removed from the table.
        Backing::Mapping => unsafe {
            libc::munmap(ptr as *mut c_void, len as usize);
        },
    }
}

// --- Exports ------------------------------------------------------------------------------------

/// Free memory is the card's capacity minus what every process on the node uses.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!free.is_null() && !total.is_null())?;
        let ctx = current(process)?;
        let region = process.lease.region();
        let capacity = region.capacity(ctx.physical);
        let used = region.used(ctx.physical);
        unsafe {
            put(free, capacity.saturating_sub(used) as usize)?;
            put(total, capacity as usize)
        }
    })
}

fn alloc_in_current(dptr: *mut CUdeviceptr, bytes: u64, kind: AllocKind) -> Result {
    let process = process()?;
    check(!dptr.is_null() && bytes > 0)?;
    let ctx = current(process)?;
    let ptr = process
        .memory
        .allocate(process, kind, bytes, ctx.physical, ctx.handle)?;
    unsafe { put(dptr, ptr) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    guard(|| alloc_in_current(dptr, bytesize as u64, AllocKind::Device))
}

/// The pitch is the width rounded up to [`PITCH_ALIGNMENT`]; pitch × height is charged.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    ppitch: *mut usize,
    width_in_bytes: usize,
    height: usize,
    element_size_bytes: c_uint,
) -> CUresult {
    guard(|| {
        process()?;
        check(!ppitch.is_null() && width_in_bytes > 0 && height > 0)?;
        check(matches!(element_size_bytes, 4 | 8 | 16))?;
        let pitch = (width_in_bytes as u64).div_ceil(PITCH_ALIGNMENT) * PITCH_ALIGNMENT;
        let bytes = pitch
            .checked_mul(height as u64)
            .ok_or(CUDA_ERROR_OUT_OF_MEMORY)?;
        alloc_in_current(dptr, bytes, AllocKind::Device)?;
        unsafe { put(ppitch, pitch as usize) }
    })
}

/// Frees device and managed memory.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard(|| {
        let process = process()?;
        process
            .memory
            .free(process, dptr, &[AllocKind::Device, AllocKind::Managed])
    })
}

/// Host-backed and counted apart from device memory (see the module note).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(flags == CU_MEM_ATTACH_GLOBAL || flags == CU_MEM_ATTACH_HOST)?;
        if let Ok(ctx) = current(process)
            && !process.gpus[ctx.device].spec.managed_memory
        {
            return Err(CUDA_ERROR_NOT_SUPPORTED);
        }
        alloc_in_current(dptr, bytesize as u64, AllocKind::Managed)
    })
}

/// `CUmem_advise` values (`cuda.h`).
pub const CU_MEM_ADVISE_SET_READ_MOSTLY: i32 = 1;
pub const CU_MEM_ADVISE_UNSET_READ_MOSTLY: i32 = 2;
pub const CU_MEM_ADVISE_SET_PREFERRED_LOCATION: i32 = 3;
pub const CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION: i32 = 4;
pub const CU_MEM_ADVISE_SET_ACCESSED_BY: i32 = 5;
pub const CU_MEM_ADVISE_UNSET_ACCESSED_BY: i32 = 6;
/// The host, where a device ordinal is expected (`CU_DEVICE_CPU`).
pub const CU_DEVICE_CPU: CUdevice = -1;

/// Advice on a managed range (CUDA 8's signature: the location is a device ordinal or
/// `CU_DEVICE_CPU`). The range must lie in one managed allocation (the real driver accepts any
/// managed range; tests only advise whole allocations), `device` must be the host or a device of
/// the process. Host-backed memory does not move, so only the preferred location is recorded
/// ([`fakegpu_process_managed_host_preferred`](crate::introspect)).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAdvise(
    dptr: CUdeviceptr,
    count: usize,
    advice: i32,
    device: CUdevice,
) -> CUresult {
    guard(|| advise(dptr, count, advice, device))
}

fn advise(dptr: CUdeviceptr, count: usize, advice: i32, device: CUdevice) -> Result {
    let process = process()?;
    check(device == CU_DEVICE_CPU || (device >= 0 && (device as usize) < process.gpus.len()))?;
    process.memory.advise(dptr, count as u64, advice, device)
}

/// The device ordinal (or `CU_DEVICE_CPU`) a CUDA 12.2 `CUmemLocation` names: a device, or the
/// host in any of its NUMA forms (host-backed memory has no NUMA placement to honour).
fn location_device(location: CUmemLocation) -> Result<CUdevice> {
    match location.type_ {
        CU_MEM_LOCATION_TYPE_DEVICE => Ok(location.id),
        CU_MEM_LOCATION_TYPE_HOST
        | CU_MEM_LOCATION_TYPE_HOST_NUMA
        | CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT => Ok(CU_DEVICE_CPU),
        _ => Err(CUDA_ERROR_INVALID_VALUE),
    }
}

/// [`cuMemAdvise`] with CUDA 12.2's location argument.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAdvise_v2(
    dptr: CUdeviceptr,
    count: usize,
    advice: i32,
    location: CUmemLocation,
) -> CUresult {
    guard(|| {
        process()?;
        advise(dptr, count, advice, location_device(location)?)
    })
}

fn prefetch(dptr: CUdeviceptr, count: usize, device: CUdevice) -> Result {
    let process = process()?;
    check(device == CU_DEVICE_CPU || (device >= 0 && (device as usize) < process.gpus.len()))?;
    check(count > 0)?;
    let (base, len) = process
        .memory
        .range_of(dptr)
        .ok_or(CUDA_ERROR_INVALID_VALUE)?;
    check(dptr + count as u64 <= base + len)?;
    // Host-backed: the bytes are already wherever they are read from. Nothing moves.
    Ok(())
}

/// Prefetch of a managed range to a device or the host: checked, and a no-op (host-backed).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync(
    dptr: CUdeviceptr,
    count: usize,
    device: CUdevice,
    _stream: CUstream,
) -> CUresult {
    guard(|| prefetch(dptr, count, device))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_ptsz(
    dptr: CUdeviceptr,
    count: usize,
    device: CUdevice,
    _stream: CUstream,
) -> CUresult {
    guard(|| prefetch(dptr, count, device))
}

fn prefetch_to(dptr: CUdeviceptr, count: usize, location: CUmemLocation, flags: c_uint) -> Result {
    process()?;
    check(flags == 0)?;
    prefetch(dptr, count, location_device(location)?)
}

/// [`cuMemPrefetchAsync`] with CUDA 12.2's location argument; no flags are defined yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2(
    dptr: CUdeviceptr,
    count: usize,
    location: CUmemLocation,
    flags: c_uint,
    _stream: CUstream,
) -> CUresult {
    guard(|| prefetch_to(dptr, count, location, flags))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2_ptsz(
    dptr: CUdeviceptr,
    count: usize,
    location: CUmemLocation,
    flags: c_uint,
    _stream: CUstream,
) -> CUresult {
    guard(|| prefetch_to(dptr, count, location, flags))
}

fn host_alloc(pp: *mut *mut c_void, bytes: usize) -> Result {
    let process = process()?;
    check(!pp.is_null() && bytes > 0)?;
    let ctx = current(process)?;
    let ptr = process.memory.allocate(
        process,
        AllocKind::Host,
        bytes as u64,
        ctx.physical,
        ctx.handle,
    )?;
    unsafe { put(pp, ptr as *mut c_void) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    guard(|| host_alloc(pp, bytesize))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    guard(|| {
        process()?;
        let known =
            CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_WRITECOMBINED;
        check(flags & !known == 0)?;
        host_alloc(pp, bytesize)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    guard(|| {
        let process = process()?;
        process.memory.free(process, p as u64, &[AllocKind::Host])
    })
}

/// Base and size of the allocation (or VMM mapping) containing `dptr`; either output may be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAddressRange_v2(
    pbase: *mut CUdeviceptr,
    psize: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    guard(|| {
        let process = process()?;
        let (base, len) = process
            .memory
            .range_of(dptr)
            .or_else(|| process.vmm.mapping_containing(dptr))
            .ok_or(CUDA_ERROR_NOT_FOUND)?;
        if !pbase.is_null() {
            unsafe { put(pbase, base) }?;
        }
        if !psize.is_null() {
            unsafe { put(psize, len as usize) }?;
        }
        Ok(())
    })
}
