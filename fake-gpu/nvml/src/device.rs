//! Device handles and the per-device queries `nvidia-smi`, nvml-wrapper and Tessera's plugin
//! make. Memory "used" is what every process of the node holds on the card, from the shared
//! state the fake CUDA driver writes.
//!
//! A handle is the address of an entry in a static table, one per possible device: it stays
//! valid across shutdown and re-initialisation (callers keep handles longer than they should),
//! and it can be checked without dereferencing whatever a caller passes in.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::sync::Arc;

use tessera_fake_gpu_model::config::PciAddress;
use tessera_fake_gpu_model::{Device, MAX_DEVICES};
use tessera_gpu_abi::nvml::*;

use crate::guard::{Result, check, guard, put, put_str};
use crate::library::{Node, node};

#[repr(C)]
struct HandleTarget {
    index: u32,
}

static HANDLES: [HandleTarget; MAX_DEVICES] = {
    let mut handles = [const { HandleTarget { index: 0 } }; MAX_DEVICES];
    let mut i = 0;
    while i < MAX_DEVICES {
        handles[i].index = i as u32;
        i += 1;
    }
    handles
};

pub fn handle(index: usize) -> nvmlDevice_t {
    (&HANDLES[index] as *const HandleTarget).cast_mut().cast()
}

/// The device a handle names, with the node it belongs to.
pub fn resolve(device: nvmlDevice_t) -> Result<(Arc<Node>, usize)> {
    let node = node()?;
    let base = HANDLES.as_ptr() as usize;
    let offset = (device as usize).wrapping_sub(base);
    let size = size_of::<HandleTarget>();
    let index = offset / size;
    if !offset.is_multiple_of(size) || index >= node.config.devices.len() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    Ok((node, index))
}

/// Runs a query on the device a handle names.
fn with_device(
    device: nvmlDevice_t,
    query: impl FnOnce(&Node, usize, &Device) -> Result,
) -> nvmlReturn_t {
    guard(|| {
        let (node, index) = resolve(device)?;
        query(&node, index, &node.config.devices[index])
    })
}

/// What NVML keeps back on every card for itself (driver, ECC, …): reported by
/// `nvmlDeviceGetMemoryInfo_v2` as `reserved`, and inside `used` by the v1 call, as the real NVML
/// does. The fake CUDA driver does not take it off the card (its free memory is the card minus
/// what processes allocated), so NVML's free is this much lower than CUDA's.
pub const RESERVED_BYTES: u64 = 32 << 20;

// --- Enumeration ---------------------------------------------------------------------------------

fn count(out: *mut c_uint) -> Result {
    let node = node()?;
    unsafe { put(out, node.config.devices.len() as c_uint) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count_out: *mut c_uint) -> nvmlReturn_t {
    guard(|| count(count_out))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count_out: *mut c_uint) -> nvmlReturn_t {
    guard(|| count(count_out))
}

fn by_index(index: c_uint, out: *mut nvmlDevice_t) -> Result {
    let node = node()?;
    check((index as usize) < node.config.devices.len())?;
    unsafe { put(out, handle(index as usize)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| by_index(index, device))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| by_index(index, device))
}

/// By full UUID (`GPU-…`, any case).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| {
        let node = node()?;
        check(!uuid.is_null() && !device.is_null())?;
        // SAFETY: NUL-terminated per the API.
        let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
        let index = node
            .config
            .devices
            .iter()
            .position(|d| d.uuid.as_str().eq_ignore_ascii_case(wanted.trim()))
            .ok_or(NVML_ERROR_NOT_FOUND)?;
        unsafe { put(device, handle(index)) }
    })
}

fn by_pci_bus_id(bus_id: *const c_char, device: *mut nvmlDevice_t) -> Result {
    let node = node()?;
    check(!bus_id.is_null() && !device.is_null())?;
    // SAFETY: NUL-terminated per the API.
    let text = unsafe { CStr::from_ptr(bus_id) }.to_string_lossy();
    let wanted: PciAddress = text
        .trim()
        .parse()
        .map_err(|_| NVML_ERROR_INVALID_ARGUMENT)?;
    let index = node
        .config
        .devices
        .iter()
        .position(|d| d.pci == wanted)
        .ok_or(NVML_ERROR_NOT_FOUND)?;
    unsafe { put(device, handle(index)) }
}

/// Accepts NVML's (`00000000:01:00.0`) and CUDA's (`0000:01:00.0`) forms.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId(
    bus_id: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| by_pci_bus_id(bus_id, device))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guard(|| by_pci_bus_id(bus_id, device))
}

// --- Identity ------------------------------------------------------------------------------------

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe {
        put_str(uuid, length, d.uuid.as_str())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe { put_str(name, length, &d.name) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, i, _| unsafe { put(index, i as c_uint) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe { put(minor, d.minor_number) })
}

fn pci_info(d: &Device) -> nvmlPciInfo_t {
    let mut info = nvmlPciInfo_t {
        bus_id_legacy: [0; NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE],
        domain: d.pci.domain,
        bus: u32::from(d.pci.bus),
        device: u32::from(d.pci.device),
        pci_device_id: d.pci_device_id,
        pci_sub_system_id: d.pci_subsystem_id,
        bus_id: [0; NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE],
    };
    let legacy = d.pci.nvml_legacy_form();
    let full = d.pci.nvml_form();
    info.bus_id_legacy[..legacy.len()].copy_from_slice(legacy.as_bytes());
    info.bus_id[..full.len()].copy_from_slice(full.as_bytes());
    info
}

/// The v1 and v2 calls predate `busId[32]`: the struct they fill ends after `pciSubSystemId`
/// (callers built against old headers pass a shorter struct), so only that prefix is written.
fn legacy_pci_info(device: nvmlDevice_t, out: *mut nvmlPciInfo_t) -> nvmlReturn_t {
    with_device(device, |_, _, d| {
        check(!out.is_null())?;
        let info = pci_info(d);
        let prefix = std::mem::offset_of!(nvmlPciInfo_t, bus_id);
        // SAFETY: `out` points to at least the legacy struct, which is `prefix` bytes long.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&info as *const nvmlPciInfo_t).cast::<u8>(),
                out.cast::<u8>(),
                prefix,
            )
        };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    legacy_pci_info(device, pci)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v2(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    legacy_pci_info(device, pci)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe { put(pci, pci_info(d)) })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| {
        check(!major.is_null() && !minor.is_null())?;
        unsafe {
            put(major, d.compute_capability.major as c_int)?;
            put(minor, d.compute_capability.minor as c_int)
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetArchitecture(
    device: nvmlDevice_t,
    arch: *mut nvmlDeviceArchitecture_t,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe {
        put(arch, d.architecture.nvml_value())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetBrand(
    device: nvmlDevice_t,
    brand: *mut nvmlBrandType_t,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe {
        put(brand, d.brand.nvml_value())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNumGpuCores(
    device: nvmlDevice_t,
    cores: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, _, d| unsafe { put(cores, d.cuda_cores) })
}

/// No fake device supports MIG (the product targets cards without it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    _current: *mut c_uint,
    _pending: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |_, _, _| Err(NVML_ERROR_NOT_SUPPORTED))
}

// --- Memory and utilisation ----------------------------------------------------------------------

/// (total, used by processes) of a device, after returning dead processes' memory.
fn memory(node: &Node, index: usize) -> (u64, u64) {
    (node.region.capacity(index), node.region.used(index))
}

/// v1: `used` includes what NVML reserves, as in the real `nvmlMemory_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    out: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    with_device(device, |node, index, _| {
        let (total, used) = memory(node, index);
        let used = (used + RESERVED_BYTES).min(total);
        unsafe {
            put(
                out,
                nvmlMemory_t {
                    total,
                    free: total - used,
                    used,
                },
            )
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    out: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with_device(device, |node, index, _| {
        check(!out.is_null())?;
        // SAFETY: non-null; the caller sets `version` before the call.
        if unsafe { (*out).version } != NVML_MEMORY_V2 {
            return Err(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
        }
        let (total, used) = memory(node, index);
        let reserved = RESERVED_BYTES.min(total);
        let free = total.saturating_sub(reserved).saturating_sub(used);
        unsafe {
            put(
                out,
                nvmlMemory_v2_t {
                    version: NVML_MEMORY_V2,
                    total,
                    reserved,
                    free,
                    used,
                },
            )
        }
    })
}

/// The share of virtual time the device ran kernels since this client last asked (see
/// `utilisation`); memory utilisation is not simulated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    out: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_device(device, |node, index, _| {
        let region = &node.region;
        let gpu = crate::utilisation::percent(
            index,
            crate::utilisation::DEVICE,
            0,
            region.device_busy(index),
            region.clock_now(),
        );
        unsafe { put(out, nvmlUtilization_t { gpu, memory: 0 }) }
    })
}
