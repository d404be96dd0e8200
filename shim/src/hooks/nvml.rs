//! NVML: what `nvidia-smi` and monitoring libraries read. Memory info reports the claim's slice
//! (total = limit, used = the claim's usage), so `nvidia-smi` inside the pod shows the slice.

use std::ffi::{CStr, c_char, c_uint};

use tessera_gpu_abi::nvml::*;

use crate::enforcer::{Enforcer, Mode, mode};
use crate::guard::guard;
use crate::real::nvml as real;

/// Runs an NVML call in the shim's mode: refused if the config could not be used.
fn nvml_dispatch<F: Copy>(
    f: &crate::real::RealFn<F>,
    call: impl FnOnce(F, Option<&Enforcer>) -> nvmlReturn_t,
) -> nvmlReturn_t {
    let mode = mode();
    let Some(real) = f.get() else {
        return NVML_ERROR_DRIVER_NOT_LOADED;
    };
    match mode {
        Mode::Passthrough => call(real, None),
        Mode::Enforcing(enforcer) => call(real, Some(enforcer)),
        Mode::Refused => NVML_ERROR_NO_PERMISSION,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    guard(NVML_ERROR_UNKNOWN, || {
        nvml_dispatch(&real::nvmlInit, |f, _| unsafe { f() })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    guard(NVML_ERROR_UNKNOWN, || {
        nvml_dispatch(&real::nvmlInit_v2, |f, _| unsafe { f() })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(flags: c_uint) -> nvmlReturn_t {
    guard(NVML_ERROR_UNKNOWN, || {
        nvml_dispatch(&real::nvmlInitWithFlags, |f, _| unsafe { f(flags) })
    })
}

/// The claim device behind an NVML handle, and its (total, used) as the claim sees them.
fn slice_of(enforcer: &Enforcer, device: nvmlDevice_t, card_total: u64) -> (u64, u64) {
    let Some(get_uuid) = real::nvmlDeviceGetUUID.get() else {
        return (0, 0);
    };
    let mut buffer = [0 as c_char; NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    // SAFETY: real NVML call into a buffer of the documented size.
    if unsafe { get_uuid(device, buffer.as_mut_ptr(), buffer.len() as c_uint) } != NVML_SUCCESS {
        return (0, 0);
    }
    // SAFETY: NVML NUL-terminates within the buffer.
    let uuid = unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy();
    match enforcer.device_by_uuid(&uuid) {
        Some(index) => {
            enforcer.ledger.reclaim_dead_slots();
            let total = enforcer.ledger.limit(index).min(card_total);
            (total, enforcer.ledger.used(index).min(total))
        }
        // A GPU outside the claim shows as empty.
        None => (0, 0),
    }
}

/// Runs a memory query and, under a claim, rewrites the answer NVML filled in to the slice.
fn slice_query<F: Copy, T>(
    real: &crate::real::RealFn<F>,
    call: impl FnOnce(F) -> nvmlReturn_t,
    memory: *mut T,
    rewrite: impl FnOnce(&Enforcer, &mut T),
) -> nvmlReturn_t {
    nvml_dispatch(real, |f, enforcer| {
        let result = call(f);
        if let (NVML_SUCCESS, Some(e)) = (result, enforcer) {
            // SAFETY: NVML filled the struct it was given (NULL was rejected before success).
            if let Some(m) = unsafe { memory.as_mut() } {
                rewrite(e, m);
            }
        }
        result
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    guard(NVML_ERROR_UNKNOWN, || {
        slice_query(
            &real::nvmlDeviceGetMemoryInfo,
            |f| unsafe { f(device, memory) },
            memory,
            |e, m| {
                let (total, used) = slice_of(e, device, m.total);
                *m = nvmlMemory_t {
                    total,
                    used,
                    free: total - used,
                };
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    guard(NVML_ERROR_UNKNOWN, || {
        slice_query(
            &real::nvmlDeviceGetMemoryInfo_v2,
            |f| unsafe { f(device, memory) },
            memory,
            |e, m| {
                let (total, used) = slice_of(e, device, m.total);
                // The driver's reserved memory belongs to the card, not the slice.
                m.total = total;
                m.reserved = 0;
                m.used = used;
                m.free = total - used;
            },
        )
    })
}
