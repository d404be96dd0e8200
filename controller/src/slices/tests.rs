//! Unit and property tests of slice building: limits never exceeded, names valid, devices
//! conserved across slices, for every mode and version.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use serde_json::Value;
use tessera_driver::{DeviceName, Gpu, Inventory, MemoryOvercommit};

use super::build::*;
use super::model::*;
use super::*;

fn gpu(index: u32, memory: u64) -> Gpu {
    Gpu {
        uuid: format!("GPU-{index:08}-0000-4000-8000-000000000000"),
        index,
        minor: index,
        product_name: "NVIDIA GeForce RTX 4090".into(),
        memory,
        brand: Some("geforce".into()),
        architecture: Some("ada".into()),
        cuda_compute_capability: Some("8.9".into()),
        pci_bus_id: Some(format!("0000:{index:02X}:00.0")),
        pcie_root: None,
        numa_node: None,
        context_overhead: 0,
        driver_memory_wall: false,
    }
}

fn inventory(n: u32, memory: u64) -> Inventory {
    Inventory {
        driver_version: Some("535.104.05".into()),
        gpus: (0..n).map(|i| gpu(i, memory)).collect(),
    }
}

const MODES: [SharingMode; 5] = [
    SharingMode::Consumable,
    SharingMode::Partitioned,
    SharingMode::Fixed { slices: 4 },
    SharingMode::Fixed { slices: 100 },
    SharingMode::Exclusive,
];

/// Everything the API server's validation checks that building controls.
fn check_plan(inv: &Inventory, plan: &PoolPlan, layout: CounterLayout) {
    let mut names = BTreeSet::new();
    let sets: BTreeSet<_> = plan
        .slices
        .iter()
        .flat_map(|s| s.counter_sets.iter().map(|c| c.name.clone()))
        .collect();
    for slice in &plan.slices {
        let counters = slice
            .devices
            .iter()
            .any(|d| !d.consumes_counters.is_empty());
        let max = if counters {
            MAX_DEVICES_WITH_COUNTERS
        } else {
            MAX_DEVICES
        };
        assert!(
            slice.devices.len() <= max,
            "{} devices > {max}",
            slice.devices.len()
        );
        assert!(slice.counter_sets.len() <= MAX_COUNTER_SETS);
        assert!(
            !slice.devices.is_empty() || !slice.counter_sets.is_empty(),
            "empty slice"
        );
        if layout == CounterLayout::Separate {
            assert!(
                slice.devices.is_empty() || slice.counter_sets.is_empty(),
                "devices and counters mixed"
            );
        }
        for d in &slice.devices {
            assert!(is_dns_label(&d.name), "{}", d.name);
            assert!(names.insert(d.name.clone()), "duplicate {}", d.name);
            assert!(d.attributes.len() + d.capacity.len() <= MAX_ATTRIBUTES_AND_CAPACITIES);
            assert!(d.consumes_counters.len() <= 2);
            // The name alone must give the capacity the slice publishes (prepare relies on it).
            let parsed = DeviceName::parse(&d.name).expect("a Tessera device name");
            let g = inv.by_index(parsed.gpu_index()).expect("GPU exists");
            let share = parsed.limits(g).expect("fits");
            assert_eq!(d.capacity["memory"].value, share.memory);
            assert_eq!(d.capacity["cores"].value, u64::from(share.cores));
            for c in &d.consumes_counters {
                assert!(
                    sets.contains(&c.counter_set),
                    "unknown counter set {}",
                    c.counter_set
                );
                if layout == CounterLayout::Combined {
                    assert!(
                        slice.counter_sets.iter().any(|s| s.name == c.counter_set),
                        "counter set not in the device's slice"
                    );
                }
            }
            if let Some(p) = d.capacity["memory"].policy {
                let value = d.capacity["memory"].value;
                assert!(
                    p.min <= p.default
                        && p.default <= p.max
                        && p.max <= value
                        && p.min + p.step <= value
                );
                assert_eq!((p.default - p.min) % p.step, 0);
                assert_eq!((p.max - p.min) % p.step, 0);
            }
        }
        for s in &slice.counter_sets {
            assert!(is_dns_label(&s.name) && s.counters.len() <= 32);
        }
    }
    // Conservation: exactly the devices the mode defines, each once.
    let per_gpu = match plan.mode {
        SharingMode::Consumable | SharingMode::Exclusive => 1,
        SharingMode::Partitioned => LADDER.iter().sum::<u32>() as usize,
        SharingMode::Fixed { slices } => slices as usize,
    };
    assert_eq!(names.len(), per_gpu * inv.gpus.len());
    // Counters never promise more than a GPU has, per size.
    for slice in &plan.slices {
        for set in &slice.counter_sets {
            assert!(set.counters["cores"] == 100);
        }
    }
}

fn check_rendered(plan: &PoolPlan, version: ApiVersion, objects: &[Value]) {
    assert_eq!(objects.len(), plan.slices.len());
    let devices: usize = objects
        .iter()
        .map(|o| o["spec"]["devices"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(
        devices,
        plan.devices().count(),
        "devices conserved across slices"
    );
    for (i, o) in objects.iter().enumerate() {
        assert_eq!(o["apiVersion"], version.api_version());
        assert!(is_dns_subdomain(
            o["metadata"]["name"].as_str().expect("name")
        ));
        assert_eq!(o["spec"]["driver"], "gpu.tessera.dev");
        assert_eq!(o["spec"]["nodeName"], plan.node);
        assert_eq!(o["spec"]["pool"]["resourceSliceCount"], objects.len());
        assert_eq!(o["spec"]["pool"]["generation"], 7);
        assert_eq!(o["metadata"]["name"], slice_name(&plan.node, i));
        for d in o["spec"]["devices"].as_array().into_iter().flatten() {
            let body = match version {
                ApiVersion::V1beta1 | ApiVersion::V1alpha3 => &d["basic"],
                _ => d,
            };
            let memory = &body["capacity"]["memory"];
            match version {
                ApiVersion::V1alpha3 => {
                    assert!(memory.is_string(), "v1alpha3 capacity is a plain quantity")
                }
                _ => assert!(memory["value"].is_string()),
            }
            assert!(body["attributes"]["uuid"]["string"].is_string());
            assert!(body["attributes"]["cudaComputeCapability"]["version"] == "8.9.0");
            assert!(body["attributes"]["driverVersion"]["version"] == "535.104.5");
        }
    }
}

#[test]
fn every_mode_and_version_renders_valid_slices() {
    let inv = inventory(8, 24 << 30);
    for mode in MODES {
        for layout in [CounterLayout::Combined, CounterLayout::Separate] {
            let plan = build_pool(&inv, "node-a", mode, layout).expect("builds");
            check_plan(&inv, &plan, layout);
            for version in ApiVersion::ALL.into_iter().filter(|v| v.supports(mode)) {
                let objects = render_pool(
                    &plan,
                    version,
                    &SliceMeta {
                        generation: 7,
                        node_uid: Some("uid-1"),
                    },
                );
                check_rendered(&plan, version, &objects);
            }
        }
    }
}

#[test]
fn consumable_has_request_policies_and_multiple_allocations() {
    let plan = build_pool(
        &inventory(1, 24 << 30),
        "n",
        SharingMode::Consumable,
        CounterLayout::Separate,
    )
    .expect("builds");
    let d = &plan.slices[0].devices[0];
    assert_eq!(d.name, "gpu-0");
    assert!(d.allow_multiple_allocations);
    let p = d.capacity["memory"].policy.expect("policy");
    assert_eq!((p.min, p.step, p.max), (256 << 20, 256 << 20, 24 << 30));
    let objects = render_pool(
        &plan,
        ApiVersion::V1,
        &SliceMeta {
            generation: 1,
            node_uid: None,
        },
    );
    assert_eq!(
        objects[0]["spec"]["devices"][0]["capacity"]["cores"]["requestPolicy"]["validRange"]["step"],
        "1"
    );
}

#[test]
fn partitioned_separate_layout_puts_counters_first() {
    let plan = build_pool(
        &inventory(8, 80 << 30),
        "n",
        SharingMode::Partitioned,
        CounterLayout::Separate,
    )
    .expect("builds");
    assert_eq!(plan.slices[0].counter_sets.len(), 8);
    assert!(plan.slices[0].devices.is_empty());
    // 15 devices per GPU, 64 per slice: 4 GPUs per slice.
    assert_eq!(plan.slices.len(), 3);
    let half = &plan.slices[1].devices[1];
    assert_eq!(half.name, "gpu-0-slice-0of2");
    assert_eq!(half.consumes_counters[0].counters["memory"], 40 << 30);
}

#[test]
fn mode_refuses_gpus_too_small() {
    let err = build_pool(
        &inventory(1, 256 << 20),
        "n",
        SharingMode::Consumable,
        CounterLayout::Separate,
    )
    .expect_err("too small");
    assert!(err.to_string().contains("GPU 0"), "{err}");
    assert_eq!(
        build_pool(
            &inventory(1, 1 << 30),
            "n",
            SharingMode::Fixed { slices: 0 },
            CounterLayout::Separate
        ),
        Err(BuildError::BadSliceCount(0))
    );
}

#[test]
fn long_node_names_give_valid_unique_slice_names() {
    // A valid node name (labels ≤ 63) near the 253 limit.
    let node = [
        &"a".repeat(60),
        &"b".repeat(60),
        &"c".repeat(60),
        &"d".repeat(60),
        "example",
    ]
    .join(".");
    let (a, b) = (slice_name(&node, 0), slice_name(&node, 1));
    assert!(
        is_dns_subdomain(&a) && is_dns_subdomain(&b) && a != b,
        "{a}"
    );
}

#[test]
fn semver_normalises_driver_versions() {
    assert_eq!(semver("8.9").as_deref(), Some("8.9.0"));
    assert_eq!(semver("535.104.05").as_deref(), Some("535.104.5"));
    assert_eq!(semver("12"), Some("12.0.0".into()));
    assert_eq!(semver("abc"), None);
}

fn any_mode() -> impl Strategy<Value = SharingMode> {
    prop_oneof![
        Just(SharingMode::Consumable),
        Just(SharingMode::Partitioned),
        Just(SharingMode::Exclusive),
        (1u32..=100).prop_map(|slices| SharingMode::Fixed { slices }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn limits_hold_for_any_node(gpus in 1u32..=24, gib in 1u64..=192, mode in any_mode(), separate in any::<bool>(), version in 0usize..4) {
        let inv = inventory(gpus, gib << 30);
        let layout = if separate { CounterLayout::Separate } else { CounterLayout::Combined };
        let plan = build_pool(&inv, "node-x", mode, layout).expect("builds");
        check_plan(&inv, &plan, layout);
        let version = ApiVersion::ALL[version];
        if version.supports(mode) {
            check_rendered(&plan, version, &render_pool(&plan, version, &SliceMeta { generation: 7, node_uid: None }));
        }
    }
}

/// The limit preparing a claim derives for `device` when the scheduler hands it out whole (in
/// consumable mode: consuming all of its capacity).
fn prepared_memory(
    inv: &Inventory,
    d: &Device,
    overcommit: &tessera_driver::MemoryOvercommit,
) -> u64 {
    use tessera_driver::allocation::{DeviceResult, claim_limits_with};
    let mut result = DeviceResult {
        request: "gpu".into(),
        driver: "gpu.tessera.dev".into(),
        pool: "n".into(),
        device: d.name.clone(),
        ..Default::default()
    };
    if d.allow_multiple_allocations {
        result.share_id = Some("s".into());
        result.consumed_capacity = [
            ("memory".to_string(), d.capacity["memory"].value.to_string()),
            ("cores".to_string(), "100".to_string()),
        ]
        .into_iter()
        .collect();
    }
    claim_limits_with(&[result], inv, overcommit)
        .expect("prepares")
        .gpus[0]
        .memory_limit
}

#[test]
fn overcommit_scales_memory_in_every_shared_mode_and_version() {
    const GIB: u64 = 1 << 30;
    let inv = inventory(2, 8 * GIB);
    let doubled: tessera_driver::MemoryOvercommit = "2".parse().expect("valid");
    // Expected memory capacity per device name, with factor 2 on 8 GiB cards.
    let expect = |mode: SharingMode, name: &str| -> u64 {
        match (mode, name) {
            (SharingMode::Consumable, _) => 16 * GIB,
            (SharingMode::Exclusive, _) => 8 * GIB,
            (SharingMode::Partitioned, "gpu-0" | "gpu-1") => 8 * GIB,
            (SharingMode::Partitioned | SharingMode::Fixed { .. }, n) => {
                let of: u64 = n
                    .rsplit("of")
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("slice");
                16 * GIB / of
            }
        }
    };
    for mode in MODES {
        for layout in [CounterLayout::Combined, CounterLayout::Separate] {
            let plan = build_pool_with(&inv, "n", mode, layout, &doubled, &BTreeMap::new())
                .expect("builds");
            for d in plan.devices() {
                let memory = d.capacity["memory"].value;
                if let SharingMode::Fixed { slices: 100 } = mode {
                    assert_eq!(memory, 16 * GIB / 100 / (1 << 20) * (1 << 20), "{}", d.name);
                } else {
                    assert_eq!(memory, expect(mode, &d.name), "{mode:?} {}", d.name);
                }
                // Preparing the claim gives exactly what was published: never more.
                assert_eq!(
                    prepared_memory(&inv, d, &doubled),
                    memory,
                    "{mode:?} {}",
                    d.name
                );
                let percent = d.attributes.get("memoryOvercommitPercent");
                if mode == SharingMode::Exclusive {
                    assert_eq!(percent, None);
                } else {
                    assert_eq!(percent, Some(&Attribute::Int(200)), "{mode:?}");
                }
                assert!(d.attributes.len() + d.capacity.len() <= MAX_ATTRIBUTES_AND_CAPACITIES);
            }
            if mode == SharingMode::Consumable {
                let p = plan.slices[0].devices[0].capacity["memory"]
                    .policy
                    .expect("policy");
                // A claim may ask up to the offered memory; naming none gets the physical card.
                assert_eq!((p.max, p.default), (16 * GIB, 8 * GIB));
            }
            for set in plan.slices.iter().flat_map(|s| &s.counter_sets) {
                assert_eq!(set.counters["memory"], 16 * GIB);
                assert_eq!(set.counters["cores"], 100);
            }
            if mode == SharingMode::Partitioned {
                // The whole GPU gives the card but takes every counter: it stays alone.
                let whole = plan.devices().find(|d| d.name == "gpu-0").expect("whole");
                assert_eq!(whole.consumes_counters[0].counters["memory"], 16 * GIB);
            }
            for version in ApiVersion::ALL.into_iter().filter(|v| v.supports(mode)) {
                let objects = render_pool(
                    &plan,
                    version,
                    &SliceMeta {
                        generation: 7,
                        node_uid: None,
                    },
                );
                check_rendered(&plan, version, &objects);
                let first = objects
                    .iter()
                    .flat_map(|o| o["spec"]["devices"].as_array().into_iter().flatten())
                    .next()
                    .expect("a device");
                let body = match version {
                    ApiVersion::V1beta1 | ApiVersion::V1alpha3 => &first["basic"],
                    _ => first,
                };
                let memory = match version {
                    ApiVersion::V1alpha3 => &body["capacity"]["memory"],
                    _ => &body["capacity"]["memory"]["value"],
                };
                let first_name = first["name"].as_str().expect("name");
                let want = plan
                    .devices()
                    .find(|d| d.name == first_name)
                    .expect("device")
                    .capacity["memory"]
                    .value;
                assert_eq!(
                    memory,
                    &Value::String(want.to_string()),
                    "{mode:?} {version:?}"
                );
                if mode != SharingMode::Exclusive {
                    assert_eq!(body["attributes"]["memoryOvercommitPercent"]["int"], 200);
                }
            }
        }
    }
}

#[test]
fn factor_one_and_other_models_publish_as_before() {
    let inv = inventory(2, 24 << 30);
    let one: tessera_driver::MemoryOvercommit = "1.0".parse().expect("valid");
    let other_model: tessera_driver::MemoryOvercommit = "NVIDIA L40S=3".parse().expect("valid");
    for mode in MODES {
        let before = build_pool(&inv, "n", mode, CounterLayout::Separate).expect("builds");
        for policy in [&one, &other_model] {
            let after = build_pool_with(
                &inv,
                "n",
                mode,
                CounterLayout::Separate,
                policy,
                &BTreeMap::new(),
            )
            .expect("builds");
            assert_eq!(before, after, "{mode:?} {policy}");
        }
    }
    // Per model: only the named model's GPUs grow.
    let mut mixed = inventory(2, 24 << 30);
    mixed.gpus[1].product_name = "NVIDIA L40S".into();
    let plan = build_pool_with(
        &mixed,
        "n",
        SharingMode::Consumable,
        CounterLayout::Separate,
        &other_model,
        &BTreeMap::new(),
    )
    .expect("builds");
    let memory: Vec<u64> = plan.devices().map(|d| d.capacity["memory"].value).collect();
    assert_eq!(memory, vec![24 << 30, 72 << 30]);
}

#[test]
fn an_unhealthy_gpus_devices_carry_its_taint_in_v1_only() {
    use tessera_driver::health::{TAINT_XID, Taint, TaintEffect};
    let inv = inventory(2, 24 << 30);
    let taint = Taint {
        key: TAINT_XID,
        value: "79".into(),
        effect: TaintEffect::NoExecute,
    };
    let taints = BTreeMap::from([(1, taint)]);
    let plan = build_pool_with(
        &inv,
        "n",
        SharingMode::Fixed { slices: 4 },
        CounterLayout::Separate,
        &MemoryOvercommit::none(),
        &taints,
    )
    .expect("builds");
    let tainted: Vec<&str> = plan
        .devices()
        .filter(|d| !d.taints.is_empty())
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(tainted.len(), 4, "every device of GPU 1: {tainted:?}");
    assert!(
        tainted.iter().all(|d| d.starts_with("gpu-1")),
        "{tainted:?}"
    );
    let meta = SliceMeta {
        generation: 1,
        node_uid: None,
    };
    let v1 = render_pool(&plan, ApiVersion::V1, &meta);
    let devices = v1[0]["spec"]["devices"].as_array().expect("devices");
    let gpu1 = devices
        .iter()
        .find(|d| d["name"].as_str().is_some_and(|n| n.starts_with("gpu-1")))
        .expect("a device of GPU 1");
    assert_eq!(
        gpu1["taints"],
        serde_json::json!([{ "key": "gpu.tessera.dev/xid", "value": "79", "effect": "NoExecute" }])
    );
    let v1beta1 = render_pool(&plan, ApiVersion::V1beta1, &meta);
    assert!(!v1beta1[0].to_string().contains("taints"), "{}", v1beta1[0]);
}

#[test]
fn a_tainted_pool_keeps_to_64_devices_per_slice() {
    use tessera_driver::health::{TAINT_UNHEALTHY, Taint, TaintEffect};
    // 8 GPUs × 16 slices = 128 devices: one slice untainted, two with a taint.
    let inv = inventory(8, 24 << 30);
    let mode = SharingMode::Fixed { slices: 16 };
    let layout = CounterLayout::Separate;
    let none = MemoryOvercommit::none();
    let plan = build_pool_with(&inv, "n", mode, layout, &none, &BTreeMap::new()).expect("plan");
    assert_eq!(plan.slices.len(), 1);
    let taint = Taint {
        key: TAINT_UNHEALTHY,
        value: String::new(),
        effect: TaintEffect::NoSchedule,
    };
    let taints = BTreeMap::from([(3, taint)]);
    let plan = build_pool_with(&inv, "n", mode, layout, &none, &taints).expect("plan");
    assert_eq!(plan.slices.len(), 2);
    assert!(plan.slices.iter().all(|s| s.devices.len() <= 64));
}
