//! The fake NVML through nvml-wrapper 0.13, the binding Tessera's plugin uses: everything the
//! plugin and a monitoring reader ask works, and memory and processes are those of the node's
//! fake CUDA processes.

mod support;

use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::Brand;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use support::*;

fn nvml() -> Nvml {
    let path = nvml_library();
    Nvml::builder()
        .lib_path(OsStr::new(&path))
        .init()
        .expect("Nvml::init against the fake")
}

#[test]
fn cuda_holder() {
    cuda_holder_main();
}

#[test]
fn the_node_as_nvml_wrapper_sees_it() {
    scenario("the_node_as_nvml_wrapper_sees_it", || {
        let nvml = nvml();
        assert_eq!(nvml.sys_driver_version().unwrap(), "570.86.15");
        assert_eq!(nvml.sys_cuda_driver_version().unwrap(), 12080);
        assert_eq!(nvml.sys_nvml_version().unwrap(), "12.570.86.15");
        assert_eq!(nvml.device_count().unwrap(), 2);

        let rtx = nvml.device_by_index(0).unwrap();
        assert_eq!(
            rtx.uuid().unwrap(),
            "GPU-11111111-2222-4333-8444-555555555555"
        );
        assert_eq!(rtx.name().unwrap(), "NVIDIA GeForce RTX 4090");
        assert_eq!(rtx.index().unwrap(), 0);
        assert_eq!(rtx.minor_number().unwrap(), 0);
        let memory = rtx.memory_info().unwrap();
        assert_eq!((memory.total, memory.used), (4 * GIB, 0));
        assert_eq!(memory.free, 4 * GIB - 32 * MIB, "NVML keeps a little back");
        let pci = rtx.pci_info().unwrap();
        assert_eq!(pci.bus_id, "00000000:01:00.0");
        assert_eq!((pci.domain, pci.bus, pci.device), (0, 1, 0));
        assert_eq!(pci.pci_device_id, 0x2684_10de);
        let cc = rtx.cuda_compute_capability().unwrap();
        assert_eq!((cc.major, cc.minor), (8, 9));
        assert_eq!(rtx.architecture().unwrap().to_string(), "Ada");
        assert_eq!(rtx.brand().unwrap(), Brand::GeForce);
        assert_eq!(rtx.num_cores().unwrap(), 128 * 128);
        let utilization = rtx.utilization_rates().unwrap();
        assert_eq!((utilization.gpu, utilization.memory), (0, 0));
        assert!(rtx.running_compute_processes().unwrap().is_empty());
        assert!(rtx.process_utilization_stats(None).unwrap().is_empty());

        let l40s = nvml
            .device_by_uuid("GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee")
            .unwrap();
        assert_eq!(l40s.index().unwrap(), 1);
        assert_eq!(l40s.minor_number().unwrap(), 5);
        assert_eq!(l40s.brand().unwrap(), Brand::Nvidia);
        assert_eq!(l40s.memory_info().unwrap().total, GIB);
        assert_eq!(
            nvml.device_by_pci_bus_id("00000000:41:00.0")
                .unwrap()
                .index()
                .unwrap(),
            1
        );
        assert!(matches!(
            nvml.device_by_uuid("GPU-00000000-0000-4000-8000-000000000000"),
            Err(NvmlError::NotFound)
        ));
        assert!(matches!(
            nvml.device_by_index(2),
            Err(NvmlError::InvalidArg)
        ));
    });
}

#[test]
fn memory_and_processes_are_the_cuda_processes() {
    if in_child("memory_and_processes_are_the_cuda_processes") {
        let expected_pid: u32 = std::env::var("EXPECT_PID").unwrap().parse().unwrap();
        let nvml = nvml();
        let rtx = nvml.device_by_index(0).unwrap();
        let l40s = nvml.device_by_index(1).unwrap();
        if expected_pid == 0 {
            assert_eq!(
                rtx.memory_info().unwrap().used,
                0,
                "a killed process's memory is gone"
            );
            assert!(rtx.running_compute_processes().unwrap().is_empty());
            assert!(l40s.running_compute_processes().unwrap().is_empty());
            return;
        }
        let memory = rtx.memory_info().unwrap();
        assert_eq!(memory.used, GIB + 256 * MIB, "both processes' memory");
        assert_eq!(memory.free, 4 * GIB - 32 * MIB - GIB - 256 * MIB);
        let mut processes = rtx.running_compute_processes().unwrap();
        processes.sort_by_key(|p| p.pid);
        assert_eq!(processes.len(), 2);
        let holder = processes
            .iter()
            .find(|p| p.pid == expected_pid)
            .expect("the CUDA process is listed");
        assert_eq!(holder.used_gpu_memory, UsedGpuMemory::Used(GIB));
        assert_eq!(rtx.running_compute_processes_count().unwrap(), 2);
        // On the other card it has a context and no memory: listed, using nothing.
        let on_l40s = l40s.running_compute_processes().unwrap();
        assert!(on_l40s.iter().any(|p| p.pid == expected_pid));
        assert_eq!(l40s.memory_info().unwrap().used, 0);
        let samples = rtx.process_utilization_stats(None).unwrap();
        assert!(
            samples
                .iter()
                .any(|s| s.pid == expected_pid && s.sm_util == 0)
        );
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::two_cards();
    let holder = node.cuda_process(&format!("0:{}", GIB));
    let other = node.cuda_process(&format!("0:{}", 256 * MIB));
    let pid = holder.pid().to_string();
    node.run_with("memory_and_processes_are_the_cuda_processes", |c| {
        c.env("EXPECT_PID", &pid);
    });
    holder.kill();
    other.kill();
    node.run_with("memory_and_processes_are_the_cuda_processes", |c| {
        c.env("EXPECT_PID", "0");
    });
}

#[test]
fn cuda_visible_devices_does_not_apply_to_nvml() {
    if in_child("cuda_visible_devices_does_not_apply_to_nvml") {
        assert_eq!(std::env::var("CUDA_VISIBLE_DEVICES").as_deref(), Ok("1"));
        let nvml = nvml();
        assert_eq!(nvml.device_count().unwrap(), 2);
        assert_eq!(
            nvml.device_by_index(0).unwrap().name().unwrap(),
            "NVIDIA GeForce RTX 4090"
        );
        return;
    }
    if in_any_child() {
        return;
    }
    Node::two_cards().run_with("cuda_visible_devices_does_not_apply_to_nvml", |c| {
        c.env("CUDA_VISIBLE_DEVICES", "1");
    });
}

#[test]
fn a_bad_config_fails_init_naming_the_file() {
    if in_child("a_bad_config_fails_init_naming_the_file") {
        let path = nvml_library();
        let result = Nvml::builder().lib_path(OsStr::new(&path)).init();
        assert!(
            matches!(result, Err(NvmlError::Unknown)),
            "{:?}",
            result.err()
        );
        return;
    }
    if in_any_child() {
        return;
    }
    let node = Node::new(
        r#"{"devices": [{"uuid": "GPU-11111111-2222-4333-8444-555555555555", "name": "x", "memory": "4Gi"}]}"#,
    );
    let stderr = node.run("a_bad_config_fails_init_naming_the_file");
    assert!(
        stderr.contains(&node.config.display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("memory: invalid type"), "{stderr}");
}

/// The event API as Tessera's plugin uses it (`tessera_driver::nvml::HealthProbe`): an event
/// set with every GPU registered for critical XIDs, waited on with a timeout.
#[test]
fn xid_events_through_an_event_set() {
    scenario("xid_events_through_an_event_set", || {
        let nvml = nvml();
        let events = events_file();
        let rtx = nvml.device_by_index(0).unwrap();
        let l40s = nvml.device_by_index(1).unwrap();
        assert_eq!(
            rtx.supported_event_types().unwrap(),
            EventTypes::CRITICAL_XID_ERROR
        );
        let mut set = nvml.create_event_set().unwrap();
        for device in [&rtx, &l40s] {
            set = device
                .register_events(EventTypes::CRITICAL_XID_ERROR, set)
                .unwrap();
        }
        assert!(matches!(set.wait(50), Err(NvmlError::Timeout)));
        let inject = |uuid: &str, xid| {
            tessera_fake_gpu_model::events::inject_xid(&events, uuid, xid).expect("inject")
        };
        inject("GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee", 79);
        inject("GPU-11111111-2222-4333-8444-555555555555", 13);
        inject("GPU-11111111-2222-4333-8444-555555555555", 999);
        let event = set.wait(5_000).unwrap();
        assert_eq!(
            event.device.uuid().unwrap(),
            "GPU-aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
        );
        assert_eq!(event.event_type, EventTypes::CRITICAL_XID_ERROR);
        assert_eq!(event.event_data, Some(XidError::Value(79)));
        let event = set.wait(5_000).unwrap();
        assert_eq!(event.device.index().unwrap(), 0);
        assert_eq!(event.event_data, Some(XidError::Value(13)));
        let event = set.wait(5_000).unwrap();
        assert_eq!(event.event_data, Some(XidError::Unknown), "999: unknown");
        assert!(matches!(set.wait(50), Err(NvmlError::Timeout)), "each once");
        // A GPU's other event types are not supported: registration fails and frees the set.
        let set = nvml.create_event_set().unwrap();
        assert!(matches!(
            rtx.register_events(EventTypes::PSTATE_CHANGE, set)
                .map_err(|e| e.error),
            Err(NvmlError::NotSupported)
        ));
        nvml.create_event_set().unwrap().release_events().unwrap();
    });
}
