//! CDI specs checked with the reference Rust CDI implementation (`container-device-interface`):
//! schema, names, edits and the minimum version, the way a runtime loads them.

use std::path::{Path, PathBuf};

use container_device_interface as cdi_crate;
use proptest::prelude::*;

use super::*;

const UID: &str = "0b7c4a2e-8c1d-4f53-9f0e-3b1f6f1c2a77";

fn device(name: &str, share: Option<&str>, index: u32) -> AllocatedDevice {
    AllocatedDevice {
        request: "gpu".into(),
        pool: "node-a".into(),
        device: name.into(),
        share_id: share.map(str::to_string),
        gpu_uuid: format!("GPU-{index}a1b2c3d-0000-4000-8000-000000000000"),
        gpu_index: index,
        gpu_minor: index,
        memory: 1 << 30,
        cores: 10,
        admin_access: false,
    }
}

/// Writes `spec` where a runtime would find it and loads it with the CDI crate.
fn load_with_cdi_crate(dir: &Path, spec: &Spec) -> cdi_crate::spec::Spec {
    let path: PathBuf = dir.join(spec_file_name(UID));
    std::fs::write(&path, spec.to_json()).expect("write spec");
    let mut loaded = cdi_crate::spec::read_spec(&path, 0)
        .unwrap_or_else(|e| panic!("CDI crate refused the spec: {e:?}"));
    loaded
        .validate()
        .unwrap_or_else(|e| panic!("CDI crate validation failed: {e:?}"));
    let raw = cdi_crate::spec::parse_spec(&path).expect("parse");
    let required = cdi_crate::version::minimum_required_version(&raw).expect("minimum version");
    assert!(
        !required.is_greater_than(&cdi_crate::version::VersionWrapper::new(&spec.cdi_version)),
        "spec says cdiVersion {} but needs more",
        spec.cdi_version
    );
    loaded
}

fn host(state: &Path) -> HostPaths {
    HostPaths::new(state, UID)
}

#[test]
fn toolkit_spec_preloads_the_shim_and_mounts_the_config_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let devices = [
        device("gpu-0", Some("9f0c4c4e-1111-4000-8000-000000000001"), 0),
        device("gpu-1-slice-0of2", None, 1),
    ];
    let spec = claim_spec(UID, &devices, &host(Path::new("/var/lib/tessera")), None);
    let mut loaded = load_with_cdi_crate(dir.path(), &spec);
    assert_eq!(loaded.get_vendor(), DRIVER_NAME);
    assert_eq!(loaded.get_class(), CLASS);
    let names: Vec<_> = loaded.get_devices().keys().cloned().collect();
    assert_eq!(
        names,
        vec![
            format!("{UID}-gpu-0-9f0c4c4e-1111-4000-8000-000000000001"),
            format!("{UID}-gpu-1-slice-0of2"),
        ]
    );
    assert_eq!(
        spec.cdi_version, "0.5.0",
        "claim UIDs may start with a digit"
    );
    assert!(loaded.edits().is_some());

    let mounts = &spec.container_edits.mounts;
    let find = |path: &str| {
        mounts
            .iter()
            .find(|m| m.container_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    assert_eq!(
        find(CONTAINER_SHIM).host_path,
        "/var/lib/tessera/lib/libtessera.so"
    );
    assert!(find(CONTAINER_SHIM).options.contains(&"ro".to_string()));
    assert!(find(CONTAINER_PRELOAD).options.contains(&"ro".to_string()));
    assert_eq!(
        find(CONTAINER_CONFIG).host_path,
        format!("/var/lib/tessera/claims/{UID}/config.json")
    );
    assert!(
        find(CONTAINER_CONFIG).options.contains(&"ro".to_string()),
        "a container must not raise its limit"
    );
    assert!(find(CONTAINER_REGION).options.contains(&"rw".to_string()));
    assert_eq!(find(CONTAINER_BOARDS).host_path, "/var/lib/tessera/boards");
    assert!(
        find(CONTAINER_BOARDS).options.contains(&"ro".to_string()),
        "a claim reads the others' board entries and changes none"
    );
    // Its own entries, two per GPU, are the only board files it can write.
    for gpu in 0..2 {
        let uuid = format!("GPU-{gpu}a1b2c3d-0000-4000-8000-000000000000");
        for (kind, file) in [("compute", "normal.compute"), ("memory", "memory")] {
            let own = find(&format!("{CONTAINER_OWN_BOARD}/{uuid}.{kind}"));
            assert_eq!(
                own.host_path,
                format!("/var/lib/tessera/boards/{uuid}/{UID}.{file}"),
                "the compute entry's name carries the claim's priority"
            );
            assert!(own.options.contains(&"rw".to_string()));
        }
    }
    let board_mounts = mounts
        .iter()
        .filter(|m| m.container_path.starts_with("/run/tessera/board"))
        .count();
    assert_eq!(board_mounts, 5, "all claims' entries and four of its own");
    assert_eq!(
        find(CONTAINER_RESERVATIONS).host_path,
        "/var/lib/tessera/reservations"
    );
    assert!(
        find(CONTAINER_RESERVATIONS)
            .options
            .contains(&"ro".to_string()),
        "only the plugin writes the reservations"
    );
    assert_eq!(
        spec.container_edits.env,
        vec!["TESSERA_CONFIG=/etc/tessera/config.json".to_string()]
    );
    assert!(
        spec.container_edits.device_nodes.is_empty(),
        "the toolkit brings device nodes"
    );

    let ids = device_ids(UID, &devices[0], CdiMode::Toolkit);
    assert_eq!(
        ids,
        vec![
            format!("gpu.tessera.dev/claim={UID}-gpu-0-9f0c4c4e-1111-4000-8000-000000000001"),
            format!("nvidia.com/gpu={}", devices[0].gpu_uuid),
        ]
    );
    assert_eq!(device_ids(UID, &devices[1], CdiMode::Standalone).len(), 1);
}

#[test]
fn standalone_spec_carries_device_nodes_and_driver_libraries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("driver");
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&lib).expect("lib dir");
    std::fs::write(lib.join("libcuda.so.570.86.15"), b"elf").expect("lib");
    std::os::unix::fs::symlink("libcuda.so.570.86.15", lib.join("libcuda.so.1"))
        .expect("soname link");
    std::fs::write(lib.join("libnvidia-ml.so.1"), b"elf").expect("nvml");
    let dev = dir.path().join("dev-root/dev");
    std::fs::create_dir_all(&dev).expect("dev");
    for node in ["nvidiactl", "nvidia-uvm", "nvidia0"] {
        std::fs::write(dev.join(node), b"").expect("node");
    }
    let files = DriverFiles::discover(&root, &dir.path().join("dev-root")).expect("driver found");
    files.check_gpu_node(0).expect("gpu 0 exists");
    assert!(
        files
            .check_gpu_node(1)
            .expect_err("gpu 1 missing")
            .to_string()
            .contains("nvidia1")
    );
    let spec = claim_spec(
        UID,
        &[device("gpu-0", None, 0)],
        &host(Path::new("/var/lib/tessera")),
        Some(&files),
    );

    let cuda = spec
        .container_edits
        .mounts
        .iter()
        .find(|m| m.container_path == "/usr/lib/x86_64-linux-gnu/libcuda.so.1")
        .expect("libcuda mount");
    assert!(
        cuda.host_path.ends_with("libcuda.so.570.86.15"),
        "the soname link is resolved: {}",
        cuda.host_path
    );
    let nodes: Vec<_> = spec
        .container_edits
        .device_nodes
        .iter()
        .map(|n| n.path.as_str())
        .collect();
    assert_eq!(nodes, vec!["/dev/nvidiactl", "/dev/nvidia-uvm"]);
    assert_eq!(
        spec.devices[0].container_edits.device_nodes[0].path,
        "/dev/nvidia0"
    );
    // The CDI crate stats device nodes, so check the format only.
    let raw: cdi_crate::specs::config::Spec =
        serde_json::from_slice(&spec.to_json()).expect("CDI crate parses it");
    cdi_crate::spec::validate_spec(&raw).expect("schema-valid");

    let empty = tempfile::tempdir().expect("tempdir");
    let err = DriverFiles::discover(empty.path(), Path::new("/")).expect_err("no driver");
    assert!(err.to_string().contains("libcuda.so.1"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn generated_specs_always_validate(
        uid in "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        shapes in proptest::collection::vec((0u32..8, proptest::option::of("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-8[0-9a-f]{3}-[0-9a-f]{12}")), 1..6),
    ) {
        let devices: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, (index, share))| {
                let name = if i % 2 == 0 { format!("gpu-{index}") } else { format!("gpu-{index}-slice-{i}of8") };
                let share = share.clone().map(|s| format!("{s}{i}"));
                device(&name, share.as_deref(), *index)
            })
            .collect();
        // Distinct CDI names, as distinct results have.
        let mut names: Vec<_> = devices.iter().map(|d| device_name(&uid, d)).collect();
        names.sort();
        names.dedup();
        prop_assume!(names.len() == devices.len());
        let spec = claim_spec(&uid, &devices, &HostPaths::new(Path::new("/var/lib/tessera"), &uid), None);
        let raw: cdi_crate::specs::config::Spec = serde_json::from_slice(&spec.to_json()).expect("parses");
        prop_assert!(cdi_crate::spec::validate_spec(&raw).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(spec_file_name(&uid));
        std::fs::write(&path, spec.to_json()).expect("write");
        let mut loaded = cdi_crate::spec::read_spec(&path, 0).expect("loads");
        prop_assert_eq!(loaded.validate().expect("valid").len(), devices.len());
    }
}
