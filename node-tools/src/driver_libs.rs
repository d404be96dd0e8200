//! The NVIDIA driver's user-space libraries, opened with `dlopen` so that a node without a driver
//! gets an error naming the library instead of a binary that cannot start.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::path::{Path, PathBuf};

use libloading::{Library, Symbol};
use tessera_gpu_abi::cuda::{CUcontext, CUdevice, CUresult, CUuuid};
use tessera_gpu_abi::nvml::{
    NVML_DEVICE_MEMORY_LIMIT_MAX, NVML_ERROR_NOT_FOUND, NVML_ERROR_NOT_SUPPORTED, nvmlDevice_t,
    nvmlDeviceGetMemoryLimits_v1_fn, nvmlDeviceSetMemoryLimits_v1_fn, nvmlGetMemoryLimits_v1_t,
    nvmlMemory_t, nvmlProcessInfo_t, nvmlReturn_t, nvmlSetMemoryLimits_v1_t,
};

/// What went wrong talking to the driver; each names the library or the call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load {library}")]
    Load {
        library: String,
        source: libloading::Error,
    },
    #[error("{library} has no {symbol} (a driver too old for it?)")]
    Symbol {
        library: String,
        symbol: &'static str,
        source: libloading::Error,
    },
    #[error("{call} failed: CUDA error {code}")]
    Cuda { call: &'static str, code: CUresult },
    #[error("{call} failed: NVML error {code}")]
    Nvml {
        call: &'static str,
        code: nvmlReturn_t,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the CUDA driver library is: beside NVML (the driver installs both in one directory),
/// else wherever the dynamic loader finds `libcuda.so.1`.
pub fn cuda_beside(nvml: Option<&Path>) -> PathBuf {
    match nvml.and_then(Path::parent) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("libcuda.so.1"),
        _ => PathBuf::from("libcuda.so.1"),
    }
}

fn open(path: &Path) -> Result<Library> {
    // SAFETY: loading the driver's library runs its initialisers, which is what using it means.
    unsafe { Library::new(path) }.map_err(|source| Error::Load {
        library: path.display().to_string(),
        source,
    })
}

fn symbol<'l, T>(library: &'l Library, path: &Path, name: &'static str) -> Result<Symbol<'l, T>> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    // SAFETY: every caller names `T` as the symbol's C prototype from NVIDIA's headers.
    unsafe { library.get(&bytes) }.map_err(|source| Error::Symbol {
        library: path.display().to_string(),
        symbol: name,
        source,
    })
}

/// The few CUDA driver calls the probe makes.
pub struct Cuda {
    library: Library,
    path: PathBuf,
}

impl Cuda {
    /// Loads the library and calls `cuInit(0)`.
    pub fn open(path: &Path) -> Result<Cuda> {
        let cuda = Cuda {
            library: open(path)?,
            path: path.to_path_buf(),
        };
        let init: Symbol<unsafe extern "C" fn(c_uint) -> CUresult> = cuda.symbol("cuInit")?;
        // SAFETY: cuInit takes flags, 0 being the only defined value.
        cuda.check("cuInit", unsafe { init(0) })?;
        Ok(cuda)
    }

    fn symbol<T>(&self, name: &'static str) -> Result<Symbol<'_, T>> {
        symbol(&self.library, &self.path, name)
    }

    fn check(&self, call: &'static str, code: CUresult) -> Result<()> {
        match code {
            0 => Ok(()),
            code => Err(Error::Cuda { call, code }),
        }
    }

    pub fn device_count(&self) -> Result<c_int> {
        let f: Symbol<unsafe extern "C" fn(*mut c_int) -> CUresult> =
            self.symbol("cuDeviceGetCount")?;
        let mut count = 0;
        // SAFETY: one out-parameter, a valid pointer.
        self.check("cuDeviceGetCount", unsafe { f(&mut count) })?;
        Ok(count)
    }

    pub fn device(&self, ordinal: c_int) -> Result<CUdevice> {
        let f: Symbol<unsafe extern "C" fn(*mut CUdevice, c_int) -> CUresult> =
            self.symbol("cuDeviceGet")?;
        let mut device = 0;
        // SAFETY: a valid out-pointer; the driver checks the ordinal.
        self.check("cuDeviceGet", unsafe { f(&mut device, ordinal) })?;
        Ok(device)
    }

    pub fn uuid(&self, device: CUdevice) -> Result<[u8; 16]> {
        let f: Symbol<unsafe extern "C" fn(*mut CUuuid, CUdevice) -> CUresult> =
            self.symbol("cuDeviceGetUuid")?;
        let mut uuid = CUuuid::default();
        // SAFETY: a valid out-pointer to a 16-byte CUuuid.
        self.check("cuDeviceGetUuid", unsafe { f(&mut uuid, device) })?;
        Ok(uuid.bytes)
    }

    /// Retains the device's primary context, makes it current, and waits until it is fully
    /// made: what a CUDA program's first runtime call does.
    pub fn open_primary_context(&self, device: CUdevice) -> Result<()> {
        let retain: Symbol<unsafe extern "C" fn(*mut CUcontext, CUdevice) -> CUresult> =
            self.symbol("cuDevicePrimaryCtxRetain")?;
        let set_current: Symbol<unsafe extern "C" fn(CUcontext) -> CUresult> =
            self.symbol("cuCtxSetCurrent")?;
        let synchronize: Symbol<unsafe extern "C" fn() -> CUresult> =
            self.symbol("cuCtxSynchronize")?;
        let mut context = std::ptr::null_mut();
        // SAFETY: a valid out-pointer and a device the driver handed out.
        self.check("cuDevicePrimaryCtxRetain", unsafe {
            retain(&mut context, device)
        })?;
        // SAFETY: the context just retained.
        self.check("cuCtxSetCurrent", unsafe { set_current(context) })?;
        // SAFETY: no arguments; acts on the current context.
        self.check("cuCtxSynchronize", unsafe { synchronize() })
    }

    pub fn close_primary_context(&self, device: CUdevice) -> Result<()> {
        let set_current: Symbol<unsafe extern "C" fn(CUcontext) -> CUresult> =
            self.symbol("cuCtxSetCurrent")?;
        let release: Symbol<unsafe extern "C" fn(CUdevice) -> CUresult> =
            self.symbol("cuDevicePrimaryCtxRelease")?;
        // SAFETY: NULL unbinds the calling thread's context.
        self.check("cuCtxSetCurrent", unsafe {
            set_current(std::ptr::null_mut())
        })?;
        // SAFETY: releases the reference open_primary_context took.
        self.check("cuDevicePrimaryCtxRelease", unsafe { release(device) })
    }
}

/// The few NVML calls the probe makes.
pub struct Nvml {
    library: Library,
    path: PathBuf,
}

impl Nvml {
    /// Loads the library and calls `nvmlInit_v2`.
    pub fn open(path: &Path) -> Result<Nvml> {
        let nvml = Nvml {
            library: open(path)?,
            path: path.to_path_buf(),
        };
        let init: Symbol<unsafe extern "C" fn() -> nvmlReturn_t> = nvml.symbol("nvmlInit_v2")?;
        // SAFETY: no arguments.
        nvml.check("nvmlInit_v2", unsafe { init() })?;
        Ok(nvml)
    }

    fn symbol<T>(&self, name: &'static str) -> Result<Symbol<'_, T>> {
        symbol(&self.library, &self.path, name)
    }

    fn check(&self, call: &'static str, code: nvmlReturn_t) -> Result<()> {
        match code {
            0 => Ok(()),
            code => Err(Error::Nvml { call, code }),
        }
    }

    pub fn device_count(&self) -> Result<c_uint> {
        let f: Symbol<unsafe extern "C" fn(*mut c_uint) -> nvmlReturn_t> =
            self.symbol("nvmlDeviceGetCount_v2")?;
        let mut count = 0;
        // SAFETY: one valid out-pointer.
        self.check("nvmlDeviceGetCount_v2", unsafe { f(&mut count) })?;
        Ok(count)
    }

    pub fn device(&self, index: c_uint) -> Result<nvmlDevice_t> {
        let f: Symbol<unsafe extern "C" fn(c_uint, *mut nvmlDevice_t) -> nvmlReturn_t> =
            self.symbol("nvmlDeviceGetHandleByIndex_v2")?;
        let mut device = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; NVML checks the index.
        self.check("nvmlDeviceGetHandleByIndex_v2", unsafe {
            f(index, &mut device)
        })?;
        Ok(device)
    }

    pub fn uuid(&self, device: nvmlDevice_t) -> Result<String> {
        let f: Symbol<unsafe extern "C" fn(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t> =
            self.symbol("nvmlDeviceGetUUID")?;
        let mut buffer = [0 as c_char; 96];
        // SAFETY: the buffer and its length; NVML NUL-terminates within it.
        self.check("nvmlDeviceGetUUID", unsafe {
            f(device, buffer.as_mut_ptr(), buffer.len() as c_uint)
        })?;
        // The buffer was zeroed, so a NUL is within it even if NVML wrote none.
        let text = CStr::from_bytes_until_nul(bytemuck_bytes(&buffer))
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(text)
    }

    /// The card's used bytes, all processes together.
    pub fn used(&self, device: nvmlDevice_t) -> Result<u64> {
        let f: Symbol<unsafe extern "C" fn(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t> =
            self.symbol("nvmlDeviceGetMemoryInfo")?;
        let mut memory = nvmlMemory_t::default();
        // SAFETY: a valid out-pointer to the v1 struct.
        self.check("nvmlDeviceGetMemoryInfo", unsafe { f(device, &mut memory) })?;
        Ok(memory.used)
    }

    /// The compute processes on the device with their used bytes.
    pub fn compute_processes(&self, device: nvmlDevice_t) -> Result<Vec<nvmlProcessInfo_t>> {
        let f: Symbol<
            unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t,
        > = self.symbol("nvmlDeviceGetComputeRunningProcesses_v3")?;
        // A few tries: the list may grow between asking its size and reading it.
        let mut room: c_uint = 64;
        for _ in 0..4 {
            let mut items = vec![nvmlProcessInfo_t::default(); room as usize];
            let mut count = room;
            // SAFETY: `items` has room for `count` entries, as NVML's list protocol requires.
            let code = unsafe { f(device, &mut count, items.as_mut_ptr()) };
            match code {
                0 => {
                    items.truncate(count as usize);
                    return Ok(items);
                }
                tessera_gpu_abi::nvml::NVML_ERROR_INSUFFICIENT_SIZE => room = count.max(room) * 2,
                code => {
                    return Err(Error::Nvml {
                        call: "nvmlDeviceGetComputeRunningProcesses_v3",
                        code,
                    });
                }
            }
        }
        Err(Error::Nvml {
            call: "nvmlDeviceGetComputeRunningProcesses_v3",
            code: tessera_gpu_abi::nvml::NVML_ERROR_INSUFFICIENT_SIZE,
        })
    }
}

/// Whether the driver can hold a cgroup's processes to a device-memory limit on a GPU (NVML 13.4's
/// `nvmlDeviceSetMemoryLimits_v1`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryLimits {
    Supported,
    /// The call exists but not for this GPU (or this driver): the reason.
    Unsupported(String),
    /// NVML is older than 13.4.
    Absent,
}

impl Nvml {
    /// Asks for the limits of the root cgroup, which nobody sets: "none set" means the driver
    /// keeps such limits on this GPU.
    pub fn memory_limits(&self, device: nvmlDevice_t) -> MemoryLimits {
        let Ok(get) =
            self.symbol::<nvmlDeviceGetMemoryLimits_v1_fn>("nvmlDeviceGetMemoryLimits_v1")
        else {
            return MemoryLimits::Absent;
        };
        if self
            .symbol::<nvmlDeviceSetMemoryLimits_v1_fn>("nvmlDeviceSetMemoryLimits_v1")
            .is_err()
        {
            return MemoryLimits::Absent;
        }
        let root = match cgroup_root() {
            Some(root) => root,
            None => {
                return MemoryLimits::Unsupported("no cgroup filesystem at /sys/fs/cgroup".into());
            }
        };
        let Ok(name) = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()) else {
            return MemoryLimits::Unsupported("the cgroup root's path has a NUL".into());
        };
        let mut limits = nvmlGetMemoryLimits_v1_t {
            name_space: name.as_ptr(),
            soft_limit: 0,
            hard_limit: 0,
            current_used: 0,
        };
        // SAFETY: a valid struct whose path outlives the call.
        match unsafe { get(device, &mut limits) } {
            0 | NVML_ERROR_NOT_FOUND => MemoryLimits::Supported,
            NVML_ERROR_NOT_SUPPORTED => MemoryLimits::Unsupported(
                "NVML_ERROR_NOT_SUPPORTED (a MIG-enabled GPU, or a driver without it)".into(),
            ),
            code => MemoryLimits::Unsupported(format!(
                "nvmlDeviceGetMemoryLimits_v1: NVML error {code}"
            )),
        }
    }

    /// Holds the processes of the cgroup `dir` (and below) to `hard` bytes on `device`.
    pub fn set_hard_limit(&self, device: nvmlDevice_t, dir: &Path, hard: u64) -> Result<()> {
        let set: Symbol<nvmlDeviceSetMemoryLimits_v1_fn> =
            self.symbol("nvmlDeviceSetMemoryLimits_v1")?;
        let name = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
            Error::Nvml {
                call: "nvmlDeviceSetMemoryLimits_v1 (a cgroup path with a NUL)",
                code: tessera_gpu_abi::nvml::NVML_ERROR_INVALID_ARGUMENT,
            }
        })?;
        let mut limits = nvmlSetMemoryLimits_v1_t {
            name_space: name.as_ptr(),
            soft_limit: 0,
            hard_limit: hard.min(NVML_DEVICE_MEMORY_LIMIT_MAX - 1),
        };
        // SAFETY: a valid struct whose path outlives the call.
        self.check("nvmlDeviceSetMemoryLimits_v1", unsafe {
            set(device, &mut limits)
        })
    }

    /// The hard limit and use of the cgroup `dir` on `device`, `None` where none is set.
    pub fn hard_limit(&self, device: nvmlDevice_t, dir: &Path) -> Result<Option<(u64, u64)>> {
        let get: Symbol<nvmlDeviceGetMemoryLimits_v1_fn> =
            self.symbol("nvmlDeviceGetMemoryLimits_v1")?;
        let name = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
            Error::Nvml {
                call: "nvmlDeviceGetMemoryLimits_v1 (a cgroup path with a NUL)",
                code: tessera_gpu_abi::nvml::NVML_ERROR_INVALID_ARGUMENT,
            }
        })?;
        let mut limits = nvmlGetMemoryLimits_v1_t {
            name_space: name.as_ptr(),
            soft_limit: 0,
            hard_limit: 0,
            current_used: 0,
        };
        // SAFETY: a valid struct whose path outlives the call.
        match unsafe { get(device, &mut limits) } {
            0 => Ok(Some((limits.hard_limit, limits.current_used))),
            NVML_ERROR_NOT_FOUND => Ok(None),
            code => Err(Error::Nvml {
                call: "nvmlDeviceGetMemoryLimits_v1",
                code,
            }),
        }
    }

    pub fn device_by_uuid(&self, uuid: &str) -> Result<nvmlDevice_t> {
        let f: Symbol<unsafe extern "C" fn(*const c_char, *mut nvmlDevice_t) -> nvmlReturn_t> =
            self.symbol("nvmlDeviceGetHandleByUUID")?;
        let name = std::ffi::CString::new(uuid).map_err(|_| Error::Nvml {
            call: "nvmlDeviceGetHandleByUUID (a UUID with a NUL)",
            code: tessera_gpu_abi::nvml::NVML_ERROR_INVALID_ARGUMENT,
        })?;
        let mut device = std::ptr::null_mut();
        // SAFETY: a NUL-terminated UUID and a valid out-pointer.
        self.check("nvmlDeviceGetHandleByUUID", unsafe {
            f(name.as_ptr(), &mut device)
        })?;
        Ok(device)
    }
}

/// The cgroup filesystem's root as NVML wants it: the unified (v2) hierarchy's mount point.
fn cgroup_root() -> Option<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return Some(base.to_path_buf());
    }
    let unified = base.join("unified");
    if unified.join("cgroup.controllers").exists() {
        return Some(unified);
    }
    base.join("memory").is_dir().then(|| base.join("memory"))
}

/// The directories of the cgroups process `pid` is in that a device-memory limit can name, as
/// NVML's `nameSpace` wants them: the unified (v2) hierarchy's where the host has one, and on a
/// host with v1 hierarchies (a hybrid host too) the memory controller's — a runtime places a
/// container in both, and which one a driver accounts by is the driver's business.
pub fn cgroup_dirs_of(pid: u32) -> std::io::Result<Vec<PathBuf>> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file)?;
    let dirs = cgroup_dirs_in(&text, Path::new("/sys/fs/cgroup"));
    if dirs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{file} names no cgroup directory that exists under /sys/fs/cgroup"),
        ));
    }
    Ok(dirs)
}

fn cgroup_dirs_in(proc_cgroup: &str, base: &Path) -> Vec<PathBuf> {
    let mut unified = None;
    let mut memory = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if relative.split('/').any(|c| c == "..") {
            return Vec::new();
        }
        if id == "0" && controllers.is_empty() {
            unified = Some(relative.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            memory = Some(relative.to_string());
        }
    }
    let unified_dir = if base.join("cgroup.controllers").exists() {
        unified.as_ref().map(|p| base.join(p))
    } else {
        unified.as_ref().map(|p| base.join("unified").join(p))
    };
    [
        unified_dir,
        memory.as_ref().map(|p| base.join("memory").join(p)),
    ]
    .into_iter()
    .flatten()
    .filter(|dir| dir.is_dir())
    .collect()
}

fn bytemuck_bytes(chars: &[c_char]) -> &[u8] {
    // SAFETY: c_char and u8 have the same size and alignment; any bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(chars.as_ptr().cast::<u8>(), chars.len()) }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` as the 16 bytes `cuDeviceGetUuid` gives.
pub fn uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = uuid
        .strip_prefix("GPU-")?
        .bytes()
        .filter(|b| *b != b'-')
        .collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_bytes_reads_nvml_text() {
        assert_eq!(
            uuid_bytes("GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b"),
            Some([
                0x40, 0x90, 0xa1, 0xb2, 0xc3, 0xd4, 0x4e, 0x5f, 0x8a, 0x6b, 0x7c, 0x8d, 0x9e, 0x0f,
                0x1a, 0x2b
            ])
        );
        assert_eq!(uuid_bytes("MIG-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b"), None);
        assert_eq!(uuid_bytes("GPU-4090a1b2"), None);
        assert_eq!(uuid_bytes("GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2z"), None);
    }

    #[test]
    fn a_process_cgroups_are_its_unified_and_its_memory_controllers() {
        let base = tempfile::tempdir().expect("tempdir");
        let b = base.path();
        std::fs::create_dir_all(b.join("unified/kubepods/pod1/c1")).expect("mkdir");
        std::fs::create_dir_all(b.join("memory/kubepods/pod1/c1")).expect("mkdir");
        let hybrid =
            "12:memory:/kubepods/pod1/c1\n1:name=systemd:/kubepods/pod1/c1\n0::/kubepods/pod1/c1\n";
        assert_eq!(
            cgroup_dirs_in(hybrid, b),
            [
                b.join("unified/kubepods/pod1/c1"),
                b.join("memory/kubepods/pod1/c1")
            ]
        );
        // A v1-only host.
        let v1 = "12:cpu,memory:/kubepods/pod1/c1\n";
        assert_eq!(cgroup_dirs_in(v1, b), [b.join("memory/kubepods/pod1/c1")]);
        // A v2-only host.
        std::fs::write(b.join("cgroup.controllers"), "memory\n").expect("controllers");
        std::fs::create_dir_all(b.join("kubepods/pod1/c1")).expect("mkdir");
        assert_eq!(
            cgroup_dirs_in("0::/kubepods/pod1/c1\n", b),
            [b.join("kubepods/pod1/c1")]
        );
        // Nothing that exists, or a path that climbs out.
        assert!(cgroup_dirs_in("0::/gone\n", b).is_empty());
        assert!(cgroup_dirs_in("0::/kubepods/../../etc\n", b).is_empty());
    }

    #[test]
    fn cuda_is_looked_for_beside_nvml() {
        assert_eq!(
            cuda_beside(Some(Path::new("/driver/usr/lib64/libnvidia-ml.so.1"))),
            PathBuf::from("/driver/usr/lib64/libcuda.so.1")
        );
        assert_eq!(
            cuda_beside(Some(Path::new("libnvidia-ml.so.1"))),
            PathBuf::from("libcuda.so.1")
        );
        assert_eq!(cuda_beside(None), PathBuf::from("libcuda.so.1"));
    }
}
