//! Real-control-plane helpers, gated like the e2e harness's own tests: with `TESSERA_E2E` unset a
//! test runs when the version's binaries are built and otherwise prints `SKIP …`; `TESSERA_E2E=0`
//! skips; any other value makes missing binaries a failure.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tessera_driver::{Gpu, Inventory};
use tessera_e2e_harness::binaries::Binaries;
use tessera_e2e_harness::process::log_tail;
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions, K8sVersion};

pub fn binaries_or_skip(version: K8sVersion, test: &str) -> Option<Binaries> {
    Binaries::for_test(version, test)
}

pub struct Cluster {
    pub cp: ControlPlane,
    _state: tempfile::TempDir,
}

pub async fn start(minor: u32, test: &str, gates: &[(&str, bool)]) -> Option<Cluster> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| tessera_e2e_harness::DEFAULT_LOG_FILTER.into()),
        )
        .with_test_writer()
        .try_init();
    let version = tessera_e2e_harness::versions::PINNED
        .into_iter()
        .find(|v| v.minor() == minor)
        .expect("pinned version");
    let binaries = binaries_or_skip(version, test)?;
    let state = tempfile::Builder::new()
        .prefix(&format!("tessera-ctrl-{test}-"))
        .tempdir()
        .expect("temp dir");
    let mut options = ControlPlaneOptions::new(version, state.path());
    options.binaries = Some(binaries);
    options.extra_feature_gates = gates.iter().map(|(g, on)| (g.to_string(), *on)).collect();
    let cp = ControlPlane::start(options)
        .await
        .unwrap_or_else(|e| panic!("{test}: control plane: {e}"));
    Some(Cluster { cp, _state: state })
}

pub fn inventory() -> Inventory {
    let gpu = |index: u32, uuid: &str, name: &str, gib: u64| Gpu {
        uuid: uuid.into(),
        index,
        minor: index,
        product_name: name.into(),
        memory: gib << 30,
        brand: Some("geforce".into()),
        architecture: Some("ada".into()),
        cuda_compute_capability: Some("8.9".into()),
        pci_bus_id: Some(format!("0000:0{}:00.0", index + 1)),
        pcie_root: None,
        numa_node: None,
        context_overhead: 0,
        driver_memory_wall: false,
    };
    Inventory {
        driver_version: Some("570.86.15".into()),
        gpus: vec![
            gpu(
                0,
                "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b",
                "NVIDIA GeForce RTX 4090",
                24,
            ),
            gpu(
                1,
                "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d",
                "NVIDIA L40S",
                48,
            ),
        ],
    }
}

pub async fn create_ready_node(client: &kube::Client, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(client.clone());
    let resources = json!({ "cpu": "8", "memory": "32Gi", "pods": "110" });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
    }))
    .expect("node object");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("creating node");
    let status = json!({ "status": { "capacity": resources, "allocatable": resources,
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated" }] } });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("node status")
}

pub fn pod_with_claim(name: &str, claim: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "containers": [{ "name": "main", "image": "tessera.invalid/never-pulled:0", "resources": { "claims": [{ "name": "gpu" }] } }],
            "resourceClaims": [{ "name": "gpu", "resourceClaimName": claim }],
        },
    }))
    .expect("pod object")
}

pub async fn wait_for_binding(cp: &ControlPlane, name: &str, timeout: Duration) -> String {
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await.expect("reading pod");
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            return node;
        }
        if start.elapsed() > timeout {
            let conditions = pod.status.and_then(|s| s.conditions).unwrap_or_default();
            panic!(
                "pod {name} not bound after {timeout:?}; conditions: {conditions:#?}\nscheduler log:\n{}",
                log_tail(&cp.state().log("kube-scheduler"), 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `f` returns `Some`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `resource.k8s.io/v1` resource.
pub fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("resource.k8s.io", "v1", kind),
        plural,
    )
}

/// Creates `object` (in `default` when namespaced), failing the test with the server's answer.
pub async fn create(cp: &ControlPlane, ar: &ApiResource, namespaced: bool, object: Value) {
    let api: Api<DynamicObject> = if namespaced {
        Api::namespaced_with(cp.client(), "default", ar)
    } else {
        Api::all_with(cp.client(), ar)
    };
    let name = object["metadata"]["name"].clone();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object).expect("object"),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// The generic DeviceClass `gpu.tessera.dev` (v1), as the chart makes it.
pub async fn create_generic_class(cp: &ControlPlane) {
    create(
        cp,
        &resource("DeviceClass", "deviceclasses"),
        false,
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
            "metadata": { "name": "gpu.tessera.dev" },
            "spec": { "selectors": [{ "cel": { "expression": "device.driver == \"gpu.tessera.dev\"" } }] },
        }),
    )
    .await;
}

/// Waits until the scheduler has reported `pod` Unschedulable with a message containing
/// `message` (`""`: any); the pod must never be bound meanwhile.
pub async fn wait_unschedulable(cp: &ControlPlane, pod: &str, message: &str) {
    let pods: Api<Pod> = Api::namespaced(cp.client(), "default");
    let start = Instant::now();
    loop {
        let p = pods.get(pod).await.expect("pod");
        assert_eq!(
            p.spec.as_ref().and_then(|s| s.node_name.clone()),
            None,
            "{pod} must not be bound"
        );
        let unschedulable = p
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
                    && c.message.as_deref().unwrap_or_default().contains(message)
            });
        if unschedulable {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{pod}: the scheduler never reported it unschedulable ({message:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
