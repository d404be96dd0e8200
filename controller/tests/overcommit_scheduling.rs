//! Node memory overcommit against the real kube-apiserver and kube-scheduler v1.37
//! (`docs/oversubscription.md`): a node with one 8 GiB GPU in consumable mode. With factor 1 the
//! scheduler fits two 4 GiB claims and leaves the third unallocated; once the node publishes
//! factor 2 (16 GiB offered) the third is allocated, 12 GiB on an 8 GiB card, and a fourth of
//! 6 GiB stays unallocated, because the offered memory is a wall too. Each allocation, turned
//! into limits as the plugin does, gives the claim its own 4 GiB and no more.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use tessera_controller::ApiVersion;
use tessera_controller::publish::Publisher;
use tessera_controller::slices::{SharingMode, build_pool_with};
use tessera_driver::allocation::{DeviceResult, claim_limits_with};
use tessera_driver::{Gpu, Inventory, MemoryOvercommit};
use tessera_e2e_harness::ControlPlane;

const NODE: &str = "gpu-node-0";
const GIB: u64 = 1 << 30;

/// One 8 GiB Ada GPU.
fn small_node() -> Inventory {
    Inventory {
        driver_version: Some("570.86.15".into()),
        gpus: vec![Gpu {
            uuid: "GPU-4070a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b".into(),
            index: 0,
            minor: 0,
            product_name: "NVIDIA GeForce RTX 4070".into(),
            memory: 8 * GIB,
            brand: Some("geforce".into()),
            architecture: Some("ada".into()),
            cuda_compute_capability: Some("8.9".into()),
            pci_bus_id: Some("0000:01:00.0".into()),
            pcie_root: None,
            numa_node: None,
            context_overhead: 0,
            driver_memory_wall: false,
        }],
    }
}

async fn publish(publisher: &Publisher, inventory: &Inventory, overcommit: &MemoryOvercommit) {
    overcommit
        .check(inventory)
        .expect("an Ada GPU pages on demand");
    let plan = build_pool_with(
        inventory,
        NODE,
        SharingMode::Consumable,
        tessera_controller::slices::CounterLayout::Separate,
        overcommit,
        &Default::default(),
    )
    .expect("plan");
    let report = publisher.sync(&plan).await.expect("publish");
    assert!(report.dropped.is_empty(), "dropped {:?}", report.dropped);
}

/// A claim for `memory` and a quarter of the GPU's compute, and a pod that uses it.
async fn claim_and_pod(cp: &ControlPlane, name: &str, memory: &str) {
    let claim = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": {
            "deviceClassName": "gpu.tessera.dev",
            "capacity": { "requests": { "memory": memory, "cores": "25" } },
        } }] } },
    });
    create(
        cp,
        &resource("ResourceClaim", "resourceclaims"),
        true,
        claim,
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    pods.create(
        &PostParams::default(),
        &pod_with_claim(&format!("pod-{name}"), name),
    )
    .await
    .expect("pod");
}

/// The claim's allocation results of our driver, as the plugin reads them.
async fn results(cp: &ControlPlane, claim: &str) -> Vec<DeviceResult> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        "default",
        &resource("ResourceClaim", "resourceclaims"),
    );
    let got = serde_json::to_value(api.get(claim).await.expect("claim")).expect("json");
    got["status"]["allocation"]["devices"]["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| DeviceResult {
            request: r["request"].as_str().unwrap_or_default().into(),
            driver: r["driver"].as_str().unwrap_or_default().into(),
            pool: r["pool"].as_str().unwrap_or_default().into(),
            device: r["device"].as_str().unwrap_or_default().into(),
            share_id: r["shareID"].as_str().map(str::to_string),
            consumed_capacity: r["consumedCapacity"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect(),
            admin_access: r["adminAccess"].as_bool().unwrap_or(false),
        })
        .collect()
}

/// Waits until two of the three pods are bound to the node and returns the third's claim.
async fn two_bound_one_pending(cp: &ControlPlane, claims: [&'static str; 3]) -> &'static str {
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let start = Instant::now();
    loop {
        let mut pending = Vec::new();
        for claim in claims {
            let pod = pods.get(&format!("pod-{claim}")).await.expect("pod");
            match pod.spec.and_then(|s| s.node_name) {
                Some(node) => assert_eq!(node, NODE),
                None => pending.push(claim),
            }
        }
        if let [one] = pending[..] {
            return one;
        }
        assert!(
            !pending.is_empty(),
            "all three 4 GiB claims were bound on an 8 GiB GPU without overcommit"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not two bound after 120 s: {pending:?} pending\nscheduler log:\n{}",
            tessera_e2e_harness::process::log_tail(&cp.state().log("kube-scheduler"), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn assert_own_share(cp: &ControlPlane, claim: &str, overcommit: &MemoryOvercommit) {
    let results = results(cp, claim).await;
    assert_eq!(results.len(), 1, "{claim}: {results:?}");
    assert_eq!(results[0].device, "gpu-0");
    let limits = claim_limits_with(&results, &small_node(), overcommit).expect("limits");
    assert_eq!(
        (limits.gpus[0].memory_limit, limits.gpus[0].cores),
        (4 * GIB, 25),
        "{claim}: its own share, never more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_factor_two_fits_more_claims_than_the_card() {
    let Some(c) = start(37, "v1_37_overcommit", &[]).await else {
        return;
    };
    let cp = &c.cp;
    create_ready_node(&cp.client(), NODE).await;
    create_generic_class(cp).await;
    let publisher = Publisher::new(cp.client(), NODE, ApiVersion::V1);
    let inventory = small_node();
    let none = MemoryOvercommit::none();
    let doubled: MemoryOvercommit = "2".parse().expect("valid");

    // Factor 1: 8 GiB offered, two 4 GiB claims fit and the third does not. The pods exist
    // before the slice, so the slice's arrival is what the scheduler reacts to, however far its
    // caches had got when it first saw the pods.
    for name in ["a", "b", "c"] {
        claim_and_pod(cp, name, "4Gi").await;
    }
    publish(&publisher, &inventory, &none).await;
    let pending = two_bound_one_pending(cp, ["a", "b", "c"]).await;
    for name in ["a", "b", "c"].into_iter().filter(|n| *n != pending) {
        assert_own_share(cp, name, &none).await;
    }
    wait_unschedulable(cp, &format!("pod-{pending}"), "").await;
    assert!(
        results(cp, pending).await.is_empty(),
        "{pending} must stay unallocated"
    );

    // Factor 2: the node offers 16 GiB; the third claim is allocated (12 GiB on an 8 GiB card).
    publish(&publisher, &inventory, &doubled).await;
    assert_eq!(
        wait_for_binding(cp, &format!("pod-{pending}"), Duration::from_secs(120)).await,
        NODE
    );
    for name in ["a", "b", "c"] {
        assert_own_share(cp, name, &doubled).await;
    }
    // The offered memory is a wall too: 12 + 6 GiB > 16 GiB.
    claim_and_pod(cp, "d", "6Gi").await;
    wait_unschedulable(cp, "pod-d", "").await;
    assert!(results(cp, "d").await.is_empty(), "d must stay unallocated");
}
