//! NVML's life cycle (`nvmlInit*` / `nvmlShutdown`, reference-counted as NVML documents) and the
//! library-wide queries: versions, error strings, process names.
//!
//! Each first `nvmlInit` reads the node config (`FAKEGPU_CONFIG`) and opens the node's state file
//! (`FAKEGPU_STATE`), the same two files the fake CUDA driver uses, so memory and processes are
//! what the CUDA processes of the node really hold. NVML sees every device of the node:
//! `CUDA_VISIBLE_DEVICES` does not apply to it, as with the real NVML.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::sync::{Arc, Mutex};

use tessera_fake_gpu_model::{Config, Region};
use tessera_gpu_abi::nvml::*;

use crate::guard::{Result, check, guard, put, put_str};

/// What an initialised library reads from.
pub struct Node {
    pub config: Config,
    pub region: Arc<Region>,
    /// The log of injected events (`FAKEGPU_EVENTS`, default `<state>.events`).
    pub events: std::path::PathBuf,
}

struct Library {
    refs: u32,
    node: Option<Arc<Node>>,
}

static LIBRARY: Mutex<Library> = Mutex::new(Library {
    refs: 0,
    node: None,
});

fn library() -> std::sync::MutexGuard<'static, Library> {
    LIBRARY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node of an initialised library, or `NVML_ERROR_UNINITIALIZED`.
pub fn node() -> Result<Arc<Node>> {
    library().node.clone().ok_or(NVML_ERROR_UNINITIALIZED)
}

fn open_node() -> std::result::Result<Node, String> {
    let (config, config_path) =
        tessera_fake_gpu_model::config_from_env().map_err(|e| e.to_string())?;
    let state_path = tessera_fake_gpu_model::state_path_from_env(config_path.as_deref());
    let region =
        tessera_fake_gpu_model::open_region(&state_path, &config).map_err(|e| e.to_string())?;
    let events = tessera_fake_gpu_model::events_path_from_env(&state_path);
    Ok(Node {
        config,
        region,
        events,
    })
}

/// A node that cannot be read (bad config, unusable state file) fails with `NVML_ERROR_UNKNOWN`
/// and a line on stderr naming the file and the problem.
fn init() -> Result {
    let mut library = library();
    if library.refs == 0 {
        let node = open_node().map_err(|message| {
            eprintln!("fakegpu: libnvidia-ml: nvmlInit: {message}");
            NVML_ERROR_UNKNOWN
        })?;
        library.node = Some(Arc::new(node));
    }
    library.refs += 1;
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    guard(init)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    guard(init)
}

/// `NVML_INIT_FLAG_NO_GPUS` and `NVML_INIT_FLAG_NO_ATTACH` change nothing for fake devices.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    guard(init)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guard(|| {
        let mut library = library();
        if library.refs == 0 {
            return Err(NVML_ERROR_UNINITIALIZED);
        }
        library.refs -= 1;
        if library.refs == 0 {
            // Calls in flight keep their `Arc`; the state file closes with the last of them.
            library.node = None;
        }
        Ok(())
    })
}

/// Works without `nvmlInit`, as the real one does.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"OS Call Failed",
        18 => c"RM has detected an NVML/RM version mismatch",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        22 => c"vGPU ECC not supported",
        23 => c"Insufficient resources",
        24 => c"Frequency not supported",
        25 => c"Argument version mismatch",
        26 => c"Deprecated",
        27 => c"Not Ready",
        28 => c"GPU not found",
        29 => c"Invalid state",
        999 => c"Unknown Error",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let node = node()?;
        unsafe { put_str(version, length, &node.config.driver_version) }
    })
}

/// NVML's version is the CUDA major version and the driver version, e.g. `12.570.86.15`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        let node = node()?;
        let text = format!(
            "{}.{}",
            node.config.cuda_driver_version / 1000,
            node.config.driver_version
        );
        unsafe { put_str(version, length, &text) }
    })
}

fn cuda_driver_version(version: *mut c_int) -> Result {
    let node = node()?;
    unsafe { put(version, node.config.cuda_driver_version) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> nvmlReturn_t {
    guard(|| cuda_driver_version(version))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    guard(|| cuda_driver_version(version))
}

/// The process's command name from `/proc` (as seen from this PID namespace).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetProcessName(
    pid: c_uint,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guard(|| {
        node()?;
        check(!name.is_null() && length > 0)?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_err(|_| NVML_ERROR_NOT_FOUND)?;
        let comm = comm.trim_end();
        // Truncates to the buffer, as the real call does.
        let mut end = comm.len().min(length as usize - 1);
        while !comm.is_char_boundary(end) {
            end -= 1;
        }
        let text = &comm[..end];
        unsafe { put_str(name, length, text) }
    })
}
