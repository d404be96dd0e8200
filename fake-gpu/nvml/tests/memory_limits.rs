//! `nvmlDeviceSetMemoryLimits_v1` and `nvmlDeviceGetMemoryLimits_v1` (NVML 13.4) through the C
//! API: every documented error, the set/get/clear round trip, and `currentUsed` against fake
//! CUDA processes placed in cgroups of the test's own. The tests run as root (here and in CI)
//! and need a writable cgroup filesystem; without either they fail, saying why.

mod support;

use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use support::*;
use tessera_built_libs::cgroup::TestCgroup;
use tessera_gpu_abi::nvml::*;

type Init = unsafe extern "C" fn() -> nvmlReturn_t;
type ByIndex = unsafe extern "C" fn(c_uint, *mut nvmlDevice_t) -> nvmlReturn_t;

const MAX: u64 = NVML_DEVICE_MEMORY_LIMIT_MAX;

/// Device 0: 4 GiB, contexts cost 16 MiB. Device 1: 1 GiB. Both with the feature; device 2
/// without (what the default node's driver 570 is like).
const NODE: &str = r#"{
    "driverVersion": "595.10.01",
    "cudaDriverVersion": 13040,
    "devices": [
        {"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "NVIDIA GeForce RTX 4090",
         "memory": 4294967296, "contextMemory": 16777216, "memoryLimits": true},
        {"uuid": "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "NVIDIA L40S",
         "memory": 1073741824, "contextMemory": 0, "memoryLimits": true},
        {"uuid": "GPU-cccccccc-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "NVIDIA L4",
         "memory": 1073741824, "contextMemory": 0}
    ]
}"#;

#[test]
fn cuda_holder() {
    cuda_holder_main();
}

/// The two calls, resolved from the built library.
struct Limits {
    init: Init,
    by_index: ByIndex,
    set: nvmlDeviceSetMemoryLimits_v1_fn,
    get: nvmlDeviceGetMemoryLimits_v1_fn,
}

impl Limits {
    fn load() -> Limits {
        let nvml = Library::open(&nvml_library());
        Limits {
            init: nvml.func("nvmlInit_v2"),
            by_index: nvml.func("nvmlDeviceGetHandleByIndex_v2"),
            set: nvml.func(NVML_DEVICE_SET_MEMORY_LIMITS_V1.to_str().unwrap()),
            get: nvml.func(NVML_DEVICE_GET_MEMORY_LIMITS_V1.to_str().unwrap()),
        }
    }

    fn init(&self) {
        assert_eq!(unsafe { (self.init)() }, NVML_SUCCESS);
    }

    fn device(&self, index: u32) -> nvmlDevice_t {
        let mut device = std::ptr::null_mut();
        assert_eq!(unsafe { (self.by_index)(index, &mut device) }, NVML_SUCCESS);
        device
    }

    fn set_raw(&self, device: nvmlDevice_t, path: *const c_char, soft: u64, hard: u64) -> c_int {
        let mut limits = nvmlSetMemoryLimits_v1_t {
            name_space: path,
            soft_limit: soft,
            hard_limit: hard,
        };
        unsafe { (self.set)(device, &mut limits) }
    }

    fn set(&self, device: nvmlDevice_t, path: &Path, soft: u64, hard: u64) -> c_int {
        let path = c_path(path);
        self.set_raw(device, path.as_ptr(), soft, hard)
    }

    /// (soft, hard, currentUsed), or the error.
    fn get(&self, device: nvmlDevice_t, path: &Path) -> Result<(u64, u64, u64), c_int> {
        let path = c_path(path);
        let mut limits = nvmlGetMemoryLimits_v1_t {
            name_space: path.as_ptr(),
            soft_limit: 7,
            hard_limit: 7,
            current_used: 7,
        };
        match unsafe { (self.get)(device, &mut limits) } {
            NVML_SUCCESS => {
                assert_eq!(limits.name_space, path.as_ptr(), "nameSpace is input only");
                Ok((limits.soft_limit, limits.hard_limit, limits.current_used))
            }
            rc => {
                assert_eq!(
                    (limits.soft_limit, limits.hard_limit, limits.current_used),
                    (7, 7, 7),
                    "nothing written on failure"
                );
                Err(rc)
            }
        }
    }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn cgroup(label: &str) -> TestCgroup {
    TestCgroup::create_any(label)
        .unwrap_or_else(|e| panic!("this test needs a cgroup of its own: {e}"))
}

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests run as root (setting memory limits is root only, and they make cgroups)"
    );
}

/// Runs `scenario` against a fresh [`NODE`] in a child process; returns the child's stderr.
fn run_on_limits_node(scenario: &str) -> String {
    Node::new(NODE).run(scenario)
}

#[test]
fn every_documented_error() {
    const NAME: &str = "every_documented_error";
    if in_child(NAME) {
        require_root();
        let nvml = Limits::load();
        let mut stranger = 7u64;
        let bogus = (&mut stranger as *mut u64).cast::<c_void>();
        let some_dir = std::env::temp_dir();
        unsafe {
            assert_eq!(nvml.set(bogus, &some_dir, 0, GIB), NVML_ERROR_UNINITIALIZED);
            assert_eq!(nvml.get(bogus, &some_dir), Err(NVML_ERROR_UNINITIALIZED));
            nvml.init();
            let (limited, small, without) = (nvml.device(0), nvml.device(1), nvml.device(2));
            let mut wall = cgroup("fakegpu-nvml-errors");
            let dir = wall.dir().to_owned();

            // INVALID_ARGUMENT: the device, the struct.
            for device in [bogus, std::ptr::null_mut()] {
                assert_eq!(nvml.set(device, &dir, 0, GIB), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(nvml.get(device, &dir), Err(NVML_ERROR_INVALID_ARGUMENT));
            }
            assert_eq!(
                (nvml.set)(limited, std::ptr::null_mut()),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                (nvml.get)(limited, std::ptr::null_mut()),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                nvml.set_raw(limited, std::ptr::null(), 0, GIB),
                NVML_ERROR_INVALID_ARGUMENT
            );
            let mut no_path = nvmlGetMemoryLimits_v1_t {
                name_space: std::ptr::null(),
                soft_limit: 0,
                hard_limit: 0,
                current_used: 0,
            };
            assert_eq!(
                (nvml.get)(limited, &mut no_path),
                NVML_ERROR_INVALID_ARGUMENT
            );

            // NOT_SUPPORTED: a device without the feature, whatever the arguments.
            assert_eq!(nvml.set(without, &dir, 0, GIB), NVML_ERROR_NOT_SUPPORTED);
            assert_eq!(nvml.get(without, &dir), Err(NVML_ERROR_NOT_SUPPORTED));
            assert_eq!(
                nvml.set(without, &dir, 2 * GIB, GIB),
                NVML_ERROR_NOT_SUPPORTED
            );

            // INVALID_ARGUMENT: soft above hard, a limit above the card.
            assert_eq!(
                nvml.set(limited, &dir, GIB + 1, GIB),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                nvml.set(limited, &dir, 0, 4 * GIB + 1),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                nvml.set(small, &dir, 0, GIB + 1),
                NVML_ERROR_INVALID_ARGUMENT,
                "the limit is checked against that device"
            );
            assert_eq!(
                nvml.set(limited, &dir, 4 * GIB + 1, MAX),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(
                nvml.set(limited, &dir, MAX, MAX),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(nvml.get(limited, &dir), Err(NVML_ERROR_NOT_FOUND));

            // OPERATING_SYSTEM: a path that is not a cgroup directory.
            let missing = dir.join("missing");
            assert_eq!(
                nvml.set(limited, &missing, 0, GIB),
                NVML_ERROR_OPERATING_SYSTEM
            );
            assert_eq!(
                nvml.get(limited, &missing),
                Err(NVML_ERROR_OPERATING_SYSTEM)
            );
            let file = dir.join("cgroup.procs");
            assert_eq!(
                nvml.set(limited, &file, 0, GIB),
                NVML_ERROR_OPERATING_SYSTEM
            );
            let plain = tempfile::tempdir().unwrap();
            assert_eq!(
                nvml.set(limited, plain.path(), 0, GIB),
                NVML_ERROR_OPERATING_SYSTEM,
                "a directory, but not a cgroup"
            );
            assert_eq!(
                nvml.set(limited, Path::new(""), 0, GIB),
                NVML_ERROR_OPERATING_SYSTEM
            );
            // Longer than the fake's table holds (the real NVML has no such limit; said on
            // stderr).
            let mut deep = wall.child(&"a".repeat(240)).unwrap();
            let mut deeper = deep.child(&"b".repeat(240)).unwrap();
            assert!(deeper.dir().as_os_str().len() > 512);
            assert_eq!(
                nvml.set(limited, deeper.dir(), 0, GIB),
                NVML_ERROR_OPERATING_SYSTEM
            );
            assert_eq!(
                nvml.get(limited, deeper.dir()),
                Err(NVML_ERROR_OPERATING_SYSTEM)
            );
            deeper.remove().unwrap();
            deep.remove().unwrap();

            // The limits that are allowed: the whole card, no hard limit.
            assert_eq!(nvml.set(limited, &dir, 4 * GIB, 4 * GIB), NVML_SUCCESS);
            assert_eq!(nvml.set(limited, &dir, 4 * GIB, MAX), NVML_SUCCESS);
            assert_eq!(nvml.set(limited, &dir, 0, MAX), NVML_SUCCESS);

            // INSUFFICIENT_RESOURCES: the fake's table holds 64 (device, cgroup) pairs.
            let mut many: Vec<TestCgroup> = (0..32)
                .map(|i| wall.child(&format!("c{i}")).unwrap())
                .collect();
            for cgroup in &many {
                assert_eq!(nvml.set(limited, cgroup.dir(), 0, GIB), NVML_SUCCESS);
                assert_eq!(nvml.set(small, cgroup.dir(), 0, GIB), NVML_SUCCESS);
            }
            assert_eq!(
                nvml.set(limited, &dir, 0, GIB),
                NVML_ERROR_INSUFFICIENT_RESOURCES
            );
            assert_eq!(
                nvml.set(small, many[0].dir(), 0, MAX),
                NVML_SUCCESS,
                "clearing frees a record"
            );
            assert_eq!(nvml.set(limited, &dir, 0, GIB), NVML_SUCCESS);
            for cgroup in &mut many {
                cgroup.remove().unwrap();
            }
            wall.remove().unwrap();
        }
        return;
    }
    if in_any_child() {
        return;
    }
    let stderr = run_on_limits_node(NAME);
    assert!(
        stderr.contains("nvmlDeviceSetMemoryLimits_v1") && stderr.contains("at most 512"),
        "the too-long path is explained:\n{stderr}"
    );
    assert!(stderr.contains("not on a cgroup filesystem"), "{stderr}");
    assert!(stderr.contains("all 64 memory-limit records"), "{stderr}");
}

#[test]
fn set_get_and_clear_round_trip() {
    const NAME: &str = "set_get_and_clear_round_trip";
    if in_child(NAME) {
        require_root();
        let nvml = Limits::load();
        nvml.init();
        let (limited, small) = (nvml.device(0), nvml.device(1));
        let mut wall = cgroup("fakegpu-nvml-round-trip");
        let dir = wall.dir().to_owned();
        assert_eq!(nvml.get(limited, &dir), Err(NVML_ERROR_NOT_FOUND));

        assert_eq!(nvml.set(limited, &dir, 256 * MIB, GIB), NVML_SUCCESS);
        assert_eq!(nvml.get(limited, &dir), Ok((256 * MIB, GIB, 0)));
        let mut spelt_otherwise = dir.clone().into_os_string();
        spelt_otherwise.push("/.//");
        assert_eq!(
            nvml.get(limited, Path::new(&spelt_otherwise)),
            Ok((256 * MIB, GIB, 0)),
            "keyed by the canonical directory"
        );
        assert_eq!(
            nvml.get(small, &dir),
            Err(NVML_ERROR_NOT_FOUND),
            "keyed by device"
        );
        let mut below = wall.child("below").unwrap();
        assert_eq!(
            nvml.get(limited, below.dir()),
            Err(NVML_ERROR_NOT_FOUND),
            "a cgroup's limit is not its children's"
        );

        assert_eq!(nvml.set(limited, &dir, 0, 2 * GIB), NVML_SUCCESS);
        assert_eq!(nvml.get(limited, &dir), Ok((0, 2 * GIB, 0)), "replaced");
        assert_eq!(nvml.set(limited, &dir, GIB, MAX), NVML_SUCCESS);
        assert_eq!(nvml.get(limited, &dir), Ok((GIB, MAX, 0)), "soft only");
        assert_eq!(nvml.set(small, &dir, 0, 512 * MIB), NVML_SUCCESS);
        assert_eq!(nvml.get(small, &dir), Ok((0, 512 * MIB, 0)));

        assert_eq!(nvml.set(limited, &dir, 0, MAX), NVML_SUCCESS);
        assert_eq!(
            nvml.get(limited, &dir),
            Err(NVML_ERROR_NOT_FOUND),
            "cleared"
        );
        assert_eq!(
            nvml.get(small, &dir),
            Ok((0, 512 * MIB, 0)),
            "the other device's stay"
        );
        assert_eq!(
            nvml.set(limited, &dir, 0, MAX),
            NVML_SUCCESS,
            "clearing twice"
        );

        // Removing the cgroup clears its limits; the same name again is another cgroup.
        let below_dir = below.dir().to_owned();
        assert_eq!(nvml.set(limited, &below_dir, 0, GIB), NVML_SUCCESS);
        below.remove().unwrap();
        assert_eq!(
            nvml.get(limited, &below_dir),
            Err(NVML_ERROR_OPERATING_SYSTEM)
        );
        std::fs::create_dir(&below_dir).unwrap();
        assert_eq!(nvml.get(limited, &below_dir), Err(NVML_ERROR_NOT_FOUND));
        std::fs::remove_dir(&below_dir).unwrap();
        wall.remove().unwrap();
        return;
    }
    if !in_any_child() {
        run_on_limits_node(NAME);
    }
}

#[test]
fn current_used_counts_the_processes_in_the_cgroup_and_below() {
    const NAME: &str = "current_used_counts_the_processes_in_the_cgroup_and_below";
    if in_child(NAME) {
        let var = |name: &str| std::env::var(name).unwrap();
        let expected = |name: &str| var(name).parse::<u64>().unwrap();
        let nvml = Limits::load();
        nvml.init();
        let (limited, small) = (nvml.device(0), nvml.device(1));
        let (top, below) = (var("TOP"), var("BELOW"));
        let (top, below) = (Path::new(&top), Path::new(&below));
        assert_eq!(nvml.set(limited, top, 0, 3 * GIB), NVML_SUCCESS);
        assert_eq!(nvml.set(small, top, 1, MAX), NVML_SUCCESS);
        assert_eq!(nvml.set(limited, below, 0, GIB), NVML_SUCCESS);
        assert_eq!(nvml.get(limited, top), Ok((0, 3 * GIB, expected("TOP_0"))));
        assert_eq!(nvml.get(small, top), Ok((1, MAX, expected("TOP_1"))));
        assert_eq!(nvml.get(limited, below), Ok((0, GIB, expected("BELOW_0"))));
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::new(NODE);
    let mut top = cgroup("fakegpu-nvml-used");
    let mut below = top.child("below").unwrap();
    let in_top = node.cuda_process_in(&top, &format!("0:{},1:{}", 300 * MIB, 100 * MIB));
    let in_below = node.cuda_process_in(&below, &format!("0:{}", 200 * MIB));
    let _outside = node.cuda_process(&format!("0:{},1:{}", GIB, 500 * MIB));
    let check = |top_0: u64, top_1: u64, below_0: u64| {
        node.run_with(NAME, |command| {
            command
                .env("TOP", top.dir())
                .env("BELOW", below.dir())
                .env("TOP_0", top_0.to_string())
                .env("TOP_1", top_1.to_string())
                .env("BELOW_0", below_0.to_string());
        });
    };
    // Each CUDA process holds a context on every device: 16 MiB on device 0.
    check(532 * MIB, 100 * MIB, 216 * MIB);
    in_top.kill();
    check(216 * MIB, 0, 216 * MIB);
    in_below.kill();
    below.remove().unwrap();
    top.remove().unwrap();
}

/// End to end in one process: CUDA attached first, NVML sets a limit on the process's own
/// cgroup, and CUDA's next reservations meet it.
#[test]
fn a_limit_set_through_nvml_binds_cuda() {
    const NAME: &str = "a_limit_set_through_nvml_binds_cuda";
    if in_child(NAME) {
        type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
        type Retain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int;
        type SetCurrent = unsafe extern "C" fn(*mut c_void) -> c_int;
        type Alloc = unsafe extern "C" fn(*mut u64, usize) -> c_int;
        const CUDA_ERROR_OUT_OF_MEMORY: c_int = 2;
        let cuda = Library::open(&cuda_library());
        let (cu_init, retain, set_current, alloc) = (
            cuda.func::<CuInit>("cuInit"),
            cuda.func::<Retain>("cuDevicePrimaryCtxRetain"),
            cuda.func::<SetCurrent>("cuCtxSetCurrent"),
            cuda.func::<Alloc>("cuMemAlloc_v2"),
        );
        let nvml = Limits::load();
        let own = std::env::var("OWN_CGROUP").unwrap();
        unsafe {
            assert_eq!(cu_init(0), 0);
            let mut ctx = std::ptr::null_mut();
            assert_eq!(retain(&mut ctx, 1), 0);
            assert_eq!(set_current(ctx), 0);
            let mut ptr = 0;
            assert_eq!(alloc(&mut ptr, 100 * MIB as usize), 0);

            nvml.init();
            let small = nvml.device(1);
            assert_eq!(nvml.set(small, Path::new(&own), 0, 300 * MIB), NVML_SUCCESS);
            assert_eq!(
                alloc(&mut ptr, 200 * MIB as usize + 1),
                CUDA_ERROR_OUT_OF_MEMORY
            );
            assert_eq!(alloc(&mut ptr, 200 * MIB as usize), 0);
            assert_eq!(
                nvml.get(small, Path::new(&own)),
                Ok((0, 300 * MIB, 300 * MIB))
            );
            assert_eq!(nvml.set(small, Path::new(&own), 0, MAX), NVML_SUCCESS);
            assert_eq!(alloc(&mut ptr, 200 * MIB as usize), 0, "cleared");
        }
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::new(NODE);
    let mut own = cgroup("fakegpu-nvml-e2e");
    node.run_with(NAME, |command| {
        command.env("OWN_CGROUP", own.dir());
        join_cgroup(command, &own.procs());
    });
    own.remove().unwrap();
}
