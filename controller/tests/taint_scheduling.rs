//! Device taints against the real kube-apiserver, kube-scheduler and kube-controller-manager
//! v1.37: a node with one GPU in consumable mode, published as the node controller publishes an
//! unhealthy GPU. `NoSchedule` keeps new claims off it (a claim that tolerates the taint, as an
//! admin's debugging pod would, still gets it); `NoExecute` after a critical XID evicts the pods
//! using it; and an admin's DeviceTaintRule drains the GPU for maintenance without the plugin
//! doing anything (`docs/reference/resourceslices.md#gpu-health`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};
use tessera_controller::ApiVersion;
use tessera_controller::publish::Publisher;
use tessera_controller::slices::{CounterLayout, SharingMode, build_pool_with};
use tessera_driver::health::{TAINT_UNHEALTHY, TAINT_XID, Taint, TaintEffect};
use tessera_driver::{Inventory, MemoryOvercommit};
use tessera_e2e_harness::ControlPlane;

const NODE: &str = "gpu-node-0";
const BIND: Duration = Duration::from_secs(120);

/// GPU 0 of the common inventory alone (an RTX 4090).
fn one_gpu() -> Inventory {
    let mut inventory = inventory();
    inventory.gpus.truncate(1);
    inventory
}

async fn publish(publisher: &Publisher, taint: Option<Taint>) {
    let taints: BTreeMap<u32, Taint> = taint.into_iter().map(|t| (0, t)).collect();
    let plan = build_pool_with(
        &one_gpu(),
        NODE,
        SharingMode::Consumable,
        CounterLayout::Separate,
        &MemoryOvercommit::none(),
        &taints,
    )
    .expect("plan");
    let report = publisher.sync(&plan).await.expect("publish");
    assert!(report.dropped.is_empty(), "dropped {:?}", report.dropped);
}

/// A 4 GiB claim, tolerating `tolerations`, and a pod `pod-<name>` that uses it.
async fn claim_and_pod(cp: &ControlPlane, name: &str, tolerations: Value) {
    let claim = json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": {
            "deviceClassName": "gpu.tessera.dev",
            "capacity": { "requests": { "memory": "4Gi", "cores": "10" } },
            "tolerations": tolerations,
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

/// Waits until the device-taint eviction controller has deleted the pod: marked it
/// `DisruptionTarget` (`DeletionByDeviceTaintManager`) and set its deletion timestamp (without a
/// kubelet, a bound pod stays terminating).
async fn wait_evicted(cp: &ControlPlane, pod: &str) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let start = std::time::Instant::now();
    loop {
        let p = pods.get(pod).await.expect("pod");
        let by_taint = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| {
                c.type_ == "DisruptionTarget"
                    && c.reason.as_deref() == Some("DeletionByDeviceTaintManager")
            });
        if by_taint && p.metadata.deletion_timestamp.is_some() {
            return;
        }
        assert!(
            start.elapsed() < BIND,
            "{pod} not evicted after {BIND:?}; controller-manager log:\n{}",
            tessera_e2e_harness::process::log_tail(&cp.state().log("kube-controller-manager"), 80)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_scheduler_honours_gpu_taints_and_taint_rules() {
    let Some(c) = start(37, "v1_37_taint_scheduling", &[]).await else {
        return;
    };
    let cp = &c.cp;
    create_ready_node(&cp.client(), NODE).await;
    create_generic_class(cp).await;
    let publisher = Publisher::new(cp.client(), NODE, ApiVersion::V1);

    // Unhealthy (NoSchedule): a new claim stays off the GPU; one that tolerates it gets it.
    publish(
        &publisher,
        Some(Taint {
            key: TAINT_UNHEALTHY,
            value: String::new(),
            effect: TaintEffect::NoSchedule,
        }),
    )
    .await;
    claim_and_pod(cp, "plain", json!([])).await;
    claim_and_pod(
        cp,
        "tolerant",
        json!([{ "key": TAINT_UNHEALTHY, "operator": "Exists", "effect": "NoSchedule" }]),
    )
    .await;
    // No device for it (not merely the not-ready taint of a new node).
    wait_unschedulable(cp, "pod-plain", "cannot allocate all claims").await;
    assert_eq!(wait_for_binding(cp, "pod-tolerant", BIND).await, NODE);

    // Healthy again: the waiting pod is placed.
    publish(&publisher, None).await;
    assert_eq!(wait_for_binding(cp, "pod-plain", BIND).await, NODE);

    // A critical XID (NoExecute): the device-taint eviction controller deletes both pods, the
    // tolerant one too, which tolerates only NoSchedule.
    publish(
        &publisher,
        Some(Taint {
            key: TAINT_XID,
            value: "79".into(),
            effect: TaintEffect::NoExecute,
        }),
    )
    .await;
    wait_evicted(cp, "pod-plain").await;
    wait_evicted(cp, "pod-tolerant").await;

    // An admin drains the (healthy) GPU for maintenance with a DeviceTaintRule: nothing new
    // lands on it until the rule is deleted.
    publish(&publisher, None).await;
    let rules = resource("DeviceTaintRule", "devicetaintrules");
    create(
        cp,
        &rules,
        false,
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceTaintRule",
            "metadata": { "name": "maintenance-gpu-node-0-gpu-0" },
            "spec": {
                "deviceSelector": { "driver": "gpu.tessera.dev", "pool": NODE, "device": "gpu-0" },
                "taint": { "key": "example.com/maintenance", "effect": "NoSchedule" },
            },
        }),
    )
    .await;
    claim_and_pod(cp, "during-maintenance", json!([])).await;
    wait_unschedulable(cp, "pod-during-maintenance", "cannot allocate all claims").await;
    let api: Api<DynamicObject> = Api::all_with(cp.client(), &rules);
    api.delete("maintenance-gpu-node-0-gpu-0", &DeleteParams::default())
        .await
        .expect("deleting the rule");
    assert_eq!(
        wait_for_binding(cp, "pod-during-maintenance", BIND).await,
        NODE
    );
}
