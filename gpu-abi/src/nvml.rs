//! NVML types and return codes (`nvml.h`).
#![allow(non_camel_case_types)]

use core::ffi::{CStr, c_char, c_int, c_uint, c_void};

/// `nvmlReturn_t`, kept as an integer for the same reason as `CUresult`.
pub type nvmlReturn_t = c_int;
pub type nvmlDevice_t = *mut c_void;

pub const NVML_SUCCESS: nvmlReturn_t = 0;
pub const NVML_ERROR_UNINITIALIZED: nvmlReturn_t = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: nvmlReturn_t = 2;
pub const NVML_ERROR_NOT_SUPPORTED: nvmlReturn_t = 3;
pub const NVML_ERROR_NO_PERMISSION: nvmlReturn_t = 4;
pub const NVML_ERROR_NOT_FOUND: nvmlReturn_t = 6;
pub const NVML_ERROR_INSUFFICIENT_SIZE: nvmlReturn_t = 7;
pub const NVML_ERROR_DRIVER_NOT_LOADED: nvmlReturn_t = 9;
pub const NVML_ERROR_FUNCTION_NOT_FOUND: nvmlReturn_t = 13;
pub const NVML_ERROR_GPU_IS_LOST: nvmlReturn_t = 15;
pub const NVML_ERROR_ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;
pub const NVML_ERROR_UNKNOWN: nvmlReturn_t = 999;

/// Buffer sizes NVML documents for string queries.
pub const NVML_DEVICE_UUID_V2_BUFFER_SIZE: usize = 96;
pub const NVML_DEVICE_NAME_V2_BUFFER_SIZE: usize = 96;
pub const NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE: usize = 80;
pub const NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE: usize = 32;
pub const NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE: usize = 16;

/// `nvmlMemory_t`, answered by `nvmlDeviceGetMemoryInfo`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlMemory_t {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`, answered by `nvmlDeviceGetMemoryInfo_v2`; `version` must be
/// [`NVML_MEMORY_V2`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlMemory_v2_t {
    pub version: c_uint,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `NVML_STRUCT_VERSION(Memory, 2)`: the struct size with the version in the top byte.
pub const NVML_MEMORY_V2: c_uint = (core::mem::size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);

/// `nvmlPciInfo_t` (the v3 layout used by `nvmlDeviceGetPciInfo_v3`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlPciInfo_t {
    pub bus_id_legacy: [u8; NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [u8; NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE],
}

/// `nvmlProcessInfo_t` (v2/v3 layout of `nvmlDeviceGetComputeRunningProcesses_v3`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlProcessInfo_t {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlUtilization_t {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlProcessUtilizationSample_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlProcessUtilizationSample_t {
    pub pid: c_uint,
    pub time_stamp: u64,
    pub sm_util: c_uint,
    pub mem_util: c_uint,
    pub enc_util: c_uint,
    pub dec_util: c_uint,
}

/// `nvmlBrandType_t` values.
pub type nvmlBrandType_t = c_int;
pub const NVML_BRAND_GEFORCE: nvmlBrandType_t = 5;
pub const NVML_BRAND_TESLA: nvmlBrandType_t = 2;
pub const NVML_BRAND_NVIDIA: nvmlBrandType_t = 14;

/// `nvmlDeviceArchitecture_t` values.
pub type nvmlDeviceArchitecture_t = c_uint;
pub const NVML_DEVICE_ARCH_TURING: nvmlDeviceArchitecture_t = 6;
pub const NVML_DEVICE_ARCH_AMPERE: nvmlDeviceArchitecture_t = 7;
pub const NVML_DEVICE_ARCH_ADA: nvmlDeviceArchitecture_t = 8;
pub const NVML_DEVICE_ARCH_HOPPER: nvmlDeviceArchitecture_t = 9;

// --- Added for the fake NVML (fake-gpu/nvml); additive only. -----------------------------------

/// What `gpuInstanceId`/`computeInstanceId` hold when MIG is off.
pub const NVML_VALUE_NOT_AVAILABLE_UINT: c_uint = 0xFFFF_FFFF;

/// `nvmlProcessInfo_v1_t`, filled by `nvmlDeviceGetComputeRunningProcesses` (v1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct nvmlProcessInfo_v1_t {
    pub pid: c_uint,
    pub used_gpu_memory: u64,
}

/// The NVML library version buffer size (`nvmlSystemGetNVMLVersion`).
pub const NVML_SYSTEM_NVML_VERSION_BUFFER_SIZE: usize = 80;

pub const NVML_DEVICE_ARCH_KEPLER: nvmlDeviceArchitecture_t = 2;
pub const NVML_DEVICE_ARCH_MAXWELL: nvmlDeviceArchitecture_t = 3;
pub const NVML_DEVICE_ARCH_PASCAL: nvmlDeviceArchitecture_t = 4;
pub const NVML_DEVICE_ARCH_VOLTA: nvmlDeviceArchitecture_t = 5;
pub const NVML_DEVICE_ARCH_BLACKWELL: nvmlDeviceArchitecture_t = 10;

// --- Events (`nvmlEventSetCreate`, `nvmlDeviceRegisterEvents`, `nvmlEventSetWait_v2`) ----------

pub const NVML_ERROR_TIMEOUT: nvmlReturn_t = 10;

/// `nvmlEventSet_t`: an opaque handle.
pub type nvmlEventSet_t = *mut c_void;

/// `nvmlEventType*` bits (`unsigned long long`).
#[allow(non_upper_case_globals)]
pub const nvmlEventTypeSingleBitEccError: u64 = 0x0001;
#[allow(non_upper_case_globals)]
pub const nvmlEventTypeDoubleBitEccError: u64 = 0x0002;
#[allow(non_upper_case_globals)]
pub const nvmlEventTypePState: u64 = 0x0004;
#[allow(non_upper_case_globals)]
pub const nvmlEventTypeXidCriticalError: u64 = 0x0008;
#[allow(non_upper_case_globals)]
pub const nvmlEventTypeClock: u64 = 0x0010;
/// Every event type nvml.h defines (`nvmlEventTypeAll`).
#[allow(non_upper_case_globals)]
pub const nvmlEventTypeAll: u64 = 0xFF9F;

/// `nvmlEventData_t` as `nvmlEventSetWait_v2` fills it (the MIG ids came with `_v2`; the v1
/// `nvmlEventSetWait` fills only the fields before `gpu_instance_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlEventData_t {
    pub device: nvmlDevice_t,
    pub event_type: u64,
    /// The XID for `nvmlEventTypeXidCriticalError` (999: unknown).
    pub event_data: u64,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

impl Default for nvmlEventData_t {
    fn default() -> Self {
        nvmlEventData_t {
            device: core::ptr::null_mut(),
            event_type: 0,
            event_data: 0,
            gpu_instance_id: 0,
            compute_instance_id: 0,
        }
    }
}

// --- Per-cgroup device-memory limits (NVML 13.4: `nvmlDeviceSetMemoryLimits_v1`,
// `nvmlDeviceGetMemoryLimits_v1`) -----------------------------------------------------------------

/// "Blocked by the operating system/cgroups"; what the memory-limit calls answer for a cgroup
/// path they cannot open.
pub const NVML_ERROR_OPERATING_SYSTEM: nvmlReturn_t = 17;
pub const NVML_ERROR_INSUFFICIENT_RESOURCES: nvmlReturn_t = 23;

/// A hard limit of this value is no hard limit; soft 0 with hard `MAX` clears a cgroup's limits.
pub const NVML_DEVICE_MEMORY_LIMIT_MAX: u64 = 0xFFFF_FFFF_FFFF_FFFF;

/// `nvmlSetMemoryLimits_v1_t`, taken by `nvmlDeviceSetMemoryLimits_v1`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlSetMemoryLimits_v1_t {
    /// The cgroup's directory under the cgroup filesystem (`/sys/fs/cgroup/...`), NUL-terminated.
    pub name_space: *const c_char,
    pub soft_limit: u64,
    pub hard_limit: u64,
}

/// `nvmlGetMemoryLimits_v1_t`, filled by `nvmlDeviceGetMemoryLimits_v1` (`name_space` is the
/// input, the rest output).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct nvmlGetMemoryLimits_v1_t {
    pub name_space: *const c_char,
    pub soft_limit: u64,
    pub hard_limit: u64,
    /// Device memory the cgroup's processes (and those of the cgroups below it) hold.
    pub current_used: u64,
}

/// `nvmlDeviceSetMemoryLimits_v1`. Older NVMLs (before 13.4) do not export it, so a caller
/// resolves it with `dlsym` and treats its absence as "unsupported".
pub type nvmlDeviceSetMemoryLimits_v1_fn =
    unsafe extern "C" fn(nvmlDevice_t, *mut nvmlSetMemoryLimits_v1_t) -> nvmlReturn_t;
/// `nvmlDeviceGetMemoryLimits_v1`; resolved like [`nvmlDeviceSetMemoryLimits_v1_fn`].
pub type nvmlDeviceGetMemoryLimits_v1_fn =
    unsafe extern "C" fn(nvmlDevice_t, *mut nvmlGetMemoryLimits_v1_t) -> nvmlReturn_t;

/// The symbol names, for `dlsym`.
pub const NVML_DEVICE_SET_MEMORY_LIMITS_V1: &CStr = c"nvmlDeviceSetMemoryLimits_v1";
pub const NVML_DEVICE_GET_MEMORY_LIMITS_V1: &CStr = c"nvmlDeviceGetMemoryLimits_v1";

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(core::mem::size_of::<nvmlSetMemoryLimits_v1_t>() == 24);
    assert!(core::mem::size_of::<nvmlGetMemoryLimits_v1_t>() == 32);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    /// nvml.h's layout on LP64: a pointer then `unsigned long long`s, no padding.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn memory_limit_structs_have_nvmls_layout() {
        assert_eq!(size_of::<nvmlSetMemoryLimits_v1_t>(), 24);
        assert_eq!(align_of::<nvmlSetMemoryLimits_v1_t>(), 8);
        assert_eq!(offset_of!(nvmlSetMemoryLimits_v1_t, name_space), 0);
        assert_eq!(offset_of!(nvmlSetMemoryLimits_v1_t, soft_limit), 8);
        assert_eq!(offset_of!(nvmlSetMemoryLimits_v1_t, hard_limit), 16);

        assert_eq!(size_of::<nvmlGetMemoryLimits_v1_t>(), 32);
        assert_eq!(align_of::<nvmlGetMemoryLimits_v1_t>(), 8);
        assert_eq!(offset_of!(nvmlGetMemoryLimits_v1_t, name_space), 0);
        assert_eq!(offset_of!(nvmlGetMemoryLimits_v1_t, soft_limit), 8);
        assert_eq!(offset_of!(nvmlGetMemoryLimits_v1_t, hard_limit), 16);
        assert_eq!(offset_of!(nvmlGetMemoryLimits_v1_t, current_used), 24);
    }

    #[test]
    fn the_no_limit_value_is_all_ones() {
        assert_eq!(NVML_DEVICE_MEMORY_LIMIT_MAX, u64::MAX);
        assert_eq!(
            NVML_DEVICE_SET_MEMORY_LIMITS_V1.to_bytes(),
            b"nvmlDeviceSetMemoryLimits_v1"
        );
        assert_eq!(
            NVML_DEVICE_GET_MEMORY_LIMITS_V1.to_bytes(),
            b"nvmlDeviceGetMemoryLimits_v1"
        );
    }
}
