//! The first proof the project stands on: against a real control plane, the
//! stock kube-scheduler allocates a ResourceClaim from a ResourceSlice that we
//! publish for a node, and binds the pod that uses the claim to that node.
//!
//! One test per pinned Kubernetes version: `v1alpha3` through dynamic objects
//! for 1.31 (k8s-openapi 0.29 no longer ships it), typed `v1` for the newest.

mod common;

use std::time::Duration;

use common::{binaries_or_skip, create_ready_node, init_tracing, pod_with_claim, wait_for_binding};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1 as dra;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

const DRIVER: &str = "gpu.tessera.dev";
const DEVICE_CLASS: &str = "gpu.tessera.dev";
const NODE: &str = "sim-gpu-node-0";
const CLAIM: &str = "gpu-claim";
const POD: &str = "gpu-pod";
const DEVICES: [&str; 2] = ["gpu-0", "gpu-1"];
const BIND_TIMEOUT: Duration = Duration::from_secs(90);

/// The two devices of the node, as v1 device JSON (attributes named as
/// NVIDIA's driver names them, so CEL written for it carries over).
fn v1_devices() -> Vec<Value> {
    DEVICES
        .iter()
        .enumerate()
        .map(|(index, name)| {
            json!({
                "name": name,
                "attributes": {
                    "index": { "int": index },
                    "uuid": { "string": format!("GPU-00000000-0000-0000-0000-00000000000{index}") },
                    "productName": { "string": "NVIDIA GeForce RTX 4090" },
                    "cudaComputeCapability": { "version": "8.9.0" },
                },
                "capacity": { "memory": { "value": "24Gi" } },
            })
        })
        .collect()
}

/// The same devices in v1alpha3's shape: fields under `basic`, capacity a bare quantity.
fn v1alpha3_devices() -> Vec<Value> {
    v1_devices()
        .into_iter()
        .map(|mut d| {
            let capacity = json!({ "memory": d["capacity"]["memory"]["value"].take() });
            json!({ "name": d["name"].take(), "basic": { "attributes": d["attributes"].take(), "capacity": capacity } })
        })
        .collect()
}

fn device_class_json(api_version: &str) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": "DeviceClass",
        "metadata": { "name": DEVICE_CLASS },
        "spec": { "selectors": [{ "cel": { "expression": format!("device.driver == \"{DRIVER}\"") } }] },
    })
}

fn slice_json(api_version: &str, devices: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": "ResourceSlice",
        "metadata": { "name": format!("{NODE}-{DRIVER}") },
        "spec": {
            "driver": DRIVER,
            "nodeName": NODE,
            "pool": { "name": NODE, "generation": 1, "resourceSliceCount": 1 },
            "devices": devices,
        },
    })
}

/// Checks the claim's status: one device of our driver, from the node's pool,
/// reserved for the pod.
fn assert_allocated(claim: &Value) {
    let results = claim["status"]["allocation"]["devices"]["results"]
        .as_array()
        .unwrap_or_else(|| panic!("claim has no allocation results: {claim:#}"));
    assert_eq!(results.len(), 1, "one device requested: {claim:#}");
    let result = &results[0];
    assert_eq!(result["driver"], DRIVER);
    assert_eq!(result["pool"], NODE);
    assert_eq!(result["request"], "gpu");
    let device = result["device"].as_str().unwrap_or_default();
    assert!(
        DEVICES.contains(&device),
        "allocated device {device:?} is not one of ours"
    );
    let reserved = claim["status"]["reservedFor"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        reserved
            .iter()
            .any(|r| r["resource"] == "pods" && r["name"] == POD),
        "claim not reserved for the pod: {claim:#}"
    );
}

async fn start(version: K8sVersion, test: &str) -> Option<(ControlPlane, common::StateDir)> {
    init_tracing();
    let binaries = binaries_or_skip(version, test)?;
    let state = common::StateDir::new(test);
    let mut options = ControlPlaneOptions::new(version, state.path());
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options)
        .await
        .unwrap_or_else(|e| panic!("{test}: control plane: {e}"));
    eprintln!(
        "{test}: {} up in {:.1}s",
        cp.binaries().version_string,
        cp.started_in().as_secs_f64()
    );
    Some((cp, state))
}

/// Creates the pod and waits for the scheduler; returns the claim as JSON.
async fn schedule_pod(cp: &ControlPlane) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    pods.create(&PostParams::default(), &pod_with_claim(POD, CLAIM))
        .await
        .expect("creating pod");
    let node = wait_for_binding(
        &cp.client(),
        POD,
        &cp.state().log("kube-scheduler"),
        BIND_TIMEOUT,
    )
    .await;
    assert_eq!(node, NODE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_allocates_claim_v1_37() {
    let test = "scheduler_allocates_claim_v1_37";
    let Some((cp, _state)) = start("1.37".parse().expect("version"), test).await else {
        return;
    };
    let client = cp.client();
    create_ready_node(&client, NODE).await;

    let classes: Api<dra::DeviceClass> = Api::all(client.clone());
    let slices: Api<dra::ResourceSlice> = Api::all(client.clone());
    let claims: Api<dra::ResourceClaim> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();
    let class: dra::DeviceClass =
        serde_json::from_value(device_class_json("resource.k8s.io/v1")).expect("class");
    classes
        .create(&pp, &class)
        .await
        .expect("creating DeviceClass");
    let slice: dra::ResourceSlice =
        serde_json::from_value(slice_json("resource.k8s.io/v1", v1_devices())).expect("slice");
    let created = slices
        .create(&pp, &slice)
        .await
        .expect("creating ResourceSlice");
    // The apiserver drops fields whose gate is off; ours must all survive.
    assert_eq!(created.spec.devices.as_ref().map(Vec::len), Some(2));
    let claim: dra::ResourceClaim = serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": { "name": CLAIM, "namespace": "default" },
        "spec": { "devices": { "requests": [{ "name": "gpu", "exactly": { "deviceClassName": DEVICE_CLASS } }] } },
    }))
    .expect("claim");
    claims
        .create(&pp, &claim)
        .await
        .expect("creating ResourceClaim");

    schedule_pod(&cp).await;
    let claim = claims.get(CLAIM).await.expect("reading claim");
    assert_allocated(&serde_json::to_value(&claim).expect("claim as JSON"));
    cp.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_allocates_claim_v1_31() {
    let test = "scheduler_allocates_claim_v1_31";
    let Some((cp, _state)) = start("1.31".parse().expect("version"), test).await else {
        return;
    };
    let client = cp.client();
    create_ready_node(&client, NODE).await;

    let gvk = |kind: &str| GroupVersionKind::gvk("resource.k8s.io", "v1alpha3", kind);
    let class_ar = ApiResource::from_gvk_with_plural(&gvk("DeviceClass"), "deviceclasses");
    let slice_ar = ApiResource::from_gvk_with_plural(&gvk("ResourceSlice"), "resourceslices");
    let claim_ar = ApiResource::from_gvk_with_plural(&gvk("ResourceClaim"), "resourceclaims");
    let classes: Api<DynamicObject> = Api::all_with(client.clone(), &class_ar);
    let slices: Api<DynamicObject> = Api::all_with(client.clone(), &slice_ar);
    let claims: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &claim_ar);
    let pp = PostParams::default();
    let object = |v: Value| serde_json::from_value::<DynamicObject>(v).expect("object");

    classes
        .create(&pp, &object(device_class_json("resource.k8s.io/v1alpha3")))
        .await
        .expect("creating DeviceClass");
    let created = slices
        .create(
            &pp,
            &object(slice_json("resource.k8s.io/v1alpha3", v1alpha3_devices())),
        )
        .await
        .expect("creating ResourceSlice");
    assert_eq!(
        created.data["spec"]["devices"].as_array().map(Vec::len),
        Some(2)
    );
    let claim = object(json!({
        "apiVersion": "resource.k8s.io/v1alpha3",
        "kind": "ResourceClaim",
        "metadata": { "name": CLAIM, "namespace": "default" },
        "spec": { "devices": { "requests": [{ "name": "gpu", "deviceClassName": DEVICE_CLASS }] } },
    }));
    claims
        .create(&pp, &claim)
        .await
        .expect("creating ResourceClaim");

    schedule_pod(&cp).await;
    let claim = claims.get(CLAIM).await.expect("reading claim");
    assert_allocated(&serde_json::to_value(&claim).expect("claim as JSON"));
    cp.stop();
}
