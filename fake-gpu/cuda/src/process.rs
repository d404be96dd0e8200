//! The driver's per-process state: created by the first successful `cuInit`, gone in a fork
//! child.
//!
//! The state lives behind one atomic pointer and is leaked, never freed: any thread may hold a
//! reference for the duration of a call, and the process ends without tearing it down (its slot
//! in the shared state file is returned by the kernel dropping the slot's lock — see the model's
//! `state` module). After `fork`, the child starts with no driver state; `cuInit` in the child
//! builds a fresh one with a slot of its own. The real driver does not support CUDA in a fork
//! child of an initialised parent at all; the fake does, because the shim must be tested there.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};

use tessera_fake_gpu_model::state::layout::MAX_CGROUP_HASHES;
use tessera_fake_gpu_model::{Config, Device, Lease};
use tessera_gpu_abi::cuda::*;

use crate::context::Contexts;
use crate::graph::Graphs;
use crate::guard::Result;
use crate::launch::Launches;
use crate::memory::Memory;
use crate::memory::array::Arrays;
use crate::memory::pool::Pools;
use crate::memory::vmm::Vmm;
use crate::module::Modules;
use crate::stream::Streams;

/// One GPU as this process sees it.
pub struct Gpu {
    /// Index in the node's config (NVML order), which is also its index in the state file.
    pub physical: usize,
    pub spec: Device,
}

pub struct Process {
    /// Distinguishes this process state from a fork parent's, whose contexts a child's copied
    /// thread stacks may still hold.
    pub generation: u64,
    /// Indexed by CUDA ordinal (after `CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<Gpu>,
    pub lease: Lease,
    pub contexts: Contexts,
    pub memory: Memory,
    pub pools: Pools,
    pub vmm: Vmm,
    pub arrays: Arrays,
    pub streams: Streams,
    pub modules: Modules,
    pub graphs: Graphs,
    pub launches: Launches,
}

impl Process {
    /// The GPU with CUDA ordinal `device`, or `CUDA_ERROR_INVALID_DEVICE`.
    pub fn gpu(&self, device: CUdevice) -> Result<&Gpu> {
        usize::try_from(device)
            .ok()
            .and_then(|d| self.gpus.get(d))
            .ok_or(CUDA_ERROR_INVALID_DEVICE)
    }
}

static PROCESS: AtomicPtr<Process> = AtomicPtr::new(std::ptr::null_mut());
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Serialises `cuInit`. A flag rather than a mutex so that a fork child, which may have been
/// copied while another thread held it, can simply clear it.
static INITIALISING: AtomicBool = AtomicBool::new(false);
/// The descriptor holding this process's slot lock, closed in a fork child (see `after_fork`).
static LEASE_FD: AtomicI32 = AtomicI32::new(-1);

/// The state of an initialised driver, or `CUDA_ERROR_NOT_INITIALIZED`.
#[inline]
pub fn process() -> Result<&'static Process> {
    let ptr = PROCESS.load(Ordering::Acquire);
    if ptr.is_null() {
        return Err(CUDA_ERROR_NOT_INITIALIZED);
    }
    // SAFETY: a non-null pointer was published by `init` from `Box::leak`; it is never freed.
    Ok(unsafe { &*ptr })
}

/// The process state if `cuInit` has succeeded (for introspection, which must not fail loudly).
pub fn try_process() -> Option<&'static Process> {
    process().ok()
}

/// The node's config, read once per process; a bad file is reported on stderr once.
pub fn config() -> Result<&'static (Config, Option<PathBuf>)> {
    static CONFIG: OnceLock<std::result::Result<(Config, Option<PathBuf>), String>> =
        OnceLock::new();
    static REPORTED: AtomicBool = AtomicBool::new(false);
    match CONFIG
        .get_or_init(|| tessera_fake_gpu_model::config_from_env().map_err(|e| e.to_string()))
    {
        Ok(config) => Ok(config),
        Err(message) => {
            if !REPORTED.swap(true, Ordering::Relaxed) {
                eprintln!("fakegpu: libcuda: {message}");
            }
            Err(CUDA_ERROR_INVALID_VALUE)
        }
    }
}

/// `cuInit`: builds the process state once.
pub fn init() -> Result {
    if !PROCESS.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    let _serial = InitLock::acquire();
    if !PROCESS.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    let (config, config_path) = config()?;
    let process = build(config, config_path.as_deref()).map_err(|(code, message)| {
        eprintln!("fakegpu: libcuda: cuInit: {message}");
        code
    })?;
    static AT_FORK: Once = Once::new();
    AT_FORK.call_once(|| {
        // SAFETY: registering a handler that only touches atomics and calls close(2), both
        // async-signal-safe as a fork child handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork)) };
    });
    LEASE_FD.store(process.lease.lock_fd(), Ordering::Relaxed);
    PROCESS.store(Box::into_raw(Box::new(process)), Ordering::Release);
    Ok(())
}

fn build(
    config: &Config,
    config_path: Option<&std::path::Path>,
) -> std::result::Result<Process, (CUresult, String)> {
    let visible_env =
        std::env::var_os("CUDA_VISIBLE_DEVICES").map(|v| v.to_string_lossy().into_owned());
    let uuids: Vec<&str> = config.devices.iter().map(|d| d.uuid.as_str()).collect();
    let mut visible = tessera_fake_gpu_model::visible_devices(visible_env.as_deref(), &uuids);
    // In a container the real driver can open only the device nodes the runtime gave it: with
    // FAKEGPU_DEVICE_NODES=<dir>, a GPU without `<dir>/nvidia<minor>` is not enumerated.
    if let Some(dir) = std::env::var_os("FAKEGPU_DEVICE_NODES") {
        let dir = std::path::Path::new(&dir);
        visible.retain(|&i| {
            dir.join(format!("nvidia{}", config.devices[i].minor_number))
                .exists()
        });
    }
    if visible.is_empty() {
        return Err((
            CUDA_ERROR_NO_DEVICE,
            format!(
                "no device is visible (CUDA_VISIBLE_DEVICES={:?})",
                visible_env.unwrap_or_default()
            ),
        ));
    }
    let state_path = tessera_fake_gpu_model::state_path_from_env(config_path);
    let region = tessera_fake_gpu_model::open_region(&state_path, config)
        .map_err(|e| (CUDA_ERROR_OPERATING_SYSTEM, e.to_string()))?;
    // Once, here: a process does not change cgroups behind the driver's back (in tests), and
    // which limits exist is read at every reservation.
    let cgroups = tessera_fake_gpu_model::CgroupSet::of_this_process();
    if cgroups.len() > MAX_CGROUP_HASHES {
        eprintln!(
            "fakegpu: libcuda: cuInit: this process is in {} cgroup directories (with their \
             ancestors); the state file records {MAX_CGROUP_HASHES}, so memory limits on the \
             others will not bind it",
            cgroups.len()
        );
    }
    let lease = region.claim_in(cgroups).map_err(|source| {
        let error = tessera_fake_gpu_model::Error::State {
            path: state_path.clone(),
            source,
        };
        (CUDA_ERROR_OPERATING_SYSTEM, error.to_string())
    })?;
    let gpus: Vec<Gpu> = visible
        .iter()
        .map(|&physical| Gpu {
            physical,
            spec: config.devices[physical].clone(),
        })
        .collect();
    let generation = GENERATION.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(Process {
        generation,
        contexts: Contexts::new(generation, &gpus),
        pools: Pools::new(&gpus),
        gpus,
        lease,
        memory: Memory::new(),
        vmm: Vmm::new(),
        arrays: Arrays::new(),
        streams: Streams::new(),
        modules: Modules::new(),
        graphs: Graphs::new(),
        launches: Launches::new(),
    })
}

/// Runs in a fork child: forget the parent's driver state (leaking it — another thread may have
/// held one of its locks at the fork) and let go of the parent's slot, which the child shares
/// through the inherited descriptor and must not keep alive after the parent dies.
extern "C" fn after_fork() {
    PROCESS.store(std::ptr::null_mut(), Ordering::Release);
    INITIALISING.store(false, Ordering::Release);
    let fd = LEASE_FD.swap(-1, Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: closing our own descriptor; the leaked parent state that owns it is never
        // dropped, so it is not closed twice.
        unsafe { libc::close(fd) };
    }
}

struct InitLock;

impl InitLock {
    fn acquire() -> Self {
        while INITIALISING
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        InitLock
    }
}

impl Drop for InitLock {
    fn drop(&mut self) {
        INITIALISING.store(false, Ordering::Release);
    }
}
