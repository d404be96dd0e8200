//! NVML 13.4's per-cgroup device-memory limits: `nvmlDeviceSetMemoryLimits_v1` and
//! `nvmlDeviceGetMemoryLimits_v1`, over the node's limit table (the model's `state::limits`),
//! which the fake CUDA driver enforces at every reservation of device memory.
//!
//! Only devices whose config says `memoryLimits: true` have the feature (the default node models
//! driver 570, which lacks it); the others answer `NVML_ERROR_NOT_SUPPORTED`. No fake handle is
//! a MIG handle, so the "MIG handles are not supported" case does not arise.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use tessera_fake_gpu_model::{CgroupDir, CgroupDirError, LimitError};
use tessera_gpu_abi::nvml::*;

use crate::device::resolve;
use crate::guard::{Result, check, guard};
use crate::library::Node;

/// Fails with `NVML_ERROR_NOT_SUPPORTED` unless the device has the feature.
fn supported(node: &Node, index: usize) -> Result {
    if node.config.devices[index].memory_limits {
        Ok(())
    } else {
        Err(NVML_ERROR_NOT_SUPPORTED)
    }
}

/// The cgroup directory `name_space` names. A path that cannot be opened as a directory of a
/// cgroup filesystem is `NVML_ERROR_OPERATING_SYSTEM`; so is one too long for the fake's table
/// (with a line on stderr saying so, as the real NVML has no such limit).
fn cgroup_dir(call: &str, name_space: *const std::ffi::c_char) -> Result<CgroupDir> {
    check(!name_space.is_null())?;
    // SAFETY: non-null, NUL-terminated per the API.
    let bytes = unsafe { CStr::from_ptr(name_space) }.to_bytes();
    let path = Path::new(OsStr::from_bytes(bytes));
    let dir = CgroupDir::open(path).and_then(|dir| {
        dir.require_cgroup_fs()?;
        Ok(dir)
    });
    dir.map_err(|error| {
        if matches!(
            error,
            CgroupDirError::TooLong(_) | CgroupDirError::NotCgroup
        ) {
            eprintln!("fakegpu: libnvidia-ml: {call}: {}: {error}", path.display());
        }
        NVML_ERROR_OPERATING_SYSTEM
    })
}

fn table_error(call: &str, error: LimitError) -> nvmlReturn_t {
    eprintln!("fakegpu: libnvidia-ml: {call}: {error}");
    match error {
        LimitError::TableFull => NVML_ERROR_INSUFFICIENT_RESOURCES,
        LimitError::Lock(_) => NVML_ERROR_UNKNOWN,
    }
}

fn set(device: nvmlDevice_t, limits: *mut nvmlSetMemoryLimits_v1_t) -> Result {
    const CALL: &str = "nvmlDeviceSetMemoryLimits_v1";
    let (node, index) = resolve(device)?;
    check(!limits.is_null())?;
    supported(&node, index)?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(NVML_ERROR_NO_PERMISSION);
    }
    // SAFETY: non-null, a `nvmlSetMemoryLimits_v1_t` per the API.
    let request = unsafe { limits.read() };
    let total = node.region.capacity(index);
    check(request.soft_limit <= request.hard_limit)?;
    check(request.soft_limit <= total)?;
    check(request.hard_limit == NVML_DEVICE_MEMORY_LIMIT_MAX || request.hard_limit <= total)?;
    let dir = cgroup_dir(CALL, request.name_space)?;
    node.region
        .set_memory_limit(index, &dir, request.soft_limit, request.hard_limit)
        .map_err(|e| table_error(CALL, e))
}

fn get(device: nvmlDevice_t, limits: *mut nvmlGetMemoryLimits_v1_t) -> Result {
    const CALL: &str = "nvmlDeviceGetMemoryLimits_v1";
    let (node, index) = resolve(device)?;
    check(!limits.is_null())?;
    supported(&node, index)?;
    // SAFETY: non-null, a `nvmlGetMemoryLimits_v1_t` per the API; `nameSpace` is its input.
    let name_space = unsafe { (*limits).name_space };
    let dir = cgroup_dir(CALL, name_space)?;
    let limit = node
        .region
        .memory_limit(index, &dir)
        .map_err(|e| table_error(CALL, e))?
        .ok_or(NVML_ERROR_NOT_FOUND)?;
    // SAFETY: as above; only the output fields are written.
    unsafe {
        (*limits).soft_limit = limit.soft;
        (*limits).hard_limit = limit.hard;
        (*limits).current_used = limit.current_used;
    }
    Ok(())
}

/// Root only. Soft 0 with hard `NVML_DEVICE_MEMORY_LIMIT_MAX` clears the cgroup's limits; a
/// removed cgroup's limits are cleared too. The soft limit is recorded and reported, not
/// enforced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceSetMemoryLimits_v1(
    device: nvmlDevice_t,
    limits: *mut nvmlSetMemoryLimits_v1_t,
) -> nvmlReturn_t {
    guard(|| set(device, limits))
}

/// `currentUsed` is the device memory of the live processes in the cgroup or below it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryLimits_v1(
    device: nvmlDevice_t,
    limits: *mut nvmlGetMemoryLimits_v1_t,
) -> nvmlReturn_t {
    guard(|| get(device, limits))
}
