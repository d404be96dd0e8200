//! On the newest Kubernetes, the API features Tessera's sharing modes rest on
//! work end to end with the stock scheduler (design: "How a GPU is offered"):
//! - `consumable`: one device with `allowMultipleAllocations` and capacity
//!   request policies; claims take fractions, and the scheduler refuses what
//!   no longer fits;
//! - `partitioned`: shared counters and devices consuming them survive the
//!   apiserver (it silently drops fields whose gate is off).

mod common;

use std::time::{Duration, Instant};

use common::{binaries_or_skip, create_ready_node, init_tracing, pod_with_claim, wait_for_binding};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1 as dra;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

const DRIVER: &str = "gpu.tessera.dev";
const NODE: &str = "sim-gpu-node-0";

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("object matches the k8s-openapi type")
}

fn claim(name: &str, memory: &str, cores: &str) -> dra::ResourceClaim {
    typed(json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "devices": { "requests": [{
            "name": "gpu",
            "exactly": {
                "deviceClassName": DRIVER,
                "capacity": { "requests": { "memory": memory, "cores": cores } },
            },
        }] } },
    }))
}

async fn start(test: &str) -> Option<(ControlPlane, common::StateDir)> {
    init_tracing();
    let version = K8sVersion::newest();
    let binaries = binaries_or_skip(version, test)?;
    let state = common::StateDir::new(test);
    let mut options = ControlPlaneOptions::new(version, state.path());
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options)
        .await
        .unwrap_or_else(|e| panic!("{test}: control plane: {e}"));
    Some((cp, state))
}

/// Waits for the scheduler's verdict that `pod` does not fit; returns its message.
async fn wait_unschedulable(pods: &Api<Pod>, pod: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let p = pods.get(pod).await.expect("reading pod");
        assert!(
            p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none(),
            "{pod} was bound but must not fit"
        );
        let unschedulable = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            });
        if let Some(c) = unschedulable {
            return c.message.unwrap_or_default();
        }
        assert!(
            start.elapsed() < timeout,
            "{pod}: no scheduling verdict after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumable_capacity_shares_one_gpu() {
    let test = "consumable_capacity_shares_one_gpu";
    let Some((cp, _state)) = start(test).await else {
        return;
    };
    let client = cp.client();
    create_ready_node(&client, NODE).await;
    let pp = PostParams::default();

    let classes: Api<dra::DeviceClass> = Api::all(client.clone());
    classes
        .create(
            &pp,
            &typed(json!({
                "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                "metadata": { "name": DRIVER },
                "spec": { "selectors": [{ "cel": { "expression": format!("device.driver == \"{DRIVER}\"") } }] },
            })),
        )
        .await
        .expect("creating DeviceClass");

    let slices: Api<dra::ResourceSlice> = Api::all(client.clone());
    let slice: dra::ResourceSlice = typed(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": { "name": format!("{NODE}-{DRIVER}") },
        "spec": {
            "driver": DRIVER, "nodeName": NODE,
            "pool": { "name": NODE, "generation": 1, "resourceSliceCount": 1 },
            "devices": [{
                "name": "gpu-0",
                "allowMultipleAllocations": true,
                "attributes": { "uuid": { "string": "GPU-00000000-0000-0000-0000-000000000000" } },
                "capacity": {
                    "memory": { "value": "24Gi", "requestPolicy": { "default": "1Gi", "validRange": { "min": "1Gi", "step": "1Gi" } } },
                    "cores": { "value": "100", "requestPolicy": { "default": "100", "validRange": { "min": "1", "max": "100", "step": "1" } } },
                },
            }],
        },
    }));
    let created = slices
        .create(&pp, &slice)
        .await
        .expect("creating ResourceSlice");
    let device = &created.spec.devices.as_ref().expect("devices")[0];
    assert_eq!(
        device.allow_multiple_allocations,
        Some(true),
        "DRAConsumableCapacity is off: field dropped"
    );
    let memory = device
        .capacity
        .as_ref()
        .and_then(|c| c.get("memory"))
        .expect("memory capacity");
    assert!(memory.request_policy.is_some(), "requestPolicy dropped");

    let claims: Api<dra::ResourceClaim> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for (claim_name, memory) in [("share-a", "8Gi"), ("share-b", "8Gi"), ("too-big", "16Gi")] {
        claims
            .create(&pp, &claim(claim_name, memory, "25"))
            .await
            .expect("creating ResourceClaim");
    }
    let scheduler_log = cp.state().log("kube-scheduler");
    let mut share_ids = Vec::new();
    for name in ["share-a", "share-b"] {
        pods.create(&pp, &pod_with_claim(&format!("pod-{name}"), name))
            .await
            .expect("creating pod");
        let node = wait_for_binding(
            &client,
            &format!("pod-{name}"),
            &scheduler_log,
            Duration::from_secs(90),
        )
        .await;
        assert_eq!(node, NODE);
        let claim = claims.get(name).await.expect("claim");
        let allocation = claim.status.and_then(|s| s.allocation).expect("allocated");
        let results = allocation
            .devices
            .and_then(|d| d.results)
            .unwrap_or_default();
        let result = results.first().expect("one allocated device");
        assert_eq!(result.device, "gpu-0");
        let consumed = result
            .consumed_capacity
            .as_ref()
            .expect("consumedCapacity set");
        assert_eq!(consumed.get("memory").map(|q| q.0.as_str()), Some("8Gi"));
        share_ids.push(result.share_id.clone().expect("shareID set"));
    }
    assert_ne!(
        share_ids[0], share_ids[1],
        "two shares of one device need distinct shareIDs"
    );

    // 8Gi + 8Gi + 16Gi > 24Gi: the third must not fit.
    pods.create(&pp, &pod_with_claim("pod-too-big", "too-big"))
        .await
        .expect("creating pod");
    let message = wait_unschedulable(&pods, "pod-too-big", Duration::from_secs(60)).await;
    eprintln!("{test}: third claim refused as expected: {message}");
    cp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitionable_counters_survive() {
    let test = "partitionable_counters_survive";
    let Some((cp, _state)) = start(test).await else {
        return;
    };
    let slices: Api<dra::ResourceSlice> = Api::all(cp.client());
    let pp = PostParams::default();
    let pool = json!({ "name": NODE, "generation": 1, "resourceSliceCount": 2 });
    // Since 1.35 counters and devices live in separate slices of one pool.
    let counters: dra::ResourceSlice = typed(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": { "name": "counters" },
        "spec": {
            "driver": DRIVER, "nodeName": NODE, "pool": pool,
            "sharedCounters": [{ "name": "gpu-0", "counters": { "memory": { "value": "24Gi" } } }],
        },
    }));
    let halves: Vec<Value> = ["half-0", "half-1"]
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "capacity": { "memory": { "value": "12Gi" } },
                "consumesCounters": [{ "counterSet": "gpu-0", "counters": { "memory": { "value": "12Gi" } } }],
            })
        })
        .collect();
    let devices: dra::ResourceSlice = typed(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": { "name": "devices" },
        "spec": {
            "driver": DRIVER, "nodeName": NODE, "pool": pool,
            "devices": halves,
        },
    }));
    let counters = slices
        .create(&pp, &counters)
        .await
        .expect("creating counter slice");
    assert_eq!(
        counters.spec.shared_counters.map(|c| c.len()),
        Some(1),
        "DRAPartitionableDevices is off"
    );
    let devices = slices
        .create(&pp, &devices)
        .await
        .expect("creating device slice");
    for device in devices.spec.devices.expect("devices") {
        assert_eq!(
            device.consumes_counters.map(|c| c.len()),
            Some(1),
            "consumesCounters dropped"
        );
    }
    cp.stop();
}
