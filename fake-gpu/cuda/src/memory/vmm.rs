//! Virtual memory management (`cuMemCreate`, `cuMemAddressReserve`, `cuMemMap`, …), as NCCL and
//! PyTorch's expandable segments use it.
//!
//! A physical allocation is a `memfd` (sparse until touched) charged to the device named in its
//! properties — no current context needed, as NCCL's helper threads have none. A reservation is a
//! `PROT_NONE` anonymous mapping; `cuMemMap` maps the memfd over part of it, so the same
//! physical memory can appear at several addresses and copies through any of them see the same
//! bytes. The memory goes back to the card when its handle has been released *and* its last
//! mapping is gone, as with the real driver. Access is granted at map time; `cuMemSetAccess`
//! only validates.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use tessera_gpu_abi::cuda::*;

use crate::guard::{Result, check, get, guard, put};
use crate::handles::{IntMap, Kind, is_kind, lock, new_handle};
use crate::process::{Process, process};

/// What `cuMemGetAllocationGranularity` answers (minimum and recommended): 2 MiB, the real
/// driver's value on current GPUs. Sizes, offsets and addresses must be multiples of it.
pub const GRANULARITY: u64 = 2 << 20;

struct Physical {
    len: u64,
    physical: usize,
    memfd: OwnedFd,
    released: bool,
    mappings: u32,
}

struct Mapping {
    len: u64,
    handle: u64,
}

struct Reservation {
    len: u64,
    /// Start → mapping.
    mappings: BTreeMap<u64, Mapping>,
}

#[derive(Default)]
struct State {
    handles: IntMap<Physical>,
    /// Start → reservation.
    reservations: BTreeMap<u64, Reservation>,
}

pub struct Vmm {
    state: Mutex<State>,
}

impl Vmm {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
        }
    }

    /// The mapping containing `ptr` (start, length).
    pub fn mapping_containing(&self, ptr: u64) -> Option<(u64, u64)> {
        let state = lock(&self.state);
        let (start, reservation) = state.reservations.range(..=ptr).next_back()?;
        if ptr >= start + reservation.len {
            return None;
        }
        let (map_start, mapping) = reservation.mappings.range(..=ptr).next_back()?;
        (ptr < map_start + mapping.len).then_some((*map_start, mapping.len))
    }
}

impl State {
    /// The reservation holding all of `[ptr, ptr + len)`.
    fn reservation_mut(&mut self, ptr: u64, len: u64) -> Option<&mut Reservation> {
        let (start, reservation) = self.reservations.range_mut(..=ptr).next_back()?;
        let end = ptr.checked_add(len)?;
        (end <= start + reservation.len).then_some(reservation)
    }

    /// One mapping fewer of `handle`; frees it if it was released and this was the last.
    fn drop_mapping(&mut self, process: &Process, handle: u64) {
        let Some(physical) = self.handles.get_mut(&handle) else {
            return;
        };
        physical.mappings = physical.mappings.saturating_sub(1);
        if physical.released && physical.mappings == 0 {
            self.forget(process, handle);
        }
    }

    fn forget(&mut self, process: &Process, handle: u64) {
        if let Some(physical) = self.handles.remove(&handle) {
            process.lease.release(physical.physical, physical.len);
            // Dropping `physical` closes the memfd; the pages go with the last mapping.
        }
    }
}

fn aligned(value: u64) -> bool {
    value.is_multiple_of(GRANULARITY)
}

/// Checks an allocation's properties and returns the CUDA ordinal it names.
fn device_of(process: &Process, prop: &CUmemAllocationProp) -> Result<CUdevice> {
    check(prop.type_ == CU_MEM_ALLOCATION_TYPE_PINNED)?;
    check(prop.location.type_ == CU_MEM_LOCATION_TYPE_DEVICE)?;
    process.gpu(prop.location.id)?;
    Ok(prop.location.id)
}

fn memfd(len: u64) -> Option<OwnedFd> {
    // SAFETY: plain system call with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fakegpu-vmm".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just returned to us and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: resizing our own memfd.
    (unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } == 0).then_some(fd)
}

/// Puts `[ptr, ptr + len)` back to reserved-but-inaccessible.
fn protect(ptr: u64, len: u64) {
    // SAFETY: the range lies inside a reservation we own (checked by the callers).
    unsafe {
        libc::mmap(
            ptr as *mut c_void,
            len as usize,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!handle.is_null() && flags == 0)?;
        let prop = unsafe { get(prop) }?;
        let device = device_of(process, &prop)?;
        let len = size as u64;
        check(len > 0 && aligned(len))?;
        let physical = process.gpus[device as usize].physical;
        process
            .lease
            .reserve(physical, len)
            .map_err(|_| CUDA_ERROR_OUT_OF_MEMORY)?;
        let Some(memfd) = memfd(len) else {
            process.lease.release(physical, len);
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        };
        let id = new_handle(Kind::Allocation);
        lock(&process.vmm.state).handles.insert(
            id,
            Physical {
                len,
                physical,
                memfd,
                released: false,
                mappings: 0,
            },
        );
        unsafe { put(handle, id) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    guard(|| {
        let process = process()?;
        let mut state = lock(&process.vmm.state);
        let physical = state
            .handles
            .get_mut(&handle)
            .filter(|p| !p.released)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        physical.released = true;
        if physical.mappings == 0 {
            state.forget(process, handle);
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    alignment: usize,
    addr: CUdeviceptr,
    flags: u64,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!ptr.is_null() && flags == 0)?;
        let len = size as u64;
        check(len > 0 && aligned(len))?;
        check(alignment == 0 || alignment.is_power_of_two())?;
        let align = (alignment as u64).max(GRANULARITY);
        // Over-reserve and trim, so the range is aligned; `addr` is a hint, as for the driver.
        let span = len + align;
        // SAFETY: a fresh inaccessible anonymous mapping.
        let raw = unsafe {
            libc::mmap(
                addr as *mut c_void,
                span as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        let raw = raw as u64;
        let start = raw.div_ceil(align) * align;
        // SAFETY: trimming the parts of our own fresh mapping outside [start, start + len).
        unsafe {
            if start > raw {
                libc::munmap(raw as *mut c_void, (start - raw) as usize);
            }
            let end = start + len;
            if raw + span > end {
                libc::munmap(end as *mut c_void, (raw + span - end) as usize);
            }
        }
        lock(&process.vmm.state).reservations.insert(
            start,
            Reservation {
                len,
                mappings: BTreeMap::new(),
            },
        );
        unsafe { put(ptr, start) }
    })
}

/// Frees a whole reservation (`size` must match); mappings still in it are unmapped first.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard(|| {
        let process = process()?;
        let mut state = lock(&process.vmm.state);
        check(
            state
                .reservations
                .get(&ptr)
                .is_some_and(|r| r.len == size as u64),
        )?;
        let reservation = state
            .reservations
            .remove(&ptr)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        for mapping in reservation.mappings.values() {
            state.drop_mapping(process, mapping.handle);
        }
        // SAFETY: the whole reservation is ours and now unused.
        unsafe { libc::munmap(ptr as *mut c_void, size) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> CUresult {
    guard(|| {
        let process = process()?;
        let (len, offset) = (size as u64, offset as u64);
        check(flags == 0 && len > 0 && aligned(len) && aligned(offset) && aligned(ptr))?;
        check(is_kind(handle, Kind::Allocation))?;
        let mut state = lock(&process.vmm.state);
        let fd = {
            let physical = state
                .handles
                .get(&handle)
                .filter(|p| !p.released)
                .ok_or(CUDA_ERROR_INVALID_VALUE)?;
            check(
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= physical.len),
            )?;
            physical.memfd.as_raw_fd()
        };
        let reservation = state
            .reservation_mut(ptr, len)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        let overlaps = reservation
            .mappings
            .range(..ptr + len)
            .next_back()
            .is_some_and(|(s, m)| s + m.len > ptr);
        check(!overlaps)?;
        // SAFETY: `[ptr, ptr + len)` lies in our reservation and is not mapped; the memfd is at
        // least `offset + len` long.
        let mapped = unsafe {
            libc::mmap(
                ptr as *mut c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(CUDA_ERROR_OUT_OF_MEMORY);
        }
        reservation.mappings.insert(ptr, Mapping { len, handle });
        if let Some(physical) = state.handles.get_mut(&handle) {
            physical.mappings += 1;
        }
        Ok(())
    })
}

/// Unmaps whole mappings that exactly tile `[ptr, ptr + size)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    guard(|| {
        let process = process()?;
        let len = size as u64;
        check(len > 0)?;
        let mut state = lock(&process.vmm.state);
        let reservation = state
            .reservation_mut(ptr, len)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        let mut cursor = ptr;
        let mut starts = Vec::new();
        for (start, mapping) in reservation.mappings.range(ptr..ptr + len) {
            check(*start == cursor)?;
            cursor += mapping.len;
            starts.push(*start);
        }
        check(cursor == ptr + len)?;
        let handles: Vec<u64> = starts
            .iter()
            .filter_map(|start| reservation.mappings.remove(start))
            .map(|m| m.handle)
            .collect();
        protect(ptr, len);
        for handle in handles {
            state.drop_mapping(process, handle);
        }
        Ok(())
    })
}

/// Validates the range (it must be mapped) and descriptors; access is already granted.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const CUmemAccessDesc,
    count: usize,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!desc.is_null() && count > 0 && size > 0)?;
        // SAFETY: the caller passes `count` descriptors.
        let descs = unsafe { std::slice::from_raw_parts(desc, count) };
        for d in descs {
            check(d.location.type_ == CU_MEM_LOCATION_TYPE_DEVICE)?;
            process.gpu(d.location.id)?;
            check(matches!(
                d.flags,
                CU_MEM_ACCESS_FLAGS_PROT_NONE
                    | CU_MEM_ACCESS_FLAGS_PROT_READ
                    | CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            ))?;
        }
        let mut state = lock(&process.vmm.state);
        let reservation = state
            .reservation_mut(ptr, size as u64)
            .ok_or(CUDA_ERROR_INVALID_VALUE)?;
        let end = ptr + size as u64;
        let mut cursor = ptr;
        // Every byte of the range must be mapped.
        if let Some((start, mapping)) = reservation.mappings.range(..=ptr).next_back()
            && start + mapping.len > ptr
        {
            cursor = start + mapping.len;
        }
        for (start, mapping) in reservation.mappings.range(ptr + 1..end) {
            check(*start <= cursor)?;
            cursor = cursor.max(start + mapping.len);
        }
        check(cursor >= end)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const CUmemAllocationProp,
    option: c_int,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(matches!(
            option,
            CU_MEM_ALLOC_GRANULARITY_MINIMUM | CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        ))?;
        let prop = unsafe { get(prop) }?;
        device_of(process, &prop)?;
        unsafe { put(granularity, GRANULARITY as usize) }
    })
}
