//! GPU health against the real kube-apiserver (the e2e harness's control plane): the plugin's
//! slice controller and health watcher, fed by a fake inventory file, stop offering a GPU marked
//! unhealthy (with a Node Event naming it) — on v1.37 (resource.k8s.io/v1) its devices get a
//! `NoSchedule` taint, on v1.31 (v1alpha3, no taints) they are withdrawn from the node's
//! ResourceSlices — offer it again when it is healthy, and follow GPUs that are gone (tainted
//! `NoExecute` on v1.37; on v1.31 the slices are deleted when no GPU is left and published again
//! after). And the NVML path end to end: GPUs and health from the fake NVML
//! (`fake-gpu/nvml`), where a critical XID injected into the fake node taints its GPU
//! `gpu.tessera.dev/xid=79:NoExecute` and an application XID changes nothing.
//! Gated like every
//! test that needs built binaries (`tessera_built_libs::require`): `TESSERA_E2E=1` makes missing
//! binaries a failure, `0` skips, unset runs when they are built and otherwise says why it skips.

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
    Binaries::for_test(version, "health").map(|binaries| (version, binaries))
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

/// The published devices, sorted, each with its taints as `key=value:effect` (empty when
/// untainted).
async fn devices(publisher: &Publisher) -> Option<Vec<(String, Vec<String>)>> {
    let slices = publisher.existing().await.ok()?;
    let mut devices: Vec<(String, Vec<String>)> = slices
        .values()
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| {
            let taints = d["taints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    format!(
                        "{}={}:{}",
                        t["key"].as_str().unwrap_or_default(),
                        t["value"].as_str().unwrap_or_default(),
                        t["effect"].as_str().unwrap_or_default()
                    )
                })
                .collect();
            Some((d["name"].as_str()?.to_string(), taints))
        })
        .collect();
    devices.sort();
    Some(devices)
}

/// What `devices` should be: `untainted` devices, and each of `tainted` with its one taint.
fn expect(untainted: &[&str], tainted: &[(&str, &str)]) -> Vec<(String, Vec<String>)> {
    let mut devices: Vec<(String, Vec<String>)> = untainted
        .iter()
        .map(|d| (d.to_string(), Vec::new()))
        .chain(
            tainted
                .iter()
                .map(|(d, t)| (d.to_string(), vec![t.to_string()])),
        )
        .collect();
    devices.sort();
    devices
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

/// A control plane in `dir` with the Ready Node [`NODE`].
async fn control_plane_with_node(
    version: tessera_e2e_harness::K8sVersion,
    binaries: Binaries,
    dir: &Path,
) -> ControlPlane {
    let mut options = ControlPlaneOptions::new(version, dir.join("cluster"));
    options.binaries = Some(binaries);
    let cp = ControlPlane::start(options)
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"));
    let nodes: Api<Node> = Api::all(cp.client());
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
    cp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_an_unhealthy_gpu_is_tainted_and_comes_back() {
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
    let cp = control_plane_with_node(version, binaries, state.path()).await;
    let client = cp.client();

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
    let taints = api == ApiVersion::V1;
    let both = expect(&["gpu-0", "gpu-1"], &[]);
    eventually("both GPUs published", || async {
        (devices(&publisher).await? == both).then_some(())
    })
    .await;

    // GPU 1 turns unhealthy: tainted NoSchedule (v1) or withdrawn, with a Warning Event on the
    // Node naming it.
    write_inventory(&inventory_path, &[(GPU0, "healthy"), (GPU1, "unhealthy")]);
    let unhealthy = if taints {
        expect(
            &["gpu-0"],
            &[("gpu-1", "gpu.tessera.dev/unhealthy=:NoSchedule")],
        )
    } else {
        expect(&["gpu-0"], &[])
    };
    eventually("GPU 1 no longer offered", || async {
        (devices(&publisher).await? == unhealthy).then_some(())
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

    // Every GPU gone: tainted NoExecute (v1), or the node's slices are deleted; one back:
    // offered again.
    write_inventory(&inventory_path, &[]);
    let gone = "gpu.tessera.dev/gone=:NoExecute";
    eventually("every GPU gone", || async {
        if taints {
            (devices(&publisher).await? == expect(&[], &[("gpu-0", gone), ("gpu-1", gone)]))
                .then_some(())
        } else {
            publisher.existing().await.ok()?.is_empty().then_some(())
        }
    })
    .await;
    write_inventory(&inventory_path, &[(GPU0, "healthy")]);
    let one_back = if taints {
        expect(&["gpu-0"], &[("gpu-1", gone)])
    } else {
        expect(&["gpu-0"], &[])
    };
    eventually("GPU 0 published again", || async {
        (devices(&publisher).await? == one_back).then_some(())
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

/// Names the scenario a re-run of this test executable runs (see [`in_scenario`]).
const SCENARIO_ENV: &str = "TESSERA_HEALTH_SCENARIO";

/// `Some(true)` in the child running `scenario`, `Some(false)` in a child running another one
/// (nothing to do), `None` in the parent.
fn in_scenario(scenario: &str) -> Option<bool> {
    std::env::var(SCENARIO_ENV).ok().map(|s| s == scenario)
}

/// Appends XID events to the fake NVML's events file in one write (so a reader gets them
/// together and in order), as `fake-gpu/README.md` describes: one JSON line each.
fn inject_xids(events: &Path, xids: &[(&str, u64)]) {
    use std::io::Write;
    let lines: String = xids
        .iter()
        .map(|(uuid, xid)| format!("{}\n", json!({"uuid": uuid, "xid": xid})))
        .collect();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(events)
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .expect("append to the events file");
}

/// The plugin's NVML health path end to end: GPUs discovered through the fake NVML (no
/// inventory file), the health watcher on its XID event set. The fake NVML reads its node from
/// the environment at `nvmlInit`, so the scenario runs in a child (this executable re-run) with
/// a state file, and events file, of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_37_a_critical_xid_from_nvml_taints_a_gpu() {
    const NAME: &str = "v1_37_a_critical_xid_from_nvml_taints_a_gpu";
    match in_scenario(NAME) {
        Some(true) => return critical_xid_taints(37, ApiVersion::V1).await,
        Some(false) => return,
        None => {}
    }
    if binaries_or_skip(37).is_none() {
        return;
    }
    let nvml = tessera_built_libs::target_dir().join("libnvidia_ml.so");
    let Some(()) = tessera_built_libs::require("health (NVML)", nvml.exists(), || {
        format!("{} is not built (cargo build --workspace)", nvml.display())
    }) else {
        return;
    };
    // Fails, saying to rebuild, when the library is older than its sources.
    tessera_built_libs::built(
        "libnvidia_ml.so",
        &["fake-gpu/nvml/src", "fake-gpu/model/src", "gpu-abi/src"],
    );
    let dir = tempfile::Builder::new()
        .prefix("tessera-health-nvml-")
        .tempdir()
        .expect("tempdir");
    let output = std::process::Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(SCENARIO_ENV, NAME)
        // The default fake node (GPU0, an RTX 4090, and GPU1, an L40S) on a state file of its
        // own; the events file is `<state>.events`.
        .env_remove("FAKEGPU_CONFIG")
        .env_remove("FAKEGPU_EVENTS")
        .env("FAKEGPU_STATE", dir.path().join("fakegpu.state"))
        .output()
        .expect("run the scenario");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "scenario {NAME} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

async fn critical_xid_taints(minor: u32, api: ApiVersion) {
    let (version, binaries) = binaries_or_skip(minor).expect("checked by the parent");
    let mut events = std::env::var_os("FAKEGPU_STATE").expect("the parent sets FAKEGPU_STATE");
    events.push(".events");
    let events = std::path::PathBuf::from(events);
    let nvml = tessera_built_libs::target_dir().join("libnvidia_ml.so");
    let dir = tempfile::Builder::new()
        .prefix("tessera-health-")
        .tempdir()
        .expect("tempdir");
    let cp = control_plane_with_node(version, binaries, dir.path()).await;
    let client = cp.client();

    // What the plugin does without `--inventory`: the GPUs from NVML, health from NVML.
    let inventory = tessera_driver::nvml::discover(Some(nvml.as_os_str())).expect("NVML inventory");
    assert_eq!(
        inventory
            .gpus
            .iter()
            .map(|g| g.uuid.as_str())
            .collect::<Vec<_>>(),
        [GPU0, GPU1]
    );
    let slices = tessera_kubelet_plugin::slices::start(
        client.clone(),
        NODE,
        "exclusive",
        inventory,
        HealthConfig {
            source: HealthSource::Nvml(Some(nvml.clone())),
            interval: Duration::from_millis(200),
        },
    )
    .expect("slice controller");
    let publisher = Publisher::new(client.clone(), NODE, api);
    let both = expect(&["gpu-0", "gpu-1"], &[]);
    eventually("both GPUs published", || async {
        (devices(&publisher).await? == both).then_some(())
    })
    .await;
    let after_xid = expect(&["gpu-0"], &[("gpu-1", "gpu.tessera.dev/xid=79:NoExecute")]);

    // XID 13 (an application's fault) on GPU 0, then XID 79 (fallen off the bus) on GPU 1, in
    // one write: the watcher's event set delivers them together, in that order, and the watcher
    // handles them in order. NVML (the fake as the real one) delivers only events that happen
    // after the watcher registered its GPUs, which its thread does after `start` returns, so
    // the pair is injected again until GPU 1 is withdrawn; repeats change nothing.
    let start = Instant::now();
    loop {
        inject_xids(&events, &[(GPU0, 13), (GPU1, 79)]);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut withdrawn = false;
        while Instant::now() < deadline {
            if devices(&publisher).await.as_ref() == Some(&after_xid) {
                withdrawn = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if withdrawn {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "GPU 1 not tainted within 60 s of XID 79"
        );
    }
    // GPU 1 is tainted while GPU 0 stays untainted: its XID 13, handled before GPU 1's XID 79,
    // changed nothing.
    let notes = eventually("GpuUnhealthy Event", || async {
        let notes = node_events(&client, REASON_UNHEALTHY).await;
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains(GPU1) && n.contains("critical XID 79")),
        "{notes:?}"
    );
    assert!(
        notes.iter().all(|n| !n.contains(GPU0)),
        "XID 13 withdraws nothing: {notes:?}"
    );
    assert_eq!(devices(&publisher).await.expect("slices"), after_xid);
    drop(slices);
    cp.stop();
}
