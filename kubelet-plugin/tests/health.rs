//! GPU health against the real kube-apiserver (the e2e harness's control plane): the plugin's
//! slice controller and health watcher, fed by a fake inventory file, withdraw a GPU marked
//! unhealthy from the node's ResourceSlices (with a Node Event naming it), restore it when it is
//! healthy again, delete the slices when no GPU is left, and publish them again after.
//!
//! On v1.37 (resource.k8s.io/v1) and v1.31 (v1alpha3), the oldest supported. Gated like the
//! harness's tests: with `TESSERA_E2E` unset a test runs when its version's binaries are built and otherwise prints `SKIP …`; `TESSERA_E2E=0` skips; any other value
//! makes missing binaries a failure.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tessera_controller::ApiVersion;
use tessera_controller::publish::Publisher;
use tessera_driver::Inventory;
use tessera_e2e_harness::binaries::Binaries;
use tessera_e2e_harness::{ControlPlane, ControlPlaneOptions};
use tessera_kubelet_plugin::node::health::{
    HealthConfig, HealthSource, REASON_HEALTHY, REASON_UNHEALTHY,
};

const NODE: &str = "gpu-node-health";
const GPU0: &str = "GPU-4090a1b2-c3d4-4e5f-8a6b-7c8d9e0f1a2b";
const GPU1: &str = "GPU-40540c5d-e6f7-4a8b-9c0d-1e2f3a4b5c6d";

fn binaries_or_skip(minor: u32) -> Option<(tessera_e2e_harness::K8sVersion, Binaries)> {
    let version = tessera_e2e_harness::versions::PINNED
        .into_iter()
        .find(|v| v.minor() == minor)
        .expect("pinned version");
    match std::env::var("TESSERA_E2E").ok().as_deref() {
        Some("0") => {
            eprintln!("SKIP health test: TESSERA_E2E=0");
            None
        }
        Some(_) => Some((
            version,
            Binaries::locate(version)
                .unwrap_or_else(|e| panic!("TESSERA_E2E is set, so the test must run, but: {e}")),
        )),
        None => match Binaries::locate(version) {
            Ok(b) => Some((version, b)),
            Err(e) => {
                eprintln!("SKIP health test: {e} (set TESSERA_E2E=1 to make this a failure)");
                None
            }
        },
    }
}

/// Writes the fake node's inventory atomically, GPU 1's health as given.
fn write_inventory(path: &Path, gpus: &[(&str, &str)]) {
    let devices: Vec<_> = gpus
        .iter()
        .map(|(uuid, health)| {
            let (name, memory) = if *uuid == GPU0 {
                ("NVIDIA GeForce RTX 4090", 24u64 << 30)
            } else {
                ("NVIDIA L40S", 48u64 << 30)
            };
            json!({"uuid": uuid, "name": name, "memory": memory, "computeCapability": "8.9",
                   "health": health, "healthReason": "XID 79 (fallen off the bus)"})
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        json!({"driverVersion": "570.86.15", "devices": devices}).to_string(),
    )
    .expect("write inventory");
    std::fs::rename(&tmp, path).expect("rename inventory");
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: not within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The published devices' names, sorted.
async fn devices(publisher: &Publisher) -> Option<Vec<String>> {
    let slices = publisher.existing().await.ok()?;
    let mut names: Vec<String> = slices
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    Some(names)
}

async fn node_events(client: &kube::Client, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let list = events.list(&ListParams::default()).await.expect("events");
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NODE))
        .filter_map(|e| e.note)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_an_unhealthy_gpu_is_withdrawn_and_comes_back() {
    withdrawn_and_restored(37, ApiVersion::V1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_31_an_unhealthy_gpu_is_withdrawn_and_comes_back() {
    withdrawn_and_restored(31, ApiVersion::V1alpha3).await;
}

async fn withdrawn_and_restored(minor: u32, api: ApiVersion) {
    let Some((version, binaries)) = binaries_or_skip(minor) else {
        return;
    };
    let state = tempfile::Builder::new()
        .prefix("tessera-health-")
        .tempdir()
        .expect("tempdir");
    let mut options = ControlPlaneOptions::new(version, state.path().join("cluster"));
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options)
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    let client = cp.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE}}))
    .expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": "True",
                "reason": "KubeletReady", "message": "simulated"}]}}),
            ),
        )
        .await
        .expect("node status");

    let inventory_path = state.path().join("inventory.json");
    write_inventory(&inventory_path, &[(GPU0, "healthy"), (GPU1, "healthy")]);
    let inventory = Inventory::from_file(&inventory_path).expect("inventory");
    let slices = tessera_kubelet_plugin::slices::start(
        client.clone(),
        NODE,
        "exclusive",
        inventory,
        HealthConfig {
            source: HealthSource::File(inventory_path.clone()),
            interval: Duration::from_millis(200),
        },
    )
    .expect("slice controller");
    let publisher = Publisher::new(client.clone(), NODE, api);
    let both = vec!["gpu-0".to_string(), "gpu-1".to_string()];
    eventually("both GPUs published", || async {
        (devices(&publisher).await? == both).then_some(())
    })
    .await;

    // GPU 1 turns unhealthy: withdrawn, with a Warning Event on the Node naming it.
    write_inventory(&inventory_path, &[(GPU0, "healthy"), (GPU1, "unhealthy")]);
    eventually("GPU 1 withdrawn", || async {
        (devices(&publisher).await? == ["gpu-0"]).then_some(())
    })
    .await;
    let notes = eventually("GpuUnhealthy Event", || async {
        let notes = node_events(&client, REASON_UNHEALTHY).await;
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(
        notes[0].contains(GPU1) && notes[0].contains("XID 79"),
        "{notes:?}"
    );

    // Healthy again: back, with a Normal Event.
    write_inventory(&inventory_path, &[(GPU0, "healthy"), (GPU1, "healthy")]);
    eventually("GPU 1 restored", || async {
        (devices(&publisher).await? == both).then_some(())
    })
    .await;
    eventually("GpuHealthy Event", || async {
        let notes = node_events(&client, REASON_HEALTHY).await;
        notes.iter().any(|n| n.contains(GPU1)).then_some(())
    })
    .await;

    // Every GPU gone: the node's slices are deleted; one back: published again.
    write_inventory(&inventory_path, &[]);
    eventually("slices deleted", || async {
        publisher.existing().await.ok()?.is_empty().then_some(())
    })
    .await;
    write_inventory(&inventory_path, &[(GPU0, "healthy")]);
    eventually("GPU 0 published again", || async {
        (devices(&publisher).await? == ["gpu-0"]).then_some(())
    })
    .await;
    let generation = publisher
        .existing()
        .await
        .expect("slices")
        .into_values()
        .next()
        .expect("a slice")["spec"]["pool"]["generation"]
        .as_i64()
        .expect("generation");
    assert!(generation >= 4, "the generation only goes up: {generation}");
    drop(slices);
    cp.stop();
}
