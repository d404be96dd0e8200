//! Which processes use a device: the live slots of the node's state file that have a context on
//! it or hold its memory. PIDs are as each process saw itself (its own PID namespace), where the
//! real NVML reports host PIDs.

use std::ffi::c_uint;

use tessera_fake_gpu_model::ProcessUsage;
use tessera_gpu_abi::nvml::*;

use crate::device::resolve;
use crate::guard::{Result, check, guard, put};

fn on_device(device: nvmlDevice_t) -> Result<(usize, Vec<ProcessUsage>)> {
    let (node, index) = resolve(device)?;
    let processes = node
        .region
        .processes()
        .into_iter()
        .filter(|p| p.is_on(index))
        .collect();
    Ok((index, processes))
}

/// NVML's list protocol: `*count` says how many entries `out` has room for; too few (or NULL)
/// answers the number needed with `NVML_ERROR_INSUFFICIENT_SIZE`.
fn fill<T>(count: *mut c_uint, out: *mut T, items: Vec<T>) -> Result {
    check(!count.is_null())?;
    // SAFETY: non-null, per the API an in/out count.
    let room = unsafe { *count } as usize;
    unsafe { put(count, items.len() as c_uint) }?;
    if items.is_empty() {
        return Ok(());
    }
    if out.is_null() || room < items.len() {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (i, item) in items.into_iter().enumerate() {
        // SAFETY: the caller has room for at least `room` entries, and i < items.len() <= room.
        unsafe { out.add(i).write(item) };
    }
    Ok(())
}

fn process_info(device: nvmlDevice_t, count: *mut c_uint, out: *mut nvmlProcessInfo_t) -> Result {
    let (index, processes) = on_device(device)?;
    let items = processes
        .iter()
        .map(|p| nvmlProcessInfo_t {
            pid: p.pid,
            used_gpu_memory: p.used[index],
            gpu_instance_id: NVML_VALUE_NOT_AVAILABLE_UINT,
            compute_instance_id: NVML_VALUE_NOT_AVAILABLE_UINT,
        })
        .collect();
    fill(count, out, items)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    device: nvmlDevice_t,
    count: *mut c_uint,
    out: *mut nvmlProcessInfo_v1_t,
) -> nvmlReturn_t {
    guard(|| {
        let (index, processes) = on_device(device)?;
        let items = processes
            .iter()
            .map(|p| nvmlProcessInfo_v1_t {
                pid: p.pid,
                used_gpu_memory: p.used[index],
            })
            .collect();
        fill(count, out, items)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    device: nvmlDevice_t,
    count: *mut c_uint,
    out: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    guard(|| process_info(device, count, out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    out: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    guard(|| process_info(device, count, out))
}

/// One sample per process on the device, all zero (no kernel time is simulated yet). With no
/// process, an empty list rather than the real call's `NVML_ERROR_NOT_FOUND`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    samples: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    _last_seen_timestamp: u64,
) -> nvmlReturn_t {
    guard(|| {
        let (node, index) = resolve(device)?;
        let (_, processes) = on_device(device)?;
        let now = node.region.clock_now();
        let items = processes
            .iter()
            .map(|p| nvmlProcessUtilizationSample_t {
                pid: p.pid,
                time_stamp: now / 1000,
                sm_util: crate::utilisation::percent(index, p.slot, p.pid, p.busy[index], now),
                ..Default::default()
            })
            .collect();
        fill(count, samples, items)
    })
}
