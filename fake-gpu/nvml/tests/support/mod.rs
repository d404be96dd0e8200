//! Finds the built fake libraries, runs test scenarios in child processes (each with a fresh
//! library, node config and state file), and starts fake CUDA processes for NVML to observe.
#![allow(dead_code, non_snake_case)]

use std::ffi::{CString, c_int, c_uint, c_void};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A fake library of this workspace (`libnvidia_ml.so`, `libcuda.so`), failing with how to
/// build it when it is missing or older than its sources.
pub fn built_library(file: &str, crate_dir: &str) -> PathBuf {
    let own = format!("fake-gpu/{crate_dir}/src");
    tessera_built_libs::built(file, &[&own, "fake-gpu/model/src", "gpu-abi/src"])
}

pub fn nvml_library() -> PathBuf {
    built_library("libnvidia_ml.so", "nvml")
}

pub fn cuda_library() -> PathBuf {
    built_library("libcuda.so", "cuda")
}

pub struct Library {
    handle: *mut c_void,
    pub path: PathBuf,
}

impl Library {
    pub fn open(path: &Path) -> Library {
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: plain dlopen; the handle is never closed.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(!handle.is_null(), "dlopen {} failed", path.display());
        Library {
            handle,
            path: path.to_owned(),
        }
    }

    pub fn try_sym(&self, name: &str) -> Option<*mut c_void> {
        let c_name = CString::new(name).expect("symbol name");
        // SAFETY: valid handle and NUL-terminated name.
        let ptr = unsafe { libc::dlsym(self.handle, c_name.as_ptr()) };
        (!ptr.is_null()).then_some(ptr)
    }

    /// The function `name`, typed as `F` (an `unsafe extern "C" fn` type).
    pub fn func<F: Copy>(&self, name: &str) -> F {
        let ptr = self
            .try_sym(name)
            .unwrap_or_else(|| panic!("{} does not export {name}", self.path.display()));
        assert_eq!(size_of::<F>(), size_of::<*mut c_void>());
        // SAFETY: `F` is a function pointer type matching the C function `name`.
        unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) }
    }
}

// --- The node and scenarios ----------------------------------------------------------------------

pub const SCENARIO_ENV: &str = "FAKEGPU_TEST_SCENARIO";

/// Two cards: an RTX 4090 with 4 GiB and an L40S with 1 GiB (small, so tests stay cheap).
pub const TWO_CARDS: &str = r#"{
    "driverVersion": "570.86.15",
    "cudaDriverVersion": 12080,
    "devices": [
        {"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "NVIDIA GeForce RTX 4090",
         "memory": 4294967296, "contextMemory": 0, "pciBusId": "0000:01:00.0", "pciDeviceId": 646189278,
         "computeCapability": "8.9", "brand": "geforce", "smCount": 128},
        {"uuid": "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "NVIDIA L40S",
         "memory": 1073741824, "contextMemory": 0, "pciBusId": "0000:41:00.0", "computeCapability": "8.9",
         "smCount": 142, "minorNumber": 5}
    ]
}"#;

pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state: PathBuf,
}

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
            .env(SCENARIO_ENV, scenario)
            .env("FAKEGPU_CONFIG", &self.config)
            .env("FAKEGPU_STATE", &self.state)
            .env_remove("CUDA_VISIBLE_DEVICES");
        command
    }

    /// Runs `scenario` in a child adjusted by `customise`, fails if it fails, returns its stderr.
    pub fn run_with(&self, scenario: &str, customise: impl FnOnce(&mut Command)) -> String {
        let mut command = self.command(scenario);
        customise(&mut command);
        let output = command.output().expect("run scenario");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "scenario {scenario} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        stderr
    }

    pub fn run(&self, scenario: &str) -> String {
        self.run_with(scenario, |_| {})
    }
}

/// The node's events file, in a scenario's child: `<state>.events`, where the fake NVML reads
/// injected XIDs.
pub fn events_file() -> PathBuf {
    let state = std::env::var_os("FAKEGPU_STATE").expect("in a scenario's child");
    tessera_fake_gpu_model::events_path_from_env(Path::new(&state))
}

/// Whether this process is the child running `scenario`.
pub fn in_child(scenario: &str) -> bool {
    std::env::var(SCENARIO_ENV).as_deref() == Ok(scenario)
}

/// Whether this process is a child running any scenario (parent-only tests return at once).
pub fn in_any_child() -> bool {
    std::env::var_os(SCENARIO_ENV).is_some()
}

/// Runs `body` in the child running `scenario`; in the parent, runs that child against a fresh
/// two-card node.
pub fn scenario(name: &str, body: impl FnOnce()) {
    if in_child(name) {
        body();
    } else if !in_any_child() {
        Node::two_cards().run(name);
    }
}

// --- A fake CUDA process for NVML to see ----------------------------------------------------------

pub const CUDA_HOLDER: &str = "cuda_holder";

/// A child process using the fake CUDA driver: it takes a context on every device, allocates
/// `FAKEGPU_HOLD` (`device:bytes,…`), says so, and waits (until killed or its stdin closes).
pub struct CudaProcess {
    child: Child,
    _stdin: ChildStdin,
}

pub use tessera_built_libs::cgroup::join_cgroup;

impl Node {
    pub fn cuda_process(&self, hold: &str) -> CudaProcess {
        self.spawn_cuda_process(self.command(CUDA_HOLDER), hold)
    }

    /// A CUDA process in `cgroup` from before its first instruction.
    pub fn cuda_process_in(
        &self,
        cgroup: &tessera_built_libs::cgroup::TestCgroup,
        hold: &str,
    ) -> CudaProcess {
        let mut command = self.command(CUDA_HOLDER);
        join_cgroup(&mut command, &cgroup.procs());
        let process = self.spawn_cuda_process(command, hold);
        assert!(
            cgroup.pids().contains(&process.pid()),
            "the CUDA process is not in {}",
            cgroup.dir().display()
        );
        process
    }

    fn spawn_cuda_process(&self, mut command: Command, hold: &str) -> CudaProcess {
        let mut child = command
            .env("FAKEGPU_HOLD", hold)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the CUDA process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let holding = BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .any(|l| l.contains("FAKEGPU-HOLDING"));
        if !holding {
            let status = child.wait().expect("reap the CUDA process");
            panic!("the CUDA process exited ({status}) before allocating");
        }
        CudaProcess {
            child,
            _stdin: stdin,
        }
    }
}

impl CudaProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reap");
    }
}

impl Drop for CudaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The holder's body; call from a `#[test] fn cuda_holder()` in each test file that uses it.
pub fn cuda_holder_main() {
    if !in_child(CUDA_HOLDER) {
        return;
    }
    type Init = unsafe extern "C" fn(c_uint) -> c_int;
    type Count = unsafe extern "C" fn(*mut c_int) -> c_int;
    type Retain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int;
    type SetCurrent = unsafe extern "C" fn(*mut c_void) -> c_int;
    type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
    let cuda = Library::open(&cuda_library());
    let (init, count, retain, set_current, alloc) = (
        cuda.func::<Init>("cuInit"),
        cuda.func::<Count>("cuDeviceGetCount"),
        cuda.func::<Retain>("cuDevicePrimaryCtxRetain"),
        cuda.func::<SetCurrent>("cuCtxSetCurrent"),
        cuda.func::<Alloc>("cuMemAlloc_v2"),
    );
    unsafe {
        assert_eq!(init(0), 0);
        let mut devices = 0;
        assert_eq!(count(&mut devices), 0);
        let mut contexts = Vec::new();
        for device in 0..devices {
            let mut ctx = std::ptr::null_mut();
            assert_eq!(retain(&mut ctx, device), 0);
            contexts.push(ctx);
        }
        let hold = std::env::var("FAKEGPU_HOLD").unwrap_or_default();
        for item in hold.split(',').filter(|s| !s.is_empty()) {
            let (device, bytes) = item.split_once(':').expect("device:bytes");
            assert_eq!(set_current(contexts[device.parse::<usize>().unwrap()]), 0);
            let mut ptr = 0;
            assert_eq!(
                alloc(&mut ptr, bytes.parse().unwrap()),
                0,
                "allocating {item}"
            );
        }
    }
    println!("FAKEGPU-HOLDING");
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}
