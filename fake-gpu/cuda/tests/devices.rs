//! `cuInit`, the devices a process sees (`CUDA_VISIBLE_DEVICES` included) and contexts. Each
//! test runs in a child process of its own (see `support::scenario`).

#[macro_use]
mod support;

use std::ffi::{CStr, c_char, c_int, c_uint};

use support::*;

fn name_of(cuda: &Cuda, device: CUdevice) -> String {
    let mut buffer = [0 as c_char; 96];
    ok!((cuda.cuDeviceGetName)(buffer.as_mut_ptr(), 96, device));
    unsafe { CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn total_of(cuda: &Cuda, device: CUdevice) -> u64 {
    let mut total = 0usize;
    ok!((cuda.cuDeviceTotalMem_v2)(&mut total, device));
    total as u64
}

fn attribute(cuda: &Cuda, attribute: c_int, device: CUdevice) -> c_int {
    let mut value = -1;
    ok!((cuda.cuDeviceGetAttribute)(&mut value, attribute, device));
    value
}

#[test]
fn devices_come_from_the_config() {
    scenario("devices_come_from_the_config", |cuda| {
        let mut version = 0;
        ok!((cuda.cuDriverGetVersion)(&mut version));
        assert_eq!(
            version, 12080,
            "cuDriverGetVersion works before cuInit, from the config"
        );
        assert_eq!(
            rc!((cuda.cuInit)(1)),
            CUDA_ERROR_INVALID_VALUE,
            "flags must be 0"
        );
        ok!((cuda.cuInit)(0));
        ok!((cuda.cuInit)(0));
        let mut count = 0;
        ok!((cuda.cuDeviceGetCount)(&mut count));
        assert_eq!(count, 2);
        let mut device = -1;
        ok!((cuda.cuDeviceGet)(&mut device, 1));
        assert_eq!(device, 1);
        assert_eq!(
            rc!((cuda.cuDeviceGet)(&mut device, 2)),
            CUDA_ERROR_INVALID_DEVICE
        );
        assert_eq!(name_of(cuda, 0), "NVIDIA GeForce RTX 4090");
        assert_eq!(name_of(cuda, 1), "NVIDIA L40S");
        assert_eq!(total_of(cuda, 0), 4 * GIB);
        assert_eq!(total_of(cuda, 1), GIB);

        let mut uuid = CUuuid::default();
        ok!((cuda.cuDeviceGetUuid_v2)(&mut uuid, 1));
        assert_eq!(
            uuid.bytes,
            [
                0xaa, 0xaa, 0xaa, 0xaa, 0xbb, 0xbb, 0x4c, 0xcc, 0x8d, 0xdd, 0xee, 0xee, 0xee, 0xee,
                0xee, 0xee
            ]
        );

        let mut bus = [0 as c_char; 32];
        ok!((cuda.cuDeviceGetPCIBusId)(bus.as_mut_ptr(), 32, 1));
        assert_eq!(
            unsafe { CStr::from_ptr(bus.as_ptr()) }.to_str().unwrap(),
            "0000:41:00.0"
        );
        let mut short = [0x7f as c_char; 5];
        ok!((cuda.cuDeviceGetPCIBusId)(short.as_mut_ptr(), 5, 1));
        assert_eq!(
            unsafe { CStr::from_ptr(short.as_ptr()) }.to_str().unwrap(),
            "0000",
            "truncated, terminated"
        );
        for (text, expected) in [
            (c"0000:41:00.0", 1),
            (c"00000000:01:00.0", 0),
            (c"0000:AB:00.0", -1),
        ] {
            let mut found = -1;
            let rc = rc!((cuda.cuDeviceGetByPCIBusId)(&mut found, text.as_ptr()));
            if expected >= 0 {
                assert_eq!((rc, found), (CUDA_SUCCESS, expected), "{text:?}");
            } else {
                assert_eq!(rc, CUDA_ERROR_INVALID_DEVICE, "{text:?}");
            }
        }
        assert_eq!(
            rc!((cuda.cuDeviceGetByPCIBusId)(&mut device, c"bus".as_ptr())),
            CUDA_ERROR_INVALID_VALUE
        );

        assert_eq!(attribute(cuda, 16, 0), 128, "MULTIPROCESSOR_COUNT");
        assert_eq!(attribute(cuda, 16, 1), 142);
        assert_eq!(
            attribute(cuda, 39, 1),
            1536,
            "MAX_THREADS_PER_MULTIPROCESSOR"
        );
        assert_eq!(
            (attribute(cuda, 75, 0), attribute(cuda, 76, 0)),
            (8, 9),
            "compute capability"
        );
        assert_eq!(
            (
                attribute(cuda, 50, 1),
                attribute(cuda, 33, 1),
                attribute(cuda, 34, 1)
            ),
            (0, 0x41, 0),
            "PCI"
        );
        assert_eq!(attribute(cuda, 83, 0), 1, "MANAGED_MEMORY");
        assert_eq!(
            attribute(cuda, 102, 0),
            1,
            "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"
        );
        assert_eq!(attribute(cuda, 115, 0), 1, "MEMORY_POOLS_SUPPORTED");
        assert_eq!(attribute(cuda, 10, 0), 32, "WARP_SIZE");
        let mut value = 0;
        assert_eq!(
            rc!((cuda.cuDeviceGetAttribute)(&mut value, 0, 0)),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuDeviceGetAttribute)(&mut value, 10_000, 0)),
            CUDA_ERROR_INVALID_VALUE
        );
        assert_eq!(
            rc!((cuda.cuDeviceGetAttribute)(&mut value, 16, 5)),
            CUDA_ERROR_INVALID_DEVICE
        );

        let mut can = -1;
        ok!((cuda.cuDeviceCanAccessPeer)(&mut can, 0, 1));
        assert_eq!(can, 0);
        assert_eq!(
            rc!((cuda.cuDeviceCanAccessPeer)(&mut can, 0, 0)),
            CUDA_ERROR_INVALID_DEVICE
        );
    });
}

#[test]
fn visible_devices_reorders_and_filters() {
    if in_child("visible_devices_reorders_and_filters") {
        let cuda = Cuda::load();
        ok!((cuda.cuInit)(0));
        let mut count = 0;
        ok!((cuda.cuDeviceGetCount)(&mut count));
        match std::env::var("CUDA_VISIBLE_DEVICES").unwrap().as_str() {
            "GPU-aaaa,0" => {
                assert_eq!(count, 2);
                assert_eq!(name_of(&cuda, 0), "NVIDIA L40S");
                assert_eq!(name_of(&cuda, 1), "NVIDIA GeForce RTX 4090");
                assert_eq!(total_of(&cuda, 0), GIB);
                let mut device = -1;
                ok!((cuda.cuDeviceGetByPCIBusId)(
                    &mut device,
                    c"0000:01:00.0".as_ptr()
                ));
                assert_eq!(device, 1, "bus ids map to CUDA ordinals");
                cuda.init_device(0);
                let ptr = cuda.alloc(100 * MIB).unwrap();
                assert_eq!(
                    rc!((cuda.fakegpu_process_memory_used)(0)),
                    100 * MIB,
                    "ordinal 0 is the L40S"
                );
                ok!((cuda.cuMemFree_v2)(ptr));
            }
            "1,7,0" => {
                assert_eq!(count, 1, "an invalid index ends the list");
                assert_eq!(name_of(&cuda, 0), "NVIDIA L40S");
            }
            other => panic!("unexpected CUDA_VISIBLE_DEVICES={other}"),
        }
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::two_cards();
    for value in ["GPU-aaaa,0", "1,7,0"] {
        node.run_with("visible_devices_reorders_and_filters", |c| {
            c.env("CUDA_VISIBLE_DEVICES", value);
        });
    }
}

fn in_any_child() -> bool {
    std::env::var_os("FAKEGPU_TEST_SCENARIO").is_some()
}

#[test]
fn init_fails_loudly_without_a_usable_node() {
    if in_child("init_fails_loudly_without_a_usable_node") {
        let cuda = Cuda::load();
        let expected: CUresult = std::env::var("EXPECTED_RC").unwrap().parse().unwrap();
        assert_eq!(rc!((cuda.cuInit)(0)), expected);
        assert_eq!(rc!((cuda.cuInit)(0)), expected, "and again");
        let mut count = 0;
        assert_eq!(
            rc!((cuda.cuDeviceGetCount)(&mut count)),
            CUDA_ERROR_NOT_INITIALIZED
        );
        return;
    }
    if in_any_child() {
        return;
    }
    let scenario = "init_fails_loudly_without_a_usable_node";

    // Nothing visible.
    let node = Node::two_cards();
    let stderr = node.run_with(scenario, |c| {
        c.env("CUDA_VISIBLE_DEVICES", "-1")
            .env("EXPECTED_RC", CUDA_ERROR_NO_DEVICE.to_string());
    });
    assert!(stderr.contains("no device is visible"), "{stderr}");

    // A config with a misspelt field: the file and the field are named.
    let bad = Node::new(
        r#"{"devices": [{"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "x", "memory": 1, "smCuont": 2}]}"#,
    );
    let stderr = bad.run_with(scenario, |c| {
        c.env("EXPECTED_RC", CUDA_ERROR_INVALID_VALUE.to_string());
    });
    assert!(
        stderr.contains(&bad.config.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `smCuont`"), "{stderr}");
    assert_eq!(
        stderr.matches("fakegpu:").count(),
        1,
        "reported once: {stderr}"
    );

    // A config file that does not exist.
    let missing = Node::two_cards();
    let stderr = missing.run_with(scenario, |c| {
        c.env("FAKEGPU_CONFIG", missing.dir.path().join("nope.json"))
            .env("EXPECTED_RC", CUDA_ERROR_INVALID_VALUE.to_string());
    });
    assert!(
        stderr.contains("nope.json") && stderr.contains("cannot read it"),
        "{stderr}"
    );

    // A state file that cannot be created.
    let stderr = node.run_with(scenario, |c| {
        c.env("FAKEGPU_STATE", "/nonexistent-dir/x.state")
            .env("EXPECTED_RC", CUDA_ERROR_OPERATING_SYSTEM.to_string());
    });
    assert!(stderr.contains("/nonexistent-dir/x.state"), "{stderr}");
}

#[test]
fn the_default_node_without_a_config() {
    if in_child("the_default_node_without_a_config") {
        let cuda = Cuda::load();
        ok!((cuda.cuInit)(0));
        let mut count = 0;
        ok!((cuda.cuDeviceGetCount)(&mut count));
        assert_eq!(count, 2);
        assert_eq!(name_of(&cuda, 0), "NVIDIA GeForce RTX 4090");
        assert_eq!(total_of(&cuda, 1), 48 * GIB);
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::two_cards();
    node.run_with("the_default_node_without_a_config", |c| {
        c.env_remove("FAKEGPU_CONFIG");
    });
}

#[test]
fn calls_need_a_current_context() {
    scenario("calls_need_a_current_context", |cuda| {
        ok!((cuda.cuInit)(0));
        let mut device = -1;
        assert_eq!(
            rc!((cuda.cuCtxGetDevice)(&mut device)),
            CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(cuda.alloc(MIB), Err(CUDA_ERROR_INVALID_CONTEXT));
        let (mut free, mut total) = (0usize, 0usize);
        assert_eq!(
            rc!((cuda.cuMemGetInfo_v2)(&mut free, &mut total)),
            CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(rc!((cuda.cuCtxSynchronize)()), CUDA_ERROR_INVALID_CONTEXT);
        let mut ctx = 1 as CUcontext;
        ok!((cuda.cuCtxGetCurrent)(&mut ctx));
        assert!(ctx.is_null());
        assert_eq!(
            rc!((cuda.cuCtxPopCurrent_v2)(&mut ctx)),
            CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(
            rc!((cuda.cuCtxSetCurrent)(0x1234 as CUcontext)),
            CUDA_ERROR_INVALID_CONTEXT
        );
    });
}

#[test]
fn primary_contexts_are_reference_counted() {
    scenario("primary_contexts_are_reference_counted", |cuda| {
        ok!((cuda.cuInit)(0));
        let (mut a, mut b) = (std::ptr::null_mut(), std::ptr::null_mut());
        let (mut flags, mut active): (c_uint, c_int) = (9, 9);
        ok!((cuda.cuDevicePrimaryCtxGetState)(
            1,
            &mut flags,
            &mut active
        ));
        assert_eq!((flags, active), (0, 0));
        ok!((cuda.cuDevicePrimaryCtxRetain)(&mut a, 1));
        ok!((cuda.cuDevicePrimaryCtxRetain)(&mut b, 1));
        assert_eq!(a, b, "one primary context per device");
        ok!((cuda.cuDevicePrimaryCtxGetState)(
            1,
            &mut flags,
            &mut active
        ));
        assert_eq!(active, 1);
        assert_eq!(rc!((cuda.fakegpu_context_count)(1)), 1);
        assert_eq!(
            rc!((cuda.cuDevicePrimaryCtxSetFlags)(1, 4)),
            CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE,
            "v1 refuses while active"
        );
        ok!((cuda.cuDevicePrimaryCtxSetFlags_v2)(1, 4));
        assert_eq!(
            rc!((cuda.cuDevicePrimaryCtxSetFlags_v2)(1, 3)),
            CUDA_ERROR_INVALID_VALUE,
            "one scheduling policy"
        );
        ok!((cuda.cuDevicePrimaryCtxGetState)(
            1,
            &mut flags,
            &mut active
        ));
        assert_eq!(flags, 4);

        ok!((cuda.cuCtxSetCurrent)(a));
        let mut device = -1;
        ok!((cuda.cuCtxGetDevice)(&mut device));
        assert_eq!(device, 1);
        let ptr = cuda.alloc(300 * MIB).unwrap();
        ok!((cuda.cuDevicePrimaryCtxRelease_v2)(1));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            300 * MIB,
            "still one reference"
        );
        ok!((cuda.cuDevicePrimaryCtxRelease_v2)(1));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            0,
            "the last release frees the context's memory"
        );
        assert_eq!(
            rc!((cuda.cuMemFree_v2)(ptr)),
            CUDA_ERROR_INVALID_VALUE,
            "the pointer went with it"
        );
        assert_eq!(
            rc!((cuda.cuCtxGetDevice)(&mut device)),
            CUDA_ERROR_INVALID_CONTEXT,
            "a released context is no longer usable"
        );
        assert_eq!(
            rc!((cuda.cuDevicePrimaryCtxRelease_v2)(1)),
            CUDA_ERROR_INVALID_CONTEXT,
            "nothing left to release"
        );
        assert_eq!(rc!((cuda.fakegpu_context_count)(1)), 0);

        // Retained again: the same handle comes back to life; a reset drops everything.
        ok!((cuda.cuDevicePrimaryCtxRetain)(&mut b, 1));
        assert_eq!(a, b);
        ok!((cuda.cuCtxGetDevice)(&mut device));
        cuda.alloc(MIB).unwrap();
        ok!((cuda.cuDevicePrimaryCtxReset_v2)(1));
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 0);
        ok!((cuda.cuDevicePrimaryCtxGetState)(
            1,
            &mut flags,
            &mut active
        ));
        assert_eq!((flags, active), (0, 0));
    });
}

#[test]
fn created_contexts_stack_per_thread() {
    scenario("created_contexts_stack_per_thread", |cuda| {
        let primary = cuda.init_device(0);
        let mut created = std::ptr::null_mut();
        ok!((cuda.cuCtxCreate_v2)(&mut created, 0, 1));
        assert_ne!(created, primary);
        let mut current = std::ptr::null_mut();
        ok!((cuda.cuCtxGetCurrent)(&mut current));
        assert_eq!(current, created, "a created context becomes current");
        let ptr = cuda.alloc(200 * MIB).unwrap();
        assert_eq!(rc!((cuda.fakegpu_process_memory_used)(1)), 200 * MIB);

        // Another thread has its own (empty) stack.
        let created_handle = created as usize;
        let other = std::thread::scope(|s| {
            s.spawn(|| {
                let mut device = -1;
                let before = rc!((cuda.cuCtxGetDevice)(&mut device));
                ok!((cuda.cuCtxPushCurrent_v2)(created_handle as CUcontext));
                ok!((cuda.cuCtxGetDevice)(&mut device));
                (before, device)
            })
            .join()
            .unwrap()
        });
        assert_eq!(other, (CUDA_ERROR_INVALID_CONTEXT, 1));

        let mut popped = std::ptr::null_mut();
        ok!((cuda.cuCtxPopCurrent_v2)(&mut popped));
        assert_eq!(popped, created);
        ok!((cuda.cuCtxGetCurrent)(&mut current));
        assert_eq!(current, primary, "the primary context is current again");

        ok!((cuda.cuCtxPushCurrent_v2)(created));
        ok!((cuda.cuCtxDestroy_v2)(created));
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            0,
            "destroying a context frees its memory"
        );
        assert_eq!(rc!((cuda.cuMemFree_v2)(ptr)), CUDA_ERROR_INVALID_VALUE);
        ok!((cuda.cuCtxGetCurrent)(&mut current));
        assert_eq!(current, primary, "and takes it off the stack");
        assert_eq!(
            rc!((cuda.cuCtxDestroy_v2)(created)),
            CUDA_ERROR_INVALID_CONTEXT
        );
        assert_eq!(
            rc!((cuda.cuCtxDestroy_v2)(primary)),
            CUDA_ERROR_INVALID_CONTEXT,
            "primary contexts are released"
        );
        assert_eq!(
            rc!((cuda.cuCtxCreate_v2)(&mut created, 0x3, 0)),
            CUDA_ERROR_INVALID_VALUE
        );
        ok!((cuda.cuCtxSynchronize)());
    });
}

#[test]
fn contexts_can_cost_device_memory() {
    if in_child("contexts_can_cost_device_memory") {
        let cuda = Cuda::load();
        cuda.init_device(1);
        assert_eq!(
            rc!((cuda.fakegpu_process_memory_used)(1)),
            400 * MIB,
            "the primary context"
        );
        let mut ctx = std::ptr::null_mut();
        ok!((cuda.cuCtxCreate_v2)(&mut ctx, 0, 1));
        assert_eq!(rc!((cuda.fakegpu_device_memory_used)(1)), 800 * MIB);
        assert_eq!(
            rc!((cuda.cuCtxCreate_v2)(&mut ctx, 0, 1)),
            CUDA_ERROR_OUT_OF_MEMORY,
            "a third does not fit 1 GiB"
        );
        assert_eq!(rc!((cuda.fakegpu_context_count)(1)), 2);
        ok!((cuda.cuCtxDestroy_v2)(ctx));
        assert_eq!(rc!((cuda.fakegpu_device_memory_used)(1)), 400 * MIB);
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::new(
        r#"{"devices": [
            {"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "a", "memory": 4294967296, "contextMemory": 0},
            {"uuid": "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", "name": "b", "memory": 1073741824, "contextMemory": 419430400}]}"#,
    );
    node.run("contexts_can_cost_device_memory");
}
