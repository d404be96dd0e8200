//! The standard topology attributes against the real kube-apiserver and kube-scheduler v1.37:
//! a node with three whole GPUs, GPU 0 under PCIe root complex pci0000:00 on NUMA node 0 and
//! GPUs 1 and 2 under pci0000:80 on node 1. A claim for two GPUs constrained to one root complex
//! (`matchAttribute: resource.kubernetes.io/pcieRoot`, what RDMA users write to pair a GPU with a
//! NIC) gets GPUs 1 and 2; a selector on `resource.kubernetes.io/numaNode` picks by node.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::json;
use tessera_controller::ApiVersion;
use tessera_controller::publish::Publisher;
use tessera_controller::slices::{CounterLayout, SharingMode, build_pool};
use tessera_driver::Inventory;
use tessera_e2e_harness::ControlPlane;

const NODE: &str = "gpu-node-0";

fn two_sockets() -> Inventory {
    let mut inventory = inventory();
    let template = inventory.gpus[0].clone();
    inventory.gpus = [("pci0000:00", 0), ("pci0000:80", 1), ("pci0000:80", 1)]
        .into_iter()
        .enumerate()
        .map(|(i, (root, node))| {
            let mut gpu = template.clone();
            gpu.index = i as u32;
            gpu.minor = i as u32;
            gpu.uuid = format!("GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2{i}");
            gpu.pcie_root = Some(root.into());
            gpu.numa_node = Some(node);
            gpu
        })
        .collect();
    inventory
}

async fn allocated_devices(cp: &ControlPlane, claim: &str) -> Vec<String> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        cp.client(),
        "default",
        &resource("ResourceClaim", "resourceclaims"),
    );
    let got = serde_json::to_value(api.get(claim).await.expect("claim")).expect("json");
    let mut devices: Vec<String> = got["status"]["allocation"]["devices"]["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["device"].as_str().map(str::to_string))
        .collect();
    devices.sort();
    devices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_claims_align_on_pcie_root_and_numa_node() {
    let Some(c) = start(37, "v1_37_topology", &[]).await else {
        return;
    };
    let cp = &c.cp;
    create_ready_node(&cp.client(), NODE).await;
    create_generic_class(cp).await;
    let plan = build_pool(
        &two_sockets(),
        NODE,
        SharingMode::Exclusive,
        CounterLayout::Separate,
    )
    .expect("plan");
    let report = Publisher::new(cp.client(), NODE, ApiVersion::V1)
        .sync(&plan)
        .await
        .expect("publish");
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);

    let request =
        |name: &str| json!({ "name": name, "exactly": { "deviceClassName": "gpu.tessera.dev" } });
    create(
        cp,
        &resource("ResourceClaim", "resourceclaims"),
        true,
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": { "name": "one-root", "namespace": "default" },
            "spec": { "devices": {
                "requests": [request("a"), request("b")],
                "constraints": [{ "requests": ["a", "b"],
                                  "matchAttribute": "resource.kubernetes.io/pcieRoot" }],
            } },
        }),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let mut pod = pod_with_claim("pod-one-root", "one-root");
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].resources = serde_json::from_value(json!({
            "claims": [{ "name": "gpu", "request": "a" }, { "name": "gpu", "request": "b" }]
        }))
        .ok();
    }
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    assert_eq!(
        wait_for_binding(cp, "pod-one-root", Duration::from_secs(120)).await,
        NODE
    );
    assert_eq!(allocated_devices(cp, "one-root").await, ["gpu-1", "gpu-2"]);

    // By NUMA node: the one GPU on node 0.
    create(
        cp,
        &resource("ResourceClaim", "resourceclaims"),
        true,
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": { "name": "node-0", "namespace": "default" },
            "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": {
                "deviceClassName": "gpu.tessera.dev",
                "selectors": [{ "cel": { "expression":
                    "device.attributes[\"resource.kubernetes.io\"].numaNode == 0" } }],
            } }] } },
        }),
    )
    .await;
    pods.create(
        &PostParams::default(),
        &pod_with_claim("pod-node-0", "node-0"),
    )
    .await
    .expect("pod");
    assert_eq!(
        wait_for_binding(cp, "pod-node-0", Duration::from_secs(120)).await,
        NODE
    );
    assert_eq!(allocated_devices(cp, "node-0").await, ["gpu-0"]);
}
