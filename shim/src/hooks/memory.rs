//! Memory: every call that takes device memory is charged to the claim before the driver is
//! asked, and rolled back if the driver fails; every free gives back exactly what its pointer
//! was charged; memory queries report the slice, never the card.

use std::ffi::{c_int, c_uint};

use tessera_gpu_abi::cuda::*;

use super::{current_device, dispatch};
use crate::devices::Grant;
use crate::enforcer::Enforcer;
use crate::guard::guard;
use crate::ptr_table::{Charge, PtrTable};
use crate::real::cuda as real;
use crate::spill::Spill;

/// Pitch alignment assumed when reserving for `cuMemAllocPitch` before the driver picks the
/// real pitch; the reservation is corrected to the real size afterwards.
const PITCH_ALIGNMENT: u64 = 512;

/// Reserves `bytes` on `grant`, runs `allocate`, and records the handle it produced under
/// `table`; on any failure nothing stays charged and nothing stays allocated.
fn charged(
    enforcer: &Enforcer,
    grant: Grant,
    bytes: u64,
    table: &PtrTable,
    allocate: impl FnOnce() -> CUresult,
    handle: impl FnOnce() -> u64,
    undo: impl FnOnce(u64),
) -> CUresult {
    let Grant::Claim(device) = grant else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    if !enforcer.ledger.reserve(device, bytes) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    let result = allocate();
    if result != CUDA_SUCCESS {
        enforcer.ledger.release(device, bytes);
        return result;
    }
    let key = handle();
    if !table.insert(key, Charge { bytes, device }) {
        undo(key);
        enforcer.ledger.release(device, bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // A claim that may spill keeps its figure on the card current for the other claims.
    enforcer.publish_resident(device);
    CUDA_SUCCESS
}

/// Forgets `key`'s charge, runs `free`, and gives the bytes back if the driver freed it. An
/// unknown key is forwarded untouched and uncharges nothing.
fn uncharged(
    enforcer: &Enforcer,
    table: &PtrTable,
    key: u64,
    free: impl FnOnce() -> CUresult,
) -> CUresult {
    let charge = table.remove(key);
    let result = free();
    if let Some(charge) = charge {
        if result == CUDA_SUCCESS {
            enforcer.ledger.release(charge.device, charge.bytes);
            enforcer.publish_resident(charge.device);
        } else {
            table.insert(key, charge);
        }
    }
    result
}

/// The current context's device as a claim grant.
fn current_grant(enforcer: &Enforcer) -> Result<Grant, CUresult> {
    current_device().map(|device| enforcer.grant(device))
}

macro_rules! try_cu {
    ($e:expr) => {
        match $e {
            Ok(value) => value,
            Err(code) => return code,
        }
    };
}

/// Reads what the driver wrote through the caller's out-pointer (0 if the caller passed NULL,
/// which the driver rejects before this is reached).
unsafe fn read_out<T: Copy + Into<u64>>(ptr: *const T) -> u64 {
    // SAFETY: only called after the driver succeeded writing `ptr`.
    if ptr.is_null() {
        0
    } else {
        unsafe { *ptr }.into()
    }
}

/// [`read_out`] for handles that are pointers.
unsafe fn read_handle<T>(ptr: *const *mut T) -> u64 {
    // SAFETY: as for read_out.
    if ptr.is_null() {
        0
    } else {
        (unsafe { *ptr }) as u64
    }
}

fn alloc_into(
    enforcer: &Enforcer,
    dptr: *mut CUdeviceptr,
    bytes: usize,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let grant = try_cu!(current_grant(enforcer));
    charged(
        enforcer,
        grant,
        bytes as u64,
        &enforcer.pointers,
        call,
        // SAFETY: the driver wrote `*dptr` on success.
        || unsafe { read_out(dptr) },
        free_device_pointer,
    )
}

/// `cuMemAlloc_v2` under a limit: on a device where the claim may spill, through [`spilling`].
fn alloc_device(
    enforcer: &Enforcer,
    dptr: *mut CUdeviceptr,
    bytes: usize,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let ordinal = try_cu!(current_device());
    if let Grant::Claim(device) = enforcer.grant(ordinal)
        && let (Some(spill), Some(table)) = (enforcer.spill(device), enforcer.spilled.as_ref())
    {
        return spilling(enforcer, device, ordinal, spill, table, dptr, bytes, call);
    }
    alloc_into(enforcer, dptr, bytes, call)
}

/// `CUmem_advise` values and `CU_DEVICE_CPU` (`cuda.h`).
const CU_MEM_ADVISE_SET_PREFERRED_LOCATION: c_int = 3;
const CU_MEM_ADVISE_SET_ACCESSED_BY: c_int = 5;
const CU_DEVICE_CPU: CUdevice = -1;

/// Per claim device, whether this process already said its spill limit was reached.
static SPILL_LIMIT_REPORTED: [std::sync::atomic::AtomicBool; tessera_api::region::MAX_DEVICES] =
    [const { std::sync::atomic::AtomicBool::new(false) }; tessera_api::region::MAX_DEVICES];

/// An allocation of a claim that may spill: charged against its limit as always; served from the
/// card while the claim's device-resident bytes stay within its allowance (the card less what the
/// other claims reserve or hold, see `spill`) and the driver has the memory; otherwise served
/// from host memory through managed memory, advised to stay on the host and be mapped for the
/// device, and recorded as spilled.
#[allow(clippy::too_many_arguments)]
fn spilling(
    enforcer: &Enforcer,
    device: usize,
    ordinal: CUdevice,
    spill: &Spill,
    table: &PtrTable,
    dptr: *mut CUdeviceptr,
    bytes: usize,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    let size = bytes as u64;
    if !enforcer.ledger.reserve(device, size) {
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // Published before deciding (see `Spill::admit`), so that two claims never both take the
    // card's last bytes.
    if spill.admit(enforcer.resident(device)) {
        let result = call();
        if result == CUDA_SUCCESS {
            // SAFETY: the driver wrote `*dptr` on success.
            let ptr = unsafe { read_out(dptr) };
            if !enforcer.pointers.insert(
                ptr,
                Charge {
                    bytes: size,
                    device,
                },
            ) {
                free_device_pointer(ptr);
                enforcer.ledger.release(device, size);
                enforcer.publish_resident(device);
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            return CUDA_SUCCESS;
        }
        if result != CUDA_ERROR_OUT_OF_MEMORY {
            enforcer.ledger.release(device, size);
            enforcer.publish_resident(device);
            return result;
        }
        // The card is full for reasons the board cannot see: spill.
    }
    if !enforcer.ledger.reserve_spill(device, size, spill.limit) {
        enforcer.ledger.release(device, size);
        enforcer.publish_resident(device);
        if !SPILL_LIMIT_REPORTED[device.min(SPILL_LIMIT_REPORTED.len() - 1)]
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            crate::report::line(format_args!(
                "claim {}: GPU {} is full and the claim's spill limit ({} bytes of host memory) is reached; refusing {} bytes with CUDA_ERROR_OUT_OF_MEMORY",
                enforcer.claim_uid,
                enforcer
                    .uuids
                    .get(device)
                    .map(String::as_str)
                    .unwrap_or("?"),
                spill.limit,
                size
            ));
        }
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    // These bytes are not on the card (the published figure may have counted them above).
    enforcer.publish_resident(device);
    let undo = || {
        enforcer.ledger.release_spill(device, size);
        enforcer.ledger.release(device, size);
    };
    let Some(managed) = real::cuMemAllocManaged.get() else {
        undo();
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    // SAFETY: the caller's out-pointer, as the driver's own cuMemAlloc_v2 would take it.
    let result = unsafe { managed(dptr, bytes, CU_MEM_ATTACH_GLOBAL) };
    if result != CUDA_SUCCESS {
        undo();
        return result;
    }
    // SAFETY: written by the driver on success.
    let ptr = unsafe { read_out(dptr) };
    if let Some(advise) = real::cuMemAdvise.get() {
        // Advice is a hint: a driver that refuses it still gives working (migrating) memory.
        // SAFETY: a range the driver just returned.
        unsafe {
            advise(
                ptr,
                bytes,
                CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                CU_DEVICE_CPU,
            );
            advise(ptr, bytes, CU_MEM_ADVISE_SET_ACCESSED_BY, ordinal);
        }
    }
    if !table.insert(
        ptr,
        Charge {
            bytes: size,
            device,
        },
    ) {
        free_device_pointer(ptr);
        undo();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    CUDA_SUCCESS
}

/// `cuMemFree_v2` of a claim that may spill: the pointer is a device allocation or a spilled
/// one, and gives back what it was charged (and, spilled, its spilled bytes).
fn free_maybe_spilled(
    enforcer: &Enforcer,
    table: &PtrTable,
    dptr: CUdeviceptr,
    free: impl FnOnce() -> CUresult,
) -> CUresult {
    if let Some(charge) = enforcer.pointers.remove(dptr) {
        let result = free();
        if result == CUDA_SUCCESS {
            enforcer.ledger.release(charge.device, charge.bytes);
            enforcer.publish_resident(charge.device);
        } else {
            enforcer.pointers.insert(dptr, charge);
        }
        return result;
    }
    let Some(charge) = table.remove(dptr) else {
        return free();
    };
    let result = free();
    if result == CUDA_SUCCESS {
        enforcer.ledger.release_spill(charge.device, charge.bytes);
        enforcer.ledger.release(charge.device, charge.bytes);
    } else {
        table.insert(dptr, charge);
    }
    result
}

fn free_device_pointer(ptr: CUdeviceptr) {
    if let Some(free) = real::cuMemFree_v2.get() {
        // SAFETY: freeing the pointer the driver just returned.
        unsafe { free(ptr) };
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemAlloc_v2,
            // SAFETY: forwarded arguments.
            |f| unsafe { f(dptr, bytesize) },
            |e, f| alloc_device(e, dptr, bytesize, || unsafe { f(dptr, bytesize) }),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    flags: c_uint,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemAllocManaged,
            |f| unsafe { f(dptr, bytesize, flags) },
            |e, f| alloc_into(e, dptr, bytesize, || unsafe { f(dptr, bytesize, flags) }),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAllocPitch_v2(
    dptr: *mut CUdeviceptr,
    pitch: *mut usize,
    width: usize,
    height: usize,
    element_size: c_uint,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemAllocPitch_v2,
            |f| unsafe { f(dptr, pitch, width, height, element_size) },
            |e, f| {
                let Grant::Claim(device) = try_cu!(current_grant(e)) else {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                };
                // The driver chooses the pitch; reserve for an aligned row, then settle on the
                // real size.
                let Some(estimate) = (width as u64)
                    .checked_next_multiple_of(PITCH_ALIGNMENT)
                    .and_then(|row| row.checked_mul(height as u64))
                else {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                };
                if !e.ledger.reserve(device, estimate) {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                let result = unsafe { f(dptr, pitch, width, height, element_size) };
                if result != CUDA_SUCCESS {
                    e.ledger.release(device, estimate);
                    return result;
                }
                // SAFETY: the driver wrote both on success.
                let (ptr, real_pitch) = unsafe { (read_out(dptr), read_out(pitch as *const u64)) };
                let actual = real_pitch.saturating_mul(height as u64);
                if actual > estimate && !e.ledger.reserve(device, actual - estimate) {
                    free_device_pointer(ptr);
                    e.ledger.release(device, estimate);
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                if actual < estimate {
                    e.ledger.release(device, estimate - actual);
                }
                if !e.pointers.insert(
                    ptr,
                    Charge {
                        bytes: actual,
                        device,
                    },
                ) {
                    free_device_pointer(ptr);
                    e.ledger.release(device, actual);
                    return CUDA_ERROR_OUT_OF_MEMORY;
                }
                e.publish_resident(device);
                CUDA_SUCCESS
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemFree_v2,
            |f| unsafe { f(dptr) },
            |e, f| match &e.spilled {
                Some(table) => free_maybe_spilled(e, table, dptr, || unsafe { f(dptr) }),
                None => uncharged(e, &e.pointers, dptr, || unsafe { f(dptr) }),
            },
        )
    })
}

/// `cuMemAllocAsync` under a limit: spilled like `cuMemAlloc_v2` where the claim may spill (the
/// managed memory is usable as soon as it is returned, which stream order allows), except while
/// the stream is being captured, where the allocation must become a node of the user's graph.
fn alloc_stream_ordered(
    enforcer: &Enforcer,
    dptr: *mut CUdeviceptr,
    bytes: usize,
    stream: CUstream,
    per_thread: bool,
    call: impl FnOnce() -> CUresult,
) -> CUresult {
    if enforcer.spilled.is_none() || crate::stream::capturing(stream, per_thread) {
        return alloc_into(enforcer, dptr, bytes, call);
    }
    alloc_device(enforcer, dptr, bytes, call)
}

macro_rules! alloc_async {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            bytesize: usize,
            stream: CUstream,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                dispatch(
                    &real::$name,
                    |f| unsafe { f(dptr, bytesize, stream) },
                    |e, f| {
                        alloc_stream_ordered(e, dptr, bytesize, stream, $per_thread, || unsafe {
                            f(dptr, bytesize, stream)
                        })
                    },
                )
            })
        }
    };
}
alloc_async!(cuMemAllocAsync, false);
alloc_async!(cuMemAllocAsync_ptsz, true);

macro_rules! alloc_from_pool {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(
            dptr: *mut CUdeviceptr,
            bytesize: usize,
            pool: CUmemoryPool,
            stream: CUstream,
        ) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                dispatch(
                    &real::$name,
                    |f| unsafe { f(dptr, bytesize, pool, stream) },
                    |e, f| {
                        alloc_into(e, dptr, bytesize, || unsafe {
                            f(dptr, bytesize, pool, stream)
                        })
                    },
                )
            })
        }
    };
}
alloc_from_pool!(cuMemAllocFromPoolAsync);
alloc_from_pool!(cuMemAllocFromPoolAsync_ptsz);

/// `cuMemFreeAsync` under a limit. A spilled pointer is managed memory, which is not the
/// stream-ordered allocator's to free: the work queued on the stream before the free is waited
/// for, then the memory is freed at once and its charge and spilled bytes given back. Inside a
/// graph capture that wait is impossible: `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`, and the
/// pointer stays allocated and charged.
fn free_stream_ordered(
    enforcer: &Enforcer,
    dptr: CUdeviceptr,
    stream: CUstream,
    per_thread: bool,
    free: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(charge) = enforcer.spilled.as_ref().and_then(|t| t.remove(dptr)) else {
        return uncharged(enforcer, &enforcer.pointers, dptr, free);
    };
    let result = if crate::stream::capturing(stream, per_thread) {
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    } else {
        match crate::stream::synchronize(stream, per_thread) {
            CUDA_SUCCESS => match real::cuMemFree_v2.get() {
                // SAFETY: a managed allocation this claim made and nobody uses any more.
                Some(free) => unsafe { free(dptr) },
                None => CUDA_ERROR_NOT_INITIALIZED,
            },
            code => code,
        }
    };
    if result == CUDA_SUCCESS {
        enforcer.ledger.release_spill(charge.device, charge.bytes);
        enforcer.ledger.release(charge.device, charge.bytes);
    } else if let Some(table) = &enforcer.spilled {
        table.insert(dptr, charge);
    }
    result
}

macro_rules! free_async {
    ($name:ident, $per_thread:expr) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(dptr: CUdeviceptr, stream: CUstream) -> CUresult {
            guard(CUDA_ERROR_UNKNOWN, || {
                dispatch(
                    &real::$name,
                    |f| unsafe { f(dptr, stream) },
                    |e, f| {
                        free_stream_ordered(e, dptr, stream, $per_thread, || unsafe {
                            f(dptr, stream)
                        })
                    },
                )
            })
        }
    };
}
free_async!(cuMemFreeAsync, false);
free_async!(cuMemFreeAsync_ptsz, true);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemCreate,
            |f| unsafe { f(handle, size, prop, flags) },
            |e, f| {
                if prop.is_null() {
                    return unsafe { f(handle, size, prop, flags) };
                }
                // SAFETY: non-null, per the driver's contract a valid CUmemAllocationProp.
                let location = unsafe { (*prop).location };
                if location.type_ != CU_MEM_LOCATION_TYPE_DEVICE {
                    // Host-resident physical memory is not device memory.
                    return unsafe { f(handle, size, prop, flags) };
                }
                // The device comes from the request itself, never from whatever context the
                // calling thread happens to have (NCCL calls this from context-less threads).
                charged(
                    e,
                    e.grant(location.id),
                    size as u64,
                    &e.handles,
                    || unsafe { f(handle, size, prop, flags) },
                    || unsafe { read_out(handle) },
                    |h| {
                        if let Some(release) = real::cuMemRelease.get() {
                            unsafe { release(h) };
                        }
                    },
                )
            },
        )
    })
}

/// Whether the refusal of graph memory nodes has been reported (once per process).
static GRAPH_MEMORY_REPORTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A graph's memory allocation node gets its memory when the graph is launched and gives it
/// back at free nodes, trims and graph teardown, none of which the ledger sees: under a wall
/// such a node would be memory outside the claim's limit, so it is refused, with a line saying
/// why. Frameworks allocate a graph's memory before capture or from their own pools (PyTorch's
/// CUDA graphs do), which the wall counts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuGraphAddMemAllocNode(
    node: *mut CUgraphNode,
    graph: CUgraph,
    dependencies: *const CUgraphNode,
    count: usize,
    params: *mut CUDA_MEM_ALLOC_NODE_PARAMS,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuGraphAddMemAllocNode,
            |f| unsafe { f(node, graph, dependencies, count, params) },
            |e, _| {
                if !GRAPH_MEMORY_REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    crate::report::line(format_args!(
                        "claim {}: cuGraphAddMemAllocNode refused with CUDA_ERROR_NOT_SUPPORTED: graph memory nodes take GPU memory at launch, outside the claim's memory limit; allocate the graph's buffers before capture instead",
                        e.claim_uid
                    ));
                }
                CUDA_ERROR_NOT_SUPPORTED
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemRelease,
            |f| unsafe { f(handle) },
            |e, f| uncharged(e, &e.handles, handle, || unsafe { f(handle) }),
        )
    })
}

/// Bytes of a `width × height × depth` array (zero dimensions count as one).
fn array_bytes(
    width: usize,
    height: usize,
    depth: usize,
    format: c_int,
    channels: c_uint,
) -> Option<u64> {
    (width as u64)
        .checked_mul(height.max(1) as u64)?
        .checked_mul(depth.max(1) as u64)?
        .checked_mul(channels.max(1) as u64)?
        .checked_mul(array_format_bytes(format))
}

/// Charges an array of `bytes` (`None`: no descriptor, which the driver itself rejects;
/// `Some(None)`: a size that overflows, which cannot fit any limit) around `create`.
fn array_charged(
    enforcer: &Enforcer,
    handle: *mut CUarray,
    bytes: Option<Option<u64>>,
    create: impl FnOnce() -> CUresult,
) -> CUresult {
    let Some(bytes) = bytes else { return create() };
    let Some(bytes) = bytes else {
        return CUDA_ERROR_OUT_OF_MEMORY;
    };
    let grant = try_cu!(current_grant(enforcer));
    // SAFETY: the driver wrote the handle on success.
    charged(
        enforcer,
        grant,
        bytes,
        &enforcer.arrays,
        create,
        || unsafe { read_handle(handle) },
        destroy_array,
    )
}

fn destroy_array(array: u64) {
    if let Some(destroy) = real::cuArrayDestroy.get() {
        unsafe { destroy(array as CUarray) };
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY_DESCRIPTOR,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuArrayCreate_v2,
            |f| unsafe { f(handle, desc) },
            |e, f| {
                // SAFETY: the driver's contract: NULL or a valid descriptor.
                let bytes = unsafe { desc.as_ref() }
                    .map(|d| array_bytes(d.width, d.height, 1, d.format, d.num_channels));
                array_charged(e, handle, bytes, || unsafe { f(handle, desc) })
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArray3DCreate_v2(
    handle: *mut CUarray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuArray3DCreate_v2,
            |f| unsafe { f(handle, desc) },
            |e, f| {
                // SAFETY: the driver's contract: NULL or a valid descriptor.
                let bytes = unsafe { desc.as_ref() }
                    .map(|d| array_bytes(d.width, d.height, d.depth, d.format, d.num_channels));
                array_charged(e, handle, bytes, || unsafe { f(handle, desc) })
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuArrayDestroy(array: CUarray) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuArrayDestroy,
            |f| unsafe { f(array) },
            |e, f| uncharged(e, &e.arrays, array as u64, || unsafe { f(array) }),
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayCreate(
    handle: *mut CUmipmappedArray,
    desc: *const CUDA_ARRAY3D_DESCRIPTOR,
    levels: c_uint,
) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMipmappedArrayCreate,
            |f| unsafe { f(handle, desc, levels) },
            |e, f| {
                if desc.is_null() {
                    return unsafe { f(handle, desc, levels) };
                }
                let d = unsafe { *desc };
                let mut total = Some(0u64);
                for level in 0..levels.clamp(1, 32) {
                    let level_bytes = array_bytes(
                        (d.width >> level).max(1),
                        if d.height == 0 {
                            0
                        } else {
                            (d.height >> level).max(1)
                        },
                        if d.depth == 0 {
                            0
                        } else {
                            (d.depth >> level).max(1)
                        },
                        d.format,
                        d.num_channels,
                    );
                    total = total.zip(level_bytes).and_then(|(a, b)| a.checked_add(b));
                }
                let Some(bytes) = total else {
                    return CUDA_ERROR_OUT_OF_MEMORY;
                };
                let grant = try_cu!(current_grant(e));
                charged(
                    e,
                    grant,
                    bytes,
                    &e.arrays,
                    || unsafe { f(handle, desc, levels) },
                    || unsafe { read_handle(handle) },
                    |array| {
                        if let Some(destroy) = real::cuMipmappedArrayDestroy.get() {
                            unsafe { destroy(array as CUmipmappedArray) };
                        }
                    },
                )
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMipmappedArrayDestroy(array: CUmipmappedArray) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMipmappedArrayDestroy,
            |f| unsafe { f(array) },
            |e, f| uncharged(e, &e.arrays, array as u64, || unsafe { f(array) }),
        )
    })
}

/// The slice as the claim sees it: total is the limit (never more than the card), used is the
/// claim's usage across all its processes, and free is what the claim can still get.
fn slice_view(enforcer: &Enforcer, grant: Grant, real_free: u64, real_total: u64) -> (u64, u64) {
    match grant {
        Grant::Claim(device) if enforcer.spill(device).is_some() => {
            // The claim may spill: its limit is its to use whether the card is full or not.
            let total = enforcer.ledger.limit(device);
            (total.saturating_sub(enforcer.ledger.used(device)), total)
        }
        Grant::Claim(device) => {
            let total = enforcer.ledger.limit(device).min(real_total);
            let free = total
                .saturating_sub(enforcer.ledger.used(device))
                .min(real_free);
            (free, total)
        }
        Grant::NotGranted => (0, 0),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuMemGetInfo_v2,
            |f| unsafe { f(free, total) },
            |e, f| {
                let (mut real_free, mut real_total) = (0usize, 0usize);
                let result = unsafe { f(&mut real_free, &mut real_total) };
                if result != CUDA_SUCCESS {
                    return result;
                }
                let grant = try_cu!(current_grant(e));
                let (slice_free, slice_total) =
                    slice_view(e, grant, real_free as u64, real_total as u64);
                // SAFETY: the caller's out-pointers, written only if non-null.
                unsafe {
                    if !free.is_null() {
                        *free = slice_free as usize;
                    }
                    if !total.is_null() {
                        *total = slice_total as usize;
                    }
                }
                CUDA_SUCCESS
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, device: CUdevice) -> CUresult {
    guard(CUDA_ERROR_UNKNOWN, || {
        dispatch(
            &real::cuDeviceTotalMem_v2,
            |f| unsafe { f(bytes, device) },
            |e, f| {
                let result = unsafe { f(bytes, device) };
                if result != CUDA_SUCCESS || bytes.is_null() {
                    return result;
                }
                let slice = match e.grant(device) {
                    Grant::Claim(index) => e.ledger.limit(index),
                    Grant::NotGranted => 0,
                };
                let spills =
                    matches!(e.grant(device), Grant::Claim(index) if e.spill(index).is_some());
                // SAFETY: non-null, written by the driver.
                unsafe {
                    // A claim that may spill can use its whole limit, even past the card.
                    *bytes = if spills {
                        slice as usize
                    } else {
                        (*bytes).min(slice as usize)
                    }
                };
                CUDA_SUCCESS
            },
        )
    })
}

/// The 32-bit v1 entry points (`cuda.h` before 3.2). Nothing current calls them, but they
/// reach device memory: under a limit they are refused rather than left unaccounted.
macro_rules! v1_refused {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> CUresult {
                guard(CUDA_ERROR_UNKNOWN, || match crate::enforcer::mode() {
                    crate::enforcer::Mode::Passthrough => v1_forward(concat!(stringify!($name), "\0"), |f| {
                        // SAFETY: the real v1 function has exactly this signature.
                        let f: unsafe extern "C" fn($($ty),*) -> CUresult = unsafe { std::mem::transmute(f) };
                        unsafe { f($($arg),*) }
                    }),
                    _ => CUDA_ERROR_NOT_SUPPORTED,
                })
            }
        )*
    };
}

fn v1_forward(name: &str, call: impl FnOnce(*mut std::ffi::c_void) -> CUresult) -> CUresult {
    // SAFETY: a NUL-terminated name looked up in the already loaded driver.
    let handle =
        unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return CUDA_ERROR_NOT_FOUND;
    }
    let f = unsafe { crate::real::real_dlsym(handle, name.as_ptr().cast()) };
    unsafe { libc::dlclose(handle) };
    if f.is_null() {
        CUDA_ERROR_NOT_FOUND
    } else {
        call(f)
    }
}

v1_refused! {
    cuMemAlloc(dptr: *mut c_uint, bytesize: c_uint);
    cuMemAllocPitch(dptr: *mut c_uint, pitch: *mut c_uint, width: c_uint, height: c_uint, element: c_uint);
    cuMemGetInfo(free: *mut c_uint, total: *mut c_uint);
    cuDeviceTotalMem(bytes: *mut c_uint, device: CUdevice);
    cuArrayCreate(handle: *mut CUarray, desc: *const std::ffi::c_void);
    cuArray3DCreate(handle: *mut CUarray, desc: *const std::ffi::c_void);
}
