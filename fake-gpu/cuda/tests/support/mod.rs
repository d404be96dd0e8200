//! Loads the built `libcuda.so` with `dlopen`, and runs test scenarios in child processes so
//! that each gets a fresh driver, its own node config and its own state file.
#![allow(dead_code, non_snake_case)]

use std::ffi::{CString, c_char, c_float, c_int, c_uint, c_void};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub use tessera_gpu_abi::cuda::*;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// The built fake driver, or a failure saying how to build it (missing, or older than its
/// sources).
pub fn built_library(file: &str) -> PathBuf {
    tessera_built_libs::built(
        file,
        &[
            "fake-gpu/cuda/src",
            "fake-gpu/cuda/build.rs",
            "fake-gpu/model/src",
            "gpu-abi/src",
        ],
    )
}

pub struct Library {
    handle: *mut c_void,
    pub path: PathBuf,
}

// SAFETY: a dlopen handle may be used from any thread.
unsafe impl Send for Library {}
// SAFETY: as above; the handle is never closed.
unsafe impl Sync for Library {}

impl Library {
    pub fn open(path: &Path) -> Library {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: plain dlopen; the handle is never closed.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message after a failure.
            let error = unsafe { std::ffi::CStr::from_ptr(libc::dlerror()) };
            panic!("dlopen {}: {}", path.display(), error.to_string_lossy());
        }
        Library {
            handle,
            path: path.to_owned(),
        }
    }

    pub fn cuda() -> Library {
        Library::open(&built_library("libcuda.so"))
    }

    pub fn try_sym(&self, name: &str) -> Option<*mut c_void> {
        let c_name = CString::new(name).expect("symbol name");
        // SAFETY: valid handle and NUL-terminated name.
        let ptr = unsafe { libc::dlsym(self.handle, c_name.as_ptr()) };
        (!ptr.is_null()).then_some(ptr)
    }

    pub fn sym(&self, name: &str) -> *mut c_void {
        self.try_sym(name)
            .unwrap_or_else(|| panic!("{} does not export {name}", self.path.display()))
    }
}

macro_rules! api {
    ($($name:ident: fn($($arg:ty),* $(,)?) -> $ret:ty;)*) => {
        /// The driver's functions, resolved with `dlsym`.
        pub struct Cuda {
            pub lib: Library,
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl Cuda {
            pub fn load() -> Cuda {
                let lib = Library::cuda();
                Cuda {
                    // SAFETY: each symbol is the C function of that name, with this signature.
                    $($name: unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(lib.sym(stringify!($name))) },)*
                    lib,
                }
            }
        }
    };
}

api! {
    cuInit: fn(c_uint) -> CUresult;
    cuDriverGetVersion: fn(*mut c_int) -> CUresult;
    cuGetErrorString: fn(CUresult, *mut *const c_char) -> CUresult;
    cuGetErrorName: fn(CUresult, *mut *const c_char) -> CUresult;
    cuGetExportTable: fn(*mut *const c_void, *const CUuuid) -> CUresult;
    cuGetProcAddress: fn(*const c_char, *mut *mut c_void, c_int, u64) -> CUresult;
    cuGetProcAddress_v2: fn(*const c_char, *mut *mut c_void, c_int, u64, *mut c_int) -> CUresult;
    cuDeviceGet: fn(*mut CUdevice, c_int) -> CUresult;
    cuDeviceGetCount: fn(*mut c_int) -> CUresult;
    cuDeviceGetName: fn(*mut c_char, c_int, CUdevice) -> CUresult;
    cuDeviceGetUuid: fn(*mut CUuuid, CUdevice) -> CUresult;
    cuDeviceGetUuid_v2: fn(*mut CUuuid, CUdevice) -> CUresult;
    cuDeviceTotalMem_v2: fn(*mut usize, CUdevice) -> CUresult;
    cuDeviceGetAttribute: fn(*mut c_int, c_int, CUdevice) -> CUresult;
    cuDeviceGetPCIBusId: fn(*mut c_char, c_int, CUdevice) -> CUresult;
    cuDeviceGetByPCIBusId: fn(*mut CUdevice, *const c_char) -> CUresult;
    cuDeviceCanAccessPeer: fn(*mut c_int, CUdevice, CUdevice) -> CUresult;
    cuDeviceGetDefaultMemPool: fn(*mut CUmemoryPool, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRetain: fn(*mut CUcontext, CUdevice) -> CUresult;
    cuDevicePrimaryCtxRelease_v2: fn(CUdevice) -> CUresult;
    cuDevicePrimaryCtxReset_v2: fn(CUdevice) -> CUresult;
    cuDevicePrimaryCtxSetFlags: fn(CUdevice, c_uint) -> CUresult;
    cuDevicePrimaryCtxSetFlags_v2: fn(CUdevice, c_uint) -> CUresult;
    cuDevicePrimaryCtxGetState: fn(CUdevice, *mut c_uint, *mut c_int) -> CUresult;
    cuCtxCreate_v2: fn(*mut CUcontext, c_uint, CUdevice) -> CUresult;
    cuCtxDestroy_v2: fn(CUcontext) -> CUresult;
    cuCtxPushCurrent_v2: fn(CUcontext) -> CUresult;
    cuCtxPopCurrent_v2: fn(*mut CUcontext) -> CUresult;
    cuCtxSetCurrent: fn(CUcontext) -> CUresult;
    cuCtxGetCurrent: fn(*mut CUcontext) -> CUresult;
    cuCtxGetDevice: fn(*mut CUdevice) -> CUresult;
    cuCtxSynchronize: fn() -> CUresult;
    cuMemGetInfo_v2: fn(*mut usize, *mut usize) -> CUresult;
    cuMemAlloc_v2: fn(*mut CUdeviceptr, usize) -> CUresult;
    cuMemAllocPitch_v2: fn(*mut CUdeviceptr, *mut usize, usize, usize, c_uint) -> CUresult;
    cuMemFree_v2: fn(CUdeviceptr) -> CUresult;
    cuMemAllocManaged: fn(*mut CUdeviceptr, usize, c_uint) -> CUresult;
    cuMemAdvise: fn(CUdeviceptr, usize, c_int, CUdevice) -> CUresult;
    cuMemAdvise_v2: fn(CUdeviceptr, usize, c_int, CUmemLocation) -> CUresult;
    cuMemPrefetchAsync: fn(CUdeviceptr, usize, CUdevice, CUstream) -> CUresult;
    cuMemPrefetchAsync_v2: fn(CUdeviceptr, usize, CUmemLocation, c_uint, CUstream) -> CUresult;
    cuMemAllocHost_v2: fn(*mut *mut c_void, usize) -> CUresult;
    cuMemHostAlloc: fn(*mut *mut c_void, usize, c_uint) -> CUresult;
    cuMemFreeHost: fn(*mut c_void) -> CUresult;
    cuMemGetAddressRange_v2: fn(*mut CUdeviceptr, *mut usize, CUdeviceptr) -> CUresult;
    cuMemAllocAsync: fn(*mut CUdeviceptr, usize, CUstream) -> CUresult;
    cuMemAllocFromPoolAsync: fn(*mut CUdeviceptr, usize, CUmemoryPool, CUstream) -> CUresult;
    cuMemFreeAsync: fn(CUdeviceptr, CUstream) -> CUresult;
    cuMemPoolCreate: fn(*mut CUmemoryPool, *const CUmemPoolProps) -> CUresult;
    cuMemPoolDestroy: fn(CUmemoryPool) -> CUresult;
    cuMemPoolTrimTo: fn(CUmemoryPool, usize) -> CUresult;
    cuMemCreate: fn(*mut u64, usize, *const CUmemAllocationProp, u64) -> CUresult;
    cuMemRelease: fn(u64) -> CUresult;
    cuMemAddressReserve: fn(*mut CUdeviceptr, usize, usize, CUdeviceptr, u64) -> CUresult;
    cuMemAddressFree: fn(CUdeviceptr, usize) -> CUresult;
    cuMemMap: fn(CUdeviceptr, usize, usize, u64, u64) -> CUresult;
    cuMemUnmap: fn(CUdeviceptr, usize) -> CUresult;
    cuMemSetAccess: fn(CUdeviceptr, usize, *const CUmemAccessDesc, usize) -> CUresult;
    cuMemGetAllocationGranularity: fn(*mut usize, *const CUmemAllocationProp, c_int) -> CUresult;
    cuArrayCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY_DESCRIPTOR) -> CUresult;
    cuArray3DCreate_v2: fn(*mut CUarray, *const CUDA_ARRAY3D_DESCRIPTOR) -> CUresult;
    cuArrayDestroy: fn(CUarray) -> CUresult;
    cuMipmappedArrayCreate: fn(*mut CUmipmappedArray, *const CUDA_ARRAY3D_DESCRIPTOR, c_uint) -> CUresult;
    cuMipmappedArrayDestroy: fn(CUmipmappedArray) -> CUresult;
    cuMemcpy: fn(CUdeviceptr, CUdeviceptr, usize) -> CUresult;
    cuMemcpyHtoD_v2: fn(CUdeviceptr, *const c_void, usize) -> CUresult;
    cuMemcpyDtoH_v2: fn(*mut c_void, CUdeviceptr, usize) -> CUresult;
    cuMemcpyDtoD_v2: fn(CUdeviceptr, CUdeviceptr, usize) -> CUresult;
    cuMemcpyAsync: fn(CUdeviceptr, CUdeviceptr, usize, CUstream) -> CUresult;
    cuMemsetD8_v2: fn(CUdeviceptr, u8, usize) -> CUresult;
    cuStreamCreate: fn(*mut CUstream, c_uint) -> CUresult;
    cuStreamCreateWithPriority: fn(*mut CUstream, c_uint, c_int) -> CUresult;
    cuStreamDestroy_v2: fn(CUstream) -> CUresult;
    cuStreamSynchronize: fn(CUstream) -> CUresult;
    cuStreamQuery: fn(CUstream) -> CUresult;
    cuEventCreate: fn(*mut CUevent, c_uint) -> CUresult;
    cuEventDestroy_v2: fn(CUevent) -> CUresult;
    cuEventRecord: fn(CUevent, CUstream) -> CUresult;
    cuEventQuery: fn(CUevent) -> CUresult;
    cuEventSynchronize: fn(CUevent) -> CUresult;
    cuEventElapsedTime: fn(*mut c_float, CUevent, CUevent) -> CUresult;
    cuModuleLoadData: fn(*mut CUmodule, *const c_void) -> CUresult;
    cuModuleGetFunction: fn(*mut CUfunction, CUmodule, *const c_char) -> CUresult;
    cuModuleUnload: fn(CUmodule) -> CUresult;
    cuLaunchKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;
    cuLaunchKernel_ptsz: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void, *mut *mut c_void) -> CUresult;
    cuLaunchKernelEx: fn(*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void) -> CUresult;
    cuLaunchCooperativeKernel: fn(CUfunction, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, c_uint, CUstream, *mut *mut c_void) -> CUresult;
    cuGraphCreate: fn(*mut CUgraph, c_uint) -> CUresult;
    cuGraphDestroy: fn(CUgraph) -> CUresult;
    cuGraphAddKernelNode: fn(*mut CUgraphNode, CUgraph, *const CUgraphNode, usize, *const CUDA_KERNEL_NODE_PARAMS) -> CUresult;
    cuGraphAddKernelNode_v2: fn(*mut CUgraphNode, CUgraph, *const CUgraphNode, usize, *const CUDA_KERNEL_NODE_PARAMS_v2) -> CUresult;
    cuGraphInstantiateWithFlags: fn(*mut CUgraphExec, CUgraph, u64) -> CUresult;
    cuGraphInstantiate: fn(*mut CUgraphExec, CUgraph, *mut CUgraphNode, *mut c_char, usize) -> CUresult;
    cuGraphExecDestroy: fn(CUgraphExec) -> CUresult;
    cuGraphLaunch: fn(CUgraphExec, CUstream) -> CUresult;
    fakegpu_device_memory_used: fn(c_int) -> u64;
    fakegpu_managed_memory_used: fn(c_int) -> u64;
    fakegpu_process_memory_used: fn(c_int) -> u64;
    fakegpu_process_managed_memory_used: fn(c_int) -> u64;
    fakegpu_process_managed_host_preferred: fn() -> u64;
    fakegpu_device_memory_total: fn(c_int) -> u64;
    fakegpu_host_memory_used: fn() -> u64;
    fakegpu_launch_count: fn() -> u64;
    fakegpu_cooperative_launch_count: fn() -> u64;
    fakegpu_graph_launch_count: fn() -> u64;
    fakegpu_context_count: fn(c_int) -> u64;
    fakegpu_clock_ns: fn() -> u64;
    fakegpu_clock_sleep_until_ns: fn(u64) -> c_int;
    fakegpu_clock_leave: fn() -> ();
    fakegpu_process_busy_ns: fn(c_int) -> u64;
    fakegpu_device_busy_ns: fn(c_int) -> u64;
}

/// Calls a driver function and asserts its result, naming the call on failure. (Every call in
/// these tests is an FFI call, hence the `unsafe` inside.)
macro_rules! ok {
    ($call:expr) => {{
        let rc = unsafe { $call };
        assert_eq!(rc, CUDA_SUCCESS, "{} failed", stringify!($call));
    }};
}

/// Calls a driver function and returns its result code.
macro_rules! rc {
    ($call:expr) => {
        unsafe { $call }
    };
}

impl Cuda {
    /// `cuInit`, then the primary context of `device` made current.
    pub fn init_device(&self, device: CUdevice) -> CUcontext {
        let mut ctx = std::ptr::null_mut();
        ok!((self.cuInit)(0));
        ok!((self.cuDevicePrimaryCtxRetain)(&mut ctx, device));
        ok!((self.cuCtxSetCurrent)(ctx));
        ctx
    }

    pub fn alloc(&self, bytes: u64) -> Result<CUdeviceptr, CUresult> {
        let mut ptr = 0;
        match unsafe { (self.cuMemAlloc_v2)(&mut ptr, bytes as usize) } {
            CUDA_SUCCESS => Ok(ptr),
            rc => Err(rc),
        }
    }

    /// (free, total) from `cuMemGetInfo_v2`.
    pub fn mem_info(&self) -> (u64, u64) {
        let (mut free, mut total) = (0usize, 0usize);
        ok!((self.cuMemGetInfo_v2)(&mut free, &mut total));
        (free as u64, total as u64)
    }

    /// A loaded kernel to launch.
    pub fn kernel(&self) -> CUfunction {
        let (mut module, mut function) = (std::ptr::null_mut(), std::ptr::null_mut());
        ok!((self.cuModuleLoadData)(
            &mut module,
            c"any image".as_ptr().cast()
        ));
        ok!((self.cuModuleGetFunction)(
            &mut function,
            module,
            c"kernel".as_ptr()
        ));
        function
    }

    pub fn launch(&self, f: CUfunction, grid: u32, block: u32) -> CUresult {
        let null = std::ptr::null_mut();
        unsafe {
            (self.cuLaunchKernel)(
                f,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                null,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    }

    pub fn error_name(&self, rc: CUresult) -> String {
        let mut name = std::ptr::null();
        unsafe { (self.cuGetErrorName)(rc, &mut name) };
        if name.is_null() {
            format!("{rc}")
        } else {
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// A device allocation property on `device`, as VMM calls take it.
pub fn vmm_prop(device: c_int) -> CUmemAllocationProp {
    CUmemAllocationProp {
        location: CUmemLocation {
            type_: CU_MEM_LOCATION_TYPE_DEVICE,
            id: device,
        },
        ..Default::default()
    }
}

// --- Scenarios in child processes ---------------------------------------------------------------

const CHILD_ENV: &str = "FAKEGPU_TEST_SCENARIO";

/// A fake node for one test: a config file and a state file of its own.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
}

/// Two small cards, so that out-of-memory is quick to reach: 4 GiB and 1 GiB; contexts cost
/// nothing, so that the arithmetic is the allocations'.
pub const TWO_CARDS: &str = r#"{
    "driverVersion": "570.86.15",
    "cudaDriverVersion": 12080,
    "devices": [
        {"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "NVIDIA GeForce RTX 4090",
         "memory": 4294967296, "contextMemory": 0, "pciBusId": "0000:01:00.0", "brand": "geforce", "smCount": 128},
        {"uuid": "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "NVIDIA L40S",
         "memory": 1073741824, "contextMemory": 0, "pciBusId": "0000:41:00.0", "smCount": 142, "maxThreadsPerSm": 1536}
    ]
}"#;

impl Node {
    pub fn new(config: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.json");
        std::fs::write(&path, config).expect("write config");
        let state = dir.path().join("node.state");
        Node {
            dir,
            config: path,
            state,
        }
    }

    pub fn two_cards() -> Node {
        Node::new(TWO_CARDS)
    }

    /// This test executable, re-run to execute only `scenario`, against this node.
    pub fn command(&self, scenario: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().expect("test executable"));
        command
            .args(["--exact", scenario, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, scenario)
            .env("FAKEGPU_CONFIG", &self.config)
            .env("FAKEGPU_STATE", &self.state)
            .env_remove("CUDA_VISIBLE_DEVICES");
        command
    }

    /// Runs `scenario` in a child process and fails if it fails.
    pub fn run(&self, scenario: &str) {
        self.run_with(scenario, |_| {});
    }

    /// Runs `scenario` in a child process adjusted by `customise`, fails if it fails, and
    /// returns its stderr.
    pub fn run_with(&self, scenario: &str, customise: impl FnOnce(&mut Command)) -> String {
        let mut command = self.command(scenario);
        customise(&mut command);
        let output = command.output().expect("run scenario");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "scenario {scenario} failed ({}):\n{stdout}\n{stderr}",
            output.status,
        );
        stderr
    }
}

impl Node {
    /// The node's state file, opened as a process of the node (NVML, say) would.
    pub fn region(&self) -> std::sync::Arc<tessera_fake_gpu_model::Region> {
        let config = tessera_fake_gpu_model::Config::from_file(&self.config).expect("config");
        tessera_fake_gpu_model::open_region(&self.state, &config).expect("state file")
    }

    /// What `nvmlDeviceSetMemoryLimits_v1` does (without its argument checks).
    pub fn set_memory_limit(&self, device: usize, cgroup: &Path, soft: u64, hard: u64) {
        let dir = tessera_fake_gpu_model::CgroupDir::open(cgroup).expect("cgroup directory");
        self.region()
            .set_memory_limit(device, &dir, soft, hard)
            .expect("set the limit");
    }

    /// What `nvmlDeviceGetMemoryLimits_v1` answers; `None` for `NVML_ERROR_NOT_FOUND`.
    pub fn memory_limit(
        &self,
        device: usize,
        cgroup: &Path,
    ) -> Option<tessera_fake_gpu_model::MemoryLimit> {
        let dir = tessera_fake_gpu_model::CgroupDir::open(cgroup).expect("cgroup directory");
        self.region()
            .memory_limit(device, &dir)
            .expect("read the limit")
    }
}

/// Runs `body` when this process is the child running `scenario`; in the parent, runs the
/// scenario in a child against a fresh [`Node::two_cards`].
pub fn scenario(name: &str, body: impl FnOnce(&Cuda)) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(name) {
        body(&Cuda::load());
    } else if std::env::var_os(CHILD_ENV).is_none() {
        Node::two_cards().run(name);
    }
}

/// Whether this process is a child running `scenario`.
pub fn in_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(name)
}

// --- Agents: long-lived child processes driven line by line -------------------------------------

pub use tessera_built_libs::cgroup::join_cgroup;

pub const AGENT: &str = "agent";

/// A driver process another test talks to: `alloc <device> <bytes>` → `ok <index>` or
/// `err <code>`, `free <index>`, `used <device>` (fakegpu_device_memory_used),
/// `info <device>` (free and total from cuMemGetInfo on that device's primary context);
/// `async <device> <bytes>` (cuMemAllocAsync) and `managed <device> <bytes>` answer like
/// `alloc`; `ctx <device>` (cuCtxCreate, the context kept alive) → `ok` or `err <code>`;
/// `fill <device> <bytes>` allocates chunks of `bytes` until one fails → `filled <count>`.
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Node {
    pub fn agent(&self) -> Agent {
        self.spawn_agent(self.command(AGENT))
    }

    /// An agent that runs in `cgroup` from before its first instruction.
    pub fn agent_in(&self, cgroup: &tessera_built_libs::cgroup::TestCgroup) -> Agent {
        let mut command = self.command(AGENT);
        join_cgroup(&mut command, &cgroup.procs());
        let agent = self.spawn_agent(command);
        assert!(
            cgroup.pids().contains(&agent.pid()),
            "the agent is not in {}",
            cgroup.dir().display()
        );
        agent
    }

    fn spawn_agent(&self, mut command: Command) -> Agent {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agent");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut agent = Agent {
            child,
            stdin,
            stdout,
        };
        assert_eq!(agent.reply(), "ready");
        agent
    }
}

impl Agent {
    pub fn reply(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("agent output");
            assert!(n > 0, "the agent exited");
            // libtest prints its own lines around ours.
            if let Some((_, reply)) = line.split_once("agent> ") {
                return reply.trim().to_owned();
            }
        }
    }

    pub fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.reply()
    }

    /// Sends a command without waiting for its answer (several agents at once); read the
    /// answer with [`Agent::reply`].
    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").expect("write to agent");
        self.stdin.flush().expect("flush");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends the agent's loop; the process exits normally, without freeing anything.
    pub fn quit(mut self) {
        writeln!(self.stdin, "exit").expect("write to agent");
        self.stdin.flush().expect("flush");
        assert!(self.child.wait().expect("reap agent").success());
    }

    /// SIGKILL: no destructor, no atexit, nothing of the driver runs.
    pub fn kill(mut self) {
        self.child.kill().expect("kill agent");
        self.child.wait().expect("reap agent");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's main loop; call from a `#[test] fn agent()` in each test file that uses agents.
pub fn agent_main() {
    if !in_child(AGENT) {
        return;
    }
    let cuda = Cuda::load();
    ok!((cuda.cuInit)(0));
    let mut contexts = Vec::new();
    let mut count = 0;
    ok!((cuda.cuDeviceGetCount)(&mut count));
    for device in 0..count {
        let mut ctx = std::ptr::null_mut();
        ok!((cuda.cuDevicePrimaryCtxRetain)(&mut ctx, device));
        contexts.push(ctx);
    }
    let mut pointers = Vec::new();
    let say = |text: String| {
        println!("agent> {text}");
        std::io::stdout().flush().expect("flush");
    };
    say("ready".into());
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("agent input");
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match words.first().copied() {
            Some(kind @ ("alloc" | "async" | "managed")) => {
                ok!((cuda.cuCtxSetCurrent)(contexts[number(1) as usize]));
                let bytes = number(2) as usize;
                let mut ptr = 0;
                let rc = match kind {
                    "alloc" => rc!((cuda.cuMemAlloc_v2)(&mut ptr, bytes)),
                    "async" => rc!((cuda.cuMemAllocAsync)(
                        &mut ptr,
                        bytes,
                        std::ptr::null_mut()
                    )),
                    _ => rc!((cuda.cuMemAllocManaged)(
                        &mut ptr,
                        bytes,
                        CU_MEM_ATTACH_GLOBAL
                    )),
                };
                if rc == CUDA_SUCCESS {
                    pointers.push(ptr);
                    say(format!("ok {}", pointers.len() - 1));
                } else {
                    say(format!("err {rc}"));
                }
            }
            Some("ctx") => {
                let mut ctx = std::ptr::null_mut();
                match rc!((cuda.cuCtxCreate_v2)(&mut ctx, 0, number(1) as CUdevice)) {
                    CUDA_SUCCESS => say("ok".into()),
                    rc => say(format!("err {rc}")),
                }
            }
            Some("fill") => {
                ok!((cuda.cuCtxSetCurrent)(contexts[number(1) as usize]));
                let mut count = 0;
                while let Ok(ptr) = cuda.alloc(number(2)) {
                    pointers.push(ptr);
                    count += 1;
                }
                say(format!("filled {count}"));
            }
            Some("free") => say(format!(
                "rc {}",
                rc!((cuda.cuMemFree_v2)(pointers[number(1) as usize]))
            )),
            Some("used") => say(format!(
                "{}",
                rc!((cuda.fakegpu_device_memory_used)(number(1) as c_int))
            )),
            Some("info") => {
                ok!((cuda.cuCtxSetCurrent)(contexts[number(1) as usize]));
                let (free, total) = cuda.mem_info();
                say(format!("{free} {total}"));
            }
            Some("exit") | None => break,
            Some(other) => say(format!("unknown {other}")),
        }
    }
}
