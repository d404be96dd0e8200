use super::*;

fn parse(text: &str) -> Result<Config, String> {
    Config::from_json(text).map_err(|e| e.to_string())
}

const MINIMAL: &str = r#"{"devices": [{"uuid": "GPU-12345678-1234-1234-1234-123456789abc",
                                         "name": "NVIDIA T4", "memory": 16106127360}]}"#;

#[test]
fn the_default_node_is_an_rtx_4090_and_an_l40s() {
    let config = Config::default();
    assert_eq!(config.driver_version, "570.86.15");
    assert_eq!(config.cuda_driver_version, 12090);
    assert_eq!(config.devices.len(), 2);
    let [rtx, l40s] = [&config.devices[0], &config.devices[1]];
    assert_eq!(rtx.name, "NVIDIA GeForce RTX 4090");
    assert_eq!(rtx.memory, 24 << 30);
    assert_eq!(rtx.brand, Brand::Geforce);
    assert_eq!(rtx.architecture, Architecture::Ada);
    assert_eq!(rtx.cuda_cores, 16384);
    assert_eq!(rtx.pci_device_id, 0x2684_10de);
    assert_eq!(l40s.name, "NVIDIA L40S");
    assert_eq!(l40s.memory, 48 << 30);
    assert_eq!(l40s.pci.cuda_form(), "0000:41:00.0");
    assert_eq!(l40s.pci_device_id, 0x26b9_10de);
    assert_ne!(rtx.uuid, l40s.uuid);
}

#[test]
fn optional_fields_take_documented_defaults() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.driver_version, "570.86.15");
    assert_eq!(config.cuda_driver_version, 12090);
    let device = &config.devices[0];
    assert_eq!(
        device.compute_capability,
        ComputeCapability { major: 8, minor: 9 }
    );
    assert_eq!(device.architecture, Architecture::Ada);
    assert_eq!(device.brand, Brand::Nvidia);
    assert_eq!(device.pci.cuda_form(), "0000:01:00.0", "bus = index + 1");
    assert_eq!(device.sm_count, 128);
    assert_eq!(device.max_threads_per_sm, 1536);
    assert!(device.managed_memory);
    assert_eq!(device.minor_number, 0);
    assert_eq!(
        device.context_memory,
        320 << 20,
        "a context's cost, modelled"
    );
    assert_eq!(
        device.wave_ns, 100_000,
        "a wave of blocks holds the SMs 100 µs"
    );
}

#[test]
fn wave_time_is_configurable_and_never_zero() {
    let with =
        |wave: &str| MINIMAL.replacen(r#""memory""#, &format!(r#""waveNs": {wave}, "memory""#), 1);
    assert_eq!(parse(&with("1")).unwrap().devices[0].wave_ns, 1);
    assert_eq!(
        parse(&with("0")).unwrap().devices[0].wave_ns,
        1,
        "0 would stop time"
    );
    let err = parse(&with("-1")).unwrap_err();
    assert!(err.contains("waveNs"), "{err}");
}

#[test]
fn architecture_follows_compute_capability_unless_given() {
    let with = |cc: &str, extra: &str| {
        parse(&format!(
            r#"{{"devices": [{{"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "x",
                "memory": 1, "computeCapability": "{cc}"{extra}}}]}}"#
        ))
        .map(|c| c.devices[0].architecture)
    };
    assert_eq!(with("7.5", ""), Ok(Architecture::Turing));
    assert_eq!(with("8.0", ""), Ok(Architecture::Ampere));
    assert_eq!(with("8.6", ""), Ok(Architecture::Ampere));
    assert_eq!(with("9.0", ""), Ok(Architecture::Hopper));
    assert_eq!(with("12.0", ""), Ok(Architecture::Blackwell));
    assert_eq!(
        with("8.9", r#", "architecture": "Hopper""#),
        Ok(Architecture::Hopper)
    );
    let err = with("11.0", "").unwrap_err();
    assert!(err.contains("devices[0].architecture"), "{err}");
}

#[test]
fn unknown_fields_are_rejected_by_name_with_their_line() {
    let err = parse("{\n \"devices\": [],\n \"driverVerison\": \"1.2\"\n}").unwrap_err();
    assert!(err.contains("unknown field `driverVerison`"), "{err}");
    assert!(err.contains("line 3"), "{err}");

    let err = parse(
        "{\"devices\": [\n {\"uuid\": \"GPU-12345678-1234-1234-1234-123456789abc\",\n  \"name\": \"x\", \"memory\": 1,\n  \"smcount\": 4}]}",
    )
    .unwrap_err();
    assert!(err.contains("unknown field `smcount`"), "{err}");
    assert!(
        err.contains("smCount"),
        "the message lists the expected names: {err}"
    );
    assert!(err.contains("line 4"), "{err}");
}

#[test]
fn missing_required_fields_are_named() {
    let err = parse(
        r#"{"devices": [{"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "x"}]}"#,
    )
    .unwrap_err();
    assert!(err.contains("missing field `memory`"), "{err}");
    let err = parse("{}").unwrap_err();
    assert!(err.contains("missing field `devices`"), "{err}");
}

#[test]
fn type_errors_name_the_field_and_line() {
    let err = parse(
        "{\"devices\": [{\n\"uuid\": \"GPU-12345678-1234-1234-1234-123456789abc\",\n\"name\": \"x\",\n\"memory\": \"24Gi\"}]}",
    )
    .unwrap_err();
    assert!(
        err.starts_with("memory: invalid type: string \"24Gi\""),
        "{err}"
    );
    assert!(err.contains("line 4"), "{err}");

    let err = parse(r#"{"cudaDriverVersion": "12.9", "devices": []}"#).unwrap_err();
    assert!(err.starts_with("cudaDriverVersion:"), "{err}");

    let err = parse(
        r#"{"devices": [{"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "x", "memory": 1, "managedMemory": 1}]}"#,
    )
    .unwrap_err();
    assert!(err.starts_with("managedMemory:"), "{err}");
}

#[test]
fn malformed_values_are_explained() {
    let device = |field: &str| {
        parse(&format!(
            r#"{{"devices": [{{"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "x", "memory": 1, {field}}}]}}"#
        ))
        .unwrap_err()
    };
    let err = device(r#""pciBusId": "01:00""#);
    assert!(
        err.starts_with("pciBusId: \"01:00\" is not a PCI bus id"),
        "{err}"
    );
    let err = device(r#""computeCapability": "89""#);
    assert!(err.starts_with("computeCapability:"), "{err}");
    let err = device(r#""brand": "radeon""#);
    assert!(
        err.starts_with("brand: \"radeon\" is not a brand (one of quadro, tesla"),
        "{err}"
    );
    let err = device(r#""architecture": "fermi""#);
    assert!(err.starts_with("architecture:"), "{err}");

    let err =
        parse(r#"{"devices": [{"uuid": "GPU-1234", "name": "x", "memory": 1}]}"#).unwrap_err();
    assert!(
        err.starts_with("uuid: \"GPU-1234\" is not a GPU UUID"),
        "{err}"
    );
    let err = parse(r#"{"driverVersion": "latest", "devices": []}"#).unwrap_err();
    assert!(err.starts_with("driverVersion:"), "{err}");
}

#[test]
fn whole_node_rules() {
    let err = parse(r#"{"devices": []}"#).unwrap_err();
    assert!(
        err.starts_with("devices: a fake node needs at least one device"),
        "{err}"
    );

    let err = parse(r#"{"devices": [{"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "x", "memory": 0}]}"#)
        .unwrap_err();
    assert_eq!(err, "devices[0].memory: must be a positive number of bytes");

    let twice = r#"{"devices": [
        {"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "a", "memory": 1},
        {"uuid": "GPU-12345678-1234-1234-1234-123456789ABC", "name": "b", "memory": 1}]}"#;
    let err = parse(twice).unwrap_err();
    assert!(err.starts_with("devices[1].uuid:"), "{err}");
    assert!(err.contains("devices[0]"), "{err}");

    let same_bus = r#"{"devices": [
        {"uuid": "GPU-12345678-1234-1234-1234-123456789abc", "name": "a", "memory": 1, "pciBusId": "0000:02:00.0"},
        {"uuid": "GPU-12345678-1234-1234-1234-123456789abd", "name": "b", "memory": 1, "pciBusId": "00000000:02:00.0"}]}"#;
    assert!(
        parse(same_bus)
            .unwrap_err()
            .starts_with("devices[1].pciBusId:")
    );

    let many: Vec<String> = (0..=MAX_DEVICES)
        .map(|i| {
            format!(
                r#"{{"uuid": "GPU-12345678-1234-1234-1234-{i:012x}", "name": "g", "memory": 1}}"#
            )
        })
        .collect();
    let err = parse(&format!(r#"{{"devices": [{}]}}"#, many.join(","))).unwrap_err();
    assert!(err.contains("at most 16"), "{err}");
}

#[test]
fn syntax_errors_carry_the_line() {
    let err = parse("{\n  \"devices\": [\n    {,\n  ]\n}").unwrap_err();
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn uuids_are_normalised_and_convert_to_bytes() {
    let uuid: Uuid = "GPU-4090A1B2-c3d4-4e5f-8a6b-7c8d9e0f1a2b".parse().unwrap();
    assert_eq!(uuid.as_str(), "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b");
    assert_eq!(
        uuid.bytes(),
        [
            0x40, 0x90, 0xa1, 0xb2, 0xc3, 0xd4, 0x4e, 0x5f, 0x8a, 0x6b, 0x7c, 0x8d, 0x9e, 0x0f,
            0x1a, 0x2b
        ]
    );
    assert!(
        "4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b"
            .parse::<Uuid>()
            .is_err()
    );
    assert!(
        "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2g"
            .parse::<Uuid>()
            .is_err()
    );
}

#[test]
fn pci_addresses_in_cuda_and_nvml_forms() {
    let cuda: PciAddress = "0000:41:00.0".parse().unwrap();
    let nvml: PciAddress = "00000000:41:00.0".parse().unwrap();
    let short: PciAddress = "41:00.0".parse().unwrap();
    assert_eq!(cuda, nvml);
    assert_eq!(cuda, short);
    assert_eq!(cuda.cuda_form(), "0000:41:00.0");
    assert_eq!(cuda.nvml_form(), "00000000:41:00.0");
    assert_eq!(cuda.nvml_legacy_form(), "0000:41:00.0");
    let upper: PciAddress = "0000:AB:1F.7".parse().unwrap();
    assert_eq!(upper.cuda_form(), "0000:ab:1f.7");
    for bad in [
        "",
        "0000:41:00",
        "0000:141:00.0",
        "0000:41:20.0",
        "0000:41:00.8",
        "x:41:00.0",
    ] {
        assert!(
            bad.parse::<PciAddress>().is_err(),
            "{bad:?} should not parse"
        );
    }
}

#[test]
fn the_fingerprint_covers_identity_and_capacity_only() {
    let a = parse(MINIMAL).unwrap();
    let mut b = a.clone();
    b.devices[0].name = "renamed".into();
    assert_eq!(a.fingerprint(), b.fingerprint());
    b.devices[0].memory += 1;
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), Config::default().fingerprint());
}

#[test]
fn the_plugins_health_fields_are_accepted_and_unknown_ones_still_refused() {
    let with_health = r#"{"devices": [{"uuid": "GPU-12345678-1234-1234-1234-123456789abc",
        "name": "NVIDIA T4", "memory": 16106127360, "health": "unhealthy", "healthReason": "XID 79"}]}"#;
    assert_eq!(parse(with_health).map(|c| c.devices.len()), Ok(1));
    let typo = with_health.replace("healthReason", "healthReasn");
    assert!(
        parse(&typo).is_err_and(|e| e.contains("healthReasn")),
        "{:?}",
        parse(&typo)
    );
}

#[test]
fn memory_limits_are_off_unless_a_device_says_so() {
    assert!(
        Config::default().devices.iter().all(|d| !d.memory_limits),
        "the default node models driver 570, which lacks nvmlDeviceSetMemoryLimits_v1"
    );
    assert!(!parse(MINIMAL).unwrap().devices[0].memory_limits);
    let with = |value: &str| {
        MINIMAL.replacen(
            r#""memory""#,
            &format!(r#""memoryLimits": {value}, "memory""#),
            1,
        )
    };
    assert!(parse(&with("true")).unwrap().devices[0].memory_limits);
    assert!(!parse(&with("false")).unwrap().devices[0].memory_limits);
    let err = parse(&with("\"yes\"")).unwrap_err();
    assert!(err.contains("memoryLimits"), "{err}");
}
