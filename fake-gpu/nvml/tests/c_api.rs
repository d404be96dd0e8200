//! The NVML C API directly (through `dlopen`), for what nvml-wrapper does not exercise: the
//! symbol names and versions, the init reference count, argument and buffer checks, and the
//! legacy struct layouts.

mod support;

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

use support::*;
use tessera_gpu_abi::nvml::*;

type Init = unsafe extern "C" fn() -> nvmlReturn_t;
type Count = unsafe extern "C" fn(*mut c_uint) -> nvmlReturn_t;
type ByIndex = unsafe extern "C" fn(c_uint, *mut nvmlDevice_t) -> nvmlReturn_t;
type ByString = unsafe extern "C" fn(*const c_char, *mut nvmlDevice_t) -> nvmlReturn_t;
type Text = unsafe extern "C" fn(nvmlDevice_t, *mut c_char, c_uint) -> nvmlReturn_t;
type SystemText = unsafe extern "C" fn(*mut c_char, c_uint) -> nvmlReturn_t;
type Memory = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlMemory_t) -> nvmlReturn_t;
type MemoryV2 = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlMemory_v2_t) -> nvmlReturn_t;
type Pci = unsafe extern "C" fn(nvmlDevice_t, *mut nvmlPciInfo_t) -> nvmlReturn_t;
type Processes =
    unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_t) -> nvmlReturn_t;
type ProcessesV1 =
    unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut nvmlProcessInfo_v1_t) -> nvmlReturn_t;
type Uint = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint) -> nvmlReturn_t;
type Int = unsafe extern "C" fn(*mut c_int) -> nvmlReturn_t;
type Mig = unsafe extern "C" fn(nvmlDevice_t, *mut c_uint, *mut c_uint) -> nvmlReturn_t;
type ErrorString = unsafe extern "C" fn(nvmlReturn_t) -> *const c_char;
type SetCreate = unsafe extern "C" fn(*mut nvmlEventSet_t) -> nvmlReturn_t;
type SetFree = unsafe extern "C" fn(nvmlEventSet_t) -> nvmlReturn_t;
type Supported = unsafe extern "C" fn(nvmlDevice_t, *mut u64) -> nvmlReturn_t;
type Register = unsafe extern "C" fn(nvmlDevice_t, u64, nvmlEventSet_t) -> nvmlReturn_t;
type Wait = unsafe extern "C" fn(nvmlEventSet_t, *mut nvmlEventData_t, c_uint) -> nvmlReturn_t;

/// Every NVML symbol the fake exports.
const EXPORTS: &[&str] = &[
    "nvmlInit",
    "nvmlInit_v2",
    "nvmlInitWithFlags",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetDriverVersion",
    "nvmlSystemGetNVMLVersion",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2",
    "nvmlSystemGetProcessName",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetHandleByPciBusId",
    "nvmlDeviceGetHandleByPciBusId_v2",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetIndex",
    "nvmlDeviceGetMinorNumber",
    "nvmlDeviceGetPciInfo",
    "nvmlDeviceGetPciInfo_v2",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetBrand",
    "nvmlDeviceGetNumGpuCores",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetProcessUtilization",
    "nvmlEventSetCreate",
    "nvmlEventSetFree",
    "nvmlDeviceGetSupportedEventTypes",
    "nvmlDeviceRegisterEvents",
    "nvmlEventSetWait",
    "nvmlEventSetWait_v2",
    "nvmlDeviceSetMemoryLimits_v1",
    "nvmlDeviceGetMemoryLimits_v1",
];

#[test]
fn cuda_holder() {
    cuda_holder_main();
}

#[test]
fn exports_and_linkage() {
    let path = nvml_library();
    let nvml = Library::open(&path);
    let missing: Vec<&&str> = EXPORTS
        .iter()
        .filter(|s| nvml.try_sym(s).is_none())
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    if let Ok(output) = std::process::Command::new("readelf")
        .arg("-d")
        .arg(&path)
        .output()
    {
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains("Library soname: [libnvidia-ml.so.1]"),
            "{text}"
        );
        assert!(text.contains("SYMBOLIC"), "{text}");
    }
}

fn text(f: impl FnOnce(*mut c_char, c_uint) -> nvmlReturn_t) -> String {
    let mut buffer = [0 as c_char; 96];
    assert_eq!(f(buffer.as_mut_ptr(), 96), NVML_SUCCESS);
    unsafe { CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn life_cycle_and_arguments() {
    scenario("life_cycle_and_arguments", || {
        let nvml = Library::open(&nvml_library());
        let init: Init = nvml.func("nvmlInit_v2");
        let init_v1: Init = nvml.func("nvmlInit");
        let shutdown: Init = nvml.func("nvmlShutdown");
        let count: Count = nvml.func("nvmlDeviceGetCount");
        let by_index: ByIndex = nvml.func("nvmlDeviceGetHandleByIndex");
        let by_pci: ByString = nvml.func("nvmlDeviceGetHandleByPciBusId_v2");
        let uuid: Text = nvml.func("nvmlDeviceGetUUID");
        let error_string: ErrorString = nvml.func("nvmlErrorString");
        let driver: SystemText = nvml.func("nvmlSystemGetDriverVersion");
        let cuda_version: Int = nvml.func("nvmlSystemGetCudaDriverVersion");
        let minor: Uint = nvml.func("nvmlDeviceGetMinorNumber");
        let mig: Mig = nvml.func("nvmlDeviceGetMigMode");
        unsafe {
            let mut n = 0;
            assert_eq!(count(&mut n), NVML_ERROR_UNINITIALIZED);
            assert_eq!(shutdown(), NVML_ERROR_UNINITIALIZED);
            assert_eq!(
                CStr::from_ptr(error_string(NVML_ERROR_INSUFFICIENT_SIZE))
                    .to_str()
                    .unwrap(),
                "Insufficient Size"
            );

            // Reference-counted: two inits need two shutdowns.
            assert_eq!(init(), NVML_SUCCESS);
            assert_eq!(init_v1(), NVML_SUCCESS);
            assert_eq!(count(&mut n), NVML_SUCCESS);
            assert_eq!(n, 2);
            assert_eq!(shutdown(), NVML_SUCCESS);
            assert_eq!(count(&mut n), NVML_SUCCESS, "still initialised once");
            let mut device = std::ptr::null_mut();
            assert_eq!(by_index(1, &mut device), NVML_SUCCESS);
            assert_eq!(shutdown(), NVML_SUCCESS);
            assert_eq!(count(&mut n), NVML_ERROR_UNINITIALIZED);
            assert_eq!(minor(device, &mut n), NVML_ERROR_UNINITIALIZED);
            assert_eq!(init(), NVML_SUCCESS);
            assert_eq!(
                minor(device, &mut n),
                NVML_SUCCESS,
                "handles survive re-initialisation"
            );
            assert_eq!(n, 5);

            assert_eq!(text(|b, l| driver(b, l)), "570.86.15");
            let mut small = [0 as c_char; 5];
            assert_eq!(
                driver(small.as_mut_ptr(), 5),
                NVML_ERROR_INSUFFICIENT_SIZE,
                "never truncated"
            );
            let mut version = 0;
            assert_eq!(cuda_version(&mut version), NVML_SUCCESS);
            assert_eq!(version, 12080);

            assert_eq!(
                text(|b, l| uuid(device, b, l)),
                "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
            );
            assert_eq!(
                uuid(device, small.as_mut_ptr(), 5),
                NVML_ERROR_INSUFFICIENT_SIZE
            );
            let mut stranger = 7u64;
            let bogus = (&mut stranger as *mut u64).cast::<c_void>();
            assert_eq!(
                uuid(bogus, small.as_mut_ptr(), 5),
                NVML_ERROR_INVALID_ARGUMENT,
                "not a handle"
            );
            assert_eq!(
                uuid(std::ptr::null_mut(), small.as_mut_ptr(), 5),
                NVML_ERROR_INVALID_ARGUMENT
            );
            assert_eq!(by_index(2, &mut device), NVML_ERROR_INVALID_ARGUMENT);

            let mut found = std::ptr::null_mut();
            assert_eq!(by_pci(c"0000:41:00.0".as_ptr(), &mut found), NVML_SUCCESS);
            assert_eq!(by_index(1, &mut device), NVML_SUCCESS);
            assert_eq!(found, device, "one handle per device");
            assert_eq!(
                by_pci(c"00000000:02:00.0".as_ptr(), &mut found),
                NVML_ERROR_NOT_FOUND
            );
            assert_eq!(
                by_pci(c"garbage".as_ptr(), &mut found),
                NVML_ERROR_INVALID_ARGUMENT
            );
            let (mut current, mut pending) = (0, 0);
            assert_eq!(
                mig(device, &mut current, &mut pending),
                NVML_ERROR_NOT_SUPPORTED
            );
        }
    });
}

#[test]
fn memory_structs_and_versions() {
    scenario("memory_structs_and_versions", || {
        let nvml = Library::open(&nvml_library());
        let init: Init = nvml.func("nvmlInit_v2");
        let by_index: ByIndex = nvml.func("nvmlDeviceGetHandleByIndex_v2");
        let memory: Memory = nvml.func("nvmlDeviceGetMemoryInfo");
        let memory_v2: MemoryV2 = nvml.func("nvmlDeviceGetMemoryInfo_v2");
        let pci_v1: Pci = nvml.func("nvmlDeviceGetPciInfo");
        let pci_v3: Pci = nvml.func("nvmlDeviceGetPciInfo_v3");
        unsafe {
            assert_eq!(init(), NVML_SUCCESS);
            let mut device = std::ptr::null_mut();
            assert_eq!(by_index(1, &mut device), NVML_SUCCESS);

            let mut v1 = nvmlMemory_t::default();
            assert_eq!(memory(device, &mut v1), NVML_SUCCESS);
            assert_eq!(
                (v1.total, v1.used, v1.free),
                (GIB, 32 * MIB, GIB - 32 * MIB),
                "v1 counts NVML's reserve as used"
            );

            let mut v2 = nvmlMemory_v2_t::default();
            assert_eq!(
                memory_v2(device, &mut v2),
                NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
                "version unset"
            );
            v2.version = NVML_MEMORY_V2;
            assert_eq!(memory_v2(device, &mut v2), NVML_SUCCESS);
            assert_eq!(
                (v2.total, v2.reserved, v2.used, v2.free),
                (GIB, 32 * MIB, 0, GIB - 32 * MIB)
            );

            let sentinel = nvmlPciInfo_t {
                bus_id_legacy: [0x55; 16],
                domain: 9,
                bus: 9,
                device: 9,
                pci_device_id: 9,
                pci_sub_system_id: 9,
                bus_id: [0x55; 32],
            };
            let mut legacy = sentinel;
            assert_eq!(pci_v1(device, &mut legacy), NVML_SUCCESS);
            assert_eq!(
                CStr::from_bytes_until_nul(&legacy.bus_id_legacy)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "0000:41:00.0"
            );
            assert_eq!((legacy.domain, legacy.bus, legacy.device), (0, 0x41, 0));
            assert_eq!(
                legacy.bus_id, [0x55; 32],
                "v1 writes only the fields its struct had"
            );
            let mut full = sentinel;
            assert_eq!(pci_v3(device, &mut full), NVML_SUCCESS);
            assert_eq!(
                CStr::from_bytes_until_nul(&full.bus_id)
                    .unwrap()
                    .to_str()
                    .unwrap(),
                "00000000:41:00.0"
            );
            assert_eq!(
                full.pci_device_id, 0x10de,
                "the vendor alone when the config gives no device id"
            );
        }
    });
}

#[test]
fn process_lists_follow_nvmls_count_protocol() {
    if in_child("process_lists_follow_nvmls_count_protocol") {
        let expected_pid: u32 = std::env::var("EXPECT_PID").unwrap().parse().unwrap();
        let nvml = Library::open(&nvml_library());
        let init: Init = nvml.func("nvmlInit_v2");
        let by_index: ByIndex = nvml.func("nvmlDeviceGetHandleByIndex_v2");
        let v3: Processes = nvml.func("nvmlDeviceGetComputeRunningProcesses_v3");
        let v1: ProcessesV1 = nvml.func("nvmlDeviceGetComputeRunningProcesses");
        let name: unsafe extern "C" fn(c_uint, *mut c_char, c_uint) -> nvmlReturn_t =
            nvml.func("nvmlSystemGetProcessName");
        unsafe {
            assert_eq!(init(), NVML_SUCCESS);
            let mut device = std::ptr::null_mut();
            assert_eq!(by_index(0, &mut device), NVML_SUCCESS);
            let mut count = 0;
            assert_eq!(
                v3(device, &mut count, std::ptr::null_mut()),
                NVML_ERROR_INSUFFICIENT_SIZE
            );
            assert_eq!(count, 1);
            let mut infos = [nvmlProcessInfo_t::default(); 4];
            count = 4;
            assert_eq!(v3(device, &mut count, infos.as_mut_ptr()), NVML_SUCCESS);
            assert_eq!(count, 1);
            assert_eq!(
                (infos[0].pid, infos[0].used_gpu_memory),
                (expected_pid, 300 * MIB)
            );
            assert_eq!(
                (infos[0].gpu_instance_id, infos[0].compute_instance_id),
                (u32::MAX, u32::MAX),
                "no MIG"
            );
            let mut old = [nvmlProcessInfo_v1_t::default(); 2];
            count = 2;
            assert_eq!(v1(device, &mut count, old.as_mut_ptr()), NVML_SUCCESS);
            assert_eq!(
                (count, old[0].pid, old[0].used_gpu_memory),
                (1, expected_pid, 300 * MIB)
            );
            let mut buffer = [0 as c_char; 64];
            assert_eq!(name(expected_pid, buffer.as_mut_ptr(), 64), NVML_SUCCESS);
            assert!(!CStr::from_ptr(buffer.as_ptr()).to_bytes().is_empty());
        }
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::two_cards();
    let holder = node.cuda_process(&format!("0:{}", 300 * MIB));
    let pid = holder.pid().to_string();
    node.run_with("process_lists_follow_nvmls_count_protocol", |c| {
        c.env("EXPECT_PID", &pid);
    });
}

#[test]
fn utilisation_follows_the_virtual_clock() {
    scenario("utilisation_follows_the_virtual_clock", || {
        type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
        type Retain = unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int;
        type SetCurrent = unsafe extern "C" fn(*mut c_void) -> c_int;
        type Load = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> c_int;
        type GetFunction =
            unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> c_int;
        type Launch = unsafe extern "C" fn(
            *mut c_void,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            c_uint,
            *mut c_void,
            *mut *mut c_void,
            *mut *mut c_void,
        ) -> c_int;
        type Sync = unsafe extern "C" fn(*mut c_void) -> c_int;
        type Now = unsafe extern "C" fn() -> u64;
        type Sleep = unsafe extern "C" fn(u64) -> c_int;
        type ProcessUtilisation = unsafe extern "C" fn(
            nvmlDevice_t,
            *mut nvmlProcessUtilizationSample_t,
            *mut c_uint,
            u64,
        ) -> nvmlReturn_t;
        type Utilisation =
            unsafe extern "C" fn(nvmlDevice_t, *mut nvmlUtilization_t) -> nvmlReturn_t;
        let cuda = Library::open(&cuda_library());
        let nvml = Library::open(&nvml_library());
        let launch: Launch = cuda.func("cuLaunchKernel");
        let sync: Sync = cuda.func("cuStreamSynchronize");
        let now: Now = cuda.func("fakegpu_clock_ns");
        let sleep_until: Sleep = cuda.func("fakegpu_clock_sleep_until_ns");
        let per_process: ProcessUtilisation = nvml.func("nvmlDeviceGetProcessUtilization");
        let device_wide: Utilisation = nvml.func("nvmlDeviceGetUtilizationRates");
        unsafe {
            let (mut ctx, mut module, mut function) = (
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            assert_eq!(cuda.func::<CuInit>("cuInit")(0), 0);
            assert_eq!(
                cuda.func::<Retain>("cuDevicePrimaryCtxRetain")(&mut ctx, 0),
                0
            );
            assert_eq!(cuda.func::<SetCurrent>("cuCtxSetCurrent")(ctx), 0);
            assert_eq!(
                cuda.func::<Load>("cuModuleLoadData")(&mut module, c"image".as_ptr().cast()),
                0
            );
            assert_eq!(
                cuda.func::<GetFunction>("cuModuleGetFunction")(
                    &mut function,
                    module,
                    c"k".as_ptr()
                ),
                0
            );
            assert_eq!(nvml.func::<Init>("nvmlInit_v2")(), NVML_SUCCESS);
            let mut device = std::ptr::null_mut();
            assert_eq!(
                nvml.func::<ByIndex>("nvmlDeviceGetHandleByIndex_v2")(0, &mut device),
                NVML_SUCCESS
            );
            let sample = |device| {
                let mut samples = [nvmlProcessUtilizationSample_t::default(); 4];
                let mut count = 4;
                assert_eq!(
                    per_process(device, samples.as_mut_ptr(), &mut count, 0),
                    NVML_SUCCESS
                );
                assert_eq!((count, samples[0].pid), (1, std::process::id()));
                let mut rates = nvmlUtilization_t::default();
                assert_eq!(device_wide(device, &mut rates), NVML_SUCCESS);
                (samples[0].sm_util, rates.gpu)
            };
            assert_eq!(sample(device), (0, 0), "no window before the first query");
            let start = now();
            // Ten 1 ms kernels, then idle until 20 ms: half the time busy.
            for _ in 0..10 {
                let null = std::ptr::null_mut::<c_void>();
                let no_params = std::ptr::null_mut::<*mut c_void>();
                assert_eq!(
                    launch(
                        function, 7680, 1, 1, 256, 1, 1, 0, null, no_params, no_params
                    ),
                    0
                );
                assert_eq!(sync(null), 0);
            }
            assert_eq!(sleep_until(start + 20_000_000), 0);
            assert_eq!(sample(device), (50, 50));
        }
    });
}

/// This thread's CPU time.
fn thread_cpu_time() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) },
        0
    );
    std::time::Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[test]
fn xid_events_are_delivered_once_per_set_for_registered_devices() {
    scenario(
        "xid_events_are_delivered_once_per_set_for_registered_devices",
        || {
            const RTX: &str = "GPU-11111111-2222-4333-8444-555555555555";
            const L40S: &str = "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
            let nvml = Library::open(&nvml_library());
            let init: Init = nvml.func("nvmlInit_v2");
            let by_index: ByIndex = nvml.func("nvmlDeviceGetHandleByIndex_v2");
            let create: SetCreate = nvml.func("nvmlEventSetCreate");
            let free: SetFree = nvml.func("nvmlEventSetFree");
            let supported: Supported = nvml.func("nvmlDeviceGetSupportedEventTypes");
            let register: Register = nvml.func("nvmlDeviceRegisterEvents");
            let wait: Wait = nvml.func("nvmlEventSetWait_v2");
            let wait_v1: Wait = nvml.func("nvmlEventSetWait");
            let events = events_file();
            let inject = |uuid: &str, xid: u64| {
                tessera_fake_gpu_model::events::inject_xid(&events, uuid, xid).expect("inject")
            };
            unsafe {
                let mut set = std::ptr::null_mut();
                assert_eq!(create(&mut set), NVML_ERROR_UNINITIALIZED);
                assert_eq!(init(), NVML_SUCCESS);
                let (mut rtx, mut l40s) = (std::ptr::null_mut(), std::ptr::null_mut());
                assert_eq!(by_index(0, &mut rtx), NVML_SUCCESS);
                assert_eq!(by_index(1, &mut l40s), NVML_SUCCESS);

                assert_eq!(create(std::ptr::null_mut()), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(create(&mut set), NVML_SUCCESS);
                assert!(!set.is_null());
                let mut types = 0u64;
                assert_eq!(supported(rtx, &mut types), NVML_SUCCESS);
                assert_eq!(types, nvmlEventTypeXidCriticalError, "XIDs only");
                assert_eq!(
                    supported(rtx, std::ptr::null_mut()),
                    NVML_ERROR_INVALID_ARGUMENT
                );
                let mut stranger = 7u64;
                let bogus = (&mut stranger as *mut u64).cast::<c_void>();
                assert_eq!(supported(bogus, &mut types), NVML_ERROR_INVALID_ARGUMENT);

                // Registration: arguments first.
                let xid = nvmlEventTypeXidCriticalError;
                assert_eq!(
                    register(rtx, xid, std::ptr::null_mut()),
                    NVML_ERROR_INVALID_ARGUMENT
                );
                assert_eq!(register(rtx, xid, bogus), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(register(bogus, xid, set), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(register(rtx, 1 << 40, set), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(
                    register(rtx, xid | nvmlEventTypePState, set),
                    NVML_ERROR_NOT_SUPPORTED
                );

                // Nothing registered or nothing injected: the timeout, honoured.
                let mut data = nvmlEventData_t::default();
                assert_eq!(wait(set, &mut data, 0), NVML_ERROR_TIMEOUT);
                assert_eq!(
                    wait(set, std::ptr::null_mut(), 0),
                    NVML_ERROR_INVALID_ARGUMENT
                );
                assert_eq!(wait(bogus, &mut data, 0), NVML_ERROR_INVALID_ARGUMENT);
                // Before the RTX is registered: never delivered.
                inject(RTX, 48);
                assert_eq!(register(rtx, xid, set), NVML_SUCCESS);
                assert_eq!(register(rtx, xid, set), NVML_SUCCESS, "again: no change");
                let started = std::time::Instant::now();
                let cpu = thread_cpu_time();
                assert_eq!(wait(set, &mut data, 300), NVML_ERROR_TIMEOUT);
                assert!(started.elapsed() >= std::time::Duration::from_millis(300));
                let used = thread_cpu_time() - cpu;
                assert!(
                    used < std::time::Duration::from_millis(100),
                    "a 300 ms wait used {used:?} of CPU: it must sleep, not spin"
                );

                // The L40S is not registered: its XID is skipped; the RTX's comes, once.
                inject(L40S, 79);
                inject(RTX, 79);
                assert_eq!(wait(set, &mut data, 5_000), NVML_SUCCESS);
                assert_eq!(data.device, rtx);
                assert_eq!(data.event_type, nvmlEventTypeXidCriticalError);
                assert_eq!(data.event_data, 79);
                assert_eq!(
                    (data.gpu_instance_id, data.compute_instance_id),
                    (u32::MAX, u32::MAX),
                    "no MIG"
                );
                assert_eq!(wait(set, &mut data, 100), NVML_ERROR_TIMEOUT, "once");

                // A second set sees the same later events, on its own.
                let mut other = std::ptr::null_mut();
                assert_eq!(create(&mut other), NVML_SUCCESS);
                assert_ne!(other, set);
                assert_eq!(register(rtx, xid, other), NVML_SUCCESS);
                assert_eq!(register(l40s, xid, other), NVML_SUCCESS);
                // Injected from another process (a shell), while both sets wait.
                let other_address = other as usize;
                let waiter = std::thread::spawn(move || {
                    let mut data = nvmlEventData_t::default();
                    let result = wait(other_address as nvmlEventSet_t, &mut data, 10_000);
                    (result, data.device as usize, data.event_data)
                });
                std::thread::sleep(std::time::Duration::from_millis(100));
                let status = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "echo '{{\"uuid\": \"{}\", \"xid\": 94}}' >> '{}'",
                        L40S.to_lowercase(),
                        events.display()
                    ))
                    .status()
                    .expect("sh");
                assert!(status.success());
                assert_eq!(
                    waiter.join().expect("waiter"),
                    (NVML_SUCCESS, l40s as usize, 94),
                    "UUIDs match in any case"
                );
                assert_eq!(wait(set, &mut data, 100), NVML_ERROR_TIMEOUT, "not the RTX");
                inject(RTX, 31);
                inject("GPU-00000000-0000-4000-8000-000000000000", 79);
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&events)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, b"not json\n"))
                    .expect("append");
                inject(RTX, 999);
                // Both sets get both RTX events, in order; the v1 call writes only its struct.
                for s in [set, other] {
                    assert_eq!(wait(s, &mut data, 5_000), NVML_SUCCESS);
                    assert_eq!((data.device, data.event_data), (rtx, 31));
                    let mut legacy = nvmlEventData_t {
                        gpu_instance_id: 7,
                        compute_instance_id: 7,
                        ..Default::default()
                    };
                    assert_eq!(wait_v1(s, &mut legacy, 5_000), NVML_SUCCESS);
                    assert_eq!((legacy.device, legacy.event_data), (rtx, 999));
                    assert_eq!(legacy.event_type, nvmlEventTypeXidCriticalError);
                    assert_eq!(
                        (legacy.gpu_instance_id, legacy.compute_instance_id),
                        (7, 7),
                        "v1 writes only the fields its struct had"
                    );
                    assert_eq!(wait(s, &mut data, 0), NVML_ERROR_TIMEOUT);
                }

                assert_eq!(free(set), NVML_SUCCESS);
                assert_eq!(free(set), NVML_ERROR_INVALID_ARGUMENT, "already freed");
                assert_eq!(wait(set, &mut data, 0), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(free(std::ptr::null_mut()), NVML_ERROR_INVALID_ARGUMENT);
                assert_eq!(free(other), NVML_SUCCESS);
            }
        },
    );
}
