//! Device queries, answered from the node config for the devices `CUDA_VISIBLE_DEVICES` leaves
//! visible (ordinals are CUDA's, after reordering).

use std::ffi::{CStr, c_char, c_int};

use tessera_fake_gpu_model::config::PciAddress;
use tessera_gpu_abi::cuda::*;

use crate::guard::{Result, check, guard, put};
use crate::process::process;

/// Copies `text` into a C buffer of `len` bytes, truncating and always NUL-terminating.
///
/// # Safety
/// `buffer` is valid for `len` bytes.
unsafe fn write_c_string(buffer: *mut c_char, len: c_int, text: &str) -> Result {
    check(!buffer.is_null() && len > 0)?;
    let n = text.len().min(len as usize - 1);
    // SAFETY: `n + 1 <= len` bytes, within the caller's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buffer.cast::<u8>(), n);
        *buffer.add(n) = 0;
    }
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!device.is_null())?;
        process.gpu(ordinal)?;
        unsafe { put(device, ordinal) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    guard(|| {
        let process = process()?;
        unsafe { put(count, process.gpus.len() as c_int) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    guard(|| {
        let gpu = process()?.gpu(dev)?;
        unsafe { write_c_string(name, len, &gpu.spec.name) }
    })
}

fn uuid(out: *mut CUuuid, dev: CUdevice) -> Result {
    let gpu = process()?.gpu(dev)?;
    unsafe {
        put(
            out,
            CUuuid {
                bytes: gpu.spec.uuid.bytes(),
            },
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid(out: *mut CUuuid, dev: CUdevice) -> CUresult {
    guard(|| uuid(out, dev))
}

/// Same answer as v1: the fake has no MIG, where the two differ.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(out: *mut CUuuid, dev: CUdevice) -> CUresult {
    guard(|| uuid(out, dev))
}

/// The whole card, whatever other processes use.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    guard(|| {
        let gpu = process()?.gpu(dev)?;
        unsafe { put(bytes, gpu.spec.memory as usize) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetPCIBusId(
    bus_id: *mut c_char,
    len: c_int,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let gpu = process()?.gpu(dev)?;
        unsafe { write_c_string(bus_id, len, &gpu.spec.pci.cuda_form()) }
    })
}

/// Accepts CUDA's (`0000:01:00.0`) and NVML's (`00000000:01:00.0`) forms, any case.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetByPCIBusId(
    device: *mut CUdevice,
    bus_id: *const c_char,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!device.is_null() && !bus_id.is_null())?;
        // SAFETY: NUL-terminated per the API.
        let text = unsafe { CStr::from_ptr(bus_id) }
            .to_str()
            .map_err(|_| CUDA_ERROR_INVALID_VALUE)?;
        let wanted: PciAddress = text.trim().parse().map_err(|_| CUDA_ERROR_INVALID_VALUE)?;
        let ordinal = process
            .gpus
            .iter()
            .position(|g| g.spec.pci == wanted)
            .ok_or(CUDA_ERROR_INVALID_DEVICE)?;
        unsafe { put(device, ordinal as CUdevice) }
    })
}

/// No peer access between fake devices (as on the consumer cards the product targets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceCanAccessPeer(
    can: *mut c_int,
    dev: CUdevice,
    peer: CUdevice,
) -> CUresult {
    guard(|| {
        let process = process()?;
        check(!can.is_null())?;
        process.gpu(dev)?;
        process.gpu(peer)?;
        if dev == peer {
            return Err(CUDA_ERROR_INVALID_DEVICE);
        }
        unsafe { put(can, 0) }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    value: *mut c_int,
    attribute: CUdevice_attribute,
    dev: CUdevice,
) -> CUresult {
    guard(|| {
        let gpu = process()?.gpu(dev)?;
        check(!value.is_null())?;
        let answer = attribute_value(attribute, &gpu.spec, dev).ok_or(CUDA_ERROR_INVALID_VALUE)?;
        unsafe { put(value, answer) }
    })
}

/// `CUdevice_attribute` answers: from the config where it says something (SMs, compute
/// capability, PCI location, managed memory, clock), plausible constants for an Ada-class card
/// elsewhere. Attributes newer than the table (up to 150) read 0 rather than failing, since
/// libraries probe attributes the driver may not know; past that, `CUDA_ERROR_INVALID_VALUE`.
fn attribute_value(
    attribute: CUdevice_attribute,
    spec: &tessera_fake_gpu_model::Device,
    ordinal: CUdevice,
) -> Option<c_int> {
    let cc = spec.compute_capability;
    let hopper_or_newer = cc.major >= 9;
    let managed = c_int::from(spec.managed_memory);
    Some(match attribute {
        1 => 1024,                                             // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,                                         // MAX_BLOCK_DIM_X, _Y
        4 => 64,                                               // MAX_BLOCK_DIM_Z
        5 => i32::MAX,                                         // MAX_GRID_DIM_X
        6 | 7 => 65535,                                        // MAX_GRID_DIM_Y, _Z
        8 => 48 << 10,                                         // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 64 << 10,                                         // TOTAL_CONSTANT_MEMORY
        10 => 32,                                              // WARP_SIZE
        11 => i32::MAX,                                        // MAX_PITCH
        12 => 64 << 10,                                        // MAX_REGISTERS_PER_BLOCK
        13 => spec.clock_rate_khz as c_int,                    // CLOCK_RATE
        14 => 512,                                             // TEXTURE_ALIGNMENT
        15 => 1,                                               // GPU_OVERLAP
        16 => spec.sm_count as c_int,                          // MULTIPROCESSOR_COUNT
        17 => 0,                                               // KERNEL_EXEC_TIMEOUT
        18 => 0,                                               // INTEGRATED
        19 => 1,                                               // CAN_MAP_HOST_MEMORY
        20 => 0,                                               // COMPUTE_MODE (default)
        21 | 22 => 131072,                                     // MAXIMUM_TEXTURE1D_WIDTH, 2D_WIDTH
        23 => 65536,                                           // MAXIMUM_TEXTURE2D_HEIGHT
        24..=26 => 16384,                                      // MAXIMUM_TEXTURE3D_*
        27 | 28 => 32768,                // MAXIMUM_TEXTURE2D_LAYERED_WIDTH, _HEIGHT
        29 => 2048,                      // MAXIMUM_TEXTURE2D_LAYERED_LAYERS
        30 => 512,                       // SURFACE_ALIGNMENT
        31 => 1,                         // CONCURRENT_KERNELS
        32 => 0,                         // ECC_ENABLED
        33 => c_int::from(spec.pci.bus), // PCI_BUS_ID
        34 => c_int::from(spec.pci.device), // PCI_DEVICE_ID (slot)
        35 => 0,                         // TCC_DRIVER
        36 => 10_501_000,                // MEMORY_CLOCK_RATE (kHz)
        37 => 384,                       // GLOBAL_MEMORY_BUS_WIDTH
        38 => 72 << 20,                  // L2_CACHE_SIZE
        39 => spec.max_threads_per_sm as c_int, // MAX_THREADS_PER_MULTIPROCESSOR
        40 => 2,                         // ASYNC_ENGINE_COUNT
        41 => 1,                         // UNIFIED_ADDRESSING
        42 => 32768,                     // MAXIMUM_TEXTURE1D_LAYERED_WIDTH
        43 => 2048,                      // MAXIMUM_TEXTURE1D_LAYERED_LAYERS
        44 => 1,                         // CAN_TEX2D_GATHER
        45 | 46 => 32768,                // MAXIMUM_TEXTURE2D_GATHER_*
        47 | 48 => 8192,                 // MAXIMUM_TEXTURE3D_*_ALTERNATE
        49 => 32768,                     // MAXIMUM_TEXTURE3D_DEPTH_ALTERNATE
        50 => spec.pci.domain as c_int,  // PCI_DOMAIN_ID
        51 => 32,                        // TEXTURE_PITCH_ALIGNMENT
        52 | 53 => 32768,                // MAXIMUM_TEXTURECUBEMAP_WIDTH, _LAYERED_WIDTH
        54 => 2046,                      // MAXIMUM_TEXTURECUBEMAP_LAYERED_LAYERS
        55 => 32768,                     // MAXIMUM_SURFACE1D_WIDTH
        56 => 131072,                    // MAXIMUM_SURFACE2D_WIDTH
        57 => 65536,                     // MAXIMUM_SURFACE2D_HEIGHT
        58..=60 => 16384,                // MAXIMUM_SURFACE3D_*
        61 => 32768,                     // MAXIMUM_SURFACE1D_LAYERED_WIDTH
        62 => 2048,                      // MAXIMUM_SURFACE1D_LAYERED_LAYERS
        63 | 64 => 32768,                // MAXIMUM_SURFACE2D_LAYERED_WIDTH, _HEIGHT
        65 => 2048,                      // MAXIMUM_SURFACE2D_LAYERED_LAYERS
        66 | 67 => 32768,                // MAXIMUM_SURFACECUBEMAP_WIDTH, _LAYERED_WIDTH
        68 => 2046,                      // MAXIMUM_SURFACECUBEMAP_LAYERED_LAYERS
        69 => 1 << 28,                   // MAXIMUM_TEXTURE1D_LINEAR_WIDTH
        70 => 131072,                    // MAXIMUM_TEXTURE2D_LINEAR_WIDTH
        71 => 65000,                     // MAXIMUM_TEXTURE2D_LINEAR_HEIGHT
        72 => 2_097_120,                 // MAXIMUM_TEXTURE2D_LINEAR_PITCH
        73 | 74 => 32768,                // MAXIMUM_TEXTURE2D_MIPMAPPED_*
        75 => cc.major as c_int,         // COMPUTE_CAPABILITY_MAJOR
        76 => cc.minor as c_int,         // COMPUTE_CAPABILITY_MINOR
        77 => 32768,                     // MAXIMUM_TEXTURE1D_MIPMAPPED_WIDTH
        78 => 1,                         // STREAM_PRIORITIES_SUPPORTED
        79 | 80 => 1,                    // GLOBAL_L1_CACHE_SUPPORTED, LOCAL_L1_CACHE_SUPPORTED
        81 => 100 << 10,                 // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        82 => 64 << 10,                  // MAX_REGISTERS_PER_MULTIPROCESSOR
        83 => managed,                   // MANAGED_MEMORY
        84 => 0,                         // MULTI_GPU_BOARD
        85 => ordinal,                   // MULTI_GPU_BOARD_GROUP_ID
        86 => 0,                         // HOST_NATIVE_ATOMIC_SUPPORTED
        87 => 64,                        // SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO
        88 => 0,                         // PAGEABLE_MEMORY_ACCESS
        89 => managed,                   // CONCURRENT_MANAGED_ACCESS
        90 => 1,                         // COMPUTE_PREEMPTION_SUPPORTED
        91 => 0,                         // CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM
        92..=94 => 0,                    // (deprecated stream mem-op v1 attributes)
        95 => 1,                         // COOPERATIVE_LAUNCH
        96 => 0,                         // COOPERATIVE_MULTI_DEVICE_LAUNCH
        97 => 99 << 10,                  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        98 => 0,                         // CAN_FLUSH_REMOTE_WRITES
        99 => 1,                         // HOST_REGISTER_SUPPORTED
        100 | 101 => 0, // PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES, DIRECT_MANAGED_MEM_ACCESS_FROM_HOST
        102 => 1,       // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        103 => 1,       // HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
        104 | 105 => 0, // HANDLE_TYPE_WIN32_*
        106 => (spec.max_threads_per_sm / 64).max(1) as c_int, // MAX_BLOCKS_PER_MULTIPROCESSOR
        107 => 0,       // GENERIC_COMPRESSION_SUPPORTED
        108 => 48 << 20, // MAX_PERSISTING_L2_CACHE_SIZE
        109 => 134_213_632, // MAX_ACCESS_POLICY_WINDOW_SIZE
        110 => 0,       // GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED
        111 => 1024,    // RESERVED_SHARED_MEMORY_PER_BLOCK
        112..=114 => 1, // SPARSE_CUDA_ARRAY, READ_ONLY_HOST_REGISTER, TIMELINE_SEMAPHORE_INTEROP
        115 => 1,       // MEMORY_POOLS_SUPPORTED
        116..=118 => 0, // GPU_DIRECT_RDMA_*
        119 => 1,       // MEMPOOL_SUPPORTED_HANDLE_TYPES (POSIX fd)
        120 => c_int::from(hopper_or_newer), // CLUSTER_LAUNCH
        121 => 1,       // DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED
        122 | 123 => 1, // CAN_USE_64_BIT_STREAM_MEM_OPS, CAN_USE_STREAM_WAIT_VALUE_NOR
        124 => 0,       // DMA_BUF_SUPPORTED
        125 => 1,       // IPC_EVENT_SUPPORTED
        126 => {
            if hopper_or_newer {
                4
            } else {
                1
            }
        } // MEM_SYNC_DOMAIN_COUNT
        127 => c_int::from(hopper_or_newer), // TENSOR_MAP_ACCESS_SUPPORTED
        128 => 0,       // HANDLE_TYPE_FABRIC_SUPPORTED
        129 => 1,       // UNIFIED_FUNCTION_POINTERS
        130 => 0,       // NUMA_CONFIG
        131 => -1,      // NUMA_ID
        132 | 133 => 0, // MULTICAST_SUPPORTED, MPS_ENABLED
        134 => -1,      // HOST_NUMA_ID
        135..=150 => 0, // newer attributes: not simulated
        _ => return None,
    })
}
